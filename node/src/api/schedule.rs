//! `flotilla.v1.ScheduleService`: schedules held in the replicated state
//! ([`flotilla_scheduler::schedule`]); the leader's engine starts their fleets.
//!
//! A schedule's fleet is checked here as `SubmitFleet` checks a fleet (limits, the execution
//! policy), so a schedule can never start a fleet its creator could not submit; creating one
//! needs `project.settings` and `fleet.submit` in its project.

use flotilla_proto::v1::schedule_service_client::ScheduleServiceClient;
use flotilla_proto::v1::schedule_service_server::ScheduleService;
use flotilla_proto::v1::{self};
use flotilla_scheduler::schedule::calendar::{
    Calendar, CalendarSpec, DstGap, DstRepeat, OccurrenceNote,
};
use flotilla_scheduler::schedule::jitter_ms;
use flotilla_scheduler::schedule::plan::{self, OverlapPolicy, SchedulePolicy};
use flotilla_scheduler::schedule::record::{MAX_NOTE_BYTES, Schedule, ScheduleSpec, TickOutcome};
use flotilla_scheduler::{Command, FieldError, Permission, Response};
use tonic::transport::Channel;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use tracing::info;

use super::auth::{Caller, authorization, caller, forwarded};
use super::{Api, Proposal, invalid, random_hex_id};
use crate::convert;

/// Occurrences in a preview when the request says 0.
pub const DEFAULT_PREVIEW_COUNT: usize = 10;

/// The schedule service over the shared [`Api`].
#[derive(Clone)]
pub struct ScheduleApi {
    api: Api,
}

impl ScheduleApi {
    /// The service over `api`.
    pub fn new(api: Api) -> Self {
        ScheduleApi { api }
    }

    fn client(&self, channel: Channel) -> ScheduleServiceClient<Channel> {
        ScheduleServiceClient::new(channel)
            .max_decoding_message_size(self.api.limits.max_request_bytes)
            .max_encoding_message_size(self.api.limits.max_request_bytes)
    }

    /// Converts and checks a submitted spec: calendar, policy, and the fleet under this node's
    /// limits and execution policy. Also bounds the fleet's repositories by one log entry's
    /// part (`limits.max_submission_part_bytes`): a schedule is one entry.
    fn spec_from_wire(&self, spec: Option<v1::ScheduleSpec>) -> Result<ScheduleSpec, Status> {
        let spec = spec.ok_or_else(|| invalid(FieldError::new("spec", "is required")))?;
        let fleet =
            convert::fleet_spec_from_wire(spec.fleet, &self.api.spec_limits).map_err(|error| {
                invalid(FieldError::new(
                    error.field.replacen("spec", "spec.fleet", 1),
                    error.message,
                ))
            })?;
        let staged = flotilla_scheduler::staging::staged_bytes(&fleet.repositories);
        if staged > self.api.limits.max_submission_part_bytes as u64 {
            return Err(invalid(FieldError::new(
                "spec.fleet.repositories",
                format!(
                    "{staged} bytes; a schedule's fleet holds at most limits.max_submission_part_bytes ({})",
                    self.api.limits.max_submission_part_bytes
                ),
            )));
        }
        self.api
            .policy
            .check(&fleet, "spec.fleet")
            .map_err(|error| Status::permission_denied(error.to_string()))?;
        let converted = ScheduleSpec {
            name: spec.name,
            calendar: calendar_from_wire(spec.calendar.unwrap_or_default()),
            policy: policy_from_wire(spec.policy.unwrap_or_default()),
            fleet,
        };
        converted
            .validate("spec", &self.api.spec_limits)
            .map_err(invalid)?;
        Ok(converted)
    }

    /// The schedule `id`, for a caller allowed `permission` in its project (NOT_FOUND
    /// otherwise, so ids in other projects are not disclosed).
    fn read(&self, who: &Caller, id: &str, permission: Permission) -> Result<v1::Schedule, Status> {
        self.api
            .node
            .state
            .read(|state| {
                state
                    .schedule(id)
                    .filter(|schedule| who.may(permission, &schedule.spec.fleet.project))
                    .map(schedule_to_wire)
            })
            .ok_or_else(|| Status::not_found(format!("no schedule {id}")))
    }

