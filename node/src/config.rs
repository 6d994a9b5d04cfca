//! Server configuration: defaults, then a TOML file, then `FLOTILLA_*` environment variables
//! and command-line flags (in `main.rs`). Unknown keys are rejected with their path.
//!
//! Every limit has a name, a default and a key here; README.md's configuration section lists
//! them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole server configuration. `flotilla server --print-config` prints it as TOML.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// This node's Raft id, unique in the cluster, at least 1.
    pub node_id: u64,
    /// Cluster id: the trust domain of the cluster's certificates, sent with and required of
    /// every Raft message (1-63 of `[a-z0-9.-]`).
    pub cluster_id: String,
    /// Where Raft's RocksDB, snapshots and the worker's mirrors and logs live.
    pub data_directory: PathBuf,
    /// gRPC listen address (API, workers, Raft).
    pub listen_address: String,
    /// Address other nodes and workers use to reach this node; defaults to `listen_address`.
    pub advertise_address: String,
    /// HTTP listen address (metrics, health, dashboard); empty disables it.
    pub http_listen_address: String,
    /// Cluster formation.
    pub cluster: ClusterSection,
    /// Raft timing and snapshots.
    pub raft: RaftSection,
    /// Request and state limits.
    pub limits: LimitsSection,
    /// The node's own worker.
    pub worker: WorkerSection,
    /// The worker's sandbox hardening (uids, required mechanisms, limit ceilings, totals).
    pub sandbox: SandboxSection,
    /// Logs and traces.
    pub telemetry: TelemetrySection,
    /// The operator's execution policy: what fleets may ask of workers (drivers, network
    /// modes, repository URLs, resource ceilings). Applied at submission by this node and at
    /// lease time by its worker; see [`flotilla_scheduler::policy`].
    pub policy: flotilla_scheduler::ExecutionPolicy,
    /// API tokens: the bootstrap admin token.
    pub auth: AuthSection,
    /// Transport security of the gRPC port and outgoing connections.
    pub tls: TlsSection,
    /// Secrets: key-encryption keys and limits.
    pub secrets: SecretsSection,
    /// Push credentials of the node's worker.
    pub push_credentials: PushCredentialsSection,
    /// Webhook sources and delivery limits (`POST /hooks/<source>`).
    pub webhooks: WebhooksSection,
}

/// Authentication settings (see `api::token` for the bootstrap design).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// File holding the bootstrap admin token (`flotilla_<accessor>_<secret>`). While the cluster
    /// has no bootstrap, the leader proposes this token as the first admin token. Created (mode
    /// 0600) with a fresh token when missing. Empty: `<data_directory>/bootstrap-token`.
    pub bootstrap_token_file: PathBuf,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            node_id: 1,
            cluster_id: flotilla_raft::node::DEFAULT_CLUSTER_ID.to_string(),
            data_directory: default_data_directory(),
            listen_address: "127.0.0.1:7600".into(),
            advertise_address: String::new(),
            http_listen_address: "127.0.0.1:7601".into(),
            cluster: ClusterSection::default(),
            raft: RaftSection::default(),
            limits: LimitsSection::default(),
            worker: WorkerSection::default(),
            sandbox: SandboxSection::default(),
            telemetry: TelemetrySection::default(),
            policy: flotilla_scheduler::ExecutionPolicy::default(),
            auth: AuthSection::default(),
            tls: TlsSection::default(),
            secrets: SecretsSection::default(),
            push_credentials: PushCredentialsSection::default(),
            webhooks: WebhooksSection::default(),
        }
    }
}

/// Secrets (`node/src/secrets.rs`): the key-encryption keys, outside the replicated state, and
/// the limits on what the state holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsSection {
    /// The current key-encryption key's file (`flotilla secret keygen`, mode 0600). Empty:
    /// secrets are disabled on this node (setting one fails, and a lease naming one fails,
    /// retryably). Every node must hold the same file.
    pub key_file: PathBuf,
    /// Older key files, used only to decrypt secrets not yet re-wrapped by `flotilla secret
    /// rotate`.
    pub previous_key_files: Vec<PathBuf>,
    /// Most secrets in one project.
    pub max_secrets_per_project: u32,
    /// Most secrets in the cluster.
    pub max_secrets_total: u32,
    /// Largest secret value, in bytes (at least 8 bytes, see `MIN_SECRET_VALUE_BYTES`).
    pub max_value_bytes: usize,
}

impl Default for SecretsSection {
    fn default() -> Self {
        SecretsSection {
            key_file: PathBuf::new(),
            previous_key_files: Vec::new(),
            max_secrets_per_project: 100,
            max_secrets_total: 10_000,
            max_value_bytes: 16 * 1024,
        }
    }
}

/// How a webhook source proves its deliveries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookKind {
    /// GitHub: `X-Hub-Signature-256` (HMAC-SHA256 of the body), `X-GitHub-Delivery`,
    /// `X-GitHub-Event`.
    Github,
    /// GitLab: `X-Gitlab-Token` (the secret itself), `Idempotency-Key` or
    /// `X-Gitlab-Event-UUID`, `X-Gitlab-Event`.
    Gitlab,
    /// Standard Webhooks (<https://www.standardwebhooks.com/>): `webhook-id`,
    /// `webhook-timestamp`, `webhook-signature` (`v1,<base64 HMAC-SHA256>`, several allowed).
    Standard,
}

