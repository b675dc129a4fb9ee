//! A user's sign-in, headless: the device-code flow once (`relink auth login`), then the refresh
//! token it gave redeemed for access tokens whenever a stage or the watcher needs one, the
//! rotated refresh token stored back where the entry keeps it (Microsoft identity platform:
//! OAuth 2.0 device authorization grant, RFC 8628; refresh tokens rotate at each redemption).
//! No password, no TOTP seed, no browser automation.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use super::{Http, Service, read_body};
use relink_core::error::{Error, Result};
use relink_core::ports::{SecretStore, TokenSource};
use relink_core::registry::{DelegatedToken, Secret, join};

const SIGN_IN: Service = Service {
    name: "Entra ID (user sign-in)",
    auth_hint: "the sign-in expired or was revoked: run relink auth login again",
};

/// Longest a device-code sign-in is waited for, whatever the endpoint says.
const MAX_DEVICE_WAIT: Duration = Duration::from_secs(30 * 60);
/// Tokens are renewed this long before they expire.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);
/// Longest token lifetime believed.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
    #[serde(default)]
    refresh_token: Option<String>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    #[serde(default)]
    error_description: String,
}

/// What the user is asked to do.
#[derive(Clone, Debug, Deserialize)]
pub struct DeviceCode {
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default)]
    pub message: String,
    device_code: String,
    expires_in: u64,
    #[serde(default = "default_interval")]
    interval: u64,
}

fn default_interval() -> u64 {
    5
}

/// A first answer of an OAuth endpoint: the JSON, or the OAuth error code and text.
async fn oauth<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
    what: &str,
) -> Result<std::result::Result<T, (String, String)>> {
    let status = resp.status();
    let body = read_body(SIGN_IN, resp, what).await?;
    if status.is_success() {
        return serde_json::from_slice(&body)
            .map(Ok)
            .map_err(|e| Error::Protocol {
                service: SIGN_IN.name,
                detail: format!("{what}: {e}"),
            });
    }
    match serde_json::from_slice::<OAuthError>(&body) {
        Ok(e) => Ok(Err((
            e.error,
            relink_core::redact::printable(
                &e.error_description.chars().take(300).collect::<String>(),
            ),
        ))),
        Err(_) if status.is_server_error() || status.as_u16() == 429 => Err(Error::Unavailable {
            service: SIGN_IN.name,
            attempts: 1,
            detail: format!("{what}: HTTP {}", status.as_u16()),
            retry_after: None,
        }),
        Err(_) => Err(Error::Protocol {
            service: SIGN_IN.name,
            detail: format!("{what}: HTTP {} without an OAuth error", status.as_u16()),
        }),
    }
}

/// The device-code flow: asks for a code, has `show` tell the user where to enter it, and polls
/// until the user has signed in (honouring `interval` and `slow_down`), the code expired or the
/// user declined. The refresh token of the sign-in.
pub async fn device_login(
    http: &Http,
    authority: &Url,
    tenant: &str,
    client_id: &str,
    scope: &str,
    show: impl Fn(&DeviceCode),
) -> Result<Secret> {
    let endpoint = join(authority, &format!("{tenant}/oauth2/v2.0/devicecode"));
    let resp = http
        .client()
        .post(endpoint)
        .form(&[("client_id", client_id), ("scope", scope)])
        .send()
        .await
        .map_err(|e| Error::Unavailable {
            service: SIGN_IN.name,
            attempts: 1,
            detail: relink_core::error::chain(&e.without_url()),
            retry_after: None,
        })?;
    let code: DeviceCode = oauth(resp, "device code").await?.map_err(|(e, d)| {
        Error::Config(format!(
            "the device-code sign-in was refused ({e}: {d}); client_id must be a public client app registration (Allow public client flows) of tenant {tenant}"
        ))
    })?;
    show(&code);
    let token_endpoint = join(authority, &format!("{tenant}/oauth2/v2.0/token"));
    let deadline = Instant::now() + Duration::from_secs(code.expires_in).min(MAX_DEVICE_WAIT);
    let mut interval = Duration::from_secs(code.interval.clamp(1, 60));
    loop {
        tokio::time::sleep(interval).await;
        if Instant::now() > deadline {
            return Err(Error::Config(
                "the code expired before the sign-in was completed; run relink auth login again"
                    .into(),
            ));
        }
        let resp = http
            .client()
            .post(token_endpoint.clone())
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("client_id", client_id),
                ("device_code", code.device_code.as_str()),
            ])
            .send()
            .await;
        let answer = match resp {
            Ok(r) => oauth::<TokenAnswer>(r, "device-code token").await,
            Err(e) => Err(Error::Unavailable {
                service: SIGN_IN.name,
                attempts: 1,
                detail: relink_core::error::chain(&e.without_url()),
                retry_after: None,
            }),
        };
        match answer {
            Ok(Ok(t)) => {
                return t.refresh_token.map(Secret::new).ok_or_else(|| {
                    Error::Protocol {
                        service: SIGN_IN.name,
                        detail: "the sign-in gave no refresh token (the scope must include offline_access)".into(),
                    }
                });
            }
            Ok(Err((e, _))) if e == "authorization_pending" => {}
            // RFC 8628: slow down by five seconds, for this and every later poll.
            Ok(Err((e, _))) if e == "slow_down" => interval += Duration::from_secs(5),
            Ok(Err((e, d))) if e == "expired_token" => {
                return Err(Error::Config(format!(
                    "the code expired before the sign-in was completed ({d}); run relink auth login again"
                )));
            }
            Ok(Err((e, d))) => {
                return Err(Error::Config(format!("the sign-in failed: {e}: {d}")));
            }
            // A network blip or a 5xx while polling: poll again, within the deadline.
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "device-code poll failed; polling again");
            }
            Err(e) => return Err(e),
        }
    }
}

