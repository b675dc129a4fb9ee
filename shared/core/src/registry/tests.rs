//! Registry parsing and validation: what is accepted, what is refused and with which words.

use super::*;

const GOOD: &str = r#"
[environments.contoso-uat]
kind = "sandbox"
fno_url = "https://contoso-uat.sandbox.operations.dynamics.com"
dataverse_url = "https://contoso-uat.crm.dynamics.com"
dataverse_unique_name = "org6459f7a8"
tenant_id = "00000000-0000-0000-0000-000000000000"
client_id = "11111111-1111-1111-1111-111111111111"
client_secret = { env = "CONTOSO_UAT_SECRET" }
reset = { mode = "manual" }
"#;

fn lookup(name: &str) -> Option<String> {
    (name == "CONTOSO_UAT_SECRET").then(|| "s3cr3t-value".to_string())
}

#[test]
fn documented_example_loads_with_defaults() {
    let reg = Registry::parse(GOOD, lookup).unwrap();
    let env = reg.get("contoso-uat").unwrap();
    assert_eq!(env.authority.as_str(), "https://login.microsoftonline.com/");
    assert_eq!(env.client_secret.as_ref().unwrap().expose(), "s3cr3t-value");
    assert_eq!(env.reset, ResetMode::Manual);
    assert_eq!(env.limits, Limits::default());
    assert_eq!(
        env.dataverse_api().as_str(),
        "https://contoso-uat.crm.dynamics.com/api/data/v9.2/"
    );
    assert!(!format!("{env:?}").contains("s3cr3t-value"));
    assert!(matches!(reg.get("nope"), Err(Error::UnknownEnvironment(_))));
}

fn err(text: &str) -> String {
    Registry::parse(text, lookup).unwrap_err().to_string()
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let e = err(&GOOD.replace("kind =", "allow_prod = true\nkind ="));
    assert!(e.contains("allow_prod"), "{e}");
    assert!(err("[environmentz.a]\n").contains("environmentz"));
}

#[test]
fn plain_http_needs_loopback_and_the_allowance() {
    let http = GOOD.replace("https://contoso-uat.crm", "http://contoso-uat.crm");
    assert!(err(&http).contains("requires https"));
    let allowed = http.replace("reset =", "allow_insecure_http = true\nreset =");
    assert!(err(&allowed).contains("not loopback"));
    let loopback = allowed.replace(
        "http://contoso-uat.crm.dynamics.com",
        "http://127.0.0.1:8080/dataverse/org",
    );
    assert!(Registry::parse(&loopback, lookup).is_ok());
}

#[test]
fn missing_secret_variable_is_named_but_values_never_shown() {
    let e = Registry::parse(GOOD, |_| None).unwrap_err().to_string();
    assert!(
        e.contains("CONTOSO_UAT_SECRET") && e.contains("not set"),
        "{e}"
    );
}

const ARN: &str = "arn:aws:secretsmanager:us-east-1:000000000000:secret:uat";

#[test]
fn entries_round_trip_through_json() {
    let mut json = Registry::entry_json(GOOD, "contoso-uat").unwrap();
    assert_eq!(json["client_secret"]["env"], "CONTOSO_UAT_SECRET");
    json["client_secret"] = serde_json::json!({ "secret_arn": ARN });
    let reg = Registry::from_entries(&[("contoso-uat".into(), json)]);
    let env = reg.get("contoso-uat").unwrap();
    assert_eq!(env.dataverse_unique_name, "org6459f7a8");
    assert!(env.client_secret.is_none(), "read when a token is needed");
}

#[test]
fn a_table_entry_never_takes_a_secret_from_the_process_environment() {
    let mut json = Registry::entry_json(GOOD, "contoso-uat").unwrap();
    json["client_secret"] = serde_json::json!({ "env": "PATH" });
    let e = Registry::from_entries(&[("contoso-uat".into(), json.clone())])
        .get("contoso-uat")
        .unwrap_err()
        .to_string();
    assert!(e.contains("PATH") && e.contains("secret_arn"), "{e}");
    json["client_secret"] = serde_json::json!({ "secret_arn": ARN });
    json["lcs_environment_id"] = "lcs-1".into();
    json["watch"] = serde_json::json!({ "lcs_project_id": "1", "lcs_token": { "env": "HOME" } });
    let e = Registry::from_entries(&[("contoso-uat".into(), json)])
        .get("contoso-uat")
        .unwrap_err()
        .to_string();
    assert!(e.contains("watch.lcs_token") && e.contains("HOME"), "{e}");
}

