//! The HTTP surface: `/health`, the control API under `/v1`, `/metrics`, and the dashboard.
//!
//! Every route but `GET /health`, `GET /ready` and the data-less `GET /dashboard` page needs `Authorization: Bearer <token>` (compared in constant time). Every
//! input is validated before anything is touched: tenant ids, JSON bodies (unknown fields refused), body size.
//! Errors are JSON with a stable `error` code and no internal detail; the cause goes to the log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tower_http::timeout::TimeoutLayer;
use wakeeper_shared::domain::TenantId;
use wakeeper_shared::host_api::{
    Accepted, ErrorBody, Health, Rejected, RestoreRequest, RestoreResponse, SendMessageRequest, SendMessageResponse,
    SessionList, codes,
};
use wakeeper_shared::host_api::{LinkRequest, LinkStatus, LinkView, SessionView};
use wakeeper_shared::sweep::SweepReport;

use crate::host::{EnsureError, Host, LinkError};
use crate::session::OpenError;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// What every handler can reach.
pub struct AppState {
    /// Random id of this process's life: a sweep seeing it change knows the host restarted.
    pub boot_id: String,
    /// When the process started.
    pub started: Instant,
    /// The sessions.
    pub host: Arc<Host>,
    /// The control token.
    pub token: String,
    /// Renders `/metrics` (none in tests that do not install a recorder).
    pub metrics: Option<crate::telemetry::Metrics>,
    /// Runs the health sweep on request (`POST /v1/sweep`) and on the timer.
    pub sweeper: Arc<crate::sweep_timer::Sweeper>,
    /// The conditions of `GET /ready`.
    pub readiness: crate::readiness::Readiness,
    /// Local disk faults: work that needs the disk is refused while one lasts.
    pub disk: wakeeper_shared::disk::DiskWatch,
}

impl AppState {
    /// State for `host` with a new boot id.
    pub fn new(host: Arc<Host>, token: String) -> Self {
        let boot_id = wakeeper_shared::crypto::random_hex(8);
        let sweeper = Arc::new(crate::sweep_timer::Sweeper::new(host.clone(), boot_id.clone()));
        Self {
            boot_id,
            started: Instant::now(),
            host,
            token,
            metrics: None,
            sweeper,
            readiness: Default::default(),
            disk: Default::default(),
        }
    }
}

/// A refusal with its status and stable code (and, for a few, a sentence for a person).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str) -> Self {
        Self { status, code, message: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.code.to_owned(), message: self.message.map(str::to_owned) };
        (self.status, Json(body)).into_response()
    }
}

/// Refuses work that needs the disk while a disk fault lasts (503 `disk_full` / `disk_unavailable`), before
/// anything is touched; open sessions carry on meanwhile.
fn disk_writable(state: &AppState) -> Result<(), ApiError> {
    use wakeeper_shared::disk::FaultKind;
    let (code, message) = match state.disk.fault() {
        None => return Ok(()),
        Some(FaultKind::Full) => (
            codes::DISK_FULL,
            "the host's disk is full: nothing that needs a write is accepted until space is freed (see /ready)",
        ),
        Some(FaultKind::Unavailable) => (
            codes::DISK_UNAVAILABLE,
            "the host's disk refuses writes: nothing that needs one is accepted until it takes writes again \
             (see /ready)",
        ),
    };
    Err(ApiError { status: StatusCode::SERVICE_UNAVAILABLE, code, message: Some(message) })
}

fn tenant(raw: &str) -> Result<TenantId, ApiError> {
    TenantId::parse(raw).map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, codes::BAD_TENANT_ID))
}

/// Parses an optional JSON body strictly (unknown fields are refused by the wire types); an empty body or a
/// JSON `null` is `T::default()`.
fn json_body<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() || trimmed == b"null" {
        return Ok(T::default());
    }
    json_object(body)
}

/// Parses a required JSON object body strictly (serde would also read a struct from a JSON array).
fn json_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.trim_ascii().first() != Some(&b'{') {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, codes::BAD_REQUEST));
    }
    serde_json::from_slice(body).map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, codes::BAD_REQUEST))
}

