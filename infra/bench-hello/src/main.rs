//! Hello world on `lambda_runtime`: the baseline relink's functions' cold start is compared with
//! (built with the same release profile, in the same benchmark run).

use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| async move {
        Ok::<Value, Error>(serde_json::json!({"hello": event.payload}))
    }))
    .await
}
