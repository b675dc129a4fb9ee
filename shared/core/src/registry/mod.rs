//! The registry (`relink.toml`): which environments relink may touch and how to reach them.
//! Unknown keys are rejected, plain http is refused unless explicitly allowed for a loopback
//! host, production is refused unless allowed, and secrets are read from the environment
//! variable the entry names and never printed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;
use url::Url;

use crate::error::{Error, Result};
use crate::event::is_environment_id;

/// The default Entra ID authority (public cloud).
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";

/// A secret value: its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The kind of environment; production is guarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EnvKind {
    Sandbox,
    Uat,
    Dev,
    Production,
}

impl EnvKind {
    /// The registry's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EnvKind::Sandbox => "sandbox",
            EnvKind::Uat => "uat",
            EnvKind::Dev => "dev",
            EnvKind::Production => "production",
        }
    }
}

/// Where a client secret comes from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SecretSource {
    /// An environment variable of the relink process.
    Env(String),
    /// An AWS Secrets Manager secret (AWS mode only).
    SecretArn(String),
    /// A file readable by its owner only (embedded mode only; mode 0600).
    File(String),
}

/// A user's sign-in kept for relink (`relink auth login ENV --for gateway|lcs`): the refresh
/// token of a device-code sign-in by the public client `client_id`, stored where `store` says
/// (`secret_arn` in AWS, a `file` or an `env` variable embedded). relink redeems it for access
/// tokens when needed and stores the rotated refresh token back (an `env` variable cannot be
/// written: it is read only).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegatedToken {
    /// The public client (an app registration with "Allow public client flows") users sign in
    /// with; it needs the delegated permission of the target (LCS `user_impersonation`, the
    /// dual-write gateway's `https://IntegratorApp.com`).
    pub client_id: String,
    #[serde(flatten)]
    pub store: SecretSource,
}

/// What a failed or timed-out gateway reset leads to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnGatewayFailure {
    /// Back at the manual gate, the cause written into the operator's instructions (default).
    #[default]
    Manual,
    /// The run ends `failed` (exit 1).
    Fail,
}

/// `reset = { mode = "gateway", ... }`: the Reset through the dual-write management gateway, an
/// unsupported interface that the F&O Dual-write page uses (docs/dynamics.md, "The dual-write
/// gateway"). Opt-in; never for production.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayReset {
    /// The regional gateway host, e.g. `https://projectmanagementservice.eu.gateway.prod.island.powerapps.com`.
    pub gateway: Url,
    pub token: DelegatedToken,
    /// Reset with `forceReset=true` (the maps are not required to be stopped).
    pub force: bool,
    pub on_failure: OnGatewayFailure,
    /// Longest wait for the running maps to stop.
    pub stop_timeout: std::time::Duration,
    /// Longest wait for the Reset, and for the link to verify after it.
    pub reset_timeout: std::time::Duration,
    /// Time between two status polls.
    pub poll: std::time::Duration,
}

/// The scope a delegated sign-in asks for, by target (`offline_access`: a refresh token).
pub const GATEWAY_SCOPE: &str = "https://IntegratorApp.com/.default offline_access";
/// LCS's delegated scope.
pub const LCS_SCOPE: &str = "https://lcsapi.lcs.dynamics.com/user_impersonation offline_access";

/// How the link is reset after the keys are cleared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResetMode {
    /// Record exact operator instructions and wait for the Reset.
    Manual,
    /// Stop the maps and Reset through the dual-write gateway (opt-in, unsupported).
    Gateway(Box<GatewayReset>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, tag = "mode", rename_all = "lowercase")]
enum RawReset {
    Manual,
    Gateway {
        gateway: String,
        token: DelegatedToken,
        #[serde(default)]
        force: bool,
        #[serde(default)]
        on_failure: OnGatewayFailure,
        #[serde(default = "default_stop_timeout")]
        stop_timeout_seconds: u64,
        #[serde(default = "default_reset_timeout")]
        reset_timeout_seconds: u64,
        #[serde(default = "default_poll")]
        poll_seconds: u64,
    },
}

