//! Messages in and out of a tenant's session.
//!
//! Inbound: [`InboundHook`] is the engine's inbound durability hook. The engine calls it with every decrypted
//! message *before* it acknowledges the message to WhatsApp; the hook turns each one into a `message.received`
//! event ([`received_event`]) and writes it to the durable [`Outbox`], and only when that write is on disk does
//! the engine send its ack. A crash before that point leaves the message unacknowledged, so WhatsApp delivers
//! it again on the next connect (the engine also keeps its own buffered copy in the working copy).
//!
//! Outbound: [`parse_recipient`] and [`check_text`] validate a send request; an accepted text is handed to the
//! session's sender task ([`run_sender`]), which shows "typing..." when asked and sends, one message after
//! another per session, so a slow send or a long typing pause never holds up a request or another session.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use wakeeper_shared::domain::{SessionState, SessionView, TenantId};
use wakeeper_shared::host_api::{MAX_TEXT_CHARS, MAX_TYPING_MS};
use whatsapp_rust::Jid;
use whatsapp_rust::client::Client;
use whatsapp_rust::send::SendOptions;
use whatsapp_rust::types::durability_hook::InboundMessage;
use whatsapp_rust::wacore::proto_helpers::{MessageBuilderExt, MessageExt};
use whatsapp_rust::waproto::whatsapp as wa;

use crate::outbox::{Outbox, OutboxEvent};

/// The event type of an inbound message.
pub const MESSAGE_RECEIVED: &str = "message.received";
/// Sends waiting per session beyond which a new one is refused (`send_queue_full`).
pub const SEND_QUEUE: usize = 256;
/// How long an accepted send keeps trying (waiting for the session to be open again after a drop).
pub const SEND_DEADLINE: Duration = Duration::from_secs(120);

/// A `message.received` webhook event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MessageEvent {
    /// `<tenant_id>:<message_id>`: the idempotency key (also in `X-Wakeeper-Event-Id` and `Idempotency-Key`).
    pub id: String,
    /// Always [`MESSAGE_RECEIVED`].
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The tenant whose session received the message.
    pub tenant_id: TenantId,
    /// The chat: the contact's jid for a direct message, the group's jid for a group message.
    pub chat: String,
    /// Who sent it (the tenant's own jid when `from_me`).
    pub sender: String,
    /// The sender's phone-number jid when WhatsApp addressed the message by LID and told us both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sender_alt: Option<String>,
    /// The WhatsApp message id.
    pub message_id: String,
    /// Sent by the tenant's own phone (another device of the same account).
    pub from_me: bool,
    /// Whether the chat is a group.
    pub is_group: bool,
    /// The sender's display name, when WhatsApp sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push_name: Option<String>,
    /// The message's WhatsApp timestamp, in ms since the epoch.
    pub at_ms: i64,
    /// `text`, `image`, `video`, `audio`, `voice`, `document`, `sticker`, `location`, `contact`, `reaction`,
    /// `poll`, `edit`, `revoke` or `other`.
    pub content_type: &'static str,
    /// The text, or a media caption.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// A short typed summary of non-text content (mime type, file name, coordinates, reacted message id, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<serde_json::Value>,
}

