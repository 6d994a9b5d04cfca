//! Canary waves and the failure budget, as pure decisions (tested by tables, no state).
//!
//! A fleet rolls out in waves: wave `w` may lease runs `0..wave_ends[w]` (runs in submission
//! order). When every run of the current wave is terminal, [`decide_wave`] says what follows:
//! the next wave at once, after a soak time, or an approval gate when the wave's success is
//! below the threshold (or every wave must be approved). Independently, [`budget_exceeded`]
//! pauses the fleet when too many runs failed, in all or in a row (as Argo Rollouts'
//! `failureLimit` and `consecutiveErrorLimit`: the limit is the most failures tolerated).

use serde::{Deserialize, Serialize};

use crate::flow::{FlowSpec, MAX_WAVES};
use crate::spec::FieldError;

/// The cumulative size of the rollout at the end of one wave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveSize {
    /// This many runs (at least 1; more than the fleet has means all of them).
    Runs(u32),
    /// This percentage of the fleet's runs, 1-100, rounded up, at least one run.
    Percent(u32),
}

impl std::fmt::Display for WaveSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaveSize::Runs(runs) => write!(f, "{runs}"),
            WaveSize::Percent(percent) => write!(f, "{percent}%"),
        }
    }
}

/// Checks a wave list: at most [`MAX_WAVES`], runs at least 1, percentages 1-100, each unit
/// increasing. Errors name `field[i]`.
///
/// # Errors
/// The first invalid wave.
pub fn validate_waves(waves: &[WaveSize], field: &str) -> Result<(), FieldError> {
    if waves.len() > MAX_WAVES {
        return Err(FieldError::new(
            field,
            format!("more than {MAX_WAVES} waves"),
        ));
    }
    let (mut last_runs, mut last_percent) = (0u32, 0u32);
    for (index, wave) in waves.iter().enumerate() {
        let name = format!("{field}[{index}]");
        match *wave {
            WaveSize::Runs(runs) => {
                if runs == 0 {
                    return Err(FieldError::new(name, "a wave has at least 1 run"));
                }
                if runs <= last_runs {
                    return Err(FieldError::new(
                        name,
                        format!("{runs} runs is not more than the previous wave's {last_runs}"),
                    ));
                }
                last_runs = runs;
            }
            WaveSize::Percent(percent) => {
                if percent == 0 || percent > 100 {
                    return Err(FieldError::new(name, "a percentage is 1-100"));
                }
                if percent <= last_percent {
                    return Err(FieldError::new(
                        name,
                        format!("{percent}% is not more than the previous wave's {last_percent}%"),
                    ));
                }
                last_percent = percent;
            }
        }
    }
    Ok(())
}

/// The cumulative run count at the end of each wave of a fleet of `run_count` runs:
/// increasing, the last equal to `run_count`. A wave that resolves to no more runs than the
/// one before (2% and 3% of 20 runs are both 1) is merged into it; a last wave of 100% is
/// added when the list ends short. Empty for an empty fleet.
pub fn resolve_waves(waves: &[WaveSize], run_count: u32) -> Vec<u32> {
    let mut ends: Vec<u32> = Vec::with_capacity(waves.len() + 1);
    for wave in waves {
        let end = match *wave {
            WaveSize::Runs(runs) => runs.min(run_count),
            WaveSize::Percent(percent) => {
                let scaled = (u64::from(percent) * u64::from(run_count)).div_ceil(100);
                (scaled as u32).clamp(1, run_count)
            }
        };
        if end > ends.last().copied().unwrap_or(0) {
            ends.push(end);
        }
    }
    if run_count > 0 && ends.last().copied() != Some(run_count) {
        ends.push(run_count);
    }
    ends
}

/// How one wave ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaveResult {
    /// The wave, 0-based.
    pub wave: u32,
    /// How many waves the fleet has.
    pub wave_count: u32,
    /// Runs in the wave.
    pub runs: u32,
    /// Of them, runs that changed or found nothing to change.
    pub succeeded: u32,
}

