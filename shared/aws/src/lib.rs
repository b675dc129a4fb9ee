//! AWS adapters: the DynamoDB progress store and registry, the SQS stage queues, Secrets
//! Manager, the layout (names, timeouts) shared by the SAM template and the local stack, and
//! the Lambda handlers (stage batches, signed notifications, the restore watcher) with the one
//! start-up routine every function's `main` calls.

pub mod dynamo;
pub mod ingest;
pub mod lambda;
pub mod metrics;
pub mod registry;
pub mod secrets;
pub mod sns;
pub mod sqs;
pub mod stack;
pub mod watch;

use std::time::Duration;

use relink_core::model::Stage;

/// Loads the SDK configuration from the environment (region, credentials, and
/// `AWS_ENDPOINT_URL` for a local stack). The SDK's HTTPS client uses rustls with *ring*, the
/// crypto provider the Dynamics client (reqwest) uses too: one crypto library in every binary
/// instead of ring and aws-lc side by side (docs/BENCHMARKS.md, binary size).
pub async fn sdk_config() -> aws_config::SdkConfig {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    let https = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(https)
        .load()
        .await
}

/// A required environment variable of a function.
pub fn env_var(name: &str) -> relink_core::Result<String> {
    std::env::var(name)
        .map_err(|_| relink_core::Error::Config(format!("environment variable {name} is not set")))
}

/// What every function starts from: the SDK configuration and the table named by `RELINK_TABLE`.
pub async fn function_base() -> relink_core::Result<(aws_config::SdkConfig, dynamo::DynamoStore)> {
    let config = sdk_config().await;
    let store = dynamo::DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&config),
        env_var("RELINK_TABLE")?,
    );
    Ok((config, store))
}

/// A sender to the detect-mismatch queue only, at `DETECT_QUEUE_URL` (ingest and watcher).
/// The watcher's queues: detect-mismatch (new runs) and reset-link (checks of an awaited Reset).
pub fn watcher_queues(config: &aws_config::SdkConfig) -> relink_core::Result<sqs::SqsQueue> {
    let urls = std::collections::HashMap::from([
        (Stage::DetectMismatch, env_var("DETECT_QUEUE_URL")?),
        (Stage::ResetLink, env_var("RESET_QUEUE_URL")?),
    ]);
    Ok(sqs::SqsQueue::new(aws_sdk_sqs::Client::new(config), urls))
}

pub fn detect_queue(config: &aws_config::SdkConfig) -> relink_core::Result<sqs::SqsQueue> {
    let urls =
        std::collections::HashMap::from([(Stage::DetectMismatch, env_var("DETECT_QUEUE_URL")?)]);
    Ok(sqs::SqsQueue::new(aws_sdk_sqs::Client::new(config), urls))
}

/// Each function's timeout in the template; the queue's visibility timeout is six times it.
pub fn function_timeout(stage: Stage) -> Duration {
    Duration::from_secs(match stage {
        Stage::DetectMismatch => 120,
        Stage::PurgeKeys => 300,
        Stage::ClearDataverseConfigs => 900,
        // A gateway reset waits for the maps to stop and the Reset to finish (at most 780 s).
        Stage::ResetLink => 900,
    })
}

/// Visibility timeout of a stage queue: at least six times the function timeout (AWS's guidance
/// for SQS event sources, so a retried batch never overlaps a running one).
pub fn visibility_timeout(stage: Stage) -> Duration {
    function_timeout(stage) * 6
}

/// Deliveries before a message moves to the stage's dead-letter queue.
pub const MAX_RECEIVE_COUNT: u32 = 5;

/// Queue names: `{prefix}{stage}` and `{prefix}{stage}-dlq`.
#[derive(Clone, Debug)]
pub struct QueueNames {
    pub prefix: String,
}

impl QueueNames {
    /// The stage's queue.
    pub fn queue(&self, stage: Stage) -> String {
        format!("{}{}", self.prefix, stage.as_str())
    }
    /// The stage's dead-letter queue.
    pub fn dlq(&self, stage: Stage) -> String {
        format!("{}{}-dlq", self.prefix, stage.as_str())
    }
}

/// The SDK's full error text (its `Display` alone says only "service error").
pub fn sdk_error<E: std::error::Error>(e: &E) -> String {
    relink_core::error::chain(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The local stack (tests) and the SAM template must not drift apart.
    #[test]
    fn the_template_matches_the_layout_the_code_assumes() {
        let template = include_str!("../../../template.yaml");
        for stage in Stage::ALL {
            let timeout = function_timeout(stage).as_secs();
            let vis = visibility_timeout(stage).as_secs();
            assert!(vis >= 6 * timeout);
            assert!(
                template.contains(&format!(
                    "QueueName: !Sub \"${{QueuePrefix}}{}\"",
                    stage.as_str()
                )),
                "{stage} queue"
            );
            assert!(
                template.contains(&format!(
                    "QueueName: !Sub \"${{QueuePrefix}}{}-dlq\"",
                    stage.as_str()
                )),
                "{stage} DLQ"
            );
            assert!(
                template.contains(&format!("Binary: {}", stage.as_str())),
                "{stage} function"
            );
            assert!(
                template.contains(&format!(
                    "VisibilityTimeout: {vis} # 6 x the function timeout ({timeout} s)"
                )),
                "{stage} visibility"
            );
            assert!(
                template.contains(&format!("Timeout: {timeout}\n")),
                "{stage} timeout"
            );
        }
        assert_eq!(
            template
                .matches(&format!("maxReceiveCount: {MAX_RECEIVE_COUNT}"))
                .count(),
            4
        );
        assert_eq!(template.matches("ReportBatchItemFailures").count(), 4);
        assert!(template.contains(&format!("IndexName: {}", dynamo::GSI1)));
        // Least privilege: every statement that may write items is held to its partitions (no
        // function writes registry entries), each stage function may move only its own queue's
        // messages, and the public function has reserved concurrency.
        for statement in template.split("- Sid: ").skip(1) {
            let statement = statement.split("\n        - ").next().unwrap_or_default();
            if [
                "dynamodb:PutItem",
                "dynamodb:UpdateItem",
                "dynamodb:DeleteItem",
            ]
            .iter()
            .any(|a| statement.contains(a))
            {
                assert!(
                    statement.contains("dynamodb:LeadingKeys"),
                    "a write statement without LeadingKeys: {statement}"
                );
            }
        }
        assert_eq!(template.matches("ForAllValues:StringNotLike").count(), 4);
        // Four stage functions (own and next queue), ingest (detect), the watcher (detect, reset).
        assert_eq!(template.matches("QUEUE_URL: !Ref ").count(), 4 + 3 + 1 + 2);
        assert!(template.contains("ReservedConcurrentExecutions: !Ref IngestConcurrency"));
        // The stage functions, and they only, publish notices to the stack's topic.
        assert_eq!(template.matches("SNSPublishMessagePolicy:").count(), 4);
        assert!(template.contains("NOTICE_TOPIC_ARN: !Ref NoticesTopic"));
        assert!(template.contains("AttributeName: expires_at"));
        assert_eq!(
            QueueNames {
                prefix: "relink-".into()
            }
            .dlq(Stage::PurgeKeys),
            "relink-purge-keys-dlq"
        );
    }
}
