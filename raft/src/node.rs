//! One Raft node of Flotilla, assembled: RocksDB storage, the tonic network, openraft's
//! [`Raft`], the [`StateHandle`], and the gRPC service peers call.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::raft::raft_service_server::RaftServiceServer;
use flotilla_scheduler::{Request, Response};
use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, Fatal, InitializeError,
};
use openraft::{BasicNode, SnapshotPolicy};
use tokio::sync::watch;

use crate::network::{GrpcNetworkFactory, NetworkConfig};
use crate::service::RaftGrpcService;
use crate::state_machine::StateHandle;
use crate::storage::{OpenStorageError, open_storage};
use crate::types::{NodeId, Raft};

/// Default name of the cluster; nodes of different clusters refuse each other's messages.
pub const DEFAULT_CLUSTER_NAME: &str = "flotilla";
/// Default interval between the leader's heartbeats (empty AppendEntries), in milliseconds.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 100;
/// Default lower bound of the randomized election timeout (Raft §5.2), in milliseconds.
pub const DEFAULT_ELECTION_TIMEOUT_MIN_MS: u64 = 400;
/// Default upper bound of the randomized election timeout (Raft §5.2), in milliseconds.
pub const DEFAULT_ELECTION_TIMEOUT_MAX_MS: u64 = 800;
/// Default number of log entries applied since the last snapshot that triggers a new snapshot
/// (openraft's [`SnapshotPolicy::LogsSinceLast`]).
pub const DEFAULT_SNAPSHOT_LOGS_SINCE_LAST: u64 = 10_000;
/// Default number of log entries kept after a snapshot covers them, so slightly lagging
/// followers catch up from the log rather than by a snapshot.
pub const DEFAULT_MAX_IN_SNAPSHOT_LOG_TO_KEEP: u64 = 1_000;
/// Default largest number of entries in one AppendEntries RPC.
pub const DEFAULT_MAX_PAYLOAD_ENTRIES: u64 = 300;
/// Default size of one snapshot chunk (one InstallSnapshot RPC), in bytes: 1 MiB.
pub const DEFAULT_SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;
/// Default time allowed for one InstallSnapshot RPC, including installing the last chunk, in
/// milliseconds.
pub const DEFAULT_INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 5_000;
/// Default time [`RaftNode::shutdown`] waits for openraft's tasks to release the database, in
/// milliseconds.
pub const DEFAULT_STORAGE_RELEASE_TIMEOUT_MS: u64 = 5_000;

/// Name of the RocksDB directory inside [`RaftNodeConfig::data_directory`].
pub const DATABASE_DIRECTORY_NAME: &str = "raft";

/// JSON spells each snapshot byte as a decimal number and a comma: at most 4 bytes per byte.
const JSON_BYTES_PER_SNAPSHOT_BYTE: u64 = 4;
/// Room for the rest of an InstallSnapshot request (vote, snapshot meta and membership).
const INSTALL_SNAPSHOT_ENVELOPE_BYTES: u64 = 64 * 1024;