/// One webhook source: deliveries to `POST /hooks/<name>` are verified with its secrets and
/// seen by the rules of its project.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSource {
    /// 1-64 characters of `[A-Za-z0-9._-]`, the URL's last segment; not `api` (the name of
    /// events published through the API).
    pub name: String,
    /// How its deliveries are signed.
    pub kind: WebhookKind,
    /// The project whose rules see its events.
    #[serde(default = "default_webhook_project")]
    pub project: String,
    /// Files holding the shared secret (one line each; mode 0600). A delivery is accepted when
    /// it verifies under any of them, so a secret is rotated by adding the new file, changing
    /// it at the sender, then removing the old one. Standard Webhooks secrets are `whsec_`
    /// followed by base64.
    pub secret_files: Vec<PathBuf>,
}

fn default_webhook_project() -> String {
    flotilla_scheduler::spec::DEFAULT_PROJECT.to_owned()
}

/// Webhooks: the sources this node accepts and the bounds on deliveries. Every node of a
/// cluster should list the same sources with the same secrets (any node may receive a
/// delivery; a follower passes it to the leader, which verifies it again itself).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksSection {
    /// The sources; none: `/hooks/*` answers 404.
    pub sources: Vec<WebhookSource>,
    /// Largest request body, bytes (413 beyond). 1024 to 26214400 (GitHub's own cap, 25 MiB),
    /// and at most `limits.max_request_bytes` (a follower forwards the body over gRPC).
    pub max_body_bytes: usize,
    /// Standard Webhooks: a `webhook-timestamp` further than this from the node's clock is
    /// refused (replay protection). 1000 to 3600000; default 5 minutes.
    pub timestamp_tolerance_ms: u64,
    /// How long accepted deliveries are remembered for dedup, ms (a redelivery after it starts
    /// fleets again). 60000 to 31622400000; default 7 days.
    pub delivery_retention_ms: u64,
    /// Most delivery records kept (the oldest go first). 1 to 10000000.
    pub max_deliveries: u32,
    /// Refused deliveries this node remembers (in memory, for `flotilla event deliveries`).
    /// 0 to 100000.
    pub max_refused_remembered: usize,
}

impl Default for WebhooksSection {
    fn default() -> Self {
        WebhooksSection {
            sources: Vec::new(),
            max_body_bytes: 1024 * 1024,
            timestamp_tolerance_ms: 300_000,
            delivery_retention_ms:
                flotilla_scheduler::event::delivery::DEFAULT_DELIVERY_RETENTION_MS,
            max_deliveries: flotilla_scheduler::event::delivery::DEFAULT_MAX_DELIVERIES,
            max_refused_remembered: 1_000,
        }
    }
}

/// One static push credential: the token in `token_file` is used for every repository URL that
/// starts with `url_prefix` (the longest matching prefix wins).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StaticTokenEntry {
    /// URL prefix, e.g. `https://git.example.com/team/`.
    pub url_prefix: String,
    /// File holding the token (mode 0600), one line.
    pub token_file: PathBuf,
    /// HTTP Basic user name sent with the token; empty: `x-access-token` (GitHub's convention).
    pub username: String,
}

/// Push credentials of the node's worker: a credential broker mints one per attempt and the
/// worker hands it to host-side `git push` through a transient credential helper. With no
/// entry, pushes carry no credential (file:// and ssh:// with the host's own keys still work).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushCredentialsSection {
    /// Static tokens per URL prefix (the `static` broker).
    pub static_tokens: Vec<StaticTokenEntry>,
}

fn default_data_directory() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(home) => Path::new(&home).join(".local/share/flotilla"),
        None => PathBuf::from("flotilla-data"),
    }
}

/// How the node finds its cluster on first start.
///
/// - `initial_members` empty and `join` false (the default): a fresh node initializes a
///   single-node cluster (later nodes are added with `flotilla cluster add`);
/// - `initial_members` set: every listed node, started with the same list, initializes the
///   cluster with those voters if its store is fresh (first formation only: a node whose data
///   was lost must rejoin with `join` instead, or it would found a second cluster);
/// - `join` true: the node waits, uninitialized, until a member adds it.
///
/// On later starts the stored membership is used and these settings are ignored.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// Initial voters as `"<node_id>=<host:port>"`, this node included.
    pub initial_members: Vec<String>,
    /// Start uninitialized and wait to be added.
    pub join: bool,
}

