//! The embedded default: the whole pipeline in this process, with the SQLite store and an
//! in-process queue, resuming the environment's unfinished run when there is one.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use relink_core::event::StageEvent;
use relink_core::model::{Run, RunOptions, RunStatus, Stage, StageStatus, Trigger};
use relink_core::pipeline::Engine;
use relink_core::ports::{ProgressStore, StageQueue};
use relink_core::progress::ProgressSink;
use relink_core::registry::Registry;
use relink_core::stages::ManualReset;
use relink_core::{Error, Result};
use relink_dynamics::{Http, HttpConnector, RetryPolicy};
use relink_embedded::EnvSecrets;
use relink_embedded::MemQueue;
use relink_embedded::SqliteStore;
use relink_embedded::liveness::{ProcessLiveness, local_owner, owner_is_gone};

use crate::display::{self, Display};

/// A stage's hold on its environment, renewed every third of it while the stage runs.
const LEASE: Duration = Duration::from_secs(30);

/// What `relink run` was asked to do.
pub struct RunRequest {
    pub env: Option<String>,
    pub event: Option<PathBuf>,
    pub dry_run: bool,
    pub force: bool,
    pub from_stage: Option<String>,
    /// `--wait`: at the gate, keep checking the link until the run ends.
    pub wait: bool,
}

/// The adapters of one embedded invocation.
pub struct Embedded {
    pub registry: Registry,
    pub store: SqliteStore,
    pub sink: Arc<dyn ProgressSink>,
    connector: HttpConnector,
}

impl Embedded {
    /// Wires the registry, the store file and the HTTP clients.
    pub fn open(registry: Registry, store: &Path, sink: Arc<dyn ProgressSink>) -> Result<Embedded> {
        let store = SqliteStore::open(store)?;
        let http = Arc::new(Http::new(RetryPolicy::default(), sink.clone())?);
        Ok(Embedded {
            registry,
            store,
            sink,
            connector: HttpConnector::new(http, Arc::new(EnvSecrets)),
        })
    }

    fn engine<'a>(&'a self, queue: &'a MemQueue) -> Engine<'a> {
        Engine {
            registry: &self.registry,
            store: &self.store,
            queue,
            connector: &self.connector,
            reset: &ManualReset,
            sink: self.sink.as_ref(),
            liveness: &ProcessLiveness,
            owner: local_owner(),
            lease: LEASE,
            handover_grace: LEASE,
            deadline: None,
            stage_deadline: None,
        }
    }

    /// Runs (or resumes) the pipeline for the request and returns the run as recorded.
    pub async fn run(&self, req: RunRequest) -> Result<Run> {
        let event = match &req.event {
            Some(path) => StageEvent::parse(&read_event(path)?)?,
            None => {
                let env = req.env.clone().ok_or_else(|| {
                    Error::Config(
                        "name the environment: relink run ENV (or pass --event FILE)".into(),
                    )
                })?;
                StageEvent::manual(
                    &env,
                    RunOptions {
                        dry_run: req.dry_run,
                        force: req.force,
                    },
                )
            }
        };
        self.registry.get(&event.environment_id)?;
        let queue = MemQueue::default();
        let engine = self.engine(&queue);
        let first = match self.start_event(&event, &req).await? {
            Start::Event(ev) => ev,
            Start::Report(run) => return Ok(run),
        };
        let run_id = first.run_id.clone().expect("start events carry a run id");
        queue.send(&first).await?;
        while let Some(ev) = queue.pop() {
            match engine.handle(&ev).await {
                Ok(_) => {}
                Err(e @ Error::LockHeld { .. }) => return Err(e),
                Err(e) if e.is_retryable() => {
                    eprintln!("error: {}", crate::display::printable(&e.to_string()));
                    return engine.abandon(&run_id, &e).await;
                }
                Err(e) => return Err(e),
            }
        }
        let run = self
            .store
            .get_run(&run_id)
            .await?
            .ok_or(Error::RunNotFound(run_id))?;
        if req.wait {
            return self.wait(run).await;
        }
        Ok(run)
    }

