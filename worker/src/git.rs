//! Host-side git: a mirror cache per repository URL, a fresh clone per attempt, and publishing
//! (commit, diffstat, patch, push).
//!
//! Every git command runs hardened — `-c core.hooksPath=/dev/null -c core.fsmonitor=false`,
//! `GIT_CONFIG_NOSYSTEM=1`, `GIT_TERMINAL_PROMPT=0`, no inherited `GIT_DIR`-like variables,
//! `--no-ext-diff --no-textconv` for diffs — in its own process group, with a timeout
//! ([`WorkerConfig::git_timeout_ms`]) and cancellation that kill the group, and with its output
//! read up to [`WorkerConfig::git_output_max_bytes`].
//!
//! Layout: `<work_directory>/mirrors/<name>-<hash>.git` (see [`mirror_path`]), created with
//! `git clone --mirror` and refreshed with `git fetch --prune`, under a per-mirror async mutex
//! so concurrent runs of one repository never race on it. The mirrors form a bounded cache
//! ([`crate::mirror_cache`]: least recently used mirrors not in use are deleted past
//! [`WorkerConfig::mirror_cache_max_mirrors`] or [`WorkerConfig::mirror_cache_max_bytes`]).
//! Each attempt clones the mirror locally (hard-linked objects, no alternates, so the clone is
//! self-contained and git works inside the sandbox) and points `origin` at the real URL.

use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::FileStat;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::mirror_cache::{MirrorCache, MirrorUse};

/// Configuration options passed with `-c` to every host git command.
pub const HARDENED_GIT_OPTIONS: &[&str] = &[
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    // The workspace is owned by the sandbox's uid, not the worker's: git would refuse it as of
    // "dubious ownership". Only worker-made repositories are ever opened, and every option that
    // makes git run a program is pinned here or comes from no file the agent can write (the
    // agent cannot write `.git`, and no global or system configuration is read).
    "safe.directory=*",
    "core.untrackedCache=false",
    "protocol.ext.allow=never",
    "protocol.file.allow=always",
    "submodule.recurse=false",
    "commit.gpgSign=false",
    "tag.gpgSign=false",
];

/// Environment variables removed from every host git command (they would redirect it).
const REMOVED_GIT_VARIABLES: &[&str] = &[
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_CONFIG",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
    "GIT_EXTERNAL_DIFF",
    "GIT_EXEC_PATH",
    "GIT_TEMPLATE_DIR",
    "GIT_CEILING_DIRECTORIES",
    "GIT_DISCOVERY_ACROSS_FILESYSTEM",
];

/// Bytes of a failed git command's standard error kept for the error message.
const STDERR_MAX_BYTES: usize = 64 * 1024;

/// Errors of host git commands.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// git could not be started.
    #[error("cannot run {path}: {source}")]
    Spawn {
        /// The git executable.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// git exited non-zero.
    #[error("git {command} failed ({status}): {stderr}")]
    Failed {
        /// The git arguments after the hardening options, e.g. `fetch --prune origin`.
        command: String,
        /// The exit status, as text.
        status: String,
        /// The end of git's standard error.
        stderr: String,
    },
    /// git did not finish within the timeout and was killed.
    #[error("git {command} timed out after {timeout_ms} ms")]
    TimedOut {
        /// The git arguments.
        command: String,
        /// The timeout in milliseconds.
        timeout_ms: u64,
    },
    /// The cancellation token fired; git was killed.
    #[error("git {command} cancelled")]
    Cancelled {
        /// The git arguments.
        command: String,
    },
    /// A file system operation around git failed.
    #[error("cannot prepare {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Bad input (e.g. an invalid branch name or an empty URL).
    #[error("{message}")]
    Invalid {
        /// What is wrong.
        message: String,
    },
    /// git printed something the worker cannot parse.
    #[error("unexpected output of git {command}: {message}")]
    Output {
        /// The git arguments.
        command: String,
        /// What is wrong.
        message: String,
    },
}

impl GitError {
    /// Whether the error came from cancellation.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, GitError::Cancelled { .. })
    }

    /// Whether another attempt may succeed (network, remote, time and file system problems; not
    /// invalid input).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, GitError::Invalid { .. })
    }
}

/// What a git command printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GitOutput {
    /// Its exit code (`None`: killed by a signal).
    pub exit_code: Option<i32>,
    /// Its standard output, up to the command's output cap.
    pub stdout: Vec<u8>,
    /// Whether standard output was longer than the cap (the rest was discarded).
    pub stdout_truncated: bool,
    /// Its standard error (the first 64 KiB), lossily decoded.
    pub stderr: String,
}

