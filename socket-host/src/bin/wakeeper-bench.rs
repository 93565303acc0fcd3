//! `wakeeper-bench`: the figures of TARGETS.md in one run, beside a Baileys host on the same fake server.
//!
//! Everything on 127.0.0.1, release builds, the fake WhatsApp server (`wa-sim`) and every host in their own
//! processes. Measures:
//! - cold restore of N tenants to all `open` (from process start), from the embedded store and from the
//!   Firestore emulator, with the governor unlimited and at its defaults; a restart after SIGKILL (working
//!   copies still on disk);
//! - RSS per open idle session (host RSS with N open minus the same host's RSS with none, over N);
//! - recovery after dropped sockets: single drops, then all at once (governor defaults), and the peak connect
//!   rate the server saw;
//! - `GET /v1/sessions` at N real sessions and at 10,000 in-process sessions; the sweep decision for 10,000;
//! - replication lag to the Firestore emulator under steady record churn at N tenants; commits per tenant per
//!   window;
//! - Lambda bootstrap sizes (when built) and cold-start init times (exec to the first Runtime API `next`);
//! - the Baileys column: `scripts/baileys-bench` (Baileys 7.0.0-rc14 sockets in one Node process) against the
//!   same simulator: restore time and RSS per session.
//!
//! Build and run through `scripts/bench`. Needs the `test-peer` feature (the host binary beside this one must
//! accept the simulator's certificate chain).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use async_trait::async_trait;
use base64::Engine as _;
use clap::Parser;
use futures_util::StreamExt;
use serde_json::json;
use socket_host::api::AppState;
use socket_host::engine_store::EngineStore;
use socket_host::governor::{Governor, GovernorConfig};
use socket_host::host::Host;
use socket_host::replicator::{CommitInfo, Replicator, ReplicatorConfig};
use socket_host::session::{EngineProvider, OpenError, SessionConfig};
use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::adapters::firestore::FirestoreCredentialStore;
use wakeeper_shared::crypto::{Cipher, KeySource, LocalKeyFile};
use wakeeper_shared::domain::reconcile::{self, Action, HostView, Policy};
use wakeeper_shared::domain::{
    CredentialSnapshot, Lease, RecordKey, RecordKind, SessionList, SessionState, SessionView, StatusUpdate, TenantId,
    TenantRecord, TenantStatus, UnixMillis, now_millis,
};
use wakeeper_shared::host_api::{HostClient, RestoreRequest};
use wakeeper_shared::ports::{CredentialStore, Page, StoreError, TenantStore};
use wakeeper_shared::working_copy::WorkingCopy;
use whatsapp_rust::store::traits::Backend;
use whatsapp_rust::wacore::store::traits::SignalStore;

const TOKEN: &str = "wakeeper-bench-token-0123456789";
const FIRESTORE_PROJECT: &str = "wakeeper-bench";

#[derive(Parser, Debug, Clone)]
#[command(name = "wakeeper-bench", about = "wakeeper's benchmark figures beside a Baileys host")]
struct Args {
    /// Tenants in the restore, RSS, recovery and replication figures.
    #[arg(long, default_value_t = 1000)]
    tenants: usize,
    /// Sessions in the in-process `GET /v1/sessions` and sweep figures.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Baileys sockets (0: no Baileys column).
    #[arg(long, default_value_t = 1000)]
    baileys: usize,
    /// Single-drop samples.
    #[arg(long, default_value_t = 40)]
    single_drops: usize,
    /// Seconds of record churn in the replication figure.
    #[arg(long, default_value_t = 20)]
    churn_seconds: u64,
    /// Record changes per tenant per second in the replication figure.
    #[arg(long, default_value_t = 1.0)]
    churn_rate: f64,
    /// Sections to skip: restore, rss, recovery, list, replication, lambda, baileys.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Directory of `socket-host` and `wa-sim` (default: beside this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The Baileys bench script.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/baileys-bench/bench.mjs"))]
    baileys_script: PathBuf,
    /// Where `cargo lambda build` leaves bootstraps (default: `$CARGO_TARGET_DIR/lambda`).
    #[arg(long)]
    lambda_dir: Option<PathBuf>,
    /// Cold starts per function and configuration in the Lambda init figure.
    #[arg(long, default_value_t = 20)]
    lambda_cold_starts: usize,
    /// Niceness the measured bootstraps run at (-20 needs root; an unprivileged `nice` keeps 0, see the note).
    #[arg(long, default_value_t = -20, allow_hyphen_values = true)]
    lambda_nice: i32,
    /// Also write the table as Markdown here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Also write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the scratch directory (logs of every process) instead of deleting it.
    #[arg(long)]
    keep: bool,
    /// `NAME=VALUE` set in every host process the bench starts, after the section's own settings (e.g.
    /// `WAKEEPER_CONNECT_BURST=400` or `MALLOC_ARENA_MAX=2` to compare a setting); repeatable.
    #[arg(long = "host-env", value_parser = parse_env_pair)]
    host_env: Vec<(String, String)>,
    /// A command every host process is started under, e.g. `heaptrack -o /tmp/host` (split on spaces). With a
    /// wrapper, the RSS section SIGKILLs the idle host after its reading (a heap profiler then records what was
    /// live) and measures nothing after it.
    #[arg(long)]
    host_wrapper: Option<String>,
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("`{s}` is not NAME=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// `--host-env`, for every host process.
static HOST_ENV: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();
/// `--host-wrapper`, split.
static HOST_WRAPPER: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

// ---- the table -------------------------------------------------------------------------------------------------

/// One line of the result table.
#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    figure: String,
    wakeeper: String,
    baileys: String,
    ratio: String,
    target: String,
    verdict: String,
}

#[derive(Default)]
struct Table {
    rows: Vec<Row>,
    notes: Vec<String>,
    raw: serde_json::Map<String, serde_json::Value>,
}

impl Table {
    fn row(&mut self, figure: &str, wakeeper: String, target: &str, met: Option<bool>) {
        self.rows.push(Row {
            figure: figure.into(),
            wakeeper,
            baileys: String::new(),
            ratio: String::new(),
            target: target.into(),
            verdict: verdict(met),
        });
        println!("  {figure}: {}", self.rows.last().expect("pushed").wakeeper);
    }

    fn note(&mut self, note: String) {
        println!("  note: {note}");
        self.notes.push(note);
    }

    fn raw(&mut self, key: &str, value: serde_json::Value) {
        self.raw.insert(key.into(), value);
    }

    fn find(&mut self, figure: &str) -> Option<&mut Row> {
        self.rows.iter_mut().find(|r| r.figure == figure)
    }

