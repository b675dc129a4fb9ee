//! The dual-write management gateway that the F&O Dual-write page uses (not a supported API),
//! in the shapes Microsoft's own sample (`microsoft/Dual-write-automations`) sends and reads:
//!
//! - `GET  api/DualWriteManagement/1.0/Environments?targetType=AX&identifier={F&O host}`:
//!   `[{cid, cname, targetType, displayName, powerAppsEnvironment}]`;
//! - `GET  api/ConnectionSet/{cname}`: the link (`id`, `name`, `environments` by name with
//!   `targetType` CDS / AX and `directUrl`, `dualWriteDetail.legalEntityMappings.mappings`);
//! - `GET  api/DualWriteManagement/1.0/Entities?targetType=AX&cid={cid}`: the maps
//!   (`detail.tid`, `tName`, `pid`, `state`: 1 stopped, 2 initial sync, 4 running, 5 paused,
//!   6 not running);
//! - `POST api/DualWriteManagement/1.0/Start` `{action: "4", details: [{tid, pid, cid}]}`:
//!   stop (4; 1 start, 5 pause, 6 resume), answered `{requestId}`;
//! - `GET  api/DualWriteManagement/1.0/Status/{requestId}`: maps with `detail.lastRequests`
//!   (`requestId`, `state`: 1 waiting, 2 completed, 3 error, `errorMessage`);
//! - `POST api/ConnectionSet/{cid}/Reset?targetType=AX&forceReset={bool}` with the payload
//!   `{powerAppsEnvironmentName, environments, legalEntities}`: 202 `{requestId}` (polled like
//!   a stop), or 200 once done (`gateway_reset_sync`). Refused while maps run, unless forced.
//!
//! Every call needs a *user's* token for `https://IntegratorApp.com`. Stops and Resets take
//! simulated time; a Reset rebuilds the link towards the organisation the F&O is linked to
//! (`state::reset_link`) and removes the maps, as the real one does.

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::odata::{bearer, generic_faults, query_param};
use crate::state::Shared;

/// The audience of the gateway's tokens (lower-cased as the token store keeps them).
const AUDIENCE: &str = "https://integratorapp.com";
const API: &str = "api/DualWriteManagement/1.0/";

/// One map as the gateway lists it.
#[derive(Clone, Debug)]
pub(crate) struct GatewayMap {
    tid: String,
    name: String,
    pid: Option<String>,
    state: u8,
}

/// The gateway's view of one F&O environment.
#[derive(Clone, Debug)]
pub(crate) struct GatewayEnv {
    cid: String,
    cname: String,
    maps: Vec<GatewayMap>,
}

impl GatewayEnv {
    pub(crate) fn new(env: &str) -> GatewayEnv {
        let map = |i: usize, name: &str, state: u8| GatewayMap {
            tid: format!("tpl-{i}"),
            name: name.to_string(),
            pid: Some(format!("pid-{env}-{i}")),
            state,
        };
        GatewayEnv {
            cid: uuid::Uuid::new_v4().to_string(),
            cname: format!("{env}-connectionset"),
            maps: vec![
                map(1, "Customers V3 (accounts)", 4),
                map(2, "Vendors V2 (msdyn_vendors)", 4),
                map(3, "Released products V2 (msdyn_sharedproductdetails)", 5),
                map(4, "Sales orders (salesorders)", 1),
            ],
        }
    }
}

/// A stop or a Reset in progress.
#[derive(Clone, Debug)]
pub(crate) struct GatewayRequest {
    env: String,
    action: &'static str,
    pids: Vec<String>,
    state: u8,
    error: Option<String>,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

pub(crate) async fn handle(
    shared: &std::sync::Arc<Shared>,
    method: &Method,
    rest: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    {
        let mut st = shared.lock();
        st.snapshot.requests += 1;
        if st.faults.gateway_throttle_next > 0 {
            st.faults.gateway_throttle_next -= 1;
            st.snapshot.throttled += 1;
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequests",
                "Rate limit is exceeded. Try again in 1 seconds.",
            );
            r.headers_mut().insert("Retry-After", HeaderValue::from(1));
            return r;
        }
        let token = bearer(headers);
        let ok = st
            .tokens
            .get(&token)
            .is_some_and(|t| t.audience == AUDIENCE && t.expires > Instant::now());
        if !ok {
            st.snapshot.unauthorized += 1;
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "The user token is missing, expired or not for https://IntegratorApp.com.",
            );
            r.headers_mut().insert(
                "WWW-Authenticate",
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            return r;
        }
    }
    if let Some(r) = generic_faults(shared).await {
        return r;
    }
    let q = |k: &str| query_param(query, k);
    match (method.as_str(), rest) {
        ("GET", r) if r == format!("{API}Environments") => environments(shared, q("identifier")),
        ("GET", r) if r == format!("{API}Entities") => match find_by_cid(shared, q("cid")) {
            Some(env) => maps(shared, &env, None),
            None => error(StatusCode::NOT_FOUND, "NotFound", "no such connection set"),
        },
        ("POST", r) if r == format!("{API}Start") => start(shared, body),
        ("GET", r) if r.starts_with(&format!("{API}Status/")) => {
            status(shared, &r[API.len() + "Status/".len()..])
        }
        ("GET", r) if r.starts_with("api/ConnectionSet/") && !r.ends_with("/Reset") => {
            connection_set(shared, &r["api/ConnectionSet/".len()..])
        }
        ("POST", r) if r.starts_with("api/ConnectionSet/") && r.ends_with("/Reset") => {
            let cid = &r["api/ConnectionSet/".len()..r.len() - "/Reset".len()];
            reset(shared, cid, q("targetType"), q("forceReset"), body).await
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no gateway route {method} {rest}"),
        ),
    }
}