/// Runs host git commands with the worker's settings (executable, timeout, output cap, author).
#[derive(Clone, Debug)]
pub struct Git {
    path: PathBuf,
    timeout_ms: u64,
    output_max_bytes: usize,
    author_name: String,
    author_email: String,
    /// Set on every command after the hardening (a transient credential helper's settings).
    extra_environment: Vec<(OsString, OsString)>,
}

async fn read_capped<R: AsyncRead + Unpin>(reader: Option<R>, max_bytes: usize) -> (Vec<u8>, bool) {
    let Some(mut reader) = reader else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buffer = vec![0_u8; 64 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(count) => {
                let room = max_bytes.saturating_sub(kept.len());
                if count > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buffer[..count.min(room)]);
            }
        }
    }
    (kept, truncated)
}

fn kill_process_group(process_id: Option<u32>) {
    if let Some(id) = process_id.and_then(|id| libc::pid_t::try_from(id).ok())
        && id > 0
    {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-id, libc::SIGKILL);
        }
    }
}

fn describe_arguments(arguments: &[OsString]) -> String {
    arguments
        .iter()
        .map(|argument| argument.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

impl Git {
    /// The runner for `config`'s git executable, timeout, output cap and author.
    pub fn from_config(config: &WorkerConfig) -> Self {
        Git {
            path: config.git_path.clone(),
            timeout_ms: config.git_timeout_ms,
            output_max_bytes: config.git_output_max_bytes,
            author_name: config.git_author_name.clone(),
            author_email: config.git_author_email.clone(),
            extra_environment: Vec::new(),
        }
    }

    /// This runner with `environment` added to every command (after the variables it removes,
    /// so `GIT_CONFIG_COUNT` and friends from here take effect): how a transient credential
    /// helper ([`crate::credentials::CredentialHelper`]) reaches host git without a command
    /// line or `.git/config` entry.
    pub fn with_environment(&self, environment: Vec<(OsString, OsString)>) -> Self {
        let mut git = self.clone();
        git.extra_environment.extend(environment);
        git
    }

    /// Runs `git -c <hardening>... <arguments>` in `directory`, reading standard output up to
    /// `stdout_max_bytes`. Returns the output whatever the exit status.
    ///
    /// Errors: [`GitError::Spawn`], [`GitError::TimedOut`], [`GitError::Cancelled`].
    pub async fn run_unchecked<I, S>(
        &self,
        directory: &Path,
        arguments: I,
        stdout_max_bytes: usize,
        cancel: &CancellationToken,
    ) -> Result<GitOutput, GitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let arguments: Vec<OsString> = arguments
            .into_iter()
            .map(|argument| argument.as_ref().to_owned())
            .collect();
        let mut process = tokio::process::Command::new(&self.path);
        for option in HARDENED_GIT_OPTIONS {
            process.arg("-c").arg(option);
        }
        process.args(&arguments).current_dir(directory);
        for name in REMOVED_GIT_VARIABLES {
            process.env_remove(name);
        }
        process
            .env("GIT_CONFIG_NOSYSTEM", "1")
            // No global configuration either (a filter driver defined there, e.g. git-lfs's,
            // would run for a path the agent's `.gitattributes` names).
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            // Only known transports (file, git, http(s), ssh): no arbitrary remote helpers.
            .env("GIT_PROTOCOL_FROM_USER", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false")
            .env("LC_ALL", "C")
            .env("GIT_AUTHOR_NAME", &self.author_name)
            .env("GIT_AUTHOR_EMAIL", &self.author_email)
            .env("GIT_COMMITTER_NAME", &self.author_name)
            .env("GIT_COMMITTER_EMAIL", &self.author_email);
        if std::env::var_os("GIT_SSH_COMMAND").is_none() {
            process.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
        }
        for (name, value) in &self.extra_environment {
            process.env(name, value);
        }
        process
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = process.spawn().map_err(|source| GitError::Spawn {
            path: self.path.clone(),
            source,
        })?;
        let process_id = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let work = async {
            let (stdout, stderr, status) = tokio::join!(
                read_capped(stdout, stdout_max_bytes),
                read_capped(stderr, STDERR_MAX_BYTES),
                child.wait()
            );
            (stdout, stderr, status)
        };
        let timeout = Duration::from_millis(self.timeout_ms.max(1));
        let ((stdout, stdout_truncated), (stderr, _), status) = tokio::select! {
            result = work => result,
            () = tokio::time::sleep(timeout) => {
                kill_process_group(process_id);
                return Err(GitError::TimedOut { command: describe_arguments(&arguments), timeout_ms: self.timeout_ms });
            }
            () = cancel.cancelled() => {
                kill_process_group(process_id);
                return Err(GitError::Cancelled { command: describe_arguments(&arguments) });
            }
        };
        let status = status.map_err(|source| GitError::Spawn {
            path: self.path.clone(),
            source,
        })?;
        Ok(GitOutput {
            exit_code: status.code(),
            stdout,
            stdout_truncated,
            stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
        })
    }

    /// [`Git::run_unchecked`] with the configured output cap, failing unless git exits 0.
    ///
    /// Errors: as [`Git::run_unchecked`], and [`GitError::Failed`].
    pub async fn run<I, S>(
        &self,
        directory: &Path,
        arguments: I,
        cancel: &CancellationToken,
    ) -> Result<GitOutput, GitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let arguments: Vec<OsString> = arguments
            .into_iter()
            .map(|argument| argument.as_ref().to_owned())
            .collect();
        let output = self
            .run_unchecked(directory, &arguments, self.output_max_bytes, cancel)
            .await?;
        if output.exit_code != Some(0) {
            return Err(GitError::Failed {
                command: describe_arguments(&arguments),
                status: output.exit_code.map_or_else(
                    || "killed by a signal".to_owned(),
                    |code| format!("exit code {code}"),
                ),
                stderr: output.stderr,
            });
        }
        Ok(output)
    }

    /// [`Git::run`], returning standard output as trimmed text.
    ///
    /// Errors: as [`Git::run`].
    pub async fn run_text<I, S>(
        &self,
        directory: &Path,
        arguments: I,
        cancel: &CancellationToken,
    ) -> Result<String, GitError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let output = self.run(directory, arguments, cancel).await?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

/// SHA-256 of `bytes` as 64 lowercase hex digits.
fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// The last path segment of a repository URL without `.git`, e.g. `widgets` for
/// `https://example.com/acme/widgets.git` or `/srv/git/widgets/`.
pub fn repository_name(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    let last = trimmed.rsplit(['/', ':']).next().unwrap_or(trimmed);
    last.strip_suffix(".git").unwrap_or(last).to_owned()
}

/// The mirror directory for `url` under `mirrors_directory`:
/// `<repository name, sanitized to [A-Za-z0-9._-], at most 64 characters>-<SHA-256 of the URL,
/// 64 hex digits>.git`. Distinct URLs get distinct directories: the hash is
/// collision-resistant, so no URL can be crafted to share another repository's mirror.
pub fn mirror_path(mirrors_directory: &Path, url: &str) -> PathBuf {
    let name: String = repository_name(url)
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-') {
                character
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let name = name.trim_start_matches('.');
    let name = if name.is_empty() { "repository" } else { name };
    mirrors_directory.join(format!("{name}-{}.git", sha256_hex(url.as_bytes())))
}

/// The shared mirror cache of `config`'s mirrors directory, with its limits
/// ([`MirrorCache::shared`]).
pub fn mirror_cache(config: &WorkerConfig) -> Arc<MirrorCache> {
    MirrorCache::shared(
        &config.mirrors_directory(),
        config.mirror_cache_max_mirrors,
        config.mirror_cache_max_bytes,
    )
}

/// How the mirror was brought up to date.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorStatus {
    /// It did not exist (or was broken): cloned from the origin.
    Cloned,
    /// It existed: fetched from the origin.
    Fetched,
}

/// A clone prepared for one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedRepository {
    /// The clone's working tree (`attempts/<run_id>-<attempt>/repo`).
    pub directory: PathBuf,
    /// The branch checked out (created from the default branch).
    pub branch: String,
    /// The default branch's commit the branch starts from; `None` for an empty repository.
    pub base_commit: Option<String>,
    /// Whether the mirror was cloned or fetched.
    pub mirror_status: MirrorStatus,
}

