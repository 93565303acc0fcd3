//! The host's configuration: one typed struct built from a lookup of `WAKEEPER_*` names, so the process
//! environment, the command line ([`crate::cli`]) and a test's map all go through the same parsing.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use wakeeper_shared::aws::AwsTimeouts;
use wakeeper_shared::crypto::StaticKey;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line (for the cloud).
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        match raw {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("`{other}` is not a log format (text or json)")),
        }
    }
}

/// One setting: its variable, its flag, its default and its help line.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    /// The environment variable (also the key of a lookup).
    pub var: &'static str,
    /// The long flag of `socket-host`, without the dashes.
    pub flag: &'static str,
    /// The value when nothing sets it; `None` = unset.
    pub default: Option<&'static str>,
    /// The `--help` line.
    pub help: &'static str,
    /// Its value is a secret: never shown by `--help` or `Debug`.
    pub secret: bool,
}

const fn setting(var: &'static str, flag: &'static str, default: Option<&'static str>, help: &'static str) -> Setting {
    Setting { var, flag, default, help, secret: false }
}

/// Every setting of the host, in `--help` order.
pub const SETTINGS: &[Setting] = &[
    setting(
        "WAKEEPER_LISTEN",
        "listen",
        Some("127.0.0.1:8080"),
        "Address of the control API, `/health`, `/metrics` and the dashboard",
    ),
    setting(
        "WAKEEPER_DATA_DIR",
        "data-dir",
        Some("./data"),
        "Directory of the embedded stores, the local working copies, the data key and the generated token",
    ),
    setting("WAKEEPER_LOG_FORMAT", "log-format", Some("text"), "Log format: text or json"),
    setting(
        "WAKEEPER_WA_URL",
        "wa-url",
        Some("wss://web.whatsapp.com/ws/chat"),
        "WhatsApp Web WebSocket URL (the fake server's in tests)",
    ),
    Setting {
        var: "WAKEEPER_CONTROL_TOKEN",
        flag: "control-token",
        default: None,
        help: "Bearer token of the control API. Prefer the file variant; without either, a token is generated \
               into `<data dir>/control.token` (mode 0600) on first start",
        secret: true,
    },
    setting("WAKEEPER_CONTROL_TOKEN_FILE", "control-token-file", None, "File holding the control token"),
    setting(
        "WAKEEPER_HOST_ID",
        "host-id",
        None,
        "This host's id (lease owner). Default: generated once into `<data dir>/host-id`",
    ),
    setting(
        "WAKEEPER_KEY_FILE",
        "key-file",
        None,
        "File holding the 32-byte data key sealing every stored record. Default (embedded credential store \
         only): `<data dir>/keys/data.key`, created 0600. With Firestore it must exist: a key is never generated",
    ),
    Setting {
        var: "WAKEEPER_DATA_KEY",
        flag: "data-key",
        default: None,
        help: "The data key as base64 of 32 bytes, for platforms whose secrets are variables (instead of \
               WAKEEPER_KEY_FILE). With Firestore one of the two must be set",
        secret: true,
    },
    Setting {
        var: "WAKEEPER_DATA_KEY_KMS",
        flag: "data-key-kms",
        default: None,
        help: "Or: the data key wrapped by AWS KMS (base64 of the ciphertext blob), unwrapped with KMS Decrypt at \
               start",
        secret: true,
    },
    setting("WAKEEPER_KMS_ENDPOINT", "kms-endpoint", None, "KMS endpoint override (a local server in tests)"),
    Setting {
        var: "WAKEEPER_DATA_KEY_PREVIOUS",
        flag: "data-key-previous",
        default: None,
        help: "While rotating the data key: the old key, base64. Records it sealed still open; everything \
               written is sealed with the current key (`socket-host keys rotate` re-seals the rest)",
        secret: true,
    },
    setting(
        "WAKEEPER_FIRESTORE_PROJECT",
        "firestore-project",
        None,
        "Google Cloud project of the Firestore credential store; unset = the embedded store",
    ),
    Setting {
        var: "WAKEEPER_FIRESTORE_CREDENTIALS",
        flag: "firestore-credentials",
        default: None,
        help: "The Firestore service account's JSON key itself (the key file's text), for platforms whose \
               secrets are variables. Unset: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, \
               the metadata server)",
        secret: true,
    },
    setting(
        "WAKEEPER_FIRESTORE_PREFIX",
        "firestore-prefix",
        Some("wakeeper_"),
        "Prefix of the Firestore collections of the credential store (`<prefix>tenants/...`); keeps \
         deployments sharing one database apart",
    ),
    setting("WAKEEPER_DYNAMODB_TABLE", "dynamodb-table", None, "DynamoDB table of tenants; unset = the embedded store"),
    setting(
        "WAKEEPER_DYNAMODB_ENDPOINT",
        "dynamodb-endpoint",
        None,
        "DynamoDB endpoint override (DynamoDB Local, moto)",
    ),
    setting(
        "WAKEEPER_AWS_CONNECT_TIMEOUT_MS",
        "aws-connect-timeout-ms",
        None,
        "Connect timeout of every AWS call (DynamoDB, KMS), in ms. Default 3000",
    ),
    setting(
        "WAKEEPER_AWS_ATTEMPT_TIMEOUT_MS",
        "aws-attempt-timeout-ms",
        None,
        "Timeout of one attempt of an AWS call, in ms (the SDK makes up to 3). Default 5000",
    ),
    setting(
        "WAKEEPER_AWS_OPERATION_TIMEOUT_MS",
        "aws-operation-timeout-ms",
        None,
        "Timeout of one AWS call, every attempt included, in ms. Default 15000",
    ),
    setting(
        "WAKEEPER_CONNECT_RATE",
        "connect-rate",
        Some("200"),
        "Host-wide connect attempts per second (0 = unlimited)",
    ),
    setting(
        "WAKEEPER_CONNECT_BURST",
        "connect-burst",
        Some("500"),
        "Connect attempts allowed in one burst before the rate applies (still paced by the in-flight bound)",
    ),
    setting(
        "WAKEEPER_CONNECT_IN_FLIGHT",
        "connect-in-flight",
        Some("64"),
        "Handshakes in flight at once (0 = unlimited)",
    ),
    setting(
        "WAKEEPER_LEASE_TTL_S",
        "lease-ttl-s",
        Some("30"),
        "Lease lifetime in seconds; renewed every third of it. A new host takes a tenant from a host that died \
         without releasing only after this",
    ),
    setting(
        "WAKEEPER_SHUTDOWN_DEADLINE_S",
        "shutdown-deadline-s",
        Some("20"),
        "Longest a graceful shutdown may take (stop clients, flush replication, release leases)",
    ),
    setting(
        "WAKEEPER_RESTORE_ON_START",
        "restore-on-start",
        Some("true"),
        "Restore every desired tenant on start (true or false)",
    ),
    setting(
        "WAKEEPER_WEBHOOK_URLS",
        "webhook-urls",
        None,
        "Comma-separated URLs that receive state-change, alert and message events",
    ),
    Setting {
        var: "WAKEEPER_WEBHOOK_SECRET",
        flag: "webhook-secret",
        default: None,
        help: "Secret of the HMAC-SHA256 signature of webhook bodies",
        secret: true,
    },
    setting(
        "WAKEEPER_WEBHOOK_ALLOW_HTTP",
        "webhook-allow-http",
        Some("false"),
        "Allow plain http:// webhook URLs other than loopback (a private network you vouch for); otherwise \
         https:// only",
    ),
    setting(
        "WAKEEPER_OUTBOX_MAX",
        "outbox-max",
        Some("100000"),
        "Most message events the durable outbox (`<data dir>/outbox.redb`) keeps while webhook URLs do not \
         answer; past it the oldest are dropped (`wakeeper_outbox_dropped_total`, a warning in the log)",
    ),
    setting(
        "WAKEEPER_SILENT_AFTER_S",
        "silent-after-s",
        Some("45"),
        "Seconds of silence after which an open link is treated as half-open and replaced (keep above 30: the \
         engine pings an idle link every 15-30 s)",
    ),
    setting(
        "WAKEEPER_SWEEP_INTERVAL_S",
        "sweep-interval-s",
        Some("120"),
        "Seconds between in-host health sweeps (0 = off; the cloud runs the sweep as a function instead)",
    ),
    setting(
        "WAKEEPER_HTTP_HEADER_TIMEOUT_S",
        "http-header-timeout-s",
        Some("10"),
        "Seconds a connection to the API may take to send a whole request head (after it opens, or idle after a \
         response) before it is closed",
    ),
    setting(
        "WAKEEPER_HTTP_MAX_CONNECTIONS",
        "http-max-connections",
        Some("1024"),
        "Most connections to the API open at once; more wait in the accept queue",
    ),
    setting(
        "WAKEEPER_DISK_PROBE_S",
        "disk-probe-s",
        Some("10"),
        "Seconds between write probes of the data dir while no disk fault is known, so a full disk shows on \
         /ready before a write has to fail (0 = off: faults are found by failed writes)",
    ),
];

