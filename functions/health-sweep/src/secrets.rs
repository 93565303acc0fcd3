//! Resolving a [`Secret`] at cold start: the value as given, or a Secrets Manager `GetSecretValue`.

use anyhow::{Context, ensure};

use crate::config::Secret;

/// The secret's value, trimmed and non-empty. `sdk` is needed only for a Secrets Manager reference.
pub async fn resolve(secret: &Secret, sdk: Option<&aws_config::SdkConfig>) -> anyhow::Result<String> {
    let value = match secret {
        Secret::Value(v) => v.clone(),
        Secret::SecretArn(arn) => {
            let sdk = sdk.context("an AWS configuration is needed to read a Secrets Manager secret")?;
            let out = aws_sdk_secretsmanager::Client::new(sdk)
                .get_secret_value()
                .secret_id(arn)
                .send()
                .await
                // The SDK's error names the secret and the failure, never the value.
                .with_context(|| format!("reading secret {arn}"))?;
            out.secret_string().with_context(|| format!("secret {arn} holds no string"))?.to_owned()
        }
    };
    let value = value.trim().to_owned();
    ensure!(!value.is_empty(), "the secret is empty");
    Ok(value)
}
