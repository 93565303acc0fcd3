//! The engine's `SignalStore` over the engine store: identities, sessions, pre-keys, signed pre-keys and
//! sender keys.

use std::sync::Arc;

use async_trait::async_trait;
use wakeeper_shared::domain::{RecordChange, RecordKey, RecordKind};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::store::error::Result as EResult;
use whatsapp_rust::wacore::store::traits::SignalStore;

use super::codec::{
    PREKEYS_UPLOADED_THROUGH, decode_uploaded_through, delete_change, encode_uploaded_through, pre_key_id_key,
    put_change,
};
use super::view::State;
use super::{EngineStore, database_error, malformed};

impl EngineStore {
    /// Writes records keyed by Signal address (a batch of sessions or sender keys) as one append.
    async fn put_by_address(&self, kind: RecordKind, records: &[(Arc<str>, Bytes)]) -> EResult<()> {
        self.write_changes(records.iter().map(|(a, r)| put_change(kind, &**a, r.to_vec())).collect()).await
    }

    fn load_prekey_in(&self, st: &State, id: u32) -> EResult<Option<Bytes>> {
        match st.prekey_at(id) {
            Ok(at) => {
                let key = RecordKey::new(RecordKind::PreKey, pre_key_id_key(id));
                Ok(self.reader.read(st.prekeys[at].1, &key).map_err(database_error)?.map(Bytes::from))
            }
            Err(_) => Ok(None),
        }
    }
}

#[async_trait]
impl SignalStore for EngineStore {
    async fn put_identity(&self, address: &str, key: [u8; 32]) -> EResult<()> {
        self.write_changes(vec![put_change(RecordKind::Identity, address, key.to_vec())]).await
    }

    async fn put_identities_batch(&self, identities: &[(Arc<str>, [u8; 32])]) -> EResult<()> {
        let changes = identities.iter().map(|(a, k)| put_change(RecordKind::Identity, &**a, k.to_vec())).collect();
        self.write_changes(changes).await
    }

    async fn load_identity(&self, address: &str) -> EResult<Option<[u8; 32]>> {
        match self.get(RecordKind::Identity, address).await? {
            Some(v) => Ok(Some(v.try_into().map_err(|_| malformed("identity"))?)),
            None => Ok(None),
        }
    }

    async fn delete_identity(&self, address: &str) -> EResult<()> {
        self.delete_if_present(RecordKind::Identity, address).await
    }

    async fn get_session(&self, address: &str) -> EResult<Option<Bytes>> {
        Ok(self.get(RecordKind::Session, address).await?.map(Bytes::from))
    }

    async fn put_session(&self, address: &str, session: &[u8]) -> EResult<()> {
        self.write_changes(vec![put_change(RecordKind::Session, address, session.to_vec())]).await
    }

    async fn put_sessions_batch(&self, sessions: &[(Arc<str>, Bytes)]) -> EResult<()> {
        self.put_by_address(RecordKind::Session, sessions).await
    }

    async fn delete_session(&self, address: &str) -> EResult<()> {
        self.delete_if_present(RecordKind::Session, address).await
    }

    async fn has_session(&self, address: &str) -> EResult<bool> {
        Ok(self.contains(RecordKind::Session, address).await)
    }

    async fn has_signal_state_for_user(&self, user: &str) -> EResult<bool> {
        let st = self.state.read().await;
        let matches =
            |kind| st.with_prefix(kind, user).any(|(k, _)| matches!(k.as_bytes().get(user.len()), Some(b'@' | b':')));
        Ok(matches(RecordKind::Session) || matches(RecordKind::Identity))
    }

    async fn store_prekey(&self, id: u32, record: &[u8], uploaded: bool) -> EResult<()> {
        self.store_prekeys_batch(&[(id, Bytes::copy_from_slice(record))], uploaded).await
    }

