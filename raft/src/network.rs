//! openraft's network ([`RaftNetworkFactory`], [`RaftNetwork`]) over tonic: each RPC is one
//! `flotilla.raft.v1.RaftService` call whose [`RaftMessage`] carries the openraft request in
//! [`crate::codec`]'s encoding (a version byte, then MessagePack), and whose response carries
//! `Result<response, openraft RaftError>` in the same encoding. The
//! election timer's pre-votes ([`GrpcNetworkFactory::pre_vote`], see [`crate::pre_vote`]) use
//! the same channels.
//!
//! One lazily connected [`Channel`] per target node is kept and reused by every client openraft
//! creates for that node (openraft makes a new client per replication stream and per election).
//! Its HTTP/2 connection is checked with keep-alive pings
//! ([`NetworkConfig::keep_alive_interval_ms`], [`NetworkConfig::keep_alive_timeout_ms`]): a
//! connection whose ping is not answered in time is closed, and the channel reconnects on the
//! next RPC. Without it, a connection that stalled in a partition (its TCP retransmissions
//! backed off to seconds apart) kept every RPC to the healed node timing out for seconds after
//! the heal.
//!
//! Failures are classified so that openraft reacts well:
//! - the peer cannot be reached or the connection was lost (gRPC `UNAVAILABLE`: refused, connect
//!   timeout, keep-alive timeout; other `CANCELLED` or an HTTP/2 protocol error: the connection
//!   closed under the call; `RESOURCE_EXHAUSTED` that is not about message size: the peer reset
//!   the connection, as HTTP/2 `ENHANCE_YOUR_CALM` after too many streams reset by timeouts; a
//!   bad address) → [`Unreachable`]: openraft stops sending to the node for the
//!   [`RaftNetwork::backoff`] interval;
//! - the deadline passed (here, or tonic's server answered `CANCELLED` "Timeout expired") →
//!   [`Timeout`];
//! - a message over the size limit (checked before sending, or tonic's `message length too
//!   large` from the peer, `OUT_OF_RANGE`), or an AppendEntries over
//!   [`NetworkConfig::max_append_entries_bytes`], while appending more than one entry →
//!   [`PayloadTooLarge`] with a hint of half the entries: openraft retries at once with fewer;
//! - anything else, including undecodable replies → [`NetworkError`].
//!
//! The factory logs each lost connection once (`connection to a peer lost`, with the error) and
//! each recovery (`connection to a peer re-established`, with the failed RPCs in between).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use flotilla_proto::raft::RaftMessage;
use flotilla_proto::raft::raft_service_client::RaftServiceClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, Timeout,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{AnyError, BasicNode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::pre_vote::{PreVoteRequest, PreVoteResponse};
use crate::security::{CLUSTER_ID_METADATA, TransportSecurity};
use crate::types::{NodeId, TypeConfig};

/// Default largest gRPC message sent or accepted between nodes: 64 MiB. Bounds an
/// AppendEntries batch and a snapshot chunk (whose bytes grow up to 2× as MessagePack integers).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Default largest AppendEntries request of more than one entry, in bytes (encoded): 1 MiB.
/// openraft 0.9 gives every AppendEntries one heartbeat interval, so what a follower must
/// decode, append and fsync per request is kept small; a larger request is refused before
/// sending as [`PayloadTooLarge`] with half the entries, and openraft sends fewer. One entry
/// is always sent (large submissions are split into bounded entries by the API).
pub const DEFAULT_MAX_APPEND_ENTRIES_BYTES: usize = 1024 * 1024;

/// Default time allowed to establish a TCP + HTTP/2 connection to a peer, in milliseconds.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;

/// Default first pause after a peer was found unreachable, in milliseconds.
pub const DEFAULT_UNREACHABLE_BACKOFF_INITIAL_MS: u64 = 50;

/// Default longest pause between attempts to reach an unreachable peer, in milliseconds. Below
/// the default election timeout, so a peer that comes back hears from the leader before it
/// starts an election.
pub const DEFAULT_UNREACHABLE_BACKOFF_MAX_MS: u64 = 300;

/// Default time without any frame received from a peer after which an HTTP/2 ping is sent on
/// its connection, in milliseconds. A follower answers the leader's heartbeats several times
/// within it, so a healthy replication connection is never pinged.
pub const DEFAULT_KEEP_ALIVE_INTERVAL_MS: u64 = 500;

/// Default time allowed for a peer to answer an HTTP/2 ping before its connection is closed and
/// reopened, in milliseconds.
pub const DEFAULT_KEEP_ALIVE_TIMEOUT_MS: u64 = 1_000;

/// Settings of the node-to-node transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Time allowed to connect to a peer, in milliseconds. Default
    /// [`DEFAULT_CONNECT_TIMEOUT_MS`].
    pub connect_timeout_ms: u64,
    /// Largest gRPC message sent or accepted, in bytes. Default [`DEFAULT_MAX_MESSAGE_BYTES`].
    pub max_message_bytes: usize,
    /// Largest encoded AppendEntries request carrying more than one entry, in bytes; above it
    /// the entries are halved ([`PayloadTooLarge`]). Default
    /// [`DEFAULT_MAX_APPEND_ENTRIES_BYTES`].
    pub max_append_entries_bytes: usize,
    /// First pause after a peer is unreachable, in milliseconds; doubles after each failure up
    /// to `unreachable_backoff_max_ms`. Default [`DEFAULT_UNREACHABLE_BACKOFF_INITIAL_MS`].
    pub unreachable_backoff_initial_ms: u64,
    /// Longest pause between attempts to reach an unreachable peer, in milliseconds. Default
    /// [`DEFAULT_UNREACHABLE_BACKOFF_MAX_MS`].
    pub unreachable_backoff_max_ms: u64,
    /// Time without a frame from a peer before its connection is pinged, in milliseconds (at
    /// least 1); also while no RPC is in flight. Default [`DEFAULT_KEEP_ALIVE_INTERVAL_MS`].
    pub keep_alive_interval_ms: u64,
    /// Time a ping may go unanswered before the connection is closed (its RPCs fail as
    /// unreachable) and the next RPC opens a new one, in milliseconds (at least 1). Default
    /// [`DEFAULT_KEEP_ALIVE_TIMEOUT_MS`].
    pub keep_alive_timeout_ms: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_append_entries_bytes: DEFAULT_MAX_APPEND_ENTRIES_BYTES,
            unreachable_backoff_initial_ms: DEFAULT_UNREACHABLE_BACKOFF_INITIAL_MS,
            unreachable_backoff_max_ms: DEFAULT_UNREACHABLE_BACKOFF_MAX_MS,
            keep_alive_interval_ms: DEFAULT_KEEP_ALIVE_INTERVAL_MS,
            keep_alive_timeout_ms: DEFAULT_KEEP_ALIVE_TIMEOUT_MS,
        }
    }
}

