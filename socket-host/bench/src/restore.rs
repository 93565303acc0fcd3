//! Cold restore of every tenant to `open`, timed from process start: from the embedded store and from the
//! Firestore emulator, with the governor unlimited and at its defaults, and a restart after SIGKILL.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use wakeeper_shared::adapters::firestore::FirestoreCredentialStore;
use wakeeper_shared::domain::now_millis;
use wakeeper_shared::ports::{CredentialStore, StoreError};

use crate::fleet::{copy_dir, seed_embedded};
use crate::host_process::HostProcess;
use crate::host_settings::{default_governor, governor_env, governor_label};
use crate::system::{cpu_seconds, random_hex};
use crate::table::Table;
use crate::{Bench, FIRESTORE_PROJECT};

/// One timed restore.
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
    bench: &Bench,
    template: &Path,
    run: &str,
    env: &[(&str, String)],
    keep_running: bool,
) -> anyhow::Result<(RestoreRun, Option<HostProcess>, PathBuf)> {
    let root = bench.scratch.join(run);
    copy_dir(template, &root)?;
    let before = bench.sim.attempts_per_second().await?.len();
    let sim_cpu_before = cpu_seconds(bench.sim.child.id());
    let host = HostProcess::spawn(&bench.host_bin, &root.join("data"), &bench.sim.ws_url, env, root.join("host.log"))?;
    host.ready().await?;
    let health_s = (now_millis() - host.spawned_ms) as f64 / 1000.0;
    let list = host.all_open(bench.tenants(), Duration::from_secs(180)).await?;
    let host_cpu_s = cpu_seconds(host.pid());
    let sim_cpu_s = cpu_seconds(bench.sim.child.id()) - sim_cpu_before;
    let seconds = host.seconds_to_last_open(&list);
    let peak = bench.sim.peak_attempts_since(before).await?;
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

pub async fn bench_restore(bench: &Bench, t: &mut Table) -> anyhow::Result<()> {
    println!("== restore of {} tenants from the embedded store", bench.tenants());
    for unlimited in [true, false] {
        restore_from_embedded(bench, t, unlimited).await?;
    }
    restore_from_firestore(bench, t).await
}

/// One restore from the embedded template; with the governor unlimited, also the restart after SIGKILL.
async fn restore_from_embedded(bench: &Bench, t: &mut Table, unlimited: bool) -> anyhow::Result<()> {
    let n = bench.tenants();
    let label = if unlimited {
        "governor unlimited".to_owned()
    } else {
        format!("governor defaults ({})", governor_label(default_governor()))
    };
    let run_name = if unlimited { "restore-embedded-unlimited" } else { "restore-embedded-defaults" };
    let (r, host, root) =
        timed_restore(bench, &bench.embedded_template, run_name, &governor_env(unlimited), unlimited).await?;
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
    if let Some(host) = host {
        restart_after_sigkill(bench, t, host, &root).await?;
    }
    Ok(())
}

/// The same disk after SIGKILL: working copies are there, leases are this host's own.
async fn restart_after_sigkill(bench: &Bench, t: &mut Table, mut host: HostProcess, root: &Path) -> anyhow::Result<()> {
    let n = bench.tenants();
    host.kill9();
    let data = root.join("data");
    let mut again =
        HostProcess::spawn(&bench.host_bin, &data, &bench.sim.ws_url, &governor_env(true), root.join("host-2.log"))?;
    again.ready().await?;
    let list = again.all_open(n, Duration::from_secs(180)).await?;
    let secs = again.seconds_to_last_open(&list);
    let cpu = cpu_seconds(again.pid());
    t.row(
        &format!("Restart after SIGKILL, {n} tenants, working copies on disk, governor unlimited"),
        format!("{secs:.2} s ({:.0} tenants/s; CPU host {cpu:.2} s)", n as f64 / secs),
        "",
        None,
    );
    t.raw("restart-after-sigkill", json!({ "seconds": secs, "host_cpu_s": cpu }));
    again.terminate();
    Ok(())
}

/// Restores from the Firestore emulator onto a fresh disk (tenants desired in the embedded table).
async fn restore_from_firestore(bench: &Bench, t: &mut Table) -> anyhow::Result<()> {
    let n = bench.tenants();
    let Some(emulator) = &bench.firestore else {
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
    let template = bench.scratch.join("template-firestore");
    let cipher = seed_embedded(&template, &bench.fleet, false).await?;
    let creds = Arc::new(FirestoreCredentialStore::new(FIRESTORE_PROJECT, cipher, prefix.clone()).await?);
    let started = Instant::now();
    let seeded: Vec<Result<(), StoreError>> =
        futures_util::stream::iter(bench.fleet.ids.iter().zip(&bench.fleet.snapshots))
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
        let (r, _, _) = timed_restore(bench, &template, run_name, &env, false).await?;
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
