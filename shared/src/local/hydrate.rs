//! Hydration: bringing a tenant's credentials from the credential store (the source of truth on a fresh
//! container) into the host's local working copy before its client connects.
//!
//! Every outcome is per tenant and distinct, because each leads somewhere else: `Missing` and `Corrupt` are
//! verdicts a person must act on (the tenant is marked), `Unavailable` is transient (retry later, never mark),
//! `Fenced` means another host owns the tenant now.
//!
//! The start-up rule ([`Hydrator::prepare`]): the remote store wins, except when the local working copy is
//! *newer* — the host crashed after writing locally but before replication caught up, and its disk survived.
//! Then the local copy is pushed up first, because overwriting it would throw away Signal state the engine has
//! already used on the wire.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;
use tracing::{info, warn};

use super::LocalCopies;
use super::working_copy::{WorkingCopy, WorkingCopyError};
use crate::crypto::Cipher;
use crate::domain::{CredentialSnapshot, TenantId};
use crate::ports::{CredentialStore, StoreError};

/// How hydrating (or preparing) one tenant ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HydrateOutcome {
    /// The remote snapshot was written as the local working copy.
    Hydrated {
        /// The snapshot's generation.
        generation: u64,
        /// How many records it holds.
        records: usize,
    },
    /// The local copy already has the remote generation; nothing was written.
    UpToDate {
        /// The shared generation.
        generation: u64,
    },
    /// The local copy was newer than the store's and was pushed up (start-up rule).
    PushedLocal {
        /// The local generation now stored remotely.
        generation: u64,
    },
    /// The store has no credentials for the tenant (and there is no usable local copy to push).
    Missing,
    /// The stored credentials exist but cannot restore a device (undecryptable, malformed, incomplete).
    Corrupt(String),
    /// The store (or the local disk) failed transiently; try again later.
    Unavailable(String),
    /// The store refused a push for a stale epoch: another host owns the tenant.
    Fenced(String),
    /// The stored records were sealed with a data key this host does not hold: a host-level fault (the wrong
    /// key was given), never a verdict on the tenant. Nothing was written.
    KeyMismatch {
        /// Fingerprint of the key that sealed them.
        sealed_with: String,
        /// Fingerprint of this host's key.
        holds: String,
    },
}

impl HydrateOutcome {
    /// Whether the local working copy is ready for the engine.
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Hydrated { .. } | Self::UpToDate { .. } | Self::PushedLocal { .. })
    }

    /// Whether trying again later may give another answer.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

fn from_store_error(e: StoreError) -> HydrateOutcome {
    match e {
        StoreError::NotFound => HydrateOutcome::Missing,
        StoreError::Corrupt(reason) => HydrateOutcome::Corrupt(reason),
        StoreError::Conflict(c) => HydrateOutcome::Fenced(c.to_string()),
        StoreError::KeyMismatch { sealed_with, holds } => HydrateOutcome::KeyMismatch { sealed_with, holds },
        // Neither an outage nor a malformed request is a verdict on the tenant's credentials.
        e @ (StoreError::Unavailable(_) | StoreError::Invalid(_)) => HydrateOutcome::Unavailable(e.to_string()),
    }
}

fn local_unavailable(e: impl std::fmt::Display) -> HydrateOutcome {
    HydrateOutcome::Unavailable(format!("local working copy: {e}"))
}

/// A working copy ready for the engine, with how it got ready.
#[derive(Debug)]
pub struct Ready {
    /// Hydrated, up to date, or pushed up.
    pub outcome: HydrateOutcome,
    /// The copy, still open: the engine store takes it over.
    pub copy: WorkingCopy,
}

type Step = Result<Ready, HydrateOutcome>;

/// Runs blocking working-copy I/O on `copy` off the async workers and hands the copy back.
async fn on_copy<T: Send + 'static>(
    mut copy: WorkingCopy,
    f: impl FnOnce(&mut WorkingCopy) -> Result<T, WorkingCopyError> + Send + 'static,
) -> Result<(WorkingCopy, T), HydrateOutcome> {
    let done = tokio::task::spawn_blocking(move || f(&mut copy).map(|value| (copy, value))).await;
    match done {
        Ok(Ok(pair)) => Ok(pair),
        Ok(Err(e)) => Err(local_unavailable(e)),
        Err(e) => Err(local_unavailable(format!("working copy task failed: {e}"))),
    }
}

/// The local copy's generation: `Ok(None)` when absent, `Err(Corrupt)` when it exists but is unreadable.
fn local_generation(copy: &WorkingCopy) -> Result<Option<u64>, HydrateOutcome> {
    match (copy.exists(), copy.generation()) {
        (true, None) => Err(HydrateOutcome::Corrupt("local working copy is corrupt".into())),
        (_, generation) => Ok(generation),
    }
}

