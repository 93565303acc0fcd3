//! A full disk is an outage, never a loss: the real host on its embedded defaults with its data dir on a small
//! tmpfs (mounted by the test; root only), several tenants open and contacts writing to them. The disk is filled
//! with a ballast file while messages arrive: `/ready` turns 503 with `disk_writable` failing, a new ensure is
//! refused with `503 disk_full` and changes nothing, and the messages written meanwhile are not acknowledged.
//! The ballast is removed: with no restart, `/ready` is 200 again, every session is open, and every message
//! reaches the webhook receiver exactly as it was sent, the ones from the full-disk minutes included (WhatsApp,
//! here the fake server with `redeliver_unacked`, delivers again what the host never acknowledged). One
//! `alert.disk_fault` and one `alert.disk_recovered` reach the receiver.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::post;
use wakeeper_shared::domain::{SessionState, TenantId};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

const SECRET: &str = "disk-full-webhook-secret";
const STEP: Duration = Duration::from_secs(60);

/// A tmpfs mounted over a test's data dir, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `24m`) at `dir`; `None` when mounting is refused (not root, no
    /// CAP_SYS_ADMIN in this container).
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let out = match Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
            .arg(dir)
            .output()
        {
            Ok(out) => out,
            Err(e) => {
                eprintln!("skipping: cannot run mount ({e})");
                return None;
            }
        };
        if !out.status.success() {
            eprintln!("skipping: cannot mount a tmpfs here ({})", String::from_utf8_lossy(&out.stderr).trim());
            return None;
        }
        Some(Self { dir: dir.to_path_buf() })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a host killed a moment ago may still hold a file open.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Fills the file system holding `path` with one ballast file until a write is refused; returns its size.
fn fill_disk(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    let mut written = 0u64;
    for size in [chunk.len(), 4096, 512] {
        loop {
            match file.write(&chunk[..size]) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "the ballast stops at a full disk: {e}");
                    break;
                }
            }
        }
    }
    let _ = file.sync_all();
    written
}

