//! The receiving side of the node-to-node transport: `flotilla.raft.v1.RaftService` handing
//! each RPC to the local openraft node.
//!
//! Each request's `data` is the JSON of the openraft request; each reply's `data` is the JSON of
//! `Result<response, openraft RaftError>`, so openraft-level errors (a higher vote, a snapshot
//! mismatch, a stopped node) reach the sender as values, and gRPC errors mean transport
//! problems only: undecodable bytes are `INVALID_ARGUMENT` naming the field.
//!
//! The service built by [`RaftNode::grpc_service`](crate::RaftNode::grpc_service) also tells the
//! node's election timer (see the crate documentation) when this node heard from a leader:
//! an AppendEntries it accepted (openraft answered `Success`, `PartialSuccess` or `Conflict`: the
//! sender's vote was accepted, even if the logs did not match yet; `HigherVote`, the answer to a
//! deposed leader, does not count), an InstallSnapshot chunk it accepted (its vote is the
//! sender's), or a vote it granted.

use std::sync::Arc;

use flotilla_proto::raft::RaftMessage;
use flotilla_proto::raft::raft_service_server::RaftService;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use openraft::raft::AppendEntriesResponse;

use crate::election::LeaderContact;
use crate::types::Raft;

/// Serves openraft's RPCs for one local node.
#[derive(Clone)]
pub struct RaftGrpcService {
    raft: Raft,
    /// Where accepted leader messages and granted votes are recorded; `None` for a service made
    /// with [`RaftGrpcService::new`].
    leader_contact: Option<Arc<LeaderContact>>,
}

impl std::fmt::Debug for RaftGrpcService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RaftGrpcService")
            .finish_non_exhaustive()
    }
}

impl RaftGrpcService {
    /// A service handing RPCs to `raft`, without reporting leader contact to an election timer.
    /// A node whose election timer is this crate's (the default) must be served by
    /// [`RaftNode::grpc_service`](crate::RaftNode::grpc_service) instead, or it would campaign
    /// while it hears a healthy leader.
    pub fn new(raft: Raft) -> Self {
        RaftGrpcService {
            raft,
            leader_contact: None,
        }
    }

    /// A service handing RPCs to `raft` and recording leader contact in `leader_contact`.
    pub(crate) fn with_leader_contact(raft: Raft, leader_contact: Arc<LeaderContact>) -> Self {
        RaftGrpcService {
            raft,
            leader_contact: Some(leader_contact),
        }
    }

    /// Tells the election timer that a leader was heard (or a vote granted) now.
    fn record_leader_contact(&self) {
        if let Some(leader_contact) = &self.leader_contact {
            leader_contact.record();
        }
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
        let result = self.raft.append_entries(rpc).await;
        if let Ok(
            AppendEntriesResponse::Success
            | AppendEntriesResponse::PartialSuccess(_)
            | AppendEntriesResponse::Conflict,
        ) = &result
        {
            self.record_leader_contact();
        }
        encode(&result)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: openraft::raft::VoteRequest<crate::types::NodeId> =
            decode(request.into_inner(), "VoteRequest")?;
        let candidate_term = rpc.vote.leader_id().term;
        let candidate_last_log_id = rpc.last_log_id;
        let result = self.raft.vote(rpc).await;
        match &result {
            Ok(response) if response.vote_granted => self.record_leader_contact(),
            // Refused because the candidate's log is behind ours, while openraft kept our
            // lower term: our timer must outrun that candidate's term (see `election`).
            Ok(response)
                if response.vote.leader_id().term < candidate_term
                    && candidate_last_log_id < response.last_log_id =>
            {
                if let Some(contact) = &self.leader_contact {
                    contact.record_outdated_candidate(candidate_term);
                }
            }
            _ => {}
        }
        encode(&result)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: openraft::raft::InstallSnapshotRequest<crate::TypeConfig> =
            decode(request.into_inner(), "InstallSnapshotRequest")?;
        let sender_vote = rpc.vote;
        let result = self.raft.install_snapshot(rpc).await;
        if result
            .as_ref()
            .is_ok_and(|response| response.vote == sender_vote)
        {
            self.record_leader_contact();
        }
        encode(&result)
    }
}
