//! A fleet's flow control as submitted ([`FlowSpec`]) and as it stands ([`FleetFlow`]):
//! priority, repository sharing, an approval gate before the first lease, a deadline, canary
//! waves with a success threshold and a soak time, and a failure budget.
//!
//! The decisions are pure ([`crate::wave`]); [`crate::control`] carries them out on the state.
//! Nothing here reads a clock: times are the replicated `now_ms` of the entry being applied.

use serde::{Deserialize, Serialize};

use crate::spec::FieldError;
use crate::token::Principal;
use crate::wave::WaveSize;

/// Default [`FlowSpec::priority`].
pub const DEFAULT_PRIORITY: u32 = 50;
/// Highest [`FlowSpec::priority`].
pub const MAX_PRIORITY: u32 = 100;
/// Most waves a fleet may list ([`FlowSpec::waves`]).
pub const MAX_WAVES: usize = 16;
/// Longest [`FlowSpec::deadline_ms`] and [`FlowSpec::soak_ms`]: 30 days.
pub const MAX_FLOW_DURATION_MS: u64 = 30 * 24 * 3_600_000;
/// Most pause, resume and approval records a fleet keeps ([`FleetFlow::decisions`]); older
/// ones are dropped first (the events keep every one).
pub const MAX_DECISIONS_KEPT: usize = 64;
/// Longest note of a pause, resume or approval, in bytes.
pub const MAX_NOTE_BYTES: usize = 1_024;

/// How a fleet flows (the `flow` section of a fleet spec). Every field has a default, so a
/// spec without it behaves as before flow control existed: priority 50, exclusive
/// repositories, no gate, no deadline, one wave, no failure budget.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FlowSpec {
    /// 0-[`MAX_PRIORITY`]; fleets of a higher priority are leased first, fleets of one
    /// priority share workers round-robin ([`crate::placement`]).
    pub priority: u32,
    /// Whether this fleet's runs may run on a repository while another fleet's run does there.
    /// Two fleets' runs share a repository only when both say so; by default no two fleets
    /// run on one repository at once.
    pub shared_repositories: bool,
    /// The fleet waits for `flotilla fleet approve` before its first lease.
    pub require_approval: bool,
    /// Pending runs are cancelled this long after submission, in milliseconds (a running
    /// attempt finishes, but is not retried); 0: no deadline. At most [`MAX_FLOW_DURATION_MS`].
    pub deadline_ms: u64,
    /// Canary waves, each the cumulative size of the rollout when it is done (`runs` or
    /// `percent` of the fleet, increasing); a last wave of 100% is implied. Empty: one wave.
    /// At most [`MAX_WAVES`].
    pub waves: Vec<WaveSize>,
    /// A wave is promoted when this percentage of its runs changed or found nothing to
    /// change (0-100); below it, the fleet waits at an approval gate.
    pub success_threshold_percent: u32,
    /// How long a successful wave soaks before the next starts, in milliseconds; at most
    /// [`MAX_FLOW_DURATION_MS`].
    pub soak_ms: u64,
    /// Every wave waits for approval before the next, whatever its success.
    pub approve_each_wave: bool,
    /// The fleet pauses when more runs than this failed since it started or was last
    /// resumed (Argo Rollouts' `failureLimit`); `None`: no limit.
    pub failure_limit: Option<u32>,
    /// The fleet pauses when more than this many runs failed in a row, in the order they
    /// ended (Argo Rollouts' `consecutiveErrorLimit`); `None`: no limit.
    pub consecutive_failure_limit: Option<u32>,
}

impl Default for FlowSpec {
    fn default() -> Self {
        FlowSpec {
            priority: DEFAULT_PRIORITY,
            shared_repositories: false,
            require_approval: false,
            deadline_ms: 0,
            waves: Vec::new(),
            success_threshold_percent: 100,
            soak_ms: 0,
            approve_each_wave: false,
            failure_limit: None,
            consecutive_failure_limit: None,
        }
    }
}

