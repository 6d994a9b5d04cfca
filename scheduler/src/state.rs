//! The replicated state: fleets, runs, attempts, leases, and the apply function.
//!
//! Invariants (checked by `State::check_invariants` in tests):
//! - a run is `Running` exactly when it has a lease, and its current attempt is the last entry of
//!   its attempt history, with no outcome yet;
//! - attempt numbers of a run are 1, 2, 3... without gaps; the current attempt number is the
//!   fencing token: a result for any other attempt is rejected and recorded, never applied;
//! - a terminal run (changed, unchanged, failed, cancelled) never changes again;
//! - a fleet's counts equal the tally of its runs' states; a fleet is finished exactly when it
//!   has no pending or running run;
//! - a fleet never holds more than `max_parallelism` leases;
//! - each fleet's events are numbered 1, 2, 3... without gaps.
//!
//! `apply` is deterministic: it reads no clock, no randomness and no environment. Time is the
//! leader's stamp in [`Request::now_ms`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::artifact::{ArtifactKey, ArtifactKind, Effect, sha256_hex};
use crate::audit::{AuditEntry, AuditLog, AuditOutcome};
use crate::command::{AttemptResult, Command, LeaseGrant, Outcome, Request, Response};
use crate::control::FlowAction;
use crate::flow::FleetFlow;
use crate::lease::LeaseIndex;
use crate::limit::{LimitTable, Occupancy};
use crate::schedule::record::Schedule;
use crate::secret::Secrets;
use crate::spec::{self, FleetSpec};
use crate::staging::Staging;
use crate::token::{self, AuthenticationError, Principal, Role, Token};

/// The version of the derived indexes a state keeps (see `State::index_version`): 1 the lease
/// index, 2 also the pending runs by `not_before_ms`.
const INDEX_VERSION: u32 = 2;

/// Most pending runs of one fleet one placement looks at ([`placement::eligible`]): runs
/// further on, behind runs that wait on limits or in backoff, wait for a later placement.
pub const MAX_CANDIDATES_SCANNED_PER_FLEET: usize = 1_024;

/// Most recent rejected (stale) results kept for inspection; older ones are only counted.
pub const MAX_REJECTED_RESULTS_KEPT: usize = 1_000;

/// Longest event message kept, in bytes; longer ones (an error text can be 64 KiB) are cut at
/// a character boundary and end with `...`. The attempt keeps the whole error.
pub const MAX_EVENT_MESSAGE_BYTES: usize = 1_024;

/// A fleet's events before `first_available` were dropped (its `max_events` bound), so a
/// watcher cannot resume from an earlier sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "events up to sequence {} were dropped (the fleet keeps at most {max_events}); resume after sequence {} or later",
    first_available - 1,
    first_available - 1
)]
pub struct EventsDropped {
    /// The oldest sequence number still kept.
    pub first_available: u64,
    /// The fleet's bound on kept events.
    pub max_events: u32,
}

/// State of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Waiting for a lease, maybe in retry backoff.
    Pending,
    /// Leased to a worker.
    Running,
    /// Terminal: changed and committed.
    Changed,
    /// Terminal: nothing to change.
    Unchanged,
    /// Terminal: failed past its retries, or failed finally.
    Failed,
    /// Terminal: cancelled.
    Cancelled,
}

impl RunState {
    /// Whether the run will never change again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, RunState::Pending | RunState::Running)
    }
}

/// State of one fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetState {
    /// Some run is pending or running.
    Running,
    /// Every run is terminal.
    Finished,
    /// Cancelled by a user; every run is terminal.
    Cancelled,
}

/// Run counts of a fleet by state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCounts {
    /// Pending runs.
    pub pending: u32,
    /// Running runs.
    pub running: u32,
    /// Changed runs.
    pub changed: u32,
    /// Unchanged runs.
    pub unchanged: u32,
    /// Failed runs.
    pub failed: u32,
    /// Cancelled runs.
    pub cancelled: u32,
}

impl RunCounts {
    fn slot(&mut self, state: RunState) -> &mut u32 {
        match state {
            RunState::Pending => &mut self.pending,
            RunState::Running => &mut self.running,
            RunState::Changed => &mut self.changed,
            RunState::Unchanged => &mut self.unchanged,
            RunState::Failed => &mut self.failed,
            RunState::Cancelled => &mut self.cancelled,
        }
    }

    /// Every run of the fleet.
    pub fn total(&self) -> u32 {
        self.pending + self.running + self.changed + self.unchanged + self.failed + self.cancelled
    }
}

/// A lease: the worker that runs the current attempt, and the deadline it was granted with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The worker holding it.
    pub worker_id: String,
    /// The deadline of the grant (or of its redelivery), in milliseconds since the Unix epoch
    /// (leader time). Heartbeats do not move it: they renew the lease in the leader's memory
    /// ([`crate::liveness`]), and only [`Command::ExpireSilentLeases`] ends it. (A log from an
    /// earlier version renews it with [`Command::Heartbeat`] and ends it at this time with
    /// [`Command::ExpireLeases`].)
    pub expires_at_ms: u64,
    /// The concurrency slots the lease holds, as `(limit name, key)` ([`crate::limit`]),
    /// given back when it ends.
    #[serde(default)]
    pub slots: Vec<(String, String)>,
}

/// One attempt of a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1, 2, 3...
    pub number: u32,
    /// Worker that was leased the attempt.
    pub worker_id: String,
    /// Lease time.
    pub started_at_ms: u64,
    /// When its result (or lease expiry, or cancellation) was applied; 0 while running.
    pub finished_at_ms: u64,
    /// Its result; `None` while running.
    pub result: Option<AttemptResult>,
}

/// One run: one repository of a fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Position within the fleet (0-based).
    pub index: u32,
    /// Repository URL.
    pub repository: String,
    /// Branch the change is committed on.
    pub branch: String,
    /// Current state.
    pub state: RunState,
    /// Not leased again before this time (retry backoff), in milliseconds.
    pub not_before_ms: u64,
    /// The current lease, while running.
    pub lease: Option<Lease>,
    /// Attempt history, oldest first.
    pub attempts: Vec<Attempt>,
}

impl Run {
    /// The current (latest) attempt number, 0 before the first lease.
    pub fn attempt(&self) -> u32 {
        self.attempts.last().map_or(0, |a| a.number)
    }

    /// The latest attempt's result, if any: the run's result once it is terminal.
    pub fn last_result(&self) -> Option<&AttemptResult> {
        self.attempts.last().and_then(|a| a.result.as_ref())
    }
}

/// One progress event of a fleet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetEvent {
    /// 1, 2, 3... within the fleet.
    pub sequence: u64,
    /// Leader time of the command that caused it.
    pub time_ms: u64,
    /// The run concerned, if any.
    pub run_index: Option<u32>,
    /// The run's new state, if a run is concerned.
    pub run_state: Option<RunState>,
    /// The run's attempt number at the time.
    pub attempt: u32,
    /// The fleet's state after the event.
    pub fleet_state: FleetState,
    /// The fleet's counts after the event.
    pub counts: RunCounts,
    /// Human-readable detail.
    pub message: String,
    /// A lease of the same attempt sent again to a worker that had not received it.
    #[serde(default)]
    pub redelivered: bool,
}

/// A fleet and its runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fleet {
    /// Submission order, from 1.
    pub number: u64,
    /// The spec as submitted; shared, since it never changes after submission (a copy of the
    /// state for a snapshot copies a pointer, not 100k repository names).
    pub spec: Arc<FleetSpec>,
    /// Idempotency key of the submission; empty if none.
    pub idempotency_key: String,
    /// W3C `traceparent` of the submission's span, or empty.
    #[serde(default)]
    pub trace_parent: String,
    /// Current state.
    pub state: FleetState,
    /// Leader time of submission.
    pub created_at_ms: u64,
    /// Leader time at which the last run became terminal; 0 while running.
    pub finished_at_ms: u64,
    /// Runs, in the order of `spec.repositories`. A persistent vector (an RRB tree of
    /// 64-run chunks, `imbl`): copying the state for a snapshot is O(1), and the first change
    /// to a run after a copy copies only that run's chunk path, so the copy does not hold
    /// apply for a time that grows with the fleet. Serialized as a plain sequence.
    pub runs: imbl::Vector<Run>,
    /// Tally of run states.
    pub counts: RunCounts,
    /// Progress events, oldest first: the newest `max_events` of them (all when 0). A
    /// persistent vector, like `runs`: up to `limits.max_events_per_fleet` (100,000) events
    /// are not copied with the state.
    pub events: imbl::Vector<FleetEvent>,
    /// Most events kept; 0: no bound.
    #[serde(default)]
    pub max_events: u32,
    /// Sequence number of the newest event (0 if none); events are numbered from 1 without
    /// gaps, and dropping old ones keeps the numbering.
    #[serde(default)]
    last_sequence: u64,
    /// Indices of pending runs, in order.
    pub(crate) pending: BTreeSet<u32>,
    /// The running runs by lease expiry and by worker ([`LeaseIndex`]).
    #[serde(default)]
    leases: LeaseIndex,
    /// The pending runs as `(not_before_ms, run index)`: derived from `pending` and each run's
    /// `not_before_ms`, so "may any pending run be leased now" is one lookup.
    #[serde(default)]
    pending_by_time: BTreeSet<(u64, u32)>,
    /// Who submitted it ([`Principal::Unknown`] for fleets submitted before principals).
    #[serde(default)]
    pub submitted_by: Principal,
    /// Waves, gate, pause, deadline and failure budget as they stand ([`crate::flow`]).
    #[serde(default)]
    pub flow: FleetFlow,
}

