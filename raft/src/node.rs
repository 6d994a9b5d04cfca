//! One Raft node of Flotilla, assembled: RocksDB storage, the tonic network, openraft's
//! [`Raft`], the [`StateHandle`], and the gRPC service peers call.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flotilla_proto::raft::raft_service_server::RaftServiceServer;
use flotilla_scheduler::{Request, Response};
use openraft::error::{
    ChangeMembershipError, CheckIsLeaderError, ClientWriteError, Fatal, InitializeError,
};
use openraft::{BasicNode, ChangeMembers, Membership, ServerState, SnapshotPolicy};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::election::{self, LeaderContact, TimerMode};
use crate::network::{GrpcNetworkFactory, NetworkConfig};
use crate::security::{PeerAuthorizer, TransportSecurity};
use crate::service::RaftGrpcService;
use crate::state_machine::StateHandle;
use crate::storage::{OpenStorageError, open_storage};
use crate::types::{NodeId, Raft};

/// Default name of the cluster; nodes of different clusters refuse each other's messages.
pub const DEFAULT_CLUSTER_ID: &str = "flotilla";
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
/// Default largest number of entries in one AppendEntries RPC. An entry holds up to
/// [`crate::proposer::DEFAULT_MAX_BATCH_SIZE_BYTES`] of requests (group commit), so one RPC
/// carries at most about 4 MiB of batched requests: small enough for a follower to decode,
/// append and sync within openraft 0.9's AppendEntries deadline (the heartbeat interval) on a
/// loaded machine. (One request larger than a batch, such as a big SubmitFleet, still travels
/// as its own entry.)
pub const DEFAULT_MAX_PAYLOAD_ENTRIES: u64 = 16;
/// Default size of one snapshot chunk (one InstallSnapshot RPC), in bytes: 1 MiB.
pub const DEFAULT_SNAPSHOT_CHUNK_BYTES: u64 = 1024 * 1024;
/// Default time allowed for one InstallSnapshot RPC, including installing the last chunk, in
/// milliseconds.
pub const DEFAULT_INSTALL_SNAPSHOT_TIMEOUT_MS: u64 = 5_000;
/// Default time [`RaftNode::shutdown`] waits for openraft's tasks to release the database, in
/// milliseconds.
pub const DEFAULT_STORAGE_RELEASE_TIMEOUT_MS: u64 = 5_000;

/// Default time [`RaftNode::add_learner`] waits for the new learner to catch up with the
/// leader's log, in milliseconds.
pub const DEFAULT_LEARNER_CATCH_UP_TIMEOUT_MS: u64 = 60_000;

/// Name of the RocksDB directory inside [`RaftNodeConfig::data_directory`].
pub const DATABASE_DIRECTORY_NAME: &str = "raft";

