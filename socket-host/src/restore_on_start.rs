//! The host's restore on start: hand every desired tenant to its supervisor, in the shared restore order
//! (most recently healthy first), paced by the governor.

use std::sync::Arc;

use futures_util::StreamExt;
use wakeeper_shared::domain::TenantId;
use wakeeper_shared::ports::StoreError;
use wakeeper_shared::restore::desired_in_restore_order;

use crate::host::{EnsureError, Ensured, Host};

/// Hydrations in flight at once during a restore (connects are paced separately by the governor).
pub const DEFAULT_CONCURRENCY: usize = 32;

/// Page size when reading the desired tenants.
pub const PAGE_SIZE: usize = 500;

/// Ensures each tenant, `concurrency` at a time, in the given order. One tenant's failure never affects another.
pub async fn ensure_many(
    host: &Arc<Host>,
    ids: Vec<TenantId>,
    concurrency: usize,
) -> Vec<(TenantId, Result<Ensured, EnsureError>)> {
    futures_util::stream::iter(ids)
        .map(|id| {
            let host = host.clone();
            async move {
                let outcome = host.ensure(&id).await;
                (id, outcome)
            }
        })
        .buffered(concurrency.max(1))
        .collect()
        .await
}

/// Restores every desired tenant; returns how many were started and how many were refused.
pub async fn restore_all(host: &Arc<Host>) -> Result<(usize, usize), StoreError> {
    let ids: Vec<TenantId> =
        desired_in_restore_order(host.tenants().as_ref(), PAGE_SIZE).await?.into_iter().map(|r| r.tenant_id).collect();
    let total = ids.len();
    let outcomes = ensure_many(host, ids, DEFAULT_CONCURRENCY).await;
    let refused = outcomes.iter().filter(|(_, o)| o.is_err()).count();
    tracing::info!(total, refused, "restore on start handed every desired tenant to its supervisor");
    Ok((total - refused, refused))
}

/// Restores every desired tenant, retrying with backoff while the tenant store cannot be read, then reports
/// `restore_finished` ok.
pub async fn restore_until_done(host: &Arc<Host>, finished: crate::readiness::Condition) {
    let mut delay = std::time::Duration::from_secs(1);
    finished.set_failing("restore on start is running");
    loop {
        match restore_all(host).await {
            Ok(_) => {
                finished.set_ok();
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in_s = delay.as_secs(), "restore on start could not read the tenant store");
                finished.set_failing(format!("restore on start could not read the tenant store: {e}"));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
}