    /// `relink probe`: starts the drift probes that are due (`relink_core::probe`: one per
    /// environment and slot, none while a run is under way, one per Dataverse and 20 per call)
    /// and runs each to its end; the probe runs, in the order they were started. Meant for a
    /// timer (cron, a systemd timer) every few minutes, as the watcher's schedule is in AWS.
    pub async fn probe(&self) -> Result<Vec<Run>> {
        let now = jiff::Timestamp::now();
        let mut due = Vec::new();
        for env in self.registry.iter() {
            let latest = self.store.latest_run(&env.id).await?;
            if let Some(slot) = relink_core::probe::due(env, latest.as_ref(), now) {
                due.push((env, slot));
            }
        }
        let queue = MemQueue::default();
        let mut ids = Vec::new();
        for (env, started) in relink_core::probe::start_due(&self.store, &queue, due, now).await {
            match started {
                Ok(run_id) => ids.push(run_id),
                Err(e) => eprintln!(
                    "error: probe of {env}: {}",
                    crate::display::printable(&e.to_string())
                ),
            }
        }
        let engine = self.engine(&queue);
        while let Some(ev) = queue.pop() {
            if let Err(e) = engine.handle(&ev).await {
                eprintln!("error: {}", crate::display::printable(&e.to_string()));
                if let Some(run_id) = &ev.run_id
                    && e.is_retryable()
                {
                    engine.abandon(run_id, &e).await?;
                }
            }
        }
        let mut runs = Vec::new();
        for id in ids {
            if let Some(run) = self.store.get_run(&id).await? {
                runs.push(run);
            }
        }
        Ok(runs)
    }

