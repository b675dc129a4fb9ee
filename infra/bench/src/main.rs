//! `relink-bench`: measures relink against the simulators and writes docs/BENCHMARKS.md.
//!
//! `cargo run --release -p relink-bench -- all` measures everything in docs/BENCHMARKS.md (binary
//! size, cold start, clearing rows under the service protection limits, pipeline overhead);
//! `limits` only the clearing. Clearing runs in child processes so each has its own peak RSS:
//! relink's clear stage (paged reads, archive, paced `$batch` deletes) and a naive loop of one
//! `DELETE` per row.
//!
//! `cargo run -p relink-bench -- reliability [--check]` writes (or checks) docs/RELIABILITY.md
//! from the reliability suite's reports.

mod coldstart;
mod first_event;
mod limits;
mod pipeline;
mod reliability;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use relink_core::model::{Run, RunOptions, Trigger};
use relink_core::ports::{Connector, TokenSource};
use relink_core::progress::{Progress, ProgressSink};
use relink_core::registry::{EnvConfig, Registry, Secret};
use relink_core::stages::{self, ManualReset, StageCtx};
use relink_dynamics::token::{ClientSecret, EntraTokens};
use relink_dynamics::{Http, HttpConnector, RetryPolicy};
use relink_embedded::SqliteStore;
use relink_sim::{AppSeed, OrgSeed, Seed, Sim};
use serde::{Deserialize, Serialize};

const CLIENT: &str = "33333333-3333-3333-3333-333333333333";
const SECRET: &str = "bench-secret";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every benchmark of docs/BENCHMARKS.md in one run (see infra/scripts/bench.sh, which
    /// builds the binaries and starts the local stack first).
    All {
        /// Where cargo lambda put the bootstrap binaries.
        #[arg(long, default_value = "target/lambda")]
        lambda_dir: PathBuf,
        /// Cold starts per binary.
        #[arg(long, default_value_t = 20)]
        cold_runs: usize,
        /// Environments relinked at once in the fan-out measurement.
        #[arg(long, default_value_t = 200)]
        fan_out: usize,
        #[arg(long, default_value = "docs/BENCHMARKS.md")]
        out: PathBuf,
    },
    /// Only the clearing-under-the-limits measurement (10k, 50k, 100k rows and the naive loop).
    Limits {
        #[arg(long, default_value = "docs/BENCHMARKS.md")]
        out: PathBuf,
    },
    /// Only the cold starts (x86_64 binaries built by infra/scripts/build-functions.sh).
    Cold(ColdArgs),
    /// Only the cold first event of each stage function per start-up shape (x86_64 binaries
    /// built by infra/scripts/build-functions.sh; needs the local stack at AWS_ENDPOINT_URL).
    FirstEvent(ColdArgs),
    /// Only the pipeline overhead (needs the local stack at AWS_ENDPOINT_URL).
    Pipeline {
        #[arg(long, default_value_t = 200)]
        fan_out: usize,
        #[arg(long, default_value = "docs/BENCHMARKS.md")]
        out: PathBuf,
    },
    /// Write docs/RELIABILITY.md from the reliability suite's reports (or check it matches them).
    Reliability {
        /// Where the suite wrote its reports.
        #[arg(long, default_value = "target/reliability")]
        reports: PathBuf,
        #[arg(long, default_value = "docs/RELIABILITY.md")]
        out: PathBuf,
        /// Fail if the page differs from the reports instead of writing it.
        #[arg(long)]
        check: bool,
    },
    /// (internal) One measured client run, in its own process.
    Child {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        base: String,
        #[arg(long)]
        rows: usize,
        #[arg(long)]
        dir: PathBuf,
    },
}

/// Where the Lambda binaries are, how often to start each, where to write.
#[derive(clap::Args)]
struct ColdArgs {
    #[arg(long, default_value = "target/lambda")]
    lambda_dir: PathBuf,
    #[arg(long, default_value_t = 20)]
    runs: usize,
    #[arg(long, default_value = "docs/BENCHMARKS.md")]
    out: PathBuf,
}

