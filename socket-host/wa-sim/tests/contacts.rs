//! Contacts against the real engine: a WhatsApp user the simulator plays holds a real Signal session with
//! a minted device. It sends (pkmsg first, msg once the device has answered), receives and decrypts what
//! the device sends it, and records delivery and retry receipts. Its own test binary, so the captured
//! engine warnings belong to these clients only.

use std::time::Duration;

use serde_json::json;
use wa_sim::loadgen::control_request;
use wa_sim::{MintOptions, MintedDevice, ReceiptKind, Sim, SimConfig};
use wakeeper_testkit::{TestClient, tenant, warnings};
use whatsapp_rust::prelude::Event;
use whatsapp_rust::wacore_binary::Jid;

const CONNECT: Duration = Duration::from_secs(20);
const STEP: Duration = Duration::from_secs(20);

/// The one engine warning these tests cause on purpose: the negative control's undecryptable message.
const EXPECTED_WARNINGS: &[&str] = &["failed to decrypt and has no group content"];

fn assert_no_unexpected_warnings() {
    let unexpected: Vec<String> =
        warnings().into_iter().filter(|w| !EXPECTED_WARNINGS.iter().any(|e| w.contains(e))).collect();
    assert!(unexpected.is_empty(), "engine warnings: {unexpected:#?}");
}

/// A minted device whose engine uploads its pre-keys at login (so a contact's first message consumes a
/// real one-time pre-key), connected, with its upload on the server.
async fn device(sim: &Sim, name: &str) -> (TestClient, MintedDevice) {
    let opts = MintOptions { server_has_prekeys: false, ..Default::default() };
    let minted = sim.mint_device_with(&tenant(name), &opts).unwrap();
    let mut client = TestClient::start(&sim.url(), &minted.snapshot).await;
    client.connected(CONNECT).await;
    sim.wait_for_device(&minted.jid, STEP, |o| o.prekeys_held > 0).await.expect("the engine uploads pre-keys");
    (client, minted)
}

/// Waits for the engine to emit the decrypted message `id`; returns its text.
async fn received_text(client: &mut TestClient, id: &str) -> String {
    let ev = client
        .wait_event(STEP, "Messages", |e| matches!(e, Event::Messages(b) if b.iter().any(|m| m.info.id == id)))
        .await;
    let Event::Messages(batch) = &*ev else { unreachable!() };
    let m = batch.iter().find(|m| m.info.id == id).unwrap();
    assert_eq!(m.info.source.sender.device, 0, "from the contact's phone");
    m.message.conversation.clone().expect("a text message")
}

