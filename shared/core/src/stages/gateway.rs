//! `reset-link` through the dual-write gateway (`reset = { mode = "gateway" }`, opt-in and
//! unsupported): confirm the target again, stop the maps that run and wait until they have
//! really stopped, ask for the Reset (forced only when configured), wait until it has finished,
//! then verify like the manual path. Every wait is bounded (`stop_timeout_seconds`,
//! `reset_timeout_seconds`, and the invocation's own deadline); every request id and state is
//! recorded in the stage's outcome.
//!
//! Never "succeeded" without the verification passing: a failure, a timeout, a sign-in that
//! expired or a gateway that answers what relink does not understand ends the run `failed`
//! (`on_failure = "fail"`) or puts it at the manual gate with the cause in the instructions
//! (`on_failure = "manual"`, the default), where the automatic checks go on.
//!
//! A Reset is asked for at most once per run: a claim in the store (`TRIGGER#gateway-reset#RUN`)
//! is taken before it is sent, so a redelivery or a resumed run after a crash between "Reset
//! requested" and "Reset finished" waits for the link instead of sending a second Reset. A crash
//! between "stop requested" and "stopped" is harmless: the maps still running are asked again.

use std::time::Duration;

use serde_json::{Value, json};

use super::guards::guard_target;
use super::reset::{manual_instructions, verify};
use super::{StageCtx, StageReport, Then};
use crate::error::{Error, Result};
use crate::model::{RunStatus, StageStatus};
use crate::ports::{DualWriteGateway, GatewayLink, RequestState};
use crate::registry::{GatewayReset, OnGatewayFailure};

/// Time kept before the invocation's deadline for recording the outcome.
const MARGIN: Duration = Duration::from_secs(30);

/// The claim that makes a run's Reset be asked for once.
const RESET_CLAIM: &str = "gateway-reset";

/// What went wrong, for the outcome and the instructions.
struct Failure {
    what: String,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure {
            what: e.to_string(),
        }
    }
}

/// The gateway path of `reset-link`.
pub async fn gateway_reset(
    ctx: &StageCtx<'_>,
    cfg: &GatewayReset,
    gateway: &dyn DualWriteGateway,
) -> Result<StageReport> {
    // Identity and production guards first: the Reset is the most destructive step of all.
    let (_, guards) = guard_target(ctx.env, ctx.dataverse).await?;
    let mut requests: Vec<Value> = Vec::new();
    let result = drive(ctx, cfg, gateway, &mut requests).await;
    let outcome = |extra: Value| {
        let mut o = json!({"mode": "gateway", "guards": guards, "gateway_requests": requests, "force": cfg.force});
        if let (Value::Object(o), Value::Object(extra)) = (&mut o, extra) {
            o.extend(extra);
        }
        o
    };
    match result {
        Ok(mut report) => {
            let verified = std::mem::take(&mut report.outcome);
            report.outcome = outcome(verified);
            Ok(report)
        }
        Err(Stop::Raise(e)) => Err(e),
        Err(Stop::Failed(f)) => {
            let why = format!(
                "the Reset through the dual-write gateway did not complete: {}",
                f.what
            );
            tracing::warn!(run_id = %ctx.run.run_id, environment_id = %ctx.env.id, error = %why, "gateway reset failed");
            match cfg.on_failure {
                OnGatewayFailure::Fail => Err(Error::Gateway(format!(
                    "{why}. Nothing more was sent; reset the link by hand (relink run {} prints the steps), or fix the cause and start a new run",
                    ctx.env.id
                ))),
                OnGatewayFailure::Manual => {
                    let instructions =
                        format!("{why}.\n{}", manual_instructions(ctx.env, &ctx.run.run_id));
                    Ok(StageReport {
                        status: StageStatus::Running,
                        outcome: outcome(
                            json!({"fell_back": "manual", "error": why, "instructions": instructions}),
                        ),
                        then: Then::Await(instructions),
                        summary: format!("{why}; waiting for an operator to reset the link"),
                        error: Some(why),
                    })
                }
            }
        }
    }
}

enum Stop {
    /// The store failed (the event is retried as any stage's would be), or a guard refused (the
    /// run is refused): not the gateway's doing.
    Raise(Error),
    /// The gateway path failed: on_failure decides.
    Failed(Failure),
}

impl From<Failure> for Stop {
    fn from(f: Failure) -> Stop {
        Stop::Failed(f)
    }
}

/// Gateway and sign-in errors are the gateway path's failures; the store's and the guards' are
/// raised as in any stage.
fn gw<T>(r: Result<T>) -> std::result::Result<T, Stop> {
    r.map_err(|e| match e {
        Error::Store { .. } | Error::Conflict(_) | Error::LockHeld { .. } | Error::Refused(_) => {
            Stop::Raise(e)
        }
        other => Stop::Failed(other.into()),
    })
}

