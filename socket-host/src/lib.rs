//! # socket-host
//!
//! The always-on wakeeper host: one supervised WhatsApp Web client per tenant.
//!
//! # Layout
//! - [`config`]: flags and `WAKEEPER_*` variables.
//! - [`api`]: the HTTP surface (`/health`, control API, metrics, dashboard).
//! - [`transport`]: the engine's WebSocket transport and HTTP client.

pub mod api;
pub mod config;
pub mod transport;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

/// Serves the host's HTTP surface on `listener` until `shutdown` resolves.
pub async fn run(listener: TcpListener, state: Arc<api::AppState>, shutdown: impl Future<Output = ()> + Send + 'static)
-> std::io::Result<()> {
    axum::serve(listener, api::router(state)).with_graceful_shutdown(shutdown).await
}
