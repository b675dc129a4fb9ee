//! Power Platform API operations of an environment (`/powerplatform/environmentmanagement/...`).

use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::time::Instant;

use crate::odata::bearer;
use crate::state::Shared;

/// Power Platform: `GET /environmentmanagement/environments/{id}/operations` with an app token
/// whose audience is `{base}/powerplatform`.
pub(crate) fn power_platform(
    shared: &Shared,
    method: &Method,
    rest: &str,
    headers: &HeaderMap,
) -> Response {
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
