//! Standard Webhooks (issue 21): real deliveries of the real host, state events and a received message, are
//! verified by the reference `standardwebhooks` library (PyPI), which also refuses a tampered body and a replay
//! ten minutes later. A URL that answers with a redirect is not followed. A permanent refusal is dead-lettered,
//! listed and replayed without blocking the queue.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use serde_json::{Value, json};
use wakeeper_shared::domain::SessionState;
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

/// A secret in the Standard Webhooks form (base64 of 24 bytes after `whsec_`).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Verifies every delivery on stdin with the reference library; a tampered copy and a replay must fail.
const VERIFY: &str = r#"
import datetime, json, sys
from unittest import mock
import standardwebhooks.webhooks as w
hook = w.Webhook(sys.argv[1])
class Later(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.datetime.now(tz) + datetime.timedelta(minutes=10)
n = 0
for d in json.load(sys.stdin):
    hook.verify(d["body"], d["headers"])
    try:
        hook.verify(d["body"].replace("{", "{ ", 1), d["headers"])
        sys.exit("a tampered body was accepted")
    except w.WebhookVerificationError:
        pass
    with mock.patch.object(w, "datetime", Later):
        try:
            hook.verify(d["body"], d["headers"])
            sys.exit("a replay ten minutes later was accepted")
        except w.WebhookVerificationError:
            pass
    n += 1
print(f"verified {n}")
"#;

type Captured = Arc<Mutex<Vec<Value>>>;

async fn receiver() -> (String, Captured, Arc<Mutex<u32>>) {
    let got: Captured = Arc::default();
    let followed = Arc::new(Mutex::new(0u32));
    let (sink, hits) = (got.clone(), followed.clone());
    let app = Router::new()
        .route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let sink = sink.clone();
                async move {
                    let headers: serde_json::Map<String, Value> = headers
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), json!(v.to_str().unwrap_or_default())))
                        .collect();
                    sink.lock().unwrap().push(json!({"headers": headers, "body": String::from_utf8_lossy(&body)}));
                    StatusCode::NO_CONTENT
                }
            }),
        )
        .route(
            "/moved",
            post(|| async { (StatusCode::TEMPORARY_REDIRECT, [("location", "/elsewhere")]).into_response() }),
        )
        .route(
            "/elsewhere",
            post(move || {
                let hits = hits.clone();
                async move {
                    *hits.lock().unwrap() += 1;
                    StatusCode::NO_CONTENT
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, got, followed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_library_verifies_every_delivery_and_refuses_tampering_and_replays() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let id = tid("stdhooks-1");
    seed_embedded(&dirs, &wa, std::slice::from_ref(&id)).await;
    let (base, got, followed) = receiver().await;
    let urls = format!("{base}/hook,{base}/moved");
    let env = [("WAKEEPER_WEBHOOK_URLS", urls), ("WAKEEPER_WEBHOOK_SECRET", SECRET.to_string())];
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "stdhooks-a", &env);
    host.ready().await;
    host.wait_state(&id, SessionState::Open, Duration::from_secs(30)).await;
    let phone = "4915155550001";
    wa.add_contact(phone).unwrap();
    let device = wa.device_jid(&id).unwrap();
    wa.contact_send_text(phone, &device, "one pizza, please").await.unwrap();

    let kinds = |got: &Captured| -> Vec<String> {
        let got = got.lock().unwrap();
        got.iter()
            .map(|d| serde_json::from_str::<Value>(d["body"].as_str().unwrap()).unwrap()["type"].to_string())
            .collect()
    };
    wait_until(Duration::from_secs(30), "a state event and the received message delivered", || {
        let k = kinds(&got);
        async move {
            (k.iter().any(|t| t.contains("session.state_changed")) && k.iter().any(|t| t.contains("message.received")))
                .then_some(())
        }
    })
    .await;
    let deliveries = Value::Array(got.lock().unwrap().clone());

    let mut python = std::process::Command::new("python3")
        .args(["-c", VERIFY, SECRET])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    std::io::Write::write_all(&mut python.stdin.take().unwrap(), deliveries.to_string().as_bytes()).unwrap();
    let out = python.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the reference library refused a delivery: {stdout} {stderr}");
    let n = deliveries.as_array().unwrap().len();
    assert_eq!(stdout.trim(), format!("verified {n}"), "every delivery verified: {stderr}");
    assert_eq!(*followed.lock().unwrap(), 0, "a redirect is never followed with the signed body");
    drop(host);
    sim.shutdown().await;
}

/// A receiver that refuses (400) until told to accept; it records the `webhook-id` of what it accepted and
/// counts what it refused.
#[derive(Default)]
struct Refuser {
    accept: std::sync::atomic::AtomicBool,
    refused: std::sync::atomic::AtomicU32,
    accepted: Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_refusal_is_dead_lettered_listed_and_replayed_without_blocking_the_queue() {
    use std::sync::atomic::Ordering;
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let id = tid("deadletter-1");
    seed_embedded(&dirs, &wa, std::slice::from_ref(&id)).await;
    let refuser = Arc::new(Refuser::default());
    let r = refuser.clone();
    let app = Router::new().route(
        "/refuse",
        post(move |headers: HeaderMap| {
            let r = r.clone();
            async move {
                if r.accept.load(Ordering::SeqCst) {
                    let hook_id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                    r.accepted.lock().unwrap().push(hook_id);
                    StatusCode::NO_CONTENT
                } else {
                    r.refused.fetch_add(1, Ordering::SeqCst);
                    StatusCode::BAD_REQUEST
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/refuse", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let env = [("WAKEEPER_WEBHOOK_URLS", url), ("WAKEEPER_WEBHOOK_SECRET", SECRET.to_string())];
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "deadletter-a", &env);
    host.ready().await;
    host.wait_state(&id, SessionState::Open, Duration::from_secs(30)).await;
    let phone = "4915155550002";
    wa.add_contact(phone).unwrap();
    let device = wa.device_jid(&id).unwrap();
    for text in ["first order", "second order"] {
        wa.contact_send_text(phone, &device, text).await.unwrap();
    }

    // Every event is refused once and kept, none retried forever: the queue moves on.
    let http = reqwest::Client::new();
    let list_url = format!("{}/v1/webhooks/dead-letters", host.base);
    let dead = wait_until(Duration::from_secs(30), "both messages dead-lettered", || {
        let (http, url) = (http.clone(), list_url.clone());
        async move {
            let v: Value = http.get(&url).bearer_auth(TOKEN).send().await.ok()?.json().await.ok()?;
            let dead = v["dead_letters"].as_array()?.clone();
            let messages = dead.iter().filter(|d| d["event_type"] == "message.received").count();
            (messages == 2).then_some(dead)
        }
    })
    .await;
    assert!(dead.iter().all(|d| d["status"] == 400 && d["url"].as_str().unwrap().ends_with("/refuse")), "{dead:?}");
    let refused = refuser.refused.load(Ordering::SeqCst) as usize;
    assert_eq!(refused, dead.len(), "each event refused once, not retried: {dead:?}");

    // Replayed once the receiver accepts: the same event id arrives; the dead letter is gone; a second replay 404s.
    refuser.accept.store(true, Ordering::SeqCst);
    let message = dead.iter().find(|d| d["event_type"] == "message.received").unwrap();
    let (number, event_id) = (message["number"].as_u64().unwrap(), message["event_id"].as_str().unwrap().to_owned());
    let replay = format!("{}/v1/webhooks/dead-letters/{number}/replay", host.base);
    assert_eq!(http.post(&replay).bearer_auth(TOKEN).send().await.unwrap().status(), 202);
    wait_until(Duration::from_secs(20), "the replayed event delivered", || {
        let (got, want) = (refuser.accepted.lock().unwrap().clone(), event_id.clone());
        async move { got.contains(&want).then_some(()) }
    })
    .await;
    assert_eq!(http.post(&replay).bearer_auth(TOKEN).send().await.unwrap().status(), 404);
    let bad = format!("{}/v1/webhooks/dead-letters/not-a-number/replay", host.base);
    assert_eq!(http.post(&bad).bearer_auth(TOKEN).send().await.unwrap().status(), 404);
    drop(host);
    sim.shutdown().await;
}
