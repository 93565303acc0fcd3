//! Contract suites for the storage ports: every adapter (embedded, Firestore, DynamoDB) runs the same cases, so
//! the rest of wakeeper can rely on the port's documented behaviour rather than on one adapter's.
//!
//! The suites panic with a message naming the broken rule. Each run uses fresh random tenant ids
//! (`t-<hex>`), so a suite can run again and again against a long-lived emulator without cleaning up.
//! Only tests link this module (`cfg(test)` or the `contract-tests` feature).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Barrier;

use crate::domain::{
    ChangeBatch, CredentialSnapshot, DeviceRecord, Lease, MAX_WRITES_PER_COMMIT, RecordChange, RecordKey, RecordKind,
    StatusUpdate, TenantId, TenantStatus, UnixMillis, now_millis,
};
use crate::ports::{Conflict, CredentialStore, StoreError, TenantStore};

/// Raw access an adapter grants the suite so it can play the attacker (or the buggy migration) that moves
/// sealed values between rows; the cipher must then refuse them.
#[async_trait]
pub trait SwapRecords: Send + Sync {
    /// Exchanges the stored (sealed) values of two records of one tenant, leaving everything else alone.
    async fn swap_stored_values(&self, tenant: &TenantId, a: &RecordKey, b: &RecordKey);

    /// Copies the stored (sealed) value of `key` from one tenant to the same key of another.
    async fn copy_stored_value(&self, from: &TenantId, to: &TenantId, key: &RecordKey);
}

