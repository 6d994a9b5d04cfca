//! Commands: the entries of the replicated log, and what applying one returns.
//!
//! Every command is wrapped in a [`Request`] that carries the leader's clock reading
//! (`now_ms`). The state machine uses that stamp as "now" and never reads a clock itself, so
//! every replica that applies the same log reaches the same state.

use serde::{Deserialize, Serialize};

pub use flotilla_domain::Outcome;

use crate::secret::SecretEnvelope;
use crate::spec::FleetSpec;
use crate::token::{Principal, Role};

/// One log entry's payload: a command and the time at which the leader proposed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Leader wall-clock time when the command was proposed, in milliseconds since the Unix epoch.
    pub now_ms: u64,
    /// What to do.
    pub command: Command,
    /// Who asked (recorded in the audit log). [`Principal::Unknown`] in entries written before
    /// principals existed.
    #[serde(default)]
    pub principal: Principal,
}

impl Request {
    /// A request stamped `now_ms` on behalf of `principal`.
    pub fn new(now_ms: u64, command: Command, principal: Principal) -> Self {
        Request {
            now_ms,
            command,
            principal,
        }
    }
}

/// A state change. Validated by the node before it is proposed; applying an invalid command
/// (unknown fleet, stale attempt) changes nothing and answers [`Response::Rejected`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Creates a fleet and one pending run per repository, unless `idempotency_key` names an
    /// earlier fleet.
    SubmitFleet {
        /// The validated spec.
        spec: FleetSpec,
        /// Optional idempotency key; empty means none.
        idempotency_key: String,
        /// W3C `traceparent` of the submission's span, or empty. Opaque here: it is handed to
        /// workers with each lease so that a run's trace continues the submission's.
        #[serde(default)]
        trace_parent: String,
        /// Most progress events the fleet keeps (the leader's `limits.max_events_per_fleet`);
        /// older ones are dropped first. 0: no bound (entries written before the bound existed).
        #[serde(default)]
        max_events: u32,
    },
    /// Stages part of a large submission's repositories under `upload_id`
    /// ([`crate::staging`]); answers [`Response::RepositoriesStaged`] or
    /// [`Response::Rejected`] (a bound of [`crate::staging`], or another principal's upload).
    StageRepositories {
        /// Chosen by the API node (random, at most [`crate::staging::MAX_UPLOAD_ID_BYTES`]).
        upload_id: String,
        /// The next repositories, in order.
        repositories: Vec<String>,
    },
    /// [`Command::SubmitFleet`] whose repositories were staged under `upload_id` (in order)
    /// by the same principal; `spec.repositories` is empty. The upload is consumed; a missing
    /// or expired one answers [`Response::Rejected`].
    SubmitStagedFleet {
        /// The staged upload holding the repositories.
        upload_id: String,
        /// The validated spec, without its repositories.
        spec: FleetSpec,
        /// As in [`Command::SubmitFleet`].
        idempotency_key: String,
        /// As in [`Command::SubmitFleet`].
        trace_parent: String,
        /// As in [`Command::SubmitFleet`].
        max_events: u32,
    },
    /// Creates a schedule ([`crate::schedule`]) whose progress starts now: nothing before its
    /// creation is missed. The same spec again answers `ScheduleCreated { created: false }`;
    /// another spec under the same id, an invalid spec, or a cluster holding `max_schedules`
    /// schedules answers [`Response::Rejected`].
    CreateSchedule {
        /// The validated spec.
        spec: crate::schedule::record::ScheduleSpec,
        /// The leader's `limits.max_schedules`.
        max_schedules: u32,
    },
    /// Deletes a schedule; the fleets it started go on.
    DeleteSchedule {
        /// `<project>/<name>`.
        schedule_id: String,
    },
    /// Pauses a schedule (again: the note is replaced). Nominal times while it is paused are
    /// never started.
    PauseSchedule {
        /// `<project>/<name>`.
        schedule_id: String,
        /// Why, at most [`crate::schedule::record::MAX_NOTE_BYTES`].
        note: String,
    },
    /// Resumes a paused schedule from now (idempotent: a running schedule is unchanged).
    ResumeSchedule {
        /// `<project>/<name>`.
        schedule_id: String,
        /// Why, at most [`crate::schedule::record::MAX_NOTE_BYTES`].
        note: String,
    },
    /// Carries out the schedule's [`crate::schedule::plan::plan`] at the command's time
    /// (proposed by the leader's engine when the schedule is due; proposing it again, or when
    /// nothing is due, decides nothing twice). A paused or unknown schedule answers
    /// [`Response::Rejected`]; a fleet the state refuses (a secret gone, say) is recorded in
    /// the schedule's history as skipped with the reason.
    ProcessSchedule {
        /// `<project>/<name>`.
        schedule_id: String,
        /// As in [`Command::SubmitFleet`], for the fleets started.
        max_events: u32,
    },
    /// Starts a fleet of the schedule now, for a person or a system that asked
    /// ([`crate::state::State`]'s `trigger_schedule`): its own key per `trigger_id`, so the same
    /// id again answers the same fleet and two triggers in one second start two fleets.
    TriggerSchedule {
        /// `<project>/<name>`.
        schedule_id: String,
        /// 1-128 bytes of `[A-Za-z0-9._:-]`, chosen by the caller (its idempotency key).
        trigger_id: String,
        /// `skip`, `cancel_other` or `allow_all`.
        overlap: crate::schedule::plan::OverlapPolicy,
        /// As in [`Command::SubmitFleet`].
        max_events: u32,
    },
    /// Starts the schedule's nominal times from `from_ms` to `to_ms` (both included, ms since
    /// the epoch, in the past; at most [`crate::schedule::plan::MAX_BACKFILL_TICKS`] of them)
    /// under the backfill's own overlap policy ([`crate::schedule::plan::plan_backfill`]).
    BackfillSchedule {
        /// `<project>/<name>`.
        schedule_id: String,
        /// First nominal time considered, ms.
        from_ms: u64,
        /// Last nominal time considered, ms.
        to_ms: u64,
        /// The backfill's policy.
        overlap: crate::schedule::plan::OverlapPolicy,
        /// As in [`Command::SubmitFleet`].
        max_events: u32,
    },
    /// Creates an event rule ([`crate::event::rule`]). The same spec again answers
    /// `EventRuleCreated { created: false }`; another spec under the same id, an invalid one,
    /// or a cluster holding `max_rules` rules answers [`Response::Rejected`].
    CreateEventRule {
        /// The validated spec (its fleet template checked by the node).
        spec: crate::event::rule::EventRuleSpec,
        /// The leader's `limits.max_event_rules`.
        max_rules: u32,
    },
    /// Deletes an event rule; the fleets it started go on.
    DeleteEventRule {
        /// `<project>/<name>`.
        rule_id: String,
    },
    /// Records an accepted delivery and starts the fleets the leader's evaluation of the rules
    /// gave (one log entry: record and fleets together). A delivery key that started fleets
    /// before answers those fleets and starts nothing ([`crate::event`]).
    DeliverEvent {
        /// Who sent what.
        header: crate::event::delivery::DeliveryHeader,
        /// Each matching rule's fleet or error.
        matches: Vec<crate::event::delivery::RuleMatch>,
        /// Rules of the project that saw the event.
        rules_evaluated: u32,
        /// The leader's `webhooks.delivery_retention_ms`.
        retention_ms: u64,
        /// The leader's `webhooks.max_deliveries`.
        max_deliveries: u32,
        /// As in [`Command::SubmitFleet`].
        max_events: u32,
    },
    /// Leases up to `free_slots` runs to `worker_id`, each until `now_ms + lease_ttl_ms`.
    ///
    /// Reconciliation first: every lease the state says `worker_id` holds whose
    /// `(run_id, attempt)` is not in `held` was granted by an earlier request whose reply never
    /// reached the worker. Up to `free_slots` of those are granted again (same attempt, lease
    /// renewed, `LeaseGrant::redelivered`); any beyond `free_slots` are released (their attempt
    /// ends as `lease_expired`, retried as usual), so none waits for its lease to expire. The
    /// remaining free slots then get pending runs.
    AcquireLeases {
        /// The worker asking.
        worker_id: String,
        /// Runs the worker can take.
        free_slots: u32,
        /// Lease duration in milliseconds.
        lease_ttl_ms: u64,
        /// Every `(run_id, attempt)` lease the worker is running or still reporting. Empty in
        /// log entries written before this field existed.
        #[serde(default)]
        held: Vec<(String, u32)>,
    },
    /// Renews the leases that `worker_id` still holds until `now_ms + lease_ttl_ms`. No longer
    /// proposed (heartbeats are tracked in the leader's memory, [`crate::liveness`]); applied
    /// as before when a log written by an earlier version is replayed.
    Heartbeat {
        /// The worker.
        worker_id: String,
        /// The `(run_id, attempt)` pairs the worker is running.
        leases: Vec<(String, u32)>,
        /// Lease duration in milliseconds.
        lease_ttl_ms: u64,
    },
    /// Records the result of one attempt. Rejected unless `attempt` is the run's current
    /// attempt (the fencing token) and `worker_id` holds its lease.
    ReportResult {
        /// The reporting worker.
        worker_id: String,
        /// The run.
        run_id: String,
        /// The attempt number the worker was leased (fencing token).
        attempt: u32,
        /// What happened.
        result: AttemptResult,
    },
    /// Cancels every unfinished run of a fleet.
    CancelFleet {
        /// The fleet.
        fleet_id: String,
    },
    /// Pauses a running fleet: no run of it is leased until `ResumeFleet`; running attempts
    /// finish. Idempotent. Answers [`Response::FleetFlowChanged`].
    PauseFleet {
        /// The fleet.
        fleet_id: String,
        /// Why, at most [`crate::flow::MAX_NOTE_BYTES`].
        note: String,
    },
    /// Ends a fleet's pause (by a person or by its failure budget) and starts its failure
    /// budget's count again. Idempotent.
    ResumeFleet {
        /// The fleet.
        fleet_id: String,
        /// Why.
        note: String,
    },
    /// Opens a fleet's approval gate (before its first lease, or between waves), starting
    /// the next wave. Idempotent.
    ApproveFleet {
        /// The fleet.
        fleet_id: String,
        /// Why.
        note: String,
    },
    /// Starts the waves whose soak time ended and cancels the pending runs of fleets past
    /// their deadline, at the entry's time (proposed by the leader's engine). Answers
    /// [`Response::FleetsAdvanced`].
    AdvanceFleets,
    /// Creates a rate or concurrency limit ([`crate::limit`]); refused when the name exists
    /// or the cluster holds `max_limits`.
    CreateLimit {
        /// The validated limit.
        spec: crate::limit::LimitSpec,
        /// The leader's `limits.max_limits`.
        max_limits: u32,
    },
    /// Deletes a limit; slots its running runs hold are given back.
    DeleteLimit {
        /// The limit's name.
        name: String,
    },
    /// Submits a fleet that runs again some runs of `origin_fleet_id`: `spec.repositories[i]`
    /// is the repository of its run `run_indexes[i]`, and each must be terminal. Otherwise as
    /// [`Command::SubmitFleet`].
    RerunFleet {
        /// The fleet whose runs are repeated (`fl-<n>`).
        origin_fleet_id: String,
        /// The runs repeated, in the order of `spec.repositories`.
        run_indexes: Vec<u32>,
        /// The new fleet's spec.
        spec: FleetSpec,
        /// As in [`Command::SubmitFleet`].
        idempotency_key: String,
        /// As in [`Command::SubmitFleet`].
        trace_parent: String,
        /// As in [`Command::SubmitFleet`].
        max_events: u32,
    },
    /// Ends every lease whose expiry is at or before `now_ms`; the runs are retried or failed.
    /// No longer proposed (expiry is decided from heartbeats in the leader's memory,
    /// [`Command::ExpireSilentLeases`]); applied as before when an earlier log is replayed.
    ExpireLeases,
    /// Ends the listed leases, from which the leader heard no heartbeat within
    /// `lease_ttl_ms` ([`crate::liveness`]); their runs are retried or failed as any
    /// `lease_expired` attempt. A lease that is no longer the run's current, running attempt
    /// (its result or another expiry came first), or whose grant deadline is no longer the one
    /// listed (the grant was sent again since, renewing it), is skipped. Rejected with more than
    /// [`crate::liveness::MAX_EXPIRED_LEASES_PER_COMMAND`] entries.
    ExpireSilentLeases {
        /// `(run_id, attempt, granted_until_ms)` of each lease to end; the last is the lease's
        /// `expires_at_ms` in the state when the leader decided.
        leases: Vec<(String, u32, u64)>,
    },
    /// Creates an API token. The node generated the secret; only its SHA-256 is here.
    /// Rejected when the accessor id exists, the fields are inconsistent (a project-scoped role
    /// without a project, a worker token without a worker id), or [`crate::token::MAX_TOKENS`]
    /// tokens are kept and none is revoked or expired to forget.
    CreateToken {
        /// [`crate::token::ACCESSOR_ID_CHARS`] lower-case hex characters.
        accessor_id: String,
        /// Lower-case hex SHA-256 of the secret.
        secret_sha256: String,
        /// 1-64 characters of `[A-Za-z0-9._-]`.
        name: String,
        /// The project for viewer, submitter and operator tokens; `None` for admin and worker.
        project: Option<String>,
        /// The role.
        role: Role,
        /// The worker id of a worker token; `None` otherwise.
        worker_id: Option<String>,
        /// Expiry in milliseconds since the Unix epoch; `None`: never.
        expires_ms: Option<u64>,
    },
    /// Creates the first admin token (name `bootstrap`). Accepted once per cluster: rejected
    /// once any bootstrap was accepted.
    BootstrapToken {
        /// [`crate::token::ACCESSOR_ID_CHARS`] lower-case hex characters.
        accessor_id: String,
        /// Lower-case hex SHA-256 of the secret.
        secret_sha256: String,
    },
    /// Revokes a token (final). Rejected for an unknown accessor id.
    RevokeToken {
        /// The token.
        accessor_id: String,
    },
    /// Forgets fleets that ended at least `retention_ms` before `now_ms` (their runs, events
    /// and idempotency keys), at most `max_fleets` of them, oldest first, so the state stays
    /// bounded. A key forgotten this way may create a new fleet if submitted again.
    CompactFleets {
        /// How long an ended fleet is kept, in milliseconds.
        retention_ms: u64,
        /// Most fleets removed by this command.
        max_fleets: u32,
    },
    /// Stores `version` of secret `name` of `project`: an envelope made at the node edge (the
    /// log never holds the value). Rejected unless `version` is the secret's next version (1
    /// for a new one), or when a new secret would pass either limit.
    SetSecret {
        /// The project, a valid name.
        project: String,
        /// The secret's name, a valid name.
        name: String,
        /// The version the envelope is bound to.
        version: u64,
        /// Size of the plaintext value, in bytes.
        value_size_bytes: u64,
        /// The encrypted value.
        envelope: SecretEnvelope,
        /// Most secrets in one project (the leader's `limits.max_secrets_per_project`).
        max_secrets_per_project: u32,
        /// Most secrets in the cluster (the leader's `limits.max_secrets_total`).
        max_secrets_total: u32,
    },
    /// Forgets secret `name` of `project`. Fleets naming it then fail at lease time.
    DeleteSecret {
        /// The project.
        project: String,
        /// The secret's name.
        name: String,
    },
    /// Replaces the wrapping of `version` of a secret (key rotation): same ciphertext, its data
    /// key wrapped under the key-encryption key `key_id`. Rejected when the secret is at
    /// another version.
    RewrapSecret {
        /// The project.
        project: String,
        /// The secret's name.
        name: String,
        /// The version that was re-wrapped.
        version: u64,
        /// The new key-encryption key's id.
        key_id: String,
        /// Standard base64 of the re-wrapped data key.
        wrapped_data_key: String,
    },
}