/// The files an attempt changed, committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitSummary {
    /// The new commit's id (hex).
    pub commit: String,
    /// Lines added and removed per file (binary files: 0 and 0), at most
    /// [`WorkerConfig::diffstat_max_files`] entries.
    pub diffstat: Vec<FileStat>,
    /// The patch (`git diff` of the commit), at most [`WorkerConfig::patch_max_bytes`] bytes.
    pub patch: String,
    /// Whether the patch was cut.
    pub patch_truncated: bool,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> GitError + '_ {
    move |source| GitError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Brings the mirror of `url` in `cache` up to date (clone on first use, fetch afterwards) and
/// returns its path. Holds the mirror's lock while doing so, then evicts other mirrors past the
/// cache's limits. A fresh clone goes to a temporary directory and is renamed into place, so an
/// interrupted clone never leaves a broken mirror.
///
/// Errors: [`GitError`] from git or the file system.
pub async fn update_mirror(
    git: &Git,
    cache: &Arc<MirrorCache>,
    url: &str,
    cancel: &CancellationToken,
) -> Result<(PathBuf, MirrorStatus), GitError> {
    let path = mirror_path(cache.directory(), url);
    let mirror = cache.acquire(&path).await;
    let guard = mirror.lock().await;
    let status = update_mirror_locked(git, cache, &mirror, url, cancel).await;
    drop(guard);
    // Still using it: never evicts the mirror just updated.
    cache.evict().await;
    drop(mirror);
    Ok((path, status?))
}