/// MessagePack ([`crate::codec`]) spells each snapshot byte as an integer: at most 2 bytes per
/// byte (`0xcc` and the byte, for bytes of 128 and more).
const ENCODED_BYTES_PER_SNAPSHOT_BYTE: u64 = 2;
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
    /// Cluster id (see [`crate::is_valid_cluster_id`]): sent with every outgoing Raft message
    /// and required of every incoming one (module [`crate::security`]). Default
    /// [`DEFAULT_CLUSTER_ID`].
    pub cluster_id: String,
    /// TLS of outgoing Raft connections and the check of incoming requests' peers. Default:
    /// plaintext, no peer check.
    pub security: TransportSecurity,
    /// Leader heartbeat interval, in milliseconds; also the AppendEntries RPC timeout. Default
    /// [`DEFAULT_HEARTBEAT_INTERVAL_MS`].
    pub heartbeat_interval_ms: u64,
    /// Election timeout lower bound, in milliseconds; must be at least twice the heartbeat
    /// interval (openraft's leader sends a heartbeat every 1.5 heartbeat intervals, on its tick).
    /// Default [`DEFAULT_ELECTION_TIMEOUT_MIN_MS`].
    pub election_timeout_min_ms: u64,
    /// Election timeout upper bound (excluded), in milliseconds; must exceed the lower bound.
    /// Default [`DEFAULT_ELECTION_TIMEOUT_MAX_MS`].
    pub election_timeout_max_ms: u64,
    /// `true` (the default): this crate's election timer campaigns, drawing a fresh random
    /// election timeout for every campaign, and openraft's leader lease (how long a follower
    /// refuses votes after hearing from its leader) is `election_timeout_min_ms`; `false`:
    /// openraft's own timer, whose timeout is drawn once per node, and its lease of
    /// `election_timeout_max_ms`. See the crate documentation.
    pub resample_election_timeout: bool,
    /// Time [`RaftNode::add_learner`] waits for the learner to catch up, in milliseconds. Default
    /// [`DEFAULT_LEARNER_CATCH_UP_TIMEOUT_MS`].
    pub learner_catch_up_timeout_ms: u64,
    /// Build a snapshot once this many entries were committed since the last one (at least 1).
    /// Default [`DEFAULT_SNAPSHOT_LOGS_SINCE_LAST`].
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log after a snapshot covers them. Default
    /// [`DEFAULT_MAX_IN_SNAPSHOT_LOG_TO_KEEP`].
    pub max_in_snapshot_log_to_keep: u64,
    /// Largest number of entries per AppendEntries RPC (at least 1). Default
    /// [`DEFAULT_MAX_PAYLOAD_ENTRIES`].
    pub max_payload_entries: u64,
    /// Snapshot chunk size, in bytes; its encoding must fit in `network.max_message_bytes`. Default
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
    /// Group commit of proposals ([`crate::proposer`]). Default
    /// [`ProposerSettings::default`](crate::proposer::ProposerSettings).
    pub proposals: crate::proposer::ProposerSettings,
}

