//! Simulators of the Microsoft services relink talks to, on one loopback HTTP server:
//! the Entra ID token endpoint, the Dataverse Web API and F&O OData, in Microsoft's documented
//! formats (OData JSON, `@odata.nextLink`, multipart `$batch`, OData error bodies, 429 with
//! `Retry-After`). State is seedable; faults (latency, 429s, 5xx, Dataverse's service
//! protection limits) are injectable; `/_sim/*` endpoints let tests inspect what happened.
//!
//! Paths: `{base}/{tenant}/oauth2/v2.0/token`, `{base}/dataverse/{org}/api/data/v9.2/...`,
//! `{base}/fno/{env}/data/...`. This crate shares no code with relink's clients.

mod multipart;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use multipart::{Answer, Operation};

const API: &str = "api/data/v9.2/";
const RUNTIME_SET: &str = "msdyn_dualwriteruntimeconfigs";
const RUNTIME_KEY: &str = "msdyn_dualwriteruntimeconfigid";
const RUNTIME_COLUMNS: [&str; 6] = [
    RUNTIME_KEY,
    "msdyn_name",
    "msdyn_status",
    "msdyn_configuration",
    "createdon",
    "modifiedon",
];
const FNO_SET: &str = "DualWriteProjectConfigurations";
const FNO_COLUMNS: [&str; 9] = [
    "ProjectName",
    "ExternalEnvironmentUrl",
    "InternalEntityName",
    "ExternalEntityName",
    "Status",
    "IsDelete",
    "dataAreaId",
    "ServiceBusConnectionString",
    "StorageAccountSASConnectionString",
];
const FNO_MAX_PAGE: usize = 10_000;
const DATAVERSE_MAX_PAGE: usize = 5_000;
const DATAVERSE_MAX_BATCH: usize = 1_000;

/// An app registration the token endpoint accepts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSeed {
    pub client_id: String,
    pub client_secret: String,
}

/// A Dataverse organisation to create (replacing one of the same name).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgSeed {
    /// Path segment: the organisation is served at `{base}/dataverse/{name}`.
    pub name: String,
    pub unique_name: String,
    #[serde(default)]
    pub organization_id: Option<uuid::Uuid>,
    #[serde(default)]
    pub friendly_name: Option<String>,
    /// Name of the simulated F&O environment this organisation reports it is integrated with.
    #[serde(default)]
    pub integrated_fno: Option<String>,
    /// Rows of `msdyn_dualwriteruntimeconfig` to create.
    #[serde(default)]
    pub runtime_configs: usize,
}

/// An F&O environment to create (replacing one of the same name).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FnoSeed {
    /// Path segment: the environment is served at `{base}/fno/{name}`.
    pub name: String,
    /// The organisation a Reset links this environment to.
    pub linked_organization: String,
    /// The organisation the seeded project configurations point at (the stale link); default: linked.
    #[serde(default)]
    pub points_at: Option<String>,
    #[serde(default)]
    pub project_configs: usize,
    #[serde(default)]
    pub field_configs: usize,
    #[serde(default)]
    pub business_events: usize,
    /// Path of the customer purge service, e.g. `/api/services/RelinkServices/RelinkPurgeService/purge`.
    #[serde(default)]
    pub purge_service_path: Option<String>,
    /// Project configurations the simulated Reset recreates (default 3).
    #[serde(default)]
    pub reset_project_configs: Option<usize>,
}

/// LCS environment history entries of one project environment, newest first.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LcsHistorySeed {
    pub project_id: String,
    pub environment_id: String,
    /// Entries in LCS's shape (`Name`, `Type`, `Status`, `ActivityId`, `EndDateTimeUtc`, ...).
    pub entries: Vec<Value>,
}

/// Power Platform operations of one environment.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerPlatformSeed {
    pub environment_id: String,
    pub operations: Vec<Value>,
}

/// Seed data; each list replaces objects of the same name.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    #[serde(default)]
    pub apps: Vec<AppSeed>,
    #[serde(default)]
    pub organizations: Vec<OrgSeed>,
    #[serde(default)]
    pub fno_environments: Vec<FnoSeed>,
    /// Bearer tokens LCS accepts (LCS takes delegated user tokens, which the simulator does not mint).
    #[serde(default)]
    pub lcs_tokens: Vec<String>,
    #[serde(default)]
    pub lcs_history: Vec<LcsHistorySeed>,
    #[serde(default)]
    pub power_platform: Vec<PowerPlatformSeed>,
}

/// Dataverse's service protection limits (per client, per organisation, sliding window).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Protection {
    pub requests: usize,
    pub execution_ms: u64,
    pub window_ms: u64,
    pub concurrent: usize,
}

impl Default for Protection {
    /// Dataverse's documented limits: 6,000 requests and 1,200 s per 300 s, 52 concurrent.
    fn default() -> Self {
        Protection {
            requests: 6000,
            execution_ms: 1_200_000,
            window_ms: 300_000,
            concurrent: 52,
        }
    }
}

impl Protection {
    /// The documented limits with the window (and the budgets in it) shrunk by `factor`.
    pub fn scaled(factor: u64) -> Protection {
        let d = Protection::default();
        let f = factor.max(1);
        Protection {
            requests: (d.requests as u64 / f).max(1) as usize,
            execution_ms: d.execution_ms / f,
            window_ms: d.window_ms / f,
            concurrent: d.concurrent,
        }
    }
}

/// Injected faults. Latency, 429 and 5xx rates apply to Dataverse, F&O, LCS and Power Platform
/// requests (not the token endpoint); the `lcs_*` knobs to LCS only.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Added to every Dataverse / F&O request.
    pub latency_ms: u64,
    /// Added per operation inside a `$batch` (and per single delete); counts as execution time.
    pub per_op_latency_ms: u64,
    /// Fraction of requests answered 429 (every simulated service but the token endpoint).
    pub rate_429: f64,
    /// `Retry-After` seconds on injected 429s.
    pub retry_after_secs: u64,
    /// Fraction of requests answered 503.
    pub rate_5xx: f64,
    /// Service protection limits on Dataverse, if enforced.
    pub protection: Option<Protection>,
    /// Lifetime of issued tokens.
    pub token_lifetime_secs: u64,
    /// Seed for the fault dice, for reproducible runs (random when absent).
    pub rng_seed: Option<u64>,
    /// The next N LCS requests are answered 429 with `Retry-After: 1`.
    pub lcs_throttle_next: u32,
    /// LCS answers `IsSuccess: false` (an outage of the source).
    pub lcs_failing: bool,
    /// Bursts of 5xx: after every `burst_5xx_every` Dataverse / F&O requests answered, the next
    /// `burst_5xx_len` are answered 503 (0: no bursts).
    pub burst_5xx_every: u32,
    pub burst_5xx_len: u32,
    /// The token endpoint answers 503 `temporarily_unavailable` for this long after the faults are set.
    pub token_outage_ms: u64,
    /// Tokens stop being accepted this many seconds after issue, whatever `expires_in` said (a
    /// token that expires or is revoked mid-run).
    pub tokens_revoked_after_secs: Option<u64>,
    /// The next Dataverse `$batch` of more operations than this applies only its first this-many
    /// operations and then never answers (a crash in the middle of a delete batch). One-shot.
    pub stall_batch_after_ops: Option<usize>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency_ms: 0,
            per_op_latency_ms: 0,
            rate_429: 0.0,
            retry_after_secs: 1,
            rate_5xx: 0.0,
            protection: None,
            token_lifetime_secs: 3599,
            rng_seed: None,
            lcs_throttle_next: 0,
            lcs_failing: false,
            burst_5xx_every: 0,
            burst_5xx_len: 0,
            token_outage_ms: 0,
            tokens_revoked_after_secs: None,
            stall_batch_after_ops: None,
        }
    }
}

/// One request as the simulator saw it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogEntry {
    /// Milliseconds since the simulator started, at arrival.
    pub at_ms: f64,
    pub service: String,
    pub method: String,
    pub path: String,
    /// Identifies "the same request" across retries (method, path, batch targets).
    pub fingerprint: String,
    pub status: u16,
    pub retry_after_secs: Option<u64>,
    /// Operations in a `$batch` (1 otherwise).
    pub ops: usize,
}

