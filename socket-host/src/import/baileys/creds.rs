//! `creds.json` -> the engine's device: the keys, the linked identity (`me`), the signed account and the
//! pre-key counters, each checked against the others.

use std::str::FromStr;
use std::sync::Arc;

use serde_json::{Map, Value};
use wakeeper_shared::domain::TenantId;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore_binary::{Jid, Server};
use whatsapp_rust::waproto::whatsapp as wa;

use super::Report;
use super::address::all_digits;
use super::json::{
    ByteEncoding, bytes, decode_b64, fixed, key_pair, obj, opt_bytes, opt_int, opt_str, public_key, u32_of,
};

/// `creds.json` -> the engine's device.
pub(super) fn device_from_creds(tenant: &TenantId, creds: &Value, report: &mut Report) -> Result<Device, String> {
    let c = obj(Some(creds), "creds")?;
    let mut device = Device::new();
    read_keys(c, &mut device)?;
    read_me(c, tenant, &mut device, report)?;
    device.account = Some(Arc::new(read_account(c, &device, report)?));
    read_counters(c, &mut device, report)?;
    Ok(device)
}

/// The noise key, the identity, the signed pre-key (its signature checked), the registration id and the ADV
/// secret.
fn read_keys(c: &Map<String, Value>, device: &mut Device) -> Result<(), String> {
    device.noise_key = key_pair(obj(c.get("noiseKey"), "noiseKey")?, "noiseKey")?;
    device.identity_key = key_pair(obj(c.get("signedIdentityKey"), "signedIdentityKey")?, "signedIdentityKey")?;
    let spk = obj(c.get("signedPreKey"), "signedPreKey")?;
    device.signed_pre_key = key_pair(obj(spk.get("keyPair"), "signedPreKey.keyPair")?, "signedPreKey.keyPair")?;
    device.signed_pre_key_id = u32_of(spk.get("keyId"), "signedPreKey.keyId")?;
    device.signed_pre_key_signature = fixed(spk.get("signature"), "signedPreKey.signature", ByteEncoding::Buffer)?;
    if !device
        .identity_key
        .public_key
        .verify_signature(&device.signed_pre_key.public_key.serialize(), &device.signed_pre_key_signature)
    {
        return Err("`signedPreKey.signature` does not verify against `signedIdentityKey`".into());
    }
    device.registration_id = u32_of(c.get("registrationId"), "registrationId")?;
    // 0 is a registration id like any other: Baileys' `generateRegistrationId` keeps only the first random
    // byte, so one account in 256 has it, and WhatsApp took those registrations.
    device.adv_secret_key = match c.get("advSecretKey") {
        Some(Value::String(s)) => {
            let b = decode_b64(s).ok_or("`advSecretKey` is not valid base64")?;
            let len = b.len();
            b.try_into().map_err(|_| format!("`advSecretKey` must be 32 bytes (got {len})"))?
        }
        other => fixed(other, "advSecretKey", ByteEncoding::Buffer)?,
    };
    Ok(())
}

/// `me`: the linked device's phone-number JID, its LID and its push name.
fn read_me(c: &Map<String, Value>, tenant: &TenantId, device: &mut Device, report: &mut Report) -> Result<(), String> {
    let me = match c.get("me") {
        None | Some(Value::Null) => {
            return Err("`me` is missing: this Baileys session was never linked to a phone".into());
        }
        me => obj(me, "me")?,
    };
    let id = opt_str(me.get("id"), "me.id")?.ok_or("`me.id` is missing")?;
    let pn = Jid::from_str(id).map_err(|_| "`me.id` is not a JID")?;
    if pn.server != Server::Pn || pn.device == 0 || !all_digits(&pn.user) {
        return Err("`me.id` is not a linked device's phone-number JID (user:device@s.whatsapp.net)".into());
    }
    device.lid = match opt_str(me.get("lid"), "me.lid")? {
        Some(lid) => {
            let mut lid = Jid::from_str(lid).map_err(|_| "`me.lid` is not a JID")?;
            if lid.server != Server::Lid || !all_digits(&lid.user) {
                return Err("`me.lid` is not a LID JID (user[:device]@lid)".into());
            }
            if lid.device == 0 {
                lid.device = pn.device;
            }
            Some(lid)
        }
        None => {
            report.notes.push("no `me.lid`: the engine learns the LID at login".into());
            None
        }
    };
    device.pn = Some(pn);
    device.push_name = match opt_str(me.get("name"), "me.name")?.map(str::trim).filter(|n| !n.is_empty()) {
        Some(name) => name.to_owned(),
        None => {
            report.notes.push("no `me.name`: push name set to the tenant id (the engine needs one)".into());
            tenant.as_str().to_owned()
        }
    };
    Ok(())
}

