//! One chaos scenario from start to verdict: start the cluster, submit fleets, inject a fault
//! mid-fleet, heal it, wait for every fleet to finish, stop the workers, then check convergence
//! and history.

use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use flotilla_proto::v1;

use crate::checker::{self, History};
use crate::cluster::{Cluster, VOTERS, VoterStart};
use crate::limits;
use crate::workload::{self, Ledger, Probe};

/// Repositories per scenario; the initial fleets each cover all of them.
pub const REPOSITORIES: usize = 40;
/// Fleets submitted before the fault.
pub const INITIAL_FLEETS: usize = 3;
/// Fleets submitted while the fault strikes, and runs in each.
pub const DURING_FLEETS: usize = 8;
/// Runs in each fleet submitted during the fault.
pub const DURING_RUNS: usize = 10;
/// Bound for every fleet to finish after the fault is healed.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound for a new leader after a fault.
pub const LEADER_TIMEOUT: Duration = Duration::from_secs(20);

/// The faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of the leader; restarted from its data directory once a new leader is elected.
    KillLeader,
    /// `kill -9` of a worker while it holds leases; restarted after its leases expired.
    KillWorker,
    /// `SIGSTOP` of the leader for longer than the election timeout, then `SIGCONT`.
    PauseLeader,
    /// The leader's namespace drops all traffic (iptables), then is healed.
    PartitionLeader,
    /// A follower's namespace drops all traffic for several of its election timeouts, then is
    /// healed: the leader and its term must not change, and clients see no error after the
    /// heal.
    PartitionFollower,
    /// `kill -9` of all voters, then all start again from their data directories.
    RestartAll,
    /// A follower is killed, removed, wiped, started with `--join` and added back.
    WipeAndRejoin,
}

impl Fault {
    /// A short name for logs and directories.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::KillWorker => "kill-worker",
            Fault::PauseLeader => "pause-leader",
            Fault::PartitionLeader => "partition-leader",
            Fault::PartitionFollower => "partition-follower",
            Fault::RestartAll => "restart-all",
            Fault::WipeAndRejoin => "wipe-rejoin",
        }
    }
}

/// Timings and counts of one scenario.
#[derive(Clone, Debug)]
pub struct Report {
    /// The fault.
    pub fault: Fault,
    /// From the fault to a new leader (a survivor reporting itself leader in a newer term);
    /// `None` when the fault does not touch the leader.
    pub new_leader: Option<Duration>,
    /// From the fault to the first lease granted after it (for a killed worker: to the first
    /// new attempt of a run whose lease it lost).
    pub first_assignment: Option<Duration>,
    /// Extra fault-specific facts.
    pub notes: Vec<String>,
    /// Fleets acknowledged and checked.
    pub fleets: usize,
    /// Runs checked.
    pub runs: usize,
    /// Attempts over all runs.
    pub attempts: usize,
    /// Runs with more than one attempt.
    pub retried_runs: usize,
    /// Attempt outcomes.
    pub outcomes: String,
    /// Failed submission attempts that were retried with the same key.
    pub submit_retries: usize,
    /// Results rejected as stale, counted in the workers' logs (informative).
    pub rejected_results: usize,
    /// The voters' common applied index at the end.
    pub applied_index: u64,
    /// Wall time of the whole scenario.
    pub duration: Duration,
}

fn millis(duration: Option<Duration>) -> String {
    duration.map_or("n/a".into(), |d| format!("{}ms", d.as_millis()))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chaos-summary: scenario={} result=pass new_leader={} first_assignment={} \
             fleets={} runs={} attempts={} retried_runs={} outcomes={} submit_retries={} \
             rejected_results={} applied_index={} duration={:.1}s{}",
            self.fault.name(),
            millis(self.new_leader),
            millis(self.first_assignment),
            self.fleets,
            self.runs,
            self.attempts,
            self.retried_runs,
            self.outcomes,
            self.submit_retries,
            self.rejected_results,
            self.applied_index,
            self.duration.as_secs_f64(),
            if self.notes.is_empty() {
                String::new()
            } else {
                format!(" notes=[{}]", self.notes.join("; "))
            }
        )
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the fault injection measured.
pub(crate) struct Injected {
    pub(crate) fault_ms: u64,
    pub(crate) new_leader: Option<Duration>,
    pub(crate) notes: Vec<String>,
}

