//! A Flotilla cluster of real processes: three voters and two worker-only nodes, each in its own
//! network namespace, with short lease and heartbeat times so that faults resolve in seconds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flotilla_proto::v1;
use flotilla_proto::v1::cluster_service_client::ClusterServiceClient;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_worker::client_auth::{AuthChannel, BearerToken};
use tonic::transport::Endpoint;

use crate::net::{Host, Network};
use crate::process::{Process, flotilla_binary, log_tail};

/// Voters (Raft members) per cluster.
pub const VOTERS: usize = 3;
/// Worker-only nodes per cluster.
pub const WORKERS: usize = 2;
/// Runs each worker executes at once.
pub const WORKER_SLOTS: u32 = 4;
/// gRPC port of every voter (each has its own address).
pub const PORT: u16 = 7600;
/// HTTP port of every voter (webhooks, health).
pub const HTTP_PORT: u16 = 7680;
/// The shared secret of the `github` webhook source every voter lists.
pub const WEBHOOK_SECRET: &str = "chaos-webhook-secret";
/// A lease without heartbeat expires after this long.
pub const LEASE_TTL_MS: u64 = 3_000;
/// Raft election timeout, upper bound.
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 800;

/// The configuration file every process reads: production defaults except shorter lease,
/// heartbeat and snapshot intervals.
fn config_text() -> String {
    format!(
        "[raft]\n\
         heartbeat_interval_ms = 100\n\
         election_timeout_min_ms = 400\n\
         election_timeout_max_ms = {ELECTION_TIMEOUT_MAX_MS}\n\
         snapshot_logs_since_last = 100\n\
         \n\
         [limits]\n\
         lease_ttl_ms = {LEASE_TTL_MS}\n\
         lease_grace_after_election_ms = {LEASE_TTL_MS}\n\
         lease_check_interval_ms = 200\n\
         \n\
         [worker]\n\
         slots = {WORKER_SLOTS}\n\
         heartbeat_interval_ms = 500\n\
         lease_wait_ms = 1000\n\
         \n\
         [telemetry]\n\
         log_filter = \"info\"\n"
    )
}

/// How a voter starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoterStart {
    /// With `--initial-members` naming all three voters: forms the cluster when its store is
    /// fresh, rejoins it otherwise.
    Initial,
    /// With `--join` and a fresh store: waits to be added with `AddMember`.
    Join,
}

/// One voter or worker: its host, directories and process (if started).
#[derive(Debug)]
pub struct Node {
    /// `voter1`.. or `worker1`..
    pub name: String,
    /// Its namespace and address.
    pub host: Host,
    /// Its `--data-directory`.
    pub data_directory: PathBuf,
    /// Its log (every incarnation appended).
    pub log: PathBuf,
    /// The running process, if any.
    pub process: Option<Process>,
}

impl Node {
    fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }
}

/// Three voters and two workers in network namespaces; everything is killed and removed on
/// drop (the directory with data and logs too, unless [`Cluster::keep_directory`] was called).
pub struct Cluster {
    /// Voters; node id = index + 1.
    pub voters: Vec<Node>,
    /// Worker-only nodes; worker id `worker<index + 1>`.
    pub workers: Vec<Node>,
    /// Scenario directory: config, data directories, logs, repositories.
    pub directory: PathBuf,
    binary: PathBuf,
    config: PathBuf,
    // Dropped after the processes (see Drop), before the directory.
    network: Option<Network>,
    temporary: Option<tempfile::TempDir>,
}

/// A gRPC channel with short connect and request timeouts, so an unreachable or frozen node
/// costs at most a few seconds; TLS with the suite's CA ([`crate::pki`]) for `https://` URLs.
///
/// # Errors
/// When the URL is invalid or the node cannot be reached.
pub async fn channel(url: &str, request_timeout: Duration) -> Result<AuthChannel> {
    let mut endpoint = Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_millis(800))
        .timeout(request_timeout);
    if url.starts_with("https://") {
        endpoint = endpoint.tls_config(crate::pki::client_tls()?)?;
    }
    Ok(BearerToken::new(ADMIN_TOKEN)?.channel(endpoint.connect().await?))
}

