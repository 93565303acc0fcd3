//! What a real server would notice about its clients, kept cheaply while connections come and go and
//! handed out as plain serialisable snapshots.
//!
//! The figure that matters most is [`DeviceObservation::max_concurrent_connections`]: two logged-in
//! connections of one device at once is the conflict (440) the host must never cause.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::noise::Pattern;

/// How many attempt instants are kept per device (the newest ones).
const ATTEMPT_HISTORY: usize = 256;
/// How many distinct noise keys are remembered per device.
const KEY_HISTORY: usize = 16;
/// The per-second series stops growing after a day; totals keep counting.
const MAX_SERIES_SECONDS: usize = 24 * 3600;

/// Everything the simulator observed, at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Observations {
    /// Totals over all devices.
    pub summary: Summary,
    /// Connect attempts (accepted TCP connections) in each second since start; index 0 is the first second.
    pub attempts_per_second: Vec<u32>,
    /// Per device, by phone-number JID. Devices that only ever presented unknown credentials are included.
    pub devices: BTreeMap<String, DeviceObservation>,
}

/// Totals over all devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Milliseconds since the simulator started.
    pub uptime_ms: u64,
    /// Accepted TCP connections.
    pub connect_attempts: u64,
    /// The most connect attempts seen in one second.
    pub peak_attempts_per_second: u32,
    /// Noise handshakes that completed (any pattern).
    pub handshakes_completed: u64,
    /// Of those, Noise IK resumptions.
    pub handshakes_ik: u64,
    /// Of those, XX fallbacks after an IK attempt with a stale server key.
    pub handshakes_fallback: u64,
    /// Connections that ended before the handshake completed (bad bytes, timeouts, refused upgrades).
    pub handshakes_failed: u64,
    /// `<success>` stanzas sent.
    pub logins: u64,
    /// `<failure reason="401">` stanzas sent (unknown, revoked, or wrong key).
    pub rejected_logins: u64,
    /// Connects refused with 429 or 503 (at the upgrade or as a stream error).
    pub refused: u64,
    /// Stream errors sent on request (faults) or to resolve a conflict.
    pub stream_errors: u64,
    /// Sockets open right now, in any state.
    pub open_connections: u64,
    /// The most sockets open at once.
    pub peak_open_connections: u64,
    /// Logged-in connections right now.
    pub logged_in_connections: u64,
    /// The most logged-in connections at once.
    pub peak_logged_in_connections: u64,
    /// Keepalive pings received.
    pub pings: u64,
    /// Fresh clients that asked to pair (QR codes handed out).
    pub pairings_started: u64,
    /// Pairings the client confirmed (`pair-device-sign` received).
    pub pairings_completed: u64,
}

/// What one device did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceObservation {
    /// The device's phone-number JID.
    pub jid: String,
    /// The tenant it was minted for, if any.
    pub tenant: Option<String>,
    /// Whether the registry knows the device (a login with these credentials can succeed).
    pub registered: bool,
    /// Whether the device has been revoked (its next login gets 401).
    pub revoked: bool,
    /// Logged-in connections right now.
    pub current_connections: u32,
    /// The most logged-in connections at once. More than one is a conflict.
    pub max_concurrent_connections: u32,
    /// Handshakes that claimed this device (whatever came of them).
    pub connect_attempts: u64,
    /// `<success>` sent.
    pub logins: u64,
    /// `<failure reason="401">` sent.
    pub rejected_logins: u64,
    /// Refused with 429/503.
    pub refused: u64,
    /// Stream errors this device's connections were ended with.
    pub stream_errors: u64,
    /// Connections ended with `<conflict type="replaced"/>` because a newer one logged in.
    pub replaced_by_newer: u64,
    /// Of the handshakes, how many were Noise IK.
    pub ik_handshakes: u64,
    /// When each recent attempt happened, in milliseconds since the simulator started (newest last).
    pub attempt_times_ms: Vec<u64>,
    /// The noise static public keys presented for this JID, hex, in first-seen order.
    pub presented_noise_keys: Vec<String>,
    /// The key presented last, hex.
    pub last_presented_noise_key: Option<String>,
    /// Logins refused because the presented key was not the registered one.
    pub wrong_key_attempts: u64,
    /// Keepalive pings received.
    pub pings: u64,
    /// One-time pre-keys the server holds for the device.
    pub prekeys_held: u32,
    /// IQs answered, by namespace (`encrypt`, `usync`, `abt`, ...); keepalive pings count in `pings`.
    pub iqs_answered: BTreeMap<String, u64>,
}

