//! The fleet specification as the state machine stores it, and its validation.
//!
//! A [`FleetSpec`] is what a user submits: one intent, many repositories. The node converts the
//! wire form (`flotilla.v1.FleetSpec`) into this type and calls [`FleetSpec::validate`] before it
//! proposes anything, so an invalid spec is rejected with the path of the offending field and
//! never reaches the Raft log.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use flotilla_domain::branch::{
    DEFAULT_BRANCH_PREFIX, MAX_BRANCH_BYTES, is_valid_branch, validate_branch,
    validate_branch_prefix,
};
pub use flotilla_domain::name::is_valid_name;
use flotilla_domain::repository::validate_repository_url;
pub use flotilla_domain::repository::{MAX_REPOSITORY_URL_BYTES, repository_name};

/// Default wall-clock limit for the agent and for each verification command: 10 minutes.
pub const DEFAULT_SANDBOX_TIMEOUT_MS: u64 = 600_000;
/// Default number of attempts per run (first attempt included).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Default initial retry backoff: 1 second.
pub const DEFAULT_RETRY_BACKOFF_INITIAL_MS: u64 = 1_000;
/// Default maximum retry backoff: 1 minute.
pub const DEFAULT_RETRY_BACKOFF_MAX_MS: u64 = 60_000;
/// Default branch template.
pub const DEFAULT_BRANCH_TEMPLATE: &str = "flotilla/{fleet}";
/// Default sandbox driver ([`SandboxSpec::driver`]).
pub const DEFAULT_SANDBOX_DRIVER: &str = "bwrap";
/// Default commit message.
pub const DEFAULT_COMMIT_MESSAGE: &str = "Apply Flotilla fleet change";
/// Default number of a fleet's runs holding a lease at once.
pub const DEFAULT_MAX_PARALLELISM: u32 = 16;
/// The project (namespace) a fleet, token or secret belongs to when none is named. Project
/// names follow [`is_valid_name`].
pub const DEFAULT_PROJECT: &str = "default";

fn default_project() -> String {
    DEFAULT_PROJECT.to_string()
}
/// Most secrets one fleet may inject ([`AgentSpec::secrets`]).
pub const MAX_SECRETS_PER_FLEET: usize = 32;
/// The `{fleet_id}` used when a template is validated before the fleet has an id: the longest
/// id there can be, so that length checks hold for every real one.
const LONGEST_FLEET_ID: &str = "fl-18446744073709551615";

/// A fleet: one agent command run against many repositories.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSpec {
    /// 1-64 characters of `[A-Za-z0-9._-]`.
    pub name: String,
    /// The project (namespace) owning the fleet: 1-64 characters of `[A-Za-z0-9._-]`
    /// ([`DEFAULT_PROJECT`] when not given). Tokens are scoped to projects.
    #[serde(default = "default_project")]
    pub project: String,
    /// Git URLs, one run each, in order.
    pub repositories: Vec<String>,
    /// What runs in each repository.
    pub agent: AgentSpec,
    /// Shell command lines that must all exit 0 after the agent ran.
    pub verify: Vec<String>,
    /// Isolation and resource limits of each run.
    pub sandbox: SandboxSpec,
    /// Branch name template: `{fleet}`, `{fleet_id}`, `{repository}` are replaced.
    pub branch_template: String,
    /// Commit message of the agent's change.
    pub commit_message: String,
    /// At most this many runs of the fleet hold a lease at once.
    pub max_parallelism: u32,
    /// Retry policy for retryable failures.
    pub retry: RetryPolicy,
    /// Push the branch to the origin when the agent changed files.
    pub push: bool,
    /// Priority, repository sharing, approval, deadline, waves and failure budget
    /// ([`crate::flow`]); the defaults when absent.
    #[serde(default)]
    pub flow: crate::flow::FlowSpec,
}

impl FleetSpec {
    /// This spec without its repository list: what one run needs to execute (a lease carries
    /// it; the run's own repository travels beside it). Costs the size of everything but the
    /// repositories, never the fleet's size.
    pub fn without_repositories(&self) -> FleetSpec {
        FleetSpec {
            name: self.name.clone(),
            project: self.project.clone(),
            repositories: Vec::new(),
            agent: self.agent.clone(),
            verify: self.verify.clone(),
            sandbox: self.sandbox.clone(),
            branch_template: self.branch_template.clone(),
            commit_message: self.commit_message.clone(),
            max_parallelism: self.max_parallelism,
            retry: self.retry.clone(),
            push: self.push,
            flow: self.flow.clone(),
        }
    }
}

