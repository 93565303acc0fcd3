//! The durable outbox of message events: every `message.received` event is written here (a redb file in the
//! data dir, fsynced) before the engine acknowledges the message to WhatsApp, and stays until every configured
//! webhook URL has answered it with a 2xx. A bot that is down for a while, or a host restart in between, loses
//! nothing; past [`Outbox`]'s bound the oldest events are dropped, counted and logged.
//!
//! # Data layout (`<data_dir>/outbox.redb`)
//! - `events`: sequence number (u64, rising, never reused) -> JSON [`Stored`] (the event id, the signed body,
//!   the URLs that already answered 2xx) sealed with the data key like every credential record, the sequence
//!   number as associated data: message text, names and numbers are never on disk in the clear, and a value
//!   moved to another slot does not open. (Values an older release wrote unsealed are still read.)
//! - `event_ids`: event id -> sequence number (an event enqueued twice while pending is stored once).
//! - `meta`: `next_seq` -> the next sequence number; `next_dead` -> the next dead-letter number.
//! - `dead_letters`: dead-letter number (u64, rising) -> JSON [`DeadLetter`] sealed like an event (its own
//!   associated data): an event one URL refused for good (a 4xx other than 408 and 429), kept for listing and
//!   replay through the API instead of holding that URL's queue.
//!
//! Delivery: one task per URL walks the events in sequence order (so each URL sees them in arrival order),
//! retrying one event with backoff until it answers 2xx. The URL set is the configured one: an event is removed
//! once every currently configured URL has it, so a URL added later receives the backlog and a removed URL
//! holds nothing back. A permanent refusal dead-letters the event for that URL (counted in
//! `wakeeper_webhook_dead_letters_total`, logged with the event id and status) and the URL goes on with the
//! next event; [`Outbox::replay`] puts a dead letter back in that URL's queue.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use wakeeper_shared::crypto::Cipher;
use wakeeper_shared::disk::{DiskWatch, RedbFile};
use wakeeper_shared::webhook::{Signer, unix_seconds};

/// The file name of the outbox inside the data dir.
pub const OUTBOX_FILE: &str = "outbox.redb";
/// Longest wait between two delivery attempts of one event to one URL.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);
/// The same id under the conventional name.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const EVENT_IDS: TableDefinition<&str, u64> = TableDefinition::new("event_ids");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
const NEXT_SEQ: &str = "next_seq";
const NEXT_DEAD: &str = "next_dead";

/// An outbox failure: the local file could not be read or written, or an event in it does not open.
#[derive(Debug, thiserror::Error)]
#[error("outbox: {message}")]
pub struct OutboxError {
    message: String,
    /// The file failed (a disk fault), not one event's content.
    store: bool,
}

/// The file failed.
fn err(e: impl std::fmt::Display) -> OutboxError {
    OutboxError { message: e.to_string(), store: true }
}

/// A stored event is unusable (another data key, bad JSON) or a task failed: no fault of the disk.
fn data_err(e: impl std::fmt::Display) -> OutboxError {
    OutboxError { message: e.to_string(), store: false }
}

/// Creates the outbox's tables.
fn create_tables(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(EVENTS)?;
    txn.open_table(EVENT_IDS)?;
    txn.open_table(META)?;
    txn.open_table(DEAD_LETTERS)?;
    txn.commit()?;
    Ok(())
}

/// Associated data binding a sealed event to its slot.
fn slot_ad(seq: u64) -> Vec<u8> {
    let mut ad = b"wakeeper/outbox/v1\0".to_vec();
    ad.extend_from_slice(&seq.to_le_bytes());
    ad
}

/// Associated data binding a sealed dead letter to its slot.
fn dead_ad(n: u64) -> Vec<u8> {
    let mut ad = b"wakeeper/outbox/dead/v1\0".to_vec();
    ad.extend_from_slice(&n.to_le_bytes());
    ad
}