fn default_stop_timeout() -> u64 {
    300
}
fn default_reset_timeout() -> u64 {
    420
}
fn default_poll() -> u64 {
    5
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    /// The channels of every entry that has no `notify` of its own.
    #[serde(default)]
    notify: Option<NotifyConfig>,
    #[serde(default)]
    environments: BTreeMap<String, RawEnv>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnv {
    kind: EnvKind,
    fno_url: String,
    dataverse_url: String,
    dataverse_unique_name: String,
    #[serde(default)]
    dataverse_organization_id: Option<String>,
    tenant_id: String,
    client_id: String,
    client_secret: SecretSource,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    allow_insecure_http: bool,
    #[serde(default)]
    allow_production: bool,
    #[serde(default)]
    allow_unverified_pairing: bool,
    #[serde(default)]
    power_platform_api: Option<String>,
    #[serde(default = "default_reset")]
    reset: RawReset,
    #[serde(default)]
    fno_purge_service: Option<String>,
    #[serde(default)]
    limits: Limits,
    #[serde(default)]
    lcs_environment_id: Option<String>,
    #[serde(default)]
    power_platform_environment_id: Option<String>,
    #[serde(default)]
    watch: Option<RawWatch>,
    #[serde(default)]
    verify: VerifyConfig,
    #[serde(default)]
    notify: Option<NotifyConfig>,
    #[serde(default)]
    probe: Option<ProbeConfig>,
}

/// Where an environment's notices go (`crate::notice`): each channel's URL is a secret (an
/// environment variable embedded, a Secrets Manager secret in AWS), read when a notice is sent.
/// No channel, no notice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// A Teams Workflows "When a Teams webhook request is received" URL (Adaptive Card).
    #[serde(default)]
    pub teams: Option<SecretSource>,
    /// A Slack incoming webhook URL (Block Kit).
    #[serde(default)]
    pub slack: Option<SecretSource>,
    /// Any HTTPS endpoint, sent relink's JSON signed with `webhook_secret` the way
    /// notifications into relink are (`X-Relink-Timestamp`, `X-Relink-Signature`).
    #[serde(default)]
    pub webhook: Option<SecretSource>,
    /// The signing key of `webhook` (at least 32 bytes).
    #[serde(default)]
    pub webhook_secret: Option<SecretSource>,
    /// Publish to the stack's SNS topic (AWS mode: the template's `NoticesTopic`, which
    /// customers subscribe e-mail, SMS or their own endpoints to). Embedded mode has no topic and
    /// records the channel as not sent.
    #[serde(default)]
    pub sns: bool,
}

impl NotifyConfig {
    /// Whether no channel is configured.
    pub fn is_empty(&self) -> bool {
        self.teams.is_none() && self.slack.is_none() && self.webhook.is_none() && !self.sns
    }
}

/// What a drift probe does when it finds the link stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnDrift {
    /// Start a run, as a restore notification would.
    Run,
    /// Only tell the environment's channels.
    Notify,
}

/// A drift probe: the restore watcher has the environment's link inspected read-only (the
/// detection stage, nothing deleted) every `every_hours`, whether or not any restore was
/// notified, so a link gone stale through a bacpac import, a point-in-time restore or a copy
/// nobody announced is found. Each environment is probed at its own offset in the interval, so
/// many environments never probe one Dataverse at the same time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeConfig {
    /// Hours between two probes, 1..=720.
    pub every_hours: u64,
    /// What a stale link leads to.
    pub on_drift: OnDrift,
}

impl ProbeConfig {
    /// Time between two probes.
    pub fn every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.every_hours * 3600)
    }
}

/// While a run awaits the operator's Reset, relink verifies the link again on its own, read-only:
/// every `every_seconds` (AWS: on the restore watcher's schedule, so at most that often;
/// embedded: `relink run --wait`, `relink confirm --wait`), and ends the run `failed` when the
/// link is still not rebuilt `give_up_after_seconds` after the gate (a new run can follow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifyConfig {
    /// Seconds between two checks, 1..=86400 (default 900: 15 minutes).
    pub every_seconds: u64,
    /// Seconds after the gate at which the run gives up, at least `every_seconds` (default
    /// 259200: three days).
    pub give_up_after_seconds: u64,
    /// Seconds between reminders to the notification channels while the Reset is due (default
    /// 14400: four hours; 0: none).
    pub remind_every_seconds: u64,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            every_seconds: 900,
            give_up_after_seconds: 3 * 24 * 3600,
            remind_every_seconds: 4 * 3600,
        }
    }
}

impl VerifyConfig {
    /// Time between two checks.
    pub fn every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.every_seconds)
    }
    /// Time from the gate to giving up.
    pub fn give_up_after(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.give_up_after_seconds)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWatch {
    #[serde(default)]
    lcs_project_id: Option<String>,
    #[serde(default)]
    lcs_token: Option<SecretSource>,
    /// A user's sign-in (`relink auth login ENV --for lcs`) instead of an access token kept
    /// fresh by other automation.
    #[serde(default)]
    lcs_sign_in: Option<DelegatedToken>,
    #[serde(default)]
    lcs_api: Option<String>,
    #[serde(default)]
    power_platform: bool,
    #[serde(default)]
    power_platform_api: Option<String>,
    #[serde(default = "default_lookback")]
    lookback_minutes: u64,
}

fn default_lookback() -> u64 {
    60
}

/// The LCS API (public cloud).
pub const DEFAULT_LCS_API: &str = "https://lcsapi.lcs.dynamics.com";
/// The Power Platform API.
pub const DEFAULT_POWER_PLATFORM_API: &str = "https://api.powerplatform.com";