/// Counters and table sizes, for tests and `GET /_sim/state`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub runtime_configs: BTreeMap<String, usize>,
    pub project_configs: BTreeMap<String, usize>,
    pub field_configs: BTreeMap<String, usize>,
    pub business_events: BTreeMap<String, usize>,
    pub requests: usize,
    pub token_requests: usize,
    pub batch_requests: BTreeMap<String, usize>,
    pub page_reads: BTreeMap<String, usize>,
    pub single_deletes: usize,
    pub throttled: usize,
    pub server_errors: usize,
    /// Rows deleted, by `{service}/{container}`.
    pub deleted: BTreeMap<String, usize>,
    /// Keys that received more than one delete operation.
    pub deleted_twice: Vec<String>,
    /// Largest number of requests in flight at once.
    pub max_in_flight: usize,
    /// Requests answered 401 (missing, expired, revoked or wrong-audience tokens).
    pub unauthorized: usize,
    /// Token requests answered 503 during an injected outage.
    pub token_outage_answers: usize,
    /// `$batch` requests stalled part-way by `stall_batch_after_ops`.
    pub stalled_batches: usize,
}

struct Org {
    unique_name: String,
    organization_id: uuid::Uuid,
    friendly_name: String,
    integrated_fno: Option<String>,
    rows: BTreeMap<uuid::Uuid, Value>,
}

struct FnoEnv {
    linked_organization: String,
    project_configs: BTreeMap<String, Value>,
    field_configs: BTreeMap<String, Value>,
    business_events: BTreeMap<String, Value>,
    purge_service_path: Option<String>,
    reset_project_configs: usize,
}

struct Token {
    audience: String,
    expires: Instant,
    client_id: String,
}

#[derive(Default)]
struct Window {
    done: VecDeque<(Instant, u64)>,
    in_flight: usize,
}

#[derive(Default)]
struct SimState {
    apps: HashMap<String, String>,
    tokens: HashMap<String, Token>,
    orgs: BTreeMap<String, Org>,
    fno: BTreeMap<String, FnoEnv>,
    faults: Faults,
    log: Vec<LogEntry>,
    delete_ops: HashMap<String, u32>,
    windows: HashMap<String, Window>,
    snapshot: Snapshot,
    in_flight: usize,
    rng: Option<rand::rngs::StdRng>,
    lcs_tokens: std::collections::HashSet<String>,
    lcs_history: HashMap<(String, String), Vec<Value>>,
    lcs_calls: HashMap<String, VecDeque<Instant>>,
    power_platform: HashMap<String, Vec<Value>>,
    faults_set_at: Option<Instant>,
    /// Dataverse / F&O requests that reached the burst decision since the faults were set.
    burst_position: u64,
}

impl SimState {
    fn set_faults(&mut self, faults: Faults) {
        self.rng = faults.rng_seed.map(rand::SeedableRng::seed_from_u64);
        self.faults = faults;
        self.faults_set_at = Some(Instant::now());
        self.burst_position = 0;
    }

    /// Whether the next Dataverse / F&O request falls in an injected burst of 5xx.
    fn in_burst(&mut self) -> bool {
        let (every, len) = (
            self.faults.burst_5xx_every as u64,
            self.faults.burst_5xx_len as u64,
        );
        if every == 0 || len == 0 {
            return false;
        }
        let pos = self.burst_position;
        self.burst_position += 1;
        pos % (every + len) >= every
    }

    /// A die roll in [0, 1).
    fn roll(&mut self) -> f64 {
        match &mut self.rng {
            Some(r) => r.random(),
            None => rand::rng().random(),
        }
    }
}

struct Shared {
    base: String,
    started: Instant,
    state: Mutex<SimState>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running simulator.
#[derive(Clone)]
pub struct Sim {
    shared: Arc<Shared>,
}

impl Sim {
    /// Starts the simulator on `addr` (use port 0 for any free port).
    pub async fn start(addr: SocketAddr) -> std::io::Result<Sim> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let shared = Arc::new(Shared {
            base: format!("http://{local}"),
            started: Instant::now(),
            state: Mutex::new(SimState::default()),
        });
        let app = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(32 * 1024 * 1024))
            .with_state(shared.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "simulator stopped");
            }
        });
        Ok(Sim { shared })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.shared.base
    }
    /// The URL of an organisation (what `dataverse_url` is set to).
    pub fn dataverse_url(&self, org: &str) -> String {
        format!("{}/dataverse/{org}", self.shared.base)
    }
    /// The URL of an F&O environment (what `fno_url` is set to).
    pub fn fno_url(&self, env: &str) -> String {
        format!("{}/fno/{env}", self.shared.base)
    }
    /// The authority to configure (tokens at `{authority}/{tenant}/oauth2/v2.0/token`).
    pub fn authority(&self) -> String {
        self.shared.base.clone()
    }

    /// Adds or replaces seeded objects.
    pub fn seed(&self, seed: &Seed) -> Result<(), String> {
        apply_seed(&self.shared, seed)
    }
    /// Replaces the injected faults.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().set_faults(faults);
    }
    /// Counters and table sizes.
    pub fn snapshot(&self) -> Snapshot {
        snapshot(&self.shared)
    }
    /// Every request so far.
    pub fn log(&self) -> Vec<LogEntry> {
        self.shared.lock().log.clone()
    }
    /// Emulates an operator's Reset link in F&O (see [`reset_link`]).
    pub fn reset_link(&self, fno_env: &str) -> Result<(), String> {
        reset_link(&self.shared, fno_env)
    }
    /// Adds an LCS history entry (newest first) to a project environment.
    pub fn add_lcs_entry(&self, project_id: &str, environment_id: &str, entry: Value) {
        self.shared
            .lock()
            .lcs_history
            .entry((project_id.to_string(), environment_id.to_ascii_lowercase()))
            .or_default()
            .insert(0, entry);
    }
    /// The LCS API base (what `watch.lcs_api` is set to).
    pub fn lcs_api(&self) -> String {
        format!("{}/lcs", self.shared.base)
    }
    /// The Power Platform API base (what `watch.power_platform_api` is set to).
    pub fn power_platform_api(&self) -> String {
        format!("{}/powerplatform", self.shared.base)
    }
}

fn snapshot(shared: &Shared) -> Snapshot {
    let st = shared.lock();
    let mut s = st.snapshot.clone();
    for (name, o) in &st.orgs {
        s.runtime_configs.insert(name.clone(), o.rows.len());
    }
    for (name, f) in &st.fno {
        s.project_configs
            .insert(name.clone(), f.project_configs.len());
        s.field_configs.insert(name.clone(), f.field_configs.len());
        s.business_events
            .insert(name.clone(), f.business_events.len());
    }
    s.deleted_twice = st
        .delete_ops
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k.clone())
        .collect();
    s.deleted_twice.sort();
    s
}

