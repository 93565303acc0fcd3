//! End-to-end: the data key with a cloud credential store, on the real host binary. With Firestore configured
//! the host never generates a key (a wiped disk would otherwise bring a new key that opens no stored snapshot):
//! without `WAKEEPER_DATA_KEY` or `WAKEEPER_KEY_FILE` it refuses to start and names both; with the key given as
//! a variable it starts and restores a tenant sealed with that key, with no pairing, and never logs the key.
//!
//! Needs the Firestore emulator and DynamoDB Local (`scripts/local-servers`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use wakeeper_shared::crypto::Cipher;
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

/// The data key of these tests and its base64 form (what a platform secret variable holds).
const KEY: [u8; 32] = [0x5a; 32];

fn key_b64() -> String {
    base64::engine::general_purpose::STANDARD.encode(KEY)
}

/// Runs the host binary with only `env` (and `PATH`), waits for it to exit, and returns its exit status and
/// stderr. Fails the test if it is still running after 30 s.
async fn run_to_exit(dirs: &Dirs, env: &[(&str, String)]) -> (std::process::ExitStatus, String) {
    let log = dirs.root.path().join("refused.log");
    let mut child = Command::new(socket_host_bin!())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WAKEEPER_LISTEN", "127.0.0.1:0")
        .env("WAKEEPER_DATA_DIR", dirs.data())
        .env("WAKEEPER_CONTROL_TOKEN", TOKEN)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("host binary starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the host kept running without a data key: {}", std::fs::read_to_string(&log).unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (status, std::fs::read_to_string(&log).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_firestore_and_no_key_the_host_refuses_to_start_and_names_the_variables() {
    let dirs = Dirs::new();
    let Some(cloud) = CloudStores::fresh("nokey", Cipher::new(&KEY)).await else { return };
    let (status, stderr) = run_to_exit(&dirs, &cloud.host_env(&[])).await;
    assert!(!status.success(), "the host started without a data key");
    assert!(stderr.contains("WAKEEPER_DATA_KEY") && stderr.contains("WAKEEPER_KEY_FILE"), "{stderr}");
    assert!(!dirs.data().join("keys").exists(), "a key was generated");

    // A key file named but missing (a wiped volume) is refused the same way: never a new key.
    let missing = dirs.root.path().join("secrets").join("data.key");
    let (status, stderr) =
        run_to_exit(&dirs, &cloud.host_env(&[("WAKEEPER_KEY_FILE", missing.display().to_string())])).await;
    assert!(!status.success(), "the host started with a missing key file");
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(!missing.exists(), "a key file was generated");

    // A malformed key names its variable and not its value.
    let bad = "s3cret-not-base64!";
    let (status, stderr) = run_to_exit(&dirs, &cloud.host_env(&[("WAKEEPER_DATA_KEY", bad.into())])).await;
    assert!(!status.success());
    assert!(stderr.contains("WAKEEPER_DATA_KEY") && !stderr.contains("s3cret"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_key_in_a_variable_the_host_starts_and_restores_with_no_pairing() {
    let dirs = Dirs::new();
    let Some(cloud) = CloudStores::fresh("varkey", Cipher::new(&KEY)).await else { return };
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let id = tid("key-from-variable");
    cloud.seed(&wa, std::slice::from_ref(&id)).await;
    let env = cloud.host_env(&[("WAKEEPER_KEY_FILE", String::new()), ("WAKEEPER_DATA_KEY", key_b64())]);
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-varkey", &env);
    host.ready().await;
    // Open on the stored credentials: nobody scanned a QR code, so the snapshot sealed with this key restored.
    host.all_open(1, Duration::from_secs(60)).await;
    assert!(!dirs.key_file().exists() && !dirs.data().join("keys").exists(), "a key file was written");
    let log = std::fs::read_to_string(&host.log).unwrap();
    assert!(log.contains("data key loaded") && !log.contains(&key_b64()), "the key is in the host's log");
    drop(host);
    sim.shutdown().await;
}
