//! The engine's storage: whatsapp-rust's `Backend` over one tenant's local working copy.
//!
//! Every engine call maps to records of wakeeper's own snapshot format ([`RecordKind`] + key), so the same
//! state can be hydrated, replicated, exported and audited without the engine. Writes are appended to the
//! working copy's journal and fdatasynced before the call returns (the engine's counter reservations rely on
//! this: it writes a session or sender key with a raised reservation and only then sends ciphertext); then the
//! same changes go to the replicator. A batch method is one journal append; read-modify-write methods
//! (`take_sent_message`, the tc-token merges, message-secret merges) run under the store's write lock, so they
//! are atomic with respect to every other write.
//!
//! Memory: an idle restored session should cost little, so values above [`INLINE_MAX`] bytes stay on disk and
//! only their location (12 bytes) is kept; pre-keys (hundreds per device, read once each) keep only an id and
//! a location. Cold values are read back on demand from the page cache.
//!
//! Record keys:
//! | kind | key | value |
//! |---|---|---|
//! | device | `self` | [`DeviceRecord`] JSON (the engine's serde `Device`) |
//! | identity, session, sender_key | address | raw bytes |
//! | pre_key, signed_pre_key | decimal id | raw record |
//! | app_state_sync_key | hex key id | `ts:i64 ‖ len:u32 ‖ key_data ‖ fingerprint` |
//! | app_state_version | collection | `HashState` JSON |
//! | app_state_mutation_mac | `lp(collection)` + hex index MAC | value MAC |
//! | sender_key_device | `lp(group)` + device JID | `0`/`1` |
//! | lid_mapping | LID user | `LidPnMappingEntry` JSON |
//! | base_key | `lp(address)` + message id | base key |
//! | device_list | user | `DeviceListRecord` JSON |
//! | tc_token | JID | `token_ts:i64 ‖ has_sender:u8 ‖ sender_ts:i64 ‖ token` |
//! | sent_message | `lp(chat)` + message id | `stored_at:i64 ‖ payload` |
//! | pending_inbound | `lp(chat)` + `lp(sender)` + id | `stored_at:i64 ‖ message` |
//! | msg_secret | `lp(chat)` + `lp(sender)` + message id | `expires_at:i64 ‖ message_ts:i64 ‖ secret` |
//! | group_metadata | group JID | blob |
//! | other | `latest_sync_key_id`, `prekeys_uploaded_through` | bytes / u32 |
//!
//! `lp(x)` is `<byte length of x>.<x>`: composite keys stay unambiguous whatever the parts contain, and all
//! keys of one group or collection share a prefix.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use async_trait::async_trait;
use tokio::sync::{Mutex, RwLock, RwLockWriteGuard};
use tracing::debug;
use wakeeper_shared::domain::{DeviceRecord, RecordChange, RecordKey, RecordKind, TenantId};
use wakeeper_shared::working_copy::{RecordLoc, RecordReader, WorkingCopy, WorkingCopyError};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::stats::StorageResourceReport;
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::error::{Result as EResult, StoreError as EStoreError};
use whatsapp_rust::wacore::store::traits::{
    AppStateSyncKey, AppSyncStore, DeviceListRecord, DeviceStore, LidPnMappingEntry, MsgSecretEntry, MsgSecretStore,
    PendingInboundKey, PendingInboundRow, ProtocolStore, SignalStore, TcTokenEntry, merge_msg_secret_expiry,
    merge_msg_secret_message_ts,
};

use crate::replicator::Replica;

/// Values up to this many bytes are kept in memory; longer ones are read from disk when asked for.
pub const INLINE_MAX: usize = 48;
/// Sent messages kept for retry receipts; the oldest beyond this are dropped (the engine also prunes by age).
pub const MAX_SENT_MESSAGES: usize = 4096;

const LATEST_SYNC_KEY: &str = "latest_sync_key_id";
const PREKEYS_UPLOADED_THROUGH: &str = "prekeys_uploaded_through";

