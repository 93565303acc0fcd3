//! The credential snapshot: one tenant's whole engine state, in wakeeper's own format.
//!
//! A snapshot is a device record plus opaque records addressed by `(kind, key)`. The engine adapter in
//! `socket-host` maps the engine's store calls onto records; nothing here knows the engine. Restoring only
//! part of a snapshot is what breaks Signal sessions after a restart, so a snapshot is restorable only when
//! [`CredentialSnapshot::check_restorable`] says so, and stores write and read it whole.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::TenantId;

/// What a record holds. The wire name is part of every stored key: never rename a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    /// The device record (key [`DEVICE_KEY`]): JSON of [`DeviceRecord`].
    Device,
    /// Signal identity key of a remote address.
    Identity,
    /// Signal session with a remote address.
    Session,
    /// One-time pre-key (key: decimal id).
    PreKey,
    /// Signed pre-key (key: decimal id).
    SignedPreKey,
    /// Group sender key.
    SenderKey,
    /// App-state sync key (key: hex key id).
    AppStateSyncKey,
    /// App-state collection version and hash state (key: collection name).
    AppStateVersion,
    /// App-state mutation MAC (key: collection name + hex index MAC).
    AppStateMutationMac,
    /// Sender-key distribution status of a device in a group.
    SenderKeyDevice,
    /// LID to phone-number mapping.
    LidMapping,
    /// Signal base key seen for a message (duplicate detection).
    BaseKey,
    /// Known device list of a user.
    DeviceList,
    /// Trusted-contact privacy token.
    TcToken,
    /// A sent message kept for retry receipts.
    SentMessage,
    /// An inbound message waiting for its session.
    PendingInbound,
    /// A message secret (reactions, polls, edits).
    MsgSecret,
    /// Cached group metadata.
    GroupMetadata,
    /// Anything else the engine persists (key chosen by the engine adapter).
    Other,
}

impl RecordKind {
    /// Every kind, in a stable order.
    pub const ALL: [RecordKind; 19] = [
        Self::Device,
        Self::Identity,
        Self::Session,
        Self::PreKey,
        Self::SignedPreKey,
        Self::SenderKey,
        Self::AppStateSyncKey,
        Self::AppStateVersion,
        Self::AppStateMutationMac,
        Self::SenderKeyDevice,
        Self::LidMapping,
        Self::BaseKey,
        Self::DeviceList,
        Self::TcToken,
        Self::SentMessage,
        Self::PendingInbound,
        Self::MsgSecret,
        Self::GroupMetadata,
        Self::Other,
    ];

    /// The stable wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Identity => "identity",
            Self::Session => "session",
            Self::PreKey => "pre_key",
            Self::SignedPreKey => "signed_pre_key",
            Self::SenderKey => "sender_key",
            Self::AppStateSyncKey => "app_state_sync_key",
            Self::AppStateVersion => "app_state_version",
            Self::AppStateMutationMac => "app_state_mutation_mac",
            Self::SenderKeyDevice => "sender_key_device",
            Self::LidMapping => "lid_mapping",
            Self::BaseKey => "base_key",
            Self::DeviceList => "device_list",
            Self::TcToken => "tc_token",
            Self::SentMessage => "sent_message",
            Self::PendingInbound => "pending_inbound",
            Self::MsgSecret => "msg_secret",
            Self::GroupMetadata => "group_metadata",
            Self::Other => "other",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// The key of the device record.
pub const DEVICE_KEY: &str = "self";

/// Longest record key accepted (engine addresses are far shorter; this bounds hostile input).
pub const MAX_RECORD_KEY_LEN: usize = 1024;

/// Longest record value accepted (before sealing), by every store and by the working copy before the engine's
/// write is acknowledged: Firestore holds at most 1 MiB per document, name, seal and fields included. The
/// engine's records are far smaller (a Signal session is a few KiB).
pub const MAX_RECORD_VALUE_LEN: usize = 960 * 1024;

/// The address of one record within a tenant's snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordKey {
    /// What the record holds.
    pub kind: RecordKind,
    /// The engine's key within that kind (an address, an id, a collection name).
    pub key: String,
}

impl RecordKey {
    /// A record key.
    pub fn new(kind: RecordKind, key: impl Into<String>) -> Self {
        Self { kind, key: key.into() }
    }

    /// The device record's key.
    pub fn device() -> Self {
        Self::new(RecordKind::Device, DEVICE_KEY)
    }

