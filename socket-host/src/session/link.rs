//! Linking a new number: what a link attempt shows (the rotating QR code, a pairing code, the outcome), the
//! checks on a phone number, the QR code rendered as SVG so the dashboard needs no script library, and the
//! supervisor's part in an attempt (QR codes until the phone confirms, the new credentials made durable, or
//! the attempt ended and its unpaired keys deleted).
//!
//! The attempt runs in the tenant's supervisor ([`crate::session::spawn_link`]) on an empty working copy;
//! [`crate::host::Host::link`] decides whether a tenant may be linked and starts it.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use wakeeper_shared::domain::{SessionState, TenantId, UnixMillis, now_millis};
use wakeeper_shared::host_api::{LinkStatus, LinkView};

use super::attempt::Ending;
use super::handle::Command;
use super::marks::TenantWrite;
use super::supervisor::{Exit, Flow, Supervisor, Wake};
use super::verdict::Outcome;

/// What a link attempt shows right now. Shared between the supervisor (which writes it) and the handle (which
/// the control API reads); watchers wake on every change.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    /// Where the attempt stands.
    pub status: LinkStatus,
    /// The current QR payload, while one is valid.
    pub qr: Option<String>,
    /// The same code as SVG, rendered once per rotation.
    pub qr_svg: Option<String>,
    /// When the current QR code stops being valid.
    pub qr_expires: Option<Instant>,
    /// The pairing code handed out for a phone number, if asked for.
    pub pairing_code: Option<String>,
    /// The linked device, once paired.
    pub device_jid: Option<String>,
    /// Why the attempt failed or expired.
    pub error: Option<String>,
    /// When the attempt started.
    pub started_ms: UnixMillis,
}

impl LinkInfo {
    /// A fresh attempt, waiting for its first QR code.
    pub fn new() -> Self {
        Self {
            status: LinkStatus::Waiting,
            qr: None,
            qr_svg: None,
            qr_expires: None,
            pairing_code: None,
            device_jid: None,
            error: None,
            started_ms: now_millis(),
        }
    }

    /// Shows a new QR code, valid for `valid_for`.
    pub fn show_qr(&mut self, payload: String, valid_for: std::time::Duration) {
        self.qr_svg = qr_svg(&payload);
        self.qr = Some(payload);
        self.qr_expires = Some(Instant::now() + valid_for);
    }

    /// Takes the QR code down (the connection that handed it out is gone, or the attempt ended).
    pub fn clear_qr(&mut self) {
        self.qr = None;
        self.qr_svg = None;
        self.qr_expires = None;
    }

    /// Whether the attempt still waits for the phone.
    pub fn is_waiting(&self) -> bool {
        self.status == LinkStatus::Waiting
    }

    /// The wire view, with the session's current `state`.
    pub fn view(&self, tenant: &TenantId, state: SessionState) -> LinkView {
        let expires_in_s = self.qr_expires.map(|at| at.saturating_duration_since(Instant::now()).as_secs());
        LinkView {
            tenant_id: tenant.clone(),
            status: self.status,
            state,
            qr: self.qr.clone(),
            qr_svg: self.qr_svg.clone(),
            expires_in_s,
            pairing_code: self.pairing_code.clone(),
            device_jid: self.device_jid.clone(),
            error: self.error.clone(),
            started_ms: self.started_ms,
        }
    }
}

impl Default for LinkInfo {
    fn default() -> Self {
        Self::new()
    }
}

/// The shared, watchable [`LinkInfo`] of one attempt.
pub type LinkCell = Arc<watch::Sender<LinkInfo>>;

/// A new cell for an attempt starting now.
pub fn new_cell() -> LinkCell {
    Arc::new(watch::channel(LinkInfo::new()).0)
}

