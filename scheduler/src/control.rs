//! A fleet's flow carried out on the state: waves started and promoted, gates, pauses, the
//! failure budget and the deadline. The decisions are [`crate::wave`]'s; this module applies
//! them to a [`Fleet`] and records each as an event.
//!
//! Invariants (checked in `State::check_invariants`): no running run is outside the current
//! wave; the wave index is within the fleet's waves; a fleet waits at a gate only for the
//! wave after the current one (or wave 0 before its first lease); a soak and a gate are never
//! pending together.

use crate::command::Response;
use crate::flow::{Decision, Gate, MAX_NOTE_BYTES, Pause};
use crate::state::{
    Fleet, FleetState, RunState, State, finish_if_done, parse_fleet_id, push_event, set_run_state,
};
use crate::token::Principal;
use crate::wave::{self, WaveDecision, WaveResult};

/// Sets up a new fleet's flow at submission: its waves, its deadline, its first gate.
pub(crate) fn start_flow(fleet: &mut Fleet, now_ms: u64) {
    let flow = &fleet.spec.flow;
    let run_count = fleet.runs.len() as u32;
    fleet.flow.wave_ends = wave::resolve_waves(&flow.waves, run_count);
    if flow.deadline_ms > 0 {
        fleet.flow.deadline_at_ms = now_ms.saturating_add(flow.deadline_ms);
    }
    if fleet.flow.wave_ends.len() > 1 {
        let ends: Vec<String> = fleet.flow.wave_ends.iter().map(u32::to_string).collect();
        push_event(
            fleet,
            now_ms,
            None,
            format!(
                "rolling out in {} waves, ending at runs {}",
                fleet.flow.wave_ends.len(),
                ends.join(", ")
            ),
        );
    }
    if fleet.spec.flow.require_approval && run_count > 0 {
        let reason = "require_approval: waiting for approval before the first lease".to_string();
        fleet.flow.gate = Some(Gate {
            at_ms: now_ms,
            wave: 0,
            reason: reason.clone(),
        });
        push_event(fleet, now_ms, None, reason);
    }
}

/// After run `index` changed state: counts a failure or a success for the failure budget,
/// pauses the fleet when the budget is exceeded, and decides the wave once its runs are all
/// terminal.
pub(crate) fn after_run_change(fleet: &mut Fleet, index: u32, now_ms: u64) {
    match fleet.runs[index as usize].state {
        RunState::Failed => {
            fleet.flow.failures += 1;
            fleet.flow.consecutive_failures += 1;
            if fleet.flow.pause.is_none()
                && let Some(reason) = wave::budget_exceeded(
                    &fleet.spec.flow,
                    fleet.flow.failures,
                    fleet.flow.consecutive_failures,
                )
            {
                fleet.flow.pause = Some(Pause {
                    at_ms: now_ms,
                    by: Principal::Unknown,
                    automatic: true,
                    reason: reason.clone(),
                });
                push_event(fleet, now_ms, None, format!("fleet paused: {reason}"));
            }
        }
        RunState::Changed | RunState::Unchanged => fleet.flow.consecutive_failures = 0,
        _ => {}
    }
    decide_wave_if_done(fleet, now_ms);
}

/// Once every run of the current wave is terminal, carries out [`wave::decide_wave`].
fn decide_wave_if_done(fleet: &mut Fleet, now_ms: u64) {
    let flow = &fleet.flow;
    let wave_count = flow.wave_ends.len() as u32;
    if wave_count <= 1 || flow.promote_at_ms != 0 || flow.gate.is_some() {
        return;
    }
    let run_count = fleet.runs.len() as u32;
    let end = flow.wave_end(run_count);
    if fleet.counts.running > 0 || fleet.pending.range(..end).next().is_some() {
        return;
    }
    let start = match flow.wave {
        0 => 0,
        wave => flow.wave_ends[wave as usize - 1],
    };
    let succeeded = (start..end)
        .filter(|i| {
            matches!(
                fleet.runs[*i as usize].state,
                RunState::Changed | RunState::Unchanged
            )
        })
        .count() as u32;
    let result = WaveResult {
        wave: flow.wave,
        wave_count,
        runs: end - start,
        succeeded,
    };
    match wave::decide_wave(&fleet.spec.flow, result, now_ms) {
        WaveDecision::Last => {}
        WaveDecision::Promote => promote(fleet, now_ms),
        WaveDecision::PromoteAt(at_ms) => {
            fleet.flow.promote_at_ms = at_ms;
            let message = format!(
                "wave {} of {wave_count} succeeded ({succeeded} of {} runs); the next starts at {at_ms} after soak_ms",
                result.wave + 1,
                result.runs
            );
            push_event(fleet, now_ms, None, message);
        }
        WaveDecision::Gate(reason) => {
            fleet.flow.gate = Some(Gate {
                at_ms: now_ms,
                wave: result.wave + 1,
                reason: reason.clone(),
            });
            push_event(
                fleet,
                now_ms,
                None,
                format!("waiting for approval: {reason}"),
            );
        }
    }
}

