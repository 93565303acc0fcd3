//! The session's whole life: lease and engine store first, then one connect attempt after another with this
//! host's backoff between them, until a terminal state or a stop ends it.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use wakeeper_shared::domain::{
    Lease, SessionState, SessionView, StateChange, StatusUpdate, TenantId, TenantStatus, now_millis,
};
use wakeeper_shared::host_api::LinkStatus;
use whatsapp_rust::store::traits::Backend;

use super::attempt::Ending;
use super::handle::Command;
use super::handle::LeaseDeadline;
use super::lease::HeldLease;
use super::link::Linking;
use super::marks::TenantWrite;
use super::verdict::Outcome;
use super::{OpenError, SessionDeps};
use crate::messages::ClientSlot;
use crate::transport::LinkProbe;

/// The least wait before a tenant refused for its data key is tried again: only a restart with the right key
/// (or another host taking it) changes the answer.
const KEY_MISMATCH_RETRY: Duration = Duration::from_secs(60);

/// The task that runs one tenant's session.
pub(super) struct Supervisor {
    pub(super) tenant: TenantId,
    pub(super) deps: Arc<SessionDeps>,
    pub(super) view: Arc<Mutex<SessionView>>,
    pub(super) probe: Arc<LinkProbe>,
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
    pub(super) self_tx: mpsc::UnboundedSender<Command>,
    /// Shared with the handle and the lease keeper.
    pub(super) lease_deadline: LeaseDeadline,
    /// The lease the caller took before starting the session (ensure, link); installed when the task starts.
    pub(super) handed: Option<HeldLease>,
    pub(super) lease: Option<Lease>,
    /// Another host's lease as first seen unchanged, and when (this host's monotonic clock): taken over once
    /// it has stayed unchanged for a full lease duration.
    pub(super) watching: Option<(Lease, Instant)>,
    pub(super) lease_keeper: Option<tokio::task::JoinHandle<()>>,
    pub(super) backend: Option<Arc<dyn Backend>>,
    pub(super) failures: u32,
    pub(super) client: ClientSlot,
    /// Set for a link attempt.
    pub(super) link: Option<Linking>,
}

/// How a session's life ends: what the supervisor does last.
pub(super) enum Exit {
    /// A link attempt that never paired ends (see `link_end`).
    LinkEnded { status: LinkStatus, reason: String, reply: Option<oneshot::Sender<()>>, cleanup: bool },
    /// A terminal state is marked.
    Terminal { state: SessionState, reason: String },
    /// Asked to stop (and maybe to log out).
    Stopped { reply: oneshot::Sender<()>, logout: bool },
    /// The lease came free, but its last holder had ended the tenant (logged out, replaced, ...) and it is
    /// no longer desired: end in that state, writing nothing over the holder's mark.
    EndedByHolder { state: SessionState, reason: String },
}

/// After a step of the supervisor: go round again, or end the session.
pub(super) type Flow = ControlFlow<Exit>;

/// What to do after waiting.
pub(super) enum Wake {
    Go,
    Stop(oneshot::Sender<()>, bool),
}

impl Supervisor {
    /// The session's whole life. Every open session holds this future, sized for its largest state, so the
    /// rare paths return boxed futures (`wait`, `acquire_lease`, `lose_lease`, `link_end`, `link_paired`,
    /// `terminal`, `stopped`; in `attempt` the engine's build, logout and hang-up) and take memory only while
    /// they run: 6,144 bytes a session before, 3,392 after (release build, `size_of_val` of the spawned
    /// future), the attempt's part 2,672 to 1,296.
    pub(super) async fn run(mut self) {
        // A lease taken by the caller (ensure, link) is kept alive from here on, like one taken below.
        if let Some(held) = self.handed.take() {
            self.install_lease(held);
        }
        let mut dropped_at: Option<Instant> = None;
        let exit = loop {
            let flow = match self.prepare().await {
                Ok(()) => self.connect_once(&mut dropped_at).await,
                Err(flow) => flow,
            };
            if let ControlFlow::Break(exit) = flow {
                break exit;
            }
        };
        self.finish(exit).await
    }

