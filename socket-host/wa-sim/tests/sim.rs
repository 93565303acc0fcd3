//! The simulator's own behaviour, driven by the lightweight load client (fast: no engine timers) and by
//! HTTP against the control surface.

use std::time::Duration;

use serde_json::json;
use wa_sim::loadgen::{Credentials, LoadError, ServerTrust, control_request, login};
use wa_sim::{ConflictPolicy, PongMode, Refusal, RefusePoint, Sim, SimConfig, StreamErrorKind, Target};
use wakeeper_shared::domain::{CredentialSnapshot, RecordKey, TenantId};

fn trust(sim: &Sim) -> ServerTrust {
    ServerTrust { root: Some(sim.root_public_key()), static_key: None }
}

async fn registered(sim: &Sim, user: u64) -> Credentials {
    let creds = Credentials::generate(user, 1);
    sim.register_existing(creds.noise_public(), &creds.jid()).unwrap();
    creds
}

#[tokio::test]
async fn xx_then_ik_logins_verify_against_the_exported_root() {
    let sim = Sim::start_local().await.unwrap();
    let creds = registered(&sim, 551190000001).await;
    let first = login(&sim.url(), &creds, trust(&sim)).await.unwrap();
    assert_eq!(first.server_static, sim.server_static_key());
    drop(first);
    let resumed = ServerTrust { root: None, static_key: Some(sim.server_static_key()) };
    let _second = login(&sim.url(), &creds, resumed).await.unwrap();
    let s = sim.summary();
    assert_eq!((s.logins, s.handshakes_ik), (2, 1));

    // A client pinning another root refuses the chain.
    let other = Sim::start_local().await.unwrap();
    let err =
        login(&sim.url(), &creds, ServerTrust { root: Some(other.root_public_key()), static_key: None }).await.err();
    assert!(matches!(err, Some(LoadError::Certificate)), "{err:?}");
}

#[tokio::test]
async fn unknown_devices_and_wrong_keys_get_401() {
    let sim = Sim::start_local().await.unwrap();
    let stranger = Credentials::generate(551190000002, 3);
    let err = login(&sim.url(), &stranger, trust(&sim)).await.err().unwrap();
    assert!(matches!(&err, LoadError::Refused(tag) if tag == "failure"), "{err:?}");

    let creds = registered(&sim, 551190000003).await;
    let impostor = Credentials::generate(creds.user, creds.device);
    assert!(login(&sim.url(), &impostor, trust(&sim)).await.is_err());
    let obs = sim.device(&creds.jid()).unwrap();
    assert_eq!((obs.rejected_logins, obs.wrong_key_attempts, obs.logins), (1, 1, 0));
    assert_eq!(obs.presented_noise_keys, vec![wa_sim::observe::hex(&impostor.noise_public())]);
    assert!(!sim.device(&stranger.jid()).unwrap().registered);
}

#[tokio::test]
async fn pongs_can_be_delayed_or_dropped_per_device() {
    let sim = Sim::start_local().await.unwrap();
    let creds = registered(&sim, 551190000004).await;
    let mut session = login(&sim.url(), &creds, trust(&sim)).await.unwrap();
    assert!(session.ping().await.unwrap() < Duration::from_millis(200));

    let target = Target::device(creds.jid());
    sim.set_pong(&target, PongMode::Delay { delay: Duration::from_millis(300) }).unwrap();
    let rtt = session.ping().await.unwrap();
    assert!(rtt >= Duration::from_millis(300), "delayed pong came after {rtt:?}");

    sim.set_pong(&target, PongMode::Drop).unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(500), session.ping()).await.is_err(), "dropped pong");

    // Another device is unaffected by a device-level setting.
    let other = registered(&sim, 551190000005).await;
    let mut other = login(&sim.url(), &other, trust(&sim)).await.unwrap();
    assert!(other.ping().await.unwrap() < Duration::from_millis(200));
    assert!(sim.device(&creds.jid()).unwrap().pings >= 3);
}

