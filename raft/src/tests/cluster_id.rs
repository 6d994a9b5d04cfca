//! The cluster id on every Raft message, over real gRPC: a node of another cluster can neither
//! vote, nor append, nor ask for a pre-vote, nor be added as a learner.

use flotilla_proto::raft::RaftMessage;
use flotilla_proto::raft::raft_service_server::RaftService;
use openraft::error::RPCError;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{BasicNode, Vote};

use super::{TestNode, WAIT_TIMEOUT, wait_for_leader};
use crate::{
    CLUSTER_ID_METADATA, GrpcNetworkFactory, MembershipError, NetworkConfig, RaftGrpcService,
    TransportSecurity,
};

fn option() -> RPCOption {
    RPCOption::new(std::time::Duration::from_secs(5))
}

/// The message of a remote refusal, whatever variant openraft's network error took.
fn refusal_text<E: std::error::Error>(error: RPCError<u64, BasicNode, E>) -> String {
    match error {
        RPCError::Network(error) => error.to_string(),
        other => panic!("expected the refusal as a network error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_another_cluster_cannot_vote_append_or_join() {
    let alpha_directory = tempfile::tempdir().unwrap();
    let beta_directory = tempfile::tempdir().unwrap();
    let alpha = TestNode::start(1, alpha_directory.path(), |config| {
        config.cluster_id = "alpha".into();
        config.learner_catch_up_timeout_ms = 2_000;
    })
    .await;
    alpha.node.initialize_single_node().await.unwrap();
    assert_eq!(wait_for_leader(&alpha.node).await, 1);
    let term_before = alpha.node.raft.metrics().borrow().current_term;
    let alpha_target = BasicNode::new(alpha.node.advertise_address());

    // A beta node's network, as openraft would use it: votes and appends are refused,
    // naming both cluster ids, and alpha's term does not move.
    let mut beta_network = GrpcNetworkFactory::with_security(
        2,
        NetworkConfig::default(),
        "beta",
        TransportSecurity::default(),
    );
    let mut client = beta_network.new_client(1, &alpha_target).await;
    let vote = client
        .vote(
            VoteRequest::new(Vote::new(term_before + 10, 2), None),
            option(),
        )
        .await
        .unwrap_err();
    let text = refusal_text(vote);
    assert!(
        text.contains("\"beta\"") && text.contains("\"alpha\"") && text.contains("refused"),
        "{text}"
    );
    let append = client
        .append_entries(
            AppendEntriesRequest {
                vote: Vote::new_committed(term_before + 10, 2),
                prev_log_id: None,
                entries: Vec::new(),
                leader_commit: None,
            },
            option(),
        )
        .await
        .unwrap_err();
    assert!(refusal_text(append).contains("\"beta\""));
    let pre_vote = beta_network
        .pre_vote(
            1,
            alpha.node.advertise_address(),
            &crate::PreVoteRequest {
                candidate_id: 2,
                term: term_before + 10,
                last_log_id: None,
            },
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert!(refusal_text(pre_vote).contains("\"beta\""));
    let metrics = alpha.node.raft.metrics().borrow().clone();
    assert_eq!(
        metrics.current_term, term_before,
        "alpha's term is unchanged"
    );
    assert_eq!(metrics.current_leader, Some(1), "alpha still leads");

    // A beta node cannot join alpha: it refuses alpha's appends, so it never catches up and
    // applies nothing of alpha's log.
    let beta = TestNode::start(2, beta_directory.path(), |config| {
        config.cluster_id = "beta".into();
    })
    .await;
    let alpha_leader = &alpha.node;
    let added = tokio::time::timeout(
        WAIT_TIMEOUT,
        alpha_leader.add_learner(2, beta.node.advertise_address().to_string()),
    )
    .await
    .expect("add_learner ends within its catch-up timeout");
    assert!(
        matches!(added, Err(MembershipError::CatchUpTimeout { .. })),
        "{added:?}"
    );
    assert_eq!(beta.node.state.last_applied_index(), 0);
    assert!(beta.node.raft.metrics().borrow().last_log_index.is_none());

    beta.stop().await;
    alpha.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_or_with_another_cluster_id_are_failed_preconditions() {
    let directory = tempfile::tempdir().unwrap();
    let test_node = TestNode::start(1, directory.path(), |_| {}).await;
    let service = RaftGrpcService::new(test_node.node.raft.clone(), "alpha");
    let vote = || RaftMessage {
        data: serde_json::to_vec(&VoteRequest::new(Vote::new(1, 2), None)).unwrap(),
    };
    let missing = service.vote(tonic::Request::new(vote())).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::FailedPrecondition);
    assert!(
        missing.message().contains(CLUSTER_ID_METADATA) && missing.message().contains("\"alpha\""),
        "{}",
        missing.message()
    );
    let mut foreign = tonic::Request::new(vote());
    foreign
        .metadata_mut()
        .insert(CLUSTER_ID_METADATA, "gamma".parse().unwrap());
    let status = service.vote(foreign).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("\"gamma\"") && status.message().contains("\"alpha\""),
        "{}",
        status.message()
    );
    let mut own = tonic::Request::new(vote());
    own.metadata_mut()
        .insert(CLUSTER_ID_METADATA, "alpha".parse().unwrap());
    service.vote(own).await.unwrap();
    test_node.stop().await;
}
