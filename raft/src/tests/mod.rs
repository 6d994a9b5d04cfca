//! Tests on real RocksDB databases in temporary directories and real tonic servers on
//! 127.0.0.1.

mod cluster;
mod cluster_id;
mod election;
mod group_commit;
mod membership;
mod pre_vote;
mod restart;
mod snapshot;
mod snapshot_files;
mod storage_suite;
mod transport;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::raft::RaftMessage;
use flotilla_proto::raft::raft_service_server::{RaftService, RaftServiceServer};
use openraft::ServerState;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tokio::sync::watch;

use flotilla_scheduler::spec::DEFAULT_BRANCH_TEMPLATE;
use flotilla_scheduler::{AgentSpec, Command, FleetSpec, Request, RetryPolicy, SandboxSpec};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::{PreVoteRequest, RaftGrpcService, RaftNode, RaftNodeConfig, TypeConfig, open};

/// Upper bound of any single wait in these tests.
const WAIT_TIMEOUT: Duration = Duration::from_secs(20);

/// A valid fleet spec named `name`.
fn fleet_spec(name: &str) -> FleetSpec {
    FleetSpec {
        name: name.into(),
        project: flotilla_scheduler::spec::DEFAULT_PROJECT.into(),
        repositories: vec!["file:///srv/a".into(), "file:///srv/b".into()],
        agent: AgentSpec {
            secrets: Default::default(),
            command: "cargo fmt".into(),
            task: "format".into(),
            env: BTreeMap::new(),
        },
        verify: vec!["cargo fmt --check".into()],
        sandbox: SandboxSpec {
            driver: "bwrap".into(),
            timeout_ms: 60_000,
            memory_limit_bytes: 0,
            pids_limit: 0,
            network: false,
            cpu_limit_millicores: 0,
            disk_limit_bytes: 0,
        },
        branch_template: DEFAULT_BRANCH_TEMPLATE.into(),
        commit_message: "Format".into(),
        max_parallelism: 4,
        retry: RetryPolicy::default(),
        push: true,
        flow: Default::default(),
    }
}

/// A `SubmitFleet` request for a fleet named `name`, stamped `now_ms`.
fn submit_fleet(name: &str, now_ms: u64) -> Request {
    Request {
        now_ms,
        command: Command::SubmitFleet {
            spec: fleet_spec(name),
            idempotency_key: String::new(),
            trace_parent: String::new(),
            max_events: 0,
        },
        principal: Default::default(),
    }
}

/// A node with its own gRPC server on an ephemeral port of 127.0.0.1.
struct TestNode {
    node: RaftNode,
    stop_server: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl TestNode {
    /// Opens node `node_id` on `data_directory` with `configure` applied to the default
    /// configuration, and serves its Raft RPCs on an ephemeral port.
    async fn start(
        node_id: u64,
        data_directory: &Path,
        configure: impl FnOnce(&mut RaftNodeConfig),
    ) -> TestNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestNode::serve(node_id, data_directory, listener, configure, None).await
    }

