//! Messages end to end: the real host binary, the real engine, the fake WhatsApp server's contacts (real
//! Signal peers), a local webhook receiver, and the Firestore emulator for the restore.
//!
//! - A contact's text reaches the bot's webhook as a signed `message.received`; the bot's answer through the
//!   API is what the contact decrypts.
//! - After messages went both ways, the host is SIGKILLed and its disk wiped; a new host restores the tenant
//!   from Firestore and decrypts the contact's next normal (`msg`) message with no retry receipt. The same run
//!   with only the device record and app-state sync keys restored (what the old system kept) must fail that
//!   check: the negative control.
//! - With the webhook receiver down (and the host restarted meanwhile), every message arrives once it is back.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use wa_sim::ReceiptKind;
use wakeeper_shared::adapters::firestore::FirestoreCredentialStore;
use wakeeper_shared::domain::{CredentialSnapshot, RecordKind, SessionState, TenantId};
use wakeeper_shared::host_api::{EnsureOutcome, SendMessageRequest};
use wakeeper_shared::local::WorkingCopy;
use wakeeper_shared::ports::{Conflict, CredentialStore, StoreError};
use wakeeper_testkit::tenant as tid;
use wakeeper_testkit::*;

const SECRET: &str = "message-webhook-secret";
const STEP: Duration = Duration::from_secs(30);

/// One delivery the receiver got: whether its signature was valid, the idempotency header, the body.
#[derive(Debug, Clone)]
struct Delivery {
    signed: bool,
    idempotency_key: String,
    event: serde_json::Value,
}

