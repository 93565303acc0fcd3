use socket_host::app::App;
use socket_host::cli::{Cli, Command};
use socket_host::config::LogFormat;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    wakeeper_shared::tls::install_crypto_provider();
    let cli = Cli::parse();
    init_tracing(cli.config.log_format);
    #[cfg(feature = "test-peer")]
    tracing::warn!("TEST BUILD: server certificate verification is disabled (feature test-peer); never deploy this");
    match cli.command {
        Command::Serve => {
            let metrics = socket_host::telemetry::install()?;
            let listener = tokio::net::TcpListener::bind(cli.config.listen).await?;
            let mut app = App::build(cli.config).await?;
            if let Some(state) = std::sync::Arc::get_mut(&mut app.state) {
                state.metrics = Some(metrics);
            }
            app.serve(listener, shutdown_signal()).await
        }
        Command::Restore { tenant_ids } => {
            let body = if tenant_ids.is_empty() {
                serde_json::json!({})
            } else {
                serde_json::json!({ "tenant_ids": tenant_ids })
            };
            call_host(&cli.config, "/v1/restore", body).await
        }
        Command::Link(args) => socket_host::operator::link(&cli.config, &args, &mut std::io::stdout()).await,
        Command::Sessions(args) => socket_host::operator::sessions(&cli.config, &args, &mut std::io::stdout()).await,
        Command::Openapi => {
            print!("{}", socket_host::api::openapi_document());
            Ok(())
        }
        Command::Sweep => call_host(&cli.config, "/v1/sweep", serde_json::json!({})).await,
        Command::Keys(cmd) => socket_host::key_rotation::run(&cli.config, &cmd, &mut std::io::stdout()).await,
        Command::Import(cmd) => Ok(socket_host::import::run(&cli.config, &cmd, &mut std::io::stdout()).await?),
    }
}

/// Posts to the running host's control API and prints its JSON answer.
async fn call_host(config: &socket_host::config::Config, path: &str, body: serde_json::Value) -> anyhow::Result<()> {
    let token = socket_host::app::control_token(config)?;
    let url = format!("http://{}{path}", config.listen);
    let res = wakeeper_shared::tls::http_client().build()?.post(&url).bearer_auth(token).json(&body).send().await?;
    let status = res.status();
    println!("{}", res.text().await?);
    anyhow::ensure!(status.is_success(), "host answered {status}");
    Ok(())
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