impl Fleet {
    /// Rebuilds the derived indexes ([`Fleet::leases`], [`Fleet::pending_by_time`]) from the
    /// runs.
    fn rebuild_indexes(&mut self) {
        self.leases = LeaseIndex::rebuild(&self.runs);
        self.pending_by_time = self
            .pending
            .iter()
            .map(|index| (self.runs[*index as usize].not_before_ms, *index))
            .collect();
    }

    /// Sets run `index`'s lease, keeping [`Fleet::leases`] in step (every change of a run's
    /// lease goes through here or [`Fleet::extend_lease`]).
    fn set_lease(&mut self, index: u32, lease: Option<Lease>) {
        let run = &mut self.runs[index as usize];
        if let Some(old) = run.lease.take() {
            self.leases.remove(index, &old);
        }
        if let Some(new) = &lease {
            self.leases.insert(index, new);
        }
        self.runs[index as usize].lease = lease;
    }

    /// Extends run `index`'s lease, if it has one, to at least `expires_at_ms`.
    fn extend_lease(&mut self, index: u32, expires_at_ms: u64) {
        if let Some(mut lease) = self.runs[index as usize].lease.clone() {
            lease.expires_at_ms = lease.expires_at_ms.max(expires_at_ms);
            self.set_lease(index, Some(lease));
        }
    }

    /// The indices of its running runs (from its lease index).
    pub(crate) fn lease_indices(&self) -> Vec<u32> {
        self.leases.indices().collect()
    }

    /// The fleet's id: `fl-<number>`.
    pub fn id(&self) -> String {
        fleet_id(self.number)
    }

    /// Events with a sequence number greater than `after_sequence`, oldest first, at most
    /// `limit`.
    ///
    /// # Errors
    /// [`EventsDropped`] when events after `after_sequence` were already dropped.
    pub fn events_after(
        &self,
        after_sequence: u64,
        limit: usize,
    ) -> Result<impl Iterator<Item = &FleetEvent>, EventsDropped> {
        let first_available = self
            .events
            .front()
            .map_or(self.last_sequence + 1, |e| e.sequence);
        let next = after_sequence.saturating_add(1);
        if next < first_available {
            return Err(EventsDropped {
                first_available,
                max_events: self.max_events,
            });
        }
        let start = usize::try_from(next - first_available).unwrap_or(usize::MAX);
        // A narrowed focus starts at `start` in O(log n); `skip` on the iterator would walk.
        let start = start.min(self.events.len());
        Ok(self.events.focus().narrow(start..).into_iter().take(limit))
    }

    /// Whether the fleet ended at least `retention_ms` before `now_ms`.
    pub fn is_compactable(&self, now_ms: u64, retention_ms: u64) -> bool {
        self.state != FleetState::Running
            && self.finished_at_ms.saturating_add(retention_ms) <= now_ms
    }

    /// Sequence number of the newest event (0 if none).
    pub fn last_sequence(&self) -> u64 {
        self.last_sequence
    }
}

/// A result that was not applied because its fencing token was stale.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedResult {
    /// Leader time of the rejection.
    pub time_ms: u64,
    /// The reporting worker.
    pub worker_id: String,
    /// The run.
    pub run_id: String,
    /// The stale attempt number it carried.
    pub attempt: u32,
    /// Why it was rejected.
    pub reason: String,
}

/// The whole replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    next_fleet_number: u64,
    pub(crate) fleets: BTreeMap<u64, Fleet>,
    /// Fleets that are still running, for placement.
    pub(crate) active_fleets: BTreeSet<u64>,
    idempotency_keys: BTreeMap<String, u64>,
    /// The fleet that received the last lease placed, where the next placement's round-robin
    /// resumes (see [`placement::place`]).
    #[serde(default)]
    pub(crate) placement_cursor: u64,
    rejected_results: VecDeque<RejectedResult>,
    rejected_results_total: u64,
    /// Largest leader timestamp applied so far; stamps never move the clock backwards.
    now_ms: u64,
    /// API tokens by accessor id (hashes only, never secrets).
    #[serde(default)]
    tokens: BTreeMap<String, Token>,
    /// Whether a [`Command::BootstrapToken`] was accepted (it is accepted once per cluster).
    #[serde(default)]
    tokens_bootstrapped: bool,
    /// One record per applied command, hash-chained.
    #[serde(default)]
    audit: AuditLog,
    /// Per-project secrets, as envelopes ([`crate::secret`]).
    #[serde(default)]
    secrets: Secrets,
    /// [`INDEX_VERSION`] once every fleet's derived indexes ([`LeaseIndex`], pending runs by
    /// time) are built; lower in a state written before they existed, whose first apply builds
    /// them.
    #[serde(default)]
    index_version: u32,
    /// Repositories of large submissions staged in parts ([`crate::staging`]).
    #[serde(default)]
    staging: Staging,
    /// Schedules by id (`<project>/<name>`), at most the leader's `limits.max_schedules` when
    /// each was created ([`crate::schedule`]).
    #[serde(default)]
    pub(crate) schedules: BTreeMap<String, Schedule>,
    /// Event rules by id (`<project>/<name>`), at most the leader's `limits.max_event_rules`
    /// when each was created ([`crate::event`]).
    #[serde(default)]
    pub(crate) event_rules: BTreeMap<String, crate::event::EventRule>,
    /// Accepted deliveries, bounded by the leader's retention settings.
    #[serde(default)]
    pub(crate) deliveries: crate::event::Deliveries,
    /// Rate and concurrency limits, their buckets, and what running runs hold
    /// ([`crate::limit`]).
    #[serde(default)]
    pub(crate) limits: LimitTable,
}

/// `fl-<number>`.
pub fn fleet_id(number: u64) -> String {
    format!("fl-{number}")
}

/// `fl-<number>-<index>`.
pub fn run_id(fleet_number: u64, index: u32) -> String {
    format!("fl-{fleet_number}-{index}")
}

/// Parses `fl-<number>`.
pub fn parse_fleet_id(id: &str) -> Option<u64> {
    let number = id.strip_prefix("fl-")?;
    if number.starts_with('+') {
        return None;
    }
    number.parse().ok()
}

/// Parses `fl-<number>-<index>`.
pub fn parse_run_id(id: &str) -> Option<(u64, u32)> {
    let rest = id.strip_prefix("fl-")?;
    let (number, index) = rest.split_once('-')?;
    if number.starts_with('+') || index.starts_with('+') {
        return None;
    }
    Some((number.parse().ok()?, index.parse().ok()?))
}

impl State {
    /// An empty state.
    pub fn new() -> Self {
        State {
            next_fleet_number: 1,
            index_version: INDEX_VERSION,
            ..State::default()
        }
    }

    /// Applies one log entry, dropping its [`Effect`]s (for callers without an artifact
    /// store, such as tests of the state alone). See [`State::apply_with_effects`].
    pub fn apply(&mut self, request: &Request) -> Response {
        let mut effects = Vec::new();
        self.apply_with_effects(0, request, &mut effects)
    }