/// Whether RPCs to one peer are failing, for logging transitions once.
#[derive(Debug, Default)]
struct PeerLink {
    /// Since when RPCs to the peer fail as unreachable (the first such failure after an answer),
    /// and how many failed (unreachable or timed out) since; `None` while the connection works.
    lost: Mutex<Option<(Instant, u64)>>,
}

impl PeerLink {
    /// An RPC reached the peer and got an answer.
    fn answered(&self, source: NodeId, target: NodeId) {
        let lost = self
            .lost
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some((since, failed_rpcs)) = lost {
            tracing::info!(
                node_id = source,
                peer_node_id = target,
                failed_rpcs,
                failing_for_ms = since.elapsed().as_millis() as u64,
                "connection to a peer re-established"
            );
        }
    }

    /// An RPC failed: `unreachable` if the connection could not be made or was lost.
    fn failed(&self, source: NodeId, target: NodeId, unreachable: bool, error: &AnyError) {
        let mut lost = self.lost.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *lost {
            Some((_, failed_rpcs)) => *failed_rpcs += 1,
            None if unreachable => {
                *lost = Some((Instant::now(), 1));
                tracing::warn!(
                    node_id = source,
                    peer_node_id = target,
                    %error,
                    "connection to a peer lost; retrying with backoff on a new connection"
                );
            }
            None => {}
        }
    }
}

