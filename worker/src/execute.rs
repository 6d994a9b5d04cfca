//! One attempt of one run, end to end: prepare (mirror + clone) → agent in the sandbox → commit
//! the agent's changes → each verification command in the sandbox → publish (push).
//!
//! The agent's changes are committed right after the agent, before verification, so that files
//! the verification commands create (build outputs not covered by `.gitignore`) never end up in
//! the commit; verification runs on exactly the committed tree, and nothing is pushed unless it
//! passes.
//!
//! Outcomes ([`RunResult::outcome`]):
//!
//! | outcome          | when                                                                  |
//! |------------------|-----------------------------------------------------------------------|
//! | `changed`        | agent and verification passed, files changed, committed (and pushed)  |
//! | `unchanged`      | agent and verification passed, nothing changed                        |
//! | `agent_failed`   | the agent exited non-zero or was OOM-killed (exit code, log tail)     |
//! | `verify_failed`  | a verification command exited non-zero or was OOM-killed              |
//! | `timed_out`      | the agent or a verification command passed its timeout                |
//! | `infrastructure` | bad lease, clone/fetch/push/commit failure, sandbox start failure     |
//! | `cancelled`      | the cancellation token fired                                          |
//!
//! `retryable` is set for transient infrastructure failures (git and sandbox start problems), not
//! for invalid leases. `exit_code` is the failing command's exit code, 0 for success, -1 when
//! there is none.
//!
//! Publishing is fenced ([`crate::publish`]): the commit carries the run and attempt as
//! trailers, a push is a compare-and-swap that only moves the branch to the same or a higher
//! attempt of the run, and it starts only while the lease ([`LeaseDeadline`]) is valid for at
//! least [`WorkerConfig::push_lease_margin_ms`]. An attempt that pushes nothing (`unchanged`,
//! `agent_failed`, `verify_failed`, `timed_out`) with `push` set deletes a commit an earlier
//! execution of the run left on the branch, so the branch and the recorded result agree; when
//! that cannot be checked the attempt is a retryable `infrastructure` failure instead. A branch
//! outside [`WorkerConfig::branch_prefix`] is refused before anything runs.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use flotilla_domain::Outcome;
use flotilla_proto::outcome::outcome_name;
use flotilla_proto::v1::{AttemptOutcome, FleetSpec, Lease, RunResult, SandboxDenial, SandboxSpec};
use futures::FutureExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::attempt_log::AttemptLog;
use crate::config::WorkerConfig;
use crate::credentials::{self, CredentialHelper, MintRequest, PushCredential};
use crate::egress::{EgressAttachment, EgressProxy, EgressReport};
use crate::git::{self, CommitSummary, Git, GitError};
use crate::lease::LeaseDeadline;
use crate::publish::{self, AttemptIdentity, PublishError, PublishTarget, Withdrawal};
use crate::quota::{QuotaError, WorkspaceVolume};
use crate::redact::Redactor;
use crate::sandbox::{
    SandboxCommand, SandboxDriver, SandboxError, SandboxOutcome, resolve_limit_values,
    run_sandboxed,
};

/// Longest run id kept in file names; longer ones are cut.
const RUN_ID_FILE_NAME_MAX_CHARS: usize = 100;

/// The file-name form of an attempt: `<run_id>-<attempt>`, the run id restricted to
/// `[A-Za-z0-9._-]` (others become `_`), at most 100 characters, never starting with `.`.
pub fn attempt_name(run_id: &str, attempt: u32) -> String {
    let mut name: String = run_id
        .chars()
        .map(|character| {
            if character.is_ascii_alphanumeric() || matches!(character, '.' | '_' | '-') {
                character
            } else {
                '_'
            }
        })
        .take(RUN_ID_FILE_NAME_MAX_CHARS)
        .collect();
    if name.is_empty() || name.starts_with('.') {
        name.insert_str(0, "run");
    }
    format!("{name}-{attempt}")
}

/// The directory of an attempt's files: `<work_directory>/attempts/<attempt_name>` (the clone is
/// its `repo/`, the `none` driver's scratch space its `scratch/`).
pub fn attempt_directory(config: &WorkerConfig, run_id: &str, attempt: u32) -> PathBuf {
    config
        .attempts_directory()
        .join(attempt_name(run_id, attempt))
}

/// The full log of an attempt: `<work_directory>/logs/<attempt_name>.log`.
pub fn attempt_log_path(config: &WorkerConfig, run_id: &str, attempt: u32) -> PathBuf {
    config
        .logs_directory()
        .join(format!("{}.log", attempt_name(run_id, attempt)))
}

fn base_result(outcome: Outcome, exit_code: i32) -> RunResult {
    RunResult {
        outcome: AttemptOutcome::from(outcome) as i32,
        exit_code,
        ..RunResult::default()
    }
}

