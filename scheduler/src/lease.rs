//! The lease index of a fleet: its running runs ordered by lease expiry and grouped by the
//! worker holding them, so that expiring leases, listing every lease and listing a
//! worker's leases cost O(log n) plus what they return, never a walk over every run.
//!
//! Invariant (checked by [`crate::state::State::check_invariants`]): the index holds exactly
//! one entry per run whose `lease` is `Some`, with that lease's expiry and worker. It is derived
//! data, serialized with the fleet; a fleet deserialized from a state written before the index
//! existed has an empty one and is rebuilt ([`LeaseIndex::rebuild`]) before it is used.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::state::{Lease, Run};

/// The lease index of one fleet (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseIndex {
    /// `(expires_at_ms, run index)` of every lease.
    by_expiry: BTreeSet<(u64, u32)>,
    /// Worker id -> indices of the runs it holds.
    by_worker: BTreeMap<String, BTreeSet<u32>>,
}

impl LeaseIndex {
    /// The index of `runs`' leases.
    pub fn rebuild<'a>(runs: impl IntoIterator<Item = &'a Run>) -> LeaseIndex {
        let mut index = LeaseIndex::default();
        for run in runs {
            if let Some(lease) = &run.lease {
                index.insert(run.index, lease);
            }
        }
        index
    }

    /// Number of leases indexed.
    pub fn len(&self) -> usize {
        self.by_expiry.len()
    }

    /// Whether no lease is indexed.
    pub fn is_empty(&self) -> bool {
        self.by_expiry.is_empty()
    }

    /// Adds run `index`'s `lease`.
    pub fn insert(&mut self, index: u32, lease: &Lease) {
        self.by_expiry.insert((lease.expires_at_ms, index));
        self.by_worker
            .entry(lease.worker_id.clone())
            .or_default()
            .insert(index);
    }

    /// Removes run `index`'s `lease` (as it was indexed).
    pub fn remove(&mut self, index: u32, lease: &Lease) {
        self.by_expiry.remove(&(lease.expires_at_ms, index));
        if let Some(runs) = self.by_worker.get_mut(&lease.worker_id) {
            runs.remove(&index);
            if runs.is_empty() {
                self.by_worker.remove(&lease.worker_id);
            }
        }
    }

    /// Indices of the runs whose lease expires at or before `now_ms`, earliest first.
    pub fn expired(&self, now_ms: u64) -> Vec<u32> {
        self.by_expiry
            .range(..(now_ms.saturating_add(1), 0))
            .map(|(_, index)| *index)
            .collect()
    }

    /// Indices of every leased run, earliest expiry first.
    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_expiry.iter().map(|(_, index)| *index)
    }

    /// Indices of the runs `worker_id` holds, in run order.
    pub fn of_worker(&self, worker_id: &str) -> impl Iterator<Item = u32> + '_ {
        self.by_worker
            .get(worker_id)
            .into_iter()
            .flat_map(|runs| runs.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(worker_id: &str, expires_at_ms: u64) -> Lease {
        Lease {
            slots: Vec::new(),
            worker_id: worker_id.into(),
            expires_at_ms,
        }
    }

    #[test]
    fn leases_are_found_by_expiry_and_by_worker() {
        let mut index = LeaseIndex::default();
        index.insert(3, &lease("w1", 500));
        index.insert(1, &lease("w2", 100));
        index.insert(7, &lease("w1", 100));
        assert_eq!(index.len(), 3);
        assert_eq!(index.expired(99), Vec::<u32>::new());
        assert_eq!(index.expired(100), vec![1, 7]);
        assert_eq!(index.expired(u64::MAX), vec![1, 7, 3]);
        assert_eq!(index.of_worker("w1").collect::<Vec<_>>(), vec![3, 7]);
        index.remove(7, &lease("w1", 100));
        assert_eq!(index.of_worker("w1").collect::<Vec<_>>(), vec![3]);
        index.remove(3, &lease("w1", 500));
        assert_eq!(index.of_worker("w1").count(), 0);
        assert!(!index.by_worker.contains_key("w1"));
        assert_eq!(index.expired(u64::MAX), vec![1]);
        index.remove(1, &lease("w2", 100));
        assert!(index.is_empty() && index.expired(u64::MAX).is_empty());
    }
}
