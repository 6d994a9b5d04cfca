//! Push credentials per attempt: a [`CredentialBroker`] mints one for the attempt's repository,
//! host-side git receives it through a transient credential helper, and it is revoked when the
//! attempt ends.
//!
//! Boundaries: the credential never enters the sandbox (the agent and verification commands
//! have finished, or have not started, whenever host git runs with it; the helper's file lives
//! outside every directory a sandbox mounts), never appears on a command line, in `.git/config`
//! or in any environment variable (git is configured through `GIT_CONFIG_COUNT`/`KEY`/`VALUE`
//! to run a helper script that `cat`s a 0600 file in a 0700 directory; only the file's path is
//! in the environment), and the directory is removed when the [`CredentialHelper`] is dropped.
//!
//! Brokers: [`StaticTokenBroker`] (a token file per URL prefix, for tests and simple setups:
//! "revoking" only forgets it, the forge's token stays valid). The interface is shaped for
//! forges that mint scoped, expiring tokens, none of which is implemented here:
//! - a GitHub App broker: `mint` signs an app JWT and calls `POST
//!   /app/installations/{id}/access_tokens` with `repositories: [<name>]` and `permissions:
//!   {contents: write}` (1 hour expiry, returned as `expires_at_ms`); `revoke` calls `DELETE
//!   /installation/token` with that token; username `x-access-token`;
//! - a GitLab broker: `mint` creates a project access token (`POST
//!   /projects/:id/access_tokens`, scope `write_repository`, `expires_at` tomorrow: GitLab's
//!   granularity is a day), `credential_id` is the token's id; `revoke` calls `DELETE
//!   /projects/:id/access_tokens/:token_id`.
//!
//! Every mint and revoke becomes a [`CredentialEvent`] in the attempt's result (never the
//! token), which the cluster turns into audit records.

use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use flotilla_proto::v1::CredentialEvent;
use zeroize::Zeroizing;

/// A boxed future, so that brokers are usable as trait objects.
pub type BrokerFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a broker is asked to mint a credential for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MintRequest {
    /// The repository URL the attempt pushes to (a forge broker scopes the credential to it).
    pub repository: String,
    /// The run.
    pub run_id: String,
    /// The attempt number.
    pub attempt: u32,
}

/// A push credential: HTTP Basic user name and token. The token is zeroed when dropped and
/// never printed by `Debug`.
pub struct PushCredential {
    /// The broker that minted it.
    pub broker: String,
    /// HTTP Basic user name.
    pub username: String,
    /// The token (password).
    pub token: Zeroizing<String>,
    /// Expiry, ms since the Unix epoch; 0: does not expire.
    pub expires_at_ms: u64,
    /// A non-secret id of the credential (e.g. a token accessor), or empty.
    pub credential_id: String,
}

impl std::fmt::Debug for PushCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushCredential")
            .field("broker", &self.broker)
            .field("username", &self.username)
            .field("token", &"<redacted>")
            .field("expires_at_ms", &self.expires_at_ms)
            .field("credential_id", &self.credential_id)
            .finish()
    }
}

/// Why a credential could not be minted or revoked. Messages never contain a token.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The broker's configuration or a token file is unusable.
    #[error("{0}")]
    Configuration(String),
    /// The forge refused or could not be reached (retryable).
    #[error("{0}")]
    Unavailable(String),
}

/// Mints and revokes push credentials, one per attempt.
pub trait CredentialBroker: Send + Sync + std::fmt::Debug {
    /// The broker's name in credential events (`static`, `github-app`, ...).
    fn name(&self) -> &str;

    /// A credential for `request.repository`, valid at least until the attempt's push; `None`
    /// when this broker has none for that repository (the push then goes without one).
    fn mint<'a>(
        &'a self,
        request: &'a MintRequest,
    ) -> BrokerFuture<'a, Result<Option<PushCredential>, CredentialError>>;

    /// Invalidates `credential` (at the forge, where it can).
    fn revoke<'a>(
        &'a self,
        credential: &'a PushCredential,
    ) -> BrokerFuture<'a, Result<(), CredentialError>>;
}

