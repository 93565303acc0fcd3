//! Router tests (`oneshot`): every route's success and failure paths, every bad input, and proof that a
//! rejected request touches no session.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use socket_host::api::{AppState, router};
use socket_host::governor::{Governor, GovernorConfig};
use socket_host::host::Host;
use socket_host::session::{EngineProvider, OpenError, SessionConfig, Stored};
use tower::ServiceExt;
use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::crypto::Cipher;
use wakeeper_shared::domain::{TenantId, TenantStatus};
use wakeeper_shared::ports::TenantStore;
use whatsapp_rust::store::traits::Backend;

const TOKEN: &str = "router-test-token";

/// Engines that never reach a store: `missing-*` has no credentials, `corrupt-*` bad ones, the rest an empty
/// in-memory backend (its connects go to a closed port and back off). For linking, `linked-*` holds restorable
/// credentials, and opening a new engine store always fails (recorded, so a test sees that a link got that far).
#[derive(Default)]
struct FakeEngines {
    deleted: Mutex<Vec<TenantId>>,
    opened_new: Mutex<Vec<TenantId>>,
}

#[async_trait]
impl EngineProvider for FakeEngines {
    async fn open(&self, tenant: &TenantId, _epoch: u64) -> Result<Arc<dyn Backend>, OpenError> {
        match tenant.as_str() {
            t if t.starts_with("missing") => Err(OpenError::Missing),
            t if t.starts_with("corrupt") => Err(OpenError::Corrupt("device record is malformed".into())),
            _ => Ok(Arc::new(whatsapp_rust::wacore::store::InMemoryBackend::new())),
        }
    }
    async fn delete(&self, tenant: &TenantId, _epoch: u64) -> Result<(), OpenError> {
        self.deleted.lock().unwrap().push(tenant.clone());
        Ok(())
    }
    async fn stored(&self, tenant: &TenantId) -> Result<Stored, OpenError> {
        Ok(if tenant.as_str().starts_with("linked") { Stored::Restorable } else { Stored::Missing })
    }
    async fn open_new(&self, tenant: &TenantId, _epoch: u64) -> Result<Arc<dyn Backend>, OpenError> {
        self.opened_new.lock().unwrap().push(tenant.clone());
        Err(OpenError::Unavailable("no store in router tests".into()))
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    state: Arc<AppState>,
    store: Arc<EmbeddedStore>,
    engines: Arc<FakeEngines>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(EmbeddedStore::open(dir.path().join("store.redb"), Cipher::new(&[1; 32])).unwrap());
    let engines = Arc::new(FakeEngines::default());
    let host = Host::new(
        store.clone(),
        engines.clone(),
        Arc::new(Governor::new(GovernorConfig::unlimited())),
        SessionConfig::new("ws://127.0.0.1:9/ws/chat", "router-host"),
    );
    let state = Arc::new(AppState::new(host, TOKEN.into()));
    Fixture { _dir: dir, state, store, engines }
}

async fn call(
    f: &Fixture,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Body,
) -> (StatusCode, serde_json::Value) {
    let mut req = Request::builder().method(method).uri(uri).header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let res = router(f.state.clone()).oneshot(req.body(body).unwrap()).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

async fn authed(f: &Fixture, method: Method, uri: &str) -> (StatusCode, serde_json::Value) {
    call(f, method, uri, Some(TOKEN), Body::empty()).await
}

fn error(code: &str) -> serde_json::Value {
    serde_json::json!({ "error": code })
}

#[tokio::test]
async fn health_needs_no_token_and_counts_sessions() {
    let f = fixture();
    let (status, body) = call(&f, Method::GET, "/health", None, Body::empty()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["boot_id"], f.state.boot_id.as_str());
    assert_eq!(body["sessions"]["open"], 0);
}

#[tokio::test]
async fn every_protected_route_refuses_missing_or_wrong_tokens() {
    let f = fixture();
    let routes = [
        (Method::GET, "/v1/sessions"),
        (Method::GET, "/v1/sessions/a"),
        (Method::PUT, "/v1/sessions/a"),
        (Method::DELETE, "/v1/sessions/a"),
        (Method::POST, "/v1/sessions/a/reconnect"),
        (Method::POST, "/v1/restore"),
        (Method::POST, "/v1/sessions/a/messages"),
        (Method::GET, "/metrics"),
        (Method::POST, "/v1/sessions/a/link"),
        (Method::GET, "/v1/sessions/a/link"),
    ];
    for (m, uri) in routes {
        for token in [None, Some("wrong"), Some(""), Some("router-test-token-and-more")] {
            let (status, body) = call(&f, m.clone(), uri, token, Body::empty()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{m} {uri} with {token:?}");
            assert_eq!(body, error("unauthorized"));
        }
    }
    assert!(f.state.host.list().is_empty(), "no session was touched");
}

#[tokio::test]
async fn bad_tenant_ids_are_refused_on_every_route_and_touch_nothing() {
    let f = fixture();
    let long = "x".repeat(65);
    let bad = ["%2e%2e", "..", "a%2Fb", "%00", "a%20b", "%D0%B0bc", "caf%C3%A9", long.as_str(), "a.b"];
    for id in bad {
        for (m, uri) in [
            (Method::GET, format!("/v1/sessions/{id}")),
            (Method::PUT, format!("/v1/sessions/{id}")),
            (Method::DELETE, format!("/v1/sessions/{id}")),
            (Method::POST, format!("/v1/sessions/{id}/reconnect")),
            (Method::POST, format!("/v1/sessions/{id}/link")),
            (Method::GET, format!("/v1/sessions/{id}/link")),
        ] {
            let (status, body) = authed(&f, m.clone(), &uri).await;
            assert!(status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND, "{m} {uri}: {status}");
            if status == StatusCode::BAD_REQUEST {
                assert_eq!(body, error("bad_tenant_id"), "{m} {uri}");
            }
        }
    }
    // An id that cannot even be a single path segment ("a/b" decoded) never reaches a handler.
    assert!(f.state.host.list().is_empty(), "no session was touched");
    assert!(f.store.list_desired(None, 10).await.unwrap().items.is_empty());
}

#[tokio::test]
async fn ensure_is_idempotent_and_reports_definitive_credential_problems() {
    let f = fixture();
    let (status, body) = authed(&f, Method::PUT, "/v1/sessions/resto-1").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["tenant_id"], "resto-1");
    assert_eq!(body["already_running"], false);
    let (status, body) = authed(&f, Method::PUT, "/v1/sessions/resto-1").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["already_running"], true);

    let (status, body) = authed(&f, Method::PUT, "/v1/sessions/missing-1").await;
    assert_eq!((status, body), (StatusCode::CONFLICT, error("credentials_missing")));
    let (status, body) = authed(&f, Method::PUT, "/v1/sessions/corrupt-1").await;
    assert_eq!((status, body), (StatusCode::CONFLICT, error("credentials_corrupt")));
    let rec = f.store.get(&TenantId::parse("missing-1").unwrap()).await.unwrap().unwrap();
    assert_eq!(rec.status, Some(TenantStatus::CredentialsMissing));
    assert!(!rec.whatsapp_connected);
    let rec = f.store.get(&TenantId::parse("corrupt-1").unwrap()).await.unwrap().unwrap();
    assert_eq!(rec.status, Some(TenantStatus::CredentialsCorrupt));

    let (status, body) = authed(&f, Method::GET, "/v1/sessions/missing-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["state"], "credentials_missing");
    let (status, body) = authed(&f, Method::GET, "/v1/sessions").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["sessions"].as_array().unwrap().len(), 3);
    assert_eq!(body["boot_id"], f.state.boot_id.as_str());
}

#[tokio::test]
async fn get_reconnect_stop_and_logout() {
    let f = fixture();
    assert_eq!(authed(&f, Method::GET, "/v1/sessions/nobody").await, (StatusCode::NOT_FOUND, error("not_found")));
    assert_eq!(authed(&f, Method::POST, "/v1/sessions/nobody/reconnect").await.0, StatusCode::NOT_FOUND);
    assert_eq!(authed(&f, Method::DELETE, "/v1/sessions/nobody").await.0, StatusCode::NOT_FOUND);

    assert_eq!(authed(&f, Method::PUT, "/v1/sessions/resto-2").await.0, StatusCode::ACCEPTED);
    let (status, body) = authed(&f, Method::POST, "/v1/sessions/resto-2/reconnect").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["tenant_id"], "resto-2");
    assert_eq!(authed(&f, Method::DELETE, "/v1/sessions/resto-2").await.0, StatusCode::NO_CONTENT);
    assert_eq!(authed(&f, Method::GET, "/v1/sessions/resto-2").await.0, StatusCode::NOT_FOUND);
    assert!(f.engines.deleted.lock().unwrap().is_empty(), "stop keeps credentials");

