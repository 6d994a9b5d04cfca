//! The work the cluster does while faults strike: tiny git repositories, fleet specs, and
//! submissions with idempotency keys whose every acknowledgement is recorded in a [`Ledger`].

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;

use crate::cluster::channel;

/// Attempts per run, first included (retryable failures: lost leases, infrastructure).
pub const MAX_ATTEMPTS: u32 = 5;

/// Creates `count` bare repositories `<directory>/origin-NNN.git`, each with one commit on
/// `main` holding `f.txt`; returns their `file://` URLs. One is made with git, the others are
/// copies of it.
///
/// # Errors
/// When git or the file system fails.
pub fn create_repositories(directory: &Path, count: usize) -> Result<Vec<String>> {
    let work = directory.join("seed");
    std::fs::create_dir_all(&work)?;
    git(&work, &["init", "-q", "-b", "main"])?;
    std::fs::write(work.join("f.txt"), "seed\n")?;
    git(&work, &["add", "f.txt"])?;
    git(&work, &["commit", "-q", "-m", "seed"])?;
    let template = directory.join("template.git");
    git(
        directory,
        &[
            "clone",
            "-q",
            "--bare",
            &work.display().to_string(),
            &template.display().to_string(),
        ],
    )?;
    let mut urls = Vec::with_capacity(count);
    for index in 0..count {
        let origin = directory.join(format!("origin-{index:03}.git"));
        copy_tree(&template, &origin)?;
        urls.push(format!("file://{}", origin.display()));
    }
    Ok(urls)
}

fn git(directory: &Path, arguments: &[&str]) -> Result<()> {
    let output = Command::new("git")
        .arg("-C")
        .arg(directory)
        .args(arguments)
        .env("GIT_AUTHOR_NAME", "Chaos")
        .env("GIT_AUTHOR_EMAIL", "chaos@example.com")
        .env("GIT_COMMITTER_NAME", "Chaos")
        .env("GIT_COMMITTER_EMAIL", "chaos@example.com")
        .output()
        .context("run git")?;
    if !output.status.success() {
        bail!(
            "git {arguments:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// A fleet over `repositories` whose agent appends a line to `f.txt` (so every run ends
/// `changed`), without sandbox isolation, pushing to `flotilla/chaos/{fleet_id}`.
pub fn fleet_spec(name: &str, repositories: Vec<String>) -> v1::FleetSpec {
    v1::FleetSpec {
        name: name.to_string(),
        repositories,
        agent: Some(v1::AgentSpec {
            secrets: Default::default(),
            command: "sleep 0.1; echo \"$FLOTILLA_RUN_ID $FLOTILLA_ATTEMPT\" >> f.txt".into(),
            task: "chaos".into(),
            env: Default::default(),
        }),
        verify: vec!["test -s f.txt".into()],
        sandbox: Some(v1::SandboxSpec {
            driver: "none".into(),
            timeout_ms: 20_000,
            ..Default::default()
        }),
        branch_template: "flotilla/chaos/{fleet_id}".into(),
        commit_message: "chaos".into(),
        max_parallelism: 64,
        max_attempts: MAX_ATTEMPTS,
        push: true,
        retry_backoff_initial_ms: 200,
        retry_backoff_max_ms: 1_000,
        project: String::new(),
        // Every fleet of a scenario runs over the same repositories (each on its own branch):
        // they share them rather than wait for each other (repository exclusivity).
        flow: Some(v1::FlowSpec {
            shared_repositories: true,
            ..Default::default()
        }),
    }
}

/// What happened to one idempotency key.
#[derive(Clone, Debug, Default)]
pub struct Submission {
    /// Runs the spec asked for.
    pub runs: usize,
    /// Every acknowledgement: (fleet id, created).
    pub acks: Vec<(String, bool)>,
    /// Errors before the acknowledgement (ambiguous or refused attempts).
    pub errors: Vec<String>,
}

/// Every submission made in a scenario, by idempotency key.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    inner: Arc<Mutex<BTreeMap<String, Submission>>>,
}

impl Ledger {
    /// A copy of the record.
    pub fn snapshot(&self) -> BTreeMap<String, Submission> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, key: &str, change: impl FnOnce(&mut Submission)) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        change(inner.entry(key.to_string()).or_default());
    }

    /// The acknowledged fleet ids (the first ack of each key), in key order.
    pub fn acknowledged(&self) -> Vec<String> {
        self.snapshot()
            .values()
            .filter_map(|s| s.acks.first().map(|(id, _)| id.clone()))
            .collect()
    }

    /// Submission attempts that failed before an acknowledgement, over all keys.
    pub fn error_count(&self) -> usize {
        self.snapshot().values().map(|s| s.errors.len()).sum()
    }
}

