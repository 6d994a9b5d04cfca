//! Conversions between the wire types (`flotilla.v1`) and the state machine's types, with the
//! validation of every field that arrives over the wire. Errors name the field's path.

pub mod flow;

use flotilla_proto::outcome::{outcome_from_wire, outcome_to_wire};
use flotilla_proto::v1;
use flotilla_scheduler::command::{
    CredentialEvent, MAX_CREDENTIAL_EVENTS, MAX_SANDBOX_DENIAL_TEXT_BYTES,
    MAX_SANDBOX_DENIALS_PER_RESULT, SandboxDenial,
};
use flotilla_scheduler::command::{
    EgressConnection, MAX_EGRESS_CONNECTIONS_PER_RESULT, MAX_EGRESS_REASON_BYTES,
};
use flotilla_scheduler::spec as scheduler_spec;
use flotilla_scheduler::{
    AgentSpec, AttemptResult, FieldError, FileStat, Fleet, FleetEvent, FleetSpec, FleetState,
    LeaseGrant, Outcome, RetryPolicy, Run, RunCounts, RunState, SandboxSpec, SpecLimits,
};

/// Limits on what a worker may report, in bytes unless named otherwise.
#[derive(Clone, Debug)]
pub struct ResultLimits {
    /// Largest accepted `log_tail`.
    pub max_log_tail_bytes: usize,
    /// Largest accepted `patch`.
    pub max_patch_bytes: usize,
    /// Most diffstat entries.
    pub max_diffstat_entries: usize,
    /// Largest `error` message.
    pub max_error_bytes: usize,
}

/// `value`, or `default` when `value` is the wire's zero value (0, "", false): where every
/// "0 means the default" of a request is resolved, so each default is one named constant.
pub fn or_default<T: Default + PartialEq>(value: T, default: T) -> T {
    if value == T::default() {
        default
    } else {
        value
    }
}

/// A page size of a list request: 0 means `default`; 1 to `max` as asked; above `max` an error
/// naming `page_size`.
///
/// # Errors
/// `page_size: must be between 0 and <max>`.
pub fn page_size(requested: u32, default: usize, max: usize) -> Result<usize, FieldError> {
    debug_assert!((1..=max).contains(&default));
    match requested as usize {
        0 => Ok(default),
        n if n <= max => Ok(n),
        _ => Err(FieldError::new(
            "page_size",
            format!("must be between 0 and {max}"),
        )),
    }
}

/// Converts a submitted spec, filling defaults for zero values, and validates it.
///
/// # Errors
/// The first invalid field, with its path below `spec`.
pub fn fleet_spec_from_wire(
    spec: Option<v1::FleetSpec>,
    limits: &SpecLimits,
) -> Result<FleetSpec, FieldError> {
    let converted = fleet_template_from_wire(spec, limits)?;
    converted.validate("spec", limits)?;
    Ok(converted)
}

/// [`fleet_spec_from_wire`] without the validation: a template (an event rule's fleet) whose
/// targets and text are completed later and validated then.
///
/// # Errors
/// A missing `spec` or `spec.agent`.
pub fn fleet_template_from_wire(
    spec: Option<v1::FleetSpec>,
    limits: &SpecLimits,
) -> Result<FleetSpec, FieldError> {
    let spec = spec.ok_or_else(|| FieldError::new("spec", "is required"))?;
    let agent = spec
        .agent
        .ok_or_else(|| FieldError::new("spec.agent", "is required"))?;
    let sandbox = spec.sandbox.unwrap_or_default();
    let defaults = RetryPolicy::default();
    let converted = FleetSpec {
        name: spec.name,
        project: or_default(spec.project, scheduler_spec::DEFAULT_PROJECT.into()),
        repositories: spec.repositories,
        agent: AgentSpec {
            command: agent.command,
            task: agent.task,
            env: agent.env.into_iter().collect(),
            secrets: agent.secrets.into_iter().collect(),
        },
        verify: spec.verify,
        sandbox: SandboxSpec {
            driver: or_default(
                sandbox.driver,
                scheduler_spec::DEFAULT_SANDBOX_DRIVER.into(),
            ),
            timeout_ms: or_default(
                sandbox.timeout_ms,
                scheduler_spec::DEFAULT_SANDBOX_TIMEOUT_MS,
            ),
            // 0 stays 0: the worker resolves these against its own defaults and maxima.
            memory_limit_bytes: sandbox.memory_limit_bytes,
            pids_limit: sandbox.pids_limit,
            network: sandbox.network,
            cpu_limit_millicores: sandbox.cpu_limit_millicores,
            disk_limit_bytes: sandbox.disk_limit_bytes,
        },
        // The default template lies under the configured prefix (flotilla/{fleet} by default).
        branch_template: or_default(
            spec.branch_template,
            format!("{}{{fleet}}", limits.branch_prefix),
        ),
        commit_message: or_default(
            spec.commit_message,
            scheduler_spec::DEFAULT_COMMIT_MESSAGE.into(),
        ),
        max_parallelism: or_default(
            spec.max_parallelism,
            scheduler_spec::DEFAULT_MAX_PARALLELISM,
        ),
        retry: RetryPolicy {
            max_attempts: or_default(spec.max_attempts, defaults.max_attempts),
            backoff_initial_ms: or_default(
                spec.retry_backoff_initial_ms,
                defaults.backoff_initial_ms,
            ),
            // Never below the initial backoff asked for.
            backoff_max_ms: or_default(
                spec.retry_backoff_max_ms,
                defaults.backoff_max_ms.max(spec.retry_backoff_initial_ms),
            ),
        },
        push: spec.push,
        flow: flow::flow_spec_from_wire(spec.flow)?,
    };
    Ok(converted)
}

/// The wire form of a stored spec.
pub fn fleet_spec_to_wire(spec: &FleetSpec) -> v1::FleetSpec {
    v1::FleetSpec {
        repositories: spec.repositories.clone(),
        ..execution_spec_to_wire(spec)
    }
}

