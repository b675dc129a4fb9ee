//! Signed restore notifications (Lambda function URL) to the detect-mismatch queue.
//! Everything lives in `relink_aws::ingest`.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    relink_aws::ingest::run_function().await
}
