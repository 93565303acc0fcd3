//! `wa-sim`: the simulator in its own process, for benchmarks and manual runs.
//!
//! Prints one JSON line on stdout once listening (`{"ws_url":…,"control_url":…,"pid":…}`) so a script or
//! benchmark can find it, then serves until SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use wa_sim::{ConflictPolicy, Sim, SimConfig};

/// A local, protocol-faithful fake WhatsApp Web server (WebSocket /ws/chat, Noise XX/IK, logins checked
/// against a device registry, fault modes). Clients must skip WhatsApp's pinned certificate check (the
/// engine's `danger-skip-cert-chain-verify`) or pin this server's root key (GET /v1/keys).
#[derive(Parser)]
#[command(name = "wa-sim", version, after_help = wa_sim::control::HELP)]
struct Args {
    /// Address of the WebSocket endpoint (port 0: pick one).
    #[arg(long, env = "WA_SIM_ADDR", default_value = "127.0.0.1:5222")]
    addr: SocketAddr,
    /// Address of the HTTP control surface (port 0: pick one).
    #[arg(long, env = "WA_SIM_CONTROL_ADDR", default_value = "127.0.0.1:5280")]
    control_addr: SocketAddr,
    /// 64 hex characters: derive the server keys from this seed so a restarted simulator is the same
    /// server (clients keep using Noise IK; the root key stays valid).
    #[arg(long, env = "WA_SIM_SEED")]
    seed: Option<String>,
    /// Keep both connections when a device logs in twice, instead of ending the older one with
    /// `<conflict type="replaced"/>` as WhatsApp does.
    #[arg(long)]
    allow_concurrent: bool,
    /// Seconds a client may take from TCP connect to the end of the handshake.
    #[arg(long, default_value_t = 20)]
    handshake_timeout: u64,
    /// TCP listen backlog.
    #[arg(long, default_value_t = 4096)]
    backlog: u32,
    /// Log as JSON lines.
    #[arg(long)]
    json_log: bool,
}

fn parse_seed(hex: &str) -> anyhow::Result<[u8; 32]> {
    anyhow::ensure!(hex.len() == 64, "the seed must be 64 hex characters");
    let mut seed = [0u8; 32];
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).context("the seed must be hex")?;
    }
    Ok(seed)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    wakeeper_shared::tls::install_crypto_provider();
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if args.json_log {
        builder.json().init();
    } else {
        builder.init();
    }
    let config = SimConfig {
        bind: args.addr,
        control_bind: Some(args.control_addr),
        key_seed: args.seed.as_deref().map(parse_seed).transpose()?,
        conflict: if args.allow_concurrent { ConflictPolicy::AllowConcurrent } else { ConflictPolicy::ReplaceOlder },
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        backlog: args.backlog,
    };
    let sim = Sim::start(config).await.context("starting the simulator")?;
    let control = sim.control_addr().context("control surface address")?;
    println!(
        "{}",
        serde_json::json!({
            "ws_url": sim.url(),
            "control_url": format!("http://{control}"),
            "pid": std::process::id(),
        })
    );
    shutdown_signal().await;
    tracing::info!("shutting down");
    sim.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("sigterm handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
