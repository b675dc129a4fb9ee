//! `relink auth login ENV --for gateway|lcs`: a user signs in once, headless (the device-code
//! flow: a code to enter at a URL, from any browser, MFA included), and relink keeps the
//! refresh token where the entry says: `reset.token` (the dual-write gateway) or
//! `watch.lcs_sign_in` (LCS). The stages and the watcher redeem it and store the rotated one
//! back. The token is never printed.

use std::path::Path;
use std::sync::Arc;

use relink_core::error::{Error, Result};
use relink_core::ports::SecretStore;
use relink_core::progress::TracingSink;
use relink_core::registry::{
    DelegatedToken, GATEWAY_SCOPE, LCS_SCOPE, Registry, ResetMode, SecretSource,
};
use relink_dynamics::{Http, RetryPolicy};

/// Which sign-in.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Target {
    /// The dual-write gateway (`reset = { mode = "gateway", token = ... }`).
    Gateway,
    /// LCS, for the restore watcher (`watch.lcs_sign_in`).
    Lcs,
}

/// Signs a user in for `env` and stores the refresh token in `secrets`.
pub async fn login(
    config: &Path,
    env: &str,
    target: Target,
    secrets: Arc<dyn SecretStore>,
) -> Result<u8> {
    let text = std::fs::read_to_string(config)
        .map_err(|e| Error::Config(format!("cannot read registry {}: {e}", config.display())))?;
    // Only the entry's sign-in settings are needed: its other secrets need not be at hand.
    let registry = Registry::parse(&text, |_| Some("unused".into()))?;
    let entry = registry.get(env)?;
    let (token, scope, field): (&DelegatedToken, &str, &str) = match target {
        Target::Gateway => match &entry.reset {
            ResetMode::Gateway(cfg) => (&cfg.token, GATEWAY_SCOPE, "reset.token"),
            ResetMode::Manual => {
                return Err(Error::Config(format!(
                    "[environments.{env}] resets by hand: set reset = {{ mode = \"gateway\", gateway = \"https://...\", token = {{ client_id = \"...\", file = \"...\" }} }} first (README, \"Reset without a person\")"
                )));
            }
        },
        Target::Lcs => match entry
            .watch
            .as_ref()
            .and_then(|w| w.lcs.as_ref())
            .and_then(|l| l.sign_in.as_ref())
        {
            Some(t) => (t, LCS_SCOPE, "watch.lcs_sign_in"),
            None => {
                return Err(Error::Config(format!(
                    "[environments.{env}] has no watch.lcs_sign_in = {{ client_id = \"...\", file = \"...\" }}"
                )));
            }
        },
    };
    if let SecretSource::Env(var) = &token.store {
        return Err(Error::Config(format!(
            "{field} names the environment variable {var}, which relink cannot write: name a file (embedded) or a secret_arn (AWS) so the sign-in can be kept and rotated"
        )));
    }
    let http = Http::new(RetryPolicy::default(), Arc::new(TracingSink))?;
    let refresh = relink_dynamics::delegated::device_login(
        &http,
        &entry.authority,
        &entry.tenant_id,
        &token.client_id,
        scope,
        |code| {
            eprintln!(
                "To sign in for {env} ({}), open {} and enter the code {}",
                match target {
                    Target::Gateway => "the dual-write gateway",
                    Target::Lcs => "LCS",
                },
                // What the server sent, shown without its control characters.
                crate::display::printable(
                    &code.verification_uri.chars().take(300).collect::<String>()
                ),
                crate::display::printable(&code.user_code.chars().take(50).collect::<String>())
            );
            eprintln!("waiting for the sign-in to complete (Ctrl-C to give up)...");
        },
    )
    .await?;
    secrets.put_secret(&token.store, &refresh).await?;
    let at = match &token.store {
        SecretSource::File(p) => format!("the file {p} (mode 0600)"),
        SecretSource::SecretArn(a) => format!("the secret {a}"),
        SecretSource::Env(_) => unreachable!("refused above"),
    };
    println!("signed in; the sign-in for {field} of {env} is kept in {at}");
    Ok(crate::exit::OK)
}
