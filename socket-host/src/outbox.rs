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
//! - `meta`: `next_seq` -> the next sequence number.
//!
//! Delivery: one task per URL walks the events in sequence order (so each URL sees them in arrival order),
//! retrying one event with backoff until it answers 2xx. The URL set is the configured one: an event is removed
//! once every currently configured URL has it, so a URL added later receives the backlog and a removed URL
//! holds nothing back.

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
const NEXT_SEQ: &str = "next_seq";

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
    txn.commit()?;
    Ok(())
}

/// Associated data binding a sealed event to its slot.
fn slot_ad(seq: u64) -> Vec<u8> {
    let mut ad = b"wakeeper/outbox/v1\0".to_vec();
    ad.extend_from_slice(&seq.to_le_bytes());
    ad
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
        let len = {
            let mut table = txn.open_table(EVENTS).map_err(err)?;
            let stored = match table.get(seq).map_err(err)? {
                Some(v) => Some(self.unseal(seq, v.value())?),
                None => None,
            };
            if let Some(mut stored) = stored {
                if !stored.delivered.iter().any(|u| u == url) {
                    stored.delivered.push(url.to_owned());
                }
                if self.inner.urls.iter().all(|u| stored.delivered.contains(u)) {
                    table.remove(seq).map_err(err)?;
                    txn.open_table(EVENT_IDS).map_err(err)?.remove(stored.id.as_str()).map_err(err)?;
                } else {
                    table.insert(seq, self.seal(seq, &stored).as_slice()).map_err(err)?;
                }
            }
            table.len().map_err(err)?
        };
        txn.commit().map_err(err)?;
        Ok(len)
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
            if self.send_until_answered(&http, &url, &secret, seq, &stored).await {
                metrics::counter!("wakeeper_outbox_delivered_total").increment(1);
                let u = url.clone();
                match self.blocking(move |o| o.mark_delivered(seq, &u)).await {
                    Ok(len) => metrics::gauge!("wakeeper_outbox_events").set(len as f64),
                    // The event stays and is sent again later: at least once.
                    Err(e) => tracing::error!(error = %e, "could not record a delivered message event"),
                }
            }
            cursor = seq + 1;
        }
    }

    /// POSTs one event until `url` answers 2xx (true), or until the event is gone (dropped as the oldest of a
    /// full outbox: false).
    async fn send_until_answered(
        &self,
        http: &reqwest::Client,
        url: &str,
        secret: &Signer,
        seq: u64,
        stored: &Stored,
    ) -> bool {
        let mut delay = Duration::from_millis(200);
        loop {
            let mut request =
                http.post(url).header("content-type", "application/json").header(IDEMPOTENCY_HEADER, &stored.id);
            for (name, value) in secret.headers(&stored.id, unix_seconds(), stored.body.as_bytes()) {
                request = request.header(name, value);
            }
            let sent = request.body(stored.body.clone()).send().await;
            match sent {
                Ok(r) if r.status().is_success() => return true,
                Ok(r) => tracing::warn!(status = r.status().as_u16(), "message webhook refused; retrying"),
                Err(e) => tracing::warn!(error = %e.without_url(), "message webhook unreachable; retrying"),
            }
            metrics::counter!("wakeeper_outbox_retries_total").increment(1);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(MAX_RETRY_DELAY);
            if let Ok(false) = self.blocking(move |o| o.still_waiting(seq)).await {
                return false;
            }
        }
    }
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
