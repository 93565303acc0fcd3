//! Lambda function `restore`: brings every desired tenant (or the ones named in a direct invoke) back on its
//! host. Thin: the logic is `wakeeper_shared::restore::run_restore`, which the host's CLI runs too; the
//! settings, secrets and log set-up both functions share are `wakeeper_shared::lambda`.
//!
//! # Layout
//! - `config`: the settings, read once at cold start.
//! - `handler`: one invocation.

mod config;
mod handler;

use lambda_runtime::Error;

#[tokio::main]
async fn main() -> Result<(), Error> {
    wakeeper_shared::tls::install_crypto_provider();
    wakeeper_shared::lambda::init_tracing();
    let config = config::Config::from_lookup(|k| std::env::var(k).ok())?;
    let state = handler::State::build(config).await?;
    wakeeper_shared::lambda::serve(state, handler::handle).await
}
