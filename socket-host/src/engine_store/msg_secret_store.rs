//! The engine's `MsgSecretStore` over the engine store: message secrets (for reactions, polls and edits),
//! merged so a redelivery never loses a later deadline or a known parent time.

use std::collections::BTreeMap;

use async_trait::async_trait;
use wakeeper_shared::domain::RecordKind;
use whatsapp_rust::wacore::store::error::Result as EResult;
use whatsapp_rust::wacore::store::traits::{
    MsgSecretEntry, MsgSecretStore, merge_msg_secret_expiry, merge_msg_secret_message_ts,
};

use super::codec::{chat_sender_message_key, decode_secret, encode_secret, put_change};
use super::{EngineStore, malformed};

#[async_trait]
impl MsgSecretStore for EngineStore {
    async fn put_msg_secrets(&self, entries: Vec<MsgSecretEntry>) -> EResult<usize> {
        let stored = entries.len();
        self.write(|this, st| {
            // Merge with what is stored (and with earlier rows of this batch): a later deadline and a known
            // parent time are never lost to a redelivery.
            let mut merged: BTreeMap<String, (i64, i64, Vec<u8>)> = BTreeMap::new();
            for e in &entries {
                let key = chat_sender_message_key(&e.chat, &e.sender, &e.msg_id);
                let prior = match merged.get(&key) {
                    Some((expires, message_ts, _)) => Some((*expires, *message_ts)),
                    None => match this.get_in(st, RecordKind::MsgSecret, &key)? {
                        Some(v) => decode_secret(&v).map(|(expires, message_ts, _)| (expires, message_ts)),
                        None => None,
                    },
                };
                let (expires, message_ts) = match prior {
                    Some((expires, message_ts)) => (
                        merge_msg_secret_expiry(expires, e.expires_at),
                        merge_msg_secret_message_ts(message_ts, e.message_ts),
                    ),
                    None => (e.expires_at, e.message_ts),
                };
                merged.insert(key, (expires, message_ts, e.secret.to_vec()));
            }
            let changes = merged
                .into_iter()
                .map(|(k, (expires, message_ts, secret))| {
                    put_change(RecordKind::MsgSecret, k, encode_secret(expires, message_ts, &secret))
                })
                .collect();
            Ok((changes, stored))
        })
        .await
    }

    async fn get_msg_secret(&self, chat: &str, sender: &str, msg_id: &str) -> EResult<Option<Vec<u8>>> {
        Ok(self.get_msg_secret_with_ts(chat, sender, msg_id).await?.map(|(s, _)| s))
    }

    async fn get_msg_secret_with_ts(&self, chat: &str, sender: &str, msg_id: &str) -> EResult<Option<(Vec<u8>, i64)>> {
        match self.get(RecordKind::MsgSecret, &chat_sender_message_key(chat, sender, msg_id)).await? {
            Some(v) => {
                let (_, message_ts, secret) = decode_secret(&v).ok_or_else(|| malformed("message secret"))?;
                Ok(Some((secret.to_vec(), message_ts)))
            }
            None => Ok(None),
        }
    }

    async fn delete_expired_msg_secrets(&self, cutoff_timestamp: i64) -> EResult<u32> {
        self.delete_older(RecordKind::MsgSecret, |expires| expires != 0 && expires <= cutoff_timestamp).await
    }
}
