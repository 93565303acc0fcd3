//! The chaos suite (issue 8): break the host on purpose in bounded trials and count what was lost.
//!
//! Every scenario prints its counts; every count that must be zero is asserted zero at the end of the scenario
//! (so a failure still shows the whole table). Short form (the default, part of `.ci/run`): a few trials and
//! 5-second faults, under three minutes. Long form: `WAKEEPER_CHAOS_TRIALS=50` (scripts/chaos) runs that many
//! SIGKILL trials, 20 two-host trials, 30-second store outages and 60-second refusals.
//!
//! Scenarios:
//! 1. SIGKILL while the engine writes (fresh devices uploading their pre-keys), restart with the local disk wiped:
//!    tenants not back to `open`, tenants that needed pairing, acknowledged records missing from the credential
//!    store, corrupt records.
//! 2. The Firestore emulator unreachable during a restore and during record churn: tenants wrongly marked,
//!    time to full recovery, records left unreplicated after recovery.
//! 3. The fake server answering 503 and 429 to every connect: tenants wrongly marked, the peak connect rate
//!    the server saw against the governor's limit, time to full recovery.
//! 4. Two hosts over one store, one killed and restarted again and again: moments a device had two connections.
//! 5. DynamoDB unreachable from the middle of a health sweep on, while half the fleet is refused by the server:
//!    tenants wrongly marked, time to a clean sweep after recovery, statuses and failure counts left wrong.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use wa_sim::{MintOptions, Refusal, RefusePoint, Target};
use wakeeper_shared::adapters::dynamodb::{DynamoTenantStore, dynamo_client_for_endpoint};
use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::adapters::firestore::FirestoreCredentialStore;
use wakeeper_shared::alerts::{AlertError, AlertMessage, AlertSink};
use wakeeper_shared::domain::reconcile::Policy;
use wakeeper_shared::domain::{RecordKind, SessionList, SessionState, TenantId, TenantStatus, now_millis};
use wakeeper_shared::fleet::HostFleet;
use wakeeper_shared::local::WorkingCopy;
use wakeeper_shared::ports::{CredentialStore, StoreError, TenantStore};
use wakeeper_shared::sweep::{SweepError, SweepMemory, SweepPolicy, SweepReport, run_sweep};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

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
}

