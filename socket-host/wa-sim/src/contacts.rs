//! Contacts: WhatsApp users the simulator plays, each a phone (device 0) with real Signal keys.
//!
//! A contact holds what a phone holds: an identity key pair, a registration id, a signed pre-key and a
//! batch of one-time pre-keys (their public halves are published on the server, exactly like an uploaded
//! device bundle), plus one Signal session per device it talks to. It encrypts `waproto` messages to
//! devices (a `pkmsg` built from the device's published bundle first, a `msg` on the session afterwards)
//! and decrypts what devices send it; [`crate::relay`] moves the stanzas.
//!
//! The phone of every registered account is a contact too, made on first use: a device's send fans out
//! to its own phone (a `DeviceSentMessage`), and the engine wants that phone's pre-key bundle.
//!
//! The Signal stores are plain maps behind one async mutex per contact; nothing here is persisted.

use std::collections::HashMap;
use std::sync::Arc;

use rand::RngExt;
use serde::Serialize;
use whatsapp_rust::async_trait;
use whatsapp_rust::wacore::libsignal::protocol::{
    CiphertextMessage, Direction, GenericSignedPreKey, IdentityChange, IdentityKey, IdentityKeyPair, IdentityKeyStore,
    KeyPair, PreKeyBundle, PreKeyId, PreKeyRecord, PreKeySignalMessage, PreKeyStore, ProtocolAddress, PublicKey,
    SessionRecord, SessionStore, SignalMessage, SignalProtocolError, SignedPreKeyId, SignedPreKeyRecord,
    SignedPreKeyStore, Timestamp, UsePQRatchet, message_decrypt, message_encrypt, process_prekey_bundle,
};
use whatsapp_rust::wacore::types::jid::JidExt as _;
use whatsapp_rust::wacore_binary::{Jid, Server};
use whatsapp_rust::waproto::whatsapp as wa;

use crate::keys::{now_secs, public_bytes};
use crate::observe::hex;
use crate::state::{KeyBundle, SignedPreKey, State};

/// One-time pre-keys a contact publishes (each is handed out once).
const ONE_TIME_PREKEYS: u32 = 32;
const SIGNED_PRE_KEY_ID: u32 = 1;

type SignalResult<T> = Result<T, SignalProtocolError>;

/// A contact as the outside sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContactInfo {
    /// The phone number (digits), the contact's name in every API.
    pub phone: String,
    /// `<phone>@s.whatsapp.net`.
    pub jid: String,
    /// The Signal registration id its pre-key bundle carries.
    pub registration_id: u32,
    /// The public identity key (hex, 32 bytes), as devices see it.
    pub identity_key: String,
    /// One-time pre-keys still published (not yet handed out).
    pub prekeys_left: usize,
    /// Whether this is the phone of a registered account (made by the simulator on first use) rather
    /// than a contact added by [`crate::SimHandle::add_contact`].
    pub account_phone: bool,
}

/// What a device sent a contact, as the contact decrypted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContactMessage {
    /// The message id the device gave the stanza.
    pub id: String,
    /// The sending device (phone-number device JID).
    pub from: String,
    /// The `<enc type>` the contact's part carried: `pkmsg`, `msg` (or whatever the device sent).
    pub enc_type: String,
    /// The text, for text messages (`conversation` or `extendedTextMessage`).
    pub text: Option<String>,
    /// What the message is: `conversation`, `extended_text`, `reaction`, `protocol`, `other`, or
    /// `undecryptable` when the contact could not decrypt it (see `error`).
    pub kind: String,
    /// For a copy a device sent its own phone: the chat the original went to (`DeviceSentMessage`).
    pub device_sent_to: Option<String>,
    /// Why decryption or decoding failed (names no key material).
    pub error: Option<String>,
    /// Server time it arrived (unix seconds).
    pub t: u64,
}