/// Where the restore watcher looks for completed restores of an environment.
#[derive(Clone, Debug)]
pub struct WatchConfig {
    /// LCS environment history, when a project and a token are configured.
    pub lcs: Option<LcsWatch>,
    /// Power Platform operations of `power_platform_environment_id`, with the app's token.
    pub power_platform: Option<Url>,
    /// How far back the first poll looks.
    pub lookback: std::time::Duration,
}

/// LCS history settings.
#[derive(Clone, Debug)]
pub struct LcsWatch {
    pub api: Url,
    pub project_id: String,
    pub environment_id: String,
    /// LCS accepts only delegated (user) tokens: the secret holds a current access token
    /// (`watch.lcs_token`), or `sign_in` is set and the secret holds a refresh token.
    pub token_source: SecretSource,
    pub token: Option<Secret>,
    /// `watch.lcs_sign_in`: relink redeems the user's refresh token itself.
    pub sign_in: Option<DelegatedToken>,
}

fn default_reset() -> RawReset {
    RawReset::Manual
}

/// Tuning of page sizes, batch sizes and concurrency; the defaults suit Dataverse's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Rows per Dataverse page (`Prefer: odata.maxpagesize`), 1..=5000.
    pub dataverse_page_size: usize,
    /// Deletes per Dataverse `$batch`, 1..=1000.
    pub dataverse_batch_size: usize,
    /// Dataverse `$batch` requests in flight at once, 1..=52.
    pub dataverse_concurrency: usize,
    /// Rows per F&O page, 1..=10000.
    pub fno_page_size: usize,
    /// Deletes per F&O `$batch`, 1..=1000.
    pub fno_batch_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            dataverse_page_size: 5000,
            dataverse_batch_size: 1000,
            dataverse_concurrency: 4,
            fno_page_size: 1000,
            fno_batch_size: 100,
        }
    }
}

/// One environment's validated registry entry.
#[derive(Clone, Debug)]
pub struct EnvConfig {
    pub id: String,
    pub kind: EnvKind,
    pub fno_url: Url,
    pub dataverse_url: Url,
    pub dataverse_unique_name: String,
    pub dataverse_organization_id: Option<uuid::Uuid>,
    pub tenant_id: String,
    pub client_id: String,
    pub secret_source: SecretSource,
    /// The client secret, when it was resolvable at load time (env variables).
    pub client_secret: Option<Secret>,
    pub authority: Url,
    pub allow_production: bool,
    /// Lets the destructive stages proceed when neither Dataverse nor the Power Platform API can
    /// say which F&O environment the Dataverse is linked to (refused otherwise).
    pub allow_unverified_pairing: bool,
    /// The Power Platform API the guards ask for the environment's type and linked F&O: set in
    /// the entry, or `https://api.powerplatform.com` when the authority is the public cloud's.
    pub power_platform_api: Option<Url>,
    pub reset: ResetMode,
    /// Path (under the F&O URL) of a customer-deployed purge service, if any.
    pub fno_purge_service: Option<String>,
    pub limits: Limits,
    /// The LCS environment id, so LCS notifications find this entry.
    pub lcs_environment_id: Option<String>,
    /// The Power Platform environment id, so Power Platform notifications find this entry.
    pub power_platform_environment_id: Option<String>,
    /// The restore watcher's settings, if it watches this environment.
    pub watch: Option<WatchConfig>,
    /// Checks of the link while a run awaits the operator's Reset.
    pub verify: VerifyConfig,
    /// Where notices go.
    pub notify: NotifyConfig,
    /// Drift probes of this environment, if it asks for them.
    pub probe: Option<ProbeConfig>,
    /// Plain http accepted for loopback addresses (simulators, local receivers).
    pub allow_insecure_http: bool,
}

impl EnvConfig {
    /// The Dataverse Web API base, `{dataverse_url}/api/data/v9.2/`.
    pub fn dataverse_api(&self) -> Url {
        join(&self.dataverse_url, "api/data/v9.2/")
    }
    /// The F&O OData base, `{fno_url}/data/`.
    pub fn fno_data(&self) -> Url {
        join(&self.fno_url, "data/")
    }
    /// The OAuth scope for a resource URL: `{origin+path}/.default`.
    pub fn scope_for(resource: &Url) -> String {
        format!("{}/.default", resource.as_str().trim_end_matches('/'))
    }
}

/// Appends a relative path to a base URL whatever its trailing slash.
pub fn join(base: &Url, rel: &str) -> Url {
    let mut s = base.as_str().trim_end_matches('/').to_string();
    s.push('/');
    s.push_str(rel);
    Url::parse(&s).expect("a valid base joined with a fixed path stays valid")
}

/// All registered environments.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    environments: BTreeMap<String, EnvConfig>,
    /// Table entries that failed validation, with the reason: only their own events are refused.
    invalid: BTreeMap<String, String>,
}

