//! `detect-mismatch`: reads both sides (F&O project configurations, Dataverse runtime
//! configurations, the organisation and its F&O integration) and decides whether the link is
//! stale. Deletes nothing.

use serde_json::Value;

use super::engine::PageGuard;
use super::guards::{guard_target, norm_url};
use super::maps::{Maps, running};
use super::{DATAVERSE_TABLE, FNO_TABLE, Findings, StageCtx, StageReport, Then};
use crate::error::Result;
use crate::model::{RunStatus, StageStatus};
use crate::ports::{DataverseApi, FnoApi};
use crate::progress::{Progress, ProgressSink};
use crate::registry::EnvConfig;

/// Most distinct foreign Dataverse URLs listed in findings.
const MAX_LISTED_URLS: usize = 5;

/// Reads both sides and decides whether the link is stale. Deletes nothing.
pub async fn inspect(
    env: &EnvConfig,
    dv: &dyn DataverseApi,
    fno: &dyn FnoApi,
    sink: &dyn ProgressSink,
) -> Result<Findings> {
    let (organization, guards) = guard_target(env, dv).await?;
    let here = norm_url(env.dataverse_url.as_str());
    let (mut total, mut elsewhere, mut pointing_here) = (0, 0, 0);
    let mut others: Vec<String> = Vec::new();
    let (mut maps, mut maps_running_here) = (Maps::default(), Maps::default());
    let mut next: Option<String> = None;
    let mut pages = PageGuard::new(FNO_TABLE);
    loop {
        let page = fno
            .project_configs(next.as_deref(), env.limits.fno_page_size)
            .await?;
        for row in &page.rows {
            total += 1;
            let url = row
                .get("ExternalEnvironmentUrl")
                .and_then(Value::as_str)
                .unwrap_or_default();
            maps.add(row);
            if norm_url(url) == here {
                pointing_here += 1;
                if running(row) {
                    maps_running_here.add(row);
                }
            } else {
                elsewhere += 1;
                let u = crate::redact::printable(&norm_url(url));
                if !u.is_empty() && others.len() < MAX_LISTED_URLS && !others.contains(&u) {
                    others.push(u);
                }
            }
        }
        sink.emit(Progress::Found {
            table: FNO_TABLE,
            rows: total,
        });
        match page.next_link {
            Some(n) => {
                pages.follow(&n)?;
                next = Some(n);
            }
            None => break,
        }
    }
    // Counted by the service, not by reading every row (a stale link can leave 200,000).
    let (dv_rows, dv_more) = match dv.runtime_config_set().await? {
        Some(set) => dv.count_rows(&set).await?,
        None => (0, false),
    };
    sink.emit(Progress::Found {
        table: DATAVERSE_TABLE,
        rows: dv_rows,
    });
    let dv_shown = if dv_more {
        format!("{dv_rows}+")
    } else {
        dv_rows.to_string()
    };
    let (stale, reason) = if elsewhere > 0 {
        (
            true,
            format!(
                "{elsewhere} of {total} F&O dual-write project configurations point at another Dataverse ({})",
                others.join(", ")
            ),
        )
    } else if total == 0 && dv_rows > 0 {
        (
            true,
            format!(
                "F&O has no dual-write project configuration but Dataverse holds {dv_shown} runtime configurations from an earlier link"
            ),
        )
    } else {
        (
            false,
            format!(
                "{total} F&O project configurations all point at {here}; {dv_shown} Dataverse runtime configurations"
            ),
        )
    };
    Ok(Findings {
        organization,
        guards,
        fno_project_configs: total,
        fno_pointing_elsewhere: elsewhere,
        fno_pointing_here: pointing_here,
        other_dataverse_urls: others,
        dataverse_runtime_configs: dv_rows,
        dataverse_count_capped: dv_more,
        stale,
        reason,
        maps,
        maps_running_here,
    })
}

pub(super) async fn count_dataverse(
    env: &EnvConfig,
    dv: &dyn DataverseApi,
    sink: &dyn ProgressSink,
) -> Result<usize> {
    let Some(set) = dv.runtime_config_set().await? else {
        return Ok(0);
    };
    let size = env.limits.dataverse_page_size;
    let mut page = dv.first_page(&set, size).await?;
    let mut n = page.rows.len();
    let mut pages = PageGuard::new(DATAVERSE_TABLE);
    while let Some(link) = page.next_link.take() {
        pages.follow(&link)?;
        sink.emit(Progress::Found {
            table: DATAVERSE_TABLE,
            rows: n,
        });
        page = dv.next_page(&link, size).await?;
        n += page.rows.len();
    }
    sink.emit(Progress::Found {
        table: DATAVERSE_TABLE,
        rows: n,
    });
    Ok(n)
}

/// Stage `detect-mismatch`: guards, inventory, decision. Deletes nothing.
pub async fn detect(ctx: &StageCtx<'_>) -> Result<StageReport> {
    let f = inspect(ctx.env, ctx.dataverse, ctx.fno, ctx.sink).await?;
    let outcome = serde_json::to_value(&f).expect("findings serialise");
    if !f.stale && !ctx.run.options.force {
        return Ok(StageReport {
            status: StageStatus::Skipped,
            outcome,
            then: Then::Finish(RunStatus::Skipped),
            summary: format!("link is clean: {}", f.reason),
            error: None,
        });
    }
    if crate::probe::is_probe(ctx.run) && !ctx.run.options.force {
        // A drift probe acts on a stale link only as its entry says now; without a `probe`
        // setting any more, it deletes nothing.
        let act = ctx
            .env
            .probe
            .is_some_and(|p| p.on_drift == crate::registry::OnDrift::Run);
        if !act {
            return Ok(StageReport {
                status: StageStatus::Skipped,
                outcome,
                then: Then::Finish(RunStatus::Skipped),
                summary: format!(
                    "drift found by a probe (on_drift = \"notify\", nothing deleted): {}. To repair it: relink run {}",
                    f.reason, ctx.env.id
                ),
                error: None,
            });
        }
    }
    let summary = if f.stale {
        format!("stale link: {}", f.reason)
    } else {
        format!(
            "link looks clean, going on because of --force: {}",
            f.reason
        )
    };
    Ok(StageReport {
        status: StageStatus::Succeeded,
        outcome,
        then: Then::Continue,
        summary,
        error: None,
    })
}
