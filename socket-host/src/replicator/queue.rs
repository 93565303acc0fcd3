//! The per-tenant queues the replicator shares between its handles and its task: what is pending and planned
//! per tenant, when each tenant is due, and the counters.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tracing::{error, warn};
use wakeeper_shared::domain::{ChangeBatch, RecordChange, RecordKey, TenantId};
use wakeeper_shared::local::generation_step;
use wakeeper_shared::ports::CredentialStore;

use super::{Fenced, FlushReport, ReplicatorConfig, ReplicatorStats};

type PendingMap = HashMap<RecordKey, (u64, Option<Vec<u8>>)>;

#[derive(Default)]
/// One tenant's replication: its epoch, its pending and planned changes, and when it is due.
pub(super) struct TenantState {
    pub(super) epoch: u64,
    /// Bumped when a newer epoch supersedes the queue; a commit started before ignores its result.
    pub(super) incarnation: u64,
    pub(super) fenced: bool,
    /// Newest generation the store acknowledged (or had when the first change arrived).
    pub(super) committed: Option<u64>,
    /// Newest generation handed in.
    pub(super) submitted: Option<u64>,
    /// Changes not yet planned: key -> (sequence, value). The sequence orders the plan by last write.
    pub(super) pending: PendingMap,
    pub(super) pending_since: Option<Instant>,
    pub(super) next_seq: u64,
    /// Planned batches, committed strictly in order and retried unchanged.
    pub(super) planned: VecDeque<ChangeBatch>,
    pub(super) planned_since: Option<Instant>,
    pub(super) in_flight: bool,
    /// When the tenant is due, if queued.
    pub(super) due: Option<Instant>,
    pub(super) last_commit: Option<Instant>,
    pub(super) failures: u32,
}

impl TenantState {
    /// Changes not yet acknowledged by the store.
    pub(super) fn unacked(&self) -> usize {
        self.pending.len() + self.planned.iter().map(|b| b.changes.len()).sum::<usize>()
    }