/// A cached channel, the address it was made for, and the state of the link.
struct CachedChannel {
    address: String,
    channel: Result<Channel, String>,
    link: Arc<PeerLink>,
}

/// Creates [`GrpcConnection`]s for openraft, sharing one channel per target node. Cloning shares
/// the channel cache.
#[derive(Clone)]
pub struct GrpcNetworkFactory {
    node_id: NodeId,
    config: Arc<NetworkConfig>,
    /// Sent with every request ([`CLUSTER_ID_METADATA`]).
    cluster_id: MetadataValue<Ascii>,
    /// TLS of the connections to peers; `None`: plaintext.
    client_tls: Option<ClientTlsConfig>,
    channels: Arc<Mutex<HashMap<NodeId, CachedChannel>>>,
}

impl std::fmt::Debug for GrpcNetworkFactory {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GrpcNetworkFactory")
            .field("node_id", &self.node_id)
            .field("config", &self.config)
            .finish()
    }
}

impl GrpcNetworkFactory {
    /// A factory for node `node_id` (the sender, named in timeout errors) of the default
    /// cluster ([`crate::node::DEFAULT_CLUSTER_ID`]), over plaintext.
    pub fn new(node_id: NodeId, config: NetworkConfig) -> Self {
        Self::with_security(
            node_id,
            config,
            crate::node::DEFAULT_CLUSTER_ID,
            TransportSecurity::default(),
        )
    }

    /// A factory for node `node_id` of cluster `cluster_id` (sent with every request), dialling
    /// peers over `security.client_tls` (as `https://`) when set. A `cluster_id` that is not
    /// valid metadata is sent empty (validation of [`crate::RaftNodeConfig`] rejects it).
    pub fn with_security(
        node_id: NodeId,
        config: NetworkConfig,
        cluster_id: &str,
        security: TransportSecurity,
    ) -> Self {
        GrpcNetworkFactory {
            node_id,
            config: Arc::new(config),
            cluster_id: MetadataValue::try_from(cluster_id)
                .unwrap_or_else(|_| MetadataValue::from_static("")),
            client_tls: security.client_tls,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The channel to `target` at `address` and its link state: the cached one, or a new lazily
    /// connected one if there is none or the node's address changed. The channel's `Err` holds
    /// why `address` is not usable.
    fn channel(&self, target: NodeId, address: &str) -> (Result<Channel, String>, Arc<PeerLink>) {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = channels.get(&target)
            && cached.address == address
        {
            return (cached.channel.clone(), Arc::clone(&cached.link));
        }
        let channel = self.connect_lazily(address);
        let link = Arc::new(PeerLink::default());
        channels.insert(
            target,
            CachedChannel {
                address: address.to_string(),
                channel: channel.clone(),
                link: Arc::clone(&link),
            },
        );
        (channel, link)
    }

    fn connect_lazily(&self, address: &str) -> Result<Channel, String> {
        let scheme = if self.client_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let authority = address
            .split_once("://")
            .map_or(address, |(_, authority)| authority);
        let uri = format!("{scheme}://{authority}");
        let mut endpoint = Endpoint::from_shared(uri)
            .map_err(|error| format!("invalid node address {address:?}: {error}"))?;
        if let Some(tls) = &self.client_tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|error| format!("TLS settings for node {address:?}: {error}"))?;
        }
        Ok(endpoint
            .connect_timeout(Duration::from_millis(self.config.connect_timeout_ms))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_millis(self.config.keep_alive_interval_ms))
            .keep_alive_timeout(Duration::from_millis(self.config.keep_alive_timeout_ms))
            .keep_alive_while_idle(true)
            .connect_lazy())
    }

    /// A client for `target` at `node`'s address, on the shared channel.
    fn connection(&self, target: NodeId, node: &BasicNode) -> GrpcConnection {
        let (channel, link) = self.channel(target, &node.addr);
        let client = channel.map(|channel| {
            RaftServiceClient::new(channel)
                .max_decoding_message_size(self.config.max_message_bytes)
                .max_encoding_message_size(self.config.max_message_bytes)
        });
        GrpcConnection {
            cluster_id: self.cluster_id.clone(),
            source: self.node_id,
            target,
            target_node: node.clone(),
            client,
            link,
            config: Arc::clone(&self.config),
        }
    }

    /// Asks node `target` at `address` for a pre-vote (see [`crate::pre_vote`]), waiting at most
    /// `timeout`.
    ///
    /// # Errors
    /// The peer's openraft error ([`RPCError::RemoteError`]: it stopped), or a transport failure
    /// classified as for openraft's RPCs (see the module documentation).
    pub async fn pre_vote(
        &self,
        target: NodeId,
        address: &str,
        request: &PreVoteRequest,
        timeout: Duration,
    ) -> Result<PreVoteResponse, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let mut connection = self.connection(target, &BasicNode::new(address));
        connection.call(Method::PreVote, request, timeout, 0).await
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetworkFactory {
    type Network = GrpcConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        self.connection(target, node)
    }
}