impl DeviceObservation {
    /// Milliseconds between consecutive attempts, oldest first.
    pub fn attempt_gaps_ms(&self) -> Vec<u64> {
        self.attempt_times_ms.windows(2).map(|w| w[1].saturating_sub(w[0])).collect()
    }
}

/// Mutable counters behind the snapshots. Lives inside the simulator's state lock.
#[derive(Default)]
pub(crate) struct Recorder {
    summary: Summary,
    series: Vec<u32>,
    devices: HashMap<String, DeviceCounters>,
}

#[derive(Default)]
struct DeviceCounters {
    current: u32,
    max_concurrent: u32,
    attempts: u64,
    logins: u64,
    rejected: u64,
    refused: u64,
    stream_errors: u64,
    replaced: u64,
    ik: u64,
    attempt_times: VecDeque<u64>,
    keys: Vec<[u8; 32]>,
    last_key: Option<[u8; 32]>,
    wrong_key: u64,
    pings: u64,
    iqs: BTreeMap<String, u64>,
}

/// Registry facts merged into a device's observation at snapshot time.
pub(crate) struct RegistryFacts {
    pub(crate) tenant: Option<String>,
    pub(crate) revoked: bool,
    pub(crate) prekeys_held: u32,
}

impl Recorder {
    pub(crate) fn connect_attempt(&mut self, second: usize) {
        self.summary.connect_attempts += 1;
        if second < MAX_SERIES_SECONDS {
            if self.series.len() <= second {
                self.series.resize(second + 1, 0);
            }
            self.series[second] += 1;
            self.summary.peak_attempts_per_second = self.summary.peak_attempts_per_second.max(self.series[second]);
        }
    }

    pub(crate) fn socket_opened(&mut self) {
        self.summary.open_connections += 1;
        self.summary.peak_open_connections = self.summary.peak_open_connections.max(self.summary.open_connections);
    }

    pub(crate) fn socket_closed(&mut self) {
        self.summary.open_connections = self.summary.open_connections.saturating_sub(1);
    }

    pub(crate) fn handshake_failed(&mut self) {
        self.summary.handshakes_failed += 1;
    }

    pub(crate) fn pairing_started(&mut self) {
        self.summary.pairings_started += 1;
    }

    pub(crate) fn pairing_completed(&mut self) {
        self.summary.pairings_completed += 1;
    }

    pub(crate) fn refused_at_upgrade(&mut self) {
        self.summary.refused += 1;
    }

    /// A handshake completed and claimed `jid` with `key`.
    pub(crate) fn handshake(&mut self, jid: &str, key: &[u8; 32], pattern: Pattern, at_ms: u64) {
        self.summary.handshakes_completed += 1;
        match pattern {
            Pattern::Ik => self.summary.handshakes_ik += 1,
            Pattern::XxFallback => self.summary.handshakes_fallback += 1,
            Pattern::Xx => {}
        }
        let d = self.device(jid);
        d.attempts += 1;
        if pattern == Pattern::Ik {
            d.ik += 1;
        }
        if d.attempt_times.len() == ATTEMPT_HISTORY {
            d.attempt_times.pop_front();
        }
        d.attempt_times.push_back(at_ms);
        if !d.keys.contains(key) && d.keys.len() < KEY_HISTORY {
            d.keys.push(*key);
        }
        d.last_key = Some(*key);
    }

    pub(crate) fn rejected(&mut self, jid: &str, wrong_key: bool) {
        self.summary.rejected_logins += 1;
        let d = self.device(jid);
        d.rejected += 1;
        if wrong_key {
            d.wrong_key += 1;
        }
    }

    pub(crate) fn refused(&mut self, jid: &str) {
        self.summary.refused += 1;
        self.device(jid).refused += 1;
    }

    /// A login succeeded; returns the device's number of logged-in connections including this one.
    pub(crate) fn logged_in(&mut self, jid: &str) -> u32 {
        self.summary.logins += 1;
        self.summary.logged_in_connections += 1;
        self.summary.peak_logged_in_connections =
            self.summary.peak_logged_in_connections.max(self.summary.logged_in_connections);
        let d = self.device(jid);
        d.logins += 1;
        d.current += 1;
        d.max_concurrent = d.max_concurrent.max(d.current);
        d.current
    }

    pub(crate) fn logged_out(&mut self, jid: &str) {
        self.summary.logged_in_connections = self.summary.logged_in_connections.saturating_sub(1);
        let d = self.device(jid);
        d.current = d.current.saturating_sub(1);
    }

