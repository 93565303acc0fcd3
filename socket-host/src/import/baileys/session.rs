//! Sessions: libsignal-node's `SessionRecord` v1 JSON -> the engine's session record, through the engine's own
//! `LegacySessionRecordV1` conversion.

use serde_json::{Map, Value};
use whatsapp_rust::bytes::Bytes;
use whatsapp_rust::wacore::libsignal::protocol::{
    LegacyIndexedSessionV1, LegacySessionBaseKeyRoleV1, LegacySessionChainCounterV1, LegacySessionChainKeyV1,
    LegacySessionChainRoleV1, LegacySessionChainV1, LegacySessionDispositionV1, LegacySessionIndexV1,
    LegacySessionKeyPairV1, LegacySessionLocalContext, LegacySessionMessageKeyV1, LegacySessionPendingPreKeyV1,
    LegacySessionRatchetV1, LegacySessionRecordV1, LegacySessionV1,
};

use super::json::{ByteEncoding, bytes, decode_b64, int, obj, opt_bytes, opt_int, u32_of};

/// Byte field `key` of `o` (a Buffer or base64), its path named below `path`.
fn b64_field(o: &Map<String, Value>, key: &str, path: &str) -> Result<Bytes, String> {
    bytes(o.get(key), &format!("{path}.{key}"), ByteEncoding::BufferOrBase64).map(Bytes::from)
}

/// A session file's content as the engine's session record; `None` when it holds no session.
pub(super) fn session_record(v: &Value, local: LegacySessionLocalContext) -> Result<Option<Vec<u8>>, String> {
    let record = obj(Some(v), "the session record")?;
    let record_registration = match record.get("version").and_then(Value::as_str) {
        Some("v1") => None,
        None if record.get("version").is_none() => opt_int(record.get("registrationId"), "registrationId")?,
        _ => return Err("`version` is not a libsignal-node session record version (v1)".into()),
    };
    let sessions = match record.get("_sessions") {
        None | Some(Value::Null) => return Ok(None),
        s => obj(s, "_sessions")?,
    };
    if sessions.is_empty() {
        return Ok(None);
    }
    let mut indexed = Vec::with_capacity(sessions.len());
    for (i, (index_key, entry)) in sessions.iter().enumerate() {
        let path = format!("_sessions[{i}]");
        let index_key =
            decode_b64(index_key).ok_or_else(|| format!("`{path}` is keyed by something other than base64"))?;
        let session = legacy_session(obj(Some(entry), &path)?, &path, record_registration)?;
        indexed.push(LegacyIndexedSessionV1 { index_key: Bytes::from(index_key), session });
    }
    let converted = LegacySessionRecordV1::from_indexed_sessions(indexed)
        .and_then(|r| r.into_session_record(local))
        .map_err(|e| format!("session does not convert: {e}"))?;
    converted.serialize().map(Some).map_err(|e| format!("session does not serialize: {e}"))
}

/// One session of a record; `fallback_registration` is the record's own registration id (older records keep it
/// there rather than per session).
fn legacy_session(
    s: &Map<String, Value>,
    path: &str,
    fallback_registration: Option<i64>,
) -> Result<LegacySessionV1, String> {
    let registration_id =
        match opt_int(s.get("registrationId"), &format!("{path}.registrationId"))?.or(fallback_registration) {
            Some(r) => u32::try_from(r).map_err(|_| format!("`{path}.registrationId` is out of range"))?,
            None => return Err(format!("`{path}.registrationId` is missing")),
        };
    let ratchet = current_ratchet(s, path)?;
    let index = index_info(s, path)?;
    let chains = chains(s, path)?;
    let pending_pre_key = pending_pre_key(s, path)?;
    Ok(LegacySessionV1 { registration_id, ratchet, index, chains, pending_pre_key })
}

/// `currentRatchet`.
fn current_ratchet(s: &Map<String, Value>, path: &str) -> Result<LegacySessionRatchetV1, String> {
    let ratchet_path = format!("{path}.currentRatchet");
    let ratchet = obj(s.get("currentRatchet"), &ratchet_path)?;
    let key_pair_path = format!("{ratchet_path}.ephemeralKeyPair");
    let key_pair = obj(ratchet.get("ephemeralKeyPair"), &key_pair_path)?;
    Ok(LegacySessionRatchetV1 {
        key_pair: LegacySessionKeyPairV1 {
            public: b64_field(key_pair, "pubKey", &key_pair_path)?,
            private: b64_field(key_pair, "privKey", &key_pair_path)?,
        },
        last_remote_ephemeral_key: b64_field(ratchet, "lastRemoteEphemeralKey", &ratchet_path)?,
        previous_counter: int(ratchet.get("previousCounter"), &format!("{ratchet_path}.previousCounter"))?,
        root_key: b64_field(ratchet, "rootKey", &ratchet_path)?,
    })
}

