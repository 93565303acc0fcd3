//! Alerts the sweep raises: what they say ([`AlertEvent`], [`AlertMessage`]), where they go ([`AlertSink`]):
//! the log, several sinks at once, a signed webhook (features `client` and `webhook`) and an SNS topic
//! (feature `sns`).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::domain::{SessionState, TenantId, UnixMillis};

#[cfg(feature = "sns")]
mod sns_sink;
#[cfg(all(feature = "client", feature = "webhook"))]
mod webhook_sink;

#[cfg(feature = "sns")]
pub use sns_sink::SnsAlerts;
#[cfg(all(feature = "client", feature = "webhook"))]
pub use webhook_sink::WebhookAlerts;

/// What an alert is about. Serialized with the same `type` names and field names as the host's own webhook
/// events (`socket-host/src/webhooks.rs`), so one receiver handles both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum AlertEvent {
    /// A desired tenant has failed more sweeps in a row than the policy allows.
    #[serde(rename = "alert.failing")]
    TenantFailing {
        /// The tenant.
        tenant_id: TenantId,
        /// Consecutive failed sweeps, this one included.
        consecutive_failures: u32,
        /// The session's state on the host.
        state: Option<SessionState>,
        /// The host's last error for the session, in words (never a secret).
        reason: Option<String>,
    },
    /// A tenant that had alerted is healthy again.
    #[serde(rename = "alert.recovered")]
    TenantRecovered {
        /// The tenant.
        tenant_id: TenantId,
    },
    /// The host (or one host of the fleet) did not answer; nothing was marked.
    #[serde(rename = "alert.host_unreachable")]
    HostUnreachable {
        /// Why, in words.
        reason: String,
    },
    /// A host reports a fault of its own (such as a wrong data key) that an operator must fix; raised once
    /// while it lasts.
    #[serde(rename = "alert.host_error")]
    HostError {
        /// The fault's code (`data_key_mismatch`).
        code: String,
        /// What is wrong, in words.
        reason: String,
    },
}

/// An alert as delivered: the JSON body of a webhook, the message of an SNS notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertMessage {
    /// Unique id: the receiver's idempotency key (also sent as `X-Wakeeper-Event-Id`).
    pub id: String,
    /// Who raised it (`health-sweep`), so a receiver can tell it from the host's own events.
    pub source: String,
    /// When the sweep decided it.
    pub at_ms: UnixMillis,
    /// What happened.
    #[serde(flatten)]
    pub event: AlertEvent,
}

impl AlertMessage {
    /// An alert raised by the sweep at `at_ms`, with a fresh id.
    pub fn new(event: AlertEvent, at_ms: UnixMillis) -> Self {
        let mut raw = [0u8; 12];
        // Without OS randomness the id only needs to differ between alerts of one run.
        if getrandom::fill(&mut raw).is_err() {
            raw[..8].copy_from_slice(&at_ms.to_be_bytes());
        }
        let id = raw.iter().map(|b| format!("{b:02x}")).collect();
        Self { id, source: "health-sweep".into(), at_ms, event }
    }

    /// One line for a person (an SNS subject, an e-mail's first line); at most 100 characters.
    pub fn summary(&self) -> String {
        let mut s = match &self.event {
            AlertEvent::TenantFailing { tenant_id, consecutive_failures, .. } => {
                format!("wakeeper: tenant {tenant_id} failing ({consecutive_failures} sweeps in a row)")
            }
            AlertEvent::TenantRecovered { tenant_id } => format!("wakeeper: tenant {tenant_id} recovered"),
            AlertEvent::HostUnreachable { .. } => "wakeeper: host unreachable".to_owned(),
            AlertEvent::HostError { code, .. } => format!("wakeeper: host error {code}"),
        };
        s.truncate(100);
        s
    }
}

/// An alert could not be delivered.
#[derive(Debug, Clone, thiserror::Error)]
#[error("alert not delivered: {0}")]
pub struct AlertError(pub String);

/// Where alerts go (a webhook, an SNS topic, the log). Delivery failures are counted by the sweep, never fatal:
/// failing the run would make the scheduler retry it and count every tenant's failure twice.
#[async_trait]
pub trait AlertSink: Send + Sync {
    /// Delivers one alert.
    async fn send(&self, alert: &AlertMessage) -> Result<(), AlertError>;
}

/// Alerts written to the log only: the default when no webhook or topic is configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogAlerts;

#[async_trait]
impl AlertSink for LogAlerts {
    async fn send(&self, alert: &AlertMessage) -> Result<(), AlertError> {
        let body = serde_json::to_string(alert).unwrap_or_default();
        warn!(alert = %body, "{}", alert.summary());
        Ok(())
    }
}

/// Every sink of a list gets every alert; the send fails if any sink failed (the others still got it).
#[derive(Default)]
pub struct AlertFanout {
    sinks: Vec<Box<dyn AlertSink>>,
}

impl AlertFanout {
    /// A fan-out over `sinks`.
    pub fn new(sinks: Vec<Box<dyn AlertSink>>) -> Self {
        Self { sinks }
    }

    /// How many sinks there are.
    pub fn len(&self) -> usize {
        self.sinks.len()
    }

    /// Whether there is no sink at all.
    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }
}

#[async_trait]
impl AlertSink for AlertFanout {
    async fn send(&self, alert: &AlertMessage) -> Result<(), AlertError> {
        let results = futures_util::future::join_all(self.sinks.iter().map(|s| s.send(alert))).await;
        let failures: Vec<String> = results.into_iter().filter_map(Result::err).map(|e| e.0).collect();
        if failures.is_empty() { Ok(()) } else { Err(AlertError(failures.join("; "))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_messages_serialize_flat_and_summarize_briefly() {
        let msg = AlertMessage::new(
            AlertEvent::TenantFailing {
                tenant_id: TenantId::parse("t-1").unwrap(),
                consecutive_failures: 4,
                state: Some(SessionState::Backoff),
                reason: None,
            },
            5,
        );
        let v = serde_json::to_value(&msg).unwrap();
        assert_eq!(v["source"], "health-sweep");
        assert_eq!(v["type"], "alert.failing");
        assert_eq!(v["id"].as_str().unwrap().len(), 24);
        assert_ne!(AlertMessage::new(msg.event.clone(), 5).id, msg.id);
        assert_eq!(v["tenant_id"], "t-1");
        assert_eq!(v["consecutive_failures"], 4);
        assert_eq!(v["state"], "backoff");
        let back: AlertMessage = serde_json::from_value(v).unwrap();
        assert_eq!(back, msg);
        assert!(msg.summary().contains("t-1") && msg.summary().len() <= 100);
    }
}
