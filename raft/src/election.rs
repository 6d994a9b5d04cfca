//! The election timer that replaces openraft's: a fresh random election timeout for every
//! campaign (Raft §5.2), and the count of campaigns this node started.
//!
//! openraft 0.9 draws a node's election timeout once, when the node starts
//! (`EngineConfig::new`), so two nodes that drew close timeouts collide again in every
//! election. With [`RaftNodeConfig::resample_election_timeout`](crate::RaftNodeConfig) on (the
//! default), openraft runs with `enable_elect = false` and [`run`] decides when to campaign:
//!
//! - [`LeaderContact`] holds the last time this node heard from a leader (an AppendEntries or
//!   InstallSnapshot that it accepted) or granted a vote; [`RaftGrpcService`] records it;
//! - a voter that is neither leader nor learner campaigns ([`Trigger::elect`]) once nothing was
//!   heard for its current timeout, measured from the latest of that contact, its previous
//!   campaign, and the moment it last became eligible (a learner promoted to voter, a leader
//!   that stepped down);
//! - every campaign draws a new timeout uniformly from
//!   `[election_timeout_min_ms, election_timeout_max_ms)`;
//! - the only voter of a cluster campaigns at once (it cannot split a vote), as openraft does,
//!   unless it heard from a leader since it was opened (the leader removed itself): then it
//!   waits for its timeout like any voter.
//!
//! - a voter that refused its vote to a candidate because the candidate's log is behind its own
//!   (openraft then keeps its own, lower term) campaigns soon after, in a term above that
//!   candidate's. Raft has the refusing node adopt the candidate's term (§5.1); openraft 0.9
//!   does not, so without this rule the up-to-date node's next campaign reuses the outdated
//!   candidate's term, collides with that candidate's self-vote, and the pair can livelock for
//!   many rounds (seen in `flotilla bench failover`: 10-12 s to a new leader). The campaign
//!   waits a random fraction of the minimum timeout first, so two up-to-date nodes rarely jump
//!   together, and is skipped while a leader is heard.
//!
//! With the switch off, openraft's own timer campaigns and [`run`] only counts.
//!
//! [`RaftGrpcService`]: crate::RaftGrpcService
//! [`Trigger::elect`]: openraft::raft::trigger::Trigger::elect

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use openraft::{RaftMetrics, ServerState};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until};

use crate::types::{NodeId, Raft};

/// What the gRPC service and the election timer share: when this node last heard from a leader,
/// and how many campaigns it started.
#[derive(Debug, Default)]
pub(crate) struct LeaderContact {
    /// The last accepted AppendEntries / InstallSnapshot or granted vote; `None` before any.
    last_contact: Mutex<Option<Instant>>,
    /// Campaigns this node started (terms in which it voted for itself).
    elections_started: AtomicU64,
    /// The highest term of a candidate this node refused because the candidate's log is behind
    /// its own, not yet outrun by a campaign of this node.
    outdated_candidate_term: Mutex<Option<u64>>,
    /// Wakes the timer when `outdated_candidate_term` is set.
    outdated_candidate: tokio::sync::Notify,
}

impl LeaderContact {
    /// Records that this node heard from a leader (or granted a vote) now.
    pub(crate) fn record(&self) {
        let now = Instant::now();
        let mut last_contact = self
            .last_contact
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *last_contact = Some(last_contact.map_or(now, |last| last.max(now)));
    }

    /// Records that this node refused its vote to a candidate of `term` whose log is behind its
    /// own, and wakes the timer to outrun it.
    pub(crate) fn record_outdated_candidate(&self, term: u64) {
        let mut pending = self
            .outdated_candidate_term
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *pending = Some(pending.map_or(term, |known| known.max(term)));
        drop(pending);
        self.outdated_candidate.notify_one();
    }

    fn take_outdated_candidate(&self) -> Option<u64> {
        self.outdated_candidate_term
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// The last time this node heard from a leader or granted a vote.
    fn last_contact(&self) -> Option<Instant> {
        *self
            .last_contact
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The number of campaigns this node started since it was opened.
    pub(crate) fn elections_started(&self) -> u64 {
        self.elections_started.load(Ordering::Relaxed)
    }
}

/// How [`run`] works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimerMode {
    /// Campaign after a timeout drawn from `[min_ms, max_ms)` afresh for every campaign.
    Resample {
        /// Lower bound of the election timeout, in milliseconds.
        min_ms: u64,
        /// Upper bound (excluded) of the election timeout, in milliseconds.
        max_ms: u64,
    },
    /// openraft's timer campaigns; only count the campaigns.
    CountOnly,
}

/// Whether the node may campaign, from its metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Eligibility {
    /// The core stopped.
    Stopped,
    /// A leader, a learner, or a node outside the membership (not initialized, or removed).
    Ineligible,
    /// A follower or candidate that is a voter; `sole_voter` if it is the only one.
    Eligible { sole_voter: bool },
}

impl Eligibility {
    fn of(metrics: &RaftMetrics<NodeId, openraft::BasicNode>, node_id: NodeId) -> Self {
        if metrics.running_state.is_err() {
            return Eligibility::Stopped;
        }
        match metrics.state {
            ServerState::Shutdown => Eligibility::Stopped,
            ServerState::Leader | ServerState::Learner => Eligibility::Ineligible,
            ServerState::Follower | ServerState::Candidate => {
                let voters: Vec<NodeId> =
                    metrics.membership_config.membership().voter_ids().collect();
                if voters.contains(&node_id) {
                    Eligibility::Eligible {
                        sole_voter: voters.len() == 1,
                    }
                } else {
                    Eligibility::Ineligible
                }
            }
        }
    }
}

