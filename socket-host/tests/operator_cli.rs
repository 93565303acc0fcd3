//! The operator's CLI against a running host (issue 21): `socket-host link` draws the QR code in the terminal,
//! prints the pairing code, and returns once the phone (the fake server's) scanned it; `socket-host sessions`
//! prints the table. Both are the real binary, talking to a real host through the typed client.
//! `WAKEEPER_CAPTURE_CLI=<file>` keeps what `link` printed (the README shows such a capture).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use wakeeper_shared::domain::SessionState;
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

fn operator(host: &TestHost, args: &[&str]) -> Command {
    let mut cmd = Command::new(socket_host_bin!());
    cmd.args(args)
        .args(["--url", &host.base])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("WAKEEPER_CONTROL_TOKEN", TOKEN)
        .env("WAKEEPER_LOG", "warn");
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_shows_the_qr_code_and_the_pairing_code_and_returns_once_paired() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "cli-a", &[]);
    host.ready().await;
    let id = tid("cli-trattoria");

    let out_path = dirs.root.path().join("link.out");
    let mut link = operator(&host, &["link", "--tenant", id.as_str(), "--phone", "+15551234567"])
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let shown = wait_until(Duration::from_secs(30), "the QR code and the pairing code on the terminal", || {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        async move { text.contains("Or enter this code").then_some(text) }
    })
    .await;
    let view = host.client.link_view(&id).await.unwrap().expect("the attempt runs on the host");
    let code = view.pairing_code.clone().expect("a pairing code");
    assert!(shown.contains(&code), "the pairing code is printed: {shown}");
    assert!(shown.contains('▀') || shown.contains('▄') || shown.contains('█'), "a QR code is drawn: {shown}");
    let qr_lines = shown.lines().filter(|l| l.contains('▀') || l.contains('▄') || l.contains('█')).count();
    assert!(qr_lines >= 15, "a whole QR code ({qr_lines} lines)");

    // The phone scans the code on the terminal.
    wa.pair(view.qr.as_deref().unwrap(), &id, &wa_sim::MintOptions::default()).unwrap();
    let status = wait_until(Duration::from_secs(60), "socket-host link to return", || {
        let done = link.try_wait().unwrap();
        async move { done }
    })
    .await;
    let mut stderr = String::new();
    link.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let printed = std::fs::read_to_string(&out_path).unwrap();
    assert!(status.success(), "link failed: {stderr}\n{printed}");
    assert!(printed.contains(&format!("Paired: {id} is linked as")), "{printed}");
    assert!(!stderr.contains(TOKEN) && !printed.contains(TOKEN), "the token is never printed");
    if let Some(path) = std::env::var_os("WAKEEPER_CAPTURE_CLI") {
        std::fs::write(path, &printed).unwrap();
    }
    host.wait_state(&id, SessionState::Open, Duration::from_secs(30)).await;

    let table = operator(&host, &["sessions"]).output().unwrap();
    assert!(table.status.success());
    let table = String::from_utf8(table.stdout).unwrap();
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("TENANT") && header.contains("STATE") && header.contains("LEASE"), "{table}");
    let row = table.lines().find(|l| l.starts_with(id.as_str())).unwrap_or_else(|| panic!("no row: {table}"));
    assert!(row.contains(" open ") && row.contains("cli-a #"), "{row}");

    // One tenant, and a clear error for a tenant the host does not run, or a bad id.
    let one = operator(&host, &["sessions", "--tenant", id.as_str()]).output().unwrap();
    assert!(one.status.success() && String::from_utf8_lossy(&one.stdout).lines().count() == 2);
    let none = operator(&host, &["sessions", "--tenant", "nobody"]).output().unwrap();
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("runs no session of nobody"));
    let bad = operator(&host, &["sessions", "--tenant", "../etc"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--tenant"));
    // A wrong token is refused, and says so without echoing it.
    let wrong = operator(&host, &["sessions"]).env("WAKEEPER_CONTROL_TOKEN", "wrong-token-123").output().unwrap();
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("401 unauthorized") && !err.contains("wrong-token-123"), "{err}");
    drop(host);
    sim.shutdown().await;
}
