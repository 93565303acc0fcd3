//! Paired devices without a phone.
//!
//! A real pairing leaves the companion with fresh keys, a phone-number JID and LID, and an
//! `ADVSignedDeviceIdentity` (`account`) that the phone signed with the account key and the companion
//! countersigned. Minting does the phone's half here (the simulator keeps the account key, as WhatsApp's
//! servers know the phone) and runs the companion's half through the engine's own pairing code, so the
//! result is exactly what the engine would have stored. The device is then written in the `shared`
//! snapshot format, ready for a credential store.

use std::sync::Arc;

use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::Sha256;
use wakeeper_shared::domain::{CredentialSnapshot, DeviceRecord, TenantId};
use whatsapp_rust::buffa::Message;
use whatsapp_rust::wacore::libsignal::protocol::KeyPair;
use whatsapp_rust::wacore::pair::{DeviceState, PairUtils};
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore_binary::Jid;
use whatsapp_rust::waproto::whatsapp as wa;

use crate::keys::{now_secs, public_bytes};
use crate::state::{Account, DeviceEntry, KeyBundle, SignedPreKey};

/// ADV signature prefixes (WhatsApp Web's `WAWebAdvSignatureConstants`).
const ADV_ACCOUNT_SIGNATURE: &[u8] = &[6, 0];
/// The key-index list is signed by the account key under its own prefix. The engine does not verify it
/// today; it is signed anyway so the list is what a real server would send.
const ADV_KEY_INDEX_LIST_SIGNATURE: &[u8] = &[6, 2];

/// Choices for a minted device. The default is a restaurant's linked WhatsApp Web session.
#[derive(Debug, Clone)]
pub struct MintOptions {
    /// The display name; defaults to the tenant id. Never empty: the engine treats an empty name as a
    /// fresh pairing and waits for a full app-state sync.
    pub push_name: Option<String>,
    /// The companion device number (1-99); random when `None`.
    pub device_id: Option<u16>,
    /// Whether the server already holds the device's pre-keys. `true` (the state after a real first login)
    /// skips the engine's 800-key upload on connect; `false` makes the engine upload at login.
    pub server_has_prekeys: bool,
}

impl Default for MintOptions {
    fn default() -> Self {
        Self { push_name: None, device_id: None, server_has_prekeys: true }
    }
}

/// A minted device: who it is and the credentials a host needs to bring it online.
#[derive(Debug, Clone)]
pub struct MintedDevice {
    /// Phone-number device JID, `5511xxxxxxxx:N@s.whatsapp.net`.
    pub jid: String,
    /// LID device JID, `nnnnnnnnnnnnnnn:N@lid`.
    pub lid: String,
    /// The noise static public key the device logs in with.
    pub noise_public: [u8; 32],
    /// The credential snapshot (generation 0, the device record only).
    pub snapshot: CredentialSnapshot,
}

/// Why minting failed. Should not happen with a healthy engine; carries no key material.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// The engine rejected the signed device identity the simulator built.
    #[error("engine rejected the minted device identity: {0}")]
    Pairing(String),
    /// The engine's device did not convert to the snapshot format.
    #[error("device record conversion failed: {0}")]
    Record(#[from] serde_json::Error),
}

/// Converts the engine's device into the snapshot's device record. Field names are the engine's serde
/// names; what the record does not type travels in `rest`, so the conversion loses nothing.
pub fn device_to_record(device: &Device) -> Result<DeviceRecord, serde_json::Error> {
    serde_json::from_value(serde_json::to_value(device)?)
}

/// Converts a snapshot's device record back into the engine's device.
pub fn device_from_record(record: &DeviceRecord) -> Result<Device, serde_json::Error> {
    serde_json::from_value(serde_json::to_value(record)?)
}