/// Wire form of `spec` without its repository list (what a lease and a fleet response carry),
/// at a cost independent of the number of repositories.
pub fn execution_spec_to_wire(spec: &FleetSpec) -> v1::FleetSpec {
    v1::FleetSpec {
        name: spec.name.clone(),
        project: spec.project.clone(),
        repositories: Vec::new(),
        agent: Some(v1::AgentSpec {
            command: spec.agent.command.clone(),
            task: spec.agent.task.clone(),
            env: spec.agent.env.clone().into_iter().collect(),
            secrets: spec.agent.secrets.clone().into_iter().collect(),
        }),
        verify: spec.verify.clone(),
        sandbox: Some(v1::SandboxSpec {
            driver: spec.sandbox.driver.clone(),
            timeout_ms: spec.sandbox.timeout_ms,
            memory_limit_bytes: spec.sandbox.memory_limit_bytes,
            pids_limit: spec.sandbox.pids_limit,
            network: spec.sandbox.network,
            cpu_limit_millicores: spec.sandbox.cpu_limit_millicores,
            disk_limit_bytes: spec.sandbox.disk_limit_bytes,
        }),
        branch_template: spec.branch_template.clone(),
        commit_message: spec.commit_message.clone(),
        max_parallelism: spec.max_parallelism,
        max_attempts: spec.retry.max_attempts,
        push: spec.push,
        retry_backoff_initial_ms: spec.retry.backoff_initial_ms,
        retry_backoff_max_ms: spec.retry.backoff_max_ms,
        flow: Some(flow::flow_spec_to_wire(&spec.flow)),
    }
}

/// Wire form of a lease grant, without secrets (the leader adds them): the run's repository,
/// branch and attempt, and the fleet's execution spec without its repository list, so the
/// lease's size does not grow with the fleet. `lease_ttl_ms` is the node's lease time to live.
pub fn lease_to_wire(grant: &LeaseGrant, lease_ttl_ms: u64) -> v1::Lease {
    v1::Lease {
        run_id: grant.run_id.clone(),
        fleet_id: grant.fleet_id.clone(),
        fleet_name: grant.spec.name.clone(),
        repository: grant.repository.clone(),
        attempt: grant.attempt,
        branch: grant.branch.clone(),
        spec: Some(execution_spec_to_wire(&grant.spec)),
        lease_ttl_ms,
        trace_parent: grant.trace_parent.clone(),
        fleet_created_at_ms: grant.fleet_created_at_ms,
        ..v1::Lease::default()
    }
}

/// Converts and validates a reported result.
///
/// # Errors
/// The first invalid field, with its path below `result`.
pub fn attempt_result_from_wire(
    result: Option<v1::RunResult>,
    limits: &ResultLimits,
) -> Result<AttemptResult, FieldError> {
    let result = result.ok_or_else(|| FieldError::new("result", "is required"))?;
    let outcome = match outcome_from_wire(result.outcome) {
        Some(Outcome::LeaseExpired) => {
            return Err(FieldError::new(
                "result.outcome",
                "ATTEMPT_OUTCOME_LEASE_EXPIRED is decided by the cluster, not reported",
            ));
        }
        Some(outcome) => outcome,
        None if result.outcome == 0 => {
            return Err(FieldError::new("result.outcome", "is required"));
        }
        None => {
            return Err(FieldError::new(
                "result.outcome",
                format!("unknown outcome {}", result.outcome),
            ));
        }
    };
    if result.log_tail.len() > limits.max_log_tail_bytes {
        return Err(FieldError::new(
            "result.log_tail",
            format!(
                "{} bytes exceed max_log_tail_bytes {}",
                result.log_tail.len(),
                limits.max_log_tail_bytes
            ),
        ));
    }
    if result.patch.len() > limits.max_patch_bytes {
        return Err(FieldError::new(
            "result.patch",
            format!(
                "{} bytes exceed max_patch_bytes {}",
                result.patch.len(),
                limits.max_patch_bytes
            ),
        ));
    }
    if result.error.len() > limits.max_error_bytes {
        return Err(FieldError::new(
            "result.error",
            format!("longer than {} bytes", limits.max_error_bytes),
        ));
    }
    if result.diffstat.len() > limits.max_diffstat_entries {
        return Err(FieldError::new(
            "result.diffstat",
            format!("more than {} entries", limits.max_diffstat_entries),
        ));
    }
    if result.egress_connections.len() > MAX_EGRESS_CONNECTIONS_PER_RESULT {
        return Err(FieldError::new(
            "result.egress_connections",
            format!("more than {MAX_EGRESS_CONNECTIONS_PER_RESULT} entries"),
        ));
    }
    let mut egress_connections = Vec::with_capacity(result.egress_connections.len());
    for (index, connection) in result.egress_connections.into_iter().enumerate() {
        let field = |name: &str| format!("result.egress_connections[{index}].{name}");
        if connection.host.len() > 253 {
            return Err(FieldError::new(field("host"), "longer than 253 bytes"));
        }
        let Ok(port) = u16::try_from(connection.port) else {
            return Err(FieldError::new(field("port"), "above 65535"));
        };
        if connection.address.len() > 64 {
            return Err(FieldError::new(field("address"), "longer than 64 bytes"));
        }
        if connection.reason.len() > MAX_EGRESS_REASON_BYTES {
            return Err(FieldError::new(
                field("reason"),
                format!("longer than {MAX_EGRESS_REASON_BYTES} bytes"),
            ));
        }
        egress_connections.push(EgressConnection {
            host: connection.host,
            port,
            address: connection.address,
            bytes_up: connection.bytes_up,
            bytes_down: connection.bytes_down,
            allowed: connection.allowed,
            reason: connection.reason,
            duration_ms: connection.duration_ms,
        });
    }
    if result.credential_events.len() > MAX_CREDENTIAL_EVENTS {
        return Err(FieldError::new(
            "result.credential_events",
            format!("more than {MAX_CREDENTIAL_EVENTS} entries"),
        ));
    }
    for (index, event) in result.credential_events.iter().enumerate() {
        let too_long = [&event.kind, &event.broker, &event.credential_id]
            .iter()
            .any(|text| text.len() > 256)
            || event.repository.len() > 4096
            || event.error.len() > 1024;
        if too_long {
            return Err(FieldError::new(
                format!("result.credential_events[{index}]"),
                "a field is too long (kind, broker, credential_id 256 bytes; repository 4096; error 1024)",
            ));
        }
        if !matches!(
            event.kind.as_str(),
            "mint" | "mint_failed" | "revoke" | "revoke_failed"
        ) {
            return Err(FieldError::new(
                format!("result.credential_events[{index}].kind"),
                "must be mint, mint_failed, revoke or revoke_failed",
            ));
        }
    }
    if result.sandbox_denials.len() > MAX_SANDBOX_DENIALS_PER_RESULT {
        return Err(FieldError::new(
            "result.sandbox_denials",
            format!("more than {MAX_SANDBOX_DENIALS_PER_RESULT} entries"),
        ));
    }
    for (index, denial) in result.sandbox_denials.iter().enumerate() {
        let field = |name: &str| format!("result.sandbox_denials[{index}].{name}");
        if !matches!(denial.mechanism.as_str(), "seccomp" | "cgroup") {
            return Err(FieldError::new(
                field("mechanism"),
                "must be seccomp or cgroup",
            ));
        }
        for (name, text) in [("action", &denial.action), ("command", &denial.command)] {
            if text.is_empty() || text.len() > MAX_SANDBOX_DENIAL_TEXT_BYTES {
                return Err(FieldError::new(
                    field(name),
                    format!("must be 1 to {MAX_SANDBOX_DENIAL_TEXT_BYTES} bytes"),
                ));
            }
        }
    }
    if outcome == Outcome::Changed && result.commit.is_empty() {
        return Err(FieldError::new(
            "result.commit",
            "is required when the outcome is changed",
        ));
    }
    Ok(AttemptResult {
        outcome,
        exit_code: result.exit_code,
        error: result.error,
        log_tail: result.log_tail,
        log_tail_size_bytes: 0,
        log_tail_sha256: String::new(),
        commit: result.commit,
        diffstat: result
            .diffstat
            .into_iter()
            .map(|f| FileStat {
                path: f.path,
                insertions: f.insertions,
                deletions: f.deletions,
            })
            .collect(),
        patch: result.patch,
        patch_size_bytes: 0,
        patch_sha256: String::new(),
        patch_truncated: result.patch_truncated,
        pushed: result.pushed,
        retryable: result.retryable,
        egress_connections,
        egress_connections_dropped: result.egress_connections_dropped,
        credential_events: result
            .credential_events
            .into_iter()
            .map(|event| CredentialEvent {
                kind: event.kind,
                broker: event.broker,
                repository: event.repository,
                expires_at_ms: event.expires_at_ms,
                time_ms: event.time_ms,
                credential_id: event.credential_id,
                error: event.error,
            })
            .collect(),
        sandbox_denials: result
            .sandbox_denials
            .into_iter()
            .map(|denial| SandboxDenial {
                mechanism: denial.mechanism,
                action: denial.action,
                command: denial.command,
                count: denial.count,
            })
            .collect(),
    })
}

