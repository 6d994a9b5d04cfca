//! What a schedule does at one moment of replicated time: a pure function from the schedule's
//! progress, its calendar, its policy and the states of the fleets it started, to decisions
//! (start, skip, buffer, cancel, record missed ticks, pause) and the new progress.
//!
//! Exactly once per (schedule, nominal time): `processed_until_ms` only moves forward and every
//! nominal time at or before it has been decided, so planning again at the same or a later time
//! never decides a nominal time twice; a fleet started for nominal time `t` carries the key
//! [`fleet_key`]`(schedule, t)`, which the state machine refuses to create twice.
//!
//! Nominal times are decided in order; one is due when its nominal time plus its
//! [`super::jitter_ms`] has passed. A due one older than the catch-up window (missed while no
//! leader existed, or while the cluster was down) is recorded as missed, never started.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::calendar::Calendar;
use super::jitter_ms;
use crate::spec::FieldError;

/// Most nominal times one plan starts, skips or buffers; the rest wait for the next plan.
pub const MAX_TICKS_PER_PLAN: usize = 100;
/// Most missed nominal times one plan counts one by one (each is a calendar search, so this
/// bounds the work of one apply); beyond it the record says "at least".
pub const MAX_MISSED_COUNTED: u64 = 1_000;
/// Largest `buffer_limit` of [`OverlapPolicy::BufferAll`] (Temporal's bound).
pub const MAX_BUFFER_LIMIT: u32 = 1000;
/// Most nominal times one backfill covers; a longer range is refused (split it).
pub const MAX_BACKFILL_TICKS: usize = 1_000;
/// Shortest catch-up window: 10 seconds (Temporal's minimum).
pub const MIN_CATCH_UP_WINDOW_MS: u64 = 10_000;
/// Longest catch-up window: 366 days.
pub const MAX_CATCH_UP_WINDOW_MS: u64 = 366 * 24 * 3_600_000;

/// What a due nominal time does while a fleet the schedule started is still running.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverlapPolicy {
    /// Skip it, recording why (the default).
    #[default]
    Skip,
    /// Keep it to start when the running fleet ends; one kept at most, later ones skipped.
    BufferOne,
    /// Keep every one, up to `buffer_limit`, started one at a time in order.
    BufferAll,
    /// Cancel the running fleets, then start.
    CancelOther,
    /// Start anyway.
    AllowAll,
}

/// A schedule's operator-visible policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulePolicy {
    /// See [`OverlapPolicy`].
    pub overlap: OverlapPolicy,
    /// With [`OverlapPolicy::BufferAll`]: most nominal times kept, 1 to [`MAX_BUFFER_LIMIT`].
    pub buffer_limit: u32,
    /// A due nominal time older than this (ms) is recorded as missed instead of started.
    pub catch_up_window_ms: u64,
    /// Each nominal time starts up to this much later (ms), by [`super::jitter_ms`]; at most
    /// [`super::MAX_JITTER_MS`].
    pub max_jitter_ms: u64,
    /// Fleets the schedule may still start; `None`: no limit.
    pub remaining_actions: Option<u32>,
    /// Pause the schedule when a fleet it started ends with at least this many failed runs;
    /// 0: never.
    pub pause_on_failed_runs: u32,
}

impl Default for SchedulePolicy {
    fn default() -> Self {
        SchedulePolicy {
            overlap: OverlapPolicy::Skip,
            buffer_limit: MAX_BUFFER_LIMIT,
            catch_up_window_ms: 60_000,
            max_jitter_ms: 0,
            remaining_actions: None,
            pause_on_failed_runs: 0,
        }
    }
}

impl SchedulePolicy {
    /// Checks the bounds; `field` is the policy's path (`spec.policy`).
    ///
    /// # Errors
    /// The first field out of its bounds.
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        if !(1..=MAX_BUFFER_LIMIT).contains(&self.buffer_limit) {
            return Err(FieldError::new(
                format!("{field}.buffer_limit"),
                format!("must be between 1 and {MAX_BUFFER_LIMIT}"),
            ));
        }
        if !(MIN_CATCH_UP_WINDOW_MS..=MAX_CATCH_UP_WINDOW_MS).contains(&self.catch_up_window_ms) {
            return Err(FieldError::new(
                format!("{field}.catch_up_window_ms"),
                format!("must be between {MIN_CATCH_UP_WINDOW_MS} and {MAX_CATCH_UP_WINDOW_MS}"),
            ));
        }
        if self.max_jitter_ms > super::MAX_JITTER_MS {
            return Err(FieldError::new(
                format!("{field}.max_jitter_ms"),
                format!("must be at most {}", super::MAX_JITTER_MS),
            ));
        }
        Ok(())
    }
}

