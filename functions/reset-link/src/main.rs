//! The `reset-link` stage as an AWS Lambda function: SQS batch in, partial batch failures out.
//! Everything but the stage's name lives in `relink_shared::lambda`.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    relink_shared::lambda::run_function(relink_shared::model::Stage::ResetLink).await
}