/// Wire form of a sandbox denial.
pub fn sandbox_denial_to_wire(denial: &SandboxDenial) -> v1::SandboxDenial {
    v1::SandboxDenial {
        mechanism: denial.mechanism.clone(),
        action: denial.action.clone(),
        command: denial.command.clone(),
        count: denial.count,
    }
}

/// Wire form of an egress connection record.
pub fn egress_connection_to_wire(connection: &EgressConnection) -> v1::EgressConnection {
    v1::EgressConnection {
        host: connection.host.clone(),
        port: u32::from(connection.port),
        address: connection.address.clone(),
        bytes_up: connection.bytes_up,
        bytes_down: connection.bytes_down,
        allowed: connection.allowed,
        reason: connection.reason.clone(),
        duration_ms: connection.duration_ms,
    }
}

/// Wire form of a credential event.
pub fn credential_event_to_wire(event: &CredentialEvent) -> v1::CredentialEvent {
    v1::CredentialEvent {
        kind: event.kind.clone(),
        broker: event.broker.clone(),
        repository: event.repository.clone(),
        expires_at_ms: event.expires_at_ms,
        time_ms: event.time_ms,
        credential_id: event.credential_id.clone(),
        error: event.error.clone(),
    }
}

/// Wire form of a run state.
pub fn run_state_to_wire(state: RunState) -> v1::RunState {
    match state {
        RunState::Pending => v1::RunState::Pending,
        RunState::Running => v1::RunState::Running,
        RunState::Changed => v1::RunState::Changed,
        RunState::Unchanged => v1::RunState::Unchanged,
        RunState::Failed => v1::RunState::Failed,
        RunState::Cancelled => v1::RunState::Cancelled,
    }
}

/// Wire form of a fleet state.
pub fn fleet_state_to_wire(state: FleetState) -> v1::FleetState {
    match state {
        FleetState::Running => v1::FleetState::Running,
        FleetState::Finished => v1::FleetState::Finished,
        FleetState::Cancelled => v1::FleetState::Cancelled,
    }
}

/// Wire form of run counts.
pub fn counts_to_wire(counts: &RunCounts) -> v1::RunCounts {
    v1::RunCounts {
        pending: counts.pending,
        running: counts.running,
        changed: counts.changed,
        unchanged: counts.unchanged,
        failed: counts.failed,
        cancelled: counts.cancelled,
        total: counts.total(),
    }
}

/// Most runs a fleet response carries ([`FleetView::Detail`]); the rest come from `ListRuns`.
pub const FLEET_RUNS_FIRST_PAGE: usize = 1000;

/// `ListRuns` page size when the request gives 0.
pub const LIST_RUNS_DEFAULT_PAGE_SIZE: usize = 100;
/// Largest `ListRuns` page size.
pub const LIST_RUNS_MAX_PAGE_SIZE: usize = 1000;
/// `ListFleets` page size when the request says 0.
pub const LIST_FLEETS_DEFAULT_PAGE_SIZE: usize = 100;
/// Largest `ListFleets` page size.
pub const LIST_FLEETS_MAX_PAGE_SIZE: usize = 1000;

/// How much of a fleet a response carries. Neither view grows with the number of runs beyond
/// [`FLEET_RUNS_FIRST_PAGE`] summaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetView {
    /// Counts and state only (`ListFleets`).
    Summary,
    /// Also the execution spec (without repositories) and the first page of runs (`GetFleet`,
    /// `SubmitFleet`, `CancelFleet`).
    Detail,
}