/// Access tokens from a user's stored refresh token, for one target (the gateway, LCS).
pub struct DelegatedTokens {
    http: Arc<Http>,
    endpoint: Url,
    token: DelegatedToken,
    secrets: Arc<dyn SecretStore>,
    /// What to run when the sign-in is gone: `relink auth login ENV --for TARGET`.
    login: String,
    cache: Mutex<Option<(String, String, Instant)>>,
}

impl DelegatedTokens {
    /// Tokens of `token`'s sign-in at `{authority}/{tenant}`; `environment_id` and `target`
    /// (`gateway`, `lcs`) name the command that signs in again.
    pub fn new(
        http: Arc<Http>,
        authority: &Url,
        tenant: &str,
        token: &DelegatedToken,
        secrets: Arc<dyn SecretStore>,
        environment_id: &str,
        target: &str,
    ) -> DelegatedTokens {
        DelegatedTokens {
            http,
            endpoint: join(authority, &format!("{tenant}/oauth2/v2.0/token")),
            token: token.clone(),
            secrets,
            login: format!("relink auth login {environment_id} --for {target}"),
            cache: Mutex::new(None),
        }
    }

    async fn redeem(&self, scope: &str) -> Result<(String, Duration)> {
        let refresh = self.secrets.secret(&self.token.store).await.map_err(|e| {
            Error::Config(format!(
                "the stored sign-in cannot be read ({e}); run {} again",
                self.login
            ))
        })?;
        let form = [
            ("grant_type", "refresh_token"),
            ("client_id", self.token.client_id.as_str()),
            ("refresh_token", refresh.expose()),
            ("scope", scope),
        ];
        let build = |_: Option<&str>| self.http.client().post(self.endpoint.clone()).form(&form);
        // Retries throttling and 5xx; an OAuth error comes back as HTTP 400/401.
        let resp = match self.http.send(SIGN_IN, None, &build).await {
            Ok(r) => r,
            Err(Error::Http { status, detail, .. }) | Err(Error::Auth { status, detail, .. }) => {
                let invalid = detail.contains("invalid_grant") || detail.contains("AADSTS");
                return Err(Error::Config(format!(
                    "the sign-in kept for relink was refused (HTTP {status}{}): it expired or was revoked; run {} again",
                    if invalid { ", invalid_grant" } else { "" },
                    self.login
                )));
            }
            Err(e) => return Err(e),
        };
        let answer: TokenAnswer = match oauth(resp, "refresh-token redemption").await? {
            Ok(t) => t,
            Err((e, d)) => {
                return Err(Error::Config(format!(
                    "the sign-in kept for relink was refused ({e}: {d}); run {} again",
                    self.login
                )));
            }
        };
        if let Some(rotated) = answer.refresh_token.filter(|r| r != refresh.expose()) {
            let rotated = Secret::new(rotated);
            if let Err(e) = self.secrets.put_secret(&self.token.store, &rotated).await {
                // Entra keeps the previous refresh token valid for a while: say it, go on.
                tracing::warn!(error = %e, "the rotated sign-in could not be stored back; the previous one is used until it expires");
            }
        }
        Ok((
            answer.access_token,
            Duration::from_secs(answer.expires_in).min(MAX_LIFETIME),
        ))
    }
}

#[async_trait]
impl TokenSource for DelegatedTokens {
    async fn token(&self, scope: &str) -> Result<String> {
        let mut cache = self.cache.lock().await;
        if let Some((s, token, renew_at)) = cache.as_ref()
            && s == scope
            && Instant::now() < *renew_at
        {
            return Ok(token.clone());
        }
        let (token, lifetime) = self.redeem(scope).await?;
        let renew_at = Instant::now() + lifetime - REFRESH_MARGIN.min(lifetime / 2);
        *cache = Some((scope.to_string(), token.clone(), renew_at));
        Ok(token)
    }

    async fn invalidate(&self, _scope: &str) {
        *self.cache.lock().await = None;
    }
}