fn infrastructure(log: &mut AttemptLog, message: String, retryable: bool) -> RunResult {
    log.note(&format!(
        "infrastructure failure (retryable: {retryable}): {message}"
    ));
    tracing::warn!(%message, retryable, "attempt failed: infrastructure");
    RunResult {
        error: message,
        retryable,
        ..base_result(Outcome::Infrastructure, -1)
    }
}

fn cancelled(log: &mut AttemptLog) -> RunResult {
    log.note("cancelled");
    RunResult {
        error: "cancelled".to_owned(),
        ..base_result(Outcome::Cancelled, -1)
    }
}

fn with_summary(mut result: RunResult, summary: Option<&CommitSummary>) -> RunResult {
    if let Some(summary) = summary {
        result.commit = summary.commit.clone();
        result.diffstat = summary.diffstat.clone();
        result.patch = summary.patch.clone();
        result.patch_truncated = summary.patch_truncated;
    }
    result
}

fn git_failure(log: &mut AttemptLog, phase: &str, error: &GitError) -> RunResult {
    if error.is_cancelled() {
        return cancelled(log);
    }
    infrastructure(log, format!("{phase}: {error}"), error.is_retryable())
}

/// The result for a sandboxed command that did not succeed, `None` if it did. `failed_outcome`
/// is [`Outcome::AgentFailed`] or [`Outcome::VerifyFailed`].
fn command_failure(
    log: &mut AttemptLog,
    label: &str,
    failed_outcome: Outcome,
    outcome: &SandboxOutcome,
    memory_limit_bytes: u64,
) -> Option<RunResult> {
    if outcome.succeeded() {
        return None;
    }
    let exit_code = outcome.exit_code.unwrap_or(-1);
    let result = if outcome.cancelled {
        return Some(cancelled(log));
    } else if outcome.timed_out {
        RunResult {
            error: format!("{label} timed out after {} ms", outcome.duration_ms),
            ..base_result(Outcome::TimedOut, -1)
        }
    } else if outcome.oom_killed {
        RunResult {
            error: format!(
                "{label} was killed by the OOM killer: memory limit of {memory_limit_bytes} bytes reached"
            ),
            ..base_result(failed_outcome, exit_code)
        }
    } else {
        RunResult {
            error: format!("{label} {}", outcome.describe()),
            ..base_result(failed_outcome, exit_code)
        }
    };
    log.note(&format!(
        "outcome {}: {}",
        outcome_name(result.outcome),
        result.error
    ));
    Some(result)
}

fn sandbox_failure(log: &mut AttemptLog, label: &str, error: &SandboxError) -> RunResult {
    infrastructure(log, format!("{label}: {error}"), error.is_retryable())
}

/// The result for a lease this worker's operator policy refuses (`message` names the field): a
/// non-retryable `infrastructure` failure, written to the attempt's log too. Nothing is cloned
/// or run.
pub fn refused_by_policy(config: &WorkerConfig, lease: &Lease, message: &str) -> RunResult {
    let log_path = attempt_log_path(config, &lease.run_id, lease.attempt);
    let mut log = match AttemptLog::create(&log_path, config.log_max_bytes, config.log_tail_bytes) {
        Ok(log) => log,
        Err(_) => AttemptLog::discard(config.log_tail_bytes),
    };
    let mut result = infrastructure(
        &mut log,
        format!("refused by this worker's policy: {message}"),
        false,
    );
    result.log_tail = log.tail();
    result
}

/// Runs one attempt of `lease` (see the module documentation) and returns its result; never
/// panics and never fails: every problem becomes a result (`infrastructure` with the error
/// message for unexpected ones, including a panic inside the pipeline).
///
/// Files: the clone in [`attempt_directory`] (removed afterwards unless
/// [`WorkerConfig::keep_attempt_directories`]), the log at [`attempt_log_path`] (kept). The
/// result's `log_tail` is the end of that log.
///
/// Cancellation: when `cancel` becomes `true` — or its sender is dropped (whoever owned the run
/// is gone) — the running git command or sandbox is killed and the result is `cancelled`. A
/// receiver that is already `true` cancels at once.
///
/// `lease_deadline` is how long the worker can prove it holds the lease: writes to the origin
/// start only while it is at least [`WorkerConfig::push_lease_margin_ms`] away. (Stopping the
/// attempt when it passes is the caller's job: the worker runtime cancels it.)
pub async fn execute_attempt(
    config: &WorkerConfig,
    lease: &Lease,
    mut cancel: watch::Receiver<bool>,
    lease_deadline: LeaseDeadline,
) -> RunResult {
    let token = CancellationToken::new();
    let pipeline = execute_attempt_with_token(config, lease, token.clone(), lease_deadline);
    tokio::pin!(pipeline);
    tokio::select! {
        result = &mut pipeline => result,
        () = async {
            // Ends when cancelled, or when the sender is dropped (wait_for errs).
            let _ = cancel.wait_for(|cancelled| *cancelled).await;
        } => {
            token.cancel();
            pipeline.await
        }
    }
}

