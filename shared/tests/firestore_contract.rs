//! The Firestore credential store against Google's Firestore emulator: the shared port contract, plus what
//! only this adapter can be asked (its documents, record sets past one commit, consistent reads across pages,
//! outages).
//!
//! Needs `FIRESTORE_EMULATOR_HOST` (`scripts/local-servers start; eval "$(scripts/local-servers env)"`).
//! Without it every test fails, unless `WAKEEPER_SKIP_CLOUD_TESTS=1` says to skip on purpose.
#![cfg(all(feature = "contract-tests", feature = "firestore"))]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use firestore::gcloud_sdk::google::firestore::v1::{GetDocumentRequest, ListDocumentsRequest, value::ValueType};
use firestore::{FirestoreDb, FirestoreDbOptions};
use wakeeper_shared::adapters::firestore::{FirestoreCredentialStore, Resealed};
use wakeeper_shared::contract::{self, fresh_tenant, restorable_device};
use wakeeper_shared::crypto::{Cipher, KeyFingerprint};
use wakeeper_shared::domain::{
    ChangeBatch, CredentialSnapshot, MAX_WRITES_PER_COMMIT, RecordChange, RecordKey, RecordKind,
};
use wakeeper_shared::ports::{CredentialStore, StoreError};

const PROJECT: &str = "wakeeper-test";
const KEY: [u8; 32] = [0x42; 32];

