//! Pipeline overhead: end-to-end time per environment through SQS and DynamoDB on the local
//! stack (moto), with zero-latency simulators, the stage handlers (`shared::lambda::handle_batch`)
//! running in this process the way Lambda runs them: per stage queue, up to [`INSTANCES`]
//! concurrent invocations, batches of 5 (the template's `BatchSize`). Store and queue calls are
//! timed by wrappers around the real adapters, so the report says where the time goes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use async_trait::async_trait;
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use lambda_runtime::{Context as LambdaContext, LambdaEvent};
use relink_aws::dynamo::DynamoStore;
use relink_aws::lambda::{FunctionDeps, HANDOVER_GRACE, handle_batch};
use relink_aws::registry::TableRegistry;
use relink_aws::secrets::SecretResolver;
use relink_aws::sqs::SqsQueue;
use relink_aws::{QueueNames, stack};
use relink_core::event::StageEvent;
use relink_core::model::{Run, Stage};
use relink_core::ports::{
    ArchivedRow, Claimed, Expect, LeaseOwner, Lock, LockAfter, ProgressStore, RegistrySource,
    Rejected, StageQueue, Started,
};
use relink_core::progress::{Progress, ProgressSink};
use relink_dynamics::{Http, HttpConnector, RetryPolicy};
use relink_sim::{AppSeed, FnoSeed, OrgSeed, Seed, Sim};

use crate::coldstart::percentile;

/// Concurrent invocations per stage function.
pub const INSTANCES: usize = 8;
/// Environments relinked one after another for the per-environment latency.
pub const SEQUENTIAL: usize = 20;
const ROWS: usize = 10;
const CLIENT: &str = "44444444-4444-4444-4444-444444444444";
const SECRET: &str = "pipeline-bench-secret";

/// Time spent, summed over calls.
#[derive(Default)]
struct Spent {
    store: Duration,
    store_calls: usize,
    /// DynamoDB calls by what made them (store method, or the registry read).
    calls: std::collections::BTreeMap<&'static str, usize>,
    send: Duration,
    sends: usize,
    handler: Duration,
    invocations: usize,
    queue_wait: Duration,
    messages: usize,
    ack: Duration,
}

type Clock = Arc<Mutex<Spent>>;

struct Quiet;
impl ProgressSink for Quiet {
    fn emit(&self, _: Progress) {}
}

/// The DynamoDB store, timed.
struct TimedStore {
    inner: DynamoStore,
    clock: Clock,
}

/// Times one DynamoDB call made for `what`.
async fn time_call<T>(clock: &Clock, what: &'static str, f: impl Future<Output = T>) -> T {
    let t = Instant::now();
    let out = f.await;
    let mut c = clock.lock().unwrap();
    c.store += t.elapsed();
    c.store_calls += 1;
    *c.calls.entry(what).or_default() += 1;
    out
}

impl TimedStore {
    async fn time<T>(&self, f: impl Future<Output = T>) -> T {
        time_call(&self.clock, "other", f).await
    }
    async fn named<T>(&self, what: &'static str, f: impl Future<Output = T>) -> T {
        time_call(&self.clock, what, f).await
    }
}

/// The table registry, timed: each entry read is one DynamoDB `GetItem`.
struct TimedRegistry {
    inner: TableRegistry,
    clock: Clock,
}

#[async_trait]
impl RegistrySource for TimedRegistry {
    async fn registry(&self) -> R<Arc<relink_core::registry::Registry>> {
        time_call(&self.clock, "registry", self.inner.registry()).await
    }
    async fn entry(&self, environment_id: &str) -> R<relink_core::registry::EnvConfig> {
        time_call(
            &self.clock,
            "registry entry",
            self.inner.entry(environment_id),
        )
        .await
    }
    async fn entry_with_text(
        &self,
        environment_id: &str,
    ) -> R<(relink_core::registry::EnvConfig, Option<String>)> {
        time_call(
            &self.clock,
            "registry entry",
            self.inner.entry_with_text(environment_id),
        )
        .await
    }
}

