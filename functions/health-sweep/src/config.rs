//! The health-sweep function's settings, read once at cold start from `WAKEEPER_*` variables (a lookup
//! function, so tests pass a map). A missing or malformed setting fails the cold start, not an invocation. The
//! hosts' and the table's settings are read as both functions read them ([`wakeeper_shared::lambda::config`]).
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `WAKEEPER_HOST_URLS` | required | control-API base URLs, comma-separated, in shard order |
//! | `WAKEEPER_CONTROL_TOKEN` | | the bearer token itself (local runs) |
//! | `WAKEEPER_CONTROL_TOKEN_SECRET_ARN` | | or: a Secrets Manager secret whose string is the token (AWS) |
//! | `WAKEEPER_DYNAMODB_TABLE` | required | the tenant table |
//! | `WAKEEPER_DYNAMODB_ENDPOINT` | | DynamoDB endpoint override (DynamoDB Local; never in AWS) |
//! | `WAKEEPER_HOST_TIMEOUT_S` | `10` | per-attempt timeout of a control-API call (3 attempts) |
//! | `WAKEEPER_ALERT_WEBHOOK_URL` | | alerts are POSTed here, signed (`X-Wakeeper-Signature: sha256=<hex>`) |
//! | `WAKEEPER_ALERT_WEBHOOK_ALLOW_HTTP` | `false` | allow a plain `http://` URL other than loopback |
//! | `WAKEEPER_ALERT_WEBHOOK_SECRET` | | the signing secret (local runs); required with a webhook URL |
//! | `WAKEEPER_ALERT_WEBHOOK_SECRET_ARN` | | or: a Secrets Manager secret holding it (AWS) |
//! | `WAKEEPER_ALERT_TOPIC_ARN` | | alerts are also published to this SNS topic |
//! | `WAKEEPER_SWEEP_STUCK_AFTER_S` | `300` | connecting/backoff this long: ask for a reconnect |
//! | `WAKEEPER_SWEEP_ALERT_AFTER` | `3` | alert when a tenant fails more sweeps in a row than this |
//! | `WAKEEPER_SWEEP_SILENT_AFTER_S` | `120` | open but nothing received this long: reconnect (0 = off) |
//! | `WAKEEPER_SWEEP_CONCURRENCY` | `16` | host calls and writes in flight at once |
//! | `WAKEEPER_AWS_*_TIMEOUT_MS` | 3000, 5000, 15000 | connect, attempt and operation timeouts of AWS calls ([`wakeeper_shared::aws`]) |
//! | `WAKEEPER_LOG` | `info` | log filter |

use std::time::Duration;

use anyhow::bail;
use wakeeper_shared::aws::AwsTimeouts;
use wakeeper_shared::domain::reconcile::Policy;
use wakeeper_shared::lambda::{ConfigError, HostsConfig, Secret, TableConfig, number};
use wakeeper_shared::sweep::SweepPolicy;

/// Where alerts go besides the log.
#[derive(Debug, Clone, Default)]
pub struct AlertConfig {
    /// Webhook URL and its signing secret.
    pub webhook: Option<(String, Secret)>,
    /// SNS topic ARN.
    pub topic_arn: Option<String>,
}

/// Everything the function needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The hosts: URLs in shard order, the control token, the per-attempt timeout.
    pub hosts: HostsConfig,
    /// The tenant table.
    pub table: TableConfig,
    /// Where alerts go.
    pub alerts: AlertConfig,
    /// The sweep's knobs.
    pub policy: SweepPolicy,
    /// Timeouts of every AWS call.
    pub aws: AwsTimeouts,
}

impl Config {
    /// Reads every setting through `get` (`std::env::var` in the function).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let hosts = HostsConfig::from_lookup(&get)?;
        let table = TableConfig::from_lookup(&get)?;
        let alerts = AlertConfig::from_lookup(&get)?;
        let policy = sweep_policy(&get)?;
        let aws = AwsTimeouts::from_lookup(&get).map_err(anyhow::Error::msg)?;
        Ok(Self { hosts, table, alerts, policy, aws })
    }
}

