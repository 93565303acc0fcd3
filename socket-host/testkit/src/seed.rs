//! Restorable devices minted on the fake server and stored as desired tenants, the way a host finds them
//! after a restart.

use std::sync::Arc;

use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::domain::TenantId;
use wakeeper_shared::ports::{CredentialStore, TenantStore};

use crate::dirs::Dirs;

/// Mints a device for each of `ids` on the sim and stores it in `creds`, and marks the tenant desired in
/// `tenants`.
pub async fn seed_desired(
    sim: &wa_sim::SimHandle,
    ids: &[TenantId],
    creds: &dyn CredentialStore,
    tenants: &dyn TenantStore,
) {
    for id in ids {
        creds.replace(id, &sim.mint_device(id), 0).await.unwrap();
        tenants.set_desired(id, true).await.unwrap();
    }
}

/// Mints `ids` on the sim and stores them, desired, in the embedded store of `dirs` (then closes it: the host
/// opens it next).
pub async fn seed_embedded(dirs: &Dirs, sim: &wa_sim::SimHandle, ids: &[TenantId]) {
    std::fs::create_dir_all(dirs.data()).unwrap();
    let store = Arc::new(EmbeddedStore::open(dirs.data().join("store.redb"), dirs.cipher()).unwrap());
    seed_desired(sim, ids, store.as_ref(), store.as_ref()).await;
}
