//! A full disk is an outage, never a loss: the task that watches the host's local disk faults and ends them.
//!
//! Every writer reports its failed writes to the shared [`DiskWatch`] (the embedded store and the outbox by
//! file, the working copies under `<data>/tenants`). This task turns that record into what an operator sees
//! and what lets the host carry on:
//!
//! - **Reported once.** A new fault is logged once at error level, naming the path, the kind (`full` or
//!   `unavailable`), the free space and the failed operation; `wakeeper_disk_fault{path}` goes to 1,
//!   `wakeeper_disk_faults_total{kind}` counts it, the readiness condition `disk_writable` fails, and one
//!   `alert.disk_fault` event goes to the webhook URLs. Its end is logged once (warn), the gauge goes back to
//!   0, and one `alert.disk_recovered` follows.
//! - **Recovered by itself.** While a fault lasts, the task probes the faulted path's directory (a small
//!   fsynced write) with backoff. Once a probe succeeds, what the path registered to recover runs (the redb
//!   files are closed and reopened in place: redb refuses every call after one failed write until then) and
//!   the fault ends. When the last one ends, sessions waiting in backoff are told to try again at once.
//! - **Found when nothing writes.** With no fault, the data dir itself is probed every
//!   `WAKEEPER_DISK_PROBE_S` seconds, so a full disk shows on `/ready` before a write has to fail.
//!
//! While a fault lasts the control API refuses new work that needs the disk (`503 disk_full` /
//! `disk_unavailable`, see `api.rs`); open sessions stay open while they need no write. Nothing
//! acknowledged is lost: a working-copy append or an outbox write that fails is never acknowledged (the
//! engine does not ack the inbound message, so WhatsApp delivers it again).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use wakeeper_shared::disk::{DiskFault, DiskWatch, classify, dir_of, free_bytes, probe};
use wakeeper_shared::domain::{SessionState, UnixMillis, now_millis};

use crate::host::Host;
use crate::readiness::Condition;
use crate::webhooks::Webhooks;

/// The event type of a new disk fault.
pub const DISK_FAULT: &str = "alert.disk_fault";
/// The event type of a disk fault's end.
pub const DISK_RECOVERED: &str = "alert.disk_recovered";

/// How the task paces itself.
#[derive(Debug, Clone)]
pub struct DiskHealthConfig {
    /// With no fault: how often the data dir is probed (`None`: never; faults are then found by failed writes).
    pub probe_every: Option<Duration>,
    /// While a fault lasts: the first wait between probes, doubled after each failed one...
    pub retry_first: Duration,
    /// ...up to this.
    pub retry_max: Duration,
}

