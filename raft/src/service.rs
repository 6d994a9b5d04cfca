//! The receiving side of the node-to-node transport: `flotilla.raft.v1.RaftService` handing
//! each RPC to the local openraft node, and answering pre-votes (see [`crate::pre_vote`]).
//!
//! Each request's `data` is the openraft request (for `PreVote`, a [`PreVoteRequest`]) in
//! [`crate::codec`]'s encoding; each reply's `data` is `Result<response, openraft
//! RaftError>` in the same encoding, so openraft-level errors (a higher vote, a snapshot mismatch, a stopped node)
//! reach the sender as values, and gRPC errors mean transport problems only: undecodable bytes
//! are `INVALID_ARGUMENT` naming the field. Every request must first name this node's cluster
//! and pass the node's peer check (see [`crate::security`]).
//!
//! The service records when this node heard from a leader: an AppendEntries it accepted
//! (openraft answered `Success`, `PartialSuccess` or `Conflict`: the sender's vote was accepted,
//! even if the logs did not match yet; `HigherVote`, the answer to a deposed leader, does not
//! count) or an InstallSnapshot chunk it accepted (its vote is the sender's). Pre-votes are
//! refused within the leader lease after such a message. The service built by
//! [`RaftNode::grpc_service`](crate::RaftNode::grpc_service) shares the record with the node's
//! election timer (see the crate documentation), which also counts the votes this node granted.

use std::sync::Arc;

use flotilla_proto::raft::RaftMessage;
use flotilla_proto::raft::raft_service_server::RaftService;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use openraft::ServerState;
use openraft::raft::AppendEntriesResponse;

use crate::election::LeaderContact;
use crate::pre_vote::{self, PreVoteRequest, VoterView};
use crate::security::{PeerAuthorizer, check_cluster_id};
use crate::types::{NodeId, Raft};

/// Serves openraft's RPCs for one local node.
#[derive(Clone)]
pub struct RaftGrpcService {
    raft: Raft,
    /// Where accepted leader messages and granted votes are recorded: the election timer's, or
    /// for a service made with [`RaftGrpcService::new`], one of its own (read by pre-votes only).
    leader_contact: Arc<LeaderContact>,
    /// The cluster every request must name (see [`crate::security`]).
    cluster_id: Arc<str>,
    /// The node's check of each request's peer, after the cluster id.
    authorize_peer: Option<PeerAuthorizer>,
}

impl std::fmt::Debug for RaftGrpcService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RaftGrpcService")
            .finish_non_exhaustive()
    }
}

impl RaftGrpcService {
    /// A service handing RPCs to `raft`, without reporting leader contact to an election timer
    /// (it keeps its own record, for answering pre-votes). A node whose election timer is this
    /// crate's (the default) must be served by
    /// [`RaftNode::grpc_service`](crate::RaftNode::grpc_service) instead, or it would campaign
    /// while it hears a healthy leader.
    /// Requests must name `cluster_id`.
    pub fn new(raft: Raft, cluster_id: &str) -> Self {
        RaftGrpcService {
            raft,
            leader_contact: Arc::new(LeaderContact::default()),
            cluster_id: Arc::from(cluster_id),
            authorize_peer: None,
        }
    }

    /// A service handing RPCs to `raft` and recording leader contact in `leader_contact`.
    pub(crate) fn with_leader_contact(
        raft: Raft,
        leader_contact: Arc<LeaderContact>,
        cluster_id: Arc<str>,
        authorize_peer: Option<PeerAuthorizer>,
    ) -> Self {
        RaftGrpcService {
            raft,
            leader_contact,
            cluster_id,
            authorize_peer,
        }
    }