async fn update_mirror_locked(
    git: &Git,
    cache: &MirrorCache,
    mirror: &MirrorUse,
    url: &str,
    cancel: &CancellationToken,
) -> Result<MirrorStatus, GitError> {
    let mirrors_directory = cache.directory();
    let path = mirror.path();
    tokio::fs::create_dir_all(mirrors_directory)
        .await
        .map_err(io_error(mirrors_directory))?;
    let usable = path.is_dir()
        && git
            .run(
                mirrors_directory,
                [
                    OsStr::new("--git-dir"),
                    path.as_os_str(),
                    OsStr::new("rev-parse"),
                    OsStr::new("--git-dir"),
                ],
                cancel,
            )
            .await
            .is_ok();
    if usable {
        let git_directory = path.as_os_str();
        git.run(
            mirrors_directory,
            [
                OsStr::new("--git-dir"),
                git_directory,
                OsStr::new("fetch"),
                OsStr::new("--prune"),
                OsStr::new("--quiet"),
                OsStr::new("origin"),
            ],
            cancel,
        )
        .await?;
        update_mirror_head(git, mirrors_directory, path, cancel).await;
        cache.record_present(mirror).await;
        return Ok(MirrorStatus::Fetched);
    }
    if path.exists() {
        tracing::warn!(mirror = %path.display(), "mirror is broken; cloning it again");
        cache.record_absent(mirror);
        tokio::fs::remove_dir_all(path)
            .await
            .map_err(io_error(path))?;
    }
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    if temporary.exists() {
        tokio::fs::remove_dir_all(&temporary)
            .await
            .map_err(io_error(&temporary))?;
    }
    let cloned = git
        .run(
            mirrors_directory,
            [
                OsStr::new("clone"),
                OsStr::new("--mirror"),
                OsStr::new("--quiet"),
                OsStr::new("--"),
                OsStr::new(url),
                temporary.as_os_str(),
            ],
            cancel,
        )
        .await;
    if let Err(error) = cloned {
        let _ = tokio::fs::remove_dir_all(&temporary).await;
        return Err(error);
    }
    tokio::fs::rename(&temporary, path)
        .await
        .map_err(io_error(path))?;
    cache.record_present(mirror).await;
    Ok(MirrorStatus::Cloned)
}