    /// Applies one log entry and appends to `effects` what the replica's storage must do
    /// alongside (store or delete artifacts). Deterministic: the response, the new state and
    /// the effects depend only on `self`, `log_index` and `request`.
    ///
    /// Every command applied, accepted or rejected, appends one audit record (see
    /// [`crate::audit`]) naming `request.principal`, stamped with `log_index` (the Raft index
    /// of the entry; 0 where there is none).
    pub fn apply_with_effects(
        &mut self,
        log_index: u64,
        request: &Request,
        effects: &mut Vec<Effect>,
    ) -> Response {
        // Leader clocks may step back across a leader change; the state's clock does not.
        self.now_ms = self.now_ms.max(request.now_ms);
        if self.index_version != INDEX_VERSION {
            for fleet in self.fleets.values_mut() {
                fleet.rebuild_indexes();
            }
            self.index_version = INDEX_VERSION;
        }
        let response = self.apply_command(request, effects);
        let entry = audit_entry(&request.command, &response);
        self.audit
            .append(log_index, self.now_ms, request.principal.clone(), entry);
        response
    }

    fn apply_command(&mut self, request: &Request, effects: &mut Vec<Effect>) -> Response {
        let now_ms = self.now_ms;
        if self.next_fleet_number == 0 {
            self.next_fleet_number = 1;
        }
        match &request.command {
            Command::SubmitFleet {
                spec,
                idempotency_key,
                trace_parent,
                max_events,
            } => self.submit_fleet(
                now_ms,
                spec,
                idempotency_key,
                trace_parent,
                *max_events,
                &request.principal,
            ),
            Command::StageRepositories {
                upload_id,
                repositories,
            } => {
                self.staging.drop_expired(now_ms);
                match self
                    .staging
                    .stage(now_ms, upload_id, repositories, &request.principal)
                {
                    Ok(count) => Response::RepositoriesStaged {
                        repositories: u32::try_from(count).unwrap_or(u32::MAX),
                    },
                    Err(reason) => Response::Rejected { reason },
                }
            }
            Command::SubmitStagedFleet {
                upload_id,
                spec,
                idempotency_key,
                trace_parent,
                max_events,
            } => {
                self.staging.drop_expired(now_ms);
                match self.staging.take(upload_id, &request.principal) {
                    Ok(repositories) => {
                        let spec = FleetSpec {
                            repositories,
                            ..spec.clone()
                        };
                        self.submit_fleet(
                            now_ms,
                            &spec,
                            idempotency_key,
                            trace_parent,
                            *max_events,
                            &request.principal,
                        )
                    }
                    Err(reason) => Response::Rejected { reason },
                }
            }
            Command::CreateSchedule {
                spec,
                max_schedules,
            } => self.create_schedule(now_ms, spec, *max_schedules),
            Command::DeleteSchedule { schedule_id } => self.delete_schedule(schedule_id),
            Command::PauseSchedule { schedule_id, note } => {
                self.pause_schedule(now_ms, schedule_id, note, &request.principal)
            }
            Command::ResumeSchedule { schedule_id, note } => {
                self.resume_schedule(now_ms, schedule_id, note)
            }
            Command::ProcessSchedule {
                schedule_id,
                max_events,
            } => self.process_schedule(now_ms, schedule_id, *max_events, &request.principal),
            Command::CreateEventRule { spec, max_rules } => {
                self.create_event_rule(now_ms, spec, *max_rules, &request.principal)
            }
            Command::DeleteEventRule { rule_id } => self.delete_event_rule(rule_id),
            Command::DeliverEvent {
                header,
                matches,
                rules_evaluated,
                retention_ms,
                max_deliveries,
                max_events,
            } => self.deliver_event(
                now_ms,
                header,
                matches,
                *rules_evaluated,
                (*retention_ms, *max_deliveries),
                *max_events,
                &request.principal,
            ),
            Command::TriggerSchedule {
                schedule_id,
                trigger_id,
                overlap,
                max_events,
            } => self.trigger_schedule(
                now_ms,
                schedule_id,
                trigger_id,
                *overlap,
                *max_events,
                &request.principal,
            ),
            Command::BackfillSchedule {
                schedule_id,
                from_ms,
                to_ms,
                overlap,
                max_events,
            } => self.backfill_schedule(
                now_ms,
                schedule_id,
                (*from_ms, *to_ms),
                *overlap,
                *max_events,
                &request.principal,
            ),
            Command::AcquireLeases {
                worker_id,
                free_slots,
                lease_ttl_ms,
                held,
            } => self.acquire_leases(now_ms, worker_id, *free_slots, *lease_ttl_ms, held),
            Command::Heartbeat {
                worker_id,
                leases,
                lease_ttl_ms,
            } => self.heartbeat(now_ms, worker_id, leases, *lease_ttl_ms),
            Command::ReportResult {
                worker_id,
                run_id,
                attempt,
                result,
            } => self.report_result(now_ms, worker_id, run_id, *attempt, result, effects),
            Command::CancelFleet { fleet_id } => self.cancel_fleet(now_ms, fleet_id),
            Command::PauseFleet { fleet_id, note } => self.change_flow(
                now_ms,
                fleet_id,
                FlowAction::Pause,
                note,
                &request.principal,
            ),
            Command::ResumeFleet { fleet_id, note } => self.change_flow(
                now_ms,
                fleet_id,
                FlowAction::Resume,
                note,
                &request.principal,
            ),
            Command::ApproveFleet { fleet_id, note } => self.change_flow(
                now_ms,
                fleet_id,
                FlowAction::Approve,
                note,
                &request.principal,
            ),
            Command::AdvanceFleets => self.advance_fleets(now_ms),
            Command::CreateLimit { spec, max_limits } => {
                self.create_limit(now_ms, spec, *max_limits, &request.principal)
            }
            Command::DeleteLimit { name } => self.delete_limit(name),
            Command::RerunFleet {
                origin_fleet_id,
                run_indexes,
                spec,
                idempotency_key,
                trace_parent,
                max_events,
            } => self.rerun_fleet(
                now_ms,
                origin_fleet_id,
                run_indexes,
                spec,
                (idempotency_key, trace_parent, *max_events),
                &request.principal,
            ),
            Command::ExpireLeases => self.expire_leases(now_ms),
            Command::ExpireSilentLeases { leases } => self.expire_silent_leases(now_ms, leases),
            Command::CompactFleets {
                retention_ms,
                max_fleets,
            } => self.compact_fleets(now_ms, *retention_ms, *max_fleets, effects),
            Command::CreateToken {
                accessor_id,
                secret_sha256,
                name,
                project,
                role,
                worker_id,
                expires_ms,
            } => self.create_token(
                Token {
                    accessor_id: accessor_id.clone(),
                    secret_sha256: secret_sha256.clone(),
                    name: name.clone(),
                    project: project.clone(),
                    role: *role,
                    worker_id: worker_id.clone(),
                    created_ms: now_ms,
                    expires_ms: *expires_ms,
                    revoked: false,
                    created_by: request.principal.clone(),
                },
                now_ms,
            ),
            Command::BootstrapToken {
                accessor_id,
                secret_sha256,
            } => {
                if self.tokens_bootstrapped {
                    return Response::Rejected {
                        reason: "the cluster was already bootstrapped".into(),
                    };
                }
                let response = self.create_token(
                    Token {
                        accessor_id: accessor_id.clone(),
                        secret_sha256: secret_sha256.clone(),
                        name: "bootstrap".into(),
                        project: None,
                        role: Role::Admin,
                        worker_id: None,
                        created_ms: now_ms,
                        expires_ms: None,
                        revoked: false,
                        created_by: request.principal.clone(),
                    },
                    now_ms,
                );
                if matches!(response, Response::TokenCreated { .. }) {
                    self.tokens_bootstrapped = true;
                }
                response
            }
            Command::RevokeToken { accessor_id } => match self.tokens.get_mut(accessor_id) {
                Some(token) => {
                    token.revoked = true;
                    Response::TokenRevoked
                }
                None => Response::Rejected {
                    reason: format!("no token {accessor_id}"),
                },
            },
            Command::SetSecret {
                project,
                name,
                version,
                value_size_bytes,
                envelope,
                max_secrets_per_project,
                max_secrets_total,
            } => self.secrets.set(
                now_ms,
                project,
                name,
                *version,
                *value_size_bytes,
                envelope,
                *max_secrets_per_project,
                *max_secrets_total,
            ),
            Command::DeleteSecret { project, name } => self.secrets.delete(project, name),
            Command::RewrapSecret {
                project,
                name,
                version,
                key_id,
                wrapped_data_key,
            } => self
                .secrets
                .rewrap(project, name, *version, key_id, wrapped_data_key),
        }
    }

