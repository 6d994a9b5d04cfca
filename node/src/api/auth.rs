//! Authentication and authorisation of every gRPC call: default deny.
//!
//! [`AuthLayer`] wraps the whole tonic router. For each request it looks the method path
//! (`/flotilla.v1.FleetService/SubmitFleet`, ...) up in [`METHOD_REQUIREMENTS`], the one table
//! that says what each method needs; a method not in the table is denied (PERMISSION_DENIED), so
//! a new RPC cannot ship without an entry (a test enumerates every method of the descriptor set).
//!
//! - [`Requirement::Permission`]: a bearer token (`authorization: Bearer flotilla_...`) that is
//!   known, not revoked and not expired (else UNAUTHENTICATED), whose role grants the
//!   permission (else PERMISSION_DENIED naming it). The token's [`Caller`] goes into the request
//!   extensions; handlers then check the project of the fleet concerned
//!   ([`Caller::require`]) and a worker token's worker id ([`Caller::require_worker`]).
//! - [`Requirement::RaftTransport`]: Raft, checked by the raft transport itself (node certificate
//!   of the cluster, cluster id).
//! - [`Requirement::Node`]: a cluster node's identity ([`authorize_node`]), for
//!   node-to-node artifact transfer.
//! - [`Requirement::Open`]: gRPC reflection (the schema is public).
//!
//! Tokens are checked against this node's replica of the state: a token created or revoked a
//! moment ago is known here once this node applied that entry (followers lag the leader by
//! milliseconds). A forwarded request carries the caller's `authorization` metadata, so the
//! leader authenticates the original caller again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use flotilla_raft::RaftNode;
use flotilla_scheduler::{Permission, Principal, Role, Token};
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};

use crate::clock::LeaderClock;

/// What a gRPC method needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// Nothing: served to anyone.
    Open,
    /// Any valid token.
    Authenticated,
    /// A valid token whose role grants the permission (project checks follow in the handler).
    Permission(Permission),
    /// A cluster node's identity (mTLS), see [`authorize_node`].
    Node,
    /// Raft transport: passed through, because the raft crate's own transport check
    /// (`flotilla_raft::security`, configured from `node/src/tls.rs`) is the one implementation
    /// of it: a node certificate of this cluster's trust domain with TLS, the cluster id on
    /// every message always.
    RaftTransport,
}