/// A tenant id no earlier run has used: `t-` and 16 random hex digits.
pub fn fresh_tenant() -> TenantId {
    TenantId::parse(&format!("t-{}", random_hex(8))).expect("a generated tenant id is valid")
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random source works");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A device record that passes [`CredentialSnapshot::check_restorable`], for tests across the workspace.
pub fn restorable_device() -> DeviceRecord {
    DeviceRecord {
        registration_id: 4242,
        noise_key: vec![1; 64],
        identity_key: vec![2; 64],
        signed_pre_key: vec![3; 64],
        signed_pre_key_id: 1,
        signed_pre_key_signature: vec![4; 64],
        adv_secret_key: vec![5; 32],
        account: Some(vec![6; 120]),
        push_name: "Contract Test".into(),
        rest: serde_json::Map::from_iter([
            ("pn".to_string(), serde_json::json!("5511999990000:7@s.whatsapp.net")),
            ("login_counter".to_string(), serde_json::json!(3)),
        ]),
    }
}

/// A value that is recognisable in a dump or an error message, so the suites can check it never leaks.
fn secret(label: &str) -> Vec<u8> {
    format!("secret-{label}-{}", random_hex(4)).into_bytes()
}

fn put(kind: RecordKind, key: &str, value: Vec<u8>) -> RecordChange {
    RecordChange { key: RecordKey::new(kind, key), value: Some(value) }
}

fn del(kind: RecordKind, key: &str) -> RecordChange {
    RecordChange { key: RecordKey::new(kind, key), value: None }
}

fn batch(generation: u64, epoch: u64, changes: Vec<RecordChange>) -> ChangeBatch {
    ChangeBatch { generation, epoch, changes }
}

/// Records of many kinds with keys shaped like the engine's (addresses with `@`, `:` and `.`, ids, a key with
/// a `/` as base64 produces), an empty value and a large binary one.
fn varied_changes() -> Vec<RecordChange> {
    let mut device = restorable_device();
    device.push_name = String::from_utf8(secret("push-name")).expect("ascii");
    let large: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    vec![
        RecordChange { key: RecordKey::device(), value: Some(device.to_bytes()) },
        put(RecordKind::Identity, "5511999990000.0", secret("identity")),
        put(RecordKind::Session, "5511999990000.0", secret("session-a")),
        put(RecordKind::Session, "123456789012345@lid.3", secret("session-b")),
        put(RecordKind::PreKey, "17", secret("pre-key")),
        put(RecordKind::SignedPreKey, "1", secret("signed-pre-key")),
        put(RecordKind::SenderKey, "120363000000000000@g.us::5511999990000::0", secret("sender-key")),
        put(RecordKind::AppStateSyncKey, "00000001ab", secret("sync-key")),
        put(RecordKind::AppStateVersion, "critical_block", secret("version")),
        put(RecordKind::AppStateMutationMac, "regular_low:q+/Zm9vYmFy==", secret("mac")),
        put(RecordKind::LidMapping, "123456789012345", Vec::new()),
        put(RecordKind::Other, "blob", large),
    ]
}

fn applied(generation: u64, base: &CredentialSnapshot, changes: &[RecordChange]) -> CredentialSnapshot {
    let mut s = base.clone();
    s.apply(changes);
    s.generation = generation;
    s
}

async fn read_ok(store: &dyn CredentialStore, tenant: &TenantId, what: &str) -> CredentialSnapshot {
    store.read(tenant).await.unwrap_or_else(|e| panic!("{what}: read of {tenant} failed: {e:?}"))
}

async fn write_ok(store: &dyn CredentialStore, tenant: &TenantId, b: &ChangeBatch, what: &str) {
    store.write(tenant, b).await.unwrap_or_else(|e| panic!("{what}: write to {tenant} failed: {e:?}"));
}

/// Compares without printing record values (they may be large); names the first differing key.
fn assert_snapshot_eq(got: &CredentialSnapshot, want: &CredentialSnapshot, what: &str) {
    assert_eq!(got.generation, want.generation, "{what}: generation");
    let got_keys: Vec<_> = got.records.keys().collect();
    let want_keys: Vec<_> = want.records.keys().collect();
    assert_eq!(got_keys, want_keys, "{what}: record keys");
    for (k, v) in &want.records {
        assert!(got.records[k] == *v, "{what}: value of {k} differs from what was written");
    }
}

fn assert_corrupt_without_leak(result: Result<CredentialSnapshot, StoreError>, secrets: &[&[u8]], what: &str) {
    match result {
        Err(StoreError::Corrupt(msg)) => {
            for s in secrets {
                let s = String::from_utf8_lossy(s);
                assert!(!msg.contains(s.as_ref()), "{what}: the Corrupt message leaks a record value: {msg}");
            }
        }
        Err(e) => panic!("{what}: want Corrupt, got error {e:?}"),
        Ok(s) => panic!("{what}: want Corrupt, the read succeeded with {} records", s.records.len()),
    }
}

fn assert_stale_epoch(result: Result<(), StoreError>, presented: u64, current: u64, what: &str) {
    match result {
        Err(StoreError::Conflict(Conflict::StaleEpoch { presented: p, current: c })) => {
            assert_eq!((p, c), (presented, current), "{what}: StaleEpoch carries (presented, current)");
        }
        other => panic!("{what}: want Conflict(StaleEpoch {{ {presented}, {current} }}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// CredentialStore
// ---------------------------------------------------------------------------------------------------------

/// Runs every [`CredentialStore`] case against one adapter.
pub async fn credential_store_suite<S: CredentialStore + SwapRecords + 'static>(store: Arc<S>) {
    cred_read_missing_is_not_found(&*store).await;
    cred_write_then_read_returns_the_applied_snapshot(&*store).await;
    cred_retried_batch_changes_nothing(&*store).await;
    cred_stale_epoch_is_refused(&*store).await;
    cred_batch_size_limit(&*store).await;
    cred_delete_then_not_found(&*store).await;
    cred_list_tenants_tracks_writes_and_deletes(&*store).await;
    cred_replace_swaps_the_whole_snapshot(&*store).await;
    cred_tenants_with_prefix_ids_are_isolated(&*store).await;
    cred_swapped_ciphertexts_are_corrupt(&*store).await;
    cred_record_copied_to_another_tenant_is_corrupt(&*store).await;
    cred_newest_epoch_wins_under_concurrent_writers(store).await;
}

/// Nothing stored: `read` says `NotFound` (not `Corrupt`, not an empty snapshot) and `generation` says `None`.
pub async fn cred_read_missing_is_not_found(store: &dyn CredentialStore) {
    let t = fresh_tenant();
    match store.read(&t).await {
        Err(StoreError::NotFound) => {}
        other => panic!("read of a tenant with nothing stored: want NotFound, got {other:?}"),
    }
    match store.generation(&t).await {
        Ok(None) => {}
        other => panic!("generation of a tenant with nothing stored: want Ok(None), got {other:?}"),
    }
}

/// A written batch reads back exactly (all kinds, odd keys, empty and large values); a second batch that
/// updates, deletes, adds and changes one key twice reads back as applied; the generation follows.
pub async fn cred_write_then_read_returns_the_applied_snapshot(store: &dyn CredentialStore) {
    let t = fresh_tenant();
    let first = varied_changes();
    write_ok(store, &t, &batch(1, 1, first.clone()), "first batch").await;
    let want1 = applied(1, &CredentialSnapshot::default(), &first);
    let got1 = read_ok(store, &t, "after the first batch").await;
    assert_snapshot_eq(&got1, &want1, "snapshot after the first batch");
    assert!(got1.check_restorable().is_ok(), "the device record must survive the round trip intact");
    assert_eq!(store.generation(&t).await.expect("generation"), Some(1), "generation after the first batch");

    let second = vec![
        put(RecordKind::Session, "5511999990000.0", secret("session-a2")),
        del(RecordKind::PreKey, "17"),
        put(RecordKind::PreKey, "18", secret("pre-key-18")),
        put(RecordKind::SenderKeyDevice, "120363000000000000@g.us", secret("skd-1")),
        // The same key twice in one batch: the later change wins.
        put(RecordKind::TcToken, "5511988880000@s.whatsapp.net", secret("tc-old")),
        put(RecordKind::TcToken, "5511988880000@s.whatsapp.net", secret("tc-new")),
        put(RecordKind::BaseKey, "gone-again", secret("base")),
        del(RecordKind::BaseKey, "gone-again"),
        // Deleting a record that does not exist is not an error.
        del(RecordKind::MsgSecret, "never-written"),
    ];
    write_ok(store, &t, &batch(2, 1, second.clone()), "second batch").await;
    let want2 = applied(2, &want1, &second);
    let got2 = read_ok(store, &t, "after the second batch").await;
    assert_snapshot_eq(&got2, &want2, "snapshot after the second batch");
    assert_eq!(store.generation(&t).await.expect("generation"), Some(2), "generation rises with each batch");

    // Generations may skip (a host coalesces local batches before pushing).
    let third = vec![put(RecordKind::DeviceList, "5511999990000", secret("devices"))];
    write_ok(store, &t, &batch(7, 1, third.clone()), "third batch").await;
    assert_eq!(store.generation(&t).await.expect("generation"), Some(7), "generation jumps to the batch's");
    assert_snapshot_eq(&read_ok(store, &t, "after the third batch").await, &applied(7, &want2, &third), "third");
}

/// A batch whose generation is not above the stored one was already applied: acknowledged, nothing changes.
pub async fn cred_retried_batch_changes_nothing(store: &dyn CredentialStore) {
    let t = fresh_tenant();
    let one = vec![put(RecordKind::Session, "a.0", secret("s1"))];
    let two = vec![put(RecordKind::Session, "a.0", secret("s2")), put(RecordKind::PreKey, "1", secret("p"))];
    write_ok(store, &t, &batch(1, 1, one.clone()), "generation 1").await;
    write_ok(store, &t, &batch(2, 1, two.clone()), "generation 2").await;
    let before = read_ok(store, &t, "before the retries").await;

    let retry_same =
        batch(2, 1, vec![put(RecordKind::Session, "a.0", secret("retry-2")), del(RecordKind::PreKey, "1")]);
    let retry_older = batch(1, 1, vec![put(RecordKind::Identity, "x", secret("retry-1"))]);
    for (label, b) in [("equal generation", retry_same), ("lower generation", retry_older)] {
        match store.write(&t, &b).await {
            Ok(()) => {}
            Err(e) => panic!("a retried batch ({label}) must be acknowledged, got {e:?}"),
        }
        let after = read_ok(store, &t, label).await;
        assert_snapshot_eq(&after, &before, &format!("a retried batch ({label}) must change nothing"));
        assert_eq!(store.generation(&t).await.expect("generation"), Some(2), "{label}: generation unchanged");
    }
}

/// A write or replace from an epoch older than one already accepted is refused and changes nothing;
/// a newer epoch is accepted and becomes the fence.
pub async fn cred_stale_epoch_is_refused(store: &dyn CredentialStore) {
    let t = fresh_tenant();
    write_ok(store, &t, &batch(1, 3, vec![put(RecordKind::Session, "a.0", secret("e3"))]), "epoch 3").await;
    let before = read_ok(store, &t, "before the stale write").await;

    let stale =
        batch(2, 2, vec![put(RecordKind::Session, "a.0", secret("e2")), put(RecordKind::PreKey, "9", secret("x"))]);
    assert_stale_epoch(store.write(&t, &stale).await, 2, 3, "write from epoch 2 after epoch 3");
    assert_snapshot_eq(&read_ok(store, &t, "after the stale write").await, &before, "a refused write changes nothing");
    assert_eq!(store.generation(&t).await.expect("generation"), Some(1), "a refused write keeps the generation");

    let mut stale_snapshot = CredentialSnapshot { generation: 9, ..Default::default() };
    stale_snapshot.set_device(&restorable_device());
    assert_stale_epoch(store.replace(&t, &stale_snapshot, 2).await, 2, 3, "replace from epoch 2 after epoch 3");
    assert_snapshot_eq(
        &read_ok(store, &t, "after the stale replace").await,
        &before,
        "a refused replace changes nothing",
    );

    // The same epoch keeps writing; a higher one takes over and fences the old.
    let same = vec![put(RecordKind::PreKey, "1", secret("e3-again"))];
    write_ok(store, &t, &batch(2, 3, same.clone()), "the same epoch again").await;
    let newer = vec![put(RecordKind::Session, "a.0", secret("e4"))];
    write_ok(store, &t, &batch(3, 4, newer.clone()), "a higher epoch").await;
    let want = applied(3, &applied(2, &before, &same), &newer);
    assert_snapshot_eq(&read_ok(store, &t, "after the higher epoch").await, &want, "higher epoch accepted");
    let fenced = batch(4, 3, vec![put(RecordKind::Session, "a.0", secret("e3-late"))]);
    assert_stale_epoch(store.write(&t, &fenced).await, 3, 4, "epoch 3 after epoch 4 was accepted");
    assert_snapshot_eq(&read_ok(store, &t, "after the fenced write").await, &want, "fenced write changes nothing");
}

/// Exactly [`MAX_WRITES_PER_COMMIT`] changes commit (as one generation); one more is `Invalid` and stores nothing.
pub async fn cred_batch_size_limit(store: &dyn CredentialStore) {
    let t = fresh_tenant();
    let too_many: Vec<_> =
        (0..=MAX_WRITES_PER_COMMIT).map(|i| put(RecordKind::PreKey, &i.to_string(), vec![i as u8])).collect();
    match store.write(&t, &batch(1, 1, too_many)).await {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("a batch of {} changes: want Invalid, got {other:?}", MAX_WRITES_PER_COMMIT + 1),
    }
    assert_eq!(store.generation(&t).await.expect("generation"), None, "an invalid batch stores nothing");

    let full: Vec<_> =
        (0..MAX_WRITES_PER_COMMIT).map(|i| put(RecordKind::PreKey, &i.to_string(), vec![i as u8; 3])).collect();
    write_ok(store, &t, &batch(1, 1, full.clone()), "a batch of exactly the limit").await;
    let got = read_ok(store, &t, "after a full batch").await;
    assert_snapshot_eq(&got, &applied(1, &CredentialSnapshot::default(), &full), "a full batch reads back whole");
}

/// After `delete` the tenant reads as `NotFound` with no generation; deleting again, or deleting a tenant that
/// never had credentials, is not an error.
pub async fn cred_delete_then_not_found(store: &dyn CredentialStore) {
    let t = fresh_tenant();
    write_ok(store, &t, &batch(1, 1, varied_changes()), "before delete").await;
    store.delete(&t).await.expect("delete of a stored tenant");
    match store.read(&t).await {
        Err(StoreError::NotFound) => {}
        other => panic!("read after delete: want NotFound, got {other:?}"),
    }
    assert_eq!(store.generation(&t).await.expect("generation"), None, "generation after delete");
    store.delete(&t).await.expect("deleting an already deleted tenant is not an error");
    store.delete(&fresh_tenant()).await.expect("deleting a tenant that never had credentials is not an error");

    // A tenant can be written again after a delete (re-linked), starting from nothing.
    let again = vec![put(RecordKind::Session, "b.0", secret("relinked"))];
    write_ok(store, &t, &batch(1, 1, again.clone()), "write after delete").await;
    let got = read_ok(store, &t, "after re-link").await;
    assert_snapshot_eq(&got, &applied(1, &CredentialSnapshot::default(), &again), "nothing of the old snapshot");
}

/// `list_tenants` names every tenant with credentials and none that were deleted.
pub async fn cred_list_tenants_tracks_writes_and_deletes(store: &dyn CredentialStore) {
    let (a, b, c) = (fresh_tenant(), fresh_tenant(), fresh_tenant());
    for t in [&a, &b, &c] {
        write_ok(store, t, &batch(1, 1, vec![put(RecordKind::Session, "x.0", secret("l"))]), "listing setup").await;
    }
    store.delete(&b).await.expect("delete");
    let listed = store.list_tenants().await.expect("list_tenants");
    let count = |t: &TenantId| listed.iter().filter(|x| *x == t).count();
    assert_eq!(count(&a), 1, "a written tenant is listed exactly once");
    assert_eq!(count(&c), 1, "a written tenant is listed exactly once");
    assert_eq!(count(&b), 0, "a deleted tenant is not listed");
    let never = fresh_tenant();
    assert_eq!(count(&never), 0, "a tenant never written is not listed");
}

/// `replace` leaves exactly the new snapshot: records absent from it are gone, the generation is the
/// snapshot's; it also creates a tenant that had nothing stored.
pub async fn cred_replace_swaps_the_whole_snapshot(store: &dyn CredentialStore) {
    let t = fresh_tenant();
    write_ok(store, &t, &batch(4, 1, varied_changes()), "before replace").await;

    let mut device = restorable_device();
    device.registration_id = 777;
    let mut snapshot = CredentialSnapshot { generation: 10, ..Default::default() };
    snapshot.set_device(&device);
    snapshot.records.insert(RecordKey::new(RecordKind::Session, "new.0"), secret("replaced-session"));
    snapshot.records.insert(RecordKey::new(RecordKind::AppStateVersion, "regular"), secret("replaced-version"));
    store.replace(&t, &snapshot, 2).await.expect("replace with a newer epoch");
    assert_snapshot_eq(
        &read_ok(store, &t, "after replace").await,
        &snapshot,
        "replace leaves exactly the new snapshot",
    );
    assert_eq!(store.generation(&t).await.expect("generation"), Some(10), "generation after replace");
    assert_stale_epoch(
        store.write(&t, &batch(11, 1, vec![put(RecordKind::Session, "x", secret("x"))])).await,
        1,
        2,
        "replace raises the fence like a write",
    );

    let fresh = fresh_tenant();
    store.replace(&fresh, &snapshot, 1).await.expect("replace onto a tenant with nothing stored");
    assert_snapshot_eq(&read_ok(store, &fresh, "replace onto nothing").await, &snapshot, "replace creates");
}

/// Tenants whose ids are prefixes of one another (`t`, `t_2`, `t-x`) never see each other's records, and
/// deleting one leaves the others whole.
pub async fn cred_tenants_with_prefix_ids_are_isolated(store: &dyn CredentialStore) {
    let base = fresh_tenant();
    let ids: Vec<TenantId> = ["", "_2", "-x", "0"]
        .iter()
        .map(|suffix| TenantId::parse(&format!("{base}{suffix}")).expect("valid"))
        .collect();
    let mut wants = Vec::new();
    for t in &ids {
        let changes = vec![
            put(RecordKind::Session, "shared.0", secret(t.as_str())),
            put(RecordKind::Other, t.as_str(), secret("own")),
        ];
        write_ok(store, t, &batch(1, 1, changes.clone()), "isolation setup").await;
        wants.push(applied(1, &CredentialSnapshot::default(), &changes));
    }
    for (t, want) in ids.iter().zip(&wants) {
        assert_snapshot_eq(&read_ok(store, t, "isolation").await, want, &format!("{t} sees only its own records"));
    }
    store.delete(&ids[0]).await.expect("delete");
    for (t, want) in ids.iter().zip(&wants).skip(1) {
        assert_snapshot_eq(&read_ok(store, t, "after deleting a prefix").await, want, &format!("{t} untouched"));
    }
}

/// Ciphertexts swapped between two keys of one tenant do not decrypt: the read is `Corrupt`, and the
/// message never carries a record value.
pub async fn cred_swapped_ciphertexts_are_corrupt<S: CredentialStore + SwapRecords>(store: &S) {
    let t = fresh_tenant();
    let (sa, sb) = (secret("swap-a"), secret("swap-b"));
    let a = RecordKey::new(RecordKind::Session, "1111.0");
    let b = RecordKey::new(RecordKind::Session, "2222.0");
    let changes = vec![
        RecordChange { key: RecordKey::device(), value: Some(restorable_device().to_bytes()) },
        RecordChange { key: a.clone(), value: Some(sa.clone()) },
        RecordChange { key: b.clone(), value: Some(sb.clone()) },
    ];
    write_ok(store, &t, &batch(1, 1, changes), "swap setup").await;
    read_ok(store, &t, "before the swap").await;
    store.swap_stored_values(&t, &a, &b).await;
    assert_corrupt_without_leak(store.read(&t).await, &[&sa, &sb], "records swapped between two keys");

    // Across kinds too: the kind is part of the associated data.
    let u = fresh_tenant();
    let (si, ss) = (secret("kind-identity"), secret("kind-session"));
    let ki = RecordKey::new(RecordKind::Identity, "3333.0");
    let ks = RecordKey::new(RecordKind::Session, "3333.0");
    let changes = vec![
        RecordChange { key: ki.clone(), value: Some(si.clone()) },
        RecordChange { key: ks.clone(), value: Some(ss.clone()) },
    ];
    write_ok(store, &u, &batch(1, 1, changes), "kind swap setup").await;
    store.swap_stored_values(&u, &ki, &ks).await;
    assert_corrupt_without_leak(store.read(&u).await, &[&si, &ss], "records swapped between two kinds");
}

/// A sealed record copied into another tenant does not decrypt there; the source tenant still reads fine.
pub async fn cred_record_copied_to_another_tenant_is_corrupt<S: CredentialStore + SwapRecords>(store: &S) {
    let (from, to) = (fresh_tenant(), fresh_tenant());
    let key = RecordKey::new(RecordKind::Session, "4444.0");
    let value = secret("copied");
    write_ok(store, &from, &batch(1, 1, vec![RecordChange { key: key.clone(), value: Some(value.clone()) }]), "source")
        .await;
    let to_changes = vec![RecordChange { key: RecordKey::device(), value: Some(restorable_device().to_bytes()) }];
    write_ok(store, &to, &batch(1, 1, to_changes), "target").await;
    store.copy_stored_value(&from, &to, &key).await;
    assert_corrupt_without_leak(store.read(&to).await, &[&value], "a record copied from another tenant");
    let source = read_ok(store, &from, "the source after the copy").await;
    assert_eq!(source.records.get(&key), Some(&value), "the source tenant's record is untouched");
}

/// Two hosts write one tenant at once with epochs 5 and 6. Every epoch-6 batch applies; epoch-5 batches
/// succeed only until the first epoch-6 batch lands and are refused with `StaleEpoch` from then on; the
/// stored snapshot holds exactly what was acknowledged; afterwards epoch 5 stays fenced and 6 still writes.
pub async fn cred_newest_epoch_wins_under_concurrent_writers(store: Arc<dyn CredentialStore>) {
    const ROUNDS: u64 = 20;
    let t = fresh_tenant();
    let start = Arc::new(Barrier::new(2));
    let writer = |epoch: u64, first_generation: u64, label: &'static str| {
        let (store, t, start) = (Arc::clone(&store), t.clone(), Arc::clone(&start));
        tokio::spawn(async move {
            start.wait().await;
            let mut results = Vec::new();
            for i in 0..ROUNDS {
                let change = put(RecordKind::Other, &format!("{label}-{i}"), format!("{label}-{i}").into_bytes());
                results.push(store.write(&t, &batch(first_generation + i, epoch, vec![change])).await);
            }
            results
        })
    };
    let old = writer(5, 1, "old");
    let new = writer(6, 1000, "new");
    let (old, new) = (old.await.expect("old writer task"), new.await.expect("new writer task"));

    for (i, r) in new.iter().enumerate() {
        assert!(r.is_ok(), "the newest epoch's write {i} must apply, got {r:?}");
    }
    let accepted = old.iter().position(Result::is_err).unwrap_or(old.len());
    for (i, r) in old.iter().enumerate().skip(accepted) {
        match r {
            Err(StoreError::Conflict(Conflict::StaleEpoch { presented: 5, current: 6 })) => {}
            other => panic!("old epoch's write {i} came after a refusal: want StaleEpoch(5, 6), got {other:?}"),
        }
    }
    let snap = read_ok(&*store, &t, "after the race").await;
    assert_eq!(snap.generation, 1000 + ROUNDS - 1, "the last batch of the newest epoch sets the generation");
    for i in 0..ROUNDS {
        let new_key = RecordKey::new(RecordKind::Other, format!("new-{i}"));
        assert!(snap.records.contains_key(&new_key), "newest epoch's record {i} is stored");
        let old_key = RecordKey::new(RecordKind::Other, format!("old-{i}"));
        assert_eq!(
            snap.records.contains_key(&old_key),
            (i as usize) < accepted,
            "old epoch's record {i} is stored exactly when its write was acknowledged ({accepted} were)"
        );
    }
    let late = batch(5000, 5, vec![put(RecordKind::Other, "late", b"late".to_vec())]);
    assert_stale_epoch(store.write(&t, &late).await, 5, 6, "the old epoch after the race");
    write_ok(&*store, &t, &batch(5001, 6, vec![put(RecordKind::Other, "after", b"x".to_vec())]), "newest").await;
}

// ---------------------------------------------------------------------------------------------------------
// TenantStore
// ---------------------------------------------------------------------------------------------------------

const TTL: u64 = 30_000;

/// Runs every [`TenantStore`] case against one adapter.
pub async fn tenant_store_suite(store: Arc<dyn TenantStore>) {
    tenant_get_missing_is_none(&*store).await;
    tenant_set_desired_creates_and_keeps_the_rest(&*store).await;
    tenant_list_desired_pages_past_one_page(&*store).await;
    tenant_list_desired_refuses_a_malformed_token(&*store).await;
    tenant_write_status_only_when_changed(&*store).await;
    tenant_terminal_status_clears_the_desired_flag(&*store).await;
    tenant_failure_counter(&*store).await;
    tenant_lease_lifecycle(&*store).await;
    tenant_lease_release_frees_at_once(&*store).await;
    tenant_concurrent_acquisition_has_one_winner(store).await;
}

/// A tenant never written has no record.
pub async fn tenant_get_missing_is_none(store: &dyn TenantStore) {
    let t = fresh_tenant();
    match store.get(&t).await {
        Ok(None) => {}
        other => panic!("get of an unknown tenant: want Ok(None), got {other:?}"),
    }
}

async fn get_some(store: &dyn TenantStore, t: &TenantId, what: &str) -> crate::domain::TenantRecord {
    match store.get(t).await {
        Ok(Some(r)) => {
            assert_eq!(&r.tenant_id, t, "{what}: the record names its tenant");
            r
        }
        other => panic!("{what}: want the record of {t}, got {other:?}"),
    }
}

/// `set_desired` creates a blank record; flipping it later keeps status, counters and lease.
pub async fn tenant_set_desired_creates_and_keeps_the_rest(store: &dyn TenantStore) {
    let t = fresh_tenant();
    store.set_desired(&t, true).await.expect("set_desired on a new tenant");
    let r = get_some(store, &t, "after set_desired").await;
    assert!(r.whatsapp_connected, "set_desired(true) sets the flag");
    assert_eq!(r.status, None, "a new record has no status");
    assert_eq!(r.consecutive_failures, 0, "a new record has no failures");
    assert_eq!(r.lease, None, "a new record has no lease");

    let now = now_millis();
    let up = StatusUpdate { status: TenantStatus::Connected, reason: None, whatsapp_connected: true };
    store.write_status(&t, &up, now).await.expect("write_status");
    store.record_failure(&t).await.expect("record_failure");
    let lease = store.acquire_lease(&t, "host-a", TTL, now).await.expect("acquire");
    store.set_desired(&t, false).await.expect("set_desired(false)");
    let r = get_some(store, &t, "after set_desired(false)").await;
    assert!(!r.whatsapp_connected, "set_desired(false) clears the flag");
    assert_eq!(r.status, Some(TenantStatus::Connected), "set_desired keeps the status");
    assert_eq!(r.last_healthy_at, Some(now), "set_desired keeps last_healthy_at");
    assert_eq!(r.consecutive_failures, 1, "set_desired keeps the failure count");
    assert_eq!(r.lease, Some(lease), "set_desired keeps the lease");
}

/// Paging with a small limit visits every desired tenant exactly once across pages and never a tenant whose
/// flag is off (never set, switched off, or cleared by a terminal status).
pub async fn tenant_list_desired_pages_past_one_page(store: &dyn TenantStore) {
    const LIMIT: usize = 10;
    let desired: Vec<TenantId> = (0..25).map(|_| fresh_tenant()).collect();
    let undesired: Vec<TenantId> = (0..6).map(|_| fresh_tenant()).collect();
    for t in &desired {
        store.set_desired(t, true).await.expect("set_desired");
    }
    for (i, t) in undesired.iter().enumerate() {
        match i % 3 {
            0 => store.set_desired(t, false).await.expect("set_desired(false)"),
            1 => {
                store.set_desired(t, true).await.expect("set_desired");
                store.set_desired(t, false).await.expect("set_desired(false)");
            }
            _ => {
                store.set_desired(t, true).await.expect("set_desired");
                let up = StatusUpdate::terminal(TenantStatus::Banned, "402");
                store.write_status(t, &up, now_millis()).await.expect("write_status");
            }
        }
    }

    let mut seen: HashMap<TenantId, usize> = HashMap::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages < 100_000, "list_desired never ends (page token keeps coming back)");
        let page = store.list_desired(token.clone(), LIMIT).await.expect("list_desired");
        assert!(page.items.len() <= LIMIT, "a page holds at most the limit ({} items)", page.items.len());
        for r in page.items {
            assert!(r.whatsapp_connected, "list_desired returned {} whose flag is off", r.tenant_id);
            *seen.entry(r.tenant_id).or_default() += 1;
        }
        if page.next.is_none() {
            break;
        }
        assert_ne!(page.next, token, "the page token must move forward");
        token = page.next;
    }
    assert!(pages >= 3, "25 desired tenants with limit {LIMIT} need at least 3 pages, got {pages}");
    for t in &desired {
        assert_eq!(seen.get(t).copied().unwrap_or(0), 1, "desired tenant {t} is listed exactly once");
    }
    for t in &undesired {
        assert!(!seen.contains_key(t), "tenant {t} with the flag off is not listed");
    }
}

