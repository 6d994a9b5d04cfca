//! `flotilla server`: one cluster node. Opens the Raft node on RocksDB, serves gRPC (API,
//! workers, Raft, reflection) and HTTP (metrics, health, dashboard), runs the leader's lease
//! expiry timer, and (unless disabled) a local worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use flotilla_proto::v1::audit_service_server::AuditServiceServer;
use flotilla_proto::v1::cluster_service_server::ClusterServiceServer;
use flotilla_proto::v1::fleet_service_server::FleetServiceServer;
use flotilla_proto::v1::token_service_server::TokenServiceServer;
use flotilla_proto::v1::worker_service_server::WorkerServiceServer;
use flotilla_raft::{RaftNode, RaftNodeConfig};
use flotilla_scheduler::{Command, Principal, Request};
use flotilla_worker::client_auth::BearerToken;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::api::Api;
use crate::config::ServerConfig;

/// A started node. Dropping it does not stop it: call [`RunningServer::shutdown`].
pub struct RunningServer {
    /// Bound gRPC address.
    pub grpc_address: SocketAddr,
    /// Bound HTTP address, if enabled.
    pub http_address: Option<SocketAddr>,
    /// The Raft node.
    pub node: Arc<RaftNode>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    worker: Option<flotilla_worker::actor::WorkerHandle>,
}

impl RunningServer {
    /// Stops the worker (its runs are cancelled), the servers and Raft, and waits for them.
    pub async fn shutdown(mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop().await;
        }
        let _ = self.shutdown.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        if let Err(error) = self.node.shutdown().await {
            warn!(%error, "raft shutdown failed");
        }
    }

    /// Resolves when shutdown was requested through [`RunningServer::shutdown_signal`].
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