    fn create_token(&mut self, token: Token, now_ms: u64) -> Response {
        if !token::is_valid_accessor_id(&token.accessor_id)
            || !token::is_valid_sha256_hex(&token.secret_sha256)
            || !spec::is_valid_name(&token.name)
        {
            return Response::Rejected {
                reason: "malformed accessor id, secret hash or name".into(),
            };
        }
        if token.role.is_project_scoped() != token.project.is_some()
            || token
                .project
                .as_deref()
                .is_some_and(|p| !spec::is_valid_name(p))
        {
            return Response::Rejected {
                reason: format!(
                    "a {} token {} a project",
                    token.role.as_str(),
                    if token.role.is_project_scoped() {
                        "needs"
                    } else {
                        "has no"
                    }
                ),
            };
        }
        if (token.role == Role::Worker) != token.worker_id.is_some()
            || token
                .worker_id
                .as_deref()
                .is_some_and(|w| !spec::is_valid_name(w))
        {
            return Response::Rejected {
                reason: "a worker token, and only a worker token, names a valid worker id".into(),
            };
        }
        if self.tokens.contains_key(&token.accessor_id) {
            return Response::Rejected {
                reason: format!("token {} exists", token.accessor_id),
            };
        }
        if self.tokens.len() >= token::MAX_TOKENS {
            let forgettable = self
                .tokens
                .values()
                .filter(|t| !t.is_live(now_ms))
                .min_by_key(|t| (t.created_ms, t.accessor_id.clone()))
                .map(|t| t.accessor_id.clone());
            match forgettable {
                Some(accessor_id) => {
                    self.tokens.remove(&accessor_id);
                }
                None => {
                    return Response::Rejected {
                        reason: format!(
                            "{} live tokens exist (token::MAX_TOKENS); revoke some first",
                            token::MAX_TOKENS
                        ),
                    };
                }
            }
        }
        let accessor_id = token.accessor_id.clone();
        self.tokens.insert(accessor_id.clone(), token);
        Response::TokenCreated { accessor_id }
    }

    /// Checks a bearer token (`flotilla_<accessor_id>_<secret>`) at `now_ms`; returns the
    /// token it names.
    ///
    /// # Errors
    /// Malformed, unknown or wrong secret (not told apart), revoked, expired.
    pub fn authenticate(&self, bearer: &str, now_ms: u64) -> Result<&Token, AuthenticationError> {
        let parsed = token::parse_token(bearer)?;
        let unknown = || AuthenticationError::Unknown(parsed.accessor_id.to_string());
        let token = self.tokens.get(parsed.accessor_id).ok_or_else(unknown)?;
        if !token::secret_matches(parsed.secret, &token.secret_sha256) {
            return Err(unknown());
        }
        if token.revoked {
            return Err(AuthenticationError::Revoked(token.accessor_id.clone()));
        }
        if !token.is_live(now_ms) {
            return Err(AuthenticationError::Expired(token.accessor_id.clone()));
        }
        Ok(token)
    }

    /// Every token (hashes only), by accessor id.
    pub fn tokens(&self) -> impl Iterator<Item = &Token> {
        self.tokens.values()
    }

