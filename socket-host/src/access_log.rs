//! The API's access log and request ids. Every request gets an id: the caller's `x-request-id` when it is a
//! short token of safe characters, else a generated one; the id is returned in the answer's `x-request-id` and
//! logged with the request, so a bot's log line and the host's meet. One line per request, at `info` (`debug`
//! for the probes `/health` and `/ready`, which platforms poll), target `wakeeper::access`: method, route
//! template (`/v1/sessions/{tenant_id}`, never the path with its tenant id, never the query), status, latency
//! and the id. Never a header value other than the id, never a body: the token stays out of the log.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

/// The header carrying the request id, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest caller-given request id kept (a longer or odd one is replaced).
const MAX_ID_LEN: usize = 64;

fn usable(id: &HeaderValue) -> Option<String> {
    let id = id.to_str().ok()?;
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| id.to_owned())
}

/// The middleware: sets the id on the request and the answer, and logs the request once answered.
pub(crate) async fn access_log(mut req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = req.headers().get(REQUEST_ID_HEADER).and_then(usable).unwrap_or_else(|| {
        // 16 random bytes as hex: unique enough to find one request in a day of logs.
        wakeeper_shared::crypto::random_hex(16)
    });
    let value = HeaderValue::from_str(&id).expect("the id is header-safe");
    req.headers_mut().insert(REQUEST_ID_HEADER, value.clone());
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().map_or("<unmatched>", MatchedPath::as_str).to_owned();
    let mut res = next.run(req).await;
    res.headers_mut().insert(REQUEST_ID_HEADER, value);
    let (status, latency_ms) = (res.status().as_u16(), started.elapsed().as_secs_f64() * 1e3);
    if matches!(route.as_str(), "/health" | "/ready") {
        tracing::debug!(target: "wakeeper::access", %method, %route, status, latency_ms, request_id = %id, "request");
    } else {
        tracing::info!(target: "wakeeper::access", %method, %route, status, latency_ms, request_id = %id, "request");
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_safe_ids_are_kept() {
        let keep = |s: &str| usable(&HeaderValue::from_str(s).unwrap());
        assert_eq!(keep("bot-7f3a:42").as_deref(), Some("bot-7f3a:42"));
        assert_eq!(keep(""), None);
        assert_eq!(keep("a b"), None);
        assert_eq!(keep("x\"y"), None);
        assert_eq!(keep(&"a".repeat(65)), None);
    }
}
