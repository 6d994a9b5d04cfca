//! The Generic Cell Rate Algorithm (ITU-T Recommendation I.371, "virtual scheduling"), the
//! token bucket Inngest and Hatchet use, on the replicated clock in microseconds.
//!
//! A bucket of `limit` units per `period` and burst `burst` has an emission interval
//! `T = period / limit` and a tolerance `tau = (burst - 1) * T`. Its whole state is one
//! number, the theoretical arrival time `TAT`. A unit taken at `now` conforms when
//! `now >= TAT - tau`, and then `TAT = max(TAT, now) + T`. So after a quiet time `burst` units
//! conform at once, and over any interval of length `L` at most `burst + L / T` units conform.
//! A key whose `TAT <= now` is a full bucket, the same as a key never seen.

/// Microseconds per millisecond.
const MICROS_PER_MS: u64 = 1_000;

/// One rate limit's parameters, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// `T`: microseconds per unit (the period divided by the limit, rounded down, at least 1).
    pub emission_interval_us: u64,
    /// `tau`: `(burst - 1) * T`.
    pub tolerance_us: u64,
}

impl Gcra {
    /// The bucket of `limit` units per `period_ms` with bursts of `burst` (both at least 1).
    pub fn new(limit: u32, period_ms: u64, burst: u32) -> Gcra {
        debug_assert!(limit >= 1 && burst >= 1);
        let emission_interval_us =
            (period_ms.saturating_mul(MICROS_PER_MS) / u64::from(limit.max(1))).max(1);
        Gcra {
            emission_interval_us,
            tolerance_us: emission_interval_us.saturating_mul(u64::from(burst.max(1) - 1)),
        }
    }

    /// Takes one unit at `now_ms` from a bucket whose TAT is `tat_us` (`None`: a new key).
    ///
    /// # Errors
    /// The leader time, in milliseconds (rounded up), at which a unit would conform.
    pub fn take(&self, tat_us: Option<u64>, now_ms: u64) -> Result<u64, u64> {
        let now_us = now_ms.saturating_mul(MICROS_PER_MS);
        let tat_us = tat_us.unwrap_or(now_us);
        let earliest_us = tat_us.saturating_sub(self.tolerance_us);
        if now_us < earliest_us {
            return Err(earliest_us.div_ceil(MICROS_PER_MS));
        }
        Ok(tat_us.max(now_us).saturating_add(self.emission_interval_us))
    }

    /// Whether a bucket with TAT `tat_us` is full at `now_ms` (it can be forgotten).
    pub fn is_full(tat_us: u64, now_ms: u64) -> bool {
        tat_us <= now_ms.saturating_mul(MICROS_PER_MS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes a unit at each time of `times_ms` and writes `+` (conforms) or `-<retry at>`.
    fn check(gcra: Gcra, times_ms: &[u64], expected: &str) {
        let mut tat = None;
        let mut actual = Vec::new();
        for now_ms in times_ms {
            match gcra.take(tat, *now_ms) {
                Ok(next) => {
                    tat = Some(next);
                    actual.push("+".to_string());
                }
                Err(at) => actual.push(format!("-{at}")),
            }
        }
        assert_eq!(actual.join(" "), expected);
    }

    #[test]
    fn a_burst_conforms_at_once_then_one_unit_per_interval() {
        // 10 per second, burst 3: T = 100 ms, tau = 200 ms.
        let gcra = Gcra::new(10, 1_000, 3);
        assert_eq!(gcra.emission_interval_us, 100_000);
        assert_eq!(gcra.tolerance_us, 200_000);
        check(
            gcra,
            &[0, 0, 0, 0, 50, 100, 100, 200, 1_000, 1_000, 1_000, 1_000],
            "+ + + -100 -100 + -200 + + + + -1100",
        );
    }

    #[test]
    fn burst_one_spaces_units_by_the_interval() {
        let gcra = Gcra::new(2, 1_000, 1);
        check(
            gcra,
            &[0, 1, 499, 500, 999, 1_000, 5_000],
            "+ -500 -500 + -1000 + +",
        );
    }

    #[test]
    fn fractional_intervals_round_down_to_microseconds() {
        // 3 per second: T = 333_333 us (1 us short each); a retry time is rounded up to ms.
        let gcra = Gcra::new(3, 1_000, 3);
        assert_eq!(gcra.emission_interval_us, 333_333);
        check(gcra, &[0, 0, 0, 0, 333, 334], "+ + + -334 -334 +");
    }

    #[test]
    fn over_any_window_at_most_burst_plus_length_over_interval_conform() {
        let gcra = Gcra::new(5, 1_000, 4);
        let mut tat = None;
        let mut granted = Vec::new();
        for now_ms in (0..10_000).step_by(7) {
            if let Ok(next) = gcra.take(tat, now_ms) {
                tat = Some(next);
                granted.push(now_ms);
            }
        }
        for (i, start) in granted.iter().enumerate() {
            for window_ms in [1u64, 100, 1_000, 3_000] {
                let inside = granted[i..]
                    .iter()
                    .take_while(|t| **t < start + window_ms)
                    .count();
                let bound = 4 + (window_ms * 1_000 / gcra.emission_interval_us) as usize;
                assert!(inside <= bound, "{inside} in {window_ms} ms from {start}");
            }
        }
        // And it is not starved: 10 s at 5/s plus the burst.
        assert!(granted.len() >= 50, "{}", granted.len());
        assert!(Gcra::is_full(tat.unwrap(), 20_000));
    }
}
