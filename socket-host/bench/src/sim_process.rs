//! The fake WhatsApp server (`wa-sim`) in its own process, and the calls the bench makes to its control API.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use base64::Engine as _;
use serde_json::json;
use wakeeper_shared::domain::{CredentialSnapshot, RecordKey, RecordKind, TenantId};

/// The simulator in its own process.
pub struct SimProcess {
    pub child: Child,
    pub ws_url: String,
    pub control: String,
    http: reqwest::Client,
}

impl SimProcess {
    pub fn spawn(bin: &Path, log: &Path) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let mut child = Command::new(bin)
            .args(["--addr", "127.0.0.1:0", "--control-addr", "127.0.0.1:0", "--backlog", "8192"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("sim stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).context("reading the sim's announcement")?;
        let info: serde_json::Value = serde_json::from_str(&line).context("the sim's announcement")?;
        Ok(Self {
            ws_url: info["ws_url"].as_str().context("ws_url")?.to_owned(),
            control: info["control_url"].as_str().context("control_url")?.to_owned(),
            child,
            http: wakeeper_shared::tls::http_client().timeout(Duration::from_secs(60)).build()?,
        })
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.control));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.with_context(|| format!("{method} {path}"))?;
        let status = res.status();
        let text = res.text().await?;
        ensure!(status.is_success(), "{method} {path}: {status} {text}");
        Ok(if text.is_empty() { serde_json::Value::Null } else { serde_json::from_str(&text)? })
    }

    /// Mints a paired device for `tenant`; returns its JID and credential snapshot.
    pub async fn mint(&self, tenant: &TenantId) -> anyhow::Result<(String, CredentialSnapshot)> {
        let v = self.call(reqwest::Method::POST, "/v1/devices", Some(json!({ "tenant": tenant.as_str() }))).await?;
        let mut snap =
            CredentialSnapshot { generation: v["snapshot"]["generation"].as_u64().unwrap_or(0), ..Default::default() };
        for r in v["snapshot"]["records"].as_array().context("records")? {
            let kind = RecordKind::parse(r["kind"].as_str().context("kind")?).context("record kind")?;
            let value = base64::engine::general_purpose::STANDARD.decode(r["value_b64"].as_str().context("value")?)?;
            snap.records.insert(RecordKey::new(kind, r["key"].as_str().context("key")?), value);
        }
        Ok((v["jid"].as_str().context("jid")?.to_owned(), snap))
    }

    pub async fn summary(&self) -> anyhow::Result<serde_json::Value> {
        self.call(reqwest::Method::GET, "/v1/summary", None).await
    }

    pub async fn attempts_per_second(&self) -> anyhow::Result<Vec<u64>> {
        let o = self.call(reqwest::Method::GET, "/v1/observations?devices=false", None).await?;
        Ok(o["attempts_per_second"].as_array().context("series")?.iter().filter_map(|v| v.as_u64()).collect())
    }

    /// The highest connect rate the server saw since its series had `before` entries.
    pub async fn peak_attempts_since(&self, before: usize) -> anyhow::Result<u64> {
        let series = self.attempts_per_second().await?;
        Ok(series[before.saturating_sub(1)..].iter().copied().max().unwrap_or(0))
    }
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