    /// Associated data binding a ciphertext to its tenant and address: moving a stored record to another
    /// tenant or key makes it fail to decrypt.
    pub fn associated_data(&self, tenant: &TenantId) -> Vec<u8> {
        let mut ad = Vec::with_capacity(tenant.as_str().len() + self.key.len() + 32);
        for part in [tenant.as_str(), self.kind.as_str(), self.key.as_str()] {
            ad.extend_from_slice(&(part.len() as u32).to_be_bytes());
            ad.extend_from_slice(part.as_bytes());
        }
        ad
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.as_str(), self.key)
    }
}

/// The device record: who this linked device is. The fields a restore cannot do without are typed; every
/// other field the engine keeps (counters, routing info, cached server certificate, ...) travels in `rest`
/// unchanged, so nothing the engine persisted is dropped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Signal registration id (non-zero once registered).
    pub registration_id: u32,
    /// Noise static key pair, private (32) then public (32).
    pub noise_key: Vec<u8>,
    /// Signal identity key pair, private (32) then public (32).
    pub identity_key: Vec<u8>,
    /// Signed pre-key pair, private (32) then public (32).
    pub signed_pre_key: Vec<u8>,
    /// Signed pre-key id.
    pub signed_pre_key_id: u32,
    /// Signature of the signed pre-key (64 bytes).
    pub signed_pre_key_signature: Vec<u8>,
    /// ADV secret (32 bytes).
    pub adv_secret_key: Vec<u8>,
    /// The signed device identity received at pairing (protobuf bytes); absent until paired.
    #[serde(default)]
    pub account: Option<Vec<u8>>,
    /// Display name sent to WhatsApp (must not be empty for a registered device).
    #[serde(default)]
    pub push_name: String,
    /// Every other field of the engine's device state, verbatim.
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

impl DeviceRecord {
    /// Encodes the record for storage.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("device record serializes")
    }

    /// Decodes a stored record.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The phone number (user part) of the device's JID, whether the engine stored `rest.pn` as a JID string
    /// (`user[:device]@server`) or as its JID object (`{"user": ..., ...}`).
    pub fn pn(&self) -> Option<&str> {
        match self.rest.get("pn")? {
            serde_json::Value::String(s) => s.split(['@', ':']).next().filter(|u| !u.is_empty()),
            serde_json::Value::Object(o) => o.get("user").and_then(|u| u.as_str()).filter(|u| !u.is_empty()),
            _ => None,
        }
    }
}

/// Why a snapshot cannot be restored. Names the missing part, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Incomplete {
    /// No device record at all.
    #[error("device record is missing")]
    NoDevice,
    /// The device record did not decode.
    #[error("device record is malformed")]
    MalformedDevice,
    /// A required field is absent or has the wrong length.
    #[error("device record field `{0}` is missing or malformed")]
    Field(&'static str),
}

/// One tenant's whole engine state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CredentialSnapshot {
    /// Rises with every committed change batch; the local working copy and the remote store compare it.
    pub generation: u64,
    /// Every record, the device record included (under [`RecordKey::device`]).
    pub records: BTreeMap<RecordKey, Vec<u8>>,
}

impl CredentialSnapshot {
    /// The decoded device record, if present and well-formed.
    pub fn device(&self) -> Result<DeviceRecord, Incomplete> {
        let bytes = self.records.get(&RecordKey::device()).ok_or(Incomplete::NoDevice)?;
        DeviceRecord::from_bytes(bytes).map_err(|_| Incomplete::MalformedDevice)
    }

    /// Stores the device record.
    pub fn set_device(&mut self, device: &DeviceRecord) {
        self.records.insert(RecordKey::device(), device.to_bytes());
    }

    /// Says whether the snapshot can bring a device online without pairing, and if not, why.
    pub fn check_restorable(&self) -> Result<DeviceRecord, Incomplete> {
        let d = self.device()?;
        if d.registration_id == 0 {
            return Err(Incomplete::Field("registration_id"));
        }
        for (name, value, len) in [
            ("noise_key", &d.noise_key, 64),
            ("identity_key", &d.identity_key, 64),
            ("signed_pre_key", &d.signed_pre_key, 64),
            ("signed_pre_key_signature", &d.signed_pre_key_signature, 64),
            ("adv_secret_key", &d.adv_secret_key, 32),
        ] {
            if value.len() != len || value.iter().all(|b| *b == 0) {
                return Err(Incomplete::Field(name));
            }
        }
        match &d.account {
            Some(a) if !a.is_empty() => {}
            _ => return Err(Incomplete::Field("account")),
        }
        Ok(d)
    }

