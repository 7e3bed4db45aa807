//! HTTP Basic authentication for `/system/*`: credentials from config or files, or a password
//! generated on first start; compared in constant time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{header, StatusCode};
use rand::distr::{Alphanumeric, SampleString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;

pub const USER_FILE: &str = "basic-auth-user";
pub const PASSWORD_FILE: &str = "basic-auth-password";

#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Where the credentials came from, to tell the operator at start-up.
pub enum CredentialSource {
    Configured,
    Stored(PathBuf),
    Generated(PathBuf),
}

/// `expected: None` means authentication is off.
pub struct Auth {
    expected: Option<[u8; 32]>,
    /// Also accepted on `/system/alert` as `Authorization: Bearer <token>`.
    alert_bearer: Option<[u8; 32]>,
}

/// Compares a presented token with the expected one in constant time (both hashed first, so
/// neither content nor length leaks).
pub fn tokens_match(given: &str, expected: &str) -> bool {
    digest("token", given)
        .ct_eq(&digest("token", expected))
        .into()
}

fn digest(user: &str, password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(user.as_bytes());
    h.update([0u8]);
    h.update(password.as_bytes());
    h.finalize().into()
}

impl Auth {
    pub fn disabled() -> Arc<Auth> {
        Arc::new(Auth {
            expected: None,
            alert_bearer: None,
        })
    }

    pub fn basic(creds: &Credentials, alert_bearer: Option<&str>) -> Arc<Auth> {
        Arc::new(Auth {
            expected: Some(digest(&creds.user, &creds.password)),
            alert_bearer: alert_bearer.map(|t| digest("bearer", t)),
        })
    }

    /// Basic credentials, or the alert bearer token when one is configured.
    pub fn allows_alert(&self, authorization: Option<&str>) -> bool {
        if self.allows(authorization) {
            return true;
        }
        match (
            &self.alert_bearer,
            authorization.and_then(|h| h.strip_prefix("Bearer ")),
        ) {
            (Some(expected), Some(token)) => digest("bearer", token.trim()).ct_eq(expected).into(),
            _ => false,
        }
    }

    /// True when the `Authorization` header carries the right user and password. Both are
    /// hashed and the digests compared in constant time, so neither content nor length leaks.
    pub fn allows(&self, authorization: Option<&str>) -> bool {
        let Some(expected) = &self.expected else {
            return true;
        };
        let Some(encoded) = authorization.and_then(|h| {
            h.strip_prefix("Basic ")
                .or_else(|| h.strip_prefix("basic "))
        }) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((user, password)) = decoded.split_once(':') else {
            return false;
        };
        digest(user, password).ct_eq(expected).into()
    }
}

fn authorization(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

pub async fn require_basic(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    if auth.allows(authorization(&req)) {
        next.run(req).await
    } else {
        unauthorized()
    }
}

pub async fn require_alert(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    if auth.allows_alert(authorization(&req)) {
        next.run(req).await
    } else {
        unauthorized()
    }
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::WWW_AUTHENTICATE, "Basic realm=\"Restricted\""),
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        ],
        "invalid credentials\n",
    )
        .into_response()
}

fn read_trimmed(path: &Path, what: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} from {}", path.display()))?;
    let text = text.trim().to_string();
    if text.is_empty() {
        bail!("{what} file {} is empty", path.display());
    }
    Ok(text)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    Ok(())
}

/// Credentials from config (`user`/`user_file`, `password_file`), else the ones stored in the
/// data directory, else new ones generated there (user `admin`, 32 random alphanumerics, 0600).
pub fn resolve_credentials(
    cfg: &AuthConfig,
    data_dir: &Path,
) -> anyhow::Result<(Credentials, CredentialSource)> {
    let stored_user = data_dir.join(USER_FILE);
    let stored_password = data_dir.join(PASSWORD_FILE);
    let user = match (&cfg.user, &cfg.user_file) {
        (Some(user), _) if !user.is_empty() => user.clone(),
        (_, Some(file)) => read_trimmed(file, "auth.user_file")?,
        _ if stored_user.exists() => read_trimmed(&stored_user, "user")?,
        _ => "admin".to_string(),
    };
    if let Some(file) = &cfg.password_file {
        let password = read_trimmed(file, "auth.password_file")?;
        crate::platform::isolation::warn_if_readable_by_others(file, "auth.password_file");
        return Ok((Credentials { user, password }, CredentialSource::Configured));
    }
    if stored_password.exists() {
        let password = read_trimmed(&stored_password, "password")?;
        return Ok((
            Credentials { user, password },
            CredentialSource::Stored(stored_password),
        ));
    }
    let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
    write_private(&stored_user, &user)?;
    write_private(&stored_password, &password)?;
    Ok((
        Credentials { user, password },
        CredentialSource::Generated(stored_password),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    #[test]
    fn checks_user_and_password() {
        let auth = Auth::basic(
            &Credentials {
                user: "admin".into(),
                password: "s3cret".into(),
            },
            Some("tok"),
        );
        assert!(auth.allows_alert(Some("Bearer tok")));
        assert!(!auth.allows_alert(Some("Bearer nope")));
        assert!(
            !auth.allows(Some("Bearer tok")),
            "the token is for alerts only"
        );
        assert!(auth.allows(Some(&basic("admin", "s3cret"))));
        assert!(!auth.allows(Some(&basic("admin", "s3cre"))));
        assert!(!auth.allows(Some(&basic("root", "s3cret"))));
        assert!(!auth.allows(Some("Bearer")));
        assert!(!auth.allows(Some("Basic !!!")));
        assert!(!auth.allows(None));
        assert!(Auth::disabled().allows(Some("Bearer")));
    }

    #[test]
    fn generates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AuthConfig {
            enabled: true,
            user: None,
            user_file: None,
            password_file: None,
        };
        let (first, source) = resolve_credentials(&cfg, dir.path()).unwrap();
        assert!(matches!(source, CredentialSource::Generated(_)));
        assert_eq!(first.user, "admin");
        assert_eq!(first.password.len(), 32);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(PASSWORD_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (second, source) = resolve_credentials(&cfg, dir.path()).unwrap();
        assert!(matches!(source, CredentialSource::Stored(_)));
        assert_eq!(second.password, first.password);
    }
}