/// Runs one scenario. On failure the scenario directory is kept (its path is in the error) and
/// the tail of every node's log is printed to stderr.
///
/// # Errors
/// When the cluster cannot be set up, a bound is exceeded, or the checker finds a violation.
pub async fn run(fault: Fault) -> Result<Report> {
    let started = Instant::now();
    let mut cluster = Cluster::start(fault.name()).await?;
    let outcome = drive(&mut cluster, fault, started).await;
    match outcome {
        Ok(report) => Ok(report),
        Err(error) => {
            eprintln!(
                "chaos[{}] failed: {error:#}\nlast lines of every log:\n{}",
                fault.name(),
                cluster.log_tails(30)
            );
            let directory = cluster.keep_directory();
            Err(error.context(format!(
                "scenario {} failed (data and logs kept in {})",
                fault.name(),
                directory.display()
            )))
        }
    }
}

async fn drive(cluster: &mut Cluster, fault: Fault, started: Instant) -> Result<Report> {
    let phase = |what: &str| {
        eprintln!(
            "chaos[{}] +{:.1}s {what}",
            fault.name(),
            started.elapsed().as_secs_f64()
        );
    };
    phase("cluster formed");
    limits::create(cluster).await?;
    let repositories =
        workload::create_repositories(&cluster.directory.join("repositories"), REPOSITORIES)?;
    let ledger = Ledger::default();
    let urls = cluster.voter_urls();
    let submit_deadline = Instant::now() + Duration::from_secs(60);
    let mut initial = Vec::new();
    for index in 0..INITIAL_FLEETS {
        let spec = workload::fleet_spec(&format!("initial-{index}"), repositories.clone());
        initial.push(
            workload::submit(
                &urls,
                index,
                spec,
                &format!("initial-{index}"),
                &ledger,
                submit_deadline,
            )
            .await?,
        );
    }
    let total: usize = INITIAL_FLEETS * REPOSITORIES;
    phase("initial fleets acknowledged");
    wait_progress(cluster, &initial, total / 5, total).await?;
    phase("injecting the fault");

    // Fleets keep arriving across the fault.
    let submitter = workload::spawn_submitter(
        urls.clone(),
        repositories.clone(),
        ledger.clone(),
        DURING_FLEETS,
        DURING_RUNS,
        Duration::from_millis(400),
        Instant::now() + Duration::from_secs(60),
    );
    let injected = inject(cluster, fault, &ledger, &repositories).await?;
    phase("fault healed");

    tokio::time::timeout(Duration::from_secs(90), submitter)
        .await
        .context("the submitter did not finish in 90 s")?
        .context("submitter task")??;
    wait_finished(cluster, &ledger.acknowledged()).await?;
    phase("every fleet finished");
    cluster.check_alive()?;
    cluster.stop_workers();
    phase("workers stopped");
    let rejected_results = cluster.count_in_worker_logs("result rejected by the cluster");

    let convergence = checker::converge(cluster, Duration::from_secs(30)).await?;
    phase("voters converged");
    let history: History = checker::check_history(cluster, &ledger).await?;
    phase("history checked");
    let limit_report = limits::check(cluster, &history.attempt_list).await?;
    phase("limits checked");
    let spanning = history.runs_spanning(injected.fault_ms);
    if spanning == 0 {
        bail!("no run was in flight across the fault: the fault did not strike mid-fleet");
    }
    let mut notes = injected.notes;
    notes.push(format!("{spanning} runs in flight across the fault"));
    notes.push(format!(
        "at most {} of {} runs at once; shortest gap between leases of one repository {} ms (limit {} ms)",
        limit_report.peak_running,
        limits::MAX_RUNNING,
        limit_report
            .shortest_repository_gap_ms
            .map_or("n/a".into(), |gap| gap.to_string()),
        limits::REPOSITORY_RATE_PERIOD_MS
    ));
    let first_assignment = if fault == Fault::KillWorker {
        let killed = Cluster::worker_id(0);
        let expired = history.count(&killed, "lease_expired");
        if expired == 0 {
            bail!(
                "{killed} was killed holding leases, but none of its attempts ended lease_expired"
            );
        }
        notes.push(format!("{expired} leases of {killed} expired"));
        history.first_retry_after_expiry(&killed, injected.fault_ms)
    } else {
        history.first_lease_after(injected.fault_ms)
    }
    .map(Duration::from_millis);
    let first_assignment = Some(first_assignment.context("no lease was granted after the fault")?);
    Ok(Report {
        fault,
        new_leader: injected.new_leader,
        first_assignment,
        notes,
        fleets: history.fleets,
        runs: history.runs,
        attempts: history.attempts,
        retried_runs: history.retried_runs,
        outcomes: format!("{:?}", history.outcomes),
        submit_retries: ledger.error_count(),
        rejected_results,
        applied_index: convergence.applied_index,
        duration: started.elapsed(),
    })
}