/// Per-file change counts, as `git diff --numstat` gives them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// Path relative to the repository root.
    pub path: String,
    /// Lines added.
    pub insertions: u32,
    /// Lines removed.
    pub deletions: u32,
}

/// Most egress connection records one result may carry ([`AttemptResult::egress_connections`]);
/// a worker keeps at most its `egress.max_records_per_attempt` and counts the rest as dropped.
pub const MAX_EGRESS_CONNECTIONS_PER_RESULT: usize = 1024;

/// Longest `reason` of an [`EgressConnection`], in bytes.
pub const MAX_EGRESS_REASON_BYTES: usize = 128;

/// One request an attempt's egress proxy served, as the worker recorded it (for audit records).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressConnection {
    /// The host asked for (lower case, at most 253 bytes); empty when the request named none.
    pub host: String,
    /// The port asked for; 0 when the request named none.
    pub port: u16,
    /// The address connected to or refused, as text; empty when none.
    pub address: String,
    /// Bytes from the agent to the target.
    pub bytes_up: u64,
    /// Bytes from the target to the agent.
    pub bytes_down: u64,
    /// Whether the tunnel was opened.
    pub allowed: bool,
    /// Denied: why (`not_allowed`, `forbidden_address:loopback`, ...); allowed: how the tunnel
    /// ended (`closed`, `idle_timeout`, ...). At most [`MAX_EGRESS_REASON_BYTES`].
    pub reason: String,
    /// From the request to the denial or the tunnel's end, in milliseconds.
    pub duration_ms: u64,
}

