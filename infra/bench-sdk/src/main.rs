//! A minimal SDK Lambda: builds the SDK configuration and a DynamoDB client in `main` (with the
//! same rustls + ring HTTPS client as relink's functions), then answers each event with one
//! `GetItem` (table `RELINK_TABLE`, key `BENCH_PK` / `BENCH_SK`) and an empty SQS batch
//! response. relink-bench compares the stage functions' cold first event with it, both built
//! with the release profile in the same run.

use aws_sdk_dynamodb::types::AttributeValue;
use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    let https = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https();
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(https)
        .load()
        .await;
    let client = aws_sdk_dynamodb::Client::new(&config);
    let table = std::env::var("RELINK_TABLE")?;
    let (pk, sk) = (std::env::var("BENCH_PK")?, std::env::var("BENCH_SK")?);
    let (client, table, pk, sk) = (&client, &table, &pk, &sk);
    lambda_runtime::run(service_fn(|_: LambdaEvent<Value>| async move {
        client
            .get_item()
            .table_name(table)
            .key("PK", AttributeValue::S(pk.clone()))
            .key("SK", AttributeValue::S(sk.clone()))
            .consistent_read(true)
            .send()
            .await?;
        Ok::<Value, Error>(serde_json::json!({"batchItemFailures": []}))
    }))
    .await
}
