//! Polls LCS environment history and Power Platform operations on a schedule and queues a run
//! per newly completed restore. Everything lives in `relink_aws::watch`.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    relink_aws::watch::run_function().await
}
