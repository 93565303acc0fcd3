//! The restore: bring every desired tenant (or a given list) back on its host, from outside (the restore
//! function, the CLI), in the order the host's own restore on start uses too ([`desired_in_restore_order`]).
//!
//! The host restores its tenants on start by itself; this is the backstop for a host that restarted without
//! doing so, or an operator's "restore these now". It reads the host's sessions once, skips what already
//! runs, asks the host to ensure the rest with bounded concurrency (the host's governor paces the actual
//! connects), marks a tenant only on a definitive credentials answer, never on a transient failure, and stops
//! launching work before the caller's time runs out, reporting how far it got.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::domain::{SessionState, TenantId, TenantRecord};
use crate::emf::Emf;
use crate::ports::{EnsureAnswer, HostError, HostOps, StoreError, TenantStore};
use crate::sweep::{list_all_desired, mark_terminal};

/// Which tenants to restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanoutRequest {
    /// These tenants (whatever their desired flag: an operator asked for them); `None` means every desired
    /// tenant in the tenant store.
    #[serde(default)]
    pub tenant_ids: Option<Vec<TenantId>>,
}

/// Bounds of one restore run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreLimits {
    /// Ensure calls in flight at once. Each one hydrates a tenant on the host; the host's governor paces
    /// the connects that follow, so this only bounds the host's hydration work and this process's sockets.
    pub concurrency: usize,
    /// No new call starts once less than this much time is left: enough for the calls in flight to finish
    /// (a control-API call's timeout and retries) and the report to be returned.
    pub reserve: Duration,
    /// Page size when reading the desired tenants.
    pub page_size: usize,
}

impl Default for RestoreLimits {
    fn default() -> Self {
        Self { concurrency: 16, reserve: Duration::from_secs(15), page_size: 500 }
    }
}

/// What a restore did. Serialized as the function's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Tenants considered (listed or given).
    pub total: usize,
    /// Tenants the host started on request.
    pub started: usize,
    /// Tenants that were already running.
    pub already_running: usize,
    /// Tenants whose ensure failed transiently or was refused (not marked).
    pub failed: usize,
    /// Tenants marked after a definitive credentials answer.
    pub marked: usize,
    /// Tenants not tried because time ran short.
    pub not_attempted: usize,
    /// Whether the run stopped before it was done (time ran short while listing or ensuring).
    pub stopped_early: bool,
    /// How long the run took.
    pub duration_ms: u64,
}

impl RestoreReport {
    /// The report as an EMF line's metrics, under dimension `Function` = `function`.
    pub fn emf(&self, function: &str) -> Emf {
        Emf::new(crate::emf::NAMESPACE)
            .dimension("Function", function)
            .count("Total", self.total as u64)
            .count("Started", self.started as u64)
            .count("AlreadyRunning", self.already_running as u64)
            .count("Failed", self.failed as u64)
            .count("Marked", self.marked as u64)
            .count("NotAttempted", self.not_attempted as u64)
            .count("StoppedEarly", u64::from(self.stopped_early))
            .millis("DurationMs", self.duration_ms)
    }
}

/// Why a restore could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The tenant store could not be read.
    #[error("reading the desired tenants: {0}")]
    Store(#[from] StoreError),
    /// The host's sessions could not be read; nothing was asked of it and nothing was marked.
    #[error("{0}")]
    Host(HostError),
}

/// Every desired tenant, most recently healthy first: the likeliest to come back at once, and the ones
/// customers noticed. Ties go by tenant id, so the order is stable.
pub async fn desired_in_restore_order(
    tenants: &dyn TenantStore,
    page_size: usize,
) -> Result<Vec<TenantRecord>, StoreError> {
    let mut records = list_all_desired(tenants, page_size).await?;
    records.sort_by(|a, b| b.last_healthy_at.cmp(&a.last_healthy_at).then_with(|| a.tenant_id.cmp(&b.tenant_id)));
    Ok(records)
}