/// A setting whose value does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    /// The variable.
    pub var: &'static str,
    /// What is wrong with its value (never the value of a secret).
    pub message: String,
}

/// Settings shared by every sub-command.
#[derive(Clone)]
pub struct Config {
    /// Address of the control API, `/health`, `/metrics` and the dashboard.
    pub listen: SocketAddr,
    /// Directory of the embedded stores, the local working copies, the data key and the generated token.
    pub data_dir: PathBuf,
    /// Log format.
    pub log_format: LogFormat,
    /// WhatsApp Web WebSocket URL.
    pub wa_url: String,
    /// Bearer token of the control API.
    pub control_token: Option<String>,
    /// File holding the control token.
    pub control_token_file: Option<PathBuf>,
    /// This host's id (lease owner).
    pub host_id: Option<String>,
    /// The data key file.
    pub key_file: Option<PathBuf>,
    /// The data key itself (`WAKEEPER_DATA_KEY`, base64); its `Debug` never shows it.
    pub data_key: Option<StaticKey>,
    /// The data key wrapped by KMS (`WAKEEPER_DATA_KEY_KMS`, base64 of the ciphertext blob).
    pub data_key_kms: Option<String>,
    /// KMS endpoint override.
    pub kms_endpoint: Option<String>,
    /// The key being rotated out (`WAKEEPER_DATA_KEY_PREVIOUS`): still opens, never seals.
    pub data_key_previous: Option<StaticKey>,
    /// Google Cloud project of the Firestore credential store; `None` = the embedded store.
    pub firestore_project: Option<String>,
    /// The Firestore service account's JSON key (`WAKEEPER_FIRESTORE_CREDENTIALS`); `None` = Application
    /// Default Credentials.
    pub firestore_credentials: Option<String>,
    /// Prefix of the Firestore collections.
    pub firestore_prefix: String,
    /// DynamoDB table of tenants; `None` = the embedded store.
    pub dynamodb_table: Option<String>,
    /// DynamoDB endpoint override.
    pub dynamodb_endpoint: Option<String>,
    /// Timeouts of every AWS call.
    pub aws_timeouts: AwsTimeouts,
    /// Host-wide connect attempts per second (0 = unlimited).
    pub connect_rate: f64,
    /// Connect attempts allowed in one burst.
    pub connect_burst: u32,
    /// Handshakes in flight at once (0 = unlimited).
    pub connect_in_flight: usize,
    /// Lease lifetime in seconds.
    pub lease_ttl_s: u64,
    /// Longest a graceful shutdown may take, in seconds.
    pub shutdown_deadline_s: u64,
    /// Restore every desired tenant on start.
    pub restore_on_start: bool,
    /// URLs that receive state-change, alert and message events.
    pub webhook_urls: Vec<String>,
    /// Secret of the HMAC-SHA256 signature of webhook bodies.
    pub webhook_secret: Option<String>,
    /// Allow plain `http://` webhook URLs other than loopback.
    pub webhook_allow_http: bool,
    /// Most message events the durable outbox keeps.
    pub outbox_max: u64,
    /// Seconds of silence after which an open link is replaced.
    pub silent_after_s: u64,
    /// Seconds between in-host health sweeps (0 = off).
    pub sweep_interval_s: u64,
    /// Seconds between write probes of the data dir while no disk fault is known (0 = off).
    pub disk_probe_s: u64,
    /// Seconds a connection may take to send a whole request head.
    pub http_header_timeout_s: u64,
    /// Most connections to the API open at once.
    pub http_max_connections: usize,
}

