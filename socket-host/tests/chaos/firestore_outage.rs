//! Scenario 2: the Firestore emulator unreachable during a restore and during record churn: tenants wrongly
//! marked, time to full recovery, records left unreplicated after recovery.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use wa_sim::{MintOptions, Target};
use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::adapters::firestore::FirestoreCredentialStore;
use wakeeper_shared::domain::{SessionState, TenantId};
use wakeeper_shared::local::WorkingCopy;
use wakeeper_shared::ports::{CredentialStore, TenantStore};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

use super::*;

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
    wrongly_marked.extend(super::fleet::marked_in_table(&tenants, &ids).await);
    c.zero(
        "tenants wrongly marked (a terminal state seen, or marked in the tenant table)",
        wrongly_marked.len() as u64,
    );
    c.zero("devices connected twice at once", doubled(&wa));
    sim.shutdown().await;
    c.finish("Firestore unreachable during restore and during churn");
}
