//! The health sweep and the restore fan-out against the embedded tenant store and a scripted host.
//!
//! The host here is a small in-memory stand-in for the control API (what it answers is scripted per test);
//! the tenant store is the real embedded adapter. The end-to-end versions against the real host binary, the
//! fake WhatsApp server, DynamoDB Local and the Firestore emulator live in `socket-host/tests/functions_e2e.rs`.
#![cfg(feature = "embedded")]

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::alerts::{AlertError, AlertEvent, AlertMessage, AlertSink};
use wakeeper_shared::crypto::Cipher;
use wakeeper_shared::domain::reconcile::Policy;
use wakeeper_shared::domain::{
    SessionList, SessionState, SessionView, StatusUpdate, TenantId, TenantRecord, TenantStatus,
};
use wakeeper_shared::fleet::HostFleet;
use wakeeper_shared::ports::{EnsureAnswer, HostError, HostOps, TenantStore};
use wakeeper_shared::restore::{FanoutRequest, RestoreError, RestoreLimits, run_restore};
use wakeeper_shared::sweep::{SweepMemory, SweepPolicy, run_sweep};

const NOW: i64 = 1_800_000_000_000;

fn tid(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

fn ids(prefix: &str, n: usize) -> Vec<TenantId> {
    (0..n).map(|i| tid(&format!("{prefix}-{i:03}"))).collect()
}

struct Store {
    _dir: tempfile::TempDir,
    store: Arc<EmbeddedStore>,
}

fn store() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path().join("store.redb"), Cipher::new(&[7u8; 32])).unwrap());
    Store { _dir: dir, store }
}

async fn desire(store: &EmbeddedStore, tenants: &[TenantId]) {
    for id in tenants {
        store.set_desired(id, true).await.unwrap();
    }
}

async fn record(store: &EmbeddedStore, id: &TenantId) -> TenantRecord {
    store.get(id).await.unwrap().expect("record exists")
}

fn view(id: &TenantId, state: SessionState, since_ms: i64) -> SessionView {
    SessionView {
        tenant_id: id.clone(),
        state,
        since_ms,
        connected_since_ms: None,
        last_frame_ago_ms: Some(1_000),
        reconnects: 0,
        consecutive_failures: 0,
        backoff_ms: None,
        last_error: None,
        lease: None,
    }
}

/// One call the scripted host received.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Sessions,
    Ensure(TenantId),
    Reconnect(TenantId),
}

#[derive(Default)]
struct HostState {
    boot_id: String,
    reachable: bool,
    sessions: BTreeMap<TenantId, SessionView>,
    no_credentials: HashSet<TenantId>,
    corrupt: HashSet<TenantId>,
    flaky: HashSet<TenantId>,
    calls: Vec<Call>,
}

/// A scripted control API: answers from its state, records every call, and (when given a clock) spends a
/// second of the caller's time per ensure.
#[derive(Default)]
struct ScriptedHost {
    state: Mutex<HostState>,
    clock: Option<Arc<AtomicU64>>,
}

impl ScriptedHost {
    fn new(boot_id: &str) -> Self {
        Self {
            state: Mutex::new(HostState { boot_id: boot_id.into(), reachable: true, ..Default::default() }),
            clock: None,
        }
    }
    fn with<R>(&self, f: impl FnOnce(&mut HostState) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }
    fn run(&self, tenants: &[TenantId], state: SessionState) {
        self.with(|s| {
            for id in tenants {
                s.sessions.insert(id.clone(), view(id, state, NOW));
            }
        });
    }
    fn calls(&self) -> Vec<Call> {
        self.with(|s| s.calls.clone())
    }
    fn ensured(&self) -> Vec<TenantId> {
        self.calls().into_iter().filter_map(|c| if let Call::Ensure(id) = c { Some(id) } else { None }).collect()
    }
    fn reconnected(&self) -> Vec<TenantId> {
        self.calls().into_iter().filter_map(|c| if let Call::Reconnect(id) = c { Some(id) } else { None }).collect()
    }
    fn sessions_calls(&self) -> usize {
        self.calls().iter().filter(|c| **c == Call::Sessions).count()
    }
}

