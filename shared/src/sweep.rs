//! The health sweep: the backstop that catches what a host cannot see about itself.
//!
//! Every two minutes (a Lambda function in the cloud, a timer or `socket-host sweep` on one machine) the sweep
//! reads the host's sessions once, reads the desired tenants, lets [`reconcile`](crate::domain::reconcile)
//! decide, and carries the plan out: ensure what should run, reconnect what is stuck, write statuses only when
//! they changed, count consecutive failures and alert past the limit. A host that cannot be reached marks
//! nothing: it raises one alert and the caller fails the run.
//!
//! The I/O is injected: [`HostOps`] (the control API, or the host itself in-process), a [`TenantStore`] and an
//! [`AlertSink`]. [`HostFleet`] routes tenants over several hosts by [`TenantId::shard`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::domain::reconcile::{self, Action, HostView, Policy};
use crate::domain::{
    SessionList, SessionState, SessionView, StatusUpdate, TenantId, TenantRecord, TenantStatus, UnixMillis,
};
use crate::emf::Emf;
use crate::ports::{StoreError, TenantStore};

// ---- the hosts -------------------------------------------------------------------------------------------

/// Why a call to a host failed. Only [`HostError::Unreachable`] is transient; none of them ever marks a
/// tenant (only a definitive [`EnsureAnswer`] does).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// No answer, a timeout, or 5xx after retries.
    #[error("host unreachable: {0}")]
    Unreachable(String),
    /// The host holds no session for the tenant (it ended meanwhile).
    #[error("host has no session for the tenant")]
    NotFound,
    /// The host refused the call (wrong token, bad request): a configuration problem, not the tenant's.
    #[error("host refused the request: {0}")]
    Refused(String),
}

/// What a host answered when asked to run a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnsureAnswer {
    /// The session was started.
    Started,
    /// The session was already running.
    AlreadyRunning,
    /// No stored credentials: definitive, the tenant needs a new link.
    CredentialsMissing,
    /// Stored credentials unusable: definitive, the tenant needs a new link.
    CredentialsCorrupt,
}

impl EnsureAnswer {
    /// The terminal status a definitive answer marks the tenant with, and the reason written with it.
    pub fn terminal(self) -> Option<(TenantStatus, &'static str)> {
        match self {
            EnsureAnswer::CredentialsMissing => Some((TenantStatus::CredentialsMissing, "no stored credentials")),
            EnsureAnswer::CredentialsCorrupt => Some((TenantStatus::CredentialsCorrupt, "stored credentials unusable")),
            EnsureAnswer::Started | EnsureAnswer::AlreadyRunning => None,
        }
    }
}

/// What the sweep and the restore fan-out need from a host: its sessions, and two requests. Implemented for
/// the control-API client ([`crate::host_api::HostClient`], feature `client`) and for [`HostFleet`]; a host
/// can implement it in-process to run the same logic without HTTP.
#[async_trait]
pub trait HostOps: Send + Sync {
    /// Every session the host holds, with its boot id (`GET /v1/sessions`).
    async fn sessions(&self) -> Result<SessionList, HostError>;
    /// Makes sure the tenant's session runs (`PUT /v1/sessions/{id}`).
    async fn ensure(&self, tenant: &TenantId) -> Result<EnsureAnswer, HostError>;
    /// Asks a running session to reconnect at once (`POST /v1/sessions/{id}/reconnect`).
    async fn reconnect(&self, tenant: &TenantId) -> Result<(), HostError>;
}

#[async_trait]
impl<T: HostOps + ?Sized> HostOps for std::sync::Arc<T> {
    async fn sessions(&self) -> Result<SessionList, HostError> {
        (**self).sessions().await
    }
    async fn ensure(&self, tenant: &TenantId) -> Result<EnsureAnswer, HostError> {
        (**self).ensure(tenant).await
    }
    async fn reconnect(&self, tenant: &TenantId) -> Result<(), HostError> {
        (**self).reconnect(tenant).await
    }
}

