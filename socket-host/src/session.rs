//! One supervised session per tenant: a task that owns the tenant's lease, its engine store and, one connect
//! attempt at a time, one whatsapp-rust client.
//!
//! The engine's own reconnect loop is switched off: every attempt is made here, so it takes a governor token,
//! follows this host's backoff, and never overlaps the previous client (two clients on one credential set
//! knock each other off and fork the Signal state). A session ends only in a terminal state (written to the
//! tenant table with its reason) or when asked to stop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use wakeeper_shared::domain::{
    BackoffPolicy, Lease, SessionState, SessionView, StatusUpdate, TenantId, TenantStatus, now_millis,
};
use wakeeper_shared::host_api::{LinkStatus, LinkView};
use wakeeper_shared::ports::{Conflict, StoreError, TenantStore};
use whatsapp_rust::Jid;
use whatsapp_rust::bot::Bot;
use whatsapp_rust::store::traits::Backend;
use whatsapp_rust::types::events::{ConnectFailureReason, Event, EventHandler};

use crate::governor::{ConnectPermit, Governor};
use crate::link::LinkCell;
use crate::messages::{ClientSlot, InboundHook, Outgoing};
use crate::transport::{LinkProbe, ReqwestHttpClient, WsTransportFactory};

/// Why a tenant's engine store could not be opened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OpenError {
    /// Nothing stored for the tenant: needs a new link.
    #[error("no stored credentials")]
    Missing,
    /// Stored credentials unusable: needs a new link.
    #[error("stored credentials unusable: {0}")]
    Corrupt(String),
    /// A store could not be reached; try again later.
    #[error("credential store unavailable: {0}")]
    Unavailable(String),
}

/// Opens a tenant's engine store (hydrating its working copy first when needed).
#[async_trait]
pub trait EngineProvider: Send + Sync {
    /// The engine backend of `tenant`, whose writes are replicated under lease `epoch`.
    async fn open(&self, tenant: &TenantId, epoch: u64) -> Result<Arc<dyn Backend>, OpenError>;
    /// Called when the session lets go of its backend (stop, terminal state, lease lost).
    async fn close(&self, _tenant: &TenantId) {}
    /// Deletes every stored credential of the tenant (logout): the remote store, then the local copy.
    async fn delete(&self, tenant: &TenantId) -> Result<(), OpenError>;
    /// The import marker of a tenant taken over from another system (e.g. Baileys), if its state carries one.
    async fn import_marker(&self, _tenant: &TenantId) -> Option<Vec<u8>> {
        None
    }
    /// Deletes the local working copy only (the tenant moved to another host).
    async fn discard_local(&self, _tenant: &TenantId) -> Result<(), OpenError> {
        Ok(())
    }
    /// What the credential store holds for the tenant (decides whether it may be linked anew).
    async fn stored(&self, _tenant: &TenantId) -> Result<Stored, OpenError> {
        Ok(Stored::Missing)
    }
    /// For linking a new number: deletes whatever is stored for the tenant (remote and local; the caller has
    /// decided it is unusable) and opens an engine store over an empty working copy, replicated under `epoch`.
    async fn open_new(&self, _tenant: &TenantId, _epoch: u64) -> Result<Arc<dyn Backend>, OpenError> {
        Err(OpenError::Unavailable("linking is not supported by this engine provider".into()))
    }
    /// Makes every engine write of the tenant durable in the credential store now (ignoring the replication
    /// window) and checks that the stored snapshot restores a device; gives up after `within`.
    async fn persist(&self, _tenant: &TenantId, _within: Duration) -> Result<(), OpenError> {
        Ok(())
    }
}

/// What the credential store holds for a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Nothing.
    Missing,
    /// Something that cannot bring a device online (undecryptable, partial, never paired).
    Unusable,
    /// A complete snapshot: the tenant connects without pairing.
    Restorable,
}

/// Settings of every session of a host.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// WhatsApp Web WebSocket URL.
    pub wa_url: String,
    /// This host's id (lease owner).
    pub host_id: String,
    /// How long a lease lasts unless renewed; renewed every third of it.
    pub lease_ttl: Duration,
    /// Reconnect backoff.
    pub backoff: BackoffPolicy,
    /// Longest a handshake may hold a governor slot.
    pub handshake_timeout: Duration,
    /// WhatsApp Web version announced (skips the version look-up over HTTPS).
    pub app_version: (u32, u32, u32),
    /// An open link that has received nothing for this long is dead (half-open): the engine pings an idle
    /// link at least every 30 s, so a healthy one never stays silent this long. Replaced at once.
    pub silent_after: Duration,
    /// Longest a link attempt waits for the phone. WhatsApp's QR codes run out after about 160 s (the engine
    /// then disconnects); a pairing code stays valid about 180 s from when it was asked for.
    pub link_timeout: Duration,
}

impl SessionConfig {
    /// Defaults for a host with this id talking to `wa_url`.
    pub fn new(wa_url: impl Into<String>, host_id: impl Into<String>) -> Self {
        Self {
            wa_url: wa_url.into(),
            host_id: host_id.into(),
            lease_ttl: Duration::from_secs(30),
            backoff: BackoffPolicy::default(),
            handshake_timeout: Duration::from_secs(20),
            app_version: (2, 3000, 1_023_000_000),
            silent_after: Duration::from_secs(45),
            link_timeout: Duration::from_secs(300),
        }
    }
}

/// A session changed state (for webhooks, metrics and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// The tenant.
    pub tenant_id: TenantId,
    /// Previous state.
    pub from: SessionState,
    /// New state.
    pub to: SessionState,
    /// Why, in words (never a secret).
    pub reason: Option<String>,
    /// Consecutive failures at the time of the change.
    pub consecutive_failures: u32,
    /// When.
    pub at_ms: i64,
}

/// What every session of a host shares.
pub struct SessionDeps {
    /// The tenant table (leases, status marks).
    pub tenants: Arc<dyn TenantStore>,
    /// Opens engine stores.
    pub engines: Arc<dyn EngineProvider>,
    /// Paces connect attempts.
    pub governor: Arc<Governor>,
    /// Settings.
    pub config: SessionConfig,
    /// State changes are published here.
    pub changes: broadcast::Sender<StateChange>,
    /// Where received messages go before the engine acknowledges them (none: no message webhooks configured,
    /// and the engine acknowledges on decryption).
    pub outbox: std::sync::OnceLock<crate::outbox::Outbox>,
    /// The engine's HTTP client, shared by every session (one pool, one TLS configuration).
    pub http: ReqwestHttpClient,
}

