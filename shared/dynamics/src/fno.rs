//! F&O OData client: `DualWriteProjectConfigurations` (cross-company, paged, `$batch` deletes by
//! `ProjectName`) and the optional customer-deployed purge service for the other key tables.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{Value, json};
use url::Url;

use super::batch::encode_deletes;
use super::dataverse::{batch_outcome, same_origin_link};
use super::{Http, Service, read_json};
use relink_core::error::{Error, Result};
use relink_core::ports::{BatchOutcome, FnoApi, Page, ServiceTable, TokenSource};
use relink_core::registry::{EnvConfig, join};

const FNO: Service = Service {
    name: "F&O",
    auth_hint: "check that the app registration is listed in F&O under System administration > Microsoft Entra applications and that its mapped user is enabled: after a database refresh every user except Admin is disabled; the user needs a role allowed to delete dual-write configurations",
};

/// The columns relink reads: never the connection strings the entity also exposes.
pub const PROJECT_CONFIG_COLUMNS: &str =
    "ProjectName,ExternalEnvironmentUrl,InternalEntityName,ExternalEntityName,Status,IsDelete";

/// F&O OData client for one environment.
pub struct FnoClient {
    http: Arc<Http>,
    tokens: Arc<dyn TokenSource>,
    data: Url,
    scope: String,
    purge_service: Option<Url>,
}

impl FnoClient {
    /// A client for the environment's F&O URL.
    pub fn new(http: Arc<Http>, tokens: Arc<dyn TokenSource>, env: &EnvConfig) -> FnoClient {
        FnoClient {
            http,
            tokens,
            data: env.fno_data(),
            scope: EnvConfig::scope_for(&env.fno_url),
            purge_service: env
                .fno_purge_service
                .as_deref()
                .map(|p| join(&env.fno_url, p.trim_start_matches('/'))),
        }
    }

    fn auth(&self) -> Option<(&dyn TokenSource, &str)> {
        Some((self.tokens.as_ref(), &self.scope))
    }

    async fn json(resp: reqwest::Response, what: &str) -> Result<Value> {
        read_json(FNO, resp, what).await
    }

    async fn call_service(&self, body: Value) -> Result<Value> {
        let url = self
            .purge_service
            .clone()
            .ok_or_else(|| Error::Config("no fno_purge_service configured".into()))?;
        let build = |token: Option<&str>| {
            self.http
                .client()
                .post(url.clone())
                .bearer_auth(token.unwrap_or_default())
                .json(&body)
        };
        let resp = self.http.send(FNO, self.auth(), &build).await?;
        if resp.status().as_u16() == 404 {
            return Err(Error::Config(format!(
                "the purge service {} does not exist (404): deploy it or remove fno_purge_service from the registry",
                url.path()
            )));
        }
        Self::json(resp, "purge service answer").await
    }
}

/// Quotes an OData string key: `'` doubles, then the whole literal is percent-encoded.
fn key_literal(name: &str) -> String {
    let quoted = format!("'{}'", name.replace('\'', "''"));
    url::form_urlencoded::byte_serialize(quoted.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[async_trait]
impl FnoApi for FnoClient {
    async fn project_configs(&self, next_link: Option<&str>, page_size: usize) -> Result<Page> {
        let url = match next_link {
            Some(link) => same_origin_link(&self.data, link)?,
            None => {
                let mut u = self
                    .data
                    .join("DualWriteProjectConfigurations")
                    .expect("fixed path");
                u.query_pairs_mut()
                    .append_pair("cross-company", "true")
                    .append_pair("$select", PROJECT_CONFIG_COLUMNS);
                u
            }
        };
        let build = |token: Option<&str>| {
            self.http
                .client()
                .get(url.clone())
                .header("Accept", "application/json")
                .header("Prefer", format!("odata.maxpagesize={page_size}"))
                .bearer_auth(token.unwrap_or_default())
        };
        let resp = self.http.send(FNO, self.auth(), &build).await?;
        if resp.status().as_u16() == 404 {
            return Err(Error::Protocol {
                service: FNO.name,
                detail: "DualWriteProjectConfigurations is not exposed (404): is fno_url an F&O environment with dual-write?".into(),
            });
        }
        let v = Self::json(resp, "DualWriteProjectConfigurations").await?;
        let rows = v
            .get("value")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| Error::Protocol {
                service: FNO.name,
                detail: "a collection answer without `value`".into(),
            })?;
        Ok(Page {
            rows,
            next_link: v
                .get("@odata.nextLink")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    async fn delete_project_configs(&self, names: &[String]) -> Result<BatchOutcome> {
        let paths: Vec<String> = names
            .iter()
            .map(|n| {
                format!(
                    "{}DualWriteProjectConfigurations(ProjectName={})",
                    self.data.path(),
                    key_literal(n)
                )
            })
            .collect();
        let batch = encode_deletes(&paths);
        let url = self.data.join("$batch").expect("fixed path");
        let build = |token: Option<&str>| {
            self.http
                .client()
                .post(url.clone())
                .header("Content-Type", batch.content_type.as_str())
                .header("Prefer", "odata.continue-on-error")
                .bearer_auth(token.unwrap_or_default())
                .body(batch.body.clone())
        };
        let resp = self.http.send(FNO, self.auth(), &build).await?;
        batch_outcome(FNO.name, resp, names).await
    }

    fn has_purge_service(&self) -> bool {
        self.purge_service.is_some()
    }

    async fn service_rows(&self, table: ServiceTable) -> Result<Vec<Value>> {
        let v = self
            .call_service(json!({"action": "list", "table": table.as_str()}))
            .await?;
        let rows = v
            .get("rows")
            .and_then(Value::as_array)
            .cloned()
            .ok_or_else(|| Error::Protocol {
                service: FNO.name,
                detail: "purge service list answer without `rows`".into(),
            })?;
        if rows
            .iter()
            .any(|r| r.get("key").and_then(Value::as_str).is_none())
        {
            return Err(Error::Protocol {
                service: FNO.name,
                detail: "purge service row without a string `key`".into(),
            });
        }
        Ok(rows)
    }

    async fn service_delete(&self, table: ServiceTable, keys: &[String]) -> Result<BatchOutcome> {
        let v = self
            .call_service(json!({"action": "delete", "table": table.as_str(), "keys": keys}))
            .await?;
        let count = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
        Ok(BatchOutcome {
            deleted: count("deleted"),
            already_gone: count("missing"),
            failed: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_keys_are_quoted_and_encoded() {
        assert_eq!(key_literal("Customers V3"), "%27Customers%20V3%27");
        assert_eq!(key_literal("O'Brien/1"), "%27O%27%27Brien%2F1%27");
    }
}
