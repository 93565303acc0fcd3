//! What can go wrong, and for whom.
//!
//! Two kinds of fault exist. Actions hit the connections that are logged in right now and are then done:
//! dropping the TCP connection, going half-open, sending a stream error. Settings shape what happens from
//! now on until cleared: how keepalive pings are answered, whether connects are refused, how slow the
//! handshake is. Settings exist globally and per device; a device's own setting wins over the global one.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which connections or devices a fault applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Every connection, or the global setting.
    All,
    /// One device, by its phone-number JID (`5511xxxxxxxx:7@s.whatsapp.net`).
    Device(String),
}

impl Target {
    /// One device.
    pub fn device(jid: impl Into<String>) -> Self {
        Self::Device(jid.into())
    }
}

/// A `<stream:error>` the server can end a logged-in connection with. Each maps to what the engine does
/// with it: 401 logs out, 440 means another client took over (never reconnect), 503 and 429 reconnect with
/// backoff (429 with a longer one), 515 asks for an immediate reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamErrorKind {
    /// `<stream:error code="401"/>`: the device is logged out.
    Unauthorized,
    /// `<stream:error><conflict type="replaced"/></stream:error>` (Baileys calls it 440).
    Replaced,
    /// `<stream:error><conflict type="device_removed"/></stream:error>`: unlinked from the phone.
    DeviceRemoved,
    /// `<stream:error code="429"/>`: rate limited.
    RateLimited,
    /// `<stream:error code="503"/>`: service unavailable.
    Unavailable,
    /// `<stream:error code="515"/>`: restart required.
    RestartRequired,
}

impl StreamErrorKind {
    /// The numeric code this error is known by (440 for a replaced session, as Baileys names it).
    pub fn code(self) -> u16 {
        match self {
            Self::Unauthorized => 401,
            Self::Replaced => 440,
            Self::DeviceRemoved => 401,
            Self::RateLimited => 429,
            Self::Unavailable => 503,
            Self::RestartRequired => 515,
        }
    }

    /// The kind for a numeric code (401, 429, 440, 503, 515).
    pub fn from_code(code: u16) -> Option<Self> {
        Some(match code {
            401 => Self::Unauthorized,
            429 => Self::RateLimited,
            440 => Self::Replaced,
            503 => Self::Unavailable,
            515 => Self::RestartRequired,
            _ => return None,
        })
    }
}

/// How keepalive pings (`<iq xmlns="w:p">`) are answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum PongMode {
    /// At once.
    #[default]
    Normal,
    /// After a delay (milliseconds on the wire).
    Delay {
        /// How long each pong is held back.
        #[serde(with = "millis", rename = "delay_ms")]
        delay: Duration,
    },
    /// Never.
    Drop,
}

/// Where a refused connect is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusePoint {
    /// After the handshake, as `<stream:error code="…"/>` then close: the engine applies its own handling
    /// (429 adds five backoff steps). Per-device refusals always happen here, since only the handshake
    /// says which device is connecting.
    #[default]
    Stream,
    /// At the WebSocket upgrade, as an HTTP status: the engine sees a failed transport connect.
    Upgrade,
}

/// Refuse connects with 429 or 503 until a deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// 429 or 503.
    pub code: u16,
    /// Where the refusal happens.
    #[serde(default)]
    pub point: RefusePoint,
    /// For how long from now.
    #[serde(with = "millis", rename = "duration_ms")]
    pub duration: Duration,
}

/// Settings that persist until cleared. `None` means "not set here" (fall back to the global value).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Settings {
    pub(crate) pong: Option<PongMode>,
    /// A refusal and the instant it ends.
    pub(crate) refusal: Option<(Refusal, tokio::time::Instant)>,
    pub(crate) handshake_delay: Option<Duration>,
}

impl Settings {
    /// This setting where set, `fallback` otherwise.
    pub(crate) fn over(&self, fallback: &Settings) -> Settings {
        Settings {
            pong: self.pong.or(fallback.pong),
            refusal: self.refusal.or(fallback.refusal),
            handshake_delay: self.handshake_delay.or(fallback.handshake_delay),
        }
    }

    /// The refusal in force at `now`, if any.
    pub(crate) fn active_refusal(&self, now: tokio::time::Instant) -> Option<Refusal> {
        self.refusal.filter(|(_, until)| now < *until).map(|(r, _)| r)
    }
}

/// What the control surface reports about settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsView {
    /// How pings are answered, if set.
    pub pong: Option<PongMode>,
    /// The refusal in force, if any, with the milliseconds it has left.
    pub refusal: Option<(Refusal, u64)>,
    /// Extra handshake latency in milliseconds, if set.
    pub handshake_delay_ms: Option<u64>,
}

impl Settings {
    pub(crate) fn view(&self, now: tokio::time::Instant) -> SettingsView {
        SettingsView {
            pong: self.pong,
            refusal: self
                .refusal
                .filter(|(_, until)| now < *until)
                .map(|(r, until)| (r, until.saturating_duration_since(now).as_millis() as u64)),
            handshake_delay_ms: self.handshake_delay.map(|d| d.as_millis() as u64),
        }
    }
}

/// An action for live connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    /// Close the TCP connection without a WebSocket close frame or stream error.
    Drop,
    /// Stop answering; keep the socket.
    HalfOpen,
    /// End with a stream error.
    StreamError(StreamErrorKind),
    /// A newer connection of the same device logged in: end with `<conflict type="replaced"/>`.
    Superseded,
}

/// Milliseconds on the wire for `Duration` fields.
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_settings_win_over_global_ones() {
        let global = Settings {
            pong: Some(PongMode::Drop),
            handshake_delay: Some(Duration::from_millis(5)),
            ..Default::default()
        };
        let device = Settings { pong: Some(PongMode::Normal), ..Default::default() };
        let eff = device.over(&global);
        assert_eq!(eff.pong, Some(PongMode::Normal));
        assert_eq!(eff.handshake_delay, Some(Duration::from_millis(5)));
    }

    #[test]
    fn refusals_expire() {
        let now = tokio::time::Instant::now();
        let r = Refusal { code: 429, point: RefusePoint::Stream, duration: Duration::from_secs(1) };
        let s = Settings { refusal: Some((r, now + r.duration)), ..Default::default() };
        assert_eq!(s.active_refusal(now), Some(r));
        assert_eq!(s.active_refusal(now + Duration::from_secs(2)), None);
    }

    #[test]
    fn codes_round_trip() {
        for k in [
            StreamErrorKind::Unauthorized,
            StreamErrorKind::Replaced,
            StreamErrorKind::RateLimited,
            StreamErrorKind::Unavailable,
            StreamErrorKind::RestartRequired,
        ] {
            assert_eq!(StreamErrorKind::from_code(k.code()), Some(k));
        }
        assert_eq!(StreamErrorKind::from_code(200), None);
    }

    #[test]
    fn wire_forms_are_stable() {
        let r = Refusal { code: 503, point: RefusePoint::Upgrade, duration: Duration::from_millis(1500) };
        assert_eq!(
            serde_json::to_value(r).unwrap(),
            serde_json::json!({"code": 503, "point": "upgrade", "duration_ms": 1500})
        );
        let p: PongMode = serde_json::from_value(serde_json::json!({"mode": "delay", "delay_ms": 250})).unwrap();
        assert_eq!(p, PongMode::Delay { delay: Duration::from_millis(250) });
    }
}