    pub(crate) fn stream_error(&mut self, jid: &str, replaced_by_newer: bool) {
        self.summary.stream_errors += 1;
        let d = self.device(jid);
        d.stream_errors += 1;
        if replaced_by_newer {
            d.replaced += 1;
        }
    }

    pub(crate) fn iq(&mut self, jid: &str, xmlns: &str) {
        let d = self.device(jid);
        match d.iqs.get_mut(xmlns) {
            Some(n) => *n += 1,
            None => {
                d.iqs.insert(xmlns.to_owned(), 1);
            }
        }
    }

    pub(crate) fn ping(&mut self, jid: &str) {
        self.summary.pings += 1;
        self.device(jid).pings += 1;
    }

    fn device(&mut self, jid: &str) -> &mut DeviceCounters {
        if !self.devices.contains_key(jid) {
            self.devices.insert(jid.to_owned(), DeviceCounters::default());
        }
        self.devices.get_mut(jid).expect("inserted above")
    }

    pub(crate) fn summary(&self, uptime_ms: u64) -> Summary {
        Summary { uptime_ms, ..self.summary.clone() }
    }

    pub(crate) fn series(&self) -> Vec<u32> {
        self.series.clone()
    }

    pub(crate) fn observation(&self, jid: &str, facts: Option<&RegistryFacts>) -> Option<DeviceObservation> {
        let d = self.devices.get(jid);
        if d.is_none() && facts.is_none() {
            return None;
        }
        let empty = DeviceCounters::default();
        let d = d.unwrap_or(&empty);
        Some(DeviceObservation {
            jid: jid.to_owned(),
            tenant: facts.and_then(|f| f.tenant.clone()),
            registered: facts.is_some(),
            revoked: facts.is_some_and(|f| f.revoked),
            current_connections: d.current,
            max_concurrent_connections: d.max_concurrent,
            connect_attempts: d.attempts,
            logins: d.logins,
            rejected_logins: d.rejected,
            refused: d.refused,
            stream_errors: d.stream_errors,
            replaced_by_newer: d.replaced,
            ik_handshakes: d.ik,
            attempt_times_ms: d.attempt_times.iter().copied().collect(),
            presented_noise_keys: d.keys.iter().map(hex).collect(),
            last_presented_noise_key: d.last_key.as_ref().map(hex),
            wrong_key_attempts: d.wrong_key,
            pings: d.pings,
            prekeys_held: facts.map_or(0, |f| f.prekeys_held),
            iqs_answered: d.iqs.clone(),
        })
    }

    pub(crate) fn observed_jids(&self) -> impl Iterator<Item = &String> {
        self.devices.keys()
    }
}

/// Lowercase hex of a key.
pub fn hex(bytes: &[u8; 32]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_logins_of_one_device_are_remembered() {
        let mut r = Recorder::default();
        let jid = "551100000000:3@s.whatsapp.net";
        assert_eq!(r.logged_in(jid), 1);
        assert_eq!(r.logged_in(jid), 2);
        r.logged_out(jid);
        r.logged_out(jid);
        let o = r.observation(jid, None).unwrap();
        assert_eq!(o.current_connections, 0);
        assert_eq!(o.max_concurrent_connections, 2);
        assert_eq!(r.summary(0).peak_logged_in_connections, 2);
    }

    #[test]
    fn attempts_feed_the_series_and_the_peak() {
        let mut r = Recorder::default();
        for s in [0, 0, 2, 2, 2] {
            r.connect_attempt(s);
        }
        assert_eq!(r.series(), vec![2, 0, 3]);
        assert_eq!(r.summary(0).peak_attempts_per_second, 3);
    }

    #[test]
    fn presented_keys_are_distinct_and_gaps_are_derived() {
        let mut r = Recorder::default();
        let jid = "j";
        r.handshake(jid, &[1; 32], Pattern::Xx, 100);
        r.handshake(jid, &[1; 32], Pattern::Ik, 1100);
        r.handshake(jid, &[2; 32], Pattern::Ik, 3100);
        let o = r.observation(jid, None).unwrap();
        assert_eq!(o.presented_noise_keys.len(), 2);
        assert_eq!(o.last_presented_noise_key.as_deref(), Some(hex(&[2; 32]).as_str()));
        assert_eq!(o.attempt_gaps_ms(), vec![1000, 2000]);
        assert_eq!(o.ik_handshakes, 2);
    }
}