#[test]
fn an_invalid_table_entry_refuses_only_its_own_environment() {
    let mut good = Registry::entry_json(GOOD, "contoso-uat").unwrap();
    good["client_secret"] = serde_json::json!({ "secret_arn": ARN });
    let mut bad = good.clone();
    bad["dataverse_url"] = "http://dynamics.example.com".into();
    bad["allow_insecure_http"] = true.into();
    let reg = Registry::from_entries(&[("contoso-uat".into(), good), ("hand-written".into(), bad)]);
    assert!(reg.get("contoso-uat").is_ok());
    let e = reg.get("hand-written").unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    assert!(e.to_string().contains("plain http"), "{e}");
}

#[test]
fn bad_values_are_explained() {
    assert!(err(&GOOD.replace("sandbox\"", "staging\"")).contains("staging"));
    assert!(
        err(&format!(
            "{GOOD}limits = {{ dataverse_batch_size = 5000 }}\n"
        ))
        .contains("between 1 and 1000")
    );
    assert!(err("not toml [").contains("expected"));
}

#[test]
fn credentials_go_only_to_the_services_own_hosts() {
    let with =
        |line: &str| GOOD.replace("kind = \"sandbox\"", &format!("kind = \"sandbox\"\n{line}"));
    for ok in [
        "authority = \"https://login.microsoftonline.us\"",
        "authority = \"https://login.chinacloudapi.cn/\"",
    ] {
        assert!(Registry::parse(&with(ok), lookup).is_ok(), "{ok}");
    }
    for bad in [
        "authority = \"https://login.attacker.example\"",
        "authority = \"https://login.microsoftonline.com.attacker.example\"",
        "authority = \"https://attacker.example/login.microsoftonline.com\"",
    ] {
        let e = err(&with(bad));
        assert!(
            e.contains("not a host relink sends credentials to"),
            "{bad}: {e}"
        );
    }
    // A loopback simulator only with allow_insecure_http.
    assert!(err(&with("authority = \"http://127.0.0.1:8080\"")).contains("plain http"));
    let sim = with("authority = \"http://127.0.0.1:8080\"\nallow_insecure_http = true");
    assert!(Registry::parse(&sim, lookup).is_ok());
    assert!(Receiver::Lcs.accepts("lcsapi.eu.lcs.dynamics.com"));
    assert!(Receiver::Lcs.accepts("lcsapi.gov.lcs.microsoftdynamics.us"));
    assert!(!Receiver::Lcs.accepts("lcsapi.eu.evil.lcs.dynamics.com"));
    assert!(!Receiver::PowerPlatform.accepts("api.powerplatform.com.evil.example"));
}

#[test]
fn one_lcs_or_power_platform_environment_belongs_to_one_entry() {
    let second = GOOD
        .replace("contoso-uat]", "contoso-test]")
        .replace("contoso-uat.", "contoso-test.");
    let text = format!(
        "{}lcs_environment_id = \"ABC-1\"\n{}lcs_environment_id = \"abc-1\"\n",
        GOOD, second
    );
    let e = err(&text);
    assert!(
        e.contains("contoso-test") && e.contains("contoso-uat") && e.contains("lcs_environment_id"),
        "{e}"
    );

    // In the table, neither of two entries that share an id is trusted; the others still are.
    let entry = |lcs: &str| {
        let mut v = Registry::entry_json(GOOD, "contoso-uat").unwrap();
        v["client_secret"] =
            serde_json::json!({"secret_arn": "arn:aws:secretsmanager:eu-west-1:1:secret:x"});
        v["power_platform_environment_id"] = lcs.into();
        v
    };
    let reg = Registry::from_entries(&[
        ("a".into(), entry("pp-1")),
        ("b".into(), entry("PP-1")),
        ("c".into(), entry("pp-2")),
    ]);
    for id in ["a", "b"] {
        let e = reg.get(id).unwrap_err().to_string();
        assert!(e.contains("power_platform_environment_id"), "{e}");
    }
    assert!(reg.get("c").is_ok());
    // `env push` of a new entry naming an id the table already has is refused.
    let pushed = Registry::from_entries(&[("d".into(), entry("pp-2"))]);
    let e = reg
        .check_unique_ids("d", pushed.get("d").unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("`c`"), "{e}");
    assert!(reg.check_unique_ids("c", reg.get("c").unwrap()).is_ok());
}

