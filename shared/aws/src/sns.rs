//! The stack's notices topic (SNS): an environment whose `notify` says `sns = true` has its
//! notices published there as well as to its webhooks. Customers subscribe e-mail, SMS, chat
//! integrations or their own endpoints to the topic and filter on its message attributes
//! (`environment_id`, `event`, `status`, `run_id`). A message has the notice's subject and
//! relink's JSON body (the generic webhook's, unsigned: SNS signs its own deliveries).

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_sns::types::MessageAttributeValue;

use relink_core::Result;
use relink_core::notice::{Delivery, Notice};
use relink_core::ports::{Connector, DataverseApi, FnoApi, Notifier};
use relink_core::registry::EnvConfig;

/// SNS caps a subject at 100 characters.
const MAX_SUBJECT: usize = 99;

/// Publishes to the topic, and hands the other channels to the webhook notifier.
pub struct SnsNotifier {
    client: aws_sdk_sns::Client,
    /// `None`: the stack has no topic (a local worker without one); `sns = true` is then
    /// recorded as not sent.
    topic_arn: Option<String>,
    webhooks: Arc<dyn Notifier>,
}

impl SnsNotifier {
    async fn publish(&self, topic: &str, notice: &Notice) -> std::result::Result<(), String> {
        let subject: String = notice
            .subject()
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control())
            .take(MAX_SUBJECT)
            .collect();
        let attr = |v: &str| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .expect("data type is set")
        };
        self.client
            .publish()
            .topic_arn(topic)
            .subject(subject)
            .message(notice.json().to_string())
            .message_attributes("environment_id", attr(&notice.environment_id))
            .message_attributes("event", attr(notice.kind.as_str()))
            .message_attributes("status", attr(&notice.status))
            .message_attributes("run_id", attr(&notice.run_id))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| format!("SNS Publish failed: {}", crate::sdk_error(&e)))
    }
}

#[async_trait]
impl Notifier for SnsNotifier {
    async fn send(&self, env: &EnvConfig, notice: &Notice) -> Vec<Delivery> {
        if !env.notify.sns {
            return self.webhooks.send(env, notice).await;
        }
        let mut others = env.clone();
        others.notify.sns = false;
        let mut out = self.webhooks.send(&others, notice).await;
        let result = match &self.topic_arn {
            // The SDK retries throttling and 5xx itself (standard retry mode, 3 attempts).
            Some(topic) => match self.publish(topic, notice).await {
                Ok(()) => "sent".to_string(),
                Err(e) => e,
            },
            None => {
                "not sent: this stack has no notices topic (NOTICE_TOPIC_ARN is not set)".into()
            }
        };
        out.push(Delivery {
            channel: "sns".into(),
            result,
        });
        out
    }
}

/// A connector whose notices also go to the stack's topic.
pub struct WithTopic<C> {
    inner: C,
    client: aws_sdk_sns::Client,
    topic_arn: Option<String>,
}

impl<C: Connector> WithTopic<C> {
    /// `inner`'s clients, and notices through `inner`'s notifier and `topic_arn`.
    pub fn new(inner: C, config: &aws_config::SdkConfig, topic_arn: Option<String>) -> Self {
        WithTopic {
            inner,
            client: aws_sdk_sns::Client::new(config),
            topic_arn: topic_arn.filter(|t| !t.is_empty()),
        }
    }

    /// The topic from `NOTICE_TOPIC_ARN` (the template sets it on every stage function).
    pub fn from_env(inner: C, config: &aws_config::SdkConfig) -> Self {
        Self::new(inner, config, std::env::var("NOTICE_TOPIC_ARN").ok())
    }
}

impl<C: Connector> Connector for WithTopic<C> {
    fn dataverse(&self, env: &EnvConfig) -> Result<Arc<dyn DataverseApi>> {
        self.inner.dataverse(env)
    }
    fn fno(&self, env: &EnvConfig) -> Result<Arc<dyn FnoApi>> {
        self.inner.fno(env)
    }
    fn gateway(&self, env: &EnvConfig) -> Result<Arc<dyn relink_core::ports::DualWriteGateway>> {
        self.inner.gateway(env)
    }
    fn notifier(&self) -> Arc<dyn Notifier> {
        Arc::new(SnsNotifier {
            client: self.client.clone(),
            topic_arn: self.topic_arn.clone(),
            webhooks: self.inner.notifier(),
        })
    }
}
