//! The schedule commands applied to [`State`]: each carries out pure decisions
//! ([`super::plan`]) with the state's own fleet operations, at the command's replicated time.

use std::sync::Arc;

use super::calendar::Calendar;
use super::plan::{self, Decision, FleetView, SkipReason};
use super::record::{
    MAX_NOTE_BYTES, MAX_RUNNING_FLEETS_PER_SCHEDULE, Pause, Schedule, ScheduleSpec, TickOutcome,
};
use crate::command::Response;
use crate::state::{FleetState, State, fleet_id};
use crate::token::Principal;

fn rejected(reason: impl Into<String>) -> Response {
    Response::Rejected {
        reason: reason.into(),
    }
}

fn skip_reason_name(reason: SkipReason) -> &'static str {
    match reason {
        SkipReason::Overlap => "overlap: a fleet of the schedule is running",
        SkipReason::BufferFull => "buffer_full",
        SkipReason::NoRemainingActions => "no_remaining_actions",
        SkipReason::CatchUpWindow => "catch_up_window",
    }
}

/// The calendar of a stored spec. Specs are validated before they are proposed, and the
/// calendar rules are the same on every replica of one build; a spec that no longer compiles
/// (a later build refusing it) leaves its schedule idle rather than failing the apply.
fn calendar_of(spec: &ScheduleSpec) -> Option<Calendar> {
    Calendar::compile(&spec.calendar, "spec.calendar").ok()
}

impl State {
    /// The schedule `id`, if there is one.
    pub fn schedule(&self, id: &str) -> Option<&Schedule> {
        self.schedules.get(id)
    }

    /// Every schedule, by id.
    pub fn schedules(&self) -> impl Iterator<Item = &Schedule> {
        self.schedules.values()
    }

    /// Ids of the schedules the leader should process at `now_ms`: not paused, and either
    /// their next nominal time is due or they hold a buffered one and no fleet of theirs runs.
    /// Walks every schedule (at most the operator's `limits.max_schedules`) and each one's
    /// running fleets (at most [`MAX_RUNNING_FLEETS_PER_SCHEDULE`]).
    pub fn due_schedules(&self, now_ms: u64) -> Vec<String> {
        self.schedules
            .values()
            .filter(|schedule| schedule.paused.is_none())
            .filter(|schedule| {
                schedule.next_due_ms.is_some_and(|due_ms| due_ms <= now_ms)
                    || (!schedule.progress.buffered.is_empty()
                        && !self.schedule_has_running_fleet(schedule))
            })
            .map(|schedule| schedule.id.clone())
            .collect()
    }

    fn schedule_has_running_fleet(&self, schedule: &Schedule) -> bool {
        schedule.fleets.iter().any(|number| {
            self.fleet(&fleet_id(*number))
                .is_some_and(|fleet| fleet.state == FleetState::Running)
        })
    }

    pub(crate) fn create_schedule(
        &mut self,
        now_ms: u64,
        spec: &ScheduleSpec,
        max_schedules: u32,
    ) -> Response {
        let id = spec.id();
        // The fleet's limits are the node's to enforce before proposing; here only the rules
        // that keep the state consistent (a name, a calendar that compiles, a bounded policy).
        let calendar = match spec.validate_schedule("spec") {
            Ok(calendar) => calendar,
            Err(error) => return rejected(error.to_string()),
        };
        if let Some(existing) = self.schedules.get(&id) {
            return if *existing.spec == *spec {
                Response::ScheduleCreated {
                    schedule_id: id,
                    created: false,
                }
            } else {
                rejected(format!("schedule {id} exists with another spec"))
            };
        }
        if self.schedules.len() >= max_schedules as usize {
            return rejected(format!(
                "the cluster holds {max_schedules} schedules already (limits.max_schedules)"
            ));
        }
        let mut schedule = Schedule {
            id: id.clone(),
            spec: Arc::new(spec.clone()),
            created_at_ms: now_ms,
            paused: None,
            progress: plan::ScheduleProgress {
                processed_until_ms: now_ms,
                ..plan::ScheduleProgress::default()
            },
            fleets: Vec::new(),
            history: Default::default(),
            history_dropped: 0,
            next_due_ms: None,
        };
        schedule.next_due_ms = calendar.next_after(now_ms).map(|nominal_ms| {
            nominal_ms + super::jitter_ms(&id, nominal_ms, spec.policy.max_jitter_ms)
        });
        self.schedules.insert(id.clone(), schedule);
        Response::ScheduleCreated {
            schedule_id: id,
            created: true,
        }
    }

