//! The gRPC services `flotilla.v1.FleetService` and `flotilla.v1.WorkerService`.
//!
//! Every handler validates its request (errors are `INVALID_ARGUMENT` naming the field), stamps
//! writes with replicated time ([`crate::clock`]; writes only succeed on the leader, so the
//! stamp is the leader's) and proposes them through Raft, waiting at most
//! `limits.proposal_timeout_ms`. A write that reaches a follower is forwarded to
//! the leader over gRPC, so any node serves the whole API.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_proto::v1::fleet_service_server::FleetService;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use flotilla_proto::v1::worker_service_server::WorkerService;
use flotilla_proto::v1::{self};
use flotilla_raft::{RaftNode, ReadError, WriteError};
use flotilla_scheduler::spec::shorten;
use flotilla_scheduler::{
    Command, ExecutionPolicy, FieldError, FleetSpec, Request, Response, SpecLimits,
};
use futures::Stream;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use tracing::{Instrument, info, info_span, warn};

pub mod audit;
pub mod auth;
pub mod event;
pub mod flow;
pub mod limit;
pub mod token;

use flotilla_scheduler::{Permission, Principal};

use self::auth::{authorization, caller, forwarded};
pub mod schedule;
pub mod secret;

use crate::clock::LeaderClock;
use crate::config::LimitsSection;
use crate::convert::{self, ResultLimits};

/// Longest an idempotency key may be, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// Shortest wait of a lease request between looks at the state, in milliseconds: a rate
/// limit's next unit wakes it no sooner (so a wake that comes a little early costs one more
/// look, never a busy loop).
const MIN_LEASE_POLL_WAKE_MS: u64 = 5;
/// Most `(run_id, attempt)` pairs in one heartbeat.
pub const MAX_HEARTBEAT_LEASES: usize = 4096;
/// Most lease slots one request may ask for.
pub const MAX_LEASE_SLOTS: u32 = 1024;
/// Events read from the state per batch when streaming.
const WATCH_BATCH_EVENTS: usize = 256;

/// Milliseconds since the Unix epoch on this node's wall clock (for measurements; commands are
/// stamped with [`crate::clock`]'s replicated time).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The W3C `traceparent` of `span` (empty when no OpenTelemetry layer is installed), so that
/// workers can continue the submission's trace.
fn trace_parent(span: &tracing::Span) -> String {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let mut carrier = HashMap::new();
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent").unwrap_or_default()
}

/// 16 random bytes as 32 lower-case hex digits: an id the node picks (an upload id, a
/// trigger id). INTERNAL when the kernel gives no randomness; `what` names the id.
fn random_hex_id(what: &str) -> Result<String, Status> {
    let mut random = [0u8; 16];
    getrandom::fill(&mut random)
        .map_err(|error| Status::internal(format!("no randomness for {what}: {error}")))?;
    Ok(random.iter().map(|byte| format!("{byte:02x}")).collect())
}

