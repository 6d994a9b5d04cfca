//! The checker: audits the cluster's own history after a scenario, through the public API of
//! the leader, against what the client was told (the [`Ledger`]).
//!
//! It collects every violation rather than stopping at the first:
//! - fleets: every acknowledged fleet exists, every key's acknowledgements name one fleet, no
//!   fleet exists that no key was acknowledged with (a retry never created a second fleet);
//!   every fleet is finished, its counts are the tally of its runs;
//! - runs: terminal (here: `changed`, as every agent succeeds); attempts numbered 1..n
//!   without gaps, n ≤ max attempts, all finished; only the last has a terminal outcome, the
//!   earlier ones ended `lease_expired`, `infrastructure` or `cancelled`; the summary's
//!   attempt (the accepted result's fencing token) is the last attempt;
//! - events: numbered 1, 2, 3... without gaps up to the fleet's last sequence; per run exactly
//!   `leased n, ended n` for each attempt n in order (a `leased n` marked `redelivered` right
//!   after itself is the same lease sent again to a worker that lost its reply), so no result was applied twice
//!   or to a stale attempt; the last event finishes the fleet;
//! - replicas: see [`converge`]: all voters reach the same applied index and state digest.
//!
//! The limits each scenario runs under are checked on the attempts this returns, by
//! [`crate::limits::check`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flotilla_proto::outcome::outcome_name;
use flotilla_proto::v1::{self, RunState};
use flotilla_worker::client_auth::AuthChannel;

use crate::cluster::{Cluster, VOTERS};
use crate::workload::{Ledger, MAX_ATTEMPTS, Submission};

type Client = v1::fleet_service_client::FleetServiceClient<AuthChannel>;

/// What the checker saw, for the scenario's report.
#[derive(Clone, Debug, Default)]
pub struct History {
    /// Fleets checked.
    pub fleets: usize,
    /// Runs checked.
    pub runs: usize,
    /// Attempts over all runs.
    pub attempts: usize,
    /// Runs that needed more than one attempt.
    pub retried_runs: usize,
    /// Attempt outcomes and how often each occurred.
    pub outcomes: BTreeMap<String, usize>,
    /// Every attempt: (run id, attempt number, worker id, start, finish, outcome).
    pub attempt_list: Vec<AttemptRecord>,
    /// Every `RUNNING` event: (time, run id, attempt).
    pub lease_events: Vec<(u64, String, u32)>,
}

/// One attempt of one run.
#[derive(Clone, Debug)]
pub struct AttemptRecord {
    /// `fl-N-I`.
    pub run_id: String,
    /// The run's repository URL.
    pub repository: String,
    /// 1, 2, ...
    pub number: u32,
    /// The worker that held its lease.
    pub worker_id: String,
    /// Leader time of the lease.
    pub started_at_ms: u64,
    /// Leader time of its end.
    pub finished_at_ms: u64,
    /// How it ended.
    pub outcome: String,
}

impl History {
    /// Milliseconds from `fault_ms` to the first lease granted at or after it.
    pub fn first_lease_after(&self, fault_ms: u64) -> Option<u64> {
        self.lease_events
            .iter()
            .filter(|(time, _, _)| *time >= fault_ms)
            .map(|(time, _, _)| time - fault_ms)
            .min()
    }

    /// Milliseconds from `fault_ms` to the first new attempt of a run whose previous attempt
    /// was held by `worker_id` and ended `lease_expired`.
    pub fn first_retry_after_expiry(&self, worker_id: &str, fault_ms: u64) -> Option<u64> {
        self.attempt_list
            .windows(2)
            .filter(|w| {
                w[0].run_id == w[1].run_id
                    && w[0].worker_id == worker_id
                    && w[0].outcome == "lease_expired"
                    && w[1].started_at_ms >= fault_ms
            })
            .map(|w| w[1].started_at_ms - fault_ms)
            .min()
    }

    /// Attempts held by `worker_id` that ended with `outcome`.
    pub fn count(&self, worker_id: &str, outcome: &str) -> usize {
        self.attempt_list
            .iter()
            .filter(|a| a.worker_id == worker_id && a.outcome == outcome)
            .count()
    }

