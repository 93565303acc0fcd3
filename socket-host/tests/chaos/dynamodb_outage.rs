//! Scenario 5: DynamoDB unreachable from the middle of a health sweep on, while half the fleet is refused by the
//! server: tenants wrongly marked, time to a clean sweep after recovery, statuses and failure counts left wrong.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;
use wa_sim::{Refusal, RefusePoint, Target};
use wakeeper_shared::adapters::dynamodb::{DynamoTenantStore, dynamo_client_for_endpoint};
use wakeeper_shared::alerts::{AlertError, AlertMessage, AlertSink};
use wakeeper_shared::domain::reconcile::Policy;
use wakeeper_shared::domain::{SessionState, TenantId, TenantStatus, now_millis};
use wakeeper_shared::fleet::HostFleet;
use wakeeper_shared::ports::TenantStore;
use wakeeper_shared::sweep::{SweepError, SweepMemory, SweepPolicy, SweepReport, run_sweep};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

use super::*;

/// An alert sink that only counts (the sweep's alerts are reported, not asserted).
#[derive(Default)]
struct CountingAlerts(AtomicU64);

#[async_trait::async_trait]
impl AlertSink for CountingAlerts {
    async fn send(&self, _alert: &AlertMessage) -> Result<(), AlertError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_outage_during_sweeps_marks_nobody() {
    let settings = Settings::from_env();
    let limit = Duration::from_secs(240) + settings.outage * 2;
    tokio::time::timeout(limit, dynamodb_outage(&settings)).await.expect("chaos scenario timed out");
}

/// The health sweep (the Lambda function's `run_sweep`, in-process, over the control API) while DynamoDB goes
/// away in the middle of a sweep and stays away: the host's own tenant-table writes and the sweep's go through
/// one switchable path. Half the fleet is refused by the server meanwhile, so the sweeps have statuses,
/// failure counts and reconnects to write.
async fn dynamodb_outage(settings: &Settings) {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let Some(stores) = CloudStores::fresh("chaosddb", dirs.cipher()).await else { return };
    let endpoint = dynamodb_endpoint().expect("set when the stores are");
    let ids: Vec<TenantId> = (0..20).map(|i| tid(&format!("sweep-{i:02}"))).collect();
    stores.seed(&wa, &ids).await;
    let proxy = StoreProxy::start(endpoint.trim_start_matches("http://").trim_end_matches('/').to_string()).await;
    let proxied = format!("http://{}", proxy.addr);
    let mut env = stores.host_env(&[("WAKEEPER_SWEEP_INTERVAL_S", "0".to_string())]);
    for (k, v) in env.iter_mut() {
        if *k == "WAKEEPER_DYNAMODB_ENDPOINT" {
            *v = proxied.clone();
        }
    }
    let mut host = ChaosHost::spawn(&dirs, &wa.url(), "host-a", &env);
    host.ready().await;
    assert_eq!(wait_open(&host, &ids, Duration::from_secs(60)).await, 0, "set-up: every tenant open");
    let table = DynamoTenantStore::new(dynamo_client_for_endpoint(&proxied), stores.tenants.table_name().to_string());
    let hosts = HostFleet::from_urls(std::slice::from_ref(&host.base), TOKEN, Duration::from_secs(10)).unwrap();
    // Eager: a session in backoff for 2 s is asked to reconnect, so the sweeps during the outage act.
    let policy = SweepPolicy { reconcile: Policy { stuck_after_ms: 2000, ..Policy::default() }, ..Default::default() };
    let alerts = CountingAlerts::default();
    let mut memory = SweepMemory::default();
    let mut c = Counts::default();
    let first = run_sweep(&table, &hosts, &mut memory, &alerts, &policy, now_millis()).await.expect("set-up sweep");
    assert_eq!((first.healthy, first.unhealthy), (ids.len(), 0), "set-up: a healthy fleet: {first:?}");

    // Half the fleet refused (503) for the outage and 5 s more, and dropped.
    let troubled = &ids[..ids.len() / 2];
    for id in troubled {
        let jid = wa.device_jid(id).unwrap();
        let refusal =
            Refusal { code: 503, point: RefusePoint::Upgrade, duration: settings.outage + Duration::from_secs(5) };
        wa.refuse_connects(&Target::device(jid.clone()), refusal).unwrap();
        wa.drop_connections(&Target::device(jid));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let s = states(&host).await;
        if troubled.iter().all(|id| s.get(id).is_some_and(|st| *st != SessionState::Open)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut wrongly_marked: BTreeSet<TenantId> = BTreeSet::new();
    // The cut: DynamoDB goes away 0-150 ms into a sweep, while it reads the table or writes statuses.
    let cut_after = random_ms(150);
    let (cut_sweep, ()) = tokio::join!(run_sweep(&table, &hosts, &mut memory, &alerts, &policy, now_millis()), async {
        tokio::time::sleep(Duration::from_millis(cut_after)).await;
        proxy.set_up(false);
    });
    let down_at = Instant::now();
    let (mut sweeps, mut failed, mut write_errors) = (1u64, 0u64, 0u64);
    let mut tally = |r: &Result<SweepReport, SweepError>| match r {
        Ok(report) => write_errors += report.errors as u64,
        Err(_) => failed += 1,
    };
    tally(&cut_sweep);
    while down_at.elapsed() < settings.outage {
        wrongly_marked.extend(terminal_in(&states(&host).await));
        let r = run_sweep(&table, &hosts, &mut memory, &alerts, &policy, now_millis()).await;
        sweeps += 1;
        tally(&r);
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    proxy.set_up(true);
    let up_at = Instant::now();
    // Sweeps every second until one finds every tenant open and writes nothing it could not.
    let mut clean = None;
    let mut after = 0u64;
    while up_at.elapsed() < Duration::from_secs(120) {
        wrongly_marked.extend(terminal_in(&states(&host).await));
        let r = run_sweep(&table, &hosts, &mut memory, &alerts, &policy, now_millis()).await;
        after += 1;
        if let Ok(report) = &r
            && report.healthy == ids.len()
            && report.unhealthy == 0
            && report.errors == 0
        {
            clean = Some(up_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let steady = run_sweep(&table, &hosts, &mut memory, &alerts, &policy, now_millis()).await;
    let not_open = wait_open(&host, &ids, Duration::from_secs(5)).await;
    let (mut not_connected, mut failures_left) = (0u64, 0u64);
    for id in &ids {
        let rec = stores.tenants.get(id).await.unwrap().expect("the tenant's record");
        if !rec.whatsapp_connected || rec.status.is_some_and(|s| s.is_terminal()) {
            wrongly_marked.insert(id.clone());
        }
        if rec.status != Some(TenantStatus::Connected) {
            not_connected += 1;
        }
        if rec.consecutive_failures > 0 {
            failures_left += 1;
        }
    }
    host.terminate(Duration::from_secs(30));
    c.info(
        &format!("sweeps while DynamoDB was unreachable ({:?}, cut {cut_after} ms into the first)", settings.outage),
        sweeps,
    );
    c.info("of which failed reading the table (nothing acted on)", failed);
    c.info("writes that failed within the other sweeps (counted as errors, nothing marked)", write_errors);
    c.zero(
        "tenants wrongly marked (a terminal state seen, or marked disconnected in the table)",
        wrongly_marked.len() as u64,
    );
    c.zero("tenants not open after DynamoDB and the server came back", not_open as u64);
    c.bound(
        "time from DynamoDB's return to a sweep with every tenant open and no error",
        clean.map_or("never (120 s)".to_string(), |d| format!("{:.2} s ({after} sweeps)", d.as_secs_f64())),
        clean.is_some(),
    );
    c.zero(
        "status writes by the sweep after that (a healthy fleet costs none)",
        steady.as_ref().map_or(u64::MAX, |r| r.status_writes as u64),
    );
    c.zero("tenants whose stored status is not `connected` at the end", not_connected);
    c.zero("tenants whose failure count was not reset at the end", failures_left);
    c.info("alerts raised by the sweeps (failing, then recovered)", alerts.0.load(Ordering::Relaxed));
    c.zero("devices connected twice at once", doubled(&wa));
    explain_doubles(&wa, &ids, std::slice::from_ref(&host.log));
    sim.shutdown().await;
    c.finish(&format!(
        "DynamoDB unreachable during sweeps, {} of {} tenants refused meanwhile",
        troubled.len(),
        ids.len()
    ));
}