/// Several hosts seen as one: tenant `t` lives on host `t.shard(n)` (DESIGN.md, scale-out), the same hash the
/// hosts use, so nothing here assumes a single host. With one host it is a plain pass-through.
#[derive(Debug, Clone)]
pub struct HostFleet<H> {
    hosts: Vec<H>,
}

impl<H: HostOps> HostFleet<H> {
    /// A fleet of `hosts`, in shard order. `None` when the list is empty.
    pub fn new(hosts: Vec<H>) -> Option<Self> {
        (!hosts.is_empty()).then_some(Self { hosts })
    }

    /// How many hosts (shards) there are.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Always false: a fleet has at least one host.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The host that owns `tenant`.
    pub fn host_for(&self, tenant: &TenantId) -> &H {
        let n = u32::try_from(self.hosts.len()).unwrap_or(u32::MAX);
        &self.hosts[tenant.shard(n) as usize]
    }
}

#[async_trait]
impl<H: HostOps> HostOps for HostFleet<H> {
    /// Every host's sessions, merged. The boot id is the hosts' boot ids joined with `,`, so a restart of any
    /// host shows as a change. One host not answering fails the whole read: a sweep over a partial view would
    /// ensure that host's tenants elsewhere in vain and report a healthy fleet that is not.
    async fn sessions(&self) -> Result<SessionList, HostError> {
        if let [only] = self.hosts.as_slice() {
            return only.sessions().await;
        }
        let answers = futures_util::future::join_all(self.hosts.iter().map(|h| h.sessions())).await;
        let mut boot_ids = Vec::with_capacity(answers.len());
        let mut sessions = Vec::new();
        for (i, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(list) => {
                    boot_ids.push(list.boot_id);
                    sessions.extend(list.sessions);
                }
                Err(HostError::Unreachable(e)) => return Err(HostError::Unreachable(format!("host {i}: {e}"))),
                Err(e) => return Err(HostError::Refused(format!("host {i}: {e}"))),
            }
        }
        Ok(SessionList { boot_id: boot_ids.join(","), sessions })
    }

    async fn ensure(&self, tenant: &TenantId) -> Result<EnsureAnswer, HostError> {
        self.host_for(tenant).ensure(tenant).await
    }

    async fn reconnect(&self, tenant: &TenantId) -> Result<(), HostError> {
        self.host_for(tenant).reconnect(tenant).await
    }
}

/// Parses `WAKEEPER_HOST_URLS`: a comma-separated list of `http://` or `https://` base URLs, in shard order.
/// The error names the position of a bad entry, not its content.
pub fn parse_host_urls(raw: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = raw.split(',').map(|s| s.trim().trim_end_matches('/').to_owned()).collect();
    if urls.iter().all(|u| u.is_empty()) {
        return Err("no host url given".into());
    }
    for (i, url) in urls.iter().enumerate() {
        let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
        if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
            return Err(format!("host url #{} is not an http(s) URL", i + 1));
        }
    }
    Ok(urls)
}

#[cfg(feature = "client")]
mod client_impl {
    use std::time::Duration;

    use super::*;
    use crate::host_api::{ClientError, EnsureOutcome, HostClient};

    fn host_error(e: ClientError) -> HostError {
        match e {
            ClientError::Unreachable(m) => HostError::Unreachable(m),
            ClientError::NotFound => HostError::NotFound,
            ClientError::Unauthorized => HostError::Refused("unauthorized (check the control token)".into()),
            ClientError::Refused { status, code } => HostError::Refused(format!("{status} {code}")),
        }
    }

    #[async_trait]
    impl HostOps for HostClient {
        async fn sessions(&self) -> Result<SessionList, HostError> {
            HostClient::sessions(self).await.map_err(host_error)
        }