#[async_trait]
impl HostOps for ScriptedHost {
    async fn sessions(&self) -> Result<SessionList, HostError> {
        self.with(|s| {
            s.calls.push(Call::Sessions);
            if !s.reachable {
                return Err(HostError::Unreachable("connection refused".into()));
            }
            Ok(SessionList::new(s.boot_id.clone(), s.sessions.values().cloned().collect()))
        })
    }

    async fn ensure(&self, tenant: &TenantId) -> Result<EnsureAnswer, HostError> {
        if let Some(clock) = &self.clock {
            clock.fetch_sub(1_000, Ordering::SeqCst);
        }
        self.with(|s| {
            s.calls.push(Call::Ensure(tenant.clone()));
            if !s.reachable || s.flaky.contains(tenant) {
                return Err(HostError::Unreachable("timed out".into()));
            }
            if s.no_credentials.contains(tenant) {
                return Ok(EnsureAnswer::CredentialsMissing);
            }
            if s.corrupt.contains(tenant) {
                return Ok(EnsureAnswer::CredentialsCorrupt);
            }
            if s.sessions.contains_key(tenant) {
                return Ok(EnsureAnswer::AlreadyRunning);
            }
            s.sessions.insert(tenant.clone(), view(tenant, SessionState::Connecting, NOW));
            Ok(EnsureAnswer::Started)
        })
    }

    async fn reconnect(&self, tenant: &TenantId) -> Result<(), HostError> {
        self.with(|s| {
            s.calls.push(Call::Reconnect(tenant.clone()));
            if !s.reachable {
                return Err(HostError::Unreachable("connection refused".into()));
            }
            s.sessions.contains_key(tenant).then_some(()).ok_or(HostError::NotFound)
        })
    }
}

/// Keeps every alert; can be told to fail delivery.
#[derive(Default)]
struct Alerts {
    sent: Mutex<Vec<AlertMessage>>,
    failing: bool,
}

impl Alerts {
    fn events(&self) -> Vec<AlertEvent> {
        self.sent.lock().unwrap().iter().map(|m| m.event.clone()).collect()
    }
}

#[async_trait]
impl AlertSink for Alerts {
    async fn send(&self, alert: &AlertMessage) -> Result<(), AlertError> {
        if self.failing {
            return Err(AlertError("webhook answered 500".into()));
        }
        self.sent.lock().unwrap().push(alert.clone());
        Ok(())
    }
}

// ---- the sweep ----------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_healthy_fleet_costs_no_writes_on_the_second_sweep() {
    let s = store();
    let fleet = ids("open", 12);
    desire(&s.store, &fleet).await;
    let host = ScriptedHost::new("boot-1");
    host.run(&fleet, SessionState::Open);
    let alerts = Alerts::default();
    let mut memory = SweepMemory::default();
    let policy = SweepPolicy { page_size: 5, ..SweepPolicy::default() };

    let first = run_sweep(s.store.as_ref(), &host, &mut memory, &alerts, &policy, NOW).await.unwrap();
    assert_eq!((first.healthy, first.unhealthy, first.desired), (12, 0, 12));
    assert_eq!(first.status_writes, 12, "first sight of each open session writes `connected` once");
    assert_eq!(record(&s.store, &fleet[3]).await.status, Some(TenantStatus::Connected));

    let second = run_sweep(s.store.as_ref(), &host, &mut memory, &alerts, &policy, NOW + 120_000).await.unwrap();
    assert_eq!(second.healthy, 12);
    assert_eq!(second.status_writes, 0, "{second:?}");
    assert_eq!(second.failure_writes, 0);
    assert_eq!((second.alerts, second.errors, second.reconnect_requested, second.missing_started), (0, 0, 0, 0));
    assert!(!second.host_restarted && !second.host_unreachable);
    assert_eq!(host.sessions_calls(), 2, "GET /v1/sessions exactly once per sweep");
    assert!(host.ensured().is_empty() && host.reconnected().is_empty());
    assert!(alerts.events().is_empty());
}

