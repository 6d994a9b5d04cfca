//! The leader's periodic decisions as a pure function (in the manner of openraft's `Engine`):
//! [`tick`] looks at the state and the leader's situation and returns the commands the leader
//! should propose. No I/O, no clock: the node calls it on a timer with replicated time and
//! proposes what it returns; tests call it with tables of inputs.
//!
//! Decisions:
//! - `BootstrapToken` with the leader's bootstrap token while the cluster has no token yet;
//! - `ExpireLeases` when some lease has passed its expiry, but only after the leader has led for
//!   [`EngineSettings::lease_grace_after_election_ms`], so that workers that were talking to the
//!   previous leader have time to heartbeat to this one (cf. Nomad's `heartbeat_grace`);
//! - `CompactFleets` when an ended fleet is older than [`EngineSettings::fleet_retention_ms`].
//!
//! An idle state yields no command, so an idle cluster writes nothing.

use crate::command::Command;
use crate::state::State;

/// The operator settings the engine decides with (node `[limits]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineSettings {
    /// How long a new leader waits before expiring leases, in milliseconds.
    pub lease_grace_after_election_ms: u64,
    /// How long an ended fleet is kept, in milliseconds.
    pub fleet_retention_ms: u64,
    /// Most fleets one `CompactFleets` removes.
    pub compaction_batch_fleets: u32,
}

/// The leader's situation at one tick.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tick<'a> {
    /// Replicated time, in milliseconds since the Unix epoch (the stamp the commands get).
    pub now_ms: u64,
    /// How long this node has been leader, in milliseconds of its monotonic clock.
    pub leadership_ms: u64,
    /// The `BootstrapToken` command of this node's bootstrap token, if it has one.
    pub bootstrap: Option<&'a Command>,
}

/// The commands the leader should propose now, in order (see the module documentation).
pub fn tick(state: &State, settings: &EngineSettings, tick: &Tick<'_>) -> Vec<Command> {
    let mut commands = Vec::new();
    if !state.tokens_bootstrapped()
        && let Some(bootstrap) = tick.bootstrap
    {
        commands.push(bootstrap.clone());
    }
    let expiry_due = state
        .next_lease_expiry_ms()
        .is_some_and(|expiry_ms| expiry_ms <= tick.now_ms);
    if expiry_due && tick.leadership_ms >= settings.lease_grace_after_election_ms {
        commands.push(Command::ExpireLeases);
    }
    if state.has_compactable_fleets(tick.now_ms, settings.fleet_retention_ms) {
        commands.push(Command::CompactFleets {
            retention_ms: settings.fleet_retention_ms,
            max_fleets: settings.compaction_batch_fleets,
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
        lease_grace_after_election_ms: 3_000,
        fleet_retention_ms: 60_000,
        compaction_batch_fleets: 10,
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

    /// Checks one tick: the names of the commands returned.
    fn check(state: &State, now_ms: u64, leadership_ms: u64, bootstrap: bool, expected: &[&str]) {
        let token = Command::BootstrapToken {
            accessor_id: "0".repeat(16),
            secret_sha256: "0".repeat(64),
        };
        let commands = tick(
            state,
            &SETTINGS,
            &Tick {
                now_ms,
                leadership_ms,
                bootstrap: bootstrap.then_some(&token),
            },
        );
        let names: Vec<&str> = commands
            .iter()
            .map(|command| match command {
                Command::BootstrapToken { .. } => "bootstrap",
                Command::ExpireLeases => "expire",
                Command::CompactFleets { .. } => "compact",
                _ => "other",
            })
            .collect();
        assert_eq!(
            names, expected,
            "now {now_ms}, leadership {leadership_ms}, bootstrap {bootstrap}"
        );
    }

    #[test]
    fn the_leader_decides_expiry_compaction_and_bootstrap() {
        let running = state(false);
        // The lease expires at 6000.
        check(&running, 5_999, 10_000, false, &[]);
        check(&running, 6_000, 10_000, false, &["expire"]);
        // Not within the grace period of a new leader.
        check(&running, 6_000, 2_999, false, &[]);
        check(&running, 6_000, 3_000, false, &["expire"]);
        // Bootstrap first while the cluster has no token; never without one to propose.
        check(&running, 6_000, 10_000, true, &["bootstrap", "expire"]);
        check(&running, 1_000, 0, true, &["bootstrap"]);

        let finished = state(true);
        // Ended at 2000: compacted once retention (60 s) has passed; nothing else to do.
        check(&finished, 61_999, 10_000, false, &[]);
        check(&finished, 62_000, 10_000, false, &["compact"]);
        check(&finished, 62_000, 0, false, &["compact"]);
    }
}
