//! Secrets in embedded mode: the process environment variable an entry names. The registry
//! file's entries are resolved when it is read; this serves whatever a client asks for later.

use async_trait::async_trait;
use relink_core::error::{Error, Result};
use relink_core::ports::SecretStore;
use relink_core::registry::{Secret, SecretSource};

/// [`SecretStore`] over this process's environment.
pub struct EnvSecrets;

#[async_trait]
impl SecretStore for EnvSecrets {
    async fn secret(&self, source: &SecretSource) -> Result<Secret> {
        match source {
            SecretSource::Env(var) => std::env::var(var).map(Secret::new).map_err(|_| {
                Error::Config(format!(
                    "the environment variable {var} named as a secret in relink.toml is not set"
                ))
            }),
            SecretSource::SecretArn(arn) => Err(Error::Config(format!(
                "{arn}: relink run reads secrets from environment variables ({{ env = \"VARIABLE\" }}); secret_arn is read only in AWS mode"
            ))),
        }
    }
}