impl Default for RaftNodeConfig {
    /// The documented defaults, with node id 0 and an empty advertise address and data directory,
    /// which the caller must set (validation rejects the empty ones).
    fn default() -> Self {
        RaftNodeConfig {
            node_id: 0,
            advertise_address: String::new(),
            data_directory: PathBuf::new(),
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
            security: TransportSecurity::default(),
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            election_timeout_min_ms: DEFAULT_ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max_ms: DEFAULT_ELECTION_TIMEOUT_MAX_MS,
            resample_election_timeout: true,
            learner_catch_up_timeout_ms: DEFAULT_LEARNER_CATCH_UP_TIMEOUT_MS,
            snapshot_logs_since_last: DEFAULT_SNAPSHOT_LOGS_SINCE_LAST,
            max_in_snapshot_log_to_keep: DEFAULT_MAX_IN_SNAPSHOT_LOG_TO_KEEP,
            max_payload_entries: DEFAULT_MAX_PAYLOAD_ENTRIES,
            snapshot_chunk_bytes: DEFAULT_SNAPSHOT_CHUNK_BYTES,
            install_snapshot_timeout_ms: DEFAULT_INSTALL_SNAPSHOT_TIMEOUT_MS,
            storage_release_timeout_ms: DEFAULT_STORAGE_RELEASE_TIMEOUT_MS,
            network: NetworkConfig::default(),
            proposals: crate::proposer::ProposerSettings::default(),
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
    /// With [`resample_election_timeout`](Self::resample_election_timeout) on, openraft's own
    /// election timer is off (`enable_elect = false`) and its election timeout bounds are set to
    /// `[election_timeout_min_ms - 1, election_timeout_min_ms)`: openraft then uses
    /// `election_timeout_min_ms` as its leader lease (it uses its upper bound) and
    /// `election_timeout_min_ms - 1` as its vote RPC timeout (its lower bound); nothing else
    /// reads them once its timer is off.
    ///
    /// # Errors
    /// [`RaftError::InvalidConfig`] naming the offending field.
    pub fn to_openraft_config(&self) -> Result<openraft::Config, RaftError> {
        let invalid = |message: String| Err(RaftError::InvalidConfig(message));
        if self.heartbeat_interval_ms == 0
            || self.heartbeat_interval_ms.saturating_mul(2) > self.election_timeout_min_ms
        {
            return invalid(format!(
                "heartbeat_interval_ms: must be at least 1 and at most half of \
                 election_timeout_min_ms ({} ms)",
                self.election_timeout_min_ms
            ));
        }
        if self.election_timeout_min_ms >= self.election_timeout_max_ms {
            return invalid(format!(
                "election_timeout_max_ms: must be greater than election_timeout_min_ms ({} ms)",
                self.election_timeout_min_ms
            ));
        }
        if self.learner_catch_up_timeout_ms == 0 {
            return invalid("learner_catch_up_timeout_ms: must be at least 1".into());
        }
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
        if let Some(name) = self.proposals.first_zero() {
            return invalid(format!("proposals.{name}: must be at least 1"));
        }
        if self.snapshot_chunk_bytes == 0 {
            return invalid("snapshot_chunk_bytes: must be at least 1".into());
        }
        let largest_chunk_message_bytes = self
            .snapshot_chunk_bytes
            .saturating_mul(ENCODED_BYTES_PER_SNAPSHOT_BYTE)
            .saturating_add(INSTALL_SNAPSHOT_ENVELOPE_BYTES);
        if largest_chunk_message_bytes > self.network.max_message_bytes as u64 {
            return invalid(format!(
                "snapshot_chunk_bytes: {} bytes may encode to {largest_chunk_message_bytes} bytes, more than \
                 network.max_message_bytes ({})",
                self.snapshot_chunk_bytes, self.network.max_message_bytes
            ));
        }
        if !crate::security::is_valid_cluster_id(&self.cluster_id) {
            return invalid(format!(
                "cluster_id: {:?} is not 1-{} characters of [a-z0-9.-] starting and ending with a \
                 letter or digit",
                self.cluster_id.chars().take(80).collect::<String>(),
                crate::security::MAX_CLUSTER_ID_BYTES
            ));
        }
        if self.network.unreachable_backoff_initial_ms == 0 {
            return invalid("network.unreachable_backoff_initial_ms: must be at least 1".into());
        }
        if self.network.keep_alive_interval_ms == 0 {
            return invalid("network.keep_alive_interval_ms: must be at least 1".into());
        }
        if self.network.keep_alive_timeout_ms == 0 {
            return invalid("network.keep_alive_timeout_ms: must be at least 1".into());
        }
        let (election_timeout_min, election_timeout_max) = if self.resample_election_timeout {
            (
                self.election_timeout_min_ms - 1,
                self.election_timeout_min_ms,
            )
        } else {
            (self.election_timeout_min_ms, self.election_timeout_max_ms)
        };
        openraft::Config {
            cluster_name: self.cluster_id.clone(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min,
            election_timeout_max,
            enable_elect: !self.resample_election_timeout,
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
    /// `max_queued_requests` writes already wait for a log entry; nothing was proposed.
    #[error(
        "more than {max_queued_requests} writes wait to be proposed (raft max_queued_proposals); \
         retry with backoff"
    )]
    Overloaded {
        /// The bound ([`crate::proposer::ProposerSettings::max_queued_requests`]).
        max_queued_requests: usize,
    },
    /// The request could not be encoded, or its entry's responses did not match (a bug).
    #[error("the write could not be encoded or answered: {0}")]
    Encode(String),
    /// The proposal queue stopped (the node is shutting down); the outcome is unknown.
    #[error("the proposal queue stopped; the write's outcome is unknown")]
    ProposerStopped,
}

/// The [`WriteError`] of one request of a batch whose `client_write` failed with `error`.
pub(crate) fn write_error(
    error: &openraft::error::RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
) -> WriteError {
    match error {
        openraft::error::RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
            let (leader_id, leader_address) = leader(forward.clone());
            WriteError::ForwardToLeader {
                leader_id,
                leader_address,
            }
        }
        openraft::error::RaftError::APIError(ClientWriteError::ChangeMembershipError(error)) => {
            WriteError::Refused(Box::new(error.clone()))
        }
        openraft::error::RaftError::Fatal(fatal) => WriteError::Stopped(Box::new(fatal.clone())),
    }
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

/// Why a membership change ([`RaftNode::add_learner`], [`RaftNode::promote_voter`],
/// [`RaftNode::remove_member`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// This node is not the leader; send the change to the leader. Both fields are `None` while
    /// no leader is known (an election is under way).
    #[error("not the leader; the leader is {leader_id:?} at {leader_address:?}")]
    ForwardToLeader {
        /// The leader's node id, if known.
        leader_id: Option<NodeId>,
        /// The leader's `host:port`, if known.
        leader_address: Option<String>,
    },
    /// The change is not allowed as asked, with the reason: openraft's (another change is still
    /// being committed, the node to promote is not a learner, ...) or this crate's (the node is
    /// already a member at another address, an empty address).
    #[error("membership change refused: {0}")]
    Refused(String),
    /// The node to remove is neither a voter nor a learner.
    #[error("node {node_id} is not a member of the cluster")]
    NotAMember {
        /// The node asked for.
        node_id: NodeId,
    },
    /// Removing the node would leave the cluster without a voter.
    #[error("node {node_id} is the last voter; a cluster needs at least one")]
    LastVoter {
        /// The node asked for.
        node_id: NodeId,
    },
    /// The learner was added but its log did not catch up with the leader's in time (it may be
    /// unreachable). It stays a learner and replication to it continues; retrying the add waits
    /// again.
    #[error(
        "learner {node_id} was added but did not catch up with the leader within {timeout_ms} ms"
    )]
    CatchUpTimeout {
        /// The learner.
        node_id: NodeId,
        /// How long the leader waited, in milliseconds.
        timeout_ms: u64,
    },
    /// The Raft node has stopped; a change already proposed may or may not take effect.
    #[error("the Raft node stopped: {0}")]
    Stopped(Box<Fatal<NodeId>>),
}