/// Something asked of a running session.
#[derive(Debug)]
enum Command {
    Reconnect,
    Stop {
        reply: oneshot::Sender<()>,
        logout: bool,
    },
    LeaseLost,
    /// Ask WhatsApp for a pairing code for this phone number (link attempts only).
    PairCode {
        phone: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
}

/// The handle the host keeps for a session.
#[derive(Clone)]
pub struct SessionHandle {
    tenant: TenantId,
    view: Arc<Mutex<SessionView>>,
    probe: Arc<LinkProbe>,
    commands: mpsc::UnboundedSender<Command>,
    finished: Arc<AtomicBool>,
    client: ClientSlot,
    sends: Option<mpsc::Sender<Outgoing>>,
    /// Set when the session was started to link a new number.
    link: Option<LinkCell>,
}

/// Why a send was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendRefused {
    /// The session is not open.
    NotOpen,
    /// Too many sends are already waiting on this session.
    QueueFull,
}

impl SessionHandle {
    /// The session as the control API shows it.
    pub fn view(&self) -> SessionView {
        let mut v = self.view.lock().expect("session view lock").clone();
        let last = self.probe.last_frame_ms();
        v.last_frame_ago_ms = (last > 0).then(|| now_millis().saturating_sub(last).max(0) as u64);
        v
    }

    /// The current state.
    pub fn state(&self) -> SessionState {
        self.view.lock().expect("session view lock").state
    }

    /// The tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// Whether the supervisor task has ended (terminal state or stopped).
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// Asks for an immediate reconnect (resets the backoff).
    pub fn reconnect(&self) -> bool {
        self.commands.send(Command::Reconnect).is_ok()
    }

    /// Tells the session its lease (or replication fence) was lost: the client stops before anything else.
    pub fn lease_lost(&self) {
        let _ = self.commands.send(Command::LeaseLost);
    }

    /// Accepts a text for sending on the open session: picks its message id now and hands it to the session's
    /// sender task, which shows "typing..." for `typing` first. Returns the message id.
    pub fn queue_text(&self, to: Jid, text: String, typing: Duration) -> Result<String, SendRefused> {
        let client = crate::messages::open_client(&self.client, &self.view).ok_or(SendRefused::NotOpen)?;
        let sends = self.sends.as_ref().ok_or(SendRefused::NotOpen)?;
        let message_id = client.generate_message_id();
        let out = Outgoing { to, text, message_id: message_id.clone(), typing, accepted: Instant::now() };
        sends.try_send(out).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendRefused::QueueFull,
            mpsc::error::TrySendError::Closed(_) => SendRefused::NotOpen,
        })?;
        Ok(message_id)
    }

    /// Stops the client and waits until it is down; the lease is released.
    pub async fn stop(&self) {
        self.stop_with(false).await;
    }

    /// Logs the device out (unlinks it from the phone when connected), deletes its credentials and marks the
    /// tenant logged out. Waits until done.
    pub async fn logout(&self) {
        self.stop_with(true).await;
    }

    /// Whether this session is a link attempt still waiting for the phone.
    pub fn is_linking(&self) -> bool {
        !self.is_finished() && self.link.as_ref().is_some_and(|l| l.borrow().is_waiting())
    }

    /// The link attempt this session was started for, if any.
    pub fn link_view(&self) -> Option<LinkView> {
        let state = self.state();
        self.link.as_ref().map(|l| l.borrow().view(&self.tenant, state))
    }

    /// Waits (up to `limit`) until the link attempt shows a QR code or has ended. `false` on the limit.
    pub async fn wait_for_qr(&self, limit: Duration) -> bool {
        let Some(cell) = &self.link else { return true };
        let mut rx = cell.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|i| i.qr.is_some() || !i.is_waiting())).await.is_ok()
    }

    /// Asks WhatsApp for a pairing code for `phone` over the link attempt's connection; a code already handed
    /// out is returned as it is (WhatsApp allows one at a time).
    pub async fn request_pair_code(&self, phone: String) -> Result<String, String> {
        let Some(cell) = &self.link else { return Err("not a link attempt".into()) };
        if let Some(code) = cell.borrow().pairing_code.clone() {
            return Ok(code);
        }
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::PairCode { phone, reply }).map_err(|_| "the link attempt has ended".to_string())?;
        answer.await.unwrap_or_else(|_| Err("the link attempt has ended".into()))
    }

    async fn stop_with(&self, logout: bool) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Stop { reply, logout }).is_ok() {
            let _ = done.await;
        }
    }
}

/// Starts supervising `tenant`. `lease` and `backend` are what the caller already obtained (an `ensure`
/// hydrates up front to answer definitive credential problems at once); the task gets whatever is missing.
pub fn spawn(
    tenant: TenantId,
    deps: Arc<SessionDeps>,
    lease: Option<Lease>,
    backend: Option<Arc<dyn Backend>>,
) -> SessionHandle {
    start(tenant, deps, lease, backend, None)
}

/// Starts a link attempt for `tenant`: `lease` is held and `backend` is an engine store over an empty working
/// copy ([`EngineProvider::open_new`]). The session shows QR codes in state `linking` until the phone confirms;
/// then the credentials are made durable in the credential store before anything else (the tenant is marked
/// desired, the session goes on as a normal one and reaches `open`). Never scanned, cancelled or failed, the
/// attempt ends `stopped` and the unpaired keys are deleted.
pub fn spawn_link(tenant: TenantId, deps: Arc<SessionDeps>, lease: Lease, backend: Arc<dyn Backend>) -> SessionHandle {
    start(tenant, deps, Some(lease), Some(backend), Some(crate::link::new_cell()))
}

