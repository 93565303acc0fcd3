//! The embedded (redb) adapter against the shared port contracts, plus what only the embedded store can be
//! asked: what lands on disk, reopening, and hostile rows planted in the file by hand.
#![cfg(all(feature = "contract-tests", feature = "embedded"))]

use std::path::Path;
use std::sync::Arc;

use redb::TableDefinition;
use wakeeper_shared::adapters::embedded::{EmbeddedStore, STORE_FILE};
use wakeeper_shared::contract::{self, SwapRecords, fresh_tenant, restorable_device};
use wakeeper_shared::crypto::Cipher;
use wakeeper_shared::domain::{
    ChangeBatch, CredentialSnapshot, MAX_RECORD_KEY_LEN, RecordChange, RecordKey, RecordKind, TenantId, TenantIdError,
    TenantRecord,
};
use wakeeper_shared::ports::{CredentialStore, StoreError, TenantStore};

const KEY: [u8; 32] = [0x5a; 32];

fn open(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(dir.join(STORE_FILE), Cipher::new(&KEY)).expect("open the embedded store")
}

fn one_record(generation: u64, key: RecordKey, value: &[u8]) -> ChangeBatch {
    ChangeBatch { generation, epoch: 1, changes: vec![RecordChange { key, value: Some(value.to_vec()) }] }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract::credential_store_suite(Arc::new(open(dir.path()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    contract::tenant_store_suite(Arc::new(open(dir.path()))).await;
}

/// The randomized writers' model check of the fence (short here; `scripts/fuzz` runs it long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_model_check() {
    let dir = tempfile::tempdir().unwrap();
    contract::writers_model_check(&open(dir.path()), contract::ModelRun::from_env(30, 200)).await;
}

/// The suites must hold on a store that already has data (as a long-lived emulator does), and across a reopen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contracts_hold_again_on_a_used_and_reopened_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    contract::credential_store_suite(Arc::clone(&store)).await;
    contract::tenant_store_suite(store.clone()).await;
    drop(store);
    let store = Arc::new(open(dir.path()));
    contract::credential_store_suite(Arc::clone(&store)).await;
    contract::tenant_store_suite(store).await;
}

#[tokio::test]
async fn both_ports_share_one_file_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let t = fresh_tenant();
    let mut snapshot = CredentialSnapshot { generation: 3, ..Default::default() };
    snapshot.set_device(&restorable_device());
    snapshot.records.insert(RecordKey::new(RecordKind::Session, "1.0"), b"session".to_vec());
    {
        let store = open(dir.path());
        store.replace(&t, &snapshot, 1).await.unwrap();
        store.set_desired(&t, true).await.unwrap();
        store.acquire_lease(&t, "host-a", None, 1_000, 10).await.unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.read(&t).await.unwrap(), snapshot, "credentials survive a reopen");
    let record = store.get(&t).await.unwrap().expect("tenant record survives a reopen");
    assert!(record.whatsapp_connected);
    assert_eq!(record.lease.map(|l| l.epoch), Some(1));
    assert_eq!(store.list_tenants().await.unwrap(), vec![t]);
}

#[tokio::test]
async fn a_second_open_of_the_same_file_is_unavailable_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    match EmbeddedStore::open(dir.path().join(STORE_FILE), Cipher::new(&KEY)) {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("a second open of a file in use: want Unavailable, got {other:?}"),
    }
}

#[cfg(unix)]
#[tokio::test]
async fn the_file_is_private_and_its_directory_is_created() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let store = EmbeddedStore::open(data.join(STORE_FILE), Cipher::new(&KEY)).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(store.path()), 0o600, "the store file is readable by its owner only");
    assert_eq!(mode(&data), 0o700, "a data dir the store creates is private");
}

#[tokio::test]
async fn record_values_never_reach_the_file_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let t = fresh_tenant();
    let marker = b"PLAINTEXT-MARKER-0123456789-PLAINTEXT-MARKER";
    let changes = [RecordKind::Session, RecordKind::Identity, RecordKind::Device]
        .into_iter()
        .enumerate()
        .map(|(i, kind)| RecordChange { key: RecordKey::new(kind, format!("k{i}")), value: Some(marker.to_vec()) })
        .collect();
    store.write(&t, &ChangeBatch { generation: 1, epoch: 1, changes }).await.unwrap();
    assert_eq!(store.read(&t).await.unwrap().records.len(), 3);
    drop(store);
    let bytes = std::fs::read(dir.path().join(STORE_FILE)).unwrap();
    assert!(!bytes.windows(marker.len()).any(|w| w == marker), "a record value is stored in plaintext");
}