/// Errors of the engine store (wrapped into the engine's `StoreError`). Never carries record contents.
#[derive(Debug, thiserror::Error)]
pub enum EngineStoreError {
    /// The working copy failed.
    #[error(transparent)]
    WorkingCopy(#[from] WorkingCopyError),
    /// The credential store refused this host's epoch: another host owns the tenant; no more writes.
    #[error("tenant is fenced: another host holds its lease")]
    Fenced,
    /// A blocking working-copy task died.
    #[error("working copy task failed: {0}")]
    Task(String),
    /// A stored value does not decode.
    #[error("stored {0} record is malformed")]
    Malformed(&'static str),
}

fn db(e: impl Into<EngineStoreError>) -> EStoreError {
    EStoreError::Database(Box::new(e.into()))
}

fn ser(e: serde_json::Error) -> EStoreError {
    EStoreError::Serialization(Box::new(e))
}

fn malformed(what: &'static str) -> EStoreError {
    db(EngineStoreError::Malformed(what))
}

#[derive(Debug)]
enum Slot {
    Inline(Box<[u8]>),
    /// On disk; `meta` caches the timestamp some kinds are swept by.
    Disk {
        loc: RecordLoc,
        meta: i64,
    },
}

const KINDS: usize = RecordKind::ALL.len();

fn kind_index(kind: RecordKind) -> usize {
    RecordKind::ALL.iter().position(|k| *k == kind).expect("every kind is in ALL")
}

/// Kinds whose value starts with an i64 that sweeps filter on.
fn has_meta(kind: RecordKind) -> bool {
    matches!(kind, RecordKind::SentMessage | RecordKind::PendingInbound | RecordKind::MsgSecret)
}

fn leading_i64(v: &[u8]) -> i64 {
    v.get(..8).map_or(0, |b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// The in-memory view.
#[derive(Default)]
struct State {
    /// One map per kind (pre-keys excepted), keyed by the record key.
    maps: [BTreeMap<Box<str>, Slot>; KINDS],
    /// Pre-key ids and where their records are, sorted by id.
    prekeys: Vec<(u32, RecordLoc)>,
    /// Phone user -> LID user of the newest mapping, for `get_pn_mapping`.
    pn_to_lid: HashMap<Box<str>, Box<str>>,
}

impl State {
    fn map(&self, kind: RecordKind) -> &BTreeMap<Box<str>, Slot> {
        &self.maps[kind_index(kind)]
    }

    fn map_mut(&mut self, kind: RecordKind) -> &mut BTreeMap<Box<str>, Slot> {
        &mut self.maps[kind_index(kind)]
    }

    fn put(&mut self, key: &RecordKey, value: Vec<u8>, loc: RecordLoc) {
        if key.kind == RecordKind::PreKey {
            if let Ok(id) = key.key.parse::<u32>() {
                match self.prekeys.binary_search_by_key(&id, |(i, _)| *i) {
                    Ok(at) => self.prekeys[at].1 = loc,
                    Err(at) => self.prekeys.insert(at, (id, loc)),
                }
            }
            return;
        }
        let slot = if value.len() <= INLINE_MAX {
            Slot::Inline(value.into_boxed_slice())
        } else {
            let meta = if has_meta(key.kind) { leading_i64(&value) } else { 0 };
            Slot::Disk { loc, meta }
        };
        self.map_mut(key.kind).insert(key.key.as_str().into(), slot);
    }

    fn remove(&mut self, key: &RecordKey) {
        if key.kind == RecordKind::PreKey {
            if let Ok(id) = key.key.parse::<u32>()
                && let Ok(at) = self.prekeys.binary_search_by_key(&id, |(i, _)| *i)
            {
                self.prekeys.remove(at);
            }
            return;
        }
        self.map_mut(key.kind).remove(key.key.as_str());
    }

    /// Points the mapping's phone at `lid` (the newest write wins, as replay preserves write order). An entry
    /// left behind when a LID moves to another phone is filtered out on lookup.
    fn index_lid(&mut self, lid: &str, value: &[u8]) {
        if let Ok(e) = serde_json::from_slice::<LidPnMappingEntry>(value) {
            self.pn_to_lid.insert(e.phone_number.into_boxed_str(), lid.into());
        }
    }

    fn approx_bytes(&self) -> u64 {
        let mut n = std::mem::size_of::<Self>() + self.prekeys.capacity() * std::mem::size_of::<(u32, RecordLoc)>();
        for m in &self.maps {
            for (k, v) in m {
                n += 64 + k.len();
                if let Slot::Inline(b) = v {
                    n += b.len();
                }
            }
        }
        for (k, v) in &self.pn_to_lid {
            n += 64 + k.len() + v.len();
        }
        n as u64
    }
}

/// `<len>.<part>`: a self-delimiting key part.
fn lp(part: &str) -> String {
    format!("{}.{part}", part.len())
}

/// Splits a key made of `lp(a)` + rest into `(a, rest)`.
fn split_lp(key: &str) -> Option<(&str, &str)> {
    let (len, rest) = key.split_once('.')?;
    let len: usize = len.parse().ok()?;
    (rest.len() >= len && rest.is_char_boundary(len)).then(|| rest.split_at(len))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn rk(kind: RecordKind, key: impl Into<String>) -> RecordKey {
    RecordKey::new(kind, key)
}

fn put(kind: RecordKind, key: impl Into<String>, value: Vec<u8>) -> RecordChange {
    RecordChange { key: rk(kind, key), value: Some(value) }
}

fn del(kind: RecordKind, key: impl Into<String>) -> RecordChange {
    RecordChange { key: rk(kind, key), value: None }
}

fn encode_sync_key(k: &AppStateSyncKey) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + k.key_data.len() + k.fingerprint.len());
    v.extend_from_slice(&k.timestamp.to_le_bytes());
    v.extend_from_slice(&(k.key_data.len() as u32).to_le_bytes());
    v.extend_from_slice(&k.key_data);
    v.extend_from_slice(&k.fingerprint);
    v
}

fn decode_sync_key(v: &[u8]) -> Option<AppStateSyncKey> {
    let timestamp = i64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(v.get(8..12)?.try_into().ok()?) as usize;
    let key_data = v.get(12..12 + len)?.to_vec();
    let fingerprint = v.get(12 + len..)?.to_vec();
    Some(AppStateSyncKey { key_data, fingerprint, timestamp })
}

fn encode_tc(e: &TcTokenEntry) -> Vec<u8> {
    let mut v = Vec::with_capacity(17 + e.token.len());
    v.extend_from_slice(&e.token_timestamp.to_le_bytes());
    v.push(u8::from(e.sender_timestamp.is_some()));
    v.extend_from_slice(&e.sender_timestamp.unwrap_or(0).to_le_bytes());
    v.extend_from_slice(&e.token);
    v
}

fn decode_tc(v: &[u8]) -> Option<TcTokenEntry> {
    let token_timestamp = i64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let has_sender = *v.get(8)? == 1;
    let sender = i64::from_le_bytes(v.get(9..17)?.try_into().ok()?);
    Some(TcTokenEntry { token: v[17..].to_vec(), token_timestamp, sender_timestamp: has_sender.then_some(sender) })
}

fn with_i64(ts: i64, rest: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + rest.len());
    v.extend_from_slice(&ts.to_le_bytes());
    v.extend_from_slice(rest);
    v
}

fn encode_secret(expires_at: i64, message_ts: i64, secret: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + secret.len());
    v.extend_from_slice(&expires_at.to_le_bytes());
    v.extend_from_slice(&message_ts.to_le_bytes());
    v.extend_from_slice(secret);
    v
}

/// `(expires_at, message_ts, secret)`.
fn decode_secret(v: &[u8]) -> Option<(i64, i64, &[u8])> {
    Some((leading_i64(v.get(..8)?), leading_i64(v.get(8..16)?), v.get(16..)?))
}

fn device_to_bytes(device: &Device) -> EResult<Vec<u8>> {
    let value = serde_json::to_value(device).map_err(ser)?;
    let record: DeviceRecord = serde_json::from_value(value).map_err(ser)?;
    Ok(record.to_bytes())
}

fn device_from_bytes(bytes: &[u8]) -> EResult<Device> {
    let record = DeviceRecord::from_bytes(bytes).map_err(ser)?;
    serde_json::from_value(serde_json::to_value(record).map_err(ser)?).map_err(ser)
}

fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Counters of one store, for tests and the host's dashboard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStoreStats {
    /// The working copy's generation.
    pub generation: u64,
    /// Journal appends since open.
    pub appends: u64,
    /// Compactions since open.
    pub compactions: u64,
    /// Records currently held (pre-keys included).
    pub records: u64,
    /// Estimated bytes of the in-memory view.
    pub memory_bytes: u64,
}

