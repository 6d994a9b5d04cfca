//! Flow control of fleets on `FleetService`: pause, resume, approve, rerun of a subset, and
//! the dry-run preview of a submission. The decisions are the state machine's
//! ([`flotilla_scheduler::control`]); this checks requests and permissions and proposes.

use flotilla_proto::v1;
use flotilla_scheduler::control::FleetPreview;
use flotilla_scheduler::flow::MAX_NOTE_BYTES;
use flotilla_scheduler::rerun::{MAX_RERUN_OUTCOMES, is_selectable_outcome, select_runs};
use flotilla_scheduler::{Command, FieldError, FleetSpec, Permission, Response};
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use tracing::info;

use super::auth::{Caller, authorization, caller, forwarded};
use super::{Api, MAX_IDEMPOTENCY_KEY_BYTES, Proposal, invalid, validate_fleet_id};
use crate::convert;

/// Runs a preview lists (its `run_count` counts all).
pub const MAX_PREVIEW_RUNS: usize = 1_000;

/// Which flow change a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowRequest {
    /// `PauseFleet`.
    Pause,
    /// `ResumeFleet`.
    Resume,
    /// `ApproveFleet`.
    Approve,
}

impl Api {
    /// PERMISSION_DENIED unless `who` may control fleet `fleet_id` as it may cancel it: the
    /// submitter with `fleet.cancel`, anyone else with `fleet.cancel_any`, in its project.
    pub(super) fn require_control(&self, who: &Caller, fleet_id: &str) -> Result<(), Status> {
        let owner = self.node.state.read(|state| {
            state
                .fleet(fleet_id)
                .map(|f| (f.spec.project.clone(), f.submitted_by.clone()))
        });
        if let Some((project, submitted_by)) = owner {
            who.require(Permission::FleetCancel, &project)?;
            if submitted_by.accessor_id() != Some(who.token.accessor_id.as_str()) {
                who.require(Permission::FleetCancelAny, &project)?;
            }
        }
        Ok(())
    }

