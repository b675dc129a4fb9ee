//! AWS mode (when `--table` / `RELINK_TABLE` is set): the progress store is the DynamoDB table,
//! the registry is its `CONFIG` entries, and stage events travel through the SQS queues.
//! `relink worker` polls those queues the way Lambda's SQS event source mapping does and runs
//! the same handler as the functions.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage, SqsMessageAttribute};
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, MessageSystemAttributeName};
use lambda_runtime::{Context, LambdaEvent};
use relink_aws::dynamo::DynamoStore;
use relink_aws::lambda::{FunctionDeps, HANDOVER_GRACE, handle_batch};
use relink_aws::registry::TableRegistry;
use relink_aws::secrets::SecretResolver;
use relink_aws::sns::WithTopic;
use relink_aws::sqs::SqsQueue;
use relink_aws::{QueueNames, sdk_config, stack};
use relink_core::event::StageEvent;
use relink_core::model::{Run, RunOptions, Stage};
use relink_core::pipeline::Engine;
use relink_core::ports::StageQueue;
use relink_core::ports::{RegistrySource, SecretStore};
use relink_core::progress::{ProgressSink, TracingSink};
use relink_core::registry::{Registry, SecretSource};
use relink_core::stages::ManualReset;
use relink_core::{Error, Result};
use relink_dynamics::{Http, HttpConnector, RetryPolicy};
use relink_embedded::MemQueue;
use relink_embedded::{ProcessLiveness, local_owner};
use tokio::time::Instant;

/// Where the AWS resources are.
#[derive(Clone, Debug)]
pub struct AwsArgs {
    pub table: String,
    pub queue_prefix: String,
    pub notice_topic: Option<String>,
}

/// The connected AWS adapters.
pub struct Aws {
    pub store: DynamoStore,
    pub config: aws_config::SdkConfig,
    pub names: QueueNames,
    notice_topic: Option<String>,
}

impl Aws {
    pub async fn connect(args: &AwsArgs) -> Aws {
        let config = sdk_config().await;
        Aws {
            store: DynamoStore::new(aws_sdk_dynamodb::Client::new(&config), &args.table),
            names: QueueNames {
                prefix: args.queue_prefix.clone(),
            },
            notice_topic: args.notice_topic.clone(),
            config,
        }
    }

    fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.config)
    }

    fn secrets(&self) -> Arc<dyn SecretStore> {
        Arc::new(SecretResolver::new(&self.config))
    }

    /// The Dynamics clients, with notices going to the webhooks and the notices topic.
    fn connector(&self, sink: Arc<dyn ProgressSink>) -> Result<WithTopic<HttpConnector>> {
        let http = Arc::new(Http::new(RetryPolicy::default(), sink)?);
        Ok(WithTopic::new(
            HttpConnector::new(http, self.secrets()),
            &self.config,
            self.notice_topic.clone(),
        ))
    }

    fn registry(&self) -> TableRegistry {
        TableRegistry::new(self.store.clone())
    }

    /// `relink local-stack create`: the table and queues as the template defines them.
    pub async fn create_stack(&self, visibility: Option<Duration>) -> Result<u8> {
        if let Some(v) = visibility {
            // AWS refuses an SQS event source whose visibility timeout is shorter than the
            // function's timeout; a local stack for `relink worker` tests may want it short.
            for stage in Stage::ALL {
                let timeout = relink_aws::function_timeout(stage);
                if v < timeout {
                    eprintln!(
                        "warning: --visibility-secs {} is shorter than the {stage} function's timeout ({} s): AWS would refuse such a queue as the function's event source (the template uses 6x the timeout); use it only for relink worker against a local stack",
                        v.as_secs(),
                        timeout.as_secs()
                    );
                }
            }
        }
        stack::create_table(self.store.client(), self.store.table()).await?;
        stack::create_queues(&self.sqs(), &self.names, visibility).await?;
        let topic = stack::create_topic(
            &aws_sdk_sns::Client::new(&self.config),
            &format!("{}notices", self.names.prefix),
        )
        .await?;
        println!(
            "created table {} and queues {}{{stage}} with dead-letter queues, and the notices topic {topic} (pass it as --notice-topic or NOTICE_TOPIC_ARN)",
            self.store.table(),
            self.names.prefix
        );
        Ok(crate::exit::OK)
    }

    /// `relink env push ENV...`: stores registry entries from the local file in the table. Every
    /// entry is checked before the first is stored, so a bad one stores none.
    pub async fn env_push(
        &self,
        config: &Path,
        envs: &[String],
        allow_env_secret: bool,
    ) -> Result<u8> {
        let text = std::fs::read_to_string(config).map_err(|e| {
            Error::Config(format!("cannot read registry {}: {e}", config.display()))
        })?;
        let parsed = Registry::parse(&text, |_| Some("unused".into()))?;
        // An LCS / Power Platform environment id may belong to one entry of the table only.
        let stored = Registry::from_entries(&self.store.entries().await?);
        let mut entries = Vec::new();
        for env in envs {
            let entry = checked_entry(&text, &parsed, config, env, allow_env_secret)?;
            stored.check_unique_ids(env, parsed.get(env)?)?;
            entries.push((env, entry));
        }
        for (env, entry) in entries {
            self.store.put_entry(env, &entry).await?;
            println!("stored registry entry {env} in {}", self.store.table());
        }
        Ok(crate::exit::OK)
    }

    /// The environment ids of the table's registry entries, for `relink status --all`.
    pub async fn environment_ids(&self) -> Result<Vec<String>> {
        Ok(self
            .store
            .entries()
            .await?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// `relink env list`.
    pub async fn env_list(&self, json: bool) -> Result<u8> {
        let entries = self.store.entries().await?;
        if json {
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &entries
                        .iter()
                        .map(|(id, e)| serde_json::json!({"environment_id": id, "entry": e}))
                        .collect::<Vec<_>>()
                )
                .expect("json")
            );
        } else {
            for (id, e) in &entries {
                println!(
                    "{id:<24} {:<10} {}  ->  {}",
                    e["kind"].as_str().unwrap_or("?"),
                    e["fno_url"].as_str().unwrap_or("?"),
                    e["dataverse_url"].as_str().unwrap_or("?")
                );
            }
        }
        Ok(crate::exit::OK)
    }

    /// `relink inject`: sends one event to its stage's queue and prints the run id.
    pub async fn inject(
        &self,
        env: &str,
        stage: Stage,
        run_id: Option<String>,
        options: RunOptions,
        json: bool,
    ) -> Result<u8> {
        let registry = self.registry().registry().await?;
        registry.get(env)?;
        let mut event = StageEvent::manual(env, options);
        event.stage = stage;
        // Minting the id here lets the operator follow the run they started.
        event.run_id = Some(run_id.unwrap_or_else(|| ulid::Ulid::new().to_string()));
        event.validate()?;
        let sqs = self.sqs();
        let url = relink_aws::sqs::queue_url(&sqs, &self.names.queue(stage)).await?;
        SqsQueue::new(sqs, HashMap::from([(stage, url)]))
            .send(&event)
            .await?;
        let run_id = event.run_id.unwrap_or_default();
        if json {
            println!(
                "{}",
                serde_json::json!({"run_id": run_id, "environment_id": env, "stage": stage})
            );
        } else {
            println!("sent {stage} for {env}: run {run_id}");
        }
        Ok(crate::exit::OK)
    }

    /// `relink watch`: one poll of the restore watcher; exit 1 if a source failed.
    pub async fn watch(&self, json: bool) -> Result<u8> {
        let sqs = self.sqs();
        let mut urls = HashMap::new();
        for stage in [Stage::DetectMismatch, Stage::ResetLink] {
            urls.insert(
                stage,
                relink_aws::sqs::queue_url(&sqs, &self.names.queue(stage)).await?,
            );
        }
        let queue = SqsQueue::new(sqs, urls);
        let http = Arc::new(Http::new(RetryPolicy::default(), Arc::new(TracingSink))?);
        let watcher = relink_aws::watch::Watcher::new(
            Arc::new(self.registry()),
            Arc::new(self.store.clone()),
            Arc::new(queue),
            http,
            self.secrets(),
        );
        let report = watcher.poll().await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&report).expect("json"));
        } else {
            for (env, run, op) in &report.started {
                println!("{env}: restore {op} -> run {run}");
            }
            println!(
                "{} run(s) queued, {} operation(s) already seen",
                report.started.len(),
                report.already_seen
            );
            for (env, run) in &report.rechecks {
                println!("{env}: run {run} awaits the Reset -> its link is checked again");
            }
            for (env, run) in &report.probes {
                println!("{env}: drift probe -> run {run} (read-only unless on_drift = \"run\")");
            }
            for (env, source, why) in &report.skipped {
                eprintln!(
                    "skipped: {env} ({source}): {}",
                    crate::display::printable(why)
                );
            }
            for (env, source, e) in &report.errors {
                eprintln!("error: {env} ({source}): {}", crate::display::printable(e));
            }
        }
        Ok(if report.errors.is_empty() {
            crate::exit::OK
        } else {
            crate::exit::FAILED
        })
    }

    /// `relink confirm` against the table.
    pub async fn confirm(&self, run_id: &str, sink: Arc<dyn ProgressSink>) -> Result<Run> {
        let registry = self.registry();
        let connector = self.connector(sink.clone())?;
        let queue = MemQueue::default();
        let engine = Engine {
            registry: &registry,
            store: &self.store,
            queue: &queue,
            connector: &connector,
            reset: &ManualReset,
            sink: sink.as_ref(),
            liveness: &ProcessLiveness,
            owner: local_owner(),
            lease: Duration::from_secs(60),
            handover_grace: HANDOVER_GRACE,
            deadline: None,
            stage_deadline: None,
        };
        engine.confirm(run_id).await
    }

    /// `relink worker`.
    pub async fn worker(&self, opts: WorkerOpts) -> Result<u8> {
        let sqs = self.sqs();
        let queue = Arc::new(SqsQueue::by_names(sqs.clone(), &self.names).await?);
        let registry: Arc<dyn RegistrySource> = Arc::new(self.registry());
        let sink: Arc<dyn ProgressSink> = Arc::new(TracingSink);
        let connector = Arc::new(self.connector(sink.clone())?);
        let busy = Arc::new(AtomicUsize::new(0));
        let last_work = Arc::new(std::sync::Mutex::new(Instant::now()));
        let mut pollers = tokio::task::JoinSet::new();
        for stage in Stage::ALL {
            let deps = FunctionDeps {
                stage,
                store: Arc::new(self.store.clone()),
                queue: queue.clone(),
                connector: connector.clone(),
                registry: registry.clone(),
                reset: Arc::new(ManualReset),
                sink: sink.clone(),
                liveness: Arc::new(ProcessLiveness),
                owner_prefix: local_owner().0,
                lease: opts.visibility,
                handover_grace: HANDOVER_GRACE,
                // A local worker's visibility timeout is its retry interval: waits stay within it.
                max_wait: opts.visibility,
                time_boxed: opts.time_box,
                metrics: Arc::new(relink_aws::metrics::Off),
                throttles: Arc::default(),
            };
            let url = queue.url(stage).expect("every stage resolved").to_string();
            let poller = Poller {
                sqs: sqs.clone(),
                url,
                deps,
                opts: opts.clone(),
                busy: busy.clone(),
                last_work: last_work.clone(),
            };
            pollers.spawn(async move { poller.run().await });
        }
        eprintln!(
            "worker polling {}{{{}}}",
            self.names.prefix,
            Stage::ALL.map(|s| s.as_str()).join(",")
        );
        let urls: Vec<String> = Stage::ALL
            .iter()
            .filter_map(|s| queue.url(*s).map(str::to_string))
            .collect();
        let idle = async {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if let Some(limit) = opts.idle_exit
                    && busy.load(Ordering::SeqCst) == 0
                    && last_work.lock().expect("lock").elapsed() >= limit
                    && !messages_pending(&sqs, &urls).await
                {
                    return;
                }
            }
        };
        tokio::select! {
            _ = idle => eprintln!("worker: queues idle, exiting"),
            _ = shutdown_signal() => eprintln!("worker: stopping"),
            // A poller never returns and catches its handler's panics: if one ends anyway, the
            // worker must not exit 0 with a stage left unpolled.
            Some(res) = pollers.join_next() => {
                let why = res.err().map(|e| e.to_string()).unwrap_or_default();
                eprintln!("worker: a queue poller stopped ({why}); exiting so that a supervisor restarts the worker");
                pollers.abort_all();
                return Ok(crate::exit::FAILED);
            }
        }
        pollers.abort_all();
        Ok(crate::exit::OK)
    }
}