/// The result of one attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptResult {
    /// How it ended.
    pub outcome: Outcome,
    /// Exit code of the failing command, or -1.
    pub exit_code: i32,
    /// One-line error, empty on success.
    pub error: String,
    /// Last bytes of the attempt's log. In a command: the bytes. In the state: empty, the bytes
    /// live in the artifact store ([`crate::artifact`]) and `log_tail_size_bytes` and
    /// `log_tail_sha256` describe them.
    pub log_tail: String,
    /// Size of the log tail in bytes (in the state; 0 in a command).
    #[serde(default)]
    pub log_tail_size_bytes: u64,
    /// Lower-case hex SHA-256 of the log tail (in the state; empty when there is none).
    #[serde(default)]
    pub log_tail_sha256: String,
    /// Commit id of the change (for `Changed`).
    pub commit: String,
    /// Diffstat of the change.
    pub diffstat: Vec<FileStat>,
    /// The patch, possibly truncated. Like `log_tail`: bytes in a command, artifact in the state.
    pub patch: String,
    /// Size of the patch in bytes (in the state; 0 in a command).
    #[serde(default)]
    pub patch_size_bytes: u64,
    /// Lower-case hex SHA-256 of the patch (in the state; empty when there is none).
    #[serde(default)]
    pub patch_sha256: String,
    /// Whether `patch` was truncated.
    pub patch_truncated: bool,
    /// Whether the branch was pushed to the origin.
    pub pushed: bool,
    /// For `Infrastructure`: whether another attempt may succeed.
    pub retryable: bool,
    /// The requests the attempt's egress proxy served (runs with network), at most
    /// [`MAX_EGRESS_CONNECTIONS_PER_RESULT`].
    #[serde(default)]
    pub egress_connections: Vec<EgressConnection>,
    /// Egress requests the worker did not list (beyond its record limit).
    #[serde(default)]
    pub egress_connections_dropped: u64,
    /// Push credentials minted and revoked for the attempt (at most
    /// [`MAX_CREDENTIAL_EVENTS`]), for the audit log.
    #[serde(default)]
    pub credential_events: Vec<CredentialEvent>,
    /// What the sandbox refused, as the kernel reported it to the worker (at most
    /// [`MAX_SANDBOX_DENIALS_PER_RESULT`]), for the audit log.
    #[serde(default)]
    pub sandbox_denials: Vec<SandboxDenial>,
}