impl ClusterSection {
    /// Parses `initial_members` into node id -> address.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the entry.
    pub fn members(&self) -> Result<std::collections::BTreeMap<u64, String>, ConfigError> {
        let mut members = std::collections::BTreeMap::new();
        for entry in &self.initial_members {
            let invalid = |message: String| ConfigError::Invalid {
                field: "cluster.initial_members",
                message,
            };
            let (id, address) = entry
                .split_once('=')
                .ok_or_else(|| invalid(format!("{entry:?} is not <node_id>=<host:port>")))?;
            let id: u64 =
                id.trim().parse().ok().filter(|id| *id > 0).ok_or_else(|| {
                    invalid(format!("{entry:?}: node id must be a positive integer"))
                })?;
            let address = address.trim();
            if address.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(format!(
                    "{entry:?}: {address:?} is not an IP:port socket address"
                )));
            }
            if members.insert(id, address.to_string()).is_some() {
                return Err(invalid(format!("node id {id} is listed twice")));
            }
        }
        Ok(members)
    }
}

/// Raft settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftSection {
    /// Leader heartbeat interval.
    pub heartbeat_interval_ms: u64,
    /// Election timeout lower bound.
    pub election_timeout_min_ms: u64,
    /// Election timeout upper bound.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Draw a fresh election timeout for every campaign (Flotilla's timer); false uses
    /// openraft 0.9's own timer, which draws once per node.
    pub resample_election_timeout: bool,
    /// Group commit: most writes in one log entry.
    pub max_batch_requests: usize,
    /// Group commit: most encoded bytes of the writes in one log entry (a larger write goes
    /// alone).
    pub max_batch_size_bytes: usize,
    /// Writes waiting to be proposed on the leader; more are refused with RESOURCE_EXHAUSTED.
    pub max_queued_proposals: usize,
    /// Log entries proposed and not yet applied at once.
    pub max_in_flight_batches: usize,
}

impl Default for RaftSection {
    fn default() -> Self {
        RaftSection {
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            snapshot_logs_since_last: 10_000,
            resample_election_timeout: true,
            max_batch_requests: flotilla_raft::proposer::DEFAULT_MAX_BATCH_REQUESTS,
            max_batch_size_bytes: flotilla_raft::proposer::DEFAULT_MAX_BATCH_SIZE_BYTES,
            max_queued_proposals: flotilla_raft::proposer::DEFAULT_MAX_QUEUED_REQUESTS,
            max_in_flight_batches: flotilla_raft::proposer::DEFAULT_MAX_IN_FLIGHT_BATCHES,
        }
    }
}

/// Limits on requests and on what the state holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Largest gRPC request accepted, in bytes.
    pub max_request_bytes: usize,
    /// Most repositories in one fleet.
    pub max_runs_per_fleet: usize,
    /// Largest task text.
    pub max_task_bytes: usize,
    /// Largest log tail a worker may report.
    pub max_log_tail_bytes: usize,
    /// Largest patch a worker may report.
    pub max_patch_bytes: usize,
    /// Longest a lease long poll may wait.
    pub max_lease_wait_ms: u64,
    /// Event stream buffer per watcher; a watcher that falls this far behind is slowed down.
    pub watch_buffer_events: usize,
    /// Most concurrent WatchFleet streams on this node.
    pub max_watch_streams: usize,
    /// Time-to-live of a lease without heartbeat, in milliseconds (deadlines kept in the leader's
    /// memory, not in the log).
    pub lease_ttl_ms: u64,
    /// After this node becomes leader, the leases it finds are not expired for this long, in
    /// milliseconds (grace for workers to find the new leader).
    pub lease_grace_after_election_ms: u64,
    /// How often the leader looks for expired leases and compactable fleets.
    pub lease_check_interval_ms: u64,
    /// Longest wait for the leader's answer to a forwarded request (plus the long-poll time for
    /// lease requests).
    pub forward_timeout_ms: u64,
    /// How long an ended fleet (its runs, events, idempotency key) is kept before it is
    /// compacted away.
    pub fleet_retention_ms: u64,
    /// Most fleets compacted by one command.
    pub compaction_batch_fleets: u32,
    /// Most progress events a fleet keeps; older ones are dropped first, and a watcher that
    /// asks for a dropped one gets OUT_OF_RANGE with the fleet's summary. Stamped into each
    /// submission by the leader, so every replica applies the same bound.
    pub max_events_per_fleet: u32,
    /// Most lease long polls (`LeaseRuns`) waiting on this node at once; more are answered
    /// RESOURCE_EXHAUSTED, and the worker retries with backoff.
    pub max_lease_polls: usize,
    /// Longest a write proposed on this node waits to be committed and applied; then the
    /// request fails with UNAVAILABLE (the write may still commit: retries are idempotent).
    pub proposal_timeout_ms: u64,
    /// Every fleet's branches must start with this prefix (checked for each repository at
    /// submission, naming `spec.branch_template`); workers refuse to push anywhere else.
    /// Non-empty, ends with `/`.
    pub branch_prefix: String,
    /// A submission whose repository URLs take more than this many bytes is written to the
    /// Raft log in parts of at most this size (`StageRepositories`, then `SubmitStagedFleet`),
    /// so that no log entry grows with the fleet (openraft 0.9 gives an AppendEntries one
    /// heartbeat interval). 4096-8388608.
    pub max_submission_part_bytes: usize,
    /// Most schedules in the cluster (`CreateSchedule` beyond it is RESOURCE_EXHAUSTED).
    /// 1-100000.
    pub max_schedules: u32,
    /// Most event rules in the cluster (`CreateEventRule` beyond it is RESOURCE_EXHAUSTED).
    /// 1-10000.
    pub max_event_rules: u32,
    /// Most rate and concurrency limits in the cluster (`CreateLimit` beyond it is
    /// RESOURCE_EXHAUSTED). Each is looked at for every run a lease request considers, so
    /// the bound keeps that work small. 1-1024.
    pub max_limits: u32,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_request_bytes: 16 * 1024 * 1024,
            max_runs_per_fleet: 10_000,
            max_task_bytes: 64 * 1024,
            max_log_tail_bytes: 64 * 1024,
            max_patch_bytes: 1024 * 1024,
            max_lease_wait_ms: 30_000,
            watch_buffer_events: 256,
            max_watch_streams: 1024,
            lease_ttl_ms: 30_000,
            lease_grace_after_election_ms: 30_000,
            lease_check_interval_ms: 1_000,
            forward_timeout_ms: 5_000,
            fleet_retention_ms: 7 * 24 * 3_600_000,
            compaction_batch_fleets: 100,
            max_events_per_fleet: 100_000,
            max_lease_polls: 1024,
            proposal_timeout_ms: 10_000,
            branch_prefix: flotilla_scheduler::spec::DEFAULT_BRANCH_PREFIX.into(),
            max_submission_part_bytes: 512 * 1024,
            max_schedules: flotilla_scheduler::schedule::record::DEFAULT_MAX_SCHEDULES,
            max_event_rules: flotilla_scheduler::event::rule::DEFAULT_MAX_EVENT_RULES,
            max_limits: flotilla_scheduler::limit::DEFAULT_MAX_LIMITS,
        }
    }
}

