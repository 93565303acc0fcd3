//! The store that connects on first use.

use super::*;

/// A [`FirestoreCredentialStore`] that connects on first use. The `firestore` client connects when it is
/// made, so a host that made it at start-up could not start while Firestore was unreachable; with this one the
/// host comes up (control API, `/health`, the tenant table), and every store call reports `Unavailable` (which
/// its caller retries with backoff, as during any outage) until a connection is made.
pub struct LazyFirestoreCredentialStore {
    project_id: String,
    cipher: Cipher,
    prefix: String,
    auth: FirestoreAuth,
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
        Ok(Self {
            project_id: project_id.into(),
            cipher,
            prefix,
            auth: FirestoreAuth::Default,
            store: tokio::sync::OnceCell::new(),
        })
    }

    /// Authenticates as `auth` says when it connects.
    pub fn with_auth(mut self, auth: FirestoreAuth) -> Self {
        self.auth = auth;
        self
    }

    pub(super) async fn store(&self) -> Result<&FirestoreCredentialStore, StoreError> {
        self.store
            .get_or_try_init(|| async {
                let options = FirestoreDbOptions::new(self.project_id.clone());
                let connect = FirestoreCredentialStore::connect_with(
                    options,
                    &self.auth,
                    self.cipher.clone(),
                    self.prefix.clone(),
                );
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

    async fn claim(&self, tenant: &TenantId, epoch: u64) -> Result<Option<StoredAt>, StoreError> {
        self.store().await?.claim(tenant, epoch).await
    }

    async fn delete(&self, tenant: &TenantId, epoch: u64) -> Result<(), StoreError> {
        self.store().await?.delete(tenant, epoch).await
    }

    async fn list_tenants(&self) -> Result<Vec<TenantId>, StoreError> {
        self.store().await?.list_tenants().await
    }
}
