//! The replicator: carries every record the engine writes locally to the credential store, shortly after, in
//! per-tenant order.
//!
//! One per host. Engine stores hand it `(tenant, generation range, changes)` after each durable local append.
//! Per tenant it coalesces changes for a window (default 250 ms; a later write of a key replaces an earlier one),
//! then commits them as [`ChangeBatch`]es of at most [`MAX_WRITES_PER_COMMIT`] writes with the tenant's fencing
//! epoch. Per tenant there is at most one commit in flight and at most one coalesced commit per window (a
//! batch above the write limit needs several).
//!
//! Retries are exact: a planned batch keeps its generation and content until the store acknowledges it, so a
//! retry of a batch that did land (the reply was lost) is acknowledged by the store as already applied, and new
//! changes never hide behind a generation the store has already seen. Changes arriving meanwhile wait for the
//! next plan. A store that is unavailable is retried with jittered exponential backoff; a write refused for a
//! stale epoch fences the tenant: its pending changes are dropped (another host owns it now) and a
//! [`Fenced`] event tells the supervisor to stop that client.
//!
//! Lag (age of the oldest unacknowledged change) and queue depth are exported as gauges and readable with
//! [`Replicator::stats`]; shutdown calls [`Replicator::flush`] with a deadline.
//!
//! # Layout
//! - this file: the replicator itself (start, flush, stats) and the types it reports.
//! - `config`: its tuning and the retry backoff.
//! - `handle`: [`ReplicatorHandle`] and the per-tenant [`Replica`].
//! - `queue`: the per-tenant queues and counters shared by the handles and the task.
//! - `commit`: the task that commits due tenants and settles each outcome.

mod commit;
mod config;
mod handle;
mod queue;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};
use wakeeper_shared::domain::TenantId;
use wakeeper_shared::ports::CredentialStore;

pub use config::{CommitHook, ReplicatorConfig};
pub use handle::{Replica, ReplicatorHandle};
use queue::{Shared, schedule};

/// One acknowledged commit.
#[derive(Debug, Clone)]
pub struct CommitInfo {
    /// The tenant.
    pub tenant: TenantId,
    /// The generation the store reached.
    pub generation: u64,
    /// Writes in the commit.
    pub writes: usize,
    /// Age of the oldest change in the commit when it was acknowledged.
    pub lag: Duration,
    /// When the commit was started.
    pub started: Instant,
}

/// A tenant fenced off by a newer owner: stop its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    /// The tenant.
    pub tenant: TenantId,
    /// The epoch this host presented.
    pub presented: u64,
    /// The newer epoch the store has seen.
    pub current: u64,
}

/// What a flush left behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushReport {
    /// Tenants with changes not yet in the store.
    pub pending_tenants: usize,
    /// Changes not yet in the store.
    pub pending_changes: usize,
}

impl FlushReport {
    /// Whether everything reached the store.
    pub fn is_complete(&self) -> bool {
        self.pending_changes == 0
    }
}

/// A point-in-time view for `/metrics` and the dashboard.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReplicatorStats {
    /// Tenants with unacknowledged changes.
    pub pending_tenants: usize,
    /// Unacknowledged changes (after coalescing).
    pub pending_changes: usize,
    /// Commits in flight.
    pub in_flight: usize,
    /// Age of the oldest unacknowledged change.
    pub lag: Duration,
    /// Acknowledged commits since start.
    pub commits: u64,
    /// Writes in acknowledged commits since start.
    pub committed_writes: u64,
    /// Failed commit attempts since start (each is retried).
    pub failed_attempts: u64,
    /// Tenants fenced off since start.
    pub fenced: u64,
    /// Changes dropped because their tenant was fenced.
    pub dropped_changes: u64,
}

/// The host's replicator. Dropping it stops the background task (call [`Replicator::flush`] first).
pub struct Replicator {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    fenced_rx: Mutex<Option<mpsc::UnboundedReceiver<Fenced>>>,
}

impl std::fmt::Debug for Replicator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator").field("config", &self.shared.config).finish_non_exhaustive()
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Replicator {
    /// Starts the replicator's scheduler on the current tokio runtime.
    pub fn start(store: Arc<dyn CredentialStore>, config: ReplicatorConfig) -> Self {
        let (fenced_tx, fenced_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::new(store, config, fenced_tx));
        let task = tokio::spawn(commit::scheduler(shared.clone()));
        Self { shared, task, fenced_rx: Mutex::new(Some(fenced_rx)) }
    }

    /// A handle for engine stores and the supervisor.
    pub fn handle(&self) -> ReplicatorHandle {
        ReplicatorHandle { shared: self.shared.clone() }
    }

    /// The stream of fenced tenants (taken once, by the supervisor).
    pub fn take_fenced_events(&self) -> Option<mpsc::UnboundedReceiver<Fenced>> {
        self.fenced_rx.lock().expect("replicator lock").take()
    }

    /// Current lag, queue depth and counters; also published as gauges.
    pub fn stats(&self) -> ReplicatorStats {
        self.shared.stats()
    }

    /// Commits everything pending now (ignoring the window) and waits until the store has it all or `deadline`
    /// passes; reports what was left. Unavailable stores are still retried (with backoff) until the deadline.
    pub async fn flush(&self, deadline: Instant) -> FlushReport {
        let shared = &self.shared;
        shared.flushing.store(true, Ordering::SeqCst);
        {
            let mut q = shared.queue.lock().expect("replicator lock");
            let now = Instant::now();
            let due: Vec<TenantId> = q
                .tenants
                .iter()
                .filter(|(_, st)| !st.in_flight && st.unacked() > 0 && !st.fenced)
                .map(|(t, _)| t.clone())
                .collect();
            for t in due {
                schedule(&mut q, &t, now);
            }
        }
        shared.wake.notify_one();
        let report = loop {
            let notified = shared.progress.notified();
            let report = shared.report();
            if report.is_complete() || Instant::now() >= deadline {
                break report;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break shared.report();
            }
        };
        shared.flushing.store(false, Ordering::SeqCst);
        if report.is_complete() {
            info!("replication flushed");
        } else {
            warn!(
                pending_tenants = report.pending_tenants,
                pending_changes = report.pending_changes,
                "replication flush ended with changes left"
            );
        }
        report
    }
}