/// Whether an HTTP status is a refusal that no retry changes: a 4xx other than 408 (timeout) and 429 (rate).
pub fn is_permanent_refusal(status: u16) -> bool {
    (400..500).contains(&status) && status != 408 && status != 429
}

/// An event one URL refused for good.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DeadStored {
    event_id: String,
    url: String,
    status: u16,
    at_ms: u64,
    body: String,
}

/// A dead letter as the API lists it (the body stays in the outbox; `replay` sends it again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// Its number, for `POST /v1/webhooks/dead-letters/{number}/replay`.
    pub number: u64,
    /// The event's id (the idempotency key).
    pub event_id: String,
    /// The event's `type`.
    pub event_type: String,
    /// The URL that refused it (without its query, which may hold a receiver's token).
    pub url: String,
    /// The status it answered.
    pub status: u16,
    /// When, in Unix milliseconds.
    pub at_ms: u64,
}

/// A URL without its query and fragment, for logs and listings.
pub fn url_for_display(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// How one event's delivery to one URL ended.
enum Sent {
    /// Answered 2xx.
    Delivered,
    /// Gone from the outbox meanwhile (dropped as the oldest of a full outbox).
    Dropped,
    /// Refused for good with this status.
    Refused(u16),
}

/// One stored event.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    id: String,
    body: String,
    #[serde(default)]
    delivered: Vec<String>,
}

/// One event to store: its id (idempotency key) and its JSON body.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    /// The idempotency key.
    pub id: String,
    /// The JSON body, exactly as signed and sent.
    pub body: String,
}

