use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use socket_host::api::AppState;
use socket_host::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.config.log_format);
    #[cfg(feature = "test-peer")]
    tracing::warn!("TEST BUILD: server certificate verification is disabled (feature test-peer); never deploy this");
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(cli.config).await,
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_env("WAKEEPER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(config: socket_host::config::Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("binding {}", config.listen))?;
    let state = Arc::new(AppState::new());
    tracing::info!(listen = %listener.local_addr()?, data_dir = %config.data_dir.display(), boot_id = %state.boot_id, "host started");
    socket_host::run(listener, state, shutdown_signal()).await?;
    tracing::info!("host stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown signal received");
}
