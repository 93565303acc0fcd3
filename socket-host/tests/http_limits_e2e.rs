//! The control API's listener bounds what a client can hold (issue 18): the image listens on 0.0.0.0, so a
//! connection that never sends a request (or sits idle after one) is closed after
//! `WAKEEPER_HTTP_HEADER_TIMEOUT_S`, and no more than `WAKEEPER_HTTP_MAX_CONNECTIONS` are served at once.
//! Webhook URLs without a secret refuse to start.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use wakeeper_testkit::*;

/// Reads until the peer closes the connection or `limit` passes; returns how long it took to close, or `None`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limit {
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

fn connect(base: &str) -> TcpStream {
    TcpStream::connect(base.trim_start_matches("http://")).unwrap()
}

/// Sends a keep-alive `GET /health` and reads its whole answer (it has a Content-Length).
fn health_on(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).expect("an answer");
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len = text[..head_end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= head_end + 4 + len {
                return text.into_owned();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_are_closed_after_the_header_timeout() {
    let dirs = Dirs::new();
    let env = [("WAKEEPER_HTTP_HEADER_TIMEOUT_S", "1".to_string()), ("WAKEEPER_RESTORE_ON_START", "false".into())];
    let host = TestHost::spawn(socket_host_bin!(), &dirs, "ws://127.0.0.1:9", "limits-a", &env);
    host.ready().await;

    let mut silent = connect(&host.base);
    let took = closed_within(&mut silent, Duration::from_secs(10)).expect("a silent connection is closed");
    assert!(took >= Duration::from_millis(800), "closed after the timeout, not at once: {took:?}");

    let mut partial = connect(&host.base);
    partial.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert!(closed_within(&mut partial, Duration::from_secs(10)).is_some(), "a head never finished is closed");

    let mut idle = connect(&host.base);
    assert!(health_on(&mut idle).starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut idle, Duration::from_secs(10)).is_some(), "an idle keep-alive connection is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_one_to_close() {
    let dirs = Dirs::new();
    let env = [
        ("WAKEEPER_HTTP_MAX_CONNECTIONS", "2".to_string()),
        ("WAKEEPER_HTTP_HEADER_TIMEOUT_S", "60".into()),
        ("WAKEEPER_RESTORE_ON_START", "false".into()),
    ];
    let host = TestHost::spawn(socket_host_bin!(), &dirs, "ws://127.0.0.1:9", "limits-b", &env);
    // Not `host.ready()`: its client's pooled keep-alive connection would hold one of the two slots.
    let base = host.base.clone();
    wait_until(Duration::from_secs(30), "/health on a closing connection", || {
        let base = base.clone();
        async move {
            let mut s = TcpStream::connect(base.trim_start_matches("http://")).ok()?;
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
            let mut answer = String::new();
            s.read_to_string(&mut answer).ok()?;
            answer.starts_with("HTTP/1.1 200").then_some(())
        }
    })
    .await;
    let mut first = connect(&host.base);
    let mut second = connect(&host.base);
    // A closed probe connection frees its slot once the server sees the close; both of ours answering proves
    // they hold the two slots.
    assert!(health_on(&mut first).starts_with("HTTP/1.1 200"));
    assert!(health_on(&mut second).starts_with("HTTP/1.1 200"));

    let mut third = connect(&host.base);
    third.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    third.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 64];
    let waited = third.read(&mut buf);
    assert!(
        matches!(&waited, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "a third connection is not served while two are open: {waited:?}"
    );
    drop(first);
    third.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let n = third.read(&mut buf).expect("served once a slot is free");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_urls_without_a_secret_refuse_to_start() {
    let dirs = Dirs::new();
    let env = [("WAKEEPER_WEBHOOK_URLS", "http://127.0.0.1:9/hook".to_string())];
    let mut host = TestHost::spawn(socket_host_bin!(), &dirs, "ws://127.0.0.1:9", "limits-c", &env);
    let status = host.wait_exit(Duration::from_secs(20));
    let log = host.log_tail();
    assert!(!status.success(), "started with unsigned webhooks: {log}");
    assert!(log.contains("WAKEEPER_WEBHOOK_SECRET"), "names the variable: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_logged_once_with_its_id_and_never_the_token() {
    let dirs = Dirs::new();
    let env = [("WAKEEPER_RESTORE_ON_START", "false".to_string())];
    let host = TestHost::spawn(socket_host_bin!(), &dirs, "ws://127.0.0.1:9", "limits-d", &env);
    host.ready().await;
    let http = reqwest::Client::new();
    let given = http
        .get(format!("{}/v1/sessions/access-log-1", host.base))
        .bearer_auth(TOKEN)
        .header("x-request-id", "bot-req-0001")
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "bot-req-0001", "a caller's id comes back");
    let made = http.get(format!("{}/v1/sessions", host.base)).bearer_auth("wrong-token").send().await.unwrap();
    assert_eq!(made.status(), 401);
    let made_id = made.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(made_id.len(), 32, "a generated id: {made_id}");

    let log = wait_until(Duration::from_secs(10), "both requests in the access log", || {
        let text = std::fs::read_to_string(&host.log).unwrap_or_default();
        let id = made_id.clone();
        async move { (text.contains("bot-req-0001") && text.contains(&id)).then_some(text) }
    })
    .await;
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("wakeeper::access")).collect();
    let given_line: Vec<&&str> = lines.iter().filter(|l| l.contains("bot-req-0001")).collect();
    assert_eq!(given_line.len(), 1, "one line per request: {lines:#?}");
    let line = given_line[0];
    for part in ["method=GET", "route=/v1/sessions/{tenant_id}", "status=404", "latency_ms="] {
        assert!(line.contains(part), "`{part}` in {line}");
    }
    assert!(!line.contains("access-log-1"), "the route template, not the tenant's path: {line}");
    assert!(lines.iter().any(|l| l.contains(&made_id) && l.contains("status=401")), "{lines:#?}");
    assert!(!log.contains(TOKEN) && !log.contains("wrong-token"), "no token in the log");
}
