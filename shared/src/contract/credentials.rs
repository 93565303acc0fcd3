//! The [`CredentialStore`] contract: every case, and the suite that runs them all.

use super::*;

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
    cred_claim_fences_the_old_owner_before_any_write(&*store).await;
    cred_claim_of_a_tenant_with_nothing_stored(&*store).await;
    cred_delete_is_fenced_and_not_undone(&*store).await;
    cred_oversized_record_is_refused_whole(&*store).await;
    cred_a_tenant_of_several_megabytes_round_trips(&*store).await;
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

/// Writer A commits epoch 1 generations 1-5; B claims epoch 2 (no write) and reads. From the claim on, A's
/// batches are refused and change nothing, while B's generation 6 applies: a new owner's batch is never taken
/// for a retry of the old owner's.
pub async fn cred_claim_fences_the_old_owner_before_any_write(store: &dyn CredentialStore) {
    let t = fresh_tenant();
    for g in 1..=5 {
        write_ok(store, &t, &batch(g, 1, vec![put(RecordKind::Session, &format!("a{g}.0"), secret("a"))]), "A").await;
    }
    let stood = store.claim(&t, 2).await.expect("B claims epoch 2");
    assert_eq!(stood, Some(StoredAt { epoch: 1, generation: 5 }), "the claim says where the store stands");
    let hydrated = read_ok(store, &t, "B hydrates after its claim").await;
    assert_eq!(hydrated.generation, 5, "a claim writes no records and keeps the generation");

    let late = batch(6, 1, vec![put(RecordKind::Session, "a6.0", secret("a-late"))]);
    assert_stale_epoch(store.write(&t, &late).await, 1, 2, "A's generation 6 after B's claim");
    assert_snapshot_eq(&read_ok(store, &t, "after A's late batch").await, &hydrated, "a fenced batch changes nothing");

    let b6 = vec![put(RecordKind::Session, "b6.0", secret("b"))];
    write_ok(store, &t, &batch(6, 2, b6.clone()), "B's generation 6").await;
    let want = applied(6, &hydrated, &b6);
    assert_snapshot_eq(&read_ok(store, &t, "after B's batch").await, &want, "the new owner's batch applies");
    // A new owner that numbers from an older copy still comes after everything of older epochs.
    let b_low = vec![put(RecordKind::Session, "b-low.0", secret("b-low"))];
    store.claim(&t, 3).await.expect("a third owner claims epoch 3");
    write_ok(store, &t, &batch(2, 3, b_low.clone()), "epoch 3 at a lower generation").await;
    let want = applied(2, &want, &b_low);
    assert_snapshot_eq(&read_ok(store, &t, "after epoch 3").await, &want, "a newer epoch applies at any generation");

    assert_stale_epoch(store.write(&t, &batch(7, 2, Vec::new())).await, 2, 3, "epoch 2 after the claim of 3");
    assert_stale_epoch(store.claim(&t, 2).await.map(|_| ()), 2, 3, "claiming an older epoch");
    let again = store.claim(&t, 3).await.expect("claiming the current epoch again is not an error");
    assert_eq!(again, Some(StoredAt { epoch: 3, generation: 2 }), "the stored writer is epoch 3's");
    assert_snapshot_eq(&read_ok(store, &t, "at the end").await, &want, "claims and refusals change no record");
}

/// A claim of a tenant with nothing stored stores nothing visible (no snapshot, no generation, not listed),
/// yet fences older epochs from creating one.
pub async fn cred_claim_of_a_tenant_with_nothing_stored(store: &dyn CredentialStore) {
    let t = fresh_tenant();
    assert_eq!(store.claim(&t, 4).await.expect("claim of a tenant with nothing stored"), None, "nothing stood");
    match store.read(&t).await {
        Err(StoreError::NotFound) => {}
        other => panic!("read after a bare claim: want NotFound, got {other:?}"),
    }
    assert_eq!(store.generation(&t).await.expect("generation"), None, "a bare claim stores no generation");
    assert!(!store.list_tenants().await.expect("list").contains(&t), "a bare claim is not a stored tenant");
    let old = batch(1, 3, vec![put(RecordKind::Session, "x.0", secret("old"))]);
    assert_stale_epoch(store.write(&t, &old).await, 3, 4, "an older epoch after a bare claim");
    assert!(matches!(store.read(&t).await, Err(StoreError::NotFound)), "the refused batch created nothing");
    let first = vec![put(RecordKind::Session, "y.0", secret("new"))];
    write_ok(store, &t, &batch(1, 4, first.clone()), "the claimer's first batch").await;
    let got = read_ok(store, &t, "after the first batch").await;
    assert_snapshot_eq(&got, &applied(1, &CredentialSnapshot::default(), &first), "the claimer's batch applies");
}

