//! The worker runtime: leases runs from the cluster and supervises one ractor actor per run.
//!
//! ```text
//!   lease poller ──LeaseRuns (long poll)──▶ cluster        heartbeat ticker ──Heartbeat──▶ cluster
//!        │ Leased(lease, slot permit)                            │ Lost(leases)
//!        ▼                                                       ▼
//!   WorkerActor ──spawn_linked──▶ RunActor (one per run) ──▶ execute_attempt (sandbox, git)
//!        ▲            Finished(result)  │
//!        └──────────────────────────────┘      WorkerActor reports the result (ReportResult)
//! ```
//!
//! Supervision policy (ractor has no built-in restart strategies, so it is written here): a run
//! actor is never restarted. If it panics or stops without a result, the worker reports an
//! `infrastructure` failure (retryable) for that attempt, so the cluster retries the run as a new
//! attempt; a run never hangs on a dead actor. Free slots are counted with a semaphore: a permit
//! travels with each lease and is released when the run's actor ends.
//!
//! Results carry the attempt number (the fencing token); a result the cluster rejects as stale
//! is logged and dropped. Reports are retried with backoff for up to `report_retry_max_ms`,
//! while the heartbeat keeps the lease alive.
//!
//! Held leases: a map of `(run_id, attempt)` → the lease's [`LeaseDeadline`] sender. The lease
//! poller inserts a lease *before* handing it to the actor, and each lease request lists the
//! whole map (`LeaseRunsRequest.held`); the cluster sends again any lease it granted that the
//! worker does not list, so a lost reply costs neither an attempt nor a lease TTL. The poller is
//! one sequential loop, so a grant lost with reply N comes back with reply N+1 and the worker
//! never runs more than `slots` attempts; the actor ignores a `(run_id, attempt)` it already
//! runs. An entry leaves the map when the run's result was reported (or given up on) or when a
//! heartbeat says the lease is lost. A worker restarted under the same id gets its leases back
//! under the same attempt numbers.
//!
//! Lease validity: each lease's deadline is the send instant of the request that granted it or
//! of the last heartbeat that renewed it, plus `lease_ttl_ms` (see [`crate::lease`]). When it
//! passes, the run actor stops the attempt and reports it as a retryable `infrastructure`
//! failure, "lease could not be renewed": a worker that cannot prove it still holds a lease does
//! not keep working (or pushing) on it.
//!
//! Fault injection: [`WorkerSettings::fault_drop_lease_replies`] makes the poller discard that
//! many lease replies after they arrived, as if they were lost on the way (for tests of the
//! reconciliation above); it is 0 in production.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use flotilla_proto::v1::{self, HeldLease};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

use crate::config::WorkerConfig;
use crate::lease::{self, LeaseDeadline};