/// A message a contact sent a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContactSent {
    /// The message id.
    pub id: String,
    /// The device it went to.
    pub to: String,
    /// `pkmsg` (no session yet, or the device has not answered on it) or `msg`.
    pub enc_type: String,
    /// Whether it went out at once on a live connection (`false`: queued until the device logs in).
    pub delivered_live: bool,
    /// Server time it was sent (unix seconds).
    pub t: u64,
}

/// The kind of a receipt (or ack) a device sent about a contact's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    /// No `type`: delivered to the device.
    Delivery,
    /// `inactive`: delivered to a device in passive mode.
    Inactive,
    /// `read`.
    Read,
    /// `read-self`.
    ReadSelf,
    /// `played`.
    Played,
    /// `retry`: the device could not decrypt the message and asks for it again.
    Retry,
    /// `sender`: the delivery receipt for a copy of one's own message.
    Sender,
    /// `peer_msg`.
    PeerMsg,
    /// A bare `<ack class="message">` (a device acks an undecryptable message after its retry receipt).
    Ack,
    /// Any other `type`; see `raw_type`.
    Other,
}

impl ReceiptKind {
    pub(crate) fn from_wire(kind: Option<&str>) -> Self {
        match kind {
            None | Some("") | Some("delivery") => Self::Delivery,
            Some("inactive") => Self::Inactive,
            Some("read") => Self::Read,
            Some("read-self") => Self::ReadSelf,
            Some("played") => Self::Played,
            Some("retry") => Self::Retry,
            Some("sender") => Self::Sender,
            Some("peer_msg") => Self::PeerMsg,
            Some(_) => Self::Other,
        }
    }
}

/// A receipt or ack a contact got from a device, recorded as it came (retry receipts are not answered).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReceiptSeen {
    /// The message it is about.
    pub message_id: String,
    /// The device that sent it.
    pub from: String,
    /// What it says.
    pub kind: ReceiptKind,
    /// The `type` attribute as sent, if any.
    pub raw_type: Option<String>,
    /// For retry receipts: the `<retry count>`.
    pub retry_count: Option<u32>,
    /// Server time it arrived (unix seconds).
    pub t: u64,
}

/// A contact in the registry.
pub(crate) struct Contact {
    /// `<phone>@s.whatsapp.net`.
    pub(crate) jid: Jid,
    /// For an account's phone: the account's LID (device 0), under which the engine may address it.
    pub(crate) lid: Option<Jid>,
    /// What the server publishes (the same shape devices upload).
    pub(crate) public: KeyBundle,
    /// The private half: keys and sessions.
    pub(crate) signal: Arc<tokio::sync::Mutex<SignalState>>,
    pub(crate) inbox: Vec<ContactMessage>,
    pub(crate) receipts: Vec<ReceiptSeen>,
    pub(crate) sent: Vec<ContactSent>,
}

impl Contact {
    /// A new phone with fresh keys.
    pub(crate) fn generate(jid: Jid, lid: Option<Jid>) -> Self {
        let mut rng = rand::rng();
        let identity = IdentityKeyPair::generate(&mut rng);
        let registration_id = rng.random_range(1..=16380u32);
        let signed = KeyPair::generate(&mut rng);
        let signature = identity
            .private_key()
            .calculate_signature(&signed.public_key.serialize(), &mut rng)
            .expect("signing with a curve25519 key")
            .to_vec();
        let signed_record = SignedPreKeyRecord::new(
            SIGNED_PRE_KEY_ID.into(),
            Timestamp::from_epoch_millis(now_secs() * 1000),
            &signed,
            &signature,
        );
        let mut prekeys = HashMap::new();
        let mut published = std::collections::BTreeMap::new();
        // Ids start at a random offset, as a real phone's do after some use.
        let first = rng.random_range(1..=100_000u32);
        for id in first..first + ONE_TIME_PREKEYS {
            let pair = KeyPair::generate(&mut rng);
            published.insert(id, public_bytes(&pair));
            prekeys.insert(id, PreKeyRecord::new(PreKeyId::from(id), &pair));
        }
        let identity_public: [u8; 32] =
            identity.public_key().public_key_bytes().try_into().expect("curve25519 public keys are 32 bytes");
        let public = KeyBundle {
            registration_id: Some(registration_id),
            identity: Some(identity_public),
            signed_pre_key: Some(SignedPreKey {
                id: SIGNED_PRE_KEY_ID,
                public: public_bytes(&signed),
                signature: signature.clone(),
            }),
            prekeys: published,
            server_has_prekeys: true,
        };
        let signal = SignalState {
            identity: Identity { pair: identity, registration_id, known: HashMap::new() },
            sessions: Sessions(HashMap::new()),
            prekeys: PreKeys(prekeys),
            signed: SignedPreKeys(HashMap::from([(SIGNED_PRE_KEY_ID, signed_record)])),
        };
        Self {
            jid,
            lid,
            public,
            signal: Arc::new(tokio::sync::Mutex::new(signal)),
            inbox: Vec::new(),
            receipts: Vec::new(),
            sent: Vec::new(),
        }
    }