/// Wire form of a fleet in `view`.
pub fn fleet_to_wire(fleet: &Fleet, view: FleetView) -> v1::Fleet {
    let (runs, runs_next_page_token, spec) = match view {
        FleetView::Summary => (Vec::new(), String::new(), None),
        FleetView::Detail => {
            let (runs, next) = list_runs(fleet, &RunFilter::default(), FLEET_RUNS_FIRST_PAGE);
            (runs, next, Some(execution_spec_to_wire(&fleet.spec)))
        }
    };
    v1::Fleet {
        runs,
        runs_next_page_token,
        id: fleet.id(),
        name: fleet.spec.name.clone(),
        state: fleet_state_to_wire(fleet.state) as i32,
        counts: Some(counts_to_wire(&fleet.counts)),
        created_at_ms: fleet.created_at_ms,
        finished_at_ms: fleet.finished_at_ms,
        spec,
        idempotency_key: fleet.idempotency_key.clone(),
        last_sequence: fleet.last_sequence(),
        flow: Some(flow::flow_status_to_wire(fleet)),
    }
}

/// Which runs `ListRuns` returns: after a run index, in some states, with a repository
/// substring.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunFilter {
    /// Only runs with a higher index (from the page token).
    pub after_index: Option<u32>,
    /// Only runs in these states; empty: any.
    pub states: Vec<RunState>,
    /// Only runs whose repository URL contains this; empty: any.
    pub repository_contains: String,
    /// Only runs whose last attempt ended with one of these outcomes; empty: any.
    pub outcomes: Vec<Outcome>,
}

/// Most `outcomes` in one `ListRuns` request.
pub const MAX_OUTCOME_FILTERS: usize = 16;

/// Longest `repository_contains`, in bytes.
pub const MAX_REPOSITORY_FILTER_BYTES: usize = 2048;

/// Converts and validates a `ListRuns` request for fleet number `fleet_number`: the page size
/// (0 means [`LIST_RUNS_DEFAULT_PAGE_SIZE`]) and the filter.
///
/// Errors: the field (`page_size`, `page_token`, `states[i]`, `repository_contains`,
/// `outcomes[i]`) and why.
pub fn run_filter_from_wire(
    request: &v1::ListRunsRequest,
    fleet_number: u64,
) -> Result<(RunFilter, usize), FieldError> {
    let page_size = page_size(
        request.page_size,
        LIST_RUNS_DEFAULT_PAGE_SIZE,
        LIST_RUNS_MAX_PAGE_SIZE,
    )?;
    let after_index = if request.page_token.is_empty() {
        None
    } else {
        match flotilla_scheduler::state::parse_run_id(&request.page_token) {
            Some((number, index)) if number == fleet_number => Some(index),
            _ => {
                return Err(FieldError::new(
                    "page_token",
                    "not a token from a previous response for this fleet",
                ));
            }
        }
    };
    let mut states = Vec::with_capacity(request.states.len());
    for (index, state) in request.states.iter().enumerate() {
        let state = match v1::RunState::try_from(*state) {
            Ok(v1::RunState::Pending) => RunState::Pending,
            Ok(v1::RunState::Running) => RunState::Running,
            Ok(v1::RunState::Changed) => RunState::Changed,
            Ok(v1::RunState::Unchanged) => RunState::Unchanged,
            Ok(v1::RunState::Failed) => RunState::Failed,
            Ok(v1::RunState::Cancelled) => RunState::Cancelled,
            _ => {
                return Err(FieldError::new(
                    format!("states[{index}]"),
                    format!("{state} is not a run state"),
                ));
            }
        };
        states.push(state);
    }
    if request.repository_contains.len() > MAX_REPOSITORY_FILTER_BYTES {
        return Err(FieldError::new(
            "repository_contains",
            format!("longer than {MAX_REPOSITORY_FILTER_BYTES} bytes"),
        ));
    }
    if request.outcomes.len() > MAX_OUTCOME_FILTERS {
        return Err(FieldError::new(
            "outcomes",
            format!("more than {MAX_OUTCOME_FILTERS} entries"),
        ));
    }
    let mut outcomes = Vec::with_capacity(request.outcomes.len());
    for (index, &number) in request.outcomes.iter().enumerate() {
        let outcome = outcome_from_wire(number).ok_or_else(|| {
            FieldError::new(
                format!("outcomes[{index}]"),
                if number == 0 {
                    "ATTEMPT_OUTCOME_UNSPECIFIED is not an outcome".to_owned()
                } else {
                    format!("unknown outcome {number}")
                },
            )
        })?;
        outcomes.push(outcome);
    }
    Ok((
        RunFilter {
            after_index,
            states,
            repository_contains: request.repository_contains.clone(),
            outcomes,
        },
        page_size,
    ))
}

/// `repositories` cut, in order, into parts whose staged size
/// ([`flotilla_scheduler::staging::staged_bytes`]) is at most `max_part_bytes` each (a URL
/// larger than that alone still makes one part). Empty input: no parts.
pub fn submission_parts(repositories: &[String], max_part_bytes: usize) -> Vec<Vec<String>> {
    let mut parts = Vec::new();
    let mut part: Vec<String> = Vec::new();
    let mut part_bytes = 0u64;
    for repository in repositories {
        let bytes = flotilla_scheduler::staging::staged_bytes(std::slice::from_ref(repository));
        if !part.is_empty() && part_bytes + bytes > max_part_bytes as u64 {
            parts.push(std::mem::take(&mut part));
            part_bytes = 0;
        }
        part.push(repository.clone());
        part_bytes += bytes;
    }
    if !part.is_empty() {
        parts.push(part);
    }
    parts
}

/// Up to `page_size` summaries of `fleet`'s runs that match `filter`, in run order, and the
/// next page's token (empty when no run after the page matches).
pub fn list_runs(
    fleet: &Fleet,
    filter: &RunFilter,
    page_size: usize,
) -> (Vec<v1::RunSummary>, String) {
    let start = filter.after_index.map_or(0, |index| index as usize + 1);
    // `skip` on the persistent vector's iterator walks; a split at `start` is O(log n).
    let rest = fleet.runs.skip(start.min(fleet.runs.len()));
    let mut matching = rest.iter().filter(|run| {
        (filter.states.is_empty() || filter.states.contains(&run.state))
            && run.repository.contains(filter.repository_contains.as_str())
            && (filter.outcomes.is_empty()
                || run
                    .last_result()
                    .is_some_and(|result| filter.outcomes.contains(&result.outcome)))
    });
    let runs: Vec<v1::RunSummary> = matching
        .by_ref()
        .take(page_size)
        .map(|run| run_summary_to_wire(fleet, run))
        .collect();
    let next = if runs.len() == page_size && matching.next().is_some() {
        runs.last().map(|run| run.id.clone()).unwrap_or_default()
    } else {
        String::new()
    };
    (runs, next)
}