/// The durable outbox and its delivery tasks. Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    /// Reopened in place when its disk takes writes again after a fault.
    db: Arc<RedbFile>,
    cipher: Cipher,
    path: PathBuf,
    max: u64,
    urls: Vec<String>,
    /// One per URL: woken when an event is stored.
    wake: Vec<Notify>,
    /// Where refused writers are noted.
    disk: DiskWatch,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").field("path", &self.inner.path).field("max", &self.inner.max).finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens (creating when absent) the outbox at `path` for `urls`, holding at most `max` events. Delivery
    /// starts with [`Outbox::start_delivery`].
    pub fn open(path: impl AsRef<Path>, cipher: Cipher, urls: Vec<String>, max: u64) -> Result<Self, OutboxError> {
        Self::open_watched(path, cipher, urls, max, DiskWatch::new())
    }

    /// [`Outbox::open`], reporting every failure of the file to `disk` (and registered there to be reopened
    /// in place once the disk takes writes again).
    pub fn open_watched(
        path: impl AsRef<Path>,
        cipher: Cipher,
        urls: Vec<String>,
        max: u64,
        disk: DiskWatch,
    ) -> Result<Self, OutboxError> {
        let path = path.as_ref().to_path_buf();
        wakeeper_shared::private_files::refuse_symlink(&path).map_err(data_err)?;
        let db = RedbFile::open(&path, create_tables, disk.clone()).map_err(err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        }
        let wake = urls.iter().map(|_| Notify::new()).collect();
        let outbox = Self { inner: Arc::new(Inner { db, cipher, path, max: max.max(1), urls, wake, disk }) };
        metrics::gauge!("wakeeper_outbox_events").set(outbox.len_blocking()? as f64);
        Ok(outbox)
    }

    /// Notes that `tenant`'s received messages could not be stored (see [`DiskWatch::note_refused_writer`]).
    pub fn note_refused(&self, tenant: &str) {
        self.inner.disk.note_refused_writer(tenant);
    }

    /// The configured URLs.
    pub fn urls(&self) -> &[String] {
        &self.inner.urls
    }

    fn len_blocking(&self) -> Result<u64, OutboxError> {
        let db = self.inner.db.get().map_err(err)?;
        let txn = db.begin_read().map_err(err)?;
        txn.open_table(EVENTS).map_err(err)?.len().map_err(err)
    }

    /// How many events are waiting for at least one URL.
    pub async fn len(&self) -> Result<u64, OutboxError> {
        self.blocking(|o| o.len_blocking()).await
    }

    /// Reports a failure of the file to the disk watch (an event that does not open is no disk fault).
    fn reported<T>(&self, op: &str, result: Result<T, OutboxError>) -> Result<T, OutboxError> {
        if let Err(e) = &result
            && e.store
        {
            self.inner.db.failed(op, e);
        }
        result
    }

    /// Whether nothing is waiting.
    pub async fn is_empty(&self) -> Result<bool, OutboxError> {
        Ok(self.len().await? == 0)
    }

    /// Stores `events` durably (one fsynced transaction) and wakes the delivery tasks. An event whose id is
    /// already waiting is not stored twice. When the outbox is full the oldest events are dropped (counted in
    /// `wakeeper_outbox_dropped_total` and logged). Returns once the events are on disk.
    pub async fn enqueue(&self, events: Vec<OutboxEvent>) -> Result<(), OutboxError> {
        if events.is_empty() {
            return Ok(());
        }
        let me = self.clone();
        let (dropped, len) =
            tokio::task::spawn_blocking(move || me.reported("storing events", me.enqueue_blocking(events)))
                .await
                .map_err(data_err)??;
        if !dropped.is_empty() {
            metrics::counter!("wakeeper_outbox_dropped_total").increment(dropped.len() as u64);
            tracing::warn!(
                dropped = dropped.len(),
                max = self.inner.max,
                oldest_dropped = %dropped[0],
                "message outbox full: dropped the oldest events"
            );
        }
        metrics::gauge!("wakeeper_outbox_events").set(len as f64);
        for w in &self.inner.wake {
            w.notify_one();
        }
        Ok(())
    }

    fn enqueue_blocking(&self, events: Vec<OutboxEvent>) -> Result<(Vec<String>, u64), OutboxError> {
        let db = self.inner.db.get().map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        let mut dropped = Vec::new();
        let len = {
            let mut table = txn.open_table(EVENTS).map_err(err)?;
            let mut ids = txn.open_table(EVENT_IDS).map_err(err)?;
            let mut meta = txn.open_table(META).map_err(err)?;
            let mut next = meta.get(NEXT_SEQ).map_err(err)?.map(|v| v.value()).unwrap_or(0);
            for event in events {
                if ids.get(event.id.as_str()).map_err(err)?.is_some() {
                    continue;
                }
                while table.len().map_err(err)? >= self.inner.max {
                    let Some(v) = table.pop_first().map_err(err)? else { break };
                    let (old_seq, old) = (v.0.value(), v.1);
                    let old = self.unseal(old_seq, old.value())?;
                    ids.remove(old.id.as_str()).map_err(err)?;
                    dropped.push(old.id);
                }
                let stored = Stored { id: event.id, body: event.body, delivered: Vec::new() };
                table.insert(next, self.seal(next, &stored).as_slice()).map_err(err)?;
                ids.insert(stored.id.as_str(), next).map_err(err)?;
                next += 1;
            }
            meta.insert(NEXT_SEQ, next).map_err(err)?;
            table.len().map_err(err)?
        };
        txn.commit().map_err(err)?;
        Ok((dropped, len))
    }

    /// The first event at or after `from` that `url` has not answered yet.
    fn next_for(&self, url: &str, from: u64) -> Result<Option<(u64, Stored)>, OutboxError> {
        let db = self.inner.db.get().map_err(err)?;
        let txn = db.begin_read().map_err(err)?;
        let table = txn.open_table(EVENTS).map_err(err)?;
        for entry in table.range(from..).map_err(err)? {
            let (k, v) = entry.map_err(err)?;
            let stored = self.unseal(k.value(), v.value())?;
            if !stored.delivered.iter().any(|u| u == url) {
                return Ok(Some((k.value(), stored)));
            }
        }
        Ok(None)
    }

    /// An event as stored in slot `seq`: sealed, the slot as associated data.
    fn seal(&self, seq: u64, stored: &Stored) -> Vec<u8> {
        let json = serde_json::to_vec(stored).expect("an event serializes");
        self.inner.cipher.seal_with_ad(&slot_ad(seq), &json)
    }

    /// The event in slot `seq`; a value an older release stored unsealed (plain JSON) is read as it is.
    fn unseal(&self, seq: u64, value: &[u8]) -> Result<Stored, OutboxError> {
        if value.first() == Some(&b'{')
            && let Ok(stored) = serde_json::from_slice::<Stored>(value)
        {
            return Ok(stored);
        }
        let json = self
            .inner
            .cipher
            .open_with_ad(&slot_ad(seq), value)
            .map_err(|_| data_err(format!("event {seq} does not open with this data key")))?;
        serde_json::from_slice(&json).map_err(data_err)
    }

    fn still_waiting(&self, seq: u64) -> Result<bool, OutboxError> {
        let db = self.inner.db.get().map_err(err)?;
        let txn = db.begin_read().map_err(err)?;
        Ok(txn.open_table(EVENTS).map_err(err)?.get(seq).map_err(err)?.is_some())
    }

    /// Records that `url` answered event `seq`; removes the event once every configured URL has. Not fsynced on
    /// its own (a crash before the next durable commit only means a redelivery, which at-least-once allows).
    fn mark_delivered(&self, seq: u64, url: &str) -> Result<u64, OutboxError> {
        let db = self.inner.db.get().map_err(err)?;
        let mut txn = db.begin_write().map_err(err)?;
        txn.set_durability(Durability::None).map_err(err)?;
        self.settle(&txn, seq, url)?;
        let len = txn.open_table(EVENTS).map_err(err)?.len().map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(len)
    }

    /// Within `txn`: `url` is done with event `seq` (answered or dead-lettered); the event leaves once every
    /// configured URL is. Returns the event as it was, when it was still there.
    fn settle(&self, txn: &redb::WriteTransaction, seq: u64, url: &str) -> Result<Option<Stored>, OutboxError> {
        let mut table = txn.open_table(EVENTS).map_err(err)?;
        let stored = match table.get(seq).map_err(err)? {
            Some(v) => self.unseal(seq, v.value())?,
            None => return Ok(None),
        };
        let mut settled = stored.clone();
        if !settled.delivered.iter().any(|u| u == url) {
            settled.delivered.push(url.to_owned());
        }
        if self.inner.urls.iter().all(|u| settled.delivered.contains(u)) {
            table.remove(seq).map_err(err)?;
            txn.open_table(EVENT_IDS).map_err(err)?.remove(settled.id.as_str()).map_err(err)?;
        } else {
            table.insert(seq, self.seal(seq, &settled).as_slice()).map_err(err)?;
        }
        Ok(Some(stored))
    }

    /// Within `txn`: keeps `event_id`'s `body` as a dead letter of `url`.
    fn keep_dead(
        &self,
        txn: &redb::WriteTransaction,
        event_id: &str,
        body: &str,
        url: &str,
        status: u16,
    ) -> Result<u64, OutboxError> {
        let mut meta = txn.open_table(META).map_err(err)?;
        let n = meta.get(NEXT_DEAD).map_err(err)?.map(|v| v.value()).unwrap_or(0);
        let dead = DeadStored {
            event_id: event_id.to_owned(),
            url: url.to_owned(),
            status,
            at_ms: u64::try_from(wakeeper_shared::domain::now_millis()).unwrap_or(0),
            body: body.to_owned(),
        };
        let json = serde_json::to_vec(&dead).expect("a dead letter serializes");
        let sealed = self.inner.cipher.seal_with_ad(&dead_ad(n), &json);
        txn.open_table(DEAD_LETTERS).map_err(err)?.insert(n, sealed.as_slice()).map_err(err)?;
        meta.insert(NEXT_DEAD, n + 1).map_err(err)?;
        Ok(n)
    }

    fn open_dead(&self, n: u64, value: &[u8]) -> Result<DeadStored, OutboxError> {
        let json = self
            .inner
            .cipher
            .open_with_ad(&dead_ad(n), value)
            .map_err(|_| data_err(format!("dead letter {n} does not open with this data key")))?;
        serde_json::from_slice(&json).map_err(data_err)
    }

    /// Dead-letters event `seq` for `url` (fsynced: the event leaves that URL's queue only once it is kept).
    fn dead_letter_blocking(&self, seq: u64, url: &str, status: u16) -> Result<Option<u64>, OutboxError> {
        let db = self.inner.db.get().map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        let n = match self.settle(&txn, seq, url)? {
            Some(stored) => Some(self.keep_dead(&txn, &stored.id, &stored.body, url, status)?),
            None => None,
        };
        txn.commit().map_err(err)?;
        Ok(n)
    }

    /// Keeps an event that never was in the queue (a state event, delivered from memory) as a dead letter of
    /// `url`.
    pub async fn dead_letter_event(&self, event_id: String, body: String, url: String, status: u16) {
        let (id, u) = (event_id.clone(), url.clone());
        let kept = self
            .blocking(move |o| {
                let db = o.inner.db.get().map_err(err)?;
                let txn = db.begin_write().map_err(err)?;
                let n = o.keep_dead(&txn, &event_id, &body, &url, status)?;
                txn.commit().map_err(err)?;
                Ok(n)
            })
            .await;
        note_dead_letter(&id, &u, status, kept.as_ref().ok().copied());
        if let Err(e) = kept {
            tracing::error!(error = %e, event_id = %id, "could not keep a refused event as a dead letter");
        }
    }

    /// Every dead letter, oldest first.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, OutboxError> {
        self.blocking(|o| {
            let db = o.inner.db.get().map_err(err)?;
            let txn = db.begin_read().map_err(err)?;
            let table = txn.open_table(DEAD_LETTERS).map_err(err)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(err)? {
                let (k, v) = entry.map_err(err)?;
                let d = o.open_dead(k.value(), v.value())?;
                let event_type = serde_json::from_str::<serde_json::Value>(&d.body)
                    .ok()
                    .and_then(|b| b.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                out.push(DeadLetter {
                    number: k.value(),
                    event_id: d.event_id,
                    event_type,
                    url: url_for_display(&d.url).to_owned(),
                    status: d.status,
                    at_ms: d.at_ms,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Puts dead letter `n` back in its URL's queue (at the end, under its own event id). `Ok(false)` when
    /// there is no such dead letter, or its URL is no longer configured (it stays then).
    pub async fn replay(&self, n: u64) -> Result<bool, OutboxError> {
        let replayed = self.blocking(move |o| o.replay_blocking(n)).await?;
        if let Some(index) = replayed {
            self.inner.wake[index].notify_one();
        }
        Ok(replayed.is_some())
    }

    fn replay_blocking(&self, n: u64) -> Result<Option<usize>, OutboxError> {
        let db = self.inner.db.get().map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        let dead = match txn.open_table(DEAD_LETTERS).map_err(err)?.get(n).map_err(err)? {
            Some(v) => self.open_dead(n, v.value())?,
            None => return Ok(None),
        };
        let Some(index) = self.inner.urls.iter().position(|u| *u == dead.url) else { return Ok(None) };
        {
            let mut table = txn.open_table(EVENTS).map_err(err)?;
            let mut ids = txn.open_table(EVENT_IDS).map_err(err)?;
            let mut meta = txn.open_table(META).map_err(err)?;
            let next = meta.get(NEXT_SEQ).map_err(err)?.map(|v| v.value()).unwrap_or(0);
            // Still waiting for other URLs: move it to the end, owed to this URL again; else a new slot owed
            // to this URL only. Either way behind this URL's delivery cursor, which only moves forward.
            let pending = ids.get(dead.event_id.as_str()).map_err(err)?.map(|v| v.value());
            let delivered = match pending {
                Some(seq) => {
                    let old = match table.remove(seq).map_err(err)? {
                        Some(v) => self.unseal(seq, v.value())?.delivered,
                        None => Vec::new(),
                    };
                    old.into_iter().filter(|u| *u != dead.url).collect()
                }
                None => self.inner.urls.iter().filter(|u| **u != dead.url).cloned().collect(),
            };
            let stored = Stored { id: dead.event_id.clone(), body: dead.body, delivered };
            table.insert(next, self.seal(next, &stored).as_slice()).map_err(err)?;
            ids.insert(stored.id.as_str(), next).map_err(err)?;
            meta.insert(NEXT_SEQ, next + 1).map_err(err)?;
        }
        txn.open_table(DEAD_LETTERS).map_err(err)?.remove(n).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Some(index))
    }

    /// Starts one delivery task per URL; each runs for the life of the process.
    pub fn start_delivery(&self, signer: Signer) {
        let secret = Arc::new(signer);
        let http = crate::webhooks::webhook_client();
        for index in 0..self.inner.urls.len() {
            tokio::spawn(self.clone().deliver(index, http.clone(), secret.clone()));
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Outbox) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.reported("reading or marking events", f(&me))).await.map_err(data_err)?
    }

    async fn deliver(self, index: usize, http: reqwest::Client, secret: Arc<Signer>) {
        let url = self.inner.urls[index].clone();
        let mut cursor = 0u64;
        let mut store_delay = Duration::from_millis(200);
        loop {
            // Registered before the look-up, so an enqueue between the two still wakes this task.
            let woken = self.inner.wake[index].notified();
            let u = url.clone();
            let next = match self.blocking(move |o| o.next_for(&u, cursor)).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "message outbox unreadable; retrying");
                    tokio::time::sleep(store_delay).await;
                    store_delay = (store_delay * 2).min(MAX_RETRY_DELAY);
                    continue;
                }
            };
            store_delay = Duration::from_millis(200);
            let Some((seq, stored)) = next else {
                woken.await;
                continue;
            };
            drop(woken);
            match self.send_until_answered(&http, &url, &secret, seq, &stored).await {
                Sent::Delivered => {
                    metrics::counter!("wakeeper_outbox_delivered_total").increment(1);
                    let u = url.clone();
                    match self.blocking(move |o| o.mark_delivered(seq, &u)).await {
                        Ok(len) => metrics::gauge!("wakeeper_outbox_events").set(len as f64),
                        // The event stays and is sent again later: at least once.
                        Err(e) => tracing::error!(error = %e, "could not record a delivered message event"),
                    }
                }
                Sent::Dropped => {}
                Sent::Refused(status) => {
                    let u = url.clone();
                    match self.blocking(move |o| o.dead_letter_blocking(seq, &u, status)).await {
                        Ok(n) => note_dead_letter(&stored.id, &url, status, n),
                        Err(e) => {
                            // Not kept: the URL stays on this event, retrying it, rather than lose it.
                            tracing::error!(error = %e, "could not keep a refused message event as a dead letter");
                            tokio::time::sleep(store_delay).await;
                            store_delay = (store_delay * 2).min(MAX_RETRY_DELAY);
                            continue;
                        }
                    }
                }
            }
            cursor = seq + 1;
        }
    }

    /// POSTs one event until `url` answers 2xx, refuses it for good, or the event is gone (dropped as the oldest
    /// of a full outbox).
    async fn send_until_answered(
        &self,
        http: &reqwest::Client,
        url: &str,
        secret: &Signer,
        seq: u64,
        stored: &Stored,
    ) -> Sent {
        let mut delay = Duration::from_millis(200);
        loop {
            let mut request =
                http.post(url).header("content-type", "application/json").header(IDEMPOTENCY_HEADER, &stored.id);
            for (name, value) in secret.headers(&stored.id, unix_seconds(), stored.body.as_bytes()) {
                request = request.header(name, value);
            }
            let sent = request.body(stored.body.clone()).send().await;
            match sent {
                Ok(r) if r.status().is_success() => return Sent::Delivered,
                Ok(r) if is_permanent_refusal(r.status().as_u16()) => return Sent::Refused(r.status().as_u16()),
                Ok(r) => tracing::warn!(status = r.status().as_u16(), "message webhook refused; retrying"),
                Err(e) => tracing::warn!(error = %e.without_url(), "message webhook unreachable; retrying"),
            }
            metrics::counter!("wakeeper_outbox_retries_total").increment(1);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY_DELAY);
            if let Ok(false) = self.blocking(move |o| o.still_waiting(seq)).await {
                return Sent::Dropped;
            }
        }
    }
}