    /// Whether a [`Command::BootstrapToken`] was accepted.
    pub fn tokens_bootstrapped(&self) -> bool {
        self.tokens_bootstrapped
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Every project's secrets (envelopes only).
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    pub(crate) fn submit_fleet(
        &mut self,
        now_ms: u64,
        fleet_spec: &FleetSpec,
        idempotency_key: &str,
        trace_parent: &str,
        max_events: u32,
        principal: &Principal,
    ) -> Response {
        if !idempotency_key.is_empty()
            && let Some(number) = self.idempotency_keys.get(idempotency_key)
        {
            let same_spec = self
                .fleets
                .get(number)
                .is_some_and(|fleet| *fleet.spec == *fleet_spec);
            return if same_spec {
                Response::FleetSubmitted {
                    fleet_id: fleet_id(*number),
                    created: false,
                }
            } else {
                Response::IdempotencyKeyConflict {
                    fleet_id: fleet_id(*number),
                }
            };
        }
        // Secrets are named, never copied: each must exist in the fleet's project now (a secret
        // deleted later fails the runs that need it, at lease time).
        let project = spec::fleet_project(fleet_spec);
        for (variable, secret) in &fleet_spec.agent.secrets {
            if self.secrets.get(project, secret).is_none() {
                return Response::Rejected {
                    reason: format!(
                        "spec.agent.secrets.{variable}: no secret {secret:?} in project {project:?}"
                    ),
                };
            }
        }
        if let Err(full) = self.check_queues(
            project,
            &fleet_id(self.next_fleet_number),
            &fleet_spec.repositories,
        ) {
            return full;
        }
        let number = self.next_fleet_number;
        self.next_fleet_number += 1;
        let id = fleet_id(number);
        let runs: imbl::Vector<Run> = fleet_spec
            .repositories
            .iter()
            .enumerate()
            .map(|(index, repository)| Run {
                index: index as u32,
                repository: repository.clone(),
                branch: spec::render_branch(
                    &fleet_spec.branch_template,
                    &fleet_spec.name,
                    &id,
                    &spec::repository_name(repository),
                ),
                state: RunState::Pending,
                not_before_ms: 0,
                lease: None,
                attempts: Vec::new(),
            })
            .collect();
        let counts = RunCounts {
            pending: runs.len() as u32,
            ..RunCounts::default()
        };
        let mut fleet = Fleet {
            number,
            spec: Arc::new(fleet_spec.clone()),
            idempotency_key: idempotency_key.to_string(),
            trace_parent: trace_parent.to_string(),
            state: FleetState::Running,
            created_at_ms: now_ms,
            finished_at_ms: 0,
            pending: (0..runs.len() as u32).collect(),
            leases: LeaseIndex::default(),
            pending_by_time: (0..runs.len() as u32).map(|index| (0, index)).collect(),
            runs,
            counts,
            events: imbl::Vector::new(),
            max_events,
            last_sequence: 0,
            submitted_by: principal.clone(),
            flow: FleetFlow::default(),
        };
        push_event(
            &mut fleet,
            now_ms,
            None,
            format!("fleet submitted with {} runs", counts.pending),
        );
        crate::control::start_flow(&mut fleet, now_ms);
        if fleet.runs.is_empty() {
            finish_if_done(&mut fleet, now_ms);
        } else {
            self.active_fleets.insert(number);
        }
        self.fleets.insert(number, fleet);
        if !idempotency_key.is_empty() {
            self.idempotency_keys
                .insert(idempotency_key.to_string(), number);
        }
        Response::FleetSubmitted {
            fleet_id: id,
            created: true,
        }
    }

    /// `(fleet number, run index)` of every run leased to `worker_id` whose
    /// `(run_id, attempt)` is not in `held`, in fleet and run order. Scans the runs of active
    /// fleets that have running runs.
    fn unlisted_leases(&self, worker_id: &str, held: &[(String, u32)]) -> Vec<(u64, u32)> {
        let listed: BTreeSet<(&str, u32)> = held
            .iter()
            .map(|(run_id, attempt)| (run_id.as_str(), *attempt))
            .collect();
        let mut unlisted = Vec::new();
        for number in &self.active_fleets {
            let Some(fleet) = self.fleets.get(number) else {
                continue;
            };
            if fleet.counts.running == 0 {
                continue;
            }
            for index in self.lease_index(fleet).of_worker(worker_id) {
                let attempt = fleet.runs[index as usize].attempt();
                if !listed.contains(&(run_id(fleet.number, index).as_str(), attempt)) {
                    unlisted.push((fleet.number, index));
                }
            }
        }
        unlisted
    }

    /// Whether the state holds a lease of `worker_id` that is not in `held` (the `(run_id,
    /// attempt)` pairs the worker says it runs): its grant was lost on the way, and a lease
    /// request should be proposed at once to deliver it again ([`Command::AcquireLeases`]).
    pub fn has_unlisted_leases(&self, worker_id: &str, held: &[(String, u32)]) -> bool {
        !self.unlisted_leases(worker_id, held).is_empty()
    }

    /// The `(run_id, attempt)` of every lease `worker_id` holds, in fleet and run order.
    pub fn leases_of(&self, worker_id: &str) -> Vec<(String, u32)> {
        self.unlisted_leases(worker_id, &[])
            .into_iter()
            .filter_map(|(number, index)| {
                let run = self.fleets.get(&number)?.runs.get(index as usize)?;
                Some((run_id(number, index), run.attempt()))
            })
            .collect()
    }

    fn acquire_leases(
        &mut self,
        now_ms: u64,
        worker_id: &str,
        free_slots: u32,
        lease_ttl_ms: u64,
        held: &[(String, u32)],
    ) -> Response {
        let expires_at_ms = now_ms.saturating_add(lease_ttl_ms);
        // Reconciliation: leases granted to this worker whose replies it never received.
        let mut grants = Vec::new();
        for (number, index) in self.unlisted_leases(worker_id, held) {
            let Some(fleet) = self.fleets.get_mut(&number) else {
                continue;
            };
            let attempt = fleet.runs[index as usize].attempt();
            if (grants.len() as u32) < free_slots {
                fleet.extend_lease(index, expires_at_ms);
                let expires = fleet.runs[index as usize]
                    .lease
                    .as_ref()
                    .map_or(expires_at_ms, |l| l.expires_at_ms);
                grants.push(lease_grant(fleet, index, expires, true));
                push_event(
                    fleet,
                    now_ms,
                    Some(index),
                    format!(
                        "attempt {attempt} lease sent again to {worker_id}, which had not received it"
                    ),
                );
                if let Some(event) = fleet.events.back_mut() {
                    event.redelivered = true;
                }
            } else {
                let result = AttemptResult::failure(
                    Outcome::LeaseExpired,
                    format!(
                        "lease released: {worker_id} never received it and had no free slot for it"
                    ),
                    true,
                );
                finish_attempt(fleet, &mut self.limits.occupancy, index, now_ms, result);
                if fleet.state != FleetState::Running {
                    self.active_fleets.remove(&number);
                }
            }
        }
        let free_slots = free_slots.saturating_sub(grants.len() as u32);
        if free_slots == 0 {
            return Response::Leased(grants);
        }
        let plan = self.plan_placement(now_ms, free_slots);
        let placements = self.carry_out_plan(now_ms, plan);
        grants.reserve(placements.len());
        for (placed, slots) in placements {
            let Some(fleet) = self.fleets.get_mut(&placed.fleet_number) else {
                continue;
            };
            let index = placed.run_index;
            let run = &mut fleet.runs[index as usize];
            debug_assert_eq!(run.state, RunState::Pending);
            let attempt = run.attempt() + 1;
            run.attempts.push(Attempt {
                number: attempt,
                worker_id: worker_id.to_string(),
                started_at_ms: now_ms,
                finished_at_ms: 0,
                result: None,
            });
            self.limits.occupancy.take(
                &slots,
                &flotilla_domain::repository::repository_parts(&run.repository).repository,
                placed.fleet_number,
                fleet.spec.flow.shared_repositories,
            );
            fleet.set_lease(
                index,
                Some(Lease {
                    worker_id: worker_id.to_string(),
                    expires_at_ms,
                    slots,
                }),
            );
            grants.push(lease_grant(fleet, index, expires_at_ms, false));
            set_run_state(fleet, index, RunState::Running);
            push_event(
                fleet,
                now_ms,
                Some(index),
                format!("attempt {attempt} leased to {worker_id}"),
            );
        }
        Response::Leased(grants)
    }

    fn heartbeat(
        &mut self,
        now_ms: u64,
        worker_id: &str,
        leases: &[(String, u32)],
        lease_ttl_ms: u64,
    ) -> Response {
        let expires_at_ms = now_ms.saturating_add(lease_ttl_ms);
        let mut lost = Vec::new();
        for (id, attempt) in leases {
            let held = parse_run_id(id).and_then(|(number, index)| {
                let fleet = self.fleets.get_mut(&number)?;
                let run = fleet.runs.get(index as usize)?;
                (run.state == RunState::Running
                    && run.attempt() == *attempt
                    && run.lease.as_ref().is_some_and(|l| l.worker_id == worker_id))
                .then_some((fleet, index))
            });
            match held {
                Some((fleet, index)) => fleet.extend_lease(index, expires_at_ms),
                None => lost.push((id.clone(), *attempt)),
            }
        }
        Response::Heartbeat { lost }
    }

    fn report_result(
        &mut self,
        now_ms: u64,
        worker_id: &str,
        id: &str,
        attempt: u32,
        result: &AttemptResult,
        effects: &mut Vec<Effect>,
    ) -> Response {
        let Some((number, index)) = parse_run_id(id) else {
            return Response::Rejected {
                reason: format!("no run {id}"),
            };
        };
        let Some(fleet) = self.fleets.get_mut(&number) else {
            return Response::Rejected {
                reason: format!("no run {id}"),
            };
        };
        let Some(run) = fleet.runs.get(index as usize) else {
            return Response::Rejected {
                reason: format!("no run {id}"),
            };
        };
        let holder = run.lease.as_ref().map(|l| l.worker_id.as_str());
        let stale = if run.state != RunState::Running {
            Some(format!(
                "run is {:?}, not running (attempt {attempt})",
                run.state
            ))
        } else if run.attempt() != attempt {
            Some(format!(
                "stale attempt {attempt}, current {}",
                run.attempt()
            ))
        } else if holder != Some(worker_id) {
            Some(format!(
                "worker {worker_id} does not hold the lease of attempt {attempt}"
            ))
        } else {
            None
        };
        if let Some(reason) = stale {
            self.record_rejection(now_ms, worker_id, id, attempt, &reason);
            return Response::Rejected { reason };
        }
        let mut result = result.clone();
        let key = |kind| ArtifactKey {
            fleet_number: number,
            run_index: index,
            attempt,
            kind,
        };
        if let Some(effect) = detach(&mut result.log_tail, key(ArtifactKind::LogTail)) {
            result.log_tail_size_bytes = effect.0;
            result.log_tail_sha256 = effect.1;
            effects.push(effect.2);
        }
        if let Some(effect) = detach(&mut result.patch, key(ArtifactKind::Patch)) {
            result.patch_size_bytes = effect.0;
            result.patch_sha256 = effect.1;
            effects.push(effect.2);
        }
        finish_attempt(fleet, &mut self.limits.occupancy, index, now_ms, result);
        if fleet.state != FleetState::Running {
            self.active_fleets.remove(&number);
        }
        Response::ResultAccepted
    }

    pub(crate) fn cancel_fleet(&mut self, now_ms: u64, id: &str) -> Response {
        let Some(number) = parse_fleet_id(id) else {
            return Response::Rejected {
                reason: format!("no fleet {id}"),
            };
        };
        let Some(fleet) = self.fleets.get_mut(&number) else {
            return Response::Rejected {
                reason: format!("no fleet {id}"),
            };
        };
        if fleet.state != FleetState::Running {
            return Response::FleetCancelled;
        }
        for index in 0..fleet.runs.len() as u32 {
            let run = &mut fleet.runs[index as usize];
            let message = match run.state {
                RunState::Pending => "cancelled before it was leased".to_string(),
                RunState::Running => {
                    if let Some(current) = run.attempts.last_mut() {
                        current.finished_at_ms = now_ms;
                        current.result = Some(AttemptResult::failure(
                            Outcome::Cancelled,
                            "fleet cancelled",
                            false,
                        ));
                    }
                    format!("attempt {} cancelled", run.attempt())
                }
                _ => continue,
            };
            end_lease(fleet, &mut self.limits.occupancy, index);
            set_run_state(fleet, index, RunState::Cancelled);
            push_event(fleet, now_ms, Some(index), message);
        }
        fleet.state = FleetState::Cancelled;
        fleet.finished_at_ms = now_ms;
        push_event(fleet, now_ms, None, "fleet cancelled".to_string());
        self.active_fleets.remove(&number);
        Response::FleetCancelled
    }

    fn expire_leases(&mut self, now_ms: u64) -> Response {
        let mut count = 0;
        let active: Vec<u64> = self.active_fleets.iter().copied().collect();
        for number in active {
            let Some(fleet) = self.fleets.get_mut(&number) else {
                continue;
            };
            let expired = fleet.leases.expired(now_ms);
            for index in expired {
                count += 1;
                expire_attempt(
                    fleet,
                    &mut self.limits.occupancy,
                    index,
                    now_ms,
                    "lease expired: worker stopped heartbeating",
                );
            }
            if fleet.state != FleetState::Running {
                self.active_fleets.remove(&number);
            }
        }
        Response::LeasesExpired { count }
    }

    fn expire_silent_leases(&mut self, now_ms: u64, leases: &[(String, u32, u64)]) -> Response {
        if leases.len() > crate::liveness::MAX_EXPIRED_LEASES_PER_COMMAND {
            return Response::Rejected {
                reason: format!(
                    "{} leases; at most {} per command",
                    leases.len(),
                    crate::liveness::MAX_EXPIRED_LEASES_PER_COMMAND
                ),
            };
        }
        let mut count = 0;
        for (id, attempt, granted_until_ms) in leases {
            let current = self
                .lease(id, *attempt)
                .is_some_and(|lease| lease.expires_at_ms == *granted_until_ms);
            let Some((number, index)) = parse_run_id(id).filter(|_| current) else {
                continue;
            };
            let Some(fleet) = self.fleets.get_mut(&number) else {
                continue;
            };
            count += 1;
            expire_attempt(
                fleet,
                &mut self.limits.occupancy,
                index,
                now_ms,
                "lease expired: the leader heard no heartbeat for it within lease_ttl_ms",
            );
            if fleet.state != FleetState::Running {
                self.active_fleets.remove(&number);
            }
        }
        Response::LeasesExpired { count }
    }

    fn compact_fleets(
        &mut self,
        now_ms: u64,
        retention_ms: u64,
        max_fleets: u32,
        effects: &mut Vec<Effect>,
    ) -> Response {
        let due: Vec<u64> = self
            .fleets
            .values()
            .filter(|fleet| fleet.is_compactable(now_ms, retention_ms))
            .map(|fleet| fleet.number)
            .take(max_fleets as usize)
            .collect();
        for number in &due {
            let Some(fleet) = self.fleets.remove(number) else {
                continue;
            };
            if !fleet.idempotency_key.is_empty() {
                self.idempotency_keys.remove(&fleet.idempotency_key);
            }
            effects.push(Effect::DeleteFleetArtifacts {
                fleet_number: *number,
            });
        }
        Response::FleetsCompacted {
            count: due.len() as u32,
        }
    }

    /// Whether some ended fleet is past `retention_ms` at `now_ms`, for the leader's timer.
    pub fn has_compactable_fleets(&self, now_ms: u64, retention_ms: u64) -> bool {
        self.fleets
            .values()
            .any(|fleet| fleet.is_compactable(now_ms, retention_ms))
    }

    fn record_rejection(
        &mut self,
        now_ms: u64,
        worker_id: &str,
        run_id: &str,
        attempt: u32,
        reason: &str,
    ) {
        self.rejected_results_total += 1;
        if self.rejected_results.len() == MAX_REJECTED_RESULTS_KEPT {
            self.rejected_results.pop_front();
        }
        self.rejected_results.push_back(RejectedResult {
            time_ms: now_ms,
            worker_id: worker_id.to_string(),
            run_id: run_id.to_string(),
            attempt,
            reason: reason.to_string(),
        });
    }

    /// The fleet with id `fl-<n>`.
    pub fn fleet(&self, id: &str) -> Option<&Fleet> {
        self.fleets.get(&parse_fleet_id(id)?)
    }

    /// The run with id `fl-<n>-<i>` and its fleet.
    pub fn run(&self, id: &str) -> Option<(&Fleet, &Run)> {
        let (number, index) = parse_run_id(id)?;
        let fleet = self.fleets.get(&number)?;
        Some((fleet, fleet.runs.get(index as usize)?))
    }

    /// Fleets newest first, starting below fleet number `before` (exclusive; `u64::MAX` for the
    /// first page), at most `limit`.
    pub fn fleets_before(&self, before: u64, limit: usize) -> impl Iterator<Item = &Fleet> {
        self.fleets
            .range(..before)
            .rev()
            .take(limit)
            .map(|(_, fleet)| fleet)
    }

    /// The fleet created by `idempotency_key`, if any.
    pub fn fleet_by_idempotency_key(&self, idempotency_key: &str) -> Option<&Fleet> {
        self.fleets.get(self.idempotency_keys.get(idempotency_key)?)
    }

    /// Every lease as `(run_id, attempt, worker_id)`, by fleet, then earliest grant deadline
    /// first. O(leases), never a walk over every run.
    pub fn leases(&self) -> Vec<(String, u32, String)> {
        let mut leases = Vec::new();
        for fleet in self
            .active_fleets
            .iter()
            .filter_map(|number| self.fleets.get(number))
        {
            for index in self.lease_index(fleet).indices() {
                let Some(run) = fleet.runs.get(index as usize) else {
                    continue;
                };
                if let Some(lease) = &run.lease {
                    leases.push((
                        run_id(fleet.number, index),
                        run.attempt(),
                        lease.worker_id.clone(),
                    ));
                }
            }
        }
        leases
    }

    /// The lease of run `run_id`'s attempt `attempt`, if that attempt is the run's current one
    /// and running.
    pub fn lease(&self, run_id: &str, attempt: u32) -> Option<&Lease> {
        let (number, index) = parse_run_id(run_id)?;
        let run = self.fleets.get(&number)?.runs.get(index as usize)?;
        if run.state != RunState::Running || run.attempt() != attempt {
            return None;
        }
        run.lease.as_ref()
    }

    /// The worker holding the lease of run `run_id`'s attempt `attempt` (see [`State::lease`]).
    pub fn lease_holder(&self, run_id: &str, attempt: u32) -> Option<&str> {
        self.lease(run_id, attempt)
            .map(|lease| lease.worker_id.as_str())
    }

    /// `fleet`'s lease index: the kept one, or (in a state loaded from before the index existed
    /// and not applied to since) one built for this read.
    pub(crate) fn lease_index<'a>(&self, fleet: &'a Fleet) -> std::borrow::Cow<'a, LeaseIndex> {
        if self.index_version == INDEX_VERSION {
            std::borrow::Cow::Borrowed(&fleet.leases)
        } else {
            std::borrow::Cow::Owned(LeaseIndex::rebuild(&fleet.runs))
        }
    }

    /// Rejected (stale) results, most recent last, and the total ever rejected.
    pub fn rejected_results(&self) -> (&VecDeque<RejectedResult>, u64) {
        (&self.rejected_results, self.rejected_results_total)
    }

    /// The number the next submitted fleet gets.
    pub fn next_fleet_number(&self) -> u64 {
        self.next_fleet_number
    }

    /// Largest leader timestamp applied so far.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Checks the invariants in the module documentation.
    ///
    /// # Errors
    /// A description of the first violated invariant.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.staging.check_invariants()?;
        for schedule in self.schedules.values() {
            schedule.check_invariants(|number| {
                self.fleets
                    .get(&number)
                    .map(|fleet| fleet.idempotency_key.clone())
            })?;
        }
        self.check_event_invariants()?;
        self.check_limit_invariants()?;
        for fleet in self.fleets.values() {
            if self.index_version == INDEX_VERSION {
                let mut rebuilt = fleet.clone();
                rebuilt.rebuild_indexes();
                if fleet.leases != rebuilt.leases {
                    return Err(format!(
                        "fleet {} lease index out of sync with its runs",
                        fleet.number
                    ));
                }
                if fleet.pending_by_time != rebuilt.pending_by_time {
                    return Err(format!(
                        "fleet {} pending-by-time index out of sync with its runs",
                        fleet.number
                    ));
                }
            }
            let mut counts = RunCounts::default();
            for run in &fleet.runs {
                *counts.slot(run.state) += 1;
                if (run.state == RunState::Running) != run.lease.is_some() {
                    return Err(format!(
                        "run {} is {:?} with lease {:?}",
                        run.index, run.state, run.lease
                    ));
                }
                if (run.state == RunState::Pending) != fleet.pending.contains(&run.index) {
                    return Err(format!("run {} pending set out of sync", run.index));
                }
                for (position, attempt) in run.attempts.iter().enumerate() {
                    if attempt.number != position as u32 + 1 {
                        return Err(format!("run {} attempt numbers have a gap", run.index));
                    }
                }
                if run.state == RunState::Running
                    && run.attempts.last().is_none_or(|a| a.result.is_some())
                {
                    return Err(format!("running run {} has no open attempt", run.index));
                }
            }
            if counts != fleet.counts {
                return Err(format!(
                    "fleet {} counts {:?} != tally {:?}",
                    fleet.number, fleet.counts, counts
                ));
            }
            if counts.running > fleet.spec.max_parallelism {
                return Err(format!("fleet {} exceeds max_parallelism", fleet.number));
            }
            let done = counts.pending == 0 && counts.running == 0;
            if done == (fleet.state == FleetState::Running) {
                return Err(format!(
                    "fleet {} state {:?} with counts {:?}",
                    fleet.number, fleet.state, counts
                ));
            }
            if (fleet.state == FleetState::Running) != self.active_fleets.contains(&fleet.number) {
                return Err(format!("fleet {} active set out of sync", fleet.number));
            }
            crate::control::check_flow(fleet)?;
            let first = fleet.last_sequence + 1 - fleet.events.len() as u64;
            for (position, event) in fleet.events.iter().enumerate() {
                if event.sequence != first + position as u64 {
                    return Err(format!("fleet {} event sequence has a gap", fleet.number));
                }
            }
            if fleet.max_events != 0 && fleet.events.len() > fleet.max_events as usize {
                return Err(format!("fleet {} keeps more than max_events", fleet.number));
            }
        }
        Ok(())
    }
}

