//! The gRPC service `flotilla.v1.ClusterService`: membership changes (forwarded to the leader,
//! applied by openraft's joint consensus), cluster status, and state digests for consistency
//! checks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::cluster_service_client::ClusterServiceClient;
use flotilla_proto::v1::cluster_service_server::ClusterService;
use flotilla_proto::v1::{self};
use flotilla_raft::{MembershipError, RaftNode};
use sha2::Digest as _;
use tonic::{Request, Response, Status};
use tracing::info;

/// Serves `ClusterService` for one node.
#[derive(Clone)]
pub struct Cluster {
    node: Arc<RaftNode>,
}

enum Outcome {
    Done,
    Forward(String),
}

impl Cluster {
    /// A service over `node`.
    pub fn new(node: Arc<RaftNode>) -> Self {
        Cluster { node }
    }

    fn status(&self) -> v1::ClusterStatus {
        cluster_status(&self.node)
    }

    async fn forward_client(
        address: &str,
    ) -> Result<ClusterServiceClient<tonic::transport::Channel>, Status> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| Status::internal(format!("bad leader address {address}: {e}")))?
            .connect_timeout(Duration::from_secs(2));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("leader {address} unreachable: {e}")))?;
        Ok(ClusterServiceClient::new(channel))
    }
}

fn membership_result(result: Result<(), MembershipError>) -> Result<Outcome, Status> {
    match result {
        Ok(()) => Ok(Outcome::Done),
        Err(MembershipError::ForwardToLeader {
            leader_address: Some(address),
            ..
        }) => Ok(Outcome::Forward(address)),
        Err(MembershipError::ForwardToLeader {
            leader_address: None,
            ..
        }) => Err(Status::unavailable("no leader is known yet; retry shortly")),
        Err(error) => Err(Status::failed_precondition(error.to_string())),
    }
}

fn validate_member(member: Option<&v1::Member>) -> Result<(u64, String), Status> {
    let member = member.ok_or_else(|| Status::invalid_argument("member: is required"))?;
    if member.node_id == 0 {
        return Err(Status::invalid_argument(
            "member.node_id: must be at least 1",
        ));
    }
    if member.address.parse::<std::net::SocketAddr>().is_err() {
        return Err(Status::invalid_argument(format!(
            "member.address: {:?} is not an IP:port socket address",
            flotilla_scheduler::spec::shorten(&member.address, 128)
        )));
    }
    Ok((member.node_id, member.address.clone()))
}

/// The node's view of the cluster, in wire form.
pub fn cluster_status(node: &RaftNode) -> v1::ClusterStatus {
    let view = node.cluster_view();
    let (leader_id, leader_address) = view.leader.clone().unwrap_or((0, String::new()));
    v1::ClusterStatus {
        node_id: view.node_id,
        role: view.role.clone(),
        term: view.term,
        leader_id,
        leader_address,
        last_log_index: view.last_log_index,
        committed_index: view.committed_index,
        applied_index: view.applied_index,
        snapshot_index: view.snapshot_index,
        members: view
            .members
            .iter()
            .map(|m| v1::MemberStatus {
                node_id: m.node_id,
                address: m.address.clone(),
                voter: m.voter,
                matched_index: m.matched_index.unwrap_or(0),
                lag: m
                    .matched_index
                    .map_or(0, |matched| view.last_log_index.saturating_sub(matched)),
            })
            .collect(),
    }
}

/// The applied index and the SHA-256 (hex) of the replicated state's canonical JSON at that
/// index. The state holds only ordered maps, so equal states give equal bytes.
pub fn state_digest(node: &RaftNode) -> (u64, String) {
    node.state.read_with_index(|state, applied_index| {
        let bytes = serde_json::to_vec(state).unwrap_or_default();
        let digest = sha2::Sha256::digest(&bytes);
        (
            applied_index,
            digest.iter().map(|b| format!("{b:02x}")).collect(),
        )
    })
}

