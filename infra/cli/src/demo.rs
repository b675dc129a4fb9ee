//! `relink sim` and `relink demo`: the simulators on loopback, and a narrated end-to-end relink
//! of a seeded "restored" environment whose F&O still points at production Dataverse.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use relink_core::model::RunStatus;
use relink_core::ports::ProgressStore;
use relink_core::registry::Registry;
use relink_core::{Error, Result};
use relink_sim::{AppSeed, Faults, FnoSeed, OrgSeed, PlatformSeed, Seed, Sim};

use crate::display::{self, Display};
use crate::embedded::{Embedded, RunRequest};

const DEMO_ENV: &str = "contoso-uat";
const DEMO_CLIENT: &str = "11111111-1111-1111-1111-111111111111";
const DEMO_SECRET_VAR: &str = "RELINK_DEMO_SECRET";

/// `relink sim`: serve until Ctrl-C.
pub async fn serve(port: u16, seed: Option<PathBuf>, faults: Option<PathBuf>) -> Result<u8> {
    let sim = Sim::start(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .map_err(|e| Error::Config(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", p.display())))
    };
    if let Some(p) = &seed {
        let s: Seed = serde_json::from_str(&read(p)?)
            .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
        sim.seed(&s).map_err(Error::Config)?;
    }
    if let Some(p) = &faults {
        let f: Faults = serde_json::from_str(&read(p)?)
            .map_err(|e| Error::Config(format!("{}: {e}", p.display())))?;
        sim.set_faults(f);
    }
    println!("simulators listening on {}", sim.base_url());
    println!(
        "  token endpoint  {}/{{tenant}}/oauth2/v2.0/token",
        sim.base_url()
    );
    println!(
        "  Dataverse       {}/dataverse/{{org}}/api/data/v9.2/",
        sim.base_url()
    );
    println!("  F&O OData       {}/fno/{{env}}/data/", sim.base_url());
    println!(
        "  control         GET /_sim/state, GET /_sim/log, POST /_sim/seed, POST /_sim/faults, POST /_sim/reset-link/{{env}}"
    );
    tokio::signal::ctrl_c().await.ok();
    Ok(crate::exit::OK)
}

fn say(text: &str) {
    println!("\n==> {text}");
}

/// `relink demo`.
pub async fn run(keep: bool) -> Result<u8> {
    let sim = Sim::start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .map_err(|e| Error::Config(format!("cannot start the simulators: {e}")))?;
    let secret = format!("demo-{}", uuid_like());
    say(&format!(
        "Started simulators of Entra ID, Dataverse and F&O at {}",
        sim.base_url()
    ));
    sim.seed(&Seed {
        apps: vec![AppSeed {
            client_id: DEMO_CLIENT.into(),
            client_secret: secret.clone(),
        }],
        organizations: vec![
            OrgSeed {
                name: "contoso-prod".into(),
                unique_name: "orgcontosoprod".into(),
                organization_id: None,
                friendly_name: Some("Contoso (production)".into()),
                integrated_fno: None,
                runtime_configs: 40,
                platform: None,
            },
            OrgSeed {
                name: "contoso-uat".into(),
                unique_name: "orgcontosouat".into(),
                organization_id: None,
                friendly_name: Some("Contoso UAT".into()),
                integrated_fno: Some(DEMO_ENV.into()),
                runtime_configs: 2_500,
                platform: Some(PlatformSeed {
                    environment_type: "Sandbox".into(),
                    linked_fno: Some(DEMO_ENV.into()),
                    admin_shape: false,
                }),
            },
        ],
        fno_environments: vec![FnoSeed {
            name: DEMO_ENV.into(),
            linked_organization: "contoso-uat".into(),
            points_at: Some("contoso-prod".into()),
            project_configs: 120,
            field_configs: 30,
            business_events: 12,
            purge_service_path: Some(
                "/api/services/RelinkServices/RelinkPurgeService/purge".into(),
            ),
            // The Reset, then the admin re-applying most maps: 12 are left for the checklist.
            reset_project_configs: Some(108),
            per_company_key: false,
            skip_paging: false,
            empty_pages: false,
        }],
        ..Seed::default()
    })
    .map_err(Error::Config)?;
    say(&format!(
        "Seeded a restored F&O UAT ({}) whose 120 dual-write project configurations still point at PRODUCTION Dataverse \
         ({}), and the UAT Dataverse ({}) holding 2,500 stale runtime configurations. Its field configurations and business events \
         are reachable through a customer purge service.",
        sim.fno_url(DEMO_ENV),
        sim.dataverse_url("contoso-prod"),
        sim.dataverse_url("contoso-uat")
    ));

    let dir = std::env::temp_dir().join(format!("relink-demo-{}", uuid_like()));
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", dir.display())))?;
    let registry_text = format!(
        r#"# relink demo registry (written by `relink demo`)
[environments.{DEMO_ENV}]
kind = "uat"
fno_url = "{fno}"
dataverse_url = "{dv}"
dataverse_unique_name = "orgcontosouat"
tenant_id = "contoso.onmicrosoft.com"
client_id = "{DEMO_CLIENT}"
client_secret = {{ env = "{DEMO_SECRET_VAR}" }}
authority = "{authority}"
allow_insecure_http = true   # loopback simulators only
power_platform_api = "{pp}"   # the guards read the environment's type and linked F&O here
fno_purge_service = "/api/services/RelinkServices/RelinkPurgeService/purge"
reset = {{ mode = "manual" }}
verify = {{ every_seconds = 1, give_up_after_seconds = 600 }}   # checks of the Reset (default: every 15 min, give up after 3 days)
"#,
        fno = sim.fno_url(DEMO_ENV),
        dv = sim.dataverse_url("contoso-uat"),
        authority = sim.authority(),
        pp = sim.power_platform_api(),
    );
    let config = dir.join("relink.toml");
    let store = dir.join("relink.db");
    std::fs::write(&config, &registry_text)
        .map_err(|e| Error::Config(format!("cannot write {}: {e}", config.display())))?;
    // The demo hands its generated secret to the registry loader directly; it is never printed.
    let registry = Registry::parse(&registry_text, |name| {
        (name == DEMO_SECRET_VAR).then(|| secret.clone())
    })?;
    say(&format!(
        "Wrote a registry for `{DEMO_ENV}` to {} (the client secret comes from ${DEMO_SECRET_VAR})",
        config.display()
    ));
    let embedded = Embedded::open(registry, &store, Arc::new(Display::plain()))?;

    say(&format!(
        "relink run {DEMO_ENV} --dry-run: what would be deleted, deleting nothing"
    ));
    let dry = embedded.run(request(true)).await?;
    print!("{}", display::run_text(&dry));

    say(&format!(
        "relink run {DEMO_ENV}: confirm the Dataverse identity, archive and delete the F&O keys and the Dataverse runtime configurations"
    ));
    let run = embedded.run(request(false)).await?;
    print!("{}", display::run_text(&run));
    let after = sim.snapshot();
    let archived = embedded.store.archived(&run.run_id).await?.len();
    let mut ok = run.status == RunStatus::AwaitingConfirmation
        && after.project_configs[DEMO_ENV] == 0
        && after.runtime_configs["contoso-uat"] == 0
        && after.runtime_configs["contoso-prod"] == 40;
    say(&format!(
        "Deleted: {} F&O project configurations, {} field configurations, {} business events, {} Dataverse runtime configurations; \
         {archived} rows archived in {}; production Dataverse untouched ({} rows).",
        120 - after.project_configs[DEMO_ENV],
        30 - after.field_configs[DEMO_ENV],
        12 - after.business_events[DEMO_ENV],
        2_500 - after.runtime_configs["contoso-uat"],
        store.display(),
        after.runtime_configs["contoso-prod"],
    ));

    say(
        "The operator now resets the link in F&O as instructed above and re-applies most maps; the simulator plays that part",
    );
    sim.reset_link(DEMO_ENV).map_err(Error::Config)?;

    say(&format!(
        "relink checks the link by itself while the run awaits the Reset (relink run --wait, or relink confirm {} to check now)",
        run.run_id
    ));
    let confirmed = embedded.wait(run.clone()).await?;
    print!("{}", display::run_text(&confirmed));
    ok &= confirmed.status == RunStatus::Succeeded;

    say(&format!(
        "relink run {DEMO_ENV} again: the link is clean now, so the run is skipped"
    ));
    let again = embedded.run(request(false)).await?;
    print!("{}", display::run_text(&again));
    ok &= again.status == RunStatus::Skipped;

    say(&format!(
        "relink report {}: the run's evidence, for the change record",
        run.run_id
    ));
    let at = format!("SQLite store {}, table archive", store.display());
    let evidence = crate::report::build(&embedded.store, &run.run_id, &at).await?;
    print!("{}", crate::report::markdown(&evidence));

    if keep {
        say(&format!(
            "Kept {} and {}: try `relink status --store {} --json`",
            config.display(),
            store.display(),
            store.display()
        ));
    } else {
        std::fs::remove_dir_all(&dir).ok();
    }
    if ok {
        say(
            "Demo complete: the stale link was detected, cut on both sides with every row archived, reset, and verified.",
        );
        Ok(crate::exit::OK)
    } else {
        say("Demo did NOT end as expected; see the runs above.");
        Ok(crate::exit::FAILED)
    }
}

fn request(dry_run: bool) -> RunRequest {
    RunRequest {
        env: Some(DEMO_ENV.into()),
        event: None,
        dry_run,
        force: false,
        from_stage: None,
        wait: false,
    }
}

fn uuid_like() -> String {
    ulid::Ulid::new().to_string().to_lowercase()
}