    /// Runs whose last (accepted) result was reached after `fault_ms` while an attempt had
    /// started before it: proof that the fault struck mid-fleet.
    pub fn runs_spanning(&self, fault_ms: u64) -> usize {
        let mut started_before = BTreeSet::new();
        let mut ended_after = BTreeSet::new();
        for attempt in &self.attempt_list {
            if attempt.started_at_ms < fault_ms {
                started_before.insert(attempt.run_id.as_str());
            }
            if attempt.finished_at_ms >= fault_ms {
                ended_after.insert(attempt.run_id.as_str());
            }
        }
        started_before.intersection(&ended_after).count()
    }
}

const TERMINAL_OUTCOMES: [&str; 5] = [
    "changed",
    "unchanged",
    "agent_failed",
    "verify_failed",
    "timed_out",
];
const RETRIED_OUTCOMES: [&str; 3] = ["lease_expired", "infrastructure", "cancelled"];

fn state_name(state: i32) -> String {
    RunState::try_from(state)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("state {state}"))
}

/// Bound for retrying one read that failed transiently.
const READ_RETRY: Duration = Duration::from_secs(15);

/// Runs a read, retrying transient failures (no quorum confirmation yet, a leader change,
/// a timeout) for up to [`READ_RETRY`]: reads are idempotent, and such a failure says
/// nothing about the history. Other errors (e.g. NOT_FOUND) are returned at once.
pub async fn read<T, F, Fut>(what: &str, mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + READ_RETRY;
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Cancelled
                        | tonic::Code::Unknown
                ) && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => return Err(anyhow::Error::new(status).context(what.to_string())),
        }
    }
}

/// Checks the fleets, runs and events against `ledger` on the leader's linearizable reads.
/// Returns what it saw, or every violation.
///
/// # Errors
/// A list of violations (or why the history could not be read).
pub async fn check_history(cluster: &Cluster, ledger: &Ledger) -> Result<History> {
    let mut client = cluster.leader_fleet_client(Duration::from_secs(20)).await?;
    let mut violations = Vec::new();
    let mut history = History::default();
    let listed = list_fleets(&mut client).await?;
    let acked = check_acknowledgements(&ledger.snapshot(), &listed, &mut violations);
    for (fleet_id, (_, runs)) in &acked {
        if !listed.contains_key(fleet_id) {
            continue;
        }
        let mut fleet = read(&format!("GetFleet {fleet_id}"), || {
            let mut client = client.clone();
            let fleet_id = fleet_id.clone();
            async move { client.get_fleet(v1::GetFleetRequest { fleet_id }).await }
        })
        .await?;
        // A fleet response holds the first page of runs; ListRuns has the rest.
        let mut page_token = std::mem::take(&mut fleet.runs_next_page_token);
        while !page_token.is_empty() {
            let page = read(&format!("ListRuns {fleet_id}"), || {
                let mut client = client.clone();
                let request = v1::ListRunsRequest {
                    fleet_id: fleet_id.clone(),
                    page_size: 1000,
                    page_token: page_token.clone(),
                    ..Default::default()
                };
                async move { client.list_runs(request).await }
            })
            .await?;
            fleet.runs.extend(page.runs);
            page_token = page.next_page_token;
        }
        check_fleet(&fleet, *runs, &mut violations);
        history.fleets += 1;
        let runs = get_runs(&client, &fleet).await?;
        history.runs += runs.len();
        for (summary, run) in fleet.runs.iter().zip(&runs) {
            check_run(summary, run, &mut history, &mut violations);
        }
        let events = watch_all(&mut client, fleet_id).await?;
        check_events(&fleet, &runs, &events, &mut history, &mut violations);
    }
    if violations.is_empty() {
        Ok(history)
    } else {
        let count = violations.len();
        violations.truncate(40);
        bail!(
            "{count} violation(s) of the cluster's guarantees:\n  {}",
            violations.join("\n  ")
        )
    }
}

/// Every fleet the leader lists: id → idempotency key.
pub async fn list_fleets(client: &mut Client) -> Result<BTreeMap<String, String>> {
    let mut fleets = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = read("ListFleets", || {
            let mut client = client.clone();
            let page_token = token.clone();
            async move {
                client
                    .list_fleets(v1::ListFleetsRequest {
                        page_size: 1000,
                        page_token,
                    })
                    .await
            }
        })
        .await?;
        for fleet in page.fleets {
            fleets.insert(fleet.id, fleet.idempotency_key);
        }
        if page.next_page_token.is_empty() {
            return Ok(fleets);
        }
        token = page.next_page_token;
    }
}