    pub(crate) fn delete_schedule(&mut self, id: &str) -> Response {
        Response::ScheduleDeleted {
            existed: self.schedules.remove(id).is_some(),
        }
    }

    pub(crate) fn pause_schedule(
        &mut self,
        now_ms: u64,
        id: &str,
        note: &str,
        principal: &Principal,
    ) -> Response {
        if note.len() > MAX_NOTE_BYTES {
            return rejected(format!("note: longer than {MAX_NOTE_BYTES} bytes"));
        }
        let Some(schedule) = self.schedules.get_mut(id) else {
            return rejected(format!("no schedule {id}"));
        };
        schedule.paused = Some(Pause {
            at_ms: now_ms,
            by: principal.describe(),
            note: note.to_owned(),
        });
        schedule.record(
            now_ms,
            now_ms,
            TickOutcome::Paused {
                note: note.to_owned(),
            },
        );
        Response::SchedulePaused { paused: true }
    }

    pub(crate) fn resume_schedule(&mut self, now_ms: u64, id: &str, note: &str) -> Response {
        if note.len() > MAX_NOTE_BYTES {
            return rejected(format!("note: longer than {MAX_NOTE_BYTES} bytes"));
        }
        let Some(schedule) = self.schedules.get_mut(id) else {
            return rejected(format!("no schedule {id}"));
        };
        if schedule.paused.take().is_none() {
            return Response::SchedulePaused { paused: false };
        }
        // Nothing from the pause is started: progress resumes at the resume time.
        let progress = &mut schedule.progress;
        progress.processed_until_ms = progress.processed_until_ms.max(now_ms);
        schedule.next_due_ms = calendar_of(&schedule.spec).and_then(|calendar| {
            calendar
                .next_after(schedule.progress.processed_until_ms)
                .map(|nominal_ms| {
                    nominal_ms
                        + super::jitter_ms(id, nominal_ms, schedule.spec.policy.max_jitter_ms)
                })
        });
        schedule.record(
            now_ms,
            now_ms,
            TickOutcome::Resumed {
                note: note.to_owned(),
            },
        );
        Response::SchedulePaused { paused: false }
    }