impl Registry {
    /// Reads and validates a registry file, resolving `env` secrets from the process environment.
    pub fn load(path: &Path) -> Result<Registry> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!(
                "cannot read registry {}: {e}; create it (see README, Configuration) or pass --config",
                path.display()
            ))
        })?;
        Registry::parse(&text, |name| std::env::var(name).ok())
            .map_err(|e| Error::Config(format!("{}: {}", path.display(), strip_prefix(e))))
    }

    /// Parses registry text; `lookup` resolves `client_secret = { env = ... }`.
    pub fn parse(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<Registry> {
        let raw: RawRegistry = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        let mut environments = BTreeMap::new();
        for (id, mut env) in raw.environments {
            if env.notify.is_none() {
                env.notify = raw.notify.clone();
            }
            let cfg = validate(&id, env, &lookup)
                .map_err(|e| Error::Config(format!("[environments.{id}]: {}", strip_prefix(e))))?;
            environments.insert(id, cfg);
        }
        if let Some((a, b, field, value)) = shared_ids(environments.values()).into_iter().next() {
            return Err(Error::Config(format!(
                "[environments.{a}] and [environments.{b}] both set {field} = {value:?}: a notification for it could reach either; give each entry its own"
            )));
        }
        Ok(Registry {
            environments,
            invalid: BTreeMap::new(),
        })
    }

    /// Builds a registry from entries stored one by one (the AWS table holds each entry as the
    /// JSON form of its `[environments.ID]` table). An entry that fails validation (written by
    /// hand, or by an older relink) is kept aside with its reason: events for it are refused
    /// with that reason, and every other environment keeps working. Their secrets are Secrets
    /// Manager ARNs, resolved later; the process environment is never read.
    pub fn from_entries(entries: &[(String, serde_json::Value)]) -> Registry {
        let mut registry = Registry::default();
        for (id, value) in entries {
            let cfg = serde_json::from_value::<RawEnv>(value.clone())
                .map_err(|e| e.to_string())
                .and_then(|raw| only_stored_secrets(&raw).map(|()| raw))
                .and_then(|raw| validate(id, raw, &|_: &str| None).map_err(strip_prefix));
            match cfg {
                Ok(cfg) => {
                    registry.environments.insert(id.clone(), cfg);
                }
                Err(reason) => {
                    tracing::error!(environment_id = %id, error = %reason, "invalid registry entry in the table");
                    registry.invalid.insert(id.clone(), reason);
                }
            }
        }
        // Two entries claiming one LCS / Power Platform environment: neither is trusted.
        for (a, b, field, value) in shared_ids(registry.environments.values()) {
            for (me, other) in [(&a, &b), (&b, &a)] {
                let reason = format!(
                    "{field} = {value:?} is also set on entry `{other}`: a notification could reach either"
                );
                tracing::error!(environment_id = %me, error = %reason, "invalid registry entry in the table");
                registry.environments.remove(me);
                registry.invalid.insert(me.clone(), reason);
            }
        }
        registry
    }

    /// Whether `entry` (to be stored as `id`) names an LCS or Power Platform environment that
    /// another entry already names: `env push` refuses it with the other entry's id.
    pub fn check_unique_ids(&self, id: &str, entry: &EnvConfig) -> Result<()> {
        let others = self.iter().filter(|e| e.id != id);
        match shared_ids(others.chain(std::iter::once(entry)))
            .into_iter()
            .find(|(a, b, _, _)| a == id || b == id)
        {
            Some((a, b, field, value)) => Err(Error::Config(format!(
                "{field} = {value:?} of `{id}` is already set on entry `{}`; each LCS / Power Platform environment belongs to one entry",
                if a == id { b } else { a }
            ))),
            None => Ok(()),
        }
    }

    /// The environment ids a registry file names, without validating or resolving its entries
    /// (`relink status --all` lists environments whose secrets are not at hand).
    pub fn ids(text: &str) -> Result<Vec<String>> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        Ok(doc
            .get("environments")
            .and_then(toml::Value::as_table)
            .map(|t| t.keys().cloned().collect())
            .unwrap_or_default())
    }

    /// The `[environments.ID]` table of a registry file as JSON, validated, for storing in AWS.
    pub fn entry_json(text: &str, id: &str) -> Result<serde_json::Value> {
        Registry::parse(text, |_| Some("unused".into()))?.get(id)?;
        let doc: toml::Table = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        let mut entry = doc
            .get("environments")
            .and_then(|e| e.get(id))
            .and_then(toml::Value::as_table)
            .cloned()
            .ok_or_else(|| Error::UnknownEnvironment(id.into()))?;
        // The table holds each entry whole: the registry's default channels go with it.
        if let (None, Some(default)) = (entry.get("notify"), doc.get("notify")) {
            entry.insert("notify".into(), default.clone());
        }
        serde_json::to_value(entry).map_err(|e| Error::Config(e.to_string()))
    }

    /// The entry a notification names: by registry key, LCS or Power Platform environment id.
    pub fn find(&self, reference: &crate::notify::EnvRef) -> Option<&EnvConfig> {
        use crate::notify::EnvRef;
        match reference {
            EnvRef::Registry(id) => self.environments.get(id),
            EnvRef::Lcs(id) => self.iter().find(|e| {
                e.lcs_environment_id
                    .as_deref()
                    .is_some_and(|l| l.eq_ignore_ascii_case(id))
            }),
            EnvRef::PowerPlatform(id) => self.iter().find(|e| {
                e.power_platform_environment_id
                    .as_deref()
                    .is_some_and(|p| p.eq_ignore_ascii_case(id))
            }),
        }
    }

    /// The entry for an environment, or [`Error::UnknownEnvironment`].
    pub fn get(&self, id: &str) -> Result<&EnvConfig> {
        if let Some(reason) = self.invalid.get(id) {
            return Err(Error::Config(format!(
                "registry entry `{id}` in the table is invalid: {reason}; fix [environments.{id}] and run relink env push {id}"
            )));
        }
        self.environments
            .get(id)
            .ok_or_else(|| Error::UnknownEnvironment(id.to_string()))
    }

    /// Every entry, by id.
    pub fn iter(&self) -> impl Iterator<Item = &EnvConfig> {
        self.environments.values()
    }
}