fn apply_seed(shared: &Shared, seed: &Seed) -> Result<(), String> {
    let base = shared.base.clone();
    let mut st = shared.lock();
    for a in &seed.apps {
        st.apps.insert(a.client_id.clone(), a.client_secret.clone());
    }
    st.lcs_tokens.extend(seed.lcs_tokens.iter().cloned());
    for h in &seed.lcs_history {
        st.lcs_history.insert(
            (h.project_id.clone(), h.environment_id.to_ascii_lowercase()),
            h.entries.clone(),
        );
    }
    for p in &seed.power_platform {
        st.power_platform
            .insert(p.environment_id.to_ascii_lowercase(), p.operations.clone());
    }
    for o in &seed.organizations {
        if !is_segment(&o.name) {
            return Err(format!(
                "organisation name {:?} must be a simple path segment",
                o.name
            ));
        }
        let mut rows = BTreeMap::new();
        for i in 0..o.runtime_configs {
            let id = uuid::Uuid::new_v4();
            rows.insert(id, runtime_row(id, i));
        }
        st.orgs.insert(
            o.name.clone(),
            Org {
                unique_name: o.unique_name.clone(),
                organization_id: o.organization_id.unwrap_or_else(uuid::Uuid::new_v4),
                friendly_name: o
                    .friendly_name
                    .clone()
                    .unwrap_or_else(|| o.unique_name.clone()),
                integrated_fno: o.integrated_fno.clone(),
                rows,
            },
        );
    }
    for f in &seed.fno_environments {
        if !is_segment(&f.name) {
            return Err(format!(
                "F&O environment name {:?} must be a simple path segment",
                f.name
            ));
        }
        let target = f
            .points_at
            .clone()
            .unwrap_or_else(|| f.linked_organization.clone());
        let url = format!("{base}/dataverse/{target}");
        let mut env = FnoEnv {
            linked_organization: f.linked_organization.clone(),
            project_configs: BTreeMap::new(),
            field_configs: BTreeMap::new(),
            business_events: BTreeMap::new(),
            purge_service_path: f.purge_service_path.clone(),
            reset_project_configs: f.reset_project_configs.unwrap_or(3),
        };
        fill_project_configs(&mut env, f.project_configs, &url);
        for i in 0..f.field_configs {
            let key = format!("field-{i:05}");
            env.field_configs.insert(key.clone(), json!({"key": key, "ProjectName": format!("Project {:05}", i % 7), "FieldName": format!("Field{i}")}));
        }
        for i in 0..f.business_events {
            let key = format!("be-{i:05}");
            env.business_events.insert(key.clone(), json!({"key": key, "BusinessEventId": format!("DualWriteEvent{i}"), "Channel": "DualWrite"}));
        }
        st.fno.insert(f.name.clone(), env);
    }
    Ok(())
}

fn fill_project_configs(env: &mut FnoEnv, n: usize, url: &str) {
    for i in 0..n {
        let name = format!("Project {i:05} Customers V3 O'Brien");
        env.project_configs.insert(
            name.clone(),
            json!({
                "@odata.etag": format!("W/\"JzEsNTYzNzE0NDU3Njsw{i}Jw==\""),
                "dataAreaId": if i % 2 == 0 { "usmf" } else { "demf" },
                "ProjectName": name,
                "ExternalEnvironmentUrl": url,
                "InternalEntityName": "CustCustomerV3Entity",
                "ExternalEntityName": "accounts",
                "Status": "Running",
                "IsDelete": "No",
                "ServiceBusConnectionString": format!("Endpoint=sb://dw-{i}.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey=SIMSECRET-sb-{i}"),
                "StorageAccountSASConnectionString": format!("BlobEndpoint=https://dw.blob.core.windows.net/;SharedAccessSignature=sv=2022&sig=SIMSECRET-sas-{i}"),
            }),
        );
    }
}

fn runtime_row(id: uuid::Uuid, i: usize) -> Value {
    json!({
        "@odata.etag": format!("W/\"{}\"", 1000 + i),
        RUNTIME_KEY: id.to_string(),
        "msdyn_name": format!("dualwrite-runtime-{i:06}"),
        "msdyn_status": 1,
        "msdyn_configuration": format!("{{\"secureConfigOrganization\":\"stale-{i}\",\"sharedAccessKey\":\"SIMSECRET-rt-{i}\"}}"),
        "createdon": "2026-01-01T00:00:00Z",
        "modifiedon": "2026-01-02T00:00:00Z",
    })
}

/// What an operator's Reset link does in F&O: clears the three key tables, rebuilds the
/// project configurations towards the linked organisation, and recreates that organisation's
/// runtime configuration.
fn reset_link(shared: &Shared, fno_env: &str) -> Result<(), String> {
    let base = shared.base.clone();
    let mut st = shared.lock();
    let env = st
        .fno
        .get_mut(fno_env)
        .ok_or_else(|| format!("no F&O environment {fno_env:?}"))?;
    let linked = env.linked_organization.clone();
    let n = env.reset_project_configs;
    env.project_configs.clear();
    env.field_configs.clear();
    env.business_events.clear();
    fill_project_configs(env, n, &format!("{base}/dataverse/{linked}"));
    let org = st
        .orgs
        .get_mut(&linked)
        .ok_or_else(|| format!("no organisation {linked:?}"))?;
    org.rows.clear();
    for i in 0..n {
        let id = uuid::Uuid::new_v4();
        org.rows.insert(id, runtime_row(id, i));
    }
    Ok(())
}

fn is_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == name).then(|| percent_decode(&v.replace('+', " ")))
    })
}

fn odata_error(status: StatusCode, code: &str, message: &str) -> Response {
    let mut r = (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response();
    r.headers_mut()
        .insert("OData-Version", HeaderValue::from_static("4.0"));
    r
}

fn json_ok(v: Value) -> Response {
    let mut r = axum::Json(v).into_response();
    r.headers_mut()
        .insert("OData-Version", HeaderValue::from_static("4.0"));
    r
}

fn max_page(headers: &HeaderMap, cap: usize) -> usize {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| {
            p.trim()
                .strip_prefix("odata.maxpagesize=")
                .and_then(|n| n.trim().parse().ok())
        })
        .map(|n: usize| n.clamp(1, cap))
        .unwrap_or(cap)
}

fn prefers(headers: &HeaderMap, what: &str) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim() == what))
}

/// Which simulated service a request is for.
enum Target {
    Lcs { rest: String },
    PowerPlatform { rest: String },
    Token { tenant: String },
    Dataverse { org: String, rest: String },
    Fno { env: String, rest: String },
    Control { rest: String },
}

fn route(path: &str) -> Option<Target> {
    let p = path.trim_start_matches('/');
    if let Some(rest) = p.strip_prefix("_sim/") {
        return Some(Target::Control {
            rest: rest.to_string(),
        });
    }
    if let Some(rest) = p.strip_prefix("lcs/") {
        return Some(Target::Lcs {
            rest: rest.to_string(),
        });
    }
    if let Some(rest) = p.strip_prefix("powerplatform/") {
        return Some(Target::PowerPlatform {
            rest: rest.to_string(),
        });
    }
    if let Some(rest) = p.strip_prefix("dataverse/") {
        let (org, rest) = rest.split_once('/')?;
        let rest = rest.strip_prefix(API)?;
        return Some(Target::Dataverse {
            org: org.to_string(),
            rest: rest.to_string(),
        });
    }
    if let Some(rest) = p.strip_prefix("fno/") {
        let (env, rest) = rest.split_once('/')?;
        return Some(Target::Fno {
            env: env.to_string(),
            rest: rest.to_string(),
        });
    }
    let (tenant, rest) = p.split_once('/')?;
    (rest == "oauth2/v2.0/token").then(|| Target::Token {
        tenant: tenant.to_string(),
    })
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(target) = route(uri.path()) else {
        return odata_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no simulated service at {}", uri.path()),
        );
    };
    match target {
        Target::Control { rest } => control(&shared, &method, &rest, &body),
        Target::Token { tenant } => token(&shared, &tenant, &body),
        Target::Lcs { rest } => match generic_faults(&shared).await {
            Some(r) => r,
            None => lcs(&shared, &method, &rest, &uri, &headers),
        },
        Target::PowerPlatform { rest } => match generic_faults(&shared).await {
            Some(r) => r,
            None => power_platform(&shared, &method, &rest, &headers),
        },
        Target::Dataverse { org, rest } => {
            service(
                &shared,
                Svc::Dataverse,
                org,
                rest,
                method,
                uri,
                headers,
                body,
            )
            .await
        }
        Target::Fno { env, rest } => {
            service(&shared, Svc::Fno, env, rest, method, uri, headers, body).await
        }
    }
}

