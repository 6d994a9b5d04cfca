//! Pre-vote: a follower cut off by a partition keeps its term and rejoins without deposing the
//! leader; voters refuse pre-votes from stale logs, while a leader is heard, and as leader, and
//! answering one changes nothing; a stale survivor cannot block an election.

use std::time::Duration;

use openraft::ServerState;

use super::{
    Partition, TestNode, WAIT_TIMEOUT, start_partitioned_cluster, submit_fleet,
    wait_for_agreed_leader, wait_for_applied, wait_until,
};
use crate::{GrpcNetworkFactory, NetworkConfig, PreVoteRefusal, PreVoteRequest, RaftNode};

/// The node of `nodes` with id `node_id`.
fn node(nodes: &[TestNode], node_id: u64) -> &RaftNode {
    &nodes
        .iter()
        .find(|test_node| test_node.node.node_id == node_id)
        .unwrap()
        .node
}

/// Writes `count` fleets through `leader`, numbered from `first`; returns the last log index.
async fn write_fleets(leader: &RaftNode, first: u64, count: u64) -> u64 {
    let mut index = 0;
    for number in first..first + count {
        (index, _) = leader
            .write(submit_fleet(&format!("fleet-{number}"), number * 1_000))
            .await
            .unwrap();
    }
    index
}

/// Waits until `node` lost `rounds` more pre-vote rounds than `lost_before`: it heard from no
/// leader for that many election timeouts and asked in vain each time.
async fn wait_for_lost_rounds(node: &RaftNode, lost_before: u64, rounds: u64) {
    wait_until(
        &format!(
            "node {} lost {rounds} pre-vote rounds while isolated",
            node.node_id
        ),
        || node.pre_vote_rounds_lost() >= lost_before + rounds,
    )
    .await;
}

