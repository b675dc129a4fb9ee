//! The restore watcher (`watch-restores`, on a schedule): for each registered environment with a
//! `watch` section, reads LCS environment history and/or Power Platform operations, and queues
//! one run per completed restore-type operation newer than the last one seen. Entries are read
//! with the notification parser, so "completed restore" means the same thing on both paths, and
//! runs are deduplicated by operation id exactly like notifications. A source that fails keeps
//! its cursor, so nothing is skipped; LCS's limit (6 calls per environment per 30 s) is kept
//! here and its 429s wait for `Retry-After`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::http::token::EntraTokens;
use crate::http::{Http, Service};
use crate::ingest::{Started, start_run};
use crate::lambda::RegistrySource;
use crate::notify::{self, Parsed};
use crate::ports::{ProgressStore, StageQueue, TokenSource};
use crate::registry::{EnvConfig, LcsWatch, Secret, join};

const LCS: Service = Service {
    name: "LCS",
    auth_hint: "LCS accepts only delegated (user) tokens: refresh the token held in watch.lcs_token (e.g. with d365fo.tools Get-D365LcsApiToken) and check the user can see the project",
};
const POWER_PLATFORM: Service = Service {
    name: "Power Platform",
    auth_hint: "check that the app registration is registered as a Power Platform management application (New-PowerAppManagementApp) in this tenant",
};
/// LCS allows 6 calls per environment per 30 seconds.
const LCS_CALLS: usize = 6;
const LCS_WINDOW: Duration = Duration::from_secs(30);
/// Pages read per environment and poll at most (LCS history is newest first).
const MAX_LCS_PAGES: u32 = 20;

/// What one poll did.
#[derive(Debug, Default, Serialize)]
pub struct WatchReport {
    /// Runs queued: environment, run id, operation id.
    pub started: Vec<(String, String, String)>,
    /// Operations seen before (their run exists).
    pub already_seen: usize,
    /// Sources that failed this time: environment, source, error. Their cursors did not move.
    pub errors: Vec<(String, String, String)>,
}

/// The watcher's clients and state, built once.
pub struct Watcher {
    pub registry: Arc<dyn RegistrySource>,
    pub store: Arc<dyn ProgressStore>,
    /// Sends to the detect-mismatch queue.
    pub queue: Arc<dyn StageQueue>,
    pub http: Arc<Http>,
    lcs_calls: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// Power Platform token sources by environment, kept across polls so a token is reused
    /// until it expires (rebuilt when the secret changes).
    pp_tokens: Mutex<HashMap<String, (Secret, Arc<EntraTokens>)>>,
}

/// Reads a time LCS or Power Platform wrote: RFC 3339, or a UTC date-time without offset.
fn parse_time(v: Option<&Value>) -> Option<Timestamp> {
    let s = v?.as_str()?;
    s.parse::<Timestamp>().ok().or_else(|| {
        s.parse::<jiff::civil::DateTime>()
            .ok()?
            .to_zoned(jiff::tz::TimeZone::UTC)
            .ok()
            .map(|z| z.timestamp())
    })
}

impl Watcher {
    /// A watcher over the given adapters.
    pub fn new(
        registry: Arc<dyn RegistrySource>,
        store: Arc<dyn ProgressStore>,
        queue: Arc<dyn StageQueue>,
        http: Arc<Http>,
    ) -> Watcher {
        Watcher {
            registry,
            store,
            queue,
            http,
            lcs_calls: Mutex::new(HashMap::new()),
            pp_tokens: Mutex::new(HashMap::new()),
        }
    }

    /// Polls every watched environment once.
    pub async fn poll(&self) -> Result<WatchReport> {
        let registry = self.registry.registry().await?;
        let mut report = WatchReport::default();
        for env in registry.iter() {
            let Some(watch) = &env.watch else { continue };
            if let Some(lcs) = &watch.lcs
                && let Err(e) = self
                    .poll_source(
                        env,
                        "lcs",
                        watch.lookback,
                        &mut report,
                        self.lcs_entries(lcs),
                    )
                    .await
            {
                tracing::warn!(environment_id = %env.id, error = %e, "LCS history could not be read; will try again next poll");
                report
                    .errors
                    .push((env.id.clone(), "lcs".into(), e.to_string()));
            }
            if let Some(api) = &watch.power_platform
                && let Err(e) = self
                    .poll_source(
                        env,
                        "power-platform",
                        watch.lookback,
                        &mut report,
                        self.power_platform_ops(env, api),
                    )
                    .await
            {
                tracing::warn!(environment_id = %env.id, error = %e, "Power Platform operations could not be read; will try again next poll");
                report
                    .errors
                    .push((env.id.clone(), "power-platform".into(), e.to_string()));
            }
        }
        Ok(report)
    }

