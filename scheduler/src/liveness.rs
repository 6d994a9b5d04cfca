//! Lease liveness in the leader's memory (as Nomad's heartbeat timers): heartbeats are not log
//! entries. The leader keeps one deadline per lease on its own monotonic clock; a heartbeat
//! moves the deadline of each lease it names to `now + lease_ttl_ms`; the engine
//! ([`crate::engine::tick`]) proposes [`crate::Command::ExpireSilentLeases`] for the leases
//! whose deadline passed. Only grants, results and expiries reach the Raft log.
//!
//! Time: every `*_ms` argument here is a reading of the leader's monotonic clock in
//! milliseconds (any origin, the same for one [`LeaseLiveness`]), never replicated or wall time.
//! A tracker lives for one term of one leader; a new leader starts an empty one.
//!
//! A new leader cannot know when the previous leader last heard each worker, so it gives every
//! lease it finds a first deadline of at least `leadership_start + grace_ms` (the grace period,
//! cf. Nomad's `heartbeat_grace`), and at least `now + lease_ttl_ms`. Safety (ARCHITECTURE.md,
//! "Time"): a worker stops an attempt `lease_ttl_ms` after it sent the last heartbeat that was
//! answered, and a leader answers a heartbeat only after a quorum confirmed its leadership, so
//! no leader's deadline for a lease passes before the worker has stopped working on it.
//!
//! Invariants ([`LeaseLiveness::check_invariants`]): `deadlines` and `by_deadline` hold the same
//! entries; after [`LeaseLiveness::reconcile`] the tracked leases are exactly the state's.

use std::collections::{BTreeMap, BTreeSet};

use crate::state::State;

/// Most leases one [`crate::Command::ExpireSilentLeases`] names (the engine proposes more in
/// later ticks; the state machine refuses a command with more).
pub const MAX_EXPIRED_LEASES_PER_COMMAND: usize = 1024;

/// A lease: `(run_id, attempt)`.
pub type LeaseKey = (String, u32);

/// The leader's lease deadlines for one term (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseLiveness {
    /// Monotonic milliseconds at which this node became leader.
    leadership_start_ms: u64,
    /// The least time a lease found by a new leader gets, from `leadership_start_ms`.
    grace_ms: u64,
    /// Lease -> deadline (monotonic milliseconds).
    deadlines: BTreeMap<LeaseKey, u64>,
    /// `(deadline, lease)` of every entry of `deadlines`.
    by_deadline: BTreeSet<(u64, LeaseKey)>,
}

impl LeaseLiveness {
    /// An empty tracker of a leader that took office at `leadership_start_ms` (monotonic),
    /// giving leases it did not grant at least `grace_ms` from then.
    pub fn new(leadership_start_ms: u64, grace_ms: u64) -> Self {
        LeaseLiveness {
            leadership_start_ms,
            grace_ms,
            ..LeaseLiveness::default()
        }
    }

    /// Number of leases tracked.
    pub fn len(&self) -> usize {
        self.deadlines.len()
    }

