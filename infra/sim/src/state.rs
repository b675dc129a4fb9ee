//! The simulators' shared state behind one lock, seeding, the snapshot, and the Reset link that
//! an operator would press in F&O.

use rand::Rng;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use crate::dataverse::RUNTIME_KEY;
use crate::odata::is_segment;
use crate::seed::{Faults, LogEntry, Seed, Snapshot};

pub(crate) struct Org {
    pub(crate) unique_name: String,
    pub(crate) organization_id: uuid::Uuid,
    pub(crate) friendly_name: String,
    pub(crate) integrated_fno: Option<String>,
    pub(crate) rows: BTreeMap<uuid::Uuid, Value>,
    pub(crate) environment_id: uuid::Uuid,
    pub(crate) platform: Option<crate::seed::PlatformSeed>,
}

pub(crate) struct FnoEnv {
    pub(crate) linked_organization: String,
    pub(crate) project_configs: BTreeMap<String, Value>,
    pub(crate) field_configs: BTreeMap<String, Value>,
    pub(crate) business_events: BTreeMap<String, Value>,
    pub(crate) purge_service_path: Option<String>,
    pub(crate) reset_project_configs: usize,
    pub(crate) per_company_key: bool,
    pub(crate) skip_paging: bool,
    pub(crate) empty_pages: bool,
    /// The dual-write gateway's view of this environment.
    pub(crate) gateway: crate::gateway::GatewayEnv,
}

pub(crate) struct Token {
    pub(crate) audience: String,
    pub(crate) expires: Instant,
    pub(crate) client_id: String,
}

#[derive(Default)]
pub(crate) struct Window {
    pub(crate) done: VecDeque<(Instant, u64)>,
    pub(crate) in_flight: usize,
}

#[derive(Default)]
pub(crate) struct SimState {
    pub(crate) apps: HashMap<String, String>,
    pub(crate) tokens: HashMap<String, Token>,
    pub(crate) orgs: BTreeMap<String, Org>,
    pub(crate) fno: BTreeMap<String, FnoEnv>,
    pub(crate) faults: Faults,
    pub(crate) log: Vec<LogEntry>,
    pub(crate) delete_ops: HashMap<String, u32>,
    pub(crate) windows: HashMap<String, Window>,
    pub(crate) snapshot: Snapshot,
    pub(crate) in_flight: usize,
    pub(crate) rng: Option<rand::rngs::StdRng>,
    pub(crate) lcs_tokens: std::collections::HashSet<String>,
    pub(crate) lcs_history: HashMap<(String, String), Vec<Value>>,
    pub(crate) lcs_calls: HashMap<String, VecDeque<Instant>>,
    pub(crate) power_platform: HashMap<String, Vec<Value>>,
    pub(crate) faults_set_at: Option<Instant>,
    /// Rows chosen as ghosts by `ghost_rows`.
    pub(crate) ghosted: std::collections::HashSet<uuid::Uuid>,
    /// Dataverse / F&O requests that reached the burst decision since the faults were set.
    pub(crate) burst_position: u64,
    /// Public clients allowed to use the device-code flow.
    pub(crate) public_clients: std::collections::HashSet<String>,
    /// Device codes handed out: code -> (client id, scope, polls so far).
    pub(crate) device_codes: HashMap<String, (String, String, u32)>,
    /// Refresh tokens that can be redeemed: token -> client id.
    pub(crate) refresh_tokens: HashMap<String, String>,
    /// Gateway requests (stop, Reset) by id.
    pub(crate) gateway_requests: HashMap<String, crate::gateway::GatewayRequest>,
}

impl SimState {
    pub(crate) fn set_faults(&mut self, faults: Faults) {
        self.rng = faults.rng_seed.map(rand::SeedableRng::seed_from_u64);
        self.faults = faults;
        self.faults_set_at = Some(Instant::now());
        self.burst_position = 0;
    }

