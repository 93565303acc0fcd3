//! [`CredentialStore`] on Cloud Firestore.
//!
//! # Layout
//! ```text
//! {prefix}tenants/{tenant}                         meta document, one per tenant
//!     generation  integer   the committed generation
//!     write_epoch integer   the epoch of the writer of `generation` (its retries are "already applied")
//!     max_epoch   integer   the fence: the newest epoch claimed or written; older epochs are refused
//!     set         string    id of the live record set (absent: the tenant was deleted, a tombstone)
//!     garbage     array     ids of dead record sets still to be deleted
//!     sealed_by   array     fingerprints of the data keys that sealed the live set's records (absent: written
//!                           before fingerprints were kept)
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

use crate::crypto::{Cipher, KeyFingerprint};
use crate::domain::{
    ChangeBatch, CredentialSnapshot, MAX_RECORD_KEY_LEN, MAX_RECORD_VALUE_LEN, MAX_WRITES_PER_COMMIT, RecordKey,
    RecordKind, TenantId,
};
use crate::ports::{Conflict, CredentialStore, StoreError, StoredAt};

/// Largest sealed value stored in one record document: Firestore caps a document at 1 MiB, and the
/// document's name and other fields need room too. Holds every [`MAX_RECORD_VALUE_LEN`] value once sealed.
pub const MAX_SEALED_VALUE_LEN: usize = 1_000_000;
const _: () = assert!(MAX_RECORD_VALUE_LEN + crate::crypto::SEAL_OVERHEAD <= MAX_SEALED_VALUE_LEN);

/// The largest answer the client decodes (tonic's default is 4 MiB): a page of records is asked again smaller
/// when it outgrows this, so one document of up to 1 MiB always fits.
const MAX_MESSAGE_LEN: usize = 16 * 1024 * 1024;

/// Whether a call failed because its answer outgrew the client's message limit.
fn page_too_large(s: &Status) -> bool {
    matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted) && s.message().contains("message length too large")
}

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
    /// The epoch of the writer of `generation`; 0 when it was written before the field existed.
    write_epoch: u64,
    max_epoch: u64,
    /// `None` for a tombstone (the tenant was deleted; `max_epoch` still fences stale writers).
    set: Option<String>,
    garbage: Vec<String>,
    /// Fingerprints of the keys that sealed the live set's records; empty when unknown (older records).
    sealed_by: Vec<String>,
    update_time: Timestamp,
}

impl Meta {
    /// What a commit on top of `base` starts from: `base` itself, or a tenant with nothing stored.
    fn successor(base: Option<&Meta>) -> Meta {
        base.cloned().unwrap_or(Meta {
            generation: 0,
            write_epoch: 0,
            max_epoch: 0,
            set: None,
            garbage: Vec::new(),
            sealed_by: Vec::new(),
            update_time: Timestamp::default(),
        })
    }

    /// The keys of a set that gets records sealed by `fingerprint` on top of this one's.
    fn sealed_also_by(&self, fingerprint: &KeyFingerprint) -> Vec<String> {
        let mut keys = if self.set.is_some() { self.sealed_by.clone() } else { Vec::new() };
        if !keys.iter().any(|k| k == fingerprint.as_str()) {
            keys.push(fingerprint.as_str().to_owned());
        }
        keys
    }

    /// Whether a batch of `epoch` at `generation` is the stored generation's writer retrying it.
    fn already_applied(meta: Option<&Meta>, epoch: u64, generation: u64) -> bool {
        meta.filter(|m| m.set.is_some()).is_some_and(|m| m.write_epoch == epoch && generation <= m.generation)
    }

    /// The precondition a commit puts on the meta document it read as `meta`: unchanged since then.
    fn precondition(meta: Option<&Meta>) -> Precondition {
        Precondition {
            condition_type: Some(match meta {
                Some(m) => precondition::ConditionType::UpdateTime(m.update_time),
                None => precondition::ConditionType::Exists(false),
            }),
        }
    }

    /// Refuses a host that does not hold every key that sealed the live set: it could not read those records,
    /// and what it wrote would mix keys it alone knows into them.
    fn check_keys(meta: Option<&Meta>, cipher: &Cipher) -> Result<(), StoreError> {
        let Some(m) = meta.filter(|m| m.set.is_some()) else { return Ok(()) };
        match m.sealed_by.iter().find(|k| !KeyFingerprint::parse(k).is_some_and(|fp| cipher.holds(&fp))) {
            Some(missing) => {
                Err(StoreError::KeyMismatch { sealed_with: missing.clone(), holds: cipher.fingerprint().to_string() })
            }
            None => Ok(()),
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
        Self::connect(FirestoreDbOptions::new(project_id.into()), cipher, collection_prefix).await
    }

    /// [`new`](Self::new) with the client's options given (another database or API URL). Connects on the
    /// process's one TLS stack ([`crate::tls`]): tonic builds its TLS configuration from the process default and
    /// panics when there is none to find.
    pub async fn connect(
        options: FirestoreDbOptions,
        cipher: Cipher,
        collection_prefix: impl Into<String>,
    ) -> Result<Self, StoreError> {
        Self::connect_with(options, &FirestoreAuth::Default, cipher, collection_prefix).await
    }

    /// [`new`](Self::new), authenticating as `auth` says.
    pub async fn new_with(
        project_id: impl Into<String>,
        auth: &FirestoreAuth,
        cipher: Cipher,
        collection_prefix: impl Into<String>,
    ) -> Result<Self, StoreError> {
        Self::connect_with(FirestoreDbOptions::new(project_id.into()), auth, cipher, collection_prefix).await
    }

    /// [`connect`](Self::connect), authenticating as `auth` says.
    pub async fn connect_with(
        options: FirestoreDbOptions,
        auth: &FirestoreAuth,
        cipher: Cipher,
        collection_prefix: impl Into<String>,
    ) -> Result<Self, StoreError> {
        crate::tls::install_crypto_provider();
        let db = auth.connect(options).await?;
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

    /// The cipher records are sealed and opened with.
    pub fn cipher(&self) -> &Cipher {
        &self.cipher
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
}

mod auth;
mod calls;
#[cfg(feature = "contract-tests")]
mod contract_hooks;
mod encoding;
mod lazy;
mod reseal;
mod store;
#[cfg(test)]
mod tests;

pub use auth::FirestoreAuth;
use encoding::*;
pub use lazy::LazyFirestoreCredentialStore;
pub use reseal::Resealed;
