//! Raft replication of Flotilla's state machine: [openraft] 0.9 on RocksDB, with the
//! node-to-node transport over tonic.
//!
//! - [`types`]: the openraft type configuration ([`TypeConfig`]): a log entry holds a batch of
//!   [`flotilla_scheduler::Request`]s, apply answers one [`flotilla_scheduler::Response`] each, nodes are
//!   `u64` ids with a `host:port` address;
//! - [`log_store`]: the log and vote in RocksDB ([`LogStore`]);
//! - [`state_machine`]: [`flotilla_scheduler::State`] in memory, snapshots in RocksDB
//!   ([`StateMachineStore`]), and the [`StateHandle`] the rest of the node reads it through;
//! - [`storage`]: the shared RocksDB database ([`open_storage`]); [`codec`]: the one encoding
//!   of entries, metadata, snapshots and RPCs (a version byte, then MessagePack);
//!   [`group_commit`]: one write-ahead log sync for all appends waiting at the time;
//!   [`proposer`]: concurrent writes share one log entry (a batch of requests);
//! - [`network`]: openraft's network over gRPC ([`GrpcNetworkFactory`]);
//! - [`service`]: the gRPC service that receives it ([`RaftGrpcService`]);
//! - [`pre_vote`]: the pre-vote the election timer asks for before it campaigns;
//! - [`security`]: the cluster id on every Raft message, TLS of outgoing connections, and the
//!   node's check of each incoming request's peer;
//! - [`node`]: everything assembled: [`open`] a [`RaftNode`], initialize, [`RaftNode::write`],
//!   [`RaftNode::ensure_linearizable`], membership changes ([`RaftNode::add_learner`],
//!   [`RaftNode::promote_voter`], [`RaftNode::remove_member`]) and [`RaftNode::cluster_view`];
//! - `election` (private): the election timer described below.
//!
//! # Why openraft 0.9
//!
//! openraft 0.9 is the stable release line: its storage API (v2: [`openraft::storage::RaftLogStorage`]
//! and [`openraft::storage::RaftStateMachine`]) is fixed and checked by its own conformance suite
//! ([`openraft::testing::Suite`]), which this crate runs against its RocksDB stores. 0.10 is
//! still in alpha: its storage and network traits, type-config macro and error types change
//! between alphas, and each upgrade would mean rewriting the stores and the transport.
//!
//! What 0.9 lacks: it draws the randomized election timeout once per node, when the node starts
//! (`EngineConfig::new`), not once per campaign as the Raft paper says (§5.2, "each candidate
//! restarts its randomized election timeout at the start of an election"). Two nodes that happen
//! to draw close timeouts therefore split votes in election after election (seen in ~8% of
//! failovers downstream, fluree/db #1845). This crate works around it (module `election`,
//! switch [`RaftNodeConfig::resample_election_timeout`], on by default):
//!
//! - openraft runs with `enable_elect = false`, so its tick never campaigns
//!   (`RaftCore::handle_tick_election` returns early); heartbeats, replication and vote handling
//!   are unchanged;
//! - each node runs its own election timer task. [`RaftGrpcService`] (as built by
//!   [`RaftNode::grpc_service`]) records the last time the node heard from a leader: every
//!   AppendEntries it accepted (openraft answered `Success`, `PartialSuccess` or `Conflict`, not
//!   `HigherVote`), every InstallSnapshot chunk it accepted, and every vote it granted;
//! - a node that is a voter, not the leader, asks the other voters for a pre-vote once nothing
//!   was heard for its current timeout (counted from the last contact, its last round, or when
//!   it last became eligible, whichever is latest), and draws a new timeout, uniformly in
//!   `[election_timeout_min_ms, election_timeout_max_ms)`, for every round;
//! - it campaigns ([`openraft::raft::trigger::Trigger::elect`]) only if a quorum granted the
//!   pre-vote (module [`pre_vote`], Raft thesis §9.6: a voter grants it only if it is not the
//!   leader, heard from no leader within its lease, and the candidate's log is at least its own).
//!   A pre-vote changes no term or vote, so a node cut off by a partition keeps its term while
//!   away and, once back, cannot depose the healthy leader with a higher term (openraft 0.9 has
//!   no pre-vote: the leader adopted the returning node's higher term from its AppendEntries
//!   answer and stepped down);
//! - a learner (or a node outside the membership) never campaigns; the only voter of a cluster
//!   campaigns at once, as openraft does (a restarted single-node cluster elects itself at start),
//!   unless it has heard from a leader since it was opened (that leader removed itself): then it
//!   waits for its timeout, so the leader can finish committing the change;
//! - a healthy follower never campaigns: openraft's leader sends a heartbeat every 1.5
//!   `heartbeat_interval_ms` (its tick), and the configuration requires
//!   `election_timeout_min_ms >= 2 * heartbeat_interval_ms`;
//! - openraft's leader lease (a follower refuses votes for this long after hearing from its
//!   leader, against disruptive candidates) becomes `election_timeout_min_ms`, as in the Raft
//!   thesis (§4.2.3), instead of openraft's `election_timeout_max_ms`: with the latter, every
//!   campaign started by a timeout below the maximum would be refused by followers that heard
//!   the dead leader at the same moment, and each failover would take two campaigns.
//!
//! [`RaftNode::elections_started`] counts the campaigns a node started, under either timer, so
//! the two can be compared. With the switch off, openraft's timer campaigns after
//! `leader lease + its once-drawn timeout` (`election_timeout_max_ms` +
//! `[election_timeout_min_ms, election_timeout_max_ms)` after the last heartbeat).
//!
//! [openraft]: https://docs.rs/openraft/0.9

#![warn(missing_docs)]

pub mod codec;
mod election;
pub mod group_commit;
pub mod log_store;
pub mod network;
pub mod node;
pub mod pre_vote;
pub mod proposer;
pub mod security;
pub mod service;
pub mod state_machine;
pub mod storage;
pub mod types;

pub use log_store::LogStore;
pub use network::{GrpcConnection, GrpcNetworkFactory, NetworkConfig};
pub use node::{
    ClusterView, MemberView, MembershipError, RaftError, RaftNode, RaftNodeConfig, ReadError,
    WriteError, open,
};
pub use pre_vote::{PreVoteRefusal, PreVoteRequest, PreVoteResponse};
pub use security::{CLUSTER_ID_METADATA, PeerAuthorizer, TransportSecurity, is_valid_cluster_id};
pub use service::RaftGrpcService;
pub use state_machine::{SnapshotPayload, StateHandle, StateMachineStore};
pub use storage::{OpenStorageError, open_storage};
pub use types::{NodeId, Raft, TypeConfig};

#[cfg(test)]
mod tests;
