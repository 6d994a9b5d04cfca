//! Benchmarks against real local clusters (they measure and print; they assert nothing):
//!
//! - [`writes`] (`flotilla-bench writes`): committed Raft writes per second through the public API
//!   of a 3-node cluster (`FleetService.CancelFleet` of a fleet id that does not exist: one log
//!   entry, committed and applied, where the state machine refuses it, before the NOT_FOUND
//!   reply; heartbeats are no longer log entries), with 1 and 64 concurrent clients, and in the same run the same
//!   for a 3-member etcd cluster (`KV.Put` of a small key) as the baseline;
//! - [`failover`] (`flotilla-bench failover`): with a worker leasing runs continuously, `kill -9`
//!   of the leader, then the time until the survivors report a new leader and until the first
//!   new lease is granted; the killed node is restarted and caught up before the next trial.
//!
//! Each benchmark starts its own child processes (`flotilla server`, `flotilla worker`, `etcd`)
//! on 127.0.0.1 with free ports and fresh data directories under a temporary directory, with
//! fsync as always. They are killed and the directory removed at the end, on error and on
//! Ctrl-C or SIGTERM; `PR_SET_PDEATHSIG` kills them should this process die anyway.

use flotilla_proto::v1::AttemptOutcome;
use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use flotilla_proto::v1::cluster_service_client::ClusterServiceClient;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use flotilla_proto::v1::{self, RunState};
use flotilla_worker::client_auth::{AuthChannel, BearerToken};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};

use flotilla::api::now_ms;

/// Upper bound of `--clients` values.
const MAX_CLIENTS: u32 = 1024;
/// How long a cluster may take to elect its first leader.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-phase limit of a failover trial (new leader, first lease).
const TRIAL_PHASE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a restarted node may take to catch up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Runs per fleet submitted by the failover benchmark; another fleet is submitted when the
/// newest one has fewer than [`LOW_PENDING_RUNS`] pending runs left.
const RUNS_PER_FLEET: usize = 2000;
const LOW_PENDING_RUNS: u32 = 300;

/// The worker and lease timing of `bench failover`, for the servers and the worker alike.
const FAILOVER_CONFIG: &str = "\
[worker]
heartbeat_interval_ms = 300
lease_wait_ms = 1000

[limits]
lease_ttl_ms = 3000
lease_grace_after_election_ms = 3000
";

// ---------------------------------------------------------------------------------------------
// Child processes and local clusters
// ---------------------------------------------------------------------------------------------

/// A child process with its output appended to a log file; killed (SIGKILL) and reaped on drop.
struct ChildProcess {
    name: String,
    log: PathBuf,
    child: std::process::Child,
    /// On drop: SIGTERM first and this long to exit before SIGKILL (zero: SIGKILL at once).
    /// A worker gets time to stop its runs' processes, which a SIGKILL would leave running.
    grace: Duration,
}

