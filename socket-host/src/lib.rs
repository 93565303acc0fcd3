//! # socket-host
//!
//! The always-on wakeeper host: one supervised WhatsApp Web client per tenant.
//!
//! # Layout
//! - [`app`]: builds a whole host from its configuration and serves it.
//! - [`config`]: flags and `WAKEEPER_*` variables.
//! - [`api`]: the HTTP surface (`/health`, control API, metrics, dashboard).
//! - [`host`]: every tenant's session and the operations on them (ensure, stop, reconnect, shutdown).
//! - [`session`]: the per-tenant supervisor: lease, engine store, one client per connect attempt, backoff.
//! - [`restore`]: restore every desired tenant, most recently healthy first.
//! - [`engines`]: opens a tenant's engine store (hydrate, then the engine's backend over the working copy).
//! - [`sweeper`]: the health sweep run inside the host on a timer (one-machine use).
//! - [`link`]: what a link attempt of a new number shows (QR code as SVG, pairing code, outcome).
//! - [`governor`]: the host-wide pacing of connect attempts.
//! - [`webhooks`]: signed state-change and alert events to the configured URLs.
//! - [`messages`]: received messages into the outbox before the engine acks them; validated sends, typing.
//! - [`outbox`]: the durable, bounded outbox of message events and its per-URL at-least-once delivery.
//! - [`transport`]: the engine's WebSocket transport and HTTP client.
//! - [`engine_store`]: the engine's `Backend` over a tenant's local working copy.
//! - [`replicator`]: ordered, batched replication of engine writes to the credential store.

pub mod api;
pub mod app;
pub mod config;
pub mod engine_store;
pub mod engines;
pub mod governor;
pub mod host;
pub mod import;
pub mod link;
pub mod messages;
pub mod outbox;
pub mod replicator;
pub mod restore;
pub mod session;
pub mod sweeper;
pub mod transport;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

/// Serves the host's HTTP surface on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    state: Arc<api::AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, api::router(state)).with_graceful_shutdown(shutdown).await
}
