//! What the multi-host scenarios share: several real hosts over the cloud stores (each keeps its directories
//! and environment across restarts), SIGSTOP/SIGCONT, a wall clock moved by libfaketime, polls that tally
//! what every running host reports, and the end-of-run figures read from outside (the tenant table, the
//! credential store's fence, the hosts' metrics).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tokio::time::Instant;
use wakeeper_shared::domain::{SessionState, TenantId};
use wakeeper_shared::ports::TenantStore;
use wakeeper_testkit::*;

use super::*;

/// Lease lifetime of the fleet scenarios (as in the two-host scenario): short, so a takeover takes seconds, and
/// long enough that a renewal every third of it keeps up on two busy cores.
pub(super) const LEASE_TTL_S: u64 = 6;

/// How often each fleet host runs its own health sweep (the one-machine deployment's; the default is two
/// minutes, longer than a short scenario): whatever it marks counts like any other mark.
const SWEEP_INTERVAL_S: u64 = 5;

/// The environment of every fleet host over `stores`: the short lease and the frequent sweep.
pub(super) fn fleet_env(stores: &CloudStores) -> Vec<(&'static str, String)> {
    stores.host_env(&[
        ("WAKEEPER_LEASE_TTL_S", LEASE_TTL_S.to_string()),
        ("WAKEEPER_SWEEP_INTERVAL_S", SWEEP_INTERVAL_S.to_string()),
    ])
}

/// One host of a fleet: its directories and environment survive restarts, the process comes and goes.
pub(super) struct Member {
    pub name: &'static str,
    pub dirs: Dirs,
    env: Vec<(&'static str, String)>,
    wa_url: String,
    pub host: ChaosHost,
    pub paused: bool,
    /// Every log this host wrote, one per start.
    pub logs: Vec<PathBuf>,
    /// The host's counters summed over its lives (read before each stop or kill).
    pub metrics: BTreeMap<String, f64>,
}

impl Member {
    /// Starts `name` (also its host id) with `env`; not yet ready.
    pub fn start(name: &'static str, dirs: Dirs, wa_url: &str, env: Vec<(&'static str, String)>) -> Self {
        let host = ChaosHost::spawn(&dirs, wa_url, name, &env);
        let logs = vec![host.log.clone()];
        Self { name, dirs, env, wa_url: wa_url.to_string(), host, paused: false, logs, metrics: BTreeMap::new() }
    }

    /// Starts the host again (after [`Member::kill`] or [`Member::stop`]) and waits until it answers.
    pub async fn restart(&mut self) {
        self.host = ChaosHost::spawn(&self.dirs, &self.wa_url, self.name, &self.env);
        self.logs.push(self.host.log.clone());
        self.paused = false;
        self.host.ready().await;
    }

    /// SIGKILL (its counters read first, unless it is paused and cannot answer).
    pub async fn kill(&mut self) {
        if !self.paused {
            self.harvest().await;
        }
        self.host.kill9();
        self.paused = false;
    }

    /// SIGTERM and a graceful exit (resumed first if paused).
    pub async fn stop(&mut self) {
        if self.paused {
            self.resume();
        }
        self.harvest().await;
        self.host.terminate(Duration::from_secs(40));
    }

    pub fn pause(&mut self) {
        self.signal("-STOP");
        self.paused = true;
    }

    pub fn resume(&mut self) {
        self.signal("-CONT");
        self.paused = false;
    }

    fn signal(&self, sig: &str) {
        let pid = self.host.pid().expect("the host runs");
        let status = Command::new("kill").arg(sig).arg(pid.to_string()).status().unwrap();
        assert!(status.success(), "kill {sig} {pid}");
    }

    /// Adds the host's counters (`/metrics`) to [`Member::metrics`].
    async fn harvest(&mut self) {
        let Ok(text) = metrics_text(&self.host.base).await else { return };
        for (name, value) in parse_counters(&text) {
            *self.metrics.entry(name).or_default() += value;
        }
    }

    /// Sessions by state, empty when the host is paused or down (a paused host would only time out).
    pub async fn states(&self) -> BTreeMap<TenantId, SessionState> {
        if self.paused { BTreeMap::new() } else { states(&self.host).await }
    }
}

async fn metrics_text(base: &str) -> Result<String, reqwest::Error> {
    let client = wakeeper_shared::tls::http_client().timeout(Duration::from_secs(5)).build()?;
    client.get(format!("{base}/metrics")).bearer_auth(TOKEN).send().await?.error_for_status()?.text().await
}

/// Counter totals by metric name from a Prometheus text page (labels summed over).
fn parse_counters(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("wakeeper_")) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
            && name.ends_with("_total")
        {
            *out.entry(name.to_string()).or_default() += v;
        }
    }
    out
}

/// The counters of every member summed, for the count table.
pub(super) fn fleet_metrics(members: &[Member]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for m in members {
        for (k, v) in &m.metrics {
            *out.entry(k.clone()).or_default() += v;
        }
    }
    out
}

