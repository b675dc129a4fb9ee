//! Polls LCS environment history and Power Platform operations on a schedule and queues a run
//! per newly completed restore. Everything lives in `relink_shared::watch`.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    relink_shared::watch::run_function().await
}
