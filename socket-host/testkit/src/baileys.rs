//! Baileys auth-state files as Baileys writes them (Buffers as `{"type":"Buffer","data":"<base64>"}`), from the
//! engine's own key material: the fixtures of the importer's unit and property tests.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use whatsapp_rust::wacore::libsignal::protocol::KeyPair;
use whatsapp_rust::wacore::store::Device;

/// A Node Buffer as Baileys' JSON replacer writes it.
pub fn buffer_json(b: &[u8]) -> Value {
    json!({"type": "Buffer", "data": STANDARD.encode(b)})
}

/// A key pair as Baileys stores it.
pub fn key_pair_json(k: &KeyPair) -> Value {
    json!({"private": buffer_json(k.private_key.serialize()), "public": buffer_json(k.public_key.public_key_bytes())})
}

/// A complete `creds.json` for `d`, linked as `5511999990000:3` (lid `123456789012345:3`), push name "Cantina".
pub fn creds_json(d: &Device) -> Value {
    json!({
        "noiseKey": key_pair_json(&d.noise_key),
        "signedIdentityKey": key_pair_json(&d.identity_key),
        "signedPreKey": {"keyPair": key_pair_json(&d.signed_pre_key), "keyId": d.signed_pre_key_id,
                         "signature": buffer_json(&d.signed_pre_key_signature)},
        "registrationId": d.registration_id,
        "advSecretKey": STANDARD.encode(d.adv_secret_key),
        "me": {"id": "5511999990000:3@s.whatsapp.net", "lid": "123456789012345:3@lid", "name": "Cantina"},
        "account": {"details": "CAEQAg==", "accountSignature": STANDARD.encode([1u8; 64]),
                    "deviceSignature": STANDARD.encode([2u8; 64])},
        "nextPreKeyId": 5,
        "firstUnuploadedPreKeyId": 5,
        "lastPropHash": "abc",
        "routingInfo": buffer_json(&[8, 1])
    })
}
