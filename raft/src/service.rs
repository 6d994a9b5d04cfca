//! The receiving side of the node-to-node transport: `flotilla.raft.v1.RaftService` handing
//! each RPC to the local openraft node.
//!
//! Each request's `data` is the JSON of the openraft request; each reply's `data` is the JSON of
//! `Result<response, openraft RaftError>`, so openraft-level errors (a higher vote, a snapshot
//! mismatch, a stopped node) reach the sender as values, and gRPC errors mean transport
//! problems only: undecodable bytes are `INVALID_ARGUMENT` naming the field.

use flotilla_proto::raft::RaftMessage;
use flotilla_proto::raft::raft_service_server::RaftService;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::types::Raft;

/// Serves openraft's RPCs for one local node.
#[derive(Clone)]
pub struct RaftGrpcService {
    raft: Raft,
}

impl std::fmt::Debug for RaftGrpcService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RaftGrpcService")
            .finish_non_exhaustive()
    }
}

impl RaftGrpcService {
    /// A service handing RPCs to `raft`.
    pub fn new(raft: Raft) -> Self {
        RaftGrpcService { raft }
    }
}

/// Decodes the JSON in `message.data` as a `kind`.
fn decode<T: DeserializeOwned>(message: RaftMessage, kind: &str) -> Result<T, Status> {
    serde_json::from_slice(&message.data).map_err(|error| {
        Status::invalid_argument(format!("data: not the JSON of an openraft {kind}: {error}"))
    })
}

/// Encodes `result` as the JSON reply.
fn encode<T: Serialize>(result: &T) -> Result<Response<RaftMessage>, Status> {
    serde_json::to_vec(result)
        .map(|data| Response::new(RaftMessage { data }))
        .map_err(|error| Status::internal(format!("cannot encode the Raft reply: {error}")))
}

#[tonic::async_trait]
impl RaftService for RaftGrpcService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode(request.into_inner(), "AppendEntriesRequest")?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode(request.into_inner(), "VoteRequest")?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc = decode(request.into_inner(), "InstallSnapshotRequest")?;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}