/// A page token that is not one the store handed out is `Invalid`, not a crash and not a silent restart.
pub async fn tenant_list_desired_refuses_a_malformed_token(store: &dyn TenantStore) {
    let long = "x".repeat(65);
    for token in ["", "..", "a/b", "%2e%2e", "a\0b", "\u{0430}bc", long.as_str()] {
        match store.list_desired(Some(token.to_owned()), 10).await {
            Err(StoreError::Invalid(_)) => {}
            other => panic!("list_desired with page token {token:?}: want Invalid, got {other:?}"),
        }
    }
}

/// `write_status` writes only a change (returns true) and skips an identical status (returns false, and
/// `status_changed_at` / `last_healthy_at` stay as they were). `Connected` stamps `last_healthy_at`.
pub async fn tenant_write_status_only_when_changed(store: &dyn TenantStore) {
    let t = fresh_tenant();
    store.set_desired(&t, true).await.expect("set_desired");
    let base = now_millis();
    let connecting = StatusUpdate { status: TenantStatus::Connecting, reason: None, whatsapp_connected: true };
    assert!(store.write_status(&t, &connecting, base).await.expect("write"), "a new status is written");
    let r = get_some(store, &t, "after connecting").await;
    assert_eq!(r.status, Some(TenantStatus::Connecting), "status written");
    assert_eq!(r.status_changed_at, Some(base), "status_changed_at stamped on change");
    assert_eq!(r.last_healthy_at, None, "connecting is not healthy");

    assert!(!store.write_status(&t, &connecting, base + 1_000).await.expect("write"), "same status: no write");
    let r = get_some(store, &t, "after the repeated status").await;
    assert_eq!(r.status_changed_at, Some(base), "an unchanged status writes nothing (status_changed_at kept)");

    let connected = StatusUpdate { status: TenantStatus::Connected, reason: None, whatsapp_connected: true };
    assert!(store.write_status(&t, &connected, base + 2_000).await.expect("write"), "connected is a change");
    let r = get_some(store, &t, "after connected").await;
    assert_eq!(r.status, Some(TenantStatus::Connected), "status written");
    assert_eq!(r.status_changed_at, Some(base + 2_000), "status_changed_at follows the change");
    assert_eq!(r.last_healthy_at, Some(base + 2_000), "connected stamps last_healthy_at");

    assert!(!store.write_status(&t, &connected, base + 3_000).await.expect("write"), "still connected: no write");
    let r = get_some(store, &t, "after the repeated connected").await;
    assert_eq!(r.status_changed_at, Some(base + 2_000), "no write: status_changed_at kept");
    assert_eq!(r.last_healthy_at, Some(base + 2_000), "no write: last_healthy_at kept");

    let with_reason =
        StatusUpdate { status: TenantStatus::Disconnected, reason: Some("stopped".into()), whatsapp_connected: true };
    assert!(store.write_status(&t, &with_reason, base + 4_000).await.expect("write"), "a new status is written");
    assert_eq!(get_some(store, &t, "reason").await.reason.as_deref(), Some("stopped"), "the reason is stored");
}