/// Starts the next wave.
fn promote(fleet: &mut Fleet, now_ms: u64) {
    let flow = &mut fleet.flow;
    let start = flow.wave_end(fleet.runs.len() as u32);
    flow.wave += 1;
    flow.promote_at_ms = 0;
    let end = flow.wave_end(fleet.runs.len() as u32);
    let message = format!(
        "wave {} of {} started: runs {start}-{}",
        flow.wave + 1,
        flow.wave_ends.len(),
        end.saturating_sub(1)
    );
    push_event(fleet, now_ms, None, message);
}

/// Cancels pending run `index` with `reason` (a deadline, a `skip` limit).
pub(crate) fn cancel_pending_run(fleet: &mut Fleet, index: u32, now_ms: u64, reason: &str) {
    debug_assert_eq!(fleet.runs[index as usize].state, RunState::Pending);
    set_run_state(fleet, index, RunState::Cancelled);
    push_event(fleet, now_ms, Some(index), reason.to_string());
    after_run_change(fleet, index, now_ms);
    finish_if_done(fleet, now_ms);
}

/// Which flow change a person asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FlowAction {
    Pause,
    Resume,
    Approve,
}

impl State {
    /// `PauseFleet`, `ResumeFleet`, `ApproveFleet`: idempotent; a fleet that is not running
    /// is refused.
    pub(crate) fn change_flow(
        &mut self,
        now_ms: u64,
        fleet_id: &str,
        action: FlowAction,
        note: &str,
        principal: &Principal,
    ) -> Response {
        if note.len() > MAX_NOTE_BYTES {
            return Response::Rejected {
                reason: format!("note: longer than {MAX_NOTE_BYTES} bytes"),
            };
        }
        let Some(fleet) = parse_fleet_id(fleet_id).and_then(|n| self.fleets.get_mut(&n)) else {
            return Response::Rejected {
                reason: format!("no fleet {fleet_id}"),
            };
        };
        if fleet.state != FleetState::Running {
            return Response::Rejected {
                reason: format!("fleet {fleet_id} is {:?}, not running", fleet.state)
                    .to_lowercase(),
            };
        }
        let who = principal.describe();
        let message = match action {
            FlowAction::Pause if fleet.flow.pause.is_some() => None,
            FlowAction::Pause => {
                let reason = if note.is_empty() {
                    format!("paused by {who}")
                } else {
                    format!("paused by {who}: {note}")
                };
                fleet.flow.pause = Some(Pause {
                    at_ms: now_ms,
                    by: principal.clone(),
                    automatic: false,
                    reason: reason.clone(),
                });
                Some(format!("fleet {reason}"))
            }
            FlowAction::Resume => fleet.flow.pause.take().map(|pause| {
                fleet.flow.failures = 0;
                fleet.flow.consecutive_failures = 0;
                format!(
                    "fleet resumed by {who} (was: {}){}",
                    pause.reason,
                    suffix(note)
                )
            }),
            FlowAction::Approve => fleet.flow.gate.take().map(|gate| {
                let message = format!("approved by {who} ({}){}", gate.reason, suffix(note));
                if gate.wave > fleet.flow.wave {
                    fleet.flow.wave = gate.wave - 1;
                    promote(fleet, now_ms);
                }
                message
            }),
        };
        let changed = message.is_some();
        let message = match message {
            Some(message) => {
                fleet.flow.record(Decision {
                    at_ms: now_ms,
                    action: format!("{action:?}").to_lowercase(),
                    by: principal.clone(),
                    note: note.to_string(),
                });
                push_event(fleet, now_ms, None, message.clone());
                message
            }
            None => format!(
                "fleet {fleet_id}: nothing to {}",
                format!("{action:?}").to_lowercase()
            ),
        };
        Response::FleetFlowChanged { changed, message }
    }

    /// `AdvanceFleets`: starts the waves whose soak ended and cancels the pending runs of
    /// fleets past their deadline, at `now_ms`.
    pub(crate) fn advance_fleets(&mut self, now_ms: u64) -> Response {
        let mut count = 0;
        let active: Vec<u64> = self.active_fleets.iter().copied().collect();
        for number in active {
            let Some(fleet) = self.fleets.get_mut(&number) else {
                continue;
            };
            if !is_due(fleet, now_ms) {
                continue;
            }
            count += 1;
            if fleet.flow.promote_at_ms != 0 && fleet.flow.promote_at_ms <= now_ms {
                promote(fleet, now_ms);
            }
            if fleet.flow.deadline_at_ms != 0
                && fleet.flow.deadline_at_ms <= now_ms
                && !fleet.flow.deadline_passed
            {
                fleet.flow.deadline_passed = true;
                push_event(
                    fleet,
                    now_ms,
                    None,
                    "the fleet's deadline passed".to_string(),
                );
                let pending: Vec<u32> = fleet.pending.iter().copied().collect();
                for index in pending {
                    cancel_pending_run(
                        fleet,
                        index,
                        now_ms,
                        "cancelled: the fleet's deadline passed before it was leased",
                    );
                }
            }
            if fleet.state != FleetState::Running {
                self.active_fleets.remove(&number);
            }
        }
        Response::FleetsAdvanced { count }
    }

