//! The contacts the simulator plays, on [`SimHandle`]: adding them, what they send to devices, and what they
//! received (inbox, receipts), with waits for both.

use std::time::Duration;

use whatsapp_rust::waproto::whatsapp as wa;

use super::{SimError, SimHandle};
use crate::contacts::{ContactInfo, ContactMessage, ContactSent, ReceiptSeen};

impl SimHandle {
    /// Adds a contact: a WhatsApp user `<phone>@s.whatsapp.net` (its phone, device 0) with its own
    /// identity key, signed pre-key and one-time pre-keys, published so devices can start sessions with
    /// it. Idempotent per phone number. The phone of a registered account can be added too (it is made
    /// on first use anyway, when a device's send fans out to it).
    pub fn add_contact(&self, phone: &str) -> Result<ContactInfo, SimError> {
        if !crate::contacts::valid_phone(phone) {
            return Err(SimError::InvalidPhone(phone.to_owned()));
        }
        Ok(self.shared.update(|s| s.add_contact(phone).info()))
    }

    /// Turns redelivery on or off: with it on, a contact's message the device has not acknowledged (with a
    /// receipt or an ack) is delivered again when the device next connects, as WhatsApp keeps a message
    /// until it is acknowledged. Off by default, so tests that count deliveries see each message once.
    pub fn redeliver_unacked(&self, on: bool) {
        self.shared.update(|s| {
            s.redeliver_unacked = on;
            if !on {
                s.unacked.clear();
            }
        });
    }

    /// How many of the contacts' messages `device_jid` has not acknowledged (tracked only with
    /// [`SimHandle::redeliver_unacked`] on).
    pub fn unacked_len(&self, device_jid: &str) -> usize {
        self.shared.lock().unacked.get(device_jid).map_or(0, Vec::len)
    }

    /// A contact's public facts.
    pub fn contact(&self, phone: &str) -> Option<ContactInfo> {
        self.shared.lock().contacts.get(phone).map(|c| c.info())
    }

    /// The contact sends a text message (`conversation`) to a device. See [`SimHandle::contact_send`].
    pub async fn contact_send_text(&self, phone: &str, device_jid: &str, text: &str) -> Result<String, SimError> {
        use whatsapp_rust::wacore::proto_helpers::MessageBuilderExt as _;
        self.contact_send(phone, device_jid, &wa::Message::text(text)).await
    }

    /// The contact sends `message` to a device: a `pkmsg` built from the pre-key bundle the device
    /// published when the contact has no session with it yet (and for as long as the device has not
    /// answered on that session, as Signal does), a `msg` on the session afterwards. The stanza goes out
    /// on the device's live connection, or waits in its offline queue until it next logs in. Returns
    /// the message id.
    pub async fn contact_send(&self, phone: &str, device_jid: &str, message: &wa::Message) -> Result<String, SimError> {
        crate::relay::contact_send(&self.shared, phone, device_jid, message).await
    }

    /// What devices sent the contact, as it decrypted it, oldest first (empty for an unknown contact).
    pub fn contact_inbox(&self, phone: &str) -> Vec<ContactMessage> {
        self.shared.lock().contacts.get(phone).map(|c| c.inbox.clone()).unwrap_or_default()
    }

    /// Receipts and message acks the contact got from devices, oldest first. Retry receipts are recorded
    /// and never answered: the contact does not resend.
    pub fn contact_receipts(&self, phone: &str) -> Vec<ReceiptSeen> {
        self.shared.lock().contacts.get(phone).map(|c| c.receipts.clone()).unwrap_or_default()
    }

    /// What the contact sent to devices, oldest first (with the envelope type each one used).
    pub fn contact_sent(&self, phone: &str) -> Vec<ContactSent> {
        self.shared.lock().contacts.get(phone).map(|c| c.sent.clone()).unwrap_or_default()
    }

    /// Stanzas waiting in a device's offline queue (delivered when it next leaves passive mode).
    pub fn offline_queue_len(&self, device_jid: &str) -> usize {
        self.shared.lock().offline.get(device_jid).map_or(0, Vec::len)
    }

    /// Waits for a message in the contact's inbox that satisfies `pred`; returns it.
    pub async fn wait_for_contact_message(
        &self,
        phone: &str,
        limit: Duration,
        pred: impl Fn(&ContactMessage) -> bool,
    ) -> Result<ContactMessage, SimError> {
        self.wait_for(limit, |h| h.contact_inbox(phone).into_iter().find(|m| pred(m))).await
    }

    /// Waits for a receipt the contact got that satisfies `pred`; returns it.
    pub async fn wait_for_receipt(
        &self,
        phone: &str,
        limit: Duration,
        pred: impl Fn(&ReceiptSeen) -> bool,
    ) -> Result<ReceiptSeen, SimError> {
        self.wait_for(limit, |h| h.contact_receipts(phone).into_iter().find(|r| pred(r))).await
    }
}
