//! Builds a whole host from its [`Config`]: stores, data key, replicator, governor, sessions, HTTP surface.
//! `main` and the end-to-end tests both start the host through here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use wakeeper_shared::crypto::random_hex;
use wakeeper_shared::disk::DiskWatch;
use wakeeper_shared::local::LocalCopies;

use crate::api::AppState;
use crate::config::Config;
use crate::governor::{Governor, GovernorConfig};
use crate::host::Host;
use crate::key_check::KeyCheck;
use crate::replicator::{Replicator, ReplicatorConfig};
use crate::session::SessionConfig;
use crate::stores::{Connect, Stores};
use crate::tenant_opener::TenantOpener;

/// A built host, ready to serve.
pub struct App {
    /// The sessions.
    pub host: Arc<Host>,
    /// Replication of engine writes to the credential store.
    pub replicator: Replicator,
    /// What the HTTP handlers share.
    pub state: Arc<AppState>,
    config: Config,
    /// The readiness condition restore on start reports to.
    restore_finished: crate::readiness::Condition,
}

/// Reads a secret-ish file, trimmed; never logs its content.
fn read_trimmed(path: &Path) -> anyhow::Result<String> {
    let raw = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(raw.trim().to_owned())
}

/// A secret file's content, trimmed: refused when it is a symlink, readable by group or others, or absent.
fn read_secret_trimmed(path: &Path) -> anyhow::Result<String> {
    let raw = wakeeper_shared::private_files::read_secret_file(path)?
        .with_context(|| format!("{} does not exist", path.display()))?;
    let text = String::from_utf8(raw).map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", path.display()))?;
    Ok(text.trim().to_owned())
}

/// Writes `content` to a new file with mode 0600.
fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(content.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// The control token: from the variable, the file, or generated once into the data dir (the CLI reads the
/// same one to talk to a running host).
pub fn control_token(config: &Config) -> anyhow::Result<String> {
    if let Some(t) = existing_control_token(config)? {
        return Ok(t);
    }
    let path = config.data_dir.join("control.token");
    write_private(&path, &random_hex(32))?;
    tracing::info!(path = %path.display(), "generated a control token (read it from this file)");
    read_secret_trimmed(&path)
}

/// The control token as configured (`WAKEEPER_CONTROL_TOKEN`, `WAKEEPER_CONTROL_TOKEN_FILE`) or as generated
/// into the data dir earlier; `None` when there is none yet. What a client of the host reads.
pub fn existing_control_token(config: &Config) -> anyhow::Result<Option<String>> {
    if let Some(t) = config.control_token.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(t.clone()));
    }
    if let Some(path) = &config.control_token_file {
        let t = read_secret_trimmed(path)?;
        anyhow::ensure!(!t.is_empty(), "control token file {} is empty", path.display());
        return Ok(Some(t));
    }
    let path = config.data_dir.join("control.token");
    if !path.exists() {
        return Ok(None);
    }
    read_secret_trimmed(&path).map(Some)
}

/// This host's id: configured, or generated once into the data dir (so a restart takes its own leases back).
fn host_id(config: &Config) -> anyhow::Result<String> {
    if let Some(id) = &config.host_id {
        return Ok(id.clone());
    }
    let path = config.data_dir.join("host-id");
    if !path.exists() {
        write_private(&path, &format!("host-{}", random_hex(6)))?;
    }
    read_trimmed(&path)
}

impl App {
    /// Builds every part from `config`. Fails fast on bad configuration.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        // A receiver can only trust events signed with a key it shares: never sign with an empty one.
        anyhow::ensure!(
            config.webhook_urls.is_empty() || config.webhook_secret.is_some(),
            "WAKEEPER_WEBHOOK_URLS is set but WAKEEPER_WEBHOOK_SECRET is not: set the secret the receivers verify \
             the signature with (e.g. `head -c 32 /dev/urandom | base64`)"
        );
        for url in &config.webhook_urls {
            wakeeper_shared::webhook::check_url(url, config.webhook_allow_http).map_err(|why| {
                anyhow::anyhow!("WAKEEPER_WEBHOOK_URLS: {why} (WAKEEPER_WEBHOOK_ALLOW_HTTP=true allows it)")
            })?;
        }
        // Every local writer reports its disk faults here (see `disk_health`).
        let disk = DiskWatch::new();
        let Stores { credentials, tenants, cipher } =
            Stores::from_config_watched(&config, Connect::OnFirstUse, disk.clone())
                .await
                .context("opening the stores")?;

        let probe_stores = (credentials.clone(), tenants.clone());
        let replicator = Replicator::start(credentials.clone(), ReplicatorConfig::default());
        let local = LocalCopies::new(config.data_dir.clone(), cipher.clone()).reporting_to(disk.clone());
        let key_check = Arc::new(KeyCheck::new());
        let engines = Arc::new(TenantOpener::new(credentials, local, replicator.handle(), key_check.clone()));
        let governor = Arc::new(Governor::new(GovernorConfig {
            rate_per_sec: config.connect_rate,
            burst: config.connect_burst,
            max_in_flight: config.connect_in_flight,
        }));
        let mut session_config = SessionConfig::new(config.wa_url.clone(), host_id(&config)?);
        session_config.lease_ttl = Duration::from_secs(config.lease_ttl_s.max(3));
        session_config.silent_after = Duration::from_secs(config.silent_after_s.max(5));
        let host = Host::new(tenants, engines, governor, session_config);
        host.set_key_check(key_check.clone());