        async fn ensure(&self, tenant: &TenantId) -> Result<EnsureAnswer, HostError> {
            match HostClient::ensure(self, tenant).await.map_err(host_error)? {
                EnsureOutcome::Accepted(a) if a.already_running => Ok(EnsureAnswer::AlreadyRunning),
                EnsureOutcome::Accepted(_) => Ok(EnsureAnswer::Started),
                EnsureOutcome::CredentialsMissing => Ok(EnsureAnswer::CredentialsMissing),
                EnsureOutcome::CredentialsCorrupt => Ok(EnsureAnswer::CredentialsCorrupt),
            }
        }

        async fn reconnect(&self, tenant: &TenantId) -> Result<(), HostError> {
            HostClient::reconnect(self, tenant).await.map(|_| ()).map_err(host_error)
        }
    }

    impl HostFleet<HostClient> {
        /// One control-API client per URL (see [`parse_host_urls`]), all with the same token and per-call
        /// timeout.
        pub fn from_urls(urls: &[String], token: &str, timeout: Duration) -> Result<Self, HostError> {
            let hosts = urls
                .iter()
                .map(|u| HostClient::new(u, token, timeout).map_err(host_error))
                .collect::<Result<Vec<_>, _>>()?;
            Self::new(hosts).ok_or_else(|| HostError::Refused("no host url given".into()))
        }
    }
}

// ---- alerts ----------------------------------------------------------------------------------------------

/// What an alert is about. Serialized with the same `type` names and field names as the host's own webhook
/// events (`socket-host/src/webhooks.rs`), so one receiver handles both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum AlertEvent {
    /// A desired tenant has failed more sweeps in a row than the policy allows.
    #[serde(rename = "alert.failing")]
    TenantFailing {
        /// The tenant.
        tenant_id: TenantId,
        /// Consecutive failed sweeps, this one included.
        consecutive_failures: u32,
        /// The session's state on the host.
        state: Option<SessionState>,
        /// The host's last error for the session, in words (never a secret).
        reason: Option<String>,
    },
    /// A tenant that had alerted is healthy again.
    #[serde(rename = "alert.recovered")]
    TenantRecovered {
        /// The tenant.
        tenant_id: TenantId,
    },
    /// The host (or one host of the fleet) did not answer; nothing was marked.
    #[serde(rename = "alert.host_unreachable")]
    HostUnreachable {
        /// Why, in words.
        reason: String,
    },
}

/// An alert as delivered: the JSON body of a webhook, the message of an SNS notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertMessage {
    /// Unique id: the receiver's idempotency key (also sent as `X-Wakeeper-Event-Id`).
    pub id: String,
    /// Who raised it (`health-sweep`), so a receiver can tell it from the host's own events.
    pub source: String,
    /// When the sweep decided it.
    pub at_ms: UnixMillis,
    /// What happened.
    #[serde(flatten)]
    pub event: AlertEvent,
}

impl AlertMessage {
    /// An alert raised by the sweep at `at_ms`, with a fresh id.
    pub fn new(event: AlertEvent, at_ms: UnixMillis) -> Self {
        let mut raw = [0u8; 12];
        // Without OS randomness the id only needs to differ between alerts of one run.
        if getrandom::fill(&mut raw).is_err() {
            raw[..8].copy_from_slice(&at_ms.to_be_bytes());
        }
        let id = raw.iter().map(|b| format!("{b:02x}")).collect();
        Self { id, source: "health-sweep".into(), at_ms, event }
    }

    /// One line for a person (an SNS subject, an e-mail's first line); at most 100 characters.
    pub fn summary(&self) -> String {
        let mut s = match &self.event {
            AlertEvent::TenantFailing { tenant_id, consecutive_failures, .. } => {
                format!("wakeeper: tenant {tenant_id} failing ({consecutive_failures} sweeps in a row)")
            }
            AlertEvent::TenantRecovered { tenant_id } => format!("wakeeper: tenant {tenant_id} recovered"),
            AlertEvent::HostUnreachable { .. } => "wakeeper: host unreachable".to_owned(),
        };
        s.truncate(100);
        s
    }
}

