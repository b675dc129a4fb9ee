//! Cold start: time from spawning a Lambda bootstrap binary to its first request to the Lambda
//! Runtime API (`GET /2018-06-01/runtime/invocation/next`), served here by a minimal runtime API
//! endpoint on 127.0.0.1. Each function is compared with a hello-world `lambda_runtime` binary
//! built with the same profile in the same run; runs are interleaved so noise hits all alike.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

/// One binary's start-up times.
pub struct ColdStart {
    pub name: String,
    pub samples: Vec<Duration>,
}

impl ColdStart {
    pub fn median(&self) -> Duration {
        percentile(&self.samples, 0.5)
    }
    pub fn p90(&self) -> Duration {
        percentile(&self.samples, 0.9)
    }
}

pub fn percentile(samples: &[Duration], q: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    let i = ((s.len() - 1) as f64 * q).round() as usize;
    s[i]
}

/// Measures every binary `runs` times, interleaved. `env` is what the functions read at init
/// (table, queue URLs, endpoint of the local stack).
pub async fn measure(
    binaries: &[(String, PathBuf)],
    runs: usize,
    env: &[(String, String)],
) -> Result<Vec<ColdStart>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let api = listener.local_addr()?.to_string();
    let mut out: Vec<ColdStart> = binaries
        .iter()
        .map(|(name, _)| ColdStart {
            name: name.clone(),
            samples: Vec::new(),
        })
        .collect();
    for _ in 0..runs {
        for (i, (name, path)) in binaries.iter().enumerate() {
            let d = once(&listener, &api, path, env)
                .await
                .with_context(|| format!("cold start of {name}"))?;
            out[i].samples.push(d);
        }
    }
    Ok(out)
}

async fn once(
    listener: &TcpListener,
    api: &str,
    path: &Path,
    env: &[(String, String)],
) -> Result<Duration> {
    let (started, mut child) = spawn_bootstrap(path, api, env)?;
    let accepted = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (mut conn, _) = listener.accept().await?;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let head = String::from_utf8_lossy(&buf);
            if head.starts_with("GET /2018-06-01/runtime/invocation/next") {
                return Ok::<_, std::io::Error>(started.elapsed());
            }
        }
    })
    .await;
    child.start_kill().ok();
    let status = child.wait_with_output().await?;
    match accepted {
        Ok(Ok(d)) => Ok(d),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => bail!(
            "no runtime API request within 10 s; stderr: {}",
            String::from_utf8_lossy(&status.stderr)
        ),
    }
}

/// Starts a `bootstrap` binary as Lambda does: only the environment Lambda sets (with the
/// Runtime API at `api`) and `env`; returns when it was spawned.
pub fn spawn_bootstrap(
    path: &Path,
    api: &str,
    env: &[(String, String)],
) -> Result<(Instant, tokio::process::Child)> {
    let mut cmd = tokio::process::Command::new(path);
    cmd.env_clear()
        .env("AWS_LAMBDA_RUNTIME_API", api)
        .env("AWS_LAMBDA_FUNCTION_NAME", "bench")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "bench")
        .env("AWS_LAMBDA_LOG_LEVEL", "WARN")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    Ok((started, cmd.spawn()?))
}
