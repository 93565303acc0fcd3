//! The replicator's task: takes due tenants off the queue and commits each one's planned batches in order, then
//! settles the outcome (acknowledged, fenced, or retried after a backoff).

use std::cmp::Reverse;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tracing::{debug, error, warn};
use wakeeper_shared::domain::{ChangeBatch, TenantId};
use wakeeper_shared::ports::{Conflict, StoreError};

use super::config::backoff;
use super::queue::{Shared, TenantState, schedule};
use super::{CommitInfo, Fenced};

/// The replicator's task: wakes when a tenant is due (or on new work), commits due tenants with at most
/// `max_in_flight` at once, and publishes the gauges every second.
pub(super) async fn scheduler(shared: Arc<Shared>) {
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
                record_commit(shared, tenant, batch, since, started);
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    if let Some(event) = settle(shared, tenant, incarnation, started, acked, outcome) {
        let _ = shared.fenced_tx.send(event);
    }
}

/// Counts one acknowledged batch and tells the commit hook.
fn record_commit(shared: &Shared, tenant: &TenantId, batch: &ChangeBatch, since: Option<Instant>, started: Instant) {
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

/// Books the outcome of a commit that got `acked` batches through: drops them from the plan, then fences the
/// tenant, or schedules a retry, or schedules its next commit. Returns the fenced event to send, if any.
fn settle(
    shared: &Shared,
    tenant: &TenantId,
    incarnation: u64,
    started: Instant,
    acked: usize,
    outcome: Result<(), StoreError>,
) -> Option<Fenced> {
    let mut q = shared.queue.lock().expect("replicator lock");
    let st = q.tenants.get_mut(tenant)?;
    st.in_flight = false;
    st.last_commit = Some(started);
    if st.incarnation != incarnation {
        // A newer epoch superseded the queue this commit came from; its outcome concerns nobody now.
        if st.unacked() > 0 {
            let at = shared.due_time(st, Instant::now());
            schedule(&mut q, tenant, at);
        }
        return None;
    }
    for _ in 0..acked {
        if let Some(b) = st.planned.pop_front() {
            st.committed = Some(b.generation);
        }
    }
    if st.planned.is_empty() {
        st.planned_since = None;
    }
    let (retry_at, fenced_event) = match outcome {
        Ok(()) => {
            st.failures = 0;
            (None, None)
        }
        Err(StoreError::Conflict(Conflict::StaleEpoch { presented, current })) => {
            (None, Some(fence(shared, tenant, st, presented, current)))
        }
        Err(e) => (Some(retry_time(shared, tenant, st, &e)), None),
    };
    if !st.fenced && st.unacked() > 0 {
        let at = match retry_at {
            Some(at) => at,
            None => shared.due_time(st, Instant::now()),
        };
        schedule(&mut q, tenant, at);
    }
    fenced_event
}

/// The store refused the tenant's epoch: another host owns it. Drops everything unacknowledged.
fn fence(shared: &Shared, tenant: &TenantId, st: &mut TenantState, presented: u64, current: u64) -> Fenced {
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
    Fenced { tenant: tenant.clone(), presented, current }
}

/// Counts a failed commit and says when to retry it.
fn retry_time(shared: &Shared, tenant: &TenantId, st: &mut TenantState, e: &StoreError) -> Instant {
    st.failures = st.failures.saturating_add(1);
    shared.failed_attempts.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("wakeeper_replication_failures_total").increment(1);
    let delay = backoff(&shared.config, st.failures);
    if e.is_transient() {
        debug!(%tenant, failures = st.failures, delay_ms = delay.as_millis() as u64, error = %e, "replication retry");
    } else {
        error!(%tenant, failures = st.failures, error = %e, "replication commit refused; retrying");
    }
    Instant::now() + delay
}
