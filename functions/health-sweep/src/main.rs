//! Lambda function `health-sweep`: every two minutes, compares what should run (the tenant table) with what
//! runs (the host's sessions) and acts. Thin: the logic is `wakeeper_shared::sweep::run_sweep`, which the
//! host's CLI runs too.
//!
//! # Layout
//! - `config`: the settings, read once at cold start.
//! - `secrets`: the control token and webhook secret from Secrets Manager.
//! - `alerts`: the signed webhook and SNS alert sinks.
//! - `handler`: one invocation.

mod alerts;
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