type R<T> = relink_core::Result<T>;

#[async_trait]
impl ProgressStore for TimedStore {
    async fn create_run(&self, run: &Run) -> R<()> {
        self.named("create_run", self.inner.create_run(run)).await
    }
    async fn find_run(&self, environment_id: &str, run_id: &str) -> R<Option<Run>> {
        self.named("find_run", self.inner.find_run(environment_id, run_id))
            .await
    }
    async fn start_stage(
        &self,
        run: &Run,
        expect: &Expect,
        owner: &LeaseOwner,
        lease: Duration,
    ) -> R<Started> {
        self.named(
            "start_stage",
            self.inner.start_stage(run, expect, owner, lease),
        )
        .await
    }
    async fn finish_stage(&self, run: &Run, lock: &LockAfter) -> R<Run> {
        self.named("finish_stage", self.inner.finish_stage(run, lock))
            .await
    }
    fn checks_carried(&self) -> bool {
        self.inner.checks_carried()
    }
    async fn get_run(&self, run_id: &str) -> R<Option<Run>> {
        self.named("get_run", self.inner.get_run(run_id)).await
    }
    async fn update_run(&self, run: &Run) -> R<Run> {
        self.named("update_run", self.inner.update_run(run)).await
    }
    async fn latest_run(&self, environment_id: &str) -> R<Option<Run>> {
        self.time(self.inner.latest_run(environment_id)).await
    }
    async fn recent_runs(&self, limit: usize) -> R<Vec<Run>> {
        self.time(self.inner.recent_runs(limit)).await
    }
    async fn acquire_lock(
        &self,
        env: &str,
        run_id: &str,
        owner: &LeaseOwner,
        lease: Duration,
    ) -> R<Result<Lock, Lock>> {
        self.named(
            "acquire_lock",
            self.inner.acquire_lock(env, run_id, owner, lease),
        )
        .await
    }
    async fn handover_lock(
        &self,
        env: &str,
        run_id: &str,
        owner: &LeaseOwner,
        grace: Duration,
    ) -> R<()> {
        self.named(
            "handover_lock",
            self.inner.handover_lock(env, run_id, owner, grace),
        )
        .await
    }
    async fn get_lock(&self, env: &str) -> R<Option<Lock>> {
        self.time(self.inner.get_lock(env)).await
    }
    async fn release_lock(&self, env: &str, run_id: &str) -> R<()> {
        self.named("release_lock", self.inner.release_lock(env, run_id))
            .await
    }
    async fn archive(&self, run_id: &str, env: &str, rows: &[ArchivedRow]) -> R<()> {
        self.named("archive", self.inner.archive(run_id, env, rows))
            .await
    }
    async fn archived(&self, run_id: &str) -> R<Vec<ArchivedRow>> {
        self.time(self.inner.archived(run_id)).await
    }
    async fn archived_count(&self, run_id: &str, table: &str) -> R<usize> {
        self.named("archived_count", self.inner.archived_count(run_id, table))
            .await
    }
    async fn note_waiting(&self, env: &str, run_id: &str, note: &str) -> R<()> {
        self.named("note_waiting", self.inner.note_waiting(env, run_id, note))
            .await
    }
    async fn claim_trigger(&self, s: &str, op: &str, run_id: &str) -> R<Result<(), Claimed>> {
        self.time(self.inner.claim_trigger(s, op, run_id)).await
    }
    async fn mark_trigger_sent(&self, s: &str, op: &str, run_id: &str) -> R<()> {
        self.time(self.inner.mark_trigger_sent(s, op, run_id)).await
    }
    async fn release_trigger(&self, s: &str, op: &str, run_id: &str) -> R<()> {
        self.time(self.inner.release_trigger(s, op, run_id)).await
    }
    async fn get_cursor(&self, key: &str) -> R<Option<String>> {
        self.time(self.inner.get_cursor(key)).await
    }
    async fn put_cursor(&self, key: &str, value: &str) -> R<()> {
        self.time(self.inner.put_cursor(key, value)).await
    }
    async fn record_rejected(&self, rejected: &Rejected) -> R<()> {
        self.time(self.inner.record_rejected(rejected)).await
    }
    async fn rejected(&self, limit: usize) -> R<Vec<Rejected>> {
        self.time(self.inner.rejected(limit)).await
    }
}

