//! The HTTP surface: `/health` now; the control API, `/metrics` and the dashboard grow here.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

/// What every handler can reach.
pub struct AppState {
    /// Random id of this process's life: a sweep seeing it change knows the host restarted.
    pub boot_id: String,
    /// When the process started.
    pub started: Instant,
}

impl AppState {
    /// Fresh state with a new boot id.
    pub fn new() -> Self {
        let mut raw = [0u8; 8];
        getrandom::fill(&mut raw).expect("the OS random source works");
        let boot_id = raw.iter().map(|b| format!("{b:02x}")).collect();
        Self { boot_id, started: Instant::now() }
    }
}

impl Default for AppState {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    boot_id: String,
    uptime_s: u64,
    sessions: serde_json::Map<String, serde_json::Value>,
}

async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    Json(Health {
        status: "ok",
        boot_id: state.boot_id.clone(),
        uptime_s: state.started.elapsed().as_secs(),
        sessions: serde_json::Map::new(),
    })
}

/// The host's router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new().route("/health", get(health)).with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    #[tokio::test]
    async fn health_answers_ok_with_boot_id() {
        let state = Arc::new(AppState::new());
        let boot = state.boot_id.clone();
        let res = router(state).oneshot(Request::get("/health").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        let body = axum::body::to_bytes(res.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["status"], "ok");
        assert_eq!(v["boot_id"], boot.as_str());
        assert_eq!(boot.len(), 16);
    }
}