/// Most sandbox denial entries one result carries (one per mechanism, action and command; the
/// worker folds further ones into `other`).
pub const MAX_SANDBOX_DENIALS_PER_RESULT: usize = 64;

/// Longest sandbox denial action or command label, in bytes.
pub const MAX_SANDBOX_DENIAL_TEXT_BYTES: usize = 128;

/// One kind of action a sandbox refused during an attempt, and how often, as the worker
/// observed it from the kernel (never as the agent reported it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxDenial {
    /// `seccomp` (a denied system call, from the filter's user notification) or `cgroup` (a
    /// limit reached, from the cgroup's event counters).
    pub mechanism: String,
    /// What was refused: `ptrace`, `socket(AF_NETLINK)`, `clone(CLONE_NEWUSER)`, `pids.max`,
    /// `memory.oom_kill`, ... At most [`MAX_SANDBOX_DENIAL_TEXT_BYTES`].
    pub action: String,
    /// The sandboxed command (`agent`, `verify-1`). At most [`MAX_SANDBOX_DENIAL_TEXT_BYTES`].
    pub command: String,
    /// How many times.
    pub count: u64,
}

/// Most credential events one result carries.
pub const MAX_CREDENTIAL_EVENTS: usize = 16;

/// A push credential minted or revoked by a worker for one attempt. Never holds the token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialEvent {
    /// `mint`, `mint_failed`, `revoke` or `revoke_failed`.
    pub kind: String,
    /// The broker that acted (`static`, ...).
    pub broker: String,
    /// The repository URL, credentials in it redacted.
    pub repository: String,
    /// Expiry of the credential, ms since the Unix epoch; 0 when it does not expire.
    pub expires_at_ms: u64,
    /// Worker wall-clock time of the event, ms since the Unix epoch.
    pub time_ms: u64,
    /// The broker's non-secret id of the credential, or empty.
    pub credential_id: String,
    /// For a failure: why.
    pub error: String,
}

