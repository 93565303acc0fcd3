//! The tenant record: what the tenant table says a tenant should be and was last seen to be.

use serde::{Deserialize, Serialize};

use super::TenantId;

/// Milliseconds since the Unix epoch. All timestamps in wakeeper are this.
pub type UnixMillis = i64;

/// The status written to the tenant table.
///
/// `Connected`, `Connecting` and `Disconnected` are informational; the rest are terminal and need a person
/// (a new link, a support ticket): the host never reconnects a tenant in a terminal status on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantStatus {
    /// The session is open.
    Connected,
    /// The session is being (re)established.
    Connecting,
    /// Stopped on request (credentials kept).
    Disconnected,
    /// The device was logged out or removed from the phone (401/403).
    LoggedOut,
    /// Another client took the session over (440 conflict).
    Replaced,
    /// WhatsApp banned the number (402/406 or a temporary ban).
    Banned,
    /// No stored credentials exist for the tenant.
    CredentialsMissing,
    /// Stored credentials exist but cannot be used (undecryptable, partial, malformed).
    CredentialsCorrupt,
}

impl TenantStatus {
    /// Every status, in a stable order (for metrics and tables).
    pub const ALL: [TenantStatus; 8] = [
        Self::Connected,
        Self::Connecting,
        Self::Disconnected,
        Self::LoggedOut,
        Self::Replaced,
        Self::Banned,
        Self::CredentialsMissing,
        Self::CredentialsCorrupt,
    ];

    /// Whether the status needs a person before the tenant can run again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::LoggedOut | Self::Replaced | Self::Banned | Self::CredentialsMissing | Self::CredentialsCorrupt
        )
    }

    /// The wire name (`snake_case`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Connecting => "connecting",
            Self::Disconnected => "disconnected",
            Self::LoggedOut => "logged_out",
            Self::Replaced => "replaced",
            Self::Banned => "banned",
            Self::CredentialsMissing => "credentials_missing",
            Self::CredentialsCorrupt => "credentials_corrupt",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A tenant's lease: which host may connect it, under which fencing epoch and record version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The host id holding the lease.
    pub owner: String,
    /// Rises by one every time the lease changes hands (or is re-taken after release); fences stale writers.
    pub epoch: u64,
    /// The record version: rises by one on every acquisition and every renewal. A taker that sees the same
    /// version for a full lease duration on its own monotonic clock knows the holder has stopped renewing.
    /// Records written before versions existed read as 0.
    #[serde(default)]
    pub version: u64,
    /// The holder's own wall-clock estimate of when the lease lapses, for operators to read; 0 once released.
    /// No host ever compares it with its own clock.
    pub expires_at: UnixMillis,
}

impl Lease {
    /// Whether the holder gave the lease up (it is free for anyone at once).
    pub fn is_released(&self) -> bool {
        self.expires_at == 0
    }

    /// Whether `other` is this lease as held by the same owner in the same epoch (renewals change neither).
    pub fn same_holding(&self, other: &Lease) -> bool {
        self.owner == other.owner && self.epoch == other.epoch
    }
}

/// The status part of a tenant record, compared to decide whether a write is needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusUpdate {
    /// New status.
    pub status: TenantStatus,
    /// Human-readable reason (never a secret).
    pub reason: Option<String>,
    /// New desired flag; terminal statuses set it to `false`.
    pub whatsapp_connected: bool,
}

impl StatusUpdate {
    /// A terminal mark: the status with its reason and the desired flag cleared.
    pub fn terminal(status: TenantStatus, reason: impl Into<String>) -> Self {
        Self { status, reason: Some(reason.into()), whatsapp_connected: false }
    }
}

/// One row of the tenant table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantRecord {
    /// The tenant.
    pub tenant_id: TenantId,
    /// Desired state: the tenant should have an open session.
    pub whatsapp_connected: bool,
    /// Last written status; `None` for a tenant never seen by a host.
    pub status: Option<TenantStatus>,
    /// Why the status is what it is (terminal statuses always carry one).
    pub reason: Option<String>,
    /// When `status` last changed.
    pub status_changed_at: Option<UnixMillis>,
    /// When a host or sweep last saw the session open.
    pub last_healthy_at: Option<UnixMillis>,
    /// Consecutive failed sweeps or connects; reset on health.
    pub consecutive_failures: u32,
    /// Current lease, if any host holds or held one.
    pub lease: Option<Lease>,
}

impl TenantRecord {
    /// A fresh record for a tenant that should be connected.
    pub fn desired(tenant_id: TenantId) -> Self {
        Self {
            tenant_id,
            whatsapp_connected: true,
            status: None,
            reason: None,
            status_changed_at: None,
            last_healthy_at: None,
            consecutive_failures: 0,
            lease: None,
        }
    }

    /// Whether applying `update` would change anything stored.
    pub fn differs_from(&self, update: &StatusUpdate) -> bool {
        self.status != Some(update.status)
            || self.reason != update.reason
            || self.whatsapp_connected != update.whatsapp_connected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for st in TenantStatus::ALL {
            assert_eq!(TenantStatus::parse(st.as_str()), Some(st));
            assert_eq!(serde_json::to_value(st).unwrap(), serde_json::json!(st.as_str()));
        }
        assert_eq!(TenantStatus::parse("nope"), None);
    }

    #[test]
    fn terminal_statuses() {
        let terminal: Vec<_> = TenantStatus::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal.len(), 5);
        assert!(!TenantStatus::Connected.is_terminal());
    }

    #[test]
    fn differs_only_on_stored_fields() {
        let mut r = TenantRecord::desired(TenantId::parse("t").unwrap());
        let up = StatusUpdate { status: TenantStatus::Connected, reason: None, whatsapp_connected: true };
        assert!(r.differs_from(&up));
        r.status = Some(TenantStatus::Connected);
        assert!(!r.differs_from(&up));
        assert!(r.differs_from(&StatusUpdate::terminal(TenantStatus::Replaced, "440")));
    }
}
