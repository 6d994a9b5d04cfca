//! Data-driven scenarios of flow control on the state machine: priorities, waves, gates,
//! pauses, the failure budget, deadlines, concurrency and rate limits, repository
//! exclusivity and reruns. One helper, [`check`], runs a script and compares what each step
//! printed; the invariants (including the limit table's recount from the leases) are checked
//! after every step.
//!
//! Script lines: `<step> => <expected>`, or a step alone (its output is not compared).
//! Steps:
//! - `submit <repos> [key=value | flag]...`: repos `a,b,c` become `file:///<org>/<repo>`
//!   (`acme/x` stays as given); keys `par`, `waves` (`1,50%`), `threshold`, `soak`,
//!   `deadline`, `priority`, `project`, `failure_limit`, `consecutive`, `attempts`; flags
//!   `approval`, `shared`, `each`. Prints the fleet id.
//! - `preview <repos> [...]`: as `submit`, but prints what a dry run says (the id it would
//!   get, or why a bounded queue would refuse it) and changes nothing;
//! - `limit <name> concurrency=<n> key=<key> [when=queue|skip|cancel_older] [queued=<max>]
//!   [project=<p>]`,
//!   `limit <name> rate=<limit>/<period_ms> burst=<b> key=<key>`, `unlimit <name>`;
//! - `lease <worker> <slots>`: prints the run ids leased (`#2` for a second attempt);
//! - `ok <run>`, `fail <run>`, `flaky <run>`: reports changed, a final agent failure, a
//!   retryable infrastructure failure for the run's current attempt;
//! - `pause|resume|approve <fleet> [note]`, `advance`, `cancel <fleet>`;
//! - `time +<ms>` moves the leader's clock on; `time -<ms>` back (a new leader whose clock is
//!   behind); `snapshot` replaces the state by its serialized copy (a restart or a new leader);
//! - `rerun <fleet> <outcome,...>`: re-runs the runs with those outcomes;
//! - `runs <fleet>`: one letter per run: Pending, Running, Changed, Unchanged, Failed,
//!   cancelled (X);
//! - `flow <fleet>`: wave, gate, pause, failures.

use std::collections::BTreeMap;

use crate::command::{AttemptResult, Command, Outcome, Request, Response};
use crate::flow::FlowSpec;
use crate::limit::{LimitKey, LimitKind, LimitSpec, WhenFull};
use crate::spec::tests::spec;
use crate::state::{RunState, State};
use crate::token::Principal;
use crate::wave::WaveSize;

struct Scenario {
    state: State,
    now_ms: u64,
}

impl Scenario {
    fn apply(&mut self, command: Command) -> Response {
        let response = self.state.apply(&Request {
            now_ms: self.now_ms,
            command,
            principal: Principal::Node { node_id: 1 },
        });
        if let Err(violation) = self.state.check_invariants() {
            panic!("invariant violated: {violation}");
        }
        check_caps(&self.state);
        response
    }

