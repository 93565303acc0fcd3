//! Per-tenant reconnect backoff: the delay before the next attempt, from the failure history. Pure; the
//! caller supplies the random jitter so tests are exact.

use std::time::Duration;

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// Delay after the first failed attempt.
    pub base: Duration,
    /// Largest delay.
    pub cap: Duration,
    /// Smallest delay after WhatsApp answered 429 (rate limited).
    pub rate_limited_floor: Duration,
    /// An open session that lasted this long resets the failure count.
    pub stable_after: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(120),
            rate_limited_floor: Duration::from_secs(30),
            stable_after: Duration::from_secs(60),
        }
    }
}

impl BackoffPolicy {
    /// The delay before attempt `failures + 1`, where `failures` consecutive attempts have failed.
    ///
    /// No failures yet (a socket that just dropped) means no delay: reconnect at once, paced only by the
    /// host's governor. After that the delay doubles per failure up to `cap`, with "equal jitter": half
    /// fixed, half scaled by `jitter` in `[0, 1)`, so a fleet that failed together spreads out. A 429 jumps
    /// to at least `rate_limited_floor` and grows four times faster.
    pub fn delay(&self, failures: u32, rate_limited: bool, jitter: f64) -> Duration {
        if failures == 0 && !rate_limited {
            return Duration::ZERO;
        }
        let steps = if rate_limited { failures.saturating_mul(2) } else { failures.saturating_sub(1) };
        let grown = self.base.saturating_mul(1u32.checked_shl(steps.min(20)).unwrap_or(u32::MAX));
        let mut ceiling = grown.min(self.cap);
        if rate_limited {
            ceiling = ceiling.max(self.rate_limited_floor).min(self.cap.max(self.rate_limited_floor));
        }
        let jitter = jitter.clamp(0.0, 1.0);
        ceiling / 2 + ceiling.mul_f64(jitter / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_drop_reconnects_at_once() {
        assert_eq!(BackoffPolicy::default().delay(0, false, 0.9), Duration::ZERO);
    }

    #[test]
    fn grows_and_caps() {
        let p = BackoffPolicy::default();
        let d: Vec<_> = (1..=12).map(|f| p.delay(f, false, 1.0)).collect();
        assert_eq!(d[0], Duration::from_millis(500));
        assert_eq!(d[1], Duration::from_millis(1000));
        assert_eq!(d[2], Duration::from_millis(2000));
        assert!(d.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*d.last().unwrap(), p.cap);
        assert_eq!(p.delay(u32::MAX, false, 1.0), p.cap);
    }

    #[test]
    fn jitter_spreads_within_half_to_full() {
        let p = BackoffPolicy::default();
        assert_eq!(p.delay(3, false, 0.0), Duration::from_millis(1000));
        assert_eq!(p.delay(3, false, 0.5), Duration::from_millis(1500));
        assert_eq!(p.delay(3, false, 2.0), Duration::from_millis(2000));
    }

    #[test]
    fn rate_limit_grows_sharply() {
        let p = BackoffPolicy::default();
        assert!(p.delay(0, true, 0.0) >= p.rate_limited_floor / 2);
        assert!(p.delay(1, true, 1.0) >= p.rate_limited_floor);
        assert!(p.delay(3, true, 1.0) > p.delay(3, false, 1.0));
        assert!(p.delay(10, true, 1.0) <= p.cap);
    }
}
