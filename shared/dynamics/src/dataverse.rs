//! Dataverse Web API client (OData v4): organisation identity, the runtime-config entity set,
//! paged reads and `$batch` deletes.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use url::Url;

use super::batch::{decode_response, encode_deletes};
use super::{Http, Service, odata_error_message, read_body, read_json};
use relink_core::error::{Error, Result};
use relink_core::pacing::Pacer;
use relink_core::ports::{
    BatchOutcome, DataverseApi, EntitySet, FnoIntegration, Organization, Page, PlatformEnvironment,
    TokenSource,
};
use relink_core::registry::EnvConfig;

const DATAVERSE: Service = Service {
    name: "Dataverse",
    auth_hint: "check that the app registration is an application user in this Dataverse environment with the System Administrator role; after a copy or restore the environment is in administration mode, where only administrators may connect",
};

/// The Power Platform API (environment records and operations).
pub const POWER_PLATFORM: Service = Service {
    name: "Power Platform",
    auth_hint: "check that the app registration is registered as a Power Platform management application (New-PowerAppManagementApp) in this tenant",
};

/// The Power Platform API version relink speaks.
pub const POWER_PLATFORM_API_VERSION: &str = "2024-10-01";

/// Logical name of the table "Dual Write Runtime Configurations".
pub const RUNTIME_CONFIG_TABLE: &str = "msdyn_dualwriteruntimeconfig";

/// Dataverse Web API client for one organisation.
pub struct DataverseClient {
    http: Arc<Http>,
    tokens: Arc<dyn TokenSource>,
    api: Url,
    scope: String,
    pacer: Pacer,
    /// The Power Platform API the guards read the hosting environment from, if configured.
    platform_api: Option<Url>,
}

impl DataverseClient {
    /// A client for the environment's Dataverse URL.
    pub fn new(http: Arc<Http>, tokens: Arc<dyn TokenSource>, env: &EnvConfig) -> DataverseClient {
        DataverseClient {
            http,
            tokens,
            api: env.dataverse_api(),
            scope: EnvConfig::scope_for(&env.dataverse_url),
            pacer: Pacer::default(),
            platform_api: env.power_platform_api.clone(),
        }
    }

    async fn get(&self, url: Url, page_size: Option<usize>) -> Result<Option<Value>> {
        let build = |token: Option<&str>| {
            let mut req = self
                .http
                .client()
                .get(url.clone())
                .header("Accept", "application/json")
                .header("OData-MaxVersion", "4.0")
                .header("OData-Version", "4.0")
                .bearer_auth(token.unwrap_or_default());
            if let Some(n) = page_size {
                req = req.header("Prefer", format!("odata.maxpagesize={n}"));
            }
            req
        };
        let resp = self
            .http
            .send(DATAVERSE, Some((self.tokens.as_ref(), &self.scope)), &build)
            .await?;
        self.pacer.observe(signals(resp.headers()));
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        let v = read_json(DATAVERSE, resp, &format!("GET {}", url.path())).await?;
        Ok(Some(v))
    }

    fn page(&self, v: Value) -> Result<Page> {
        let rows = match v.get("value") {
            Some(Value::Array(rows)) => rows.clone(),
            _ => return Err(protocol("a collection answer without `value`")),
        };
        let next_link = v
            .get("@odata.nextLink")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Page { rows, next_link })
    }
}

/// Reads an environment record in either shape the Power Platform API has used: the
/// `environmentmanagement` one (`type`, `linkedFinOpsMetadata`/`linkedAppMetadata` at the top)
/// or the admin one (`properties.environmentSku`, `properties.linkedAppMetadata`).
fn platform_environment(v: &Value) -> PlatformEnvironment {
    let props = v.get("properties").unwrap_or(&Value::Null);
    let text = |x: Option<&Value>| {
        x.and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(|s| relink_core::redact::printable(&s.chars().take(200).collect::<String>()))
    };
    let environment_type = text(v.get("type"))
        // `type` at the top of the admin shape is the resource type, not the environment's.
        .filter(|t| !t.contains('/'))
        .or_else(|| text(props.get("environmentSku")));
    let linked = ["linkedFinOpsMetadata", "linkedAppMetadata"]
        .iter()
        .find_map(|k| {
            text(v.get(k).and_then(|m| m.get("url")))
                .or_else(|| text(props.get(k).and_then(|m| m.get("url"))))
        });
    PlatformEnvironment {
        environment_type,
        linked_fno_url: linked,
    }
}

fn protocol(detail: &str) -> Error {
    Error::Protocol {
        service: DATAVERSE.name,
        detail: detail.to_string(),
    }
}

/// Accepts a next link only on the same origin and API path: a link elsewhere would carry our token away.
pub(crate) fn same_origin_link(base: &Url, link: &str) -> Result<Url> {
    let url = Url::parse(link)
        .or_else(|_| base.join(link))
        .map_err(|e| Error::Protocol {
            service: "OData",
            detail: format!("unreadable @odata.nextLink: {e}"),
        })?;
    if url.origin() != base.origin() || !url.path().starts_with(base.path()) {
        return Err(Error::Protocol {
            service: "OData",
            detail: format!(
                "@odata.nextLink points outside {} ; refusing to follow it",
                base.as_str()
            ),
        });
    }
    Ok(url)
}

