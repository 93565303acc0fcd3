//! The tenants every section measures: devices minted on the simulator, and the data directory template
//! (data key and embedded store) a host is started on a fresh copy of.

use std::path::Path;

use futures_util::StreamExt;
use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::crypto::{Cipher, KeySource, LocalKeyFile};
use wakeeper_shared::domain::{CredentialSnapshot, TenantId};
use wakeeper_shared::ports::{CredentialStore, TenantStore};

use crate::sim_process::SimProcess;

/// Minted tenants: ids, their devices' JIDs and credential snapshots, index for index.
pub struct Fleet {
    pub ids: Vec<TenantId>,
    pub jids: Vec<String>,
    pub snapshots: Vec<CredentialSnapshot>,
}

pub async fn mint_fleet(sim: &SimProcess, n: usize, prefix: &str) -> anyhow::Result<Fleet> {
    let ids: Vec<TenantId> = (0..n).map(|i| TenantId::parse(&format!("{prefix}-{i:05}")).expect("valid id")).collect();
    let minted: Vec<anyhow::Result<(String, CredentialSnapshot)>> =
        futures_util::stream::iter(ids.iter().map(|id| sim.mint(id))).buffered(16).collect().await;
    let mut jids = Vec::with_capacity(n);
    let mut snapshots = Vec::with_capacity(n);
    for m in minted {
        let (j, s) = m?;
        jids.push(j);
        snapshots.push(s);
    }
    Ok(Fleet { ids, jids, snapshots })
}

/// A data directory template: the data key beside `data/`, and `data/store.redb` with every tenant desired
/// and (unless `credentials` is false) its credentials.
pub async fn seed_embedded(root: &Path, fleet: &Fleet, credentials: bool) -> anyhow::Result<Cipher> {
    std::fs::create_dir_all(root.join("data"))?;
    let cipher = Cipher::new(&LocalKeyFile::new(root.join("data.key")).data_key()?);
    let store = EmbeddedStore::open(root.join("data").join("store.redb"), cipher.clone())?;
    for (id, snap) in fleet.ids.iter().zip(&fleet.snapshots) {
        if credentials {
            store.replace(id, snap, 0).await?;
        }
        store.set_desired(id, true).await?;
    }
    Ok(cipher)
}

pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}