/// The SQS sender, timed.
struct TimedQueue {
    inner: SqsQueue,
    clock: Clock,
}

#[async_trait]
impl StageQueue for TimedQueue {
    async fn send(&self, event: &StageEvent) -> R<()> {
        let t = Instant::now();
        let out = self.inner.send(event).await;
        let mut c = self.clock.lock().unwrap();
        c.send += t.elapsed();
        c.sends += 1;
        out
    }
}

/// What one phase measured.
pub struct Phase {
    pub envs: usize,
    pub wall: Duration,
    pub e2e: Vec<Duration>,
    spent: Spent,
}

/// Runs the sequential and fan-out phases; returns the report section.
pub async fn run(fan_out: usize) -> Result<String> {
    let endpoint = std::env::var("AWS_ENDPOINT_URL").context(
        "the pipeline benchmark needs the local stack: run it through infra/scripts/bench.sh (it starts moto and sets AWS_ENDPOINT_URL)",
    )?;
    let config = relink_aws::sdk_config().await;
    let ddb = aws_sdk_dynamodb::Client::new(&config);
    let sqs = aws_sdk_sqs::Client::new(&config);
    let id = ulid::Ulid::new().to_string().to_lowercase();
    let table = format!("bench-{id}");
    let names = QueueNames {
        prefix: format!("b{id}-"),
    };
    stack::create_table(&ddb, &table).await?;
    stack::create_queues(&sqs, &names, Some(Duration::from_secs(60))).await?;
    let mut urls = HashMap::new();
    for s in Stage::ALL {
        urls.insert(s, relink_aws::sqs::queue_url(&sqs, &names.queue(s)).await?);
    }
    let secret_arn = app_secret(
        &aws_sdk_secretsmanager::Client::new(&config),
        &format!("relink-bench/{id}"),
    )
    .await?;

    let envs: Vec<String> = (0..SEQUENTIAL)
        .map(|i| format!("seq-{i:03}"))
        .chain((0..fan_out).map(|i| format!("fan-{i:03}")))
        .collect();
    let sim = Sim::start(([127, 0, 0, 1], 0).into()).await?;
    seed(&sim, &envs)?;
    let store = DynamoStore::new(ddb.clone(), &table);
    for env in &envs {
        store
            .put_entry(env, &registry_entry(&sim, env, &secret_arn))
            .await?;
    }

    let clock: Clock = Arc::default();
    let done: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let http = Arc::new(Http::new(RetryPolicy::default(), Arc::new(Quiet))?);
    let registry = Arc::new(TimedRegistry {
        inner: TableRegistry::new(store.clone()),
        clock: clock.clone(),
    });
    let secrets = Arc::new(SecretResolver::new(&config));
    let mut pollers = Vec::new();
    for stage in Stage::ALL {
        let deps = Arc::new(FunctionDeps {
            stage,
            store: Arc::new(TimedStore {
                inner: store.clone(),
                clock: clock.clone(),
            }),
            queue: Arc::new(TimedQueue {
                inner: SqsQueue::new(sqs.clone(), urls.clone()),
                clock: clock.clone(),
            }),
            connector: Arc::new(HttpConnector::new(http.clone(), secrets.clone())),
            registry: registry.clone(),
            reset: Arc::new(relink_core::stages::ManualReset),
            sink: Arc::new(Quiet),
            liveness: Arc::new(relink_core::ports::LeasesOnly),
            owner_prefix: "lambda".into(),
            lease: relink_aws::function_timeout(stage),
            handover_grace: HANDOVER_GRACE,
            max_wait: relink_aws::lambda::MAX_BACKOFF,
            time_boxed: true,
            metrics: Arc::new(relink_aws::metrics::Off),
            throttles: Arc::default(),
        });
        for _ in 0..INSTANCES {
            pollers.push(tokio::spawn(poll(
                sqs.clone(),
                urls[&stage].clone(),
                deps.clone(),
                clock.clone(),
                done.clone(),
                stop.clone(),
            )));
        }
    }

    eprintln!("pipeline: {SEQUENTIAL} environments one after another...");
    let detect = &urls[&Stage::DetectMismatch];
    let sequential = phase(&sqs, detect, &envs[..SEQUENTIAL], &clock, &done, true).await?;
    eprintln!("pipeline: {fan_out} environments at once...");
    let fan = phase(&sqs, detect, &envs[SEQUENTIAL..], &clock, &done, false).await?;
    stop.store(true, Ordering::SeqCst);
    for p in pollers {
        p.await.ok();
    }
    Ok(report(&sequential, &fan, &endpoint))
}