/// [`execute_attempt`] with a [`CancellationToken`] instead of a watch channel: cancelling the
/// token cancels the attempt.
pub async fn execute_attempt_with_token(
    config: &WorkerConfig,
    lease: &Lease,
    cancel: CancellationToken,
    lease_deadline: LeaseDeadline,
) -> RunResult {
    let log_path = attempt_log_path(config, &lease.run_id, lease.attempt);
    let mut log = match AttemptLog::create(&log_path, config.log_max_bytes, config.log_tail_bytes) {
        Ok(log) => log,
        Err(error) => {
            tracing::warn!(path = %log_path.display(), %error, "cannot create the attempt log; keeping only its tail");
            AttemptLog::discard(config.log_tail_bytes)
        }
    };
    let redactor = Redactor::new(
        lease
            .secrets
            .iter()
            .map(|secret| (secret.secret_name.as_str(), secret.value.as_str())),
    );
    log.set_redactor(&redactor);
    let mut push_credentials = PushCredentials::new(config, lease);
    let mut denials = Vec::new();
    let directory = attempt_directory(config, &lease.run_id, lease.attempt);
    let pipeline = AssertUnwindSafe(run_pipeline(
        config,
        lease,
        &cancel,
        &lease_deadline,
        &directory,
        &mut log,
        &redactor,
        &mut push_credentials,
        &mut denials,
    ))
    .catch_unwind();
    let mut result = match pipeline.await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            infrastructure(&mut log, format!("internal error: {message}"), true)
        }
    };
    if !config.keep_attempt_directories
        && let Err(error) = tokio::fs::remove_dir_all(&directory).await
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(directory = %directory.display(), %error, "cannot remove the attempt directory");
    }
    tracing::info!(
        run_id = %lease.run_id,
        fleet_id = %lease.fleet_id,
        attempt = lease.attempt,
        outcome = outcome_name(result.outcome),
        exit_code = result.exit_code,
        "attempt finished"
    );
    result.credential_events = push_credentials.revoke().await;
    result.sandbox_denials = denials;
    log.finish();
    result.log_tail = log.tail();
    redact_result(&redactor, &mut result);
    result
}

/// Redacts every text of `result` that could carry a secret value (the log tail is redacted
/// as it is written; this pass also covers errors, the patch and file names).
fn redact_result(redactor: &Redactor, result: &mut RunResult) {
    if redactor.is_empty() {
        return;
    }
    result.error = redactor.redact(&result.error);
    result.log_tail = redactor.redact(&result.log_tail);
    result.patch = redactor.redact(&result.patch);
    for file in &mut result.diffstat {
        file.path = redactor.redact(&file.path);
    }
    for event in &mut result.credential_events {
        event.error = redactor.redact(&event.error);
    }
}

/// The push credential of one attempt: minted on first use (just before the first write to
/// the origin, so it exists for as short a time as possible), handed to host git through a
/// [`CredentialHelper`], revoked when the attempt ends. Records mint and revoke events.
struct PushCredentials {
    broker: std::sync::Arc<dyn credentials::CredentialBroker>,
    request: MintRequest,
    helper_parent: PathBuf,
    minted: Option<(PushCredential, CredentialHelper)>,
    tried: bool,
    events: Vec<flotilla_proto::v1::CredentialEvent>,
}

impl PushCredentials {
    fn new(config: &WorkerConfig, lease: &Lease) -> Self {
        PushCredentials {
            broker: config.credential_broker(),
            request: MintRequest {
                repository: lease.repository.clone(),
                run_id: lease.run_id.clone(),
                attempt: lease.attempt,
            },
            helper_parent: config.credentials_directory(),
            minted: None,
            tried: false,
            events: Vec::new(),
        }
    }

