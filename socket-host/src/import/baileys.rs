//! Baileys auth state -> wakeeper credential snapshot.
//!
//! A Baileys host keeps one tenant's auth state as `useMultiFileAuthState` files: `creds.json` plus one file per
//! key (`<type>-<id>.json`, the id with `/` written as `__` and `:` as `-`), every Buffer written as
//! `{"type":"Buffer","data":"<base64>"}`. This module turns those files into the records the engine store
//! (`crate::engine_store`) reads, in exactly its encoding, so the imported device logs in with the same noise key
//! and identity and keeps its Signal sessions: nobody scans a QR code again.
//!
//! | Baileys file | record |
//! |---|---|
//! | `creds.json` | device (the engine's `Device`, built field by field) |
//! | `pre-key-<id>` | pre_key `<id>`: `PreKeyRecordStructure` protobuf |
//! | `session-<user[_domain]>.<dev>` | session `<user>[:<dev>]@<server>.0`: libsignal-node v1 JSON converted by the engine's own `LegacySessionRecordV1` |
//! | `identity-key-<address>` | identity `<address>`: the 32-byte public key |
//! | `sender-key-<group>--<user[_domain]>--<dev>` | sender_key `<group>:<address>`: states in the engine's order (newest first) |
//! | `app-state-sync-key-<base64 id>` | app_state_sync_key `<hex id>`: `ts ‖ len ‖ key ‖ fingerprint protobuf` |
//! | `app-state-sync-version-<name>` | app_state_version `<name>` (`HashState` JSON) + one app_state_mutation_mac per index MAC |
//! | `lid-mapping-<pn user>` | lid_mapping `<lid user>` (`LidPnMappingEntry` JSON) |
//! | `sender-key-memory-*`, `device-list-*`, `tctoken-*` | not imported (the engine rebuilds them; see the report) |
//!
//! Anything malformed refuses the whole import with the file and field named (never a value): a partial
//! takeover would break sessions in ways nobody notices until messages stop decrypting.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};
use wakeeper_shared::domain::{CredentialSnapshot, DeviceRecord, RecordKey, RecordKind, TenantId};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::libsignal::protocol::{
    IdentityKey, KeyPair, LegacyIndexedSessionV1, LegacySessionBaseKeyRoleV1, LegacySessionChainCounterV1,
    LegacySessionChainKeyV1, LegacySessionChainRoleV1, LegacySessionChainV1, LegacySessionDispositionV1,
    LegacySessionIndexV1, LegacySessionKeyPairV1, LegacySessionLocalContext, LegacySessionMessageKeyV1,
    LegacySessionPendingPreKeyV1, LegacySessionRatchetV1, LegacySessionRecordV1, LegacySessionV1, PrivateKey,
    PublicKey, SenderChainKeyComponents, SenderKeyRecord, SenderKeyRecordComponents, SenderKeyStateComponents,
    SenderMessageKeyComponents, SenderSigningKeyComponents,
};
use whatsapp_rust::wacore::libsignal::store::record_helpers::new_pre_key_record;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::traits::LidPnMappingEntry;
use whatsapp_rust::wacore_binary::{Jid, Server};
use whatsapp_rust::waproto::whatsapp as wa;

/// Largest single file accepted; checked before the file is read. Real files are far smaller (a session with
/// every archived state and skipped key is well under 1 MiB); the bound keeps hostile input from exhausting
/// memory.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Largest auth state accepted in total.
pub const MAX_TOTAL_BYTES: u64 = 512 * 1024 * 1024;
/// Most files accepted in one auth state.
pub const MAX_FILES: usize = 200_000;
/// Longest file name accepted.
const MAX_NAME_LEN: usize = 255;

/// Record key of the takeover marker (kind `other`): its presence says the device came from a Baileys host that
/// may still be running it.
pub const MARKER_KEY: &str = "import/baileys";
/// Engine store's record of the newest app-state sync key id (kind `other`).
const LATEST_SYNC_KEY: &str = "latest_sync_key_id";
/// Engine store's record of the highest pre-key id the server has (kind `other`).
const PREKEYS_UPLOADED_THROUGH: &str = "prekeys_uploaded_through";

/// Why an auth state was refused. Names the file and the field, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaileysError {
    /// One file is malformed, hostile or inconsistent.
    #[error("{file}: {problem}")]
    File {
        /// The file name (escaped, shortened).
        file: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The auth state as a whole cannot be used (unreadable folder, too large, `creds.json` missing).
    #[error("{0}")]
    Source(String),
}

fn shown(name: &str) -> String {
    let escaped: String = name.escape_debug().collect();
    if escaped.chars().count() > 120 {
        format!("{}…", escaped.chars().take(120).collect::<String>())
    } else {
        escaped
    }
}

fn refuse(file: &str, problem: impl Into<String>) -> BaileysError {
    BaileysError::File { file: shown(file), problem: problem.into() }
}

/// The raw files of one auth state, by file name (`creds.json`, `pre-key-1.json`, ...), size-checked and with
/// names checked to be ones Baileys can have written.
#[derive(Debug, Default, Clone)]
pub struct AuthFiles {
    files: BTreeMap<String, Vec<u8>>,
    total: u64,
    /// Notes about what was skipped while collecting the files.
    pub notes: Vec<String>,
}

/// Checks a file name is one `useMultiFileAuthState` can write: `[A-Za-z0-9@._+=-]`, ending in `.json`, not
/// hidden, short. Refuses anything path-like (`/`, `\`, `..`), so no name can point outside the auth state.
pub fn check_file_name(name: &str) -> Result<(), BaileysError> {
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '_' | '-' | '+' | '=');
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(refuse(name, "file name is empty or too long"));
    }
    if name.contains(['/', '\\', '\0']) || name.contains("..") || name.starts_with('.') {
        return Err(refuse(name, "path-like file name (no auth-state file has one)"));
    }
    if !name.chars().all(fine) {
        return Err(refuse(name, "file name has characters Baileys never writes"));
    }
    if !name.ends_with(".json") {
        return Err(refuse(name, "not a .json file"));
    }
    Ok(())
}

impl AuthFiles {
    /// Adds one file. Refuses a bad name, a duplicate, an oversized file, or going over the totals.
    pub fn insert(&mut self, name: &str, content: Vec<u8>) -> Result<(), BaileysError> {
        check_file_name(name)?;
        if content.len() as u64 > MAX_FILE_BYTES {
            return Err(refuse(name, format!("larger than the {} MiB limit", MAX_FILE_BYTES >> 20)));
        }
        if self.files.len() >= MAX_FILES {
            return Err(BaileysError::Source(format!("more than {MAX_FILES} files; not an auth state")));
        }
        self.total += content.len() as u64;
        if self.total > MAX_TOTAL_BYTES {
            return Err(BaileysError::Source(format!("auth state larger than {} MiB", MAX_TOTAL_BYTES >> 20)));
        }
        if self.files.insert(name.to_owned(), content).is_some() {
            return Err(refuse(name, "the same file appears twice"));
        }
        Ok(())
    }