    /// Like [`TestNode::start`], with the node's Raft RPCs subject to `partition`.
    async fn start_partitioned(
        node_id: u64,
        data_directory: &Path,
        partition: &Partition,
        configure: impl FnOnce(&mut RaftNodeConfig),
    ) -> TestNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestNode::serve(
            node_id,
            data_directory,
            listener,
            configure,
            Some(partition.clone()),
        )
        .await
    }

    /// Like [`TestNode::start`], on `address` (a restarted node keeps the address stored in the
    /// membership). Retries binding for a while: the previous server may still be closing.
    async fn start_at(
        node_id: u64,
        data_directory: &Path,
        address: &str,
        configure: impl FnOnce(&mut RaftNodeConfig),
    ) -> TestNode {
        let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
        let listener = loop {
            match TcpListener::bind(address).await {
                Ok(listener) => break listener,
                Err(error) if tokio::time::Instant::now() < deadline => {
                    eprintln!("rebinding {address}: {error}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => panic!("cannot rebind {address}: {error}"),
            }
        };
        TestNode::serve(node_id, data_directory, listener, configure, None).await
    }

    async fn serve(
        node_id: u64,
        data_directory: &Path,
        listener: TcpListener,
        configure: impl FnOnce(&mut RaftNodeConfig),
        partition: Option<Partition>,
    ) -> TestNode {
        let address = listener.local_addr().unwrap().to_string();
        let mut config = RaftNodeConfig::new(node_id, address, data_directory);
        configure(&mut config);
        let node = open(config).await.unwrap();
        let (stop_server, stopped) = oneshot::channel::<()>();
        let router = match partition {
            None => Server::builder().add_service(node.grpc_service()),
            Some(partition) => Server::builder().add_service(
                RaftServiceServer::new(PartitionedService {
                    inner: node.raft_grpc_service(),
                    node_id,
                    partition,
                })
                .max_decoding_message_size(node.max_message_bytes())
                .max_encoding_message_size(node.max_message_bytes()),
            ),
        };
        let server = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stopped.await;
                })
                .await
        });
        TestNode {
            node,
            stop_server: Some(stop_server),
            server: Some(server),
        }
    }

    /// Shuts the node down, then its server.
    async fn stop(mut self) {
        self.node.shutdown().await.unwrap();
        if let Some(stop_server) = self.stop_server.take() {
            let _ = stop_server.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}

/// Waits until `node` knows a leader and returns its id.
async fn wait_for_leader(node: &RaftNode) -> u64 {
    let metrics = node
        .raft
        .wait(Some(WAIT_TIMEOUT))
        .metrics(
            |metrics| metrics.current_leader.is_some(),
            "a leader is known",
        )
        .await
        .unwrap();
    metrics.current_leader.unwrap()
}

/// Waits until `node` has applied the entry at `index`.
async fn wait_for_applied(node: &RaftNode, index: u64) {
    node.raft
        .wait(Some(WAIT_TIMEOUT))
        .applied_index_at_least(Some(index), "entry applied")
        .await
        .unwrap();
}

/// Starts nodes `1..=directories.len()` with `configure`, initializes them as one cluster, and
/// waits until all agree on a leader.
async fn start_cluster(
    directories: &[tempfile::TempDir],
    configure: impl Fn(&mut RaftNodeConfig),
) -> Vec<TestNode> {
    start_cluster_with(directories, configure, None).await
}

/// Like [`start_cluster`], with every node's Raft RPCs subject to `partition`.
async fn start_partitioned_cluster(
    directories: &[tempfile::TempDir],
    partition: &Partition,
    configure: impl Fn(&mut RaftNodeConfig),
) -> Vec<TestNode> {
    start_cluster_with(directories, configure, Some(partition)).await
}

async fn start_cluster_with(
    directories: &[tempfile::TempDir],
    configure: impl Fn(&mut RaftNodeConfig),
    partition: Option<&Partition>,
) -> Vec<TestNode> {
    let mut nodes = Vec::new();
    for (node_id, directory) in (1..).zip(directories) {
        nodes.push(match partition {
            None => TestNode::start(node_id, directory.path(), &configure).await,
            Some(partition) => {
                partition.add_member(node_id);
                TestNode::start_partitioned(node_id, directory.path(), partition, &configure).await
            }
        });
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
    let members: Vec<&RaftNode> = nodes.iter().map(|test_node| &test_node.node).collect();
    let (leader_id, _) = wait_for_agreed_leader(&members, 0).await;
    // Until the leader has applied the initial membership, a membership change is refused
    // ("already undergoing a configuration change"): tests start from a settled cluster.
    let leader = members
        .iter()
        .find(|node| node.node_id == leader_id)
        .expect("the leader is a member");
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    loop {
        let metrics = leader.raft.metrics().borrow().clone();
        if metrics.last_applied.is_some()
            && metrics.last_applied >= *metrics.membership_config.log_id()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader did not apply the initial membership within {WAIT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    nodes
}

/// Waits until one of `nodes` is the leader in a term above `above_term` and all of `nodes`
/// name it as their leader; returns its id and term.
async fn wait_for_agreed_leader(nodes: &[&RaftNode], above_term: u64) -> (u64, u64) {
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    loop {
        let leader = nodes.iter().find_map(|node| {
            let metrics = node.raft.metrics().borrow().clone();
            (metrics.state == ServerState::Leader && metrics.current_term > above_term)
                .then_some((metrics.id, metrics.current_term))
        });
        if let Some((leader_id, term)) = leader
            && nodes
                .iter()
                .all(|node| node.raft.metrics().borrow().current_leader == Some(leader_id))
        {
            return (leader_id, term);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no agreed leader in a term above {above_term} within {WAIT_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `condition` until `window` has passed, failing with `what` the first time it is false:
/// for facts that must hold throughout a stretch of time (no campaign while a leader is heard).
async fn assert_holds_for(window: Duration, what: &str, condition: impl Fn() -> bool) {
    let end = tokio::time::Instant::now() + window;
    loop {
        assert!(condition(), "{what}");
        if tokio::time::Instant::now() >= end {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `condition` holds, failing with `what` after [`WAIT_TIMEOUT`].
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {WAIT_TIMEOUT:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A network partition between cluster members, applied by each member's server
/// ([`PartitionedService`]): a Raft RPC between an isolated member and any other member is
/// never answered (the caller times out, as when packets are dropped) until the partition
/// heals. RPCs from senders that are not members (a test's own client) pass.
#[derive(Clone, Debug, Default)]
struct Partition {
    /// The members and the isolated members.
    state: Arc<watch::Sender<(BTreeSet<u64>, BTreeSet<u64>)>>,
}

impl Partition {
    fn add_member(&self, node_id: u64) {
        self.state.send_modify(|(members, _)| {
            members.insert(node_id);
        });
    }

    /// Cuts `node_id` off from every other member.
    fn isolate(&self, node_id: u64) {
        self.state.send_modify(|(_, isolated)| {
            isolated.insert(node_id);
        });
    }

    /// Heals every cut.
    fn heal(&self) {
        self.state.send_modify(|(_, isolated)| isolated.clear());
    }

    /// Whether an RPC from `sender` to `receiver` is cut.
    fn cuts(state: &(BTreeSet<u64>, BTreeSet<u64>), sender: u64, receiver: u64) -> bool {
        let (members, isolated) = state;
        sender != receiver
            && members.contains(&sender)
            && members.contains(&receiver)
            && (isolated.contains(&sender) != isolated.contains(&receiver))
    }

    /// Returns at once if the link is up; otherwise waits until it heals and fails the RPC
    /// (its caller has given up long before).
    async fn pass(&self, sender: Option<u64>, receiver: u64) -> Result<(), tonic::Status> {
        let Some(sender) = sender else { return Ok(()) };
        let mut state = self.state.subscribe();
        if !Partition::cuts(&state.borrow_and_update(), sender, receiver) {
            return Ok(());
        }
        let _ = state
            .wait_for(|state| !Partition::cuts(state, sender, receiver))
            .await;
        Err(tonic::Status::unavailable("dropped by the test partition"))
    }
}

/// A node's [`RaftGrpcService`] behind a [`Partition`].
struct PartitionedService {
    inner: RaftGrpcService,
    node_id: u64,
    partition: Partition,
}

/// The sender of a Raft RPC, from its encoding: the vote's node for openraft's requests, the
/// candidate for a pre-vote. `None` if it does not decode (the service then rejects it).
fn sender_of<T: serde::de::DeserializeOwned>(
    message: &RaftMessage,
    sender: impl Fn(T) -> Option<u64>,
) -> Option<u64> {
    crate::codec::decode::<T>(&message.data)
        .ok()
        .and_then(sender)
}

#[tonic::async_trait]
impl RaftService for PartitionedService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let sender = sender_of(
            request.get_ref(),
            |rpc: AppendEntriesRequest<TypeConfig>| rpc.vote.leader_id().voted_for(),
        );
        self.partition.pass(sender, self.node_id).await?;
        self.inner.append_entries(request).await
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let sender = sender_of(request.get_ref(), |rpc: VoteRequest<u64>| {
            rpc.vote.leader_id().voted_for()
        });
        self.partition.pass(sender, self.node_id).await?;
        self.inner.vote(request).await
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let sender = sender_of(
            request.get_ref(),
            |rpc: InstallSnapshotRequest<TypeConfig>| rpc.vote.leader_id().voted_for(),
        );
        self.partition.pass(sender, self.node_id).await?;
        self.inner.install_snapshot(request).await
    }

    async fn pre_vote(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let sender = sender_of(request.get_ref(), |rpc: PreVoteRequest| {
            Some(rpc.candidate_id)
        });
        self.partition.pass(sender, self.node_id).await?;
        self.inner.pre_vote(request).await
    }
}
