//! Replicated time: the one clock that stamps commands and that the leader's decisions compare
//! against (lease expiry, retry backoff, fleet retention).
//!
//! The time model (ARCHITECTURE.md, "Time"): the state machine's clock is the largest stamp it
//! has applied ([`flotilla_scheduler::State::now_ms`]). A leader stamps each command with
//!
//! ```text
//! now = max(base_ms + (monotonic now - monotonic at base), state clock)
//! base_ms = max(state clock, wall clock) when this node first stamps in a new term
//! ```
//!
//! So within a term replicated time advances with the leader's monotonic clock: a wall clock
//! that jumps forward or back mid-term changes nothing. Across a leader change it continues
//! from the last applied stamp; a new leader whose wall clock is ahead moves it forward to its
//! wall clock (so replicated time stays close to real time), but a wall clock that is behind
//! never moves it back. Leases and backoffs that an earlier leader stamped, with whatever clock
//! it had, therefore end after their real duration under the next leader: none stays stuck
//! waiting for a wall clock to catch up. The cost, documented: after a leader with a clock X
//! ahead, stamps stay X ahead of real time (until the wall clocks pass them).
//!
//! Decisions and stamps use the same [`LeaderClock::now_ms`], never a mix of clocks.

use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Environment variable that shifts this node's wall clock by a signed number of
/// milliseconds: a fault-injection point for tests of clock skew, never for production.
pub const WALL_CLOCK_OFFSET_VARIABLE: &str = "FLOTILLA_FAULT_WALL_CLOCK_OFFSET_MS";

/// Where replicated time stood when this node started stamping in `term`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Epoch {
    term: u64,
    base_ms: u64,
    base: Instant,
}

/// The leader's stamping clock (see the module documentation). Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct LeaderClock {
    epoch: Mutex<Option<Epoch>>,
    wall_clock_offset_ms: i64,
}

impl LeaderClock {
    /// A clock whose wall-clock readings are shifted by `wall_clock_offset_ms` (0 in
    /// production; see [`WALL_CLOCK_OFFSET_VARIABLE`]).
    pub fn new(wall_clock_offset_ms: i64) -> Self {
        LeaderClock {
            epoch: Mutex::new(None),
            wall_clock_offset_ms,
        }
    }

    /// A clock with the offset from [`WALL_CLOCK_OFFSET_VARIABLE`] (0 when unset).
    ///
    /// # Errors
    /// The variable is set but is not a signed integer.
    pub fn from_environment() -> Result<Self, String> {
        let offset = match std::env::var(WALL_CLOCK_OFFSET_VARIABLE) {
            Ok(value) => value.trim().parse::<i64>().map_err(|error| {
                format!("{WALL_CLOCK_OFFSET_VARIABLE}={value:?}: not an integer: {error}")
            })?,
            Err(_) => 0,
        };
        Ok(LeaderClock::new(offset))
    }

    /// This node's wall clock in milliseconds since the Unix epoch, with the fault-injection
    /// offset applied.
    pub fn wall_now_ms(&self) -> u64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        wall.saturating_add_signed(self.wall_clock_offset_ms)
    }

    /// Replicated time for a command proposed now in `term`, given the state's clock
    /// (`State::now_ms`, the largest stamp applied). Milliseconds since the Unix epoch.
    pub fn now_ms(&self, term: u64, state_now_ms: u64) -> u64 {
        let mut epoch = self
            .epoch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        stamp(
            &mut epoch,
            term,
            state_now_ms,
            self.wall_now_ms(),
            Instant::now(),
        )
    }
}

/// Replicated time for a command `node` proposes now: [`LeaderClock::now_ms`] with the node's
/// current term and its applied state's clock.
pub fn replicated_now_ms(clock: &LeaderClock, node: &flotilla_raft::RaftNode) -> u64 {
    let term = node.raft.metrics().borrow().current_term;
    let state_now_ms = node.state.read(|state| state.now_ms());
    clock.now_ms(term, state_now_ms)
}

/// The pure core of [`LeaderClock::now_ms`]: rebases `epoch` on the first stamp of a new
/// `term`, then advances with the monotonic `now`, never below `state_now_ms`.
fn stamp(
    epoch: &mut Option<Epoch>,
    term: u64,
    state_now_ms: u64,
    wall_now_ms: u64,
    now: Instant,
) -> u64 {
    let current = match *epoch {
        Some(current) if current.term == term => current,
        _ => {
            let fresh = Epoch {
                term,
                base_ms: state_now_ms.max(wall_now_ms),
                base: now,
            };
            *epoch = Some(fresh);
            fresh
        }
    };
    let elapsed_ms = now.saturating_duration_since(current.base).as_millis() as u64;
    current.base_ms.saturating_add(elapsed_ms).max(state_now_ms)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Data-driven check: each step is `(term, state_now_ms, wall_now_ms, monotonic offset in
    /// ms from the start, expected stamp)`.
    fn check(steps: &[(u64, u64, u64, u64, u64)]) {
        let start = Instant::now();
        let mut epoch = None;
        for (position, (term, state_now, wall_now, monotonic, expected)) in steps.iter().enumerate()
        {
            let now = start + Duration::from_millis(*monotonic);
            let actual = stamp(&mut epoch, *term, *state_now, *wall_now, now);
            assert_eq!(actual, *expected, "step {position}: {steps:?}");
        }
    }

    #[test]
    fn within_a_term_time_follows_the_monotonic_clock_not_the_wall_clock() {
        check(&[
            (1, 0, 10_000, 0, 10_000),
            (1, 10_000, 10_500, 500, 10_500),
            // The wall clock jumps an hour ahead, then an hour back: stamps do not.
            (1, 10_500, 3_610_500, 1_000, 11_000),
            (1, 11_000, 9_000, 2_000, 12_000),
        ]);
    }

    #[test]
    fn a_new_term_continues_from_the_state_clock_and_moves_forward_to_the_wall_clock() {
        check(&[
            // A leader whose wall clock is an hour ahead when elected stamps in its time.
            (1, 0, 3_600_000, 0, 3_600_000),
            (1, 3_600_000, 3_601_000, 1_000, 3_601_000),
            // It is replaced by a leader whose clock is right (1_000): time does not go back,
            // it continues from the last stamp at the monotonic rate.
            (2, 3_601_000, 1_000, 5_000, 3_601_000),
            (2, 3_601_000, 31_000, 35_000, 3_631_000),
            // A later leader whose wall clock is ahead of replicated time moves it forward.
            (3, 3_631_000, 9_000_000, 40_000, 9_000_000),
        ]);
    }

    #[test]
    fn stamps_never_fall_below_the_state_clock() {
        check(&[
            // Elected before its state caught up with the previous term's entries.
            (4, 5_000, 4_000, 0, 5_000),
            (4, 20_000, 4_100, 100, 20_000),
            (4, 20_000, 4_200, 200, 20_000),
        ]);
    }

    #[test]
    fn the_offset_shifts_only_the_wall_clock() {
        let ahead = LeaderClock::new(3_600_000);
        let plain = LeaderClock::new(0);
        let difference = ahead.wall_now_ms() - plain.wall_now_ms();
        assert!(
            (3_599_000..=3_601_000).contains(&difference),
            "{difference}"
        );
        let behind = LeaderClock::new(-1_000_000_000_000_000);
        assert_eq!(behind.wall_now_ms(), 0);
    }
}