/// Every gRPC method served, with what it needs. Anything else is denied.
pub const METHOD_REQUIREMENTS: &[(&str, Requirement)] = &[
    (
        "/flotilla.v1.SecretService/SetSecret",
        Requirement::Permission(Permission::ProjectSettings),
    ),
    (
        "/flotilla.v1.SecretService/ListSecrets",
        Requirement::Permission(Permission::ProjectSettings),
    ),
    (
        "/flotilla.v1.SecretService/DeleteSecret",
        Requirement::Permission(Permission::ProjectSettings),
    ),
    (
        "/flotilla.v1.SecretService/RotateSecrets",
        Requirement::Permission(Permission::ClusterManage),
    ),
    (
        "/flotilla.v1.ScheduleService/CreateSchedule",
        Requirement::Permission(Permission::ProjectSettings),
    ),
    (
        "/flotilla.v1.ScheduleService/GetSchedule",
        Requirement::Permission(Permission::FleetRead),
    ),
    (
        "/flotilla.v1.ScheduleService/ListSchedules",
        Requirement::Permission(Permission::FleetRead),
    ),
    (
        "/flotilla.v1.ScheduleService/PauseSchedule",
        Requirement::Permission(Permission::ProjectSettings),
    ),
    (
        "/flotilla.v1.ScheduleService/ResumeSchedule",
        Requirement::Permission(Permission::ProjectSettings),
    ),
    (
        "/flotilla.v1.ScheduleService/DeleteSchedule",
        Requirement::Permission(Permission::ProjectSettings),
    ),
    (
        "/flotilla.v1.ScheduleService/TriggerSchedule",
        Requirement::Permission(Permission::FleetSubmit),
    ),
    (
        "/flotilla.v1.ScheduleService/BackfillSchedule",
        Requirement::Permission(Permission::FleetSubmit),
    ),
    (
        "/flotilla.v1.EventService/CreateEventRule",
        Requirement::Permission(Permission::ProjectSettings),
    ),
    (
        "/flotilla.v1.EventService/ListEventRules",
        Requirement::Permission(Permission::FleetRead),
    ),
    (
        "/flotilla.v1.EventService/DeleteEventRule",
        Requirement::Permission(Permission::ProjectSettings),
    ),
    (
        "/flotilla.v1.EventService/PublishEvent",
        Requirement::Permission(Permission::FleetSubmit),
    ),
    (
        "/flotilla.v1.EventService/ListDeliveries",
        Requirement::Permission(Permission::FleetRead),
    ),
    ("/flotilla.v1.EventService/ForwardHook", Requirement::Node),
    (
        "/flotilla.v1.ScheduleService/PreviewSchedule",
        Requirement::Permission(Permission::FleetRead),
    ),
    (
        "/flotilla.v1.FleetService/SubmitFleet",
        Requirement::Permission(Permission::FleetSubmit),
    ),
    (
        "/flotilla.v1.FleetService/GetFleet",
        Requirement::Permission(Permission::FleetRead),
    ),
    (
        "/flotilla.v1.FleetService/ListFleets",
        Requirement::Permission(Permission::FleetRead),
    ),
    (
        "/flotilla.v1.FleetService/WatchFleet",
        Requirement::Permission(Permission::FleetRead),
    ),
    (
        "/flotilla.v1.FleetService/ListRuns",
        Requirement::Permission(Permission::FleetRead),
    ),
    (
        "/flotilla.v1.FleetService/GetRun",
        Requirement::Permission(Permission::FleetRead),
    ),
    (
        "/flotilla.v1.FleetService/CancelFleet",
        Requirement::Permission(Permission::FleetCancel),
    ),
    (
        "/flotilla.v1.FleetService/PauseFleet",
        Requirement::Permission(Permission::FleetCancel),
    ),
    (
        "/flotilla.v1.FleetService/ResumeFleet",
        Requirement::Permission(Permission::FleetCancel),
    ),
    (
        "/flotilla.v1.FleetService/ApproveFleet",
        Requirement::Permission(Permission::FleetCancel),
    ),
    (
        "/flotilla.v1.FleetService/RerunFleet",
        Requirement::Permission(Permission::FleetSubmit),
    ),
    (
        "/flotilla.v1.LimitService/CreateLimit",
        Requirement::Permission(Permission::ClusterManage),
    ),
    (
        "/flotilla.v1.LimitService/DeleteLimit",
        Requirement::Permission(Permission::ClusterManage),
    ),
    (
        "/flotilla.v1.LimitService/ListLimits",
        Requirement::Permission(Permission::ClusterRead),
    ),
    (
        "/flotilla.v1.LimitService/GetLimit",
        Requirement::Permission(Permission::ClusterRead),
    ),
    (
        "/flotilla.v1.WorkerService/LeaseRuns",
        Requirement::Permission(Permission::WorkerProtocol),
    ),
    (
        "/flotilla.v1.WorkerService/Heartbeat",
        Requirement::Permission(Permission::WorkerProtocol),
    ),
    (
        "/flotilla.v1.WorkerService/ReportResult",
        Requirement::Permission(Permission::WorkerProtocol),
    ),
    (
        "/flotilla.v1.TokenService/CreateToken",
        Requirement::Permission(Permission::TokenManage),
    ),
    (
        "/flotilla.v1.TokenService/ListTokens",
        Requirement::Permission(Permission::TokenManage),
    ),
    (
        "/flotilla.v1.TokenService/RevokeToken",
        Requirement::Permission(Permission::TokenManage),
    ),
    (
        "/flotilla.v1.TokenService/WhoAmI",
        Requirement::Authenticated,
    ),
    (
        "/flotilla.v1.AuditService/ListAuditRecords",
        Requirement::Permission(Permission::AuditRead),
    ),
    (
        "/flotilla.v1.ClusterService/Initialize",
        Requirement::Permission(Permission::ClusterManage),
    ),
    (
        "/flotilla.v1.ClusterService/AddMember",
        Requirement::Permission(Permission::ClusterManage),
    ),
    (
        "/flotilla.v1.ClusterService/RemoveMember",
        Requirement::Permission(Permission::ClusterManage),
    ),
    (
        "/flotilla.v1.ClusterService/Status",
        Requirement::Permission(Permission::ClusterRead),
    ),
    (
        "/flotilla.v1.ClusterService/StateDigest",
        Requirement::Permission(Permission::ClusterRead),
    ),
    ("/flotilla.v1.ClusterService/GetArtifact", Requirement::Node),
    (
        "/flotilla.raft.v1.RaftService/AppendEntries",
        Requirement::RaftTransport,
    ),
    (
        "/flotilla.raft.v1.RaftService/Vote",
        Requirement::RaftTransport,
    ),
    (
        "/flotilla.raft.v1.RaftService/InstallSnapshot",
        Requirement::RaftTransport,
    ),
    (
        "/flotilla.raft.v1.RaftService/PreVote",
        Requirement::RaftTransport,
    ),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        Requirement::Open,
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        Requirement::Open,
    ),
];

