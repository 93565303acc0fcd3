//! Message traffic, as the server routes it: device to contact, contact to device, device to device.
//!
//! A device's `<message>` names its recipients' devices in `<participants><to jid>` (or carries one
//! direct `<enc>` for the stanza's `to`). Each recipient that is a contact decrypts its part, records it
//! and answers the sender with a delivery `<receipt>`; each recipient that is a registered device gets a
//! `<message from=sender>` with its part, as WhatsApp forwards it. Receipts and acks a device sends about
//! a contact's message are recorded on that contact (retry receipts too, and nothing answers them: a
//! test that wants a session repaired does so itself). Stanzas for a device go out on its live
//! connection at once, or wait in its offline queue until it next leaves passive mode.

use std::sync::Arc;

use rand::RngExt;
use tokio::sync::mpsc;
use whatsapp_rust::wacore::messages::{MessageUtils, decode_plaintext};
use whatsapp_rust::wacore_binary::builder::NodeBuilder;
use whatsapp_rust::wacore_binary::{Jid, Node, NodeRef, Server};
use whatsapp_rust::waproto::whatsapp as wa;

use crate::contacts::{ContactMessage, ContactSent, DeviceBundle, EncKind, ReceiptKind, ReceiptSeen, summarize};
use crate::keys::now_secs;
use crate::server::SimError;
use crate::state::{Shared, State};

/// One `<enc>` as a device sent it.
#[derive(Debug, Clone)]
pub(crate) struct Enc {
    kind: String,
    version: String,
    bytes: Vec<u8>,
}

/// What a device sent that the relay routes, copied out of the stanza.
#[derive(Debug)]
pub(crate) enum Inbound {
    Message {
        id: String,
        to: Jid,
        stanza_type: String,
        /// Each recipient device with its part (the direct `<enc>` form is one entry for `to`).
        parts: Vec<(Jid, Vec<Enc>)>,
        device_identity: Option<Vec<u8>>,
    },
    Receipt {
        ids: Vec<String>,
        to: Jid,
        kind: Option<String>,
        retry_count: Option<u32>,
        /// The whole receipt, for forwarding to a device.
        node: Node,
    },
    Ack {
        id: String,
        to: Jid,
    },
}

fn attr(node: &NodeRef<'_>, key: &str) -> Option<String> {
    node.get_attr(key).map(|v| v.as_str().into_owned())
}

fn encs(node: &NodeRef<'_>) -> Vec<Enc> {
    node.get_children_by_tag("enc")
        .filter_map(|e| {
            Some(Enc {
                kind: attr(e, "type")?,
                version: attr(e, "v").unwrap_or_else(|| "2".to_owned()),
                bytes: e.content_bytes()?.to_vec(),
            })
        })
        .collect()
}