fn start(
    tenant: TenantId,
    deps: Arc<SessionDeps>,
    lease: Option<Lease>,
    backend: Option<Arc<dyn Backend>>,
    link: Option<LinkCell>,
) -> SessionHandle {
    let now = now_millis();
    let link_deadline = Instant::now() + deps.config.link_timeout;
    let view = Arc::new(Mutex::new(SessionView {
        tenant_id: tenant.clone(),
        state: if link.is_some() { SessionState::Linking } else { SessionState::Connecting },
        since_ms: now,
        connected_since_ms: None,
        last_frame_ago_ms: None,
        reconnects: 0,
        consecutive_failures: 0,
        backoff_ms: None,
        last_error: None,
    }));
    let (tx, rx) = mpsc::unbounded_channel();
    let client: ClientSlot = Arc::default();
    let (sends, queue) = mpsc::channel(crate::messages::SEND_QUEUE);
    // Ends when the last handle is gone (the sender side is only in handles).
    tokio::spawn(crate::messages::run_sender(tenant.clone(), client.clone(), view.clone(), queue));
    let handle = SessionHandle {
        tenant: tenant.clone(),
        view: view.clone(),
        probe: Arc::new(LinkProbe::default()),
        commands: tx.clone(),
        finished: Arc::new(AtomicBool::new(false)),
        client: client.clone(),
        sends: Some(sends),
        link: link.clone(),
    };
    let sup = Supervisor {
        tenant,
        deps,
        view,
        probe: handle.probe.clone(),
        commands: rx,
        self_tx: tx,
        lease,
        lease_keeper: None,
        backend,
        failures: 0,
        client,
        link: link.map(|cell| Linking { cell, deadline: link_deadline, paired: false, just_paired: false }),
    };
    let finished = handle.finished.clone();
    tokio::spawn(async move {
        sup.run().await;
        finished.store(true, Ordering::Release);
    });
    metrics::counter!("wakeeper_sessions_started_total").increment(1);
    handle
}

/// A handle whose session never started: its state is already terminal (e.g. credentials missing at ensure).
pub fn finished(tenant: TenantId, state: SessionState, reason: String) -> SessionHandle {
    let (tx, _rx) = mpsc::unbounded_channel();
    SessionHandle {
        view: Arc::new(Mutex::new(SessionView {
            tenant_id: tenant.clone(),
            state,
            since_ms: now_millis(),
            connected_since_ms: None,
            last_frame_ago_ms: None,
            reconnects: 0,
            consecutive_failures: 0,
            backoff_ms: None,
            last_error: Some(reason),
        })),
        tenant,
        probe: Arc::new(LinkProbe::default()),
        commands: tx,
        finished: Arc::new(AtomicBool::new(true)),
        client: Arc::default(),
        sends: None,
        link: None,
    }
}

/// How one connect attempt ended.
#[derive(Debug)]
enum Ending {
    /// A terminal state: mark the tenant, stop supervising.
    Terminal { state: SessionState, reason: String },
    /// A temporary ban: wait it out.
    TempBan { until: Instant, reason: String },
    /// The link went down or never came up: back off and retry.
    Retry { reason: String, rate_limited: bool },
    /// Asked to reconnect (or 515): again at once.
    Again,
    /// The lease is gone: let go, take it again before the next attempt.
    LeaseLost,
    /// Asked to stop (and maybe to log out).
    Stop { reply: oneshot::Sender<()>, logout: bool },
    /// A link attempt's QR codes ran out (nobody scanned), or its time is up.
    LinkExpired,
}

/// The engine's lifecycle events, as the supervisor needs them.
#[derive(Debug)]
enum Signal {
    Connected,
    Disconnected(String),
    LoggedOut(String),
    Replaced,
    TempBan { expire: Duration, code: String },
    ConnectFailure { code: i32, logged_out: bool },
    StreamError(String),
    Qr { code: String, valid_for: Duration },
    Paired { jid: String },
    PairFailed(String),
    QrExhausted { disconnected: bool },
}

struct SignalHandler {
    tx: mpsc::UnboundedSender<Signal>,
}

impl EventHandler for SignalHandler {
    fn handle_event(&self, event: Arc<Event>) {
        let signal = match &*event {
            Event::Connected(_) => Signal::Connected,
            Event::Disconnected(d) => Signal::Disconnected(d.reason.to_string()),
            Event::LoggedOut(l) => Signal::LoggedOut(format!("logged out ({})", reason_code(&l.reason))),
            Event::StreamReplaced(_) => Signal::Replaced,
            Event::TemporaryBan(b) => {
                Signal::TempBan { expire: b.expire.to_std().unwrap_or_default(), code: format!("{:?}", b.code) }
            }
            Event::ConnectFailure(f) => {
                Signal::ConnectFailure { code: reason_code(&f.reason), logged_out: f.reason.is_logged_out() }
            }
            Event::StreamError(e) => Signal::StreamError(e.code.clone()),
            Event::PairingQrCode(q) => Signal::Qr { code: q.code.clone(), valid_for: q.timeout },
            Event::PairSuccess(p) => Signal::Paired { jid: p.id.to_string() },
            Event::PairError(e) => Signal::PairFailed(e.error.clone()),
            Event::PairingQrCodesExhausted(x) => Signal::QrExhausted { disconnected: x.disconnected },
            _ => return,
        };
        let _ = self.tx.send(signal);
    }
}

fn reason_code(reason: &ConnectFailureReason) -> i32 {
    match reason {
        ConnectFailureReason::Generic => 400,
        ConnectFailureReason::LoggedOut => 401,
        ConnectFailureReason::TempBanned => 402,
        ConnectFailureReason::AccountLocked => 403,
        ConnectFailureReason::ClientOutdated => 405,
        ConnectFailureReason::UnknownLogout => 406,
        ConnectFailureReason::BadUserAgent => 409,
        ConnectFailureReason::CatExpired => 413,
        ConnectFailureReason::CatInvalid => 414,
        ConnectFailureReason::NotFound => 415,
        ConnectFailureReason::ClientUnknown => 418,
        ConnectFailureReason::InternalServerError => 500,
        ConnectFailureReason::Experimental => 501,
        ConnectFailureReason::ServiceUnavailable => 503,
        ConnectFailureReason::Unknown(c) => *c,
    }
}

