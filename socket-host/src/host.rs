//! The host: every tenant's session, and the operations the control API, the restore on start and the
//! sweep timer perform on them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;
use wakeeper_shared::domain::{Lease, SessionState, SessionView, StateChange, StatusUpdate, TenantId, now_millis};
use wakeeper_shared::ports::{Conflict, StoreError, TenantStore};

use crate::governor::Governor;
use crate::session::{self, EngineProvider, OpenError, SessionConfig, SessionDeps, SessionHandle, Stored};
use crate::tenant_gates::TenantGates;
use crate::transport::ReqwestHttpClient;

/// Why `ensure` refused a tenant definitively.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnsureError {
    /// No stored credentials (the tenant is marked).
    #[error("credentials missing")]
    CredentialsMissing,
    /// Stored credentials unusable (the tenant is marked).
    #[error("credentials corrupt")]
    CredentialsCorrupt,
    /// The host is shutting down.
    #[error("host shutting down")]
    ShuttingDown,
    /// The credentials were sealed with a data key this host does not hold (nothing marked, lease released).
    #[error("{0}")]
    DataKeyMismatch(String),
}

/// Why `link` refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The tenant runs here, or has restorable credentials and is not in a terminal state.
    #[error("already linked")]
    AlreadyLinked,
    /// Another host holds the tenant's lease.
    #[error("lease held by another host")]
    LeaseHeld,
    /// A store could not be reached.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The host is shutting down.
    #[error("host shutting down")]
    ShuttingDown,
}

/// What `ensure` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    /// The session's state now.
    pub state: SessionState,
    /// Whether it was already running.
    pub already_running: bool,
}

/// Every session of this host.
pub struct Host {
    deps: Arc<SessionDeps>,
    sessions: RwLock<HashMap<TenantId, SessionHandle>>,
    closing: std::sync::atomic::AtomicBool,
    /// Held shared by every `ensure` under way, exclusively by `shutdown` once `closing` is set: an ensure
    /// that took a lease as the shutdown began has released it (or handed it to a session that is stopped)
    /// before the process exits.
    ensuring: tokio::sync::RwLock<()>,
    /// Serialises the start of link attempts (rare, and each deletes and recreates a tenant's store).
    link_starts: tokio::sync::Mutex<()>,
    /// Ensure, link and logout of one tenant take its lease one at a time.
    gates: TenantGates,
    /// Tenants refused for their data key (none set: no check, as in unit tests).
    key_check: std::sync::OnceLock<Arc<crate::key_check::KeyCheck>>,
}

impl Host {
    /// A host with no sessions yet.
    pub fn new(
        tenants: Arc<dyn TenantStore>,
        engines: Arc<dyn EngineProvider>,
        governor: Arc<Governor>,
        config: SessionConfig,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(4096);
        Arc::new(Self {
            deps: Arc::new(SessionDeps {
                tenants,
                engines,
                governor,
                config,
                changes,
                outbox: std::sync::OnceLock::new(),
                http: ReqwestHttpClient::default(),
            }),
            sessions: RwLock::new(HashMap::new()),
            closing: std::sync::atomic::AtomicBool::new(false),
            ensuring: tokio::sync::RwLock::new(()),
            link_starts: tokio::sync::Mutex::new(()),
            gates: TenantGates::default(),
            key_check: std::sync::OnceLock::new(),
        })
    }

    /// State changes of every session.
    pub fn subscribe(&self) -> broadcast::Receiver<StateChange> {
        self.deps.changes.subscribe()
    }

    /// Reports tenants refused for their data key to `keys` (set once, at start; a second call is ignored).
    pub fn set_key_check(&self, keys: Arc<crate::key_check::KeyCheck>) {
        let _ = self.key_check.set(keys);
    }

    /// Faults of this host itself while they last (a wrong data key), for `/health`, `/ready` and the sweep.
    pub fn host_errors(&self) -> Vec<wakeeper_shared::domain::HostCondition> {
        self.key_check.get().and_then(|k| k.condition()).into_iter().collect()
    }

    /// Routes every session's received messages through `outbox` (set once, before sessions start; a second
    /// call is ignored).
    pub fn set_outbox(&self, outbox: crate::outbox::Outbox) {
        let _ = self.deps.outbox.set(outbox);
    }

