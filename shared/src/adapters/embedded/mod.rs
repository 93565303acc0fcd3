//! The embedded default: credentials and tenants in one redb file under the data dir, no server.
//!
//! One machine, one process: this is what wakeeper runs on when nothing else is configured, so it must be
//! as safe as the cloud stores (atomic batches, fencing, compare-and-set leases) while costing nothing to run.
//!
//! # Data layout (`<data_dir>/store.redb`)
//! | table                    | key                            | value                                         |
//! |--------------------------|--------------------------------|-----------------------------------------------|
//! | `credentials`            | `(tenant, kind, key)` strings  | sealed record: `nonce ‖ ciphertext ‖ tag`     |
//! | `credential_generations` | tenant                         | `u64` generation; present iff credentials are |
//! | `credential_epochs`      | tenant                         | `u64` newest accepted epoch (kept on delete)  |
//! | `tenants`                | tenant                         | JSON [`TenantRecord`]                         |
//! | `desired_tenants`        | tenant                         | `()`: index of records with the desired flag  |
//!
//! `kind` is the record kind's wire name ([`RecordKind::as_str`]). Records are sealed with the tenant, kind and
//! key as associated data, so a value moved to another row does not decrypt. Tuple keys sort by tenant first,
//! so one tenant's snapshot is a single range scan. The epoch fence survives a delete so a fenced-off host
//! cannot resurrect a logged-out tenant's credentials.
//!
//! Every operation runs on the blocking pool. Reads are one redb read transaction each. Writes are grouped:
//! every write that arrives while a group is being committed waits for the next group, and a group is one
//! redb write transaction whose operations run one after the other and whose commit (an fsync) acknowledges
//! them all (group commit). A restore of a thousand tenants takes a thousand leases; one fsync per lease,
//! serialised by redb's single writer, was the largest part of its time. Operations still see each other's
//! writes in order, so the read-check-write of fencing and leases stays a compare-and-set, and nothing is
//! acknowledged before the transaction holding it is durable.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction};

use crate::disk::{DiskWatch, RedbFile};
use tracing::warn;

use crate::crypto::Cipher;
use crate::domain::{
    ChangeBatch, CredentialSnapshot, Lease, MAX_RECORD_KEY_LEN, MAX_RECORD_VALUE_LEN, MAX_WRITES_PER_COMMIT, RecordKey,
    RecordKind, StatusUpdate, TenantId, TenantRecord, TenantStatus, UnixMillis,
};
use crate::ports::{Conflict, CredentialStore, Page, StoreError, StoredAt, TenantStore};

/// The file name of the store inside the data dir.
pub const STORE_FILE: &str = "store.redb";

const CREDENTIALS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("credentials");
const GENERATIONS: TableDefinition<&str, u64> = TableDefinition::new("credential_generations");
const EPOCHS: TableDefinition<&str, u64> = TableDefinition::new("credential_epochs");
/// The epoch of the writer of each tenant's stored generation: a batch of that epoch whose generation is not
/// above the stored one is that writer's retry. Absent (data written before it existed): older than any epoch.
const WRITE_EPOCHS: TableDefinition<&str, u64> = TableDefinition::new("credential_write_epochs");
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const DESIRED: TableDefinition<&str, ()> = TableDefinition::new("desired_tenants");

/// Both stores of one machine in one redb database file. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// Reopened in place when its disk takes writes again after a fault.
    db: Arc<RedbFile>,
    cipher: Cipher,
    path: PathBuf,
    /// Writes waiting for the next group commit.
    pending: Mutex<Vec<Box<dyn GroupWrite>>>,
    /// Held while a group is committed: writes arriving meanwhile gather in `pending`.
    committer: tokio::sync::Mutex<()>,
}

/// One write of a group commit.
trait GroupWrite: Send {
    /// Runs the write in the group's transaction. `Ok(true)` when it changed something. An `Err` is a failure
    /// of the store itself and aborts the whole group; a write that refuses (a conflict, a corrupt row) keeps
    /// its error as its own result and must not have changed anything.
    fn apply(&mut self, txn: &WriteTransaction) -> Result<bool, StoreError>;
    /// Hands the write its result: its own when the group committed, the group's error otherwise.
    fn finish(self: Box<Self>, group: Result<(), &StoreError>);
}