    /// Whether no lease is tracked.
    pub fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }

    /// The deadline of lease `(run_id, attempt)`, if tracked.
    pub fn deadline_ms(&self, run_id: &str, attempt: u32) -> Option<u64> {
        self.deadlines.get(&(run_id.to_owned(), attempt)).copied()
    }

    /// The first deadline of a lease this tracker has not seen: `now + lease_ttl_ms`, and not
    /// before the end of the grace period.
    fn first_deadline_ms(&self, now_ms: u64, lease_ttl_ms: u64) -> u64 {
        now_ms
            .saturating_add(lease_ttl_ms)
            .max(self.leadership_start_ms.saturating_add(self.grace_ms))
    }

    fn set(&mut self, key: LeaseKey, deadline_ms: u64) {
        if let Some(old) = self.deadlines.insert(key.clone(), deadline_ms) {
            self.by_deadline.remove(&(old, key.clone()));
        }
        self.by_deadline.insert((deadline_ms, key));
    }

    fn remove(&mut self, key: &LeaseKey) {
        if let Some(old) = self.deadlines.remove(key) {
            self.by_deadline.remove(&(old, key.clone()));
        }
    }

    /// A heartbeat at `now_ms` named lease `(run_id, attempt)`, which the caller checked the
    /// worker holds: its deadline becomes `now_ms + lease_ttl_ms` (never earlier than it was),
    /// and the answer is true. False when the deadline had already passed: the lease is expired
    /// in the leader's view (its `ExpireSilentLeases` is proposed or will be), so the worker
    /// must hear that it lost it; a late heartbeat never revives it, or the worker would run on
    /// while the expiry applies and another worker runs the retry.
    pub fn heard(&mut self, run_id: &str, attempt: u32, now_ms: u64, lease_ttl_ms: u64) -> bool {
        let key = (run_id.to_owned(), attempt);
        let deadline_ms = match self.deadlines.get(&key) {
            Some(old) if *old <= now_ms => return false,
            Some(old) => (*old).max(now_ms.saturating_add(lease_ttl_ms)),
            None => self.first_deadline_ms(now_ms, lease_ttl_ms),
        };
        self.set(key, deadline_ms);
        true
    }

    /// Lease `(run_id, attempt)` was granted, or sent again, at `now_ms` (a log entry the
    /// leader applied): its deadline becomes at least `now_ms + lease_ttl_ms`, also when it had
    /// passed (the grant renewed the lease in the state, which fences an older expiry: see
    /// [`crate::Command::ExpireSilentLeases`]).
    pub fn granted(&mut self, run_id: &str, attempt: u32, now_ms: u64, lease_ttl_ms: u64) {
        let key = (run_id.to_owned(), attempt);
        let renewed_ms = now_ms.saturating_add(lease_ttl_ms);
        let deadline_ms = match self.deadlines.get(&key) {
            Some(old) => (*old).max(renewed_ms),
            None => self.first_deadline_ms(now_ms, lease_ttl_ms),
        };
        self.set(key, deadline_ms);
    }

    /// Makes the tracked leases exactly `state`'s: a lease not tracked yet (granted since the
    /// last call, or found by a new leader) gets its first deadline; a tracked lease the state
    /// no longer holds (its result arrived, it expired, its fleet was cancelled) is dropped.
    /// O(leases · log leases).
    pub fn reconcile(&mut self, state: &State, now_ms: u64, lease_ttl_ms: u64) {
        let current: BTreeSet<LeaseKey> = state
            .leases()
            .into_iter()
            .map(|(run_id, attempt, _worker)| (run_id, attempt))
            .collect();
        let gone: Vec<LeaseKey> = self
            .deadlines
            .keys()
            .filter(|key| !current.contains(*key))
            .cloned()
            .collect();
        for key in &gone {
            self.remove(key);
        }
        let first_deadline_ms = self.first_deadline_ms(now_ms, lease_ttl_ms);
        for key in current {
            if !self.deadlines.contains_key(&key) {
                self.set(key, first_deadline_ms);
            }
        }
    }

    /// The leases whose deadline is at or before `now_ms`, earliest first, at most
    /// [`MAX_EXPIRED_LEASES_PER_COMMAND`]. They stay tracked until a
    /// [`reconcile`](Self::reconcile) after their expiry was applied, so an expiry whose
    /// proposal failed is proposed again at the next tick.
    pub fn due(&self, now_ms: u64) -> Vec<LeaseKey> {
        self.by_deadline
            .iter()
            .take_while(|(deadline_ms, _)| *deadline_ms <= now_ms)
            .take(MAX_EXPIRED_LEASES_PER_COMMAND)
            .map(|(_, key)| key.clone())
            .collect()
    }

    /// Checks that both maps hold the same entries.
    ///
    /// # Errors
    /// A description of the first inconsistency.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.deadlines.len() != self.by_deadline.len() {
            return Err(format!(
                "{} deadlines but {} ordered entries",
                self.deadlines.len(),
                self.by_deadline.len()
            ));
        }
        for (deadline_ms, key) in &self.by_deadline {
            if self.deadlines.get(key) != Some(deadline_ms) {
                return Err(format!(
                    "lease {key:?}: ordered at {deadline_ms}, mapped otherwise"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(run: &str, attempt: u32) -> LeaseKey {
        (run.to_owned(), attempt)
    }

    #[test]
    fn heartbeats_move_deadlines_and_due_lists_the_silent_ones() {
        // Leader since 1000 with a grace of 3000: nothing it finds is due before 4000.
        let mut liveness = LeaseLiveness::new(1_000, 3_000);
        assert!(liveness.heard("fl-1-0", 1, 1_000, 500));
        assert!(liveness.heard("fl-1-1", 1, 1_000, 500));
        assert_eq!(liveness.deadline_ms("fl-1-0", 1), Some(4_000));
        assert!(liveness.due(3_999).is_empty());
        // Deadlines follow heartbeats: now + ttl, never moved back.
        assert!(liveness.heard("fl-1-0", 1, 3_900, 500));
        assert_eq!(liveness.deadline_ms("fl-1-0", 1), Some(4_400));
        assert!(liveness.heard("fl-1-0", 1, 3_800, 500));
        assert_eq!(liveness.deadline_ms("fl-1-0", 1), Some(4_400));
        assert_eq!(liveness.due(4_000), vec![key("fl-1-1", 1)]);
        // A heartbeat after the deadline does not revive the lease: the worker hears it lost.
        assert!(!liveness.heard("fl-1-1", 1, 4_000, 500));
        assert_eq!(liveness.deadline_ms("fl-1-1", 1), Some(4_000));
        assert_eq!(
            liveness.due(4_400),
            vec![key("fl-1-1", 1), key("fl-1-0", 1)]
        );
        // A grant sent again renews even a passed deadline (the state fences the old expiry).
        liveness.granted("fl-1-1", 1, 4_500, 500);
        assert_eq!(liveness.deadline_ms("fl-1-1", 1), Some(5_000));
        // A later attempt of the same run is another lease.
        assert!(liveness.heard("fl-1-0", 2, 6_000, 500));
        assert_eq!(liveness.len(), 3);
        liveness.check_invariants().unwrap();
    }

    #[test]
    fn due_is_bounded_per_command() {
        let mut liveness = LeaseLiveness::new(0, 0);
        for index in 0..(MAX_EXPIRED_LEASES_PER_COMMAND + 10) {
            liveness.heard(&format!("fl-1-{index}"), 1, 0, 10);
        }
        assert_eq!(liveness.due(10).len(), MAX_EXPIRED_LEASES_PER_COMMAND);
        liveness.check_invariants().unwrap();
    }
}
