//! The worker's own view of how long it still holds a lease.
//!
//! The cluster expires a lease `lease_ttl_ms` after the leader stamped the request that
//! granted or last renewed it. The worker cannot read the leader's clock, but it knows when it
//! *sent* that request: the leader stamped it later, so on the worker's monotonic clock the
//! lease is certainly valid until `send instant + lease_ttl_ms` (assuming the two clocks run at
//! the same rate; no wall-clock comparison is involved). That instant is the attempt's
//! [`LeaseDeadline`]: the lease poller sets it when a lease arrives, the heartbeat ticker moves
//! it forward after each heartbeat that renewed the lease, the run actor stops the attempt once
//! it passes (`lease could not be renewed`), and the attempt pushes only while it is at least
//! [`crate::config::WorkerConfig::push_lease_margin_ms`] away.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Until when (tokio's monotonic clock) the worker can prove it holds an attempt's lease.
///
/// Cheap to clone; every clone sees the updates of the one [`watch::Sender`] made by
/// [`LeaseDeadline::channel`]. When the sender is dropped the last deadline stays.
#[derive(Clone, Debug)]
pub struct LeaseDeadline {
    receiver: watch::Receiver<Instant>,
}

impl LeaseDeadline {
    /// A deadline starting at `initial`, and the sender that moves it.
    pub fn channel(initial: Instant) -> (watch::Sender<Instant>, LeaseDeadline) {
        let (sender, receiver) = watch::channel(initial);
        (sender, LeaseDeadline { receiver })
    }

    /// A deadline that never moves (for tests and tools that execute an attempt outside the
    /// worker runtime).
    pub fn fixed(deadline: Instant) -> LeaseDeadline {
        LeaseDeadline::channel(deadline).1
    }

    /// The current deadline.
    pub fn deadline(&self) -> Instant {
        *self.receiver.borrow()
    }

    /// How long the lease is still certainly valid; zero once the deadline has passed.
    pub fn remaining(&self) -> Duration {
        self.deadline().saturating_duration_since(Instant::now())
    }

    /// Whether the lease is still valid for at least `margin`.
    pub fn is_valid_for(&self, margin: Duration) -> bool {
        self.remaining() >= margin
    }

    /// Resolves once the deadline has passed (it may move forward while this waits).
    pub async fn passed(&mut self) {
        loop {
            let deadline = *self.receiver.borrow_and_update();
            if Instant::now() >= deadline {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {}
                changed = self.receiver.changed() => {
                    if changed.is_err() {
                        // No more renewals: the last deadline is final.
                        let last = *self.receiver.borrow();
                        tokio::time::sleep_until(last).await;
                        return;
                    }
                }
            }
        }
    }
}

/// Moves the deadline behind `sender` to `candidate` if that is later (renewals never shorten
/// a lease).
pub fn extend(sender: &watch::Sender<Instant>, candidate: Instant) {
    sender.send_if_modified(|deadline| {
        if candidate > *deadline {
            *deadline = candidate;
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_deadline_passes_unless_extended() {
        let start = Instant::now();
        let (sender, mut deadline) = LeaseDeadline::channel(start + Duration::from_secs(10));
        assert!(deadline.is_valid_for(Duration::from_secs(9)));
        assert!(!deadline.is_valid_for(Duration::from_secs(11)));
        let waiter = {
            let mut deadline = deadline.clone();
            tokio::spawn(async move {
                deadline.passed().await;
                Instant::now()
            })
        };
        tokio::time::sleep(Duration::from_secs(5)).await;
        extend(&sender, start + Duration::from_secs(20));
        // An earlier candidate never shortens it.
        extend(&sender, start + Duration::from_secs(12));
        assert_eq!(deadline.deadline(), start + Duration::from_secs(20));
        let passed_at = waiter.await.unwrap();
        assert_eq!(passed_at, start + Duration::from_secs(20));
        assert_eq!(deadline.remaining(), Duration::ZERO);
        // Dropping the sender keeps the last deadline.
        drop(sender);
        deadline.passed().await;
        assert_eq!(deadline.deadline(), start + Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_deadline_passes_at_its_time() {
        let start = Instant::now();
        let mut deadline = LeaseDeadline::fixed(start + Duration::from_secs(3));
        deadline.passed().await;
        assert_eq!(Instant::now(), start + Duration::from_secs(3));
    }
}