    pub(crate) fn info(&self) -> ContactInfo {
        ContactInfo {
            phone: self.jid.user.to_string(),
            jid: self.jid.to_string(),
            registration_id: self.public.registration_id.unwrap_or_default(),
            identity_key: self.public.identity.as_ref().map(hex).unwrap_or_default(),
            prekeys_left: self.public.prekeys.len(),
            account_phone: self.lid.is_some(),
        }
    }
}

/// Whether `phone` is a phone number as WhatsApp JIDs carry it: 5 to 20 digits.
pub(crate) fn valid_phone(phone: &str) -> bool {
    (5..=20).contains(&phone.len()) && phone.bytes().all(|b| b.is_ascii_digit())
}

impl State {
    /// Adds a contact (or returns the existing one). The phone of a registered account becomes that
    /// account's phone.
    pub(crate) fn add_contact(&mut self, phone: &str) -> &Contact {
        if !self.contacts.contains_key(phone) {
            let lid = self.account_lid(phone);
            self.insert_contact(Contact::generate(Jid::pn(phone), lid));
        }
        &self.contacts[phone]
    }

    fn insert_contact(&mut self, contact: Contact) {
        if let Some(lid) = &contact.lid {
            self.contact_by_lid.insert(lid.user.to_string(), contact.jid.user.to_string());
        }
        self.contacts.insert(contact.jid.user.to_string(), contact);
    }

    /// The LID (device 0) of the registered account with this phone number, if it is one.
    fn account_lid(&self, phone: &str) -> Option<Jid> {
        self.devices_of(phone, false).find_map(|d| d.lid.as_ref()).map(|l| Jid::lid(l.user.as_str()))
    }

    /// The contact a JID names: a contact's phone number (device 0), or the phone of a registered
    /// account by phone number or LID, which is made on first use. `None` for devices and strangers.
    pub(crate) fn contact_for(&mut self, jid: &Jid) -> Option<String> {
        if jid.device != 0 {
            return None;
        }
        match jid.server {
            Server::Pn => {
                let phone = jid.user.as_str();
                if self.contacts.contains_key(phone) {
                    return Some(phone.to_owned());
                }
                let lid = self.account_lid(phone)?;
                self.insert_contact(Contact::generate(Jid::pn(phone), Some(lid)));
                Some(phone.to_owned())
            }
            Server::Lid => {
                if let Some(phone) = self.contact_by_lid.get(jid.user.as_str()) {
                    return Some(phone.clone());
                }
                let phone = self.devices_of(jid.user.as_str(), true).next()?.jid.user.to_string();
                let lid = Jid::lid(jid.user.as_str());
                if let Some(existing) = self.contacts.get_mut(&phone) {
                    // Added by phone number before the account was known under its LID.
                    existing.lid = Some(lid.clone());
                    self.contact_by_lid.insert(jid.user.to_string(), phone.clone());
                } else {
                    self.insert_contact(Contact::generate(Jid::pn(phone.as_str()), Some(lid)));
                }
                Some(phone)
            }
            _ => None,
        }
    }
}