#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, description = "The host answers (liveness).", body = Health)))]
async fn health(State(state): State<Arc<AppState>>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        boot_id: state.boot_id.clone(),
        uptime_s: state.started.elapsed().as_secs(),
        sessions: state.host.counts().into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        errors: state.host.host_errors(),
    })
}

#[utoipa::path(get, path = "/metrics", tag = "health", security(("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text format (see the README's metrics table).", content_type = "text/plain", body = String),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    for (name, count) in state.host.counts() {
        metrics::gauge!("wakeeper_sessions", "state" => name).set(count as f64);
    }
    let body = state.metrics.as_ref().map(|h| h.render()).unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

#[utoipa::path(get, path = "/v1/sessions", tag = "sessions", security(("bearer" = [])),
    responses(
        (status = 200, description = "Every session of this host.", body = SessionList),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
    ))]
async fn list_sessions(State(state): State<Arc<AppState>>) -> Json<SessionList> {
    Json(SessionList {
        boot_id: state.boot_id.clone(),
        sessions: state.host.list(),
        host_errors: state.host.host_errors(),
    })
}

#[utoipa::path(get, path = "/v1/sessions/{tenant_id}", tag = "sessions", security(("bearer" = [])),
    params(("tenant_id" = TenantId, Path, description = "The tenant.")),
    responses(
        (status = 200, description = "The session.", body = SessionView),
        (status = 400, description = "`bad_tenant_id`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: this host runs no session of the tenant.", body = ErrorBody),
    ))]
async fn get_session(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = tenant(&id)?;
    state.host.get(&id).map(|v| Json(v).into_response()).ok_or(ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND))
}

#[utoipa::path(put, path = "/v1/sessions/{tenant_id}", tag = "sessions", security(("bearer" = [])),
    params(("tenant_id" = TenantId, Path, description = "The tenant.")),
    responses(
        (status = 202, description = "The session runs (or was already running).", body = Accepted),
        (status = 400, description = "`bad_tenant_id`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 409, description = "`credentials_missing` or `credentials_corrupt`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `data_key_mismatch`, `disk_full` or `disk_unavailable`", body = ErrorBody),
    ))]
async fn put_session(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = tenant(&id)?;
    disk_writable(&state)?;
    match state.host.ensure(&id).await {
        Ok(e) => Ok((
            StatusCode::ACCEPTED,
            Json(Accepted { tenant_id: id, state: e.state, already_running: e.already_running }),
        )
            .into_response()),
        Err(EnsureError::CredentialsMissing) => Err(ApiError::new(StatusCode::CONFLICT, codes::CREDENTIALS_MISSING)),
        Err(EnsureError::CredentialsCorrupt) => Err(ApiError::new(StatusCode::CONFLICT, codes::CREDENTIALS_CORRUPT)),
        Err(EnsureError::ShuttingDown) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE)),
        Err(EnsureError::DataKeyMismatch(_)) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, codes::DATA_KEY_MISMATCH))
        }
    }
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeleteParams {
    /// Log the device out (it is unlinked from the phone) and delete its credentials, instead of only
    /// stopping the session. Only on the host that holds the tenant's lease.
    #[serde(default)]
    logout: bool,
}

/// `GET /v1/webhooks/dead-letters`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct DeadLetterList {
    /// Oldest first.
    dead_letters: Vec<crate::outbox::DeadLetter>,
}

/// `POST /v1/webhooks/dead-letters/{number}/replay`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
struct Replayed {
    /// The dead letter's number.
    replayed: u64,
}

#[utoipa::path(delete, path = "/v1/sessions/{tenant_id}", tag = "sessions", security(("bearer" = [])),
    params(("tenant_id" = TenantId, Path, description = "The tenant."), DeleteParams),
    responses(
        (status = 204, description = "Stopped (credentials kept), or logged out and its credentials deleted."),
        (status = 400, description = "`bad_tenant_id` or `bad_request` (a bad query)", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no session of the tenant to stop.", body = ErrorBody),
        (status = 409, description = "`lease_held`: another host holds the tenant (log out there).", body = ErrorBody),
        (status = 503, description = "`unavailable`, `disk_full` or `disk_unavailable`", body = ErrorBody),
    ))]
