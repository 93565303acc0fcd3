//! The conversion of a whole auth state: the device from `creds.json`, then every key file, into one snapshot
//! and a report of what was converted, defaulted and skipped.

use std::collections::BTreeMap;
use std::fmt;

use wakeeper_shared::domain::{CredentialSnapshot, RecordKey, RecordKind, TenantId};
use whatsapp_rust::wacore::libsignal::protocol::{IdentityKey, LegacySessionLocalContext};

use super::auth_files::{AuthFiles, FileKind, kind_of};
use super::creds::device_from_creds;
use super::json::parse_json;
use super::key_files::convert_file;
use super::{BaileysError, refuse};
use crate::engine_store::codec::{LATEST_SYNC_KEY, PREKEYS_UPLOADED_THROUGH, device_record, encode_uploaded_through};

/// What the conversion did: counts per record kind and notes about defaults and skipped files.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Records written, by kind (wire name).
    pub records: BTreeMap<&'static str, usize>,
    /// Files not imported, by reason.
    pub skipped: BTreeMap<String, usize>,
    /// Defaults applied and other remarks, one line each.
    pub notes: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (kind, n) in &self.records {
            writeln!(f, "  {kind}: {n}")?;
        }
        for (why, n) in &self.skipped {
            writeln!(f, "  not imported: {n} {why}")?;
        }
        for note in &self.notes {
            writeln!(f, "  note: {note}")?;
        }
        Ok(())
    }
}

/// A converted auth state.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The snapshot (generation 0; the writer sets it), the takeover marker not yet included.
    pub snapshot: CredentialSnapshot,
    /// What was converted, defaulted and skipped.
    pub report: Report,
    /// The device's phone-number JID (`user:device@s.whatsapp.net`).
    pub jid: String,
    /// The device's noise public key (what it logs in with).
    pub noise_public: [u8; 32],
    /// The device's identity public key.
    pub identity_public: [u8; 32],
}

/// A conversion under way: the snapshot and report so far, and what the key files need from the device.
pub(super) struct Conversion {
    pub(super) snapshot: CredentialSnapshot,
    pub(super) report: Report,
    /// The device's own identity, which the session conversion needs.
    pub(super) local: LegacySessionLocalContext,
    /// When the conversion started (LID mappings are stamped with it).
    pub(super) now_secs: i64,
    /// The newest app-state sync key seen so far: `(timestamp, key id)`.
    pub(super) latest_sync_key: Option<(i64, Vec<u8>)>,
}

impl Conversion {
    /// Adds one record and counts it.
    pub(super) fn put(&mut self, kind: RecordKind, key: impl Into<String>, value: Vec<u8>) {
        *self.report.records.entry(kind.as_str()).or_default() += 1;
        self.snapshot.records.insert(RecordKey::new(kind, key), value);
    }

    /// Adds the record a file converted to, or counts the file as skipped for `why` when it held none.
    pub(super) fn put_or_skip(&mut self, kind: RecordKind, key: String, record: Option<Vec<u8>>, why: &str) {
        match record {
            Some(value) => self.put(kind, key, value),
            None => self.skip(why),
        }
    }

    /// Counts one file not imported, for `why`.
    pub(super) fn skip(&mut self, why: &str) {
        *self.report.skipped.entry(why.to_owned()).or_default() += 1;
    }
}

/// Converts a whole auth state. `tenant` names the default push name when Baileys stored none.
pub fn convert(tenant: &TenantId, files: &AuthFiles) -> Result<Converted, BaileysError> {
    let creds_raw = files
        .files
        .get("creds.json")
        .ok_or_else(|| BaileysError::Source("creds.json is missing: not a Baileys auth state".into()))?;
    let creds = parse_json("creds.json", creds_raw)?;
    let mut report = Report { notes: files.notes.clone(), ..Default::default() };
    let device = device_from_creds(tenant, &creds, &mut report).map_err(|p| refuse("creds.json", p))?;

    let identity_public: [u8; 32] =
        device.identity_key.public_key.public_key_bytes().try_into().expect("curve25519 public keys are 32 bytes");
    let noise_public: [u8; 32] =
        device.noise_key.public_key.public_key_bytes().try_into().expect("curve25519 public keys are 32 bytes");
    let jid = device.pn.as_ref().map(|j| j.to_string()).unwrap_or_default();
    let record = device_record(&device)
        .map_err(|_| BaileysError::Source("the engine's device did not convert to a device record".into()))?;

    let mut conversion = Conversion {
        snapshot: CredentialSnapshot::default(),
        report,
        local: LegacySessionLocalContext {
            identity_key: IdentityKey::new(device.identity_key.public_key),
            registration_id: device.registration_id,
        },
        now_secs: whatsapp_rust::wacore::time::now_secs(),
        latest_sync_key: None,
    };
    conversion.snapshot.set_device(&record);
    *conversion.report.records.entry(RecordKind::Device.as_str()).or_default() += 1;
    if device.first_unupload_pre_key_id > 1 {
        let through = device.first_unupload_pre_key_id - 1;
        conversion
            .snapshot
            .records
            .insert(RecordKey::new(RecordKind::Other, PREKEYS_UPLOADED_THROUGH), encode_uploaded_through(through));
    }

    for (name, content) in &files.files {
        let kind = kind_of(name);
        if kind == FileKind::Creds {
            continue;
        }
        convert_file(&mut conversion, name, kind, content)?;
    }
    if let Some((_, id)) = conversion.latest_sync_key.take() {
        conversion.snapshot.records.insert(RecordKey::new(RecordKind::Other, LATEST_SYNC_KEY), id);
    }
    if conversion.snapshot.count(RecordKind::PreKey) == 0 {
        conversion.report.notes.push(
            "no pre-key files: contacts starting a new chat get no one-time pre-key until the engine uploads new ones"
                .into(),
        );
    }
    let Conversion { snapshot, report, .. } = conversion;
    Ok(Converted { snapshot, report, jid, noise_public, identity_public })
}
