//! `GET /v1/sessions` at many sessions of an in-process host, and the sweep's decision over a healthy fleet
//! of the same size; the list timing the RSS section reuses at N real sessions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::ensure;
use async_trait::async_trait;
use serde_json::json;
use socket_host::api::AppState;
use socket_host::governor::{Governor, GovernorConfig};
use socket_host::host::Host;
use socket_host::session::{EngineProvider, OpenError, SessionConfig};
use wakeeper_shared::domain::reconcile::{self, Action, HostView, Policy};
use wakeeper_shared::domain::{
    Lease, SessionList, SessionState, SessionView, StatusUpdate, TenantId, TenantRecord, TenantStatus, UnixMillis,
    now_millis,
};
use wakeeper_shared::ports::{Page, StoreError, TenantStore};
use whatsapp_rust::store::traits::Backend;

use crate::table::{Table, percentile, sorted};
use crate::{Bench, TOKEN};

/// Times `GET /v1/sessions` `rounds` times; returns sorted latencies (ms) and the body size.
pub async fn time_list(base: &str, rounds: usize) -> anyhow::Result<(Vec<f64>, usize)> {
    let http = wakeeper_shared::tls::http_client().timeout(Duration::from_secs(30)).build()?;
    let mut lat = Vec::with_capacity(rounds);
    let mut bytes = 0;
    for _ in 0..rounds + 2 {
        let started = Instant::now();
        let res = http.get(format!("{base}/v1/sessions")).bearer_auth(TOKEN).send().await?;
        ensure!(res.status().is_success(), "GET /v1/sessions: {}", res.status());
        let body = res.bytes().await?;
        lat.push(started.elapsed().as_secs_f64() * 1000.0);
        bytes = body.len();
    }
    // The first two warm the connection pool.
    Ok((sorted(lat[2..].to_vec()), bytes))
}

/// A tenant table in memory: every lease granted (the figure is about listing, not about the store).
#[derive(Default)]
struct MemoryTenants {
    records: Mutex<HashMap<TenantId, TenantRecord>>,
}

