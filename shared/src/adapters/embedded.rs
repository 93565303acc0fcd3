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
use tracing::warn;

use crate::crypto::Cipher;
use crate::domain::{
    ChangeBatch, CredentialSnapshot, Lease, MAX_RECORD_KEY_LEN, MAX_WRITES_PER_COMMIT, RecordKey, RecordKind,
    StatusUpdate, TenantId, TenantRecord, TenantStatus, UnixMillis,
};
use crate::ports::{Conflict, CredentialStore, Page, StoreError, TenantStore};

/// The file name of the store inside the data dir.
pub const STORE_FILE: &str = "store.redb";

const CREDENTIALS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("credentials");
const GENERATIONS: TableDefinition<&str, u64> = TableDefinition::new("credential_generations");
const EPOCHS: TableDefinition<&str, u64> = TableDefinition::new("credential_epochs");
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const DESIRED: TableDefinition<&str, ()> = TableDefinition::new("desired_tenants");

/// Both stores of one machine in one redb database file. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
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
fn commit_group(db: &Database, mut group: Vec<Box<dyn GroupWrite>>) {
    let outcome = (|| {
        let txn = db.begin_write().map_err(db_err)?;
        let mut wrote = false;
        for write in &mut group {
            // `?` drops the transaction, which aborts everything the group wrote so far.
            wrote |= write.apply(&txn)?;
        }
        if wrote { txn.commit().map_err(db_err) } else { txn.abort().map_err(db_err) }
    })();
    for write in group {
        write.finish(outcome.as_ref().map(|_| ()));
    }
}

impl fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmbeddedStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
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
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(dir).map_err(|e| StoreError::Unavailable(format!("creating {}: {e}", dir.display())))?;
        }
        let db = Database::create(&path).map_err(db_err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| StoreError::Unavailable(format!("restricting {}: {e}", path.display())))?;
        }
        // Create every table up front so read transactions never meet a missing one.
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(CREDENTIALS).map_err(db_err)?;
        txn.open_table(GENERATIONS).map_err(db_err)?;
        txn.open_table(EPOCHS).map_err(db_err)?;
        txn.open_table(TENANTS).map_err(db_err)?;
        txn.open_table(DESIRED).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
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
        tokio::task::spawn_blocking(move || f(&inner))
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

/// The key range holding every record of `tenant`. Tenant ids never contain NUL, so nothing sorts between
/// `tenant` and `tenant + "\0"` except `tenant` itself.
fn tenant_bounds(tenant: &TenantId) -> (String, String) {
    (tenant.as_str().to_owned(), format!("{}\0", tenant.as_str()))
}

fn read_snapshot(inner: &Inner, tenant: &TenantId) -> Result<CredentialSnapshot, StoreError> {
    let txn = inner.db.begin_read().map_err(db_err)?;
    let generations = txn.open_table(GENERATIONS).map_err(db_err)?;
    let Some(generation) = generations.get(tenant.as_str()).map_err(db_err)?.map(|g| g.value()) else {
        return Err(StoreError::NotFound);
    };
    let credentials = txn.open_table(CREDENTIALS).map_err(db_err)?;
    let (lo, hi) = tenant_bounds(tenant);
    let mut records = BTreeMap::new();
    for entry in credentials.range((lo.as_str(), "", "")..(hi.as_str(), "", "")).map_err(db_err)? {
        let (k, v) = entry.map_err(db_err)?;
        let (_, kind, key) = k.value();
        let kind = RecordKind::parse(kind)
            .ok_or_else(|| StoreError::Corrupt("a stored credential record has an unknown kind".into()))?;
        let record_key = RecordKey::new(kind, key);
        let plain = inner.cipher.open(tenant, &record_key, v.value()).map_err(|_| {
            StoreError::Corrupt(format!("stored {} record does not decrypt (altered or moved)", kind.as_str()))
        })?;
        records.insert(record_key, plain);
    }
    Ok(CredentialSnapshot { generation, records })
}

