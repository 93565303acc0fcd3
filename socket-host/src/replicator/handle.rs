//! The replicator's handles: [`ReplicatorHandle`] for the host (attach, forget, flush one tenant) and
//! [`Replica`], one tenant's link that engine stores submit their changes through.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;
use tracing::info;
use wakeeper_shared::domain::{RecordChange, TenantId};

use super::ReplicatorStats;
use super::queue::{Shared, TenantState, schedule};

/// Submits changes to the replicator; cheap to clone. Obtain per-tenant [`Replica`]s with
/// [`ReplicatorHandle::attach`].
#[derive(Clone)]
pub struct ReplicatorHandle {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for ReplicatorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicatorHandle(..)")
    }
}

/// One tenant's link to the replicator, with the fencing epoch of the lease this host holds.
#[derive(Clone)]
pub struct Replica {
    tenant: TenantId,
    epoch: u64,
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("tenant", &self.tenant)
            .field("epoch", &self.epoch)
            .field("detached", &self.shared.is_none())
            .finish()
    }
}

impl Replica {
    /// A link that replicates nothing (tools, tests, a host with no credential store).
    pub fn detached(tenant: TenantId) -> Self {
        Self { tenant, epoch: 0, shared: None }
    }

    /// The tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The fencing epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Hands in the changes of one durable local append that moved the tenant from generation `from` to `to`.
    /// Never blocks on I/O. Dropped (and counted) when the tenant is fenced.
    pub fn submit(&self, from: u64, to: u64, changes: Vec<RecordChange>) {
        if let Some(shared) = &self.shared {
            shared.submit(&self.tenant, self.epoch, from, to, changes);
        }
    }

    /// Whether the store refused this tenant's writes for a stale epoch.
    pub fn is_fenced(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.is_fenced(&self.tenant, self.epoch))
    }
}

impl ReplicatorHandle {
    /// Links `tenant` with the epoch of the lease this host holds. Attach after the start-up rule
    /// ([`wakeeper_shared::local::hydrate::Hydrator::prepare`]) has reconciled the local copy with the store.
    ///
    /// A higher epoch than the tenant had starts it afresh: a fence is cleared (the host holds the lease
    /// again), and whatever an earlier holder's store left unreplicated is dropped, because the start-up rule
    /// has already either pushed it up (it is in the local copy) or deliberately replaced it with the store's
    /// newer state. A commit of that earlier queue still in flight is ignored when it returns, and replicas of
    /// the older epoch count as fenced, so a client that should have stopped cannot write any more.
    pub fn attach(&self, tenant: TenantId, epoch: u64) -> Replica {
        {
            let mut q = self.shared.queue.lock().expect("replicator lock");
            let st = q.tenants.entry(tenant.clone()).or_default();
            if epoch > st.epoch {
                let dropped = st.unacked();
                if dropped > 0 {
                    self.shared.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
                    info!(%tenant, epoch, dropped, "re-attached under a newer lease; the earlier queue is superseded");
                }
                let in_flight = st.in_flight;
                *st = TenantState { epoch, incarnation: st.incarnation + 1, in_flight, ..Default::default() };
            }
        }
        Replica { tenant, epoch, shared: Some(self.shared.clone()) }
    }

    /// Forgets a tenant that has nothing pending (after logout or a move); returns whether it was forgotten.
    pub fn forget(&self, tenant: &TenantId) -> bool {
        let mut q = self.shared.queue.lock().expect("replicator lock");
        match q.tenants.get(tenant) {
            Some(st) if st.unacked() > 0 || st.in_flight => false,
            Some(_) => {
                q.tenants.remove(tenant);
                true
            }
            None => true,
        }
    }

    /// See [`Replicator::stats`].
    pub fn stats(&self) -> ReplicatorStats {
        self.shared.stats()
    }

    /// Commits one tenant's pending changes now (ignoring the window) and waits until the store has every one
    /// of them or `deadline` passes. `true` when nothing of the tenant is left unacknowledged; `false` on the
    /// deadline or when the tenant is fenced. A failing store is retried with the usual backoff meanwhile.
    pub async fn flush_tenant(&self, tenant: &TenantId, deadline: Instant) -> bool {
        let shared = &self.shared;
        let mut scheduled = false;
        loop {
            let notified = shared.progress.notified();
            {
                let mut q = shared.queue.lock().expect("replicator lock");
                match q.tenants.get(tenant) {
                    None => return true,
                    Some(st) if st.fenced => return false,
                    Some(st) if st.unacked() == 0 => return true,
                    Some(st) => {
                        if !scheduled && !st.in_flight {
                            schedule(&mut q, tenant, Instant::now());
                            scheduled = true;
                        }
                    }
                }
            }
            shared.wake.notify_one();
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let q = shared.queue.lock().expect("replicator lock");
                return q.tenants.get(tenant).is_none_or(|st| !st.fenced && st.unacked() == 0);
            }
        }
    }
}