    /// `git` with the attempt's push credential (minted now if it was not yet), or `git`
    /// itself when the broker has none for the repository.
    ///
    /// Errors: the broker failed (message, retryable).
    async fn git(&mut self, git: &Git) -> Result<Git, (String, bool)> {
        if !self.tried {
            self.tried = true;
            let broker = self.broker.name().to_owned();
            let repository = self.request.repository.clone();
            match self.broker.mint(&self.request).await {
                Ok(None) => {}
                Ok(Some(credential)) => {
                    // Minted: recorded whatever happens next (a failed helper revokes it).
                    self.events.push(credentials::event(
                        "mint",
                        &broker,
                        &repository,
                        Some(&credential),
                        "",
                    ));
                    match CredentialHelper::create(&self.helper_parent, &credential) {
                        Ok(helper) => self.minted = Some((credential, helper)),
                        Err(error) => {
                            let message = format!("credential helper: {error}");
                            self.revoke_one(credential).await;
                            return Err((message, true));
                        }
                    }
                }
                Err(error) => {
                    let retryable = matches!(error, credentials::CredentialError::Unavailable(_));
                    let message = format!("push credential ({broker} broker): {error}");
                    self.events.push(credentials::event(
                        "mint_failed",
                        &broker,
                        &repository,
                        None,
                        &message,
                    ));
                    return Err((message, retryable));
                }
            }
        }
        Ok(match &self.minted {
            Some((_, helper)) => git.with_environment(helper.environment()),
            None => git.clone(),
        })
    }

    async fn revoke_one(&mut self, credential: PushCredential) {
        let broker = self.broker.name().to_owned();
        let event = match self.broker.revoke(&credential).await {
            Ok(()) => credentials::event(
                "revoke",
                &broker,
                &self.request.repository,
                Some(&credential),
                "",
            ),
            Err(error) => {
                tracing::warn!(run.id = %self.request.run_id, attempt = self.request.attempt, %error, "push credential not revoked");
                credentials::event(
                    "revoke_failed",
                    &broker,
                    &self.request.repository,
                    Some(&credential),
                    &error.to_string(),
                )
            }
        };
        self.events.push(event);
    }

    /// Removes the helper's files, revokes the credential, and returns the attempt's events.
    async fn revoke(mut self) -> Vec<flotilla_proto::v1::CredentialEvent> {
        if let Some((credential, helper)) = self.minted.take() {
            drop(helper);
            self.revoke_one(credential).await;
        }
        self.events
    }
}

/// The sandbox settings of a fleet, with the worker's defaults filled in.
struct SandboxSettings {
    driver: SandboxDriver,
    timeout_ms: u64,
    memory_limit_bytes: u64,
    pids_limit: u32,
    cpu_limit_millicores: u64,
    disk_limit_bytes: u64,
    network: bool,
}

impl SandboxSettings {
    fn new(config: &WorkerConfig, spec: &SandboxSpec) -> Result<Self, SandboxError> {
        let timeout_ms = if spec.timeout_ms == 0 {
            config.default_timeout_ms
        } else {
            spec.timeout_ms
        };
        let limits = resolve_limit_values(
            config,
            spec.memory_limit_bytes,
            spec.pids_limit,
            u64::from(spec.cpu_limit_millicores),
        )?;
        let disk_limit_bytes = if spec.disk_limit_bytes == 0 {
            config.default_disk_limit_bytes
        } else {
            spec.disk_limit_bytes
        };
        if disk_limit_bytes > config.disk_limit_max_bytes {
            return Err(SandboxError::LimitOutOfRange {
                field: "sandbox.disk_limit_bytes",
                value: disk_limit_bytes,
                maximum: config.disk_limit_max_bytes,
                reason: "worker setting disk_limit_max_bytes".to_owned(),
            });
        }
        Ok(SandboxSettings {
            driver: SandboxDriver::from_name(&spec.driver)?,
            timeout_ms: timeout_ms.min(config.timeout_max_ms),
            memory_limit_bytes: limits.memory_limit_bytes,
            pids_limit: limits.pids_limit,
            cpu_limit_millicores: limits.cpu_limit_millicores,
            disk_limit_bytes,
            network: spec.network,
        })
    }
}

/// The environment of the agent and verification commands: the fleet's `env` and, with
/// `with_secrets` (the agent), the lease's secrets (sorted by name), then the `FLOTILLA_*`
/// variables, which win.
fn command_environment(
    lease: &Lease,
    spec: &FleetSpec,
    task: &str,
    with_secrets: bool,
) -> Vec<(String, String)> {
    let mut environment: Vec<(String, String)> = spec
        .agent
        .as_ref()
        .map(|agent| {
            agent
                .env
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect()
        })
        .unwrap_or_default();
    environment.extend(
        lease
            .secrets
            .iter()
            .filter(|secret| with_secrets && !secret.env_name.starts_with("FLOTILLA_"))
            .map(|secret| (secret.env_name.clone(), secret.value.clone())),
    );
    environment.sort();
    environment.push(("FLOTILLA_TASK".to_owned(), task.to_owned()));
    environment.push(("FLOTILLA_RUN_ID".to_owned(), lease.run_id.clone()));
    environment.push(("FLOTILLA_ATTEMPT".to_owned(), lease.attempt.to_string()));
    environment.push((
        "FLOTILLA_REPOSITORY".to_owned(),
        git::redact_url_credentials(&lease.repository),
    ));
    environment
}