#[tokio::test]
async fn a_tenant_failing_four_sweeps_in_a_row_alerts_once_and_again_on_recovery() {
    let s = store();
    let id = tid("stuck");
    desire(&s.store, std::slice::from_ref(&id)).await;
    let host = ScriptedHost::new("boot-1");
    host.run(std::slice::from_ref(&id), SessionState::Backoff);
    let alerts = Alerts::default();
    let mut memory = SweepMemory::default();
    let policy = SweepPolicy::default();

    for sweep in 1..=3u32 {
        let r = run_sweep(s.store.as_ref(), &host, &mut memory, &alerts, &policy, NOW).await.unwrap();
        assert_eq!((r.unhealthy, r.alerts), (1, 0), "sweep {sweep}: {r:?}");
        assert_eq!(record(&s.store, &id).await.consecutive_failures, sweep);
    }
    let fourth = run_sweep(s.store.as_ref(), &host, &mut memory, &alerts, &policy, NOW).await.unwrap();
    assert_eq!(fourth.alerts, 1, "{fourth:?}");
    assert_eq!(
        alerts.events(),
        vec![AlertEvent::TenantFailing {
            tenant_id: id.clone(),
            consecutive_failures: 4,
            state: Some(SessionState::Backoff),
            reason: None
        }]
    );
    let fifth = run_sweep(s.store.as_ref(), &host, &mut memory, &alerts, &policy, NOW).await.unwrap();
    assert_eq!(fifth.alerts, 0, "an alert fires once when the limit is crossed, not every sweep");
    // Recent backoff: no reconnect was asked for (the limit is five minutes).
    assert!(host.reconnected().is_empty());

    host.run(std::slice::from_ref(&id), SessionState::Open);
    let healed = run_sweep(s.store.as_ref(), &host, &mut memory, &alerts, &policy, NOW).await.unwrap();
    assert_eq!(healed.alerts, 1);
    assert_eq!(alerts.events().last(), Some(&AlertEvent::TenantRecovered { tenant_id: id.clone() }));
    let r = record(&s.store, &id).await;
    assert_eq!((r.consecutive_failures, r.status), (0, Some(TenantStatus::Connected)));
}

#[tokio::test]
async fn an_unreachable_host_marks_nothing_and_raises_one_alert() {
    let s = store();
    let fleet = ids("t", 6);
    desire(&s.store, &fleet).await;
    s.store
        .write_status(
            &fleet[0],
            &StatusUpdate { status: TenantStatus::Connected, reason: None, whatsapp_connected: true },
            NOW - 1,
        )
        .await
        .unwrap();
    s.store.record_failure(&fleet[1]).await.unwrap();
    let mut before = Vec::new();
    for id in &fleet {
        before.push(record(&s.store, id).await);
    }
    let host = ScriptedHost::new("boot-1");
    host.with(|h| h.reachable = false);
    let alerts = Alerts::default();
    let mut memory = SweepMemory { last_boot_id: Some("boot-0".into()), ..Default::default() };

    for _ in 0..5 {
        let r = run_sweep(s.store.as_ref(), &host, &mut memory, &alerts, &SweepPolicy::default(), NOW).await.unwrap();
        assert!(r.host_unreachable);
        assert_eq!((r.alerts, r.status_writes, r.failure_writes, r.marked), (1, 0, 0, 0), "{r:?}");
        assert!(r.host_error.as_deref().unwrap().contains("connection refused"));
    }
    for (id, was) in fleet.iter().zip(before) {
        assert_eq!(record(&s.store, id).await, was, "{id} changed during an outage");
    }
    assert!(host.ensured().is_empty());
    assert_eq!(memory.last_boot_id.as_deref(), Some("boot-0"), "an outage teaches nothing about the boot id");
    assert!(alerts.events().iter().all(|e| matches!(e, AlertEvent::HostUnreachable { .. })));
}

