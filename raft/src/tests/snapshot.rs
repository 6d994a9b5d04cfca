//! A learner added after the leader compacted its log catches up by installing the leader's
//! snapshot over gRPC.

use openraft::BasicNode;

use super::{TestNode, WAIT_TIMEOUT, submit_fleet, wait_for_applied, wait_for_leader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_learner_catches_up_from_a_snapshot() {
    let leader_directory = tempfile::tempdir().unwrap();
    let learner_directory = tempfile::tempdir().unwrap();
    let leader = TestNode::start(1, leader_directory.path(), |config| {
        config.snapshot_logs_since_last = 5;
        config.max_in_snapshot_log_to_keep = 0;
    })
    .await;
    leader.node.initialize_single_node().await.unwrap();
    wait_for_leader(&leader.node).await;
    for number in 1..=12 {
        leader
            .node
            .write(submit_fleet(&format!("fleet-{number}"), number * 1_000))
            .await
            .unwrap();
    }
    let metrics = leader
        .node
        .raft
        .wait(Some(WAIT_TIMEOUT))
        .metrics(
            |metrics| metrics.purged.is_some_and(|purged| purged.index >= 5),
            "the leader built a snapshot and purged its log",
        )
        .await
        .unwrap();
    let purged_index = metrics.purged.unwrap().index;

    // The learner keeps the default snapshot threshold, so any snapshot it has came from the
    // leader.
    let learner = TestNode::start(2, learner_directory.path(), |_| {}).await;
    let learner_applied = learner.node.state.subscribe();
    leader
        .node
        .raft
        .add_learner(2, BasicNode::new(learner.node.advertise_address()), true)
        .await
        .unwrap();

    let (last_index, _) = leader
        .node
        .write(submit_fleet("after-learner", 100_000))
        .await
        .unwrap();
    wait_for_applied(&learner.node, last_index).await;
    assert_eq!(
        learner.node.state.read(Clone::clone),
        leader.node.state.read(Clone::clone)
    );
    assert!(
        learner
            .node
            .state
            .read(|state| state.fleet("fl-13").is_some())
    );
    let learner_metrics = learner.node.raft.metrics().borrow().clone();
    let installed = learner_metrics
        .snapshot
        .expect("the learner installed a snapshot");
    assert!(
        installed.index >= purged_index,
        "snapshot at {installed} covers the purged log"
    );
    assert_eq!(learner.node.state.last_applied_index(), last_index);
    assert!(
        learner_applied.has_changed().unwrap(),
        "subscribers saw the install and the applies"
    );

    learner.stop().await;
    leader.stop().await;
}

/// A state with a 100,000-run fleet (some runs leased and reported) is snapshotted by the
/// leader and installed by a fresh learner over gRPC; both then hold the same state, byte for
/// byte in the snapshot encoding. Durations are printed (measured in `flotilla-bench scale`),
/// not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_a_hundred_thousand_runs_installs_on_a_fresh_learner() {
    use flotilla_scheduler::{AttemptResult, Command, Outcome, Request, Response};

    const RUNS: usize = 100_000;
    let leader_directory = tempfile::tempdir().unwrap();
    let learner_directory = tempfile::tempdir().unwrap();
    let leader = TestNode::start(1, leader_directory.path(), |config| {
        config.snapshot_logs_since_last = 3;
        config.max_in_snapshot_log_to_keep = 0;
        config.install_snapshot_timeout_ms = 20_000;
    })
    .await;
    leader.node.initialize_single_node().await.unwrap();
    wait_for_leader(&leader.node).await;
    let mut big = submit_fleet("big", 1_000);
    if let Command::SubmitFleet { spec, .. } = &mut big.command {
        spec.repositories = (0..RUNS)
            .map(|index| format!("https://git.example.com/organisation/repository-{index:06}.git"))
            .collect();
        spec.max_parallelism = 1024;
    }
    leader.node.write(big).await.unwrap();
    let (_, leased) = leader
        .node
        .write(Request::new(
            2_000,
            Command::AcquireLeases {
                worker_id: "w1".into(),
                free_slots: 1024,
                lease_ttl_ms: 60_000,
                held: Vec::new(),
            },
            Default::default(),
        ))
        .await
        .unwrap();
    let Response::Leased(grants) = leased else {
        panic!("no leases: {leased:?}");
    };
    assert_eq!(grants.len(), 1024);
    for grant in grants.iter().take(500) {
        leader
            .node
            .write(Request::new(
                3_000,
                Command::ReportResult {
                    worker_id: "w1".into(),
                    run_id: grant.run_id.clone(),
                    attempt: grant.attempt,
                    result: AttemptResult::failure(Outcome::Unchanged, "", false),
                },
                Default::default(),
            ))
            .await
            .unwrap();
    }
    leader
        .node
        .raft
        .wait(Some(WAIT_TIMEOUT))
        .metrics(
            |metrics| metrics.purged.is_some_and(|purged| purged.index >= 3),
            "the leader built a snapshot of the large state and purged its log",
        )
        .await
        .unwrap();

    let learner = TestNode::start(2, learner_directory.path(), |config| {
        config.install_snapshot_timeout_ms = 20_000;
    })
    .await;
    let installed = std::time::Instant::now();
    leader
        .node
        .raft
        .add_learner(2, BasicNode::new(learner.node.advertise_address()), true)
        .await
        .unwrap();
    let (last_index, _) = leader
        .node
        .write(submit_fleet("after-learner", 4_000))
        .await
        .unwrap();
    wait_for_applied(&learner.node, last_index).await;
    eprintln!(
        "learner added, snapshot installed and caught up in {:?}",
        installed.elapsed()
    );
    assert!(
        learner.node.raft.metrics().borrow().snapshot.is_some(),
        "the learner installed a snapshot"
    );
    let leader_state = leader.node.state.read(Clone::clone);
    let learner_state = learner.node.state.read(Clone::clone);
    let big_fleet = learner_state.fleet("fl-1").expect("the big fleet");
    assert_eq!(big_fleet.runs.len(), RUNS);
    assert_eq!(
        crate::codec::encode(&learner_state).unwrap(),
        crate::codec::encode(&leader_state).unwrap(),
        "identical states"
    );
    learner.stop().await;
    leader.stop().await;
}