/// Starts a node with `config` and returns once it serves. With no peers configured it
/// initializes a single-node cluster on first start (later starts reuse the stored membership).
///
/// # Errors
/// Invalid configuration, an unusable data directory, or an address that cannot be bound.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    config.validate()?;
    let node_tls = crate::tls::NodeTls::load(&config.tls, &config.cluster_id, config.node_id)
        .context("transport security ([tls])")?;
    let peer_tls = node_tls.as_ref().map(crate::tls::NodeTls::client_config);
    if node_tls.is_none() {
        warn!("tls.insecure: gRPC is plaintext and unauthenticated; for local development only");
    }
    std::fs::create_dir_all(&config.data_directory)
        .with_context(|| format!("data_directory {}", config.data_directory.display()))?;
    let grpc_listener = TcpListener::bind(&config.listen_address)
        .await
        .with_context(|| format!("listen_address {}", config.listen_address))?;
    let grpc_address = grpc_listener.local_addr()?;
    let advertise_address = if config.advertise_address.is_empty() {
        grpc_address.to_string()
    } else {
        config.advertise_address.clone()
    };
    let node = Arc::new(
        flotilla_raft::open(RaftNodeConfig {
            node_id: config.node_id,
            advertise_address: advertise_address.clone(),
            data_directory: config.data_directory.clone(),
            heartbeat_interval_ms: config.raft.heartbeat_interval_ms,
            election_timeout_min_ms: config.raft.election_timeout_min_ms,
            election_timeout_max_ms: config.raft.election_timeout_max_ms,
            snapshot_logs_since_last: config.raft.snapshot_logs_since_last,
            resample_election_timeout: config.raft.resample_election_timeout,
            cluster_id: config.cluster_id.clone(),
            security: flotilla_raft::TransportSecurity {
                client_tls: peer_tls.clone(),
                authorize_peer: node_tls
                    .as_ref()
                    .map(|_| crate::tls::raft_authorizer(&config.cluster_id)),
            },
            proposals: flotilla_raft::proposer::ProposerSettings {
                max_batch_requests: config.raft.max_batch_requests,
                max_batch_size_bytes: config.raft.max_batch_size_bytes,
                max_queued_requests: config.raft.max_queued_proposals,
                max_in_flight_batches: config.raft.max_in_flight_batches,
            },
            ..RaftNodeConfig::default()
        })
        .await
        .context("opening the Raft node")?,
    );
    let members = config.cluster.members()?;
    if !members.is_empty() {
        let initialized = node
            .initialize_cluster(members)
            .await
            .context("initializing the cluster from cluster.initial_members")?;
        info!(initialized, "cluster formation from initial members");
    } else if !config.cluster.join {
        node.initialize_single_node()
            .await
            .context("initializing the single-node cluster")?;
    } else {
        info!("waiting to be added to a cluster (cluster.join)");
    }

    let bootstrap_token =
        crate::api::token::load_or_create_bootstrap_token(&config.bootstrap_token_file())?;
    let (shutdown, shutdown_receiver) = watch::channel(false);
    let mut tasks = Vec::new();

    let clock = Arc::new(
        crate::clock::LeaderClock::from_environment().map_err(|error| anyhow::anyhow!(error))?,
    );
    let keyring = Arc::new(
        crate::secrets::Keyring::load(
            Some(config.secrets.key_file.as_path()).filter(|path| !path.as_os_str().is_empty()),
            &config.secrets.previous_key_files,
        )
        .context("loading the secrets keys (secrets.key_file, secrets.previous_key_files)")?,
    );
    match keyring.current_key_id() {
        Some(key_id) => info!(%key_id, "secrets enabled"),
        None => info!("secrets disabled: no secrets.key_file"),
    }
    let leases = Arc::new(crate::leases::LeaderLeases::new(
        config.limits.lease_grace_after_election_ms,
    ));
    let api = Api::new(node.clone(), &config.limits, clock.clone())
        .with_leases(leases.clone())
        .with_policy(config.policy.clone())
        .with_transport(&config.cluster_id, peer_tls.clone())
        .with_keyring(keyring.clone());
    let secrets_api =
        crate::api::secret::SecretsApi::new(api.clone(), keyring, config.secrets.clone());
    let hook_sources = crate::http::hooks::HookSources::load(&config.webhooks)
        .context("loading the webhook secrets (webhooks.sources)")?;
    let events_api =
        crate::api::event::EventApi::new(api.clone(), hook_sources, config.webhooks.clone());
    let max_bytes = config.limits.max_request_bytes;
    // Both reflection protocols: grpc.reflection.v1 (grpcurl 1.9+, current tonic clients) and
    // grpc.reflection.v1alpha (Python's grpcio-reflection, older grpcurl, Postman).
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flotilla_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("gRPC reflection v1")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flotilla_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("gRPC reflection v1alpha")?;
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = &node_tls {
        server = server
            .tls_config(tls.server_config())
            .context("tls: the certificate or key cannot be used")?;
    }
    // Default deny: every method passes the permission table (api::auth). Node-only methods
    // need a node certificate; only an insecure (plaintext) node has none to check.
    let auth_layer = crate::api::auth::AuthLayer::new(
        node.clone(),
        clock.clone(),
        &config.cluster_id,
        node_tls.is_none(),
    );
    let intake = crate::http::Intake {
        events: events_api.clone(),
        auth: auth_layer.clone(),
    };
    let router = server
        .layer(auth_layer)
        .add_service(
            TokenServiceServer::new(api.clone())
                .max_decoding_message_size(max_bytes)
                .max_encoding_message_size(max_bytes),
        )
        .add_service(
            AuditServiceServer::new(api.clone())
                .max_decoding_message_size(max_bytes)
                .max_encoding_message_size(max_bytes),
        )
        .add_service(
            FleetServiceServer::new(api.clone())
                .max_decoding_message_size(max_bytes)
                .max_encoding_message_size(max_bytes),
        )
        .add_service(
            flotilla_proto::v1::schedule_service_server::ScheduleServiceServer::new(
                crate::api::schedule::ScheduleApi::new(api.clone()),
            )
            .max_decoding_message_size(max_bytes)
            .max_encoding_message_size(max_bytes),
        )
        .add_service(
            flotilla_proto::v1::limit_service_server::LimitServiceServer::new(
                crate::api::limit::LimitApi::new(api.clone()),
            )
            .max_decoding_message_size(max_bytes)
            .max_encoding_message_size(max_bytes),
        )
        .add_service(
            flotilla_proto::v1::event_service_server::EventServiceServer::new(events_api.clone())
                .max_decoding_message_size(max_bytes)
                .max_encoding_message_size(max_bytes),
        )
        .add_service(
            flotilla_proto::v1::secret_service_server::SecretServiceServer::new(secrets_api)
                .max_decoding_message_size(max_bytes)
                .max_encoding_message_size(max_bytes),
        )
        .add_service(
            WorkerServiceServer::new(api)
                .max_decoding_message_size(max_bytes)
                .max_encoding_message_size(max_bytes),
        )
        .add_service(ClusterServiceServer::new(
            crate::cluster::Cluster::new(node.clone()).with_peer_tls(peer_tls.clone()),
        ))
        .add_service(node.grpc_service())
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let mut grpc_shutdown = shutdown_receiver.clone();
    tasks.push(tokio::spawn(async move {
        // TCP_NODELAY on every accepted connection: without it, Nagle's algorithm holds a
        // reply's last small HTTP/2 frame until the peer's delayed ACK (about 40 ms), which
        // was the p99 of single-client writes and Raft round trips.
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
            |accepted| {
                if let Ok(stream) = &accepted
                    && let Err(error) = stream.set_nodelay(true)
                {
                    warn!(%error, "could not set TCP_NODELAY on an accepted connection");
                }
                accepted
            },
        );
        let signal = async move {
            let _ = grpc_shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(error) = router.serve_with_incoming_shutdown(incoming, signal).await {
            warn!(%error, "gRPC server failed");
        }
    }));

    let http_address = if config.http_listen_address.is_empty() {
        None
    } else {
        let listener = TcpListener::bind(&config.http_listen_address)
            .await
            .with_context(|| format!("http_listen_address {}", config.http_listen_address))?;
        let address = listener.local_addr()?;
        let metrics = crate::metrics_handle();
        tasks.push(tokio::spawn(crate::http::serve(
            listener,
            node.clone(),
            metrics,
            Some(intake),
            shutdown_receiver.clone(),
        )));
        Some(address)
    };

    tasks.push(tokio::spawn(leader_housekeeping_loop(
        node.clone(),
        clock,
        leases,
        config.limits.clone(),
        bootstrap_token.clone(),
        shutdown_receiver.clone(),
    )));

    let worker = if config.worker.enabled {
        // The node's own worker presents the node's certificate.
        let endpoint = crate::tls::url(&advertise_address, peer_tls.is_some());
        let token = BearerToken::default();
        let token_file = config.worker_token_file();
        if token_file.exists() {
            let text = flotilla_worker::client_auth::read_token_file(&token_file)
                .with_context(|| format!("worker.token_file {}", token_file.display()))?;
            token
                .set(&text)
                .with_context(|| format!("worker.token_file {}", token_file.display()))?;
        } else {
            tasks.push(tokio::spawn(provision_worker_token(
                endpoint.clone(),
                bootstrap_token,
                config.worker_id(),
                token_file,
                token.clone(),
                peer_tls.clone(),
                shutdown_receiver.clone(),
            )));
        }
        Some(start_worker(&config, vec![endpoint], token, peer_tls.clone()).await?)
    } else {
        None
    };
    info!(%grpc_address, ?http_address, node_id = config.node_id, data_directory = %config.data_directory.display(), "flotilla node serving");
    Ok(RunningServer {
        grpc_address,
        http_address,
        node,
        shutdown,
        tasks,
        worker,
    })
}

