//! The restore fan-out: bring every desired tenant (or a given list) back on its host, from outside.
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
use serde_json::Value;
use tracing::{info, warn};

use crate::domain::{SessionState, TenantId};
use crate::emf::Emf;
use crate::ports::{StoreError, TenantStore};
pub use crate::sweep::{EnsureAnswer, HostError, HostOps};
use crate::sweep::{list_all_desired, mark_terminal};

/// Which tenants to restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanoutRequest {
    /// These tenants (whatever their desired flag: an operator asked for them); `None` means every desired
    /// tenant in the tenant store.
    #[serde(default)]
    pub tenant_ids: Option<Vec<TenantId>>,
}

/// Most tenant ids one direct invoke may name.
pub const MAX_REQUEST_IDS: usize = 10_000;

/// What started a function run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// An EventBridge Scheduler (or EventBridge rule) event.
    Scheduled {
        /// The schedule's ARN, when the event names it.
        schedule: Option<String>,
        /// The scheduled time, when the event carries it.
        time: Option<String>,
    },
    /// A direct invoke: `{}` or `{"tenant_ids": [...]}`.
    Direct(FanoutRequest),
}

/// An event no function accepts. The message names the field or position, never the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unrecognised event: {0}")]
pub struct EventError(pub String);

/// Tells a Scheduler event from a direct invoke. A Scheduler event has `source` `aws.scheduler` (or
/// `aws.events` from an EventBridge rule) and `detail-type` `Scheduled Event`; a direct invoke is `{}`, `null`
/// or an object whose only member is `tenant_ids`. Anything else is refused rather than guessed at: a typo
/// such as `tenant_id` must not turn into "restore everything".
pub fn classify_event(event: &Value) -> Result<Invocation, EventError> {
    let obj = match event {
        Value::Null => return Ok(Invocation::Direct(FanoutRequest::default())),
        Value::Object(o) => o,
        _ => return Err(EventError("expected a JSON object".into())),
    };
    let source = obj.get("source").and_then(Value::as_str);
    let detail_type = obj.get("detail-type").and_then(Value::as_str);
    if matches!(source, Some("aws.scheduler" | "aws.events")) || detail_type == Some("Scheduled Event") {
        let schedule = obj.get("resources").and_then(|r| r.get(0)).and_then(Value::as_str).map(str::to_owned);
        let time = obj.get("time").and_then(Value::as_str).map(str::to_owned);
        return Ok(Invocation::Scheduled { schedule, time });
    }
    if obj.keys().any(|k| k != "tenant_ids") {
        return Err(EventError(
            "expected a Scheduler event or {\"tenant_ids\": [...]}; the object has other fields".into(),
        ));
    }
    let tenant_ids = match obj.get("tenant_ids") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            if items.len() > MAX_REQUEST_IDS {
                return Err(EventError(format!("tenant_ids holds more than {MAX_REQUEST_IDS} ids")));
            }
            let mut ids = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let id = item
                    .as_str()
                    .and_then(|s| TenantId::parse(s).ok())
                    .ok_or_else(|| EventError(format!("tenant_ids[{i}] is not a valid tenant id")))?;
                ids.push(id);
            }
            Some(ids)
        }
        Some(_) => return Err(EventError("tenant_ids must be an array of strings".into())),
    };
    Ok(Invocation::Direct(FanoutRequest { tenant_ids }))
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
        None => {
            let mut records = list_all_desired(tenants, limits.page_size).await?;
            // Most recently healthy first: the likeliest to come back at once, and the ones customers noticed.
            records
                .sort_by(|a, b| b.last_healthy_at.cmp(&a.last_healthy_at).then_with(|| a.tenant_id.cmp(&b.tenant_id)));
            records.into_iter().map(|r| r.tenant_id).collect()
        }
    };
    report.total = ids.len();
    let (skip, todo): (Vec<TenantId>, Vec<TenantId>) = ids.into_iter().partition(|id| running.contains(id));
    report.already_running = skip.len();

    let short = &short;
    let outcomes: Vec<Outcome> = futures_util::stream::iter(todo)
        .map(|id| async move {
            if short() {
                return Outcome::NotAttempted;
            }
            match host.ensure(&id).await {
                Ok(EnsureAnswer::Started) => Outcome::Started,
                Ok(EnsureAnswer::AlreadyRunning) => Outcome::AlreadyRunning,
                Ok(answer @ (EnsureAnswer::CredentialsMissing | EnsureAnswer::CredentialsCorrupt)) => {
                    let (status, reason) = answer.terminal().expect("definitive answer");
                    match mark_terminal(tenants, &id, status, reason, crate::domain::now_millis()).await {
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
        })
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn scheduler_events_are_recognised() {
        let ev = json!({
            "version": "0", "id": "e1", "detail-type": "Scheduled Event", "source": "aws.scheduler",
            "account": "123456789012", "time": "2026-11-28T12:00:00Z", "region": "us-east-1",
            "resources": ["arn:aws:scheduler:us-east-1:123456789012:schedule/default/sweep"], "detail": "{}"
        });
        assert_eq!(
            classify_event(&ev).unwrap(),
            Invocation::Scheduled {
                schedule: Some("arn:aws:scheduler:us-east-1:123456789012:schedule/default/sweep".into()),
                time: Some("2026-11-28T12:00:00Z".into()),
            }
        );
        let rule = json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}});
        assert!(matches!(classify_event(&rule).unwrap(), Invocation::Scheduled { .. }));
    }

    #[test]
    fn direct_invokes_are_recognised() {
        assert_eq!(classify_event(&json!({})).unwrap(), Invocation::Direct(FanoutRequest::default()));
        assert_eq!(classify_event(&Value::Null).unwrap(), Invocation::Direct(FanoutRequest::default()));
        assert_eq!(
            classify_event(&json!({"tenant_ids": ["a", "b-2"]})).unwrap(),
            Invocation::Direct(FanoutRequest {
                tenant_ids: Some(vec![TenantId::parse("a").unwrap(), TenantId::parse("b-2").unwrap()])
            })
        );
        assert_eq!(classify_event(&json!({"tenant_ids": null})).unwrap(), Invocation::Direct(FanoutRequest::default()));
    }

    #[test]
    fn anything_else_is_refused_without_echoing() {
        for bad in [
            json!({"tenant_id": ["a"]}),
            json!({"tenant_ids": "a"}),
            json!({"tenant_ids": [1]}),
            json!({"tenant_ids": ["../secret"]}),
            json!([1, 2]),
            json!("restore"),
        ] {
            let err = classify_event(&bad).unwrap_err().to_string();
            assert!(!err.contains("secret"), "{err}");
        }
        let err = classify_event(&json!({"tenant_ids": ["ok", "../secret"]})).unwrap_err();
        assert!(err.0.contains("tenant_ids[1]"), "{err}");
        let many: Vec<String> = (0..=MAX_REQUEST_IDS).map(|i| format!("t{i}")).collect();
        assert!(classify_event(&json!({ "tenant_ids": many })).is_err());
    }
}