/// Counts and logs one dead-lettered event.
fn note_dead_letter(event_id: &str, url: &str, status: u16, number: Option<u64>) {
    metrics::counter!("wakeeper_webhook_dead_letters_total").increment(1);
    tracing::warn!(
        event_id,
        url = url_for_display(url),
        status,
        dead_letter = ?number,
        "webhook refused an event for good (4xx): kept as a dead letter (GET /v1/webhooks/dead-letters); the URL \
         goes on with the next event"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> Cipher {
        Cipher::new(&[3; 32])
    }

    fn event(id: &str) -> OutboxEvent {
        OutboxEvent { id: id.into(), body: format!(r#"{{"id":"{id}"}}"#) }
    }

    fn ids(o: &Outbox, url: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut from = 0;
        while let Some((seq, s)) = o.next_for(url, from).unwrap() {
            out.push(s.id);
            from = seq + 1;
        }
        out
    }

    /// Message text on disk is sealed: the file holds no byte of it, and another key opens nothing.
    #[tokio::test]
    async fn events_are_sealed_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OUTBOX_FILE);
        let text = "two margheritas for Rua das Flores 12, +5511999990000";
        let body = serde_json::json!({ "text": text }).to_string();
        {
            let o = Outbox::open(&path, cipher(), vec!["http://a".into()], 10).unwrap();
            o.enqueue(vec![OutboxEvent { id: "e1".into(), body: body.clone() }]).await.unwrap();
            let (_, stored) = o.next_for("http://a", 0).unwrap().expect("stored");
            assert_eq!(stored.body, body, "read back whole");
        }
        let raw = std::fs::read(&path).unwrap();
        for needle in ["margheritas", "5511999990000", "Rua das Flores"] {
            assert!(!raw.windows(needle.len()).any(|w| w == needle.as_bytes()), "{needle} is on disk in the clear");
        }
        let other = Outbox::open(&path, Cipher::new(&[4; 32]), vec!["http://a".into()], 10).unwrap();
        assert!(other.next_for("http://a", 0).is_err(), "another key opens nothing");
    }

    #[tokio::test]
    async fn bounded_drops_the_oldest_and_dedupes_pending_ids() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(dir.path().join(OUTBOX_FILE), cipher(), vec!["http://a".into()], 3).unwrap();
        o.enqueue(vec![event("1"), event("2"), event("2")]).await.unwrap();
        o.enqueue(vec![event("3"), event("4"), event("5")]).await.unwrap();
        assert_eq!(ids(&o, "http://a"), ["3", "4", "5"]);
        assert_eq!(o.len().await.unwrap(), 3);
        // A dropped id is not "pending" any more: it may be stored again.
        o.enqueue(vec![event("1")]).await.unwrap();
        assert_eq!(ids(&o, "http://a"), ["4", "5", "1"]);
    }

    #[tokio::test]
    async fn an_event_leaves_only_after_every_url_answered_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OUTBOX_FILE);
        let urls = vec!["http://a".to_string(), "http://b".to_string()];
        {
            let o = Outbox::open(&path, cipher(), urls.clone(), 10).unwrap();
            o.enqueue(vec![event("x"), event("y")]).await.unwrap();
            let (seq, _) = o.next_for("http://a", 0).unwrap().unwrap();
            o.mark_delivered(seq, "http://a").unwrap();
            assert_eq!(ids(&o, "http://a"), ["y"]);
            assert_eq!(ids(&o, "http://b"), ["x", "y"]);
            assert_eq!(o.len().await.unwrap(), 2);
        }
        let o = Outbox::open(&path, cipher(), urls, 10).unwrap();
        assert_eq!(ids(&o, "http://a"), ["y"], "delivery marks are kept across a reopen");
        let (seq, _) = o.next_for("http://b", 0).unwrap().unwrap();
        assert_eq!(o.mark_delivered(seq, "http://b").unwrap(), 1, "x left once both URLs had it");
        // Sequence numbers keep rising after the table empties, so a delivery cursor never skips a new event.
        let (seq_y, _) = o.next_for("http://b", 0).unwrap().unwrap();
        o.mark_delivered(seq_y, "http://a").unwrap();
        o.mark_delivered(seq_y, "http://b").unwrap();
        assert!(o.is_empty().await.unwrap());
        o.enqueue(vec![event("z")]).await.unwrap();
        assert!(o.next_for("http://a", seq_y + 1).unwrap().is_some());
    }

    #[test]
    fn permanent_refusals_are_the_4xx_but_timeout_and_rate() {
        assert!(is_permanent_refusal(400) && is_permanent_refusal(404) && is_permanent_refusal(410));
        assert!(!is_permanent_refusal(408) && !is_permanent_refusal(429) && !is_permanent_refusal(500));
        assert!(!is_permanent_refusal(302) && !is_permanent_refusal(204));
        assert_eq!(url_for_display("https://bot/hook?token=s3cret"), "https://bot/hook");
    }

    /// A dead letter leaves its URL's queue (not the other URL's), survives a reopen, and a replay puts it at
    /// the end of that URL's queue only, under its own id.
    #[tokio::test]
    async fn dead_letters_are_kept_listed_and_replayed_to_their_url_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OUTBOX_FILE);
        let urls = vec!["http://a/?token=s3cret".to_string(), "http://b".to_string()];
        {
            let o = Outbox::open(&path, cipher(), urls.clone(), 10).unwrap();
            o.enqueue(vec![event("x"), event("y")]).await.unwrap();
            let (seq, _) = o.next_for(&urls[0], 0).unwrap().unwrap();
            assert_eq!(o.dead_letter_blocking(seq, &urls[0], 410).unwrap(), Some(0));
            assert_eq!(ids(&o, &urls[0]), ["y"], "the refused event left a's queue");
            assert_eq!(ids(&o, &urls[1]), ["x", "y"], "b still gets it");
            o.dead_letter_event("state-1".into(), r#"{"type":"session.state_changed"}"#.into(), urls[1].clone(), 400)
                .await;
        }
        let o = Outbox::open(&path, cipher(), urls.clone(), 10).unwrap();
        let dead = o.dead_letters().await.unwrap();
        assert_eq!(dead.len(), 2, "{dead:?}");
        assert_eq!((dead[0].number, dead[0].event_id.as_str(), dead[0].status), (0, "x", 410));
        assert_eq!(dead[0].url, "http://a/", "no query in the listing");
        assert_eq!(dead[1].event_type, "session.state_changed");
        assert!(o.replay(0).await.unwrap());
        assert!(!o.replay(0).await.unwrap(), "replayed once");
        assert_eq!(ids(&o, &urls[0]), ["y", "x"], "x is owed to a again, at the end");
        assert_eq!(ids(&o, &urls[1]), ["y", "x"], "still owed to b once, moved with it");
        assert_eq!(o.dead_letters().await.unwrap().len(), 1);
        let raw = std::fs::read(&path).unwrap();
        assert!(!raw.windows(13).any(|w| w == b"state_changed"), "dead letters are sealed");
    }

    #[tokio::test]
    async fn a_url_configured_later_receives_the_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OUTBOX_FILE);
        {
            let o = Outbox::open(&path, cipher(), vec!["http://a".into()], 10).unwrap();
            o.enqueue(vec![event("x")]).await.unwrap();
        }
        let o = Outbox::open(&path, cipher(), vec!["http://a".into(), "http://c".into()], 10).unwrap();
        assert_eq!(ids(&o, "http://c"), ["x"]);
    }
}
