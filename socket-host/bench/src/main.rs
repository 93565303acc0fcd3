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
//! Build and run through `scripts/bench`. The host binary beside this one must be a `test-peer` build (it must
//! accept the simulator's certificate chain).
//!
//! # Layout
//! - [`table`]: the result table, its Markdown rendering, percentiles.
//! - [`system`]: RSS and CPU time of a process, free ports, random names, the machine line.
//! - [`sim_process`] and [`host_process`]: the fake server and a host as child processes.
//! - [`host_settings`]: `--host-env`, `--host-wrapper` and the connect governor every host runs with.
//! - [`fleet`]: the minted tenants and the data directory template hosts start from.
//! - one module per family of figures: [`restore`], [`rss_recovery`], [`list`], [`replication`], [`lambda`],
//!   [`baileys`].

mod baileys;
mod fleet;
mod host_process;
mod host_settings;
mod lambda;
mod list;
mod replication;
mod restore;
mod rss_recovery;
mod sim_process;
mod system;
mod table;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, ensure};
use clap::Parser;
use serde_json::json;

use crate::fleet::{Fleet, mint_fleet, seed_embedded};
use crate::host_settings::{HOST_ENV, HOST_WRAPPER};
use crate::sim_process::SimProcess;
use crate::system::{machine, random_hex};
use crate::table::Table;

/// The control token of every host the bench starts.
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
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/baileys-bench/bench.mjs"))]
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

/// What every section measures with: the options, the fake server, the host binary, the scratch directory,
/// the minted fleet and its embedded data template, and the Firestore emulator if there is one.
pub struct Bench {
    args: Args,
    sim: SimProcess,
    host_bin: PathBuf,
    scratch: PathBuf,
    fleet: Fleet,
    embedded_template: PathBuf,
    firestore: Option<String>,
}

impl Bench {
    /// Tenants in the restore, RSS, recovery and replication figures.
    fn tenants(&self) -> usize {
        self.args.tenants
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    wakeeper_shared::tls::install_crypto_provider();
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
    let machine = machine();
    let bench = start(args, &machine).await?;
    let (keep, scratch) = (bench.args.keep, bench.scratch.clone());
    let (markdown, json_out) = (bench.args.markdown.clone(), bench.args.json.clone());
    let mut t = Table::default();
    let failed = run_sections(&bench, &mut t).await?;

    let table = t.render(&format!("Measured {machine}"));
    println!("\n{table}");
    if let Some(p) = &markdown {
        std::fs::write(p, &table)?;
    }
    if let Some(p) = &json_out {
        let rows = serde_json::to_value(&t.rows)?;
        std::fs::write(
            p,
            serde_json::to_vec_pretty(&json!({ "machine": machine, "rows": rows, "raw": t.raw, "notes": t.notes }))?,
        )?;
    }
    drop(bench);
    if keep || !failed.is_empty() {
        println!("kept {} (logs of every process)", scratch.display());
    } else {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    ensure!(failed.is_empty(), "sections failed: {failed:?} (see the notes under the table)");
    Ok(())
}

/// Finds the binaries, starts the fake server, mints the fleet and writes the embedded template.
async fn start(args: Args, machine: &str) -> anyhow::Result<Bench> {
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
    println!("wakeeper-bench: {machine}");
    let scratch = std::env::temp_dir().join(format!("wakeeper-bench-{}", random_hex(4)));
    std::fs::create_dir_all(&scratch)?;
    println!("scratch dir (logs): {}", scratch.display());

    let sim = SimProcess::spawn(&sim_bin, &scratch.join("wa-sim.log"))?;
    let n = args.tenants;
    let started = Instant::now();
    let fleet = mint_fleet(&sim, n, "bench").await?;
    println!("minted {n} devices in {:.1} s", started.elapsed().as_secs_f64());
    let embedded_template = scratch.join("template-embedded");
    seed_embedded(&embedded_template, &fleet, true).await?;
    let firestore = std::env::var("FIRESTORE_EMULATOR_HOST").ok().filter(|v| !v.is_empty());
    Ok(Bench { args, sim, host_bin, scratch, fleet, embedded_template, firestore })
}

/// Runs every section not skipped, in order; a failed section becomes a note. Returns the failed sections.
async fn run_sections(bench: &Bench, t: &mut Table) -> anyhow::Result<Vec<&'static str>> {
    let args = &bench.args;
    let skip = |s: &str| args.skip.iter().any(|x| x == s);
    let sections: [(&'static str, bool); 7] = [
        ("restore", !skip("restore")),
        ("rss", !skip("rss") && !skip("recovery")),
        ("list", !skip("list")),
        ("replication", !skip("replication")),
        ("lambda", !skip("lambda")),
        ("baileys", !skip("baileys") && args.baileys > 0),
        ("sim", true),
    ];
    let mut failed = Vec::new();
    for (name, on) in sections {
        if !on {
            continue;
        }
        let outcome = match name {
            "restore" => restore::bench_restore(bench, t).await,
            "rss" => rss_recovery::bench_rss_and_recovery(bench, t).await,
            "list" => list::bench_list(bench, t).await,
            "replication" => replication::bench_replication(bench, t).await,
            "lambda" => lambda::bench_lambda(bench, t).await,
            "baileys" => baileys::bench_baileys(bench, t).await,
            _ => {
                sim_totals(bench, t).await?;
                Ok(())
            }
        };
        if let Err(e) = outcome {
            t.note(format!("section `{name}` failed: {e:#}"));
            failed.push(name);
        }
    }
    Ok(failed)
}

/// The simulator's totals under the table; a refused login fails the whole run (some tenant would need pairing).
async fn sim_totals(bench: &Bench, t: &mut Table) -> anyhow::Result<()> {
    let s = bench.sim.summary().await?;
    t.note(format!(
        "wa-sim totals: {} handshakes, {} logins, {} rejected logins (401), peak {} connects/s",
        s["handshakes_completed"], s["logins"], s["rejected_logins"], s["peak_attempts_per_second"]
    ));
    ensure!(s["rejected_logins"] == 0, "the simulator refused logins: some tenant would need pairing");
    Ok(())
}