/// The command run in each repository.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSpec {
    /// Shell command line (`/bin/sh -c`), run with the repository as working directory.
    pub command: String,
    /// Task text, given to the command as the environment variable `FLOTILLA_TASK`.
    pub task: String,
    /// Extra environment variables. Not secret: the values are stored in the replicated log
    /// and returned by `GetFleet`/`ListFleets`; credentials go in [`AgentSpec::secrets`].
    pub env: BTreeMap<String, String>,
    /// Secrets injected as environment variables, by name: environment variable name ->
    /// secret name in the fleet's project ([`fleet_project`]). Only names are stored; the node
    /// that grants a lease decrypts the values into the lease reply, and the worker redacts
    /// them from everything it reports.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
}

/// Sandbox settings of each run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSpec {
    /// Sandbox driver: `bwrap` or `none`.
    pub driver: String,
    /// Wall-clock limit for the agent and for each verification command, in milliseconds.
    pub timeout_ms: u64,
    /// cgroup memory limit in bytes; 0 leaves the worker's default.
    pub memory_limit_bytes: u64,
    /// cgroup pids limit; 0 leaves the worker's default.
    pub pids_limit: u32,
    /// Network access inside the sandbox: `false` is an empty network namespace, `true` the
    /// run's own namespace whose only way out is the worker's egress proxy.
    pub network: bool,
    /// CPU quota in millicores (1000 = one CPU); 0 leaves the worker's default.
    #[serde(default)]
    pub cpu_limit_millicores: u32,
    /// Disk quota of the run's workspace in bytes; 0 leaves the worker's default.
    #[serde(default)]
    pub disk_limit_bytes: u64,
}

impl Default for SandboxSpec {
    /// `bwrap`, [`DEFAULT_SANDBOX_TIMEOUT_MS`], no network, every limit the worker's default.
    fn default() -> Self {
        SandboxSpec {
            driver: "bwrap".into(),
            timeout_ms: DEFAULT_SANDBOX_TIMEOUT_MS,
            memory_limit_bytes: 0,
            pids_limit: 0,
            network: false,
            cpu_limit_millicores: 0,
            disk_limit_bytes: 0,
        }
    }
}

/// How a run is retried after a retryable failure (infrastructure error, lost lease).
///
/// Attempt `n` (n >= 2) becomes eligible `min(initial * 2^(n-2), max)` milliseconds after the
/// previous attempt ended; agent and verification failures are final and never retried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts per run, first included.
    pub max_attempts: u32,
    /// Backoff before the second attempt, in milliseconds.
    pub backoff_initial_ms: u64,
    /// Upper bound of the backoff, in milliseconds.
    pub backoff_max_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_initial_ms: DEFAULT_RETRY_BACKOFF_INITIAL_MS,
            backoff_max_ms: DEFAULT_RETRY_BACKOFF_MAX_MS,
        }
    }
}

impl RetryPolicy {
    /// Backoff in milliseconds before attempt `next_attempt` (2, 3, ...). Saturates; never
    /// exceeds `backoff_max_ms`.
    pub fn backoff_ms(&self, next_attempt: u32) -> u64 {
        let doublings = next_attempt.saturating_sub(2).min(32);
        self.backoff_initial_ms
            .saturating_mul(1u64 << doublings)
            .min(self.backoff_max_ms)
    }
}

/// Limits applied by [`FleetSpec::validate`]. Each is a node setting; see the node's
/// configuration reference for the defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecLimits {
    /// Maximum repositories (runs) in one fleet.
    pub max_runs_per_fleet: usize,
    /// Maximum size of the task text, in bytes.
    pub max_task_bytes: usize,
    /// Maximum size of any one command line, in bytes.
    pub max_command_bytes: usize,
    /// Maximum number of verification commands.
    pub max_verify_commands: usize,
    /// Maximum size of one repository URL, in bytes.
    pub max_repository_url_bytes: usize,
    /// Maximum number of extra environment variables.
    pub max_env_vars: usize,
    /// Maximum sandbox timeout, in milliseconds.
    pub max_timeout_ms: u64,
    /// Maximum `max_parallelism`.
    pub max_parallelism: u32,
    /// Maximum `retry.max_attempts`.
    pub max_attempts: u32,
    /// Every branch (the template rendered for each repository) must start with this prefix,
    /// so a fleet can never push over `main` or another branch people work on. Default
    /// [`DEFAULT_BRANCH_PREFIX`] (`flotilla/`); a valid prefix is checked with
    /// [`validate_branch_prefix`].
    pub branch_prefix: String,
}

