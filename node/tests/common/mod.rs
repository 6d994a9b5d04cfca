//! Helpers for tests that run real `flotilla server` processes against real git repositories.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use tonic::transport::Channel;

/// A `flotilla server` child process.
pub struct Node {
    pub child: Child,
    pub address: String,
    pub data_directory: PathBuf,
    pub log: PathBuf,
}

fn free_port() -> u16 {
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
        let node = Self::spawn(data_directory, free_port(), extra_arguments);
        let address = node.address.trim_start_matches("http://").to_string();
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

    /// Spawns `flotilla server` (2 worker slots, no HTTP) on 127.0.0.1:`port`, logging to a
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
        std::fs::create_dir_all(data_directory).expect("data directory");
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
        let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["server", "--data-directory"])
            .arg(data_directory)
            .args([
                "--listen-address",
                &address,
                "--http-listen-address",
                "",
                "--worker-slots",
                "2",
            ])
            .args(&arguments)
            .envs(environment.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn flotilla server");
        Node {
            child,
            address: format!("http://{address}"),
            data_directory: data_directory.to_path_buf(),
            log,
        }
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut client) = FleetServiceClient::connect(self.address.clone()).await
                && client
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

    pub async fn client(&self) -> FleetServiceClient<Channel> {
        FleetServiceClient::connect(self.address.clone())
            .await
            .expect("connect")
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
    client: &mut FleetServiceClient<Channel>,
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
    let mut workers = flotilla_proto::v1::worker_service_client::WorkerServiceClient::connect(
        node.address.clone(),
    )
    .await
    .unwrap();
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