/// What follows a wave whose runs are all terminal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaveDecision {
    /// It was the last wave: nothing follows.
    Last,
    /// The next wave starts now.
    Promote,
    /// The next wave starts at this leader time (the soak time).
    PromoteAt(u64),
    /// The next wave waits for approval, for this reason.
    Gate(String),
}

/// Decides what follows `result` under `flow` at `now_ms` (module documentation).
pub fn decide_wave(flow: &FlowSpec, result: WaveResult, now_ms: u64) -> WaveDecision {
    debug_assert!(result.succeeded <= result.runs);
    if result.wave + 1 >= result.wave_count {
        return WaveDecision::Last;
    }
    let percent = if result.runs == 0 {
        100
    } else {
        u64::from(result.succeeded) * 100 / u64::from(result.runs)
    };
    let summary = format!(
        "wave {} of {}: {} of {} runs succeeded ({percent}%)",
        result.wave + 1,
        result.wave_count,
        result.succeeded,
        result.runs
    );
    let met = u64::from(result.succeeded) * 100
        >= u64::from(flow.success_threshold_percent) * u64::from(result.runs);
    if !met {
        return WaveDecision::Gate(format!(
            "{summary}, below success_threshold_percent {}",
            flow.success_threshold_percent
        ));
    }
    if flow.approve_each_wave {
        return WaveDecision::Gate(format!("{summary}; approve_each_wave is set"));
    }
    if flow.soak_ms > 0 {
        return WaveDecision::PromoteAt(now_ms.saturating_add(flow.soak_ms));
    }
    WaveDecision::Promote
}

