//! Unit tests of the Baileys conversion: file names, Buffers, integers, addresses, creds and key files.

use std::str::FromStr;

use serde_json::Value;
use wakeeper_shared::domain::{RecordKey, RecordKind, TenantId};
use whatsapp_rust::wacore::libsignal::protocol::{IdentityKey, KeyPair, LegacySessionLocalContext, SenderKeyRecord};
use whatsapp_rust::wacore::store::Device;
use whatsapp_rust::wacore_binary::Jid;

use super::address::sender_key_name;
use super::json::{ByteEncoding, bytes, opt_int};
use super::session::session_record;
use super::*;
use crate::engine_store::codec::PREKEYS_UPLOADED_THROUGH;

#[test]
fn addresses_are_rewritten_like_the_engine_writes_them() {
    assert_eq!(engine_address("5511999990000.0").as_deref(), Some("5511999990000@c.us.0"));
    assert_eq!(engine_address("5511999990000.7").as_deref(), Some("5511999990000:7@c.us.0"));
    assert_eq!(engine_address("201234567890123_1.0").as_deref(), Some("201234567890123@lid.0"));
    assert_eq!(engine_address("201234567890123_1.12").as_deref(), Some("201234567890123:12@lid.0"));
    assert_eq!(engine_address("1555_128.99").as_deref(), Some("1555:99@hosted.0"));
    assert_eq!(engine_address("1555_129.99").as_deref(), Some("1555:99@hosted.lid.0"));
    for bad in ["", "5511", "5511.x", "5511_2.0", "../x.0", "55 11.0", "5511.+1", "a.0", "5511.99999999"] {
        assert_eq!(engine_address(bad), None, "{bad}");
    }
    // The engine's own writer agrees.
    use whatsapp_rust::wacore::types::jid::JidExt;
    for (jid, baileys) in [
        ("5511999990000@s.whatsapp.net", "5511999990000.0"),
        ("5511999990000:7@s.whatsapp.net", "5511999990000.7"),
        ("201234567890123:3@lid", "201234567890123_1.3"),
    ] {
        let jid = Jid::from_str(jid).unwrap();
        assert_eq!(engine_address(baileys).unwrap(), jid.to_protocol_address().as_str());
    }
}

#[test]
fn sender_key_names_follow_the_engine() {
    assert_eq!(
        sender_key_name("120363000000000001@g.us--5511977776666--0").as_deref(),
        Some("120363000000000001@g.us:5511977776666@c.us.0")
    );
    assert_eq!(
        sender_key_name("5511999-1600000000@g.us--201234567890123_1--4").as_deref(),
        Some("5511999-1600000000@g.us:201234567890123:4@lid.0")
    );
    assert_eq!(sender_key_name("status@broadcast--5511--0").as_deref(), Some("status@broadcast:5511@c.us.0"));
    assert_eq!(sender_key_name("nogroup--5511--0"), None);
    assert_eq!(sender_key_name("g@g.us--5511"), None);
}

#[test]
fn file_names_are_checked() {
    for good in ["creds.json", "pre-key-1.json", "session-5511_1.0.json", "app-state-sync-key-AA+b__c=.json"] {
        check_file_name(good).unwrap();
    }
    for bad in ["../x.json", "a/b.json", "..json", ".hidden.json", "x\\y.json", "a b.json", "x.txt", "", "é.json"] {
        assert!(check_file_name(bad).is_err(), "{bad}");
    }
    let long = format!("{}.json", "a".repeat(300));
    assert!(check_file_name(&long).is_err());
}

#[test]
fn buffers_in_every_form_baileys_writes() {
    let want = vec![1u8, 2, 255];
    let forms = [
        serde_json::json!({"type": "Buffer", "data": "AQL/"}),
        serde_json::json!({"type": "Buffer", "data": [1, 2, 255]}),
        serde_json::json!({"0": 1, "1": 2, "2": 255}),
    ];
    for f in &forms {
        assert_eq!(bytes(Some(f), "x", ByteEncoding::Buffer).unwrap(), want);
    }
    assert_eq!(bytes(Some(&serde_json::json!("AQL/")), "x", ByteEncoding::BufferOrBase64).unwrap(), want);
    let bad = [
        (serde_json::json!({"type": "Buffer", "data": "%%%"}), "not valid base64"),
        (serde_json::json!({"type": "Buffer", "data": [1, 256]}), "outside 0-255"),
        (serde_json::json!({"type": "Buffer", "data": 7}), "without base64"),
        (serde_json::json!({"0": 1, "2": 2}), "gaps"),
        (serde_json::json!("AQL/"), "must be a Buffer"),
        (serde_json::json!([1, 2]), "must be a Buffer"),
    ];
    for (v, why) in bad {
        let e = bytes(Some(&v), "noiseKey.private", ByteEncoding::Buffer).unwrap_err();
        assert!(e.contains(why) && e.contains("noiseKey.private"), "{e}");
    }
}