/// What the state keeps of a schedule between plans.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleProgress {
    /// Every nominal time at or before this (ms) has been decided. A new schedule starts at
    /// its creation time (nothing before it is missed); resuming a paused one moves it to the
    /// resume time.
    pub processed_until_ms: u64,
    /// Nominal times kept by a buffering overlap policy, oldest first.
    pub buffered: VecDeque<u64>,
    /// Fleets started so far (for `remaining_actions`).
    pub actions_taken: u32,
}

/// A fleet the schedule started, as a plan sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FleetView {
    /// Still running.
    Running,
    /// Ended (finished or cancelled) with this many failed runs.
    Ended {
        /// Runs that ended failed.
        failed_runs: u32,
    },
}

/// Why a nominal time was not started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// A fleet of the schedule was running ([`OverlapPolicy::Skip`]).
    Overlap,
    /// The buffer was full.
    BufferFull,
    /// `remaining_actions` reached 0.
    NoRemainingActions,
    /// Older than the catch-up window when it was decided.
    CatchUpWindow,
}

/// One decision of a plan, in the order the state machine carries them out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Pause the schedule (pause on failure); nothing else is decided in this plan.
    Pause {
        /// The fleet that ended with too many failed runs.
        fleet_number: u64,
        /// Its failed runs.
        failed_runs: u32,
    },
    /// Cancel a running fleet of the schedule ([`OverlapPolicy::CancelOther`]).
    Cancel {
        /// The fleet.
        fleet_number: u64,
    },
    /// Start a fleet for this nominal time (key [`fleet_key`]).
    Start {
        /// Milliseconds since the epoch.
        nominal_ms: u64,
    },
    /// Keep this nominal time for later.
    Buffer {
        /// Milliseconds since the epoch.
        nominal_ms: u64,
    },
    /// Do not start this nominal time.
    Skip {
        /// Milliseconds since the epoch.
        nominal_ms: u64,
        /// Why.
        reason: SkipReason,
    },
    /// Nominal times from `first_ms` to `last_ms` (`count` of them) were older than the
    /// catch-up window. When `count_is_lower_bound`, counting stopped at
    /// [`MAX_MISSED_COUNTED`] and `last_ms` is where the window began: every nominal time
    /// before it was missed.
    Missed {
        /// The oldest.
        first_ms: u64,
        /// The newest.
        last_ms: u64,
        /// How many.
        count: u64,
        /// Whether counting stopped at [`MAX_MISSED_COUNTED`].
        count_is_lower_bound: bool,
    },
}

/// The outcome of [`plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// What to do, in order.
    pub decisions: Vec<Decision>,
    /// The progress after carrying them out.
    pub progress: ScheduleProgress,
    /// When the next nominal time falls due (nominal time plus jitter, ms), if there is one.
    /// A non-empty buffer also falls due as soon as no fleet of the schedule runs.
    pub next_due_ms: Option<u64>,
}

/// The idempotency key of the fleet started for `nominal_ms`: `schedule:<id>@<nominal_ms>`.
pub fn fleet_key(schedule_id: &str, nominal_ms: u64) -> String {
    format!("schedule:{schedule_id}@{nominal_ms}")
}

/// Longest trigger id of a manual trigger, bytes.
pub const MAX_TRIGGER_ID_BYTES: usize = 128;

/// Whether `trigger_id` is 1 to [`MAX_TRIGGER_ID_BYTES`] bytes of `[A-Za-z0-9._:-]`.
pub fn is_valid_trigger_id(trigger_id: &str) -> bool {
    !trigger_id.is_empty()
        && trigger_id.len() <= MAX_TRIGGER_ID_BYTES
        && trigger_id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b':' | b'-'))
}

/// The idempotency key of the fleet of manual trigger `trigger_id`:
/// `schedule:<id>/trigger:<trigger_id>`. Distinct from every [`fleet_key`], so triggers never
/// collide with nominal times (nor with each other, whatever second they fall in).
pub fn trigger_fleet_key(schedule_id: &str, trigger_id: &str) -> String {
    format!("schedule:{schedule_id}/trigger:{trigger_id}")
}