/// Refuses `epoch` if the tenant's fence is newer; otherwise returns the fence.
fn check_fence(txn: &WriteTransaction, tenant: &TenantId, epoch: u64) -> Result<u64, StoreError> {
    let epochs = txn.open_table(EPOCHS).map_err(db_err)?;
    let current = epochs.get(tenant.as_str()).map_err(db_err)?.map_or(0, |e| e.value());
    if epoch < current {
        return Err(StoreError::Conflict(Conflict::StaleEpoch { presented: epoch, current }));
    }
    Ok(current)
}

fn advance_fence(txn: &WriteTransaction, tenant: &TenantId, epoch: u64, current: u64) -> Result<(), StoreError> {
    if epoch > current {
        txn.open_table(EPOCHS).map_err(db_err)?.insert(tenant.as_str(), epoch).map_err(db_err)?;
    }
    Ok(())
}

fn apply_sealed(
    credentials: &mut Table<'_, (&'static str, &'static str, &'static str), &'static [u8]>,
    tenant: &TenantId,
    changes: &[SealedChange],
) -> Result<(), StoreError> {
    for c in changes {
        let row = (tenant.as_str(), c.kind.as_str(), c.key.as_str());
        match &c.sealed {
            Some(sealed) => {
                credentials.insert(row, sealed.as_slice()).map_err(db_err)?;
            }
            None => {
                credentials.remove(row).map_err(db_err)?;
            }
        }
    }
    Ok(())
}

fn remove_all_records(
    credentials: &mut Table<'_, (&'static str, &'static str, &'static str), &'static [u8]>,
    tenant: &TenantId,
) -> Result<(), StoreError> {
    let (lo, hi) = tenant_bounds(tenant);
    credentials.retain_in((lo.as_str(), "", "")..(hi.as_str(), "", ""), |_, _| false).map_err(db_err)
}

#[async_trait]
impl CredentialStore for EmbeddedStore {
    async fn read(&self, tenant: &TenantId) -> Result<CredentialSnapshot, StoreError> {
        let tenant = tenant.clone();
        self.blocking(move |inner| read_snapshot(inner, &tenant)).await
    }

    async fn generation(&self, tenant: &TenantId) -> Result<Option<u64>, StoreError> {
        let tenant = tenant.clone();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(db_err)?;
            let generations = txn.open_table(GENERATIONS).map_err(db_err)?;
            Ok(generations.get(tenant.as_str()).map_err(db_err)?.map(|g| g.value()))
        })
        .await
    }

    async fn write(&self, tenant: &TenantId, batch: &ChangeBatch) -> Result<(), StoreError> {
        if batch.changes.len() > MAX_WRITES_PER_COMMIT {
            return Err(StoreError::Invalid(format!(
                "a batch carries {} changes, more than {MAX_WRITES_PER_COMMIT}",
                batch.changes.len()
            )));
        }
        let changes = self.seal_changes(tenant, batch.changes.iter().map(|c| (&c.key, c.value.as_deref())))?;
        let (tenant, generation, epoch) = (tenant.clone(), batch.generation, batch.epoch);
        self.write(move |txn| {
            let fence = check_fence(txn, &tenant, epoch)?;
            {
                let mut generations = txn.open_table(GENERATIONS).map_err(db_err)?;
                let stored = generations.get(tenant.as_str()).map_err(db_err)?.map(|g| g.value());
                if stored.is_some_and(|stored| generation <= stored) {
                    // Already applied: a retry after a lost acknowledgement.
                    return Ok(((), false));
                }
                let mut credentials = txn.open_table(CREDENTIALS).map_err(db_err)?;
                apply_sealed(&mut credentials, &tenant, &changes)?;
                generations.insert(tenant.as_str(), generation).map_err(db_err)?;
            }
            advance_fence(txn, &tenant, epoch, fence)?;
            Ok(((), true))
        })
        .await
    }

    async fn replace(&self, tenant: &TenantId, snapshot: &CredentialSnapshot, epoch: u64) -> Result<(), StoreError> {
        let records = self.seal_changes(tenant, snapshot.records.iter().map(|(k, v)| (k, Some(v.as_slice()))))?;
        let (tenant, generation) = (tenant.clone(), snapshot.generation);
        self.write(move |txn| {
            let fence = check_fence(txn, &tenant, epoch)?;
            {
                let mut credentials = txn.open_table(CREDENTIALS).map_err(db_err)?;
                remove_all_records(&mut credentials, &tenant)?;
                apply_sealed(&mut credentials, &tenant, &records)?;
                let mut generations = txn.open_table(GENERATIONS).map_err(db_err)?;
                generations.insert(tenant.as_str(), generation).map_err(db_err)?;
            }
            advance_fence(txn, &tenant, epoch, fence)?;
            Ok(((), true))
        })
        .await
    }

    async fn delete(&self, tenant: &TenantId) -> Result<(), StoreError> {
        let tenant = tenant.clone();
        self.write(move |txn| {
            let mut credentials = txn.open_table(CREDENTIALS).map_err(db_err)?;
            remove_all_records(&mut credentials, &tenant)?;
            txn.open_table(GENERATIONS).map_err(db_err)?.remove(tenant.as_str()).map_err(db_err)?;
            Ok(((), true))
        })
        .await
    }

    async fn list_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read().map_err(db_err)?;
            let generations = txn.open_table(GENERATIONS).map_err(db_err)?;
            let mut out = Vec::new();
            for entry in generations.iter().map_err(db_err)? {
                let (k, _) = entry.map_err(db_err)?;
                if let Some(id) = stored_id(k.value(), "credential_generations") {
                    out.push(id);
                }
            }
            Ok(out)
        })
        .await
    }
}