/// The part of a device's stanza the relay cares about, if any.
pub(crate) fn inbound(node: &NodeRef<'_>) -> Option<Inbound> {
    let to = node.attrs().optional_jid("to")?;
    let id = attr(node, "id").filter(|i| !i.is_empty())?;
    match &*node.tag {
        "message" => {
            let mut parts: Vec<(Jid, Vec<Enc>)> = node
                .get_optional_child("participants")
                .map(|p| {
                    p.get_children_by_tag("to")
                        .filter_map(|t| Some((t.attrs().optional_jid("jid")?, encs(t))))
                        .filter(|(_, e)| !e.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            let direct = encs(node);
            if !direct.is_empty() {
                parts.push((to.clone(), direct));
            }
            let device_identity =
                node.get_optional_child("device-identity").and_then(|d| d.content_bytes()).map(<[u8]>::to_vec);
            Some(Inbound::Message {
                id,
                to,
                stanza_type: attr(node, "type").unwrap_or_else(|| "text".to_owned()),
                parts,
                device_identity,
            })
        }
        "receipt" => {
            let mut ids = vec![id];
            if let Some(list) = node.get_optional_child("list") {
                ids.extend(list.get_children_by_tag("item").filter_map(|i| attr(i, "id")));
            }
            let retry_count =
                node.get_optional_child("retry").and_then(|r| attr(r, "count")).and_then(|c| c.parse().ok());
            Some(Inbound::Receipt { ids, to, kind: attr(node, "type"), retry_count, node: node.to_owned() })
        }
        "ack" if attr(node, "class").as_deref() == Some("message") => Some(Inbound::Ack { id, to }),
        _ => None,
    }
}

/// Where a JID a device addressed leads.
enum Recipient {
    Contact(String),
    Device(String),
    Nobody,
}

fn recipient(s: &mut State, jid: &Jid) -> Recipient {
    if let Some(phone) = s.contact_for(jid) {
        return Recipient::Contact(phone);
    }
    let device = match jid.server {
        Server::Pn => s.devices.get(&jid.to_string()).map(|d| d.jid.to_string()),
        Server::Lid => {
            s.devices_of(jid.user.as_str(), true).find(|d| d.jid.device == jid.device).map(|d| d.jid.to_string())
        }
        _ => None,
    };
    device.map_or(Recipient::Nobody, Recipient::Device)
}

/// Routes what the logged-in device `from` sent. Runs on that device's connection task, so its stanzas
/// are routed in the order it sent them.
pub(crate) async fn handle(shared: &Shared, from: &str, inbound: Inbound) {
    let Ok(sender) = from.parse::<Jid>() else { return };
    match inbound {
        Inbound::Message { id, to, stanza_type, parts, device_identity } => {
            for (target, encs) in parts {
                let routed = shared.update(|s| recipient(s, &target));
                match routed {
                    Recipient::Contact(phone) => to_contact(shared, &sender, &phone, &id, &encs).await,
                    Recipient::Device(device) => {
                        let node = forwarded(&sender, &to, &id, &stanza_type, &encs, device_identity.as_deref());
                        shared.update(|s| deliver(s, &device, node));
                    }
                    Recipient::Nobody => tracing::debug!(to = %target, "message part for nobody dropped"),
                }
            }
        }
        Inbound::Receipt { ids, to, kind, retry_count, node } => {
            let t = now_secs();
            if kind.as_deref() != Some("retry") {
                // A retry receipt says the device could not decrypt: that is no acknowledgement.
                shared.update(|s| acknowledged(s, from, &ids));
            }
            shared.update(|s| match recipient(s, &to) {
                Recipient::Contact(phone) => {
                    let contact = s.contacts.get_mut(&phone).expect("recipient found it");
                    for id in ids {
                        contact.receipts.push(ReceiptSeen {
                            message_id: id,
                            from: from.to_owned(),
                            kind: ReceiptKind::from_wire(kind.as_deref()),
                            raw_type: kind.clone(),
                            retry_count,
                            t,
                        });
                    }
                }
                Recipient::Device(device) => {
                    let mut node = node;
                    node.attrs.0.retain(|(k, _)| k != "to");
                    node.attrs.insert("from", sender.clone());
                    node.attrs.insert("t", t.to_string());
                    deliver(s, &device, node);
                }
                Recipient::Nobody => {}
            });
        }
        Inbound::Ack { id, to } => {
            let t = now_secs();
            shared.update(|s| {
                acknowledged(s, from, std::slice::from_ref(&id));
                if let Recipient::Contact(phone) = recipient(s, &to) {
                    s.contacts.get_mut(&phone).expect("recipient found it").receipts.push(ReceiptSeen {
                        message_id: id,
                        from: from.to_owned(),
                        kind: ReceiptKind::Ack,
                        raw_type: None,
                        retry_count: None,
                        t,
                    });
                }
            });
        }
    }
}

/// A contact's part of a device's message: decrypt, record, and (for a contact other than the sender's
/// own phone) answer with a delivery receipt.
async fn to_contact(shared: &Shared, sender: &Jid, phone: &str, id: &str, encs: &[Enc]) {
    let Some((signal, contact_jid, own_phone)) = shared
        .lock()
        .contacts
        .get(phone)
        .map(|c| (Arc::clone(&c.signal), c.jid.clone(), c.lid.is_some() && c.jid.user == sender.user))
    else {
        return;
    };
    let mut records = Vec::with_capacity(encs.len());
    {
        let mut signal = signal.lock().await;
        for enc in encs {
            let mut record = ContactMessage {
                id: id.to_owned(),
                from: sender.to_string(),
                enc_type: enc.kind.clone(),
                text: None,
                kind: "undecryptable".to_owned(),
                device_sent_to: None,
                error: None,
                t: now_secs(),
            };
            let padding = enc.version.parse().unwrap_or(2);
            let decrypted = match EncKind::from_wire(&enc.kind) {
                Some(kind) => signal.decrypt(sender, kind, &enc.bytes).await.map_err(|e| e.to_string()),
                None => Err(format!("unsupported enc type {}", enc.kind)),
            };
            match decrypted.and_then(|p| decode_plaintext(&p, padding).map_err(|e| e.to_string())) {
                Ok(message) => {
                    let (text, kind, device_sent_to) = summarize(message);
                    record.text = text;
                    record.kind = kind.to_owned();
                    record.device_sent_to = device_sent_to;
                }
                Err(e) => {
                    tracing::debug!(contact = %phone, message = %id, error = %e, "contact could not decrypt");
                    record.error = Some(e);
                }
            }
            records.push(record);
        }
    }
    let decrypted = records.iter().any(|r| r.error.is_none());
    tracing::debug!(contact = %phone, message = %id, decrypted, "message for contact");
    shared.update(|s| {
        if let Some(c) = s.contacts.get_mut(phone) {
            c.inbox.extend(records);
        }
        if decrypted && !own_phone {
            let receipt = NodeBuilder::new("receipt")
                .attr("from", contact_jid)
                .attr("id", id.to_owned())
                .attr("t", now_secs().to_string())
                .build();
            deliver(s, &sender.to_string(), receipt);
        }
    });
}

/// A device's part of another device's message, as the recipient receives it.
fn forwarded(sender: &Jid, to: &Jid, id: &str, stanza_type: &str, encs: &[Enc], identity: Option<&[u8]>) -> Node {
    let mut node = NodeBuilder::new("message")
        .attr("from", sender.clone())
        .attr("id", id.to_owned())
        .attr("type", stanza_type.to_owned())
        .attr("t", now_secs().to_string());
    if to.user == sender.user && to.server == sender.server {
        // A copy of one's own message for a sibling device names the chat it went to.
        node = node.attr("recipient", to.clone());
    }
    let mut children: Vec<Node> = encs.iter().map(enc_node).collect();
    if let Some(identity) = identity.filter(|_| encs.iter().any(|e| e.kind == "pkmsg")) {
        children.push(NodeBuilder::new("device-identity").bytes(identity.to_vec()).build());
    }
    node.children(children).build()
}

fn enc_node(enc: &Enc) -> Node {
    NodeBuilder::new("enc")
        .attr("v", enc.version.clone())
        .attr("type", enc.kind.clone())
        .bytes(enc.bytes.clone())
        .build()
}

/// Hands a stanza to a device: on its newest live connection, else into its offline queue.
pub(crate) fn deliver(s: &mut State, device: &str, node: Node) {
    let live = s.live_by_jid.get(device).into_iter().flatten().filter_map(|id| s.live.get(id));
    let mut node = Some(node);
    for conn in live {
        match conn.outbox.send(node.take().expect("present until sent")) {
            Ok(()) => return,
            Err(mpsc::error::SendError(back)) => node = Some(back),
        }
    }
    s.offline.entry(device.to_owned()).or_default().extend(node);
}

/// The device acknowledged these messages: none of them is redelivered.
fn acknowledged(s: &mut State, device: &str, ids: &[String]) {
    if let Some(waiting) = s.unacked.get_mut(device) {
        waiting.retain(|(id, _)| !ids.contains(id));
    }
}

/// The device's offline queue, emptied, each stanza marked as offline delivery. With redelivery on, the
/// contacts' messages it received before but never acknowledged come first, in the order they were sent.
pub(crate) fn take_offline(s: &mut State, device: &str) -> Vec<Node> {
    let mut queued = s.offline.remove(device).unwrap_or_default();
    if s.redeliver_unacked
        && let Some(waiting) = s.unacked.get(device)
    {
        let id_of = |n: &Node| n.attrs.get("id").map(|v| v.as_str().into_owned());
        let already: std::collections::HashSet<String> = queued.iter().filter_map(id_of).collect();
        let mut again: Vec<Node> =
            waiting.iter().filter(|(id, _)| !already.contains(id)).map(|(_, node)| node.clone()).collect();
        if !again.is_empty() {
            tracing::debug!(device, redelivered = again.len(), "redelivering unacknowledged messages");
            again.append(&mut queued);
            queued = again;
        }
    }
    for node in &mut queued {
        if node.tag == "message" {
            node.attrs.insert("offline", "1");
        }
    }
    queued
}

/// Puts back what a connection that ended did not get to send.
pub(crate) fn requeue(shared: &Shared, device: &str, outbox: &mut mpsc::UnboundedReceiver<Node>) {
    let mut left = Vec::new();
    while let Ok(node) = outbox.try_recv() {
        left.push(node);
    }
    if !left.is_empty() {
        shared.update(|s| {
            let queue = s.offline.entry(device.to_owned()).or_default();
            left.append(queue);
            *queue = left;
        });
    }
}

/// A message id in the style a phone uses.
fn message_id() -> String {
    format!("3EB0{:016X}", rand::rng().random::<u64>())
}

/// A contact sends `message` to a device: the device's published bundle starts a session when there is
/// none (`pkmsg`), the session carries it otherwise. Returns the message id.
pub(crate) async fn contact_send(
    shared: &Shared,
    phone: &str,
    device: &str,
    message: &wa::Message,
) -> Result<String, SimError> {
    let device_jid: Jid = device.parse().map_err(|_| SimError::InvalidJid(device.to_owned()))?;
    if !device_jid.is_pn() || device_jid.device == 0 {
        return Err(SimError::InvalidJid(device.to_owned()));
    }
    let (signal, contact_jid) = {
        let s = shared.lock();
        if !s.devices.contains_key(device) {
            return Err(SimError::UnknownDevice(device.to_owned()));
        }
        let c = s.contacts.get(phone).ok_or_else(|| SimError::UnknownContact(phone.to_owned()))?;
        (Arc::clone(&c.signal), c.jid.clone())
    };
    let mut signal = signal.lock().await;
    if !signal.has_session(&device_jid) {
        let bundle = shared
            .update(|s| s.devices.get_mut(device).and_then(|d| DeviceBundle::take(&mut d.keys)))
            .ok_or_else(|| SimError::NoKeys(device.to_owned()))?;
        signal.start_session(&device_jid, &bundle).await.map_err(|e| SimError::Signal(e.to_string()))?;
    }
    let plaintext = MessageUtils::encode_and_pad(message);
    let (kind, ciphertext) =
        signal.encrypt(&device_jid, &plaintext).await.map_err(|e| SimError::Signal(e.to_string()))?;
    let id = message_id();
    let t = now_secs();
    let node = NodeBuilder::new("message")
        .attr("from", contact_jid)
        .attr("id", id.clone())
        .attr("type", whatsapp_rust::wacore::send::stanza_type_from_message(message))
        .attr("t", t.to_string())
        .attr("notify", format!("wa-sim {phone}"))
        .children([NodeBuilder::new("enc").attr("v", "2").attr("type", kind.as_str()).bytes(ciphertext).build()])
        .build();
    // Delivered while the session is still held, so a contact's messages reach a device in order.
    shared.update(|s| {
        let delivered_live = s.live_by_jid.get(device).is_some_and(|l| !l.is_empty());
        if s.redeliver_unacked {
            s.unacked.entry(device.to_owned()).or_default().push((id.clone(), node.clone()));
        }
        deliver(s, device, node);
        if let Some(c) = s.contacts.get_mut(phone) {
            c.sent.push(ContactSent {
                id: id.clone(),
                to: device.to_owned(),
                enc_type: kind.as_str().to_owned(),
                delivered_live,
                t,
            });
        }
    });
    drop(signal);
    tracing::debug!(contact = %phone, device = %device, message = %id, enc = kind.as_str(), "contact sent a message");
    Ok(id)
}
