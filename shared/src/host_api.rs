//! The host's control API as the functions see it: wire types (shared with the host's handlers) and, with the
//! `client` feature, a typed client.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::domain::TenantId;
pub use crate::domain::{SessionList, SessionState, SessionView};

/// Every error body: `{"error": "<stable code>"}`, for some with a `message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// A stable machine-readable code (see [`codes`]).
    pub error: String,
    /// What to do, in words, for the few refusals a person must act on (a full disk, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The stable error codes of the control API.
pub mod codes {
    /// Missing or wrong bearer token (401).
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// No such session or route (404).
    pub const NOT_FOUND: &str = "not_found";
    /// A tenant id outside `[A-Za-z0-9_-]{1,64}` (400).
    pub const BAD_TENANT_ID: &str = "bad_tenant_id";
    /// A malformed body or parameter (400).
    pub const BAD_REQUEST: &str = "bad_request";
    /// Body over the size limit (413).
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// Wrong method on a known route (405).
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// No stored credentials for the tenant (409).
    pub const CREDENTIALS_MISSING: &str = "credentials_missing";
    /// Stored credentials unusable (409).
    pub const CREDENTIALS_CORRUPT: &str = "credentials_corrupt";
    /// The session is not open (409).
    pub const SESSION_NOT_OPEN: &str = "session_not_open";
    /// A recipient that is neither a phone number nor a user, LID or group jid (400).
    pub const BAD_RECIPIENT: &str = "bad_recipient";
    /// A message text that is empty or only whitespace (400).
    pub const EMPTY_TEXT: &str = "empty_text";
    /// A message text longer than [`MAX_TEXT_CHARS`](super::MAX_TEXT_CHARS) characters (400).
    pub const TEXT_TOO_LONG: &str = "text_too_long";
    /// Too many sends already waiting on the session (429).
    pub const SEND_QUEUE_FULL: &str = "send_queue_full";
    /// A `typing_ms` above [`MAX_TYPING_MS`](super::MAX_TYPING_MS) (400).
    pub const BAD_TYPING_MS: &str = "bad_typing_ms";
    /// A store or dependency is unavailable (503).
    pub const UNAVAILABLE: &str = "unavailable";
    /// The host's disk is full: work that needs a write is refused until space is freed (503).
    pub const DISK_FULL: &str = "disk_full";
    /// The host's disk refuses writes (an I/O error other than a full disk): work that needs one is refused
    /// until it takes writes again (503).
    pub const DISK_UNAVAILABLE: &str = "disk_unavailable";
    /// Anything else (500).
    pub const INTERNAL: &str = "internal";
    /// Linking refused: the tenant has restorable credentials and is not in a terminal state (409).
    pub const ALREADY_LINKED: &str = "already_linked";
    /// Another host holds the tenant's lease (409).
    pub const LEASE_HELD: &str = "lease_held";
    /// The tenant's credentials were sealed with a data key this host does not hold (503): the host's
    /// configuration is wrong, the tenant is fine and nothing was marked.
    pub const DATA_KEY_MISMATCH: &str = "data_key_mismatch";
    /// A `phone` that is not 7 to 15 digits in international form (400).
    pub const BAD_PHONE: &str = "bad_phone";
    /// No QR code came from WhatsApp in time; the link attempt was cancelled (504).
    pub const LINK_TIMEOUT: &str = "link_timeout";
    /// WhatsApp did not hand out a pairing code; the link goes on with its QR code (502).
    pub const PAIRING_CODE_FAILED: &str = "pairing_code_failed";
}

/// `GET /health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// Always `ok` when the host answers.
    pub status: String,
    /// Changes whenever the host process restarts.
    pub boot_id: String,
    /// Seconds since start.
    pub uptime_s: u64,
    /// Session counts by state name.
    pub sessions: BTreeMap<String, u64>,
    /// Faults of the host itself while they last (e.g. `data_key_mismatch`); the host still answers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<crate::domain::HostCondition>,
}

/// `PUT /v1/sessions/{id}` and `POST .../reconnect`: accepted, with the state the session is in now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Accepted {
    /// The tenant.
    pub tenant_id: TenantId,
    /// Its session's state at the time of the answer.
    pub state: SessionState,
    /// Whether the session was already running before the request.
    #[serde(default)]
    pub already_running: bool,
}

/// `POST /v1/restore` body. Ids are strings so bad ones can be rejected one by one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RestoreRequest {
    /// Tenants to restore; absent means every desired tenant in the tenant store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_ids: Option<Vec<String>>,
}

