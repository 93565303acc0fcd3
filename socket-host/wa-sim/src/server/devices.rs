//! The device registry on [`SimHandle`]: minting paired devices, "scanning" a fresh client's QR code, registering
//! devices paired elsewhere, revoking and reinstating, and the server's one-time pre-keys.

use wakeeper_shared::domain::{CredentialSnapshot, DeviceRecord, TenantId};
use whatsapp_rust::wacore_binary::Jid;
use whatsapp_rust::wacore_binary::builder::NodeBuilder;

use super::{SimError, SimHandle};
use crate::faults::Settings;
use crate::mint::{MintOptions, MintedDevice, mint, snapshot_of};
use crate::state::{DeviceEntry, KeyBundle, SignedPreKey};

impl SimHandle {
    /// Mints a paired device for `tenant`, registers it, and returns the credential snapshot a real
    /// pairing would leave.
    ///
    /// # Panics
    /// If the engine rejects the identity the simulator signed (a bug, not an input error).
    pub fn mint_device(&self, tenant: &TenantId) -> CredentialSnapshot {
        self.mint_device_with(tenant, &MintOptions::default()).expect("minting a device").snapshot
    }

    /// Mints a paired device with options and returns it with its JIDs and key.
    pub fn mint_device_with(&self, tenant: &TenantId, opts: &MintOptions) -> Result<MintedDevice, SimError> {
        // Key generation and signing run outside the lock, so minting never stalls connections; a number
        // taken in between (one in 10^8) is caught at insert and minted again.
        let minted = loop {
            let (device, entry) = mint(Some(tenant), opts, |phone| self.shared.lock().by_phone.contains_key(phone))?;
            let minted = MintedDevice {
                jid: entry.jid.to_string(),
                lid: entry.lid.as_ref().map(|l| l.to_string()).unwrap_or_default(),
                noise_public: entry.noise_public,
                snapshot: snapshot_of(&device)?,
            };
            let inserted = self.shared.update(|s| {
                if s.by_phone.contains_key(entry.jid.user.as_str()) {
                    return false;
                }
                s.insert_device(entry);
                true
            });
            if inserted {
                break minted;
            }
        };
        tracing::debug!(tenant = %tenant.as_str(), device = %minted.jid, "device minted");
        Ok(minted)
    }