/// A device's published bundle, as a contact fetches it to start a session.
pub(crate) struct DeviceBundle {
    pub(crate) registration_id: u32,
    pub(crate) identity: [u8; 32],
    pub(crate) signed: SignedPreKey,
    pub(crate) one_time: Option<(u32, [u8; 32])>,
}

impl DeviceBundle {
    /// The bundle from what the server holds, handing out one one-time pre-key.
    pub(crate) fn take(keys: &mut KeyBundle) -> Option<Self> {
        Some(Self {
            registration_id: keys.registration_id?,
            identity: keys.identity?,
            signed: keys.signed_pre_key.clone()?,
            one_time: keys.prekeys.pop_first(),
        })
    }
}

/// The two kinds of pairwise Signal envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EncKind {
    PreKey,
    Whisper,
}

impl EncKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::PreKey => "pkmsg",
            Self::Whisper => "msg",
        }
    }

    pub(crate) fn from_wire(kind: &str) -> Option<Self> {
        match kind {
            "pkmsg" => Some(Self::PreKey),
            "msg" => Some(Self::Whisper),
            _ => None,
        }
    }
}

/// A contact's private Signal state.
pub(crate) struct SignalState {
    identity: Identity,
    sessions: Sessions,
    prekeys: PreKeys,
    signed: SignedPreKeys,
}

impl SignalState {
    pub(crate) fn has_session(&self, peer: &Jid) -> bool {
        self.sessions.0.contains_key(peer.to_protocol_address().as_str())
    }

    /// Starts a session with a device from its published bundle (X3DH as the initiator).
    pub(crate) async fn start_session(&mut self, peer: &Jid, bundle: &DeviceBundle) -> SignalResult<()> {
        let key = |b: &[u8; 32]| PublicKey::from_djb_public_key_bytes(b);
        let bundle = PreKeyBundle::new(
            bundle.registration_id,
            u32::from(peer.device).into(),
            bundle.one_time.map(|(id, k)| key(&k).map(|k| (PreKeyId::from(id), k))).transpose()?,
            SignedPreKeyId::from(bundle.signed.id),
            key(&bundle.signed.public)?,
            bundle.signed.signature.clone(),
            IdentityKey::new(key(&bundle.identity)?),
        )?;
        let address = peer.to_protocol_address();
        process_prekey_bundle(
            &address,
            &mut self.sessions,
            &mut self.identity,
            &bundle,
            &mut send_rng(),
            UsePQRatchet::No,
        )
        .await?;
        Ok(())
    }

    /// Encrypts a padded plaintext for a device on the existing session.
    pub(crate) async fn encrypt(&mut self, peer: &Jid, plaintext: &[u8]) -> SignalResult<(EncKind, Vec<u8>)> {
        let address = peer.to_protocol_address();
        let message = message_encrypt(plaintext, &address, &mut self.sessions, &mut self.identity).await?;
        let kind = match &message {
            CiphertextMessage::PreKeySignalMessage(_) => EncKind::PreKey,
            _ => EncKind::Whisper,
        };
        Ok((kind, message.serialize().to_vec()))
    }

    /// Decrypts what a device sent; returns the padded plaintext.
    pub(crate) async fn decrypt(&mut self, peer: &Jid, kind: EncKind, ciphertext: &[u8]) -> SignalResult<Vec<u8>> {
        let address = peer.to_protocol_address();
        let message = match kind {
            EncKind::PreKey => CiphertextMessage::PreKeySignalMessage(PreKeySignalMessage::try_from(ciphertext)?),
            EncKind::Whisper => CiphertextMessage::SignalMessage(SignalMessage::try_from(ciphertext)?),
        };
        let result = message_decrypt(
            &message,
            &address,
            &mut self.sessions,
            &mut self.identity,
            &mut self.prekeys,
            &self.signed,
            &mut send_rng(),
            UsePQRatchet::No,
        )
        .await?;
        if let Some(id) = result.consumed_prekey_id {
            self.prekeys.0.remove(&u32::from(id));
        }
        Ok(result.plaintext)
    }
}