/// Whether any stage queue still holds a message, visible, in flight or delayed (an event that
/// waits for another run's lock is a delayed message): an idle worker exits only when none is.
async fn messages_pending(sqs: &aws_sdk_sqs::Client, urls: &[String]) -> bool {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    for url in urls {
        let Ok(out) = sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(A::ApproximateNumberOfMessages)
            .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(A::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
        else {
            return true;
        };
        if out
            .attributes()
            .is_some_and(|a| a.values().any(|v| v.parse::<u64>().unwrap_or(0) > 0))
        {
            return true;
        }
    }
    false
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// How the worker polls, mirroring an SQS event source mapping.
#[derive(Clone, Debug)]
pub struct WorkerOpts {
    /// Messages per batch (1-10).
    pub batch_size: i32,
    /// Long-polling wait (0-20 s).
    pub wait: Duration,
    /// Visibility timeout asked for received messages, and the handler's deadline.
    pub visibility: Duration,
    /// Long stages hand over to a new delivery before the visibility timeout, as in Lambda.
    pub time_box: bool,
    /// Exit when every queue has been empty this long (tests, one-shot jobs).
    pub idle_exit: Option<Duration>,
    /// Hand every batch to the handler twice, concurrently (at-least-once delivery drills).
    pub deliver_twice: bool,
}

struct Poller {
    sqs: aws_sdk_sqs::Client,
    url: String,
    deps: FunctionDeps,
    opts: WorkerOpts,
    busy: Arc<AtomicUsize>,
    last_work: Arc<std::sync::Mutex<Instant>>,
}

impl Poller {
    /// Polls until the worker stops: never returns.
    async fn run(&self) -> std::convert::Infallible {
        loop {
            let received = self
                .sqs
                .receive_message()
                .queue_url(&self.url)
                .max_number_of_messages(self.opts.batch_size)
                .wait_time_seconds(self.opts.wait.as_secs() as i32)
                .visibility_timeout(self.opts.visibility.as_secs() as i32)
                .message_attribute_names("All")
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .send()
                .await;
            let messages = match received {
                Ok(out) => out.messages.unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %relink_aws::sdk_error(&e), queue = %self.url, "receive failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if messages.is_empty() {
                continue;
            }
            self.busy.fetch_add(1, Ordering::SeqCst);
            self.process(messages).await;
            *self.last_work.lock().expect("lock") = Instant::now();
            self.busy.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn context(&self) -> Context {
        let mut ctx = Context::default();
        ctx.request_id = format!("worker-{}", ulid::Ulid::new());
        ctx.deadline = (jiff::Timestamp::now() + self.opts.visibility).as_millisecond() as u64;
        ctx
    }

    /// One invocation of the handler, as Lambda's runtime makes it: the ids of the messages that
    /// failed, every one of them if the handler returned an error or panicked (the runtime
    /// reports an invocation error then, and the whole batch comes back after its visibility
    /// timeout). A panic ends neither the worker nor the other stages' pollers.
    async fn invoke(&self, event: SqsEvent) -> Vec<String> {
        use futures::FutureExt;
        let all: Vec<String> = event
            .records
            .iter()
            .filter_map(|r| r.message_id.clone())
            .collect();
        let call = handle_batch(&self.deps, LambdaEvent::new(event, self.context()));
        match std::panic::AssertUnwindSafe(call).catch_unwind().await {
            Ok(Ok(response)) => response
                .batch_item_failures
                .into_iter()
                .map(|f| f.item_identifier)
                .collect(),
            Ok(Err(e)) => {
                tracing::error!(error = %e, queue = %self.url, "the handler failed the invocation; the batch comes back after the visibility timeout");
                all
            }
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                let what =
                    relink_core::redact::printable(&what.chars().take(500).collect::<String>());
                tracing::error!(panic = %what, queue = %self.url, "the handler panicked; the batch comes back after the visibility timeout");
                all
            }
        }
    }

    async fn process(&self, messages: Vec<aws_sdk_sqs::types::Message>) {
        let mut event = SqsEvent::default();
        event.records = messages.iter().map(to_lambda_record).collect();
        let failed: Vec<String> = if self.opts.deliver_twice {
            let (a, b) = tokio::join!(self.invoke(event.clone()), self.invoke(event));
            a.into_iter().chain(b).collect()
        } else {
            self.invoke(event).await
        };
        // As with ReportBatchItemFailures: delete what succeeded; failures reappear after the
        // visibility timeout and move to the dead-letter queue after maxReceiveCount.
        let done: Vec<DeleteMessageBatchRequestEntry> = messages
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
        if done.is_empty() {
            return;
        }
        // A message not deleted comes back after its visibility timeout, and the handler knows
        // a delivery it has already done: a failed delete costs a redelivery, not the worker.
        match self
            .sqs
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(done))
            .send()
            .await
        {
            Ok(out) if !out.failed().is_empty() => {
                tracing::warn!(failed = out.failed().len(), queue = %self.url, "SQS kept some handled messages; they come back and are recognised as done");
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %relink_aws::sdk_error(&e), queue = %self.url, "SQS DeleteMessageBatch failed; the messages come back and are recognised as done");
            }
        }
    }
}

/// An SQS message as Lambda's event source mapping hands it to a function.
fn to_lambda_record(m: &aws_sdk_sqs::types::Message) -> SqsMessage {
    let mut r = SqsMessage::default();
    r.message_id = m.message_id().map(str::to_string);
    r.receipt_handle = m.receipt_handle().map(str::to_string);
    r.body = m.body().map(str::to_string);
    r.md5_of_body = m.md5_of_body().map(str::to_string);
    r.event_source = Some("aws:sqs".into());
    r.attributes = m
        .attributes()
        .map(|a| {
            a.iter()
                .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    r.message_attributes = m
        .message_attributes()
        .map(|a| {
            a.iter()
                .map(|(k, v)| {
                    let mut attr = SqsMessageAttribute::default();
                    attr.string_value = v.string_value().map(str::to_string);
                    attr.data_type = Some(v.data_type().to_string());
                    (k.clone(), attr)
                })
                .collect()
        })
        .unwrap_or_default();
    r
}

/// One registry entry as stored in the table, refused if its secret could not be read in AWS.
fn checked_entry(
    text: &str,
    parsed: &Registry,
    config: &Path,
    env: &str,
    allow_env_secret: bool,
) -> Result<serde_json::Value> {
    let entry = Registry::entry_json(text, env).map_err(|e| match e {
        Error::UnknownEnvironment(_) => Error::Config(format!(
            "{} has no [environments.{env}] section",
            config.display()
        )),
        other => other,
    })?;
    if matches!(parsed.get(env)?.secret_source, SecretSource::Env(_)) && !allow_env_secret {
        return Err(Error::Config(format!(
            "`client_secret` of {env} names an environment variable; in AWS, give a Secrets Manager ARN: client_secret = {{ secret_arn = \"arn:aws:secretsmanager:...\" }} (or pass --allow-env-secret for a local stack)"
        )));
    }
    if !allow_env_secret {
        // The functions' own check (every secret from Secrets Manager), before anything is stored.
        Registry::from_entries(&[(env.to_string(), entry.clone())]).get(env)?;
    }
    Ok(entry)
}
