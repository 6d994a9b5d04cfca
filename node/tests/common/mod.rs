//! Helpers for tests that run real `flotilla server` processes against real git repositories.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_proto::v1::cluster_service_client::ClusterServiceClient;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use flotilla_worker::client_auth::{AuthChannel, BearerToken};

/// The admin token of every test cluster: each node's bootstrap token file holds it (written
/// before the node starts), so whichever node leads first bootstraps it.
pub const ADMIN_TOKEN: &str =
    "flotilla_00000000000000ad_a11ce0000000000000000000000000000000000000000000000000000000000a";

/// `channel` sending `token`.
pub fn with_token(channel: tonic::transport::Channel, token: &str) -> AuthChannel {
    BearerToken::new(token).expect("token").channel(channel)
}

/// `FleetService` at `address` with the admin token.
pub async fn fleet_client(address: &str) -> FleetServiceClient<AuthChannel> {
    FleetServiceClient::new(with_token(channel(address).await, ADMIN_TOKEN))
}

/// `WorkerService` at `address` with the admin token (an admin may act as any worker id).
pub async fn worker_client(address: &str) -> WorkerServiceClient<AuthChannel> {
    WorkerServiceClient::new(with_token(channel(address).await, ADMIN_TOKEN))
}

/// `ClusterService` at `address` with the admin token.
pub async fn cluster_client(address: &str) -> ClusterServiceClient<AuthChannel> {
    ClusterServiceClient::new(with_token(channel(address).await, ADMIN_TOKEN))
}

/// Writes [`ADMIN_TOKEN`] as `data_directory`'s bootstrap token unless one is there.
pub fn write_bootstrap_token(data_directory: &Path) {
    std::fs::create_dir_all(data_directory).expect("data directory");
    let path = data_directory.join("bootstrap-token");
    if !path.exists() {
        std::fs::write(&path, format!("{ADMIN_TOKEN}\n")).expect("bootstrap token");
    }
}

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The development CA of this test binary, made once with `flotilla cert ca` in a directory
/// that lives as long as the process (removed by the next run's temp cleaning, not by us:
/// server processes of other tests may still read it).
pub fn pki_directory() -> &'static Path {
    static DIRECTORY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIRECTORY.get_or_init(|| {
        let directory = tempfile::Builder::new()
            .prefix("flotilla-test-pki-")
            .tempdir()
            .expect("pki directory")
            .keep();
        flotilla_cert(&["ca", "--directory", directory.to_str().unwrap()]);
        directory
    })
}

