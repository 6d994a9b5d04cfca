//! The flow-control limits every fault scenario runs under, and the checks that they held
//! across the fault (issue 10): a cluster-wide concurrency limit below the workers' slots, and
//! a per-repository rate limit.
//!
//! Both are checked from the outside, on the attempts the leader reports after the scenario
//! (leader-stamped times, which the state machine never lets run backwards):
//! - slots: at no instant do more attempts hold a lease than [`MAX_RUNNING`] (a sweep over
//!   the attempts' `[started_at_ms, finished_at_ms)` intervals, an interval ending at `t`
//!   before one starting at `t`), and once every fleet is finished the limit's usage shows no
//!   slot held (none leaked across a kill, a partition or a leader change);
//! - buckets: for every repository, any `k` leases within `L` ms are at most
//!   `burst + L / T` (GCRA's bound, `T` the emission interval; `scheduler::limit::gcra`), which
//!   a new leader that lost or reset a bucket breaks whenever it leases a repository again
//!   within one period of that repository's last lease.
//!
//! A limit that never binds proves nothing, so the slot check also requires the peak to reach
//! [`MAX_RUNNING`], and the rate check reports the shortest gap it saw.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use flotilla_proto::v1;
use flotilla_proto::v1::limit_service_client::LimitServiceClient;
use flotilla_worker::client_auth::AuthChannel;

use crate::checker::{AttemptRecord, read};
use crate::cluster::{Cluster, WORKER_SLOTS, WORKERS, channel};

/// The cluster-wide concurrency limit's name.
pub const RUNNING_LIMIT: &str = "chaos-running";
/// Runs running at once in the whole cluster: below the workers' slots
/// ([`WORKERS`] × [`WORKER_SLOTS`]), so the limit, not the slots, is what binds.
pub const MAX_RUNNING: u32 = 6;
/// The concurrency limit's bound on waiting runs.
pub const MAX_QUEUED: u32 = 1_000;
/// The per-repository rate limit's name.
pub const REPOSITORY_RATE_LIMIT: &str = "chaos-per-repository";
/// Leases of one repository per [`REPOSITORY_RATE_PERIOD_MS`]: one, with no burst, so the
/// fleets of a scenario, which share every repository, take turns on it.
pub const REPOSITORY_RATE_UNITS: u32 = 1;
/// The per-repository rate limit's period.
pub const REPOSITORY_RATE_PERIOD_MS: u64 = 1_500;
/// Burst of the per-repository rate limit.
pub const REPOSITORY_RATE_BURST: u32 = 1;

const _: () = assert!(MAX_RUNNING < WORKERS as u32 * WORKER_SLOTS);

fn spec(name: &str, key: v1::LimitKey, kind: v1::limit_spec::Kind) -> v1::LimitSpec {
    v1::LimitSpec {
        name: name.into(),
        project: String::new(),
        key: key as i32,
        kind: Some(kind),
    }
}

async fn client(cluster: &Cluster) -> Result<LimitServiceClient<AuthChannel>> {
    let (leader, _) = cluster.wait_agreement(Duration::from_secs(20)).await?;
    Ok(LimitServiceClient::new(
        channel(&cluster.voter_url(leader), Duration::from_secs(10)).await?,
    ))
}

/// Creates both limits on the leader, before any fleet is submitted.
///
/// # Errors
/// When there is no leader or the leader refuses a limit.
pub async fn create(cluster: &Cluster) -> Result<()> {
    let mut client = client(cluster).await?;
    let limits = [
        spec(
            RUNNING_LIMIT,
            v1::LimitKey::Global,
            v1::limit_spec::Kind::Concurrency(v1::ConcurrencyLimit {
                max_running: MAX_RUNNING,
                when_full: v1::WhenFull::Queue as i32,
                // Bounded, above anything a scenario queues (about 200 runs): every submission
                // is checked against it across the fault, and none is refused.
                max_queued: MAX_QUEUED,
            }),
        ),
        spec(
            REPOSITORY_RATE_LIMIT,
            v1::LimitKey::Repository,
            v1::limit_spec::Kind::Rate(v1::RateLimit {
                limit: REPOSITORY_RATE_UNITS,
                period_ms: REPOSITORY_RATE_PERIOD_MS,
                burst: REPOSITORY_RATE_BURST,
            }),
        ),
    ];
    for limit in limits {
        let name = limit.name.clone();
        client
            .create_limit(v1::CreateLimitRequest { spec: Some(limit) })
            .await
            .with_context(|| format!("CreateLimit {name}"))?;
    }
    Ok(())
}

/// The most attempts that held a lease at one instant.
pub fn peak_running(attempts: &[AttemptRecord]) -> usize {
    // (time, +1 for a start / -1 for an end); at one time, ends sort before starts.
    let mut edges: Vec<(u64, i64)> = attempts
        .iter()
        .flat_map(|a| [(a.started_at_ms, 1), (a.finished_at_ms, -1)])
        .collect();
    edges.sort_unstable();
    let mut running = 0i64;
    let mut peak = 0i64;
    for (_, change) in edges {
        running += change;
        peak = peak.max(running);
    }
    peak.max(0) as usize
}

