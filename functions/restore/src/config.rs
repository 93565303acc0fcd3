//! The restore function's settings, read once at cold start from `WAKEEPER_*` variables (a lookup function,
//! so tests pass a map). A missing or malformed setting fails the cold start, not an invocation.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `WAKEEPER_HOST_URLS` | required | control-API base URLs, comma-separated, in shard order |
//! | `WAKEEPER_CONTROL_TOKEN` | | the bearer token itself (local runs) |
//! | `WAKEEPER_CONTROL_TOKEN_SECRET_ARN` | | or: a Secrets Manager secret whose string is the token (AWS) |
//! | `WAKEEPER_DYNAMODB_TABLE` | required | the tenant table |
//! | `WAKEEPER_DYNAMODB_ENDPOINT` | | DynamoDB endpoint override (DynamoDB Local; never in AWS) |
//! | `WAKEEPER_HOST_TIMEOUT_S` | `10` | per-attempt timeout of a control-API call (3 attempts) |
//! | `WAKEEPER_RESTORE_CONCURRENCY` | `16` | ensure calls in flight at once |
//! | `WAKEEPER_RESTORE_RESERVE_S` | 3 x timeout + 5 | no new call starts with less time than this left |
//! | `WAKEEPER_LOG` | `info` | log filter |

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use wakeeper_shared::restore_fanout::RestoreLimits;
use wakeeper_shared::sweep::parse_host_urls;

/// A secret given either as its value or as where to fetch it. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub enum Secret {
    /// The value itself.
    Value(String),
    /// A Secrets Manager secret id (ARN) whose string is the value.
    SecretArn(String),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Value(_) => f.write_str("Secret::Value(<redacted>)"),
            Secret::SecretArn(arn) => write!(f, "Secret::SecretArn({arn})"),
        }
    }
}

impl Secret {
    /// The secret named by variable `value_var` or `arn_var` (not both); `None` when neither is set.
    pub fn from_lookup(
        get: &impl Fn(&str) -> Option<String>,
        value_var: &str,
        arn_var: &str,
    ) -> anyhow::Result<Option<Self>> {
        let value = get(value_var).filter(|v| !v.trim().is_empty());
        let arn = get(arn_var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        match (value, arn) {
            (Some(_), Some(_)) => bail!("set {value_var} or {arn_var}, not both"),
            (Some(v), None) => Ok(Some(Secret::Value(v.trim().to_owned()))),
            (None, Some(a)) if a.starts_with("arn:") => Ok(Some(Secret::SecretArn(a))),
            (None, Some(_)) => bail!("{arn_var} must be a Secrets Manager ARN"),
            (None, None) => Ok(None),
        }
    }
}

/// Everything the function needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Control-API base URLs in shard order.
    pub host_urls: Vec<String>,
    /// The control API's bearer token.
    pub token: Secret,
    /// The tenant table.
    pub table: String,
    /// DynamoDB endpoint override (local runs).
    pub dynamodb_endpoint: Option<String>,
    /// Per-attempt timeout of a control-API call.
    pub host_timeout: Duration,
    /// Concurrency and time reserve of the fan-out.
    pub limits: RestoreLimits,
}

fn number<T: FromStr>(get: &impl Fn(&str) -> Option<String>, var: &str, default: T) -> anyhow::Result<T> {
    match get(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => v.parse().ok().with_context(|| format!("{var} must be a non-negative whole number")),
    }
}

impl Config {
    /// Reads every setting through `get` (`std::env::var` in the function).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let urls = get("WAKEEPER_HOST_URLS").context("WAKEEPER_HOST_URLS is required")?;
        let host_urls = parse_host_urls(&urls).map_err(|e| anyhow::anyhow!("WAKEEPER_HOST_URLS: {e}"))?;
        let token = Secret::from_lookup(&get, "WAKEEPER_CONTROL_TOKEN", "WAKEEPER_CONTROL_TOKEN_SECRET_ARN")?
            .context("WAKEEPER_CONTROL_TOKEN or WAKEEPER_CONTROL_TOKEN_SECRET_ARN is required")?;
        let table = get("WAKEEPER_DYNAMODB_TABLE")
            .filter(|t| !t.trim().is_empty())
            .context("WAKEEPER_DYNAMODB_TABLE is required")?;
        let dynamodb_endpoint = get("WAKEEPER_DYNAMODB_ENDPOINT").filter(|e| !e.trim().is_empty());
        let host_timeout = Duration::from_secs(number(&get, "WAKEEPER_HOST_TIMEOUT_S", 10u64)?.max(1));
        let concurrency = number(&get, "WAKEEPER_RESTORE_CONCURRENCY", 16usize)?.max(1);
        // A call in flight may take three attempts plus their backoff; it must finish inside the reserve.
        let default_reserve = host_timeout.as_secs() * 3 + 5;
        let reserve = Duration::from_secs(number(&get, "WAKEEPER_RESTORE_RESERVE_S", default_reserve)?);
        Ok(Self {
            host_urls,
            token,
            table,
            dynamodb_endpoint,
            host_timeout,
            limits: RestoreLimits { concurrency, reserve, ..RestoreLimits::default() },
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    const BASE: &[(&str, &str)] = &[
        ("WAKEEPER_HOST_URLS", "http://10.0.0.1:8080,http://10.0.0.2:8080"),
        ("WAKEEPER_CONTROL_TOKEN_SECRET_ARN", "arn:aws:secretsmanager:us-east-1:123456789012:secret:tok-AbCdEf"),
        ("WAKEEPER_DYNAMODB_TABLE", "tenants"),
    ];

    #[test]
    fn reads_a_complete_configuration_with_defaults() {
        let c = Config::from_lookup(lookup(BASE)).unwrap();
        assert_eq!(c.host_urls.len(), 2);
        assert!(matches!(c.token, Secret::SecretArn(_)));
        assert_eq!(c.table, "tenants");
        assert_eq!(c.host_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.concurrency, 16);
        assert_eq!(c.limits.reserve, Duration::from_secs(35));
    }

    #[test]
    fn refuses_what_is_missing_or_ambiguous() {
        for missing in ["WAKEEPER_HOST_URLS", "WAKEEPER_CONTROL_TOKEN_SECRET_ARN", "WAKEEPER_DYNAMODB_TABLE"] {
            let pairs: Vec<_> = BASE.iter().copied().filter(|(k, _)| *k != missing).collect();
            let err = Config::from_lookup(lookup(&pairs)).unwrap_err().to_string();
            assert!(err.contains("required"), "{missing}: {err}");
        }
        let mut both = BASE.to_vec();
        both.push(("WAKEEPER_CONTROL_TOKEN", "plain-token-value"));
        let err = Config::from_lookup(lookup(&both)).unwrap_err().to_string();
        assert!(err.contains("not both") && !err.contains("plain-token-value"), "{err}");
        let mut bad = BASE.to_vec();
        bad.push(("WAKEEPER_RESTORE_CONCURRENCY", "many"));
        assert!(Config::from_lookup(lookup(&bad)).is_err());
    }

    #[test]
    fn a_token_value_is_never_printed() {
        let c = Config::from_lookup(lookup(&[
            ("WAKEEPER_HOST_URLS", "http://127.0.0.1:1"),
            ("WAKEEPER_CONTROL_TOKEN", "s3cr3t-token"),
            ("WAKEEPER_DYNAMODB_TABLE", "t"),
        ]))
        .unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert_eq!(c.token, Secret::Value("s3cr3t-token".into()));
    }
}