/// openraft's client for one target node.
pub struct GrpcConnection {
    cluster_id: MetadataValue<Ascii>,
    source: NodeId,
    target: NodeId,
    target_node: BasicNode,
    client: Result<RaftServiceClient<Channel>, String>,
    link: Arc<PeerLink>,
    config: Arc<NetworkConfig>,
}

/// The `RaftService` methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
    PreVote,
}

impl Method {
    /// The openraft RPC type named in timeout errors (a pre-vote is a kind of vote).
    fn rpc_type(self) -> RPCTypes {
        match self {
            Method::AppendEntries => RPCTypes::AppendEntries,
            Method::Vote | Method::PreVote => RPCTypes::Vote,
            Method::InstallSnapshot => RPCTypes::InstallSnapshot,
        }
    }
}

/// How an RPC failed below openraft's error types.
#[derive(Debug)]
enum Failure {
    /// The peer could not be reached, or the connection was lost under the call.
    Unreachable(AnyError),
    Timeout,
    /// A message over the size limit.
    TooLarge(AnyError),
    Network(AnyError),
}

/// tonic's text for a call that outlived its deadline (`CANCELLED`, from the server's timeout).
const DEADLINE_EXPIRED_TEXT: &str = "Timeout expired";

/// Bytes a [`RaftMessage`] adds around its `data`: the field's tag and length (a varint).
const PROTOBUF_ENVELOPE_BYTES: usize = 11;

/// tonic's text for a message over `max_encoding_message_size` / `max_decoding_message_size`
/// (`OUT_OF_RANGE`, on either side).
const MESSAGE_TOO_LARGE_TEXT: &str = "message length too large";

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        let describe = |what: &str| {
            AnyError::error(format!(
                "{what} (gRPC status {:?}: {})",
                status.code(),
                status.message()
            ))
        };
        let message = status.message();
        let connection_level =
            message.starts_with("h2 protocol error") || message.starts_with("transport error");
        match status.code() {
            Code::Unavailable => Failure::Unreachable(describe("the peer is unavailable")),
            Code::DeadlineExceeded => Failure::Timeout,
            Code::OutOfRange | Code::ResourceExhausted
                if message.contains(MESSAGE_TOO_LARGE_TEXT) =>
            {
                Failure::TooLarge(describe("message over the size limit"))
            }
            // HTTP/2 ENHANCE_YOUR_CALM (tonic maps it to RESOURCE_EXHAUSTED): the peer reset the
            // connection, e.g. after too many streams that timed-out calls had reset.
            Code::ResourceExhausted => {
                Failure::Unreachable(describe("the peer reset the connection"))
            }
            // tonic's server answers CANCELLED "Timeout expired" once the deadline the caller
            // sent (`grpc-timeout`) passed: a timeout, not a lost connection.
            Code::Cancelled if message.contains(DEADLINE_EXPIRED_TEXT) => Failure::Timeout,
            Code::Cancelled => {
                Failure::Unreachable(describe("the connection closed under the call"))
            }
            _ if connection_level => {
                Failure::Unreachable(describe("the connection failed under the call"))
            }
            _ => Failure::Network(describe("the call failed")),
        }
    }
}

