//! Webhooks: every session state change, and alerts, POSTed as signed JSON to the configured URLs.
//!
//! Delivery never blocks a session: state changes arrive over a broadcast channel and go into a bounded queue
//! per URL, each drained by its own task with retries and backoff. The body is signed as every wakeeper
//! webhook is ([`wakeeper_shared::webhook`]: `X-Wakeeper-Signature: sha256=<hex>`, `X-Wakeeper-Event-Id`).
//!
//! Alerts: a tenant whose consecutive failures go past [`ALERT_AFTER_FAILURES`] raises `alert.failing`; the
//! same tenant reaching `open` again raises `alert.recovered`. The host's own alerts (a disk fault and its
//! end, [`crate::disk_health`]) go to the same URLs through [`Webhooks::send`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Mutex, Notify, broadcast};
use wakeeper_shared::domain::{SessionState, StateChange, TenantId};
use wakeeper_shared::webhook::{Signer, unix_seconds};

use crate::outbox::{Outbox, is_permanent_refusal};

/// Failures in a row after which an alert fires.
pub const ALERT_AFTER_FAILURES: u32 = 3;
/// Events kept per URL while it is unreachable; the oldest are dropped past this (counted and logged).
pub const QUEUE_LIMIT: usize = 10_000;

/// One event as delivered.
#[derive(Debug, Clone, Serialize)]
pub struct WebhookEvent {
    /// Unique id (idempotency key).
    pub id: String,
    /// `session.state_changed`, `alert.failing` or `alert.recovered`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The tenant.
    pub tenant_id: TenantId,
    /// Previous state (state changes only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<SessionState>,
    /// New state.
    pub state: SessionState,
    /// Why (never a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Consecutive failures at the time.
    pub consecutive_failures: u32,
    /// When, in ms since the epoch.
    pub at_ms: i64,
}

