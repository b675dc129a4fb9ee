//! The secrets a registry entry names, read from AWS Secrets Manager when a client needs one,
//! and cached for a few minutes (a rotated secret takes effect within [`SECRET_TTL`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::sdk_error;
use relink_core::error::{Error, Result};
use relink_core::ports::SecretStore;
use relink_core::registry::{Secret, SecretSource};

/// How long a fetched secret is reused before it is read again (rotations take effect).
pub const SECRET_TTL: Duration = Duration::from_secs(300);

/// Resolves `client_secret = { secret_arn = ... }` entries.
pub struct SecretResolver {
    client: aws_sdk_secretsmanager::Client,
    cache: Mutex<HashMap<String, (Secret, Instant)>>,
}

impl SecretResolver {
    /// A resolver over the SDK configuration.
    pub fn new(config: &aws_config::SdkConfig) -> SecretResolver {
        SecretResolver {
            client: aws_sdk_secretsmanager::Client::new(config),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The secret value of an ARN (the whole `SecretString`).
    pub async fn get(&self, arn: &str) -> Result<Secret> {
        let mut cache = self.cache.lock().await;
        if let Some((s, at)) = cache.get(arn)
            && at.elapsed() < SECRET_TTL
        {
            return Ok(s.clone());
        }
        let out = self.client.get_secret_value().secret_id(arn).send().await.map_err(|e| {
            use aws_sdk_secretsmanager::error::ProvideErrorMetadata;
            let text = sdk_error(&e);
            if matches!(
                e.code(),
                Some("ResourceNotFoundException" | "AccessDeniedException" | "DecryptionFailure")
            ) {
                Error::Config(format!("cannot read the client secret {arn}: {text}; check the ARN and the function's secretsmanager:GetSecretValue permission"))
            } else {
                Error::store(format!("Secrets Manager: {text}"))
            }
        })?;
        let value = out
            .secret_string()
            .ok_or_else(|| Error::Config(format!("secret {arn} has no SecretString")))?;
        let secret = Secret::new(value);
        cache.insert(arn.to_string(), (secret.clone(), Instant::now()));
        Ok(secret)
    }
}

#[async_trait::async_trait]
impl SecretStore for SecretResolver {
    /// In AWS every secret comes from Secrets Manager: an entry that names an environment
    /// variable is refused, so a registry item can never make a function send its own process
    /// environment (its role's AWS credentials among it) anywhere.
    async fn secret(&self, source: &SecretSource) -> Result<Secret> {
        match source {
            SecretSource::SecretArn(arn) => self.get(arn).await,
            SecretSource::Env(var) => Err(Error::Config(format!(
                "the entry names the environment variable {var} as a secret source; in AWS relink reads secrets only from Secrets Manager: use {{ secret_arn = \"arn:aws:secretsmanager:...\" }}"
            ))),
            SecretSource::File(path) => Err(Error::Config(format!(
                "the entry names the file {path} as a secret source; in AWS relink reads secrets only from Secrets Manager: use {{ secret_arn = \"arn:aws:secretsmanager:...\" }}"
            ))),
        }
    }

    /// A rotated sign-in (refresh token) goes back into its secret: the functions that redeem
    /// one may `PutSecretValue` on the sign-in secrets only (template.yaml, `SignInSecretArns`).
    async fn put_secret(&self, source: &SecretSource, value: &Secret) -> Result<()> {
        let SecretSource::SecretArn(arn) = source else {
            return self.secret(source).await.map(|_| ());
        };
        self.client
            .put_secret_value()
            .secret_id(arn)
            .secret_string(value.expose())
            .send()
            .await
            .map_err(|e| {
                Error::store(format!(
                    "Secrets Manager PutSecretValue {arn}: {}; the function needs secretsmanager:PutSecretValue on it (SignInSecretArns)",
                    sdk_error(&e)
                ))
            })?;
        self.cache
            .lock()
            .await
            .insert(arn.clone(), (value.clone(), Instant::now()));
        Ok(())
    }
}
