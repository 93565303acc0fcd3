//! Reading a function's settings from a lookup function (`std::env::var` in the function, a map in tests):
//! whole numbers, secrets given as a value or a Secrets Manager ARN, and the two groups of settings every
//! function reads, the hosts ([`HostsConfig`]) and the tenant table ([`TableConfig`]).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::fleet::parse_host_urls;

/// A setting is missing or malformed. The message names the variable, never a secret's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Variable `var` as a number, or `default` when it is unset or blank.
pub fn number<T: FromStr>(get: &impl Fn(&str) -> Option<String>, var: &str, default: T) -> Result<T, ConfigError> {
    match get(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| ConfigError(format!("{var} must be a non-negative whole number"))),
    }
}

/// A lookup over fixed `(variable, value)` pairs, for tests and tools that hold settings in hand rather than in
/// the process environment.
pub fn lookup_in(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: std::collections::HashMap<String, String> =
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k| map.get(k).cloned()
}

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
    ) -> Result<Option<Self>, ConfigError> {
        let value = get(value_var).filter(|v| !v.trim().is_empty());
        let arn = get(arn_var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        match (value, arn) {
            (Some(_), Some(_)) => Err(ConfigError(format!("set {value_var} or {arn_var}, not both"))),
            (Some(v), None) => Ok(Some(Secret::Value(v.trim().to_owned()))),
            (None, Some(a)) if a.starts_with("arn:") => Ok(Some(Secret::SecretArn(a))),
            (None, Some(_)) => Err(ConfigError(format!("{arn_var} must be a Secrets Manager ARN"))),
            (None, None) => Ok(None),
        }
    }

    /// Whether reading the value needs AWS (a Secrets Manager fetch).
    pub fn needs_aws(&self) -> bool {
        matches!(self, Secret::SecretArn(_))
    }
}

/// Where a function finds the hosts and how it talks to them.
///
/// | variable | default | meaning |
/// |---|---|---|
/// | `WAKEEPER_HOST_URLS` | required | control-API base URLs, comma-separated, in shard order |
/// | `WAKEEPER_CONTROL_TOKEN` | | the bearer token itself (local runs) |
/// | `WAKEEPER_CONTROL_TOKEN_SECRET_ARN` | | or: a Secrets Manager secret whose string is the token (AWS) |
/// | `WAKEEPER_HOST_TIMEOUT_S` | `10` | per-attempt timeout of a control-API call (3 attempts) |
#[derive(Debug, Clone)]
pub struct HostsConfig {
    /// Control-API base URLs in shard order.
    pub urls: Vec<String>,
    /// The control API's bearer token.
    pub token: Secret,
    /// Per-attempt timeout of a control-API call.
    pub timeout: Duration,
}

impl HostsConfig {
    /// Reads the hosts' settings through `get`.
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let raw = get("WAKEEPER_HOST_URLS").ok_or_else(|| ConfigError("WAKEEPER_HOST_URLS is required".into()))?;
        let urls = parse_host_urls(&raw).map_err(|e| ConfigError(format!("WAKEEPER_HOST_URLS: {e}")))?;
        let token = Secret::from_lookup(get, "WAKEEPER_CONTROL_TOKEN", "WAKEEPER_CONTROL_TOKEN_SECRET_ARN")?
            .ok_or_else(|| {
                ConfigError("WAKEEPER_CONTROL_TOKEN or WAKEEPER_CONTROL_TOKEN_SECRET_ARN is required".into())
            })?;
        let timeout = Duration::from_secs(number(get, "WAKEEPER_HOST_TIMEOUT_S", 10u64)?.max(1));
        Ok(Self { urls, token, timeout })
    }
}

/// Where a function finds the tenant table.
///
/// | variable | default | meaning |
/// |---|---|---|
/// | `WAKEEPER_DYNAMODB_TABLE` | required | the tenant table |
/// | `WAKEEPER_DYNAMODB_ENDPOINT` | | DynamoDB endpoint override (DynamoDB Local; never in AWS) |
#[derive(Debug, Clone)]
pub struct TableConfig {
    /// The tenant table's name.
    pub name: String,
    /// DynamoDB endpoint override (local runs).
    pub endpoint: Option<String>,
}

impl TableConfig {
    /// Reads the table's settings through `get`.
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let name = get("WAKEEPER_DYNAMODB_TABLE")
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| ConfigError("WAKEEPER_DYNAMODB_TABLE is required".into()))?;
        let endpoint = get("WAKEEPER_DYNAMODB_ENDPOINT").filter(|e| !e.trim().is_empty());
        Ok(Self { name, endpoint })
    }

    /// Whether reaching the table needs the AWS configuration (the real DynamoDB, no endpoint override).
    pub fn needs_aws(&self) -> bool {
        self.endpoint.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_default_when_blank_and_refuse_words() {
        let get = lookup_in(&[("N", " 7 "), ("BLANK", "  "), ("WORD", "seven")]);
        assert_eq!(number(&get, "N", 1u32).unwrap(), 7);
        assert_eq!(number(&get, "BLANK", 1u32).unwrap(), 1);
        assert_eq!(number(&get, "UNSET", 2u32).unwrap(), 2);
        assert_eq!(number(&get, "WORD", 1u32).unwrap_err().0, "WORD must be a non-negative whole number");
        assert!(number(&lookup_in(&[("N", "-1")]), "N", 1u32).is_err());
    }

    #[test]
    fn a_secret_is_a_value_or_an_arn_and_its_value_never_prints() {
        let get = lookup_in(&[("V", " s3cr3t "), ("A", "arn:aws:secretsmanager:r:1:secret:x"), ("BAD", "name")]);
        let value = Secret::from_lookup(&get, "V", "UNSET").unwrap().unwrap();
        assert_eq!(value, Secret::Value("s3cr3t".into()));
        assert!(!format!("{value:?}").contains("s3cr3t") && !value.needs_aws());
        let arn = Secret::from_lookup(&get, "UNSET", "A").unwrap().unwrap();
        assert!(arn.needs_aws() && format!("{arn:?}").contains("arn:aws:secretsmanager"));
        assert!(Secret::from_lookup(&get, "UNSET", "ALSO_UNSET").unwrap().is_none());
        assert!(Secret::from_lookup(&get, "UNSET", "BAD").unwrap_err().0.contains("ARN"));
        let both = Secret::from_lookup(&get, "V", "A").unwrap_err().0;
        assert!(both.contains("not both") && !both.contains("s3cr3t"), "{both}");
    }
}
