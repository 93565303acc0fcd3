//! The simulator's shared state: the device registry, fault settings, live connections and counters,
//! behind one short-held lock (no lock is held across an await).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use whatsapp_rust::wacore_binary::{Jid, Node};

use crate::contacts::Contact;
use crate::faults::{Command, Refusal, Settings};
use crate::keys::ServerIdentity;
use crate::noise::Pattern;
use crate::observe::{Recorder, RegistryFacts};
use crate::server::{ConflictPolicy, SimConfig};

/// A device the server would let log in.
pub(crate) struct DeviceEntry {
    pub(crate) jid: Jid,
    pub(crate) lid: Option<Jid>,
    /// The credential the device must present in the Noise handshake.
    pub(crate) noise_public: [u8; 32],
    pub(crate) tenant: Option<String>,
    pub(crate) revoked: bool,
    pub(crate) keys: KeyBundle,
    /// Present when the simulator minted the device and so holds the account (phone) key.
    pub(crate) account: Option<Account>,
    pub(crate) settings: Settings,
}

/// The Signal keys the server publishes for a device (what `encrypt` IQs upload and fetch).
#[derive(Default, Clone)]
pub(crate) struct KeyBundle {
    pub(crate) registration_id: Option<u32>,
    pub(crate) identity: Option<[u8; 32]>,
    pub(crate) signed_pre_key: Option<SignedPreKey>,
    /// One-time pre-keys, by id.
    pub(crate) prekeys: BTreeMap<u32, [u8; 32]>,
    /// Whether the server considers the bundle present; when false, the digest check answers 404 and the
    /// engine re-uploads.
    pub(crate) server_has_prekeys: bool,
}

#[derive(Clone)]
pub(crate) struct SignedPreKey {
    pub(crate) id: u32,
    pub(crate) public: [u8; 32],
    pub(crate) signature: Vec<u8>,
}

/// What the simulator, standing in for the phone, knows about a minted device's account.
pub(crate) struct Account {
    pub(crate) key_index: u32,
    /// `ADVSignedKeyIndexList` bytes, signed once at mint time.
    pub(crate) key_index_list: Vec<u8>,
    pub(crate) created_secs: u64,
    /// The companion's `ADVSignedDeviceIdentity`, as pre-key bundles carry it.
    pub(crate) device_identity: Vec<u8>,
}

/// A connection waiting for its QR code to be scanned.
pub(crate) struct PendingPairing {
    /// The refs the server handed out; a QR code carries one of them.
    pub(crate) refs: Vec<String>,
    /// The client's noise static key (the QR code carries it too).
    pub(crate) noise_public: [u8; 32],
    /// The key bundle from the registration payload.
    pub(crate) keys: KeyBundle,
    /// Where `pair-success` goes: the new device JID and the stanza.
    pub(crate) offer: mpsc::UnboundedSender<(String, Node)>,
}

/// A logged-in connection, reachable by fault actions.
pub(crate) struct LiveConn {
    pub(crate) jid: String,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    /// Stanzas for the device (messages and receipts the relay routes to it).
    pub(crate) outbox: mpsc::UnboundedSender<Node>,
}

#[derive(Default)]
pub(crate) struct State {
    /// By phone-number device JID.
    pub(crate) devices: HashMap<String, DeviceEntry>,
    /// Device JIDs by phone number (JID user), for usync and so minting never reuses a number.
    pub(crate) by_phone: HashMap<String, Vec<String>>,
    /// Device JIDs by LID user.
    pub(crate) by_lid: HashMap<String, Vec<String>>,
    /// Tenant id to device JID.
    pub(crate) tenants: HashMap<String, String>,
    pub(crate) global: Settings,
    pub(crate) rec: Recorder,
    pub(crate) live: HashMap<u64, LiveConn>,
    /// Live connection ids by device JID.
    pub(crate) live_by_jid: HashMap<String, Vec<u64>>,
    /// Connections in the pairing flow, by connection id.
    pub(crate) pairings: HashMap<u64, PendingPairing>,
    /// WhatsApp users the simulator plays, by phone number.
    pub(crate) contacts: HashMap<String, Contact>,
    /// Phone numbers of account phones by LID user.
    pub(crate) contact_by_lid: HashMap<String, String>,
    /// Stanzas waiting for a device to log in, by device JID (the offline queue).
    pub(crate) offline: HashMap<String, Vec<Node>>,
    /// Redeliver a contact's message the device never acknowledged on its next connect, as WhatsApp does
    /// (off by default: see [`crate::SimHandle::redeliver_unacked`]).
    pub(crate) redeliver_unacked: bool,
    /// Contacts' messages each device has not acknowledged yet (receipt or ack), in send order, by device JID.
    pub(crate) unacked: HashMap<String, Vec<(String, Node)>>,
}

impl State {
    pub(crate) fn facts(&self, jid: &str) -> Option<RegistryFacts> {
        self.devices.get(jid).map(|d| RegistryFacts {
            tenant: d.tenant.clone(),
            revoked: d.revoked,
            prekeys_held: d.keys.prekeys.len() as u32,
        })
    }

