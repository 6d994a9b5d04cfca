//! Re-running part of a fleet: which runs a rerun repeats (pure, used by the node to build
//! the `RerunFleet` command and by `--dry-run`), and the command on the state, which checks
//! that every listed run is terminal and names the repository the new spec lists for it.
//!
//! The new fleet is an ordinary fleet (its own id, idempotency key, waves and limits) that
//! records its origin (`flow.origin_fleet_id`), so a roll-up can show both.

use crate::command::{Outcome, Response};
use crate::spec::FleetSpec;
use crate::state::{Fleet, Run, RunState, State, parse_fleet_id};
use crate::token::Principal;

/// Most outcome names one rerun selects by.
pub const MAX_RERUN_OUTCOMES: usize = 16;

/// The name a rerun selects a terminal run by: its last attempt's outcome
/// ([`Outcome::as_str`]), or `cancelled` for a run cancelled before any attempt.
pub fn run_outcome(run: &Run) -> Option<&'static str> {
    if !run.state.is_terminal() {
        return None;
    }
    Some(match (run.state, run.last_result()) {
        (RunState::Cancelled, _) => Outcome::Cancelled.as_str(),
        (_, Some(result)) => result.outcome.as_str(),
        (state, None) => match state {
            RunState::Changed => Outcome::Changed.as_str(),
            RunState::Unchanged => Outcome::Unchanged.as_str(),
            _ => Outcome::Cancelled.as_str(),
        },
    })
}

/// Whether `name` is something a rerun can select by: an outcome name, or `failed` (every
/// run that ended failed, whatever the outcome).
pub fn is_selectable_outcome(name: &str) -> bool {
    name == "failed" || Outcome::parse(name).is_some()
}

/// The indices of `fleet`'s terminal runs whose outcome is in `outcomes` (`failed`: every
/// failed run) and whose repository URL matches `repository` (a glob; `None`: all), in run
/// order.
pub fn select_runs(
    fleet: &Fleet,
    outcomes: &[String],
    repository: Option<&glob::Pattern>,
) -> Vec<u32> {
    fleet
        .runs
        .iter()
        .filter(|run| {
            let Some(outcome) = run_outcome(run) else {
                return false;
            };
            let by_outcome = outcomes
                .iter()
                .any(|o| o == outcome || (o == "failed" && run.state == RunState::Failed));
            by_outcome && repository.is_none_or(|p| p.matches(&run.repository))
        })
        .map(|run| run.index)
        .collect()
}

impl State {
    /// `RerunFleet` (see [`crate::command::Command::RerunFleet`]).
    pub(crate) fn rerun_fleet(
        &mut self,
        now_ms: u64,
        origin_fleet_id: &str,
        run_indexes: &[u32],
        spec: &FleetSpec,
        (idempotency_key, trace_parent, max_events): (&str, &str, u32),
        principal: &Principal,
    ) -> Response {
        let Some(origin) = parse_fleet_id(origin_fleet_id).and_then(|n| self.fleets.get(&n)) else {
            return Response::Rejected {
                reason: format!("no fleet {origin_fleet_id}"),
            };
        };
        if run_indexes.len() != spec.repositories.len() {
            return Response::Rejected {
                reason: "run_indexes: one per repository of the spec".into(),
            };
        }
        for (index, repository) in run_indexes.iter().zip(&spec.repositories) {
            let Some(run) = origin.runs.get(*index as usize) else {
                return Response::Rejected {
                    reason: format!("run_indexes: {origin_fleet_id} has no run {index}"),
                };
            };
            if !run.state.is_terminal() {
                return Response::Rejected {
                    reason: format!("run {origin_fleet_id}-{index} is not finished"),
                };
            }
            if run.repository != *repository {
                return Response::Rejected {
                    reason: format!(
                        "spec.repositories: run {origin_fleet_id}-{index} is {}, not {repository}",
                        run.repository
                    ),
                };
            }
        }
        let response = self.submit_fleet(
            now_ms,
            spec,
            idempotency_key,
            trace_parent,
            max_events,
            principal,
        );
        if let Response::FleetSubmitted {
            fleet_id,
            created: true,
        } = &response
            && let Some(fleet) = parse_fleet_id(fleet_id).and_then(|n| self.fleets.get_mut(&n))
        {
            fleet.flow.origin_fleet_id = origin_fleet_id.to_string();
            let message = format!("re-runs {} runs of {origin_fleet_id}", run_indexes.len());
            crate::state::push_event(fleet, now_ms, None, message);
        }
        response
    }
}
