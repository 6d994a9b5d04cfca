//! Pre-vote (Raft thesis §9.6): before a node raises its term to campaign, it asks the voters
//! whether they would vote for it, and campaigns only if a quorum would. A pre-vote changes no
//! state on either side: no term, no vote, nothing persisted.
//!
//! A voter grants a pre-vote ([`answer`]) only if all of these hold:
//! 1. it is not the leader itself;
//! 2. it has not heard from a leader (accepted an AppendEntries or InstallSnapshot) within its
//!    leader lease, which is openraft's `election_timeout_max` (with this crate's election timer,
//!    `election_timeout_min_ms`): leader stickiness, thesis §4.2.3;
//! 3. the candidate's last log id is at least its own (the test of a real vote, §5.4.1).
//!
//! The term the candidate would campaign in is carried for logs only: refusing a pre-vote for a
//! term at or below the voter's own would leave a candidate whose term is behind no way to learn
//! the higher term (openraft adopts a higher term only from the answer to a real vote), and the
//! cluster could stall with the up-to-date node in the lower term. A real vote refused for its
//! term teaches the candidate the voter's term, and its next campaign succeeds.
//!
//! So a node cut off from the cluster (a partition, a pause) keeps its term while it is away:
//! its pre-votes go unanswered, and once it is back they are refused while the leader is alive
//! (rule 2) or while its log is behind (rule 3). It cannot depose a healthy leader with a higher
//! term, which openraft's leader would otherwise adopt from the node's next AppendEntries answer
//! (`HigherVote`) and step down.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::LogId;
use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// Asks a voter whether it would grant `candidate_id` its vote. Sent ([`crate::codec`]) in a
/// `flotilla.raft.v1.RaftService/PreVote` message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteRequest {
    /// The node that would campaign.
    pub candidate_id: NodeId,
    /// The term it would campaign in: its current term + 1. Informational (see the module
    /// documentation).
    pub term: u64,
    /// The id (term and index) of the last entry in the candidate's log; `None` for an empty log.
    pub last_log_id: Option<LogId<NodeId>>,
}

/// Why a voter refused a pre-vote.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PreVoteRefusal {
    /// The voter is the leader.
    VoterIsLeader,
    /// The voter heard from a leader `elapsed_ms` ago, within its leader lease of `lease_ms`.
    LeaderHeard {
        /// Milliseconds since the voter last accepted a message from a leader.
        elapsed_ms: u64,
        /// The voter's leader lease, in milliseconds.
        lease_ms: u64,
    },
    /// The candidate's last log id is behind the voter's (carried in the answer).
    LogBehind,
}

impl std::fmt::Display for PreVoteRefusal {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PreVoteRefusal::VoterIsLeader => write!(formatter, "the voter is the leader"),
            PreVoteRefusal::LeaderHeard {
                elapsed_ms,
                lease_ms,
            } => write!(
                formatter,
                "the voter heard from a leader {elapsed_ms} ms ago, within its lease of {lease_ms} ms"
            ),
            PreVoteRefusal::LogBehind => write!(formatter, "the candidate's log is behind"),
        }
    }
}

/// A voter's answer to a [`PreVoteRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteResponse {
    /// Whether the voter would grant the vote.
    pub granted: bool,
    /// The voter's current term.
    pub term: u64,
    /// The id of the last entry in the voter's log.
    pub last_log_id: Option<LogId<NodeId>>,
    /// Why it was refused; `None` when granted.
    pub refusal: Option<PreVoteRefusal>,
}

/// What a voter knows when it answers a pre-vote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VoterView {
    /// The voter is the leader.
    pub(crate) is_leader: bool,
    /// Time since it last accepted a message from a leader; `None` if it never did.
    pub(crate) since_leader_heard: Option<Duration>,
    /// Its leader lease.
    pub(crate) lease: Duration,
    /// Its current term.
    pub(crate) term: u64,
    /// The id of the last entry in its log.
    pub(crate) last_log_id: Option<LogId<NodeId>>,
}

/// The voter's answer to `request` (rules in the module documentation).
pub(crate) fn answer(request: &PreVoteRequest, voter: &VoterView) -> PreVoteResponse {
    let refusal = if voter.is_leader {
        Some(PreVoteRefusal::VoterIsLeader)
    } else if let Some(elapsed) = voter
        .since_leader_heard
        .filter(|elapsed| *elapsed < voter.lease)
    {
        Some(PreVoteRefusal::LeaderHeard {
            elapsed_ms: elapsed.as_millis() as u64,
            lease_ms: voter.lease.as_millis() as u64,
        })
    } else if request.last_log_id < voter.last_log_id {
        Some(PreVoteRefusal::LogBehind)
    } else {
        None
    };
    PreVoteResponse {
        granted: refusal.is_none(),
        term: voter.term,
        last_log_id: voter.last_log_id,
        refusal,
    }
}