/// One entry of [`StaticTokenBroker`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaticToken {
    /// Repository URLs starting with this use the token.
    pub url_prefix: String,
    /// The token's file (mode 0600, read at each mint so it can be replaced).
    pub token_file: PathBuf,
    /// HTTP Basic user name; empty: `x-access-token`.
    pub username: String,
}

/// Longest token accepted from a token file, in bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// Static tokens per URL prefix (the longest matching prefix wins).
#[derive(Clone, Debug, Default)]
pub struct StaticTokenBroker {
    entries: Vec<StaticToken>,
}

impl StaticTokenBroker {
    /// A broker over `entries`.
    pub fn new(entries: Vec<StaticToken>) -> Self {
        StaticTokenBroker { entries }
    }
}

fn read_token_file(path: &Path) -> Result<Zeroizing<String>, CredentialError> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).map_err(|error| {
        CredentialError::Configuration(format!("token file {}: {error}", path.display()))
    })?;
    if metadata.mode() & 0o077 != 0 {
        return Err(CredentialError::Configuration(format!(
            "token file {} is readable by others (mode {:o}); chmod 600 it",
            path.display(),
            metadata.mode() & 0o777
        )));
    }
    if metadata.len() > MAX_TOKEN_BYTES as u64 {
        return Err(CredentialError::Configuration(format!(
            "token file {} is larger than {MAX_TOKEN_BYTES} bytes",
            path.display()
        )));
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|error| {
        CredentialError::Configuration(format!("token file {}: {error}", path.display()))
    })?);
    let token = text.trim();
    if token.is_empty() || token.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(CredentialError::Configuration(format!(
            "token file {} must hold one token on one line",
            path.display()
        )));
    }
    Ok(Zeroizing::new(token.to_owned()))
}

impl CredentialBroker for StaticTokenBroker {
    fn name(&self) -> &str {
        "static"
    }

    fn mint<'a>(
        &'a self,
        request: &'a MintRequest,
    ) -> BrokerFuture<'a, Result<Option<PushCredential>, CredentialError>> {
        Box::pin(async move {
            let Some(entry) = self
                .entries
                .iter()
                .filter(|entry| request.repository.starts_with(&entry.url_prefix))
                .max_by_key(|entry| entry.url_prefix.len())
            else {
                return Ok(None);
            };
            let token = read_token_file(&entry.token_file)?;
            Ok(Some(PushCredential {
                broker: self.name().to_owned(),
                username: if entry.username.is_empty() {
                    "x-access-token".to_owned()
                } else {
                    entry.username.clone()
                },
                token,
                expires_at_ms: 0,
                credential_id: format!("static:{}", entry.url_prefix),
            }))
        })
    }

    fn revoke<'a>(
        &'a self,
        _credential: &'a PushCredential,
    ) -> BrokerFuture<'a, Result<(), CredentialError>> {
        // A static token cannot be revoked from here: the worker only forgets it.
        Box::pin(async { Ok(()) })
    }
}

/// Milliseconds since the Unix epoch on the worker's clock.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A credential event for `repository` (credentials in the URL redacted).
pub fn event(
    kind: &str,
    broker: &str,
    repository: &str,
    credential: Option<&PushCredential>,
    error: &str,
) -> CredentialEvent {
    CredentialEvent {
        kind: kind.to_owned(),
        broker: broker.to_owned(),
        repository: crate::git::redact_url_credentials(repository),
        expires_at_ms: credential.map_or(0, |c| c.expires_at_ms),
        time_ms: now_ms(),
        credential_id: credential.map_or_else(String::new, |c| c.credential_id.clone()),
        error: error.chars().take(1024).collect(),
    }
}

/// The script git runs as its credential helper: answers `get` with the contents of the file
/// named by `FLOTILLA_CREDENTIAL_FILE`, ignores `store` and `erase`.
const HELPER_SCRIPT: &str =
    "!f() { test \"$1\" = get && cat \"$FLOTILLA_CREDENTIAL_FILE\"; true; }; f";

/// A transient credential helper for host git: a private directory (0700) holding one file
/// (0600) in git's credential format, and the environment that makes git read it. The
/// directory is removed on drop.
#[derive(Debug)]
pub struct CredentialHelper {
    directory: tempfile::TempDir,
    file: PathBuf,
}

