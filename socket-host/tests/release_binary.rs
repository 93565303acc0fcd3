//! The production binary as the container runs it (issue 18): the `socket-host` built with the image's
//! features (no `test-peer`), started through the image's entrypoint as root on a root-owned "volume", so the
//! entrypoint takes ownership and drops to uid 10001. It must refuse to start without a data key when Firestore
//! is configured, then start with the key from a variable, answer `/health` and `/ready`, reach the Firestore
//! emulator and DynamoDB Local (a tenant with no stored credentials is marked `credentials_missing`, one with
//! credentials is not marked), and exit within its deadline on SIGTERM.
//!
//! `scripts/test` builds that binary and names it in `WAKEEPER_RELEASE_BIN`; the test is ignored otherwise
//! (the workspace test build is the `test-peer` one). Needs root (the entrypoint's ownership switch).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use wakeeper_shared::crypto::Cipher;
use wakeeper_shared::domain::{SessionState, TenantStatus};
use wakeeper_shared::ports::TenantStore;
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

const RUN_UID: u32 = 10001;
const DEADLINE_S: u64 = 8;

fn entrypoint() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-entrypoint.sh")
}

/// The production binary, copied where uid 10001 can run it.
fn installed_binary(dirs: &Dirs) -> PathBuf {
    let bin = std::env::var("WAKEEPER_RELEASE_BIN").expect("WAKEEPER_RELEASE_BIN names the production binary");
    std::fs::set_permissions(dirs.root.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let dir = dirs.root.path().join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("socket-host");
    std::fs::copy(&bin, &copy).unwrap_or_else(|e| panic!("copying {bin}: {e}"));
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// The uid the process `pid` runs as.
fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs WAKEEPER_RELEASE_BIN (the production build) and root: run by scripts/test"]
async fn the_production_binary_runs_as_the_container_runs_it() {
    assert_eq!(uid_of(std::process::id()), 0, "this test switches users: run it as root");
    let dirs = Dirs::new();
    let bin = installed_binary(&dirs);
    // The volume as Railway mounts it: root-owned, 0755.
    let volume = dirs.data();
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o755)).unwrap();

    let key = [0x5au8; 32];
    let cloud = CloudStores::fresh("release", Cipher::new(&key)).await.expect("cloud servers configured");
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let (stored, missing) = (tid("release-stored"), tid("release-missing"));
    cloud.seed(&wa, std::slice::from_ref(&stored)).await;
    cloud.tenants.set_desired(&missing, true).await.unwrap();

    let entry = entrypoint();
    let entry = entry.to_str().unwrap();
    let launch = Launch { bin: &bin, under: &[entry], default_log: DEFAULT_HOST_LOG };
    let base = cloud.host_env(&[
        ("WAKEEPER_KEY_FILE", String::new()),
        ("WAKEEPER_RUN_UID", RUN_UID.to_string()),
        ("WAKEEPER_SHUTDOWN_DEADLINE_S", DEADLINE_S.to_string()),
        ("WAKEEPER_LEASE_TTL_S", "10".to_string()),
    ]);

    // 0. Started as uid 10001 directly (no entrypoint) on the root-owned volume: refused, saying what to do.
    let (reuid, regid) = (format!("--reuid={RUN_UID}"), format!("--regid={RUN_UID}"));
    let unprivileged = ["setpriv", reuid.as_str(), regid.as_str(), "--clear-groups"];
    let direct = Launch { bin: &bin, under: &unprivileged, default_log: DEFAULT_HOST_LOG };
    let mut env = base.clone();
    env.push(("WAKEEPER_DATA_KEY", base64::engine::general_purpose::STANDARD.encode(key)));
    let mut refused = TestHost::launch(direct, &dirs, &wa.url(), "release-a", &env);
    let status = refused.wait_exit(Duration::from_secs(30));
    let log = refused.log_tail();
    assert!(!status.success(), "started on a data dir it does not own: {log}");
    assert!(
        log.contains("owned by uid 0") && log.contains("RAILWAY_RUN_UID"),
        "says whose it is and what to do: {log}"
    );
    assert_eq!(std::fs::read_dir(&volume).unwrap().count(), 0, "nothing written");

    // 1. No key with Firestore configured: refused, naming the variables; nothing marked.
    let mut keyless = TestHost::launch(launch, &dirs, &wa.url(), "release-a", &base);
    let status = keyless.wait_exit(Duration::from_secs(30));
    let log = keyless.log_tail();
    assert!(!status.success(), "started without a data key: {log}");
    assert!(log.contains("WAKEEPER_DATA_KEY") && log.contains("WAKEEPER_KEY_FILE"), "names the variables: {log}");
    assert!(cloud.tenants.get(&missing).await.unwrap().unwrap().status.is_none(), "nothing was marked");

    // 2. The key from a variable, as the platforms give it.
    let mut host = TestHost::launch(launch, &dirs, &wa.url(), "release-a", &env);
    host.ready().await;
    let pid = host.pid().unwrap();
    assert_eq!(uid_of(pid), RUN_UID, "the entrypoint dropped to uid {RUN_UID}");
    let meta = std::fs::metadata(&volume).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (RUN_UID, 0o700), "the volume is the host's and private");

    // 3. Both stores reached: the tenant without credentials is marked, the other is not.
    let tenants = cloud.tenants.clone();
    wait_until(Duration::from_secs(60), "the tenant without credentials marked", || {
        let (t, id) = (tenants.clone(), missing.clone());
        async move { (t.get(&id).await.ok()??.status == Some(TenantStatus::CredentialsMissing)).then_some(()) }
    })
    .await;
    let http = reqwest::Client::new();
    wait_until(Duration::from_secs(60), "/ready 200", || {
        let (http, url) = (http.clone(), format!("{}/ready", host.base));
        async move { (http.get(&url).send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;
    let view = host.client.session(&stored).await.unwrap().expect("the stored tenant has a session");
    assert_ne!(view.state, SessionState::Open, "the production engine does not accept the fake server's chain");
    assert!(!view.state.is_terminal(), "a tenant whose handshake fails is not marked: {view:?}");
    assert!(cloud.tenants.get(&stored).await.unwrap().unwrap().status.is_none(), "nor in the table");

    // 4. SIGTERM: out within the deadline, cleanly.
    let took = host.terminate(Duration::from_secs(DEADLINE_S + 10));
    let log = host.log_tail();
    assert!(took < Duration::from_secs(DEADLINE_S + 2), "took {took:?} for a {DEADLINE_S} s deadline: {log}");
    assert!(log.contains("host stopped"), "a clean stop: {log}");
    assert!(!log.contains("TEST BUILD"), "this is the production build: {log}");
    sim.shutdown().await;
}