    /// Number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether there are no files.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Reads a `useMultiFileAuthState` folder. Every entry is checked before it is read: symbolic links and
    /// path-like names are refused, sizes are checked from metadata (a 50 MB file is refused unread), and
    /// entries that are not auth files (sub-directories, hidden files, other extensions) are skipped with a note.
    pub fn read_dir(dir: &Path) -> Result<Self, BaileysError> {
        let unreadable = |e: std::io::Error| BaileysError::Source(format!("cannot read {}: {e}", dir.display()));
        let meta = std::fs::metadata(dir).map_err(unreadable)?;
        if !meta.is_dir() {
            return Err(BaileysError::Source(format!("{} is not a directory", dir.display())));
        }
        let mut out = AuthFiles::default();
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(unreadable)? {
            let entry = entry.map_err(unreadable)?;
            entries.push(entry);
            if entries.len() > MAX_FILES {
                return Err(BaileysError::Source(format!("more than {MAX_FILES} entries; not an auth state")));
            }
        }
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let raw_name = entry.file_name();
            let Some(name) = raw_name.to_str() else {
                return Err(refuse(&raw_name.to_string_lossy(), "file name is not UTF-8"));
            };
            // Not following links: the metadata is the entry's own.
            let meta = entry.metadata().map_err(unreadable)?;
            if meta.file_type().is_symlink() {
                return Err(refuse(name, "symbolic link; refusing to follow it out of the auth-state folder"));
            }
            if meta.is_dir() {
                out.notes.push(format!("skipped sub-directory {}", shown(name)));
                continue;
            }
            if name.starts_with('.') || !name.ends_with(".json") {
                out.notes.push(format!("skipped {} (not an auth-state file)", shown(name)));
                continue;
            }
            check_file_name(name)?;
            if !meta.is_file() {
                return Err(refuse(name, "not a regular file"));
            }
            if meta.len() > MAX_FILE_BYTES {
                return Err(refuse(
                    name,
                    format!("{} bytes, over the {} MiB limit (not read)", meta.len(), MAX_FILE_BYTES >> 20),
                ));
            }
            let file = std::fs::File::open(entry.path()).map_err(|e| refuse(name, format!("cannot open: {e}")))?;
            let mut content = Vec::with_capacity(meta.len() as usize);
            file.take(MAX_FILE_BYTES + 1)
                .read_to_end(&mut content)
                .map_err(|e| refuse(name, format!("cannot read: {e}")))?;
            out.insert(name, content)?;
        }
        Ok(out)
    }
}

/// What a Baileys file holds, from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FileKind {
    Creds,
    PreKey(String),
    Session(String),
    IdentityKey(String),
    SenderKey(String),
    SenderKeyMemory,
    AppStateSyncKey(String),
    AppStateSyncVersion(String),
    LidMapping(String),
    DeviceList,
    TcToken,
    Unknown,
}

/// Makes a [`FileKind`] from the id part of a file name.
type KindOf = fn(String) -> FileKind;

/// Longest prefixes first: `sender-key-memory-` before `sender-key-`.
const PREFIXES: [(&str, KindOf); 10] = [
    ("app-state-sync-version-", FileKind::AppStateSyncVersion),
    ("app-state-sync-key-", FileKind::AppStateSyncKey),
    ("sender-key-memory-", |_| FileKind::SenderKeyMemory),
    ("sender-key-", FileKind::SenderKey),
    ("identity-key-", FileKind::IdentityKey),
    ("lid-mapping-", FileKind::LidMapping),
    ("device-list-", |_| FileKind::DeviceList),
    ("pre-key-", FileKind::PreKey),
    ("session-", FileKind::Session),
    ("tctoken-", |_| FileKind::TcToken),
];

fn kind_of(name: &str) -> FileKind {
    let Some(stem) = name.strip_suffix(".json") else { return FileKind::Unknown };
    if stem == "creds" {
        return FileKind::Creds;
    }
    for (prefix, make) in PREFIXES {
        if let Some(id) = stem.strip_prefix(prefix) {
            return make(id.to_owned());
        }
    }
    FileKind::Unknown
}

// ---------------------------------------------------------------------------------------------------------
// JSON value helpers. Every accessor names the field path in its error; none ever prints a value.

/// How a byte field may be written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Enc {
    /// Only as a Buffer (`{"type":"Buffer","data":...}` or a Uint8Array's `{"0":..,"1":..}`).
    Buffer,
    /// As a Buffer or a base64 string (protobuf JSON, libsignal's own serialisation).
    BufferOrBase64,
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    STANDARD.decode(s.trim()).ok()
}

fn small_int_bytes(values: &[&Value]) -> Option<Vec<u8>> {
    values.iter().map(|v| v.as_u64().filter(|n| *n <= 255).map(|n| n as u8)).collect()
}

/// Decodes a byte field. `Ok(None)` when absent or null.
fn opt_bytes(v: Option<&Value>, path: &str, enc: Enc) -> Result<Option<Vec<u8>>, String> {
    let Some(v) = v else { return Ok(None) };
    match v {
        Value::Null => Ok(None),
        Value::String(s) if enc == Enc::BufferOrBase64 => {
            decode_b64(s).map(Some).ok_or_else(|| format!("`{path}` is not valid base64"))
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("Buffer") => match o.get("data") {
            Some(Value::String(s)) => {
                decode_b64(s).map(Some).ok_or_else(|| format!("`{path}` is a Buffer whose data is not valid base64"))
            }
            Some(Value::Array(a)) => small_int_bytes(&a.iter().collect::<Vec<_>>())
                .map(Some)
                .ok_or_else(|| format!("`{path}` is a Buffer whose data has values outside 0-255")),
            _ => Err(format!("`{path}` is a Buffer without base64 or byte-array data")),
        },
        // A Uint8Array that went through JSON.stringify: {"0": n, "1": n, ...}.
        Value::Object(o) if !o.is_empty() && o.keys().all(|k| k.parse::<usize>().is_ok()) => {
            let mut ordered: Vec<(usize, &Value)> = o.iter().map(|(k, v)| (k.parse().expect("checked"), v)).collect();
            ordered.sort_by_key(|(i, _)| *i);
            if ordered.iter().enumerate().any(|(i, (k, _))| i != *k) {
                return Err(format!("`{path}` is a byte map with gaps in its indexes"));
            }
            small_int_bytes(&ordered.iter().map(|(_, v)| *v).collect::<Vec<_>>())
                .map(Some)
                .ok_or_else(|| format!("`{path}` is a byte map with values outside 0-255"))
        }
        _ => Err(match enc {
            Enc::Buffer => format!("`{path}` must be a Buffer ({{\"type\":\"Buffer\",\"data\":\"<base64>\"}})"),
            Enc::BufferOrBase64 => format!("`{path}` must be a Buffer or a base64 string"),
        }),
    }
}

fn bytes(v: Option<&Value>, path: &str, enc: Enc) -> Result<Vec<u8>, String> {
    opt_bytes(v, path, enc)?.ok_or_else(|| format!("`{path}` is missing"))
}

fn fixed<const N: usize>(v: Option<&Value>, path: &str, enc: Enc) -> Result<[u8; N], String> {
    let b = bytes(v, path, enc)?;
    let len = b.len();
    b.try_into().map_err(|_| format!("`{path}` must be {N} bytes (got {len})"))
}

/// An integer: a JSON number, a decimal string (protobuf JSON writes 64-bit numbers so), or a `Long`
/// (`{"low":..,"high":..}`). `Ok(None)` when absent or null.
fn opt_int(v: Option<&Value>, path: &str) -> Result<Option<i64>, String> {
    let Some(v) = v else { return Ok(None) };
    let bad = || format!("`{path}` must be an integer");
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
            _ => Err(bad()),
        },
        Value::String(s) => s.trim().parse::<i64>().map(Some).map_err(|_| bad()),
        Value::Object(o) => {
            let low = o.get("low").and_then(Value::as_i64).ok_or_else(bad)?;
            let high = o.get("high").and_then(Value::as_i64).ok_or_else(bad)?;
            Ok(Some(((high as u32 as u64) << 32 | (low as u32 as u64)) as i64))
        }
        _ => Err(bad()),
    }
}

