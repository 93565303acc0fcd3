//! The host port: what the sweep and the restore need from a host (its sessions, ensure, reconnect), and how
//! a call to it fails. Implemented over HTTP by the control-API client and for several hosts at once by
//! [`crate::fleet::HostFleet`] (both in [`crate::fleet`]), and in-process by the socket host itself.

use async_trait::async_trait;

use crate::domain::{SessionList, TenantId, TenantStatus};

/// Why a call to a host failed. Only [`HostError::Unreachable`] is transient; none of them ever marks a
/// tenant (only a definitive [`EnsureAnswer`] does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// No answer, a timeout, or 5xx after retries.
    #[error("host unreachable: {0}")]
    Unreachable(String),
    /// The host holds no session for the tenant (it ended meanwhile).
    #[error("host has no session for the tenant")]
    NotFound,
    /// The host refused the call (wrong token, bad request): a configuration problem, not the tenant's.
    #[error("host refused the request: {0}")]
    Refused(String),
}

/// What a host answered when asked to run a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnsureAnswer {
    /// The session was started.
    Started,
    /// The session was already running.
    AlreadyRunning,
    /// No stored credentials: definitive, the tenant needs a new link.
    CredentialsMissing,
    /// Stored credentials unusable: definitive, the tenant needs a new link.
    CredentialsCorrupt,
}

impl EnsureAnswer {
    /// The terminal status a definitive answer marks the tenant with, and the reason written with it.
    pub fn terminal(self) -> Option<(TenantStatus, &'static str)> {
        match self {
            EnsureAnswer::CredentialsMissing => Some((TenantStatus::CredentialsMissing, "no stored credentials")),
            EnsureAnswer::CredentialsCorrupt => Some((TenantStatus::CredentialsCorrupt, "stored credentials unusable")),
            EnsureAnswer::Started | EnsureAnswer::AlreadyRunning => None,
        }
    }
}

/// What the sweep and the restore fan-out need from a host: its sessions, and two requests. Implemented for
/// the control-API client ([`crate::host_api::HostClient`], feature `client`) and for [`crate::fleet::HostFleet`]; a host
/// can implement it in-process to run the same logic without HTTP.
#[async_trait]
pub trait HostOps: Send + Sync {
    /// Every session the host holds, with its boot id (`GET /v1/sessions`).
    async fn sessions(&self) -> Result<SessionList, HostError>;
    /// Makes sure the tenant's session runs (`PUT /v1/sessions/{id}`).
    async fn ensure(&self, tenant: &TenantId) -> Result<EnsureAnswer, HostError>;
    /// Asks a running session to reconnect at once (`POST /v1/sessions/{id}/reconnect`).
    async fn reconnect(&self, tenant: &TenantId) -> Result<(), HostError>;
}

#[async_trait]
impl<T: HostOps + ?Sized> HostOps for std::sync::Arc<T> {
    async fn sessions(&self) -> Result<SessionList, HostError> {
        (**self).sessions().await
    }
    async fn ensure(&self, tenant: &TenantId) -> Result<EnsureAnswer, HostError> {
        (**self).ensure(tenant).await
    }
    async fn reconnect(&self, tenant: &TenantId) -> Result<(), HostError> {
        (**self).reconnect(tenant).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitive_answers_map_to_terminal_statuses() {
        assert_eq!(EnsureAnswer::CredentialsMissing.terminal().unwrap().0, TenantStatus::CredentialsMissing);
        assert_eq!(EnsureAnswer::CredentialsCorrupt.terminal().unwrap().0, TenantStatus::CredentialsCorrupt);
        assert!(EnsureAnswer::Started.terminal().is_none());
        assert!(EnsureAnswer::AlreadyRunning.terminal().is_none());
    }
}
