//! The health sweep: the backstop that catches what a host cannot see about itself.
//!
//! Every two minutes (a Lambda function in the cloud, a timer or `socket-host sweep` on one machine) the sweep
//! reads the host's sessions once, reads the desired tenants, lets [`reconcile`](crate::domain::reconcile)
//! decide, and carries the plan out: ensure what should run, reconnect what is stuck, write statuses only when
//! they changed, count consecutive failures and alert past the limit. A host that cannot be reached marks
//! nothing: it raises one alert and the caller fails the run.
//!
//! The I/O is injected: a [`HostOps`] (the control API, a [`HostFleet`](crate::fleet::HostFleet) of them, or
//! the host itself in-process), a [`TenantStore`] and an [`AlertSink`].

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::alerts::{AlertEvent, AlertMessage, AlertSink};
use crate::domain::reconcile::{self, Action, HostView, Policy};
use crate::domain::{
    SessionList, SessionState, SessionView, StatusUpdate, TenantId, TenantRecord, TenantStatus, UnixMillis,
};
use crate::emf::Emf;
use crate::ports::{Conflict, EnsureAnswer, HostError, HostOps, StoreError, TenantStore};

/// Knobs of a sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepPolicy {
    /// The decision's own knobs (stuck limit, alert threshold).
    pub reconcile: Policy,
    /// An open session that has received nothing for this long is asked to reconnect (a half-open socket the
    /// engine's keepalive has not caught). The engine pings an idle link every 15-30 s and gives a ping 20 s,
    /// so a healthy session is never silent much past 50 s; `None` turns the rule off.
    pub silent_after: Option<Duration>,
    /// Host calls and store writes in flight at once.
    pub concurrency: usize,
    /// Page size when reading the desired tenants.
    pub page_size: usize,
}

impl Default for SweepPolicy {
    fn default() -> Self {
        Self {
            reconcile: Policy::default(),
            silent_after: Some(Duration::from_secs(120)),
            concurrency: 16,
            page_size: 500,
        }
    }
}

/// What one sweep remembers for the next (a warm Lambda container or a long-lived timer keeps it; losing it
/// only loses the "host restarted" observation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepMemory {
    /// The host's boot id seen by the previous sweep.
    pub last_boot_id: Option<String>,
    /// The host faults already alerted (by code and message), so each raises one alert while it lasts.
    pub host_errors_alerted: BTreeSet<(String, String)>,
}

/// What a sweep did. Serialized as the function's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SweepReport {
    /// Desired tenants whose session is open.
    pub healthy: usize,
    /// Desired tenants whose session is not open (absent, connecting, backoff, stopped or terminal).
    pub unhealthy: usize,
    /// Reconnects the host accepted (stuck in connecting/backoff, or open but silent).
    pub reconnect_requested: usize,
    /// Desired tenants the host did not run and started on request.
    pub missing_started: usize,
    /// Alerts delivered.
    pub alerts: usize,
    /// Status writes that changed a record (a healthy fleet: 0).
    pub status_writes: usize,
    /// Failure-count writes (one more failure, or a reset after recovery).
    pub failure_writes: usize,
    /// Tenants marked after a definitive credentials answer.
    pub marked: usize,
    /// Alerts that could not be delivered.
    pub alerts_failed: usize,
    /// Host calls or store writes that failed transiently (nothing was marked for them).
    pub errors: usize,
    /// Desired tenants read from the tenant store.
    pub desired: usize,
    /// Sessions the host runs although the table does not want them (reported only).
    pub undesired_running: usize,
    /// Desired tenants left to their lease holder, whose session the host list does not show.
    #[serde(default)]
    pub held_elsewhere: usize,
    /// Status writes refused because the session they were for had lost its lease in the meantime.
    #[serde(default)]
    pub not_holder_skips: usize,
    /// The host's boot id changed since the previous sweep.
    pub host_restarted: bool,
    /// The host's sessions could not be read (no answer, or a refusal such as a wrong token): nothing was
    /// marked, one alert was raised, and the run should fail.
    pub host_unreachable: bool,
    /// Why the host's sessions could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_error: Option<String>,
    /// Codes of the faults the hosts report of themselves (`data_key_mismatch`), while they last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_faults: Vec<String>,
    /// How long the sweep took.
    pub duration_ms: u64,
}

