//! Runs stage events against the progress store: load or create the run, take the environment
//! lock, apply the guards, execute the stage, record the outcome with a conditional write and
//! send the next stage's event. The CLI and the Lambda functions both call [`Engine::handle`].

use std::time::Duration;

use jiff::Timestamp;

use crate::error::{Error, Result};
use crate::event::StageEvent;
use crate::model::{Run, RunStatus, Stage, StageStatus};
use crate::ports::{
    Connector, LeaseOwner, Liveness, ProgressStore, RegistrySource, ResetDriver, StageQueue,
};
use crate::progress::{Progress, ProgressSink};
use crate::registry::EnvConfig;
use crate::stages::{self, StageCtx, StageReport, Then};

/// Everything a stage handler needs, wired by a binary.
pub struct Engine<'a> {
    pub registry: &'a dyn RegistrySource,
    pub store: &'a dyn ProgressStore,
    pub queue: &'a dyn StageQueue,
    pub connector: &'a dyn Connector,
    pub reset: &'a dyn ResetDriver,
    pub sink: &'a dyn ProgressSink,
    /// Tells whether a lease holder is dead (same host) so its lease can be taken over.
    pub liveness: &'a dyn Liveness,
    /// Who is executing (process or Lambda invocation).
    pub owner: LeaseOwner,
    /// How long a stage's hold on the environment lasts without renewal.
    pub lease: Duration,
    /// How long the run keeps its environment between two stages.
    pub handover_grace: Duration,
    /// When the invocation must end (Lambda deadline): leases never outlive it, so a timed-out
    /// attempt can be taken over as soon as it is dead.
    pub deadline: Option<Timestamp>,
    /// The end of the time a long stage may use before it hands over to a new invocation (the
    /// Lambda deadline); `None` lets stages run to the end (embedded mode, a local worker).
    pub stage_deadline: Option<Timestamp>,
}

/// What handling an event did.
#[derive(Debug)]
pub struct Handled {
    /// The run as recorded after the event.
    pub run: Run,
    /// The event sent for the next stage, if any.
    pub next: Option<StageEvent>,
    /// True when the event was a duplicate and nothing ran.
    pub duplicate: bool,
}

/// Time kept for draining and recording before an invocation's deadline.
const DRAIN_MARGIN: Duration = Duration::from_secs(120);