fn publish_failure(log: &mut AttemptLog, phase: &str, error: &PublishError) -> RunResult {
    if error.is_cancelled() {
        return cancelled(log);
    }
    infrastructure(log, format!("{phase}: {error}"), error.is_retryable())
}

/// The push margin for `lease`: [`WorkerConfig::push_lease_margin_ms`], or a third of the
/// lease's TTL when that is 0.
pub fn push_lease_margin_ms(config: &WorkerConfig, lease: &Lease) -> u64 {
    if config.push_lease_margin_ms == 0 {
        lease.lease_ttl_ms / 3
    } else {
        config.push_lease_margin_ms
    }
}

/// The attempt's workspace volume ([`crate::quota`]) at `directory`, `None` when the host has no
/// disk quota method and the operator allowed that (`allow_without_disk_quota`).
///
/// Errors: the message and whether it is retryable (no space: yes; no quota method: yes, another
/// worker may have one; creation failure: yes).
async fn workspace_volume(
    config: &WorkerConfig,
    directory: &Path,
    size_bytes: u64,
) -> Result<Option<WorkspaceVolume>, (String, bool)> {
    static SUPPORT: std::sync::OnceLock<Result<&'static str, String>> = std::sync::OnceLock::new();
    let support = SUPPORT.get_or_init(crate::probe::disk_quota_support);
    if let Err(problem) = support {
        if config.allow_without_disk_quota {
            return Ok(None);
        }
        return Err((
            format!("no disk quota can be applied ({problem}); refusing to run without one"),
            true,
        ));
    }
    match WorkspaceVolume::create(config, directory, size_bytes).await {
        Ok(volume) => Ok(Some(volume)),
        // Both retryable: space may free up, and another worker may succeed.
        Err(error @ (QuotaError::NoSpace { .. } | QuotaError::Create { .. })) => {
            Err((error.to_string(), true))
        }
    }
}

/// Whether an outcome is final and leaves nothing on the branch, so that a commit an earlier
/// execution of the run pushed must be withdrawn.
fn withdraws_branch(outcome: AttemptOutcome) -> bool {
    matches!(
        outcome,
        AttemptOutcome::Unchanged
            | AttemptOutcome::AgentFailed
            | AttemptOutcome::VerifyFailed
            | AttemptOutcome::TimedOut
    )
}