#[tokio::test]
async fn refusals_at_the_upgrade_and_in_the_stream_expire() {
    let sim = Sim::start_local().await.unwrap();
    let creds = registered(&sim, 551190000006).await;

    let at_upgrade = Refusal { code: 503, point: RefusePoint::Upgrade, duration: Duration::from_millis(400) };
    sim.refuse_connects(&Target::All, at_upgrade).unwrap();
    let err = login(&sim.url(), &creds, trust(&sim)).await.err().unwrap();
    assert!(matches!(err, LoadError::WebSocket(_)), "{err:?}");
    assert!(err.to_string().contains("503"), "{err}");

    sim.clear_faults(&Target::All).unwrap();
    let in_stream = Refusal { code: 429, point: RefusePoint::Stream, duration: Duration::from_millis(400) };
    sim.refuse_connects(&Target::device(creds.jid()), in_stream).unwrap();
    let err = login(&sim.url(), &creds, trust(&sim)).await.err().unwrap();
    assert!(matches!(&err, LoadError::Refused(tag) if tag == "stream:error"), "{err:?}");
    assert!(sim.refuse_connects(&Target::All, Refusal { code: 500, ..in_stream }).is_err());

    // The refusal ends at a known instant; after it, logins succeed again.
    tokio::time::sleep(in_stream.duration).await;
    login(&sim.url(), &creds, trust(&sim)).await.expect("refusal expired");
    assert_eq!(sim.summary().refused, 2);
}

#[tokio::test]
async fn slow_handshakes_are_slow() {
    let sim = Sim::start_local().await.unwrap();
    let creds = registered(&sim, 551190000007).await;
    sim.set_handshake_delay(&Target::All, Some(Duration::from_millis(300))).unwrap();
    let session = login(&sim.url(), &creds, trust(&sim)).await.unwrap();
    assert!(session.login_time >= Duration::from_millis(300), "{:?}", session.login_time);
    sim.set_handshake_delay(&Target::All, None).unwrap();
    let session = login(&sim.url(), &creds, trust(&sim)).await.unwrap();
    assert!(session.login_time < Duration::from_millis(300), "{:?}", session.login_time);
}

#[tokio::test]
async fn a_second_login_replaces_the_first_and_is_recorded() {
    let sim = Sim::start_local().await.unwrap();
    let creds = registered(&sim, 551190000008).await;
    let first = login(&sim.url(), &creds, trust(&sim)).await.unwrap();
    let _second = login(&sim.url(), &creds, trust(&sim)).await.unwrap();
    assert_eq!(first.until_closed().await.as_deref(), Some("stream:error"));
    let obs = sim.wait_for_device(&creds.jid(), Duration::from_secs(5), |o| o.current_connections == 1).await.unwrap();
    assert_eq!((obs.max_concurrent_connections, obs.replaced_by_newer), (2, 1));
}

#[tokio::test]
async fn concurrent_logins_can_be_allowed() {
    let sim = Sim::start(SimConfig { conflict: ConflictPolicy::AllowConcurrent, ..Default::default() }).await.unwrap();
    let creds = registered(&sim, 551190000009).await;
    let mut first = login(&sim.url(), &creds, trust(&sim)).await.unwrap();
    let _second = login(&sim.url(), &creds, trust(&sim)).await.unwrap();
    first.ping().await.expect("the first connection is still served");
    assert_eq!(sim.device(&creds.jid()).unwrap().current_connections, 2);
}

#[tokio::test]
async fn actions_reach_only_their_target() {
    let sim = Sim::start_local().await.unwrap();
    let a = registered(&sim, 551190000010).await;
    let b = registered(&sim, 551190000011).await;
    let sa = login(&sim.url(), &a, trust(&sim)).await.unwrap();
    let mut sb = login(&sim.url(), &b, trust(&sim)).await.unwrap();
    assert_eq!(sim.stream_error(&Target::device(a.jid()), StreamErrorKind::Unavailable), 1);
    assert_eq!(sa.until_closed().await.as_deref(), Some("stream:error"));
    sb.ping().await.unwrap();
    assert_eq!(sim.drop_connections(&Target::All), 1);
    assert_eq!(sb.until_closed().await, None, "a dropped connection ends without a stanza");
    sim.wait_for(Duration::from_secs(5), |h| (h.summary().logged_in_connections == 0).then_some(())).await.unwrap();
    assert_eq!(sim.stream_error(&Target::device("nobody@s.whatsapp.net"), StreamErrorKind::Unavailable), 0);
}

#[tokio::test]
async fn attempts_per_second_are_counted() {
    let sim = Sim::start_local().await.unwrap();
    let creds = registered(&sim, 551190000012).await;
    for _ in 0..5 {
        drop(login(&sim.url(), &creds, trust(&sim)).await.unwrap());
    }
    let o = sim.observations();
    assert_eq!(o.summary.connect_attempts, 5);
    assert_eq!(o.attempts_per_second.iter().sum::<u32>(), 5);
    assert!(o.summary.peak_attempts_per_second >= 3);
    assert_eq!(o.devices[&creds.jid()].connect_attempts, 5);
}