    fn render(&self, machine: &str) -> String {
        let headers = ["Figure", "wakeeper", "Baileys 7.0.0-rc14", "wakeeper/Baileys", "Target", "Met"];
        let mut out = String::new();
        out.push_str(machine);
        out.push_str("\n\n");
        out.push_str(&format!("| {} |\n", headers.join(" | ")));
        out.push_str(&format!("|{}\n", "---|".repeat(headers.len())));
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.figure, r.wakeeper, r.baileys, r.ratio, r.target, r.verdict
            ));
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for n in &self.notes {
                out.push_str(&format!("- {n}\n"));
            }
        }
        out
    }
}

fn verdict(met: Option<bool>) -> String {
    match met {
        Some(true) => "yes".into(),
        Some(false) => "**no**".into(),
        None => "-".into(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * sorted.len() as f64).floor() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v
}

// ---- processes ---------------------------------------------------------------------------------------------------

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
    });
    // The kernel reports in USER_HZ, 100 on every Linux this runs on.
    ticks.map_or(0.0, |t| t as f64 / 100.0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    getrandom::fill(&mut raw).expect("the OS random source works");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// The simulator in its own process.
struct SimProcess {
    child: Child,
    ws_url: String,
    control: String,
    http: reqwest::Client,
}

impl SimProcess {
    fn spawn(bin: &Path, log: &Path) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let mut child = Command::new(bin)
            .args(["--addr", "127.0.0.1:0", "--control-addr", "127.0.0.1:0", "--backlog", "8192"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("sim stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).context("reading the sim's announcement")?;
        let info: serde_json::Value = serde_json::from_str(&line).context("the sim's announcement")?;
        Ok(Self {
            ws_url: info["ws_url"].as_str().context("ws_url")?.to_owned(),
            control: info["control_url"].as_str().context("control_url")?.to_owned(),
            child,
            http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.control));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.with_context(|| format!("{method} {path}"))?;
        let status = res.status();
        let text = res.text().await?;
        ensure!(status.is_success(), "{method} {path}: {status} {text}");
        Ok(if text.is_empty() { serde_json::Value::Null } else { serde_json::from_str(&text)? })
    }

    /// Mints a paired device for `tenant`; returns its JID and credential snapshot.
    async fn mint(&self, tenant: &TenantId) -> anyhow::Result<(String, CredentialSnapshot)> {
        let v = self.call(reqwest::Method::POST, "/v1/devices", Some(json!({ "tenant": tenant.as_str() }))).await?;
        let mut snap =
            CredentialSnapshot { generation: v["snapshot"]["generation"].as_u64().unwrap_or(0), ..Default::default() };
        for r in v["snapshot"]["records"].as_array().context("records")? {
            let kind = RecordKind::parse(r["kind"].as_str().context("kind")?).context("record kind")?;
            let value = base64::engine::general_purpose::STANDARD.decode(r["value_b64"].as_str().context("value")?)?;
            snap.records.insert(RecordKey::new(kind, r["key"].as_str().context("key")?), value);
        }
        Ok((v["jid"].as_str().context("jid")?.to_owned(), snap))
    }

    async fn summary(&self) -> anyhow::Result<serde_json::Value> {
        self.call(reqwest::Method::GET, "/v1/summary", None).await
    }

    async fn attempts_per_second(&self) -> anyhow::Result<Vec<u64>> {
        let o = self.call(reqwest::Method::GET, "/v1/observations?devices=false", None).await?;
        Ok(o["attempts_per_second"].as_array().context("series")?.iter().filter_map(|v| v.as_u64()).collect())
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A host process.
struct HostProcess {
    child: Option<Child>,
    client: HostClient,
    base: String,
    spawned_ms: UnixMillis,
    log: PathBuf,
}

impl HostProcess {
    fn spawn(bin: &Path, data: &Path, wa_url: &str, env: &[(&str, String)], log: PathBuf) -> anyhow::Result<Self> {
        let port = free_port()?;
        let base = format!("http://127.0.0.1:{port}");
        let wrapper = HOST_WRAPPER.get().filter(|w| !w.is_empty());
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = Command::new(&w[0]);
                c.args(&w[1..]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WAKEEPER_LISTEN", format!("127.0.0.1:{port}"))
            .env("WAKEEPER_DATA_DIR", data)
            .env("WAKEEPER_KEY_FILE", data.parent().context("data dir parent")?.join("data.key"))
            .env("WAKEEPER_CONTROL_TOKEN", TOKEN)
            .env("WAKEEPER_HOST_ID", "bench-host")
            .env("WAKEEPER_WA_URL", wa_url)
            .env("WAKEEPER_SWEEP_INTERVAL_S", "0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        for (k, v) in env {
            cmd.env(k, v);
        }
        for (k, v) in HOST_ENV.get().into_iter().flatten() {
            cmd.env(k, v);
        }
        let spawned_ms = now_millis();
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let client = HostClient::new(&base, TOKEN, Duration::from_secs(300))?.with_attempts(1);
        Ok(Self { child: Some(child), client, base, spawned_ms, log })
    }

    /// The host's pid (under a wrapper: the descendant running the host binary, not e.g. heaptrack's own
    /// interpreter process).
    fn pid(&self) -> u32 {
        let root = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        let mut queue = vec![root];
        while let Some(pid) = queue.pop() {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            if exe.as_deref().and_then(Path::file_name) == Some(std::ffi::OsStr::new("socket-host")) {
                return pid;
            }
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            queue.extend(children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        root
    }

    async fn ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.client.health().await.is_err() {
            ensure!(Instant::now() < deadline, "host did not answer /health; log {}", self.log.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until `n` sessions are open; returns the list.
    async fn all_open(&self, n: usize, limit: Duration) -> anyhow::Result<SessionList> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(list) = self.client.sessions().await {
                let open = list.sessions.iter().filter(|s| s.state == SessionState::Open).count();
                if open >= n {
                    return Ok(list);
                }
                if Instant::now() > deadline {
                    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
                    for s in &list.sessions {
                        *states.entry(s.state.as_str()).or_default() += 1;
                    }
                    bail!("only {open}/{n} open after {limit:?}: {states:?}; log {}", self.log.display());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (graceful: flush, release leases).
    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---- seeding -----------------------------------------------------------------------------------------------------

struct Fleet {
    ids: Vec<TenantId>,
    jids: Vec<String>,
    snapshots: Vec<CredentialSnapshot>,
}

async fn mint_fleet(sim: &SimProcess, n: usize, prefix: &str) -> anyhow::Result<Fleet> {
    let ids: Vec<TenantId> = (0..n).map(|i| TenantId::parse(&format!("{prefix}-{i:05}")).expect("valid id")).collect();
    let minted: Vec<anyhow::Result<(String, CredentialSnapshot)>> =
        futures_util::stream::iter(ids.iter().map(|id| sim.mint(id))).buffered(16).collect().await;
    let mut jids = Vec::with_capacity(n);
    let mut snapshots = Vec::with_capacity(n);
    for m in minted {
        let (j, s) = m?;
        jids.push(j);
        snapshots.push(s);
    }
    Ok(Fleet { ids, jids, snapshots })
}

/// A data directory template: the data key beside `data/`, and `data/store.redb` with every tenant desired
/// and (unless `credentials` is false) its credentials.
async fn seed_embedded(root: &Path, fleet: &Fleet, credentials: bool) -> anyhow::Result<Cipher> {
    std::fs::create_dir_all(root.join("data"))?;
    let cipher = Cipher::new(&LocalKeyFile::new(root.join("data.key")).data_key()?);
    let store = EmbeddedStore::open(root.join("data").join("store.redb"), cipher.clone())?;
    for (id, snap) in fleet.ids.iter().zip(&fleet.snapshots) {
        if credentials {
            store.replace(id, snap, 0).await?;
        }
        store.set_desired(id, true).await?;
    }
    Ok(cipher)
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

// ---- restore -----------------------------------------------------------------------------------------------------

struct RestoreRun {
    seconds: f64,
    health_s: f64,
    peak_attempts: u64,
    /// CPU seconds the host and the fake server spent until every session was open.
    host_cpu_s: f64,
    sim_cpu_s: f64,
}

/// Starts a host on a fresh copy of `template` and times process start to every session open.
async fn timed_restore(
    ctx: &Ctx,
    template: &Path,
    run: &str,
    env: &[(&str, String)],
    keep_running: bool,
) -> anyhow::Result<(RestoreRun, Option<HostProcess>, PathBuf)> {
    let root = ctx.scratch.join(run);
    copy_dir(template, &root)?;
    let before = ctx.sim.attempts_per_second().await?.len();
    let sim_cpu_before = cpu_seconds(ctx.sim.child.id());
    let host = HostProcess::spawn(&ctx.host_bin, &root.join("data"), &ctx.sim.ws_url, env, root.join("host.log"))?;
    host.ready().await?;
    let health_s = (now_millis() - host.spawned_ms) as f64 / 1000.0;
    let list = host.all_open(ctx.n, Duration::from_secs(180)).await?;
    let host_cpu_s = cpu_seconds(host.pid());
    let sim_cpu_s = cpu_seconds(ctx.sim.child.id()) - sim_cpu_before;
    let last_open = list.sessions.iter().filter_map(|s| s.connected_since_ms).max().unwrap_or(now_millis());
    let seconds = (last_open - host.spawned_ms) as f64 / 1000.0;
    let series = ctx.sim.attempts_per_second().await?;
    let peak = series[before.saturating_sub(1)..].iter().copied().max().unwrap_or(0);
    let mut host = host;
    if !keep_running {
        host.terminate();
    }
    Ok((
        RestoreRun { seconds, health_s, peak_attempts: peak, host_cpu_s, sim_cpu_s },
        keep_running.then_some(host),
        root,
    ))
}

/// The governor a host started without governor settings of its section runs with: the defaults, or what
/// `--host-env` sets.
fn default_governor() -> GovernorConfig {
    let mut g = GovernorConfig::default();
    for (k, v) in HOST_ENV.get().into_iter().flatten() {
        match k.as_str() {
            "WAKEEPER_CONNECT_RATE" => g.rate_per_sec = v.parse().unwrap_or(g.rate_per_sec),
            "WAKEEPER_CONNECT_BURST" => g.burst = v.parse().unwrap_or(g.burst),
            "WAKEEPER_CONNECT_IN_FLIGHT" => g.max_in_flight = v.parse().unwrap_or(g.max_in_flight),
            _ => {}
        }
    }
    g
}

fn governor_label(g: GovernorConfig) -> String {
    format!("{}/s, burst {}, {} in flight", g.rate_per_sec, g.burst, g.max_in_flight)
}

fn governor_env(unlimited: bool) -> Vec<(&'static str, String)> {
    if unlimited {
        vec![("WAKEEPER_CONNECT_RATE", "0".into()), ("WAKEEPER_CONNECT_IN_FLIGHT", "0".into())]
    } else {
        Vec::new()
    }
}

struct Ctx {
    args: Args,
    n: usize,
    sim: SimProcess,
    host_bin: PathBuf,
    scratch: PathBuf,
    fleet: Fleet,
    embedded_template: PathBuf,
    firestore: Option<String>,
}

async fn bench_restore(ctx: &Ctx, t: &mut Table) -> anyhow::Result<()> {
    let n = ctx.n;
    println!("== restore of {n} tenants from the embedded store");
    for unlimited in [true, false] {
        let label = if unlimited {
            "governor unlimited".to_owned()
        } else {
            format!("governor defaults ({})", governor_label(default_governor()))
        };
        let run_name = if unlimited { "restore-embedded-unlimited" } else { "restore-embedded-defaults" };
        let (r, host, root) =
            timed_restore(ctx, &ctx.embedded_template, run_name, &governor_env(unlimited), unlimited).await?;
        let met = if unlimited { Some(r.seconds <= 2.0) } else { None };
        t.row(
            &format!("Restore {n} from embedded store, {label}"),
            format!(
                "{:.2} s ({:.0} tenants/s; /health after {:.2} s; peak {}/s connects; CPU host {:.2} s, sim {:.2} s)",
                r.seconds,
                n as f64 / r.seconds,
                r.health_s,
                r.peak_attempts,
                r.host_cpu_s,
                r.sim_cpu_s
            ),
            if unlimited { "<= 2 s" } else { "" },
            met,
        );
        t.raw(
            run_name,
            json!({
                "seconds": r.seconds,
                "health_s": r.health_s,
                "peak_attempts_per_s": r.peak_attempts,
                "host_cpu_s": r.host_cpu_s,
                "sim_cpu_s": r.sim_cpu_s
            }),
        );
        if let Some(mut host) = host {
            // The same disk after SIGKILL: working copies are there, leases are this host's own.
            host.kill9();
            let data = root.join("data");
            let again = HostProcess::spawn(
                &ctx.host_bin,
                &data,
                &ctx.sim.ws_url,
                &governor_env(true),
                root.join("host-2.log"),
            )?;
            again.ready().await?;
            let list = again.all_open(n, Duration::from_secs(180)).await?;
            let last = list.sessions.iter().filter_map(|s| s.connected_since_ms).max().unwrap_or(now_millis());
            let secs = (last - again.spawned_ms) as f64 / 1000.0;
            let cpu = cpu_seconds(again.pid());
            t.row(
                &format!("Restart after SIGKILL, {n} tenants, working copies on disk, governor unlimited"),
                format!("{secs:.2} s ({:.0} tenants/s; CPU host {cpu:.2} s)", n as f64 / secs),
                "",
                None,
            );
            t.raw("restart-after-sigkill", json!({ "seconds": secs, "host_cpu_s": cpu }));
            let mut again = again;
            again.terminate();
        }
    }
    let Some(emulator) = &ctx.firestore else {
        t.row(
            &format!("Restore {n} from Firestore emulator"),
            "not measured (FIRESTORE_EMULATOR_HOST unset)".into(),
            "<= 15 s",
            None,
        );
        return Ok(());
    };
    println!("== restore of {n} tenants from the Firestore emulator");
    let prefix = format!("bench{}_", random_hex(4));
    let template = ctx.scratch.join("template-firestore");
    let cipher = seed_embedded(&template, &ctx.fleet, false).await?;
    let creds = Arc::new(FirestoreCredentialStore::new(FIRESTORE_PROJECT, cipher, prefix.clone()).await?);
    let started = Instant::now();
    let seeded: Vec<Result<(), StoreError>> =
        futures_util::stream::iter(ctx.fleet.ids.iter().zip(&ctx.fleet.snapshots))
            .map(|(id, snap)| {
                let creds = creds.clone();
                async move { creds.replace(id, snap, 0).await }
            })
            .buffer_unordered(16)
            .collect()
            .await;
    for s in seeded {
        s?;
    }
    println!("  seeded {n} snapshots into the emulator in {:.1} s", started.elapsed().as_secs_f64());
    for unlimited in [true, false] {
        let mut env = governor_env(unlimited);
        env.push(("FIRESTORE_EMULATOR_HOST", emulator.clone()));
        env.push(("WAKEEPER_FIRESTORE_PROJECT", FIRESTORE_PROJECT.into()));
        env.push(("WAKEEPER_FIRESTORE_PREFIX", prefix.clone()));
        let label = if unlimited { "governor unlimited" } else { "governor defaults" };
        let run_name = if unlimited { "restore-firestore-unlimited" } else { "restore-firestore-defaults" };
        let (r, _, _) = timed_restore(ctx, &template, run_name, &env, false).await?;
        t.row(
            &format!("Restore {n} from Firestore emulator (fresh disk), {label}"),
            format!("{:.2} s ({:.0} tenants/s; peak {}/s connects)", r.seconds, n as f64 / r.seconds, r.peak_attempts),
            "<= 15 s",
            Some(r.seconds <= 15.0),
        );
        t.raw(
            run_name,
            json!({ "seconds": r.seconds, "health_s": r.health_s, "peak_attempts_per_s": r.peak_attempts }),
        );
    }
    Ok(())
}

// ---- RSS, recovery, the real session list ------------------------------------------------------------------------

async fn bench_rss_and_recovery(ctx: &Ctx, t: &mut Table) -> anyhow::Result<()> {
    let n = ctx.n;
    println!("== RSS per open idle session and recovery after drops ({n} tenants, governor defaults)");
    let root = ctx.scratch.join("rss");
    copy_dir(&ctx.embedded_template, &root)?;
    let env = vec![("WAKEEPER_RESTORE_ON_START", "false".to_string())];
    let host = HostProcess::spawn(&ctx.host_bin, &root.join("data"), &ctx.sim.ws_url, &env, root.join("host.log"))?;
    host.ready().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_empty = rss_kib(host.pid());
    let restored = host.client.restore(&RestoreRequest::default()).await?;
    ensure!(restored.accepted as usize == n, "restore accepted {} of {n}", restored.accepted);
    host.all_open(n, Duration::from_secs(180)).await?;
    // Idle: let the connect-time work (and allocator caches) settle before measuring.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let rss_open = rss_kib(host.pid());
    let per = (rss_open.saturating_sub(rss_empty)) as f64 / n as f64;
    t.row(
        &format!("RSS per open idle session at {n}"),
        format!(
            "{per:.1} KiB (host {:.1} MiB with 0, {:.1} MiB with {n} open)",
            rss_empty as f64 / 1024.0,
            rss_open as f64 / 1024.0
        ),
        "<= 100 KiB",
        Some(per <= 100.0),
    );
    t.raw("rss", json!({ "empty_kib": rss_empty, "open_kib": rss_open, "per_session_kib": per }));
    if HOST_WRAPPER.get().is_some_and(|w| !w.is_empty()) {
        // A profiling run: the wrapper records what is live now.
        let _ = Command::new("kill").arg("-KILL").arg(host.pid().to_string()).status();
        let mut host = host;
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

    // Single drops, one at a time.
    let list = host.client.sessions().await?;
    let jid_of: HashMap<&TenantId, &String> = ctx.fleet.ids.iter().zip(&ctx.fleet.jids).collect();
    let mut single = Vec::new();
    for s in list.sessions.iter().step_by((n / ctx.args.single_drops.max(1)).max(1)).take(ctx.args.single_drops) {
        let jid = jid_of.get(&s.tenant_id).context("jid of tenant")?;
        let dropped_at = now_millis();
        let hit = ctx.sim.call(reqwest::Method::POST, &format!("/v1/faults/drop?device={jid}"), None).await?;
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

    // Every socket at once.
    let before = ctx.sim.attempts_per_second().await?.len();
    let dropped_at = now_millis();
    let hit = ctx.sim.call(reqwest::Method::POST, "/v1/faults/drop", None).await?;
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
    let series = ctx.sim.attempts_per_second().await?;
    let peak = series[before.saturating_sub(1)..].iter().copied().max().unwrap_or(0);
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
    let mut host = host;
    host.terminate();

    // The same figure with glibc limited to two malloc arenas (what a container could set): how much of the
    // per-session RSS is allocator arenas rather than live data.
    let root = ctx.scratch.join("rss-arenas");
    copy_dir(&ctx.embedded_template, &root)?;
    let env = vec![("WAKEEPER_RESTORE_ON_START", "false".to_string()), ("MALLOC_ARENA_MAX", "2".to_string())];
    let mut host = HostProcess::spawn(&ctx.host_bin, &root.join("data"), &ctx.sim.ws_url, &env, root.join("host.log"))?;
    host.ready().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let empty = rss_kib(host.pid());
    host.client.restore(&RestoreRequest::default()).await?;
    host.all_open(n, Duration::from_secs(180)).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let open = rss_kib(host.pid());
    let per = open.saturating_sub(empty) as f64 / n as f64;
    t.row(
        &format!("RSS per open idle session at {n}, MALLOC_ARENA_MAX=2"),
        format!(
            "{per:.1} KiB (host {:.1} MiB with 0, {:.1} MiB with {n} open)",
            empty as f64 / 1024.0,
            open as f64 / 1024.0
        ),
        "",
        None,
    );
    t.raw("rss-arenas", json!({ "empty_kib": empty, "open_kib": open, "per_session_kib": per }));
    host.terminate();
    Ok(())
}

/// Times `GET /v1/sessions` `rounds` times; returns sorted latencies (ms) and the body size.
async fn time_list(base: &str, rounds: usize) -> anyhow::Result<(Vec<f64>, usize)> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
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

// ---- 10,000 sessions in process ----------------------------------------------------------------------------------

/// A tenant table in memory: every lease granted (the figure is about listing, not about the store).
#[derive(Default)]
struct MemTenants {
    records: Mutex<HashMap<TenantId, TenantRecord>>,
}

#[async_trait]
impl TenantStore for MemTenants {
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
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<Lease, StoreError> {
        Ok(Lease { owner: owner.into(), epoch: 1, expires_at: now + ttl_ms as i64 })
    }
    async fn renew_lease(
        &self,
        _t: &TenantId,
        lease: &Lease,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> Result<Lease, StoreError> {
        Ok(Lease { expires_at: now + ttl_ms as i64, ..lease.clone() })
    }
    async fn release_lease(&self, _t: &TenantId, _lease: &Lease) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Empty in-memory engine stores: the sessions never get past the governor (see `bench_list`).
struct IdleEngines;

#[async_trait]
impl EngineProvider for IdleEngines {
    async fn open(&self, _tenant: &TenantId, _epoch: u64) -> Result<Arc<dyn Backend>, OpenError> {
        Ok(Arc::new(whatsapp_rust::wacore::store::InMemoryBackend::new()))
    }
    async fn delete(&self, _tenant: &TenantId) -> Result<(), OpenError> {
        Ok(())
    }
}

async fn bench_list(ctx: &Ctx, t: &mut Table) -> anyhow::Result<()> {
    let m = ctx.args.sessions;
    println!("== GET /v1/sessions and the sweep decision at {m} sessions (in process)");
    // A governor that hands out one token a day: every session waits in `connecting`, costing no CPU while the
    // list is timed. The list's size per session is the same in any state (an open session carries two more
    // numbers, ~30 bytes).
    let governor = Arc::new(Governor::new(GovernorConfig { rate_per_sec: 1.0 / 86_400.0, burst: 1, max_in_flight: 1 }));
    let tenants = Arc::new(MemTenants::default());
    let host = Host::new(
        tenants.clone(),
        Arc::new(IdleEngines),
        governor,
        SessionConfig::new("ws://127.0.0.1:9/ws/chat", "bench-list-host"),
    );
    let ids: Vec<TenantId> = (0..m).map(|i| TenantId::parse(&format!("tenant-{i:06}")).expect("valid")).collect();
    for id in &ids {
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

    // The sweep's decision over a healthy fleet of m: every tenant desired, connected and open.
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
    let list = SessionList {
        boot_id: "bench".into(),
        sessions: ids
            .iter()
            .map(|id| SessionView {
                tenant_id: id.clone(),
                state: SessionState::Open,
                since_ms: now - 3_600_000,
                connected_since_ms: Some(now - 3_600_000),
                last_frame_ago_ms: Some(1200),
                reconnects: 0,
                consecutive_failures: 0,
                backoff_ms: None,
                last_error: None,
            })
            .collect(),
    };
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

// ---- replication -------------------------------------------------------------------------------------------------

async fn bench_replication(ctx: &Ctx, t: &mut Table) -> anyhow::Result<()> {
    let n = ctx.n;
    if ctx.firestore.is_none() {
        t.row("Replication lag", "not measured (FIRESTORE_EMULATOR_HOST unset)".into(), "p99 <= 1 s", None);
        return Ok(());
    }
    let rate = ctx.args.churn_rate;
    let secs = ctx.args.churn_seconds;
    println!("== replication lag to the Firestore emulator: {n} tenants, {rate} changes/tenant/s for {secs} s");
    let root = ctx.scratch.join("replication");
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
    let handle = replicator.handle();
    let mut engines = Vec::with_capacity(n);
    for (id, snap) in ctx.fleet.ids.iter().zip(&ctx.fleet.snapshots) {
        store.replace(id, snap, 1).await?;
        let (data, id2, c2, s2) = (root.clone(), id.clone(), cipher.clone(), snap.clone());
        let wc = tokio::task::spawn_blocking(move || -> anyhow::Result<WorkingCopy> {
            let mut wc = WorkingCopy::open(&data, id2, c2)?;
            wc.write_base(&s2)?;
            Ok(wc)
        })
        .await??;
        engines.push(EngineStore::open(wc, handle.attach(id.clone(), 1))?);
    }
    let period = Duration::from_secs_f64(1.0 / rate);
    let started = tokio::time::Instant::now();
    let until = started + Duration::from_secs(secs);
    let late = Arc::new(std::sync::atomic::AtomicU64::new(0));
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
                        late.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
    let churn_elapsed = started.elapsed();
    let report = replicator.flush(tokio::time::Instant::now() + Duration::from_secs(60)).await;
    ensure!(report.is_complete(), "replication flush left {report:?}");
    // What the store has equals what the engines hold locally.
    for (i, id) in ctx.fleet.ids.iter().enumerate().step_by(97) {
        let remote = store.generation(id).await?.unwrap_or(0);
        let local = WorkingCopy::open(&root, id.clone(), cipher.clone())?.generation().unwrap_or(0);
        ensure!(remote == local, "tenant {i}: store at {remote}, local at {local}");
    }
    let commits = commits.lock().expect("lock").clone();
    let steady: Vec<&CommitInfo> = commits.iter().filter(|c| c.started < started + Duration::from_secs(secs)).collect();
    let lags = sorted(steady.iter().map(|c| c.lag.as_secs_f64()).collect());
    let mut per_tenant: HashMap<&TenantId, Vec<tokio::time::Instant>> = HashMap::new();
    for c in &steady {
        per_tenant.entry(&c.tenant).or_default().push(c.started);
    }
    let mut violations = 0;
    for starts in per_tenant.values_mut() {
        starts.sort();
        violations += starts.windows(2).filter(|w| w[1] - w[0] < window - Duration::from_millis(5)).count();
    }
    let commits_per_s = steady.len() as f64 / secs as f64;
    let (p50, p99) = (percentile(&lags, 50.0), percentile(&lags, 99.0));
    t.row(
        &format!("Replication lag to Firestore emulator, {n} tenants, {rate} change/tenant/s"),
        format!(
            "p50 {:.0} ms, p99 {:.0} ms; {commits_per_s:.0} commits/s ({:.2} writes/commit, {writes} engine writes in {:.1} s)",
            p50 * 1000.0,
            p99 * 1000.0,
            steady.iter().map(|c| c.writes).sum::<usize>() as f64 / steady.len().max(1) as f64,
            churn_elapsed.as_secs_f64()
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
    let late = late.load(std::sync::atomic::Ordering::Relaxed);
    if late > 0 {
        t.note(format!(
            "replication churn: {late} engine writes started late (the machine could not keep the schedule)"
        ));
    }
    t.raw(
        "replication",
        json!({ "p50_s": p50, "p99_s": p99, "commits": steady.len(), "violations": violations, "writes": writes }),
    );
    Ok(())
}

// ---- Lambda bootstraps ------------------------------------------------------------------------------------------

/// Bootstrap sizes (the arm64 builds of `scripts/build-functions`) and cold-start init times (the native release
/// builds beside this binary, see [`lambda_init`]).
async fn bench_lambda(ctx: &Ctx, t: &mut Table) -> anyhow::Result<()> {
    let dir = ctx.args.lambda_dir.clone().unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target"))
            .join("lambda")
    });
    for f in ["restore", "health-sweep"] {
        let zip = dir.join(f).join("bootstrap.zip");
        let raw = dir.join(f).join("bootstrap");
        let size = |p: &Path| std::fs::metadata(p).ok().map(|m| m.len() as f64 / 1_048_576.0);
        let (text, met) = match (size(&zip), size(&raw)) {
            (Some(z), r) => (
                format!("{z:.2} MiB zipped{}", r.map(|r| format!(", {r:.2} MiB unzipped")).unwrap_or_default()),
                Some(z <= 8.0),
            ),
            (None, Some(r)) => match zipped_size(&raw) {
                Some(z) => (format!("{z:.2} MiB zipped (deflate, by the bench), {r:.2} MiB unzipped"), Some(z <= 8.0)),
                None => (format!("{r:.2} MiB unzipped"), None),
            },
            (None, None) => (format!("not built ({})", dir.join(f).display()), None),
        };
        t.row(&format!("Lambda bootstrap `{f}` (arm64)"), text, "<= 8 MB zipped", met);
    }
    let runs = ctx.args.lambda_cold_starts;
    for f in ["restore", "health-sweep"] {
        let bin = ctx.host_bin.with_file_name(f);
        ensure!(bin.exists(), "{} is not built (scripts/bench builds it: cargo build --release -p {f})", bin.display());
        let mut raw = serde_json::Map::new();
        let mut cells = Vec::new();
        let mut met = None;
        for setup in LambdaSetup::ALL {
            let starts = lambda_init(ctx, &bin, f, setup, runs).await.with_context(|| format!("{f}, {setup:?}"))?;
            let mut wall: Vec<f64> = starts.iter().map(|s| s.wall_ms).collect();
            let mut cpu: Vec<f64> = starts.iter().map(|s| s.cpu_ms).collect();
            wall.sort_by(f64::total_cmp);
            cpu.sort_by(f64::total_cmp);
            let (p50, max, cpu50) = (wall[wall.len() / 2], wall[wall.len() - 1], cpu[cpu.len() / 2]);
            println!(
                "  {f} {setup:?}: init p50 {p50:.1} ms, max {max:.1} ms, first {:.1} ms, cpu p50 {cpu50:.1} ms",
                starts[0].wall_ms
            );
            cells.push(format!("{}: p50 {p50:.1} ms, max {max:.1} ms (CPU p50 {cpu50:.1} ms)", setup.label()));
            if setup == LambdaSetup::Deployed {
                met = Some(p50 <= 30.0);
            }
            raw.insert(
                format!("{setup:?}"),
                json!({ "wall_ms": starts.iter().map(|s| s.wall_ms).collect::<Vec<_>>(),
                        "cpu_ms": starts.iter().map(|s| s.cpu_ms).collect::<Vec<_>>() }),
            );
        }
        t.raw(&format!("lambda-init-{f}"), serde_json::Value::Object(raw));
        t.row(
            &format!("Lambda init `{f}` (native release build, exec -> first `GET /runtime/invocation/next`, {runs} cold starts each)"),
            cells.join("; "),
            "<= 30 ms",
            met,
        );
    }
    let (floor50, floor_max) = exec_floor_ms(ctx.args.lambda_nice, runs)?;
    t.raw("lambda-exec-floor", json!({ "p50_ms": floor50, "max_ms": floor_max }));
    t.row(
        "Starting any process here (`nice /bin/true`, exec to exit), the floor under the init figures",
        format!("p50 {floor50:.1} ms, max {floor_max:.1} ms"),
        "",
        None,
    );
    t.note(format!(
        "Lambda init = what Lambda reports as Init Duration: from the bootstrap's exec to its first \
         `GET /2018-06-01/runtime/invocation/next` on a Runtime API stub on 127.0.0.1 (the process is then \
         killed: every start is cold, page cache warm), started through `nice -n {nice}` so that other load on \
         the machine time-shares it less (a Lambda init runs alone in its microVM); the target is judged on the \
         p50. `as deployed`: template.yaml's variables (token in Secrets Manager and, for the sweep, an SNS topic: \
         aws-config loaded from the environment, secrets fetched by the first invocation), AWS endpoints pointed \
         at a closed local port (any request at init would fail the start); `token given`: the same with the \
         token as a value (host clients built at init); `no AWS config`: DynamoDB endpoint and token given, as \
         scripts/invoke-local runs them. CPU = on-CPU time of all the process's threads at that moment.",
        nice = ctx.args.lambda_nice
    ));
    Ok(())
}

/// coreutils' `nice`, by path (the measured processes get an empty environment).
const NICE: &str = if cfg!(target_os = "linux") { "/usr/bin/nice" } else { "nice" };

/// What starting any process costs on this machine at this moment: `nice -n N /bin/true`, exec to exit, p50 and
/// max of `runs` (the floor under every init figure; a few ms on an idle machine).
fn exec_floor_ms(nice: i32, runs: usize) -> anyhow::Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        let status =
            Command::new(NICE).arg("-n").arg(nice.to_string()).arg("/bin/true").stderr(Stdio::null()).status()?;
        ensure!(status.success(), "nice /bin/true: {status}");
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], ms[ms.len() - 1]))
}

/// The three configurations the init time is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LambdaSetup {
    /// template.yaml's variables: the control token in Secrets Manager, the real DynamoDB (aws-config loaded).
    Deployed,
    /// The same with the token given as a value (so the host clients are built at init).
    TokenGiven,
    /// A DynamoDB endpoint and the token given: aws-config never loaded (scripts/invoke-local's setup).
    NoAwsConfig,
}

impl LambdaSetup {
    const ALL: [LambdaSetup; 3] = [LambdaSetup::Deployed, LambdaSetup::TokenGiven, LambdaSetup::NoAwsConfig];

    fn label(self) -> &'static str {
        match self {
            LambdaSetup::Deployed => "as deployed",
            LambdaSetup::TokenGiven => "token given",
            LambdaSetup::NoAwsConfig => "no AWS config",
        }
    }
}

/// One cold start: wall time from exec to the first `next` request, and the process's CPU time by then.
struct ColdStart {
    wall_ms: f64,
    cpu_ms: f64,
}

/// Starts `bin` `runs` times against a Runtime API stub and times each start to its first
/// `GET /2018-06-01/runtime/invocation/next` (Lambda's init phase ends there), then kills it.
async fn lambda_init(
    ctx: &Ctx,
    bin: &Path,
    function: &str,
    setup: LambdaSetup,
    runs: usize,
) -> anyhow::Result<Vec<ColdStart>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let app = axum::Router::new().route(
        "/2018-06-01/runtime/invocation/next",
        axum::routing::get(move || {
            let _ = tx.send(Instant::now());
            // Never answers: the measured process is killed while it waits for its first event.
            std::future::pending::<String>()
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let runtime_api = listener.local_addr()?.to_string();
    let stub = tokio::spawn(async move { axum::serve(listener, app).await });
    // A port nothing listens on: every AWS or host request the function might make at init fails at once.
    let closed = format!("http://127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port());
    let home = ctx.scratch.join(format!("lambda-{function}-home"));
    std::fs::create_dir_all(&home)?;
    let mut env: Vec<(&str, String)> = vec![
        ("AWS_LAMBDA_RUNTIME_API", runtime_api.clone()),
        ("AWS_LAMBDA_FUNCTION_NAME", format!("wakeeper-{function}")),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256".into()),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
        ("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/wakeeper-{function}")),
        ("AWS_LAMBDA_LOG_STREAM_NAME", "2026/11/28/[$LATEST]0123456789abcdef".into()),
        ("LAMBDA_TASK_ROOT", "/var/task".into()),
        ("HOME", home.display().to_string()),
        ("WAKEEPER_HOST_URLS", closed.clone()),
        ("WAKEEPER_DYNAMODB_TABLE", "wakeeper-TenantTable-0123456789".into()),
        ("WAKEEPER_HOST_TIMEOUT_S", "10".into()),
        ("WAKEEPER_LOG", "info".into()),
    ];
    let aws = [
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ("AWS_ACCESS_KEY_ID", "ASIAWAKEEPERBENCH000".into()),
        ("AWS_SECRET_ACCESS_KEY", "wakeeper-bench-not-a-secret-0000000000000".into()),
        ("AWS_SESSION_TOKEN", "wakeeper-bench-session".into()),
        ("AWS_ENDPOINT_URL", closed.clone()),
    ];
    let token = ("WAKEEPER_CONTROL_TOKEN", TOKEN.to_string());
    match setup {
        LambdaSetup::Deployed => {
            env.extend(aws.iter().cloned());
            env.push((
                "WAKEEPER_CONTROL_TOKEN_SECRET_ARN",
                "arn:aws:secretsmanager:us-east-1:123456789012:secret:wakeeper-control-token-AbCdEf".into(),
            ));
        }
        LambdaSetup::TokenGiven => {
            env.extend(aws.iter().cloned());
            env.push(token);
        }
        LambdaSetup::NoAwsConfig => {
            env.push(token);
            env.push(("WAKEEPER_DYNAMODB_ENDPOINT", closed.clone()));
        }
    }
    if function == "health-sweep" {
        env.extend([
            ("WAKEEPER_SWEEP_STUCK_AFTER_S", "300".to_string()),
            ("WAKEEPER_SWEEP_ALERT_AFTER", "3".into()),
            ("WAKEEPER_SWEEP_SILENT_AFTER_S", "120".into()),
        ]);
        if setup != LambdaSetup::NoAwsConfig {
            env.push(("WAKEEPER_ALERT_TOPIC_ARN", "arn:aws:sns:us-east-1:123456789012:wakeeper-alerts".into()));
        }
    } else {
        env.push(("WAKEEPER_RESTORE_CONCURRENCY", "16".into()));
    }

    let log = ctx.scratch.join(format!("lambda-{function}-{setup:?}.log"));
    let mut starts = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        // Through coreutils' `nice`: the machine's other load must not time-share the start (a Lambda init runs
        // alone in its microVM). nice's own exec (~1 ms) counts against the figure.
        let mut child = Command::new(NICE)
            .arg("-n")
            .arg(ctx.args.lambda_nice.to_string())
            .arg(bin)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(std::fs::File::create(&log)?)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let deadline = started + Duration::from_secs(10);
        let outcome = loop {
            tokio::select! {
                at = rx.recv() => break at.context("the Runtime API stub stopped"),
                _ = tokio::time::sleep(Duration::from_millis(5)) => {
                    if let Some(status) = child.try_wait()? {
                        break Err(anyhow::anyhow!("exited with {status} before asking for an event: {}",
                            std::fs::read_to_string(&log).unwrap_or_default().trim()));
                    }
                    if Instant::now() > deadline {
                        break Err(anyhow::anyhow!("no `next` request within 10 s"));
                    }
                }
            }
        };
        let cpu_ms = on_cpu_ms(child.id());
        let _ = child.kill();
        let _ = child.wait();
        let at = outcome?;
        starts.push(ColdStart { wall_ms: at.duration_since(started).as_secs_f64() * 1000.0, cpu_ms });
    }
    stub.abort();
    Ok(starts)
}

/// On-CPU time of every live thread of a process, from `/proc/<pid>/task/*/schedstat` (nanoseconds).
fn on_cpu_ms(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return f64::NAN };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ns as f64 / 1e6
}

/// Deflates a file with python3's zipfile (no zip crate in the workspace); `None` when python3 is missing.
fn zipped_size(path: &Path) -> Option<f64> {
    let out = Command::new("python3")
        .arg("-c")
        .arg("import io,sys,zipfile\nb=io.BytesIO()\nz=zipfile.ZipFile(b,'w',zipfile.ZIP_DEFLATED)\nz.write(sys.argv[1],'bootstrap')\nz.close()\nprint(len(b.getvalue()))")
        .arg(path)
        .output()
        .ok()?;
    String::from_utf8(out.stdout).ok()?.trim().parse::<f64>().ok().map(|b| b / 1_048_576.0)
}

// ---- Baileys ----------------------------------------------------------------------------------------------------

async fn bench_baileys(ctx: &Ctx, t: &mut Table) -> anyhow::Result<()> {
    let n = ctx.args.baileys;
    println!("== Baileys 7.0.0-rc14: {n} sockets in one Node process against the same wa-sim");
    let dir = ctx.scratch.join("baileys");
    let script =
        ctx.args.baileys_script.canonicalize().with_context(|| format!("{}", ctx.args.baileys_script.display()))?;
    let run = |phase: &str, extra: &[&str]| -> anyhow::Result<serde_json::Value> {
        let mut cmd = Command::new("node");
        if phase == "restore" {
            cmd.arg("--expose-gc");
        }
        cmd.arg(&script)
            .arg(phase)
            .args(["--control", &ctx.sim.control, "--n", &n.to_string(), "--dir"])
            .arg(&dir)
            .args(extra)
            .env("WA_SIM_WS_URL", &ctx.sim.ws_url)
            .current_dir(script.parent().context("script dir")?)
            .stderr(Stdio::inherit());
        let out = cmd.output().context("running node")?;
        ensure!(out.status.success(), "baileys {phase} failed ({})", out.status);
        let text = String::from_utf8(out.stdout)?;
        let line = text.lines().last().context("no result line")?;
        Ok(serde_json::from_str(line)?)
    };
    let prime = run("prime", &[])?;
    let restore = run("restore", &["--settle-ms", "10000"])?;
    t.raw("baileys", json!({ "prime": prime, "restore": restore }));
    let b_secs = restore["seconds_from_process_start"].as_f64().context("seconds")?;
    let b_rss = restore["rss_per_session_kib"].as_f64().context("rss")?;
    let per_b = b_secs / n as f64;
    let wn = ctx.n as f64;
    if let Some(w) = t.raw.get("restore-embedded-unlimited").and_then(|v| v["seconds"].as_f64()) {
        let label = format!("Restore {} from embedded store, governor unlimited", ctx.n);
        let ratio = (w / wn) / per_b;
        if let Some(row) = t.find(&label) {
            row.baileys = format!("{b_secs:.2} s for {n} sockets ({:.0}/s)", n as f64 / b_secs);
            row.ratio = format!("{ratio:.3} (time per session)");
        }
        t.row(
            "Restore time per session, wakeeper / Baileys",
            format!("{ratio:.3} ({:.2} ms vs {:.2} ms)", w / wn * 1000.0, per_b * 1000.0),
            "<= 1/5 (0.2)",
            Some(ratio <= 0.2),
        );
    }
    if let Some(w) = t.raw.get("rss").and_then(|v| v["per_session_kib"].as_f64()) {
        let label = format!("RSS per open idle session at {}", ctx.n);
        let ratio = w / b_rss;
        if let Some(row) = t.find(&label) {
            row.baileys = format!("{b_rss:.1} KiB (at {n})");
            row.ratio = format!("{ratio:.3}");
        }
        t.row("RSS per session, wakeeper / Baileys", format!("{ratio:.3}"), "<= 1/20 (0.05)", Some(ratio <= 0.05));
    }
    t.note(format!(
        "Baileys restore: login p50 {} ms, p99 {} ms per socket, {} reconnects, {} of {n} still open after a 10 s idle; \
         RSS {:.1} MiB before the first socket, {:.1} MiB with {n} open (after a forced GC)",
        restore["login_ms_p50"], restore["login_ms_p99"], restore["reconnects"], restore["open_after_settle"],
        restore["rss_before_kib"].as_f64().unwrap_or(0.0) / 1024.0,
        restore["rss_open_kib"].as_f64().unwrap_or(0.0) / 1024.0
    ));
    Ok(())
}

// ---- main -------------------------------------------------------------------------------------------------------

fn machine() -> String {
    let sh = |c: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(c)
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .unwrap_or_default()
    };
    let cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").trim().to_owned();
    let nproc = sh("nproc").trim().to_owned();
    let mem = sh("free -h | awk '/^Mem:/ {print $2}'").trim().to_owned();
    let load = sh("cut -d' ' -f1-3 /proc/loadavg").trim().to_owned();
    let date = sh("date -u '+%Y-%m-%d %H:%M UTC'").trim().to_owned();
    format!("{date}; {nproc} CPUs ({cpu}), {mem} RAM; load average at start {load}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    HOST_ENV.set(args.host_env.clone()).expect("set once");
    HOST_WRAPPER
        .set(args.host_wrapper.iter().flat_map(|w| w.split_whitespace().map(str::to_owned)).collect())
        .expect("set once");
    // The in-process list host's one session that gets a connect token fails against a closed port and the
    // engine logs it: keep the bench's own output to the table unless RUST_LOG asks for more.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?.parent().context("exe dir")?.to_path_buf(),
    };
    let host_bin = bin_dir.join("socket-host");
    let sim_bin = bin_dir.join("wa-sim");
    ensure!(
        host_bin.exists() && sim_bin.exists(),
        "socket-host and wa-sim must be built beside this binary ({})",
        bin_dir.display()
    );
    let machine = machine();
    println!("wakeeper-bench: {machine}");
    let scratch = std::env::temp_dir().join(format!("wakeeper-bench-{}", random_hex(4)));
    std::fs::create_dir_all(&scratch)?;
    println!("scratch dir (logs): {}", scratch.display());
    let skip = |s: &str| args.skip.iter().any(|x| x == s);

    let sim = SimProcess::spawn(&sim_bin, &scratch.join("wa-sim.log"))?;
    let n = args.tenants;
    let started = Instant::now();
    let fleet = mint_fleet(&sim, n, "bench").await?;
    println!("minted {n} devices in {:.1} s", started.elapsed().as_secs_f64());
    let embedded_template = scratch.join("template-embedded");
    seed_embedded(&embedded_template, &fleet, true).await?;
    let firestore = std::env::var("FIRESTORE_EMULATOR_HOST").ok().filter(|v| !v.is_empty());
    let ctx =
        Ctx { args: args.clone(), n, sim, host_bin, scratch: scratch.clone(), fleet, embedded_template, firestore };
    let mut t = Table::default();
    let mut failed: Vec<&str> = Vec::new();

    let sections: [(&str, bool); 7] = [
        ("restore", !skip("restore")),
        ("rss", !skip("rss") && !skip("recovery")),
        ("list", !skip("list")),
        ("replication", !skip("replication")),
        ("lambda", !skip("lambda")),
        ("baileys", !skip("baileys") && args.baileys > 0),
        ("sim", true),
    ];
    for (name, on) in sections {
        if !on {
            continue;
        }
        let outcome = match name {
            "restore" => bench_restore(&ctx, &mut t).await,
            "rss" => bench_rss_and_recovery(&ctx, &mut t).await,
            "list" => bench_list(&ctx, &mut t).await,
            "replication" => bench_replication(&ctx, &mut t).await,
            "lambda" => bench_lambda(&ctx, &mut t).await,
            "baileys" => bench_baileys(&ctx, &mut t).await,
            _ => {
                let s = ctx.sim.summary().await?;
                t.note(format!(
                    "wa-sim totals: {} handshakes, {} logins, {} rejected logins (401), peak {} connects/s",
                    s["handshakes_completed"], s["logins"], s["rejected_logins"], s["peak_attempts_per_second"]
                ));
                ensure!(s["rejected_logins"] == 0, "the simulator refused logins: some tenant would need pairing");
                Ok(())
            }
        };
        if let Err(e) = outcome {
            t.note(format!("section `{name}` failed: {e:#}"));
            failed.push(name);
        }
    }

    let table = t.render(&format!("Measured {machine}"));
    println!("\n{table}");
    if let Some(p) = &args.markdown {
        std::fs::write(p, &table)?;
    }
    if let Some(p) = &args.json {
        let rows = serde_json::to_value(&t.rows)?;
        std::fs::write(
            p,
            serde_json::to_vec_pretty(&json!({ "machine": machine, "rows": rows, "raw": t.raw, "notes": t.notes }))?,
        )?;
    }
    drop(ctx);
    if args.keep || !failed.is_empty() {
        println!("kept {} (logs of every process)", scratch.display());
    } else {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    ensure!(failed.is_empty(), "sections failed: {failed:?} (see the notes under the table)");
    Ok(())
}