#[allow(clippy::too_many_arguments)]
async fn run_pipeline(
    config: &WorkerConfig,
    lease: &Lease,
    cancel: &CancellationToken,
    lease_deadline: &LeaseDeadline,
    directory: &Path,
    log: &mut AttemptLog,
    redactor: &Redactor,
    push_credentials: &mut PushCredentials,
    denials: &mut Vec<SandboxDenial>,
) -> RunResult {
    // Validate the lease.
    let Some(spec) = lease.spec.as_ref() else {
        return infrastructure(log, "the lease has no fleet spec".to_owned(), false);
    };
    if !lease.secrets_error.is_empty() {
        return infrastructure(
            log,
            format!("secrets: {}", lease.secrets_error),
            lease.secrets_error_retryable,
        );
    }
    let Some(agent) = spec
        .agent
        .as_ref()
        .filter(|agent| !agent.command.trim().is_empty())
    else {
        return infrastructure(log, "the fleet spec has no agent command".to_owned(), false);
    };
    if lease.repository.trim().is_empty() {
        return infrastructure(log, "the lease has no repository".to_owned(), false);
    }
    if lease.branch.trim().is_empty() {
        return infrastructure(log, "the lease has no branch".to_owned(), false);
    }
    if !lease.branch.starts_with(&config.branch_prefix) || config.branch_prefix.is_empty() {
        return infrastructure(
            log,
            format!(
                "branch {:?} is outside the worker's branch prefix {:?} (branch_prefix); refused",
                lease.branch, config.branch_prefix
            ),
            false,
        );
    }
    let settings = match SandboxSettings::new(config, &spec.sandbox.clone().unwrap_or_default()) {
        Ok(settings) => settings,
        Err(error) => return sandbox_failure(log, "sandbox", &error),
    };
    // A tracing span for one phase, with the run's identifiers.
    macro_rules! phase_span {
        ($name:literal) => {
            tracing::info_span!($name, run.id = %lease.run_id, fleet.id = %lease.fleet_id, attempt = lease.attempt)
        };
    }
    let git = Git::from_config(config);

    // Prepare: a fresh attempt directory, the mirror, the clone.
    if cancel.is_cancelled() {
        return cancelled(log);
    }
    log.note(&format!(
        "clone: {} (branch {})",
        git::redact_url_credentials(&lease.repository),
        lease.branch
    ));
    if let Err(error) = tokio::fs::remove_dir_all(directory).await
        && error.kind() != std::io::ErrorKind::NotFound
    {
        return infrastructure(
            log,
            format!(
                "cannot clear the attempt directory {}: {error}",
                directory.display()
            ),
            true,
        );
    }
    // The disk quota: the attempt directory is its own size-limited file system.
    let _volume = match workspace_volume(config, directory, settings.disk_limit_bytes).await {
        Ok(volume) => volume,
        Err(result) => return infrastructure(log, result.0, result.1),
    };
    let repository_directory = directory.join("repo");
    let prepared = git::prepare_repository(
        &git,
        &git::mirror_cache(config),
        &lease.repository,
        &repository_directory,
        &lease.branch,
        cancel,
    )
    .instrument(phase_span!("clone"))
    .await;
    let prepared = match prepared {
        Ok(prepared) => prepared,
        Err(error) => return git_failure(log, "clone", &error),
    };
    log.note(&format!(
        "clone: mirror {:?}, base {}",
        prepared.mirror_status,
        prepared
            .base_commit
            .as_deref()
            .unwrap_or("(empty repository)")
    ));

    let identity = AttemptIdentity {
        run_id: lease.run_id.clone(),
        fleet_created_at_ms: lease.fleet_created_at_ms,
        attempt: lease.attempt,
    };
    let target = PublishTarget {
        directory: &prepared.directory,
        url: &lease.repository,
        branch: &prepared.branch,
        prefix: &config.branch_prefix,
        identity: &identity,
        lease: lease_deadline,
        margin: std::time::Duration::from_millis(push_lease_margin_ms(config, lease)),
    };
    // Egress: with network under bwrap, the attempt's own namespace and proxy.
    let proxy = if settings.network && settings.driver == SandboxDriver::Bubblewrap {
        let policy = match config.egress.policy() {
            Ok(policy) => std::sync::Arc::new(policy),
            Err(error) => return infrastructure(log, format!("egress: {error}"), false),
        };
        match EgressProxy::start(policy, &lease.run_id, lease.attempt) {
            Ok(proxy) => {
                log.note(&format!(
                    "egress: proxy {} in the attempt's network namespace",
                    proxy.attachment().proxy_url
                ));
                Some(proxy)
            }
            Err(error) => return infrastructure(log, format!("egress: {error}"), true),
        }
    } else {
        None
    };
    let egress = proxy.as_ref().map(EgressProxy::attachment);
    let mut result = run_prepared(
        config,
        lease,
        spec,
        agent,
        &settings,
        &git,
        &prepared,
        &target,
        cancel,
        directory,
        log,
        egress,
        redactor,
        push_credentials,
        denials,
    )
    .await;
    if let Some(proxy) = proxy {
        let report = proxy.finish().await;
        log.note(&egress_summary(&report));
        attach_egress(&mut result, report);
    }
    if !(spec.push && withdraws_branch(result.outcome())) {
        return result;
    }
    // Nothing pushed: withdraw what an earlier execution of this run left on the branch.
    let publish_git = match push_credentials.git(&git).await {
        Ok(publish_git) => publish_git,
        Err((message, retryable)) => return infrastructure(log, message, retryable),
    };
    let withdrawn = publish::withdraw_fenced(&publish_git, &target, cancel)
        .instrument(phase_span!("publish"))
        .await;
    match withdrawn {
        Ok(Withdrawal::Nothing) => result,
        Ok(Withdrawal::Deleted { commit, attempt }) => {
            log.note(&format!(
                "publish: deleted branch {} at {commit}, pushed by attempt {attempt} of this run, so that it matches this outcome",
                prepared.branch
            ));
            result
        }
        Ok(Withdrawal::Superseded { attempt }) => {
            log.note(&format!(
                "publish: branch {} holds attempt {attempt} of this run; this attempt is stale",
                prepared.branch
            ));
            result
        }
        Err(error) => {
            let mut failure = publish_failure(
                log,
                &format!(
                    "withdrawing an earlier attempt's branch after {}",
                    outcome_name(result.outcome)
                ),
                &error,
            );
            failure.commit = result.commit;
            failure.diffstat = result.diffstat;
            failure.patch = result.patch;
            failure.patch_truncated = result.patch_truncated;
            failure.egress_connections = result.egress_connections;
            failure.egress_connections_dropped = result.egress_connections_dropped;
            failure
        }
    }
}

/// Most sandbox denial entries one result carries (one per mechanism, action and command); the
/// server refuses more.
pub const MAX_SANDBOX_DENIALS_PER_RESULT: usize = 64;

