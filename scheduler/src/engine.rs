//! The leader's periodic decisions as a pure function (in the manner of openraft's `Engine`):
//! [`tick`] looks at the state and the leader's situation and returns the commands the leader
//! should propose. No I/O, no clock: the node calls it on a timer with replicated time and its
//! monotonic clock, and proposes what it returns; tests call it with tables of inputs.
//!
//! Decisions:
//! - `BootstrapToken` with the leader's bootstrap token while the cluster has no token yet;
//! - `ExpireSilentLeases` for the leases whose deadline in the leader's memory passed
//!   ([`crate::liveness`]: heartbeats move deadlines without log writes; a new leader gives the
//!   leases it finds a grace period, cf. Nomad's `heartbeat_grace`);
//! - `CompactFleets` when an ended fleet is older than [`EngineSettings::fleet_retention_ms`];
//! - `AdvanceFleets` when a running fleet's wave soak ended or its deadline passed
//!   ([`State::has_due_fleet_transitions`]);
//! - `ProcessSchedule` for each due schedule ([`State::due_schedules`]): only the leader
//!   evaluates schedules, from replicated time, and the state machine decides each nominal
//!   time once, so a tick proposed twice (a leader change between proposal and apply) starts
//!   nothing twice.
//!
//! An idle state yields no command, so an idle cluster writes nothing; heartbeats never write.

use crate::command::Command;
use crate::liveness::LeaseLiveness;
use crate::state::State;

/// The operator settings the engine decides with (node `[limits]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSettings {
    /// A lease's life without a heartbeat, in milliseconds (`limits.lease_ttl_ms`).
    pub lease_ttl_ms: u64,
    /// How long an ended fleet is kept, in milliseconds.
    pub fleet_retention_ms: u64,
    /// Most fleets one `CompactFleets` removes.
    pub compaction_batch_fleets: u32,
    /// Most progress events a fleet started by a schedule keeps
    /// (`limits.max_events_per_fleet`).
    pub max_events_per_fleet: u32,
}

/// The leader's situation at one tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tick<'a> {
    /// Replicated time, in milliseconds since the Unix epoch (the stamp the commands get).
    pub now_ms: u64,
    /// The leader's monotonic clock, in milliseconds (the clock of its [`LeaseLiveness`]).
    pub monotonic_ms: u64,
    /// The `BootstrapToken` command of this node's bootstrap token, if it has one.
    pub bootstrap: Option<&'a Command>,
}