impl ChildProcess {
    fn spawn(name: &str, program: &Path, arguments: &[String], log: &Path) -> anyhow::Result<Self> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        let mut command = Command::new(program);
        command
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .env("NO_COLOR", "1");
        // The children take their settings from their arguments only, not from this process's
        // environment (FLOTILLA_CONFIG, ETCD_DATA_DIR, RUST_LOG=trace, ...).
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy();
            if key_text.starts_with("FLOTILLA_")
                || key_text.starts_with("ETCD_")
                || key_text == "RUST_LOG"
            {
                command.env_remove(&key);
            }
        }
        // SAFETY: the closure only calls prctl, which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("start {name} ({})", program.display()))?;
        Ok(ChildProcess {
            name: name.to_string(),
            log: log.to_path_buf(),
            child,
            grace: Duration::ZERO,
        })
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`; reaps it.
    fn terminate(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(None))
            && let Ok(pid) = i32::try_from(self.child.id())
        {
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }

    /// `kill -9`, then reaps it.
    fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// An error with the end of its log when it has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited unexpectedly ({status}); end of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.grace.is_zero() {
            self.kill();
        } else {
            self.terminate(self.grace);
        }
    }
}

/// The `flotilla` binary the benchmarks run: `$FLOTILLA_BINARY`, else the `flotilla` next to
/// this executable.
///
/// # Errors
/// Neither exists.
fn flotilla_binary() -> anyhow::Result<PathBuf> {
    let binary = match std::env::var_os("FLOTILLA_BINARY") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .context("the flotilla-bench binary")?
            .with_file_name("flotilla"),
    };
    if !binary.is_file() {
        bail!(
            "no flotilla binary at {} (build it with `cargo build -p flotilla`, or set \
             FLOTILLA_BINARY)",
            binary.display()
        );
    }
    Ok(binary)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// `count` distinct free TCP ports on 127.0.0.1 (free when asked; a race with other programs is
/// possible but unlikely).
fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("bind a free port")?;
    listeners
        .iter()
        .map(|listener| Ok(listener.local_addr()?.port()))
        .collect()
}

/// A lazily connecting channel with short timeouts, for status polls.
fn poll_channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(2))
        .connect_lazy())
}

/// A connected channel without a request timeout, for the measured clients.
async fn connect(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("connect to {url}"))
}

/// The admin token of the benchmark's clusters: every node of a [`FlotillaCluster`] bootstraps
/// with it (one `--bootstrap-token-file`), and every client call sends it.
fn bench_bearer() -> BearerToken {
    static TOKEN: std::sync::OnceLock<BearerToken> = std::sync::OnceLock::new();
    TOKEN.get_or_init(BearerToken::default).clone()
}

/// A local cluster of 3 `flotilla server` processes (voters, no local worker, no HTTP).
struct FlotillaCluster {
    binary: PathBuf,
    directory: PathBuf,
    config: Option<PathBuf>,
    /// `127.0.0.1:port`, index = node id - 1.
    addresses: Vec<String>,
    /// Status poll channels, index = node id - 1.
    channels: Vec<Channel>,
    /// Index = node id - 1; `None` while killed.
    nodes: Vec<Option<ChildProcess>>,
}

impl FlotillaCluster {
    const SIZE: u64 = 3;

    fn start(directory: &Path, config: Option<&Path>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(directory)?;
        let token = flotilla::api::token::generate_token()
            .map_err(|error| anyhow::anyhow!("random source: {error}"))?;
        let token_file = directory.join("bootstrap-token");
        let _ = std::fs::remove_file(&token_file);
        flotilla::api::token::write_token_file(&token_file, &token)?;
        bench_bearer()
            .set(&token)
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        let addresses: Vec<String> = free_ports(Self::SIZE as usize)?
            .into_iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let channels = addresses
            .iter()
            .map(|address| poll_channel(&format!("http://{address}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut cluster = FlotillaCluster {
            binary: flotilla_binary()?,
            directory: directory.to_path_buf(),
            config: config.map(Path::to_path_buf),
            addresses,
            channels,
            nodes: (0..Self::SIZE).map(|_| None).collect(),
        };
        for id in 1..=Self::SIZE {
            cluster.start_node(id)?;
        }
        Ok(cluster)
    }

    fn ids() -> impl Iterator<Item = u64> {
        1..=Self::SIZE
    }

    fn url(&self, id: u64) -> String {
        format!("http://{}", self.addresses[(id - 1) as usize])
    }

    fn urls(&self) -> Vec<String> {
        Self::ids().map(|id| self.url(id)).collect()
    }

    fn channel(&self, id: u64) -> Channel {
        self.channels[(id - 1) as usize].clone()
    }

    /// Creates a worker token for `worker_id` and writes it to `path`.
    async fn worker_token_file(&self, id: u64, worker_id: &str, path: &Path) -> anyhow::Result<()> {
        let response = flotilla_proto::v1::token_service_client::TokenServiceClient::new(
            bench_bearer().channel(self.channel(id)),
        )
        .create_token(v1::CreateTokenRequest {
            name: worker_id.into(),
            role: "worker".into(),
            project: String::new(),
            worker_id: worker_id.into(),
            ttl_ms: 0,
        })
        .await?
        .into_inner();
        let _ = std::fs::remove_file(path);
        flotilla::api::token::write_token_file(path, &response.secret_token)?;
        Ok(())
    }

    /// Starts node `id` (again) on its address and data directory.
    fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let members = Self::ids()
            .map(|n| format!("{n}={}", self.addresses[(n - 1) as usize]))
            .collect::<Vec<_>>()
            .join(",");
        // Plaintext on loopback, as the etcd it is compared with (TLS costs are not measured).
        let mut arguments: Vec<String> = vec![
            "server".into(),
            "--insecure".into(),
            "--node-id".into(),
            id.to_string(),
            "--listen-address".into(),
            self.addresses[(id - 1) as usize].clone(),
            "--http-listen-address".into(),
            String::new(),
            "--no-worker".into(),
            "--initial-members".into(),
            members,
            "--data-directory".into(),
            self.directory
                .join(format!("node-{id}"))
                .to_string_lossy()
                .into_owned(),
            "--bootstrap-token-file".into(),
            self.directory
                .join("bootstrap-token")
                .to_string_lossy()
                .into_owned(),
        ];
        if let Some(config) = &self.config {
            arguments.push("--config".into());
            arguments.push(config.to_string_lossy().into_owned());
        }
        let process = ChildProcess::spawn(
            &format!("flotilla node {id}"),
            &self.binary,
            &arguments,
            &self.directory.join(format!("node-{id}.log")),
        )?;
        self.nodes[(id - 1) as usize] = Some(process);
        Ok(())
    }

    /// `kill -9` of node `id`.
    fn kill_node(&mut self, id: u64) {
        if let Some(mut process) = self.nodes[(id - 1) as usize].take() {
            process.kill();
        }
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        for process in self.nodes.iter_mut().flatten() {
            process.check_running()?;
        }
        Ok(())
    }

    async fn status(&self, id: u64) -> Result<v1::ClusterStatus, tonic::Status> {
        let mut client = ClusterServiceClient::new(bench_bearer().channel(self.channel(id)));
        Ok(client
            .status(v1::StatusRequest { from_leader: false })
            .await?
            .into_inner())
    }

    /// The node that reports itself leader, waiting up to `timeout` for one.
    async fn wait_for_leader(&mut self, timeout: Duration) -> anyhow::Result<v1::ClusterStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            for id in Self::ids() {
                if self.nodes[(id - 1) as usize].is_none() {
                    continue;
                }
                if let Ok(status) = self.status(id).await
                    && status.role == "Leader"
                    && status.leader_id == id
                {
                    return Ok(status);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "no leader after {timeout:?}; logs in {}",
                    self.directory.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Where `etcd` is; installs Debian's `etcd-server` package when it is missing.
fn etcd_binary() -> anyhow::Result<PathBuf> {
    let find = || {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|directory| directory.join("etcd"))
                .find(|candidate| candidate.is_file())
        })
    };
    if let Some(path) = find() {
        return Ok(path);
    }
    eprintln!("etcd is missing: apt-get install -y etcd-server");
    let status = Command::new("apt-get")
        .args(["install", "-y", "etcd-server"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .context("run apt-get")?;
    anyhow::ensure!(
        status.success(),
        "apt-get install -y etcd-server failed ({status}); install etcd and retry"
    );
    find().context("etcd is still missing after installing etcd-server")
}

/// A local 3-member etcd cluster (default settings: fsync on every commit).
struct EtcdCluster {
    directory: PathBuf,
    client_urls: Vec<String>,
    channels: Vec<Channel>,
    members: Vec<ChildProcess>,
}

impl EtcdCluster {
    fn start(binary: &Path, directory: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(directory)?;
        let ports = free_ports(6)?;
        let client_urls: Vec<String> = ports[..3]
            .iter()
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect();
        let peer_urls: Vec<String> = ports[3..]
            .iter()
            .map(|port| format!("http://127.0.0.1:{port}"))
            .collect();
        let initial_cluster = peer_urls
            .iter()
            .enumerate()
            .map(|(index, url)| format!("e{}={url}", index + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for index in 0..3 {
            let name = format!("e{}", index + 1);
            let arguments: Vec<String> = vec![
                format!("--name={name}"),
                format!(
                    "--data-dir={}",
                    directory.join(&name).to_string_lossy().into_owned()
                ),
                format!("--listen-client-urls={}", client_urls[index]),
                format!("--advertise-client-urls={}", client_urls[index]),
                format!("--listen-peer-urls={}", peer_urls[index]),
                format!("--initial-advertise-peer-urls={}", peer_urls[index]),
                format!("--initial-cluster={initial_cluster}"),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=flotilla-bench".into(),
                "--logger=zap".into(),
                "--log-outputs=stderr".into(),
            ];
            members.push(ChildProcess::spawn(
                &format!("etcd member {name}"),
                binary,
                &arguments,
                &directory.join(format!("{name}.log")),
            )?);
        }
        let channels = client_urls
            .iter()
            .map(|url| poll_channel(url))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(EtcdCluster {
            directory: directory.to_path_buf(),
            client_urls,
            channels,
            members,
        })
    }

    /// The index of the member that is the leader, waiting up to `timeout` for one.
    async fn wait_for_leader(&mut self, timeout: Duration) -> anyhow::Result<(usize, u64)> {
        let deadline = Instant::now() + timeout;
        loop {
            for member in &mut self.members {
                member.check_running()?;
            }
            for (index, channel) in self.channels.iter().enumerate() {
                if let Ok(status) = etcd::unary::<_, etcd::StatusResponse>(
                    &mut tonic::client::Grpc::new(channel.clone()),
                    etcd::STATUS_PATH,
                    etcd::StatusRequest {},
                )
                .await
                    && status.leader != 0
                    && status.header.as_ref().map(|h| h.member_id) == Some(status.leader)
                {
                    return Ok((index, status.raft_term));
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd has no leader after {timeout:?}; logs in {}",
                    self.directory.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The subset of etcd's v3 API (`etcdserverpb`, etcd's public gRPC wire API) the benchmark uses:
/// `KV.Put` and `Maintenance.Status`. Field numbers as in etcd's `rpc.proto`; fields not listed
/// are skipped when decoding.
mod etcd {
    use super::PathAndQuery;

    pub const PUT_PATH: &str = "/etcdserverpb.KV/Put";
    pub const STATUS_PATH: &str = "/etcdserverpb.Maintenance/Status";

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ResponseHeader {
        #[prost(uint64, tag = "1")]
        pub cluster_id: u64,
        #[prost(uint64, tag = "2")]
        pub member_id: u64,
        #[prost(int64, tag = "3")]
        pub revision: i64,
        #[prost(uint64, tag = "4")]
        pub raft_term: u64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        pub key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        pub value: Vec<u8>,
        #[prost(int64, tag = "3")]
        pub lease: i64,
        #[prost(bool, tag = "4")]
        pub prev_kv: bool,
        #[prost(bool, tag = "5")]
        pub ignore_value: bool,
        #[prost(bool, tag = "6")]
        pub ignore_lease: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PutResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusRequest {}

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct StatusResponse {
        #[prost(message, optional, tag = "1")]
        pub header: Option<ResponseHeader>,
        #[prost(string, tag = "2")]
        pub version: String,
        #[prost(int64, tag = "3")]
        pub db_size: i64,
        #[prost(uint64, tag = "4")]
        pub leader: u64,
        #[prost(uint64, tag = "5")]
        pub raft_index: u64,
        #[prost(uint64, tag = "6")]
        pub raft_term: u64,
    }

    /// One unary call on `path`.
    pub async fn unary<Request, Response>(
        grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
        path: &'static str,
        request: Request,
    ) -> Result<Response, tonic::Status>
    where
        Request: prost::Message + Send + Sync + 'static,
        Response: prost::Message + Default + Send + Sync + 'static,
    {
        grpc.ready()
            .await
            .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
        let codec = tonic_prost::ProstCodec::<Request, Response>::default();
        Ok(grpc
            .unary(
                tonic::Request::new(request),
                PathAndQuery::from_static(path),
                codec,
            )
            .await?
            .into_inner())
    }
}

// ---------------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------------

/// Runs `benchmark` until it ends or Ctrl-C / SIGTERM arrives; either way the benchmark's future
/// is dropped, which kills its child processes and removes its temporary directory.
async fn interruptible(
    benchmark: impl std::future::Future<Output = anyhow::Result<i32>>,
) -> anyhow::Result<i32> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = benchmark => result,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: stopping the benchmark's processes");
            Ok(130)
        }
        _ = terminate.recv() => {
            eprintln!("terminated: stopping the benchmark's processes");
            Ok(143)
        }
    }
}

/// A fresh temporary directory, removed on drop unless kept (retried briefly: a process killed
/// just before may leave a child that still writes into it for a moment).
struct ScratchDirectory {
    path: PathBuf,
    keep: bool,
}

impl ScratchDirectory {
    fn new(prefix: &str, keep: bool) -> anyhow::Result<Self> {
        let directory = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .context("temporary directory")?;
        Ok(ScratchDirectory {
            path: directory.keep(),
            keep,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDirectory {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept {} (data and process logs)", self.path.display());
            return;
        }
        for _ in 0..50 {
            match std::fs::remove_dir_all(&self.path) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                _ => return,
            }
        }
        eprintln!("could not remove {}", self.path.display());
    }
}

/// The median of sorted samples (the mean of the middle two for an even count).
fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The nearest-rank percentile `p` (0-1) of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

// ---------------------------------------------------------------------------------------------
// bench writes
// ---------------------------------------------------------------------------------------------

/// One measured client's connection and the write it repeats.
enum Writer {
    /// `FleetService.CancelFleet` of `fl-<large n>`, a fleet that does not exist.
    Flotilla {
        client: FleetServiceClient<AuthChannel>,
        fleet_id: String,
    },
    /// `KV.Put` of `bench/<n>` = 16 bytes.
    Etcd {
        grpc: tonic::client::Grpc<Channel>,
        key: Vec<u8>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum System {
    Flotilla,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Flotilla => "flotilla",
            System::Etcd => "etcd",
        }
    }
}

impl Writer {
    async fn connect(system: System, url: &str, client: usize) -> anyhow::Result<Writer> {
        let channel = connect(url).await?;
        Ok(match system {
            System::Flotilla => Writer::Flotilla {
                client: FleetServiceClient::new(bench_bearer().channel(channel)),
                fleet_id: format!("fl-{}", 1_000_000_000 + client),
            },
            System::Etcd => Writer::Etcd {
                grpc: tonic::client::Grpc::new(channel),
                key: format!("bench/{client}").into_bytes(),
            },
        })
    }

    async fn write(&mut self) -> Result<(), tonic::Status> {
        match self {
            Writer::Flotilla { client, fleet_id } => {
                // Committed and applied; the state machine refuses it: NOT_FOUND is success.
                let result = client
                    .cancel_fleet(v1::CancelFleetRequest {
                        fleet_id: fleet_id.clone(),
                    })
                    .await;
                match result {
                    Err(status) if status.code() == tonic::Code::NotFound => {}
                    Err(status) => return Err(status),
                    Ok(_) => {
                        return Err(tonic::Status::internal(format!(
                            "CancelFleet {fleet_id}: the fleet exists"
                        )));
                    }
                }
            }
            Writer::Etcd { grpc, key } => {
                let response: etcd::PutResponse = etcd::unary(
                    grpc,
                    etcd::PUT_PATH,
                    etcd::PutRequest {
                        key: key.clone(),
                        value: b"0123456789abcdef".to_vec(),
                        ..etcd::PutRequest::default()
                    },
                )
                .await?;
                if response.header.is_none() {
                    return Err(tonic::Status::internal("etcd Put: no response header"));
                }
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct ClientTally {
    latencies_ms: Vec<f64>,
    errors: u64,
    first_error: Option<String>,
}

struct Measurement {
    system: System,
    clients: u32,
    completed: usize,
    errors: u64,
    first_error: Option<String>,
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    leader_changed: bool,
}

/// `clients` concurrent loops of one write each against `url` (one connection per client):
/// a warm-up, then `duration` measured. Writes completed inside the measured window count.
async fn measure(
    system: System,
    url: &str,
    clients: u32,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Measurement> {
    let mut writers = Vec::with_capacity(clients as usize);
    for client in 0..clients as usize {
        writers.push(Writer::connect(system, url, client).await?);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let window_start = start + warmup;
    let end = window_start + duration;
    let mut tasks = JoinSet::new();
    for mut writer in writers {
        tasks.spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut tally = ClientTally::default();
            loop {
                let begun = Instant::now();
                if begun >= end {
                    break;
                }
                let result = writer.write().await;
                let done = Instant::now();
                let counted = done >= window_start && done <= end;
                match result {
                    Ok(()) if counted => tally
                        .latencies_ms
                        .push((done - begun).as_secs_f64() * 1000.0),
                    Ok(()) => {}
                    Err(status) => {
                        if counted {
                            tally.errors += 1;
                        }
                        tally.first_error.get_or_insert_with(|| status.to_string());
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            tally
        });
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(tally) = tasks.join_next().await {
        let tally = tally.context("benchmark client task")?;
        latencies.extend(tally.latencies_ms);
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(Measurement {
        system,
        clients,
        completed: latencies.len(),
        errors,
        first_error,
        per_second: latencies.len() as f64 / duration.as_secs_f64(),
        p50_ms: median(&latencies),
        p99_ms: percentile(&latencies, 0.99),
        leader_changed: false,
    })
}

/// `flotilla-bench writes`: committed writes per second of a local 3-node Flotilla cluster and,
/// as the baseline in the same run, of a local 3-member etcd cluster, with each number of
/// concurrent clients in `clients`, each measured for `duration_ms`.
///
/// # Errors
/// Bad arguments; a cluster that does not start or elect a leader; etcd missing and not
/// installable.
pub async fn writes(clients: &[u32], duration_ms: u64, keep: bool) -> anyhow::Result<i32> {
    anyhow::ensure!(
        !clients.is_empty() && clients.iter().all(|&c| (1..=MAX_CLIENTS).contains(&c)),
        "--clients must list numbers between 1 and {MAX_CLIENTS}"
    );
    anyhow::ensure!(
        (100..=600_000).contains(&duration_ms),
        "--duration-ms must be between 100 and 600000"
    );
    interruptible(writes_inner(
        clients,
        Duration::from_millis(duration_ms),
        keep,
    ))
    .await
}

async fn writes_inner(clients: &[u32], duration: Duration, keep: bool) -> anyhow::Result<i32> {
    let etcd_binary = etcd_binary()?;
    let directory = ScratchDirectory::new("flotilla-bench-writes-", keep)?;
    let warmup = (duration / 5).min(Duration::from_secs(1));
    // Both clusters run for the whole benchmark (idle while the other is measured), and the
    // measurements alternate, so that a change of the machine's background load affects both.
    let mut flotilla = FlotillaCluster::start(&directory.path().join("flotilla"), None)?;
    let mut etcd = EtcdCluster::start(&etcd_binary, &directory.path().join("etcd"))?;
    let leader = flotilla.wait_for_leader(STARTUP_TIMEOUT).await?;
    eprintln!(
        "flotilla: 3 nodes up, leader {} (term {})",
        leader.node_id, leader.term
    );
    let (leader, term) = etcd.wait_for_leader(STARTUP_TIMEOUT).await?;
    eprintln!("etcd: 3 members up, leader e{} (term {term})", leader + 1);
    let mut results = Vec::new();
    for &count in clients {
        let before = flotilla.wait_for_leader(STARTUP_TIMEOUT).await?;
        eprintln!("flotilla: {count} clients for {duration:?} ...");
        let mut measurement = measure(
            System::Flotilla,
            &flotilla.url(before.node_id),
            count,
            warmup,
            duration,
        )
        .await?;
        let after = flotilla.wait_for_leader(STARTUP_TIMEOUT).await?;
        measurement.leader_changed = after.term != before.term;
        results.push(measurement);

        let (leader, before) = etcd.wait_for_leader(STARTUP_TIMEOUT).await?;
        eprintln!("etcd: {count} clients for {duration:?} ...");
        let url = etcd.client_urls[leader].clone();
        let mut measurement = measure(System::Etcd, &url, count, warmup, duration).await?;
        let (_, after) = etcd.wait_for_leader(STARTUP_TIMEOUT).await?;
        measurement.leader_changed = after != before;
        results.push(measurement);
    }
    drop(etcd);
    drop(flotilla);
    print_writes(&results, duration);
    Ok(0)
}

fn print_writes(results: &[Measurement], duration: Duration) {
    println!(
        "committed writes, 3 voters on 127.0.0.1, fsync on, {:.1} s per measurement \
         (flotilla: FleetService.CancelFleet of a missing fleet; etcd: KV.Put of a 16-byte value)",
        duration.as_secs_f64()
    );
    println!(
        "{:<10} {:>8} {:>12} {:>10} {:>10} {:>8}",
        "system", "clients", "commands/s", "p50 ms", "p99 ms", "errors"
    );
    let mut rows: Vec<&Measurement> = results.iter().collect();
    rows.sort_by_key(|m| (m.system != System::Flotilla, m.clients));
    for m in rows {
        println!(
            "{:<10} {:>8} {:>12.1} {:>10.2} {:>10.2} {:>8}{}",
            m.system.name(),
            m.clients,
            m.per_second,
            m.p50_ms,
            m.p99_ms,
            m.errors,
            if m.leader_changed {
                "  (leader changed during the measurement)"
            } else {
                ""
            }
        );
    }
    for m in results.iter().filter(|m| m.errors > 0 || m.completed == 0) {
        println!(
            "{} with {} clients: {} errors, {} completed; first error: {}",
            m.system.name(),
            m.clients,
            m.errors,
            m.completed,
            m.first_error.as_deref().unwrap_or("-")
        );
    }
    for flotilla in results.iter().filter(|m| m.system == System::Flotilla) {
        if let Some(etcd) = results
            .iter()
            .find(|m| m.system == System::Etcd && m.clients == flotilla.clients)
        {
            println!(
                "ratio flotilla/etcd, {} clients: commands/s {:.2}x, p50 latency {:.2}x, p99 latency {:.2}x",
                flotilla.clients,
                flotilla.per_second / etcd.per_second,
                flotilla.p50_ms / etcd.p50_ms,
                flotilla.p99_ms / etcd.p99_ms
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// bench failover
// ---------------------------------------------------------------------------------------------

/// `flotilla-bench failover`: `trials` times, `kill -9` of the leader of a local 3-node cluster
/// while a worker-only node leases runs continuously; prints the time until a survivor reports
/// a new leader and until the first new lease, per trial, and their median and worst.
///
/// # Errors
/// Bad arguments; git missing; a cluster, worker or trial that does not make progress in time.
pub async fn failover(trials: u32, keep: bool) -> anyhow::Result<i32> {
    anyhow::ensure!(
        (1..=1000).contains(&trials),
        "--trials must be between 1 and 1000"
    );
    interruptible(failover_inner(trials, keep)).await
}

fn git(directory: &Path, arguments: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("git")
        .args([
            "-c",
            "user.name=flotilla-bench",
            "-c",
            "user.email=bench@localhost",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(arguments)
        .current_dir(directory)
        .stdin(Stdio::null())
        .output()
        .context("run git")?;
    anyhow::ensure!(
        output.status.success(),
        "git {}: {}",
        arguments.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

/// A tiny bare repository and `count` symbolic links to it (a fleet's repositories must be
/// distinct URLs): returns the links' paths.
fn tiny_repositories(directory: &Path, count: usize) -> anyhow::Result<Vec<String>> {
    let seed = directory.join("seed");
    std::fs::create_dir_all(&seed)?;
    git(&seed, &["init", "-q"])?;
    std::fs::write(seed.join("README"), "flotilla failover benchmark\n")?;
    git(&seed, &["add", "README"])?;
    git(&seed, &["commit", "-q", "-m", "init"])?;
    git(directory, &["clone", "-q", "--bare", "seed", "origin.git"])?;
    let links = directory.join("repositories");
    std::fs::create_dir_all(&links)?;
    let origin = directory.join("origin.git");
    (0..count)
        .map(|index| {
            let link = links.join(format!("r{index:05}.git"));
            std::os::unix::fs::symlink(&origin, &link)?;
            Ok(link.to_string_lossy().into_owned())
        })
        .collect()
}

fn failover_spec(name: &str, repositories: &[String]) -> v1::FleetSpec {
    v1::FleetSpec {
        name: name.to_string(),
        repositories: repositories.to_vec(),
        agent: Some(v1::AgentSpec {
            secrets: Default::default(),
            command: "sleep 0.2".into(),
            task: "failover benchmark".into(),
            env: Default::default(),
        }),
        verify: Vec::new(),
        sandbox: Some(v1::SandboxSpec {
            driver: "none".into(),
            timeout_ms: 60_000,
            memory_limit_bytes: 0,
            pids_limit: 0,
            network: false,
            cpu_limit_millicores: 0,
            disk_limit_bytes: 0,
        }),
        branch_template: "flotilla/{fleet}".into(),
        commit_message: "failover benchmark".into(),
        max_parallelism: 4,
        max_attempts: 3,
        push: false,
        retry_backoff_initial_ms: 0,
        retry_backoff_max_ms: 0,
        project: String::new(),
        flow: None,
    }
}

fn fleet_client(channel: Channel) -> FleetServiceClient<AuthChannel> {
    FleetServiceClient::new(bench_bearer().channel(channel))
        .max_decoding_message_size(64 * 1024 * 1024)
}

/// The fleet leasing state: submitted fleets, and a new one when the newest runs low.
struct Supply {
    repositories: Vec<String>,
    fleets: Vec<String>,
}

impl Supply {
    async fn submit(&mut self, channel: Channel) -> anyhow::Result<()> {
        let name = format!("failover-{}", self.fleets.len() + 1);
        let response = fleet_client(channel)
            .submit_fleet(v1::SubmitFleetRequest {
                dry_run: false,
                spec: Some(failover_spec(&name, &self.repositories)),
                idempotency_key: name.clone(),
            })
            .await
            .context("submit the benchmark fleet")?
            .into_inner();
        let fleet = response.fleet.context("SubmitFleet: no fleet")?;
        eprintln!(
            "submitted fleet {} ({} runs)",
            fleet.id,
            self.repositories.len()
        );
        self.fleets.push(fleet.id);
        Ok(())
    }

    /// The unfinished fleets with their last event sequence; submits another fleet first when
    /// the newest one has few pending runs left.
    async fn top_up(&mut self, channel: Channel) -> anyhow::Result<Vec<(String, u64)>> {
        let newest = self.fleets.last().context("no fleet")?.clone();
        let fleet = fleet_client(channel.clone())
            .get_fleet(v1::GetFleetRequest { fleet_id: newest })
            .await?
            .into_inner();
        if fleet.counts.as_ref().map_or(0, |c| c.pending) < LOW_PENDING_RUNS {
            self.submit(channel.clone()).await?;
        }
        let mut unfinished = Vec::new();
        for fleet_id in &self.fleets {
            let fleet = fleet_client(channel.clone())
                .get_fleet(v1::GetFleetRequest {
                    fleet_id: fleet_id.clone(),
                })
                .await?
                .into_inner();
            if fleet.state == v1::FleetState::Running as i32 {
                unfinished.push((fleet.id, fleet.last_sequence));
            }
        }
        Ok(unfinished)
    }
}

struct Trial {
    new_leader_ms: f64,
    first_lease_ms: f64,
}

async fn failover_inner(trials: u32, keep: bool) -> anyhow::Result<i32> {
    let directory = ScratchDirectory::new("flotilla-bench-failover-", keep)?;
    let root = directory.path();
    let config = root.join("flotilla.toml");
    let repositories = tiny_repositories(&root.join("git"), RUNS_PER_FLEET)?;
    // The benchmark's agent (`sleep`) runs unconfined on repositories under its scratch
    // directory: the operator's policy allows exactly that.
    std::fs::write(
        &config,
        format!(
            "{FAILOVER_CONFIG}\n[policy]\nallowed_drivers = [\"none\"]\nfile_roots = [{:?}]\n",
            root.join("git").canonicalize()?.display().to_string()
        ),
    )?;
    let mut cluster = FlotillaCluster::start(&root.join("cluster"), Some(&config))?;
    let leader = cluster.wait_for_leader(STARTUP_TIMEOUT).await?;
    eprintln!(
        "3 nodes up, leader {} (term {})",
        leader.node_id, leader.term
    );
    let worker_arguments: Vec<String> = vec![
        "worker".into(),
        "--config".into(),
        config.to_string_lossy().into_owned(),
        "--worker-id".into(),
        "bench-worker".into(),
        "--endpoints".into(),
        cluster.urls().join(","),
        "--slots".into(),
        "4".into(),
        "--data-directory".into(),
        root.join("worker").to_string_lossy().into_owned(),
        "--token-file".into(),
        root.join("worker-token").to_string_lossy().into_owned(),
    ];
    cluster
        .worker_token_file(leader.node_id, "bench-worker", &root.join("worker-token"))
        .await?;
    let mut worker = ChildProcess::spawn(
        "flotilla worker",
        &cluster.binary.clone(),
        &worker_arguments,
        &root.join("worker.log"),
    )?;
    worker.grace = Duration::from_secs(5);
    let mut supply = Supply {
        repositories,
        fleets: Vec::new(),
    };
    supply.submit(cluster.channel(leader.node_id)).await?;
    // Steady state: the worker has finished runs and holds leases.
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        worker.check_running()?;
        let leader = cluster.wait_for_leader(STARTUP_TIMEOUT).await?;
        let fleet = fleet_client(cluster.channel(leader.node_id))
            .get_fleet(v1::GetFleetRequest {
                fleet_id: supply.fleets[0].clone(),
            })
            .await?
            .into_inner();
        let counts = fleet.counts.unwrap_or_default();
        if counts.unchanged + counts.changed >= 8 && counts.running > 0 {
            break;
        }
        if counts.failed > 0 {
            bail!(
                "benchmark runs fail; see {} and GetRun",
                root.join("worker.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!("the worker leased no runs in {STARTUP_TIMEOUT:?}; see worker.log");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "leader failover, 3 voters + 1 worker-only node (4 slots) on 127.0.0.1, fsync on; \
         raft election timeout 400-800 ms, worker heartbeat 300 ms, lease wait 1000 ms"
    );
    let mut results = Vec::new();
    for trial in 1..=trials {
        worker.check_running()?;
        cluster.check_running()?;
        let leader = cluster.wait_for_leader(TRIAL_PHASE_TIMEOUT).await?;
        let killed = leader.node_id;
        let survivors: Vec<u64> = FlotillaCluster::ids().filter(|&id| id != killed).collect();
        let fleets = supply.top_up(cluster.channel(killed)).await?;
        // Event streams from both survivors, open before the kill.
        let (sender, mut receiver) = mpsc::unbounded_channel::<(Instant, v1::FleetEvent)>();
        let mut watchers = JoinSet::new();
        for (fleet_id, after_sequence) in &fleets {
            for &survivor in &survivors {
                let mut stream = fleet_client(cluster.channel(survivor))
                    .watch_fleet(v1::WatchFleetRequest {
                        fleet_id: fleet_id.clone(),
                        after_sequence: *after_sequence,
                    })
                    .await?
                    .into_inner();
                let sender = sender.clone();
                watchers.spawn(async move {
                    while let Ok(Some(event)) = stream.message().await {
                        if sender.send((Instant::now(), event)).is_err() {
                            return;
                        }
                    }
                });
            }
        }
        drop(sender);
        let killed_at = Instant::now();
        cluster.kill_node(killed);
        let kill_ms = now_ms();
        let cluster_ref = &cluster;
        let survivors_ref = &survivors;
        let new_leader = async move {
            loop {
                let statuses = futures::future::join_all(
                    survivors_ref.iter().map(|&id| cluster_ref.status(id)),
                )
                .await;
                for status in statuses.into_iter().flatten() {
                    if status.leader_id != 0 && status.leader_id != killed {
                        return (killed_at.elapsed(), status.leader_id, status.term);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let first_lease = async {
            while let Some((received, event)) = receiver.recv().await {
                if event.run_state == RunState::Running as i32 && event.time_ms > kill_ms {
                    return Some((received - killed_at, event));
                }
            }
            None
        };
        let (new_leader, first_lease) = tokio::join!(
            tokio::time::timeout(TRIAL_PHASE_TIMEOUT, new_leader),
            tokio::time::timeout(TRIAL_PHASE_TIMEOUT, first_lease)
        );
        let (leader_elapsed, new_leader_id, new_term) = new_leader.map_err(|_| {
            anyhow::anyhow!(
                "trial {trial}: no new leader {TRIAL_PHASE_TIMEOUT:?} after killing node {killed}"
            )
        })?;
        let (lease_elapsed, event) = match first_lease {
            Ok(Some(found)) => found,
            Ok(None) => bail!("trial {trial}: the event streams ended without a new lease"),
            Err(_) => bail!(
                "trial {trial}: no new lease {TRIAL_PHASE_TIMEOUT:?} after killing node {killed}"
            ),
        };
        // Restart the killed node from its data directory and wait until it has applied what
        // the leader had committed when it came back.
        let restarted_at = Instant::now();
        cluster.start_node(killed)?;
        let catch_up_deadline = restarted_at + CATCH_UP_TIMEOUT;
        let mut target = None;
        loop {
            cluster.check_running()?;
            if let Ok(own) = cluster.status(killed).await
                && own.leader_id != 0
                && own.leader_id != killed
            {
                if target.is_none()
                    && let Ok(leader) = cluster.status(own.leader_id).await
                    && leader.role == "Leader"
                {
                    target = Some(leader.committed_index);
                }
                if let Some(target) = target
                    && own.applied_index >= target
                {
                    break;
                }
            }
            if Instant::now() > catch_up_deadline {
                bail!("trial {trial}: node {killed} did not catch up in {CATCH_UP_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let caught_up = restarted_at.elapsed();
        // Leasing has resumed (a lease granted after the catch-up) before the next kill.
        let resumed = Instant::now();
        let resumed_ms = now_ms();
        let leasing = async {
            while let Some((_, event)) = receiver.recv().await {
                if event.run_state == RunState::Running as i32 && event.time_ms > resumed_ms {
                    return true;
                }
            }
            false
        };
        if !tokio::time::timeout(TRIAL_PHASE_TIMEOUT, leasing)
            .await
            .unwrap_or(false)
        {
            bail!(
                "trial {trial}: no lease granted in the {TRIAL_PHASE_TIMEOUT:?} after node {killed} caught up"
            );
        }
        watchers.abort_all();
        let resumed_after = resumed.elapsed();
        println!(
            "trial {trial:>3}: killed leader {killed} (term {}); new leader {new_leader_id} \
             (term {new_term}) after {:>6.0} ms; first new lease after {:>6.0} ms ({} attempt {}); \
             node {killed} restarted and caught up in {:.0} ms, next lease {:.0} ms later",
            leader.term,
            leader_elapsed.as_secs_f64() * 1000.0,
            lease_elapsed.as_secs_f64() * 1000.0,
            event.run_id,
            event.attempt,
            caught_up.as_secs_f64() * 1000.0,
            resumed_after.as_secs_f64() * 1000.0
        );
        results.push(Trial {
            new_leader_ms: leader_elapsed.as_secs_f64() * 1000.0,
            first_lease_ms: lease_elapsed.as_secs_f64() * 1000.0,
        });
    }
    let summary = |name: &str, mut samples: Vec<f64>| {
        samples.sort_by(f64::total_cmp);
        println!(
            "{name}: median {:.0} ms, worst {:.0} ms, best {:.0} ms ({} trials)",
            median(&samples),
            percentile(&samples, 1.0),
            percentile(&samples, 0.0),
            samples.len()
        );
    };
    summary(
        "kill -9 of the leader -> new leader reported",
        results.iter().map(|t| t.new_leader_ms).collect(),
    );
    summary(
        "kill -9 of the leader -> first new lease",
        results.iter().map(|t| t.first_lease_ms).collect(),
    );
    drop(worker);
    drop(cluster);
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// bench heartbeats
// ---------------------------------------------------------------------------------------------

/// Upper bound of `--workers` (one lease each, and a fleet allows at most 1024 at once).
const MAX_SIMULATED_WORKERS: u32 = 1024;
/// Connections the simulated workers share (HTTP/2 multiplexes their calls).
const HEARTBEAT_CONNECTIONS: usize = 16;

/// `flotilla-bench heartbeats`: `workers` simulated workers (`sim-<n>`, admin token) each lease
/// one run of a fleet on a local 3-node cluster, then heartbeat it every `interval_ms` for
/// `duration_ms`. Prints the heartbeats answered per second, their latency, the leases
/// reported lost, and the Raft log entries the leader wrote meanwhile (heartbeats are not log
/// entries, so nothing else writes in that window: any entry is attributable to heartbeats).
pub async fn heartbeats(
    workers: u32,
    interval_ms: u64,
    duration_ms: u64,
    keep: bool,
) -> anyhow::Result<i32> {
    anyhow::ensure!(
        (1..=MAX_SIMULATED_WORKERS).contains(&workers),
        "--workers must be between 1 and {MAX_SIMULATED_WORKERS}"
    );
    anyhow::ensure!(
        (100..=60_000).contains(&interval_ms),
        "--interval-ms must be between 100 and 60000"
    );
    anyhow::ensure!(
        (1_000..=600_000).contains(&duration_ms),
        "--duration-ms must be between 1000 and 600000"
    );
    interruptible(heartbeats_inner(
        workers,
        Duration::from_millis(interval_ms),
        Duration::from_millis(duration_ms),
        keep,
    ))
    .await
}

/// Leases one run as `worker_id`, retrying until `deadline`.
async fn lease_one(
    channel: Channel,
    worker_id: &str,
    deadline: Instant,
) -> anyhow::Result<v1::HeldLease> {
    let mut client = WorkerServiceClient::new(bench_bearer().channel(channel));
    loop {
        anyhow::ensure!(Instant::now() < deadline, "{worker_id}: no lease in time");
        let response = client
            .lease_runs(v1::LeaseRunsRequest {
                worker_id: worker_id.to_owned(),
                free_slots: 1,
                wait_ms: 1_000,
                held: Vec::new(),
            })
            .await;
        if let Ok(response) = response
            && let Some(lease) = response.into_inner().leases.into_iter().next()
        {
            return Ok(v1::HeldLease {
                run_id: lease.run_id,
                attempt: lease.attempt,
            });
        }
    }
}

#[derive(Default)]
struct HeartbeatTally {
    latencies_ms: Vec<f64>,
    lost: u64,
    errors: u64,
    first_error: Option<String>,
}

async fn heartbeats_inner(
    workers: u32,
    interval: Duration,
    duration: Duration,
    keep: bool,
) -> anyhow::Result<i32> {
    let directory = ScratchDirectory::new("flotilla-bench-heartbeats-", keep)?;
    let root = directory.path();
    let repositories = tiny_repositories(&root.join("git"), workers as usize)?;
    let config = root.join("flotilla.toml");
    // Leases outlive three intervals, as the server's own rule for worker heartbeats wants.
    let lease_ttl_ms = (interval.as_millis() as u64 * 3).max(3_000);
    std::fs::write(
        &config,
        format!(
            "[limits]\nlease_ttl_ms = {lease_ttl_ms}\nlease_grace_after_election_ms = \
             {lease_ttl_ms}\nmax_lease_polls = {}\n\n[policy]\nallowed_drivers = [\"none\"]\n\
             file_roots = [{:?}]\n",
            workers.max(1024),
            root.join("git").canonicalize()?.display().to_string()
        ),
    )?;
    let mut cluster = FlotillaCluster::start(&root.join("cluster"), Some(&config))?;
    let leader = cluster.wait_for_leader(STARTUP_TIMEOUT).await?;
    let channel = cluster.channel(leader.node_id);
    let mut spec = failover_spec("heartbeats", &repositories);
    spec.max_parallelism = workers;
    fleet_client(channel.clone())
        .submit_fleet(v1::SubmitFleetRequest {
            dry_run: false,
            spec: Some(spec),
            idempotency_key: "heartbeats".into(),
        })
        .await
        .context("submit the benchmark fleet")?;
    let channels = (0..HEARTBEAT_CONNECTIONS)
        .map(|_| poll_channel(&cluster.url(leader.node_id)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut leasing = JoinSet::new();
    for worker in 0..workers {
        let channel = channels[worker as usize % channels.len()].clone();
        leasing.spawn(async move {
            let worker_id = format!("sim-{worker}");
            let lease = lease_one(channel, &worker_id, deadline).await?;
            anyhow::Ok((worker_id, lease))
        });
    }
    let mut leases = Vec::new();
    while let Some(joined) = leasing.join_next().await {
        leases.push(joined??);
    }
    eprintln!("{workers} simulated workers hold one lease each; heartbeating for {duration:?}");
    let before = cluster.wait_for_leader(STARTUP_TIMEOUT).await?;
    let started = Instant::now();
    let end = started + duration;
    let mut beating = JoinSet::new();
    for (index, (worker_id, lease)) in leases.into_iter().enumerate() {
        let mut client = WorkerServiceClient::new(
            bench_bearer().channel(channels[index % channels.len()].clone()),
        );
        // Spread over one interval, as independent workers are.
        let offset = interval.mul_f64(index as f64 / f64::from(workers));
        beating.spawn(async move {
            let mut tally = HeartbeatTally::default();
            let mut next = started + offset;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                let sent = Instant::now();
                let response = client
                    .heartbeat(v1::HeartbeatRequest {
                        worker_id: worker_id.clone(),
                        leases: vec![lease.clone()],
                    })
                    .await;
                match response {
                    Ok(response) => {
                        tally.latencies_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                        tally.lost += response.into_inner().lost.len() as u64;
                    }
                    Err(status) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert_with(|| status.to_string());
                    }
                }
                next += interval;
            }
            tally
        });
    }
    let mut total = HeartbeatTally::default();
    while let Some(joined) = beating.join_next().await {
        let tally = joined?;
        total.latencies_ms.extend(tally.latencies_ms);
        total.lost += tally.lost;
        total.errors += tally.errors;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    let elapsed = started.elapsed();
    let after = cluster.wait_for_leader(STARTUP_TIMEOUT).await?;
    drop(cluster);
    total.latencies_ms.sort_by(f64::total_cmp);
    let answered = total.latencies_ms.len();
    let written = after.last_log_index.saturating_sub(before.last_log_index);
    println!(
        "heartbeats, 3 voters on 127.0.0.1, fsync on: {workers} simulated workers (one lease \
         each, {HEARTBEAT_CONNECTIONS} connections), every {} ms, {:.1} s",
        interval.as_millis(),
        elapsed.as_secs_f64()
    );
    println!(
        "answered {answered} ({:.1}/s), p50 {:.2} ms, p99 {:.2} ms, errors {}, leases lost {}",
        answered as f64 / elapsed.as_secs_f64(),
        median(&total.latencies_ms),
        percentile(&total.latencies_ms, 0.99),
        total.errors,
        total.lost
    );
    println!(
        "raft log entries written meanwhile: {written} ({:.2}/s); leader term {} -> {}",
        written as f64 / elapsed.as_secs_f64(),
        before.term,
        after.term
    );
    if let Some(error) = total.first_error {
        println!("first error: {error}");
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------------
// bench scale
// ---------------------------------------------------------------------------------------------

/// Upper bound of `--runs` (the largest fleet `limits.max_runs_per_fleet` allows).
const MAX_SCALE_RUNS: u32 = 100_000;
/// Lease loops per simulated worker process, and the slots each asks for.
const DISPATCH_LOOPS: usize = 8;
const DISPATCH_SLOTS_PER_LEASE: u32 = 64;

/// `flotilla-bench scale`: `fleets` fleets of `runs` runs each on a local 3-node cluster
/// (fsync on), drained by `workers` simulated worker processes (`flotilla-bench
/// dispatch-worker`: they lease runs and report them `unchanged` at once, executing nothing:
/// the control plane's dispatch rate, not an agent's). The first fleet is submitted alone and
/// timed; each further one when the newest has fewer than half its runs pending, so the workers
/// never run dry. Prints the submit time, the dispatch rate per 10 s window and overall,
/// `GetFleet` latency while it runs, the leader's peak RSS, and the snapshots built and
/// installed meanwhile (from the nodes' logs; the cluster snapshots every
/// `snapshot_logs_since_last` entries, 1000 by default, so that snapshots of the large state
/// happen during the run) and compacts a fleet 10 s after it ended,
/// so that many fleets in a row keep the state bounded. GetFleet errors are counted, not fatal.
pub async fn scale(
    runs: u32,
    fleets: u32,
    workers: u32,
    snapshot_logs_since_last: u64,
    keep: bool,
) -> anyhow::Result<i32> {
    anyhow::ensure!(
        (1..=MAX_SCALE_RUNS).contains(&runs),
        "--runs must be between 1 and {MAX_SCALE_RUNS}"
    );
    anyhow::ensure!(
        (1..=100).contains(&fleets),
        "--fleets must be between 1 and 100"
    );
    anyhow::ensure!(
        (1..=16).contains(&workers),
        "--workers must be between 1 and 16"
    );
    anyhow::ensure!(
        snapshot_logs_since_last >= 1,
        "--snapshot-logs-since-last must be at least 1"
    );
    interruptible(scale_inner(
        runs,
        fleets,
        workers,
        snapshot_logs_since_last,
        keep,
    ))
    .await
}