/// Reads the snapshot from `store`, checks it can restore a device, and writes it as `copy`'s base.
async fn hydrate_into(store: &dyn CredentialStore, copy: WorkingCopy) -> Step {
    let snapshot = store.read(copy.tenant()).await.map_err(from_store_error)?;
    install(copy, snapshot).await
}

/// Checks `snapshot` and writes it as the local base.
async fn install(copy: WorkingCopy, snapshot: CredentialSnapshot) -> Step {
    if let Err(incomplete) = snapshot.check_restorable() {
        return Err(HydrateOutcome::Corrupt(incomplete.to_string()));
    }
    let (generation, records) = (snapshot.generation, snapshot.records.len());
    // The store holds this snapshot durably: the copy is made durable by the first write that needs it.
    let (copy, ()) = on_copy(copy, move |wc| wc.write_hydrated_base(&snapshot)).await?;
    Ok(Ready { outcome: HydrateOutcome::Hydrated { generation, records }, copy })
}

/// Hydrates one tenant unconditionally: reads the snapshot from `store`, checks it can restore a device, and
/// writes it as the local working copy's base (replacing whatever was there).
pub async fn hydrate(
    store: &dyn CredentialStore,
    data_dir: &Path,
    tenant: &TenantId,
    cipher: &Cipher,
) -> HydrateOutcome {
    let local = LocalCopies::new(data_dir, cipher.clone());
    match local.open_async(tenant).await {
        Ok(copy) => outcome_of(hydrate_into(store, copy).await),
        Err(e) => local_unavailable(e),
    }
}

fn outcome_of(step: Step) -> HydrateOutcome {
    step.map_or_else(|outcome| outcome, |ready| ready.outcome)
}

/// Whether the tenant must be hydrated: there is no (usable) local copy, or the store has a newer generation.
pub async fn needs_hydration(
    store: &dyn CredentialStore,
    data_dir: &Path,
    tenant: &TenantId,
    cipher: &Cipher,
) -> Result<bool, StoreError> {
    let copy = LocalCopies::new(data_dir, cipher.clone())
        .open_async(tenant)
        .await
        .map_err(|e| StoreError::Unavailable(format!("{:?}", local_unavailable(e))))?;
    let local = match local_generation(&copy) {
        Ok(Some(g)) => g,
        Ok(None) | Err(_) => return Ok(true),
    };
    Ok(store.generation(tenant).await?.is_some_and(|remote| remote > local))
}

/// Hydration bound to one credential store and one set of local copies.
#[derive(Clone)]
pub struct Hydrator {
    store: Arc<dyn CredentialStore>,
    local: LocalCopies,
}

impl std::fmt::Debug for Hydrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hydrator").field("local", &self.local).finish_non_exhaustive()
    }
}

impl Hydrator {
    /// A hydrator writing working copies under `data_dir`.
    pub fn new(store: Arc<dyn CredentialStore>, data_dir: impl Into<PathBuf>, cipher: Cipher) -> Self {
        Self::over(store, LocalCopies::new(data_dir, cipher))
    }

    /// A hydrator writing into `local`.
    pub fn over(store: Arc<dyn CredentialStore>, local: LocalCopies) -> Self {
        Self { store, local }
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        self.local.data_dir()
    }

    /// See [`hydrate`].
    pub async fn hydrate(&self, tenant: &TenantId) -> HydrateOutcome {
        match self.local.open_async(tenant).await {
            Ok(copy) => outcome_of(hydrate_into(self.store.as_ref(), copy).await),
            Err(e) => local_unavailable(e),
        }
    }

    /// See [`needs_hydration`].
    pub async fn needs_hydration(&self, tenant: &TenantId) -> Result<bool, StoreError> {
        needs_hydration(self.store.as_ref(), self.local.data_dir(), tenant, self.local.cipher()).await
    }

    /// The start-up rule for a tenant this host now holds the lease for (`epoch`): hydrate from the store,
    /// unless the local copy is newer, in which case it is pushed up (fenced with `epoch`) and kept; when both
    /// have the same generation nothing is written.
    pub async fn prepare(&self, tenant: &TenantId, epoch: u64) -> HydrateOutcome {
        outcome_of(self.prepare_copy(tenant, epoch).await)
    }