fn identifier(shared: &Shared, env: &str) -> String {
    let base = shared
        .base
        .split_once("://")
        .map_or(shared.base.as_str(), |(_, b)| b);
    format!("{base}/fno/{env}").to_ascii_lowercase()
}

fn environments(shared: &Shared, id: Option<String>) -> Response {
    let id = id
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_ascii_lowercase();
    let st = shared.lock();
    let found: Vec<Value> = st
        .fno
        .iter()
        .filter(|(name, _)| identifier(shared, name) == id)
        .map(|(name, env)| {
            json!({"cid": env.gateway.cid, "cname": env.gateway.cname, "targetType": "AX", "displayName": name, "powerAppsEnvironment": format!("pa-{name}"), "detail": {"isSolutionAware": true}})
        })
        .collect();
    axum::Json(found).into_response()
}

fn find_by_cid(shared: &Shared, cid: Option<String>) -> Option<String> {
    let cid = cid?;
    let st = shared.lock();
    st.fno
        .iter()
        .find(|(_, e)| e.gateway.cid == cid)
        .map(|(n, _)| n.clone())
}

fn map_json(m: &GatewayMap, requests: &[Value]) -> Value {
    json!({
        "leftEntity": {"targetType": "AX", "name": m.name.split(' ').next().unwrap_or_default()},
        "rightEntity": {"targetType": "CDS", "name": m.name.rsplit('(').next().unwrap_or_default().trim_end_matches(')')},
        "detail": {"tid": m.tid, "tName": m.name, "template": {"id": m.tid}, "pid": m.pid, "state": m.state.to_string(), "lastRequests": requests},
    })
}

fn maps(shared: &Shared, env: &str, only: Option<&[String]>) -> Response {
    let st = shared.lock();
    let Some(e) = st.fno.get(env) else {
        return error(StatusCode::NOT_FOUND, "NotFound", "no such environment");
    };
    let list: Vec<Value> = e
        .gateway
        .maps
        .iter()
        .filter(|m| only.is_none_or(|o| m.pid.as_ref().is_some_and(|p| o.contains(p))))
        .map(|m| map_json(m, &[]))
        .collect();
    axum::Json(list).into_response()
}

fn start(shared: &std::sync::Arc<Shared>, body: &[u8]) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is not JSON",
        );
    };
    let action = v["action"].as_str().unwrap_or_default().to_string();
    let details = v["details"].as_array().cloned().unwrap_or_default();
    if action != "4" || details.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the simulated gateway takes stop requests (action 4) with details",
        );
    }
    let Some(env) = find_by_cid(shared, details[0]["cid"].as_str().map(str::to_string)) else {
        return error(StatusCode::NOT_FOUND, "NotFound", "no such connection set");
    };
    let pids: Vec<String> = details
        .iter()
        .filter_map(|d| d["pid"].as_str().map(str::to_string))
        .collect();
    let id = uuid::Uuid::new_v4().to_string();
    let (delay, never) = {
        let mut st = shared.lock();
        st.snapshot.gateway_stops += 1;
        st.gateway_requests.insert(
            id.clone(),
            GatewayRequest {
                env: env.clone(),
                action: "4",
                pids: pids.clone(),
                state: 1,
                error: None,
            },
        );
        (
            Duration::from_millis(st.faults.gateway_stop_ms),
            st.faults.gateway_stop_never,
        )
    };
    if !never {
        let shared = shared.clone();
        let id2 = id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut st = shared.lock();
            if let Some(e) = st.fno.get_mut(&env) {
                for m in e.gateway.maps.iter_mut() {
                    if m.pid.as_ref().is_some_and(|p| pids.contains(p)) {
                        m.state = 1;
                    }
                }
            }
            if let Some(r) = st.gateway_requests.get_mut(&id2) {
                r.state = 2;
            }
        });
    }
    axum::Json(json!({"requestId": id})).into_response()
}

fn status(shared: &Shared, id: &str) -> Response {
    let st = shared.lock();
    let Some(r) = st.gateway_requests.get(id) else {
        return error(StatusCode::NOT_FOUND, "NotFound", "no such request");
    };
    let req = json!([{"requestId": id, "action": r.action, "state": r.state.to_string(), "errorMessage": r.error}]);
    let Some(env) = st.fno.get(&r.env) else {
        return error(StatusCode::NOT_FOUND, "NotFound", "no such environment");
    };
    let list: Vec<Value> = if r.action == "4" {
        env.gateway
            .maps
            .iter()
            .filter(|m| m.pid.as_ref().is_some_and(|p| r.pids.contains(p)))
            .map(|m| map_json(m, req.as_array().unwrap()))
            .collect()
    } else {
        vec![json!({"detail": {"tName": "Reset link", "lastRequests": req}})]
    };
    axum::Json(list).into_response()
}

