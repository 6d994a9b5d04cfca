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

/// What [`State::carry_out`] did.
#[derive(Default)]
struct Carried {
    /// `fl-<n>` of each fleet started, in decision order.
    started: Vec<String>,
    /// History records, `(nominal_ms, outcome)`.
    records: Vec<(u64, TickOutcome)>,
    /// Nominal times buffered.
    buffered: u32,
    /// Nominal times not started.
    skipped: u32,
    /// Set when pause on failure struck: the note.
    pause: Option<String>,
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
        let mut running: Vec<u64> = views
            .iter()
            .filter(|(_, view)| *view == FleetView::Running)
            .map(|(number, _)| *number)
            .collect();
        let carried = self.carry_out(
            (now_ms, id, &spec),
            &planned.decisions,
            max_events,
            principal,
            &mut running,
            "",
        );
        let Some(schedule) = self.schedules.get_mut(id) else {
            return rejected(format!("no schedule {id}"));
        };
        schedule.progress = planned.progress;
        schedule.next_due_ms = planned.next_due_ms;
        // Ended fleets have been seen (pause on failure looked at them): only running ones stay.
        schedule.fleets = running;
        if let Some(note) = carried.pause {
            schedule.paused = Some(Pause {
                at_ms: now_ms,
                by: "pause_on_failure".to_owned(),
                note,
            });
        }
        for (nominal_ms, outcome) in carried.records {
            schedule.record(nominal_ms, now_ms, outcome);
        }
        Response::ScheduleProcessed {
            started: carried.started,
        }
    }

    /// Starts a fleet of schedule `id` now for manual trigger `trigger_id`, under its own key
    /// ([`plan::trigger_fleet_key`]): the same trigger id again answers the same fleet. The
    /// trigger's `overlap` is `skip` (refused while a fleet of the schedule runs),
    /// `cancel_other` or `allow_all`. Paused schedules may be triggered; triggers do not count
    /// toward `remaining_actions`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn trigger_schedule(
        &mut self,
        now_ms: u64,
        id: &str,
        trigger_id: &str,
        overlap: plan::OverlapPolicy,
        max_events: u32,
        principal: &Principal,
    ) -> Response {
        if !plan::is_valid_trigger_id(trigger_id) {
            return rejected(format!(
                "trigger_id: must be 1-{} bytes of [A-Za-z0-9._:-]",
                plan::MAX_TRIGGER_ID_BYTES
            ));
        }
        let Some(schedule) = self.schedules.get(id) else {
            return rejected(format!("no schedule {id}"));
        };
        let key = plan::trigger_fleet_key(id, trigger_id);
        if let Some(fleet) = self.fleet_by_idempotency_key(&key) {
            return Response::ScheduleTriggered {
                fleet_id: fleet_id(fleet.number),
                created: false,
            };
        }
        let spec = Arc::clone(&schedule.spec);
        let mut running = self.running_fleets_of(id);
        match overlap {
            plan::OverlapPolicy::AllowAll => {}
            plan::OverlapPolicy::CancelOther => {
                for number in running.drain(..) {
                    self.cancel_fleet(now_ms, &fleet_id(number));
                }
            }
            plan::OverlapPolicy::Skip if running.is_empty() => {}
            plan::OverlapPolicy::Skip => {
                return rejected(format!(
                    "overlap: {} of schedule {id} is running (overlap skip)",
                    fleet_id(running[0])
                ));
            }
            plan::OverlapPolicy::BufferOne | plan::OverlapPolicy::BufferAll => {
                return rejected("overlap: a trigger takes skip, cancel_other or allow_all");
            }
        }
        if running.len() >= MAX_RUNNING_FLEETS_PER_SCHEDULE {
            return rejected(format!(
                "{MAX_RUNNING_FLEETS_PER_SCHEDULE} fleets of schedule {id} are running"
            ));
        }
        let response = self.submit_fleet(now_ms, &spec.fleet, &key, "", max_events, principal);
        let Response::FleetSubmitted { fleet_id, created } = response else {
            return response;
        };
        if let Some(number) = crate::state::parse_fleet_id(&fleet_id) {
            running.push(number);
        }
        if let Some(schedule) = self.schedules.get_mut(id) {
            schedule.fleets = running;
            schedule.record(
                now_ms,
                now_ms,
                TickOutcome::Triggered {
                    trigger_id: trigger_id.to_owned(),
                    fleet_id: fleet_id.clone(),
                },
            );
        }
        Response::ScheduleTriggered { fleet_id, created }
    }

    /// Backfills schedule `id` from `from_ms` to `to_ms` (both included, at most `now_ms`)
    /// under the backfill's own `overlap` ([`plan::plan_backfill`]). A running schedule takes
    /// only times it has already decided (at or before its `processed_until_ms`: the rest it
    /// decides itself); a paused one takes any past range (resuming skips the pause).
    pub(crate) fn backfill_schedule(
        &mut self,
        now_ms: u64,
        id: &str,
        range_ms: (u64, u64),
        overlap: plan::OverlapPolicy,
        max_events: u32,
        principal: &Principal,
    ) -> Response {
        let (from_ms, to_ms) = range_ms;
        let Some(schedule) = self.schedules.get(id) else {
            return rejected(format!("no schedule {id}"));
        };
        if to_ms > now_ms {
            return rejected("to: in the future; the schedule itself starts those times");
        }
        if schedule.paused.is_none() && to_ms > schedule.progress.processed_until_ms {
            return rejected(format!(
                "to: after {} ms, the last time schedule {id} has decided; it decides later times itself",
                schedule.progress.processed_until_ms
            ));
        }
        let Some(calendar) = calendar_of(&schedule.spec) else {
            return rejected(format!("schedule {id}: the calendar no longer compiles"));
        };
        let times = match plan::backfill_times(&calendar, from_ms, to_ms) {
            Ok(times) => times,
            Err(reason) => return rejected(reason),
        };
        let spec = Arc::clone(&schedule.spec);
        let mut running = self.running_fleets_of(id);
        // Times that have their fleet already are recorded, not planned: the plan sees gaps.
        let mut records = Vec::new();
        let mut skipped = 0u32;
        let times: Vec<u64> = times
            .into_iter()
            .filter(|nominal_ms| {
                let key = plan::fleet_key(id, *nominal_ms);
                let Some(fleet) = self.fleet_by_idempotency_key(&key) else {
                    return true;
                };
                skipped += 1;
                records.push((
                    *nominal_ms,
                    TickOutcome::Skipped {
                        reason: format!("already started as {}", fleet_id(fleet.number)),
                    },
                ));
                false
            })
            .collect();
        let (decisions, progress) =
            plan::plan_backfill(&times, overlap, &spec.policy, &schedule.progress, &running);
        let carried = self.carry_out(
            (now_ms, id, &spec),
            &decisions,
            max_events,
            principal,
            &mut running,
            "backfill: ",
        );
        records.extend(carried.records);
        let Some(schedule) = self.schedules.get_mut(id) else {
            return rejected(format!("no schedule {id}"));
        };
        schedule.progress = progress;
        schedule.fleets = running;
        for (nominal_ms, outcome) in records {
            schedule.record(nominal_ms, now_ms, outcome);
        }
        Response::ScheduleBackfilled {
            started: carried.started,
            buffered: carried.buffered,
            skipped: skipped + carried.skipped,
        }
    }

    /// Carries out a plan's `decisions` for schedule `id` at `now_ms` (the `at` triple): starts
    /// and cancels fleets (tracked in `running`) and collects the history records, each skip
    /// reason prefixed with `skip_prefix`. The schedule itself is the caller's to update.
    fn carry_out(
        &mut self,
        at: (u64, &str, &ScheduleSpec),
        decisions: &[Decision],
        max_events: u32,
        principal: &Principal,
        running: &mut Vec<u64>,
        skip_prefix: &str,
    ) -> Carried {
        let (now_ms, id, spec) = at;
        let mut carried = Carried::default();
        for decision in decisions {
            match *decision {
                Decision::Pause {
                    fleet_number,
                    failed_runs,
                } => {
                    let note = format!(
                        "pause_on_failure: {} ended with {failed_runs} failed runs",
                        fleet_id(fleet_number)
                    );
                    carried
                        .records
                        .push((now_ms, TickOutcome::Paused { note: note.clone() }));
                    carried.pause = Some(note);
                }
                Decision::Cancel { fleet_number } => {
                    self.cancel_fleet(now_ms, &fleet_id(fleet_number));
                    running.retain(|number| *number != fleet_number);
                }
                Decision::Start { nominal_ms } => {
                    let outcome = self.start_scheduled_fleet(
                        now_ms, id, spec, nominal_ms, max_events, principal, running,
                    );
                    match &outcome {
                        TickOutcome::Started { fleet_id } => carried.started.push(fleet_id.clone()),
                        _ => carried.skipped += 1,
                    }
                    carried.records.push((nominal_ms, outcome));
                }
                Decision::Buffer { nominal_ms } => {
                    carried.buffered += 1;
                    carried.records.push((nominal_ms, TickOutcome::Buffered));
                }
                Decision::Skip { nominal_ms, reason } => {
                    carried.skipped += 1;
                    carried.records.push((
                        nominal_ms,
                        TickOutcome::Skipped {
                            reason: format!("{skip_prefix}{}", skip_reason_name(reason)),
                        },
                    ));
                }
                Decision::Missed {
                    first_ms,
                    last_ms,
                    count,
                    count_is_lower_bound,
                } => carried.records.push((
                    first_ms,
                    TickOutcome::Missed {
                        last_ms,
                        count,
                        count_is_lower_bound,
                    },
                )),
            }
        }
        carried
    }

    /// Numbers of the running fleets schedule `id` tracks.
    fn running_fleets_of(&self, id: &str) -> Vec<u64> {
        self.schedules.get(id).map_or_else(Vec::new, |schedule| {
            schedule
                .fleets
                .iter()
                .copied()
                .filter(|number| {
                    self.fleet(&fleet_id(*number))
                        .is_some_and(|fleet| fleet.state == FleetState::Running)
                })
                .collect()
        })
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
            Response::FleetSubmitted {
                fleet_id,
                created: true,
            } => {
                if let Some(number) = crate::state::parse_fleet_id(&fleet_id) {
                    running.push(number);
                }
                TickOutcome::Started { fleet_id }
            }
            // A backfill of a time that already has its fleet (or a buffered time started
            // meanwhile by a backfill): never recorded as started twice.
            Response::FleetSubmitted {
                fleet_id,
                created: false,
            } => TickOutcome::Skipped {
                reason: format!("already started as {fleet_id}"),
            },
            Response::Rejected { reason } | Response::QueueFull { reason } => {
                TickOutcome::Skipped {
                    reason: format!("fleet refused: {reason}"),
                }
            }
            Response::IdempotencyKeyConflict { fleet_id } => TickOutcome::Skipped {
                reason: format!("fleet refused: {fleet_id} holds the key {key} with another spec"),
            },
            other => TickOutcome::Skipped {
                reason: format!("fleet refused: unexpected {other:?}"),
            },
        }
    }
}