/// Points the mirror's HEAD at the origin's current default branch (best effort: a failure only
/// leaves the previous default).
async fn update_mirror_head(
    git: &Git,
    mirrors_directory: &Path,
    path: &Path,
    cancel: &CancellationToken,
) {
    let output = git
        .run(
            mirrors_directory,
            [
                OsStr::new("--git-dir"),
                path.as_os_str(),
                OsStr::new("ls-remote"),
                OsStr::new("--symref"),
                OsStr::new("origin"),
                OsStr::new("HEAD"),
            ],
            cancel,
        )
        .await;
    let Ok(output) = output else {
        return;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let head = text.lines().find_map(|line| {
        let rest = line.strip_prefix("ref: ")?;
        let (reference, name) = rest.split_once('\t')?;
        (name == "HEAD" && reference.starts_with("refs/heads/")).then(|| reference.to_owned())
    });
    if let Some(reference) = head {
        let _ = git
            .run(
                mirrors_directory,
                [
                    OsStr::new("--git-dir"),
                    path.as_os_str(),
                    OsStr::new("symbolic-ref"),
                    OsStr::new("HEAD"),
                    OsStr::new(&reference),
                ],
                cancel,
            )
            .await;
    }
}

/// Checks that `url` is a repository location the worker accepts: the one rule the server
/// checks fleet specs with ([`flotilla_domain::repository::validate_repository_url`]), applied
/// again here because a lease is input to the worker like any other.
///
/// Errors: [`GitError::Invalid`].
pub fn validate_repository_url(url: &str) -> Result<(), GitError> {
    flotilla_domain::repository::validate_repository_url(
        url,
        flotilla_domain::repository::MAX_REPOSITORY_URL_BYTES,
    )
    .map_err(|why| GitError::Invalid {
        message: format!(
            "invalid repository {:?}: {why}",
            redact_url_credentials(url)
        ),
    })
}

/// `url` without the user information of a `scheme://user:password@host/...` URL (replaced by
/// nothing), for places the agent or a log can see. Other forms are returned unchanged.
pub fn redact_url_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Checks that `branch` is a valid branch name: the one rule the server checks rendered
/// branches with ([`flotilla_domain::branch::is_valid_branch`]), then git's own
/// `git check-ref-format --branch` (the git that will use it has the last word).
///
/// Errors: [`GitError::Invalid`].
pub async fn validate_branch(
    git: &Git,
    directory: &Path,
    branch: &str,
    cancel: &CancellationToken,
) -> Result<(), GitError> {
    if !flotilla_domain::branch::is_valid_branch(branch) {
        return Err(GitError::Invalid {
            message: format!("invalid branch name {branch:?}"),
        });
    }
    let output = git
        .run_unchecked(
            directory,
            ["check-ref-format", "--branch", branch],
            4096,
            cancel,
        )
        .await?;
    if output.exit_code != Some(0) {
        return Err(GitError::Invalid {
            message: format!("invalid branch name {branch:?}"),
        });
    }
    Ok(())
}

/// Updates the mirror of `url`, clones it into `destination` (which must not exist), sets
/// `origin` to `url` (without credentials, see [`redact_url_credentials`]), and checks out a new `branch` at the default branch's commit (or an unborn
/// `branch` for an empty repository). Holds the mirror's lock until the clone is done.
///
/// Errors: [`GitError`] from git or the file system; [`GitError::Invalid`] for an invalid URL
/// ([`validate_repository_url`]) or branch.
pub async fn prepare_repository(
    git: &Git,
    cache: &Arc<MirrorCache>,
    url: &str,
    destination: &Path,
    branch: &str,
    cancel: &CancellationToken,
) -> Result<PreparedRepository, GitError> {
    validate_repository_url(url)?;
    let parent = destination.parent().unwrap_or(destination);
    tokio::fs::create_dir_all(parent)
        .await
        .map_err(io_error(parent))?;
    validate_branch(git, parent, branch, cancel).await?;

    let path = mirror_path(cache.directory(), url);
    let mirror = cache.acquire(&path).await;
    let guard = mirror.lock().await;
    let cloned = async {
        let mirror_status = update_mirror_locked(git, cache, &mirror, url, cancel).await?;
        git.run(
            parent,
            [
                OsStr::new("clone"),
                OsStr::new("--quiet"),
                OsStr::new("--template="),
                OsStr::new("--"),
                path.as_os_str(),
                destination.as_os_str(),
            ],
            cancel,
        )
        .await?;
        Ok::<_, GitError>(mirror_status)
    }
    .await;
    drop(guard);
    // Still using it: never evicts the mirror just cloned from.
    cache.evict().await;
    drop(mirror);
    let mirror_status = cloned?;

    // The clone's configuration is readable in the sandbox: no credentials in it.
    let public_url = redact_url_credentials(url);
    git.run(
        destination,
        ["remote", "set-url", "origin", public_url.as_str()],
        cancel,
    )
    .await?;
    let head = git
        .run_unchecked(
            destination,
            ["rev-parse", "--verify", "--quiet", "HEAD^{commit}"],
            4096,
            cancel,
        )
        .await?;
    let base_commit = if head.exit_code == Some(0) {
        let commit = String::from_utf8_lossy(&head.stdout).trim().to_owned();
        git.run(destination, ["checkout", "--quiet", "-B", branch], cancel)
            .await?;
        Some(commit)
    } else {
        let reference = format!("refs/heads/{branch}");
        git.run(
            destination,
            ["symbolic-ref", "HEAD", reference.as_str()],
            cancel,
        )
        .await?;
        None
    };
    Ok(PreparedRepository {
        directory: destination.to_path_buf(),
        branch: branch.to_owned(),
        base_commit,
        mirror_status,
    })
}

/// Parses `git diff --numstat -z --no-renames` output: `<added>\t<deleted>\t<path>\0` records,
/// `-` for binary files (counted as 0). At most `max_files` entries.
///
/// Errors: [`GitError::Output`] for a malformed record.
pub fn parse_numstat(output: &[u8], max_files: usize) -> Result<Vec<FileStat>, GitError> {
    let malformed = |message: String| GitError::Output {
        command: "diff --numstat".to_owned(),
        message,
    };
    let mut stats = Vec::new();
    for record in output
        .split(|byte| *byte == 0)
        .filter(|record| !record.is_empty())
    {
        if stats.len() >= max_files {
            break;
        }
        let text = String::from_utf8_lossy(record);
        let mut fields = text.splitn(3, '\t');
        let (Some(added), Some(deleted), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(malformed(format!("record {text:?}")));
        };
        let count = |field: &str| -> Result<u32, GitError> {
            if field == "-" {
                return Ok(0);
            }
            field
                .parse::<u64>()
                .map(|value| u32::try_from(value).unwrap_or(u32::MAX))
                .map_err(|_| malformed(format!("count {field:?}")))
        };
        stats.push(FileStat {
            path: path.to_owned(),
            insertions: count(added)?,
            deletions: count(deleted)?,
        });
    }
    Ok(stats)
}

/// `bytes` as text of at most `max_bytes` bytes (lossily decoded, cut at a character boundary),
/// and whether anything was cut.
pub fn cap_text(bytes: &[u8], already_truncated: bool, max_bytes: usize) -> (String, bool) {
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    let mut truncated = already_truncated;
    if text.len() > max_bytes {
        let mut cut = max_bytes;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        truncated = true;
    }
    (text, truncated)
}

/// Whether the working tree of `directory` differs from HEAD (`git status --porcelain`, untracked
/// files included, ignored files not).
///
/// Errors: [`GitError`].
pub async fn has_changes(
    git: &Git,
    directory: &Path,
    cancel: &CancellationToken,
) -> Result<bool, GitError> {
    let output = git
        .run_unchecked(
            directory,
            [
                "status",
                "--porcelain",
                "-z",
                "--untracked-files=all",
                "--ignore-submodules=all",
            ],
            4096,
            cancel,
        )
        .await?;
    if output.exit_code != Some(0) {
        return Err(GitError::Failed {
            command: "status --porcelain".to_owned(),
            status: format!("{:?}", output.exit_code),
            stderr: output.stderr,
        });
    }
    Ok(!output.stdout.is_empty())
}

/// Removes from the index every gitlink (mode 160000) that `git add -A` staged and HEAD does not
/// have: a nested `.git` the agent made (possibly a `gitdir:` file pointing at another host
/// repository) would otherwise commit that repository's current commit id. Gitlinks HEAD
/// already has (real submodules) are kept. The nested directory's files are not committed.
///
/// Errors: the git commands fail.
async fn drop_new_gitlinks(
    git: &Git,
    directory: &Path,
    cancel: &CancellationToken,
) -> Result<(), GitError> {
    let raw = git
        .run(
            directory,
            [
                "diff",
                "--cached",
                "--raw",
                "-z",
                "--no-renames",
                "--no-abbrev",
            ],
            cancel,
        )
        .await?;
    // Records: ":<old mode> <new mode> <old id> <new id> <status>\0<path>\0".
    let mut fields = raw.stdout.split(|byte| *byte == 0);
    let mut gitlinks: Vec<OsString> = Vec::new();
    while let Some(header) = fields.next() {
        if header.is_empty() {
            continue;
        }
        let Some(path) = fields.next() else { break };
        let header = String::from_utf8_lossy(header);
        let mut parts = header.trim_start_matches(':').split(' ');
        let old_mode = parts.next().unwrap_or_default();
        let new_mode = parts.next().unwrap_or_default();
        if new_mode == "160000" && old_mode != "160000" {
            gitlinks.push(OsStr::from_bytes(path).to_owned());
        }
    }
    if gitlinks.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        ?gitlinks,
        "dropping gitlinks of nested .git directories from the commit"
    );
    let mut arguments: Vec<OsString> =
        vec!["update-index".into(), "--force-remove".into(), "--".into()];
    arguments.extend(gitlinks);
    git.run(directory, arguments, cancel).await?;
    Ok(())
}

