//! Replication lag to the Firestore emulator under steady record churn at N tenants, and commits per tenant
//! per batching window.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::ensure;
use serde_json::json;
use socket_host::engine_store::EngineStore;
use socket_host::replicator::{CommitInfo, Replicator, ReplicatorConfig, ReplicatorHandle};
use wakeeper_shared::adapters::firestore::FirestoreCredentialStore;
use wakeeper_shared::crypto::{Cipher, KeySource, LocalKeyFile};
use wakeeper_shared::domain::TenantId;
use wakeeper_shared::local::WorkingCopy;
use wakeeper_shared::ports::CredentialStore;
use whatsapp_rust::wacore::store::traits::SignalStore;

use crate::system::random_hex;
use crate::table::{Table, percentile, sorted};
use crate::{Bench, FIRESTORE_PROJECT};

/// What the churn did: engine writes made, writes that started late, and how long it ran.
struct Churn {
    writes: u64,
    late: u64,
    elapsed: Duration,
}

pub async fn bench_replication(bench: &Bench, t: &mut Table) -> anyhow::Result<()> {
    let n = bench.tenants();
    if bench.firestore.is_none() {
        t.row("Replication lag", "not measured (FIRESTORE_EMULATOR_HOST unset)".into(), "p99 <= 1 s", None);
        return Ok(());
    }
    let rate = bench.args.churn_rate;
    let secs = bench.args.churn_seconds;
    println!("== replication lag to the Firestore emulator: {n} tenants, {rate} changes/tenant/s for {secs} s");
    let root = bench.scratch.join("replication");
    std::fs::create_dir_all(&root)?;
    let cipher = Cipher::new(&LocalKeyFile::new(root.join("data.key")).data_key()?);
    let prefix = format!("benchrep{}_", random_hex(4));
    let store = Arc::new(FirestoreCredentialStore::new(FIRESTORE_PROJECT, cipher.clone(), prefix).await?);
    let commits: Arc<Mutex<Vec<CommitInfo>>> = Arc::default();
    let seen = commits.clone();
    let config = ReplicatorConfig {
        on_commit: Some(Arc::new(move |c: &CommitInfo| seen.lock().expect("lock").push(c.clone()))),
        ..Default::default()
    };
    let window = config.window;
    let replicator = Replicator::start(store.clone(), config);
    let engines = open_engines(bench, &store, &replicator.handle(), &root, &cipher).await?;
    let started = tokio::time::Instant::now();
    let churn = churn(&engines, rate, started, Duration::from_secs(secs)).await?;
    let report = replicator.flush(tokio::time::Instant::now() + Duration::from_secs(60)).await;
    ensure!(report.is_complete(), "replication flush left {report:?}");
    // What the store has equals what the engines hold locally.
    for (i, id) in bench.fleet.ids.iter().enumerate().step_by(97) {
        let remote = store.generation(id).await?.unwrap_or(0);
        let local = WorkingCopy::open(&root, id.clone(), cipher.clone())?.generation().unwrap_or(0);
        ensure!(remote == local, "tenant {i}: store at {remote}, local at {local}");
    }
    let commits = commits.lock().expect("lock").clone();
    let steady: Vec<&CommitInfo> = commits.iter().filter(|c| c.started < started + Duration::from_secs(secs)).collect();
    report_lag(bench, t, &steady, window, &churn);
    Ok(())
}

/// Stores every tenant's snapshot remotely and in a working copy under `root`, and opens its engine store
/// attached to the replicator.
async fn open_engines(
    bench: &Bench,
    store: &Arc<FirestoreCredentialStore>,
    handle: &ReplicatorHandle,
    root: &Path,
    cipher: &Cipher,
) -> anyhow::Result<Vec<Arc<EngineStore>>> {
    let mut engines = Vec::with_capacity(bench.tenants());
    for (id, snap) in bench.fleet.ids.iter().zip(&bench.fleet.snapshots) {
        store.replace(id, snap, 1).await?;
        let (data, id2, c2, s2) = (root.to_path_buf(), id.clone(), cipher.clone(), snap.clone());
        let wc = tokio::task::spawn_blocking(move || -> anyhow::Result<WorkingCopy> {
            let mut wc = WorkingCopy::open(&data, id2, c2)?;
            wc.write_base(&s2)?;
            Ok(wc)
        })
        .await??;
        engines.push(EngineStore::open(wc, handle.attach(id.clone(), 1))?);
    }
    Ok(engines)
}

