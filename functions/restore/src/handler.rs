//! The invocation: classify the event, run the fan-out, print its metrics, answer its report.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lambda_runtime::{Error, LambdaEvent};
use serde_json::Value;
use tokio::sync::OnceCell;
use tracing::info;
use wakeeper_shared::domain::now_millis;
use wakeeper_shared::emf::Emf;
use wakeeper_shared::fleet::HostFleet;
use wakeeper_shared::host_api::HostClient;
use wakeeper_shared::lambda::{HostsConfig, Invocation, Secret, aws_config_if, classify_event};
use wakeeper_shared::ports::TenantStore;
use wakeeper_shared::restore::{FanoutRequest, RestoreError, RestoreLimits, run_restore};

use crate::config::Config;

/// The function's name: the EMF dimension and the log field.
pub const FUNCTION: &str = "restore";

/// What every invocation of a warm container shares, built once at cold start.
///
/// The cold start talks to nothing: it reads the settings, loads the AWS configuration (environment only, no
/// request) and builds the DynamoDB client. A control token kept in Secrets Manager is fetched by the first
/// invocation and kept for the warm container's life, so Lambda's init phase never waits on the network.
pub struct State {
    tenants: Arc<dyn TenantStore>,
    hosts: OnceCell<HostFleet<HostClient>>,
    host_settings: HostsConfig,
    sdk: Option<aws_config::SdkConfig>,
    limits: RestoreLimits,
}

impl State {
    /// Builds the clients. Talks to AWS only when it must (the real DynamoDB), and never over the network.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let sdk = aws_config_if(config.table.needs_aws() || config.hosts.token.needs_aws(), &config.aws).await;
        let tenants = Arc::new(config.table.tenant_store(sdk.as_ref()));
        // A token given as its value costs nothing: build the clients now, so a bad URL fails the cold start.
        let hosts = match config.hosts.token {
            Secret::Value(_) => OnceCell::new_with(Some(config.hosts.fleet(sdk.as_ref()).await?)),
            Secret::SecretArn(_) => OnceCell::new(),
        };
        info!(hosts = config.hosts.urls.len(), table = %config.table.name, "restore function configured");
        Ok(Self { tenants, hosts, host_settings: config.hosts, sdk, limits: config.limits })
    }

    /// The host clients: built at cold start, or by the first invocation that needs the token fetched (a failed
    /// fetch fails that invocation; the next one tries again).
    async fn hosts(&self) -> anyhow::Result<&HostFleet<HostClient>> {
        Ok(self.hosts.get_or_try_init(|| self.host_settings.fleet(self.sdk.as_ref())).await?)
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
pub async fn handle(state: Arc<State>, event: LambdaEvent<Value>) -> Result<Value, Error> {
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
    let hosts = match state.hosts().await {
        Ok(hosts) => hosts,
        Err(e) => {
            emit(
                &Emf::new(wakeeper_shared::emf::NAMESPACE)
                    .dimension("Function", FUNCTION)
                    .count("HostUnreachable", 0)
                    .count("RunFailed", 1),
            );
            return Err(format!("{e:#}").into());
        }
    };
    match run_restore(state.tenants.as_ref(), hosts, &request, &state.limits, time_left).await {
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