/// Runs `flotilla cert <arguments>`, panicking with its stderr on failure.
pub fn flotilla_cert(arguments: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .arg("cert")
        .args(arguments)
        .output()
        .expect("run flotilla cert");
    assert!(
        output.status.success(),
        "flotilla cert {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The CA certificate of [`pki_directory`].
pub fn ca_file() -> PathBuf {
    pki_directory().join("ca.pem")
}

/// `--ca-file`, `--ca-key-file`, `--directory` of `flotilla cert` for [`pki_directory`].
fn signing_arguments() -> Vec<String> {
    let directory = pki_directory();
    vec![
        "--ca-file".into(),
        directory.join("ca.pem").display().to_string(),
        "--ca-key-file".into(),
        directory.join("ca-key.pem").display().to_string(),
        "--directory".into(),
        directory.display().to_string(),
    ]
}

/// The certificate and key of `name` (`node-1`, `worker-w1`, ...), made by `create` (the
/// `flotilla cert` arguments) once per process.
fn certificate(name: &str, create: &[&str]) -> (PathBuf, PathBuf) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let certificate = pki_directory().join(format!("{name}.pem"));
    let key = pki_directory().join(format!("{name}-key.pem"));
    if !certificate.exists() {
        let mut arguments: Vec<String> = create.iter().map(|a| a.to_string()).collect();
        arguments.extend(signing_arguments());
        flotilla_cert(&arguments.iter().map(String::as_str).collect::<Vec<_>>());
    }
    (certificate, key)
}

/// The node certificate of `node_id` (cluster `flotilla`, hosts 127.0.0.1 and localhost).
pub fn node_certificate(node_id: u64) -> (PathBuf, PathBuf) {
    let id = node_id.to_string();
    certificate(
        &format!("node-{node_id}"),
        &["node", "--node-id", &id, "--host", "127.0.0.1,localhost"],
    )
}

/// The worker certificate of `worker_id` (cluster `flotilla`).
pub fn worker_certificate(worker_id: &str) -> (PathBuf, PathBuf) {
    certificate(
        &format!("worker-{worker_id}"),
        &["worker", "--worker-id", worker_id],
    )
}

/// The `--ca-file`/`--certificate-file`/`--key-file` flags of `flotilla server` for node
/// `node_id`.
pub fn server_tls_arguments(node_id: u64) -> Vec<String> {
    let (certificate, key) = node_certificate(node_id);
    vec![
        "--ca-file".into(),
        ca_file().display().to_string(),
        "--certificate-file".into(),
        certificate.display().to_string(),
        "--key-file".into(),
        key.display().to_string(),
    ]
}

/// Client TLS with the test CA and, if given, a certificate and key.
pub fn client_tls(identity: Option<(PathBuf, PathBuf)>) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca_file()).unwrap()));
    if let Some((certificate, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(certificate).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    tls
}

/// A channel to `address` (`https://host:port`) over TLS with the test CA, presenting
/// `identity` if given.
pub async fn tls_channel(
    address: &str,
    identity: Option<(PathBuf, PathBuf)>,
) -> Result<Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(address.to_string())
        .expect("address")
        .tls_config(client_tls(identity))
        .expect("tls config")
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// A connected TLS channel to `address` with the test CA and no client certificate.
pub async fn channel(address: &str) -> Channel {
    tls_channel(address, None).await.expect("connect")
}

/// A `flotilla server` child process.
pub struct Node {
    pub child: Child,
    /// `https://127.0.0.1:<port>`.
    pub address: String,
    pub data_directory: PathBuf,
    pub log: PathBuf,
}

pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

/// The operator policy of test nodes: the default policy, plus local repositories under the
/// temporary directory (where tests create them) and `/srv` (paths some tests only name).
pub fn test_policy() -> String {
    let temporary = std::env::temp_dir()
        .canonicalize()
        .expect("temporary directory");
    format!(
        "\n[policy]\nfile_roots = [{:?}, \"/srv\"]\n",
        temporary.display().to_string()
    )
}

/// A node configuration file `text` plus [`test_policy`], written to `path`.
pub fn write_config(path: &Path, text: &str) {
    std::fs::write(path, format!("{text}{}", test_policy())).expect("write config");
}

impl Node {
    /// Starts a single-node cluster with a local worker in `data_directory`.
    pub async fn start(data_directory: &Path, extra_arguments: &[&str]) -> Node {
        Self::start_on(data_directory, free_port(), extra_arguments).await
    }

    pub async fn start_on(data_directory: &Path, port: u16, extra_arguments: &[&str]) -> Node {
        Self::start_with_environment(data_directory, port, extra_arguments, &[]).await
    }

    /// [`Node::start_on`] with extra environment variables for the server process.
    pub async fn start_with_environment(
        data_directory: &Path,
        port: u16,
        extra_arguments: &[&str],
        environment: &[(&str, &str)],
    ) -> Node {
        let node = Self::spawn_with_environment(data_directory, port, extra_arguments, environment);
        node.wait_ready().await;
        node
    }

    /// `127.0.0.1:<port>` of the node's gRPC address.
    pub fn host_port(&self) -> String {
        self.address.trim_start_matches("https://").to_string()
    }

    /// The TCP port of the node's gRPC address.
    pub fn port(&self) -> u16 {
        self.address
            .rsplit(':')
            .next()
            .and_then(|port| port.parse().ok())
            .expect("address has a port")
    }

    /// Starts a node that is not expected to serve fleets (e.g. `--join`, never added): waits
    /// only until its gRPC port accepts connections.
    pub async fn start_listening(data_directory: &Path, extra_arguments: &[&str]) -> Node {
        Self::start_listening_on(data_directory, free_port(), extra_arguments).await
    }

    /// [`Node::start_listening`] on 127.0.0.1:`port` (a cluster member whose address the
    /// others were given).
    pub async fn start_listening_on(
        data_directory: &Path,
        port: u16,
        extra_arguments: &[&str],
    ) -> Node {
        let node = Self::spawn(data_directory, port, extra_arguments);
        let address = node.host_port();
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(
                Instant::now() < deadline,
                "server did not listen; log:\n{}",
                node.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        node
    }

    /// Spawns `flotilla server` (2 worker slots, no HTTP unless the arguments give
    /// `--http-listen-address`) on 127.0.0.1:`port`, logging to a
    /// new file in `data_directory`.
    fn spawn(data_directory: &Path, port: u16, extra_arguments: &[&str]) -> Node {
        Self::spawn_with_environment(data_directory, port, extra_arguments, &[])
    }

    fn spawn_with_environment(
        data_directory: &Path,
        port: u16,
        extra_arguments: &[&str],
        environment: &[(&str, &str)],
    ) -> Node {
        write_bootstrap_token(data_directory);
        let log = data_directory.join(format!(
            "server-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let log_file = std::fs::File::create(&log).expect("log file");
        let address = format!("127.0.0.1:{port}");
        // Every test node runs under the test policy; a test with its own `--config` writes
        // it with [`write_config`].
        let default_config = data_directory.join("test-policy.toml");
        let mut arguments: Vec<String> = extra_arguments.iter().map(|a| a.to_string()).collect();
        if !extra_arguments.contains(&"--config") {
            write_config(&default_config, "");
            arguments.extend(["--config".into(), default_config.display().to_string()]);
        }
        // TLS on, with the certificate of the node id the arguments give (default 1).
        let node_id: u64 = extra_arguments
            .iter()
            .position(|argument| *argument == "--node-id")
            .and_then(|position| extra_arguments.get(position + 1))
            .map_or(1, |id| id.parse().expect("--node-id"));
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["server", "--data-directory"])
            .arg(data_directory)
            .args(server_tls_arguments(node_id))
            .args(["--listen-address", &address, "--worker-slots", "2"])
            // No HTTP unless the test asks for it.
            .args(if extra_arguments.contains(&"--http-listen-address") {
                &[][..]
            } else {
                &["--http-listen-address", ""][..]
            })
            .args(&arguments)
            .envs(environment.iter().copied())
            .env("RUST_LOG", "info")
            .env("FLOTILLA_TOKEN", ADMIN_TOKEN)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn flotilla server");
        Node {
            child,
            address: format!("https://{address}"),
            data_directory: data_directory.to_path_buf(),
            log,
        }
    }

    /// Waits (up to 60 s) until this node serves `ListFleets` with the admin token: a leader
    /// exists and this node knows the tokens.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(channel) = tls_channel(&self.address, None).await
                && FleetServiceClient::new(with_token(channel, ADMIN_TOKEN))
                    .list_fleets(v1::ListFleetsRequest::default())
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "server did not become ready; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn client(&self) -> FleetServiceClient<AuthChannel> {
        fleet_client(&self.address).await
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs git in `directory`, panicking with its output on failure; returns stdout.
pub fn git(directory: &Path, arguments: &[&str]) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(directory)
        .args(arguments)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("git");
    assert!(
        output.status.success(),
        "git {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Creates a bare origin `<root>/<name>.git` holding one commit with `files`; returns its URL.
pub fn origin_repository(root: &Path, name: &str, files: &[(&str, &str)]) -> String {
    let work = root.join(format!("{name}-work"));
    std::fs::create_dir_all(&work).expect("work dir");
    git(&work, &["init", "-q", "-b", "main"]);
    for (path, text) in files {
        let file = work.join(path);
        std::fs::create_dir_all(file.parent().expect("parent")).expect("dirs");
        std::fs::write(file, text).expect("write");
    }
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "initial"]);
    let bare = root.join(format!("{name}.git"));
    let status = Command::new("git")
        .args(["clone", "-q", "--bare"])
        .arg(&work)
        .arg(&bare)
        .status()
        .expect("git clone --bare");
    assert!(status.success());
    format!("file://{}", bare.display())
}

/// A spec with a shell agent, one verify command, bwrap sandbox.
pub fn spec(name: &str, repositories: Vec<String>, agent: &str, verify: &[&str]) -> v1::FleetSpec {
    v1::FleetSpec {
        name: name.into(),
        repositories,
        agent: Some(v1::AgentSpec {
            secrets: Default::default(),
            command: agent.into(),
            task: "test task".into(),
            env: Default::default(),
        }),
        verify: verify.iter().map(|v| v.to_string()).collect(),
        sandbox: Some(v1::SandboxSpec {
            driver: "bwrap".into(),
            timeout_ms: 30_000,
            ..Default::default()
        }),
        branch_template: "flotilla/{fleet}".into(),
        commit_message: "test change".into(),
        max_parallelism: 4,
        max_attempts: 2,
        push: true,
        ..Default::default()
    }
}

/// Waits until the fleet is no longer running; returns it with its runs.
pub async fn wait_finished(
    client: &mut FleetServiceClient<AuthChannel>,
    fleet_id: &str,
    node: &Node,
) -> v1::Fleet {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let fleet = client
            .get_fleet(v1::GetFleetRequest {
                fleet_id: fleet_id.into(),
            })
            .await
            .expect("get fleet")
            .into_inner();
        if fleet.state != v1::FleetState::Running as i32 {
            return fleet;
        }
        assert!(
            Instant::now() < deadline,
            "fleet {fleet_id} did not finish: {fleet:?}\nlog:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Leases as `worker_id` (this test acting as a worker, listing what it already holds) until
/// `count` leases arrived; panics with the node's log when `deadline` passes first.
pub async fn lease(
    node: &Node,
    worker_id: &str,
    count: usize,
    deadline: Instant,
) -> Vec<v1::Lease> {
    let mut workers = worker_client(&node.address).await;
    let mut leases = Vec::new();
    while leases.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} leases for {worker_id}; log:\n{}",
            leases.len(),
            node.log_text()
        );
        let response = workers
            .lease_runs(v1::LeaseRunsRequest {
                worker_id: worker_id.into(),
                free_slots: (count - leases.len()) as u32,
                wait_ms: 1_000,
                // What this test-as-worker already holds, so it is not sent again.
                held: leases
                    .iter()
                    .map(|l: &v1::Lease| v1::HeldLease {
                        run_id: l.run_id.clone(),
                        attempt: l.attempt,
                    })
                    .collect(),
            })
            .await;
        if let Ok(response) = response {
            leases.extend(response.into_inner().leases);
        }
    }
    leases
}

/// Runs the `flotilla` CLI against `address` with the admin token and the test CA: its exit
/// code, standard output and standard error.
pub fn flotilla_cli(address: &str, arguments: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .env("FLOTILLA_TOKEN", ADMIN_TOKEN)
        .env("FLOTILLA_CA_FILE", ca_file())
        .args(["--address", address])
        .args(arguments)
        .output()
        .expect("run flotilla");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
