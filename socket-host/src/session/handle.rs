//! The handle the host keeps for a session: its view, sends, and the commands it passes to the supervisor.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use wakeeper_shared::domain::{SessionState, SessionView, TenantId, now_millis};
use wakeeper_shared::host_api::LinkView;
use whatsapp_rust::Jid;

use super::link::LinkCell;
use crate::messages::{ClientSlot, Outgoing};
use crate::transport::LinkProbe;

/// Something asked of a running session.
#[derive(Debug)]
pub(super) enum Command {
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
    pub(super) tenant: TenantId,
    pub(super) view: Arc<Mutex<SessionView>>,
    pub(super) probe: Arc<LinkProbe>,
    pub(super) commands: mpsc::UnboundedSender<Command>,
    pub(super) finished: Arc<AtomicBool>,
    pub(super) client: ClientSlot,
    pub(super) sends: Option<mpsc::Sender<Outgoing>>,
    /// Set when the session was started to link a new number.
    pub(super) link: Option<LinkCell>,
    /// Until when the held lease is good by this host's monotonic clock (see `lease::keep_lease`).
    pub(super) lease_deadline: LeaseDeadline,
}

/// Until when a session's lease is good, shared by the lease keeper (which moves it on every renewal) and the
/// handle: a host that was paused past it reports the session as no longer open at once, before the keeper
/// has woken to stop the client.
pub(crate) type LeaseDeadline = Arc<Mutex<Option<Instant>>>;

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
        if self.lease_lapsed() {
            if v.state == SessionState::Open {
                v.state = SessionState::Connecting;
                v.last_error = Some("lease not renewed in time".into());
            }
            if let Some(l) = v.lease.as_mut() {
                l.held = false;
            }
        }
        v
    }

    /// The current state (an open session whose lease has lapsed is no longer open).
    pub fn state(&self) -> SessionState {
        let state = self.view.lock().expect("session view lock").state;
        if state == SessionState::Open && self.lease_lapsed() { SessionState::Connecting } else { state }
    }

    /// Whether the lease this session holds has run past its deadline (the keeper stops the client next).
    fn lease_lapsed(&self) -> bool {
        self.lease_deadline.lock().expect("lease deadline lock").is_some_and(|d| Instant::now() >= d)
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

    /// Whether the session holds the tenant's lease now: only then may it act on the tenant's credentials.
    pub fn holds_lease(&self) -> bool {
        !self.is_finished()
            && !self.lease_lapsed()
            && self.view.lock().expect("session view lock").lease.as_ref().is_some_and(|l| l.held)
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