/// A terminal status is stored with its reason and clears the desired flag; repeating it writes nothing.
pub async fn tenant_terminal_status_clears_the_desired_flag(store: &dyn TenantStore) {
    let t = fresh_tenant();
    store.set_desired(&t, true).await.expect("set_desired");
    let now = now_millis();
    let up = StatusUpdate::terminal(TenantStatus::LoggedOut, "401 from server");
    assert!(store.write_status(&t, &up, now).await.expect("write"), "a terminal status is written");
    let r = get_some(store, &t, "after the terminal status").await;
    assert_eq!(r.status, Some(TenantStatus::LoggedOut), "terminal status stored");
    assert_eq!(r.reason.as_deref(), Some("401 from server"), "terminal reason stored");
    assert!(!r.whatsapp_connected, "a terminal status clears whatsapp_connected");
    assert_eq!(r.status_changed_at, Some(now), "status_changed_at stamped");
    assert!(!store.write_status(&t, &up, now + 5).await.expect("write"), "the same terminal status again: no write");
}

/// `record_failure` counts up and returns the count; `reset_failures` writes only when there is something
/// to reset, stamping `last_healthy_at`.
pub async fn tenant_failure_counter(store: &dyn TenantStore) {
    let t = fresh_tenant();
    store.set_desired(&t, true).await.expect("set_desired");
    let now = now_millis();
    assert!(!store.reset_failures(&t, now).await.expect("reset"), "reset with no failures writes nothing");
    assert_eq!(get_some(store, &t, "after a no-op reset").await.last_healthy_at, None, "no-op reset stamps nothing");
    for want in 1..=3u32 {
        assert_eq!(store.record_failure(&t).await.expect("record_failure"), want, "record_failure returns the count");
    }
    assert_eq!(get_some(store, &t, "after 3 failures").await.consecutive_failures, 3, "the count is stored");
    assert!(store.reset_failures(&t, now + 10).await.expect("reset"), "reset after failures writes");
    let r = get_some(store, &t, "after reset").await;
    assert_eq!(r.consecutive_failures, 0, "reset zeroes the count");
    assert_eq!(r.last_healthy_at, Some(now + 10), "reset stamps last_healthy_at");
    assert!(!store.reset_failures(&t, now + 20).await.expect("reset"), "a second reset writes nothing");
    assert_eq!(get_some(store, &t, "second reset").await.last_healthy_at, Some(now + 10), "nothing stamped");
    assert_eq!(store.record_failure(&t).await.expect("record_failure"), 1, "counting restarts from 0");
}