/// Every engine writes a session record `rate` times a second for `length`, spread evenly over the period.
async fn churn(
    engines: &[Arc<EngineStore>],
    rate: f64,
    started: tokio::time::Instant,
    length: Duration,
) -> anyhow::Result<Churn> {
    let n = engines.len();
    let period = Duration::from_secs_f64(1.0 / rate);
    let until = started + length;
    let late = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = engines
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let e = e.clone();
            let late = late.clone();
            tokio::spawn(async move {
                let mut next = started + period.mul_f64(i as f64 / n as f64);
                let mut k = 0u32;
                while next < until {
                    tokio::time::sleep_until(next).await;
                    let value = vec![(k % 251) as u8; 200];
                    e.put_session(&format!("55119{:07}@c.us.0", k % 8), &value).await.expect("engine write");
                    k += 1;
                    next += period;
                    if tokio::time::Instant::now() > next {
                        late.fetch_add(1, Ordering::Relaxed);
                    }
                }
                k
            })
        })
        .collect();
    let mut writes = 0u64;
    for task in tasks {
        writes += u64::from(task.await?);
    }
    Ok(Churn { writes, late: late.load(Ordering::Relaxed), elapsed: started.elapsed() })
}

/// The lag and window figures from the commits that started during the churn.
fn report_lag(bench: &Bench, t: &mut Table, steady: &[&CommitInfo], window: Duration, churn: &Churn) {
    let n = bench.tenants();
    let (rate, secs) = (bench.args.churn_rate, bench.args.churn_seconds);
    let lags = sorted(steady.iter().map(|c| c.lag.as_secs_f64()).collect());
    let mut per_tenant: HashMap<&TenantId, Vec<tokio::time::Instant>> = HashMap::new();
    for c in steady {
        per_tenant.entry(&c.tenant).or_default().push(c.started);
    }
    let mut violations = 0;
    for starts in per_tenant.values_mut() {
        starts.sort();
        violations += starts.windows(2).filter(|w| w[1] - w[0] < window - Duration::from_millis(5)).count();
    }
    let commits_per_s = steady.len() as f64 / secs as f64;
    let (p50, p99) = (percentile(&lags, 50.0), percentile(&lags, 99.0));
    let writes = churn.writes;
    t.row(
        &format!("Replication lag to Firestore emulator, {n} tenants, {rate} change/tenant/s"),
        format!(
            "p50 {:.0} ms, p99 {:.0} ms; {commits_per_s:.0} commits/s ({:.2} writes/commit, {writes} engine writes in {:.1} s)",
            p50 * 1000.0,
            p99 * 1000.0,
            steady.iter().map(|c| c.writes).sum::<usize>() as f64 / steady.len().max(1) as f64,
            churn.elapsed.as_secs_f64()
        ),
        "p99 <= 1 s",
        Some(p99 <= 1.0),
    );
    t.row(
        &format!("Commits per tenant per {} ms window (pairs closer than the window)", window.as_millis()),
        format!("at most 1 ({violations} violations in {} commits)", steady.len()),
        "<= 1",
        Some(violations == 0),
    );
    if churn.late > 0 {
        t.note(format!(
            "replication churn: {} engine writes started late (the machine could not keep the schedule)",
            churn.late
        ));
    }
    t.raw(
        "replication",
        json!({ "p50_s": p50, "p99_s": p99, "commits": steady.len(), "violations": violations, "writes": writes }),
    );
}