/// A generator that may be held across an await on a multi-threaded runtime (the thread-local one may not).
fn send_rng() -> rand::rngs::StdRng {
    rand::make_rng()
}

/// What a decrypted message is, for the inbox: (text, kind, device-sent destination).
pub(crate) fn summarize(message: wa::Message) -> (Option<String>, &'static str, Option<String>) {
    let device_sent_to = message.device_sent_message.as_option().and_then(|d| d.destination_jid.clone());
    let message = whatsapp_rust::wacore::messages::unwrap_device_sent(message);
    if let Some(text) = message.conversation.clone().filter(|t| !t.is_empty()) {
        return (Some(text), "conversation", device_sent_to);
    }
    if let Some(ext) = message.extended_text_message.as_option() {
        return (ext.text.clone(), "extended_text", device_sent_to);
    }
    let kind = if message.reaction_message.is_set() {
        "reaction"
    } else if message.protocol_message.is_set() {
        "protocol"
    } else {
        "other"
    };
    (None, kind, device_sent_to)
}

struct Identity {
    pair: IdentityKeyPair,
    registration_id: u32,
    known: HashMap<String, IdentityKey>,
}

#[async_trait]
impl IdentityKeyStore for Identity {
    async fn get_identity_key_pair(&self) -> SignalResult<IdentityKeyPair> {
        Ok(self.pair.clone())
    }

    async fn get_local_registration_id(&self) -> SignalResult<u32> {
        Ok(self.registration_id)
    }

    async fn save_identity(
        &mut self,
        address: &ProtocolAddress,
        identity: &IdentityKey,
    ) -> SignalResult<IdentityChange> {
        let old = self.known.insert(address.as_str().to_owned(), *identity);
        Ok(IdentityChange::from_changed(old.is_some_and(|o| o != *identity)))
    }

    /// A phone trusts whatever identity a device presents: WhatsApp shows "security code changed" and
    /// carries on, it never refuses a message for it.
    async fn is_trusted_identity(&self, _: &ProtocolAddress, _: &IdentityKey, _: Direction) -> SignalResult<bool> {
        Ok(true)
    }

    async fn get_identity(&self, address: &ProtocolAddress) -> SignalResult<Option<IdentityKey>> {
        Ok(self.known.get(address.as_str()).copied())
    }
}

struct Sessions(HashMap<String, SessionRecord>);

#[async_trait]
impl SessionStore for Sessions {
    async fn load_session(&self, address: &ProtocolAddress) -> SignalResult<Option<SessionRecord>> {
        Ok(self.0.get(address.as_str()).cloned())
    }

    async fn has_session(&self, address: &ProtocolAddress) -> SignalResult<bool> {
        Ok(self.0.contains_key(address.as_str()))
    }

    async fn store_session(&mut self, address: &ProtocolAddress, record: SessionRecord) -> SignalResult<()> {
        self.0.insert(address.as_str().to_owned(), record);
        Ok(())
    }
}

struct PreKeys(HashMap<u32, PreKeyRecord>);

#[async_trait]
impl PreKeyStore for PreKeys {
    async fn get_pre_key(&self, id: PreKeyId) -> SignalResult<PreKeyRecord> {
        self.0.get(&u32::from(id)).cloned().ok_or(SignalProtocolError::InvalidPreKeyId)
    }

    async fn save_pre_key(&mut self, id: PreKeyId, record: &PreKeyRecord) -> SignalResult<()> {
        self.0.insert(u32::from(id), record.clone());
        Ok(())
    }