    assert_eq!(authed(&f, Method::PUT, "/v1/sessions/resto-3").await.0, StatusCode::ACCEPTED);
    assert_eq!(authed(&f, Method::DELETE, "/v1/sessions/resto-3?logout=true").await.0, StatusCode::NO_CONTENT);
    assert_eq!(*f.engines.deleted.lock().unwrap(), vec![TenantId::parse("resto-3").unwrap()]);
    let (_, body) = authed(&f, Method::GET, "/v1/sessions/resto-3").await;
    assert_eq!(body["state"], "logged_out");
    let rec = f.store.get(&TenantId::parse("resto-3").unwrap()).await.unwrap().unwrap();
    assert_eq!(rec.status, Some(TenantStatus::LoggedOut));
    assert_eq!(authed(&f, Method::DELETE, "/v1/sessions/resto-3?logout=maybe").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(authed(&f, Method::DELETE, "/v1/sessions/resto-3?unknown=1").await.0, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn restore_validates_its_body() {
    let f = fixture();
    let post = |body: &str| call(&f, Method::POST, "/v1/restore", Some(TOKEN), Body::from(body.to_owned()));
    assert_eq!(post("{not json").await, (StatusCode::BAD_REQUEST, error("bad_request")));
    assert_eq!(post(r#"{"tenant_ids":["a"],"extra":1}"#).await, (StatusCode::BAD_REQUEST, error("bad_request")));
    assert_eq!(post(r#"{"tenant_ids":"a"}"#).await, (StatusCode::BAD_REQUEST, error("bad_request")));
    let huge = format!(r#"{{"tenant_ids":["{}"]}}"#, "a".repeat(70 * 1024));
    assert_eq!(post(&huge).await, (StatusCode::PAYLOAD_TOO_LARGE, error("payload_too_large")));
    assert!(f.state.host.list().is_empty(), "rejected requests touched nothing");

    let (status, body) = post(r#"{"tenant_ids":["ok-1","../etc","missing-9","ok-1"]}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["already_running"], 1);
    let rejected = body["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 2);
    assert_eq!(rejected[0], serde_json::json!({"tenant_id": "../etc", "error": "bad_tenant_id"}));
    assert_eq!(rejected[1], serde_json::json!({"tenant_id": "missing-9", "error": "credentials_missing"}));

    // No body: every desired tenant of the tenant store.
    f.store.set_desired(&TenantId::parse("desired-1").unwrap(), true).await.unwrap();
    let (status, body) = call(&f, Method::POST, "/v1/restore", Some(TOKEN), Body::empty()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["accepted"], 1);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let f = fixture();
    assert_eq!(authed(&f, Method::GET, "/v2/anything").await, (StatusCode::NOT_FOUND, error("not_found")));
    assert_eq!(call(&f, Method::GET, "/nope", None, Body::empty()).await, (StatusCode::NOT_FOUND, error("not_found")));
    assert_eq!(
        authed(&f, Method::PATCH, "/v1/sessions/a").await,
        (StatusCode::METHOD_NOT_ALLOWED, error("method_not_allowed"))
    );
    assert_eq!(authed(&f, Method::DELETE, "/v1/restore").await.0, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn dashboard_page_carries_no_data() {
    let f = fixture();
    let res = router(f.state.clone()).oneshot(Request::get("/dashboard").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let html = String::from_utf8(axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap().to_vec()).unwrap();
    assert!(html.contains("/v1/sessions") && html.contains("Bearer"));
    assert!(!html.contains(TOKEN));
}

#[tokio::test]
async fn metrics_render_as_text() {
    let f = fixture();
    let req = Request::get("/metrics").header("authorization", format!("Bearer {TOKEN}")).body(Body::empty()).unwrap();
    let res = router(f.state.clone()).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
}

#[tokio::test]
async fn sweep_on_request_starts_missing_tenants_and_marks_definitive_failures() {
    let f = fixture();
    f.store.set_desired(&TenantId::parse("wanted-1").unwrap(), true).await.unwrap();
    f.store.set_desired(&TenantId::parse("missing-2").unwrap(), true).await.unwrap();
    assert_eq!(call(&f, Method::POST, "/v1/sweep", None, Body::empty()).await.0, StatusCode::UNAUTHORIZED);
    let (status, report) = authed(&f, Method::POST, "/v1/sweep").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["missing_started"], 1, "{report}");
    assert_eq!(report["marked"], 1, "{report}");
    assert!(f.state.host.get(&TenantId::parse("wanted-1").unwrap()).is_some());
    let rec = f.store.get(&TenantId::parse("missing-2").unwrap()).await.unwrap().unwrap();
    assert_eq!(rec.status, Some(TenantStatus::CredentialsMissing));
}

#[tokio::test]
async fn send_message_refuses_every_bad_request_and_sends_nothing() {
    let f = fixture();
    // A running session that is not open (its connects go to a closed port).
    assert_eq!(authed(&f, Method::PUT, "/v1/sessions/resto-4").await.0, StatusCode::ACCEPTED);
    let post = |tenant: &str, body: String| {
        let uri = format!("/v1/sessions/{tenant}/messages");
        let f = &f;
        async move { call(f, Method::POST, &uri, Some(TOKEN), Body::from(body)).await }
    };
    let json = |v: serde_json::Value| v.to_string();
    let ok_to = "+49 151 2345-6789";

    assert_eq!(
        call(
            &f,
            Method::POST,
            "/v1/sessions/resto-4/messages",
            None,
            Body::from(json(serde_json::json!({"to": ok_to, "text": "hi"})))
        )
        .await,
        (StatusCode::UNAUTHORIZED, error("unauthorized"))
    );
    assert_eq!(
        post("a.b", json(serde_json::json!({"to": ok_to, "text": "hi"}))).await,
        (StatusCode::BAD_REQUEST, error("bad_tenant_id"))
    );
    for body in [
        String::new(),
        "{not json".to_string(),
        json(serde_json::json!({"text": "hi"})),
        json(serde_json::json!({"to": ok_to})),
        json(serde_json::json!({"to": ok_to, "text": "hi", "extra": 1})),
        json(serde_json::json!({"to": 4915123456789u64, "text": "hi"})),
        json(serde_json::json!({"to": ok_to, "text": "hi", "typing_ms": -1})),
        json(serde_json::json!({"to": ok_to, "text": "hi", "typing_ms": "500"})),
    ] {
        assert_eq!(post("resto-4", body.clone()).await, (StatusCode::BAD_REQUEST, error("bad_request")), "{body}");
    }
    for to in ["", "12345", "not a number", "4915123456789@c.us", "4915123456789:2@s.whatsapp.net", "status@broadcast"]
    {
        assert_eq!(
            post("resto-4", json(serde_json::json!({"to": to, "text": "hi"}))).await,
            (StatusCode::BAD_REQUEST, error("bad_recipient")),
            "{to:?}"
        );
    }
    for text in ["", "   ", "\n\t"] {
        assert_eq!(
            post("resto-4", json(serde_json::json!({"to": ok_to, "text": text}))).await,
            (StatusCode::BAD_REQUEST, error("empty_text"))
        );
    }
    let long = "ü".repeat(wakeeper_shared::host_api::MAX_TEXT_CHARS + 1);
    assert_eq!(
        post("resto-4", json(serde_json::json!({"to": ok_to, "text": long}))).await,
        (StatusCode::BAD_REQUEST, error("text_too_long"))
    );
    assert_eq!(
        post("resto-4", json(serde_json::json!({"to": ok_to, "text": "hi", "typing_ms": 10_001}))).await,
        (StatusCode::BAD_REQUEST, error("bad_typing_ms"))
    );
    let huge = json(serde_json::json!({"to": ok_to, "text": "a".repeat(70 * 1024)}));
    assert_eq!(post("resto-4", huge).await, (StatusCode::PAYLOAD_TOO_LARGE, error("payload_too_large")));

    // Well-formed, but the session is not open, or there is none: 409, and no session is created.
    let max = "a".repeat(wakeeper_shared::host_api::MAX_TEXT_CHARS);
    for tenant in ["resto-4", "nobody"] {
        assert_eq!(
            post(tenant, json(serde_json::json!({"to": ok_to, "text": max, "typing_ms": 10_000}))).await,
            (StatusCode::CONFLICT, error("session_not_open")),
            "{tenant}"
        );
    }
    assert_eq!(
        authed(&f, Method::GET, "/v1/sessions/resto-4/messages").await,
        (StatusCode::METHOD_NOT_ALLOWED, error("method_not_allowed"))
    );
    let sessions = f.state.host.list();
    assert_eq!(sessions.len(), 1, "only the session started above exists");
    assert_ne!(sessions[0].state, wakeeper_shared::domain::SessionState::Open);
}

#[tokio::test]
async fn link_refuses_bad_bodies_and_phones_and_touches_nothing() {
    let f = fixture();
    let post = |body: &str| call(&f, Method::POST, "/v1/sessions/new-1/link", Some(TOKEN), Body::from(body.to_owned()));
    for body in ["{not json", r#"{"phone":"15551234567","extra":1}"#, r#"{"phone":15551234567}"#, "[]", r#""x""#] {
        assert_eq!(post(body).await, (StatusCode::BAD_REQUEST, error("bad_request")), "{body}");
    }
    for phone in ["", "abc", "+1 555 123 4567", "1555-123-4567", "0155512345", "12345", "1234567890123456", "+"] {
        let body = serde_json::json!({ "phone": phone }).to_string();
        assert_eq!(post(&body).await, (StatusCode::BAD_REQUEST, error("bad_phone")), "{phone:?}");
    }
    let huge = format!(r#"{{"phone":"{}"}}"#, "1".repeat(70 * 1024));
    assert_eq!(post(&huge).await, (StatusCode::PAYLOAD_TOO_LARGE, error("payload_too_large")));
    assert!(f.state.host.list().is_empty(), "rejected requests touched no session");
    assert!(f.engines.opened_new.lock().unwrap().is_empty(), "nor any store");
    assert!(f.store.get(&TenantId::parse("new-1").unwrap()).await.unwrap().is_none(), "nor the tenant table");
    assert_eq!(authed(&f, Method::GET, "/v1/sessions/new-1/link").await, (StatusCode::NOT_FOUND, error("not_found")));
}

#[tokio::test]
async fn link_refuses_tenants_that_are_already_linked() {
    let f = fixture();
    // Restorable credentials and no terminal mark: connect it with PUT instead.
    let (status, body) = authed(&f, Method::POST, "/v1/sessions/linked-1/link").await;
    assert_eq!((status, body), (StatusCode::CONFLICT, error("already_linked")));
    assert!(f.store.get(&TenantId::parse("linked-1").unwrap()).await.unwrap().is_none(), "no lease taken");
    // A running session.
    assert_eq!(authed(&f, Method::PUT, "/v1/sessions/resto-1").await.0, StatusCode::ACCEPTED);
    let (status, body) = authed(&f, Method::POST, "/v1/sessions/resto-1/link").await;
    assert_eq!((status, body), (StatusCode::CONFLICT, error("already_linked")));
    assert_eq!(f.state.host.list().len(), 1);
    assert!(f.engines.opened_new.lock().unwrap().is_empty(), "nothing was deleted or opened anew");
    assert_eq!(
        authed(&f, Method::GET, "/v1/sessions/resto-1/link").await,
        (StatusCode::NOT_FOUND, error("not_found")),
        "a normal session has no link attempt"
    );
}

#[tokio::test]
async fn link_may_replace_credentials_of_a_terminal_tenant() {
    let f = fixture();
    let id = TenantId::parse("linked-2").unwrap();
    f.store
        .write_status(
            &id,
            &wakeeper_shared::domain::StatusUpdate::terminal(TenantStatus::LoggedOut, "device removed"),
            1,
        )
        .await
        .unwrap();
    // Allowed past every check: the lease is taken and a new engine store is asked for (which fails here).
    let (status, body) = authed(&f, Method::POST, "/v1/sessions/linked-2/link").await;
    assert_eq!((status, body), (StatusCode::SERVICE_UNAVAILABLE, error("unavailable")));
    assert_eq!(*f.engines.opened_new.lock().unwrap(), vec![id.clone()]);
    let rec = f.store.get(&id).await.unwrap().unwrap();
    assert!(rec.lease.as_ref().is_some_and(|l| l.expires_at == 0), "the lease was released: {:?}", rec.lease);
    assert_eq!(rec.status, Some(TenantStatus::LoggedOut), "the mark stays until a link succeeds");
    assert!(f.state.host.list().is_empty());
}