fn control(shared: &Shared, method: &Method, rest: &str, body: &[u8]) -> Response {
    let parsed = |body: &[u8]| serde_json::from_slice::<Value>(body).map_err(|e| e.to_string());
    match (method.as_str(), rest) {
        ("GET", "state") => axum::Json(snapshot(shared)).into_response(),
        ("GET", "log") => axum::Json(shared.lock().log.clone()).into_response(),
        ("POST", "seed") => match parsed(body)
            .and_then(|v| serde_json::from_value::<Seed>(v).map_err(|e| e.to_string()))
        {
            Ok(seed) => match apply_seed(shared, &seed) {
                Ok(()) => StatusCode::NO_CONTENT.into_response(),
                Err(e) => (StatusCode::BAD_REQUEST, e).into_response(),
            },
            Err(e) => (StatusCode::BAD_REQUEST, format!("bad seed: {e}")).into_response(),
        },
        ("POST", "faults") => match parsed(body)
            .and_then(|v| serde_json::from_value::<Faults>(v).map_err(|e| e.to_string()))
        {
            Ok(f) => {
                shared.lock().set_faults(f);
                StatusCode::NO_CONTENT.into_response()
            }
            Err(e) => (StatusCode::BAD_REQUEST, format!("bad faults: {e}")).into_response(),
        },
        ("POST", r) if r.starts_with("reset-link/") => {
            match reset_link(shared, &r["reset-link/".len()..]) {
                Ok(()) => StatusCode::NO_CONTENT.into_response(),
                Err(e) => (StatusCode::NOT_FOUND, e).into_response(),
            }
        }
        _ => (StatusCode::NOT_FOUND, "unknown simulator control endpoint").into_response(),
    }
}

fn token(shared: &Shared, tenant: &str, body: &[u8]) -> Response {
    let form = String::from_utf8_lossy(body).into_owned();
    let get = |k: &str| query_param(&form, k);
    let entra_error = |status: StatusCode, error: &str, desc: &str| {
        (status, axum::Json(json!({"error": error, "error_description": desc, "error_codes": [7000215], "timestamp": jiff::Timestamp::now().to_string(), "trace_id": uuid::Uuid::new_v4(), "correlation_id": uuid::Uuid::new_v4()}))).into_response()
    };
    let mut st = shared.lock();
    st.snapshot.token_requests += 1;
    let outage = Duration::from_millis(st.faults.token_outage_ms);
    if st.faults_set_at.is_some_and(|t| t.elapsed() < outage) {
        st.snapshot.token_outage_answers += 1;
        return entra_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "AADSTS90033: A transient error has occurred. Please try again.",
        );
    }
    if get("grant_type").as_deref() != Some("client_credentials") {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "AADSTS70003: The app requested an unsupported grant type.",
        );
    }
    let (Some(client_id), Some(secret), Some(scope)) =
        (get("client_id"), get("client_secret"), get("scope"))
    else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "AADSTS900144: The request body must contain client_id, client_secret and scope.",
        );
    };
    match st.apps.get(&client_id) {
        None => {
            return entra_error(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                &format!(
                    "AADSTS700016: Application with identifier '{client_id}' was not found in the directory '{tenant}'."
                ),
            );
        }
        Some(s) if *s != secret => {
            return entra_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                &format!(
                    "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{client_id}'."
                ),
            );
        }
        Some(_) => {}
    }
    let Some(audience) = scope.strip_suffix("/.default") else {
        return entra_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "AADSTS70011: The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier.",
        );
    };
    let lifetime = st.faults.token_lifetime_secs;
    let accepted_for = st
        .faults
        .tokens_revoked_after_secs
        .map_or(lifetime, |r| r.min(lifetime));
    let access = format!("simtok-{}", uuid::Uuid::new_v4().simple());
    st.tokens.insert(
        access.clone(),
        Token {
            audience: audience.to_ascii_lowercase(),
            expires: Instant::now() + Duration::from_secs(accepted_for),
            client_id,
        },
    );
    axum::Json(json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": access})).into_response()
}

#[derive(Clone, Copy, PartialEq)]
enum Svc {
    Dataverse,
    Fno,
}