fn scale_spec(name: &str, runs: u32) -> v1::FleetSpec {
    let repositories = (0..runs)
        .map(|index| format!("https://git.example.com/organisation/repository-{index:06}.git"))
        .collect::<Vec<_>>();
    let mut spec = failover_spec(name, &repositories);
    // The largest parallelism a spec may ask for: the simulated workers hold at most
    // DISPATCH_LOOPS x DISPATCH_SLOTS_PER_LEASE leases each anyway.
    spec.max_parallelism = 1024;
    spec
}

/// Submits fleet `scale-<number>` of `runs` runs; returns its id and how long the
/// acknowledgement took, in milliseconds.
async fn submit_scale_fleet(
    channel: Channel,
    number: u32,
    runs: u32,
) -> anyhow::Result<(String, f64)> {
    let name = format!("scale-{number}");
    let submitted = Instant::now();
    let fleet = fleet_client(channel)
        .max_encoding_message_size(64 * 1024 * 1024)
        .submit_fleet(v1::SubmitFleetRequest {
            dry_run: false,
            spec: Some(scale_spec(&name, runs)),
            idempotency_key: name.clone(),
        })
        .await
        .with_context(|| format!("submit fleet {name}"))?
        .into_inner()
        .fleet
        .context("SubmitFleet: no fleet")?;
    Ok((fleet.id, submitted.elapsed().as_secs_f64() * 1e3))
}

