//! RSS per open idle session (with glibc's default arenas and with two), the session list at N real sessions,
//! and recovery after dropped sockets: single drops, then all at once.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::json;
use wakeeper_shared::domain::{SessionState, TenantId, now_millis};
use wakeeper_shared::host_api::RestoreRequest;

use crate::Bench;
use crate::fleet::copy_dir;
use crate::host_process::HostProcess;
use crate::host_settings::{default_governor, governor_label, host_wrapper};
use crate::list::time_list;
use crate::system::rss_kib;
use crate::table::{Table, percentile, sorted};

/// A host on a fresh copy of the template, its RSS with no session and with every tenant open and idle.
struct IdleRss {
    host: HostProcess,
    empty_kib: u64,
    open_kib: u64,
    /// How many tenants the restore call accepted.
    accepted: u64,
}

impl IdleRss {
    fn per_session_kib(&self, n: usize) -> f64 {
        self.open_kib.saturating_sub(self.empty_kib) as f64 / n as f64
    }

    fn describe(&self, n: usize) -> String {
        format!(
            "{:.1} KiB (host {:.1} MiB with 0, {:.1} MiB with {n} open)",
            self.per_session_kib(n),
            self.empty_kib as f64 / 1024.0,
            self.open_kib as f64 / 1024.0
        )
    }
}

/// Starts a host in `run` with `env` (restore on start off), reads its RSS, restores every tenant, and reads it
/// again once they are open and idle.
async fn idle_rss(bench: &Bench, run: &str, env: &[(&str, String)]) -> anyhow::Result<IdleRss> {
    let root = bench.scratch.join(run);
    copy_dir(&bench.embedded_template, &root)?;
    let host = HostProcess::spawn(&bench.host_bin, &root.join("data"), &bench.sim.ws_url, env, root.join("host.log"))?;
    host.ready().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let empty_kib = rss_kib(host.pid());
    let restored = host.client.restore(&RestoreRequest::default()).await?;
    host.all_open(bench.tenants(), Duration::from_secs(180)).await?;
    // Idle: let the connect-time work (and allocator caches) settle before measuring.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let open_kib = rss_kib(host.pid());
    Ok(IdleRss { host, empty_kib, open_kib, accepted: restored.accepted })
}

pub async fn bench_rss_and_recovery(bench: &Bench, t: &mut Table) -> anyhow::Result<()> {
    let n = bench.tenants();
    println!("== RSS per open idle session and recovery after drops ({n} tenants, governor defaults)");
    let env = vec![("WAKEEPER_RESTORE_ON_START", "false".to_string())];
    let rss = idle_rss(bench, "rss", &env).await?;
    ensure!(rss.accepted as usize == n, "restore accepted {} of {n}", rss.accepted);
    let per = rss.per_session_kib(n);
    t.row(&format!("RSS per open idle session at {n}"), rss.describe(n), "<= 100 KiB", Some(per <= 100.0));
    t.raw("rss", json!({ "empty_kib": rss.empty_kib, "open_kib": rss.open_kib, "per_session_kib": per }));
    let mut host = rss.host;
    if host_wrapper().is_some() {
        // A profiling run: the wrapper records what is live now.
        let _ = Command::new("kill").arg("-KILL").arg(host.pid().to_string()).status();
        host.terminate();
        t.note("host run under --host-wrapper: killed after the RSS reading, nothing else measured".into());
        return Ok(());
    }

    // The real list at n sessions.
    let (lat, bytes) = time_list(&host.base, 30).await?;
    t.row(
        &format!("GET /v1/sessions at {n} real sessions"),
        format!("p50 {:.1} ms, p99 {:.1} ms, {} KiB", percentile(&lat, 50.0), percentile(&lat, 99.0), bytes / 1024),
        "",
        None,
    );
    single_drops(bench, t, &host).await?;
    all_dropped_at_once(bench, t, &host).await?;
    host.terminate();

    // The same figure with glibc limited to two malloc arenas (what a container could set): how much of the
    // per-session RSS is allocator arenas rather than live data.
    let env = vec![("WAKEEPER_RESTORE_ON_START", "false".to_string()), ("MALLOC_ARENA_MAX", "2".to_string())];
    let arenas = idle_rss(bench, "rss-arenas", &env).await?;
    let per = arenas.per_session_kib(n);
    t.row(&format!("RSS per open idle session at {n}, MALLOC_ARENA_MAX=2"), arenas.describe(n), "", None);
    t.raw("rss-arenas", json!({ "empty_kib": arenas.empty_kib, "open_kib": arenas.open_kib, "per_session_kib": per }));
    let mut host = arenas.host;
    host.terminate();
    Ok(())
}