/// Why the failure budget is exceeded, if it is: `failures` runs failed since the fleet
/// started or was resumed, the last `consecutive_failures` of them in a row.
pub fn budget_exceeded(
    flow: &FlowSpec,
    failures: u32,
    consecutive_failures: u32,
) -> Option<String> {
    if let Some(limit) = flow.failure_limit
        && failures > limit
    {
        return Some(format!(
            "failure budget: {failures} failed runs, more than failure_limit {limit}"
        ));
    }
    if let Some(limit) = flow.consecutive_failure_limit
        && consecutive_failures > limit
    {
        return Some(format!(
            "failure budget: {consecutive_failures} runs failed in a row, more than consecutive_failure_limit {limit}"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `waves` as `"1% 10% 5 100%"`.
    fn parse(waves: &str) -> Vec<WaveSize> {
        waves
            .split_whitespace()
            .map(|w| match w.strip_suffix('%') {
                Some(p) => WaveSize::Percent(p.parse().unwrap()),
                None => WaveSize::Runs(w.parse().unwrap()),
            })
            .collect()
    }

    #[track_caller]
    fn check_resolve(waves: &str, run_count: u32, expected: &[u32]) {
        assert_eq!(
            resolve_waves(&parse(waves), run_count),
            expected,
            "{waves} of {run_count}"
        );
    }

    #[test]
    fn waves_resolve_to_increasing_cumulative_ends() {
        check_resolve("", 10, &[10]);
        check_resolve("", 0, &[]);
        check_resolve("1% 10% 100%", 200, &[2, 20, 200]);
        check_resolve("1% 10%", 200, &[2, 20, 200]);
        check_resolve("1% 10% 50%", 7, &[1, 4, 7]);
        // 1% and 2% of 20 runs are both one run: merged.
        check_resolve("1% 2% 50%", 20, &[1, 10, 20]);
        check_resolve("5 50", 20, &[5, 20]);
        check_resolve("1 10%", 200, &[1, 20, 200]);
        check_resolve("100%", 3, &[3]);
        check_resolve("1", 1, &[1]);
    }

    #[test]
    fn wave_lists_are_checked_naming_the_wave() {
        assert!(validate_waves(&parse("1% 10% 100% 5 10"), "w").is_ok());
        for (waves, field, message) in [
            ("0", "w[0]", "at least 1"),
            ("0%", "w[0]", "1-100"),
            ("101%", "w[0]", "1-100"),
            ("10% 5%", "w[1]", "not more than"),
            ("5 5", "w[1]", "not more than"),
        ] {
            let error = validate_waves(&parse(waves), "w").unwrap_err();
            assert_eq!(error.field, field, "{waves}");
            assert!(
                error.message.contains(message),
                "{waves}: {}",
                error.message
            );
        }
        let many = vec![WaveSize::Runs(1); MAX_WAVES + 1];
        assert!(validate_waves(&many, "w").is_err());
    }

    /// `flow` as `"threshold=90 soak=1000 each"`; `result` as `"wave/count succeeded/runs"`.
    #[track_caller]
    fn check_decide(flow: &str, result: &str, expected: &str) {
        let mut spec = FlowSpec::default();
        for item in flow.split_whitespace() {
            match item.split_once('=') {
                Some(("threshold", v)) => spec.success_threshold_percent = v.parse().unwrap(),
                Some(("soak", v)) => spec.soak_ms = v.parse().unwrap(),
                None if item == "each" => spec.approve_each_wave = true,
                _ => panic!("{item}"),
            }
        }
        let (wave, ratio) = result.split_once(' ').unwrap();
        let (wave, wave_count) = wave.split_once('/').unwrap();
        let (succeeded, runs) = ratio.split_once('/').unwrap();
        let result = WaveResult {
            wave: wave.parse().unwrap(),
            wave_count: wave_count.parse().unwrap(),
            runs: runs.parse().unwrap(),
            succeeded: succeeded.parse().unwrap(),
        };
        let actual = match decide_wave(&spec, result, 1_000) {
            WaveDecision::Last => "last".to_string(),
            WaveDecision::Promote => "promote".to_string(),
            WaveDecision::PromoteAt(at) => format!("promote at {at}"),
            WaveDecision::Gate(reason) => format!("gate: {reason}"),
        };
        assert_eq!(actual, expected, "{flow} / {result:?}");
    }

    #[test]
    fn a_finished_wave_promotes_soaks_or_waits_at_a_gate() {
        check_decide("", "0/3 2/2", "promote");
        check_decide("", "2/3 0/2", "last");
        check_decide("soak=500", "0/3 2/2", "promote at 1500");
        check_decide(
            "",
            "0/3 1/2",
            "gate: wave 1 of 3: 1 of 2 runs succeeded (50%), below success_threshold_percent 100",
        );
        check_decide("threshold=90", "1/3 18/20", "promote");
        check_decide(
            "threshold=90",
            "1/3 17/20",
            "gate: wave 2 of 3: 17 of 20 runs succeeded (85%), below success_threshold_percent 90",
        );
        check_decide("threshold=0", "0/2 0/5", "promote");
        check_decide(
            "each soak=500",
            "0/2 5/5",
            "gate: wave 1 of 2: 5 of 5 runs succeeded (100%); approve_each_wave is set",
        );
    }

    #[test]
    fn the_failure_budget_tolerates_its_limit_and_no_more() {
        let mut flow = FlowSpec::default();
        assert_eq!(budget_exceeded(&flow, 1_000, 1_000), None);
        flow.failure_limit = Some(3);
        assert_eq!(budget_exceeded(&flow, 3, 3), None);
        assert_eq!(
            budget_exceeded(&flow, 4, 1).as_deref(),
            Some("failure budget: 4 failed runs, more than failure_limit 3")
        );
        flow.failure_limit = Some(0);
        assert!(budget_exceeded(&flow, 1, 1).is_some());
        flow.failure_limit = None;
        flow.consecutive_failure_limit = Some(2);
        assert_eq!(budget_exceeded(&flow, 9, 2), None);
        assert_eq!(
            budget_exceeded(&flow, 9, 3).as_deref(),
            Some("failure budget: 3 runs failed in a row, more than consecutive_failure_limit 2")
        );
    }
}
