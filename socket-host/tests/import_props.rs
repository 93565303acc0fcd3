//! Property tests of every importer's parsers (issue 19): the Baileys auth-state files (`creds.json` and every
//! key file) and the old system's Realtime Database export. Bounded here (`.ci/run`), longer in `scripts/fuzz`
//! (`PROPTEST_CASES`). What each property asserts: no panic on any input; hostile input is refused with the
//! file (and, for `creds.json`, the field) named; nothing is written (the parsers only return values).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Value, json};
use socket_host::import::baileys::{AuthFiles, BaileysError, convert};
use socket_host::import::rtdb::parse_export;
use wakeeper_shared::domain::TenantId;
use wakeeper_testkit::baileys::{buffer_json, creds_json};
use whatsapp_rust::wacore::store::Device;

/// Cases per property: `default` here; `PROPTEST_CASES` when set (scripts/fuzz).
fn config(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse::<u32>().ok()).unwrap_or(default);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

fn buf(b: &[u8]) -> Value {
    buffer_json(b)
}

/// A `creds.json` as Baileys writes it, from the engine's own key material.
fn valid_creds() -> Value {
    creds_json(&Device::new())
}

/// Any JSON value, a few levels deep, with the shapes Baileys uses (Buffers, numeric strings) among them.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::String),
        proptest::collection::vec(any::<u8>(), 0..80).prop_map(|b| buf(&b)),
        proptest::collection::vec(any::<u8>(), 0..80).prop_map(|b| Value::String(STANDARD.encode(b))),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map("[a-zA-Z]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// File names of every kind Baileys writes, with keys that are valid and not.
fn file_name() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("5511999990000.0".to_string()),
        Just("123456789012345_1.3".to_string()),
        "[0-9]{1,6}",
        "[a-zA-Z0-9_.@:-]{0,30}",
    ];
    (
        select(vec![
            "pre-key",
            "session",
            "sender-key",
            "app-state-sync-key",
            "app-state-sync-version",
            "identity-key",
            "sender-key-memory",
            "lid-mapping",
        ]),
        key,
    )
        .prop_map(|(kind, key)| format!("{kind}-{key}.json"))
}

fn tenant() -> TenantId {
    TenantId::parse("cantina").unwrap()
}

/// Every error names a file that was given (or is about the auth state as a whole).
fn names_a_given_file(e: &BaileysError, given: &[String]) -> bool {
    match e {
        BaileysError::File { file, .. } => {
            given.iter().any(|g| g.escape_debug().to_string().starts_with(file.trim_end_matches('…')))
        }
        BaileysError::Source(_) => true,
    }
}

/// Registration id 0 is a real Baileys account's (one in 256: Baileys keeps one random byte of it), so it
/// imports; a registration id that is not a number is refused naming the field.
#[test]
fn registration_id_zero_imports() {
    for (id, ok) in [(json!(0), true), (json!(16383), true), (json!(-1), false), (json!("x"), false)] {
        let mut creds = valid_creds();
        creds["registrationId"] = id.clone();
        let mut files = AuthFiles::default();
        files.insert("creds.json", serde_json::to_vec(&creds).unwrap()).unwrap();
        match convert(&tenant(), &files) {
            Ok(_) => assert!(ok, "registrationId {id} was accepted"),
            Err(e) => {
                assert!(!ok, "registrationId {id} refused: {e}");
                assert!(e.to_string().contains("registrationId"), "{e}");
            }
        }
    }
}

proptest! {
    #![proptest_config(config(64))]

    /// One field of a valid `creds.json` replaced by anything: converted, or refused naming `creds.json`.
    #[test]
    fn creds_with_any_field_replaced(path in select(vec![
        "noiseKey", "signedIdentityKey", "signedPreKey", "registrationId", "advSecretKey", "me", "account",
        "nextPreKeyId", "firstUnuploadedPreKeyId", "signedPreKey.keyPair", "signedPreKey.keyId",
        "signedPreKey.signature", "me.id", "me.lid", "me.name", "account.details", "account.deviceSignature",
        "noiseKey.private", "noiseKey.public",
    ]), value in any_json()) {
        let mut creds = valid_creds();
        let mut at = &mut creds;
        let parts: Vec<&str> = path.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            at = &mut at[*p];
        }
        at[parts[parts.len() - 1]] = value;
        let mut files = AuthFiles::default();
        files.insert("creds.json", serde_json::to_vec(&creds).unwrap()).unwrap();
        if let Err(e) = convert(&tenant(), &files) {
            prop_assert!(e.to_string().starts_with("creds.json: "), "{e}");
        }
    }

    /// Key files of any kind with any JSON, or any bytes, beside a valid `creds.json`: no panic, and a refusal
    /// names one of the files.
    #[test]
    fn key_files_with_any_content(entries in proptest::collection::vec((file_name(), prop_oneof![
        any_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        proptest::collection::vec(any::<u8>(), 0..200),
    ]), 1..6)) {
        let mut files = AuthFiles::default();
        files.insert("creds.json", serde_json::to_vec(&valid_creds()).unwrap()).unwrap();
        let mut given = vec!["creds.json".to_string()];
        for (name, content) in entries {
            if files.insert(&name, content).is_ok() {
                given.push(name);
            }
        }
        if let Err(e) = convert(&tenant(), &files) {
            prop_assert!(names_a_given_file(&e, &given), "{e} names none of {given:?}");
        }
    }

    /// `creds.json` itself as any bytes: refused naming it, never a panic.
    #[test]
    fn creds_as_any_bytes(content in proptest::collection::vec(any::<u8>(), 0..400)) {
        let mut files = AuthFiles::default();
        files.insert("creds.json", content).unwrap();
        if let Err(e) = convert(&tenant(), &files) {
            prop_assert!(e.to_string().starts_with("creds.json: "), "{e}");
        }
    }

    /// The Realtime Database export as any JSON or any bytes: parsed or refused, never a panic; every tenant it
    /// yields has a valid id.
    #[test]
    fn rtdb_export_of_any_shape(raw in prop_oneof![
        any_json().prop_map(|v| serde_json::to_vec(&json!({"tenants": v})).unwrap()),
        any_json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        proptest::collection::vec(any::<u8>(), 0..300),
    ]) {
        if let Ok(list) = parse_export(&raw) {
            for t in &list.tenants {
                prop_assert!(TenantId::parse(t.id.as_str()).is_ok());
            }
        }
    }
}
