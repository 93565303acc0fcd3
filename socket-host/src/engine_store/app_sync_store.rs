//! The engine's `AppSyncStore` over the engine store: app-state sync keys, collection versions and mutation
//! MACs.

use std::collections::HashMap;

use async_trait::async_trait;
use wakeeper_shared::domain::RecordKind;
use whatsapp_rust::wacore::appstate::hash::HashState;
use whatsapp_rust::wacore::appstate::processor::AppStateMutationMAC;
use whatsapp_rust::wacore::store::error::Result as EResult;
use whatsapp_rust::wacore::store::traits::{AppStateSyncKey, AppSyncStore};

use super::codec::{
    LATEST_SYNC_KEY, decode_sync_key, encode_sync_key, length_prefixed, mutation_mac_key, put_change, sync_key_id_key,
};
use super::{EngineStore, json_change, malformed};

#[async_trait]
impl AppSyncStore for EngineStore {
    async fn get_sync_key(&self, key_id: &[u8]) -> EResult<Option<AppStateSyncKey>> {
        match self.get(RecordKind::AppStateSyncKey, &sync_key_id_key(key_id)).await? {
            Some(v) => Ok(Some(decode_sync_key(&v).ok_or_else(|| malformed("app-state sync key"))?)),
            None => Ok(None),
        }
    }

    async fn set_sync_key(&self, key_id: &[u8], key: AppStateSyncKey) -> EResult<()> {
        self.write_changes(vec![
            put_change(RecordKind::AppStateSyncKey, sync_key_id_key(key_id), encode_sync_key(&key)),
            put_change(RecordKind::Other, LATEST_SYNC_KEY, key_id.to_vec()),
        ])
        .await
    }

    async fn get_version(&self, name: &str) -> EResult<HashState> {
        Ok(self.get_json(RecordKind::AppStateVersion, name).await?.unwrap_or_default())
    }

    async fn set_version(&self, name: &str, state: HashState) -> EResult<()> {
        self.write_changes(vec![json_change(RecordKind::AppStateVersion, name, &state)?]).await
    }

    async fn put_mutation_macs(&self, name: &str, _version: u64, mutations: &[AppStateMutationMAC]) -> EResult<()> {
        let changes = mutations
            .iter()
            .map(|m| {
                put_change(RecordKind::AppStateMutationMac, mutation_mac_key(name, &m.index_mac), m.value_mac.clone())
            })
            .collect();
        self.write_changes(changes).await
    }

    async fn get_mutation_mac(&self, name: &str, index_mac: &[u8]) -> EResult<Option<Vec<u8>>> {
        self.get(RecordKind::AppStateMutationMac, &mutation_mac_key(name, index_mac)).await
    }

    async fn get_mutation_macs(&self, name: &str, index_macs: &[[u8; 32]]) -> EResult<HashMap<[u8; 32], Vec<u8>>> {
        let st = self.state.read().await;
        let mut out = HashMap::with_capacity(index_macs.len());
        for im in index_macs {
            if let Some(v) = self.get_in(&st, RecordKind::AppStateMutationMac, &mutation_mac_key(name, im))? {
                out.insert(*im, v);
            }
        }
        Ok(out)
    }

    async fn delete_mutation_macs(&self, name: &str, index_macs: &[Vec<u8>]) -> EResult<()> {
        let keys = index_macs.iter().map(|im| mutation_mac_key(name, im)).collect();
        self.delete_those_present(RecordKind::AppStateMutationMac, keys).await
    }

    async fn clear_mutation_macs(&self, name: &str) -> EResult<()> {
        self.delete_with_prefix(RecordKind::AppStateMutationMac, &length_prefixed(name)).await
    }

    async fn get_latest_sync_key_id(&self) -> EResult<Option<Vec<u8>>> {
        self.get(RecordKind::Other, LATEST_SYNC_KEY).await
    }
}