/// Reads settings by variable name: the lookup's value, else the default; an empty value counts as unset.
struct Reader<F> {
    lookup: F,
}

impl<F: Fn(&str) -> Option<String>> Reader<F> {
    fn raw(&self, var: &'static str) -> Option<String> {
        let default = SETTINGS.iter().find(|s| s.var == var).and_then(|s| s.default);
        (self.lookup)(var).filter(|v| !v.is_empty()).or_else(|| default.map(str::to_owned))
    }

    fn optional<T: FromStr>(&self, var: &'static str) -> Result<Option<T>, ConfigError>
    where
        T::Err: fmt::Display,
    {
        let Some(raw) = self.raw(var) else { return Ok(None) };
        raw.trim().parse().map(Some).map_err(|e| ConfigError { var, message: format!("{e}") })
    }

    fn required<T: FromStr>(&self, var: &'static str) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        self.optional(var)?.ok_or_else(|| ConfigError { var, message: "must be set".into() })
    }

    fn flag(&self, var: &'static str) -> Result<bool, ConfigError> {
        match self.raw(var).as_deref().map(str::trim) {
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => Err(ConfigError { var, message: format!("`{other}` is not true or false") }),
            None => Err(ConfigError { var, message: "must be set".into() }),
        }
    }

    fn list(&self, var: &'static str) -> Vec<String> {
        let raw = self.raw(var).unwrap_or_default();
        raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }
}

impl Config {
    /// Builds the configuration from `lookup` (a variable name to its value), with the defaults of
    /// [`SETTINGS`] for what it does not set.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let r = Reader { lookup };
        Ok(Self {
            listen: r.required("WAKEEPER_LISTEN")?,
            data_dir: r.required("WAKEEPER_DATA_DIR")?,
            log_format: r.required("WAKEEPER_LOG_FORMAT")?,
            wa_url: r.required("WAKEEPER_WA_URL")?,
            control_token: r.raw("WAKEEPER_CONTROL_TOKEN"),
            control_token_file: r.optional("WAKEEPER_CONTROL_TOKEN_FILE")?,
            host_id: r.raw("WAKEEPER_HOST_ID"),
            key_file: r.optional("WAKEEPER_KEY_FILE")?,
            data_key: r
                .raw("WAKEEPER_DATA_KEY")
                .map(|raw| StaticKey::from_base64(&raw))
                .transpose()
                .map_err(|e| ConfigError { var: "WAKEEPER_DATA_KEY", message: e.to_string() })?,
            data_key_kms: r.raw("WAKEEPER_DATA_KEY_KMS"),
            kms_endpoint: r.raw("WAKEEPER_KMS_ENDPOINT"),
            data_key_previous: r
                .raw("WAKEEPER_DATA_KEY_PREVIOUS")
                .map(|raw| StaticKey::from_base64(&raw))
                .transpose()
                .map_err(|e| ConfigError { var: "WAKEEPER_DATA_KEY_PREVIOUS", message: e.to_string() })?,
            firestore_project: r.raw("WAKEEPER_FIRESTORE_PROJECT"),
            firestore_credentials: r.raw("WAKEEPER_FIRESTORE_CREDENTIALS"),
            firestore_prefix: r.required("WAKEEPER_FIRESTORE_PREFIX")?,
            dynamodb_table: r.raw("WAKEEPER_DYNAMODB_TABLE"),
            dynamodb_endpoint: r.raw("WAKEEPER_DYNAMODB_ENDPOINT"),
            aws_timeouts: AwsTimeouts::from_lookup(|var| (r.lookup)(var))
                .map_err(|message| ConfigError { var: "WAKEEPER_AWS_*_TIMEOUT_MS", message })?,
            connect_rate: r.required("WAKEEPER_CONNECT_RATE")?,
            connect_burst: r.required("WAKEEPER_CONNECT_BURST")?,
            connect_in_flight: r.required("WAKEEPER_CONNECT_IN_FLIGHT")?,
            lease_ttl_s: r.required("WAKEEPER_LEASE_TTL_S")?,
            shutdown_deadline_s: r.required("WAKEEPER_SHUTDOWN_DEADLINE_S")?,
            restore_on_start: r.flag("WAKEEPER_RESTORE_ON_START")?,
            webhook_urls: r.list("WAKEEPER_WEBHOOK_URLS"),
            webhook_secret: r.raw("WAKEEPER_WEBHOOK_SECRET"),
            webhook_allow_http: r.flag("WAKEEPER_WEBHOOK_ALLOW_HTTP")?,
            outbox_max: r.required("WAKEEPER_OUTBOX_MAX")?,
            silent_after_s: r.required("WAKEEPER_SILENT_AFTER_S")?,
            sweep_interval_s: r.required("WAKEEPER_SWEEP_INTERVAL_S")?,
            disk_probe_s: r.required("WAKEEPER_DISK_PROBE_S")?,
            http_header_timeout_s: r.required("WAKEEPER_HTTP_HEADER_TIMEOUT_S")?,
            http_max_connections: r.required("WAKEEPER_HTTP_MAX_CONNECTIONS")?,
        })
    }