impl AttemptResult {
    /// A result with only an outcome and an error message.
    pub fn failure(outcome: Outcome, error: impl Into<String>, retryable: bool) -> Self {
        AttemptResult {
            outcome,
            exit_code: -1,
            error: error.into(),
            log_tail: String::new(),
            log_tail_size_bytes: 0,
            log_tail_sha256: String::new(),
            commit: String::new(),
            diffstat: Vec::new(),
            patch: String::new(),
            patch_size_bytes: 0,
            patch_sha256: String::new(),
            patch_truncated: false,
            pushed: false,
            retryable,
            egress_connections: Vec::new(),
            egress_connections_dropped: 0,
            credential_events: Vec::new(),
            sandbox_denials: Vec::new(),
        }
    }
}

/// A lease granted by [`Command::AcquireLeases`]: everything a worker needs to run the attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    /// The run.
    pub run_id: String,
    /// Its fleet.
    pub fleet_id: String,
    /// The repository URL.
    pub repository: String,
    /// The attempt number: the fencing token results must carry.
    pub attempt: u32,
    /// The branch to commit on.
    pub branch: String,
    /// The fleet's spec without its repository list ([`FleetSpec::without_repositories`]), so a
    /// grant's size does not grow with the fleet.
    pub spec: FleetSpec,
    /// When the lease ends unless renewed, in milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
    /// W3C `traceparent` of the fleet's submission, or empty.
    pub trace_parent: String,
    /// Leader time of the fleet's submission, in milliseconds since the Unix epoch. With
    /// `run_id` it names the run beyond this cluster's lifetime (a fresh cluster reuses
    /// `fl-1-0`); workers record both in their commits.
    pub fleet_created_at_ms: u64,
    /// Whether this grant repeats one the worker did not list as held (its first reply was
    /// lost), rather than a new attempt.
    pub redelivered: bool,
}