impl SweepReport {
    /// The report as an EMF line's metrics, under dimension `Function` = `function`.
    pub fn emf(&self, function: &str) -> Emf {
        Emf::new(crate::emf::NAMESPACE)
            .dimension("Function", function)
            .count("Healthy", self.healthy as u64)
            .count("Unhealthy", self.unhealthy as u64)
            .count("ReconnectRequested", self.reconnect_requested as u64)
            .count("MissingStarted", self.missing_started as u64)
            .count("Alerts", self.alerts as u64)
            .count("AlertsFailed", self.alerts_failed as u64)
            .count("StatusWrites", self.status_writes as u64)
            .count("FailureWrites", self.failure_writes as u64)
            .count("Marked", self.marked as u64)
            .count("HeldElsewhere", self.held_elsewhere as u64)
            .count("NotHolderSkips", self.not_holder_skips as u64)
            .count("Errors", self.errors as u64)
            .count("HostUnreachable", u64::from(self.host_unreachable))
            .count("HostRestarted", u64::from(self.host_restarted))
            .millis("DurationMs", self.duration_ms)
    }
}

/// Why a sweep could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The tenant store could not be read.
    #[error("reading the desired tenants: {0}")]
    Store(#[from] StoreError),
}

/// Every desired tenant, page by page.
pub async fn list_all_desired(tenants: &dyn TenantStore, page_size: usize) -> Result<Vec<TenantRecord>, StoreError> {
    let mut all = Vec::new();
    let mut token = None;
    loop {
        let page = tenants.list_desired(token, page_size.max(1)).await?;
        all.extend(page.items);
        match page.next {
            Some(t) => token = Some(t),
            None => return Ok(all),
        }
    }
}

/// Marks a tenant terminal after a definitive answer, unless it already is (the host marks it itself when it
/// refuses; its reason is the more precise one and must not be overwritten). Returns whether a write happened.
pub(crate) async fn mark_terminal(
    tenants: &dyn TenantStore,
    tenant: &TenantId,
    status: TenantStatus,
    reason: &str,
    now: UnixMillis,
) -> Result<bool, StoreError> {
    if let Some(r) = tenants.get(tenant).await?
        && r.status == Some(status)
        && !r.whatsapp_connected
    {
        return Ok(false);
    }
    tenants.write_status(tenant, &StatusUpdate::terminal(status, reason), now).await
}

