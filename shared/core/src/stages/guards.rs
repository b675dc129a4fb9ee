//! The guards every stage applies before touching anything: production, and the identity of the
//! Dataverse organisation behind the registered URL.

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

/// Normalises an environment URL for comparison: lower-case, no trailing slash.
pub(super) fn norm_url(u: &str) -> String {
    u.trim().trim_end_matches('/').to_ascii_lowercase()
}