/// How the worker talks to the cluster.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Unique worker id: 1-64 characters of `[A-Za-z0-9._-]`.
    pub worker_id: String,
    /// gRPC endpoints of cluster nodes (`host:port`, or a URL whose scheme is replaced by
    /// `https` with [`WorkerSettings::tls`], `http` without); tried in turn on failure.
    pub endpoints: Vec<String>,
    /// Runs executed at once.
    pub slots: u32,
    /// Long-poll time of one lease request.
    pub lease_wait_ms: u64,
    /// Interval between heartbeats.
    pub heartbeat_interval_ms: u64,
    /// How long a result report is retried before it is given up (the lease then expires and
    /// the cluster retries the run).
    pub report_retry_max_ms: u64,
    /// Timeout of one unary RPC (lease requests add `lease_wait_ms`).
    pub rpc_timeout_ms: u64,
    /// Largest gRPC message sent or received, in bytes.
    pub max_message_bytes: usize,
    /// Fault-injection point, for tests only (0 in production): the lease poller discards this
    /// many lease replies that carried leases, after they arrived, as if they had been lost on
    /// the way. The cluster has committed those grants; lease reconciliation must deliver them
    /// again under the same attempts.
    pub fault_drop_lease_replies: u32,
    /// The worker's bearer token (a `worker` token bound to `worker_id`), sent on every call.
    /// Its slot may be filled after start (the node's own worker); until then calls fail with
    /// UNAUTHENTICATED and are retried with backoff.
    pub token: crate::client_auth::BearerToken,
    /// TLS of the connections to the nodes (the CA, and the worker's certificate
    /// `spiffe://<cluster_id>/worker/<worker_id>` when given); endpoints are then dialled as
    /// `https://`. `None`: plaintext.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            worker_id: "worker".into(),
            endpoints: vec!["http://127.0.0.1:7600".into()],
            slots: 2,
            lease_wait_ms: 10_000,
            heartbeat_interval_ms: 5_000,
            report_retry_max_ms: 300_000,
            rpc_timeout_ms: 10_000,
            max_message_bytes: 16 * 1024 * 1024,
            fault_drop_lease_replies: 0,
            token: crate::client_auth::BearerToken::default(),
            tls: None,
        }
    }
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// An endpoint is not a valid URI.
    #[error("endpoint {endpoint:?}: {message}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// What is wrong.
        message: String,
    },
    /// A setting is out of range.
    #[error("worker setting {field}: {message}")]
    Setting {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The sandbox capability probe ([`crate::probe`]) found a required mechanism missing.
    #[error("the sandbox capability probe refuses to start the worker: {0}")]
    Refused(String),
    /// The supervising actor could not be spawned.
    #[error("spawning the worker actor: {0}")]
    Spawn(String),
}

/// Rotating gRPC clients over the configured endpoints.
#[derive(Clone)]
struct Cluster {
    clients: Arc<Vec<WorkerServiceClient<crate::client_auth::AuthChannel>>>,
    current: Arc<Mutex<usize>>,
}

impl Cluster {
    fn new(settings: &WorkerSettings) -> Result<Self, WorkerError> {
        let mut clients = Vec::new();
        for endpoint in &settings.endpoints {
            let authority = endpoint
                .split_once("://")
                .map_or(endpoint.as_str(), |(_, authority)| authority);
            let scheme = if settings.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let mut channel =
                tonic::transport::Endpoint::from_shared(format!("{scheme}://{authority}"))
                    .map_err(|e| WorkerError::Endpoint {
                        endpoint: endpoint.clone(),
                        message: e.to_string(),
                    })?;
            if let Some(tls) = &settings.tls {
                channel = channel
                    .tls_config(tls.clone())
                    .map_err(|e| WorkerError::Endpoint {
                        endpoint: endpoint.clone(),
                        message: format!("TLS settings: {e}"),
                    })?;
            }
            let channel = channel
                .connect_timeout(Duration::from_secs(2))
                .connect_lazy();
            clients.push(
                WorkerServiceClient::new(settings.token.channel(channel))
                    .max_decoding_message_size(settings.max_message_bytes)
                    .max_encoding_message_size(settings.max_message_bytes),
            );
        }
        if clients.is_empty() {
            return Err(WorkerError::Setting {
                field: "endpoints",
                message: "must name at least one node".into(),
            });
        }
        Ok(Cluster {
            clients: Arc::new(clients),
            current: Arc::new(Mutex::new(0)),
        })
    }

    fn client(&self) -> WorkerServiceClient<crate::client_auth::AuthChannel> {
        let index = self.current.lock().map_or(0, |c| *c) % self.clients.len();
        self.clients[index].clone()
    }

    /// Moves to the next endpoint after a failure.
    fn rotate(&self) {
        if let Ok(mut current) = self.current.lock() {
            *current = (*current + 1) % self.clients.len();
        }
    }
}

/// One held lease: the sender of its deadline and its time-to-live.
struct HeldEntry {
    deadline: watch::Sender<tokio::time::Instant>,
    ttl: Duration,
}