/// Pairs of entries that set the same LCS or Power Platform environment id (compared as
/// notifications compare them, ignoring case): (first id, second id, field, value).
fn shared_ids<'a>(
    entries: impl Iterator<Item = &'a EnvConfig>,
) -> Vec<(String, String, &'static str, String)> {
    let mut seen: BTreeMap<(&'static str, String), String> = BTreeMap::new();
    let mut shared = Vec::new();
    for e in entries {
        for (field, value) in [
            ("lcs_environment_id", &e.lcs_environment_id),
            (
                "power_platform_environment_id",
                &e.power_platform_environment_id,
            ),
        ] {
            let Some(v) = value else { continue };
            match seen.entry((field, v.to_ascii_lowercase())) {
                std::collections::btree_map::Entry::Occupied(o) => {
                    shared.push((o.get().clone(), e.id.clone(), field, v.clone()));
                }
                std::collections::btree_map::Entry::Vacant(slot) => {
                    slot.insert(e.id.clone());
                }
            }
        }
    }
    shared
}

fn strip_prefix(e: Error) -> String {
    match e {
        Error::Config(m) => m,
        other => other.to_string(),
    }
}

fn validate(id: &str, raw: RawEnv, lookup: &impl Fn(&str) -> Option<String>) -> Result<EnvConfig> {
    if !is_environment_id(id) {
        return Err(Error::Config(
            "the environment id must be 1-64 of a-z, 0-9, '-', '_', starting with a letter or digit".into(),
        ));
    }
    let insecure = raw.allow_insecure_http;
    let fno_url = endpoint("fno_url", &raw.fno_url, insecure)?;
    let dataverse_url = endpoint("dataverse_url", &raw.dataverse_url, insecure)?;
    let authority = credential_endpoint(
        "authority",
        raw.authority.as_deref().unwrap_or(DEFAULT_AUTHORITY),
        insecure,
        Receiver::Entra,
    )?;
    if raw.dataverse_unique_name.trim().is_empty() {
        return Err(Error::Config(
            "`dataverse_unique_name` must name the organisation this F&O must be linked to".into(),
        ));
    }
    let dataverse_organization_id = raw
        .dataverse_organization_id
        .map(|s| {
            uuid::Uuid::parse_str(&s).map_err(|_| {
                Error::Config(format!("`dataverse_organization_id` {s:?} is not a GUID"))
            })
        })
        .transpose()?;
    for (field, v) in [("tenant_id", &raw.tenant_id), ("client_id", &raw.client_id)] {
        if v.trim().is_empty() || v.contains('/') {
            return Err(Error::Config(format!(
                "`{field}` must be a non-empty id without '/'"
            )));
        }
    }
    let client_secret = match &raw.client_secret {
        SecretSource::Env(var) => Some(Secret::new(lookup(var).filter(|v| !v.is_empty()).ok_or_else(|| {
            Error::Config(format!(
                "`client_secret` names the environment variable {var}, which is not set; export it before running relink"
            ))
        })?)),
        SecretSource::SecretArn(arn) => {
            if !arn.starts_with("arn:aws:secretsmanager:") && !arn.starts_with("arn:aws-") {
                return Err(Error::Config(format!("`client_secret.secret_arn` {arn:?} is not a Secrets Manager ARN")));
            }
            None
        }
        // Read (and its mode checked) when a token is needed.
        SecretSource::File(_) => None,
    };
    let reset = match raw.reset {
        RawReset::Manual => ResetMode::Manual,
        RawReset::Gateway {
            gateway,
            token,
            force,
            on_failure,
            stop_timeout_seconds,
            reset_timeout_seconds,
            poll_seconds,
        } => {
            if raw.kind == EnvKind::Production {
                return Err(Error::Config(
                    "reset mode `gateway` is never used on production (an unsupported interface); use reset = { mode = \"manual\" }".into(),
                ));
            }
            let gateway =
                credential_endpoint("reset.gateway", &gateway, insecure, Receiver::Gateway)?;
            check_public_client(&token, "reset.token")?;
            // The reset-link function has 900 s: both waits and the verification fit in it.
            if !(10..=600).contains(&stop_timeout_seconds)
                || !(10..=600).contains(&reset_timeout_seconds)
                || stop_timeout_seconds + reset_timeout_seconds > 780
                || !(1..=60).contains(&poll_seconds)
            {
                return Err(Error::Config(format!(
                    "reset: stop_timeout_seconds and reset_timeout_seconds must be 10-600 and together at most 780, poll_seconds 1-60 (got {stop_timeout_seconds}, {reset_timeout_seconds}, {poll_seconds})"
                )));
            }
            ResetMode::Gateway(Box::new(GatewayReset {
                gateway,
                token,
                force,
                on_failure,
                stop_timeout: std::time::Duration::from_secs(stop_timeout_seconds),
                reset_timeout: std::time::Duration::from_secs(reset_timeout_seconds),
                poll: std::time::Duration::from_secs(poll_seconds),
            }))
        }
    };
    if let Some(p) = &raw.fno_purge_service
        && (!p.starts_with('/') || p.contains("..") || p.contains("://") || p.contains('?'))
    {
        return Err(Error::Config(format!(
            "`fno_purge_service` {p:?} must be a path under the F&O URL, such as \"/api/services/RelinkServices/RelinkPurgeService\""
        )));
    }
    check_limits(&raw.limits)?;
    let power_platform_api = match &raw.power_platform_api {
        Some(api) => Some(credential_endpoint(
            "power_platform_api",
            api,
            insecure,
            Receiver::PowerPlatform,
        )?),
        None if authority.host_str() == Some("login.microsoftonline.com") => {
            Some(Url::parse(DEFAULT_POWER_PLATFORM_API).expect("valid constant"))
        }
        None => None,
    };
    let watch = raw
        .watch
        .map(|w| {
            watch_config(
                w,
                &raw.lcs_environment_id,
                &raw.power_platform_environment_id,
                power_platform_api.as_ref(),
                insecure,
                lookup,
            )
        })
        .transpose()?;
    let notify = raw.notify.unwrap_or_default();
    if notify.webhook.is_some() != notify.webhook_secret.is_some() {
        return Err(Error::Config(format!(
            "[environments.{id}] notify: webhook and webhook_secret go together (relink signs what it sends to a webhook)"
        )));
    }
    let v = raw.verify;
    if !(1..=86_400).contains(&v.every_seconds) || v.give_up_after_seconds < v.every_seconds {
        return Err(Error::Config(format!(
            "[environments.{id}] verify: every_seconds must be 1-86400 and give_up_after_seconds at least every_seconds (got {} and {})",
            v.every_seconds, v.give_up_after_seconds
        )));
    }
    if let Some(p) = &raw.probe {
        if !(1..=720).contains(&p.every_hours) {
            return Err(Error::Config(format!(
                "[environments.{id}] probe: every_hours must be 1-720 (got {})",
                p.every_hours
            )));
        }
        if p.on_drift == OnDrift::Notify && notify.is_empty() {
            return Err(Error::Config(format!(
                "[environments.{id}] probe: on_drift = \"notify\" needs a notification channel (notify = {{ ... }} here or in the registry's [notify]); or use on_drift = \"run\""
            )));
        }
    }
    Ok(EnvConfig {
        id: id.to_string(),
        kind: raw.kind,
        fno_url,
        dataverse_url,
        dataverse_unique_name: raw.dataverse_unique_name,
        dataverse_organization_id,
        tenant_id: raw.tenant_id,
        client_id: raw.client_id,
        secret_source: raw.client_secret,
        client_secret,
        authority,
        allow_production: raw.allow_production,
        allow_unverified_pairing: raw.allow_unverified_pairing,
        power_platform_api,
        reset,
        fno_purge_service: raw.fno_purge_service,
        limits: raw.limits,
        watch,
        lcs_environment_id: raw.lcs_environment_id,
        power_platform_environment_id: raw.power_platform_environment_id,
        verify: raw.verify,
        notify,
        probe: raw.probe,
        allow_insecure_http: insecure,
    })
}

fn watch_config(
    w: RawWatch,
    lcs_env: &Option<String>,
    pp_env: &Option<String>,
    entry_api: Option<&Url>,
    insecure: bool,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<WatchConfig> {
    if w.lcs_token.is_some() && w.lcs_sign_in.is_some() {
        return Err(Error::Config(
            "`watch` takes `lcs_token` (an access token kept fresh elsewhere) or `lcs_sign_in` (relink auth login ENV --for lcs), not both".into(),
        ));
    }
    if let Some(t) = &w.lcs_sign_in {
        check_public_client(t, "watch.lcs_sign_in")?;
    }
    let sign_in = w.lcs_sign_in.clone();
    let lcs_token = w
        .lcs_token
        .or_else(|| sign_in.as_ref().map(|t| t.store.clone()));
    let lcs = match (w.lcs_project_id, lcs_token) {
        (Some(project_id), Some(token_source)) => {
            let environment_id = lcs_env.clone().ok_or_else(|| {
                Error::Config(
                    "`watch.lcs_project_id` needs `lcs_environment_id` on the entry".into(),
                )
            })?;
            // A missing LCS token stops only the watcher's LCS polling of this entry (it says
            // so when it polls), never the relinking itself.
            let token = match &token_source {
                _ if sign_in.is_some() => None,
                SecretSource::Env(var) => lookup(var).filter(|v| !v.is_empty()).map(Secret::new),
                SecretSource::SecretArn(_) | SecretSource::File(_) => None,
            };
            let api = credential_endpoint(
                "watch.lcs_api",
                w.lcs_api.as_deref().unwrap_or(DEFAULT_LCS_API),
                insecure,
                Receiver::Lcs,
            )?;
            Some(LcsWatch {
                api,
                project_id,
                environment_id,
                token_source,
                token,
                sign_in,
            })
        }
        (None, None) => None,
        _ => {
            return Err(Error::Config(
                "`watch` needs `lcs_project_id` and `lcs_token` (or `lcs_sign_in`) to read LCS history".into(),
            ));
        }
    };
    let power_platform = if w.power_platform {
        if pp_env.is_none() {
            return Err(Error::Config(
                "`watch.power_platform = true` needs `power_platform_environment_id` on the entry"
                    .into(),
            ));
        }
        match (w.power_platform_api.as_deref(), entry_api) {
            (Some(api), _) => Some(credential_endpoint(
                "watch.power_platform_api",
                api,
                insecure,
                Receiver::PowerPlatform,
            )?),
            (None, Some(api)) => Some(api.clone()),
            (None, None) => Some(credential_endpoint(
                "watch.power_platform_api",
                DEFAULT_POWER_PLATFORM_API,
                insecure,
                Receiver::PowerPlatform,
            )?),
        }
    } else {
        None
    };
    if lcs.is_none() && power_platform.is_none() {
        return Err(Error::Config(
            "`watch` watches nothing: set lcs_project_id + lcs_token, and/or power_platform = true"
                .into(),
        ));
    }
    Ok(WatchConfig {
        lcs,
        power_platform,
        lookback: std::time::Duration::from_secs(w.lookback_minutes.max(1) * 60),
    })
}

fn check_limits(l: &Limits) -> Result<()> {
    let checks = [
        ("limits.dataverse_page_size", l.dataverse_page_size, 5000),
        ("limits.dataverse_batch_size", l.dataverse_batch_size, 1000),
        ("limits.dataverse_concurrency", l.dataverse_concurrency, 52),
        ("limits.fno_page_size", l.fno_page_size, 10_000),
        ("limits.fno_batch_size", l.fno_batch_size, 1000),
    ];
    for (name, v, max) in checks {
        if v == 0 || v > max {
            return Err(Error::Config(format!(
                "`{name}` is {v}; it must be between 1 and {max}"
            )));
        }
    }
    Ok(())
}

/// Parses an endpoint URL: https, or http to a loopback host when `allow_insecure_http` is set.
fn endpoint(field: &str, value: &str, allow_insecure_http: bool) -> Result<Url> {
    let url = Url::parse(value)
        .map_err(|e| Error::Config(format!("`{field}` {value:?} is not a URL: {e}")))?;
    if !url.username().is_empty()
        || url.password().is_some()
        || url.query().is_some()
        || url.fragment().is_some()
    {
        return Err(Error::Config(format!(
            "`{field}` must be a plain base URL without credentials, query or fragment"
        )));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if allow_insecure_http && is_loopback(&url) => Ok(url),
        "http" if allow_insecure_http => Err(Error::Config(format!(
            "`{field}` uses plain http to a host that is not loopback; allow_insecure_http only permits 127.0.0.1, ::1 or localhost (simulators)"
        ))),
        "http" => Err(Error::Config(format!(
            "`{field}` uses plain http; relink requires https (allow_insecure_http = true is for loopback simulators only)"
        ))),
        other => Err(Error::Config(format!(
            "`{field}` has scheme {other:?}; relink requires https"
        ))),
    }
}

/// A host that receives a credential (the client secret, an LCS token, a Power Platform token).
#[derive(Clone, Copy)]
enum Receiver {
    Entra,
    Lcs,
    PowerPlatform,
    Gateway,
}

impl Receiver {
    /// Whether `host` is one of this receiver's hosts in the public or a sovereign cloud
    /// (docs/dynamics.md, "Hosts that receive credentials").
    fn accepts(self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        match self {
            // The regional dual-write management gateways (community knowledge, docs/dynamics.md).
            Receiver::Gateway => host
                .strip_prefix("projectmanagementservice.")
                .and_then(|h| h.strip_suffix(".gateway.prod.island.powerapps.com"))
                .is_some_and(|region| {
                    !region.is_empty()
                        && region
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                }),
            Receiver::Entra => [
                "login.microsoftonline.com",
                "login.microsoftonline.us",
                "login-us.microsoftonline.com",
                "login.chinacloudapi.cn",
                "login.partner.microsoftonline.cn",
                "login.microsoftonline.de",
            ]
            .contains(&host.as_str()),
            Receiver::Lcs => {
                host == "lcsapi.lcs.dynamics.com"
                    || host == "lcsapi.lcs.dynamics.cn"
                    || host == "lcsapi.gov.lcs.microsoftdynamics.us"
                    || host
                        .strip_prefix("lcsapi.")
                        .and_then(|h| h.strip_suffix(".lcs.dynamics.com"))
                        .is_some_and(|region| {
                            !region.is_empty() && region.bytes().all(|b| b.is_ascii_lowercase())
                        })
            }
            Receiver::PowerPlatform => [
                "api.powerplatform.com",
                "api.gov.powerplatform.microsoft.us",
                "api.high.powerplatform.microsoft.us",
                "api.appsplatform.us",
                "api.powerplatform.partner.microsoftonline.cn",
            ]
            .contains(&host.as_str()),
        }
    }
}

/// An endpoint that receives credentials: one of the service's own hosts, or a loopback
/// simulator when `allow_insecure_http` says so. A registry entry cannot send a secret to a host
/// of its choosing.
fn credential_endpoint(
    field: &str,
    value: &str,
    allow_insecure_http: bool,
    receiver: Receiver,
) -> Result<Url> {
    let url = endpoint(field, value, allow_insecure_http)?;
    if (allow_insecure_http && is_loopback(&url))
        || url.host_str().is_some_and(|h| receiver.accepts(h))
    {
        return Ok(url);
    }
    Err(Error::Config(format!(
        "`{field}` {value:?} is not a host relink sends credentials to; use the service's own host for your cloud (docs/dynamics.md lists them), or a loopback simulator with allow_insecure_http"
    )))
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// Entries stored in the AWS table name their secrets by Secrets Manager ARN only: an entry
/// that names an environment variable would make a function read its own environment (where its
/// role's AWS credentials are) and send the value to the entry's hosts.
fn only_stored_secrets(raw: &RawEnv) -> std::result::Result<(), String> {
    let lcs = raw.watch.as_ref().and_then(|w| w.lcs_token.as_ref());
    let lcs_sign_in = raw
        .watch
        .as_ref()
        .and_then(|w| w.lcs_sign_in.as_ref())
        .map(|t| &t.store);
    let gateway = match &raw.reset {
        RawReset::Gateway { token, .. } => Some(&token.store),
        RawReset::Manual => None,
    };
    let n = raw.notify.clone().unwrap_or_default();
    for (field, source) in [
        ("client_secret", Some(&raw.client_secret)),
        ("watch.lcs_token", lcs),
        ("watch.lcs_sign_in", lcs_sign_in),
        ("reset.token", gateway),
        ("notify.teams", n.teams.as_ref()),
        ("notify.slack", n.slack.as_ref()),
        ("notify.webhook", n.webhook.as_ref()),
        ("notify.webhook_secret", n.webhook_secret.as_ref()),
    ] {
        let named = match source {
            Some(SecretSource::Env(var)) => format!("the environment variable {var}"),
            Some(SecretSource::File(path)) => format!("the file {path}"),
            _ => continue,
        };
        return Err(format!(
            "`{field}` names {named}; in AWS relink reads secrets only from Secrets Manager: use {field} = {{ secret_arn = \"arn:aws:secretsmanager:...\" }}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;

/// A delegated sign-in's client id is an id (a GUID in Entra), never a URL or a path.
fn check_public_client(token: &DelegatedToken, field: &str) -> Result<()> {
    let id = token.client_id.trim();
    if id.is_empty() || id.contains('/') || id.contains(':') {
        return Err(Error::Config(format!(
            "`{field}.client_id` must be the id of a public client app registration"
        )));
    }
    Ok(())
}