/// The `VmHWM` (peak resident set) of process `pid`, in bytes.
fn peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/<pid>/status")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM without a value")?
        .parse()?;
    Ok(kib * 1024)
}

/// The snapshot lines (`built and persisted`, `installed`) of every node's log.
fn snapshot_log_lines(directory: &Path) -> Vec<String> {
    (1..=FlotillaCluster::SIZE)
        .flat_map(|id| {
            let text = std::fs::read_to_string(directory.join(format!("node-{id}.log")))
                .unwrap_or_default();
            text.lines()
                .filter(|line| line.contains("a snapshot"))
                // The measured fields (bytes, durations) and the message, not the membership.
                .map(|line| match line.find(" bytes=") {
                    Some(start) => format!("node {id}:{}", &line[start..]),
                    None => format!("node {id}: {}", line.trim()),
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn scale_inner(
    runs: u32,
    fleets: u32,
    workers: u32,
    snapshot_logs_since_last: u64,
    keep: bool,
) -> anyhow::Result<i32> {
    let directory = ScratchDirectory::new("flotilla-bench-scale-", keep)?;
    let root = directory.path();
    let config = root.join("flotilla.toml");
    std::fs::write(
        &config,
        format!(
            "[raft]\nsnapshot_logs_since_last = {snapshot_logs_since_last}\n\n[limits]\n\
             max_runs_per_fleet = 100000\nfleet_retention_ms = 10000\n\n\
             [policy]\nallowed_drivers = [\"none\"]\n"
        ),
    )?;
    let mut cluster = FlotillaCluster::start(&root.join("cluster"), Some(&config))?;
    let leader = cluster.wait_for_leader(STARTUP_TIMEOUT).await?;
    let leader_url = cluster.url(leader.node_id);
    // Without the status channels' 2 s timeout: the server's own proposal timeout bounds a
    // submission, and the time it takes is measured.
    let channel = connect(&leader_url).await?;
    let (first, submit_ms) = submit_scale_fleet(channel.clone(), 1, runs).await?;
    let mut later_submit_ms = Vec::new();
    eprintln!("submitted {first} ({runs} runs) in {submit_ms:.0} ms");
    let mut unfinished = vec![first];
    let mut submitted = 1;
    let token_file = root.join("cluster").join("bootstrap-token");
    let mut worker_processes = Vec::new();
    for worker in 0..workers {
        let arguments: Vec<String> = vec![
            "dispatch-worker".into(),
            "--endpoint".into(),
            leader_url.clone(),
            "--token-file".into(),
            token_file.to_string_lossy().into_owned(),
            "--worker-id".into(),
            format!("sim-{worker}"),
        ];
        worker_processes.push(ChildProcess::spawn(
            &format!("simulated worker {worker}"),
            &std::env::current_exe().context("the flotilla-bench binary")?,
            &arguments,
            &root.join(format!("worker-{worker}.log")),
        )?);
    }
    let started = Instant::now();
    let mut get_fleet_ms = Vec::new();
    let (mut get_fleet_errors, mut first_get_fleet_error) = (0u64, None::<String>);
    let mut windows = Vec::new();
    let (mut window_start, mut window_done) = (Instant::now(), 0u64);
    let (mut finished_terminal, mut failed) = (0u64, 0u64);
    let deadline = started + Duration::from_secs(1_200);
    let mut client = fleet_client(channel.clone());
    let terminal = loop {
        for worker in &mut worker_processes {
            worker.check_running()?;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the fleets did not finish in 1200 s"
        );
        let mut terminal = finished_terminal;
        let mut newest_pending = 0;
        let mut still = Vec::new();
        for fleet_id in &unfinished {
            let asked = Instant::now();
            let fleet = match client
                .get_fleet(v1::GetFleetRequest {
                    fleet_id: fleet_id.clone(),
                })
                .await
            {
                Ok(fleet) => fleet.into_inner(),
                Err(status) => {
                    get_fleet_errors += 1;
                    first_get_fleet_error.get_or_insert_with(|| status.to_string());
                    still.push(fleet_id.clone());
                    continue;
                }
            };
            get_fleet_ms.push(asked.elapsed().as_secs_f64() * 1e3);
            let counts = fleet.counts.unwrap_or_default();
            let done =
                u64::from(counts.changed + counts.unchanged + counts.failed + counts.cancelled);
            newest_pending = counts.pending;
            if fleet.state == v1::FleetState::Running as i32 {
                terminal += done;
                still.push(fleet_id.clone());
            } else {
                finished_terminal += done;
                terminal += done;
                failed += u64::from(counts.failed);
            }
        }
        unfinished = still;
        if window_start.elapsed() >= Duration::from_secs(10) {
            windows.push((terminal - window_done) as f64 / window_start.elapsed().as_secs_f64());
            (window_start, window_done) = (Instant::now(), terminal);
        }
        if submitted < fleets && (unfinished.is_empty() || newest_pending < runs / 2) {
            submitted += 1;
            let (fleet_id, took_ms) = submit_scale_fleet(channel.clone(), submitted, runs).await?;
            later_submit_ms.push(took_ms);
            unfinished.push(fleet_id);
        }
        if unfinished.is_empty() && submitted == fleets {
            break terminal;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let elapsed = started.elapsed().as_secs_f64();
    let leader_now = cluster.wait_for_leader(STARTUP_TIMEOUT).await?;
    let leader_pid = cluster.nodes[(leader_now.node_id - 1) as usize]
        .as_ref()
        .map(|node| node.child.id())
        .context("the leader's process")?;
    let rss = peak_rss_bytes(leader_pid)?;
    drop(worker_processes);
    let snapshots = snapshot_log_lines(&root.join("cluster"));
    drop(cluster);
    get_fleet_ms.sort_by(f64::total_cmp);
    println!(
        "scale, 3 voters on 127.0.0.1, fsync on; {workers} simulated worker processes \
         (lease and report unchanged at once, no execution); {fleets} fleet(s) of {runs} runs"
    );
    println!(
        "first fleet of {runs} runs: submit acknowledged in {submit_ms:.0} ms; the {} later \
         ones (submitted while runs were dispatched): {}",
        later_submit_ms.len(),
        later_submit_ms
            .iter()
            .map(|ms| format!("{ms:.0} ms"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "all {terminal} runs terminal in {elapsed:.1} s: {:.0} runs/s ({failed} failed); \
         10 s windows: [{}]",
        terminal as f64 / elapsed,
        windows
            .iter()
            .map(|rate| format!("{rate:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "GetFleet during the run: {} answered, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         {get_fleet_errors} errors{}",
        get_fleet_ms.len(),
        median(&get_fleet_ms),
        percentile(&get_fleet_ms, 0.99),
        get_fleet_ms.last().copied().unwrap_or(f64::NAN),
        first_get_fleet_error
            .map(|error| format!(" (first: {error})"))
            .unwrap_or_default()
    );
    println!(
        "leader (node {}) peak RSS {:.0} MiB (leader term {} -> {})",
        leader_now.node_id,
        rss as f64 / (1024.0 * 1024.0),
        leader.term,
        leader_now.term
    );
    println!("snapshots: {}", snapshots.len());
    for line in snapshots {
        println!("  {line}");
    }
    Ok(0)
}

/// `flotilla-bench dispatch-worker` (started by `bench scale`): a simulated worker that leases
/// runs from `endpoint` and reports each `unchanged` at once, in [`DISPATCH_LOOPS`] concurrent
/// loops, until killed. Executes nothing.
pub async fn dispatch_worker(
    endpoint: &str,
    token_file: &Path,
    worker_id: &str,
) -> anyhow::Result<i32> {
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("--token-file {}", token_file.display()))?;
    bench_bearer()
        .set(token.trim())
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let channel = connect(endpoint).await?;
    let mut loops = JoinSet::new();
    for index in 0..DISPATCH_LOOPS {
        let client = WorkerServiceClient::new(bench_bearer().channel(channel.clone()));
        let worker_id = format!("{worker_id}-{index}");
        loops.spawn(dispatch_loop(client, worker_id));
    }
    while let Some(joined) = loops.join_next().await {
        joined??;
    }
    Ok(0)
}

async fn dispatch_loop(
    mut client: WorkerServiceClient<AuthChannel>,
    worker_id: String,
) -> anyhow::Result<()> {
    loop {
        let leases = match client
            .lease_runs(v1::LeaseRunsRequest {
                worker_id: worker_id.clone(),
                free_slots: DISPATCH_SLOTS_PER_LEASE,
                wait_ms: 1_000,
                held: Vec::new(),
            })
            .await
        {
            Ok(response) => response.into_inner().leases,
            Err(status) => {
                eprintln!("{worker_id}: LeaseRuns: {status}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut reports = JoinSet::new();
        for lease in leases {
            let mut client = client.clone();
            let worker_id = worker_id.clone();
            reports.spawn(async move {
                client
                    .report_result(v1::ReportResultRequest {
                        worker_id,
                        run_id: lease.run_id,
                        attempt: lease.attempt,
                        result: Some(v1::RunResult {
                            outcome: AttemptOutcome::Unchanged as i32,
                            ..Default::default()
                        }),
                    })
                    .await
            });
        }
        while let Some(joined) = reports.join_next().await {
            if let Err(status) = joined? {
                eprintln!("{worker_id}: ReportResult: {status}");
            }
        }
    }
}
