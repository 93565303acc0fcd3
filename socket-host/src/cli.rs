//! The `socket-host` command line: one flag per [`SETTINGS`] entry (each also read from its `WAKEEPER_*`
//! variable; the flag wins) and the sub-commands. The values then go through [`Config::from_lookup`].

use std::collections::HashMap;
use std::ffi::OsString;

use clap::{Arg, ArgMatches, FromArgMatches, Subcommand};

use crate::config::{Config, SETTINGS};

/// What to do.
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
    /// The data key: its fingerprint, and rotation to a new key.
    #[command(subcommand)]
    Keys(crate::key_rotation::KeysCommand),
    /// Link a new number on the running host: shows the QR code here (and a pairing code with --phone) and
    /// waits for the scan.
    Link(crate::operator::LinkArgs),
    /// Print the running host's sessions as a table.
    Sessions(crate::operator::SessionsArgs),
    /// Print the control API's OpenAPI 3.1 description (what `GET /openapi.json` serves and
    /// `docs/openapi.json` holds).
    Openapi,
}

/// A parsed command line.
#[derive(Debug)]
pub struct Cli {
    /// The host's settings.
    pub config: Config,
    /// The sub-command (`serve` when none is given).
    pub command: Command,
}

const ABOUT: &str = "The socket host: keeps one WhatsApp Web session per tenant alive.";

/// The clap command: every setting as a flag with its variable, then the sub-commands.
pub fn command() -> clap::Command {
    let mut cmd = clap::Command::new("socket-host").version(env!("CARGO_PKG_VERSION")).args_override_self(true);
    for s in SETTINGS {
        // Where the host is and its token may come before or after a sub-command (`socket-host link --tenant a
        // --listen ..`); the other settings only before it, where no sub-command's own flags can clash.
        let global = matches!(
            s.var,
            "WAKEEPER_LISTEN" | "WAKEEPER_CONTROL_TOKEN" | "WAKEEPER_CONTROL_TOKEN_FILE" | "WAKEEPER_DATA_DIR"
        );
        let mut arg = Arg::new(s.var).long(s.flag).env(s.var).help(s.help).global(global);
        if let Some(default) = s.default {
            arg = arg.default_value(default);
        }
        if s.secret {
            arg = arg.hide_env_values(true);
        }
        cmd = cmd.arg(arg);
    }
    Command::augment_subcommands(cmd).about(ABOUT)
}

impl Cli {
    /// Parses the process's arguments and environment; prints help or the error and exits on failure.
    pub fn parse() -> Self {
        Self::try_parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// Parses `args` (the first is the program name) and the process environment.
    pub fn try_parse_from<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let matches = command().try_get_matches_from(args)?;
        let config = config_from(&matches)?;
        let command = match matches.subcommand_name() {
            None => Command::Serve,
            Some(_) => Command::from_arg_matches(&matches)?,
        };
        Ok(Self { config, command })
    }
}

fn config_from(matches: &ArgMatches) -> Result<Config, clap::Error> {
    let values: HashMap<&str, String> =
        SETTINGS.iter().filter_map(|s| matches.get_one::<String>(s.var).map(|v| (s.var, v.clone()))).collect();
    Config::from_lookup(|var| values.get(var).cloned())
        .map_err(|e| clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{e}\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_sub_command_is_serve_with_the_defaults() {
        let cli = Cli::try_parse_from(["socket-host", "--data-dir", "/tmp/x"]).unwrap();
        assert!(matches!(cli.command, Command::Serve));
        assert_eq!(cli.config.data_dir, std::path::PathBuf::from("/tmp/x"));
    }

    #[test]
    fn flags_set_the_config_and_the_last_one_wins() {
        let cli = Cli::try_parse_from([
            "socket-host",
            "--lease-ttl-s",
            "5",
            "--lease-ttl-s",
            "7",
            "--restore-on-start",
            "false",
            "restore",
            "a",
            "b",
        ])
        .unwrap();
        assert_eq!(cli.config.lease_ttl_s, 7);
        assert!(!cli.config.restore_on_start);
        assert!(matches!(cli.command, Command::Restore { ref tenant_ids } if tenant_ids == &["a", "b"]));
    }

    #[test]
    fn operator_commands_take_settings_before_or_after_the_sub_command() {
        let after =
            ["socket-host", "link", "--tenant", "cantina-1", "--phone", "15551234567", "--listen", "127.0.0.1:9"];
        let cli = Cli::try_parse_from(after).unwrap();
        assert_eq!(cli.config.listen.to_string(), "127.0.0.1:9");
        let Command::Link(args) = cli.command else { panic!("link") };
        assert_eq!((args.tenant.as_str(), args.phone.as_deref()), ("cantina-1", Some("15551234567")));
        let before = ["socket-host", "--listen", "127.0.0.1:9", "sessions", "--tenant", "cantina-1"];
        let cli = Cli::try_parse_from(before).unwrap();
        assert_eq!(cli.config.listen.to_string(), "127.0.0.1:9");
        assert!(matches!(cli.command, Command::Sessions(ref a) if a.tenant.as_deref() == Some("cantina-1")));
        assert!(Cli::try_parse_from(["socket-host", "link"]).is_err(), "--tenant is required");
        // Every sub-command's flags still parse beside the global ones (clap checks for clashes here).
        command().debug_assert();
    }

    #[test]
    fn a_bad_flag_value_is_a_clear_error() {
        let e = Cli::try_parse_from(["socket-host", "--connect-burst", "many"]).unwrap_err();
        assert!(e.to_string().contains("WAKEEPER_CONNECT_BURST"), "{e}");
    }

    #[test]
    fn help_lists_every_setting_and_never_a_secret_value() {
        let help = command().render_long_help().to_string();
        for s in SETTINGS {
            assert!(help.contains(&format!("--{}", s.flag)), "--{} missing from --help", s.flag);
        }
        assert!(help.contains("import"));
    }
}