/// What a message holds, as the event reports it; `None` for protocol plumbing that is no message to a person
/// (sender-key distribution, app-state key shares, history-sync notices, ...).
fn classify(message: &wa::Message) -> Option<(&'static str, Option<String>, Option<serde_json::Value>)> {
    use serde_json::json;
    let m = message.get_base_message();
    if let Some(t) = m.conversation.as_deref() {
        return Some(("text", Some(t.to_owned()), None));
    }
    if let Some(t) = m.extended_text_message.as_option() {
        return Some(("text", t.text.clone(), None));
    }
    if let Some(i) = m.image_message.as_option() {
        return Some(("image", i.caption.clone(), Some(json!({ "mimetype": i.mimetype }))));
    }
    if let Some(v) = m.video_message.as_option() {
        return Some(("video", v.caption.clone(), Some(json!({ "mimetype": v.mimetype, "seconds": v.seconds }))));
    }
    if let Some(a) = m.audio_message.as_option() {
        let kind = if a.ptt == Some(true) { "voice" } else { "audio" };
        return Some((kind, None, Some(json!({ "mimetype": a.mimetype, "seconds": a.seconds }))));
    }
    if let Some(d) = m.document_message.as_option() {
        return Some((
            "document",
            d.caption.clone(),
            Some(json!({ "mimetype": d.mimetype, "file_name": d.file_name })),
        ));
    }
    if let Some(s) = m.sticker_message.as_option() {
        return Some(("sticker", None, Some(json!({ "mimetype": s.mimetype }))));
    }
    if let Some(l) = m.location_message.as_option() {
        let summary = json!({ "latitude": l.degrees_latitude, "longitude": l.degrees_longitude, "name": l.name });
        return Some(("location", None, Some(summary)));
    }
    if let Some(c) = m.contact_message.as_option() {
        return Some(("contact", None, Some(json!({ "display_name": c.display_name }))));
    }
    if let Some(r) = m.reaction_message.as_option() {
        let target = r.key.as_option().and_then(|k| k.id.clone());
        return Some(("reaction", r.text.clone(), Some(json!({ "message_id": target }))));
    }
    if let Some(p) = m.poll_creation_message.as_option().or(m.poll_creation_message_v3.as_option()) {
        return Some(("poll", p.name.clone(), None));
    }
    if let Some(p) = m.protocol_message.as_option() {
        use wa::message::protocol_message::Type;
        let target = p.key.as_option().and_then(|k| k.id.clone());
        return match p.r#type {
            Some(Type::Revoke) => Some(("revoke", None, Some(json!({ "message_id": target })))),
            Some(Type::MessageEdit) => {
                let text = p.edited_message.as_option().and_then(|e| e.text_content().map(str::to_owned));
                Some(("edit", text, Some(json!({ "message_id": target }))))
            }
            _ => None,
        };
    }
    if is_bare(m) {
        return None;
    }
    Some(("other", None, None))
}

/// A message carrying nothing but the context/key-distribution fields.
fn is_bare(m: &wa::Message) -> bool {
    let mut probe = m.clone();
    probe.message_context_info = Default::default();
    probe.sender_key_distribution_message = Default::default();
    probe == wa::Message::default()
}

/// The event an inbound message becomes, or `None` for protocol plumbing.
pub fn received_event(tenant: &TenantId, message: &InboundMessage) -> Option<MessageEvent> {
    let (content_type, text, summary) = classify(&message.message)?;
    let info = &message.info;
    let source = &info.source;
    Some(MessageEvent {
        id: format!("{tenant}:{}", info.id),
        kind: MESSAGE_RECEIVED,
        tenant_id: tenant.clone(),
        chat: source.chat.to_string(),
        sender: source.sender.to_string(),
        sender_alt: source.sender_alt.as_ref().map(ToString::to_string),
        message_id: info.id.to_string(),
        from_me: source.is_from_me,
        is_group: source.is_group,
        push_name: Some(info.push_name.clone()).filter(|n| !n.is_empty()),
        at_ms: info.timestamp.timestamp_millis(),
        content_type,
        text,
        summary,
    })
}

/// The engine's inbound durability hook of one tenant: writes the batch's events to the outbox; the engine
/// acknowledges the messages to WhatsApp only after this returns `Ok`.
pub struct InboundHook {
    tenant: TenantId,
    outbox: Outbox,
}

impl InboundHook {
    /// The hook of `tenant`, writing to `outbox`.
    pub fn new(tenant: TenantId, outbox: Outbox) -> Self {
        Self { tenant, outbox }
    }
}

#[async_trait::async_trait]
impl whatsapp_rust::InboundDurabilityHook for InboundHook {
    async fn on_messages(&self, _client: Arc<Client>, batch: &[InboundMessage]) -> whatsapp_rust::anyhow::Result<()> {
        let events: Vec<OutboxEvent> = batch
            .iter()
            .filter_map(|m| received_event(&self.tenant, m))
            .map(|e| OutboxEvent { id: e.id.clone(), body: serde_json::to_string(&e).expect("event serializes") })
            .collect();
        let n = events.len() as u64;
        match self.outbox.enqueue(events).await {
            Ok(()) => {
                metrics::counter!("wakeeper_messages_received_total").increment(n);
                Ok(())
            }
            Err(e) => {
                // Not acknowledged: WhatsApp delivers the batch again on the next connect (which the disk
                // health task asks for once the outbox takes writes again).
                self.outbox.note_refused(self.tenant.as_str());
                tracing::error!(tenant = %self.tenant, error = %e, "could not store received messages; not acknowledging them");
                Err(whatsapp_rust::anyhow::anyhow!("outbox write failed"))
            }
        }
    }
}