impl From<openraft::error::RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>
    for MembershipError
{
    fn from(
        error: openraft::error::RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
    ) -> Self {
        match error {
            openraft::error::RaftError::APIError(ClientWriteError::ForwardToLeader(forward)) => {
                let (leader_id, leader_address) = leader(forward);
                MembershipError::ForwardToLeader {
                    leader_id,
                    leader_address,
                }
            }
            openraft::error::RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::EmptyMembership(_),
            )) => MembershipError::Refused("the change would leave no voter".into()),
            openraft::error::RaftError::APIError(ClientWriteError::ChangeMembershipError(
                error,
            )) => MembershipError::Refused(error.to_string()),
            openraft::error::RaftError::Fatal(fatal) => MembershipError::Stopped(Box::new(fatal)),
        }
    }
}

/// One node of the cluster as [`RaftNode::cluster_view`] shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    /// The node's id.
    pub node_id: NodeId,
    /// The node's `host:port`, as stored in the membership.
    pub address: String,
    /// `true` for a voter, `false` for a learner. During a joint configuration, a voter of either
    /// configuration.
    pub voter: bool,
    /// On the leader: the index of the last log entry known to be replicated to the node (0
    /// before any; the leader's own entry is its flushed log). `None` on other nodes.
    pub matched_index: Option<u64>,
}