/// A timeout drawn uniformly from `[min_ms, max_ms)`, with openraft's generator.
fn draw_timeout(min_ms: u64, max_ms: u64) -> std::time::Duration {
    let range = openraft::Config {
        election_timeout_min: min_ms,
        election_timeout_max: max_ms,
        ..openraft::Config::default()
    };
    let milliseconds = if min_ms < max_ms {
        range.new_rand_election_timeout::<openraft::TokioRuntime>()
    } else {
        min_ms
    };
    std::time::Duration::from_millis(milliseconds)
}

/// Counts the campaigns visible in `metrics`: a vote for this node in a term above
/// `observed_term`.
fn count_campaign(
    metrics: &RaftMetrics<NodeId, openraft::BasicNode>,
    node_id: NodeId,
    observed_term: &mut u64,
    contact: &LeaderContact,
) {
    let leader_id = metrics.vote.leader_id();
    if leader_id.term > *observed_term {
        *observed_term = leader_id.term;
        if leader_id.voted_for() == Some(node_id) {
            let started = contact.elections_started.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::info!(
                node_id,
                term = leader_id.term,
                elections_started = started,
                "this node started a campaign"
            );
        }
    }
}

/// The election timer of node `node_id` (see the module documentation). Ends when the node
/// stops, or when `stop` changes or its sender is dropped.
pub(crate) async fn run(
    raft: Raft,
    node_id: NodeId,
    contact: std::sync::Arc<LeaderContact>,
    mode: TimerMode,
    mut stop: watch::Receiver<bool>,
) {
    // Campaigns before the timer started (a restarted leader's term) are not counted.
    let Ok(mut observed_term) = raft
        .with_raft_state(|state| state.vote_ref().leader_id().term)
        .await
    else {
        return;
    };
    let mut metrics = raft.metrics();
    // The start of the current wait: when the timer started, this node last campaigned, or it
    // last became eligible.
    let mut since = Instant::now();
    let mut timeout = match mode {
        TimerMode::Resample { min_ms, max_ms } => draw_timeout(min_ms, max_ms),
        TimerMode::CountOnly => std::time::Duration::ZERO,
    };
    let mut campaigned_since_eligible = false;
    loop {
        let eligibility = {
            let current = metrics.borrow_and_update();
            count_campaign(&current, node_id, &mut observed_term, &contact);
            Eligibility::of(&current, node_id)
        };
        let wake_at = match (mode, eligibility) {
            (_, Eligibility::Stopped) => return,
            (TimerMode::CountOnly, _) | (_, Eligibility::Ineligible) => None,
            (TimerMode::Resample { min_ms, max_ms }, Eligibility::Eligible { sole_voter }) => {
                let last_contact = contact.last_contact();
                // The only voter campaigns at once, unless it was following a leader (one that
                // just removed itself, say): then it waits like any voter, so that leader can
                // finish committing its last change.
                let deadline = if sole_voter && !campaigned_since_eligible && last_contact.is_none()
                {
                    since
                } else {
                    last_contact.map_or(since, |last| last.max(since)) + timeout
                };
                if Instant::now() >= deadline {
                    tracing::info!(
                        node_id,
                        timeout_ms = timeout.as_millis() as u64,
                        sole_voter,
                        "no leader heard within the election timeout: campaigning"
                    );
                    if raft.trigger().elect().await.is_err() {
                        return;
                    }
                    campaigned_since_eligible = true;
                    since = Instant::now();
                    timeout = draw_timeout(min_ms, max_ms);
                    continue;
                }
                Some(deadline)
            }
        };
        tokio::select! {
            _ = stop.changed() => return,
            () = contact.outdated_candidate.notified(), if matches!(mode, TimerMode::Resample { .. }) => {
                let TimerMode::Resample { min_ms, max_ms } = mode else { continue };
                let Some(candidate_term) = contact.take_outdated_candidate() else { continue };
                if !matches!(Eligibility::of(&metrics.borrow(), node_id), Eligibility::Eligible { .. }) {
                    continue;
                }
                // A random fraction of the minimum timeout, so that two up-to-date nodes rarely
                // campaign together; then outrun the candidate unless a leader was heard.
                let pause = draw_timeout(0, (min_ms / 2).max(1));
                let asked_at = Instant::now();
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                // A leader (or a vote granted) heard within the minimum timeout: its lease holds.
                let lease = std::time::Duration::from_millis(min_ms);
                if contact.last_contact().is_some_and(|last| last > asked_at || last.elapsed() < lease) {
                    continue;
                }
                if !matches!(Eligibility::of(&metrics.borrow(), node_id), Eligibility::Eligible { .. }) {
                    continue;
                }
                tracing::info!(node_id, candidate_term, "outrunning a candidate whose log is behind ours");
                // Each campaign raises this node's term by one; stop once above the candidate's.
                for _ in 0..3 {
                    let term = metrics.borrow().vote.leader_id().term;
                    if term > candidate_term {
                        break;
                    }
                    if raft.trigger().elect().await.is_err() {
                        return;
                    }
                    let _ = tokio::time::timeout(std::time::Duration::from_millis(min_ms), raft.wait(None).metrics(|m| m.vote.leader_id().term > term, "term raised")).await;
                }
                campaigned_since_eligible = true;
                since = Instant::now();
                timeout = draw_timeout(min_ms, max_ms);
            }
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = sleep_until(wake_at.unwrap_or_else(Instant::now)), if wake_at.is_some() => {}
        }
        if eligibility == Eligibility::Ineligible {
            since = Instant::now();
            campaigned_since_eligible = false;
        }
    }
}