/// Runs one sweep. `Err` only when the tenant store cannot be read; an unreachable host is a report with
/// `host_unreachable` set (one alert raised, nothing marked), which the caller turns into a failed run.
pub async fn run_sweep(
    tenants: &dyn TenantStore,
    host: &dyn HostOps,
    memory: &mut SweepMemory,
    alerts: &dyn AlertSink,
    policy: &SweepPolicy,
    now: UnixMillis,
) -> Result<SweepReport, SweepError> {
    let started = Instant::now();
    let mut report = SweepReport::default();
    let list = match host.sessions().await {
        Ok(list) => list,
        Err(e) => {
            report_host_unreachable(&mut report, &e, alerts, now).await;
            report.duration_ms = started.elapsed().as_millis() as u64;
            return Ok(report);
        }
    };
    let desired = list_all_desired(tenants, policy.page_size).await?;
    let plan = reconcile::reconcile(
        &desired,
        HostView::Reachable(&list),
        memory.last_boot_id.as_deref(),
        now,
        policy.reconcile,
    );
    memory.last_boot_id = Some(list.boot_id.clone());
    report_host_faults(&mut report, &list, memory, alerts, now).await;
    report.desired = desired.len();
    report.healthy = plan.healthy;
    report.unhealthy = plan.unhealthy;
    report.undesired_running = plan.undesired_running;
    report.held_elsewhere = plan.held_elsewhere;
    report.host_restarted = plan.host_restarted;
    if plan.host_restarted {
        info!(boot_id = %list.boot_id, "host restarted since the last sweep");
    }

    let sessions = reconcile::sessions_by_tenant(&desired, &list.sessions);
    let per_tenant = actions_per_tenant(plan.actions, &desired, &sessions, policy.silent_after);
    let runner = TenantActions { tenants, host, alerts, sessions: &sessions, now };
    let counts: Vec<ActionCounts> = futures_util::stream::iter(per_tenant)
        .map(|(id, actions)| runner.carry_out(id, actions))
        .buffer_unordered(policy.concurrency.max(1))
        .collect()
        .await;
    for c in counts {
        report.add(c);
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    info!(
        healthy = report.healthy,
        unhealthy = report.unhealthy,
        reconnect_requested = report.reconnect_requested,
        missing_started = report.missing_started,
        alerts = report.alerts,
        status_writes = report.status_writes,
        held_elsewhere = report.held_elsewhere,
        not_holder_skips = report.not_holder_skips,
        errors = report.errors,
        duration_ms = report.duration_ms,
        "sweep done"
    );
    Ok(report)
}

/// Reports the faults the hosts list of themselves, and raises one alert for each new one (a fault that
/// clears and comes back alerts again).
async fn report_host_faults(
    report: &mut SweepReport,
    list: &SessionList,
    memory: &mut SweepMemory,
    alerts: &dyn AlertSink,
    now: UnixMillis,
) {
    let mut alerted = BTreeSet::new();
    for condition in &list.host_errors {
        let fault = (condition.code.clone(), condition.message.clone());
        if !memory.host_errors_alerted.contains(&fault) {
            warn!(code = %fault.0, reason = %fault.1, "a host reports a fault of its own");
            let event = AlertEvent::HostError { code: fault.0.clone(), reason: fault.1.clone() };
            if let Err(e) = alerts.send(&AlertMessage::new(event, now)).await {
                // Not remembered: the next sweep tries again.
                warn!(error = %e, "host-error alert not delivered");
                report.alerts_failed += 1;
                continue;
            }
            report.alerts += 1;
        }
        alerted.insert(fault);
    }
    report.host_faults = list.host_errors.iter().map(|c| c.code.clone()).collect::<BTreeSet<_>>().into_iter().collect();
    memory.host_errors_alerted = alerted;
}

/// Fills the report of a sweep whose host did not answer, and raises its one alert.
async fn report_host_unreachable(report: &mut SweepReport, error: &HostError, alerts: &dyn AlertSink, now: UnixMillis) {
    warn!(error = %error, "host unreachable; marking nothing");
    report.host_unreachable = true;
    report.host_error = Some(error.to_string());
    let alert = AlertMessage::new(AlertEvent::HostUnreachable { reason: error.to_string() }, now);
    match alerts.send(&alert).await {
        Ok(()) => report.alerts += 1,
        Err(e) => {
            warn!(error = %e, "host-unreachable alert not delivered");
            report.alerts_failed += 1;
        }
    }
}

/// The plan's actions grouped by tenant, tenants in the order they first appear and each tenant's actions in
/// plan order, plus a reconnect for every desired session that is open but has been silent past
/// `silent_after`.
fn actions_per_tenant(
    actions: Vec<Action>,
    desired: &[TenantRecord],
    sessions: &HashMap<&TenantId, &SessionView>,
    silent_after: Option<Duration>,
) -> Vec<(TenantId, Vec<Action>)> {
    let mut groups: Vec<(TenantId, Vec<Action>)> = Vec::new();
    let mut index: HashMap<TenantId, usize> = HashMap::new();
    let mut push = |id: &TenantId, action: Action| {
        let i = *index.entry(id.clone()).or_insert_with(|| {
            groups.push((id.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(action);
    };
    for action in actions {
        let id = match &action {
            Action::Ensure(id)
            | Action::Reconnect(id)
            | Action::WriteStatus(id, _)
            | Action::RecordFailure(id)
            | Action::ResetFailures(id)
            | Action::Alert(id, _) => id.clone(),
        };
        push(&id, action);
    }
    if let Some(limit) = silent_after {
        let limit_ms = limit.as_millis() as u64;
        for record in desired.iter().filter(|r| r.whatsapp_connected) {
            let Some(s) = sessions.get(&record.tenant_id) else { continue };
            if s.state == SessionState::Open && s.last_frame_ago_ms.is_some_and(|ago| ago >= limit_ms) {
                debug!(tenant = %record.tenant_id, silent_ms = s.last_frame_ago_ms, "open but silent; reconnecting");
                push(&record.tenant_id, Action::Reconnect(record.tenant_id.clone()));
            }
        }
    }
    groups
}

/// What one tenant's actions amounted to; summed into the [`SweepReport`].
#[derive(Debug, Default)]
struct ActionCounts {
    status_writes: usize,
    failure_writes: usize,
    reconnect_requested: usize,
    missing_started: usize,
    marked: usize,
    not_holder_skips: usize,
    alerts: usize,
    alerts_failed: usize,
    errors: usize,
}

impl SweepReport {
    /// Adds one tenant's counts.
    fn add(&mut self, c: ActionCounts) {
        self.status_writes += c.status_writes;
        self.failure_writes += c.failure_writes;
        self.reconnect_requested += c.reconnect_requested;
        self.missing_started += c.missing_started;
        self.marked += c.marked;
        self.not_holder_skips += c.not_holder_skips;
        self.alerts += c.alerts;
        self.alerts_failed += c.alerts_failed;
        self.errors += c.errors;
    }
}

/// Carries out tenants' actions against the store, the host and the alert sink of one sweep.
struct TenantActions<'a> {
    tenants: &'a dyn TenantStore,
    host: &'a dyn HostOps,
    alerts: &'a dyn AlertSink,
    sessions: &'a HashMap<&'a TenantId, &'a SessionView>,
    now: UnixMillis,
}

impl TenantActions<'_> {
    /// A status write on behalf of the session it was decided from: conditional on the lease that session
    /// holds (or last held), so a holder that changed since the table was read keeps its record.
    async fn write_status(&self, id: &TenantId, update: &StatusUpdate) -> Result<bool, StoreError> {
        match self.sessions.get(id).and_then(|s| s.lease.as_ref()) {
            Some(lease) => self.tenants.write_status_as_holder(id, &lease.holding(), update, self.now).await,
            None => self.tenants.write_status(id, update, self.now).await,
        }
    }

    /// Carries out one tenant's actions, in plan order. One tenant's failures never stop another's actions.
    async fn carry_out(&self, id: TenantId, actions: Vec<Action>) -> ActionCounts {
        let mut counts = ActionCounts::default();
        // The count the store holds after this sweep's increment; `None` when the increment failed.
        let mut failure_count: Option<u32> = None;
        let mut failure_write_failed = false;
        let mut reconnected = false;
        for action in actions {
            match action {
                Action::WriteStatus(_, update) => match self.write_status(&id, &update).await {
                    Ok(written) => counts.status_writes += usize::from(written),
                    Err(StoreError::Conflict(Conflict::LeaseLost)) => {
                        info!(tenant = %id, "status not written: the session lost the tenant's lease meanwhile");
                        counts.not_holder_skips += 1;
                    }
                    Err(e) => {
                        warn!(tenant = %id, error = %e, "status write failed");
                        counts.errors += 1;
                    }
                },
                Action::RecordFailure(_) => match self.tenants.record_failure(&id).await {
                    Ok(n) => {
                        counts.failure_writes += 1;
                        failure_count = Some(n);
                    }
                    Err(e) => {
                        warn!(tenant = %id, error = %e, "failure count not recorded");
                        counts.errors += 1;
                        failure_write_failed = true;
                    }
                },
                Action::ResetFailures(_) => match self.tenants.reset_failures(&id, self.now).await {
                    Ok(written) => counts.failure_writes += usize::from(written),
                    Err(e) => {
                        warn!(tenant = %id, error = %e, "failure count not reset");
                        counts.errors += 1;
                    }
                },
                Action::Alert(_, reconcile::Alert::Failing { consecutive }) => {
                    // The count did not move: the next sweep decides this alert again, so it is not lost.
                    if failure_write_failed {
                        continue;
                    }
                    let session = self.sessions.get(&id);
                    let event = AlertEvent::TenantFailing {
                        tenant_id: id.clone(),
                        consecutive_failures: failure_count.unwrap_or(consecutive),
                        state: session.map(|s| s.state),
                        reason: session.and_then(|s| s.last_error.clone()),
                    };
                    self.alert(event, &mut counts).await;
                }
                Action::Alert(_, reconcile::Alert::Recovered) => {
                    self.alert(AlertEvent::TenantRecovered { tenant_id: id.clone() }, &mut counts).await;
                }
                Action::Ensure(_) => self.ensure(&id, &mut counts).await,
                Action::Reconnect(_) => {
                    if reconnected {
                        continue;
                    }
                    reconnected = true;
                    self.reconnect(&id, &mut counts).await;
                }
            }
        }
        counts
    }

    /// Asks the host to run the tenant; marks it only on a definitive credentials answer.
    async fn ensure(&self, id: &TenantId, counts: &mut ActionCounts) {
        match self.host.ensure(id).await {
            Ok(EnsureAnswer::Started) => counts.missing_started += 1,
            Ok(EnsureAnswer::AlreadyRunning) => {}
            Ok(answer @ (EnsureAnswer::CredentialsMissing | EnsureAnswer::CredentialsCorrupt)) => {
                let (status, reason) = answer.terminal().expect("definitive answer");
                match mark_terminal(self.tenants, id, status, reason, self.now).await {
                    Ok(written) => {
                        counts.marked += 1;
                        counts.status_writes += usize::from(written);
                        info!(tenant = %id, status = status.as_str(), "tenant marked");
                    }
                    Err(e) => {
                        warn!(tenant = %id, error = %e, "could not mark tenant");
                        counts.errors += 1;
                    }
                }
            }
            Err(e) => {
                // Transient or a configuration problem: never a reason to mark the tenant.
                warn!(tenant = %id, error = %e, "ensure failed");
                counts.errors += 1;
            }
        }
    }

    /// Asks the host to reconnect the tenant's session; a session that ended meanwhile is no error.
    async fn reconnect(&self, id: &TenantId, counts: &mut ActionCounts) {
        match self.host.reconnect(id).await {
            Ok(()) => counts.reconnect_requested += 1,
            Err(HostError::NotFound) => debug!(tenant = %id, "session ended before the reconnect"),
            Err(e) => {
                warn!(tenant = %id, error = %e, "reconnect failed");
                counts.errors += 1;
            }
        }
    }

    async fn alert(&self, event: AlertEvent, counts: &mut ActionCounts) {
        let alert = AlertMessage::new(event, self.now);
        match self.alerts.send(&alert).await {
            Ok(()) => counts.alerts += 1,
            Err(e) => {
                warn!(error = %e, "alert not delivered");
                counts.alerts_failed += 1;
            }
        }
    }
}
