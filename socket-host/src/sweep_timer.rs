//! The health sweep inside the host on a timer (one-machine use): the same `shared::sweep` logic the Lambda
//! function runs, acting on this host's sessions directly instead of over HTTP.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use wakeeper_shared::alerts::LogAlerts;
use wakeeper_shared::domain::{SessionList, TenantId, now_millis};
use wakeeper_shared::ports::{EnsureAnswer, HostError, HostOps};
use wakeeper_shared::sweep::{SweepMemory, SweepPolicy, SweepReport, run_sweep};

use crate::host::{EnsureError, Host};

/// This host, as the sweep sees a host.
pub struct InProcessHost {
    host: Arc<Host>,
    boot_id: String,
}

impl InProcessHost {
    /// `host` under its `boot_id`.
    pub fn new(host: Arc<Host>, boot_id: String) -> Self {
        Self { host, boot_id }
    }
}

#[async_trait]
impl HostOps for InProcessHost {
    async fn sessions(&self) -> Result<SessionList, HostError> {
        Ok(SessionList {
            boot_id: self.boot_id.clone(),
            sessions: self.host.list(),
            host_errors: self.host.host_errors(),
        })
    }

    async fn ensure(&self, tenant: &TenantId) -> Result<EnsureAnswer, HostError> {
        match self.host.ensure(tenant).await {
            Ok(e) if e.already_running => Ok(EnsureAnswer::AlreadyRunning),
            Ok(_) => Ok(EnsureAnswer::Started),
            Err(EnsureError::CredentialsMissing) => Ok(EnsureAnswer::CredentialsMissing),
            Err(EnsureError::CredentialsCorrupt) => Ok(EnsureAnswer::CredentialsCorrupt),
            Err(EnsureError::ShuttingDown) => Err(HostError::Unreachable("host shutting down".into())),
            Err(e @ EnsureError::DataKeyMismatch(_)) => Err(HostError::Refused(e.to_string())),
        }
    }

    async fn reconnect(&self, tenant: &TenantId) -> Result<(), HostError> {
        if self.host.reconnect(tenant) { Ok(()) } else { Err(HostError::NotFound) }
    }
}

/// Runs sweeps one at a time (a timer tick and an API request never overlap).
pub struct Sweeper {
    ops: InProcessHost,
    memory: Mutex<SweepMemory>,
    policy: SweepPolicy,
}

impl Sweeper {
    /// A sweeper over `host`.
    pub fn new(host: Arc<Host>, boot_id: String) -> Self {
        Self {
            ops: InProcessHost::new(host, boot_id),
            memory: Mutex::new(SweepMemory::default()),
            policy: SweepPolicy::default(),
        }
    }

    /// One sweep now.
    pub async fn sweep(&self) -> Result<SweepReport, String> {
        let mut memory = self.memory.lock().await;
        let tenants = self.ops.host.tenants().clone();
        run_sweep(tenants.as_ref(), &self.ops, &mut memory, &LogAlerts, &self.policy, now_millis())
            .await
            .map_err(|e| e.to_string())
    }

    /// Sweeps every `interval` until the process ends.
    pub fn start(self: Arc<Self>, interval: Duration) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await; // the restore on start covers the first moments
            loop {
                tick.tick().await;
                // `run_sweep` logs its own report; only a failure to run at all is told here.
                if let Err(e) = self.sweep().await {
                    tracing::warn!(error = %e, "sweep failed");
                }
            }
        });
    }
}
