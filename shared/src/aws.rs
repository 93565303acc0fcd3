//! The one way every AWS client of the project is configured: the environment's region and credentials (what
//! Lambda, ECS and a laptop's profile give), and timeouts on every call. The SDK's own default is no operation
//! timeout at all, so a DynamoDB endpoint that accepts the connection and never answers would hold a lease
//! renewal (or a function's whole invocation) forever.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `WAKEEPER_AWS_CONNECT_TIMEOUT_MS` | `3000` | TCP and TLS connect to an AWS endpoint |
//! | `WAKEEPER_AWS_ATTEMPT_TIMEOUT_MS` | `5000` | one attempt of a call (the SDK retries up to 3 attempts) |
//! | `WAKEEPER_AWS_OPERATION_TIMEOUT_MS` | `15000` | one call, all its attempts and backoff included |

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, SdkConfig};

/// The connect timeout's variable.
pub const CONNECT_TIMEOUT_VAR: &str = "WAKEEPER_AWS_CONNECT_TIMEOUT_MS";
/// The per-attempt timeout's variable.
pub const ATTEMPT_TIMEOUT_VAR: &str = "WAKEEPER_AWS_ATTEMPT_TIMEOUT_MS";
/// The per-operation timeout's variable.
pub const OPERATION_TIMEOUT_VAR: &str = "WAKEEPER_AWS_OPERATION_TIMEOUT_MS";

/// The timeouts of every AWS call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AwsTimeouts {
    /// TCP and TLS connect.
    pub connect: Duration,
    /// One attempt.
    pub attempt: Duration,
    /// One operation, every attempt included.
    pub operation: Duration,
}

impl Default for AwsTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_millis(3_000),
            attempt: Duration::from_millis(5_000),
            operation: Duration::from_millis(15_000),
        }
    }
}

impl AwsTimeouts {
    /// Reads the three variables through `get` (an unset or empty one keeps its default). The error names the
    /// variable.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let read = |var: &str, default: Duration| -> Result<Duration, String> {
            match get(var).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()) {
                None => Ok(default),
                Some(raw) => match raw.parse::<u64>() {
                    Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
                    _ => Err(format!("{var}: `{raw}` is not a positive number of milliseconds")),
                },
            }
        };
        let d = Self::default();
        let t = Self {
            connect: read(CONNECT_TIMEOUT_VAR, d.connect)?,
            attempt: read(ATTEMPT_TIMEOUT_VAR, d.attempt)?,
            operation: read(OPERATION_TIMEOUT_VAR, d.operation)?,
        };
        if t.attempt > t.operation {
            return Err(format!("{ATTEMPT_TIMEOUT_VAR} is longer than {OPERATION_TIMEOUT_VAR}"));
        }
        Ok(t)
    }

    /// The SDK's form of these timeouts.
    pub fn timeout_config(&self) -> TimeoutConfig {
        TimeoutConfig::builder()
            .connect_timeout(self.connect)
            .operation_attempt_timeout(self.attempt)
            .operation_timeout(self.operation)
            .build()
    }
}

/// The AWS configuration of the environment with `timeouts` on every call, at `endpoint` when given (a local
/// server). Loads from the environment only; makes no request.
pub async fn sdk_config(timeouts: &AwsTimeouts, endpoint: Option<&str>) -> SdkConfig {
    crate::tls::install_crypto_provider();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).timeout_config(timeouts.timeout_config());
    if let Some(url) = endpoint {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from(pairs: &[(&str, &str)]) -> Result<AwsTimeouts, String> {
        let map: HashMap<&str, &str> = pairs.iter().copied().collect();
        AwsTimeouts::from_lookup(|v| map.get(v).map(|s| s.to_string()))
    }

    #[test]
    fn defaults_bound_every_call() {
        let t = from(&[]).unwrap();
        assert_eq!(t, AwsTimeouts::default());
        let c = t.timeout_config();
        assert_eq!(c.connect_timeout(), Some(Duration::from_secs(3)));
        assert_eq!(c.operation_attempt_timeout(), Some(Duration::from_secs(5)));
        assert_eq!(c.operation_timeout(), Some(Duration::from_secs(15)));
    }

    #[test]
    fn variables_set_them_and_bad_values_name_the_variable() {
        let t =
            from(&[(CONNECT_TIMEOUT_VAR, "250"), (OPERATION_TIMEOUT_VAR, "60000"), (ATTEMPT_TIMEOUT_VAR, "")]).unwrap();
        assert_eq!(
            (t.connect, t.attempt, t.operation),
            (Duration::from_millis(250), Duration::from_secs(5), Duration::from_secs(60))
        );
        for bad in ["0", "soon", "-1"] {
            let e = from(&[(ATTEMPT_TIMEOUT_VAR, bad)]).unwrap_err();
            assert!(e.starts_with(ATTEMPT_TIMEOUT_VAR), "{e}");
        }
        assert!(from(&[(ATTEMPT_TIMEOUT_VAR, "20000")]).unwrap_err().contains("longer than"));
    }
}
