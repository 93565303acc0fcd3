//! End-to-end tests of the Lambda functions' logic (issue 7): the shared `run_restore` and `run_sweep` the
//! handlers call, driven through the real control API of the real host binary, which runs the real engine
//! against the fake WhatsApp server, keeps credentials in the Firestore emulator and tenants in DynamoDB Local.
//!
//! The host runs with its own restore-on-start and sweep timer off, so everything that comes back, is
//! reconnected, counted or marked here was done by the functions' logic. Invoking a built function through
//! `cargo lambda watch` + `cargo lambda invoke` with a recorded Scheduler event is `scripts/invoke-local`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use wa_sim::{Refusal, RefusePoint, Target};
use wakeeper_shared::adapters::dynamodb::{DynamoTenantStore, dynamo_client_for_endpoint};
use wakeeper_shared::adapters::firestore::FirestoreCredentialStore;
use wakeeper_shared::alerts::{AlertError, AlertEvent, AlertMessage, AlertSink};
use wakeeper_shared::domain::reconcile::Policy;
use wakeeper_shared::domain::{SessionState, TenantId, TenantRecord, TenantStatus, now_millis};
use wakeeper_shared::fleet::HostFleet;
use wakeeper_shared::host_api::HostClient;
use wakeeper_shared::ports::{CredentialStore, TenantStore};
use wakeeper_shared::restore::{FanoutRequest, RestoreLimits, run_restore};
use wakeeper_shared::sweep::{SweepMemory, SweepPolicy, SweepReport, run_sweep};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

const PROJECT: &str = "wakeeper-test";

fn ids(prefix: &str, n: usize) -> Vec<TenantId> {
    (0..n).map(|i| tid(&format!("{prefix}-{i:03}"))).collect()
}

/// The cloud side of a test: a fresh DynamoDB Local table and a fresh Firestore emulator prefix.
struct Cloud {
    tenants: Arc<DynamoTenantStore>,
    creds: Arc<dyn CredentialStore>,
    dynamo_endpoint: String,
    emulator: String,
    prefix: String,
}

impl Cloud {
    /// `None` (the test returns early) only when WAKEEPER_SKIP_CLOUD_TESTS=1; otherwise a missing server fails.
    async fn new(name: &str, dirs: &Dirs) -> Option<Self> {
        let emulator = firestore_emulator()?;
        let dynamo_endpoint = match std::env::var("WAKEEPER_TEST_DYNAMODB_ENDPOINT") {
            Ok(v) if !v.is_empty() => v,
            _ => panic!("WAKEEPER_TEST_DYNAMODB_ENDPOINT is not set: start it with scripts/local-servers"),
        };
        let prefix = fresh_prefix(name);
        let table = format!("{prefix}tenants");
        let tenants = Arc::new(DynamoTenantStore::new(dynamo_client_for_endpoint(&dynamo_endpoint), table));
        tenants.create_table_if_missing().await.unwrap();
        let creds: Arc<dyn CredentialStore> =
            Arc::new(FirestoreCredentialStore::new(PROJECT, dirs.cipher(), prefix.clone()).await.unwrap());
        Some(Self { tenants, creds, dynamo_endpoint, emulator, prefix })
    }

    /// What the host needs to use these stores, with its own restore and sweep off.
    fn host_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FIRESTORE_EMULATOR_HOST", self.emulator.clone()),
            ("WAKEEPER_FIRESTORE_PROJECT", PROJECT.to_string()),
            ("WAKEEPER_FIRESTORE_PREFIX", self.prefix.clone()),
            ("WAKEEPER_DYNAMODB_TABLE", self.tenants.table_name().to_string()),
            ("WAKEEPER_DYNAMODB_ENDPOINT", self.dynamo_endpoint.clone()),
            ("WAKEEPER_RESTORE_ON_START", "false".to_string()),
            ("WAKEEPER_SWEEP_INTERVAL_S", "0".to_string()),
        ]
    }

    /// Mints a paired device per tenant on the sim, stores its credentials, and sets the desired flag.
    async fn seed(&self, wa: &wa_sim::SimHandle, tenants: &[TenantId], desired: bool) {
        for id in tenants {
            self.creds.replace(id, &wa.mint_device(id), 0).await.unwrap();
            self.tenants.set_desired(id, desired).await.unwrap();
        }
    }

    async fn record(&self, id: &TenantId) -> TenantRecord {
        self.tenants.get(id).await.unwrap().expect("tenant record")
    }

    async fn records(&self, ids: &[TenantId]) -> Vec<TenantRecord> {
        let mut out = Vec::new();
        for id in ids {
            out.push(self.record(id).await);
        }
        out
    }
}

/// Keeps every alert the sweep raises.
#[derive(Default)]
struct Alerts(Mutex<Vec<AlertMessage>>);

