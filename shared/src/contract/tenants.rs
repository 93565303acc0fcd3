//! The [`TenantStore`] contract: every case, and the suite that runs them all.

use super::*;

pub(super) const TTL: u64 = 30_000;

/// Runs every [`TenantStore`] case against one adapter.
pub async fn tenant_store_suite(store: Arc<dyn TenantStore>) {
    tenant_get_missing_is_none(&*store).await;
    tenant_set_desired_creates_and_keeps_the_rest(&*store).await;
    tenant_list_desired_pages_past_one_page(&*store).await;
    tenant_list_desired_refuses_a_malformed_token(&*store).await;
    tenant_write_status_only_when_changed(&*store).await;
    tenant_terminal_status_clears_the_desired_flag(&*store).await;
    tenant_failure_counter(&*store).await;
    tenant_only_the_lease_holder_marks(&*store).await;
    tenant_lease_lifecycle(&*store).await;
    tenant_lease_release_frees_at_once(&*store).await;
    tenant_concurrent_acquisition_has_one_winner(store).await;
}

/// A status write as a holder lands only while the stored lease is that holding (same owner and epoch, a
/// renewal in between or not): the host that lost the lease to another writes nothing and is told so.
pub async fn tenant_only_the_lease_holder_marks(store: &dyn TenantStore) {
    let t = fresh_tenant();
    store.set_desired(&t, true).await.expect("set_desired");
    let now = now_millis();
    let connected = StatusUpdate { status: TenantStatus::Connected, reason: None, whatsapp_connected: true };
    let replaced = StatusUpdate::terminal(TenantStatus::Replaced, "stream replaced (440)");
    let never = Lease { owner: "host-a".into(), epoch: 1, version: 1, expires_at: now + 10_000 };
    match store.write_status_as_holder(&t, &never, &connected, now).await {
        Err(StoreError::Conflict(Conflict::LeaseLost)) => {}
        other => panic!("a holder write with no lease stored: want LeaseLost, got {other:?}"),
    }
    let a = store.acquire_lease(&t, "host-a", None, 10_000, now).await.expect("A takes the lease");
    assert!(store.write_status_as_holder(&t, &a, &connected, now).await.expect("A marks"), "the holder writes");
    let renewed = store.renew_lease(&t, &a, 10_000, now + 1).await.expect("A renews");
    assert!(
        !store.write_status_as_holder(&t, &a, &connected, now + 2).await.expect("A again"),
        "the holder's unchanged status is not written again"
    );
    store.release_lease(&t, &renewed).await.expect("A releases");
    let b = store.acquire_lease(&t, "host-b", None, 10_000, now + 3).await.expect("B takes the released lease");
    match store.write_status_as_holder(&t, &a, &replaced, now + 4).await {
        Err(StoreError::Conflict(Conflict::LeaseLost)) => {}
        other => panic!("A marks after B took the lease: want LeaseLost, got {other:?}"),
    }
    let record = store.get(&t).await.expect("get").expect("record");
    assert_eq!(record.status, Some(TenantStatus::Connected), "the former holder's mark is not written");
    assert!(record.whatsapp_connected, "the former holder did not un-desire the tenant");
    assert!(store.write_status_as_holder(&t, &b, &replaced, now + 5).await.expect("B marks"), "B is the holder");
}

/// A tenant never written has no record.
pub async fn tenant_get_missing_is_none(store: &dyn TenantStore) {
    let t = fresh_tenant();
    match store.get(&t).await {
        Ok(None) => {}
        other => panic!("get of an unknown tenant: want Ok(None), got {other:?}"),
    }
}