/// Settings of one Raft node. [`RaftNodeConfig::new`] fills in the documented defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftNodeConfig {
    /// This node's id; stable for the life of `data_directory`, unique in the cluster.
    pub node_id: NodeId,
    /// `host:port` at which peers reach this node's gRPC server; stored in the membership.
    pub advertise_address: String,
    /// Directory of the node's data; the Raft database is its subdirectory
    /// [`DATABASE_DIRECTORY_NAME`].
    pub data_directory: PathBuf,
    /// Cluster name. Default [`DEFAULT_CLUSTER_NAME`].
    pub cluster_name: String,
    /// Leader heartbeat interval, in milliseconds; also the AppendEntries RPC timeout. Default
    /// [`DEFAULT_HEARTBEAT_INTERVAL_MS`].
    pub heartbeat_interval_ms: u64,
    /// Election timeout lower bound, in milliseconds; must exceed the heartbeat interval. Default
    /// [`DEFAULT_ELECTION_TIMEOUT_MIN_MS`].
    pub election_timeout_min_ms: u64,
    /// Election timeout upper bound, in milliseconds; must exceed the lower bound. Default
    /// [`DEFAULT_ELECTION_TIMEOUT_MAX_MS`].
    pub election_timeout_max_ms: u64,
    /// Build a snapshot once this many entries were committed since the last one (at least 1).
    /// Default [`DEFAULT_SNAPSHOT_LOGS_SINCE_LAST`].
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log after a snapshot covers them. Default
    /// [`DEFAULT_MAX_IN_SNAPSHOT_LOG_TO_KEEP`].
    pub max_in_snapshot_log_to_keep: u64,
    /// Largest number of entries per AppendEntries RPC (at least 1). Default
    /// [`DEFAULT_MAX_PAYLOAD_ENTRIES`].
    pub max_payload_entries: u64,
    /// Snapshot chunk size, in bytes; its JSON must fit in `network.max_message_bytes`. Default
    /// [`DEFAULT_SNAPSHOT_CHUNK_BYTES`].
    pub snapshot_chunk_bytes: u64,
    /// Time allowed per InstallSnapshot RPC, in milliseconds. Default
    /// [`DEFAULT_INSTALL_SNAPSHOT_TIMEOUT_MS`].
    pub install_snapshot_timeout_ms: u64,
    /// Time [`RaftNode::shutdown`] waits for the database to be released, in milliseconds.
    /// Default [`DEFAULT_STORAGE_RELEASE_TIMEOUT_MS`].
    pub storage_release_timeout_ms: u64,
    /// Transport settings.
    pub network: NetworkConfig,
}

impl Default for RaftNodeConfig {
    /// The documented defaults, with node id 0 and an empty advertise address and data directory,
    /// which the caller must set (validation rejects the empty ones).
    fn default() -> Self {
        RaftNodeConfig {
            node_id: 0,
            advertise_address: String::new(),
            data_directory: PathBuf::new(),
            cluster_name: DEFAULT_CLUSTER_NAME.to_string(),
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            election_timeout_min_ms: DEFAULT_ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max_ms: DEFAULT_ELECTION_TIMEOUT_MAX_MS,
            snapshot_logs_since_last: DEFAULT_SNAPSHOT_LOGS_SINCE_LAST,
            max_in_snapshot_log_to_keep: DEFAULT_MAX_IN_SNAPSHOT_LOG_TO_KEEP,
            max_payload_entries: DEFAULT_MAX_PAYLOAD_ENTRIES,
            snapshot_chunk_bytes: DEFAULT_SNAPSHOT_CHUNK_BYTES,
            install_snapshot_timeout_ms: DEFAULT_INSTALL_SNAPSHOT_TIMEOUT_MS,
            storage_release_timeout_ms: DEFAULT_STORAGE_RELEASE_TIMEOUT_MS,
            network: NetworkConfig::default(),
        }
    }
}

impl RaftNodeConfig {
    /// A configuration for node `node_id`, reachable at `advertise_address` (`host:port`), with
    /// its data in `data_directory`, and the documented defaults for everything else.
    pub fn new(
        node_id: NodeId,
        advertise_address: impl Into<String>,
        data_directory: impl Into<PathBuf>,
    ) -> Self {
        RaftNodeConfig {
            node_id,
            advertise_address: advertise_address.into(),
            data_directory: data_directory.into(),
            ..RaftNodeConfig::default()
        }
    }

