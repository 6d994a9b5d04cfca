//! The replicated schedule: its spec, progress, the fleets it started and its history.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::calendar::{Calendar, CalendarSpec};
use super::plan::{SchedulePolicy, ScheduleProgress};
use crate::spec::{FieldError, FleetSpec, SpecLimits, is_valid_name};

/// Most schedules in the cluster unless the operator sets another bound (node
/// `limits.max_schedules`, carried by each `CreateSchedule`).
pub const DEFAULT_MAX_SCHEDULES: u32 = 1024;
/// Most history records a schedule keeps; older ones are dropped first.
pub const MAX_HISTORY_PER_SCHEDULE: usize = 100;
/// Most running fleets one schedule tracks ([`super::plan::OverlapPolicy::AllowAll`] can pile
/// them up); a nominal time that would start one more is skipped with that reason.
pub const MAX_RUNNING_FLEETS_PER_SCHEDULE: usize = 64;
/// Longest pause or resume note, bytes.
pub const MAX_NOTE_BYTES: usize = 1024;

/// A schedule as submitted: a calendar, a policy, and the fleet each tick starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// 1-64 characters of `[A-Za-z0-9._-]`, unique in the project.
    pub name: String,
    /// When it fires.
    pub calendar: CalendarSpec,
    /// Overlap, catch-up, jitter, limits.
    #[serde(default)]
    pub policy: SchedulePolicy,
    /// The fleet each tick starts; its project is the schedule's.
    pub fleet: FleetSpec,
}

impl ScheduleSpec {
    /// The schedule's id: `<project>/<name>`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.fleet.project, self.name)
    }

    /// Checks every field (the fleet as [`FleetSpec::validate`] under `limits`) and compiles
    /// the calendar; `prefix` is the spec's path (`spec`).
    ///
    /// # Errors
    /// The first invalid field, with its path.
    pub fn validate(&self, prefix: &str, limits: &SpecLimits) -> Result<Calendar, FieldError> {
        let calendar = self.validate_schedule(prefix)?;
        self.fleet.validate(&format!("{prefix}.fleet"), limits)?;
        Ok(calendar)
    }

    /// [`ScheduleSpec::validate`] without the fleet (whose limits are the node's
    /// configuration): what the state machine checks again when it applies the spec.
    ///
    /// # Errors
    /// The first invalid field of the name, calendar or policy.
    pub fn validate_schedule(&self, prefix: &str) -> Result<Calendar, FieldError> {
        if !is_valid_name(&self.name) {
            return Err(FieldError::new(
                format!("{prefix}.name"),
                "must be 1-64 characters of [A-Za-z0-9._-]",
            ));
        }
        let calendar = Calendar::compile(&self.calendar, &format!("{prefix}.calendar"))?;
        self.policy.validate(&format!("{prefix}.policy"))?;
        Ok(calendar)
    }
}

/// Who paused a schedule, when and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// Replicated time of the pause, ms.
    pub at_ms: u64,
    /// The principal (`token:...`, `node:...`) or `pause_on_failure`.
    pub by: String,
    /// Why, at most [`MAX_NOTE_BYTES`].
    pub note: String,
}

/// What happened at one nominal time (or to the schedule).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TickOutcome {
    /// A fleet was started.
    Started {
        /// `fl-<n>`.
        fleet_id: String,
    },
    /// A manual trigger started a fleet (recorded at the trigger's replicated time).
    Triggered {
        /// The caller's id of the trigger (the fleet's key is
        /// [`super::plan::trigger_fleet_key`]).
        trigger_id: String,
        /// `fl-<n>`.
        fleet_id: String,
    },
    /// Kept for when the running fleet ends.
    Buffered,
    /// Not started.
    Skipped {
        /// Why (`overlap`, `buffer_full`, `no_remaining_actions`, ...).
        reason: String,
    },
    /// Nominal times older than the catch-up window, `count` of them (at least, when
    /// `count_is_lower_bound`) up to `last_ms`.
    Missed {
        /// The newest missed (or where counting stopped).
        last_ms: u64,
        /// How many.
        count: u64,
        /// Whether counting stopped early.
        count_is_lower_bound: bool,
    },
    /// The schedule was paused.
    Paused {
        /// Why.
        note: String,
    },
    /// The schedule was resumed; nominal times while it was paused are not started.
    Resumed {
        /// Why.
        note: String,
    },
}

