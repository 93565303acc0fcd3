//! One connect attempt: a governor permit, one engine client and its connection, followed until it ends, and
//! how it ended (what the engine's signals mean is decided in `verdict`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use wakeeper_shared::domain::now_millis;
use whatsapp_rust::bot::{Bot, BotHandle};

use super::handle::Command;
use super::supervisor::Supervisor;
use super::verdict::{Failures, Heard, Outcome, Phase, Signal, SignalHandler, Verdict, verdict};
use crate::governor::ConnectPermit;
use crate::messages::{ClientSlot, InboundHook};
use crate::transport::WsTransportFactory;

/// How one connect attempt ended.
#[derive(Debug)]
pub(super) enum Ending {
    /// As the connection's signals, or the attempt itself, decided.
    Outcome(Outcome),
    /// The lease is gone: let go, take it again before the next attempt.
    LeaseLost,
    /// Asked to stop (and maybe to log out).
    Stop { reply: oneshot::Sender<()>, logout: bool },
}

/// Empties the session's client slot when a connect attempt ends, however it ends.
struct SlotGuard(ClientSlot);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        *self.0.lock().expect("client slot lock") = None;
    }
}

/// The engine client of a running attempt and what the attempt knows of its connection.
struct Connection {
    client: Arc<whatsapp_rust::Client>,
    /// The engine's run loop; done when the connection is.
    run: BotHandle,
    signals: mpsc::UnboundedReceiver<Signal>,
    /// Held until the handshake is over (or has taken too long).
    permit: Option<ConnectPermit>,
    /// When the session last opened on this connection.
    connected_at: Option<Instant>,
    heard: Heard,
}

impl Connection {
    /// Disconnects and waits until the engine's run loop is over.
    async fn hang_up(&mut self) {
        Box::pin(self.client.disconnect()).await;
        (&mut self.run).await;
    }
}

impl Supervisor {
    /// One client, one connection, until it ends.
    pub(super) async fn attempt(&mut self, dropped_at: &mut Option<Instant>) -> Ending {
        let permit = match self.connect_permit().await {
            Ok(permit) => permit,
            Err(ending) => return ending,
        };
        metrics::counter!("wakeeper_connects_attempted_total").increment(1);
        let bot = match self.build_bot().await {
            Ok(bot) => bot,
            Err(ending) => return ending,
        };
        let client = bot.client();
        client.enable_auto_reconnect.store(false, Ordering::Relaxed);
        *self.client.lock().expect("client slot lock") = Some(client.clone());
        let _slot = SlotGuard(self.client.clone());
        let (tx, signals) = mpsc::unbounded_channel();
        let _subscription = client.subscribe_handler(Arc::new(SignalHandler { tx }));
        let mut connection = Connection {
            client,
            run: bot.spawn(),
            signals,
            permit: Some(permit),
            connected_at: None,
            heard: Heard::default(),
        };
        if let Some(ending) = self.follow(&mut connection, dropped_at).await {
            return ending;
        }
        self.judge_ended_run(connection).await
    }

    /// Waits for the governor's permit to connect; a command meanwhile may end the attempt first.
    async fn connect_permit(&mut self) -> Result<ConnectPermit, Ending> {
        let governor = self.deps.governor.clone();
        loop {
            tokio::select! {
                p = governor.acquire() => return Ok(p),
                cmd = self.commands.recv() => match cmd {
                    Some(Command::PairCode { reply, .. }) => {
                        let _ = reply.send(Err("not connected to WhatsApp yet".into()));
                    }
                    other => return Err(self.on_idle_command(other)),
                },
            }
        }
    }

    /// The engine over the session's backend, with this host's transport, HTTP client and inbound hook.
    async fn build_bot(&mut self) -> Result<Bot, Ending> {
        let deps = self.deps.clone();
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
        match Box::pin(builder.build()).await {
            Ok(bot) => Ok(bot),
            Err(e) => {
                // The store passed the completeness check when it was opened, so this is most likely a passing
                // I/O failure: never a reason to mark the tenant.
                self.failures = self.failures.saturating_add(1);
                let reason = format!("engine could not start: {e}");
                Err(Ending::Outcome(Outcome::Retry { reason, rate_limited: false }))
            }
        }
    }