fn invalid(error: FieldError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// Shared by both services.
#[derive(Clone)]
pub struct Api {
    node: Arc<RaftNode>,
    spec_limits: SpecLimits,
    policy: Arc<ExecutionPolicy>,
    result_limits: ResultLimits,
    limits: LimitsSection,
    watch_streams: Arc<Semaphore>,
    lease_polls: Arc<Semaphore>,
    clock: Arc<LeaderClock>,
    leader_channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// This node's cluster id (trust domain of worker certificates).
    cluster_id: Arc<str>,
    /// TLS of calls forwarded to the leader (the node's certificate); `None`: plaintext.
    peer_tls: Option<tonic::transport::ClientTlsConfig>,
    /// Key-encryption keys, to decrypt the secrets a lease reply carries.
    keyring: Arc<crate::secrets::Keyring>,
    /// Lease deadlines of this node's leadership, moved by heartbeats (no log writes).
    leases: Arc<crate::leases::LeaderLeases>,
}

enum Proposal {
    Applied(Response),
    Forward(Channel),
}

impl Api {
    /// A new API over `node`, stamping writes with `clock`.
    pub fn new(node: Arc<RaftNode>, limits: &LimitsSection, clock: Arc<LeaderClock>) -> Self {
        Api {
            node,
            spec_limits: SpecLimits {
                max_runs_per_fleet: limits.max_runs_per_fleet,
                max_task_bytes: limits.max_task_bytes,
                branch_prefix: limits.branch_prefix.clone(),
                ..SpecLimits::default()
            },
            policy: Arc::new(ExecutionPolicy::default()),
            result_limits: ResultLimits {
                max_log_tail_bytes: limits.max_log_tail_bytes,
                max_patch_bytes: limits.max_patch_bytes,
                max_diffstat_entries: 100_000,
                max_error_bytes: 64 * 1024,
            },
            limits: limits.clone(),
            watch_streams: Arc::new(Semaphore::new(limits.max_watch_streams)),
            lease_polls: Arc::new(Semaphore::new(limits.max_lease_polls)),
            clock,
            leader_channels: Arc::new(Mutex::new(HashMap::new())),
            cluster_id: Arc::from(flotilla_raft::node::DEFAULT_CLUSTER_ID),
            peer_tls: None,
            keyring: Arc::new(crate::secrets::Keyring::disabled()),
            leases: Arc::new(crate::leases::LeaderLeases::new(
                limits.lease_grace_after_election_ms,
            )),
        }
    }

    /// This API sharing `leases` (the tracker the housekeeping loop's engine reads).
    #[must_use]
    pub fn with_leases(mut self, leases: Arc<crate::leases::LeaderLeases>) -> Self {
        self.leases = leases;
        self
    }

    /// This API decrypting secrets for lease replies with `keyring` (without one, a lease of a
    /// fleet that names secrets fails, retryably).
    pub fn with_keyring(mut self, keyring: Arc<crate::secrets::Keyring>) -> Self {
        self.keyring = keyring;
        self
    }

    /// The same API applying `policy` to submissions instead of the default policy.
    #[must_use]
    pub fn with_policy(mut self, policy: ExecutionPolicy) -> Self {
        self.policy = Arc::new(policy);
        self
    }

    /// This API for cluster `cluster_id`, forwarding to the leader over `peer_tls` (the
    /// node's mutual TLS; `None`: plaintext).
    pub fn with_transport(
        mut self,
        cluster_id: &str,
        peer_tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> Self {
        self.cluster_id = Arc::from(cluster_id);
        self.peer_tls = peer_tls;
        self
    }

    /// Replicated time now, as this node would stamp a command.
    fn replicated_now_ms(&self) -> u64 {
        crate::clock::replicated_now_ms(&self.clock, &self.node)
    }

    /// Proposes a large submission in parts ([`flotilla_scheduler::staging`]): its
    /// repositories as `StageRepositories` entries of at most `limits.max_submission_part_bytes`
    /// under a random upload id, then `SubmitStagedFleet`. Forwarded whole when this node is
    /// not the leader at the first part; UNAVAILABLE when leadership moves after it (the
    /// staged parts expire; a retry with the same idempotency key is safe); RESOURCE_EXHAUSTED
    /// when the cluster's staging bounds are full.
    async fn propose_in_parts(
        &self,
        spec: FleetSpec,
        idempotency_key: String,
        trace_parent: String,
        principal: Principal,
    ) -> Result<Proposal, Status> {
        let upload_id = random_hex_id("an upload id")?;
        let parts =
            convert::submission_parts(&spec.repositories, self.limits.max_submission_part_bytes);
        for (index, repositories) in parts.into_iter().enumerate() {
            let command = Command::StageRepositories {
                upload_id: upload_id.clone(),
                repositories,
            };
            match self.propose(command, principal.clone()).await? {
                Proposal::Forward(channel) if index == 0 => return Ok(Proposal::Forward(channel)),
                Proposal::Forward(_) => {
                    return Err(Status::unavailable(
                        "the leader changed while the fleet was written in parts; submit again \
                         (with the same idempotency key, that is safe)",
                    ));
                }
                Proposal::Applied(Response::RepositoriesStaged { .. }) => {}
                Proposal::Applied(Response::Rejected { reason }) => {
                    return Err(Status::resource_exhausted(reason));
                }
                Proposal::Applied(other) => {
                    return Err(Status::internal(format!("unexpected response {other:?}")));
                }
            }
        }
        let command = Command::SubmitStagedFleet {
            upload_id,
            spec: FleetSpec {
                repositories: Vec::new(),
                ..spec
            },
            idempotency_key,
            trace_parent,
            max_events: self.limits.max_events_per_fleet,
        };
        match self.propose(command, principal).await? {
            Proposal::Forward(_) => Err(Status::unavailable(
                "the leader changed while the fleet was written in parts; submit again (with \
                 the same idempotency key, that is safe)",
            )),
            applied => Ok(applied),
        }
    }

    /// Proposes `command` stamped with replicated time and waits at most
    /// `limits.proposal_timeout_ms` for it to be applied. On a follower, returns a channel to
    /// the leader so the caller can forward the original RPC.
    async fn propose(&self, command: Command, principal: Principal) -> Result<Proposal, Status> {
        let request = Request {
            now_ms: self.replicated_now_ms(),
            command,
            principal,
        };
        let timeout = Duration::from_millis(self.limits.proposal_timeout_ms);
        let Ok(written) = tokio::time::timeout(timeout, self.node.write(request)).await else {
            return Err(Status::unavailable(format!(
                "the write was not applied within {} ms (limits.proposal_timeout_ms); it may \
                 still be: retry (submissions with the same idempotency key are safe)",
                timeout.as_millis()
            )));
        };
        match written {
            Ok((_, response)) => Ok(Proposal::Applied(response)),
            Err(WriteError::ForwardToLeader {
                leader_address: Some(address),
                ..
            }) => Ok(Proposal::Forward(self.channel_to(&address)?)),
            Err(WriteError::ForwardToLeader {
                leader_address: None,
                ..
            }) => Err(Status::unavailable("no leader is known yet; retry shortly")),
            Err(error @ WriteError::Overloaded { .. }) => {
                Err(Status::resource_exhausted(error.to_string()))
            }
            Err(error) => Err(Status::unavailable(format!("write failed: {error}"))),
        }
    }

    fn channel_to(&self, address: &str) -> Result<Channel, Status> {
        let mut channels = self
            .leader_channels
            .lock()
            .map_err(|_| Status::internal("leader channel cache poisoned"))?;
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let endpoint = crate::tls::endpoint(address, self.peer_tls.as_ref())
            .map_err(|e| Status::internal(format!("bad leader address: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            // A leader that is partitioned away or paused is noticed within seconds, and the
            // calls waiting on it fail instead of hanging until it returns.
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_lazy();
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// Awaits a call forwarded to the leader for at most `limits.forward_timeout_ms` plus
    /// `extra_ms` (a long poll's own wait), and no longer than the leader this node knows stays
    /// the same: a leader that is partitioned away or paused cannot hold the caller. The caller
    /// then gets UNAVAILABLE and retries, against the new leader.
    async fn forward<T>(
        &self,
        call: impl std::future::Future<Output = Result<GrpcResponse<T>, Status>>,
        extra_ms: u64,
    ) -> Result<GrpcResponse<T>, Status> {
        let limit = Duration::from_millis(self.limits.forward_timeout_ms.saturating_add(extra_ms));
        let leader = self.node.current_leader().map(|(id, _)| id);
        let mut metrics = self.node.raft.metrics();
        let leader_changed = async move {
            loop {
                if metrics.changed().await.is_err() {
                    return;
                }
                if metrics.borrow().current_leader != leader {
                    return;
                }
            }
        };
        let result = tokio::select! {
            result = tokio::time::timeout(limit, call) => result.unwrap_or_else(|_| {
                Err(Status::unavailable(format!(
                    "the leader did not answer within {} ms (limits.forward_timeout_ms); retry",
                    limit.as_millis()
                )))
            }),
            () = leader_changed => Err(Status::unavailable("the leader changed while the request was forwarded; retry")),
        };
        // The client may reach the leader this node could not: hint where it is now.
        result.map_err(|status| match self.node.current_leader() {
            Some((leader_id, address))
                if status.code() == tonic::Code::Unavailable && leader_id != self.node.node_id =>
            {
                crate::leader_hint::with_leader_address(status, &address)
            }
            _ => status,
        })
    }

    fn fleet_client(&self, channel: Channel) -> FleetServiceClient<Channel> {
        FleetServiceClient::new(channel)
            .max_decoding_message_size(self.limits.max_request_bytes)
            .max_encoding_message_size(self.limits.max_request_bytes)
    }

    fn worker_client(&self, channel: Channel) -> WorkerServiceClient<Channel> {
        WorkerServiceClient::new(channel)
            .max_decoding_message_size(self.limits.max_request_bytes)
            .max_encoding_message_size(self.limits.max_request_bytes)
    }

    /// Linearizable read: on the leader, confirms leadership with a quorum (read index) and
    /// waits until the state has applied it; returns `None`, and the caller reads local state.
    /// On a follower, returns a channel to the leader, and the caller forwards the read there.
    async fn read_barrier(&self) -> Result<Option<Channel>, Status> {
        match self.node.ensure_linearizable().await {
            Ok(()) => Ok(None),
            Err(ReadError::ForwardToLeader {
                leader_address: Some(address),
                ..
            }) => Ok(Some(self.channel_to(&address)?)),
            Err(error) => Err(Status::unavailable(format!(
                "linearizable read failed: {error}"
            ))),
        }
    }

    /// PERMISSION_DENIED unless `caller` holds `permission` in the project of fleet `fleet_id`
    /// (by this node's state; a fleet this node does not know yet passes here and is checked
    /// again where it is known, e.g. on the leader after forwarding).
    fn require_on_fleet(
        &self,
        who: &auth::Caller,
        permission: Permission,
        fleet_id: &str,
    ) -> Result<(), Status> {
        let project = self
            .node
            .state
            .read(|state| state.fleet(fleet_id).map(|f| f.spec.project.clone()));
        match project {
            Some(project) => who.require(permission, &project),
            None => Ok(()),
        }
    }

    fn fleet_or_not_found(
        &self,
        fleet_id: &str,
        view: convert::FleetView,
    ) -> Result<v1::Fleet, Status> {
        self.node
            .state
            .read(|state| {
                state.fleet(fleet_id).map(|f| {
                    let mut wire = convert::fleet_to_wire(f, view);
                    if let Some(flow) = wire.flow.as_mut() {
                        flow.limits = state.limits_applying_to(&f.spec.project);
                    }
                    wire
                })
            })
            .ok_or_else(|| {
                Status::not_found(format!("fleet_id: no fleet {:?}", shorten(fleet_id, 128)))
            })
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::FleetEvent, Status>> + Send>>;

#[tonic::async_trait]
impl FleetService for Api {
    async fn submit_fleet(
        &self,
        request: GrpcRequest<v1::SubmitFleetRequest>,
    ) -> Result<GrpcResponse<v1::SubmitFleetResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        let message = original.clone();
        if message.idempotency_key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(invalid(FieldError::new(
                "idempotency_key",
                format!("longer than {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
            )));
        }
        let spec =
            convert::fleet_spec_from_wire(message.spec, &self.spec_limits).map_err(invalid)?;
        who.require(Permission::FleetSubmit, &spec.project)?;
        self.policy
            .check(&spec, "spec")
            .map_err(|error| Status::permission_denied(error.to_string()))?;
        if message.dry_run {
            return Ok(GrpcResponse::new(v1::SubmitFleetResponse {
                fleet: None,
                created: false,
                preview: Some(self.preview(&spec)),
            }));
        }
        let span =
            info_span!("submit_fleet", fleet.name = %spec.name, runs = spec.repositories.len());
        let trace_parent = trace_parent(&span);
        let proposal = if flotilla_scheduler::staging::staged_bytes(&spec.repositories)
            > self.limits.max_submission_part_bytes as u64
        {
            self.propose_in_parts(spec, message.idempotency_key, trace_parent, who.principal())
                .instrument(span.clone())
                .await?
        } else {
            let command = Command::SubmitFleet {
                spec,
                idempotency_key: message.idempotency_key,
                trace_parent,
                max_events: self.limits.max_events_per_fleet,
            };
            self.propose(command, who.principal())
                .instrument(span.clone())
                .await?
        };
        match proposal {
            Proposal::Forward(channel) => {
                self.forward(
                    self.fleet_client(channel)
                        .submit_fleet(forwarded(original, &auth)),
                    0,
                )
                .await
            }
            Proposal::Applied(Response::IdempotencyKeyConflict { fleet_id }) => {
                Err(Status::already_exists(format!(
                    "idempotency_key: already used by fleet {fleet_id} with a different spec; \
                     use a new key to submit another fleet"
                )))
            }
            Proposal::Applied(Response::Rejected { reason }) => {
                Err(Status::failed_precondition(reason))
            }
            // A bounded queue of a limit is full: the same submission may succeed later.
            Proposal::Applied(Response::QueueFull { reason }) => {
                Err(Status::resource_exhausted(reason))
            }
            Proposal::Applied(Response::FleetSubmitted { fleet_id, created }) => {
                span.in_scope(|| info!(fleet.id = %fleet_id, created, "fleet submitted"));
                if created {
                    metrics::counter!("flotilla_fleets_submitted_total").increment(1);
                }
                let fleet = self.fleet_or_not_found(&fleet_id, convert::FleetView::Detail)?;
                Ok(GrpcResponse::new(v1::SubmitFleetResponse {
                    fleet: Some(fleet),
                    created,
                    preview: None,
                }))
            }
            Proposal::Applied(other) => {
                Err(Status::internal(format!("unexpected response {other:?}")))
            }
        }
    }

    async fn get_fleet(
        &self,
        request: GrpcRequest<v1::GetFleetRequest>,
    ) -> Result<GrpcResponse<v1::Fleet>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        let fleet_id = original.fleet_id.clone();
        validate_fleet_id(&fleet_id)?;
        if let Some(leader) = self.read_barrier().await? {
            return self
                .forward(
                    self.fleet_client(leader)
                        .get_fleet(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        let fleet = self.fleet_or_not_found(&fleet_id, convert::FleetView::Detail)?;
        self.require_on_fleet(&who, Permission::FleetRead, &fleet_id)?;
        Ok(GrpcResponse::new(fleet))
    }

    async fn list_fleets(
        &self,
        request: GrpcRequest<v1::ListFleetsRequest>,
    ) -> Result<GrpcResponse<v1::ListFleetsResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let message = request.into_inner();
        let original = message.clone();
        let page_size = convert::page_size(
            message.page_size,
            convert::LIST_FLEETS_DEFAULT_PAGE_SIZE,
            convert::LIST_FLEETS_MAX_PAGE_SIZE,
        )
        .map_err(invalid)?;
        let before = if message.page_token.is_empty() {
            u64::MAX
        } else {
            flotilla_scheduler::state::parse_fleet_id(&message.page_token).ok_or_else(|| {
                invalid(FieldError::new(
                    "page_token",
                    "not a token from a previous response",
                ))
            })?
        };
        if let Some(leader) = self.read_barrier().await? {
            return self
                .forward(
                    self.fleet_client(leader)
                        .list_fleets(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        // Only the fleets the caller may read (its project's, or all for an admin).
        let fleets: Vec<v1::Fleet> = self.node.state.read(|state| {
            state
                .fleets_before(before, usize::MAX)
                .filter(|f| who.may(Permission::FleetRead, &f.spec.project))
                .take(page_size)
                .map(|f| convert::fleet_to_wire(f, convert::FleetView::Summary))
                .collect()
        });
        let next_page_token = if fleets.len() == page_size {
            fleets.last().map(|f| f.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(GrpcResponse::new(v1::ListFleetsResponse {
            fleets,
            next_page_token,
        }))
    }

    type WatchFleetStream = EventStream;

    async fn watch_fleet(
        &self,
        request: GrpcRequest<v1::WatchFleetRequest>,
    ) -> Result<GrpcResponse<Self::WatchFleetStream>, Status> {
        let who = caller(&request)?;
        let message = request.into_inner();
        validate_fleet_id(&message.fleet_id)?;
        self.fleet_or_not_found(&message.fleet_id, convert::FleetView::Summary)?;
        self.require_on_fleet(&who, Permission::FleetRead, &message.fleet_id)?;
        let permit = self
            .watch_streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "more than {} watch streams (limits.max_watch_streams)",
                    self.limits.max_watch_streams
                ))
            })?;
        let (sender, receiver) = mpsc::channel(self.limits.watch_buffer_events.max(1));
        let state = self.node.state.clone();
        let mut changes = state.subscribe();
        let fleet_id = message.fleet_id;
        let mut after = message.after_sequence;
        tokio::spawn(async move {
            let _permit = permit;
            loop {
                let batch = state.read(|s| match s.fleet(&fleet_id) {
                    Some(fleet) => match fleet.events_after(after, WATCH_BATCH_EVENTS) {
                        Ok(events) => {
                            let events: Vec<v1::FleetEvent> =
                                events.map(|e| convert::event_to_wire(fleet, e)).collect();
                            let done = fleet.state != flotilla_scheduler::FleetState::Running
                                && after + events.len() as u64 >= fleet.last_sequence();
                            Ok((events, done))
                        }
                        Err(dropped) => Err(events_dropped_status(fleet, dropped)),
                    },
                    None => Ok((Vec::new(), true)),
                });
                let (events, done) = match batch {
                    Ok(batch) => batch,
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                };
                for event in events {
                    after = event.sequence;
                    if sender.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    () = sender.closed() => return,
                }
            }
        });
        Ok(GrpcResponse::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn list_runs(
        &self,
        request: GrpcRequest<v1::ListRunsRequest>,
    ) -> Result<GrpcResponse<v1::ListRunsResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        validate_fleet_id(&original.fleet_id)?;
        let fleet_number = flotilla_scheduler::state::parse_fleet_id(&original.fleet_id)
            .ok_or_else(|| invalid(FieldError::new("fleet_id", "not a fleet id (fl-<n>)")))?;
        let (filter, page_size) =
            convert::run_filter_from_wire(&original, fleet_number).map_err(invalid)?;
        if let Some(leader) = self.read_barrier().await? {
            return self
                .forward(
                    self.fleet_client(leader)
                        .list_runs(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        self.require_on_fleet(&who, Permission::FleetRead, &original.fleet_id)?;
        let page = self.node.state.read(|state| {
            state
                .fleet(&original.fleet_id)
                .map(|fleet| convert::list_runs(fleet, &filter, page_size))
        });
        let (runs, next_page_token) = page.ok_or_else(|| {
            Status::not_found(format!(
                "fleet_id: no fleet {:?}",
                shorten(&original.fleet_id, 128)
            ))
        })?;
        Ok(GrpcResponse::new(v1::ListRunsResponse {
            runs,
            next_page_token,
        }))
    }

    async fn get_run(
        &self,
        request: GrpcRequest<v1::GetRunRequest>,
    ) -> Result<GrpcResponse<v1::Run>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        let run_id = original.run_id.clone();
        if flotilla_scheduler::state::parse_run_id(&run_id).is_none() {
            return Err(invalid(FieldError::new(
                "run_id",
                format!("{run_id:?} is not a run id (fl-<n>-<i>)"),
            )));
        }
        if let Some(leader) = self.read_barrier().await? {
            return self
                .forward(
                    self.fleet_client(leader)
                        .get_run(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        if let Some((number, _)) = flotilla_scheduler::state::parse_run_id(&run_id) {
            self.require_on_fleet(
                &who,
                Permission::FleetRead,
                &flotilla_scheduler::state::fleet_id(number),
            )?;
        }
        let (mut run, artifacts) = self
            .node
            .state
            .read(|state| {
                state.run(&run_id).map(|(fleet, run)| {
                    (
                        convert::run_to_wire(fleet, run),
                        convert::run_artifacts(fleet, run),
                    )
                })
            })
            .ok_or_else(|| {
                Status::not_found(format!("run_id: no run {:?}", shorten(&run_id, 128)))
            })?;
        for (position, wanted) in artifacts {
            let Some(text) =
                crate::artifacts::load(&self.node, &wanted, self.peer_tls.as_ref()).await
            else {
                continue;
            };
            match position {
                Some(position) => {
                    if let Some(attempt) = run.attempts.get_mut(position) {
                        attempt.log_tail = text;
                    }
                }
                None => run.patch = text,
            }
        }
        Ok(GrpcResponse::new(run))
    }

    async fn cancel_fleet(
        &self,
        request: GrpcRequest<v1::CancelFleetRequest>,
    ) -> Result<GrpcResponse<v1::Fleet>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        validate_fleet_id(&original.fleet_id)?;
        // A submitter cancels the fleets it submitted; an operator (or admin) any fleet of its
        // project.
        let owner = self.node.state.read(|state| {
            state
                .fleet(&original.fleet_id)
                .map(|f| (f.spec.project.clone(), f.submitted_by.clone()))
        });
        if let Some((project, submitted_by)) = owner {
            who.require(Permission::FleetCancel, &project)?;
            let own = submitted_by.accessor_id() == Some(who.token.accessor_id.as_str());
            if !own {
                who.require(Permission::FleetCancelAny, &project)?;
            }
        }
        let command = Command::CancelFleet {
            fleet_id: original.fleet_id.clone(),
        };
        match self.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.forward(
                    self.fleet_client(channel)
                        .cancel_fleet(forwarded(original, &auth)),
                    0,
                )
                .await
            }
            Proposal::Applied(Response::FleetCancelled) => {
                info!(fleet.id = %original.fleet_id, "fleet cancelled");
                self.fleet_or_not_found(&original.fleet_id, convert::FleetView::Detail)
                    .map(GrpcResponse::new)
            }
            Proposal::Applied(Response::Rejected { reason }) => {
                Err(Status::not_found(format!("fleet_id: {reason}")))
            }
            Proposal::Applied(other) => {
                Err(Status::internal(format!("unexpected response {other:?}")))
            }
        }
    }

    async fn pause_fleet(
        &self,
        request: GrpcRequest<v1::FleetFlowRequest>,
    ) -> Result<GrpcResponse<v1::FleetFlowResponse>, Status> {
        self.change_flow(request, flow::FlowRequest::Pause).await
    }

    async fn resume_fleet(
        &self,
        request: GrpcRequest<v1::FleetFlowRequest>,
    ) -> Result<GrpcResponse<v1::FleetFlowResponse>, Status> {
        self.change_flow(request, flow::FlowRequest::Resume).await
    }

    async fn approve_fleet(
        &self,
        request: GrpcRequest<v1::FleetFlowRequest>,
    ) -> Result<GrpcResponse<v1::FleetFlowResponse>, Status> {
        self.change_flow(request, flow::FlowRequest::Approve).await
    }

    async fn rerun_fleet(
        &self,
        request: GrpcRequest<v1::RerunFleetRequest>,
    ) -> Result<GrpcResponse<v1::SubmitFleetResponse>, Status> {
        self.rerun(request).await
    }
}

/// OUT_OF_RANGE for a watcher that asked for events the fleet no longer keeps: names the bound
/// and where to resume, and carries the fleet's current summary so the client loses nothing it
/// could still learn.
fn events_dropped_status(
    fleet: &flotilla_scheduler::Fleet,
    dropped: flotilla_scheduler::state::EventsDropped,
) -> Status {
    let c = fleet.counts;
    Status::out_of_range(format!(
        "after_sequence: {dropped} (limits.max_events_per_fleet); fleet {} is {:?} with {} pending, \
         {} running, {} changed, {} unchanged, {} failed, {} cancelled, last sequence {}",
        fleet.id(),
        fleet.state,
        c.pending,
        c.running,
        c.changed,
        c.unchanged,
        c.failed,
        c.cancelled,
        fleet.last_sequence()
    ))
}

fn validate_fleet_id(fleet_id: &str) -> Result<(), Status> {
    if flotilla_scheduler::state::parse_fleet_id(fleet_id).is_none() {
        return Err(invalid(FieldError::new(
            "fleet_id",
            format!("{fleet_id:?} is not a fleet id (fl-<n>)"),
        )));
    }
    Ok(())
}

fn validate_worker_id(worker_id: &str) -> Result<(), Status> {
    if !flotilla_scheduler::spec::is_valid_name(worker_id) {
        return Err(invalid(FieldError::new(
            "worker_id",
            "must be 1-64 characters of [A-Za-z0-9._-]",
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl WorkerService for Api {
    async fn lease_runs(
        &self,
        request: GrpcRequest<v1::LeaseRunsRequest>,
    ) -> Result<GrpcResponse<v1::LeaseRunsResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        crate::tls::check_worker_id(&request, &self.cluster_id, &request.get_ref().worker_id)?;
        let original = request.into_inner();
        validate_worker_id(&original.worker_id)?;
        who.require_worker(&original.worker_id)?;
        if original.free_slots == 0 || original.free_slots > MAX_LEASE_SLOTS {
            return Err(invalid(FieldError::new(
                "free_slots",
                format!("must be between 1 and {MAX_LEASE_SLOTS}"),
            )));
        }
        if original.wait_ms > self.limits.max_lease_wait_ms {
            return Err(invalid(FieldError::new(
                "wait_ms",
                format!(
                    "must be at most {} (limits.max_lease_wait_ms)",
                    self.limits.max_lease_wait_ms
                ),
            )));
        }
        if original.held.len() > MAX_HEARTBEAT_LEASES {
            return Err(invalid(FieldError::new(
                "held",
                format!("more than {MAX_HEARTBEAT_LEASES} entries"),
            )));
        }
        let held: Vec<(String, u32)> = original
            .held
            .iter()
            .map(|lease| (lease.run_id.clone(), lease.attempt))
            .collect();
        let wait_ms = original.wait_ms;
        let _poll = self.lease_polls.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "more than {} lease requests wait on this node (limits.max_lease_polls); retry \
                 with backoff",
                self.limits.max_lease_polls
            ))
        })?;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        let mut changes = self.node.state.subscribe();
        loop {
            // Only propose when something can be leased, or when this worker holds leases it
            // did not list (their replies were lost: they are sent again at once, not after a
            // long poll). Idle polls do not grow the log.
            let now_ms = self.replicated_now_ms();
            let (eligible, retry_at_ms) = self.node.state.read(|s| {
                let (eligible, retry_at_ms) = s.lease_outlook(now_ms);
                (
                    eligible || s.has_unlisted_leases(&original.worker_id, &held),
                    retry_at_ms,
                )
            });
            if eligible {
                let command = Command::AcquireLeases {
                    worker_id: original.worker_id.clone(),
                    free_slots: original.free_slots,
                    lease_ttl_ms: self.limits.lease_ttl_ms,
                    held: held.clone(),
                };
                match self.propose(command, who.principal()).await? {
                    Proposal::Forward(channel) => {
                        return self
                            .forward(
                                self.worker_client(channel)
                                    .lease_runs(forwarded(original, &auth)),
                                wait_ms,
                            )
                            .await;
                    }
                    Proposal::Applied(Response::Leased(grants)) if !grants.is_empty() => {
                        self.leases.granted(
                            &self.node,
                            grants.iter().map(|g| (g.run_id.as_str(), g.attempt)),
                            self.limits.lease_ttl_ms,
                        );
                        let redelivered = grants.iter().filter(|g| g.redelivered).count() as u64;
                        metrics::counter!("flotilla_leases_granted_total")
                            .increment(grants.len() as u64 - redelivered);
                        if redelivered > 0 {
                            warn!(worker.id = %original.worker_id, count = redelivered, "sending leases again whose replies the worker did not receive");
                            metrics::counter!("flotilla_leases_redelivered_total")
                                .increment(redelivered);
                        }
                        let leases = grants
                            .into_iter()
                            .map(|g| {
                                let mut lease =
                                    convert::lease_to_wire(&g, self.limits.lease_ttl_ms);
                                secret::inject_secrets(self, &g, &mut lease);
                                lease
                            })
                            .collect();
                        return Ok(GrpcResponse::new(v1::LeaseRunsResponse { leases }));
                    }
                    Proposal::Applied(_) => {}
                }
            } else if let Some((leader_id, address)) = self.node.current_leader()
                && leader_id != self.node.node_id
            {
                // Followers see the state too, but the leader must stamp the lease.
                {
                    let channel = self.channel_to(&address)?;
                    return self
                        .forward(
                            self.worker_client(channel)
                                .lease_runs(forwarded(original, &auth)),
                            wait_ms,
                        )
                        .await;
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(GrpcResponse::new(v1::LeaseRunsResponse {
                    leases: Vec::new(),
                }));
            }
            // Wake on a state change, when a rate limit has its next unit, or after at most a
            // second (retry backoffs end by time).
            let mut wait = (deadline - now).min(Duration::from_secs(1));
            if let Some(at_ms) = retry_at_ms {
                wait = wait.min(Duration::from_millis(
                    at_ms.saturating_sub(now_ms).max(MIN_LEASE_POLL_WAKE_MS),
                ));
            }
            let _ = tokio::time::timeout(wait, changes.changed()).await;
        }
    }

    async fn heartbeat(
        &self,
        request: GrpcRequest<v1::HeartbeatRequest>,
    ) -> Result<GrpcResponse<v1::HeartbeatResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        crate::tls::check_worker_id(&request, &self.cluster_id, &request.get_ref().worker_id)?;
        let original = request.into_inner();
        validate_worker_id(&original.worker_id)?;
        who.require_worker(&original.worker_id)?;
        if original.leases.len() > MAX_HEARTBEAT_LEASES {
            return Err(invalid(FieldError::new(
                "leases",
                format!("more than {MAX_HEARTBEAT_LEASES} entries"),
            )));
        }
        // Not a log entry: the leader confirms its leadership (one read-index round shared by
        // concurrent heartbeats), then moves the deadlines in its memory (crate::leases).
        let term = match self.leases.confirm_leadership(&self.node).await {
            Ok(term) => term,
            Err(ReadError::ForwardToLeader {
                leader_address: Some(address),
                ..
            }) => {
                let channel = self.channel_to(&address)?;
                return self
                    .forward(
                        self.worker_client(channel)
                            .heartbeat(forwarded(original, &auth)),
                        0,
                    )
                    .await;
            }
            Err(ReadError::ForwardToLeader { .. }) => {
                return Err(Status::unavailable("no leader is known yet; retry shortly"));
            }
            Err(error) => {
                return Err(Status::unavailable(format!(
                    "leadership not confirmed: {error}; retry"
                )));
            }
        };
        let now_ms = self.leases.monotonic_ms();
        let lease_ttl_ms = self.limits.lease_ttl_ms;
        let lost = self.node.state.read(|state| {
            self.leases.with_term(term, |liveness| {
                let mut lost = Vec::new();
                for lease in &original.leases {
                    let held = state.lease_holder(&lease.run_id, lease.attempt)
                        == Some(original.worker_id.as_str());
                    // A lease past its deadline stays lost: its expiry is on the way.
                    if !(held && liveness.heard(&lease.run_id, lease.attempt, now_ms, lease_ttl_ms))
                    {
                        lost.push(lease.clone());
                    }
                }
                lost
            })
        });
        metrics::counter!("flotilla_heartbeats_total").increment(1);
        Ok(GrpcResponse::new(v1::HeartbeatResponse {
            lost,
            lease_ttl_ms,
        }))
    }

    async fn report_result(
        &self,
        request: GrpcRequest<v1::ReportResultRequest>,
    ) -> Result<GrpcResponse<v1::ReportResultResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        crate::tls::check_worker_id(&request, &self.cluster_id, &request.get_ref().worker_id)?;
        let original = request.into_inner();
        let message = original.clone();
        validate_worker_id(&message.worker_id)?;
        who.require_worker(&message.worker_id)?;
        if flotilla_scheduler::state::parse_run_id(&message.run_id).is_none() {
            return Err(invalid(FieldError::new(
                "run_id",
                format!("{:?} is not a run id", message.run_id),
            )));
        }
        if message.attempt == 0 {
            return Err(invalid(FieldError::new("attempt", "must be at least 1")));
        }
        let result = convert::attempt_result_from_wire(message.result, &self.result_limits)
            .map_err(invalid)?;
        let outcome = result.outcome;
        let command = Command::ReportResult {
            worker_id: message.worker_id.clone(),
            run_id: message.run_id.clone(),
            attempt: message.attempt,
            result,
        };
        match self.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.forward(
                    self.worker_client(channel)
                        .report_result(forwarded(original, &auth)),
                    0,
                )
                .await
            }
            Proposal::Applied(Response::ResultAccepted) => {
                metrics::counter!("flotilla_results_accepted_total", "outcome" => outcome.as_str())
                    .increment(1);
                Ok(GrpcResponse::new(v1::ReportResultResponse {
                    accepted: true,
                    reason: String::new(),
                }))
            }
            Proposal::Applied(Response::Rejected { reason }) => {
                warn!(run.id = %message.run_id, attempt = message.attempt, worker.id = %message.worker_id, %reason, "result rejected");
                metrics::counter!("flotilla_results_rejected_total").increment(1);
                // Not applied: the worker does not hold this lease (any more), or the attempt
                // is stale. An error, so no caller mistakes it for success.
                Err(Status::failed_precondition(format!(
                    "result not applied: {reason}"
                )))
            }
            Proposal::Applied(other) => {
                Err(Status::internal(format!("unexpected response {other:?}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn trace_parent_is_w3c_when_traced_and_empty_otherwise() {
        assert_eq!(trace_parent(&info_span!("untraced")), "");
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let value = trace_parent(&info_span!("submit_fleet"));
            let parts: Vec<&str> = value.split('-').collect();
            assert_eq!(parts.len(), 4, "{value}");
            assert_eq!(
                (parts[0], parts[1].len(), parts[2].len()),
                ("00", 32, 16),
                "{value}"
            );
        });
    }
}
