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

use relink_core::error::{Error, Result};
use relink_core::notify::{self, Parsed};
use relink_core::ports::RegistrySource;
use relink_core::ports::{ProgressStore, SecretStore, StageQueue, TokenSource};
use relink_core::registry::{EnvConfig, LcsWatch, join};
use relink_core::trigger::{Started, start_run};
use relink_dynamics::delegated::DelegatedTokens;
use relink_dynamics::token::{ClientSecret, EntraTokens};
use relink_dynamics::{Http, POWER_PLATFORM, Service, read_json};

const LCS: Service = Service {
    name: "LCS",
    auth_hint: "LCS accepts only delegated (user) tokens: refresh the token held in watch.lcs_token (e.g. with d365fo.tools Get-D365LcsApiToken) and check the user can see the project",
};
/// LCS allows 6 calls per environment per 30 seconds.
const LCS_CALLS: usize = 6;
const LCS_WINDOW: Duration = Duration::from_secs(30);
/// Pages of Power Platform operations read per environment and poll at most.
const MAX_PP_PAGES: usize = 50;
/// Longest continuation token taken as real.
const MAX_CONTINUATION_TOKEN: usize = 4096;
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
    /// Entries the watcher could not use (no id, no completion time, not a notice it reads):
    /// environment, source, why. They do not hold the source back.
    pub skipped: Vec<(String, String, String)>,
    /// Runs awaiting the operator's Reset whose check was due: a `reset-link` event was sent
    /// for each (environment, run id), and the stage verifies the link again.
    pub rechecks: Vec<(String, String)>,
    /// Drift probes started (environment, run id): a run of trigger source `probe`.
    pub probes: Vec<(String, String)>,
}

/// What a source listed: usable entries with their completion time, or why one is not usable.
type Entries = Vec<std::result::Result<(Timestamp, Value), String>>;