/// What one child measured.
#[derive(Debug, Serialize, Deserialize)]
struct Figures {
    mode: String,
    rows_deleted: usize,
    seconds: f64,
    peak_rss_kb: u64,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Cmd::Reliability {
        reports,
        out,
        check,
    } = &cli.command
    {
        return reliability::run(reports, out, *check);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::All {
            lambda_dir,
            cold_runs,
            fan_out,
            out,
        } => rt.block_on(all(&lambda_dir, cold_runs, fan_out, &out)),
        Cmd::Limits { out } => rt.block_on(async {
            let body = limits::run().await?;
            write_section(&out, "limits", &body)?;
            println!("{body}");
            Ok(())
        }),
        Cmd::Cold(ColdArgs {
            lambda_dir,
            runs,
            out,
        }) => rt.block_on(async {
            let body = cold_section(&lambda_dir, runs).await?;
            write_section(&out, "cold", &body)?;
            println!("{body}");
            Ok(())
        }),
        Cmd::FirstEvent(ColdArgs {
            lambda_dir,
            runs,
            out,
        }) => rt.block_on(async {
            let body = first_event::run(&lambda_dir, runs).await?;
            write_section(&out, "first-event", &body)?;
            println!("{body}");
            Ok(())
        }),
        Cmd::Pipeline { fan_out, out } => rt.block_on(async {
            let body = pipeline::run(fan_out).await?;
            write_section(&out, "pipeline", &body)?;
            println!("{body}");
            Ok(())
        }),
        Cmd::Child {
            mode,
            base,
            rows,
            dir,
        } => {
            let f = rt.block_on(child(&mode, &base, rows, &dir))?;
            println!("{}", serde_json::to_string(&f)?);
            Ok(())
        }
        Cmd::Reliability { .. } => unreachable!("handled above"),
    }
}

fn registry(base: &str) -> Result<Registry> {
    let text = format!(
        "[environments.bench]\nkind = \"sandbox\"\nfno_url = \"{base}/fno/bench\"\ndataverse_url = \"{base}/dataverse/bench\"\n\
         dataverse_unique_name = \"orgbench\"\ntenant_id = \"bench\"\nclient_id = \"{CLIENT}\"\nclient_secret = {{ env = \"BENCH\" }}\n\
         authority = \"{base}\"\nallow_insecure_http = true\n\
         limits = {{ dataverse_concurrency = 16 }}\n"
    );
    Ok(Registry::parse(&text, |_| Some(SECRET.to_string()))?)
}

struct Quiet;
impl ProgressSink for Quiet {
    fn emit(&self, _: Progress) {}
}

async fn child(mode: &str, base: &str, rows: usize, dir: &Path) -> Result<Figures> {
    let registry = registry(base)?;
    let env = registry.get("bench")?.clone();
    let http = Arc::new(Http::new(RetryPolicy::default(), Arc::new(Quiet))?);
    let started = Instant::now();
    let deleted = match mode {
        "relink" => relink_clear(&env, http, dir).await?,
        "naive" => naive_clear(&env, http, rows).await?,
        other => bail!("unknown mode {other}"),
    };
    Ok(Figures {
        mode: mode.into(),
        rows_deleted: deleted,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_kb: peak_rss_kb(),
    })
}

/// relink's own path: the clear stage with archive-before-delete into a SQLite store.
async fn relink_clear(env: &EnvConfig, http: Arc<Http>, dir: &Path) -> Result<usize> {
    let connector = HttpConnector::new(http, Arc::new(relink_embedded::EnvSecrets));
    let dataverse = connector.dataverse(env)?;
    let fno = connector.fno(env)?;
    let store = SqliteStore::open(&dir.join("bench.db"))?;
    let run = Run::new(
        ulid::Ulid::new().to_string(),
        env.id.clone(),
        RunOptions::default(),
        Trigger::default(),
    );
    let ctx = StageCtx {
        env,
        run: &run,
        store: &store,
        dataverse: dataverse.as_ref(),
        fno: fno.as_ref(),
        reset: &ManualReset,
        gateway: None,
        sink: &Quiet,
        stop_at: None,
    };
    let report = stages::clear_configs(&ctx).await?;
    Ok(report.outcome["deleted"].as_u64().unwrap_or(0) as usize)
}

