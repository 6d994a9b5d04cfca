//! The leader's lease liveness: one [`LeaseLiveness`] per term of this node's leadership,
//! shared by the heartbeat handler (which moves deadlines) and the housekeeping loop (whose
//! engine tick proposes the expiry of silent leases). Heartbeats are not Raft log entries.
//!
//! Time is this node's monotonic clock ([`LeaderLeases::monotonic_ms`], milliseconds since the
//! tracker was created), never the wall clock nor replicated time: a wall clock that steps does
//! not expire or extend a lease. See ARCHITECTURE.md, "Time".

use std::sync::Mutex;
use std::time::Instant;

use flotilla_raft::{RaftNode, ReadError};
use flotilla_scheduler::liveness::LeaseLiveness;

struct Tracked {
    term: u64,
    liveness: LeaseLiveness,
}

/// Lease deadlines of this node's current leadership (see the module documentation).
pub struct LeaderLeases {
    origin: Instant,
    grace_ms: u64,
    tracked: Mutex<Option<Tracked>>,
    /// Start of the last read-index round that confirmed this node's leadership; concurrent
    /// heartbeats share one round.
    confirmed: tokio::sync::Mutex<Option<Instant>>,
}

impl LeaderLeases {
    /// An empty tracker; a new leader gives the leases it finds at least `grace_ms`
    /// (`limits.lease_grace_after_election_ms`).
    pub fn new(grace_ms: u64) -> Self {
        LeaderLeases {
            origin: Instant::now(),
            grace_ms,
            tracked: Mutex::new(None),
            confirmed: tokio::sync::Mutex::new(None),
        }
    }

    /// This node's monotonic clock in milliseconds since the tracker was created.
    pub fn monotonic_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Runs `f` on the liveness of this node's leadership in `term`, first replacing a tracker
    /// of an earlier term with an empty one that starts now.
    pub fn with_term<R>(&self, term: u64, f: impl FnOnce(&mut LeaseLiveness) -> R) -> R {
        let now_ms = self.monotonic_ms();
        let mut guard = self
            .tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.as_ref().is_some_and(|tracked| tracked.term != term) {
            *guard = None;
        }
        let tracked = guard.get_or_insert_with(|| Tracked {
            term,
            liveness: LeaseLiveness::new(now_ms, self.grace_ms),
        });
        let result = f(&mut tracked.liveness);
        metrics::gauge!("flotilla_leases_tracked").set(tracked.liveness.len() as f64);
        result
    }

    /// Leases this node (the leader) just granted or sent again: each gets the deadline
    /// `now + lease_ttl_ms`, as if heard, so a lease sent again to a restarted worker is not
    /// expired on a deadline from before the restart. Without effect when this node is not the
    /// leader any more.
    pub fn granted<'a>(
        &self,
        node: &RaftNode,
        leases: impl IntoIterator<Item = (&'a str, u32)>,
        lease_ttl_ms: u64,
    ) {
        let (leader, term) = {
            let metrics = node.raft.metrics();
            let metrics = metrics.borrow();
            (metrics.current_leader, metrics.current_term)
        };
        if leader != Some(node.node_id) {
            return;
        }
        let now_ms = self.monotonic_ms();
        self.with_term(term, |liveness| {
            for (run_id, attempt) in leases {
                liveness.granted(run_id, attempt, now_ms, lease_ttl_ms);
            }
        });
    }

    /// Forgets the tracker (this node is not the leader).
    pub fn clear(&self) {
        let mut guard = self
            .tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.take().is_some() {
            metrics::gauge!("flotilla_leases_tracked").set(0.0);
        }
    }

    /// Confirms that this node is the leader with a read-index round that started after this
    /// call did ([`RaftNode::ensure_linearizable`]; concurrent callers share one round), and
    /// returns the term it leads in. After it, the state has applied every lease granted
    /// before the call.
    ///
    /// # Errors
    /// As [`RaftNode::ensure_linearizable`]; [`ReadError::ForwardToLeader`] also when the term
    /// changed under the round.
    pub async fn confirm_leadership(&self, node: &RaftNode) -> Result<u64, ReadError> {
        let requested = Instant::now();
        let mut confirmed = self.confirmed.lock().await;
        if !confirmed.is_some_and(|start| start >= requested) {
            let start = Instant::now();
            node.ensure_linearizable().await?;
            *confirmed = Some(start);
        }
        drop(confirmed);
        let metrics = node.raft.metrics().borrow().clone();
        if metrics.current_leader != Some(node.node_id) {
            return Err(ReadError::ForwardToLeader {
                leader_id: metrics.current_leader,
                leader_address: None,
            });
        }
        Ok(metrics.current_term)
    }
}
