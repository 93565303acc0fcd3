use clap::Parser;
use socket_host::app::App;
use socket_host::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.config.log_format);
    #[cfg(feature = "test-peer")]
    tracing::warn!("TEST BUILD: server certificate verification is disabled (feature test-peer); never deploy this");
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
            let listener = tokio::net::TcpListener::bind(cli.config.listen).await?;
            let mut app = App::build(cli.config).await?;
            if let Some(state) = std::sync::Arc::get_mut(&mut app.state) {
                state.metrics = Some(metrics);
            }
            app.serve(listener, shutdown_signal()).await
        }
        Command::Import(cmd) => Ok(socket_host::import::run(&cli.config, &cmd, &mut std::io::stdout()).await?),
    }
}

fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    // The engine narrates every connect at info; keep its warnings and our own info.
    let filter = EnvFilter::try_from_env("WAKEEPER_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,whatsapp_rust=warn,wacore=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutdown signal received");
}