async fn drive(
    ctx: &StageCtx<'_>,
    cfg: &GatewayReset,
    gateway: &dyn DualWriteGateway,
    requests: &mut Vec<Value>,
) -> std::result::Result<StageReport, Stop> {
    let started = tokio::time::Instant::now();
    // The invocation's own deadline caps every wait.
    let cap = |want: Duration| -> Duration {
        let left = ctx.stop_at.map(|at| {
            let left = (at - jiff::Timestamp::now()).get_milliseconds().max(0) as u64;
            Duration::from_millis(left).saturating_sub(MARGIN)
        });
        left.map_or(want, |l| l.min(want))
    };
    let link = gw(gateway.link().await)?;
    if crate::stages::guards::norm_url(&link.fno_url)
        != crate::stages::guards::norm_url(ctx.env.fno_url.as_str())
    {
        return Err(Failure {
            what: format!(
                "the gateway's link {} is for the F&O at {}, not {}; nothing was stopped or reset",
                link.cname,
                crate::redact::printable(&link.fno_url),
                ctx.env.fno_url
            ),
        }
        .into());
    }
    // Stopping is asked again on a resumed run: only maps that still run are asked.
    stop_maps(ctx, cfg, gateway, &link, requests, cap(cfg.stop_timeout)).await?;
    let claim = ctx.run.run_id.clone();
    // The Reset, once per run.
    let reset_deadline = tokio::time::Instant::now() + cap(cfg.reset_timeout);
    match gw(ctx
        .store
        .claim_trigger(RESET_CLAIM, &claim, &ctx.run.run_id)
        .await)?
    {
        Ok(()) => {
            crate::failpoint::point("gateway-reset", "claimed");
            let id = gw(gateway.reset(&link, cfg.force).await)?;
            crate::failpoint::point("gateway-reset", "requested");
            let _ = ctx
                .store
                .mark_trigger_sent(RESET_CLAIM, &claim, &ctx.run.run_id)
                .await;
            requests.push(json!({"action": "reset", "request_id": id, "force": cfg.force, "dataverse_before": link.dataverse_url}));
            if let Some(id) = id {
                let state = wait(gateway, &id, cfg.poll, reset_deadline).await?;
                if let Some(last) = requests.last_mut() {
                    last["state"] = state.clone().into();
                }
                if state != "completed" {
                    return Err(Failure {
                        what: format!("the Reset (request {id}) {state}"),
                    }
                    .into());
                }
            }
        }
        Err(_) => {
            // An earlier attempt of this run asked for it (or died while asking): never again.
            tracing::warn!(run_id = %ctx.run.run_id, "the Reset was asked for by an earlier attempt of this run; waiting for the link instead of asking again");
            requests.push(json!({"action": "reset", "request_id": null, "asked_before": true}));
        }
    }
    // Verification, read-only, until it passes or the Reset's time is over.
    loop {
        let report = gw(verify(ctx).await)?;
        if matches!(report.then, Then::Finish(RunStatus::Succeeded)) {
            tracing::info!(run_id = %ctx.run.run_id, seconds = started.elapsed().as_secs(), "link reset through the gateway and verified");
            return Ok(report);
        }
        if tokio::time::Instant::now() + cfg.poll > reset_deadline {
            return Err(Failure {
                what: format!(
                    "the link was not verified within {} s of the Reset: {}",
                    cfg.reset_timeout.as_secs(),
                    report.summary
                ),
            }
            .into());
        }
        tokio::time::sleep(cfg.poll).await;
    }
}

/// Stops the maps that run and waits until the gateway says they have stopped.
async fn stop_maps(
    ctx: &StageCtx<'_>,
    cfg: &GatewayReset,
    gateway: &dyn DualWriteGateway,
    link: &GatewayLink,
    requests: &mut Vec<Value>,
    within: Duration,
) -> std::result::Result<(), Stop> {
    let deadline = tokio::time::Instant::now() + within;
    let running: Vec<_> = gw(gateway.maps(link).await)?
        .into_iter()
        .filter(|m| m.runs() && m.pid.is_some())
        .collect();
    if running.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = running.iter().map(|m| m.name.as_str()).collect();
    let id = gw(gateway.stop(link, &running).await)?;
    crate::failpoint::point("gateway-stop", "requested");
    tracing::info!(run_id = %ctx.run.run_id, request_id = %id, maps = running.len(), "maps asked to stop");
    requests.push(json!({"action": "stop", "request_id": id, "maps": names}));
    let state = wait(gateway, &id, cfg.poll, deadline).await?;
    if let Some(last) = requests.last_mut() {
        last["state"] = state.clone().into();
    }
    if state != "completed" {
        return Err(Failure {
            what: format!("stopping {} map(s) (request {id}) {state}", names.len()),
        }
        .into());
    }
    // Stopped means stopped: read the maps again.
    let still: Vec<String> = gw(gateway.maps(link).await)?
        .into_iter()
        .filter(|m| m.runs())
        .map(|m| m.name)
        .collect();
    if !still.is_empty() {
        return Err(Failure {
            what: format!(
                "the gateway said the stop (request {id}) completed but these maps still run: {}",
                still.join(", ")
            ),
        }
        .into());
    }
    Ok(())
}

/// Polls a request until it completes, fails or `deadline` passes: `completed`, or what
/// happened instead (`failed: ...`, `did not finish within ...`).
async fn wait(
    gateway: &dyn DualWriteGateway,
    id: &str,
    poll: Duration,
    deadline: tokio::time::Instant,
) -> std::result::Result<String, Stop> {
    let start = tokio::time::Instant::now();
    loop {
        match gw(gateway.request(id).await)? {
            RequestState::Completed => return Ok("completed".into()),
            RequestState::Failed(why) => {
                return Ok(format!("failed: {}", crate::redact::printable(&why)));
            }
            RequestState::Waiting => {}
        }
        if tokio::time::Instant::now() + poll > deadline {
            return Ok(format!(
                "did not finish within {} s",
                (tokio::time::Instant::now() - start).as_secs()
            ));
        }
        tokio::time::sleep(poll).await;
    }
}