    /// Follows the connection until the engine's run ends (`None`), or until something else ends the attempt
    /// first: a command, a silent link, the link attempt's deadline, a pairing that could not be stored.
    async fn follow(&mut self, connection: &mut Connection, dropped_at: &mut Option<Instant>) -> Option<Ending> {
        let deps = self.deps.clone();
        let handshake_deadline = Instant::now() + deps.config.handshake_timeout;
        let mut watchdog = tokio::time::interval(Duration::from_secs(1).min(deps.config.silent_after / 4));
        let link_deadline = self.link.as_ref().filter(|l| !l.paired).map(|l| l.deadline);
        loop {
            tokio::select! {
                _ = &mut connection.run => return None,
                _ = tokio::time::sleep_until(link_deadline.unwrap_or_else(Instant::now)), if link_deadline.is_some() && self.linking() => {
                    connection.hang_up().await;
                    return Some(Ending::Outcome(Outcome::LinkExpired));
                }
                _ = watchdog.tick(), if connection.connected_at.is_some() => {
                    let silent_ms = now_millis().saturating_sub(self.probe.last_frame_ms());
                    if silent_ms >= deps.config.silent_after.as_millis() as i64 {
                        tracing::warn!(tenant = %self.tenant, silent_ms, "link silent: treating it as half-open");
                        metrics::counter!("wakeeper_half_open_detected_total").increment(1);
                        connection.hang_up().await;
                        let reason = format!("no frame for {} s (half-open link)", silent_ms / 1000);
                        return Some(Ending::Outcome(Outcome::Retry { reason, rate_limited: false }));
                    }
                }
                Some(signal) = connection.signals.recv() => {
                    if let Some(ending) = self.on_signal(connection, signal, dropped_at).await {
                        return Some(ending);
                    }
                }
                cmd = self.commands.recv() => {
                    let wanted = match cmd {
                        Some(Command::PairCode { phone, reply }) => {
                            self.start_pair_code(&connection.client, phone, reply);
                            continue;
                        }
                        other => self.on_idle_command(other),
                    };
                    // Down before anything else happens: never two clients on one credential set.
                    if matches!(wanted, Ending::Stop { logout: true, .. }) && connection.client.is_connected() {
                        Box::pin(connection.client.logout()).await;
                    }
                    connection.hang_up().await;
                    return Some(wanted);
                }
                _ = tokio::time::sleep_until(handshake_deadline), if connection.permit.is_some() => {
                    connection.permit = None;
                }
            }
        }
    }

    /// Acts on one signal of the running engine; `Some` when it ends the attempt at once.
    async fn on_signal(
        &mut self,
        connection: &mut Connection,
        signal: Signal,
        dropped_at: &mut Option<Instant>,
    ) -> Option<Ending> {
        let phase = Phase::Running { linking: self.linking() };
        match connection.heard.note(verdict(signal, phase, Instant::now()))? {
            Verdict::Opened => {
                connection.permit = None;
                connection.connected_at = Some(Instant::now());
                self.first_login_of_link().await;
                if let Some(t) = dropped_at.take() {
                    metrics::histogram!("wakeeper_reconnect_seconds").record(t.elapsed().as_secs_f64());
                }
                metrics::counter!("wakeeper_connects_succeeded_total").increment(1);
                self.opened();
            }
            Verdict::HandshakeOver { qr } => {
                // The governor slot is free for others.
                connection.permit = None;
                if let Some((code, valid_for)) = qr {
                    self.link_update(|i| i.show_qr(code, valid_for));
                }
            }
            Verdict::Paired { jid } => {
                if let Err(ending) = self.link_paired(&connection.client, jid).await {
                    connection.hang_up().await;
                    return Some(ending);
                }
            }
            Verdict::PairFailed(error) => {
                tracing::warn!(tenant = %self.tenant, error = %error, "pairing failed; waiting for another scan");
                self.link_update(|i| i.error = Some(format!("pairing failed: {error}")));
            }
            Verdict::Ends(_) | Verdict::Lost(_) | Verdict::StreamError(_) | Verdict::Ignored => {}
        }
        None
    }

    /// How an attempt ends whose engine stopped on its own: the signals still queued, a pairing the server's
    /// restart cut short, then what was heard.
    async fn judge_ended_run(&mut self, mut connection: Connection) -> Ending {
        connection.permit = None;
        while let Ok(signal) = connection.signals.try_recv() {
            // After the run, every verdict is one `note` keeps.
            let _ = connection.heard.note(verdict(signal, Phase::Ended, Instant::now()));
        }
        if self.linking()
            && connection.heard.ending.is_none()
            && let Some(jid) =
                connection.client.persistence_manager().get_device_snapshot().pn.as_ref().map(|j| j.to_string())
        {
            // The phone confirmed, but the server's 515 (restart after pairing) ended the run loop before the
            // engine announced it: the engine set the device's number before it answered the pair-success that
            // the 515 follows, and its saver has stopped. Store the new link now, or the next connect would
            // load the unpaired device and ask to be paired again.
            tracing::info!(tenant = %self.tenant, "the pairing finished as the server restarted the connection");
            if let Err(ending) = self.link_paired(&connection.client, jid).await {
                return ending;
            }
        }
        if let Some(outcome) = connection.heard.ending.take() {
            return Ending::Outcome(outcome);
        }
        let refused = self.probe.take_refused_status();
        let open_for = connection.connected_at.map(|at| at.elapsed());
        let (outcome, failures) = connection.heard.run_ended(open_for, self.deps.config.backoff.stable_after, refused);
        match failures {
            Failures::Reset => self.failures = 0,
            Failures::Count => self.failures = self.failures.saturating_add(1),
            Failures::Keep => {}
        }
        Ending::Outcome(outcome)
    }

    /// What a command means for an attempt that is not connected (or is about to hang up).
    pub(super) fn on_idle_command(&mut self, cmd: Option<Command>) -> Ending {
        match cmd {
            Some(Command::Reconnect) => Ending::Outcome(Outcome::Again),
            Some(Command::LeaseLost) => Ending::LeaseLost,
            Some(Command::Stop { reply, logout }) => Ending::Stop { reply, logout },
            Some(Command::PairCode { reply, .. }) => {
                let _ = reply.send(Err("not connected to WhatsApp".into()));
                Ending::Outcome(Outcome::Again)
            }
            None => Ending::Stop { reply: oneshot::channel().0, logout: false },
        }
    }
}
