//! The tenant's lease: taking it, renewing it while the session runs, and letting go of it (released when
//! the session ends, or lost to another host). No lease, no connect.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use wakeeper_shared::domain::{Lease, TenantId, now_millis};
use wakeeper_shared::ports::{Conflict, StoreError, TenantStore};

use super::SessionDeps;
use super::handle::Command;
use super::supervisor::{Supervisor, rand_unit};

/// Takes `tenant`'s lease for this host (see [`lease_clock`] for when another owner's lease counts as gone).
pub(crate) async fn take_lease(deps: &SessionDeps, tenant: &TenantId) -> Result<Lease, StoreError> {
    let ttl = deps.config.lease_ttl;
    deps.tenants.acquire_lease(tenant, &deps.config.host_id, ttl.as_millis() as u64, lease_clock(ttl)).await
}

impl Supervisor {
    /// Takes the lease, or says how long to wait before trying again.
    pub(super) fn acquire_lease(&mut self) -> BoxFuture<'_, Result<(), Duration>> {
        async move {
            let ttl = self.deps.config.lease_ttl;
            match take_lease(&self.deps, &self.tenant).await {
                Ok(lease) => {
                    self.install_lease(lease);
                    Ok(())
                }
                Err(StoreError::Conflict(Conflict::LeaseHeld { holder })) => {
                    self.note_error("lease held by another host".into());
                    let left = holder.expires_at.saturating_sub(lease_clock(ttl)).max(0) as u64;
                    Err(Duration::from_millis(left + 50 + (rand_unit() * 200.0) as u64))
                }
                Err(e) => {
                    self.note_error(format!("tenant store: {e}"));
                    Err(self.next_delay(false).max(Duration::from_millis(500)))
                }
            }
        }
        .boxed()
    }

    /// Holds `lease` and keeps it renewed (replacing any keeper of an earlier one).
    pub(super) fn install_lease(&mut self, lease: Lease) {
        self.lease = Some(lease.clone());
        self.holds_lease.store(true, Ordering::Release);
        if let Some(k) = self.lease_keeper.take() {
            k.abort();
        }
        let tenants = self.deps.tenants.clone();
        let tenant = self.tenant.clone();
        let ttl = self.deps.config.lease_ttl;
        let tx = self.self_tx.clone();
        self.lease_keeper = Some(tokio::spawn(keep_lease(tenants, tenant, lease, ttl, tx)));
    }

    /// Stops renewing the lease and closes the engine store; `release` gives the lease back in the store.
    pub(super) async fn let_go_of_lease(&mut self, release: bool) {
        self.holds_lease.store(false, Ordering::Release);
        if let Some(k) = self.lease_keeper.take() {
            k.abort();
        }
        if let Some(lease) = self.lease.take()
            && release
            && let Err(e) = self.deps.tenants.release_lease(&self.tenant, &lease).await
        {
            tracing::warn!(tenant = %self.tenant, error = %e, "lease release failed; it will expire");
        }
        if self.backend.take().is_some() {
            self.deps.engines.close(&self.tenant).await;
        }
    }

    /// Another host owns the tenant now: let go without releasing (it is not ours), and discard the local
    /// working copy, which is no longer the newest state. The next lease hydrates afresh from the store, so a
    /// stale local copy can never be pushed over the other host's newer one.
    pub(super) fn lose_lease(&mut self) -> BoxFuture<'_, ()> {
        async move {
            metrics::counter!("wakeeper_lease_losses_total").increment(1);
            self.let_go_of_lease(false).await;
            if let Err(e) = self.deps.engines.discard_local(&self.tenant).await {
                tracing::warn!(tenant = %self.tenant, error = %e, "could not discard the local working copy");
            }
        }
        .boxed()
    }
}

/// Renews a lease every third of its ttl. The client must be down before the lease can lapse: if a renewal has
/// not succeeded by `expires_at - ttl/5` (store slow or down, task starved), the session is told the lease is
/// lost and stops its client. Another host takes the lease only `ttl/5` after expiry (see `acquire_lease`), so
/// the two never overlap.
async fn keep_lease(
    tenants: Arc<dyn TenantStore>,
    tenant: TenantId,
    mut lease: Lease,
    ttl: Duration,
    tx: mpsc::UnboundedSender<Command>,
) {
    let period = ttl / 3;
    let margin_ms = (ttl / 5).as_millis() as i64;
    loop {
        tokio::time::sleep(period).await;
        let left_ms = lease.expires_at - margin_ms - now_millis();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(left_ms.max(0) as u64);
        let renewed = tokio::time::timeout_at(
            deadline,
            tenants.renew_lease(&tenant, &lease, ttl.as_millis() as u64, now_millis()),
        )
        .await;
        match renewed {
            Ok(Ok(r)) => {
                lease = r;
                metrics::counter!("wakeeper_lease_renewals_total").increment(1);
            }
            Ok(Err(StoreError::Conflict(_))) => {
                let _ = tx.send(Command::LeaseLost);
                return;
            }
            Ok(Err(e)) if lease.expires_at - margin_ms - now_millis() > period.as_millis() as i64 => {
                tracing::warn!(tenant = %tenant, error = %e, "lease renewal failed; retrying before it lapses");
            }
            Ok(Err(e)) => {
                tracing::warn!(tenant = %tenant, error = %e, "lease renewal failed too close to expiry; stopping the client");
                let _ = tx.send(Command::LeaseLost);
                return;
            }
            Err(_) => {
                tracing::warn!(tenant = %tenant, "lease renewal did not finish before the safety margin; stopping the client");
                let _ = tx.send(Command::LeaseLost);
                return;
            }
        }
    }
}

/// The `now` a host presents when taking a lease: a lease of another owner counts as live until `ttl/5` past its
/// expiry, so its holder (which lets go `ttl/5` before expiry) is surely down first.
fn lease_clock(ttl: Duration) -> i64 {
    now_millis() - (ttl / 5).as_millis() as i64
}