/// Injects and heals `fault`; returns when the cluster is whole again (not when the work is
/// done). `ledger` and `repositories` are the workload's, for faults that probe the clients'
/// view.
pub(crate) async fn inject(
    cluster: &mut Cluster,
    fault: Fault,
    ledger: &Ledger,
    repositories: &[String],
) -> Result<Injected> {
    let (leader, status) = cluster.wait_agreement(LEADER_TIMEOUT).await?;
    let term = status.term;
    let last_log_index = status.last_log_index;
    let survivors: Vec<usize> = (0..VOTERS).filter(|&i| i != leader).collect();
    let mut notes = Vec::new();
    let fault_ms;
    let mut new_leader = None;
    match fault {
        Fault::KillLeader => {
            fault_ms = now_ms();
            let start = Instant::now();
            cluster.kill_voter(leader);
            cluster
                .wait_leader(&survivors, term + 1, LEADER_TIMEOUT)
                .await?;
            new_leader = Some(start.elapsed());
            cluster.start_voter(leader, VoterStart::Initial)?;
            notes.push(settled(cluster, term).await?);
        }
        Fault::KillWorker => {
            wait_worker_holds_leases(cluster, &Cluster::worker_id(0)).await?;
            fault_ms = now_ms();
            cluster.kill_worker(0);
            // Its leases expire after the TTL; then it comes back under the same id.
            wait_worker_holds_no_lease(cluster, &Cluster::worker_id(0)).await?;
            cluster.start_worker(0)?;
        }
        Fault::PauseLeader => {
            fault_ms = now_ms();
            let start = Instant::now();
            cluster.pause_voter(leader);
            let result = cluster
                .wait_leader(&survivors, term + 1, LEADER_TIMEOUT)
                .await;
            new_leader = Some(start.elapsed());
            // Frozen until the new leader committed past the paused leader's log, so it comes
            // back behind and must catch up. (Past it, not 20 entries past: the workload may have
            // nothing left to write by then; CI saw the new leader stop 18 entries past.)
            let result = match result {
                Ok((index, _)) => wait_committed(cluster, index, last_log_index + 1)
                    .await
                    .map(|()| index),
                Err(error) => Err(error),
            };
            cluster.resume_voter(leader);
            result?;
            notes.push(settled(cluster, term).await?);
        }
        Fault::PartitionLeader => {
            let host = cluster.voters[leader].host.clone();
            fault_ms = now_ms();
            let start = Instant::now();
            host.isolate()?;
            let result = cluster
                .wait_leader(&survivors, term + 1, LEADER_TIMEOUT)
                .await;
            new_leader = Some(start.elapsed());
            // The old leader stays cut off (believing it leads) until the new leader committed
            // past its log, so it comes back behind and must catch up.
            let result = match result {
                Ok((index, _)) => wait_committed(cluster, index, last_log_index + 1)
                    .await
                    .map(|()| index),
                Err(error) => Err(error),
            };
            let isolated_view = cluster.status(leader).await;
            host.heal()?;
            if let Ok(status) = isolated_view {
                bail!("the isolated leader still answers: {status:?}");
            }
            result?;
            notes.push(settled(cluster, term).await?);
        }
        Fault::PartitionFollower => {
            let (fault_at, note) =
                partition_follower(cluster, leader, term, ledger, repositories).await?;
            fault_ms = fault_at;
            notes.push(note);
        }
        Fault::RestartAll => {
            fault_ms = now_ms();
            let start = Instant::now();
            for index in 0..VOTERS {
                cluster.kill_voter(index);
            }
            for index in 0..VOTERS {
                cluster.start_voter(index, VoterStart::Initial)?;
            }
            // Any leader counts: openraft 0.9 lets a restarted leader whose vote was
            // committed resume leadership in its old term.
            let all: Vec<usize> = (0..VOTERS).collect();
            let (index, status) = cluster.wait_leader(&all, term, LEADER_TIMEOUT).await?;
            new_leader = Some(start.elapsed());
            notes.push(format!(
                "leader after restart: voter{} in term {} (before: voter{} in term {term})",
                index + 1,
                status.term,
                leader + 1
            ));
            notes.push(settled(cluster, term).await?);
        }
        Fault::WipeAndRejoin => {
            let victim = survivors[0];
            let node_id = victim as u64 + 1;
            fault_ms = now_ms();
            let start = Instant::now();
            cluster.kill_voter(victim);
            let shared: &Cluster = cluster;
            retry(Duration::from_secs(30), move || async move {
                shared
                    .cluster_client(leader)
                    .await?
                    .remove_member(v1::RemoveMemberRequest { node_id })
                    .await?;
                Ok(())
            })
            .await
            .context("RemoveMember")?;
            cluster.wipe_voter(victim)?;
            cluster.start_voter(victim, VoterStart::Join)?;
            let address = cluster.voter_address(victim);
            let shared: &Cluster = cluster;
            let address = &address;
            retry(Duration::from_secs(60), move || async move {
                shared
                    .cluster_client(leader)
                    .await?
                    .add_member(v1::AddMemberRequest {
                        member: Some(v1::Member {
                            node_id,
                            address: address.clone(),
                        }),
                        learner: false,
                    })
                    .await?;
                Ok(())
            })
            .await
            .context("AddMember")?;
            let (_, status) = cluster.wait_agreement(LEADER_TIMEOUT).await?;
            let voters = status.members.iter().filter(|m| m.voter).count();
            if voters != VOTERS {
                bail!("after re-adding, the leader sees {voters} voters: {status:?}");
            }
            let rejoined = cluster.status(victim).await?;
            notes.push(format!(
                "voter{} rejoined after {} ms with snapshot index {} applied index {}",
                victim + 1,
                start.elapsed().as_millis(),
                rejoined.snapshot_index,
                rejoined.applied_index
            ));
        }
    }
    Ok(Injected {
        fault_ms,
        new_leader,
        notes,
    })
}