impl Svc {
    fn name(self) -> &'static str {
        match self {
            Svc::Dataverse => "dataverse",
            Svc::Fno => "fno",
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn service(
    shared: &Arc<Shared>,
    svc: Svc,
    container: String,
    rest: String,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived = Instant::now();
    let at_ms = arrived.duration_since(shared.started).as_secs_f64() * 1000.0;
    let path_q = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let ctype = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = String::from_utf8_lossy(&body).into_owned();
    let batch_ops = (rest.ends_with("$batch") && method == Method::POST)
        .then(|| multipart::parse_request(&ctype, &text));
    let ops = match &batch_ops {
        Some(Ok(ops)) => ops.len(),
        _ => 1,
    };
    let fingerprint = match &batch_ops {
        Some(Ok(ops)) => {
            let mut t: Vec<&str> = ops.iter().map(|o| o.target.as_str()).collect();
            t.sort_unstable();
            format!("{method} {} [{}]", uri.path(), t.join(","))
        }
        _ => format!("{method} {path_q}"),
    };
    let log = |shared: &Shared, status: u16, retry_after: Option<u64>| {
        let mut st = shared.lock();
        st.snapshot.requests += 1;
        st.log.push(LogEntry {
            at_ms,
            service: svc.name().into(),
            method: method.to_string(),
            path: path_q.clone(),
            fingerprint: fingerprint.clone(),
            status,
            retry_after_secs: retry_after,
            ops,
        });
    };

    // Authentication: a live token whose audience is this resource.
    let resource = format!(
        "{}/{}/{}",
        shared.base,
        if svc == Svc::Dataverse {
            "dataverse"
        } else {
            "fno"
        },
        container
    )
    .to_ascii_lowercase();
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string();
    let (auth_error, client_id) = {
        let st = shared.lock();
        match st.tokens.get(&bearer) {
            None => (
                Some("The access token is missing or invalid."),
                String::new(),
            ),
            Some(t) if t.expires <= Instant::now() => {
                (Some("The access token has expired."), t.client_id.clone())
            }
            Some(t) if t.audience != resource => (
                Some("The access token's audience is not this resource."),
                t.client_id.clone(),
            ),
            Some(t) => (None, t.client_id.clone()),
        }
    };
    if let Some(msg) = auth_error {
        shared.lock().snapshot.unauthorized += 1;
        log(shared, 401, None);
        let mut r = odata_error(StatusCode::UNAUTHORIZED, "0x80072182", msg);
        r.headers_mut().insert(
            "WWW-Authenticate",
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        return r;
    }

    // Faults and service protection, decided before any work is done.
    let window_key = format!("{}/{container}/{client_id}", svc.name());
    let (faults, verdict) = {
        let mut st = shared.lock();
        let faults = st.faults.clone();
        let verdict = if faults.rate_429 > 0.0 && st.roll() < faults.rate_429 {
            Some((429, faults.retry_after_secs))
        } else if (faults.rate_5xx > 0.0 && st.roll() < faults.rate_5xx) || st.in_burst() {
            Some((503, 0))
        } else if let (Svc::Dataverse, Some(p)) = (svc, faults.protection) {
            protection_verdict(&mut st, &window_key, &p, arrived)
        } else {
            None
        };
        if verdict.is_none() {
            st.in_flight += 1;
            st.snapshot.max_in_flight = st.snapshot.max_in_flight.max(st.in_flight);
            st.windows.entry(window_key.clone()).or_default().in_flight += 1;
        }
        (faults, verdict)
    };
    if let Some((status, retry_after)) = verdict {
        {
            let mut st = shared.lock();
            if status == 429 {
                st.snapshot.throttled += 1
            } else {
                st.snapshot.server_errors += 1
            }
        }
        log(shared, status, (status == 429).then_some(retry_after));
        return if status == 429 {
            let mut r = odata_error(
                StatusCode::TOO_MANY_REQUESTS,
                "0x80072322",
                "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
            );
            r.headers_mut()
                .insert("Retry-After", HeaderValue::from(retry_after));
            r
        } else {
            odata_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "0x80040216",
                "An unexpected error occurred. The service is temporarily unavailable.",
            )
        };
    }

    let work = Duration::from_millis(faults.latency_ms + faults.per_op_latency_ms * ops as u64);
    if !work.is_zero() {
        tokio::time::sleep(work).await;
    }
    let mut batch_ops = batch_ops;
    let stall = match (&mut batch_ops, svc) {
        (Some(Ok(list)), Svc::Dataverse) => {
            let mut st = shared.lock();
            match st.faults.stall_batch_after_ops {
                Some(k) if list.len() > k => {
                    st.faults.stall_batch_after_ops = None;
                    st.snapshot.stalled_batches += 1;
                    list.truncate(k);
                    true
                }
                _ => false,
            }
        }
        _ => false,
    };
    let resp = {
        let mut st = shared.lock();
        let resp = match svc {
            Svc::Dataverse => dataverse(
                &mut st,
                &shared.base,
                &container,
                &rest,
                &method,
                &uri,
                &headers,
                batch_ops,
            ),
            Svc::Fno => fno(
                &mut st,
                &shared.base,
                &container,
                &rest,
                &method,
                &uri,
                &headers,
                &text,
                batch_ops,
            ),
        };
        st.in_flight -= 1;
        let w = st.windows.entry(window_key).or_default();
        w.in_flight -= 1;
        w.done.push_back((Instant::now(), work.as_millis() as u64));
        resp
    };
    if stall {
        // The first operations are applied; the answer never comes (the caller is killed).
        std::future::pending::<()>().await;
    }
    let mut resp = resp;
    if let (Svc::Dataverse, Some(p)) = (svc, faults.protection) {
        pacing_headers(
            shared,
            &format!("dataverse/{container}/{client_id}"),
            &p,
            &mut resp,
        );
    }
    log(shared, resp.status().as_u16(), None);
    resp
}

/// Decides whether a request breaks the service protection limits; returns (429, Retry-After).
fn protection_verdict(
    st: &mut SimState,
    key: &str,
    p: &Protection,
    now: Instant,
) -> Option<(u16, u64)> {
    let w = st.windows.entry(key.to_string()).or_default();
    let window = Duration::from_millis(p.window_ms);
    while w
        .done
        .front()
        .is_some_and(|(t, _)| now.duration_since(*t) > window)
    {
        w.done.pop_front();
    }
    let wait_for = |idx: usize| {
        let (t, _) = w.done[idx];
        let left = window.saturating_sub(now.duration_since(t));
        left.as_secs_f64().ceil().max(1.0) as u64
    };
    if w.in_flight >= p.concurrent {
        return Some((429, 1));
    }
    if w.done.len() >= p.requests {
        return Some((429, wait_for(w.done.len() - p.requests)));
    }
    let total: u64 = w.done.iter().map(|(_, ms)| ms).sum();
    if total >= p.execution_ms {
        // Wait until enough execution time leaves the window.
        let mut excess = total - p.execution_ms;
        for (i, (_, ms)) in w.done.iter().enumerate() {
            if *ms > excess {
                return Some((429, wait_for(i)));
            }
            excess -= ms;
        }
        return Some((429, 1));
    }
    None
}

fn pacing_headers(shared: &Shared, key: &str, p: &Protection, resp: &mut Response) {
    let st = shared.lock();
    let (count, exec) = st
        .windows
        .get(key)
        .map(|w| (w.done.len(), w.done.iter().map(|(_, ms)| ms).sum::<u64>()))
        .unwrap_or((0, 0));
    let h = resp.headers_mut();
    h.insert(
        "x-ms-ratelimit-burst-remaining-xrm-requests",
        HeaderValue::from(p.requests.saturating_sub(count) as u64),
    );
    h.insert(
        "x-ms-ratelimit-time-remaining-xrm-requests",
        HeaderValue::from_str(&seconds_with_separators(
            p.execution_ms.saturating_sub(exec),
        ))
        .expect("ascii"),
    );
    h.insert("x-ms-dop-hint", HeaderValue::from(4u64));
}

/// Milliseconds as Dataverse writes execution time in its headers: seconds with two decimals
/// and thousands separators (`1,199.53`).
fn seconds_with_separators(ms: u64) -> String {
    let whole = (ms / 1000).to_string();
    let mut grouped = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("{grouped}.{:02}", (ms % 1000) / 10)
}

/// The injected latency, 429 and 5xx rates, for the LCS and Power Platform simulators (the
/// Dynamics ones weave them into their service protection accounting instead).
async fn generic_faults(shared: &Shared) -> Option<Response> {
    let (latency, verdict) = {
        let mut st = shared.lock();
        let f = st.faults.clone();
        let verdict = if f.rate_429 > 0.0 && st.roll() < f.rate_429 {
            st.snapshot.throttled += 1;
            Some((StatusCode::TOO_MANY_REQUESTS, f.retry_after_secs))
        } else if f.rate_5xx > 0.0 && st.roll() < f.rate_5xx {
            st.snapshot.server_errors += 1;
            Some((StatusCode::SERVICE_UNAVAILABLE, 0))
        } else {
            None
        };
        (Duration::from_millis(f.latency_ms), verdict)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (status, retry_after) = verdict?;
    let mut r = (
        status,
        axum::Json(json!({"IsSuccess": false, "ErrorMessage": status.canonical_reason()})),
    )
        .into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut()
            .insert("Retry-After", HeaderValue::from(retry_after));
    }
    Some(r)
}

const LCS_PAGE: usize = 5;
const LCS_CALLS_PER_WINDOW: usize = 6;
const LCS_WINDOW: Duration = Duration::from_secs(30);

fn bearer(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .to_string()
}

/// LCS environment history: `GET /environmentinfo/v1/history/project/{p}/environment/{e}/?page=N`,
/// 6 calls per environment per 30 s, then 429 with `Retry-After`; answers always carry `IsSuccess`.
fn lcs(shared: &Shared, method: &Method, rest: &str, uri: &Uri, headers: &HeaderMap) -> Response {
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let (
        [
            "environmentinfo",
            "v1",
            "history",
            "project",
            project,
            "environment",
            env,
        ],
        true,
    ) = (parts.as_slice(), method == Method::GET)
    else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"IsSuccess": false, "ErrorMessage": "Not found"})),
        )
            .into_response();
    };
    let mut st = shared.lock();
    st.snapshot.requests += 1;
    *st.snapshot.page_reads.entry("lcs".into()).or_default() += 1;
    if !st.lcs_tokens.contains(&bearer(headers)) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"IsSuccess": false, "ErrorMessage": "Unauthorized"})),
        )
            .into_response();
    }
    let now = Instant::now();
    let calls = st.lcs_calls.entry(env.to_ascii_lowercase()).or_default();
    while calls
        .front()
        .is_some_and(|t| now.duration_since(*t) > LCS_WINDOW)
    {
        calls.pop_front();
    }
    let over = calls.len() >= LCS_CALLS_PER_WINDOW;
    let wait = calls
        .front()
        .map(|t| {
            LCS_WINDOW
                .saturating_sub(now.duration_since(*t))
                .as_secs()
                .max(1)
        })
        .unwrap_or(1);
    if !over {
        calls.push_back(now);
    }
    let forced = st.faults.lcs_throttle_next > 0;
    if forced || over {
        if forced {
            st.faults.lcs_throttle_next -= 1;
        }
        st.snapshot.throttled += 1;
        let mut r = (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(json!({"IsSuccess": false, "ErrorMessage": "Too many requests"})),
        )
            .into_response();
        r.headers_mut().insert(
            "Retry-After",
            HeaderValue::from(if forced { 1 } else { wait }),
        );
        return r;
    }
    if st.faults.lcs_failing {
        return axum::Json(json!({"ResultPageCurrent": 1, "ResultHasMorePages": false, "Data": null, "IsSuccess": false, "ErrorMessage": "The environment history is not available right now."})).into_response();
    }
    let page: usize = uri
        .query()
        .and_then(|q| query_param(q, "page"))
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .max(1);
    let entries = st
        .lcs_history
        .get(&(project.to_string(), env.to_ascii_lowercase()))
        .cloned()
        .unwrap_or_default();
    let data: Vec<Value> = entries
        .iter()
        .skip((page - 1) * LCS_PAGE)
        .take(LCS_PAGE)
        .cloned()
        .collect();
    axum::Json(json!({
        "ResultPageCurrent": page,
        "ResultHasMorePages": entries.len() > page * LCS_PAGE,
        "Data": data,
        "IsSuccess": true,
        "ErrorMessage": null,
        "VersionEOL": "9999-12-31T23:59:59.9999999",
    }))
    .into_response()
}