impl State {
    /// The limit table's invariants against the running runs' leases
    /// ([`LimitTable::check_invariants`]), and that only running runs hold leases with slots.
    fn check_limit_invariants(&self) -> Result<(), String> {
        let leases = self.fleets.values().flat_map(|fleet| {
            fleet.runs.iter().filter_map(move |run| {
                let lease = run.lease.as_ref()?;
                Some((
                    lease.slots.as_slice(),
                    flotilla_domain::repository::repository_parts(&run.repository).repository,
                    fleet.number,
                    fleet.spec.flow.shared_repositories,
                ))
            })
        });
        self.limits.check_invariants(leases)
    }
}

/// Moves the bytes of a non-empty `text` out into a [`Effect::PutArtifact`] under `key`:
/// returns `(size_bytes, sha256, effect)` and leaves `text` empty.
fn detach(text: &mut String, key: ArtifactKey) -> Option<(u64, String, Effect)> {
    if text.is_empty() {
        return None;
    }
    let bytes = std::mem::take(text).into_bytes();
    Some((
        bytes.len() as u64,
        sha256_hex(&bytes),
        Effect::PutArtifact { key, bytes },
    ))
}

/// The grant of run `index`'s current attempt, expiring at `expires_at_ms`.
fn lease_grant(fleet: &Fleet, index: u32, expires_at_ms: u64, redelivered: bool) -> LeaseGrant {
    let run = &fleet.runs[index as usize];
    LeaseGrant {
        run_id: run_id(fleet.number, index),
        fleet_id: fleet.id(),
        repository: run.repository.clone(),
        attempt: run.attempt(),
        branch: run.branch.clone(),
        spec: fleet.spec.without_repositories(),
        expires_at_ms,
        trace_parent: fleet.trace_parent.clone(),
        fleet_created_at_ms: fleet.created_at_ms,
        redelivered,
    }
}