#[tokio::test]
async fn corrupt_names_the_kind_and_never_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let t = fresh_tenant();
    let (a, b) = (RecordKey::new(RecordKind::SenderKey, "g1::u1"), RecordKey::new(RecordKind::SenderKey, "g1::u2"));
    let batch = ChangeBatch {
        generation: 1,
        epoch: 1,
        changes: vec![
            RecordChange { key: a.clone(), value: Some(b"VALUE-ONE".to_vec()) },
            RecordChange { key: b.clone(), value: Some(b"VALUE-TWO".to_vec()) },
        ],
    };
    store.write(&t, &batch).await.unwrap();
    store.swap_stored_values(&t, &a, &b).await;
    match store.read(&t).await {
        Err(StoreError::Corrupt(msg)) => {
            assert!(msg.contains("sender_key"), "the message names the record kind: {msg}");
            assert!(!msg.contains("VALUE-"), "the message must not carry a value: {msg}");
            assert!(!msg.contains("g1::u"), "the message must not carry the record key: {msg}");
        }
        other => panic!("want Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn another_data_key_reads_corrupt_not_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let t = fresh_tenant();
    {
        let store = open(dir.path());
        store.write(&t, &one_record(1, RecordKey::device(), &restorable_device().to_bytes())).await.unwrap();
    }
    let other = EmbeddedStore::open(dir.path().join(STORE_FILE), Cipher::new(&[0x11; 32])).unwrap();
    match other.read(&t).await {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("device"), "names the kind: {msg}"),
        other => panic!("a snapshot sealed with another key: want Corrupt, got {other:?}"),
    }
    // Metadata needs no key: the generation still reads, so the host can tell "corrupt" from "missing".
    assert_eq!(other.generation(&t).await.unwrap(), Some(1));
}

#[tokio::test]
async fn an_overlong_record_key_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let t = fresh_tenant();
    let long = RecordKey::new(RecordKind::Session, "k".repeat(MAX_RECORD_KEY_LEN + 1));
    match store.write(&t, &one_record(1, long, b"v")).await {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("a record key over {MAX_RECORD_KEY_LEN} bytes: want Invalid, got {other:?}"),
    }
    assert_eq!(store.generation(&t).await.unwrap(), None, "nothing stored");
    let longest = RecordKey::new(RecordKind::Session, "k".repeat(MAX_RECORD_KEY_LEN));
    store.write(&t, &one_record(1, longest, b"v")).await.expect("a key of exactly the limit is fine");
}

/// The ids issue 2 names. The ports take `&TenantId`, so `TenantId::parse` (and serde, which calls it) is the
/// one gate every store entry point stands behind.
fn bad_ids() -> Vec<(&'static str, String, TenantIdError)> {
    vec![
        ("dot-dot", "..".into(), TenantIdError::BadCharacter),
        ("slash", "/".into(), TenantIdError::BadCharacter),
        ("path", "a/../b".into(), TenantIdError::BadCharacter),
        ("percent-encoded dot", "%2e".into(), TenantIdError::BadCharacter),
        ("percent-encoded dot-dot", "%2e%2e".into(), TenantIdError::BadCharacter),
        ("NUL", "a\0b".into(), TenantIdError::BadCharacter),
        ("cyrillic look-alike", "\u{0430}dmin".into(), TenantIdError::BadCharacter),
        ("fullwidth look-alike", "\u{FF41}dmin".into(), TenantIdError::BadCharacter),
        ("empty", String::new(), TenantIdError::Empty),
        ("65 chars", "a".repeat(65), TenantIdError::TooLong),
    ]
}

#[test]
fn every_bad_id_from_issue_2_is_refused() {
    for (name, raw, want) in bad_ids() {
        assert_eq!(TenantId::parse(&raw).unwrap_err(), want, "{name} must be refused by TenantId::parse");
        let json = serde_json::to_string(&raw).unwrap();
        assert!(serde_json::from_str::<TenantId>(&json).is_err(), "{name} must be refused when deserialized");
        let record = format!(
            r#"{{"tenant_id":{json},"whatsapp_connected":true,"status":null,"reason":null,
                "status_changed_at":null,"last_healthy_at":null,"consecutive_failures":0,"lease":null}}"#
        );
        assert!(serde_json::from_str::<TenantRecord>(&record).is_err(), "{name} must not decode inside a record");
    }
    assert!(TenantId::parse(&"a".repeat(64)).is_ok(), "64 chars is the longest valid id");
}

// The on-disk layout documented in `adapters::embedded`; a mismatch in types makes redb refuse to open them.
const CREDENTIALS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("credentials");
const GENERATIONS: TableDefinition<&str, u64> = TableDefinition::new("credential_generations");
const TENANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("tenants");
const DESIRED: TableDefinition<&str, ()> = TableDefinition::new("desired_tenants");

