//! The election timer that replaces openraft's: a fresh random election timeout for every
//! campaign (Raft §5.2), a pre-vote before every campaign (Raft thesis §9.6, see
//! [`crate::pre_vote`]), and the count of campaigns this node started.
//!
//! openraft 0.9 draws a node's election timeout once, when the node starts
//! (`EngineConfig::new`), so two nodes that drew close timeouts collide again in every
//! election; and it has no pre-vote. With
//! [`RaftNodeConfig::resample_election_timeout`](crate::RaftNodeConfig) on (the default), openraft
//! runs with `enable_elect = false` and [`run`] decides when to campaign:
//!
//! - [`LeaderContact`] holds the last time this node heard from a leader (an AppendEntries or
//!   InstallSnapshot that it accepted) or granted a vote; [`RaftGrpcService`] records it;
//! - a voter that is neither leader nor learner starts a pre-vote round once nothing was heard
//!   for its current timeout, measured from the latest of that contact, its previous round, and
//!   the moment it last became eligible (a learner promoted to voter, a leader that stepped
//!   down): it asks every other voter, in parallel and for at most `election_timeout_min_ms`,
//!   whether it would vote for this node, and campaigns ([`Trigger::elect`]) only if a quorum of
//!   every voter set (itself included) would, and no leader was heard meanwhile. A lost round
//!   changes nothing: the node keeps its term and waits for a new timeout;
//! - every round draws a new timeout uniformly from
//!   `[election_timeout_min_ms, election_timeout_max_ms)`;
//! - the only voter of a cluster campaigns at once (it cannot split a vote, and is its own
//!   quorum), as openraft does, unless it heard from a leader since it was opened (the leader
//!   removed itself): then it waits for its timeout like any voter.
//!
//! - a voter that refused its vote to a candidate because the candidate's log is behind its own
//!   (openraft then keeps its own, lower term) campaigns soon after, in a term above that
//!   candidate's. Raft has the refusing node adopt the candidate's term (§5.1); openraft 0.9
//!   does not, so without this rule the up-to-date node's next campaign reuses the outdated
//!   candidate's term, collides with that candidate's self-vote, and the pair can livelock for
//!   many rounds (seen in `flotilla-bench failover`: 10-12 s to a new leader). With pre-vote an
//!   outdated candidate rarely campaigns at all (the up-to-date voters refuse its pre-vote), but
//!   one that won a pre-vote quorum of voters as outdated as itself still can. The campaign
//!   waits a random fraction of the minimum timeout first, so two up-to-date nodes rarely jump
//!   together, is skipped while a leader is heard, and needs a pre-vote quorum like any other.
//!
//! Liveness after a leader dies: the survivors stop hearing from it at about the same moment,
//! so by the time the first one's timeout expires (at least `election_timeout_min_ms`, the
//! lease) the others' leases have expired too and they grant its pre-vote if its log is up to
//! date; a survivor with an outdated log is refused, and an up-to-date one wins the next round.
//! Pre-votes are refused only for a leader heard within the lease (not for a vote granted), so
//! a failed campaign never blocks the next round.
//!
//! With the switch off, openraft's own timer campaigns (without pre-vote) and [`run`] only
//! counts.
//!
//! [`RaftGrpcService`]: crate::RaftGrpcService
//! [`Trigger::elect`]: openraft::raft::trigger::Trigger::elect

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use openraft::{RaftMetrics, ServerState};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};

use crate::network::GrpcNetworkFactory;
use crate::pre_vote::{PreVoteRequest, Tally, tally};
use crate::types::{NodeId, Raft};

/// The last contacts [`LeaderContact`] records.
#[derive(Debug, Default, Clone, Copy)]
struct Contacts {
    /// The last accepted AppendEntries / InstallSnapshot or granted vote; `None` before any.
    any: Option<Instant>,
    /// The last accepted AppendEntries / InstallSnapshot; `None` before any.
    leader: Option<Instant>,
}

