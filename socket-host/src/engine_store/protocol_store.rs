//! The engine's `ProtocolStore` over the engine store: sender-key device status, LID mappings, base keys,
//! device lists, group metadata, trusted-contact tokens, sent messages and pending inbound messages.

use std::collections::BTreeMap;

use async_trait::async_trait;
use wakeeper_shared::domain::{RecordChange, RecordKind};
use whatsapp_rust::wacore::store::error::Result as EResult;
use whatsapp_rust::wacore::store::traits::{
    DeviceListRecord, LidPnMappingEntry, PendingInboundKey, PendingInboundRow, ProtocolStore, TcTokenEntry,
};

use super::codec::{
    after_timestamp, base_key_key, chat_sender_message_key, decode_tc_token, delete_change, encode_tc_token,
    length_prefixed, put_change, sender_key_device_key, sent_message_key, split_length_prefixed, timestamped,
};
use super::view::{Slot, State};
use super::{EngineStore, MAX_SENT_MESSAGES, json_change, malformed, serialization_error};

impl EngineStore {
    /// The stored trusted-contact token of `jid`, decoded.
    fn tc_token_in(&self, st: &State, jid: &str) -> EResult<Option<TcTokenEntry>> {
        match self.get_in(st, RecordKind::TcToken, jid)? {
            Some(v) => Ok(Some(decode_tc_token(&v).ok_or_else(|| malformed("tc token"))?)),
            None => Ok(None),
        }
    }
}

/// When the sent messages are at [`MAX_SENT_MESSAGES`], the deletions that drop the oldest quarter (by when they
/// were stored), keeping the store bounded.
fn prune_sent_messages(sent: &BTreeMap<Box<str>, Slot>) -> Vec<RecordChange> {
    let mut by_age: Vec<(i64, &str)> = sent.iter().map(|(k, slot)| (slot.timestamp(), &**k)).collect();
    let drop_n = sent.len() - MAX_SENT_MESSAGES * 3 / 4;
    by_age.select_nth_unstable(drop_n - 1);
    by_age[..drop_n].iter().map(|(_, k)| delete_change(RecordKind::SentMessage, *k)).collect()
}

#[async_trait]
impl ProtocolStore for EngineStore {
    async fn get_sender_key_devices(&self, group_jid: &str) -> EResult<Vec<(String, bool)>> {
        let st = self.state.read().await;
        let prefix = length_prefixed(group_jid);
        Ok(self
            .scan_prefix(&st, RecordKind::SenderKeyDevice, &prefix)?
            .into_iter()
            .map(|(k, v)| (k[prefix.len()..].to_string(), v.first() == Some(&1)))
            .collect())
    }

    async fn set_sender_key_status(&self, group_jid: &str, entries: &[(&str, bool)]) -> EResult<()> {
        let changes = entries
            .iter()
            .map(|(dev, has)| {
                put_change(RecordKind::SenderKeyDevice, sender_key_device_key(group_jid, dev), vec![u8::from(*has)])
            })
            .collect();
        self.write_changes(changes).await
    }

    async fn clear_sender_key_devices(&self, group_jid: &str) -> EResult<()> {
        self.delete_with_prefix(RecordKind::SenderKeyDevice, &length_prefixed(group_jid)).await
    }

    async fn delete_sender_key_device_rows(&self, device_jids: &[&str]) -> EResult<()> {
        if device_jids.is_empty() {
            return Ok(());
        }
        self.write(|_, st| {
            let changes = st
                .map(RecordKind::SenderKeyDevice)
                .keys()
                .filter(|k| split_length_prefixed(k).is_some_and(|(_, dev)| device_jids.contains(&dev)))
                .map(|k| delete_change(RecordKind::SenderKeyDevice, k.to_string()))
                .collect();
            Ok((changes, ()))
        })
        .await
    }

    async fn clear_all_sender_key_devices(&self) -> EResult<()> {
        self.delete_with_prefix(RecordKind::SenderKeyDevice, "").await
    }

    async fn get_lid_mapping(&self, lid: &str) -> EResult<Option<LidPnMappingEntry>> {
        self.get_json(RecordKind::LidMapping, lid).await
    }

    async fn get_pn_mapping(&self, phone: &str) -> EResult<Option<LidPnMappingEntry>> {
        let st = self.state.read().await;
        let Some(lid) = st.pn_to_lid.get(phone) else { return Ok(None) };
        match self.get_in(&st, RecordKind::LidMapping, lid)? {
            Some(v) => {
                let e: LidPnMappingEntry = serde_json::from_slice(&v).map_err(serialization_error)?;
                // The LID may have moved to another phone since; then this phone has no current mapping.
                Ok((e.phone_number == phone).then_some(e))
            }
            None => Ok(None),
        }
    }