/// A delete of an older epoch is refused and changes nothing; the holder's delete removes everything, and no
/// late batch or replace of an older epoch brings the tenant back.
pub async fn cred_delete_is_fenced_and_not_undone(store: &dyn CredentialStore) {
    let t = fresh_tenant();
    write_ok(store, &t, &batch(1, 1, vec![put(RecordKind::Session, "a.0", secret("one"))]), "epoch 1").await;
    store.claim(&t, 2).await.expect("claim of epoch 2");
    let before = read_ok(store, &t, "before the deletes").await;
    assert_stale_epoch(store.delete(&t, 1).await, 1, 2, "a delete of epoch 1 after the claim of 2");
    assert_snapshot_eq(
        &read_ok(store, &t, "after the refused delete").await,
        &before,
        "a refused delete changes nothing",
    );

    store.delete(&t, 2).await.expect("the holder's delete");
    assert_stale_epoch(store.write(&t, &batch(2, 1, Vec::new())).await, 1, 2, "a late batch after the delete");
    let mut late_snapshot = CredentialSnapshot { generation: 9, ..Default::default() };
    late_snapshot.set_device(&restorable_device());
    assert_stale_epoch(store.replace(&t, &late_snapshot, 1).await, 1, 2, "a late replace after the delete");
    assert!(matches!(store.read(&t).await, Err(StoreError::NotFound)), "nothing brought the tenant back");
    assert!(!store.list_tenants().await.expect("list").contains(&t), "a deleted tenant stays unlisted");
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
    store.delete(&t, 1).await.expect("delete of a stored tenant");
    match store.read(&t).await {
        Err(StoreError::NotFound) => {}
        other => panic!("read after delete: want NotFound, got {other:?}"),
    }
    assert_eq!(store.generation(&t).await.expect("generation"), None, "generation after delete");
    store.delete(&t, 1).await.expect("deleting an already deleted tenant is not an error");
    store.delete(&fresh_tenant(), 1).await.expect("deleting a tenant that never had credentials is not an error");

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
    store.delete(&b, 1).await.expect("delete");
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
    store.delete(&ids[0], 1).await.expect("delete");
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
    pub(super) const ROUNDS: u64 = 20;
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

/// A record longer than [`MAX_RECORD_VALUE_LEN`] is refused with a clear error, and nothing of its batch is
/// stored; one of exactly that length is stored.
pub async fn cred_oversized_record_is_refused_whole(store: &dyn CredentialStore) {
    let t = fresh_tenant();
    let big = vec![7u8; 2 * 1024 * 1024];
    let b = batch(1, 1, vec![put(RecordKind::Session, "small.0", secret("small")), put(RecordKind::Other, "big", big)]);
    match store.write(&t, &b).await {
        Err(e @ StoreError::Invalid(_)) => assert!(e.to_string().contains("may hold"), "the limit is named: {e}"),
        other => panic!("a 2 MiB record: want Invalid, got {other:?}"),
    }
    assert_eq!(store.generation(&t).await.expect("generation"), None, "nothing of the refused batch is stored");
    let edge = vec![put(RecordKind::Other, "edge", vec![1u8; MAX_RECORD_VALUE_LEN])];
    write_ok(store, &t, &batch(1, 1, edge.clone()), "a record of the largest length").await;
    assert_snapshot_eq(
        &read_ok(store, &t, "after the edge").await,
        &applied(1, &CredentialSnapshot::default(), &edge),
        "edge",
    );
}

/// A tenant whose records add up to several megabytes (more than one answer of the Firestore client holds by
/// default) reads back whole.
pub async fn cred_a_tenant_of_several_megabytes_round_trips(store: &dyn CredentialStore) {
    pub(super) const RECORDS: usize = 48;
    pub(super) const RECORD_LEN: usize = 128 * 1024;
    let t = fresh_tenant();
    let mut want = CredentialSnapshot::default();
    for (g, chunk) in (0..RECORDS).collect::<Vec<_>>().chunks(6).enumerate() {
        let changes: Vec<RecordChange> = chunk
            .iter()
            .map(|i| put(RecordKind::AppStateMutationMac, &format!("mac-{i}"), vec![(i % 251) as u8; RECORD_LEN]))
            .collect();
        let generation = g as u64 + 1;
        write_ok(store, &t, &batch(generation, 1, changes.clone()), "a large tenant's batch").await;
        want = applied(generation, &want, &changes);
    }
    const { assert!(RECORDS * RECORD_LEN >= 6 * 1024 * 1024) };
    assert_snapshot_eq(&read_ok(store, &t, "a 6 MiB tenant").await, &want, "a 6 MiB tenant reads back whole");
}