impl Alerts {
    fn events(&self) -> Vec<AlertEvent> {
        self.0.lock().unwrap().iter().map(|m| m.event.clone()).collect()
    }
}

#[async_trait]
impl AlertSink for Alerts {
    async fn send(&self, alert: &AlertMessage) -> Result<(), AlertError> {
        self.0.lock().unwrap().push(alert.clone());
        Ok(())
    }
}

/// Time enough for anything these tests do (a Lambda passes its remaining time instead).
fn plenty() -> Duration {
    Duration::from_secs(600)
}

/// The fleet exactly as the functions build it from WAKEEPER_HOST_URLS.
fn fleet(host: &TestHost) -> HostFleet<HostClient> {
    HostFleet::from_urls(std::slice::from_ref(&host.base), TOKEN, Duration::from_secs(10)).unwrap()
}

async fn sweep(
    cloud: &Cloud,
    hosts: &HostFleet<HostClient>,
    memory: &mut SweepMemory,
    alerts: &Alerts,
    policy: &SweepPolicy,
) -> SweepReport {
    run_sweep(cloud.tenants.as_ref(), hosts, memory, alerts, policy, now_millis()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_after_a_host_restart_then_a_healthy_fleet_costs_nothing_and_an_outage_marks_nothing() {
    let dirs = Dirs::new();
    let Some(cloud) = Cloud::new("fnrestore", &dirs).await else { return };
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let fleet_ids = ids("resto", 12);
    cloud.seed(&wa, &fleet_ids, true).await;
    // Stored credentials but not desired: must stay down. Desired but nothing stored: must be marked.
    let idle = tid("resto-idle");
    cloud.seed(&wa, std::slice::from_ref(&idle), false).await;
    let ghost = tid("resto-ghost");
    cloud.tenants.set_desired(&ghost, true).await.unwrap();
    let env = cloud.host_env();
    let limits = RestoreLimits::default();

    let mut host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &env);
    host.ready().await;
    assert!(host.client.sessions().await.unwrap().sessions.is_empty(), "the host's own restore is off");
    let first =
        run_restore(cloud.tenants.as_ref(), &fleet(&host), &FanoutRequest::default(), &limits, plenty).await.unwrap();
    assert_eq!(
        (first.total, first.started, first.marked, first.failed, first.already_running, first.stopped_early),
        (13, 12, 1, 0, 0, false),
        "{first:?}"
    );
    let marked = cloud.record(&ghost).await;
    assert_eq!((marked.status, marked.whatsapp_connected), (Some(TenantStatus::CredentialsMissing), false));
    host.all_open(12, Duration::from_secs(60)).await;

    // A restart onto a wiped disk: the new host knows nothing until the restore function asks.
    let logins_before = wa.summary().logins;
    host.terminate(Duration::from_secs(30));
    dirs.wipe_data();
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &env);
    host.ready().await;
    assert!(host.client.sessions().await.unwrap().sessions.is_empty());
    let hosts = fleet(&host);
    let started = Instant::now();
    let second = run_restore(cloud.tenants.as_ref(), &hosts, &FanoutRequest::default(), &limits, plenty).await.unwrap();
    assert_eq!((second.total, second.started, second.marked, second.failed), (12, 12, 0, 0), "{second:?}");
    let list = host.all_open(12, Duration::from_secs(60)).await;
    eprintln!("restore after restart: 12 tenants open {} ms after the restore began", started.elapsed().as_millis());
    assert_eq!(list.sessions.len(), 12, "only desired tenants run");
    assert!(list.sessions.iter().all(|s| s.tenant_id != idle && s.tenant_id != ghost));
    let summary = wa.summary();
    assert!(summary.logins >= logins_before + 12, "every tenant logged in again: {summary:?}");
    assert_eq!(summary.rejected_logins, 0, "no tenant needed pairing");
    let doubled: Vec<_> =
        wa.observations().devices.into_values().filter(|d| d.max_concurrent_connections > 1).map(|d| d.jid).collect();
    assert!(doubled.is_empty(), "devices connected twice at once: {doubled:?}");
    let again = run_restore(cloud.tenants.as_ref(), &hosts, &FanoutRequest::default(), &limits, plenty).await.unwrap();
    assert_eq!((again.started, again.already_running), (0, 12), "{again:?}");

    // Sweeps over the healthy fleet. The host writes `connected` itself when a session opens (in the
    // background); whatever it has not written yet, the first sweep does. The second writes nothing.
    let alerts = Alerts::default();
    let mut memory = SweepMemory::default();
    let policy = SweepPolicy::default();
    let s1 = sweep(&cloud, &hosts, &mut memory, &alerts, &policy).await;
    assert_eq!((s1.healthy, s1.unhealthy, s1.missing_started, s1.alerts), (12, 0, 0, 0), "{s1:?}");
    assert!(s1.status_writes <= 12, "{s1:?}");
    for r in cloud.records(&fleet_ids).await {
        assert_eq!((r.status, r.whatsapp_connected), (Some(TenantStatus::Connected), true), "{r:?}");
    }
    let s2 = sweep(&cloud, &hosts, &mut memory, &alerts, &policy).await;
    assert_eq!(s2.healthy, 12);
    assert_eq!(s2.status_writes, 0, "a healthy fleet costs no writes: {s2:?}");
    assert_eq!((s2.failure_writes, s2.alerts, s2.reconnect_requested, s2.errors), (0, 0, 0, 0));
    assert!(!s2.host_restarted);

    // An outage: the host is killed. Sweeps alert and fail, and not one record changes.
    let mut everyone = fleet_ids.clone();
    everyone.extend([idle.clone(), ghost.clone()]);
    let before = cloud.records(&everyone).await;
    let mut host = host;
    host.kill9();
    for n in 1..=4 {
        let r = sweep(&cloud, &hosts, &mut memory, &alerts, &policy).await;
        assert!(r.host_unreachable, "sweep {n}: {r:?}");
        assert_eq!((r.alerts, r.status_writes, r.failure_writes, r.marked), (1, 0, 0, 0), "sweep {n}: {r:?}");
    }
    assert_eq!(cloud.records(&everyone).await, before, "an outage marked or counted something");
    let events = alerts.events();
    assert_eq!(events.len(), 4);
    assert!(events.iter().all(|e| matches!(e, AlertEvent::HostUnreachable { .. })), "{events:?}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_stuck_in_backoff_alerts_on_the_fourth_sweep_and_a_reconnect_brings_it_back() {
    let dirs = Dirs::new();
    let Some(cloud) = Cloud::new("fnstuck", &dirs).await else { return };
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let (stuck, fine) = (tid("stuck"), tid("fine"));
    cloud.seed(&wa, &[stuck.clone(), fine.clone()], true).await;
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &cloud.host_env());
    host.ready().await;
    let hosts = fleet(&host);
    let r = run_restore(cloud.tenants.as_ref(), &hosts, &FanoutRequest::default(), &RestoreLimits::default(), plenty)
        .await
        .unwrap();
    assert_eq!(r.started, 2);
    host.all_open(2, Duration::from_secs(30)).await;
    let alerts = Alerts::default();
    let mut memory = SweepMemory::default();
    let policy = SweepPolicy::default();
    let first = sweep(&cloud, &hosts, &mut memory, &alerts, &policy).await;
    assert_eq!((first.healthy, first.alerts), (2, 0), "{first:?}");

    // WhatsApp answers this device's connects with 503 from now on, and its socket drops: the session
    // reconnects, is refused, backs off, tries again, is refused again, each wait longer than the last.
    let jid = wa.device_jid(&stuck).unwrap();
    let refusal = Refusal { code: 503, point: RefusePoint::Stream, duration: Duration::from_secs(600) };
    wa.refuse_connects(&Target::device(jid.clone()), refusal).unwrap();
    assert_eq!(wa.drop_connections(&Target::device(jid.clone())), 1);
    host.wait_state(&stuck, SessionState::Backoff, Duration::from_secs(20)).await;

    for n in 1..=3u32 {
        let r = sweep(&cloud, &hosts, &mut memory, &alerts, &policy).await;
        assert_eq!((r.healthy, r.unhealthy, r.alerts, r.reconnect_requested), (1, 1, 0, 0), "sweep {n}: {r:?}");
        assert_eq!(r.status_writes, usize::from(n == 1), "`connecting` is written once: {r:?}");
        assert_eq!(cloud.record(&stuck).await.consecutive_failures, n);
    }
    let fourth = sweep(&cloud, &hosts, &mut memory, &alerts, &policy).await;
    assert_eq!(fourth.alerts, 1, "{fourth:?}");
    match alerts.events().as_slice() {
        [AlertEvent::TenantFailing { tenant_id, consecutive_failures: 4, state: Some(state), reason }] => {
            assert_eq!(tenant_id, &stuck);
            assert!(matches!(state, SessionState::Backoff | SessionState::Connecting), "{state:?}");
            // The host's last error for the session rides along (its wording is the host's).
            assert!(reason.as_deref().is_some_and(|r| !r.is_empty()), "{reason:?}");
        }
        other => panic!("expected one failing alert, got {other:?}"),
    }
    let rec = cloud.record(&stuck).await;
    assert_eq!(
        (rec.status, rec.whatsapp_connected, rec.consecutive_failures),
        (Some(TenantStatus::Connecting), true, 4),
        "a transient failure never marks the tenant"
    );

    // Wait for a long backoff (at least 4 s, half a second of it behind, 2.5 s still ahead), then let it in
    // again. The sweep finds it stuck (the limit is half a second here) and asks for a reconnect: it is open
    // again before its own backoff would have let it try.
    let client = host.client.clone();
    let waiting = wait_until(Duration::from_secs(60), "a long backoff", || {
        let (c, id) = (client.clone(), stuck.clone());
        async move {
            let v = c.session(&id).await.ok().flatten()?;
            let now = now_millis();
            let ends = v.since_ms + v.backoff_ms? as i64;
            (v.state == SessionState::Backoff
                && v.backoff_ms? >= 4_000
                && now - v.since_ms >= 600
                && ends - now >= 2_500)
                .then_some(v)
        }
    })
    .await;
    wa.clear_faults(&Target::device(jid.clone())).unwrap();
    let retry_at = waiting.since_ms + waiting.backoff_ms.unwrap() as i64;
    let eager = SweepPolicy { reconcile: Policy { stuck_after_ms: 500, ..Policy::default() }, ..policy };
    let r = sweep(&cloud, &hosts, &mut memory, &alerts, &eager).await;
    assert_eq!(r.reconnect_requested, 1, "{r:?}");
    host.wait_state(&stuck, SessionState::Open, Duration::from_secs(20)).await;
    let opened_at = now_millis();
    assert!(opened_at < retry_at, "open at {opened_at}, its backoff ended only at {retry_at}: the sweep did it");

    // Healthy again: the count is reset, a recovery alert raised, and `connected` written once (by the host on
    // opening, or by this sweep if it came first).
    let healed = sweep(&cloud, &hosts, &mut memory, &alerts, &policy).await;
    assert_eq!((healed.healthy, healed.alerts, healed.failure_writes), (2, 1, 1), "{healed:?}");
    assert!(healed.status_writes <= 1, "{healed:?}");
    assert_eq!(alerts.events().last(), Some(&AlertEvent::TenantRecovered { tenant_id: stuck.clone() }));
    let rec = cloud.record(&stuck).await;
    assert_eq!((rec.status, rec.consecutive_failures), (Some(TenantStatus::Connected), 0));
    let quiet = sweep(&cloud, &hosts, &mut memory, &alerts, &policy).await;
    assert_eq!((quiet.status_writes, quiet.failure_writes, quiet.alerts), (0, 0, 0), "{quiet:?}");
    drop(host);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_reconnects_a_half_open_session_long_before_the_keepalive_would() {
    let dirs = Dirs::new();
    let Some(cloud) = Cloud::new("fnhalf", &dirs).await else { return };
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let id = tid("half");
    cloud.seed(&wa, std::slice::from_ref(&id), true).await;
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &cloud.host_env());
    host.ready().await;
    let hosts = fleet(&host);
    run_restore(cloud.tenants.as_ref(), &hosts, &FanoutRequest::default(), &RestoreLimits::default(), plenty)
        .await
        .unwrap();
    host.wait_state(&id, SessionState::Open, Duration::from_secs(30)).await;
    let jid = wa.device_jid(&id).unwrap();
    let logins = wa.device(&jid).unwrap().logins;

    // The server goes silent but keeps the socket: the session still says `open`.
    assert_eq!(wa.half_open(&Target::device(jid.clone())), 1);
    let cut = Instant::now();
    // Production waits 120 s of silence (a healthy idle link hears a pong every 15-30 s); here 3 s.
    let policy = SweepPolicy { silent_after: Some(Duration::from_secs(3)), ..SweepPolicy::default() };
    let client = host.client.clone();
    let silent = wait_until(Duration::from_secs(20), "the session to be silent for 3 s", || {
        let (c, id) = (client.clone(), id.clone());
        async move {
            let v = c.session(&id).await.ok().flatten()?;
            (v.state == SessionState::Open && v.last_frame_ago_ms.is_some_and(|ago| ago >= 3_000)).then_some(v)
        }
    })
    .await;
    assert_eq!(silent.reconnects, 0);
    let r = sweep(&cloud, &hosts, &mut SweepMemory::default(), &Alerts::default(), &policy).await;
    assert_eq!(r.reconnect_requested, 1, "{r:?}");
    let obs = wa
        .wait_for_device(&jid, Duration::from_secs(20), |d| d.logins > logins && d.current_connections == 1)
        .await
        .expect("a new login after the sweep's reconnect");
    host.wait_state(&id, SessionState::Open, Duration::from_secs(10)).await;
    let took = cut.elapsed();
    // The engine's own keepalive needs at least 15 s of idleness plus a 20 s ping deadline.
    assert!(took < Duration::from_secs(30), "back in {took:?}: not faster than the keepalive");
    assert_eq!(obs.rejected_logins, 0);
    let view = host.client.session(&id).await.unwrap().unwrap();
    assert!(view.reconnects >= 1, "{view:?}");
    eprintln!("half-open session back {} ms after the cut", took.as_millis());
    drop(host);
    sim.shutdown().await;
}