    /// When the oldest unacknowledged change arrived.
    pub(super) fn oldest(&self) -> Option<Instant> {
        match (self.planned_since, self.pending_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Every tenant's state, and a min-heap of when tenants are due (stale entries are skipped on pop).
pub(super) struct Queue {
    pub(super) tenants: HashMap<TenantId, TenantState>,
    pub(super) heap: BinaryHeap<Reverse<(Instant, TenantId)>>,
}

impl Queue {
    /// Tenants and changes not yet acknowledged by the store.
    fn unacknowledged(&self) -> FlushReport {
        let mut r = FlushReport::default();
        for st in self.tenants.values() {
            let n = st.unacked();
            if n > 0 {
                r.pending_tenants += 1;
                r.pending_changes += n;
            }
        }
        r
    }
}

/// What the replicator, its handles and its task share.
pub(super) struct Shared {
    pub(super) store: Arc<dyn CredentialStore>,
    pub(super) config: ReplicatorConfig,
    pub(super) queue: Mutex<Queue>,
    pub(super) wake: Notify,
    pub(super) progress: Notify,
    pub(super) flushing: AtomicBool,
    pub(super) fenced_tx: mpsc::UnboundedSender<Fenced>,
    pub(super) commits: AtomicU64,
    pub(super) committed_writes: AtomicU64,
    pub(super) failed_attempts: AtomicU64,
    pub(super) fenced: AtomicU64,
    pub(super) dropped: AtomicU64,
}

impl Shared {
    pub(super) fn new(
        store: Arc<dyn CredentialStore>,
        config: ReplicatorConfig,
        fenced_tx: mpsc::UnboundedSender<Fenced>,
    ) -> Self {
        Self {
            store,
            config,
            queue: Mutex::new(Queue { tenants: HashMap::new(), heap: BinaryHeap::new() }),
            wake: Notify::new(),
            progress: Notify::new(),
            flushing: AtomicBool::new(false),
            fenced_tx,
            commits: AtomicU64::new(0),
            committed_writes: AtomicU64::new(0),
            failed_attempts: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Hands in one durable local append's changes (see [`super::Replica::submit`]).
    pub(super) fn submit(&self, tenant: &TenantId, epoch: u64, from: u64, to: u64, changes: Vec<RecordChange>) {
        if changes.is_empty() {
            return;
        }
        let mut q = self.queue.lock().expect("replicator lock");
        let now = Instant::now();
        let st = q.tenants.entry(tenant.clone()).or_insert_with(|| TenantState { epoch, ..Default::default() });
        if st.fenced || epoch < st.epoch {
            self.dropped.fetch_add(changes.len() as u64, Ordering::Relaxed);
            return;
        }
        if to < from + generation_step(changes.len()) {
            error!(%tenant, from, to, changes = changes.len(), "generation range too small for the changes; replication may misorder");
        }
        match st.submitted {
            Some(s) if s != from => warn!(%tenant, expected = s, got = from, "gap in submitted generations"),
            _ => {}
        }
        st.committed.get_or_insert(from);
        st.submitted = Some(st.submitted.map_or(to, |s| s.max(to)));
        for c in changes {
            let seq = st.next_seq;
            st.next_seq += 1;
            st.pending.insert(c.key, (seq, c.value));
        }
        st.pending_since.get_or_insert(now);
        if !st.in_flight && st.due.is_none() {
            let at = self.due_time(st, now);
            schedule(&mut q, tenant, at);
            drop(q);
            self.wake.notify_one();
        }
    }

    /// When a tenant with new work should commit: a window after its oldest change, and a window after its
    /// last commit; at once when flushing.
    pub(super) fn due_time(&self, st: &TenantState, now: Instant) -> Instant {
        if self.flushing.load(Ordering::SeqCst) {
            return now;
        }
        let w = self.config.window;
        let mut at = st.oldest().unwrap_or(now) + w;
        if let Some(last) = st.last_commit {
            at = at.max(last + w);
        }
        at
    }

    /// Whether `tenant`'s writes under `epoch` are refused.
    pub(super) fn is_fenced(&self, tenant: &TenantId, epoch: u64) -> bool {
        self.queue.lock().expect("replicator lock").tenants.get(tenant).is_some_and(|st| st.fenced || epoch < st.epoch)
    }

    /// What is not yet in the store.
    pub(super) fn report(&self) -> FlushReport {
        self.queue.lock().expect("replicator lock").unacknowledged()
    }

    /// The counters and a point-in-time view of the queues, also published as gauges.
    pub(super) fn stats(&self) -> ReplicatorStats {
        let now = Instant::now();
        let mut s = ReplicatorStats {
            commits: self.commits.load(Ordering::Relaxed),
            committed_writes: self.committed_writes.load(Ordering::Relaxed),
            failed_attempts: self.failed_attempts.load(Ordering::Relaxed),
            fenced: self.fenced.load(Ordering::Relaxed),
            dropped_changes: self.dropped.load(Ordering::Relaxed),
            ..Default::default()
        };
        {
            let q = self.queue.lock().expect("replicator lock");
            let pending = q.unacknowledged();
            (s.pending_tenants, s.pending_changes) = (pending.pending_tenants, pending.pending_changes);
            for st in q.tenants.values() {
                if st.in_flight {
                    s.in_flight += 1;
                }
                if let Some(o) = st.oldest() {
                    s.lag = s.lag.max(now.saturating_duration_since(o));
                }
            }
        }
        metrics::gauge!("wakeeper_replication_pending_tenants").set(s.pending_tenants as f64);
        metrics::gauge!("wakeeper_replication_queue_depth").set(s.pending_changes as f64);
        metrics::gauge!("wakeeper_replication_in_flight").set(s.in_flight as f64);
        metrics::gauge!("wakeeper_replication_lag_seconds").set(s.lag.as_secs_f64());
        s
    }

    /// Turns a tenant's pending changes into planned batches (when nothing is planned), splitting at the write
    /// limit. Generations run `committed+1, committed+2, ...` with the last batch at the newest submitted
    /// generation, so the store ends where the local copy is.
    pub(super) fn plan(&self, tenant: &TenantId, st: &mut TenantState) {
        if !st.planned.is_empty() || st.pending.is_empty() {
            return;
        }
        let mut items: Vec<(u64, RecordKey, Option<Vec<u8>>)> =
            st.pending.drain().map(|(k, (seq, v))| (seq, k, v)).collect();
        items.sort_unstable_by_key(|(seq, _, _)| *seq);
        let max = self.config.max_writes_per_commit.max(1);
        let chunks = items.len().div_ceil(max);
        let committed = st.committed.unwrap_or(0);
        let mut last = st.submitted.unwrap_or(committed);
        if last < committed + chunks as u64 {
            error!(%tenant, committed, submitted = last, chunks, "not enough generations for the split; stretching");
            last = committed + chunks as u64;
            st.submitted = Some(last);
        }
        let mut changes = items.into_iter().map(|(_, key, value)| RecordChange { key, value });
        for i in 0..chunks {
            let generation = if i + 1 == chunks { last } else { committed + 1 + i as u64 };
            let batch: Vec<RecordChange> = changes.by_ref().take(max).collect();
            st.planned.push_back(ChangeBatch { generation, epoch: st.epoch, changes: batch });
        }
        st.planned_since = st.pending_since.take();
    }
}

/// Queues `tenant` to be due at `at`, unless it is in flight or already due by then.
pub(super) fn schedule(q: &mut Queue, tenant: &TenantId, at: Instant) {
    let Some(st) = q.tenants.get_mut(tenant) else { return };
    if st.in_flight || st.due.is_some_and(|d| d <= at) {
        return;
    }
    st.due = Some(at);
    q.heap.push(Reverse((at, tenant.clone())));
}