    /// Whether the next Dataverse / F&O request falls in an injected burst of 5xx.
    pub(crate) fn in_burst(&mut self) -> bool {
        let (every, len) = (
            self.faults.burst_5xx_every as u64,
            self.faults.burst_5xx_len as u64,
        );
        if every == 0 || len == 0 {
            return false;
        }
        let pos = self.burst_position;
        self.burst_position += 1;
        pos % (every + len) >= every
    }

    /// A die roll in [0, 1).
    pub(crate) fn roll(&mut self) -> f64 {
        match &mut self.rng {
            Some(r) => r.random(),
            None => rand::rng().random(),
        }
    }
}

pub(crate) struct Shared {
    pub(crate) base: String,
    pub(crate) started: Instant,
    pub(crate) state: Mutex<SimState>,
}

impl Shared {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) fn snapshot(shared: &Shared) -> Snapshot {
    let st = shared.lock();
    let mut s = st.snapshot.clone();
    for (name, o) in &st.orgs {
        s.runtime_configs.insert(name.clone(), o.rows.len());
    }
    for (name, f) in &st.fno {
        s.project_configs
            .insert(name.clone(), f.project_configs.len());
        s.field_configs.insert(name.clone(), f.field_configs.len());
        s.business_events
            .insert(name.clone(), f.business_events.len());
    }
    s.deleted_twice = st
        .delete_ops
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k.clone())
        .collect();
    s.deleted_twice.sort();
    s
}

pub(crate) fn apply_seed(shared: &Shared, seed: &Seed) -> Result<(), String> {
    let base = shared.base.clone();
    let mut st = shared.lock();
    for a in &seed.apps {
        st.apps.insert(a.client_id.clone(), a.client_secret.clone());
    }
    st.lcs_tokens.extend(seed.lcs_tokens.iter().cloned());
    st.public_clients
        .extend(seed.public_clients.iter().cloned());
    for h in &seed.lcs_history {
        st.lcs_history.insert(
            (h.project_id.clone(), h.environment_id.to_ascii_lowercase()),
            h.entries.clone(),
        );
    }
    for p in &seed.power_platform {
        st.power_platform
            .insert(p.environment_id.to_ascii_lowercase(), p.operations.clone());
    }
    for o in &seed.organizations {
        if !is_segment(&o.name) {
            return Err(format!(
                "organisation name {:?} must be a simple path segment",
                o.name
            ));
        }
        let mut rows = BTreeMap::new();
        for i in 0..o.runtime_configs {
            let id = uuid::Uuid::new_v4();
            rows.insert(id, runtime_row(id, i));
        }
        st.orgs.insert(
            o.name.clone(),
            Org {
                unique_name: o.unique_name.clone(),
                organization_id: o.organization_id.unwrap_or_else(uuid::Uuid::new_v4),
                friendly_name: o
                    .friendly_name
                    .clone()
                    .unwrap_or_else(|| o.unique_name.clone()),
                integrated_fno: o.integrated_fno.clone(),
                rows,
                environment_id: uuid::Uuid::new_v4(),
                platform: o.platform.clone(),
            },
        );
    }
    for f in &seed.fno_environments {
        if !is_segment(&f.name) {
            return Err(format!(
                "F&O environment name {:?} must be a simple path segment",
                f.name
            ));
        }
        let target = f
            .points_at
            .clone()
            .unwrap_or_else(|| f.linked_organization.clone());
        let url = format!("{base}/dataverse/{target}");
        let mut env = FnoEnv {
            linked_organization: f.linked_organization.clone(),
            project_configs: BTreeMap::new(),
            field_configs: BTreeMap::new(),
            business_events: BTreeMap::new(),
            purge_service_path: f.purge_service_path.clone(),
            reset_project_configs: f.reset_project_configs.unwrap_or(3),
            per_company_key: f.per_company_key,
            skip_paging: f.skip_paging,
            empty_pages: f.empty_pages,
            gateway: crate::gateway::GatewayEnv::new(&f.name),
        };
        fill_project_configs(&mut env, f.project_configs, &url);
        for i in 0..f.field_configs {
            let key = format!("field-{i:05}");
            env.field_configs.insert(key.clone(), json!({"key": key, "ProjectName": format!("Project {:05}", i % 7), "FieldName": format!("Field{i}")}));
        }
        for i in 0..f.business_events {
            let key = format!("be-{i:05}");
            env.business_events.insert(key.clone(), json!({"key": key, "BusinessEventId": format!("DualWriteEvent{i}"), "Channel": "DualWrite"}));
        }
        st.fno.insert(f.name.clone(), env);
    }
    Ok(())
}

