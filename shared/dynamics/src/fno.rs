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

/// The entity type behind `DualWriteProjectConfigurations`.
const PROJECT_CONFIG_TYPE: &str = "DualWriteProjectConfiguration";
/// Most of `$metadata` read while looking for the key: F&O's document describes thousands of
/// entities (tens of MB); it is scanned as it streams and never held whole.
const MAX_METADATA: usize = 256 << 20;
/// Most bytes one `EntityType` element may take.
const MAX_ENTITY_TYPE: usize = 1 << 20;

/// F&O OData client for one environment.
pub struct FnoClient {
    http: Arc<Http>,
    tokens: Arc<dyn TokenSource>,
    data: Url,
    scope: String,
    purge_service: Option<Url>,
    /// The key of `DualWriteProjectConfiguration`, read from `$metadata` once.
    key: tokio::sync::OnceCell<Vec<String>>,
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
            key: tokio::sync::OnceCell::new(),
        }
    }

    /// Scans `$metadata` as it streams for `<EntityType Name="DualWriteProjectConfiguration">`
    /// and returns its `<Key>` property names. A 404, or a document without the type, falls
    /// back to `ProjectName` (said in a warning): a per-company row that a delete by name
    /// misses is then still caught, because the purge re-reads and fails with the rows named.
    async fn read_key(&self) -> Result<Vec<String>> {
        let url = self.data.join("$metadata").expect("fixed path");
        let build = |token: Option<&str>| {
            self.http
                .client()
                .get(url.clone())
                .header("Accept", "application/xml")
                .bearer_auth(token.unwrap_or_default())
        };
        let mut resp = self.http.send(FNO, self.auth(), &build).await?;
        let fallback = |why: &str| {
            tracing::warn!(
                reason = why,
                "the key of DualWriteProjectConfigurations is taken to be ProjectName"
            );
            Ok(vec!["ProjectName".to_string()])
        };
        if resp.status().as_u16() == 404 {
            return fallback("$metadata answered 404");
        }
        let open = format!("<EntityType Name=\"{PROJECT_CONFIG_TYPE}\"");
        let mut window = String::new();
        let mut read = 0usize;
        let mut found = false;
        loop {
            let chunk = match resp.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    return Err(Error::Unavailable {
                        service: FNO.name,
                        attempts: 1,
                        detail: format!("$metadata: {}", relink_core::error::chain(&e)),
                        retry_after: None,
                    });
                }
            };
            read += chunk.len();
            if read > MAX_METADATA {
                return Err(Error::Protocol {
                    service: FNO.name,
                    detail: format!(
                        "$metadata goes on past {} MB without describing {PROJECT_CONFIG_TYPE}",
                        MAX_METADATA >> 20
                    ),
                });
            }
            window.push_str(&String::from_utf8_lossy(&chunk));
            if !found {
                match window.find(&open) {
                    Some(at) => {
                        window.drain(..at);
                        found = true;
                    }
                    None => {
                        // Keep just enough to match a tag cut between two chunks.
                        let keep = window.len().saturating_sub(open.len());
                        let cut = (keep..=window.len())
                            .find(|i| window.is_char_boundary(*i))
                            .unwrap_or(window.len());
                        window.drain(..cut);
                        continue;
                    }
                }
            }
            if let Some(end) = window.find("</EntityType>") {
                return match entity_key(&window[..end]) {
                    Some(key) => Ok(key),
                    None => Err(Error::Protocol {
                        service: FNO.name,
                        detail: format!("$metadata declares {PROJECT_CONFIG_TYPE} without a key"),
                    }),
                };
            }
            if window.len() > MAX_ENTITY_TYPE {
                return Err(Error::Protocol {
                    service: FNO.name,
                    detail: format!("$metadata's {PROJECT_CONFIG_TYPE} element never ends"),
                });
            }
        }
        fallback("$metadata does not describe DualWriteProjectConfiguration")
    }

    /// The `$select` of project configurations: the columns relink archives and the key.
    fn select(key: &[String]) -> String {
        let mut cols: Vec<&str> = relink_core::stages::FNO_COLUMNS.to_vec();
        for k in key {
            if !cols.contains(&k.as_str()) {
                cols.push(k);
            }
        }
        cols.join(",")
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

/// The `<PropertyRef Name="..."/>` names inside the `<Key>` of one `EntityType` element.
fn entity_key(element: &str) -> Option<Vec<String>> {
    let start = element.find("<Key>")? + "<Key>".len();
    let end = start + element[start..].find("</Key>")?;
    let names: Vec<String> = element[start..end]
        .split("<PropertyRef")
        .skip(1)
        .filter_map(|part| {
            let at = part.find("Name=\"")? + "Name=\"".len();
            let len = part[at..].find('"')?;
            let name = &part[at..at + len];
            (!name.is_empty()
                && name.len() <= 128
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .then(|| name.to_string())
        })
        .collect();
    (!names.is_empty()).then_some(names)
}

/// Percent-encodes a key predicate (`dataAreaId='usmf',ProjectName='O''Brien'`) for a path.
fn encode_predicate(predicate: &str) -> String {
    url::form_urlencoded::byte_serialize(predicate.as_bytes())
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
                let key = self.project_config_key().await?;
                u.query_pairs_mut()
                    .append_pair("cross-company", "true")
                    .append_pair("$select", &Self::select(&key));
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

    async fn project_config_key(&self) -> Result<Vec<String>> {
        self.key.get_or_try_init(|| self.read_key()).await.cloned()
    }

    async fn delete_project_configs(&self, keys: &[String]) -> Result<BatchOutcome> {
        let paths: Vec<String> = keys
            .iter()
            .map(|k| {
                format!(
                    "{}DualWriteProjectConfigurations({})",
                    self.data.path(),
                    encode_predicate(k)
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
        batch_outcome(FNO.name, resp, keys).await
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
    fn key_predicates_are_encoded_for_a_path() {
        assert_eq!(
            encode_predicate("dataAreaId='usmf',ProjectName='O''Brien/1 V3'"),
            "dataAreaId%3D%27usmf%27%2CProjectName%3D%27O%27%27Brien%2F1%20V3%27"
        );
    }

    #[test]
    fn the_key_is_read_from_the_entity_type() {
        let element = r#"<EntityType Name="DualWriteProjectConfiguration"><Key><PropertyRef Name="dataAreaId" /><PropertyRef Name="ProjectName" /></Key><Property Name="ProjectName" Type="Edm.String" />"#;
        assert_eq!(
            entity_key(element),
            Some(vec!["dataAreaId".to_string(), "ProjectName".to_string()])
        );
        assert_eq!(
            entity_key("<EntityType Name=\"X\"><Property Name=\"A\"/>"),
            None
        );
        assert_eq!(
            entity_key(r#"<Key><PropertyRef Name="a'b" /></Key>"#),
            None,
            "a name that is not an identifier is not a key"
        );
    }
}