        if let Some(mut fenced) = replicator.take_fenced_events() {
            let host = host.clone();
            tokio::spawn(async move {
                while let Some(f) = fenced.recv().await {
                    tracing::warn!(tenant = %f.tenant, "replication fenced: another host owns this tenant; stopping its client");
                    host.lease_lost(&f.tenant);
                }
            });
        }
        let signer = config
            .webhook_secret
            .as_deref()
            .map(wakeeper_shared::webhook::Signer::new)
            .transpose()
            .map_err(|e| anyhow::anyhow!("WAKEEPER_WEBHOOK_SECRET: {e}"))?;
        // The outbox first: the state events' dead letters are kept there too.
        let outbox = if config.webhook_urls.is_empty() {
            None
        } else {
            let outbox = crate::outbox::Outbox::open_watched(
                config.data_dir.join(crate::outbox::OUTBOX_FILE),
                cipher.clone(),
                config.webhook_urls.clone(),
                config.outbox_max,
                disk.clone(),
            )
            .context("opening the message outbox")?;
            outbox.start_delivery(signer.clone().expect("checked above: webhook URLs come with a secret"));
            host.set_outbox(outbox.clone());
            Some(outbox)
        };
        let webhooks =
            crate::webhooks::start(host.subscribe(), config.webhook_urls.clone(), signer.clone(), outbox.clone());
        let mut state = AppState::new(host.clone(), control_token(&config)?);
        state.disk = disk.clone();
        let restore_finished = state.readiness.condition(crate::readiness::RESTORE_FINISHED);
        key_check.report_to(state.readiness.condition(crate::readiness::DATA_KEY_VERIFIED));
        let (probe_credentials, probe_tenants) = probe_stores;
        crate::store_probe::start(
            probe_credentials,
            probe_tenants,
            state.readiness.condition(crate::store_probe::STORES_REACHABLE),
        );
        crate::disk_health::DiskHealth {
            disk,
            data_dir: config.data_dir.clone(),
            condition: state.readiness.condition(crate::readiness::DISK_WRITABLE),
            webhooks,
            host: host.clone(),
            config: crate::disk_health::DiskHealthConfig {
                probe_every: (config.disk_probe_s > 0).then(|| Duration::from_secs(config.disk_probe_s)),
                ..Default::default()
            },
        }
        .start();
        let state = Arc::new(state);
        Ok(Self { host, replicator, state, config, restore_finished })
    }

    /// Serves until `shutdown` resolves, then stops every session, flushes replication and releases leases
    /// within the configured deadline.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(
            listen = %listener.local_addr()?,
            data_dir = %self.config.data_dir.display(),
            host_id = %self.host.host_id(),
            boot_id = %self.state.boot_id,
            "host started"
        );
        if self.config.restore_on_start {
            let (host, finished) = (self.host.clone(), self.restore_finished.clone());
            tokio::spawn(async move { crate::restore_on_start::restore_until_done(&host, finished).await });
        } else {
            self.restore_finished.set_ok();
        }
        if self.config.sweep_interval_s > 0 {
            self.state.sweeper.clone().start(Duration::from_secs(self.config.sweep_interval_s));
        }
        // The whole shutdown fits the deadline counted from the signal: the HTTP drain a quarter of it, then
        // stopping sessions, then flushing replication until the end.
        let (signalled, signalled_at) = tokio::sync::oneshot::channel();
        let signal = async move {
            shutdown.await;
            let _ = signalled.send(tokio::time::Instant::now());
        };
        let limits = crate::http::HttpLimits {
            header_read_timeout: Duration::from_secs(self.config.http_header_timeout_s.max(1)),
            max_connections: self.config.http_max_connections.max(1),
        };
        let mut server =
            tokio::spawn(crate::http::serve(listener, crate::api::router(self.state.clone()), limits, signal));
        let started = signalled_at.await.unwrap_or_else(|_| tokio::time::Instant::now());
        let deadline = Duration::from_secs(self.config.shutdown_deadline_s);
        let end = started + deadline;
        match tokio::time::timeout_at(started + deadline / 4, &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "the HTTP server failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "the HTTP server task failed"),
            Err(_) => {
                server.abort();
                tracing::warn!(
                    "HTTP requests still running at a quarter of the shutdown deadline; not waiting for them"
                );
            }
        }
        let left = end.saturating_duration_since(tokio::time::Instant::now());
        let still_running = self.host.shutdown(left.mul_f64(0.6)).await;
        let report = self.replicator.flush(end).await;
        tracing::info!(
            still_running,
            pending_tenants = report.pending_tenants,
            pending_changes = report.pending_changes,
            took_ms = started.elapsed().as_millis() as u64,
            "host stopped"
        );
        Ok(())
    }
}
