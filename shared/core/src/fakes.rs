//! In-memory Dataverse and F&O for unit tests of the stages and the handler: no network.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{Value, json};

use crate::error::Result;
use crate::ports::{
    BatchOutcome, Connector, DataverseApi, EntitySet, FnoApi, FnoIntegration, Organization, Page,
    PlatformEnvironment, ServiceTable,
};
use crate::registry::{EnvConfig, Registry};

/// The registered Dataverse URL of [`env`].
pub const DV: &str = "https://uat.crm.dynamics.com";

pub struct FakeDataverse {
    pub unique_name: &'static str,
    /// What `RetrieveFinanceAndOperationsIntegrationDetails` names (default: the env's F&O).
    pub integrated: Option<&'static str>,
    /// What the Power Platform API says about the hosting environment (default: nothing).
    pub platform: Option<PlatformEnvironment>,
    pub rows: Mutex<BTreeMap<String, Value>>,
    /// Ids whose delete always fails.
    pub stuck: Vec<String>,
    /// Ids whose delete answers "deleted" but whose row stays (a server that lies).
    pub ghosts: Vec<String>,
    /// Every next link points back at the first page (paging that loops).
    pub looping: bool,
}

#[async_trait]
impl DataverseApi for FakeDataverse {
    async fn current_organization(&self) -> Result<Organization> {
        Ok(Organization {
            organization_id: uuid::Uuid::nil().to_string(),
            unique_name: self.unique_name.into(),
            friendly_name: String::new(),
            url_name: String::new(),
            environment_id: "00000000-0000-0000-0000-0000000000e1".into(),
        })
    }
    async fn fno_integration(&self) -> Result<Option<FnoIntegration>> {
        Ok(self.integrated.map(|u| FnoIntegration {
            url: u.into(),
            tenant_id: None,
        }))
    }
    async fn platform_environment(&self, _: &str) -> Result<Option<PlatformEnvironment>> {
        Ok(self.platform.clone())
    }
    async fn runtime_config_set(&self) -> Result<Option<EntitySet>> {
        Ok(Some(EntitySet {
            name: "msdyn_dualwriteruntimeconfigs".into(),
            primary_id: "id".into(),
        }))
    }
    async fn first_page(&self, _: &EntitySet, size: usize) -> Result<Page> {
        let rows: Vec<Value> = self.rows.lock().unwrap().values().cloned().collect();
        let more = rows.len() > size;
        Ok(Page {
            rows: rows.into_iter().take(size).collect(),
            next_link: (more || self.looping).then(|| format!("{size}")),
        })
    }
    async fn next_page(&self, link: &str, size: usize) -> Result<Page> {
        let skip: usize = link.parse().unwrap();
        let rows: Vec<Value> = self
            .rows
            .lock()
            .unwrap()
            .values()
            .skip(skip)
            .cloned()
            .collect();
        let more = rows.len() > size;
        Ok(Page {
            rows: rows.into_iter().take(size).collect(),
            next_link: if self.looping {
                Some(link.to_string())
            } else {
                more.then(|| format!("{}", skip + size))
            },
        })
    }
    async fn delete_batch(&self, _: &EntitySet, ids: &[String]) -> Result<BatchOutcome> {
        let mut out = BatchOutcome::default();
        let mut rows = self.rows.lock().unwrap();
        for id in ids {
            if self.stuck.contains(id) {
                out.failed.push((id.clone(), "HTTP 500: stuck".into()));
            } else if self.ghosts.contains(id) || rows.remove(id).is_some() {
                // A ghost answers "deleted" and stays.
                out.deleted += 1;
            } else {
                out.already_gone += 1;
            }
        }
        Ok(out)
    }
}

pub struct FakeFno {
    pub rows: Mutex<Vec<Value>>,
}

#[async_trait]
impl FnoApi for FakeFno {
    async fn project_configs(&self, _: Option<&str>, _: usize) -> Result<Page> {
        Ok(Page {
            rows: self.rows.lock().unwrap().clone(),
            next_link: None,
        })
    }
    async fn project_config_key(&self) -> Result<Vec<String>> {
        Ok(vec!["ProjectName".into()])
    }
    async fn delete_project_configs(&self, keys: &[String]) -> Result<BatchOutcome> {
        let mut rows = self.rows.lock().unwrap();
        let before = rows.len();
        rows.retain(|r| {
            let key = crate::stages::key_predicate(&["ProjectName".into()], r).unwrap();
            !keys.contains(&key)
        });
        Ok(BatchOutcome {
            deleted: before - rows.len(),
            ..BatchOutcome::default()
        })
    }
    fn has_purge_service(&self) -> bool {
        false
    }
    async fn service_rows(&self, _: ServiceTable) -> Result<Vec<Value>> {
        unreachable!("no purge service configured")
    }
    async fn service_delete(&self, _: ServiceTable, _: &[String]) -> Result<BatchOutcome> {
        unreachable!("no purge service configured")
    }
}

fn env_text() -> String {
    format!(
        "[environments.uat]\nkind = \"uat\"\nfno_url = \"https://uat.operations.dynamics.com\"\ndataverse_url = \"{DV}\"\n\
         dataverse_unique_name = \"orguat\"\ntenant_id = \"t\"\nclient_id = \"c\"\nclient_secret = {{ env = \"S\" }}\n\
         limits = {{ dataverse_page_size = 10, dataverse_batch_size = 3 }}\n"
    )
}

/// The `uat` environment of the fakes.
pub fn env() -> EnvConfig {
    registry().get("uat").unwrap().clone()
}

/// Dataverse holding `rows` runtime configurations, as organisation `orguat`.
pub fn dataverse(rows: usize) -> FakeDataverse {
    let rows = (0..rows)
        .map(|i| {
            (
                format!("{i:04}"),
                json!({"id": format!("{i:04}"), "msdyn_name": i}),
            )
        })
        .collect();
    FakeDataverse {
        unique_name: "orguat",
        integrated: Some("https://uat.operations.dynamics.com"),
        platform: None,
        rows: Mutex::new(rows),
        stuck: vec![],
        ghosts: vec![],
        looping: false,
    }
}

/// F&O with one project configuration per URL.
pub fn fno(urls: &[&str]) -> FakeFno {
    FakeFno {
        rows: Mutex::new(
            urls.iter()
                .enumerate()
                .map(|(i, u)| json!({"ProjectName": format!("p{i}"), "ExternalEnvironmentUrl": u}))
                .collect(),
        ),
    }
}

/// Hands out the same fakes for every environment.
pub struct FakeConnector {
    pub dataverse: Arc<FakeDataverse>,
    pub fno: Arc<FakeFno>,
}

impl Connector for FakeConnector {
    fn dataverse(&self, _: &EnvConfig) -> Result<Arc<dyn DataverseApi>> {
        Ok(self.dataverse.clone())
    }
    fn fno(&self, _: &EnvConfig) -> Result<Arc<dyn FnoApi>> {
        Ok(self.fno.clone())
    }
}

/// A registry holding [`env`] as `uat`.
pub fn registry() -> Registry {
    Registry::parse(&env_text(), |_| Some("x".into())).unwrap()
}
