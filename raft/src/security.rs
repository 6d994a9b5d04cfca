//! Who may speak Raft to a node: the cluster id every `RaftService` request carries, the TLS
//! settings of the node's outgoing Raft connections, and the hook through which the node
//! checks each incoming request's peer (for Flotilla: a node certificate of the same cluster).
//!
//! The cluster id travels in the request metadata [`CLUSTER_ID_METADATA`]. The receiver refuses
//! a request without it, or naming another cluster, with `FAILED_PRECONDITION` naming both ids,
//! before openraft sees the message: a node of another cluster can neither vote, nor append,
//! nor install a snapshot, nor ask for a pre-vote.

use std::sync::Arc;

use flotilla_proto::raft::RaftMessage;
use tonic::Status;
use tonic::transport::ClientTlsConfig;

/// Metadata key of the sender's cluster id on every `RaftService` request.
pub const CLUSTER_ID_METADATA: &str = "flotilla-cluster-id";

/// Longest cluster id, in bytes (a SPIFFE trust domain fits in a DNS name).
pub const MAX_CLUSTER_ID_BYTES: usize = 63;

/// Checks an incoming `RaftService` request's peer (its TLS certificates, in the request's
/// extensions) before the message is handled; `Err` is returned to the caller as is.
pub type PeerAuthorizer =
    Arc<dyn Fn(&tonic::Request<RaftMessage>) -> Result<(), Status> + Send + Sync>;

/// Whether `cluster_id` is a valid cluster id: 1 to [`MAX_CLUSTER_ID_BYTES`] characters of
/// lower-case ASCII letters, digits, `-` and `.` (a SPIFFE trust domain), starting and ending
/// with a letter or digit.
pub fn is_valid_cluster_id(cluster_id: &str) -> bool {
    let bytes = cluster_id.as_bytes();
    let alphanumeric = |byte: &u8| byte.is_ascii_lowercase() || byte.is_ascii_digit();
    !bytes.is_empty()
        && bytes.len() <= MAX_CLUSTER_ID_BYTES
        && bytes
            .iter()
            .all(|byte| alphanumeric(byte) || *byte == b'-' || *byte == b'.')
        && bytes.first().is_some_and(alphanumeric)
        && bytes.last().is_some_and(alphanumeric)
}

/// TLS of the node's outgoing Raft connections and the check of incoming Raft requests.
/// The default is plaintext with no peer check (cluster ids are still checked).
#[derive(Clone, Default)]
pub struct TransportSecurity {
    /// TLS for connections to peers (CA, and this node's certificate for mutual TLS); peer
    /// addresses are then dialled as `https://`. `None`: plaintext.
    pub client_tls: Option<ClientTlsConfig>,
    /// Called for every incoming request after its cluster id was checked.
    pub authorize_peer: Option<PeerAuthorizer>,
}

impl std::fmt::Debug for TransportSecurity {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TransportSecurity")
            .field("client_tls", &self.client_tls.is_some())
            .field("authorize_peer", &self.authorize_peer.is_some())
            .finish()
    }
}

impl PartialEq for TransportSecurity {
    /// Equal when both use TLS or both do not, and they share the same authorizer (or none).
    fn eq(&self, other: &Self) -> bool {
        self.client_tls.is_some() == other.client_tls.is_some()
            && match (&self.authorize_peer, &other.authorize_peer) {
                (None, None) => true,
                (Some(left), Some(right)) => Arc::ptr_eq(left, right),
                _ => false,
            }
    }
}

impl Eq for TransportSecurity {}

/// Checks that `request` names `cluster_id` in [`CLUSTER_ID_METADATA`].
///
/// # Errors
/// `FAILED_PRECONDITION` naming both ids (or saying the id is missing).
pub fn check_cluster_id<T>(request: &tonic::Request<T>, cluster_id: &str) -> Result<(), Status> {
    let Some(value) = request.metadata().get(CLUSTER_ID_METADATA) else {
        return Err(Status::failed_precondition(format!(
            "Raft message refused: it names no cluster (metadata {CLUSTER_ID_METADATA} is \
             missing); this node belongs to cluster {cluster_id:?}"
        )));
    };
    let sender = value.to_str().unwrap_or("");
    if sender != cluster_id {
        let shown: String = sender.chars().take(MAX_CLUSTER_ID_BYTES).collect();
        return Err(Status::failed_precondition(format!(
            "Raft message from cluster {shown:?} refused: this node belongs to cluster \
             {cluster_id:?}"
        )));
    }
    Ok(())
}
