//! Microsoft Entra ID: the token endpoint (`{tenant}/oauth2/v2.0/token`) for client credentials
//! (apps), device codes and refresh tokens (a signed-in user, public clients), and the
//! device-code endpoint (`{tenant}/oauth2/v2.0/devicecode`), as RFC 8628 and Microsoft's
//! identity platform document them: `authorization_pending`, `slow_down`, `expired_token`,
//! refresh tokens rotated at each redemption, `invalid_grant` for a revoked one.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::time::{Duration, Instant};

use crate::odata::query_param;
use crate::state::{Shared, SimState, Token};

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
    match get("grant_type").as_deref() {
        Some("urn:ietf:params:oauth:grant-type:device_code") => {
            return device_grant(&mut st, get("client_id"), get("device_code"));
        }
        Some("refresh_token") => {
            return refresh_grant(
                &mut st,
                get("client_id"),
                get("refresh_token"),
                get("scope"),
            );
        }
        _ => {}
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
    let (access, lifetime) = mint(&mut st, "simtok", audience, &client_id);
    axum::Json(json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": access})).into_response()
}

/// A new access token for `audience` (lifetime and early revocation from the faults): the token
/// and the lifetime it is announced with.
fn mint(st: &mut SimState, prefix: &str, audience: &str, client_id: &str) -> (String, u64) {
    let lifetime = st.faults.token_lifetime_secs;
    let accepted_for = st
        .faults
        .tokens_revoked_after_secs
        .map_or(lifetime, |r| r.min(lifetime));
    let access = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    st.tokens.insert(
        access.clone(),
        Token {
            audience: audience.to_ascii_lowercase(),
            expires: Instant::now() + Duration::from_secs(accepted_for),
            client_id: client_id.to_string(),
        },
    );
    (access, lifetime)
}

fn oauth_error(status: StatusCode, error: &str, desc: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": error, "error_description": desc, "error_codes": [], "timestamp": jiff::Timestamp::now().to_string(), "trace_id": uuid::Uuid::new_v4(), "correlation_id": uuid::Uuid::new_v4()})),
    )
        .into_response()
}

/// The audience of a delegated scope list: its first resource scope without `/.default` or
/// `/user_impersonation` (`offline_access`, `openid` and `profile` are not resources).
fn audience_of(scope: &str) -> Option<String> {
    let first = scope
        .split_whitespace()
        .find(|s| !matches!(*s, "offline_access" | "openid" | "profile"))?;
    let aud = first
        .strip_suffix("/.default")
        .or_else(|| first.strip_suffix("/user_impersonation"))?;
    Some(aud.to_ascii_lowercase())
}

/// Issues a user's access token for `scope` and a new refresh token.
fn user_tokens(st: &mut SimState, client_id: &str, scope: &str) -> Response {
    let Some(audience) = audience_of(scope) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "AADSTS70011: The provided value for the input parameter 'scope' is not valid.",
        );
    };
    let (access, lifetime) = mint(st, "simusr", &audience, client_id);
    let mut body = json!({"token_type": "Bearer", "scope": scope, "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": access});
    if scope.split_whitespace().any(|s| s == "offline_access") {
        let refresh = format!("simrt-{}", uuid::Uuid::new_v4().simple());
        st.refresh_tokens
            .insert(refresh.clone(), client_id.to_string());
        body["refresh_token"] = refresh.into();
    }
    axum::Json(body).into_response()
}

/// `POST {tenant}/oauth2/v2.0/devicecode`: a device code for a public client.
pub(crate) fn device_code(shared: &Shared, body: &[u8]) -> Response {
    let form = String::from_utf8_lossy(body).into_owned();
    let get = |k: &str| query_param(&form, k);
    let mut st = shared.lock();
    let (Some(client_id), Some(scope)) = (get("client_id"), get("scope")) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "AADSTS900144: The request body must contain the following parameter: 'client_id'.",
        );
    };
    if !st.public_clients.contains(&client_id) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            &format!(
                "AADSTS7000218: The application '{client_id}' is not a public client (allowPublicClient) in this directory."
            ),
        );
    }
    let code = format!("simdc-{}", uuid::Uuid::new_v4().simple());
    let user_code: String = uuid::Uuid::new_v4().simple().to_string()[..9].to_ascii_uppercase();
    st.device_codes.insert(code.clone(), (client_id, scope, 0));
    let uri = format!("{}/devicelogin", shared.base);
    axum::Json(json!({
        "device_code": code,
        "user_code": user_code,
        "verification_uri": uri,
        "expires_in": 900,
        "interval": st.faults.device_interval_secs,
        "message": format!("To sign in, use a web browser to open the page {uri} and enter the code {user_code} to authenticate."),
    }))
    .into_response()
}

/// The device-code grant: pending until the simulated user has signed in.
fn device_grant(st: &mut SimState, client_id: Option<String>, code: Option<String>) -> Response {
    st.snapshot.device_polls += 1;
    let faults = st.faults.clone();
    let Some((owner, scope, polls)) = code.as_ref().and_then(|c| st.device_codes.get_mut(c)) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "AADSTS70000: The provided device code is not valid.",
        );
    };
    if client_id.as_deref() != Some(owner.as_str()) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "AADSTS70000: The device code was issued to another client.",
        );
    }
    if faults.device_expired {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "expired_token",
            "AADSTS70020: The provided value for the input parameter 'device_code' is not valid. This device code has expired.",
        );
    }
    *polls += 1;
    let n = *polls;
    if faults.device_slow_down && n == 1 {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "slow_down",
            "AADSTS70016: slow down: polling too fast.",
        );
    }
    let pending = faults.device_pending_polls + u32::from(faults.device_slow_down);
    if n <= pending {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "authorization_pending",
            "AADSTS70016: OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
        );
    }
    let (owner, scope) = (owner.clone(), scope.clone());
    st.device_codes.remove(code.as_deref().unwrap_or_default());
    user_tokens(st, &owner, &scope)
}

/// The refresh-token grant: a new access token and a rotated refresh token.
fn refresh_grant(
    st: &mut SimState,
    client_id: Option<String>,
    token: Option<String>,
    scope: Option<String>,
) -> Response {
    let (Some(client_id), Some(token), Some(scope)) = (client_id, token, scope) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "AADSTS900144: The request body must contain client_id, refresh_token and scope.",
        );
    };
    if st.faults.refresh_revoked {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "AADSTS50173: The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.",
        );
    }
    match st.refresh_tokens.get(&token) {
        Some(owner) if *owner == client_id => {}
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "AADSTS9002313: Invalid request. Request is malformed or invalid: the refresh token is not known.",
            );
        }
    }
    if st.faults.refresh_single_use {
        st.refresh_tokens.remove(&token);
    }
    st.snapshot.refresh_redeemed += 1;
    user_tokens(st, &client_id, &scope)
}