/// A write operation and the caller waiting for its result.
struct Pending<T, F> {
    op: Option<F>,
    result: Option<Result<T, StoreError>>,
    reply: tokio::sync::oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> GroupWrite for Pending<T, F>
where
    T: Send,
    F: FnOnce(&WriteTransaction) -> Result<(T, bool), StoreError> + Send,
{
    fn apply(&mut self, txn: &WriteTransaction) -> Result<bool, StoreError> {
        let op = self.op.take().expect("a write is applied once");
        match op(txn) {
            Ok((value, wrote)) => {
                self.result = Some(Ok(value));
                Ok(wrote)
            }
            Err(e @ StoreError::Unavailable(_)) => Err(e),
            Err(refused) => {
                self.result = Some(Err(refused));
                Ok(false)
            }
        }
    }

    fn finish(self: Box<Self>, group: Result<(), &StoreError>) {
        let result = match group {
            Ok(()) => {
                self.result.unwrap_or_else(|| Err(StoreError::Unavailable("embedded store: write not run".into())))
            }
            Err(StoreError::Unavailable(why)) => Err(StoreError::Unavailable(why.clone())),
            Err(other) => Err(StoreError::Unavailable(other.to_string())),
        };
        // The caller may have gone away; the write is durable (or not) either way.
        let _ = self.reply.send(result);
    }
}

/// Runs one group in one write transaction and answers every write in it.
fn commit_group(file: &RedbFile, mut group: Vec<Box<dyn GroupWrite>>) {
    let outcome = (|| {
        let db = file.get().map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        let mut wrote = false;
        for write in &mut group {
            // `?` drops the transaction, which aborts everything the group wrote so far.
            wrote |= write.apply(&txn)?;
        }
        if wrote { txn.commit().map_err(db_err) } else { txn.abort().map_err(db_err) }
    })();
    if let Err(e) = &outcome {
        // Not durable: reported, so the host sees a disk fault and not only this write's refusal.
        file.failed("committing a write", e);
    }
    for write in group {
        write.finish(outcome.as_ref().map(|_| ()));
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

/// Creates every table up front so read transactions never meet a missing one.
fn create_tables(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(CREDENTIALS)?;
    txn.open_table(GENERATIONS)?;
    txn.open_table(EPOCHS)?;
    txn.open_table(TENANTS)?;
    txn.open_table(DESIRED)?;
    txn.commit()?;
    Ok(())
}

/// A redb failure is an outage of the local store, never a verdict on a tenant's data.
fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Unavailable(format!("embedded store: {}", e.into()))
}

/// A record value ready to be written: the sealed value, or `None` to delete.
struct SealedChange {
    kind: RecordKind,
    key: String,
    sealed: Option<Vec<u8>>,
}

impl EmbeddedStore {
    /// Opens (creating when absent) the store file at `path`, e.g. `<data_dir>/store.redb`. The parent
    /// directory is created 0700 and the file is made 0600: the tenant table is not encrypted.
    pub fn open(path: impl AsRef<Path>, cipher: Cipher) -> Result<Self, StoreError> {
        Self::open_watched(path, cipher, DiskWatch::new())
    }

    /// [`EmbeddedStore::open`], reporting every failed read or commit to `disk` as a fault of the file, and
    /// registered there to be reopened in place once the disk takes writes again.
    pub fn open_watched(path: impl AsRef<Path>, cipher: Cipher, disk: DiskWatch) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        crate::private_files::refuse_symlink(&path).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(dir).map_err(|e| StoreError::Unavailable(format!("creating {}: {e}", dir.display())))?;
        }
        let db = RedbFile::open(&path, create_tables, disk).map_err(db_err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| StoreError::Unavailable(format!("restricting {}: {e}", path.display())))?;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                cipher,
                path,
                pending: Mutex::new(Vec::new()),
                committer: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Closes the store file and opens it again, as the host does once its disk takes writes after a fault
    /// (redb answers every call after one failed write with an error until then).
    pub fn reopen(&self) -> Result<(), StoreError> {
        self.inner.db.reopen().map_err(db_err)
    }

    /// The store file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the blocking pool: redb calls do file I/O and may wait on the write lock.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let result = f(&inner);
            if let Err(e @ StoreError::Unavailable(_)) = &result {
                inner.db.failed("reading", e);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("embedded store task failed: {e}")))?
    }

    /// Runs `op` in a write transaction shared with the writes that arrive while another group commits (see
    /// the module docs) and returns its result once that transaction is durable. `op` returns its value and
    /// whether it changed anything; it may refuse with any error but `Unavailable` only before writing.
    async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&WriteTransaction) -> Result<(T, bool), StoreError> + Send + 'static,
    {
        let (reply, result) = tokio::sync::oneshot::channel();
        self.inner.pending.lock().unwrap_or_else(PoisonError::into_inner).push(Box::new(Pending {
            op: Some(op),
            result: None,
            reply,
        }));
        {
            // Whoever gets the turn commits everything pending, its own write included unless an earlier
            // turn took it already.
            let _turn = self.inner.committer.lock().await;
            let group = std::mem::take(&mut *self.inner.pending.lock().unwrap_or_else(PoisonError::into_inner));
            if !group.is_empty() {
                let inner = Arc::clone(&self.inner);
                // A panic drops the group's reply senders; their callers see the failure below.
                let _ = tokio::task::spawn_blocking(move || commit_group(&inner.db, group)).await;
            }
        }
        result.await.map_err(|_| StoreError::Unavailable("embedded store task failed".into()))?
    }

    fn seal_changes<'a>(
        &self,
        tenant: &TenantId,
        changes: impl Iterator<Item = (&'a RecordKey, Option<&'a [u8]>)>,
    ) -> Result<Vec<SealedChange>, StoreError> {
        changes
            .map(|(key, value)| {
                if key.key.len() > MAX_RECORD_KEY_LEN {
                    return Err(StoreError::Invalid(format!(
                        "a {} record key is longer than {MAX_RECORD_KEY_LEN} bytes",
                        key.kind.as_str()
                    )));
                }
                if let Some(v) = value.filter(|v| v.len() > MAX_RECORD_VALUE_LEN) {
                    return Err(StoreError::Invalid(format!(
                        "a {} record of {} bytes is longer than the {MAX_RECORD_VALUE_LEN} bytes a record may hold",
                        key.kind.as_str(),
                        v.len()
                    )));
                }
                Ok(SealedChange {
                    kind: key.kind,
                    key: key.key.clone(),
                    sealed: value.map(|v| self.inner.cipher.seal(tenant, key, v)),
                })
            })
            .collect()
    }

    /// Applies one tenant-table change in one write transaction. `f` sees the stored record (if any) and
    /// returns the record to write (`None`: write nothing) and the caller's result; an error aborts.
    async fn update_tenant<T, F>(&self, tenant: &TenantId, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Option<TenantRecord>) -> Result<(Option<TenantRecord>, T), StoreError> + Send + 'static,
    {
        let tenant = tenant.clone();
        self.write(move |txn| {
            let mut tenants = txn.open_table(TENANTS).map_err(db_err)?;
            let stored = match tenants.get(tenant.as_str()).map_err(db_err)? {
                Some(v) => Some(decode_tenant(&tenant, v.value())?),
                None => None,
            };
            let (write, result) = f(stored)?;
            let Some(record) = write else { return Ok((result, false)) };
            let mut desired = txn.open_table(DESIRED).map_err(db_err)?;
            put_tenant(&mut tenants, &mut desired, &record)?;
            Ok((result, true))
        })
        .await
    }
}

#[cfg(any(test, feature = "contract-tests"))]
mod contract_hooks;
mod credentials;
mod tenants;

use tenants::*;