#[async_trait]
impl DataverseApi for DataverseClient {
    async fn current_organization(&self) -> Result<Organization> {
        let url = self.api.join("RetrieveCurrentOrganization(AccessType=Microsoft.Dynamics.CRM.EndpointAccessType'Default')").expect("fixed path");
        let v = self.get(url, None).await?.ok_or_else(|| protocol("RetrieveCurrentOrganization is not available (404): is dataverse_url a Dataverse environment?"))?;
        let d = v
            .get("Detail")
            .ok_or_else(|| protocol("RetrieveCurrentOrganization answer without Detail"))?;
        // Server text: escaped once here, so no message or log line can carry its controls.
        let field = |k: &str| {
            relink_core::redact::printable(d.get(k).and_then(Value::as_str).unwrap_or_default())
        };
        let org = Organization {
            organization_id: field("OrganizationId"),
            unique_name: field("UniqueName"),
            friendly_name: field("FriendlyName"),
            url_name: field("UrlName"),
            environment_id: field("EnvironmentId"),
        };
        if org.unique_name.is_empty() {
            return Err(protocol(
                "RetrieveCurrentOrganization answer without Detail.UniqueName",
            ));
        }
        Ok(org)
    }

    async fn fno_integration(&self) -> Result<Option<FnoIntegration>> {
        let url = self
            .api
            .join("RetrieveFinanceAndOperationsIntegrationDetails")
            .expect("fixed path");
        match self.get(url, None).await {
            Ok(Some(v)) => Ok(v
                .get("Url")
                .and_then(Value::as_str)
                .filter(|u| !u.is_empty())
                .map(|u| FnoIntegration {
                    url: relink_core::redact::printable(u),
                    tenant_id: v
                        .get("TenantId")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                })),
            // Not every organisation exposes the function, and one without a link answers an
            // error: the guard then looks for other evidence (or refuses).
            Ok(None) | Err(Error::Http { status: 400, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn platform_environment(
        &self,
        environment_id: &str,
    ) -> Result<Option<PlatformEnvironment>> {
        let Some(api) = &self.platform_api else {
            return Ok(None);
        };
        if environment_id.is_empty()
            || !environment_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(protocol(
                "RetrieveCurrentOrganization named an EnvironmentId that is not an id",
            ));
        }
        let mut url = relink_core::registry::join(
            api,
            &format!("environmentmanagement/environments/{environment_id}"),
        );
        url.query_pairs_mut()
            .append_pair("api-version", POWER_PLATFORM_API_VERSION);
        let scope = EnvConfig::scope_for(api);
        let build = |token: Option<&str>| {
            self.http
                .client()
                .get(url.clone())
                .header("Accept", "application/json")
                .bearer_auth(token.unwrap_or_default())
        };
        let resp = match self
            .http
            .send(POWER_PLATFORM, Some((self.tokens.as_ref(), &scope)), &build)
            .await
        {
            Ok(r) => r,
            // The app may not be a Power Platform management app: the guard says it had no
            // platform evidence and falls back on the registry (and refuses an unknown pairing).
            Err(Error::Auth { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        if resp.status().as_u16() == 404 {
            return Ok(None);
        }
        let v = read_json(POWER_PLATFORM, resp, "Power Platform environment").await?;
        Ok(Some(platform_environment(&v)))
    }

    async fn runtime_config_set(&self) -> Result<Option<EntitySet>> {
        let url = self
            .api
            .join(&format!("EntityDefinitions(LogicalName='{RUNTIME_CONFIG_TABLE}')?$select=EntitySetName,PrimaryIdAttribute"))
            .expect("fixed path");
        let Some(v) = self.get(url, None).await? else {
            return Ok(None);
        };
        let name = v
            .get("EntitySetName")
            .and_then(Value::as_str)
            .ok_or_else(|| protocol("EntityDefinitions answer without EntitySetName"))?;
        let key = v
            .get("PrimaryIdAttribute")
            .and_then(Value::as_str)
            .ok_or_else(|| protocol("EntityDefinitions answer without PrimaryIdAttribute"))?;
        let ok =
            |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok(name) || !ok(key) {
            return Err(protocol(
                "EntityDefinitions answer with an invalid entity set or key name",
            ));
        }
        Ok(Some(EntitySet {
            name: name.to_string(),
            primary_id: key.to_string(),
        }))
    }

    async fn first_page(&self, set: &EntitySet, page_size: usize) -> Result<Page> {
        let mut url = self.api.join(&set.name).expect("validated name");
        url.query_pairs_mut().append_pair(
            "$select",
            &format!(
                "{},{}",
                set.primary_id,
                relink_core::stages::DATAVERSE_COLUMNS.join(",")
            ),
        );
        let v = self
            .get(url, Some(page_size))
            .await?
            .ok_or_else(|| protocol("the runtime-config entity set answered 404"))?;
        self.page(v)
    }

    async fn count_rows(&self, set: &EntitySet) -> Result<(usize, bool)> {
        let mut url = self.api.join(&set.name).expect("validated name");
        url.query_pairs_mut()
            .append_pair("$select", &set.primary_id)
            .append_pair("$count", "true");
        let v = self
            .get(url, Some(1))
            .await?
            .ok_or_else(|| protocol("the runtime-config entity set answered 404"))?;
        let capped = v
            .get("@Microsoft.Dynamics.CRM.totalrecordcountlimitexceeded")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        match v.get("@odata.count").and_then(Value::as_u64) {
            Some(n) => Ok((usize::try_from(n).unwrap_or(usize::MAX), capped)),
            // No count in the answer: say what the one-row page shows.
            None => Ok((
                v.get("value").and_then(Value::as_array).map_or(0, Vec::len),
                v.get("@odata.nextLink").is_some(),
            )),
        }
    }

    async fn next_page(&self, next_link: &str, page_size: usize) -> Result<Page> {
        let url = same_origin_link(&self.api, next_link)?;
        let v = self
            .get(url, Some(page_size))
            .await?
            .ok_or_else(|| protocol("@odata.nextLink answered 404"))?;
        self.page(v)
    }

    async fn delete_batch(&self, set: &EntitySet, ids: &[String]) -> Result<BatchOutcome> {
        let paths: Vec<String> = ids
            .iter()
            .map(|id| {
                let id = uuid::Uuid::parse_str(id)
                    .map_err(|_| protocol(&format!("row id {id:?} is not a GUID")))?;
                Ok(format!("{}{}({id})", self.api.path(), set.name))
            })
            .collect::<Result<_>>()?;
        let batch = encode_deletes(&paths);
        let url = self.api.join("$batch").expect("fixed path");
        let build = |token: Option<&str>| {
            self.http
                .client()
                .post(url.clone())
                .header("Content-Type", batch.content_type.as_str())
                .header("Accept", "application/json")
                .header("OData-MaxVersion", "4.0")
                .header("OData-Version", "4.0")
                .header("Prefer", "odata.continue-on-error")
                .bearer_auth(token.unwrap_or_default())
                .body(batch.body.clone())
        };
        let admitted = self.pacer.admit(ids.len()).await;
        let resp = match self
            .http
            .send(DATAVERSE, Some((self.tokens.as_ref(), &self.scope)), &build)
            .await
        {
            Ok(resp) => resp,
            Err(e) => {
                self.pacer.finish(admitted, None);
                return Err(e);
            }
        };
        self.pacer.finish(admitted, Some(signals(resp.headers())));
        batch_outcome(DATAVERSE.name, resp, ids).await
    }

    fn pacer(&self) -> Option<&Pacer> {
        Some(&self.pacer)
    }
}

/// Reads a `$batch` answer into per-key outcomes (parts come back in request order).
pub(crate) async fn batch_outcome(
    service: &'static str,
    resp: reqwest::Response,
    keys: &[String],
) -> Result<BatchOutcome> {
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = String::from_utf8_lossy(
        &read_body(
            Service {
                name: service,
                auth_hint: "",
            },
            resp,
            "$batch answer",
        )
        .await?,
    )
    .into_owned();
    if status == 404 {
        return Err(Error::Protocol {
            service,
            detail: "$batch endpoint answered 404".into(),
        });
    }
    let parts = decode_response(&ctype, &body)?;
    if parts.len() != keys.len() {
        return Err(Error::Protocol {
            service,
            detail: format!(
                "$batch answered {} parts for {} operations",
                parts.len(),
                keys.len()
            ),
        });
    }
    let mut out = BatchOutcome::default();
    for (key, part) in keys.iter().zip(parts) {
        match part.status {
            200 | 204 => out.deleted += 1,
            404 => out.already_gone += 1,
            s => out.failed.push((
                key.clone(),
                format!("HTTP {s}: {}", odata_error_message(&part.body)),
            )),
        }
    }
    Ok(out)
}

/// The pacing signals of a response's headers.
fn signals(headers: &reqwest::header::HeaderMap) -> relink_core::pacing::Signals {
    relink_core::pacing::Signals::read(|name| headers.get(name).and_then(|v| v.to_str().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_links_must_stay_on_the_api() {
        let base = Url::parse("https://org.crm.dynamics.com/api/data/v9.2/").unwrap();
        assert!(
            same_origin_link(
                &base,
                "https://org.crm.dynamics.com/api/data/v9.2/x?$skiptoken=1"
            )
            .is_ok()
        );
        assert!(same_origin_link(&base, "https://evil.example/api/data/v9.2/x").is_err());
        assert!(same_origin_link(&base, "https://org.crm.dynamics.com/other").is_err());
    }
}
