//! Sender keys: Baileys' `SenderKeyRecord` (oldest state first) -> the engine's record (newest first).

use serde_json::Value;
use whatsapp_rust::wacore::libsignal::protocol::{
    SenderChainKeyComponents, SenderKeyRecord, SenderKeyRecordComponents, SenderKeyStateComponents,
    SenderMessageKeyComponents, SenderSigningKeyComponents,
};

use super::json::{ByteEncoding, bytes, fixed, obj, opt_bytes, public_key, u32_of};

/// A sender-key file's states as the engine's record; `None` when it holds none.
pub(super) fn sender_key_record(v: &Value) -> Result<Option<Vec<u8>>, String> {
    let states = match v {
        Value::Array(a) => a,
        Value::Null => return Ok(None),
        _ => return Err("must be a list of sender-key states".into()),
    };
    if states.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(states.len());
    // Baileys appends new states and reads the last one; the engine keeps the newest first.
    for (i, state) in states.iter().enumerate().rev() {
        let p = format!("[{i}]");
        let s = obj(Some(state), &p)?;
        let chain = obj(s.get("senderChainKey"), &format!("{p}.senderChainKey"))?;
        let signing = obj(s.get("senderSigningKey"), &format!("{p}.senderSigningKey"))?;
        let public =
            bytes(signing.get("public"), &format!("{p}.senderSigningKey.public"), ByteEncoding::BufferOrBase64)?;
        public_key(&public, &format!("{p}.senderSigningKey.public"))?;
        let private =
            opt_bytes(signing.get("private"), &format!("{p}.senderSigningKey.private"), ByteEncoding::BufferOrBase64)?
                .filter(|k| !k.is_empty());
        if let Some(k) = &private
            && k.len() != 32
        {
            return Err(format!("`{p}.senderSigningKey.private` must be 32 bytes (got {})", k.len()));
        }
        let mut message_keys = Vec::new();
        if let Some(keys) = s.get("senderMessageKeys").filter(|k| !k.is_null()) {
            let Value::Array(keys) = keys else {
                return Err(format!("`{p}.senderMessageKeys` must be a list"));
            };
            for (j, k) in keys.iter().enumerate() {
                let kp = format!("{p}.senderMessageKeys[{j}]");
                let k = obj(Some(k), &kp)?;
                message_keys.push(SenderMessageKeyComponents {
                    iteration: u32_of(k.get("iteration"), &format!("{kp}.iteration"))?,
                    seed: fixed::<32>(k.get("seed"), &format!("{kp}.seed"), ByteEncoding::BufferOrBase64)?.to_vec(),
                });
            }
        }
        out.push(SenderKeyStateComponents {
            key_id: u32_of(s.get("senderKeyId"), &format!("{p}.senderKeyId"))?,
            chain_key: SenderChainKeyComponents {
                iteration: u32_of(chain.get("iteration"), &format!("{p}.senderChainKey.iteration"))?,
                seed: fixed::<32>(
                    chain.get("seed"),
                    &format!("{p}.senderChainKey.seed"),
                    ByteEncoding::BufferOrBase64,
                )?
                .to_vec(),
            },
            signing_key: SenderSigningKeyComponents { public, private },
            message_keys,
        });
    }
    let record = SenderKeyRecord::from_components(SenderKeyRecordComponents { states: out })
        .map_err(|e| format!("sender key does not convert: {e}"))?;
    record.serialize().map(Some).map_err(|e| format!("sender key does not serialize: {e}"))
}
