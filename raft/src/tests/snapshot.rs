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