impl FlowSpec {
    /// Checks the fields; errors name them below `prefix` (`spec.flow`).
    ///
    /// # Errors
    /// The first invalid field.
    pub fn validate(&self, prefix: &str) -> Result<(), FieldError> {
        let field = |name: &str| format!("{prefix}.{name}");
        if self.priority > MAX_PRIORITY {
            return Err(FieldError::new(
                field("priority"),
                format!("must be 0-{MAX_PRIORITY}"),
            ));
        }
        if self.deadline_ms > MAX_FLOW_DURATION_MS {
            return Err(FieldError::new(
                field("deadline_ms"),
                format!("must be at most {MAX_FLOW_DURATION_MS} (30 days)"),
            ));
        }
        if self.soak_ms > MAX_FLOW_DURATION_MS {
            return Err(FieldError::new(
                field("soak_ms"),
                format!("must be at most {MAX_FLOW_DURATION_MS} (30 days)"),
            ));
        }
        if self.success_threshold_percent > 100 {
            return Err(FieldError::new(
                field("success_threshold_percent"),
                "must be 0-100",
            ));
        }
        crate::wave::validate_waves(&self.waves, &field("waves"))
    }
}

/// Why a fleet is paused: no run of it is leased until [`crate::command::Command::ResumeFleet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pause {
    /// Leader time of the pause, in milliseconds.
    pub at_ms: u64,
    /// Who paused it; [`Principal::Unknown`] for an automatic pause.
    pub by: Principal,
    /// Whether the failure budget paused it (not a person).
    pub automatic: bool,
    /// Why, as given or as decided (`failure budget: 4 failed runs, more than failure_limit 3`).
    pub reason: String,
}

/// What a fleet waits for at an approval gate: no run of it is leased until
/// [`crate::command::Command::ApproveFleet`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    /// Leader time the gate closed, in milliseconds.
    pub at_ms: u64,
    /// The wave (0-based) that waits to start: 0 before the first lease.
    pub wave: u32,
    /// Why (`require_approval`, or the previous wave's result).
    pub reason: String,
}

/// One pause, resume or approval, with who and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Leader time, in milliseconds.
    pub at_ms: u64,
    /// `pause`, `resume` or `approve`.
    pub action: String,
    /// Who.
    pub by: Principal,
    /// The note given, at most [`MAX_NOTE_BYTES`].
    pub note: String,
}

/// A fleet's flow as it stands (replicated; part of [`crate::state::Fleet`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FleetFlow {
    /// The cumulative run count at the end of each wave, increasing, the last equal to the
    /// fleet's run count ([`crate::wave::resolve_waves`] at submission).
    pub wave_ends: Vec<u32>,
    /// The current wave, 0-based: runs with an index below `wave_ends[wave]` may be leased.
    pub wave: u32,
    /// The current wave succeeded and the next starts at this leader time (its soak ends);
    /// 0: none pending.
    pub promote_at_ms: u64,
    /// Leader time after which pending runs are cancelled; 0: none.
    pub deadline_at_ms: u64,
    /// Whether the deadline was carried out (its pending runs cancelled).
    pub deadline_passed: bool,
    /// Set while paused.
    pub pause: Option<Pause>,
    /// Set while waiting for approval.
    pub gate: Option<Gate>,
    /// Runs that failed since submission or the last resume (the failure budget's count).
    pub failures: u32,
    /// Runs that failed in a row, in the order they ended.
    pub consecutive_failures: u32,
    /// The newest [`MAX_DECISIONS_KEPT`] pauses, resumes and approvals, oldest first.
    pub decisions: Vec<Decision>,
    /// The fleet this one re-runs, if it was created by `RerunFleet` (`fl-<n>`).
    pub origin_fleet_id: String,
}

impl FleetFlow {
    /// The index one past the last run of the current wave (the fleet's run count for a
    /// fleet without waves).
    pub fn wave_end(&self, run_count: u32) -> u32 {
        self.wave_ends
            .get(self.wave as usize)
            .copied()
            .unwrap_or(run_count)
    }

    /// Whether runs may be leased at `now_ms` (not paused, not at a gate, before the
    /// deadline).
    pub fn is_open(&self, now_ms: u64) -> bool {
        self.pause.is_none()
            && self.gate.is_none()
            && !(self.deadline_at_ms != 0 && now_ms >= self.deadline_at_ms)
    }

    /// Appends `decision`, dropping the oldest past [`MAX_DECISIONS_KEPT`].
    pub(crate) fn record(&mut self, decision: Decision) {
        if self.decisions.len() == MAX_DECISIONS_KEPT {
            self.decisions.remove(0);
        }
        self.decisions.push(decision);
    }
}
