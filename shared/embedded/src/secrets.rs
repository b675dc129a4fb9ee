//! Secrets in embedded mode: the process environment variable an entry names, or a file
//! readable by its owner only. The registry file's entries are resolved when it is read; this
//! serves whatever a client asks for later, and stores a rotated sign-in back into its file.

use async_trait::async_trait;
use relink_core::error::{Error, Result};
use relink_core::ports::SecretStore;
use relink_core::registry::{Secret, SecretSource};

/// [`SecretStore`] over this process's environment and owner-only files.
pub struct EnvSecrets;

/// Longest secret file read (a refresh token is a few kilobytes).
const MAX_FILE: u64 = 64 * 1024;

#[async_trait]
impl SecretStore for EnvSecrets {
    async fn secret(&self, source: &SecretSource) -> Result<Secret> {
        match source {
            SecretSource::Env(var) => std::env::var(var).map(Secret::new).map_err(|_| {
                Error::Config(format!(
                    "the environment variable {var} named as a secret in relink.toml is not set"
                ))
            }),
            SecretSource::SecretArn(arn) => Err(Error::Config(format!(
                "{arn}: relink run reads secrets from environment variables ({{ env = \"VARIABLE\" }}) or files ({{ file = \"PATH\" }}); secret_arn is read only in AWS mode"
            ))),
            SecretSource::File(path) => read_owner_only(path),
        }
    }

    async fn put_secret(&self, source: &SecretSource, value: &Secret) -> Result<()> {
        match source {
            SecretSource::File(path) => write_owner_only(path, value),
            SecretSource::Env(var) => Err(Error::Config(format!(
                "the environment variable {var} cannot be written by relink; name a file instead ({{ file = \"PATH\" }}) so a rotated sign-in is kept"
            ))),
            SecretSource::SecretArn(arn) => Err(Error::Config(format!(
                "{arn}: secret_arn is written only in AWS mode"
            ))),
        }
    }
}

fn read_owner_only(path: &str) -> Result<Secret> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::File::open(path).map_err(|e| {
        Error::Config(format!(
            "cannot read the secret file {path}: {e}; create it with relink auth login, or check the path"
        ))
    })?;
    let meta = file
        .metadata()
        .map_err(|e| Error::Config(format!("secret file {path}: {e}")))?;
    if meta.mode() & 0o077 != 0 {
        return Err(Error::Config(format!(
            "the secret file {path} can be read by others (mode {:o}); run chmod 600 {path}",
            meta.mode() & 0o777
        )));
    }
    let mut text = String::new();
    file.take(MAX_FILE)
        .read_to_string(&mut text)
        .map_err(|e| Error::Config(format!("secret file {path}: {e}")))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(Error::Config(format!(
            "the secret file {path} is empty; run relink auth login"
        )));
    }
    Ok(Secret::new(text))
}

/// Replaces the file atomically (a new file of mode 0600 renamed over it).
fn write_owner_only(path: &str, value: &Secret) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let target = std::path::Path::new(path);
    let tmp = target.with_extension(format!("tmp-{}", std::process::id()));
    let fail =
        |e: std::io::Error| Error::Config(format!("cannot write the secret file {path}: {e}"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(value.expose().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(fail)?;
    std::fs::rename(&tmp, target).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn files_are_owner_only_and_replaced_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("relink-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token").to_string_lossy().to_string();
        let source = SecretSource::File(path.clone());
        EnvSecrets
            .put_secret(&source, &Secret::new("first"))
            .await
            .unwrap();
        EnvSecrets
            .put_secret(&source, &Secret::new("second"))
            .await
            .unwrap();
        assert_eq!(EnvSecrets.secret(&source).await.unwrap().expose(), "second");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = EnvSecrets.secret(&source).await.unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let e = EnvSecrets
            .put_secret(&SecretSource::Env("X".into()), &Secret::new("v"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be written"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