    /// Proposes pausing (`pause`) or resuming schedule `id`; `Some(channel)` when the request
    /// must go to the leader instead.
    async fn propose_pause(
        &self,
        who: &Caller,
        id: &str,
        note: &str,
        pause: bool,
    ) -> Result<Option<Channel>, Status> {
        check_note(note)?;
        self.project_of(who, id, Permission::ProjectSettings)?;
        let (schedule_id, note) = (id.to_owned(), note.to_owned());
        let command = if pause {
            Command::PauseSchedule { schedule_id, note }
        } else {
            Command::ResumeSchedule { schedule_id, note }
        };
        match self.api.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => Ok(Some(channel)),
            Proposal::Applied(Response::SchedulePaused { .. }) => Ok(None),
            Proposal::Applied(Response::Rejected { reason }) if reason.starts_with("no ") => {
                Err(Status::not_found(reason))
            }
            Proposal::Applied(Response::Rejected { reason }) => {
                Err(Status::invalid_argument(reason))
            }
            Proposal::Applied(other) => Err(unexpected(other)),
        }
    }

    /// The project of schedule `id`, checked against `permission`.
    fn project_of(&self, who: &Caller, id: &str, permission: Permission) -> Result<(), Status> {
        self.read(who, id, permission).map(|_| ())
    }
}

fn calendar_from_wire(calendar: v1::ScheduleCalendar) -> CalendarSpec {
    CalendarSpec {
        dst_gap: match calendar.dst_gap() {
            v1::DstGap::Skip => DstGap::Skip,
            v1::DstGap::Unspecified | v1::DstGap::RunAfter => DstGap::RunAfter,
        },
        dst_repeat: match calendar.dst_repeat() {
            v1::DstRepeat::Both => DstRepeat::Both,
            v1::DstRepeat::Unspecified | v1::DstRepeat::First => DstRepeat::First,
        },
        cron: calendar.cron,
        every: calendar.every,
        offset: calendar.offset,
        time_zone: calendar.time_zone,
        start_at_ms: calendar.start_at_ms,
        end_at_ms: calendar.end_at_ms,
    }
}

/// An overlap policy from the wire; `None` for UNSPECIFIED (each request says what that means).
fn overlap_from_wire(overlap: v1::OverlapPolicy) -> Option<OverlapPolicy> {
    match overlap {
        v1::OverlapPolicy::Unspecified => None,
        v1::OverlapPolicy::Skip => Some(OverlapPolicy::Skip),
        v1::OverlapPolicy::BufferOne => Some(OverlapPolicy::BufferOne),
        v1::OverlapPolicy::BufferAll => Some(OverlapPolicy::BufferAll),
        v1::OverlapPolicy::CancelOther => Some(OverlapPolicy::CancelOther),
        v1::OverlapPolicy::AllowAll => Some(OverlapPolicy::AllowAll),
    }
}

fn policy_from_wire(policy: v1::SchedulePolicy) -> SchedulePolicy {
    let defaults = SchedulePolicy::default();
    SchedulePolicy {
        overlap: overlap_from_wire(policy.overlap()).unwrap_or(defaults.overlap),
        buffer_limit: convert::or_default(policy.buffer_limit, defaults.buffer_limit),
        catch_up_window_ms: convert::or_default(
            policy.catch_up_window_ms,
            defaults.catch_up_window_ms,
        ),
        max_jitter_ms: policy.max_jitter_ms,
        remaining_actions: policy.remaining_actions,
        pause_on_failed_runs: policy.pause_on_failed_runs,
    }
}

/// The wire form of a calendar.
pub fn calendar_to_wire(calendar: &CalendarSpec) -> v1::ScheduleCalendar {
    v1::ScheduleCalendar {
        cron: calendar.cron.clone(),
        every: calendar.every.clone(),
        offset: calendar.offset.clone(),
        time_zone: calendar.time_zone.clone(),
        start_at_ms: calendar.start_at_ms,
        end_at_ms: calendar.end_at_ms,
        dst_gap: match calendar.dst_gap {
            DstGap::RunAfter => v1::DstGap::RunAfter,
            DstGap::Skip => v1::DstGap::Skip,
        } as i32,
        dst_repeat: match calendar.dst_repeat {
            DstRepeat::First => v1::DstRepeat::First,
            DstRepeat::Both => v1::DstRepeat::Both,
        } as i32,
    }
}