    /// Gets what an attempt needs: the lease (no lease, no connect), then the engine store hydrated under
    /// this lease's epoch. `Err` when not ready: go round again, or end the session.
    async fn prepare(&mut self) -> Result<(), Flow> {
        if self.linking()
            && let Some((status, reason)) = self.link_precheck()
        {
            return Err(Flow::Break(Exit::LinkEnded { status, reason, reply: None, cleanup: true }));
        }
        if self.lease.is_none() {
            if let Err(wait) = self.acquire_lease().await {
                return Err(self.wait_then(SessionState::Backoff, wait).await);
            }
            if let Some((state, reason)) = self.ended_by_holder().await {
                return Err(Flow::Break(Exit::EndedByHolder { state, reason }));
            }
        }
        if self.backend.is_none() {
            let epoch = self.lease.as_ref().map(|l| l.epoch).unwrap_or_default();
            match self.deps.engines.open(&self.tenant, epoch).await {
                Ok(b) => self.backend = Some(b),
                Err(OpenError::Missing) => {
                    let reason = "no stored credentials".into();
                    return Err(Flow::Break(Exit::Terminal { state: SessionState::CredentialsMissing, reason }));
                }
                Err(OpenError::Corrupt(reason)) => {
                    return Err(Flow::Break(Exit::Terminal { state: SessionState::CredentialsCorrupt, reason }));
                }
                Err(e @ (OpenError::Unavailable(_) | OpenError::LeaseHeld)) => {
                    self.note_error(e.to_string());
                    let delay = self.next_delay(false);
                    return Err(self.wait_then(SessionState::Backoff, delay).await);
                }
                Err(OpenError::KeyMismatch(why)) => {
                    // This host cannot read the tenant; one that holds the key can: let the lease go to it.
                    self.note_error(why);
                    self.let_go_of_lease(true).await;
                    let delay = self.next_delay(false).max(KEY_MISMATCH_RETRY);
                    return Err(self.wait_then(SessionState::Backoff, delay).await);
                }
            }
        }
        Ok(())
    }

    /// One attempt, and what its ending means for the session.
    async fn connect_once(&mut self, dropped_at: &mut Option<Instant>) -> Flow {
        let linking = self.linking();
        self.set_state(if linking { SessionState::Linking } else { SessionState::Connecting }, None);
        let ending = self.attempt(dropped_at).await;
        if linking && self.linking() {
            // Not paired (yet): the attempt's own endings. Nothing is marked in the tenant table.
            return self.after_link_attempt(ending).await;
        }
        let ending = match ending {
            // A 440 seen by a host that has just lost the lease (paused past it, say) is the new holder's
            // connect, not another client: this host lets go instead of ending the tenant.
            Ending::Outcome(Outcome::Terminal { state: SessionState::Replaced, .. })
                if !self.still_holds_lease().await =>
            {
                Ending::LeaseLost
            }
            other => other,
        };
        match ending {
            Ending::Outcome(Outcome::Terminal { state, reason }) => Flow::Break(Exit::Terminal { state, reason }),
            Ending::Stop { reply, logout } => Flow::Break(Exit::Stopped { reply, logout }),
            Ending::Outcome(Outcome::Again | Outcome::LinkExpired) => {
                self.failures = 0;
                dropped_at.get_or_insert_with(Instant::now);
                Flow::Continue(())
            }
            Ending::LeaseLost => {
                self.lose_lease().await;
                self.note_error("lease lost to another host".into());
                dropped_at.get_or_insert_with(Instant::now);
                Flow::Continue(())
            }
            Ending::Outcome(Outcome::TempBan { until, reason }) => {
                self.set_state(SessionState::Banned, Some(reason.clone()));
                self.mark(StatusUpdate {
                    status: TenantStatus::Banned,
                    reason: Some(reason),
                    whatsapp_connected: true,
                });
                let wait = until.saturating_duration_since(Instant::now());
                self.wait_then(SessionState::Banned, wait).await
            }
            Ending::Outcome(Outcome::Retry { reason, rate_limited }) => {
                dropped_at.get_or_insert_with(Instant::now);
                self.note_error(reason);
                metrics::counter!("wakeeper_connects_failed_total", "reason" => if rate_limited { "rate_limited" } else { "transient" }).increment(1);
                let delay = self.next_delay(rate_limited);
                self.wait_then(SessionState::Backoff, delay).await
            }
        }
    }