    /// The openraft configuration, validated.
    ///
    /// # Errors
    /// [`RaftError::InvalidConfig`] naming the offending field.
    pub fn to_openraft_config(&self) -> Result<openraft::Config, RaftError> {
        let invalid = |message: String| Err(RaftError::InvalidConfig(message));
        if self.advertise_address.is_empty() {
            return invalid(
                "advertise_address: must be the host:port peers reach this node at".into(),
            );
        }
        if self.data_directory.as_os_str().is_empty() {
            return invalid("data_directory: must not be empty".into());
        }
        if self.snapshot_logs_since_last == 0 {
            return invalid("snapshot_logs_since_last: must be at least 1".into());
        }
        if self.snapshot_chunk_bytes == 0 {
            return invalid("snapshot_chunk_bytes: must be at least 1".into());
        }
        let largest_chunk_message_bytes = self
            .snapshot_chunk_bytes
            .saturating_mul(JSON_BYTES_PER_SNAPSHOT_BYTE)
            .saturating_add(INSTALL_SNAPSHOT_ENVELOPE_BYTES);
        if largest_chunk_message_bytes > self.network.max_message_bytes as u64 {
            return invalid(format!(
                "snapshot_chunk_bytes: {} bytes may encode to {largest_chunk_message_bytes} bytes of JSON, more than \
                 network.max_message_bytes ({})",
                self.snapshot_chunk_bytes, self.network.max_message_bytes
            ));
        }
        if self.network.unreachable_backoff_initial_ms == 0 {
            return invalid("network.unreachable_backoff_initial_ms: must be at least 1".into());
        }
        openraft::Config {
            cluster_name: self.cluster_name.clone(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            max_payload_entries: self.max_payload_entries,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            max_in_snapshot_log_to_keep: self.max_in_snapshot_log_to_keep,
            ..openraft::Config::default()
        }
        .validate()
        .map_err(|error| RaftError::InvalidConfig(error.to_string()))
    }
}

/// Why opening, initializing or shutting down a node failed.
#[derive(Debug, thiserror::Error)]
pub enum RaftError {
    /// The configuration is inconsistent.
    #[error("invalid Raft configuration: {0}")]
    InvalidConfig(String),
    /// The database could not be opened or the state restored.
    #[error(transparent)]
    Storage(#[from] OpenStorageError),
    /// The Raft node has stopped (shut down, or a storage failure stopped it).
    #[error("the Raft node stopped: {0}")]
    Stopped(Box<Fatal<NodeId>>),
    /// Initializing the cluster was refused for a reason other than "already initialized".
    #[error("cannot initialize the cluster: {0}")]
    Initialize(Box<InitializeError<NodeId, BasicNode>>),
    /// openraft's core task ended abnormally during shutdown.
    #[error("the Raft core task failed: {0}")]
    CoreTask(#[from] tokio::task::JoinError),
    /// openraft's tasks still hold the database after shutdown.
    #[error("the Raft database was not released within {timeout_ms} ms of shutdown")]
    StorageNotReleased {
        /// How long shutdown waited, in milliseconds.
        timeout_ms: u64,
    },
}

impl From<Fatal<NodeId>> for RaftError {
    fn from(fatal: Fatal<NodeId>) -> Self {
        RaftError::Stopped(Box::new(fatal))
    }
}

/// Why [`RaftNode::write`] failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This node is not the leader; retry on the leader. Both fields are `None` while no leader
    /// is known (an election is under way).
    #[error("not the leader; the leader is {leader_id:?} at {leader_address:?}")]
    ForwardToLeader {
        /// The leader's node id, if known.
        leader_id: Option<NodeId>,
        /// The leader's `host:port`, if known.
        leader_address: Option<String>,
    },
    /// The Raft node has stopped; the write's outcome is unknown if it was already proposed.
    #[error("the Raft node stopped: {0}")]
    Stopped(Box<Fatal<NodeId>>),
    /// openraft refused the entry for a membership reason (not expected for commands).
    #[error("the write was refused: {0}")]
    Refused(Box<ChangeMembershipError<NodeId>>),
}

/// Why [`RaftNode::ensure_linearizable`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// This node is not the leader; read on the leader. `None` while no leader is known.
    #[error("not the leader; the leader is {leader_id:?} at {leader_address:?}")]
    ForwardToLeader {
        /// The leader's node id, if known.
        leader_id: Option<NodeId>,
        /// The leader's `host:port`, if known.
        leader_address: Option<String>,
    },
    /// A quorum did not confirm this node's leadership in time.
    #[error("leadership not confirmed by a quorum: {0}")]
    QuorumNotConfirmed(String),
    /// The Raft node has stopped.
    #[error("the Raft node stopped: {0}")]
    Stopped(Box<Fatal<NodeId>>),
}

/// A running Raft node. Cloning is cheap; clones share the node.
#[derive(Clone)]
pub struct RaftNode {
    /// The openraft node (metrics, membership changes, ...).
    pub raft: Raft,
    /// Read access to the applied state and change notifications.
    pub state: StateHandle,
    /// This node's id.
    pub node_id: NodeId,
    advertise_address: String,
    max_message_bytes: usize,
    storage_release_timeout: Duration,
    database_closed: watch::Receiver<()>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RaftNode")
            .field("node_id", &self.node_id)
            .field("advertise_address", &self.advertise_address)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Opens the node's database at `data_directory/raft` (creating it if missing), restores the
/// state machine from the persisted snapshot, and starts openraft. A fresh node waits to be
/// initialized ([`RaftNode::initialize_single_node`], [`RaftNode::initialize_cluster`]) or added
/// to a cluster by its leader; a node with data rejoins its cluster. Opening RocksDB (including
/// its write-ahead-log recovery) runs on the calling task; call it at startup.
///
/// # Errors
/// [`RaftError::InvalidConfig`], [`RaftError::Storage`] if the database cannot be opened (for
/// example, held by another process), [`RaftError::Stopped`] if openraft cannot start on the
/// stored data.
pub async fn open(config: RaftNodeConfig) -> Result<RaftNode, RaftError> {
    let raft_config = Arc::new(config.to_openraft_config()?);
    let database_path = config.data_directory.join(DATABASE_DIRECTORY_NAME);
    let (log_store, state_machine) = open_storage(&database_path)?;
    let state = state_machine.state_handle();
    let database_closed = log_store.database_closed_receiver();
    let network = GrpcNetworkFactory::new(config.node_id, config.network.clone());
    let raft = Raft::new(
        config.node_id,
        raft_config,
        network,
        log_store,
        state_machine,
    )
    .await?;
    tracing::info!(node_id = config.node_id, address = %config.advertise_address, "Raft node started");
    Ok(RaftNode {
        raft,
        state,
        node_id: config.node_id,
        advertise_address: config.advertise_address,
        max_message_bytes: config.network.max_message_bytes,
        storage_release_timeout: Duration::from_millis(config.storage_release_timeout_ms),
        database_closed,
    })
}

/// The leader named in a `ForwardToLeader` error.
fn leader(
    forward: openraft::error::ForwardToLeader<NodeId, BasicNode>,
) -> (Option<NodeId>, Option<String>) {
    (forward.leader_id, forward.leader_node.map(|node| node.addr))
}

impl RaftNode {
    /// The gRPC service peers send Raft RPCs to; add it to this node's tonic server at
    /// `advertise_address`. Its message size limits are `network.max_message_bytes`.
    pub fn grpc_service(&self) -> RaftServiceServer<RaftGrpcService> {
        RaftServiceServer::new(RaftGrpcService::new(self.raft.clone()))
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// This node's advertised `host:port`.
    pub fn advertise_address(&self) -> &str {
        &self.advertise_address
    }

    /// Initializes a cluster whose only voter is this node, if the node is fresh. Returns
    /// whether this call initialized it; an already initialized node is not an error (`false`).
    ///
    /// # Errors
    /// [`RaftError::Stopped`] if the node has stopped.
    pub async fn initialize_single_node(&self) -> Result<bool, RaftError> {
        self.initialize_cluster(BTreeMap::from([(
            self.node_id,
            self.advertise_address.clone(),
        )]))
        .await
    }

    /// Initializes a cluster of `voters` (node id → `host:port`), which must include this node,
    /// if the node is fresh. Returns whether this call initialized it; an already initialized
    /// node is not an error (`false`). Call it with the same voters on one or more of them.
    ///
    /// # Errors
    /// [`RaftError::Initialize`] if this node is not among `voters`; [`RaftError::Stopped`] if
    /// the node has stopped.
    pub async fn initialize_cluster(
        &self,
        voters: BTreeMap<NodeId, String>,
    ) -> Result<bool, RaftError> {
        let voters: BTreeMap<NodeId, BasicNode> = voters
            .into_iter()
            .map(|(node_id, address)| (node_id, BasicNode::new(address)))
            .collect();
        match self.raft.initialize(voters).await {
            Ok(()) => Ok(true),
            Err(openraft::error::RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(false),
            Err(openraft::error::RaftError::APIError(error)) => {
                Err(RaftError::Initialize(Box::new(error)))
            }
            Err(openraft::error::RaftError::Fatal(fatal)) => {
                Err(RaftError::Stopped(Box::new(fatal)))
            }
        }
    }

    /// Proposes `request` and waits until it is committed and applied on this node (the leader).
    /// Returns the entry's log index and what applying it returned.
    ///
    /// # Errors
    /// [`WriteError::ForwardToLeader`] on a follower or candidate; [`WriteError::Stopped`] if the
    /// node stopped (the outcome is then unknown).
    pub async fn write(&self, request: Request) -> Result<(u64, Response), WriteError> {
        match self.raft.client_write(request).await {
            Ok(written) => Ok((written.log_id.index, written.data)),
            Err(openraft::error::RaftError::APIError(ClientWriteError::ForwardToLeader(
                forward,
            ))) => {
                let (leader_id, leader_address) = leader(forward);
                Err(WriteError::ForwardToLeader {
                    leader_id,
                    leader_address,
                })
            }
            Err(openraft::error::RaftError::APIError(ClientWriteError::ChangeMembershipError(
                error,
            ))) => Err(WriteError::Refused(Box::new(error))),
            Err(openraft::error::RaftError::Fatal(fatal)) => {
                Err(WriteError::Stopped(Box::new(fatal)))
            }
        }
    }

    /// Confirms that this node is still the leader (a heartbeat round acknowledged by a quorum,
    /// openraft's read-index check, Raft §8) and waits until this node has applied everything
    /// committed before the call. A [`StateHandle::read`] after it is linearizable.
    ///
    /// # Errors
    /// [`ReadError::ForwardToLeader`] on a follower or a deposed leader;
    /// [`ReadError::QuorumNotConfirmed`]; [`ReadError::Stopped`].
    pub async fn ensure_linearizable(&self) -> Result<(), ReadError> {
        match self.raft.ensure_linearizable().await {
            Ok(_read_log_id) => Ok(()),
            Err(openraft::error::RaftError::APIError(CheckIsLeaderError::ForwardToLeader(
                forward,
            ))) => {
                let (leader_id, leader_address) = leader(forward);
                Err(ReadError::ForwardToLeader {
                    leader_id,
                    leader_address,
                })
            }
            Err(openraft::error::RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(
                error,
            ))) => Err(ReadError::QuorumNotConfirmed(error.to_string())),
            Err(openraft::error::RaftError::Fatal(fatal)) => {
                Err(ReadError::Stopped(Box::new(fatal)))
            }
        }
    }

    /// The current leader's id and `host:port`, as this node knows it (from openraft's metrics;
    /// may be stale). `None` while no leader is known.
    pub fn current_leader(&self) -> Option<(NodeId, String)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let leader_id = metrics.current_leader?;
        let address = metrics
            .membership_config
            .membership()
            .get_node(&leader_id)?
            .addr
            .clone();
        Some((leader_id, address))
    }

    /// Stops openraft and waits until its tasks have released the database, so the same
    /// directory can be opened again (even in this process).
    ///
    /// # Errors
    /// [`RaftError::CoreTask`] if openraft's core task failed; [`RaftError::StorageNotReleased`]
    /// if the database is still held after `storage_release_timeout_ms`.
    pub async fn shutdown(&self) -> Result<(), RaftError> {
        self.raft.shutdown().await?;
        let mut database_closed = self.database_closed.clone();
        // Nothing is ever sent: `changed` fails once the database is closed.
        let released = async { while database_closed.changed().await.is_ok() {} };
        tokio::time::timeout(self.storage_release_timeout, released)
            .await
            .map_err(|_| RaftError::StorageNotReleased {
                timeout_ms: self.storage_release_timeout.as_millis() as u64,
            })?;
        tracing::info!(node_id = self.node_id, "Raft node stopped");
        Ok(())
    }
}