/// Submits `spec` with `key`, trying the nodes of `urls` in turn (starting at `first`) until
/// one acknowledges it; every failure is retried with the same key, so an ambiguous failure
/// (committed, answer lost) cannot create a second fleet. Returns the fleet id.
///
/// # Errors
/// When the spec is refused as invalid, or no node acknowledges it before `deadline`.
pub async fn submit(
    urls: &[String],
    first: usize,
    spec: v1::FleetSpec,
    key: &str,
    ledger: &Ledger,
    deadline: Instant,
) -> Result<String> {
    let runs = spec.repositories.len();
    ledger.update(key, |s| s.runs = runs);
    let request = v1::SubmitFleetRequest {
        spec: Some(spec),
        idempotency_key: key.to_string(),
        dry_run: false,
    };
    let mut attempt = 0usize;
    loop {
        let url = &urls[(first + attempt) % urls.len()];
        attempt += 1;
        let outcome = tokio::time::timeout(Duration::from_secs(6), async {
            let channel = channel(url, Duration::from_secs(5)).await?;
            let response = FleetServiceClient::new(channel)
                .submit_fleet(request.clone())
                .await?
                .into_inner();
            anyhow::Ok(response)
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
        match outcome {
            Ok(response) => {
                let fleet = response
                    .fleet
                    .context("SubmitFleet answered without fleet")?;
                ledger.update(key, |s| s.acks.push((fleet.id.clone(), response.created)));
                return Ok(fleet.id);
            }
            Err(error) => {
                if let Some(status) = error.downcast_ref::<tonic::Status>()
                    && status.code() == tonic::Code::InvalidArgument
                {
                    bail!("fleet {key} refused as invalid: {}", status.message());
                }
                let message = format!("{url}: {error:#}");
                ledger.update(key, |s| s.errors.push(message.clone()));
                if Instant::now() >= deadline {
                    bail!("fleet {key} not acknowledged in time; last error: {message}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Submits `count` fleets of `runs_each` repositories (windows sliding over `repositories`),
/// one every `interval`, in the background; each is retried until acknowledged or `deadline`.
pub fn spawn_submitter(
    urls: Vec<String>,
    repositories: Vec<String>,
    ledger: Ledger,
    count: usize,
    runs_each: usize,
    interval: Duration,
    deadline: Instant,
) -> tokio::task::JoinHandle<Result<()>> {
    tokio::spawn(async move {
        for index in 0..count {
            let chosen: Vec<String> = (0..runs_each)
                .map(|i| repositories[(index * 7 + i) % repositories.len()].clone())
                .collect();
            let spec = fleet_spec(&format!("during-{index}"), chosen);
            submit(
                &urls,
                index,
                spec,
                &format!("during-{index}"),
                &ledger,
                deadline,
            )
            .await?;
            tokio::time::sleep(interval).await;
        }
        Ok(())
    })
}

/// One request of a [`Probe`]: where it went, when, and how it ended.
#[derive(Clone, Debug)]
pub struct ProbeRequest {
    /// The node asked.
    pub url: String,
    /// When it was sent.
    pub started: Instant,
    /// How long it took until its answer (or failure).
    pub latency: Duration,
    /// The failure; `None` when the fleet was acknowledged.
    pub error: Option<String>,
}

/// A client that submits one-run fleets (idempotency keys `probe-N`) one after the other, each
/// to the next node of its current targets, and records how every single attempt ended: it
/// shows whether clients saw errors while a fault struck and healed. A failed attempt's key is
/// then submitted again until acknowledged (by [`submit`], to any node), so the ledger stays
/// exact for the checker.
pub struct Probe {
    targets: Arc<Mutex<Vec<String>>>,
    completed: Arc<std::sync::atomic::AtomicUsize>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<Vec<ProbeRequest>>>,
}

/// How long one probe attempt may take before it counts as failed: more than the nodes'
/// forward timeout (`limits.forward_timeout_ms`, 5 s), so a node's own UNAVAILABLE comes first.
pub const PROBE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(8);

impl Probe {
    /// Starts probing `targets` (URLs), pausing `interval` between requests; `all_urls` are
    /// used to settle a key whose attempt failed; fleets cover one of `repositories` each.
    pub fn spawn(
        targets: Vec<String>,
        all_urls: Vec<String>,
        repositories: Vec<String>,
        ledger: Ledger,
        interval: Duration,
    ) -> Probe {
        let targets = Arc::new(Mutex::new(targets));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let shared = Arc::clone(&targets);
        let completed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&completed);
        let task = tokio::spawn(async move {
            let mut requests = Vec::new();
            for number in 0usize.. {
                if *stopped.borrow_and_update() {
                    break;
                }
                let url = {
                    let targets = shared.lock().unwrap_or_else(|e| e.into_inner());
                    targets[number % targets.len()].clone()
                };
                let key = format!("probe-{number}");
                let spec = fleet_spec(
                    &key,
                    vec![repositories[number % repositories.len()].clone()],
                );
                ledger.update(&key, |s| s.runs = 1);
                let request = v1::SubmitFleetRequest {
                    spec: Some(spec.clone()),
                    idempotency_key: key.clone(),
                    dry_run: false,
                };
                let started = Instant::now();
                let outcome = tokio::time::timeout(PROBE_ATTEMPT_TIMEOUT, async {
                    let channel = channel(&url, PROBE_ATTEMPT_TIMEOUT).await?;
                    let response = FleetServiceClient::new(channel)
                        .submit_fleet(request)
                        .await?
                        .into_inner();
                    anyhow::Ok(response)
                })
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
                let latency = started.elapsed();
                let error = match outcome {
                    Ok(response) => {
                        let fleet = response
                            .fleet
                            .context("SubmitFleet answered without fleet")?;
                        ledger.update(&key, |s| s.acks.push((fleet.id, response.created)));
                        None
                    }
                    Err(error) => {
                        let message = format!("{url}: {error:#}");
                        ledger.update(&key, |s| s.errors.push(message.clone()));
                        // Settle the key: the failed attempt may have created the fleet.
                        submit(
                            &all_urls,
                            number,
                            spec,
                            &key,
                            &ledger,
                            Instant::now() + Duration::from_secs(60),
                        )
                        .await?;
                        Some(message)
                    }
                };
                requests.push(ProbeRequest {
                    url,
                    started,
                    latency,
                    error,
                });
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::select! {
                    _ = stopped.changed() => break,
                    () = tokio::time::sleep(interval) => {}
                }
            }
            Ok(requests)
        });
        Probe {
            targets,
            completed,
            stop,
            task,
        }
    }

    /// Requests answered (or failed) so far.
    pub fn completed(&self) -> usize {
        self.completed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Replaces the nodes the next requests go to (at least one URL).
    pub fn set_targets(&self, targets: Vec<String>) {
        if !targets.is_empty() {
            *self.targets.lock().unwrap_or_else(|e| e.into_inner()) = targets;
        }
    }

    /// Stops after the request under way and returns every request made.
    ///
    /// # Errors
    /// When a key could not be settled, or the task failed.
    pub async fn finish(self) -> Result<Vec<ProbeRequest>> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(90), self.task)
            .await
            .context("the probe did not stop within 90 s")?
            .context("probe task")?
    }
}
