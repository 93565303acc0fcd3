//! The tenant's lease: taking it, renewing it while the session runs, and letting go of it (released when
//! the session ends, or lost to another host). No lease, no connect.
//!
//! The rule is the DynamoDB lock client's: no host ever compares its wall clock with another's. The holder
//! stops using a lease once its own monotonic clock says `ttl - ttl/5` has passed since the start of its last
//! successful renewal request; a taker takes an unreleased lease only after seeing the same version for a
//! full `ttl` on its own monotonic clock. A released lease, or one this host id already holds (a restart),
//! is taken at once.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Instant;
use wakeeper_shared::domain::{Lease, SessionLease, TenantId, now_millis};
use wakeeper_shared::ports::{Conflict, StoreError, TenantStore};

use super::SessionDeps;
use super::handle::{Command, LeaseDeadline};
use super::supervisor::{Supervisor, rand_unit};

/// A lease as this host holds it: the stored lease, and when the request that took it started on this host's
/// monotonic clock (the holder's validity counts from there, never from the store's expiry).
#[derive(Debug, Clone)]
pub(crate) struct HeldLease {
    pub(crate) lease: Lease,
    pub(crate) requested_at: Instant,
}

impl HeldLease {
    /// The lease as the view of the session holding it reports it.
    pub(crate) fn reported(&self) -> SessionLease {
        SessionLease { owner: self.lease.owner.clone(), epoch: self.lease.epoch, held: true }
    }
}

/// Takes `tenant`'s lease for this host if it is free or already this host's; `stale` is another host's lease
/// this host has watched unchanged for a full ttl (see [`Supervisor::acquire_lease`]).
pub(crate) async fn take_lease(
    deps: &SessionDeps,
    tenant: &TenantId,
    stale: Option<&Lease>,
) -> Result<HeldLease, StoreError> {
    let ttl_ms = deps.config.lease_ttl.as_millis() as u64;
    let requested_at = Instant::now();
    let lease = deps.tenants.acquire_lease(tenant, &deps.config.host_id, stale, ttl_ms, now_millis()).await?;
    Ok(HeldLease { lease, requested_at })
}