    /// `--wait`: while the run awaits the Reset, checks the link every `verify.every_seconds`
    /// (read-only) until it is rebuilt (the run succeeds) or the give-up time ends the run;
    /// Ctrl-C stops waiting and leaves the run awaiting.
    pub async fn wait(&self, mut run: Run) -> Result<Run> {
        let env = self.registry.get(&run.environment_id)?.clone();
        let queue = MemQueue::default();
        let engine = self.engine(&queue);
        let mut check = StageEvent::manual(&run.environment_id, run.options);
        check.run_id = Some(run.run_id.clone());
        check.stage = Stage::ResetLink;
        while run.status == RunStatus::AwaitingConfirmation {
            eprintln!(
                "waiting for the Reset of {}: relink checks the link again in {} s (Ctrl-C stops waiting; the run stays awaiting)",
                env.id, env.verify.every_seconds
            );
            tokio::select! {
                _ = tokio::time::sleep(env.verify.every()) => {}
                _ = tokio::signal::ctrl_c() => {
                    eprintln!(
                        "stopped waiting: run {} still awaits the Reset; relink confirm {} --wait goes on",
                        run.run_id, run.run_id
                    );
                    return Ok(run);
                }
            }
            match engine.handle(&check).await {
                Ok(h) => run = h.run,
                Err(e) if e.is_retryable() => {
                    eprintln!(
                        "the check failed ({}); trying again",
                        crate::display::printable(&e.to_string())
                    );
                    run = self
                        .store
                        .get_run(&run.run_id)
                        .await?
                        .ok_or_else(|| Error::RunNotFound(run.run_id.clone()))?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(run)
    }

    /// Decides where to start: the unfinished run of the environment, or a new run.
    async fn start_event(&self, event: &StageEvent, req: &RunRequest) -> Result<Start> {
        if event.run_id.is_some() {
            return Ok(Start::Event(event.clone()));
        }
        let env = &event.environment_id;
        if let Some(latest) = self.store.latest_run(env).await? {
            match latest.status {
                RunStatus::AwaitingConfirmation => return Ok(Start::Report(latest)),
                RunStatus::Pending | RunStatus::Running => {
                    if req.from_stage.is_some() {
                        return Err(Error::Config(format!(
                            "environment `{env}` has an unfinished run {}; run `relink run {env}` to resume it before starting another with --from-stage",
                            latest.run_id
                        )));
                    }
                    if latest.options != event.options {
                        return Err(Error::Config(format!(
                            "environment `{env}` has an unfinished run {} started with dry_run = {}, force = {}; run relink again with the same flags to resume it",
                            latest.run_id, latest.options.dry_run, latest.options.force
                        )));
                    }
                    self.wait_for_dead_holder(env, &latest).await?;
                    eprintln!("resuming unfinished run {} of {env}", latest.run_id);
                    let stage = latest.next_stage().unwrap_or(Stage::ResetLink);
                    return Ok(Start::Event(event.for_stage(&latest.run_id, stage)));
                }
                _ => {}
            }
        }
        let run_id = ulid::Ulid::new().to_string();
        let Some(from) = &req.from_stage else {
            return Ok(Start::Event(
                event.for_stage(&run_id, Stage::DetectMismatch),
            ));
        };
        let from = Stage::parse(from)?;
        let mut run = Run::new(
            run_id.clone(),
            env.clone(),
            event.options,
            Trigger {
                source: "manual".into(),
                ..event.trigger.clone()
            },
        );
        for s in Stage::ALL.into_iter().take_while(|s| *s != from) {
            run.set_stage(s, StageStatus::Skipped)?;
            run.set_outcome(
                s,
                serde_json::json!({"skipped_by": format!("--from-stage {from}")}),
            );
        }
        self.store.create_run(&run).await?;
        Ok(Start::Event(event.for_stage(&run_id, from)))
    }

    /// Waits while the run's lock is held by a worker whose liveness cannot be checked (another
    /// host) until its lease lapses; a dead holder on this host is taken over by the engine, a
    /// live one is reported.
    async fn wait_for_dead_holder(&self, env: &str, run: &Run) -> Result<()> {
        let mut told = false;
        loop {
            let Some(lock) = self.store.get_lock(env).await? else {
                return Ok(());
            };
            let Some(owner) = lock
                .owner
                .as_ref()
                .filter(|_| lock.lease_until > jiff::Timestamp::now())
            else {
                return Ok(());
            };
            match owner_is_gone(owner) {
                Some(true) if lock.run_id == run.run_id => return Ok(()),
                Some(false) => {
                    return Err(Error::LockHeld {
                        environment: env.into(),
                        holder: format!(
                            "{} (process {} is still running it)",
                            lock.run_id, owner.0
                        ),
                        until: lock.lease_until.to_string(),
                    });
                }
                _ => {}
            }
            if !told {
                eprintln!(
                    "run {} of {env} is held by {} until {}; waiting for the lease to lapse",
                    lock.run_id, owner.0, lock.lease_until
                );
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Confirms a manual reset: verify and finish.
    pub async fn confirm(&self, run_id: &str, wait: bool) -> Result<Run> {
        let queue = MemQueue::default();
        let run = self.engine(&queue).confirm(run_id).await?;
        if wait {
            return self.wait(run).await;
        }
        Ok(run)
    }
}

enum Start {
    Event(StageEvent),
    Report(Run),
}

fn read_event(path: &Path) -> Result<String> {
    let mut body = String::new();
    let res = if path == Path::new("-") {
        std::io::stdin().read_to_string(&mut body).map(|_| ())
    } else {
        std::fs::read_to_string(path).map(|b| body = b)
    };
    res.map_err(|e| Error::Config(format!("cannot read event {}: {e}", path.display())))?;
    Ok(body)
}

/// `relink run`.
pub async fn run(config: &Path, store: &Path, req: RunRequest) -> Result<Run> {
    let registry = Registry::load(config)?;
    Embedded::open(registry, store, Arc::new(Display::new()))?
        .run(req)
        .await
}

/// `relink probe`.
pub async fn probe(config: &Path, store: &Path) -> Result<Vec<Run>> {
    let registry = Registry::load(config)?;
    Embedded::open(registry, store, Arc::new(Display::new()))?
        .probe()
        .await
}

/// `relink confirm`.
pub async fn confirm(config: &Path, store: &Path, run_id: &str, wait: bool) -> Result<Run> {
    let registry = Registry::load(config)?;
    Embedded::open(registry, store, Arc::new(Display::new()))?
        .confirm(run_id, wait)
        .await
}

/// What `relink status` shows.
pub struct StatusQuery<'a> {
    pub env: Option<&'a str>,
    pub run_id: Option<&'a str>,
    pub json: bool,
    pub limit: usize,
    pub rejected: bool,
    /// `--all`: one line per registered environment (these ids), what needs a person first.
    pub all: Option<Vec<String>>,
}

/// The embedded store for `relink status`, which must not create an empty one.
pub fn open_store_for_status(store: &Path) -> Result<SqliteStore> {
    if !store.exists() {
        return Err(Error::Config(format!(
            "no progress store at {}: nothing has run here yet (or pass --store, or --table for AWS)",
            store.display()
        )));
    }
    SqliteStore::open(store)
}

/// The environment ids of the registry file, for `relink status --all`.
pub fn registry_ids(config: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| Error::Config(format!("cannot read registry {}: {e}", config.display())))?;
    Registry::ids(&text)
}

/// `relink status`: prints runs (or rejected messages) and returns exit code 0.
pub async fn status(store: &dyn ProgressStore, q: StatusQuery<'_>) -> Result<u8> {
    if q.rejected {
        let rejected = store.rejected(q.limit).await?;
        if q.json {
            println!("{}", serde_json::to_string_pretty(&rejected).expect("json"));
        } else {
            for r in &rejected {
                println!(
                    "{}  message {}  {}",
                    r.received_at,
                    crate::display::printable(&r.message_id),
                    crate::display::printable(&r.error)
                );
            }
        }
        return Ok(crate::exit::OK);
    }
    if let Some(envs) = &q.all {
        let now = jiff::Timestamp::now();
        let mut fleet = Vec::with_capacity(envs.len());
        for env in envs {
            fleet.push(display::FleetRow::new(
                env,
                store.latest_run(env).await?,
                now,
            ));
        }
        fleet.sort_by(display::FleetRow::order);
        if q.json {
            let rows: Vec<_> = fleet.iter().map(display::FleetRow::json).collect();
            println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
        } else {
            print!("{}", display::fleet_text(&fleet));
        }
        return Ok(crate::exit::OK);
    }
    let runs: Vec<Run> = match (q.run_id, q.env) {
        (Some(id), _) => vec![
            store
                .get_run(id)
                .await?
                .ok_or_else(|| Error::RunNotFound(id.into()))?,
        ],
        (None, Some(env)) => store.latest_run(env).await?.into_iter().collect(),
        (None, None) => store.recent_runs(q.limit).await?,
    };
    let single = q.run_id.is_some() || q.env.is_some();
    if q.json {
        let value = if single {
            runs.first()
                .map(display::run_json)
                .unwrap_or(serde_json::Value::Null)
        } else {
            serde_json::Value::Array(runs.iter().map(display::run_json).collect())
        };
        println!("{}", serde_json::to_string_pretty(&value).expect("json"));
    } else if runs.is_empty() {
        println!(
            "no runs recorded{}",
            q.env.map(|e| format!(" for {e}")).unwrap_or_default()
        );
    } else if single {
        print!("{}", display::run_text(&runs[0]));
    } else {
        for r in &runs {
            println!(
                "{}  {:<24} {:<22} {}",
                r.run_id,
                r.environment_id,
                r.status.as_str(),
                r.updated_at
            );
        }
    }
    Ok(crate::exit::OK)
}
