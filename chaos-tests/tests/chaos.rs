//! The chaos scenarios, one test each, run one at a time (they share the machine's two cores
//! and would disturb each other's timings). Each needs root, `ip` and `iptables`.

use std::sync::Mutex;

use flotilla_chaos_tests::scenario::{self, Fault};

/// Serializes the scenarios within this test binary.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs one scenario (`name` for the failure line) on a fresh two-thread runtime, one at a
/// time, printing its report.
fn run_scenario<R: std::fmt::Display>(
    name: String,
    scenario: impl std::future::Future<Output = anyhow::Result<R>>,
) {
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(scenario) {
        Ok(report) => println!("{report}"),
        Err(error) => {
            let full = format!("{error:#}").replace('\n', " ");
            let mut message: String = full.chars().take(600).collect();
            if message.len() < full.len() {
                message.push_str("...");
            }
            println!("chaos-summary: scenario={name} result=fail error={message}");
            panic!("{error:#}");
        }
    }
}

fn run(fault: Fault) {
    run_scenario(fault.name().to_owned(), scenario::run(fault));
}

fn run_triggers(fault: Fault) {
    run_scenario(
        format!("triggers-{}", fault.name()),
        flotilla_chaos_tests::triggers::run(fault),
    );
}

#[test]
fn kill_leader() {
    run(Fault::KillLeader);
}

#[test]
fn kill_worker_holding_leases() {
    run(Fault::KillWorker);
}

#[test]
fn pause_leader() {
    run(Fault::PauseLeader);
}

#[test]
fn partition_leader() {
    run(Fault::PartitionLeader);
}

#[test]
fn partition_follower() {
    run(Fault::PartitionFollower);
}

#[test]
fn restart_all_voters() {
    run(Fault::RestartAll);
}

#[test]
fn wipe_and_rejoin_voter() {
    run(Fault::WipeAndRejoin);
}

#[test]
fn triggers_across_kill_leader() {
    run_triggers(Fault::KillLeader);
}

#[test]
fn triggers_across_pause_leader() {
    run_triggers(Fault::PauseLeader);
}

#[test]
fn triggers_across_partition_leader() {
    run_triggers(Fault::PartitionLeader);
}