    fn step(&mut self, line: &str) -> String {
        let mut words = line.split_whitespace();
        let verb = words.next().expect("a step");
        let args: Vec<&str> = words.collect();
        match verb {
            "submit" => self.submit(&args, false),
            "preview" => self.submit(&args, true),
            "limit" => self.limit(&args),
            "unlimit" => render(self.apply(Command::DeleteLimit {
                name: args[0].into(),
            })),
            "lease" => render(self.apply(Command::AcquireLeases {
                worker_id: args[0].into(),
                free_slots: args[1].parse().unwrap(),
                lease_ttl_ms: 60_000,
                held: self.state.leases_of(args[0]),
            })),
            "ok" | "fail" | "flaky" => {
                let result = match verb {
                    "ok" => AttemptResult::failure(Outcome::Changed, "", false),
                    "fail" => AttemptResult::failure(Outcome::AgentFailed, "agent failed", false),
                    _ => AttemptResult::failure(Outcome::Infrastructure, "flaky", true),
                };
                let (_, run) = self.state.run(args[0]).expect("run exists");
                let attempt = run.attempt();
                let worker = run
                    .lease
                    .as_ref()
                    .map_or("nobody".into(), |l| l.worker_id.clone());
                render(self.apply(Command::ReportResult {
                    worker_id: worker,
                    run_id: args[0].into(),
                    attempt,
                    result,
                }))
            }
            "pause" | "resume" | "approve" => {
                let fleet_id = args[0].to_string();
                let note = args[1..].join(" ");
                render(self.apply(match verb {
                    "pause" => Command::PauseFleet { fleet_id, note },
                    "resume" => Command::ResumeFleet { fleet_id, note },
                    _ => Command::ApproveFleet { fleet_id, note },
                }))
            }
            "advance" => render(self.apply(Command::AdvanceFleets)),
            "cancel" => render(self.apply(Command::CancelFleet {
                fleet_id: args[0].into(),
            })),
            "time" => {
                // `-<ms>`: the next leader's clock is behind this one's.
                let ms = args[0][1..].parse::<u64>().unwrap();
                match args[0].as_bytes()[0] {
                    b'+' => self.now_ms += ms,
                    b'-' => self.now_ms -= ms,
                    _ => panic!("time +<ms> or -<ms>"),
                }
                String::new()
            }
            "snapshot" => {
                // A new leader, or a restart, starts from the state's serialized form.
                let text = serde_json::to_string(&self.state).unwrap();
                self.state = serde_json::from_str(&text).unwrap();
                String::new()
            }
            "rerun" => self.rerun(&args),
            "runs" => {
                let fleet = self.state.fleet(args[0]).expect("fleet exists");
                fleet
                    .runs
                    .iter()
                    .map(|run| match run.state {
                        RunState::Pending => 'P',
                        RunState::Running => 'R',
                        RunState::Changed => 'C',
                        RunState::Unchanged => 'U',
                        RunState::Failed => 'F',
                        RunState::Cancelled => 'X',
                    })
                    .collect()
            }
            "flow" => {
                let fleet = self.state.fleet(args[0]).expect("fleet exists");
                let flow = &fleet.flow;
                let mut parts = vec![format!(
                    "wave {}/{}",
                    flow.wave + 1,
                    flow.wave_ends.len().max(1)
                )];
                if let Some(gate) = &flow.gate {
                    parts.push(format!("gate({})", gate.reason));
                }
                if let Some(pause) = &flow.pause {
                    parts.push(format!("paused({})", pause.reason));
                }
                if flow.promote_at_ms != 0 {
                    parts.push(format!("soak until {}", flow.promote_at_ms));
                }
                parts.push(format!(
                    "failures {}/{}",
                    flow.failures, flow.consecutive_failures
                ));
                parts.join(" ")
            }
            other => panic!("unknown step {other}"),
        }
    }