impl Default for SpecLimits {
    fn default() -> Self {
        SpecLimits {
            max_runs_per_fleet: 10_000,
            max_task_bytes: 64 * 1024,
            max_command_bytes: 8 * 1024,
            max_verify_commands: 16,
            max_repository_url_bytes: MAX_REPOSITORY_URL_BYTES,
            max_env_vars: 64,
            max_timeout_ms: 86_400_000,
            max_parallelism: 1024,
            max_attempts: 10,
            branch_prefix: DEFAULT_BRANCH_PREFIX.to_string(),
        }
    }
}

/// A spec or request field that failed validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Path of the field, e.g. `spec.sandbox.timeout_ms` or `spec.repositories[3]`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A new error for `field`. Both parts are cut to [`MAX_ERROR_MESSAGE_BYTES`] (see
    /// [`shorten`]), so an error never echoes a whole oversized input back to the caller (gRPC
    /// carries the message in a header, which clients limit to 16 KiB).
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError {
            field: shorten(&field.into(), MAX_ERROR_MESSAGE_BYTES),
            message: shorten(&message.into(), MAX_ERROR_MESSAGE_BYTES),
        }
    }
}

/// Longest field path or message of a [`FieldError`], in bytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// `text` if it has at most `max_bytes` bytes; otherwise its first bytes (cut at a character
/// boundary) followed by `… (N bytes cut)`, the whole at most `max_bytes + 32` bytes.
pub fn shorten(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_string();
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes cut)", &text[..end], text.len() - end)
}

/// Checks that free text from a spec (`agent.command`, `agent.task`, `verify[i]`,
/// `commit_message`) holds no NUL byte: a NUL cannot pass through an `exec` argument, an
/// environment variable or a git commit message, so it would fail later, as a retried
/// infrastructure error, instead of now.
fn check_no_nul(field: String, text: &str) -> Result<(), FieldError> {
    match text.find('\0') {
        Some(offset) => Err(FieldError::new(
            field,
            format!("contains a NUL byte (at byte {offset})"),
        )),
        None => Ok(()),
    }
}

/// The project (namespace) a fleet belongs to ([`FleetSpec::project`]): whose secrets it may
/// name.
pub fn fleet_project(spec: &FleetSpec) -> &str {
    &spec.project
}

/// Whether `key` can name an environment variable the fleet sets: `[A-Za-z_][A-Za-z0-9_]*`,
/// not starting with `FLOTILLA_` (the worker's own variables).
pub fn is_valid_env_name(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !key.starts_with("FLOTILLA_")
}