impl Settings {
    fn from_env() -> Self {
        match std::env::var("WAKEEPER_CHAOS_TRIALS").ok().and_then(|v| v.parse::<usize>().ok()) {
            Some(n) if n > 0 => Self {
                kill_trials: n,
                two_host_trials: n.min(20),
                outage: Duration::from_secs(30),
                refusal: Duration::from_secs(60),
            },
            _ => Self {
                kill_trials: 3,
                two_host_trials: 3,
                outage: Duration::from_secs(5),
                refusal: Duration::from_secs(5),
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

// ---- 1. SIGKILL while the engine writes ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_engine_writes_loses_nothing_acknowledged() {
    let settings = Settings::from_env();
    let limit = Duration::from_secs(60 + 40 * settings.kill_trials as u64);
    tokio::time::timeout(limit, sigkill_trials(&settings)).await.expect("chaos scenario timed out");
}

async fn sigkill_trials(settings: &Settings) {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let Some(stores) = CloudStores::fresh("chaoskill", dirs.cipher()).await else { return };
    let per_trial = 4;
    let mut c = Counts::default();
    let (mut not_open, mut pairing, mut missing, mut corrupt, mut server_prekeys_lost) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut acknowledged, mut killed_mid_upload) = (0u64, 0u64);
    let mut host = ChaosHost::spawn(&dirs, &wa.url(), "host-a", &stores.host_env(&[]));
    host.ready().await;
    for trial in 0..settings.kill_trials {
        // Fresh devices whose server holds no pre-keys: each uploads ~800 on its first connect, and the engine
        // writes every one through the host's store before it is sent.
        let ids: Vec<TenantId> = (0..per_trial).map(|i| tid(&format!("kill-{trial:02}-{i}"))).collect();
        let mut jids = Vec::new();
        for id in &ids {
            let m = wa.mint_device_with(id, &MintOptions { server_has_prekeys: false, ..Default::default() }).unwrap();
            stores.creds.replace(id, &m.snapshot, 0).await.unwrap();
            stores.tenants.set_desired(id, true).await.unwrap();
            jids.push(m.jid);
        }
        let before = wa.summary();
        for id in &ids {
            if let Err(e) = host.client.ensure(id).await {
                panic!("trial {trial}: ensure {id} failed: {e}; host log:\n{}", host.log_tail());
            }
        }
        tokio::time::sleep(Duration::from_millis(random_ms(2500))).await;
        host.kill9();
        // Nothing writes any more: what the store holds now is everything it acknowledged.
        let mut s1 = Vec::new();
        for id in &ids {
            let snap = stores.creds.read(id).await.unwrap();
            acknowledged += snap.records.len() as u64;
            if snap.count(RecordKind::PreKey) == 0 {
                killed_mid_upload += 1;
            }
            s1.push(snap);
        }
        // A fresh container: nothing local survives (the data key lives outside the data dir).
        dirs.wipe_data();
        host = ChaosHost::spawn(&dirs, &wa.url(), "host-a", &stores.host_env(&[]));
        host.ready().await;
        not_open += wait_open(&host, &ids, Duration::from_secs(60)).await as u64;
        store_settled(stores.creds.as_ref(), &ids, Duration::from_secs(20)).await;
        for (i, id) in ids.iter().enumerate() {
            match stores.creds.read(id).await {
                Ok(s2) => {
                    missing += s1[i].records.keys().filter(|k| !s2.records.contains_key(*k)).count() as u64;
                    if s2.check_restorable().is_err() {
                        corrupt += 1;
                    }
                    // Pre-keys the server hands out that the store cannot decrypt for: the window between the
                    // engine's local write and the replicator's commit, lost with the disk.
                    let stored: HashSet<String> =
                        s2.records.keys().filter(|k| k.kind == RecordKind::PreKey).map(|k| k.key.clone()).collect();
                    server_prekeys_lost +=
                        wa.prekey_ids(&jids[i]).unwrap().iter().filter(|p| !stored.contains(&p.to_string())).count()
                            as u64;
                }
                Err(StoreError::Corrupt(_)) => corrupt += 1,
                Err(e) => panic!("reading {id}: {e}"),
            }
            let obs = wa.device(&jids[i]).unwrap();
            if obs.presented_noise_keys.len() > 1 {
                pairing += 1;
            }
        }
        let after = wa.summary();
        pairing +=
            (after.rejected_logins - before.rejected_logins) + (after.pairings_started - before.pairings_started);
        // Retire this trial's tenants so the next restart restores only the next set.
        for id in &ids {
            stores.tenants.set_desired(id, false).await.unwrap();
            let _ = host.client.stop(id).await;
        }
    }
    drop(host);
    c.info("trials (SIGKILL at a random moment 0-2.5 s after 4 fresh devices connect)", settings.kill_trials);
    c.info("records the store had acknowledged at the kills", acknowledged);
    c.info("tenants killed before any pre-key reached the store", killed_mid_upload);
    c.zero("tenants not back to open after the restart (disk wiped)", not_open);
    c.zero("tenants that needed pairing (401, new QR, or another noise key)", pairing);
    c.zero("acknowledged records missing from the credential store", missing);
    c.zero("corrupt records (store unreadable or snapshot not restorable)", corrupt);
    c.zero("devices connected twice at once", doubled(&wa));
    c.info(
        "pre-keys the server holds that the store lacks (uploaded, not yet replicated at the kill)",
        server_prekeys_lost,
    );
    sim.shutdown().await;
    c.finish("SIGKILL during engine writes, restart with the working copy deleted");
}

// ---- 2. the credential store unreachable ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firestore_outage_during_restore_and_churn_marks_nobody() {
    let settings = Settings::from_env();
    let limit = Duration::from_secs(240) + settings.outage * 2;
    tokio::time::timeout(limit, firestore_outage(&settings)).await.expect("chaos scenario timed out");
}

async fn firestore_outage(settings: &Settings) {
    let Some(emulator) = firestore_emulator() else { return };
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let prefix = fresh_prefix("chaosfs");
    let creds = FirestoreCredentialStore::new("wakeeper-test", dirs.cipher(), prefix.clone()).await.unwrap();
    let ids: Vec<TenantId> = (0..20).map(|i| tid(&format!("outage-{i:02}"))).collect();
    let mut jids = Vec::new();
    {
        std::fs::create_dir_all(dirs.data()).unwrap();
        let tenants = EmbeddedStore::open(dirs.data().join("store.redb"), dirs.cipher()).unwrap();
        for id in &ids {
            let m = wa.mint_device_with(id, &MintOptions::default()).unwrap();
            creds.replace(id, &m.snapshot, 0).await.unwrap();
            tenants.set_desired(id, true).await.unwrap();
            jids.push(m.jid);
        }
    }
    let proxy = StoreProxy::start(emulator).await;
    let env = [
        ("FIRESTORE_EMULATOR_HOST", proxy.addr.clone()),
        ("WAKEEPER_FIRESTORE_PROJECT", "wakeeper-test".to_string()),
        ("WAKEEPER_FIRESTORE_PREFIX", prefix.clone()),
    ];
    let mut c = Counts::default();
    let mut wrongly_marked: BTreeSet<TenantId> = BTreeSet::new();

    // (a0) A host started while the store is down (every connection to it is cut at once) comes up, answers
    // /health, and restores every tenant once the store is back (its Firestore client connects on first use).
    proxy.set_up(false);
    let mut probe = ChaosHost::spawn(&dirs, &wa.url(), "host-a", &env);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answered = false;
    while Instant::now() < deadline && !answered {
        answered = probe.client.health().await.is_ok();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !answered {
        println!("    start-up while the store is down: {}", probe.log_tail().lines().last().unwrap_or("(no log)"));
    }
    c.zero(
        "(start) hosts not answering /health within 30 s when started while the store is down",
        u64::from(!answered),
    );
    tokio::time::sleep(Duration::from_secs(1)).await; // the store stays down a moment after the host is up
    proxy.set_up(true);
    let not_open = wait_open(&probe, &ids, Duration::from_secs(60)).await;
    c.zero("(start) tenants not open after the store came back", not_open as u64);
    probe.kill9();
    // The restore below starts from the store again, as on a new container.
    std::fs::remove_dir_all(dirs.data().join("tenants")).unwrap();

    // (a) During the restore: the store goes away (connections reset) as soon as the host answers, with the
    // restore under way.
    let mut host = ChaosHost::spawn(&dirs, &wa.url(), "host-a", &env);
    host.ready().await;
    proxy.set_up(false);
    let down_at = Instant::now();
    while down_at.elapsed() < settings.outage {
        wrongly_marked.extend(terminal_in(&states(&host).await));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let open_during = states(&host).await.values().filter(|s| **s == SessionState::Open).count();
    let connects = proxy.connects_while_down.swap(0, Ordering::Relaxed);
    proxy.set_up(true);
    let up_at = Instant::now();
    let not_open = wait_open(&host, &ids, Duration::from_secs(120)).await;
    let recovery = up_at.elapsed();
    c.info(
        &format!("(restore) store cut for {:?} once /health answered; sessions open at the end of it", settings.outage),
        open_during,
    );
    c.info(
        "(restore) store connection attempts while unreachable, per tenant per second",
        format!("{:.1}", connects as f64 / ids.len() as f64 / settings.outage.as_secs_f64()),
    );
    c.zero("(restore) tenants not open after the store came back", not_open as u64);
    c.info("(restore) time from the store's return to every tenant open", format!("{:.2} s", recovery.as_secs_f64()));

    // (b) During churn: the server forgets every device's pre-keys and drops it, so each reconnects and writes a
    // fresh batch, and the store goes away while those writes replicate.
    for jid in &jids {
        wa.forget_prekeys(jid).unwrap();
    }
    wa.drop_connections(&Target::All);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.set_up(false);
    let down_at = Instant::now();
    let mut open_samples = Vec::new();
    while down_at.elapsed() < settings.outage {
        let s = states(&host).await;
        wrongly_marked.extend(terminal_in(&s));
        open_samples.push(s.values().filter(|st| **st == SessionState::Open).count());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    proxy.set_up(true);
    let up_at = Instant::now();
    let not_open = wait_open(&host, &ids, Duration::from_secs(60)).await;
    c.info(
        "(churn) fewest sessions open during the outage (connects need no store)",
        open_samples.iter().skip(8).min().copied().unwrap_or(0),
    );
    c.zero("(churn) tenants not open after the store came back", not_open as u64);
    // Graceful stop: the replicator flushes what the outage held back.
    host.terminate(Duration::from_secs(60));
    let flush_took = up_at.elapsed();
    let mut unreplicated = 0u64;
    let mut local_records = 0u64;
    let mut behind = Vec::new();
    for id in &ids {
        let local =
            WorkingCopy::open(dirs.data(), id.clone(), dirs.cipher()).unwrap().load().unwrap().unwrap_or_default();
        let remote = creds.read(id).await.unwrap();
        local_records += local.records.len() as u64;
        let missing = local.records.iter().filter(|(k, v)| remote.records.get(*k) != Some(*v)).count() as u64;
        if missing > 0 {
            println!(
                "    {id}: {missing} local records not in the store (local generation {}, store {})",
                local.generation, remote.generation
            );
            behind.push(id.to_string());
        }
        unreplicated += missing;
    }
    if !behind.is_empty() {
        behind.push("replicat".into());
        behind.push("flush".into());
        show_log_lines(&[host.log.clone()], &behind, 40);
    }
    c.info("(churn) records in the local working copies after the churn", local_records);
    c.zero("(churn) local records not in the store after recovery and a graceful stop", unreplicated);
    c.info(
        "(churn) time from the store's return to a flushed, stopped host",
        format!("{:.2} s", flush_took.as_secs_f64()),
    );

    let tenants = EmbeddedStore::open(dirs.data().join("store.redb"), dirs.cipher()).unwrap();
    for id in &ids {
        let rec = tenants.get(id).await.unwrap().unwrap();
        if !rec.whatsapp_connected || rec.status.is_some_and(|s| s.is_terminal()) {
            wrongly_marked.insert(id.clone());
        }
    }
    c.zero(
        "tenants wrongly marked (a terminal state seen, or marked in the tenant table)",
        wrongly_marked.len() as u64,
    );
    c.zero("devices connected twice at once", doubled(&wa));
    sim.shutdown().await;
    c.finish("Firestore unreachable during restore and during churn");
}

// ---- 3. the server refusing connects -------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connects_are_paced_and_mark_nobody() {
    let settings = Settings::from_env();
    let limit = Duration::from_secs(360) + settings.refusal * 3;
    tokio::time::timeout(limit, refusals(&settings)).await.expect("chaos scenario timed out");
}

async fn refusals(settings: &Settings) {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let ids: Vec<TenantId> = (0..30).map(|i| tid(&format!("refused-{i:02}"))).collect();
    seed_embedded(&dirs, &wa, &ids).await;
    let (rate, burst) = (20u32, 5u32);
    let mut host = ChaosHost::spawn(
        &dirs,
        &wa.url(),
        "host-a",
        &[("WAKEEPER_CONNECT_RATE", rate.to_string()), ("WAKEEPER_CONNECT_BURST", burst.to_string())],
    );
    host.ready().await;
    assert_eq!(wait_open(&host, &ids, Duration::from_secs(60)).await, 0, "set-up: every tenant open");
    let mut c = Counts::default();
    let mut wrongly_marked: BTreeSet<TenantId> = BTreeSet::new();
    let mut peak_overall = 0u32;
    let host_env = [("WAKEEPER_CONNECT_RATE", rate.to_string()), ("WAKEEPER_CONNECT_BURST", burst.to_string())];
    for (phase, (code, point)) in
        [(503u16, RefusePoint::Upgrade), (429, RefusePoint::Stream), (429, RefusePoint::Upgrade)]
            .into_iter()
            .enumerate()
    {
        if phase > 0 {
            // A fresh host per fault: failures from the previous fault would otherwise still count (a session
            // resets its failure count only after a minute open), and lengthen this one's backoff.
            host.terminate(Duration::from_secs(30));
            host = ChaosHost::spawn(&dirs, &wa.url(), "host-a", &host_env);
            host.ready().await;
            assert_eq!(wait_open(&host, &ids, Duration::from_secs(60)).await, 0, "every tenant open again");
        }
        let label = format!("{code} at the {}", if point == RefusePoint::Upgrade { "upgrade" } else { "stream" });
        let seconds_before = wa.attempts_per_second().len();
        let attempts_before = wa.summary().connect_attempts;
        wa.refuse_connects(&Target::All, Refusal { code, point, duration: settings.refusal }).unwrap();
        assert_eq!(wa.drop_connections(&Target::All), ids.len(), "every tenant was connected");
        let started = Instant::now();
        while started.elapsed() < settings.refusal {
            wrongly_marked.extend(terminal_in(&states(&host).await));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let attempts = wa.summary().connect_attempts - attempts_before;
        let ended = Instant::now();
        let not_open = wait_open(&host, &ids, Duration::from_secs(150)).await;
        let recovery = ended.elapsed();
        let series = wa.attempts_per_second();
        let peak = series[seconds_before.saturating_sub(1)..].iter().copied().max().unwrap_or(0);
        peak_overall = peak_overall.max(peak);
        wrongly_marked.extend(terminal_in(&states(&host).await));
        c.info(
            &format!("({label}) connect attempts per tenant during the {:?} refusal", settings.refusal),
            format!("{:.1}", attempts as f64 / ids.len() as f64),
        );
        c.bound(
            &format!("({label}) peak connects/s seen by the server (limit {rate}/s + burst {burst})"),
            peak,
            peak <= rate + burst,
        );
        c.zero(&format!("({label}) tenants not open after the refusal ended"), not_open as u64);
        c.info(
            &format!("({label}) time from the end of the refusal to every tenant open"),
            format!("{:.2} s", recovery.as_secs_f64()),
        );
    }
    host.terminate(Duration::from_secs(30));
    let tenants = EmbeddedStore::open(dirs.data().join("store.redb"), dirs.cipher()).unwrap();
    for id in &ids {
        let rec = tenants.get(id).await.unwrap().unwrap();
        if !rec.whatsapp_connected || rec.status.is_some_and(|s| s.is_terminal()) {
            wrongly_marked.insert(id.clone());
        }
    }
    c.zero(
        "tenants wrongly marked (a terminal state seen, or marked in the tenant table)",
        wrongly_marked.len() as u64,
    );
    c.zero("devices connected twice at once", doubled(&wa));
    c.info("peak connects/s over the whole scenario", peak_overall);
    sim.shutdown().await;
    c.finish("the server refusing every connect with 503 and 429");
}

// ---- 4. two hosts, one killed again and again ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_never_connect_a_device_twice_across_kills() {
    let settings = Settings::from_env();
    let limit = Duration::from_secs(120 + 45 * settings.two_host_trials as u64);
    tokio::time::timeout(limit, two_hosts(&settings)).await.expect("chaos scenario timed out");
}

async fn two_hosts(settings: &Settings) {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let (dirs_a, dirs_b) = Dirs::pair_sharing_key();
    let Some(stores) = CloudStores::fresh("chaostwo", dirs_a.cipher()).await else { return };
    let ids: Vec<TenantId> = (0..30).map(|i| tid(&format!("pair-{i:02}"))).collect();
    stores.seed(&wa, &ids).await;
    let ttl_s = 6u64;
    let env = stores.host_env(&[("WAKEEPER_LEASE_TTL_S", ttl_s.to_string())]);
    let mut a = ChaosHost::spawn(&dirs_a, &wa.url(), "host-a", &env);
    let b = ChaosHost::spawn(&dirs_b, &wa.url(), "host-b", &env);
    a.ready().await;
    b.ready().await;

    let mut c = Counts::default();
    let (mut not_back, mut api_double, mut kills_before_expiry) = (0u64, 0u64, 0u64);
    let mut replaced: BTreeSet<TenantId> = BTreeSet::new();
    let mut logs = vec![a.log.clone(), b.log.clone()];
    let mut settle_times = Vec::new();
    // Every tenant open on exactly one host; counts tenants open on both at one poll.
    async fn converge(
        a: &ChaosHost,
        b: &ChaosHost,
        ids: &[TenantId],
        limit: Duration,
        replaced: &mut BTreeSet<TenantId>,
    ) -> (usize, u64) {
        let deadline = Instant::now() + limit;
        let mut double = 0u64;
        loop {
            let (sa, sb) = (states(a).await, states(b).await);
            let open = |s: &BTreeMap<TenantId, SessionState>, id: &TenantId| s.get(id) == Some(&SessionState::Open);
            double += ids.iter().filter(|id| open(&sa, id) && open(&sb, id)).count() as u64;
            replaced.extend(
                sa.iter().chain(sb.iter()).filter(|(_, s)| **s == SessionState::Replaced).map(|(id, _)| id.clone()),
            );
            let missing = ids.iter().filter(|id| !open(&sa, id) && !open(&sb, id)).count();
            if missing == 0 || Instant::now() > deadline {
                return (missing, double);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (missing, double) = converge(&a, &b, &ids, Duration::from_secs(60), &mut replaced).await;
    assert_eq!(missing, 0, "set-up: every tenant open on one of the hosts");
    api_double += double;
    for _ in 0..settings.two_host_trials {
        tokio::time::sleep(Duration::from_millis(random_ms(2000))).await;
        a.kill9();
        // Sometimes back before its leases expire (it takes them back), sometimes after (B has taken them).
        let down = random_ms(2 * ttl_s * 1000);
        if down < ttl_s * 1000 {
            kills_before_expiry += 1;
        }
        tokio::time::sleep(Duration::from_millis(down)).await;
        a = ChaosHost::spawn(&dirs_a, &wa.url(), "host-a", &env);
        logs.push(a.log.clone());
        a.ready().await;
        let started = Instant::now();
        let (missing, double) = converge(&a, &b, &ids, Duration::from_secs(30), &mut replaced).await;
        settle_times.push(started.elapsed().as_secs_f64());
        not_back += missing as u64;
        api_double += double;
    }
    let max_settle = settle_times.iter().copied().fold(0.0, f64::max);
    c.info("trials (host A SIGKILLed, restarted 0-12 s later; lease ttl 6 s)", settings.two_host_trials);
    c.info("of which A came back before its leases expired", kills_before_expiry);
    let doubled_devices: Vec<String> = wa
        .observations()
        .devices
        .into_values()
        .filter(|d| d.max_concurrent_connections > 1)
        .filter_map(|d| d.tenant)
        .collect();
    c.zero(
        "moments a device had two connections (the server's per-device maximum above 1)",
        doubled_devices.len() as u64,
    );
    c.zero("tenants open on both hosts at one poll of their APIs", api_double);
    c.zero("tenants whose session ended as replaced (440)", replaced.len() as u64);
    c.zero("tenants not open on either host 30 s after A came back", not_back);
    c.info("longest time from A's restart to every tenant open on exactly one host", format!("{max_settle:.2} s"));
    if let Some(first) = doubled_devices.first().cloned().or_else(|| replaced.first().map(|t| t.to_string())) {
        // The whole story of one affected tenant, from every host log, in time order.
        println!("  evidence for {first} (first of {} doubled, {} replaced):", doubled_devices.len(), replaced.len());
        let mut lines: Vec<(String, String)> = Vec::new();
        for log in &logs {
            let name = log.file_name().and_then(|f| f.to_str()).unwrap_or("?").to_string();
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let needle = format!("tenant={first} ");
            lines.extend(text.lines().filter(|l| l.contains(&needle)).map(|l| (l.to_string(), name.clone())));
        }
        lines.sort();
        for (line, name) in lines.iter().take(80) {
            println!("    {name}: {line}");
        }
        if let Some(jid) = wa.device_jid(&tid(&first)) {
            let d = wa.device(&jid).unwrap();
            println!(
                "    sim: attempts at {:?} ms, logins {}, replaced_by_newer {}",
                d.attempt_times_ms, d.logins, d.replaced_by_newer
            );
        }
    }
    drop(a);
    drop(b);
    sim.shutdown().await;
    c.finish(&format!("two hosts over one store, one killed and restarted {} times", settings.two_host_trials));
}

// ---- 5. DynamoDB unreachable during sweeps -------------------------------------------------------------------------

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