/// What applying a command returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// `StageRepositories`: the upload now holds `repositories` repositories.
    RepositoriesStaged {
        /// Repositories staged under the upload so far.
        repositories: u32,
    },
    /// `SubmitFleet`: the fleet, and whether this command created it.
    FleetSubmitted {
        /// The fleet's id.
        fleet_id: String,
        /// False when the idempotency key matched an earlier fleet.
        created: bool,
    },
    /// `SubmitFleet`: the idempotency key names an earlier fleet whose spec differs; nothing was
    /// created. (The same spec answers [`Response::FleetSubmitted`] with `created: false`.)
    IdempotencyKeyConflict {
        /// The fleet the key created.
        fleet_id: String,
    },
    /// `AcquireLeases`: the leases granted (maybe none).
    Leased(Vec<LeaseGrant>),
    /// `Heartbeat`: the `(run_id, attempt)` pairs the worker no longer holds.
    Heartbeat {
        /// Leases lost.
        lost: Vec<(String, u32)>,
    },
    /// `ReportResult` accepted and applied.
    ResultAccepted,
    /// `CancelFleet` applied (also when the fleet had already finished).
    FleetCancelled,
    /// `PauseFleet`, `ResumeFleet`, `ApproveFleet`: whether anything changed, and what.
    FleetFlowChanged {
        /// False when there was nothing to do (already paused, not paused, no gate).
        changed: bool,
        /// What happened, as in the fleet's event.
        message: String,
    },
    /// `AdvanceFleets`: how many fleets moved on.
    FleetsAdvanced {
        /// Fleets with a wave started or a deadline carried out.
        count: u32,
    },
    /// `CreateLimit` applied.
    LimitCreated {
        /// Its name.
        name: String,
    },
    /// `DeleteLimit` applied.
    LimitDeleted {
        /// Its name.
        name: String,
    },
    /// `ExpireLeases` or `ExpireSilentLeases`: how many leases ended.
    LeasesExpired {
        /// Count of expired leases.
        count: u32,
    },
    /// `CompactFleets`: how many fleets were forgotten.
    FleetsCompacted {
        /// Count of removed fleets.
        count: u32,
    },
    /// `CreateToken` or `BootstrapToken` applied.
    TokenCreated {
        /// The new token's accessor id.
        accessor_id: String,
    },
    /// `RevokeToken` applied (also when it was already revoked).
    TokenRevoked,
    /// `SetSecret` applied: the secret is now at `version`.
    SecretSet {
        /// The stored version.
        version: u64,
    },
    /// `DeleteSecret` applied.
    SecretDeleted {
        /// Whether the secret existed.
        existed: bool,
    },
    /// `RewrapSecret` applied.
    SecretRewrapped,
    /// `CreateSchedule`: the schedule, and whether this command created it.
    ScheduleCreated {
        /// `<project>/<name>`.
        schedule_id: String,
        /// False when the same spec existed already.
        created: bool,
    },
    /// `DeleteSchedule` applied.
    ScheduleDeleted {
        /// Whether it existed.
        existed: bool,
    },
    /// `PauseSchedule` or `ResumeSchedule` applied: whether the schedule is now paused.
    SchedulePaused {
        /// The new state.
        paused: bool,
    },
    /// `ProcessSchedule` applied: the fleets it started, in nominal-time order.
    ScheduleProcessed {
        /// `fl-<n>` of each fleet started.
        started: Vec<String>,
    },
    /// `TriggerSchedule` applied: the trigger's fleet, and whether this command created it.
    ScheduleTriggered {
        /// `fl-<n>`.
        fleet_id: String,
        /// False when the trigger id had started it already.
        created: bool,
    },
    /// `BackfillSchedule` applied.
    ScheduleBackfilled {
        /// `fl-<n>` of each fleet started, oldest nominal time first.
        started: Vec<String>,
        /// Nominal times kept in the schedule's buffer.
        buffered: u32,
        /// Nominal times not started (overlap, buffer full, already started, refused).
        skipped: u32,
    },
    /// `CreateEventRule`: the rule, and whether this command created it.
    EventRuleCreated {
        /// `<project>/<name>`.
        rule_id: String,
        /// False when the same spec existed already.
        created: bool,
    },
    /// `DeleteEventRule` applied.
    EventRuleDeleted {
        /// Whether it existed.
        existed: bool,
    },
    /// `DeliverEvent` applied: the delivery's fleets.
    EventDelivered {
        /// `fl-<n>` of each fleet the delivery started (by this command or, when `duplicate`,
        /// by an earlier receipt).
        fleet_ids: Vec<String>,
        /// Whether an earlier receipt of the same delivery had started them.
        duplicate: bool,
    },
    /// The command was valid on the wire but not applicable to the state; nothing changed.
    Rejected {
        /// Why.
        reason: String,
    },
    /// A submission refused because its runs would take a concurrency limit's queue over
    /// its `max_queued` ([`crate::limit::LimitKind::Concurrency`]); nothing changed, and the
    /// same submission may succeed once fewer runs wait.
    QueueFull {
        /// Which limit and key, how many wait and how many the fleet adds.
        reason: String,
    },
}