#[tonic::async_trait]
impl ClusterService for Cluster {
    async fn initialize(
        &self,
        request: Request<v1::InitializeRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        let members = request.into_inner().members;
        if members.is_empty() {
            return Err(Status::invalid_argument(
                "members: must name at least this node",
            ));
        }
        let mut voters = BTreeMap::new();
        for (index, member) in members.iter().enumerate() {
            let (node_id, address) = validate_member(Some(member)).map_err(|s| {
                Status::invalid_argument(format!(
                    "members[{index}].{}",
                    s.message().trim_start_matches("member.")
                ))
            })?;
            if voters.insert(node_id, address).is_some() {
                return Err(Status::invalid_argument(format!(
                    "members[{index}].node_id: duplicate node id {node_id}"
                )));
            }
        }
        if !voters.contains_key(&self.node.node_id) {
            return Err(Status::invalid_argument(format!(
                "members: must include this node ({})",
                self.node.node_id
            )));
        }
        let initialized = self
            .node
            .initialize_cluster(voters)
            .await
            .map_err(|e| Status::failed_precondition(format!("initialize: {e}")))?;
        if !initialized {
            return Err(Status::failed_precondition(
                "this node already belongs to an initialized cluster",
            ));
        }
        info!("cluster initialized");
        Ok(Response::new(self.status()))
    }

    async fn add_member(
        &self,
        request: Request<v1::AddMemberRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        let original = request.into_inner();
        let (node_id, address) = validate_member(original.member.as_ref())?;
        let mut outcome = membership_result(self.node.add_learner(node_id, address.clone()).await)?;
        if matches!(outcome, Outcome::Done) && !original.learner {
            outcome = membership_result(self.node.promote_voter(node_id).await)?;
        }
        match outcome {
            Outcome::Done => {
                info!(node_id, %address, learner = original.learner, "member added");
                Ok(Response::new(self.status()))
            }
            Outcome::Forward(leader) => {
                Self::forward_client(&leader)
                    .await?
                    .add_member(original)
                    .await
            }
        }
    }

    async fn remove_member(
        &self,
        request: Request<v1::RemoveMemberRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        let original = request.into_inner();
        if original.node_id == 0 {
            return Err(Status::invalid_argument("node_id: must be at least 1"));
        }
        match membership_result(self.node.remove_member(original.node_id).await)? {
            Outcome::Done => {
                info!(node_id = original.node_id, "member removed");
                Ok(Response::new(self.status()))
            }
            Outcome::Forward(leader) => {
                Self::forward_client(&leader)
                    .await?
                    .remove_member(original)
                    .await
            }
        }
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::ClusterStatus>, Status> {
        let original = request.into_inner();
        let status = self.status();
        if original.from_leader && status.leader_id != status.node_id {
            if status.leader_address.is_empty() {
                return Err(Status::unavailable("no leader is known yet"));
            }
            let forwarded = v1::StatusRequest { from_leader: false };
            return Self::forward_client(&status.leader_address)
                .await?
                .status(forwarded)
                .await;
        }
        Ok(Response::new(status))
    }

    async fn state_digest(
        &self,
        _request: Request<v1::StateDigestRequest>,
    ) -> Result<Response<v1::StateDigestResponse>, Status> {
        let (applied_index, digest) = state_digest(&self.node);
        Ok(Response::new(v1::StateDigestResponse {
            node_id: self.node.node_id,
            applied_index,
            digest,
        }))
    }

    async fn get_artifact(
        &self,
        request: Request<v1::GetArtifactRequest>,
    ) -> Result<Response<v1::GetArtifactResponse>, Status> {
        let request = request.into_inner();
        let (fleet_number, run_index) = flotilla_scheduler::state::parse_run_id(&request.run_id)
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "run_id: {:?} is not a run id (fl-<n>-<i>)",
                    request.run_id
                ))
            })?;
        if request.attempt == 0 {
            return Err(Status::invalid_argument("attempt: must be at least 1"));
        }
        let kind = crate::artifacts::kind_from_wire(request.kind)
            .ok_or_else(|| Status::invalid_argument("kind: must be LOG_TAIL or PATCH"))?;
        let key = flotilla_scheduler::ArtifactKey {
            fleet_number,
            run_index,
            attempt: request.attempt,
            kind,
        };
        let stored = self
            .node
            .state
            .artifact(&key)
            .map_err(|error| Status::unavailable(format!("reading the artifact: {error}")))?;
        Ok(Response::new(v1::GetArtifactResponse {
            found: stored.is_some(),
            data: stored.unwrap_or_default(),
        }))
    }
}