/// Why a recipient or text was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// Not a phone number or a user, LID or group jid.
    Recipient,
    /// Empty or only whitespace.
    EmptyText,
    /// Over [`MAX_TEXT_CHARS`].
    TextTooLong,
    /// `typing_ms` over [`MAX_TYPING_MS`].
    Typing,
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// A send's recipient: a phone number (digits, optionally a leading `+`, spaces and dashes, 6 to 15 digits as
/// E.164 allows) becomes `<digits>@s.whatsapp.net`; a jid is accepted as `<digits>@s.whatsapp.net`,
/// `<digits>@lid` or `<digits>[-<digits>]@g.us`. Nothing else (no device part, no other server).
pub fn parse_recipient(raw: &str) -> Result<Jid, Invalid> {
    let raw = raw.trim();
    if raw.len() > 64 {
        return Err(Invalid::Recipient);
    }
    if let Some((user, server)) = raw.split_once('@') {
        return match server {
            "s.whatsapp.net" if all_digits(user) && (6..=15).contains(&user.len()) => Ok(Jid::pn(user)),
            "lid" if all_digits(user) && user.len() <= 20 => Ok(Jid::lid(user)),
            "g.us" => {
                let ok = match user.split_once('-') {
                    Some((a, b)) => all_digits(a) && all_digits(b),
                    None => all_digits(user),
                };
                if ok && user.len() <= 40 { Ok(Jid::group(user)) } else { Err(Invalid::Recipient) }
            }
            _ => Err(Invalid::Recipient),
        };
    }
    let rest = raw.strip_prefix('+').unwrap_or(raw);
    let digits: String = rest.chars().filter(|c| *c != ' ' && *c != '-').collect();
    if all_digits(&digits) && (6..=15).contains(&digits.len()) && !digits.starts_with('0') {
        Ok(Jid::pn(digits))
    } else {
        Err(Invalid::Recipient)
    }
}

/// Checks a text: not empty or only whitespace, at most [`MAX_TEXT_CHARS`] characters.
pub fn check_text(text: &str) -> Result<(), Invalid> {
    if text.trim().is_empty() {
        return Err(Invalid::EmptyText);
    }
    if text.chars().count() > MAX_TEXT_CHARS {
        return Err(Invalid::TextTooLong);
    }
    Ok(())
}

/// Checks a "typing..." duration.
pub fn check_typing(ms: Option<u64>) -> Result<Duration, Invalid> {
    match ms {
        Some(ms) if ms > MAX_TYPING_MS => Err(Invalid::Typing),
        Some(ms) => Ok(Duration::from_millis(ms)),
        None => Ok(Duration::ZERO),
    }
}

/// One accepted send, waiting for the session's sender task.
#[derive(Debug)]
pub struct Outgoing {
    /// The recipient.
    pub to: Jid,
    /// The text.
    pub text: String,
    /// The message id chosen when the send was accepted.
    pub message_id: String,
    /// How long to show "typing..." first.
    pub typing: Duration,
    /// When the send was accepted.
    pub accepted: tokio::time::Instant,
}

/// The live client of a session while a connect attempt runs (`None` between attempts).
pub type ClientSlot = Arc<Mutex<Option<Arc<Client>>>>;

/// The open session's client, if the session is open.
pub fn open_client(slot: &ClientSlot, view: &Mutex<SessionView>) -> Option<Arc<Client>> {
    if view.lock().expect("session view lock").state != SessionState::Open {
        return None;
    }
    slot.lock().expect("client slot lock").clone().filter(|c| c.is_connected())
}