pub(super) async fn get_some(store: &dyn TenantStore, t: &TenantId, what: &str) -> crate::domain::TenantRecord {
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
    let lease = store.acquire_lease(&t, "host-a", None, TTL, now).await.expect("acquire");
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
    pub(super) const LIMIT: usize = 10;
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

pub(super) fn expect_lease_held(result: Result<Lease, StoreError>, holder: &Lease, what: &str) {
    match result {
        Err(StoreError::Conflict(Conflict::LeaseHeld { holder: h })) => {
            assert_eq!(&h, holder, "{what}: LeaseHeld names the current holder");
        }
        other => panic!("{what}: want Conflict(LeaseHeld), got {other:?}"),
    }
}

pub(super) fn expect_lease_lost(result: Result<Lease, StoreError>, what: &str) {
    match result {
        Err(StoreError::Conflict(Conflict::LeaseLost)) => {}
        other => panic!("{what}: want Conflict(LeaseLost), got {other:?}"),
    }
}

/// Acquire, contend, re-acquire, renew, take over a stale lease, and renew a lost one. No clock decides: a
/// lease its holder keeps renewing is never free, however late the caller says it is, and a taker wins only
/// with the exact lease (owner, epoch, version) it watched.
pub async fn tenant_lease_lifecycle(store: &dyn TenantStore) {
    let t = fresh_tenant();
    store.set_desired(&t, true).await.expect("set_desired");
    let now = now_millis();
    let day = 86_400_000;

    let a1 = store.acquire_lease(&t, "host-a", None, TTL, now).await.expect("acquire a free lease");
    let first = Lease { owner: "host-a".into(), epoch: 1, version: 1, expires_at: now + TTL as UnixMillis };
    assert_eq!(a1, first, "first lease");
    assert_eq!(get_some(store, &t, "after acquire").await.lease, Some(a1.clone()), "the lease is stored");

    expect_lease_held(store.acquire_lease(&t, "host-b", None, TTL, now + 1).await, &a1, "another owner");
    expect_lease_held(
        store.acquire_lease(&t, "host-b", None, TTL, a1.expires_at + day).await,
        &a1,
        "another owner whose clock is a day past the stored expiry",
    );

    let a2 = store.acquire_lease(&t, "host-a", None, TTL, now + 2).await.expect("re-acquire by the same owner");
    assert!(a2.epoch > a1.epoch, "re-acquiring raises the epoch ({} -> {})", a1.epoch, a2.epoch);
    assert!(a2.version > a1.version, "re-acquiring raises the version ({} -> {})", a1.version, a2.version);

    let renewed = store.renew_lease(&t, &a2, TTL, now + day).await.expect("renew, whatever the clock says");
    assert_eq!((renewed.owner.as_str(), renewed.epoch), ("host-a", a2.epoch), "renew keeps owner and epoch");
    assert_eq!(renewed.version, a2.version + 1, "renew raises the version by one");
    assert_eq!(renewed.expires_at, now + day + TTL as UnixMillis, "renew stores the holder's estimate");
    expect_lease_lost(store.renew_lease(&t, &a1, TTL, now + 3).await, "renewing a superseded epoch");

    expect_lease_held(
        store.acquire_lease(&t, "host-b", Some(&a2), TTL, now + 4).await,
        &renewed,
        "a take-over of a version the holder has renewed since",
    );
    let b = store.acquire_lease(&t, "host-b", Some(&renewed), TTL, now + 5).await.expect("take over a stale lease");
    assert_eq!(b.owner, "host-b", "the new owner holds it");
    assert!(b.epoch > renewed.epoch, "taking over raises the epoch ({} -> {})", renewed.epoch, b.epoch);
    expect_lease_lost(store.renew_lease(&t, &renewed, TTL, now + 6).await, "renew after take-over");
    expect_lease_held(store.acquire_lease(&t, "host-a", None, TTL, now + 7).await, &b, "the old owner is out");
    expect_lease_held(
        store.acquire_lease(&t, "host-c", Some(&renewed), TTL, now + 8).await,
        &b,
        "a second taker with the same stale lease",
    );
    assert_eq!(get_some(store, &t, "after take-over").await.lease, Some(b), "the stored lease is the new owner's");
}

/// A released lease is free at once for another owner (higher epoch); releasing a lost lease is harmless
/// and does not free the current holder's.
pub async fn tenant_lease_release_frees_at_once(store: &dyn TenantStore) {
    let t = fresh_tenant();
    let now = now_millis();
    let a = store.acquire_lease(&t, "host-a", None, TTL, now).await.expect("acquire on a tenant with no record");
    store.release_lease(&t, &a).await.expect("release");
    expect_lease_lost(store.renew_lease(&t, &a, TTL, now + 1).await, "renewing a released lease");
    let b = store.acquire_lease(&t, "host-b", None, TTL, now + 1).await.expect("acquire right after release");
    assert!(b.epoch > a.epoch, "acquiring after release raises the epoch ({} -> {})", a.epoch, b.epoch);
    store.release_lease(&t, &a).await.expect("releasing a lost lease is not an error");
    expect_lease_held(store.acquire_lease(&t, "host-c", None, TTL, now + 2).await, &b, "a stale release frees nothing");
    store.release_lease(&fresh_tenant(), &b).await.expect("releasing on an unknown tenant is not an error");
}

/// Two owners acquire the same free lease at the same moment, many times over (on tenants with and without a
/// record): exactly one wins each time and the loser is told who holds it.
pub async fn tenant_concurrent_acquisition_has_one_winner(store: Arc<dyn TenantStore>) {
    pub(super) const ROUNDS: usize = 24;
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
                store.acquire_lease(&t, owner, None, TTL, now).await
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
