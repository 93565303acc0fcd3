//! End-to-end tests of the supervised sessions (issue 5): the host binary, the real engine, the fake server.

use std::sync::Arc;
use std::time::Duration;

use wa_sim::{StreamErrorKind, Target};
use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::domain::{RecordKey, SessionState, TenantId, TenantStatus};
use wakeeper_shared::host_api::EnsureOutcome;
use wakeeper_shared::ports::{CredentialStore, TenantStore};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

fn ids(prefix: &str, n: usize) -> Vec<TenantId> {
    (0..n).map(|i| tid(&format!("{prefix}-{i:04}"))).collect()
}

fn assert_no_double_connections(wa: &wa_sim::SimHandle) {
    let obs = wa.observations();
    let doubled: Vec<_> = obs.devices.values().filter(|d| d.max_concurrent_connections > 1).map(|d| &d.jid).collect();
    assert!(doubled.is_empty(), "devices connected twice at once: {doubled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_tenants_come_back_after_sigkill_without_pairing() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let tenants = ids("resto", 200);
    seed_embedded(&dirs, &wa, &tenants).await;

    let mut host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &[]);
    host.ready().await;
    host.all_open(200, Duration::from_secs(120)).await;
    let logins_before = wa.summary().logins;
    host.kill9();

    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &[]);
    host.ready().await;
    let list = host.all_open(200, Duration::from_secs(120)).await;
    assert_eq!(list.sessions.len(), 200);
    let summary = wa.summary();
    assert!(summary.logins >= logins_before + 200, "every tenant logged in again: {summary:?}");
    assert_eq!(summary.rejected_logins, 0, "no tenant needed pairing (no 401)");
    assert_no_double_connections(&wa);
    drop(host);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_sockets_dropped_at_once_reconnect_within_the_governor_limit() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let tenants = ids("drop", 120);
    seed_embedded(&dirs, &wa, &tenants).await;
    let (rate, burst) = (40u32, 10u32);
    let host = TestHost::spawn(
        socket_host_bin!(),
        &dirs,
        &wa.url(),
        "host-a",
        &[("WAKEEPER_CONNECT_RATE", rate.to_string()), ("WAKEEPER_CONNECT_BURST", burst.to_string())],
    );
    host.ready().await;
    host.all_open(120, Duration::from_secs(60)).await;
    let seconds_before = wa.attempts_per_second().len();

    assert_eq!(wa.drop_connections(&Target::All), 120);
    let client = host.client.clone();
    wait_until(Duration::from_secs(10), "sessions noticing the drop", || {
        let c = client.clone();
        async move {
            let l = c.sessions().await.ok()?;
            l.sessions.iter().any(|s| s.state != SessionState::Open || s.reconnects > 0).then_some(())
        }
    })
    .await;
    let list = host.all_open(120, Duration::from_secs(60)).await;
    assert!(list.sessions.iter().all(|s| s.reconnects >= 1), "every session reconnected");

    let per_second = wa.attempts_per_second();
    let peak_after = per_second[seconds_before.saturating_sub(1)..].iter().copied().max().unwrap_or(0);
    assert!(
        peak_after <= rate + burst,
        "peak connect rate {peak_after}/s exceeded the governor's {rate}/s + burst {burst}: {per_second:?}"
    );
    assert_no_double_connections(&wa);
    drop(host);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_faults_end_one_tenant_each_and_leave_the_rest_open() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let tenants = ids("term", 6);
    seed_embedded(&dirs, &wa, &tenants).await;
    let jid = |i: usize| wa.device_jid(&tenants[i]).unwrap();

    let mut host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &[]);
    host.ready().await;
    host.all_open(6, Duration::from_secs(30)).await;

    // 440: replaced. 401: logged out. Revoked device: the next login is refused with 401.
    assert_eq!(wa.stream_error(&Target::device(jid(0)), StreamErrorKind::Replaced), 1);
    assert_eq!(wa.stream_error(&Target::device(jid(1)), StreamErrorKind::Unauthorized), 1);
    wa.revoke(&jid(2)).unwrap();
    assert_eq!(wa.drop_connections(&Target::device(jid(2))), 1);
    // 515 is not a failure: the session comes straight back.
    assert_eq!(wa.stream_error(&Target::device(jid(3)), StreamErrorKind::RestartRequired), 1);

    host.wait_state(&tenants[0], SessionState::Replaced, Duration::from_secs(20)).await;
    host.wait_state(&tenants[1], SessionState::LoggedOut, Duration::from_secs(20)).await;
    host.wait_state(&tenants[2], SessionState::LoggedOut, Duration::from_secs(20)).await;
    wa.wait_for_device(&jid(3), Duration::from_secs(20), |d| d.logins >= 2 && d.current_connections == 1)
        .await
        .unwrap();

    // No further attempt by the terminal ones over an observation window.
    let attempts: Vec<u64> = (0..3).map(|i| wa.device(&jid(i)).unwrap().connect_attempts).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, before) in attempts.iter().enumerate() {
        assert_eq!(wa.device(&jid(i)).unwrap().connect_attempts, *before, "tenant {i} tried again");
    }
    let list = host.client.sessions().await.unwrap();
    for t in &tenants[3..] {
        let s = list.sessions.iter().find(|s| &s.tenant_id == t).unwrap();
        assert_eq!(s.state, SessionState::Open, "{t} should be untouched");
    }
    let replaced = list.sessions.iter().find(|s| s.tenant_id == tenants[0]).unwrap();
    assert!(replaced.last_error.as_deref().unwrap_or_default().contains("440"));

    // The marks are in the tenant table (read once the host has stopped and released the embedded store).
    host.terminate(Duration::from_secs(30));
    let store = EmbeddedStore::open(dirs.data().join("store.redb"), dirs.cipher()).unwrap();
    let expect = [(0, TenantStatus::Replaced), (1, TenantStatus::LoggedOut), (2, TenantStatus::LoggedOut)];
    for (i, status) in expect {
        let rec = store.get(&tenants[i]).await.unwrap().unwrap();
        assert_eq!(rec.status, Some(status), "tenant {i}");
        assert!(!rec.whatsapp_connected, "tenant {i} no longer desired");
        assert!(rec.reason.is_some());
    }
    for t in &tenants[3..] {
        let rec = store.get(t).await.unwrap().unwrap();
        assert!(rec.whatsapp_connected, "{t} still desired");
        assert_eq!(rec.status, Some(TenantStatus::Connected));
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_corrupt_credentials_are_marked_and_others_unaffected() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let good = ids("good", 3);
    seed_embedded(&dirs, &wa, &good).await;
    let (missing, corrupt, partial) = (tid("missing-1"), tid("corrupt-1"), tid("partial-1"));
    {
        let store = Arc::new(EmbeddedStore::open(dirs.data().join("store.redb"), dirs.cipher()).unwrap());
        store.set_desired(&missing, true).await.unwrap();
        // Corrupt: sealed for another tenant, so it does not decrypt under this one.
        let snap = wa.mint_device(&corrupt);
        store.replace(&corrupt, &snap, 0).await.unwrap();
        use wakeeper_shared::contract::SwapRecords;
        let other = tid("corrupt-donor");
        store.replace(&other, &wa.mint_device(&other), 0).await.unwrap();
        store.copy_stored_value(&other, &corrupt, &RecordKey::device()).await;
        store.set_desired(&corrupt, true).await.unwrap();
        // Partial: the old system's restore (no account in the device record).
        let mut snap = wa.mint_device(&partial);
        let mut device = snap.device().unwrap();
        device.account = None;
        snap.set_device(&device);
        store.replace(&partial, &snap, 0).await.unwrap();
        store.set_desired(&partial, true).await.unwrap();
    }
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &[]);
    host.ready().await;
    host.all_open(3, Duration::from_secs(30)).await;
    host.wait_state(&missing, SessionState::CredentialsMissing, Duration::from_secs(20)).await;
    host.wait_state(&corrupt, SessionState::CredentialsCorrupt, Duration::from_secs(20)).await;
    host.wait_state(&partial, SessionState::CredentialsCorrupt, Duration::from_secs(20)).await;
    assert_eq!(host.client.ensure(&missing).await.unwrap(), EnsureOutcome::CredentialsMissing);
    assert_eq!(host.client.ensure(&partial).await.unwrap(), EnsureOutcome::CredentialsCorrupt);
    let list = host.client.sessions().await.unwrap();
    assert_eq!(list.sessions.iter().filter(|s| s.state == SessionState::Open).count(), 3);
    drop(host);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_socket_is_detected_and_replaced_without_any_sweep() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let tenants = ids("half", 3);
    seed_embedded(&dirs, &wa, &tenants).await;
    // The in-host sweep is off: only the session's own keepalive can notice.
    let host = TestHost::spawn(
        socket_host_bin!(),
        &dirs,
        &wa.url(),
        "host-a",
        &[("WAKEEPER_SWEEP_INTERVAL_S", "0".into()), ("WAKEEPER_SILENT_AFTER_S", "35".into())],
    );
    host.ready().await;
    host.all_open(3, Duration::from_secs(30)).await;
    let jid = wa.device_jid(&tenants[0]).unwrap();
    let logins = wa.device(&jid).unwrap().logins;
    assert_eq!(wa.half_open(&Target::device(jid.clone())), 1);
    // The engine pings an idle link every 15-30 s; a link silent for 35 s is replaced by the supervisor (the
    // engine's own dead-socket check may take up to ~2 minutes).
    let obs =
        wa.wait_for_device(&jid, Duration::from_secs(90), |d| d.logins > logins && d.current_connections == 1).await;
    let obs = obs.expect("half-open socket replaced by a new connection");
    assert_eq!(obs.max_concurrent_connections, 1, "the dead socket was given up before reconnecting");
    host.wait_state(&tenants[0], SessionState::Open, Duration::from_secs(10)).await;
    let view = host.client.session(&tenants[0]).await.unwrap().unwrap();
    assert!(view.reconnects >= 1);
    drop(host);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_440_after_a_takeover_names_the_old_host() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let (imported, native) = (tid("taken-over"), tid("native"));
    seed_embedded(&dirs, &wa, std::slice::from_ref(&native)).await;
    {
        let store = EmbeddedStore::open(dirs.data().join("store.redb"), dirs.cipher()).unwrap();
        let mut snap = wa.mint_device(&imported);
        let marker = socket_host::import::ImportMarker {
            source: "baileys".into(),
            origin: "test".into(),
            imported_at: wakeeper_shared::domain::now_millis(),
        };
        snap.records.insert(socket_host::import::marker_key(), serde_json::to_vec(&marker).unwrap());
        store.replace(&imported, &snap, 0).await.unwrap();
        store.set_desired(&imported, true).await.unwrap();
    }
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &[]);
    host.ready().await;
    host.all_open(2, Duration::from_secs(30)).await;
    for t in [&imported, &native] {
        assert_eq!(wa.stream_error(&Target::device(wa.device_jid(t).unwrap()), StreamErrorKind::Replaced), 1);
        host.wait_state(t, SessionState::Replaced, Duration::from_secs(20)).await;
    }
    let reason = |t: &TenantId| {
        let c = host.client.clone();
        let t = t.clone();
        async move { c.session(&t).await.unwrap().unwrap().last_error.unwrap_or_default() }
    };
    assert!(reason(&imported).await.contains("Baileys"), "the imported tenant's 440 names the old Baileys host");
    assert!(!reason(&native).await.contains("Baileys"), "a native tenant's 440 does not");
    drop(host);
    sim.shutdown().await;
}

/// Many ensures of one tenant at once (the restore fan-out, a sweep and an operator at the same moment) take its
/// lease once: a second acquisition would raise the epoch under the first session and fence it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ensures_of_one_tenant_take_its_lease_once() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let tenants = ids("racy", 4);
    seed_embedded(&dirs, &wa, &tenants).await;
    {
        // Not desired: the host restores nothing on start, the ensures below are the first to take a lease.
        let store = EmbeddedStore::open(dirs.data().join("store.redb"), dirs.cipher()).unwrap();
        for t in &tenants {
            store.set_desired(t, false).await.unwrap();
        }
    }
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &[]);
    host.ready().await;
    let ensures = tenants.iter().flat_map(|t| (0..6).map(move |_| t)).map(|t| host.client.ensure(t));
    for outcome in futures_util::future::join_all(ensures).await {
        outcome.expect("ensure");
    }
    let list = host.all_open(tenants.len(), Duration::from_secs(30)).await;
    for s in &list.sessions {
        let lease = s.lease.as_ref().expect("an open session reports its lease");
        assert_eq!((lease.epoch, lease.held), (1, true), "{}: one acquisition, still held", s.tenant_id);
    }
    drop(host);
    sim.shutdown().await;
}
