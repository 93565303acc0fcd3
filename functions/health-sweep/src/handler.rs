//! The invocation: classify the event, run the sweep, print its metrics, answer its report (or fail the run
//! when the host could not be reached, after alerting).

use std::sync::Arc;

use anyhow::Context;
use lambda_runtime::{Error, LambdaEvent};
use serde_json::Value;
use tokio::sync::{Mutex, OnceCell};
use tracing::info;
use wakeeper_shared::alerts::{AlertFanout, AlertSink, LogAlerts, WebhookAlerts};
use wakeeper_shared::domain::now_millis;
use wakeeper_shared::fleet::HostFleet;
use wakeeper_shared::host_api::HostClient;
use wakeeper_shared::lambda::{HostsConfig, Invocation, aws_config_if, classify_event, resolve_secret};
use wakeeper_shared::ports::TenantStore;
use wakeeper_shared::sweep::{SweepMemory, SweepPolicy, run_sweep};

use crate::config::{AlertConfig, Config};

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
    hosts: HostsConfig,
    alerts: AlertConfig,
    sdk: Option<aws_config::SdkConfig>,
}

impl ClientSettings {
    /// Whether building the clients fetches a secret (and so waits for the first invocation).
    fn fetches(&self) -> bool {
        self.hosts.token.needs_aws() || self.alerts.webhook.as_ref().is_some_and(|(_, secret)| secret.needs_aws())
    }

    async fn build(&self) -> anyhow::Result<Clients> {
        let hosts = self.hosts.fleet(self.sdk.as_ref()).await?;
        let mut sinks: Vec<Box<dyn AlertSink>> = vec![Box::new(LogAlerts)];
        if let Some((url, secret)) = &self.alerts.webhook {
            let secret = resolve_secret(secret, self.sdk.as_ref()).await.context("webhook secret")?;
            sinks.push(Box::new(WebhookAlerts::new(url.clone(), &secret)?));
        }
        if let Some(topic) = &self.alerts.topic_arn {
            #[cfg(feature = "sns")]
            sinks.push(Box::new(wakeeper_shared::alerts::SnsAlerts::new(
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
        let settings = ClientSettings { hosts: config.hosts, alerts: config.alerts, sdk: None };
        let needs_aws = config.table.needs_aws() || settings.fetches() || settings.alerts.topic_arn.is_some();
        let settings = ClientSettings { sdk: aws_config_if(needs_aws, &config.aws).await, ..settings };
        let tenants = Arc::new(config.table.tenant_store(settings.sdk.as_ref()));
        // Nothing to fetch: build the clients now, so a bad URL or setting fails the cold start.
        let clients =
            if settings.fetches() { OnceCell::new() } else { OnceCell::new_with(Some(settings.build().await?)) };
        info!(table = %config.table.name, secrets_fetched_later = settings.fetches(), "health-sweep configured");
        Ok(Self { tenants, clients, settings, policy: config.policy, memory: Mutex::new(SweepMemory::default()) })
    }

    /// The clients: built at cold start, or by the first invocation that needs a secret fetched (a failed fetch
    /// fails that invocation; the next one tries again).
    async fn clients(&self) -> anyhow::Result<&Clients> {
        self.clients.get_or_try_init(|| self.settings.build()).await
    }
}

/// One invocation. Accepts a Scheduler event or an empty direct invoke; a tenant list means nothing to a sweep
/// and is refused.
pub async fn handle(state: Arc<State>, event: LambdaEvent<Value>) -> Result<Value, Error> {
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
