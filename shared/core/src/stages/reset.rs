//! `reset-link`: the manual gate (exact instructions, the run waits for the operator), and the
//! verification that `relink confirm` runs after the Reset: detection again, read-only.

use serde_json::{Value, json};

use super::detect::inspect;
use super::maps::{self, Maps};
use super::{StageCtx, StageReport, Then};
use crate::error::Result;
use crate::model::{Run, RunStatus, StageStatus};
use crate::ports::{ResetDriver, ResetOutcome};
use crate::registry::EnvConfig;

/// Stage `reset-link`: the manual gate (or, in a dry run, what it would ask).
pub async fn reset_link(ctx: &StageCtx<'_>) -> Result<StageReport> {
    if ctx.run.options.dry_run {
        return Ok(StageReport {
            status: StageStatus::Skipped,
            outcome: json!({"would": match &ctx.env.reset {
                crate::registry::ResetMode::Manual => "reset the link (manual: an operator resets it in F&O; relink verifies it)",
                crate::registry::ResetMode::Gateway(_) => "stop the running maps and reset the link through the dual-write gateway, then verify it",
            }}),
            then: Then::Finish(RunStatus::Succeeded),
            summary: "dry run: the link would now be reset".into(),
            error: None,
        });
    }
    if let crate::registry::ResetMode::Gateway(cfg) = &ctx.env.reset {
        let gateway = ctx.gateway.ok_or_else(|| {
            crate::Error::Config("reset mode `gateway` needs a gateway client".into())
        })?;
        return super::gateway::gateway_reset(ctx, cfg, gateway).await;
    }
    match ctx.reset.reset(ctx.env, ctx.run).await? {
        ResetOutcome::AwaitConfirmation { instructions } => Ok(StageReport {
            status: StageStatus::Running,
            outcome: json!({"mode": "manual", "instructions": instructions}),
            then: Then::Await(instructions),
            summary: "waiting for an operator to reset the link".into(),
            error: None,
        }),
        ResetOutcome::Done => verify(ctx).await,
    }
}

/// Verification after the reset: detection again, read-only, which must come back clean, and
/// where the environment had a link before, the link must be rebuilt towards this Dataverse.
pub async fn verify(ctx: &StageCtx<'_>) -> Result<StageReport> {
    let f = inspect(ctx.env, ctx.dataverse, ctx.fno, ctx.sink).await?;
    let detected = ctx
        .run
        .stage(crate::model::Stage::DetectMismatch)
        .outcome
        .as_ref();
    let had_link = detected
        .and_then(|o| o.get("fno_project_configs"))
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 0);
    let problem = if f.stale {
        Some(f.reason.clone())
    } else if had_link && f.fno_pointing_here == 0 {
        Some("F&O has no dual-write project configuration pointing at this Dataverse yet: the link has not been reset".to_string())
    } else {
        None
    };
    // The re-apply checklist: the maps detection saw before the purge against those that run now.
    let before: Maps = detected
        .and_then(|o| o.get("maps"))
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    let reapply = maps::reapply(&before, &f.maps_running_here);
    let maps_line = maps::summary(&reapply);
    let outcome = json!({"verified": problem.is_none(), "findings": f, "maps": reapply});
    Ok(match problem {
        None => StageReport {
            status: StageStatus::Succeeded,
            outcome,
            then: Then::Finish(RunStatus::Succeeded),
            summary: match maps_line {
                Some(m) => format!("verified: {}; {m}", f.reason),
                None => format!("verified: {}", f.reason),
            },
            error: None,
        },
        Some(p) => StageReport {
            status: StageStatus::Running,
            outcome,
            then: Then::Await(format!(
                "verification failed: {p}. Reset the link as instructed, then run relink confirm {} again",
                ctx.run.run_id
            )),
            summary: format!("verification failed: {p}"),
            error: Some(format!("verification failed: {p}")),
        },
    })
}

/// The manual reset gate: records exact operator instructions.
#[derive(Clone, Copy, Debug, Default)]
pub struct ManualReset;

#[async_trait::async_trait]
impl ResetDriver for ManualReset {
    async fn reset(&self, env: &EnvConfig, run: &Run) -> Result<ResetOutcome> {
        Ok(ResetOutcome::AwaitConfirmation {
            instructions: manual_instructions(env, &run.run_id),
        })
    }
}

/// The operator's checklist for a manual reset.
pub fn manual_instructions(env: &EnvConfig, run_id: &str) -> String {
    format!(
        "relink has cleared the dual-write keys of `{id}`. Reset the link by hand, then confirm:\n\
         1. Sign in to F&O at {fno} as a System administrator.\n\
         2. Open the Data management workspace > Dual-write. Stop any table map that still runs.\n\
         3. Select Reset link and choose the Dataverse environment {dv} (organisation {org}). If relink cannot see the maps stopped, F&O offers Force reset.\n\
         4. Wait until the reset finishes, apply the dual-write solutions again and start the maps you need (Reset removes maps, integration keys and legal-entity mappings).\n\
         5. Run: relink confirm {run_id}   (relink then verifies the link and ends the run)",
        id = env.id,
        fno = env.fno_url,
        dv = env.dataverse_url,
        org = env.dataverse_unique_name,
    )
}