fn int(v: Option<&Value>, path: &str) -> Result<i64, String> {
    opt_int(v, path)?.ok_or_else(|| format!("`{path}` is missing"))
}

fn u32_of(v: Option<&Value>, path: &str) -> Result<u32, String> {
    u32::try_from(int(v, path)?).map_err(|_| format!("`{path}` is out of range"))
}

fn obj<'a>(v: Option<&'a Value>, path: &str) -> Result<&'a Map<String, Value>, String> {
    match v {
        Some(Value::Object(o)) => Ok(o),
        None | Some(Value::Null) => Err(format!("`{path}` is missing")),
        Some(_) => Err(format!("`{path}` must be an object")),
    }
}

fn opt_str<'a>(v: Option<&'a Value>, path: &str) -> Result<Option<&'a str>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("`{path}` must be a string")),
    }
}

fn parse_json(name: &str, content: &[u8]) -> Result<Value, BaileysError> {
    serde_json::from_slice(content).map_err(|e| {
        let what = if e.is_eof() { "truncated JSON" } else { "not valid JSON" };
        refuse(name, format!("{what} (line {}, column {})", e.line(), e.column()))
    })
}

/// A value that may have been stored as a Buffer holding JSON text (Baileys does so for sender keys).
fn unwrap_buffered_json(name: &str, v: Value) -> Result<Value, BaileysError> {
    let is_buffer = matches!(&v, Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("Buffer"));
    if !is_buffer {
        return Ok(v);
    }
    let raw = bytes(Some(&v), "the content", Enc::Buffer).map_err(|p| refuse(name, p))?;
    parse_json(name, &raw)
}

/// A curve25519 key pair `{private, public}` (32 bytes each); the public half must be the private half's.
fn key_pair(o: &Map<String, Value>, path: &str) -> Result<KeyPair, String> {
    let (private_path, public_path) = (join(path, "private"), join(path, "public"));
    let private: [u8; 32] = fixed(o.get("private"), &private_path, Enc::Buffer)?;
    let public: [u8; 32] = fixed(o.get("public"), &public_path, Enc::Buffer)?;
    let private = PrivateKey::deserialize(&private).map_err(|_| format!("`{private_path}` is not a curve25519 key"))?;
    let derived = private.public_key().map_err(|_| format!("`{private_path}` is not a curve25519 key"))?;
    if derived.public_key_bytes() != public {
        return Err(format!("`{public_path}` does not belong to `{private_path}`"));
    }
    Ok(KeyPair::new(derived, private))
}

/// A field path below `path` (`""`: the file's top level).
fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// A Signal public key written either raw (32) or with its type byte (33).
fn public_key(b: &[u8], path: &str) -> Result<PublicKey, String> {
    match b.len() {
        32 => PublicKey::from_djb_public_key_bytes(b),
        33 => PublicKey::deserialize(b),
        n => return Err(format!("`{path}` must be a 32- or 33-byte public key (got {n} bytes)")),
    }
    .map_err(|_| format!("`{path}` is not a valid public key"))
}

// ---------------------------------------------------------------------------------------------------------
// Addresses.

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_digit())
}

/// A Baileys Signal address (`user[_domain].device`) as the engine's protocol address (`user[:device]@server.0`).
pub fn engine_address(baileys: &str) -> Option<String> {
    let (name, device) = baileys.rsplit_once('.')?;
    if !all_digits(device) || device.len() > 5 {
        return None;
    }
    let device: u16 = device.parse().ok()?;
    let (user, server) = match name.split_once('_') {
        None => (name, "c.us"),
        Some((user, "1")) => (user, "lid"),
        Some((user, "128")) => (user, "hosted"),
        Some((user, "129")) => (user, "hosted.lid"),
        Some(_) => return None,
    };
    if !all_digits(user) {
        return None;
    }
    Some(if device == 0 { format!("{user}@{server}.0") } else { format!("{user}:{device}@{server}.0") })
}

/// `group--user[_domain]--device` (the file-name form of `group::user::device`) as the engine's sender-key name
/// `group:user[:device]@server.0`.
fn sender_key_name(id: &str) -> Option<String> {
    let mut parts = id.rsplitn(3, "--");
    let (device, user, group) = (parts.next()?, parts.next()?, parts.next()?);
    let group = Jid::from_str(group).ok().filter(|g| !g.user.is_empty())?;
    let address = engine_address(&format!("{user}.{device}"))?;
    Some(format!("{group}:{address}"))
}

// ---------------------------------------------------------------------------------------------------------
// The conversion.

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

struct Ctx<'a> {
    snapshot: CredentialSnapshot,
    report: Report,
    local: LegacySessionLocalContext,
    now_secs: i64,
    latest_sync_key: Option<(i64, Vec<u8>)>,
    _tenant: &'a TenantId,
}

impl Ctx<'_> {
    fn put(&mut self, kind: RecordKind, key: impl Into<String>, value: Vec<u8>) {
        *self.report.records.entry(kind.as_str()).or_default() += 1;
        self.snapshot.records.insert(RecordKey::new(kind, key), value);
    }

    fn skip(&mut self, why: &str) {
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
    let record: DeviceRecord = serde_json::to_value(&device)
        .and_then(serde_json::from_value)
        .map_err(|_| BaileysError::Source("the engine's device did not convert to a device record".into()))?;

    let mut ctx = Ctx {
        snapshot: CredentialSnapshot::default(),
        report,
        local: LegacySessionLocalContext {
            identity_key: IdentityKey::new(device.identity_key.public_key),
            registration_id: device.registration_id,
        },
        now_secs: whatsapp_rust::wacore::time::now_secs(),
        latest_sync_key: None,
        _tenant: tenant,
    };
    ctx.snapshot.set_device(&record);
    *ctx.report.records.entry(RecordKind::Device.as_str()).or_default() += 1;
    if device.first_unupload_pre_key_id > 1 {
        let through = device.first_unupload_pre_key_id - 1;
        ctx.snapshot
            .records
            .insert(RecordKey::new(RecordKind::Other, PREKEYS_UPLOADED_THROUGH), through.to_le_bytes().to_vec());
    }

    for (name, content) in &files.files {
        let kind = kind_of(name);
        if kind == FileKind::Creds {
            continue;
        }
        convert_file(&mut ctx, name, kind, content)?;
    }
    if let Some((_, id)) = ctx.latest_sync_key.take() {
        ctx.snapshot.records.insert(RecordKey::new(RecordKind::Other, LATEST_SYNC_KEY), id);
    }
    if ctx.snapshot.count(RecordKind::PreKey) == 0 {
        ctx.report.notes.push(
            "no pre-key files: contacts starting a new chat get no one-time pre-key until the engine uploads new ones"
                .into(),
        );
    }
    Ok(Converted { snapshot: ctx.snapshot, report: ctx.report, jid, noise_public, identity_public })
}

