//! Runs stage events against the progress store: load or create the run, mark the stage running
//! and take the environment's lease (one conditional write), apply the guards, execute the
//! stage, record the outcome and hand the environment over (one conditional write), and send the
//! next stage's event, which carries the run so that the next stage need not read it again.
//! Runs that await the operator's Reset are checked again here, and notices go out from here.
//! The CLI and the Lambda functions both call [`Engine::handle`].

use std::time::Duration;

use jiff::Timestamp;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::event::{Carried, StageEvent, digest};
use crate::model::{Run, RunStatus, Stage, StageStatus};
use crate::notice::{Notice, NoticeKind, NoticeRecord};
use crate::ports::{
    Claimed, Connector, Expect, LeaseOwner, Liveness, Lock, LockAfter, ProgressStore,
    RegistrySource, ResetDriver, StageQueue, Started,
};
use crate::progress::{Progress, ProgressSink};
use crate::registry::{EnvConfig, Registry};
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
        if let Some(carried) = &event.carried
            && self.store.checks_carried()
            && let Some(handled) = self.handle_carried(event, carried).await?
        {
            return Ok(handled);
        }
        let stage = event.stage;
        let mut entry = None;
        for _ in 0..MAX_STALE_STARTS {
            // A delivery with nothing left to do (a duplicate, a run that is over) is answered
            // from the run record alone: no registry read, no secret, no Dynamics call.
            let existing = self.existing_run(event).await?;
            if let Some(run) = &existing
                && stage == Stage::ResetLink
                && run.status == RunStatus::AwaitingConfirmation
            {
                return self.recheck(run.clone()).await;
            }
            if let Some(run) = &existing
                && let Some(done) = self.already_handled(run.clone(), event).await?
            {
                return Ok(done);
            }
            // An unknown environment is refused before a run is created for it.
            if entry.is_none() {
                entry = Some(self.registry.entry_with_text(&event.environment_id).await?);
            }
            let (env, text) = entry.as_ref().expect("read above");
            let (run, expect) = match existing {
                Some(run) => {
                    self.check_order(env, &run, stage).await?;
                    let expect = Expect::Stored {
                        run_digest: None,
                        entry_digest: None,
                    };
                    (run, expect)
                }
                None => (self.new_run(event), Expect::New),
            };
            match self.start(env, run, stage, &expect).await? {
                Start::Running(run) => {
                    return self.run_started(env, text.as_deref(), run, stage).await;
                }
                Start::Ended(run) => {
                    return Ok(Handled {
                        run,
                        next: None,
                        duplicate: false,
                    });
                }
                // Another delivery moved the run since it was read: look again.
                Start::Stale => {}
            }
        }
        Err(Error::Conflict(format!(
            "the run of environment {} kept changing while stage {stage} started; the event will be retried",
            event.environment_id
        )))
    }

    /// Starts the stage from the state the event carries, without reading the store: the write
    /// that starts it holds only if the run and the registry entry are byte for byte what the
    /// store has. `None` when the carried state cannot be used (then the store is read).
    async fn handle_carried(
        &self,
        event: &StageEvent,
        carried: &Carried,
    ) -> Result<Option<Handled>> {
        let stage = event.stage;
        let Ok(run) = serde_json::from_str::<Run>(&carried.run) else {
            return Ok(None);
        };
        let usable = event.run_id.as_deref() == Some(run.run_id.as_str())
            && run.environment_id == event.environment_id
            && run.status == RunStatus::Running
            && !run.stage(stage).status.is_done()
            && Stage::ALL
                .iter()
                .take_while(|s| **s != stage)
                .all(|s| run.stage(*s).status.is_done());
        if !usable {
            return Ok(None);
        }
        let id = &event.environment_id;
        let Ok(env) = serde_json::from_str(&carried.entry)
            .map_err(|e| Error::Config(e.to_string()))
            .and_then(|v| Registry::from_entries(&[(id.clone(), v)]).get(id).cloned())
        else {
            return Ok(None);
        };
        if stages::guard_production(&env).is_err() {
            return Ok(None);
        }
        let expect = Expect::Stored {
            run_digest: Some(digest(&carried.run)),
            entry_digest: Some(digest(&carried.entry)),
        };
        match self.start(&env, run, stage, &expect).await? {
            Start::Running(run) => Ok(Some(
                self.run_started(&env, Some(&carried.entry), run, stage)
                    .await?,
            )),
            Start::Ended(_) | Start::Stale => Ok(None),
        }
    }

    /// `Some` when the event has nothing left to do: the run is over or waits for an operator,
    /// or the stage is done (a redelivery, or a crash after recording but before sending, in
    /// which case the next stage's event is sent again if that stage has not started).
    async fn already_handled(&self, run: Run, event: &StageEvent) -> Result<Option<Handled>> {
        if run.status.is_terminal() || run.status == RunStatus::AwaitingConfirmation {
            let run = self.notice_owed(run).await?;
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

    /// Refuses (for now) a stage whose predecessors have not finished.
    async fn check_order(&self, env: &EnvConfig, run: &Run, stage: Stage) -> Result<()> {
        let Some(before) = Stage::ALL
            .iter()
            .take_while(|s| **s != stage)
            .find(|s| !run.stage(**s).status.is_done())
        else {
            return Ok(());
        };
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
        Err(Error::Conflict(why))
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

    /// The run a `detect-mismatch` event starts (only it gets here without a stored run).
    fn new_run(&self, event: &StageEvent) -> Run {
        let run_id = event
            .run_id
            .clone()
            .unwrap_or_else(|| ulid::Ulid::new().to_string());
        Run::new(
            run_id,
            event.environment_id.clone(),
            event.options,
            event.trigger.clone(),
        )
    }

    /// Marks the stage running and takes the environment's lease, in one write. A registry entry
    /// that marks the environment as production ends the run here, before anything is held.
    async fn start(
        &self,
        env: &EnvConfig,
        run: Run,
        stage: Stage,
        expect: &Expect,
    ) -> Result<Start> {
        let new = *expect == Expect::New;
        if let Err(e) = stages::guard_production(env) {
            return Ok(Start::Ended(self.fail(run, stage, e, new).await?));
        }
        let mut running = run.clone();
        running.set_status(RunStatus::Running)?;
        running.set_stage(stage, StageStatus::Running)?;
        match self.start_write(&running, expect).await? {
            Started::Ok(run) => Ok(Start::Running(run)),
            Started::Stale => Ok(Start::Stale),
            Started::Held(held) => {
                if new {
                    // Recorded as pending, so that status shows the run and why it waits.
                    match self.store.create_run(&run).await {
                        Ok(()) | Err(Error::Conflict(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                let e = lock_held(env, &run.run_id, &held);
                let note = if held.run_id == run.run_id {
                    // The same run's earlier invocation (dead, or still at work) holds the lease.
                    format!(
                        "{stage} refused a delivery at {}: an earlier attempt of this run ({}) holds environment {} until {}; the queue delivers it again, and it goes on once that lease is renewed no more",
                        Timestamp::now(),
                        held_by(&held),
                        env.id,
                        held.lease_until
                    )
                } else {
                    format!(
                        "{stage} waits: environment {} is held by run {} (lease until {}); the queue delivers it again",
                        env.id, held.run_id, held.lease_until
                    )
                };
                self.store
                    .note_waiting(&env.id, &run.run_id, &note)
                    .await
                    .ok();
                Err(e)
            }
        }
    }

    /// [`ProgressStore::start_stage`], taking over at once from the same run's worker when it
    /// is known to be dead (same host).
    async fn start_write(&self, run: &Run, expect: &Expect) -> Result<Started> {
        let out = self
            .store
            .start_stage(run, expect, &self.owner, self.lease_now())
            .await?;
        if let Started::Held(held) = &out
            && held.run_id == run.run_id
            && let Some(dead) = held
                .owner
                .as_ref()
                .filter(|o| self.liveness.is_gone(o) == Some(true))
        {
            tracing::warn!(run_id = %run.run_id, dead_owner = %dead.0, "taking over from a dead worker");
            self.store
                .handover_lock(&run.environment_id, &run.run_id, dead, Duration::ZERO)
                .await?;
            return self
                .store
                .start_stage(run, expect, &self.owner, self.lease_now())
                .await;
        }
        Ok(out)
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

    fn handover(&self) -> LockAfter {
        LockAfter::Handover {
            owner: self.owner.clone(),
            grace: self.handover_grace,
        }
    }

    async fn with_lease<T>(
        &self,
        env: &EnvConfig,
        run_id: &str,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let renew = async {
            loop {
                // A third of the lease this renewal asks for, which shrinks at the deadline.
                tokio::time::sleep(self.lease_now() / 3).await;
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

    /// Runs a started stage and records what it did.
    async fn run_started(
        &self,
        env: &EnvConfig,
        entry_text: Option<&str>,
        run: Run,
        stage: Stage,
    ) -> Result<Handled> {
        self.sink.emit(Progress::StageStarted { stage });
        tracing::info!(run_id = %run.run_id, environment_id = %env.id, stage = %stage, attempt = run.stage(stage).attempts, "stage started");
        let report = self
            .with_lease(env, &run.run_id, self.execute(env, &run, stage))
            .await;
        let run_id = run.run_id.clone();
        let result = match report {
            Ok(report) => self.record(env, entry_text, run, stage, report).await,
            Err(e) if e.is_retryable() => {
                let mut run = run;
                run.set_stage(stage, StageStatus::Failed)?;
                run.set_error(stage, e.to_string());
                // Keeps the environment for the retry, but frees the worker slot so a
                // redelivery can take it.
                self.store.finish_stage(&run, &self.handover()).await?;
                tracing::warn!(run_id = %run.run_id, stage = %stage, error = %e, "stage failed; it can be retried");
                Err(e)
            }
            Err(e) => self.fail(run, stage, e, false).await.map(|r| (r, None)),
        };
        if let Err(e) = &result
            && e.is_retryable()
        {
            // Whatever failed after the stage ran, a redelivery must not wait for this lease.
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

    async fn execute(&self, env: &EnvConfig, run: &Run, stage: Stage) -> Result<StageReport> {
        let dataverse = self.connector.dataverse(env)?;
        let fno = self.connector.fno(env)?;
        let gateway = match (&env.reset, stage) {
            (crate::registry::ResetMode::Gateway(_), Stage::ResetLink) if !run.options.dry_run => {
                Some(self.connector.gateway(env)?)
            }
            _ => None,
        };
        let ctx = StageCtx {
            env,
            run,
            store: self.store,
            dataverse: dataverse.as_ref(),
            fno: fno.as_ref(),
            gateway: gateway.as_deref(),
            reset: self.reset,
            sink: self.sink,
            stop_at: self.stop_at(),
        };
        let work = async {
            match stage {
                Stage::DetectMismatch => stages::detect(&ctx).await,
                Stage::PurgeKeys => stages::purge_keys(&ctx).await,
                Stage::ClearDataverseConfigs => stages::clear_configs(&ctx).await,
                Stage::ResetLink => stages::reset_link(&ctx).await,
            }
        };
        let (mut report, (count, waited_ms)) = crate::progress::tally(work).await;
        if let Ok(StageReport {
            outcome: Value::Object(o),
            ..
        }) = &mut report
        {
            // The throttling met, added to what earlier invocations of the stage met.
            let before = |k: &str| {
                run.stage(stage)
                    .outcome
                    .as_ref()
                    .and_then(|o| o.get("throttled")?.get(k)?.as_u64())
                    .unwrap_or(0)
            };
            let (count, waited_ms) = (before("count") + count, before("waited_ms") + waited_ms);
            if count > 0 {
                o.insert(
                    "throttled".into(),
                    serde_json::json!({"count": count, "waited_ms": waited_ms}),
                );
            }
        }
        report
    }

    /// Records a stage's report and moves the run on: one write records it and hands the
    /// environment over (or frees it), then the next stage's event is sent, carrying the run as
    /// recorded and the registry entry when the store checks them.
    async fn record(
        &self,
        env: &EnvConfig,
        entry_text: Option<&str>,
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
        run.notifies = !env.notify.is_empty();
        let lock = match next {
            Some(_) => self.handover(),
            None => LockAfter::Release,
        };
        let run = self.store.finish_stage(&run, &lock).await?;
        self.sink.emit(Progress::StageFinished {
            stage,
            status: report.status.as_str().into(),
            summary: report.summary.clone(),
        });
        tracing::info!(run_id = %run.run_id, environment_id = %env.id, stage = %stage, status = run.stage(stage).status.as_str(), run_status = %run.status, summary = %report.summary, "stage finished");
        crate::failpoint::point("stage-recorded", stage);
        let next_event = match next {
            Some(n) => {
                let ev = StageEvent {
                    version: crate::event::SCHEMA_VERSION,
                    run_id: Some(run.run_id.clone()),
                    environment_id: run.environment_id.clone(),
                    stage: n,
                    trigger: run.trigger.clone(),
                    options: run.options,
                    carried: entry_text
                        .filter(|_| self.store.checks_carried())
                        .and_then(|text| Carried::new(&run, text)),
                };
                self.queue.send(&ev).await?;
                crate::failpoint::point("next-sent", stage);
                Some(ev)
            }
            None => None,
        };
        let run = match NoticeKind::for_run(&run) {
            Some(kind) if next_event.is_none() => self.announce(env, run, kind, 0).await,
            _ => run,
        };
        Ok((run, next_event))
    }

    /// Sends the notice of the run's status if the run's entry has channels and it is not
    /// recorded: a crash may have come between recording the run and telling its channels.
    async fn notice_owed(&self, run: Run) -> Result<Run> {
        match NoticeKind::for_run(&run) {
            Some(kind) if run.notifies && !run.notices.iter().any(|n| n.key == kind.as_str()) => {
                let env = self.registry.entry(&run.environment_id).await?;
                Ok(self.announce(&env, run, kind, 0).await)
            }
            _ => Ok(run),
        }
    }

    /// Tells the environment's channels about the run's `kind` event (`reminder`: which one),
    /// once: a claim in the store lets one delivery send it, a claim left unsent by a crash is
    /// sent by the next, and the run records what each channel answered. A channel that fails
    /// never fails, holds up or changes the run.
    async fn announce(&self, env: &EnvConfig, run: Run, kind: NoticeKind, reminder: u64) -> Run {
        if env.notify.is_empty() {
            return run;
        }
        let notice = Notice::new(env, &run, kind, reminder);
        if run.notices.iter().any(|n| n.key == notice.key) {
            return run;
        }
        let claim = format!("{}/{}", run.run_id, notice.key);
        match self
            .store
            .claim_trigger("notice", &claim, &run.run_id)
            .await
        {
            Ok(Ok(())) | Ok(Err(Claimed { sent: false, .. })) => {}
            // Sent by another delivery, which records it.
            Ok(Err(_)) => return run,
            Err(e) => {
                tracing::warn!(run_id = %run.run_id, notice = %notice.key, error = %e, "cannot claim the notice; it is not sent now");
                return run;
            }
        }
        crate::failpoint::point("notice-claimed", kind.as_str());
        let deliveries = self.connector.notifier().send(env, &notice).await;
        for d in deliveries.iter().filter(|d| d.result != "sent") {
            tracing::warn!(run_id = %run.run_id, notice = %notice.key, channel = %d.channel, result = %d.result, "a notification channel did not take the notice");
        }
        if let Err(e) = self
            .store
            .mark_trigger_sent("notice", &claim, &run.run_id)
            .await
        {
            tracing::warn!(run_id = %run.run_id, error = %e, "cannot mark the notice sent");
        }
        let mut recorded = run.clone();
        recorded.notices.push(NoticeRecord {
            key: notice.key.clone(),
            at: notice.at,
            deliveries,
        });
        match self.store.update_run(&recorded).await {
            Ok(run) => run,
            Err(e) => {
                tracing::warn!(run_id = %run.run_id, error = %e, "the notice was sent but could not be recorded on the run");
                run
            }
        }
    }

    /// Records a permanent failure: the stage failed, the run is refused or failed, and its
    /// environment is freed. `new`: the run is not stored yet (refused before it started).
    async fn fail(&self, mut run: Run, stage: Stage, e: Error, new: bool) -> Result<Run> {
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
        let env = self.registry.entry(&run.environment_id).await.ok();
        run.notifies = env.as_ref().is_some_and(|e| !e.notify.is_empty());
        let run = if new {
            self.store.create_run(&run).await?;
            run
        } else {
            self.store.finish_stage(&run, &LockAfter::Release).await?
        };
        self.sink.emit(Progress::StageFinished {
            stage,
            status: "failed".into(),
            summary: e.to_string(),
        });
        tracing::warn!(run_id = %run.run_id, stage = %stage, status = %run.status, error = %e, "run stopped");
        Ok(match (&env, NoticeKind::for_run(&run)) {
            (Some(env), Some(kind)) => self.announce(env, run, kind, 0).await,
            _ => run,
        })
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
        self.store.finish_stage(&run, &LockAfter::Release).await
    }

    /// Operator confirmation of a manual reset: verify, then finish the run.
    pub async fn confirm(&self, run_id: &str) -> Result<Run> {
        let run = self
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
        self.verify_awaiting(env, run, CheckedBy::Operator).await
    }

    /// A `reset-link` delivery for a run that awaits the operator's Reset (the watcher sends one
    /// when a check is due; `relink run --wait` makes one in process): verifies the link again
    /// when a check is due, ends the run `succeeded` when the Reset happened, `failed` when the
    /// give-up time has passed without it. A delivery before the check is due does nothing.
    async fn recheck(&self, run: Run) -> Result<Handled> {
        let env = &self.registry.entry(&run.environment_id).await?;
        if !check_due(&run, env, Timestamp::now()) {
            return Ok(Handled {
                run: self.notice_owed(run).await?,
                next: None,
                duplicate: true,
            });
        }
        let run = self.verify_awaiting(env, run, CheckedBy::Schedule).await?;
        Ok(Handled {
            run,
            next: None,
            duplicate: false,
        })
    }

    /// Verifies an awaiting run's link (read-only) and records the check: `succeeded` when the
    /// link is rebuilt towards this Dataverse; otherwise back to awaiting, or `failed` once the
    /// give-up time has passed.
    async fn verify_awaiting(&self, env: &EnvConfig, run: Run, by: CheckedBy) -> Result<Run> {
        let stage = Stage::ResetLink;
        let mut running = run.clone();
        running.set_status(RunStatus::Running)?;
        let expect = Expect::Stored {
            run_digest: None,
            entry_digest: None,
        };
        let run = match self.start_write(&running, &expect).await? {
            Started::Ok(run) => run,
            Started::Held(held) => return Err(lock_held(env, &run.run_id, &held)),
            Started::Stale => {
                return Err(Error::Conflict(format!(
                    "run {} changed while its link was being verified; look at it again",
                    run.run_id
                )));
            }
        };
        self.sink.emit(Progress::StageStarted { stage });
        crate::failpoint::point("verifying", stage);
        let dataverse = self.connector.dataverse(env)?;
        let fno = self.connector.fno(env)?;
        let ctx = StageCtx {
            env,
            run: &run,
            store: self.store,
            dataverse: dataverse.as_ref(),
            fno: fno.as_ref(),
            gateway: None,
            reset: self.reset,
            sink: self.sink,
            stop_at: None,
        };
        let checks = checks_of(&run) + 1;
        let now = Timestamp::now();
        match self
            .with_lease(env, &run.run_id, stages::verify(&ctx))
            .await
        {
            Ok(mut report) => {
                if let Value::Object(o) = &mut report.outcome {
                    o.insert("checks".into(), checks.into());
                    o.insert("checked_at".into(), now.to_string().into());
                    o.insert("checked_by".into(), by.as_str().into());
                }
                let gated = gated_at(&run);
                if matches!(report.then, Then::Await(_))
                    && now >= gated + env.verify.give_up_after()
                {
                    let why = format!(
                        "the link was still not reset towards {} {} after the gate ({} checks; last: {}); the run gives up. Reset the link as instructed, then start a new run: relink run {}",
                        env.dataverse_url,
                        humanize(env.verify.give_up_after()),
                        checks,
                        report.summary,
                        env.id
                    );
                    let mut failed = run;
                    failed.set_outcome(stage, report.outcome);
                    return self.fail(failed, stage, Error::GaveUp(why), false).await;
                }
                if matches!(report.then, Then::Await(_)) {
                    // Still the operator's move: the instructions stay as they were.
                    report.then = Then::Await(run.instructions.clone().unwrap_or_default());
                }
                let run = self.record(env, None, run, stage, report).await?.0;
                let every = env.verify.remind_every_seconds;
                if run.status == RunStatus::AwaitingConfirmation && every > 0 {
                    let waited = (now - gated).get_seconds().max(0) as u64;
                    let reminder = waited / every;
                    if reminder > 0 {
                        return Ok(self
                            .announce(env, run, NoticeKind::Reminder, reminder)
                            .await);
                    }
                }
                Ok(run)
            }
            Err(e) if e.is_retryable() => {
                // Put the run back where the operator left it.
                let mut back = run;
                back.set_error(stage, e.to_string());
                back.set_status(RunStatus::AwaitingConfirmation)?;
                self.store.finish_stage(&back, &LockAfter::Release).await?;
                Err(e)
            }
            Err(e) => self.fail(run, stage, e, false).await,
        }
    }
}

/// Who verified an awaiting run's link.
#[derive(Clone, Copy, Debug)]
enum CheckedBy {
    /// `relink confirm`.
    Operator,
    /// relink on its own (`verify.every_seconds`).
    Schedule,
}

impl CheckedBy {
    fn as_str(self) -> &'static str {
        match self {
            CheckedBy::Operator => "relink confirm",
            CheckedBy::Schedule => "relink (scheduled check)",
        }
    }
}

/// When the run reached the manual gate.
fn gated_at(run: &Run) -> Timestamp {
    run.stage(Stage::ResetLink)
        .started_at
        .unwrap_or(run.updated_at)
}

/// How many times the link of an awaiting run was verified.
fn checks_of(run: &Run) -> u64 {
    run.stage(Stage::ResetLink)
        .outcome
        .as_ref()
        .and_then(|o| o.get("checks"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Whether an awaiting run's next check is due at `now`: `verify.every_seconds` after the last
/// check (or after the gate), with a second of slack for schedules that fire a little early.
pub fn check_due(run: &Run, env: &EnvConfig, now: Timestamp) -> bool {
    if run.status != RunStatus::AwaitingConfirmation {
        return false;
    }
    let last = run
        .stage(Stage::ResetLink)
        .outcome
        .as_ref()
        .and_then(|o| o.get("checked_at"))
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .unwrap_or_else(|| gated_at(run));
    let every = env.verify.every().saturating_sub(Duration::from_secs(1));
    now >= last + every
}

/// A duration for messages: `3 days`, `2 hours`, `15 minutes`, `40 seconds`.
fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{} days", s / 86_400),
        s if s >= 3_600 && s % 3_600 == 0 => format!("{} hours", s / 3_600),
        s if s >= 60 && s % 60 == 0 => format!("{} minutes", s / 60),
        s => format!("{s} seconds"),
    }
}

/// How many times a stage start re-reads a run that moved under it before it gives up (the
/// event is then retried).
const MAX_STALE_STARTS: usize = 3;

/// What starting a stage came to.
enum Start {
    /// The stage is marked running and the lease is this worker's.
    Running(Run),
    /// The run ended before the stage began (refused).
    Ended(Run),
    /// The run moved since it was read; nothing was written.
    Stale,
}

/// The holder of a lock, for messages.
fn held_by(held: &Lock) -> String {
    match &held.owner {
        Some(o) => format!("{} (worker {})", held.run_id, o.0),
        None => held.run_id.clone(),
    }
}

/// The error for a lock held by someone else.
fn lock_held(env: &EnvConfig, run_id: &str, held: &Lock) -> Error {
    Error::LockHeld {
        environment: env.id.clone(),
        holder: if held.run_id == run_id {
            held_by(held)
        } else {
            held.run_id.clone()
        },
        until: held.lease_until.to_string(),
    }
}
