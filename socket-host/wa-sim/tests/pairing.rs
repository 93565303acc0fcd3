//! The link flow: a client that was never paired shows QR codes, the "phone" scans one through the
//! simulator, and the client ends up logged in with credentials the simulator knows.

use std::time::Duration;

use wa_sim::{MintOptions, Sim};
use wakeeper_shared::domain::CredentialSnapshot;
use wakeeper_testkit::{TestClient, tenant};
use whatsapp_rust::prelude::Event;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scanning_a_qr_code_links_a_fresh_client() {
    let sim = Sim::start_local().await.unwrap();
    let mut client = TestClient::start_fresh(&sim.url()).await;

    let ev =
        client.wait_event(Duration::from_secs(20), "PairingQrCode", |e| matches!(e, Event::PairingQrCode(_))).await;
    let Event::PairingQrCode(qr) = &*ev else { unreachable!() };
    assert!(sim.pair("2@nope,AAAA,BBBB,CCCC", &tenant("linked-1"), &MintOptions::default()).is_err());
    let jid = sim.pair(&qr.code, &tenant("linked-1"), &MintOptions::default()).unwrap();

    let ev = client.wait_event(Duration::from_secs(10), "PairSuccess", |e| matches!(e, Event::PairSuccess(_))).await;
    let Event::PairSuccess(success) = &*ev else { unreachable!() };
    assert_eq!(success.id.to_string(), jid);
    // After the 515 the client logs in with its new identity. A freshly paired engine waits up to 10 s for
    // the phone to share app-state keys before it syncs and reports Connected.
    client.connected(Duration::from_secs(60)).await;
    let s = sim.summary();
    assert_eq!((s.pairings_started, s.pairings_completed), (1, 1));
    let obs = sim.device(&jid).unwrap();
    // A loaded machine may see the fresh client log in more than once while it settles; at least once.
    assert!(obs.logins >= 1, "{obs:?}");
    assert_eq!(obs.tenant.as_deref(), Some("linked-1"));
    let logins_before_restart = obs.logins;
    assert_eq!(sim.device_jid(&tenant("linked-1")).as_deref(), Some(jid.as_str()));

    // What the engine stored is a complete snapshot that logs in again elsewhere (a host restart).
    let device = client.client.persistence_manager().get_device_snapshot();
    let mut snapshot = CredentialSnapshot::default();
    snapshot.set_device(&wa_sim::device_to_record(&device).unwrap());
    snapshot.check_restorable().expect("a paired device is restorable");
    client.stop().await;
    // A restart follows the old process's exit: wait until the server has seen its connection close, so the
    // check below counts two clients at once only if they really overlapped.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sim.device(&jid).is_some_and(|d| d.current_connections > 0) {
        assert!(std::time::Instant::now() < deadline, "the stopped client's connection stayed open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut restored = TestClient::start(&sim.url(), &snapshot).await;
    restored.connected(Duration::from_secs(60)).await;
    let obs = sim.device(&jid).unwrap();
    assert!(obs.logins > logins_before_restart, "the restored client logged in again: {obs:?}");
    assert_eq!(obs.max_concurrent_connections, 1);
    restored.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_client_gets_a_pairing_code_for_a_phone_number() {
    let sim = Sim::start_local().await.unwrap();
    let mut client = TestClient::start_fresh(&sim.url()).await;
    let ev =
        client.wait_event(Duration::from_secs(20), "PairingQrCode", |e| matches!(e, Event::PairingQrCode(_))).await;
    let Event::PairingQrCode(qr) = &*ev else { unreachable!() };
    let qr = qr.code.clone();

    let options =
        whatsapp_rust::pair_code::PairCodeOptions { phone_number: "15551234567".into(), ..Default::default() };
    let code = tokio::time::timeout(Duration::from_secs(20), client.client.pair_with_code(options))
        .await
        .expect("the simulator answers the pairing-code request")
        .expect("a pairing code");
    assert_eq!(code.len(), 8, "{code}");
    assert!(code.chars().all(|c| "123456789ABCDEFGHJKLMNPQRSTVWXYZ".contains(c)), "{code}");
    let ev = client.wait_event(Duration::from_secs(5), "PairingCode", |e| matches!(e, Event::PairingCode(_))).await;
    let Event::PairingCode(shown) = &*ev else { unreachable!() };
    assert_eq!(shown.code, code);

    // The QR flow is still on: scanning the code on screen still links the client.
    sim.pair(&qr, &tenant("by-code-then-qr"), &MintOptions::default()).unwrap();
    client.wait_event(Duration::from_secs(10), "PairSuccess", |e| matches!(e, Event::PairSuccess(_))).await;
    client.stop().await;
}
