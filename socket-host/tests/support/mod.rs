//! Test support for end-to-end tests of the host: the real `socket-host` binary as a child process, the fake
//! WhatsApp server in-process, and polling helpers with deadlines (no sleeps as synchronisation).
#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use wakeeper_shared::adapters::embedded::EmbeddedStore;
use wakeeper_shared::crypto::{Cipher, KeySource, LocalKeyFile};
use wakeeper_shared::domain::{SessionList, SessionState, TenantId};
use wakeeper_shared::host_api::HostClient;
use wakeeper_shared::ports::{CredentialStore, TenantStore};

pub const TOKEN: &str = "test-token-0123456789";

/// Polls `check` until it yields a value or `limit` passes.
pub async fn wait_until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn tid(s: &str) -> TenantId {
    TenantId::parse(s).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A test's directories: the data dir (wiped to simulate a fresh container) and the key file beside it.
pub struct Dirs {
    pub root: tempfile::TempDir,
}

impl Dirs {
    pub fn new() -> Self {
        Self { root: tempfile::tempdir().unwrap() }
    }
    pub fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }
    pub fn key_file(&self) -> PathBuf {
        self.root.path().join("secrets").join("data.key")
    }
    pub fn cipher(&self) -> Cipher {
        Cipher::new(&LocalKeyFile::new(self.key_file()).data_key().unwrap())
    }
    pub fn wipe_data(&self) {
        let _ = std::fs::remove_dir_all(self.data());
    }
}

/// Mints `n` devices on the sim and stores them, desired, in the embedded store of `dirs` (then closes it: the
/// host opens it next).
pub async fn seed_embedded(dirs: &Dirs, sim: &wa_sim::SimHandle, ids: &[TenantId]) {
    std::fs::create_dir_all(dirs.data()).unwrap();
    let store = Arc::new(EmbeddedStore::open(dirs.data().join("store.redb"), dirs.cipher()).unwrap());
    for id in ids {
        let snap = sim.mint_device(id);
        store.replace(id, &snap, 0).await.unwrap();
        store.set_desired(id, true).await.unwrap();
    }
}

/// The host binary as a child process.
pub struct TestHost {
    child: Option<Child>,
    pub base: String,
    pub client: HostClient,
    pub log: PathBuf,
}

