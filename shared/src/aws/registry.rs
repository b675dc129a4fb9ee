//! The registry as the AWS functions see it: entries stored in the table, secrets resolved from
//! Secrets Manager, cached for a minute so edits (`relink env push`) take effect quickly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::dynamo::DynamoStore;
use super::secrets::SecretResolver;
use crate::error::Result;
use crate::lambda::RegistrySource;
use crate::registry::Registry;

const REFRESH: Duration = Duration::from_secs(60);

/// Registry entries from the table, with ARN secrets resolved.
pub struct TableRegistry {
    store: DynamoStore,
    secrets: SecretResolver,
    cache: Mutex<Option<(Arc<Registry>, Instant)>>,
}

impl TableRegistry {
    /// A registry read from `store`'s table.
    pub fn new(store: DynamoStore, secrets: SecretResolver) -> TableRegistry {
        TableRegistry {
            store,
            secrets,
            cache: Mutex::new(None),
        }
    }
}

#[async_trait]
impl RegistrySource for TableRegistry {
    async fn registry(&self) -> Result<Arc<Registry>> {
        let mut cache = self.cache.lock().await;
        if let Some((r, at)) = cache.as_ref()
            && at.elapsed() < REFRESH
        {
            return Ok(r.clone());
        }
        let entries = self.store.entries().await?;
        let mut registry = Registry::from_entries(&entries, |name| std::env::var(name).ok());
        self.secrets.resolve(&mut registry).await?;
        let registry = Arc::new(registry);
        *cache = Some((registry.clone(), Instant::now()));
        Ok(registry)
    }
}
