//! The `ingest-notification` function: signed restore notifications in (Lambda function URL),
//! one v1 event per completed restore onto the detect queue, deduplicated by operation id.
//!
//! Answers: 202 `{run_id}`; 200 `{ignored}` for operations that did not complete or are not
//! restores; 400 unreadable body; 401 signature or timestamp; 404 no such environment; 409
//! already seen (with the existing run id); 503 when the registry or the queue is unavailable
//! (the sender should retry).

use std::sync::Arc;

use aws_lambda_events::event::lambda_function_urls::{
    LambdaFunctionUrlRequest, LambdaFunctionUrlResponse,
};
use base64::Engine as _;
use jiff::Timestamp;
use lambda_runtime::LambdaEvent;
use serde_json::{Value, json};

use relink_core::error::{Error, Result};
use relink_core::notify::{self, EnvRef, Parsed};
use relink_core::ports::RegistrySource;
use relink_core::ports::{ProgressStore, StageQueue};
use relink_core::registry::Secret;
use relink_core::trigger::{Started, start_run};

use crate::secrets::SecretResolver;

/// What the function is built from, once.
pub struct IngestDeps {
    pub registry: Arc<dyn RegistrySource>,
    pub store: Arc<dyn ProgressStore>,
    /// Sends to the detect-mismatch queue only.
    pub queue: Arc<dyn StageQueue>,
    /// The shared HMAC secret.
    pub secret: NotifyKey,
    /// Where EMF metrics go (stdout in Lambda).
    pub metrics: Arc<dyn crate::metrics::MetricsSink>,
}

/// The notification signing key: fixed (`RELINK_NOTIFY_SECRET`), or read from Secrets Manager
/// per notification through the resolver's cache, so a rotated key takes effect within
/// `SECRET_TTL` without a cold start, and the function's init makes no network call.
pub enum NotifyKey {
    /// A key given to the function directly.
    Value(Secret),
    /// A Secrets Manager secret (`NOTIFY_SECRET_ARN`).
    Stored(Arc<SecretResolver>, String),
}

/// Shortest signing key accepted: an HMAC-SHA256 key should carry at least its output's 32
/// bytes of entropy; a short one makes forged signatures guessable.
pub const MIN_NOTIFY_KEY_BYTES: usize = 32;

impl NotifyKey {
    async fn get(&self) -> Result<Secret> {
        let key = match self {
            NotifyKey::Value(s) => s.clone(),
            NotifyKey::Stored(store, arn) => store.get(arn).await?,
        };
        check_key(&key)?;
        Ok(key)
    }
}

