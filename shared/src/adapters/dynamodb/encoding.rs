//! Items and attribute values: page tokens, leases and tenant records to and from DynamoDB items, SDK errors.

use super::*;

/// The index position a page ends at, as stored: the table may hold rows a hand or an old release wrote, so
/// the key is kept verbatim rather than re-derived from a (valid) tenant id.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct PageToken {
    /// `tenant_id` of the last item.
    t: String,
    /// `desired_shard` of the last item (a DynamoDB number, as text).
    s: String,
}

/// Longest page token accepted (a tenant id is short; this bounds hostile input).
pub(super) const MAX_TOKEN_LEN: usize = 512;

/// An opaque page token: base64url of the last evaluated key.
pub(super) fn encode_page_token(key: &Item) -> Result<String, StoreError> {
    let (Some(AttributeValue::S(t)), Some(AttributeValue::N(s))) = (key.get(TENANT_ID), key.get(DESIRED_SHARD)) else {
        return Err(StoreError::Corrupt("dynamodb returned a page key of another shape".into()));
    };
    let json = serde_json::to_vec(&PageToken { t: t.clone(), s: s.clone() }).expect("serializes");
    Ok(URL_SAFE_NO_PAD.encode(json))
}

/// The key to resume after; anything the store did not hand out is `Invalid`.
pub(super) fn decode_page_token(token: &str) -> Result<Item, StoreError> {
    let invalid = || StoreError::Invalid("malformed page token".into());
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let PageToken { t, s } = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    if t.is_empty() || s.parse::<i64>().is_err() {
        return Err(invalid());
    }
    Ok(HashMap::from([
        (TENANT_ID.to_string(), AttributeValue::S(t)),
        (DESIRED_SHARD.to_string(), AttributeValue::N(s)),
    ]))
}

pub(super) fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

pub(super) fn n(v: impl std::fmt::Display) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// `now + ttl`, saturating.
pub(super) fn expiry(now: UnixMillis, ttl_ms: u64) -> UnixMillis {
    now.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
}

/// An owner id becomes an attribute value; refuse what no host id looks like.
pub(super) fn check_owner(owner: &str) -> Result<(), StoreError> {
    if owner.is_empty() || owner.len() > 256 {
        return Err(StoreError::Invalid("lease owner must be 1 to 256 bytes".into()));
    }
    Ok(())
}

pub(super) type Item = HashMap<String, AttributeValue>;

pub(super) fn num(item: &Item, name: &str) -> Result<Option<i64>, StoreError> {
    match item.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(AttributeValue::N(v)) => {
            v.parse().map(Some).map_err(|_| StoreError::Corrupt(format!("attribute {name} is not an integer")))
        }
        Some(_) => Err(StoreError::Corrupt(format!("attribute {name} is not a number"))),
    }
}

pub(super) fn string<'a>(item: &'a Item, name: &str) -> Result<Option<&'a str>, StoreError> {
    match item.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(AttributeValue::S(v)) => Ok(Some(v)),
        Some(_) => Err(StoreError::Corrupt(format!("attribute {name} is not a string"))),
    }
}

pub(super) fn parse_lease(item: &Item) -> Result<Option<Lease>, StoreError> {
    let Some(owner) = string(item, LEASE_OWNER)? else { return Ok(None) };
    let epoch = num(item, LEASE_EPOCH)?.unwrap_or(0);
    let epoch = u64::try_from(epoch).map_err(|_| StoreError::Corrupt("negative lease epoch".into()))?;
    let version = num(item, LEASE_VERSION)?.unwrap_or(0);
    let version = u64::try_from(version).map_err(|_| StoreError::Corrupt("negative lease version".into()))?;
    let expires_at = num(item, LEASE_EXPIRES_AT)?.unwrap_or(0);
    Ok(Some(Lease { owner: owner.to_owned(), epoch, version, expires_at }))
}

pub(super) fn parse_item(item: &Item) -> Result<TenantRecord, StoreError> {
    // The id is never echoed: a hand-edited table may hold anything there.
    let tenant_id = string(item, TENANT_ID)?
        .and_then(|id| TenantId::parse(id).ok())
        .ok_or_else(|| StoreError::Corrupt("tenant item has an invalid tenant_id".into()))?;
    let whatsapp_connected = match item.get(WHATSAPP_CONNECTED) {
        None => false,
        Some(AttributeValue::Bool(b)) => *b,
        Some(_) => return Err(StoreError::Corrupt("whatsapp_connected is not a boolean".into())),
    };
    let status = match string(item, STATUS)? {
        None => None,
        Some(v) => Some(TenantStatus::parse(v).ok_or_else(|| StoreError::Corrupt("unknown status".into()))?),
    };
    let consecutive_failures = match num(item, CONSECUTIVE_FAILURES)? {
        None => 0,
        Some(c) => u32::try_from(c).map_err(|_| StoreError::Corrupt("failure count out of range".into()))?,
    };
    Ok(TenantRecord {
        tenant_id,
        whatsapp_connected,
        status,
        reason: string(item, REASON)?.map(str::to_owned),
        status_changed_at: num(item, STATUS_CHANGED_AT)?,
        last_healthy_at: num(item, LAST_HEALTHY_AT)?,
        consecutive_failures,
        lease: parse_lease(item)?,
    })
}

/// Maps an SDK error to a store error kind: a request DynamoDB calls malformed is `Invalid`; throttling,
/// server errors, timeouts, connection failures and everything else are `Unavailable` (transient: never a
/// reason to mark a tenant).
pub(super) fn map_sdk_err<E>(op: &'static str, err: SdkError<E, HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    if let SdkError::ServiceError(se) = &err {
        let code = se.err().code().unwrap_or("unknown");
        let message = se.err().message().unwrap_or("");
        if code == "ValidationException" {
            return StoreError::Invalid(format!("dynamodb {op}: {message}"));
        }
        return StoreError::Unavailable(format!("dynamodb {op}: {code}: {message}"));
    }
    StoreError::Unavailable(format!("dynamodb {op}: {}", DisplayErrorContext(&err)))
}
