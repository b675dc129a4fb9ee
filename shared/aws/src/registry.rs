//! The registry as the AWS functions see it: entries stored in the table, read when they are
//! needed (a stage handler reads its one environment's entry per event, so an edit with
//! `relink env push` takes effect on the next event). Secrets are not resolved here: the clients
//! read them from Secrets Manager when they need a token (`SecretResolver`). The process
//! environment is never consulted: an entry that names an environment variable as a secret gets
//! no value from it.

use std::sync::Arc;

use async_trait::async_trait;

use super::dynamo::DynamoStore;
use relink_core::error::{Error, Result};
use relink_core::ports::RegistrySource;
use relink_core::registry::{EnvConfig, Registry};

/// Registry entries from the table.
pub struct TableRegistry {
    store: DynamoStore,
}

impl TableRegistry {
    /// A registry read from `store`'s table.
    pub fn new(store: DynamoStore) -> TableRegistry {
        TableRegistry { store }
    }
}

#[async_trait]
impl RegistrySource for TableRegistry {
    async fn registry(&self) -> Result<Arc<Registry>> {
        let entries = self.store.entries().await?;
        Ok(Arc::new(Registry::from_entries(&entries)))
    }

    async fn entry(&self, environment_id: &str) -> Result<EnvConfig> {
        Ok(self.entry_with_text(environment_id).await?.0)
    }

    async fn entry_with_text(&self, environment_id: &str) -> Result<(EnvConfig, Option<String>)> {
        let (entry, text) = self
            .store
            .entry_text(environment_id)
            .await?
            .ok_or_else(|| Error::UnknownEnvironment(environment_id.to_string()))?;
        let env = Registry::from_entries(&[(environment_id.to_string(), entry)])
            .get(environment_id)
            .cloned()?;
        Ok((env, text))
    }
}
