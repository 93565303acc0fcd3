//! What both Lambda functions share besides the logic they run: telling their events apart, reading their
//! settings from a lookup function, and (feature `lambda`) what they build at cold start. Each function keeps
//! only its own settings, its handler and its `main`.
//!
//! # Layout
//! - [`event`]: a Scheduler event or a direct invoke ([`classify_event`]).
//! - [`config`]: numbers and [`Secret`]s from a lookup function; the hosts' and the tenant table's settings.
//! - [`cold_start`]: the AWS configuration, secrets from Secrets Manager, the tenant store, the host fleet,
//!   JSON logs, the runtime loop (feature `lambda`).

#[cfg(feature = "lambda")]
pub mod cold_start;
pub mod config;
pub mod event;

#[cfg(feature = "lambda")]
pub use cold_start::{FleetError, SecretError, aws_config_if, init_tracing, resolve_secret, serve};
pub use config::{ConfigError, HostsConfig, Secret, TableConfig, number};
pub use event::{EventError, Invocation, MAX_REQUEST_IDS, classify_event};
