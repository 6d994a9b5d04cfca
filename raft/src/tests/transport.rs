//! The gRPC service rejects undecodable messages; the network reports unreachable peers so
//! that openraft backs off.

use std::time::Duration;

use flotilla_proto::raft::RaftMessage;
use flotilla_proto::raft::raft_service_server::RaftService;
use openraft::error::RPCError;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::VoteRequest;
use openraft::{BasicNode, Vote};
use tokio::net::TcpListener;

use super::TestNode;
use crate::{GrpcNetworkFactory, NetworkConfig, RaftGrpcService};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_arguments_naming_the_field() {
    let directory = tempfile::tempdir().unwrap();
    let test_node = TestNode::start(1, directory.path(), |_| {}).await;
    let service = RaftGrpcService::new(test_node.node.raft.clone());

    let garbage = || {
        tonic::Request::new(RaftMessage {
            data: b"not json".to_vec(),
        })
    };
    for status in [
        service.append_entries(garbage()).await.unwrap_err(),
        service.vote(garbage()).await.unwrap_err(),
        service.install_snapshot(garbage()).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("data: "),
            "{}",
            status.message()
        );
    }

    // A well-formed vote request gets openraft's answer, encoded as a `Result`.
    let request = VoteRequest::new(Vote::new(1, 2), None);
    let reply = service
        .vote(tonic::Request::new(RaftMessage {
            data: serde_json::to_vec(&request).unwrap(),
        }))
        .await
        .unwrap()
        .into_inner();
    let answer: Result<openraft::raft::VoteResponse<u64>, openraft::error::RaftError<u64>> =
        serde_json::from_slice(&reply.data).unwrap();
    assert!(
        answer.unwrap().vote_granted,
        "a fresh node grants its first vote"
    );

    test_node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_peers_are_reported_as_unreachable() {
    let closed_port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let mut factory = GrpcNetworkFactory::new(1, NetworkConfig::default());
    let option = RPCOption::new(Duration::from_secs(2));
    for address in [closed_port.as_str(), "not a valid address"] {
        let mut client = factory.new_client(2, &BasicNode::new(address)).await;
        let result = client
            .vote(VoteRequest::new(Vote::new(1, 1), None), option.clone())
            .await;
        assert!(
            matches!(result, Err(RPCError::Unreachable(_))),
            "{address}: {result:?}"
        );
    }
}

#[test]
fn inconsistent_configurations_are_rejected() {
    let valid = crate::RaftNodeConfig::new(1, "127.0.0.1:7000", "/nonexistent");
    assert!(valid.to_openraft_config().is_ok());
    type Edit = fn(&mut crate::RaftNodeConfig);
    let cases: [(Edit, &str); 8] = [
        (
            |config| config.advertise_address.clear(),
            "advertise_address",
        ),
        (
            |config| config.heartbeat_interval_ms = config.election_timeout_min_ms / 2 + 1,
            "heartbeat_interval_ms",
        ),
        (
            |config| config.learner_catch_up_timeout_ms = 0,
            "learner_catch_up_timeout_ms",
        ),
        (
            |config| config.data_directory = Default::default(),
            "data_directory",
        ),
        (
            |config| config.election_timeout_min_ms = config.heartbeat_interval_ms,
            "election",
        ),
        (
            |config| config.snapshot_logs_since_last = 0,
            "snapshot_logs_since_last",
        ),
        (
            |config| config.snapshot_chunk_bytes = 32 * 1024 * 1024,
            "snapshot_chunk_bytes",
        ),
        (|config| config.max_payload_entries = 0, "payload"),
    ];
    for (edit, expected) in cases {
        let mut config = valid.clone();
        edit(&mut config);
        let error = config.to_openraft_config().unwrap_err().to_string();
        assert!(error.to_lowercase().contains(expected), "{error}");
    }
}

#[test]
fn the_openraft_config_follows_the_election_timer_switch() {
    let mut config = crate::RaftNodeConfig::new(1, "127.0.0.1:7000", "/nonexistent");
    let resampling = config.to_openraft_config().unwrap();
    assert!(config.resample_election_timeout, "on by default");
    assert!(!resampling.enable_elect, "openraft's timer is off");
    // openraft's leader lease is its upper bound: the lower bound of ours.
    assert_eq!(
        resampling.election_timeout_max,
        config.election_timeout_min_ms
    );
    assert!(resampling.election_timeout_min > resampling.heartbeat_interval);

    config.resample_election_timeout = false;
    let openraft_timer = config.to_openraft_config().unwrap();
    assert!(openraft_timer.enable_elect);
    assert_eq!(
        (
            openraft_timer.election_timeout_min,
            openraft_timer.election_timeout_max
        ),
        (
            config.election_timeout_min_ms,
            config.election_timeout_max_ms
        )
    );
}
