//! The SNS alert sink: each alert published to a topic, its summary as the subject.

use async_trait::async_trait;

use super::{AlertError, AlertMessage, AlertSink};

/// Publishes each alert to an SNS topic: the summary as subject, the JSON as message.
pub struct SnsAlerts {
    client: aws_sdk_sns::Client,
    topic_arn: String,
}

impl SnsAlerts {
    /// A sink publishing to `topic_arn`.
    pub fn new(sdk: &aws_config::SdkConfig, topic_arn: String) -> Self {
        Self { client: aws_sdk_sns::Client::new(sdk), topic_arn }
    }
}

#[async_trait]
impl AlertSink for SnsAlerts {
    async fn send(&self, alert: &AlertMessage) -> Result<(), AlertError> {
        let message = serde_json::to_string(alert).map_err(|e| AlertError(e.to_string()))?;
        self.client
            .publish()
            .topic_arn(&self.topic_arn)
            .subject(alert.summary())
            .message(message)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| AlertError(format!("sns publish: {}", aws_sdk_sns::error::DisplayErrorContext(&e))))
    }
}
