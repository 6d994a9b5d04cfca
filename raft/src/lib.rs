//! Raft replication of Flotilla's state machine: [openraft] 0.9 on RocksDB, with the
//! node-to-node transport over tonic.
//!
//! - [`types`]: the openraft type configuration ([`TypeConfig`]): log entries are
//!   [`flotilla_scheduler::Request`]s, apply answers [`flotilla_scheduler::Response`]s, nodes are
//!   `u64` ids with a `host:port` address;
//! - [`log_store`]: the log and vote in RocksDB ([`LogStore`]);
//! - [`state_machine`]: [`flotilla_scheduler::State`] in memory, snapshots in RocksDB
//!   ([`StateMachineStore`]), and the [`StateHandle`] the rest of the node reads it through;
//! - [`storage`]: the shared RocksDB database ([`open_storage`]);
//! - [`network`]: openraft's network over gRPC ([`GrpcNetworkFactory`]);
//! - [`service`]: the gRPC service that receives it ([`RaftGrpcService`]);
//! - [`node`]: everything assembled: [`open`] a [`RaftNode`], initialize, [`RaftNode::write`],
//!   [`RaftNode::ensure_linearizable`].
//!
//! # Why openraft 0.9
//!
//! openraft 0.9 is the stable release line: its storage API (v2: [`openraft::storage::RaftLogStorage`]
//! and [`openraft::storage::RaftStateMachine`]) is fixed and checked by its own conformance suite
//! ([`openraft::testing::Suite`]), which this crate runs against its RocksDB stores. 0.10 is
//! still in alpha: its storage and network traits, type-config macro and error types change
//! between alphas, and each upgrade would mean rewriting the stores and the transport.
//!
//! What 0.9 lacks: it draws the randomized election timeout once per node, when the node starts,
//! not once per campaign as the Raft paper suggests (§5.2, "each candidate restarts its randomized
//! election timeout at the start of an election"). Two nodes that happen to draw close timeouts
//! can therefore split votes in several elections in a row. A later workaround, not implemented:
//! start nodes with `enable_elect = false` and run an external timer that, when no leader was
//! heard for a freshly drawn random timeout, calls `raft.trigger().elect()`, drawing a new
//! timeout for every campaign.
//!
//! [openraft]: https://docs.rs/openraft/0.9

#![warn(missing_docs)]

pub mod log_store;
pub mod network;
pub mod node;
pub mod service;
pub mod state_machine;
pub mod storage;
pub mod types;

pub use log_store::LogStore;
pub use network::{GrpcConnection, GrpcNetworkFactory, NetworkConfig};
pub use node::{RaftError, RaftNode, RaftNodeConfig, ReadError, WriteError, open};
pub use service::RaftGrpcService;
pub use state_machine::{SnapshotPayload, StateHandle, StateMachineStore};
pub use storage::{OpenStorageError, open_storage};
pub use types::{NodeId, Raft, TypeConfig};

#[cfg(test)]
mod tests;
