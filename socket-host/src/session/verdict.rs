//! What the engine's signals mean for a session: the only place engine events (logged out, replaced, bans,
//! connect failures, stream errors, pairing) become session states and attempt outcomes. Pure but for the
//! event handler that turns the engine's events into [`Signal`]s.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use wakeeper_shared::domain::SessionState;
use whatsapp_rust::types::events::{ConnectFailureReason, Event, EventHandler};

/// The engine's lifecycle events, as the supervisor needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Signal {
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

impl Signal {
    /// The signal an engine event is, if the supervisor cares about it.
    fn of(event: &Event) -> Option<Self> {
        Some(match event {
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
            _ => return None,
        })
    }
}

/// Hands the engine's events to the attempt that subscribed it, as [`Signal`]s.
pub(super) struct SignalHandler {
    pub(super) tx: mpsc::UnboundedSender<Signal>,
}

impl EventHandler for SignalHandler {
    fn handle_event(&self, event: Arc<Event>) {
        if let Some(signal) = Signal::of(&event) {
            let _ = self.tx.send(signal);
        }
    }
}

/// The status code WhatsApp sends for a connect failure reason.
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

/// How a connect attempt ends: decided here from the engine's signals, or by the attempt itself (a command,
/// a silent link, the link attempt's deadline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A terminal state: mark the tenant, stop supervising.
    Terminal { state: SessionState, reason: String },
    /// A temporary ban: wait it out.
    TempBan { until: Instant, reason: String },
    /// The link went down or never came up: back off and retry.
    Retry { reason: String, rate_limited: bool },
    /// Asked to reconnect, or the server restarted the stream on purpose (515): again at once.
    Again,
    /// A link attempt's QR codes ran out (nobody scanned), or its time is up.
    LinkExpired,
}

/// What one signal means for the attempt that received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Logged in: the session is open.
    Opened,
    /// The handshake is done without a login (a QR code came), so the governor slot is free for others; on
    /// a link attempt the QR code (payload, how long it is valid) is shown.
    HandshakeOver { qr: Option<(String, Duration)> },
    /// The phone confirmed a link attempt: its credentials are to be stored.
    Paired { jid: String },
    /// A scan failed (the error): the link attempt waits for another.
    PairFailed(String),
    /// The attempt ends this way once the engine has stopped.
    Ends(Outcome),
    /// The connection went down, for this reason.
    Lost(String),
    /// The stream ended with this error code.
    StreamError(String),
    /// Nothing for the supervisor.
    Ignored,
}

/// Where an attempt stands when a signal reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// The engine runs; `linking` while the attempt links a new number and the phone has not confirmed yet.
    Running { linking: bool },
    /// The engine's run has ended: only the signals that say why still count (logged out, replaced, the
    /// reason of the disconnect, a stream error).
    Ended,
}

const REPLACED: &str = "replaced: another client took over this number (440 conflict)";

/// What `signal` means for an attempt in `phase`, received at `now`.
pub(super) fn verdict(signal: Signal, phase: Phase, now: Instant) -> Verdict {
    let linking = phase == Phase::Running { linking: true };
    match signal {
        Signal::LoggedOut(reason) => Verdict::Ends(Outcome::Terminal { state: SessionState::LoggedOut, reason }),
        Signal::Replaced => Verdict::Ends(Outcome::Terminal { state: SessionState::Replaced, reason: REPLACED.into() }),
        Signal::Disconnected(reason) => Verdict::Lost(reason),
        Signal::StreamError(code) => Verdict::StreamError(code),
        _ if phase == Phase::Ended => Verdict::Ignored,
        Signal::Connected => Verdict::Opened,
        Signal::TempBan { expire, code } => Verdict::Ends(Outcome::TempBan {
            until: now + expire,
            reason: format!("temporarily banned ({code}) for {}s", expire.as_secs()),
        }),
        Signal::ConnectFailure { code, logged_out } => Verdict::Ends(connect_failure(code, logged_out)),
        Signal::Qr { code, valid_for } => Verdict::HandshakeOver { qr: linking.then_some((code, valid_for)) },
        Signal::Paired { jid } if linking => Verdict::Paired { jid },
        Signal::Paired { .. } => Verdict::Ignored,
        Signal::PairFailed(error) => Verdict::PairFailed(error),
        Signal::QrExhausted { disconnected: true } if linking => Verdict::Ends(Outcome::LinkExpired),
        Signal::QrExhausted { .. } => Verdict::Ignored,
    }
}

/// A connect failure by its status code: logged out and bans are terminal, the rest is retried.
fn connect_failure(code: i32, logged_out: bool) -> Outcome {
    match code {
        _ if logged_out => Outcome::Terminal { state: SessionState::LoggedOut, reason: format!("logged out ({code})") },
        402 | 406 => Outcome::Terminal { state: SessionState::Banned, reason: format!("banned ({code})") },
        429 => Outcome::Retry { reason: "rate limited (429)".into(), rate_limited: true },
        _ => Outcome::Retry { reason: format!("connect refused ({code})"), rate_limited: false },
    }
}

/// What the count of consecutive failures does after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failures {
    /// Back to zero (the connection was stable, or ended on purpose).
    Reset,
    /// One more.
    Count,
    /// As it was.
    Keep,
}

/// What an attempt has heard from the engine about how it ends.
#[derive(Debug, Default)]
pub(super) struct Heard {
    /// The ending a signal decided; the latest one holds.
    pub(super) ending: Option<Outcome>,
    /// Why the connection went down, as the engine said last.
    lost: Option<String>,
    /// The last stream error code.
    stream_error: Option<String>,
}

impl Heard {
    /// Keeps what `verdict` says about the attempt's end; hands back what the attempt must act on itself.
    pub(super) fn note(&mut self, verdict: Verdict) -> Option<Verdict> {
        match verdict {
            Verdict::Ends(outcome) => self.ending = Some(outcome),
            Verdict::Lost(reason) => self.lost = Some(reason),
            Verdict::StreamError(code) => self.stream_error = Some(code),
            Verdict::Ignored => {}
            other => return Some(other),
        }
        None
    }

    /// How an attempt ends whose engine stopped with no signal deciding it: `open_for` is how long the
    /// connection was open (`None`: it never opened), `refused_status` the HTTP status of a refused WebSocket
    /// upgrade (0 if none). A stable connection resets the failure count; 515 (restart required) ends the
    /// stream on purpose and is not a failure.
    pub(super) fn run_ended(
        self,
        open_for: Option<Duration>,
        stable_after: Duration,
        refused_status: u16,
    ) -> (Outcome, Failures) {
        let rate_limited = refused_status == 429;
        let restart = self.stream_error.as_deref() == Some("515");
        let Some(open_for) = open_for else {
            let reason = match (refused_status, &self.stream_error) {
                (0, None) => "connect failed".to_string(),
                (0, Some(code)) => format!("stream error {code} before open"),
                (status, _) => format!("connect refused (HTTP {status})"),
            };
            return (Outcome::Retry { reason, rate_limited }, Failures::Count);
        };
        let failures = if open_for >= stable_after || restart { Failures::Reset } else { Failures::Keep };
        if restart {
            return (Outcome::Again, failures);
        }
        let reason = match (&self.stream_error, self.lost) {
            (Some(code), _) => format!("stream error {code}"),
            (None, Some(r)) => format!("connection lost: {r}"),
            (None, None) => "connection closed".into(),
        };
        (Outcome::Retry { reason, rate_limited }, failures)
    }
}

#[cfg(test)]
mod tests;
