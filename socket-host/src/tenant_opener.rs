//! Opens a tenant for its session (the production [`EngineProvider`]): the start-up rule (hydrate from the
//! credential store, or push a newer local copy up) on the tenant's working copy, opened once, then the engine
//! store over that same copy, replicating under the lease's epoch.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use wakeeper_shared::domain::TenantId;
use wakeeper_shared::local::{HydrateOutcome, Hydrator, LocalCopies, WorkingCopy};
use wakeeper_shared::ports::{CredentialStore, StoreError};
use whatsapp_rust::store::traits::Backend;

use crate::engine_store::{EngineStore, EngineStoreError};
use crate::key_check::KeyCheck;
use crate::replicator::{Replica, ReplicatorHandle};
use crate::session::{EngineProvider, OpenError, Stored};

/// The production [`EngineProvider`].
pub struct TenantOpener {
    store: Arc<dyn CredentialStore>,
    hydrator: Hydrator,
    replicator: ReplicatorHandle,
    local: LocalCopies,
    keys: Arc<KeyCheck>,
}

impl TenantOpener {
    /// Opens tenants from `store` into the working copies of `local`, replicated by `replicator`; tenants
    /// refused for their data key are reported to `keys`.
    pub fn new(
        store: Arc<dyn CredentialStore>,
        local: LocalCopies,
        replicator: ReplicatorHandle,
        keys: Arc<KeyCheck>,
    ) -> Self {
        Self { hydrator: Hydrator::over(store.clone(), local.clone()), store, replicator, local, keys }
    }

    /// A store error as an open error; a key mismatch is reported to the key check on the way.
    fn store_refusal(&self, tenant: &TenantId, e: StoreError) -> OpenError {
        match e {
            StoreError::KeyMismatch { sealed_with, holds } => self.key_refusal(tenant, &sealed_with, &holds),
            other => unavailable(other),
        }
    }

    fn key_refusal(&self, tenant: &TenantId, sealed_with: &str, holds: &str) -> OpenError {
        self.keys.refused(tenant, sealed_with, holds);
        OpenError::KeyMismatch(format!(
            "credentials sealed with data key {sealed_with}, which this host (key {holds}) does not hold"
        ))
    }
}

fn unavailable(e: impl std::fmt::Display) -> OpenError {
    OpenError::Unavailable(e.to_string())
}

/// The engine store over `copy` (blocking work, off the async workers).
async fn engine_store(copy: WorkingCopy, replica: Replica) -> Result<Arc<dyn Backend>, OpenError> {
    let opened = tokio::task::spawn_blocking(move || {
        EngineStore::open(copy, replica).map_err(|e| match e {
            // A record that does not decode is bad credentials; a disk hiccup is not.
            EngineStoreError::Malformed(_) => OpenError::Corrupt(e.to_string()),
            other => unavailable(other),
        })
    })
    .await
    .map_err(unavailable)??;
    Ok(opened as Arc<dyn Backend>)
}

#[async_trait]
impl EngineProvider for TenantOpener {
    async fn open(&self, tenant: &TenantId, epoch: u64) -> Result<Arc<dyn Backend>, OpenError> {
        let ready = self.hydrator.prepare_copy(tenant, epoch).await.map_err(|outcome| match outcome {
            HydrateOutcome::Missing => OpenError::Missing,
            HydrateOutcome::Corrupt(why) => OpenError::Corrupt(why),
            HydrateOutcome::Unavailable(why) | HydrateOutcome::Fenced(why) => OpenError::Unavailable(why),
            HydrateOutcome::KeyMismatch { sealed_with, holds } => self.key_refusal(tenant, &sealed_with, &holds),
            other => OpenError::Unavailable(format!("{other:?}")),
        })?;
        self.keys.opened(tenant);
        engine_store(ready.copy, self.replicator.attach(tenant.clone(), epoch)).await
    }

    async fn stored(&self, tenant: &TenantId) -> Result<Stored, OpenError> {
        match self.store.read(tenant).await {
            Ok(snapshot) if snapshot.check_restorable().is_ok() => Ok(Stored::Restorable),
            Ok(_) | Err(StoreError::Corrupt(_)) => Ok(Stored::Unusable),
            Err(StoreError::NotFound) => Ok(Stored::Missing),
            Err(e) => Err(self.store_refusal(tenant, e)),
        }
    }

    async fn open_new(&self, tenant: &TenantId, epoch: u64) -> Result<Arc<dyn Backend>, OpenError> {
        // What was stored cannot bring a device back (the caller checked), and the new device's generations
        // start again from zero: a stale snapshot left in the store would make them look already applied.
        self.store.delete(tenant, epoch).await.map_err(|e| self.store_refusal(tenant, e))?;
        let copy = self
            .local
            .with_copy(tenant, move |mut copy| {
                copy.delete()?;
                copy.continue_under(epoch);
                Ok(copy)
            })
            .await
            .map_err(unavailable)?;
        engine_store(copy, self.replicator.attach(tenant.clone(), epoch)).await
    }

    async fn persist(&self, tenant: &TenantId, within: Duration) -> Result<(), OpenError> {
        let deadline = tokio::time::Instant::now() + within;
        if !self.replicator.flush_tenant(tenant, deadline).await {
            return Err(unavailable("replication to the credential store did not finish in time"));
        }
        let snapshot = self.store.read(tenant).await.map_err(|e| match e {
            StoreError::Corrupt(why) => OpenError::Corrupt(why),
            other => unavailable(other),
        })?;
        snapshot.check_restorable().map(|_| ()).map_err(|e| OpenError::Corrupt(e.to_string()))
    }

    async fn delete(&self, tenant: &TenantId, epoch: u64) -> Result<(), OpenError> {
        // A batch still queued or in flight would land after the delete under the same epoch and bring the
        // tenant back: let them finish first, or delete nothing.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        if !self.replicator.flush_tenant(tenant, deadline).await {
            return Err(unavailable("replication to the credential store did not drain before the delete"));
        }
        self.store.delete(tenant, epoch).await.map_err(unavailable)?;
        self.discard_local(tenant).await?;
        self.replicator.forget(tenant);
        Ok(())
    }

    async fn import_marker(&self, tenant: &TenantId) -> Option<Vec<u8>> {
        let local = self.local.clone();
        let tenant = tenant.clone();
        tokio::task::spawn_blocking(move || crate::import::read_marker(&local, &tenant)).await.ok().flatten()
    }

    async fn discard_local(&self, tenant: &TenantId) -> Result<(), OpenError> {
        self.local.with_copy(tenant, |mut copy| copy.delete()).await.map_err(unavailable)
    }
}