/// Stages everything (`git add -A`, `.gitignore` respected) and, if anything changed, commits it
/// on the checked-out branch with `message` (then `trailers`, when not empty, as the message's
/// last paragraph) and the configured author/committer, returning the commit, its diffstat and
/// its patch (capped). Returns `None` when nothing changed.
///
/// Errors: [`GitError`].
pub async fn commit_changes(
    git: &Git,
    config: &WorkerConfig,
    directory: &Path,
    message: &str,
    trailers: &str,
    cancel: &CancellationToken,
) -> Result<Option<CommitSummary>, GitError> {
    if !has_changes(git, directory, cancel).await? {
        return Ok(None);
    }
    git.run(directory, ["add", "-A"], cancel).await?;
    drop_new_gitlinks(git, directory, cancel).await?;
    let staged = git
        .run_unchecked(
            directory,
            ["diff", "--cached", "--quiet", "--no-ext-diff"],
            4096,
            cancel,
        )
        .await?;
    match staged.exit_code {
        Some(0) => return Ok(None),
        Some(1) => {}
        other => {
            return Err(GitError::Failed {
                command: "diff --cached --quiet".to_owned(),
                status: format!("{other:?}"),
                stderr: staged.stderr,
            });
        }
    }
    let numstat = git
        .run(
            directory,
            [
                "diff",
                "--cached",
                "--numstat",
                "-z",
                "--no-renames",
                "--no-ext-diff",
                "--no-textconv",
            ],
            cancel,
        )
        .await?;
    let diffstat = parse_numstat(&numstat.stdout, config.diffstat_max_files)?;
    let patch = git
        .run_unchecked(
            directory,
            [
                "diff",
                "--cached",
                "--no-renames",
                "--no-ext-diff",
                "--no-textconv",
                "--no-color",
            ],
            config.patch_max_bytes,
            cancel,
        )
        .await?;
    if patch.exit_code != Some(0) {
        return Err(GitError::Failed {
            command: "diff --cached".to_owned(),
            status: format!("{:?}", patch.exit_code),
            stderr: patch.stderr,
        });
    }
    let (patch, patch_truncated) = cap_text(
        &patch.stdout,
        patch.stdout_truncated,
        config.patch_max_bytes,
    );
    let message = if message.trim().is_empty() {
        "Flotilla change"
    } else {
        message
    };
    let mut arguments = vec![
        "commit",
        "--quiet",
        "--no-verify",
        "--no-gpg-sign",
        "--allow-empty-message",
        "-m",
        message,
    ];
    if !trailers.is_empty() {
        arguments.extend(["-m", trailers]);
    }
    git.run(directory, arguments, cancel).await?;
    let commit = git
        .run_text(directory, ["rev-parse", "HEAD"], cancel)
        .await?;
    Ok(Some(CommitSummary {
        commit,
        diffstat,
        patch,
        patch_truncated,
    }))
}

