//! End-to-end: linking a new number with the real host binary, the real engine and the fake WhatsApp server.
//!
//! `POST /v1/sessions/{id}/link` starts a link attempt on an empty working copy and answers with the QR code;
//! the "phone" scans it through the fake server; the session reaches `open` with its credentials already in
//! the credential store; the host is SIGKILLed and its local state wiped; the next host connects the tenant
//! with no pairing (same device, same noise key).

use std::time::Duration;

use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::domain::{SessionState, TenantId};
use wakeeper_shared::host_api::{ClientError, HostClient, LinkRequest, LinkStatus, LinkView};
use wakeeper_shared::ports::{CredentialStore, StoreError, TenantStore};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

/// A client whose timeout covers the host's wait for the first QR code.
fn link_client(host: &TestHost) -> HostClient {
    HostClient::new(&host.base, TOKEN, Duration::from_secs(30)).unwrap().with_attempts(1)
}

/// Starts a link attempt and checks what a person linking a phone gets to see.
async fn start_link(host: &TestHost, id: &TenantId) -> LinkView {
    let view = link_client(host).link(id, &LinkRequest::default()).await.unwrap();
    assert_eq!(view.tenant_id, *id);
    assert_eq!(view.status, LinkStatus::Waiting);
    assert_eq!(view.state, SessionState::Linking);
    let qr = view.qr.as_deref().expect("a QR payload");
    assert!(qr.starts_with("2@") && qr.split(',').count() >= 4, "a WhatsApp QR payload: {qr}");
    let svg = view.qr_svg.as_deref().expect("the QR code as SVG");
    assert!(svg.contains("<svg") && svg.contains("<path"), "an SVG image");
    assert!(view.expires_in_s.is_some_and(|s| s > 0), "{view:?}");
    assert!(view.pairing_code.is_none() && view.device_jid.is_none());
    view
}

async fn wait_open(host: &TestHost, id: &TenantId) {
    host.wait_state(id, SessionState::Open, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linking_a_new_number_survives_sigkill_and_a_lost_disk() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let id = tid("new-trattoria");
    let cancelled = tid("changed-its-mind");
    let mut host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &[]);
    host.ready().await;

    let first = start_link(&host, &id).await;
    // Asking again shows the same attempt; with a phone number it also gets a pairing code.
    let again = link_client(&host).link(&id, &LinkRequest { phone: Some("+15551234567".into()) }).await.unwrap();
    assert_eq!((again.status, again.started_ms), (LinkStatus::Waiting, first.started_ms));
    let code = again.pairing_code.clone().expect("a pairing code");
    assert_eq!(code.len(), 8, "{code}");
    let shown = host.client.link_view(&id).await.unwrap().expect("the attempt is visible");
    assert_eq!(shown.pairing_code.as_deref(), Some(code.as_str()));
    assert!(shown.qr.is_some());
    // A normal ensure of a tenant being linked leaves the attempt alone.
    assert!(host.client.ensure(&id).await.is_ok());
    assert_eq!(host.client.session(&id).await.unwrap().unwrap().state, SessionState::Linking);

    // A second attempt, cancelled: its unpaired keys are deleted and nothing is marked.
    start_link(&host, &cancelled).await;
    host.client.stop(&cancelled).await.unwrap();
    assert!(host.client.link_view(&cancelled).await.unwrap().is_none());

    // The phone scans the QR code on screen.
    let qr = host.client.link_view(&id).await.unwrap().unwrap().qr.expect("still a QR code");
    let jid = wa.pair(&qr, &id, &wa_sim::MintOptions::default()).unwrap();
    wait_open(&host, &id).await;
    let done = host.client.link_view(&id).await.unwrap().unwrap();
    assert_eq!(done.status, LinkStatus::Paired);
    assert_eq!(done.state, SessionState::Open);
    assert_eq!(done.device_jid.as_deref(), Some(jid.as_str()));
    assert!(done.qr.is_none() && done.qr_svg.is_none(), "no QR code once paired");
    // A linked tenant is not linked again.
    match link_client(&host).link(&id, &LinkRequest::default()).await {
        Err(ClientError::Refused { status: 409, code }) => assert_eq!(code, "already_linked"),
        other => panic!("expected 409 already_linked, got {other:?}"),
    }

    host.kill9();
    // What the host had stored when it died: a restorable snapshot and the desired flag; nothing of the
    // cancelled attempt.
    {
        let store = EmbeddedStore::open(dirs.data().join("store.redb"), dirs.cipher()).unwrap();
        let snapshot = store.read(&id).await.unwrap();
        let device = snapshot.check_restorable().expect("the new link is restorable");
        assert!(!device.noise_key.is_empty());
        assert!(store.get(&id).await.unwrap().unwrap().whatsapp_connected, "the new link is desired");
        assert!(matches!(store.read(&cancelled).await, Err(StoreError::NotFound)), "cancelled keys deleted");
        let marked = store.get(&cancelled).await.unwrap();
        assert!(marked.as_ref().is_none_or(|r| !r.whatsapp_connected && r.status.is_none()), "{marked:?}");
    }
    // The local working copies are gone (the store of the one-machine default lives beside them and stays).
    std::fs::remove_dir_all(dirs.data().join("tenants")).unwrap();

    let host2 = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &[]);
    host2.ready().await;
    // Restored on start (desired), with no pairing.
    wait_open(&host2, &id).await;
    assert!(host2.client.link_view(&id).await.unwrap().is_none(), "no link attempt on the new host");
    let obs = wa.device(&jid).expect("the sim knows the linked device");
    assert_eq!(obs.presented_noise_keys.len(), 1, "the same noise key every time: {:?}", obs.presented_noise_keys);
    assert_eq!(obs.rejected_logins, 0, "no 401: no pairing needed");
    assert!(obs.logins >= 2, "logged in before and after the restart: {obs:?}");
    assert_eq!(obs.max_concurrent_connections, 1);
    let s = wa.summary();
    assert_eq!(s.pairings_completed, 1, "one pairing in all: {s:?}");
    drop(host2);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_link_is_in_firestore_when_it_opens_and_a_fresh_container_restores_it() {
    let dirs = Dirs::new();
    let Some(cloud) = CloudStores::fresh("link", dirs.cipher()).await else { return };
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let id = tid("new-sushi-bar");
    let mut host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &cloud.host_env(&[]));
    host.ready().await;

    let view = start_link(&host, &id).await;
    assert!(matches!(cloud.creds.read(&id).await, Err(StoreError::NotFound) | Ok(_)));
    assert!(cloud.tenants.get(&id).await.unwrap().is_none_or(|r| !r.whatsapp_connected), "not desired yet");
    let jid = wa.pair(view.qr.as_deref().unwrap(), &id, &wa_sim::MintOptions::default()).unwrap();
    wait_open(&host, &id).await;
    // The moment `open` is visible, the credential store already restores the device and the tenant is desired.
    let snapshot = cloud.creds.read(&id).await.unwrap();
    snapshot.check_restorable().expect("restorable when open is visible");
    assert!(cloud.tenants.get(&id).await.unwrap().unwrap().whatsapp_connected);

    host.kill9();
    dirs.wipe_data();
    let host2 = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &cloud.host_env(&[]));
    host2.ready().await;
    wait_open(&host2, &id).await;
    let obs = wa.device(&jid).unwrap();
    assert_eq!(obs.presented_noise_keys.len(), 1, "{obs:?}");
    assert_eq!(obs.rejected_logins, 0);
    assert_eq!(wa.summary().pairings_completed, 1);
    drop(host2);
    sim.shutdown().await;
}
