//! The `detect-mismatch` stage as an AWS Lambda function: SQS batch in, partial batch failures out.
//! Everything but the stage's name lives in `relink_aws::lambda`.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    relink_aws::lambda::run_function(relink_core::model::Stage::DetectMismatch).await
}