impl GrpcConnection {
    /// Sends `request` ([`crate::codec`]) to `method`, waits at most `timeout`, and decodes the reply as
    /// `Result<Response, E>`. `entries` is the number of log entries sent (for the payload hint).
    async fn call<Request, Response, E>(
        &mut self,
        method: Method,
        request: &Request,
        timeout: Duration,
        entries: usize,
    ) -> Result<Response, RPCError<NodeId, BasicNode, E>>
    where
        Request: Serialize,
        Response: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result = match crate::codec::encode(request) {
            // tonic's own check of the limit fails the HTTP/2 stream mid-body, which the caller
            // sees as a protocol error: check it here, so the caller learns what happened.
            Ok(data) if data.len() + PROTOBUF_ENVELOPE_BYTES > self.config.max_message_bytes => {
                Err(Failure::TooLarge(AnyError::error(format!(
                    "the {method:?} message is {} bytes, more than \
                     network.max_message_bytes ({})",
                    data.len(),
                    self.config.max_message_bytes
                ))))
            }
            Ok(data)
                if method == Method::AppendEntries
                    && entries > 1
                    && data.len() > self.config.max_append_entries_bytes =>
            {
                Err(Failure::TooLarge(AnyError::error(format!(
                    "the AppendEntries message of {entries} entries is {} bytes, more than \
                     network.max_append_entries_bytes ({})",
                    data.len(),
                    self.config.max_append_entries_bytes
                ))))
            }
            Ok(data) => self.send(method, data, timeout).await,
            Err(error) => Err(Failure::Network(AnyError::new(&error))),
        };
        if let Err(failure) = &result {
            match failure {
                Failure::Unreachable(error) => {
                    self.link.failed(self.source, self.target, true, error);
                }
                Failure::Timeout => self.link.failed(
                    self.source,
                    self.target,
                    false,
                    &AnyError::error("timed out"),
                ),
                Failure::TooLarge(_) | Failure::Network(_) => {}
            }
        } else {
            self.link.answered(self.source, self.target);
        }
        let action = method.rpc_type();
        let failure = match result {
            Ok(data) => match crate::codec::decode::<Result<Response, E>>(&data) {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(remote)) => {
                    return Err(RPCError::RemoteError(RemoteError::new_with_node(
                        self.target,
                        self.target_node.clone(),
                        remote,
                    )));
                }
                Err(error) => Failure::Network(
                    AnyError::new(&error).add_context(|| format!("decoding the {method:?} reply")),
                ),
            },
            Err(failure) => failure,
        };
        Err(match failure {
            Failure::Unreachable(error) => RPCError::Unreachable(Unreachable::new(&error)),
            Failure::Timeout => RPCError::Timeout(Timeout {
                action,
                id: self.source,
                target: self.target,
                timeout,
            }),
            Failure::TooLarge(_) if method == Method::AppendEntries && entries > 1 => {
                RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint((entries / 2) as u64))
            }
            Failure::TooLarge(error) | Failure::Network(error) => {
                RPCError::Network(NetworkError::new(&error))
            }
        })
    }

    /// Sends one message and returns the reply's bytes.
    async fn send(
        &mut self,
        method: Method,
        data: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, Failure> {
        let client = match &mut self.client {
            Ok(client) => client,
            Err(reason) => return Err(Failure::Unreachable(AnyError::error(reason.clone()))),
        };
        let mut request = tonic::Request::new(RaftMessage { data });
        // Tells the server the deadline (the `grpc-timeout` header); the client enforces it below.
        request.set_timeout(timeout);
        request
            .metadata_mut()
            .insert(CLUSTER_ID_METADATA, self.cluster_id.clone());
        let reply = async {
            match method {
                Method::Vote => client.vote(request).await,
                Method::AppendEntries => client.append_entries(request).await,
                Method::InstallSnapshot => client.install_snapshot(request).await,
                Method::PreVote => client.pre_vote(request).await,
            }
        };
        match tokio::time::timeout(timeout, reply).await {
            Ok(Ok(reply)) => Ok(reply.into_inner().data),
            Ok(Err(status)) => Err(Failure::from(status)),
            Err(_elapsed) => Err(Failure::Timeout),
        }
    }
}