/// The map key of a project configuration: `ProjectName`, or company and name when the entity
/// is per company.
pub(crate) fn config_key(env: &FnoEnv, company: &str, name: &str) -> String {
    if env.per_company_key {
        format!("{}\u{1f}{name}", company.to_ascii_lowercase())
    } else {
        name.to_string()
    }
}

pub(crate) fn fill_project_configs(env: &mut FnoEnv, n: usize, url: &str) {
    for i in 0..n {
        // Per company, each project is configured in two companies under one name.
        let name = if env.per_company_key {
            format!("Project {:05} Customers V3 O'Brien", i / 2)
        } else {
            format!("Project {i:05} Customers V3 O'Brien")
        };
        let company = if i % 2 == 0 { "usmf" } else { "demf" };
        env.project_configs.insert(
            config_key(env, company, &name),
            json!({
                "@odata.etag": format!("W/\"JzEsNTYzNzE0NDU3Njsw{i}Jw==\""),
                "dataAreaId": company,
                "ProjectName": name,
                "ExternalEnvironmentUrl": url,
                "InternalEntityName": "CustCustomerV3Entity",
                "ExternalEntityName": "accounts",
                "Status": "Running",
                "IsDelete": "No",
                "ServiceBusConnectionString": format!("Endpoint=sb://dw-{i}.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey=SIMSECRET-sb-{i}"),
                "StorageAccountSASConnectionString": format!("BlobEndpoint=https://dw.blob.core.windows.net/;SharedAccessSignature=sv=2022&sig=SIMSECRET-sas-{i}"),
            }),
        );
    }
}

pub(crate) fn runtime_row(id: uuid::Uuid, i: usize) -> Value {
    json!({
        "@odata.etag": format!("W/\"{}\"", 1000 + i),
        RUNTIME_KEY: id.to_string(),
        "msdyn_name": format!("dualwrite-runtime-{i:06}"),
        "msdyn_status": 1,
        "msdyn_configuration": format!("{{\"secureConfigOrganization\":\"stale-{i}\",\"sharedAccessKey\":\"SIMSECRET-rt-{i}\"}}"),
        "createdon": "2026-01-01T00:00:00Z",
        "modifiedon": "2026-01-02T00:00:00Z",
    })
}

/// What an operator's Reset link does in F&O: clears the three key tables, rebuilds the
/// project configurations towards the linked organisation, and recreates that organisation's
/// runtime configuration.
pub(crate) fn reset_link(shared: &Shared, fno_env: &str) -> Result<(), String> {
    let base = shared.base.clone();
    let mut st = shared.lock();
    let env = st
        .fno
        .get_mut(fno_env)
        .ok_or_else(|| format!("no F&O environment {fno_env:?}"))?;
    let linked = env.linked_organization.clone();
    let n = env.reset_project_configs;
    env.project_configs.clear();
    env.field_configs.clear();
    env.business_events.clear();
    fill_project_configs(env, n, &format!("{base}/dataverse/{linked}"));
    let org = st
        .orgs
        .get_mut(&linked)
        .ok_or_else(|| format!("no organisation {linked:?}"))?;
    org.rows.clear();
    for i in 0..n {
        let id = uuid::Uuid::new_v4();
        org.rows.insert(id, runtime_row(id, i));
    }
    Ok(())
}
