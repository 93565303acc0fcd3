//! The HTTP control surface: the same operations as [`SimHandle`], for a simulator running in its own
//! process (benchmarks, manual runs, a Baileys host). JSON in and out; a device is named by its
//! phone-number JID, and fault endpoints take `?device=JID` (absent: every connection / the global setting).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use wakeeper_shared::domain::TenantId;

use crate::faults::{PongMode, Refusal, StreamErrorKind, Target};
use crate::mint::MintOptions;
use crate::observe::hex;
use crate::server::{SimError, SimHandle};

/// The control surface, as `wa-sim --help` prints it.
pub const HELP: &str = "\
CONTROL SURFACE (HTTP, JSON; --control-addr)
  GET    /health                              liveness
  GET    /v1/keys                             root public key (hex; pin it in place of WhatsApp's) and
                                              the server's Noise static key
  GET    /v1/summary                          totals: connect attempts, peak attempts/s, handshakes,
                                              logins, rejections, refusals, open and logged-in connections
  GET    /v1/observations[?devices=false]     summary + attempts per second + per-device observations
  GET    /v1/devices/{jid}                    one device: current and max concurrent connections, attempts
                                              (with timestamps), presented noise keys, pings, pre-keys
  POST   /v1/devices                          mint a paired device
                                              {\"tenant\":\"t1\", \"push_name\"?, \"device_id\"?, \"server_has_prekeys\"?}
                                              -> {jid, lid, noise_public, snapshot:{generation, records:[{kind,key,value_b64}]}}
  POST   /v1/devices/register                 register devices paired elsewhere (load tools, imports)
                                              {\"devices\":[{\"jid\":\"5511...:1@s.whatsapp.net\", \"noise_public\":\"<hex>\"}]}
  POST   /v1/devices/{jid}/revoke             next login of the device gets <failure reason=\"401\"/>
  POST   /v1/devices/{jid}/reinstate          undo revoke
  POST   /v1/devices/{jid}/forget-prekeys     server forgets the pre-keys; the engine re-uploads
  POST   /v1/faults/drop[?device=JID]         close logged-in TCP connections (no close frame)
  POST   /v1/faults/half-open[?device=JID]    stop answering, keep the sockets
  POST   /v1/faults/stream-error[?device=JID] {\"code\":401|429|440|503|515} or {\"kind\":\"device_removed\"}
  PUT    /v1/faults/pong[?device=JID]         {\"mode\":\"normal\"} | {\"mode\":\"drop\"} | {\"mode\":\"delay\",\"delay_ms\":N}
  POST   /v1/faults/refuse[?device=JID]       {\"code\":429|503, \"duration_ms\":N, \"point\":\"stream\"|\"upgrade\"}
                                              (upgrade = HTTP status at the WebSocket upgrade; global only)
  PUT    /v1/faults/handshake-delay[?device=JID] {\"delay_ms\":N|null}
  GET    /v1/faults[?device=JID]              the settings in force
  DELETE /v1/faults[?device=JID]              clear the settings
  POST   /v1/contacts                         add a contact (idempotent): a WhatsApp user with real Signal keys
                                              {\"phone\":\"5511...\"} -> {phone, jid, registration_id, identity_key,
                                              prekeys_left, account_phone}
  GET    /v1/contacts/{phone}                 the contact
  POST   /v1/contacts/{phone}/messages        the contact sends text to a device (pkmsg first, then msg)
                                              {\"to\":\"5511...:7@s.whatsapp.net\", \"text\":\"hi\"} -> {id}
  GET    /v1/contacts/{phone}/inbox           what devices sent it, decrypted: [{id, from, enc_type, text, kind,
                                              device_sent_to, error, t}]
  GET    /v1/contacts/{phone}/receipts        receipts and acks devices sent about its messages:
                                              [{message_id, from, kind, raw_type, retry_count, t}]
                                              (kind: delivery|inactive|read|read_self|played|retry|sender|
                                              peer_msg|ack|other; retry receipts are never answered)
  GET    /v1/contacts/{phone}/sent            what it sent: [{id, to, enc_type, delivered_live, t}]
Actions (drop, half-open, stream-error) answer {\"connections\":N}: how many logged-in connections they hit.";

/// Builds the router over a simulator.
pub fn router(sim: SimHandle) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/v1/keys", get(keys))
        .route("/v1/summary", get(summary))
        .route("/v1/observations", get(observations))
        .route("/v1/devices", post(mint))
        .route("/v1/devices/register", post(register))
        .route("/v1/devices/{jid}", get(device))
        .route("/v1/devices/{jid}/revoke", post(revoke))
        .route("/v1/devices/{jid}/reinstate", post(reinstate))
        .route("/v1/devices/{jid}/forget-prekeys", post(forget_prekeys))
        .route("/v1/faults/drop", post(drop_connections))
        .route("/v1/faults/half-open", post(half_open))
        .route("/v1/faults/stream-error", post(stream_error))
        .route("/v1/faults/pong", axum::routing::put(pong))
        .route("/v1/faults/refuse", post(refuse))
        .route("/v1/faults/handshake-delay", axum::routing::put(handshake_delay))
        .route("/v1/faults", get(faults).delete(clear_faults))
        .route("/v1/contacts", post(add_contact))
        .route("/v1/contacts/{phone}", get(contact))
        .route("/v1/contacts/{phone}/messages", post(contact_send))
        .route("/v1/contacts/{phone}/inbox", get(contact_inbox))
        .route("/v1/contacts/{phone}/receipts", get(contact_receipts))
        .route("/v1/contacts/{phone}/sent", get(contact_sent))
        .with_state(sim)
}

struct ApiError(StatusCode, String);

impl From<SimError> for ApiError {
    fn from(e: SimError) -> Self {
        let status = match e {
            SimError::UnknownDevice(_) | SimError::UnknownContact(_) => StatusCode::NOT_FOUND,
            SimError::InvalidJid(_)
            | SimError::InvalidFault(_)
            | SimError::InvalidRecord(_)
            | SimError::InvalidPhone(_) => StatusCode::BAD_REQUEST,
            SimError::NoKeys(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

#[derive(Deserialize)]
struct DeviceQuery {
    device: Option<String>,
}

impl DeviceQuery {
    fn target(&self) -> Target {
        self.device.clone().map_or(Target::All, Target::Device)
    }
}

async fn keys(State(sim): State<SimHandle>) -> Json<serde_json::Value> {
    Json(json!({
        "root_public_key": hex(&sim.root_public_key()),
        "server_static_key": hex(&sim.server_static_key()),
    }))
}

async fn summary(State(sim): State<SimHandle>) -> Json<crate::Summary> {
    Json(sim.summary())
}

#[derive(Deserialize)]
struct ObservationsQuery {
    devices: Option<bool>,
}

async fn observations(State(sim): State<SimHandle>, Query(q): Query<ObservationsQuery>) -> Json<crate::Observations> {
    if q.devices == Some(false) {
        let mut o = crate::Observations { summary: sim.summary(), ..Default::default() };
        o.attempts_per_second = sim.attempts_per_second();
        return Json(o);
    }
    Json(sim.observations())
}

async fn device(State(sim): State<SimHandle>, Path(jid): Path<String>) -> ApiResult<crate::DeviceObservation> {
    sim.device(&jid).map(Json).ok_or_else(|| SimError::UnknownDevice(jid).into())
}

#[derive(Deserialize)]
struct MintRequest {
    tenant: String,
    push_name: Option<String>,
    device_id: Option<u16>,
    server_has_prekeys: Option<bool>,
}

#[derive(Serialize)]
struct RecordOut {
    kind: &'static str,
    key: String,
    value_b64: String,
}

async fn mint(State(sim): State<SimHandle>, Json(req): Json<MintRequest>) -> ApiResult<serde_json::Value> {
    let tenant = TenantId::parse(&req.tenant).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let opts = MintOptions {
        push_name: req.push_name,
        device_id: req.device_id,
        server_has_prekeys: req.server_has_prekeys.unwrap_or(true),
    };
    let minted = sim.mint_device_with(&tenant, &opts)?;
    let records: Vec<RecordOut> = minted
        .snapshot
        .records
        .iter()
        .map(|(k, v)| RecordOut {
            kind: k.kind.as_str(),
            key: k.key.clone(),
            value_b64: base64::engine::general_purpose::STANDARD.encode(v),
        })
        .collect();
    Ok(Json(json!({
        "jid": minted.jid,
        "lid": minted.lid,
        "noise_public": hex(&minted.noise_public),
        "snapshot": { "generation": minted.snapshot.generation, "records": records },
    })))
}

#[derive(Deserialize)]
struct RegisterRequest {
    devices: Vec<RegisterDevice>,
}

#[derive(Deserialize)]
struct RegisterDevice {
    jid: String,
    noise_public: String,
}

async fn register(State(sim): State<SimHandle>, Json(req): Json<RegisterRequest>) -> ApiResult<serde_json::Value> {
    for d in &req.devices {
        let key = parse_hex32(&d.noise_public)
            .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, "noise_public must be 64 hex characters".into()))?;
        sim.register_existing(key, &d.jid)?;
    }
    Ok(Json(json!({ "registered": req.devices.len() })))
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

async fn revoke(State(sim): State<SimHandle>, Path(jid): Path<String>) -> ApiResult<serde_json::Value> {
    sim.revoke(&jid)?;
    Ok(Json(json!({ "revoked": jid })))
}

async fn reinstate(State(sim): State<SimHandle>, Path(jid): Path<String>) -> ApiResult<serde_json::Value> {
    sim.reinstate(&jid)?;
    Ok(Json(json!({ "reinstated": jid })))
}

async fn forget_prekeys(State(sim): State<SimHandle>, Path(jid): Path<String>) -> ApiResult<serde_json::Value> {
    sim.forget_prekeys(&jid)?;
    Ok(Json(json!({ "forgotten": jid })))
}

fn hit(n: usize) -> Json<serde_json::Value> {
    Json(json!({ "connections": n }))
}

async fn drop_connections(State(sim): State<SimHandle>, Query(q): Query<DeviceQuery>) -> Json<serde_json::Value> {
    hit(sim.drop_connections(&q.target()))
}

async fn half_open(State(sim): State<SimHandle>, Query(q): Query<DeviceQuery>) -> Json<serde_json::Value> {
    hit(sim.half_open(&q.target()))
}

#[derive(Deserialize)]
struct StreamErrorRequest {
    code: Option<u16>,
    kind: Option<StreamErrorKind>,
}

async fn stream_error(
    State(sim): State<SimHandle>,
    Query(q): Query<DeviceQuery>,
    Json(req): Json<StreamErrorRequest>,
) -> ApiResult<serde_json::Value> {
    let kind = match (req.kind, req.code) {
        (Some(k), _) => k,
        (None, Some(c)) => StreamErrorKind::from_code(c)
            .ok_or_else(|| SimError::InvalidFault(format!("stream error code {c} (want 401, 429, 440, 503 or 515)")))?,
        (None, None) => return Err(SimError::InvalidFault("give `code` or `kind`".into()).into()),
    };
    Ok(hit(sim.stream_error(&q.target(), kind)))
}

async fn pong(
    State(sim): State<SimHandle>,
    Query(q): Query<DeviceQuery>,
    Json(mode): Json<PongMode>,
) -> ApiResult<serde_json::Value> {
    sim.set_pong(&q.target(), mode)?;
    Ok(Json(json!({ "pong": mode })))
}

async fn refuse(
    State(sim): State<SimHandle>,
    Query(q): Query<DeviceQuery>,
    Json(refusal): Json<Refusal>,
) -> ApiResult<serde_json::Value> {
    sim.refuse_connects(&q.target(), refusal)?;
    Ok(Json(json!({ "refusal": refusal })))
}

#[derive(Deserialize)]
struct DelayRequest {
    delay_ms: Option<u64>,
}

async fn handshake_delay(
    State(sim): State<SimHandle>,
    Query(q): Query<DeviceQuery>,
    Json(req): Json<DelayRequest>,
) -> ApiResult<serde_json::Value> {
    sim.set_handshake_delay(&q.target(), req.delay_ms.map(std::time::Duration::from_millis))?;
    Ok(Json(json!({ "delay_ms": req.delay_ms })))
}

async fn faults(State(sim): State<SimHandle>, Query(q): Query<DeviceQuery>) -> ApiResult<crate::faults::SettingsView> {
    Ok(Json(sim.fault_settings(&q.target())?))
}

async fn clear_faults(State(sim): State<SimHandle>, Query(q): Query<DeviceQuery>) -> ApiResult<serde_json::Value> {
    sim.clear_faults(&q.target())?;
    Ok(Json(json!({ "cleared": true })))
}

#[derive(Deserialize)]
struct ContactRequest {
    phone: String,
}

async fn add_contact(State(sim): State<SimHandle>, Json(req): Json<ContactRequest>) -> ApiResult<crate::ContactInfo> {
    Ok(Json(sim.add_contact(&req.phone)?))
}

async fn contact(State(sim): State<SimHandle>, Path(phone): Path<String>) -> ApiResult<crate::ContactInfo> {
    sim.contact(&phone).map(Json).ok_or_else(|| SimError::UnknownContact(phone).into())
}

#[derive(Deserialize)]
struct ContactMessageRequest {
    to: String,
    text: String,
}

async fn contact_send(
    State(sim): State<SimHandle>,
    Path(phone): Path<String>,
    Json(req): Json<ContactMessageRequest>,
) -> ApiResult<serde_json::Value> {
    let id = sim.contact_send_text(&phone, &req.to, &req.text).await?;
    Ok(Json(json!({ "id": id })))
}

fn known_contact(sim: &SimHandle, phone: &str) -> Result<(), ApiError> {
    sim.contact(phone).map(|_| ()).ok_or_else(|| SimError::UnknownContact(phone.to_owned()).into())
}

async fn contact_inbox(
    State(sim): State<SimHandle>,
    Path(phone): Path<String>,
) -> ApiResult<Vec<crate::ContactMessage>> {
    known_contact(&sim, &phone)?;
    Ok(Json(sim.contact_inbox(&phone)))
}

async fn contact_receipts(
    State(sim): State<SimHandle>,
    Path(phone): Path<String>,
) -> ApiResult<Vec<crate::ReceiptSeen>> {
    known_contact(&sim, &phone)?;
    Ok(Json(sim.contact_receipts(&phone)))
}

async fn contact_sent(State(sim): State<SimHandle>, Path(phone): Path<String>) -> ApiResult<Vec<crate::ContactSent>> {
    known_contact(&sim, &phone)?;
    Ok(Json(sim.contact_sent(&phone)))
}