/// What became of one tenant of a restore.
enum Outcome {
    Started,
    AlreadyRunning,
    Marked,
    Failed,
    NotAttempted,
}

/// Runs one restore. `time_left` says how long the caller may still run (a Lambda's remaining time; a CLI can
/// pass a constant); no ensure starts once it is below `limits.reserve`.
pub async fn run_restore(
    tenants: &dyn TenantStore,
    host: &dyn HostOps,
    request: &FanoutRequest,
    limits: &RestoreLimits,
    time_left: impl Fn() -> Duration + Send + Sync,
) -> Result<RestoreReport, RestoreError> {
    let started_at = Instant::now();
    let short = || time_left() < limits.reserve;
    let mut report = RestoreReport::default();
    if short() {
        report.stopped_early = true;
        return Ok(report);
    }
    let list = host.sessions().await.map_err(RestoreError::Host)?;
    let running: HashSet<TenantId> = list
        .sessions
        .into_iter()
        .filter(|s| matches!(s.state, SessionState::Open | SessionState::Connecting | SessionState::Backoff))
        .map(|s| s.tenant_id)
        .collect();

    let ids: Vec<TenantId> = match &request.tenant_ids {
        Some(given) => {
            let mut seen = HashSet::new();
            given.iter().filter(|id| seen.insert(*id)).cloned().collect()
        }
        None => desired_in_restore_order(tenants, limits.page_size).await?.into_iter().map(|r| r.tenant_id).collect(),
    };
    report.total = ids.len();
    let (skip, todo): (Vec<TenantId>, Vec<TenantId>) = ids.into_iter().partition(|id| running.contains(id));
    report.already_running = skip.len();

    let short = &short;
    let outcomes: Vec<Outcome> = futures_util::stream::iter(todo)
        .map(|id| async move { if short() { Outcome::NotAttempted } else { ensure_one(tenants, host, &id).await } })
        .buffer_unordered(limits.concurrency.max(1))
        .collect()
        .await;
    for o in outcomes {
        match o {
            Outcome::Started => report.started += 1,
            Outcome::AlreadyRunning => report.already_running += 1,
            Outcome::Marked => report.marked += 1,
            Outcome::Failed => report.failed += 1,
            Outcome::NotAttempted => report.not_attempted += 1,
        }
    }
    report.stopped_early = report.not_attempted > 0;
    report.duration_ms = started_at.elapsed().as_millis() as u64;
    info!(
        total = report.total,
        started = report.started,
        already_running = report.already_running,
        failed = report.failed,
        marked = report.marked,
        not_attempted = report.not_attempted,
        duration_ms = report.duration_ms,
        "restore done"
    );
    Ok(report)
}

/// Asks the host to run one tenant; marks it only on a definitive credentials answer.
async fn ensure_one(tenants: &dyn TenantStore, host: &dyn HostOps, id: &TenantId) -> Outcome {
    match host.ensure(id).await {
        Ok(EnsureAnswer::Started) => Outcome::Started,
        Ok(EnsureAnswer::AlreadyRunning) => Outcome::AlreadyRunning,
        Ok(answer @ (EnsureAnswer::CredentialsMissing | EnsureAnswer::CredentialsCorrupt)) => {
            let (status, reason) = answer.terminal().expect("definitive answer");
            match mark_terminal(tenants, id, status, reason, crate::domain::now_millis()).await {
                Ok(_) => {
                    info!(tenant = %id, status = status.as_str(), "tenant marked");
                    Outcome::Marked
                }
                Err(e) => {
                    warn!(tenant = %id, error = %e, "could not mark tenant");
                    Outcome::Failed
                }
            }
        }
        Err(e) => {
            // Transient, or a configuration problem: never a reason to mark the tenant.
            warn!(tenant = %id, error = %e, "ensure failed");
            Outcome::Failed
        }
    }
}
