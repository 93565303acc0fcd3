//! The host's configuration: one typed struct, from flags or `WAKEEPER_*` variables (flags win).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line (for the cloud).
    Json,
}

/// The socket host: keeps one WhatsApp Web session per tenant alive.
#[derive(Debug, Parser)]
#[command(name = "socket-host", version, about, args_override_self = true)]
pub struct Cli {
    /// Host settings.
    #[command(flatten)]
    pub config: Config,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Sub-commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the host (the default).
    Serve,
    /// Take over tenants from a Baileys host: auth state and tenant list, without a re-scan.
    #[command(subcommand)]
    Import(crate::import::ImportCommand),
    /// Ask the running host (at `--listen`) to restore every desired tenant, or the given ones.
    Restore {
        /// Tenants to restore (default: every desired tenant).
        tenant_ids: Vec<String>,
    },
    /// Ask the running host (at `--listen`) to run one health sweep now and print its report.
    Sweep,
}

/// Settings shared by every sub-command.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address of the control API, `/health`, `/metrics` and the dashboard.
    #[arg(long, env = "WAKEEPER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Directory of the embedded stores, the local working copies, the data key and the generated token.
    #[arg(long, env = "WAKEEPER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Log format.
    #[arg(long, env = "WAKEEPER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// WhatsApp Web WebSocket URL (the fake server's in tests).
    #[arg(long, env = "WAKEEPER_WA_URL", default_value = "wss://web.whatsapp.com/ws/chat")]
    pub wa_url: String,

    /// Bearer token of the control API. Prefer the file variant; without either, a token is generated
    /// into `<data dir>/control.token` (mode 0600) on first start.
    #[arg(long, env = "WAKEEPER_CONTROL_TOKEN", hide_env_values = true)]
    pub control_token: Option<String>,

    /// File holding the control token.
    #[arg(long, env = "WAKEEPER_CONTROL_TOKEN_FILE")]
    pub control_token_file: Option<PathBuf>,

    /// This host's id (lease owner). Default: generated once into `<data dir>/host-id`.
    #[arg(long, env = "WAKEEPER_HOST_ID")]
    pub host_id: Option<String>,

    /// The 32-byte data key sealing every stored record. Default: `<data dir>/keys/data.key`, created 0600.
    #[arg(long, env = "WAKEEPER_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// Google Cloud project of the Firestore credential store; unset = the embedded store.
    #[arg(long, env = "WAKEEPER_FIRESTORE_PROJECT")]
    pub firestore_project: Option<String>,

    /// Prefix of the Firestore collections of the credential store (`<prefix>tenants/...`); keeps
    /// deployments sharing one database apart.
    #[arg(long, env = "WAKEEPER_FIRESTORE_PREFIX", default_value = "wakeeper_")]
    pub firestore_prefix: String,

    /// DynamoDB table of tenants; unset = the embedded store.
    #[arg(long, env = "WAKEEPER_DYNAMODB_TABLE")]
    pub dynamodb_table: Option<String>,

    /// DynamoDB endpoint override (DynamoDB Local, moto).
    #[arg(long, env = "WAKEEPER_DYNAMODB_ENDPOINT")]
    pub dynamodb_endpoint: Option<String>,

    /// Host-wide connect attempts per second (0 = unlimited).
    #[arg(long, env = "WAKEEPER_CONNECT_RATE", default_value_t = 200.0)]
    pub connect_rate: f64,

    /// Connect attempts allowed in one burst before the rate applies (still paced by the in-flight bound).
    #[arg(long, env = "WAKEEPER_CONNECT_BURST", default_value_t = 500)]
    pub connect_burst: u32,

    /// Handshakes in flight at once (0 = unlimited).
    #[arg(long, env = "WAKEEPER_CONNECT_IN_FLIGHT", default_value_t = 64)]
    pub connect_in_flight: usize,

    /// Lease lifetime in seconds; renewed every third of it. A new host takes a tenant from a host that
    /// died without releasing only after this.
    #[arg(long, env = "WAKEEPER_LEASE_TTL_S", default_value_t = 30)]
    pub lease_ttl_s: u64,

    /// Longest a graceful shutdown may take (stop clients, flush replication, release leases).
    #[arg(long, env = "WAKEEPER_SHUTDOWN_DEADLINE_S", default_value_t = 20)]
    pub shutdown_deadline_s: u64,

    /// Restore every desired tenant on start.
    #[arg(long, env = "WAKEEPER_RESTORE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub restore_on_start: bool,

    /// Comma-separated URLs that receive state-change, alert and message events.
    #[arg(long, env = "WAKEEPER_WEBHOOK_URLS", value_delimiter = ',')]
    pub webhook_urls: Vec<String>,

    /// Secret of the HMAC-SHA256 signature of webhook bodies.
    #[arg(long, env = "WAKEEPER_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// Most message events the durable outbox (`<data dir>/outbox.redb`) keeps while webhook URLs do not
    /// answer; past it the oldest are dropped (`wakeeper_outbox_dropped_total`, a warning in the log).
    #[arg(long, env = "WAKEEPER_OUTBOX_MAX", default_value_t = crate::outbox::DEFAULT_MAX_EVENTS)]
    pub outbox_max: u64,

    /// Seconds of silence after which an open link is treated as half-open and replaced (keep above 30: the
    /// engine pings an idle link every 15-30 s).
    #[arg(long, env = "WAKEEPER_SILENT_AFTER_S", default_value_t = 45)]
    pub silent_after_s: u64,

    /// Seconds between in-host health sweeps (0 = off; the cloud runs the sweep as a function instead).
    #[arg(long, env = "WAKEEPER_SWEEP_INTERVAL_S", default_value_t = 120)]
    pub sweep_interval_s: u64,
}

impl Config {
    /// The configuration with every default (as on a machine with no `WAKEEPER_*` set), rooted at `data_dir`.
    pub fn defaults_in(data_dir: impl Into<PathBuf>) -> Self {
        let mut cli = Cli::parse_from(["socket-host"]);
        cli.config.data_dir = data_dir.into();
        cli.config
    }
}
