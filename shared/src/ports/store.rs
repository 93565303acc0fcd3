//! The storage ports: the credential store and the tenant table, and the error kinds of both.

use async_trait::async_trait;

use crate::domain::{ChangeBatch, CredentialSnapshot, Lease, StatusUpdate, TenantId, TenantRecord, UnixMillis};

/// What went wrong in a store, as a kind the caller can branch on. Messages never carry secrets.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The thing asked for does not exist (e.g. a tenant with no stored credentials).
    #[error("not found")]
    NotFound,
    /// Stored data exists but cannot be used (undecryptable, malformed, partial). Definitive.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A write lost a race or was fenced: a stale epoch, a lease held by another owner.
    #[error("conflict: {0}")]
    Conflict(Conflict),
    /// The store could not be reached or failed transiently. Retry later; never a reason to mark a tenant.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The request itself was malformed (e.g. too many writes in one batch).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The tenant's records were sealed with a data key this process does not hold (a host started with the
    /// wrong key). Not a verdict on the credentials: the right key reads them, so nobody is marked.
    #[error("records sealed with data key {sealed_with}, which this host does not hold (its key is {holds})")]
    KeyMismatch {
        /// Fingerprint of the key that sealed them.
        sealed_with: String,
        /// Fingerprint of this process's key.
        holds: String,
    },
}

/// The kinds of [`StoreError::Conflict`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// The writer's epoch is older than one the store has already accepted: another host owns the tenant.
    #[error("stale epoch {presented} (store has seen {current})")]
    StaleEpoch {
        /// The epoch the writer presented.
        presented: u64,
        /// The newest epoch the store has accepted.
        current: u64,
    },
    /// The lease is held by another owner until it expires.
    #[error("lease held by another host")]
    LeaseHeld {
        /// The holder's lease.
        holder: Lease,
    },
    /// The lease presented is no longer the current one (expired and taken, or released).
    #[error("lease lost")]
    LeaseLost,
}

impl StoreError {
    /// Whether retrying later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A page of results and the token for the next page (`None` at the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items of this page.
    pub items: Vec<T>,
    /// Pass to the next call to continue; `None` when there is no more.
    pub next: Option<String>,
}

/// Where a tenant's stored snapshot stands: its generation, and the epoch of the owner that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredAt {
    /// The lease epoch of the last write (0 for snapshots written before epochs were stored).
    pub epoch: u64,
    /// The stored generation.
    pub generation: u64,
}

/// Durable store of every tenant's credential snapshot (Firestore in the cloud, redb on one machine).
/// Values are sealed with [`crate::crypto::Cipher`] before they leave the process.
#[async_trait]
pub trait CredentialStore: Send + Sync {
    /// The tenant's whole snapshot. `NotFound` when nothing is stored; `Corrupt` when anything stored
    /// does not decrypt or decode; `Unavailable` on an outage.
    async fn read(&self, tenant: &TenantId) -> Result<CredentialSnapshot, StoreError>;

    /// The stored generation, without reading the records. `None` when nothing is stored.
    async fn generation(&self, tenant: &TenantId) -> Result<Option<u64>, StoreError>;

    /// Commits a batch atomically, ordered by `(epoch, generation)`. A batch whose epoch is below the fence
    /// (the newest epoch claimed or written) is refused with `Conflict(StaleEpoch)`. A batch of the same epoch
    /// as the stored generation's writer whose generation is not above it is that writer's retry after a lost
    /// acknowledgement, acknowledged without change; every other batch is applied, so two owners' generations
    /// never collide. At most [`crate::domain::MAX_WRITES_PER_COMMIT`] changes per batch.
    async fn write(&self, tenant: &TenantId, batch: &ChangeBatch) -> Result<(), StoreError>;

    /// Replaces the whole stored snapshot (imports, pushing up a newer local copy), fenced like `write`.
    async fn replace(&self, tenant: &TenantId, snapshot: &CredentialSnapshot, epoch: u64) -> Result<(), StoreError>;