async fn delete_session(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    params: Result<Query<DeleteParams>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let id = tenant(&id)?;
    let Query(params) = params.map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, codes::BAD_REQUEST))?;
    if params.logout {
        disk_writable(&state)?;
        return match state.host.logout(&id).await {
            Ok(_) => Ok(StatusCode::NO_CONTENT),
            Err(OpenError::LeaseHeld) => Err(ApiError::new(StatusCode::CONFLICT, codes::LEASE_HELD)),
            Err(e) => {
                tracing::warn!(tenant = %id, error = %e, "logout failed");
                Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE))
            }
        };
    }
    if state.host.stop(&id).await {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND))
    }
}

#[utoipa::path(post, path = "/v1/sessions/{tenant_id}/reconnect", tag = "sessions", security(("bearer" = [])),
    params(("tenant_id" = TenantId, Path, description = "The tenant.")),
    responses(
        (status = 202, description = "The session reconnects now.", body = Accepted),
        (status = 400, description = "`bad_tenant_id`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: this host runs no session of the tenant.", body = ErrorBody),
    ))]
async fn reconnect(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = tenant(&id)?;
    if !state.host.reconnect(&id) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND));
    }
    let view = state.host.get(&id).ok_or(ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND))?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { tenant_id: id, state: view.state, already_running: true }))
        .into_response())
}

#[utoipa::path(post, path = "/v1/restore", tag = "fleet", security(("bearer" = [])),
    request_body(content = Option<RestoreRequest>, description = "Empty, or the tenants to restore.", content_type = "application/json"),
    responses(
        (status = 202, description = "Sessions started; refused ids listed one by one.", body = RestoreResponse),
        (status = 400, description = "`bad_request`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `disk_full` or `disk_unavailable`", body = ErrorBody),
    ))]
async fn restore(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, ApiError> {
    let request: RestoreRequest = json_body(&body)?;
    disk_writable(&state)?;
    let mut response = RestoreResponse::default();
    let ids: Vec<TenantId> = match request.tenant_ids {
        Some(raw) => raw
            .into_iter()
            .filter_map(|s| match TenantId::parse(&s) {
                Ok(id) => Some(id),
                Err(_) => {
                    response.rejected.push(Rejected { tenant_id: s, error: codes::BAD_TENANT_ID.into() });
                    None
                }
            })
            .collect(),
        None => wakeeper_shared::restore::desired_in_restore_order(
            state.host.tenants().as_ref(),
            crate::restore_on_start::PAGE_SIZE,
        )
        .await
        .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE))?
        .into_iter()
        .map(|r| r.tenant_id)
        .collect(),
    };
    let outcomes =
        crate::restore_on_start::ensure_many(&state.host, ids, crate::restore_on_start::DEFAULT_CONCURRENCY).await;
    for (id, outcome) in outcomes {
        match outcome {
            Ok(e) if e.already_running => response.already_running += 1,
            Ok(_) => response.accepted += 1,
            Err(e) => response.rejected.push(Rejected {
                tenant_id: id.to_string(),
                error: match e {
                    EnsureError::CredentialsMissing => codes::CREDENTIALS_MISSING,
                    EnsureError::CredentialsCorrupt => codes::CREDENTIALS_CORRUPT,
                    EnsureError::ShuttingDown => codes::UNAVAILABLE,
                    EnsureError::DataKeyMismatch(_) => codes::DATA_KEY_MISMATCH,
                }
                .into(),
            }),
        }
    }
    Ok((StatusCode::ACCEPTED, Json(response)).into_response())
}

/// `POST /v1/sessions/{id}/messages`: validates everything, then hands the text to the open session's sender
/// task and answers 202 with the message id at once (typing and sending happen after the answer).
#[utoipa::path(post, path = "/v1/sessions/{tenant_id}/messages", tag = "messages", security(("bearer" = [])),
    params(("tenant_id" = TenantId, Path, description = "The tenant.")),
    request_body(content = SendMessageRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Queued on the open session; typing and sending follow.", body = SendMessageResponse),
        (status = 400, description = "`bad_tenant_id`, `bad_request`, `bad_recipient`, `empty_text`, `text_too_long` or `bad_typing_ms`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 409, description = "`session_not_open`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 429, description = "`send_queue_full`", body = ErrorBody),
        (status = 503, description = "`disk_full` or `disk_unavailable`", body = ErrorBody),
    ))]