    /// Whether some running fleet has a soak that ended or a deadline that passed by
    /// `now_ms` (the engine then proposes `AdvanceFleets`).
    pub fn has_due_fleet_transitions(&self, now_ms: u64) -> bool {
        self.active_fleets
            .iter()
            .filter_map(|number| self.fleets.get(number))
            .any(|fleet| is_due(fleet, now_ms))
    }
}

fn is_due(fleet: &Fleet, now_ms: u64) -> bool {
    let flow = &fleet.flow;
    (flow.promote_at_ms != 0 && flow.promote_at_ms <= now_ms)
        || (flow.deadline_at_ms != 0 && flow.deadline_at_ms <= now_ms && !flow.deadline_passed)
}

fn suffix(note: &str) -> String {
    if note.is_empty() {
        String::new()
    } else {
        format!(": {note}")
    }
}

/// Checks a fleet's flow invariants (module documentation).
///
/// # Errors
/// The first violated one.
pub(crate) fn check_flow(fleet: &Fleet) -> Result<(), String> {
    let flow = &fleet.flow;
    let run_count = fleet.runs.len() as u32;
    if !flow.wave_ends.is_empty() {
        if flow.wave as usize >= flow.wave_ends.len() {
            return Err(format!("fleet {} is past its last wave", fleet.number));
        }
        if flow.wave_ends.last() != Some(&run_count)
            || flow.wave_ends.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(format!(
                "fleet {} wave ends {:?}",
                fleet.number, flow.wave_ends
            ));
        }
    }
    let end = flow.wave_end(run_count);
    if fleet
        .runs
        .iter()
        .skip(end as usize)
        .any(|run| run.state == RunState::Running)
    {
        return Err(format!("fleet {} runs outside its wave", fleet.number));
    }
    if let Some(gate) = &flow.gate
        && gate.wave != flow.wave + 1
        && !(gate.wave == 0 && flow.wave == 0)
    {
        return Err(format!(
            "fleet {} gate for wave {}",
            fleet.number, gate.wave
        ));
    }
    if flow.gate.is_some() && flow.promote_at_ms != 0 {
        return Err(format!("fleet {} soaks and waits at a gate", fleet.number));
    }
    Ok(())
}

/// What submitting `spec` now would create ([`State::preview_fleet`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetPreview {
    /// The id the fleet would get if it were the next submission.
    pub fleet_id: String,
    /// Each run's repository and branch, in order.
    pub runs: Vec<(String, String)>,
    /// The cumulative run count at the end of each wave.
    pub wave_ends: Vec<u32>,
    /// The limits that would apply to its runs, as `name: description`.
    pub limits: Vec<String>,
    /// Why a bounded queue would refuse it now ([`crate::Response::QueueFull`]); empty: the
    /// queues have room for it.
    pub queue_full: String,
}

impl State {
    /// What submitting the validated `spec` now would create, changing nothing: the same
    /// branch rendering and wave resolution as a submission, and the limits of its project.
    pub fn preview_fleet(&self, spec: &crate::spec::FleetSpec) -> FleetPreview {
        let fleet_id = crate::state::fleet_id(self.next_fleet_number().max(1));
        let runs = spec
            .repositories
            .iter()
            .map(|repository| {
                let branch = crate::spec::render_branch(
                    &spec.branch_template,
                    &spec.name,
                    &fleet_id,
                    &crate::spec::repository_name(repository),
                );
                (repository.clone(), branch)
            })
            .collect();
        let queue_full = match self.check_queues(&spec.project, &fleet_id, &spec.repositories) {
            Err(crate::command::Response::QueueFull { reason }) => reason,
            _ => String::new(),
        };
        FleetPreview {
            queue_full,
            fleet_id,
            runs,
            wave_ends: wave::resolve_waves(&spec.flow.waves, spec.repositories.len() as u32),
            limits: self.limits_applying_to(&spec.project),
        }
    }

    /// The limits that apply to runs of `project`, as `name: description`.
    pub fn limits_applying_to(&self, project: &str) -> Vec<String> {
        self.limits()
            .filter(|limit| limit.spec.applies_to(project))
            .map(|limit| format!("{}: {}", limit.spec.name, limit.spec.describe()))
            .collect()
    }
}
