//! The invocation: classify the event, run the fan-out, print its metrics, answer its report.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use lambda_runtime::{Error, LambdaEvent};
use serde_json::Value;
use tracing::info;
use wakeeper_shared::adapters::dynamodb::{DynamoTenantStore, dynamo_client_for_endpoint};
use wakeeper_shared::domain::now_millis;
use wakeeper_shared::emf::Emf;
use wakeeper_shared::host_api::HostClient;
use wakeeper_shared::ports::TenantStore;
use wakeeper_shared::restore_fanout::{
    FanoutRequest, Invocation, RestoreError, RestoreLimits, classify_event, run_restore,
};
use wakeeper_shared::sweep::HostFleet;

use crate::config::{Config, Secret};

/// The function's name: the EMF dimension and the log field.
pub const FUNCTION: &str = "restore";

/// What every invocation of a warm container shares, built once at cold start.
pub struct State {
    tenants: Arc<dyn TenantStore>,
    hosts: HostFleet<HostClient>,
    limits: RestoreLimits,
}

impl State {
    /// Builds the clients. Talks to AWS only when it must (a secret to fetch, the real DynamoDB).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let needs_aws = config.dynamodb_endpoint.is_none() || matches!(config.token, Secret::SecretArn(_));
        let sdk = if needs_aws { Some(aws_config::load_from_env().await) } else { None };
        let token = crate::secrets::resolve(&config.token, sdk.as_ref()).await.context("control token")?;
        let dynamo = match (&config.dynamodb_endpoint, &sdk) {
            (Some(url), _) => dynamo_client_for_endpoint(url),
            (None, Some(sdk)) => aws_sdk_dynamodb::Client::new(sdk),
            (None, None) => unreachable!("an AWS configuration is loaded when no endpoint is set"),
        };
        let hosts = HostFleet::from_urls(&config.host_urls, &token, config.host_timeout)?;
        info!(hosts = hosts.len(), table = %config.table, "restore function configured");
        Ok(Self { tenants: Arc::new(DynamoTenantStore::new(dynamo, config.table)), hosts, limits: config.limits })
    }
}

/// When the invocation must end. Lambda sends the deadline as Unix milliseconds; `cargo lambda watch` sends
/// the timeout itself (e.g. `600000`), which is read as counting from now rather than as a date in 1970.
fn deadline_of(deadline_ms: u64, now: SystemTime) -> SystemTime {
    // 2001-09-09: no real deadline is earlier, no timeout is longer.
    const EPOCH_MS_FLOOR: u64 = 1_000_000_000_000;
    if deadline_ms >= EPOCH_MS_FLOOR {
        SystemTime::UNIX_EPOCH + Duration::from_millis(deadline_ms)
    } else {
        now + Duration::from_millis(deadline_ms)
    }
}

/// Prints one EMF line on stdout, where CloudWatch Logs picks the metrics up.
fn emit(emf: &Emf) {
    println!("{}", emf.to_line(now_millis()));
}

/// One invocation: a Scheduler event restores every desired tenant; `{"tenant_ids": [...]}` those tenants.
pub async fn handle(state: &State, event: LambdaEvent<Value>) -> Result<Value, Error> {
    let (payload, context) = event.into_parts();
    let request = match classify_event(&payload)? {
        Invocation::Scheduled { schedule, time } => {
            info!(
                schedule = schedule.as_deref().unwrap_or("-"),
                time = time.as_deref().unwrap_or("-"),
                "scheduled restore"
            );
            FanoutRequest::default()
        }
        Invocation::Direct(request) => {
            info!(tenants = request.tenant_ids.as_ref().map(Vec::len), "direct restore");
            request
        }
    };
    let deadline = deadline_of(context.deadline, SystemTime::now());
    let time_left = move || deadline.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
    info!(
        time_left_ms = time_left().as_millis() as u64,
        reserve_ms = state.limits.reserve.as_millis() as u64,
        "restore starting"
    );
    match run_restore(state.tenants.as_ref(), &state.hosts, &request, &state.limits, time_left).await {
        Ok(report) => {
            emit(&report.emf(FUNCTION));
            Ok(serde_json::to_value(&report)?)
        }
        Err(e) => {
            let host_down = matches!(e, RestoreError::Host(_));
            emit(
                &Emf::new(wakeeper_shared::emf::NAMESPACE)
                    .dimension("Function", FUNCTION)
                    .count("HostUnreachable", u64::from(host_down))
                    .count("RunFailed", 1),
            );
            Err(Box::new(e))
        }
    }
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
    fn deadlines_are_dates_in_lambda_and_durations_in_the_emulator() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_800_000_000_000);
        let real = deadline_of(1_800_000_900_000, now);
        assert_eq!(real.duration_since(now).unwrap(), Duration::from_secs(900));
        let emulated = deadline_of(600_000, now);
        assert_eq!(emulated.duration_since(now).unwrap(), Duration::from_secs(600));
    }

    #[test]
    fn the_recorded_events_are_understood() {
        let scheduled: Value = serde_json::from_str(include_str!("../../events/scheduler-restore.json")).unwrap();
        assert!(matches!(classify_event(&scheduled).unwrap(), Invocation::Scheduled { schedule: Some(_), .. }));
        let direct: Value = serde_json::from_str(include_str!("../../events/restore-tenants.json")).unwrap();
        match classify_event(&direct).unwrap() {
            Invocation::Direct(FanoutRequest { tenant_ids: Some(ids) }) => assert_eq!(ids.len(), 2),
            other => panic!("{other:?}"),
        }
    }
}