    /// The outbox, when webhook URLs are configured.
    pub(crate) fn outbox(&self) -> Option<&crate::outbox::Outbox> {
        self.deps.outbox.get()
    }

    /// Accepts a text for the tenant's open session (see [`SessionHandle::queue_text`]); the message id.
    pub fn queue_text(
        &self,
        tenant: &TenantId,
        to: whatsapp_rust::Jid,
        text: String,
        typing: Duration,
    ) -> Result<String, session::SendRefused> {
        self.running(tenant).ok_or(session::SendRefused::NotOpen)?.queue_text(to, text, typing)
    }

    /// The tenant table.
    pub fn tenants(&self) -> &Arc<dyn TenantStore> {
        &self.deps.tenants
    }

    /// The governor.
    pub fn governor(&self) -> &Arc<Governor> {
        &self.deps.governor
    }

    /// This host's id.
    pub fn host_id(&self) -> &str {
        &self.deps.config.host_id
    }

    /// Every session, as the control API lists them.
    pub fn list(&self) -> Vec<SessionView> {
        let sessions = self.sessions.read().expect("sessions lock");
        sessions.values().map(SessionHandle::view).collect()
    }

    /// One session.
    pub fn get(&self, tenant: &TenantId) -> Option<SessionView> {
        self.sessions.read().expect("sessions lock").get(tenant).map(SessionHandle::view)
    }