    async fn remove_pre_key(&mut self, id: PreKeyId) -> SignalResult<()> {
        self.0.remove(&u32::from(id));
        Ok(())
    }
}

struct SignedPreKeys(HashMap<u32, SignedPreKeyRecord>);

#[async_trait]
impl SignedPreKeyStore for SignedPreKeys {
    async fn get_signed_pre_key(&self, id: SignedPreKeyId) -> SignalResult<SignedPreKeyRecord> {
        self.0.get(&u32::from(id)).cloned().ok_or(SignalProtocolError::InvalidSignedPreKeyId)
    }

    async fn save_signed_pre_key(&mut self, id: SignedPreKeyId, record: &SignedPreKeyRecord) -> SignalResult<()> {
        self.0.insert(u32::from(id), record.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use whatsapp_rust::wacore::messages::{MessageUtils, decode_plaintext};
    use whatsapp_rust::wacore::proto_helpers::MessageBuilderExt;

    fn device_bundle(c: &mut Contact) -> DeviceBundle {
        DeviceBundle::take(&mut c.public).unwrap()
    }

    /// Two contacts talk to each other through the same code paths the relay uses: the first message
    /// is a pkmsg, the answer a msg, and once answered the initiator switches to msg too.
    #[tokio::test]
    async fn two_phones_establish_a_session_and_ratchet() {
        let alice = Contact::generate(Jid::pn("5511000000001"), None);
        let mut bob = Contact::generate(Jid::pn("5511000000002"), None);
        let bob_bundle = device_bundle(&mut bob);
        assert_eq!(bob.public.prekeys.len() as u32, ONE_TIME_PREKEYS - 1, "one one-time pre-key handed out");
        let (a_jid, b_jid) = (alice.jid.clone(), bob.jid.clone());
        let mut a = alice.signal.lock().await;
        let mut b = bob.signal.lock().await;

        a.start_session(&b_jid, &bob_bundle).await.unwrap();
        let hello = MessageUtils::encode_and_pad(&wa::Message::text("hello"));
        let (kind, ct) = a.encrypt(&b_jid, &hello).await.unwrap();
        assert_eq!(kind, EncKind::PreKey);
        let plain = b.decrypt(&a_jid, kind, &ct).await.unwrap();
        let (text, k, _) = summarize(decode_plaintext(&plain, 2).unwrap());
        assert_eq!((text.as_deref(), k), (Some("hello"), "conversation"));
        assert_eq!(b.prekeys.0.len() as u32, ONE_TIME_PREKEYS - 1, "the consumed one-time pre-key is gone");

        let (kind, ct) = a.encrypt(&b_jid, &hello).await.unwrap();
        assert_eq!(kind, EncKind::PreKey, "unanswered sessions keep sending pkmsg");
        b.decrypt(&a_jid, kind, &ct).await.unwrap();

        let (kind, ct) = b.encrypt(&a_jid, &MessageUtils::encode_and_pad(&wa::Message::text("hi"))).await.unwrap();
        assert_eq!(kind, EncKind::Whisper);
        a.decrypt(&b_jid, kind, &ct).await.unwrap();
        let (kind, ct) = a.encrypt(&b_jid, &hello).await.unwrap();
        assert_eq!(kind, EncKind::Whisper, "an answered session sends msg");
        b.decrypt(&a_jid, kind, &ct).await.unwrap();

        // A receiver that lost its session cannot read a msg: the negative control the relay relies on.
        b.sessions.0.clear();
        let (kind, ct) = a.encrypt(&b_jid, &hello).await.unwrap();
        assert!(matches!(b.decrypt(&a_jid, kind, &ct).await, Err(SignalProtocolError::SessionNotFound(_))));
    }

    #[test]
    fn phone_numbers_are_digits() {
        assert!(valid_phone("5511987654321"));
        assert!(!valid_phone("5511-98765"));
        assert!(!valid_phone("123"));
        assert!(!valid_phone("+5511987654321"));
    }
}