#[tokio::test]
async fn missing_tenants_are_started_and_only_definitive_answers_mark() {
    let s = store();
    let fleet = ids("m", 5);
    desire(&s.store, &fleet).await;
    let host = ScriptedHost::new("boot-2");
    host.run(&fleet[..1], SessionState::Open);
    host.with(|h| {
        h.no_credentials.insert(fleet[2].clone());
        h.corrupt.insert(fleet[3].clone());
        h.flaky.insert(fleet[4].clone());
    });
    let alerts = Alerts::default();
    let mut memory = SweepMemory { last_boot_id: Some("boot-1".into()), ..Default::default() };

    let r = run_sweep(s.store.as_ref(), &host, &mut memory, &alerts, &SweepPolicy::default(), NOW).await.unwrap();
    assert!(r.host_restarted);
    assert_eq!(r.missing_started, 1, "{r:?}");
    assert_eq!(r.marked, 2);
    assert_eq!(r.errors, 1, "the flaky tenant's failure is counted, not marked");
    assert_eq!(r.status_writes, 1 + 2, "connected once for the open tenant, two marks");
    assert_eq!(memory.last_boot_id.as_deref(), Some("boot-2"));

    let missing = record(&s.store, &fleet[2]).await;
    assert_eq!(missing.status, Some(TenantStatus::CredentialsMissing));
    assert!(!missing.whatsapp_connected, "a terminal mark clears the desired flag");
    assert_eq!(record(&s.store, &fleet[3]).await.status, Some(TenantStatus::CredentialsCorrupt));
    let flaky = record(&s.store, &fleet[4]).await;
    assert_eq!((flaky.status, flaky.whatsapp_connected, flaky.consecutive_failures), (None, true, 0));

    // The marked tenants are no longer desired: the next sweep leaves them alone.
    let again = run_sweep(s.store.as_ref(), &host, &mut memory, &alerts, &SweepPolicy::default(), NOW).await.unwrap();
    assert_eq!(again.desired, 3);
    assert_eq!(again.marked, 0);
}

#[tokio::test]
async fn a_tenant_the_host_marked_first_keeps_the_host_reason() {
    let s = store();
    let id = tid("gone");
    desire(&s.store, std::slice::from_ref(&id)).await;
    let host = ScriptedHost::new("b");
    host.with(|h| {
        h.no_credentials.insert(id.clone());
    });
    // What the real host writes itself when it refuses an ensure.
    s.store
        .write_status(&id, &StatusUpdate::terminal(TenantStatus::CredentialsMissing, "host: nothing stored"), NOW)
        .await
        .unwrap();
    let marked_by_host = record(&s.store, &id).await;
    // An operator restores it by name: the host refuses again, the tenant counts as marked, nothing is written.
    let rep = run_restore(
        s.store.as_ref(),
        &host,
        &FanoutRequest { tenant_ids: Some(vec![id.clone()]) },
        &RestoreLimits::default(),
        || Duration::from_secs(600),
    )
    .await
    .unwrap();
    assert_eq!((rep.marked, rep.failed), (1, 0));
    assert_eq!(record(&s.store, &id).await, marked_by_host);
    // No longer desired: the sweep leaves it alone.
    let r = run_sweep(
        s.store.as_ref(),
        &host,
        &mut SweepMemory::default(),
        &Alerts::default(),
        &SweepPolicy::default(),
        NOW,
    )
    .await
    .unwrap();
    assert_eq!((r.desired, r.status_writes, r.marked), (0, 0, 0));
    assert_eq!(record(&s.store, &id).await, marked_by_host);
}

