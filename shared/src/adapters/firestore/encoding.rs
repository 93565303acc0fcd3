//! Names, ids and field encodings of the documents, and the mapping of Firestore statuses to store errors.

use super::*;

/// The collection of one record set.
pub(super) fn set_collection(set: &str) -> String {
    format!("records-{set}")
}

/// A record's document id: the kind, `~`, and the key in unpadded base64url (document ids cannot hold
/// `/`, and engine keys are arbitrary strings).
pub(super) fn record_doc_id(key: &RecordKey) -> String {
    format!("{}~{}", key.kind.as_str(), URL_SAFE_NO_PAD.encode(key.key.as_bytes()))
}

/// Waits a little before retrying a lost race, so two writers do not keep colliding: up to 2^attempt x 5 ms
/// (at most 320 ms), with full jitter.
pub(super) async fn backoff(attempt: usize) {
    let cap_ms = 5u64 << attempt.min(6);
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    tokio::time::sleep(Duration::from_millis(u64::from_le_bytes(b) % (cap_ms + 1))).await;
}

/// 64 random bits, hex: a record set id no two writers pick alike.
pub(super) fn new_set_id() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(super) fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.len() > 64 || !prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(StoreError::Invalid("collection prefix may hold at most 64 of A-Z a-z 0-9 _ -".into()));
    }
    Ok(())
}

pub(super) fn check_key(key: &RecordKey) -> Result<(), StoreError> {
    if key.key.len() > MAX_RECORD_KEY_LEN {
        return Err(StoreError::Invalid(format!("record key longer than {MAX_RECORD_KEY_LEN} bytes")));
    }
    Ok(())
}

/// Firestore integers are signed 64-bit.
pub(super) fn check_generation(n: u64) -> Result<(), StoreError> {
    if n > i64::MAX as u64 {
        return Err(StoreError::Invalid("generation or epoch exceeds 2^63-1".into()));
    }
    Ok(())
}

pub(super) fn int_value(n: u64) -> Value {
    Value { value_type: Some(ValueType::IntegerValue(n as i64)) }
}

pub(super) fn string_value(s: &str) -> Value {
    Value { value_type: Some(ValueType::StringValue(s.to_owned())) }
}

pub(super) fn get_u64(doc: &Document, field: &str) -> Result<u64, StoreError> {
    match doc.fields.get(field).and_then(|v| v.value_type.as_ref()) {
        Some(ValueType::IntegerValue(n)) if *n >= 0 => Ok(*n as u64),
        _ => Err(StoreError::Corrupt(format!("firestore meta document field `{field}` is missing or malformed"))),
    }
}

pub(super) fn get_str<'a>(doc: &'a Document, field: &str) -> Option<&'a str> {
    match doc.fields.get(field).and_then(|v| v.value_type.as_ref()) {
        Some(ValueType::StringValue(s)) => Some(s),
        _ => None,
    }
}

/// The strings of an array field; empty when absent.
pub(super) fn get_strings(doc: &Document, field: &str) -> Vec<String> {
    match doc.fields.get(field).and_then(|v| v.value_type.as_ref()) {
        Some(ValueType::ArrayValue(a)) => a
            .values
            .iter()
            .filter_map(|v| match &v.value_type {
                Some(ValueType::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

pub(super) fn string_array(items: &[String]) -> Value {
    Value {
        value_type: Some(ValueType::ArrayValue(pb::ArrayValue {
            values: items.iter().map(|s| string_value(s)).collect(),
        })),
    }
}

pub(super) fn parse_meta(doc: &Document) -> Result<Meta, StoreError> {
    let garbage = get_strings(doc, "garbage");
    let sealed_by = get_strings(doc, "sealed_by");
    Ok(Meta {
        generation: get_u64(doc, "generation")?,
        write_epoch: if doc.fields.contains_key("write_epoch") { get_u64(doc, "write_epoch")? } else { 0 },
        max_epoch: get_u64(doc, "max_epoch")?,
        set: get_str(doc, "set").map(str::to_owned),
        garbage,
        sealed_by,
        update_time: doc
            .update_time
            .ok_or_else(|| StoreError::Unavailable("firestore returned a document without update time".into()))?,
    })
}

/// A record document's address and sealed value, checked against its document id (a document whose
/// fields do not match its name was moved or altered).
pub(super) fn raw_record(doc: &Document) -> Result<(RecordKey, &[u8]), StoreError> {
    let bad = |what: &str| StoreError::Corrupt(format!("a firestore record document has {what}"));
    let kind = get_str(doc, "kind").and_then(RecordKind::parse).ok_or_else(|| bad("no valid kind"))?;
    let key = RecordKey::new(kind, get_str(doc, "key").ok_or_else(|| bad("no key"))?);
    let sealed = match doc.fields.get("value").and_then(|v| v.value_type.as_ref()) {
        Some(ValueType::BytesValue(b)) => b.as_slice(),
        _ => return Err(bad("no value")),
    };
    if doc.name.rsplit('/').next() != Some(record_doc_id(&key).as_str()) {
        return Err(bad("fields that do not match its id"));
    }
    Ok((key, sealed))
}

/// A status met inside a transaction: `ABORTED` means a writer won a lock conflict; try again.
pub(super) fn transaction_status(op: &str, s: Status) -> Attempt {
    match s.code() {
        Code::Aborted => Attempt::Raced,
        _ => Attempt::Failed(map_status(op, s)),
    }
}

/// Maps a gRPC status to a store error kind. Outages, overload and timeouts are transient; a request
/// Firestore calls malformed (e.g. a document over its size limit) is invalid.
pub(super) fn map_status(op: &str, s: Status) -> StoreError {
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => StoreError::Invalid(format!("firestore {op}: {}", s.message())),
        code => StoreError::Unavailable(format!("firestore {op}: {code:?}: {}", s.message())),
    }
}
