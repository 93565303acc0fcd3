//! The chaos suite (issues 8 and 17): break the hosts on purpose in bounded trials and count what was lost.
//!
//! Every scenario prints its counts; every count that must be zero is asserted zero at the end of the scenario
//! (so a failure still shows the whole table). Short form (the default, part of `.ci/run`): a few trials and
//! 5-second faults, each scenario well under two minutes. Long form: `WAKEEPER_CHAOS_TRIALS=50` (scripts/chaos)
//! runs that many SIGKILL trials, 20 two-host trials, 30-second store outages, 60-second refusals, and more
//! tenants and trials in the fleet scenarios. `scripts/chaos --only NAME` runs one scenario: each is a module
//! named after it (`clock-skew` is `clock_skew::`).
//!
//! # Layout
//! - this file: the host under test, the settings, the count table, polling helpers, a switchable TCP path.
//! - [`fleet`]: what the multi-host scenarios share (several hosts over the cloud stores, convergence polls,
//!   pausing, fake clocks, the store's fence figures, the hosts' metrics).
//! - one module per scenario:
//!   1. [`sigkill`]: SIGKILL while the engine writes, restart with the local disk wiped.
//!   2. [`firestore_outage`]: the Firestore emulator unreachable during a restore and during record churn.
//!   3. [`refusals`]: the fake server answering 503 and 429 to every connect.
//!   4. [`two_hosts`]: two hosts over one store, one killed and restarted again and again.
//!   5. [`dynamodb_outage`]: DynamoDB unreachable during health sweeps, half the fleet refused meanwhile.
//!   6. [`pause`]: the lease holder SIGSTOPped for longer than its lease, another host takes over, SIGCONT.
//!   7. [`clock_skew`]: two hosts whose wall clocks are 30 s ahead and 30 s behind, failing over both ways.
//!   8. [`takeover_under_writes`]: kills and pauses while contacts keep writing, a logout in the middle, then
//!      every disk wiped and one host restoring everything from Firestore.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use wakeeper_shared::domain::{SessionList, SessionState, TenantId};
use wakeeper_shared::ports::CredentialStore;
use wakeeper_testkit::*;

mod clock_skew;
mod dynamodb_outage;
mod firestore_outage;
mod fleet;
mod pause;
mod refusals;
mod sigkill;
mod takeover_under_writes;
mod two_hosts;

// ---- the host under test ----------------------------------------------------------------------------------------

/// The host binary under test: `WAKEEPER_CHAOS_HOST_BIN` (scripts/chaos copies the freshly built binary there, so
/// a build elsewhere in a shared target directory cannot swap it mid-run), else the one cargo built for this test.
fn host_bin() -> std::path::PathBuf {
    std::env::var_os("WAKEEPER_CHAOS_HOST_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_socket-host").into())
}

/// The host under test: a [`TestHost`] of [`host_bin`] with the session module's debug log, checked to be a
/// `test-peer` build once ready (any other build cannot log in to the fake server, and every count would be wrong
/// for that reason).
struct ChaosHost(TestHost);

/// The chaos suite's host log filter, unless `WAKEEPER_TEST_HOST_LOG` says otherwise.
const CHAOS_HOST_LOG: &str = "info,socket_host::session=debug,whatsapp_rust=warn,wacore=warn";

impl ChaosHost {
    fn spawn(dirs: &Dirs, wa_url: &str, host_id: &str, extra: &[(&str, String)]) -> Self {
        let bin = host_bin();
        let launch = Launch { bin: &bin, under: &[], default_log: CHAOS_HOST_LOG };
        Self(TestHost::launch(launch, dirs, wa_url, host_id, extra))
    }

    /// Waits until `/health` answers, and checks the binary is a test-peer build.
    async fn ready(&self) {
        self.0.ready().await;
        assert!(
            std::fs::read_to_string(&self.0.log).unwrap_or_default().contains("TEST BUILD"),
            "{} is not a test-peer build (was it rebuilt without the feature meanwhile?); use scripts/chaos, which \
             runs a private copy",
            host_bin().display()
        );
    }
}

impl std::ops::Deref for ChaosHost {
    type Target = TestHost;
    fn deref(&self) -> &TestHost {
        &self.0
    }
}

impl std::ops::DerefMut for ChaosHost {
    fn deref_mut(&mut self) -> &mut TestHost {
        &mut self.0
    }
}

// ---- settings and the count table ---------------------------------------------------------------------------------

/// How hard to push: the short form by default, the long form when `WAKEEPER_CHAOS_TRIALS` is set.
struct Settings {
    kill_trials: usize,
    two_host_trials: usize,
    outage: Duration,
    refusal: Duration,
    /// Tenants of the fleet scenarios (pause, clock skew, takeover under writes).
    fleet_tenants: usize,
    /// Fault rounds of the fleet scenarios.
    fleet_trials: usize,
}

impl Settings {
    fn from_env() -> Self {
        match std::env::var("WAKEEPER_CHAOS_TRIALS").ok().and_then(|v| v.parse::<usize>().ok()) {
            Some(n) if n > 0 => Self {
                kill_trials: n,
                two_host_trials: n.min(20),
                outage: Duration::from_secs(30),
                refusal: Duration::from_secs(60),
                fleet_tenants: 20,
                fleet_trials: n.min(5),
            },
            _ => Self {
                kill_trials: 3,
                two_host_trials: 3,
                outage: Duration::from_secs(5),
                refusal: Duration::from_secs(5),
                fleet_tenants: 4,
                fleet_trials: 1,
            },
        }
    }
}