impl Supervisor {
    /// Takes the lease, or says how long to wait before trying again. Another host's lease is watched: polled
    /// every third of a ttl, and taken over once the same version has been seen for a full ttl.
    pub(super) fn acquire_lease(&mut self) -> BoxFuture<'_, Result<(), Duration>> {
        async move {
            let ttl = self.deps.config.lease_ttl;
            let stale = self.watching.as_ref().filter(|(_, since)| since.elapsed() >= ttl).map(|(l, _)| l.clone());
            match take_lease(&self.deps, &self.tenant, stale.as_ref()).await {
                Ok(held) => {
                    if stale.is_some() {
                        metrics::counter!("wakeeper_lease_takeovers_total").increment(1);
                        tracing::info!(tenant = %self.tenant, "took over a lease its holder stopped renewing");
                    }
                    self.watching = None;
                    self.install_lease(held);
                    Ok(())
                }
                Err(StoreError::Conflict(Conflict::LeaseHeld { holder })) => {
                    self.note_error("lease held by another host".into());
                    let now = Instant::now();
                    let since = match self.watching.take() {
                        Some((seen, since)) if seen == holder => since,
                        _ => now,
                    };
                    self.watching = Some((holder, since));
                    let until_stale = (since + ttl).saturating_duration_since(now);
                    let jitter = Duration::from_millis((rand_unit() * 200.0) as u64);
                    Err(until_stale.min(ttl / 3) + Duration::from_millis(50) + jitter)
                }
                Err(e) => {
                    self.note_error(format!("tenant store: {e}"));
                    Err(self.next_delay(false).max(Duration::from_millis(500)))
                }
            }
        }
        .boxed()
    }

    /// Holds `held` and keeps it renewed (replacing any keeper of an earlier one).
    pub(super) fn install_lease(&mut self, held: HeldLease) {
        self.lease = Some(held.lease.clone());
        self.view.lock().expect("session view lock").lease = Some(held.reported());
        if let Some(k) = self.lease_keeper.take() {
            k.abort();
        }
        let tenants = self.deps.tenants.clone();
        let tenant = self.tenant.clone();
        let ttl = self.deps.config.lease_ttl;
        let tx = self.self_tx.clone();
        *self.lease_deadline.lock().expect("lease deadline lock") = Some(held.requested_at + good_for(ttl));
        let deadline = self.lease_deadline.clone();
        self.lease_keeper = Some(tokio::spawn(keep_lease(tenants, tenant, held, ttl, deadline, tx)));
    }

    /// Whether this session still holds its lease: within its deadline, and still the holding the tenant
    /// table names (a store that cannot say leaves the answer yes).
    pub(super) fn still_holds_lease(&mut self) -> BoxFuture<'_, bool> {
        async move {
            let lapsed = self.lease_deadline.lock().expect("lease deadline lock").is_none_or(|d| Instant::now() >= d);
            let Some(mine) = self.lease.as_ref().filter(|_| !lapsed) else { return false };
            match self.deps.tenants.get(&self.tenant).await {
                Ok(record) => record.and_then(|r| r.lease).is_some_and(|l| l.same_holding(mine)),
                Err(e) => {
                    tracing::warn!(tenant = %self.tenant, error = %e, "could not check the lease after a 440");
                    true
                }
            }
        }
        .boxed()
    }

    /// Stops renewing the lease and closes the engine store; `release` gives the lease back in the store.
    pub(super) async fn let_go_of_lease(&mut self, release: bool) {
        if let Some(l) = self.view.lock().expect("session view lock").lease.as_mut() {
            l.held = false;
        }
        if let Some(k) = self.lease_keeper.take() {
            k.abort();
        }
        // From here the session holds no lease: its view stops saying `open` at once, before its state moves on.
        *self.lease_deadline.lock().expect("lease deadline lock") = Some(Instant::now());
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

/// Renews a lease every third of its ttl. The client must be down before any other host can take the lease:
/// the lease is good until `ttl - ttl/5` after the start of the last successful renewal request (or of the
/// acquisition), by this host's monotonic clock. If no renewal has succeeded by then (store slow or down, task
/// starved, process paused), the session is told the lease is lost and stops its client. A taker waits a full
/// `ttl` after it first saw the last renewal's version, so the two never overlap, whatever the wall clocks say.
async fn keep_lease(
    tenants: Arc<dyn TenantStore>,
    tenant: TenantId,
    held: HeldLease,
    ttl: Duration,
    deadline: LeaseDeadline,
    tx: mpsc::UnboundedSender<Command>,
) {
    let period = ttl / 3;
    let HeldLease { mut lease, requested_at } = held;
    let mut valid_until = requested_at + good_for(ttl);
    let mut next = requested_at + period;
    loop {
        tokio::time::sleep_until(next.min(valid_until)).await;
        let started = Instant::now();
        if started >= valid_until {
            tracing::warn!(tenant = %tenant, "lease not renewed in time; stopping the client");
            let _ = tx.send(Command::LeaseLost);
            return;
        }
        let renewal = tenants.renew_lease(&tenant, &lease, ttl.as_millis() as u64, now_millis());
        match tokio::time::timeout_at(valid_until, renewal).await {
            Ok(Ok(r)) => {
                lease = r;
                valid_until = started + good_for(ttl);
                *deadline.lock().expect("lease deadline lock") = Some(valid_until);
                next = started + period;
                metrics::counter!("wakeeper_lease_renewals_total").increment(1);
            }
            Ok(Err(StoreError::Conflict(_))) => {
                let _ = tx.send(Command::LeaseLost);
                return;
            }
            Ok(Err(e)) => {
                // Retry soon: the lease stays good until `valid_until`, checked above and by the timeout.
                tracing::warn!(tenant = %tenant, error = %e, "lease renewal failed; retrying before it lapses");
                next = Instant::now() + (period / 4).min(Duration::from_secs(1));
            }
            Err(_) => {
                tracing::warn!(tenant = %tenant, "lease renewal did not finish in time; stopping the client");
                let _ = tx.send(Command::LeaseLost);
                return;
            }
        }
    }
}

/// How long a lease is good after the start of the request that took or renewed it: its ttl less a margin
/// for clock-rate differences and for stopping the client.
fn good_for(ttl: Duration) -> Duration {
    ttl - ttl / 5
}