fn run_summary_to_wire(fleet: &Fleet, run: &Run) -> v1::RunSummary {
    let result = run.last_result();
    let (insertions, deletions) = result.map_or((0, 0), |r| {
        r.diffstat.iter().fold((0u32, 0u32), |(i, d), f| {
            (
                i.saturating_add(f.insertions),
                d.saturating_add(f.deletions),
            )
        })
    });
    v1::RunSummary {
        id: flotilla_scheduler::state::run_id(fleet.number, run.index),
        repository: run.repository.clone(),
        state: run_state_to_wire(run.state) as i32,
        attempt: run.attempt(),
        branch: if run.state == RunState::Changed {
            run.branch.clone()
        } else {
            String::new()
        },
        files_changed: result.map_or(0, |r| r.diffstat.len() as u32),
        insertions,
        deletions,
        error: result.map_or_else(String::new, |r| r.error.clone()),
        outcome: outcome_to_wire(result.map(|r| r.outcome)),
    }
}

/// Wire form of a run with its attempt history.
pub fn run_to_wire(fleet: &Fleet, run: &Run) -> v1::Run {
    let result = run.last_result().filter(|_| run.state.is_terminal());
    v1::Run {
        id: flotilla_scheduler::state::run_id(fleet.number, run.index),
        fleet_id: fleet.id(),
        repository: run.repository.clone(),
        state: run_state_to_wire(run.state) as i32,
        attempts: run
            .attempts
            .iter()
            .map(|attempt| v1::Attempt {
                number: attempt.number,
                worker_id: attempt.worker_id.clone(),
                started_at_ms: attempt.started_at_ms,
                finished_at_ms: attempt.finished_at_ms,
                outcome: outcome_to_wire(attempt.result.as_ref().map(|r| r.outcome)),
                exit_code: attempt.result.as_ref().map_or(-1, |r| r.exit_code),
                error: attempt
                    .result
                    .as_ref()
                    .map_or_else(String::new, |r| r.error.clone()),
                log_tail: attempt
                    .result
                    .as_ref()
                    .map_or_else(String::new, |r| r.log_tail.clone()),
                credential_events: attempt
                    .result
                    .iter()
                    .flat_map(|r| &r.credential_events)
                    .map(credential_event_to_wire)
                    .collect(),
                sandbox_denials: attempt
                    .result
                    .iter()
                    .flat_map(|r| &r.sandbox_denials)
                    .map(sandbox_denial_to_wire)
                    .collect(),
                egress_connections: attempt
                    .result
                    .iter()
                    .flat_map(|r| &r.egress_connections)
                    .map(egress_connection_to_wire)
                    .collect(),
            })
            .collect(),
        branch: run.branch.clone(),
        commit: result.map_or_else(String::new, |r| r.commit.clone()),
        diffstat: result.map_or_else(Vec::new, |r| {
            r.diffstat
                .iter()
                .map(|f| v1::FileStat {
                    path: f.path.clone(),
                    insertions: f.insertions,
                    deletions: f.deletions,
                })
                .collect()
        }),
        patch: result.map_or_else(String::new, |r| r.patch.clone()),
        patch_truncated: result.is_some_and(|r| r.patch_truncated),
        pushed: result.is_some_and(|r| r.pushed),
        not_before_ms: run.not_before_ms,
        patch_size_bytes: result.map_or(0, |r| r.patch_size_bytes),
        patch_sha256: result.map_or_else(String::new, |r| r.patch_sha256.clone()),
    }
}

/// The artifacts that [`run_to_wire`] leaves empty and `GetRun` fills: each attempt's log tail
/// (`Some(attempt position)`) and the terminal result's patch (`None`), with their keys.
pub fn run_artifacts(fleet: &Fleet, run: &Run) -> Vec<(Option<usize>, crate::artifacts::Wanted)> {
    use flotilla_scheduler::{ArtifactKey, ArtifactKind};
    let key = |attempt, kind| ArtifactKey {
        fleet_number: fleet.number,
        run_index: run.index,
        attempt,
        kind,
    };
    let mut wanted = Vec::new();
    for (position, attempt) in run.attempts.iter().enumerate() {
        if let Some(result) = &attempt.result
            && result.log_tail_size_bytes > 0
        {
            wanted.push((
                Some(position),
                crate::artifacts::Wanted {
                    key: key(attempt.number, ArtifactKind::LogTail),
                    sha256: result.log_tail_sha256.clone(),
                },
            ));
        }
    }
    if run.state.is_terminal()
        && let Some(result) = run.last_result()
        && result.patch_size_bytes > 0
    {
        wanted.push((
            None,
            crate::artifacts::Wanted {
                key: key(run.attempt(), ArtifactKind::Patch),
                sha256: result.patch_sha256.clone(),
            },
        ));
    }
    wanted
}