/// whatsapp-rust's `Backend` for one tenant: in-memory index, durable working copy, replication.
pub struct EngineStore {
    tenant: TenantId,
    /// Serialises writers; held across the durable append so read-modify-writes are atomic.
    write_lock: Mutex<()>,
    /// The in-memory view; readers hold it (shared) while reading a value from disk, a compaction holds it
    /// (exclusive) while moving the files, so no reader ever follows a stale location.
    state: RwLock<State>,
    wc: Arc<StdMutex<WorkingCopy>>,
    reader: RecordReader,
    replica: Replica,
    /// Fingerprint of the last device record written, to skip saves that change nothing.
    device_fp: StdMutex<Option<u64>>,
    counters: StdMutex<(u64, u64)>,
    /// The working copy's generation, readable without waiting for a writer's fsync.
    generation: AtomicU64,
}

impl std::fmt::Debug for EngineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineStore").field("tenant", &self.tenant).finish_non_exhaustive()
    }
}

fn scan_state(wc: &WorkingCopy) -> Result<State, WorkingCopyError> {
    let mut state = State::default();
    wc.scan(|item| match item.value {
        Some(v) => {
            if item.key.kind == RecordKind::LidMapping {
                state.index_lid(&item.key.key, &v);
            }
            state.put(&item.key, v, item.loc);
        }
        None => state.remove(&item.key),
    })?;
    Ok(state)
}

impl EngineStore {
    /// Loads the tenant's working copy into memory and links it to the replicator. Blocking (reads and decrypts
    /// the copy once); call from `spawn_blocking` or before the runtime gets busy. A missing copy is fine (a
    /// device to be paired); a corrupt one is an error.
    pub fn open(wc: WorkingCopy, replica: Replica) -> Result<Arc<Self>, EngineStoreError> {
        let state = scan_state(&wc)?;
        let reader = wc.reader();
        let tenant = wc.tenant().clone();
        let generation = AtomicU64::new(wc.generation().unwrap_or(0));
        debug!(%tenant, generation = ?wc.generation(), "engine store opened");
        Ok(Arc::new(Self {
            tenant,
            write_lock: Mutex::new(()),
            state: RwLock::new(state),
            wc: Arc::new(StdMutex::new(wc)),
            reader,
            replica,
            device_fp: StdMutex::new(None),
            counters: StdMutex::new((0, 0)),
            generation,
        }))
    }

    /// The tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// Counters and the working copy's generation.
    pub async fn stats(&self) -> EngineStoreStats {
        let st = self.state.read().await;
        let records = st.maps.iter().map(|m| m.len() as u64).sum::<u64>() + st.prekeys.len() as u64;
        let (appends, compactions) = *self.counters.lock().expect("counters");
        EngineStoreStats {
            generation: self.generation.load(Ordering::SeqCst),
            appends,
            compactions,
            records,
            memory_bytes: st.approx_bytes(),
        }
    }

    /// Reads a slot's value (from memory or disk).
    fn value(&self, kind: RecordKind, key: &str, slot: &Slot) -> EResult<Vec<u8>> {
        match slot {
            Slot::Inline(b) => Ok(b.to_vec()),
            Slot::Disk { loc, .. } => {
                self.reader.read(*loc, &rk(kind, key)).map_err(db)?.ok_or_else(|| malformed("deleted"))
            }
        }
    }

    fn get_in(&self, st: &State, kind: RecordKind, key: &str) -> EResult<Option<Vec<u8>>> {
        st.map(kind).get(key).map(|slot| self.value(kind, key, slot)).transpose()
    }

    async fn get(&self, kind: RecordKind, key: &str) -> EResult<Option<Vec<u8>>> {
        let st = self.state.read().await;
        self.get_in(&st, kind, key)
    }

    async fn contains(&self, kind: RecordKind, key: &str) -> bool {
        self.state.read().await.map(kind).contains_key(key)
    }

    /// Values of every record of `kind` whose key starts with `prefix`.
    fn scan_prefix(&self, st: &State, kind: RecordKind, prefix: &str) -> EResult<Vec<(String, Vec<u8>)>> {
        st.map(kind)
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, slot)| Ok((k.to_string(), self.value(kind, k, slot)?)))
            .collect()
    }

    fn keys_with_prefix(st: &State, kind: RecordKind, prefix: &str) -> Vec<String> {
        st.map(kind)
            .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.to_string())
            .collect()
    }

    /// Runs a write: `plan` sees the current state and lists the changes (under the write lock, so a
    /// read-modify-write is atomic); the changes are appended durably, applied to memory and replicated.
    async fn write<R>(&self, plan: impl FnOnce(&Self, &State) -> EResult<(Vec<RecordChange>, R)>) -> EResult<R> {
        let _writer = self.write_lock.lock().await;
        if self.replica.is_fenced() {
            return Err(db(EngineStoreError::Fenced));
        }
        let (changes, result) = {
            let st = self.state.read().await;
            plan(self, &st)?
        };
        if changes.is_empty() {
            return Ok(result);
        }
        let wc = self.wc.clone();
        let (changes, outcome) = tokio::task::spawn_blocking(move || {
            let mut wc = wc.lock().expect("working copy");
            let before = wc.generation().unwrap_or(0);
            let outcome = wc.append_located(&changes).map(|(after, locs)| (before, after, locs, wc.needs_compaction()));
            (changes, outcome)
        })
        .await
        .map_err(|e| db(EngineStoreError::Task(e.to_string())))?;
        let (from, to, locs, compact) = outcome.map_err(db)?;

        let mut st = self.state.write().await;
        let replicated = changes.clone();
        for (change, loc) in changes.into_iter().zip(locs) {
            match change.value {
                Some(v) => {
                    if change.key.kind == RecordKind::LidMapping {
                        st.index_lid(&change.key.key, &v);
                    }
                    st.put(&change.key, v, loc);
                }
                None => st.remove(&change.key),
            }
        }
        self.generation.store(to, Ordering::SeqCst);
        self.replica.submit(from, to, replicated);
        self.counters.lock().expect("counters").0 += 1;
        if compact {
            self.compact(st).await?;
        }
        Ok(result)
    }

    /// Folds the journal into a new base and rebuilds the view (every location moves), holding the view
    /// exclusively so no reader follows an old location.
    async fn compact(&self, mut st: RwLockWriteGuard<'_, State>) -> EResult<()> {
        let wc = self.wc.clone();
        let fresh = tokio::task::spawn_blocking(move || {
            let mut wc = wc.lock().expect("working copy");
            wc.compact()?;
            scan_state(&wc)
        })
        .await
        .map_err(|e| db(EngineStoreError::Task(e.to_string())))?
        .map_err(db)?;
        *st = fresh;
        self.counters.lock().expect("counters").1 += 1;
        debug!(tenant = %self.tenant, "engine store compacted");
        Ok(())
    }

    fn prekey_key(id: u32) -> RecordKey {
        rk(RecordKind::PreKey, id.to_string())
    }

    fn load_prekey_in(&self, st: &State, id: u32) -> EResult<Option<Bytes>> {
        match st.prekeys.binary_search_by_key(&id, |(i, _)| *i) {
            Ok(at) => Ok(self.reader.read(st.prekeys[at].1, &Self::prekey_key(id)).map_err(db)?.map(Bytes::from)),
            Err(_) => Ok(None),
        }
    }
}