fn connection_set(shared: &Shared, cname: &str) -> Response {
    let st = shared.lock();
    let Some((name, env)) = st.fno.iter().find(|(_, e)| e.gateway.cname == cname) else {
        return error(StatusCode::NOT_FOUND, "NotFound", "no such connection set");
    };
    let linked = env
        .project_configs
        .values()
        .next()
        .and_then(|r| r["ExternalEnvironmentUrl"].as_str())
        .unwrap_or_default()
        .to_string();
    axum::Json(json!({
        "id": env.gateway.cid,
        "name": env.gateway.cname,
        "forDualWrite": true,
        "environments": {
            format!("{name}-ce"): {"name": format!("{name}-ce"), "connectionSetName": env.gateway.cname, "targetType": "CDS", "environmentDisplayName": format!("{name} Dataverse"), "powerAppsEnvironment": format!("pa-{name}"), "directUrl": linked, "isDevInstance": false},
            format!("{name}-ax"): {"name": format!("{name}-ax"), "connectionSetName": env.gateway.cname, "targetType": "AX", "environmentDisplayName": name, "powerAppsEnvironment": format!("pa-{name}"), "directUrl": format!("{}/fno/{name}", shared.base), "isDevInstance": false},
        },
        "dualWriteDetail": {"legalEntityMappings": {"mappings": [
            {"left": {"name": "usmf", "id": "usmf"}, "right": {"name": "usmf", "id": "usmf"}},
            {"left": {"name": "demf", "id": "demf"}, "right": {"name": "demf", "id": "demf"}},
        ]}},
    }))
    .into_response()
}

async fn reset(
    shared: &std::sync::Arc<Shared>,
    cid: &str,
    target: Option<String>,
    force: Option<String>,
    body: &[u8],
) -> Response {
    let Some(env) = find_by_cid(shared, Some(cid.to_string())) else {
        return error(StatusCode::NOT_FOUND, "NotFound", "no such connection set");
    };
    let payload = serde_json::from_slice::<Value>(body).unwrap_or(Value::Null);
    let well_formed = target.as_deref() == Some("AX")
        && payload["environments"]
            .as_array()
            .is_some_and(|e| e.len() == 2)
        && payload["legalEntities"]
            .as_array()
            .is_some_and(|l| !l.is_empty())
        && payload["powerAppsEnvironmentName"].is_string();
    if !well_formed {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "targetType=AX and a payload with powerAppsEnvironmentName, two environments and the legal entities are required",
        );
    }
    let force = force
        .as_deref()
        .is_some_and(|f| f.eq_ignore_ascii_case("true"));
    let (delay, fails, sync, id) = {
        let mut st = shared.lock();
        st.snapshot.gateway_resets += 1;
        let running = st.fno[&env]
            .gateway
            .maps
            .iter()
            .any(|m| m.state == 4 || m.state == 2);
        if running && !force {
            return error(
                StatusCode::BAD_REQUEST,
                "MapsRunning",
                "Some table maps are still running. Stop them, or reset with force.",
            );
        }
        let id = uuid::Uuid::new_v4().to_string();
        st.gateway_requests.insert(
            id.clone(),
            GatewayRequest {
                env: env.clone(),
                action: "Reset",
                pids: vec![],
                state: 1,
                error: None,
            },
        );
        (
            Duration::from_millis(st.faults.gateway_reset_ms),
            st.faults.gateway_reset_fails,
            st.faults.gateway_reset_sync,
            id,
        )
    };
    let finish = {
        let shared = shared.clone();
        let id = id.clone();
        move || {
            let outcome = if fails {
                Err(
                    "Reset link failed: the Dataverse environment could not be linked (simulated)"
                        .to_string(),
                )
            } else {
                crate::state::reset_link(&shared, &env)
            };
            let mut st = shared.lock();
            if outcome.is_ok()
                && let Some(e) = st.fno.get_mut(&env)
            {
                for m in e.gateway.maps.iter_mut() {
                    m.state = 6;
                    m.pid = None;
                }
            }
            if let Some(r) = st.gateway_requests.get_mut(&id) {
                match outcome {
                    Ok(()) => r.state = 2,
                    Err(e) => {
                        r.state = 3;
                        r.error = Some(e);
                    }
                }
            }
        }
    };
    if sync {
        tokio::time::sleep(delay).await;
        finish();
        let st = shared.lock();
        return match &st.gateway_requests[&id].error {
            None => axum::Json(json!({})).into_response(),
            Some(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "ResetFailed", e),
        };
    }
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        finish();
    });
    (StatusCode::ACCEPTED, axum::Json(json!({"requestId": id}))).into_response()
}
