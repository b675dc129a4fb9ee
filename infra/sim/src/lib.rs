//! Simulators of the Microsoft services relink talks to, on one loopback HTTP server, in
//! Microsoft's documented formats (OData JSON, `@odata.nextLink`, multipart `$batch`, OData error
//! bodies, 429 with `Retry-After`). State is seedable; faults (latency, 429s, 5xx, Dataverse's
//! service protection limits) are injectable; `/_sim/*` endpoints let tests inspect what happened.
//!
//! One module per service: `entra` (`{base}/{tenant}/oauth2/v2.0/token`), `dataverse`
//! (`{base}/dataverse/{org}/api/data/v9.2/...`), `fno` (`{base}/fno/{env}/data/...`),
//! `purge_service`, `lcs` (`{base}/lcs/...`), `power_platform` (`{base}/powerplatform/...`).
//! What Dataverse and F&O share (the front door with auth and faults, OData helpers, `$batch`
//! dispatch) is written once in `odata` and `multipart`; `state` holds the shared state,
//! `seed` the public knobs. This crate shares no code with relink's clients, so a misread
//! format cannot hide by being wrong the same way on both sides.

mod dataverse;
mod entra;
mod fno;
mod gateway;
mod lcs;
mod multipart;
mod odata;
mod power_platform;
mod purge_service;
mod seed;
mod state;

pub use seed::{
    AppSeed, Faults, FnoSeed, LcsHistorySeed, LogEntry, OrgSeed, PlatformSeed, PowerPlatformSeed,
    Protection, Seed, Snapshot,
};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::TcpListener;

use crate::dataverse::API;
use crate::entra::token;
use crate::lcs::lcs;
use crate::odata::{Svc, generic_faults, odata_error, service};
use crate::power_platform::power_platform;
use crate::state::{Shared, SimState, apply_seed, reset_link, snapshot};

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
    /// Emulates an operator's Reset link in F&O (see `state::reset_link`).
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
    /// The dual-write gateway's host (the `reset.gateway` of an entry).
    pub fn gateway_url(&self) -> String {
        format!("{}/gateway", self.shared.base)
    }

    pub fn power_platform_api(&self) -> String {
        format!("{}/powerplatform", self.shared.base)
    }
}

/// Which simulated service a request is for.
enum Target {
    Lcs { rest: String },
    PowerPlatform { rest: String },
    Token { tenant: String },
    DeviceCode,
    Gateway { rest: String },
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
    if let Some(rest) = p.strip_prefix("gateway/") {
        return Some(Target::Gateway {
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
    match rest {
        "oauth2/v2.0/token" => Some(Target::Token {
            tenant: tenant.to_string(),
        }),
        "oauth2/v2.0/devicecode" => Some(Target::DeviceCode),
        _ => None,
    }
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
        Target::DeviceCode => crate::entra::device_code(&shared, &body),
        Target::Gateway { rest } => {
            crate::gateway::handle(
                &shared,
                &method,
                &rest,
                uri.query().unwrap_or(""),
                &headers,
                &body,
            )
            .await
        }
        Target::Lcs { rest } => match generic_faults(&shared).await {
            Some(r) => r,
            None => lcs(&shared, &method, &rest, &uri, &headers),
        },
        Target::PowerPlatform { rest } => match generic_faults(&shared).await {
            Some(r) => r,
            None => power_platform(&shared, &method, &rest, uri.query().unwrap_or(""), &headers),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataverse::{protection_verdict, seconds_with_separators};
    use crate::fno::fno_key;
    use crate::odata::{cookie_last, percent_decode};

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
        let mut env = crate::state::FnoEnv {
            linked_organization: String::new(),
            project_configs: Default::default(),
            field_configs: Default::default(),
            business_events: Default::default(),
            purge_service_path: None,
            reset_project_configs: 0,
            per_company_key: false,
            skip_paging: false,
            empty_pages: false,
            gateway: crate::gateway::GatewayEnv::new("t"),
        };
        assert_eq!(
            fno_key(
                &env,
                "DualWriteProjectConfigurations(ProjectName='O''Brien')"
            )
            .as_deref(),
            Some("O'Brien")
        );
        assert_eq!(
            fno_key(&env, "DualWriteProjectConfigurations('a,b')").as_deref(),
            Some("a,b")
        );
        assert_eq!(
            fno_key(
                &env,
                "DualWriteProjectConfigurations(dataAreaId='demf',ProjectName='x')"
            ),
            None,
            "a key the entity does not have"
        );
        env.per_company_key = true;
        assert_eq!(
            fno_key(
                &env,
                "DualWriteProjectConfigurations(dataAreaId='DEMF',ProjectName='x')"
            )
            .as_deref(),
            Some("demf\u{1f}x")
        );
        assert_eq!(
            fno_key(&env, "DualWriteProjectConfigurations(ProjectName='x')").as_deref(),
            Some("usmf\u{1f}x"),
            "a partial key reaches the default company only"
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