/// An alert could not be delivered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("alert not delivered: {0}")]
pub struct AlertError(pub String);

/// Where alerts go (a webhook, an SNS topic, the log). Delivery failures are counted by the sweep, never fatal:
/// failing the run would make the scheduler retry it and count every tenant's failure twice.
#[async_trait]
pub trait AlertSink: Send + Sync {
    /// Delivers one alert.
    async fn send(&self, alert: &AlertMessage) -> Result<(), AlertError>;
}

/// Alerts written to the log only: the default when no webhook or topic is configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogAlerts;

#[async_trait]
impl AlertSink for LogAlerts {
    async fn send(&self, alert: &AlertMessage) -> Result<(), AlertError> {
        let body = serde_json::to_string(alert).unwrap_or_default();
        warn!(alert = %body, "{}", alert.summary());
        Ok(())
    }
}

/// Every sink of a list gets every alert; the send fails if any sink failed (the others still got it).
#[derive(Default)]
pub struct AlertFanout {
    sinks: Vec<Box<dyn AlertSink>>,
}

impl AlertFanout {
    /// A fan-out over `sinks`.
    pub fn new(sinks: Vec<Box<dyn AlertSink>>) -> Self {
        Self { sinks }
    }

    /// How many sinks there are.
    pub fn len(&self) -> usize {
        self.sinks.len()
    }

    /// Whether there is no sink at all.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }
}

#[async_trait]
impl AlertSink for AlertFanout {
    async fn send(&self, alert: &AlertMessage) -> Result<(), AlertError> {
        let results = futures_util::future::join_all(self.sinks.iter().map(|s| s.send(alert))).await;
        let failures: Vec<String> = results.into_iter().filter_map(Result::err).map(|e| e.0).collect();
        if failures.is_empty() { Ok(()) } else { Err(AlertError(failures.join("; "))) }
    }
}

// ---- the sweep -------------------------------------------------------------------------------------------

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
}