    /// The configuration with every default (as on a machine with no `WAKEEPER_*` set), rooted at `data_dir`.
    pub fn defaults_in(data_dir: impl Into<PathBuf>) -> Self {
        let mut config = Self::from_lookup(|_| None).expect("the defaults parse");
        config.data_dir = data_dir.into();
        config
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("log_format", &self.log_format)
            .field("wa_url", &self.wa_url)
            .field("control_token", &redacted(&self.control_token))
            .field("control_token_file", &self.control_token_file)
            .field("host_id", &self.host_id)
            .field("key_file", &self.key_file)
            .field("data_key", &self.data_key.as_ref().map(|_| "<redacted>"))
            .field("data_key_kms", &self.data_key_kms.as_ref().map(|_| "<redacted>"))
            .field("kms_endpoint", &self.kms_endpoint)
            .field("data_key_previous", &self.data_key_previous.as_ref().map(|_| "<redacted>"))
            .field("firestore_project", &self.firestore_project)
            .field("firestore_credentials", &redacted(&self.firestore_credentials))
            .field("firestore_prefix", &self.firestore_prefix)
            .field("dynamodb_table", &self.dynamodb_table)
            .field("dynamodb_endpoint", &self.dynamodb_endpoint)
            .field("aws_timeouts", &self.aws_timeouts)
            .field("connect_rate", &self.connect_rate)
            .field("connect_burst", &self.connect_burst)
            .field("connect_in_flight", &self.connect_in_flight)
            .field("lease_ttl_s", &self.lease_ttl_s)
            .field("shutdown_deadline_s", &self.shutdown_deadline_s)
            .field("restore_on_start", &self.restore_on_start)
            .field("webhook_urls", &self.webhook_urls)
            .field("webhook_secret", &redacted(&self.webhook_secret))
            .field("webhook_allow_http", &self.webhook_allow_http)
            .field("outbox_max", &self.outbox_max)
            .field("silent_after_s", &self.silent_after_s)
            .field("sweep_interval_s", &self.sweep_interval_s)
            .field("disk_probe_s", &self.disk_probe_s)
            .field("http_header_timeout_s", &self.http_header_timeout_s)
            .field("http_max_connections", &self.http_max_connections)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn from_map(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|var| map.get(var).cloned())
    }