    /// `submit` (or, with `preview`, what a dry run says of it).
    fn submit(&mut self, args: &[&str], preview: bool) -> String {
        let repositories: Vec<String> = args[0]
            .split(',')
            .map(|r| {
                if r.contains('/') {
                    format!("file:///{r}")
                } else {
                    format!("file:///org/{r}")
                }
            })
            .collect();
        let refs: Vec<&str> = repositories.iter().map(String::as_str).collect();
        let mut fleet = spec(&refs);
        fleet.max_parallelism = 100;
        let mut flow = FlowSpec::default();
        for arg in &args[1..] {
            match arg.split_once('=') {
                Some(("par", v)) => fleet.max_parallelism = v.parse().unwrap(),
                Some(("attempts", v)) => fleet.retry.max_attempts = v.parse().unwrap(),
                Some(("project", v)) => fleet.project = v.to_string(),
                Some(("priority", v)) => flow.priority = v.parse().unwrap(),
                Some(("threshold", v)) => flow.success_threshold_percent = v.parse().unwrap(),
                Some(("soak", v)) => flow.soak_ms = v.parse().unwrap(),
                Some(("deadline", v)) => flow.deadline_ms = v.parse().unwrap(),
                Some(("failure_limit", v)) => flow.failure_limit = Some(v.parse().unwrap()),
                Some(("consecutive", v)) => {
                    flow.consecutive_failure_limit = Some(v.parse().unwrap())
                }
                Some(("waves", v)) => {
                    flow.waves = v
                        .split(',')
                        .map(|w| match w.strip_suffix('%') {
                            Some(p) => WaveSize::Percent(p.parse().unwrap()),
                            None => WaveSize::Runs(w.parse().unwrap()),
                        })
                        .collect()
                }
                None if *arg == "approval" => flow.require_approval = true,
                None if *arg == "shared" => flow.shared_repositories = true,
                None if *arg == "each" => flow.approve_each_wave = true,
                _ => panic!("unknown submit argument {arg}"),
            }
        }
        fleet.retry.backoff_initial_ms = 0;
        fleet.retry.backoff_max_ms = 0;
        flow.validate("flow").expect("a valid flow");
        fleet.flow = flow;
        if preview {
            let preview = self.state.preview_fleet(&fleet);
            return if preview.queue_full.is_empty() {
                format!("{} would be created", preview.fleet_id)
            } else {
                format!("would be refused: {}", preview.queue_full)
            };
        }
        render(self.apply(Command::SubmitFleet {
            spec: fleet,
            idempotency_key: String::new(),
            trace_parent: String::new(),
            max_events: 0,
        }))
    }

    fn limit(&mut self, args: &[&str]) -> String {
        let options: BTreeMap<&str, &str> = args[1..]
            .iter()
            .map(|a| a.split_once('=').expect("key=value"))
            .collect();
        let kind = if let Some(max) = options.get("concurrency") {
            LimitKind::Concurrency {
                max_running: max.parse().unwrap(),
                when_full: match options.get("when").copied().unwrap_or("queue") {
                    "queue" => WhenFull::Queue,
                    "skip" => WhenFull::Skip,
                    "cancel_older" => WhenFull::CancelOlder,
                    other => panic!("{other}"),
                },
                max_queued: options.get("queued").map(|q| q.parse().unwrap()),
            }
        } else {
            let (limit, period) = options["rate"].split_once('/').unwrap();
            LimitKind::Rate {
                limit: limit.parse().unwrap(),
                period_ms: period.parse().unwrap(),
                burst: options["burst"].parse().unwrap(),
            }
        };
        render(self.apply(Command::CreateLimit {
            spec: LimitSpec {
                name: args[0].into(),
                project: options.get("project").copied().unwrap_or("").into(),
                key: LimitKey::parse(options["key"]).expect("a key"),
                kind,
            },
            max_limits: 4,
        }))
    }

    fn rerun(&mut self, args: &[&str]) -> String {
        let fleet = self.state.fleet(args[0]).expect("fleet exists");
        let outcomes: Vec<String> = args[1].split(',').map(str::to_string).collect();
        let indexes = crate::rerun::select_runs(fleet, &outcomes, None);
        let mut new_spec = (*fleet.spec).clone();
        new_spec.repositories = indexes
            .iter()
            .map(|i| fleet.runs[*i as usize].repository.clone())
            .collect();
        render(self.apply(Command::RerunFleet {
            origin_fleet_id: args[0].into(),
            run_indexes: indexes,
            spec: new_spec,
            idempotency_key: String::new(),
            trace_parent: String::new(),
            max_events: 0,
        }))
    }
}

/// No concurrency key holds more running runs than its cap (limits are created before the
/// runs they bound in these scenarios, so the cap holds throughout).
fn check_caps(state: &State) {
    for limit in state.limits() {
        if let LimitKind::Concurrency { max_running, .. } = limit.spec.kind {
            for (key, running) in state.limit_keys(&limit.spec.name, usize::MAX) {
                assert!(
                    running <= u64::from(max_running),
                    "limit {} key {key}: {running} running, cap {max_running}",
                    limit.spec.name
                );
            }
        }
    }
}

