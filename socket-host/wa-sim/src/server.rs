//! [`Sim`]: the handle a test or the `wa-sim` binary holds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use wakeeper_shared::domain::{CredentialSnapshot, DeviceRecord, TenantId};
use whatsapp_rust::wacore_binary::Jid;
use whatsapp_rust::wacore_binary::builder::NodeBuilder;
use whatsapp_rust::waproto::whatsapp as wa;

use crate::contacts::{ContactInfo, ContactMessage, ContactSent, ReceiptSeen};
use crate::faults::{Command, PongMode, Refusal, Settings, SettingsView, StreamErrorKind, Target};
use crate::keys::ServerIdentity;
use crate::mint::{MintError, MintOptions, MintedDevice, mint, snapshot_of};
use crate::observe::{DeviceObservation, Observations, Summary};
use crate::state::{DeviceEntry, KeyBundle, Shared, SignedPreKey};
use crate::{WS_PATH, conn, control};

/// What to do when a device logs in while it already has a logged-in connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConflictPolicy {
    /// End the older connection with `<conflict type="replaced"/>`, as WhatsApp does. The observation
    /// still records two concurrent connections.
    #[default]
    ReplaceOlder,
    /// Keep both (useful to measure how long a double connection would last).
    AllowConcurrent,
}

/// How to start a simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Where the WebSocket endpoint listens; port 0 picks a free one.
    pub bind: SocketAddr,
    /// Where the HTTP control surface listens, if anywhere.
    pub control_bind: Option<SocketAddr>,
    /// Derive the server keys from this seed, so a restarted simulator is the same server.
    pub key_seed: Option<[u8; 32]>,
    /// What a second concurrent login of one device does.
    pub conflict: ConflictPolicy,
    /// How long a client may take from TCP connect to the end of the Noise handshake.
    pub handshake_timeout: Duration,
    /// TCP listen backlog (a mass reconnect of 10,000 clients arrives at once).
    pub backlog: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            control_bind: None,
            key_seed: None,
            conflict: ConflictPolicy::default(),
            handshake_timeout: Duration::from_secs(20),
            backlog: 4096,
        }
    }
}

