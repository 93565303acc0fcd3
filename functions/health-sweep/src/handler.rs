//! The invocation: classify the event, run the sweep, print its metrics, answer its report (or fail the run
//! when the host could not be reached, after alerting).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lambda_runtime::{Error, LambdaEvent};
use serde_json::Value;
use tokio::sync::{Mutex, OnceCell};
use tracing::info;
use wakeeper_shared::adapters::dynamodb::{DynamoTenantStore, dynamo_client_for_endpoint};
use wakeeper_shared::domain::now_millis;
use wakeeper_shared::host_api::HostClient;
use wakeeper_shared::ports::TenantStore;
use wakeeper_shared::restore_fanout::{Invocation, classify_event};
use wakeeper_shared::sweep::{AlertFanout, AlertSink, HostFleet, LogAlerts, SweepMemory, SweepPolicy, run_sweep};

use crate::alerts::WebhookAlerts;
use crate::config::{AlertConfig, Config, Secret};

/// The function's name: the EMF dimension and the log field.
pub const FUNCTION: &str = "health-sweep";

/// What every invocation of a warm container shares, built once at cold start.
///
/// The cold start talks to nothing: it reads the settings, loads the AWS configuration (environment only, no
/// request) and builds the DynamoDB client. Secrets kept in Secrets Manager (the control token, the webhook's
/// signing secret) are fetched by the first invocation and kept for the warm container's life, so Lambda's
/// init phase never waits on the network.
pub struct State {
    tenants: Arc<dyn TenantStore>,
    clients: OnceCell<Clients>,
    settings: ClientSettings,
    policy: SweepPolicy,
    /// The boot id seen last; lives as long as the warm container.
    memory: Mutex<SweepMemory>,
}

/// The clients that need a secret: the hosts' (control token) and the alert sinks (webhook secret).
struct Clients {
    hosts: HostFleet<HostClient>,
    alerts: Box<dyn AlertSink>,
}

/// What building [`Clients`] needs.
struct ClientSettings {
    host_urls: Vec<String>,
    token: Secret,
    host_timeout: Duration,
    alerts: AlertConfig,
    sdk: Option<aws_config::SdkConfig>,
}

impl ClientSettings {
    /// Whether building the clients fetches a secret (and so waits for the first invocation).
    fn fetches(&self) -> bool {
        matches!(self.token, Secret::SecretArn(_)) || matches!(self.alerts.webhook, Some((_, Secret::SecretArn(_))))
    }

    async fn build(&self) -> anyhow::Result<Clients> {
        let token = crate::secrets::resolve(&self.token, self.sdk.as_ref()).await.context("control token")?;
        let hosts = HostFleet::from_urls(&self.host_urls, &token, self.host_timeout)?;
        let mut sinks: Vec<Box<dyn AlertSink>> = vec![Box::new(LogAlerts)];
        if let Some((url, secret)) = &self.alerts.webhook {
            let secret = crate::secrets::resolve(secret, self.sdk.as_ref()).await.context("webhook secret")?;
            sinks.push(Box::new(WebhookAlerts::new(url.clone(), &secret)?));
        }
        if let Some(topic) = &self.alerts.topic_arn {
            #[cfg(feature = "sns")]
            sinks.push(Box::new(crate::alerts::SnsAlerts::new(
                self.sdk.as_ref().expect("loaded for a topic"),
                topic.clone(),
            )));
            #[cfg(not(feature = "sns"))]
            anyhow::bail!("WAKEEPER_ALERT_TOPIC_ARN ({topic}) is set but this build has no `sns` feature");
        }
        info!(hosts = hosts.len(), alert_sinks = sinks.len(), "health-sweep clients ready");
        Ok(Clients { hosts, alerts: Box::new(AlertFanout::new(sinks)) })
    }
}