async fn send_message(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    use crate::messages::{Invalid, check_text, check_typing, parse_recipient};
    use crate::session::SendRefused;
    let id = tenant(&id)?;
    let request: SendMessageRequest = json_object(&body)?;
    let invalid = |e: Invalid| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            match e {
                Invalid::Recipient => codes::BAD_RECIPIENT,
                Invalid::EmptyText => codes::EMPTY_TEXT,
                Invalid::TextTooLong => codes::TEXT_TOO_LONG,
                Invalid::Typing => codes::BAD_TYPING_MS,
            },
        )
    };
    let to = parse_recipient(&request.to).map_err(invalid)?;
    check_text(&request.text).map_err(invalid)?;
    let typing = check_typing(request.typing_ms).map_err(invalid)?;
    disk_writable(&state)?;
    let jid = to.to_string();
    match state.host.queue_text(&id, to, request.text, typing) {
        Ok(message_id) => {
            Ok((StatusCode::ACCEPTED, Json(SendMessageResponse { tenant_id: id, message_id, to: jid })).into_response())
        }
        Err(SendRefused::NotOpen) => Err(ApiError::new(StatusCode::CONFLICT, codes::SESSION_NOT_OPEN)),
        Err(SendRefused::QueueFull) => Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, codes::SEND_QUEUE_FULL)),
    }
}

#[utoipa::path(post, path = "/v1/sweep", tag = "fleet", security(("bearer" = [])),
    responses(
        (status = 200, description = "What the sweep did.", body = SweepReport),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 503, description = "`unavailable`: the tenant store did not answer.", body = ErrorBody),
    ))]
async fn sweep(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    match state.sweeper.sweep().await {
        Ok(report) => Ok(Json(report).into_response()),
        Err(e) => {
            tracing::warn!(error = %e, "sweep on request failed");
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE))
        }
    }
}

/// `GET /v1/webhooks/dead-letters`: the events a webhook URL refused for good (none without webhooks).
#[utoipa::path(get, path = "/v1/webhooks/dead-letters", tag = "webhooks", security(("bearer" = [])),
    responses(
        (status = 200, description = "The events a webhook URL refused for good.", body = DeadLetterList),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 503, description = "`unavailable`: the outbox could not be read.", body = ErrorBody),
    ))]
async fn list_dead_letters(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let dead = match state.host.outbox() {
        Some(outbox) => outbox.dead_letters().await.map_err(|e| {
            tracing::warn!(error = %e, "could not read the dead letters");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE)
        })?,
        None => Vec::new(),
    };
    Ok(Json(DeadLetterList { dead_letters: dead }).into_response())
}

/// `POST /v1/webhooks/dead-letters/{number}/replay`: the dead letter goes back to its URL's queue (202), or
/// 404 when there is none by that number (or its URL is no longer configured).
#[utoipa::path(post, path = "/v1/webhooks/dead-letters/{number}/replay", tag = "webhooks", security(("bearer" = [])),
    params(("number" = u64, Path, description = "The dead letter's number (from the list).")),
    responses(
        (status = 202, description = "Back in its URL's queue.", body = Replayed),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no dead letter by that number, or its URL is gone.", body = ErrorBody),
        (status = 503, description = "`unavailable`, `disk_full` or `disk_unavailable`", body = ErrorBody),
    ))]
async fn replay_dead_letter(
    State(state): State<Arc<AppState>>,
    Path(number): Path<String>,
) -> Result<Response, ApiError> {
    let number: u64 = number.parse().map_err(|_| ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND))?;
    disk_writable(&state)?;
    let Some(outbox) = state.host.outbox() else { return Err(ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND)) };
    match outbox.replay(number).await {
        Ok(true) => Ok((StatusCode::ACCEPTED, Json(Replayed { replayed: number })).into_response()),
        Ok(false) => Err(ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND)),
        Err(e) => {
            tracing::warn!(error = %e, "could not replay a dead letter");
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE))
        }
    }
}