/// What the gRPC service and the election timer share: when this node last heard from a leader,
/// and how many campaigns and pre-vote rounds it started.
#[derive(Debug, Default)]
pub(crate) struct LeaderContact {
    contacts: Mutex<Contacts>,
    /// Messages accepted from a leader (AppendEntries, InstallSnapshot chunks).
    leader_messages: AtomicU64,
    /// Campaigns this node started (terms in which it voted for itself).
    elections_started: AtomicU64,
    /// Pre-vote rounds this node started, and those it lost.
    pre_vote_rounds: AtomicU64,
    pre_vote_rounds_lost: AtomicU64,
    /// The highest term of a candidate this node refused because the candidate's log is behind
    /// its own, not yet outrun by a campaign of this node.
    outdated_candidate_term: Mutex<Option<u64>>,
    /// Wakes the timer when `outdated_candidate_term` is set.
    outdated_candidate: tokio::sync::Notify,
}

impl LeaderContact {
    fn contacts(&self) -> std::sync::MutexGuard<'_, Contacts> {
        self.contacts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that this node accepted a message from a leader now.
    pub(crate) fn record_leader(&self) {
        let now = Instant::now();
        let mut contacts = self.contacts();
        contacts.any = Some(contacts.any.map_or(now, |last| last.max(now)));
        contacts.leader = Some(contacts.leader.map_or(now, |last| last.max(now)));
        drop(contacts);
        self.leader_messages.fetch_add(1, Ordering::Relaxed);
    }

    /// Records that this node granted a vote now (the election timer waits anew; pre-votes are
    /// not refused for it).
    pub(crate) fn record_vote_granted(&self) {
        let now = Instant::now();
        let mut contacts = self.contacts();
        contacts.any = Some(contacts.any.map_or(now, |last| last.max(now)));
    }

    /// Time since this node last accepted a message from a leader; `None` if it never did.
    pub(crate) fn since_leader_heard(&self) -> Option<Duration> {
        self.contacts().leader.map(|last| last.elapsed())
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
        self.contacts().any
    }

    /// The number of campaigns this node started since it was opened.
    pub(crate) fn elections_started(&self) -> u64 {
        self.elections_started.load(Ordering::Relaxed)
    }

    /// The number of pre-vote rounds this node started since it was opened.
    pub(crate) fn pre_vote_rounds(&self) -> u64 {
        self.pre_vote_rounds.load(Ordering::Relaxed)
    }

    /// The number of pre-vote rounds this node lost (and so did not campaign).
    pub(crate) fn pre_vote_rounds_lost(&self) -> u64 {
        self.pre_vote_rounds_lost.load(Ordering::Relaxed)
    }