#[tokio::test]
async fn stuck_and_silent_sessions_are_asked_to_reconnect() {
    let s = store();
    let fleet = ids("r", 4);
    desire(&s.store, &fleet).await;
    let host = ScriptedHost::new("b");
    host.with(|h| {
        // Stuck in backoff for ten minutes; briefly connecting; open but silent for three minutes; open and fine.
        h.sessions.insert(fleet[0].clone(), view(&fleet[0], SessionState::Backoff, NOW - 600_000));
        h.sessions.insert(fleet[1].clone(), view(&fleet[1], SessionState::Connecting, NOW - 2_000));
        let mut silent = view(&fleet[2], SessionState::Open, NOW - 3_600_000);
        silent.last_frame_ago_ms = Some(180_000);
        h.sessions.insert(fleet[2].clone(), silent);
        h.sessions.insert(fleet[3].clone(), view(&fleet[3], SessionState::Open, NOW - 3_600_000));
    });
    let r = run_sweep(
        s.store.as_ref(),
        &host,
        &mut SweepMemory::default(),
        &Alerts::default(),
        &SweepPolicy::default(),
        NOW,
    )
    .await
    .unwrap();
    assert_eq!(r.reconnect_requested, 2, "{r:?}");
    let mut asked = host.reconnected();
    asked.sort();
    assert_eq!(asked, vec![fleet[0].clone(), fleet[2].clone()]);
    assert_eq!((r.healthy, r.unhealthy), (2, 2));

    // The silence rule can be switched off.
    let host2 = ScriptedHost::new("b");
    host2.with(|h| h.sessions = host.with(|o| o.sessions.clone()));
    let policy = SweepPolicy {
        silent_after: None,
        reconcile: Policy { stuck_after_ms: 24 * 3_600_000, ..Policy::default() },
        ..SweepPolicy::default()
    };
    let r = run_sweep(s.store.as_ref(), &host2, &mut SweepMemory::default(), &Alerts::default(), &policy, NOW)
        .await
        .unwrap();
    assert_eq!(r.reconnect_requested, 0);
}

#[tokio::test]
async fn undelivered_alerts_are_counted_and_do_not_fail_the_sweep() {
    let s = store();
    let id = tid("x");
    desire(&s.store, std::slice::from_ref(&id)).await;
    for _ in 0..3 {
        s.store.record_failure(&id).await.unwrap();
    }
    let host = ScriptedHost::new("b");
    host.run(std::slice::from_ref(&id), SessionState::Connecting);
    let alerts = Alerts { failing: true, ..Default::default() };
    let r = run_sweep(s.store.as_ref(), &host, &mut SweepMemory::default(), &alerts, &SweepPolicy::default(), NOW)
        .await
        .unwrap();
    assert_eq!((r.alerts, r.alerts_failed), (0, 1));
}

#[tokio::test]
async fn a_fleet_routes_each_tenant_to_its_shard_and_fails_as_one() {
    let s = store();
    let fleet_ids = ids("f", 30);
    desire(&s.store, &fleet_ids).await;
    let hosts: Vec<Arc<ScriptedHost>> = (0..3).map(|i| Arc::new(ScriptedHost::new(&format!("boot-{i}")))).collect();
    let fleet = HostFleet::new(hosts.clone()).unwrap();
    let r = run_sweep(
        s.store.as_ref(),
        &fleet,
        &mut SweepMemory::default(),
        &Alerts::default(),
        &SweepPolicy::default(),
        NOW,
    )
    .await
    .unwrap();
    assert_eq!(r.missing_started, 30);
    for (i, h) in hosts.iter().enumerate() {
        assert!(!h.ensured().is_empty(), "host {i} got none of 30 tenants");
        for id in h.ensured() {
            assert_eq!(id.shard(3) as usize, i, "{id} went to host {i}");
        }
    }
    let list = fleet.sessions().await.unwrap();
    assert_eq!(list.sessions.len(), 30);
    assert_eq!(list.boot_id, "boot-0,boot-1,boot-2");

    hosts[1].with(|h| h.reachable = false);
    let r = run_sweep(
        s.store.as_ref(),
        &fleet,
        &mut SweepMemory::default(),
        &Alerts::default(),
        &SweepPolicy::default(),
        NOW,
    )
    .await
    .unwrap();
    assert!(r.host_unreachable);
    assert!(r.host_error.unwrap().contains("host 1"));
}

