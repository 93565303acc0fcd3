//! Scenario 1: SIGKILL while the engine writes (fresh devices uploading their pre-keys), restart with the local
//! disk wiped: tenants not back to `open`, tenants that needed pairing, acknowledged records missing from the
//! credential store, corrupt records.

use std::collections::HashSet;
use std::time::Duration;

use wa_sim::MintOptions;
use wakeeper_shared::domain::{RecordKind, TenantId};
use wakeeper_shared::ports::{CredentialStore, StoreError, TenantStore};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

use super::*;

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