/// The emulator's address, or `None` when the run chose to skip cloud tests. Panics when neither is set, so
/// a CI that forgot to start the emulator fails instead of passing silently.
fn emulator() -> Option<String> {
    match std::env::var("FIRESTORE_EMULATOR_HOST") {
        Ok(host) if !host.is_empty() => Some(host),
        _ if std::env::var("WAKEEPER_SKIP_CLOUD_TESTS").as_deref() == Ok("1") => {
            eprintln!("skipping: FIRESTORE_EMULATOR_HOST is unset and WAKEEPER_SKIP_CLOUD_TESTS=1");
            None
        }
        _ => panic!(
            "FIRESTORE_EMULATOR_HOST is not set: run `scripts/local-servers start` and \
             `eval \"$(scripts/local-servers env)\"` first, or set WAKEEPER_SKIP_CLOUD_TESTS=1 to skip on purpose"
        ),
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A store under a collection prefix no other test run uses.
async fn store() -> Option<FirestoreCredentialStore> {
    emulator()?;
    let prefix = format!("test{}_", random_hex(6));
    Some(FirestoreCredentialStore::new(PROJECT, Cipher::new(&KEY), prefix).await.expect("connect to the emulator"))
}

async fn raw_db() -> FirestoreDb {
    FirestoreDb::new(PROJECT).await.expect("connect to the emulator")
}

fn put(kind: RecordKind, key: &str, value: &[u8]) -> RecordChange {
    RecordChange { key: RecordKey::new(kind, key), value: Some(value.to_vec()) }
}

/// Names of the documents of one collection (all pages).
async fn list_names(db: &FirestoreDb, parent: &str, collection: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut token = String::new();
    loop {
        let req = ListDocumentsRequest {
            parent: parent.to_owned(),
            collection_id: collection.to_owned(),
            page_size: 500,
            page_token: std::mem::take(&mut token),
            ..Default::default()
        };
        let resp = db.client().get().list_documents(req).await.expect("list").into_inner();
        names.extend(resp.documents.into_iter().map(|d| d.name));
        if resp.next_page_token.is_empty() {
            return names;
        }
        token = resp.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_store_contract() {
    let Some(store) = store().await else { return };
    contract::credential_store_suite(Arc::new(store)).await;
}

/// The randomized writers' model check of the fence (short here; `scripts/fuzz` runs it long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_model_check() {
    let Some(store) = store().await else { return };
    contract::writers_model_check(&store, contract::ModelRun::from_env(3, 60)).await;
}

/// The suite must hold again on a store that already holds data, as a long-lived database does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_holds_again_on_a_used_collection() {
    let Some(store) = store().await else { return };
    let store = Arc::new(store);
    contract::credential_store_suite(Arc::clone(&store)).await;
    contract::credential_store_suite(store).await;
}

/// The documents are laid out as the module documentation says, and no value is stored in plaintext.
#[tokio::test]
async fn documents_follow_the_documented_layout() {
    let Some(store) = store().await else { return };
    let db = raw_db().await;
    let t = fresh_tenant();
    let marker = b"PLAINTEXT-MARKER-0123456789";
    let batch = ChangeBatch {
        generation: 3,
        epoch: 2,
        changes: vec![put(RecordKind::Session, "5511999990000.0", marker), put(RecordKind::PreKey, "a/b", marker)],
    };
    store.write(&t, &batch).await.unwrap();

    let meta_name = format!("{}/{}/{}", db.get_documents_path(), store.tenants_collection(), t);
    let meta = db
        .client()
        .get()
        .get_document(GetDocumentRequest { name: meta_name.clone(), ..Default::default() })
        .await
        .expect("meta document exists")
        .into_inner();
    let int = |f: &str| match meta.fields.get(f).and_then(|v| v.value_type.clone()) {
        Some(ValueType::IntegerValue(n)) => n,
        other => panic!("meta field {f}: {other:?}"),
    };
    assert_eq!(int("generation"), 3);
    assert_eq!(int("max_epoch"), 2);
    assert_eq!(int("write_epoch"), 2, "the writer's epoch is kept beside its generation");
    let set = match meta.fields.get("set").and_then(|v| v.value_type.clone()) {
        Some(ValueType::StringValue(s)) => s,
        other => panic!("meta field set: {other:?}"),
    };

    let names = list_names(&db, &meta_name, &format!("records-{set}")).await;
    let ids: Vec<&str> = names.iter().map(|n| n.rsplit('/').next().unwrap()).collect();
    // base64url("a/b") = "YS9i"; "5511999990000.0" -> "NTUxMTk5OTk5MDAwMC4w".
    assert_eq!(ids, vec!["pre_key~YS9i", "session~NTUxMTk5OTk5MDAwMC4w"]);
    for name in &names {
        let doc = db
            .client()
            .get()
            .get_document(GetDocumentRequest { name: name.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        let Some(ValueType::BytesValue(sealed)) = doc.fields.get("value").and_then(|v| v.value_type.clone()) else {
            panic!("record {name} has no bytes value");
        };
        assert!(!sealed.windows(marker.len()).any(|w| w == marker), "a value is stored in plaintext");
        assert!(matches!(
            doc.fields.get("generation").and_then(|v| v.value_type.clone()),
            Some(ValueType::IntegerValue(3))
        ));
    }
}

/// A snapshot far beyond one commit (1,200 records) is replaced whole, reads back whole, and the record set
/// it replaced is deleted afterwards (nothing left listed as garbage).
#[tokio::test]
async fn replace_beyond_one_commit_is_whole_and_leaves_no_garbage() {
    let Some(store) = store().await else { return };
    let db = raw_db().await;
    let t = fresh_tenant();
    store
        .write(&t, &ChangeBatch { generation: 1, epoch: 1, changes: vec![put(RecordKind::Session, "old.0", b"old")] })
        .await
        .unwrap();

    let mut snapshot = CredentialSnapshot { generation: 9, records: BTreeMap::new() };
    snapshot.set_device(&restorable_device());
    for i in 0..1_200u32 {
        snapshot.records.insert(RecordKey::new(RecordKind::PreKey, i.to_string()), i.to_be_bytes().to_vec());
    }
    store.replace(&t, &snapshot, 1).await.expect("replace with 1,201 records");
    assert_eq!(store.read(&t).await.unwrap(), snapshot, "the large snapshot reads back exactly");

    let meta_name = format!("{}/{}/{}", db.get_documents_path(), store.tenants_collection(), t);
    let meta = db
        .client()
        .get()
        .get_document(GetDocumentRequest { name: meta_name.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    match meta.fields.get("garbage").and_then(|v| v.value_type.clone()) {
        Some(ValueType::ArrayValue(a)) => assert!(a.values.is_empty(), "dead record sets were collected"),
        other => panic!("garbage field: {other:?}"),
    }

    // A batch of the full 500 changes onto it cannot share a commit with the meta document: it is applied
    // by rebuilding the set, and must read back as exactly the applied snapshot.
    let mut changes: Vec<RecordChange> = (0..450u32)
        .map(|i| RecordChange { key: RecordKey::new(RecordKind::PreKey, i.to_string()), value: None })
        .collect();
    changes.extend((0..50u32).map(|i| put(RecordKind::Session, &format!("new-{i}.0"), b"fresh")));
    assert_eq!(changes.len(), MAX_WRITES_PER_COMMIT);
    store.write(&t, &ChangeBatch { generation: 10, epoch: 1, changes: changes.clone() }).await.unwrap();
    let mut want = snapshot.clone();
    want.apply(&changes);
    want.generation = 10;
    assert_eq!(store.read(&t).await.unwrap(), want, "a full batch on a large snapshot applies exactly");

    let live_set = match db
        .client()
        .get()
        .get_document(GetDocumentRequest { name: meta_name.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .fields
        .get("set")
        .and_then(|v| v.value_type.clone())
    {
        Some(ValueType::StringValue(s)) => s,
        other => panic!("set field: {other:?}"),
    };
    assert_eq!(list_names(&db, &meta_name, &format!("records-{live_set}")).await.len(), 801);
    store.delete(&t, 1).await.unwrap();
    let leftovers = list_names(&db, &meta_name, &format!("records-{live_set}")).await;
    assert!(leftovers.is_empty(), "delete removes every record document, {} left", leftovers.len());
}

/// A read never mixes two commits, even when its records span several pages: a writer keeps changing the
/// first and the last record together while reads run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_consistent_across_pages() {
    let Some(store) = store().await else { return };
    let store = Arc::new(store);
    let t = fresh_tenant();
    let first = RecordKey::new(RecordKind::AppStateSyncKey, "0000");
    let last = RecordKey::new(RecordKind::TcToken, "zzzz");
    let mut snapshot = CredentialSnapshot { generation: 1, records: BTreeMap::new() };
    snapshot.records.insert(first.clone(), b"0".to_vec());
    snapshot.records.insert(last.clone(), b"0".to_vec());
    for i in 0..1_100u32 {
        snapshot.records.insert(RecordKey::new(RecordKind::PreKey, format!("{i:05}")), vec![1]);
    }
    store.replace(&t, &snapshot, 1).await.unwrap();

    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, t, first, last, done) = (store.clone(), t.clone(), first.clone(), last.clone(), done.clone());
        tokio::spawn(async move {
            let mut generation = 2;
            while !done.load(Ordering::Relaxed) {
                let v = generation.to_string().into_bytes();
                let changes = vec![
                    RecordChange { key: first.clone(), value: Some(v.clone()) },
                    RecordChange { key: last.clone(), value: Some(v) },
                ];
                store.write(&t, &ChangeBatch { generation, epoch: 1, changes }).await.unwrap();
                generation += 1;
            }
            generation
        })
    };
    for _ in 0..15 {
        let s = store.read(&t).await.unwrap();
        assert_eq!(s.records.len(), 1_102, "no record lost or duplicated");
        assert_eq!(s.records[&first], s.records[&last], "a read mixed two commits");
        let want = if s.generation == 1 { b"0".to_vec() } else { s.generation.to_string().into_bytes() };
        assert_eq!(s.records[&first], want, "the generation read belongs to the records read");
    }
    done.store(true, Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(written > 3, "the writer made progress while reads ran ({written})");
}

/// Two stores with different prefixes share a database but never each other's tenants.
#[tokio::test]
async fn collection_prefixes_separate_deployments() {
    let (Some(a), Some(b)) = (store().await, store().await) else { return };
    let t = fresh_tenant();
    a.write(&t, &ChangeBatch { generation: 1, epoch: 1, changes: vec![put(RecordKind::Session, "x.0", b"v")] })
        .await
        .unwrap();
    assert_eq!(a.list_tenants().await.unwrap(), vec![t.clone()]);
    assert!(b.list_tenants().await.unwrap().is_empty());
    assert!(matches!(b.read(&t).await, Err(StoreError::NotFound)));
    assert!(FirestoreCredentialStore::new(PROJECT, Cipher::new(&KEY), "bad/prefix").await.is_err());
}

/// The same collections seen through another cipher.
fn with_cipher(store: &FirestoreCredentialStore, db: FirestoreDb, cipher: Cipher) -> FirestoreCredentialStore {
    FirestoreCredentialStore::from_db(db, cipher, store.tenants_collection().trim_end_matches("tenants").to_owned())
        .unwrap()
}

/// Another data key: every call that would read or write records is refused as a key mismatch naming the key
/// that sealed them (by fingerprint, never a value), before anything is written, fence included.
#[tokio::test]
async fn another_data_key_is_a_key_mismatch_and_writes_nothing() {
    let Some(store) = store().await else { return };
    let t = fresh_tenant();
    let batch = ChangeBatch { generation: 1, epoch: 1, changes: vec![put(RecordKind::Identity, "1.0", b"VALUE-XYZ")] };
    store.write(&t, &batch).await.unwrap();
    let sealed_with = KeyFingerprint::of(&KEY).to_string();
    assert_eq!(store.sealed_by(&t).await.unwrap(), std::slice::from_ref(&sealed_with));
    let other = with_cipher(&store, raw_db().await, Cipher::new(&[7; 32]));
    let is_mismatch = |r: Result<(), StoreError>, what: &str| match r {
        Err(StoreError::KeyMismatch { sealed_with: s, holds }) => {
            assert_eq!(s, sealed_with, "{what}");
            assert_eq!(holds, KeyFingerprint::of(&[7; 32]).to_string(), "{what}");
        }
        other => panic!("{what}: want KeyMismatch, got {other:?}"),
    };
    is_mismatch(other.read(&t).await.map(|_| ()), "read");
    is_mismatch(other.claim(&t, 2).await.map(|_| ()), "claim");
    let later = ChangeBatch { generation: 2, epoch: 2, changes: vec![put(RecordKind::Identity, "2.0", b"x")] };
    is_mismatch(other.write(&t, &later).await, "write");
    is_mismatch(
        other.replace(&t, &CredentialSnapshot { generation: 5, records: Default::default() }, 2).await,
        "replace",
    );
    let msg = other.read(&t).await.unwrap_err().to_string();
    assert!(!msg.contains("VALUE-XYZ") && !msg.contains("1.0"), "no value or key: {msg}");
    // Nothing moved: the right key still reads generation 1, and epoch 1 is still not fenced off.
    assert_eq!(store.read(&t).await.unwrap().generation, 1);
    let again = ChangeBatch { generation: 2, epoch: 1, changes: vec![put(RecordKind::Identity, "1.1", b"y")] };
    store.write(&t, &again).await.expect("a claim by the wrong key fenced the owner off");
    assert_eq!(other.generation(&t).await.unwrap(), Some(2), "metadata needs no key");
}

/// Rotation: a cipher holding the new and the previous key reads both and seals with the new one; `reseal`
/// moves every record to the new key with generation and writer unchanged; the old key alone is then refused.
#[tokio::test]
async fn a_rotation_reseals_every_record_under_the_new_key() {
    let Some(old) = store().await else { return };
    let t = fresh_tenant();
    // More records than one commit holds, so the re-seal builds its set in several commits.
    let records = (0..600).map(|i| (RecordKey::new(RecordKind::PreKey, i.to_string()), format!("v{i}").into_bytes()));
    old.replace(&t, &CredentialSnapshot { generation: 1, records: records.collect() }, 3).await.unwrap();
    let new_key = [9u8; 32];
    let rotating = with_cipher(&old, raw_db().await, Cipher::new(&new_key).with_previous(&KEY));
    let (old_fp, new_fp) = (KeyFingerprint::of(&KEY).to_string(), KeyFingerprint::of(&new_key).to_string());
    // A host holding both writes on top: the set now holds records of both keys, and says so.
    rotating
        .write(&t, &ChangeBatch { generation: 2, epoch: 3, changes: vec![put(RecordKind::Session, "s", b"new")] })
        .await
        .unwrap();
    assert_eq!(old.sealed_by(&t).await.unwrap(), [old_fp.clone(), new_fp.clone()]);
    let before = rotating.read(&t).await.unwrap();
    assert_eq!(before.records.len(), 601);
    assert!(matches!(old.read(&t).await, Err(StoreError::KeyMismatch { .. })), "the old key reads new records");

    assert_eq!(rotating.reseal(&t).await.unwrap(), Resealed::Done { records: 601 });
    assert_eq!(rotating.reseal(&t).await.unwrap(), Resealed::AlreadyCurrent);
    assert_eq!(old.sealed_by(&t).await.unwrap(), std::slice::from_ref(&new_fp));
    let new_only = with_cipher(&old, raw_db().await, Cipher::new(&new_key));
    assert_eq!(new_only.read(&t).await.unwrap(), before, "records or generation changed in the re-seal");
    // The writer's retry is still recognised, and the fence still holds.
    new_only
        .write(&t, &ChangeBatch { generation: 2, epoch: 3, changes: vec![put(RecordKind::Session, "s", b"retry")] })
        .await
        .unwrap();
    assert_eq!(new_only.read(&t).await.unwrap(), before, "a retry of generation 2 was applied again");
    match old.read(&t).await {
        Err(StoreError::KeyMismatch { sealed_with, .. }) => assert_eq!(sealed_with, new_fp),
        other => panic!("want KeyMismatch, got {other:?}"),
    }
    assert_eq!(new_only.reseal(&fresh_tenant()).await.unwrap(), Resealed::Absent);
}

/// A TCP relay to the emulator that the test can cut, as an outage would.
struct Relay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: String) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                let target = target.clone();
                conns.spawn(async move {
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
            // Dropping the task drops the listener and, with the JoinSet, every relayed connection.
        });
        Relay { port, task }
    }

    /// Closes the listener and every open connection.
    async fn cut(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Firestore that goes away is `Unavailable` (transient) on every entry point, never `NotFound` or `Corrupt`,
/// and a client cannot be built against an address where nothing listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_firestore_is_unavailable() {
    let Some(host) = emulator() else { return };
    let relay = Relay::start(host).await;
    let options = FirestoreDbOptions {
        firebase_api_url: Some(format!("http://127.0.0.1:{}", relay.port)),
        ..FirestoreDbOptions::new(PROJECT.to_owned())
    };
    let db = FirestoreDb::with_options(options.clone()).await.expect("connect through the relay");
    let store = FirestoreCredentialStore::from_db(db, Cipher::new(&KEY), format!("down{}_", random_hex(4)))
        .unwrap()
        .with_timeout(Duration::from_secs(3));
    let t = fresh_tenant();
    let one = ChangeBatch { generation: 1, epoch: 1, changes: vec![put(RecordKind::Session, "x.0", b"v")] };
    store.write(&t, &one).await.expect("the store works through the relay");
    assert_eq!(store.generation(&t).await.unwrap(), Some(1));

    relay.cut().await;
    let two = ChangeBatch { generation: 2, epoch: 1, changes: vec![put(RecordKind::Session, "x.0", b"w")] };
    let results = [
        ("read", store.read(&t).await.map(|_| ())),
        ("generation", store.generation(&t).await.map(|_| ())),
        ("write", store.write(&t, &two).await),
        ("replace", store.replace(&t, &CredentialSnapshot::default(), 1).await),
        ("claim", store.claim(&t, 2).await.map(|_| ())),
        ("delete", store.delete(&t, 1).await),
        ("list_tenants", store.list_tenants().await.map(|_| ())),
    ];
    for (op, result) in results {
        match result {
            Err(e @ StoreError::Unavailable(_)) => assert!(e.is_transient()),
            other => panic!("{op} on a firestore that went away: want Unavailable, got {other:?}"),
        }
    }
    assert!(FirestoreDb::with_options(options).await.is_err(), "nothing listens there any more");
}
