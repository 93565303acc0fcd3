//! The invocation: classify the event, run the sweep, print its metrics, answer its report (or fail the run
//! when the host could not be reached, after alerting).

use std::sync::Arc;

use anyhow::Context;
use lambda_runtime::{Error, LambdaEvent};
use serde_json::Value;
use tokio::sync::Mutex;
use tracing::info;
use wakeeper_shared::adapters::dynamodb::{DynamoTenantStore, dynamo_client_for_endpoint};
use wakeeper_shared::domain::now_millis;
use wakeeper_shared::host_api::HostClient;
use wakeeper_shared::ports::TenantStore;
use wakeeper_shared::restore_fanout::{Invocation, classify_event};
use wakeeper_shared::sweep::{AlertFanout, AlertSink, HostFleet, LogAlerts, SweepMemory, SweepPolicy, run_sweep};

use crate::alerts::WebhookAlerts;
use crate::config::{Config, Secret};

/// The function's name: the EMF dimension and the log field.
pub const FUNCTION: &str = "health-sweep";

/// What every invocation of a warm container shares, built once at cold start.
pub struct State {
    tenants: Arc<dyn TenantStore>,
    hosts: HostFleet<HostClient>,
    alerts: Box<dyn AlertSink>,
    policy: SweepPolicy,
    /// The boot id seen last; lives as long as the warm container.
    memory: Mutex<SweepMemory>,
}

impl State {
    /// Builds the clients and alert sinks. Talks to AWS only when it must.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let webhook_secret_in_aws = matches!(config.alerts.webhook, Some((_, Secret::SecretArn(_))));
        let needs_aws = config.dynamodb_endpoint.is_none()
            || matches!(config.token, Secret::SecretArn(_))
            || webhook_secret_in_aws
            || config.alerts.topic_arn.is_some();
        let sdk = if needs_aws { Some(aws_config::load_from_env().await) } else { None };
        let token = crate::secrets::resolve(&config.token, sdk.as_ref()).await.context("control token")?;
        let dynamo = match (&config.dynamodb_endpoint, &sdk) {
            (Some(url), _) => dynamo_client_for_endpoint(url),
            (None, Some(sdk)) => aws_sdk_dynamodb::Client::new(sdk),
            (None, None) => unreachable!("an AWS configuration is loaded when no endpoint is set"),
        };
        let hosts = HostFleet::from_urls(&config.host_urls, &token, config.host_timeout)?;

        let mut sinks: Vec<Box<dyn AlertSink>> = vec![Box::new(LogAlerts)];
        if let Some((url, secret)) = config.alerts.webhook {
            let secret = crate::secrets::resolve(&secret, sdk.as_ref()).await.context("webhook secret")?;
            sinks.push(Box::new(WebhookAlerts::new(url, &secret)?));
        }
        if let Some(topic) = config.alerts.topic_arn {
            #[cfg(feature = "sns")]
            sinks.push(Box::new(crate::alerts::SnsAlerts::new(sdk.as_ref().expect("loaded for a topic"), topic)));
            #[cfg(not(feature = "sns"))]
            anyhow::bail!("WAKEEPER_ALERT_TOPIC_ARN ({topic}) is set but this build has no `sns` feature");
        }
        info!(hosts = hosts.len(), table = %config.table, alert_sinks = sinks.len(), "health-sweep configured");
        Ok(Self {
            tenants: Arc::new(DynamoTenantStore::new(dynamo, config.table)),
            hosts,
            alerts: Box::new(AlertFanout::new(sinks)),
            policy: config.policy,
            memory: Mutex::new(SweepMemory::default()),
        })
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
    // One sweep at a time per container (the runtime sends one event at a time anyway).
    let mut memory = state.memory.lock().await;
    let report = run_sweep(
        state.tenants.as_ref(),
        &state.hosts,
        &mut memory,
        state.alerts.as_ref(),
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