/// GCRA's bound broken by the leases of one key, if any: `(first, last, count, allowed)` for
/// the first window `[first, last]` (ms) holding more leases than `burst + L / T`.
pub fn rate_violation(
    lease_times_ms: &[u64],
    limit: u32,
    period_ms: u64,
    burst: u32,
) -> Option<(u64, u64, usize, u64)> {
    debug_assert!(lease_times_ms.is_sorted());
    let emission_interval_us = (period_ms * 1_000 / u64::from(limit)).max(1);
    for (i, first) in lease_times_ms.iter().enumerate() {
        for (j, last) in lease_times_ms.iter().enumerate().skip(i + 1) {
            let allowed = u64::from(burst) + (last - first) * 1_000 / emission_interval_us;
            let count = j - i + 1;
            if count as u64 > allowed {
                return Some((*first, *last, count, allowed));
            }
        }
    }
    None
}

/// What [`check`] measured.
#[derive(Clone, Copy, Debug)]
pub struct LimitReport {
    /// The most runs that ran at once.
    pub peak_running: usize,
    /// The shortest time between two leases of one repository, in ms.
    pub shortest_repository_gap_ms: Option<u64>,
}

/// Checks both limits on `attempts` (every attempt of the scenario, with its repository) and
/// the leader's usage of the concurrency limit.
///
/// # Errors
/// Every violation found, or why the usage could not be read.
pub async fn check(cluster: &Cluster, attempts: &[AttemptRecord]) -> Result<LimitReport> {
    let mut violations = Vec::new();
    let peak_running = peak_running(attempts);
    if peak_running > MAX_RUNNING as usize {
        violations.push(format!(
            "{peak_running} runs ran at once, over the limit {RUNNING_LIMIT} of {MAX_RUNNING}"
        ));
    } else if peak_running < MAX_RUNNING as usize {
        violations.push(format!(
            "at most {peak_running} runs ran at once: the limit {RUNNING_LIMIT} of \
             {MAX_RUNNING} never bound, so this scenario did not test it"
        ));
    }
    let mut by_repository: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for attempt in attempts {
        by_repository
            .entry(attempt.repository.as_str())
            .or_default()
            .push(attempt.started_at_ms);
    }
    let mut shortest_repository_gap_ms: Option<u64> = None;
    for (repository, times) in &mut by_repository {
        times.sort_unstable();
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            shortest_repository_gap_ms =
                Some(shortest_repository_gap_ms.map_or(gap, |g| g.min(gap)));
        }
        if let Some((first, last, count, allowed)) = rate_violation(
            times,
            REPOSITORY_RATE_UNITS,
            REPOSITORY_RATE_PERIOD_MS,
            REPOSITORY_RATE_BURST,
        ) {
            violations.push(format!(
                "{repository}: {count} leases in [{first}, {last}] ms, where the limit \
                 {REPOSITORY_RATE_LIMIT} allows {allowed}"
            ));
        }
    }
    let client = client(cluster).await?;
    let limit = read(&format!("GetLimit {RUNNING_LIMIT}"), || {
        let mut client = client.clone();
        async move {
            client
                .get_limit(v1::GetLimitRequest {
                    name: RUNNING_LIMIT.into(),
                })
                .await
        }
    })
    .await?;
    for usage in limit.usage.iter().filter(|u| u.running > 0) {
        violations.push(format!(
            "every fleet is finished, yet {RUNNING_LIMIT} counts {} running under key {:?}: \
             a slot leaked",
            usage.running, usage.key
        ));
    }
    if violations.is_empty() {
        Ok(LimitReport {
            peak_running,
            shortest_repository_gap_ms,
        })
    } else {
        bail!("the limits did not hold:\n  {}", violations.join("\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(started_at_ms: u64, finished_at_ms: u64) -> AttemptRecord {
        AttemptRecord {
            run_id: "fl-1-0".into(),
            repository: "r".into(),
            number: 1,
            worker_id: "w".into(),
            started_at_ms,
            finished_at_ms,
            outcome: "changed".into(),
        }
    }

    #[test]
    fn the_peak_counts_overlaps_and_an_end_frees_its_slot_for_a_start_at_the_same_instant() {
        assert_eq!(peak_running(&[]), 0);
        assert_eq!(peak_running(&[attempt(0, 10), attempt(5, 15)]), 2);
        assert_eq!(peak_running(&[attempt(0, 10), attempt(10, 20)]), 1);
        assert_eq!(
            peak_running(&[attempt(0, 10), attempt(1, 3), attempt(2, 4), attempt(4, 5)]),
            3
        );
    }

    #[test]
    fn the_rate_bound_is_gcra_s() {
        // 1 per 1500 ms, burst 1: consecutive leases at least 1500 ms apart.
        assert_eq!(rate_violation(&[0, 1_500, 3_000], 1, 1_500, 1), None);
        // The first window found is the widest from the earliest lease: 3 in [0, 2999] ms,
        // where 1 + 2999 / 1500 = 2 are allowed.
        assert_eq!(
            rate_violation(&[0, 1_500, 2_999], 1, 1_500, 1),
            Some((0, 2_999, 3, 2))
        );
        assert_eq!(
            rate_violation(&[0, 1_499], 1, 1_500, 1),
            Some((0, 1_499, 2, 1))
        );
        // 10 per second, burst 3: 3 at once, then one per 100 ms.
        assert_eq!(rate_violation(&[0, 0, 0, 100, 200], 10, 1_000, 3), None);
        assert_eq!(
            rate_violation(&[0, 0, 0, 0], 10, 1_000, 3),
            Some((0, 0, 4, 3))
        );
    }
}