/// Longest `POST .../link` waits for WhatsApp's first QR code; past it the attempt is cancelled (504).
const FIRST_QR_WAIT: Duration = Duration::from_secs(20);

#[utoipa::path(post, path = "/v1/sessions/{tenant_id}/link", tag = "link", security(("bearer" = [])),
    params(("tenant_id" = TenantId, Path, description = "The tenant.")),
    request_body(content = Option<LinkRequest>, description = "Empty, or a phone number to get a pairing code for.", content_type = "application/json"),
    responses(
        (status = 200, description = "The attempt already running.", body = LinkView),
        (status = 202, description = "A new attempt: its first QR code.", body = LinkView),
        (status = 400, description = "`bad_tenant_id`, `bad_request` or `bad_phone`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 409, description = "`already_linked` or `lease_held`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 502, description = "`pairing_code_failed`: the QR code is still shown.", body = ErrorBody),
        (status = 503, description = "`unavailable`, `disk_full` or `disk_unavailable`", body = ErrorBody),
        (status = 504, description = "`link_timeout`: no QR code from WhatsApp in time.", body = ErrorBody),
    ))]
async fn start_link(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = tenant(&id)?;
    let request: LinkRequest = json_body(&body)?;
    let phone = match request.phone.as_deref() {
        None => None,
        Some(raw) => Some(
            crate::session::link::parse_phone(raw).ok_or(ApiError::new(StatusCode::BAD_REQUEST, codes::BAD_PHONE))?,
        ),
    };
    disk_writable(&state)?;
    let (handle, started) = state.host.link(&id).await.map_err(|e| match e {
        LinkError::AlreadyLinked => ApiError::new(StatusCode::CONFLICT, codes::ALREADY_LINKED),
        LinkError::LeaseHeld => ApiError::new(StatusCode::CONFLICT, codes::LEASE_HELD),
        LinkError::ShuttingDown => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE),
        LinkError::Unavailable(why) => {
            tracing::warn!(tenant = %id, error = %why, "link refused: a store is unavailable");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, codes::UNAVAILABLE)
        }
    })?;
    if !handle.wait_for_qr(FIRST_QR_WAIT).await {
        tracing::warn!(tenant = %id, "no QR code from WhatsApp in time; cancelling the link attempt");
        state.host.stop(&id).await;
        return Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, codes::LINK_TIMEOUT));
    }
    if let Some(phone) = phone
        && handle.link_view().is_some_and(|v| v.status == LinkStatus::Waiting)
        && let Err(why) = handle.request_pair_code(phone).await
    {
        tracing::warn!(tenant = %id, error = %why, "no pairing code; the QR code is still shown");
        return Err(ApiError::new(StatusCode::BAD_GATEWAY, codes::PAIRING_CODE_FAILED));
    }
    let view = handle.link_view().ok_or(ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND))?;
    let status = if started { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, [(header::CACHE_CONTROL, "no-store")], Json(view)).into_response())
}

#[utoipa::path(get, path = "/v1/sessions/{tenant_id}/link", tag = "link", security(("bearer" = [])),
    params(("tenant_id" = TenantId, Path, description = "The tenant.")),
    responses(
        (status = 200, description = "The link attempt (QR codes rotate: ask again).", body = LinkView),
        (status = 400, description = "`bad_tenant_id`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 404, description = "`not_found`: no link attempt for the tenant.", body = ErrorBody),
    ))]
async fn get_link(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = tenant(&id)?;
    let view = state.host.handle(&id).and_then(|h| h.link_view());
    let view = view.ok_or(ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND))?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(view)).into_response())
}

#[utoipa::path(get, path = "/dashboard", tag = "health",
    responses((status = 200, description = "The dashboard page (its script calls /v1 with the token).", content_type = "text/html", body = String)))]