/// What the schedule `schedule_id` does at `now_ms` (module documentation). `fleets` are the
/// fleets it started that the state still tracks (the state drops ended ones after a plan).
pub fn plan(
    schedule_id: &str,
    calendar: &Calendar,
    policy: &SchedulePolicy,
    progress: &ScheduleProgress,
    fleets: &[(u64, FleetView)],
    now_ms: u64,
) -> Plan {
    let mut progress = progress.clone();
    let mut decisions = Vec::new();
    if policy.pause_on_failed_runs > 0
        && let Some((fleet_number, failed_runs)) =
            fleets.iter().find_map(|(number, view)| match view {
                FleetView::Ended { failed_runs } if *failed_runs >= policy.pause_on_failed_runs => {
                    Some((*number, *failed_runs))
                }
                _ => None,
            })
    {
        decisions.push(Decision::Pause {
            fleet_number,
            failed_runs,
        });
        let next_due_ms = next_due(schedule_id, calendar, policy, progress.processed_until_ms);
        return Plan {
            decisions,
            progress,
            next_due_ms,
        };
    }
    let mut running: Vec<u64> = fleets
        .iter()
        .filter(|(_, view)| *view == FleetView::Running)
        .map(|(number, _)| *number)
        .collect();
    let mut started = false;
    if running.is_empty()
        && let Some(nominal_ms) = progress.buffered.front().copied()
    {
        progress.buffered.pop_front();
        decide_start(
            &mut decisions,
            &mut progress,
            policy,
            nominal_ms,
            &mut started,
        );
    }
    record_missed(&mut decisions, &mut progress, calendar, policy, now_ms);
    let mut decided = 0;
    while decided < MAX_TICKS_PER_PLAN {
        let Some(nominal_ms) = calendar.next_after(progress.processed_until_ms) else {
            break;
        };
        if nominal_ms.saturating_add(jitter_ms(schedule_id, nominal_ms, policy.max_jitter_ms))
            > now_ms
        {
            break;
        }
        progress.processed_until_ms = nominal_ms;
        decided += 1;
        let busy = started || !running.is_empty();
        match (busy, policy.overlap) {
            (false, _) | (true, OverlapPolicy::AllowAll) => {
                decide_start(
                    &mut decisions,
                    &mut progress,
                    policy,
                    nominal_ms,
                    &mut started,
                );
            }
            (true, OverlapPolicy::CancelOther) => {
                for fleet_number in running.drain(..) {
                    decisions.push(Decision::Cancel { fleet_number });
                }
                decide_start(
                    &mut decisions,
                    &mut progress,
                    policy,
                    nominal_ms,
                    &mut started,
                );
            }
            (true, OverlapPolicy::Skip) => decisions.push(Decision::Skip {
                nominal_ms,
                reason: SkipReason::Overlap,
            }),
            (true, OverlapPolicy::BufferOne | OverlapPolicy::BufferAll) => {
                let limit = match policy.overlap {
                    OverlapPolicy::BufferOne => 1,
                    _ => policy.buffer_limit as usize,
                };
                if progress.buffered.len() < limit {
                    progress.buffered.push_back(nominal_ms);
                    decisions.push(Decision::Buffer { nominal_ms });
                } else {
                    decisions.push(Decision::Skip {
                        nominal_ms,
                        reason: SkipReason::BufferFull,
                    });
                }
            }
        }
    }
    let next_due_ms = next_due(schedule_id, calendar, policy, progress.processed_until_ms);
    Plan {
        decisions,
        progress,
        next_due_ms,
    }
}

/// The nominal times of `calendar` from `from_ms` to `to_ms` (both included), oldest first.
///
/// # Errors
/// `to_ms` before `from_ms`, or more than [`MAX_BACKFILL_TICKS`] nominal times in the range.
pub fn backfill_times(calendar: &Calendar, from_ms: u64, to_ms: u64) -> Result<Vec<u64>, String> {
    if to_ms < from_ms {
        return Err("to: before from".into());
    }
    let mut times = Vec::new();
    let mut cursor = from_ms.saturating_sub(1);
    while let Some(nominal_ms) = calendar.next_after(cursor) {
        if nominal_ms > to_ms {
            break;
        }
        if times.len() == MAX_BACKFILL_TICKS {
            return Err(format!(
                "the range holds more than {MAX_BACKFILL_TICKS} nominal times; backfill it in parts"
            ));
        }
        times.push(nominal_ms);
        cursor = nominal_ms;
    }
    Ok(times)
}