    /// Admits `request`: it names this node's cluster, and the peer authorizer (if any) accepts
    /// its sender.
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` for another cluster; the authorizer's status.
    fn admit(&self, request: &Request<RaftMessage>) -> Result<(), Status> {
        check_cluster_id(request, &self.cluster_id)?;
        if let Some(authorize) = &self.authorize_peer {
            authorize(request)?;
        }
        Ok(())
    }

    /// This node's answer to a pre-vote (rules in [`crate::pre_vote`]).
    ///
    /// # Errors
    /// openraft's `Fatal` when the node has stopped (boxed; it encodes as the unboxed error).
    fn answer_pre_vote(
        &self,
        request: &PreVoteRequest,
    ) -> Result<pre_vote::PreVoteResponse, Box<openraft::error::RaftError<NodeId>>> {
        let (is_leader, term) = {
            let metrics = self.raft.metrics();
            let metrics = metrics.borrow();
            if let Err(fatal) = &metrics.running_state {
                return Err(Box::new(openraft::error::RaftError::Fatal(fatal.clone())));
            }
            (
                metrics.state == ServerState::Leader,
                metrics.vote.leader_id().term,
            )
        };
        let last_log_id = self.raft.data_metrics().borrow().last_log;
        // openraft's leader lease: its upper election timeout bound, which this crate sets to
        // `election_timeout_min_ms` when its own timer runs.
        let lease = std::time::Duration::from_millis(self.raft.config().election_timeout_max);
        let voter = VoterView {
            is_leader,
            since_leader_heard: self.leader_contact.since_leader_heard(),
            lease,
            term,
            last_log_id,
        };
        let response = pre_vote::answer(request, &voter);
        tracing::debug!(
            candidate_id = request.candidate_id,
            candidate_term = request.term,
            granted = response.granted,
            refusal = response.refusal.map(|refusal| refusal.to_string()),
            "answered a pre-vote"
        );
        Ok(response)
    }
}

/// Decodes `message.data` ([`crate::codec`]) as a `kind`.
fn decode<T: DeserializeOwned>(message: RaftMessage, kind: &str) -> Result<T, Status> {
    crate::codec::decode(&message.data).map_err(|error| {
        Status::invalid_argument(format!("data: not the encoding of a {kind}: {error}"))
    })
}

/// Encodes `result` ([`crate::codec`]) as the reply.
fn encode<T: Serialize>(result: &T) -> Result<Response<RaftMessage>, Status> {
    crate::codec::encode(result)
        .map(|data| Response::new(RaftMessage { data }))
        .map_err(|error| Status::internal(format!("cannot encode the Raft reply: {error}")))
}

#[tonic::async_trait]
impl RaftService for RaftGrpcService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.admit(&request)?;
        let rpc = decode(request.into_inner(), "AppendEntriesRequest")?;
        let result = self.raft.append_entries(rpc).await;
        if let Ok(
            AppendEntriesResponse::Success
            | AppendEntriesResponse::PartialSuccess(_)
            | AppendEntriesResponse::Conflict,
        ) = &result
        {
            self.leader_contact.record_leader();
        }
        encode(&result)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.admit(&request)?;
        let rpc: openraft::raft::VoteRequest<crate::types::NodeId> =
            decode(request.into_inner(), "VoteRequest")?;
        let candidate_term = rpc.vote.leader_id().term;
        let candidate_last_log_id = rpc.last_log_id;
        let result = self.raft.vote(rpc).await;
        match &result {
            Ok(response) if response.vote_granted => self.leader_contact.record_vote_granted(),
            // Refused because the candidate's log is behind ours, while openraft kept our
            // lower term: our timer must outrun that candidate's term (see `election`).
            Ok(response)
                if response.vote.leader_id().term < candidate_term
                    && candidate_last_log_id < response.last_log_id =>
            {
                self.leader_contact
                    .record_outdated_candidate(candidate_term);
            }
            _ => {}
        }
        encode(&result)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.admit(&request)?;
        let rpc: openraft::raft::InstallSnapshotRequest<crate::TypeConfig> =
            decode(request.into_inner(), "InstallSnapshotRequest")?;
        let sender_vote = rpc.vote;
        let result = self.raft.install_snapshot(rpc).await;
        if result
            .as_ref()
            .is_ok_and(|response| response.vote == sender_vote)
        {
            self.leader_contact.record_leader();
        }
        encode(&result)
    }

    async fn pre_vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.admit(&request)?;
        let rpc: PreVoteRequest = decode(request.into_inner(), "PreVoteRequest")?;
        encode(&self.answer_pre_vote(&rpc))
    }
}