// ---- the restore fan-out -----------------------------------------------------------------------------------

#[tokio::test]
async fn restore_starts_every_desired_tenant_not_running_most_recently_healthy_first() {
    let s = store();
    let fleet = ids("r", 10);
    desire(&s.store, &fleet).await;
    // r-007 was healthy most recently, then r-004.
    for (id, at) in [(&fleet[4], NOW - 5_000), (&fleet[7], NOW - 1_000)] {
        let up = StatusUpdate { status: TenantStatus::Connected, reason: None, whatsapp_connected: true };
        s.store.write_status(id, &up, at).await.unwrap();
    }
    let host = ScriptedHost::new("b");
    host.run(&fleet[..3], SessionState::Open);
    let limits = RestoreLimits { concurrency: 1, page_size: 3, ..RestoreLimits::default() };
    let r = run_restore(s.store.as_ref(), &host, &FanoutRequest::default(), &limits, || Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!((r.total, r.started, r.already_running, r.failed, r.marked), (10, 7, 3, 0, 0), "{r:?}");
    assert!(!r.stopped_early);
    assert_eq!(host.sessions_calls(), 1);
    let order = host.ensured();
    assert_eq!(order.len(), 7, "running tenants are not asked again");
    assert_eq!(&order[..2], &[fleet[7].clone(), fleet[4].clone()]);

    // A second run finds everything running.
    let again = run_restore(s.store.as_ref(), &host, &FanoutRequest::default(), &limits, || Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!((again.started, again.already_running), (0, 10));
}

#[tokio::test]
async fn restore_marks_definitive_failures_and_never_transient_ones() {
    let s = store();
    let fleet = ids("d", 4);
    desire(&s.store, &fleet).await;
    let host = ScriptedHost::new("b");
    host.with(|h| {
        h.no_credentials.insert(fleet[0].clone());
        h.corrupt.insert(fleet[1].clone());
        h.flaky.insert(fleet[2].clone());
    });
    let r = run_restore(s.store.as_ref(), &host, &FanoutRequest::default(), &RestoreLimits::default(), || {
        Duration::from_secs(600)
    })
    .await
    .unwrap();
    assert_eq!((r.total, r.started, r.failed, r.marked), (4, 1, 1, 2), "{r:?}");
    assert_eq!(record(&s.store, &fleet[0]).await.status, Some(TenantStatus::CredentialsMissing));
    assert_eq!(record(&s.store, &fleet[1]).await.status, Some(TenantStatus::CredentialsCorrupt));
    let flaky = record(&s.store, &fleet[2]).await;
    assert_eq!((flaky.status, flaky.whatsapp_connected), (None, true));
}

#[tokio::test]
async fn restore_of_given_ids_ensures_exactly_those() {
    let s = store();
    desire(&s.store, &ids("all", 5)).await;
    let host = ScriptedHost::new("b");
    let wanted = vec![tid("all-001"), tid("not-desired"), tid("all-001")];
    let r = run_restore(
        s.store.as_ref(),
        &host,
        &FanoutRequest { tenant_ids: Some(wanted) },
        &RestoreLimits::default(),
        || Duration::from_secs(600),
    )
    .await
    .unwrap();
    assert_eq!((r.total, r.started), (2, 2), "duplicates collapse: {r:?}");
    let mut got = host.ensured();
    got.sort();
    assert_eq!(got, vec![tid("all-001"), tid("not-desired")]);
}

#[tokio::test]
async fn restore_stops_before_time_runs_short_and_says_how_far_it_got() {
    let s = store();
    let fleet = ids("slow", 20);
    desire(&s.store, &fleet).await;
    // Each ensure costs one second of the caller's remaining twenty; fifteen must stay in reserve.
    let clock = Arc::new(AtomicU64::new(20_000));
    let host = ScriptedHost { clock: Some(clock.clone()), ..ScriptedHost::new("b") };
    let limits = RestoreLimits { concurrency: 1, reserve: Duration::from_secs(15), page_size: 500 };
    let left = clock.clone();
    let r = run_restore(s.store.as_ref(), &host, &FanoutRequest::default(), &limits, move || {
        Duration::from_millis(left.load(Ordering::SeqCst))
    })
    .await
    .unwrap();
    assert!(r.stopped_early);
    assert_eq!(r.started, 6, "20 s, 19 s, ... 15 s left: six calls start: {r:?}");
    assert_eq!(r.not_attempted, 14);
    assert_eq!(r.total, r.started + r.not_attempted);
    assert_eq!(host.ensured().len(), 6);

    // Out of time before anything: nothing is asked at all.
    let idle = ScriptedHost::new("b");
    let r = run_restore(s.store.as_ref(), &idle, &FanoutRequest::default(), &limits, || Duration::from_secs(1))
        .await
        .unwrap();
    assert!(r.stopped_early);
    assert!(idle.calls().is_empty());
}

#[tokio::test]
async fn restore_against_an_unreachable_host_fails_and_marks_nothing() {
    let s = store();
    let fleet = ids("u", 3);
    desire(&s.store, &fleet).await;
    let host = ScriptedHost::new("b");
    host.with(|h| h.reachable = false);
    let err = run_restore(s.store.as_ref(), &host, &FanoutRequest::default(), &RestoreLimits::default(), || {
        Duration::from_secs(600)
    })
    .await
    .unwrap_err();
    assert!(matches!(err, RestoreError::Host(HostError::Unreachable(_))), "{err}");
    assert!(host.ensured().is_empty());
    for id in &fleet {
        let r = record(&s.store, id).await;
        assert_eq!((r.status, r.whatsapp_connected), (None, true));
    }
}

#[tokio::test]
async fn reports_serialize_with_the_fields_the_functions_promise() {
    let s = store();
    let host = ScriptedHost::new("b");
    let sweep = run_sweep(
        s.store.as_ref(),
        &host,
        &mut SweepMemory::default(),
        &Alerts::default(),
        &SweepPolicy::default(),
        NOW,
    )
    .await
    .unwrap();
    let v = serde_json::to_value(&sweep).unwrap();
    for key in
        ["healthy", "unhealthy", "reconnect_requested", "missing_started", "alerts", "status_writes", "duration_ms"]
    {
        assert!(v.get(key).is_some_and(|x| x.is_number()), "sweep report lacks {key}: {v}");
    }
    let restore = run_restore(s.store.as_ref(), &host, &FanoutRequest::default(), &RestoreLimits::default(), || {
        Duration::from_secs(600)
    })
    .await
    .unwrap();
    let v = serde_json::to_value(&restore).unwrap();
    for key in ["total", "started", "already_running", "failed", "marked", "duration_ms"] {
        assert!(v.get(key).is_some_and(|x| x.is_number()), "restore report lacks {key}: {v}");
    }
    // The EMF lines carry the same numbers.
    let line: serde_json::Value = serde_json::from_str(&sweep.emf("health-sweep").to_line(NOW)).unwrap();
    assert_eq!(line["Function"], "health-sweep");
    assert_eq!(line["StatusWrites"], 0.0);
    assert_eq!(line["_aws"]["CloudWatchMetrics"][0]["Namespace"], "wakeeper");
}