/// The runs of `fleet`, in its order. Linearizable reads each wait for a leadership
/// confirmation, so they are fetched concurrently.
async fn get_runs(client: &Client, fleet: &v1::Fleet) -> Result<Vec<v1::Run>> {
    let mut fetches = tokio::task::JoinSet::new();
    for (position, summary) in fleet.runs.iter().enumerate() {
        let client = client.clone();
        let run_id = summary.id.clone();
        fetches.spawn(async move {
            let run = read(&format!("GetRun {run_id}"), || {
                let mut client = client.clone();
                let run_id = run_id.clone();
                async move { client.get_run(v1::GetRunRequest { run_id }).await }
            })
            .await?;
            anyhow::Ok((position, run))
        });
    }
    let mut runs = Vec::with_capacity(fleet.runs.len());
    while let Some(fetched) = fetches.join_next().await {
        runs.push(fetched.context("GetRun task")??);
    }
    runs.sort_by_key(|(position, _)| *position);
    Ok(runs.into_iter().map(|(_, run)| run).collect())
}

/// Every event of a finished fleet, from the beginning to the end of the stream (a broken
/// stream is read again from where it broke).
async fn watch_all(client: &mut Client, fleet_id: &str) -> Result<Vec<v1::FleetEvent>> {
    tokio::time::timeout(Duration::from_secs(30), async {
        let mut events: Vec<v1::FleetEvent> = Vec::new();
        loop {
            let after_sequence = events.last().map_or(0, |e| e.sequence);
            let mut stream = read(&format!("WatchFleet {fleet_id}"), || {
                let mut client = client.clone();
                let fleet_id = fleet_id.to_string();
                async move {
                    client
                        .watch_fleet(v1::WatchFleetRequest {
                            fleet_id,
                            after_sequence,
                        })
                        .await
                }
            })
            .await?;
            loop {
                match stream.message().await {
                    Ok(Some(event)) => events.push(event),
                    Ok(None) => return anyhow::Ok(events),
                    Err(status) if status.code() == tonic::Code::Unavailable => break,
                    Err(status) => {
                        return Err(
                            anyhow::Error::new(status).context(format!("WatchFleet {fleet_id}"))
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .with_context(|| format!("WatchFleet {fleet_id} did not end within 30 s"))?
}

/// Acknowledgements against the fleets that exist (`listed`: id → key). Returns the
/// acknowledged fleets: id → (key, runs submitted).
fn check_acknowledgements(
    submissions: &BTreeMap<String, Submission>,
    listed: &BTreeMap<String, String>,
    violations: &mut Vec<String>,
) -> BTreeMap<String, (String, usize)> {
    let mut acked: BTreeMap<String, (String, usize)> = BTreeMap::new();
    for (key, submission) in submissions {
        let Some((first, _)) = submission.acks.first() else {
            violations.push(format!(
                "key {key} was never acknowledged: {:?}",
                submission.errors
            ));
            continue;
        };
        if submission.acks.iter().any(|(id, _)| id != first) {
            violations.push(format!(
                "key {key} acknowledged with different fleets: {:?}",
                submission.acks
            ));
        }
        if submission
            .acks
            .iter()
            .filter(|(_, created)| *created)
            .count()
            > 1
        {
            violations.push(format!(
                "key {key} reported created more than once: {:?}",
                submission.acks
            ));
        }
        if let Some((other, _)) = acked.insert(first.clone(), (key.clone(), submission.runs)) {
            violations.push(format!(
                "fleet {first} acknowledged for keys {other} and {key}"
            ));
        }
    }
    for id in acked.keys() {
        if !listed.contains_key(id) {
            violations.push(format!("acknowledged fleet {id} is missing"));
        }
    }
    for (id, key) in listed {
        match acked.get(id) {
            Some((acked_key, _)) if acked_key == key => {}
            Some((acked_key, _)) => violations.push(format!(
                "fleet {id} has key {key:?}, acknowledged for {acked_key:?}"
            )),
            None => violations.push(format!(
                "fleet {id} (key {key:?}) exists but was never acknowledged: a retry created \
                 a second fleet, or a submission was lost"
            )),
        }
    }
    acked
}

/// A fleet's state and counts.
fn check_fleet(fleet: &v1::Fleet, expected_runs: usize, violations: &mut Vec<String>) {
    let fleet_id = &fleet.id;
    if fleet.state != v1::FleetState::Finished as i32 {
        violations.push(format!(
            "fleet {fleet_id} is not finished: {:?}",
            fleet.counts
        ));
    }
    if fleet.runs.len() != expected_runs {
        violations.push(format!(
            "fleet {fleet_id} has {} runs, submitted {expected_runs}",
            fleet.runs.len()
        ));
    }
    let counts = fleet.counts.unwrap_or_default();
    let tally = |state: RunState| {
        fleet
            .runs
            .iter()
            .filter(|r| r.state == state as i32)
            .count()
    };
    let expected = [
        (counts.pending, RunState::Pending),
        (counts.running, RunState::Running),
        (counts.changed, RunState::Changed),
        (counts.unchanged, RunState::Unchanged),
        (counts.failed, RunState::Failed),
        (counts.cancelled, RunState::Cancelled),
    ];
    for (count, state) in expected {
        if count as usize != tally(state) {
            violations.push(format!(
                "fleet {fleet_id}: counts say {count} {}, runs say {}",
                state.as_str_name(),
                tally(state)
            ));
        }
    }
    if counts.total as usize != fleet.runs.len() {
        violations.push(format!(
            "fleet {fleet_id}: total {} but {} runs",
            counts.total,
            fleet.runs.len()
        ));
    }
}

fn check_run(
    summary: &v1::RunSummary,
    run: &v1::Run,
    history: &mut History,
    violations: &mut Vec<String>,
) {
    let id = &run.id;
    let attempts: Vec<String> = run
        .attempts
        .iter()
        .map(|a| format!("#{} {} by {}", a.number, a.outcome, a.worker_id))
        .collect();
    if run.state != RunState::Changed as i32 {
        violations.push(format!(
            "run {id} ended {} (every agent here succeeds, so it should be CHANGED); \
             attempts: {attempts:?}",
            state_name(run.state)
        ));
    }
    if summary.state != run.state {
        violations.push(format!(
            "run {id}: fleet says {}, run says {}",
            state_name(summary.state),
            state_name(run.state)
        ));
    }
    let n = run.attempts.len();
    history.attempts += n;
    if n > 1 {
        history.retried_runs += 1;
    }
    if n == 0 || n > MAX_ATTEMPTS as usize {
        violations.push(format!(
            "run {id} has {n} attempts (1..={MAX_ATTEMPTS} allowed)"
        ));
    }
    for (position, attempt) in run.attempts.iter().enumerate() {
        // The outcome's name (`lease_expired`, ...), `""` while the attempt has none.
        let outcome = outcome_name(attempt.outcome);
        *history.outcomes.entry(outcome.to_owned()).or_default() += 1;
        history.attempt_list.push(AttemptRecord {
            run_id: id.clone(),
            repository: run.repository.clone(),
            number: attempt.number,
            worker_id: attempt.worker_id.clone(),
            started_at_ms: attempt.started_at_ms,
            finished_at_ms: attempt.finished_at_ms,
            outcome: outcome.to_owned(),
        });
        if attempt.number as usize != position + 1 {
            violations.push(format!(
                "run {id}: attempt at position {} is numbered {}: {attempts:?}",
                position + 1,
                attempt.number
            ));
        }
        if attempt.finished_at_ms == 0 || attempt.finished_at_ms < attempt.started_at_ms {
            violations.push(format!(
                "run {id}: attempt {} not properly finished ({}..{})",
                attempt.number, attempt.started_at_ms, attempt.finished_at_ms
            ));
        }
        let last = position + 1 == n;
        if last {
            let consistent = match RunState::try_from(run.state) {
                Ok(RunState::Changed) => outcome == "changed",
                Ok(RunState::Unchanged) => outcome == "unchanged",
                Ok(RunState::Failed) => {
                    !outcome.is_empty() && outcome != "changed" && outcome != "unchanged"
                }
                Ok(RunState::Cancelled) => outcome == "cancelled",
                _ => false,
            };
            if !consistent {
                violations.push(format!(
                    "run {id}: state {} but last attempt outcome {:?}",
                    state_name(run.state),
                    outcome
                ));
            }
        } else if !RETRIED_OUTCOMES.contains(&outcome) {
            let kind = if TERMINAL_OUTCOMES.contains(&outcome) {
                "a terminal outcome"
            } else {
                "an unknown outcome"
            };
            violations.push(format!(
                "run {id}: attempt {} of {n} has {kind} {:?} but was followed by another \
                 attempt: {attempts:?}",
                attempt.number, outcome
            ));
        }
    }
    if summary.attempt as usize != n {
        violations.push(format!(
            "run {id}: the result's attempt is {}, the last attempt is {n}",
            summary.attempt
        ));
    }
    if run.state == RunState::Changed as i32 && (run.commit.is_empty() || !run.pushed) {
        violations.push(format!(
            "run {id} changed without commit or push (commit {:?}, pushed {})",
            run.commit, run.pushed
        ));
    }
}

/// A fleet's event stream: gapless sequence numbers; per run exactly "leased #1, ended #1,
/// leased #2, ..., ended #n" (ended PENDING except the last); the last event finishes the fleet.
fn check_events(
    fleet: &v1::Fleet,
    runs: &[v1::Run],
    events: &[v1::FleetEvent],
    history: &mut History,
    violations: &mut Vec<String>,
) {
    let fleet_id = &fleet.id;
    for (position, event) in events.iter().enumerate() {
        if event.sequence != position as u64 + 1 {
            violations.push(format!(
                "fleet {fleet_id}: event at position {} has sequence {}",
                position + 1,
                event.sequence
            ));
            break;
        }
    }
    if events.len() as u64 != fleet.last_sequence {
        violations.push(format!(
            "fleet {fleet_id}: {} events streamed, last sequence {}",
            events.len(),
            fleet.last_sequence
        ));
    }
    match events.last() {
        Some(last) if last.fleet_state == v1::FleetState::Finished as i32 => {}
        other => violations.push(format!(
            "fleet {fleet_id}: the last event does not finish the fleet: {other:?}"
        )),
    }
    let mut per_run: BTreeMap<&str, Vec<(i32, u32)>> = BTreeMap::new();
    for event in events {
        if event.run_id.is_empty() {
            continue;
        }
        let seen = per_run.entry(event.run_id.as_str()).or_default();
        let entry = (event.run_state, event.attempt);
        // A lease sent again to a worker that never received it (lease reconciliation) repeats
        // `leased n` with nothing between, marked `redelivered`: the same attempt, not a second
        // one. An unmarked repeat stays a violation (a double lease).
        if event.redelivered
            && event.run_state == RunState::Running as i32
            && seen.last() == Some(&entry)
        {
            continue;
        }
        seen.push(entry);
        if event.run_state == RunState::Running as i32 {
            history
                .lease_events
                .push((event.time_ms, event.run_id.clone(), event.attempt));
        }
    }
    for run in runs {
        let attempts = run.attempts.len() as u32;
        let seen = per_run.remove(run.id.as_str()).unwrap_or_default();
        let matches = seen.len() == 2 * attempts as usize
            && seen.iter().enumerate().all(|(i, (state, attempt))| {
                let number = i as u32 / 2 + 1;
                let leased = i % 2 == 0;
                let last = number == attempts;
                *attempt == number
                    && if leased {
                        *state == RunState::Running as i32
                    } else {
                        *state != RunState::Running as i32
                            && (*state == RunState::Pending as i32) != last
                    }
            });
        if !matches {
            let seen: Vec<String> = seen
                .iter()
                .map(|(state, attempt)| format!("{}#{attempt}", state_name(*state)))
                .collect();
            violations.push(format!(
                "fleet {fleet_id}: run {} with {attempts} attempt(s) has events {seen:?}",
                run.id
            ));
        }
    }
    for run_id in per_run.keys() {
        violations.push(format!("fleet {fleet_id}: events for unknown run {run_id}"));
    }
}

/// The voters' applied index and digest once they agree.
#[derive(Clone, Debug)]
pub struct Convergence {
    /// The common applied index.
    pub applied_index: u64,
    /// The common state digest.
    pub digest: String,
    /// How long it took to agree.
    pub waited: Duration,
}

/// Polls `StateDigest` on every voter until all report the same applied index and digest.
/// Two voters with the same applied index and different digests have diverged: that fails at
/// once.
///
/// # Errors
/// On divergence, or when they do not agree within `timeout`.
pub async fn converge(cluster: &Cluster, timeout: Duration) -> Result<Convergence> {
    let start = Instant::now();
    loop {
        let mut answers = Vec::new();
        let mut problem = None;
        for index in 0..VOTERS {
            match cluster.digest(index).await {
                Ok(answer) => answers.push(answer),
                Err(error) => problem = Some(format!("voter{}: {error:#}", index + 1)),
            }
        }
        for a in &answers {
            for b in &answers {
                if a.node_id < b.node_id
                    && a.applied_index == b.applied_index
                    && a.digest != b.digest
                {
                    bail!(
                        "replicas diverged: node {} and node {} both applied index {} with \
                         digests {} and {}",
                        a.node_id,
                        b.node_id,
                        a.applied_index,
                        a.digest,
                        b.digest
                    );
                }
            }
        }
        if problem.is_none()
            && answers.len() == VOTERS
            && answers.iter().all(|a| {
                a.applied_index == answers[0].applied_index && a.digest == answers[0].digest
            })
        {
            return Ok(Convergence {
                applied_index: answers[0].applied_index,
                digest: answers[0].digest.clone(),
                waited: start.elapsed(),
            });
        }
        if start.elapsed() >= timeout {
            let seen: Vec<String> = answers
                .iter()
                .map(|a| {
                    format!(
                        "node {}: index {} digest {}",
                        a.node_id, a.applied_index, a.digest
                    )
                })
                .collect();
            bail!(
                "voters did not converge within {timeout:?}: {}{}",
                seen.join("; "),
                problem.map(|p| format!("; {p}")).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    //! The checker must catch what it claims to: each test breaks one guarantee in an otherwise
    //! valid history and expects a violation naming it.

    use super::*;
    use flotilla_proto::outcome::outcome_to_wire;

    fn run(id: &str, outcomes: &[&str]) -> v1::Run {
        let state = match outcomes.last() {
            Some(&"changed") => RunState::Changed,
            Some(&"unchanged") => RunState::Unchanged,
            _ => RunState::Failed,
        };
        v1::Run {
            id: id.into(),
            fleet_id: "fl-1".into(),
            state: state as i32,
            attempts: outcomes
                .iter()
                .enumerate()
                .map(|(i, outcome)| v1::Attempt {
                    credential_events: Vec::new(),
                    number: i as u32 + 1,
                    worker_id: format!("worker{}", i % 2 + 1),
                    started_at_ms: 1_000 + i as u64 * 100,
                    finished_at_ms: 1_050 + i as u64 * 100,
                    outcome: outcome_to_wire(flotilla_domain::Outcome::parse(outcome)),
                    ..Default::default()
                })
                .collect(),
            commit: "0123abcd".into(),
            pushed: true,
            ..Default::default()
        }
    }

    fn summary(run: &v1::Run) -> v1::RunSummary {
        v1::RunSummary {
            id: run.id.clone(),
            state: run.state,
            attempt: run.attempts.len() as u32,
            ..Default::default()
        }
    }

    fn event(sequence: u64, run_id: &str, state: RunState, attempt: u32) -> v1::FleetEvent {
        v1::FleetEvent {
            fleet_id: "fl-1".into(),
            sequence,
            time_ms: 1_000 + sequence,
            run_id: run_id.into(),
            run_state: state as i32,
            attempt,
            fleet_state: v1::FleetState::Running as i32,
            ..Default::default()
        }
    }

    /// A finished fleet over `runs` with the events a correct cluster records for them.
    fn fleet(runs: &[v1::Run]) -> (v1::Fleet, Vec<v1::FleetEvent>) {
        let mut events = vec![event(1, "", RunState::Unspecified, 0)];
        for run in runs {
            let n = run.attempts.len() as u32;
            for number in 1..=n {
                let next = events.len() as u64 + 1;
                events.push(event(next, &run.id, RunState::Running, number));
                let end = if number == n {
                    RunState::try_from(run.state).unwrap()
                } else {
                    RunState::Pending
                };
                events.push(event(next + 1, &run.id, end, number));
            }
        }
        let mut last = event(events.len() as u64 + 1, "", RunState::Unspecified, 0);
        last.fleet_state = v1::FleetState::Finished as i32;
        events.push(last);
        let count =
            |state: RunState| runs.iter().filter(|r| r.state == state as i32).count() as u32;
        let fleet = v1::Fleet {
            id: "fl-1".into(),
            state: v1::FleetState::Finished as i32,
            counts: Some(v1::RunCounts {
                changed: count(RunState::Changed),
                unchanged: count(RunState::Unchanged),
                failed: count(RunState::Failed),
                total: runs.len() as u32,
                ..Default::default()
            }),
            runs: runs.iter().map(summary).collect(),
            last_sequence: events.len() as u64,
            ..Default::default()
        };
        (fleet, events)
    }

    fn violations_of(
        fleet: &v1::Fleet,
        runs: &[v1::Run],
        events: &[v1::FleetEvent],
    ) -> Vec<String> {
        let mut violations = Vec::new();
        let mut history = History::default();
        check_fleet(fleet, runs.len(), &mut violations);
        for (summary, run) in fleet.runs.iter().zip(runs) {
            check_run(summary, run, &mut history, &mut violations);
        }
        check_events(fleet, runs, events, &mut history, &mut violations);
        violations
    }

    fn valid_runs() -> Vec<v1::Run> {
        vec![
            run("fl-1-0", &["changed"]),
            run("fl-1-1", &["lease_expired", "infrastructure", "changed"]),
        ]
    }

    #[test]
    fn a_valid_history_passes() {
        let runs = valid_runs();
        let (fleet, events) = fleet(&runs);
        assert_eq!(violations_of(&fleet, &runs, &events), Vec::<String>::new());
    }

    /// `events` with the event at `position` repeated right after itself, renumbered.
    fn with_repeated(events: &[v1::FleetEvent], position: usize) -> Vec<v1::FleetEvent> {
        let mut repeated = events.to_vec();
        let mut again = events[position].clone();
        again.redelivered = true;
        repeated.insert(position + 1, again);
        for (index, event) in repeated.iter_mut().enumerate() {
            event.sequence = index as u64 + 1;
        }
        repeated
    }

    #[test]
    fn a_lease_sent_again_is_the_same_attempt_but_a_second_result_is_caught() {
        let runs = valid_runs();
        let (mut fleet, events) = fleet(&runs);
        fleet.last_sequence += 1;
        // Event 2 is fl-1-0's `leased 1`: sent again to a worker that lost the reply.
        let resent = with_repeated(&events, 1);
        assert_eq!(violations_of(&fleet, &runs, &resent), Vec::<String>::new());
        // Event 3 is fl-1-0's result: a result applied twice is a violation.
        let twice = with_repeated(&events, 2);
        let found = violations_of(&fleet, &runs, &twice);
        assert!(
            found
                .iter()
                .any(|v| v.contains("run fl-1-0 with 1 attempt(s)")),
            "{found:?}"
        );
    }

    #[test]
    fn attempt_gaps_are_caught() {
        let mut runs = valid_runs();
        let (fleet, events) = fleet(&runs);
        runs[1].attempts[1].number = 3;
        let found = violations_of(&fleet, &runs, &events);
        assert!(
            found.iter().any(|v| v.contains("is numbered 3")),
            "{found:?}"
        );
    }

    #[test]
    fn a_second_terminal_result_is_caught() {
        let runs = vec![run("fl-1-0", &["changed", "changed"])];
        let (fleet, events) = fleet(&runs);
        let found = violations_of(&fleet, &runs, &events);
        assert!(
            found.iter().any(|v| v.contains("terminal outcome")),
            "{found:?}"
        );
    }

    #[test]
    fn a_result_for_a_stale_attempt_is_caught() {
        let runs = valid_runs();
        let (mut fleet, mut events) = fleet(&runs);
        // The summary says the accepted result was attempt 2 of 3.
        fleet.runs[1].attempt = 2;
        // And the event of the end of attempt 3 names attempt 2.
        let end = events.len() - 2;
        events[end].attempt = 2;
        let found = violations_of(&fleet, &runs, &events);
        assert!(
            found
                .iter()
                .any(|v| v.contains("the result's attempt is 2")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|v| v.contains("run fl-1-1 with 3 attempt(s)")),
            "{found:?}"
        );
    }

    #[test]
    fn an_unfinished_or_failed_run_is_caught() {
        let mut runs = valid_runs();
        runs[0].state = RunState::Running as i32;
        runs[0].attempts[0].outcome = 0;
        runs[0].attempts[0].finished_at_ms = 0;
        let (fleet, events) = fleet(&runs);
        let found = violations_of(&fleet, &runs, &events);
        assert!(
            found.iter().any(|v| v.contains("ended RUN_STATE_RUNNING")),
            "{found:?}"
        );
        assert!(
            found.iter().any(|v| v.contains("not properly finished")),
            "{found:?}"
        );
    }

    #[test]
    fn event_gaps_and_double_leases_are_caught() {
        let runs = valid_runs();
        let (fleet, events) = fleet(&runs);
        let mut gap = events.clone();
        gap.remove(3);
        let found = violations_of(&fleet, &runs, &gap);
        assert!(
            found.iter().any(|v| v.contains("has sequence")),
            "{found:?}"
        );
        let mut double = events.clone();
        double.insert(2, event(0, "fl-1-0", RunState::Running, 1));
        for (i, e) in double.iter_mut().enumerate() {
            e.sequence = i as u64 + 1;
        }
        let found = violations_of(&fleet, &runs, &double);
        assert!(
            found
                .iter()
                .any(|v| v.contains("run fl-1-0 with 1 attempt(s)")),
            "{found:?}"
        );
    }

    #[test]
    fn wrong_counts_are_caught() {
        let runs = valid_runs();
        let (mut fleet, events) = fleet(&runs);
        fleet.counts.as_mut().unwrap().changed = 1;
        fleet.counts.as_mut().unwrap().failed = 1;
        let found = violations_of(&fleet, &runs, &events);
        assert!(
            found
                .iter()
                .any(|v| v.contains("counts say 1 RUN_STATE_CHANGED")),
            "{found:?}"
        );
    }

    fn submission(acks: &[(&str, bool)]) -> Submission {
        Submission {
            runs: 2,
            acks: acks.iter().map(|(id, c)| (id.to_string(), *c)).collect(),
            errors: Vec::new(),
        }
    }

    #[test]
    fn acknowledgements_against_fleets() {
        let listed: BTreeMap<String, String> = [("fl-1", "a"), ("fl-2", "b")]
            .iter()
            .map(|(id, key)| (id.to_string(), key.to_string()))
            .collect();
        let mut submissions = BTreeMap::new();
        submissions.insert("a".to_string(), submission(&[("fl-1", true)]));
        // An ambiguous first attempt, then the retry with the same key: one fleet.
        submissions.insert("b".to_string(), submission(&[("fl-2", false)]));
        let mut violations = Vec::new();
        let acked = check_acknowledgements(&submissions, &listed, &mut violations);
        assert_eq!(violations, Vec::<String>::new());
        assert_eq!(acked.len(), 2);

        // A retry that created a second fleet, an acknowledged fleet that vanished, a key
        // acknowledged with two fleets.
        let mut listed_bad = listed.clone();
        listed_bad.insert("fl-3".into(), "b".into());
        listed_bad.remove("fl-1");
        submissions.insert(
            "c".to_string(),
            submission(&[("fl-4", true), ("fl-5", true)]),
        );
        let mut violations = Vec::new();
        check_acknowledgements(&submissions, &listed_bad, &mut violations);
        let text = violations.join("\n");
        assert!(
            text.contains("fl-3 (key \"b\") exists but was never acknowledged"),
            "{text}"
        );
        assert!(
            text.contains("acknowledged fleet fl-1 is missing"),
            "{text}"
        );
        assert!(
            text.contains("key c acknowledged with different fleets"),
            "{text}"
        );
        assert!(
            text.contains("key c reported created more than once"),
            "{text}"
        );
    }
}