impl Engine<'_> {
    /// Handles one stage event. Permanent failures (guards, bad environment state) are recorded
    /// on the run and returned as `Ok` with the run's terminal status; retryable ones are
    /// recorded as the stage's error and returned as `Err` so the event is delivered again.
    pub async fn handle(&self, event: &StageEvent) -> Result<Handled> {
        event.validate()?;
        // A delivery with nothing left to do (a duplicate, a run that is over) is answered from
        // the run record alone: no registry read, no secret, no Dynamics call.
        let mut env = None;
        let run = match self.existing_run(event).await? {
            Some(run) => run,
            None => {
                // An unknown environment is refused before a run is created for it.
                env = Some(self.registry.entry(&event.environment_id).await?);
                self.create_run(event).await?
            }
        };
        if let Some(done) = self.already_handled(run.clone(), event).await? {
            return Ok(done);
        }
        let env = &match env {
            Some(env) => env,
            None => self.registry.entry(&event.environment_id).await?,
        };
        let stage = event.stage;
        if let Some(before) = Stage::ALL
            .iter()
            .take_while(|s| **s != stage)
            .find(|s| !run.stage(**s).status.is_done())
        {
            let why = format!(
                "stage {stage} of run {} arrived before {before} finished; it will be retried",
                run.run_id
            );
            self.store
                .note_waiting(
                    &env.id,
                    &run.run_id,
                    &format!("{why} ({})", Timestamp::now()),
                )
                .await
                .ok();
            return Err(Error::Conflict(why));
        }
        if let Err(e) = self.take_lock(env, &run).await {
            if let Error::LockHeld { holder, until, .. } = &e {
                let note = if holder.starts_with(&run.run_id) {
                    // The same run's earlier invocation (dead, or still at work) holds the lease.
                    format!(
                        "{stage} refused a delivery at {}: an earlier attempt of this run ({holder}) holds environment {} until {until}; the queue delivers it again, and it goes on once that lease is renewed no more",
                        Timestamp::now(),
                        env.id
                    )
                } else {
                    format!(
                        "{stage} waits: environment {} is held by run {holder} (lease until {until}); the queue delivers it again",
                        env.id
                    )
                };
                self.store
                    .note_waiting(&env.id, &run.run_id, &note)
                    .await
                    .ok();
            }
            return Err(e);
        }
        // With the lock held, the run read now is authoritative: a concurrent delivery of the
        // same event may have finished the stage meanwhile.
        let run = self
            .store
            .find_run(&run.environment_id, &run.run_id)
            .await?
            .ok_or_else(|| Error::RunNotFound(run.run_id.clone()))?;
        if let Some(done) = self.already_handled(run.clone(), event).await? {
            self.store
                .handover_lock(&env.id, &run.run_id, &self.owner, self.handover_grace)
                .await?;
            return Ok(done);
        }
        let run_id = run.run_id.clone();
        let result = self.run_stage(env, run, stage).await;
        if let Err(e) = &result
            && e.is_retryable()
        {
            // Keep the environment for the retry, but free the worker slot so a redelivery can take it.
            self.store
                .handover_lock(&env.id, &run_id, &self.owner, self.handover_grace)
                .await
                .ok();
        }
        let (run, next) = result?;
        Ok(Handled {
            run,
            next,
            duplicate: false,
        })
    }

    /// `Some` when the event has nothing left to do: the run is over or waits for an operator,
    /// or the stage is done (a redelivery, or a crash after recording but before sending, in
    /// which case the next stage's event is sent again if that stage has not started).
    async fn already_handled(&self, run: Run, event: &StageEvent) -> Result<Option<Handled>> {
        if run.status.is_terminal() || run.status == RunStatus::AwaitingConfirmation {
            return Ok(Some(Handled {
                run,
                next: None,
                duplicate: true,
            }));
        }
        if !run.stage(event.stage).status.is_done() {
            return Ok(None);
        }
        let next = match event.stage.next() {
            Some(n)
                if run.status == RunStatus::Running
                    && run.stage(n).status == StageStatus::Pending =>
            {
                let ev = event.for_stage(&run.run_id, n);
                self.queue.send(&ev).await?;
                Some(ev)
            }
            _ => None,
        };
        Ok(Some(Handled {
            run,
            next,
            duplicate: true,
        }))
    }

    /// The event's run if it exists (checked against the event's environment).
    async fn existing_run(&self, event: &StageEvent) -> Result<Option<Run>> {
        let Some(id) = &event.run_id else {
            return Ok(None);
        };
        match self.store.find_run(&event.environment_id, id).await? {
            Some(run) if run.environment_id != event.environment_id => {
                Err(Error::BadEvent(format!(
                    "field `environment_id` is {} but run {id} belongs to {}",
                    event.environment_id, run.environment_id
                )))
            }
            Some(run) => Ok(Some(run)),
            None if event.stage != Stage::DetectMismatch => Err(Error::RunNotFound(id.clone())),
            None => Ok(None),
        }
    }

    /// Creates the event's run (only a `detect-mismatch` event gets here without a run).
    async fn create_run(&self, event: &StageEvent) -> Result<Run> {
        let run_id = event
            .run_id
            .clone()
            .unwrap_or_else(|| ulid::Ulid::new().to_string());
        let run = Run::new(
            run_id,
            event.environment_id.clone(),
            event.options,
            event.trigger.clone(),
        );
        match self.store.create_run(&run).await {
            Ok(()) => Ok(run),
            // A concurrent delivery created it first: use theirs.
            Err(Error::Conflict(_)) => self
                .store
                .get_run(&run.run_id)
                .await?
                .ok_or(Error::RunNotFound(run.run_id)),
            Err(e) => Err(e),
        }
    }

    /// When a long stage stops sending work: early enough before the invocation's deadline to
    /// drain what is in flight (a `$batch` is sized to take at most 30 s) and record its
    /// progress: two minutes before, or half the time left if that is less than four minutes.
    fn stop_at(&self) -> Option<Timestamp> {
        let deadline = self.stage_deadline?;
        let left = Duration::try_from(deadline - Timestamp::now()).unwrap_or(Duration::ZERO);
        let margin = DRAIN_MARGIN.min(left / 2);
        deadline.checked_sub(margin).ok()
    }

    /// The lease to ask for now: the configured one, cut at the deadline.
    fn lease_now(&self) -> Duration {
        match self.deadline {
            Some(d) => Duration::try_from(d - Timestamp::now())
                .unwrap_or(Duration::ZERO)
                .min(self.lease)
                .max(Duration::from_secs(1)),
            None => self.lease,
        }
    }

    async fn take_lock(&self, env: &EnvConfig, run: &Run) -> Result<()> {
        let mut outcome = self
            .store
            .acquire_lock(&env.id, &run.run_id, &self.owner, self.lease_now())
            .await?;
        if let Err(held) = &outcome
            && held.run_id == run.run_id
            && let Some(dead) = held
                .owner
                .as_ref()
                .filter(|o| self.liveness.is_gone(o) == Some(true))
        {
            // The same run's previous worker died on this host: take over without waiting.
            tracing::warn!(run_id = %run.run_id, dead_owner = %dead.0, "taking over from a dead worker");
            self.store
                .handover_lock(&env.id, &run.run_id, dead, Duration::ZERO)
                .await?;
            outcome = self
                .store
                .acquire_lock(&env.id, &run.run_id, &self.owner, self.lease_now())
                .await?;
        }
        match outcome {
            Ok(_) => Ok(()),
            Err(held) => Err(Error::LockHeld {
                environment: env.id.clone(),
                holder: match &held.owner {
                    Some(o) if held.run_id == run.run_id => {
                        format!("{} (worker {})", held.run_id, o.0)
                    }
                    _ => held.run_id.clone(),
                },
                until: held.lease_until.to_string(),
            }),
        }
    }

    /// Renews the lease until `work` ends; fails if another owner took the environment.
    async fn with_lease<T>(
        &self,
        env: &EnvConfig,
        run_id: &str,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let renew = async {
            loop {
                tokio::time::sleep(self.lease / 3).await;
                match self
                    .store
                    .acquire_lock(&env.id, run_id, &self.owner, self.lease_now())
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(held)) => {
                        return Error::LockHeld {
                            environment: env.id.clone(),
                            holder: held.run_id,
                            until: held.lease_until.to_string(),
                        };
                    }
                    Err(e) => tracing::warn!(error = %e, "could not renew the lease; trying again"),
                }
            }
        };
        tokio::select! {
            r = work => r,
            e = renew => Err(e),
        }
    }

    async fn run_stage(
        &self,
        env: &EnvConfig,
        mut run: Run,
        stage: Stage,
    ) -> Result<(Run, Option<StageEvent>)> {
        if let Err(e) = stages::guard_production(env) {
            return self.fail(run, stage, e).await.map(|r| (r, None));
        }
        run.set_status(RunStatus::Running)?;
        run.set_stage(stage, StageStatus::Running)?;
        let run = self.store.update_run(&run).await?;
        self.sink.emit(Progress::StageStarted { stage });
        tracing::info!(run_id = %run.run_id, environment_id = %env.id, stage = %stage, attempt = run.stage(stage).attempts, "stage started");
        let report = self
            .with_lease(env, &run.run_id, self.execute(env, &run, stage))
            .await;
        match report {
            Ok(report) => self.record(env, run, stage, report).await,
            Err(e) if e.is_retryable() => {
                let mut run = run;
                run.set_stage(stage, StageStatus::Failed)?;
                run.set_error(stage, e.to_string());
                self.store.update_run(&run).await?;
                tracing::warn!(run_id = %run.run_id, stage = %stage, error = %e, "stage failed; it can be retried");
                Err(e)
            }
            Err(e) => self.fail(run, stage, e).await.map(|r| (r, None)),
        }
    }

    async fn execute(&self, env: &EnvConfig, run: &Run, stage: Stage) -> Result<StageReport> {
        let dataverse = self.connector.dataverse(env)?;
        let fno = self.connector.fno(env)?;
        let ctx = StageCtx {
            env,
            run,
            store: self.store,
            dataverse: dataverse.as_ref(),
            fno: fno.as_ref(),
            reset: self.reset,
            sink: self.sink,
            stop_at: self.stop_at(),
        };
        match stage {
            Stage::DetectMismatch => stages::detect(&ctx).await,
            Stage::PurgeKeys => stages::purge_keys(&ctx).await,
            Stage::ClearDataverseConfigs => stages::clear_configs(&ctx).await,
            Stage::ResetLink => stages::reset_link(&ctx).await,
        }
    }

    /// Records a stage's report and moves the run on.
    async fn record(
        &self,
        env: &EnvConfig,
        mut run: Run,
        stage: Stage,
        report: StageReport,
    ) -> Result<(Run, Option<StageEvent>)> {
        if report.status != StageStatus::Running {
            run.set_stage(stage, report.status)?;
        }
        run.set_outcome(stage, report.outcome);
        if let Some(e) = &report.error {
            run.set_error(stage, e.clone());
        }
        let mut next = None;
        match &report.then {
            Then::Continue => match stage.next() {
                Some(n) => next = Some(n),
                None => run.set_status(RunStatus::Succeeded)?,
            },
            Then::Finish(status) => {
                let pending: Vec<Stage> = Stage::ALL
                    .into_iter()
                    .filter(|s| run.stage(*s).status == StageStatus::Pending)
                    .collect();
                for s in pending {
                    run.set_stage(s, StageStatus::Skipped)?;
                }
                run.set_status(*status)?;
            }
            Then::Await(instructions) => {
                run.instructions = Some(instructions.clone());
                run.set_status(RunStatus::AwaitingConfirmation)?;
            }
            // The stage stays running; its own event continues it in a new invocation.
            Then::Again => next = Some(stage),
        }
        if run.status == RunStatus::Succeeded {
            run.instructions = None;
        }
        let run = self.store.update_run(&run).await?;
        crate::failpoint::point("stage-recorded", stage);
        self.sink.emit(Progress::StageFinished {
            stage,
            status: report.status.as_str().into(),
            summary: report.summary.clone(),
        });
        tracing::info!(run_id = %run.run_id, environment_id = %env.id, stage = %stage, status = run.stage(stage).status.as_str(), run_status = %run.status, summary = %report.summary, "stage finished");
        let next_event = match next {
            Some(n) => {
                self.store
                    .handover_lock(&env.id, &run.run_id, &self.owner, self.handover_grace)
                    .await?;
                let ev = StageEvent {
                    version: crate::event::SCHEMA_VERSION,
                    run_id: Some(run.run_id.clone()),
                    environment_id: run.environment_id.clone(),
                    stage: n,
                    trigger: run.trigger.clone(),
                    options: run.options,
                };
                self.queue.send(&ev).await?;
                crate::failpoint::point("next-sent", stage);
                Some(ev)
            }
            None => {
                self.store.release_lock(&env.id, &run.run_id).await?;
                None
            }
        };
        Ok((run, next_event))
    }

    /// Records a permanent failure: the stage failed, the run is refused or failed.
    async fn fail(&self, mut run: Run, stage: Stage, e: Error) -> Result<Run> {
        let status = if matches!(e, Error::Refused(_)) {
            RunStatus::Refused
        } else {
            RunStatus::Failed
        };
        if run.stage(stage).status == StageStatus::Pending {
            run.set_stage(stage, StageStatus::Running)?;
        }
        run.set_stage(stage, StageStatus::Failed)?;
        run.set_error(stage, e.to_string());
        run.set_status(status)?;
        let run = self.store.update_run(&run).await?;
        self.store
            .release_lock(&run.environment_id, &run.run_id)
            .await?;
        self.sink.emit(Progress::StageFinished {
            stage,
            status: "failed".into(),
            summary: e.to_string(),
        });
        tracing::warn!(run_id = %run.run_id, stage = %stage, status = %run.status, error = %e, "run stopped");
        Ok(run)
    }

    /// Gives up on a run after a retryable error that the caller will not retry (the embedded
    /// runner): the run ends `failed` with the error, and its environment is freed.
    pub async fn abandon(&self, run_id: &str, error: &Error) -> Result<Run> {
        let mut run = self
            .store
            .get_run(run_id)
            .await?
            .ok_or_else(|| Error::RunNotFound(run_id.into()))?;
        if run.status.is_terminal() {
            return Ok(run);
        }
        if let Some(stage) = run.next_stage()
            && run.stage(stage).error.is_none()
        {
            run.set_error(stage, error.to_string());
        }
        run.set_status(RunStatus::Failed)?;
        let run = self.store.update_run(&run).await?;
        self.store
            .release_lock(&run.environment_id, &run.run_id)
            .await?;
        Ok(run)
    }

    /// Operator confirmation of a manual reset: verify, then finish the run.
    pub async fn confirm(&self, run_id: &str) -> Result<Run> {
        let mut run = self
            .store
            .get_run(run_id)
            .await?
            .ok_or_else(|| Error::RunNotFound(run_id.into()))?;
        if run.status != RunStatus::AwaitingConfirmation {
            return Err(Error::InvalidState(format!(
                "run {run_id} is {}, not awaiting-confirmation; nothing to confirm",
                run.status
            )));
        }
        let env = &self.registry.entry(&run.environment_id).await?;
        self.take_lock(env, &run).await?;
        let stage = Stage::ResetLink;
        run.set_status(RunStatus::Running)?;
        let run = self.store.update_run(&run).await?;
        self.sink.emit(Progress::StageStarted { stage });
        let dataverse = self.connector.dataverse(env)?;
        let fno = self.connector.fno(env)?;
        let ctx = StageCtx {
            env,
            run: &run,
            store: self.store,
            dataverse: dataverse.as_ref(),
            fno: fno.as_ref(),
            reset: self.reset,
            sink: self.sink,
            stop_at: None,
        };
        match self
            .with_lease(env, &run.run_id, stages::verify(&ctx))
            .await
        {
            Ok(report) => Ok(self.record(env, run, stage, report).await?.0),
            Err(e) if e.is_retryable() => {
                // Put the run back where the operator left it.
                let mut back = run;
                back.set_error(stage, e.to_string());
                back.set_status(RunStatus::AwaitingConfirmation)?;
                self.store.update_run(&back).await?;
                self.store.release_lock(&env.id, &back.run_id).await?;
                Err(e)
            }
            Err(e) => self.fail(run, stage, e).await,
        }
    }
}