/// Power Platform: `GET /environmentmanagement/environments/{id}/operations` with an app token
/// whose audience is `{base}/powerplatform`.
fn power_platform(shared: &Shared, method: &Method, rest: &str, headers: &HeaderMap) -> Response {
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let (["environmentmanagement", "environments", env, "operations"], true) =
        (parts.as_slice(), method == Method::GET)
    else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": {"code": "NotFound", "message": "Not found"}})),
        )
            .into_response();
    };
    let mut st = shared.lock();
    st.snapshot.requests += 1;
    let audience = format!("{}/powerplatform", shared.base).to_ascii_lowercase();
    let ok = st
        .tokens
        .get(&bearer(headers))
        .is_some_and(|t| t.audience == audience && t.expires > Instant::now());
    if !ok {
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": {"code": "Unauthorized", "message": "The token is missing, expired or not for this API."}}))).into_response();
    }
    let ops = st
        .power_platform
        .get(&env.to_ascii_lowercase())
        .cloned()
        .unwrap_or_default();
    axum::Json(json!({"value": ops})).into_response()
}

/// Resolves a batch operation's target to a path under the service root.
fn batch_target(base: &str, root: &str, target: &str) -> Option<String> {
    let t = target.strip_prefix(base).unwrap_or(target);
    if let Some(abs) = t.strip_prefix('/') {
        return abs
            .strip_prefix(root.trim_start_matches('/'))
            .map(str::to_string);
    }
    if t.contains("://") {
        None
    } else {
        Some(t.to_string())
    }
}

/// Runs batch operations one by one through `op`, honouring change sets and continue-on-error.
fn run_batch(
    ops: Vec<Operation>,
    continue_on_error: bool,
    mut op: impl FnMut(&Operation, bool) -> (u16, Option<String>),
) -> Response {
    let mut answers = Vec::new();
    let mut i = 0;
    while i < ops.len() {
        if let Some(cs) = ops[i].changeset {
            // A change set is atomic: check every operation first, then apply all or none.
            let group: Vec<&Operation> = ops[i..]
                .iter()
                .take_while(|o| o.changeset == Some(cs))
                .collect();
            let failed = group
                .iter()
                .map(|o| (o, op(o, true)))
                .find(|(_, (s, _))| *s >= 400);
            match failed {
                Some((o, (status, body))) => answers.push(Answer {
                    status,
                    body,
                    content_id: o.content_id.clone(),
                    changeset: Some(cs),
                }),
                None => {
                    for o in &group {
                        let (status, body) = op(o, false);
                        answers.push(Answer {
                            status,
                            body,
                            content_id: o.content_id.clone(),
                            changeset: Some(cs),
                        });
                    }
                }
            }
            let failed_any = answers.last().is_some_and(|a| a.status >= 400);
            i += group.len();
            if failed_any && !continue_on_error {
                break;
            }
        } else {
            let (status, body) = op(&ops[i], false);
            answers.push(Answer {
                status,
                body,
                content_id: ops[i].content_id.clone(),
                changeset: None,
            });
            i += 1;
            if status >= 400 && !continue_on_error {
                break;
            }
        }
    }
    let (ctype, body) = multipart::encode_response(&answers);
    let mut r = (StatusCode::OK, body).into_response();
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_str(&ctype).expect("ascii"),
    );
    r.headers_mut()
        .insert("OData-Version", HeaderValue::from_static("4.0"));
    r
}

fn error_body(code: &str, message: &str) -> Option<String> {
    Some(json!({"error": {"code": code, "message": message}}).to_string())
}

fn record_delete(st: &mut SimState, svc: &str, container: &str, key: &str, existed: bool) {
    *st.delete_ops
        .entry(format!("{svc}/{container}/{key}"))
        .or_default() += 1;
    if existed {
        *st.snapshot
            .deleted
            .entry(format!("{svc}/{container}"))
            .or_default() += 1;
    }
}

