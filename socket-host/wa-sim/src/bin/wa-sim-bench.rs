//! `wa-sim-bench`: what the simulator itself costs, so it is never the bottleneck of a host benchmark.
//!
//! Starts `wa-sim` as a child process (its RSS is then its own), registers devices over the control
//! surface, and logs in N lightweight raw-Noise clients (no engine): first with Noise XX, then, after the
//! server drops them all, again with IK. Prints handshakes per second and the simulator's RSS at each N.
//!
//! Build in release and run: `cargo build --release -p wa-sim && target/release/wa-sim-bench`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;
use wa_sim::loadgen::{Credentials, ServerTrust, Session, control_request, login};

#[derive(Parser)]
#[command(name = "wa-sim-bench", about = "Handshakes per second and RSS of wa-sim at N connected clients")]
struct Args {
    /// Numbers of connected clients to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    counts: Vec<usize>,
    /// Logins in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// The `wa-sim` binary (default: next to this one).
    #[arg(long)]
    sim_bin: Option<PathBuf>,
    /// Verify the certificate chain against the simulator's root on every XX login (costs the load
    /// generator two signature checks per login; the simulator's cost is the same either way).
    #[arg(long)]
    verify_chain: bool,
}

struct SimProcess {
    child: Child,
    ws_url: String,
    control: String,
    pid: u32,
}