impl RaftNetwork<TypeConfig> for GrpcConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let entries = rpc.entries.len();
        self.call(Method::AppendEntries, &rpc, option.hard_ttl(), entries)
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Method::InstallSnapshot, &rpc, option.hard_ttl(), 0)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(Method::Vote, &rpc, option.hard_ttl(), 0).await
    }

    /// Exponential: [`NetworkConfig::unreachable_backoff_initial_ms`], doubling up to
    /// [`NetworkConfig::unreachable_backoff_max_ms`].
    fn backoff(&self) -> Backoff {
        let initial = Duration::from_millis(self.config.unreachable_backoff_initial_ms);
        let max = Duration::from_millis(self.config.unreachable_backoff_max_ms);
        Backoff::new(std::iter::successors(
            Some(initial.min(max)),
            move |previous| Some(previous.saturating_mul(2).min(max)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_size_errors_are_too_large_and_connection_resets_are_unreachable() {
        let too_large = [
            tonic::Status::out_of_range(
                "Error, encoded message length too large: found 9000 bytes, the limit is: 4096 bytes",
            ),
            tonic::Status::out_of_range(
                "Error, decoded message length too large: found 9000 bytes, the limit is: 4096 bytes",
            ),
        ];
        for status in too_large {
            let description = format!("{status:?}");
            assert!(
                matches!(Failure::from(status), Failure::TooLarge(_)),
                "{description}"
            );
        }
        // What tonic makes of an HTTP/2 GOAWAY with ENHANCE_YOUR_CALM, as a peer sends after
        // too many streams were reset by timed-out calls, and of a connection that closed.
        let connection_lost = [
            tonic::Status::resource_exhausted(
                "h2 protocol error: error reading a body from connection: stream error received: \
                 remotely-reset pending-accept streams reached limit",
            ),
            tonic::Status::cancelled("operation was canceled: connection closed"),
            tonic::Status::unavailable("keep-alive timed out"),
            tonic::Status::internal("h2 protocol error: connection reset"),
        ];
        for status in connection_lost {
            let description = format!("{status:?}");
            match Failure::from(status) {
                Failure::Unreachable(error) => {
                    assert!(!error.to_string().contains("size"), "{error}");
                }
                other => panic!("{description} classified as {other:?}"),
            }
        }
        for status in [
            tonic::Status::deadline_exceeded("late"),
            // What tonic's server answers once the caller's `grpc-timeout` passed.
            tonic::Status::cancelled("Timeout expired"),
        ] {
            let description = format!("{status:?}");
            assert!(
                matches!(Failure::from(status), Failure::Timeout),
                "{description}"
            );
        }
        assert!(matches!(
            Failure::from(tonic::Status::invalid_argument("data: not decodable")),
            Failure::Network(_)
        ));
    }
}
