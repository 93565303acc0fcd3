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

use crate::crypto::Cipher;
use crate::domain::{CredentialSnapshot, TenantId};
use crate::ports::{CredentialStore, StoreError};
use crate::working_copy::{WorkingCopy, WorkingCopyError};

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
        // Neither an outage nor a malformed request is a verdict on the tenant's credentials.
        e @ (StoreError::Unavailable(_) | StoreError::Invalid(_)) => HydrateOutcome::Unavailable(e.to_string()),
    }
}

fn local_unavailable(e: impl std::fmt::Display) -> HydrateOutcome {
    HydrateOutcome::Unavailable(format!("local working copy: {e}"))
}

/// Runs blocking working-copy I/O off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("working copy task failed: {e}"))
}

/// Hydrates one tenant unconditionally: reads the snapshot from `store`, checks it can restore a device, and
/// writes it as the local working copy's base (replacing whatever was there).
pub async fn hydrate(
    store: &dyn CredentialStore,
    data_dir: &Path,
    tenant: &TenantId,
    cipher: &Cipher,
) -> HydrateOutcome {
    let snapshot = match store.read(tenant).await {
        Ok(s) => s,
        Err(e) => return from_store_error(e),
    };
    install(data_dir, tenant, cipher, snapshot).await
}

/// Checks `snapshot` and writes it as the local base.
async fn install(data_dir: &Path, tenant: &TenantId, cipher: &Cipher, snapshot: CredentialSnapshot) -> HydrateOutcome {
    if let Err(incomplete) = snapshot.check_restorable() {
        return HydrateOutcome::Corrupt(incomplete.to_string());
    }
    let (data_dir, tenant, cipher) = (data_dir.to_path_buf(), tenant.clone(), cipher.clone());
    let result = blocking(move || {
        let mut wc = WorkingCopy::open(&data_dir, tenant, cipher)?;
        // The store holds this snapshot durably: the copy is made durable by the first write that needs it.
        wc.write_hydrated_base(&snapshot)?;
        Ok::<_, WorkingCopyError>((snapshot.generation, snapshot.records.len()))
    })
    .await;
    match result {
        Ok(Ok((generation, records))) => HydrateOutcome::Hydrated { generation, records },
        Ok(Err(e)) => local_unavailable(e),
        Err(e) => local_unavailable(e),
    }
}

/// The local working copy's generation: `Ok(None)` when absent, `Err` when it exists but is corrupt.
async fn local_generation(data_dir: &Path, tenant: &TenantId, cipher: &Cipher) -> Result<Option<u64>, HydrateOutcome> {
    let (data_dir, tenant, cipher) = (data_dir.to_path_buf(), tenant.clone(), cipher.clone());
    match blocking(move || WorkingCopy::open(&data_dir, tenant, cipher).map(|wc| (wc.exists(), wc.generation()))).await
    {
        Ok(Ok((true, None))) => Err(HydrateOutcome::Corrupt("local working copy is corrupt".into())),
        Ok(Ok((_, generation))) => Ok(generation),
        Ok(Err(e)) => Err(local_unavailable(e)),
        Err(e) => Err(local_unavailable(e)),
    }
}

/// Whether the tenant must be hydrated: there is no (usable) local copy, or the store has a newer generation.
pub async fn needs_hydration(
    store: &dyn CredentialStore,
    data_dir: &Path,
    tenant: &TenantId,
    cipher: &Cipher,
) -> Result<bool, StoreError> {
    let local = match local_generation(data_dir, tenant, cipher).await {
        Ok(Some(g)) => g,
        Ok(None) | Err(HydrateOutcome::Corrupt(_)) => return Ok(true),
        Err(other) => return Err(StoreError::Unavailable(format!("{other:?}"))),
    };
    Ok(store.generation(tenant).await?.is_some_and(|remote| remote > local))
}

/// Hydrates many tenants, at most `concurrency` at a time. Every tenant gets its own outcome; one tenant's
/// failure (or panic) never affects another's.
pub async fn hydrate_many(
    store: Arc<dyn CredentialStore>,
    data_dir: &Path,
    cipher: &Cipher,
    tenants: Vec<TenantId>,
    concurrency: usize,
) -> Vec<(TenantId, HydrateOutcome)> {
    Hydrator::new(store, data_dir, cipher.clone()).hydrate_many(tenants, concurrency).await
}

/// Hydration bound to one credential store, data dir and data key.
#[derive(Clone)]
pub struct Hydrator {
    store: Arc<dyn CredentialStore>,
    data_dir: PathBuf,
    cipher: Cipher,
}