/// Ends the current attempt of run `index` with `result` and moves the run on: terminal,
/// or back to pending after a backoff when the failure is retryable and attempts remain.
/// Ends run `index`'s current attempt as `lease_expired` (retryable) with `reason`.
fn expire_attempt(
    fleet: &mut Fleet,
    occupancy: &mut Occupancy,
    index: u32,
    now_ms: u64,
    reason: &str,
) {
    let result = AttemptResult::failure(Outcome::LeaseExpired, reason, true);
    finish_attempt(fleet, occupancy, index, now_ms, result);
}

/// Gives back what run `index`'s lease holds in `occupancy` (its slots, its repository) and
/// ends the lease. Every lease that ends goes through here.
pub(crate) fn end_lease(fleet: &mut Fleet, occupancy: &mut Occupancy, index: u32) {
    let run = &fleet.runs[index as usize];
    if let Some(lease) = &run.lease {
        let repository = flotilla_domain::repository::repository_parts(&run.repository).repository;
        occupancy.release(&lease.slots, &repository, fleet.number);
    }
    fleet.set_lease(index, None);
}

pub(crate) fn finish_attempt(
    fleet: &mut Fleet,
    occupancy: &mut Occupancy,
    index: u32,
    now_ms: u64,
    result: AttemptResult,
) {
    let max_attempts = fleet.spec.retry.max_attempts;
    let run = &mut fleet.runs[index as usize];
    let attempt = run.attempt();
    let outcome = result.outcome;
    let retryable = match outcome {
        Outcome::LeaseExpired => true,
        Outcome::Infrastructure => result.retryable,
        _ => false,
    };
    let error = result.error.clone();
    if let Some(current) = run.attempts.last_mut() {
        current.finished_at_ms = now_ms;
        current.result = Some(result);
    }
    end_lease(fleet, occupancy, index);
    let past_deadline = fleet.flow.deadline_at_ms != 0 && now_ms >= fleet.flow.deadline_at_ms;
    let next_state = match outcome {
        Outcome::Changed => RunState::Changed,
        Outcome::Unchanged => RunState::Unchanged,
        Outcome::Cancelled if !retryable => RunState::Cancelled,
        _ if retryable && attempt < max_attempts && past_deadline => RunState::Cancelled,
        _ if retryable && attempt < max_attempts => RunState::Pending,
        _ => RunState::Failed,
    };
    let message = if next_state == RunState::Cancelled && outcome != Outcome::Cancelled {
        format!(
            "attempt {attempt} {}: {error}; not retried: the fleet's deadline passed",
            outcome.as_str()
        )
    } else if next_state == RunState::Pending {
        let backoff_ms = fleet.spec.retry.backoff_ms(attempt + 1);
        let not_before_ms = now_ms.saturating_add(backoff_ms);
        fleet.runs[index as usize].not_before_ms = not_before_ms;
        fleet.pending.insert(index);
        fleet.pending_by_time.insert((not_before_ms, index));
        format!(
            "attempt {attempt} {}: {error}; retry in {backoff_ms} ms",
            outcome.as_str()
        )
    } else if retryable {
        format!(
            "attempt {attempt} {}: {error}; gave up after {attempt} attempts",
            outcome.as_str()
        )
    } else if error.is_empty() {
        format!("attempt {attempt} {}", outcome.as_str())
    } else {
        format!("attempt {attempt} {}: {error}", outcome.as_str())
    };
    set_run_state(fleet, index, next_state);
    push_event(fleet, now_ms, Some(index), message);
    crate::control::after_run_change(fleet, index, now_ms);
    finish_if_done(fleet, now_ms);
}

pub(crate) fn set_run_state(fleet: &mut Fleet, index: u32, state: RunState) {
    let run = &mut fleet.runs[index as usize];
    let previous = run.state;
    *fleet.counts.slot(previous) -= 1;
    *fleet.counts.slot(state) += 1;
    run.state = state;
    if previous == RunState::Pending && state != RunState::Pending {
        fleet.pending.remove(&index);
        let not_before_ms = fleet.runs[index as usize].not_before_ms;
        fleet.pending_by_time.remove(&(not_before_ms, index));
    }
}

pub(crate) fn finish_if_done(fleet: &mut Fleet, now_ms: u64) {
    if fleet.state == FleetState::Running && fleet.counts.pending == 0 && fleet.counts.running == 0
    {
        fleet.state = FleetState::Finished;
        fleet.finished_at_ms = now_ms;
        let c = fleet.counts;
        let message = format!(
            "fleet finished: {} changed, {} unchanged, {} failed, {} cancelled",
            c.changed, c.unchanged, c.failed, c.cancelled
        );
        push_event(fleet, now_ms, None, message);
    }
}

pub(crate) fn push_event(fleet: &mut Fleet, now_ms: u64, run_index: Option<u32>, message: String) {
    let (run_state, attempt) = match run_index {
        Some(index) => {
            let run = &fleet.runs[index as usize];
            (Some(run.state), run.attempt())
        }
        None => (None, 0),
    };
    fleet.last_sequence += 1;
    if fleet.max_events != 0 && fleet.events.len() >= fleet.max_events as usize {
        fleet.events.pop_front();
    }
    fleet.events.push_back(FleetEvent {
        sequence: fleet.last_sequence,
        time_ms: now_ms,
        run_index,
        run_state,
        attempt,
        fleet_state: fleet.state,
        counts: fleet.counts,
        message: truncate_message(message),
        redelivered: false,
    });
}

/// Cuts `message` to [`MAX_EVENT_MESSAGE_BYTES`] at a character boundary.
fn truncate_message(mut message: String) -> String {
    if message.len() > MAX_EVENT_MESSAGE_BYTES {
        let mut end = MAX_EVENT_MESSAGE_BYTES - 3;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str("...");
    }
    message
}