/// Counts of one scenario: name, value, and whether it must be zero.
#[derive(Default)]
struct Counts {
    rows: Vec<(String, String, bool, bool)>,
}

impl Counts {
    /// A count that must be zero.
    fn zero(&mut self, what: &str, n: u64) {
        self.rows.push((what.into(), n.to_string(), true, n == 0));
    }

    /// A figure reported, not asserted.
    fn info(&mut self, what: &str, value: impl std::fmt::Display) {
        self.rows.push((what.into(), value.to_string(), false, true));
    }

    /// A bound that must hold.
    fn bound(&mut self, what: &str, value: impl std::fmt::Display, holds: bool) {
        self.rows.push((what.into(), value.to_string(), true, holds));
    }

    /// Prints the table, then fails if any asserted count is off.
    fn finish(self, scenario: &str) {
        println!("\n== chaos: {scenario}");
        for (what, value, asserted, ok) in &self.rows {
            let mark = match (asserted, ok) {
                (false, _) => "    ",
                (true, true) => "ok  ",
                (true, false) => "FAIL",
            };
            println!("  {mark} {what:<72} {value}");
        }
        let failed: Vec<&str> = self.rows.iter().filter(|r| r.2 && !r.3).map(|r| r.0.as_str()).collect();
        assert!(failed.is_empty(), "{scenario}: counts that must be zero are not: {failed:?}");
    }
}

fn random_ms(max: u64) -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).unwrap();
    u64::from_le_bytes(b) % max.max(1)
}

/// Sessions by state on one host (empty when it does not answer).
async fn states(host: &ChaosHost) -> BTreeMap<TenantId, SessionState> {
    host.client
        .sessions()
        .await
        .map(|l: SessionList| l.sessions.into_iter().map(|s| (s.tenant_id, s.state)).collect())
        .unwrap_or_default()
}

/// Polls until every tenant of `ids` is open on `host`; returns how many are not by the deadline.
async fn wait_open(host: &ChaosHost, ids: &[TenantId], limit: Duration) -> usize {
    let deadline = Instant::now() + limit;
    loop {
        let s = states(host).await;
        let missing = ids.iter().filter(|id| s.get(*id) != Some(&SessionState::Open)).count();
        if missing == 0 || Instant::now() > deadline {
            return missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn terminal_in(s: &BTreeMap<TenantId, SessionState>) -> BTreeSet<TenantId> {
    s.iter().filter(|(_, st)| st.is_terminal()).map(|(id, _)| id.clone()).collect()
}

/// Devices the simulator saw logged in twice at once.
fn doubled(wa: &wa_sim::SimHandle) -> u64 {
    wa.observations().devices.values().filter(|d| d.max_concurrent_connections > 1).count() as u64
}

/// For each device the server saw connected twice at once: the server's observation and the host log lines
/// of its tenant, to tell a host fault from a test artefact.
fn explain_doubles(wa: &wa_sim::SimHandle, ids: &[TenantId], logs: &[std::path::PathBuf]) {
    for d in wa.observations().devices.into_values().filter(|d| d.max_concurrent_connections > 1) {
        let tenant = ids.iter().find(|id| wa.device_jid(id).as_deref() == Some(d.jid.as_str()));
        println!("    connected twice: {} (tenant {tenant:?}): {d:?}", d.jid);
        if let Some(t) = tenant {
            show_log_lines(logs, &[format!("tenant={t} "), format!("tenant={t}\n")], 60);
        }
    }
}

/// Waits until the stored generation of every tenant has not moved for a while (the replicator is idle).
async fn store_settled(creds: &dyn CredentialStore, ids: &[TenantId], limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = Vec::new();
    let mut stable_since = Instant::now();
    while Instant::now() < deadline {
        let mut now = Vec::with_capacity(ids.len());
        for id in ids {
            now.push(creds.generation(id).await.ok().flatten());
        }
        if now != last {
            last = now;
            stable_since = Instant::now();
        } else if stable_since.elapsed() >= Duration::from_millis(1500) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Prints (at most `max`) lines of the host logs that mention any of `needles`: the evidence behind a failed
/// count, for whoever reads the test output.
fn show_log_lines(logs: &[std::path::PathBuf], needles: &[String], max: usize) {
    let mut shown = 0;
    for log in logs {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines().filter(|l| needles.iter().any(|n| l.contains(n.as_str()))) {
            if shown == max {
                return;
            }
            println!("    {}: {}", log.file_name().and_then(|f| f.to_str()).unwrap_or("?"), line);
            shown += 1;
        }
    }
}

// ---- a switchable path to the Firestore emulator -------------------------------------------------------------------

/// A TCP forwarder in front of the Firestore emulator that can be cut: while down it closes every live
/// connection and every new one at once, as a stopped server would (the emulator itself keeps its data, and
/// other tests sharing it are unaffected).
struct StoreProxy {
    addr: String,
    up: Arc<AtomicBool>,
    connects_while_down: Arc<AtomicU64>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl StoreProxy {
    async fn start(target: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let up = Arc::new(AtomicBool::new(true));
        let connects_while_down = Arc::new(AtomicU64::new(0));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let (up2, count) = (up.clone(), connects_while_down.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if !up2.load(Ordering::SeqCst) {
                    count.fetch_add(1, Ordering::Relaxed);
                    let _ = inbound.shutdown().await;
                    continue;
                }
                let target = target.clone();
                let mut cuts = cuts.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else { return };
                    cuts.borrow_and_update();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Self { addr, up, connects_while_down, cut }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}