/// Stores the seeded app's client secret in Secrets Manager under `name`; returns its ARN.
pub(crate) async fn app_secret(
    secrets: &aws_sdk_secretsmanager::Client,
    name: &str,
) -> Result<String> {
    Ok(secrets
        .create_secret()
        .name(name)
        .secret_string(SECRET)
        .send()
        .await?
        .arn()
        .context("secret arn")?
        .to_string())
}

/// The registry entry of a seeded environment (its own Dataverse organisation and F&O).
pub(crate) fn registry_entry(sim: &Sim, env: &str, secret_arn: &str) -> serde_json::Value {
    let org = env.replace('-', "");
    serde_json::json!({
        "kind": "uat",
        "fno_url": sim.fno_url(env),
        "dataverse_url": sim.dataverse_url(&org),
        "dataverse_unique_name": format!("org{org}"),
        "tenant_id": "bench",
        "client_id": CLIENT,
        "client_secret": {"secret_arn": secret_arn},
        "authority": sim.authority(),
        "allow_insecure_http": true,
    })
}

pub(crate) fn seed(sim: &Sim, envs: &[String]) -> Result<()> {
    let mut organizations = vec![OrgSeed {
        name: "prod".into(),
        unique_name: "orgprod".into(),
        organization_id: None,
        friendly_name: None,
        integrated_fno: None,
        runtime_configs: 0,
        platform: None,
    }];
    let mut fno_environments = Vec::new();
    for env in envs {
        let org = env.replace('-', "");
        organizations.push(OrgSeed {
            name: org.clone(),
            unique_name: format!("org{org}"),
            organization_id: None,
            friendly_name: None,
            integrated_fno: Some(env.clone()),
            runtime_configs: ROWS,
            platform: None,
        });
        fno_environments.push(FnoSeed {
            name: env.clone(),
            linked_organization: org,
            points_at: Some("prod".into()),
            project_configs: 4,
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
            client_secret: SECRET.into(),
        }],
        organizations,
        fno_environments,
        ..Seed::default()
    })
    .map_err(anyhow::Error::msg)
}