/// Why a simulator operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// No registered device has this JID.
    #[error("unknown device {0}")]
    UnknownDevice(String),
    /// The string is not a phone-number device JID.
    #[error("not a device jid: {0}")]
    InvalidJid(String),
    /// A fault parameter is out of range (e.g. a refusal code other than 429/503).
    #[error("invalid fault: {0}")]
    InvalidFault(String),
    /// A device record lacks what a login needs.
    #[error("device record is unusable: {0}")]
    InvalidRecord(&'static str),
    /// Minting failed.
    #[error(transparent)]
    Mint(#[from] MintError),
    /// A QR code is malformed or names no connection waiting to pair.
    #[error("pairing: {0}")]
    Pairing(&'static str),
    /// A wait ran out of time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// No contact has this phone number.
    #[error("unknown contact {0}")]
    UnknownContact(String),
    /// A phone number must be 5 to 20 digits.
    #[error("not a phone number (5 to 20 digits): {0}")]
    InvalidPhone(String),
    /// The device has published no pre-key bundle, so no session can be started with it.
    #[error("device {0} has no published keys")]
    NoKeys(String),
    /// Signal encryption failed (names no key material).
    #[error("signal: {0}")]
    Signal(String),
}

/// A running simulator. Dropping it stops accepting and ends every connection. Every operation lives on
/// [`SimHandle`], which `Sim` dereferences to.
pub struct Sim {
    handle: SimHandle,
    control_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Sim {
    /// Starts a simulator on 127.0.0.1 with a free port and no control surface (the usual test set-up).
    pub async fn start_local() -> Result<Self, SimError> {
        Self::start(SimConfig::default()).await
    }

    /// Starts a simulator.
    pub async fn start(config: SimConfig) -> Result<Self, SimError> {
        let identity = match config.key_seed {
            Some(seed) => ServerIdentity::from_seed(&seed),
            None => ServerIdentity::generate(),
        };
        let listener = listen(config.bind, config.backlog)?;
        let addr = listener.local_addr().map_err(|source| SimError::Bind { addr: config.bind, source })?;
        let control_bind = config.control_bind;
        let handle = SimHandle { shared: Arc::new(Shared::new(identity, config)), addr };
        let mut tasks = vec![tokio::spawn(accept_loop(handle.shared.clone(), listener))];
        let mut control_addr = None;
        if let Some(bind) = control_bind {
            let listener = TcpListener::bind(bind).await.map_err(|source| SimError::Bind { addr: bind, source })?;
            control_addr = Some(listener.local_addr().map_err(|source| SimError::Bind { addr: bind, source })?);
            let router = control::router(handle.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, router).await {
                    tracing::warn!(error = %e, "control surface stopped");
                }
            }));
        }
        tracing::info!(%addr, control = ?control_addr, "wa-sim listening");
        Ok(Self { handle, control_addr, tasks })
    }

    /// The control surface's address, when one was asked for.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }

    /// A clone-able handle with every operation, for other tasks.
    pub fn handle(&self) -> SimHandle {
        self.handle.clone()
    }

    /// Stops the simulator: no new connections, every connection ended.
    pub async fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.handle.shared.closing.send_replace(true);
        self.handle.shared.command_all(Command::Drop);
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::ops::Deref for Sim {
    type Target = SimHandle;

    fn deref(&self) -> &SimHandle {
        &self.handle
    }
}

fn listen(bind: SocketAddr, backlog: u32) -> Result<TcpListener, SimError> {
    let err = |source| SimError::Bind { addr: bind, source };
    let socket = if bind.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(bind).map_err(err)?;
    socket.listen(backlog).map_err(err)
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                tokio::spawn(conn::serve(shared.clone(), tcp));
            }
            Err(e) => {
                // Out of file descriptors, typically: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Every simulator operation: registry, faults, observations. Cheap to clone.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl SimHandle {
    /// The WebSocket endpoint's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL a client connects to: `ws://127.0.0.1:PORT/ws/chat`.
    pub fn url(&self) -> String {
        format!("ws://{}{}", self.addr, WS_PATH)
    }

    /// The public key of the root that signs the server's certificate chain (XEdDSA over curve25519),
    /// for clients that pin it in place of WhatsApp's.
    pub fn root_public_key(&self) -> [u8; 32] {
        self.shared.identity.root_public()
    }

    /// The server's Noise static public key (what a client caches for IK).
    pub fn server_static_key(&self) -> [u8; 32] {
        *self.shared.identity.static_public()
    }

    // ---- registry ----

    /// Mints a paired device for `tenant`, registers it, and returns the credential snapshot a real
    /// pairing would leave.
    ///
    /// # Panics
    /// If the engine rejects the identity the simulator signed (a bug, not an input error).
    pub fn mint_device(&self, tenant: &TenantId) -> CredentialSnapshot {
        self.mint_device_with(tenant, &MintOptions::default()).expect("minting a device").snapshot
    }

    /// Mints a paired device with options and returns it with its JIDs and key.
    pub fn mint_device_with(&self, tenant: &TenantId, opts: &MintOptions) -> Result<MintedDevice, SimError> {
        // Key generation and signing run outside the lock, so minting never stalls connections; a number
        // taken in between (one in 10^8) is caught at insert and minted again.
        let minted = loop {
            let (device, entry) = mint(Some(tenant), opts, |phone| self.shared.lock().by_phone.contains_key(phone))?;
            let minted = MintedDevice {
                jid: entry.jid.to_string(),
                lid: entry.lid.as_ref().map(|l| l.to_string()).unwrap_or_default(),
                noise_public: entry.noise_public,
                snapshot: snapshot_of(&device)?,
            };
            let inserted = self.shared.update(|s| {
                if s.by_phone.contains_key(entry.jid.user.as_str()) {
                    return false;
                }
                s.insert_device(entry);
                true
            });
            if inserted {
                break minted;
            }
        };
        tracing::debug!(tenant = %tenant.as_str(), device = %minted.jid, "device minted");
        Ok(minted)
    }

    /// "Scans" a QR code shown by a fresh client, as the phone would: the client waiting with that ref
    /// and noise key receives `pair-success` for a new device (phone number and LID allocated here, key
    /// bundle from its registration payload), confirms, and is asked to restart (515); its next login
    /// succeeds. Returns the new device JID; the device is registered for `tenant` at once.
    pub fn pair(&self, qr_code: &str, tenant: &TenantId, opts: &MintOptions) -> Result<String, SimError> {
        let qr = parse_qr(qr_code).ok_or(SimError::Pairing("malformed qr code"))?;
        let mut s = self.shared.lock();
        let (keys, offer) = s
            .pairings
            .values()
            .find(|p| p.noise_public == qr.noise && p.refs.contains(&qr.reference))
            .map(|p| (p.keys.clone(), p.offer.clone()))
            .ok_or(SimError::Pairing("no client is waiting with that qr code"))?;
        if keys.identity != Some(qr.identity) {
            return Err(SimError::Pairing("qr identity differs from the registration payload"));
        }
        let (pn, lid) = crate::mint::allocate_jids(opts.device_id, |p| s.by_phone.contains_key(p));
        let phone = crate::mint::phone_half(&qr.identity, &qr.adv_secret);
        let push_name = opts.push_name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| tenant.as_str().to_owned());
        let success = NodeBuilder::new("iq")
            .attr("from", crate::iq::SERVER)
            .attr("id", format!("pair-success-{}", pn.user))
            .attr("type", "set")
            .attr("xmlns", "md")
            .children([NodeBuilder::new("pair-success")
                .children([
                    NodeBuilder::new("device-identity")
                        .attr("key-index", phone.key_index.to_string())
                        .bytes(phone.container.clone())
                        .build(),
                    NodeBuilder::new("platform").attr("name", "smba").build(),
                    NodeBuilder::new("device").attr("jid", pn.clone()).attr("lid", lid.clone()).build(),
                    NodeBuilder::new("biz").attr("name", push_name).build(),
                ])
                .build()])
            .build();
        let jid = pn.to_string();
        s.insert_device(DeviceEntry {
            jid: pn,
            lid: Some(lid),
            noise_public: qr.noise,
            tenant: Some(tenant.as_str().to_owned()),
            revoked: false,
            keys,
            account: Some(crate::state::Account {
                key_index: phone.key_index,
                key_index_list: phone.key_index_list,
                created_secs: phone.created,
                device_identity: phone.signed_identity,
            }),
            settings: Settings::default(),
        });
        drop(s);
        self.shared.update(|_| ());
        offer.send((jid.clone(), success)).map_err(|_| SimError::Pairing("the client went away"))?;
        tracing::debug!(tenant = %tenant.as_str(), device = %jid, "qr code scanned");
        Ok(jid)
    }

    /// Registers a device paired elsewhere (e.g. taken over from Baileys) by its noise key and JID. The
    /// server knows nothing else about it: its first connect's digest check answers 404, so the engine
    /// re-uploads its key bundle.
    pub fn register_existing(&self, noise_public: [u8; 32], jid: &str) -> Result<(), SimError> {
        let jid = parse_device_jid(jid)?;
        self.register(DeviceEntry {
            jid,
            lid: None,
            noise_public,
            tenant: None,
            revoked: false,
            keys: KeyBundle::default(),
            account: None,
            settings: Settings::default(),
        });
        Ok(())
    }

    /// Registers a device from a snapshot's device record: the noise key, JIDs and published keys.
    /// Returns the device JID.
    pub fn register_record(&self, record: &DeviceRecord, tenant: Option<&TenantId>) -> Result<String, SimError> {
        let device =
            crate::mint::device_from_record(record).map_err(|_| SimError::InvalidRecord("not an engine device"))?;
        let jid = device.pn.clone().ok_or(SimError::InvalidRecord("pn"))?;
        let public = |k: &whatsapp_rust::wacore::libsignal::protocol::KeyPair| crate::keys::public_bytes(k);
        self.register(DeviceEntry {
            jid: jid.clone(),
            lid: device.lid.clone(),
            noise_public: public(&device.noise_key),
            tenant: tenant.map(|t| t.as_str().to_owned()),
            revoked: false,
            keys: KeyBundle {
                registration_id: Some(device.registration_id),
                identity: Some(public(&device.identity_key)),
                signed_pre_key: Some(SignedPreKey {
                    id: device.signed_pre_key_id,
                    public: public(&device.signed_pre_key),
                    signature: device.signed_pre_key_signature.to_vec(),
                }),
                prekeys: Default::default(),
                server_has_prekeys: false,
            },
            account: None,
            settings: Settings::default(),
        });
        Ok(jid.to_string())
    }

    fn register(&self, entry: DeviceEntry) {
        self.shared.update(|s| s.insert_device(entry));
    }

    /// The device JID minted for a tenant.
    pub fn device_jid(&self, tenant: &TenantId) -> Option<String> {
        self.shared.lock().tenants.get(tenant.as_str()).cloned()
    }

    /// Revokes a device: its next login gets `<failure reason="401"/>`. Live connections stay up (combine
    /// with [`SimHandle::stream_error`] to log them out now).
    pub fn revoke(&self, jid: &str) -> Result<(), SimError> {
        self.with_device(jid, |d| d.revoked = true)
    }

    /// Undoes [`SimHandle::revoke`].
    pub fn reinstate(&self, jid: &str) -> Result<(), SimError> {
        self.with_device(jid, |d| d.revoked = false)
    }

    /// Makes the server forget the device's one-time pre-keys, so the engine's next digest check gets 404
    /// and it uploads a fresh batch.
    pub fn forget_prekeys(&self, jid: &str) -> Result<(), SimError> {
        self.with_device(jid, |d| {
            d.keys.prekeys.clear();
            d.keys.server_has_prekeys = false;
        })
    }

    /// One-time pre-key ids the server holds for a device (uploaded and not yet handed out).
    pub fn prekey_ids(&self, jid: &str) -> Result<Vec<u32>, SimError> {
        let s = self.shared.lock();
        let d = s.devices.get(jid).ok_or_else(|| SimError::UnknownDevice(jid.to_owned()))?;
        Ok(d.keys.prekeys.keys().copied().collect())
    }

    fn with_device(&self, jid: &str, f: impl FnOnce(&mut DeviceEntry)) -> Result<(), SimError> {
        self.shared.update(|s| match s.devices.get_mut(jid) {
            Some(d) => {
                f(d);
                Ok(())
            }
            None => Err(SimError::UnknownDevice(jid.to_owned())),
        })
    }

    // ---- fault actions (logged-in connections, now) ----

    /// Closes the TCP connections of the target without a close frame or stream error. Returns how many.
    pub fn drop_connections(&self, target: &Target) -> usize {
        self.act(target, Command::Drop)
    }

    /// Makes the target's connections half-open: the server stops answering (and stops reading, as far as
    /// the client can tell) but keeps the socket. Returns how many.
    pub fn half_open(&self, target: &Target) -> usize {
        self.act(target, Command::HalfOpen)
    }

    /// Ends the target's connections with a stream error. Returns how many.
    pub fn stream_error(&self, target: &Target, kind: StreamErrorKind) -> usize {
        self.act(target, Command::StreamError(kind))
    }

    fn act(&self, target: &Target, command: Command) -> usize {
        let n = match target {
            Target::All => self.shared.command_all(command),
            Target::Device(jid) => self.shared.command_device(jid, command),
        };
        tracing::debug!(?target, ?command, connections = n, "fault action");
        n
    }

    // ---- fault settings (from now on) ----

    /// How keepalive pings are answered for the target.
    pub fn set_pong(&self, target: &Target, mode: PongMode) -> Result<(), SimError> {
        self.settings_mut(target, |s| s.pong = Some(mode))
    }

    /// Refuses the target's connects with 429 or 503 for a while.
    pub fn refuse_connects(&self, target: &Target, refusal: Refusal) -> Result<(), SimError> {
        if refusal.code != 429 && refusal.code != 503 {
            return Err(SimError::InvalidFault(format!("refusal code {} (want 429 or 503)", refusal.code)));
        }
        let until = Instant::now() + refusal.duration;
        self.settings_mut(target, |s| s.refusal = Some((refusal, until)))
    }

    /// Adds latency to the target's handshakes (`None` removes it).
    pub fn set_handshake_delay(&self, target: &Target, delay: Option<Duration>) -> Result<(), SimError> {
        self.settings_mut(target, |s| s.handshake_delay = delay)
    }

    /// Clears every setting of the target (the global ones for [`Target::All`]).
    pub fn clear_faults(&self, target: &Target) -> Result<(), SimError> {
        self.settings_mut(target, |s| *s = Settings::default())
    }

    /// The settings of the target as set (not merged with the global ones).
    pub fn fault_settings(&self, target: &Target) -> Result<SettingsView, SimError> {
        let s = self.shared.lock();
        let now = Instant::now();
        match target {
            Target::All => Ok(s.global.view(now)),
            Target::Device(jid) => {
                s.devices.get(jid).map(|d| d.settings.view(now)).ok_or_else(|| SimError::UnknownDevice(jid.clone()))
            }
        }
    }

    fn settings_mut(&self, target: &Target, f: impl FnOnce(&mut Settings)) -> Result<(), SimError> {
        self.shared.update(|s| match target {
            Target::All => {
                f(&mut s.global);
                Ok(())
            }
            Target::Device(jid) => match s.devices.get_mut(jid) {
                Some(d) => {
                    f(&mut d.settings);
                    Ok(())
                }
                None => Err(SimError::UnknownDevice(jid.clone())),
            },
        })
    }

    // ---- observations ----

    /// Totals only (cheap at any scale).
    pub fn summary(&self) -> Summary {
        self.shared.lock().rec.summary(self.shared.uptime_ms())
    }

    /// Connect attempts in each second since start.
    pub fn attempts_per_second(&self) -> Vec<u32> {
        self.shared.lock().rec.series()
    }

    /// Everything, every device included.
    pub fn observations(&self) -> Observations {
        let s = self.shared.lock();
        let mut jids: Vec<&String> = s.devices.keys().chain(s.rec.observed_jids()).collect();
        jids.sort();
        jids.dedup();
        let devices = jids
            .into_iter()
            .filter_map(|j| s.rec.observation(j, s.facts(j).as_ref()).map(|o| (j.clone(), o)))
            .collect();
        Observations { summary: s.rec.summary(self.shared.uptime_ms()), attempts_per_second: s.rec.series(), devices }
    }

    /// One device's observation (also for JIDs that only ever presented unknown credentials).
    pub fn device(&self, jid: &str) -> Option<DeviceObservation> {
        let s = self.shared.lock();
        s.rec.observation(jid, s.facts(jid).as_ref())
    }

    // ---- contacts ----

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

    // ---- waiting ----

    /// Waits until `check` returns `Some`, re-checking whenever anything the simulator observes changes.
    pub async fn wait_for<T>(
        &self,
        limit: Duration,
        mut check: impl FnMut(&SimHandle) -> Option<T>,
    ) -> Result<T, SimError> {
        let deadline = Instant::now() + limit;
        let mut changes = self.shared.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(t) = check(self) {
                return Ok(t);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return check(self).ok_or(SimError::Timeout(limit)),
            }
        }
    }

    /// Waits until a device's observation satisfies `pred`; returns that observation.
    pub async fn wait_for_device(
        &self,
        jid: &str,
        limit: Duration,
        pred: impl Fn(&DeviceObservation) -> bool,
    ) -> Result<DeviceObservation, SimError> {
        self.wait_for(limit, |h| h.device(jid).filter(|o| pred(o))).await
    }
}

struct Qr {
    reference: String,
    noise: [u8; 32],
    identity: [u8; 32],
    adv_secret: [u8; 32],
}

/// `ref,noise_b64,identity_b64,adv_b64[,client_type]`, optionally behind WhatsApp's deep-link prefix.
fn parse_qr(code: &str) -> Option<Qr> {
    use base64::Engine as _;
    let body = code.rsplit('#').next()?;
    let mut parts = body.split(',');
    let reference = parts.next().filter(|r| !r.is_empty())?.to_owned();
    let mut key = || -> Option<[u8; 32]> {
        base64::engine::general_purpose::STANDARD.decode(parts.next()?).ok()?.try_into().ok()
    };
    Some(Qr { reference, noise: key()?, identity: key()?, adv_secret: key()? })
}

/// Parses a phone-number device JID (`user:dev@s.whatsapp.net`).
fn parse_device_jid(jid: &str) -> Result<Jid, SimError> {
    let parsed: Jid = jid.parse().map_err(|_| SimError::InvalidJid(jid.to_owned()))?;
    if !parsed.is_pn() || parsed.user.is_empty() {
        return Err(SimError::InvalidJid(jid.to_owned()));
    }
    Ok(parsed)
}
