//! [`CredentialStore`] on Cloud Firestore.
//!
//! # Layout
//! ```text
//! {prefix}tenants/{tenant}                         meta document, one per tenant
//!     generation  integer   the committed generation
//!     max_epoch   integer   the newest lease epoch a write presented; older epochs are refused
//!     set         string    id of the live record set (absent: the tenant was deleted, a tombstone)
//!     garbage     array     ids of dead record sets still to be deleted
//! {prefix}tenants/{tenant}/records-{set}/{kind}~{base64url(key)}   one document per record
//!     kind        string    the record kind's wire name
//!     key         string    the record key
//!     value       bytes     the value sealed by `Cipher::seal` (nonce, ciphertext, tag)
//!     generation  integer   the generation that last wrote it
//! ```
//! Records are separate documents because a snapshot outgrows Firestore's 1 MiB document limit and each
//! document sustains about one write per second. Every commit that changes records also rewrites the meta
//! document with a precondition on its `update_time`; that single document serialises writers, carries the
//! fencing epoch and makes each commit all-or-nothing.
//!
//! A change batch is one `Commit` (atomic) of at most [`MAX_WRITES_PER_COMMIT`] writes: its record writes
//! plus the meta update. A batch that would need more (500 distinct records plus the meta document) and
//! every [`CredentialStore::replace`] build a new record set instead: the records go to a fresh
//! `records-{set}` collection in commits of up to 500 writes, nothing reads them yet, and one last
//! commit points the meta document at the new set. Readers therefore see the old snapshot or the new one,
//! never a mix. The old set is recorded in `garbage` by that same commit and deleted afterwards; a set
//! being built is recorded in `garbage` before its first record is written, so a crash leaves nothing
//! that a later `delete` or `replace` does not clean up.
//!
//! Reads are consistent. `read` first tries without locks: it reads the meta document, lists the live set
//! page by page, and reads the meta document again. Every commit that changes the live set (or deletes it)
//! rewrites the meta document, so an unchanged `update_time` proves the pages are one snapshot. Overtaken by
//! writers [`OPTIMISTIC_READS`] times, it reads inside a read-write transaction that it then rolls back,
//! whose lock on the meta document keeps such commits out until the pages are read. Locks only under
//! contention matter because a read cut off mid-way (a host killed, a network cut) cannot roll its
//! transaction back: the lock stays until the transaction expires, and every write of the tenant fails as a
//! lost race until then (the chaos suite's Firestore outage hit this when every read took the lock).
//!
//! This adapter talks to Firestore's gRPC API through the `firestore` crate's client (connection,
//! authentication, `FIRESTORE_EMULATOR_HOST`), using the raw request types for exact control of
//! preconditions, transactions and the one-`Commit`-per-batch rule.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use firestore::gcloud_sdk::google::firestore::v1::{
    self as pb, BeginTransactionRequest, CommitRequest, Document, DocumentMask, GetDocumentRequest,
    ListDocumentsRequest, Precondition, RollbackRequest, TransactionOptions, Value, Write, get_document_request,
    precondition, transaction_options, value::ValueType, write,
};
use firestore::gcloud_sdk::prost_types::Timestamp;
use firestore::gcloud_sdk::tonic::{Code, Status};
use firestore::{FirestoreDb, FirestoreDbOptions};
use tracing::{debug, warn};

use crate::crypto::{Cipher, SEAL_OVERHEAD};
use crate::domain::{
    ChangeBatch, CredentialSnapshot, MAX_RECORD_KEY_LEN, MAX_WRITES_PER_COMMIT, RecordKey, RecordKind, TenantId,
};
use crate::ports::{Conflict, CredentialStore, StoreError};

/// Largest sealed value stored in one record document: Firestore caps a document at 1 MiB, and the
/// document's name and other fields need room too.
pub const MAX_SEALED_VALUE_LEN: usize = 1_000_000;

/// How often a write re-reads the meta document after losing a race before giving up (as `Unavailable`).
const MAX_ATTEMPTS: usize = 8;

/// Documents per `ListDocuments` page.
const PAGE_SIZE: i32 = 500;

/// Optimistic snapshot reads tried before a read takes the meta document's lock.
const OPTIMISTIC_READS: usize = 3;

/// The longest one Firestore call may take before the store reports itself unavailable.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// Credential store on Firestore (see the module documentation for the layout).
#[derive(Clone)]
pub struct FirestoreCredentialStore {
    db: FirestoreDb,
    cipher: Cipher,
    tenants_collection: String,
    timeout: Duration,
}

impl std::fmt::Debug for FirestoreCredentialStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirestoreCredentialStore").field("collection", &self.tenants_collection).finish()
    }
}

/// What the meta document says.
#[derive(Debug, Clone)]
struct Meta {
    generation: u64,
    max_epoch: u64,
    /// `None` for a tombstone (the tenant was deleted; `max_epoch` still fences stale writers).
    set: Option<String>,
    garbage: Vec<String>,
    update_time: Timestamp,
}