async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn require_token(State(state): State<Arc<AppState>>, headers: HeaderMap, req: Request, next: Next) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok: bool = presented.as_bytes().ct_eq(state.token.as_bytes()).into();
    if !ok || state.token.is_empty() {
        return ApiError::new(StatusCode::UNAUTHORIZED, codes::UNAUTHORIZED).into_response();
    }
    next.run(req).await
}

/// Turns the framework's own refusals (oversized bodies, unknown methods) into the API's JSON errors.
async fn json_errors(req: Request, next: Next) -> Response {
    let res = next.run(req).await;
    let code = match res.status() {
        StatusCode::PAYLOAD_TOO_LARGE => codes::PAYLOAD_TOO_LARGE,
        StatusCode::METHOD_NOT_ALLOWED => codes::METHOD_NOT_ALLOWED,
        StatusCode::REQUEST_TIMEOUT => codes::UNAVAILABLE,
        _ => return res,
    };
    let is_json =
        res.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json { res } else { ApiError::new(res.status(), code).into_response() }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, codes::NOT_FOUND)
}

/// The control API's OpenAPI 3.1 description, generated from the handlers' `#[utoipa::path]` attributes and
/// the wire types of `wakeeper_shared::host_api`. Served at `GET /openapi.json`, printed by
/// `socket-host openapi`, committed as `docs/openapi.json` (a test keeps the file current).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "wakeeper socket host",
        description = "The control API of a wakeeper socket host: one WhatsApp Web session per tenant. \
            Errors are `{\"error\": \"<stable code>\"}`; every answer carries `x-request-id`."
    ),
    paths(
        health, crate::readiness::ready, metrics_text, openapi_json, dashboard,
        list_sessions, get_session, put_session, delete_session, reconnect, send_message,
        start_link, get_link, restore, sweep, list_dead_letters, replay_dead_letter,
    ),
    modifiers(&BearerToken),
    tags(
        (name = "health", description = "Liveness, readiness, metrics, this description and the dashboard."),
        (name = "sessions", description = "Each tenant's session on this host."),
        (name = "messages", description = "Sending for the bot (received messages go to the webhooks)."),
        (name = "link", description = "Linking a new number with a QR code or a pairing code."),
        (name = "fleet", description = "Restore and the health sweep."),
        (name = "webhooks", description = "Events a webhook URL refused for good."),
    )
)]
pub struct ApiDoc;

/// The `bearer` security scheme the protected routes name: the control token.
struct BearerToken;

impl utoipa::Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("The control token (`WAKEEPER_CONTROL_TOKEN` or its file)."))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The description as pretty JSON, as `docs/openapi.json` holds it.
pub fn openapi_document() -> String {
    use utoipa::OpenApi;
    let mut text = ApiDoc::openapi().to_pretty_json().expect("the description serializes");
    text.push('\n');
    text
}

#[utoipa::path(get, path = "/openapi.json", tag = "health",
    responses((status = 200, description = "This description (OpenAPI 3.1).", content_type = "application/json", body = Object)))]
async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = DOCUMENT.get_or_init(openapi_document).clone();
    ([(header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// The host's router.
pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/sessions/{tenant_id}", get(get_session).put(put_session).delete(delete_session))
        .route("/v1/sessions/{tenant_id}/reconnect", post(reconnect))
        .route("/v1/sessions/{tenant_id}/messages", post(send_message))
        .route("/v1/sessions/{tenant_id}/link", post(start_link).get(get_link))
        .route("/v1/restore", post(restore))
        .route("/v1/sweep", post(sweep))
        .route("/v1/webhooks/dead-letters", get(list_dead_letters))
        .route("/v1/webhooks/dead-letters/{number}/replay", post(replay_dead_letter))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(crate::readiness::ready))
        // The page itself holds no data (its script calls /v1 with the bearer token), so a browser can load it.
        .route("/dashboard", get(dashboard))
        .route("/openapi.json", get(openapi_json))
        .merge(protected)
        .fallback(not_found)
        .layer(middleware::from_fn(json_errors))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(30)))
        // Outermost: it logs every answer, a timeout's included.
        .layer(middleware::from_fn(crate::access_log::access_log))
        .with_state(state)
}