/// Adds the denials of `outcome` (command `label`) to the attempt's, at most
/// [`MAX_SANDBOX_DENIALS_PER_RESULT`] entries (further ones are counted under `other`).
fn record_denials(denials: &mut Vec<SandboxDenial>, label: &str, outcome: &SandboxOutcome) {
    for denial in &outcome.denials {
        let same = |entry: &SandboxDenial, action: &str| {
            entry.mechanism == denial.mechanism && entry.action == action && entry.command == label
        };
        let known = denials.iter().any(|entry| same(entry, &denial.action));
        // The last free entry is kept for `other`.
        let action = if known || denials.len() < MAX_SANDBOX_DENIALS_PER_RESULT - 1 {
            denial.action.as_str()
        } else {
            "other"
        };
        match denials.iter_mut().find(|entry| same(entry, action)) {
            Some(entry) => entry.count = entry.count.saturating_add(denial.count),
            None => denials.push(SandboxDenial {
                mechanism: denial.mechanism.to_owned(),
                action: action.to_owned(),
                command: label.to_owned(),
                count: denial.count,
            }),
        }
    }
}

/// One line for the attempt log: how many egress requests were allowed and denied.
fn egress_summary(report: &EgressReport) -> String {
    let allowed = report
        .connections
        .iter()
        .filter(|record| record.allowed)
        .count();
    let denied = report.connections.len() - allowed;
    format!(
        "egress: {allowed} connections allowed, {denied} denied, {} more not listed",
        report.dropped
    )
}

/// Puts the egress records into the result (wire form).
fn attach_egress(result: &mut RunResult, report: EgressReport) {
    result.egress_connections = report
        .connections
        .into_iter()
        .map(|record| flotilla_proto::v1::EgressConnection {
            host: record.host,
            port: u32::from(record.port),
            address: record
                .address
                .map(|address| address.to_string())
                .unwrap_or_default(),
            bytes_up: record.bytes_up,
            bytes_down: record.bytes_down,
            allowed: record.allowed,
            reason: record.reason,
            duration_ms: record.duration_ms,
        })
        .collect();
    result.egress_connections_dropped = report.dropped;
}