/// One tenant a restore did not accept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rejected {
    /// The id as given.
    pub tenant_id: String,
    /// A stable error code.
    pub error: String,
}

/// `POST /v1/restore` answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RestoreResponse {
    /// Tenants whose session was started.
    pub accepted: u64,
    /// Tenants that were already running.
    pub already_running: u64,
    /// Tenants refused, with why.
    pub rejected: Vec<Rejected>,
}

/// Longest text `POST /v1/sessions/{id}/messages` accepts, in characters (Unicode scalar values).
pub const MAX_TEXT_CHARS: usize = 4096;
/// Longest "typing..." a send may show before the message goes out, in milliseconds.
pub const MAX_TYPING_MS: u64 = 10_000;

/// `POST /v1/sessions/{id}/messages` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SendMessageRequest {
    /// A phone number (digits, optionally with `+`, spaces and dashes) or a jid (`…@s.whatsapp.net`,
    /// `…@lid`, `…@g.us`). The schema's pattern is the plain forms; spaces and dashes in a number are also
    /// taken.
    #[cfg_attr(
        feature = "openapi",
        schema(
            pattern = r"^(\+?[1-9][0-9]{5,14}|[0-9]{6,15}@s\.whatsapp\.net|[0-9]{1,20}@lid|[0-9]{1,20}(-[0-9]{1,19})?@g\.us)$",
            example = "+4915112345678"
        )
    )]
    pub to: String,
    /// The text, 1 to [`MAX_TEXT_CHARS`] characters, not only whitespace.
    #[cfg_attr(
        feature = "openapi",
        schema(min_length = 1, max_length = 4096, pattern = r"\S", example = "Your order is on its way")
    )]
    pub text: String,
    /// Show "typing..." to the recipient this long (at most [`MAX_TYPING_MS`]) before sending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(maximum = 10_000))]
    pub typing_ms: Option<u64>,
}

/// `POST /v1/sessions/{id}/messages` answer (202): the message is queued on the open session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SendMessageResponse {
    /// The tenant.
    pub tenant_id: TenantId,
    /// The WhatsApp message id the message is sent with (chosen before sending).
    pub message_id: String,
    /// The recipient as a jid.
    pub to: String,
}

/// `POST /v1/sessions/{id}/link` body (may be empty).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LinkRequest {
    /// Also ask for a pairing code for this phone number (international form, digits only, e.g. `15551234567`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(pattern = r"^\+?[1-9][0-9]{6,14}$", example = "15551234567"))]
    pub phone: Option<String>,
}

/// Where a link attempt stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum LinkStatus {
    /// Waiting for the phone: a QR code (and maybe a pairing code) is shown.
    Waiting,
    /// The phone confirmed; the credentials are stored and the session goes on as a normal one.
    Paired,
    /// Nobody scanned in time (the QR codes ran out).
    Expired,
    /// The attempt failed (see `error`).
    Failed,
    /// Cancelled on request.
    Cancelled,
}

/// A link attempt as the control API shows it. The QR payload and the pairing code are for the person linking
/// the phone; neither is ever logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LinkView {
    /// The tenant.
    pub tenant_id: TenantId,
    /// Where the attempt stands.
    pub status: LinkStatus,
    /// The session's state (`linking` until paired, then the normal states).
    pub state: SessionState,
    /// The current QR payload (they rotate: ask again), while waiting.
    pub qr: Option<String>,
    /// The same QR code as an SVG image.
    pub qr_svg: Option<String>,
    /// Seconds the current QR code stays valid.
    pub expires_in_s: Option<u64>,
    /// The 8-character code to type on the phone, when one was asked for with `phone`.
    pub pairing_code: Option<String>,
    /// The linked device, once paired.
    pub device_jid: Option<String>,
    /// Why the attempt failed or expired, in words.
    pub error: Option<String>,
    /// When the attempt started.
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub started_ms: crate::domain::UnixMillis,
}

#[cfg(feature = "client")]
pub use client::{ClientError, EnsureOutcome, HostClient};

#[cfg(feature = "client")]
mod client {
    use std::time::Duration;

    use reqwest::StatusCode;

    use super::*;

    /// Why a control-API call failed.
    #[derive(Debug, thiserror::Error)]
    pub enum ClientError {
        /// The host could not be reached, timed out, or kept answering 5xx. Transient.
        #[error("host unreachable: {0}")]
        Unreachable(String),
        /// The token was refused.
        #[error("unauthorized")]
        Unauthorized,
        /// The session or route does not exist.
        #[error("not found")]
        NotFound,
        /// Any other refusal, with its status and stable code.
        #[error("host refused the request ({status}: {code})")]
        Refused {
            /// HTTP status.
            status: u16,
            /// The body's `error` code.
            code: String,
        },
    }

