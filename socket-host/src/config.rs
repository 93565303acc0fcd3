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
}

impl Config {
    /// The configuration with every default (as on a machine with no `WAKEEPER_*` set), rooted at `data_dir`.
    pub fn defaults_in(data_dir: impl Into<PathBuf>) -> Self {
        let mut cli = Cli::parse_from(["socket-host"]);
        cli.config.data_dir = data_dir.into();
        cli.config
    }
}