/// One stage function's invocations: receive a batch, hand it to the handler, delete what
/// succeeded; reset-link's completions are timestamped per environment.
async fn poll(
    sqs: aws_sdk_sqs::Client,
    url: String,
    deps: Arc<FunctionDeps>,
    clock: Clock,
    done: Arc<Mutex<HashMap<String, Instant>>>,
    stop: Arc<AtomicBool>,
) {
    use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
    while !stop.load(Ordering::SeqCst) {
        let Ok(out) = sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(5)
            .wait_time_seconds(1)
            .message_system_attribute_names(MessageSystemAttributeName::SentTimestamp)
            .send()
            .await
        else {
            continue;
        };
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            continue;
        }
        let received_ms = jiff::Timestamp::now().as_millisecond();
        let mut event = SqsEvent::default();
        for m in &messages {
            let sent: i64 = m
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
                .and_then(|s| s.parse().ok())
                .unwrap_or(received_ms);
            let mut r = SqsMessage::default();
            r.message_id = m.message_id().map(str::to_string);
            r.receipt_handle = m.receipt_handle().map(str::to_string);
            r.body = m.body().map(str::to_string);
            r.attributes
                .insert("SentTimestamp".into(), sent.to_string());
            event.records.push(r);
            let mut c = clock.lock().unwrap();
            c.queue_wait += Duration::from_millis((received_ms - sent).max(0) as u64);
            c.messages += 1;
        }
        let mut ctx = LambdaContext::default();
        ctx.deadline = (jiff::Timestamp::now() + Duration::from_secs(60)).as_millisecond() as u64;
        let t = Instant::now();
        let failed: Vec<String> = handle_batch(&deps, LambdaEvent::new(event, ctx))
            .await
            .map(|r| r.batch_item_failures)
            .unwrap_or_default()
            .into_iter()
            .map(|f| f.item_identifier)
            .collect();
        {
            let mut c = clock.lock().unwrap();
            c.handler += t.elapsed();
            c.invocations += 1;
        }
        let entries: Vec<DeleteMessageBatchRequestEntry> = messages
            .iter()
            .filter(|m| !failed.iter().any(|f| Some(f.as_str()) == m.message_id()))
            .enumerate()
            .map(|(i, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .build()
                    .expect("set")
            })
            .collect();
        if deps.stage == Stage::ResetLink {
            let now = Instant::now();
            let mut d = done.lock().unwrap();
            for m in &messages {
                if let Some(ev) = m.body().and_then(|b| StageEvent::parse(b).ok()) {
                    d.entry(ev.environment_id).or_insert(now);
                }
            }
        }
        if !entries.is_empty() {
            let t = Instant::now();
            sqs.delete_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
                .ok();
            clock.lock().unwrap().ack += t.elapsed();
        }
    }
}

