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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use wakeeper_shared::domain::{ChangeBatch, MAX_WRITES_PER_COMMIT, RecordChange, RecordKey, TenantId};
use wakeeper_shared::ports::{Conflict, CredentialStore, StoreError};
use wakeeper_shared::working_copy::generation_step;

/// Tuning of the replicator.
#[derive(Clone)]
pub struct ReplicatorConfig {
    /// How long a tenant's changes are coalesced before a commit, and the least time between two of its
    /// commits.
    pub window: Duration,
    /// Most writes per commit (the store's limit).
    pub max_writes_per_commit: usize,
    /// Most commits in flight across all tenants.
    pub max_in_flight: usize,
    /// First retry delay after an unavailable store.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Called after every acknowledged commit (benchmarks, tests).
    pub on_commit: Option<CommitHook>,
}

/// A callback told of every acknowledged commit.
pub type CommitHook = Arc<dyn Fn(&CommitInfo) + Send + Sync>;

impl Default for ReplicatorConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(250),
            max_writes_per_commit: MAX_WRITES_PER_COMMIT,
            max_in_flight: 64,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            on_commit: None,
        }
    }
}

impl std::fmt::Debug for ReplicatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatorConfig")
            .field("window", &self.window)
            .field("max_writes_per_commit", &self.max_writes_per_commit)
            .field("max_in_flight", &self.max_in_flight)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .finish_non_exhaustive()
    }
}

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

type PendingMap = HashMap<RecordKey, (u64, Option<Vec<u8>>)>;

#[derive(Default)]
struct TenantState {
    epoch: u64,
    /// Bumped when a newer epoch supersedes the queue; a commit started before ignores its result.
    incarnation: u64,
    fenced: bool,
    /// Newest generation the store acknowledged (or had when the first change arrived).
    committed: Option<u64>,
    /// Newest generation handed in.
    submitted: Option<u64>,
    /// Changes not yet planned: key -> (sequence, value). The sequence orders the plan by last write.
    pending: PendingMap,
    pending_since: Option<Instant>,
    next_seq: u64,
    /// Planned batches, committed strictly in order and retried unchanged.
    planned: VecDeque<ChangeBatch>,
    planned_since: Option<Instant>,
    in_flight: bool,
    /// When the tenant is due, if queued.
    due: Option<Instant>,
    last_commit: Option<Instant>,
    failures: u32,
}

impl TenantState {
    fn unacked(&self) -> usize {
        self.pending.len() + self.planned.iter().map(|b| b.changes.len()).sum::<usize>()
    }