fn buf(b: &[u8]) -> Value {
    wakeeper_testkit::baileys::buffer_json(b)
}

fn pair_json(k: &KeyPair) -> Value {
    wakeeper_testkit::baileys::key_pair_json(k)
}

/// Key material from the engine itself (no RNG crate needed here), written the way Baileys writes creds.
fn synthetic() -> (Device, Value) {
    let d = Device::new();
    let creds = wakeeper_testkit::baileys::creds_json(&d);
    (d, creds)
}

fn files(entries: &[(&str, Value)]) -> AuthFiles {
    let mut f = AuthFiles::default();
    for (name, v) in entries {
        f.insert(name, serde_json::to_vec(v).unwrap()).unwrap();
    }
    f
}

fn tenant() -> TenantId {
    TenantId::parse("cantina").unwrap()
}

#[test]
fn creds_become_the_engine_device() {
    let (d, creds) = synthetic();
    let prekey = Device::new().noise_key;
    let out = convert(&tenant(), &files(&[("creds.json", creds), ("pre-key-3.json", pair_json(&prekey))])).unwrap();
    let record = out.snapshot.check_restorable().unwrap();
    let back: Device = serde_json::from_value(serde_json::to_value(&record).unwrap()).unwrap();
    assert_eq!(back.registration_id, d.registration_id);
    assert_eq!(back.noise_key.public_key, d.noise_key.public_key);
    assert_eq!(back.identity_key.public_key, d.identity_key.public_key);
    assert_eq!(back.signed_pre_key_signature, d.signed_pre_key_signature);
    assert_eq!(back.adv_secret_key, d.adv_secret_key);
    assert_eq!(back.pn.unwrap().to_string(), "5511999990000:3@s.whatsapp.net");
    assert_eq!(back.lid.unwrap().to_string(), "123456789012345:3@lid");
    assert_eq!(back.push_name, "Cantina");
    assert_eq!(back.props_hash.as_deref(), Some("abc"));
    assert_eq!(back.edge_routing_info, Some(vec![8, 1]));
    assert_eq!((back.next_pre_key_id, back.first_unupload_pre_key_id), (5, 5));
    assert!(back.server_has_prekeys);
    assert_eq!(out.noise_public, d.noise_key.public_key.public_key_bytes());
    // The pre-key is the engine's protobuf record.
    let raw = &out.snapshot.records[&RecordKey::new(RecordKind::PreKey, "3")];
    let pk = whatsapp_rust::waproto::codec::pre_key_record_decode(raw).unwrap();
    assert_eq!(pk.id, Some(3));
    assert_eq!(pk.public_key.as_deref(), Some(prekey.public_key.public_key_bytes()));
    assert_eq!(out.snapshot.records[&RecordKey::new(RecordKind::Other, PREKEYS_UPLOADED_THROUGH)], 4u32.to_le_bytes());
}

#[test]
fn each_missing_required_field_is_named() {
    for field in ["noiseKey", "signedIdentityKey", "signedPreKey", "registrationId", "advSecretKey", "me", "account"] {
        let (_, mut creds) = synthetic();
        creds.as_object_mut().unwrap().remove(field);
        let e = convert(&tenant(), &files(&[("creds.json", creds)])).unwrap_err().to_string();
        assert!(e.starts_with("creds.json: ") && e.contains(&format!("`{field}")), "{field}: {e}");
    }
    for (path, field) in [("me", "id"), ("signedPreKey", "keyId"), ("account", "deviceSignature")] {
        let (_, mut creds) = synthetic();
        creds[path].as_object_mut().unwrap().remove(field);
        let e = convert(&tenant(), &files(&[("creds.json", creds)])).unwrap_err().to_string();
        assert!(e.contains(&format!("`{path}.{field}` is missing")), "{e}");
    }
}