/// A file edited by hand (or by a buggy release) holds bad ids: listing skips them with a warning instead of
/// panicking or handing them on, and the valid tenants around them are still served.
#[tokio::test]
async fn bad_ids_planted_in_the_file_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let good = TenantId::parse("good-tenant").unwrap();
    let bad_json = TenantId::parse("valid-key-bad-record").unwrap();
    let odd_kind = TenantId::parse("odd-kind").unwrap();
    {
        let store = open(dir.path());
        store.write(&good, &one_record(1, RecordKey::device(), b"device")).await.unwrap();
        store.write(&odd_kind, &one_record(1, RecordKey::device(), b"device")).await.unwrap();
        store.set_desired(&good, true).await.unwrap();
    }
    {
        let db = redb::Database::create(dir.path().join(STORE_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut generations = txn.open_table(GENERATIONS).unwrap();
            let mut credentials = txn.open_table(CREDENTIALS).unwrap();
            let mut tenants = txn.open_table(TENANTS).unwrap();
            let mut desired = txn.open_table(DESIRED).unwrap();
            for (_, raw, _) in bad_ids() {
                generations.insert(raw.as_str(), 1).unwrap();
                credentials.insert((raw.as_str(), "device", "self"), b"not sealed".as_slice()).unwrap();
                let record = serde_json::json!({
                    "tenant_id": raw, "whatsapp_connected": true, "status": null, "reason": null,
                    "status_changed_at": null, "last_healthy_at": null, "consecutive_failures": 0, "lease": null,
                });
                tenants.insert(raw.as_str(), serde_json::to_vec(&record).unwrap().as_slice()).unwrap();
                desired.insert(raw.as_str(), ()).unwrap();
            }
            // A valid key whose record names a bad id inside.
            let inner = serde_json::json!({"tenant_id": "../evil", "whatsapp_connected": true,
                "consecutive_failures": 0});
            tenants.insert(bad_json.as_str(), serde_json::to_vec(&inner).unwrap().as_slice()).unwrap();
            desired.insert(bad_json.as_str(), ()).unwrap();
            // A record of a kind this version does not know.
            credentials.insert((odd_kind.as_str(), "from_the_future", "x"), b"sealed?".as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }

    let store = open(dir.path());
    assert_eq!(store.list_tenants().await.unwrap(), vec![good.clone(), odd_kind.clone()], "only valid ids listed");
    let page = store.list_desired(None, 100).await.unwrap();
    let listed: Vec<_> = page.items.iter().map(|r| r.tenant_id.clone()).collect();
    assert_eq!(listed, vec![good.clone()], "only valid, decodable desired tenants are listed");
    assert_eq!(page.next, None);
    // Paging with a small limit walks past the bad rows too.
    let mut token = None;
    let mut paged = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages < 100, "paging never ends");
        let page = store.list_desired(token.clone(), 1).await.unwrap();
        paged.extend(page.items.into_iter().map(|r| r.tenant_id));
        if page.next.is_none() {
            break;
        }
        assert_ne!(page.next, token, "the page token must move forward");
        token = page.next;
    }
    assert_eq!(paged, vec![good.clone()], "paging skips bad rows");
    match store.get(&bad_json).await {
        Err(StoreError::Corrupt(msg)) => assert!(!msg.contains("evil"), "no hostile text echoed: {msg}"),
        other => panic!("a record naming a bad id inside: want Corrupt, got {other:?}"),
    }
    match store.read(&odd_kind).await {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains("unknown kind"), "{msg}"),
        other => panic!("a record of an unknown kind: want Corrupt, got {other:?}"),
    }
    assert_eq!(store.read(&good).await.unwrap().records.len(), 1, "the good tenant reads normally");
    assert_eq!(store.get(&good).await.unwrap().map(|r| r.whatsapp_connected), Some(true));
}

/// Writes are committed in groups: many at once, some refused, all answered as if alone, and all durable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_writes_answer_each_caller_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let ids: Vec<TenantId> = (0..200).map(|i| TenantId::parse(&format!("group-{i:03}")).unwrap()).collect();
    let contested = TenantId::parse("contested").unwrap();
    let now = wakeeper_shared::domain::now_millis();
    let leases = ids.iter().map(|id| {
        let store = store.clone();
        let id = id.clone();
        tokio::spawn(async move { store.acquire_lease(&id, "host-a", None, 30_000, now).await })
    });
    let contenders = (0..20).map(|i| {
        let store = store.clone();
        let t = contested.clone();
        tokio::spawn(async move { store.acquire_lease(&t, &format!("host-{i}"), None, 30_000, now).await })
    });
    let mut snapshot = CredentialSnapshot { generation: 2, ..Default::default() };
    snapshot.set_device(&restorable_device());
    let stale = {
        let store = store.clone();
        let t = ids[0].clone();
        let s = snapshot.clone();
        // Fence the tenant at epoch 5 first, then race a stale epoch-1 write against the leases.
        store.replace(&t, &s, 5).await.unwrap();
        tokio::spawn(
            async move { store.write(&t, &one_record(3, RecordKey::new(RecordKind::Session, "1.0"), b"s")).await },
        )
    };
    let leases = futures_util::future::join_all(leases).await;
    let contenders = futures_util::future::join_all(contenders).await;
    for (id, lease) in ids.iter().zip(leases) {
        assert_eq!(lease.unwrap().unwrap().epoch, 1, "{id}");
    }
    let winners = contenders.into_iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    assert_eq!(winners, 1, "exactly one contender holds the contested lease");
    assert!(matches!(stale.await.unwrap(), Err(StoreError::Conflict(_))), "the stale write is refused alone");
    drop(store);
    let store = open(dir.path());
    for id in &ids {
        let record = store.get(id).await.unwrap().unwrap();
        assert_eq!(record.lease.unwrap().owner, "host-a", "{id}");
    }
    assert_eq!(store.read(&ids[0]).await.unwrap().generation, 2);
}