fn render(response: Response) -> String {
    match response {
        Response::FleetSubmitted { fleet_id, .. } => fleet_id,
        Response::Leased(grants) => grants
            .iter()
            .map(|g| {
                if g.attempt > 1 {
                    format!("{}#{}", g.run_id, g.attempt)
                } else {
                    g.run_id.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Response::FleetFlowChanged { changed, message } => {
            if changed {
                message
            } else {
                format!("unchanged: {message}")
            }
        }
        Response::FleetsAdvanced { count } => format!("advanced {count}"),
        Response::Rejected { reason } => format!("rejected: {reason}"),
        Response::QueueFull { reason } => format!("queue full: {reason}"),
        Response::ResultAccepted
        | Response::FleetCancelled
        | Response::LimitCreated { .. }
        | Response::LimitDeleted { .. } => "ok".into(),
        other => format!("{other:?}"),
    }
}

/// Runs `script` (module documentation) and asserts each step's expected output.
#[track_caller]
fn check(script: &str) {
    let mut scenario = Scenario {
        state: State::new(),
        now_ms: 1_000,
    };
    for (number, line) in script.lines().map(str::trim).enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (step, expected) = match line.split_once(" => ") {
            Some((step, expected)) => (step, Some(expected)),
            None => (line, None),
        };
        let actual = scenario.step(step);
        if let Some(expected) = expected {
            assert_eq!(actual, expected, "line {}: {step}", number + 1);
        }
    }
}

#[test]
fn higher_priority_fleets_are_leased_first() {
    check(
        "
        submit a,b,c priority=10 => fl-1
        submit d,e priority=90 => fl-2
        lease w1 3 => fl-2-0 fl-2-1 fl-1-0
        lease w1 9 => fl-1-1 fl-1-2
        ",
    );
}

#[test]
fn an_approval_gate_holds_the_first_lease_until_approved() {
    check(
        "
        submit a,b approval => fl-1
        lease w1 2 =>
        flow fl-1 => wave 1/1 gate(require_approval: waiting for approval before the first lease) failures 0/0
        approve fl-1 looks right => approved by node:1 (require_approval: waiting for approval before the first lease): looks right
        approve fl-1 => unchanged: fleet fl-1: nothing to approve
        lease w1 2 => fl-1-0 fl-1-1
        ",
    );
}

#[test]
fn pause_stops_new_leases_and_resume_is_idempotent() {
    check(
        "
        submit a,b,c => fl-1
        lease w1 1 => fl-1-0
        pause fl-1 CI is red => fleet paused by node:1: CI is red
        pause fl-1 => unchanged: fleet fl-1: nothing to pause
        lease w1 2 =>
        ok fl-1-0 => ok
        runs fl-1 => CPP
        resume fl-1 => fleet resumed by node:1 (was: paused by node:1: CI is red)
        resume fl-1 => unchanged: fleet fl-1: nothing to resume
        lease w1 2 => fl-1-1 fl-1-2
        ok fl-1-1
        ok fl-1-2
        pause fl-1 => rejected: fleet fl-1 is finished, not running
        ",
    );
}

#[test]
fn waves_promote_when_their_runs_succeed() {
    check(
        "
        submit a,b,c,d,e,f,g,h,i,j waves=1,50% => fl-1
        lease w1 9 => fl-1-0
        ok fl-1-0
        flow fl-1 => wave 2/3 failures 0/0
        lease w1 9 => fl-1-1 fl-1-2 fl-1-3 fl-1-4
        ok fl-1-1
        ok fl-1-2
        ok fl-1-3
        lease w1 9 =>
        ok fl-1-4
        lease w1 9 => fl-1-5 fl-1-6 fl-1-7 fl-1-8 fl-1-9
        ",
    );
}

#[test]
fn a_wave_below_its_threshold_waits_at_a_gate_and_approval_starts_the_next() {
    check(
        "
        submit a,b,c,d,e,f waves=2 threshold=100 => fl-1
        lease w1 9 => fl-1-0 fl-1-1
        ok fl-1-0
        fail fl-1-1
        flow fl-1 => wave 1/2 gate(wave 1 of 2: 1 of 2 runs succeeded (50%), below success_threshold_percent 100) failures 1/1
        lease w1 9 =>
        approve fl-1 ship it => approved by node:1 (wave 1 of 2: 1 of 2 runs succeeded (50%), below success_threshold_percent 100): ship it
        flow fl-1 => wave 2/2 failures 1/1
        lease w1 9 => fl-1-2 fl-1-3 fl-1-4 fl-1-5
        ",
    );
}

#[test]
fn a_soak_time_delays_the_next_wave_until_the_engine_advances_it() {
    check(
        "
        submit a,b,c waves=1 soak=5000 => fl-1
        lease w1 9 => fl-1-0
        ok fl-1-0
        flow fl-1 => wave 1/2 soak until 6000 failures 0/0
        lease w1 9 =>
        advance => advanced 0
        time +5000
        advance => advanced 1
        lease w1 9 => fl-1-1 fl-1-2
        ",
    );
}

#[test]
fn approve_each_wave_gates_even_a_perfect_wave() {
    check(
        "
        submit a,b,c,d waves=1,2 each => fl-1
        lease w1 9 => fl-1-0
        ok fl-1-0
        lease w1 9 =>
        approve fl-1
        lease w1 9 => fl-1-1
        ok fl-1-1
        lease w1 9 =>
        approve fl-1
        lease w1 9 => fl-1-2 fl-1-3
        ",
    );
}

#[test]
fn the_failure_budget_pauses_the_fleet_and_resume_starts_a_new_count() {
    check(
        "
        submit a,b,c,d,e,f failure_limit=1 par=2 => fl-1
        lease w1 9 => fl-1-0 fl-1-1
        fail fl-1-0
        flow fl-1 => wave 1/1 failures 1/1
        lease w1 9 => fl-1-2
        fail fl-1-1
        flow fl-1 => wave 1/1 paused(failure budget: 2 failed runs, more than failure_limit 1) failures 2/2
        lease w1 9 =>
        ok fl-1-2
        resume fl-1 fixed the prompt
        flow fl-1 => wave 1/1 failures 0/0
        lease w1 9 => fl-1-3 fl-1-4
        ",
    );
}

#[test]
fn consecutive_failures_pause_and_a_success_resets_the_streak() {
    check(
        "
        submit a,b,c,d,e consecutive=1 par=1 => fl-1
        lease w1 1 => fl-1-0
        fail fl-1-0
        lease w1 1 => fl-1-1
        ok fl-1-1
        lease w1 1 => fl-1-2
        fail fl-1-2
        lease w1 1 => fl-1-3
        fail fl-1-3
        flow fl-1 => wave 1/1 paused(failure budget: 2 runs failed in a row, more than consecutive_failure_limit 1) failures 3/2
        ",
    );
}

#[test]
fn the_budget_pauses_the_first_wave_that_exceeds_it() {
    // 20 runs in waves of 2 and 10 (then all); the agent fails in runs 3, 5, 7 and 9.
    check(
        "
        submit r0,r1,r2,r3,r4,r5,r6,r7,r8,r9,r10,r11,r12,r13,r14,r15,r16,r17,r18,r19 waves=10%,50% threshold=50 failure_limit=2 => fl-1
        lease w1 20 => fl-1-0 fl-1-1
        ok fl-1-0
        ok fl-1-1
        lease w1 20 => fl-1-2 fl-1-3 fl-1-4 fl-1-5 fl-1-6 fl-1-7 fl-1-8 fl-1-9
        ok fl-1-2
        fail fl-1-3
        ok fl-1-4
        fail fl-1-5
        ok fl-1-6
        fail fl-1-7
        flow fl-1 => wave 2/3 paused(failure budget: 3 failed runs, more than failure_limit 2) failures 3/1
        ok fl-1-8
        fail fl-1-9
        runs fl-1 => CCCFCFCFCFPPPPPPPPPP
        lease w1 20 =>
        ",
    );
}

#[test]
fn a_deadline_cancels_pending_runs_and_stops_retries() {
    check(
        "
        submit a,b,c deadline=10000 par=1 attempts=3 => fl-1
        lease w1 1 => fl-1-0
        time +10000
        lease w1 1 =>
        advance => advanced 1
        runs fl-1 => RXX
        flaky fl-1-0
        runs fl-1 => XXX
        advance => advanced 0
        ",
    );
}

#[test]
fn two_fleets_never_run_on_one_repository_unless_both_share() {
    check(
        "
        submit a,b => fl-1
        submit b,c => fl-2
        # fl-1-1 waits: fl-2 runs on b.
        lease w1 9 => fl-1-0 fl-2-0 fl-2-1
        ok fl-2-0
        lease w1 9 => fl-1-1
        submit a,c shared => fl-3
        lease w1 9 =>
        ok fl-1-0
        ok fl-2-1
        submit c shared => fl-4
        # Both fl-3 and fl-4 share: they run on c together.
        lease w1 9 => fl-3-0 fl-4-0 fl-3-1
        ",
    );
}

#[test]
fn a_concurrency_limit_per_organisation_queues_runs_across_fleets() {
    check(
        "
        limit org concurrency=2 key=organisation => ok
        submit acme/a,acme/b,acme/c,other/d => fl-1
        submit acme/e => fl-2
        # Round-robin: fl-1-0, fl-2-0 fill acme; fl-1's acme runs wait, its other/d does not.
        lease w1 9 => fl-1-0 fl-2-0 fl-1-3
        ok fl-1-0
        lease w1 9 => fl-1-1
        lease w1 9 =>
        ok fl-2-0
        lease w1 9 => fl-1-2
        unlimit org => ok
        runs fl-1 => CRRR
        ",
    );
}

#[test]
fn a_global_cap_bounds_the_cluster_and_applies_only_to_its_project() {
    check(
        "
        limit cap concurrency=1 key=global project=team => ok
        submit a,b project=team => fl-1
        submit c,d => fl-2
        lease w1 9 => fl-1-0 fl-2-0 fl-2-1
        lease w2 9 =>
        ok fl-1-0
        lease w2 9 => fl-1-1
        ",
    );
}

#[test]
fn skip_cancels_a_run_whose_key_is_full() {
    check(
        "
        limit one concurrency=1 key=repository when=skip => ok
        submit a shared => fl-1
        submit a shared => fl-2
        lease w1 1 => fl-1-0
        lease w1 1 =>
        runs fl-2 => X
        # Repository exclusivity comes first: a run waiting for its repository is not skipped.
        submit b => fl-3
        submit b shared => fl-4
        lease w1 1 => fl-3-0
        lease w1 1 =>
        runs fl-4 => P
        ",
    );
}

#[test]
fn cancel_older_replaces_the_oldest_run_of_a_full_key() {
    check(
        "
        limit newest concurrency=1 key=repository when=cancel_older => ok
        submit a shared => fl-1
        lease w1 1 => fl-1-0
        time +100
        submit a shared => fl-2
        lease w1 1 => fl-2-0
        runs fl-1 => X
        ok fl-1-0 => rejected: run is Cancelled, not running (attempt 1)
        ",
    );
}

#[test]
fn a_limit_created_while_runs_run_counts_them() {
    check(
        "
        submit acme/a,acme/b,acme/c => fl-1
        lease w1 2 => fl-1-0 fl-1-1
        limit org concurrency=2 key=organisation => ok
        lease w1 9 =>
        ok fl-1-0
        lease w1 9 => fl-1-2
        ",
    );
}

#[test]
fn a_rate_limit_admits_its_burst_then_one_unit_per_interval() {
    check(
        "
        limit forge rate=2/1000 burst=2 key=forge_host => ok
        submit a,b,c,d,e => fl-1
        lease w1 9 => fl-1-0 fl-1-1
        lease w1 9 =>
        time +499
        lease w1 9 =>
        time +1
        lease w1 9 => fl-1-2
        time +500
        lease w1 9 => fl-1-3
        # A retry takes a unit too.
        flaky fl-1-0
        time +250
        lease w1 9 =>
        time +250
        lease w1 9 => fl-1-0#2
        ",
    );
}

#[test]
fn a_bucket_survives_a_snapshot_and_a_new_leader_whose_clock_is_behind() {
    check(
        "
        limit forge rate=1/1000 burst=1 key=forge_host => ok
        submit a,b,c => fl-1
        lease w1 9 => fl-1-0
        snapshot
        # The new leader's clock is 400 ms behind: the state's clock does not go back, and the
        # bucket, restored with the state, has no unit before 1000 ms after the first lease.
        time -400
        lease w1 9 =>
        time +1399
        lease w1 9 =>
        time +1
        lease w1 9 => fl-1-1
        snapshot
        time +999
        lease w1 9 =>
        time +1
        lease w1 9 => fl-1-2
        ",
    );
}

#[test]
fn a_bounded_queue_refuses_a_fleet_that_would_overfill_a_key() {
    check(
        "
        limit per-org concurrency=1 key=organisation queued=3 => ok
        submit a,b,c => fl-1
        lease w1 9 => fl-1-0
        # org: 2 wait (b, c); 2 more would make 4.
        preview d,e => would be refused: limit per-org: 2 runs wait on key local/org and this fleet adds 2, more than its max_queued 3; submit again when fewer wait (flotilla limit show per-org)
        submit d,e => queue full: limit per-org: 2 runs wait on key local/org and this fleet adds 2, more than its max_queued 3; submit again when fewer wait (flotilla limit show per-org)
        preview d => fl-2 would be created
        submit d => fl-2
        # Another organisation has its own queue.
        submit other/x,other/y,other/z => fl-3
        ok fl-1-0
        # Round-robin goes on after fl-1, which was served last.
        lease w1 9 => fl-2-0 fl-3-0
        # org: b and c wait.
        submit e => fl-4
        submit f => queue full: limit per-org: 3 runs wait on key local/org and this fleet adds 1, more than its max_queued 3; submit again when fewer wait (flotilla limit show per-org)
        # A paused fleet's runs still wait on the key.
        pause fl-4
        submit f => queue full: limit per-org: 3 runs wait on key local/org and this fleet adds 1, more than its max_queued 3; submit again when fewer wait (flotilla limit show per-org)
        cancel fl-4
        submit f => fl-5
        ",
    );
}

#[test]
fn a_queue_bound_needs_the_queue_policy() {
    check(
        "
        limit l concurrency=1 key=global when=skip queued=5 => rejected: spec.concurrency.max_queued: bounds a queue, so it needs when_full queue, not skip
        limit l concurrency=1 key=global queued=0 => rejected: spec.concurrency.max_queued: must be 1-1000000
        ",
    );
}

#[test]
fn rerun_repeats_exactly_the_runs_with_the_outcomes_asked_for() {
    check(
        "
        submit a,b,c,d => fl-1
        lease w1 9 => fl-1-0 fl-1-1 fl-1-2 fl-1-3
        ok fl-1-0
        fail fl-1-1
        fail fl-1-2
        rerun fl-1 agent_failed => fl-2
        runs fl-2 => PP
        lease w2 9 => fl-2-0 fl-2-1
        # The origin's own run on d is not repeated, and still runs.
        runs fl-1 => CFFR
        ",
    );
}