/// What a sweep did. Serialized as the function's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The host's boot id changed since the previous sweep.
    pub host_restarted: bool,
    /// The host's sessions could not be read (no answer, or a refusal such as a wrong token): nothing was
    /// marked, one alert was raised, and the run should fail.
    pub host_unreachable: bool,
    /// Why the host's sessions could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_error: Option<String>,
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
            warn!(error = %e, "host unreachable; marking nothing");
            report.host_unreachable = true;
            report.host_error = Some(e.to_string());
            let alert = AlertMessage::new(AlertEvent::HostUnreachable { reason: e.to_string() }, now);
            match alerts.send(&alert).await {
                Ok(()) => report.alerts += 1,
                Err(e) => {
                    warn!(error = %e, "host-unreachable alert not delivered");
                    report.alerts_failed += 1;
                }
            }
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
    report.desired = desired.len();
    report.healthy = plan.healthy;
    report.unhealthy = plan.unhealthy;
    report.undesired_running = plan.undesired_running;
    report.host_restarted = plan.host_restarted;
    if plan.host_restarted {
        info!(boot_id = %list.boot_id, "host restarted since the last sweep");
    }

    let sessions: HashMap<&TenantId, &SessionView> = list.sessions.iter().map(|s| (&s.tenant_id, s)).collect();
    let mut groups: Vec<(TenantId, Vec<Action>)> = Vec::new();
    let mut index: HashMap<TenantId, usize> = HashMap::new();
    let mut push = |id: &TenantId, action: Action| {
        let i = *index.entry(id.clone()).or_insert_with(|| {
            groups.push((id.clone(), Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push(action);
    };
    for action in plan.actions {
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
    if let Some(limit) = policy.silent_after {
        let limit_ms = limit.as_millis() as u64;
        for record in desired.iter().filter(|r| r.whatsapp_connected) {
            let Some(s) = sessions.get(&record.tenant_id) else { continue };
            if s.state == SessionState::Open && s.last_frame_ago_ms.is_some_and(|ago| ago >= limit_ms) {
                debug!(tenant = %record.tenant_id, silent_ms = s.last_frame_ago_ms, "open but silent; reconnecting");
                push(&record.tenant_id, Action::Reconnect(record.tenant_id.clone()));
            }
        }
    }

    let ctx = Ctx { tenants, host, alerts, sessions: &sessions, now };
    let tallies: Vec<Tally> = futures_util::stream::iter(groups)
        .map(|(id, actions)| ctx.execute(id, actions))
        .buffer_unordered(policy.concurrency.max(1))
        .collect()
        .await;
    for t in tallies {
        report.status_writes += t.status_writes;
        report.failure_writes += t.failure_writes;
        report.reconnect_requested += t.reconnect_requested;
        report.missing_started += t.missing_started;
        report.marked += t.marked;
        report.alerts += t.alerts;
        report.alerts_failed += t.alerts_failed;
        report.errors += t.errors;
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    info!(
        healthy = report.healthy,
        unhealthy = report.unhealthy,
        reconnect_requested = report.reconnect_requested,
        missing_started = report.missing_started,
        alerts = report.alerts,
        status_writes = report.status_writes,
        errors = report.errors,
        duration_ms = report.duration_ms,
        "sweep done"
    );
    Ok(report)
}

/// What one tenant's actions amounted to.
#[derive(Debug, Default)]
struct Tally {
    status_writes: usize,
    failure_writes: usize,
    reconnect_requested: usize,
    missing_started: usize,
    marked: usize,
    alerts: usize,
    alerts_failed: usize,
    errors: usize,
}

struct Ctx<'a> {
    tenants: &'a dyn TenantStore,
    host: &'a dyn HostOps,
    alerts: &'a dyn AlertSink,
    sessions: &'a HashMap<&'a TenantId, &'a SessionView>,
    now: UnixMillis,
}

impl Ctx<'_> {
    /// Carries out one tenant's actions, in plan order. One tenant's failures never stop another's actions.
    async fn execute(&self, id: TenantId, actions: Vec<Action>) -> Tally {
        let mut t = Tally::default();
        // The count the store holds after this sweep's increment; `None` when the increment failed.
        let mut failure_count: Option<u32> = None;
        let mut failure_write_failed = false;
        let mut reconnected = false;
        for action in actions {
            match action {
                Action::WriteStatus(_, update) => match self.tenants.write_status(&id, &update, self.now).await {
                    Ok(written) => t.status_writes += usize::from(written),
                    Err(e) => {
                        warn!(tenant = %id, error = %e, "status write failed");
                        t.errors += 1;
                    }
                },
                Action::RecordFailure(_) => match self.tenants.record_failure(&id).await {
                    Ok(n) => {
                        t.failure_writes += 1;
                        failure_count = Some(n);
                    }
                    Err(e) => {
                        warn!(tenant = %id, error = %e, "failure count not recorded");
                        t.errors += 1;
                        failure_write_failed = true;
                    }
                },
                Action::ResetFailures(_) => match self.tenants.reset_failures(&id, self.now).await {
                    Ok(written) => t.failure_writes += usize::from(written),
                    Err(e) => {
                        warn!(tenant = %id, error = %e, "failure count not reset");
                        t.errors += 1;
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
                    self.alert(event, &mut t).await;
                }
                Action::Alert(_, reconcile::Alert::Recovered) => {
                    self.alert(AlertEvent::TenantRecovered { tenant_id: id.clone() }, &mut t).await;
                }
                Action::Ensure(_) => match self.host.ensure(&id).await {
                    Ok(EnsureAnswer::Started) => t.missing_started += 1,
                    Ok(EnsureAnswer::AlreadyRunning) => {}
                    Ok(answer @ (EnsureAnswer::CredentialsMissing | EnsureAnswer::CredentialsCorrupt)) => {
                        let (status, reason) = answer.terminal().expect("definitive answer");
                        match mark_terminal(self.tenants, &id, status, reason, self.now).await {
                            Ok(written) => {
                                t.marked += 1;
                                t.status_writes += usize::from(written);
                                info!(tenant = %id, status = status.as_str(), "tenant marked");
                            }
                            Err(e) => {
                                warn!(tenant = %id, error = %e, "could not mark tenant");
                                t.errors += 1;
                            }
                        }
                    }
                    Err(e) => {
                        // Transient or a configuration problem: never a reason to mark the tenant.
                        warn!(tenant = %id, error = %e, "ensure failed");
                        t.errors += 1;
                    }
                },
                Action::Reconnect(_) => {
                    if reconnected {
                        continue;
                    }
                    reconnected = true;
                    match self.host.reconnect(&id).await {
                        Ok(()) => t.reconnect_requested += 1,
                        Err(HostError::NotFound) => debug!(tenant = %id, "session ended before the reconnect"),
                        Err(e) => {
                            warn!(tenant = %id, error = %e, "reconnect failed");
                            t.errors += 1;
                        }
                    }
                }
            }
        }
        t
    }

    async fn alert(&self, event: AlertEvent, t: &mut Tally) {
        let alert = AlertMessage::new(event, self.now);
        match self.alerts.send(&alert).await {
            Ok(()) => t.alerts += 1,
            Err(e) => {
                warn!(error = %e, "alert not delivered");
                t.alerts_failed += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_urls_parse_and_refuse_without_echoing() {
        assert_eq!(
            parse_host_urls(" http://10.0.0.1:8080/ , https://h.example").unwrap(),
            vec!["http://10.0.0.1:8080".to_owned(), "https://h.example".to_owned()]
        );
        assert!(parse_host_urls("").is_err());
        assert!(parse_host_urls(" , ").is_err());
        let err = parse_host_urls("http://ok,ftp://secret-host").unwrap_err();
        assert!(err.contains("#2") && !err.contains("secret"), "{err}");
        assert!(parse_host_urls("http://").is_err());
        assert!(parse_host_urls("http://a,,http://b").is_err());
    }

    #[test]
    fn alert_messages_serialize_flat_and_summarize_briefly() {
        let msg = AlertMessage::new(
            AlertEvent::TenantFailing {
                tenant_id: TenantId::parse("t-1").unwrap(),
                consecutive_failures: 4,
                state: Some(SessionState::Backoff),
                reason: None,
            },
            5,
        );
        let v = serde_json::to_value(&msg).unwrap();
        assert_eq!(v["source"], "health-sweep");
        assert_eq!(v["type"], "alert.failing");
        assert_eq!(v["id"].as_str().unwrap().len(), 24);
        assert_ne!(AlertMessage::new(msg.event.clone(), 5).id, msg.id);
        assert_eq!(v["tenant_id"], "t-1");
        assert_eq!(v["consecutive_failures"], 4);
        assert_eq!(v["state"], "backoff");
        let back: AlertMessage = serde_json::from_value(v).unwrap();
        assert_eq!(back, msg);
        assert!(msg.summary().contains("t-1") && msg.summary().len() <= 100);
    }

    #[test]
    fn definitive_answers_map_to_terminal_statuses() {
        assert_eq!(EnsureAnswer::CredentialsMissing.terminal().unwrap().0, TenantStatus::CredentialsMissing);
        assert_eq!(EnsureAnswer::CredentialsCorrupt.terminal().unwrap().0, TenantStatus::CredentialsCorrupt);
        assert!(EnsureAnswer::Started.terminal().is_none());
        assert!(EnsureAnswer::AlreadyRunning.terminal().is_none());
    }
}