    /// Applies a batch of changes (no generation check; see [`ChangeBatch`]).
    pub fn apply(&mut self, changes: &[RecordChange]) {
        for c in changes {
            match &c.value {
                Some(v) => {
                    self.records.insert(c.key.clone(), v.clone());
                }
                None => {
                    self.records.remove(&c.key);
                }
            }
        }
    }

    /// Number of records of one kind.
    pub fn count(&self, kind: RecordKind) -> usize {
        self.records.keys().filter(|k| k.kind == kind).count()
    }
}

/// One changed record: a new value, or `None` for a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordChange {
    /// Which record.
    pub key: RecordKey,
    /// The new plaintext value; `None` deletes it.
    pub value: Option<Vec<u8>>,
}

/// Changes committed together: the store moves the tenant to `generation` in one step, or not at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeBatch {
    /// The generation the tenant's snapshot reaches once the batch is applied.
    pub generation: u64,
    /// The writer's lease epoch; the store refuses a batch older than the newest epoch it has seen.
    pub epoch: u64,
    /// The changes, in order; a later change of the same key wins.
    pub changes: Vec<RecordChange>,
}

/// Most writes one remote commit may carry (Firestore's batch limit).
pub const MAX_WRITES_PER_COMMIT: usize = 500;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_snapshot_is_restorable() {
        let mut s = CredentialSnapshot::default();
        s.set_device(&crate::contract::restorable_device());
        let d = s.check_restorable().unwrap();
        assert_eq!(d.pn(), Some("5511999990000"));
        let mut object_form = d.clone();
        object_form.rest.insert("pn".into(), serde_json::json!({"user": "5511999990001", "server": "s.whatsapp.net"}));
        assert_eq!(object_form.pn(), Some("5511999990001"));
    }

    #[test]
    fn each_missing_part_is_named() {
        assert_eq!(CredentialSnapshot::default().check_restorable().unwrap_err(), Incomplete::NoDevice);
        let mut s = CredentialSnapshot::default();
        s.records.insert(RecordKey::device(), b"{not json".to_vec());
        assert_eq!(s.check_restorable().unwrap_err(), Incomplete::MalformedDevice);

        type Breaker = fn(&mut DeviceRecord);
        let cases: [(&str, Breaker); 7] = [
            ("registration_id", |d| d.registration_id = 0),
            ("noise_key", |d| d.noise_key.truncate(10)),
            ("identity_key", |d| d.identity_key = vec![0; 64]),
            ("signed_pre_key", |d| d.signed_pre_key.clear()),
            ("signed_pre_key_signature", |d| d.signed_pre_key_signature.pop().map(|_| ()).unwrap()),
            ("adv_secret_key", |d| d.adv_secret_key = vec![9; 31]),
            ("account", |d| d.account = None),
        ];
        for (field, breaker) in cases {
            let mut d = crate::contract::restorable_device();
            breaker(&mut d);
            let mut s = CredentialSnapshot::default();
            s.set_device(&d);
            assert_eq!(s.check_restorable().unwrap_err(), Incomplete::Field(field));
        }
    }

    #[test]
    fn unknown_engine_fields_survive_a_round_trip() {
        let json = serde_json::json!({
            "registration_id": 7, "noise_key": [1,2], "identity_key": [], "signed_pre_key": [],
            "signed_pre_key_id": 3, "signed_pre_key_signature": [], "adv_secret_key": [],
            "account": null, "push_name": "x", "login_counter": 41, "server_cert_chain": {"leaf": {"key": [1]}}
        });
        let d: DeviceRecord = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(d.rest["login_counter"], 41);
        assert_eq!(serde_json::to_value(&d).unwrap(), json);
    }

    #[test]
    fn associated_data_is_unambiguous() {
        let t = TenantId::parse("ab").unwrap();
        let a = RecordKey::new(RecordKind::Session, "c").associated_data(&t);
        let t2 = TenantId::parse("a").unwrap();
        let b = RecordKey::new(RecordKind::Session, "bc").associated_data(&t2);
        assert_ne!(a, b);
    }

    #[test]
    fn apply_inserts_and_deletes() {
        let mut s = CredentialSnapshot::default();
        let k = RecordKey::new(RecordKind::PreKey, "1");
        s.apply(&[RecordChange { key: k.clone(), value: Some(vec![1]) }]);
        assert_eq!(s.count(RecordKind::PreKey), 1);
        s.apply(&[RecordChange { key: k, value: None }]);
        assert_eq!(s.count(RecordKind::PreKey), 0);
    }

    #[test]
    fn kind_names_round_trip() {
        for k in RecordKind::ALL {
            assert_eq!(RecordKind::parse(k.as_str()), Some(k));
        }
    }
}