    /// The number of messages this node accepted from a leader since it was opened.
    #[cfg(test)]
    pub(crate) fn leader_messages(&self) -> u64 {
        self.leader_messages.load(Ordering::Relaxed)
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

/// How a pre-vote round ended.
#[derive(Debug)]
enum PreVoteOutcome {
    /// A quorum of every voter set would vote for this node.
    Won,
    /// It would not: the refusals and failures, one per voter, for the log.
    Lost(Vec<String>),
}

/// One pre-vote round of node `node_id` (see [`crate::pre_vote`]): asks every other voter of
/// its membership, in parallel, whether it would vote for this node in its next term, and waits
/// at most `timeout` for a quorum.
async fn pre_vote_round(
    raft: &Raft,
    node_id: NodeId,
    network: &GrpcNetworkFactory,
    timeout: Duration,
) -> PreVoteOutcome {
    let (term, voter_sets, peers) = {
        let metrics = raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        let peers: Vec<(NodeId, String)> = membership
            .voter_ids()
            .filter(|voter_id| *voter_id != node_id)
            .filter_map(|voter_id| {
                membership
                    .get_node(&voter_id)
                    .map(|node| (voter_id, node.addr.clone()))
            })
            .collect();
        (
            metrics.vote.leader_id().term + 1,
            membership.get_joint_config().clone(),
            peers,
        )
    };
    let request = PreVoteRequest {
        candidate_id: node_id,
        term,
        last_log_id: raft.data_metrics().borrow().last_log,
    };
    let mut granted = BTreeSet::from([node_id]);
    let mut refused = BTreeSet::new();
    let mut refusals = Vec::new();
    let mut pending = JoinSet::new();
    for (peer, address) in peers {
        let network = network.clone();
        pending.spawn(async move {
            let answer = network.pre_vote(peer, &address, &request, timeout).await;
            (peer, answer)
        });
    }
    let deadline = Instant::now() + timeout;
    loop {
        match tally(&voter_sets, &granted, &refused) {
            Tally::Won => return PreVoteOutcome::Won,
            Tally::Lost => return PreVoteOutcome::Lost(refusals),
            Tally::Open => {}
        }
        match tokio::time::timeout_at(deadline, pending.join_next()).await {
            Ok(Some(Ok((peer, Ok(response))))) if response.granted => {
                granted.insert(peer);
            }
            Ok(Some(Ok((peer, Ok(response))))) => {
                refused.insert(peer);
                let reason = response
                    .refusal
                    .map_or_else(|| "refused".to_string(), |refusal| refusal.to_string());
                refusals.push(format!("node {peer} (term {}): {reason}", response.term));
            }
            Ok(Some(Ok((peer, Err(error))))) => {
                refused.insert(peer);
                refusals.push(format!("node {peer}: {error}"));
            }
            // A task that panicked or was cancelled: its voter never answers.
            Ok(Some(Err(_))) => {}
            Ok(None) => return PreVoteOutcome::Lost(refusals),
            Err(_elapsed) => {
                refusals.push(format!(
                    "no quorum answered within {} ms",
                    timeout.as_millis()
                ));
                return PreVoteOutcome::Lost(refusals);
            }
        }
    }
}

/// Runs a pre-vote round and counts it. `Some(true)`: won, and no leader was heard while it ran;
/// `Some(false)`: lost, or a leader was heard; `None`: `stop` fired.
async fn pre_vote_passes(
    raft: &Raft,
    node_id: NodeId,
    network: &GrpcNetworkFactory,
    contact: &LeaderContact,
    timeout: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Option<bool> {
    contact.pre_vote_rounds.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let outcome = tokio::select! {
        _ = stop.changed() => return None,
        outcome = pre_vote_round(raft, node_id, network, timeout) => outcome,
    };
    let term = raft.metrics().borrow().vote.leader_id().term;
    match outcome {
        PreVoteOutcome::Won if contact.last_contact().is_some_and(|last| last > started) => {
            tracing::info!(
                node_id,
                term,
                "pre-vote won, but a leader was heard meanwhile: not campaigning"
            );
            Some(false)
        }
        PreVoteOutcome::Won => {
            tracing::info!(node_id, term, "pre-vote won: campaigning");
            Some(true)
        }
        PreVoteOutcome::Lost(refusals) => {
            contact.pre_vote_rounds_lost.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                node_id,
                term,
                refusals = refusals.join("; "),
                "pre-vote lost: not campaigning, the term stays"
            );
            Some(false)
        }
    }
}

/// The election timer of node `node_id` (see the module documentation), sending pre-votes
/// through `network`. Ends when the node stops, or when `stop` changes or its sender is dropped.
pub(crate) async fn run(
    raft: Raft,
    node_id: NodeId,
    contact: std::sync::Arc<LeaderContact>,
    mode: TimerMode,
    network: GrpcNetworkFactory,
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
    // The start of the current wait: when the timer started, this node last asked for pre-votes,
    // or it last became eligible.
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
                        "no leader heard within the election timeout: asking for pre-votes"
                    );
                    let round_timeout = Duration::from_millis(min_ms);
                    let Some(passes) = pre_vote_passes(
                        &raft,
                        node_id,
                        &network,
                        &contact,
                        round_timeout,
                        &mut stop,
                    )
                    .await
                    else {
                        return;
                    };
                    let still_eligible = matches!(
                        Eligibility::of(&metrics.borrow(), node_id),
                        Eligibility::Eligible { .. }
                    );
                    if passes && still_eligible && raft.trigger().elect().await.is_err() {
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
                tracing::info!(node_id, candidate_term, "a candidate whose log is behind ours campaigned: asking for pre-votes to outrun it");
                let Some(passes) = pre_vote_passes(&raft, node_id, &network, &contact, lease, &mut stop).await else {
                    return;
                };
                campaigned_since_eligible = true;
                since = Instant::now();
                timeout = draw_timeout(min_ms, max_ms);
                if !passes {
                    continue;
                }
                // Each campaign raises this node's term by one; stop once above the candidate's.
                for _ in 0..3 {
                    let term = metrics.borrow().vote.leader_id().term;
                    if term > candidate_term
                        || !matches!(Eligibility::of(&metrics.borrow(), node_id), Eligibility::Eligible { .. })
                    {
                        break;
                    }
                    if raft.trigger().elect().await.is_err() {
                        return;
                    }
                    let _ = tokio::time::timeout(lease, raft.wait(None).metrics(|m| m.vote.leader_id().term > term, "term raised")).await;
                }
                since = Instant::now();
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