/// A node's view of the cluster, from its openraft metrics (see [`RaftNode::cluster_view`]).
/// Indexes are log indexes, 0 before the first entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterView {
    /// This node's id.
    pub node_id: NodeId,
    /// This node's role: `"Leader"`, `"Follower"`, `"Candidate"`, `"Learner"` (a learner, or a
    /// node not yet in a membership) or `"Shutdown"`.
    pub role: String,
    /// The current term (Raft §5.1).
    pub term: u64,
    /// The leader's id and `host:port`, if this node knows one.
    pub leader: Option<(NodeId, String)>,
    /// The index of the last entry in this node's log.
    pub last_log_index: u64,
    /// The highest index this node knows to be committed: on the leader, its commit index; on a
    /// follower, the leader's commit index as of the last AppendEntries it applied (it may lag
    /// the leader's by a heartbeat). openraft 0.9's metrics lack it: it is what openraft last
    /// saved through the log store (`save_committed`), and never below `applied_index`.
    pub committed_index: u64,
    /// The index of the last entry applied to this node's state machine.
    pub applied_index: u64,
    /// The index of the last entry covered by this node's snapshot.
    pub snapshot_index: u64,
    /// Every voter and learner of the effective membership, by ascending id.
    pub members: Vec<MemberView>,
}