impl State {
    /// Builds the DynamoDB client, and the other clients too when no secret has to be fetched for them. Talks
    /// to AWS only when it must, and never over the network.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let needs_aws = config.dynamodb_endpoint.is_none()
            || matches!(config.token, Secret::SecretArn(_))
            || matches!(config.alerts.webhook, Some((_, Secret::SecretArn(_))))
            || config.alerts.topic_arn.is_some();
        let sdk = if needs_aws { Some(aws_config::load_from_env().await) } else { None };
        let dynamo = match (&config.dynamodb_endpoint, &sdk) {
            (Some(url), _) => dynamo_client_for_endpoint(url),
            (None, Some(sdk)) => aws_sdk_dynamodb::Client::new(sdk),
            (None, None) => unreachable!("an AWS configuration is loaded when no endpoint is set"),
        };
        let settings = ClientSettings {
            host_urls: config.host_urls,
            token: config.token,
            host_timeout: config.host_timeout,
            alerts: config.alerts,
            sdk,
        };
        // Nothing to fetch: build the clients now, so a bad URL or setting fails the cold start.
        let clients =
            if settings.fetches() { OnceCell::new() } else { OnceCell::new_with(Some(settings.build().await?)) };
        info!(table = %config.table, secrets_fetched_later = settings.fetches(), "health-sweep configured");
        Ok(Self {
            tenants: Arc::new(DynamoTenantStore::new(dynamo, config.table)),
            clients,
            settings,
            policy: config.policy,
            memory: Mutex::new(SweepMemory::default()),
        })
    }

    /// The clients: built at cold start, or by the first invocation that needs a secret fetched (a failed fetch
    /// fails that invocation; the next one tries again).
    async fn clients(&self) -> anyhow::Result<&Clients> {
        self.clients.get_or_try_init(|| self.settings.build()).await
    }
}

/// One invocation. Accepts a Scheduler event or an empty direct invoke; a tenant list means nothing to a sweep
/// and is refused.
pub async fn handle(state: &State, event: LambdaEvent<Value>) -> Result<Value, Error> {
    match classify_event(&event.payload)? {
        Invocation::Scheduled { schedule, time } => {
            info!(
                schedule = schedule.as_deref().unwrap_or("-"),
                time = time.as_deref().unwrap_or("-"),
                "scheduled sweep"
            )
        }
        Invocation::Direct(request) if request.tenant_ids.is_some() => {
            return Err("the health sweep takes no tenant_ids (invoke the restore function for that)".into());
        }
        Invocation::Direct(_) => info!("direct sweep"),
    }
    let clients = state.clients().await.map_err(|e| format!("{e:#}"))?;
    // One sweep at a time per container (the runtime sends one event at a time anyway).
    let mut memory = state.memory.lock().await;
    let report = run_sweep(
        state.tenants.as_ref(),
        &clients.hosts,
        &mut memory,
        clients.alerts.as_ref(),
        &state.policy,
        now_millis(),
    )
    .await?;
    println!("{}", report.emf(FUNCTION).to_line(now_millis()));
    if report.host_unreachable {
        // Failing the run puts it on the Errors alarm and in the failure destination; nothing was marked.
        let why = report.host_error.clone().unwrap_or_default();
        return Err(format!("host unreachable, nothing marked ({} alert sent): {why}", report.alerts).into());
    }
    Ok(serde_json::to_value(&report)?)
}

/// JSON logs on stdout (one object a line, fields flattened for Logs Insights), filtered by `WAKEEPER_LOG`.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WAKEEPER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().json().flatten_event(true).with_current_span(false).with_env_filter(filter).init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorded_event_is_a_scheduled_run() {
        let event: Value = serde_json::from_str(include_str!("../../events/scheduler-health-sweep.json")).unwrap();
        assert_eq!(
            classify_event(&event).unwrap(),
            Invocation::Scheduled {
                schedule: Some(
                    "arn:aws:scheduler:us-east-1:123456789012:schedule/default/\
                     wakeeper-HealthSweepFunctionEveryTwoMinutes-AbC123"
                        .into()
                ),
                time: Some("2026-11-28T12:00:00Z".into()),
            }
        );
    }
}