#[test]
fn default_channels_apply_to_entries_without_their_own_and_travel_with_pushed_entries() {
    let second = GOOD.replace("contoso-uat]", "contoso-dev]").replace(
        "reset = {",
        "notify = { slack = { env = \"SLACK\" } }\nreset = {",
    );
    let text = format!("notify = {{ sns = true }}\n{GOOD}{second}");
    let reg = Registry::parse(&text, |_| Some("x".into())).unwrap();
    let uat = &reg.get("contoso-uat").unwrap().notify;
    assert!(uat.sns && uat.slack.is_none());
    // An entry's own `notify` replaces the default.
    let dev = &reg.get("contoso-dev").unwrap().notify;
    assert!(!dev.sns && dev.slack.is_some());
    let stored = Registry::entry_json(&text, "contoso-uat").unwrap();
    assert_eq!(stored["notify"]["sns"], true, "{stored}");
    let stored = Registry::entry_json(&text, "contoso-dev").unwrap();
    assert!(stored["notify"].get("sns").is_none(), "{stored}");
}

#[test]
fn drift_probes_are_bounded_and_notify_needs_a_channel() {
    let with = |probe: &str| GOOD.replace("reset = {", &format!("probe = {probe}\nreset = {{"));
    let reg = Registry::parse(&with("{ every_hours = 6, on_drift = \"run\" }"), lookup).unwrap();
    let probe = reg.get("contoso-uat").unwrap().probe.unwrap();
    assert_eq!(probe.on_drift, OnDrift::Run);
    assert_eq!(probe.every(), std::time::Duration::from_secs(6 * 3600));
    let e = err(&with("{ every_hours = 0, on_drift = \"run\" }"));
    assert!(e.contains("every_hours must be 1-720"), "{e}");
    let e = err(&with("{ every_hours = 6, on_drift = \"notify\" }"));
    assert!(e.contains("needs a notification channel"), "{e}");
    let e = err(&with("{ every_hours = 6, on_drift = \"delete\" }"));
    assert!(e.contains("delete"), "{e}");
}

#[test]
fn the_gateway_mode_is_bounded_never_production_and_sends_tokens_to_gateways_only() {
    let gw = |host: &str, extra: &str| {
        GOOD.replace(
            "reset = { mode = \"manual\" }",
            &format!("reset = {{ mode = \"gateway\", gateway = \"{host}\", token = {{ client_id = \"22222222-2222-2222-2222-222222222222\", file = \"/tmp/t\" }}{extra} }}"),
        )
    };
    let ok = "https://projectmanagementservice.eu.gateway.prod.island.powerapps.com";
    let reg = Registry::parse(&gw(ok, ""), lookup).unwrap();
    let ResetMode::Gateway(cfg) = &reg.get("contoso-uat").unwrap().reset else {
        panic!("gateway mode")
    };
    assert!(!cfg.force && cfg.on_failure == OnGatewayFailure::Manual);
    assert_eq!(
        cfg.stop_timeout.as_secs() + cfg.reset_timeout.as_secs(),
        720
    );
    let e = err(&gw("https://evil.example.com", ""));
    assert!(e.contains("not a host relink sends credentials to"), "{e}");
    let e = err(&gw(ok, "").replace(
        "kind = \"sandbox\"",
        "kind = \"production\"\nallow_production = true",
    ));
    assert!(e.contains("never used on production"), "{e}");
    let e = err(&gw(
        ok,
        ", stop_timeout_seconds = 600, reset_timeout_seconds = 600",
    ));
    assert!(e.contains("at most 780"), "{e}");
    let e = err(&gw(ok, ", on_failure = \"retry\""));
    assert!(e.contains("retry"), "{e}");
    // In the AWS table a sign-in lives in Secrets Manager only.
    let entry: serde_json::Value = serde_json::to_value(
        toml::from_str::<toml::Table>(&gw(ok, "").replace(
            "{ env = \"CONTOSO_UAT_SECRET\" }",
            "{ secret_arn = \"arn:aws:secretsmanager:eu-west-1:1:secret:x\" }",
        ))
        .unwrap()["environments"]["contoso-uat"]
            .clone(),
    )
    .unwrap();
    let reg = Registry::from_entries(&[("contoso-uat".into(), entry)]);
    let e = reg.get("contoso-uat").unwrap_err().to_string();
    assert!(e.contains("reset.token") && e.contains("secret_arn"), "{e}");
}
