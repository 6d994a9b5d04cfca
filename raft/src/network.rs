//! openraft's network ([`RaftNetworkFactory`], [`RaftNetwork`]) over tonic: each RPC is one
//! `flotilla.raft.v1.RaftService` call whose [`RaftMessage`] carries the JSON of the openraft
//! request, and whose response carries the JSON of `Result<response, openraft RaftError>`.
//!
//! One lazily connected [`Channel`] per target node is kept and reused by every client openraft
//! creates for that node (openraft makes a new client per replication stream and per election).
//! Failures are classified so that openraft reacts well:
//! - the peer cannot be reached (gRPC `UNAVAILABLE`, bad address) → [`Unreachable`]: openraft
//!   stops sending to the node for the [`RaftNetwork::backoff`] interval;
//! - the deadline passed → [`Timeout`];
//! - the message is too large (`OUT_OF_RANGE`, `RESOURCE_EXHAUSTED`) while appending more than
//!   one entry → [`PayloadTooLarge`] with a hint of half the entries: openraft retries at once
//!   with fewer;
//! - anything else, including undecodable replies → [`NetworkError`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
use tonic::transport::{Channel, Endpoint};

use crate::types::{NodeId, TypeConfig};

/// Default largest gRPC message sent or accepted between nodes: 64 MiB. Bounds an
/// AppendEntries batch and a snapshot chunk (whose bytes grow up to 4× as JSON numbers).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Default time allowed to establish a TCP + HTTP/2 connection to a peer, in milliseconds.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 1_000;

/// Default first pause after a peer was found unreachable, in milliseconds.
pub const DEFAULT_UNREACHABLE_BACKOFF_INITIAL_MS: u64 = 50;

/// Default longest pause between attempts to reach an unreachable peer, in milliseconds. Below
/// the default election timeout, so a peer that comes back hears from the leader before it
/// starts an election.
pub const DEFAULT_UNREACHABLE_BACKOFF_MAX_MS: u64 = 300;

/// Settings of the node-to-node transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Time allowed to connect to a peer, in milliseconds. Default
    /// [`DEFAULT_CONNECT_TIMEOUT_MS`].
    pub connect_timeout_ms: u64,
    /// Largest gRPC message sent or accepted, in bytes. Default [`DEFAULT_MAX_MESSAGE_BYTES`].
    pub max_message_bytes: usize,
    /// First pause after a peer is unreachable, in milliseconds; doubles after each failure up
    /// to `unreachable_backoff_max_ms`. Default [`DEFAULT_UNREACHABLE_BACKOFF_INITIAL_MS`].
    pub unreachable_backoff_initial_ms: u64,
    /// Longest pause between attempts to reach an unreachable peer, in milliseconds. Default
    /// [`DEFAULT_UNREACHABLE_BACKOFF_MAX_MS`].
    pub unreachable_backoff_max_ms: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            unreachable_backoff_initial_ms: DEFAULT_UNREACHABLE_BACKOFF_INITIAL_MS,
            unreachable_backoff_max_ms: DEFAULT_UNREACHABLE_BACKOFF_MAX_MS,
        }
    }
}

/// A cached channel and the address it was made for.
struct CachedChannel {
    address: String,
    channel: Result<Channel, String>,
}

/// Creates [`GrpcConnection`]s for openraft, sharing one channel per target node. Cloning shares
/// the channel cache.
#[derive(Clone)]
pub struct GrpcNetworkFactory {
    node_id: NodeId,
    config: Arc<NetworkConfig>,
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
    /// A factory for node `node_id` (the sender, named in timeout errors).
    pub fn new(node_id: NodeId, config: NetworkConfig) -> Self {
        GrpcNetworkFactory {
            node_id,
            config: Arc::new(config),
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The channel to `target` at `address`: the cached one, or a new lazily connected one if
    /// there is none or the node's address changed. `Err` holds why `address` is not usable.
    fn channel(&self, target: NodeId, address: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cached) = channels.get(&target)
            && cached.address == address
        {
            return cached.channel.clone();
        }
        let channel = self.connect_lazily(address);
        channels.insert(
            target,
            CachedChannel {
                address: address.to_string(),
                channel: channel.clone(),
            },
        );
        channel
    }

    fn connect_lazily(&self, address: &str) -> Result<Channel, String> {
        let uri = if address.contains("://") {
            address.to_string()
        } else {
            format!("http://{address}")
        };
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|error| format!("invalid node address {address:?}: {error}"))?;
        Ok(endpoint
            .connect_timeout(Duration::from_millis(self.config.connect_timeout_ms))
            .tcp_nodelay(true)
            .connect_lazy())
    }
}

impl RaftNetworkFactory<TypeConfig> for GrpcNetworkFactory {
    type Network = GrpcConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        let client = self.channel(target, &node.addr).map(|channel| {
            RaftServiceClient::new(channel)
                .max_decoding_message_size(self.config.max_message_bytes)
                .max_encoding_message_size(self.config.max_message_bytes)
        });
        GrpcConnection {
            source: self.node_id,
            target,
            target_node: node.clone(),
            client,
            config: Arc::clone(&self.config),
        }
    }
}

/// openraft's client for one target node.
pub struct GrpcConnection {
    source: NodeId,
    target: NodeId,
    target_node: BasicNode,
    client: Result<RaftServiceClient<Channel>, String>,
    config: Arc<NetworkConfig>,
}

/// How an RPC failed below openraft's error types.
enum Failure {
    Unreachable(AnyError),
    Timeout,
    TooLarge(AnyError),
    Network(AnyError),
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        let error = AnyError::error(format!(
            "gRPC status {:?}: {}",
            status.code(),
            status.message()
        ));
        match status.code() {
            Code::Unavailable => Failure::Unreachable(error),
            Code::DeadlineExceeded => Failure::Timeout,
            Code::OutOfRange | Code::ResourceExhausted => Failure::TooLarge(error),
            _ => Failure::Network(error),
        }
    }
}

impl GrpcConnection {
    /// Sends `request` as JSON to the method of `action`, waits at most `option.hard_ttl()`, and
    /// decodes the reply as `Result<Response, E>`.
    async fn call<Request, Response, E>(
        &mut self,
        action: RPCTypes,
        request: &Request,
        option: &RPCOption,
        entries: usize,
    ) -> Result<Response, RPCError<NodeId, BasicNode, E>>
    where
        Request: Serialize,
        Response: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let timeout = option.hard_ttl();
        let result = match serde_json::to_vec(request) {
            Ok(data) => self.send(action, data, timeout).await,
            Err(error) => Err(Failure::Network(AnyError::new(&error))),
        };
        let failure = match result {
            Ok(data) => match serde_json::from_slice::<Result<Response, E>>(&data) {
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(remote)) => {
                    return Err(RPCError::RemoteError(RemoteError::new_with_node(
                        self.target,
                        self.target_node.clone(),
                        remote,
                    )));
                }
                Err(error) => Failure::Network(
                    AnyError::new(&error).add_context(|| format!("decoding the {action} reply")),
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
            Failure::TooLarge(_) if action == RPCTypes::AppendEntries && entries > 1 => {
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
        action: RPCTypes,
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
        let reply = async {
            match action {
                RPCTypes::Vote => client.vote(request).await,
                RPCTypes::AppendEntries => client.append_entries(request).await,
                RPCTypes::InstallSnapshot => client.install_snapshot(request).await,
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
        self.call(RPCTypes::AppendEntries, &rpc, &option, entries)
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
        self.call(RPCTypes::InstallSnapshot, &rpc, &option, 0).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(RPCTypes::Vote, &rpc, &option, 0).await
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
