//! Webhooks end to end: the host's signed state-change events reach a local receiver, an alert fires after the
//! fourth consecutive failure, and a recovery event follows once the tenant is open again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use wa_sim::{Refusal, RefusePoint, Target};
use wakeeper_shared::domain::SessionState;
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

const SECRET: &str = "webhook-secret-for-tests";

type Received = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

async fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    let sink = got.clone();
    let app = Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                let sig = headers.get("x-wakeeper-signature").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                // Keep the raw body's signature check result with the event.
                let valid = sig == wakeeper_shared::webhook::sign(SECRET.as_bytes(), &body);
                sink.lock().unwrap().push((if valid { "valid".into() } else { sig }, json));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_state_events_and_failure_alert_then_recovery() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let (flaky, steady) = (tid("flaky-1"), tid("steady-1"));
    seed_embedded(&dirs, &wa, &[flaky.clone(), steady.clone()]).await;
    let (url, got) = receiver().await;
    let host = TestHost::spawn(
        socket_host_bin!(),
        &dirs,
        &wa.url(),
        "host-a",
        &[("WAKEEPER_WEBHOOK_URLS", url), ("WAKEEPER_WEBHOOK_SECRET", SECRET.to_string())],
    );
    host.ready().await;
    host.all_open(2, Duration::from_secs(30)).await;

    // WhatsApp refuses the flaky tenant for a while: its reconnects fail one after another.
    let jid = wa.device_jid(&flaky).unwrap();
    wa.refuse_connects(
        &Target::device(jid.clone()),
        Refusal { code: 503, point: RefusePoint::Stream, duration: Duration::from_secs(8) },
    )
    .unwrap();
    assert_eq!(wa.drop_connections(&Target::device(jid)), 1);

    let kinds = |t: &str| {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| e["tenant_id"] == t)
            .map(|(_, e)| e["type"].as_str().unwrap_or_default().to_string())
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(60), "alert.failing then alert.recovered", || {
        let k = kinds("flaky-1");
        async move {
            let failing = k.iter().position(|x| x == "alert.failing")?;
            let recovered = k.iter().position(|x| x == "alert.recovered")?;
            (recovered > failing).then_some(())
        }
    })
    .await;
    host.wait_state(&flaky, SessionState::Open, Duration::from_secs(10)).await;

    let events = got.lock().unwrap().clone();
    assert!(events.iter().all(|(sig, _)| sig == "valid"), "every event carries a valid signature");
    let failing = events.iter().find(|(_, e)| e["type"] == "alert.failing").unwrap();
    assert_eq!(failing.1["consecutive_failures"], 4, "the alert fires on the fourth consecutive failure");
    assert_eq!(events.iter().filter(|(_, e)| e["type"] == "alert.failing").count(), 1, "once");
    let states: Vec<_> = events
        .iter()
        .filter(|(_, e)| e["tenant_id"] == "flaky-1" && e["type"] == "session.state_changed")
        .map(|(_, e)| e["state"].as_str().unwrap().to_string())
        .collect();
    assert!(states.contains(&"backoff".to_string()) && states.last().map(String::as_str) == Some("open"), "{states:?}");
    assert!(!kinds("steady-1").iter().any(|k| k.starts_with("alert")), "the steady tenant raised no alert");
    drop(host);
    sim.shutdown().await;
}