/// The watcher's clients and state, built once.
pub struct Watcher {
    pub registry: Arc<dyn RegistrySource>,
    pub store: Arc<dyn ProgressStore>,
    /// Sends to the detect-mismatch queue (new runs) and the reset-link queue (checks of an
    /// awaited Reset).
    pub queue: Arc<dyn StageQueue>,
    pub http: Arc<Http>,
    /// Where the client secrets and LCS tokens the entries name are read from.
    pub secrets: Arc<dyn SecretStore>,
    lcs_calls: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// Power Platform token sources by environment, kept across polls so a token is reused
    /// until it expires (rebuilt when the entry changes: keyed by its fingerprint).
    pp_tokens: Mutex<HashMap<String, (String, Arc<EntraTokens>)>>,
    /// LCS sign-ins (`watch.lcs_sign_in`) by environment, with the fingerprint of their entry.
    lcs_sign_ins: Mutex<HashMap<String, (String, Arc<DelegatedTokens>)>>,
    /// Where the fleet gauge goes (stdout in Lambda); `None` (the CLI) skips computing it.
    pub metrics: Option<Arc<dyn crate::metrics::MetricsSink>>,
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
        secrets: Arc<dyn SecretStore>,
    ) -> Watcher {
        Watcher {
            registry,
            store,
            queue,
            http,
            secrets,
            lcs_calls: Mutex::new(HashMap::new()),
            pp_tokens: Mutex::new(HashMap::new()),
            lcs_sign_ins: Mutex::new(HashMap::new()),
            metrics: None,
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
                        self.lcs_entries(env, lcs),
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
        self.awaiting_resets(&registry, &mut report).await;
        Ok(report)
    }

    /// Runs awaiting the operator's Reset, over every registered environment (one read each):
    /// sends a `reset-link` event for each whose check is due (`verify.every_seconds`), and
    /// emits the fleet gauge behind the "Reset overdue" alarm, how long the longest-waiting
    /// Reset has been due. Best effort: what fails is tried again at the next poll.
    async fn awaiting_resets(
        &self,
        registry: &relink_core::registry::Registry,
        report: &mut WatchReport,
    ) {
        use relink_core::model::{RunStatus, Stage};
        let now = Timestamp::now();
        let mut oldest = 0.0f64;
        let mut probes = Vec::new();
        for env in registry.iter() {
            let run = match self.store.latest_run(&env.id).await {
                Ok(Some(run)) if run.status == RunStatus::AwaitingConfirmation => run,
                // No probe while a run is under way: it would find the link it is repairing.
                Ok(latest) => {
                    if let Some(slot) = relink_core::probe::due(env, latest.as_ref(), now) {
                        probes.push((env, slot));
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(environment_id = %env.id, error = %e, "cannot read the latest run to check an awaited Reset");
                    report
                        .errors
                        .push((env.id.clone(), "recheck".into(), e.to_string()));
                    continue;
                }
            };
            let since = run
                .stage(Stage::ResetLink)
                .started_at
                .unwrap_or(run.updated_at);
            oldest = oldest.max((now - since).get_seconds().max(0) as f64);
            if !relink_core::pipeline::check_due(&run, env, now) {
                continue;
            }
            let event = relink_core::event::StageEvent {
                version: relink_core::event::SCHEMA_VERSION,
                run_id: Some(run.run_id.clone()),
                environment_id: env.id.clone(),
                stage: Stage::ResetLink,
                trigger: run.trigger.clone(),
                options: run.options,
                carried: None,
            };
            match self.queue.send(&event).await {
                Ok(()) => report.rechecks.push((env.id.clone(), run.run_id.clone())),
                Err(e) => {
                    tracing::warn!(environment_id = %env.id, run_id = %run.run_id, error = %e, "cannot queue the check of an awaited Reset");
                    report
                        .errors
                        .push((env.id.clone(), "recheck".into(), e.to_string()));
                }
            }
        }
        for (env, started) in
            relink_core::probe::start_due(self.store.as_ref(), self.queue.as_ref(), probes, now)
                .await
        {
            match started {
                Ok(run_id) => report.probes.push((env, run_id)),
                Err(e) => {
                    tracing::warn!(environment_id = %env, error = %e, "cannot queue a drift probe; will try again next poll");
                    report.errors.push((env, "probe".into(), e.to_string()));
                }
            }
        }
        if let Some(metrics) = &self.metrics {
            crate::metrics::emit_seconds(
                metrics.as_ref(),
                crate::metrics::OLDEST_AWAITING_RESET,
                oldest,
            );
        }
    }

    /// Starts a run for each completed restore newer than the source's cursor, then moves the
    /// cursor to the newest completion seen. Fails without moving the cursor if reading fails.
    async fn poll_source(
        &self,
        env: &EnvConfig,
        source: &str,
        lookback: Duration,
        report: &mut WatchReport,
        entries: impl Future<Output = Result<Entries>>,
    ) -> Result<()> {
        let key = format!("{}/{source}", env.id);
        let now = Timestamp::now();
        let cursor = match self.store.get_cursor(&key).await? {
            Some(c) => c
                .parse::<Timestamp>()
                .map_err(|e| Error::store(format!("cursor {key}: {e}")))?,
            None => now - lookback,
        };
        let mut newest = cursor;
        for entry in entries.await? {
            let (completed, entry) = match entry {
                Ok(e) => e,
                Err(why) => {
                    tracing::warn!(environment_id = %env.id, source, reason = %why, "entry skipped");
                    report.skipped.push((env.id.clone(), source.into(), why));
                    continue;
                }
            };
            if completed <= cursor {
                continue;
            }
            newest = newest.max(completed);
            let notice = match notify::parse(entry.to_string().as_bytes()) {
                Ok(Parsed::Restore(notice)) => notice,
                Ok(_) => continue,
                Err(refusal) => {
                    let why = format!("{refusal:?}");
                    tracing::warn!(environment_id = %env.id, source, reason = %why, "entry skipped");
                    report.skipped.push((env.id.clone(), source.into(), why));
                    continue;
                }
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
    async fn lcs_entries(&self, env: &EnvConfig, lcs: &LcsWatch) -> Result<Entries> {
        let token = match (&lcs.sign_in, &lcs.token) {
            // A user's sign-in kept by relink: redeemed (and rotated) here.
            (Some(sign_in), _) => {
                let tokens = {
                    let fingerprint = format!("{env:?}");
                    let mut cache = self.lcs_sign_ins.lock().await;
                    match cache.get(&env.id) {
                        Some((seen, t)) if *seen == fingerprint => t.clone(),
                        _ => {
                            let t = Arc::new(DelegatedTokens::new(
                                self.http.clone(),
                                &env.authority,
                                &env.tenant_id,
                                sign_in,
                                self.secrets.clone(),
                                &env.id,
                                "lcs",
                            ));
                            cache.insert(env.id.clone(), (fingerprint, t.clone()));
                            t
                        }
                    }
                };
                relink_core::registry::Secret::new(
                    tokens
                        .token(relink_core::registry::LCS_SCOPE)
                        .await
                        .map_err(|e| Error::Config(format!("watch.lcs_sign_in: {e}")))?,
                )
            }
            (None, Some(token)) => token.clone(),
            (None, None) => self.secrets.secret(&lcs.token_source).await.map_err(|e| {
                Error::Config(format!(
                    "watch.lcs_token: {}",
                    relink_core::error::chain(&e)
                ))
            })?,
        };
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
            let body: Value = read_json(LCS, resp, "LCS history").await?;
            if body.get("IsSuccess") != Some(&Value::Bool(true)) {
                let why = body
                    .get("ErrorMessage")
                    .and_then(Value::as_str)
                    .unwrap_or("no message");
                let why =
                    relink_core::redact::printable(&why.chars().take(300).collect::<String>());
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
                // An entry without an end time has not finished: it is listed again later.
                if let Some(t) = parse_time(entry.get("EndDateTimeUtc")) {
                    out.push(Ok((t, entry)));
                }
            }
            if body.get("ResultHasMorePages") != Some(&Value::Bool(true)) {
                break;
            }
        }
        Ok(out)
    }

    /// Power Platform operations of the environment (app token, client credentials), as
    /// documented: `GET {api}/environmentmanagement/environments/{id}/operations?api-version=
    /// 2024-10-01` answers `{"collection": [...], "continuationToken": ...}`; each operation has
    /// `operationId`, `name`, `status`, `startTime`, `endTime`. Every page is read (bounded, and
    /// a token seen twice is an error); each completed operation becomes a Power Platform notice.
    async fn power_platform_ops(&self, env: &EnvConfig, api: &url::Url) -> Result<Entries> {
        let pp_env = env
            .power_platform_environment_id
            .as_deref()
            .expect("validated with watch.power_platform");
        let fingerprint = format!("{env:?}");
        let tokens = {
            let mut cache = self.pp_tokens.lock().await;
            match cache.get(&env.id) {
                Some((seen, tokens)) if *seen == fingerprint => tokens.clone(),
                _ => {
                    let secret = match &env.client_secret {
                        Some(s) => ClientSecret::Known(s.clone()),
                        None => {
                            ClientSecret::Stored(self.secrets.clone(), env.secret_source.clone())
                        }
                    };
                    let tokens = Arc::new(EntraTokens::new(
                        self.http.clone(),
                        &env.authority,
                        &env.tenant_id,
                        &env.client_id,
                        secret,
                    ));
                    cache.insert(env.id.clone(), (fingerprint, tokens.clone()));
                    tokens
                }
            }
        };
        let scope = EnvConfig::scope_for(api);
        let base = join(
            api,
            &format!("environmentmanagement/environments/{pp_env}/operations"),
        );
        let mut out = Vec::new();
        let mut tokens_seen = std::collections::HashSet::new();
        let mut continuation: Option<String> = None;
        for _ in 0..MAX_PP_PAGES {
            let mut url = base.clone();
            url.query_pairs_mut()
                .append_pair("api-version", relink_dynamics::POWER_PLATFORM_API_VERSION);
            if let Some(t) = &continuation {
                url.query_pairs_mut().append_pair("continuationToken", t);
            }
            let build = |token: Option<&str>| {
                self.http
                    .client()
                    .get(url.clone())
                    .header("Accept", "application/json")
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
            let body: Value = read_json(POWER_PLATFORM, resp, "Power Platform operations").await?;
            let Some(ops) = body.get("collection").and_then(Value::as_array) else {
                return Err(Error::Protocol {
                    service: POWER_PLATFORM.name,
                    detail: "the operations answer has no `collection` array".into(),
                });
            };
            out.extend(ops.iter().filter_map(|op| power_platform_entry(op, pp_env)));
            continuation = match body.get("continuationToken") {
                Some(Value::String(t)) if !t.is_empty() => Some(t.clone()),
                None | Some(Value::Null) => None,
                Some(Value::String(_)) => None,
                Some(_) => {
                    return Err(Error::Protocol {
                        service: POWER_PLATFORM.name,
                        detail: "`continuationToken` is not a string".into(),
                    });
                }
            };
            match &continuation {
                None => return Ok(out),
                Some(t) if t.len() > MAX_CONTINUATION_TOKEN || !tokens_seen.insert(t.clone()) => {
                    return Err(Error::Protocol {
                        service: POWER_PLATFORM.name,
                        detail: "the operations list repeats a continuation token (or sends one too long to be real): paging stopped".into(),
                    });
                }
                Some(_) => {}
            }
        }
        Err(Error::Protocol {
            service: POWER_PLATFORM.name,
            detail: format!(
                "the operations list goes on for more than {MAX_PP_PAGES} pages: paging stopped"
            ),
        })
    }
}

/// One documented Power Platform operation as a notice the parser reads, `None` while it has
/// not finished (it is listed again when it has), or why it cannot be used.
fn power_platform_entry(
    op: &Value,
    pp_env: &str,
) -> Option<std::result::Result<(Timestamp, Value), String>> {
    let text = |k: &str| op.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    let id = text("operationId");
    let status = text("status");
    let Some(end) = parse_time(op.get("endTime")) else {
        return match (id, status) {
            (Some(id), Some("Succeeded")) => Some(Err(format!(
                "operation {} succeeded without a readable endTime",
                relink_core::redact::printable(id)
            ))),
            _ => None,
        };
    };
    let (Some(id), Some(name), Some(status)) = (id, text("name"), status) else {
        return Some(Err(
            "an operation without operationId, name or status".into()
        ));
    };
    Some(Ok((
        end,
        serde_json::json!({"id": id, "operationType": name, "status": status, "environmentId": pp_env}),
    )))
}

/// The whole `main` of the watch-restores function (EventBridge schedule).
pub async fn run_function() -> Result<(), lambda_runtime::Error> {
    crate::lambda::serve(
        watcher(),
        |watcher, _: lambda_runtime::LambdaEvent<Value>| {
            Box::pin(async move { Ok(serde_json::to_value(watcher.poll().await?)?) })
        },
    )
    .await
}

async fn watcher() -> relink_core::Result<Watcher> {
    let (config, store) = crate::function_base().await?;
    let queue = crate::watcher_queues(&config)?;
    let http = Arc::new(Http::new(
        relink_dynamics::RetryPolicy::default(),
        Arc::new(relink_core::progress::TracingSink),
    )?);
    let mut watcher = Watcher::new(
        Arc::new(crate::registry::TableRegistry::new(store.clone())),
        Arc::new(store),
        Arc::new(queue),
        http,
        Arc::new(crate::secrets::SecretResolver::new(&config)),
    );
    watcher.metrics = Some(Arc::new(crate::metrics::Stdout));
    Ok(watcher)
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
