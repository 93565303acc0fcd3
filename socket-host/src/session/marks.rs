//! Writes to the tenant table that must not be lost (a session's status, a new link's desired flag): tried at
//! once, and while the store is unavailable retried in the background until it takes them. A session writes
//! its status only as the holder of the tenant's lease: a host that lost the tenant marks nothing.

use std::sync::Arc;
use std::time::Duration;

use wakeeper_shared::domain::{Lease, StatusUpdate, TenantId, now_millis};
use wakeeper_shared::ports::{Conflict, StoreError, TenantStore};

use super::supervisor::Supervisor;

/// A write of a session to its tenant's record.
pub(super) enum TenantWrite {
    /// The session's status, written only while `holder` is still the tenant's lease (`None`: never held).
    Status { update: StatusUpdate, holder: Option<Lease> },
    /// The tenant is desired (a new link was stored).
    Desired,
}

impl TenantWrite {
    /// What is written, in words for the log.
    fn what(&self) -> &'static str {
        match self {
            TenantWrite::Status { .. } => "status",
            TenantWrite::Desired => "desired flag",
        }
    }

    async fn apply(&self, tenants: &dyn TenantStore, tenant: &TenantId) -> Result<(), StoreError> {
        match self {
            TenantWrite::Status { update, holder: Some(holder) } => {
                tenants.write_status_as_holder(tenant, holder, update, now_millis()).await.map(drop)
            }
            TenantWrite::Status { holder: None, .. } => Err(StoreError::Conflict(Conflict::LeaseLost)),
            TenantWrite::Desired => tenants.set_desired(tenant, true).await,
        }
    }

    /// Logs a refused write: an error, unless the tenant simply is not this host's any more.
    fn refused(&self, tenant: &TenantId, e: &StoreError) {
        match e {
            StoreError::Conflict(Conflict::LeaseLost) => {
                metrics::counter!("wakeeper_marks_skipped_not_holder_total").increment(1);
                tracing::info!(%tenant, "{} not written: this host no longer holds the tenant's lease", self.what());
            }
            e => tracing::error!(%tenant, error = %e, "{} write refused", self.what()),
        }
    }

    /// Writes in the background, retrying with backoff while the store is unavailable.
    pub(super) fn in_background(self, tenants: Arc<dyn TenantStore>, tenant: TenantId) {
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match self.apply(tenants.as_ref(), &tenant).await {
                    Ok(()) => return,
                    Err(e) if e.is_transient() => {
                        tracing::warn!(tenant = %tenant, error = %e, "{} write failed; retrying", self.what());
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                    Err(e) => {
                        self.refused(&tenant, &e);
                        return;
                    }
                }
            }
        });
    }
}

impl Supervisor {
    /// Writes now; if the store is unavailable, keeps retrying in the background (never lost).
    pub(super) async fn write_now(&self, write: TenantWrite) {
        match write.apply(self.deps.tenants.as_ref(), &self.tenant).await {
            Ok(()) => {}
            Err(e) if e.is_transient() => write.in_background(self.deps.tenants.clone(), self.tenant.clone()),
            Err(e) => write.refused(&self.tenant, &e),
        }
    }
}