impl Default for DiskHealthConfig {
    fn default() -> Self {
        Self {
            probe_every: Some(Duration::from_secs(10)),
            retry_first: Duration::from_millis(250),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// What the task works with.
pub struct DiskHealth {
    /// The shared record of faults.
    pub disk: DiskWatch,
    /// The data dir (probed when no fault is known).
    pub data_dir: PathBuf,
    /// The readiness condition `disk_writable`.
    pub condition: Condition,
    /// Where alerts go.
    pub webhooks: Webhooks,
    /// Whose sessions are nudged after a recovery.
    pub host: Arc<Host>,
    /// Pacing.
    pub config: DiskHealthConfig,
}

/// A disk fault or its end, as a webhook event (the same signature and headers as every host event).
#[derive(Debug, Clone, Serialize)]
pub struct DiskEvent {
    /// Unique id (idempotency key).
    pub id: String,
    /// [`DISK_FAULT`] or [`DISK_RECOVERED`].
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The host that raised it.
    pub host_id: String,
    /// The faulted file or directory.
    pub path: String,
    /// `full` or `unavailable`.
    pub fault: &'static str,
    /// Free bytes on its file system when last looked at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    /// The failed operation and its error, in words.
    pub reason: String,
    /// When the fault began.
    pub since_ms: UnixMillis,
    /// When this event was raised.
    pub at_ms: UnixMillis,
}

fn event_id() -> String {
    wakeeper_shared::crypto::random_hex(12)
}

fn label(path: &Path) -> String {
    path.display().to_string()
}

/// The reason `/ready` shows for the faults now.
fn readiness_reason(faults: &[DiskFault]) -> String {
    faults
        .iter()
        .map(|f| {
            let free = f.free_bytes.map(|b| format!(", {b} bytes free")).unwrap_or_default();
            format!("{}: disk {}{free} ({} failed: {})", f.path.display(), f.kind, f.op, f.error)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl DiskHealth {
    /// Runs for the life of the process.
    pub fn start(self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run())
    }

    async fn run(self) {
        let mut changes = self.disk.subscribe();
        let mut announced: BTreeMap<PathBuf, DiskFault> = BTreeMap::new();
        let mut delay = self.config.retry_first;
        self.condition.set_ok();
        loop {
            changes.mark_unchanged();
            let faults = self.disk.faults();
            self.announce(&mut announced, &faults).await;
            if faults.is_empty() {
                delay = self.config.retry_first;
                self.condition.set_ok();
                match self.config.probe_every {
                    Some(every) => {
                        tokio::select! {
                            _ = changes.changed() => {}
                            _ = tokio::time::sleep(every) => self.probe_data_dir().await,
                        }
                    }
                    None => {
                        let _ = changes.changed().await;
                    }
                }
                continue;
            }
            self.condition.set_failing(readiness_reason(&faults));
            let mut recovered = false;
            for fault in &faults {
                recovered |= self.try_recover(fault).await;
            }
            if recovered {
                // Announce at once (and try the others again without waiting).
                delay = self.config.retry_first;
                continue;
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.config.retry_max);
        }
    }

    /// Logs, counts and alerts each fault once at its start and once at its end.
    async fn announce(&self, announced: &mut BTreeMap<PathBuf, DiskFault>, faults: &[DiskFault]) {
        for fault in faults {
            if announced.contains_key(&fault.path) {
                continue;
            }
            tracing::error!(
                path = %fault.path.display(),
                fault = fault.kind.as_str(),
                free_bytes = fault.free_bytes,
                op = %fault.op,
                error = %fault.error,
                "disk fault: writes there are refused; new work that needs the disk is refused until it ends"
            );
            metrics::gauge!("wakeeper_disk_fault", "path" => label(&fault.path)).set(1.0);
            metrics::counter!("wakeeper_disk_faults_total", "kind" => fault.kind.as_str()).increment(1);
            self.alert(DISK_FAULT, fault).await;
            announced.insert(fault.path.clone(), fault.clone());
        }
        let ended: Vec<PathBuf> = announced.keys().filter(|p| !faults.iter().any(|f| &f.path == *p)).cloned().collect();
        for path in ended {
            let Some(fault) = announced.remove(&path) else { continue };
            let lasted_ms = now_millis().saturating_sub(fault.since_ms);
            tracing::warn!(
                path = %path.display(),
                fault = fault.kind.as_str(),
                lasted_ms,
                free_bytes = free_bytes(&path).ok(),
                "disk fault ended: writes there succeed again"
            );
            metrics::gauge!("wakeeper_disk_fault", "path" => label(&path)).set(0.0);
            self.alert(DISK_RECOVERED, &fault).await;
        }
    }

    async fn alert(&self, kind: &'static str, fault: &DiskFault) {
        let event = DiskEvent {
            id: event_id(),
            kind,
            host_id: self.host.host_id().to_owned(),
            path: label(&fault.path),
            fault: fault.kind.as_str(),
            free_bytes: if kind == DISK_RECOVERED { free_bytes(&fault.path).ok() } else { fault.free_bytes },
            reason: format!("{} failed: {}", fault.op, fault.error),
            since_ms: fault.since_ms,
            at_ms: now_millis(),
        };
        let body = serde_json::to_vec(&event).expect("a disk event serializes");
        self.webhooks.send(&event.id, body).await;
    }

    /// Probes the fault's directory; when it takes a write, recovers the path. Whether the fault ended.
    async fn try_recover(&self, fault: &DiskFault) -> bool {
        let dir = dir_of(&fault.path).to_path_buf();
        let probed = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || probe(&dir)).await
        };
        match probed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.disk.refine(&fault.path, classify(&e), free_bytes(&dir).ok());
                return false;
            }
            Err(_) => return false,
        }
        if let Some(recover) = self.disk.recoverer(&fault.path) {
            match tokio::task::spawn_blocking(move || recover.recover()).await {
                Ok(Ok(())) => {}
                Ok(Err(why)) => {
                    tracing::debug!(path = %fault.path.display(), error = %why, "reopening after a disk fault failed; retrying");
                    return false;
                }
                Err(_) => return false,
            }
        }
        self.disk.clear(&fault.path);
        if self.disk.fault().is_none() {
            self.nudge_sessions();
        }
        true
    }

    /// With no fault known: a probe of the data dir finds a full disk before a write must fail.
    async fn probe_data_dir(&self) {
        let dir = self.data_dir.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || probe(&dir)).await {
            self.disk.report_io(&self.data_dir, "probing the data dir", &e);
        }
    }

    /// Once every fault has ended: sessions waiting in backoff try again now instead of at the end of their
    /// backoff, and sessions that had a write refused reconnect, so WhatsApp delivers again what they could
    /// not acknowledge (it redelivers unacknowledged messages on connect). Every other session is untouched.
    fn nudge_sessions(&self) {
        let refused: std::collections::BTreeSet<String> = self.disk.take_refused_writers().into_iter().collect();
        let nudged: Vec<_> = self
            .host
            .list()
            .into_iter()
            .filter(|v| v.state == SessionState::Backoff || refused.contains(v.tenant_id.as_str()))
            .map(|v| v.tenant_id)
            .collect();
        if !nudged.is_empty() {
            tracing::info!(
                sessions = nudged.len(),
                "disk writable again: sessions in backoff or with refused writes reconnect now"
            );
        }
        for tenant in nudged {
            self.host.reconnect(&tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wakeeper_shared::disk::FaultKind;

    #[test]
    fn the_readiness_reason_names_path_kind_space_and_cause() {
        let fault = DiskFault {
            path: PathBuf::from("/data/store.redb"),
            kind: FaultKind::Full,
            since_ms: 1,
            op: "committing a write".into(),
            error: "No space left on device (os error 28)".into(),
            free_bytes: Some(0),
        };
        assert_eq!(
            readiness_reason(&[fault]),
            "/data/store.redb: disk full, 0 bytes free (committing a write failed: No space left on device (os error 28))"
        );
    }
}
