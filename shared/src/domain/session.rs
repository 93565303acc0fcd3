//! What a host says about one running session, and how that maps to the tenant table's status.

use serde::{Deserialize, Serialize};

use super::{Lease, TenantId, TenantStatus, UnixMillis};

/// The state of a tenant's session on a host (DESIGN.md "session states").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SessionState {
    /// Linking a new number: showing QR codes (or a pairing code) until the phone confirms. Nothing is marked
    /// in the tenant table until the pairing succeeded and its credentials are stored.
    Linking,
    /// Hydrating, waiting for a connect token, or handshaking.
    Connecting,
    /// Connected and logged in.
    Open,
    /// Waiting out a backoff delay before the next attempt.
    Backoff,
    /// Stopped on request; credentials kept.
    Stopped,
    /// Logged out or device removed (401/403). Terminal.
    LoggedOut,
    /// Another client took over (440). Terminal: never reconnected automatically.
    Replaced,
    /// Banned (402/406, temporary bans until their expiry). Terminal.
    Banned,
    /// No stored credentials. Terminal.
    CredentialsMissing,
    /// Stored credentials unusable. Terminal.
    CredentialsCorrupt,
}

impl SessionState {
    /// Every state, in a stable order (metrics, tables).
    pub const ALL: [SessionState; 10] = [
        Self::Linking,
        Self::Connecting,
        Self::Open,
        Self::Backoff,
        Self::Stopped,
        Self::LoggedOut,
        Self::Replaced,
        Self::Banned,
        Self::CredentialsMissing,
        Self::CredentialsCorrupt,
    ];

    /// Whether only a person can bring the session back.
    pub fn is_terminal(self) -> bool {
        self.tenant_status().is_terminal()
    }

    /// The tenant-table status this state is reported as.
    pub fn tenant_status(self) -> TenantStatus {
        match self {
            Self::Open => TenantStatus::Connected,
            Self::Linking | Self::Connecting | Self::Backoff => TenantStatus::Connecting,
            Self::Stopped => TenantStatus::Disconnected,
            Self::LoggedOut => TenantStatus::LoggedOut,
            Self::Replaced => TenantStatus::Replaced,
            Self::Banned => TenantStatus::Banned,
            Self::CredentialsMissing => TenantStatus::CredentialsMissing,
            Self::CredentialsCorrupt => TenantStatus::CredentialsCorrupt,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Linking => "linking",
            Self::Connecting => "connecting",
            Self::Open => "open",
            Self::Backoff => "backoff",
            Self::Stopped => "stopped",
            Self::LoggedOut => "logged_out",
            Self::Replaced => "replaced",
            Self::Banned => "banned",
            Self::CredentialsMissing => "credentials_missing",
            Self::CredentialsCorrupt => "credentials_corrupt",
        }
    }
}

/// One session as the host's control API reports it. Carries no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionView {
    /// The tenant.
    pub tenant_id: TenantId,
    /// Current state.
    pub state: SessionState,
    /// When the session entered `state`.
    #[cfg_attr(feature = "openapi", schema(value_type = i64))]
    pub since_ms: UnixMillis,
    /// When the current connection opened (only while `open`).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<i64>))]
    pub connected_since_ms: Option<UnixMillis>,
    /// How long ago the last frame arrived from WhatsApp, when known.
    pub last_frame_ago_ms: Option<u64>,
    /// Reconnects since the host started this session.
    pub reconnects: u64,
    /// Consecutive failed attempts (reset when the session has been open for a stable period).
    pub consecutive_failures: u32,
    /// The current backoff delay, while in `backoff`.
    pub backoff_ms: Option<u64>,
    /// The last error, in words (never a secret).
    pub last_error: Option<String>,
    /// The lease this session holds, or last held; absent while it has never held one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<SessionLease>,
}

/// The tenant's lease as a session reports it: whose, which epoch, and whether it still holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionLease {
    /// The host id the lease was taken for.
    pub owner: String,
    /// The lease's fencing epoch.
    pub epoch: u64,
    /// Whether the session holds it now (false once released or lost).
    pub held: bool,
}

impl SessionLease {
    /// The holding to present for a write on this session's behalf (only owner and epoch are compared).
    pub fn holding(&self) -> Lease {
        Lease { owner: self.owner.clone(), epoch: self.epoch, version: 0, expires_at: 0 }
    }
}

impl SessionView {
    /// A session that entered `state` at `since_ms` and has nothing else to show yet.
    pub fn new(tenant_id: TenantId, state: SessionState, since_ms: UnixMillis) -> Self {
        Self {
            tenant_id,
            state,
            since_ms,
            connected_since_ms: None,
            last_frame_ago_ms: None,
            reconnects: 0,
            consecutive_failures: 0,
            backoff_ms: None,
            last_error: None,
            lease: None,
        }
    }
}

/// A session changed state: what the host publishes to its webhooks, metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// The tenant.
    pub tenant_id: TenantId,
    /// Previous state.
    pub from: SessionState,
    /// New state.
    pub to: SessionState,
    /// Why, in words (never a secret).
    pub reason: Option<String>,
    /// Consecutive failures at the time of the change.
    pub consecutive_failures: u32,
    /// When.
    pub at_ms: UnixMillis,
}

/// `GET /v1/sessions`: every session of a host, with the host's boot id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionList {
    /// Changes whenever the host process restarts.
    pub boot_id: String,
    /// Every session the host holds.
    pub sessions: Vec<SessionView>,
    /// Faults of the host itself (not of one tenant) while they last, such as a wrong data key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_errors: Vec<HostCondition>,
}

impl SessionList {
    /// A list with no host faults.
    pub fn new(boot_id: impl Into<String>, sessions: Vec<SessionView>) -> Self {
        Self { boot_id: boot_id.into(), sessions, host_errors: Vec::new() }
    }
}

/// A fault of a whole host that an operator must fix (the tenants it touches are left alone, never marked).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostCondition {
    /// Stable code, e.g. `data_key_mismatch`.
    pub code: String,
    /// What is wrong and what to do, in words (never a secret).
    pub message: String,
}