#[async_trait]
impl SignalStore for EngineStore {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> EResult<()> {
        self.write(|_, _| Ok((vec![put(RecordKind::Identity, address, key.to_vec())], ()))).await
    }

    async fn put_identities_batch(&self, identities: &[(Arc<str>, [u8; 32])]) -> EResult<()> {
        let changes = identities.iter().map(|(a, k)| put(RecordKind::Identity, &**a, k.to_vec())).collect();
        self.write(|_, _| Ok((changes, ()))).await
    }

    async fn load_identity(&self, address: &str) -> EResult<Option<[u8; 32]>> {
        match self.get(RecordKind::Identity, address).await? {
            Some(v) => Ok(Some(v.try_into().map_err(|_| malformed("identity"))?)),
            None => Ok(None),
        }
    }

    async fn delete_identity(&self, address: &str) -> EResult<()> {
        self.write(|_, st| {
            let changes = if st.map(RecordKind::Identity).contains_key(address) {
                vec![del(RecordKind::Identity, address)]
            } else {
                Vec::new()
            };
            Ok((changes, ()))
        })
        .await
    }

    async fn get_session(&self, address: &str) -> EResult<Option<Bytes>> {
        Ok(self.get(RecordKind::Session, address).await?.map(Bytes::from))
    }

    async fn put_session(&self, address: &str, session: &[u8]) -> EResult<()> {
        self.write(|_, _| Ok((vec![put(RecordKind::Session, address, session.to_vec())], ()))).await
    }

    async fn put_sessions_batch(&self, sessions: &[(Arc<str>, Bytes)]) -> EResult<()> {
        let changes = sessions.iter().map(|(a, s)| put(RecordKind::Session, &**a, s.to_vec())).collect();
        self.write(|_, _| Ok((changes, ()))).await
    }

    async fn delete_session(&self, address: &str) -> EResult<()> {
        self.write(|_, st| {
            let changes = if st.map(RecordKind::Session).contains_key(address) {
                vec![del(RecordKind::Session, address)]
            } else {
                Vec::new()
            };
            Ok((changes, ()))
        })
        .await
    }

    async fn has_session(&self, address: &str) -> EResult<bool> {
        Ok(self.contains(RecordKind::Session, address).await)
    }

    async fn has_signal_state_for_user(&self, user: &str) -> EResult<bool> {
        let st = self.state.read().await;
        let matches = |kind| {
            st.map(kind)
                .range::<str, _>((std::ops::Bound::Included(user), std::ops::Bound::Unbounded))
                .take_while(|(k, _)| k.starts_with(user))
                .any(|(k, _)| matches!(k.as_bytes().get(user.len()), Some(b'@' | b':')))
        };
        Ok(matches(RecordKind::Session) || matches(RecordKind::Identity))
    }

    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> EResult<()> {
        self.store_prekeys_batch(&[(id, Bytes::copy_from_slice(record))], uploaded).await
    }

    async fn store_prekeys_batch(&self, keys: &[(u32, Bytes)], uploaded: bool) -> EResult<()> {
        let mut changes: Vec<RecordChange> =
            keys.iter().map(|(id, r)| put(RecordKind::PreKey, id.to_string(), r.to_vec())).collect();
        if uploaded && let Some(max) = keys.iter().map(|(id, _)| *id).max() {
            changes.push(put(RecordKind::Other, PREKEYS_UPLOADED_THROUGH, max.to_le_bytes().to_vec()));
        }
        self.write(|_, _| Ok((changes, ()))).await
    }

    async fn load_prekey(&self, id: u32) -> EResult<Option<Bytes>> {
        let st = self.state.read().await;
        self.load_prekey_in(&st, id)
    }