impl std::fmt::Debug for Hydrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hydrator").field("data_dir", &self.data_dir).finish_non_exhaustive()
    }
}

impl Hydrator {
    /// A hydrator writing working copies under `data_dir`.
    pub fn new(store: Arc<dyn CredentialStore>, data_dir: impl Into<PathBuf>, cipher: Cipher) -> Self {
        Self { store, data_dir: data_dir.into(), cipher }
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// See [`hydrate`].
    pub async fn hydrate(&self, tenant: &TenantId) -> HydrateOutcome {
        hydrate(self.store.as_ref(), &self.data_dir, tenant, &self.cipher).await
    }

    /// See [`needs_hydration`].
    pub async fn needs_hydration(&self, tenant: &TenantId) -> Result<bool, StoreError> {
        needs_hydration(self.store.as_ref(), &self.data_dir, tenant, &self.cipher).await
    }

    /// The start-up rule for a tenant this host now holds the lease for (`epoch`): hydrate from the store,
    /// unless the local copy is newer, in which case it is pushed up (fenced with `epoch`) and kept; when both
    /// have the same generation nothing is written.
    pub async fn prepare(&self, tenant: &TenantId, epoch: u64) -> HydrateOutcome {
        let remote = match self.store.generation(tenant).await {
            Ok(g) => g,
            Err(e) => return from_store_error(e),
        };
        let local = match local_generation(&self.data_dir, tenant, &self.cipher).await {
            Ok(g) => g,
            Err(HydrateOutcome::Corrupt(_)) => {
                warn!(%tenant, "local working copy is corrupt; hydrating from the credential store");
                None
            }
            Err(other) => return other,
        };
        match (local, remote) {
            (None, None) => HydrateOutcome::Missing,
            (None, Some(_)) => self.hydrate(tenant).await,
            (Some(l), Some(r)) if l == r => self.verify_local(tenant, l).await,
            (Some(l), Some(r)) if l < r => self.hydrate(tenant).await,
            (Some(l), r) => self.push_local(tenant, epoch, l, r).await,
        }
    }

    /// Decrypts the whole local copy once before trusting it: a copy that fails is replaced from the store
    /// rather than reported as corrupt credentials (the store's copy is fine).
    async fn verify_local(&self, tenant: &TenantId, generation: u64) -> HydrateOutcome {
        let (data_dir, t, cipher) = (self.data_dir.clone(), tenant.clone(), self.cipher.clone());
        match blocking(move || WorkingCopy::open(&data_dir, t, cipher)?.scan(|_| {})).await {
            Ok(Ok(Some(_))) => HydrateOutcome::UpToDate { generation },
            Ok(Err(e @ WorkingCopyError::Io { .. })) => local_unavailable(e),
            Err(e) => local_unavailable(e),
            Ok(Ok(None) | Err(_)) => {
                warn!(%tenant, "local working copy does not decrypt; hydrating from the credential store");
                self.hydrate(tenant).await
            }
        }
    }

    /// Pushes a newer local copy up; falls back to the store's copy when the local one turns out unusable.
    async fn push_local(&self, tenant: &TenantId, epoch: u64, local: u64, remote: Option<u64>) -> HydrateOutcome {
        let (data_dir, t, cipher) = (self.data_dir.clone(), tenant.clone(), self.cipher.clone());
        let loaded = blocking(move || WorkingCopy::open(&data_dir, t, cipher)?.load()).await;
        let snapshot = match loaded {
            Ok(Ok(Some(s))) if s.check_restorable().is_ok() => s,
            Ok(Err(e @ WorkingCopyError::Io { .. })) => return local_unavailable(e),
            Err(e) => return local_unavailable(e),
            Ok(other) => {
                let why = match other {
                    Ok(Some(s)) => s.check_restorable().err().map(|e| e.to_string()).unwrap_or_default(),
                    Ok(None) => "missing".to_string(),
                    Err(e) => e.to_string(),
                };
                warn!(%tenant, reason = %why, "newer local working copy is unusable; using the credential store's");
                return match remote {
                    Some(_) => self.hydrate(tenant).await,
                    None => HydrateOutcome::Missing,
                };
            }
        };
        match self.store.replace(tenant, &snapshot, epoch).await {
            Ok(()) => {
                info!(%tenant, local, remote = ?remote, "pushed a newer local working copy to the credential store");
                HydrateOutcome::PushedLocal { generation: snapshot.generation }
            }
            Err(e) => from_store_error(e),
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