/// The worker embedded in the node.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSection {
    /// Run a worker in this process.
    pub enabled: bool,
    /// Runs executed at once.
    pub slots: u32,
    /// Worker id; empty means `node-<node_id>`.
    pub worker_id: String,
    /// Long-poll time of a lease request.
    pub lease_wait_ms: u64,
    /// Heartbeat interval; must be well below `limits.lease_ttl_ms`.
    pub heartbeat_interval_ms: u64,
    /// Default cgroup memory limit of a sandbox.
    pub default_memory_limit_bytes: u64,
    /// Default cgroup pids limit of a sandbox.
    pub default_pids_limit: u32,
    /// Full log kept per attempt on the worker's disk.
    pub log_max_bytes: u64,
    /// Log tail sent with each result.
    pub log_tail_bytes: usize,
    /// Patch size sent with each result.
    pub patch_max_bytes: usize,
    /// Timeout of one worker RPC (lease requests add `lease_wait_ms`); the worker then tries
    /// the next endpoint.
    pub rpc_timeout_ms: u64,
    /// A push (or a branch deletion) starts only while the worker's own view of the lease has
    /// at least this long to run; 0 (the default): a third of the lease's TTL. When set, below
    /// `limits.lease_ttl_ms - heartbeat_interval_ms`.
    pub push_lease_margin_ms: u64,
    /// Most repository mirrors kept on disk; the least recently used mirror not in use is
    /// removed beyond it.
    pub mirror_cache_max_mirrors: usize,
    /// Most bytes of repository mirrors kept on disk (same eviction).
    pub mirror_cache_max_bytes: u64,
    /// Egress of runs with `network: true` (`[worker.egress]`): host allowlist, address
    /// exceptions, static hosts, proxy limits. Default: nothing allowed.
    pub egress: flotilla_worker::egress::EgressConfig,
    /// File holding this worker's token (a `worker` token bound to its worker id). Empty:
    /// `<data_directory>/worker-token`; a node's own worker creates it there with the bootstrap
    /// admin token when it is missing (a worker-only process must be given one).
    pub token_file: PathBuf,
}

impl Default for WorkerSection {
    fn default() -> Self {
        // The sandbox and log defaults are the worker crate's own, so a node's worker and a
        // worker-only process behave alike.
        let worker = flotilla_worker::config::WorkerConfig::default();
        let settings = flotilla_worker::actor::WorkerSettings::default();
        WorkerSection {
            enabled: true,
            slots: std::thread::available_parallelism().map_or(2, |n| n.get() as u32),
            worker_id: String::new(),
            lease_wait_ms: settings.lease_wait_ms,
            heartbeat_interval_ms: settings.heartbeat_interval_ms,
            default_memory_limit_bytes: worker.default_memory_limit_bytes,
            default_pids_limit: worker.default_pids_limit,
            log_max_bytes: worker.log_max_bytes,
            log_tail_bytes: worker.log_tail_bytes,
            patch_max_bytes: worker.patch_max_bytes,
            rpc_timeout_ms: settings.rpc_timeout_ms,
            push_lease_margin_ms: worker.push_lease_margin_ms,
            mirror_cache_max_mirrors: worker.mirror_cache_max_mirrors,
            mirror_cache_max_bytes: worker.mirror_cache_max_bytes,
            egress: flotilla_worker::egress::EgressConfig::default(),
            token_file: PathBuf::new(),
        }
    }
}