/// Refuses a signing key shorter than [`MIN_NOTIFY_KEY_BYTES`].
fn check_key(key: &Secret) -> Result<()> {
    if key.expose().len() < MIN_NOTIFY_KEY_BYTES {
        return Err(relink_core::Error::Config(format!(
            "the notification signing key is {} bytes; it must be at least {MIN_NOTIFY_KEY_BYTES} (e.g. openssl rand -hex 32)",
            key.expose().len()
        )));
    }
    Ok(())
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

fn answer(status: u16, body: Value) -> Answer {
    Answer { status, body }
}

fn describe(r: &EnvRef) -> String {
    match r {
        EnvRef::Registry(id) => {
            format!("environment `{id}` is not in the registry (relink env push {id})")
        }
        EnvRef::Lcs(id) => format!("no registered environment has lcs_environment_id = \"{id}\""),
        EnvRef::PowerPlatform(id) => {
            format!("no registered environment has power_platform_environment_id = \"{id}\"")
        }
    }
}

/// Checks, reads and acts on one notification.
pub async fn ingest(
    deps: &IngestDeps,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: Timestamp,
) -> Answer {
    let a = ingest_once(deps, timestamp, signature, body, now).await;
    if a.status >= 400 {
        crate::metrics::emit_count(
            deps.metrics.as_ref(),
            crate::metrics::NOTIFICATION_FAILURES,
            1,
        );
    }
    a
}

async fn ingest_once(
    deps: &IngestDeps,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: Timestamp,
) -> Answer {
    let key = match deps.secret.get().await {
        Ok(key) => key,
        Err(e) => return unavailable(&e),
    };
    if let Err(r) = notify::verify(key.expose().as_bytes(), timestamp, signature, body, now) {
        tracing::warn!(reason = r.reason(), "notification refused");
        return answer(r.status(), json!({"error": r.reason()}));
    }
    let notice = match notify::parse(body) {
        Ok(Parsed::Restore(n)) => n,
        Ok(Parsed::Ignored(reason)) => {
            tracing::info!(%reason, "notification ignored");
            return answer(200, json!({"ignored": reason}));
        }
        Err(r) => return answer(r.status(), json!({"error": r.reason()})),
    };
    let registry = match deps.registry.registry().await {
        Ok(r) => r,
        Err(e) => return unavailable(&e),
    };
    let Some(env) = registry.find(&notice.environment) else {
        return answer(404, json!({"error": describe(&notice.environment)}));
    };
    let run_id = match start_run(
        deps.store.as_ref(),
        deps.queue.as_ref(),
        &env.id,
        &notice,
        now,
    )
    .await
    {
        Ok(Started::New(run_id)) => run_id,
        Ok(Started::Seen(existing)) => {
            return answer(
                409,
                json!({"error": format!("operation {} was already notified", notice.operation_id), "run_id": existing}),
            );
        }
        Err(e @ Error::BadEvent(_)) => return answer(400, json!({"error": e.to_string()})),
        Err(e) => return unavailable(&e),
    };
    tracing::info!(run_id = %run_id, environment_id = %env.id, operation = %notice.operation, operation_id = %notice.operation_id, "run started by notification");
    answer(
        202,
        json!({"run_id": run_id, "environment_id": env.id, "operation_id": notice.operation_id}),
    )
}

fn unavailable(e: &Error) -> Answer {
    tracing::error!(error = %e, "cannot act on the notification now");
    answer(
        503,
        json!({"error": "relink cannot record the notification right now; send it again later"}),
    )
}

/// The function URL handler.
pub async fn handle_url(
    deps: &IngestDeps,
    event: LambdaEvent<LambdaFunctionUrlRequest>,
) -> Result<LambdaFunctionUrlResponse, lambda_runtime::Error> {
    let req = event.payload;
    let method = req.request_context.http.method.clone().unwrap_or_default();
    let reply = if !method.eq_ignore_ascii_case("POST") {
        answer(405, json!({"error": "send notifications with POST"}))
    } else {
        let raw = req.body.unwrap_or_default();
        let body = if req.is_base64_encoded {
            base64::engine::general_purpose::STANDARD
                .decode(raw.as_bytes())
                .ok()
        } else {
            Some(raw.into_bytes())
        };
        match body {
            None => answer(400, json!({"error": "body is not valid base64"})),
            Some(body) => {
                let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
                ingest(
                    deps,
                    header(notify::TIMESTAMP_HEADER),
                    header(notify::SIGNATURE_HEADER),
                    &body,
                    Timestamp::now(),
                )
                .await
            }
        }
    };
    let mut resp = LambdaFunctionUrlResponse::default();
    resp.status_code = reply.status as i64;
    resp.headers.insert(
        "content-type",
        "application/json".parse().expect("static header"),
    );
    resp.body = Some(reply.body.to_string());
    Ok(resp)
}

/// The whole `main` of the ingest function: `RELINK_TABLE`, `DETECT_QUEUE_URL`, and the HMAC
/// secret from `NOTIFY_SECRET_ARN` (Secrets Manager) or `RELINK_NOTIFY_SECRET`.
pub async fn run_function() -> Result<(), lambda_runtime::Error> {
    crate::lambda::serve(ingest_deps(), |deps, event| {
        Box::pin(handle_url(deps, event))
    })
    .await
}

async fn ingest_deps() -> Result<IngestDeps> {
    let (config, store) = crate::function_base().await?;
    let secret = match std::env::var("NOTIFY_SECRET_ARN") {
        Ok(arn) if !arn.is_empty() => {
            NotifyKey::Stored(Arc::new(SecretResolver::new(&config)), arn)
        }
        _ => {
            let key = Secret::new(crate::env_var("RELINK_NOTIFY_SECRET")?);
            check_key(&key)?;
            NotifyKey::Value(key)
        }
    };
    let registry: Arc<dyn RegistrySource> =
        Arc::new(crate::registry::TableRegistry::new(store.clone()));
    Ok(IngestDeps {
        registry,
        store: Arc::new(store),
        queue: Arc::new(crate::detect_queue(&config)?),
        secret,
        metrics: Arc::new(crate::metrics::Stdout),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use relink_core::ports::StaticRegistry;
    use relink_embedded::queue::MemQueue;
    use relink_embedded::sqlite::SqliteStore;

    const SECRET: &str = "hook-secret-of-at-least-32-bytes-0123";

    fn deps() -> (IngestDeps, Arc<MemQueue>) {
        let text = "[environments.uat]\nkind = \"uat\"\nfno_url = \"https://uat.operations.dynamics.com\"\ndataverse_url = \"https://uat.crm.dynamics.com\"\n\
                    dataverse_unique_name = \"orguat\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = { env = \"S\" }\nlcs_environment_id = \"LCS-1\"\n";
        let registry = relink_core::registry::Registry::parse(text, |_| Some("x".into())).unwrap();
        let queue = Arc::new(MemQueue::default());
        let deps = IngestDeps {
            registry: Arc::new(StaticRegistry(Arc::new(registry))),
            store: Arc::new(SqliteStore::in_memory().unwrap()),
            queue: queue.clone(),
            secret: NotifyKey::Value(Secret::new(SECRET)),
            metrics: Arc::new(crate::metrics::Off),
        };
        (deps, queue)
    }

    async fn send(deps: &IngestDeps, body: &str) -> Answer {
        let now = Timestamp::now();
        let sig = notify::sign(SECRET.as_bytes(), now.as_second(), body.as_bytes());
        ingest(
            deps,
            Some(&now.as_second().to_string()),
            Some(&sig),
            body.as_bytes(),
            now,
        )
        .await
    }

    #[tokio::test]
    async fn a_signed_refresh_enqueues_one_run_and_a_repeat_is_a_conflict() {
        let (deps, queue) = deps();
        let body = r#"{"Type":"SFSourceDbToSandbox","Status":"Completed","ActivityId":"act-9","EnvironmentId":"lcs-1"}"#;
        let first = send(&deps, body).await;
        assert_eq!(first.status, 202, "{first:?}");
        let event = queue.pop().expect("an event on the detect queue");
        assert_eq!(event.environment_id, "uat");
        assert_eq!(event.trigger.source, "lcs");
        assert_eq!(event.trigger.operation_id.as_deref(), Some("act-9"));
        assert_eq!(event.run_id.as_deref(), first.body["run_id"].as_str());
        let again = send(&deps, body).await;
        assert_eq!(again.status, 409);
        assert_eq!(again.body["run_id"], first.body["run_id"]);
        assert!(queue.pop().is_none(), "nothing enqueued twice");
    }

    #[tokio::test]
    async fn a_signing_key_shorter_than_32_bytes_is_refused() {
        let (mut deps, queue) = deps();
        deps.secret = NotifyKey::Value(Secret::new("hook-secret"));
        let body = r#"{"environment_id":"uat","operation":"refresh","operation_id":"x"}"#;
        let now = Timestamp::now();
        let sig = notify::sign(b"hook-secret", now.as_second(), body.as_bytes());
        let a = ingest(
            &deps,
            Some(&now.as_second().to_string()),
            Some(&sig),
            body.as_bytes(),
            now,
        )
        .await;
        assert_eq!(a.status, 503, "{a:?}");
        assert!(queue.pop().is_none());
        assert!(check_key(&Secret::new("x".repeat(32))).is_ok());
    }

    #[tokio::test]
    async fn the_function_url_handler_reads_a_lambda_shaped_request() {
        let (deps, queue) = deps();
        let body = r#"{"environment_id":"uat","operation":"refresh","operation_id":"ado-run-42","completed_at":"2026-11-26T05:00:00Z"}"#;
        let now = Timestamp::now().as_second();
        let request = include_str!("../fixtures/function-url-notification.json")
            .replace("__TIMESTAMP__", &now.to_string())
            .replace(
                "__SIGNATURE__",
                &notify::sign(SECRET.as_bytes(), now, body.as_bytes()),
            )
            .replace(
                "__BODY__",
                &base64::engine::general_purpose::STANDARD.encode(body),
            );
        let request: LambdaFunctionUrlRequest =
            serde_json::from_str(&request).expect("fixture parses");
        let resp = handle_url(
            &deps,
            LambdaEvent::new(request, lambda_runtime::Context::default()),
        )
        .await
        .unwrap();
        assert_eq!(resp.status_code, 202, "{:?}", resp.body);
        assert_eq!(
            queue.pop().unwrap().trigger.operation_id.as_deref(),
            Some("ado-run-42")
        );
    }

    #[tokio::test]
    async fn every_rejection_has_its_status_and_enqueues_nothing() {
        let (deps, queue) = deps();
        let now = Timestamp::now();
        let body = br#"{"environment_id":"uat","operation":"refresh","operation_id":"x1"}"#;
        let bad_sig = ingest(
            &deps,
            Some(&now.as_second().to_string()),
            Some(&notify::sign(b"wrong", now.as_second(), body)),
            body,
            now,
        )
        .await;
        assert_eq!(bad_sig.status, 401);
        let old = now.as_second() - 600;
        let stale = ingest(
            &deps,
            Some(&old.to_string()),
            Some(&notify::sign(SECRET.as_bytes(), old, body)),
            body,
            now,
        )
        .await;
        assert_eq!(stale.status, 401);
        assert!(stale.body["error"].as_str().unwrap().contains("5 minutes"));
        assert_eq!(
            send(
                &deps,
                r#"{"environment_id":"nope","operation":"refresh","operation_id":"x2"}"#
            )
            .await
            .status,
            404
        );
        assert_eq!(send(&deps, "{not json").await.status, 400);
        let ignored = send(
            &deps,
            r#"{"environment_id":"uat","operation":"deploy","operation_id":"x3"}"#,
        )
        .await;
        assert_eq!(ignored.status, 200);
        assert!(
            ignored.body["ignored"]
                .as_str()
                .unwrap()
                .contains("not a restore")
        );
        assert!(queue.pop().is_none());
    }
}
