//! SQS stage queues: the next stage's event, with message attributes for filtering and tracing.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_sqs::types::MessageAttributeValue;

use super::{QueueNames, sdk_error};
use relink_core::error::{Error, Result};
use relink_core::event::StageEvent;
use relink_core::model::Stage;
use relink_core::ports::StageQueue;

/// Sends stage events to the SQS queue of their stage.
#[derive(Clone)]
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
    urls: HashMap<Stage, String>,
}

impl SqsQueue {
    /// A sender to the given queue URLs (a function knows only the queue after it).
    pub fn new(client: aws_sdk_sqs::Client, urls: HashMap<Stage, String>) -> SqsQueue {
        SqsQueue { client, urls }
    }

    /// Resolves every stage queue by name.
    pub async fn by_names(client: aws_sdk_sqs::Client, names: &QueueNames) -> Result<SqsQueue> {
        let mut urls = HashMap::new();
        for stage in Stage::ALL {
            urls.insert(stage, queue_url(&client, &names.queue(stage)).await?);
        }
        Ok(SqsQueue { client, urls })
    }

    /// The URL of a stage's queue.
    pub fn url(&self, stage: Stage) -> Option<&str> {
        self.urls.get(&stage).map(String::as_str)
    }
}

/// Looks a queue URL up by name, with an error that says how to create the queue.
pub async fn queue_url(client: &aws_sdk_sqs::Client, name: &str) -> Result<String> {
    let out = client.get_queue_url().queue_name(name).send().await.map_err(|e| {
        use aws_sdk_sqs::error::ProvideErrorMetadata;
        let text = sdk_error(&e);
        if e.as_service_error().is_some_and(|s| s.is_queue_does_not_exist())
            || matches!(
                e.code(),
                Some("AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist")
            )
        {
            Error::Config(format!("SQS queue {name} does not exist: deploy template.yaml, or run `relink local-stack create` against a local stack"))
        } else {
            Error::store(format!("SQS GetQueueUrl {name}: {text}"))
        }
    })?;
    out.queue_url()
        .map(str::to_string)
        .ok_or_else(|| Error::store(format!("SQS returned no URL for {name}")))
}

fn attr(v: &str) -> MessageAttributeValue {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .expect("data type and value are set")
}

impl SqsQueue {
    fn url_of(&self, stage: Stage) -> Result<&String> {
        self.urls
            .get(&stage)
            .ok_or_else(|| Error::Config(format!("this process has no queue for stage {stage}")))
    }
}

/// SQS's longest message delay and the longest visibility change relink asks for.
const MAX_DELAY: std::time::Duration = std::time::Duration::from_secs(900);

#[async_trait]
impl StageQueue for SqsQueue {
    async fn send_later(&self, event: &StageEvent, delay: std::time::Duration) -> Result<()> {
        let url = self.url_of(event.stage)?;
        let mut req = self
            .client
            .send_message()
            .queue_url(url)
            .message_body(event.to_body())
            .delay_seconds(delay.min(MAX_DELAY).as_secs() as i32)
            .message_attributes("environment_id", attr(&event.environment_id))
            .message_attributes("stage", attr(event.stage.as_str()));
        if let Some(run) = &event.run_id {
            req = req.message_attributes("run_id", attr(run));
        }
        req.send()
            .await
            .map_err(|e| Error::store(format!("SQS SendMessage to {url}: {}", sdk_error(&e))))?;
        Ok(())
    }

    async fn retry_later(
        &self,
        stage: Stage,
        receipt_handle: &str,
        delay: std::time::Duration,
    ) -> Result<()> {
        let url = self.url_of(stage)?;
        self.client
            .change_message_visibility()
            .queue_url(url)
            .receipt_handle(receipt_handle)
            .visibility_timeout(delay.min(MAX_DELAY).as_secs() as i32)
            .send()
            .await
            .map_err(|e| Error::store(format!("SQS ChangeMessageVisibility: {}", sdk_error(&e))))?;
        Ok(())
    }

    async fn send(&self, event: &StageEvent) -> Result<()> {
        self.send_later(event, std::time::Duration::ZERO).await
    }
}