/// `account`: the signed device identity; when the account's key is there, both signatures are checked to
/// cover this device's identity.
fn read_account(
    c: &Map<String, Value>,
    device: &Device,
    report: &mut Report,
) -> Result<wa::ADVSignedDeviceIdentity, String> {
    let account = match c.get("account") {
        None | Some(Value::Null) => return Err("`account` is missing: this Baileys session was never linked".into()),
        a => obj(a, "account")?,
    };
    let details = bytes(account.get("details"), "account.details", ByteEncoding::BufferOrBase64)?;
    let account_signature: [u8; 64] =
        fixed(account.get("accountSignature"), "account.accountSignature", ByteEncoding::BufferOrBase64)?;
    let device_signature: [u8; 64] =
        fixed(account.get("deviceSignature"), "account.deviceSignature", ByteEncoding::BufferOrBase64)?;
    let account_key =
        opt_bytes(account.get("accountSignatureKey"), "account.accountSignatureKey", ByteEncoding::BufferOrBase64)?;
    let identity_public = device.identity_key.public_key.public_key_bytes().to_vec();
    match &account_key {
        Some(key) => {
            let key_pub = public_key(key, "account.accountSignatureKey")?;
            let signed_by_account = [[6u8, 0], [6, 5]].iter().any(|prefix| {
                key_pub.verify_signature(&[&prefix[..], &details, &identity_public].concat(), &account_signature)
            });
            if !signed_by_account {
                return Err("`account.accountSignature` does not cover `signedIdentityKey`: the account belongs to another device".into());
            }
            let countersigned = [[6u8, 1], [6, 6]].iter().any(|prefix| {
                device.identity_key.public_key.verify_signature(
                    &[&prefix[..], &details, &identity_public, key_pub.public_key_bytes()].concat(),
                    &device_signature,
                )
            });
            if !countersigned {
                return Err("`account.deviceSignature` is not this identity's signature".into());
            }
        }
        None => report.notes.push("no `account.accountSignatureKey`: account signatures not checked".into()),
    }
    Ok(wa::ADVSignedDeviceIdentity {
        details: Some(details),
        account_signature_key: account_key,
        account_signature: Some(account_signature.to_vec()),
        device_signature: Some(device_signature.to_vec()),
    })
}

/// Routing info, props hash and the pre-key counters, with the defaults the engine starts from.
fn read_counters(c: &Map<String, Value>, device: &mut Device, report: &mut Report) -> Result<(), String> {
    device.edge_routing_info = opt_bytes(c.get("routingInfo"), "routingInfo", ByteEncoding::BufferOrBase64)?;
    device.props_hash = opt_str(c.get("lastPropHash"), "lastPropHash")?.map(str::to_owned);
    let counter = |field: &str| -> Result<u32, String> {
        Ok(opt_int(c.get(field), field)?
            .map(|n| u32::try_from(n).map_err(|_| format!("`{field}` is out of range")))
            .transpose()?
            .unwrap_or(0))
    };
    device.next_pre_key_id = counter("nextPreKeyId")?;
    device.first_unupload_pre_key_id = counter("firstUnuploadedPreKeyId")?;
    // Baileys uploads pre-keys at its first login and moves this watermark past them; below 2 nothing was
    // uploaded, and the engine uploads at login (an upload too many is harmless, a missing one is not).
    device.server_has_prekeys = device.first_unupload_pre_key_id > 1;
    // 0 = "no baseline yet": the engine seeds it at its first rotation check instead of rotating at once, and the
    // conversion stays a pure function of the files.
    device.last_signed_pre_key_rotation_ms = 0;
    report.notes.push(format!(
        "server_has_prekeys = {} (from firstUnuploadedPreKeyId); the login digest check corrects it either way",
        device.server_has_prekeys
    ));
    report.notes.push(
        "defaults: no cached server certificate (first login uses Noise XX), login_counter 0, lid_migrated false, \
         signed pre-key rotation baseline at first login"
            .into(),
    );
    Ok(())
}