    /// "Scans" a QR code shown by a fresh client, as the phone would: the client waiting with that ref
    /// and noise key receives `pair-success` for a new device (phone number and LID allocated here, key
    /// bundle from its registration payload), confirms, and is asked to restart (515); its next login
    /// succeeds. Returns the new device JID; the device is registered for `tenant` at once.
    pub fn pair(&self, qr_code: &str, tenant: &TenantId, opts: &MintOptions) -> Result<String, SimError> {
        let qr = parse_qr(qr_code).ok_or(SimError::Pairing("malformed qr code"))?;
        let mut s = self.shared.lock();
        let (keys, offer) = s
            .pairings
            .values()
            .find(|p| p.noise_public == qr.noise && p.refs.contains(&qr.reference))
            .map(|p| (p.keys.clone(), p.offer.clone()))
            .ok_or(SimError::Pairing("no client is waiting with that qr code"))?;
        if keys.identity != Some(qr.identity) {
            return Err(SimError::Pairing("qr identity differs from the registration payload"));
        }
        let (pn, lid) = crate::mint::allocate_jids(opts.device_id, |p| s.by_phone.contains_key(p));
        let phone = crate::mint::phone_half(&qr.identity, &qr.adv_secret);
        let push_name = opts.push_name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| tenant.as_str().to_owned());
        let success = NodeBuilder::new("iq")
            .attr("from", crate::iq::SERVER)
            .attr("id", format!("pair-success-{}", pn.user))
            .attr("type", "set")
            .attr("xmlns", "md")
            .children([NodeBuilder::new("pair-success")
                .children([
                    NodeBuilder::new("device-identity")
                        .attr("key-index", phone.key_index.to_string())
                        .bytes(phone.container.clone())
                        .build(),
                    NodeBuilder::new("platform").attr("name", "smba").build(),
                    NodeBuilder::new("device").attr("jid", pn.clone()).attr("lid", lid.clone()).build(),
                    NodeBuilder::new("biz").attr("name", push_name).build(),
                ])
                .build()])
            .build();
        let jid = pn.to_string();
        s.insert_device(DeviceEntry {
            jid: pn,
            lid: Some(lid),
            noise_public: qr.noise,
            tenant: Some(tenant.as_str().to_owned()),
            revoked: false,
            keys,
            account: Some(crate::state::Account {
                key_index: phone.key_index,
                key_index_list: phone.key_index_list,
                created_secs: phone.created,
                device_identity: phone.signed_identity,
            }),
            settings: Settings::default(),
        });
        drop(s);
        self.shared.update(|_| ());
        offer.send((jid.clone(), success)).map_err(|_| SimError::Pairing("the client went away"))?;
        tracing::debug!(tenant = %tenant.as_str(), device = %jid, "qr code scanned");
        Ok(jid)
    }

    /// Registers a device paired elsewhere (e.g. taken over from Baileys) by its noise key and JID. The
    /// server knows nothing else about it: its first connect's digest check answers 404, so the engine
    /// re-uploads its key bundle.
    pub fn register_existing(&self, noise_public: [u8; 32], jid: &str) -> Result<(), SimError> {
        let jid = parse_device_jid(jid)?;
        self.register(DeviceEntry {
            jid,
            lid: None,
            noise_public,
            tenant: None,
            revoked: false,
            keys: KeyBundle::default(),
            account: None,
            settings: Settings::default(),
        });
        Ok(())
    }

    /// Registers a device from a snapshot's device record: the noise key, JIDs and published keys.
    /// Returns the device JID.
    pub fn register_record(&self, record: &DeviceRecord, tenant: Option<&TenantId>) -> Result<String, SimError> {
        let device =
            crate::mint::device_from_record(record).map_err(|_| SimError::InvalidRecord("not an engine device"))?;
        let jid = device.pn.clone().ok_or(SimError::InvalidRecord("pn"))?;
        let public = |k: &whatsapp_rust::wacore::libsignal::protocol::KeyPair| crate::keys::public_bytes(k);
        self.register(DeviceEntry {
            jid: jid.clone(),
            lid: device.lid.clone(),
            noise_public: public(&device.noise_key),
            tenant: tenant.map(|t| t.as_str().to_owned()),
            revoked: false,
            keys: KeyBundle {
                registration_id: Some(device.registration_id),
                identity: Some(public(&device.identity_key)),
                signed_pre_key: Some(SignedPreKey {
                    id: device.signed_pre_key_id,
                    public: public(&device.signed_pre_key),
                    signature: device.signed_pre_key_signature.to_vec(),
                }),
                prekeys: Default::default(),
                server_has_prekeys: false,
            },
            account: None,
            settings: Settings::default(),
        });
        Ok(jid.to_string())
    }

    fn register(&self, entry: DeviceEntry) {
        self.shared.update(|s| s.insert_device(entry));
    }

    /// The device JID minted for a tenant.
    pub fn device_jid(&self, tenant: &TenantId) -> Option<String> {
        self.shared.lock().tenants.get(tenant.as_str()).cloned()
    }

    /// Revokes a device: its next login gets `<failure reason="401"/>`. Live connections stay up (combine
    /// with [`SimHandle::stream_error`] to log them out now).
    pub fn revoke(&self, jid: &str) -> Result<(), SimError> {
        self.with_device(jid, |d| d.revoked = true)
    }

    /// Undoes [`SimHandle::revoke`].
    pub fn reinstate(&self, jid: &str) -> Result<(), SimError> {
        self.with_device(jid, |d| d.revoked = false)
    }

    /// Makes the server forget the device's one-time pre-keys, so the engine's next digest check gets 404
    /// and it uploads a fresh batch.
    pub fn forget_prekeys(&self, jid: &str) -> Result<(), SimError> {
        self.with_device(jid, |d| {
            d.keys.prekeys.clear();
            d.keys.server_has_prekeys = false;
        })
    }

    /// One-time pre-key ids the server holds for a device (uploaded and not yet handed out).
    pub fn prekey_ids(&self, jid: &str) -> Result<Vec<u32>, SimError> {
        let s = self.shared.lock();
        let d = s.devices.get(jid).ok_or_else(|| SimError::UnknownDevice(jid.to_owned()))?;
        Ok(d.keys.prekeys.keys().copied().collect())
    }

    fn with_device(&self, jid: &str, f: impl FnOnce(&mut DeviceEntry)) -> Result<(), SimError> {
        self.shared.update(|s| match s.devices.get_mut(jid) {
            Some(d) => {
                f(d);
                Ok(())
            }
            None => Err(SimError::UnknownDevice(jid.to_owned())),
        })
    }
}

struct Qr {
    reference: String,
    noise: [u8; 32],
    identity: [u8; 32],
    adv_secret: [u8; 32],
}

/// `ref,noise_b64,identity_b64,adv_b64[,client_type]`, optionally behind WhatsApp's deep-link prefix.
fn parse_qr(code: &str) -> Option<Qr> {
    use base64::Engine as _;
    let body = code.rsplit('#').next()?;
    let mut parts = body.split(',');
    let reference = parts.next().filter(|r| !r.is_empty())?.to_owned();
    let mut key = || -> Option<[u8; 32]> {
        base64::engine::general_purpose::STANDARD.decode(parts.next()?).ok()?.try_into().ok()
    };
    Some(Qr { reference, noise: key()?, identity: key()?, adv_secret: key()? })
}

/// Parses a phone-number device JID (`user:dev@s.whatsapp.net`).
fn parse_device_jid(jid: &str) -> Result<Jid, SimError> {
    let parsed: Jid = jid.parse().map_err(|_| SimError::InvalidJid(jid.to_owned()))?;
    if !parsed.is_pn() || parsed.user.is_empty() {
        return Err(SimError::InvalidJid(jid.to_owned()));
    }
    Ok(parsed)
}