/// The wire form of a policy.
pub fn policy_to_wire(policy: &SchedulePolicy) -> v1::SchedulePolicy {
    v1::SchedulePolicy {
        overlap: match policy.overlap {
            OverlapPolicy::Skip => v1::OverlapPolicy::Skip,
            OverlapPolicy::BufferOne => v1::OverlapPolicy::BufferOne,
            OverlapPolicy::BufferAll => v1::OverlapPolicy::BufferAll,
            OverlapPolicy::CancelOther => v1::OverlapPolicy::CancelOther,
            OverlapPolicy::AllowAll => v1::OverlapPolicy::AllowAll,
        } as i32,
        buffer_limit: policy.buffer_limit,
        catch_up_window_ms: policy.catch_up_window_ms,
        max_jitter_ms: policy.max_jitter_ms,
        remaining_actions: policy.remaining_actions,
        pause_on_failed_runs: policy.pause_on_failed_runs,
    }
}

fn spec_to_wire(spec: &ScheduleSpec) -> v1::ScheduleSpec {
    v1::ScheduleSpec {
        name: spec.name.clone(),
        calendar: Some(calendar_to_wire(&spec.calendar)),
        policy: Some(policy_to_wire(&spec.policy)),
        fleet: Some(convert::fleet_spec_to_wire(&spec.fleet)),
    }
}

/// The wire form of a schedule.
pub fn schedule_to_wire(schedule: &Schedule) -> v1::Schedule {
    let history = schedule
        .history
        .iter()
        .map(|record| {
            let mut tick = v1::ScheduleTick {
                nominal_ms: record.nominal_ms,
                decided_at_ms: record.decided_at_ms,
                ..Default::default()
            };
            match &record.outcome {
                TickOutcome::Started { fleet_id } => {
                    tick.outcome = "started".into();
                    tick.fleet_id = fleet_id.clone();
                }
                TickOutcome::Triggered {
                    trigger_id,
                    fleet_id,
                } => {
                    tick.outcome = "triggered".into();
                    tick.fleet_id = fleet_id.clone();
                    tick.trigger_id = trigger_id.clone();
                }
                TickOutcome::Buffered => tick.outcome = "buffered".into(),
                TickOutcome::Skipped { reason } => {
                    tick.outcome = "skipped".into();
                    tick.reason = reason.clone();
                }
                TickOutcome::Missed {
                    last_ms,
                    count,
                    count_is_lower_bound,
                } => {
                    tick.outcome = "missed".into();
                    tick.missed_count = *count;
                    tick.missed_last_ms = *last_ms;
                    tick.missed_count_is_lower_bound = *count_is_lower_bound;
                }
                TickOutcome::Paused { note } => {
                    tick.outcome = "paused".into();
                    tick.reason = note.clone();
                }
                TickOutcome::Resumed { note } => {
                    tick.outcome = "resumed".into();
                    tick.reason = note.clone();
                }
            }
            tick
        })
        .collect();
    v1::Schedule {
        id: schedule.id.clone(),
        spec: Some(spec_to_wire(&schedule.spec)),
        created_at_ms: schedule.created_at_ms,
        paused: schedule.paused.is_some(),
        paused_by: schedule
            .paused
            .as_ref()
            .map_or_else(String::new, |pause| pause.by.clone()),
        pause_note: schedule
            .paused
            .as_ref()
            .map_or_else(String::new, |pause| pause.note.clone()),
        processed_until_ms: schedule.progress.processed_until_ms,
        buffered_ms: schedule.progress.buffered.iter().copied().collect(),
        actions_taken: schedule.progress.actions_taken,
        running_fleet_ids: schedule
            .fleets
            .iter()
            .map(|number| flotilla_scheduler::state::fleet_id(*number))
            .collect(),
        next_due_ms: schedule.next_due_ms.unwrap_or(0),
        history,
        history_dropped: schedule.history_dropped,
    }
}