/// What `path` (`/package.Service/Method`) needs; `None`: not served (denied).
pub fn requirement(path: &str) -> Option<Requirement> {
    METHOD_REQUIREMENTS
        .iter()
        .find(|(method, _)| *method == path)
        .map(|(_, requirement)| *requirement)
}

/// The authenticated caller of a request (in its extensions): its token, without the hash.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The token (its `secret_sha256` is cleared).
    pub token: Token,
}

impl Caller {
    /// The principal recorded with the caller's state changes.
    pub fn principal(&self) -> Principal {
        self.token.principal()
    }

    /// Whether the caller holds `permission` in `project`.
    pub fn may(&self, permission: Permission, project: &str) -> bool {
        self.token.allows(permission, Some(project))
    }

    /// PERMISSION_DENIED naming the permission and project unless the caller holds them.
    ///
    /// # Errors
    /// PERMISSION_DENIED.
    pub fn require(&self, permission: Permission, project: &str) -> Result<(), Status> {
        if self.may(permission, project) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "token {} ({}, project {}) lacks {} in project {project:?}",
            self.token.accessor_id,
            self.token.role.as_str(),
            self.token.project.as_deref().unwrap_or("*"),
            permission.as_str()
        )))
    }

    /// PERMISSION_DENIED unless the caller may act as `worker_id`: a worker token bound to it,
    /// or an admin.
    ///
    /// # Errors
    /// PERMISSION_DENIED naming both worker ids.
    pub fn require_worker(&self, worker_id: &str) -> Result<(), Status> {
        match (&self.token.role, &self.token.worker_id) {
            (Role::Admin, _) => Ok(()),
            (Role::Worker, Some(own)) if own == worker_id => Ok(()),
            (Role::Worker, own) => Err(Status::permission_denied(format!(
                "worker_id: token {} is bound to worker {:?}, not {worker_id:?} (worker.protocol)",
                self.token.accessor_id,
                own.as_deref().unwrap_or("")
            ))),
            _ => Err(Status::permission_denied(format!(
                "token {} is not a worker token (worker.protocol)",
                self.token.accessor_id
            ))),
        }
    }
}

/// The caller that [`AuthLayer`] put into `request`'s extensions.
///
/// # Errors
/// UNAUTHENTICATED when there is none (a method reached without the layer).
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

/// The caller's `authorization` metadata, to send along when forwarding to the leader.
pub fn authorization<T>(request: &tonic::Request<T>) -> Option<MetadataValue<Ascii>> {
    request.metadata().get("authorization").cloned()
}

/// `message` as a request carrying `authorization` (see [`authorization`]).
pub fn forwarded<T>(message: T, authorization: &Option<MetadataValue<Ascii>>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = authorization {
        request
            .metadata_mut()
            .insert("authorization", value.clone());
    }
    request
}