impl Meta {
    /// The precondition a commit puts on the meta document it read as `meta`: unchanged since then.
    fn precondition(meta: Option<&Meta>) -> Precondition {
        Precondition {
            condition_type: Some(match meta {
                Some(m) => precondition::ConditionType::UpdateTime(m.update_time),
                None => precondition::ConditionType::Exists(false),
            }),
        }
    }

    /// Refuses a writer whose epoch is older than one already accepted.
    fn fence(meta: Option<&Meta>, epoch: u64) -> Result<(), StoreError> {
        match meta {
            Some(m) if epoch < m.max_epoch => {
                Err(StoreError::Conflict(Conflict::StaleEpoch { presented: epoch, current: m.max_epoch }))
            }
            _ => Ok(()),
        }
    }
}

/// Why one commit attempt did not go through.
enum Attempt {
    /// Another writer changed the meta document first: read it again and retry.
    Raced,
    /// A real failure.
    Failed(StoreError),
}

impl From<StoreError> for Attempt {
    fn from(e: StoreError) -> Self {
        Attempt::Failed(e)
    }
}

impl FirestoreCredentialStore {
    /// Connects to Firestore for `project_id` (the emulator when `FIRESTORE_EMULATOR_HOST` is set; any
    /// project id works there) and keeps tenants under the collection `{collection_prefix}tenants`.
    /// Different prefixes keep deployments (or test runs) apart in one database.
    pub async fn new(
        project_id: impl Into<String>,
        cipher: Cipher,
        collection_prefix: impl Into<String>,
    ) -> Result<Self, StoreError> {
        let db = FirestoreDb::with_options(FirestoreDbOptions::new(project_id.into()))
            .await
            .map_err(|e| StoreError::Unavailable(format!("connecting to firestore: {e}")))?;
        Self::from_db(db, cipher, collection_prefix)
    }

    /// A store over an existing client (shared connection pools, custom options).
    pub fn from_db(db: FirestoreDb, cipher: Cipher, collection_prefix: impl Into<String>) -> Result<Self, StoreError> {
        let prefix = collection_prefix.into();
        check_prefix(&prefix)?;
        Ok(Self { db, cipher, tenants_collection: format!("{prefix}tenants"), timeout: DEFAULT_TIMEOUT })
    }

    /// Sets the longest one Firestore call may take before the store reports itself unavailable.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The collection holding the tenants' meta documents.
    pub fn tenants_collection(&self) -> &str {
        &self.tenants_collection
    }

    // ---- names ------------------------------------------------------------------------------------------

    fn database(&self) -> String {
        self.db.get_database_path().clone()
    }

    fn meta_name(&self, tenant: &TenantId) -> String {
        format!("{}/{}/{}", self.db.get_documents_path(), self.tenants_collection, tenant.as_str())
    }

    fn record_name(&self, tenant: &TenantId, set: &str, key: &RecordKey) -> String {
        format!("{}/{}/{}", self.meta_name(tenant), set_collection(set), record_doc_id(key))
    }

    // ---- calls --------------------------------------------------------------------------------------------