    /// Session counts by state.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts: BTreeMap<&'static str, u64> = SessionState::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for h in self.sessions.read().expect("sessions lock").values() {
            *counts.entry(h.state().as_str()).or_default() += 1;
        }
        counts
    }

    fn running(&self, tenant: &TenantId) -> Option<SessionHandle> {
        self.sessions.read().expect("sessions lock").get(tenant).filter(|h| !h.is_finished()).cloned()
    }

    /// Makes sure the tenant's session runs: takes the lease, hydrates, and starts the supervisor (which
    /// connects through the governor). Idempotent. Definitive credential problems are answered at once and
    /// marked in the tenant table; transient ones (store outage, lease held elsewhere) are retried by the
    /// supervisor.
    pub async fn ensure(&self, tenant: &TenantId) -> Result<Ensured, EnsureError> {
        let _under_way = self.ensuring.read().await;
        if self.closing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(EnsureError::ShuttingDown);
        }
        let _gate = self.gates.enter(tenant).await;
        if let Some(h) = self.running(tenant) {
            return Ok(Ensured { state: h.state(), already_running: true });
        }
        let deps = &self.deps;
        let lease = match session::take_lease(deps, tenant, None).await {
            Ok(held) => Some(held),
            Err(StoreError::Conflict(Conflict::LeaseHeld { .. })) | Err(_) => None,
        };
        let mut backend = None;
        if let Some(l) = lease.as_ref().map(|held| &held.lease) {
            match deps.engines.open(tenant, l.epoch).await {
                Ok(b) => backend = Some(b),
                Err(e @ (OpenError::Missing | OpenError::Corrupt(_))) => {
                    let (state, err) = match &e {
                        OpenError::Missing => (SessionState::CredentialsMissing, EnsureError::CredentialsMissing),
                        _ => (SessionState::CredentialsCorrupt, EnsureError::CredentialsCorrupt),
                    };
                    let reason = e.to_string();
                    if let Err(we) = self.write_terminal(tenant, l, state, reason.clone()).await {
                        tracing::warn!(tenant = %tenant, error = %we, "could not mark tenant");
                    }
                    let _ = deps.tenants.release_lease(tenant, l).await;
                    self.insert(tenant, session::finished(tenant.clone(), state, reason));
                    return Err(err);
                }
                Err(OpenError::KeyMismatch(why)) => {
                    // Another host may hold the right key: the lease goes back, nothing is marked or started.
                    let _ = deps.tenants.release_lease(tenant, l).await;
                    return Err(EnsureError::DataKeyMismatch(why));
                }
                Err(OpenError::Unavailable(_) | OpenError::LeaseHeld) => {}
            }
        }
        // Two racing ensures: the first insert wins, the loser lets its lease and backend go. A shutdown that began
        // while this ensure took its lease lists the sessions to stop under this lock after setting `closing`:
        // checked here under the same lock, a session is either in that list or never started.
        {
            let mut sessions = self.sessions.write().expect("sessions lock");
            if !self.closing.load(std::sync::atomic::Ordering::Acquire) {
                if let Some(h) = sessions.get(tenant).filter(|h| !h.is_finished()) {
                    return Ok(Ensured { state: h.state(), already_running: true });
                }
                let handle = session::spawn(tenant.clone(), deps.clone(), lease, backend);
                let state = handle.state();
                sessions.insert(tenant.clone(), handle);
                return Ok(Ensured { state, already_running: false });
            }
        }
        if let Some(held) = &lease
            && let Err(e) = deps.tenants.release_lease(tenant, &held.lease).await
        {
            tracing::warn!(tenant = %tenant, error = %e, "lease release failed; it will expire");
        }
        Err(EnsureError::ShuttingDown)
    }

    /// The session handle of a tenant (running or finished).
    pub fn handle(&self, tenant: &TenantId) -> Option<SessionHandle> {
        self.sessions.read().expect("sessions lock").get(tenant).cloned()
    }

    /// Starts linking a new number for `tenant`, or returns the link attempt already waiting for the phone
    /// (`false` then). Refused when the tenant is running, or has restorable credentials and is not in a
    /// terminal state (logged out, replaced, banned, credentials missing or corrupt): those connect with
    /// `ensure`. A tenant that may be linked gets its lease taken and its old, unusable credentials deleted;
    /// the attempt runs on an empty working copy.
    pub async fn link(&self, tenant: &TenantId) -> Result<(SessionHandle, bool), LinkError> {
        if self.closing.load(std::sync::atomic::Ordering::Acquire) {
            return Err(LinkError::ShuttingDown);
        }
        let _one_at_a_time = self.link_starts.lock().await;
        let _gate = self.gates.enter(tenant).await;
        let existing = self.handle(tenant);
        match &existing {
            Some(h) if h.is_linking() => return Ok((h.clone(), false)),
            Some(h) if !h.is_finished() => return Err(LinkError::AlreadyLinked),
            _ => {}
        }
        let deps = &self.deps;
        let terminal_here = existing.as_ref().is_some_and(|h| h.state().is_terminal());
        let terminal_in_table = match deps.tenants.get(tenant).await {
            Ok(record) => record.and_then(|r| r.status).is_some_and(|s| s.is_terminal()),
            Err(e) => return Err(LinkError::Unavailable(e.to_string())),
        };
        if !terminal_here && !terminal_in_table {
            match deps.engines.stored(tenant).await {
                Ok(Stored::Restorable) => return Err(LinkError::AlreadyLinked),
                Ok(Stored::Missing | Stored::Unusable) => {}
                Err(e) => return Err(LinkError::Unavailable(e.to_string())),
            }
        }
        let held = match session::take_lease(deps, tenant, None).await {
            Ok(held) => held,
            Err(StoreError::Conflict(Conflict::LeaseHeld { .. })) => return Err(LinkError::LeaseHeld),
            Err(e) => return Err(LinkError::Unavailable(e.to_string())),
        };
        let lease = held.lease.clone();
        let backend = match deps.engines.open_new(tenant, lease.epoch).await {
            Ok(b) => b,
            Err(e) => {
                let _ = deps.tenants.release_lease(tenant, &lease).await;
                return Err(LinkError::Unavailable(e.to_string()));
            }
        };
        // As in `ensure`: checked under the lock a shutdown lists the sessions under.
        {
            let mut sessions = self.sessions.write().expect("sessions lock");
            if !self.closing.load(std::sync::atomic::Ordering::Acquire) {
                tracing::info!(tenant = %tenant, "link attempt started");
                metrics::counter!("wakeeper_links_started_total").increment(1);
                let handle = session::spawn_link(tenant.clone(), deps.clone(), held, backend);
                sessions.insert(tenant.clone(), handle.clone());
                return Ok((handle, true));
            }
        }
        let _ = deps.tenants.release_lease(tenant, &lease).await;
        Err(LinkError::ShuttingDown)
    }

    /// Marks the tenant in a terminal `state` in the tenant table, as the holder of `lease`.
    async fn write_terminal(
        &self,
        tenant: &TenantId,
        lease: &Lease,
        state: SessionState,
        reason: String,
    ) -> Result<bool, StoreError> {
        let update = StatusUpdate::terminal(state.tenant_status(), reason);
        self.deps.tenants.write_status_as_holder(tenant, lease, &update, now_millis()).await
    }

    fn insert(&self, tenant: &TenantId, handle: SessionHandle) {
        self.sessions.write().expect("sessions lock").insert(tenant.clone(), handle);
    }

    /// Asks a session to reconnect at once. `false` when the host has no running session for the tenant.
    pub fn reconnect(&self, tenant: &TenantId) -> bool {
        self.running(tenant).is_some_and(|h| h.reconnect())
    }

    /// A replication write was fenced (another host holds a newer epoch): stop that client first.
    pub fn lease_lost(&self, tenant: &TenantId) {
        if let Some(h) = self.running(tenant) {
            h.lease_lost();
        }
    }

    /// Stops a session (credentials kept) and forgets it. `false` when the host had none.
    pub async fn stop(&self, tenant: &TenantId) -> bool {
        let handle = self.sessions.write().expect("sessions lock").remove(tenant);
        match handle {
            Some(h) => {
                h.stop().await;
                true
            }
            None => false,
        }
    }

    /// Logs a tenant out: unlinks the device when connected, deletes its credentials, marks it. `false` when
    /// the host had no session for it (credentials are still deleted).
    pub async fn logout(&self, tenant: &TenantId) -> Result<bool, OpenError> {
        let _gate = self.gates.enter(tenant).await;
        let handle = self.sessions.read().expect("sessions lock").get(tenant).cloned();
        match handle {
            Some(h) if h.holds_lease() => {
                h.logout().await;
                Ok(true)
            }
            other => {
                // Nothing runs here, so act only as the lease holder: a session another host runs keeps its
                // credentials, and this host answers that the lease is held.
                let lease = session::take_lease(&self.deps, tenant, None).await.map_err(|e| match e {
                    StoreError::Conflict(Conflict::LeaseHeld { .. }) => OpenError::LeaseHeld,
                    e => OpenError::Unavailable(e.to_string()),
                })?;
                let lease = lease.lease;
                if let Some(waiting) = other.as_ref().filter(|h| !h.is_finished()) {
                    // A session here that waited for the lease must not take it after the logout.
                    waiting.stop().await;
                }
                let reason = "logged out on request".to_string();
                let done = async {
                    self.deps.engines.delete(tenant, lease.epoch).await?;
                    self.write_terminal(tenant, &lease, SessionState::LoggedOut, reason.clone())
                        .await
                        .map_err(|e| OpenError::Unavailable(e.to_string()))
                }
                .await;
                if let Err(e) = self.deps.tenants.release_lease(tenant, &lease).await {
                    tracing::warn!(tenant = %tenant, error = %e, "lease release failed; it will expire");
                }
                done?;
                let known = other.is_some();
                self.insert(tenant, session::finished(tenant.clone(), SessionState::LoggedOut, reason));
                Ok(known)
            }
        }
    }

    /// Stops every session, releasing leases, within `deadline`. Returns how many were still running.
    pub async fn shutdown(&self, deadline: Duration) -> usize {
        let started = tokio::time::Instant::now();
        self.closing.store(true, std::sync::atomic::Ordering::Release);
        // Ensures under way finish first: one that took a lease just now releases it, or its session is in the
        // list below (seen as a lease left behind by a SIGTERM during a restore).
        if tokio::time::timeout(deadline, self.ensuring.write()).await.is_err() {
            tracing::warn!("shutdown deadline reached with ensures still under way");
        }
        let deadline = deadline.saturating_sub(started.elapsed());
        let handles: Vec<SessionHandle> = self.sessions.read().expect("sessions lock").values().cloned().collect();
        let stops = futures_util::future::join_all(handles.iter().map(|h| h.stop()));
        if tokio::time::timeout(deadline, stops).await.is_err() {
            tracing::warn!("shutdown deadline reached with sessions still stopping");
        }
        handles.iter().filter(|h| !h.is_finished()).count()
    }
}
