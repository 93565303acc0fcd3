//! # socket-host
//!
//! The always-on wakeeper host: one supervised WhatsApp Web client per tenant.
//!
//! # Layout
//! - [`app`]: builds a whole host from its configuration and serves it.
//! - [`cli`]: the command line: a flag per setting, the sub-commands.
//! - [`operator`]: `socket-host link` (QR code in the terminal) and `socket-host sessions` against a running host.
//! - [`config`]: the settings, built from a lookup of `WAKEEPER_*` names (the environment, flags or a map).
//! - [`store_probe`]: the `stores_reachable` readiness condition (both stores answered since start).
//! - [`stores`]: opens the data key and the credential and tenant stores the configuration names.
//! - [`http`]: the HTTP server under it: header-read timeout, connection cap, graceful shutdown.
//! - [`access_log`]: one log line per API request, and the `x-request-id` it carries both ways.
//! - [`api`]: the HTTP surface (`/health`, `/ready`, control API, metrics, dashboard).
//! - [`telemetry`]: the Prometheus series (HELP, TYPE, histogram buckets, process metrics), all registered.
//! - [`readiness`]: the named conditions behind `GET /ready` (restore finished, disk writable, ...).
//! - [`disk_health`]: local disk faults reported once, probed with backoff and recovered in place.
//! - [`host`]: every tenant's session and the operations on them (ensure, stop, reconnect, shutdown).
//! - [`session`]: the per-tenant supervisor: lease, engine store, one client per connect attempt, backoff,
//!   and linking a new number ([`session::link`]: QR code as SVG, pairing code, outcome).
//! - [`restore_on_start`]: restore every desired tenant on start, in the shared restore order.
//! - [`tenant_opener`]: opens a tenant for its session: the start-up rule on its working copy, opened once,
//!   then the engine store over it.
//! - [`tenant_gates`]: one lock per tenant around the steps that take its lease outside a session.
//! - [`sweep_timer`]: the health sweep run inside the host on a timer (one-machine use).
//! - [`governor`]: the host-wide pacing of connect attempts.
//! - [`webhooks`]: signed state-change and alert events to the configured URLs.
//! - [`messages`]: received messages into the outbox before the engine acks them; validated sends, typing.
//! - [`outbox`]: the durable, bounded outbox of message events and its per-URL at-least-once delivery.
//! - [`transport`]: the engine's WebSocket transport and HTTP client.
//! - [`engine_store`]: the engine's `Backend` over a tenant's local working copy.
//! - [`replicator`]: ordered, batched replication of engine writes to the credential store.
//!
//! The library surface is what `main`, the bench and the tests drive: `app`, `cli`, `config`, `api`, `host`,
//! `session`, `governor`, `engine_store`, `replicator`, `transport`, `import` and [`run`]; the rest is
//! `pub(crate)`.

pub(crate) mod access_log;
pub mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod disk_health;
pub mod engine_store;
pub mod governor;
pub mod host;
pub mod http;
pub mod import;
pub mod key_check;
pub mod key_rotation;
pub(crate) mod messages;
pub mod operator;
pub(crate) mod outbox;
pub mod readiness;
pub mod replicator;
pub(crate) mod restore_on_start;
pub mod session;
pub(crate) mod store_probe;
pub(crate) mod stores;
pub(crate) mod sweep_timer;
pub mod telemetry;
pub(crate) mod tenant_gates;
pub(crate) mod tenant_opener;
pub mod transport;
pub(crate) mod webhooks;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

/// Serves the host's HTTP surface on `listener` until `shutdown` resolves, with the default
/// [`http::HttpLimits`].
pub async fn run(
    listener: TcpListener,
    state: Arc<api::AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    http::serve(listener, api::router(state), http::HttpLimits::default(), shutdown).await
}
