//! Faults on [`SimHandle`]: actions on logged-in connections now (drop, half-open, stream error), and settings
//! that hold from now on (pongs, refusals, handshake delay), per device or for all.

use std::time::Duration;

use tokio::time::Instant;

use super::{SimError, SimHandle};
use crate::faults::{Command, PongMode, Refusal, Settings, SettingsView, StreamErrorKind, Target};

impl SimHandle {
    // ---- fault actions (logged-in connections, now) ----

    /// Closes the TCP connections of the target without a close frame or stream error. Returns how many.
    pub fn drop_connections(&self, target: &Target) -> usize {
        self.act(target, Command::Drop)
    }

    /// Makes the target's connections half-open: the server stops answering (and stops reading, as far as
    /// the client can tell) but keeps the socket. Returns how many.
    pub fn half_open(&self, target: &Target) -> usize {
        self.act(target, Command::HalfOpen)
    }

    /// Ends the target's connections with a stream error. Returns how many.
    pub fn stream_error(&self, target: &Target, kind: StreamErrorKind) -> usize {
        self.act(target, Command::StreamError(kind))
    }

    fn act(&self, target: &Target, command: Command) -> usize {
        let n = match target {
            Target::All => self.shared.command_all(command),
            Target::Device(jid) => self.shared.command_device(jid, command),
        };
        tracing::debug!(?target, ?command, connections = n, "fault action");
        n
    }

    // ---- fault settings (from now on) ----

    /// How keepalive pings are answered for the target.
    pub fn set_pong(&self, target: &Target, mode: PongMode) -> Result<(), SimError> {
        self.settings_mut(target, |s| s.pong = Some(mode))
    }

    /// Refuses the target's connects with 429 or 503 for a while.
    pub fn refuse_connects(&self, target: &Target, refusal: Refusal) -> Result<(), SimError> {
        if refusal.code != 429 && refusal.code != 503 {
            return Err(SimError::InvalidFault(format!("refusal code {} (want 429 or 503)", refusal.code)));
        }
        let until = Instant::now() + refusal.duration;
        self.settings_mut(target, |s| s.refusal = Some((refusal, until)))
    }

    /// Adds latency to the target's handshakes (`None` removes it).
    pub fn set_handshake_delay(&self, target: &Target, delay: Option<Duration>) -> Result<(), SimError> {
        self.settings_mut(target, |s| s.handshake_delay = delay)
    }

    /// Clears every setting of the target (the global ones for [`Target::All`]).
    pub fn clear_faults(&self, target: &Target) -> Result<(), SimError> {
        self.settings_mut(target, |s| *s = Settings::default())
    }

    /// The settings of the target as set (not merged with the global ones).
    pub fn fault_settings(&self, target: &Target) -> Result<SettingsView, SimError> {
        let s = self.shared.lock();
        let now = Instant::now();
        match target {
            Target::All => Ok(s.global.view(now)),
            Target::Device(jid) => {
                s.devices.get(jid).map(|d| d.settings.view(now)).ok_or_else(|| SimError::UnknownDevice(jid.clone()))
            }
        }
    }

    fn settings_mut(&self, target: &Target, f: impl FnOnce(&mut Settings)) -> Result<(), SimError> {
        self.shared.update(|s| match target {
            Target::All => {
                f(&mut s.global);
                Ok(())
            }
            Target::Device(jid) => match s.devices.get_mut(jid) {
                Some(d) => {
                    f(&mut d.settings);
                    Ok(())
                }
                None => Err(SimError::UnknownDevice(jid.clone())),
            },
        })
    }
}
