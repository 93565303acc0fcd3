//! The record-key codec: how the engine's state is keyed and encoded as wakeeper records, for the engine store
//! and for the import that writes the same records from another client's files.
//!
//! | kind | key | value |
//! |---|---|---|
//! | device | `self` | [`DeviceRecord`] JSON (the engine's serde `Device`) |
//! | identity, session, sender_key | address | raw bytes |
//! | pre_key, signed_pre_key | decimal id | raw record |
//! | app_state_sync_key | hex key id | `ts:i64 ‖ len:u32 ‖ key_data ‖ fingerprint` |
//! | app_state_version | collection | `HashState` JSON |
//! | app_state_mutation_mac | `lp(collection)` + hex index MAC | value MAC |
//! | sender_key_device | `lp(group)` + device JID | `0`/`1` |
//! | lid_mapping | LID user | `LidPnMappingEntry` JSON |
//! | base_key | `lp(address)` + message id | base key |
//! | device_list | user | `DeviceListRecord` JSON |
//! | tc_token | JID | `token_ts:i64 ‖ has_sender:u8 ‖ sender_ts:i64 ‖ token` |
//! | sent_message | `lp(chat)` + message id | `stored_at:i64 ‖ payload` |
//! | pending_inbound | `lp(chat)` + `lp(sender)` + id | `stored_at:i64 ‖ message` |
//! | msg_secret | `lp(chat)` + `lp(sender)` + message id | `expires_at:i64 ‖ message_ts:i64 ‖ secret` |
//! | group_metadata | group JID | blob |
//! | other | `latest_sync_key_id`, `prekeys_uploaded_through` | bytes / u32 |
//!
//! `lp(x)` ([`length_prefixed`]) is `<byte length of x>.<x>`: composite keys stay unambiguous whatever the parts
//! contain, and all keys of one group or collection share a prefix. Integers are little-endian.

use wakeeper_shared::domain::{DeviceRecord, RecordChange, RecordKey, RecordKind};
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore::store::traits::{AppStateSyncKey, TcTokenEntry};

/// Key (kind `other`) of the newest app-state sync key id.
pub(crate) const LATEST_SYNC_KEY: &str = "latest_sync_key_id";
/// Key (kind `other`) of the highest pre-key id the server has.
pub(crate) const PREKEYS_UPLOADED_THROUGH: &str = "prekeys_uploaded_through";

/// `<len>.<part>`: a self-delimiting key part.
pub(crate) fn length_prefixed(part: &str) -> String {
    format!("{}.{part}", part.len())
}

/// Splits a key made of `length_prefixed(a)` + rest into `(a, rest)`.
pub(crate) fn split_length_prefixed(key: &str) -> Option<(&str, &str)> {
    let (len, rest) = key.split_once('.')?;
    let len: usize = len.parse().ok()?;
    (rest.len() >= len && rest.is_char_boundary(len)).then(|| rest.split_at(len))
}

/// Lowercase hex, as binary ids appear in keys.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A change that writes `value` under `kind`/`key`.
pub(crate) fn put_change(kind: RecordKind, key: impl Into<String>, value: Vec<u8>) -> RecordChange {
    RecordChange { key: RecordKey::new(kind, key), value: Some(value) }
}

/// A change that deletes `kind`/`key`.
pub(crate) fn delete_change(kind: RecordKind, key: impl Into<String>) -> RecordChange {
    RecordChange { key: RecordKey::new(kind, key), value: None }
}

/// Key of a pre-key (and of a signed pre-key): its decimal id.
pub(crate) fn pre_key_id_key(id: u32) -> String {
    id.to_string()
}

/// Key of an app-state sync key: its id in hex.
pub(crate) fn sync_key_id_key(key_id: &[u8]) -> String {
    hex(key_id)
}

/// Key of one mutation MAC of an app-state collection; every key of the collection starts with
/// `length_prefixed(collection)`.
pub(crate) fn mutation_mac_key(collection: &str, index_mac: &[u8]) -> String {
    format!("{}{}", length_prefixed(collection), hex(index_mac))
}

/// Key of one device's sender-key status in a group; every key of the group starts with
/// `length_prefixed(group)`.
pub(crate) fn sender_key_device_key(group: &str, device: &str) -> String {
    format!("{}{device}", length_prefixed(group))
}

/// Key of a base key seen from `address` for one message.
pub(crate) fn base_key_key(address: &str, message_id: &str) -> String {
    format!("{}{message_id}", length_prefixed(address))
}

/// Key of a sent message kept for retry receipts.
pub(crate) fn sent_message_key(chat: &str, message_id: &str) -> String {
    format!("{}{message_id}", length_prefixed(chat))
}

/// Key of a record about one message of one sender in one chat (pending inbound messages, message secrets).
pub(crate) fn chat_sender_message_key(chat: &str, sender: &str, message_id: &str) -> String {
    format!("{}{}{message_id}", length_prefixed(chat), length_prefixed(sender))
}