/// Checks that the peer is a node of this cluster.
///
/// `peer_identity` is the peer's certificate identity (`spiffe://<cluster_id>/node/<node_id>`,
/// parsed by [`crate::tls::parse_spiffe_id`]), from mutual TLS; `cluster_id` is this node's. With
/// mutual TLS a missing identity, a non-node identity or a node of another cluster (a
/// certificate of the same CA issued for another trust domain) is PERMISSION_DENIED. In
/// insecure mode (`insecure`: plaintext, no certificates) there is no identity to check: the
/// call is allowed, so an insecure cluster trusts every host that reaches its port with Raft and
/// artifact transfer (development only; see ARCHITECTURE.md).
///
/// # Errors
/// PERMISSION_DENIED naming what was presented.
pub fn authorize_node(
    peer_identity: Option<&str>,
    cluster_id: &str,
    insecure: bool,
) -> Result<(), Status> {
    let parsed = peer_identity.and_then(crate::tls::parse_spiffe_id);
    match (peer_identity, parsed) {
        (
            Some(_),
            Some(crate::tls::PeerIdentity::Node {
                cluster_id: peer_cluster,
                ..
            }),
        ) if peer_cluster == cluster_id => Ok(()),
        (None, _) if insecure => Ok(()),
        (Some(identity), Some(crate::tls::PeerIdentity::Node { .. })) => {
            Err(Status::permission_denied(format!(
                "only nodes of cluster {cluster_id:?} may call this method (peer identity {identity:?} belongs to another cluster)"
            )))
        }
        (Some(identity), _) => Err(Status::permission_denied(format!(
            "only cluster nodes may call this method (peer identity {identity:?} is not a node)"
        ))),
        (None, _) => Err(Status::permission_denied(
            "only cluster nodes may call this method (no peer certificate)",
        )),
    }
}

/// The tower layer that enforces [`METHOD_REQUIREMENTS`]; see the module docs.
#[derive(Clone)]
pub struct AuthLayer {
    node: Arc<RaftNode>,
    clock: Arc<LeaderClock>,
    cluster_id: Arc<str>,
    insecure: bool,
}

impl AuthLayer {
    /// Checks tokens against `node`'s state at `clock`'s replicated time, and node identities
    /// against `cluster_id`. `insecure`: no transport identities (see [`authorize_node`]).
    pub fn new(
        node: Arc<RaftNode>,
        clock: Arc<LeaderClock>,
        cluster_id: &str,
        insecure: bool,
    ) -> Self {
        AuthLayer {
            node,
            clock,
            cluster_id: Arc::from(cluster_id),
            insecure,
        }
    }

