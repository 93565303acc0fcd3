//! The host binary as a child process: a free port, the embedded defaults of a test's [`Dirs`], its log in a
//! file (shown when the test fails), ready and state polling through the control API, SIGTERM and SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wakeeper_shared::domain::{SessionList, SessionState, TenantId};
use wakeeper_shared::host_api::HostClient;

use crate::dirs::Dirs;
use crate::wait::wait_until;

/// The control token of every test host.
pub const TOKEN: &str = "test-token-0123456789";

/// The host's log filter unless `WAKEEPER_TEST_HOST_LOG` says otherwise.
pub const DEFAULT_HOST_LOG: &str = "info,whatsapp_rust=warn,wacore=warn";

/// How to start the host: which binary, under which command (none, or e.g. `setpriv ...`), and the log filter
/// when `WAKEEPER_TEST_HOST_LOG` is unset.
#[derive(Clone, Copy)]
pub struct Launch<'a> {
    pub bin: &'a Path,
    pub under: &'a [&'a str],
    pub default_log: &'a str,
}

impl<'a> Launch<'a> {
    /// `bin` itself, with the default log filter.
    pub fn binary(bin: &'a Path) -> Self {
        Self { bin, under: &[], default_log: DEFAULT_HOST_LOG }
    }
}

/// The host binary as a child process.
pub struct TestHost {
    child: Option<Child>,
    pub base: String,
    pub client: HostClient,
    pub log: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl TestHost {
    /// Starts `bin` (see [`crate::socket_host_bin!`]) with the embedded defaults of `dirs` against `wa_url`,
    /// plus `extra` variables.
    pub fn spawn(bin: &Path, dirs: &Dirs, wa_url: &str, host_id: &str, extra: &[(&str, String)]) -> Self {
        Self::launch(Launch::binary(bin), dirs, wa_url, host_id, extra)
    }

    /// Starts the host as `launch` says, with the embedded defaults of `dirs` against `wa_url`, plus `extra`.
    pub fn launch(launch: Launch<'_>, dirs: &Dirs, wa_url: &str, host_id: &str, extra: &[(&str, String)]) -> Self {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let log = dirs.root.path().join(format!("host-{host_id}-{port}.log"));
        let mut cmd = match launch.under.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(launch.bin);
                cmd
            }
            None => Command::new(launch.bin),
        };
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WAKEEPER_LISTEN", format!("127.0.0.1:{port}"))
            .env("WAKEEPER_DATA_DIR", dirs.data())
            .env("WAKEEPER_KEY_FILE", dirs.key_file())
            .env("WAKEEPER_CONTROL_TOKEN", TOKEN)
            .env("WAKEEPER_HOST_ID", host_id)
            .env("WAKEEPER_WA_URL", wa_url)
            .env("WAKEEPER_LOG", std::env::var("WAKEEPER_TEST_HOST_LOG").unwrap_or_else(|_| launch.default_log.into()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("host binary starts");
        let client = HostClient::new(&base, TOKEN, Duration::from_secs(10)).unwrap().with_attempts(1);
        Self { child: Some(child), base, client, log }
    }

    /// Waits until `/health` answers.
    pub async fn ready(&self) {
        let client = self.client.clone();
        wait_until(Duration::from_secs(30), "host /health", || {
            let c = client.clone();
            async move { c.health().await.ok() }
        })
        .await;
    }

    /// Waits until `n` sessions are open; returns the list.
    pub async fn all_open(&self, n: usize, limit: Duration) -> SessionList {
        let client = self.client.clone();
        wait_until(limit, &format!("{n} open sessions"), || {
            let c = client.clone();
            async move {
                let list = c.sessions().await.ok()?;
                let open = list.sessions.iter().filter(|s| s.state == SessionState::Open).count();
                (open >= n).then_some(list)
            }
        })
        .await
    }

    /// Waits until the tenant's session is in `state`.
    pub async fn wait_state(&self, id: &TenantId, state: SessionState, limit: Duration) {
        let client = self.client.clone();
        let id = id.clone();
        wait_until(limit, &format!("{id} in {}", state.as_str()), || {
            let (c, id) = (client.clone(), id.clone());
            async move { c.session(&id).await.ok().flatten().filter(|s| s.state == state).map(|_| ()) }
        })
        .await;
    }

    /// The process id while the child runs (for signals the tests send themselves, such as SIGSTOP).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no flush, no lease release.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit up to `limit`; returns how long it took, or panics.
    pub fn terminate(&mut self, limit: Duration) -> Duration {
        let mut c = self.child.take().expect("host running");
        let started = std::time::Instant::now();
        let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(status.success(), "host exited with {status}; log: {}", self.log_tail());
                return started.elapsed();
            }
            if started.elapsed() > limit {
                let _ = c.kill();
                panic!("host did not exit within {limit:?} of SIGTERM; log: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the host to exit on its own (a refused start) up to `limit`; returns its status, or panics.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("host running");
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if started.elapsed() > limit {
                let _ = c.kill();
                panic!("host still running after {limit:?}; log: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last 40 lines of the host's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            // The host's side of a failed test (its log holds no secrets: tokens and keys are never logged).
            eprintln!("--- last lines of {}:\n{}", self.log.display(), self.log_tail());
        }
        if let Ok(dir) = std::env::var("WAKEEPER_TEST_KEEP_LOGS") {
            let _ = std::fs::copy(&self.log, std::path::Path::new(&dir).join(self.log.file_name().unwrap_or_default()));
        }
    }
}

/// Runs the host the way the container image does: a copy of `bin` executed under a non-root uid, with only the
/// data dir (and the key file) owned by that uid. Root is needed to switch users (`setpriv`).
pub fn spawn_unprivileged(
    bin: &Path,
    dirs: &Dirs,
    wa_url: &str,
    host_id: &str,
    uid: u32,
    extra: &[(&str, String)],
) -> TestHost {
    use std::os::unix::fs::PermissionsExt;
    let root = dirs.root.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711)).unwrap();
    let bin_dir = root.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let copy = bin_dir.join("socket-host");
    if !copy.exists() {
        std::fs::copy(bin, &copy).unwrap();
    }
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(dirs.data()).unwrap();
    let chown = |p: &Path| {
        let status = Command::new("chown").arg("-R").arg(format!("{uid}:{uid}")).arg(p).status().unwrap();
        assert!(status.success());
    };
    chown(&dirs.data());
    chown(dirs.key_file().parent().unwrap());
    let mut env: Vec<(&str, String)> = vec![("SETPRIV_BIN", copy.display().to_string())];
    env.extend(extra.iter().cloned());
    let (reuid, regid) = (format!("--reuid={uid}"), format!("--regid={uid}"));
    let under = ["setpriv", reuid.as_str(), regid.as_str(), "--clear-groups"];
    TestHost::launch(Launch { bin: &copy, under: &under, default_log: DEFAULT_HOST_LOG }, dirs, wa_url, host_id, &env)
}