/// The worker's sandbox hardening; each key is the worker setting of the same name
/// (`flotilla_worker::config::WorkerConfig`, documented in README.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSection {
    /// First host uid (and gid) of the sandboxes; never 0.
    pub sandbox_uid_base: u32,
    /// Number of sandbox uids (commands at once).
    pub sandbox_uid_count: u32,
    /// The sandbox init executable; empty: this binary (`flotilla sandbox-init`).
    pub sandbox_init_path: PathBuf,
    /// Where the per-command staging tmpfs is mounted.
    pub sandbox_staging_directory: PathBuf,
    /// Run without Landlock when the kernel lacks it.
    pub allow_without_landlock: bool,
    /// Run without cgroup limits when cgroups are unusable.
    pub allow_without_cgroup_limits: bool,
    /// Run without a disk quota when loop mounts are unavailable.
    pub allow_without_disk_quota: bool,
    /// Highest memory limit a fleet may ask for.
    pub memory_limit_max_bytes: u64,
    /// Highest pids limit a fleet may ask for.
    pub pids_limit_max: u32,
    /// Default CPU quota of a command, thousandths of a CPU; 0: none.
    pub default_cpu_limit_millicores: u64,
    /// Highest CPU quota a fleet may ask for.
    pub cpu_limit_max_millicores: u64,
    /// Memory of all sandboxes together; 0: no total.
    pub total_memory_limit_bytes: u64,
    /// Processes of all sandboxes together; 0: no total.
    pub total_pids_limit: u32,
    /// CPU of all sandboxes together, thousandths of a CPU; 0: no total.
    pub total_cpu_limit_millicores: u64,
    /// Disk quota of an attempt's workspace.
    pub default_disk_limit_bytes: u64,
    /// Highest disk quota a fleet may ask for.
    pub disk_limit_max_bytes: u64,
    /// Free space kept on the data file system.
    pub disk_reserve_bytes: u64,
    /// Size of each sandbox's `/tmp` + `/dev/shm`.
    pub tmp_size_bytes: u64,
}

impl Default for SandboxSection {
    fn default() -> Self {
        let worker = flotilla_worker::config::WorkerConfig::default();
        SandboxSection {
            sandbox_uid_base: worker.sandbox_uid_base,
            sandbox_uid_count: worker.sandbox_uid_count,
            sandbox_init_path: PathBuf::new(),
            sandbox_staging_directory: worker.sandbox_staging_directory,
            allow_without_landlock: worker.allow_without_landlock,
            allow_without_cgroup_limits: worker.allow_without_cgroup_limits,
            allow_without_disk_quota: worker.allow_without_disk_quota,
            memory_limit_max_bytes: worker.memory_limit_max_bytes,
            pids_limit_max: worker.pids_limit_max,
            default_cpu_limit_millicores: worker.default_cpu_limit_millicores,
            cpu_limit_max_millicores: worker.cpu_limit_max_millicores,
            total_memory_limit_bytes: worker.total_memory_limit_bytes,
            total_pids_limit: worker.total_pids_limit,
            total_cpu_limit_millicores: worker.total_cpu_limit_millicores,
            default_disk_limit_bytes: worker.default_disk_limit_bytes,
            disk_limit_max_bytes: worker.disk_limit_max_bytes,
            disk_reserve_bytes: worker.disk_reserve_bytes,
            tmp_size_bytes: worker.tmp_size_bytes,
        }
    }
}

/// Logging and tracing.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySection {
    /// `text` or `json`.
    pub log_format: String,
    /// A `tracing` filter, e.g. `info,flotilla=debug`. `RUST_LOG` overrides it.
    pub log_filter: String,
    /// OTLP gRPC endpoint (e.g. `http://127.0.0.1:4317`); empty disables trace export.
    pub otlp_endpoint: String,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        TelemetrySection {
            log_format: "text".into(),
            log_filter: "info".into(),
            otlp_endpoint: String::new(),
        }
    }
}

/// Transport security (module [`crate::tls`]). A node needs either the three files or
/// `insecure = true`; it refuses to start with neither. For `flotilla worker` the certificate
/// is the worker's (`spiffe://<cluster_id>/worker/<worker_id>`) and may be omitted.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// PEM file of the CA that signs every node, worker and client certificate.
    pub ca_file: PathBuf,
    /// PEM file of this node's certificate (URI SAN `spiffe://<cluster_id>/node/<node_id>`).
    pub certificate_file: PathBuf,
    /// PEM file of the certificate's private key.
    pub key_file: PathBuf,
    /// Plaintext gRPC, for local development only; excludes the files.
    pub insecure: bool,
}

/// A configuration error, naming the file and field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the key's path.
        message: String,
    },
    /// A value is out of range.
    #[error("config {field}: {message}")]
    Invalid {
        /// The key's path.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// A TOML error as one line: its message and, when known, the line number.
pub fn toml_message(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{message} (line {line})")
        }
        None => message,
    }
}