impl FleetSpec {
    /// Checks every field against `limits`. Errors name the field's path below `prefix` (for
    /// example `spec`), so the user sees `spec.sandbox.timeout_ms: ...`.
    ///
    /// # Errors
    /// The first invalid field, as a [`FieldError`].
    pub fn validate(&self, prefix: &str, limits: &SpecLimits) -> Result<(), FieldError> {
        let field = |name: &str| format!("{prefix}.{name}");
        if !is_valid_name(&self.name) {
            return Err(FieldError::new(
                field("name"),
                "must be 1-64 characters of [A-Za-z0-9._-]",
            ));
        }
        if !is_valid_name(&self.project) {
            return Err(FieldError::new(
                field("project"),
                "must be 1-64 characters of [A-Za-z0-9._-]",
            ));
        }
        if self.repositories.is_empty() {
            return Err(FieldError::new(
                field("repositories"),
                "must name at least one repository",
            ));
        }
        if self.repositories.len() > limits.max_runs_per_fleet {
            return Err(FieldError::new(
                field("repositories"),
                format!(
                    "{} repositories exceed the limit of {} runs per fleet (max_runs_per_fleet)",
                    self.repositories.len(),
                    limits.max_runs_per_fleet
                ),
            ));
        }
        let mut seen = BTreeSet::new();
        for (index, url) in self.repositories.iter().enumerate() {
            let name = field(&format!("repositories[{index}]"));
            validate_repository_url(url, limits.max_repository_url_bytes)
                .map_err(|message| FieldError::new(&name, message))?;
            if !seen.insert(url.as_str()) {
                return Err(FieldError::new(
                    name,
                    format!("duplicate repository {url:?}"),
                ));
            }
        }
        if self.agent.command.trim().is_empty() {
            return Err(FieldError::new(field("agent.command"), "must not be empty"));
        }
        if self.agent.command.len() > limits.max_command_bytes {
            return Err(FieldError::new(
                field("agent.command"),
                format!("longer than {} bytes", limits.max_command_bytes),
            ));
        }
        check_no_nul(field("agent.command"), &self.agent.command)?;
        check_no_nul(field("agent.task"), &self.agent.task)?;
        check_no_nul(field("commit_message"), &self.commit_message)?;
        for (index, command) in self.verify.iter().enumerate() {
            check_no_nul(field(&format!("verify[{index}]")), command)?;
        }
        if self.agent.task.len() > limits.max_task_bytes {
            return Err(FieldError::new(
                field("agent.task"),
                format!(
                    "longer than {} bytes (max_task_bytes)",
                    limits.max_task_bytes
                ),
            ));
        }
        if self.agent.env.len() > limits.max_env_vars {
            return Err(FieldError::new(
                field("agent.env"),
                format!("more than {} variables", limits.max_env_vars),
            ));
        }
        for (key, value) in &self.agent.env {
            if !is_valid_env_name(key) {
                return Err(FieldError::new(
                    field(&format!("agent.env.{key}")),
                    "names must be [A-Za-z_][A-Za-z0-9_]* and not start with FLOTILLA_",
                ));
            }
            if value.len() > limits.max_command_bytes || value.contains('\0') {
                return Err(FieldError::new(
                    field(&format!("agent.env.{key}")),
                    format!(
                        "value longer than {} bytes or contains NUL",
                        limits.max_command_bytes
                    ),
                ));
            }
        }
        if self.agent.secrets.len() > MAX_SECRETS_PER_FLEET {
            return Err(FieldError::new(
                field("agent.secrets"),
                format!("more than {MAX_SECRETS_PER_FLEET} secrets"),
            ));
        }
        for (key, secret) in &self.agent.secrets {
            let name = field(&format!("agent.secrets.{key}"));
            if !is_valid_env_name(key) {
                return Err(FieldError::new(
                    name,
                    "names must be [A-Za-z_][A-Za-z0-9_]* and not start with FLOTILLA_",
                ));
            }
            if self.agent.env.contains_key(key) {
                return Err(FieldError::new(
                    name,
                    "is also set in agent.env; a variable comes from one of them",
                ));
            }
            if !is_valid_name(secret) {
                return Err(FieldError::new(
                    name,
                    "the secret name must be 1-64 characters of [A-Za-z0-9._-]",
                ));
            }
        }
        if self.verify.len() > limits.max_verify_commands {
            return Err(FieldError::new(
                field("verify"),
                format!("more than {} commands", limits.max_verify_commands),
            ));
        }
        for (index, command) in self.verify.iter().enumerate() {
            if command.trim().is_empty() || command.len() > limits.max_command_bytes {
                return Err(FieldError::new(
                    field(&format!("verify[{index}]")),
                    format!(
                        "must be a non-empty command of at most {} bytes",
                        limits.max_command_bytes
                    ),
                ));
            }
        }
        if !matches!(self.sandbox.driver.as_str(), "bwrap" | "none") {
            return Err(FieldError::new(
                field("sandbox.driver"),
                format!(
                    "unknown driver {:?}; expected \"bwrap\" or \"none\"",
                    self.sandbox.driver
                ),
            ));
        }
        if self.sandbox.timeout_ms < 1_000 || self.sandbox.timeout_ms > limits.max_timeout_ms {
            return Err(FieldError::new(
                field("sandbox.timeout_ms"),
                format!("must be between 1000 and {}", limits.max_timeout_ms),
            ));
        }
        if self.sandbox.memory_limit_bytes != 0
            && self.sandbox.memory_limit_bytes < 16 * 1024 * 1024
        {
            return Err(FieldError::new(
                field("sandbox.memory_limit_bytes"),
                "must be 0 (the worker's default) or at least 16 MiB",
            ));
        }
        if self.sandbox.cpu_limit_millicores != 0 && self.sandbox.cpu_limit_millicores < 10 {
            return Err(FieldError::new(
                field("sandbox.cpu_limit_millicores"),
                "must be 0 (the worker's default) or at least 10",
            ));
        }
        if self.sandbox.disk_limit_bytes != 0 && self.sandbox.disk_limit_bytes < 16 * 1024 * 1024 {
            return Err(FieldError::new(
                field("sandbox.disk_limit_bytes"),
                "must be 0 (the worker's default) or at least 16 MiB",
            ));
        }
        if self.sandbox.pids_limit != 0 && self.sandbox.pids_limit < 8 {
            return Err(FieldError::new(
                field("sandbox.pids_limit"),
                "must be 0 (the worker's default) or at least 8",
            ));
        }
        for (index, url) in self.repositories.iter().enumerate() {
            let branch = render_branch(
                &self.branch_template,
                &self.name,
                LONGEST_FLEET_ID,
                &repository_name(url),
            );
            validate_branch(&branch, &limits.branch_prefix).map_err(|message| {
                FieldError::new(
                    field("branch_template"),
                    format!(
                        "{:?} for repositories[{index}]: {message}",
                        self.branch_template
                    ),
                )
            })?;
        }
        if self.commit_message.trim().is_empty()
            || self.commit_message.len() > limits.max_task_bytes
        {
            return Err(FieldError::new(
                field("commit_message"),
                format!(
                    "must be non-empty and at most {} bytes",
                    limits.max_task_bytes
                ),
            ));
        }
        if self.max_parallelism == 0 || self.max_parallelism > limits.max_parallelism {
            return Err(FieldError::new(
                field("max_parallelism"),
                format!("must be between 1 and {}", limits.max_parallelism),
            ));
        }
        if self.retry.max_attempts == 0 || self.retry.max_attempts > limits.max_attempts {
            return Err(FieldError::new(
                field("max_attempts"),
                format!("must be between 1 and {}", limits.max_attempts),
            ));
        }
        if self.retry.backoff_initial_ms > self.retry.backoff_max_ms
            || self.retry.backoff_max_ms > 3_600_000
        {
            return Err(FieldError::new(
                field("retry_backoff_max_ms"),
                "must be at least retry_backoff_initial_ms and at most 3600000",
            ));
        }
        self.flow.validate(&field("flow"))
    }
}