    async fn put_lid_mapping(&self, entry: &LidPnMappingEntry) -> EResult<()> {
        self.put_lid_mappings(std::slice::from_ref(entry)).await
    }

    async fn put_lid_mappings(&self, entries: &[LidPnMappingEntry]) -> EResult<()> {
        let changes =
            entries.iter().map(|e| json_change(RecordKind::LidMapping, e.lid.clone(), e)).collect::<EResult<_>>()?;
        self.write_changes(changes).await
    }

    async fn get_all_lid_mappings(&self) -> EResult<Vec<LidPnMappingEntry>> {
        let st = self.state.read().await;
        st.map(RecordKind::LidMapping)
            .iter()
            .map(|(k, slot)| {
                serde_json::from_slice(&self.value(RecordKind::LidMapping, k, slot)?).map_err(serialization_error)
            })
            .collect()
    }

    async fn save_base_key(&self, address: &str, message_id: &str, base_key: &[u8]) -> EResult<()> {
        let key = base_key_key(address, message_id);
        self.write_changes(vec![put_change(RecordKind::BaseKey, key, base_key.to_vec())]).await
    }

    async fn has_same_base_key(&self, address: &str, message_id: &str, current_base_key: &[u8]) -> EResult<bool> {
        let key = base_key_key(address, message_id);
        Ok(self.get(RecordKind::BaseKey, &key).await?.is_some_and(|v| v == current_base_key))
    }

    async fn delete_base_key(&self, address: &str, message_id: &str) -> EResult<()> {
        self.delete_if_present(RecordKind::BaseKey, &base_key_key(address, message_id)).await
    }

    async fn update_device_list(&self, record: DeviceListRecord) -> EResult<()> {
        self.update_device_lists(vec![record]).await
    }

    async fn update_device_lists(&self, records: Vec<DeviceListRecord>) -> EResult<()> {
        let changes =
            records.iter().map(|r| json_change(RecordKind::DeviceList, r.user.clone(), r)).collect::<EResult<_>>()?;
        self.write_changes(changes).await
    }

    async fn get_devices(&self, user: &str) -> EResult<Option<DeviceListRecord>> {
        self.get_json(RecordKind::DeviceList, user).await
    }

    async fn delete_devices(&self, user: &str) -> EResult<()> {
        self.delete_if_present(RecordKind::DeviceList, user).await
    }

    async fn get_group_metadata(&self, group_jid: &str) -> EResult<Option<Vec<u8>>> {
        self.get(RecordKind::GroupMetadata, group_jid).await
    }

    async fn put_group_metadata(&self, group_jid: &str, blob: &[u8]) -> EResult<()> {
        self.write_changes(vec![put_change(RecordKind::GroupMetadata, group_jid, blob.to_vec())]).await
    }

    async fn delete_group_metadata(&self, group_jid: &str) -> EResult<()> {
        self.delete_if_present(RecordKind::GroupMetadata, group_jid).await
    }

    async fn get_tc_token(&self, jid: &str) -> EResult<Option<TcTokenEntry>> {
        let st = self.state.read().await;
        self.tc_token_in(&st, jid)
    }

    async fn put_tc_token(&self, jid: &str, entry: &TcTokenEntry) -> EResult<()> {
        self.write_changes(vec![put_change(RecordKind::TcToken, jid, encode_tc_token(entry))]).await
    }

    async fn delete_tc_token(&self, jid: &str) -> EResult<()> {
        self.delete_if_present(RecordKind::TcToken, jid).await
    }

    async fn get_all_tc_token_jids(&self) -> EResult<Vec<String>> {
        Ok(self.state.read().await.map(RecordKind::TcToken).keys().map(|k| k.to_string()).collect())
    }

    async fn delete_expired_tc_tokens(&self, token_cutoff: i64, sender_cutoff: i64) -> EResult<u32> {
        self.write(|this, st| {
            let mut changes = Vec::new();
            for (k, slot) in st.map(RecordKind::TcToken) {
                let e =
                    decode_tc_token(&this.value(RecordKind::TcToken, k, slot)?).ok_or_else(|| malformed("tc token"))?;
                let token_live = !e.token.is_empty() && e.token_timestamp >= token_cutoff;
                let sender_live = e.sender_timestamp.is_some_and(|ts| ts >= sender_cutoff);
                if !token_live && !sender_live {
                    changes.push(delete_change(RecordKind::TcToken, k.to_string()));
                }
            }
            let n = changes.len() as u32;
            Ok((changes, n))
        })
        .await
    }