/// Builds a paired engine device and the registry entry the simulator keeps for it. `taken` says whether
/// a phone number is already in use.
pub(crate) fn mint(
    tenant: Option<&TenantId>,
    opts: &MintOptions,
    taken: impl Fn(&str) -> bool,
) -> Result<(Device, DeviceEntry), MintError> {
    let mut device = Device::new();
    let (pn, lid) = allocate_jids(opts.device_id, taken);
    let push_name = match &opts.push_name {
        Some(n) if !n.is_empty() => n.clone(),
        _ => tenant.map_or_else(|| format!("wa-sim {}", pn.user), |t| t.as_str().to_owned()),
    };
    let identity_public = public_bytes(&device.identity_key);
    let phone = phone_half(&identity_public, &device.adv_secret_key);

    // The companion's half, by the engine's own code: verifies the HMAC and the account signature, adds
    // the device signature.
    let state = DeviceState {
        identity_key: device.identity_key.clone(),
        noise_key: device.noise_key.clone(),
        adv_secret_key: device.adv_secret_key,
    };
    let (account_bytes, _) =
        PairUtils::do_pair_crypto(&state, &phone.container).map_err(|e| MintError::Pairing(e.to_string()))?;
    let account = wa::ADVSignedDeviceIdentity::decode_from_slice(&account_bytes)
        .map_err(|e| MintError::Pairing(e.to_string()))?;

    device.pn = Some(pn.clone());
    device.lid = Some(lid.clone());
    device.push_name = push_name;
    device.account = Some(Arc::new(account));
    device.server_has_prekeys = opts.server_has_prekeys;

    let entry = DeviceEntry {
        jid: pn,
        lid: Some(lid),
        noise_public: public_bytes(&device.noise_key),
        tenant: tenant.map(|t| t.as_str().to_owned()),
        revoked: false,
        keys: KeyBundle {
            registration_id: Some(device.registration_id),
            identity: Some(identity_public),
            signed_pre_key: Some(SignedPreKey {
                id: device.signed_pre_key_id,
                public: public_bytes(&device.signed_pre_key),
                signature: device.signed_pre_key_signature.to_vec(),
            }),
            prekeys: Default::default(),
            server_has_prekeys: opts.server_has_prekeys,
        },
        account: Some(Account {
            key_index: phone.key_index,
            key_index_list: phone.key_index_list,
            created_secs: phone.created,
            device_identity: account_bytes,
        }),
        settings: Default::default(),
    };
    Ok((device, entry))
}

/// A fresh phone number and LID for a companion device (random device number 1-99 unless given).
pub(crate) fn allocate_jids(device_id: Option<u16>, taken: impl Fn(&str) -> bool) -> (Jid, Jid) {
    let mut rng = rand::rng();
    let device_id = device_id.unwrap_or_else(|| rng.random_range(1..=99));
    let phone = loop {
        let candidate = format!("5511{:08}", rng.random_range(0..100_000_000u32));
        if !taken(&candidate) {
            break candidate;
        }
    };
    let lid_user = format!("{}", rng.random_range(100_000_000_000_000u64..1_000_000_000_000_000));
    (Jid::pn_device(phone.as_str(), device_id), Jid::lid_device(lid_user.as_str(), device_id))
}

/// What the phone contributes to linking a companion: a new account key signs the companion's identity,
/// wrapped in the HMAC container keyed by the companion's ADV secret (which the QR code carried).
pub(crate) struct PhoneHalf {
    pub(crate) key_index: u32,
    pub(crate) created: u64,
    /// `ADVSignedDeviceIdentityHMAC` bytes, as `<pair-success><device-identity>` carries them.
    pub(crate) container: Vec<u8>,
    /// The `ADVSignedDeviceIdentity` inside the container (no device signature yet).
    pub(crate) signed_identity: Vec<u8>,
    pub(crate) key_index_list: Vec<u8>,
}

pub(crate) fn phone_half(identity_public: &[u8; 32], adv_secret: &[u8; 32]) -> PhoneHalf {
    let mut rng = rand::rng();
    let primary = KeyPair::generate(&mut rng);
    let key_index = rng.random_range(1..=50u32);
    let raw_id: u32 = rng.random();
    let created = now_secs();
    let details = wa::ADVDeviceIdentity {
        raw_id: Some(raw_id),
        timestamp: Some(created),
        key_index: Some(key_index),
        account_type: Some(wa::ADVEncryptionType::E2EE),
        device_type: Some(wa::ADVEncryptionType::E2EE),
    }
    .encode_to_vec();
    let account_signature = sign(&primary, &[ADV_ACCOUNT_SIGNATURE, &details, identity_public]);
    let signed_identity = wa::ADVSignedDeviceIdentity {
        details: Some(details),
        account_signature_key: Some(public_bytes(&primary).to_vec()),
        account_signature: Some(account_signature),
        device_signature: None,
    }
    .encode_to_vec();
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(adv_secret).expect("hmac takes any key length");
    mac.update(&signed_identity);
    let container = wa::ADVSignedDeviceIdentityHMAC {
        details: Some(signed_identity.clone()),
        hmac: Some(mac.finalize().into_bytes().to_vec()),
        account_type: Some(wa::ADVEncryptionType::E2EE),
    }
    .encode_to_vec();
    let key_index_list = signed_key_index_list(&primary, raw_id, created, key_index);
    PhoneHalf { key_index, created, container, signed_identity, key_index_list }
}