#[test]
fn inconsistent_keys_are_refused() {
    let (_, mut creds) = synthetic();
    creds["noiseKey"]["public"] = buf(Device::new().noise_key.public_key.public_key_bytes());
    let e = convert(&tenant(), &files(&[("creds.json", creds)])).unwrap_err().to_string();
    assert!(e.contains("`noiseKey.public` does not belong to `noiseKey.private`"), "{e}");

    let (_, creds) = synthetic();
    let mut mixed = pair_json(&Device::new().noise_key);
    mixed["public"] = buf(Device::new().noise_key.public_key.public_key_bytes());
    let e = convert(&tenant(), &files(&[("creds.json", creds), ("pre-key-9.json", mixed)])).unwrap_err().to_string();
    assert!(e.starts_with("pre-key-9.json: ") && e.contains("does not belong"), "{e}");

    let (_, mut creds) = synthetic();
    creds["me"]["id"] = "5511999990000@s.whatsapp.net".into();
    let e = convert(&tenant(), &files(&[("creds.json", creds)])).unwrap_err().to_string();
    assert!(e.contains("`me.id` is not a linked device"), "{e}");
}

#[test]
fn sender_key_states_are_reversed_into_the_engine_order() {
    let (_, creds) = synthetic();
    let state = |id: u32, iteration: u32| {
        let signing = Device::new().identity_key;
        serde_json::json!({
            "senderKeyId": id,
            "senderChainKey": {"iteration": iteration, "seed": {"type": "Buffer", "data": vec![id as u8; 32]}},
            "senderSigningKey": {"public": buf(&signing.public_key.serialize()), "private": buf(&[])},
            "senderMessageKeys": [{"iteration": 0, "seed": {"type": "Buffer", "data": vec![9u8; 32]}}]
        })
    };
    // Baileys keeps the oldest state first and stores the record as a Buffer of its JSON text.
    let text = serde_json::to_vec(&serde_json::json!([state(11, 1), state(22, 5)])).unwrap();
    let out = convert(
        &tenant(),
        &files(&[("creds.json", creds), ("sender-key-120363000000000009@g.us--5511977776666--0.json", buf(&text))]),
    )
    .unwrap();
    let key = RecordKey::new(RecordKind::SenderKey, "120363000000000009@g.us:5511977776666@c.us.0");
    let record = SenderKeyRecord::deserialize(&out.snapshot.records[&key]).unwrap();
    let states = record.into_components().unwrap().states;
    assert_eq!(states.iter().map(|s| s.key_id).collect::<Vec<_>>(), vec![22, 11], "newest first");
    assert_eq!(states[0].chain_key.iteration, 5);
    assert_eq!(states[0].signing_key.private, None, "a received key has no private half");
    assert_eq!(states[1].message_keys.len(), 1);
}

#[test]
fn unsupported_session_versions_and_empty_records() {
    let local = LegacySessionLocalContext {
        identity_key: IdentityKey::new(Device::new().identity_key.public_key),
        registration_id: 1,
    };
    let e = session_record(&serde_json::json!({"_sessions": {}, "version": "v2"}), local).unwrap_err();
    assert!(e.contains("`version`"), "{e}");
    assert_eq!(session_record(&serde_json::json!({"_sessions": {}, "version": "v1"}), local).unwrap(), None);
    let e = session_record(&serde_json::json!({"_sessions": {"AAAA": {"currentRatchet": {}}}, "version": "v1"}), local)
        .unwrap_err();
    assert!(e.contains("_sessions[0]"), "{e}");
}

#[test]
fn integers_in_every_form() {
    assert_eq!(opt_int(Some(&serde_json::json!(5)), "x").unwrap(), Some(5));
    assert_eq!(opt_int(Some(&serde_json::json!("1795870691549")), "x").unwrap(), Some(1_795_870_691_549));
    assert_eq!(
        opt_int(Some(&serde_json::json!({"low": 1, "high": 1, "unsigned": false})), "x").unwrap(),
        Some((1 << 32) + 1)
    );
    assert!(opt_int(Some(&serde_json::json!(1.5)), "x").is_err());
    assert!(opt_int(Some(&serde_json::json!("x")), "x").is_err());
}
