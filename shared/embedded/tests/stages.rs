//! Stage decisions against in-memory ports: no network. They live here because the archive they
//! check needs a progress store, and the SQLite one runs in memory (the core cannot depend on
//! an adapter crate).

use relink_core::Error;
use relink_core::fakes::{DV, FakeDataverse, FakeFno, dataverse, env, fno};
use relink_core::model::{Run, RunOptions, RunStatus, StageStatus, Trigger};
use relink_core::ports::ProgressStore;
use relink_core::progress::TracingSink;
use relink_core::stages::*;
use relink_embedded::SqliteStore;

async fn with_ctx<T>(
    dv: &FakeDataverse,
    fno: &FakeFno,
    options: RunOptions,
    f: impl AsyncFnOnce(&StageCtx<'_>) -> T,
) -> T {
    with_env(env(), dv, fno, options, f).await
}

async fn with_env<T>(
    env: relink_core::registry::EnvConfig,
    dv: &FakeDataverse,
    fno: &FakeFno,
    options: RunOptions,
    f: impl AsyncFnOnce(&StageCtx<'_>) -> T,
) -> T {
    let store = SqliteStore::in_memory().unwrap();
    let run = Run::new(
        "01JDQ4N9Z3W8B7C6X5V4T3S2R1".into(),
        "uat".into(),
        options,
        Trigger::default(),
    );
    let ctx = StageCtx {
        env: &env,
        run: &run,
        store: &store,
        dataverse: dv,
        fno,
        reset: &ManualReset,
        gateway: None,
        sink: &TracingSink,
        stop_at: None,
    };
    f(&ctx).await
}

#[tokio::test]
async fn configs_pointing_at_another_dataverse_are_stale() {
    let (dv, fno) = (dataverse(5), fno(&["https://PROD.crm.dynamics.com/", DV]));
    let r = with_ctx(&dv, &fno, RunOptions::default(), async |c| {
        detect(c).await.unwrap()
    })
    .await;
    assert_eq!(r.then, Then::Continue);
    assert_eq!(r.outcome["fno_pointing_elsewhere"], 1);
    assert_eq!(
        r.outcome["other_dataverse_urls"][0],
        "https://prod.crm.dynamics.com"
    );
}

#[tokio::test]
async fn a_clean_link_is_skipped_unless_forced() {
    let (dv, fno) = (dataverse(5), fno(&[&format!("{DV}/")]));
    let r = with_ctx(&dv, &fno, RunOptions::default(), async |c| {
        detect(c).await.unwrap()
    })
    .await;
    assert_eq!(
        (r.status, r.then),
        (StageStatus::Skipped, Then::Finish(RunStatus::Skipped))
    );
    let forced = with_ctx(
        &dv,
        &fno,
        RunOptions {
            force: true,
            dry_run: false,
        },
        async |c| detect(c).await.unwrap(),
    )
    .await;
    assert_eq!(forced.then, Then::Continue);
    // Leftover runtime configs with no F&O link at all are stale too.
    let r = with_ctx(&dv, &fno_rows_none(), RunOptions::default(), async |c| {
        detect(c).await.unwrap()
    })
    .await;
    assert_eq!(r.then, Then::Continue);
}

fn fno_rows_none() -> FakeFno {
    fno(&[])
}

#[tokio::test]
async fn identity_and_integration_mismatches_are_refused() {
    let mut dv = dataverse(5);
    dv.unique_name = "orgprod";
    let f = fno(&["https://prod.crm.dynamics.com"]);
    let e = with_ctx(&dv, &f, RunOptions::default(), async |c| {
        clear_configs(c).await.unwrap_err()
    })
    .await;
    assert!(matches!(e, Error::Refused(_)), "{e}");
    assert_eq!(dv.rows.lock().unwrap().len(), 5, "nothing deleted");
    let mut dv = dataverse(5);
    dv.integrated = Some("https://other.operations.dynamics.com");
    let e = with_ctx(&dv, &f, RunOptions::default(), async |c| {
        detect(c).await.unwrap_err()
    })
    .await;
    assert!(e.to_string().contains("is linked to F&O"), "{e}");
}

/// Every stage that deletes checks the pairing itself: starting a run at `purge-keys` or
/// `clear-dataverse-configs` must not skip what `detect-mismatch` would have refused.
#[tokio::test]
async fn destructive_stages_refuse_a_dataverse_paired_with_another_fno() {
    let f = fno(&["https://prod.crm.dynamics.com"]);
    for stage in ["purge", "clear"] {
        let mut dv = dataverse(5);
        dv.integrated = Some("https://other.operations.dynamics.com");
        let e = with_ctx(&dv, &f, RunOptions::default(), async |c| match stage {
            "purge" => purge_keys(c).await.unwrap_err(),
            _ => clear_configs(c).await.unwrap_err(),
        })
        .await;
        assert!(matches!(e, Error::Refused(_)), "{stage}: {e}");
        assert!(e.to_string().contains("other.operations"), "{e}");
        assert_eq!(dv.rows.lock().unwrap().len(), 5, "{stage}: nothing deleted");
    }
    assert_eq!(f.rows.lock().unwrap().len(), 1, "no F&O row deleted");
}

#[tokio::test]
async fn an_unverifiable_pairing_is_refused_unless_the_entry_allows_it() {
    let f = fno(&[]);
    let mut dv = dataverse(3);
    dv.integrated = None;
    let e = with_ctx(&dv, &f, RunOptions::default(), async |c| {
        clear_configs(c).await.unwrap_err()
    })
    .await;
    assert!(matches!(e, Error::Refused(_)), "{e}");
    assert!(e.to_string().contains("allow_unverified_pairing"), "{e}");
    assert_eq!(dv.rows.lock().unwrap().len(), 3);
    // The Power Platform API's linked F&O is evidence too.
    dv.platform = Some(relink_core::ports::PlatformEnvironment {
        environment_type: Some("Sandbox".into()),
        linked_fno_url: Some("https://UAT.operations.dynamics.com/".into()),
    });
    let r = with_ctx(&dv, &f, RunOptions::default(), async |c| {
        clear_configs(c).await.unwrap()
    })
    .await;
    let guards = &r.outcome["guards"];
    assert!(
        guards["pairing"]
            .as_str()
            .unwrap()
            .contains("Power Platform"),
        "{guards}"
    );
    assert!(
        guards["production"].as_str().unwrap().contains("Sandbox"),
        "{guards}"
    );
    // Neither source, but the entry accepts the risk: the evidence says so.
    let mut dv = dataverse(2);
    dv.integrated = None;
    let mut e = env();
    e.allow_unverified_pairing = true;
    let r = with_env(e, &dv, &f, RunOptions::default(), async |c| {
        clear_configs(c).await.unwrap()
    })
    .await;
    assert!(
        r.outcome["guards"]["pairing"]
            .as_str()
            .unwrap()
            .starts_with("unverified")
    );
    assert!(dv.rows.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_platform_type_production_is_refused_whatever_the_registry_kind() {
    let f = fno(&[]);
    let mut dv = dataverse(3);
    dv.platform = Some(relink_core::ports::PlatformEnvironment {
        environment_type: Some("Production".into()),
        linked_fno_url: None,
    });
    for stage in ["detect", "purge", "clear"] {
        let e = with_ctx(&dv, &f, RunOptions::default(), async |c| match stage {
            "detect" => detect(c).await.unwrap_err(),
            "purge" => purge_keys(c).await.unwrap_err(),
            _ => clear_configs(c).await.unwrap_err(),
        })
        .await;
        assert!(matches!(e, Error::Refused(_)), "{stage}: {e}");
        assert!(e.to_string().contains("type Production"), "{e}");
    }
    assert_eq!(dv.rows.lock().unwrap().len(), 3);
    let mut e = env();
    e.allow_production = true;
    let r = with_env(e, &dv, &f, RunOptions::default(), async |c| {
        clear_configs(c).await.unwrap()
    })
    .await;
    assert!(
        r.outcome["guards"]["production"]
            .as_str()
            .unwrap()
            .contains("allow_production")
    );
}

#[tokio::test]
async fn clearing_pages_archives_every_row_before_deleting_it() {
    let (dv, f) = (dataverse(25), fno(&[]));
    let (r, archived) = with_ctx(&dv, &f, RunOptions::default(), async |c| {
        let r = clear_configs(c).await.unwrap();
        (r, c.store.archived(&c.run.run_id).await.unwrap().len())
    })
    .await;
    assert_eq!(r.outcome["deleted"], 25);
    assert_eq!(
        r.outcome["batches"], 10,
        "pages of 10, 10, 5 in batches of 3"
    );
    assert_eq!(archived, 25);
    assert!(dv.rows.lock().unwrap().is_empty());
}

#[tokio::test]
async fn dry_run_counts_across_pages_and_deletes_nothing() {
    let (dv, f) = (dataverse(25), fno(&["https://prod.crm.dynamics.com"]));
    let r = with_ctx(
        &dv,
        &f,
        RunOptions {
            dry_run: true,
            force: false,
        },
        async |c| clear_configs(c).await.unwrap(),
    )
    .await;
    assert_eq!(r.outcome["would_delete"], 25);
    let p = with_ctx(
        &dv,
        &f,
        RunOptions {
            dry_run: true,
            force: false,
        },
        async |c| purge_keys(c).await.unwrap(),
    )
    .await;
    assert_eq!(p.outcome[FNO_TABLE]["would_delete"], 1);
    assert_eq!(dv.rows.lock().unwrap().len(), 25);
    assert_eq!(f.rows.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_row_that_keeps_failing_stops_the_stage_instead_of_looping() {
    let mut dv = dataverse(4);
    dv.stuck = vec!["0002".into()];
    let e = with_ctx(&dv, &fno(&[]), RunOptions::default(), async |c| {
        clear_configs(c).await.unwrap_err()
    })
    .await;
    assert!(e.is_retryable() && e.to_string().contains("0002"), "{e}");
    assert_eq!(dv.rows.lock().unwrap().len(), 1, "the other rows are gone");
}

#[tokio::test]
async fn a_row_that_stays_after_its_delete_answered_ends_the_stage_with_the_row_named() {
    let mut dv = dataverse(4);
    dv.ghosts = vec!["0002".into()];
    let e = with_ctx(&dv, &fno(&[]), RunOptions::default(), async |c| {
        clear_configs(c).await.unwrap_err()
    })
    .await;
    assert!(
        matches!(e, Error::Protocol { .. }) && e.to_string().contains("0002"),
        "{e}"
    );
    assert_eq!(dv.rows.lock().unwrap().len(), 1, "only the ghost is left");
}

#[tokio::test]
async fn a_stage_out_of_time_hands_over_with_its_progress_recorded() {
    let (dv, f) = (dataverse(25), fno(&[]));
    let env = env();
    let store = SqliteStore::in_memory().unwrap();
    let run = Run::new(
        "01JDQ4N9Z3W8B7C6X5V4T3S2R1".into(),
        "uat".into(),
        RunOptions::default(),
        Trigger::default(),
    );
    let ctx = StageCtx {
        env: &env,
        run: &run,
        store: &store,
        dataverse: &dv,
        fno: &f,
        reset: &ManualReset,
        gateway: None,
        sink: &TracingSink,
        stop_at: Some(jiff::Timestamp::now()),
    };
    let r = clear_configs(&ctx).await.unwrap();
    assert_eq!((r.status, r.then), (StageStatus::Running, Then::Again));
    assert_eq!(r.outcome["continues"], true);
    assert_eq!(
        dv.rows.lock().unwrap().len(),
        25,
        "nothing sent after the time ran out"
    );
    assert_eq!(
        store.archived(&run.run_id).await.unwrap().len(),
        10,
        "the page read is archived"
    );
}

#[tokio::test]
async fn ghost_rows_are_not_counted_as_deleted_twice() {
    let mut dv = dataverse(3);
    dv.ghosts = vec!["0001".into()];
    let e = with_ctx(&dv, &fno(&[]), RunOptions::default(), async |c| {
        clear_configs(c).await.unwrap_err()
    })
    .await;
    assert!(e.to_string().contains("3 times"), "{e}");
}

#[tokio::test]
async fn paging_that_comes_back_to_a_link_ends_with_an_error() {
    let mut dv = dataverse(25);
    dv.looping = true;
    // Detection asks the service for a count and reads no page; a dry run counts by paging.
    let dry = RunOptions {
        dry_run: true,
        ..RunOptions::default()
    };
    let e = with_ctx(&dv, &fno(&[]), dry, async |c| {
        clear_configs(c).await.unwrap_err()
    })
    .await;
    assert!(e.to_string().contains("already followed"), "{e}");
    let e = with_ctx(&dv, &fno(&[]), RunOptions::default(), async |c| {
        clear_configs(c).await.unwrap_err()
    })
    .await;
    assert!(e.to_string().contains("already followed"), "{e}");
}