    pub(crate) fn insert_device(&mut self, entry: DeviceEntry) {
        let jid = entry.jid.to_string();
        if let Some(old) = self.devices.get(&jid) {
            // Re-registration replaces the entry; drop the old index rows first.
            let (phone, lid) = (old.jid.user.to_string(), old.lid.as_ref().map(|l| l.user.to_string()));
            remove_from(&mut self.by_phone, &phone, &jid);
            if let Some(l) = lid {
                remove_from(&mut self.by_lid, &l, &jid);
            }
        }
        self.by_phone.entry(entry.jid.user.to_string()).or_default().push(jid.clone());
        if let Some(l) = &entry.lid {
            self.by_lid.entry(l.user.to_string()).or_default().push(jid.clone());
        }
        if let Some(t) = &entry.tenant {
            self.tenants.insert(t.clone(), jid.clone());
        }
        self.devices.insert(jid, entry);
    }

    /// The registered devices of a user, by phone number or LID.
    pub(crate) fn devices_of(&self, user: &str, lid: bool) -> impl Iterator<Item = &DeviceEntry> {
        let index = if lid { &self.by_lid } else { &self.by_phone };
        index.get(user).into_iter().flatten().filter_map(|j| self.devices.get(j))
    }

    /// Settings in force for a device (its own over the global ones).
    pub(crate) fn effective(&self, jid: Option<&str>) -> Settings {
        match jid.and_then(|j| self.devices.get(j)) {
            Some(d) => d.settings.over(&self.global),
            None => self.global,
        }
    }
}

/// What the server does with a completed handshake.
pub(crate) enum Admission {
    /// `<success>`.
    Login,
    /// `<failure reason="401"/>`.
    Reject,
    /// `<stream:error code="429|503"/>` then close.
    Refuse(Refusal),
}

/// Everything connection tasks and the control surface share.
pub(crate) struct Shared {
    pub(crate) identity: ServerIdentity,
    pub(crate) config: SimConfig,
    pub(crate) started: Instant,
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    next_conn: AtomicU64,
    /// Set when the simulator stops; connections still in their handshake end on it.
    pub(crate) closing: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn new(identity: ServerIdentity, config: SimConfig) -> Self {
        Self {
            identity,
            config,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
            next_conn: AtomicU64::new(1),
            closing: watch::channel(false).0,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state and wakes everyone waiting for a change.
    pub(crate) fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        out
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(crate) fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(crate) fn conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Records a completed handshake and decides its fate. Refusals come before credentials, as a loaded
    /// server refuses before it looks anyone up.
    pub(crate) fn admit(&self, jid: &str, key: &[u8; 32], pattern: Pattern) -> Admission {
        let at = self.uptime_ms();
        let now = Instant::now();
        self.update(|s| {
            s.rec.handshake(jid, key, pattern, at);
            if let Some(r) = s.effective(Some(jid)).active_refusal(now) {
                s.rec.refused(jid);
                return Admission::Refuse(r);
            }
            match s.devices.get(jid) {
                Some(d) if !d.revoked && d.noise_public == *key => Admission::Login,
                Some(d) => {
                    let wrong_key = !d.revoked;
                    s.rec.rejected(jid, wrong_key);
                    Admission::Reject
                }
                None => {
                    s.rec.rejected(jid, false);
                    Admission::Reject
                }
            }
        })
    }

    /// Registers a logged-in connection. Under [`ConflictPolicy::ReplaceOlder`] the device's older
    /// connections are told to end with `<conflict type="replaced"/>`, as WhatsApp does.
    pub(crate) fn logged_in(
        &self,
        conn: u64,
        jid: &str,
        commands: mpsc::UnboundedSender<Command>,
        outbox: mpsc::UnboundedSender<Node>,
    ) {
        let policy = self.config.conflict;
        self.update(|s| {
            s.rec.logged_in(jid);
            let ids = s.live_by_jid.entry(jid.to_owned()).or_default();
            let older = std::mem::take(ids);
            ids.push(conn);
            ids.extend(older.iter().copied());
            if policy == ConflictPolicy::ReplaceOlder {
                for id in &older {
                    if let Some(c) = s.live.get(id) {
                        let _ = c.commands.send(Command::Superseded);
                    }
                }
            }
            s.live.insert(conn, LiveConn { jid: jid.to_owned(), commands, outbox });
        });
    }

    pub(crate) fn logged_out(&self, conn: u64) {
        self.update(|s| {
            if let Some(c) = s.live.remove(&conn) {
                s.rec.logged_out(&c.jid);
                remove_from(&mut s.live_by_jid, &c.jid, &conn);
            }
        });
    }

    /// Sends a command to every live connection; returns how many got it.
    pub(crate) fn command_all(&self, command: Command) -> usize {
        let s = self.lock();
        s.live.values().filter(|c| c.commands.send(command).is_ok()).count()
    }

    /// Sends a command to one device's live connections; returns how many got it.
    pub(crate) fn command_device(&self, jid: &str, command: Command) -> usize {
        let s = self.lock();
        let ids = s.live_by_jid.get(jid).map(Vec::as_slice).unwrap_or_default();
        ids.iter().filter_map(|id| s.live.get(id)).filter(|c| c.commands.send(command).is_ok()).count()
    }
}

fn remove_from<K, V>(index: &mut HashMap<String, Vec<V>>, key: &K, value: &V)
where
    K: AsRef<str> + ?Sized,
    V: PartialEq,
{
    if let Some(list) = index.get_mut(key.as_ref()) {
        list.retain(|v| v != value);
        if list.is_empty() {
            index.remove(key.as_ref());
        }
    }
}