/// What a backfill of `times` (oldest first, all in the past) does under its own `overlap`
/// policy, given whether a fleet of the schedule runs (`busy`):
/// - `allow_all`: start every one;
/// - `skip`: start the oldest when nothing runs, skip the rest (they would overlap it);
/// - `buffer_one` / `buffer_all`: start the oldest when nothing runs and keep the rest in the
///   schedule's buffer (up to 1, or to `policy.buffer_limit`, counting what it holds), so
///   they start one at a time;
/// - `cancel_other`: cancel the running fleets and start only the newest (each start would
///   cancel the one before it).
///
/// Backfilled times are calendar times: they count toward `remaining_actions`. Their fleets
/// carry [`fleet_key`], so a time that already has its fleet is not started again.
pub fn plan_backfill(
    times: &[u64],
    overlap: OverlapPolicy,
    policy: &SchedulePolicy,
    progress: &ScheduleProgress,
    running: &[u64],
) -> (Vec<Decision>, ScheduleProgress) {
    let mut progress = progress.clone();
    let mut decisions = Vec::new();
    let mut started = false;
    let busy = !running.is_empty();
    let buffer_limit = match overlap {
        OverlapPolicy::BufferOne => 1,
        _ => policy.buffer_limit as usize,
    };
    let newest = times.last().copied();
    for &nominal_ms in times {
        match overlap {
            OverlapPolicy::AllowAll => {
                decide_start(
                    &mut decisions,
                    &mut progress,
                    policy,
                    nominal_ms,
                    &mut started,
                );
            }
            OverlapPolicy::CancelOther if Some(nominal_ms) == newest => {
                for &fleet_number in running {
                    decisions.push(Decision::Cancel { fleet_number });
                }
                decide_start(
                    &mut decisions,
                    &mut progress,
                    policy,
                    nominal_ms,
                    &mut started,
                );
            }
            OverlapPolicy::CancelOther => decisions.push(Decision::Skip {
                nominal_ms,
                reason: SkipReason::Overlap,
            }),
            _ if !busy && !started => {
                decide_start(
                    &mut decisions,
                    &mut progress,
                    policy,
                    nominal_ms,
                    &mut started,
                );
            }
            OverlapPolicy::Skip => decisions.push(Decision::Skip {
                nominal_ms,
                reason: SkipReason::Overlap,
            }),
            OverlapPolicy::BufferOne | OverlapPolicy::BufferAll => {
                if progress.buffered.len() < buffer_limit
                    && !progress.buffered.contains(&nominal_ms)
                {
                    progress.buffered.push_back(nominal_ms);
                    decisions.push(Decision::Buffer { nominal_ms });
                } else {
                    decisions.push(Decision::Skip {
                        nominal_ms,
                        reason: SkipReason::BufferFull,
                    });
                }
            }
        }
    }
    (decisions, progress)
}

/// Starts `nominal_ms` unless the schedule has no actions left (then skips it).
fn decide_start(
    decisions: &mut Vec<Decision>,
    progress: &mut ScheduleProgress,
    policy: &SchedulePolicy,
    nominal_ms: u64,
    started: &mut bool,
) {
    let exhausted = policy
        .remaining_actions
        .is_some_and(|remaining| progress.actions_taken >= remaining);
    if exhausted {
        decisions.push(Decision::Skip {
            nominal_ms,
            reason: SkipReason::NoRemainingActions,
        });
        return;
    }
    progress.actions_taken += 1;
    *started = true;
    decisions.push(Decision::Start { nominal_ms });
}

/// Records, as one [`Decision::Missed`], the nominal times older than the catch-up window,
/// and moves `processed_until_ms` past them.
fn record_missed(
    decisions: &mut Vec<Decision>,
    progress: &mut ScheduleProgress,
    calendar: &Calendar,
    policy: &SchedulePolicy,
    now_ms: u64,
) {
    let cutoff_ms = now_ms.saturating_sub(policy.catch_up_window_ms);
    let mut first_ms = None;
    let mut last_ms = 0;
    let mut count = 0;
    let mut cursor = progress.processed_until_ms;
    while let Some(nominal_ms) = calendar.next_after(cursor) {
        if nominal_ms >= cutoff_ms {
            break;
        }
        if count == MAX_MISSED_COUNTED {
            // Too many to count one by one: jump to the window's start.
            cursor = cutoff_ms.saturating_sub(1);
            break;
        }
        first_ms.get_or_insert(nominal_ms);
        last_ms = nominal_ms;
        count += 1;
        cursor = nominal_ms;
    }
    let Some(first_ms) = first_ms else {
        return;
    };
    let count_is_lower_bound = cursor > last_ms;
    progress.processed_until_ms = cursor;
    decisions.push(Decision::Missed {
        first_ms,
        last_ms: if count_is_lower_bound {
            cursor
        } else {
            last_ms
        },
        count,
        count_is_lower_bound,
    });
}

fn next_due(
    schedule_id: &str,
    calendar: &Calendar,
    policy: &SchedulePolicy,
    processed_until_ms: u64,
) -> Option<u64> {
    calendar.next_after(processed_until_ms).map(|nominal_ms| {
        nominal_ms.saturating_add(jitter_ms(schedule_id, nominal_ms, policy.max_jitter_ms))
    })
}