/// Reports the lease and fencing counters of the fleet as figures (not asserted: losing a lease to a
/// takeover is what the scenarios cause).
pub(super) fn report_metrics(c: &mut Counts, members: &[Member]) {
    let m = fleet_metrics(members);
    for name in [
        "wakeeper_lease_losses_total",
        "wakeeper_marks_skipped_not_holder_total",
        "wakeeper_replication_fenced_total",
        "wakeeper_lease_renewals_total",
    ] {
        c.info(&format!("(metrics, all hosts) {name}"), m.get(name).copied().unwrap_or(0.0));
    }
}

// ---- fake clocks ---------------------------------------------------------------------------------------------------

/// libfaketime's preload library (Debian package `faketime`, which scripts/setup and scripts/chaos install), or
/// `WAKEEPER_FAKETIME_LIB`.
fn faketime_lib() -> PathBuf {
    if let Some(p) = std::env::var_os("WAKEEPER_FAKETIME_LIB") {
        return p.into();
    }
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    candidates.iter().map(PathBuf::from).find(|p| p.exists()).unwrap_or_else(|| {
        panic!("libfaketime is missing: run scripts/setup (apt-get install faketime) or set WAKEEPER_FAKETIME_LIB")
    })
}

/// Environment that moves a host's wall clock by `offset` (libfaketime's syntax: `+30s`, `-30s`) and leaves
/// its monotonic clocks alone (the lease rule may count on those; tokio's timers do).
pub(super) fn skewed_clock(offset: &str) -> Vec<(&'static str, String)> {
    vec![
        ("LD_PRELOAD", faketime_lib().display().to_string()),
        ("FAKETIME", offset.to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
        // The name older releases read.
        ("DONT_FAKE_MONOTONIC", "1".to_string()),
    ]
}

/// How far the host's wall clock is off, from the timestamp of its first log line (`2026-01-02T03:04:05.6Z`)
/// against the real time the test read just before starting it.
pub(super) fn log_clock_offset_s(log: &std::path::Path, started_at_ms: i64) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let stamp = text.lines().next()?.split_whitespace().next()?;
    Some((parse_rfc3339_ms(stamp)? - started_at_ms) as f64 / 1000.0)
}

fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let (date, time) = s.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (hh, mm) = (t.next()?.parse::<i64>().ok()?, t.next()?.parse::<i64>().ok()?);
    let secs = t.next()?.parse::<f64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) * 1000 + (secs * 1000.0) as i64)
}

// ---- what every running host says, tallied --------------------------------------------------------------------------

/// Tallies over every poll of a scenario.
#[derive(Default)]
pub(super) struct Watch {
    pub polls: u64,
    /// Tenant-polls in which a tenant was open on two hosts at once.
    pub open_twice: u64,
    /// Polls in which the server had some device on two logged-in connections at once.
    pub server_doubled_polls: u64,
    /// Tenants some host reported `replaced` (440).
    pub replaced: BTreeSet<TenantId>,
    /// Tenants some host reported in another terminal state (tenants logged out on purpose excepted).
    pub terminal: BTreeSet<TenantId>,
    /// Tenants logged out on purpose (their terminal state is expected).
    pub logged_out: BTreeSet<TenantId>,
}

impl Watch {
    /// One poll of every running member and of the server.
    pub async fn poll(&mut self, members: &[Member], wa: &wa_sim::SimHandle, ids: &[TenantId]) -> Vec<usize> {
        let mut all = Vec::with_capacity(members.len());
        for m in members {
            all.push(m.states().await);
        }
        self.polls += 1;
        let mut open_on = vec![0usize; ids.len()];
        for s in &all {
            for (i, id) in ids.iter().enumerate() {
                if s.get(id) == Some(&SessionState::Open) {
                    open_on[i] += 1;
                }
            }
            for (id, st) in s {
                if *st == SessionState::Replaced {
                    self.replaced.insert(id.clone());
                } else if st.is_terminal() && !self.logged_out.contains(id) {
                    self.terminal.insert(id.clone());
                }
            }
        }
        self.open_twice += open_on.iter().filter(|n| **n > 1).count() as u64;
        if wa.observations().devices.values().any(|d| d.current_connections > 1) {
            self.server_doubled_polls += 1;
        }
        open_on
    }

