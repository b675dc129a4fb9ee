//! Test harness: a simulator per test, a registry and store in a directory of its own, and the
//! `relink` binary run as a real process.

#![allow(dead_code)]

pub mod aws;
pub mod scenario;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use relink_core::ports::{ArchivedRow, ProgressStore};
use relink_embedded::SqliteStore;
use relink_sim::{AppSeed, FnoSeed, OrgSeed, Seed, Sim};
use serde_json::Value;

pub const ENV: &str = "contoso-uat";
pub const CLIENT: &str = "22222222-2222-2222-2222-222222222222";
pub const SECRET_VAR: &str = "RELINK_TEST_SECRET";

/// What a test seeds.
pub struct Spec {
    pub uat_rows: usize,
    pub prod_rows: usize,
    pub project_configs: usize,
    pub field_configs: usize,
    pub business_events: usize,
    pub purge_service: bool,
    /// Extra registry lines for the environment (`{sim}` stands for the simulator's base URL).
    pub registry_extra: String,
    /// The organisation `dataverse_url` points at (default: the UAT one, which is right).
    pub dataverse_org: &'static str,
    pub kind: &'static str,
    /// More stale environments besides ENV: `fan-001`..., each with its own Dataverse
    /// organisation of `extra_rows` runtime configurations and `extra_rows / 4` F&O keys.
    pub extra_envs: usize,
    pub extra_rows: usize,
    /// The F&O environment the UAT organisation says it is linked to (default: ENV, right).
    pub uat_paired_with: Option<&'static str>,
    /// What the Power Platform API says about the UAT organisation's environment.
    pub uat_platform: Option<relink_sim::PlatformSeed>,
    /// ENV's F&O shape: per-company key, `$skip` paging, empty pages with next links.
    pub fno_shape: (bool, bool, bool),
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            uat_rows: 300,
            prod_rows: 25,
            project_configs: 40,
            field_configs: 0,
            business_events: 0,
            purge_service: false,
            registry_extra: String::new(),
            dataverse_org: "uat",
            kind: "uat",
            extra_envs: 0,
            extra_rows: 20,
            uat_paired_with: Some(ENV),
            uat_platform: None,
            fno_shape: (false, false, false),
        }
    }
}

pub struct World {
    pub sim: Sim,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub store: PathBuf,
    pub secret: String,
    /// Every environment of the registry: ENV first, then the extra ones.
    pub envs: Vec<String>,
    /// Everything the processes of this world printed, to search for secrets.
    pub captured: std::sync::Mutex<String>,
}

/// The name of the i-th extra environment (also its F&O environment and, without the dash, its
/// Dataverse organisation).
pub fn extra_env(i: usize) -> String {
    format!("fan-{i:03}")
}

/// The public client a simulated user signs in with (device code).
pub const PUBLIC_CLIENT: &str = "relink-public-client";

/// Registry lines resetting through the simulated gateway, the sign-in kept in the world's
/// directory (`extra`: more keys of `reset`, starting with a comma).
pub fn gateway_reset(extra: &str) -> String {
    format!(
        "reset = {{ mode = \"gateway\", gateway = \"{{sim}}/gateway\", token = {{ client_id = \"{PUBLIC_CLIENT}\", file = \"{{dir}}/gateway.token\" }}, poll_seconds = 1, stop_timeout_seconds = 10, reset_timeout_seconds = 20{extra} }}"
    )
}

/// Output of one `relink` invocation.
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub const PURGE_PATH: &str = "/api/services/RelinkServices/RelinkPurgeService/purge";