/// Wire form of a fleet event.
pub fn event_to_wire(fleet: &Fleet, event: &FleetEvent) -> v1::FleetEvent {
    let run = event
        .run_index
        .and_then(|index| fleet.runs.get(index as usize));
    v1::FleetEvent {
        fleet_id: fleet.id(),
        sequence: event.sequence,
        time_ms: event.time_ms,
        run_id: event.run_index.map_or_else(String::new, |index| {
            flotilla_scheduler::state::run_id(fleet.number, index)
        }),
        repository: run.map_or_else(String::new, |r| r.repository.clone()),
        run_state: event
            .run_state
            .map_or(v1::RunState::Unspecified, run_state_to_wire) as i32,
        attempt: event.attempt,
        fleet_state: fleet_state_to_wire(event.fleet_state) as i32,
        counts: Some(counts_to_wire(&event.counts)),
        message: event.message.clone(),
        redelivered: event.redelivered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submissions_are_cut_into_bounded_parts_in_order() {
        use flotilla_scheduler::staging::staged_bytes;
        let repositories: Vec<String> = (0..1000)
            .map(|i| format!("https://example.com/org/repository-{i}.git"))
            .collect();
        let parts = submission_parts(&repositories, 4096);
        assert!(parts.len() > 1);
        for part in &parts {
            assert!(staged_bytes(part) <= 4096, "{}", staged_bytes(part));
            assert!(!part.is_empty());
        }
        assert_eq!(parts.concat(), repositories);
        assert_eq!(
            submission_parts(&repositories, usize::MAX),
            vec![repositories.clone()]
        );
        assert!(submission_parts(&[], 4096).is_empty());
        // A URL over the bound alone still travels, alone.
        let long = vec!["x".repeat(5000), "y".into()];
        assert_eq!(submission_parts(&long, 4096).len(), 2);
    }

    fn wire_spec() -> v1::FleetSpec {
        v1::FleetSpec {
            name: "fmt".into(),
            repositories: vec!["file:///srv/a.git".into()],
            agent: Some(v1::AgentSpec {
                command: "cargo fmt".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A state holding one fleet of `runs` repositories (URLs about 60 bytes long, as a real
    /// organisation's are), submitted as the node would (validated with `max_runs_per_fleet`
    /// raised to `runs`).
    fn state_with_fleet(runs: usize) -> flotilla_scheduler::State {
        use flotilla_scheduler::{Command, Request, Response, State};
        let limits = SpecLimits {
            max_runs_per_fleet: runs,
            ..SpecLimits::default()
        };
        let wire = v1::FleetSpec {
            repositories: (0..runs)
                .map(|index| {
                    format!("https://git.example.org/organisation/repository-{index:06}.git")
                })
                .collect(),
            max_parallelism: 64,
            ..wire_spec()
        };
        let spec = fleet_spec_from_wire(Some(wire), &limits).unwrap();
        let mut state = State::new();
        let response = state.apply(&Request {
            now_ms: 1_000,
            command: Command::SubmitFleet {
                spec,
                idempotency_key: String::new(),
                trace_parent: String::new(),
                max_events: 0,
            },
            principal: Default::default(),
        });
        assert!(
            matches!(response, Response::FleetSubmitted { .. }),
            "{response:?}"
        );
        state
    }

    #[test]
    fn a_lease_reply_does_not_grow_with_the_fleet() {
        use flotilla_scheduler::{Command, Request, Response};
        use prost::Message;
        let runs = 100_000;
        let mut state = state_with_fleet(runs);
        let Response::Leased(grants) = state.apply(&Request {
            now_ms: 2_000,
            command: Command::AcquireLeases {
                worker_id: "w1".into(),
                free_slots: 32,
                lease_ttl_ms: 30_000,
                held: Vec::new(),
            },
            principal: Default::default(),
        }) else {
            panic!("no leases");
        };
        assert_eq!(grants.len(), 32);
        assert!(
            grants
                .iter()
                .all(|grant| grant.spec.repositories.is_empty())
        );
        let reply = v1::LeaseRunsResponse {
            leases: grants
                .iter()
                .map(|grant| lease_to_wire(grant, 30_000))
                .collect(),
        };
        let size_bytes = reply.encoded_len();
        println!("a 32-lease reply of a {runs}-run fleet: {size_bytes} bytes");
        assert!(
            size_bytes < 64 * 1024,
            "a 32-lease reply of a {runs}-run fleet is {size_bytes} bytes"
        );
        assert_eq!(
            reply.leases[5].repository,
            "https://git.example.org/organisation/repository-000005.git"
        );
        assert_eq!(
            reply.leases[5]
                .spec
                .as_ref()
                .unwrap()
                .agent
                .as_ref()
                .unwrap()
                .command,
            "cargo fmt"
        );
    }

    #[test]
    fn fleet_responses_carry_a_bounded_first_page_and_list_runs_pages_the_rest() {
        use prost::Message;
        let state = state_with_fleet(2_500);
        let fleet = state.fleet("fl-1").unwrap();
        let detail = fleet_to_wire(fleet, FleetView::Detail);
        assert_eq!(detail.runs.len(), FLEET_RUNS_FIRST_PAGE);
        assert_eq!(detail.runs_next_page_token, "fl-1-999");
        assert!(detail.spec.as_ref().unwrap().repositories.is_empty());
        assert_eq!(detail.counts.unwrap().total, 2_500);
        let summary = fleet_to_wire(fleet, FleetView::Summary);
        assert!(summary.runs.is_empty() && summary.spec.is_none());
        assert!(summary.encoded_len() < 512, "{}", summary.encoded_len());

        // Every run exactly once, in order, over pages of 1000 from the first page's token.
        let mut seen = detail.runs.len();
        let mut token = detail.runs_next_page_token.clone();
        while !token.is_empty() {
            let request = v1::ListRunsRequest {
                fleet_id: "fl-1".into(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            };
            let (filter, page_size) = run_filter_from_wire(&request, 1).unwrap();
            let (runs, next) = list_runs(fleet, &filter, page_size);
            assert_eq!(runs[0].id, format!("fl-1-{seen}"));
            seen += runs.len();
            token = next;
        }
        assert_eq!(seen, 2_500);

        // Filters: a repository substring, and states.
        let request = v1::ListRunsRequest {
            fleet_id: "fl-1".into(),
            repository_contains: "repository-0012".into(),
            ..Default::default()
        };
        let (filter, page_size) = run_filter_from_wire(&request, 1).unwrap();
        assert_eq!(page_size, LIST_RUNS_DEFAULT_PAGE_SIZE);
        let (runs, next) = list_runs(fleet, &filter, page_size);
        assert_eq!(runs.len(), 100);
        assert_eq!(runs[99].id, "fl-1-1299");
        assert!(next.is_empty(), "exactly 100 match: no further page");
        let failed = v1::ListRunsRequest {
            fleet_id: "fl-1".into(),
            states: vec![v1::RunState::Failed as i32],
            ..Default::default()
        };
        let (filter, page_size) = run_filter_from_wire(&failed, 1).unwrap();
        assert_eq!(
            list_runs(fleet, &filter, page_size),
            (Vec::new(), String::new())
        );

        // Bad requests name the field.
        let error = |request: v1::ListRunsRequest| {
            run_filter_from_wire(&request, 1).unwrap_err().to_string()
        };
        let base = v1::ListRunsRequest {
            fleet_id: "fl-1".into(),
            ..Default::default()
        };
        assert_eq!(
            error(v1::ListRunsRequest {
                page_size: 1001,
                ..base.clone()
            }),
            "page_size: must be between 0 and 1000"
        );
        assert_eq!(
            error(v1::ListRunsRequest {
                page_token: "fl-2-5".into(),
                ..base.clone()
            }),
            "page_token: not a token from a previous response for this fleet"
        );
        assert_eq!(
            error(v1::ListRunsRequest {
                states: vec![0],
                ..base.clone()
            }),
            "states[0]: 0 is not a run state"
        );
        assert!(
            error(v1::ListRunsRequest {
                repository_contains: "x".repeat(MAX_REPOSITORY_FILTER_BYTES + 1),
                ..base.clone()
            })
            .starts_with("repository_contains:")
        );
        assert_eq!(
            error(v1::ListRunsRequest {
                outcomes: vec![v1::AttemptOutcome::Unchanged as i32, 42],
                ..base.clone()
            }),
            "outcomes[1]: unknown outcome 42"
        );
        assert_eq!(
            error(v1::ListRunsRequest {
                outcomes: vec![0],
                ..base.clone()
            }),
            "outcomes[0]: ATTEMPT_OUTCOME_UNSPECIFIED is not an outcome"
        );
        assert_eq!(
            error(v1::ListRunsRequest {
                outcomes: vec![v1::AttemptOutcome::Unchanged as i32; MAX_OUTCOME_FILTERS + 1],
                ..base
            }),
            format!("outcomes: more than {MAX_OUTCOME_FILTERS} entries")
        );
    }

    #[test]
    fn list_runs_filters_by_the_last_attempts_outcome() {
        use flotilla_scheduler::{AttemptResult, Command, Request, Response};
        let mut state = state_with_fleet(10);
        let apply = |state: &mut flotilla_scheduler::State, command| {
            state.apply(&Request {
                now_ms: 2_000,
                command,
                principal: Default::default(),
            })
        };
        let Response::Leased(grants) = apply(
            &mut state,
            Command::AcquireLeases {
                worker_id: "w1".into(),
                free_slots: 3,
                lease_ttl_ms: 10_000,
                held: Vec::new(),
            },
        ) else {
            panic!("no leases");
        };
        for (grant, outcome) in grants.iter().zip([
            Outcome::Unchanged,
            Outcome::VerifyFailed,
            Outcome::Unchanged,
        ]) {
            apply(
                &mut state,
                Command::ReportResult {
                    worker_id: "w1".into(),
                    run_id: grant.run_id.clone(),
                    attempt: grant.attempt,
                    result: AttemptResult::failure(outcome, "", false),
                },
            );
        }
        let fleet = state.fleet("fl-1").unwrap();
        let listed = |outcomes: &[&str]| {
            let request = v1::ListRunsRequest {
                fleet_id: "fl-1".into(),
                outcomes: outcomes
                    .iter()
                    .map(|name| outcome_to_wire(Outcome::parse(name)))
                    .collect(),
                ..Default::default()
            };
            let (filter, page_size) = run_filter_from_wire(&request, 1).unwrap();
            list_runs(fleet, &filter, page_size)
                .0
                .into_iter()
                .map(|run| {
                    let name = flotilla_proto::outcome::outcome_name(run.outcome);
                    (run.id, name.to_owned())
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(
            listed(&["verify_failed"]),
            vec![("fl-1-1".to_owned(), "verify_failed".to_owned())]
        );
        assert_eq!(listed(&["unchanged", "verify_failed"]).len(), 3);
        assert_eq!(listed(&["lease_expired"]), Vec::new());
        // No filter: every run, the pending ones without an outcome.
        let all = listed(&[]);
        assert_eq!(all.len(), 10);
        assert_eq!(all[9].1, "");
    }

    #[test]
    fn defaults_fill_zero_values() {
        let spec = fleet_spec_from_wire(Some(wire_spec()), &SpecLimits::default()).unwrap();
        assert_eq!(spec.sandbox.driver, "bwrap");
        assert_eq!(
            spec.sandbox.timeout_ms,
            scheduler_spec::DEFAULT_SANDBOX_TIMEOUT_MS
        );
        assert_eq!(
            spec.branch_template,
            scheduler_spec::DEFAULT_BRANCH_TEMPLATE
        );
        // Under another prefix, the default template follows it.
        let bots = SpecLimits {
            branch_prefix: "bots/".into(),
            ..SpecLimits::default()
        };
        let spec_under_bots = fleet_spec_from_wire(Some(wire_spec()), &bots).unwrap();
        assert_eq!(spec_under_bots.branch_template, "bots/{fleet}");
        assert_eq!(spec.max_parallelism, 16);
        assert_eq!(spec.retry, RetryPolicy::default());
        // The round trip keeps every field.
        let again =
            fleet_spec_from_wire(Some(fleet_spec_to_wire(&spec)), &SpecLimits::default()).unwrap();
        assert_eq!(again, spec);
    }

    /// The spec's branch check and git itself agree on every name here (the spec may be
    /// stricter than git, never laxer).
    #[test]
    fn branch_validation_agrees_with_git() {
        let names = [
            "flotilla/fmt",
            "a@b",
            "a/-b",
            "x/HEAD",
            "é",
            "a.b",
            "a/@",
            "HEAD",
            "-a",
            "a/.b",
            ".a",
            "a.lock/b",
            "a/b.lock",
            "a b",
            "a..b",
            "a/",
            "/a",
            "a//b",
            "a.",
            "a/.",
            "a@{x",
            "a\\b",
            "a~",
            "a^",
            "a:",
            "a?",
            "a*",
            "a[",
            "a\x7f",
            "a\tb",
            "a/..b",
            "-",
            "refs/heads/x",
            "flotilla/{fleet}",
        ];
        for name in names {
            let git_accepts = std::process::Command::new("git")
                .args(["check-ref-format", "--branch", name])
                .current_dir(std::env::temp_dir())
                .output()
                .expect("git runs")
                .status
                .success();
            assert_eq!(
                scheduler_spec::is_valid_branch(name),
                git_accepts,
                "{name:?}: git accepts it: {git_accepts}"
            );
        }
        // Stricter than git on purpose: "@" means the current branch to git.
        assert!(!scheduler_spec::is_valid_branch("@"));
    }

    #[test]
    fn missing_and_invalid_fields_are_named() {
        let limits = SpecLimits::default();
        let error = |spec: Option<v1::FleetSpec>| {
            fleet_spec_from_wire(spec, &limits).unwrap_err().to_string()
        };
        assert_eq!(error(None), "spec: is required");
        assert_eq!(
            error(Some(v1::FleetSpec {
                agent: None,
                ..wire_spec()
            })),
            "spec.agent: is required"
        );
        let mut bad = wire_spec();
        bad.sandbox = Some(v1::SandboxSpec {
            timeout_ms: 5,
            ..Default::default()
        });
        assert_eq!(
            error(Some(bad)),
            "spec.sandbox.timeout_ms: must be between 1000 and 86400000"
        );
    }

    #[test]
    fn results_are_checked_against_limits() {
        let limits = ResultLimits {
            max_log_tail_bytes: 4,
            max_patch_bytes: 4,
            max_diffstat_entries: 1,
            max_error_bytes: 8,
        };
        let check = |result: v1::RunResult| match attempt_result_from_wire(Some(result), &limits) {
            Ok(_) => "ok".to_string(),
            Err(error) => error.to_string(),
        };
        let ok = v1::RunResult {
            outcome: v1::AttemptOutcome::Unchanged as i32,
            ..Default::default()
        };
        assert_eq!(check(ok.clone()), "ok");
        assert_eq!(
            check(v1::RunResult {
                outcome: 42,
                ..ok.clone()
            }),
            "result.outcome: unknown outcome 42"
        );
        assert_eq!(
            check(v1::RunResult {
                outcome: 0,
                ..ok.clone()
            }),
            "result.outcome: is required"
        );
        assert_eq!(
            check(v1::RunResult {
                log_tail: "12345".into(),
                ..ok.clone()
            }),
            "result.log_tail: 5 bytes exceed max_log_tail_bytes 4"
        );
        assert_eq!(
            check(v1::RunResult {
                outcome: v1::AttemptOutcome::Changed as i32,
                ..ok.clone()
            }),
            "result.commit: is required when the outcome is changed"
        );
        assert_eq!(
            check(v1::RunResult {
                outcome: v1::AttemptOutcome::LeaseExpired as i32,
                ..ok
            }),
            "result.outcome: ATTEMPT_OUTCOME_LEASE_EXPIRED is decided by the cluster, not reported"
        );
    }

    #[test]
    fn sandbox_denials_are_checked_and_carried_over() {
        let limits = ResultLimits {
            max_log_tail_bytes: 4,
            max_patch_bytes: 4,
            max_diffstat_entries: 1,
            max_error_bytes: 8,
        };
        let denial = v1::SandboxDenial {
            mechanism: "seccomp".into(),
            action: "ptrace".into(),
            command: "agent".into(),
            count: 3,
        };
        let result = |denials: Vec<v1::SandboxDenial>| v1::RunResult {
            outcome: v1::AttemptOutcome::AgentFailed as i32,
            sandbox_denials: denials,
            ..Default::default()
        };
        let converted =
            attempt_result_from_wire(Some(result(vec![denial.clone()])), &limits).unwrap();
        assert_eq!(
            converted.sandbox_denials,
            vec![SandboxDenial {
                mechanism: "seccomp".into(),
                action: "ptrace".into(),
                command: "agent".into(),
                count: 3,
            }]
        );
        assert_eq!(
            sandbox_denial_to_wire(&converted.sandbox_denials[0]),
            denial
        );
        let error = |denials| {
            attempt_result_from_wire(Some(result(denials)), &limits)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            error(vec![denial.clone(); MAX_SANDBOX_DENIALS_PER_RESULT + 1]),
            format!("result.sandbox_denials: more than {MAX_SANDBOX_DENIALS_PER_RESULT} entries")
        );
        let forged = v1::SandboxDenial {
            mechanism: "agent".into(),
            ..denial.clone()
        };
        assert_eq!(
            error(vec![denial.clone(), forged]),
            "result.sandbox_denials[1].mechanism: must be seccomp or cgroup"
        );
        let long = v1::SandboxDenial {
            action: "a".repeat(MAX_SANDBOX_DENIAL_TEXT_BYTES + 1),
            ..denial.clone()
        };
        assert!(error(vec![long]).starts_with("result.sandbox_denials[0].action: must be 1 to"));
        let unnamed = v1::SandboxDenial {
            command: String::new(),
            ..denial
        };
        assert!(error(vec![unnamed]).starts_with("result.sandbox_denials[0].command:"));
    }

    #[test]
    fn egress_records_are_bounded_and_carried_over() {
        let limits = ResultLimits {
            max_log_tail_bytes: 4,
            max_patch_bytes: 4,
            max_diffstat_entries: 1,
            max_error_bytes: 8,
        };
        let record = v1::EgressConnection {
            host: "crates.io".into(),
            port: 443,
            address: "10.0.0.1".into(),
            bytes_up: 10,
            bytes_down: 20,
            allowed: true,
            reason: "closed".into(),
            duration_ms: 5,
        };
        let result = |connections: Vec<v1::EgressConnection>| v1::RunResult {
            outcome: v1::AttemptOutcome::Unchanged as i32,
            egress_connections: connections,
            egress_connections_dropped: 7,
            ..Default::default()
        };
        let converted =
            attempt_result_from_wire(Some(result(vec![record.clone()])), &limits).unwrap();
        assert_eq!(converted.egress_connections_dropped, 7);
        assert_eq!(
            converted.egress_connections,
            vec![EgressConnection {
                host: "crates.io".into(),
                port: 443,
                address: "10.0.0.1".into(),
                bytes_up: 10,
                bytes_down: 20,
                allowed: true,
                reason: "closed".into(),
                duration_ms: 5,
            }]
        );
        let error = |connections| {
            attempt_result_from_wire(Some(result(connections)), &limits)
                .unwrap_err()
                .field
        };
        assert_eq!(
            error(vec![record.clone(); MAX_EGRESS_CONNECTIONS_PER_RESULT + 1]),
            "result.egress_connections"
        );
        let bad_port = v1::EgressConnection {
            port: 70_000,
            ..record.clone()
        };
        assert_eq!(
            error(vec![record.clone(), bad_port]),
            "result.egress_connections[1].port"
        );
        let long_host = v1::EgressConnection {
            host: "a".repeat(254),
            ..record.clone()
        };
        assert_eq!(error(vec![long_host]), "result.egress_connections[0].host");
        let long_reason = v1::EgressConnection {
            reason: "r".repeat(MAX_EGRESS_REASON_BYTES + 1),
            ..record
        };
        assert_eq!(
            error(vec![long_reason]),
            "result.egress_connections[0].reason"
        );
    }
}