/// The i64 a value starts with (a timestamp for the kinds swept by age); 0 when it is too short.
pub(crate) fn leading_timestamp(value: &[u8]) -> i64 {
    value.get(..8).map_or(0, |b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// `timestamp ‖ rest`.
pub(crate) fn timestamped(timestamp: i64, rest: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + rest.len());
    v.extend_from_slice(&timestamp.to_le_bytes());
    v.extend_from_slice(rest);
    v
}

/// What follows the leading timestamp of a [`timestamped`] value.
pub(crate) fn after_timestamp(value: &[u8]) -> Vec<u8> {
    value.get(8..).unwrap_or_default().to_vec()
}

/// The value of [`PREKEYS_UPLOADED_THROUGH`].
pub(crate) fn encode_uploaded_through(id: u32) -> Vec<u8> {
    id.to_le_bytes().to_vec()
}

/// Reads a [`PREKEYS_UPLOADED_THROUGH`] value.
pub(crate) fn decode_uploaded_through(value: Vec<u8>) -> Option<u32> {
    value.try_into().ok().map(u32::from_le_bytes)
}

/// An app-state sync key: `timestamp ‖ key length ‖ key data ‖ fingerprint`.
pub(crate) fn encode_sync_key(key: &AppStateSyncKey) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + key.key_data.len() + key.fingerprint.len());
    v.extend_from_slice(&key.timestamp.to_le_bytes());
    v.extend_from_slice(&(key.key_data.len() as u32).to_le_bytes());
    v.extend_from_slice(&key.key_data);
    v.extend_from_slice(&key.fingerprint);
    v
}

pub(crate) fn decode_sync_key(v: &[u8]) -> Option<AppStateSyncKey> {
    let timestamp = i64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(v.get(8..12)?.try_into().ok()?) as usize;
    let key_data = v.get(12..12 + len)?.to_vec();
    let fingerprint = v.get(12 + len..)?.to_vec();
    Some(AppStateSyncKey { key_data, fingerprint, timestamp })
}

/// A trusted-contact token: `token timestamp ‖ has sender timestamp ‖ sender timestamp ‖ token`.
pub(crate) fn encode_tc_token(e: &TcTokenEntry) -> Vec<u8> {
    let mut v = Vec::with_capacity(17 + e.token.len());
    v.extend_from_slice(&e.token_timestamp.to_le_bytes());
    v.push(u8::from(e.sender_timestamp.is_some()));
    v.extend_from_slice(&e.sender_timestamp.unwrap_or(0).to_le_bytes());
    v.extend_from_slice(&e.token);
    v
}

pub(crate) fn decode_tc_token(v: &[u8]) -> Option<TcTokenEntry> {
    let token_timestamp = i64::from_le_bytes(v.get(..8)?.try_into().ok()?);
    let has_sender = *v.get(8)? == 1;
    let sender = i64::from_le_bytes(v.get(9..17)?.try_into().ok()?);
    Some(TcTokenEntry { token: v[17..].to_vec(), token_timestamp, sender_timestamp: has_sender.then_some(sender) })
}

/// A message secret: `expires_at ‖ message_ts ‖ secret`.
pub(crate) fn encode_secret(expires_at: i64, message_ts: i64, secret: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + secret.len());
    v.extend_from_slice(&expires_at.to_le_bytes());
    v.extend_from_slice(&message_ts.to_le_bytes());
    v.extend_from_slice(secret);
    v
}

/// `(expires_at, message_ts, secret)`.
pub(crate) fn decode_secret(v: &[u8]) -> Option<(i64, i64, &[u8])> {
    Some((leading_timestamp(v.get(..8)?), leading_timestamp(v.get(8..16)?), v.get(16..)?))
}

/// The engine's device as wakeeper's device record (the same serde fields).
pub(crate) fn device_record(device: &Device) -> Result<DeviceRecord, serde_json::Error> {
    serde_json::from_value(serde_json::to_value(device)?)
}

/// A stored device record as the engine's device.
pub(crate) fn device_from_record_bytes(bytes: &[u8]) -> Result<Device, serde_json::Error> {
    let record = DeviceRecord::from_bytes(bytes)?;
    serde_json::from_value(serde_json::to_value(record)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn composite_keys_are_unambiguous_and_prefixed() {
        assert_eq!(split_length_prefixed(&format!("{}{}", length_prefixed("a.b"), "c")), Some(("a.b", "c")));
        assert_ne!(format!("{}{}", length_prefixed("ab"), "c"), format!("{}{}", length_prefixed("a"), "bc"));
        assert!(mutation_mac_key("regular", &[1, 2]).starts_with(&length_prefixed("regular")));
        assert!(!mutation_mac_key("regular_low", &[1]).starts_with(&length_prefixed("regular")));
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }

    #[test]
    fn small_encodings_round_trip() {
        let k = AppStateSyncKey { key_data: vec![1; 32], fingerprint: vec![2; 9], timestamp: -5 };
        let back = decode_sync_key(&encode_sync_key(&k)).unwrap();
        assert_eq!((back.key_data, back.fingerprint, back.timestamp), (k.key_data, k.fingerprint, k.timestamp));
        for sender in [None, Some(77)] {
            let t = TcTokenEntry { token: vec![3; 20], token_timestamp: 9, sender_timestamp: sender };
            let back = decode_tc_token(&encode_tc_token(&t)).unwrap();
            assert_eq!((back.token, back.token_timestamp, back.sender_timestamp), (t.token, 9, sender));
        }
        assert_eq!(decode_secret(&encode_secret(5, 6, &[7; 32])), Some((5, 6, &[7u8; 32][..])));
    }
}
