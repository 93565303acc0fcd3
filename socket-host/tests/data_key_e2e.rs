//! End-to-end: the data key with a cloud credential store, on the real host binary. With Firestore configured
//! the host never generates a key (a wiped disk would otherwise bring a new key that opens no stored snapshot):
//! without `WAKEEPER_DATA_KEY` or `WAKEEPER_KEY_FILE` it refuses to start and names both; with the key given as
//! a variable it starts and restores a tenant sealed with that key, with no pairing, and never logs the key.
//! Given another key, it marks, un-desires and writes nobody and says why (`data_key_mismatch`); `keys rotate`
//! re-seals every tenant under a new key, after which a host holding only the new key restores them all.
//!
//! Needs the Firestore emulator and DynamoDB Local (`scripts/local-servers`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use wakeeper_shared::crypto::{Cipher, KeyFingerprint};
use wakeeper_shared::ports::{CredentialStore, StoreError, TenantStore};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

/// The data key of these tests and its base64 form (what a platform secret variable holds).
const KEY: [u8; 32] = [0x5a; 32];

fn key_b64() -> String {
    b64(&KEY)
}

fn b64(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Runs `socket-host` with `args` and only `env` (and `PATH`) to its end: status, stdout, stderr.
fn run_cli(dirs: &Dirs, env: &[(&str, String)], args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(socket_host_bin!())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WAKEEPER_DATA_DIR", dirs.data())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .output()
        .expect("socket-host runs");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_wrong_key_nobody_is_marked_undesired_or_written_and_the_host_says_why() {
    let dirs = Dirs::new();
    let Some(cloud) = CloudStores::fresh("wrongkey", Cipher::new(&KEY)).await else { return };
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let ids = [tid("wrong-key-a"), tid("wrong-key-b")];
    cloud.seed(&wa, &ids).await;
    let mut stored = Vec::new();
    for id in &ids {
        stored.push((cloud.creds.read(id).await.unwrap(), cloud.tenants.get(id).await.unwrap().unwrap()));
    }
    let sealed_by = KeyFingerprint::of(&KEY).to_string();
    assert_eq!(cloud.creds.sealed_by(&ids[0]).await.unwrap(), std::slice::from_ref(&sealed_by));

    let wrong = [0xa5u8; 32];
    let env = cloud.host_env(&[("WAKEEPER_KEY_FILE", String::new()), ("WAKEEPER_DATA_KEY", b64(&wrong))]);
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-wrongkey", &env);
    host.ready().await;
    // Restore on start tried both: the host reports the fault of its own, naming the key that sealed them.
    let health = wait_until(Duration::from_secs(60), "data_key_mismatch on /health", || {
        let c = host.client.clone();
        async move { c.health().await.ok().filter(|h| h.errors.iter().any(|e| e.code == "data_key_mismatch")) }
    })
    .await;
    let message = &health.errors[0].message;
    assert!(message.contains(&sealed_by) && message.contains(&KeyFingerprint::of(&wrong).to_string()), "{message}");
    assert!(host.client.sessions().await.unwrap().host_errors.iter().any(|e| e.code == "data_key_mismatch"));
    // Not ready, and `/ready` says why.
    let ready = reqwest::get(format!("{}/ready", host.base)).await.unwrap();
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    let verified = body["conditions"].as_array().unwrap().iter().find(|c| c["name"] == "data_key_verified").cloned();
    let verified = verified.unwrap_or_else(|| panic!("no data_key_verified condition: {body}"));
    assert_eq!(verified["ok"], false, "{body}");
    assert!(verified["reason"].as_str().unwrap().contains(&sealed_by), "{body}");
    let put = reqwest::Client::new()
        .put(format!("{}/v1/sessions/{}", host.base, ids[0]))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 503);
    assert_eq!(put.json::<serde_json::Value>().await.unwrap()["error"], "data_key_mismatch");
    // A sweep marks nobody and raises the host's fault as one alert.
    let report: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/v1/sweep", host.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["marked"], 0, "{report}");
    assert_eq!(report["host_faults"], serde_json::json!(["data_key_mismatch"]), "{report}");
    assert!(report["alerts"].as_u64().unwrap() >= 1, "{report}");

    // Nothing changed in either store: same snapshot, same key, still desired, not marked.
    for (id, (snapshot, record)) in ids.iter().zip(&stored) {
        assert_eq!(&cloud.creds.read(id).await.unwrap(), snapshot, "{id}'s credentials were written");
        assert_eq!(cloud.creds.sealed_by(id).await.unwrap(), std::slice::from_ref(&sealed_by));
        let now = cloud.tenants.get(id).await.unwrap().unwrap();
        assert_eq!(now.status, record.status, "{id} was marked");
        let desired = cloud.tenants.list_desired(None, 100).await.unwrap().items;
        assert!(desired.iter().any(|r| &r.tenant_id == id), "{id} was un-desired");
    }
    let log = std::fs::read_to_string(&host.log).unwrap();
    assert!(!log.contains(&b64(&wrong)) && !log.contains(&key_b64()), "a key is in the host's log");
    drop(host);

    // The right key restores both, with no pairing.
    let env = cloud.host_env(&[("WAKEEPER_KEY_FILE", String::new()), ("WAKEEPER_DATA_KEY", key_b64())]);
    let host = TestHost::spawn(socket_host_bin!(), &Dirs::new(), &wa.url(), "host-rightkey", &env);
    host.ready().await;
    host.all_open(2, Duration::from_secs(60)).await;
    assert!(host.client.health().await.unwrap().errors.is_empty());
    let base = host.base.clone();
    wait_until(Duration::from_secs(30), "/ready 200 with the right key", || {
        let url = format!("{base}/ready");
        async move { reqwest::get(url).await.ok().filter(|r| r.status() == 200).map(|_| ()) }
    })
    .await;
    drop(host);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_reseals_every_tenant_and_the_new_key_alone_restores_them() {
    let dirs = Dirs::new();
    let Some(cloud) = CloudStores::fresh("rotate", Cipher::new(&KEY)).await else { return };
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let ids = [tid("rotate-a"), tid("rotate-b")];
    cloud.seed(&wa, &ids).await;
    let before: Vec<_> = futures_util::future::join_all(ids.iter().map(|id| cloud.creds.read(id))).await;

    let new = [0x3cu8; 32];
    let env = cloud.host_env(&[("WAKEEPER_DATA_KEY", b64(&new)), ("WAKEEPER_DATA_KEY_PREVIOUS", key_b64())]);
    let (status, out, err) = run_cli(&dirs, &env, &["keys", "fingerprint"]);
    assert!(status.success(), "{err}");
    let (new_fp, old_fp) = (KeyFingerprint::of(&new).to_string(), KeyFingerprint::of(&KEY).to_string());
    assert_eq!(out, format!("current {new_fp}\nprevious {old_fp}\n"));

    let (status, out, err) = run_cli(&dirs, &env, &["keys", "rotate"]);
    assert!(status.success(), "keys rotate failed: {out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["resealed"], 2, "{report}");
    assert_eq!(report["fingerprint"], new_fp.as_str());
    assert!(!out.contains(&b64(&new)) && !err.contains(&b64(&new)) && !err.contains(&key_b64()));
    for (id, before) in ids.iter().zip(before) {
        assert_eq!(cloud.creds.sealed_by(id).await.unwrap(), std::slice::from_ref(&new_fp));
        // The old key alone no longer reads them, and says which key would.
        match cloud.creds.read(id).await {
            Err(StoreError::KeyMismatch { sealed_with, .. }) => assert_eq!(sealed_with, new_fp),
            other => panic!("the old key read re-sealed records: {other:?}"),
        }
        let rotated = wakeeper_shared::adapters::firestore::FirestoreCredentialStore::new(
            "wakeeper-test",
            Cipher::new(&new),
            cloud.env.iter().find(|(k, _)| *k == "WAKEEPER_FIRESTORE_PREFIX").unwrap().1.clone(),
        )
        .await
        .unwrap();
        assert_eq!(rotated.read(id).await.unwrap(), before.unwrap(), "{id}'s records changed in the re-seal");
    }
    // Again: nothing left to do.
    let (status, out, _) = run_cli(&dirs, &env, &["keys", "rotate"]);
    assert!(status.success());
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["already_current"], 2);
    // Without the previous key, rotate refuses and names it.
    let (status, _, err) = run_cli(&dirs, &cloud.host_env(&[("WAKEEPER_DATA_KEY", b64(&new))]), &["keys", "rotate"]);
    assert!(!status.success() && err.contains("WAKEEPER_DATA_KEY_PREVIOUS"), "{err}");

    let env = cloud.host_env(&[("WAKEEPER_KEY_FILE", String::new()), ("WAKEEPER_DATA_KEY", b64(&new))]);
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-rotated", &env);
    host.ready().await;
    host.all_open(2, Duration::from_secs(60)).await;
    drop(host);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_wrapped_by_kms_is_unwrapped_at_start_and_restores() {
    use aws_sdk_kms::primitives::Blob;
    let dirs = Dirs::new();
    let Some(cloud) = CloudStores::fresh("kmskey", Cipher::new(&KEY)).await else { return };
    let Some(aws) = aws_endpoint() else { return };
    // The operator's side: a KMS key, and the data key wrapped by it (what the variable holds).
    let sdk = aws_sdk_kms::Config::builder()
        .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
        .endpoint_url(&aws)
        .region(aws_sdk_kms::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_kms::config::Credentials::new("wakeeperlocal", "wakeeperlocal", None, None, "t"))
        .build();
    let kms = aws_sdk_kms::Client::from_conf(sdk);
    let key_id = kms.create_key().send().await.unwrap().key_metadata.unwrap().key_id;
    let wrapped = kms.encrypt().key_id(key_id).plaintext(Blob::new(KEY.to_vec())).send().await.unwrap();
    let wrapped = base64::engine::general_purpose::STANDARD.encode(wrapped.ciphertext_blob.unwrap().as_ref());

    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let id = tid("key-from-kms");
    cloud.seed(&wa, std::slice::from_ref(&id)).await;
    let mut env = cloud.host_env(&[
        ("WAKEEPER_KEY_FILE", String::new()),
        ("WAKEEPER_DATA_KEY_KMS", wrapped.clone()),
        ("WAKEEPER_KMS_ENDPOINT", aws.clone()),
    ]);
    env.extend(local_aws_env());
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-kmskey", &env);
    host.ready().await;
    host.all_open(1, Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(&host.log).unwrap();
    assert!(log.contains("WAKEEPER_DATA_KEY_KMS") && !log.contains(&key_b64()), "{log}");
    drop(host);

    // A wrapped value KMS cannot unwrap stops the start, naming the variable.
    let mut env = cloud.host_env(&[
        ("WAKEEPER_KEY_FILE", String::new()),
        ("WAKEEPER_DATA_KEY_KMS", base64::engine::general_purpose::STANDARD.encode(b"not a ciphertext blob")),
        ("WAKEEPER_KMS_ENDPOINT", aws),
    ]);
    env.extend(local_aws_env());
    let (status, stderr) = run_to_exit(&dirs, &env).await;
    assert!(!status.success(), "the host started on a key KMS did not unwrap");
    assert!(stderr.contains("WAKEEPER_DATA_KEY_KMS"), "{stderr}");
    sim.shutdown().await;
}