    /// The session's last step.
    fn finish(self, exit: Exit) -> BoxFuture<'static, ()> {
        match exit {
            Exit::LinkEnded { status, reason, reply, cleanup } => self.link_end(status, reason, reply, cleanup),
            Exit::Terminal { state, reason } => self.terminal(state, reason),
            Exit::Stopped { reply, logout } => self.stopped(reply, logout),
            Exit::EndedByHolder { state, reason } => self.ended_as_marked(state, reason),
        }
    }

    /// The terminal mark the lease's last holder left, when the tenant is no longer desired: a session that
    /// waited for the lease must not take the tenant up again (a logout deleted its credentials on purpose).
    async fn ended_by_holder(&self) -> Option<(SessionState, String)> {
        let record = self.deps.tenants.get(&self.tenant).await.ok()??;
        let status = record.status.filter(|s| s.is_terminal() && !record.whatsapp_connected)?;
        let state = SessionState::ALL.into_iter().find(|s| s.tenant_status() == status)?;
        Some((state, record.reason.unwrap_or_else(|| status.as_str().to_string())))
    }

    fn ended_as_marked(mut self, state: SessionState, reason: String) -> BoxFuture<'static, ()> {
        async move {
            tracing::info!(tenant = %self.tenant, state = state.as_str(), "tenant was ended by the lease's last holder");
            self.set_state(state, Some(reason));
            self.let_go_of_lease(true).await;
        }
        .boxed()
    }

    /// Waits `delay` in `state` (see [`Self::wait`]); a stop request ends the session.
    async fn wait_then(&mut self, state: SessionState, delay: Duration) -> Flow {
        match self.wait(state, delay).await {
            Wake::Go => Flow::Continue(()),
            Wake::Stop(reply, logout) => Flow::Break(Exit::Stopped { reply, logout }),
        }
    }

    /// Waits `delay` in `state`, unless told to reconnect (go now) or stop.
    pub(super) fn wait(&mut self, state: SessionState, delay: Duration) -> BoxFuture<'_, Wake> {
        async move {
            {
                let mut v = self.view.lock().expect("session view lock");
                v.backoff_ms = Some(delay.as_millis() as u64);
            }
            self.set_state(state, None);
            let deadline = tokio::time::sleep(delay);
            tokio::pin!(deadline);
            loop {
                return tokio::select! {
                    _ = &mut deadline => Wake::Go,
                    cmd = self.commands.recv() => match cmd {
                        Some(Command::Reconnect) => { self.failures = 0; Wake::Go }
                        Some(Command::LeaseLost) => { self.lose_lease().await; Wake::Go }
                        Some(Command::Stop { reply, logout }) => Wake::Stop(reply, logout),
                        Some(Command::PairCode { reply, .. }) => {
                            let _ = reply.send(Err("not connected to WhatsApp right now".into()));
                            continue;
                        }
                        None => Wake::Stop(oneshot::channel().0, false),
                    }
                };
            }
        }
        .boxed()
    }

    pub(super) fn next_delay(&mut self, rate_limited: bool) -> Duration {
        let jitter = rand_unit();
        self.deps.config.backoff.delay(self.failures, rate_limited, jitter)
    }

    fn terminal(mut self, state: SessionState, reason: String) -> BoxFuture<'static, ()> {
        async move {
            // A 440 right after a takeover almost always means the old host still runs the number: say so.
            let reason = match state {
                SessionState::Replaced => {
                    let marker = self.deps.engines.import_marker(&self.tenant).await;
                    crate::import::replaced_reason(marker.as_deref()).unwrap_or(reason)
                }
                _ => reason,
            };
            tracing::warn!(tenant = %self.tenant, state = state.as_str(), reason = %reason, "session ended; needs a person");
            self.set_state(state, Some(reason.clone()));
            self.write_now(self.status(StatusUpdate::terminal(state.tenant_status(), reason))).await;
            self.let_go_of_lease(true).await;
        }
        .boxed()
    }

    fn stopped(mut self, reply: oneshot::Sender<()>, logout: bool) -> BoxFuture<'static, ()> {
        async move {
            if logout {
                let reason = "logged out on request".to_string();
                self.set_state(SessionState::LoggedOut, Some(reason.clone()));
                if self.backend.take().is_some() {
                    self.deps.engines.close(&self.tenant).await;
                }
                let deleted = match &self.lease {
                    Some(lease) => self.deps.engines.delete(&self.tenant, lease.epoch).await,
                    None => Err(OpenError::LeaseHeld),
                };
                if let Err(e) = deleted {
                    tracing::error!(tenant = %self.tenant, error = %e, "deleting credentials after logout failed");
                }
                self.write_now(self.status(StatusUpdate::terminal(TenantStatus::LoggedOut, reason))).await;
            } else {
                self.set_state(SessionState::Stopped, None);
            }
            self.let_go_of_lease(true).await;
            let _ = reply.send(());
        }
        .boxed()
    }

    /// Writes a status in the background, retrying until the store takes it (a mark is never lost).
    fn mark(&self, update: StatusUpdate) {
        self.status(update).in_background(self.deps.tenants.clone(), self.tenant.clone());
    }

    /// A status write as the holder of the lease this session holds now.
    fn status(&self, update: StatusUpdate) -> TenantWrite {
        TenantWrite::Status { update, holder: self.lease.clone() }
    }

    pub(super) fn opened(&mut self) {
        let now = now_millis();
        {
            let mut v = self.view.lock().expect("session view lock");
            v.connected_since_ms = Some(now);
            v.backoff_ms = None;
            v.last_error = None;
        }
        self.set_state(SessionState::Open, None);
        self.mark(StatusUpdate { status: TenantStatus::Connected, reason: None, whatsapp_connected: true });
    }

    pub(super) fn note_error(&self, error: String) {
        self.view.lock().expect("session view lock").last_error = Some(error);
    }

    pub(super) fn set_state(&self, state: SessionState, reason: Option<String>) {
        let change = {
            let mut v = self.view.lock().expect("session view lock");
            v.consecutive_failures = self.failures;
            if let Some(r) = &reason {
                v.last_error = Some(r.clone());
            }
            if v.state == state {
                return;
            }
            let from = v.state;
            if from == SessionState::Open {
                v.connected_since_ms = None;
                v.reconnects += 1;
            }
            if state != SessionState::Backoff {
                v.backoff_ms = None;
            }
            v.state = state;
            v.since_ms = now_millis();
            StateChange {
                tenant_id: self.tenant.clone(),
                from,
                to: state,
                reason: reason.or_else(|| v.last_error.clone()),
                consecutive_failures: self.failures,
                at_ms: v.since_ms,
            }
        };
        tracing::debug!(tenant = %self.tenant, from = change.from.as_str(), to = change.to.as_str(), "session state");
        let _ = self.deps.changes.send(change);
    }
}

/// A uniform random number in [0, 1), for jitter.
pub(super) fn rand_unit() -> f64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}