/// Leases currently held (listed in lease requests and heartbeats): `(run_id, attempt)` →
/// deadline.
type HeldLeases = Arc<Mutex<BTreeMap<(String, u32), HeldEntry>>>;

fn held_list(held: &HeldLeases) -> Vec<HeldLease> {
    match held.lock() {
        Ok(held) => held
            .keys()
            .map(|(run_id, attempt)| HeldLease {
                run_id: run_id.clone(),
                attempt: *attempt,
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn release_held(held: &HeldLeases, run_id: &str, attempt: u32) {
    if let Ok(mut held) = held.lock() {
        held.remove(&(run_id.to_owned(), attempt));
    }
}

/// A running worker. Call [`WorkerHandle::stop`] to end it.
pub struct WorkerHandle {
    actor: ActorRef<WorkerMessage>,
    actor_task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Stops leasing, cancels running runs, and waits for the actors to end.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            task.abort();
            let _ = task.await;
        }
        let _ = self.actor.send_message(WorkerMessage::CancelAll);
        self.actor.stop(Some("worker stopping".into()));
        let _ = self.actor_task.await;
    }
}

/// Executes one leased attempt and returns its result; the cancellation receiver turns `true`
/// (or its sender is dropped) when the run must stop; the [`LeaseDeadline`] says how long the
/// worker can prove it holds the lease (writes to the origin must check it; the runtime itself
/// cancels the attempt when it passes). Production uses [`crate::execute::execute_attempt`];
/// tests substitute their own to exercise supervision.
pub type Executor = Arc<
    dyn Fn(
            v1::Lease,
            watch::Receiver<bool>,
            LeaseDeadline,
        ) -> futures::future::BoxFuture<'static, v1::RunResult>
        + Send
        + Sync,
>;

/// The worker's own check of a lease against its operator's policy, applied before anything
/// runs: `Err(message)` (naming the spec field, e.g. `spec.sandbox.driver: ...`) refuses the
/// lease as a non-retryable `infrastructure` failure.
pub type LeaseCheck = Arc<dyn Fn(&v1::Lease) -> Result<(), String> + Send + Sync>;

/// The production executor: [`crate::execute::execute_attempt`] with `execution`'s settings.
pub fn sandbox_executor(execution: WorkerConfig) -> Executor {
    sandbox_executor_with_check(execution, None)
}

/// [`sandbox_executor`] that first applies `check` (when given) to every lease; a refused lease
/// never reaches git or the sandbox.
pub fn sandbox_executor_with_check(execution: WorkerConfig, check: Option<LeaseCheck>) -> Executor {
    // Holds the mirror cache for the worker's lifetime, so that its index is built once.
    let mirrors = crate::git::mirror_cache(&execution);
    let execution = Arc::new(execution);
    Arc::new(move |lease, cancelled, deadline| {
        let execution = execution.clone();
        let _mirrors = mirrors.clone();
        let refusal = check.as_ref().and_then(|check| check(&lease).err());
        Box::pin(async move {
            if let Some(message) = refusal {
                return crate::execute::refused_by_policy(&execution, &lease, &message);
            }
            crate::execute::execute_attempt(&execution, &lease, cancelled, deadline).await
        })
    })
}

/// Starts the worker: its supervising actor, the lease poller and the heartbeat ticker.
///
/// # Errors
/// [`WorkerError`] for invalid settings, when the capability probe refuses this host
/// ([`WorkerError::Refused`]), or when the actor cannot be spawned.
pub async fn start(
    settings: WorkerSettings,
    execution: WorkerConfig,
) -> Result<WorkerHandle, WorkerError> {
    start_with_lease_check(settings, execution, None).await
}

/// [`start`] with the operator's policy check applied to every lease (see [`LeaseCheck`]).
///
/// # Errors
/// As [`start`].
pub async fn start_with_lease_check(
    settings: WorkerSettings,
    execution: WorkerConfig,
    check: Option<LeaseCheck>,
) -> Result<WorkerHandle, WorkerError> {
    if let Err(reason) = crate::probe::check_worker_start(&execution).await {
        return Err(WorkerError::Refused(reason));
    }
    start_with_executor(settings, sandbox_executor_with_check(execution, check)).await
}

/// [`start`] with an explicit [`Executor`].
///
/// # Errors
/// [`WorkerError`] for invalid settings or when the actor cannot be spawned.
pub async fn start_with_executor(
    settings: WorkerSettings,
    executor: Executor,
) -> Result<WorkerHandle, WorkerError> {
    if settings.slots == 0 || settings.slots > 1024 {
        return Err(WorkerError::Setting {
            field: "slots",
            message: "must be between 1 and 1024".into(),
        });
    }
    if settings.heartbeat_interval_ms == 0 {
        return Err(WorkerError::Setting {
            field: "heartbeat_interval_ms",
            message: "must be positive".into(),
        });
    }
    let cluster = Cluster::new(&settings)?;
    let held: HeldLeases = Arc::new(Mutex::new(BTreeMap::new()));
    let arguments = WorkerArguments {
        settings: settings.clone(),
        executor,
        cluster: cluster.clone(),
        held: held.clone(),
    };
    let (actor, actor_task) = Actor::spawn(None, WorkerActor, arguments)
        .await
        .map_err(|e| WorkerError::Spawn(e.to_string()))?;
    let (stop, stop_receiver) = watch::channel(false);
    let slots = Arc::new(Semaphore::new(settings.slots as usize));
    let tasks = vec![
        tokio::spawn(lease_poller(
            settings.clone(),
            cluster.clone(),
            slots,
            held.clone(),
            actor.clone(),
            stop_receiver.clone(),
        )),
        tokio::spawn(heartbeat_ticker(
            settings.clone(),
            cluster,
            held,
            actor.clone(),
            stop_receiver,
        )),
    ];
    info!(worker.id = %settings.worker_id, slots = settings.slots, "worker started");
    Ok(WorkerHandle {
        actor,
        actor_task,
        stop,
        tasks,
    })
}

/// Messages of the supervising worker actor.
pub enum WorkerMessage {
    /// A new lease, the slot it occupies and its deadline.
    Leased(Box<v1::Lease>, OwnedSemaphorePermit, LeaseDeadline),
    /// A run actor finished its attempt.
    Finished {
        /// The run actor.
        actor_id: ActorId,
        /// What happened.
        result: Box<v1::RunResult>,
    },
    /// The cluster says these leases are no longer held: stop their runs.
    Lost(Vec<HeldLease>),
    /// A run actor ended; reap it if it left no result.
    Reap(ActorId),
    /// Cancel every run (shutdown).
    CancelAll,
}

struct WorkerActor;

struct WorkerArguments {
    settings: WorkerSettings,
    executor: Executor,
    cluster: Cluster,
    held: HeldLeases,
}

struct RunEntry {
    lease: v1::Lease,
    cancel: watch::Sender<bool>,
    _slot: OwnedSemaphorePermit,
}

struct WorkerState {
    arguments: WorkerArguments,
    runs: HashMap<ActorId, RunEntry>,
}

impl WorkerState {
    /// Removes the run's entry (freeing its slot) and reports `result` in the background.
    fn finish(&mut self, actor_id: ActorId, result: v1::RunResult) {
        let Some(entry) = self.runs.remove(&actor_id) else {
            return;
        };
        let settings = self.arguments.settings.clone();
        let cluster = self.arguments.cluster.clone();
        let held = self.arguments.held.clone();
        tokio::spawn(async move {
            report(&settings, &cluster, &entry.lease, result).await;
            release_held(&held, &entry.lease.run_id, entry.lease.attempt);
        });
    }
}

impl Actor for WorkerActor {
    type Msg = WorkerMessage;
    type State = WorkerState;
    type Arguments = WorkerArguments;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        arguments: WorkerArguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(WorkerState {
            arguments,
            runs: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WorkerMessage::Leased(lease, slot, deadline) => {
                if state.runs.values().any(|entry| {
                    entry.lease.run_id == lease.run_id && entry.lease.attempt == lease.attempt
                }) {
                    warn!(run.id = %lease.run_id, attempt = lease.attempt, "lease already running; duplicate ignored");
                    return Ok(());
                }
                let (cancel, cancelled) = watch::channel(false);
                let arguments = RunArguments {
                    lease: (*lease).clone(),
                    executor: state.arguments.executor.clone(),
                    cancelled,
                    deadline,
                    parent: myself.clone(),
                };
                match Actor::spawn_linked(None, RunActor, arguments, myself.get_cell()).await {
                    Ok((run, _)) => {
                        state.runs.insert(
                            run.get_id(),
                            RunEntry {
                                lease: *lease,
                                cancel,
                                _slot: slot,
                            },
                        );
                    }
                    Err(error) => {
                        let result =
                            infrastructure(format!("could not start the run actor: {error}"));
                        let settings = state.arguments.settings.clone();
                        let cluster = state.arguments.cluster.clone();
                        let held = state.arguments.held.clone();
                        tokio::spawn(async move {
                            report(&settings, &cluster, &lease, result).await;
                            release_held(&held, &lease.run_id, lease.attempt);
                        });
                    }
                }
            }
            WorkerMessage::Finished { actor_id, result } => state.finish(actor_id, *result),
            WorkerMessage::Reap(actor_id) => {
                state.finish(
                    actor_id,
                    infrastructure("the run actor stopped without a result".into()),
                );
            }
            WorkerMessage::Lost(lost) => {
                for entry in state.runs.values() {
                    if lost
                        .iter()
                        .any(|l| l.run_id == entry.lease.run_id && l.attempt == entry.lease.attempt)
                    {
                        warn!(run.id = %entry.lease.run_id, attempt = entry.lease.attempt, "lease lost; cancelling the run");
                        let _ = entry.cancel.send(true);
                    }
                }
            }
            WorkerMessage::CancelAll => {
                for entry in state.runs.values() {
                    let _ = entry.cancel.send(true);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                warn!(%error, "run actor failed");
                state.finish(
                    cell.get_id(),
                    infrastructure(format!("the run actor panicked: {error}")),
                );
            }
            // `Finished` may still be queued behind this event: reap after it.
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                let _ = myself.send_message(WorkerMessage::Reap(cell.get_id()));
            }
            _ => {}
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for entry in state.runs.values() {
            let _ = entry.cancel.send(true);
        }
        Ok(())
    }
}

fn infrastructure(error: String) -> v1::RunResult {
    v1::RunResult {
        outcome: v1::AttemptOutcome::Infrastructure as i32,
        exit_code: -1,
        error,
        retryable: true,
        ..Default::default()
    }
}

/// One run attempt.
struct RunActor;

struct RunArguments {
    lease: v1::Lease,
    executor: Executor,
    cancelled: watch::Receiver<bool>,
    deadline: LeaseDeadline,
    parent: ActorRef<WorkerMessage>,
}

/// The result of an attempt stopped because its lease deadline passed: a retryable
/// infrastructure failure, keeping what the attempt produced.
fn lease_not_renewed(mut result: v1::RunResult) -> v1::RunResult {
    let detail = if result.error.is_empty() {
        String::new()
    } else {
        format!(" (the attempt then ended with: {})", result.error)
    };
    result.error = format!(
        "lease could not be renewed: no heartbeat renewed it within lease_ttl_ms, so the worker stopped the attempt{detail}"
    );
    result.set_outcome(v1::AttemptOutcome::Infrastructure);
    result.exit_code = -1;
    result.retryable = true;
    result
}

/// Messages of a run actor.
enum RunMessage {
    /// The attempt's execution ended.
    Done(Box<v1::RunResult>),
}

impl Actor for RunActor {
    type Msg = RunMessage;
    type State = ActorRef<WorkerMessage>;
    type Arguments = RunArguments;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        arguments: RunArguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let RunArguments {
            lease,
            executor,
            mut cancelled,
            deadline,
            parent,
        } = arguments;
        let span = info_span!("run", fleet.id = %lease.fleet_id, run.id = %lease.run_id, attempt = lease.attempt, repository = %lease.repository);
        continue_trace(&span, &lease.trace_parent);
        let (run_id, attempt) = (lease.run_id.clone(), lease.attempt);
        // Execution runs in its own task so the mailbox never blocks on it; a panic in it
        // becomes an infrastructure failure. The watchdog stops it when the lease deadline
        // passes.
        tokio::spawn(async move {
            let (stop, stopped) = watch::channel(false);
            let mut watchdog = deadline.clone();
            let mut execution_task =
                tokio::spawn(executor(lease, stopped, deadline).instrument(span));
            let mut lease_lost = false;
            let joined = tokio::select! {
                joined = &mut execution_task => joined,
                () = async {
                    // Cancelled, or the owner of the sender is gone (wait_for errs).
                    let _ = cancelled.wait_for(|cancelled| *cancelled).await;
                } => {
                    let _ = stop.send(true);
                    execution_task.await
                }
                () = watchdog.passed() => {
                    warn!(run.id = %run_id, attempt, "lease could not be renewed in time; stopping the attempt");
                    lease_lost = true;
                    let _ = stop.send(true);
                    execution_task.await
                }
            };
            let mut result = match joined {
                Ok(result) => result,
                Err(error) => infrastructure(format!("the attempt's execution panicked: {error}")),
            };
            if lease_lost {
                result = lease_not_renewed(result);
            }
            drop(stop);
            let _ = myself.send_message(RunMessage::Done(Box::new(result)));
        });
        Ok(parent)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        parent: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let RunMessage::Done(result) = message;
        let _ = parent.send_message(WorkerMessage::Finished {
            actor_id: myself.get_id(),
            result,
        });
        myself.stop(None);
        Ok(())
    }
}

/// Makes `span` a child of the submission's span given as a W3C `traceparent` (no-op when empty
/// or when no OpenTelemetry layer is installed).
fn continue_trace(span: &tracing::Span, trace_parent: &str) {
    use opentelemetry::propagation::TextMapPropagator as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if trace_parent.is_empty() {
        return;
    }
    let carrier: HashMap<String, String> =
        [("traceparent".to_string(), trace_parent.to_string())].into();
    let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(parent);
}

/// Start of the error reported in place of a result the cluster refused as invalid.
const REFUSED_RESULT: &str = "the cluster refused the attempt's result as invalid";

/// Sends one result, retrying transient failures with backoff for up to `report_retry_max_ms`.
/// A result refused as invalid (`INVALID_ARGUMENT`, e.g. a log tail above the cluster's limit)
/// is replaced by a final `infrastructure` failure naming the refusal, so the run moves on.
async fn report(
    settings: &WorkerSettings,
    cluster: &Cluster,
    lease: &v1::Lease,
    result: v1::RunResult,
) {
    let mut outcome = result.outcome();
    let mut request = v1::ReportResultRequest {
        worker_id: settings.worker_id.clone(),
        run_id: lease.run_id.clone(),
        attempt: lease.attempt,
        result: Some(result),
    };
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(settings.report_retry_max_ms);
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut client = cluster.client();
        let call = client.report_result(request.clone());
        match tokio::time::timeout(Duration::from_millis(settings.rpc_timeout_ms), call).await {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                if response.accepted {
                    info!(run.id = %lease.run_id, attempt = lease.attempt, outcome = outcome.as_str_name(), "result accepted");
                } else {
                    warn!(run.id = %lease.run_id, attempt = lease.attempt, reason = %response.reason, "result rejected by the cluster");
                }
                return;
            }
            Ok(Err(status))
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::PermissionDenied
                ) =>
            {
                // The cluster did not apply it (a stale attempt, a lease this worker no longer
                // holds): sending it again cannot change that.
                warn!(run.id = %lease.run_id, attempt = lease.attempt, %status, "result rejected by the cluster");
                return;
            }
            Ok(Err(status)) if status.code() == tonic::Code::InvalidArgument => {
                if outcome == v1::AttemptOutcome::Infrastructure
                    && request
                        .result
                        .as_ref()
                        .is_some_and(|r| r.error.starts_with(REFUSED_RESULT))
                {
                    warn!(run.id = %lease.run_id, %status, "result refused as invalid; not retried");
                    return;
                }
                // The same result would be refused again (and the lease, still held by the
                // cluster, sent again): report a minimal final failure instead.
                warn!(run.id = %lease.run_id, %status, "result refused as invalid; reporting that instead");
                let error = format!("{REFUSED_RESULT}: {}", status.message());
                outcome = v1::AttemptOutcome::Infrastructure;
                request.result = Some(v1::RunResult {
                    outcome: outcome as i32,
                    exit_code: -1,
                    error,
                    retryable: false,
                    ..Default::default()
                });
                continue;
            }
            Ok(Err(status)) => {
                warn!(run.id = %lease.run_id, %status, "reporting the result failed; retrying")
            }
            Err(_) => warn!(run.id = %lease.run_id, "reporting the result timed out; retrying"),
        }
        cluster.rotate();
        if tokio::time::Instant::now() + backoff > deadline {
            warn!(run.id = %lease.run_id, "giving up reporting the result; the lease will expire");
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Asks for as many runs as there are free slots, one long poll at a time, listing the leases
/// held; records each granted lease in `held` before handing it to the actor.
async fn lease_poller(
    settings: WorkerSettings,
    cluster: Cluster,
    slots: Arc<Semaphore>,
    held: HeldLeases,
    actor: ActorRef<WorkerMessage>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut faults_left = settings.fault_drop_lease_replies;
    if !settings.token.is_set() {
        // The node's own worker starts before the cluster has made its token.
        info!("waiting for the worker token before asking for leases");
        tokio::select! {
            () = settings.token.wait_until_set() => {}
            _ = stop.changed() => return,
        }
    }
    loop {
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let mut permits = vec![first];
        while let Ok(permit) = slots.clone().try_acquire_owned() {
            permits.push(permit);
        }
        let request = v1::LeaseRunsRequest {
            worker_id: settings.worker_id.clone(),
            free_slots: permits.len() as u32,
            wait_ms: settings.lease_wait_ms,
            held: held_list(&held),
        };
        let mut client = cluster.client();
        let timeout = Duration::from_millis(settings.lease_wait_ms + settings.rpc_timeout_ms);
        // The cluster stamps the grant after this instant: the lease is valid until at least
        // sent_at + lease_ttl_ms.
        let sent_at = tokio::time::Instant::now();
        let response = tokio::select! {
            response = tokio::time::timeout(timeout, client.lease_runs(request)) => response,
            _ = stop.changed() => return,
        };
        match response {
            Ok(Ok(response)) => {
                backoff = Duration::from_millis(100);
                let leases = response.into_inner().leases;
                if !leases.is_empty() && faults_left > 0 {
                    faults_left -= 1;
                    warn!(
                        count = leases.len(),
                        "fault injection: discarding a lease reply (fault_drop_lease_replies)"
                    );
                    continue;
                }
                for lease in leases {
                    let ttl = Duration::from_millis(lease.lease_ttl_ms);
                    let key = (lease.run_id.clone(), lease.attempt);
                    let deadline = match held.lock() {
                        Ok(mut held) => match held.get(&key) {
                            Some(entry) => {
                                // Already running here: only renew it.
                                lease::extend(&entry.deadline, sent_at + ttl);
                                warn!(run.id = %lease.run_id, attempt = lease.attempt, "lease sent again for a run already held; renewed");
                                None
                            }
                            None => {
                                if permits.is_empty() {
                                    warn!(run.id = %lease.run_id, "the cluster leased more runs than slots asked for");
                                    break;
                                }
                                let (sender, deadline) = LeaseDeadline::channel(sent_at + ttl);
                                held.insert(
                                    key,
                                    HeldEntry {
                                        deadline: sender,
                                        ttl,
                                    },
                                );
                                Some(deadline)
                            }
                        },
                        Err(_) => return,
                    };
                    let Some(deadline) = deadline else {
                        continue;
                    };
                    let Some(permit) = permits.pop() else {
                        break;
                    };
                    info!(run.id = %lease.run_id, attempt = lease.attempt, repository = %lease.repository, "leased");
                    if actor
                        .send_message(WorkerMessage::Leased(Box::new(lease), permit, deadline))
                        .is_err()
                    {
                        return;
                    }
                }
            }
            Ok(Err(status)) => {
                warn!(%status, "lease request failed");
                cluster.rotate();
                drop(permits);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(_) => {
                warn!("lease request timed out");
                cluster.rotate();
            }
        }
    }
}

/// Renews held leases every `heartbeat_interval_ms` (moving their deadlines to the heartbeat's
/// send instant + TTL); tells the actor which ones were lost.
async fn heartbeat_ticker(
    settings: WorkerSettings,
    cluster: Cluster,
    held: HeldLeases,
    actor: ActorRef<WorkerMessage>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(Duration::from_millis(settings.heartbeat_interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let leases = held_list(&held);
        if leases.is_empty() {
            continue;
        }
        let mut client = cluster.client();
        let request = v1::HeartbeatRequest {
            worker_id: settings.worker_id.clone(),
            leases: leases.clone(),
        };
        let sent_at = tokio::time::Instant::now();
        match tokio::time::timeout(
            Duration::from_millis(settings.rpc_timeout_ms),
            client.heartbeat(request),
        )
        .await
        {
            Ok(Ok(response)) => {
                let response = response.into_inner();
                let lost = response.lost;
                if let Ok(mut held) = held.lock() {
                    for lease in &lost {
                        held.remove(&(lease.run_id.clone(), lease.attempt));
                    }
                    for lease in &leases {
                        if let Some(entry) = held.get(&(lease.run_id.clone(), lease.attempt)) {
                            let ttl = if response.lease_ttl_ms > 0 {
                                Duration::from_millis(response.lease_ttl_ms)
                            } else {
                                entry.ttl
                            };
                            lease::extend(&entry.deadline, sent_at + ttl);
                        }
                    }
                }
                if !lost.is_empty() {
                    let _ = actor.send_message(WorkerMessage::Lost(lost));
                }
            }
            Ok(Err(status)) => {
                warn!(%status, "heartbeat failed");
                cluster.rotate();
            }
            Err(_) => {
                warn!("heartbeat timed out");
                cluster.rotate();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    #[test]
    fn a_run_span_continues_the_submission_trace() {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let submission = info_span!("submit_fleet");
            let parent = submission.context().span().span_context().clone();
            assert!(parent.is_valid());
            let trace_parent = format!("00-{}-{}-01", parent.trace_id(), parent.span_id());
            let run = info_span!("run");
            continue_trace(&run, &trace_parent);
            assert_eq!(
                run.context().span().span_context().trace_id(),
                parent.trace_id()
            );
            // Without a trace parent the run starts its own trace.
            let other = info_span!("run");
            continue_trace(&other, "");
            assert_ne!(
                other.context().span().span_context().trace_id(),
                parent.trace_id()
            );
        });
    }
}
