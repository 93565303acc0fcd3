//! Linking a new number: what a link attempt shows (the rotating QR code, a pairing code, the outcome), the
//! checks on a phone number, and the QR code rendered as SVG so the dashboard needs no script library.
//!
//! The attempt itself runs in the tenant's supervisor ([`crate::session::spawn_link`]) on an empty working
//! copy; [`crate::host::Host::link`] decides whether a tenant may be linked and starts it.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;
use wakeeper_shared::domain::{SessionState, TenantId, UnixMillis, now_millis};
use wakeeper_shared::host_api::{LinkStatus, LinkView};

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