async fn spawn_sim(bin: PathBuf) -> anyhow::Result<SimProcess> {
    let mut child = Command::new(&bin)
        .args(["--addr", "127.0.0.1:0", "--control-addr", "127.0.0.1:0", "--backlog", "8192"])
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .env("MALLOC_ARENA_MAX", "2")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("sim stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("sim did not announce itself")??
        .context("sim exited")?;
    let info: serde_json::Value = serde_json::from_str(&line).context("sim announcement")?;
    Ok(SimProcess {
        ws_url: info["ws_url"].as_str().context("ws_url")?.to_owned(),
        control: info["control_url"].as_str().context("control_url")?.to_owned(),
        pid: info["pid"].as_u64().context("pid")? as u32,
        child,
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time the simulator process has used (user + system), from `/proc/PID/stat`. The machine is shared
/// with the load generator, so handshakes per simulator CPU-second is the figure that says what the
/// simulator itself costs.
fn cpu_time(pid: u32) -> Duration {
    // Linux reports these in clock ticks; USER_HZ is 100 on every mainstream configuration.
    const TICKS_PER_SEC: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|f| f.parse().ok()).collect();
    let ticks: u64 = fields.iter().sum();
    Duration::from_millis(ticks * 1000 / TICKS_PER_SEC)
}

async fn summary(control: &str) -> anyhow::Result<serde_json::Value> {
    Ok(control_request(control, "GET", "/v1/summary", None).await?.1)
}

/// Polls the control surface until `pred` holds (the sim is another process: polling is the only way).
async fn until(control: &str, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = summary(control).await?;
        if pred(&s) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}: {s}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connect_all(
    url: &str,
    creds: &[Arc<Credentials>],
    trust: ServerTrust,
    concurrency: usize,
) -> anyhow::Result<(Vec<Session>, Duration)> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(creds.len());
    for c in creds {
        let (gate, c, url) = (gate.clone(), c.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.expect("semaphore open");
            let mut last = None;
            for _ in 0..5 {
                match login(&url, &c, trust).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.expect("tried"))
        }));
    }
    let mut sessions = Vec::with_capacity(creds.len());
    for t in tasks {
        sessions.push(t.await?.context("login")?);
    }
    Ok((sessions, started.elapsed()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    wakeeper_shared::tls::install_crypto_provider();
    let args = Args::parse();
    let bin = match args.sim_bin {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("wa-sim"),
    };
    let mut sim = spawn_sim(bin).await?;
    let (_, keys) = control_request(&sim.control, "GET", "/v1/keys", None).await?;
    let root = hex32(keys["root_public_key"].as_str().context("root key")?)?;
    let max = args.counts.iter().copied().max().unwrap_or(0);
    let creds: Vec<Arc<Credentials>> =
        (0..max).map(|i| Arc::new(Credentials::generate(559_900_000_000 + i as u64, 1))).collect();
    for chunk in creds.chunks(1000) {
        let devices: Vec<_> = chunk
            .iter()
            .map(|c| json!({"jid": c.jid(), "noise_public": wa_sim::observe::hex(&c.noise_public())}))
            .collect();
        let (status, body) =
            control_request(&sim.control, "POST", "/v1/devices/register", Some(&json!({ "devices": devices }))).await?;
        anyhow::ensure!(status == 200, "register: {status} {body}");
    }
    // One login that checks the chain against the exported root, whatever --verify-chain says.
    let probe = login(&sim.ws_url, &creds[0], ServerTrust { root: Some(root), static_key: None })
        .await
        .context("the certificate chain does not verify against the simulator's root")?;
    drop(probe);
    until(&sim.control, "probe closed", |s| s["open_connections"] == 0).await?;
    let baseline = rss_kib(sim.pid);
    println!("wa-sim pid {} baseline RSS {:.1} MiB ({} devices registered)", sim.pid, baseline as f64 / 1024.0, max);
    println!(
        "{:>7}  {:>4}  {:>9}  {:>13}  {:>13}  {:>12}  {:>14}",
        "clients", "hs", "elapsed", "handshakes/s", "per sim CPU-s", "sim RSS", "per connection"
    );

    for &n in &args.counts {
        let xx = ServerTrust { root: args.verify_chain.then_some(root), static_key: None };
        let cpu = cpu_time(sim.pid);
        let (sessions, elapsed) = connect_all(&sim.ws_url, &creds[..n], xx, args.concurrency).await?;
        until(&sim.control, "all logged in", |s| s["logged_in_connections"] == n).await?;
        report(n, "XX", elapsed, cpu_time(sim.pid).saturating_sub(cpu), rss_kib(sim.pid), baseline);
        let server_static = sessions.first().map(|s| s.server_static);

        // The server drops everyone at once; all reconnect with IK (the host's mass-reconnect case).
        control_request(&sim.control, "POST", "/v1/faults/drop", None).await?;
        until(&sim.control, "all dropped", |s| s["logged_in_connections"] == 0).await?;
        drop(sessions);
        let ik = ServerTrust { root: None, static_key: server_static };
        let cpu = cpu_time(sim.pid);
        let (sessions, elapsed) = connect_all(&sim.ws_url, &creds[..n], ik, args.concurrency).await?;
        until(&sim.control, "all logged in again", |s| s["logged_in_connections"] == n).await?;
        report(n, "IK", elapsed, cpu_time(sim.pid).saturating_sub(cpu), rss_kib(sim.pid), baseline);

        control_request(&sim.control, "POST", "/v1/faults/drop", None).await?;
        until(&sim.control, "all dropped", |s| s["logged_in_connections"] == 0 && s["open_connections"] == 0).await?;
        drop(sessions);
    }
    let s = summary(&sim.control).await?;
    println!(
        "sim totals: {} handshakes ({} IK), peak {} connect attempts/s, {} failed",
        s["handshakes_completed"], s["handshakes_ik"], s["peak_attempts_per_second"], s["handshakes_failed"]
    );
    sim.child.kill().await.ok();
    Ok(())
}

fn report(n: usize, pattern: &str, elapsed: Duration, sim_cpu: Duration, rss: u64, baseline: u64) {
    let per = rss.saturating_sub(baseline) as f64 / n as f64;
    let per_cpu = if sim_cpu.is_zero() { f64::INFINITY } else { n as f64 / sim_cpu.as_secs_f64() };
    println!(
        "{:>7}  {:>4}  {:>8.2}s  {:>13.0}  {:>13.0}  {:>8.1} MiB  {:>10.1} KiB",
        n,
        pattern,
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        per_cpu,
        rss as f64 / 1024.0,
        per
    );
}

fn hex32(s: &str) -> anyhow::Result<[u8; 32]> {
    anyhow::ensure!(s.len() == 64, "key must be 64 hex characters");
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)?;
    }
    Ok(out)
}