/// `indexInfo`.
fn index_info(s: &Map<String, Value>, path: &str) -> Result<LegacySessionIndexV1, String> {
    let index_path = format!("{path}.indexInfo");
    let info = obj(s.get("indexInfo"), &index_path)?;
    let role = u32_of(info.get("baseKeyType"), &format!("{index_path}.baseKeyType"))?;
    let closed = int(info.get("closed"), &format!("{index_path}.closed"))?;
    let millis = |key: &str| -> Result<u64, String> {
        Ok(opt_int(info.get(key), &format!("{index_path}.{key}"))?.unwrap_or(0).max(0) as u64)
    };
    Ok(LegacySessionIndexV1 {
        base_key: b64_field(info, "baseKey", &index_path)?,
        base_key_role: LegacySessionBaseKeyRoleV1::try_from(role)
            .map_err(|e| format!("`{index_path}.baseKeyType`: {e}"))?,
        disposition: LegacySessionDispositionV1::from_closed_timestamp(closed)
            .map_err(|e| format!("`{index_path}.closed`: {e}"))?,
        used_at_ms: millis("used")?,
        created_at_ms: millis("created")?,
        remote_identity_key: b64_field(info, "remoteIdentityKey", &index_path)?,
    })
}

/// `_chains`, keyed by base64 ratchet key.
fn chains(s: &Map<String, Value>, path: &str) -> Result<Vec<LegacySessionChainV1>, String> {
    let chains_path = format!("{path}._chains");
    let mut chains = Vec::new();
    let Some(all) = s.get("_chains").filter(|c| !c.is_null()) else { return Ok(chains) };
    for (j, (ratchet_key, chain)) in obj(Some(all), &chains_path)?.iter().enumerate() {
        let chain_path = format!("{chains_path}[{j}]");
        let ratchet_key =
            decode_b64(ratchet_key).ok_or_else(|| format!("`{chain_path}` is keyed by something other than base64"))?;
        chains.push(one_chain(obj(Some(chain), &chain_path)?, &chain_path, ratchet_key)?);
    }
    Ok(chains)
}

/// One chain of `_chains`.
fn one_chain(
    chain: &Map<String, Value>,
    chain_path: &str,
    ratchet_key: Vec<u8>,
) -> Result<LegacySessionChainV1, String> {
    let key = obj(chain.get("chainKey"), &format!("{chain_path}.chainKey"))?;
    let counter = int(key.get("counter"), &format!("{chain_path}.chainKey.counter"))?;
    let role = u32_of(chain.get("chainType"), &format!("{chain_path}.chainType"))?;
    let mut message_keys = Vec::new();
    if let Some(mk) = chain.get("messageKeys").filter(|m| !m.is_null()) {
        for (index, seed) in obj(Some(mk), &format!("{chain_path}.messageKeys"))? {
            let index: u32 =
                index.parse().map_err(|_| format!("`{chain_path}.messageKeys` has a non-numeric index"))?;
            let seed = bytes(Some(seed), &format!("{chain_path}.messageKeys[]"), ByteEncoding::BufferOrBase64)?;
            message_keys.push(LegacySessionMessageKeyV1 { index, seed: Bytes::from(seed) });
        }
    }
    Ok(LegacySessionChainV1 {
        ratchet_key: Bytes::from(ratchet_key),
        role: LegacySessionChainRoleV1::try_from(role).map_err(|e| format!("`{chain_path}.chainType`: {e}"))?,
        chain_key: LegacySessionChainKeyV1 {
            counter: LegacySessionChainCounterV1::new(counter)
                .map_err(|e| format!("`{chain_path}.chainKey.counter`: {e}"))?,
            key: opt_bytes(key.get("key"), &format!("{chain_path}.chainKey.key"), ByteEncoding::BufferOrBase64)?
                .map(Bytes::from),
        },
        message_keys,
    })
}

/// `pendingPreKey`: the pre-key message this side still has to send, if any.
fn pending_pre_key(s: &Map<String, Value>, path: &str) -> Result<Option<LegacySessionPendingPreKeyV1>, String> {
    let pending = match s.get("pendingPreKey") {
        None | Some(Value::Null) => return Ok(None),
        p => p,
    };
    let pending_path = format!("{path}.pendingPreKey");
    let p = obj(pending, &pending_path)?;
    Ok(Some(LegacySessionPendingPreKeyV1 {
        pre_key_id: opt_int(p.get("preKeyId"), &format!("{pending_path}.preKeyId"))?
            .map(|i| u32::try_from(i).map_err(|_| format!("`{pending_path}.preKeyId` is out of range")))
            .transpose()?,
        signed_pre_key_id: u32_of(p.get("signedKeyId"), &format!("{pending_path}.signedKeyId"))?,
        base_key: b64_field(p, "baseKey", &pending_path)?,
    }))
}