    /// Starts a run for each completed restore newer than the source's cursor, then moves the
    /// cursor to the newest completion seen. Fails without moving the cursor if reading fails.
    async fn poll_source(
        &self,
        env: &EnvConfig,
        source: &str,
        lookback: Duration,
        report: &mut WatchReport,
        entries: impl Future<Output = Result<Vec<(Timestamp, Value)>>>,
    ) -> Result<()> {
        let key = format!("{}/{source}", env.id);
        let now = Timestamp::now();
        let cursor = match self.store.get_cursor(&key).await? {
            Some(c) => c
                .parse::<Timestamp>()
                .map_err(|e| Error::Store(format!("cursor {key}: {e}")))?,
            None => now - lookback,
        };
        let mut newest = cursor;
        for (completed, entry) in entries.await? {
            if completed <= cursor {
                continue;
            }
            newest = newest.max(completed);
            let Ok(Parsed::Restore(notice)) = notify::parse(entry.to_string().as_bytes()) else {
                continue;
            };
            match start_run(
                self.store.as_ref(),
                self.queue.as_ref(),
                &env.id,
                &notice,
                now,
            )
            .await?
            {
                Started::New(run_id) => {
                    tracing::info!(environment_id = %env.id, run_id = %run_id, operation_id = %notice.operation_id, source, "restore seen; run queued");
                    report
                        .started
                        .push((env.id.clone(), run_id, notice.operation_id));
                }
                Started::Seen(_) => report.already_seen += 1,
            }
        }
        if newest > cursor {
            self.store.put_cursor(&key, &newest.to_string()).await?;
        }
        Ok(())
    }

