//! Signed restore notifications (Lambda function URL) to the detect-mismatch queue.
//! Everything lives in `relink_shared::ingest`.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    relink_shared::ingest::run_function().await
}