fn convert_file(ctx: &mut Ctx<'_>, name: &str, kind: FileKind, content: &[u8]) -> Result<(), BaileysError> {
    let at = |p: String| refuse(name, p);
    match kind {
        FileKind::Creds => Ok(()),
        FileKind::PreKey(id) => {
            let id: u32 = Some(id.as_str())
                .filter(|i| all_digits(i) && i.len() <= 10)
                .and_then(|i| i.parse().ok())
                .filter(|i| *i > 0)
                .ok_or_else(|| refuse(name, "pre-key id in the file name is not a positive number"))?;
            let v = parse_json(name, content)?;
            let pair = key_pair(obj(Some(&v), "the pre-key").map_err(at)?, "").map_err(at)?;
            let record = new_pre_key_record(id, &pair);
            ctx.put(RecordKind::PreKey, id.to_string(), whatsapp_rust::waproto::codec::pre_key_record_to_vec(&record));
            Ok(())
        }
        FileKind::Session(id) => {
            let address =
                engine_address(&id).ok_or_else(|| refuse(name, "not a Signal address (user[_domain].device)"))?;
            let v = unwrap_buffered_json(name, parse_json(name, content)?)?;
            match session_record(&v, ctx.local).map_err(at)? {
                Some(bytes) => ctx.put(RecordKind::Session, address, bytes),
                None => ctx.skip("empty session files"),
            }
            Ok(())
        }
        FileKind::IdentityKey(id) => {
            let address =
                engine_address(&id).ok_or_else(|| refuse(name, "not a Signal address (user[_domain].device)"))?;
            let v = parse_json(name, content)?;
            let raw = bytes(Some(&v), "the identity key", Enc::BufferOrBase64).map_err(at)?;
            let key = public_key(&raw, "the identity key").map_err(at)?;
            ctx.put(RecordKind::Identity, address, key.public_key_bytes().to_vec());
            Ok(())
        }
        FileKind::SenderKey(id) => {
            let key =
                sender_key_name(&id).ok_or_else(|| refuse(name, "not a sender-key name (group--user--device)"))?;
            let v = unwrap_buffered_json(name, parse_json(name, content)?)?;
            match sender_key_record(&v).map_err(at)? {
                Some(bytes) => ctx.put(RecordKind::SenderKey, key, bytes),
                None => ctx.skip("empty sender-key files"),
            }
            Ok(())
        }
        FileKind::AppStateSyncKey(id) => {
            let key_id = decode_b64(&id.replace("__", "/"))
                .filter(|k| !k.is_empty() && k.len() <= 64)
                .ok_or_else(|| refuse(name, "key id in the file name is not base64"))?;
            let v = parse_json(name, content)?;
            let o = obj(Some(&v), "the key").map_err(at)?;
            let key_data: [u8; 32] = fixed(o.get("keyData"), "keyData", Enc::BufferOrBase64).map_err(at)?;
            let fingerprint = match o.get("fingerprint") {
                None | Some(Value::Null) => {
                    ctx.report.notes.push(format!("{}: no fingerprint; stored empty", shown(name)));
                    wa::message::AppStateSyncKeyFingerprint {
                        raw_id: None,
                        current_index: None,
                        device_indexes: vec![],
                    }
                }
                f => {
                    let f = obj(f, "fingerprint").map_err(at)?;
                    let device_indexes = match f.get("deviceIndexes") {
                        None | Some(Value::Null) => Vec::new(),
                        Some(Value::Array(a)) => a
                            .iter()
                            .map(|i| u32_of(Some(i), "fingerprint.deviceIndexes[]"))
                            .collect::<Result<_, _>>()
                            .map_err(at)?,
                        Some(_) => return Err(refuse(name, "`fingerprint.deviceIndexes` must be an array")),
                    };
                    wa::message::AppStateSyncKeyFingerprint {
                        raw_id: opt_int(f.get("rawId"), "fingerprint.rawId")
                            .map_err(at)?
                            .map(|i| u32::try_from(i).map_err(|_| at("`fingerprint.rawId` is out of range".into())))
                            .transpose()?,
                        current_index: opt_int(f.get("currentIndex"), "fingerprint.currentIndex")
                            .map_err(at)?
                            .map(|i| {
                                u32::try_from(i).map_err(|_| at("`fingerprint.currentIndex` is out of range".into()))
                            })
                            .transpose()?,
                        device_indexes,
                    }
                }
            };
            let timestamp = match opt_int(o.get("timestamp"), "timestamp").map_err(at)? {
                Some(t) => t,
                None => {
                    ctx.report.notes.push(format!("{}: no timestamp; stored 0", shown(name)));
                    0
                }
            };
            let fp = whatsapp_rust::waproto::codec::app_state_sync_key_fingerprint_to_vec(&fingerprint);
            let mut value = Vec::with_capacity(12 + key_data.len() + fp.len());
            value.extend_from_slice(&timestamp.to_le_bytes());
            value.extend_from_slice(&(key_data.len() as u32).to_le_bytes());
            value.extend_from_slice(&key_data);
            value.extend_from_slice(&fp);
            ctx.put(RecordKind::AppStateSyncKey, hex(&key_id), value);
            if ctx.latest_sync_key.as_ref().is_none_or(|(t, _)| timestamp >= *t) {
                ctx.latest_sync_key = Some((timestamp, key_id));
            }
            Ok(())
        }
        FileKind::AppStateSyncVersion(collection) => {
            if collection.is_empty()
                || collection.len() > 64
                || !collection.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            {
                return Err(refuse(name, "not an app-state collection name"));
            }
            let v = parse_json(name, content)?;
            let o = obj(Some(&v), "the state").map_err(at)?;
            let version = int(o.get("version"), "version").map_err(at)?;
            let version = u64::try_from(version).map_err(|_| at("`version` is negative".into()))?;
            let hash: [u8; 128] = fixed(o.get("hash"), "hash", Enc::Buffer).map_err(at)?;
            let mut macs = Vec::new();
            if let Some(map) = o.get("indexValueMap").filter(|m| !m.is_null()) {
                for (index, entry) in obj(Some(map), "indexValueMap").map_err(at)? {
                    let index_mac: [u8; 32] = decode_b64(index)
                        .and_then(|b| b.try_into().ok())
                        .ok_or_else(|| at("an `indexValueMap` key is not a base64 32-byte index MAC".into()))?;
                    let entry = obj(Some(entry), "indexValueMap[].").map_err(at)?;
                    let value_mac: [u8; 32] =
                        fixed(entry.get("valueMac"), "indexValueMap[].valueMac", Enc::BufferOrBase64).map_err(at)?;
                    macs.push((index_mac, value_mac));
                }
            }
            let state = HashState { version, hash, ..HashState::default() };
            let json = serde_json::to_vec(&state).expect("hash state serializes");
            ctx.put(RecordKind::AppStateVersion, collection.clone(), json);
            for (index_mac, value_mac) in macs {
                ctx.put(
                    RecordKind::AppStateMutationMac,
                    format!("{}{}", lp(&collection), hex(&index_mac)),
                    value_mac.to_vec(),
                );
            }
            Ok(())
        }
        FileKind::LidMapping(id) => {
            if let Some(lid_user) = id.strip_suffix("_reverse") {
                if !all_digits(lid_user) {
                    return Err(refuse(name, "not a LID user in the file name"));
                }
                // The reverse direction of a forward mapping; the engine derives it.
                ctx.skip("reverse LID mappings (derived from the forward ones)");
                return Ok(());
            }
            if !all_digits(&id) {
                return Err(refuse(name, "not a phone-number user in the file name"));
            }
            let v = parse_json(name, content)?;
            // A string, as Baileys writes it; a number when a store kept the text and it was read back as JSON.
            let lid = match &v {
                Value::String(s) => s.clone(),
                Value::Number(n) if n.is_u64() => n.to_string(),
                _ => String::new(),
            };
            if !all_digits(&lid) {
                return Err(refuse(name, "must hold a LID user (digits)"));
            }
            let lid = lid.as_str();
            let entry = LidPnMappingEntry {
                lid: lid.to_owned(),
                phone_number: id.clone(),
                created_at: ctx.now_secs,
                updated_at: ctx.now_secs,
                learning_source: "other".into(),
            };
            ctx.put(RecordKind::LidMapping, lid.to_owned(), serde_json::to_vec(&entry).expect("entry serializes"));
            Ok(())
        }
        FileKind::SenderKeyMemory => {
            ctx.skip("sender-key-memory files (the engine re-sends sender keys where needed)");
            Ok(())
        }
        FileKind::DeviceList => {
            ctx.skip("device-list files (the engine re-fetches device lists)");
            Ok(())
        }
        FileKind::TcToken => {
            ctx.skip("tctoken files (privacy tokens are re-issued by the server)");
            Ok(())
        }
        FileKind::Unknown => {
            ctx.skip("files of an unknown kind");
            ctx.report.notes.push(format!("{}: unknown kind, not imported", shown(name)));
            Ok(())
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The engine store's self-delimiting key part, `<len>.<part>`.
fn lp(part: &str) -> String {
    format!("{}.{part}", part.len())
}

/// `creds.json` -> the engine's device.
fn device_from_creds(tenant: &TenantId, creds: &Value, report: &mut Report) -> Result<Device, String> {
    let c = obj(Some(creds), "creds")?;
    let mut device = Device::new();

    device.noise_key = key_pair(obj(c.get("noiseKey"), "noiseKey")?, "noiseKey")?;
    device.identity_key = key_pair(obj(c.get("signedIdentityKey"), "signedIdentityKey")?, "signedIdentityKey")?;
    let spk = obj(c.get("signedPreKey"), "signedPreKey")?;
    device.signed_pre_key = key_pair(obj(spk.get("keyPair"), "signedPreKey.keyPair")?, "signedPreKey.keyPair")?;
    device.signed_pre_key_id = u32_of(spk.get("keyId"), "signedPreKey.keyId")?;
    device.signed_pre_key_signature = fixed(spk.get("signature"), "signedPreKey.signature", Enc::Buffer)?;
    if !device
        .identity_key
        .public_key
        .verify_signature(&device.signed_pre_key.public_key.serialize(), &device.signed_pre_key_signature)
    {
        return Err("`signedPreKey.signature` does not verify against `signedIdentityKey`".into());
    }
    device.registration_id = u32_of(c.get("registrationId"), "registrationId")?;
    if device.registration_id == 0 {
        return Err("`registrationId` is 0".into());
    }
    device.adv_secret_key = match c.get("advSecretKey") {
        Some(Value::String(s)) => {
            let b = decode_b64(s).ok_or("`advSecretKey` is not valid base64")?;
            let len = b.len();
            b.try_into().map_err(|_| format!("`advSecretKey` must be 32 bytes (got {len})"))?
        }
        other => fixed(other, "advSecretKey", Enc::Buffer)?,
    };

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

    let account = match c.get("account") {
        None | Some(Value::Null) => return Err("`account` is missing: this Baileys session was never linked".into()),
        a => obj(a, "account")?,
    };
    let details = bytes(account.get("details"), "account.details", Enc::BufferOrBase64)?;
    let account_signature: [u8; 64] =
        fixed(account.get("accountSignature"), "account.accountSignature", Enc::BufferOrBase64)?;
    let device_signature: [u8; 64] =
        fixed(account.get("deviceSignature"), "account.deviceSignature", Enc::BufferOrBase64)?;
    let account_key =
        opt_bytes(account.get("accountSignatureKey"), "account.accountSignatureKey", Enc::BufferOrBase64)?;
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
    device.account = Some(Arc::new(wa::ADVSignedDeviceIdentity {
        details: Some(details),
        account_signature_key: account_key,
        account_signature: Some(account_signature.to_vec()),
        device_signature: Some(device_signature.to_vec()),
    }));

    device.edge_routing_info = opt_bytes(c.get("routingInfo"), "routingInfo", Enc::BufferOrBase64)?;
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
    Ok(device)
}

// ---------------------------------------------------------------------------------------------------------
// Sessions: libsignal-node `SessionRecord` v1 JSON.

fn b64_field(o: &Map<String, Value>, key: &str, path: &str) -> Result<Bytes, String> {
    bytes(o.get(key), &format!("{path}.{key}"), Enc::BufferOrBase64).map(Bytes::from)
}

fn session_record(v: &Value, local: LegacySessionLocalContext) -> Result<Option<Vec<u8>>, String> {
    let record = obj(Some(v), "the session record")?;
    let record_registration = match record.get("version").and_then(Value::as_str) {
        Some("v1") => None,
        None if record.get("version").is_none() => opt_int(record.get("registrationId"), "registrationId")?,
        _ => return Err("`version` is not a libsignal-node session record version (v1)".into()),
    };
    let sessions = match record.get("_sessions") {
        None | Some(Value::Null) => return Ok(None),
        s => obj(s, "_sessions")?,
    };
    if sessions.is_empty() {
        return Ok(None);
    }
    let mut indexed = Vec::with_capacity(sessions.len());
    for (i, (index_key, entry)) in sessions.iter().enumerate() {
        let path = format!("_sessions[{i}]");
        let index_key =
            decode_b64(index_key).ok_or_else(|| format!("`{path}` is keyed by something other than base64"))?;
        let session = legacy_session(obj(Some(entry), &path)?, &path, record_registration)?;
        indexed.push(LegacyIndexedSessionV1 { index_key: Bytes::from(index_key), session });
    }
    let converted = LegacySessionRecordV1::from_indexed_sessions(indexed)
        .and_then(|r| r.into_session_record(local))
        .map_err(|e| format!("session does not convert: {e}"))?;
    converted.serialize().map(Some).map_err(|e| format!("session does not serialize: {e}"))
}

fn legacy_session(
    s: &Map<String, Value>,
    path: &str,
    fallback_registration: Option<i64>,
) -> Result<LegacySessionV1, String> {
    let registration_id =
        match opt_int(s.get("registrationId"), &format!("{path}.registrationId"))?.or(fallback_registration) {
            Some(r) => u32::try_from(r).map_err(|_| format!("`{path}.registrationId` is out of range"))?,
            None => return Err(format!("`{path}.registrationId` is missing")),
        };
    let rp = format!("{path}.currentRatchet");
    let ratchet = obj(s.get("currentRatchet"), &rp)?;
    let kp = obj(ratchet.get("ephemeralKeyPair"), &format!("{rp}.ephemeralKeyPair"))?;
    let ratchet = LegacySessionRatchetV1 {
        key_pair: LegacySessionKeyPairV1 {
            public: b64_field(kp, "pubKey", &format!("{rp}.ephemeralKeyPair"))?,
            private: b64_field(kp, "privKey", &format!("{rp}.ephemeralKeyPair"))?,
        },
        last_remote_ephemeral_key: b64_field(ratchet, "lastRemoteEphemeralKey", &rp)?,
        previous_counter: int(ratchet.get("previousCounter"), &format!("{rp}.previousCounter"))?,
        root_key: b64_field(ratchet, "rootKey", &rp)?,
    };

    let ip = format!("{path}.indexInfo");
    let info = obj(s.get("indexInfo"), &ip)?;
    let role = u32_of(info.get("baseKeyType"), &format!("{ip}.baseKeyType"))?;
    let closed = int(info.get("closed"), &format!("{ip}.closed"))?;
    let millis = |key: &str| -> Result<u64, String> {
        Ok(opt_int(info.get(key), &format!("{ip}.{key}"))?.unwrap_or(0).max(0) as u64)
    };
    let index = LegacySessionIndexV1 {
        base_key: b64_field(info, "baseKey", &ip)?,
        base_key_role: LegacySessionBaseKeyRoleV1::try_from(role).map_err(|e| format!("`{ip}.baseKeyType`: {e}"))?,
        disposition: LegacySessionDispositionV1::from_closed_timestamp(closed)
            .map_err(|e| format!("`{ip}.closed`: {e}"))?,
        used_at_ms: millis("used")?,
        created_at_ms: millis("created")?,
        remote_identity_key: b64_field(info, "remoteIdentityKey", &ip)?,
    };

    let cp = format!("{path}._chains");
    let mut chains = Vec::new();
    if let Some(all) = s.get("_chains").filter(|c| !c.is_null()) {
        for (j, (ratchet_key, chain)) in obj(Some(all), &cp)?.iter().enumerate() {
            let chp = format!("{cp}[{j}]");
            let ratchet_key =
                decode_b64(ratchet_key).ok_or_else(|| format!("`{chp}` is keyed by something other than base64"))?;
            let chain = obj(Some(chain), &chp)?;
            let key = obj(chain.get("chainKey"), &format!("{chp}.chainKey"))?;
            let counter = int(key.get("counter"), &format!("{chp}.chainKey.counter"))?;
            let role = u32_of(chain.get("chainType"), &format!("{chp}.chainType"))?;
            let mut message_keys = Vec::new();
            if let Some(mk) = chain.get("messageKeys").filter(|m| !m.is_null()) {
                for (index, seed) in obj(Some(mk), &format!("{chp}.messageKeys"))? {
                    let index: u32 =
                        index.parse().map_err(|_| format!("`{chp}.messageKeys` has a non-numeric index"))?;
                    let seed = bytes(Some(seed), &format!("{chp}.messageKeys[]"), Enc::BufferOrBase64)?;
                    message_keys.push(LegacySessionMessageKeyV1 { index, seed: Bytes::from(seed) });
                }
            }
            chains.push(LegacySessionChainV1 {
                ratchet_key: Bytes::from(ratchet_key),
                role: LegacySessionChainRoleV1::try_from(role).map_err(|e| format!("`{chp}.chainType`: {e}"))?,
                chain_key: LegacySessionChainKeyV1 {
                    counter: LegacySessionChainCounterV1::new(counter)
                        .map_err(|e| format!("`{chp}.chainKey.counter`: {e}"))?,
                    key: opt_bytes(key.get("key"), &format!("{chp}.chainKey.key"), Enc::BufferOrBase64)?
                        .map(Bytes::from),
                },
                message_keys,
            });
        }
    }

    let pending_pre_key = match s.get("pendingPreKey") {
        None | Some(Value::Null) => None,
        p => {
            let pp = format!("{path}.pendingPreKey");
            let p = obj(p, &pp)?;
            Some(LegacySessionPendingPreKeyV1 {
                pre_key_id: opt_int(p.get("preKeyId"), &format!("{pp}.preKeyId"))?
                    .map(|i| u32::try_from(i).map_err(|_| format!("`{pp}.preKeyId` is out of range")))
                    .transpose()?,
                signed_pre_key_id: u32_of(p.get("signedKeyId"), &format!("{pp}.signedKeyId"))?,
                base_key: b64_field(p, "baseKey", &pp)?,
            })
        }
    };
    Ok(LegacySessionV1 { registration_id, ratchet, index, chains, pending_pre_key })
}

// ---------------------------------------------------------------------------------------------------------
// Sender keys: Baileys' `SenderKeyRecord` (oldest state first) -> the engine's record (newest first).

fn sender_key_record(v: &Value) -> Result<Option<Vec<u8>>, String> {
    let states = match v {
        Value::Array(a) => a,
        Value::Null => return Ok(None),
        _ => return Err("must be a list of sender-key states".into()),
    };
    if states.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(states.len());
    // Baileys appends new states and reads the last one; the engine keeps the newest first.
    for (i, state) in states.iter().enumerate().rev() {
        let p = format!("[{i}]");
        let s = obj(Some(state), &p)?;
        let chain = obj(s.get("senderChainKey"), &format!("{p}.senderChainKey"))?;
        let signing = obj(s.get("senderSigningKey"), &format!("{p}.senderSigningKey"))?;
        let public = bytes(signing.get("public"), &format!("{p}.senderSigningKey.public"), Enc::BufferOrBase64)?;
        public_key(&public, &format!("{p}.senderSigningKey.public"))?;
        let private = opt_bytes(signing.get("private"), &format!("{p}.senderSigningKey.private"), Enc::BufferOrBase64)?
            .filter(|k| !k.is_empty());
        if let Some(k) = &private
            && k.len() != 32
        {
            return Err(format!("`{p}.senderSigningKey.private` must be 32 bytes (got {})", k.len()));
        }
        let mut message_keys = Vec::new();
        if let Some(keys) = s.get("senderMessageKeys").filter(|k| !k.is_null()) {
            let Value::Array(keys) = keys else {
                return Err(format!("`{p}.senderMessageKeys` must be a list"));
            };
            for (j, k) in keys.iter().enumerate() {
                let kp = format!("{p}.senderMessageKeys[{j}]");
                let k = obj(Some(k), &kp)?;
                message_keys.push(SenderMessageKeyComponents {
                    iteration: u32_of(k.get("iteration"), &format!("{kp}.iteration"))?,
                    seed: fixed::<32>(k.get("seed"), &format!("{kp}.seed"), Enc::BufferOrBase64)?.to_vec(),
                });
            }
        }
        out.push(SenderKeyStateComponents {
            key_id: u32_of(s.get("senderKeyId"), &format!("{p}.senderKeyId"))?,
            chain_key: SenderChainKeyComponents {
                iteration: u32_of(chain.get("iteration"), &format!("{p}.senderChainKey.iteration"))?,
                seed: fixed::<32>(chain.get("seed"), &format!("{p}.senderChainKey.seed"), Enc::BufferOrBase64)?
                    .to_vec(),
            },
            signing_key: SenderSigningKeyComponents { public, private },
            message_keys,
        });
    }
    let record = SenderKeyRecord::from_components(SenderKeyRecordComponents { states: out })
        .map_err(|e| format!("sender key does not convert: {e}"))?;
    record.serialize().map(Some).map_err(|e| format!("sender key does not serialize: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_rewritten_like_the_engine_writes_them() {
        assert_eq!(engine_address("5511999990000.0").as_deref(), Some("5511999990000@c.us.0"));
        assert_eq!(engine_address("5511999990000.7").as_deref(), Some("5511999990000:7@c.us.0"));
        assert_eq!(engine_address("201234567890123_1.0").as_deref(), Some("201234567890123@lid.0"));
        assert_eq!(engine_address("201234567890123_1.12").as_deref(), Some("201234567890123:12@lid.0"));
        assert_eq!(engine_address("1555_128.99").as_deref(), Some("1555:99@hosted.0"));
        assert_eq!(engine_address("1555_129.99").as_deref(), Some("1555:99@hosted.lid.0"));
        for bad in ["", "5511", "5511.x", "5511_2.0", "../x.0", "55 11.0", "5511.+1", "a.0", "5511.99999999"] {
            assert_eq!(engine_address(bad), None, "{bad}");
        }
        // The engine's own writer agrees.
        use whatsapp_rust::wacore::types::jid::JidExt;
        for (jid, baileys) in [
            ("5511999990000@s.whatsapp.net", "5511999990000.0"),
            ("5511999990000:7@s.whatsapp.net", "5511999990000.7"),
            ("201234567890123:3@lid", "201234567890123_1.3"),
        ] {
            let jid = Jid::from_str(jid).unwrap();
            assert_eq!(engine_address(baileys).unwrap(), jid.to_protocol_address().as_str());
        }
    }

    #[test]
    fn sender_key_names_follow_the_engine() {
        assert_eq!(
            sender_key_name("120363000000000001@g.us--5511977776666--0").as_deref(),
            Some("120363000000000001@g.us:5511977776666@c.us.0")
        );
        assert_eq!(
            sender_key_name("5511999-1600000000@g.us--201234567890123_1--4").as_deref(),
            Some("5511999-1600000000@g.us:201234567890123:4@lid.0")
        );
        assert_eq!(sender_key_name("status@broadcast--5511--0").as_deref(), Some("status@broadcast:5511@c.us.0"));
        assert_eq!(sender_key_name("nogroup--5511--0"), None);
        assert_eq!(sender_key_name("g@g.us--5511"), None);
    }

    #[test]
    fn file_names_are_checked() {
        for good in ["creds.json", "pre-key-1.json", "session-5511_1.0.json", "app-state-sync-key-AA+b__c=.json"] {
            check_file_name(good).unwrap();
        }
        for bad in ["../x.json", "a/b.json", "..json", ".hidden.json", "x\\y.json", "a b.json", "x.txt", "", "é.json"]
        {
            assert!(check_file_name(bad).is_err(), "{bad}");
        }
        let long = format!("{}.json", "a".repeat(300));
        assert!(check_file_name(&long).is_err());
    }

    #[test]
    fn buffers_in_every_form_baileys_writes() {
        let want = vec![1u8, 2, 255];
        let forms = [
            serde_json::json!({"type": "Buffer", "data": "AQL/"}),
            serde_json::json!({"type": "Buffer", "data": [1, 2, 255]}),
            serde_json::json!({"0": 1, "1": 2, "2": 255}),
        ];
        for f in &forms {
            assert_eq!(bytes(Some(f), "x", Enc::Buffer).unwrap(), want);
        }
        assert_eq!(bytes(Some(&serde_json::json!("AQL/")), "x", Enc::BufferOrBase64).unwrap(), want);
        let bad = [
            (serde_json::json!({"type": "Buffer", "data": "%%%"}), "not valid base64"),
            (serde_json::json!({"type": "Buffer", "data": [1, 256]}), "outside 0-255"),
            (serde_json::json!({"type": "Buffer", "data": 7}), "without base64"),
            (serde_json::json!({"0": 1, "2": 2}), "gaps"),
            (serde_json::json!("AQL/"), "must be a Buffer"),
            (serde_json::json!([1, 2]), "must be a Buffer"),
        ];
        for (v, why) in bad {
            let e = bytes(Some(&v), "noiseKey.private", Enc::Buffer).unwrap_err();
            assert!(e.contains(why) && e.contains("noiseKey.private"), "{e}");
        }
    }

    fn buf(b: &[u8]) -> Value {
        serde_json::json!({"type": "Buffer", "data": STANDARD.encode(b)})
    }

    fn pair_json(k: &KeyPair) -> Value {
        serde_json::json!({"private": buf(k.private_key.serialize()), "public": buf(k.public_key.public_key_bytes())})
    }

    /// Key material from the engine itself (no RNG crate needed here), written the way Baileys writes creds.
    fn synthetic() -> (Device, Value) {
        let d = Device::new();
        let creds = serde_json::json!({
            "noiseKey": pair_json(&d.noise_key),
            "signedIdentityKey": pair_json(&d.identity_key),
            "signedPreKey": {"keyPair": pair_json(&d.signed_pre_key), "keyId": d.signed_pre_key_id,
                             "signature": buf(&d.signed_pre_key_signature)},
            "registrationId": d.registration_id,
            "advSecretKey": STANDARD.encode(d.adv_secret_key),
            "me": {"id": "5511999990000:3@s.whatsapp.net", "lid": "123456789012345:3@lid", "name": "Cantina"},
            "account": {"details": "CAEQAg==", "accountSignature": STANDARD.encode([1u8; 64]),
                        "deviceSignature": STANDARD.encode([2u8; 64])},
            "nextPreKeyId": 5,
            "firstUnuploadedPreKeyId": 5,
            "lastPropHash": "abc",
            "routingInfo": buf(&[8, 1])
        });
        (d, creds)
    }

    fn files(entries: &[(&str, Value)]) -> AuthFiles {
        let mut f = AuthFiles::default();
        for (name, v) in entries {
            f.insert(name, serde_json::to_vec(v).unwrap()).unwrap();
        }
        f
    }

    fn tenant() -> TenantId {
        TenantId::parse("cantina").unwrap()
    }

    #[test]
    fn creds_become_the_engine_device() {
        let (d, creds) = synthetic();
        let prekey = Device::new().noise_key;
        let out = convert(&tenant(), &files(&[("creds.json", creds), ("pre-key-3.json", pair_json(&prekey))])).unwrap();
        let record = out.snapshot.check_restorable().unwrap();
        let back: Device = serde_json::from_value(serde_json::to_value(&record).unwrap()).unwrap();
        assert_eq!(back.registration_id, d.registration_id);
        assert_eq!(back.noise_key.public_key, d.noise_key.public_key);
        assert_eq!(back.identity_key.public_key, d.identity_key.public_key);
        assert_eq!(back.signed_pre_key_signature, d.signed_pre_key_signature);
        assert_eq!(back.adv_secret_key, d.adv_secret_key);
        assert_eq!(back.pn.unwrap().to_string(), "5511999990000:3@s.whatsapp.net");
        assert_eq!(back.lid.unwrap().to_string(), "123456789012345:3@lid");
        assert_eq!(back.push_name, "Cantina");
        assert_eq!(back.props_hash.as_deref(), Some("abc"));
        assert_eq!(back.edge_routing_info, Some(vec![8, 1]));
        assert_eq!((back.next_pre_key_id, back.first_unupload_pre_key_id), (5, 5));
        assert!(back.server_has_prekeys);
        assert_eq!(out.noise_public, d.noise_key.public_key.public_key_bytes());
        // The pre-key is the engine's protobuf record.
        let raw = &out.snapshot.records[&RecordKey::new(RecordKind::PreKey, "3")];
        let pk = whatsapp_rust::waproto::codec::pre_key_record_decode(raw).unwrap();
        assert_eq!(pk.id, Some(3));
        assert_eq!(pk.public_key.as_deref(), Some(prekey.public_key.public_key_bytes()));
        assert_eq!(
            out.snapshot.records[&RecordKey::new(RecordKind::Other, PREKEYS_UPLOADED_THROUGH)],
            4u32.to_le_bytes()
        );
    }

    #[test]
    fn each_missing_required_field_is_named() {
        for field in
            ["noiseKey", "signedIdentityKey", "signedPreKey", "registrationId", "advSecretKey", "me", "account"]
        {
            let (_, mut creds) = synthetic();
            creds.as_object_mut().unwrap().remove(field);
            let e = convert(&tenant(), &files(&[("creds.json", creds)])).unwrap_err().to_string();
            assert!(e.starts_with("creds.json: ") && e.contains(&format!("`{field}")), "{field}: {e}");
        }
        for (path, field) in [("me", "id"), ("signedPreKey", "keyId"), ("account", "deviceSignature")] {
            let (_, mut creds) = synthetic();
            creds[path].as_object_mut().unwrap().remove(field);
            let e = convert(&tenant(), &files(&[("creds.json", creds)])).unwrap_err().to_string();
            assert!(e.contains(&format!("`{path}.{field}` is missing")), "{e}");
        }
    }

    #[test]
    fn inconsistent_keys_are_refused() {
        let (_, mut creds) = synthetic();
        creds["noiseKey"]["public"] = buf(Device::new().noise_key.public_key.public_key_bytes());
        let e = convert(&tenant(), &files(&[("creds.json", creds)])).unwrap_err().to_string();
        assert!(e.contains("`noiseKey.public` does not belong to `noiseKey.private`"), "{e}");

        let (_, creds) = synthetic();
        let mut mixed = pair_json(&Device::new().noise_key);
        mixed["public"] = buf(Device::new().noise_key.public_key.public_key_bytes());
        let e =
            convert(&tenant(), &files(&[("creds.json", creds), ("pre-key-9.json", mixed)])).unwrap_err().to_string();
        assert!(e.starts_with("pre-key-9.json: ") && e.contains("does not belong"), "{e}");

        let (_, mut creds) = synthetic();
        creds["me"]["id"] = "5511999990000@s.whatsapp.net".into();
        let e = convert(&tenant(), &files(&[("creds.json", creds)])).unwrap_err().to_string();
        assert!(e.contains("`me.id` is not a linked device"), "{e}");
    }

    #[test]
    fn sender_key_states_are_reversed_into_the_engine_order() {
        let (_, creds) = synthetic();
        let state = |id: u32, iteration: u32| {
            let signing = Device::new().identity_key;
            serde_json::json!({
                "senderKeyId": id,
                "senderChainKey": {"iteration": iteration, "seed": {"type": "Buffer", "data": vec![id as u8; 32]}},
                "senderSigningKey": {"public": buf(&signing.public_key.serialize()), "private": buf(&[])},
                "senderMessageKeys": [{"iteration": 0, "seed": {"type": "Buffer", "data": vec![9u8; 32]}}]
            })
        };
        // Baileys keeps the oldest state first and stores the record as a Buffer of its JSON text.
        let text = serde_json::to_vec(&serde_json::json!([state(11, 1), state(22, 5)])).unwrap();
        let out = convert(
            &tenant(),
            &files(&[("creds.json", creds), ("sender-key-120363000000000009@g.us--5511977776666--0.json", buf(&text))]),
        )
        .unwrap();
        let key = RecordKey::new(RecordKind::SenderKey, "120363000000000009@g.us:5511977776666@c.us.0");
        let record = SenderKeyRecord::deserialize(&out.snapshot.records[&key]).unwrap();
        let states = record.into_components().unwrap().states;
        assert_eq!(states.iter().map(|s| s.key_id).collect::<Vec<_>>(), vec![22, 11], "newest first");
        assert_eq!(states[0].chain_key.iteration, 5);
        assert_eq!(states[0].signing_key.private, None, "a received key has no private half");
        assert_eq!(states[1].message_keys.len(), 1);
    }

    #[test]
    fn unsupported_session_versions_and_empty_records() {
        let local = LegacySessionLocalContext {
            identity_key: IdentityKey::new(Device::new().identity_key.public_key),
            registration_id: 1,
        };
        let e = session_record(&serde_json::json!({"_sessions": {}, "version": "v2"}), local).unwrap_err();
        assert!(e.contains("`version`"), "{e}");
        assert_eq!(session_record(&serde_json::json!({"_sessions": {}, "version": "v1"}), local).unwrap(), None);
        let e =
            session_record(&serde_json::json!({"_sessions": {"AAAA": {"currentRatchet": {}}}, "version": "v1"}), local)
                .unwrap_err();
        assert!(e.contains("_sessions[0]"), "{e}");
    }

    #[test]
    fn integers_in_every_form() {
        assert_eq!(opt_int(Some(&serde_json::json!(5)), "x").unwrap(), Some(5));
        assert_eq!(opt_int(Some(&serde_json::json!("1795870691549")), "x").unwrap(), Some(1_795_870_691_549));
        assert_eq!(
            opt_int(Some(&serde_json::json!({"low": 1, "high": 1, "unsigned": false})), "x").unwrap(),
            Some((1 << 32) + 1)
        );
        assert!(opt_int(Some(&serde_json::json!(1.5)), "x").is_err());
        assert!(opt_int(Some(&serde_json::json!("x")), "x").is_err());
    }
}