    /// Waits for a slot in LCS's per-environment call window.
    async fn lcs_slot(&self, environment_id: &str) {
        loop {
            let wait = {
                let mut calls = self.lcs_calls.lock().await;
                let q = calls
                    .entry(environment_id.to_ascii_lowercase())
                    .or_default();
                let now = Instant::now();
                while q
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= LCS_WINDOW)
                {
                    q.pop_front();
                }
                if q.len() < LCS_CALLS {
                    q.push_back(now);
                    return;
                }
                LCS_WINDOW - now.duration_since(*q.front().expect("full window"))
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Completed entries of LCS history (newest first), until the pages run out.
    async fn lcs_entries(&self, lcs: &LcsWatch) -> Result<Vec<(Timestamp, Value)>> {
        let token = lcs.token.clone().ok_or_else(|| {
            Error::Config(match &lcs.token_source {
                crate::registry::SecretSource::Env(var) => {
                    format!("watch.lcs_token: the environment variable {var} is not set")
                }
                crate::registry::SecretSource::SecretArn(arn) => {
                    format!("watch.lcs_token: the secret {arn} could not be read")
                }
            })
        })?;
        let base = join(
            &lcs.api,
            &format!(
                "environmentinfo/v1/history/project/{}/environment/{}/",
                lcs.project_id, lcs.environment_id
            ),
        );
        let mut out = Vec::new();
        for page in 1..=MAX_LCS_PAGES {
            self.lcs_slot(&lcs.environment_id).await;
            let mut url = base.clone();
            url.query_pairs_mut().append_pair("page", &page.to_string());
            let build = |_: Option<&str>| {
                self.http
                    .client()
                    .get(url.clone())
                    .bearer_auth(token.expose())
                    .header("Accept", "application/json")
            };
            let resp = self.http.send(LCS, None, &build).await?;
            let body: Value = resp.json().await.map_err(|e| Error::Protocol {
                service: LCS.name,
                detail: e.to_string(),
            })?;
            if body.get("IsSuccess") != Some(&Value::Bool(true)) {
                let why = body
                    .get("ErrorMessage")
                    .and_then(Value::as_str)
                    .unwrap_or("no message");
                return Err(Error::Unavailable {
                    service: LCS.name,
                    attempts: 1,
                    detail: format!("IsSuccess is false: {why}"),
                    retry_after: None,
                });
            }
            for entry in body
                .get("Data")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
            {
                if let Some(t) = parse_time(entry.get("EndDateTimeUtc")) {
                    out.push((t, entry));
                }
            }
            if body.get("ResultHasMorePages") != Some(&Value::Bool(true)) {
                break;
            }
        }
        Ok(out)
    }

    /// Power Platform operations of the environment (app token, client credentials).
    async fn power_platform_ops(
        &self,
        env: &EnvConfig,
        api: &url::Url,
    ) -> Result<Vec<(Timestamp, Value)>> {
        let pp_env = env
            .power_platform_environment_id
            .as_deref()
            .expect("validated with watch.power_platform");
        let secret = env.client_secret.clone().ok_or_else(|| {
            Error::Config(format!("the client secret of `{}` is not resolved", env.id))
        })?;
        let tokens = {
            let mut cache = self.pp_tokens.lock().await;
            match cache.get(&env.id) {
                Some((cached, tokens)) if *cached == secret => tokens.clone(),
                _ => {
                    let tokens = Arc::new(EntraTokens::new(
                        self.http.clone(),
                        &env.authority,
                        &env.tenant_id,
                        &env.client_id,
                        secret.clone(),
                    ));
                    cache.insert(env.id.clone(), (secret, tokens.clone()));
                    tokens
                }
            }
        };
        let scope = EnvConfig::scope_for(api);
        let mut url = join(
            api,
            &format!("environmentmanagement/environments/{pp_env}/operations"),
        );
        url.query_pairs_mut()
            .append_pair("api-version", "2022-03-01-preview");
        let build = |token: Option<&str>| {
            self.http
                .client()
                .get(url.clone())
                .bearer_auth(token.unwrap_or_default())
        };
        let resp = self
            .http
            .send(
                POWER_PLATFORM,
                Some((tokens.as_ref() as &dyn TokenSource, &scope)),
                &build,
            )
            .await?;
        let body: Value = resp.json().await.map_err(|e| Error::Protocol {
            service: POWER_PLATFORM.name,
            detail: e.to_string(),
        })?;
        let ops = body
            .get("value")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        Ok(ops
            .into_iter()
            .filter_map(|op| {
                let done = parse_time(op.get("lastActionDateTime"))
                    .or_else(|| parse_time(op.get("createdDateTime")))?;
                let mut op = op;
                if op.get("environmentId").is_none() {
                    op["environmentId"] = Value::String(pp_env.to_string());
                }
                Some((done, op))
            })
            .collect())
    }
}

/// The whole `main` of the watch-restores function (EventBridge schedule).
pub async fn run_function() -> Result<(), lambda_runtime::Error> {
    crate::lambda::init_tracing();
    let watcher = crate::lambda::Deferred::start(|| Box::pin(watcher()));
    lambda_runtime::run(lambda_runtime::service_fn(
        |_: lambda_runtime::LambdaEvent<Value>| {
            let watcher = watcher.clone();
            async move {
                let report = watcher.get().await?.poll().await?;
                Ok::<_, lambda_runtime::Error>(serde_json::to_value(&report)?)
            }
        },
    ))
    .await
}

/// The watcher over the function's table, detect queue and HTTP client; the registry loads in
/// the background.
async fn watcher() -> crate::Result<Watcher> {
    let (config, store) = crate::aws::function_base().await?;
    let queue = crate::aws::detect_queue(&config)?;
    let http = Arc::new(Http::new(
        crate::http::RetryPolicy::default(),
        Arc::new(crate::progress::TracingSink),
    )?);
    let registry = Arc::new(crate::aws::registry::TableRegistry::new(
        store.clone(),
        crate::aws::secrets::SecretResolver::new(&config),
    ));
    crate::aws::warm_up(registry.clone());
    Ok(Watcher::new(
        registry,
        Arc::new(store),
        Arc::new(queue),
        http,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lcs_and_power_platform_times_are_read() {
        assert!(parse_time(Some(&Value::String("2026-11-26T05:00:00Z".into()))).is_some());
        assert_eq!(
            parse_time(Some(&Value::String("2026-11-26T05:00:00.123".into()))),
            Some("2026-11-26T05:00:00.123Z".parse().unwrap())
        );
        assert!(parse_time(Some(&Value::Null)).is_none());
    }
}