    /// Runs one Firestore call under the store's timeout.
    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, Status>>,
    ) -> Result<Result<T, Status>, StoreError> {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| StoreError::Unavailable(format!("firestore {op}: timed out after {:?}", self.timeout)))
    }

    /// The meta document, read strongly (the newest committed version).
    async fn get_meta(&self, tenant: &TenantId) -> Result<Option<Meta>, StoreError> {
        let req = GetDocumentRequest { name: self.meta_name(tenant), ..Default::default() };
        let mut client = self.db.client().get();
        match self.call("get meta", client.get_document(req)).await? {
            Ok(resp) => parse_meta(&resp.into_inner()).map(Some),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(map_status("get meta", s)),
        }
    }

    /// Every document of a record set as it is now, page by page. Not a snapshot by itself: callers check
    /// the meta document did not move meanwhile (see `read`) or commit under a precondition on it.
    async fn list_set(&self, tenant: &TenantId, set: &str, names_only: bool) -> Result<Vec<Document>, StoreError> {
        let mut docs = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = ListDocumentsRequest {
                parent: self.meta_name(tenant),
                collection_id: set_collection(set),
                page_size: PAGE_SIZE,
                page_token: std::mem::take(&mut page_token),
                // An empty mask returns names only.
                mask: names_only.then(DocumentMask::default),
                ..Default::default()
            };
            let mut client = self.db.client().get();
            let resp = self
                .call("list records", client.list_documents(req))
                .await?
                .map_err(|s| map_status("list records", s))?
                .into_inner();
            docs.extend(resp.documents);
            if resp.next_page_token.is_empty() {
                return Ok(docs);
            }
            page_token = resp.next_page_token;
        }
    }

    /// Starts a read-write transaction. A `read` overtaken by writers uses one for its locks, not its writes:
    /// the meta document it reads stays locked until the transaction ends, and every commit that changes the
    /// live set writes the meta document, so no such commit lands while the pages are read. (A read-only
    /// transaction or a read time would do on Firestore itself, but the emulator serves later pages at the
    /// current time whatever they say; the locks behave alike on both.)
    async fn begin_transaction(&self) -> Result<Vec<u8>, StoreError> {
        let req = BeginTransactionRequest {
            database: self.database(),
            options: Some(TransactionOptions {
                mode: Some(transaction_options::Mode::ReadWrite(transaction_options::ReadWrite::default())),
            }),
            ..Default::default()
        };
        let mut client = self.db.client().get();
        Ok(self
            .call("begin transaction", client.begin_transaction(req))
            .await?
            .map_err(|s| map_status("begin transaction", s))?
            .into_inner()
            .transaction)
    }

    /// Ends a transaction that wrote nothing. Best effort: an unfinished transaction expires on its own.
    async fn rollback(&self, transaction: Vec<u8>) {
        let req = RollbackRequest { database: self.database(), transaction, ..Default::default() };
        let mut client = self.db.client().get();
        if let Ok(Err(s)) = self.call("rollback", client.rollback(req)).await {
            debug!(code = ?s.code(), "firestore rollback failed; the transaction will expire");
        }
    }

    /// The generation and the live set's documents, read inside `transaction`; `None` when nothing is stored.
    async fn read_in(&self, tenant: &TenantId, transaction: &[u8]) -> Result<Option<(u64, Vec<Document>)>, Attempt> {
        let req = GetDocumentRequest {
            name: self.meta_name(tenant),
            consistency_selector: Some(get_document_request::ConsistencySelector::Transaction(transaction.to_vec())),
            ..Default::default()
        };
        let mut client = self.db.client().get();
        let meta = match self.call("get meta", client.get_document(req)).await? {
            Ok(resp) => parse_meta(&resp.into_inner())?,
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(transaction_status("get meta", s)),
        };
        let Some(set) = &meta.set else { return Ok(None) };
        // Plain strong reads: while the transaction holds the meta document, no commit changes the set.
        let docs = self.list_set(tenant, set, false).await?;
        Ok(Some((meta.generation, docs)))
    }

    /// The generation and the live set's documents as one snapshot; `None` when nothing is stored. A writer
    /// that commits between the two reads of the meta document makes this a lost race (read again).
    async fn read_consistent(&self, tenant: &TenantId) -> Result<Option<(u64, Vec<Document>)>, Attempt> {
        let Some(before) = self.get_meta(tenant).await? else { return Ok(None) };
        let Some(set) = &before.set else { return Ok(None) };
        let docs = self.list_set(tenant, set, false).await?;
        let after = self.get_meta(tenant).await?;
        if after.map(|m| m.update_time) != Some(before.update_time) {
            return Err(Attempt::Raced);
        }
        Ok(Some((before.generation, docs)))
    }

    /// Applies `writes` atomically. A failed precondition is a lost race, not an error.
    async fn commit(&self, writes: Vec<Write>) -> Result<Vec<pb::WriteResult>, Attempt> {
        debug_assert!(writes.len() <= MAX_WRITES_PER_COMMIT);
        let req = CommitRequest { database: self.database(), writes, ..Default::default() };
        let mut client = self.db.client().get();
        match self.call("commit", client.commit(req)).await? {
            Ok(resp) => Ok(resp.into_inner().write_results),
            Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted) => {
                Err(Attempt::Raced)
            }
            Err(s) => Err(Attempt::Failed(map_status("commit", s))),
        }
    }

    // ---- writes --------------------------------------------------------------------------------------------

    /// The meta document as a write: every field set, guarded by `base` being unchanged.
    fn meta_write(
        &self,
        tenant: &TenantId,
        base: Option<&Meta>,
        generation: u64,
        max_epoch: u64,
        set: Option<&str>,
        garbage: &[String],
    ) -> Write {
        let mut fields = HashMap::from([
            ("generation".to_string(), int_value(generation)),
            ("max_epoch".to_string(), int_value(max_epoch)),
            (
                "garbage".to_string(),
                Value {
                    value_type: Some(ValueType::ArrayValue(pb::ArrayValue {
                        values: garbage.iter().map(|s| string_value(s)).collect(),
                    })),
                },
            ),
        ]);
        if let Some(set) = set {
            fields.insert("set".into(), string_value(set));
        }
        Write {
            operation: Some(write::Operation::Update(Document {
                name: self.meta_name(tenant),
                fields,
                ..Default::default()
            })),
            current_document: Some(Meta::precondition(base)),
            ..Default::default()
        }
    }

    fn record_write(&self, tenant: &TenantId, set: &str, key: &RecordKey, sealed: &[u8], generation: u64) -> Write {
        let fields = HashMap::from([
            ("kind".to_string(), string_value(key.kind.as_str())),
            ("key".to_string(), string_value(&key.key)),
            ("value".to_string(), Value { value_type: Some(ValueType::BytesValue(sealed.to_vec())) }),
            ("generation".to_string(), int_value(generation)),
        ]);
        Write {
            operation: Some(write::Operation::Update(Document {
                name: self.record_name(tenant, set, key),
                fields,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn record_delete(&self, tenant: &TenantId, set: &str, key: &RecordKey) -> Write {
        Write { operation: Some(write::Operation::Delete(self.record_name(tenant, set, key))), ..Default::default() }
    }

    /// Makes `records` the tenant's whole snapshot at `generation`, replacing what `base` (the meta
    /// document as read) points at. Small sets go in one commit; larger ones are written to a new set
    /// first and switched to by a final commit (see the module documentation).
    async fn install_set(
        &self,
        tenant: &TenantId,
        base: Option<&Meta>,
        records: &[(RecordKey, Vec<u8>)],
        generation: u64,
        epoch: u64,
    ) -> Result<(), Attempt> {
        let new_set = new_set_id();
        let max_epoch = base.map_or(epoch, |m| m.max_epoch.max(epoch));
        let mut garbage = base.map(|m| m.garbage.clone()).unwrap_or_default();
        if let Some(old) = base.and_then(|m| m.set.clone()) {
            garbage.push(old);
        }
        let base_generation = base.map_or(0, |m| m.generation);

        if records.len() < MAX_WRITES_PER_COMMIT {
            let mut writes: Vec<Write> =
                records.iter().map(|(k, v)| self.record_write(tenant, &new_set, k, v, generation)).collect();
            writes.push(self.meta_write(tenant, base, generation, max_epoch, Some(&new_set), &garbage));
            self.commit(writes).await?;
        } else {
            // Announce the set as garbage first, so a crash while it is half written leaves nothing behind.
            let mut announced_garbage = base.map(|m| m.garbage.clone()).unwrap_or_default();
            announced_garbage.push(new_set.clone());
            let old_set = base.and_then(|m| m.set.as_deref());
            let announce = self.meta_write(tenant, base, base_generation, max_epoch, old_set, &announced_garbage);
            let results = self.commit(vec![announce]).await?;
            let announced_at = results
                .first()
                .and_then(|r| r.update_time)
                .ok_or_else(|| StoreError::Unavailable("firestore commit: no update time".into()))?;
            for chunk in records.chunks(MAX_WRITES_PER_COMMIT) {
                let writes = chunk.iter().map(|(k, v)| self.record_write(tenant, &new_set, k, v, generation)).collect();
                // Record writes carry no precondition; a lost race here is contention: the caller retries.
                self.commit(writes).await?;
            }
            let announced = Meta {
                generation: base_generation,
                max_epoch,
                set: base.and_then(|m| m.set.clone()),
                garbage: Vec::new(),
                update_time: announced_at,
            };
            self.commit(vec![self.meta_write(
                tenant,
                Some(&announced),
                generation,
                max_epoch,
                Some(&new_set),
                &garbage,
            )])
            .await?;
        }
        debug!(tenant = %tenant, records = records.len(), generation, "installed a new record set");
        self.collect_garbage(tenant).await;
        Ok(())
    }

    /// Deletes the dead record sets listed in the meta document's `garbage`. Best effort: what fails now
    /// stays listed and is retried by the next `delete` or `replace`.
    async fn collect_garbage(&self, tenant: &TenantId) {
        if let Err(e) = self.try_collect_garbage(tenant).await {
            warn!(tenant = %tenant, error = %e, "deleting dead firestore record sets failed; will retry later");
        }
    }

    async fn try_collect_garbage(&self, tenant: &TenantId) -> Result<(), StoreError> {
        let Some(meta) = self.get_meta(tenant).await? else { return Ok(()) };
        if meta.garbage.is_empty() {
            return Ok(());
        }
        for set in &meta.garbage {
            let docs = self.list_set(tenant, set, true).await?;
            for chunk in docs.chunks(MAX_WRITES_PER_COMMIT) {
                let writes = chunk
                    .iter()
                    .map(|d| Write { operation: Some(write::Operation::Delete(d.name.clone())), ..Default::default() })
                    .collect();
                match self.commit(writes).await {
                    Ok(_) => {}
                    Err(Attempt::Raced) => {
                        return Err(StoreError::Unavailable("contention deleting a record set".into()));
                    }
                    Err(Attempt::Failed(e)) => return Err(e),
                }
            }
        }
        // Take the collected sets off the list, unless the meta document moved on meanwhile (then the
        // next collection finds them empty and drops them).
        let collected = meta.garbage.clone();
        let mut current = meta;
        for _ in 0..MAX_ATTEMPTS {
            let remaining: Vec<String> = current.garbage.iter().filter(|s| !collected.contains(s)).cloned().collect();
            let w = self.meta_write(
                tenant,
                Some(&current),
                current.generation,
                current.max_epoch,
                current.set.as_deref(),
                &remaining,
            );
            match self.commit(vec![w]).await {
                Ok(_) => return Ok(()),
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Raced) => match self.get_meta(tenant).await? {
                    Some(m) => current = m,
                    None => return Ok(()),
                },
            }
        }
        Ok(())
    }

    /// Seals each value, refusing keys and values Firestore cannot hold.
    fn seal(&self, tenant: &TenantId, key: &RecordKey, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        check_key(key)?;
        if value.len() + SEAL_OVERHEAD > MAX_SEALED_VALUE_LEN {
            return Err(StoreError::Invalid(format!(
                "a {} record of {} bytes exceeds firestore's document limit",
                key.kind.as_str(),
                value.len()
            )));
        }
        Ok(self.cipher.seal(tenant, key, value))
    }

    /// Decodes and opens one record document.
    fn open_record(&self, tenant: &TenantId, doc: &Document) -> Result<(RecordKey, Vec<u8>), StoreError> {
        let (key, sealed) = raw_record(doc)?;
        let value = self.cipher.open(tenant, &key, sealed).map_err(|_| {
            StoreError::Corrupt(format!("a {} record of tenant {tenant} does not decrypt", key.kind.as_str()))
        })?;
        Ok((key, value))
    }
}

#[async_trait]
impl CredentialStore for FirestoreCredentialStore {
    async fn read(&self, tenant: &TenantId) -> Result<CredentialSnapshot, StoreError> {
        for attempt in 0..MAX_ATTEMPTS {
            // Optimistic first: no lock a cut-off read could leave behind. Overtaken by writers a few times
            // (a tenant written while it is read, which a host holding the lease does not do), lock them out.
            let result = if attempt < OPTIMISTIC_READS {
                self.read_consistent(tenant).await
            } else {
                let transaction = self.begin_transaction().await?;
                let result = self.read_in(tenant, &transaction).await;
                self.rollback(transaction).await;
                result
            };
            match result {
                Ok(Some((generation, docs))) => {
                    let mut records = BTreeMap::new();
                    for doc in &docs {
                        let (key, value) = self.open_record(tenant, doc)?;
                        records.insert(key, value);
                    }
                    return Ok(CredentialSnapshot { generation, records });
                }
                Ok(None) => return Err(StoreError::NotFound),
                Err(Attempt::Raced) => {
                    debug!(tenant = %tenant, attempt, "a writer committed during a snapshot read; reading again");
                    backoff(attempt).await;
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(format!("firestore snapshot read overtaken by writers {MAX_ATTEMPTS} times")))
    }

    async fn generation(&self, tenant: &TenantId) -> Result<Option<u64>, StoreError> {
        Ok(self.get_meta(tenant).await?.filter(|m| m.set.is_some()).map(|m| m.generation))
    }

    async fn write(&self, tenant: &TenantId, batch: &ChangeBatch) -> Result<(), StoreError> {
        if batch.changes.len() > MAX_WRITES_PER_COMMIT {
            return Err(StoreError::Invalid(format!(
                "a batch holds at most {MAX_WRITES_PER_COMMIT} changes, not {}",
                batch.changes.len()
            )));
        }
        check_generation(batch.generation)?;
        check_generation(batch.epoch)?;
        // A later change of the same key wins; Firestore takes one write per document per commit.
        let mut latest: BTreeMap<&RecordKey, Option<&[u8]>> = BTreeMap::new();
        for c in &batch.changes {
            latest.insert(&c.key, c.value.as_deref());
        }
        let mut changes: Vec<(RecordKey, Option<Vec<u8>>)> = Vec::with_capacity(latest.len());
        for (key, value) in latest {
            check_key(key)?;
            let sealed = value.map(|v| self.seal(tenant, key, v)).transpose()?;
            changes.push((key.clone(), sealed));
        }

        for attempt in 0..MAX_ATTEMPTS {
            let outcome = if changes.len() < MAX_WRITES_PER_COMMIT {
                let meta = self.get_meta(tenant).await?;
                Meta::fence(meta.as_ref(), batch.epoch)?;
                if let Some(m) = meta.as_ref().filter(|m| m.set.is_some())
                    && batch.generation <= m.generation
                {
                    debug!(tenant = %tenant, generation = batch.generation, stored = m.generation, "batch already applied");
                    return Ok(());
                }
                let set = meta.as_ref().and_then(|m| m.set.clone()).unwrap_or_else(new_set_id);
                let mut writes: Vec<Write> = changes
                    .iter()
                    .map(|(k, v)| match v {
                        Some(sealed) => self.record_write(tenant, &set, k, sealed, batch.generation),
                        None => self.record_delete(tenant, &set, k),
                    })
                    .collect();
                let max_epoch = meta.as_ref().map_or(batch.epoch, |m| m.max_epoch.max(batch.epoch));
                let garbage = meta.as_ref().map(|m| m.garbage.clone()).unwrap_or_default();
                writes.push(self.meta_write(tenant, meta.as_ref(), batch.generation, max_epoch, Some(&set), &garbage));
                self.commit(writes).await.map(|_| ())
            } else {
                // 500 distinct records plus the meta document do not fit one commit: rebuild the set from
                // the stored (still sealed) records with the changes applied, and switch to it at once.
                // The switch to the rebuilt set is conditional on this meta document, so records read
                // here that change before the switch make it fail and the whole batch is retried.
                let meta = self.get_meta(tenant).await?;
                Meta::fence(meta.as_ref(), batch.epoch)?;
                let live = meta.as_ref().filter(|m| m.set.is_some());
                if let Some(m) = live
                    && batch.generation <= m.generation
                {
                    return Ok(());
                }
                let mut records: BTreeMap<RecordKey, Vec<u8>> = BTreeMap::new();
                if let Some(set) = live.and_then(|m| m.set.as_deref()) {
                    for doc in self.list_set(tenant, set, false).await? {
                        let (key, sealed) = raw_record(&doc)?;
                        records.insert(key, sealed.to_vec());
                    }
                }
                for (k, v) in &changes {
                    match v {
                        Some(sealed) => records.insert(k.clone(), sealed.clone()),
                        None => records.remove(k),
                    };
                }
                let records: Vec<_> = records.into_iter().collect();
                self.install_set(tenant, meta.as_ref(), &records, batch.generation, batch.epoch).await
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(Attempt::Raced) => {
                    debug!(tenant = %tenant, attempt, "firestore write raced; retrying");
                    backoff(attempt).await;
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(format!("firestore write kept losing races after {MAX_ATTEMPTS} attempts")))
    }

    async fn replace(&self, tenant: &TenantId, snapshot: &CredentialSnapshot, epoch: u64) -> Result<(), StoreError> {
        check_generation(snapshot.generation)?;
        check_generation(epoch)?;
        let records = snapshot
            .records
            .iter()
            .map(|(k, v)| Ok((k.clone(), self.seal(tenant, k, v)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        for attempt in 0..MAX_ATTEMPTS {
            let meta = self.get_meta(tenant).await?;
            Meta::fence(meta.as_ref(), epoch)?;
            match self.install_set(tenant, meta.as_ref(), &records, snapshot.generation, epoch).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Raced) => {
                    debug!(tenant = %tenant, attempt, "firestore replace raced; retrying");
                    backoff(attempt).await;
                }
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(format!("firestore replace kept losing races after {MAX_ATTEMPTS} attempts")))
    }

    async fn delete(&self, tenant: &TenantId) -> Result<(), StoreError> {
        for attempt in 0..MAX_ATTEMPTS {
            let Some(meta) = self.get_meta(tenant).await? else { return Ok(()) };
            let Some(set) = meta.set.clone() else {
                // Already a tombstone; finish collecting what an earlier delete left.
                self.try_collect_garbage(tenant).await?;
                return Ok(());
            };
            // A tombstone keeps `max_epoch`, so a stale writer cannot bring the tenant back.
            let mut garbage = meta.garbage.clone();
            garbage.push(set);
            match self.commit(vec![self.meta_write(tenant, Some(&meta), 0, meta.max_epoch, None, &garbage)]).await {
                Ok(_) => {
                    // The tenant reads as absent from here on; removing its records is housekeeping, but a
                    // logout should not leave them behind, so report a failure to the caller for a retry.
                    return self.try_collect_garbage(tenant).await;
                }
                Err(Attempt::Raced) => backoff(attempt).await,
                Err(Attempt::Failed(e)) => return Err(e),
            }
        }
        Err(StoreError::Unavailable(format!("firestore delete kept losing races after {MAX_ATTEMPTS} attempts")))
    }

    async fn list_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        let mut tenants = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = ListDocumentsRequest {
                parent: self.db.get_documents_path().clone(),
                collection_id: self.tenants_collection.clone(),
                page_size: PAGE_SIZE,
                page_token: std::mem::take(&mut page_token),
                mask: Some(DocumentMask { field_paths: vec!["set".into()] }),
                ..Default::default()
            };
            let mut client = self.db.client().get();
            let resp = self
                .call("list tenants", client.list_documents(req))
                .await?
                .map_err(|s| map_status("list tenants", s))?
                .into_inner();
            for doc in resp.documents {
                if !doc.fields.contains_key("set") {
                    continue; // a tombstone
                }
                let id = doc.name.rsplit('/').next().unwrap_or_default();
                match TenantId::parse(id) {
                    Ok(t) => tenants.push(t),
                    Err(e) => warn!(error = %e, "skipping a firestore tenant document with an invalid id"),
                }
            }
            if resp.next_page_token.is_empty() {
                return Ok(tenants);
            }
            page_token = resp.next_page_token;
        }
    }
}

/// A [`FirestoreCredentialStore`] that connects on first use. The `firestore` client connects when it is
/// made, so a host that made it at start-up could not start while Firestore was unreachable; with this one the
/// host comes up (control API, `/health`, the tenant table), and every store call reports `Unavailable` (which
/// its caller retries with backoff, as during any outage) until a connection is made.
pub struct LazyFirestoreCredentialStore {
    project_id: String,
    cipher: Cipher,
    prefix: String,
    store: tokio::sync::OnceCell<FirestoreCredentialStore>,
}

impl LazyFirestoreCredentialStore {
    /// Checks the configuration now; connects on the first call.
    pub fn new(
        project_id: impl Into<String>,
        cipher: Cipher,
        collection_prefix: impl Into<String>,
    ) -> Result<Self, StoreError> {
        let prefix = collection_prefix.into();
        check_prefix(&prefix)?;
        Ok(Self { project_id: project_id.into(), cipher, prefix, store: tokio::sync::OnceCell::new() })
    }

    async fn store(&self) -> Result<&FirestoreCredentialStore, StoreError> {
        self.store
            .get_or_try_init(|| async {
                let connect =
                    FirestoreCredentialStore::new(self.project_id.clone(), self.cipher.clone(), self.prefix.clone());
                let store = tokio::time::timeout(DEFAULT_TIMEOUT, connect).await.map_err(|_| {
                    StoreError::Unavailable(format!("connecting to firestore: timed out after {DEFAULT_TIMEOUT:?}"))
                })??;
                debug!("connected to firestore");
                Ok(store)
            })
            .await
    }
}

#[async_trait]
impl CredentialStore for LazyFirestoreCredentialStore {
    async fn read(&self, tenant: &TenantId) -> Result<CredentialSnapshot, StoreError> {
        self.store().await?.read(tenant).await
    }

    async fn generation(&self, tenant: &TenantId) -> Result<Option<u64>, StoreError> {
        self.store().await?.generation(tenant).await
    }

    async fn write(&self, tenant: &TenantId, batch: &ChangeBatch) -> Result<(), StoreError> {
        self.store().await?.write(tenant, batch).await
    }

    async fn replace(&self, tenant: &TenantId, snapshot: &CredentialSnapshot, epoch: u64) -> Result<(), StoreError> {
        self.store().await?.replace(tenant, snapshot, epoch).await
    }

    async fn delete(&self, tenant: &TenantId) -> Result<(), StoreError> {
        self.store().await?.delete(tenant).await
    }

    async fn list_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        self.store().await?.list_tenants().await
    }
}

#[cfg(feature = "contract-tests")]
#[async_trait]
impl crate::contract::SwapRecords for FirestoreCredentialStore {
    async fn swap_stored_values(&self, tenant: &TenantId, a: &RecordKey, b: &RecordKey) {
        let set = self.get_meta(tenant).await.unwrap().and_then(|m| m.set).expect("tenant has records");
        let va = self.raw_value(tenant, &set, a).await;
        let vb = self.raw_value(tenant, &set, b).await;
        let writes = vec![self.record_write(tenant, &set, a, &vb, 0), self.record_write(tenant, &set, b, &va, 0)];
        assert!(self.commit(writes).await.is_ok(), "swapping stored values failed");
    }

    async fn copy_stored_value(&self, from: &TenantId, to: &TenantId, key: &RecordKey) {
        let from_set = self.get_meta(from).await.unwrap().and_then(|m| m.set).expect("source tenant has records");
        let to_set = self.get_meta(to).await.unwrap().and_then(|m| m.set).expect("target tenant has records");
        let v = self.raw_value(from, &from_set, key).await;
        assert!(self.commit(vec![self.record_write(to, &to_set, key, &v, 0)]).await.is_ok(), "copying failed");
    }
}

#[cfg(feature = "contract-tests")]
impl FirestoreCredentialStore {
    /// The sealed bytes stored for one record (contract tests move them around).
    async fn raw_value(&self, tenant: &TenantId, set: &str, key: &RecordKey) -> Vec<u8> {
        let req = GetDocumentRequest { name: self.record_name(tenant, set, key), ..Default::default() };
        let doc = self.db.client().get().get_document(req).await.expect("record exists").into_inner();
        raw_record(&doc).expect("record decodes").1.to_vec()
    }
}

// ---- encoding ----------------------------------------------------------------------------------------------

/// The collection of one record set.
fn set_collection(set: &str) -> String {
    format!("records-{set}")
}

/// A record's document id: the kind, `~`, and the key in unpadded base64url (document ids cannot hold
/// `/`, and engine keys are arbitrary strings).
fn record_doc_id(key: &RecordKey) -> String {
    format!("{}~{}", key.kind.as_str(), URL_SAFE_NO_PAD.encode(key.key.as_bytes()))
}

/// Waits a little before retrying a lost race, so two writers do not keep colliding: up to 2^attempt x 5 ms
/// (at most 320 ms), with full jitter.
async fn backoff(attempt: usize) {
    let cap_ms = 5u64 << attempt.min(6);
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    tokio::time::sleep(Duration::from_millis(u64::from_le_bytes(b) % (cap_ms + 1))).await;
}

/// 64 random bits, hex: a record set id no two writers pick alike.
fn new_set_id() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(StoreError::Invalid("collection prefix may hold at most 64 of A-Z a-z 0-9 _ -".into()));
    }
    Ok(())
}

fn check_key(key: &RecordKey) -> Result<(), StoreError> {
    if key.key.len() > MAX_RECORD_KEY_LEN {
        return Err(StoreError::Invalid(format!("record key longer than {MAX_RECORD_KEY_LEN} bytes")));
    }
    Ok(())
}

/// Firestore integers are signed 64-bit.
fn check_generation(n: u64) -> Result<(), StoreError> {
    if n > i64::MAX as u64 {
        return Err(StoreError::Invalid("generation or epoch exceeds 2^63-1".into()));
    }
    Ok(())
}

fn int_value(n: u64) -> Value {
    Value { value_type: Some(ValueType::IntegerValue(n as i64)) }
}

fn string_value(s: &str) -> Value {
    Value { value_type: Some(ValueType::StringValue(s.to_owned())) }
}

fn get_u64(doc: &Document, field: &str) -> Result<u64, StoreError> {
    match doc.fields.get(field).and_then(|v| v.value_type.as_ref()) {
        Some(ValueType::IntegerValue(n)) if *n >= 0 => Ok(*n as u64),
        _ => Err(StoreError::Corrupt(format!("firestore meta document field `{field}` is missing or malformed"))),
    }
}

fn get_str<'a>(doc: &'a Document, field: &str) -> Option<&'a str> {
    match doc.fields.get(field).and_then(|v| v.value_type.as_ref()) {
        Some(ValueType::StringValue(s)) => Some(s),
        _ => None,
    }
}

fn parse_meta(doc: &Document) -> Result<Meta, StoreError> {
    let garbage = match doc.fields.get("garbage").and_then(|v| v.value_type.as_ref()) {
        Some(ValueType::ArrayValue(a)) => a
            .values
            .iter()
            .filter_map(|v| match &v.value_type {
                Some(ValueType::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(Meta {
        generation: get_u64(doc, "generation")?,
        max_epoch: get_u64(doc, "max_epoch")?,
        set: get_str(doc, "set").map(str::to_owned),
        garbage,
        update_time: doc
            .update_time
            .ok_or_else(|| StoreError::Unavailable("firestore returned a document without update time".into()))?,
    })
}

/// A record document's address and sealed value, checked against its document id (a document whose
/// fields do not match its name was moved or altered).
fn raw_record(doc: &Document) -> Result<(RecordKey, &[u8]), StoreError> {
    let bad = |what: &str| StoreError::Corrupt(format!("a firestore record document has {what}"));
    let kind = get_str(doc, "kind").and_then(RecordKind::parse).ok_or_else(|| bad("no valid kind"))?;
    let key = RecordKey::new(kind, get_str(doc, "key").ok_or_else(|| bad("no key"))?);
    let sealed = match doc.fields.get("value").and_then(|v| v.value_type.as_ref()) {
        Some(ValueType::BytesValue(b)) => b.as_slice(),
        _ => return Err(bad("no value")),
    };
    if doc.name.rsplit('/').next() != Some(record_doc_id(&key).as_str()) {
        return Err(bad("fields that do not match its id"));
    }
    Ok((key, sealed))
}

/// A status met inside a transaction: `ABORTED` means a writer won a lock conflict; try again.
fn transaction_status(op: &str, s: Status) -> Attempt {
    match s.code() {
        Code::Aborted => Attempt::Raced,
        _ => Attempt::Failed(map_status(op, s)),
    }
}

/// Maps a gRPC status to a store error kind. Outages, overload and timeouts are transient; a request
/// Firestore calls malformed (e.g. a document over its size limit) is invalid.
fn map_status(op: &str, s: Status) -> StoreError {
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => StoreError::Invalid(format!("firestore {op}: {}", s.message())),
        code => StoreError::Unavailable(format!("firestore {op}: {code:?}: {}", s.message())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_are_valid_firestore_ids_and_distinct() {
        let a = record_doc_id(&RecordKey::new(RecordKind::Session, "a/b"));
        let b = record_doc_id(&RecordKey::new(RecordKind::Session, "a_b"));
        assert!(!a.contains('/'));
        assert_ne!(a, b);
        let long = record_doc_id(&RecordKey::new(RecordKind::AppStateMutationMac, "x".repeat(MAX_RECORD_KEY_LEN)));
        assert!(long.len() < 1500, "firestore ids are at most 1500 bytes");
        assert_eq!(record_doc_id(&RecordKey::new(RecordKind::Other, "")), "other~");
    }

    #[test]
    fn set_ids_differ() {
        assert_ne!(new_set_id(), new_set_id());
        assert_eq!(new_set_id().len(), 16);
    }

    #[test]
    fn fencing_refuses_only_older_epochs() {
        let m = Meta { generation: 3, max_epoch: 5, set: None, garbage: vec![], update_time: Timestamp::default() };
        assert!(Meta::fence(Some(&m), 5).is_ok());
        assert!(Meta::fence(Some(&m), 6).is_ok());
        assert!(matches!(
            Meta::fence(Some(&m), 4),
            Err(StoreError::Conflict(Conflict::StaleEpoch { presented: 4, current: 5 }))
        ));
        assert!(Meta::fence(None, 0).is_ok());
    }

    #[test]
    fn transient_codes_are_unavailable() {
        for code in [Code::Unavailable, Code::DeadlineExceeded, Code::ResourceExhausted, Code::Internal] {
            assert!(map_status("x", Status::new(code, "m")).is_transient());
        }
        assert!(matches!(map_status("x", Status::invalid_argument("too big")), StoreError::Invalid(_)));
    }
}
