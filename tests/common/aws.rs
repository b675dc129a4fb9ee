//! AWS-mode harness: a table, queues and a secret of the test's own on the local stack (moto,
//! started by infra/scripts/test.sh), the registry entry pushed into the table, and workers run
//! as real `relink worker` processes.

use std::time::Duration;

use relink_core::model::Stage;

use super::{Out, Spec, World};

/// Stage queues' visibility timeout in these tests: short, so redeliveries come quickly.
pub const VISIBILITY_SECS: u64 = 3;

pub struct AwsWorld {
    pub w: World,
    pub table: String,
    pub prefix: String,
    pub sqs: aws_sdk_sqs::Client,
    /// The world's notices topic (`relink local-stack create` makes it), passed to every command.
    pub topic: String,
    sns: aws_sdk_sns::Client,
}

/// Creates a Secrets Manager secret on the local stack (`name` gets a unique suffix): its ARN.
pub async fn local_secret(name: &str, value: &str) -> String {
    let config = relink_aws::sdk_config().await;
    aws_sdk_secretsmanager::Client::new(&config)
        .create_secret()
        .name(format!("{name}-{}", ulid::Ulid::new()))
        .secret_string(value)
        .send()
        .await
        .expect("secret created on the local stack")
        .arn()
        .expect("arn")
        .to_string()
}