    /// `PauseFleet`, `ResumeFleet`, `ApproveFleet`.
    pub(super) async fn change_flow(
        &self,
        request: GrpcRequest<v1::FleetFlowRequest>,
        action: FlowRequest,
    ) -> Result<GrpcResponse<v1::FleetFlowResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        validate_fleet_id(&original.fleet_id)?;
        if original.note.len() > MAX_NOTE_BYTES {
            return Err(invalid(FieldError::new(
                "note",
                format!("longer than {MAX_NOTE_BYTES} bytes"),
            )));
        }
        self.require_control(&who, &original.fleet_id)?;
        let (fleet_id, note) = (original.fleet_id.clone(), original.note.clone());
        let command = match action {
            FlowRequest::Pause => Command::PauseFleet { fleet_id, note },
            FlowRequest::Resume => Command::ResumeFleet { fleet_id, note },
            FlowRequest::Approve => Command::ApproveFleet { fleet_id, note },
        };
        match self.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                let mut client = self.fleet_client(channel);
                let request = forwarded(original, &auth);
                let call = async move {
                    match action {
                        FlowRequest::Pause => client.pause_fleet(request).await,
                        FlowRequest::Resume => client.resume_fleet(request).await,
                        FlowRequest::Approve => client.approve_fleet(request).await,
                    }
                };
                self.forward(call, 0).await
            }
            Proposal::Applied(Response::FleetFlowChanged { changed, message }) => {
                info!(fleet.id = %original.fleet_id, ?action, changed, %message, "fleet flow");
                let fleet =
                    self.fleet_or_not_found(&original.fleet_id, convert::FleetView::Summary)?;
                Ok(GrpcResponse::new(v1::FleetFlowResponse {
                    fleet: Some(fleet),
                    changed,
                    message,
                }))
            }
            Proposal::Applied(Response::Rejected { reason }) if reason.starts_with("no fleet") => {
                Err(Status::not_found(format!("fleet_id: {reason}")))
            }
            Proposal::Applied(Response::Rejected { reason }) => {
                Err(Status::failed_precondition(reason))
            }
            Proposal::Applied(other) => {
                Err(Status::internal(format!("unexpected response {other:?}")))
            }
        }
    }

    /// The preview of a validated spec (a dry run).
    pub(super) fn preview(&self, spec: &FleetSpec) -> v1::FleetPreview {
        let preview: FleetPreview = self.node.state.read(|state| state.preview_fleet(spec));
        v1::FleetPreview {
            run_count: preview.runs.len() as u32,
            runs: preview
                .runs
                .into_iter()
                .take(MAX_PREVIEW_RUNS)
                .enumerate()
                .map(|(index, (repository, branch))| v1::RunSummary {
                    id: format!("{}-{index}", preview.fleet_id),
                    repository,
                    branch,
                    state: v1::RunState::Pending as i32,
                    ..v1::RunSummary::default()
                })
                .collect(),
            wave_ends: preview.wave_ends,
            limits: preview.limits,
            queue_full: preview.queue_full,
        }
    }

    /// `RerunFleet`.
    pub(super) async fn rerun(
        &self,
        request: GrpcRequest<v1::RerunFleetRequest>,
    ) -> Result<GrpcResponse<v1::SubmitFleetResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        validate_fleet_id(&original.fleet_id)?;
        if original.outcomes.is_empty() || original.outcomes.len() > MAX_RERUN_OUTCOMES {
            return Err(invalid(FieldError::new(
                "outcomes",
                format!("must list 1-{MAX_RERUN_OUTCOMES} outcomes"),
            )));
        }
        for (index, outcome) in original.outcomes.iter().enumerate() {
            if !is_selectable_outcome(outcome) {
                return Err(invalid(FieldError::new(
                    format!("outcomes[{index}]"),
                    format!(
                        "{outcome:?} is not an outcome (agent_failed, verify_failed, timed_out, \
                         infrastructure, lease_expired, cancelled, changed, unchanged, failed)"
                    ),
                )));
            }
        }
        if original.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(invalid(FieldError::new(
                "idempotency_key",
                format!("longer than {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
            )));
        }
        let pattern = if original.repository_pattern.is_empty() {
            None
        } else {
            Some(
                glob::Pattern::new(&original.repository_pattern).map_err(|error| {
                    invalid(FieldError::new("repository_pattern", error.to_string()))
                })?,
            )
        };
        if let Some(leader) = self.read_barrier().await? {
            return self
                .forward(
                    self.fleet_client(leader)
                        .rerun_fleet(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        let selected = self.node.state.read(|state| {
            state.fleet(&original.fleet_id).map(|fleet| {
                let indexes = select_runs(fleet, &original.outcomes, pattern.as_ref());
                let mut spec = (*fleet.spec).clone();
                spec.repositories = indexes
                    .iter()
                    .map(|i| fleet.runs[*i as usize].repository.clone())
                    .collect();
                (indexes, spec)
            })
        });
        let Some((run_indexes, spec)) = selected else {
            return Err(Status::not_found(format!(
                "fleet_id: no fleet {}",
                original.fleet_id
            )));
        };
        who.require(Permission::FleetRead, &spec.project)?;
        who.require(Permission::FleetSubmit, &spec.project)?;
        if run_indexes.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no finished run of {} has outcome {}{}",
                original.fleet_id,
                original.outcomes.join(", "),
                if original.repository_pattern.is_empty() {
                    String::new()
                } else {
                    format!(
                        " and a repository matching {:?}",
                        original.repository_pattern
                    )
                }
            )));
        }
        // The limits and policy of now, not of the first submission.
        spec.validate("spec", &self.spec_limits).map_err(invalid)?;
        self.policy
            .check(&spec, "spec")
            .map_err(|error| Status::permission_denied(error.to_string()))?;
        if original.dry_run {
            return Ok(GrpcResponse::new(v1::SubmitFleetResponse {
                fleet: None,
                created: false,
                preview: Some(self.preview(&spec)),
            }));
        }
        let command = Command::RerunFleet {
            origin_fleet_id: original.fleet_id.clone(),
            run_indexes,
            spec,
            idempotency_key: original.idempotency_key.clone(),
            trace_parent: String::new(),
            max_events: self.limits.max_events_per_fleet,
        };
        match self.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.forward(
                    self.fleet_client(channel)
                        .rerun_fleet(forwarded(original, &auth)),
                    0,
                )
                .await
            }
            Proposal::Applied(Response::FleetSubmitted { fleet_id, created }) => {
                info!(fleet.id = %fleet_id, origin = %original.fleet_id, created, "fleet re-run");
                let fleet = self.fleet_or_not_found(&fleet_id, convert::FleetView::Detail)?;
                Ok(GrpcResponse::new(v1::SubmitFleetResponse {
                    fleet: Some(fleet),
                    created,
                    preview: None,
                }))
            }
            Proposal::Applied(Response::IdempotencyKeyConflict { fleet_id }) => {
                Err(Status::already_exists(format!(
                    "idempotency_key: already used by fleet {fleet_id} with a different spec"
                )))
            }
            Proposal::Applied(Response::Rejected { reason }) => {
                Err(Status::failed_precondition(reason))
            }
            Proposal::Applied(Response::QueueFull { reason }) => {
                Err(Status::resource_exhausted(reason))
            }
            Proposal::Applied(other) => {
                Err(Status::internal(format!("unexpected response {other:?}")))
            }
        }
    }
}