    fn oldest(&self) -> Option<Instant> {
        match (self.planned_since, self.pending_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

struct Queue {
    tenants: HashMap<TenantId, TenantState>,
    heap: BinaryHeap<Reverse<(Instant, TenantId)>>,
}

struct Shared {
    store: Arc<dyn CredentialStore>,
    config: ReplicatorConfig,
    queue: Mutex<Queue>,
    wake: Notify,
    progress: Notify,
    flushing: AtomicBool,
    fenced_tx: mpsc::UnboundedSender<Fenced>,
    commits: AtomicU64,
    committed_writes: AtomicU64,
    failed_attempts: AtomicU64,
    fenced: AtomicU64,
    dropped: AtomicU64,
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

/// Submits changes to the replicator; cheap to clone. Obtain per-tenant [`Replica`]s with
/// [`ReplicatorHandle::attach`].
#[derive(Clone)]
pub struct ReplicatorHandle {
    shared: Arc<Shared>,
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
    /// ([`wakeeper_shared::hydrate::Hydrator::prepare`]) has reconciled the local copy with the store.
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

impl Replicator {
    /// Starts the replicator's scheduler on the current tokio runtime.
    pub fn start(store: Arc<dyn CredentialStore>, config: ReplicatorConfig) -> Self {
        let (fenced_tx, fenced_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
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
        });
        let task = tokio::spawn(scheduler(shared.clone()));
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

fn schedule(q: &mut Queue, tenant: &TenantId, at: Instant) {
    let Some(st) = q.tenants.get_mut(tenant) else { return };
    if st.in_flight || st.due.is_some_and(|d| d <= at) {
        return;
    }
    st.due = Some(at);
    q.heap.push(Reverse((at, tenant.clone())));
}

impl Shared {
    fn submit(&self, tenant: &TenantId, epoch: u64, from: u64, to: u64, changes: Vec<RecordChange>) {
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
    fn due_time(&self, st: &TenantState, now: Instant) -> Instant {
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

    fn is_fenced(&self, tenant: &TenantId, epoch: u64) -> bool {
        self.queue.lock().expect("replicator lock").tenants.get(tenant).is_some_and(|st| st.fenced || epoch < st.epoch)
    }

    fn report(&self) -> FlushReport {
        let q = self.queue.lock().expect("replicator lock");
        let mut r = FlushReport::default();
        for st in q.tenants.values() {
            let n = st.unacked();
            if n > 0 {
                r.pending_tenants += 1;
                r.pending_changes += n;
            }
        }
        r
    }

    fn stats(&self) -> ReplicatorStats {
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
            for st in q.tenants.values() {
                let n = st.unacked();
                if n > 0 {
                    s.pending_tenants += 1;
                    s.pending_changes += n;
                }
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
    fn plan(&self, tenant: &TenantId, st: &mut TenantState) {
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

async fn scheduler(shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(shared.config.max_in_flight.max(1)));
    let mut last_gauges = Instant::now();
    loop {
        let now = Instant::now();
        let mut ready = Vec::new();
        let next = {
            let mut q = shared.queue.lock().expect("replicator lock");
            loop {
                let Some(Reverse((at, _))) = q.heap.peek() else { break None };
                let at = *at;
                if at > now {
                    break Some(at);
                }
                let Reverse((at, tenant)) = q.heap.pop().expect("peeked");
                let Some(st) = q.tenants.get_mut(&tenant) else { continue };
                if st.due != Some(at) || st.in_flight {
                    continue; // superseded entry
                }
                st.due = None;
                if st.fenced || st.unacked() == 0 {
                    continue;
                }
                st.in_flight = true;
                ready.push(tenant);
            }
        };
        for tenant in ready {
            let permit = permits.clone().acquire_owned().await.expect("semaphore never closed");
            let shared = shared.clone();
            tokio::spawn(async move {
                commit_tenant(&shared, &tenant).await;
                drop(permit);
                shared.progress.notify_waiters();
                shared.wake.notify_one();
            });
        }
        if now.duration_since(last_gauges) >= Duration::from_secs(1) {
            shared.stats();
            last_gauges = now;
        }
        let sleep_until = next.unwrap_or(now + Duration::from_secs(1)).min(now + Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep_until(sleep_until) => {}
            _ = shared.wake.notified() => {}
        }
    }
}

/// Commits one tenant's planned batches in order (planning first if needed), then reschedules it.
async fn commit_tenant(shared: &Shared, tenant: &TenantId) {
    let started = Instant::now();
    let (batches, since, incarnation) = {
        let mut q = shared.queue.lock().expect("replicator lock");
        let Some(st) = q.tenants.get_mut(tenant) else { return };
        shared.plan(tenant, st);
        (st.planned.clone(), st.planned_since, st.incarnation)
    };
    let mut acked = 0usize;
    let mut outcome: Result<(), StoreError> = Ok(());
    for batch in &batches {
        match shared.store.write(tenant, batch).await {
            Ok(()) => {
                acked += 1;
                let lag = since.map_or(Duration::ZERO, |s| Instant::now().saturating_duration_since(s));
                shared.commits.fetch_add(1, Ordering::Relaxed);
                shared.committed_writes.fetch_add(batch.changes.len() as u64, Ordering::Relaxed);
                metrics::counter!("wakeeper_replication_commits_total").increment(1);
                metrics::counter!("wakeeper_replication_writes_total").increment(batch.changes.len() as u64);
                metrics::histogram!("wakeeper_replication_commit_lag_seconds").record(lag.as_secs_f64());
                if let Some(cb) = &shared.config.on_commit {
                    cb(&CommitInfo {
                        tenant: tenant.clone(),
                        generation: batch.generation,
                        writes: batch.changes.len(),
                        lag,
                        started,
                    });
                }
                debug!(%tenant, generation = batch.generation, writes = batch.changes.len(), "replicated");
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }

    let mut fenced_event = None;
    {
        let mut q = shared.queue.lock().expect("replicator lock");
        let Some(st) = q.tenants.get_mut(tenant) else { return };
        st.in_flight = false;
        st.last_commit = Some(started);
        if st.incarnation != incarnation {
            // A newer epoch superseded the queue this commit came from; its outcome concerns nobody now.
            if st.unacked() > 0 {
                let at = shared.due_time(st, Instant::now());
                schedule(&mut q, tenant, at);
            }
            return;
        }
        for _ in 0..acked {
            if let Some(b) = st.planned.pop_front() {
                st.committed = Some(b.generation);
            }
        }
        if st.planned.is_empty() {
            st.planned_since = None;
        }
        let retry_at = match outcome {
            Ok(()) => {
                st.failures = 0;
                None
            }
            Err(StoreError::Conflict(Conflict::StaleEpoch { presented, current })) => {
                let dropped = st.unacked();
                st.fenced = true;
                st.planned.clear();
                st.planned_since = None;
                st.pending.clear();
                st.pending_since = None;
                shared.fenced.fetch_add(1, Ordering::Relaxed);
                shared.dropped.fetch_add(dropped as u64, Ordering::Relaxed);
                metrics::counter!("wakeeper_replication_fenced_total").increment(1);
                warn!(%tenant, presented, current, dropped, "replication fenced: another host owns the tenant");
                fenced_event = Some(Fenced { tenant: tenant.clone(), presented, current });
                None
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("wakeeper_replication_failures_total").increment(1);
                let delay = backoff(&shared.config, st.failures);
                if e.is_transient() {
                    debug!(%tenant, failures = st.failures, delay_ms = delay.as_millis() as u64, error = %e, "replication retry");
                } else {
                    error!(%tenant, failures = st.failures, error = %e, "replication commit refused; retrying");
                }
                Some(Instant::now() + delay)
            }
        };
        if !st.fenced && st.unacked() > 0 {
            let at = match retry_at {
                Some(at) => at,
                None => shared.due_time(st, Instant::now()),
            };
            schedule(&mut q, tenant, at);
        }
    }
    if let Some(ev) = fenced_event {
        let _ = shared.fenced_tx.send(ev);
    }
}

/// Exponential backoff with full jitter between half and the whole step.
fn backoff(config: &ReplicatorConfig, failures: u32) -> Duration {
    let exp = config.backoff_initial.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let step = exp.min(config.backoff_max);
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    let frac = f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX);
    step.mul_f64(0.5 + 0.5 * frac)
}
