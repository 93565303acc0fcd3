//! What a function builds once at cold start: the AWS configuration (only when something needs it), secrets
//! read from Secrets Manager, the tenant store, the host fleet, JSON logs, and the runtime loop it then serves.

use std::future::Future;
use std::sync::Arc;

use aws_config::SdkConfig;
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

use super::config::{HostsConfig, Secret, TableConfig};
use crate::adapters::dynamodb::{DynamoTenantStore, dynamo_client_for_endpoint};
use crate::fleet::HostFleet;
use crate::host_api::HostClient;
use crate::ports::HostError;

/// A secret could not be read. Names the secret, never its value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A Secrets Manager reference, but no AWS configuration was loaded.
    #[error("an AWS configuration is needed to read a Secrets Manager secret")]
    NoAwsConfig,
    /// `GetSecretValue` failed.
    #[error("reading secret {arn}")]
    Read {
        /// The secret's ARN.
        arn: String,
        /// The SDK's error (it names the secret and the failure, never the value).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The secret holds binary data, not a string.
    #[error("secret {0} holds no string")]
    NotAString(String),
    /// The secret's value is empty or blank.
    #[error("the secret is empty")]
    Empty,
}

/// The host fleet could not be built.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The control token could not be read.
    #[error("control token")]
    Token(#[source] SecretError),
    /// A client could not be built (a bad URL or token).
    #[error(transparent)]
    Host(#[from] HostError),
}

/// The AWS configuration from the environment, with `timeouts` on every call, when `needed` (no request is
/// made), else `None`.
pub async fn aws_config_if(needed: bool, timeouts: &crate::aws::AwsTimeouts) -> Option<SdkConfig> {
    if needed { Some(crate::aws::sdk_config(timeouts, None).await) } else { None }
}

/// The secret's value, trimmed and non-empty. `sdk` is needed only for a Secrets Manager reference.
pub async fn resolve_secret(secret: &Secret, sdk: Option<&SdkConfig>) -> Result<String, SecretError> {
    let value = match secret {
        Secret::Value(v) => v.clone(),
        Secret::SecretArn(arn) => {
            let sdk = sdk.ok_or(SecretError::NoAwsConfig)?;
            let out = aws_sdk_secretsmanager::Client::new(sdk)
                .get_secret_value()
                .secret_id(arn)
                .send()
                .await
                .map_err(|e| SecretError::Read { arn: arn.clone(), source: Box::new(e) })?;
            out.secret_string().ok_or_else(|| SecretError::NotAString(arn.clone()))?.to_owned()
        }
    };
    let value = value.trim().to_owned();
    if value.is_empty() {
        return Err(SecretError::Empty);
    }
    Ok(value)
}

impl TableConfig {
    /// The tenant table's store: at the endpoint override, or in AWS through `sdk` (which must then be loaded:
    /// see [`TableConfig::needs_aws`]).
    pub fn tenant_store(&self, sdk: Option<&SdkConfig>) -> DynamoTenantStore {
        let client = match (&self.endpoint, sdk) {
            (Some(url), _) => dynamo_client_for_endpoint(url),
            (None, Some(sdk)) => aws_sdk_dynamodb::Client::new(sdk),
            (None, None) => unreachable!("an AWS configuration is loaded when no endpoint is set"),
        };
        DynamoTenantStore::new(client, self.name.clone())
    }
}

impl HostsConfig {
    /// One control-API client per host, with the token read (from Secrets Manager through `sdk` when it is a
    /// reference).
    pub async fn fleet(&self, sdk: Option<&SdkConfig>) -> Result<HostFleet<HostClient>, FleetError> {
        let token = resolve_secret(&self.token, sdk).await.map_err(FleetError::Token)?;
        Ok(HostFleet::from_urls(&self.urls, &token, self.timeout)?)
    }
}

/// JSON logs on stdout (one object a line, fields flattened for Logs Insights), filtered by `WAKEEPER_LOG`.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WAKEEPER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().json().flatten_event(true).with_current_span(false).with_env_filter(filter).init();
}

/// Serves invocations until the runtime stops: each event goes to `handle` with the state built once at cold
/// start (a warm container keeps it).
pub async fn serve<S, F, Fut>(state: S, handle: F) -> Result<(), lambda_runtime::Error>
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, LambdaEvent<Value>) -> Fut,
    Fut: Future<Output = Result<Value, lambda_runtime::Error>>,
{
    let state = Arc::new(state);
    lambda_runtime::run(service_fn(move |event| handle(state.clone(), event))).await
}