/// The naive loop: read ids, then one DELETE request per row, one after another.
async fn naive_clear(env: &EnvConfig, http: Arc<Http>, rows: usize) -> Result<usize> {
    let tokens = EntraTokens::new(
        http.clone(),
        &env.authority,
        &env.tenant_id,
        &env.client_id,
        ClientSecret::Known(Secret::new(SECRET)),
    );
    let scope = EnvConfig::scope_for(&env.dataverse_url);
    let token = tokens.token(&scope).await?;
    let api = env.dataverse_api();
    let client = reqwest::Client::new();
    let mut deleted = 0;
    while deleted < rows {
        let page: serde_json::Value = client
            .get(api.join("msdyn_dualwriteruntimeconfigs?$select=msdyn_dualwriteruntimeconfigid")?)
            .bearer_auth(&token)
            .header("Prefer", "odata.maxpagesize=5000")
            .send()
            .await?
            .json()
            .await?;
        let ids: Vec<String> = page["value"]
            .as_array()
            .context("value")?
            .iter()
            .filter_map(|r| {
                r["msdyn_dualwriteruntimeconfigid"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        if ids.is_empty() {
            break;
        }
        for id in ids.into_iter().take(rows - deleted) {
            loop {
                let resp = client
                    .delete(api.join(&format!("msdyn_dualwriteruntimeconfigs({id})"))?)
                    .bearer_auth(&token)
                    .send()
                    .await?;
                match resp.status().as_u16() {
                    204 => break,
                    // Even a naive loop must wait when told to.
                    429 => {
                        let wait = resp
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                            .unwrap_or(1);
                        tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
                    }
                    s => bail!("naive delete answered {s}"),
                }
            }
            deleted += 1;
        }
    }
    Ok(deleted)
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Measured {
    figures: Figures,
    requests: usize,
    batches: usize,
    page_reads: usize,
    throttled: usize,
}

async fn measure(sim: &Sim, mode: &str, rows: usize, dir: &Path) -> Result<Measured> {
    sim.seed(&Seed {
        apps: vec![AppSeed {
            client_id: CLIENT.into(),
            client_secret: SECRET.into(),
        }],
        organizations: vec![OrgSeed {
            name: "bench".into(),
            unique_name: "orgbench".into(),
            organization_id: None,
            friendly_name: None,
            integrated_fno: Some("bench".into()),
            runtime_configs: rows,
            platform: None,
        }],
        ..Seed::default()
    })
    .map_err(anyhow::Error::msg)?;
    let before = sim.snapshot();
    let exe = std::env::current_exe()?;
    let out = tokio::process::Command::new(exe)
        .args([
            "child",
            "--mode",
            mode,
            "--base",
            sim.base_url(),
            "--rows",
            &rows.to_string(),
            "--dir",
        ])
        .arg(dir)
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "{mode} child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let figures: Figures = serde_json::from_slice(&out.stdout)?;
    let after = sim.snapshot();
    let delta = |f: fn(&relink_sim::Snapshot) -> usize| f(&after) - f(&before);
    Ok(Measured {
        figures,
        requests: delta(|s| s.requests),
        batches: delta(|s| s.batch_requests.get("dataverse").copied().unwrap_or(0)),
        page_reads: delta(|s| s.page_reads.get("dataverse").copied().unwrap_or(0)),
        throttled: delta(|s| s.throttled),
    })
}

/// The functions, in template order, and the cold-start baseline.
const FUNCTIONS: [&str; 6] = [
    "detect-mismatch",
    "purge-keys",
    "clear-dataverse-configs",
    "reset-link",
    "ingest-notification",
    "watch-restores",
];
const HELLO: &str = "bench-hello";
const SIZE_TARGET_MB: f64 = 8.0;

/// Every benchmark, one report.
async fn all(lambda_dir: &Path, cold_runs: usize, fan_out: usize, out: &Path) -> Result<()> {
    let mut page = format!(
        "# Benchmarks\n\n\
         Generated by `bash infra/scripts/bench.sh`: it builds every Lambda function and the baselines (a hello-world `lambda_runtime` binary; `bench-sdk`, a minimal SDK Lambda) with \
         `cargo lambda build --release` (the workspace's release profile) for x86_64 and arm64, starts the local stack, then \
         runs `cargo run --profile measure -p relink-bench -- all`, which measures and writes this page. Every figure below comes from \
         that one run. Benchmarks measure; they do not assert.\n\n\
         Machine: {machine}. Run: {when}.\n\n",
        machine = machine(),
        when = jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M UTC"),
    );
    page.push_str(&size_section(lambda_dir)?);
    eprintln!("cold start: {cold_runs} runs per binary...");
    page.push_str(&cold_section(lambda_dir, cold_runs).await?);
    eprintln!("cold first event: {cold_runs} runs per function and start-up shape...");
    page.push_str(&first_event::run(lambda_dir, cold_runs).await?);
    page.push_str(&limits::run().await?);
    page.push('\n');
    page.push_str(&pipeline::run(fan_out).await?);
    std::fs::write(out, &page)?;
    println!("{page}");
    Ok(())
}

fn binary(lambda_dir: &Path, arch: &str, name: &str) -> PathBuf {
    lambda_dir.join(arch).join(name).join("bootstrap")
}

fn size_section(lambda_dir: &Path) -> Result<String> {
    let mut rows = String::new();
    // The largest function per architecture: x86_64, arm64.
    let mut worst = [0.0f64; 2];
    for name in FUNCTIONS.iter().chain([&HELLO]) {
        let mut cells = Vec::new();
        for (i, arch) in ["x86_64", "arm64"].into_iter().enumerate() {
            let path = binary(lambda_dir, arch, name);
            let bytes = std::fs::metadata(&path)
                .with_context(|| {
                    format!(
                        "{}: build it first (infra/scripts/bench.sh)",
                        path.display()
                    )
                })?
                .len();
            let mb = bytes as f64 / 1_000_000.0;
            if *name != HELLO {
                worst[i] = worst[i].max(mb);
            }
            cells.push(format!("{mb:.2} MB"));
        }
        rows.push_str(&format!("| {name} | {} | {} |\n", cells[0], cells[1]));
    }
    Ok(format!(
        "## Binary size\n\n\
         Stripped release binaries (`bootstrap`). Target: at most {SIZE_TARGET_MB} MB each on arm64, the architecture \
         the template deploys. Largest function: **{arm:.2} MB** on arm64 ({x86:.2} MB on x86_64).\n\n\
         | binary | x86_64 | arm64 |\n| --- | ---: | ---: |\n{rows}\n",
        x86 = worst[0],
        arm = worst[1],
    ))
}

async fn cold_section(lambda_dir: &Path, runs: usize) -> Result<String> {
    let arch = if cfg!(target_arch = "aarch64") {
        "arm64"
    } else {
        "x86_64"
    };
    let mut binaries = vec![(HELLO.to_string(), binary(lambda_dir, arch, HELLO))];
    for name in FUNCTIONS {
        binaries.push((name.to_string(), binary(lambda_dir, arch, name)));
    }
    let endpoint =
        std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:9".into());
    let env: Vec<(String, String)> = [
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("RELINK_TABLE", "relink-bench-cold"),
        ("NEXT_QUEUE_URL", "http://127.0.0.1:9/000000000000/next"),
        ("DETECT_QUEUE_URL", "http://127.0.0.1:9/000000000000/detect"),
        ("RESET_QUEUE_URL", "http://127.0.0.1:9/000000000000/reset"),
        (
            "NOTIFY_SECRET_ARN",
            "arn:aws:secretsmanager:us-east-1:000000000000:secret:relink-notify",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let measured = coldstart::measure(&binaries, runs, &env).await?;
    let hello = measured[0].median();
    let ratio = |m: &coldstart::ColdStart| m.median().as_secs_f64() / hello.as_secs_f64();
    let mut rows = String::new();
    let mut worst: f64 = 0.0;
    for m in &measured {
        if m.name != HELLO {
            worst = worst.max(ratio(m));
        }
        let path = binary(lambda_dir, arch, &m.name);
        rows.push_str(&format!(
            "| {} | {:.2} ms | {:.2} ms | {:.2}x | {} |\n",
            m.name,
            m.median().as_secs_f64() * 1000.0,
            m.p90().as_secs_f64() * 1000.0,
            ratio(m),
            relocations(&path).map_or("?".into(), |n| n.to_string()),
        ));
    }
    Ok(format!(
        "## Cold start: time to the first poll (secondary)\n\n\
         Time from spawning the {arch} `bootstrap` to its first `GET /2018-06-01/runtime/invocation/next` on a minimal Lambda \
         Runtime API endpoint that relink-bench serves on 127.0.0.1; {runs} runs per binary, interleaved, with the environment \
         the template gives the functions. The functions build their SDK configuration and clients in `main`, before the first \
         poll, so this is their init time against a hello-world `lambda_runtime` binary; what a cold start costs an event is \
         the section \"Cold first event\". Worst function: **{worst:.2}x** the hello-world binary. The last column counts the \
         dynamic relocations the loader applies before `main` (PIE is kept: a non-PIE build would give up address-space \
         randomisation of the code).\n\n\
         | binary | median | p90 | median / hello-world | dynamic relocations |\n| --- | ---: | ---: | ---: | ---: |\n{rows}\n"
    ))
}

/// Dynamic relocations of an ELF binary (`.rela.dyn` entries), which the loader applies at start.
fn relocations(path: &Path) -> Option<u64> {
    let elf = std::fs::read(path).ok()?;
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let (shoff, shentsize) = (u64_at(0x28)? as usize, u16_at(0x3a)? as usize);
    let (shnum, shstrndx) = (u16_at(0x3c)? as usize, u16_at(0x3e)? as usize);
    let section = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(section(shstrndx) + 0x18)? as usize;
    (0..shnum).find_map(|i| {
        let name =
            u32::from_le_bytes(elf.get(section(i)..section(i) + 4)?.try_into().ok()?) as usize;
        let tail = elf.get(strtab + name..)?;
        let name = &tail[..tail.iter().position(|b| *b == 0)?];
        (name == b".rela.dyn").then(|| Some(u64_at(section(i) + 0x20)? / 24))?
    })
}

/// Replaces (or appends) one generated section of the report, keeping the others.
fn write_section(path: &Path, name: &str, body: &str) -> Result<()> {
    let begin = format!("<!-- bench:{name}:begin -->");
    let end = format!("<!-- bench:{name}:end -->");
    let current = std::fs::read_to_string(path).unwrap_or_else(|_| {
        "# Benchmarks\n\nGenerated by `relink-bench` (infra/bench); every figure comes from one run of the command shown with it. \
         Benchmarks are not tests: they measure, they do not assert.\n"
            .into()
    });
    let block = format!("{begin}\n{body}{end}\n");
    let next = match (current.find(&begin), current.find(&end)) {
        (Some(b), Some(e)) => format!(
            "{}{block}{}",
            &current[..b],
            current[e + end.len()..].trim_start_matches('\n')
        ),
        _ => format!("{}\n{block}", current.trim_end()),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, next)?;
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("{cores} cores, {cpu}")
}