/// Drops one device's socket at a time and times each back to `open`.
async fn single_drops(bench: &Bench, t: &mut Table, host: &HostProcess) -> anyhow::Result<()> {
    let n = bench.tenants();
    let samples = bench.args.single_drops;
    let list = host.client.sessions().await?;
    let jid_of: HashMap<&TenantId, &String> = bench.fleet.ids.iter().zip(&bench.fleet.jids).collect();
    let mut single = Vec::new();
    for s in list.sessions.iter().step_by((n / samples.max(1)).max(1)).take(samples) {
        let jid = jid_of.get(&s.tenant_id).context("jid of tenant")?;
        let dropped_at = now_millis();
        let hit = bench.sim.call(reqwest::Method::POST, &format!("/v1/faults/drop?device={jid}"), None).await?;
        ensure!(hit["connections"] == 1, "drop hit {hit}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = host.client.session(&s.tenant_id).await?
                && v.state == SessionState::Open
                && v.connected_since_ms.is_some_and(|c| c >= dropped_at)
            {
                single.push((v.connected_since_ms.expect("checked") - dropped_at) as f64 / 1000.0);
                break;
            }
            ensure!(Instant::now() < deadline, "{} did not come back within 60 s", s.tenant_id);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let single = sorted(single);
    let (p50, p99) = (percentile(&single, 50.0), percentile(&single, 99.0));
    t.row(
        &format!("Dropped socket -> open, single drops ({} samples)", single.len()),
        format!("p50 {:.2} s, p99 {:.2} s", p50, p99),
        "p50 <= 1.5 s, p99 <= 10 s",
        Some(p50 <= 1.5 && p99 <= 10.0),
    );
    t.raw("recovery-single", json!({ "seconds": single }));
    Ok(())
}

/// Drops every socket at once and times each session back to `open` (governor defaults).
async fn all_dropped_at_once(bench: &Bench, t: &mut Table, host: &HostProcess) -> anyhow::Result<()> {
    let n = bench.tenants();
    let before = bench.sim.attempts_per_second().await?.len();
    let dropped_at = now_millis();
    let hit = bench.sim.call(reqwest::Method::POST, "/v1/faults/drop", None).await?;
    ensure!(hit["connections"].as_u64() == Some(n as u64), "drop hit {hit}");
    let deadline = Instant::now() + Duration::from_secs(180);
    let all = loop {
        let l = host.client.sessions().await?;
        let back: Vec<f64> = l
            .sessions
            .iter()
            .filter(|s| s.state == SessionState::Open && s.connected_since_ms.is_some_and(|c| c >= dropped_at))
            .map(|s| (s.connected_since_ms.expect("filtered") - dropped_at) as f64 / 1000.0)
            .collect();
        if back.len() >= n {
            break sorted(back);
        }
        ensure!(Instant::now() < deadline, "only {}/{n} back after 180 s", back.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let peak = bench.sim.peak_attempts_since(before).await?;
    let (p50, p99) = (percentile(&all, 50.0), percentile(&all, 99.0));
    t.row(
        &format!("Dropped socket -> open, all {n} at once, governor defaults"),
        format!(
            "p50 {:.2} s, p99 {:.2} s, last {:.2} s; peak {peak} connects/s (governor {})",
            p50,
            p99,
            all[all.len() - 1],
            governor_label(default_governor())
        ),
        "p50 <= 1.5 s, p99 <= 10 s",
        Some(p50 <= 1.5 && p99 <= 10.0),
    );
    let g = default_governor();
    let bound = ((n as f64 / 2.0) - f64::from(g.burst)).max(0.0) / g.rate_per_sec.max(f64::MIN_POSITIVE);
    if p50 > 1.5 && bound > 0.0 && g.rate_per_sec > 0.0 {
        t.note(format!(
            "all-at-once p50 is bounded by the governor: the median tenant of {n} gets its connect token after \
             (n/2 - burst)/rate = {bound:.2} s ({})",
            governor_label(g)
        ));
    }
    t.raw("recovery-all", json!({ "p50": p50, "p99": p99, "max": all[all.len() - 1], "peak_attempts_per_s": peak }));
    Ok(())
}