/// Cuts a follower off for several election timeouts, writing `writes_while_isolated` entries
/// meanwhile (0: an idle cluster, where the follower's log stays as up to date as the leader's,
/// so only leader stickiness refuses it), heals, and checks that the follower never campaigned,
/// kept its term, caught up, and that the leader and term are unchanged everywhere.
async fn isolate_and_heal_a_follower(writes_while_isolated: u64) {
    let directories: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let partition = Partition::default();
    let nodes = start_partitioned_cluster(&directories, &partition, |_| {}).await;
    let all: Vec<&RaftNode> = nodes.iter().map(|test_node| &test_node.node).collect();
    let (leader_id, term) = wait_for_agreed_leader(&all, 0).await;
    let leader = node(&nodes, leader_id);
    let mut index = write_fleets(leader, 1, 3).await;
    for member in &all {
        wait_for_applied(member, index).await;
    }
    let follower = all
        .iter()
        .copied()
        .find(|member| member.node_id != leader_id)
        .unwrap();
    let campaigns_before: Vec<u64> = all
        .iter()
        .map(|member| member.elections_started())
        .collect();
    let lost_before = follower.pre_vote_rounds_lost();

    partition.isolate(follower.node_id);
    if writes_while_isolated > 0 {
        index = write_fleets(leader, 10, writes_while_isolated).await;
    }
    // Several election timeouts as the follower saw them: it asked three times in vain.
    wait_for_lost_rounds(follower, lost_before, 3).await;
    let isolated = follower.raft.metrics().borrow().clone();
    assert_eq!(
        isolated.current_term, term,
        "the isolated follower kept its term"
    );
    assert_eq!(
        follower.elections_started(),
        campaigns_before[all
            .iter()
            .position(|m| m.node_id == follower.node_id)
            .unwrap()],
        "the isolated follower never campaigned"
    );

    partition.heal();
    follower
        .raft
        .wait(Some(WAIT_TIMEOUT))
        .current_leader(leader_id, "the healed follower follows the leader")
        .await
        .unwrap();
    wait_for_applied(follower, index).await;
    // The healed follower hears the leader for a while (twenty heartbeats, about three
    // election timeouts) before the cluster is checked.
    let heard = follower.leader_messages_accepted();
    wait_until("the healed follower accepts heartbeats", || {
        follower.leader_messages_accepted() >= heard + 20
    })
    .await;
    for (member, campaigns) in all.iter().zip(&campaigns_before) {
        let metrics = member.raft.metrics().borrow().clone();
        assert_eq!(
            metrics.current_term, term,
            "node {}: the term",
            member.node_id
        );
        assert_eq!(
            metrics.current_leader,
            Some(leader_id),
            "node {}: the leader",
            member.node_id
        );
        assert_eq!(
            member.elections_started(),
            *campaigns,
            "node {}: no campaign",
            member.node_id
        );
    }
    assert_eq!(
        leader.raft.metrics().borrow().state,
        ServerState::Leader,
        "the leader still leads"
    );
    for test_node in nodes {
        test_node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_isolated_while_the_leader_writes_rejoins_without_deposing_it() {
    isolate_and_heal_a_follower(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_isolated_from_an_idle_cluster_rejoins_without_deposing_the_leader() {
    isolate_and_heal_a_follower(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_votes_are_refused_for_a_stale_log_while_a_leader_is_heard_and_by_the_leader() {
    let directories: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let partition = Partition::default();
    let nodes = start_partitioned_cluster(&directories, &partition, |_| {}).await;
    let all: Vec<&RaftNode> = nodes.iter().map(|test_node| &test_node.node).collect();
    let (leader_id, term) = wait_for_agreed_leader(&all, 0).await;
    let leader = node(&nodes, leader_id);
    let index = write_fleets(leader, 1, 2).await;
    for member in &all {
        wait_for_applied(member, index).await;
    }
    let mut followers = all.iter().copied().filter(|m| m.node_id != leader_id);
    let (isolated, connected) = (followers.next().unwrap(), followers.next().unwrap());

    // The isolated follower stops hearing the leader; once it lost a round, its lease expired.
    let lost_before = isolated.pre_vote_rounds_lost();
    partition.isolate(isolated.node_id);
    let index = write_fleets(leader, 10, 2).await;
    wait_for_lost_rounds(isolated, lost_before, 1).await;

    // The test asks as node 99, which the partition does not cut off.
    let network = GrpcNetworkFactory::new(99, NetworkConfig::default());
    let ask = |target: &RaftNode, last_log_id| {
        let network = network.clone();
        let target_id = target.node_id;
        let address = target.advertise_address().to_string();
        async move {
            let request = PreVoteRequest {
                candidate_id: 99,
                term: term + 1,
                last_log_id,
            };
            network
                .pre_vote(target_id, &address, &request, Duration::from_secs(5))
                .await
                .unwrap()
        }
    };
    let isolated_log = isolated.raft.data_metrics().borrow().last_log;
    let leader_log = leader.raft.data_metrics().borrow().last_log;
    assert!(
        isolated_log < leader_log,
        "the isolated follower's log is behind"
    );
    assert_eq!(leader_log.map(|log_id| log_id.index), Some(index));

    let vote_before = isolated.raft.metrics().borrow().vote;
    let stale = ask(isolated, None).await;
    assert!(!stale.granted);
    assert_eq!(stale.refusal, Some(PreVoteRefusal::LogBehind));
    assert_eq!(stale.last_log_id, isolated_log);
    assert_eq!(stale.term, term);
    let behind_by_one = isolated_log
        .map(|log_id| openraft::LogId::new(log_id.leader_id, log_id.index.saturating_sub(1)));
    assert_eq!(
        ask(isolated, behind_by_one).await.refusal,
        Some(PreVoteRefusal::LogBehind)
    );
    // Its own log is up to date enough: granted, and answering changed nothing.
    let granted = ask(isolated, isolated_log).await;
    assert!(granted.granted, "{granted:?}");
    assert_eq!(granted.refusal, None);
    assert_eq!(isolated.raft.metrics().borrow().vote, vote_before);
    assert_eq!(isolated.raft.metrics().borrow().current_term, term);

    // A follower that hears the leader refuses even an up-to-date candidate; so does the leader.
    let sticky = ask(connected, leader_log).await;
    assert!(
        matches!(sticky.refusal, Some(PreVoteRefusal::LeaderHeard { .. })),
        "{sticky:?}"
    );
    assert_eq!(
        ask(leader, leader_log).await.refusal,
        Some(PreVoteRefusal::VoterIsLeader)
    );
    for member in [leader, connected] {
        assert_eq!(member.raft.metrics().borrow().current_term, term);
    }

    partition.heal();
    for test_node in nodes {
        test_node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_leader_dies_the_up_to_date_survivor_is_elected_over_a_stale_one() {
    let directories: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let partition = Partition::default();
    let mut nodes = start_partitioned_cluster(&directories, &partition, |_| {}).await;
    let all: Vec<&RaftNode> = nodes.iter().map(|test_node| &test_node.node).collect();
    let (leader_id, term) = wait_for_agreed_leader(&all, 0).await;
    let mut followers = all.iter().filter(|m| m.node_id != leader_id);
    let (stale_id, current_id) = (
        followers.next().unwrap().node_id,
        followers.next().unwrap().node_id,
    );
    let stale_lost_before = node(&nodes, stale_id).pre_vote_rounds_lost();

    // The stale survivor misses the last writes, then the leader stops and the partition heals.
    partition.isolate(stale_id);
    let index = write_fleets(node(&nodes, leader_id), 1, 3).await;
    wait_for_applied(node(&nodes, current_id), index).await;
    wait_for_lost_rounds(node(&nodes, stale_id), stale_lost_before, 1).await;
    let leader_slot = nodes
        .iter()
        .position(|test_node| test_node.node.node_id == leader_id)
        .unwrap();
    nodes.remove(leader_slot).stop().await;
    partition.heal();

    let survivors: Vec<&RaftNode> = nodes.iter().map(|test_node| &test_node.node).collect();
    let (new_leader_id, new_term) = wait_for_agreed_leader(&survivors, term).await;
    assert_eq!(
        new_leader_id, current_id,
        "only the survivor with every committed entry can win"
    );
    assert!(new_term > term);
    wait_for_applied(node(&nodes, stale_id), index).await;
    for test_node in nodes {
        test_node.stop().await;
    }
}
