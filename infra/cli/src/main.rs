//! `relink`: the operator CLI. `run` executes the whole pipeline in this process with the
//! embedded store (SQLite) and an in-process queue; `confirm`, `status`, `sim` and `demo`
//! complete it. Results go to stdout, progress and logs to stderr.

mod auth;
mod aws_mode;
mod demo;
mod display;
mod embedded;
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use relink_core::Error;
use relink_core::model::{Run, RunOptions, RunStatus, Stage};
use relink_core::notice::NoticeKind;

/// Exit codes (docs/architecture.md): 0 succeeded or skipped, 1 failed, 2 usage or configuration
/// error, 3 awaiting confirmation, 4 refused by a guard.
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const AWAITING: u8 = 3;
    pub const REFUSED: u8 = 4;
}

#[derive(Parser)]
#[command(
    name = "relink",
    version,
    about = "Relink Dynamics 365 dual-write after an F&O environment is restored, refreshed or copied"
)]
struct Cli {
    /// The registry of environments.
    #[arg(
        long,
        global = true,
        default_value = "./relink.toml",
        env = "RELINK_CONFIG"
    )]
    config: PathBuf,
    /// The embedded progress store (SQLite file).
    #[arg(
        long,
        global = true,
        default_value = "./relink.db",
        env = "RELINK_STORE"
    )]
    store: PathBuf,
    /// Log lines as JSON (for pipelines); the level comes from RELINK_LOG (default warn).
    #[arg(long, global = true)]
    log_json: bool,
    /// AWS mode: the DynamoDB table holding progress and the registry (as deployed by template.yaml).
    #[arg(long, global = true, env = "RELINK_TABLE")]
    table: Option<String>,
    /// AWS mode: queue names are PREFIX{stage} (and PREFIX{stage}-dlq).
    #[arg(
        long,
        global = true,
        env = "RELINK_QUEUE_PREFIX",
        default_value = "relink-"
    )]
    queue_prefix: String,
    /// AWS mode: the SNS topic that entries with `notify = { sns = true }` publish to (the
    /// template's NoticesTopic; `relink local-stack create` prints the local one).
    #[arg(long, global = true, env = "NOTICE_TOPIC_ARN")]
    notice_topic: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Relink an environment: detect, purge F&O keys, clear Dataverse configs, reset (manual gate).
    /// Resumes the environment's unfinished run if there is one.
    Run {
        /// The environment (a key of relink.toml). Omit when --event is given.
        env: Option<String>,
        /// Take a v1 queue event (JSON) from this file, or `-` for stdin, instead of ENV and flags.
        #[arg(long, conflicts_with_all = ["env", "dry_run", "force", "from_stage"])]
        event: Option<PathBuf>,
        /// Walk every stage and report what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Go on even when detection finds the link already clean.
        #[arg(long)]
        force: bool,
        /// Start a new run at this stage (earlier stages are recorded as skipped; the guards still run).
        #[arg(long, value_name = "STAGE")]
        from_stage: Option<String>,
        /// At the manual gate, keep checking the link (every verify.every_seconds of the entry)
        /// until the Reset is seen and the run succeeds, or the give-up time ends it; Ctrl-C stops
        /// waiting and leaves the run awaiting.
        #[arg(long)]
        wait: bool,
        /// Print the final run as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Confirm that the link was reset by hand; relink verifies it and finishes the run.
    Confirm {
        run_id: String,
        /// When the link is not reset yet, keep checking as `relink run --wait` does (embedded
        /// mode; in AWS the functions check on the watcher's schedule by themselves).
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// The evidence of one run: stages and attempts, guards, rows per table, the Reset, notices,
    /// where the archive is (the table in AWS mode).
    Report {
        run_id: String,
        /// `md` (Markdown, for a change record) or `json`.
        #[arg(long, default_value = "md", value_parser = ["md", "json"])]
        format: String,
    },
    /// Show runs: the environment's latest, one run, or recent runs (the table in AWS mode).
    Status {
        env: Option<String>,
        #[arg(long = "run", value_name = "RUN_ID")]
        run_id: Option<String>,
        #[arg(long)]
        json: bool,
        /// How many recent runs to list.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// List rejected (poison) messages instead of runs.
        #[arg(long, conflicts_with_all = ["env", "run_id"])]
        rejected: bool,
        /// One line per registered environment (the registry file, or the table in AWS mode):
        /// latest run, status, age, awaiting since; what needs a person first.
        #[arg(long, conflicts_with_all = ["env", "run_id", "rejected"])]
        all: bool,
    },
    /// AWS mode: poll the stage queues like Lambda's SQS event source and run the stage handlers.
    Worker {
        /// Messages per batch (1-10).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(i32).range(1..=10))]
        batch_size: i32,
        /// Long-polling wait in seconds (0-20).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=20))]
        wait_secs: u64,
        /// Visibility timeout of received messages in seconds (the handler's deadline).
        #[arg(long, default_value_t = 900)]
        visibility_secs: u64,
        /// Exit once every queue has been empty this many seconds.
        #[arg(long)]
        idle_exit_secs: Option<u64>,
        /// Hand every batch to the handler twice, concurrently (an at-least-once delivery drill).
        #[arg(long)]
        deliver_twice: bool,
        /// Long stages hand over to a new delivery before the visibility timeout runs out, as
        /// in Lambda before the function's deadline (off: a local worker runs stages to the end).
        #[arg(long)]
        time_box: bool,
    },
    /// AWS mode: send an event to a stage queue (a rerun, or a run started by hand).
    Inject {
        env: String,
        #[arg(long, default_value = "detect-mismatch")]
        stage: String,
        /// The existing run to rerun a stage of (required for stages after detect-mismatch).
        #[arg(long = "run", value_name = "RUN_ID")]
        run_id: Option<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// AWS mode: one poll of the watcher: a run per new restore (LCS history, Power Platform
    /// operations), the checks of awaited Resets that are due, and the due drift probes.
    Watch {
        #[arg(long)]
        json: bool,
    },
    /// Embedded mode: start and run the drift probes that are due (entries with `probe`), for a
    /// timer every few minutes; in AWS mode the watcher's schedule does it (relink watch).
    Probe {
        #[arg(long)]
        json: bool,
    },
    /// AWS mode: registry entries in the table.
    #[command(subcommand)]
    Env(EnvCommand),
    /// A user's sign-in kept for relink (device code: no password, no browser automation).
    #[command(subcommand)]
    Auth(AuthCommand),
    /// AWS mode: create the table and queues like template.yaml does, on a local stack (moto).
    #[command(subcommand, name = "local-stack")]
    LocalStack(LocalStackCommand),
    /// Serve the Entra ID, Dataverse and F&O simulators on 127.0.0.1 until interrupted.
    Sim {
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Seed file (JSON, see `relink_sim::Seed`).
        #[arg(long)]
        seed: Option<PathBuf>,
        /// Faults file (JSON, see `relink_sim::Faults`).
        #[arg(long)]
        faults: Option<PathBuf>,
    },
    /// Start the simulators, seed a restored environment linked to the wrong organisation and
    /// relink it end to end, explaining each step.
    Demo {
        /// Keep the demo's registry and store (printed) instead of deleting them.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Sign a user in once (a code to enter at a URL) and keep the refresh token where the
    /// entry says: `reset.token` (--for gateway) or `watch.lcs_sign_in` (--for lcs). In AWS mode
    /// (--table) it goes into the Secrets Manager secret the entry names.
    Login {
        env: String,
        #[arg(long = "for", value_enum)]
        target: auth::Target,
    },
}

#[derive(Subcommand)]
enum EnvCommand {
    /// Store the [environments.ENV] entries of --config in the table (secrets as ARNs).
    Push {
        #[arg(required = true, value_name = "ENV")]
        envs: Vec<String>,
        /// Accept `client_secret = { env = ... }` (local stacks only: the functions would need the variable).
        #[arg(long)]
        allow_env_secret: bool,
    },
    /// List the entries stored in the table.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum LocalStackCommand {
    /// Create the table (PK/SK, gsi1, TTL) and each stage's queue and dead-letter queue.
    Create {
        /// Visibility timeout of the stage queues (default: six times each function's timeout).
        #[arg(long)]
        visibility_secs: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_json);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(dispatch(cli));
    ExitCode::from(code)
}

fn init_logs(json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("RELINK_LOG").unwrap_or_else(|_| "warn".into());
    // Colour codes only for a terminal: a file, a pipe or CloudWatch gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

async fn dispatch(cli: Cli) -> u8 {
    let aws_args = cli.table.clone().map(|table| aws_mode::AwsArgs {
        table,
        queue_prefix: cli.queue_prefix.clone(),
        notice_topic: cli.notice_topic.clone(),
    });
    let result = match cli.command {
        Command::Run { env, event, dry_run, force, from_stage, wait, json } => {
            let req = embedded::RunRequest { env, event, dry_run, force, from_stage, wait };
            embedded::run(&cli.config, &cli.store, req).await.map(|run| report(&run, json))
        }
        Command::Probe { json } if aws_args.is_none() => {
            embedded::probe(&cli.config, &cli.store).await.map(|runs| {
                if json {
                    let all: Vec<_> = runs.iter().map(display::run_json).collect();
                    println!("{}", serde_json::to_string_pretty(&all).expect("json"));
                } else if runs.is_empty() {
                    println!("no drift probe is due");
                }
                let mut code = exit::OK;
                for run in &runs {
                    if !json {
                        let drift = NoticeKind::for_run(run) == Some(NoticeKind::Drift);
                        println!(
                            "{}: probe run {} {}{}",
                            run.environment_id,
                            run.run_id,
                            run.status,
                            if drift { " (drift found; notified, nothing deleted)" } else { "" }
                        );
                    }
                    if matches!(run.status, RunStatus::Failed | RunStatus::Refused) {
                        code = exit::FAILED;
                    }
                }
                code
            })
        }
        Command::Auth(AuthCommand::Login { env, target }) => {
            let secrets: Arc<dyn relink_core::ports::SecretStore> = match &aws_args {
                Some(a) => Arc::new(relink_aws::secrets::SecretResolver::new(
                    &aws_mode::Aws::connect(a).await.config,
                )),
                None => Arc::new(relink_embedded::EnvSecrets),
            };
            auth::login(&cli.config, &env, target, secrets).await
        }
        Command::Report { run_id, format } => {
            let built = match &aws_args {
                Some(a) => {
                    let aws = aws_mode::Aws::connect(a).await;
                    let at = format!(
                        "DynamoDB table {}, the items whose sort key starts with ARCHIVE#{run_id}#",
                        aws.store.table()
                    );
                    report::build(&aws.store, &run_id, &at).await
                }
                None => match embedded::open_store_for_status(&cli.store) {
                    Ok(store) => {
                        let at = format!("SQLite store {}, table archive, run_id {run_id}", cli.store.display());
                        report::build(&store, &run_id, &at).await
                    }
                    Err(e) => Err(e),
                },
            };
            built.map(|r| {
                if format == "json" {
                    println!("{}", serde_json::to_string_pretty(&r).expect("json"));
                } else {
                    print!("{}", report::markdown(&r));
                }
                exit::OK
            })
        }
        Command::Confirm { run_id, wait, json } => {
            let run = match &aws_args {
                Some(_) if wait => Err(relink_core::Error::Config(
                    "--wait is for embedded mode: in AWS, relink checks an awaited Reset by itself on the watcher's schedule (relink status shows the checks)".into(),
                )),
                Some(a) => aws_mode::Aws::connect(a).await.confirm(&run_id, Arc::new(display::Display::new())).await,
                None => embedded::confirm(&cli.config, &cli.store, &run_id, wait).await,
            };
            run.map(|run| report(&run, json))
        }
        Command::Status { env, run_id, json, limit, rejected, all } => {
            let mut query = embedded::StatusQuery { env: env.as_deref(), run_id: run_id.as_deref(), json, limit, rejected, all: None };
            match &aws_args {
                Some(a) => {
                    let aws = aws_mode::Aws::connect(a).await;
                    match all.then(|| aws.environment_ids()) {
                        Some(ids) => match ids.await {
                            Ok(ids) => {
                                query.all = Some(ids);
                                embedded::status(&aws.store, query).await
                            }
                            Err(e) => Err(e),
                        },
                        None => embedded::status(&aws.store, query).await,
                    }
                }
                None => {
                    let ids = if all { embedded::registry_ids(&cli.config).map(Some) } else { Ok(None) };
                    // Nothing has run yet: every environment is listed without a run.
                    let store = match (&ids, cli.store.exists()) {
                        (Ok(Some(_)), false) => relink_embedded::SqliteStore::in_memory(),
                        _ => embedded::open_store_for_status(&cli.store),
                    };
                    match (ids, store) {
                        (Ok(ids), Ok(store)) => {
                            query.all = ids;
                            embedded::status(&store, query).await
                        }
                        (Err(e), _) | (_, Err(e)) => Err(e),
                    }
                }
            }
        }
        Command::Sim { port, seed, faults } => demo::serve(port, seed, faults).await,
        Command::Demo { keep } => demo::run(keep).await,
        aws_command => match &aws_args {
            Some(a) => aws_dispatch(aws_mode::Aws::connect(a).await, aws_command, &cli.config).await,
            None => Err(Error::Config(
                "this command needs AWS mode: pass --table (or set RELINK_TABLE) and, unless it is relink-, --queue-prefix".into(),
            )),
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", crate::display::printable(&e.to_string()));
            error_code(&e)
        }
    }
}

async fn aws_dispatch(
    aws: aws_mode::Aws,
    command: Command,
    config: &std::path::Path,
) -> relink_core::Result<u8> {
    match command {
        Command::Worker {
            batch_size,
            wait_secs,
            visibility_secs,
            idle_exit_secs,
            deliver_twice,
            time_box,
        } => {
            let opts = aws_mode::WorkerOpts {
                batch_size,
                wait: Duration::from_secs(wait_secs),
                visibility: Duration::from_secs(visibility_secs.max(1)),
                idle_exit: idle_exit_secs.map(Duration::from_secs),
                deliver_twice,
                time_box,
            };
            aws.worker(opts).await
        }
        Command::Inject {
            env,
            stage,
            run_id,
            dry_run,
            force,
            json,
        } => {
            aws.inject(
                &env,
                Stage::parse(&stage)?,
                run_id,
                RunOptions { dry_run, force },
                json,
            )
            .await
        }
        Command::Env(EnvCommand::Push {
            envs,
            allow_env_secret,
        }) => aws.env_push(config, &envs, allow_env_secret).await,
        Command::Env(EnvCommand::List { json }) => aws.env_list(json).await,
        Command::Watch { json } => aws.watch(json).await,
        Command::Probe { .. } => Err(Error::Config(
            "relink probe is for embedded mode; in AWS mode the watcher's schedule starts the drift probes (relink watch polls once)".into(),
        )),
        Command::LocalStack(LocalStackCommand::Create { visibility_secs }) => {
            aws.create_stack(visibility_secs.map(Duration::from_secs))
                .await
        }
        _ => unreachable!("embedded commands are dispatched before"),
    }
}

/// The exit code for an error that stopped a command before a run recorded it.
pub fn error_code(e: &Error) -> u8 {
    match e {
        Error::BadEvent(_)
        | Error::Config(_)
        | Error::UnknownEnvironment(_)
        | Error::RunNotFound(_)
        | Error::InvalidState(_) => exit::USAGE,
        Error::Refused(_) => exit::REFUSED,
        _ => exit::FAILED,
    }
}

/// The exit code of a run's status.
pub fn status_code(status: RunStatus) -> u8 {
    match status {
        RunStatus::Succeeded | RunStatus::Skipped => exit::OK,
        RunStatus::AwaitingConfirmation => exit::AWAITING,
        RunStatus::Refused => exit::REFUSED,
        RunStatus::Failed | RunStatus::Pending | RunStatus::Running => exit::FAILED,
    }
}

/// Prints a run's result on stdout and returns its exit code.
fn report(run: &Run, json: bool) -> u8 {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&display::run_json(run)).expect("json")
        );
    } else {
        print!("{}", display::run_text(run));
    }
    status_code(run.status)
}
