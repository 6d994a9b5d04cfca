//! A single node keeps its state across a restart: from the committed log alone, and from a
//! persisted snapshot followed by the log.

use flotilla_scheduler::Response;

use super::{TestNode, WAIT_TIMEOUT, submit_fleet, wait_for_leader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_entries_are_reapplied_after_a_restart() {
    let directory = tempfile::tempdir().unwrap();

    let first = TestNode::start(1, directory.path(), |_| {}).await;
    assert!(
        first.node.initialize_single_node().await.unwrap(),
        "a fresh node is initialized"
    );
    assert!(
        !first.node.initialize_single_node().await.unwrap(),
        "initializing again is a no-op"
    );
    assert_eq!(wait_for_leader(&first.node).await, 1);
    let (first_index, response) = first
        .node
        .write(submit_fleet("first", 1_000))
        .await
        .unwrap();
    assert_eq!(
        response,
        Response::FleetSubmitted {
            fleet_id: "fl-1".into(),
            created: true
        }
    );
    assert_eq!(first.node.state.last_applied_index(), first_index);
    first.stop().await;

    let second = TestNode::start(1, directory.path(), |_| {}).await;
    // openraft re-applies the committed log while opening, before any election.
    assert!(
        second
            .node
            .state
            .read(|state| state.fleet("fl-1").is_some()),
        "the fleet survived the restart"
    );
    assert_eq!(second.node.state.last_applied_index(), first_index);
    assert!(
        !second.node.initialize_single_node().await.unwrap(),
        "a restarted node is already initialized"
    );
    assert_eq!(wait_for_leader(&second.node).await, 1);
    let (second_index, response) = second
        .node
        .write(submit_fleet("second", 2_000))
        .await
        .unwrap();
    assert_eq!(
        response,
        Response::FleetSubmitted {
            fleet_id: "fl-2".into(),
            created: true
        }
    );
    assert!(second_index > first_index);
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_is_restored_from_the_persisted_snapshot_and_the_log_after_it() {
    let directory = tempfile::tempdir().unwrap();
    let configure = |config: &mut crate::RaftNodeConfig| config.max_in_snapshot_log_to_keep = 0;

    let first = TestNode::start(1, directory.path(), configure).await;
    first.node.initialize_single_node().await.unwrap();
    wait_for_leader(&first.node).await;
    let mut snapshot_index = 0;
    for number in 1..=4 {
        (snapshot_index, _) = first
            .node
            .write(submit_fleet(&format!("before-{number}"), number * 1_000))
            .await
            .unwrap();
    }
    first.node.raft.trigger().snapshot().await.unwrap();
    first
        .node
        .raft
        .wait(Some(WAIT_TIMEOUT))
        .metrics(
            |metrics| {
                metrics.snapshot.map(|log_id| log_id.index) == Some(snapshot_index)
                    && metrics.purged.map(|log_id| log_id.index) == Some(snapshot_index)
            },
            "a snapshot was built and the log purged",
        )
        .await
        .unwrap();
    let mut last_index = 0;
    for number in 1..=2 {
        (last_index, _) = first
            .node
            .write(submit_fleet(&format!("after-{number}"), 10_000 + number))
            .await
            .unwrap();
    }
    let state_before = first.node.state.read(Clone::clone);
    assert_eq!(
        state_before
            .fleet("fl-6")
            .map(|fleet| fleet.spec.name.as_str()),
        Some("after-2")
    );
    first.stop().await;

    let second = TestNode::start(1, directory.path(), configure).await;
    assert_eq!(second.node.state.read(Clone::clone), state_before);
    assert_eq!(second.node.state.last_applied_index(), last_index);
    // The log before the snapshot is gone, so the state above came from the persisted snapshot.
    second
        .node
        .raft
        .wait(Some(WAIT_TIMEOUT))
        .metrics(
            |metrics| {
                metrics.snapshot.map(|log_id| log_id.index) == Some(snapshot_index)
                    && metrics.purged.map(|log_id| log_id.index) == Some(snapshot_index)
            },
            "the persisted snapshot and purge point are loaded",
        )
        .await
        .unwrap();
    second.stop().await;
}