/// A local webhook receiver that can be taken down (its port closed: connections are refused) and brought
/// back on the same port.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Delivery>>>,
    stop: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut r = Self { addr: listener.local_addr().unwrap(), got: Arc::default(), stop: None };
        r.serve(listener);
        r
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let sink = self.got.clone();
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let sink = sink.clone();
                async move {
                    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    let signed =
                        header("x-wakeeper-signature") == wakeeper_shared::webhook::sign(SECRET.as_bytes(), &body);
                    let event = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                    sink.lock().unwrap().push(Delivery { signed, idempotency_key: header("idempotency-key"), event });
                    StatusCode::OK
                }
            }),
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).with_graceful_shutdown(async { rx.await.unwrap_or(()) }).await.unwrap();
        });
        self.stop = Some((tx, task));
    }

    /// Closes the port: the host's deliveries fail until [`Receiver::up`].
    async fn down(&mut self) {
        if let Some((tx, task)) = self.stop.take() {
            let _ = tx.send(());
            task.await.unwrap();
        }
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.expect("the receiver's port is free again");
        self.serve(listener);
    }

    fn messages(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().iter().filter(|d| d.event["type"] == "message.received").cloned().collect()
    }

    /// Waits for the `message.received` of message `id`.
    async fn wait_message(&self, id: &str, limit: Duration) -> Option<Delivery> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(d) = self.messages().into_iter().find(|d| d.event["message_id"] == id) {
                return Some(d);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn hook_env(r: &Receiver) -> Vec<(&'static str, String)> {
    vec![("WAKEEPER_WEBHOOK_URLS", r.url()), ("WAKEEPER_WEBHOOK_SECRET", SECRET.to_string())]
}

/// The contact sends `text` to the tenant's device; the bot must get it on its webhook, signed, with every
/// field right. Returns the message id.
async fn contact_says(
    wa: &wa_sim::SimHandle,
    r: &Receiver,
    tenant: &TenantId,
    phone: &str,
    text: &str,
) -> Result<String, String> {
    let device = wa.device_jid(tenant).expect("the sim knows the tenant's device");
    let id = wa.contact_send_text(phone, &device, text).await.map_err(|e| format!("contact send: {e}"))?;
    let got = r.wait_message(&id, STEP).await.ok_or_else(|| format!("no message.received for {id}"))?;
    let e = &got.event;
    assert!(got.signed, "the event is signed with the webhook secret: {e}");
    assert_eq!(e["id"], format!("{tenant}:{id}"), "{e}");
    assert_eq!(got.idempotency_key, format!("{tenant}:{id}"), "the idempotency key is in a header too");
    assert_eq!(e["tenant_id"], tenant.as_str(), "{e}");
    assert_eq!(e["content_type"], "text", "{e}");
    assert_eq!(e["text"], text, "{e}");
    assert_eq!(e["chat"], format!("{phone}@s.whatsapp.net"), "{e}");
    assert!(e["sender"].as_str().unwrap_or_default().starts_with(phone), "{e}");
    assert_eq!(e["from_me"], false, "{e}");
    assert!(e["at_ms"].as_i64().unwrap_or_default() > 1_600_000_000_000, "{e}");
    Ok(id)
}

/// The bot answers through the control API; the contact must decrypt exactly that text under the returned id.
async fn bot_answers(
    wa: &wa_sim::SimHandle,
    host: &TestHost,
    tenant: &TenantId,
    phone: &str,
    text: &str,
    typing_ms: Option<u64>,
) -> Result<(), String> {
    let request = SendMessageRequest { to: format!("+{phone}"), text: text.into(), typing_ms };
    let sent = host.client.send_message(tenant, &request).await.map_err(|e| format!("send refused: {e}"))?;
    assert_eq!(sent.to, format!("{phone}@s.whatsapp.net"));
    let got = wa
        .wait_for_contact_message(phone, STEP, |m| m.id == sent.message_id)
        .await
        .map_err(|e| format!("the contact never got {}: {e}", sent.message_id))?;
    if got.error.is_some() || got.text.as_deref() != Some(text) {
        return Err(format!("the contact did not decrypt the answer: {got:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_writes_the_bot_answers() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let id = tid("trattoria-1");
    seed_embedded(&dirs, &wa, std::slice::from_ref(&id)).await;
    let receiver = Receiver::start().await;
    let host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &hook_env(&receiver));
    host.ready().await;
    host.wait_state(&id, SessionState::Open, STEP).await;
    let phone = "4915111110001";
    wa.add_contact(phone).unwrap();

    contact_says(&wa, &receiver, &id, phone, "two margheritas, please").await.unwrap();
    bot_answers(&wa, &host, &id, phone, "coming up in 20 minutes", Some(300)).await.unwrap();
    // Both ways again, now on the established session.
    contact_says(&wa, &receiver, &id, phone, "and a tiramisu").await.unwrap();
    bot_answers(&wa, &host, &id, phone, "added", None).await.unwrap();

    let inbox: Vec<_> = wa.contact_inbox(phone).into_iter().filter(|m| m.device_sent_to.is_none()).collect();
    let texts: Vec<_> = inbox.iter().map(|m| m.text.clone().unwrap_or_default()).collect();
    assert_eq!(texts, ["coming up in 20 minutes", "added"], "exactly the answers, once each: {inbox:?}");
    let retries: Vec<_> = wa.contact_receipts(phone).into_iter().filter(|r| r.kind == ReceiptKind::Retry).collect();
    assert!(retries.is_empty(), "no retry receipts: {retries:?}");
    drop(host);
    sim.shutdown().await;
}

/// Presents whatever epoch the store holds (the old host's), as a replace by that host would.
async fn replace_as_old_host(creds: &FirestoreCredentialStore, id: &TenantId, snap: &CredentialSnapshot) {
    match creds.replace(id, snap, 0).await {
        Ok(()) => {}
        Err(StoreError::Conflict(Conflict::StaleEpoch { current, .. })) => {
            creds.replace(id, snap, current).await.unwrap()
        }
        Err(e) => panic!("replace: {e}"),
    }
}

/// Messages both ways, SIGKILL, disk wipe, restore from Firestore (the whole snapshot, or with `partial` only
/// the device record and app-state sync keys), then the contact's next normal message and the bot's answer.
/// `Err` says why the restored session could not talk.
async fn restore_then_talk(partial: bool) -> Option<Result<(), String>> {
    let emulator = firestore_emulator()?;
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let prefix = fresh_prefix(if partial { "msgpartial" } else { "msgrestore" });
    let creds = Arc::new(FirestoreCredentialStore::new("wakeeper-test", dirs.cipher(), prefix.clone()).await.unwrap());
    let id = tid("osteria-1");
    creds.replace(&id, &wa.mint_device(&id), 0).await.unwrap();
    let env = |r: &Receiver| {
        let mut env = hook_env(r);
        env.push(("FIRESTORE_EMULATOR_HOST", emulator.clone()));
        env.push(("WAKEEPER_FIRESTORE_PROJECT", "wakeeper-test".to_string()));
        env.push(("WAKEEPER_FIRESTORE_PREFIX", prefix.clone()));
        env
    };
    let receiver = Receiver::start().await;
    let mut host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &env(&receiver));
    host.ready().await;
    assert!(matches!(host.client.ensure(&id).await.unwrap(), EnsureOutcome::Accepted(_)));
    host.wait_state(&id, SessionState::Open, STEP).await;
    let phone = "4915122220001";
    wa.add_contact(phone).unwrap();
    contact_says(&wa, &receiver, &id, phone, "is the terrace open?").await.unwrap();
    bot_answers(&wa, &host, &id, phone, "yes, until 11", None).await.unwrap();
    contact_says(&wa, &receiver, &id, phone, "a table for four at 8").await.unwrap();
    bot_answers(&wa, &host, &id, phone, "booked", None).await.unwrap();

    // Replication caught up: the store holds the generation of the local working copy.
    wait_until(STEP, "replication of the local working copy", || {
        let (creds, id, dirs_data, cipher) = (creds.clone(), id.clone(), dirs.data(), dirs.cipher());
        async move {
            let local = WorkingCopy::open(dirs_data, id.clone(), cipher).ok()?.generation()?;
            (creds.generation(&id).await.ok()?? == local).then_some(())
        }
    })
    .await;
    host.kill9();
    dirs.wipe_data();

    if partial {
        // What the old system restored: creds.json (the device record) and the app-state sync keys.
        let mut snap = creds.read(&id).await.unwrap();
        let before = snap.records.len();
        snap.records.retain(|k, _| matches!(k.kind, RecordKind::Device | RecordKind::AppStateSyncKey));
        assert!(snap.device().is_ok() && snap.records.len() < before, "the device record stays, sessions go");
        assert!(
            !snap.records.keys().any(|k| k.kind == RecordKind::Session),
            "no Signal session survives a partial restore"
        );
        replace_as_old_host(&creds, &id, &snap).await;
    }

    let host2 = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &env(&receiver));
    host2.ready().await;
    assert!(matches!(host2.client.ensure(&id).await.unwrap(), EnsureOutcome::Accepted(_)));
    host2.wait_state(&id, SessionState::Open, STEP).await;

    let outcome = async {
        let device = wa.device_jid(&id).unwrap();
        let text = "running 10 minutes late";
        let msg = wa.contact_send_text(phone, &device, text).await.map_err(|e| format!("contact send: {e}"))?;
        let enc = wa.contact_sent(phone).into_iter().find(|s| s.id == msg).map(|s| s.enc_type).unwrap_or_default();
        assert_eq!(enc, "msg", "a normal message on the existing session, not a new pre-key session");
        // The device answers every message: a delivery receipt when it decrypted it, a retry receipt when not.
        let receipt = wa
            .wait_for_receipt(phone, STEP, |r| {
                r.message_id == msg
                    && matches!(r.kind, ReceiptKind::Delivery | ReceiptKind::Inactive | ReceiptKind::Retry)
            })
            .await
            .map_err(|e| format!("no receipt for the message after the restore: {e}"))?;
        if receipt.kind == ReceiptKind::Retry {
            return Err(format!("the restored host sent a retry receipt (could not decrypt): {receipt:?}"));
        }
        let got = receiver.wait_message(&msg, STEP).await.ok_or("no message.received after the restore")?;
        if got.event["text"] != text || !got.signed {
            return Err(format!("wrong event after the restore: {:?}", got.event));
        }
        if let Some(r) =
            wa.contact_receipts(phone).into_iter().find(|r| r.message_id == msg && r.kind == ReceiptKind::Retry)
        {
            return Err(format!("a retry receipt followed: {r:?}"));
        }
        bot_answers(&wa, &host2, &id, phone, "no problem, see you", None).await
    }
    .await;
    drop(host2);
    sim.shutdown().await;
    Some(outcome)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_tenant_decrypts_the_next_message_with_no_retry() {
    let Some(outcome) = restore_then_talk(false).await else { return };
    outcome.unwrap();
}

/// Negative control: the same check fails when only the device record and app-state sync keys are restored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_restore_fails_the_same_check() {
    let Some(outcome) = restore_then_talk(true).await else { return };
    let err = outcome.expect_err("a partial restore must not be able to decrypt the existing session");
    assert!(err.contains("retry receipt"), "it fails because the device cannot decrypt: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_wait_in_the_outbox_while_the_bot_is_down() {
    let sim = wa_sim::Sim::start_local().await.unwrap();
    let wa = sim.handle();
    let dirs = Dirs::new();
    let id = tid("bistro-1");
    seed_embedded(&dirs, &wa, std::slice::from_ref(&id)).await;
    let mut receiver = Receiver::start().await;
    let mut host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &hook_env(&receiver));
    host.ready().await;
    host.wait_state(&id, SessionState::Open, STEP).await;
    let phone = "4915133330001";
    wa.add_contact(phone).unwrap();
    let first = contact_says(&wa, &receiver, &id, phone, "hello").await.unwrap();

    receiver.down().await;
    let device = wa.device_jid(&id).unwrap();
    let mut sent = vec![first];
    for i in 0..6 {
        let msg = wa.contact_send_text(phone, &device, &format!("order line {i}")).await.unwrap();
        // Delivered (acknowledged by the host, so in its outbox), while the bot cannot be reached.
        wa.wait_for_receipt(phone, STEP, |r| r.message_id == msg && r.kind == ReceiptKind::Delivery).await.unwrap();
        sent.push(msg);
        if i == 2 {
            // The host dies in the middle of it; the outbox in its data dir survives.
            host.kill9();
            host = TestHost::spawn(socket_host_bin!(), &dirs, &wa.url(), "host-a", &hook_env(&receiver));
            host.ready().await;
            host.wait_state(&id, SessionState::Open, STEP).await;
        }
    }
    assert!(receiver.messages().len() == 1, "nothing reached the bot while it was down");
    receiver.up().await;

    let want: BTreeSet<String> = sent.iter().cloned().collect();
    let got = wait_until(Duration::from_secs(90), "every message delivered after the bot came back", || {
        let got: BTreeSet<String> =
            receiver.messages().iter().filter_map(|d| d.event["message_id"].as_str().map(str::to_owned)).collect();
        let want = want.clone();
        async move { want.is_subset(&got).then_some(got) }
    })
    .await;
    assert_eq!(got, want, "exactly the messages the contact sent");
    assert!(receiver.messages().iter().all(|d| d.signed), "every delivery is signed");
    let texts: BTreeSet<String> =
        receiver.messages().iter().filter_map(|d| d.event["text"].as_str().map(str::to_owned)).collect();
    assert!((0..6).all(|i| texts.contains(&format!("order line {i}"))), "{texts:?}");
    drop(host);
    sim.shutdown().await;
}
