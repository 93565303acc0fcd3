//! The engine's storage: whatsapp-rust's `Backend` over one tenant's local working copy.
//!
//! Every engine call maps to records of wakeeper's own snapshot format ([`RecordKind`] + key, see [`codec`]), so
//! the same state can be hydrated, replicated, exported and audited without the engine. Writes are appended to
//! the working copy's journal and fdatasynced before the call returns (the engine's counter reservations rely on
//! this: it writes a session or sender key with a raised reservation and only then sends ciphertext); then the
//! same changes go to the replicator. A batch method is one journal append; read-modify-write methods
//! (`take_sent_message`, the tc-token merges, message-secret merges) run under the store's write lock, so they
//! are atomic with respect to every other write.
//!
//! Memory: an idle restored session should cost little, so values above [`INLINE_MAX`] bytes stay on disk and
//! only their location (12 bytes) is kept; pre-keys (hundreds per device, read once each) keep only an id and
//! a location. Cold values are read back on demand from the page cache.
//!
//! # Layout
//! - [`codec`]: how records are keyed and encoded (shared with the import).
//! - `view`: the in-memory view of the records.
//! - this file: opening the store, reads, and the one durable write path (append, apply, replicate, compact).
//! - `signal_store`, `app_sync_store`, `protocol_store`, `msg_secret_store`, `device_store`: one engine trait
//!   each.

pub(crate) mod codec;

mod app_sync_store;
mod device_store;
mod msg_secret_store;
mod protocol_store;
mod signal_store;
mod view;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, RwLock, RwLockWriteGuard};
use tracing::{debug, warn};
use wakeeper_shared::domain::{RecordChange, RecordKey, RecordKind, TenantId};
use wakeeper_shared::local::{RecordReader, WorkingCopy, WorkingCopyError};
use whatsapp_rust::wacore::store::error::{Result as EResult, StoreError as EStoreError};

use crate::replicator::Replica;
use codec::delete_change;
use view::{Slot, State};

/// Values up to this many bytes are kept in memory; longer ones are read from disk when asked for.
pub const INLINE_MAX: usize = 48;
/// Sent messages kept for retry receipts; the oldest beyond this are dropped (the engine also prunes by age).
pub const MAX_SENT_MESSAGES: usize = 4096;

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

fn database_error(e: impl Into<EngineStoreError>) -> EStoreError {
    EStoreError::Database(Box::new(e.into()))
}

fn serialization_error(e: serde_json::Error) -> EStoreError {
    EStoreError::Serialization(Box::new(e))
}

fn malformed(what: &'static str) -> EStoreError {
    database_error(EngineStoreError::Malformed(what))
}

/// A change that writes `value` as JSON.
fn json_change<T: Serialize>(kind: RecordKind, key: impl Into<String>, value: &T) -> EResult<RecordChange> {
    Ok(codec::put_change(kind, key, serde_json::to_vec(value).map_err(serialization_error)?))
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

/// Journal appends and compactions since open.
#[derive(Debug, Default, Clone, Copy)]
struct WriteCounts {
    appends: u64,
    compactions: u64,
}

/// whatsapp-rust's `Backend` for one tenant: in-memory index, durable working copy, replication.
pub struct EngineStore {
    tenant: TenantId,
    /// Serialises writers; held across the durable append so read-modify-writes are atomic.
    write_lock: Mutex<()>,
    /// The in-memory view; readers hold it (shared) while reading a value from disk, a compaction holds it
    /// (exclusive) while moving the files, so no reader ever follows a stale location.
    state: RwLock<State>,
    working_copy: Arc<StdMutex<WorkingCopy>>,
    reader: RecordReader,
    replica: Replica,
    /// Fingerprint of the last device record written, to skip saves that change nothing.
    device_fingerprint: StdMutex<Option<u64>>,
    counts: StdMutex<WriteCounts>,
    /// The working copy's generation, readable without waiting for a writer's fsync.
    generation: AtomicU64,
}

impl std::fmt::Debug for EngineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineStore").field("tenant", &self.tenant).finish_non_exhaustive()
    }
}