#[allow(clippy::too_many_arguments)]
fn dataverse(
    st: &mut SimState,
    base: &str,
    org: &str,
    rest: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    batch: Option<Result<Vec<Operation>, String>>,
) -> Response {
    let Some(o) = st.orgs.get(org) else {
        return odata_error(
            StatusCode::NOT_FOUND,
            "0x80072326",
            &format!("Organization '{org}' does not exist."),
        );
    };
    let root = format!("{base}/dataverse/{org}/{API}");
    let rest = percent_decode(rest);
    let query = uri.query().unwrap_or("");
    match (method.as_str(), rest.as_str()) {
        ("GET", "WhoAmI") => json_ok(json!({
            "@odata.context": format!("{root}$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse"),
            "BusinessUnitId": uuid::Uuid::nil(), "UserId": uuid::Uuid::nil(), "OrganizationId": o.organization_id,
        })),
        ("GET", r) if r.starts_with("RetrieveCurrentOrganization(") => {
            if r != "RetrieveCurrentOrganization(AccessType=Microsoft.Dynamics.CRM.EndpointAccessType'Default')"
            {
                return odata_error(
                    StatusCode::BAD_REQUEST,
                    "0x80060888",
                    "Invalid AccessType parameter.",
                );
            }
            json_ok(json!({
                "@odata.context": format!("{root}$metadata#Microsoft.Dynamics.CRM.RetrieveCurrentOrganizationResponse"),
                "Detail": {
                    "OrganizationId": o.organization_id, "FriendlyName": o.friendly_name, "OrganizationVersion": "9.2.26101.00000",
                    "EnvironmentId": uuid::Uuid::nil(), "DatacenterId": uuid::Uuid::nil(), "Geo": "NA", "TenantId": uuid::Uuid::nil(),
                    "UrlName": org, "UniqueName": o.unique_name, "State": "Enabled", "OrganizationType": "Customer",
                    "Endpoints": {"Count": 1, "IsReadOnly": false, "Keys": ["WebApplication"], "Values": [format!("{base}/dataverse/{org}/")]}
                }
            }))
        }
        ("GET", "RetrieveFinanceAndOperationsIntegrationDetails") => match &o.integrated_fno {
            Some(f) => json_ok(json!({
                "@odata.context": format!("{root}$metadata#Microsoft.Dynamics.CRM.RetrieveFinanceAndOperationsIntegrationDetailsResponse"),
                "Id": uuid::Uuid::nil(), "Url": format!("{base}/fno/{f}"), "IsUnifiedDatabase": false, "TenantId": uuid::Uuid::nil(),
            })),
            None => odata_error(
                StatusCode::NOT_FOUND,
                "0x80040217",
                "This environment is not linked to a Finance and Operations environment.",
            ),
        },
        ("GET", r) if r.starts_with("EntityDefinitions(") => {
            if r != "EntityDefinitions(LogicalName='msdyn_dualwriteruntimeconfig')" {
                return odata_error(
                    StatusCode::NOT_FOUND,
                    "0x80040217",
                    "Could not find an entity with specified key.",
                );
            }
            let select = query_param(query, "$select").unwrap_or_default();
            let mut v = json!({"@odata.context": format!("{root}$metadata#EntityDefinitions(EntitySetName,PrimaryIdAttribute)/$entity"), "MetadataId": uuid::Uuid::nil()});
            for f in select.split(',').filter(|s| !s.is_empty()) {
                match f {
                    "EntitySetName" => v["EntitySetName"] = json!(RUNTIME_SET),
                    "PrimaryIdAttribute" => v["PrimaryIdAttribute"] = json!(RUNTIME_KEY),
                    "LogicalName" => v["LogicalName"] = json!("msdyn_dualwriteruntimeconfig"),
                    other => {
                        return odata_error(
                            StatusCode::BAD_REQUEST,
                            "0x0",
                            &format!(
                                "Could not find a property named '{other}' on type 'Microsoft.Dynamics.CRM.EntityMetadata'."
                            ),
                        );
                    }
                }
            }
            json_ok(v)
        }
        ("GET", RUNTIME_SET) => {
            let select = query_param(query, "$select");
            let cols: Vec<String> = match &select {
                Some(s) => s.split(',').map(str::to_string).collect(),
                None => RUNTIME_COLUMNS.iter().map(|s| s.to_string()).collect(),
            };
            if let Some(bad) = cols.iter().find(|c| !RUNTIME_COLUMNS.contains(&c.as_str())) {
                return odata_error(
                    StatusCode::BAD_REQUEST,
                    "0x80060888",
                    &format!(
                        "Could not find a property named '{bad}' on type 'Microsoft.Dynamics.CRM.msdyn_dualwriteruntimeconfig'."
                    ),
                );
            }
            let after = query_param(query, "$skiptoken")
                .and_then(|t| cookie_last(&t))
                .and_then(|s| uuid::Uuid::parse_str(&s).ok());
            let size = max_page(headers, DATAVERSE_MAX_PAGE);
            let o = &st.orgs[org];
            let range = match after {
                Some(a) => o
                    .rows
                    .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
                None => o.rows.range(..),
            };
            let mut rows = Vec::with_capacity(size);
            let mut last = None;
            let mut more = false;
            for (id, row) in range {
                if rows.len() == size {
                    more = true;
                    break;
                }
                let mut out = serde_json::Map::new();
                out.insert("@odata.etag".into(), row["@odata.etag"].clone());
                for c in &cols {
                    out.insert(c.clone(), row[c.as_str()].clone());
                }
                out.insert(RUNTIME_KEY.into(), json!(id.to_string()));
                rows.push(Value::Object(out));
                last = Some(*id);
            }
            let mut v = json!({"@odata.context": format!("{root}$metadata#{RUNTIME_SET}({})", cols.join(",")), "value": rows});
            if more && let Some(last) = last {
                let cookie = format!(
                    "<cookie pagenumber=\"2\" pagingcookie=\"%3ccookie%20page%3d%221%22%3e%3cmsdyn_dualwriteruntimeconfigid%20last%3d%22%7b{last}%7d%22%20first%3d%22%7b0%7d%22%20%2f%3e%3c%2fcookie%3e\" istracking=\"False\" />"
                );
                let mut next = url_with_query(
                    &format!("{root}{RUNTIME_SET}"),
                    &[("$select", &cols.join(",")), ("$skiptoken", &cookie)],
                );
                if select.is_none() {
                    next =
                        url_with_query(&format!("{root}{RUNTIME_SET}"), &[("$skiptoken", &cookie)]);
                }
                v["@odata.nextLink"] = json!(next);
            }
            *st.snapshot
                .page_reads
                .entry("dataverse".into())
                .or_default() += 1;
            let mut r = json_ok(v);
            r.headers_mut().insert(
                "Preference-Applied",
                HeaderValue::from_str(&format!("odata.maxpagesize={size}")).expect("ascii"),
            );
            r
        }
        ("DELETE", r) if r.starts_with(RUNTIME_SET) => {
            st.snapshot.single_deletes += 1;
            let (status, body) = dataverse_delete(st, org, r);
            match body {
                Some(b) => (
                    StatusCode::from_u16(status).expect("valid"),
                    [("content-type", "application/json")],
                    b,
                )
                    .into_response(),
                None => StatusCode::from_u16(status).expect("valid").into_response(),
            }
        }
        ("POST", "$batch") => {
            *st.snapshot
                .batch_requests
                .entry("dataverse".into())
                .or_default() += 1;
            let ops = match batch.expect("parsed for $batch") {
                Ok(ops) => ops,
                Err(e) => {
                    return odata_error(
                        StatusCode::BAD_REQUEST,
                        "0x80048d19",
                        &format!(
                            "Error identified in Payload provided by the user for Entity :'', For more information on this error please follow this help link https://go.microsoft.com/fwlink/?linkid=2195293  ----> InnerException : {e}"
                        ),
                    );
                }
            };
            if ops.len() > DATAVERSE_MAX_BATCH {
                return odata_error(
                    StatusCode::BAD_REQUEST,
                    "0x8004801a",
                    "The number of requests in batch exceeds the limit of 1000.",
                );
            }
            let root_path = format!("/dataverse/{org}/{API}");
            run_batch(
                ops,
                prefers(headers, "odata.continue-on-error"),
                |op, check_only| {
                    let Some(path) = batch_target(base, &root_path, &op.target) else {
                        return (
                            400,
                            error_body("0x0", "The batch operation targets another service root."),
                        );
                    };
                    let path = percent_decode(&path);
                    if op.method != "DELETE" || !path.starts_with(RUNTIME_SET) {
                        return (
                            405,
                            error_body(
                                "0x0",
                                "The simulator accepts only DELETE of msdyn_dualwriteruntimeconfigs in a batch.",
                            ),
                        );
                    }
                    if check_only {
                        let exists = parse_guid_key(&path)
                            .is_some_and(|id| st.orgs[org].rows.contains_key(&id));
                        return if exists {
                            (204, None)
                        } else {
                            (404, error_body("0x80040217", "Entity does not exist"))
                        };
                    }
                    dataverse_delete(st, org, &path)
                },
            )
        }
        _ => odata_error(
            StatusCode::NOT_FOUND,
            "0x8006088a",
            &format!(
                "Resource not found for the segment '{}'.",
                rest.split(['(', '?']).next().unwrap_or("")
            ),
        ),
    }
}

fn parse_guid_key(path: &str) -> Option<uuid::Uuid> {
    let inner = path
        .strip_prefix(RUNTIME_SET)?
        .strip_prefix('(')?
        .strip_suffix(')')?;
    uuid::Uuid::parse_str(inner).ok()
}

fn dataverse_delete(st: &mut SimState, org: &str, path: &str) -> (u16, Option<String>) {
    let Some(id) = parse_guid_key(path) else {
        return (
            400,
            error_body("0x80060888", "Bad Request - Error in query syntax."),
        );
    };
    let existed = st
        .orgs
        .get_mut(org)
        .and_then(|o| o.rows.remove(&id))
        .is_some();
    record_delete(st, "dataverse", org, &id.to_string(), existed);
    if existed {
        (204, None)
    } else {
        (
            404,
            error_body(
                "0x80040217",
                &format!("msdyn_dualwriteruntimeconfig With Id = {id} Does Not Exist"),
            ),
        )
    }
}

fn cookie_last(token: &str) -> Option<String> {
    let decoded = percent_decode(token);
    let start = decoded.find("last=\"{")? + "last=\"{".len();
    let end = decoded[start..].find('}')?;
    Some(decoded[start..start + end].to_string())
}

fn url_with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~$,".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    let q: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    format!("{base}?{}", q.join("&"))
}