impl CredentialHelper {
    /// Writes `credential` for `url`'s protocol and host into a new private directory under
    /// `parent` (created 0700 if missing).
    ///
    /// Errors: the directory or file cannot be created.
    pub fn create(parent: &Path, credential: &PushCredential) -> std::io::Result<Self> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))?;
        let directory = tempfile::Builder::new()
            .prefix("credential-")
            .tempdir_in(parent)?;
        std::fs::set_permissions(directory.path(), std::fs::Permissions::from_mode(0o700))?;
        let file = directory.path().join("credential");
        let mut handle = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&file)?;
        let contents = Zeroizing::new(format!(
            "username={}\npassword={}\n",
            credential.username,
            credential.token.as_str()
        ));
        handle.write_all(contents.as_bytes())?;
        Ok(CredentialHelper { directory, file })
    }

    /// Environment for host git: resets every configured credential helper, then adds this one
    /// (`GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_n`/`GIT_CONFIG_VALUE_n`), and names the file.
    pub fn environment(&self) -> Vec<(OsString, OsString)> {
        vec![
            ("GIT_CONFIG_COUNT".into(), "2".into()),
            ("GIT_CONFIG_KEY_0".into(), "credential.helper".into()),
            ("GIT_CONFIG_VALUE_0".into(), "".into()),
            ("GIT_CONFIG_KEY_1".into(), "credential.helper".into()),
            ("GIT_CONFIG_VALUE_1".into(), HELPER_SCRIPT.into()),
            (
                "FLOTILLA_CREDENTIAL_FILE".into(),
                self.file.clone().into_os_string(),
            ),
        ]
    }

    /// The private directory (removed on drop).
    pub fn directory(&self) -> &Path {
        self.directory.path()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn token_file(directory: &Path, name: &str, token: &str) -> PathBuf {
        let path = directory.join(name);
        std::fs::write(&path, format!("{token}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    fn request(url: &str) -> MintRequest {
        MintRequest {
            repository: url.into(),
            run_id: "fl-1-0".into(),
            attempt: 1,
        }
    }

    #[tokio::test]
    async fn the_longest_prefix_wins_and_files_must_be_private() {
        let directory = tempfile::tempdir().unwrap();
        let broad = token_file(directory.path(), "broad", "broad-token");
        let narrow = token_file(directory.path(), "narrow", "narrow-token");
        let broker = StaticTokenBroker::new(vec![
            StaticToken {
                url_prefix: "http://127.0.0.1:1/".into(),
                token_file: broad,
                username: String::new(),
            },
            StaticToken {
                url_prefix: "http://127.0.0.1:1/team/".into(),
                token_file: narrow.clone(),
                username: "bot".into(),
            },
        ]);
        let minted = broker
            .mint(&request("http://127.0.0.1:1/team/a.git"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (minted.username.as_str(), minted.token.as_str()),
            ("bot", "narrow-token")
        );
        assert!(!format!("{minted:?}").contains("narrow-token"));
        let minted = broker
            .mint(&request("http://127.0.0.1:1/other/a.git"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (minted.username.as_str(), minted.token.as_str()),
            ("x-access-token", "broad-token")
        );
        assert!(
            broker
                .mint(&request("file:///srv/a"))
                .await
                .unwrap()
                .is_none()
        );
        std::fs::set_permissions(&narrow, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = broker
            .mint(&request("http://127.0.0.1:1/team/a.git"))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("chmod 600"), "{error}");
    }

    #[test]
    fn the_helper_directory_is_private_and_removed_on_drop() {
        use std::os::unix::fs::MetadataExt as _;
        let directory = tempfile::tempdir().unwrap();
        let credential = PushCredential {
            broker: "static".into(),
            username: "u".into(),
            token: Zeroizing::new("the-token-value".into()),
            expires_at_ms: 0,
            credential_id: String::new(),
        };
        let helper =
            CredentialHelper::create(&directory.path().join("credentials"), &credential).unwrap();
        let private = helper.directory().to_path_buf();
        assert_eq!(std::fs::metadata(&private).unwrap().mode() & 0o777, 0o700);
        let file = private.join("credential");
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
        let environment = format!("{:?}", helper.environment());
        assert!(!environment.contains("the-token-value"), "{environment}");
        drop(helper);
        assert!(!private.exists());
    }
}
