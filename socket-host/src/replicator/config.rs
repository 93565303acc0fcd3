//! The replicator's tuning, and the retry delay it gives a tenant after failed commits.

use std::sync::Arc;
use std::time::Duration;

use wakeeper_shared::domain::MAX_WRITES_PER_COMMIT;

use super::CommitInfo;

/// Tuning of the replicator.
#[derive(Clone)]
pub struct ReplicatorConfig {
    /// How long a tenant's changes are coalesced before a commit, and the least time between two of its
    /// commits.
    pub window: Duration,
    /// Most writes per commit (the store's limit).
    pub max_writes_per_commit: usize,
    /// Most commits in flight across all tenants.
    pub max_in_flight: usize,
    /// First retry delay after an unavailable store.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// Called after every acknowledged commit (benchmarks, tests).
    pub on_commit: Option<CommitHook>,
}

/// A callback told of every acknowledged commit.
pub type CommitHook = Arc<dyn Fn(&CommitInfo) + Send + Sync>;

impl Default for ReplicatorConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(250),
            max_writes_per_commit: MAX_WRITES_PER_COMMIT,
            max_in_flight: 64,
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            on_commit: None,
        }
    }
}

impl std::fmt::Debug for ReplicatorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatorConfig")
            .field("window", &self.window)
            .field("max_writes_per_commit", &self.max_writes_per_commit)
            .field("max_in_flight", &self.max_in_flight)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .finish_non_exhaustive()
    }
}

/// Exponential backoff with full jitter between half and the whole step.
pub(super) fn backoff(config: &ReplicatorConfig, failures: u32) -> Duration {
    let exp = config.backoff_initial.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let step = exp.min(config.backoff_max);
    let mut r = [0u8; 4];
    let _ = getrandom::fill(&mut r);
    let frac = f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX);
    step.mul_f64(0.5 + 0.5 * frac)
}