    async fn touch_tc_token_sender_timestamp(&self, jid: &str, sender_timestamp: i64) -> EResult<()> {
        self.write(|this, st| {
            let entry = match this.tc_token_in(st, jid)? {
                Some(mut e) => {
                    e.sender_timestamp = Some(e.sender_timestamp.map_or(sender_timestamp, |s| s.max(sender_timestamp)));
                    e
                }
                None => TcTokenEntry {
                    token: Vec::new(),
                    token_timestamp: sender_timestamp,
                    sender_timestamp: Some(sender_timestamp),
                },
            };
            Ok((vec![put_change(RecordKind::TcToken, jid, encode_tc_token(&entry))], ()))
        })
        .await
    }

    async fn store_received_tc_token(&self, jid: &str, token: &[u8], token_timestamp: i64) -> EResult<()> {
        self.write(|this, st| {
            let existing = this.tc_token_in(st, jid)?;
            if let Some(e) = &existing
                && !e.token.is_empty()
                && token_timestamp < e.token_timestamp
            {
                return Ok((Vec::new(), ()));
            }
            let entry = TcTokenEntry {
                token: token.to_vec(),
                token_timestamp,
                sender_timestamp: existing.and_then(|e| e.sender_timestamp),
            };
            Ok((vec![put_change(RecordKind::TcToken, jid, encode_tc_token(&entry))], ()))
        })
        .await
    }

    async fn store_sent_message(&self, chat_jid: &str, message_id: &str, payload: &[u8]) -> EResult<()> {
        let key = sent_message_key(chat_jid, message_id);
        let now = whatsapp_rust::wacore::time::now_secs();
        self.write(|_, st| {
            let sent = st.map(RecordKind::SentMessage);
            let mut changes = if sent.len() >= MAX_SENT_MESSAGES && !sent.contains_key(key.as_str()) {
                prune_sent_messages(sent)
            } else {
                Vec::new()
            };
            changes.push(put_change(RecordKind::SentMessage, key.clone(), timestamped(now, payload)));
            Ok((changes, ()))
        })
        .await
    }

    async fn take_sent_message(&self, chat_jid: &str, message_id: &str) -> EResult<Option<Vec<u8>>> {
        let key = sent_message_key(chat_jid, message_id);
        self.write(|this, st| match this.get_in(st, RecordKind::SentMessage, &key)? {
            Some(v) => Ok((vec![delete_change(RecordKind::SentMessage, key.clone())], Some(after_timestamp(&v)))),
            None => Ok((Vec::new(), None)),
        })
        .await
    }

    async fn delete_expired_sent_messages(&self, cutoff_timestamp: i64) -> EResult<u32> {
        self.delete_older(RecordKind::SentMessage, |at| at < cutoff_timestamp).await
    }

    async fn store_pending_inbound(&self, chat: &str, sender: &str, id: &str, message: &[u8]) -> EResult<()> {
        self.store_pending_inbound_batch(&[PendingInboundRow { chat, sender, id, message }]).await
    }

    async fn get_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> EResult<Option<Vec<u8>>> {
        let key = chat_sender_message_key(chat, sender, id);
        Ok(self.get(RecordKind::PendingInbound, &key).await?.map(|v| after_timestamp(&v)))
    }

    async fn delete_pending_inbound(&self, chat: &str, sender: &str, id: &str) -> EResult<()> {
        self.delete_pending_inbound_batch(&[PendingInboundKey { chat, sender, id }]).await
    }

    async fn delete_expired_pending_inbound(&self, cutoff_timestamp: i64) -> EResult<u32> {
        self.delete_older(RecordKind::PendingInbound, |at| at < cutoff_timestamp).await
    }

    async fn store_pending_inbound_batch(&self, rows: &[PendingInboundRow<'_>]) -> EResult<()> {
        let now = whatsapp_rust::wacore::time::now_secs();
        let changes = rows
            .iter()
            .map(|r| {
                let key = chat_sender_message_key(r.chat, r.sender, r.id);
                put_change(RecordKind::PendingInbound, key, timestamped(now, r.message))
            })
            .collect();
        self.write_changes(changes).await
    }

    async fn delete_pending_inbound_batch(&self, keys: &[PendingInboundKey<'_>]) -> EResult<()> {
        let keys = keys.iter().map(|k| chat_sender_message_key(k.chat, k.sender, k.id)).collect();
        self.delete_those_present(RecordKind::PendingInbound, keys).await
    }
}