    /// What `ensure` achieved.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum EnsureOutcome {
        /// The host started (or already ran) the session.
        Accepted(Accepted),
        /// No stored credentials: definitive, mark the tenant.
        CredentialsMissing,
        /// Stored credentials unusable: definitive, mark the tenant.
        CredentialsCorrupt,
    }

    /// A typed client of one host's control API. Retries connect errors and 5xx only.
    #[derive(Clone)]
    pub struct HostClient {
        http: reqwest::Client,
        base: String,
        token: String,
        attempts: u32,
    }

    impl std::fmt::Debug for HostClient {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("HostClient").field("base", &self.base).finish_non_exhaustive()
        }
    }

    impl HostClient {
        /// A client of the host at `base_url` (e.g. `http://127.0.0.1:8080`) with its bearer token.
        pub fn new(base_url: &str, token: impl Into<String>, timeout: Duration) -> Result<Self, ClientError> {
            let http = crate::tls::http_client()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .build()
                .map_err(|e| ClientError::Unreachable(e.to_string()))?;
            Ok(Self { http, base: base_url.trim_end_matches('/').to_owned(), token: token.into(), attempts: 3 })
        }

        /// Sets how many times a call is tried in all (at least 1).
        pub fn with_attempts(mut self, attempts: u32) -> Self {
            self.attempts = attempts.max(1);
            self
        }

        async fn call(
            &self,
            method: reqwest::Method,
            path: &str,
            body: Option<&serde_json::Value>,
        ) -> Result<(StatusCode, Vec<u8>), ClientError> {
            let url = format!("{}{}", self.base, path);
            let mut last = String::new();
            for attempt in 0..self.attempts {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(1u32 << attempt.min(5)))).await;
                }
                let mut req = self.http.request(method.clone(), &url).bearer_auth(&self.token);
                if let Some(b) = body {
                    req = req.json(b);
                }
                match req.send().await {
                    Ok(res) if res.status().is_server_error() => {
                        last = format!("status {}", res.status().as_u16());
                    }
                    Ok(res) => {
                        let status = res.status();
                        let bytes = res.bytes().await.map_err(|e| ClientError::Unreachable(e.to_string()))?;
                        return Ok((status, bytes.to_vec()));
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            Err(ClientError::Unreachable(last))
        }

        fn refused(status: StatusCode, body: &[u8]) -> ClientError {
            match status {
                StatusCode::UNAUTHORIZED => ClientError::Unauthorized,
                StatusCode::NOT_FOUND => ClientError::NotFound,
                _ => ClientError::Refused {
                    status: status.as_u16(),
                    code: serde_json::from_slice::<ErrorBody>(body).map(|b| b.error).unwrap_or_default(),
                },
            }
        }

        fn decode<T: serde::de::DeserializeOwned>(status: StatusCode, body: Vec<u8>) -> Result<T, ClientError> {
            serde_json::from_slice(&body)
                .map_err(|e| ClientError::Refused { status: status.as_u16(), code: format!("undecodable answer: {e}") })
        }

        /// `GET /health`.
        pub async fn health(&self) -> Result<Health, ClientError> {
            match self.call(reqwest::Method::GET, "/health", None).await? {
                (s, b) if s.is_success() => Self::decode(s, b),
                (s, b) => Err(Self::refused(s, &b)),
            }
        }

        /// `GET /v1/sessions`.
        pub async fn sessions(&self) -> Result<SessionList, ClientError> {
            match self.call(reqwest::Method::GET, "/v1/sessions", None).await? {
                (s, b) if s.is_success() => Self::decode(s, b),
                (s, b) => Err(Self::refused(s, &b)),
            }
        }

        /// `GET /v1/sessions/{id}`; `None` when the host has no such session.
        pub async fn session(&self, tenant: &TenantId) -> Result<Option<SessionView>, ClientError> {
            match self.call(reqwest::Method::GET, &format!("/v1/sessions/{tenant}"), None).await? {
                (s, b) if s.is_success() => Self::decode(s, b).map(Some),
                (StatusCode::NOT_FOUND, _) => Ok(None),
                (s, b) => Err(Self::refused(s, &b)),
            }
        }

        /// `PUT /v1/sessions/{id}`: make sure the tenant's session runs.
        pub async fn ensure(&self, tenant: &TenantId) -> Result<EnsureOutcome, ClientError> {
            match self.call(reqwest::Method::PUT, &format!("/v1/sessions/{tenant}"), None).await? {
                (s, b) if s.is_success() => Self::decode(s, b).map(EnsureOutcome::Accepted),
                (StatusCode::CONFLICT, b) => match serde_json::from_slice::<ErrorBody>(&b).map(|e| e.error) {
                    Ok(c) if c == codes::CREDENTIALS_MISSING => Ok(EnsureOutcome::CredentialsMissing),
                    Ok(c) if c == codes::CREDENTIALS_CORRUPT => Ok(EnsureOutcome::CredentialsCorrupt),
                    _ => Err(Self::refused(StatusCode::CONFLICT, &b)),
                },
                (s, b) => Err(Self::refused(s, &b)),
            }
        }

        /// `POST /v1/sessions/{id}/reconnect`.
        pub async fn reconnect(&self, tenant: &TenantId) -> Result<Accepted, ClientError> {
            match self.call(reqwest::Method::POST, &format!("/v1/sessions/{tenant}/reconnect"), None).await? {
                (s, b) if s.is_success() => Self::decode(s, b),
                (s, b) => Err(Self::refused(s, &b)),
            }
        }

        /// `DELETE /v1/sessions/{id}`: stop, keep credentials.
        pub async fn stop(&self, tenant: &TenantId) -> Result<(), ClientError> {
            match self.call(reqwest::Method::DELETE, &format!("/v1/sessions/{tenant}"), None).await? {
                (s, _) if s.is_success() => Ok(()),
                (s, b) => Err(Self::refused(s, &b)),
            }
        }

        /// `DELETE /v1/sessions/{id}?logout=true`: unlink the device, delete its credentials, mark it logged
        /// out. Refused with 409 `lease_held` by a host that does not hold the tenant's lease.
        pub async fn logout(&self, tenant: &TenantId) -> Result<(), ClientError> {
            match self.call(reqwest::Method::DELETE, &format!("/v1/sessions/{tenant}?logout=true"), None).await? {
                (s, _) if s.is_success() => Ok(()),
                (s, b) => Err(Self::refused(s, &b)),
            }
        }

        /// `POST /v1/sessions/{id}/messages`: queue a text on the tenant's open session. Tried once: a send
        /// is not idempotent, so an unreachable host is reported rather than retried.
        pub async fn send_message(
            &self,
            tenant: &TenantId,
            request: &SendMessageRequest,
        ) -> Result<SendMessageResponse, ClientError> {
            let body = serde_json::to_value(request).expect("send request serializes");
            let once = Self { attempts: 1, ..self.clone() };
            match once.call(reqwest::Method::POST, &format!("/v1/sessions/{tenant}/messages"), Some(&body)).await? {
                (s, b) if s.is_success() => Self::decode(s, b),
                (s, b) => Err(Self::refused(s, &b)),
            }
        }

        /// `POST /v1/sessions/{id}/link`: start linking a new number (or see the running attempt).
        pub async fn link(&self, tenant: &TenantId, request: &LinkRequest) -> Result<LinkView, ClientError> {
            let body = serde_json::to_value(request).expect("link request serializes");
            match self.call(reqwest::Method::POST, &format!("/v1/sessions/{tenant}/link"), Some(&body)).await? {
                (s, b) if s.is_success() => Self::decode(s, b),
                (s, b) => Err(Self::refused(s, &b)),
            }
        }

        /// `GET /v1/sessions/{id}/link`: the current QR code and state of a link attempt; `None` when the host
        /// has none for the tenant.
        pub async fn link_view(&self, tenant: &TenantId) -> Result<Option<LinkView>, ClientError> {
            match self.call(reqwest::Method::GET, &format!("/v1/sessions/{tenant}/link"), None).await? {
                (s, b) if s.is_success() => Self::decode(s, b).map(Some),
                (StatusCode::NOT_FOUND, _) => Ok(None),
                (s, b) => Err(Self::refused(s, &b)),
            }
        }

        /// `POST /v1/restore`.
        pub async fn restore(&self, request: &RestoreRequest) -> Result<RestoreResponse, ClientError> {
            let body = serde_json::to_value(request).expect("restore request serializes");
            match self.call(reqwest::Method::POST, "/v1/restore", Some(&body)).await? {
                (s, b) if s.is_success() => Self::decode(s, b),
                (s, b) => Err(Self::refused(s, &b)),
            }
        }
    }
}
