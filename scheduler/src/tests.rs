//! Scenario tests of the state machine. Each test drives [`State::apply`] with stamped commands
//! and checks the invariants after every step (`Harness::apply`).

use std::collections::BTreeMap;

use crate::artifact::sha256_hex;
use crate::command::{AttemptResult, Command, FileStat, Outcome, Request, Response};
use crate::spec::tests::spec;
use crate::state::{FleetState, RunState, State};

struct Harness {
    state: State,
    now_ms: u64,
}

impl Harness {
    fn new() -> Self {
        Harness {
            state: State::new(),
            now_ms: 1_000,
        }
    }

    fn apply(&mut self, command: Command) -> Response {
        let response = self.state.apply(&Request {
            now_ms: self.now_ms,
            command,
            principal: Default::default(),
        });
        if let Err(violation) = self.state.check_invariants() {
            panic!("invariant violated: {violation}");
        }
        response
    }

    fn submit(&mut self, repositories: &[&str], max_parallelism: u32, key: &str) -> String {
        let mut s = spec(repositories);
        s.max_parallelism = max_parallelism;
        match self.apply(Command::SubmitFleet {
            spec: s,
            idempotency_key: key.into(),
            trace_parent: String::new(),
            max_events: 0,
        }) {
            Response::FleetSubmitted { fleet_id, .. } => fleet_id,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Leases as a worker that received every earlier reply (it lists every lease it holds)
    /// and returns `run_id@attempt` strings.
    fn lease(&mut self, worker: &str, slots: u32) -> Vec<String> {
        let held = self.state.leases_of(worker);
        self.lease_listing(worker, slots, &held)
            .into_iter()
            .map(|(grant, redelivered)| {
                assert!(
                    !redelivered,
                    "{grant} sent again to a worker that listed it"
                );
                grant
            })
            .collect()
    }

    /// Leases as a worker that lists `held` and returns `(run_id@attempt, redelivered)`.
    fn lease_listing(
        &mut self,
        worker: &str,
        slots: u32,
        held: &[(String, u32)],
    ) -> Vec<(String, bool)> {
        match self.apply(Command::AcquireLeases {
            worker_id: worker.into(),
            free_slots: slots,
            lease_ttl_ms: 10_000,
            held: held.to_vec(),
        }) {
            Response::Leased(grants) => grants
                .iter()
                .map(|g| (format!("{}@{}", g.run_id, g.attempt), g.redelivered))
                .collect(),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn lease_expiry_ms(&self, run_id: &str) -> u64 {
        self.state
            .run(run_id)
            .and_then(|(_, run)| run.lease.as_ref().map(|l| l.expires_at_ms))
            .expect("run is leased")
    }

    fn report(
        &mut self,
        worker: &str,
        run_id: &str,
        attempt: u32,
        result: AttemptResult,
    ) -> Response {
        self.apply(Command::ReportResult {
            worker_id: worker.into(),
            run_id: run_id.into(),
            attempt,
            result,
        })
    }

    fn run_state(&self, run_id: &str) -> RunState {
        self.state
            .run(run_id)
            .map(|(_, run)| run.state)
            .expect("run exists")
    }
}

fn changed() -> AttemptResult {
    AttemptResult {
        commit: "abc".into(),
        diffstat: vec![FileStat {
            path: "src/lib.rs".into(),
            insertions: 2,
            deletions: 1,
        }],
        pushed: true,
        exit_code: 0,
        ..AttemptResult::failure(Outcome::Changed, "", false)
    }
}

fn outcome(outcome: Outcome, retryable: bool) -> AttemptResult {
    AttemptResult::failure(outcome, format!("{outcome:?}"), retryable)
}

#[test]
fn a_fleet_expands_into_runs_and_finishes_with_its_results() {
    let mut h = Harness::new();
    let fleet = h.submit(&["file:///a", "file:///b", "file:///c"], 8, "");
    assert_eq!(fleet, "fl-1");
    assert_eq!(h.lease("w1", 8), vec!["fl-1-0@1", "fl-1-1@1", "fl-1-2@1"]);
    assert_eq!(
        h.report("w1", "fl-1-0", 1, changed()),
        Response::ResultAccepted
    );
    assert_eq!(
        h.report("w1", "fl-1-1", 1, outcome(Outcome::Unchanged, false)),
        Response::ResultAccepted
    );
    assert_eq!(
        h.report("w1", "fl-1-2", 1, outcome(Outcome::AgentFailed, false)),
        Response::ResultAccepted
    );
    let f = h.state.fleet(&fleet).unwrap();
    assert_eq!(f.state, FleetState::Finished);
    assert_eq!(
        (f.counts.changed, f.counts.unchanged, f.counts.failed),
        (1, 1, 1)
    );
    assert_eq!(f.runs[0].branch, "flotilla/rustfmt");
    assert_eq!(
        f.events.back().unwrap().message,
        "fleet finished: 1 changed, 1 unchanged, 1 failed, 0 cancelled"
    );
    assert_eq!(h.lease("w1", 8), Vec::<String>::new());
}

#[test]
fn max_parallelism_bounds_leases_per_fleet() {
    let mut h = Harness::new();
    h.submit(&["file:///a", "file:///b", "file:///c"], 2, "");
    assert_eq!(h.lease("w1", 8), vec!["fl-1-0@1", "fl-1-1@1"]);
    assert_eq!(h.lease("w2", 8), Vec::<String>::new());
    h.report("w1", "fl-1-0", 1, changed());
    assert_eq!(h.lease("w2", 8), vec!["fl-1-2@1"]);
}

#[test]
fn idempotency_key_returns_the_same_fleet() {
    let mut h = Harness::new();
    let first = h.submit(&["file:///a"], 1, "key-1");
    let mut same = spec(&["file:///a"]);
    same.max_parallelism = 1;
    let again = h.apply(Command::SubmitFleet {
        spec: same,
        idempotency_key: "key-1".into(),
        trace_parent: "00-other-trace".into(),
        max_events: 0,
    });
    assert_eq!(
        again,
        Response::FleetSubmitted {
            fleet_id: first.clone(),
            created: false
        }
    );
    // The same key with another spec is a mistake the submitter must learn about.
    let conflict = h.apply(Command::SubmitFleet {
        spec: spec(&["file:///other"]),
        idempotency_key: "key-1".into(),
        trace_parent: String::new(),
        max_events: 0,
    });
    assert_eq!(
        conflict,
        Response::IdempotencyKeyConflict {
            fleet_id: first.clone()
        }
    );
    assert_eq!(h.state.fleets_before(u64::MAX, 10).count(), 1);
    let other = h.submit(&["file:///a"], 1, "key-2");
    assert_ne!(first, other);
    assert_eq!(
        h.state.fleet_by_idempotency_key("key-1").unwrap().id(),
        first
    );
}

#[test]
fn stale_attempts_are_rejected_and_recorded() {
    let mut h = Harness::new();
    h.submit(&["file:///a"], 1, "");
    assert_eq!(h.lease("w1", 1), vec!["fl-1-0@1"]);
    // The lease expires; the run is retried as attempt 2 on another worker.
    h.now_ms += 10_000;
    assert_eq!(
        h.apply(Command::ExpireLeases),
        Response::LeasesExpired { count: 1 }
    );
    assert_eq!(h.run_state("fl-1-0"), RunState::Pending);
    assert_eq!(
        h.lease("w2", 1),
        Vec::<String>::new(),
        "backoff not over yet"
    );
    h.now_ms += 1_000;
    assert_eq!(h.lease("w2", 1), vec!["fl-1-0@2"]);
    // The first worker wakes up and reports attempt 1: rejected, not applied.
    let late = h.report("w1", "fl-1-0", 1, changed());
    assert_eq!(
        late,
        Response::Rejected {
            reason: "stale attempt 1, current 2".into()
        }
    );
    assert_eq!(h.run_state("fl-1-0"), RunState::Running);
    // A worker that does not hold the lease cannot report the current attempt either.
    assert!(matches!(
        h.report("w1", "fl-1-0", 2, changed()),
        Response::Rejected { .. }
    ));
    assert_eq!(
        h.report("w2", "fl-1-0", 2, outcome(Outcome::Unchanged, false)),
        Response::ResultAccepted
    );
    // A duplicate delivery of an applied result is rejected too: exactly one terminal result.
    assert!(matches!(
        h.report("w2", "fl-1-0", 2, changed()),
        Response::Rejected { .. }
    ));
    assert_eq!(h.run_state("fl-1-0"), RunState::Unchanged);
    let (rejected, total) = h.state.rejected_results();
    assert_eq!(total, 3);
    assert_eq!(rejected[0].attempt, 1);
}

#[test]
fn retryable_failures_back_off_then_give_up_after_max_attempts() {
    let mut h = Harness::new();
    h.submit(&["file:///a"], 1, "");
    for attempt in 1..=3 {
        assert_eq!(h.lease("w1", 1), vec![format!("fl-1-0@{attempt}")]);
        h.report(
            "w1",
            "fl-1-0",
            attempt,
            outcome(Outcome::Infrastructure, true),
        );
        h.now_ms += 60_000;
    }
    assert_eq!(h.run_state("fl-1-0"), RunState::Failed);
    let (_, run) = h.state.run("fl-1-0").unwrap();
    assert_eq!(run.attempts.len(), 3);
    let fleet = h.state.fleet("fl-1").unwrap();
    assert!(
        fleet
            .events
            .iter()
            .any(|e| e.message.contains("gave up after 3 attempts")),
        "{:?}",
        fleet.events
    );
    // Backoff doubled between attempts: 1 s then 2 s.
    assert!(
        fleet
            .events
            .iter()
            .any(|e| e.message.contains("retry in 1000 ms"))
    );
    assert!(
        fleet
            .events
            .iter()
            .any(|e| e.message.contains("retry in 2000 ms"))
    );
}

#[test]
fn final_failures_are_not_retried() {
    let mut h = Harness::new();
    h.submit(&["file:///a", "file:///b"], 2, "");
    h.lease("w1", 2);
    h.report("w1", "fl-1-0", 1, outcome(Outcome::VerifyFailed, true));
    h.report("w1", "fl-1-1", 1, outcome(Outcome::Infrastructure, false));
    assert_eq!(h.run_state("fl-1-0"), RunState::Failed);
    assert_eq!(h.run_state("fl-1-1"), RunState::Failed);
}

#[test]
fn heartbeats_renew_leases_and_report_lost_ones() {
    let mut h = Harness::new();
    h.submit(&["file:///a", "file:///b"], 2, "");
    h.lease("w1", 2);
    h.now_ms += 9_000;
    let response = h.apply(Command::Heartbeat {
        worker_id: "w1".into(),
        leases: vec![
            ("fl-1-0".into(), 1),
            ("fl-1-1".into(), 7),
            ("fl-9-0".into(), 1),
        ],
        lease_ttl_ms: 10_000,
    });
    assert_eq!(
        response,
        Response::Heartbeat {
            lost: vec![("fl-1-1".into(), 7), ("fl-9-0".into(), 1)]
        }
    );
    h.now_ms += 2_000;
    // Run 0 was renewed; run 1 was not and expires.
    assert_eq!(
        h.apply(Command::ExpireLeases),
        Response::LeasesExpired { count: 1 }
    );
    assert_eq!(h.run_state("fl-1-0"), RunState::Running);
    assert_eq!(h.run_state("fl-1-1"), RunState::Pending);
}

#[test]
fn silent_leases_end_by_name_and_stale_pairs_are_skipped() {
    let mut h = Harness::new();
    h.submit(&["file:///a", "file:///b", "file:///c"], 3, "");
    h.lease("w1", 3);
    assert_eq!(h.state.lease_holder("fl-1-0", 1), Some("w1"));
    assert_eq!(h.state.lease_holder("fl-1-0", 2), None);
    assert_eq!(h.state.leases().len(), 3);
    h.report("w1", "fl-1-2", 1, outcome(Outcome::Unchanged, false));
    // The granted deadline is a fence, not a clock: the lease ends when the leader says,
    // unless its grant was renewed since.
    let granted = h.state.lease("fl-1-0", 1).unwrap().expires_at_ms;
    let response = h.apply(Command::ExpireSilentLeases {
        leases: vec![
            ("fl-1-0".into(), 1, granted),
            // Renewed grant, stale attempt, finished run, unknown fleet, not a run id: skipped.
            ("fl-1-1".into(), 1, granted + 1),
            ("fl-1-1".into(), 2, granted),
            ("fl-1-2".into(), 1, granted),
            ("fl-9-0".into(), 1, granted),
            ("nonsense".into(), 1, granted),
        ],
    });
    assert_eq!(response, Response::LeasesExpired { count: 1 });
    assert_eq!(h.run_state("fl-1-0"), RunState::Pending);
    assert_eq!(h.run_state("fl-1-1"), RunState::Running);
    let fleet = h.state.fleet("fl-1").unwrap();
    let attempt = fleet.runs[0].attempts.last().unwrap();
    assert_eq!(
        attempt.result.as_ref().unwrap().outcome,
        Outcome::LeaseExpired
    );
    h.state.check_invariants().unwrap();
    let too_many = vec![
        ("fl-1-1".to_owned(), 1, granted);
        crate::liveness::MAX_EXPIRED_LEASES_PER_COMMAND + 1
    ];
    assert!(matches!(
        h.apply(Command::ExpireSilentLeases { leases: too_many }),
        Response::Rejected { .. }
    ));
    assert_eq!(h.run_state("fl-1-1"), RunState::Running);
}

#[test]
fn cancel_ends_pending_and_running_runs() {
    let mut h = Harness::new();
    h.submit(&["file:///a", "file:///b", "file:///c"], 1, "");
    h.lease("w1", 1);
    assert_eq!(
        h.apply(Command::CancelFleet {
            fleet_id: "fl-1".into()
        }),
        Response::FleetCancelled
    );
    let fleet = h.state.fleet("fl-1").unwrap();
    assert_eq!(fleet.state, FleetState::Cancelled);
    assert_eq!(fleet.counts.cancelled, 3);
    // One event per cancelled run, so watchers see each run end, then the fleet's.
    let cancelled: Vec<(Option<u32>, u32)> = fleet
        .events
        .iter()
        .filter(|e| e.run_state == Some(RunState::Cancelled))
        .map(|e| (e.run_index, e.attempt))
        .collect();
    assert_eq!(cancelled, vec![(Some(0), 1), (Some(1), 0), (Some(2), 0)]);
    assert_eq!(fleet.events.back().unwrap().message, "fleet cancelled");
    // The worker's late result is rejected; cancelling again is a no-op.
    assert!(matches!(
        h.report("w1", "fl-1-0", 1, changed()),
        Response::Rejected { .. }
    ));
    assert_eq!(
        h.apply(Command::CancelFleet {
            fleet_id: "fl-1".into()
        }),
        Response::FleetCancelled
    );
    assert!(matches!(
        h.apply(Command::CancelFleet {
            fleet_id: "fl-7".into()
        }),
        Response::Rejected { .. }
    ));
}

#[test]
fn fleets_share_workers_fairly() {
    let mut h = Harness::new();
    h.submit(&["file:///a", "file:///b", "file:///c"], 8, "");
    h.submit(&["file:///x", "file:///y"], 8, "");
    assert_eq!(h.lease("w1", 3), vec!["fl-1-0@1", "fl-2-0@1", "fl-1-1@1"]);
}

#[test]
fn events_are_numbered_and_resumable() {
    let mut h = Harness::new();
    h.submit(&["file:///a", "file:///b"], 2, "");
    h.lease("w1", 2);
    h.report("w1", "fl-1-0", 1, changed());
    let fleet = h.state.fleet("fl-1").unwrap();
    assert_eq!(sequences(fleet, 0, 100), vec![1, 2, 3, 4]);
    assert_eq!(sequences(fleet, 2, 100), vec![3, 4]);
    assert!(sequences(fleet, 9, 100).is_empty());
    assert_eq!(sequences(fleet, 0, 1), vec![1]);
}

fn sequences(fleet: &crate::state::Fleet, after: u64, limit: usize) -> Vec<u64> {
    fleet
        .events_after(after, limit)
        .expect("events kept")
        .map(|e| e.sequence)
        .collect()
}

#[test]
fn a_fleet_keeps_its_newest_events_up_to_its_bound() {
    let mut h = Harness::new();
    let response = h.apply(Command::SubmitFleet {
        spec: spec(&["file:///a", "file:///b", "file:///c"]),
        idempotency_key: String::new(),
        trace_parent: String::new(),
        max_events: 4,
    });
    assert!(matches!(response, Response::FleetSubmitted { .. }));
    h.lease("w1", 3);
    for run in ["fl-1-0", "fl-1-1", "fl-1-2"] {
        h.report("w1", run, 1, changed());
    }
    // 1 submitted + 3 leased + 3 results + 1 finished = 8 events, the newest 4 kept.
    let fleet = h.state.fleet("fl-1").unwrap();
    assert_eq!(fleet.last_sequence(), 8);
    assert_eq!(sequences(fleet, 4, 100), vec![5, 6, 7, 8]);
    assert_eq!(sequences(fleet, 6, 100), vec![7, 8]);
    assert!(sequences(fleet, 8, 100).is_empty());
    assert!(sequences(fleet, u64::MAX, 100).is_empty());
    let dropped = fleet
        .events_after(3, 100)
        .err()
        .expect("events 1-4 were dropped");
    assert_eq!(dropped.first_available, 5);
    assert!(
        dropped.to_string().contains("resume after sequence 4"),
        "{dropped}"
    );
}

#[test]
fn long_errors_are_cut_in_events_but_kept_in_the_attempt() {
    let mut h = Harness::new();
    h.submit(&["file:///a"], 1, "");
    h.lease("w1", 1);
    let error = "é".repeat(40_000);
    h.report(
        "w1",
        "fl-1-0",
        1,
        AttemptResult::failure(Outcome::AgentFailed, error.clone(), false),
    );
    let (fleet, run) = h.state.run("fl-1-0").unwrap();
    let event = fleet
        .events
        .iter()
        .find(|e| e.run_index == Some(0) && e.run_state == Some(RunState::Failed))
        .unwrap();
    assert!(event.message.len() <= crate::state::MAX_EVENT_MESSAGE_BYTES);
    assert!(event.message.ends_with("..."));
    assert_eq!(run.last_result().unwrap().error, error);
}

#[test]
fn fleets_take_turns_when_workers_ask_for_one_slot_at_a_time() {
    let mut h = Harness::new();
    h.submit(&["file:///a", "file:///b", "file:///c", "file:///d"], 8, "");
    h.submit(&["file:///x", "file:///y"], 8, "");
    h.submit(&["file:///p"], 8, "");
    let mut order = Vec::new();
    for _ in 0..7 {
        order.extend(h.lease("w1", 1));
    }
    assert_eq!(
        order,
        vec![
            "fl-1-0@1", "fl-2-0@1", "fl-3-0@1", "fl-1-1@1", "fl-2-1@1", "fl-1-2@1", "fl-1-3@1"
        ]
    );
    // A fleet submitted later joins the rotation at once.
    h.submit(&["file:///n1", "file:///n2"], 8, "");
    h.submit(&["file:///m1"], 8, "");
    let mut order = Vec::new();
    for _ in 0..3 {
        order.extend(h.lease("w2", 1));
    }
    assert_eq!(order, vec!["fl-4-0@1", "fl-5-0@1", "fl-4-1@1"]);
}

#[test]
fn the_clock_never_steps_back_and_replay_is_deterministic() {
    let mut h = Harness::new();
    h.submit(&["file:///a"], 1, "");
    let log = [
        Request {
            now_ms: 5_000,
            command: Command::AcquireLeases {
                worker_id: "w".into(),
                free_slots: 1,
                lease_ttl_ms: 100,
                held: Vec::new(),
            },
            principal: Default::default(),
        },
        // A new leader whose clock is behind.
        Request {
            now_ms: 4_000,
            command: Command::ExpireLeases,
            principal: Default::default(),
        },
        Request {
            now_ms: 5_200,
            command: Command::ExpireLeases,
            principal: Default::default(),
        },
    ];
    let mut replica = h.state.clone();
    let responses: Vec<Response> = log.iter().map(|r| h.state.apply(r)).collect();
    assert_eq!(
        responses[1],
        Response::LeasesExpired { count: 0 },
        "time did not step back to 4000"
    );
    assert_eq!(responses[2], Response::LeasesExpired { count: 1 });
    let replayed: Vec<Response> = log.iter().map(|r| replica.apply(r)).collect();
    assert_eq!(responses, replayed);
    assert_eq!(h.state, replica);
}

#[test]
fn unknown_ids_are_rejected_without_change() {
    let mut h = Harness::new();
    h.submit(&["file:///a"], 1, "");
    let before = h.state.clone();
    for id in ["fl-1-5", "fl-2-0", "nonsense", "fl--1-0", "fl-+1-0"] {
        assert!(
            matches!(h.report("w", id, 1, changed()), Response::Rejected { .. }),
            "{id}"
        );
    }
    // Only the rejection record changed.
    assert_eq!(h.state.fleet("fl-1"), before.fleet("fl-1"));
}

#[test]
fn ended_fleets_are_compacted_after_their_retention() {
    let mut h = Harness::new();
    h.submit(&["file:///a"], 1, "old");
    h.submit(&["file:///b"], 1, "running");
    h.lease("w", 2);
    h.report("w", "fl-1-0", 1, changed());
    let compact = Command::CompactFleets {
        retention_ms: 5_000,
        max_fleets: 10,
    };
    h.now_ms += 4_999;
    assert_eq!(
        h.apply(compact.clone()),
        Response::FleetsCompacted { count: 0 }
    );
    h.now_ms += 1;
    assert!(h.state.has_compactable_fleets(h.now_ms, 5_000));
    assert_eq!(
        h.apply(compact.clone()),
        Response::FleetsCompacted { count: 1 }
    );
    assert!(h.state.fleet("fl-1").is_none());
    assert!(
        h.state.fleet("fl-2").is_some(),
        "a running fleet is never compacted"
    );
    // Its idempotency key is forgotten with it; fleet numbers are never reused.
    assert_eq!(h.submit(&["file:///a"], 1, "old"), "fl-3");
    assert!(!h.state.has_compactable_fleets(h.now_ms, 5_000));
}

#[test]
fn patches_and_log_tails_leave_the_state_as_artifact_effects() {
    use crate::artifact::{ArtifactKey, ArtifactKind, Effect};
    let mut h = Harness::new();
    h.submit(&["file:///a"], 1, "");
    h.lease("w1", 1);
    let result = AttemptResult {
        log_tail: "building...\ndone\n".into(),
        patch: "--- a/x\n+++ b/x\n".into(),
        ..changed()
    };
    let mut effects = Vec::new();
    let response = h.state.apply_with_effects(
        0,
        &Request {
            now_ms: h.now_ms,
            command: Command::ReportResult {
                worker_id: "w1".into(),
                run_id: "fl-1-0".into(),
                attempt: 1,
                result,
            },
            principal: Default::default(),
        },
        &mut effects,
    );
    assert_eq!(response, Response::ResultAccepted);
    let key = |kind| ArtifactKey {
        fleet_number: 1,
        run_index: 0,
        attempt: 1,
        kind,
    };
    assert_eq!(
        effects,
        vec![
            Effect::PutArtifact {
                key: key(ArtifactKind::LogTail),
                bytes: b"building...\ndone\n".to_vec()
            },
            Effect::PutArtifact {
                key: key(ArtifactKind::Patch),
                bytes: b"--- a/x\n+++ b/x\n".to_vec()
            },
        ]
    );
    let (_, run) = h.state.run("fl-1-0").unwrap();
    let stored = run.last_result().unwrap();
    assert!(stored.log_tail.is_empty() && stored.patch.is_empty());
    assert_eq!(stored.log_tail_size_bytes, 17);
    assert_eq!(stored.log_tail_sha256, sha256_hex(b"building...\ndone\n"));
    assert_eq!(stored.patch_size_bytes, 16);
    assert_eq!(stored.patch_sha256, sha256_hex(b"--- a/x\n+++ b/x\n"));
    // A rejected (stale) result stores nothing.
    let mut effects = Vec::new();
    let stale = h.state.apply_with_effects(
        0,
        &Request {
            now_ms: h.now_ms,
            command: Command::ReportResult {
                worker_id: "w1".into(),
                run_id: "fl-1-0".into(),
                attempt: 1,
                result: AttemptResult {
                    patch: "other".into(),
                    ..changed()
                },
            },
            principal: Default::default(),
        },
        &mut effects,
    );
    assert!(matches!(stale, Response::Rejected { .. }));
    assert!(effects.is_empty());
    // Compaction deletes the fleet's artifacts with it.
    h.now_ms += 10_000;
    let mut effects = Vec::new();
    h.state.apply_with_effects(
        0,
        &Request {
            now_ms: h.now_ms,
            command: Command::CompactFleets {
                retention_ms: 1_000,
                max_fleets: 10,
            },
            principal: Default::default(),
        },
        &mut effects,
    );
    assert_eq!(
        effects,
        vec![Effect::DeleteFleetArtifacts { fleet_number: 1 }]
    );
}

fn held(leases: &[(&str, u32)]) -> Vec<(String, u32)> {
    leases
        .iter()
        .map(|(run_id, attempt)| (run_id.to_string(), *attempt))
        .collect()
}

#[test]
fn a_lost_lease_reply_is_sent_again_under_the_same_attempt() {
    let mut h = Harness::new();
    let mut s = spec(&["file:///a"]);
    s.retry.max_attempts = 1;
    h.apply(Command::SubmitFleet {
        spec: s,
        idempotency_key: String::new(),
        trace_parent: String::new(),
        max_events: 0,
    });
    // The grant is committed but its reply never reaches the worker.
    assert_eq!(
        h.lease_listing("w1", 2, &[]),
        vec![("fl-1-0@1".to_string(), false)]
    );
    assert!(h.state.has_unlisted_leases("w1", &[]));
    assert!(!h.state.has_unlisted_leases("w1", &held(&[("fl-1-0", 1)])));
    assert!(!h.state.has_unlisted_leases("w2", &[]));
    // The worker's next request does not list it: the same attempt comes back, renewed.
    h.now_ms += 4_000;
    assert_eq!(
        h.lease_listing("w1", 2, &[]),
        vec![("fl-1-0@1".to_string(), true)]
    );
    assert_eq!(h.lease_expiry_ms("fl-1-0"), h.now_ms + 10_000);
    // Once listed, it is not sent again; nothing else is pending.
    assert!(h.lease_listing("w1", 2, &held(&[("fl-1-0", 1)])).is_empty());
    assert_eq!(
        h.report("w1", "fl-1-0", 1, outcome(Outcome::Unchanged, false)),
        Response::ResultAccepted
    );
    let (fleet, run) = h.state.run("fl-1-0").unwrap();
    assert_eq!(run.state, RunState::Unchanged);
    assert_eq!(
        run.attempts.len(),
        1,
        "no attempt was lost: {:?}",
        run.attempts
    );
    // The re-sent lease is an event marked as a redelivery of attempt 1, the first is not.
    let leased: Vec<(u32, bool)> = fleet
        .events
        .iter()
        .filter(|e| e.run_state == Some(RunState::Running))
        .map(|e| (e.attempt, e.redelivered))
        .collect();
    assert_eq!(leased, vec![(1, false), (1, true)]);
    assert!(
        fleet
            .events
            .iter()
            .any(|e| e.message == "attempt 1 lease sent again to w1, which had not received it"),
        "{:?}",
        fleet.events
    );
}

#[test]
fn leases_sent_again_take_free_slots_first() {
    let mut h = Harness::new();
    h.submit(&["file:///a", "file:///b", "file:///c"], 8, "");
    assert_eq!(h.lease_listing("w1", 2, &[]).len(), 2);
    // Both replies were lost; the worker asks with its 2 free slots: only those come back.
    assert_eq!(
        h.lease_listing("w1", 2, &[]),
        vec![
            ("fl-1-0@1".to_string(), true),
            ("fl-1-1@1".to_string(), true)
        ]
    );
    // A worker listing one of them and asking for 2 slots gets the other back and one new run.
    assert_eq!(
        h.lease_listing("w1", 2, &held(&[("fl-1-0", 1)])),
        vec![
            ("fl-1-1@1".to_string(), true),
            ("fl-1-2@1".to_string(), false)
        ]
    );
    // Another worker's request never touches w1's leases.
    assert!(h.lease_listing("w2", 4, &[]).is_empty());
    assert_eq!(h.state.leases_of("w1").len(), 3);
}

#[test]
fn unlisted_leases_beyond_the_free_slots_are_released_not_left_to_expire() {
    let mut h = Harness::new();
    h.submit(&["file:///a", "file:///b"], 8, "");
    assert_eq!(h.lease_listing("w1", 2, &[]).len(), 2);
    // The worker restarted with one slot: it gets one lease back, the other is released now
    // (its attempt ends as lease_expired and is retried), not after the lease's TTL.
    assert_eq!(
        h.lease_listing("w1", 1, &[]),
        vec![("fl-1-0@1".to_string(), true)]
    );
    assert_eq!(h.run_state("fl-1-1"), RunState::Pending);
    let (_, run) = h.state.run("fl-1-1").unwrap();
    let result = run.last_result().unwrap();
    assert_eq!(result.outcome, Outcome::LeaseExpired);
    assert!(
        result
            .error
            .starts_with("lease released: w1 never received it"),
        "{}",
        result.error
    );
    // After its backoff the run is leased again as attempt 2.
    h.now_ms += 1_000;
    assert_eq!(h.lease("w1", 1), vec!["fl-1-1@2"]);
}

#[test]
fn a_worker_holding_another_attempt_of_a_run_gets_the_current_one_again() {
    let mut h = Harness::new();
    h.submit(&["file:///a"], 1, "");
    assert_eq!(h.lease("w1", 1), vec!["fl-1-0@1"]);
    h.now_ms += 10_000;
    h.apply(Command::ExpireLeases);
    h.now_ms += 1_000;
    // Attempt 2 goes to the same worker, but the reply is lost; the worker still lists
    // attempt 1 (it has not heard that it lost it).
    assert_eq!(
        h.lease_listing("w1", 1, &held(&[("fl-1-0", 1)])),
        vec![("fl-1-0@2".to_string(), false)]
    );
    assert_eq!(
        h.lease_listing("w1", 1, &held(&[("fl-1-0", 1)])),
        vec![("fl-1-0@2".to_string(), true)]
    );
}

#[test]
fn bootstrap_is_accepted_once_and_tokens_authenticate_until_revoked_or_expired() {
    use crate::token::{AuthenticationError, Principal, Role, format_token};
    let mut state = State::new();
    let secret = "1".repeat(64);
    let hash = sha256_hex(secret.as_bytes());
    let node = Principal::Node { node_id: 1 };
    let bootstrap = |accessor: &str| Command::BootstrapToken {
        accessor_id: accessor.into(),
        secret_sha256: hash.clone(),
    };
    assert!(!state.tokens_bootstrapped());
    let first = state.apply(&Request::new(
        10,
        bootstrap("000000000000000a"),
        node.clone(),
    ));
    assert!(matches!(first, Response::TokenCreated { .. }), "{first:?}");
    assert!(state.tokens_bootstrapped());
    // A second bootstrap (another node's file, a racing operator) is refused.
    let second = state.apply(&Request::new(
        11,
        bootstrap("000000000000000b"),
        node.clone(),
    ));
    assert!(matches!(second, Response::Rejected { .. }), "{second:?}");
    let bearer = format_token("000000000000000a", &secret);
    let token = state.authenticate(&bearer, 12).unwrap();
    assert_eq!(token.role, Role::Admin);
    assert_eq!(token.project, None);
    assert!(matches!(
        state.authenticate(&format_token("000000000000000a", &"2".repeat(64)), 12),
        Err(AuthenticationError::Unknown(_))
    ));
    assert!(matches!(
        state.authenticate(&format_token("000000000000000b", &secret), 12),
        Err(AuthenticationError::Unknown(_))
    ));
    // An expiring, project-scoped token.
    let created = state.apply(&Request::new(
        20,
        Command::CreateToken {
            accessor_id: "000000000000000c".into(),
            secret_sha256: hash.clone(),
            name: "ci".into(),
            project: Some("a".into()),
            role: Role::Submitter,
            worker_id: None,
            expires_ms: Some(100),
        },
        Principal::Unknown,
    ));
    assert!(matches!(created, Response::TokenCreated { .. }));
    let short = format_token("000000000000000c", &secret);
    assert!(state.authenticate(&short, 99).is_ok());
    assert!(matches!(
        state.authenticate(&short, 100),
        Err(AuthenticationError::Expired(_))
    ));
    // Inconsistent tokens are refused by the state itself.
    for (role, project, worker) in [
        (Role::Submitter, None, None),
        (Role::Admin, Some("a"), None),
        (Role::Worker, None, None),
        (Role::Viewer, Some("a"), Some("w1")),
    ] {
        let response = state.apply(&Request::new(
            21,
            Command::CreateToken {
                accessor_id: "000000000000000d".into(),
                secret_sha256: hash.clone(),
                name: "bad".into(),
                project: project.map(Into::into),
                role,
                worker_id: worker.map(Into::into),
                expires_ms: None,
            },
            Principal::Unknown,
        ));
        assert!(matches!(response, Response::Rejected { .. }), "{role:?}");
    }
    let revoked = state.apply(&Request::new(
        30,
        Command::RevokeToken {
            accessor_id: "000000000000000a".into(),
        },
        Principal::Unknown,
    ));
    assert_eq!(revoked, Response::TokenRevoked);
    assert!(matches!(
        state.authenticate(&bearer, 31),
        Err(AuthenticationError::Revoked(_))
    ));
    // A submission records its submitter.
    let mut spec = spec(&["file:///a"]);
    spec.project = "a".into();
    let submitter = Principal::Token {
        accessor_id: "000000000000000c".into(),
        name: "ci".into(),
        role: Role::Submitter,
    };
    state.apply(&Request::new(
        40,
        Command::SubmitFleet {
            spec,
            idempotency_key: String::new(),
            trace_parent: String::new(),
            max_events: 0,
        },
        submitter.clone(),
    ));
    assert_eq!(state.fleet("fl-1").unwrap().submitted_by, submitter);
    assert_eq!(state.fleet("fl-1").unwrap().spec.project, "a");
}

#[test]
fn a_fleet_names_only_secrets_that_exist_in_its_project() {
    use crate::secret::SecretEnvelope;
    let mut harness = Harness::new();
    let mut s = spec(&["file:///srv/a"]);
    s.agent
        .secrets
        .insert("API_TOKEN".into(), "api-token".into());
    let submit = |s: &crate::spec::FleetSpec| Command::SubmitFleet {
        spec: s.clone(),
        idempotency_key: String::new(),
        trace_parent: String::new(),
        max_events: 0,
    };
    assert_eq!(
        harness.apply(submit(&s)),
        Response::Rejected {
            reason: "spec.agent.secrets.API_TOKEN: no secret \"api-token\" in project \"default\""
                .into()
        }
    );
    let set = |project: &str| Command::SetSecret {
        project: project.into(),
        name: "api-token".into(),
        version: 1,
        value_size_bytes: 12,
        envelope: SecretEnvelope {
            key_id: "k".into(),
            wrapped_data_key: "AA==".into(),
            ciphertext: "AA==".into(),
        },
        max_secrets_per_project: 10,
        max_secrets_total: 10,
    };
    // A secret of another project does not count.
    assert_eq!(
        harness.apply(set("other")),
        Response::SecretSet { version: 1 }
    );
    assert!(matches!(
        harness.apply(submit(&s)),
        Response::Rejected { .. }
    ));
    assert_eq!(
        harness.apply(set("default")),
        Response::SecretSet { version: 1 }
    );
    assert!(matches!(
        harness.apply(submit(&s)),
        Response::FleetSubmitted { created: true, .. }
    ));
    // The state holds the envelope, never a value; the spec holds the name.
    let text = serde_json::to_string(&harness.state).unwrap();
    assert!(text.contains("\"api-token\""));
}

#[test]
fn the_audit_record_of_a_result_names_what_the_sandbox_refused() {
    use crate::command::SandboxDenial;
    let mut h = Harness::new();
    h.submit(&["file:///a"], 1, "");
    h.lease("w1", 1);
    let denial = |mechanism: &str, action: &str, count| SandboxDenial {
        mechanism: mechanism.into(),
        action: action.into(),
        command: "agent".into(),
        count,
    };
    let result = AttemptResult {
        sandbox_denials: vec![
            denial("seccomp", "ptrace", 6),
            denial("cgroup", "pids.max", 120),
        ],
        ..outcome(Outcome::AgentFailed, false)
    };
    h.report("w1", "fl-1-0", 1, result);
    let record = h.state.audit().records().back().expect("a record");
    assert_eq!(record.action, "report_result");
    assert!(
        record.target.ends_with(
            "agent_failed; sandbox denied seccomp ptrace x6 (agent), cgroup pids.max x120 (agent)"
        ),
        "{}",
        record.target
    );
}

#[test]
fn a_state_from_before_the_derived_indexes_rebuilds_them_and_still_expires_and_leases() {
    let mut h = Harness::new();
    h.submit(&["file:///a", "file:///b", "file:///c"], 3, "");
    assert_eq!(h.lease("w1", 2).len(), 2);
    assert_eq!(h.lease("w2", 1).len(), 1);
    // The state as written before the lease index existed: no index, version 0.
    let mut value = serde_json::to_value(&h.state).unwrap();
    let object = value.as_object_mut().unwrap();
    assert!(object.remove("index_version").is_some());
    for fleet in object["fleets"].as_object_mut().unwrap().values_mut() {
        let fleet = fleet.as_object_mut().unwrap();
        assert!(fleet.remove("leases").is_some());
        assert!(fleet.remove("pending_by_time").is_some());
    }
    let old: State = serde_json::from_value(value).unwrap();
    // Reads before any apply build what they need.
    assert_eq!(old.leases_of("w1").len(), 2);
    assert_eq!(old.leases(), h.state.leases());
    h.state = old;
    h.now_ms += 10_000;
    assert_eq!(
        h.apply(Command::ExpireLeases),
        Response::LeasesExpired { count: 3 }
    );
    h.state.check_invariants().unwrap();
    assert!(h.state.leases_of("w1").is_empty());
}

/// One step of the randomized state-machine test.
#[derive(Clone, Debug)]
enum Step {
    Submit {
        runs: usize,
        parallelism: u32,
        /// Bits choosing flow controls: waves, approval, failure limit, deadline, shared
        /// repositories, consecutive failure limit, soak.
        flow: u8,
        priority: u32,
    },
    /// Limit `l<number>`: `kind` chooses concurrency (queue, skip, cancel older) or rate,
    /// and its key.
    Limit {
        number: u8,
        kind: u8,
        cap: u32,
    },
    Unlimit {
        number: u8,
    },
    /// Pause, resume or approve fleet `fleet`.
    Flow {
        fleet: u64,
        action: u8,
    },
    Lease {
        worker: u8,
        slots: u32,
        forget: bool,
    },
    Heartbeat {
        worker: u8,
    },
    Report {
        worker: u8,
        pick: usize,
        outcome: u8,
    },
    Expire,
    /// A heartbeat as the leader handles it now: deadlines in memory, no command.
    Hear {
        worker: u8,
    },
    /// The leader's engine tick (expiry of silent leases, compaction).
    Tick,
    Cancel {
        fleet: u64,
    },
    Advance {
        ms: u64,
    },
    /// A schedule `s<number>` every `every_s` seconds with the overlap policy `overlap`
    /// (ticks come from the engine's `Tick`).
    Schedule {
        number: u8,
        every_s: u64,
        overlap: u8,
    },
    PauseSchedule {
        number: u8,
    },
    ResumeSchedule {
        number: u8,
    },
    /// A manual trigger `t<trigger>` of `s<number>` under overlap policy `overlap`.
    TriggerSchedule {
        number: u8,
        trigger: u8,
        overlap: u8,
    },
    /// Delivery `d<delivery>` with a fleet (or, when `refused`, an error) from rule `r<rule>`.
    Deliver {
        delivery: u8,
        rule: u8,
        refused: bool,
    },
    /// A backfill of `s<number>` over the last `span_ms` before now.
    BackfillSchedule {
        number: u8,
        span_ms: u64,
        overlap: u8,
    },
}

const OVERLAP_POLICIES: [crate::schedule::plan::OverlapPolicy; 5] = {
    use crate::schedule::plan::OverlapPolicy;
    [
        OverlapPolicy::Skip,
        OverlapPolicy::BufferOne,
        OverlapPolicy::BufferAll,
        OverlapPolicy::CancelOther,
        OverlapPolicy::AllowAll,
    ]
};

fn step_strategy() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        1 => (1usize..6, 1u32..4, any::<u8>(), 0u32..3).prop_map(|(runs, parallelism, flow, priority)| Step::Submit { runs, parallelism, flow, priority }),
        1 => (0u8..3, any::<u8>(), 1u32..3).prop_map(|(number, kind, cap)| Step::Limit { number, kind, cap }),
        1 => (0u8..3).prop_map(|number| Step::Unlimit { number }),
        2 => (1u64..5, 0u8..3).prop_map(|(fleet, action)| Step::Flow { fleet, action }),
        4 => (0u8..3, 1u32..4, any::<bool>()).prop_map(|(worker, slots, forget)| Step::Lease { worker, slots, forget }),
        2 => (0u8..3).prop_map(|worker| Step::Heartbeat { worker }),
        4 => (0u8..3, any::<usize>(), 0u8..5).prop_map(|(worker, pick, outcome)| Step::Report { worker, pick, outcome }),
        1 => Just(Step::Expire),
        2 => (0u8..3).prop_map(|worker| Step::Hear { worker }),
        2 => Just(Step::Tick),
        1 => (1u64..4).prop_map(|fleet| Step::Cancel { fleet }),
        2 => (1u64..20_000).prop_map(|ms| Step::Advance { ms }),
        1 => (0u8..3, 1u64..6, 0u8..5).prop_map(|(number, every_s, overlap)| Step::Schedule { number, every_s, overlap }),
        1 => (0u8..3).prop_map(|number| Step::PauseSchedule { number }),
        1 => (0u8..3).prop_map(|number| Step::ResumeSchedule { number }),
        1 => (0u8..3, 0u8..4, 0u8..5).prop_map(|(number, trigger, overlap)| Step::TriggerSchedule { number, trigger, overlap }),
        1 => (0u8..3, 0u64..30_000, 0u8..5).prop_map(|(number, span_ms, overlap)| Step::BackfillSchedule { number, span_ms, overlap }),
        1 => (0u8..6, 0u8..2, any::<bool>()).prop_map(|(delivery, rule, refused)| Step::Deliver { delivery, rule, refused }),
    ]
}

/// The command of `step` against `state` at `now_ms` (`None` for a pure time step).
fn step_command(state: &State, step: &Step) -> Option<Command> {
    let worker = |id: u8| format!("w{id}");
    Some(match step {
        Step::Submit {
            runs,
            parallelism,
            flow,
            priority,
        } => {
            let urls: Vec<String> = (0..*runs)
                .map(|i| format!("file:///org{}/r{i}", i % 2))
                .collect();
            let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
            let mut s = spec(&refs);
            s.max_parallelism = *parallelism;
            s.retry.max_attempts = 2;
            let bit = |n: u8| flow & (1 << n) != 0;
            s.flow.priority = priority * 50;
            if bit(0) {
                s.flow.waves = vec![
                    crate::wave::WaveSize::Runs(1),
                    crate::wave::WaveSize::Percent(50),
                ];
                s.flow.success_threshold_percent = 50;
            }
            s.flow.require_approval = bit(1);
            s.flow.failure_limit = bit(2).then_some(0);
            s.flow.deadline_ms = if bit(3) { 15_000 } else { 0 };
            s.flow.shared_repositories = bit(4);
            s.flow.consecutive_failure_limit = bit(5).then_some(1);
            s.flow.soak_ms = if bit(6) { 3_000 } else { 0 };
            s.flow.approve_each_wave = bit(7);
            Command::SubmitFleet {
                spec: s,
                idempotency_key: String::new(),
                trace_parent: String::new(),
                max_events: 8,
            }
        }
        Step::Lease {
            worker: id,
            slots,
            forget,
        } => Command::AcquireLeases {
            worker_id: worker(*id),
            free_slots: *slots,
            lease_ttl_ms: 5_000,
            // A worker that lost a reply lists nothing: its leases are sent again.
            held: if *forget {
                Vec::new()
            } else {
                state.leases_of(&worker(*id))
            },
        },
        Step::Limit { number, kind, cap } => {
            use crate::limit::{LimitKey, LimitKind, LimitSpec, WhenFull};
            let keys = [
                LimitKey::Global,
                LimitKey::Organisation,
                LimitKey::Repository,
                LimitKey::Fleet,
            ];
            let kind_spec = match kind % 4 {
                0 => LimitKind::Concurrency {
                    max_running: *cap,
                    when_full: WhenFull::Queue,
                    // Every other queue is bounded (a few fleets' worth of runs).
                    max_queued: (number % 2 == 0).then_some(*cap * 3),
                },
                1 => LimitKind::Concurrency {
                    max_running: *cap,
                    when_full: WhenFull::Skip,
                    max_queued: None,
                },
                2 => LimitKind::Concurrency {
                    max_running: *cap,
                    when_full: WhenFull::CancelOlder,
                    max_queued: None,
                },
                _ => LimitKind::Rate {
                    limit: *cap,
                    period_ms: 2_000,
                    burst: *cap,
                },
            };
            Command::CreateLimit {
                spec: LimitSpec {
                    name: format!("l{number}"),
                    project: String::new(),
                    key: keys[(kind / 4 % 4) as usize],
                    kind: kind_spec,
                },
                max_limits: 3,
            }
        }
        Step::Unlimit { number } => Command::DeleteLimit {
            name: format!("l{number}"),
        },
        Step::Flow { fleet, action } => {
            let fleet_id = crate::state::fleet_id(*fleet);
            let note = String::new();
            match action {
                0 => Command::PauseFleet { fleet_id, note },
                1 => Command::ResumeFleet { fleet_id, note },
                _ => Command::ApproveFleet { fleet_id, note },
            }
        }
        Step::Heartbeat { worker: id } => Command::Heartbeat {
            worker_id: worker(*id),
            leases: state.leases_of(&worker(*id)),
            lease_ttl_ms: 5_000,
        },
        Step::Report {
            worker: id,
            pick,
            outcome,
        } => {
            let held = state.leases_of(&worker(*id));
            let (run_id, attempt) = held.get(pick % held.len().max(1))?.clone();
            let outcome = [
                Outcome::Changed,
                Outcome::Unchanged,
                Outcome::AgentFailed,
                Outcome::Infrastructure,
                Outcome::TimedOut,
            ][*outcome as usize];
            let result = if outcome == Outcome::Changed {
                changed()
            } else {
                AttemptResult::failure(outcome, "x", true)
            };
            Command::ReportResult {
                worker_id: worker(*id),
                run_id,
                attempt,
                result,
            }
        }
        Step::Expire => Command::ExpireLeases,
        Step::Cancel { fleet } => Command::CancelFleet {
            fleet_id: format!("fl-{fleet}"),
        },
        Step::Schedule {
            number,
            every_s,
            overlap,
        } => {
            use crate::schedule::plan::SchedulePolicy;
            let overlap = OVERLAP_POLICIES[*overlap as usize];
            let mut fleet = spec(&["file:///scheduled"]);
            fleet.retry.max_attempts = 2;
            Command::CreateSchedule {
                spec: crate::schedule::record::ScheduleSpec {
                    name: format!("s{number}"),
                    calendar: crate::schedule::calendar::CalendarSpec {
                        every: format!("{every_s}s"),
                        ..Default::default()
                    },
                    policy: SchedulePolicy {
                        overlap,
                        buffer_limit: 3,
                        catch_up_window_ms: 10_000,
                        pause_on_failed_runs: 1,
                        ..SchedulePolicy::default()
                    },
                    fleet,
                },
                max_schedules: 2,
            }
        }
        Step::PauseSchedule { number } => Command::PauseSchedule {
            schedule_id: format!("default/s{number}"),
            note: "random".into(),
        },
        Step::ResumeSchedule { number } => Command::ResumeSchedule {
            schedule_id: format!("default/s{number}"),
            note: "random".into(),
        },
        Step::TriggerSchedule {
            number,
            trigger,
            overlap,
        } => Command::TriggerSchedule {
            schedule_id: format!("default/s{number}"),
            trigger_id: format!("t{trigger}"),
            overlap: OVERLAP_POLICIES[*overlap as usize],
            max_events: 1_000,
        },
        Step::BackfillSchedule {
            number,
            span_ms,
            overlap,
        } => {
            // Up to the last decided time: later ones are the schedule's own (refused).
            let to_ms = state
                .schedule(&format!("default/s{number}"))
                .map_or(0, |schedule| schedule.progress.processed_until_ms);
            Command::BackfillSchedule {
                schedule_id: format!("default/s{number}"),
                from_ms: to_ms.saturating_sub(*span_ms),
                to_ms,
                overlap: OVERLAP_POLICIES[*overlap as usize],
                max_events: 1_000,
            }
        }
        Step::Deliver {
            delivery,
            rule,
            refused,
        } => {
            use crate::event::delivery::{DeliveryHeader, RuleMatch, RuleResult};
            let result = if *refused {
                RuleResult::Error("refused".into())
            } else {
                RuleResult::Fleet(Box::new(spec(&["file:///delivered"])))
            };
            Command::DeliverEvent {
                header: DeliveryHeader {
                    project: "default".into(),
                    source: "github".into(),
                    delivery_id: format!("d{delivery}"),
                    event_type: "push".into(),
                    repository: String::new(),
                    payload_sha256: String::new(),
                    payload_bytes: 0,
                    verdict: "random".into(),
                },
                matches: vec![RuleMatch {
                    rule_id: format!("default/r{rule}"),
                    result,
                }],
                rules_evaluated: 1,
                retention_ms: 60_000,
                max_deliveries: 4,
                max_events: 1_000,
            }
        }
        Step::Advance { .. } | Step::Hear { .. } | Step::Tick => return None,
    })
}

/// Running runs per concurrency `(limit, key)`.
fn limit_usage(state: &State) -> BTreeMap<(String, String), u64> {
    state
        .limits()
        .flat_map(|limit| {
            state
                .limit_keys(&limit.spec.name, usize::MAX)
                .into_iter()
                .filter(|_| matches!(limit.spec.kind, crate::limit::LimitKind::Concurrency { .. }))
                .map(|(key, count)| ((limit.spec.name.clone(), key), count))
        })
        .collect()
}

/// After a fleet was created: no key of a bounded queue that its runs wait on holds more
/// waiting runs than the limit's `max_queued` (a retry may take a key over the bound later,
/// but a submission never does).
fn check_queues(state: &State, response: &Response) -> Result<(), String> {
    use crate::limit::LimitKind;
    let Response::FleetSubmitted {
        fleet_id,
        created: true,
    } = response
    else {
        return Ok(());
    };
    let Some(fleet) = state.fleet(fleet_id) else {
        return Err(format!("{fleet_id} was submitted but does not exist"));
    };
    for limit in state.limits() {
        let LimitKind::Concurrency {
            max_queued: Some(max_queued),
            ..
        } = limit.spec.kind
        else {
            continue;
        };
        if !limit.spec.applies_to(&fleet.spec.project) {
            continue;
        }
        let waiting: BTreeMap<String, u64> = state
            .waiting_runs(&limit.spec.name, usize::MAX)
            .into_iter()
            .collect();
        for run in fleet.runs.iter() {
            let key = limit
                .spec
                .key
                .of(&fleet.spec.project, fleet_id, &run.repository);
            let count = waiting.get(&key).copied().unwrap_or(0);
            if count > u64::from(max_queued) {
                return Err(format!(
                    "{fleet_id} was admitted with {count} runs waiting on {} key {key}, \
                     max_queued {max_queued}",
                    limit.spec.name
                ));
            }
        }
    }
    Ok(())
}

/// After `request` answered `response`: no concurrency key that gained a run exceeds its cap,
/// and no rate key granted more than `burst + limit` leases in any period (GCRA's bound).
/// `rate_grants` keeps every new lease's time per rate `(limit, key)` since the limit was
/// created.
fn check_limits(
    state: &State,
    before: &BTreeMap<(String, String), u64>,
    response: &Response,
    request: &Request,
    rate_grants: &mut BTreeMap<(String, String), Vec<u64>>,
) -> Result<(), String> {
    use crate::limit::LimitKind;
    match &request.command {
        Command::CreateLimit { spec, .. } if matches!(response, Response::LimitCreated { .. }) => {
            rate_grants.retain(|(name, _), _| *name != spec.name);
        }
        Command::DeleteLimit { name } => rate_grants.retain(|(limit, _), _| limit != name),
        _ => {}
    }
    for (slot, count) in limit_usage(state) {
        let Some(limit) = state.limits().find(|l| l.spec.name == slot.0) else {
            continue;
        };
        // Only a lease takes slots (a limit created over running runs counts them at once).
        if let LimitKind::Concurrency { max_running, .. } = limit.spec.kind
            && matches!(request.command, Command::AcquireLeases { .. })
            && count > before.get(&slot).copied().unwrap_or(0)
            && count > u64::from(max_running)
        {
            return Err(format!("{slot:?} has {count} running, cap {max_running}"));
        }
    }
    check_queues(state, response)?;
    let Response::Leased(grants) = response else {
        return Ok(());
    };
    for grant in grants.iter().filter(|g| !g.redelivered) {
        for limit in state.limits() {
            let LimitKind::Rate {
                limit: units,
                period_ms,
                burst,
            } = limit.spec.kind
            else {
                continue;
            };
            let key = limit
                .spec
                .key
                .of(&grant.spec.project, &grant.fleet_id, &grant.repository);
            let times = rate_grants
                .entry((limit.spec.name.clone(), key.clone()))
                .or_default();
            times.push(request.now_ms);
            let interval_us =
                crate::limit::gcra::Gcra::new(units, period_ms, burst).emission_interval_us;
            for (i, start) in times.iter().enumerate() {
                for window_ms in [1, period_ms / 2, period_ms] {
                    let inside = times[i..]
                        .iter()
                        .take_while(|t| **t < start + window_ms)
                        .count();
                    let bound = burst as usize + (window_ms * 1_000 / interval_us) as usize;
                    if inside > bound {
                        return Err(format!(
                            "rate {} key {key}: {inside} grants in {window_ms} ms from {start}, at most {bound}",
                            limit.spec.name
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Any sequence of commands, including the engine's decisions from heartbeats heard in
    /// the leader's memory, keeps every invariant (the lease index and the liveness tracker
    /// among them), and replaying the same entries on a fresh state gives the same state, byte
    /// for byte.
    #[test]
    fn random_command_sequences_keep_the_invariants_and_replay_identically(
        steps in proptest::collection::vec(step_strategy(), 1..80)
    ) {
        use crate::engine::{EngineSettings, Tick};
        let mut state = State::new();
        let mut now_ms = 1_000;
        let mut log = Vec::new();
        let settings = EngineSettings {
            lease_ttl_ms: 5_000,
            fleet_retention_ms: 30_000,
            compaction_batch_fleets: 2,
            max_events_per_fleet: 1_000,
        };
        let mut rate_grants = BTreeMap::new();
        // The test's one clock serves as replicated and monotonic time.
        let mut liveness = crate::liveness::LeaseLiveness::new(now_ms, 2_000);
        for step in &steps {
            let commands = match step {
                Step::Advance { ms } => {
                    now_ms += ms;
                    continue;
                }
                Step::Hear { worker } => {
                    for (run_id, attempt) in state.leases_of(&format!("w{worker}")) {
                        liveness.heard(&run_id, attempt, now_ms, settings.lease_ttl_ms);
                    }
                    continue;
                }
                Step::Tick => {
                    let at = Tick { now_ms, monotonic_ms: now_ms, bootstrap: None };
                    let commands = crate::engine::tick(&state, &settings, &at, &mut liveness);
                    proptest::prop_assert_eq!(liveness.len(), state.leases().len());
                    for command in &commands {
                        if let Command::ExpireSilentLeases { leases } = command {
                            for (run_id, attempt, _) in leases {
                                let deadline = liveness.deadline_ms(run_id, *attempt);
                                proptest::prop_assert!(deadline.is_some_and(|d| d <= now_ms));
                            }
                        }
                    }
                    commands
                }
                _ => match step_command(&state, step) {
                    Some(command) => vec![command],
                    None => continue,
                },
            };
            for command in commands {
                let request = Request { now_ms, command, principal: Default::default() };
                let before = limit_usage(&state);
                let response = state.apply(&request);
                if let Err(violation) = state.check_invariants() {
                    proptest::prop_assert!(false, "after {:?}: {}", request.command, violation);
                }
                if let Err(violation) = check_limits(&state, &before, &response, &request, &mut rate_grants) {
                    proptest::prop_assert!(false, "after {:?}: {}", request.command, violation);
                }
                log.push(request);
            }
            if let Err(violation) = liveness.check_invariants() {
                proptest::prop_assert!(false, "liveness: {}", violation);
            }
        }
        let mut replayed = State::new();
        for request in &log {
            replayed.apply(request);
        }
        proptest::prop_assert_eq!(
            serde_json::to_string(&replayed).unwrap(),
            serde_json::to_string(&state).unwrap()
        );
    }
}

#[test]
fn a_fleet_submitted_in_parts_equals_one_submitted_whole() {
    let repositories: Vec<String> = (0..5).map(|i| format!("file:///r{i}")).collect();
    let refs: Vec<&str> = repositories.iter().map(String::as_str).collect();
    let mut whole = Harness::new();
    whole.submit(&refs, 8, "key");

    let mut parts = Harness::new();
    for (chunk, expected) in [(&repositories[..2], 2), (&repositories[2..], 5)] {
        assert_eq!(
            parts.apply(Command::StageRepositories {
                upload_id: "upload-1".into(),
                repositories: chunk.to_vec(),
            }),
            Response::RepositoriesStaged {
                repositories: expected
            }
        );
    }
    let mut without = spec(&refs);
    without.max_parallelism = 8;
    let full = without.clone();
    without.repositories.clear();
    let submit = |upload: &str| Command::SubmitStagedFleet {
        upload_id: upload.into(),
        spec: without.clone(),
        idempotency_key: "key".into(),
        trace_parent: String::new(),
        max_events: 0,
    };
    assert_eq!(
        parts.apply(submit("upload-1")),
        Response::FleetSubmitted {
            fleet_id: "fl-1".into(),
            created: true
        }
    );
    let (built, reference) = (
        parts.state.fleet("fl-1").unwrap(),
        whole.state.fleet("fl-1").unwrap(),
    );
    assert_eq!(*built.spec, full);
    assert_eq!(built.runs, reference.runs);

    // The upload was consumed: submitting it again is refused, naming it.
    match parts.apply(submit("upload-1")) {
        Response::Rejected { reason } => assert!(reason.contains("upload-1"), "{reason}"),
        other => panic!("unexpected {other:?}"),
    }
    // The same submission staged again is answered by the idempotency key.
    parts.apply(Command::StageRepositories {
        upload_id: "upload-2".into(),
        repositories: repositories.clone(),
    });
    assert_eq!(
        parts.apply(submit("upload-2")),
        Response::FleetSubmitted {
            fleet_id: "fl-1".into(),
            created: false
        }
    );
}
