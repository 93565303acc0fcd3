//! What the simulator saw, on [`SimHandle`]: totals, the connect series, every device's observation, and
//! waiting until something is seen (re-checked whenever anything observed changes).

use std::time::Duration;

use tokio::time::Instant;

use super::{SimError, SimHandle};
use crate::observe::{DeviceObservation, Observations, Summary};

impl SimHandle {
    /// Totals only (cheap at any scale).
    pub fn summary(&self) -> Summary {
        self.shared.lock().rec.summary(self.shared.uptime_ms())
    }

    /// Connect attempts in each second since start.
    pub fn attempts_per_second(&self) -> Vec<u32> {
        self.shared.lock().rec.series()
    }

    /// Everything, every device included.
    pub fn observations(&self) -> Observations {
        let s = self.shared.lock();
        let mut jids: Vec<&String> = s.devices.keys().chain(s.rec.observed_jids()).collect();
        jids.sort();
        jids.dedup();
        let devices = jids
            .into_iter()
            .filter_map(|j| s.rec.observation(j, s.facts(j).as_ref()).map(|o| (j.clone(), o)))
            .collect();
        Observations { summary: s.rec.summary(self.shared.uptime_ms()), attempts_per_second: s.rec.series(), devices }
    }

    /// One device's observation (also for JIDs that only ever presented unknown credentials).
    pub fn device(&self, jid: &str) -> Option<DeviceObservation> {
        let s = self.shared.lock();
        s.rec.observation(jid, s.facts(jid).as_ref())
    }

    /// Waits until `check` returns `Some`, re-checking whenever anything the simulator observes changes.
    pub async fn wait_for<T>(
        &self,
        limit: Duration,
        mut check: impl FnMut(&SimHandle) -> Option<T>,
    ) -> Result<T, SimError> {
        let deadline = Instant::now() + limit;
        let mut changes = self.shared.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(t) = check(self) {
                return Ok(t);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return check(self).ok_or(SimError::Timeout(limit)),
            }
        }
    }

    /// Waits until a device's observation satisfies `pred`; returns that observation.
    pub async fn wait_for_device(
        &self,
        jid: &str,
        limit: Duration,
        pred: impl Fn(&DeviceObservation) -> bool,
    ) -> Result<DeviceObservation, SimError> {
        self.wait_for(limit, |h| h.device(jid).filter(|o| pred(o))).await
    }
}