#[allow(clippy::too_many_arguments)]
fn fno(
    st: &mut SimState,
    base: &str,
    env: &str,
    rest: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &str,
    batch: Option<Result<Vec<Operation>, String>>,
) -> Response {
    let Some(e) = st.fno.get(env) else {
        return odata_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("No F&O environment '{env}'."),
        );
    };
    let query = uri.query().unwrap_or("");
    let rest_dec = percent_decode(rest);
    if let Some(svc) = &e.purge_service_path
        && method == Method::POST
        && rest_dec == svc.trim_start_matches('/')
    {
        return purge_service(st, env, body);
    }
    let root = format!("{base}/fno/{env}/data/");
    match (method.as_str(), rest_dec.as_str()) {
        ("GET", r) if r == format!("data/{FNO_SET}") => {
            let cross =
                query_param(query, "cross-company").is_some_and(|v| v.eq_ignore_ascii_case("true"));
            let select = query_param(query, "$select");
            let cols: Vec<String> = match &select {
                Some(s) => s.split(',').map(str::to_string).collect(),
                None => FNO_COLUMNS.iter().map(|s| s.to_string()).collect(),
            };
            if let Some(bad) = cols.iter().find(|c| !FNO_COLUMNS.contains(&c.as_str())) {
                return odata_error(
                    StatusCode::BAD_REQUEST,
                    "",
                    &format!(
                        "Could not find a property named '{bad}' on type 'Microsoft.Dynamics.DataEntities.DualWriteProjectConfiguration'."
                    ),
                );
            }
            let after = query_param(query, "$skiptoken");
            let size = max_page(headers, FNO_MAX_PAGE);
            let range: Box<dyn Iterator<Item = (&String, &Value)>> = match &after {
                Some(a) => Box::new(e.project_configs.range::<String, _>((
                    std::ops::Bound::Excluded(a.clone()),
                    std::ops::Bound::Unbounded,
                ))),
                None => Box::new(e.project_configs.iter()),
            };
            let mut rows = Vec::new();
            let mut last = None;
            let mut more = false;
            // Without cross-company=true, F&O answers for the user's default company only.
            for (k, row) in range.filter(|(_, r)| cross || r["dataAreaId"] == "usmf") {
                if rows.len() == size {
                    more = true;
                    break;
                }
                let mut out = serde_json::Map::new();
                out.insert("@odata.etag".into(), row["@odata.etag"].clone());
                for c in &cols {
                    out.insert(c.clone(), row[c.as_str()].clone());
                }
                rows.push(Value::Object(out));
                last = Some(k.clone());
            }
            let mut v =
                json!({"@odata.context": format!("{root}$metadata#{FNO_SET}"), "value": rows});
            if more && let Some(last) = last {
                let mut pairs = vec![("cross-company", if cross { "true" } else { "false" })];
                let sel = cols.join(",");
                if select.is_some() {
                    pairs.push(("$select", &sel));
                }
                pairs.push(("$skiptoken", &last));
                v["@odata.nextLink"] = json!(url_with_query(&format!("{root}{FNO_SET}"), &pairs));
            }
            *st.snapshot.page_reads.entry("fno".into()).or_default() += 1;
            json_ok(v)
        }
        ("DELETE", r) if r.starts_with(&format!("data/{FNO_SET}(")) => {
            st.snapshot.single_deletes += 1;
            let (status, body) = fno_delete(st, env, &r["data/".len()..]);
            match body {
                Some(b) => (
                    StatusCode::from_u16(status).expect("valid"),
                    [("content-type", "application/json")],
                    b,
                )
                    .into_response(),
                None => StatusCode::from_u16(status).expect("valid").into_response(),
            }
        }
        ("POST", "data/$batch") => {
            *st.snapshot.batch_requests.entry("fno".into()).or_default() += 1;
            let ops = match batch.expect("parsed for $batch") {
                Ok(ops) => ops,
                Err(e) => {
                    return odata_error(
                        StatusCode::BAD_REQUEST,
                        "",
                        &format!("The batch request is malformed: {e}"),
                    );
                }
            };
            let root_path = format!("/fno/{env}/data/");
            run_batch(
                ops,
                prefers(headers, "odata.continue-on-error"),
                |op, check_only| {
                    let Some(path) = batch_target(base, &root_path, &op.target) else {
                        return (
                            400,
                            error_body("", "The batch operation targets another service root."),
                        );
                    };
                    let path = percent_decode(&path);
                    if op.method != "DELETE" || !path.starts_with(FNO_SET) {
                        return (
                            405,
                            error_body(
                                "",
                                "The simulator accepts only DELETE of DualWriteProjectConfigurations in a batch.",
                            ),
                        );
                    }
                    if check_only {
                        let exists = fno_key(&path)
                            .is_some_and(|k| st.fno[env].project_configs.contains_key(&k));
                        return if exists {
                            (204, None)
                        } else {
                            (404, error_body("", "Not found"))
                        };
                    }
                    fno_delete(st, env, &path)
                },
            )
        }
        _ => odata_error(
            StatusCode::NOT_FOUND,
            "",
            &format!(
                "No HTTP resource was found that matches the request URI '{}'.",
                uri.path()
            ),
        ),
    }
}

/// `DualWriteProjectConfigurations(ProjectName='x')` -> `x` (with `''` unescaped).
fn fno_key(path: &str) -> Option<String> {
    let inner = path
        .strip_prefix(FNO_SET)?
        .strip_prefix('(')?
        .strip_suffix(')')?;
    let v = inner
        .strip_prefix("ProjectName=")?
        .strip_prefix('\'')?
        .strip_suffix('\'')?;
    Some(v.replace("''", "'"))
}

fn fno_delete(st: &mut SimState, env: &str, path: &str) -> (u16, Option<String>) {
    let Some(key) = fno_key(path) else {
        return (
            400,
            error_body(
                "",
                "The key in the request URI is not valid for resource 'DualWriteProjectConfiguration'.",
            ),
        );
    };
    let existed = st
        .fno
        .get_mut(env)
        .and_then(|e| e.project_configs.remove(&key))
        .is_some();
    record_delete(st, "fno", env, &key, existed);
    if existed {
        (204, None)
    } else {
        (
            404,
            error_body(
                "",
                "Resource not found for the segment 'DualWriteProjectConfigurations'.",
            ),
        )
    }
}

/// The customer purge service relink's README specifies: `{"action":"list","table":T}` ->
/// `{"rows":[{"key":..}]}`; `{"action":"delete","table":T,"keys":[..]}` -> `{"deleted":n,"missing":m}`.
fn purge_service(st: &mut SimState, env: &str, body: &str) -> Response {
    let Ok(req) = serde_json::from_str::<Value>(body) else {
        return odata_error(StatusCode::BAD_REQUEST, "", "The request body is not JSON.");
    };
    let table = req["table"].as_str().unwrap_or("").to_string();
    let e = st.fno.get_mut(env).expect("checked by caller");
    let rows = match table.as_str() {
        "DualWriteProjectFieldConfiguration" => &mut e.field_configs,
        "BusinessEventsDefinition" => &mut e.business_events,
        _ => {
            return odata_error(
                StatusCode::BAD_REQUEST,
                "",
                &format!("Unknown table '{table}'."),
            );
        }
    };
    match req["action"].as_str() {
        Some("list") => {
            axum::Json(json!({"rows": rows.values().cloned().collect::<Vec<_>>()})).into_response()
        }
        Some("delete") => {
            let keys: Vec<String> = req["keys"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|k| k.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let mut deleted = 0;
            let mut missing = 0;
            let mut log = Vec::new();
            for k in keys {
                let existed = rows.remove(&k).is_some();
                if existed {
                    deleted += 1
                } else {
                    missing += 1
                }
                log.push((k, existed));
            }
            for (k, existed) in log {
                record_delete(st, "fno", &format!("{env}/{table}"), &k, existed);
            }
            axum::Json(json!({"deleted": deleted, "missing": missing})).into_response()
        }
        _ => odata_error(
            StatusCode::BAD_REQUEST,
            "",
            "`action` must be list or delete.",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn execution_time_is_written_like_dataverse() {
        assert_eq!(seconds_with_separators(1_199_530), "1,199.53");
        assert_eq!(seconds_with_separators(120_000), "120.00");
        assert_eq!(seconds_with_separators(5), "0.00");
    }

    #[test]
    fn routes_and_keys() {
        assert!(matches!(
            route("/t/oauth2/v2.0/token"),
            Some(Target::Token { .. })
        ));
        assert!(matches!(
            route("/dataverse/o/api/data/v9.2/WhoAmI"),
            Some(Target::Dataverse { .. })
        ));
        assert_eq!(
            fno_key("DualWriteProjectConfigurations(ProjectName='O''Brien')").as_deref(),
            Some("O'Brien")
        );
        assert_eq!(percent_decode("%27a%20b%27"), "'a b'");
        assert_eq!(
            cookie_last(&percent_decode("last%3d%22%7babc%7d%22")).as_deref(),
            Some("abc")
        );
    }

    #[test]
    fn protection_counts_requests_in_the_window() {
        let mut st = SimState::default();
        let p = Protection {
            requests: 2,
            execution_ms: 1_000_000,
            window_ms: 60_000,
            concurrent: 52,
        };
        let now = Instant::now();
        assert!(protection_verdict(&mut st, "k", &p, now).is_none());
        st.windows
            .get_mut("k")
            .unwrap()
            .done
            .extend([(now, 1), (now, 1)]);
        let (status, wait) = protection_verdict(&mut st, "k", &p, now).unwrap();
        assert_eq!((status, wait), (429, 60));
    }
}
