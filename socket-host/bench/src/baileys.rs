//! The Baileys column: `scripts/baileys-bench` (Baileys 7.0.0-rc14 sockets in one Node process) against the same
//! simulator, its restore time and RSS per session set beside wakeeper's.

use std::process::{Command, Stdio};

use anyhow::{Context, ensure};
use serde_json::json;

use crate::Bench;
use crate::table::Table;

pub async fn bench_baileys(bench: &Bench, t: &mut Table) -> anyhow::Result<()> {
    let n = bench.args.baileys;
    println!("== Baileys 7.0.0-rc14: {n} sockets in one Node process against the same wa-sim");
    let dir = bench.scratch.join("baileys");
    let script =
        bench.args.baileys_script.canonicalize().with_context(|| format!("{}", bench.args.baileys_script.display()))?;
    let run = |phase: &str, extra: &[&str]| -> anyhow::Result<serde_json::Value> {
        let mut cmd = Command::new("node");
        if phase == "restore" {
            cmd.arg("--expose-gc");
        }
        cmd.arg(&script)
            .arg(phase)
            .args(["--control", &bench.sim.control, "--n", &n.to_string(), "--dir"])
            .arg(&dir)
            .args(extra)
            .env("WA_SIM_WS_URL", &bench.sim.ws_url)
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
    compare(bench, t, &restore)?;
    t.note(format!(
        "Baileys restore: login p50 {} ms, p99 {} ms per socket, {} reconnects, {} of {n} still open after a 10 s idle; \
         RSS {:.1} MiB before the first socket, {:.1} MiB with {n} open (after a forced GC)",
        restore["login_ms_p50"], restore["login_ms_p99"], restore["reconnects"], restore["open_after_settle"],
        restore["rss_before_kib"].as_f64().unwrap_or(0.0) / 1024.0,
        restore["rss_open_kib"].as_f64().unwrap_or(0.0) / 1024.0
    ));
    Ok(())
}

/// Fills the Baileys cells of wakeeper's restore and RSS rows (when measured) and adds the two ratio rows.
fn compare(bench: &Bench, t: &mut Table, restore: &serde_json::Value) -> anyhow::Result<()> {
    let n = bench.args.baileys;
    let b_secs = restore["seconds_from_process_start"].as_f64().context("seconds")?;
    let b_rss = restore["rss_per_session_kib"].as_f64().context("rss")?;
    let per_b = b_secs / n as f64;
    let wn = bench.tenants() as f64;
    if let Some(w) = t.raw.get("restore-embedded-unlimited").and_then(|v| v["seconds"].as_f64()) {
        let label = format!("Restore {} from embedded store, governor unlimited", bench.tenants());
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
        let label = format!("RSS per open idle session at {}", bench.tenants());
        let ratio = w / b_rss;
        if let Some(row) = t.find(&label) {
            row.baileys = format!("{b_rss:.1} KiB (at {n})");
            row.ratio = format!("{ratio:.3}");
        }
        t.row("RSS per session, wakeeper / Baileys", format!("{ratio:.3}"), "<= 1/20 (0.05)", Some(ratio <= 0.05));
    }
    Ok(())
}