    #[test]
    fn defaults_are_those_of_the_table() {
        let c = from_map(&[]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.wa_url, "wss://web.whatsapp.com/ws/chat");
        assert_eq!(c.firestore_prefix, "wakeeper_");
        assert_eq!((c.connect_rate, c.connect_burst, c.connect_in_flight), (200.0, 500, 64));
        assert_eq!((c.lease_ttl_s, c.shutdown_deadline_s), (30, 20));
        assert!(c.restore_on_start);
        assert_eq!(c.outbox_max, 100_000);
        assert_eq!((c.silent_after_s, c.sweep_interval_s), (45, 120));
        assert!(c.control_token.is_none() && c.firestore_project.is_none() && c.webhook_urls.is_empty());
    }

    #[test]
    fn a_map_sets_every_kind_of_value() {
        let c = from_map(&[
            ("WAKEEPER_LISTEN", "0.0.0.0:9000"),
            ("WAKEEPER_LOG_FORMAT", "json"),
            ("WAKEEPER_RESTORE_ON_START", "false"),
            ("WAKEEPER_WEBHOOK_URLS", "http://a/x, http://b/y,"),
            ("WAKEEPER_CONNECT_RATE", "0.5"),
            ("WAKEEPER_FIRESTORE_PROJECT", "proj"),
        ])
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.log_format, LogFormat::Json);
        assert!(!c.restore_on_start);
        assert_eq!(c.webhook_urls, ["http://a/x", "http://b/y"]);
        assert_eq!(c.connect_rate, 0.5);
        assert_eq!(c.firestore_project.as_deref(), Some("proj"));
    }

    #[test]
    fn an_empty_value_counts_as_unset() {
        let c = from_map(&[("WAKEEPER_LEASE_TTL_S", ""), ("WAKEEPER_DYNAMODB_TABLE", "")]).unwrap();
        assert_eq!(c.lease_ttl_s, 30);
        assert!(c.dynamodb_table.is_none());
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let e = from_map(&[("WAKEEPER_CONNECT_BURST", "lots")]).unwrap_err();
        assert_eq!(e.var, "WAKEEPER_CONNECT_BURST");
        let e = from_map(&[("WAKEEPER_RESTORE_ON_START", "maybe")]).unwrap_err();
        assert_eq!(e.var, "WAKEEPER_RESTORE_ON_START");
        let e = from_map(&[("WAKEEPER_LOG_FORMAT", "xml")]).unwrap_err();
        assert!(e.to_string().starts_with("WAKEEPER_LOG_FORMAT: "), "{e}");
    }

    /// Base64 of 32 bytes that spells `s3cret` in its text, so a leak of the value is seen.
    const DATA_KEY: &str = "s3cretAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

    #[test]
    fn debug_never_shows_secrets() {
        let c = from_map(&[
            ("WAKEEPER_CONTROL_TOKEN", "tok-s3cret"),
            ("WAKEEPER_WEBHOOK_SECRET", "hook-s3cret"),
            ("WAKEEPER_DATA_KEY", DATA_KEY),
            ("WAKEEPER_DATA_KEY_PREVIOUS", DATA_KEY),
            ("WAKEEPER_DATA_KEY_KMS", "kms-s3cret"),
            ("WAKEEPER_FIRESTORE_CREDENTIALS", r#"{"private_key": "s3cret"}"#),
        ])
        .unwrap();
        assert!(c.data_key.is_some());
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn a_bad_data_key_names_its_variable_and_not_its_value() {
        for bad in ["s3cret-but-not-base64!", "s3cretAAAAAAAAAAAAAAAA"] {
            let e = from_map(&[("WAKEEPER_DATA_KEY", bad)]).unwrap_err();
            assert_eq!(e.var, "WAKEEPER_DATA_KEY");
            assert!(!e.to_string().contains("s3cret"), "the error shows the value: {e}");
        }
    }

    #[test]
    fn the_data_key_is_a_secret_setting() {
        let s = SETTINGS.iter().find(|s| s.var == "WAKEEPER_DATA_KEY").unwrap();
        assert!(s.secret);
    }

    #[test]
    fn every_setting_is_documented_in_the_readme() {
        let readme = include_str!("../../README.md");
        for s in SETTINGS {
            assert!(readme.contains(&format!("`{}`", s.var)), "{} is missing from README.md", s.var);
        }
    }
}