fn project_of_schedule(schedule: &v1::Schedule) -> String {
    schedule
        .spec
        .as_ref()
        .and_then(|spec| spec.fleet.as_ref())
        .map_or_else(String::new, |fleet| fleet.project.clone())
}

fn occurrence_note_name(note: OccurrenceNote) -> &'static str {
    match note {
        OccurrenceNote::Exact => "exact",
        OccurrenceNote::AfterGap => "after_gap",
        OccurrenceNote::RepeatedHour => "repeated_hour",
    }
}

fn check_note(note: &str) -> Result<(), Status> {
    if note.len() > MAX_NOTE_BYTES {
        return Err(invalid(FieldError::new(
            "note",
            format!("longer than {MAX_NOTE_BYTES} bytes"),
        )));
    }
    Ok(())
}

/// The status of a refused trigger or backfill: NOT_FOUND for an unknown schedule,
/// FAILED_PRECONDITION when the state stands in the way (a running fleet, undecided times),
/// INVALID_ARGUMENT for the request itself.
fn refused(reason: String) -> Status {
    if reason.starts_with("no schedule") {
        Status::not_found(reason)
    } else if reason.contains("is running")
        || reason.contains("are running")
        || reason.starts_with("to: after")
    {
        Status::failed_precondition(reason)
    } else {
        Status::invalid_argument(reason)
    }
}

fn unexpected(response: Response) -> Status {
    Status::internal(format!("unexpected response {response:?}"))
}

#[tonic::async_trait]
impl ScheduleService for ScheduleApi {
    async fn create_schedule(
        &self,
        request: GrpcRequest<v1::CreateScheduleRequest>,
    ) -> Result<GrpcResponse<v1::CreateScheduleResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        let spec = self.spec_from_wire(original.spec.clone())?;
        let project = spec.fleet.project.clone();
        who.require(Permission::ProjectSettings, &project)?;
        who.require(Permission::FleetSubmit, &project)?;
        let command = Command::CreateSchedule {
            spec,
            max_schedules: self.api.limits.max_schedules,
        };
        match self.api.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.api
                    .forward(
                        self.client(channel)
                            .create_schedule(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
            Proposal::Applied(Response::ScheduleCreated {
                schedule_id,
                created,
            }) => {
                info!(schedule.id = %schedule_id, created, "schedule created");
                let schedule = self.read(&who, &schedule_id, Permission::FleetRead)?;
                Ok(GrpcResponse::new(v1::CreateScheduleResponse {
                    schedule: Some(schedule),
                    created,
                }))
            }
            Proposal::Applied(Response::Rejected { reason }) if reason.contains("exists") => {
                Err(Status::already_exists(reason))
            }
            Proposal::Applied(Response::Rejected { reason })
                if reason.contains("schedules already") =>
            {
                Err(Status::resource_exhausted(reason))
            }
            Proposal::Applied(Response::Rejected { reason }) => {
                Err(Status::invalid_argument(reason))
            }
            Proposal::Applied(other) => Err(unexpected(other)),
        }
    }

