//! The openraft type configuration of Flotilla and short aliases of the generic openraft types
//! it instantiates.

use std::io::Cursor;

openraft::declare_raft_types!(
    /// Flotilla's openraft type configuration.
    ///
    /// - log entry payload (`D`): a [`LogPayload`](crate::proposer::LogPayload), the requests
    ///   (commands stamped with the leader's clock) of one group commit;
    /// - apply response (`R`): one [`flotilla_scheduler::Response`] per request, in order
    ///   (empty for blank and membership entries);
    /// - node id: `u64`, stable for the life of a node's data directory;
    /// - node: [`openraft::BasicNode`] whose `addr` is the `host:port` of the node's gRPC server
    ///   (the one serving [`RaftGrpcService`](crate::RaftGrpcService));
    /// - snapshot data: an in-memory byte buffer holding the encoding ([`crate::codec`]) of a
    ///   [`SnapshotPayload`](crate::SnapshotPayload).
    pub TypeConfig:
        D = crate::proposer::LogPayload,
        R = Vec<flotilla_scheduler::Response>,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A running openraft node of Flotilla.
pub type Raft = openraft::Raft<TypeConfig>;

/// Identifies a Raft node; stable for the life of its data directory.
pub type NodeId = u64;

/// A log position: the term and leader that proposed it, and its index (Raft §5.3).
pub type LogId = openraft::LogId<NodeId>;

/// One replicated log entry.
pub type Entry = openraft::Entry<TypeConfig>;

/// The candidate/leader identity a node has granted its vote to (Raft §5.2).
pub type Vote = openraft::Vote<NodeId>;

/// A cluster membership configuration together with the log id that introduced it.
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;

/// Describes a snapshot: the last log entry it covers, the membership at that point, and its id.
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;

/// A snapshot: its [`SnapshotMeta`] and its data.
pub type Snapshot = openraft::Snapshot<TypeConfig>;

/// openraft's storage error, as returned by the stores of this crate.
pub type StorageError = openraft::StorageError<NodeId>;
