//! Reading result artifacts (patches, log tails) for `GetRun`: from this node's artifact store,
//! or, when this node installed a snapshot taken after the result (snapshots carry digests, not
//! bytes), from a peer through `ClusterService.GetArtifact`. Every artifact is checked against
//! the SHA-256 the replicated state holds, so a peer cannot substitute other bytes.

use std::time::Duration;

use flotilla_proto::v1;
use flotilla_proto::v1::cluster_service_client::ClusterServiceClient;
use flotilla_raft::RaftNode;
use flotilla_scheduler::artifact::sha256_hex;
use flotilla_scheduler::{ArtifactKey, ArtifactKind};
use tracing::{debug, warn};

/// How long one peer may take to answer `GetArtifact`.
pub const PEER_ARTIFACT_TIMEOUT_MS: u64 = 2_000;

/// An artifact to read: where it is and what the state says its bytes hash to.
#[derive(Clone, Debug)]
pub struct Wanted {
    /// Its key.
    pub key: ArtifactKey,
    /// Lower-case hex SHA-256 from the state.
    pub sha256: String,
}

/// The artifact's text: local if this node has it, else from the first peer whose copy matches
/// `wanted.sha256` (stored locally for next time); `None` when no reachable node has it.
/// Peers are called over `peer_tls` (the node's mutual TLS; `None`: plaintext).
pub async fn load(
    node: &RaftNode,
    wanted: &Wanted,
    peer_tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Option<String> {
    match node.state.artifact(&wanted.key) {
        Ok(Some(bytes)) if sha256_hex(&bytes) == wanted.sha256 => return into_text(bytes),
        Ok(Some(_)) => warn!(key = ?wanted.key, "local artifact does not match its digest"),
        Ok(None) => {}
        Err(error) => warn!(%error, "reading a local artifact failed"),
    }
    let peers: Vec<String> = node
        .cluster_view()
        .members
        .into_iter()
        .filter(|member| member.node_id != node.node_id)
        .map(|member| member.address)
        .collect();
    for address in peers {
        let Some(bytes) = fetch(&address, &wanted.key, peer_tls).await else {
            continue;
        };
        if sha256_hex(&bytes) != wanted.sha256 {
            warn!(peer = %address, key = ?wanted.key, "a peer's artifact does not match its digest");
            continue;
        }
        if let Err(error) = node.state.store_artifact(&wanted.key, &bytes) {
            warn!(%error, "storing a fetched artifact failed");
        }
        return into_text(bytes);
    }
    debug!(key = ?wanted.key, "no reachable node holds the artifact");
    None
}

fn into_text(bytes: Vec<u8>) -> Option<String> {
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

async fn fetch(
    address: &str,
    key: &ArtifactKey,
    peer_tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Option<Vec<u8>> {
    let timeout = Duration::from_millis(PEER_ARTIFACT_TIMEOUT_MS);
    let endpoint = crate::tls::endpoint(address, peer_tls)
        .ok()?
        .connect_timeout(timeout)
        .timeout(timeout);
    let channel = endpoint.connect().await.ok()?;
    let request = v1::GetArtifactRequest {
        run_id: flotilla_scheduler::state::run_id(key.fleet_number, key.run_index),
        attempt: key.attempt,
        kind: kind_to_wire(key.kind) as i32,
    };
    let response = ClusterServiceClient::new(channel)
        .get_artifact(request)
        .await
        .ok()?
        .into_inner();
    response.found.then_some(response.data)
}

/// Wire form of an artifact kind.
pub fn kind_to_wire(kind: ArtifactKind) -> v1::ArtifactKind {
    match kind {
        ArtifactKind::LogTail => v1::ArtifactKind::LogTail,
        ArtifactKind::Patch => v1::ArtifactKind::Patch,
    }
}

/// Artifact kind from the wire; `None` for unspecified or unknown values.
pub fn kind_from_wire(kind: i32) -> Option<ArtifactKind> {
    match v1::ArtifactKind::try_from(kind).ok()? {
        v1::ArtifactKind::LogTail => Some(ArtifactKind::LogTail),
        v1::ArtifactKind::Patch => Some(ArtifactKind::Patch),
        v1::ArtifactKind::Unspecified => None,
    }
}
