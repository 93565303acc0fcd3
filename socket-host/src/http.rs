//! The HTTP server of the control API. `axum::serve` reads request headers with no time limit and accepts
//! any number of connections; the image listens on 0.0.0.0, so a client that opens connections and never
//! finishes a request (or keeps them idle) could hold the host's file descriptors. This server is axum's router
//! on hyper's HTTP/1 connection with:
//! - a header-read timeout (`WAKEEPER_HTTP_HEADER_TIMEOUT_S`): a connection that has not sent a whole request
//!   head that long after it opened, or after its previous response, is closed; idle keep-alive connections
//!   included;
//! - a cap on open connections (`WAKEEPER_HTTP_MAX_CONNECTIONS`): past it, new connections wait in the
//!   kernel's accept queue until one closes;
//! - a graceful shutdown: stop accepting, let requests in flight finish, close idle connections.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// The limits of the HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Longest wait for a whole request head.
    pub header_read_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self { header_read_timeout: Duration::from_secs(10), max_connections: 1024 }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting and returns once every
/// connection has closed (requests in flight finish; idle connections are closed at once). The caller bounds
/// how long it waits for that.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS) as u32;
    let slots = Arc::new(Semaphore::new(max as usize));
    let (closing, closing_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: not fatal; back off a little.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            let mut conn = pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = closing.wait_for(|c| *c) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = closing.send(true);
    // Every connection holds a slot until it closes: all slots back means all connections are closed.
    let _all = slots.acquire_many(max).await.expect("the semaphore is never closed");
    Ok(())
}