    async fn store_prekeys_batch(&self, keys: &[(u32, Bytes)], uploaded: bool) -> EResult<()> {
        let mut changes: Vec<RecordChange> =
            keys.iter().map(|(id, r)| put_change(RecordKind::PreKey, pre_key_id_key(*id), r.to_vec())).collect();
        if uploaded && let Some(max) = keys.iter().map(|(id, _)| *id).max() {
            changes.push(put_change(RecordKind::Other, PREKEYS_UPLOADED_THROUGH, encode_uploaded_through(max)));
        }
        self.write_changes(changes).await
    }

    async fn load_prekey(&self, id: u32) -> EResult<Option<Bytes>> {
        let st = self.state.read().await;
        self.load_prekey_in(&st, id)
    }

    async fn load_prekeys_batch(&self, ids: &[u32]) -> EResult<Vec<(u32, Bytes)>> {
        let st = self.state.read().await;
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Some(r) = self.load_prekey_in(&st, id)? {
                out.push((id, r));
            }
        }
        Ok(out)
    }

    /// The engine tracks what the server has in the device's watermarks and never reads a per-key flag back,
    /// so rewriting hundreds of pre-key records (and replicating them) to flip a flag would buy nothing. One
    /// record remembers the highest id marked; nothing is inserted, so a consumed key stays deleted.
    async fn mark_prekeys_uploaded(&self, ids: &[u32]) -> EResult<()> {
        let Some(max) = ids.iter().copied().max() else { return Ok(()) };
        self.write(|this, st| {
            let current = this
                .get_in(st, RecordKind::Other, PREKEYS_UPLOADED_THROUGH)?
                .and_then(decode_uploaded_through)
                .unwrap_or(0);
            let changes = if max > current {
                vec![put_change(RecordKind::Other, PREKEYS_UPLOADED_THROUGH, encode_uploaded_through(max))]
            } else {
                Vec::new()
            };
            Ok((changes, ()))
        })
        .await
    }

    async fn remove_prekey(&self, id: u32) -> EResult<()> {
        self.write(|_, st| {
            let changes = if st.has_prekey(id) {
                vec![delete_change(RecordKind::PreKey, pre_key_id_key(id))]
            } else {
                Vec::new()
            };
            Ok((changes, ()))
        })
        .await
    }

    async fn get_max_prekey_id(&self) -> EResult<u32> {
        Ok(self.state.read().await.prekeys.last().map_or(0, |(id, _)| *id))
    }

    async fn store_signed_prekey(&self, id: u32, record: &[u8]) -> EResult<()> {
        self.write_changes(vec![put_change(RecordKind::SignedPreKey, pre_key_id_key(id), record.to_vec())]).await
    }

    async fn load_signed_prekey(&self, id: u32) -> EResult<Option<Vec<u8>>> {
        self.get(RecordKind::SignedPreKey, &pre_key_id_key(id)).await
    }

    async fn load_all_signed_prekeys(&self) -> EResult<Vec<(u32, Vec<u8>)>> {
        let st = self.state.read().await;
        let mut out = Vec::new();
        for (k, slot) in st.map(RecordKind::SignedPreKey) {
            let id = k.parse().map_err(|_| malformed("signed pre-key id"))?;
            out.push((id, self.value(RecordKind::SignedPreKey, k, slot)?));
        }
        out.sort_unstable_by_key(|(id, _)| *id);
        Ok(out)
    }

    async fn remove_signed_prekey(&self, id: u32) -> EResult<()> {
        self.delete_if_present(RecordKind::SignedPreKey, &pre_key_id_key(id)).await
    }

    async fn put_sender_key(&self, address: &str, record: &[u8]) -> EResult<()> {
        self.write_changes(vec![put_change(RecordKind::SenderKey, address, record.to_vec())]).await
    }

    async fn put_sender_keys_batch(&self, sender_keys: &[(Arc<str>, Bytes)]) -> EResult<()> {
        self.put_by_address(RecordKind::SenderKey, sender_keys).await
    }

    async fn get_sender_key(&self, address: &str) -> EResult<Option<Vec<u8>>> {
        self.get(RecordKind::SenderKey, address).await
    }

    async fn delete_sender_key(&self, address: &str) -> EResult<()> {
        self.delete_if_present(RecordKind::SenderKey, address).await
    }
}