#[async_trait]
impl TenantStore for MemoryTenants {
    async fn list_desired(&self, _token: Option<String>, _limit: usize) -> Result<Page<TenantRecord>, StoreError> {
        let items = self.records.lock().expect("lock").values().filter(|r| r.whatsapp_connected).cloned().collect();
        Ok(Page { items, next: None })
    }
    async fn get(&self, tenant: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        Ok(self.records.lock().expect("lock").get(tenant).cloned())
    }
    async fn set_desired(&self, tenant: &TenantId, desired: bool) -> Result<(), StoreError> {
        let mut r = self.records.lock().expect("lock");
        r.entry(tenant.clone()).or_insert_with(|| TenantRecord::desired(tenant.clone())).whatsapp_connected = desired;
        Ok(())
    }
    async fn write_status(&self, _t: &TenantId, _u: &StatusUpdate, _now: UnixMillis) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn write_status_as_holder(
        &self,
        _t: &TenantId,
        _holder: &Lease,
        _u: &StatusUpdate,
        _now: UnixMillis,
    ) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn record_failure(&self, _t: &TenantId) -> Result<u32, StoreError> {
        Ok(1)
    }
    async fn reset_failures(&self, _t: &TenantId, _now: UnixMillis) -> Result<bool, StoreError> {
        Ok(false)
    }
    async fn acquire_lease(
        &self,
        _t: &TenantId,
        owner: &str,
        _stale: Option<&Lease>,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<Lease, StoreError> {
        Ok(Lease { owner: owner.into(), epoch: 1, version: 1, expires_at: now + ttl_ms as i64 })
    }
    async fn renew_lease(
        &self,
        _t: &TenantId,
        lease: &Lease,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<Lease, StoreError> {
        Ok(Lease { version: lease.version + 1, expires_at: now + ttl_ms as i64, ..lease.clone() })
    }
    async fn release_lease(&self, _t: &TenantId, _lease: &Lease) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Empty in-memory engine stores: the sessions never get past the governor (see [`list_in_process`]).
struct IdleEngines;

#[async_trait]
impl EngineProvider for IdleEngines {
    async fn open(&self, _tenant: &TenantId, _epoch: u64) -> Result<Arc<dyn Backend>, OpenError> {
        Ok(Arc::new(whatsapp_rust::wacore::store::InMemoryBackend::new()))
    }
    async fn delete(&self, _tenant: &TenantId, _epoch: u64) -> Result<(), OpenError> {
        Ok(())
    }
}

pub async fn bench_list(bench: &Bench, t: &mut Table) -> anyhow::Result<()> {
    let m = bench.args.sessions;
    println!("== GET /v1/sessions and the sweep decision at {m} sessions (in process)");
    let ids: Vec<TenantId> = (0..m).map(|i| TenantId::parse(&format!("tenant-{i:06}")).expect("valid")).collect();
    list_in_process(t, &ids).await?;
    sweep_decision(t, &ids)
}

/// Times the list of an in-process host holding a session for each of `ids`.
async fn list_in_process(t: &mut Table, ids: &[TenantId]) -> anyhow::Result<()> {
    let m = ids.len();
    // A governor that hands out one token a day: every session waits in `connecting`, costing no CPU while the
    // list is timed. The list's size per session is the same in any state (an open session carries two more
    // numbers, ~30 bytes).
    let governor = Arc::new(Governor::new(GovernorConfig { rate_per_sec: 1.0 / 86_400.0, burst: 1, max_in_flight: 1 }));
    let tenants = Arc::new(MemoryTenants::default());
    let host = Host::new(
        tenants.clone(),
        Arc::new(IdleEngines),
        governor,
        SessionConfig::new("ws://127.0.0.1:9/ws/chat", "bench-list-host"),
    );
    for id in ids {
        tenants.set_desired(id, true).await?;
        host.ensure(id).await.map_err(|e| anyhow::anyhow!("ensure: {e}"))?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let state = Arc::new(AppState::new(host.clone(), TOKEN.into()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(socket_host::run(listener, state, async move {
        let _ = stop_rx.await;
    }));
    let (lat, bytes) = time_list(&base, 50).await?;
    let p99 = percentile(&lat, 99.0);
    t.row(
        &format!("GET /v1/sessions at {m} sessions"),
        format!("p50 {:.1} ms, p99 {p99:.1} ms, {:.2} MiB", percentile(&lat, 50.0), bytes as f64 / 1048576.0),
        "<= 100 ms",
        Some(p99 <= 100.0),
    );
    t.raw("list-10k", json!({ "latency_ms": lat, "bytes": bytes }));
    let _ = stop_tx.send(());
    let _ = server.await;
    let stopping = std::time::Instant::now();
    host.shutdown(Duration::from_secs(10)).await;
    tracing::debug!(took_ms = stopping.elapsed().as_millis() as u64, "list host stopped");
    Ok(())
}

/// The sweep's decision over a healthy fleet of `ids`: every tenant desired, connected and open.
fn sweep_decision(t: &mut Table, ids: &[TenantId]) -> anyhow::Result<()> {
    let m = ids.len();
    let now = now_millis();
    let records: Vec<TenantRecord> = ids
        .iter()
        .map(|id| {
            let mut r = TenantRecord::desired(id.clone());
            r.status = Some(TenantStatus::Connected);
            r.last_healthy_at = Some(now - 60_000);
            r
        })
        .collect();
    let list = SessionList::new("bench", ids.iter().map(|id| open_view(id, now)).collect());
    // The sweep receives the list as JSON: decode it as part of the decision.
    let wire = serde_json::to_vec(&list)?;
    let mut times = Vec::new();
    let mut writes = usize::MAX;
    for _ in 0..20 {
        let started = Instant::now();
        let decoded: SessionList = serde_json::from_slice(&wire)?;
        let plan = reconcile::reconcile(&records, HostView::Reachable(&decoded), Some("bench"), now, Policy::default());
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        writes = plan.count(|a| {
            matches!(
                a,
                Action::WriteStatus(..) | Action::RecordFailure(_) | Action::ResetFailures(_) | Action::Ensure(_)
            )
        });
        ensure!(plan.healthy == m, "healthy {} of {m}", plan.healthy);
    }
    let times = sorted(times);
    let p50 = percentile(&times, 50.0);
    t.row(
        &format!("Sweep decision for {m} sessions (decode list + reconcile)"),
        format!("p50 {p50:.1} ms, max {:.1} ms", times[times.len() - 1]),
        "<= 50 ms",
        Some(p50 <= 50.0),
    );
    t.row(
        &format!("Tenant-store writes by a sweep over a healthy fleet of {m}"),
        writes.to_string(),
        "0",
        Some(writes == 0),
    );
    t.raw("sweep", json!({ "ms": times, "writes": writes }));
    Ok(())
}

/// A session open for an hour, as the host lists it.
fn open_view(id: &TenantId, now: UnixMillis) -> SessionView {
    SessionView {
        tenant_id: id.clone(),
        state: SessionState::Open,
        since_ms: now - 3_600_000,
        connected_since_ms: Some(now - 3_600_000),
        last_frame_ago_ms: Some(1200),
        reconnects: 0,
        consecutive_failures: 0,
        backoff_ms: None,
        last_error: None,
        lease: None,
    }
}
