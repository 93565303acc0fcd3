//! One supervised session per tenant: a task that owns the tenant's lease, its engine store and, one connect
//! attempt at a time, one whatsapp-rust client.
//!
//! The engine's own reconnect loop is switched off: every attempt is made here, so it takes a governor token,
//! follows this host's backoff, and never overlaps the previous client (two clients on one credential set
//! knock each other off and fork the Signal state). A session ends only in a terminal state (written to the
//! tenant table with its reason) or when asked to stop.
//!
//! # Layout
//! - this file: what the host sees of sessions (the engine provider, settings, `spawn`).
//! - `handle`: the [`SessionHandle`] the host keeps, and the commands it sends the supervisor.
//! - `supervisor`: the session's whole life: lease, engine store, one attempt after another, backoff, its end.
//! - `attempt`: one connect attempt: one client and its connection, followed until it ends.
//! - `verdict`: what the engine's signals mean for a session (the only place they become outcomes).
//! - `lease`: taking, renewing and letting go of the tenant's lease.
//! - `marks`: writes to the tenant table that must not be lost (status, the desired flag).
//! - [`link`]: linking a new number: what an attempt shows, and the supervisor's part in it.

mod attempt;
mod handle;
mod lease;
pub mod link;
mod marks;
mod supervisor;
mod verdict;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use wakeeper_shared::domain::{BackoffPolicy, SessionState, SessionView, TenantId, now_millis};
use wakeeper_shared::ports::TenantStore;
use whatsapp_rust::store::traits::Backend;

use crate::governor::Governor;
use crate::messages::ClientSlot;
use crate::transport::{LinkProbe, ReqwestHttpClient};

pub use handle::{SendRefused, SessionHandle};
pub(crate) use lease::{HeldLease, take_lease};
pub use wakeeper_shared::domain::StateChange;

use handle::LeaseDeadline;
use link::LinkCell;
use supervisor::Supervisor;

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
    /// Another host holds the tenant's lease: only it may act on the tenant's credentials.
    #[error("lease held by another host")]
    LeaseHeld,
    /// The credentials were sealed with a data key this host does not hold: the host's fault, not the
    /// tenant's (see [`crate::key_check`]). Nothing is marked.
    #[error("{0}")]
    KeyMismatch(String),
}

/// Opens a tenant's engine store (hydrating its working copy first when needed).
#[async_trait]
pub trait EngineProvider: Send + Sync {
    /// The engine backend of `tenant`, whose writes are replicated under lease `epoch`.
    async fn open(&self, tenant: &TenantId, epoch: u64) -> Result<Arc<dyn Backend>, OpenError>;
    /// Called when the session lets go of its backend (stop, terminal state, lease lost).
    async fn close(&self, _tenant: &TenantId) {}
    /// Deletes every stored credential of the tenant (logout) under lease `epoch`: lets the tenant's
    /// replication drain, then the remote store (fenced), then the local copy.
    async fn delete(&self, tenant: &TenantId, epoch: u64) -> Result<(), OpenError>;
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

/// Starts supervising `tenant`. `lease` and `backend` are what the caller already obtained (an `ensure`
/// hydrates up front to answer definitive credential problems at once); the task gets whatever is missing.
pub(crate) fn spawn(
    tenant: TenantId,
    deps: Arc<SessionDeps>,
    lease: Option<HeldLease>,
    backend: Option<Arc<dyn Backend>>,
) -> SessionHandle {
    start(tenant, deps, lease, backend, None)
}

/// Starts a link attempt for `tenant`: `lease` is held and `backend` is an engine store over an empty working
/// copy ([`EngineProvider::open_new`]). The session shows QR codes in state `linking` until the phone confirms;
/// then the credentials are made durable in the credential store before anything else (the tenant is marked
/// desired, the session goes on as a normal one and reaches `open`). Never scanned, cancelled or failed, the
/// attempt ends `stopped` and the unpaired keys are deleted.
pub(crate) fn spawn_link(
    tenant: TenantId,
    deps: Arc<SessionDeps>,
    lease: HeldLease,
    backend: Arc<dyn Backend>,
) -> SessionHandle {
    start(tenant, deps, Some(lease), Some(backend), Some(link::new_cell()))
}

fn start(
    tenant: TenantId,
    deps: Arc<SessionDeps>,
    lease: Option<HeldLease>,
    backend: Option<Arc<dyn Backend>>,
    link: Option<LinkCell>,
) -> SessionHandle {
    let link_deadline = Instant::now() + deps.config.link_timeout;
    let state = if link.is_some() { SessionState::Linking } else { SessionState::Connecting };
    let mut view = SessionView::new(tenant.clone(), state, now_millis());
    view.lease = lease.as_ref().map(|held| held.reported());
    let view = Arc::new(Mutex::new(view));
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
        lease_deadline: LeaseDeadline::default(),
    };
    let supervisor = Supervisor {
        tenant,
        deps,
        view,
        probe: handle.probe.clone(),
        commands: rx,
        self_tx: tx,
        lease_deadline: handle.lease_deadline.clone(),
        handed: lease,
        lease: None,
        watching: None,
        lease_keeper: None,
        backend,
        failures: 0,
        client,
        link: link.map(|cell| link::Linking { cell, deadline: link_deadline, paired: false, just_paired: false }),
    };
    let finished = handle.finished.clone();
    tokio::spawn(async move {
        supervisor.run().await;
        finished.store(true, std::sync::atomic::Ordering::Release);
    });
    metrics::counter!("wakeeper_sessions_started_total").increment(1);
    handle
}

/// A handle whose session never started: its state is already terminal (e.g. credentials missing at ensure).
pub fn finished(tenant: TenantId, state: SessionState, reason: String) -> SessionHandle {
    let (tx, _rx) = mpsc::unbounded_channel();
    let mut view = SessionView::new(tenant.clone(), state, now_millis());
    view.last_error = Some(reason);
    SessionHandle {
        view: Arc::new(Mutex::new(view)),
        tenant,
        probe: Arc::new(LinkProbe::default()),
        commands: tx,
        finished: Arc::new(AtomicBool::new(true)),
        client: Arc::default(),
        sends: None,
        link: None,
        lease_deadline: LeaseDeadline::default(),
    }
}
