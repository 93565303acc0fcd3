//! A `socket-host` process started by the bench: spawned (under `--host-wrapper` if given), waited on until
//! ready or until N sessions are open, and stopped by SIGKILL or SIGTERM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use wakeeper_shared::domain::{SessionList, SessionState, UnixMillis, now_millis};
use wakeeper_shared::host_api::HostClient;

use crate::TOKEN;
use crate::host_settings::{HOST_ENV, host_wrapper};
use crate::system::free_port;

/// A host process.
pub struct HostProcess {
    child: Option<Child>,
    pub client: HostClient,
    pub base: String,
    pub spawned_ms: UnixMillis,
    log: PathBuf,
}

impl HostProcess {
    pub fn spawn(bin: &Path, data: &Path, wa_url: &str, env: &[(&str, String)], log: PathBuf) -> anyhow::Result<Self> {
        let port = free_port()?;
        let base = format!("http://127.0.0.1:{port}");
        let mut cmd = match host_wrapper() {
            Some(w) => {
                let mut c = Command::new(&w[0]);
                c.args(&w[1..]).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WAKEEPER_LISTEN", format!("127.0.0.1:{port}"))
            .env("WAKEEPER_DATA_DIR", data)
            .env("WAKEEPER_KEY_FILE", data.parent().context("data dir parent")?.join("data.key"))
            .env("WAKEEPER_CONTROL_TOKEN", TOKEN)
            .env("WAKEEPER_HOST_ID", "bench-host")
            .env("WAKEEPER_WA_URL", wa_url)
            .env("WAKEEPER_SWEEP_INTERVAL_S", "0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        for (k, v) in env {
            cmd.env(k, v);
        }
        for (k, v) in HOST_ENV.get().into_iter().flatten() {
            cmd.env(k, v);
        }
        let spawned_ms = now_millis();
        let child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let client = HostClient::new(&base, TOKEN, Duration::from_secs(300))?.with_attempts(1);
        Ok(Self { child: Some(child), client, base, spawned_ms, log })
    }

    /// The host's pid (under a wrapper: the descendant running the host binary, not e.g. heaptrack's own
    /// interpreter process).
    pub fn pid(&self) -> u32 {
        let root = self.child.as_ref().map(|c| c.id()).unwrap_or(0);
        let mut queue = vec![root];
        while let Some(pid) = queue.pop() {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            if exe.as_deref().and_then(Path::file_name) == Some(std::ffi::OsStr::new("socket-host")) {
                return pid;
            }
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            queue.extend(children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        root
    }

    pub async fn ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.client.health().await.is_err() {
            ensure!(Instant::now() < deadline, "host did not answer /health; log {}", self.log.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until `n` sessions are open; returns the list.
    pub async fn all_open(&self, n: usize, limit: Duration) -> anyhow::Result<SessionList> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(list) = self.client.sessions().await {
                let open = list.sessions.iter().filter(|s| s.state == SessionState::Open).count();
                if open >= n {
                    return Ok(list);
                }
                if Instant::now() > deadline {
                    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
                    for s in &list.sessions {
                        *states.entry(s.state.as_str()).or_default() += 1;
                    }
                    bail!("only {open}/{n} open after {limit:?}: {states:?}; log {}", self.log.display());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Seconds from this process's start to the last session of `list` opening.
    pub fn seconds_to_last_open(&self, list: &SessionList) -> f64 {
        let last_open = list.sessions.iter().filter_map(|s| s.connected_since_ms).max().unwrap_or(now_millis());
        (last_open - self.spawned_ms) as f64 / 1000.0
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (graceful: flush, release leases).
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(40);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