fn event_id() -> String {
    let mut raw = [0u8; 12];
    getrandom::fill(&mut raw).expect("the OS random source works");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Turns state changes into webhook events (state change, plus alerts on the crossing and on recovery).
#[derive(Default)]
pub struct AlertTracker {
    alerted: HashMap<TenantId, bool>,
}

impl AlertTracker {
    /// The events one state change produces.
    pub fn events_for(&mut self, c: &StateChange) -> Vec<WebhookEvent> {
        let base = |kind| WebhookEvent {
            id: event_id(),
            kind,
            tenant_id: c.tenant_id.clone(),
            from: None,
            state: c.to,
            reason: c.reason.clone(),
            consecutive_failures: c.consecutive_failures,
            at_ms: c.at_ms,
        };
        let mut out = vec![WebhookEvent { from: Some(c.from), ..base("session.state_changed") }];
        let alerted = self.alerted.entry(c.tenant_id.clone()).or_default();
        if !*alerted && c.consecutive_failures > ALERT_AFTER_FAILURES {
            *alerted = true;
            out.push(base("alert.failing"));
        } else if *alerted && c.to == SessionState::Open {
            *alerted = false;
            out.push(base("alert.recovered"));
        }
        if c.to.is_terminal() {
            self.alerted.remove(&c.tenant_id);
        }
        out
    }
}

struct Queue {
    items: Mutex<VecDeque<(String, Vec<u8>)>>,
    ready: Notify,
}

impl Queue {
    async fn push(&self, id: String, body: Vec<u8>) {
        let mut items = self.items.lock().await;
        if items.len() >= QUEUE_LIMIT {
            items.pop_front();
            metrics::counter!("wakeeper_webhook_dropped_total").increment(1);
            tracing::warn!("webhook queue full; dropped the oldest event");
        }
        items.push_back((id, body));
        self.ready.notify_one();
    }
}

/// The delivery queues of the configured URLs, for events that are no session's state change (the host's
/// own alerts). Cheap to clone; with no URL configured, events go nowhere.
#[derive(Clone, Default)]
pub struct Webhooks {
    queues: Arc<Vec<Arc<Queue>>>,
}

impl Webhooks {
    /// Queues one signed event (`id` its idempotency key, `body` its JSON) for every URL.
    pub async fn send(&self, id: &str, body: Vec<u8>) {
        for q in self.queues.iter() {
            q.push(id.to_owned(), body.clone()).await;
        }
    }
}

/// Starts delivery of `changes` to `urls`. Returns at once (the handle queues further events on the same
/// URLs); runs until the channel closes.
pub fn start(
    mut changes: broadcast::Receiver<StateChange>,
    urls: Vec<String>,
    signer: Option<Signer>,
    dead_letters: Option<Outbox>,
) -> Webhooks {
    let Some(signer) = signer.filter(|_| !urls.is_empty()) else {
        return Webhooks::default();
    };
    let secret = Arc::new(signer);
    let http = webhook_client();
    let queues: Vec<Arc<Queue>> = urls
        .into_iter()
        .map(|url| {
            let q = Arc::new(Queue { items: Mutex::new(VecDeque::new()), ready: Notify::new() });
            tokio::spawn(deliver(url, q.clone(), http.clone(), secret.clone(), dead_letters.clone()));
            q
        })
        .collect();
    let handle = Webhooks { queues: Arc::new(queues.clone()) };
    tokio::spawn(async move {
        let mut tracker = AlertTracker::default();
        loop {
            let change = match changes.recv().await {
                Ok(c) => c,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "webhook fan-out fell behind; state events dropped");
                    metrics::counter!("wakeeper_webhook_dropped_total").increment(n);
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            for event in tracker.events_for(&change) {
                let body = serde_json::to_vec(&event).expect("event serializes");
                for q in &queues {
                    q.push(event.id.clone(), body.clone()).await;
                }
            }
        }
    });
    handle
}

/// The HTTP client of every webhook delivery: bounded in time, and never following a redirect (a redirect
/// would carry the signed body somewhere the operator did not name).
pub(crate) fn webhook_client() -> reqwest::Client {
    wakeeper_shared::tls::http_client()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client builds")
}

/// Delivers `q`'s events to `url` in order, retrying each until it is answered; an event refused for good (a
/// 4xx other than 408 and 429) goes to the outbox's dead letters instead of holding the queue.
async fn deliver(url: String, q: Arc<Queue>, http: reqwest::Client, secret: Arc<Signer>, dead: Option<Outbox>) {
    loop {
        let next = q.items.lock().await.front().cloned();
        let Some((id, body)) = next else {
            q.ready.notified().await;
            continue;
        };
        let mut delay = Duration::from_millis(200);
        loop {
            let mut request = http.post(&url).header("content-type", "application/json");
            for (name, value) in secret.headers(&id, unix_seconds(), &body) {
                request = request.header(name, value);
            }
            let sent = request.body(body.clone()).send().await;
            match sent {
                Ok(r) if r.status().is_success() => break,
                Ok(r) if is_permanent_refusal(r.status().as_u16()) => {
                    let body = String::from_utf8_lossy(&body).into_owned();
                    match &dead {
                        Some(outbox) => {
                            outbox.dead_letter_event(id.clone(), body, url.clone(), r.status().as_u16()).await
                        }
                        None => {
                            tracing::warn!(status = r.status().as_u16(), event_id = %id, "webhook refused an event for good; dropped")
                        }
                    }
                    break;
                }
                Ok(r) => tracing::warn!(status = r.status().as_u16(), "webhook refused; retrying"),
                Err(e) => tracing::warn!(error = %e.without_url(), "webhook unreachable; retrying"),
            }
            metrics::counter!("wakeeper_webhook_retries_total").increment(1);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
        metrics::counter!("wakeeper_webhook_delivered_total").increment(1);
        let mut items = q.items.lock().await;
        if items.front().is_some_and(|(i, _)| *i == id) {
            items.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(to: SessionState, failures: u32) -> StateChange {
        StateChange {
            tenant_id: TenantId::parse("t").unwrap(),
            from: SessionState::Connecting,
            to,
            reason: None,
            consecutive_failures: failures,
            at_ms: 0,
        }
    }

    #[test]
    fn alerts_fire_once_past_three_and_on_recovery() {
        let mut t = AlertTracker::default();
        let kinds = |evs: Vec<WebhookEvent>| evs.into_iter().map(|e| e.kind).collect::<Vec<_>>();
        assert_eq!(kinds(t.events_for(&change(SessionState::Backoff, 3))), ["session.state_changed"]);
        assert_eq!(kinds(t.events_for(&change(SessionState::Backoff, 4))), ["session.state_changed", "alert.failing"]);
        assert_eq!(kinds(t.events_for(&change(SessionState::Backoff, 5))), ["session.state_changed"]);
        assert_eq!(kinds(t.events_for(&change(SessionState::Open, 5))), ["session.state_changed", "alert.recovered"]);
        assert_eq!(kinds(t.events_for(&change(SessionState::Open, 0))), ["session.state_changed"]);
    }
}