/// Starts a worker with `config`'s `[worker]` settings that leases from `endpoints`
/// (`host:port` or URLs), over `tls` when given (else plaintext), keeping mirrors and logs
/// under `data_directory/worker`.
///
/// # Errors
/// Invalid worker settings.
pub async fn start_worker(
    config: &ServerConfig,
    endpoints: Vec<String>,
    token: BearerToken,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> anyhow::Result<flotilla_worker::actor::WorkerHandle> {
    let settings = flotilla_worker::actor::WorkerSettings {
        token,
        worker_id: config.worker_id(),
        endpoints,
        slots: config.worker.slots,
        lease_wait_ms: config.worker.lease_wait_ms,
        heartbeat_interval_ms: config.worker.heartbeat_interval_ms,
        max_message_bytes: config.limits.max_request_bytes,
        rpc_timeout_ms: config.worker.rpc_timeout_ms,
        tls,
        ..flotilla_worker::actor::WorkerSettings::default()
    };
    let execution = flotilla_worker::config::WorkerConfig {
        work_directory: config.data_directory.join("worker"),
        log_max_bytes: config.worker.log_max_bytes,
        log_tail_bytes: config.worker.log_tail_bytes,
        patch_max_bytes: config.worker.patch_max_bytes,
        default_memory_limit_bytes: config.worker.default_memory_limit_bytes,
        default_pids_limit: config.worker.default_pids_limit,
        push_lease_margin_ms: config.worker.push_lease_margin_ms,
        branch_prefix: config.limits.branch_prefix.clone(),
        mirror_cache_max_mirrors: config.worker.mirror_cache_max_mirrors,
        mirror_cache_max_bytes: config.worker.mirror_cache_max_bytes,
        egress: config.worker.egress.clone(),
        static_push_tokens: config
            .push_credentials
            .static_tokens
            .iter()
            .map(|entry| flotilla_worker::credentials::StaticToken {
                url_prefix: entry.url_prefix.clone(),
                token_file: entry.token_file.clone(),
                username: entry.username.clone(),
            })
            .collect(),
        sandbox_uid_base: config.sandbox.sandbox_uid_base,
        sandbox_uid_count: config.sandbox.sandbox_uid_count,
        sandbox_init_path: (!config.sandbox.sandbox_init_path.as_os_str().is_empty())
            .then(|| config.sandbox.sandbox_init_path.clone()),
        sandbox_staging_directory: config.sandbox.sandbox_staging_directory.clone(),
        allow_without_landlock: config.sandbox.allow_without_landlock,
        allow_without_cgroup_limits: config.sandbox.allow_without_cgroup_limits,
        allow_without_disk_quota: config.sandbox.allow_without_disk_quota,
        memory_limit_max_bytes: config.sandbox.memory_limit_max_bytes,
        pids_limit_max: config.sandbox.pids_limit_max,
        default_cpu_limit_millicores: config.sandbox.default_cpu_limit_millicores,
        cpu_limit_max_millicores: config.sandbox.cpu_limit_max_millicores,
        total_memory_limit_bytes: config.sandbox.total_memory_limit_bytes,
        total_pids_limit: config.sandbox.total_pids_limit,
        total_cpu_limit_millicores: config.sandbox.total_cpu_limit_millicores,
        default_disk_limit_bytes: config.sandbox.default_disk_limit_bytes,
        disk_limit_max_bytes: config.sandbox.disk_limit_max_bytes,
        disk_reserve_bytes: config.sandbox.disk_reserve_bytes,
        tmp_size_bytes: config.sandbox.tmp_size_bytes,
        ..flotilla_worker::config::WorkerConfig::default()
    };
    flotilla_worker::actor::start_with_lease_check(
        settings,
        execution,
        Some(worker_policy_check(config.policy.clone())),
    )
    .await
    .context("starting the worker")
}

/// The worker's own application of the operator's policy to a lease (it never trusts the
/// cluster to have checked): the sandbox request, every repository of the spec and the lease's
/// own repository; for a local repository, its canonical path (symbolic links resolved) must lie
/// under `policy.file_roots`. Errors name the field (`spec.sandbox.driver: ...`).
pub fn worker_policy_check(
    policy: flotilla_scheduler::ExecutionPolicy,
) -> flotilla_worker::actor::LeaseCheck {
    std::sync::Arc::new(move |lease: &flotilla_proto::v1::Lease| {
        let wire = lease.spec.clone().unwrap_or_default();
        let sandbox = wire.sandbox.clone().unwrap_or_default();
        let sandbox = flotilla_scheduler::spec::SandboxSpec {
            driver: if sandbox.driver.is_empty() {
                "bwrap".into()
            } else {
                sandbox.driver
            },
            timeout_ms: sandbox.timeout_ms,
            memory_limit_bytes: sandbox.memory_limit_bytes,
            pids_limit: sandbox.pids_limit,
            network: sandbox.network,
            cpu_limit_millicores: sandbox.cpu_limit_millicores,
            disk_limit_bytes: sandbox.disk_limit_bytes,
        };
        policy
            .check_sandbox(&sandbox, "spec.sandbox")
            .map_err(|error| error.to_string())?;
        for (index, url) in wire.repositories.iter().enumerate() {
            policy
                .check_repository(url)
                .map_err(|message| format!("spec.repositories[{index}]: {message}"))?;
        }
        policy
            .check_repository(&lease.repository)
            .map_err(|message| format!("lease.repository: {message}"))?;
        let local = lease.repository.strip_prefix("file://").or_else(|| {
            lease
                .repository
                .starts_with('/')
                .then_some(lease.repository.as_str())
        });
        // A path that does not resolve (missing) is left to the clone, which fails retryably
        // as before; one that resolves must stay under the roots.
        if let Some(canonical) = local.and_then(|path| std::fs::canonicalize(path).ok()) {
            policy
                .check_local_path(&canonical)
                .map_err(|message| format!("lease.repository: {message}"))?;
        }
        Ok(())
    })
}

/// Gets the node's own worker a token: once the cluster is bootstrapped, creates a `worker` token
/// bound to `worker_id` through `endpoint` with the bootstrap admin token, writes it to
/// `token_file` (mode 0600) and hands it to the worker. Retries until it succeeds or the node
/// stops; a bootstrap token the cluster does not know (another node's file won the bootstrap)
/// is reported, and the operator must provide `worker.token_file`.
async fn provision_worker_token(
    endpoint: String,
    bootstrap_token: String,
    worker_id: String,
    token_file: std::path::PathBuf,
    token: BearerToken,
    tls: Option<tonic::transport::ClientTlsConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    use flotilla_proto::v1::token_service_client::TokenServiceClient;
    let admin = match BearerToken::new(&bootstrap_token) {
        Ok(admin) => admin,
        Err(error) => {
            warn!(%error, "the bootstrap token cannot be sent");
            return;
        }
    };
    let mut warned = false;
    // The bootstrap token is committed moments after the first leader is elected: ask again
    // soon at first (the node's worker waits for this token), then every 500 ms.
    let mut backoff = Duration::from_millis(20);
    loop {
        let attempt = async {
            let channel = crate::tls::endpoint(&endpoint, tls.as_ref())
                .map_err(|error| anyhow::anyhow!(error))?
                .connect_timeout(Duration::from_secs(2))
                .connect()
                .await?;
            let response = TokenServiceClient::new(admin.channel(channel))
                .create_token(flotilla_proto::v1::CreateTokenRequest {
                    name: format!("worker-{worker_id}"),
                    role: "worker".into(),
                    project: String::new(),
                    worker_id: worker_id.clone(),
                    ttl_ms: 0,
                })
                .await?;
            anyhow::Ok(response.into_inner().secret_token)
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(secret_token)) => {
                if let Err(error) = crate::api::token::write_token_file(&token_file, &secret_token)
                {
                    warn!(%error, path = %token_file.display(), "could not save the worker token; it is used for this process only");
                }
                if let Err(error) = token.set(&secret_token) {
                    warn!(%error, "the worker token cannot be sent");
                }
                info!(worker.id = %worker_id, path = %token_file.display(), "the node's worker has its token");
                return;
            }
            Ok(Err(error)) => {
                let unauthenticated = error
                    .downcast_ref::<tonic::Status>()
                    .is_some_and(|s| s.code() == tonic::Code::Unauthenticated);
                if unauthenticated && !warned {
                    warned = true;
                    warn!(%error, "the bootstrap token is not (yet) valid in this cluster; the node's worker waits for it or for worker.token_file");
                }
            }
            Err(_) => {}
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// The leader's periodic duties, every `limits.lease_check_interval_ms`: the pure
/// [`flotilla_scheduler::engine::tick`] decides (bootstrap token, expiry of the leases whose
/// deadline in `leases` passed, compaction) from the state, replicated time ([`crate::clock`])
/// and this node's monotonic clock; this loop only proposes what it returns. An idle cluster
/// writes nothing, and heartbeats never write.
async fn leader_housekeeping_loop(
    node: Arc<RaftNode>,
    clock: Arc<crate::clock::LeaderClock>,
    leases: Arc<crate::leases::LeaderLeases>,
    limits: crate::config::LimitsSection,
    bootstrap_token: String,
    mut shutdown: watch::Receiver<bool>,
) {
    let bootstrap = crate::api::token::bootstrap_command(&bootstrap_token).ok();
    let settings = flotilla_scheduler::engine::EngineSettings {
        lease_ttl_ms: limits.lease_ttl_ms,
        fleet_retention_ms: limits.fleet_retention_ms,
        compaction_batch_fleets: limits.compaction_batch_fleets,
        max_events_per_fleet: limits.max_events_per_fleet,
    };
    let mut ticker = tokio::time::interval(Duration::from_millis(limits.lease_check_interval_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (leader, term) = {
            let metrics = node.raft.metrics();
            let metrics = metrics.borrow();
            (metrics.current_leader, metrics.current_term)
        };
        if leader != Some(node.node_id) {
            leases.clear();
            continue;
        }
        let now = crate::clock::replicated_now_ms(&clock, &node);
        let tick = flotilla_scheduler::engine::Tick {
            now_ms: now,
            monotonic_ms: leases.monotonic_ms(),
            bootstrap: bootstrap.as_ref(),
        };
        // The state's lock first, then the tracker's, as the heartbeat handler takes them.
        let commands = node.state.read(|state| {
            leases.with_term(term, |liveness| {
                flotilla_scheduler::engine::tick(state, &settings, &tick, liveness)
            })
        });
        let timeout = Duration::from_millis(limits.proposal_timeout_ms);
        for command in commands {
            if let Command::ExpireSilentLeases { leases: silent } = &command {
                warn!(count = silent.len(), "expiring leases no heartbeat renewed");
            }
            let write = node.write(Request {
                now_ms: now,
                command,
                principal: Principal::Node {
                    node_id: node.node_id,
                },
            });
            match tokio::time::timeout(timeout, write).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => warn!(%error, "proposing a housekeeping command failed"),
                Err(_) => warn!(
                    timeout_ms = limits.proposal_timeout_ms,
                    "a housekeeping command was not applied in time (limits.proposal_timeout_ms)"
                ),
            }
        }
    }
}

#[cfg(test)]
mod worker_policy_tests {
    use super::*;
    use flotilla_proto::v1;

    fn lease(repository: &str, driver: &str) -> v1::Lease {
        v1::Lease {
            repository: repository.into(),
            spec: Some(v1::FleetSpec {
                repositories: vec![repository.into()],
                sandbox: Some(v1::SandboxSpec {
                    driver: driver.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_worker_applies_its_own_policy_to_leases() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("allowed");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(allowed.join("repo")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
        let policy = flotilla_scheduler::ExecutionPolicy {
            file_roots: vec![std::fs::canonicalize(&allowed).unwrap()],
            ..Default::default()
        };
        let check = worker_policy_check(policy);
        let inside = allowed.join("repo");
        assert_eq!(check(&lease(inside.to_str().unwrap(), "bwrap")), Ok(()));
        let error = check(&lease(inside.to_str().unwrap(), "none")).unwrap_err();
        assert!(error.starts_with("spec.sandbox.driver:"), "{error}");
        let error = check(&lease(outside.to_str().unwrap(), "")).unwrap_err();
        assert!(error.starts_with("spec.repositories[0]:"), "{error}");
        // A symbolic link under the root that leads outside it: refused by its canonical path.
        let link = allowed.join("link");
        let error = check(&lease(link.to_str().unwrap(), "")).unwrap_err();
        assert!(error.starts_with("lease.repository:"), "{error}");
        assert!(
            error.contains("outside the operator's file roots"),
            "{error}"
        );
    }
}
