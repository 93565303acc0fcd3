//! The signed-webhook alert sink: each alert POSTed as JSON, signed as the host signs its own events.

use std::time::Duration;

use async_trait::async_trait;

use super::{AlertError, AlertMessage, AlertSink};
use crate::webhook::{Signer, unix_seconds};

/// POSTs each alert as JSON, signed with HMAC-SHA256. Retries connection failures and 5xx a few times within
/// a few seconds (the sweep must end well inside its two minutes); a 4xx is final.
pub struct WebhookAlerts {
    http: reqwest::Client,
    url: String,
    secret: Signer,
    attempts: u32,
}

impl WebhookAlerts {
    /// A sink posting to `url`, signing with `secret`.
    pub fn new(url: String, secret: &str) -> Result<Self, AlertError> {
        let secret = Signer::new(secret).map_err(AlertError)?;
        let http = crate::tls::http_client()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| AlertError(format!("webhook client: {e}")))?;
        Ok(Self { http, url, secret, attempts: 3 })
    }
}

#[async_trait]
impl AlertSink for WebhookAlerts {
    async fn send(&self, alert: &AlertMessage) -> Result<(), AlertError> {
        let body = serde_json::to_vec(alert).map_err(|e| AlertError(e.to_string()))?;
        let mut last = String::new();
        for attempt in 0..self.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            let mut request = self.http.post(&self.url).header("content-type", "application/json");
            for (name, value) in self.secret.headers(&alert.id, unix_seconds(), &body) {
                request = request.header(name, value);
            }
            let sent = request.body(body.clone()).send().await;
            match sent {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) if r.status().is_server_error() => last = format!("webhook answered {}", r.status().as_u16()),
                Ok(r) => return Err(AlertError(format!("webhook refused the alert ({})", r.status().as_u16()))),
                // Without the URL: it may carry a receiver's token in its query.
                Err(e) => last = format!("webhook unreachable: {}", e.without_url()),
            }
        }
        Err(AlertError(last))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::alerts::AlertEvent;
    use crate::domain::TenantId;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    /// A one-route HTTP/1.1 server on 127.0.0.1 that answers each request with the next status of `statuses`
    /// and keeps what it received (headers lowercased, body).
    async fn receiver(statuses: Vec<u16>) -> (String, Arc<Mutex<Vec<(Vec<(String, String)>, Vec<u8>)>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let seen = got.clone();
        tokio::spawn(async move {
            for status in statuses {
                let (sock, _) = listener.accept().await.unwrap();
                let mut reader = BufReader::new(sock);
                let mut headers = Vec::new();
                let mut line = String::new();
                reader.read_line(&mut line).await.unwrap();
                loop {
                    line.clear();
                    reader.read_line(&mut line).await.unwrap();
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    let (k, v) = l.split_once(':').unwrap();
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
                }
                let len: usize =
                    headers.iter().find(|(k, _)| k == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
                let mut body = vec![0u8; len];
                reader.read_exact(&mut body).await.unwrap();
                seen.lock().unwrap().push((headers, body));
                let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                reader.get_mut().write_all(answer.as_bytes()).await.unwrap();
            }
        });
        (url, got)
    }

    fn alert() -> AlertMessage {
        AlertMessage::new(
            AlertEvent::TenantFailing {
                tenant_id: TenantId::parse("pizzeria-1").unwrap(),
                consecutive_failures: 4,
                state: None,
                reason: Some("connect refused (503)".into()),
            },
            1_800_000_000_000,
        )
    }

    #[tokio::test]
    async fn posts_the_alert_signed_and_retries_a_5xx() {
        let (url, got) = receiver(vec![503, 204]).await;
        let sink = WebhookAlerts::new(url, "hook-secret").unwrap();
        let msg = alert();
        sink.send(&msg).await.unwrap();
        let got = got.lock().unwrap();
        assert_eq!(got.len(), 2, "one retry after the 503");
        let (headers, body) = &got[1];
        let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        assert_eq!(header("x-wakeeper-signature"), Some(crate::webhook::sign(b"hook-secret", body)));
        assert_eq!(header("x-wakeeper-event-id"), Some(msg.id.clone()));
        assert_eq!(header("webhook-id"), Some(msg.id.clone()));
        let ts: u64 = header("webhook-timestamp").unwrap().parse().unwrap();
        let signer = Signer::new("hook-secret").unwrap();
        assert_eq!(header("webhook-signature"), Some(signer.standard_signature(&msg.id, ts, body)));
        let parsed: AlertMessage = serde_json::from_slice(body).unwrap();
        assert_eq!(parsed, msg);
    }

    #[tokio::test]
    async fn a_4xx_is_final() {
        let (url, got) = receiver(vec![403, 204]).await;
        let sink = WebhookAlerts::new(url, "s").unwrap();
        let err = sink.send(&alert()).await.unwrap_err();
        assert!(err.0.contains("403"), "{err}");
        assert_eq!(got.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_webhook_fails_without_naming_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook?token=receiver-secret", listener.local_addr().unwrap());
        drop(listener);
        let sink = WebhookAlerts { attempts: 1, ..WebhookAlerts::new(url, "s").unwrap() };
        let err = sink.send(&alert()).await.unwrap_err();
        assert!(!err.0.contains("receiver-secret"), "{err}");
    }
}
