//! Schedules (issue 9, in progress): when a schedule fires and how late it may start.
//!
//! - [`calendar`]: nominal times of cron and interval calendars in an IANA time zone, with the
//!   daylight-saving policies; pure.
//! - [`plan`]: what a schedule does at one moment of replicated time (start, skip, buffer,
//!   cancel, record missed ticks, pause on failure), exactly once per nominal time; pure.
//! - [`jitter_ms`]: the deterministic delay of one tick, so every replica and a preview agree.
//!
//! - [`record`]: the replicated schedule (spec, progress, running fleets, bounded history) and
//!   the commands that carry plans out (`CreateSchedule`, `DeleteSchedule`, `PauseSchedule`,
//!   `ResumeSchedule`, `ProcessSchedule`, applied in `apply.rs`); the leader's engine proposes
//!   `ProcessSchedule` for each due schedule ([`crate::engine`]).
//!
//! Not yet here: manual triggers, backfill, the API and the CLI.

mod apply;
pub mod calendar;
pub mod plan;
pub mod record;

use sha2::{Digest, Sha256};

/// Largest jitter a schedule may ask for: 1 hour.
pub const MAX_JITTER_MS: u64 = 3_600_000;

/// The start delay of the tick of `schedule_id` at `nominal_ms`: 0 to `max_jitter_ms`
/// inclusive, from the first 8 bytes of SHA-256(`schedule_id`, 0x00, `nominal_ms` big-endian),
/// so it is the same on every replica and in every preview, and differs between schedules
/// that share a nominal time (spreading a top-of-the-hour load).
pub fn jitter_ms(schedule_id: &str, nominal_ms: u64, max_jitter_ms: u64) -> u64 {
    debug_assert!(max_jitter_ms <= MAX_JITTER_MS);
    if max_jitter_ms == 0 {
        return 0;
    }
    let mut hasher = Sha256::new();
    hasher.update(schedule_id.as_bytes());
    hasher.update([0]);
    hasher.update(nominal_ms.to_be_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) % (max_jitter_ms + 1)
}

#[cfg(test)]
mod tests;
