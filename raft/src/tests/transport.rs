//! The gRPC service rejects undecodable messages; the network reports unreachable peers so
//! that openraft backs off, messages over the size limit as too large, and replaces a
//! connection that stalled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::raft::RaftMessage;
use flotilla_proto::raft::raft_service_server::RaftService;
use openraft::error::RPCError;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use openraft::{BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::{TestNode, WAIT_TIMEOUT, submit_fleet};
use crate::{GrpcNetworkFactory, NetworkConfig, RaftGrpcService, TypeConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_arguments_naming_the_field() {
    let directory = tempfile::tempdir().unwrap();
    let test_node = TestNode::start(1, directory.path(), |_| {}).await;
    let service =
        RaftGrpcService::new(test_node.node.raft.clone(), crate::node::DEFAULT_CLUSTER_ID);

    let of_this_cluster = |message: RaftMessage| {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(
            crate::CLUSTER_ID_METADATA,
            crate::node::DEFAULT_CLUSTER_ID.parse().unwrap(),
        );
        request
    };
    let garbage = || {
        of_this_cluster(RaftMessage {
            data: b"not json".to_vec(),
        })
    };
    for status in [
        service.append_entries(garbage()).await.unwrap_err(),
        service.vote(garbage()).await.unwrap_err(),
        service.install_snapshot(garbage()).await.unwrap_err(),
        service.pre_vote(garbage()).await.unwrap_err(),
    ] {
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("data: "),
            "{}",
            status.message()
        );
    }

    // A well-formed vote request gets openraft's answer, encoded (version byte, MessagePack)
    // as a `Result`; a request in the legacy JSON of earlier versions is still understood.
    let request = VoteRequest::new(Vote::new(1, 2), None);
    for data in [
        crate::codec::encode(&request).unwrap(),
        serde_json::to_vec(&request).unwrap(),
    ] {
        let reply = service
            .vote(of_this_cluster(RaftMessage { data }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.data[0], crate::codec::FORMAT_VERSION_MESSAGEPACK);
        let answer: Result<openraft::raft::VoteResponse<u64>, openraft::error::RaftError<u64>> =
            crate::codec::decode(&reply.data).unwrap();
        assert!(
            answer.unwrap().vote_granted,
            "a fresh node grants its first vote (a repeated vote for the same candidate too)"
        );
    }

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

/// An AppendEntries of 20 entries, each with a task of `task_bytes` bytes.
fn large_append(task_bytes: usize) -> AppendEntriesRequest<TypeConfig> {
    let entries: Vec<Entry<TypeConfig>> = (1..=20)
        .map(|index| {
            let mut request = submit_fleet(&format!("fleet-{index}"), index);
            if let flotilla_scheduler::Command::SubmitFleet { spec, .. } = &mut request.command {
                spec.agent.task = "t".repeat(task_bytes);
            }
            Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 2), index),
                payload: EntryPayload::Normal(crate::proposer::LogPayload::Batch {
                    requests: vec![request],
                }),
            }
        })
        .collect();
    AppendEntriesRequest {
        vote: Vote::new_committed(1, 2),
        prev_log_id: None,
        entries,
        leader_commit: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_over_either_sides_message_limit_or_the_byte_budget_is_payload_too_large() {
    // The receiver accepts at most 128 KiB (with chunks small enough to fit).
    let directory = tempfile::tempdir().unwrap();
    let test_node = TestNode::start(1, directory.path(), |config| {
        config.network.max_message_bytes = 128 * 1024;
        config.snapshot_chunk_bytes = 16 * 1024;
    })
    .await;
    let target = BasicNode::new(test_node.node.advertise_address());
    let option = RPCOption::new(Duration::from_secs(5));
    let defaults = NetworkConfig::default();
    for (sender_limit, append_limit, task_bytes, side) in [
        (
            4096,
            defaults.max_append_entries_bytes,
            100,
            "over the sender's limit",
        ),
        (
            defaults.max_message_bytes,
            usize::MAX,
            10_000,
            "over the receiver's limit",
        ),
        (
            defaults.max_message_bytes,
            4096,
            100,
            "over the AppendEntries byte budget",
        ),
    ] {
        let config = NetworkConfig {
            max_message_bytes: sender_limit,
            max_append_entries_bytes: append_limit,
            ..NetworkConfig::default()
        };
        let mut factory = GrpcNetworkFactory::new(2, config);
        let mut client = factory.new_client(1, &target).await;
        let result = client
            .append_entries(large_append(task_bytes), option.clone())
            .await;
        match result {
            Err(RPCError::PayloadTooLarge(too_large)) => {
                assert_eq!(too_large.entries_hint(), 10, "{side}: half the entries");
            }
            other => panic!("{side}: expected PayloadTooLarge, got {other:?}"),
        }
    }
    test_node.stop().await;
}

/// A TCP proxy to `upstream` whose connections can be frozen: [`FreezingProxy::freeze`] stops
/// forwarding on every connection open at that moment, keeping it open (as a partition that
/// drops packets leaves a connection), while new connections are forwarded normally.
struct FreezingProxy {
    address: String,
    freeze: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezingProxy {
    async fn start(upstream: String) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (freeze, _) = watch::channel(0u64);
        let generations = freeze.clone();
        let frozen: Arc<Mutex<Vec<(TcpStream, TcpStream)>>> = Arc::default();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let mut generation = generations.subscribe();
                let frozen = Arc::clone(&frozen);
                tokio::spawn(async move {
                    generation.borrow_and_update();
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => return,
                        _ = generation.changed() => {}
                    }
                    // Frozen: keep both ends open, forward nothing.
                    frozen.lock().unwrap().push((inbound, outbound));
                });
            }
        });
        FreezingProxy {
            address,
            freeze,
            task,
        }
    }

    fn freeze(&self) {
        self.freeze.send_modify(|generation| *generation += 1);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_connection_is_replaced_after_its_keep_alive_ping_goes_unanswered() {
    let directory = tempfile::tempdir().unwrap();
    let test_node = TestNode::start(1, directory.path(), |_| {}).await;
    let proxy = FreezingProxy::start(test_node.node.advertise_address().to_string()).await;
    let config = NetworkConfig {
        keep_alive_interval_ms: 200,
        keep_alive_timeout_ms: 400,
        ..NetworkConfig::default()
    };
    let mut factory = GrpcNetworkFactory::new(2, config);
    let target = BasicNode::new(&proxy.address);
    let option = RPCOption::new(Duration::from_millis(300));
    let vote = || VoteRequest::new(Vote::new(1, 2), None);

    let mut client = factory.new_client(1, &target).await;
    client.vote(vote(), option.clone()).await.unwrap();

    // The connection stalls for good; calls on it fail until it is replaced by a new one.
    proxy.freeze();
    let mut failures = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    loop {
        let mut client = factory.new_client(1, &target).await;
        match client.vote(vote(), option.clone()).await {
            Ok(_) => break,
            Err(error) => {
                assert!(
                    matches!(error, RPCError::Timeout(_) | RPCError::Unreachable(_)),
                    "{error:?}"
                );
                failures.push(error);
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no call succeeded within {WAIT_TIMEOUT:?} of the stall: {failures:?}"
        );
    }
    assert!(
        !failures.is_empty(),
        "the stall took effect: calls on the frozen connection failed"
    );
    drop(proxy);
    test_node.stop().await;
}

#[test]
fn inconsistent_configurations_are_rejected() {
    let valid = crate::RaftNodeConfig::new(1, "127.0.0.1:7000", "/nonexistent");
    assert!(valid.to_openraft_config().is_ok());
    type Edit = fn(&mut crate::RaftNodeConfig);
    let cases: [(Edit, &str); 10] = [
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
        (
            |config| config.network.keep_alive_interval_ms = 0,
            "keep_alive_interval_ms",
        ),
        (
            |config| config.network.keep_alive_timeout_ms = 0,
            "keep_alive_timeout_ms",
        ),
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