struct Supervisor {
    tenant: TenantId,
    deps: Arc<SessionDeps>,
    view: Arc<Mutex<SessionView>>,
    probe: Arc<LinkProbe>,
    commands: mpsc::UnboundedReceiver<Command>,
    self_tx: mpsc::UnboundedSender<Command>,
    lease: Option<Lease>,
    lease_keeper: Option<tokio::task::JoinHandle<()>>,
    backend: Option<Arc<dyn Backend>>,
    failures: u32,
    client: ClientSlot,
    /// Set for a link attempt.
    link: Option<Linking>,
}

/// Empties the session's client slot when a connect attempt ends, however it ends.
struct SlotGuard(ClientSlot);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        *self.0.lock().expect("client slot lock") = None;
    }
}

/// A link attempt's part of the supervisor.
struct Linking {
    cell: LinkCell,
    /// The attempt ends `expired` here unless paired.
    deadline: Instant,
    /// The phone confirmed and the credentials are durable: from here on a normal session.
    paired: bool,
    /// Paired, and not yet open once: replication is flushed again before `open` is shown.
    just_paired: bool,
}

/// What to do after waiting.
enum Wake {
    Go,
    Stop(oneshot::Sender<()>, bool),
}

impl Supervisor {
    /// The session's whole life. Every open session holds this future, sized for its largest state, so the
    /// rare paths return boxed futures (`wait`, `acquire_lease`, `lose_lease`, `link_end`, `link_paired`,
    /// `terminal`, `stopped`; in `attempt` the engine's build, logout and hang-up) and take memory only while
    /// they run: 6,144 bytes a session before, 3,392 after (release build, `size_of_val` of the spawned
    /// future), the attempt's part 2,672 to 1,296.
    async fn run(mut self) {
        // A lease taken by the caller (ensure) is kept alive from here on, like one taken below.
        if let Some(lease) = self.lease.clone() {
            self.install_lease(lease);
        }
        let mut dropped_at: Option<Instant> = None;
        loop {
            if self.linking() {
                if let Some(ended) = self.link_precheck() {
                    let (status, reason) = ended;
                    return self.link_end(status, reason, None, true).await;
                }
            }
            // 1. The lease: no lease, no connect.
            if self.lease.is_none() {
                match self.acquire_lease().await {
                    Ok(()) => {}
                    Err(wait) => {
                        if let Wake::Stop(reply, logout) = self.wait(SessionState::Backoff, wait).await {
                            return self.stopped(reply, logout).await;
                        }
                        continue;
                    }
                }
            }
            // 2. The engine store, hydrated under this lease's epoch.
            if self.backend.is_none() {
                let epoch = self.lease.as_ref().map(|l| l.epoch).unwrap_or_default();
                match self.deps.engines.open(&self.tenant, epoch).await {
                    Ok(b) => self.backend = Some(b),
                    Err(OpenError::Missing) => {
                        return Box::pin(
                            self.terminal(SessionState::CredentialsMissing, "no stored credentials".into()),
                        )
                        .await;
                    }
                    Err(OpenError::Corrupt(why)) => {
                        return self.terminal(SessionState::CredentialsCorrupt, why).await;
                    }
                    Err(e @ OpenError::Unavailable(_)) => {
                        self.note_error(e.to_string());
                        let delay = self.next_delay(false);
                        if let Wake::Stop(reply, logout) = self.wait(SessionState::Backoff, delay).await {
                            return self.stopped(reply, logout).await;
                        }
                        continue;
                    }
                }
            }
            // 3. One attempt.
            let linking = self.linking();
            self.set_state(if linking { SessionState::Linking } else { SessionState::Connecting }, None);
            let ending = self.attempt(&mut dropped_at).await;
            if linking && self.linking() {
                // Not paired (yet): the attempt's own endings. Nothing is marked in the tenant table.
                match ending {
                    Ending::Stop { reply, .. } => {
                        return self
                            .link_end(LinkStatus::Cancelled, "cancelled on request".into(), Some(reply), true)
                            .await;
                    }
                    Ending::LinkExpired => {
                        let reason = "no QR code was scanned in time".to_string();
                        return self.link_end(LinkStatus::Expired, reason, None, true).await;
                    }
                    Ending::Terminal { reason, .. } | Ending::TempBan { reason, .. } => {
                        return self.link_end(LinkStatus::Failed, reason, None, true).await;
                    }
                    Ending::LeaseLost => {
                        // Another host owns the tenant now: what is stored is its business, not ours to delete.
                        self.lose_lease().await;
                        let reason = "lease lost to another host".to_string();
                        return self.link_end(LinkStatus::Failed, reason, None, false).await;
                    }
                    Ending::Retry { reason, rate_limited } => {
                        // The connection went before the phone confirmed: a new one hands out new QR codes.
                        self.note_error(reason);
                        self.link_update(|i| i.clear_qr());
                        let left = self.link.as_ref().map_or(Duration::ZERO, |l| l.deadline - Instant::now());
                        let delay = self.next_delay(rate_limited).min(left);
                        if let Wake::Stop(reply, _) = self.wait(SessionState::Linking, delay).await {
                            let reason = "cancelled on request".to_string();
                            return self.link_end(LinkStatus::Cancelled, reason, Some(reply), true).await;
                        }
                    }
                    Ending::Again => {}
                }
                continue;
            }
            match ending {
                Ending::Terminal { state, reason } => return self.terminal(state, reason).await,
                Ending::Stop { reply, logout } => return self.stopped(reply, logout).await,
                Ending::Again | Ending::LinkExpired => {
                    self.failures = 0;
                    dropped_at.get_or_insert_with(Instant::now);
                }
                Ending::LeaseLost => {
                    self.lose_lease().await;
                    self.note_error("lease lost to another host".into());
                    dropped_at.get_or_insert_with(Instant::now);
                }
                Ending::TempBan { until, reason } => {
                    self.set_state(SessionState::Banned, Some(reason.clone()));
                    self.mark(StatusUpdate {
                        status: TenantStatus::Banned,
                        reason: Some(reason),
                        whatsapp_connected: true,
                    });
                    let wait = until.saturating_duration_since(Instant::now());
                    if let Wake::Stop(reply, logout) = self.wait(SessionState::Banned, wait).await {
                        return self.stopped(reply, logout).await;
                    }
                }
                Ending::Retry { reason, rate_limited } => {
                    dropped_at.get_or_insert_with(Instant::now);
                    self.note_error(reason);
                    metrics::counter!("wakeeper_connects_failed_total", "reason" => if rate_limited { "rate_limited" } else { "transient" }).increment(1);
                    let delay = self.next_delay(rate_limited);
                    if let Wake::Stop(reply, logout) = self.wait(SessionState::Backoff, delay).await {
                        return self.stopped(reply, logout).await;
                    }
                }
            }
        }
    }