    pub(crate) fn process_schedule(
        &mut self,
        now_ms: u64,
        id: &str,
        max_events: u32,
        principal: &Principal,
    ) -> Response {
        let Some(schedule) = self.schedules.get(id) else {
            return rejected(format!("no schedule {id}"));
        };
        if schedule.paused.is_some() {
            return rejected(format!("schedule {id} is paused"));
        }
        let Some(calendar) = calendar_of(&schedule.spec) else {
            // Idle it (the engine would otherwise propose it again on every tick).
            if let Some(schedule) = self.schedules.get_mut(id) {
                schedule.next_due_ms = None;
                schedule.record(
                    now_ms,
                    now_ms,
                    TickOutcome::Skipped {
                        reason: "the calendar no longer compiles; the schedule is idle".into(),
                    },
                );
            }
            return Response::ScheduleProcessed {
                started: Vec::new(),
            };
        };
        let views: Vec<(u64, FleetView)> = schedule
            .fleets
            .iter()
            .map(|number| {
                let view = match self.fleet(&fleet_id(*number)) {
                    Some(fleet) if fleet.state == FleetState::Running => FleetView::Running,
                    Some(fleet) => FleetView::Ended {
                        failed_runs: fleet.counts.failed,
                    },
                    // Compacted: long ended.
                    None => FleetView::Ended { failed_runs: 0 },
                };
                (*number, view)
            })
            .collect();
        let spec = Arc::clone(&schedule.spec);
        let planned = plan::plan(
            id,
            &calendar,
            &spec.policy,
            &schedule.progress,
            &views,
            now_ms,
        );
        let mut started = Vec::new();
        let mut records = Vec::new();
        let mut running: Vec<u64> = views
            .iter()
            .filter(|(_, view)| *view == FleetView::Running)
            .map(|(number, _)| *number)
            .collect();
        let mut pause = None;
        for decision in &planned.decisions {
            match *decision {
                Decision::Pause {
                    fleet_number,
                    failed_runs,
                } => {
                    let note = format!(
                        "pause_on_failure: {} ended with {failed_runs} failed runs",
                        fleet_id(fleet_number)
                    );
                    records.push((now_ms, TickOutcome::Paused { note: note.clone() }));
                    pause = Some(note);
                }
                Decision::Cancel { fleet_number } => {
                    self.cancel_fleet(now_ms, &fleet_id(fleet_number));
                    running.retain(|number| *number != fleet_number);
                }
                Decision::Start { nominal_ms } => {
                    let outcome = self.start_scheduled_fleet(
                        now_ms,
                        id,
                        &spec,
                        nominal_ms,
                        max_events,
                        principal,
                        &mut running,
                    );
                    if let TickOutcome::Started { fleet_id } = &outcome {
                        started.push(fleet_id.clone());
                    }
                    records.push((nominal_ms, outcome));
                }
                Decision::Buffer { nominal_ms } => {
                    records.push((nominal_ms, TickOutcome::Buffered));
                }
                Decision::Skip { nominal_ms, reason } => records.push((
                    nominal_ms,
                    TickOutcome::Skipped {
                        reason: skip_reason_name(reason).to_owned(),
                    },
                )),
                Decision::Missed {
                    first_ms,
                    last_ms,
                    count,
                    count_is_lower_bound,
                } => records.push((
                    first_ms,
                    TickOutcome::Missed {
                        last_ms,
                        count,
                        count_is_lower_bound,
                    },
                )),
            }
        }
        let Some(schedule) = self.schedules.get_mut(id) else {
            return rejected(format!("no schedule {id}"));
        };
        schedule.progress = planned.progress;
        schedule.next_due_ms = planned.next_due_ms;
        // Ended fleets have been seen (pause on failure looked at them): only running ones stay.
        schedule.fleets = running;
        if let Some(note) = pause {
            schedule.paused = Some(Pause {
                at_ms: now_ms,
                by: "pause_on_failure".to_owned(),
                note,
            });
        }
        for (nominal_ms, outcome) in records {
            schedule.record(nominal_ms, now_ms, outcome);
        }
        Response::ScheduleProcessed { started }
    }

    /// Starts the fleet of `nominal_ms` under the key [`plan::fleet_key`] (which never creates
    /// a second fleet for the same nominal time) and tracks it in `running`.
    #[allow(clippy::too_many_arguments)]
    fn start_scheduled_fleet(
        &mut self,
        now_ms: u64,
        id: &str,
        spec: &ScheduleSpec,
        nominal_ms: u64,
        max_events: u32,
        principal: &Principal,
        running: &mut Vec<u64>,
    ) -> TickOutcome {
        if running.len() >= MAX_RUNNING_FLEETS_PER_SCHEDULE {
            return TickOutcome::Skipped {
                reason: format!(
                    "{MAX_RUNNING_FLEETS_PER_SCHEDULE} fleets of the schedule are running"
                ),
            };
        }
        let key = plan::fleet_key(id, nominal_ms);
        match self.submit_fleet(now_ms, &spec.fleet, &key, "", max_events, principal) {
            Response::FleetSubmitted { fleet_id, created } => {
                if created && let Some(number) = crate::state::parse_fleet_id(&fleet_id) {
                    running.push(number);
                }
                TickOutcome::Started { fleet_id }
            }
            Response::Rejected { reason } => TickOutcome::Skipped {
                reason: format!("fleet refused: {reason}"),
            },
            Response::IdempotencyKeyConflict { fleet_id } => TickOutcome::Skipped {
                reason: format!("fleet refused: {fleet_id} holds the key {key} with another spec"),
            },
            other => TickOutcome::Skipped {
                reason: format!("fleet refused: unexpected {other:?}"),
            },
        }
    }
}