/// Waits until voter `index` reports a committed index of at least `at_least` (the cluster made
/// progress), within [`LEADER_TIMEOUT`].
///
/// # Errors
/// When it does not.
async fn wait_committed(cluster: &Cluster, index: usize, at_least: u64) -> Result<()> {
    let deadline = Instant::now() + LEADER_TIMEOUT;
    loop {
        let last = cluster.status(index).await;
        match &last {
            Ok(status) if status.committed_index >= at_least => return Ok(()),
            _ if Instant::now() >= deadline => bail!(
                "voter{} did not commit index {at_least} within {LEADER_TIMEOUT:?}: {last:?}",
                index + 1
            ),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// What the follower's election timer logs for a pre-vote round no quorum granted.
const PRE_VOTE_LOST_TEXT: &str = "pre-vote lost";
/// Pre-vote rounds the partitioned follower must lose before the heal: the partition lasts that
/// many of its election timeouts, however slow the machine.
const PARTITION_PRE_VOTE_ROUNDS: usize = 4;
/// How long after the heal the leader and term must stay unchanged (at least; also until the
/// follower caught up, and 2 s after that). The deposition this guards against came about 3.5 s
/// after the heal.
const SETTLE_AFTER_HEAL: Duration = Duration::from_secs(6);

/// Lines of `path` containing `needle` (0 if it cannot be read).
fn count_lines(path: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(needle))
        .count()
}

/// Checks one status answer against the expected leader and term.
fn check_unchanged(
    cluster: &Cluster,
    index: usize,
    status: &v1::ClusterStatus,
    leader: usize,
    term: u64,
) -> Result<()> {
    let leader_id = leader as u64 + 1;
    let role_ok = (index == leader) == (status.role == "Leader");
    if status.term != term || status.leader_id != leader_id || !role_ok {
        bail!(
            "leadership changed: {} reports {} in term {} with leader {} (expected voter{} \
             leading term {term})",
            cluster.voters[index].name,
            status.role,
            status.term,
            status.leader_id,
            leader + 1
        );
    }
    Ok(())
}

/// Partitions a follower of `leader` (leading `term`) until it lost
/// [`PARTITION_PRE_VOTE_ROUNDS`] pre-vote rounds, heals it, and checks: the leader and term
/// never change, before or after the heal (for [`SETTLE_AFTER_HEAL`] and until the follower
/// caught up); a probe client that submits across the heal sees no error from the leader and
/// the connected follower at any time, nor from any node after the heal. Returns the fault's
/// time (ms since the epoch) and a note for the report.
async fn partition_follower(
    cluster: &Cluster,
    leader: usize,
    term: u64,
    ledger: &Ledger,
    repositories: &[String],
) -> Result<(u64, String)> {
    let follower = (0..VOTERS).find(|&i| i != leader).context("a follower")?;
    let connected = (0..VOTERS)
        .find(|&i| i != leader && i != follower)
        .context("a second follower")?;
    let host = cluster.voters[follower].host.clone();
    let log = cluster.voters[follower].log.clone();
    let majority = vec![cluster.voter_url(leader), cluster.voter_url(connected)];
    let probe = Probe::spawn(
        majority.clone(),
        cluster.voter_urls(),
        repositories.to_vec(),
        ledger.clone(),
        Duration::from_millis(100),
    );
    let outcome = partition_follower_probed(
        cluster, leader, connected, follower, term, &host, &log, &probe,
    )
    .await;
    // Heal in any case (the namespace is removed on drop anyway, but the report needs a whole
    // cluster), then judge the probe.
    if outcome.is_err() {
        let _ = host.heal();
    }
    let requests = probe.finish().await?;
    let (fault_ms, healed, note) = outcome?;
    let mut violations = Vec::new();
    for request in &requests {
        let Some(error) = &request.error else {
            continue;
        };
        let after_heal = request.started >= healed;
        if after_heal || majority.contains(&request.url) {
            violations.push(format!(
                "{} ms {} the heal: {error}",
                if after_heal {
                    request.started.duration_since(healed).as_millis()
                } else {
                    healed.duration_since(request.started).as_millis()
                },
                if after_heal { "after" } else { "before" },
            ));
        }
    }
    if !violations.is_empty() {
        bail!(
            "{} of {} probe requests failed where clients must see no error: {}",
            violations.len(),
            requests.len(),
            violations.join("; ")
        );
    }
    let after_heal = requests.iter().filter(|r| r.started >= healed).count();
    let to_follower_after_heal = requests
        .iter()
        .filter(|r| r.started >= healed && r.url == cluster.voter_url(follower))
        .count();
    if to_follower_after_heal == 0 {
        bail!("no probe request reached the healed follower after the heal");
    }
    Ok((
        fault_ms,
        format!(
            "{note}; probe: {} requests, {after_heal} after the heal \
             ({to_follower_after_heal} to the healed follower), none failed",
            requests.len()
        ),
    ))
}

/// The partition, heal and leadership checks of [`partition_follower`], with `probe` running.
/// Returns the fault's time, the heal's instant, and a note.
#[allow(clippy::too_many_arguments)]
async fn partition_follower_probed(
    cluster: &Cluster,
    leader: usize,
    connected: usize,
    follower: usize,
    term: u64,
    host: &crate::net::Host,
    log: &std::path::Path,
    probe: &Probe,
) -> Result<(u64, Instant, String)> {
    // Some probe requests succeed before the fault.
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe.completed() < 3 {
        if Instant::now() >= deadline {
            bail!("the probe made {} requests within 30 s", probe.completed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lost_before = count_lines(log, PRE_VOTE_LOST_TEXT);
    let fault_ms = now_ms();
    host.isolate()?;
    let isolated = Instant::now();
    let deadline = isolated + LEADER_TIMEOUT;
    loop {
        for index in [leader, connected] {
            if let Ok(status) = cluster.status(index).await {
                check_unchanged(cluster, index, &status, leader, term)?;
            }
        }
        let lost = count_lines(log, PRE_VOTE_LOST_TEXT) - lost_before;
        if lost >= PARTITION_PRE_VOTE_ROUNDS {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "the partitioned {} lost {lost} pre-vote rounds within {LEADER_TIMEOUT:?}, \
                 not {PARTITION_PRE_VOTE_ROUNDS}",
                cluster.voters[follower].name
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let partitioned_for = isolated.elapsed();
    if cluster.status(follower).await.is_ok() {
        bail!("the partitioned follower still answers");
    }
    let leader_committed = cluster.status(leader).await?.committed_index;
    host.heal()?;
    let healed = Instant::now();
    probe.set_targets(cluster.voter_urls());

    let deadline = healed + LEADER_TIMEOUT;
    let mut caught_up: Option<Instant> = None;
    loop {
        for index in 0..VOTERS {
            let Ok(status) = cluster.status(index).await else {
                continue;
            };
            check_unchanged(cluster, index, &status, leader, term)?;
            if index == follower && caught_up.is_none() && status.applied_index >= leader_committed
            {
                caught_up = Some(Instant::now());
            }
        }
        if let Some(at) = caught_up
            && healed.elapsed() >= SETTLE_AFTER_HEAL
            && at.elapsed() >= Duration::from_secs(2)
        {
            let rounds = count_lines(log, PRE_VOTE_LOST_TEXT) - lost_before;
            return Ok((
                fault_ms,
                healed,
                format!(
                    "{} partitioned {} ms ({rounds} pre-vote rounds lost), caught up {} ms \
                     after the heal; voter{} kept leading term {term}",
                    cluster.voters[follower].name,
                    partitioned_for.as_millis(),
                    at.duration_since(healed).as_millis(),
                    leader + 1
                ),
            ));
        }
        if Instant::now() >= deadline {
            bail!(
                "the healed {} did not catch up (applied index {leader_committed}) within \
                 {LEADER_TIMEOUT:?}",
                cluster.voters[follower].name
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long leadership must stay unchanged to count as settled after a heal.
const STABLE_FOR: Duration = Duration::from_secs(2);

/// Waits until all voters agree on one leader and keep it (same leader, same term) for
/// [`STABLE_FOR`]; describes how long that took from the heal and how many terms passed since
/// `term_before` (elections caused by the fault and the heal).
///
/// # Errors
/// When leadership does not settle within [`LEADER_TIMEOUT`].
async fn settled(cluster: &Cluster, term_before: u64) -> Result<String> {
    let healed = Instant::now();
    let deadline = healed + LEADER_TIMEOUT;
    let mut current: Option<(usize, u64, Instant)> = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let (index, status) = cluster
            .wait_agreement(remaining)
            .await
            .context("no stable leader after the fault was healed")?;
        match current {
            Some((leader, term, since)) if leader == index && term == status.term => {
                if since.elapsed() >= STABLE_FOR {
                    let settled_after = since.duration_since(healed);
                    return Ok(format!(
                        "after healing: voter{} leads in term {} ({} terms since the fault), \
                         stable from {} ms after the heal",
                        index + 1,
                        term,
                        term - term_before,
                        settled_after.as_millis()
                    ));
                }
            }
            _ => current = Some((index, status.term, Instant::now())),
        }
        if Instant::now() >= deadline {
            bail!("leadership did not settle within {LEADER_TIMEOUT:?} after the heal");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Retries `operation` every 300 ms until it succeeds or `timeout` passes.
async fn retry<F, Fut>(timeout: Duration, mut operation: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match operation().await {
            Ok(()) => return Ok(()),
            Err(error) if Instant::now() >= deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// Terminal runs over `fleets`, read on the leader.
async fn terminal_runs(cluster: &Cluster, fleets: &[String]) -> Result<(usize, usize)> {
    let mut client = cluster.leader_fleet_client(Duration::from_secs(5)).await?;
    let mut terminal = 0;
    let mut unfinished = 0;
    for id in fleets {
        let fleet = client
            .get_fleet(v1::GetFleetRequest {
                fleet_id: id.clone(),
            })
            .await
            .with_context(|| format!("GetFleet {id}"))?
            .into_inner();
        let counts = fleet.counts.unwrap_or_default();
        terminal += (counts.total - counts.pending - counts.running) as usize;
        if fleet.state == v1::FleetState::Running as i32 {
            unfinished += 1;
        }
    }
    Ok((terminal, unfinished))
}

/// Waits until at least `at_least` runs of `fleets` are terminal, but fails if all `total`
/// are (the fault would then not strike mid-fleet).
async fn wait_progress(
    cluster: &mut Cluster,
    fleets: &[String],
    at_least: usize,
    total: usize,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        cluster.check_alive()?;
        // Reads may fail transiently (e.g. no quorum confirmation under load): poll again.
        match terminal_runs(cluster, fleets).await {
            Ok((terminal, _)) if terminal >= total => {
                bail!("all {total} runs finished before the fault; the workload is too small")
            }
            Ok((terminal, _)) if terminal >= at_least => return Ok(()),
            Ok((terminal, _)) if Instant::now() >= deadline => {
                bail!("only {terminal} of {total} runs finished within 60 s of submission")
            }
            Err(error) if Instant::now() >= deadline => {
                return Err(error.context("cannot read fleets from the leader"));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waits (bounded) until every fleet of `fleets` is no longer running.
async fn wait_finished(cluster: &mut Cluster, fleets: &[String]) -> Result<()> {
    let deadline = Instant::now() + FINISH_TIMEOUT;
    loop {
        cluster.check_alive()?;
        match terminal_runs(cluster, fleets).await {
            Ok((_, 0)) => return Ok(()),
            Ok((terminal, unfinished)) if Instant::now() >= deadline => bail!(
                "{unfinished} fleet(s) still running {FINISH_TIMEOUT:?} after the fault was \
                 healed ({terminal} runs terminal)"
            ),
            Err(error) if Instant::now() >= deadline => {
                return Err(error.context("cannot read fleets from the leader"));
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Waits (bounded) until no running run's current attempt is held by `worker_id` (its leases
/// expired after the TTL).
async fn wait_worker_holds_no_lease(cluster: &Cluster, worker_id: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match worker_holds_leases(cluster, worker_id).await {
            Ok(false) => return Ok(()),
            Err(error) if Instant::now() >= deadline => return Err(error),
            _ if Instant::now() >= deadline => {
                bail!("{worker_id} still held leases 30 s after it was killed")
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Waits (bounded) until some running run's current attempt is held by `worker_id`.
async fn wait_worker_holds_leases(cluster: &Cluster, worker_id: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match worker_holds_leases(cluster, worker_id).await {
            Ok(true) => return Ok(()),
            Err(error) if Instant::now() >= deadline => return Err(error),
            _ if Instant::now() >= deadline => bail!("{worker_id} held no lease within 30 s"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Whether some running run's current attempt is held by `worker_id` (one pass).
async fn worker_holds_leases(cluster: &Cluster, worker_id: &str) -> Result<bool> {
    let mut client = cluster.leader_fleet_client(Duration::from_secs(5)).await?;
    let fleets = client
        .list_fleets(v1::ListFleetsRequest::default())
        .await?
        .into_inner()
        .fleets;
    for fleet in fleets {
        let fleet = client
            .get_fleet(v1::GetFleetRequest { fleet_id: fleet.id })
            .await?
            .into_inner();
        for summary in fleet
            .runs
            .iter()
            .filter(|r| r.state == v1::RunState::Running as i32)
        {
            let run = client
                .get_run(v1::GetRunRequest {
                    run_id: summary.id.clone(),
                })
                .await?
                .into_inner();
            if run.state == v1::RunState::Running as i32
                && run
                    .attempts
                    .last()
                    .is_some_and(|a| a.worker_id == worker_id)
            {
                return Ok(true);
            }
        }
    }
    Ok(false)
}