/// Agent, commit, verification and push of a prepared attempt.
#[allow(clippy::too_many_arguments)]
async fn run_prepared(
    config: &WorkerConfig,
    lease: &Lease,
    spec: &FleetSpec,
    agent: &flotilla_proto::v1::AgentSpec,
    settings: &SandboxSettings,
    git: &Git,
    prepared: &git::PreparedRepository,
    target: &PublishTarget<'_>,
    cancel: &CancellationToken,
    directory: &Path,
    log: &mut AttemptLog,
    egress: Option<EgressAttachment>,
    redactor: &Redactor,
    push_credentials: &mut PushCredentials,
    denials: &mut Vec<SandboxDenial>,
) -> RunResult {
    macro_rules! phase_span {
        ($name:literal) => {
            tracing::info_span!($name, run.id = %lease.run_id, fleet.id = %lease.fleet_id, attempt = lease.attempt)
        };
    }
    // Agent.
    if cancel.is_cancelled() {
        return cancelled(log);
    }
    // Secrets go to the agent only, not to the verification commands.
    let environment = command_environment(lease, spec, &agent.task, false);
    let sandbox_command = |label: String, command_line: &str| SandboxCommand {
        label,
        command_line: command_line.to_owned(),
        workspace_directory: prepared.directory.clone(),
        scratch_directory: directory.join("scratch"),
        environment: environment.clone(),
        network: settings.network,
        egress: egress.clone(),
        timeout_ms: settings.timeout_ms,
        memory_limit_bytes: settings.memory_limit_bytes,
        pids_limit: settings.pids_limit,
        cpu_limit_millicores: settings.cpu_limit_millicores,
    };
    let agent_command = SandboxCommand {
        environment: command_environment(lease, spec, &agent.task, true),
        ..sandbox_command("agent".to_owned(), &agent.command)
    };
    let outcome = run_sandboxed(config, settings.driver, &agent_command, log, cancel)
        .instrument(phase_span!("agent"))
        .await;
    match outcome {
        Err(error) => return sandbox_failure(log, "agent", &error),
        Ok(outcome) => {
            record_denials(denials, "agent", &outcome);
            if let Some(result) = command_failure(
                log,
                "agent",
                Outcome::AgentFailed,
                &outcome,
                settings.memory_limit_bytes,
            ) {
                return result;
            }
        }
    }

    // Commit what the agent changed.
    if cancel.is_cancelled() {
        return cancelled(log);
    }
    let message = if spec.commit_message.trim().is_empty() {
        format!("Flotilla: {}", lease.fleet_name)
    } else {
        spec.commit_message.clone()
    };
    let summary = git::commit_changes(
        git,
        config,
        &prepared.directory,
        &message,
        &target.identity.trailers(),
        cancel,
    )
    .instrument(phase_span!("commit"))
    .await;
    let summary = match summary {
        Ok(summary) => summary,
        Err(error) => return git_failure(log, "commit", &error),
    };
    // A change that holds a secret value (in any redacted form, in a file or a file name) is
    // refused: nothing is pushed, no patch is reported.
    if let Some(summary) = &summary
        && !redactor.is_empty()
    {
        match git::find_secret_in_commit(
            git,
            &prepared.directory,
            &summary.commit,
            redactor,
            cancel,
        )
        .await
        {
            Ok(None) => {}
            Ok(Some(found)) => {
                let message = format!(
                    "the change contains the value of secret {found}; refused (nothing is pushed, the patch is withheld)"
                );
                log.note(&format!(
                    "outcome {}: {message}",
                    Outcome::AgentFailed.as_str()
                ));
                return RunResult {
                    error: message,
                    ..base_result(Outcome::AgentFailed, -1)
                };
            }
            Err(error) => return git_failure(log, "checking the change for secrets", &error),
        }
    }
    match &summary {
        Some(summary) => log.note(&format!(
            "commit: {} ({} files changed)",
            summary.commit,
            summary.diffstat.len()
        )),
        None => log.note("commit: nothing changed"),
    }

    // Verify.
    for (index, verify_command) in spec.verify.iter().enumerate() {
        if cancel.is_cancelled() {
            return cancelled(log);
        }
        let label = format!("verify-{}", index + 1);
        let command = sandbox_command(label.clone(), verify_command);
        let outcome = run_sandboxed(config, settings.driver, &command, log, cancel)
            .instrument(phase_span!("verify"))
            .await;
        match outcome {
            Err(error) => {
                return with_summary(sandbox_failure(log, &label, &error), summary.as_ref());
            }
            Ok(outcome) => {
                record_denials(denials, &label, &outcome);
                if let Some(result) = command_failure(
                    log,
                    &label,
                    Outcome::VerifyFailed,
                    &outcome,
                    settings.memory_limit_bytes,
                ) {
                    return with_summary(result, summary.as_ref());
                }
            }
        }
    }

    // Publish.
    let Some(summary) = summary else {
        log.note("outcome unchanged");
        return base_result(Outcome::Unchanged, 0);
    };
    let mut result = with_summary(base_result(Outcome::Changed, 0), Some(&summary));
    if spec.push {
        if cancel.is_cancelled() {
            return with_summary(cancelled(log), Some(&summary));
        }
        let publish_git = match push_credentials.git(git).await {
            Ok(publish_git) => publish_git,
            Err((message, retryable)) => {
                return with_summary(infrastructure(log, message, retryable), Some(&summary));
            }
        };
        let pushed = publish::push_fenced(&publish_git, target, cancel)
            .instrument(phase_span!("publish"))
            .await;
        if let Err(error) = pushed {
            return with_summary(publish_failure(log, "push", &error), Some(&summary));
        }
        log.note(&format!(
            "publish: pushed {} to {}",
            prepared.branch,
            git::redact_url_credentials(&lease.repository)
        ));
        result.pushed = true;
    }
    log.note("outcome changed");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_names_are_safe() {
        assert_eq!(attempt_name("run-1", 2), "run-1-2");
        assert_eq!(attempt_name("../../etc", 1), "run.._.._etc-1");
        assert_eq!(attempt_name("", 1), "run-1");
        assert_eq!(attempt_name("a/b c", 3), "a_b_c-3");
        assert_eq!(
            attempt_name(&"x".repeat(500), 1).len(),
            RUN_ID_FILE_NAME_MAX_CHARS + 2
        );
    }

    #[tokio::test]
    async fn bad_leases_are_infrastructure_results() {
        let directory = tempfile::tempdir().unwrap();
        let config = WorkerConfig {
            work_directory: directory.path().to_path_buf(),
            ..WorkerConfig::default()
        };
        let lease = Lease {
            run_id: "r".to_owned(),
            ..Lease::default()
        };
        let (_keep, cancel) = watch::channel(false);
        let deadline = LeaseDeadline::fixed(
            tokio::time::Instant::now() + std::time::Duration::from_secs(3600),
        );
        let result = execute_attempt(&config, &lease, cancel, deadline).await;
        assert_eq!(result.outcome(), AttemptOutcome::Infrastructure);
        assert!(!result.retryable);
        assert!(result.error.contains("no fleet spec"), "{}", result.error);
        assert!(result.log_tail.contains("no fleet spec"));
    }
}