    async fn load_prekeys_batch(&self, ids: &[u32]) -> EResult<Vec<(u32, Bytes)>> {
        let st = self.state.read().await;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Some(r) = self.load_prekey_in(&st, id)? {
                out.push((id, r));
            }
        }
        Ok(out)
    }

    /// The engine tracks what the server has in the device's watermarks and never reads a per-key flag back,
    /// so rewriting hundreds of pre-key records (and replicating them) to flip a flag would buy nothing. One
    /// record remembers the highest id marked; nothing is inserted, so a consumed key stays deleted.
    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> EResult<()> {
        let Some(max) = ids.iter().copied().max() else { return Ok(()) };
        self.write(|this, st| {
            let current = this
                .get_in(st, RecordKind::Other, PREKEYS_UPLOADED_THROUGH)?
                .and_then(|v| v.try_into().ok())
                .map_or(0, u32::from_le_bytes);
            let changes = if max > current {
                vec![put(RecordKind::Other, PREKEYS_UPLOADED_THROUGH, max.to_le_bytes().to_vec())]
            } else {
                Vec::new()
            };
            Ok((changes, ()))
        })
        .await
    }

    async fn remove_prekey(&self, id: u32) -> EResult<()> {
        self.write(|_, st| {
            let exists = st.prekeys.binary_search_by_key(&id, |(i, _)| *i).is_ok();
            Ok((if exists { vec![del(RecordKind::PreKey, id.to_string())] } else { Vec::new() }, ()))
        })
        .await
    }

    async fn get_max_prekey_id(&self) -> EResult<u32> {
        Ok(self.state.read().await.prekeys.last().map_or(0, |(id, _)| *id))
    }

    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> EResult<()> {
        self.write(|_, _| Ok((vec![put(RecordKind::SignedPreKey, id.to_string(), record.to_vec())], ()))).await
    }

    async fn load_signed_prekey(&self, id: u32) -> EResult<Option<Vec<u8>>> {
        self.get(RecordKind::SignedPreKey, &id.to_string()).await
    }

    async fn load_all_signed_prekeys(&self) -> EResult<Vec<(u32, Vec<u8>)>> {
        let st = self.state.read().await;
        let mut out = Vec::new();
        for (k, slot) in st.map(RecordKind::SignedPreKey) {
            let id = k.parse().map_err(|_| malformed("signed pre-key id"))?;
            out.push((id, self.value(RecordKind::SignedPreKey, k, slot)?));
        }
        out.sort_unstable_by_key(|(id, _)| *id);
        Ok(out)
    }

    async fn remove_signed_prekey(&self, id: u32) -> EResult<()> {
        let key = id.to_string();
        self.write(|_, st| {
            let exists = st.map(RecordKind::SignedPreKey).contains_key(key.as_str());
            Ok((if exists { vec![del(RecordKind::SignedPreKey, key.clone())] } else { Vec::new() }, ()))
        })
        .await
    }

    async fn put_sender_key(&self, address: &str, record: &[u8]) -> EResult<()> {
        self.write(|_, _| Ok((vec![put(RecordKind::SenderKey, address, record.to_vec())], ()))).await
    }

    async fn put_sender_keys_batch(&self, sender_keys: &[(Arc<str>, Bytes)]) -> EResult<()> {
        let changes = sender_keys.iter().map(|(a, r)| put(RecordKind::SenderKey, &**a, r.to_vec())).collect();
        self.write(|_, _| Ok((changes, ()))).await
    }

    async fn get_sender_key(&self, address: &str) -> EResult<Option<Vec<u8>>> {
        self.get(RecordKind::SenderKey, address).await
    }

    async fn delete_sender_key(&self, address: &str) -> EResult<()> {
        self.write(|_, st| {
            let exists = st.map(RecordKind::SenderKey).contains_key(address);
            Ok((if exists { vec![del(RecordKind::SenderKey, address)] } else { Vec::new() }, ()))
        })
        .await
    }
}

fn mac_key(name: &str, index_mac: &[u8]) -> String {
    format!("{}{}", lp(name), hex(index_mac))
}

#[async_trait]
impl AppSyncStore for EngineStore {
    async fn get_sync_key(&self, key_id: &[u8]) -> EResult<Option<AppStateSyncKey>> {
        match self.get(RecordKind::AppStateSyncKey, &hex(key_id)).await? {
            Some(v) => Ok(Some(decode_sync_key(&v).ok_or_else(|| malformed("app-state sync key"))?)),
            None => Ok(None),
        }
    }

    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> EResult<()> {
        let changes = vec![
            put(RecordKind::AppStateSyncKey, hex(key_id), encode_sync_key(&key)),
            put(RecordKind::Other, LATEST_SYNC_KEY, key_id.to_vec()),
        ];
        self.write(|_, _| Ok((changes, ()))).await
    }

    async fn get_version(&self, name: &str) -> EResult<HashState> {
        match self.get(RecordKind::AppStateVersion, name).await? {
            Some(v) => serde_json::from_slice(&v).map_err(ser),
            None => Ok(HashState::default()),
        }
    }

    async fn set_version(&self, name: &str, state: HashState) -> EResult<()> {
        let value = serde_json::to_vec(&state).map_err(ser)?;
        self.write(|_, _| Ok((vec![put(RecordKind::AppStateVersion, name, value)], ()))).await
    }

    async fn put_mutation_macs(&self, name: &str, _version: u64, mutations: &[AppStateMutationMAC]) -> EResult<()> {
        let changes = mutations
            .iter()
            .map(|m| put(RecordKind::AppStateMutationMac, mac_key(name, &m.index_mac), m.value_mac.clone()))
            .collect();
        self.write(|_, _| Ok((changes, ()))).await
    }

    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> EResult<Option<Vec<u8>>> {
        self.get(RecordKind::AppStateMutationMac, &mac_key(name, index_mac)).await
    }

    async fn get_mutation_macs(&self, name: &str, index_macs: &[[u8; 32]]) -> EResult<HashMap<[u8; 32], Vec<u8>>> {
        let st = self.state.read().await;
        let mut out = HashMap::with_capacity(index_macs.len());
        for im in index_macs {
            if let Some(v) = self.get_in(&st, RecordKind::AppStateMutationMac, &mac_key(name, im))? {
                out.insert(*im, v);
            }
        }
        Ok(out)
    }

    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> EResult<()> {
        self.write(|_, st| {
            let map = st.map(RecordKind::AppStateMutationMac);
            let changes = index_macs
                .iter()
                .map(|im| mac_key(name, im))
                .filter(|k| map.contains_key(k.as_str()))
                .map(|k| del(RecordKind::AppStateMutationMac, k))
                .collect();
            Ok((changes, ()))
        })
        .await
    }

    async fn clear_mutation_macs(&self, name: &str) -> EResult<()> {
        let prefix = lp(name);
        self.write(|_, st| {
            let changes = Self::keys_with_prefix(st, RecordKind::AppStateMutationMac, &prefix)
                .into_iter()
                .map(|k| del(RecordKind::AppStateMutationMac, k))
                .collect();
            Ok((changes, ()))
        })
        .await
    }

    async fn get_latest_sync_key_id(&self) -> EResult<Option<Vec<u8>>> {
        self.get(RecordKind::Other, LATEST_SYNC_KEY).await
    }
}

#[async_trait]
impl ProtocolStore for EngineStore {
    async fn get_sender_key_devices(&self, group_jid: &str) -> EResult<Vec<(String, bool)>> {
        let st = self.state.read().await;
        let prefix = lp(group_jid);
        Ok(self
            .scan_prefix(&st, RecordKind::SenderKeyDevice, &prefix)?
            .into_iter()
            .map(|(k, v)| (k[prefix.len()..].to_string(), v.first() == Some(&1)))
            .collect())
    }

    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> EResult<()> {
        let prefix = lp(group_jid);
        let changes = entries
            .iter()
            .map(|(dev, has)| put(RecordKind::SenderKeyDevice, format!("{prefix}{dev}"), vec![u8::from(*has)]))
            .collect();
        self.write(|_, _| Ok((changes, ()))).await
    }