    /// [`Hydrator::prepare`], handing the tenant's working copy on, still open, when it is ready: the copy is
    /// opened once for the whole start-up rule and the engine store that follows.
    pub async fn prepare_copy(&self, tenant: &TenantId, epoch: u64) -> Result<Ready, HydrateOutcome> {
        // The fence first: from this commit on the previous owner's batches are refused, so nothing it still
        // sends lands behind what is read below. The claim says where the store stands.
        let remote = self.store.claim(tenant, epoch).await.map_err(from_store_error)?;
        let copy = self.local.open_async(tenant).await.map_err(local_unavailable)?;
        let local = match local_generation(&copy) {
            Ok(g) => g,
            Err(_) => {
                warn!(%tenant, "local working copy is corrupt; hydrating from the credential store");
                None
            }
        };
        // A copy written under an older epoch than the store's last writer belongs to a fenced-off owner: the
        // store holds what a newer owner built on, so the copy loses, whatever its generation.
        let superseded = remote.is_some_and(|r| copy.epoch().is_some_and(|mine| r.epoch > mine));
        let step = match (local, remote.map(|r| r.generation)) {
            (None, None) => Err(HydrateOutcome::Missing),
            (None, Some(_)) => hydrate_into(self.store.as_ref(), copy).await,
            (Some(_), Some(_)) if superseded => {
                info!(%tenant, "local working copy is a former owner's; hydrating from the credential store");
                hydrate_into(self.store.as_ref(), copy).await
            }
            (Some(l), Some(r)) if l == r => self.verify_local(copy, l).await,
            (Some(l), Some(r)) if l < r => hydrate_into(self.store.as_ref(), copy).await,
            (Some(l), r) => self.push_local(copy, epoch, l, r).await,
        };
        step.map(|mut ready| {
            ready.copy.continue_under(epoch);
            ready
        })
    }

    /// Decrypts the whole local copy once before trusting it: a copy that fails is replaced from the store
    /// rather than reported as corrupt credentials (the store's copy is fine).
    async fn verify_local(&self, copy: WorkingCopy, generation: u64) -> Step {
        let tenant = copy.tenant().clone();
        let (copy, scanned) = on_copy(copy, |wc| Ok(wc.scan(|_| {}))).await?;
        match scanned {
            Ok(Some(_)) => Ok(Ready { outcome: HydrateOutcome::UpToDate { generation }, copy }),
            Err(e @ WorkingCopyError::Io { .. }) => Err(local_unavailable(e)),
            Ok(None) | Err(_) => {
                warn!(%tenant, "local working copy does not decrypt; hydrating from the credential store");
                hydrate_into(self.store.as_ref(), copy).await
            }
        }
    }

    /// Pushes a newer local copy up; falls back to the store's copy when the local one turns out unusable.
    async fn push_local(&self, copy: WorkingCopy, epoch: u64, local: u64, remote: Option<u64>) -> Step {
        let tenant = copy.tenant().clone();
        let (copy, loaded) = on_copy(copy, |wc| Ok(wc.load())).await?;
        let snapshot = match loaded {
            Ok(Some(s)) if s.check_restorable().is_ok() => s,
            Err(e @ WorkingCopyError::Io { .. }) => return Err(local_unavailable(e)),
            other => {
                let why = match other {
                    Ok(Some(s)) => s.check_restorable().err().map(|e| e.to_string()).unwrap_or_default(),
                    Ok(None) => "missing".to_string(),
                    Err(e) => e.to_string(),
                };
                warn!(%tenant, reason = %why, "newer local working copy is unusable; using the credential store's");
                return match remote {
                    Some(_) => hydrate_into(self.store.as_ref(), copy).await,
                    None => Err(HydrateOutcome::Missing),
                };
            }
        };
        match self.store.replace(&tenant, &snapshot, epoch).await {
            Ok(()) => {
                info!(%tenant, local, remote = ?remote, "pushed a newer local working copy to the credential store");
                Ok(Ready { outcome: HydrateOutcome::PushedLocal { generation: snapshot.generation }, copy })
            }
            Err(e) => Err(from_store_error(e)),
        }
    }

    /// [`hydrate`] for many tenants, at most `concurrency` at a time, each with its own outcome.
    pub async fn hydrate_many(&self, tenants: Vec<TenantId>, concurrency: usize) -> Vec<(TenantId, HydrateOutcome)> {
        self.for_each(tenants.into_iter().map(|t| (t, None)).collect(), concurrency).await
    }

    /// [`Hydrator::prepare`] for many `(tenant, epoch)` pairs, at most `concurrency` at a time.
    pub async fn prepare_many(
        &self,
        tenants: Vec<(TenantId, u64)>,
        concurrency: usize,
    ) -> Vec<(TenantId, HydrateOutcome)> {
        self.for_each(tenants.into_iter().map(|(t, e)| (t, Some(e))).collect(), concurrency).await
    }

    async fn for_each(
        &self,
        tenants: Vec<(TenantId, Option<u64>)>,
        concurrency: usize,
    ) -> Vec<(TenantId, HydrateOutcome)> {
        futures_util::stream::iter(tenants)
            .map(|(tenant, epoch)| {
                let this = self.clone();
                async move {
                    // Each tenant runs in its own task so that even a panic stays that tenant's problem.
                    let t = tenant.clone();
                    let outcome = tokio::spawn(async move {
                        match epoch {
                            Some(epoch) => this.prepare(&t, epoch).await,
                            None => this.hydrate(&t).await,
                        }
                    })
                    .await
                    .unwrap_or_else(|e| HydrateOutcome::Unavailable(format!("hydration task failed: {e}")));
                    (tenant, outcome)
                }
            })
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await
    }
}