/// Sends a restore event per environment (one at a time, each waiting for the previous run to
/// reach the manual gate, or all at once) and waits for every run to get there.
async fn phase(
    sqs: &aws_sdk_sqs::Client,
    detect: &str,
    envs: &[String],
    clock: &Clock,
    done: &Arc<Mutex<HashMap<String, Instant>>>,
    one_at_a_time: bool,
) -> Result<Phase> {
    *clock.lock().unwrap() = Spent::default();
    let wait_for = |env: &str| {
        let done = done.clone();
        let env = env.to_string();
        async move {
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                if let Some(t) = done.lock().unwrap().get(&env) {
                    return Ok(*t);
                }
                if Instant::now() > deadline {
                    bail!("{env} did not reach the manual gate within 10 minutes");
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    let send = |env: &str| {
        sqs.send_message()
            .queue_url(detect)
            .message_body(format!(r#"{{"environment_id":"{env}"}}"#))
            .send()
    };
    let started = Instant::now();
    let mut e2e = Vec::new();
    if one_at_a_time {
        for env in envs {
            let t = Instant::now();
            send(env).await?;
            e2e.push(wait_for(env).await? - t);
        }
    } else {
        let mut sent = Vec::new();
        for chunk in envs.chunks(10) {
            let mut futs = Vec::new();
            for env in chunk {
                futs.push(send(env));
            }
            for f in futs {
                f.await?;
                sent.push(Instant::now());
            }
        }
        for (env, t) in envs.iter().zip(sent) {
            e2e.push(wait_for(env).await? - t);
        }
    }
    let wall = started.elapsed();
    let spent = std::mem::take(&mut *clock.lock().unwrap());
    Ok(Phase {
        envs: envs.len(),
        wall,
        e2e,
        spent,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn report(seq: &Phase, fan: &Phase, endpoint: &str) -> String {
    let per_env = |p: &Phase, d: Duration| ms(d / p.envs as u32);
    let breakdown = |p: &Phase| {
        let s = &p.spent;
        let other = s.handler.saturating_sub(s.store + s.send);
        format!(
            "| {envs} | {wait} | {handler} | {store} ({sc:.1} calls) | {send} ({sn} sends) | {other} | {ack} |",
            envs = p.envs,
            wait = per_env(p, s.queue_wait),
            handler = per_env(p, s.handler),
            store = per_env(p, s.store),
            sc = s.store_calls as f64 / p.envs as f64,
            send = per_env(p, s.send),
            sn = s.sends / p.envs,
            other = per_env(p, other),
            ack = per_env(p, s.ack),
        )
    };
    let kinds: Vec<&str> = seq
        .spent
        .calls
        .keys()
        .chain(fan.spent.calls.keys())
        .copied()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let by_kind = |p: &Phase| {
        let per = |n: usize| format!("{:.1}", n as f64 / p.envs as f64);
        let cells: Vec<String> = kinds
            .iter()
            .map(|k| per(p.spent.calls.get(k).copied().unwrap_or(0)))
            .collect();
        format!(
            "| {} | {} | {} |",
            p.envs,
            cells.join(" | "),
            per(p.spent.store_calls)
        )
    };
    format!(
        "## Pipeline overhead through SQS and DynamoDB\n\n\
         Command: part of `bash infra/scripts/bench.sh` (`relink-bench all`, which needs the local stack at `AWS_ENDPOINT_URL`). \
         Local stack: moto server at {endpoint} (single Python process, started through `infra/scripts/moto_serve.py`, which \
         serialises its DynamoDB requests and checks a transaction's conditions before writing; the figures before this \
         session's change also come from an unpatched moto, whose every transaction copied the whole table). Simulators with no added latency; each environment has \
         {ROWS} Dataverse runtime configurations and 4 F&O keys. The stage handlers run in this process as Lambda runs them: per \
         stage queue {INSTANCES} concurrent invocations, batches of up to 5, long polling. End to end = from sending the restore \
         event to detect-mismatch until reset-link has recorded the manual gate (four stages, four queues).\n\n\
         | environments | how | wall time | throughput | end to end p50 | p95 |\n\
         | ---: | --- | ---: | ---: | ---: | ---: |\n\
         | {sn} | one after another | {sw:.1} s | {st:.1} env/s | {sp50} | {sp95} |\n\
         | {fnn} | all at once | {fw:.1} s | {ft:.1} env/s | {fp50} | {fp95} |\n\n\
         Where the time goes, per environment (sums over its four stages; handler time includes the store and send calls made \
         inside it, \"other\" is the rest of the handler: Dynamics HTTP, archive encoding, logic):\n\n\
         | environments | queue wait (sent to received) | handler | of which DynamoDB | of which queue sends | other | acknowledging |\n\
         | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n\
         {b1}\n{b2}\n\n\
         DynamoDB calls per environment through the four stages, by what made them (registry entry reads included; a stage starts with one transaction that marks it running and takes the lease, and ends with one that records it and hands the lock on; the events between stages carry the run and the registry entry, which that first transaction checks instead of reading them):\n\n\
         | environments | {kinds} | all |\n\
         | ---: |{kind_cols} ---: |\n\
         {c1}\n{c2}\n\n\
         Before this path (commit d05987b, docs/BENCHMARKS.md of that commit): 27 store calls per environment, plus the 4 registry entry reads that the benchmark did not count then, so 31 DynamoDB calls; 200 environments at once then took 43.5 s (p50 15.5 s end to end, 5.5 s of handler and \
         4.6 s of DynamoDB per environment).\n",
        sn = seq.envs,
        sw = seq.wall.as_secs_f64(),
        st = seq.envs as f64 / seq.wall.as_secs_f64(),
        sp50 = ms(percentile(&seq.e2e, 0.5)),
        sp95 = ms(percentile(&seq.e2e, 0.95)),
        fnn = fan.envs,
        fw = fan.wall.as_secs_f64(),
        ft = fan.envs as f64 / fan.wall.as_secs_f64(),
        fp50 = ms(percentile(&fan.e2e, 0.5)),
        fp95 = ms(percentile(&fan.e2e, 0.95)),
        b1 = breakdown(seq),
        b2 = breakdown(fan),
        kinds = kinds.join(" | "),
        kind_cols = " ---: |".repeat(kinds.len()),
        c1 = by_kind(seq),
        c2 = by_kind(fan),
    )
}