impl TestHost {
    /// Starts the host with the embedded defaults of `dirs` against `wa_url`, plus `extra` variables.
    pub fn spawn(dirs: &Dirs, wa_url: &str, host_id: &str, extra: &[(&str, String)]) -> Self {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let log = dirs.root.path().join(format!("host-{host_id}-{port}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_socket-host"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WAKEEPER_LISTEN", format!("127.0.0.1:{port}"))
            .env("WAKEEPER_DATA_DIR", dirs.data())
            .env("WAKEEPER_KEY_FILE", dirs.key_file())
            .env("WAKEEPER_CONTROL_TOKEN", TOKEN)
            .env("WAKEEPER_HOST_ID", host_id)
            .env("WAKEEPER_WA_URL", wa_url)
            .env(
                "WAKEEPER_LOG",
                std::env::var("WAKEEPER_TEST_HOST_LOG")
                    .unwrap_or_else(|_| "info,whatsapp_rust=warn,wacore=warn".into()),
            )
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

/// Whether the cloud emulators are configured; without them a test fails loudly unless explicitly skipped.
pub fn firestore_emulator() -> Option<String> {
    match std::env::var("FIRESTORE_EMULATOR_HOST") {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var("WAKEEPER_SKIP_CLOUD_TESTS").as_deref() == Ok("1") => None,
        _ => panic!(
            "FIRESTORE_EMULATOR_HOST is not set: start it with scripts/local-servers (or set WAKEEPER_SKIP_CLOUD_TESTS=1)"
        ),
    }
}

/// A fresh collection prefix, so tests share one emulator without seeing each other.
pub fn fresh_prefix(name: &str) -> String {
    let mut raw = [0u8; 4];
    getrandom::fill(&mut raw).unwrap();
    format!("t{}_{}_", raw.iter().map(|b| format!("{b:02x}")).collect::<String>(), name)
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

/// Runs the host the way the container image does: a copy of the binary executed under a non-root uid, with
/// only the data dir (and the key file) owned by that uid. Root is needed to switch users (`setpriv`).
pub fn spawn_unprivileged(dirs: &Dirs, wa_url: &str, host_id: &str, uid: u32, extra: &[(&str, String)]) -> TestHost {
    use std::os::unix::fs::PermissionsExt;
    let root = dirs.root.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711)).unwrap();
    let bin_dir = root.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let bin = bin_dir.join("socket-host");
    if !bin.exists() {
        std::fs::copy(env!("CARGO_BIN_EXE_socket-host"), &bin).unwrap();
    }
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(dirs.data()).unwrap();
    let chown = |p: &Path| {
        let status = Command::new("chown").arg("-R").arg(format!("{uid}:{uid}")).arg(p).status().unwrap();
        assert!(status.success());
    };
    chown(&dirs.data());
    chown(dirs.key_file().parent().unwrap());
    let mut env: Vec<(&str, String)> = vec![("SETPRIV_BIN", bin.display().to_string())];
    env.extend(extra.iter().cloned());
    TestHost::spawn_with_prefix(
        dirs,
        wa_url,
        host_id,
        &env,
        &["setpriv", &format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups"],
        &bin,
    )
}

impl TestHost {
    fn spawn_with_prefix(
        dirs: &Dirs,
        wa_url: &str,
        host_id: &str,
        extra: &[(&str, String)],
        prefix: &[&str],
        bin: &Path,
    ) -> Self {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let log = dirs.root.path().join(format!("host-{host_id}-{port}.log"));
        let mut cmd = Command::new(prefix[0]);
        cmd.args(&prefix[1..]).arg(bin);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("WAKEEPER_LISTEN", format!("127.0.0.1:{port}"))
            .env("WAKEEPER_DATA_DIR", dirs.data())
            .env("WAKEEPER_KEY_FILE", dirs.key_file())
            .env("WAKEEPER_CONTROL_TOKEN", TOKEN)
            .env("WAKEEPER_HOST_ID", host_id)
            .env("WAKEEPER_WA_URL", wa_url)
            .env(
                "WAKEEPER_LOG",
                std::env::var("WAKEEPER_TEST_HOST_LOG")
                    .unwrap_or_else(|_| "info,whatsapp_rust=warn,wacore=warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("host binary starts");
        let client = HostClient::new(&base, TOKEN, Duration::from_secs(10)).unwrap().with_attempts(1);
        Self { child: Some(child), base, client, log }
    }
}

/// The DynamoDB endpoint of the local server; like [`firestore_emulator`], missing means failure unless skipped.
pub fn dynamodb_endpoint() -> Option<String> {
    match std::env::var("WAKEEPER_TEST_DYNAMODB_ENDPOINT") {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var("WAKEEPER_SKIP_CLOUD_TESTS").as_deref() == Ok("1") => None,
        _ => panic!(
            "WAKEEPER_TEST_DYNAMODB_ENDPOINT is not set: start it with scripts/local-servers (or set WAKEEPER_SKIP_CLOUD_TESTS=1)"
        ),
    }
}

/// Cloud stores shared by several hosts: credentials in the Firestore emulator, tenants in DynamoDB Local.
pub struct CloudStores {
    pub creds: Arc<wakeeper_shared::adapters::firestore::FirestoreCredentialStore>,
    pub tenants: Arc<wakeeper_shared::adapters::dynamodb::DynamoTenantStore>,
    pub env: Vec<(&'static str, String)>,
}

impl CloudStores {
    /// Fresh stores (a new collection prefix and table) for one test, or `None` when cloud tests are skipped.
    pub async fn fresh(name: &str, cipher: Cipher) -> Option<Self> {
        let emulator = firestore_emulator()?;
        let endpoint = dynamodb_endpoint()?;
        let prefix = fresh_prefix(name);
        let table = format!("{prefix}tenants");
        let creds = Arc::new(
            wakeeper_shared::adapters::firestore::FirestoreCredentialStore::new(
                "wakeeper-test",
                cipher,
                prefix.clone(),
            )
            .await
            .unwrap(),
        );
        let tenants = Arc::new(wakeeper_shared::adapters::dynamodb::DynamoTenantStore::new(
            wakeeper_shared::adapters::dynamodb::dynamo_client_for_endpoint(&endpoint),
            table.clone(),
        ));
        tenants.create_table_if_missing().await.unwrap();
        let env = vec![
            ("FIRESTORE_EMULATOR_HOST", emulator),
            ("WAKEEPER_FIRESTORE_PROJECT", "wakeeper-test".to_string()),
            ("WAKEEPER_FIRESTORE_PREFIX", prefix),
            ("WAKEEPER_DYNAMODB_TABLE", table),
            ("WAKEEPER_DYNAMODB_ENDPOINT", endpoint),
        ];
        Some(Self { creds, tenants, env })
    }

    /// Mints and stores `ids` as desired tenants.
    pub async fn seed(&self, sim: &wa_sim::SimHandle, ids: &[TenantId]) {
        for id in ids {
            self.creds.replace(id, &sim.mint_device(id), 0).await.unwrap();
            self.tenants.set_desired(id, true).await.unwrap();
        }
    }

    /// The env of a host using these stores, plus `extra`.
    pub fn host_env(&self, extra: &[(&'static str, String)]) -> Vec<(&'static str, String)> {
        let mut env = self.env.clone();
        env.extend(extra.iter().cloned());
        env
    }
}
