//! End-to-end: the real host binary, the real engine, the fake WhatsApp server, real stores.
//!
//! The first proof of the project: a tenant's whole credential state goes to the Firestore emulator, the host
//! is SIGKILLed and its disk wiped, and a new host connects that tenant again with no pairing.

use std::sync::Arc;
use std::time::Duration;

use wakeeper_shared::adapters::firestore::FirestoreCredentialStore;
use wakeeper_shared::domain::SessionState;
use wakeeper_shared::host_api::EnsureOutcome;
use wakeeper_shared::ports::CredentialStore;
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

const PROJECT: &str = "wakeeper-test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_restored_from_firestore_after_sigkill_and_disk_wipe() {
    let Some(emulator) = firestore_emulator() else { return };
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let prefix = fresh_prefix("proof");
    let creds: Arc<dyn CredentialStore> =
        Arc::new(FirestoreCredentialStore::new(PROJECT, dirs.cipher(), prefix.clone()).await.unwrap());
    let id = tid("pizzeria-1");
    let minted = wa.mint_device_with(&id, &Default::default()).unwrap();
    creds.replace(&id, &minted.snapshot, 0).await.unwrap();
    let stored_gen = creds.generation(&id).await.unwrap().unwrap();

    let env = [
        ("FIRESTORE_EMULATOR_HOST", emulator.clone()),
        ("WAKEEPER_FIRESTORE_PROJECT", PROJECT.to_string()),
        ("WAKEEPER_FIRESTORE_PREFIX", prefix.clone()),
    ];
    let mut host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &env);
    host.ready().await;
    assert!(matches!(host.client.ensure(&id).await.unwrap(), EnsureOutcome::Accepted(_)));
    host.wait_state(&id, SessionState::Open, Duration::from_secs(30)).await;

    // The engine writes on connect (login counter, server certificate, ...); wait until the replicator has
    // committed past the seeded generation, so the store holds what the host acknowledged.
    let after_first = wait_until(Duration::from_secs(20), "replicated engine writes", || {
        let creds = creds.clone();
        let id = id.clone();
        async move { creds.generation(&id).await.ok().flatten().filter(|g| *g > stored_gen) }
    })
    .await;
    let before_kill = creds.read(&id).await.unwrap();

    host.kill9();
    dirs.wipe_data();
    assert!(!dirs.data().exists());

    let host2 = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &env);
    host2.ready().await;
    assert!(matches!(host2.client.ensure(&id).await.unwrap(), EnsureOutcome::Accepted(_)));
    host2.wait_state(&id, SessionState::Open, Duration::from_secs(30)).await;

    let obs = wa.device(&minted.jid).expect("sim knows the device");
    assert_eq!(obs.presented_noise_keys.len(), 1, "the same noise key every time: {:?}", obs.presented_noise_keys);
    assert_eq!(obs.wrong_key_attempts, 0);
    assert_eq!(obs.rejected_logins, 0, "no 401: no pairing needed");
    assert!(obs.logins >= 2, "logged in before and after the restart: {obs:?}");
    assert_eq!(obs.max_concurrent_connections, 1, "never two connections of one device at once");
    // Every record the first host had replicated is still there (the new host only adds to it).
    let after = creds.read(&id).await.unwrap();
    assert!(after.generation >= after_first);
    for (key, _) in before_kill.records.iter() {
        assert!(after.records.contains_key(key), "record {key} lost across the restart");
    }
    drop(host2);
    sim.shutdown().await;
}