/// The commands the leader should propose now, in order (see the module documentation).
/// Updates `liveness` to the state's leases first ([`LeaseLiveness::reconcile`]).
pub fn tick(
    state: &State,
    settings: &EngineSettings,
    tick: &Tick<'_>,
    liveness: &mut LeaseLiveness,
) -> Vec<Command> {
    let mut commands = Vec::new();
    if !state.tokens_bootstrapped()
        && let Some(bootstrap) = tick.bootstrap
    {
        commands.push(bootstrap.clone());
    }
    liveness.reconcile(state, tick.monotonic_ms, settings.lease_ttl_ms);
    // Each with the deadline its grant has in the state, so that a grant sent again since
    // (which renews it) fences this expiry.
    let silent: Vec<(String, u32, u64)> = liveness
        .due(tick.monotonic_ms)
        .into_iter()
        .filter_map(|(run_id, attempt)| {
            let granted_until_ms = state.lease(&run_id, attempt)?.expires_at_ms;
            Some((run_id, attempt, granted_until_ms))
        })
        .collect();
    if !silent.is_empty() {
        commands.push(Command::ExpireSilentLeases { leases: silent });
    }
    if state.has_compactable_fleets(tick.now_ms, settings.fleet_retention_ms) {
        commands.push(Command::CompactFleets {
            retention_ms: settings.fleet_retention_ms,
            max_fleets: settings.compaction_batch_fleets,
        });
    }
    if state.has_due_fleet_transitions(tick.now_ms) {
        commands.push(Command::AdvanceFleets);
    }
    for schedule_id in state.due_schedules(tick.now_ms) {
        commands.push(Command::ProcessSchedule {
            schedule_id,
            max_events: settings.max_events_per_fleet,
        });
    }
    commands
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{AttemptResult, Outcome, Request, Response};
    use crate::spec::tests::spec;

    const SETTINGS: EngineSettings = EngineSettings {
        lease_ttl_ms: 5_000,
        fleet_retention_ms: 60_000,
        compaction_batch_fleets: 10,
        max_events_per_fleet: 1_000,
    };

    fn apply(state: &mut State, now_ms: u64, command: Command) -> Response {
        state.apply(&Request {
            now_ms,
            command,
            principal: Default::default(),
        })
    }

    /// A state at time 1000 with one fleet of two runs, one leased (ttl 5 s) to w1; with
    /// `finished`, both runs ended at time 2000.
    fn state(finished: bool) -> State {
        let mut state = State::new();
        apply(
            &mut state,
            1_000,
            Command::SubmitFleet {
                spec: spec(&["file:///a", "file:///b"]),
                idempotency_key: String::new(),
                trace_parent: String::new(),
                max_events: 0,
            },
        );
        let Response::Leased(grants) = apply(
            &mut state,
            1_000,
            Command::AcquireLeases {
                worker_id: "w1".into(),
                free_slots: if finished { 2 } else { 1 },
                lease_ttl_ms: 5_000,
                held: Vec::new(),
            },
        ) else {
            panic!("no lease");
        };
        if finished {
            for grant in grants {
                apply(
                    &mut state,
                    2_000,
                    Command::ReportResult {
                        worker_id: "w1".into(),
                        run_id: grant.run_id,
                        attempt: grant.attempt,
                        result: AttemptResult::failure(Outcome::Unchanged, "", false),
                    },
                );
            }
        }
        state
    }

    /// Checks one tick of a leader that took office (and ticked first) at monotonic time 0 with
    /// a grace period of 3 s, and then heard heartbeats (monotonic time, run id) in `heard`: the names of the commands
    /// returned at replicated time `now_ms` and monotonic time `monotonic_ms`.
    fn check(
        state: &State,
        now_ms: u64,
        monotonic_ms: u64,
        heard: &[(u64, &str)],
        bootstrap: bool,
        expected: &[&str],
    ) {
        let token = Command::BootstrapToken {
            accessor_id: "0".repeat(16),
            secret_sha256: "0".repeat(64),
        };
        let mut liveness = LeaseLiveness::new(0, 3_000);
        // The leader's first tick, at monotonic 0.
        liveness.reconcile(state, 0, SETTINGS.lease_ttl_ms);
        for (at_ms, run_id) in heard {
            liveness.heard(run_id, 1, *at_ms, SETTINGS.lease_ttl_ms);
        }
        let commands = tick(
            state,
            &SETTINGS,
            &Tick {
                now_ms,
                monotonic_ms,
                bootstrap: bootstrap.then_some(&token),
            },
            &mut liveness,
        );
        liveness.check_invariants().unwrap();
        let names: Vec<String> = commands
            .iter()
            .map(|command| match command {
                Command::BootstrapToken { .. } => "bootstrap".to_owned(),
                Command::ExpireSilentLeases { leases } => format!("expire {leases:?}"),
                Command::CompactFleets { .. } => "compact".to_owned(),
                Command::AdvanceFleets => "advance".to_owned(),
                _ => "other".to_owned(),
            })
            .collect();
        assert_eq!(
            names, expected,
            "now {now_ms}, monotonic {monotonic_ms}, heard {heard:?}, bootstrap {bootstrap}"
        );
    }

    #[test]
    fn the_leader_decides_expiry_compaction_and_bootstrap() {
        let running = state(false);
        // With the lease's granted deadline in the state: 1000 + 5000.
        let expire = r#"expire [("fl-1-0", 1, 6000)]"#;
        // A lease the leader found at its first tick lives ttl (5 s) from then, and at least
        // the grace period (3 s): silent from 5000.
        check(&running, 9_000, 4_999, &[], false, &[]);
        check(&running, 9_000, 5_000, &[], false, &[expire]);
        // Heartbeats move the deadline; replicated time plays no part in it.
        check(&running, 99_000, 9_998, &[(4_999, "fl-1-0")], false, &[]);
        check(
            &running,
            1_000,
            9_999,
            &[(4_999, "fl-1-0")],
            false,
            &[expire],
        );
        // A heartbeat after the deadline revives nothing.
        check(
            &running,
            1_000,
            5_000,
            &[(5_000, "fl-1-0")],
            false,
            &[expire],
        );
        // A heartbeat for a lease the state does not hold is forgotten at the tick.
        check(
            &running,
            1_000,
            10_000,
            &[(9_000, "fl-1-1")],
            false,
            &[expire],
        );
        // Bootstrap first while the cluster has no token; never without one to propose.
        check(&running, 6_000, 6_000, &[], true, &["bootstrap", expire]);
        check(&running, 1_000, 0, &[], true, &["bootstrap"]);

        let finished = state(true);
        // Ended at 2000: compacted once retention (60 s) has passed; nothing else to do.
        check(&finished, 61_999, 99_000, &[], false, &[]);
        check(&finished, 62_000, 99_000, &[], false, &["compact"]);
        check(&finished, 62_000, 0, &[], false, &["compact"]);
    }

    #[test]
    fn the_grace_period_of_a_new_leader_outlasts_a_short_ttl() {
        let running = state(false);
        let settings = EngineSettings {
            lease_ttl_ms: 1_000,
            ..SETTINGS
        };
        // Leader since monotonic 500 with a grace of 3 s: the lease it found is silent from
        // 3500, not from its first tick + ttl (1600).
        let mut liveness = LeaseLiveness::new(500, 3_000);
        for (monotonic_ms, expected) in [(600, 0), (3_499, 0), (3_500, 1)] {
            let tick_at = Tick {
                now_ms: 1_000,
                monotonic_ms,
                bootstrap: None,
            };
            let commands = tick(&running, &settings, &tick_at, &mut liveness);
            assert_eq!(commands.len(), expected, "at {monotonic_ms}: {commands:?}");
        }
    }

    #[test]
    fn a_due_deadline_is_proposed_once_and_not_before() {
        let mut state = State::new();
        let mut fleet = spec(&["file:///a"]);
        fleet.flow.deadline_ms = 10_000;
        apply(
            &mut state,
            1_000,
            Command::SubmitFleet {
                spec: fleet,
                idempotency_key: String::new(),
                trace_parent: String::new(),
                max_events: 0,
            },
        );
        check(&state, 10_999, 0, &[], false, &[]);
        check(&state, 11_000, 0, &[], false, &["advance"]);
        apply(&mut state, 11_000, Command::AdvanceFleets);
        check(&state, 12_000, 0, &[], false, &[]);
    }
}
