//! Polling with a deadline, so no test waits on a sleep for synchronisation; tenant ids from literals.

use std::future::Future;
use std::time::Duration;

use wakeeper_shared::domain::TenantId;

/// Polls `check` until it yields a value or `limit` passes.
pub async fn wait_until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tenant id from a literal a test knows to be valid.
pub fn tenant(name: &str) -> TenantId {
    TenantId::parse(name).expect("valid tenant id")
}