    /// Decides one request: `Ok(Some(caller))` to serve it as the caller, `Ok(None)` to serve it
    /// without one (open and node methods), `Err` to answer the status instead.
    ///
    /// # Errors
    /// UNAUTHENTICATED or PERMISSION_DENIED; UNAVAILABLE while this node knows no token at all
    /// (the cluster is not bootstrapped yet, or this node has not caught up).
    pub fn check(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        peer_identity: Option<&str>,
    ) -> Result<Option<Caller>, Status> {
        let Some(requirement) = requirement(path) else {
            return Err(Status::permission_denied(format!(
                "method {path} is not in the permission table (default deny)"
            )));
        };
        let permission = match requirement {
            Requirement::Open => return Ok(None),
            // Transport identities come from mutual TLS (node/src/tls.rs).
            Requirement::RaftTransport => return Ok(None),
            Requirement::Node => {
                return authorize_node(peer_identity, &self.cluster_id, self.insecure)
                    .map(|()| None);
            }
            Requirement::Authenticated => None,
            Requirement::Permission(permission) => Some(permission),
        };
        let bearer = headers
            .get(http::header::AUTHORIZATION)
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing authorization metadata (\"Bearer <token>\"; see flotilla token)",
                )
            })?
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("authorization metadata must be \"Bearer <token>\"")
            })?;
        let now_ms = crate::clock::replicated_now_ms(&self.clock, &self.node);
        let (bootstrapped, authenticated) = self.node.state.read(|state| {
            (
                state.tokens_bootstrapped(),
                state.authenticate(bearer.trim(), now_ms).cloned(),
            )
        });
        if !bootstrapped {
            // This node knows no token yet: the cluster is not bootstrapped, or this node has
            // not caught up (or joined). Retryable, like any other missing leader.
            // Without a leader, the same answer as any write would get here.
            return Err(Status::unavailable(
                if self.node.current_leader().is_none() {
                    "no leader is known yet; retry shortly"
                } else {
                    "this node knows no tokens yet (bootstrap pending or not caught up); retry"
                },
            ));
        }
        let mut token =
            authenticated.map_err(|error| Status::unauthenticated(error.to_string()))?;
        token.secret_sha256.clear();
        if let Some(permission) = permission
            && !token.role.grants(permission)
        {
            return Err(Status::permission_denied(format!(
                "token {} ({}) lacks {}",
                token.accessor_id,
                token.role.as_str(),
                permission.as_str()
            )));
        }
        Ok(Some(Caller { token }))
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>;

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        // The client certificate's SPIFFE id, when the connection is mutual TLS.
        let peer_identity = request
            .extensions()
            .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
            .and_then(|info| info.peer_certs())
            .and_then(|certificates| {
                certificates
                    .first()
                    .and_then(|leaf| crate::tls::certificate_identity(leaf.as_ref()))
            })
            .map(|identity| identity.spiffe_id());
        match self
            .layer
            .check(&path, request.headers(), peer_identity.as_deref())
        {
            Ok(caller) => {
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(request))
            }
            Err(status) => {
                let code = match status.code() {
                    tonic::Code::Unauthenticated => "unauthenticated",
                    tonic::Code::Unavailable => "unavailable",
                    _ => "permission_denied",
                };
                metrics::counter!("flotilla_requests_denied_total", "code" => code).increment(1);
                tracing::info!(method = %path, %code, reason = %status.message(), "request denied");
                let response = status.into_http::<tonic::body::Body>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// Every method of every service in the descriptor set (and of gRPC reflection) has a table
    /// entry, and the table names no method that does not exist: nothing ships without a
    /// permission.
    #[test]
    fn every_method_of_every_service_has_a_table_entry() {
        let set = prost_types::FileDescriptorSet::decode(flotilla_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut methods = Vec::new();
        for file in &set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        for reflection in ["grpc.reflection.v1", "grpc.reflection.v1alpha"] {
            methods.push(format!(
                "/{reflection}.ServerReflection/ServerReflectionInfo"
            ));
        }
        assert!(methods.len() > 20, "{methods:?}");
        let missing: Vec<&String> = methods
            .iter()
            .filter(|m| requirement(m).is_none())
            .collect();
        assert!(
            missing.is_empty(),
            "methods without a permission: {missing:?}"
        );
        for (method, _) in METHOD_REQUIREMENTS {
            assert!(
                methods.iter().any(|m| m == method),
                "{method} is in the table but not served"
            );
        }
        assert_eq!(requirement("/flotilla.v1.FleetService/Nope"), None);
    }

    #[test]
    fn node_methods_need_a_node_identity_unless_insecure() {
        assert!(authorize_node(Some("spiffe://c1/node/3"), "c1", false).is_ok());
        assert!(authorize_node(None, "c1", true).is_ok());
        for identity in [
            "spiffe://c1/worker/w1",
            "spiffe://c1/node/x",
            "spiffe://c1/node/0",
            "node/1",
            "spiffe://c2/node/3",
        ] {
            let status = authorize_node(Some(identity), "c1", true).unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{identity}");
        }
        assert!(
            authorize_node(Some("spiffe://c2/node/3"), "c1", false)
                .unwrap_err()
                .message()
                .contains("another cluster")
        );
        assert_eq!(
            authorize_node(None, "c1", false).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }
}
