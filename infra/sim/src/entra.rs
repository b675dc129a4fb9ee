//! Microsoft Entra ID: the client-credentials token endpoint (`{tenant}/oauth2/v2.0/token`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::time::{Duration, Instant};

use crate::odata::query_param;
use crate::state::{Shared, Token};

pub(crate) fn token(shared: &Shared, tenant: &str, body: &[u8]) -> Response {
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
            st.snapshot.wrong_secrets += 1;
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