/// The `ADVSignedKeyIndexList` a usync device query returns: which key indexes (linked devices) are valid.
fn signed_key_index_list(primary: &KeyPair, raw_id: u32, created: u64, key_index: u32) -> Vec<u8> {
    let details = wa::ADVKeyIndexList {
        raw_id: Some(raw_id),
        timestamp: Some(created),
        current_index: Some(key_index),
        valid_indexes: vec![key_index],
        account_type: Some(wa::ADVEncryptionType::E2EE),
    }
    .encode_to_vec();
    let signature = sign(primary, &[ADV_KEY_INDEX_LIST_SIGNATURE, &details]);
    wa::ADVSignedKeyIndexList {
        details: Some(details),
        account_signature: Some(signature),
        account_signature_key: Some(public_bytes(primary).to_vec()),
    }
    .encode_to_vec()
}

fn sign(key: &KeyPair, parts: &[&[u8]]) -> Vec<u8> {
    let msg = parts.concat();
    key.calculate_signature(&msg, &mut rand::rng()).expect("signing with a curve25519 key").to_vec()
}

/// The snapshot for a minted device.
pub(crate) fn snapshot_of(device: &Device) -> Result<CredentialSnapshot, MintError> {
    let mut snapshot = CredentialSnapshot::default();
    snapshot.set_device(&device_to_record(device)?);
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use whatsapp_rust::wacore::libsignal::protocol::PublicKey;

    fn minted() -> (Device, DeviceEntry) {
        mint(Some(&TenantId::parse("pizzeria-1").unwrap()), &MintOptions::default(), |_| false).unwrap()
    }

    #[test]
    fn round_trip_through_the_snapshot_format_is_lossless() {
        let (device, _) = minted();
        let original = serde_json::to_value(&device).unwrap();
        let snapshot = snapshot_of(&device).unwrap();
        let record = snapshot.check_restorable().expect("a minted device is restorable");
        assert_eq!(record.registration_id, device.registration_id);
        assert_eq!(record.noise_key[32..], *device.noise_key.public_key.public_key_bytes());
        assert_eq!(record.push_name, "pizzeria-1");
        let back = device_from_record(&record).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), original, "device -> record -> device must be lossless");
        assert_eq!(serde_json::to_value(&record).unwrap(), original, "the record's JSON is the engine's JSON");
    }

    #[test]
    fn minted_device_looks_paired() {
        let (device, entry) = minted();
        assert!(device.is_registered());
        let pn = device.pn.as_ref().unwrap();
        assert!(pn.user.starts_with("5511") && pn.user.len() == 12, "{pn}");
        assert!((1..=99).contains(&pn.device));
        assert_eq!(device.lid.as_ref().unwrap().device, pn.device);
        assert!(device.server_has_prekeys);
        assert_eq!(entry.noise_public, public_bytes(&device.noise_key));

        // The account signature verifies against the account key, over the device's identity.
        let account = device.account.as_ref().unwrap();
        let account_key =
            PublicKey::from_djb_public_key_bytes(account.account_signature_key.as_deref().unwrap()).unwrap();
        let msg = [
            ADV_ACCOUNT_SIGNATURE,
            account.details.as_deref().unwrap(),
            device.identity_key.public_key.public_key_bytes(),
        ]
        .concat();
        assert!(account_key.verify_signature(&msg, account.account_signature.as_deref().unwrap()));
        assert_eq!(account.device_signature.as_ref().map(Vec::len), Some(64));
    }

    #[test]
    fn taken_numbers_are_skipped_and_options_apply() {
        let first = std::sync::Mutex::new(true);
        let opts = MintOptions { push_name: Some("Cantina".into()), device_id: Some(7), server_has_prekeys: false };
        let (device, entry) = mint(None, &opts, |_| std::mem::replace(&mut *first.lock().unwrap(), false)).unwrap();
        assert_eq!(device.push_name, "Cantina");
        assert_eq!(device.pn.as_ref().unwrap().device, 7);
        assert!(!device.server_has_prekeys);
        assert!(!entry.keys.server_has_prekeys);
    }
}