/// The election timer task and what stops it.
struct ElectionTimerTask {
    /// Changing it (or dropping it) ends the task.
    stop: watch::Sender<bool>,
    /// The task, taken by the first [`RaftNode::shutdown`].
    task: Mutex<Option<JoinHandle<()>>>,
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
    /// Every incoming Raft request must name it.
    cluster_id: Arc<str>,
    /// The check of incoming requests' peers.
    authorize_peer: Option<PeerAuthorizer>,
    storage_release_timeout: Duration,
    learner_catch_up_timeout: Duration,
    database_closed: watch::Receiver<()>,
    committed_index: Arc<AtomicU64>,
    group_commit: Arc<crate::group_commit::GroupCommitCounters>,
    proposer: crate::proposer::Proposer,
    leader_contact: Arc<LeaderContact>,
    election_timer: Arc<ElectionTimerTask>,
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
    let committed_index = log_store.committed_index();
    let group_commit = log_store.group_commit_counters();
    let network = GrpcNetworkFactory::with_security(
        config.node_id,
        config.network.clone(),
        &config.cluster_id,
        config.security.clone(),
    );
    let raft = Raft::new(
        config.node_id,
        raft_config,
        // The election timer's pre-votes share the factory's channels.
        network.clone(),
        log_store,
        state_machine,
    )
    .await?;
    let proposer = crate::proposer::Proposer::start(raft.clone(), config.proposals);
    let leader_contact = Arc::new(LeaderContact::default());
    let timer_mode = if config.resample_election_timeout {
        TimerMode::Resample {
            min_ms: config.election_timeout_min_ms,
            max_ms: config.election_timeout_max_ms,
        }
    } else {
        TimerMode::CountOnly
    };
    let (stop, stop_receiver) = watch::channel(false);
    let task = tokio::spawn(election::run(
        raft.clone(),
        config.node_id,
        Arc::clone(&leader_contact),
        timer_mode,
        network,
        stop_receiver,
    ));
    tracing::info!(
        node_id = config.node_id,
        address = %config.advertise_address,
        resample_election_timeout = config.resample_election_timeout,
        "Raft node started"
    );
    Ok(RaftNode {
        raft,
        state,
        node_id: config.node_id,
        advertise_address: config.advertise_address,
        max_message_bytes: config.network.max_message_bytes,
        cluster_id: Arc::from(config.cluster_id.as_str()),
        authorize_peer: config.security.authorize_peer.clone(),
        storage_release_timeout: Duration::from_millis(config.storage_release_timeout_ms),
        learner_catch_up_timeout: Duration::from_millis(config.learner_catch_up_timeout_ms),
        database_closed,
        committed_index,
        group_commit,
        proposer,
        leader_contact,
        election_timer: Arc::new(ElectionTimerTask {
            stop,
            task: Mutex::new(Some(task)),
        }),
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
    ///
    /// The service also tells this node's election timer when a leader was heard; serve this one
    /// rather than one made with [`RaftGrpcService::new`].
    pub fn grpc_service(&self) -> RaftServiceServer<RaftGrpcService> {
        RaftServiceServer::new(self.raft_grpc_service())
            .max_decoding_message_size(self.max_message_bytes)
            .max_encoding_message_size(self.max_message_bytes)
    }

    /// The service inside [`grpc_service`](Self::grpc_service), for wrapping in tests.
    pub(crate) fn raft_grpc_service(&self) -> RaftGrpcService {
        RaftGrpcService::with_leader_contact(
            self.raft.clone(),
            Arc::clone(&self.leader_contact),
            Arc::clone(&self.cluster_id),
            self.authorize_peer.clone(),
        )
    }

    /// The largest gRPC message the node's service accepts or sends, in bytes.
    #[cfg(test)]
    pub(crate) fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
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
    /// Returns the log index of its entry (which it may share with other requests: group
    /// commit, [`crate::proposer`]) and what applying it returned.
    ///
    /// # Errors
    /// [`WriteError::ForwardToLeader`] on a follower or candidate; [`WriteError::Overloaded`]
    /// when too many writes wait; [`WriteError::Stopped`] or [`WriteError::ProposerStopped`] if
    /// the node stopped (the outcome is then unknown).
    pub async fn write(&self, request: Request) -> Result<(u64, Response), WriteError> {
        self.proposer.write(request).await
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

    /// This node's write-ahead log syncs and the log appends they made durable since [`open`]
    /// (group commit, [`crate::group_commit`]): `appends / syncs` is the mean number of
    /// appends per fsync.
    pub fn log_sync_counts(&self) -> (u64, u64) {
        (self.group_commit.syncs(), self.group_commit.appends())
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

    /// The number of campaigns (elections) this node started since [`open`]: the terms in which
    /// it voted for itself, as seen in its openraft metrics, whichever timer triggered them (see
    /// [`RaftNodeConfig::resample_election_timeout`]). Includes the campaign of
    /// [`initialize_cluster`](Self::initialize_cluster); excludes terms from before `open`.
    pub fn elections_started(&self) -> u64 {
        self.leader_contact.elections_started()
    }

    /// The number of pre-vote rounds (see the crate documentation) this node's election timer
    /// started since [`open`]: each time it heard from no leader within its election timeout.
    /// 0 with [`RaftNodeConfig::resample_election_timeout`] off (openraft's timer has no
    /// pre-vote).
    pub fn pre_vote_rounds(&self) -> u64 {
        self.leader_contact.pre_vote_rounds()
    }

    /// The number of those pre-vote rounds that no quorum granted, so the node did not campaign
    /// and kept its term.
    pub fn pre_vote_rounds_lost(&self) -> u64 {
        self.leader_contact.pre_vote_rounds_lost()
    }

    /// The number of messages (AppendEntries, InstallSnapshot chunks) accepted from a leader
    /// since [`open`].
    #[cfg(test)]
    pub(crate) fn leader_messages_accepted(&self) -> u64 {
        self.leader_contact.leader_messages()
    }

    /// This node's view of the cluster, from openraft's metrics (no I/O, no waiting; on a
    /// follower it may lag the leader's). See [`ClusterView`].
    pub fn cluster_view(&self) -> ClusterView {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voter_ids: BTreeSet<NodeId> = membership.voter_ids().collect();
        let is_leader = metrics.state == ServerState::Leader;
        let members = membership
            .nodes()
            .map(|(node_id, node)| MemberView {
                node_id: *node_id,
                address: node.addr.clone(),
                voter: voter_ids.contains(node_id),
                matched_index: if is_leader {
                    metrics
                        .replication
                        .as_ref()
                        .and_then(|replication| replication.get(node_id))
                        .map(|matched| matched.map_or(0, |log_id| log_id.index))
                } else {
                    None
                },
            })
            .collect();
        let leader = metrics.current_leader.and_then(|leader_id| {
            membership
                .get_node(&leader_id)
                .map(|node| (leader_id, node.addr.clone()))
        });
        let role = match metrics.state {
            ServerState::Leader => "Leader",
            ServerState::Follower => "Follower",
            ServerState::Candidate => "Candidate",
            ServerState::Learner => "Learner",
            ServerState::Shutdown => "Shutdown",
        };
        let applied_index = metrics.last_applied.map_or(0, |log_id| log_id.index);
        ClusterView {
            node_id: self.node_id,
            role: role.to_string(),
            term: metrics.current_term,
            leader,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            committed_index: self
                .committed_index
                .load(Ordering::Relaxed)
                .max(applied_index),
            applied_index,
            snapshot_index: metrics.snapshot.map_or(0, |log_id| log_id.index),
            members,
        }
    }

    /// The effective membership, if this node's metrics say it is the leader.
    ///
    /// # Errors
    /// [`MembershipError::ForwardToLeader`] naming the leader this node knows;
    /// [`MembershipError::Stopped`].
    fn membership_as_leader(&self) -> Result<Membership<NodeId, BasicNode>, MembershipError> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        if let Err(fatal) = &metrics.running_state {
            return Err(MembershipError::Stopped(Box::new(fatal.clone())));
        }
        if metrics.state == ServerState::Leader {
            return Ok(metrics.membership_config.membership().clone());
        }
        let leader_id = metrics.current_leader;
        let leader_address = leader_id.and_then(|leader_id| {
            metrics
                .membership_config
                .membership()
                .get_node(&leader_id)
                .map(|node| node.addr.clone())
        });
        Err(MembershipError::ForwardToLeader {
            leader_id,
            leader_address,
        })
    }

    /// Adds node `node_id`, reachable at `address` (`host:port`), as a learner, and waits until
    /// its log has caught up with the leader's (it has every entry up to the membership entry
    /// that added it), so that it can be promoted with [`promote_voter`](Self::promote_voter)
    /// without stalling commits. Adding a member again at the same address only waits again.
    /// Run it on the leader.
    ///
    /// # Errors
    /// [`MembershipError::ForwardToLeader`] on a follower, or if leadership is lost while
    /// waiting; [`MembershipError::Refused`] if `address` is empty, the node is a member at
    /// another address, or openraft refuses (another membership change is in progress);
    /// [`MembershipError::CatchUpTimeout`] after `learner_catch_up_timeout_ms` (the learner
    /// stays); [`MembershipError::Stopped`].
    pub async fn add_learner(
        &self,
        node_id: NodeId,
        address: String,
    ) -> Result<(), MembershipError> {
        if address.is_empty() {
            return Err(MembershipError::Refused(
                "address: must be the host:port of the node".into(),
            ));
        }
        let membership = self.membership_as_leader()?;
        if let Some(existing) = membership.get_node(&node_id)
            && existing.addr != address
        {
            return Err(MembershipError::Refused(format!(
                "node {node_id} is already a member at {}, not {address}; remove it first",
                existing.addr
            )));
        }
        let response = self
            .raft
            .add_learner(node_id, BasicNode::new(address.clone()), false)
            .await?;
        if node_id == self.node_id {
            return Ok(());
        }
        let membership_index = response.log_id.index;
        let mut metrics = self.raft.metrics();
        let caught_up = async {
            loop {
                {
                    let current = metrics.borrow_and_update();
                    if let Err(fatal) = &current.running_state {
                        return Err(MembershipError::Stopped(Box::new(fatal.clone())));
                    }
                    if current.state != ServerState::Leader {
                        drop(current);
                        return Err(self.membership_as_leader().err().unwrap_or(
                            MembershipError::ForwardToLeader {
                                leader_id: None,
                                leader_address: None,
                            },
                        ));
                    }
                    let matched = current
                        .replication
                        .as_ref()
                        .and_then(|replication| replication.get(&node_id).copied())
                        .flatten();
                    if matched.is_some_and(|log_id| log_id.index >= membership_index) {
                        return Ok(());
                    }
                }
                if metrics.changed().await.is_err() {
                    return Err(MembershipError::Stopped(Box::new(Fatal::Stopped)));
                }
            }
        };
        match tokio::time::timeout(self.learner_catch_up_timeout, caught_up).await {
            Ok(result) => {
                result?;
                tracing::info!(node_id, %address, "learner added and caught up");
                Ok(())
            }
            Err(_elapsed) => Err(MembershipError::CatchUpTimeout {
                node_id,
                timeout_ms: self.learner_catch_up_timeout.as_millis() as u64,
            }),
        }
    }

    /// Makes learner `node_id` a voter, keeping every existing voter, through openraft's joint
    /// consensus (Raft §6): returns once the final configuration is committed. Promoting a node
    /// that is already a voter does nothing. Run it on the leader.
    ///
    /// # Errors
    /// [`MembershipError::ForwardToLeader`] on a follower; [`MembershipError::Refused`] if the
    /// node is not a learner ([`add_learner`](Self::add_learner) it first) or another change is
    /// in progress; [`MembershipError::Stopped`].
    pub async fn promote_voter(&self, node_id: NodeId) -> Result<(), MembershipError> {
        let membership = self.membership_as_leader()?;
        if membership.voter_ids().any(|voter_id| voter_id == node_id) {
            return Ok(());
        }
        if membership.get_node(&node_id).is_none() {
            return Err(MembershipError::Refused(format!(
                "node {node_id} is not a learner; add it as a learner first"
            )));
        }
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([node_id])), true)
            .await?;
        tracing::info!(node_id, "learner promoted to voter");
        Ok(())
    }

    /// Removes node `node_id` from the cluster: a voter through joint consensus (returns once the
    /// final configuration is committed), a learner in one step. The leader can remove itself:
    /// it steps down once the change is committed and the others elect a new leader. The removed
    /// node should then be shut down; until it is, it may campaign in vain (the remaining voters
    /// refuse it: their logs are ahead of its and their leader lease holds). Run it on the
    /// leader.
    ///
    /// # Errors
    /// [`MembershipError::ForwardToLeader`] on a follower; [`MembershipError::LastVoter`] if it
    /// is the only voter; [`MembershipError::NotAMember`]; [`MembershipError::Refused`] if
    /// another change is in progress; [`MembershipError::Stopped`].
    pub async fn remove_member(&self, node_id: NodeId) -> Result<(), MembershipError> {
        let membership = self.membership_as_leader()?;
        let voter_ids: BTreeSet<NodeId> = membership.voter_ids().collect();
        let change = if voter_ids.contains(&node_id) {
            if voter_ids.len() == 1 {
                return Err(MembershipError::LastVoter { node_id });
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([node_id]))
        } else if membership.get_node(&node_id).is_some() {
            ChangeMembers::RemoveNodes(BTreeSet::from([node_id]))
        } else {
            return Err(MembershipError::NotAMember { node_id });
        };
        self.raft.change_membership(change, false).await?;
        tracing::info!(node_id, "member removed");
        Ok(())
    }

    /// Stops openraft and waits until its tasks have released the database, so the same
    /// directory can be opened again (even in this process).
    ///
    /// # Errors
    /// [`RaftError::CoreTask`] if openraft's core task failed; [`RaftError::StorageNotReleased`]
    /// if the database is still held after `storage_release_timeout_ms`.
    pub async fn shutdown(&self) -> Result<(), RaftError> {
        self.election_timer.stop.send_replace(true);
        let task = self
            .election_timer
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            // The timer holds no resources but a handle on openraft; ending it mid-campaign is
            // harmless.
            task.abort();
            let _ = task.await;
        }
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