impl AwsWorld {
    pub async fn new(spec: Spec) -> AwsWorld {
        assert!(
            std::env::var("AWS_ENDPOINT_URL").is_ok(),
            "AWS-mode tests need the local stack: run them through infra/scripts/test.sh (it starts moto and sets AWS_ENDPOINT_URL)"
        );
        let w = World::new(spec).await;
        let config = relink_aws::sdk_config().await;
        let id = ulid::Ulid::new().to_string().to_lowercase();
        let arn = local_secret("relink-test/client", &w.secret).await;
        let text = std::fs::read_to_string(&w.config).unwrap().replace(
            &format!("client_secret = {{ env = \"{}\" }}", super::SECRET_VAR),
            &format!("client_secret = {{ secret_arn = \"{arn}\" }}"),
        );
        assert!(text.contains("secret_arn"));
        std::fs::write(&w.config, text).unwrap();
        let sns = aws_sdk_sns::Client::new(&config);
        // CreateTopic is idempotent: the ARN of the topic local-stack create makes below.
        let topic = sns
            .create_topic()
            .name(format!("r{id}-notices"))
            .send()
            .await
            .expect("topic on the local stack")
            .topic_arn()
            .unwrap()
            .to_string();
        let aws = AwsWorld {
            w,
            table: format!("relink-{id}"),
            prefix: format!("r{id}-"),
            sqs: aws_sdk_sqs::Client::new(&config),
            topic,
            sns,
        };
        let out = aws
            .relink(&[
                "local-stack",
                "create",
                "--visibility-secs",
                &VISIBILITY_SECS.to_string(),
            ])
            .await;
        assert_eq!(out.code, 0, "{out:?}");
        assert!(
            out.stderr
                .contains("shorter than the clear-dataverse-configs function's timeout"),
            "a visibility shorter than a function's timeout is pointed out: {out:?}"
        );
        let mut push = vec!["env", "push"];
        push.extend(aws.w.envs.iter().map(String::as_str));
        let out = aws.relink(&push).await;
        assert_eq!(out.code, 0, "{out:?}");
        aws
    }

    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = self.w.command(&[
            "--table",
            &self.table,
            "--queue-prefix",
            &self.prefix,
            "--notice-topic",
            &self.topic,
        ]);
        cmd.args(args).env_remove(super::SECRET_VAR);
        cmd
    }

    pub async fn relink(&self, args: &[&str]) -> Out {
        self.w
            .finish(self.command(args).output().await.expect("relink runs"))
    }

    /// A worker that exits once the queues have been idle for a few seconds.
    fn worker_command(&self, extra: &[&str]) -> tokio::process::Command {
        let vis = VISIBILITY_SECS.to_string();
        let mut args = vec![
            "worker",
            "--wait-secs",
            "1",
            "--visibility-secs",
            &vis,
            "--idle-exit-secs",
            "5",
            "--batch-size",
            "10",
        ];
        args.extend_from_slice(extra);
        self.command(&args)
    }

    /// Starts a worker in the background, its output going to a log file of the world's
    /// directory (searched for secrets by the scenario checks), with extra environment variables.
    pub fn worker_with(&self, extra: &[&str], vars: &[(&str, &str)]) -> tokio::process::Child {
        let mut cmd = self.worker_command(extra);
        let log = self.w.dir.join(format!("worker-{}.log", ulid::Ulid::new()));
        let file = std::fs::File::create(&log).expect("worker log");
        cmd.stdout(file.try_clone().unwrap()).stderr(file);
        cmd.envs(vars.iter().copied());
        cmd.spawn().expect("worker starts")
    }

    pub fn worker(&self, extra: &[&str]) -> tokio::process::Child {
        self.worker_with(extra, &[])
    }

    /// Starts a worker armed with a failpoint, waits until it has stopped itself there and
    /// SIGKILLs it.
    pub async fn kill_worker_at(&self, failpoint: &str) {
        let mut worker = self.stop_worker_at(failpoint).await;
        worker.start_kill().unwrap(); // SIGKILL
        worker.wait().await.unwrap();
    }

    /// Starts a worker armed with a failpoint and waits until it has stopped itself there
    /// (SIGSTOP): the stopped worker, for the test to SIGKILL or SIGCONT.
    pub async fn stop_worker_at(&self, failpoint: &str) -> tokio::process::Child {
        let mut worker = self.worker_with(&[], &[("RELINK_FAILPOINT", failpoint)]);
        let stat = format!("/proc/{}/stat", worker.id().unwrap());
        let stopped = || {
            std::fs::read_to_string(&stat)
                .ok()
                .and_then(|s| Some(s.rsplit_once(')')?.1.trim_start().starts_with('T')))
                .unwrap_or(false)
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        while !stopped() {
            if let Ok(Some(status)) = worker.try_wait() {
                panic!("the worker exited ({status}) before reaching {failpoint}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the worker never reached {failpoint}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        worker
    }

    /// Runs a worker to its idle exit and returns its output.
    pub async fn drain(&self, extra: &[&str]) -> Out {
        let child = self.worker_command(extra).spawn().expect("worker starts");
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("worker drains within 2 minutes")
            .unwrap();
        self.w.finish(out)
    }

    /// Puts ENV in gateway reset mode with its sign-in in a Secrets Manager secret, signs the
    /// simulated user in (`relink auth login ENV --for gateway`) and pushes the entry: the
    /// secret's ARN.
    pub async fn sign_in_for_gateway(&self) -> String {
        let arn = local_secret("relink-test/signin", "not signed in yet").await;
        let text = std::fs::read_to_string(&self.w.config).unwrap();
        let header = format!("[environments.{}]\n", super::ENV);
        let reset = super::gateway_reset("")
            .replace("{sim}", self.w.sim.base_url())
            .replace(
                "file = \"{dir}/gateway.token\"",
                &format!("secret_arn = \"{arn}\""),
            );
        std::fs::write(
            &self.w.config,
            text.replace(&header, &format!("{header}{reset}\n")),
        )
        .unwrap();
        let login = self
            .relink(&["auth", "login", super::ENV, "--for", "gateway"])
            .await;
        assert_eq!(login.code, 0, "{login:?}");
        let push = self.relink(&["env", "push", super::ENV]).await;
        assert_eq!(push.code, 0, "{push:?}");
        arn
    }

    /// The current value of a secret on the local stack.
    pub async fn secret_value(&self, arn: &str) -> String {
        let config = relink_aws::sdk_config().await;
        aws_sdk_secretsmanager::Client::new(&config)
            .get_secret_value()
            .secret_id(arn)
            .send()
            .await
            .unwrap()
            .secret_string()
            .unwrap()
            .to_string()
    }

    /// A queue subscribed to the notices topic, as a customer's integration would be: its URL.
    pub async fn subscribe_notices(&self) -> String {
        let name = format!("{}notices-sub", self.prefix);
        let url = self
            .sqs
            .create_queue()
            .queue_name(&name)
            .send()
            .await
            .unwrap()
            .queue_url()
            .unwrap()
            .to_string();
        let arn = self
            .sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes()
            .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
            .clone();
        self.sns
            .subscribe()
            .topic_arn(&self.topic)
            .protocol("sqs")
            .endpoint(arn)
            .send()
            .await
            .unwrap();
        url
    }

    /// Every SNS envelope (`Subject`, `Message`, `MessageAttributes`) in a subscribed queue so
    /// far, taken off it.
    pub async fn take_notices(&self, url: &str) -> Vec<serde_json::Value> {
        let mut all = Vec::new();
        loop {
            let got = self
                .sqs
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(10)
                .wait_time_seconds(1)
                .send()
                .await
                .unwrap();
            let messages = got.messages();
            if messages.is_empty() {
                return all;
            }
            for m in messages {
                all.push(serde_json::from_str(m.body().unwrap()).unwrap());
                self.sqs
                    .delete_message()
                    .queue_url(url)
                    .receipt_handle(m.receipt_handle().unwrap())
                    .send()
                    .await
                    .unwrap();
            }
        }
    }

    pub async fn queue_url(&self, name: &str) -> String {
        self.sqs
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .unwrap()
            .queue_url()
            .unwrap()
            .to_string()
    }

    /// What `aws sqs send-message --message-body BODY` does.
    pub async fn send_raw(&self, stage: Stage, body: &str) {
        let url = self
            .queue_url(&format!("{}{}", self.prefix, stage.as_str()))
            .await;
        self.sqs
            .send_message()
            .queue_url(url)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }

    /// Messages in a queue, visible or in flight.
    pub async fn depth(&self, name: &str) -> usize {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let url = self.queue_url(name).await;
        let out = self
            .sqs
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(A::ApproximateNumberOfMessages)
            .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .unwrap();
        let attrs = out.attributes().unwrap();
        let n = |a: A| {
            attrs
                .get(&a)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0)
        };
        n(A::ApproximateNumberOfMessages) + n(A::ApproximateNumberOfMessagesNotVisible)
    }

    /// Every stage queue and dead-letter queue is empty.
    pub async fn assert_queues_empty(&self) {
        for stage in Stage::ALL {
            for name in [
                format!("{}{}", self.prefix, stage.as_str()),
                format!("{}{}-dlq", self.prefix, stage.as_str()),
            ] {
                assert_eq!(self.depth(&name).await, 0, "{name} is not empty");
            }
        }
    }

    /// `relink inject ENV --json`: the run id.
    pub async fn inject(&self, env: &str) -> String {
        let out = self.relink(&["inject", env, "--json"]).await;
        assert_eq!(out.code, 0, "{out:?}");
        out.json()["run_id"].as_str().unwrap().to_string()
    }

    /// A stage function's wiring against this world, as `FunctionDeps::from_env` builds it in
    /// Lambda (table registry, Secrets Manager, SQS, leases only: this test process is "another
    /// host"), for tests that play the function in-process.
    /// A detect-mismatch delivery of run `run_id`, as Lambda hands one to the function.
    pub fn detect_delivery(
        run_id: &str,
    ) -> lambda_runtime::LambdaEvent<aws_lambda_events::event::sqs::SqsEvent> {
        Self::delivery(Stage::DetectMismatch, run_id)
    }

    /// A delivery of `stage` for run `run_id` of ENV, as Lambda hands one to the function.
    pub fn delivery(
        stage: Stage,
        run_id: &str,
    ) -> lambda_runtime::LambdaEvent<aws_lambda_events::event::sqs::SqsEvent> {
        Self::delivery_of(format!(
            r#"{{"environment_id":"{}","run_id":"{run_id}","stage":"{}"}}"#,
            super::ENV,
            stage.as_str()
        ))
    }

    /// A delivery of one message with this body, as Lambda hands it to a function.
    pub fn delivery_of(
        body: String,
    ) -> lambda_runtime::LambdaEvent<aws_lambda_events::event::sqs::SqsEvent> {
        use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
        let mut record = SqsMessage::default();
        record.message_id = Some(ulid::Ulid::new().to_string());
        record.body = Some(body);
        let mut event = SqsEvent::default();
        event.records = vec![record];
        lambda_runtime::LambdaEvent::new(event, lambda_runtime::Context::default())
    }

    /// The one message waiting on `stage`'s queue, taken off it (the event a stage sent).
    pub async fn take_event(&self, stage: Stage) -> relink_core::event::StageEvent {
        let url = self
            .queue_url(&format!("{}{}", self.prefix, stage.as_str()))
            .await;
        let out = self
            .sqs
            .receive_message()
            .queue_url(&url)
            .wait_time_seconds(2)
            .send()
            .await
            .unwrap();
        let message = out.messages.unwrap_or_default().pop().expect("a message");
        self.sqs
            .delete_message()
            .queue_url(&url)
            .receipt_handle(message.receipt_handle().unwrap())
            .send()
            .await
            .unwrap();
        relink_core::event::StageEvent::parse(message.body().unwrap()).unwrap()
    }

    pub async fn function_deps(
        &self,
        stage: Stage,
        lease: Duration,
    ) -> relink_aws::lambda::FunctionDeps {
        use relink_core::progress::TracingSink;
        use relink_dynamics::{Http, HttpConnector, RetryPolicy};
        use std::sync::Arc;

        let config = relink_aws::sdk_config().await;
        let store = self.store().await;
        let mut urls = std::collections::HashMap::new();
        for s in Stage::ALL {
            urls.insert(
                s,
                self.queue_url(&format!("{}{}", self.prefix, s.as_str()))
                    .await,
            );
        }
        let http = Arc::new(Http::new(RetryPolicy::default(), Arc::new(TracingSink)).unwrap());
        relink_aws::lambda::FunctionDeps {
            stage,
            store: Arc::new(store.clone()),
            queue: Arc::new(relink_aws::sqs::SqsQueue::new(self.sqs.clone(), urls)),
            connector: Arc::new(HttpConnector::new(
                http,
                Arc::new(relink_aws::secrets::SecretResolver::new(&config)),
            )),
            registry: Arc::new(relink_aws::registry::TableRegistry::new(store)),
            reset: Arc::new(relink_core::stages::ManualReset),
            sink: Arc::new(TracingSink),
            liveness: Arc::new(relink_core::ports::LeasesOnly),
            owner_prefix: "lambda".into(),
            lease,
            handover_grace: relink_aws::lambda::HANDOVER_GRACE,
            max_wait: relink_aws::lambda::MAX_BACKOFF,
            time_boxed: true,
            metrics: Arc::new(relink_aws::metrics::Off),
            throttles: Arc::default(),
        }
    }

    /// The error of every message recorded as rejected (`relink status --rejected`).
    pub async fn rejected_errors(&self) -> Vec<String> {
        self.status_json(&["--rejected"])
            .await
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["error"].as_str().unwrap().to_string())
            .collect()
    }

    /// Writes `entry` straight into the table as environment `id` (skipping `env push`'s
    /// checks), sends a detect event for it and one for the world's own environment, and drains
    /// the queues with a worker. Returns the world environment's run.
    pub async fn event_for_table_entry(&self, id: &str, entry: &serde_json::Value) -> String {
        self.store().await.put_entry(id, entry).await.unwrap();
        self.send_raw(
            Stage::DetectMismatch,
            &format!(r#"{{"environment_id":"{id}"}}"#),
        )
        .await;
        let run_id = self.inject(super::ENV).await;
        let worker = self.drain(&[]).await;
        assert_eq!(worker.code, 0, "{worker:?}");
        run_id
    }

    /// The table, through the store the functions use.
    pub async fn store(&self) -> relink_aws::dynamo::DynamoStore {
        let config = relink_aws::sdk_config().await;
        relink_aws::dynamo::DynamoStore::new(aws_sdk_dynamodb::Client::new(&config), &self.table)
    }

    /// Messages left in every stage queue and dead-letter queue.
    pub async fn queued(&self) -> usize {
        let mut n = 0;
        for stage in Stage::ALL {
            n += self
                .depth(&format!("{}{}", self.prefix, stage.as_str()))
                .await;
            n += self
                .depth(&format!("{}{}-dlq", self.prefix, stage.as_str()))
                .await;
        }
        n
    }

    pub async fn status_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["status", "--json"];
        all.extend_from_slice(args);
        let out = self.relink(&all).await;
        assert_eq!(out.code, 0, "{out:?}");
        out.json()
    }
}
