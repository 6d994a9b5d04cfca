//! Tests on real RocksDB databases in temporary directories and real tonic servers on
//! 127.0.0.1.

mod cluster;
mod restart;
mod snapshot;
mod storage_suite;
mod transport;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use flotilla_scheduler::spec::DEFAULT_BRANCH_TEMPLATE;
use flotilla_scheduler::{AgentSpec, Command, FleetSpec, Request, RetryPolicy, SandboxSpec};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::{RaftNode, RaftNodeConfig, open};

/// Upper bound of any single wait in these tests.
const WAIT_TIMEOUT: Duration = Duration::from_secs(20);

/// A valid fleet spec named `name`.
fn fleet_spec(name: &str) -> FleetSpec {
    FleetSpec {
        name: name.into(),
        repositories: vec!["file:///srv/a".into(), "file:///srv/b".into()],
        agent: AgentSpec {
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
        },
        branch_template: DEFAULT_BRANCH_TEMPLATE.into(),
        commit_message: "Format".into(),
        max_parallelism: 4,
        retry: RetryPolicy::default(),
        push: true,
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
        },
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
    /// configuration, and serves its Raft RPCs.
    async fn start(
        node_id: u64,
        data_directory: &Path,
        configure: impl FnOnce(&mut RaftNodeConfig),
    ) -> TestNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let mut config = RaftNodeConfig::new(node_id, address, data_directory);
        configure(&mut config);
        let node = open(config).await.unwrap();
        let (stop_server, stopped) = oneshot::channel::<()>();
        let service = node.grpc_service();
        let server = tokio::spawn(async move {
            Server::builder()
                .add_service(service)
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
