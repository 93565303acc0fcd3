//! Files are what they claim to be (issue 19): a key or token file open to group or others is refused at start
//! with the `chmod` that fixes it, a key file that is a symlink is refused, a loose data dir is tightened, and a tenant directory replaced by a symlink is
//! never followed (the tenant does not open; nothing is written outside the data dir; the others open).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use wakeeper_shared::domain::SessionState;
use wakeeper_shared::local::tenant_dir;
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Starts a host that must refuse to start; returns its log.
fn refused_start(dirs: &Dirs, extra: &[(&str, String)]) -> String {
    let mut host = TestHost::spawn(socket_host_bin!(), dirs, "ws://127.0.0.1:9", "host-a", extra);
    let status = host.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "the host started; log: {}", host.log_tail());
    host.log_tail()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_open_to_others_is_refused_at_start() {
    let dirs = Dirs::new();
    let _ = dirs.cipher();
    chmod(&dirs.key_file(), 0o644);
    let log = refused_start(&dirs, &[]);
    let fix = format!("chmod 600 {}", dirs.key_file().display());
    assert!(log.contains(&fix), "the message names the fix `{fix}`: {log}");
    assert!(!dirs.data().join("store.redb").exists(), "nothing was opened or written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_that_is_a_symlink_is_refused_at_start() {
    let dirs = Dirs::new();
    // A private key file elsewhere, and the configured path a symlink to it: the host must not follow it.
    let elsewhere = dirs.root.path().join("elsewhere.key");
    std::fs::write(&elsewhere, [9u8; 32]).unwrap();
    chmod(&elsewhere, 0o600);
    std::fs::create_dir_all(dirs.key_file().parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dirs.key_file()).unwrap();
    let log = refused_start(&dirs, &[]);
    assert!(log.contains("symbolic link") && log.contains(&dirs.key_file().display().to_string()), "{log}");
    assert!(!dirs.data().join("store.redb").exists(), "nothing was opened or written");
    assert_eq!(std::fs::read(&elsewhere).unwrap(), [9u8; 32], "the link's target is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_open_to_others_is_refused_at_start() {
    let dirs = Dirs::new();
    let token = dirs.root.path().join("control.token");
    std::fs::write(&token, TOKEN).unwrap();
    chmod(&token, 0o644);
    let extra =
        [("WAKEEPER_CONTROL_TOKEN", String::new()), ("WAKEEPER_CONTROL_TOKEN_FILE", token.display().to_string())];
    let log = refused_start(&dirs, &extra);
    assert!(log.contains(&format!("chmod 600 {}", token.display())), "the message names the fix: {log}");
    assert!(!log.contains(TOKEN), "the token is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loose_data_dir_is_tightened_and_a_symlinked_tenant_dir_is_never_followed() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let (good, linked) = (tid("files-good"), tid("files-linked"));
    seed_embedded(&dirs, &wa, &[good.clone(), linked.clone()]).await;
    chmod(&dirs.data(), 0o755);
    let outside = dirs.root.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let linked_dir = tenant_dir(&dirs.data(), &linked);
    std::fs::create_dir_all(linked_dir.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&outside, &linked_dir).unwrap();

    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &[]);
    host.ready().await;
    host.wait_state(&good, SessionState::Open, Duration::from_secs(30)).await;
    let mode = std::fs::metadata(dirs.data()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "the data dir is tightened to 0700");
    let client = host.client.clone();
    let view = wait_until(Duration::from_secs(20), "the linked tenant refused", || {
        let (c, id) = (client.clone(), linked.clone());
        async move {
            let v = c.session(&id).await.ok().flatten()?;
            v.last_error.as_deref().is_some_and(|e| e.contains("symbolic link")).then_some(v)
        }
    })
    .await;
    assert_ne!(view.state, SessionState::Open, "a tenant behind a symlink never opens");
    assert!(!view.state.is_terminal(), "nor is it marked: the stored credentials are fine");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0, "nothing written outside the data dir");
    drop(host);
    sim.shutdown().await;
}
