//! Client secrets named by ARN in the registry, read from AWS Secrets Manager and cached.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::sdk_error;
use crate::error::{Error, Result};
use crate::registry::{Registry, Secret, SecretSource};

/// How long a fetched secret is reused before it is read again (rotations take effect).
const SECRET_TTL: Duration = Duration::from_secs(300);

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
            let text = sdk_error(&e);
            if text.contains("ResourceNotFound") || text.contains("AccessDenied") {
                Error::Config(format!("cannot read the client secret {arn}: {text}; check the ARN and the function's secretsmanager:GetSecretValue permission"))
            } else {
                Error::Store(format!("Secrets Manager: {text}"))
            }
        })?;
        let value = out
            .secret_string()
            .ok_or_else(|| Error::Config(format!("secret {arn} has no SecretString")))?;
        let secret = Secret::new(value);
        cache.insert(arn.to_string(), (secret.clone(), Instant::now()));
        Ok(secret)
    }

    /// Fills every ARN-sourced secret of a registry.
    pub async fn resolve(&self, registry: &mut Registry) -> Result<()> {
        let wanted: Vec<(String, String)> = registry
            .iter()
            .filter_map(|e| match (&e.secret_source, &e.client_secret) {
                (SecretSource::SecretArn(arn), None) => Some((e.id.clone(), arn.clone())),
                _ => None,
            })
            .collect();
        // One unreadable secret must not stop every other environment: the environment whose
        // secret is missing fails on its own, with this error in the log.
        for (id, arn) in wanted {
            match self.get(&arn).await {
                Ok(secret) => registry.set_secret(&id, secret),
                Err(e) => {
                    tracing::error!(environment_id = %id, error = %e, "client secret not readable")
                }
            }
        }
        let lcs: Vec<(String, String)> = registry
            .iter()
            .filter_map(|e| match e.watch.as_ref()?.lcs.as_ref()? {
                crate::registry::LcsWatch {
                    token_source: SecretSource::SecretArn(arn),
                    token: None,
                    ..
                } => Some((e.id.clone(), arn.clone())),
                _ => None,
            })
            .collect();
        for (id, arn) in lcs {
            match self.get(&arn).await {
                Ok(token) => registry.set_lcs_token(&id, token),
                Err(e) => {
                    tracing::error!(environment_id = %id, error = %e, "LCS token not readable")
                }
            }
        }
        Ok(())
    }
}