    async fn get_schedule(
        &self,
        request: GrpcRequest<v1::GetScheduleRequest>,
    ) -> Result<GrpcResponse<v1::Schedule>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        if let Some(channel) = self.api.read_barrier().await? {
            return self
                .api
                .forward(
                    self.client(channel)
                        .get_schedule(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        self.read(&who, &original.schedule_id, Permission::FleetRead)
            .map(GrpcResponse::new)
    }

    async fn list_schedules(
        &self,
        request: GrpcRequest<v1::ListSchedulesRequest>,
    ) -> Result<GrpcResponse<v1::ListSchedulesResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        if let Some(channel) = self.api.read_barrier().await? {
            return self
                .api
                .forward(
                    self.client(channel)
                        .list_schedules(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        let schedules = self.api.node.state.read(|state| {
            state
                .schedules()
                .filter(|schedule| {
                    let project = &schedule.spec.fleet.project;
                    (original.project.is_empty() || *project == original.project)
                        && who.may(Permission::FleetRead, project)
                })
                .map(schedule_to_wire)
                .collect()
        });
        Ok(GrpcResponse::new(v1::ListSchedulesResponse { schedules }))
    }

    async fn pause_schedule(
        &self,
        request: GrpcRequest<v1::PauseScheduleRequest>,
    ) -> Result<GrpcResponse<v1::Schedule>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        match self
            .propose_pause(&who, &original.schedule_id, &original.note, true)
            .await?
        {
            Some(channel) => {
                self.api
                    .forward(
                        self.client(channel)
                            .pause_schedule(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
            None => self
                .read(&who, &original.schedule_id, Permission::FleetRead)
                .map(GrpcResponse::new),
        }
    }

    async fn resume_schedule(
        &self,
        request: GrpcRequest<v1::ResumeScheduleRequest>,
    ) -> Result<GrpcResponse<v1::Schedule>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        match self
            .propose_pause(&who, &original.schedule_id, &original.note, false)
            .await?
        {
            Some(channel) => {
                self.api
                    .forward(
                        self.client(channel)
                            .resume_schedule(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
            None => self
                .read(&who, &original.schedule_id, Permission::FleetRead)
                .map(GrpcResponse::new),
        }
    }

    async fn delete_schedule(
        &self,
        request: GrpcRequest<v1::DeleteScheduleRequest>,
    ) -> Result<GrpcResponse<v1::DeleteScheduleResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        self.project_of(&who, &original.schedule_id, Permission::ProjectSettings)?;
        let command = Command::DeleteSchedule {
            schedule_id: original.schedule_id.clone(),
        };
        match self.api.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.api
                    .forward(
                        self.client(channel)
                            .delete_schedule(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
            Proposal::Applied(Response::ScheduleDeleted { existed }) => {
                info!(schedule.id = %original.schedule_id, existed, "schedule deleted");
                Ok(GrpcResponse::new(v1::DeleteScheduleResponse { existed }))
            }
            Proposal::Applied(other) => Err(unexpected(other)),
        }
    }

    async fn trigger_schedule(
        &self,
        request: GrpcRequest<v1::TriggerScheduleRequest>,
    ) -> Result<GrpcResponse<v1::TriggerScheduleResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let mut original = request.into_inner();
        if original.trigger_id.is_empty() {
            original.trigger_id = random_hex_id("a trigger id")?;
        }
        if !plan::is_valid_trigger_id(&original.trigger_id) {
            return Err(invalid(FieldError::new(
                "trigger_id",
                format!(
                    "must be 1-{} bytes of [A-Za-z0-9._:-]",
                    plan::MAX_TRIGGER_ID_BYTES
                ),
            )));
        }
        let overlap = match overlap_from_wire(original.overlap()) {
            None => OverlapPolicy::AllowAll,
            Some(OverlapPolicy::BufferOne | OverlapPolicy::BufferAll) => {
                return Err(invalid(FieldError::new(
                    "overlap",
                    "a trigger takes OVERLAP_POLICY_SKIP, _CANCEL_OTHER or _ALLOW_ALL",
                )));
            }
            Some(overlap) => overlap,
        };
        let schedule = self.read(&who, &original.schedule_id, Permission::FleetRead)?;
        who.require(Permission::FleetSubmit, &project_of_schedule(&schedule))?;
        let command = Command::TriggerSchedule {
            schedule_id: original.schedule_id.clone(),
            trigger_id: original.trigger_id.clone(),
            overlap,
            max_events: self.api.limits.max_events_per_fleet,
        };
        match self.api.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.api
                    .forward(
                        self.client(channel)
                            .trigger_schedule(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
            Proposal::Applied(Response::ScheduleTriggered { fleet_id, created }) => {
                info!(schedule.id = %original.schedule_id, trigger.id = %original.trigger_id,
                      fleet.id = %fleet_id, created, "schedule triggered");
                Ok(GrpcResponse::new(v1::TriggerScheduleResponse {
                    fleet_id,
                    created,
                    trigger_id: original.trigger_id,
                }))
            }
            Proposal::Applied(Response::IdempotencyKeyConflict { fleet_id }) => {
                Err(Status::already_exists(format!(
                    "trigger_id: {} started {fleet_id} from an earlier spec of the schedule",
                    original.trigger_id
                )))
            }
            Proposal::Applied(Response::Rejected { reason }) => Err(refused(reason)),
            Proposal::Applied(Response::QueueFull { reason }) => {
                Err(Status::resource_exhausted(reason))
            }
            Proposal::Applied(other) => Err(unexpected(other)),
        }
    }

    async fn backfill_schedule(
        &self,
        request: GrpcRequest<v1::BackfillScheduleRequest>,
    ) -> Result<GrpcResponse<v1::BackfillScheduleResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        if original.to_ms < original.from_ms {
            return Err(invalid(FieldError::new("to_ms", "before from_ms")));
        }
        let schedule = self.read(&who, &original.schedule_id, Permission::FleetRead)?;
        who.require(Permission::FleetSubmit, &project_of_schedule(&schedule))?;
        let overlap = match overlap_from_wire(original.overlap()) {
            Some(overlap) => overlap,
            None => overlap_from_wire(
                schedule
                    .spec
                    .as_ref()
                    .and_then(|spec| spec.policy.as_ref())
                    .map_or(v1::OverlapPolicy::Skip, |policy| policy.overlap()),
            )
            .unwrap_or_default(),
        };
        let command = Command::BackfillSchedule {
            schedule_id: original.schedule_id.clone(),
            from_ms: original.from_ms,
            to_ms: original.to_ms,
            overlap,
            max_events: self.api.limits.max_events_per_fleet,
        };
        match self.api.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.api
                    .forward(
                        self.client(channel)
                            .backfill_schedule(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
            Proposal::Applied(Response::ScheduleBackfilled {
                started,
                buffered,
                skipped,
            }) => {
                info!(schedule.id = %original.schedule_id, started = started.len(), buffered,
                      skipped, "schedule backfilled");
                let schedule = self.read(&who, &original.schedule_id, Permission::FleetRead)?;
                Ok(GrpcResponse::new(v1::BackfillScheduleResponse {
                    started_fleet_ids: started,
                    buffered,
                    skipped,
                    schedule: Some(schedule),
                }))
            }
            Proposal::Applied(Response::Rejected { reason }) => Err(refused(reason)),
            Proposal::Applied(other) => Err(unexpected(other)),
        }
    }

    async fn preview_schedule(
        &self,
        request: GrpcRequest<v1::PreviewScheduleRequest>,
    ) -> Result<GrpcResponse<v1::PreviewScheduleResponse>, Status> {
        let who = caller(&request)?;
        let original = request.into_inner();
        let count = convert::page_size(
            original.count,
            DEFAULT_PREVIEW_COUNT,
            flotilla_scheduler::schedule::calendar::MAX_PREVIEW_COUNT,
        )
        .map_err(|error| invalid(FieldError::new("count", error.message)))?;
        // Previews read this node's state: a follower's view may lag the leader's by the
        // replication delay, which moves no nominal time (they depend on the spec only).
        let spec = if original.schedule_id.is_empty() {
            let spec = self.spec_from_wire(original.spec)?;
            who.require(Permission::FleetRead, &spec.fleet.project)?;
            std::sync::Arc::new(spec)
        } else {
            self.api
                .node
                .state
                .read(|state| {
                    state
                        .schedule(&original.schedule_id)
                        .filter(|schedule| {
                            who.may(Permission::FleetRead, &schedule.spec.fleet.project)
                        })
                        .map(|schedule| std::sync::Arc::clone(&schedule.spec))
                })
                .ok_or_else(|| Status::not_found(format!("no schedule {}", original.schedule_id)))?
        };
        let id = spec.id();
        let calendar = Calendar::compile(&spec.calendar, "spec.calendar").map_err(invalid)?;
        let after_ms = match original.after_ms {
            0 => self.api.node.state.read(|state| state.now_ms()),
            after_ms => after_ms,
        };
        let occurrences = calendar
            .preview(after_ms, count)
            .into_iter()
            .map(|occurrence| v1::ScheduleOccurrence {
                nominal_ms: occurrence.nominal_ms,
                start_ms: occurrence.nominal_ms
                    + jitter_ms(&id, occurrence.nominal_ms, spec.policy.max_jitter_ms),
                local_time: occurrence.local_time,
                note: occurrence_note_name(occurrence.note).into(),
            })
            .collect();
        Ok(GrpcResponse::new(v1::PreviewScheduleResponse {
            occurrences,
        }))
    }
}