impl EngineStore {
    /// Loads the tenant's working copy into memory and links it to the replicator. Blocking (reads and decrypts
    /// the copy once); call from `spawn_blocking` or before the runtime gets busy. A missing copy is fine (a
    /// device to be paired); a corrupt one is an error.
    pub fn open(wc: WorkingCopy, replica: Replica) -> Result<Arc<Self>, EngineStoreError> {
        let state = State::scan(&wc)?;
        let reader = wc.reader();
        let tenant = wc.tenant().clone();
        let generation = AtomicU64::new(wc.generation().unwrap_or(0));
        debug!(%tenant, generation = ?wc.generation(), "engine store opened");
        Ok(Arc::new(Self {
            tenant,
            write_lock: Mutex::new(()),
            state: RwLock::new(state),
            working_copy: Arc::new(StdMutex::new(wc)),
            reader,
            replica,
            device_fingerprint: StdMutex::new(None),
            counts: StdMutex::new(WriteCounts::default()),
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
        let counts = *self.counts.lock().expect("counters");
        EngineStoreStats {
            generation: self.generation.load(Ordering::SeqCst),
            appends: counts.appends,
            compactions: counts.compactions,
            records: st.records(),
            memory_bytes: st.approx_bytes(),
        }
    }

    /// Reads a slot's value (from memory or disk).
    fn value(&self, kind: RecordKind, key: &str, slot: &Slot) -> EResult<Vec<u8>> {
        match slot {
            Slot::Inline(b) => Ok(b.to_vec()),
            Slot::Disk { loc, .. } => self
                .reader
                .read(*loc, &RecordKey::new(kind, key))
                .map_err(database_error)?
                .ok_or_else(|| malformed("deleted")),
        }
    }

    fn get_in(&self, st: &State, kind: RecordKind, key: &str) -> EResult<Option<Vec<u8>>> {
        st.map(kind).get(key).map(|slot| self.value(kind, key, slot)).transpose()
    }

    async fn get(&self, kind: RecordKind, key: &str) -> EResult<Option<Vec<u8>>> {
        let st = self.state.read().await;
        self.get_in(&st, kind, key)
    }

    /// A record stored as JSON.
    async fn get_json<T: DeserializeOwned>(&self, kind: RecordKind, key: &str) -> EResult<Option<T>> {
        match self.get(kind, key).await? {
            Some(v) => Ok(Some(serde_json::from_slice(&v).map_err(serialization_error)?)),
            None => Ok(None),
        }
    }

    async fn contains(&self, kind: RecordKind, key: &str) -> bool {
        self.state.read().await.map(kind).contains_key(key)
    }

    /// Values of every record of `kind` whose key starts with `prefix`.
    fn scan_prefix(&self, st: &State, kind: RecordKind, prefix: &str) -> EResult<Vec<(String, Vec<u8>)>> {
        st.with_prefix(kind, prefix).map(|(k, slot)| Ok((k.to_string(), self.value(kind, k, slot)?))).collect()
    }

    /// Writes `changes` as one durable append.
    async fn write_changes(&self, changes: Vec<RecordChange>) -> EResult<()> {
        self.write(|_, _| Ok((changes, ()))).await
    }

    /// Deletes one record if it is held (deleting nothing writes nothing).
    async fn delete_if_present(&self, kind: RecordKind, key: &str) -> EResult<()> {
        self.delete_those_present(kind, vec![key.to_owned()]).await
    }

    /// Deletes those of `keys` that are held.
    async fn delete_those_present(&self, kind: RecordKind, keys: Vec<String>) -> EResult<()> {
        self.write(|_, st| {
            let held = st.map(kind);
            let changes =
                keys.into_iter().filter(|k| held.contains_key(k.as_str())).map(|k| delete_change(kind, k)).collect();
            Ok((changes, ()))
        })
        .await
    }

    /// Deletes every record of `kind` whose key starts with `prefix`.
    async fn delete_with_prefix(&self, kind: RecordKind, prefix: &str) -> EResult<()> {
        self.write(|_, st| {
            let changes = st.with_prefix(kind, prefix).map(|(k, _)| delete_change(kind, k.to_string())).collect();
            Ok((changes, ()))
        })
        .await
    }

    /// Deletes the records of `kind` whose leading timestamp `expired` says so; returns how many.
    async fn delete_older(&self, kind: RecordKind, expired: impl Fn(i64) -> bool) -> EResult<u32> {
        self.write(|_, st| {
            let changes: Vec<RecordChange> = st
                .map(kind)
                .iter()
                .filter(|(_, slot)| expired(slot.timestamp()))
                .map(|(k, _)| delete_change(kind, k.to_string()))
                .collect();
            let n = changes.len() as u32;
            Ok((changes, n))
        })
        .await
    }

    /// Runs a write: `plan` sees the current state and lists the changes (under the write lock, so a
    /// read-modify-write is atomic); the changes are appended durably, applied to memory and replicated.
    async fn write<R>(&self, plan: impl FnOnce(&Self, &State) -> EResult<(Vec<RecordChange>, R)>) -> EResult<R> {
        let _writer = self.write_lock.lock().await;
        if self.replica.is_fenced() {
            return Err(database_error(EngineStoreError::Fenced));
        }
        let (changes, result) = {
            let st = self.state.read().await;
            plan(self, &st)?
        };
        if changes.is_empty() {
            return Ok(result);
        }
        let working_copy = self.working_copy.clone();
        let (changes, outcome) = tokio::task::spawn_blocking(move || {
            let mut wc = working_copy.lock().expect("working copy");
            let before = wc.generation().unwrap_or(0);
            let outcome = wc.append_located(&changes).map(|(after, locs)| (before, after, locs, wc.needs_compaction()));
            (changes, outcome)
        })
        .await
        .map_err(|e| database_error(EngineStoreError::Task(e.to_string())))?;
        let (from, to, locs, compact) = outcome.map_err(database_error)?;

        let mut st = self.state.write().await;
        let replicated = changes.clone();
        for (change, loc) in changes.into_iter().zip(locs) {
            st.apply(&change.key, change.value, loc);
        }
        self.generation.store(to, Ordering::SeqCst);
        self.replica.submit(from, to, replicated);
        self.counts.lock().expect("counters").appends += 1;
        if compact {
            self.compact(st).await?;
        }
        Ok(result)
    }

    /// Folds the journal into a new base and rebuilds the view (every location moves), holding the view
    /// exclusively so no reader follows an old location. A compaction a full disk cuts short is no failure of
    /// the write before it (that is durable already): the copy stays consistent, the view is rebuilt from
    /// whatever base is live now, and the next write tries again.
    async fn compact(&self, mut st: RwLockWriteGuard<'_, State>) -> EResult<()> {
        let working_copy = self.working_copy.clone();
        let (compacted, fresh) = tokio::task::spawn_blocking(move || {
            let mut wc = working_copy.lock().expect("working copy");
            let compacted = wc.compact();
            (compacted, State::scan(&wc))
        })
        .await
        .map_err(|e| database_error(EngineStoreError::Task(e.to_string())))?;
        *st = fresh.map_err(database_error)?;
        match compacted {
            Ok(()) => {
                self.counts.lock().expect("counters").compactions += 1;
                debug!(tenant = %self.tenant, "engine store compacted");
            }
            Err(e) => warn!(tenant = %self.tenant, error = %e, "working copy compaction failed; kept the journal"),
        }
        Ok(())
    }
}