#[tokio::test]
async fn control_surface_drives_the_same_operations() {
    let sim =
        Sim::start(SimConfig { control_bind: Some(([127, 0, 0, 1], 0).into()), ..Default::default() }).await.unwrap();
    let base = format!("http://{}", sim.control_addr().unwrap());
    let call = |method: &'static str, path: String, body: Option<serde_json::Value>| {
        let base = base.clone();
        async move { control_request(&base, method, &path, body.as_ref()).await.unwrap() }
    };

    assert_eq!(call("GET", "/health".into(), None).await.0, 200);
    let (_, keys) = call("GET", "/v1/keys".into(), None).await;
    assert_eq!(keys["root_public_key"], wa_sim::observe::hex(&sim.root_public_key()));

    // Mint over HTTP: the snapshot is restorable.
    let (status, minted) = call("POST", "/v1/devices".into(), Some(json!({"tenant": "http-1"}))).await;
    assert_eq!(status, 200, "{minted}");
    let jid = minted["jid"].as_str().unwrap().to_owned();
    let record = &minted["snapshot"]["records"][0];
    assert_eq!(record["kind"], "device");
    use base64::Engine as _;
    let value = base64::engine::general_purpose::STANDARD.decode(record["value_b64"].as_str().unwrap()).unwrap();
    let mut snapshot = CredentialSnapshot::default();
    snapshot.records.insert(RecordKey::device(), value);
    snapshot.check_restorable().unwrap();
    assert_eq!(sim.device_jid(&TenantId::parse("http-1").unwrap()).as_deref(), Some(jid.as_str()));

    // Faults by HTTP, visible through the Rust API and back over HTTP.
    let q = format!("?device={jid}");
    let (s, _) = call("PUT", format!("/v1/faults/pong{q}"), Some(json!({"mode": "delay", "delay_ms": 250}))).await;
    assert_eq!(s, 200);
    let (_, settings) = call("GET", format!("/v1/faults{q}"), None).await;
    assert_eq!(settings["pong"], json!({"mode": "delay", "delay_ms": 250}));
    let (s, err) = call("POST", "/v1/faults/refuse".into(), Some(json!({"code": 418, "duration_ms": 10}))).await;
    assert_eq!(s, 400, "{err}");
    let (s, _) = call("POST", format!("/v1/faults/refuse{q}"), Some(json!({"code": 429, "duration_ms": 60000}))).await;
    assert_eq!(s, 200);
    assert_eq!(sim.fault_settings(&Target::device(&jid)).unwrap().refusal.map(|r| r.0.code), Some(429));
    let (s, _) = call("DELETE", format!("/v1/faults{q}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(sim.fault_settings(&Target::device(&jid)).unwrap(), Default::default());
    let (_, hit) = call("POST", "/v1/faults/stream-error".into(), Some(json!({"code": 440}))).await;
    assert_eq!(hit["connections"], 0);
    assert_eq!(call("POST", format!("/v1/devices/{jid}/revoke"), None).await.0, 200);
    assert!(sim.device(&jid).unwrap().revoked);
    assert_eq!(call("GET", "/v1/devices/nobody@s.whatsapp.net".into(), None).await.0, 404);

    // Registration for load tools.
    let creds = Credentials::generate(551190000013, 2);
    let body = json!({"devices": [{"jid": creds.jid(), "noise_public": wa_sim::observe::hex(&creds.noise_public())}]});
    assert_eq!(call("POST", "/v1/devices/register".into(), Some(body)).await.0, 200);
    login(&sim.url(), &creds, trust(&sim)).await.unwrap();
    let (_, summary) = call("GET", "/v1/summary".into(), None).await;
    assert_eq!(summary["logins"], 1);
    let (_, obs) = call("GET", "/v1/observations?devices=false".into(), None).await;
    assert_eq!(obs["devices"], json!({}));
    assert_eq!(obs["summary"]["logins"], 1);
}

#[test]
fn help_documents_the_control_surface() {
    for endpoint in [
        "/v1/faults/drop",
        "/v1/faults/half-open",
        "/v1/faults/stream-error",
        "/v1/faults/pong",
        "/v1/faults/refuse",
        "/v1/faults/handshake-delay",
        "/v1/observations",
        "/v1/devices",
    ] {
        assert!(wa_sim::control::HELP.contains(endpoint), "{endpoint}");
    }
}