/// The name of a secret whose value (in any form [`crate::redact::Redactor`] knows) occurs in
/// the change `commit` made: in a changed file's path or in the full contents of an added or
/// modified blob (binary files and symbolic link targets included), read from git's objects,
/// not from the patch, which is capped and textual. `None` when the change is clean.
///
/// Errors: [`GitError`]; a blob larger than the git output cap cannot be checked and is an
/// error ([`GitError::Invalid`]: the change is refused rather than pushed unchecked).
pub async fn find_secret_in_commit(
    git: &Git,
    directory: &Path,
    commit: &str,
    redactor: &crate::redact::Redactor,
    cancel: &CancellationToken,
) -> Result<Option<String>, GitError> {
    let changes = git
        .run(
            directory,
            [
                "diff-tree",
                "-r",
                "-z",
                "--root",
                "--no-renames",
                "--no-commit-id",
                "--no-ext-diff",
                commit,
            ],
            cancel,
        )
        .await?;
    if changes.stdout_truncated {
        return Err(GitError::Invalid {
            message: "the change lists more files than the git output cap; it cannot be checked for secrets".to_owned(),
        });
    }
    // Records: ":<old mode> <new mode> <old id> <new id> <status>\0<path>\0".
    let mut fields = changes.stdout.split(|byte| *byte == 0);
    while let (Some(meta), Some(path)) = (fields.next(), fields.next()) {
        if let Some(found) = redactor.find(path) {
            return Ok(Some(found.to_owned()));
        }
        let meta = String::from_utf8_lossy(meta);
        let parts: Vec<&str> = meta.trim_start_matches(':').split(' ').collect();
        let [_, new_mode, _, new_id, ..] = parts.as_slice() else {
            continue;
        };
        // Deleted files have no new blob; gitlinks (160000) are not blobs of this repository.
        if new_id.bytes().all(|byte| byte == b'0') || *new_mode == "160000" {
            continue;
        }
        let blob = git
            .run_unchecked(
                directory,
                ["cat-file", "blob", *new_id],
                git.output_max_bytes,
                cancel,
            )
            .await?;
        if blob.exit_code != Some(0) {
            return Err(GitError::Failed {
                command: format!("cat-file blob {new_id}"),
                status: format!("{:?}", blob.exit_code),
                stderr: blob.stderr,
            });
        }
        if blob.stdout_truncated {
            return Err(GitError::Invalid {
                message: format!(
                    "a changed file is larger than the git output cap ({} bytes); it cannot be checked for secrets",
                    git.output_max_bytes
                ),
            });
        }
        if let Some(found) = redactor.find(&blob.stdout) {
            return Ok(Some(found.to_owned()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_urls_are_validated() {
        for good in [
            "https://example.com/a/b.git",
            "file:///srv/git/x.git",
            "ssh://git@example.com/x.git",
            "/srv/git/x.git",
        ] {
            assert!(validate_repository_url(good).is_ok(), "{good}");
        }
        // scp-like `user@host:path` is refused, as the server refuses it in fleet specs: one
        // rule for both (flotilla_domain).
        for bad in [
            "",
            "relative/path",
            "-uploadpack=evil",
            "x\ny",
            "://x",
            "git@example.com:acme/x.git",
            "ext::sh -c touch% /tmp/pwned",
        ] {
            assert!(validate_repository_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(
            redact_url_credentials("https://user:token@example.com/a/b.git"),
            "https://example.com/a/b.git"
        );
        assert_eq!(
            redact_url_credentials("https://example.com/a@b.git"),
            "https://example.com/a@b.git"
        );
        assert_eq!(
            redact_url_credentials("git@example.com:a/b.git"),
            "git@example.com:a/b.git"
        );
    }

    #[test]
    fn repository_names() {
        assert_eq!(
            repository_name("https://example.com/acme/widgets.git"),
            "widgets"
        );
        assert_eq!(repository_name("/srv/git/widgets/"), "widgets");
        assert_eq!(
            repository_name("git@example.com:acme/gadgets.git"),
            "gadgets"
        );
        assert_eq!(repository_name("file:///tmp/x/origin.git"), "origin");
    }

    #[test]
    fn mirror_paths_are_distinct_and_safe() {
        let root = Path::new("/w/mirrors");
        let first = mirror_path(root, "https://a.example/x/repo.git");
        let second = mirror_path(root, "https://b.example/x/repo.git");
        assert_ne!(first, second);
        assert_eq!(first.parent(), Some(root));
        let odd = mirror_path(root, "file:///../..");
        assert_eq!(odd.parent(), Some(root));
        let name = odd.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "{name}");
        assert_eq!(mirror_path(root, "x"), mirror_path(root, "x"));
        // The name ends with the URL's full SHA-256 (known answer for "abc").
        assert_eq!(
            mirror_path(root, "abc"),
            root.join("abc-ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad.git")
        );
    }

    #[test]
    fn numstat_parses_binary_and_paths_with_tabs() {
        let output = b"3\t1\tsrc/lib.rs\0-\t-\timage.png\x005\t0\tweird\tname\0";
        let stats = parse_numstat(output, 10).unwrap();
        assert_eq!(stats.len(), 3);
        assert_eq!(
            (
                stats[0].path.as_str(),
                stats[0].insertions,
                stats[0].deletions
            ),
            ("src/lib.rs", 3, 1)
        );
        assert_eq!(
            (
                stats[1].path.as_str(),
                stats[1].insertions,
                stats[1].deletions
            ),
            ("image.png", 0, 0)
        );
        assert_eq!(stats[2].path, "weird\tname");
        assert_eq!(parse_numstat(output, 1).unwrap().len(), 1);
        assert!(parse_numstat(b"x\ty\tz\0", 10).is_err());
        assert!(parse_numstat(b"garbage\0", 10).is_err());
    }

    #[test]
    fn text_is_capped_at_a_character_boundary() {
        assert_eq!(
            cap_text("héllo".as_bytes(), false, 2),
            ("h".to_owned(), true)
        );
        assert_eq!(cap_text(b"abc", false, 10), ("abc".to_owned(), false));
        assert_eq!(cap_text(b"abc", true, 10), ("abc".to_owned(), true));
    }
}