impl World {
    pub async fn new(spec: Spec) -> World {
        let sim = Sim::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("simulator starts");
        let secret = format!("test-secret-{}", ulid::Ulid::new());
        let extra: Vec<String> = (1..=spec.extra_envs).map(extra_env).collect();
        let mut organizations = vec![
            OrgSeed {
                name: "prod".into(),
                unique_name: "orgcontosoprod".into(),
                organization_id: None,
                friendly_name: None,
                integrated_fno: None,
                runtime_configs: spec.prod_rows,
                platform: None,
            },
            OrgSeed {
                name: "uat".into(),
                unique_name: "orgcontosouat".into(),
                organization_id: None,
                friendly_name: None,
                integrated_fno: spec.uat_paired_with.map(Into::into),
                runtime_configs: spec.uat_rows,
                platform: spec.uat_platform.clone(),
            },
        ];
        let mut fno_environments = vec![FnoSeed {
            name: ENV.into(),
            linked_organization: "uat".into(),
            points_at: Some("prod".into()),
            project_configs: spec.project_configs,
            field_configs: spec.field_configs,
            business_events: spec.business_events,
            purge_service_path: spec.purge_service.then(|| PURGE_PATH.into()),
            reset_project_configs: None,
            per_company_key: spec.fno_shape.0,
            skip_paging: spec.fno_shape.1,
            empty_pages: spec.fno_shape.2,
        }];
        for e in &extra {
            let org = e.replace('-', "");
            organizations.push(OrgSeed {
                name: org.clone(),
                unique_name: format!("org{org}"),
                organization_id: None,
                friendly_name: None,
                integrated_fno: Some(e.clone()),
                runtime_configs: spec.extra_rows,
                platform: None,
            });
            fno_environments.push(FnoSeed {
                name: e.clone(),
                linked_organization: org,
                points_at: Some("prod".into()),
                project_configs: spec.extra_rows / 4,
                field_configs: 0,
                business_events: 0,
                purge_service_path: None,
                reset_project_configs: None,
                per_company_key: false,
                skip_paging: false,
                empty_pages: false,
            });
        }
        sim.seed(&Seed {
            apps: vec![AppSeed {
                client_id: CLIENT.into(),
                client_secret: secret.clone(),
            }],
            organizations,
            fno_environments,
            public_clients: vec![PUBLIC_CLIENT.into()],
            ..Seed::default()
        })
        .expect("seed");
        let dir = std::env::temp_dir().join(format!("relink-test-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = dir.join("relink.toml");
        let store = dir.join("relink.db");
        let purge = if spec.purge_service {
            format!("fno_purge_service = \"{PURGE_PATH}\"\n")
        } else {
            String::new()
        };
        let section = |env: &str, kind: &str, dv: &str, unique: &str, more: &str| {
            format!(
                "[environments.{env}]\nkind = \"{kind}\"\nfno_url = \"{fno}\"\ndataverse_url = \"{dv}\"\ndataverse_unique_name = \"{unique}\"\n\
                 tenant_id = \"contoso.onmicrosoft.com\"\nclient_id = \"{CLIENT}\"\nclient_secret = {{ env = \"{SECRET_VAR}\" }}\n\
                 authority = \"{auth}\"\nallow_insecure_http = true\n{more}\n",
                fno = sim.fno_url(env),
                dv = sim.dataverse_url(dv),
                auth = sim.authority(),
            )
        };
        let mut text = section(
            ENV,
            spec.kind,
            spec.dataverse_org,
            "orgcontosouat",
            &format!(
                "{purge}{}",
                spec.registry_extra
                    .replace("{sim}", sim.base_url())
                    .replace("{dir}", &dir.to_string_lossy())
            ),
        );
        for e in &extra {
            let org = e.replace('-', "");
            text.push_str(&section(e, "uat", &org, &format!("org{org}"), ""));
        }
        std::fs::write(&config, text).expect("registry");
        let mut envs = vec![ENV.to_string()];
        envs.extend(extra);
        World {
            sim,
            dir,
            config,
            store,
            secret,
            envs,
            captured: Default::default(),
        }
    }

    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_relink"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--store")
            .arg(&self.store)
            .args(args);
        cmd.env(SECRET_VAR, &self.secret)
            .env("RELINK_LOG", "debug")
            .env_remove("RELINK_CONFIG")
            .env_remove("RELINK_STORE");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `relink ARGS` to completion.
    pub async fn relink(&self, args: &[&str]) -> Out {
        self.finish(self.command(args).output().await.expect("relink runs"))
    }

    /// A finished process's output, checked for leaked secrets.
    pub fn finish(&self, out: std::process::Output) -> Out {
        let out = Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        };
        {
            let mut all = self.captured.lock().unwrap();
            all.push_str(&out.stdout);
            all.push_str(&out.stderr);
        }
        assert!(
            !out.stdout.contains(&self.secret) && !out.stderr.contains(&self.secret),
            "the client secret leaked:\n{out:?}"
        );
        assert!(
            !out.stdout.contains("SIMSECRET") && !out.stderr.contains("SIMSECRET"),
            "a row secret leaked:\n{out:?}"
        );
        out
    }

    pub async fn status(&self) -> Value {
        let out = self.relink(&["status", ENV, "--json"]).await;
        assert_eq!(out.code, 0, "{out:?}");
        out.json()
    }

    pub async fn archived(&self, run_id: &str) -> Vec<ArchivedRow> {
        SqliteStore::open(&self.store)
            .unwrap()
            .archived(run_id)
            .await
            .unwrap()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// Waits (at most 60 s) until `done` holds; `what` names it in the failure.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 60 s, still not: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits until the simulator has deleted at least `n` rows of an organisation.
pub async fn wait_for_deletes(sim: &Sim, org: &str, n: usize) {
    let key = format!("dataverse/{org}");
    wait_until(&format!("{n} rows of {org} deleted"), || {
        sim.snapshot().deleted.get(&key).copied().unwrap_or(0) >= n
    })
    .await;
}

/// The stage object of a status JSON.
pub fn stage<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {run}"))
}

/// One request a [`Receiver`] got: lower-cased headers and body.
pub type Request = (std::collections::HashMap<String, String>, Vec<u8>);
type Requests = std::sync::Arc<std::sync::Mutex<Vec<Request>>>;

/// A local HTTP endpoint standing in for a Teams Workflows webhook, a Slack incoming webhook or
/// a customer's own: records every request (lower-cased headers and body) and answers `status`.
pub struct Receiver {
    pub url: String,
    got: Requests,
}

impl Receiver {
    /// A receiver that takes each request and never answers, holding the connection open.
    pub async fn silent() -> Receiver {
        Receiver::start(0).await
    }

    /// A receiver answering `status` (0: never answering).
    pub async fn start(status: u16) -> Receiver {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got: Requests = Default::default();
        let seen = got.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 8192];
                    let (head_end, headers) = loop {
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_string();
                            let headers: std::collections::HashMap<String, String> = head
                                .lines()
                                .skip(1)
                                .filter_map(|l| l.split_once(':'))
                                .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
                                .collect();
                            break (i + 4, headers);
                        }
                    };
                    let len: usize = headers
                        .get("content-length")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    seen.lock()
                        .unwrap()
                        .push((headers, buf[head_end..head_end + len].to_vec()));
                    if status == 0 {
                        let _held = socket;
                        return std::future::pending().await;
                    }
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                });
            }
        });
        Receiver { url, got }
    }

    /// Every request so far: headers and body.
    pub fn requests(&self) -> Vec<Request> {
        self.got.lock().unwrap().clone()
    }

    /// Every body so far, as JSON.
    pub fn bodies(&self) -> Vec<Value> {
        self.requests()
            .iter()
            .map(|(_, b)| serde_json::from_slice(b).expect("a JSON body"))
            .collect()
    }
}
