//! Membership changes through [`RaftNode`](crate::RaftNode) on a running cluster, and the
//! cluster view.

use std::collections::BTreeSet;

use super::{
    TestNode, WAIT_TIMEOUT, start_cluster, submit_fleet, wait_for_agreed_leader, wait_for_applied,
};
use crate::{ClusterView, MembershipError, RaftNode};

/// The ids of the voters and of the learners in `view`.
fn voters_and_learners(view: &ClusterView) -> (BTreeSet<u64>, BTreeSet<u64>) {
    let voters = view
        .members
        .iter()
        .filter(|member| member.voter)
        .map(|member| member.node_id)
        .collect();
    let learners = view
        .members
        .iter()
        .filter(|member| !member.voter)
        .map(|member| member.node_id)
        .collect();
    (voters, learners)
}

/// The node with id `node_id` among `nodes`.
fn node(nodes: &[TestNode], node_id: u64) -> &RaftNode {
    &nodes
        .iter()
        .find(|test_node| test_node.node.node_id == node_id)
        .unwrap()
        .node
}

/// Waits until the leader's view shows every member's matched index at `index` or beyond.
async fn wait_for_matched(leader: &RaftNode, index: u64) -> ClusterView {
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    loop {
        let view = leader.cluster_view();
        if view
            .members
            .iter()
            .all(|member| member.matched_index.is_some_and(|matched| matched >= index))
        {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "members did not all match index {index}: {view:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_as_learner_then_voter_and_replicates() {
    let directories: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = start_cluster(&directories[..3], |_| {}).await;
    let members: Vec<_> = nodes.iter().map(|test_node| &test_node.node).collect();
    let (leader_id, term) = wait_for_agreed_leader(&members, 0).await;
    let leader = node(&nodes, leader_id).clone();
    let follower = nodes
        .iter()
        .find(|test_node| test_node.node.node_id != leader_id)
        .unwrap()
        .node
        .clone();
    let (first_index, _) = leader.write(submit_fleet("before", 1_000)).await.unwrap();

    // A follower refuses, naming the leader.
    match follower.add_learner(5, "127.0.0.1:1".into()).await {
        Err(MembershipError::ForwardToLeader {
            leader_id: Some(forward_id),
            leader_address: Some(address),
        }) => {
            assert_eq!(forward_id, leader_id);
            assert_eq!(address, leader.advertise_address());
        }
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }
    assert!(matches!(
        follower.promote_voter(5).await,
        Err(MembershipError::ForwardToLeader { leader_id: Some(id), .. }) if id == leader_id
    ));
    assert!(matches!(
        leader.promote_voter(5).await,
        Err(MembershipError::Refused(reason)) if reason.contains("not a learner")
    ));

    let fourth = TestNode::start(4, directories[3].path(), |_| {}).await;
    let fourth_address = fourth.node.advertise_address().to_string();
    leader.add_learner(4, fourth_address.clone()).await.unwrap();
    nodes.push(fourth);
    let fourth = node(&nodes, 4).clone();
    // The learner has everything up to the membership entry that added it.
    wait_for_applied(&fourth, first_index).await;
    assert!(fourth.state.read(|state| state.fleet("fl-1").is_some()));
    let (voters, learners) = voters_and_learners(&leader.cluster_view());
    assert_eq!(voters, BTreeSet::from([1, 2, 3]));
    assert_eq!(learners, BTreeSet::from([4]));
    assert!(matches!(
        leader.add_learner(4, "127.0.0.1:2".into()).await,
        Err(MembershipError::Refused(reason)) if reason.contains("already a member")
    ));

    leader.promote_voter(4).await.unwrap();
    leader.promote_voter(4).await.unwrap();
    let (second_index, _) = leader.write(submit_fleet("after", 2_000)).await.unwrap();
    for test_node in &nodes {
        wait_for_applied(&test_node.node, second_index).await;
    }
    assert_eq!(
        fourth.state.read(Clone::clone),
        leader.state.read(Clone::clone)
    );

    let view = wait_for_matched(&leader, second_index).await;
    assert_eq!(view.node_id, leader_id);
    assert_eq!(view.role, "Leader");
    assert_eq!(view.term, term);
    assert_eq!(
        view.leader,
        Some((leader_id, leader.advertise_address().to_string()))
    );
    assert!(view.last_log_index >= second_index);
    assert!(view.committed_index >= second_index);
    assert!(view.applied_index >= second_index);
    let (voters, learners) = voters_and_learners(&view);
    assert_eq!(voters, BTreeSet::from([1, 2, 3, 4]));
    assert!(learners.is_empty());
    let fourth_member = view
        .members
        .iter()
        .find(|member| member.node_id == 4)
        .unwrap();
    assert_eq!(fourth_member.address, fourth_address);

    let follower_view = follower.cluster_view();
    assert_eq!(follower_view.role, "Follower");
    assert_eq!(follower_view.term, term);
    assert_eq!(follower_view.leader, view.leader);
    assert_eq!(follower_view.members.len(), 4);
    assert!(
        follower_view
            .members
            .iter()
            .all(|member| member.matched_index.is_none()),
        "{follower_view:?}"
    );
    assert!(follower_view.applied_index >= second_index);
    assert!(follower_view.committed_index >= follower_view.applied_index);

    // The state and its index are read together.
    let (index, fleets) = fourth.state.read_with_index(|state, index| {
        (
            index,
            ["fl-1", "fl-2"].map(|fleet_id| state.fleet(fleet_id).is_some()),
        )
    });
    assert_eq!(index, fourth.state.last_applied_index());
    assert!(index >= second_index);
    assert_eq!(fleets, [true, true]);
    assert_eq!(fourth.elections_started(), 0, "a learner never campaigned");

    for test_node in nodes {
        test_node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_voters_leave_the_view_and_the_last_voter_stays() {
    let directories: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut nodes = start_cluster(&directories, |_| {}).await;
    let members: Vec<_> = nodes.iter().map(|test_node| &test_node.node).collect();
    let (leader_id, term) = wait_for_agreed_leader(&members, 0).await;
    let leader = node(&nodes, leader_id).clone();
    let mut followers = nodes
        .iter()
        .map(|test_node| test_node.node.node_id)
        .filter(|node_id| *node_id != leader_id);
    let (removed_id, remaining_id) = (followers.next().unwrap(), followers.next().unwrap());

    assert!(matches!(
        leader.remove_member(9).await,
        Err(MembershipError::NotAMember { node_id: 9 })
    ));
    leader.remove_member(removed_id).await.unwrap();
    let (voters, learners) = voters_and_learners(&leader.cluster_view());
    assert_eq!(voters, BTreeSet::from([leader_id, remaining_id]));
    assert!(learners.is_empty());
    let removed = nodes.remove(
        nodes
            .iter()
            .position(|test_node| test_node.node.node_id == removed_id)
            .unwrap(),
    );
    removed.stop().await;

    // The leader removes itself; the remaining voter takes over.
    leader.remove_member(leader_id).await.unwrap();
    let remaining = node(&nodes, remaining_id).clone();
    let (new_leader_id, _) = wait_for_agreed_leader(&[&remaining], term).await;
    assert_eq!(new_leader_id, remaining_id);
    let view = remaining.cluster_view();
    assert_eq!(view.role, "Leader");
    let (voters, learners) = voters_and_learners(&view);
    assert_eq!(voters, BTreeSet::from([remaining_id]));
    assert!(learners.is_empty());
    assert!(matches!(
        remaining.remove_member(remaining_id).await,
        Err(MembershipError::LastVoter { node_id }) if node_id == remaining_id
    ));
    let (index, _) = remaining.write(submit_fleet("alone", 3_000)).await.unwrap();
    assert!(index > 0);

    for test_node in nodes {
        test_node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_learner_times_out_and_can_be_removed() {
    let directory = tempfile::tempdir().unwrap();
    let leader = TestNode::start(1, directory.path(), |config| {
        config.learner_catch_up_timeout_ms = 300;
    })
    .await;
    leader.node.initialize_single_node().await.unwrap();
    super::wait_for_leader(&leader.node).await;
    let closed_port = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().to_string()
    };

    assert!(matches!(
        leader.node.add_learner(2, closed_port.clone()).await,
        Err(MembershipError::CatchUpTimeout {
            node_id: 2,
            timeout_ms: 300
        })
    ));
    assert!(matches!(
        leader.node.add_learner(3, String::new()).await,
        Err(MembershipError::Refused(_))
    ));
    let view = leader.node.cluster_view();
    let (voters, learners) = voters_and_learners(&view);
    assert_eq!(voters, BTreeSet::from([1]));
    assert_eq!(learners, BTreeSet::from([2]));
    let learner = view
        .members
        .iter()
        .find(|member| member.node_id == 2)
        .unwrap();
    assert_eq!(learner.address, closed_port);
    assert_eq!(learner.matched_index, Some(0), "nothing replicated to it");

    leader.node.remove_member(2).await.unwrap();
    let (voters, learners) = voters_and_learners(&leader.node.cluster_view());
    assert_eq!(voters, BTreeSet::from([1]));
    assert!(learners.is_empty());
    assert!(matches!(
        leader.node.remove_member(1).await,
        Err(MembershipError::LastVoter { node_id: 1 })
    ));
    leader.stop().await;
}
