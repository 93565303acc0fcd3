//! The engine's connect sequence against the simulator leaves no warning behind: every IQ it sends gets an
//! answer its parsers accept. Its own test binary, so the captured engine log holds only these clients.

use std::time::Duration;

use wa_sim::{MintOptions, Sim, Target};
use wakeeper_testkit::{TestClient, tenant, warnings};
use whatsapp_rust::prelude::Event;

const CONNECT: Duration = Duration::from_secs(20);

/// Waits until the background queries of the connect sequence were all answered, then gives the engine a
/// bounded window to log anything about them.
async fn settle(sim: &Sim, jid: &str, logins: u64) {
    let wanted = ["abt", "blocklist", "privacy", "usync", "encrypt"];
    sim.wait_for_device(jid, Duration::from_secs(20), |o| {
        o.logins >= logins && wanted.iter().all(|ns| o.iqs_answered.get(*ns).copied().unwrap_or(0) >= logins)
    })
    .await
    .expect("the connect sequence's IQs reach the simulator");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline {
        assert!(warnings().is_empty(), "engine warnings: {:#?}", warnings());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_sequence_is_clean_and_prekeys_round_trip() {
    let sim = Sim::start_local().await.unwrap();

    // A restored device whose server holds its key bundle: no upload, digest validates.
    let restored = sim.mint_device_with(&tenant("clean-1"), &MintOptions::default()).unwrap();
    let mut client = TestClient::start(&sim.url(), &restored.snapshot).await;
    client.connected(CONNECT).await;
    settle(&sim, &restored.jid, 1).await;
    assert!(sim.prekey_ids(&restored.jid).unwrap().is_empty(), "a restored device uploads nothing");
    client.stop().await;

    // A device the server has no pre-keys for: the engine uploads at login and the server keeps them.
    let opts = MintOptions { server_has_prekeys: false, ..Default::default() };
    let fresh = sim.mint_device_with(&tenant("clean-2"), &opts).unwrap();
    let mut client = TestClient::start(&sim.url(), &fresh.snapshot).await;
    client.connected(CONNECT).await;
    let obs = sim.wait_for_device(&fresh.jid, Duration::from_secs(20), |o| o.prekeys_held > 0).await.unwrap();
    assert!(obs.prekeys_held >= 100, "the engine uploads its batch of pre-keys, got {}", obs.prekeys_held);
    settle(&sim, &fresh.jid, 1).await;
    client.barrier().await;

    // The server forgets them: on the next connect the digest check gets 404 and the engine re-uploads.
    let before = sim.prekey_ids(&fresh.jid).unwrap();
    sim.forget_prekeys(&fresh.jid).unwrap();
    sim.drop_connections(&Target::device(&fresh.jid));
    client.wait_event(Duration::from_secs(10), "Disconnected", |e| matches!(e, Event::Disconnected(_))).await;
    client.connected(CONNECT).await;
    let obs = sim.wait_for_device(&fresh.jid, Duration::from_secs(20), |o| o.prekeys_held > 0).await.unwrap();
    let after = sim.prekey_ids(&fresh.jid).unwrap();
    assert!(obs.prekeys_held > 0);
    assert_ne!(before, after, "a fresh batch was uploaded");
    client.barrier().await;
    client.stop().await;
    // Expected: the dropped socket itself, and the 404 ("digestKey: no record found ..., re-uploading").
    let expected = ["Connection reset without closing handshake", "digestKey: no record found"];
    let unexpected: Vec<String> = warnings().into_iter().filter(|w| !expected.iter().any(|e| w.contains(e))).collect();
    assert!(unexpected.is_empty(), "engine warnings: {unexpected:#?}");
}