/// The webhook receiver: every event by type.
#[derive(Clone, Default)]
struct Receiver {
    got: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Receiver {
    async fn start() -> (Self, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = Self::default();
        let sink = r.got.clone();
        let app = Router::new().route(
            "/hook",
            post(move |body: Bytes| {
                let sink = sink.clone();
                async move {
                    let event = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                    sink.lock().unwrap().push(event);
                    StatusCode::OK
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, addr)
    }

    fn of_type(&self, kind: &str) -> Vec<serde_json::Value> {
        self.got.lock().unwrap().iter().filter(|e| e["type"] == kind).cloned().collect()
    }

    /// Message id -> text of every `message.received` (a redelivered one counts once: receivers dedupe by id).
    fn messages(&self) -> BTreeMap<String, String> {
        self.of_type("message.received")
            .into_iter()
            .map(|e| (e["message_id"].as_str().unwrap_or("").to_owned(), e["text"].as_str().unwrap_or("").to_owned()))
            .collect()
    }
}

/// `GET /ready`: status and body.
async fn ready(http: &reqwest::Client, base: &str) -> (u16, serde_json::Value) {
    let r = http.get(format!("{base}/ready")).send().await.expect("/ready answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

fn disk_condition(body: &serde_json::Value) -> Option<serde_json::Value> {
    body["conditions"].as_array()?.iter().find(|c| c["name"] == "disk_writable").cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_an_outage_never_a_loss() {
    wakeeper_shared::tls::install_crypto_provider();
    let dirs = Dirs::new();
    let Some(_tmpfs) = Tmpfs::mount(&dirs.data(), "24m") else { return };
    eprintln!("tmpfs mounted at {}", dirs.data().display());
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    wa.redeliver_unacked(true);
    let ids: Vec<TenantId> = ["pizzeria-1", "sushi-2", "tacos-3"].into_iter().map(tid).collect();
    seed_embedded(&dirs, &wa, &ids).await;
    let (receiver, addr) = Receiver::start().await;
    let env = [
        ("WAKEEPER_WEBHOOK_URLS", format!("http://{addr}/hook")),
        ("WAKEEPER_WEBHOOK_SECRET", SECRET.to_string()),
        ("WAKEEPER_DISK_PROBE_S", "1".to_string()),
    ];
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &env);
    host.ready().await;
    host.all_open(ids.len(), STEP).await;
    let boot_id = host.client.health().await.unwrap().boot_id;
    eprintln!("every session open");
    let http = reqwest::Client::new();
    let (status, body) = ready(&http, &host.base).await;
    assert_eq!(status, 200, "ready before the fault: {body}");

    // One contact per tenant; what each one sent, by message id.
    let mut sent: BTreeMap<String, String> = BTreeMap::new();
    let contacts: Vec<(String, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let phone = format!("49151777000{i}");
            wa.add_contact(&phone).unwrap();
            (phone, wa.device_jid(id).expect("the sim knows the device"))
        })
        .collect();
    let say = |round: &'static str| {
        let (wa, contacts) = (wa.clone(), contacts.clone());
        async move {
            let mut out = Vec::new();
            for (phone, device) in &contacts {
                let text = format!("{round} from {phone}");
                out.push((wa.contact_send_text(phone, device, &text).await.unwrap(), text));
            }
            out
        }
    };
    sent.extend(say("before the fault").await);
    wait_until(STEP, "the messages sent before the fault", || {
        let (got, sent) = (receiver.messages(), sent.clone());
        async move { sent.iter().all(|(id, _)| got.contains_key(id)).then_some(()) }
    })
    .await;

    // The disk fills while the sessions are open and the contacts keep writing.
    let ballast = dirs.data().join("ballast");
    let filled = fill_disk(&ballast);
    assert!(filled > 1024 * 1024, "the ballast took the free space ({filled} bytes)");
    eprintln!("disk filled with {filled} bytes");
    sent.extend(say("while the disk is full").await);

    let body = wait_until(STEP, "/ready to say the disk is not writable", || {
        let (http, base) = (http.clone(), host.base.clone());
        async move {
            let (status, body) = ready(&http, &base).await;
            (status == 503 && disk_condition(&body).is_some_and(|c| c["ok"] == false)).then_some(body)
        }
    })
    .await;
    assert_eq!(body["ready"], false, "{body}");
    let reason = disk_condition(&body).unwrap()["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("full") && reason.contains(&*dirs.data().to_string_lossy()), "names the path: {reason}");
    assert_eq!(host.client.health().await.unwrap().status, "ok", "/health stays liveness");

    // New work that needs the disk is refused with a clear error, and changes nothing.
    let newcomer = tid("newcomer-9");
    let r = http.put(format!("{}/v1/sessions/{newcomer}", host.base)).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let refusal: serde_json::Value = r.json().await.unwrap();
    assert_eq!(refusal["error"], "disk_full", "{refusal}");
    assert!(refusal["message"].as_str().unwrap_or_default().contains("disk is full"), "{refusal}");
    assert!(host.client.session(&newcomer).await.unwrap().is_none(), "the refused ensure started nothing");

    // Nothing written while the disk was full was acknowledged to WhatsApp, so nothing of it can be lost.
    let during: Vec<&String> = sent.iter().filter(|(_, t)| t.starts_with("while")).map(|(id, _)| id).collect();
    let delivered = receiver.messages();
    assert!(
        during.iter().all(|id| !delivered.contains_key(*id)),
        "no message of the full-disk minutes went out before its event was stored"
    );

    // Space returns: the host carries on by itself.
    std::fs::remove_file(&ballast).unwrap();
    eprintln!("ballast removed");
    wait_until(STEP, "/ready 200 once the space is back", || {
        let (http, base) = (http.clone(), host.base.clone());
        async move { (ready(&http, &base).await.0 == 200).then_some(()) }
    })
    .await;
    host.all_open(ids.len(), STEP).await;
    sent.extend(say("after the fault").await);
    let got = wait_until(STEP, "every message on the webhook", || {
        let (got, sent) = (receiver.messages(), sent.clone());
        async move { sent.iter().all(|(id, _)| got.contains_key(id)).then_some(got) }
    })
    .await;
    for (id, text) in &sent {
        assert_eq!(got.get(id), Some(text), "message {id} arrived exactly as sent");
    }
    assert_eq!(host.client.health().await.unwrap().boot_id, boot_id, "no restart");
    for id in &ids {
        let view = host.client.session(id).await.unwrap().expect("the session is still there");
        assert_eq!(view.state, SessionState::Open, "{id}");
    }

    wait_until(STEP, "the recovery alert", || {
        let r = receiver.clone();
        async move { (!r.of_type("alert.disk_recovered").is_empty()).then_some(()) }
    })
    .await;
    let (faults, recovered) = (receiver.of_type("alert.disk_fault"), receiver.of_type("alert.disk_recovered"));
    assert!(!faults.is_empty(), "a disk fault alert was raised");
    let paths = |events: &[serde_json::Value]| {
        let mut p: Vec<String> = events.iter().map(|e| e["path"].as_str().unwrap_or("").to_owned()).collect();
        p.sort();
        p
    };
    assert_eq!(paths(&faults), paths(&recovered), "one recovery alert per fault alert: {faults:?} {recovered:?}");
    let mut unique = paths(&faults);
    unique.dedup();
    assert_eq!(unique.len(), faults.len(), "each faulted path alerted once: {faults:?}");
    assert!(faults.iter().all(|e| e["fault"] == "full" && e["host_id"] == "host-a"), "{faults:?}");
    drop(host);
    sim.shutdown().await;
}
