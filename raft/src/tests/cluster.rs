//! Three nodes in one process, each with its own gRPC server: election, replication, and
//! redirection of writes and reads to the leader.

use std::collections::BTreeMap;

use flotilla_scheduler::Response;

use super::{TestNode, WAIT_TIMEOUT, submit_fleet, wait_for_applied, wait_for_leader};
use crate::{ReadError, WriteError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_a_leader_replicate_and_redirect() {
    let directories: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = Vec::new();
    for (node_id, directory) in (1..=3).zip(&directories) {
        nodes.push(TestNode::start(node_id, directory.path(), |_| {}).await);
    }
    let voters: BTreeMap<u64, String> = nodes
        .iter()
        .map(|test_node| {
            (
                test_node.node.node_id,
                test_node.node.advertise_address().to_string(),
            )
        })
        .collect();
    assert!(nodes[0].node.initialize_cluster(voters).await.unwrap());

    let leader_id = wait_for_leader(&nodes[0].node).await;
    for test_node in &nodes {
        test_node
            .node
            .raft
            .wait(Some(WAIT_TIMEOUT))
            .current_leader(leader_id, "all agree on the leader")
            .await
            .unwrap();
    }
    let leader = &nodes[usize::try_from(leader_id).unwrap() - 1].node;
    let follower = &nodes
        .iter()
        .find(|test_node| test_node.node.node_id != leader_id)
        .unwrap()
        .node;
    assert_eq!(
        follower.current_leader(),
        Some((leader_id, leader.advertise_address().to_string()))
    );

    let mut follower_applied = follower.state.subscribe();
    let (index, response) = leader
        .write(submit_fleet("replicated", 1_000))
        .await
        .unwrap();
    assert_eq!(
        response,
        Response::FleetSubmitted {
            fleet_id: "fl-1".into(),
            created: true
        }
    );
    for test_node in &nodes {
        wait_for_applied(&test_node.node, index).await;
        assert!(
            test_node
                .node
                .state
                .read(|state| state.fleet("fl-1").is_some()),
            "node {}",
            test_node.node.node_id
        );
        assert_eq!(test_node.node.state.last_applied_index(), index);
    }
    let leader_state = leader.state.read(Clone::clone);
    for test_node in &nodes {
        assert_eq!(test_node.node.state.read(Clone::clone), leader_state);
    }
    tokio::time::timeout(
        WAIT_TIMEOUT,
        follower_applied.wait_for(|applied| *applied >= index),
    )
    .await
    .unwrap()
    .unwrap();

    match follower.write(submit_fleet("misdirected", 2_000)).await {
        Err(WriteError::ForwardToLeader {
            leader_id: Some(forward_id),
            leader_address: Some(address),
        }) => {
            assert_eq!(forward_id, leader_id);
            assert_eq!(address, leader.advertise_address());
        }
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }
    assert!(
        follower.state.read(|state| state.fleet("fl-2").is_none()),
        "the misdirected write was not applied"
    );

    leader.ensure_linearizable().await.unwrap();
    assert!(matches!(
        follower.ensure_linearizable().await,
        Err(ReadError::ForwardToLeader { leader_id: Some(forward_id), .. }) if forward_id == leader_id
    ));

    for test_node in nodes {
        test_node.stop().await;
    }
}