fn enc_of(sim: &Sim, phone: &str, id: &str) -> String {
    sim.contact_sent(phone).into_iter().find(|s| s.id == id).expect("the contact recorded its send").enc_type
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_sends_text_to_a_connected_device() {
    let sim = Sim::start_local().await.unwrap();
    let (mut client, dev) = device(&sim, "contact-in-1").await;
    let phone = "5521987650001";
    let info = sim.add_contact(phone).unwrap();
    assert_eq!(info.jid, format!("{phone}@s.whatsapp.net"));
    assert_eq!(sim.add_contact(phone).unwrap(), info, "adding is idempotent");
    let prekeys_before = sim.prekey_ids(&dev.jid).unwrap().len();

    let first = sim.contact_send_text(phone, &dev.jid, "Olá, mesa para dois às 20h?").await.unwrap();
    assert_eq!(received_text(&mut client, &first).await, "Olá, mesa para dois às 20h?");
    assert_eq!(enc_of(&sim, phone, &first), "pkmsg", "no session yet: a pre-key message");
    assert_eq!(sim.prekey_ids(&dev.jid).unwrap().len(), prekeys_before - 1, "one one-time pre-key handed out");

    // The device has not answered, so Signal keeps the pre-key envelope; the session is reused all the same.
    let second = sim.contact_send_text(phone, &dev.jid, "segunda").await.unwrap();
    assert_eq!(received_text(&mut client, &second).await, "segunda");
    assert_eq!(sim.prekey_ids(&dev.jid).unwrap().len(), prekeys_before - 1, "no new session, no new pre-key");

    for id in [&first, &second] {
        let r = sim
            .wait_for_receipt(phone, STEP, |r| r.message_id == *id && r.kind == ReceiptKind::Delivery)
            .await
            .expect("the device sends a delivery receipt");
        assert_eq!(r.from, dev.jid);
    }
    assert!(sim.contact_receipts(phone).iter().all(|r| r.kind == ReceiptKind::Delivery), "no retry receipts");
    client.stop().await;
    assert_no_unexpected_warnings();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_sends_text_to_a_contact_and_the_conversation_ratchets() {
    let sim = Sim::start_local().await.unwrap();
    let (mut client, dev) = device(&sim, "contact-out-1").await;
    let phone = "5521987650002";
    sim.add_contact(phone).unwrap();
    let contact: Jid = format!("{phone}@s.whatsapp.net").parse().unwrap();

    // The device starts: it fetches the contact's bundle and sends a pre-key message.
    let sent = client.client.send_text(contact.clone(), "Seu pedido saiu para entrega").await.unwrap();
    let got = sim.wait_for_contact_message(phone, STEP, |m| m.id == sent.message_id).await.unwrap();
    assert_eq!(got.text.as_deref(), Some("Seu pedido saiu para entrega"));
    assert_eq!(
        (got.from.as_str(), got.enc_type.as_str(), got.kind.as_str()),
        (dev.jid.as_str(), "pkmsg", "conversation")
    );
    assert_eq!(got.error, None);
    assert_eq!(sim.contact(phone).unwrap().prekeys_left, 31, "the device took one of the contact's pre-keys");

    // The device's own phone got its copy, a DeviceSentMessage naming the chat.
    let own_phone = dev.jid.split(':').next().unwrap().to_owned();
    let copy = sim.wait_for_contact_message(&own_phone, STEP, |m| m.id == sent.message_id).await.unwrap();
    assert_eq!(copy.text.as_deref(), Some("Seu pedido saiu para entrega"));
    assert_eq!(copy.device_sent_to.as_deref(), Some(contact.to_string().as_str()));
    assert!(sim.contact(&own_phone).unwrap().account_phone);

    // The contact answers on the session the device started: a normal message.
    let reply = sim.contact_send_text(phone, &dev.jid, "Obrigado!").await.unwrap();
    assert_eq!(received_text(&mut client, &reply).await, "Obrigado!");
    assert_eq!(enc_of(&sim, phone, &reply), "msg");

    // And the device's next message is a normal one too.
    let next = client.client.send_text(contact.clone(), "De nada").await.unwrap();
    let got = sim.wait_for_contact_message(phone, STEP, |m| m.id == next.message_id).await.unwrap();
    assert_eq!((got.text.as_deref(), got.enc_type.as_str()), (Some("De nada"), "msg"));
    client.stop().await;
    assert_no_unexpected_warnings();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_switches_to_msg_once_the_device_answers() {
    let sim = Sim::start_local().await.unwrap();
    let (mut client, dev) = device(&sim, "contact-both-1").await;
    let phone = "5521987650003";
    sim.add_contact(phone).unwrap();

    let first = sim.contact_send_text(phone, &dev.jid, "primeira").await.unwrap();
    assert_eq!(received_text(&mut client, &first).await, "primeira");
    assert_eq!(enc_of(&sim, phone, &first), "pkmsg");

    let contact: Jid = format!("{phone}@s.whatsapp.net").parse().unwrap();
    let answer = client.client.send_text(contact, "resposta").await.unwrap();
    let got = sim.wait_for_contact_message(phone, STEP, |m| m.id == answer.message_id).await.unwrap();
    assert_eq!((got.text.as_deref(), got.enc_type.as_str()), (Some("resposta"), "msg"), "on the contact's session");
    // The device gets the contact's delivery receipt for its answer.
    client
        .wait_event(STEP, "Receipt", |e| matches!(e, Event::Receipt(r) if r.message_ids.contains(&answer.message_id)))
        .await;

    let then = sim.contact_send_text(phone, &dev.jid, "depois").await.unwrap();
    assert_eq!(received_text(&mut client, &then).await, "depois");
    assert_eq!(enc_of(&sim, phone, &then), "msg", "an answered session sends normal messages");
    sim.wait_for_receipt(phone, STEP, |r| r.message_id == then && r.kind == ReceiptKind::Delivery).await.unwrap();
    client.stop().await;
    assert_no_unexpected_warnings();
}

/// The negative control a restore test relies on: a device that lost its Signal sessions (here a client
/// restored from the bare snapshot, as a partial restore would leave it) cannot read the contact's next
/// normal message; the contact sees a retry receipt and the engine emits no message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_the_session_answers_a_msg_with_a_retry_receipt() {
    let sim = Sim::start_local().await.unwrap();
    let (mut client, dev) = device(&sim, "contact-lost-1").await;
    let phone = "5521987650004";
    sim.add_contact(phone).unwrap();
    let first = sim.contact_send_text(phone, &dev.jid, "oi").await.unwrap();
    assert_eq!(received_text(&mut client, &first).await, "oi");
    let contact: Jid = format!("{phone}@s.whatsapp.net").parse().unwrap();
    let answer = client.client.send_text(contact, "oi!").await.unwrap();
    sim.wait_for_contact_message(phone, STEP, |m| m.id == answer.message_id).await.unwrap();
    client.stop().await;
    sim.wait_for_device(&dev.jid, STEP, |o| o.current_connections == 0).await.unwrap();

    // Queued while the device is away, delivered when the session-less client logs in.
    let lost = sim.contact_send_text(phone, &dev.jid, "ainda aí?").await.unwrap();
    assert_eq!(enc_of(&sim, phone, &lost), "msg");
    assert_eq!(sim.offline_queue_len(&dev.jid), 1);
    let mut restored = TestClient::start(&sim.url(), &dev.snapshot).await;
    let ev = restored
        .wait_event(STEP, "UndecryptableMessage", |e| {
            matches!(e, Event::UndecryptableMessage(u) if u.info.id == lost)
                || matches!(e, Event::Messages(b) if b.iter().any(|m| m.info.id == lost))
        })
        .await;
    assert!(matches!(&*ev, Event::UndecryptableMessage(_)), "the message must not decrypt without the session");
    let retry = sim
        .wait_for_receipt(phone, STEP, |r| r.message_id == lost && r.kind == ReceiptKind::Retry)
        .await
        .expect("the device asks for the message again");
    assert_eq!((retry.from.as_str(), retry.retry_count), (dev.jid.as_str(), Some(1)));
    assert_eq!(sim.offline_queue_len(&dev.jid), 0);
    assert!(
        !sim.contact_receipts(phone).iter().any(|r| r.message_id == lost && r.kind == ReceiptKind::Delivery),
        "no delivery receipt for a message the device could not read"
    );
    assert!(
        !sim.contact_receipts(phone).iter().any(|r| r.message_id == first && r.kind == ReceiptKind::Retry),
        "the first message was read, no retry for it"
    );
    // The engine also asks its own phone for the message (a peer data operation); the phone records it.
    let own_phone = dev.jid.split(':').next().unwrap().to_owned();
    let pdo = sim.wait_for_contact_message(&own_phone, STEP, |m| m.kind != "conversation").await.unwrap();
    assert_eq!((pdo.kind.as_str(), pdo.error.as_deref()), ("protocol", None), "{pdo:?}");
    restored.stop().await;
    assert_no_unexpected_warnings();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_surface_drives_contacts() {
    let config = SimConfig { control_bind: Some(([127, 0, 0, 1], 0).into()), ..Default::default() };
    let sim = Sim::start(config).await.unwrap();
    let base = format!("http://{}", sim.control_addr().unwrap());
    let (mut client, dev) = device(&sim, "contact-http-1").await;
    let phone = "5521987650005";

    let (status, body) =
        control_request(&base, "POST", "/v1/contacts", Some(&json!({ "phone": phone }))).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["jid"], format!("{phone}@s.whatsapp.net"));
    let (status, body) =
        control_request(&base, "POST", "/v1/contacts", Some(&json!({ "phone": "+55 21" }))).await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("phone"));
    let (status, _) = control_request(&base, "GET", "/v1/contacts/5599999999/inbox", None).await.unwrap();
    assert_eq!(status, 404);
    let send = json!({ "to": "5511000000000:3@s.whatsapp.net", "text": "x" });
    let (status, body) =
        control_request(&base, "POST", &format!("/v1/contacts/{phone}/messages"), Some(&send)).await.unwrap();
    assert_eq!((status, body["error"].as_str().is_some()), (404, true), "unknown device: {body}");

    let send = json!({ "to": dev.jid, "text": "pelo controle" });
    let (status, body) =
        control_request(&base, "POST", &format!("/v1/contacts/{phone}/messages"), Some(&send)).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    assert_eq!(received_text(&mut client, &id).await, "pelo controle");
    sim.wait_for_receipt(phone, STEP, |r| r.message_id == id).await.unwrap();
    let (_, receipts) = control_request(&base, "GET", &format!("/v1/contacts/{phone}/receipts"), None).await.unwrap();
    assert_eq!(receipts[0]["message_id"], id.as_str());
    assert_eq!(receipts[0]["kind"], "delivery");
    assert_eq!(receipts[0]["from"], dev.jid.as_str());

    let contact: Jid = format!("{phone}@s.whatsapp.net").parse().unwrap();
    let sent = client.client.send_text(contact, "resposta http").await.unwrap();
    sim.wait_for_contact_message(phone, STEP, |m| m.id == sent.message_id).await.unwrap();
    let (_, inbox) = control_request(&base, "GET", &format!("/v1/contacts/{phone}/inbox"), None).await.unwrap();
    assert_eq!(inbox[0]["text"], "resposta http");
    assert_eq!(inbox[0]["enc_type"], "msg");
    client.stop().await;
    assert_no_unexpected_warnings();
}