/// Expands a branch template. Pure; the result is checked with [`is_valid_branch`] by callers.
pub fn render_branch(template: &str, fleet_name: &str, fleet_id: &str, repository: &str) -> String {
    template
        .replace("{fleet}", fleet_name)
        .replace("{fleet_id}", fleet_id)
        .replace("{repository}", repository)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec(repositories: &[&str]) -> FleetSpec {
        FleetSpec {
            name: "rustfmt".into(),
            project: DEFAULT_PROJECT.into(),
            repositories: repositories.iter().map(|r| r.to_string()).collect(),
            agent: AgentSpec {
                command: "cargo fmt".into(),
                task: "format".into(),
                env: BTreeMap::new(),
                secrets: BTreeMap::new(),
            },
            verify: vec!["cargo fmt --check".into()],
            sandbox: SandboxSpec {
                driver: "bwrap".into(),
                timeout_ms: 60_000,
                memory_limit_bytes: 0,
                pids_limit: 0,
                network: false,
                cpu_limit_millicores: 0,
                disk_limit_bytes: 0,
            },
            branch_template: DEFAULT_BRANCH_TEMPLATE.into(),
            commit_message: "Format".into(),
            max_parallelism: 4,
            retry: RetryPolicy::default(),
            push: true,
            flow: crate::flow::FlowSpec::default(),
        }
    }

    /// Applies `edit` to a valid spec and returns the validation error's text, or "ok".
    fn check(edit: impl FnOnce(&mut FleetSpec), expected: &str) {
        let mut s = spec(&["file:///srv/a", "file:///srv/b"]);
        edit(&mut s);
        let actual = match s.validate("spec", &SpecLimits::default()) {
            Ok(()) => "ok".to_string(),
            Err(error) => error.to_string(),
        };
        assert_eq!(actual, expected);
    }

    #[test]
    fn errors_never_echo_a_whole_oversized_input() {
        let mut s = spec(&["file:///srv/a", "file:///srv/b"]);
        s.sandbox.driver = "x".repeat(1 << 20);
        let error = s.validate("spec", &SpecLimits::default()).unwrap_err();
        assert_eq!(error.field, "spec.sandbox.driver");
        assert!(
            error.message.len() <= MAX_ERROR_MESSAGE_BYTES + 32,
            "{}",
            error.message.len()
        );
        assert!(
            error.message.ends_with(" bytes cut)"),
            "{}",
            &error.message[1000..]
        );
        // Cut at a character boundary.
        assert_eq!(shorten("ééé", 3), "é… (4 bytes cut)");
        assert_eq!(shorten("short", 5), "short");
    }

    #[test]
    fn validation_names_the_field() {
        check(|_| {}, "ok");
        check(
            |s| s.name = "bad name".into(),
            "spec.name: must be 1-64 characters of [A-Za-z0-9._-]",
        );
        check(
            |s| s.repositories.clear(),
            "spec.repositories: must name at least one repository",
        );
        check(
            |s| s.repositories[1] = "file:///srv/a".into(),
            "spec.repositories[1]: duplicate repository \"file:///srv/a\"",
        );
        check(
            |s| s.repositories[0] = "srv/a".into(),
            "spec.repositories[0]: \"srv/a\" is not a git URL: expected file://, https://, http://, ssh://, git:// or an absolute path",
        );
        check(
            |s| s.agent.command = " ".into(),
            "spec.agent.command: must not be empty",
        );
        check(
            |s| s.sandbox.driver = "docker".into(),
            "spec.sandbox.driver: unknown driver \"docker\"; expected \"bwrap\" or \"none\"",
        );
        check(
            |s| s.agent.command = "echo a\0b".into(),
            "spec.agent.command: contains a NUL byte (at byte 6)",
        );
        check(
            |s| s.agent.task = "\0".into(),
            "spec.agent.task: contains a NUL byte (at byte 0)",
        );
        check(
            |s| s.verify[0] = "true\0".into(),
            "spec.verify[0]: contains a NUL byte (at byte 4)",
        );
        check(
            |s| s.commit_message = "Fix\0".into(),
            "spec.commit_message: contains a NUL byte (at byte 3)",
        );
        check(
            |s| s.sandbox.cpu_limit_millicores = 5,
            "spec.sandbox.cpu_limit_millicores: must be 0 (the worker's default) or at least 10",
        );
        check(
            |s| s.sandbox.disk_limit_bytes = 1024,
            "spec.sandbox.disk_limit_bytes: must be 0 (the worker's default) or at least 16 MiB",
        );
        check(
            |s| s.sandbox.timeout_ms = 10,
            "spec.sandbox.timeout_ms: must be between 1000 and 86400000",
        );
        check(
            |s| s.max_parallelism = 0,
            "spec.max_parallelism: must be between 1 and 1024",
        );
        check(
            |s| s.retry.max_attempts = 11,
            "spec.max_attempts: must be between 1 and 10",
        );
        check(
            |s| s.branch_template = "flotilla/a..b/{fleet}".into(),
            "spec.branch_template: \"flotilla/a..b/{fleet}\" for repositories[0]: \"flotilla/a..b/rustfmt\" is not a valid git branch name (git check-ref-format --branch)",
        );
        check(
            |s| s.branch_template = "main".into(),
            "spec.branch_template: \"main\" for repositories[0]: \"main\" is not under the branch prefix \"flotilla/\" (limits.branch_prefix)",
        );
        check(
            |s| s.branch_template = "refs/heads/flotilla/{fleet}".into(),
            "spec.branch_template: \"refs/heads/flotilla/{fleet}\" for repositories[0]: \"refs/heads/flotilla/rustfmt\" is a ref; give the branch name without refs/heads/",
        );
        // Checked for every repository: only the second renders to an invalid name.
        check(
            |s| {
                s.branch_template = "flotilla/{repository}".into();
                s.repositories[1] = "file:///srv/b.lock".into();
            },
            "spec.branch_template: \"flotilla/{repository}\" for repositories[1]: \"flotilla/b.lock\" is not a valid git branch name (git check-ref-format --branch)",
        );
        // Length is checked with the longest fleet id there can be.
        check(
            |s| s.branch_template = format!("flotilla/{}-{{fleet_id}}", "x".repeat(230)),
            &format!(
                "spec.branch_template: \"flotilla/{0}-{{fleet_id}}\" for repositories[0]: \"flotilla/{0}-fl-18446744073709551615\" is not a valid git branch name (git check-ref-format --branch)",
                "x".repeat(230)
            ),
        );
        check(
            |s| {
                s.agent.env.insert("FLOTILLA_X".into(), "1".into());
            },
            "spec.agent.env.FLOTILLA_X: names must be [A-Za-z_][A-Za-z0-9_]* and not start with FLOTILLA_",
        );
        check(
            |s| {
                s.agent.secrets.insert("TOKEN".into(), "api-token".into());
            },
            "ok",
        );
        check(
            |s| {
                s.agent.secrets.insert("1TOKEN".into(), "api-token".into());
            },
            "spec.agent.secrets.1TOKEN: names must be [A-Za-z_][A-Za-z0-9_]* and not start with FLOTILLA_",
        );
        check(
            |s| {
                s.agent.secrets.insert("TOKEN".into(), "not a name".into());
            },
            "spec.agent.secrets.TOKEN: the secret name must be 1-64 characters of [A-Za-z0-9._-]",
        );
        check(
            |s| {
                s.agent.env.insert("TOKEN".into(), "x".into());
                s.agent.secrets.insert("TOKEN".into(), "api-token".into());
            },
            "spec.agent.secrets.TOKEN: is also set in agent.env; a variable comes from one of them",
        );
        check(
            |s| {
                s.agent.secrets = (0..33)
                    .map(|i| (format!("V{i}"), "s".to_string()))
                    .collect();
            },
            "spec.agent.secrets: more than 32 secrets",
        );
        check(
            |s| s.repositories = (0..10_001).map(|i| format!("file:///r/{i}")).collect(),
            "spec.repositories: 10001 repositories exceed the limit of 10000 runs per fleet (max_runs_per_fleet)",
        );
    }

    #[test]
    fn the_branch_prefix_is_a_limit() {
        let mut s = spec(&["file:///srv/a"]);
        s.branch_template = "bots/{fleet}".into();
        let limits = SpecLimits {
            branch_prefix: "bots/".into(),
            ..SpecLimits::default()
        };
        assert_eq!(s.validate("spec", &limits), Ok(()));
        let error = s.validate("spec", &SpecLimits::default()).unwrap_err();
        assert_eq!(error.field, "spec.branch_template");
    }

    #[test]
    fn repository_names_and_branches() {
        assert_eq!(repository_name("file:///srv/repos/serde.git"), "serde");
        assert_eq!(
            repository_name("https://github.com/tokio-rs/tokio/"),
            "tokio"
        );
        assert_eq!(repository_name("git@host:org/x y.git"), "x-y");
        assert_eq!(
            render_branch("flotilla/{fleet}-{repository}", "fmt", "fl-1", "serde"),
            "flotilla/fmt-serde"
        );
        // The same verdicts as `git check-ref-format --branch` (compared with git itself in
        // the node crate: `branch_validation_agrees_with_git`).
        for good in ["flotilla/fmt", "a@b", "a/-b", "x/HEAD", "é", "a.b", "a/@"] {
            assert!(is_valid_branch(good), "{good}");
        }
        for bad in [
            "", "HEAD", "@", "-a", "a/.b", ".a", "a.lock/b", "a/b.lock", "a b", "a..b", "a/", "/a",
            "a//b", "a.", "a/.", "a@{x", "a\\b", "a~", "a^", "a:", "a?", "a*", "a[", "a\x7f",
            "a\tb",
        ] {
            assert!(!is_valid_branch(bad), "{bad:?}");
        }
        assert!(!is_valid_branch(&format!("flotilla/{}", "x".repeat(250))));
        assert_eq!(validate_branch("flotilla/x", "flotilla/"), Ok(()));
        assert!(validate_branch("flotillax", "flotilla/").is_err());
        assert_eq!(validate_branch_prefix("bots/flotilla/"), Ok(()));
        for bad in ["", "flotilla", "refs/heads/", "/", ".x/", "a..b/"] {
            assert!(validate_branch_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn backoff_doubles_and_saturates() {
        let policy = RetryPolicy {
            max_attempts: 10,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 5_000,
        };
        let backoffs: Vec<u64> = (2..=6).map(|n| policy.backoff_ms(n)).collect();
        assert_eq!(backoffs, vec![1_000, 2_000, 4_000, 5_000, 5_000]);
        assert_eq!(policy.backoff_ms(u32::MAX), 5_000);
    }
}