/// Validates a tenant id read from disk: a file edited by hand or written by a buggy version must not
/// smuggle a bad id into paths and keys, nor stop the other tenants from being listed.
fn stored_id(raw: &str, table: &'static str) -> Option<TenantId> {
    match TenantId::parse(raw) {
        Ok(id) => Some(id),
        Err(e) => {
            warn!(table, stored_id = ?raw, error = %e, "skipping a stored tenant id that fails validation");
            None
        }
    }
}

fn decode_tenant(tenant: &TenantId, bytes: &[u8]) -> Result<TenantRecord, StoreError> {
    let record: TenantRecord = serde_json::from_slice(bytes)
        // serde's message may quote stored text; position and category are enough to find the row's fault.
        .map_err(|e| {
            StoreError::Corrupt(format!(
                "tenant record does not decode ({:?} error at line {}, column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
    if record.tenant_id != *tenant {
        return Err(StoreError::Corrupt("tenant record is stored under another tenant's id".into()));
    }
    Ok(record)
}

fn put_tenant(
    tenants: &mut Table<'_, &'static str, &'static [u8]>,
    desired: &mut Table<'_, &'static str, ()>,
    record: &TenantRecord,
) -> Result<(), StoreError> {
    let id = record.tenant_id.as_str();
    let json = serde_json::to_vec(record).expect("a tenant record serializes");
    tenants.insert(id, json.as_slice()).map_err(db_err)?;
    if record.whatsapp_connected {
        desired.insert(id, ()).map_err(db_err)?;
    } else {
        desired.remove(id).map_err(db_err)?;
    }
    Ok(())
}

/// A record for a tenant the table has not seen, created by an operation other than `set_desired`.
fn blank_record(tenant: &TenantId) -> TenantRecord {
    TenantRecord { whatsapp_connected: false, ..TenantRecord::desired(tenant.clone()) }
}

fn expiry(now: UnixMillis, ttl_ms: u64) -> UnixMillis {
    now.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
}

#[async_trait]
impl TenantStore for EmbeddedStore {
    async fn list_desired(&self, page_token: Option<String>, limit: usize) -> Result<Page<TenantRecord>, StoreError> {
        // The token is the last tenant id of the previous page; anything else is a forged or garbled token.
        let after = match page_token {
            Some(token) => {
                Some(TenantId::parse(&token).map_err(|_| StoreError::Invalid("malformed page token".into()))?)
            }
            None => None,
        };
        let limit = limit.max(1);
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(db_err)?;
            let desired = txn.open_table(DESIRED).map_err(db_err)?;
            let tenants = txn.open_table(TENANTS).map_err(db_err)?;
            let lower = match &after {
                Some(id) => Bound::Excluded(id.as_str()),
                None => Bound::Unbounded,
            };
            let mut rows = desired.range::<&str>((lower, Bound::Unbounded)).map_err(db_err)?;
            let mut items = Vec::new();
            let mut next = None;
            while let Some(entry) = rows.next() {
                let (k, _) = entry.map_err(db_err)?;
                let Some(id) = stored_id(k.value(), "desired_tenants") else { continue };
                let record = match tenants.get(id.as_str()).map_err(db_err)? {
                    Some(v) => decode_tenant(&id, v.value()),
                    None => Err(StoreError::Corrupt("desired index names a tenant with no record".into())),
                };
                match record {
                    Ok(r) if r.whatsapp_connected => items.push(r),
                    Ok(_) => warn!(tenant = %id, "desired index names a tenant whose flag is off; skipping"),
                    // One bad row must not keep every other tenant from being restored.
                    Err(e) => warn!(tenant = %id, error = %e, "skipping an unreadable tenant record"),
                }
                if items.len() == limit {
                    if rows.next().is_some() {
                        next = Some(id.as_str().to_owned());
                    }
                    break;
                }
            }
            Ok(Page { items, next })
        })
        .await
    }

    async fn get(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        let tenant = tenant.clone();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(db_err)?;
            let tenants = txn.open_table(TENANTS).map_err(db_err)?;
            match tenants.get(tenant.as_str()).map_err(db_err)? {
                Some(v) => Ok(Some(decode_tenant(&tenant, v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn set_desired(&self, tenant: &TenantId, desired: bool) -> Result<(), StoreError> {
        let fresh = blank_record(tenant);
        self.update_tenant(tenant, move |stored| {
            let mut record = stored.unwrap_or(fresh);
            record.whatsapp_connected = desired;
            Ok((Some(record), ()))
        })
        .await
    }

    async fn write_status(
        &self,
        tenant: &TenantId,
        update: &StatusUpdate,
        now: UnixMillis,
    ) -> Result<bool, StoreError> {
        let fresh = blank_record(tenant);
        let update = update.clone();
        self.update_tenant(tenant, move |stored| {
            let mut record = match stored {
                Some(r) if !r.differs_from(&update) => return Ok((None, false)),
                Some(r) => r,
                None => fresh,
            };
            if record.status != Some(update.status) {
                record.status_changed_at = Some(now);
            }
            if update.status == TenantStatus::Connected {
                record.last_healthy_at = Some(now);
            }
            record.status = Some(update.status);
            record.reason = update.reason;
            record.whatsapp_connected = update.whatsapp_connected;
            Ok((Some(record), true))
        })
        .await
    }

    async fn record_failure(&self, tenant: &TenantId) -> Result<u32, StoreError> {
        let fresh = blank_record(tenant);
        self.update_tenant(tenant, move |stored| {
            let mut record = stored.unwrap_or(fresh);
            record.consecutive_failures = record.consecutive_failures.saturating_add(1);
            let count = record.consecutive_failures;
            Ok((Some(record), count))
        })
        .await
    }

    async fn reset_failures(&self, tenant: &TenantId, now: UnixMillis) -> Result<bool, StoreError> {
        self.update_tenant(tenant, move |stored| match stored {
            Some(mut record) if record.consecutive_failures > 0 => {
                record.consecutive_failures = 0;
                record.last_healthy_at = Some(now);
                Ok((Some(record), true))
            }
            _ => Ok((None, false)),
        })
        .await
    }

    async fn acquire_lease(
        &self,
        tenant: &TenantId,
        owner: &str,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<Lease, StoreError> {
        let fresh = blank_record(tenant);
        let owner = owner.to_owned();
        self.update_tenant(tenant, move |stored| {
            let mut record = stored.unwrap_or(fresh);
            let previous = match &record.lease {
                Some(held) if held.owner != owner && held.is_live(now) => {
                    return Err(StoreError::Conflict(Conflict::LeaseHeld { holder: held.clone() }));
                }
                Some(held) => held.epoch,
                None => 0,
            };
            let lease = Lease { owner, epoch: previous + 1, expires_at: expiry(now, ttl_ms) };
            record.lease = Some(lease.clone());
            Ok((Some(record), lease))
        })
        .await
    }

    async fn renew_lease(
        &self,
        tenant: &TenantId,
        lease: &Lease,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<Lease, StoreError> {
        let presented = lease.clone();
        self.update_tenant(tenant, move |stored| {
            let Some(mut record) = stored else {
                return Err(StoreError::Conflict(Conflict::LeaseLost));
            };
            match &record.lease {
                Some(held) if held.owner == presented.owner && held.epoch == presented.epoch && held.is_live(now) => {}
                _ => return Err(StoreError::Conflict(Conflict::LeaseLost)),
            }
            let renewed = Lease { expires_at: expiry(now, ttl_ms), ..presented };
            record.lease = Some(renewed.clone());
            Ok((Some(record), renewed))
        })
        .await
    }

    async fn release_lease(&self, tenant: &TenantId, lease: &Lease) -> Result<(), StoreError> {
        let presented = lease.clone();
        self.update_tenant(tenant, move |stored| match stored {
            Some(mut record)
                if record.lease.as_ref().is_some_and(|held| {
                    held.owner == presented.owner && held.epoch == presented.epoch && held.expires_at != 0
                }) =>
            {
                if let Some(held) = record.lease.as_mut() {
                    held.expires_at = 0;
                }
                Ok((Some(record), ()))
            }
            _ => Ok((None, ())),
        })
        .await
    }
}

/// Test hook: moves raw ciphertext between rows, as an attacker or a buggy migration with file access would.
#[cfg(any(test, feature = "contract-tests"))]
#[async_trait]
impl crate::contract::SwapRecords for EmbeddedStore {
    async fn swap_stored_values(&self, tenant: &TenantId, a: &RecordKey, b: &RecordKey) {
        let (tenant, a, b) = (tenant.clone(), a.clone(), b.clone());
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(db_err)?;
            {
                let mut credentials = txn.open_table(CREDENTIALS).map_err(db_err)?;
                let row_a = (tenant.as_str(), a.kind.as_str(), a.key.as_str());
                let row_b = (tenant.as_str(), b.kind.as_str(), b.key.as_str());
                let value_a = credentials.get(row_a).map_err(db_err)?.expect("record a is stored").value().to_vec();
                let value_b = credentials.get(row_b).map_err(db_err)?.expect("record b is stored").value().to_vec();
                credentials.insert(row_a, value_b.as_slice()).map_err(db_err)?;
                credentials.insert(row_b, value_a.as_slice()).map_err(db_err)?;
            }
            txn.commit().map_err(db_err)
        })
        .await
        .expect("swapping stored values");
    }

    async fn copy_stored_value(&self, from: &TenantId, to: &TenantId, key: &RecordKey) {
        let (from, to, key) = (from.clone(), to.clone(), key.clone());
        self.blocking(move |inner| {
            let txn = inner.db.begin_write().map_err(db_err)?;
            {
                let mut credentials = txn.open_table(CREDENTIALS).map_err(db_err)?;
                let value = credentials
                    .get((from.as_str(), key.kind.as_str(), key.key.as_str()))
                    .map_err(db_err)?
                    .expect("the source record is stored")
                    .value()
                    .to_vec();
                credentials
                    .insert((to.as_str(), key.kind.as_str(), key.key.as_str()), value.as_slice())
                    .map_err(db_err)?;
            }
            txn.commit().map_err(db_err)
        })
        .await
        .expect("copying a stored value");
    }
}