/// The admin token of every chaos cluster: all voters bootstrap it from one
/// `--bootstrap-token-file`, every client call sends it, and the workers use it too (an admin
/// may act as any worker id; the chaos suite tests faults, not authorisation).
pub const ADMIN_TOKEN: &str =
    "flotilla_00000000000000c0_c4a05000000000000000000000000000000000000000000000000000000000c0";

impl Cluster {
    /// Creates the network and directories, starts the three voters with `--initial-members`,
    /// waits until they agree on a leader, then starts the two workers.
    ///
    /// # Errors
    /// When the machine lacks privileges or tools, or the cluster does not form in 30 s.
    pub async fn start(scenario: &str) -> Result<Cluster> {
        let binary = flotilla_binary()?;
        let names: Vec<String> = (1..=VOTERS)
            .map(|i| format!("voter{i}"))
            .chain((1..=WORKERS).map(|i| format!("worker{i}")))
            .collect();
        let network = Network::create(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
        let temporary = tempfile::Builder::new()
            .prefix(&format!("flotilla-chaos-{scenario}-"))
            .tempdir()?;
        let directory = temporary.path().to_path_buf();
        let config = directory.join("flotilla.toml");
        // The chaos agents (`sh` one-liners) run unconfined on repositories under the scenario
        // directory: the operator's policy allows exactly that. Processes started with
        // `ip netns exec` get a fresh /sys without the cgroup hierarchies, so the worker's
        // capability probe must be told that running without cgroup limits is accepted (no
        // agent here runs sandboxed).
        std::fs::write(
            &config,
            format!(
                "{}\n[policy]\nallowed_drivers = [\"none\"]\nfile_roots = [{:?}]\n\n\
                 [sandbox]\nallow_without_cgroup_limits = true\n",
                config_text(),
                directory.canonicalize()?.display().to_string()
            ),
        )?;
        std::fs::write(directory.join("admin-token"), format!("{ADMIN_TOKEN}\n"))?;
        // One GitHub webhook source on every voter (the trigger scenarios deliver to it).
        let secret = directory.join("webhook-secret");
        std::fs::write(&secret, WEBHOOK_SECRET)?;
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        let mut config_file = std::fs::OpenOptions::new().append(true).open(&config)?;
        std::io::Write::write_all(
            &mut config_file,
            format!(
                "\n[[webhooks.sources]]\nname = \"github\"\nkind = \"github\"\nsecret_files = [{:?}]\n",
                secret.display().to_string()
            )
            .as_bytes(),
        )?;
        let node = |name: &str| -> Result<Node> {
            let data_directory = directory.join(name).join("data");
            std::fs::create_dir_all(&data_directory)?;
            Ok(Node {
                name: name.to_string(),
                host: network.host(name).clone(),
                data_directory,
                log: directory.join(name).join("flotilla.log"),
                process: None,
            })
        };
        let voters = (1..=VOTERS)
            .map(|i| node(&format!("voter{i}")))
            .collect::<Result<Vec<_>>>()?;
        let workers = (1..=WORKERS)
            .map(|i| node(&format!("worker{i}")))
            .collect::<Result<Vec<_>>>()?;
        let mut cluster = Cluster {
            voters,
            workers,
            directory,
            binary,
            config,
            network: Some(network),
            temporary: Some(temporary),
        };
        for index in 0..VOTERS {
            cluster.start_voter(index, VoterStart::Initial)?;
        }
        if let Err(error) = cluster.wait_agreement(Duration::from_secs(30)).await {
            eprintln!(
                "chaos: the cluster did not form:\n{}",
                cluster.log_tails(30)
            );
            let directory = cluster.keep_directory();
            return Err(error.context(format!(
                "the cluster did not form (data and logs kept in {})",
                directory.display()
            )));
        }
        for index in 0..WORKERS {
            cluster.start_worker(index)?;
        }
        Ok(cluster)
    }

    /// Keeps the scenario directory (data and logs) after drop, and returns its path.
    pub fn keep_directory(&mut self) -> PathBuf {
        if let Some(temporary) = self.temporary.take() {
            let _ = temporary.keep();
        }
        self.directory.clone()
    }

    /// `host:port` of voter `index`.
    pub fn voter_address(&self, index: usize) -> String {
        format!("{}:{PORT}", self.voters[index].host.address)
    }

    /// `host:port` of voter `index`'s HTTP endpoint.
    pub fn voter_http_address(&self, index: usize) -> String {
        format!("{}:{HTTP_PORT}", self.voters[index].host.address)
    }

    /// `https://host:port` of voter `index`.
    pub fn voter_url(&self, index: usize) -> String {
        format!("https://{}", self.voter_address(index))
    }

    /// The URLs of all voters.
    pub fn voter_urls(&self) -> Vec<String> {
        (0..VOTERS).map(|i| self.voter_url(i)).collect()
    }

    /// The voter with Raft node id `node_id`.
    pub fn voter_index(node_id: u64) -> usize {
        node_id as usize - 1
    }

    /// Starts voter `index` (which must not be running).
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn start_voter(&mut self, index: usize, start: VoterStart) -> Result<()> {
        let address = self.voter_address(index);
        let mut arguments = vec![
            "server".to_string(),
            "--config".into(),
            self.config.display().to_string(),
            "--node-id".into(),
            (index + 1).to_string(),
            "--data-directory".into(),
            self.voters[index].data_directory.display().to_string(),
            "--listen-address".into(),
            address.clone(),
            "--advertise-address".into(),
            address,
            "--http-listen-address".into(),
            self.voter_http_address(index),
            "--no-worker".into(),
            "--bootstrap-token-file".into(),
            self.directory.join("admin-token").display().to_string(),
        ];
        arguments.extend(crate::pki::node_arguments(
            &self.binary,
            &self.directory.join("pki"),
            (index + 1) as u64,
            &self.voters[index].host.address.to_string(),
        )?);
        match start {
            VoterStart::Initial => {
                let members: Vec<String> = (0..VOTERS)
                    .map(|i| format!("{}={}", i + 1, self.voter_address(i)))
                    .collect();
                arguments.push("--initial-members".into());
                arguments.push(members.join(","));
            }
            VoterStart::Join => arguments.push("--join".into()),
        }
        let voter = &mut self.voters[index];
        anyhow::ensure!(voter.process.is_none(), "{} already runs", voter.name);
        voter.process = Some(Process::spawn(
            &voter.name,
            &voter.host.namespace,
            &self.binary,
            &arguments,
            &voter.log,
        )?);
        Ok(())
    }

    /// Starts worker `index` (which must not be running), leasing from all voters.
    ///
    /// # Errors
    /// When the process cannot be started.
    pub fn start_worker(&mut self, index: usize) -> Result<()> {
        let arguments = vec![
            "worker".to_string(),
            "--config".into(),
            self.config.display().to_string(),
            "--worker-id".into(),
            Self::worker_id(index),
            "--endpoints".into(),
            self.voter_urls().join(","),
            "--slots".into(),
            WORKER_SLOTS.to_string(),
            "--data-directory".into(),
            self.workers[index].data_directory.display().to_string(),
            "--token-file".into(),
            self.directory.join("admin-token").display().to_string(),
        ];
        let mut arguments = arguments;
        arguments.extend(crate::pki::worker_arguments(
            &self.binary,
            &self.directory.join("pki"),
            &Self::worker_id(index),
        )?);
        let worker = &mut self.workers[index];
        anyhow::ensure!(worker.process.is_none(), "{} already runs", worker.name);
        worker.process = Some(Process::spawn(
            &worker.name,
            &worker.host.namespace,
            &self.binary,
            &arguments,
            &worker.log,
        )?);
        Ok(())
    }

    /// The worker id of worker `index`.
    pub fn worker_id(index: usize) -> String {
        format!("worker{}", index + 1)
    }

    /// `kill -9` of voter `index`.
    pub fn kill_voter(&mut self, index: usize) {
        self.voters[index].kill();
    }

    /// `kill -9` of worker `index`.
    pub fn kill_worker(&mut self, index: usize) {
        self.workers[index].kill();
    }

    /// `SIGSTOP` of voter `index`.
    pub fn pause_voter(&self, index: usize) {
        if let Some(process) = &self.voters[index].process {
            process.pause();
        }
    }

    /// `SIGCONT` of voter `index`.
    pub fn resume_voter(&self, index: usize) {
        if let Some(process) = &self.voters[index].process {
            process.resume();
        }
    }

    /// Stops all workers with `SIGTERM` (killing those that do not exit within 10 s).
    pub fn stop_workers(&mut self) {
        for worker in &mut self.workers {
            if let Some(mut process) = worker.process.take() {
                process.terminate(Duration::from_secs(10));
            }
        }
    }

    /// Fails if a process that should run has exited (a crash), naming it with its log tail.
    ///
    /// # Errors
    /// When a started voter or worker is no longer running.
    pub fn check_alive(&mut self) -> Result<()> {
        for node in self.voters.iter_mut().chain(self.workers.iter_mut()) {
            if let Some(process) = &mut node.process
                && !process.is_running()
            {
                bail!(
                    "{} exited unexpectedly; log tail:\n{}",
                    node.name,
                    process.log_tail(40)
                );
            }
        }
        Ok(())
    }

    /// The network's host list (for partitions).
    pub fn network(&self) -> &Network {
        self.network.as_ref().expect("network exists until drop")
    }

    /// `ClusterService.Status` of voter `index`, within about a second.
    ///
    /// # Errors
    /// When the voter does not answer in time.
    pub async fn status(&self, index: usize) -> Result<v1::ClusterStatus> {
        let url = self.voter_url(index);
        tokio::time::timeout(Duration::from_millis(1500), async {
            let channel = channel(&url, Duration::from_secs(1)).await?;
            let status = ClusterServiceClient::new(channel)
                .status(v1::StatusRequest { from_leader: false })
                .await?
                .into_inner();
            anyhow::Ok(status)
        })
        .await
        .with_context(|| format!("{url}: status timed out"))?
    }

    /// `ClusterService.StateDigest` of voter `index`.
    ///
    /// # Errors
    /// When the voter does not answer in time.
    pub async fn digest(&self, index: usize) -> Result<v1::StateDigestResponse> {
        let url = self.voter_url(index);
        tokio::time::timeout(Duration::from_secs(5), async {
            let channel = channel(&url, Duration::from_secs(4)).await?;
            let digest = ClusterServiceClient::new(channel)
                .state_digest(v1::StateDigestRequest {})
                .await?
                .into_inner();
            anyhow::Ok(digest)
        })
        .await
        .with_context(|| format!("{url}: state digest timed out"))?
    }

    /// A `ClusterService` client for voter `index`.
    ///
    /// # Errors
    /// When the voter cannot be reached.
    pub async fn cluster_client(&self, index: usize) -> Result<ClusterServiceClient<AuthChannel>> {
        Ok(ClusterServiceClient::new(
            channel(&self.voter_url(index), Duration::from_secs(30)).await?,
        ))
    }

    /// Polls the voters in `among` until one reports itself leader in term `min_term` or
    /// later; returns its index and status.
    ///
    /// # Errors
    /// When none does within `timeout`.
    pub async fn wait_leader(
        &self,
        among: &[usize],
        min_term: u64,
        timeout: Duration,
    ) -> Result<(usize, v1::ClusterStatus)> {
        let deadline = Instant::now() + timeout;
        let mut last = Vec::new();
        loop {
            last.clear();
            for &index in among {
                match self.status(index).await {
                    Ok(status) if status.role == "Leader" && status.term >= min_term => {
                        return Ok((index, status));
                    }
                    Ok(status) => last.push(format!(
                        "{}: {} term {} leader {}",
                        self.voters[index].name, status.role, status.term, status.leader_id
                    )),
                    Err(error) => last.push(format!("{}: {error:#}", self.voters[index].name)),
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "no leader among {among:?} in term {min_term} or later within {timeout:?}: {}",
                    last.join("; ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until every running voter reports the same term and leader, and that leader
    /// reports itself leader; returns the leader's index and status.
    ///
    /// # Errors
    /// When they do not agree within `timeout`.
    pub async fn wait_agreement(&self, timeout: Duration) -> Result<(usize, v1::ClusterStatus)> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut statuses = Vec::new();
            let mut problem = None;
            for (index, voter) in self.voters.iter().enumerate() {
                if voter.process.is_none() {
                    continue;
                }
                match self.status(index).await {
                    Ok(status) => statuses.push((index, status)),
                    Err(error) => problem = Some(format!("{}: {error:#}", voter.name)),
                }
            }
            if problem.is_none() {
                let leader = statuses
                    .iter()
                    .find(|(_, s)| s.role == "Leader")
                    .map(|(i, s)| (*i, s.clone()));
                match leader {
                    Some((index, leader))
                        if statuses.iter().all(|(_, s)| {
                            s.term == leader.term && s.leader_id == leader.node_id
                        }) =>
                    {
                        return Ok((index, leader));
                    }
                    _ => {
                        problem = Some(
                            statuses
                                .iter()
                                .map(|(i, s)| {
                                    format!(
                                        "{}: {} term {} leader {}",
                                        self.voters[*i].name, s.role, s.term, s.leader_id
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join("; "),
                        );
                    }
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "voters do not agree on a leader within {timeout:?}: {}",
                    problem.unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A `FleetService` client on the current leader (agreed by all running voters).
    ///
    /// # Errors
    /// When no leader is agreed within `timeout`.
    pub async fn leader_fleet_client(
        &self,
        timeout: Duration,
    ) -> Result<FleetServiceClient<AuthChannel>> {
        let (index, _) = self.wait_agreement(timeout).await?;
        Ok(
            FleetServiceClient::new(
                channel(&self.voter_url(index), Duration::from_secs(10)).await?,
            )
            .max_decoding_message_size(64 << 20),
        )
    }

    /// The last `lines` lines of every node's log, for failure reports.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut text = String::new();
        for node in self.voters.iter().chain(&self.workers) {
            text.push_str(&format!(
                "----- {} ({}) -----\n{}\n",
                node.name,
                node.log.display(),
                log_tail(&node.log, lines)
            ));
        }
        text
    }

    /// Counts lines containing `needle` in the logs of the workers.
    pub fn count_in_worker_logs(&self, needle: &str) -> usize {
        self.workers
            .iter()
            .map(|w| {
                std::fs::read_to_string(&w.log)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains(needle))
                    .count()
            })
            .sum()
    }

    /// Wipes voter `index`'s data directory (it must be stopped).
    ///
    /// # Errors
    /// When it still runs or the directory cannot be recreated.
    pub fn wipe_voter(&mut self, index: usize) -> Result<()> {
        let voter = &self.voters[index];
        anyhow::ensure!(voter.process.is_none(), "{} still runs", voter.name);
        remove_and_recreate(&voter.data_directory)
    }
}

fn remove_and_recreate(directory: &Path) -> Result<()> {
    std::fs::remove_dir_all(directory)
        .with_context(|| format!("remove {}", directory.display()))?;
    std::fs::create_dir_all(directory)?;
    Ok(())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.workers.iter_mut().chain(self.voters.iter_mut()) {
            node.kill();
        }
        self.network.take();
        if let Some(temporary) = self.temporary.take()
            && std::env::var_os("FLOTILLA_CHAOS_KEEP").is_some()
        {
            eprintln!("chaos: kept {}", temporary.keep().display());
        }
    }
}