    async fn clear_sender_key_devices(&self, group_jid: &str) -> EResult<()> {
        let prefix = lp(group_jid);
        self.write(|_, st| {
            let changes = Self::keys_with_prefix(st, RecordKind::SenderKeyDevice, &prefix)
                .into_iter()
                .map(|k| del(RecordKind::SenderKeyDevice, k))
                .collect();
            Ok((changes, ()))
        })
        .await
    }

    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> EResult<()> {
        if device_jids.is_empty() {
            return Ok(());
        }
        self.write(|_, st| {
            let changes = st
                .map(RecordKind::SenderKeyDevice)
                .keys()
                .filter(|k| split_lp(k).is_some_and(|(_, dev)| device_jids.contains(&dev)))
                .map(|k| del(RecordKind::SenderKeyDevice, k.to_string()))
                .collect();
            Ok((changes, ()))
        })
        .await
    }

    async fn clear_all_sender_key_devices(&self) -> EResult<()> {
        self.write(|_, st| {
            let changes = st
                .map(RecordKind::SenderKeyDevice)
                .keys()
                .map(|k| del(RecordKind::SenderKeyDevice, k.to_string()))
                .collect();
            Ok((changes, ()))
        })
        .await
    }

    async fn get_lid_mapping(&self, lid: &str) -> EResult<Option<LidPnMappingEntry>> {
        match self.get(RecordKind::LidMapping, lid).await? {
            Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(ser)?)),
            None => Ok(None),
        }
    }

    async fn get_pn_mapping(&self, phone: &str) -> EResult<Option<LidPnMappingEntry>> {
        let st = self.state.read().await;
        let Some(lid) = st.pn_to_lid.get(phone) else { return Ok(None) };
        match self.get_in(&st, RecordKind::LidMapping, lid)? {
            Some(v) => {
                let e: LidPnMappingEntry = serde_json::from_slice(&v).map_err(ser)?;
                // The LID may have moved to another phone since; then this phone has no current mapping.
                Ok((e.phone_number == phone).then_some(e))
            }
            None => Ok(None),
        }
    }

    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> EResult<()> {
        self.put_lid_mappings(std::slice::from_ref(entry)).await
    }

    async fn put_lid_mappings(&self, entries: &[LidPnMappingEntry]) -> EResult<()> {
        let changes = entries
            .iter()
            .map(|e| Ok(put(RecordKind::LidMapping, e.lid.clone(), serde_json::to_vec(e).map_err(ser)?)))
            .collect::<EResult<Vec<_>>>()?;
        self.write(|_, _| Ok((changes, ()))).await
    }

    async fn get_all_lid_mappings(&self) -> EResult<Vec<LidPnMappingEntry>> {
        let st = self.state.read().await;
        st.map(RecordKind::LidMapping)
            .iter()
            .map(|(k, slot)| serde_json::from_slice(&self.value(RecordKind::LidMapping, k, slot)?).map_err(ser))
            .collect()
    }

    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> EResult<()> {
        let key = format!("{}{message_id}", lp(address));
        self.write(|_, _| Ok((vec![put(RecordKind::BaseKey, key, base_key.to_vec())], ()))).await
    }

    async fn has_same_base_key(&self, address: &str, message_id: &str, current_base_key: &[u8]) -> EResult<bool> {
        let key = format!("{}{message_id}", lp(address));
        Ok(self.get(RecordKind::BaseKey, &key).await?.is_some_and(|v| v == current_base_key))
    }

    async fn delete_base_key(&self, address: &str, message_id: &str) -> EResult<()> {
        let key = format!("{}{message_id}", lp(address));
        self.write(|_, st| {
            let exists = st.map(RecordKind::BaseKey).contains_key(key.as_str());
            Ok((if exists { vec![del(RecordKind::BaseKey, key.clone())] } else { Vec::new() }, ()))
        })
        .await
    }

    async fn update_device_list(&self, record: DeviceListRecord) -> EResult<()> {
        self.update_device_lists(vec![record]).await
    }

    async fn update_device_lists(&self, records: Vec<DeviceListRecord>) -> EResult<()> {
        let changes = records
            .iter()
            .map(|r| Ok(put(RecordKind::DeviceList, r.user.clone(), serde_json::to_vec(r).map_err(ser)?)))
            .collect::<EResult<Vec<_>>>()?;
        self.write(|_, _| Ok((changes, ()))).await
    }

    async fn get_devices(&self, user: &str) -> EResult<Option<DeviceListRecord>> {
        match self.get(RecordKind::DeviceList, user).await? {
            Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(ser)?)),
            None => Ok(None),
        }
    }

    async fn delete_devices(&self, user: &str) -> EResult<()> {
        self.write(|_, st| {
            let exists = st.map(RecordKind::DeviceList).contains_key(user);
            Ok((if exists { vec![del(RecordKind::DeviceList, user)] } else { Vec::new() }, ()))
        })
        .await
    }

    async fn get_group_metadata(&self, group_jid: &str) -> EResult<Option<Vec<u8>>> {
        self.get(RecordKind::GroupMetadata, group_jid).await
    }

    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> EResult<()> {
        self.write(|_, _| Ok((vec![put(RecordKind::GroupMetadata, group_jid, blob.to_vec())], ()))).await
    }

    async fn delete_group_metadata(&self, group_jid: &str) -> EResult<()> {
        self.write(|_, st| {
            let exists = st.map(RecordKind::GroupMetadata).contains_key(group_jid);
            Ok((if exists { vec![del(RecordKind::GroupMetadata, group_jid)] } else { Vec::new() }, ()))
        })
        .await
    }

    async fn get_tc_token(&self, jid: &str) -> EResult<Option<TcTokenEntry>> {
        match self.get(RecordKind::TcToken, jid).await? {
            Some(v) => Ok(Some(decode_tc(&v).ok_or_else(|| malformed("tc token"))?)),
            None => Ok(None),
        }
    }

    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> EResult<()> {
        self.write(|_, _| Ok((vec![put(RecordKind::TcToken, jid, encode_tc(entry))], ()))).await
    }

    async fn delete_tc_token(&self, jid: &str) -> EResult<()> {
        self.write(|_, st| {
            let exists = st.map(RecordKind::TcToken).contains_key(jid);
            Ok((if exists { vec![del(RecordKind::TcToken, jid)] } else { Vec::new() }, ()))
        })
        .await
    }

    async fn get_all_tc_token_jids(&self) -> EResult<Vec<String>> {
        Ok(self.state.read().await.map(RecordKind::TcToken).keys().map(|k| k.to_string()).collect())
    }

    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> EResult<u32> {
        self.write(|this, st| {
            let mut changes = Vec::new();
            for (k, slot) in st.map(RecordKind::TcToken) {
                let e = decode_tc(&this.value(RecordKind::TcToken, k, slot)?).ok_or_else(|| malformed("tc token"))?;
                let token_live = !e.token.is_empty() && e.token_timestamp >= token_cutoff;
                let sender_live = e.sender_timestamp.is_some_and(|ts| ts >= sender_cutoff);
                if !token_live && !sender_live {
                    changes.push(del(RecordKind::TcToken, k.to_string()));
                }
            }
            let n = changes.len() as u32;
            Ok((changes, n))
        })
        .await
    }

    async fn touch_tc_token_sender_timestamp(&self, jid: &str, sender_timestamp: i64) -> EResult<()> {
        self.write(|this, st| {
            let entry = match this.get_in(st, RecordKind::TcToken, jid)? {
                Some(v) => {
                    let mut e = decode_tc(&v).ok_or_else(|| malformed("tc token"))?;
                    e.sender_timestamp = Some(e.sender_timestamp.map_or(sender_timestamp, |s| s.max(sender_timestamp)));
                    e
                }
                None => TcTokenEntry {
                    token: Vec::new(),
                    token_timestamp: sender_timestamp,
                    sender_timestamp: Some(sender_timestamp),
                },
            };
            Ok((vec![put(RecordKind::TcToken, jid, encode_tc(&entry))], ()))
        })
        .await
    }

    async fn store_received_tc_token(&self, jid: &str, token: &[u8], token_timestamp: i64) -> EResult<()> {
        self.write(|this, st| {
            let existing = match this.get_in(st, RecordKind::TcToken, jid)? {
                Some(v) => Some(decode_tc(&v).ok_or_else(|| malformed("tc token"))?),
                None => None,
            };
            if let Some(e) = &existing
                && !e.token.is_empty()
                && token_timestamp < e.token_timestamp
            {
                return Ok((Vec::new(), ()));
            }
            let entry = TcTokenEntry {
                token: token.to_vec(),
                token_timestamp,
                sender_timestamp: existing.and_then(|e| e.sender_timestamp),
            };
            Ok((vec![put(RecordKind::TcToken, jid, encode_tc(&entry))], ()))
        })
        .await
    }

    async fn store_sent_message(&self, chat_jid: &str, message_id: &str, payload: &[u8]) -> EResult<()> {
        let key = format!("{}{message_id}", lp(chat_jid));
        let now = whatsapp_rust::wacore::time::now_secs();
        self.write(|_, st| {
            let mut changes = Vec::new();
            let map = st.map(RecordKind::SentMessage);
            if map.len() >= MAX_SENT_MESSAGES && !map.contains_key(key.as_str()) {
                // Keep the store bounded: drop the oldest quarter (by when they were stored).
                let mut by_age: Vec<(i64, &str)> = map
                    .iter()
                    .map(|(k, slot)| {
                        let at = match slot {
                            Slot::Inline(b) => leading_i64(b),
                            Slot::Disk { meta, .. } => *meta,
                        };
                        (at, &**k)
                    })
                    .collect();
                let drop_n = map.len() - MAX_SENT_MESSAGES * 3 / 4;
                by_age.select_nth_unstable(drop_n - 1);
                changes.extend(by_age[..drop_n].iter().map(|(_, k)| del(RecordKind::SentMessage, *k)));
            }
            changes.push(put(RecordKind::SentMessage, key.clone(), with_i64(now, payload)));
            Ok((changes, ()))
        })
        .await
    }

    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> EResult<Option<Vec<u8>>> {
        let key = format!("{}{message_id}", lp(chat_jid));
        self.write(|this, st| match this.get_in(st, RecordKind::SentMessage, &key)? {
            Some(v) => {
                Ok((vec![del(RecordKind::SentMessage, key.clone())], Some(v.get(8..).unwrap_or_default().to_vec())))
            }
            None => Ok((Vec::new(), None)),
        })
        .await
    }

    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> EResult<u32> {
        self.delete_older(RecordKind::SentMessage, |at| at < cutoff_timestamp).await
    }

    async fn store_pending_inbound(&self, chat: &str, sender: &str, id: &str, message: &[u8]) -> EResult<()> {
        self.store_pending_inbound_batch(&[PendingInboundRow { chat, sender, id, message }]).await
    }

    async fn get_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> EResult<Option<Vec<u8>>> {
        let key = format!("{}{}{id}", lp(chat), lp(sender));
        Ok(self.get(RecordKind::PendingInbound, &key).await?.map(|v| v.get(8..).unwrap_or_default().to_vec()))
    }

    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> EResult<()> {
        self.delete_pending_inbound_batch(&[PendingInboundKey { chat, sender, id }]).await
    }

    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> EResult<u32> {
        self.delete_older(RecordKind::PendingInbound, |at| at < cutoff_timestamp).await
    }

    async fn store_pending_inbound_batch(&self, rows: &[PendingInboundRow<'_>]) -> EResult<()> {
        let now = whatsapp_rust::wacore::time::now_secs();
        let changes = rows
            .iter()
            .map(|r| {
                put(
                    RecordKind::PendingInbound,
                    format!("{}{}{}", lp(r.chat), lp(r.sender), r.id),
                    with_i64(now, r.message),
                )
            })
            .collect();
        self.write(|_, _| Ok((changes, ()))).await
    }

    async fn delete_pending_inbound_batch(&self, keys: &[PendingInboundKey<'_>]) -> EResult<()> {
        self.write(|_, st| {
            let map = st.map(RecordKind::PendingInbound);
            let changes = keys
                .iter()
                .map(|k| format!("{}{}{}", lp(k.chat), lp(k.sender), k.id))
                .filter(|k| map.contains_key(k.as_str()))
                .map(|k| del(RecordKind::PendingInbound, k))
                .collect();
            Ok((changes, ()))
        })
        .await
    }
}

impl EngineStore {
    /// Deletes the records of `kind` whose leading timestamp `expired` says so; returns how many.
    async fn delete_older(&self, kind: RecordKind, expired: impl Fn(i64) -> bool) -> EResult<u32> {
        self.write(|_, st| {
            let changes: Vec<RecordChange> = st
                .map(kind)
                .iter()
                .filter(|(_, slot)| {
                    expired(match slot {
                        Slot::Inline(b) => leading_i64(b),
                        Slot::Disk { meta, .. } => *meta,
                    })
                })
                .map(|(k, _)| del(kind, k.to_string()))
                .collect();
            let n = changes.len() as u32;
            Ok((changes, n))
        })
        .await
    }
}

fn secret_key(chat: &str, sender: &str, msg_id: &str) -> String {
    format!("{}{}{msg_id}", lp(chat), lp(sender))
}

#[async_trait]
impl MsgSecretStore for EngineStore {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> EResult<usize> {
        let stored = entries.len();
        self.write(|this, st| {
            // Merge with what is stored (and with earlier rows of this batch): a later deadline and a known
            // parent time are never lost to a redelivery.
            let mut merged: BTreeMap<String, (i64, i64, Vec<u8>)> = BTreeMap::new();
            for e in &entries {
                let key = secret_key(&e.chat, &e.sender, &e.msg_id);
                let prior = match merged.get(&key) {
                    Some((x, t, _)) => Some((*x, *t)),
                    None => match this.get_in(st, RecordKind::MsgSecret, &key)? {
                        Some(v) => decode_secret(&v).map(|(x, t, _)| (x, t)),
                        None => None,
                    },
                };
                let (expires, ts) = match prior {
                    Some((x, t)) => {
                        (merge_msg_secret_expiry(x, e.expires_at), merge_msg_secret_message_ts(t, e.message_ts))
                    }
                    None => (e.expires_at, e.message_ts),
                };
                merged.insert(key, (expires, ts, e.secret.to_vec()));
            }
            let changes = merged
                .into_iter()
                .map(|(k, (x, t, s))| put(RecordKind::MsgSecret, k, encode_secret(x, t, &s)))
                .collect();
            Ok((changes, stored))
        })
        .await
    }

    async fn get_msg_secret(&self, chat: &str, sender: &str, msg_id: &str) -> EResult<Option<Vec<u8>>> {
        Ok(self.get_msg_secret_with_ts(chat, sender, msg_id).await?.map(|(s, _)| s))
    }

    async fn get_msg_secret_with_ts(&self, chat: &str, sender: &str, msg_id: &str) -> EResult<Option<(Vec<u8>, i64)>> {
        match self.get(RecordKind::MsgSecret, &secret_key(chat, sender, msg_id)).await? {
            Some(v) => {
                let (_, ts, secret) = decode_secret(&v).ok_or_else(|| malformed("message secret"))?;
                Ok(Some((secret.to_vec(), ts)))
            }
            None => Ok(None),
        }
    }

    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> EResult<u32> {
        self.delete_older(RecordKind::MsgSecret, |expires| expires != 0 && expires <= cutoff_timestamp).await
    }
}

#[async_trait]
impl DeviceStore for EngineStore {
    async fn save(&self, device: &Device) -> EResult<()> {
        let bytes = device_to_bytes(device)?;
        let fp = fingerprint(&bytes);
        if *self.device_fp.lock().expect("device fingerprint") == Some(fp) {
            return Ok(());
        }
        self.write(|_, _| Ok((vec![put(RecordKind::Device, wakeeper_shared::domain::DEVICE_KEY, bytes)], ()))).await?;
        *self.device_fp.lock().expect("device fingerprint") = Some(fp);
        Ok(())
    }

    async fn load(&self) -> EResult<Option<Device>> {
        match self.get(RecordKind::Device, wakeeper_shared::domain::DEVICE_KEY).await? {
            Some(v) => {
                let device = device_from_bytes(&v)?;
                *self.device_fp.lock().expect("device fingerprint") = Some(fingerprint(&v));
                Ok(Some(device))
            }
            None => Ok(None),
        }
    }

    async fn exists(&self) -> EResult<bool> {
        Ok(self.contains(RecordKind::Device, wakeeper_shared::domain::DEVICE_KEY).await)
    }

    async fn create(&self) -> EResult<i32> {
        if !self.exists().await? {
            self.save(&Device::new()).await?;
        }
        Ok(1)
    }

    async fn resource_report(&self) -> StorageResourceReport {
        StorageResourceReport {
            memory_bytes: Some(self.state.read().await.approx_bytes()),
            pages: None,
            io_read_bytes: None,
            io_write_bytes: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_keys_are_unambiguous_and_prefixed() {
        assert_eq!(split_lp(&format!("{}{}", lp("a.b"), "c")), Some(("a.b", "c")));
        assert_ne!(format!("{}{}", lp("ab"), "c"), format!("{}{}", lp("a"), "bc"));
        assert!(mac_key("regular", &[1, 2]).starts_with(&lp("regular")));
        assert!(!mac_key("regular_low", &[1]).starts_with(&lp("regular")));
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }

    #[test]
    fn small_encodings_round_trip() {
        let k = AppStateSyncKey { key_data: vec![1; 32], fingerprint: vec![2; 9], timestamp: -5 };
        let back = decode_sync_key(&encode_sync_key(&k)).unwrap();
        assert_eq!((back.key_data, back.fingerprint, back.timestamp), (k.key_data, k.fingerprint, k.timestamp));
        for sender in [None, Some(77)] {
            let t = TcTokenEntry { token: vec![3; 20], token_timestamp: 9, sender_timestamp: sender };
            let back = decode_tc(&encode_tc(&t)).unwrap();
            assert_eq!((back.token, back.token_timestamp, back.sender_timestamp), (t.token, 9, sender));
        }
        assert_eq!(decode_secret(&encode_secret(5, 6, &[7; 32])), Some((5, 6, &[7u8; 32][..])));
    }
}
