//! Microsoft Entra ID client-credentials tokens, cached per scope until shortly before expiry.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use super::{Http, Service, read_json};
use relink_core::error::{Error, Result};
use relink_core::ports::{SecretStore, TokenSource};
use relink_core::registry::{Secret, SecretSource, join};

const ENTRA: Service = Service {
    name: "Entra ID",
    auth_hint: "check tenant_id, client_id and the client secret of the app registration (secrets expire; the secret is read from the variable named in relink.toml)",
};

/// Tokens are refreshed this long before they expire.
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

/// Longest token lifetime relink believes (Entra's are about an hour; a server that says more,
/// up to 2^64-1 seconds, is not trusted with the arithmetic).
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Where the client secret comes from: known already, or read when a token is needed.
pub enum ClientSecret {
    /// Resolved when the registry was read (embedded mode: the environment variable).
    Known(Secret),
    /// Read from the secret store at each token request (it caches, and honours rotation).
    Stored(Arc<dyn SecretStore>, SecretSource),
}

/// Client-credentials token source for one app registration in one tenant.
pub struct EntraTokens {
    http: Arc<Http>,
    endpoint: Url,
    client_id: String,
    secret: ClientSecret,
    cache: Mutex<HashMap<String, (String, Instant)>>,
}

impl EntraTokens {
    /// Tokens from `{authority}/{tenant}/oauth2/v2.0/token`.
    pub fn new(
        http: Arc<Http>,
        authority: &Url,
        tenant: &str,
        client_id: &str,
        secret: ClientSecret,
    ) -> EntraTokens {
        EntraTokens {
            http,
            endpoint: join(authority, &format!("{tenant}/oauth2/v2.0/token")),
            client_id: client_id.to_string(),
            secret,
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn secret(&self) -> Result<Secret> {
        match &self.secret {
            ClientSecret::Known(s) => Ok(s.clone()),
            ClientSecret::Stored(store, source) => store.secret(source).await,
        }
    }
}

#[async_trait]
impl TokenSource for EntraTokens {
    async fn token(&self, scope: &str) -> Result<String> {
        // Holding the lock across the fetch makes concurrent callers share one token request.
        let mut cache = self.cache.lock().await;
        if let Some((token, refresh_at)) = cache.get(scope)
            && Instant::now() < *refresh_at
        {
            return Ok(token.clone());
        }
        let secret = self.secret().await?;
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", secret.expose()),
            ("scope", scope),
        ];
        let build = |_: Option<&str>| self.http.client().post(self.endpoint.clone()).form(&form);
        let resp = self
            .http
            .send(ENTRA, None, &build)
            .await
            .map_err(|e| match e {
                // Entra answers a wrong secret or client with 400/401 `invalid_client`.
                Error::Http {
                    status: 400,
                    detail,
                    ..
                } => Error::Auth {
                    service: ENTRA.name,
                    status: 400,
                    detail: format!(": {detail}"),
                    hint: ENTRA.auth_hint,
                },
                other => other,
            })?;
        if resp.status().as_u16() == 404 {
            return Err(Error::Config(format!(
                "the token endpoint {} does not exist (404): check `authority` and `tenant_id`",
                self.endpoint
            )));
        }
        let body: TokenResponse = read_json(ENTRA, resp, "token response").await?;
        let lifetime = Duration::from_secs(body.expires_in).min(MAX_LIFETIME);
        // Short-lived tokens (tests) refresh at half their life instead of five minutes early.
        let margin = REFRESH_MARGIN.min(lifetime / 2);
        let refresh_at = Instant::now() + lifetime - margin;
        cache.insert(scope.to_string(), (body.access_token.clone(), refresh_at));
        Ok(body.access_token)
    }

    async fn invalidate(&self, scope: &str) {
        self.cache.lock().await.remove(scope);
    }
}