/// Checks a phone number for a pairing code: international form, 7 to 15 digits, no leading zero; a leading
/// `+` is allowed and dropped. Anything else (spaces, dashes, letters) is refused rather than guessed at.
pub fn parse_phone(raw: &str) -> Option<String> {
    let digits = raw.strip_prefix('+').unwrap_or(raw);
    let ok = (7..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0');
    ok.then(|| digits.to_owned())
}

/// The QR code of `payload` as a standalone SVG document (black on white, with the quiet zone).
pub fn qr_svg(payload: &str) -> Option<String> {
    let code = qrcode::QrCode::with_error_correction_level(payload.as_bytes(), qrcode::EcLevel::L).ok()?;
    Some(
        code.render::<qrcode::render::svg::Color<'_>>()
            .min_dimensions(264, 264)
            .dark_color(qrcode::render::svg::Color("#000000"))
            .light_color(qrcode::render::svg::Color("#ffffff"))
            .build(),
    )
}

/// A link attempt's part of the supervisor.
pub(super) struct Linking {
    pub(super) cell: LinkCell,
    /// The attempt ends `expired` here unless paired.
    pub(super) deadline: Instant,
    /// The phone confirmed and the credentials are durable: from here on a normal session.
    pub(super) paired: bool,
    /// Paired, and not yet open once: replication is flushed again before `open` is shown.
    pub(super) just_paired: bool,
}

const NOT_SCANNED: &str = "no QR code was scanned in time";
const CANCELLED: &str = "cancelled on request";

impl Supervisor {
    /// Whether this is a link attempt still waiting for the phone.
    pub(super) fn linking(&self) -> bool {
        self.link.as_ref().is_some_and(|l| !l.paired)
    }

    /// A link attempt that cannot go on: out of time, or without its lease or engine store.
    pub(super) fn link_precheck(&self) -> Option<(LinkStatus, String)> {
        let link = self.link.as_ref()?;
        if Instant::now() >= link.deadline {
            return Some((LinkStatus::Expired, NOT_SCANNED.into()));
        }
        if self.lease.is_none() || self.backend.is_none() {
            return Some((LinkStatus::Failed, "the link attempt lost its lease".into()));
        }
        None
    }

    pub(super) fn link_update(&self, f: impl FnOnce(&mut LinkInfo)) {
        if let Some(l) = &self.link {
            l.cell.send_modify(f);
        }
    }

    /// What the ending of an attempt that has not paired (yet) means for the link attempt. Nothing is marked
    /// in the tenant table.
    pub(super) async fn after_link_attempt(&mut self, ending: Ending) -> Flow {
        let ended = |status, reason: &str, reply| {
            Flow::Break(Exit::LinkEnded { status, reason: reason.into(), reply, cleanup: true })
        };
        match ending {
            Ending::Stop { reply, .. } => ended(LinkStatus::Cancelled, CANCELLED, Some(reply)),
            Ending::Outcome(Outcome::LinkExpired) => ended(LinkStatus::Expired, NOT_SCANNED, None),
            Ending::Outcome(Outcome::Terminal { reason, .. } | Outcome::TempBan { reason, .. }) => {
                ended(LinkStatus::Failed, &reason, None)
            }
            Ending::LeaseLost => {
                // Another host owns the tenant now: what is stored is its business, not ours to delete.
                self.lose_lease().await;
                let reason = "lease lost to another host".to_string();
                Flow::Break(Exit::LinkEnded { status: LinkStatus::Failed, reason, reply: None, cleanup: false })
            }
            Ending::Outcome(Outcome::Retry { reason, rate_limited }) => {
                // The connection went before the phone confirmed: a new one hands out new QR codes.
                self.note_error(reason);
                self.link_update(|i| i.clear_qr());
                let left = self.link.as_ref().map_or(Duration::ZERO, |l| l.deadline - Instant::now());
                let delay = self.next_delay(rate_limited).min(left);
                match self.wait(SessionState::Linking, delay).await {
                    Wake::Stop(reply, _) => ended(LinkStatus::Cancelled, CANCELLED, Some(reply)),
                    Wake::Go => ControlFlow::Continue(()),
                }
            }
            Ending::Outcome(Outcome::Again) => ControlFlow::Continue(()),
        }
    }

    /// Ends a link attempt that never paired: the session is `stopped` with `reason`, the unpaired keys are
    /// deleted (unless another host owns the tenant now), the lease is released. Nothing is written to the
    /// tenant table: whatever it said about the tenant before still holds.
    pub(super) fn link_end(
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
            if cleanup && let Some(epoch) = self.lease.as_ref().map(|l| l.epoch)
                && let Err(e) = self.deps.engines.delete(&self.tenant, epoch).await {
                    tracing::warn!(tenant = %self.tenant, error = %e, "could not delete the keys of an unpaired link attempt");
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
    pub(super) fn link_paired<'a>(
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
            self.write_now(TenantWrite::Desired).await;
            Ok(())
        }
        .boxed()
    }

    /// The first login of a new link: what the engine wrote while logging in (pre-keys it uploaded) is made
    /// durable before `open` is shown to anyone.
    pub(super) async fn first_login_of_link(&mut self) {
        if let Some(l) = self.link.as_mut().filter(|l| l.just_paired) {
            l.just_paired = false;
            if let Err(e) = self.deps.engines.persist(&self.tenant, Duration::from_secs(5)).await {
                tracing::warn!(tenant = %self.tenant, error = %e, "first login of a new link not fully replicated yet");
            }
        }
    }

    /// Asks the engine for a pairing code in the background (its IQ may take seconds), so the connection's
    /// signals keep flowing; the code is shown on the link attempt and sent back to the asker.
    pub(super) fn start_pair_code(
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phone_numbers_are_digits_in_international_form() {
        assert_eq!(parse_phone("15551234567").as_deref(), Some("15551234567"));
        assert_eq!(parse_phone("+4915112345678").as_deref(), Some("4915112345678"));
        for bad in [
            "",
            "+",
            "123456",
            "1234567890123456",
            "015551234567",
            "1555 123 4567",
            "1555-1234567",
            "abc1234567",
            "+-1555123456",
            "１５５５１２３４５６７",
        ] {
            assert_eq!(parse_phone(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn qr_codes_render_as_svg() {
        let svg = qr_svg("2@abc,def,ghi,jkl").unwrap();
        assert!(svg.contains("<svg") && svg.contains("<path"), "{svg}");
        assert!(svg.len() > 500);
    }

    #[test]
    fn a_view_counts_down_the_qr_code() {
        let mut info = LinkInfo::new();
        info.show_qr("2@x,y,z,w".into(), std::time::Duration::from_secs(60));
        let v = info.view(&TenantId::parse("t").unwrap(), SessionState::Linking);
        assert_eq!(v.status, LinkStatus::Waiting);
        assert!(v.expires_in_s.is_some_and(|s| (58..=60).contains(&s)), "{v:?}");
        assert!(v.qr_svg.is_some());
        info.clear_qr();
        assert!(info.view(&TenantId::parse("t").unwrap(), SessionState::Linking).qr.is_none());
    }
}
