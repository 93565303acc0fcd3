//! Lambda function `restore`: brings every desired tenant (or the ones named in a direct invoke) back on its
//! host. Thin: the logic is `wakeeper_shared::restore_fanout::run_restore`, which the host's CLI runs too.
//!
//! # Layout
//! - `config`: the settings, read once at cold start.
//! - `secrets`: the control token from Secrets Manager.
//! - `handler`: one invocation.

mod config;
mod handler;
mod secrets;

use std::sync::Arc;

use lambda_runtime::{Error, service_fn};

#[tokio::main]
async fn main() -> Result<(), Error> {
    handler::init_tracing();
    let config = config::Config::from_lookup(|k| std::env::var(k).ok())?;
    let state = Arc::new(handler::State::build(config).await?);
    lambda_runtime::run(service_fn(move |event| {
        let state = state.clone();
        async move { handler::handle(&state, event).await }
    }))
    .await
}