    /// Advances the tenant's fence to `epoch` without touching its records: from this commit on, every write
    /// of an older epoch is refused. A new owner claims before it reads, so nothing the old owner still sends
    /// lands behind what the new owner hydrated. Returns where the stored snapshot stands as of the claim
    /// (`None` when nothing is stored), which no older writer can change any more. Claiming the current fence
    /// again is not an error; `Conflict(StaleEpoch)` when a newer epoch has claimed or written already.
    async fn claim(&self, tenant: &TenantId, epoch: u64) -> Result<Option<StoredAt>, StoreError>;

    /// Deletes everything stored for the tenant (logout), fenced like `write`; the fence stays behind, so
    /// no late batch of an older epoch brings the tenant back. Deleting nothing is not an error.
    async fn delete(&self, tenant: &TenantId, epoch: u64) -> Result<(), StoreError>;

    /// Every tenant that has stored credentials.
    async fn list_tenants(&self) -> Result<Vec<TenantId>, StoreError>;
}

/// The tenant table (DynamoDB in the cloud, redb on one machine): desired state, status, failures, leases.
#[async_trait]
pub trait TenantStore: Send + Sync {
    /// One page of the tenants whose desired flag is set, in a stable order.
    async fn list_desired(&self, page_token: Option<String>, limit: usize) -> Result<Page<TenantRecord>, StoreError>;

    /// One tenant's record.
    async fn get(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, StoreError>;

    /// Creates or overwrites a record's desired flag, keeping its status, counters and lease
    /// (imports, operators). Creates the record when absent.
    async fn set_desired(&self, tenant: &TenantId, desired: bool) -> Result<(), StoreError>;

    /// Writes the status only if it differs from the stored one; returns whether a write happened.
    /// A `Connected` status also stamps `last_healthy_at` (only when written).
    async fn write_status(&self, tenant: &TenantId, update: &StatusUpdate, now: UnixMillis)
    -> Result<bool, StoreError>;

    /// `write_status` on behalf of a lease holder: written only while the tenant's lease is still `holder`'s
    /// (same owner and epoch), so a host that lost the tenant never marks it. `Conflict(LeaseLost)`, and
    /// nothing written, otherwise.
    async fn write_status_as_holder(
        &self,
        tenant: &TenantId,
        holder: &Lease,
        update: &StatusUpdate,
        now: UnixMillis,
    ) -> Result<bool, StoreError>;

    /// Adds one to the consecutive failure count and returns the new count.
    async fn record_failure(&self, tenant: &TenantId) -> Result<u32, StoreError>;

    /// Resets the failure count and stamps `last_healthy_at`; writes nothing when the count is already 0.
    /// Returns whether a write happened.
    async fn reset_failures(&self, tenant: &TenantId, now: UnixMillis) -> Result<bool, StoreError>;

    /// Takes the lease for `owner` if it is free (never taken, or released), already `owner`'s (a host
    /// restarting under the same id takes its leases back at once), or still exactly `stale`: a lease the
    /// caller has seen unchanged (owner, epoch, version) for a full lease duration on its own monotonic clock.
    /// The epoch always rises. `Conflict(LeaseHeld)` with the current lease otherwise; no wall clock is ever
    /// compared, `now + ttl_ms` is only stored for operators to read.
    async fn acquire_lease(
        &self,
        tenant: &TenantId,
        owner: &str,
        stale: Option<&Lease>,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<Lease, StoreError>;

    /// Renews a held lease: same epoch, the version rises. `Conflict(LeaseLost)` when it is no longer the
    /// current holding (taken over or released). The holder, not the store, decides when it may no longer use
    /// a lease it failed to renew.
    async fn renew_lease(
        &self,
        tenant: &TenantId,
        lease: &Lease,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<Lease, StoreError>;

    /// Gives a held lease up at once (expiry set to 0, epoch kept). Releasing a lost lease is not an error.
    async fn release_lease(&self, tenant: &TenantId, lease: &Lease) -> Result<(), StoreError>;
}