    /// Whether this is a link attempt still waiting for the phone.
    fn linking(&self) -> bool {
        self.link.as_ref().is_some_and(|l| !l.paired)
    }

    /// A link attempt that cannot go on: out of time, or without its lease or engine store.
    fn link_precheck(&self) -> Option<(LinkStatus, String)> {
        let link = self.link.as_ref()?;
        if Instant::now() >= link.deadline {
            return Some((LinkStatus::Expired, "no QR code was scanned in time".into()));
        }
        if self.lease.is_none() || self.backend.is_none() {
            return Some((LinkStatus::Failed, "the link attempt lost its lease".into()));
        }
        None
    }

    fn link_update(&self, f: impl FnOnce(&mut crate::link::LinkInfo)) {
        if let Some(l) = &self.link {
            l.cell.send_modify(f);
        }
    }

    /// Ends a link attempt that never paired: the session is `stopped` with `reason`, the unpaired keys are
    /// deleted (unless another host owns the tenant now), the lease is released. Nothing is written to the
    /// tenant table: whatever it said about the tenant before still holds.
    fn link_end(
        mut self,
        status: LinkStatus,
        reason: String,
        reply: Option<oneshot::Sender<()>>,
        cleanup: bool,
    ) -> BoxFuture<'static, ()> {
        async move {
            tracing::info!(tenant = %self.tenant, status = ?status, reason = %reason, "link attempt ended");
            metrics::counter!("wakeeper_links_ended_total", "status" => format!("{status:?}").to_lowercase()).increment(1);
            self.link_update(|i| {
                i.status = status;
                i.error = Some(reason.clone());
                i.clear_qr();
            });
            self.set_state(SessionState::Stopped, Some(reason));
            if self.backend.take().is_some() {
                self.deps.engines.close(&self.tenant).await;
            }
            if cleanup && self.lease.is_some() {
                // Let replication drain first, so no commit still in flight recreates what is deleted.
                let _ = self.deps.engines.persist(&self.tenant, Duration::from_secs(5)).await;
                if let Err(e) = self.deps.engines.delete(&self.tenant).await {
                    tracing::warn!(tenant = %self.tenant, error = %e, "could not delete the keys of an unpaired link attempt");
                }
            }
            self.let_go_of_lease(true).await;
            if let Some(reply) = reply {
                let _ = reply.send(());
            }
        }
        .boxed()
    }

    /// The phone confirmed the link: the engine's device record is saved to the working copy, and everything
    /// the engine wrote is made durable in the credential store before the tenant is marked anywhere. Retried
    /// until it holds (a stop request ends the wait).
    fn link_paired<'a>(
        &'a mut self,
        client: &'a Arc<whatsapp_rust::Client>,
        jid: String,
    ) -> BoxFuture<'a, Result<(), Ending>> {
        async move {
            tracing::info!(tenant = %self.tenant, "phone confirmed the link; storing the credentials");
            let mut delay = Duration::from_millis(200);
            loop {
                let saved = client.persistence_manager().flush().await.map_err(|e| e.to_string());
                let stored = match saved {
                    Ok(()) => {
                        self.deps.engines.persist(&self.tenant, Duration::from_secs(10)).await.map_err(|e| e.to_string())
                    }
                    Err(e) => Err(format!("saving the device record: {e}")),
                };
                match stored {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(tenant = %self.tenant, error = %e, "credentials of the new link not stored yet; retrying");
                        self.note_error(format!("storing the new link's credentials: {e}"));
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    cmd = self.commands.recv() => match cmd {
                        Some(Command::PairCode { reply, .. }) => { let _ = reply.send(Err("already paired".into())); }
                        Some(Command::Reconnect) | Some(Command::LeaseLost) | None | Some(Command::Stop { .. }) => {
                            return Err(self.on_idle_command(cmd));
                        }
                    }
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            if let Some(l) = self.link.as_mut() {
                l.paired = true;
                l.just_paired = true;
            }
            self.link_update(|i| {
                i.status = LinkStatus::Paired;
                i.device_jid = Some(jid);
                i.error = None;
                i.clear_qr();
            });
            metrics::counter!("wakeeper_links_ended_total", "status" => "paired").increment(1);
            tracing::info!(tenant = %self.tenant, "new link stored durably; the tenant is now desired");
            self.mark_desired().await;
            Ok(())
        }
        .boxed()
    }

    /// Writes the desired flag now; if the store is unavailable, keeps retrying in the background.
    async fn mark_desired(&self) {
        match self.deps.tenants.set_desired(&self.tenant, true).await {
            Ok(()) => return,
            Err(e) if !e.is_transient() => {
                tracing::error!(tenant = %self.tenant, error = %e, "desired flag write refused");
                return;
            }
            Err(_) => {}
        }
        let tenants = self.deps.tenants.clone();
        let tenant = self.tenant.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match tenants.set_desired(&tenant, true).await {
                    Ok(()) => return,
                    Err(e) if e.is_transient() => {
                        tracing::warn!(tenant = %tenant, error = %e, "desired flag write failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                    Err(e) => {
                        tracing::error!(tenant = %tenant, error = %e, "desired flag write refused");
                        return;
                    }
                }
            }
        });
    }

    /// One client, one connection, until it ends.
    async fn attempt(&mut self, dropped_at: &mut Option<Instant>) -> Ending {
        let deps = self.deps.clone();
        let permit: ConnectPermit = loop {
            tokio::select! {
                p = deps.governor.acquire() => break p,
                cmd = self.commands.recv() => match cmd {
                    Some(Command::PairCode { reply, .. }) => {
                        let _ = reply.send(Err("not connected to WhatsApp yet".into()));
                    }
                    other => return self.on_idle_command(other),
                },
            }
        };
        metrics::counter!("wakeeper_connects_attempted_total").increment(1);
        let backend = self.backend.clone().expect("backend opened before an attempt");
        let factory = WsTransportFactory::new(deps.config.wa_url.as_str()).with_probe(self.probe.clone());
        let mut builder = Bot::builder()
            .with_backend_arc(backend)
            .with_transport_factory(factory)
            .with_http_client(deps.http.clone())
            .with_version(deps.config.app_version);
        if let Some(outbox) = deps.outbox.get() {
            // Received messages reach the outbox before the engine acknowledges them to WhatsApp.
            builder = builder.with_inbound_durability_hook(InboundHook::new(self.tenant.clone(), outbox.clone()));
        }
        let built = Box::pin(builder.build()).await;
        let bot = match built {
            Ok(b) => b,
            Err(e) => {
                // The store passed the completeness check when it was opened, so this is most likely a passing
                // I/O failure: never a reason to mark the tenant.
                self.failures = self.failures.saturating_add(1);
                return Ending::Retry { reason: format!("engine could not start: {e}"), rate_limited: false };
            }
        };
        let client = bot.client();
        client.enable_auto_reconnect.store(false, Ordering::Relaxed);
        *self.client.lock().expect("client slot lock") = Some(client.clone());
        let _slot = SlotGuard(self.client.clone());
        let (tx, mut signals) = mpsc::unbounded_channel();
        let _subscription = client.subscribe_handler(Arc::new(SignalHandler { tx }));
        let mut run = bot.spawn();
        let mut permit = Some(permit);
        let handshake_deadline = Instant::now() + deps.config.handshake_timeout;
        let mut connected_at: Option<Instant> = None;
        let mut verdict: Option<Ending> = None;
        let mut last_reason: Option<String> = None;
        let mut stream_error: Option<String> = None;
        let mut rate_limited = false;
        let mut watchdog = tokio::time::interval(Duration::from_secs(1).min(deps.config.silent_after / 4));
        let link_deadline = self.link.as_ref().filter(|l| !l.paired).map(|l| l.deadline);
        loop {
            tokio::select! {
                _ = &mut run => break,
                _ = tokio::time::sleep_until(link_deadline.unwrap_or_else(Instant::now)), if link_deadline.is_some() && self.linking() => {
                    Box::pin(client.disconnect()).await;
                    (&mut run).await;
                    return Ending::LinkExpired;
                }
                _ = watchdog.tick(), if connected_at.is_some() => {
                    let silent_ms = now_millis().saturating_sub(self.probe.last_frame_ms());
                    if silent_ms >= deps.config.silent_after.as_millis() as i64 {
                        tracing::warn!(tenant = %self.tenant, silent_ms, "link silent: treating it as half-open");
                        metrics::counter!("wakeeper_half_open_detected_total").increment(1);
                        Box::pin(client.disconnect()).await;
                        (&mut run).await;
                        return Ending::Retry { reason: format!("no frame for {} s (half-open link)", silent_ms / 1000), rate_limited: false };
                    }
                }
                Some(signal) = signals.recv() => match signal {
                    Signal::Connected => {
                        permit = None;
                        connected_at = Some(Instant::now());
                        if let Some(l) = self.link.as_mut().filter(|l| l.just_paired) {
                            // The first login of a new link: what the engine wrote while logging in (pre-keys it
                            // uploaded) is made durable before `open` is shown to anyone.
                            l.just_paired = false;
                            if let Err(e) = deps.engines.persist(&self.tenant, Duration::from_secs(5)).await {
                                tracing::warn!(tenant = %self.tenant, error = %e, "first login of a new link not fully replicated yet");
                            }
                        }
                        if let Some(t) = dropped_at.take() {
                            metrics::histogram!("wakeeper_reconnect_seconds").record(t.elapsed().as_secs_f64());
                        }
                        metrics::counter!("wakeeper_connects_succeeded_total").increment(1);
                        self.opened();
                    }
                    Signal::Disconnected(reason) => last_reason = Some(reason),
                    Signal::LoggedOut(reason) => verdict = Some(Ending::Terminal { state: SessionState::LoggedOut, reason }),
                    Signal::Replaced => verdict = Some(Ending::Terminal {
                        state: SessionState::Replaced,
                        reason: "replaced: another client took over this number (440 conflict)".into(),
                    }),
                    Signal::TempBan { expire, code } => verdict = Some(Ending::TempBan {
                        until: Instant::now() + expire,
                        reason: format!("temporarily banned ({code}) for {}s", expire.as_secs()),
                    }),
                    Signal::ConnectFailure { code, logged_out } => {
                        verdict = Some(match code {
                            _ if logged_out => Ending::Terminal { state: SessionState::LoggedOut, reason: format!("logged out ({code})") },
                            402 | 406 => Ending::Terminal { state: SessionState::Banned, reason: format!("banned ({code})") },
                            429 => { rate_limited = true; Ending::Retry { reason: "rate limited (429)".into(), rate_limited: true } }
                            _ => Ending::Retry { reason: format!("connect refused ({code})"), rate_limited: false },
                        });
                    }
                    Signal::StreamError(code) => stream_error = Some(code),
                    Signal::Qr { code, valid_for } => {
                        // A QR code means the handshake is done: the governor slot is free for others.
                        permit = None;
                        if self.linking() {
                            self.link_update(|i| i.show_qr(code, valid_for));
                        }
                    }
                    Signal::Paired { jid } => {
                        if self.linking() {
                            if let Err(ending) = self.link_paired(&client, jid).await {
                                Box::pin(client.disconnect()).await;
                                (&mut run).await;
                                return ending;
                            }
                        }
                    }
                    Signal::PairFailed(error) => {
                        tracing::warn!(tenant = %self.tenant, error = %error, "pairing failed; waiting for another scan");
                        self.link_update(|i| i.error = Some(format!("pairing failed: {error}")));
                    }
                    Signal::QrExhausted { disconnected } => {
                        if disconnected && self.linking() {
                            verdict = Some(Ending::LinkExpired);
                        }
                    }
                },
                cmd = self.commands.recv() => {
                    let wanted = match cmd {
                        Some(Command::PairCode { phone, reply }) => {
                            self.start_pair_code(&client, phone, reply);
                            continue;
                        }
                        Some(Command::Reconnect) => Ending::Again,
                        Some(Command::LeaseLost) => Ending::LeaseLost,
                        Some(Command::Stop { reply, logout }) => Ending::Stop { reply, logout },
                        None => Ending::Stop { reply: oneshot::channel().0, logout: false },
                    };
                    // Down before anything else happens: never two clients on one credential set.
                    if matches!(wanted, Ending::Stop { logout: true, .. }) && client.is_connected() {
                        Box::pin(client.logout()).await;
                    }
                    Box::pin(client.disconnect()).await;
                    (&mut run).await;
                    return wanted;
                }
                _ = tokio::time::sleep_until(handshake_deadline), if permit.is_some() => {
                    permit = None;
                }
            }
        }
        drop(permit);
        while let Ok(signal) = signals.try_recv() {
            match signal {
                Signal::LoggedOut(reason) => {
                    verdict = Some(Ending::Terminal { state: SessionState::LoggedOut, reason })
                }
                Signal::Replaced => {
                    verdict = Some(Ending::Terminal {
                        state: SessionState::Replaced,
                        reason: "replaced: another client took over this number (440 conflict)".into(),
                    })
                }
                Signal::Disconnected(reason) => last_reason = Some(reason),
                Signal::StreamError(code) => stream_error = Some(code),
                _ => {}
            }
        }
        if self.linking()
            && verdict.is_none()
            && let Some(jid) = client.persistence_manager().get_device_snapshot().pn.as_ref().map(|j| j.to_string())
        {
            // The phone confirmed, but the server's 515 (restart after pairing) ended the run loop before the
            // engine announced it: the engine set the device's number before it answered the pair-success that
            // the 515 follows, and its saver has stopped. Store the new link now, or the next connect would
            // load the unpaired device and ask to be paired again.
            tracing::info!(tenant = %self.tenant, "the pairing finished as the server restarted the connection");
            if let Err(ending) = self.link_paired(&client, jid).await {
                return ending;
            }
        }
        if let Some(v) = verdict {
            return v;
        }
        let refused = self.probe.take_refused_status();
        rate_limited |= refused == 429;
        match connected_at {
            Some(at) => {
                // The link was up and went down. A stable connection resets the failure count; 515 (restart
                // required) ends the stream on purpose and is not a failure.
                if at.elapsed() >= self.deps.config.backoff.stable_after || stream_error.as_deref() == Some("515") {
                    self.failures = 0;
                }
                if stream_error.as_deref() == Some("515") {
                    return Ending::Again;
                }
                let reason = match (&stream_error, last_reason) {
                    (Some(code), _) => format!("stream error {code}"),
                    (None, Some(r)) => format!("connection lost: {r}"),
                    (None, None) => "connection closed".into(),
                };
                Ending::Retry { reason, rate_limited }
            }
            None => {
                let reason = match (refused, &stream_error) {
                    (0, None) => "connect failed".to_string(),
                    (0, Some(code)) => format!("stream error {code} before open"),
                    (status, _) => format!("connect refused (HTTP {status})"),
                };
                self.failures = self.failures.saturating_add(1);
                Ending::Retry { reason, rate_limited }
            }
        }
    }

    fn on_idle_command(&mut self, cmd: Option<Command>) -> Ending {
        match cmd {
            Some(Command::Reconnect) => Ending::Again,
            Some(Command::LeaseLost) => Ending::LeaseLost,
            Some(Command::Stop { reply, logout }) => Ending::Stop { reply, logout },
            Some(Command::PairCode { reply, .. }) => {
                let _ = reply.send(Err("not connected to WhatsApp".into()));
                Ending::Again
            }
            None => Ending::Stop { reply: oneshot::channel().0, logout: false },
        }
    }

    /// Asks the engine for a pairing code in the background (its IQ may take seconds), so the connection's
    /// signals keep flowing; the code is shown on the link attempt and sent back to the asker.
    fn start_pair_code(
        &self,
        client: &Arc<whatsapp_rust::Client>,
        phone: String,
        reply: oneshot::Sender<Result<String, String>>,
    ) {
        if !self.linking() {
            let _ = reply.send(Err("not waiting for a phone".into()));
            return;
        }
        let client = client.clone();
        let cell = self.link.as_ref().map(|l| l.cell.clone());
        let tenant = self.tenant.clone();
        tokio::spawn(async move {
            let options = whatsapp_rust::pair_code::PairCodeOptions { phone_number: phone, ..Default::default() };
            let answer = match tokio::time::timeout(Duration::from_secs(20), client.pair_with_code(options)).await {
                Ok(Ok(code)) => Ok(code),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("WhatsApp did not answer in time".to_string()),
            };
            match (&answer, &cell) {
                (Ok(code), Some(cell)) => cell.send_modify(|i| i.pairing_code = Some(code.clone())),
                (Err(e), _) => tracing::warn!(tenant = %tenant, error = %e, "pairing code refused"),
                _ => {}
            }
            let _ = reply.send(answer);
        });
    }

    /// Waits `delay` in `state`, unless told to reconnect (go now) or stop.
    fn wait(&mut self, state: SessionState, delay: Duration) -> BoxFuture<'_, Wake> {
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

    fn next_delay(&mut self, rate_limited: bool) -> Duration {
        let jitter = rand_unit();
        self.deps.config.backoff.delay(self.failures, rate_limited, jitter)
    }

    /// Takes the lease, or says how long to wait before trying again.
    fn acquire_lease(&mut self) -> BoxFuture<'_, Result<(), Duration>> {
        async move {
            let ttl = self.deps.config.lease_ttl;
            match self
                .deps
                .tenants
                .acquire_lease(&self.tenant, &self.deps.config.host_id, ttl.as_millis() as u64, lease_clock(ttl))
                .await
            {
                Ok(lease) => {
                    self.install_lease(lease);
                    Ok(())
                }
                Err(StoreError::Conflict(Conflict::LeaseHeld { holder })) => {
                    self.note_error("lease held by another host".into());
                    let left = holder.expires_at.saturating_sub(lease_clock(ttl)).max(0) as u64;
                    Err(Duration::from_millis(left + 50 + (rand_unit() * 200.0) as u64))
                }
                Err(e) => {
                    self.note_error(format!("tenant store: {e}"));
                    Err(self.next_delay(false).max(Duration::from_millis(500)))
                }
            }
        }
        .boxed()
    }

    fn install_lease(&mut self, lease: Lease) {
        self.lease = Some(lease.clone());
        if let Some(k) = self.lease_keeper.take() {
            k.abort();
        }
        let tenants = self.deps.tenants.clone();
        let tenant = self.tenant.clone();
        let ttl = self.deps.config.lease_ttl;
        let tx = self.self_tx.clone();
        self.lease_keeper = Some(tokio::spawn(keep_lease(tenants, tenant, lease, ttl, tx)));
    }

    async fn let_go_of_lease(&mut self, release: bool) {
        if let Some(k) = self.lease_keeper.take() {
            k.abort();
        }
        if let Some(lease) = self.lease.take()
            && release
            && let Err(e) = self.deps.tenants.release_lease(&self.tenant, &lease).await
        {
            tracing::warn!(tenant = %self.tenant, error = %e, "lease release failed; it will expire");
        }
        if self.backend.take().is_some() {
            self.deps.engines.close(&self.tenant).await;
        }
    }

    /// Another host owns the tenant now: let go without releasing (it is not ours), and discard the local
    /// working copy, which is no longer the newest state. The next lease hydrates afresh from the store, so a
    /// stale local copy can never be pushed over the other host's newer one.
    fn lose_lease(&mut self) -> BoxFuture<'_, ()> {
        async move {
            metrics::counter!("wakeeper_lease_losses_total").increment(1);
            self.let_go_of_lease(false).await;
            if let Err(e) = self.deps.engines.discard_local(&self.tenant).await {
                tracing::warn!(tenant = %self.tenant, error = %e, "could not discard the local working copy");
            }
        }
        .boxed()
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
            self.mark_now(StatusUpdate::terminal(state.tenant_status(), reason)).await;
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
                if let Err(e) = self.deps.engines.delete(&self.tenant).await {
                    tracing::error!(tenant = %self.tenant, error = %e, "deleting credentials after logout failed");
                }
                self.mark_now(StatusUpdate::terminal(TenantStatus::LoggedOut, reason)).await;
            } else {
                self.set_state(SessionState::Stopped, None);
            }
            self.let_go_of_lease(true).await;
            let _ = reply.send(());
        }
        .boxed()
    }

    /// Writes a status now; if the store is unavailable, keeps retrying in the background (never lost).
    async fn mark_now(&self, update: StatusUpdate) {
        match self.deps.tenants.write_status(&self.tenant, &update, now_millis()).await {
            Err(e) if e.is_transient() => self.mark(update),
            Err(e) => tracing::error!(tenant = %self.tenant, error = %e, "status write refused"),
            Ok(_) => {}
        }
    }

    /// Writes a status in the background, retrying until the store takes it (a mark is never lost).
    fn mark(&self, update: StatusUpdate) {
        let tenants = self.deps.tenants.clone();
        let tenant = self.tenant.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match tenants.write_status(&tenant, &update, now_millis()).await {
                    Ok(_) => return,
                    Err(e) if e.is_transient() => {
                        tracing::warn!(tenant = %tenant, error = %e, "status write failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                    Err(e) => {
                        tracing::error!(tenant = %tenant, error = %e, "status write refused");
                        return;
                    }
                }
            }
        });
    }

    fn opened(&mut self) {
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

    fn note_error(&self, error: String) {
        self.view.lock().expect("session view lock").last_error = Some(error);
    }

    fn set_state(&self, state: SessionState, reason: Option<String>) {
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

/// Renews a lease every third of its ttl. The client must be down before the lease can lapse: if a renewal has
/// not succeeded by `expires_at - ttl/5` (store slow or down, task starved), the session is told the lease is
/// lost and stops its client. Another host takes the lease only `ttl/5` after expiry (see `acquire_lease`), so
/// the two never overlap.
async fn keep_lease(
    tenants: Arc<dyn TenantStore>,
    tenant: TenantId,
    mut lease: Lease,
    ttl: Duration,
    tx: mpsc::UnboundedSender<Command>,
) {
    let period = ttl / 3;
    let margin_ms = (ttl / 5).as_millis() as i64;
    loop {
        tokio::time::sleep(period).await;
        let left_ms = lease.expires_at - margin_ms - now_millis();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(left_ms.max(0) as u64);
        let renewed = tokio::time::timeout_at(
            deadline,
            tenants.renew_lease(&tenant, &lease, ttl.as_millis() as u64, now_millis()),
        )
        .await;
        match renewed {
            Ok(Ok(r)) => {
                lease = r;
                metrics::counter!("wakeeper_lease_renewals_total").increment(1);
            }
            Ok(Err(StoreError::Conflict(_))) => {
                let _ = tx.send(Command::LeaseLost);
                return;
            }
            Ok(Err(e)) if lease.expires_at - margin_ms - now_millis() > period.as_millis() as i64 => {
                tracing::warn!(tenant = %tenant, error = %e, "lease renewal failed; retrying before it lapses");
            }
            Ok(Err(e)) => {
                tracing::warn!(tenant = %tenant, error = %e, "lease renewal failed too close to expiry; stopping the client");
                let _ = tx.send(Command::LeaseLost);
                return;
            }
            Err(_) => {
                tracing::warn!(tenant = %tenant, "lease renewal did not finish before the safety margin; stopping the client");
                let _ = tx.send(Command::LeaseLost);
                return;
            }
        }
    }
}

/// The `now` a host presents when taking a lease: a lease of another owner counts as live until `ttl/5` past its
/// expiry, so its holder (which lets go `ttl/5` before expiry) is surely down first.
pub(crate) fn lease_clock(ttl: Duration) -> i64 {
    now_millis() - (ttl / 5).as_millis() as i64
}

fn rand_unit() -> f64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS random source works");
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}
