//! The restore function's settings, read once at cold start from `WAKEEPER_*` variables (a lookup function,
//! so tests pass a map). A missing or malformed setting fails the cold start, not an invocation. The hosts'
//! and the table's settings are read as both functions read them ([`wakeeper_shared::lambda::config`]).
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
//! | `WAKEEPER_AWS_*_TIMEOUT_MS` | 3000, 5000, 15000 | connect, attempt and operation timeouts of AWS calls ([`wakeeper_shared::aws`]) |
//! | `WAKEEPER_LOG` | `info` | log filter |

use std::time::Duration;

use wakeeper_shared::aws::AwsTimeouts;
use wakeeper_shared::lambda::{HostsConfig, TableConfig, number};
use wakeeper_shared::restore::RestoreLimits;

/// Everything the function needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The hosts: URLs in shard order, the control token, the per-attempt timeout.
    pub hosts: HostsConfig,
    /// The tenant table.
    pub table: TableConfig,
    /// Concurrency and time reserve of the fan-out.
    pub limits: RestoreLimits,
    /// Timeouts of every AWS call.
    pub aws: AwsTimeouts,
}

impl Config {
    /// Reads every setting through `get` (`std::env::var` in the function).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let hosts = HostsConfig::from_lookup(&get)?;
        let table = TableConfig::from_lookup(&get)?;
        let concurrency = number(&get, "WAKEEPER_RESTORE_CONCURRENCY", 16usize)?.max(1);
        // A call in flight may take three attempts plus their backoff; it must finish inside the reserve.
        let default_reserve = hosts.timeout.as_secs() * 3 + 5;
        let reserve = Duration::from_secs(number(&get, "WAKEEPER_RESTORE_RESERVE_S", default_reserve)?);
        let aws = AwsTimeouts::from_lookup(&get).map_err(anyhow::Error::msg)?;
        Ok(Self { hosts, table, limits: RestoreLimits { concurrency, reserve, ..RestoreLimits::default() }, aws })
    }
}

#[cfg(test)]
mod tests {
    use wakeeper_shared::lambda::Secret;
    use wakeeper_shared::lambda::config::lookup_in;

    use super::*;

    const BASE: &[(&str, &str)] = &[
        ("WAKEEPER_HOST_URLS", "http://10.0.0.1:8080,http://10.0.0.2:8080"),
        ("WAKEEPER_CONTROL_TOKEN_SECRET_ARN", "arn:aws:secretsmanager:us-east-1:123456789012:secret:tok-AbCdEf"),
        ("WAKEEPER_DYNAMODB_TABLE", "tenants"),
    ];

    #[test]
    fn reads_a_complete_configuration_with_defaults() {
        let c = Config::from_lookup(lookup_in(BASE)).unwrap();
        assert_eq!(c.hosts.urls.len(), 2);
        assert!(matches!(c.hosts.token, Secret::SecretArn(_)));
        assert_eq!(c.table.name, "tenants");
        assert_eq!(c.hosts.timeout, Duration::from_secs(10));
        assert_eq!(c.limits.concurrency, 16);
        assert_eq!(c.limits.reserve, Duration::from_secs(35));
    }

    #[test]
    fn refuses_what_is_missing_or_ambiguous() {
        for missing in ["WAKEEPER_HOST_URLS", "WAKEEPER_CONTROL_TOKEN_SECRET_ARN", "WAKEEPER_DYNAMODB_TABLE"] {
            let pairs: Vec<_> = BASE.iter().copied().filter(|(k, _)| *k != missing).collect();
            let err = Config::from_lookup(lookup_in(&pairs)).unwrap_err().to_string();
            assert!(err.contains("required"), "{missing}: {err}");
        }
        let mut both = BASE.to_vec();
        both.push(("WAKEEPER_CONTROL_TOKEN", "plain-token-value"));
        let err = Config::from_lookup(lookup_in(&both)).unwrap_err().to_string();
        assert!(err.contains("not both") && !err.contains("plain-token-value"), "{err}");
        let mut bad = BASE.to_vec();
        bad.push(("WAKEEPER_RESTORE_CONCURRENCY", "many"));
        assert!(Config::from_lookup(lookup_in(&bad)).is_err());
    }

    #[test]
    fn a_token_value_is_never_printed() {
        let c = Config::from_lookup(lookup_in(&[
            ("WAKEEPER_HOST_URLS", "http://127.0.0.1:1"),
            ("WAKEEPER_CONTROL_TOKEN", "s3cr3t-token"),
            ("WAKEEPER_DYNAMODB_TABLE", "t"),
        ]))
        .unwrap();
        assert!(!format!("{c:?}").contains("s3cr3t"));
        assert_eq!(c.hosts.token, Secret::Value("s3cr3t-token".into()));
    }
}