fn expect_lease_held(result: Result<Lease, StoreError>, holder: &Lease, what: &str) {
    match result {
        Err(StoreError::Conflict(Conflict::LeaseHeld { holder: h })) => {
            assert_eq!(&h, holder, "{what}: LeaseHeld names the current holder");
        }
        other => panic!("{what}: want Conflict(LeaseHeld), got {other:?}"),
    }
}

fn expect_lease_lost(result: Result<Lease, StoreError>, what: &str) {
    match result {
        Err(StoreError::Conflict(Conflict::LeaseLost)) => {}
        other => panic!("{what}: want Conflict(LeaseLost), got {other:?}"),
    }
}

/// Acquire, contend, re-acquire, expire, take over, renew, and renew a lost lease, with injected time.
pub async fn tenant_lease_lifecycle(store: &dyn TenantStore) {
    let t = fresh_tenant();
    store.set_desired(&t, true).await.expect("set_desired");
    let now = now_millis();

    let a1 = store.acquire_lease(&t, "host-a", TTL, now).await.expect("acquire a free lease");
    assert_eq!(a1, Lease { owner: "host-a".into(), epoch: 1, expires_at: now + TTL as UnixMillis }, "first lease");
    assert_eq!(get_some(store, &t, "after acquire").await.lease, Some(a1.clone()), "the lease is stored");

    expect_lease_held(store.acquire_lease(&t, "host-b", TTL, now + 1).await, &a1, "another owner while live");
    expect_lease_held(
        store.acquire_lease(&t, "host-b", TTL, a1.expires_at - 1).await,
        &a1,
        "another owner one millisecond before expiry",
    );

    let a2 = store.acquire_lease(&t, "host-a", TTL, now + 2).await.expect("re-acquire by the same owner");
    assert!(a2.epoch > a1.epoch, "re-acquiring raises the epoch ({} -> {})", a1.epoch, a2.epoch);
    assert_eq!(a2.expires_at, now + 2 + TTL as UnixMillis, "re-acquiring extends");

    let renewed = store.renew_lease(&t, &a2, TTL, now + 1_000).await.expect("renew a live lease");
    assert_eq!(renewed.epoch, a2.epoch, "renew keeps the epoch");
    assert_eq!(renewed.owner, a2.owner, "renew keeps the owner");
    assert_eq!(renewed.expires_at, now + 1_000 + TTL as UnixMillis, "renew extends the expiry");
    expect_lease_held(store.acquire_lease(&t, "host-b", TTL, a2.expires_at + 1).await, &renewed, "renewal holds");
    expect_lease_lost(store.renew_lease(&t, &a1, TTL, now + 1_001).await, "renewing a superseded epoch");

    let after_expiry = renewed.expires_at;
    let b = store.acquire_lease(&t, "host-b", TTL, after_expiry).await.expect("take over an expired lease");
    assert_eq!(b.owner, "host-b", "the new owner holds it");
    assert!(b.epoch > renewed.epoch, "taking over raises the epoch ({} -> {})", renewed.epoch, b.epoch);
    expect_lease_lost(store.renew_lease(&t, &renewed, TTL, after_expiry + 1).await, "renew after take-over");
    expect_lease_held(store.acquire_lease(&t, "host-a", TTL, after_expiry + 2).await, &b, "the old owner is out");
    assert_eq!(get_some(store, &t, "after take-over").await.lease, Some(b), "the stored lease is the new owner's");
}