impl ServerConfig {
    /// Reads a TOML file over the defaults.
    ///
    /// # Errors
    /// [`ConfigError::Read`] or [`ConfigError::Parse`] with the key's path.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let deserializer =
            toml::Deserializer::parse(&text).map_err(|error| ConfigError::Parse {
                path: path.to_path_buf(),
                message: toml_message(&text, &error),
            })?;
        serde_path_to_error::deserialize(deserializer).map_err(|error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: format!("{}: {}", error.path(), toml_message(&text, error.inner())),
        })
    }

    /// The `[webhooks]` checks of [`ServerConfig::validate`].
    fn validate_webhooks(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| Err(ConfigError::Invalid { field, message });
        let webhooks = &self.webhooks;
        if !(1024..=25 * 1024 * 1024).contains(&webhooks.max_body_bytes)
            || webhooks.max_body_bytes > self.limits.max_request_bytes
        {
            return invalid(
                "webhooks.max_body_bytes",
                "must be between 1024 and 26214400, and at most limits.max_request_bytes".into(),
            );
        }
        if !(1_000..=3_600_000).contains(&webhooks.timestamp_tolerance_ms) {
            return invalid(
                "webhooks.timestamp_tolerance_ms",
                "must be between 1000 and 3600000".into(),
            );
        }
        if !(60_000..=366 * 24 * 3_600_000).contains(&webhooks.delivery_retention_ms) {
            return invalid(
                "webhooks.delivery_retention_ms",
                "must be between 60000 and 31622400000".into(),
            );
        }
        if !(1..=10_000_000).contains(&webhooks.max_deliveries) {
            return invalid(
                "webhooks.max_deliveries",
                "must be between 1 and 10000000".into(),
            );
        }
        if webhooks.max_refused_remembered > 100_000 {
            return invalid(
                "webhooks.max_refused_remembered",
                "must be at most 100000".into(),
            );
        }
        let mut names = std::collections::BTreeSet::new();
        for (index, source) in webhooks.sources.iter().enumerate() {
            let at = |what: &str| format!("webhooks.sources[{index}] ({}): {what}", source.name);
            if !flotilla_scheduler::spec::is_valid_name(&source.name) || source.name == "api" {
                return invalid(
                    "webhooks.sources.name",
                    at("must be 1-64 characters of [A-Za-z0-9._-], not \"api\""),
                );
            }
            if !names.insert(source.name.as_str()) {
                return invalid("webhooks.sources.name", at("listed twice"));
            }
            if !flotilla_scheduler::spec::is_valid_name(&source.project) {
                return invalid(
                    "webhooks.sources.project",
                    at("must be 1-64 characters of [A-Za-z0-9._-]"),
                );
            }
            if source.secret_files.is_empty() || source.secret_files.len() > 8 {
                return invalid(
                    "webhooks.sources.secret_files",
                    at("must list 1 to 8 files"),
                );
            }
        }
        Ok(())
    }

    /// Checks ranges and relations between values.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: &str| {
            Err(ConfigError::Invalid {
                field,
                message: message.to_string(),
            })
        };
        if self.node_id == 0 {
            return invalid("node_id", "must be at least 1");
        }
        if let Err(error) = self.policy.validate() {
            return invalid(error.field, &error.message);
        }
        if !flotilla_raft::is_valid_cluster_id(&self.cluster_id) {
            return invalid(
                "cluster_id",
                "must be 1-63 characters of [a-z0-9.-], starting and ending with a letter or digit",
            );
        }
        if self.listen_address.parse::<std::net::SocketAddr>().is_err() {
            return invalid("listen_address", "must be an IP:port socket address");
        }
        if !self.http_listen_address.is_empty()
            && self
                .http_listen_address
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return invalid(
                "http_listen_address",
                "must be an IP:port socket address or empty",
            );
        }
        let raft = &self.raft;
        if raft.heartbeat_interval_ms == 0
            || raft.heartbeat_interval_ms * 2 > raft.election_timeout_min_ms
        {
            return invalid(
                "raft.heartbeat_interval_ms",
                "must be positive and at most half of election_timeout_min_ms",
            );
        }
        for (field, value, max) in [
            ("raft.max_batch_requests", raft.max_batch_requests, 65_536),
            (
                "raft.max_batch_size_bytes",
                raft.max_batch_size_bytes,
                64 * 1024 * 1024,
            ),
            (
                "raft.max_queued_proposals",
                raft.max_queued_proposals,
                1 << 20,
            ),
            (
                "raft.max_in_flight_batches",
                raft.max_in_flight_batches,
                1024,
            ),
        ] {
            if value == 0 || value > max {
                return invalid(field, &format!("must be between 1 and {max}"));
            }
        }
        if raft.election_timeout_min_ms >= raft.election_timeout_max_ms {
            return invalid(
                "raft.election_timeout_max_ms",
                "must be greater than election_timeout_min_ms",
            );
        }
        if self.secrets.max_value_bytes < crate::secrets::MIN_SECRET_VALUE_BYTES
            || self.secrets.max_value_bytes > 1024 * 1024
        {
            return invalid("secrets.max_value_bytes", "must be between 8 and 1048576");
        }
        if self.secrets.max_secrets_per_project == 0 || self.secrets.max_secrets_total == 0 {
            return invalid(
                "secrets.max_secrets_per_project",
                "max_secrets_per_project and max_secrets_total must be at least 1",
            );
        }
        for entry in &self.push_credentials.static_tokens {
            if entry.url_prefix.is_empty() || entry.token_file.as_os_str().is_empty() {
                return invalid(
                    "push_credentials.static_tokens",
                    "every entry needs url_prefix and token_file",
                );
            }
        }
        if self.worker.slots == 0 || self.worker.slots > 1024 {
            return invalid("worker.slots", "must be between 1 and 1024");
        }
        if self.worker.heartbeat_interval_ms == 0
            || self.worker.heartbeat_interval_ms * 3 > self.limits.lease_ttl_ms
        {
            return invalid(
                "worker.heartbeat_interval_ms",
                "must be positive and at most a third of limits.lease_ttl_ms",
            );
        }
        if self.worker.lease_wait_ms > self.limits.max_lease_wait_ms {
            return invalid(
                "worker.lease_wait_ms",
                "must not exceed limits.max_lease_wait_ms",
            );
        }
        if self.worker.log_tail_bytes > self.limits.max_log_tail_bytes {
            return invalid(
                "worker.log_tail_bytes",
                "must not exceed limits.max_log_tail_bytes",
            );
        }
        if self.worker.patch_max_bytes > self.limits.max_patch_bytes {
            return invalid(
                "worker.patch_max_bytes",
                "must not exceed limits.max_patch_bytes",
            );
        }
        if self.limits.max_runs_per_fleet == 0 || self.limits.max_runs_per_fleet > 100_000 {
            return invalid("limits.max_runs_per_fleet", "must be between 1 and 100000");
        }
        if self.limits.forward_timeout_ms == 0 {
            return invalid("limits.forward_timeout_ms", "must be positive");
        }
        if let Err(error) = self.worker.egress.policy() {
            return invalid("worker.egress", &error.to_string());
        }
        if self.worker.rpc_timeout_ms == 0 {
            return invalid("worker.rpc_timeout_ms", "must be positive");
        }
        if self.limits.lease_check_interval_ms == 0 {
            return invalid("limits.lease_check_interval_ms", "must be positive");
        }
        if self.limits.compaction_batch_fleets == 0 {
            return invalid("limits.compaction_batch_fleets", "must be positive");
        }
        if !(16..=10_000_000).contains(&self.limits.max_events_per_fleet) {
            return invalid(
                "limits.max_events_per_fleet",
                "must be between 16 and 10000000",
            );
        }
        if !(4096..=8 * 1024 * 1024).contains(&self.limits.max_submission_part_bytes) {
            return invalid(
                "limits.max_submission_part_bytes",
                "must be between 4096 and 8388608",
            );
        }
        self.validate_webhooks()?;
        if !(1..=1_024).contains(&self.limits.max_limits) {
            return invalid("limits.max_limits", "must be between 1 and 1024");
        }
        if !(1..=10_000).contains(&self.limits.max_event_rules) {
            return invalid("limits.max_event_rules", "must be between 1 and 10000");
        }
        if !(1..=100_000).contains(&self.limits.max_schedules) {
            return invalid("limits.max_schedules", "must be between 1 and 100000");
        }
        if self.limits.max_lease_polls == 0 || self.limits.max_lease_polls > 1_000_000 {
            return invalid("limits.max_lease_polls", "must be between 1 and 1000000");
        }
        if self.limits.proposal_timeout_ms < 100 || self.limits.proposal_timeout_ms > 600_000 {
            return invalid(
                "limits.proposal_timeout_ms",
                "must be between 100 and 600000",
            );
        }
        if self.worker.push_lease_margin_ms
            >= self
                .limits
                .lease_ttl_ms
                .saturating_sub(self.worker.heartbeat_interval_ms)
        {
            return invalid(
                "worker.push_lease_margin_ms",
                "must be 0 (a third of the lease TTL) or below limits.lease_ttl_ms - worker.heartbeat_interval_ms",
            );
        }
        if self.worker.mirror_cache_max_mirrors == 0 {
            return invalid("worker.mirror_cache_max_mirrors", "must be positive");
        }
        if self.worker.mirror_cache_max_bytes == 0 {
            return invalid("worker.mirror_cache_max_bytes", "must be positive");
        }
        if let Err(message) =
            flotilla_scheduler::spec::validate_branch_prefix(&self.limits.branch_prefix)
        {
            return invalid("limits.branch_prefix", &message);
        }
        if self.limits.max_request_bytes < 64 * 1024 {
            return invalid("limits.max_request_bytes", "must be at least 65536");
        }
        let members = self.cluster.members()?;
        if !members.is_empty() && !members.contains_key(&self.node_id) {
            return invalid(
                "cluster.initial_members",
                "must include this node's node_id",
            );
        }
        if !members.is_empty() && self.cluster.join {
            return invalid(
                "cluster.join",
                "cannot be combined with cluster.initial_members",
            );
        }
        if !matches!(self.telemetry.log_format.as_str(), "text" | "json") {
            return invalid("telemetry.log_format", "must be \"text\" or \"json\"");
        }
        Ok(())
    }

    /// `advertise_address`, or `listen_address` when empty.
    pub fn advertised(&self) -> String {
        if self.advertise_address.is_empty() {
            self.listen_address.clone()
        } else {
            self.advertise_address.clone()
        }
    }

    /// `worker.worker_id`, or `node-<node_id>` when empty.
    /// The bootstrap token file: `auth.bootstrap_token_file` or `<data_directory>/bootstrap-token`.
    pub fn bootstrap_token_file(&self) -> PathBuf {
        if self.auth.bootstrap_token_file.as_os_str().is_empty() {
            self.data_directory.join("bootstrap-token")
        } else {
            self.auth.bootstrap_token_file.clone()
        }
    }

    /// The worker token file: `worker.token_file` or `<data_directory>/worker-token`.
    pub fn worker_token_file(&self) -> PathBuf {
        if self.worker.token_file.as_os_str().is_empty() {
            self.data_directory.join("worker-token")
        } else {
            self.worker.token_file.clone()
        }
    }

    pub fn worker_id(&self) -> String {
        if self.worker.worker_id.is_empty() {
            format!("node-{}", self.node_id)
        } else {
            self.worker.worker_id.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServerConfig, String> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        ServerConfig::from_file(file.path())
            .and_then(|c| c.validate().map(|()| c))
            .map_err(|e| {
                e.to_string()
                    .replace(&file.path().display().to_string(), "FILE")
            })
    }

    #[test]
    fn defaults_are_valid() {
        ServerConfig::default().validate().unwrap();
        assert_eq!(parse("").unwrap().listen_address, "127.0.0.1:7600");
    }

    #[test]
    fn worker_egress_is_read_and_checked() {
        let config = parse(
            "[worker.egress]\nallowed_hosts = [\"crates.io:443\", \"*.github.com:443\"]\n\
             static_hosts = { \"mirror.internal\" = \"10.20.0.5\" }\n\
             allowed_private_networks = [\"10.20.0.0/16\"]\n",
        )
        .unwrap();
        assert_eq!(config.worker.egress.allowed_hosts.len(), 2);
        assert_eq!(config.worker.egress.proxy_port, 3128);
        assert_eq!(
            parse("[worker.egress]\nallowed_hosts = [\"crates.io\"]\n").unwrap_err(),
            "config worker.egress: worker.egress.allowed_hosts[0]: \"crates.io\" has no port \
             (expected host:port, *.domain:port or host:*)"
        );
        assert!(
            parse("[worker.egress]\nallowed = []\n")
                .unwrap_err()
                .contains("worker.egress.allowed: unknown field")
        );
    }

    #[test]
    fn unknown_and_invalid_keys_are_named() {
        let unknown = parse("[worker]\nslotz = 3\n").unwrap_err();
        assert!(
            unknown.starts_with(
                "config file FILE: worker.slotz: unknown field `slotz`, expected one of"
            ),
            "{unknown}"
        );
        assert!(
            unknown.ends_with("(line 2)") && !unknown.contains('\n'),
            "{unknown}"
        );
        assert_eq!(
            parse("[worker]\nslots = \"three\"\n").unwrap_err(),
            "config file FILE: worker.slots: invalid type: string \"three\", expected u32 (line 2)"
        );
        assert_eq!(
            parse("node_id = 0\n").unwrap_err(),
            "config node_id: must be at least 1"
        );
        assert_eq!(
            parse("[cluster]\ninitial_members = [\"1=127.0.0.1:7600\", \"two=127.0.0.1:7601\"]\n")
                .unwrap_err(),
            "config cluster.initial_members: \"two=127.0.0.1:7601\": node id must be a positive integer"
        );
        assert_eq!(
            parse("[cluster]\ninitial_members = [\"2=127.0.0.1:7601\"]\n").unwrap_err(),
            "config cluster.initial_members: must include this node's node_id"
        );
        let three = parse(
            "[cluster]\ninitial_members = [\"1=127.0.0.1:7600\", \"2=10.1.0.2:7600\", \"3=10.1.0.3:7600\"]\n",
        )
        .unwrap();
        assert_eq!(three.cluster.members().unwrap().len(), 3);
        assert_eq!(
            parse("[raft]\nelection_timeout_min_ms = 900\n").unwrap_err(),
            "config raft.election_timeout_max_ms: must be greater than election_timeout_min_ms"
        );
        assert_eq!(
            parse("[limits]\nbranch_prefix = \"\"\n").unwrap_err(),
            "config limits.branch_prefix: \"\" must be non-empty, end with '/' and not start with refs/ (e.g. \"flotilla/\")"
        );
        assert_eq!(
            parse("[limits]\nbranch_prefix = \"bots/flotilla/\"\n")
                .unwrap()
                .limits
                .branch_prefix,
            "bots/flotilla/"
        );
        assert_eq!(
            parse("[worker]\npush_lease_margin_ms = 25000\n").unwrap_err(),
            "config worker.push_lease_margin_ms: must be 0 (a third of the lease TTL) or below limits.lease_ttl_ms - worker.heartbeat_interval_ms"
        );
    }
}