    /// Polls until every tenant of `ids` is open on exactly one running host; returns how many are not by the
    /// deadline, and how long it took.
    pub async fn converge(
        &mut self,
        members: &[Member],
        wa: &wa_sim::SimHandle,
        ids: &[TenantId],
        limit: Duration,
    ) -> (usize, Duration) {
        let started = Instant::now();
        loop {
            let open_on = self.poll(members, wa, ids).await;
            let off = open_on.iter().filter(|n| **n != 1).count();
            if off == 0 || started.elapsed() > limit {
                return (off, started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Keeps polling for `span` (to see what a resumed or restarted host does once things look settled).
    pub async fn observe(&mut self, members: &[Member], wa: &wa_sim::SimHandle, ids: &[TenantId], span: Duration) {
        let until = Instant::now() + span;
        while Instant::now() < until {
            self.poll(members, wa, ids).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The must-be-zero rows every fleet scenario shares.
    pub fn report(&self, c: &mut Counts) {
        c.info("polls of every running host's sessions", self.polls);
        c.zero("tenant-polls with a tenant open on two hosts at once", self.open_twice);
        c.zero("polls in which the server had a device on two live connections", self.server_doubled_polls);
        c.zero("tenants some host reported `replaced` (440)", self.replaced.len() as u64);
        c.zero("tenants some host reported in another terminal state", self.terminal.len() as u64);
    }
}

/// The server's count of logins that knocked an older live connection off (440 to the older one), per device.
pub(super) fn kicks(wa: &wa_sim::SimHandle) -> BTreeMap<String, u64> {
    wa.observations().devices.into_values().map(|d| (d.jid, d.replaced_by_newer)).collect()
}

/// Kicks in `after` that are not in `before`, summed over devices.
pub(super) fn kicks_between(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> u64 {
    after.iter().map(|(jid, n)| n.saturating_sub(before.get(jid).copied().unwrap_or(0))).sum()
}

// ---- the stores at the end ------------------------------------------------------------------------------------------

/// Tenants of `ids` the tenant table holds marked (a terminal status) or not desired: nobody logged them out,
/// so only a host that was not their holder (or a wrong mark) can have done it. Prints each one.
pub(super) async fn marked_in_table(tenants: &dyn TenantStore, ids: &[TenantId]) -> Vec<TenantId> {
    let mut marked = Vec::new();
    for id in ids {
        let rec = tenants.get(id).await.unwrap().expect("the tenant's record");
        if !rec.whatsapp_connected || rec.status.is_some_and(|s| s.is_terminal()) {
            let lease = rec.lease.as_ref().map(|l| (l.owner.as_str(), l.epoch));
            println!(
                "    marked in the table: {id}: status {:?}, reason {:?}, lease {lease:?}",
                rec.status, rec.reason
            );
            marked.push(id.clone());
        }
    }
    marked
}

/// The credential store's fence per tenant against the tenant table's lease: `write_epoch` (the epoch of the
/// writer of the committed generation) and `max_epoch` (the fence) may never be above the epoch of the current
/// lease: a higher one would be a batch or claim of an epoch that was never granted. Returns (tenants with a
/// write epoch above the lease's, tenants with a fence above it, tenants compared).
pub(super) async fn fence_above_lease(stores: &CloudStores, ids: &[TenantId]) -> (u64, u64, u64) {
    let emulator = firestore_emulator().expect("set when the stores are");
    let client = wakeeper_shared::tls::http_client().build().expect("an http client");
    let (mut write_above, mut fence_above, mut compared) = (0, 0, 0);
    for id in ids {
        let Some(lease) = stores.tenants.get(id).await.unwrap().and_then(|r| r.lease) else { continue };
        let url = format!(
            "http://{emulator}/v1/projects/wakeeper-test/databases/(default)/documents/{}/{id}",
            stores.creds.tenants_collection()
        );
        let resp = client.get(&url).bearer_auth("owner").send().await.unwrap();
        if !resp.status().is_success() {
            continue;
        }
        let doc: serde_json::Value = resp.json().await.unwrap();
        let field =
            |name: &str| doc["fields"][name]["integerValue"].as_str().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let (write_epoch, max_epoch) = (field("write_epoch"), field("max_epoch"));
        compared += 1;
        if write_epoch > lease.epoch || max_epoch > lease.epoch {
            println!("    {id}: store write_epoch {write_epoch}, max_epoch {max_epoch}, lease epoch {}", lease.epoch);
        }
        write_above += u64::from(write_epoch > lease.epoch);
        fence_above += u64::from(max_epoch > lease.epoch);
    }
    (write_above, fence_above, compared)
}

/// Prints, in time order, every host log line about `tenant` (at most `max`): the evidence behind a count.
pub(super) fn tenant_story(members: &[Member], tenant: &str, max: usize) {
    let needles = [format!("tenant={tenant} "), format!("tenant={tenant}\n")];
    let mut lines: Vec<(String, String)> = Vec::new();
    for m in members {
        for log in &m.logs {
            let name = log.file_name().and_then(|f| f.to_str()).unwrap_or("?").to_string();
            let text = std::fs::read_to_string(log).unwrap_or_default();
            lines.extend(
                text.lines()
                    .filter(|l| needles.iter().any(|n| format!("{l}\n").contains(n.as_str())))
                    .map(|l| (l.to_string(), name.clone())),
            );
        }
    }
    lines.sort();
    println!("  evidence for {tenant}:");
    for (line, name) in lines.iter().take(max) {
        println!("    {name}: {line}");
    }
}
