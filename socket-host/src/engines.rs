//! Opens a tenant's engine store: the start-up rule (hydrate from the credential store, or push a newer local
//! copy up), then the engine's `Backend` over the local working copy, replicating under the lease's epoch.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use wakeeper_shared::crypto::Cipher;
use wakeeper_shared::domain::TenantId;
use wakeeper_shared::hydrate::{HydrateOutcome, Hydrator};
use wakeeper_shared::ports::{CredentialStore, StoreError};
use wakeeper_shared::working_copy::WorkingCopy;
use whatsapp_rust::store::traits::Backend;

use crate::engine_store::{EngineStore, EngineStoreError};
use crate::replicator::ReplicatorHandle;
use crate::session::{EngineProvider, OpenError, Stored};

/// The production [`EngineProvider`].
pub struct StoreEngines {
    store: Arc<dyn CredentialStore>,
    hydrator: Hydrator,
    replicator: ReplicatorHandle,
    data_dir: PathBuf,
    cipher: Cipher,
}

impl StoreEngines {
    /// Engines over `store`, with working copies under `data_dir`, replicated by `replicator`.
    pub fn new(
        store: Arc<dyn CredentialStore>,
        data_dir: impl Into<PathBuf>,
        cipher: Cipher,
        replicator: ReplicatorHandle,
    ) -> Self {
        let data_dir = data_dir.into();
        Self {
            hydrator: Hydrator::new(store.clone(), data_dir.clone(), cipher.clone()),
            store,
            replicator,
            data_dir,
            cipher,
        }
    }
}

#[async_trait]
impl EngineProvider for StoreEngines {
    async fn open(&self, tenant: &TenantId, epoch: u64) -> Result<Arc<dyn Backend>, OpenError> {
        match self.hydrator.prepare(tenant, epoch).await {
            outcome if outcome.is_ready() => {}
            HydrateOutcome::Missing => return Err(OpenError::Missing),
            HydrateOutcome::Corrupt(why) => return Err(OpenError::Corrupt(why)),
            HydrateOutcome::Unavailable(why) | HydrateOutcome::Fenced(why) => return Err(OpenError::Unavailable(why)),
            other => return Err(OpenError::Unavailable(format!("{other:?}"))),
        }
        let (data_dir, t, cipher) = (self.data_dir.clone(), tenant.clone(), self.cipher.clone());
        let replica = self.replicator.attach(tenant.clone(), epoch);
        let opened = tokio::task::spawn_blocking(move || {
            let wc = WorkingCopy::open(&data_dir, t, cipher).map_err(|e| OpenError::Unavailable(e.to_string()))?;
            EngineStore::open(wc, replica).map_err(|e| match e {
                // A record that does not decode is bad credentials; a disk hiccup is not.
                EngineStoreError::Malformed(_) => OpenError::Corrupt(e.to_string()),
                other => OpenError::Unavailable(other.to_string()),
            })
        })
        .await
        .map_err(|e| OpenError::Unavailable(e.to_string()))??;
        Ok(opened as Arc<dyn Backend>)
    }

    async fn stored(&self, tenant: &TenantId) -> Result<Stored, OpenError> {
        match self.store.read(tenant).await {
            Ok(snapshot) if snapshot.check_restorable().is_ok() => Ok(Stored::Restorable),
            Ok(_) | Err(StoreError::Corrupt(_)) => Ok(Stored::Unusable),
            Err(StoreError::NotFound) => Ok(Stored::Missing),
            Err(e) => Err(OpenError::Unavailable(e.to_string())),
        }
    }

    async fn open_new(&self, tenant: &TenantId, epoch: u64) -> Result<Arc<dyn Backend>, OpenError> {
        // What was stored cannot bring a device back (the caller checked), and the new device's generations
        // start again from zero: a stale snapshot left in the store would make them look already applied.
        self.store.delete(tenant).await.map_err(|e| OpenError::Unavailable(e.to_string()))?;
        self.discard_local(tenant).await?;
        let replica = self.replicator.attach(tenant.clone(), epoch);
        let (data_dir, t, cipher) = (self.data_dir.clone(), tenant.clone(), self.cipher.clone());
        let opened = tokio::task::spawn_blocking(move || {
            let wc = WorkingCopy::open(&data_dir, t, cipher).map_err(|e| OpenError::Unavailable(e.to_string()))?;
            EngineStore::open(wc, replica).map_err(|e| OpenError::Unavailable(e.to_string()))
        })
        .await
        .map_err(|e| OpenError::Unavailable(e.to_string()))??;
        Ok(opened as Arc<dyn Backend>)
    }

    async fn persist(&self, tenant: &TenantId, within: Duration) -> Result<(), OpenError> {
        let deadline = tokio::time::Instant::now() + within;
        if !self.replicator.flush_tenant(tenant, deadline).await {
            return Err(OpenError::Unavailable("replication to the credential store did not finish in time".into()));
        }
        let snapshot = self.store.read(tenant).await.map_err(|e| match e {
            StoreError::Corrupt(why) => OpenError::Corrupt(why),
            other => OpenError::Unavailable(other.to_string()),
        })?;
        snapshot.check_restorable().map(|_| ()).map_err(|e| OpenError::Corrupt(e.to_string()))
    }

    async fn delete(&self, tenant: &TenantId) -> Result<(), OpenError> {
        self.store.delete(tenant).await.map_err(|e| OpenError::Unavailable(e.to_string()))?;
        self.discard_local(tenant).await?;
        self.replicator.forget(tenant);
        Ok(())
    }

    async fn import_marker(&self, tenant: &TenantId) -> Option<Vec<u8>> {
        let (data_dir, t, cipher) = (self.data_dir.clone(), tenant.clone(), self.cipher.clone());
        tokio::task::spawn_blocking(move || crate::import::read_marker(&data_dir, &t, &cipher)).await.ok().flatten()
    }

    async fn discard_local(&self, tenant: &TenantId) -> Result<(), OpenError> {
        let (data_dir, t, cipher) = (self.data_dir.clone(), tenant.clone(), self.cipher.clone());
        tokio::task::spawn_blocking(move || WorkingCopy::open(&data_dir, t, cipher).and_then(|mut wc| wc.delete()))
            .await
            .map_err(|e| OpenError::Unavailable(e.to_string()))?
            .map_err(|e| OpenError::Unavailable(e.to_string()))
    }
}
