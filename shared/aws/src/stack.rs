//! Creates the table and the queues the way template.yaml defines them, for local stacks
//! (moto) and tests. AWS deployments use the template instead.

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType, TimeToLiveSpecification,
};
use aws_sdk_sqs::types::QueueAttributeName;

use super::dynamo::GSI1;
use super::{MAX_RECEIVE_COUNT, QueueNames, sdk_error, visibility_timeout};
use relink_core::error::{Error, Result};
use relink_core::model::Stage;

/// Creates the progress table: PK/SK, `gsi1`, on-demand, TTL on `expires_at`.
pub async fn create_table(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<()> {
    let attr = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("set")
    };
    let key = |name: &str, t: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(t)
            .build()
            .expect("set")
    };
    let res = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("PK"))
        .attribute_definitions(attr("SK"))
        .attribute_definitions(attr("gsi1pk"))
        .attribute_definitions(attr("gsi1sk"))
        .key_schema(key("PK", KeyType::Hash))
        .key_schema(key("SK", KeyType::Range))
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name(GSI1)
                .key_schema(key("gsi1pk", KeyType::Hash))
                .key_schema(key("gsi1sk", KeyType::Range))
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::All)
                        .build(),
                )
                .build()
                .expect("set"),
        )
        .send()
        .await;
    if let Err(e) = res {
        let text = sdk_error(&e);
        if !text.contains("ResourceInUse") {
            return Err(Error::store(format!(
                "DynamoDB CreateTable {table}: {text}"
            )));
        }
    }
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .attribute_name("expires_at")
                .enabled(true)
                .build()
                .expect("set"),
        )
        .send()
        .await
        .map_err(|e| {
            Error::store(format!(
                "DynamoDB UpdateTimeToLive {table}: {}",
                sdk_error(&e)
            ))
        })?;
    Ok(())
}

/// Creates each stage's queue and dead-letter queue with the template's settings. A shorter
/// visibility timeout can be given for tests (the template's is six times the function timeout).
pub async fn create_queues(
    client: &aws_sdk_sqs::Client,
    names: &QueueNames,
    visibility_override: Option<Duration>,
) -> Result<()> {
    for stage in Stage::ALL {
        let dlq = client
            .create_queue()
            .queue_name(names.dlq(stage))
            .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
            .send()
            .await
            .map_err(|e| {
                Error::store(format!(
                    "SQS CreateQueue {}: {}",
                    names.dlq(stage),
                    sdk_error(&e)
                ))
            })?;
        let dlq_url = dlq.queue_url().unwrap_or_default().to_string();
        let attrs = client
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| Error::store(format!("SQS GetQueueAttributes: {}", sdk_error(&e))))?;
        let dlq_arn = attrs
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .cloned()
            .unwrap_or_default();
        let visibility = visibility_override.unwrap_or_else(|| visibility_timeout(stage));
        client
            .create_queue()
            .queue_name(names.queue(stage))
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                visibility.as_secs().to_string(),
            )
            .attributes(QueueAttributeName::MessageRetentionPeriod, "345600")
            .attributes(
                QueueAttributeName::RedrivePolicy,
                format!(
                    r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":{MAX_RECEIVE_COUNT}}}"#
                ),
            )
            .send()
            .await
            .map_err(|e| {
                Error::store(format!(
                    "SQS CreateQueue {}: {}",
                    names.queue(stage),
                    sdk_error(&e)
                ))
            })?;
    }
    Ok(())
}

/// Creates the notices topic (idempotent) and returns its ARN.
pub async fn create_topic(client: &aws_sdk_sns::Client, name: &str) -> Result<String> {
    let out = client
        .create_topic()
        .name(name)
        .send()
        .await
        .map_err(|e| Error::store(format!("SNS CreateTopic {name}: {}", sdk_error(&e))))?;
    Ok(out.topic_arn().unwrap_or_default().to_string())
}