/// What the worker reported that belongs in the audit trail, as a suffix of the result's
/// record: egress requests allowed and denied (with the denied hosts, at most 8), push
/// credentials minted and revoked (broker and credential id, never a token), and what the
/// sandbox refused (`sandbox denied seccomp ptrace x6 (agent), ...`). Empty when none.
fn worker_facts(result: &AttemptResult) -> String {
    let mut facts = Vec::new();
    let denied: Vec<&str> = result
        .egress_connections
        .iter()
        .filter(|c| !c.allowed)
        .map(|c| c.host.as_str())
        .collect();
    if !result.egress_connections.is_empty() || result.egress_connections_dropped > 0 {
        let allowed = result.egress_connections.len() - denied.len();
        let mut shown: Vec<&str> = denied.iter().copied().take(8).collect();
        shown.dedup();
        facts.push(format!(
            "egress {allowed} allowed, {} denied{}, {} unlisted",
            denied.len(),
            if shown.is_empty() {
                String::new()
            } else {
                format!(" ({})", shown.join(", "))
            },
            result.egress_connections_dropped
        ));
    }
    for event in &result.credential_events {
        facts.push(format!(
            "credential {} by {} {}",
            event.kind, event.broker, event.credential_id
        ));
    }
    if !result.sandbox_denials.is_empty() {
        let listed: Vec<String> = result
            .sandbox_denials
            .iter()
            .map(|denial| {
                format!(
                    "{} {} x{} ({})",
                    denial.mechanism, denial.action, denial.count, denial.command
                )
            })
            .collect();
        facts.push(format!("sandbox denied {}", listed.join(", ")));
    }
    if facts.is_empty() {
        String::new()
    } else {
        format!("; {}", facts.join("; "))
    }
}

/// The audit record of applying `command` with `response`: action, target, outcome, reason.
/// Never copies a secret (a token's record names only its accessor id and role).
fn audit_entry(command: &Command, response: &Response) -> AuditEntry {
    let (action, target) = match command {
        Command::SubmitFleet { spec, .. } => (
            "submit_fleet",
            match response {
                Response::FleetSubmitted { fleet_id, .. }
                | Response::IdempotencyKeyConflict { fleet_id } => {
                    format!("project {} fleet {fleet_id} ({})", spec.project, spec.name)
                }
                _ => format!("project {} fleet {}", spec.project, spec.name),
            },
        ),
        Command::StageRepositories {
            upload_id,
            repositories,
        } => (
            "stage_repositories",
            format!("upload {upload_id} ({} repositories)", repositories.len()),
        ),
        Command::SubmitStagedFleet {
            upload_id, spec, ..
        } => (
            "submit_staged_fleet",
            match response {
                Response::FleetSubmitted { fleet_id, .. }
                | Response::IdempotencyKeyConflict { fleet_id } => format!(
                    "project {} fleet {fleet_id} ({}) from upload {upload_id}",
                    spec.project, spec.name
                ),
                _ => format!(
                    "project {} fleet {} from upload {upload_id}",
                    spec.project, spec.name
                ),
            },
        ),
        Command::AcquireLeases { worker_id, .. } => {
            ("acquire_leases", format!("worker {worker_id}"))
        }
        Command::Heartbeat { worker_id, .. } => ("heartbeat", format!("worker {worker_id}")),
        Command::ReportResult {
            worker_id,
            run_id,
            attempt,
            result,
        } => (
            "report_result",
            format!(
                "run {run_id} attempt {attempt} by worker {worker_id}: {}{}",
                result.outcome.as_str(),
                worker_facts(result)
            ),
        ),
        Command::CancelFleet { fleet_id } => ("cancel_fleet", format!("fleet {fleet_id}")),
        Command::PauseFleet { fleet_id, note } => {
            ("pause_fleet", format!("fleet {fleet_id}: {note}"))
        }
        Command::ResumeFleet { fleet_id, note } => {
            ("resume_fleet", format!("fleet {fleet_id}: {note}"))
        }
        Command::ApproveFleet { fleet_id, note } => {
            ("approve_fleet", format!("fleet {fleet_id}: {note}"))
        }
        Command::AdvanceFleets => ("advance_fleets", String::new()),
        Command::CreateLimit { spec, .. } => (
            "create_limit",
            format!("limit {}: {}", spec.name, spec.describe()),
        ),
        Command::DeleteLimit { name } => ("delete_limit", format!("limit {name}")),
        Command::RerunFleet {
            origin_fleet_id,
            run_indexes,
            spec,
            ..
        } => (
            "rerun_fleet",
            format!(
                "project {} {} runs of fleet {origin_fleet_id}{}",
                spec.project,
                run_indexes.len(),
                match response {
                    Response::FleetSubmitted { fleet_id, .. } => format!(" as fleet {fleet_id}"),
                    _ => String::new(),
                }
            ),
        ),
        Command::ExpireLeases => ("expire_leases", String::new()),
        Command::ExpireSilentLeases { leases } => (
            "expire_silent_leases",
            leases
                .iter()
                .take(16)
                .map(|(run_id, attempt, _)| format!("{run_id}#{attempt}"))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        Command::CompactFleets { .. } => ("compact_fleets", String::new()),
        Command::CreateToken {
            accessor_id,
            name,
            project,
            role,
            worker_id,
            ..
        } => (
            "create_token",
            format!(
                "token {accessor_id} ({name}, {}, project {}, worker {})",
                role.as_str(),
                project.as_deref().unwrap_or("*"),
                worker_id.as_deref().unwrap_or("-")
            ),
        ),
        Command::BootstrapToken { accessor_id, .. } => (
            "bootstrap_token",
            format!("token {accessor_id} (bootstrap, admin)"),
        ),
        Command::RevokeToken { accessor_id } => ("revoke_token", format!("token {accessor_id}")),
        Command::SetSecret {
            project,
            name,
            version,
            envelope,
            ..
        } => (
            "set_secret",
            format!(
                "project {project} secret {name} version {version} (key {})",
                envelope.key_id
            ),
        ),
        Command::DeleteSecret { project, name } => {
            ("delete_secret", format!("project {project} secret {name}"))
        }
        Command::RewrapSecret {
            project,
            name,
            version,
            key_id,
            ..
        } => (
            "rewrap_secret",
            format!("project {project} secret {name} version {version} to key {key_id}"),
        ),
        Command::CreateSchedule { spec, .. } => {
            ("create_schedule", format!("schedule {}", spec.id()))
        }
        Command::DeleteSchedule { schedule_id } => {
            ("delete_schedule", format!("schedule {schedule_id}"))
        }
        Command::PauseSchedule { schedule_id, .. } => {
            ("pause_schedule", format!("schedule {schedule_id}"))
        }
        Command::ResumeSchedule { schedule_id, .. } => {
            ("resume_schedule", format!("schedule {schedule_id}"))
        }
        Command::ProcessSchedule { schedule_id, .. } => {
            ("process_schedule", format!("schedule {schedule_id}"))
        }
        Command::CreateEventRule { spec, .. } => {
            ("create_event_rule", format!("rule {}", spec.id()))
        }
        Command::DeleteEventRule { rule_id } => ("delete_event_rule", format!("rule {rule_id}")),
        Command::DeliverEvent {
            header, matches, ..
        } => (
            "deliver_event",
            format!(
                "delivery {} ({} {}) to project {}: {} rules matched",
                header.key(),
                header.event_type,
                header.verdict,
                header.project,
                matches.len()
            ),
        ),
        Command::TriggerSchedule {
            schedule_id,
            trigger_id,
            ..
        } => (
            "trigger_schedule",
            format!("schedule {schedule_id} trigger {trigger_id}"),
        ),
        Command::BackfillSchedule {
            schedule_id,
            from_ms,
            to_ms,
            ..
        } => (
            "backfill_schedule",
            format!("schedule {schedule_id} from {from_ms} to {to_ms} ms"),
        ),
    };
    let (outcome, reason) = match response {
        Response::Rejected { reason } | Response::QueueFull { reason } => {
            (AuditOutcome::Rejected, reason.clone())
        }
        Response::IdempotencyKeyConflict { .. } => (
            AuditOutcome::Rejected,
            "idempotency key used by another spec".to_string(),
        ),
        Response::Leased(grants) => (
            AuditOutcome::Accepted,
            format!(
                "{} leases: {}",
                grants.len(),
                grants
                    .iter()
                    .take(16)
                    .map(|g| format!("{}#{}", g.run_id, g.attempt))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        ),
        Response::Heartbeat { lost } => (AuditOutcome::Accepted, format!("{} lost", lost.len())),
        Response::LeasesExpired { count } => (AuditOutcome::Accepted, format!("{count} expired")),
        Response::FleetsCompacted { count } => {
            (AuditOutcome::Accepted, format!("{count} compacted"))
        }
        Response::FleetSubmitted { created, .. } => (
            AuditOutcome::Accepted,
            if *created {
                String::new()
            } else {
                "repeated idempotency key".into()
            },
        ),
        _ => (AuditOutcome::Accepted, String::new()),
    };
    AuditEntry {
        action: action.to_string(),
        target,
        outcome,
        reason,
    }
}
