//! The Power Platform API (`{base}/powerplatform/...`): an environment's record and its
//! lifecycle operations, with an app token whose audience is `{base}/powerplatform`.

use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::time::Instant;

use crate::odata::{bearer, query_param};
use crate::state::Shared;

/// Operations per page of `.../operations` (small, so paging is exercised).
const OPERATIONS_PAGE: usize = 2;

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": {"code": "NotFound", "message": "Not found"}})),
    )
        .into_response()
}

/// `GET /environmentmanagement/environments/{id}` and `.../{id}/operations`
/// (`?api-version=2024-10-01`, `continuationToken` to page on).
pub(crate) fn power_platform(
    shared: &Shared,
    method: &Method,
    rest: &str,
    query: &str,
    headers: &HeaderMap,
) -> Response {
    let parts: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    let (env, operations) = match (parts.as_slice(), method == Method::GET) {
        (["environmentmanagement", "environments", env], true) => (*env, false),
        (["environmentmanagement", "environments", env, "operations"], true) => (*env, true),
        _ => return not_found(),
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
    let param = |name: &str| query_param(query, name);
    if param("api-version").as_deref() != Some("2024-10-01") {
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": {"code": "InvalidApiVersion", "message": "api-version 2024-10-01 is required."}}))).into_response();
    }
    if !operations {
        let base = shared.base.clone();
        let Some((name, o)) = st
            .orgs
            .iter()
            .find(|(_, o)| o.environment_id.to_string().eq_ignore_ascii_case(env))
        else {
            return not_found();
        };
        let Some(p) = &o.platform else {
            return not_found();
        };
        let linked = p.linked_fno.as_ref().map(|f| format!("{base}/fno/{f}"));
        let body = if p.admin_shape {
            json!({
                "id": format!("/providers/Microsoft.BusinessAppPlatform/scopes/admin/environments/{env}"),
                "type": "Microsoft.BusinessAppPlatform/scopes/environments",
                "name": env,
                "properties": {
                    "displayName": o.friendly_name, "environmentSku": p.environment_type,
                    "linkedEnvironmentMetadata": {"instanceUrl": format!("{base}/dataverse/{name}/"), "uniqueName": o.unique_name},
                    "linkedAppMetadata": linked.map(|u| json!({"type": "Internal", "url": u})),
                }
            })
        } else {
            json!({
                "id": env, "displayName": o.friendly_name, "type": p.environment_type,
                "dataverseId": o.organization_id, "url": format!("{base}/dataverse/{name}/"),
                "linkedFinOpsMetadata": linked.map(|u| json!({"url": u})),
            })
        };
        return axum::Json(body).into_response();
    }
    let ops = st
        .power_platform
        .get(&env.to_ascii_lowercase())
        .cloned()
        .unwrap_or_default();
    let start: usize = match param("continuationToken") {
        None => 0,
        Some(t) => match t.strip_prefix("page-").and_then(|n| n.parse().ok()) {
            Some(n) if n <= ops.len() => n,
            _ => {
                return (StatusCode::BAD_REQUEST, axum::Json(json!({"error": {"code": "InvalidContinuationToken", "message": "The continuation token is not valid."}}))).into_response();
            }
        },
    };
    let end = (start + OPERATIONS_PAGE).min(ops.len());
    let token = if st.faults.pp_repeat_token {
        Some("page-0".to_string())
    } else {
        (end < ops.len()).then(|| format!("page-{end}"))
    };
    *st.snapshot
        .page_reads
        .entry("power-platform".into())
        .or_default() += 1;
    axum::Json(json!({"collection": ops[start..end], "continuationToken": token})).into_response()
}