/// A released lease is free at once for another owner (higher epoch); releasing a lost lease is harmless
/// and does not free the current holder's.
pub async fn tenant_lease_release_frees_at_once(store: &dyn TenantStore) {
    let t = fresh_tenant();
    let now = now_millis();
    let a = store.acquire_lease(&t, "host-a", TTL, now).await.expect("acquire on a tenant with no record");
    store.release_lease(&t, &a).await.expect("release");
    expect_lease_lost(store.renew_lease(&t, &a, TTL, now + 1).await, "renewing a released lease");
    let b = store.acquire_lease(&t, "host-b", TTL, now + 1).await.expect("acquire right after release");
    assert!(b.epoch > a.epoch, "acquiring after release raises the epoch ({} -> {})", a.epoch, b.epoch);
    store.release_lease(&t, &a).await.expect("releasing a lost lease is not an error");
    expect_lease_held(store.acquire_lease(&t, "host-c", TTL, now + 2).await, &b, "a stale release frees nothing");
    store.release_lease(&fresh_tenant(), &b).await.expect("releasing on an unknown tenant is not an error");
}

/// Two owners acquire the same free lease at the same moment, many times over (on tenants with and without a
/// record): exactly one wins each time and the loser is told who holds it.
pub async fn tenant_concurrent_acquisition_has_one_winner(store: Arc<dyn TenantStore>) {
    const ROUNDS: usize = 24;
    let now = now_millis();
    for round in 0..ROUNDS {
        let t = fresh_tenant();
        if round % 2 == 0 {
            store.set_desired(&t, true).await.expect("set_desired");
        }
        let start = Arc::new(Barrier::new(2));
        let contender = |owner: &'static str| {
            let (store, t, start) = (Arc::clone(&store), t.clone(), Arc::clone(&start));
            tokio::spawn(async move {
                start.wait().await;
                store.acquire_lease(&t, owner, TTL, now).await
            })
        };
        let (a, b) = (contender("host-a"), contender("host-b"));
        let (a, b) = (a.await.expect("task a"), b.await.expect("task b"));
        let (winner, loser) = match (&a, &b) {
            (Ok(w), Err(_)) => (w, &b),
            (Err(_), Ok(w)) => (w, &a),
            _ => panic!("round {round}: exactly one owner must win, got {a:?} and {b:?}"),
        };
        assert_eq!(winner.epoch, 1, "round {round}: a free lease starts at epoch 1");
        match loser {
            Err(StoreError::Conflict(Conflict::LeaseHeld { holder })) => {
                assert_eq!(holder, winner, "round {round}: the loser is told the winner's lease");
            }
            other => panic!("round {round}: the loser wants Conflict(LeaseHeld), got {other:?}"),
        }
        let stored = get_some(&*store, &t, "after the race").await.lease;
        assert_eq!(stored.as_ref(), Some(winner), "round {round}: the stored lease is the winner's");
    }
}