/// One history record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickRecord {
    /// The nominal time (ms; for `Missed`, the oldest missed; for pause and resume, the
    /// replicated time).
    pub nominal_ms: u64,
    /// Replicated time of the decision, ms.
    pub decided_at_ms: u64,
    /// What happened.
    pub outcome: TickOutcome,
}

/// A schedule in the replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// `<project>/<name>`.
    pub id: String,
    /// As submitted.
    pub spec: Arc<ScheduleSpec>,
    /// Replicated time of creation, ms.
    pub created_at_ms: u64,
    /// Set while paused.
    pub paused: Option<Pause>,
    /// What has been decided.
    pub progress: ScheduleProgress,
    /// Numbers of the fleets it started that have not been seen ended yet.
    pub fleets: Vec<u64>,
    /// The newest [`MAX_HISTORY_PER_SCHEDULE`] records, oldest first.
    pub history: VecDeque<TickRecord>,
    /// Records dropped from `history`.
    pub history_dropped: u64,
    /// When the next nominal time falls due (nominal plus jitter, ms); `None` when the
    /// calendar has no more.
    pub next_due_ms: Option<u64>,
}

impl Schedule {
    /// The schedule's own invariants; `fleet_key` gives the idempotency key of a fleet by
    /// number (`None` once compacted).
    ///
    /// # Errors
    /// The first invariant that does not hold.
    pub fn check_invariants(
        &self,
        fleet_key: impl Fn(u64) -> Option<String>,
    ) -> Result<(), String> {
        let id = &self.id;
        if *id != self.spec.id() {
            return Err(format!(
                "schedule {id} stored under another id than its spec's"
            ));
        }
        if self.history.len() > MAX_HISTORY_PER_SCHEDULE {
            return Err(format!(
                "schedule {id} keeps {} records",
                self.history.len()
            ));
        }
        // A backfill may buffer under its own overlap policy, never beyond buffer_limit; the
        // schedule's own policy buffers only when it says so.
        let buffer_limit = self.spec.policy.buffer_limit as usize;
        if self.progress.buffered.len() > buffer_limit {
            return Err(format!("schedule {id} buffers more than its policy allows"));
        }
        if self.progress.buffered.iter().collect::<BTreeSet<_>>().len()
            != self.progress.buffered.len()
        {
            return Err(format!("schedule {id} buffers a nominal time twice"));
        }
        if self.fleets.len() > MAX_RUNNING_FLEETS_PER_SCHEDULE {
            return Err(format!("schedule {id} tracks {} fleets", self.fleets.len()));
        }
        if self.progress.processed_until_ms < self.created_at_ms {
            return Err(format!("schedule {id} decided times before its creation"));
        }
        let prefix = format!("schedule:{id}@");
        let trigger_prefix = format!("schedule:{id}/trigger:");
        for number in &self.fleets {
            if let Some(key) = fleet_key(*number)
                && !key.starts_with(&prefix)
                && !key.starts_with(&trigger_prefix)
            {
                return Err(format!(
                    "schedule {id} tracks fl-{number}, not one of its own"
                ));
            }
        }
        // Exactly once: no nominal time and no fleet started twice.
        // A trigger id starts one fleet; no fleet is recorded twice.
        let mut nominal_times = BTreeSet::new();
        let mut trigger_ids = BTreeSet::new();
        let mut fleet_ids = BTreeSet::new();
        for record in &self.history {
            let fresh = match &record.outcome {
                TickOutcome::Started { fleet_id } => {
                    nominal_times.insert(record.nominal_ms) && fleet_ids.insert(fleet_id)
                }
                TickOutcome::Triggered {
                    trigger_id,
                    fleet_id,
                } => trigger_ids.insert(trigger_id) && fleet_ids.insert(fleet_id),
                _ => true,
            };
            if !fresh {
                return Err(format!(
                    "schedule {id} started nominal time {}, a trigger or a fleet twice",
                    record.nominal_ms
                ));
            }
        }
        if let Some(remaining) = self.spec.policy.remaining_actions
            && self.progress.actions_taken > remaining
        {
            return Err(format!("schedule {id} took more actions than allowed"));
        }
        Ok(())
    }

    /// Appends a history record, dropping the oldest beyond [`MAX_HISTORY_PER_SCHEDULE`].
    pub fn record(&mut self, nominal_ms: u64, decided_at_ms: u64, outcome: TickOutcome) {
        if self.history.len() == MAX_HISTORY_PER_SCHEDULE {
            self.history.pop_front();
            self.history_dropped += 1;
        }
        self.history.push_back(TickRecord {
            nominal_ms,
            decided_at_ms,
            outcome,
        });
    }
}
