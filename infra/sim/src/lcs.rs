//! LCS environment history (`/lcs/environmentinfo/v1/history/...`), with LCS's paging and its
//! limit of 6 calls per environment per 30 s.

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

use crate::odata::{bearer, query_param};
use crate::state::Shared;

pub(crate) const LCS_PAGE: usize = 5;
pub(crate) const LCS_CALLS_PER_WINDOW: usize = 6;
pub(crate) const LCS_WINDOW: Duration = Duration::from_secs(30);

/// LCS environment history: `GET /environmentinfo/v1/history/project/{p}/environment/{e}/?page=N`,
/// 6 calls per environment per 30 s, then 429 with `Retry-After`; answers always carry `IsSuccess`.
pub(crate) fn lcs(
    shared: &Shared,
    method: &Method,
    rest: &str,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
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
    let token = bearer(headers);
    let signed_in = st.tokens.get(&token).is_some_and(|t| {
        t.audience == "https://lcsapi.lcs.dynamics.com" && t.expires > Instant::now()
    });
    if !st.lcs_tokens.contains(&token) && !signed_in {
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
