//! The guards every stage applies before touching anything: production (the registry's word and
//! the platform's), the identity of the Dataverse organisation behind the registered URL, and the
//! pairing of that Dataverse with the registered F&O environment.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ports::{DataverseApi, Organization};
use crate::registry::{EnvConfig, EnvKind};

/// Refuses a production environment unless the registry allows it.
pub fn guard_production(env: &EnvConfig) -> Result<()> {
    if env.kind == EnvKind::Production && !env.allow_production {
        return Err(Error::Refused(format!(
            "environment `{}` is kind = \"production\"; relink deletes dual-write keys in production only when its registry entry sets allow_production = true",
            env.id
        )));
    }
    Ok(())
}

/// Confirms the Dataverse behind `dataverse_url` is the registered organisation.
pub async fn guard_identity(env: &EnvConfig, dv: &dyn DataverseApi) -> Result<Organization> {
    let org = dv.current_organization().await?;
    let name_ok = org
        .unique_name
        .eq_ignore_ascii_case(&env.dataverse_unique_name);
    let id_ok = env.dataverse_organization_id.is_none_or(|want| {
        uuid::Uuid::parse_str(&org.organization_id).is_ok_and(|got| got == want)
    });
    if !name_ok || !id_ok {
        return Err(Error::Refused(format!(
            "the Dataverse at {} is organisation {} ({}), but the registry expects {}{}; nothing was deleted. Check dataverse_url and dataverse_unique_name for `{}`",
            env.dataverse_url,
            org.unique_name,
            org.organization_id,
            env.dataverse_unique_name,
            env.dataverse_organization_id
                .map(|id| format!(" ({id})"))
                .unwrap_or_default(),
            env.id
        )));
    }
    Ok(org)
}

/// Which guards ran before a stage touched anything, and on what evidence; recorded in the
/// stage's outcome (`guards`) and shown by `relink status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardEvidence {
    /// The organisation `RetrieveCurrentOrganization` named.
    pub identity: String,
    /// Why the environment is not treated as production (or is, and allowed).
    pub production: String,
    /// How the Dataverse's F&O pairing was confirmed (or why it was allowed unverified).
    pub pairing: String,
}

/// The guards before any stage, destructive or not: the registry's production flag, the
/// organisation's identity, the platform's environment type and the F&O pairing. Each failure is
/// [`Error::Refused`] naming the evidence; transient failures while gathering it are errors of
/// their own (retried), never a pass.
pub async fn guard_target(
    env: &EnvConfig,
    dv: &dyn DataverseApi,
) -> Result<(Organization, GuardEvidence)> {
    guard_production(env)?;
    let org = guard_identity(env, dv).await?;
    let platform = if org.environment_id.is_empty() {
        None
    } else {
        dv.platform_environment(&org.environment_id).await?
    };
    let identity = format!(
        "organisation {} ({}) matches the registry",
        org.unique_name, org.organization_id
    );
    let platform_type = platform.as_ref().and_then(|p| p.environment_type.clone());
    let production = match platform_type.as_deref() {
        Some(t) if t.eq_ignore_ascii_case("production") => {
            if !env.allow_production {
                return Err(Error::Refused(format!(
                    "the Power Platform API says environment {} (organisation {}) is of type Production, although the registry entry `{}` says kind = \"{}\"; relink deletes in production only when the entry sets allow_production = true. Nothing was deleted",
                    org.environment_id,
                    org.unique_name,
                    env.id,
                    env.kind.as_str()
                )));
            }
            format!(
                "Power Platform type Production, allowed by allow_production = true (environment {})",
                org.environment_id
            )
        }
        Some(t) => format!(
            "Power Platform type {} (environment {}); registry kind {}",
            crate::redact::printable(t),
            org.environment_id,
            env.kind.as_str()
        ),
        None => format!(
            "registry kind {} only: {}",
            env.kind.as_str(),
            if org.environment_id.is_empty() {
                "the organisation named no Power Platform environment id"
            } else if env.power_platform_api.is_none() {
                "no power_platform_api configured for this entry"
            } else {
                "the Power Platform API did not answer with the environment's type"
            }
        ),
    };
    let (source, linked) = match dv.fno_integration().await? {
        Some(i) => (
            "RetrieveFinanceAndOperationsIntegrationDetails",
            Some(i.url),
        ),
        None => (
            "the Power Platform API's linked F&O",
            platform.and_then(|p| p.linked_fno_url),
        ),
    };
    let pairing = match linked {
        Some(url) if same_environment(&url, &env.fno_url) => {
            format!("{source} names {url}, the registered fno_url")
        }
        Some(url) => {
            return Err(Error::Refused(format!(
                "Dataverse {} is linked to F&O {} ({source}), not to the registered {}; nothing was deleted. Fix the Power Platform integration in LCS, or fno_url for `{}`",
                org.unique_name,
                crate::redact::printable(&url),
                env.fno_url,
                env.id
            )));
        }
        None if env.allow_unverified_pairing => {
            "unverified: neither Dataverse nor the Power Platform API named the linked F&O; allowed by allow_unverified_pairing = true".into()
        }
        None => {
            return Err(Error::Refused(format!(
                "cannot confirm that Dataverse {} is linked to F&O {}: RetrieveFinanceAndOperationsIntegrationDetails named no environment and the Power Platform API gave no linked F&O. Nothing was deleted. If the pairing is right, set allow_unverified_pairing = true on `{}`",
                org.unique_name, env.fno_url, env.id
            )));
        }
    };
    Ok((
        org,
        GuardEvidence {
            identity,
            production,
            pairing,
        },
    ))
}

/// Whether `named` (a URL a service reported) is the environment at `registered`: same host and
/// port, same path ignoring case and trailing slashes.
fn same_environment(named: &str, registered: &url::Url) -> bool {
    let Ok(named) = url::Url::parse(named.trim()) else {
        return false;
    };
    let path = |u: &url::Url| u.path().trim_end_matches('/').to_ascii_lowercase();
    named.host_str().is_some()
        && named.host_str().map(str::to_ascii_lowercase)
            == registered.host_str().map(str::to_ascii_lowercase)
        && named.port_or_known_default() == registered.port_or_known_default()
        && path(&named) == path(registered)
}

/// Normalises an environment URL for comparison: lower-case, no trailing slash.
pub(super) fn norm_url(u: &str) -> String {
    u.trim().trim_end_matches('/').to_ascii_lowercase()
}