/// Where a pre-vote round stands, over the voter sets of a (possibly joint) configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tally {
    /// A majority of every voter set granted.
    Won,
    /// Some voter set can no longer reach a majority.
    Lost,
    /// Neither yet.
    Open,
}

/// Tallies a pre-vote round: `granted` and `refused` hold the voters that answered (a voter
/// that cannot be reached counts as refused once its RPC failed).
pub(crate) fn tally(
    voter_sets: &[BTreeSet<NodeId>],
    granted: &BTreeSet<NodeId>,
    refused: &BTreeSet<NodeId>,
) -> Tally {
    let count = |set: &BTreeSet<NodeId>, of: &BTreeSet<NodeId>| set.intersection(of).count();
    if voter_sets
        .iter()
        .any(|set| (set.len() - count(set, refused)) * 2 <= set.len())
    {
        return Tally::Lost;
    }
    if voter_sets
        .iter()
        .all(|set| count(set, granted) * 2 > set.len())
    {
        return Tally::Won;
    }
    Tally::Open
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log_id(term: u64, index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(term, 0), index))
    }

    fn follower(last_log_id: Option<LogId<NodeId>>) -> VoterView {
        VoterView {
            is_leader: false,
            since_leader_heard: Some(Duration::from_secs(5)),
            lease: Duration::from_millis(400),
            term: 3,
            last_log_id,
        }
    }

    fn request(last_log_id: Option<LogId<NodeId>>) -> PreVoteRequest {
        PreVoteRequest {
            candidate_id: 2,
            term: 4,
            last_log_id,
        }
    }

    #[test]
    fn a_voter_without_a_leader_grants_an_up_to_date_candidate() {
        let voter = follower(log_id(3, 10));
        for candidate_log in [log_id(3, 10), log_id(3, 11), log_id(4, 2)] {
            let response = answer(&request(candidate_log), &voter);
            assert!(response.granted, "{candidate_log:?}: {response:?}");
            assert_eq!(response.refusal, None);
            assert_eq!(response.term, 3);
        }
        let never_heard = VoterView {
            since_leader_heard: None,
            ..voter
        };
        assert!(answer(&request(log_id(3, 10)), &never_heard).granted);
    }

    #[test]
    fn a_candidate_whose_log_is_behind_is_refused() {
        let voter = follower(log_id(3, 10));
        for candidate_log in [None, log_id(3, 9), log_id(2, 50)] {
            let response = answer(&request(candidate_log), &voter);
            assert!(!response.granted);
            assert_eq!(response.refusal, Some(PreVoteRefusal::LogBehind));
            assert_eq!(response.last_log_id, log_id(3, 10));
        }
    }

    #[test]
    fn a_voter_that_heard_a_leader_within_its_lease_or_leads_refuses() {
        let recent = VoterView {
            since_leader_heard: Some(Duration::from_millis(150)),
            ..follower(log_id(3, 10))
        };
        assert_eq!(
            answer(&request(log_id(3, 10)), &recent).refusal,
            Some(PreVoteRefusal::LeaderHeard {
                elapsed_ms: 150,
                lease_ms: 400
            })
        );
        let leader = VoterView {
            is_leader: true,
            since_leader_heard: None,
            ..follower(log_id(3, 10))
        };
        assert_eq!(
            answer(&request(log_id(4, 20)), &leader).refusal,
            Some(PreVoteRefusal::VoterIsLeader)
        );
    }

    #[test]
    fn the_tally_needs_a_majority_of_every_voter_set() {
        let set = |ids: &[NodeId]| ids.iter().copied().collect::<BTreeSet<NodeId>>();
        let three = vec![set(&[1, 2, 3])];
        assert_eq!(tally(&three, &set(&[1]), &set(&[])), Tally::Open);
        assert_eq!(tally(&three, &set(&[1, 3]), &set(&[])), Tally::Won);
        assert_eq!(tally(&three, &set(&[1]), &set(&[2])), Tally::Open);
        assert_eq!(tally(&three, &set(&[1]), &set(&[2, 3])), Tally::Lost);
        assert_eq!(tally(&[set(&[1])], &set(&[1]), &set(&[])), Tally::Won);
        // Joint consensus: {1, 2, 3} and {3, 4, 5}.
        let joint = vec![set(&[1, 2, 3]), set(&[3, 4, 5])];
        assert_eq!(tally(&joint, &set(&[1, 2]), &set(&[])), Tally::Open);
        assert_eq!(tally(&joint, &set(&[1, 2, 4, 5]), &set(&[])), Tally::Won);
        assert_eq!(tally(&joint, &set(&[1, 2]), &set(&[4, 5])), Tally::Lost);
        // Two voters: both are needed.
        let two = vec![set(&[1, 2])];
        assert_eq!(tally(&two, &set(&[1]), &set(&[])), Tally::Open);
        assert_eq!(tally(&two, &set(&[1]), &set(&[2])), Tally::Lost);
    }
}