/// A session's sender task: sends accepted texts one after another. A send that fails (the link dropped) is
/// tried again on the session's next client, with the same message id, until [`SEND_DEADLINE`] after it was
/// accepted; then it is logged and counted as failed.
pub async fn run_sender(
    tenant: TenantId,
    slot: ClientSlot,
    view: Arc<Mutex<SessionView>>,
    mut queue: mpsc::Receiver<Outgoing>,
) {
    while let Some(out) = queue.recv().await {
        let deadline = out.accepted + SEND_DEADLINE;
        let mut typed = out.typing.is_zero();
        let mut delay = Duration::from_millis(100);
        let mut last_error = String::from("session not open");
        let sent = loop {
            if tokio::time::Instant::now() >= deadline {
                break false;
            }
            let Some(client) = open_client(&slot, &view) else {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            };
            if !typed {
                if let Err(e) = client.chatstate().send_composing(&out.to).await {
                    tracing::debug!(tenant = %tenant, error = %e, "typing indicator not sent");
                }
                tokio::time::sleep(out.typing).await;
                typed = true;
                continue;
            }
            let options = SendOptions::default().with_message_id(out.message_id.clone());
            match client.send_message_with_options(out.to.clone(), wa::Message::text(out.text.clone()), options).await {
                Ok(_) => break true,
                Err(e) => {
                    last_error = e.to_string();
                    tracing::warn!(tenant = %tenant, message_id = %out.message_id, error = %e, "send failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        };
        if sent {
            metrics::counter!("wakeeper_messages_sent_total").increment(1);
            tracing::debug!(tenant = %tenant, message_id = %out.message_id, "message sent");
        } else {
            metrics::counter!("wakeeper_messages_send_failed_total").increment(1);
            tracing::error!(tenant = %tenant, message_id = %out.message_id, error = %last_error, "message not sent before its deadline");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients() {
        let ok = |raw: &str, want: &str| assert_eq!(parse_recipient(raw).unwrap().to_string(), want, "{raw}");
        ok("+49 151 2345-6789", "4915123456789@s.whatsapp.net");
        ok("4915123456789", "4915123456789@s.whatsapp.net");
        ok("4915123456789@s.whatsapp.net", "4915123456789@s.whatsapp.net");
        ok("123456789012345@lid", "123456789012345@lid");
        ok("120363025246125486@g.us", "120363025246125486@g.us");
        ok("4915123456789-1600000000@g.us", "4915123456789-1600000000@g.us");
        for bad in [
            "",
            " ",
            "+",
            "12345",
            "1234567890123456",
            "0151 234567",
            "++4915123456789",
            "49151a23456789",
            "4915123456789@",
            "@s.whatsapp.net",
            "4915123456789:3@s.whatsapp.net",
            "4915123456789@c.us",
            "4915123456789@newsletter",
            "status@broadcast",
            "abc@g.us",
            "1-2-3@g.us",
            "4915123456789@s.whatsapp.net@g.us",
            "(49) 151 23456789",
        ] {
            assert_eq!(parse_recipient(bad), Err(Invalid::Recipient), "{bad:?}");
        }
    }

    #[test]
    fn texts_and_typing() {
        assert_eq!(check_text(""), Err(Invalid::EmptyText));
        assert_eq!(check_text(" \n\t"), Err(Invalid::EmptyText));
        assert_eq!(check_text("hi"), Ok(()));
        assert_eq!(check_text(&"é".repeat(MAX_TEXT_CHARS)), Ok(()), "characters, not bytes");
        assert_eq!(check_text(&"a".repeat(MAX_TEXT_CHARS + 1)), Err(Invalid::TextTooLong));
        assert_eq!(check_typing(None), Ok(Duration::ZERO));
        assert_eq!(check_typing(Some(MAX_TYPING_MS)), Ok(Duration::from_millis(MAX_TYPING_MS)));
        assert_eq!(check_typing(Some(MAX_TYPING_MS + 1)), Err(Invalid::Typing));
    }

    #[test]
    fn content_is_classified_and_plumbing_skipped() {
        let text = wa::Message::text("hello");
        assert_eq!(classify(&text).unwrap().1.as_deref(), Some("hello"));
        let image = wa::Message {
            image_message: whatsapp_rust::waproto::buffa::MessageField::some(wa::message::ImageMessage {
                caption: Some("menu".into()),
                mimetype: Some("image/jpeg".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (kind, caption, summary) = classify(&image).unwrap();
        assert_eq!((kind, caption.as_deref()), ("image", Some("menu")));
        assert_eq!(summary.unwrap()["mimetype"], "image/jpeg");
        let skdm = wa::Message {
            sender_key_distribution_message: whatsapp_rust::waproto::buffa::MessageField::some(Default::default()),
            ..Default::default()
        };
        assert!(classify(&skdm).is_none());
        let key_share = wa::Message {
            protocol_message: whatsapp_rust::waproto::buffa::MessageField::some(wa::message::ProtocolMessage {
                r#type: Some(wa::message::protocol_message::Type::AppStateSyncKeyShare),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(classify(&key_share).is_none());
    }
}