impl AlertConfig {
    /// Reads the webhook and topic settings through `get`.
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let webhook_url = get("WAKEEPER_ALERT_WEBHOOK_URL").map(|u| u.trim().to_owned()).filter(|u| !u.is_empty());
        let webhook_secret =
            Secret::from_lookup(get, "WAKEEPER_ALERT_WEBHOOK_SECRET", "WAKEEPER_ALERT_WEBHOOK_SECRET_ARN")?;
        let webhook = match (webhook_url, webhook_secret) {
            (Some(url), Some(secret)) => {
                let allow_http = get("WAKEEPER_ALERT_WEBHOOK_ALLOW_HTTP").is_some_and(|v| v.trim() == "true");
                if let Err(why) = wakeeper_shared::webhook::check_url(&url, allow_http) {
                    bail!("WAKEEPER_ALERT_WEBHOOK_URL: {why} (WAKEEPER_ALERT_WEBHOOK_ALLOW_HTTP=true allows it)");
                }
                Some((url, secret))
            }
            // Unsigned alerts cannot be told from forged ones by the receiver.
            (Some(_), None) => bail!("WAKEEPER_ALERT_WEBHOOK_URL needs WAKEEPER_ALERT_WEBHOOK_SECRET(_ARN)"),
            (None, _) => None,
        };
        let topic_arn = get("WAKEEPER_ALERT_TOPIC_ARN").map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
        if topic_arn.as_deref().is_some_and(|t| !t.starts_with("arn:")) {
            bail!("WAKEEPER_ALERT_TOPIC_ARN must be an SNS topic ARN");
        }
        Ok(Self { webhook, topic_arn })
    }
}

/// The sweep's knobs, each defaulting to the shared [`SweepPolicy`]'s.
fn sweep_policy(get: &impl Fn(&str) -> Option<String>) -> Result<SweepPolicy, ConfigError> {
    let defaults = SweepPolicy::default();
    let silent_s = number(get, "WAKEEPER_SWEEP_SILENT_AFTER_S", defaults.silent_after.map_or(0, |d| d.as_secs()))?;
    Ok(SweepPolicy {
        reconcile: Policy {
            stuck_after_ms: number(get, "WAKEEPER_SWEEP_STUCK_AFTER_S", defaults.reconcile.stuck_after_ms / 1000)?
                .saturating_mul(1000),
            alert_after_failures: number(get, "WAKEEPER_SWEEP_ALERT_AFTER", defaults.reconcile.alert_after_failures)?,
        },
        silent_after: (silent_s > 0).then(|| Duration::from_secs(silent_s)),
        concurrency: number(get, "WAKEEPER_SWEEP_CONCURRENCY", defaults.concurrency)?.max(1),
        ..defaults
    })
}

#[cfg(test)]
mod tests {
    use wakeeper_shared::lambda::config::lookup_in;

    use super::*;

    const BASE: &[(&str, &str)] = &[
        ("WAKEEPER_HOST_URLS", "https://host.internal"),
        ("WAKEEPER_CONTROL_TOKEN", "local-token"),
        ("WAKEEPER_DYNAMODB_TABLE", "tenants"),
    ];

    #[test]
    fn defaults_follow_the_shared_policy() {
        let c = Config::from_lookup(lookup_in(BASE)).unwrap();
        assert_eq!(c.policy, SweepPolicy::default());
        assert!(c.alerts.webhook.is_none() && c.alerts.topic_arn.is_none());
        assert!(!format!("{c:?}").contains("local-token"));
    }

    #[test]
    fn knobs_and_alert_targets_are_read() {
        let mut pairs = BASE.to_vec();
        pairs.extend([
            ("WAKEEPER_ALERT_WEBHOOK_URL", "https://alerts.example/hook"),
            ("WAKEEPER_ALERT_WEBHOOK_SECRET_ARN", "arn:aws:secretsmanager:us-east-1:123456789012:secret:hook"),
            ("WAKEEPER_ALERT_TOPIC_ARN", "arn:aws:sns:us-east-1:123456789012:wakeeper-alerts"),
            ("WAKEEPER_SWEEP_STUCK_AFTER_S", "60"),
            ("WAKEEPER_SWEEP_ALERT_AFTER", "5"),
            ("WAKEEPER_SWEEP_SILENT_AFTER_S", "0"),
        ]);
        let c = Config::from_lookup(lookup_in(&pairs)).unwrap();
        assert_eq!(c.policy.reconcile, Policy { stuck_after_ms: 60_000, alert_after_failures: 5 });
        assert_eq!(c.policy.silent_after, None);
        let (url, secret) = c.alerts.webhook.unwrap();
        assert_eq!(url, "https://alerts.example/hook");
        assert!(matches!(secret, Secret::SecretArn(_)));
        assert!(c.alerts.topic_arn.is_some());
    }

    #[test]
    fn a_webhook_without_a_secret_is_refused() {
        let mut pairs = BASE.to_vec();
        pairs.push(("WAKEEPER_ALERT_WEBHOOK_URL", "https://alerts.example/hook"));
        assert!(Config::from_lookup(lookup_in(&pairs)).unwrap_err().to_string().contains("SECRET"));
        let mut pairs = BASE.to_vec();
        pairs.push(("WAKEEPER_ALERT_TOPIC_ARN", "wakeeper-alerts"));
        assert!(Config::from_lookup(lookup_in(&pairs)).is_err());
    }
}
