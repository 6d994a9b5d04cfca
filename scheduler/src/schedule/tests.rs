//! Data-driven tests of calendars: a spec and a start instant in, the next nominal times out
//! (wall-clock time in the schedule's zone and the note), through one `check` helper.

use chrono::DateTime;

use super::calendar::{Calendar, CalendarSpec, DstGap, DstRepeat, OccurrenceNote};
use super::jitter_ms;

fn millis(rfc3339: &str) -> u64 {
    DateTime::parse_from_rfc3339(rfc3339)
        .expect("test instant")
        .timestamp_millis() as u64
}

fn note(note: OccurrenceNote) -> &'static str {
    match note {
        OccurrenceNote::Exact => "",
        OccurrenceNote::AfterGap => " after_gap",
        OccurrenceNote::RepeatedHour => " repeated_hour",
    }
}

/// The next `expected.len()` nominal times of `spec` after `after` are `expected`
/// ("<local RFC 3339>[ after_gap| repeated_hour]"), and `next_after` agrees with the preview.
fn check(spec: CalendarSpec, after: &str, expected: &[&str]) {
    let calendar = Calendar::compile(&spec, "calendar").expect("valid calendar");
    let preview = calendar.preview(millis(after), expected.len());
    let shown: Vec<String> = preview
        .iter()
        .map(|occurrence| format!("{}{}", occurrence.local_time, note(occurrence.note)))
        .collect();
    assert_eq!(shown, expected, "{spec:?} after {after}");
    let mut cursor = millis(after);
    for occurrence in &preview {
        let next = calendar.next_after(cursor).expect("a next time");
        assert_eq!(next, occurrence.nominal_ms);
        cursor = next;
    }
}

fn cron(pattern: &str, zone: &str) -> CalendarSpec {
    CalendarSpec {
        cron: pattern.into(),
        time_zone: zone.into(),
        ..CalendarSpec::default()
    }
}

fn with(spec: CalendarSpec, gap: DstGap, repeat: DstRepeat) -> CalendarSpec {
    CalendarSpec {
        dst_gap: gap,
        dst_repeat: repeat,
        ..spec
    }
}

// Europe/London 2026: clocks go forward at 01:00 GMT on 29 March (01:00-02:00 does not
// exist) and back at 02:00 BST on 25 October (01:00-02:00 happens twice).
#[test]
fn europe_london_spring_forward() {
    let daily = cron("30 1 * * *", "Europe/London");
    check(
        daily.clone(),
        "2026-03-27T12:00:00Z",
        &[
            "2026-03-28T01:30:00+00:00",
            "2026-03-29T02:00:00+01:00 after_gap",
            "2026-03-30T01:30:00+01:00",
        ],
    );
    check(
        with(daily, DstGap::Skip, DstRepeat::First),
        "2026-03-27T12:00:00Z",
        &["2026-03-28T01:30:00+00:00", "2026-03-30T01:30:00+01:00"],
    );
    // Wildcard minutes: the times inside the gap do not exist and do not fire.
    check(
        cron("*/30 * * * *", "Europe/London"),
        "2026-03-29T00:15:00Z",
        &[
            "2026-03-29T00:30:00+00:00",
            "2026-03-29T02:00:00+01:00",
            "2026-03-29T02:30:00+01:00",
        ],
    );
}

#[test]
fn europe_london_fall_back() {
    let daily = cron("30 1 * * *", "Europe/London");
    check(
        daily.clone(),
        "2026-10-24T12:00:00Z",
        &["2026-10-25T01:30:00+01:00", "2026-10-26T01:30:00+00:00"],
    );
    check(
        with(daily, DstGap::RunAfter, DstRepeat::Both),
        "2026-10-24T12:00:00Z",
        &[
            "2026-10-25T01:30:00+01:00",
            "2026-10-25T01:30:00+00:00 repeated_hour",
            "2026-10-26T01:30:00+00:00",
        ],
    );
    // Wildcard minutes fire in both passes of the repeated hour, whatever the policy.
    check(
        cron("*/30 * * * *", "Europe/London"),
        "2026-10-25T00:15:00Z",
        &[
            "2026-10-25T01:30:00+01:00",
            "2026-10-25T01:00:00+00:00 repeated_hour",
            "2026-10-25T01:30:00+00:00 repeated_hour",
            "2026-10-25T02:00:00+00:00",
        ],
    );
}

// America/New_York 2026: forward at 02:00 EST on 8 March (02:00-03:00 does not exist), back
// at 02:00 EDT on 1 November (01:00-02:00 happens twice).
#[test]
fn america_new_york_spring_forward() {
    let daily = cron("30 2 * * *", "America/New_York");
    check(
        daily.clone(),
        "2026-03-07T12:00:00Z",
        &[
            "2026-03-08T03:00:00-04:00 after_gap",
            "2026-03-09T02:30:00-04:00",
        ],
    );
    check(
        with(daily, DstGap::Skip, DstRepeat::Both),
        "2026-03-07T12:00:00Z",
        &["2026-03-09T02:30:00-04:00", "2026-03-10T02:30:00-04:00"],
    );
}

#[test]
fn america_new_york_fall_back() {
    let daily = cron("30 1 * * *", "America/New_York");
    check(
        daily.clone(),
        "2026-10-31T12:00:00Z",
        &["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"],
    );
    check(
        with(daily, DstGap::Skip, DstRepeat::Both),
        "2026-10-31T12:00:00Z",
        &[
            "2026-11-01T01:30:00-04:00",
            "2026-11-01T01:30:00-05:00 repeated_hour",
            "2026-11-02T01:30:00-05:00",
        ],
    );
}

#[test]
fn macros_seconds_and_zones() {
    check(
        cron("@daily", "Europe/London"),
        "2026-06-01T12:00:00Z",
        &["2026-06-02T00:00:00+01:00", "2026-06-03T00:00:00+01:00"],
    );
    check(
        cron("*/2 * * * * *", ""),
        "2026-06-01T12:00:00.500Z",
        &[
            "2026-06-01T12:00:02+00:00",
            "2026-06-01T12:00:04+00:00",
            "2026-06-01T12:00:06+00:00",
        ],
    );
    check(
        cron("0 9 * * MON-FRI", "Asia/Tokyo"),
        "2026-06-05T01:00:00Z",
        &["2026-06-08T09:00:00+09:00", "2026-06-09T09:00:00+09:00"],
    );
}

#[test]
fn intervals_are_absolute_with_an_offset() {
    let every = |every: &str, offset: &str| CalendarSpec {
        every: every.into(),
        offset: offset.into(),
        // Ignored by intervals: no daylight saving time in absolute time.
        time_zone: "Europe/London".into(),
        ..CalendarSpec::default()
    };
    check(
        every("15m", "5m"),
        "2026-03-29T00:50:00Z",
        &[
            "2026-03-29T01:05:00+00:00",
            "2026-03-29T01:20:00+00:00",
            "2026-03-29T01:35:00+00:00",
        ],
    );
    // An exact boundary is not "after" itself.
    check(
        every("1h", ""),
        "2026-01-01T10:00:00Z",
        &["2026-01-01T11:00:00+00:00"],
    );
}

#[test]
fn start_and_end_bound_the_nominal_times() {
    let spec = CalendarSpec {
        every: "1h".into(),
        start_at_ms: millis("2026-01-01T05:00:00Z"),
        end_at_ms: millis("2026-01-01T07:00:00Z"),
        ..CalendarSpec::default()
    };
    // The start itself is a nominal time; the end is the last one.
    check(
        spec.clone(),
        "2026-01-01T00:00:00Z",
        &[
            "2026-01-01T05:00:00+00:00",
            "2026-01-01T06:00:00+00:00",
            "2026-01-01T07:00:00+00:00",
        ],
    );
    let calendar = Calendar::compile(&spec, "calendar").unwrap();
    assert_eq!(calendar.next_after(millis("2026-01-01T07:00:00Z")), None);
    assert_eq!(calendar.preview(0, 10).len(), 3);
}

#[test]
fn invalid_calendars_name_the_field() {
    let error = |spec: CalendarSpec| {
        Calendar::compile(&spec, "spec.calendar")
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let interval = |every: &str, offset: &str| CalendarSpec {
        every: every.into(),
        offset: offset.into(),
        ..CalendarSpec::default()
    };
    let cases: Vec<(CalendarSpec, &str)> = vec![
        (
            CalendarSpec::default(),
            "spec.calendar: exactly one of cron and every is required",
        ),
        (
            CalendarSpec {
                cron: "* * * * *".into(),
                every: "1m".into(),
                ..CalendarSpec::default()
            },
            "spec.calendar: exactly one of cron and every is required",
        ),
        (
            cron("0 0 * * * * 2027", ""),
            "spec.calendar.cron: \"0 0 * * * * 2027\" has 7 fields; 5 (minute first) or 6 (second first)",
        ),
        (
            cron("* * *", ""),
            "spec.calendar.cron: \"* * *\" has 3 fields; 5 (minute first) or 6 (second first)",
        ),
        (
            cron("0 0 * * *", "Mars/Olympus"),
            "spec.calendar.time_zone: \"Mars/Olympus\" is not an IANA time zone (e.g. Europe/London)",
        ),
        (
            interval("500ms", ""),
            "spec.calendar.every: must be between 1000 ms and 31622400000 ms",
        ),
        (
            interval("15m", "15m"),
            "spec.calendar.offset: must be less than every",
        ),
        (
            CalendarSpec {
                offset: "5m".into(),
                ..cron("0 * * * *", "")
            },
            "spec.calendar.offset: only with every (a cron pattern has its own phase)",
        ),
        (
            CalendarSpec {
                start_at_ms: 2,
                end_at_ms: 1,
                ..interval("1m", "")
            },
            "spec.calendar.end_at_ms: is before start_at_ms",
        ),
    ];
    for (spec, expected) in cases {
        assert_eq!(error(spec), expected);
    }
    assert!(
        error(cron("61 * * * *", ""))
            .starts_with("spec.calendar.cron: \"61 * * * *\" is not a cron pattern")
    );
    assert!(
        error(interval("soon", "")).starts_with("spec.calendar.every: \"soon\" is not a duration")
    );
}

#[test]
fn jitter_is_deterministic_bounded_and_spread() {
    let nominal_ms = millis("2026-01-01T00:00:00Z");
    assert_eq!(jitter_ms("nightly", nominal_ms, 0), 0);
    assert_eq!(
        jitter_ms("nightly", nominal_ms, 60_000),
        jitter_ms("nightly", nominal_ms, 60_000)
    );
    let delays: std::collections::BTreeSet<u64> = (0..100)
        .map(|index| jitter_ms(&format!("schedule-{index}"), nominal_ms, 60_000))
        .collect();
    assert!(delays.iter().all(|delay| *delay <= 60_000));
    // 100 schedules at one nominal time do not start together.
    assert!(delays.len() > 90, "{} distinct delays", delays.len());
}

mod plans {
    use super::super::calendar::{Calendar, CalendarSpec};
    use super::super::plan::{
        Decision, FleetView, MAX_BACKFILL_TICKS, OverlapPolicy, SchedulePolicy, ScheduleProgress,
        SkipReason, backfill_times, plan, plan_backfill,
    };

    fn every_ten_seconds() -> Calendar {
        let spec = CalendarSpec {
            every: "10s".into(),
            ..CalendarSpec::default()
        };
        Calendar::compile(&spec, "calendar").unwrap()
    }

    fn render(decision: &Decision) -> String {
        let seconds = |ms: &u64| ms / 1000;
        match decision {
            Decision::Pause {
                fleet_number,
                failed_runs,
            } => format!("pause fl-{fleet_number} ({failed_runs} failed)"),
            Decision::Cancel { fleet_number } => format!("cancel fl-{fleet_number}"),
            Decision::Start { nominal_ms } => format!("start {}", seconds(nominal_ms)),
            Decision::Buffer { nominal_ms } => format!("buffer {}", seconds(nominal_ms)),
            Decision::Skip { nominal_ms, reason } => {
                let reason = match reason {
                    SkipReason::Overlap => "overlap",
                    SkipReason::BufferFull => "buffer_full",
                    SkipReason::NoRemainingActions => "no_remaining_actions",
                    SkipReason::CatchUpWindow => "catch_up_window",
                };
                format!("skip {} {reason}", seconds(nominal_ms))
            }
            Decision::Missed {
                first_ms,
                last_ms,
                count,
                count_is_lower_bound,
            } => format!(
                "missed {}..{} x{count}{}",
                seconds(first_ms),
                seconds(last_ms),
                if *count_is_lower_bound { "+" } else { "" }
            ),
        }
    }

    /// One plan of a 10 s interval schedule at `now_s`, from `progress` (times in seconds),
    /// with `fleets` as `(number, running?, failed runs)`: its decisions, then
    /// `until=<processed_until_s> buffered=<...> due=<next_due_s>`.
    fn check(
        policy: SchedulePolicy,
        processed_until_s: u64,
        buffered_s: &[u64],
        fleets: &[(u64, bool, u32)],
        now_s: u64,
        expected: &[&str],
    ) -> ScheduleProgress {
        let progress = ScheduleProgress {
            processed_until_ms: processed_until_s * 1000,
            buffered: buffered_s.iter().map(|s| s * 1000).collect(),
            actions_taken: 0,
        };
        let views: Vec<(u64, FleetView)> = fleets
            .iter()
            .map(|(number, running, failed_runs)| {
                let view = if *running {
                    FleetView::Running
                } else {
                    FleetView::Ended {
                        failed_runs: *failed_runs,
                    }
                };
                (*number, view)
            })
            .collect();
        let calendar = every_ten_seconds();
        let planned = plan(
            "nightly",
            &calendar,
            &policy,
            &progress,
            &views,
            now_s * 1000,
        );
        let mut shown: Vec<String> = planned.decisions.iter().map(render).collect();
        let buffered: Vec<String> = planned
            .progress
            .buffered
            .iter()
            .map(|ms| (ms / 1000).to_string())
            .collect();
        shown.push(format!(
            "until={} buffered=[{}] due={}",
            planned.progress.processed_until_ms / 1000,
            buffered.join(","),
            planned.next_due_ms.map_or(0, |ms| ms / 1000)
        ));
        assert_eq!(shown, expected, "{policy:?}");
        // Planning again at the same time decides nothing again: exactly once.
        let again = plan(
            "nightly",
            &calendar,
            &policy,
            &planned.progress,
            &views,
            now_s * 1000,
        );
        assert!(
            again.decisions.iter().all(
                |decision| !matches!(decision, Decision::Start { nominal_ms }
                    if planned.decisions.contains(&Decision::Start { nominal_ms: *nominal_ms }))
            ),
            "a nominal time started twice: {:?}",
            again.decisions
        );
        planned.progress
    }

    fn policy(overlap: OverlapPolicy) -> SchedulePolicy {
        SchedulePolicy {
            overlap,
            ..SchedulePolicy::default()
        }
    }

    #[test]
    fn due_times_start_in_order_and_the_next_waits() {
        check(
            policy(OverlapPolicy::AllowAll),
            100,
            &[],
            &[],
            125,
            &["start 110", "start 120", "until=120 buffered=[] due=130"],
        );
        // Without overlap allowed, the second due time finds the first one's fleet running.
        check(
            policy(OverlapPolicy::Skip),
            100,
            &[],
            &[],
            125,
            &[
                "start 110",
                "skip 120 overlap",
                "until=120 buffered=[] due=130",
            ],
        );
        // Nothing due yet.
        check(
            policy(OverlapPolicy::Skip),
            100,
            &[],
            &[],
            109,
            &["until=100 buffered=[] due=110"],
        );
    }

    #[test]
    fn overlap_policies_with_a_running_fleet() {
        let running = [(7, true, 0)];
        check(
            policy(OverlapPolicy::Skip),
            100,
            &[],
            &running,
            110,
            &["skip 110 overlap", "until=110 buffered=[] due=120"],
        );
        check(
            policy(OverlapPolicy::BufferOne),
            100,
            &[],
            &running,
            130,
            &[
                "buffer 110",
                "skip 120 buffer_full",
                "skip 130 buffer_full",
                "until=130 buffered=[110] due=140",
            ],
        );
        check(
            SchedulePolicy {
                buffer_limit: 2,
                ..policy(OverlapPolicy::BufferAll)
            },
            100,
            &[],
            &running,
            130,
            &[
                "buffer 110",
                "buffer 120",
                "skip 130 buffer_full",
                "until=130 buffered=[110,120] due=140",
            ],
        );
        check(
            policy(OverlapPolicy::CancelOther),
            100,
            &[],
            &running,
            110,
            &["cancel fl-7", "start 110", "until=110 buffered=[] due=120"],
        );
        check(
            policy(OverlapPolicy::AllowAll),
            100,
            &[],
            &running,
            110,
            &["start 110", "until=110 buffered=[] due=120"],
        );
    }

    #[test]
    fn a_buffered_time_starts_when_the_running_fleet_ends() {
        // Still running: the buffer waits.
        check(
            policy(OverlapPolicy::BufferAll),
            130,
            &[110, 120],
            &[(7, true, 0)],
            135,
            &["until=130 buffered=[110,120] due=140"],
        );
        // Ended: the oldest buffered starts; the next stays buffered behind it.
        check(
            policy(OverlapPolicy::BufferAll),
            130,
            &[110, 120],
            &[(7, false, 0)],
            135,
            &["start 110", "until=130 buffered=[120] due=140"],
        );
    }

    #[test]
    fn catch_up_window_after_the_cluster_was_down() {
        // Down from 100 s to 200 s with a 30 s window: 110..160 are missed, 170..200 start
        // (one at a time under Skip).
        check(
            SchedulePolicy {
                catch_up_window_ms: 30_000,
                ..policy(OverlapPolicy::AllowAll)
            },
            100,
            &[],
            &[],
            200,
            &[
                "missed 110..160 x6",
                "start 170",
                "start 180",
                "start 190",
                "start 200",
                "until=200 buffered=[] due=210",
            ],
        );
        // A year down: counting stops, the record says "at least", nothing older is started.
        let year_s = 366 * 24 * 3600;
        let progress = check(
            SchedulePolicy {
                catch_up_window_ms: 30_000,
                ..policy(OverlapPolicy::Skip)
            },
            0,
            &[],
            &[],
            year_s,
            &[
                &format!("missed 10..{} x1000+", year_s - 31),
                &format!("start {}", year_s - 30),
                &format!("skip {} overlap", year_s - 20),
                &format!("skip {} overlap", year_s - 10),
                &format!("skip {year_s} overlap"),
                &format!("until={year_s} buffered=[] due={}", year_s + 10),
            ],
        );
        assert_eq!(progress.actions_taken, 1);
    }

    #[test]
    fn limited_actions_and_pause_on_failure() {
        let mut limited = policy(OverlapPolicy::AllowAll);
        limited.remaining_actions = Some(1);
        check(
            limited,
            100,
            &[],
            &[],
            120,
            &[
                "start 110",
                "skip 120 no_remaining_actions",
                "until=120 buffered=[] due=130",
            ],
        );
        let pausing = SchedulePolicy {
            pause_on_failed_runs: 3,
            ..policy(OverlapPolicy::Skip)
        };
        // Below the threshold: the next time starts.
        check(
            pausing.clone(),
            100,
            &[],
            &[(7, false, 2)],
            110,
            &["start 110", "until=110 buffered=[] due=120"],
        );
        // At it: pause, decide nothing else.
        check(
            pausing,
            100,
            &[],
            &[(7, false, 3)],
            110,
            &["pause fl-7 (3 failed)", "until=100 buffered=[] due=110"],
        );
    }

    #[test]
    fn policies_are_bounded() {
        let error =
            |policy: SchedulePolicy| policy.validate("spec.policy").unwrap_err().to_string();
        assert_eq!(
            error(SchedulePolicy {
                buffer_limit: 0,
                ..SchedulePolicy::default()
            }),
            "spec.policy.buffer_limit: must be between 1 and 1000"
        );
        assert_eq!(
            error(SchedulePolicy {
                catch_up_window_ms: 1,
                ..SchedulePolicy::default()
            }),
            "spec.policy.catch_up_window_ms: must be between 10000 and 31622400000"
        );
        assert!(SchedulePolicy::default().validate("spec.policy").is_ok());
    }

    /// A backfill of `times_s` under `overlap` with `running` fleets and `buffered_s`
    /// already held: its decisions, then the buffer after.
    fn check_backfill(
        overlap: OverlapPolicy,
        buffer_limit: u32,
        times_s: &[u64],
        running: &[u64],
        buffered_s: &[u64],
        expected: &[&str],
    ) {
        let policy = SchedulePolicy {
            buffer_limit,
            ..SchedulePolicy::default()
        };
        let progress = ScheduleProgress {
            processed_until_ms: 1_000_000,
            buffered: buffered_s.iter().map(|s| s * 1000).collect(),
            actions_taken: 0,
        };
        let times: Vec<u64> = times_s.iter().map(|s| s * 1000).collect();
        let (decisions, after) = plan_backfill(&times, overlap, &policy, &progress, running);
        let mut shown: Vec<String> = decisions.iter().map(render).collect();
        let buffered: Vec<String> = after
            .buffered
            .iter()
            .map(|ms| (ms / 1000).to_string())
            .collect();
        shown.push(format!("buffered=[{}]", buffered.join(",")));
        assert_eq!(shown, expected, "{overlap:?}");
        assert_eq!(after.processed_until_ms, progress.processed_until_ms);
    }

    #[test]
    fn backfills_follow_their_own_overlap_policy() {
        let times = [10, 20, 30];
        use OverlapPolicy::*;
        check_backfill(
            AllowAll,
            1000,
            &times,
            &[7],
            &[],
            &["start 10", "start 20", "start 30", "buffered=[]"],
        );
        check_backfill(
            Skip,
            1000,
            &times,
            &[],
            &[],
            &[
                "start 10",
                "skip 20 overlap",
                "skip 30 overlap",
                "buffered=[]",
            ],
        );
        check_backfill(
            Skip,
            1000,
            &times,
            &[7],
            &[],
            &[
                "skip 10 overlap",
                "skip 20 overlap",
                "skip 30 overlap",
                "buffered=[]",
            ],
        );
        // Sequential: the oldest now, the rest one at a time through the buffer.
        check_backfill(
            BufferAll,
            1000,
            &times,
            &[],
            &[],
            &["start 10", "buffer 20", "buffer 30", "buffered=[20,30]"],
        );
        // The buffer's bound counts what it holds already; a time held is not held twice.
        check_backfill(
            BufferAll,
            2,
            &times,
            &[7],
            &[20],
            &[
                "buffer 10",
                "skip 20 buffer_full",
                "skip 30 buffer_full",
                "buffered=[20,10]",
            ],
        );
        check_backfill(
            BufferOne,
            1000,
            &times,
            &[],
            &[],
            &[
                "start 10",
                "buffer 20",
                "skip 30 buffer_full",
                "buffered=[20]",
            ],
        );
        check_backfill(
            CancelOther,
            1000,
            &times,
            &[7, 8],
            &[],
            &[
                "skip 10 overlap",
                "skip 20 overlap",
                "cancel fl-7",
                "cancel fl-8",
                "start 30",
                "buffered=[]",
            ],
        );
    }

    #[test]
    fn backfill_ranges_are_bounded() {
        let calendar = every_ten_seconds();
        assert_eq!(
            backfill_times(&calendar, 10_000, 30_000),
            Ok(vec![10_000, 20_000, 30_000])
        );
        assert_eq!(backfill_times(&calendar, 10_001, 19_999), Ok(vec![]));
        assert_eq!(
            backfill_times(&calendar, 30_000, 10_000),
            Err("to: before from".into())
        );
        let too_many = backfill_times(&calendar, 0, (MAX_BACKFILL_TICKS as u64 + 1) * 10_000);
        assert!(
            too_many
                .as_ref()
                .is_err_and(|error| error.contains("in parts")),
            "{too_many:?}"
        );
        assert_eq!(
            backfill_times(&calendar, 10_000, MAX_BACKFILL_TICKS as u64 * 10_000).map(|t| t.len()),
            Ok(MAX_BACKFILL_TICKS)
        );
    }
}

/// Schedules in the replicated state, driven as the leader drives them: the engine's tick
/// proposes `ProcessSchedule` for due schedules, the state applies it.
mod replicated {
    use super::super::calendar::CalendarSpec;
    use super::super::plan::{OverlapPolicy, SchedulePolicy, fleet_key};
    use super::super::record::{ScheduleSpec, TickOutcome};
    use crate::command::{Command, Request, Response};
    use crate::engine::{EngineSettings, Tick, tick};
    use crate::liveness::LeaseLiveness;
    use crate::spec::tests::spec;
    use crate::state::{FleetState, State};

    const SETTINGS: EngineSettings = EngineSettings {
        lease_ttl_ms: 5_000,
        fleet_retention_ms: 3_600_000,
        compaction_batch_fleets: 10,
        max_events_per_fleet: 1_000,
    };
    const ID: &str = "default/every-2s";

    fn apply(state: &mut State, now_ms: u64, command: Command) -> Response {
        let response = state.apply(&Request {
            now_ms,
            command,
            principal: Default::default(),
        });
        state.check_invariants().expect("invariants");
        response
    }

    /// What the leader proposes at `now_ms`, applied; the fleets started.
    fn leader_tick(state: &mut State, now_ms: u64) -> Vec<String> {
        let mut liveness = LeaseLiveness::new(0, 0);
        let tick_at = Tick {
            now_ms,
            monotonic_ms: now_ms,
            bootstrap: None,
        };
        let mut started = Vec::new();
        for command in tick(state, &SETTINGS, &tick_at, &mut liveness) {
            if let Response::ScheduleProcessed { started: fleets } = apply(state, now_ms, command) {
                started.extend(fleets);
            }
        }
        started
    }

    fn schedule_spec(policy: SchedulePolicy) -> ScheduleSpec {
        ScheduleSpec {
            name: "every-2s".into(),
            calendar: CalendarSpec {
                every: "2s".into(),
                ..CalendarSpec::default()
            },
            policy,
            fleet: spec(&["file:///srv/a"]),
        }
    }

    fn created(policy: SchedulePolicy, now_ms: u64) -> State {
        let mut state = State::new();
        assert_eq!(
            apply(
                &mut state,
                now_ms,
                Command::CreateSchedule {
                    spec: schedule_spec(policy),
                    max_schedules: 1024,
                }
            ),
            Response::ScheduleCreated {
                schedule_id: ID.into(),
                created: true
            }
        );
        state
    }

    fn history(state: &State) -> Vec<String> {
        state
            .schedule(ID)
            .unwrap()
            .history
            .iter()
            .map(|record| match &record.outcome {
                TickOutcome::Started { fleet_id } => {
                    format!("{} started {fleet_id}", record.nominal_ms)
                }
                TickOutcome::Triggered {
                    trigger_id,
                    fleet_id,
                } => format!("triggered {trigger_id} {fleet_id}"),
                TickOutcome::Buffered => format!("{} buffered", record.nominal_ms),
                TickOutcome::Skipped { reason } => {
                    format!("{} skipped {reason}", record.nominal_ms)
                }
                TickOutcome::Missed { last_ms, count, .. } => {
                    format!("{}..{last_ms} missed x{count}", record.nominal_ms)
                }
                TickOutcome::Paused { note } => format!("paused {note}"),
                TickOutcome::Resumed { note } => format!("resumed {note}"),
            })
            .collect()
    }

    #[test]
    fn one_fleet_per_nominal_time_even_when_the_tick_is_proposed_twice() {
        let mut state = created(SchedulePolicy::default(), 1_000);
        assert_eq!(leader_tick(&mut state, 1_999), Vec::<String>::new());
        assert_eq!(leader_tick(&mut state, 2_000), vec!["fl-1"]);
        // A new leader proposes the same tick again (its predecessor's was committed but not
        // acknowledged): nothing new.
        let again = apply(
            &mut state,
            2_000,
            Command::ProcessSchedule {
                schedule_id: ID.into(),
                max_events: 1_000,
            },
        );
        assert_eq!(again, Response::ScheduleProcessed { started: vec![] });
        let fleet = state.fleet("fl-1").unwrap();
        assert_eq!(fleet.idempotency_key, fleet_key(ID, 2_000));
        // fl-1 still runs at 4 s: skipped (overlap skip); ended by 6 s: started.
        assert_eq!(leader_tick(&mut state, 4_000), Vec::<String>::new());
        apply(
            &mut state,
            5_000,
            Command::CancelFleet {
                fleet_id: "fl-1".into(),
            },
        );
        assert_eq!(leader_tick(&mut state, 6_000), vec!["fl-2"]);
        assert_eq!(
            history(&state),
            vec![
                "2000 started fl-1",
                "4000 skipped overlap: a fleet of the schedule is running",
                "6000 started fl-2",
            ]
        );
    }

    #[test]
    fn buffered_ticks_start_when_the_running_fleet_ends() {
        let mut state = created(
            SchedulePolicy {
                overlap: OverlapPolicy::BufferAll,
                buffer_limit: 2,
                ..SchedulePolicy::default()
            },
            1_000,
        );
        assert_eq!(leader_tick(&mut state, 2_000), vec!["fl-1"]);
        assert!(leader_tick(&mut state, 8_000).is_empty());
        apply(
            &mut state,
            8_500,
            Command::CancelFleet {
                fleet_id: "fl-1".into(),
            },
        );
        // Due at once although no nominal time fell due: the buffer's oldest starts.
        assert_eq!(leader_tick(&mut state, 8_600), vec!["fl-2"]);
        assert_eq!(
            history(&state),
            vec![
                "2000 started fl-1",
                "4000 buffered",
                "6000 buffered",
                "8000 skipped buffer_full",
                "4000 started fl-2",
            ]
        );
    }

    #[test]
    fn the_cluster_down_past_the_catch_up_window() {
        let mut state = created(
            SchedulePolicy {
                catch_up_window_ms: 10_000,
                overlap: OverlapPolicy::AllowAll,
                ..SchedulePolicy::default()
            },
            1_000,
        );
        assert_eq!(leader_tick(&mut state, 2_000), vec!["fl-1"]);
        // No leader from 2 s to 30 s: 4..18 s are older than the window, 20..30 s start.
        let started = leader_tick(&mut state, 30_000);
        assert_eq!(
            started,
            vec!["fl-2", "fl-3", "fl-4", "fl-5", "fl-6", "fl-7"]
        );
        assert_eq!(history(&state)[1], "4000..18000 missed x8");
    }

    #[test]
    fn paused_schedules_start_nothing_and_resume_from_now() {
        let mut state = created(SchedulePolicy::default(), 1_000);
        apply(
            &mut state,
            1_500,
            Command::PauseSchedule {
                schedule_id: ID.into(),
                note: "freeze".into(),
            },
        );
        assert!(leader_tick(&mut state, 10_000).is_empty());
        let refused = apply(
            &mut state,
            10_000,
            Command::ProcessSchedule {
                schedule_id: ID.into(),
                max_events: 1_000,
            },
        );
        assert!(matches!(refused, Response::Rejected { .. }), "{refused:?}");
        let resume = Command::ResumeSchedule {
            schedule_id: ID.into(),
            note: "thaw".into(),
        };
        assert_eq!(
            apply(&mut state, 11_000, resume.clone()),
            Response::SchedulePaused { paused: false }
        );
        // Idempotent.
        assert_eq!(
            apply(&mut state, 11_000, resume),
            Response::SchedulePaused { paused: false }
        );
        assert!(leader_tick(&mut state, 11_500).is_empty());
        assert_eq!(leader_tick(&mut state, 12_000), vec!["fl-1"]);
        assert_eq!(
            history(&state),
            vec!["paused freeze", "resumed thaw", "12000 started fl-1"]
        );
    }

    #[test]
    fn pause_on_failure_and_limited_actions() {
        let mut state = created(
            SchedulePolicy {
                pause_on_failed_runs: 1,
                remaining_actions: Some(2),
                ..SchedulePolicy::default()
            },
            1_000,
        );
        assert_eq!(leader_tick(&mut state, 2_000), vec!["fl-1"]);
        // fl-1 ends with its run cancelled (not failed): the schedule goes on.
        apply(
            &mut state,
            3_000,
            Command::CancelFleet {
                fleet_id: "fl-1".into(),
            },
        );
        assert_eq!(leader_tick(&mut state, 4_000), vec!["fl-2"]);
        apply(
            &mut state,
            5_000,
            Command::CancelFleet {
                fleet_id: "fl-2".into(),
            },
        );
        // Two actions taken: no more.
        assert!(leader_tick(&mut state, 6_000).is_empty());
        assert_eq!(
            history(&state).last().map(String::as_str),
            Some("6000 skipped no_remaining_actions")
        );
        assert_eq!(state.fleet("fl-2").unwrap().state, FleetState::Cancelled);
    }

    #[test]
    fn the_operators_schedule_bound_holds() {
        let mut state = created(SchedulePolicy::default(), 1_000);
        let mut second = schedule_spec(SchedulePolicy::default());
        second.name = "second".into();
        let create = |spec: ScheduleSpec, max_schedules| Command::CreateSchedule {
            spec,
            max_schedules,
        };
        assert_eq!(
            apply(&mut state, 1_100, create(second.clone(), 1)),
            Response::Rejected {
                reason: "the cluster holds 1 schedules already (limits.max_schedules)".into()
            }
        );
        assert!(state.schedule("default/second").is_none());
        assert!(matches!(
            apply(&mut state, 1_200, create(second, 2)),
            Response::ScheduleCreated { created: true, .. }
        ));
    }

    #[test]
    fn a_fleet_the_state_refuses_is_recorded_not_dropped() {
        let mut spec = schedule_spec(SchedulePolicy::default());
        spec.fleet
            .agent
            .secrets
            .insert("TOKEN".into(), "deleted-secret".into());
        let mut state = State::new();
        apply(
            &mut state,
            1_000,
            Command::CreateSchedule {
                spec,
                max_schedules: 1024,
            },
        );
        assert!(leader_tick(&mut state, 2_000).is_empty());
        assert_eq!(
            history(&state),
            vec![
                "2000 skipped fleet refused: spec.agent.secrets.TOKEN: no secret \"deleted-secret\" in project \"default\""
            ]
        );
        // Decided: not proposed again until the next nominal time.
        assert!(state.due_schedules(3_999).is_empty());
        assert_eq!(state.due_schedules(4_000), vec![ID.to_owned()]);
    }

    #[test]
    fn schedules_are_validated_unique_and_survive_a_snapshot() {
        let mut state = created(SchedulePolicy::default(), 1_000);
        // The same spec again: not created twice; another spec under the id: refused.
        assert_eq!(
            apply(
                &mut state,
                1_100,
                Command::CreateSchedule {
                    spec: schedule_spec(SchedulePolicy::default()),
                    max_schedules: 1024,
                }
            ),
            Response::ScheduleCreated {
                schedule_id: ID.into(),
                created: false
            }
        );
        let other = schedule_spec(SchedulePolicy {
            overlap: OverlapPolicy::AllowAll,
            ..SchedulePolicy::default()
        });
        assert!(matches!(
            apply(
                &mut state,
                1_100,
                Command::CreateSchedule {
                    spec: other,
                    max_schedules: 1024
                }
            ),
            Response::Rejected { .. }
        ));
        let mut invalid = schedule_spec(SchedulePolicy::default());
        invalid.calendar.every = "1ms".into();
        let refused = apply(
            &mut state,
            1_100,
            Command::CreateSchedule {
                spec: invalid,
                max_schedules: 1024,
            },
        );
        assert_eq!(
            refused,
            Response::Rejected {
                reason: "spec.calendar.every: must be between 1000 ms and 31622400000 ms".into()
            }
        );
        assert_eq!(leader_tick(&mut state, 2_000), vec!["fl-1"]);
        let copy: State = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        assert_eq!(copy.schedule(ID), state.schedule(ID));
        assert_eq!(
            apply(
                &mut state,
                2_100,
                Command::DeleteSchedule {
                    schedule_id: ID.into()
                }
            ),
            Response::ScheduleDeleted { existed: true }
        );
        assert!(leader_tick(&mut state, 10_000).is_empty());
    }

    fn trigger(
        state: &mut State,
        now_ms: u64,
        trigger_id: &str,
        overlap: OverlapPolicy,
    ) -> Response {
        apply(
            state,
            now_ms,
            Command::TriggerSchedule {
                schedule_id: ID.into(),
                trigger_id: trigger_id.into(),
                overlap,
                max_events: 1_000,
            },
        )
    }

    fn backfill(
        state: &mut State,
        now_ms: u64,
        from_ms: u64,
        to_ms: u64,
        overlap: OverlapPolicy,
    ) -> Response {
        apply(
            state,
            now_ms,
            Command::BackfillSchedule {
                schedule_id: ID.into(),
                from_ms,
                to_ms,
                overlap,
                max_events: 1_000,
            },
        )
    }

    #[test]
    fn triggers_have_their_own_ids_and_respect_their_overlap() {
        let mut state = created(SchedulePolicy::default(), 1_000);
        let first = trigger(&mut state, 1_100, "deploy-1", OverlapPolicy::AllowAll);
        assert_eq!(
            first,
            Response::ScheduleTriggered {
                fleet_id: "fl-1".into(),
                created: true
            }
        );
        // The same id again (a retried request): the same fleet. Another id in the same
        // millisecond: another fleet (no one-per-second limit).
        assert_eq!(
            trigger(&mut state, 1_100, "deploy-1", OverlapPolicy::Skip),
            Response::ScheduleTriggered {
                fleet_id: "fl-1".into(),
                created: false
            }
        );
        assert_eq!(
            trigger(&mut state, 1_100, "deploy-2", OverlapPolicy::AllowAll),
            Response::ScheduleTriggered {
                fleet_id: "fl-2".into(),
                created: true
            }
        );
        assert_eq!(
            state.fleet("fl-2").unwrap().idempotency_key,
            "schedule:default/every-2s/trigger:deploy-2"
        );
        // Triggered fleets are the schedule's: the 2 s tick overlaps them (skip).
        assert!(leader_tick(&mut state, 2_000).is_empty());
        let refused = trigger(&mut state, 2_100, "deploy-3", OverlapPolicy::Skip);
        assert!(
            matches!(&refused, Response::Rejected { reason } if reason.contains("is running")),
            "{refused:?}"
        );
        // cancel_other ends both and starts its own.
        assert_eq!(
            trigger(&mut state, 2_200, "deploy-3", OverlapPolicy::CancelOther),
            Response::ScheduleTriggered {
                fleet_id: "fl-3".into(),
                created: true
            }
        );
        assert_eq!(state.fleet("fl-1").unwrap().state, FleetState::Cancelled);
        assert_eq!(state.fleet("fl-2").unwrap().state, FleetState::Cancelled);
        for bad in ["", "a b", &"x".repeat(129)] {
            let response = trigger(&mut state, 2_300, bad, OverlapPolicy::AllowAll);
            assert!(
                matches!(&response, Response::Rejected { reason } if reason.starts_with("trigger_id")),
                "{bad:?}: {response:?}"
            );
        }
        let buffered = trigger(&mut state, 2_300, "deploy-4", OverlapPolicy::BufferOne);
        assert!(matches!(buffered, Response::Rejected { .. }));
        // Triggers take no action from a limited schedule and start while paused.
        apply(
            &mut state,
            2_400,
            Command::PauseSchedule {
                schedule_id: ID.into(),
                note: "freeze".into(),
            },
        );
        assert!(matches!(
            trigger(&mut state, 2_500, "deploy-5", OverlapPolicy::AllowAll),
            Response::ScheduleTriggered { created: true, .. }
        ));
        assert_eq!(state.schedule(ID).unwrap().progress.actions_taken, 0);
        assert_eq!(
            history(&state),
            vec![
                "triggered deploy-1 fl-1",
                "triggered deploy-2 fl-2",
                "2000 skipped overlap: a fleet of the schedule is running",
                "triggered deploy-3 fl-3",
                "paused freeze",
                "triggered deploy-5 fl-4",
            ]
        );
    }

    #[test]
    fn backfills_start_past_times_once_under_their_own_policy() {
        let mut state = created(SchedulePolicy::default(), 1_000);
        assert_eq!(leader_tick(&mut state, 2_000), vec!["fl-1"]);
        // 4 s and 6 s are skipped (fl-1 runs); fl-1 ends; 8 s starts fl-2.
        assert!(leader_tick(&mut state, 6_000).is_empty());
        apply(
            &mut state,
            7_000,
            Command::CancelFleet {
                fleet_id: "fl-1".into(),
            },
        );
        assert_eq!(leader_tick(&mut state, 8_000), vec!["fl-2"]);
        apply(
            &mut state,
            8_500,
            Command::CancelFleet {
                fleet_id: "fl-2".into(),
            },
        );
        // Times not yet decided, or in the future, are the schedule's own.
        for (to_ms, words) in [(9_000, "in the future"), (8_900, "the last time")] {
            let response = backfill(&mut state, 8_900, 2_000, to_ms, OverlapPolicy::AllowAll);
            assert!(
                matches!(&response, Response::Rejected { reason }
                    if reason.starts_with("to:") && reason.contains(words)),
                "{response:?}"
            );
        }
        // 2..8 s under buffer_all (sequential): 2 s and 8 s have their fleets; of the gaps,
        // 4 s starts now and 6 s waits in the buffer.
        let filled = backfill(&mut state, 8_900, 2_000, 8_000, OverlapPolicy::BufferAll);
        assert_eq!(
            filled,
            Response::ScheduleBackfilled {
                started: vec!["fl-3".into()],
                buffered: 1,
                skipped: 2,
            }
        );
        assert_eq!(
            state.fleet("fl-3").unwrap().idempotency_key,
            fleet_key(ID, 4_000)
        );
        assert_eq!(state.schedule(ID).unwrap().progress.buffered, [6_000]);
        // The buffer drains when fl-3 ends; nothing else starts.
        assert!(leader_tick(&mut state, 9_000).is_empty());
        apply(
            &mut state,
            9_100,
            Command::CancelFleet {
                fleet_id: "fl-3".into(),
            },
        );
        assert_eq!(leader_tick(&mut state, 9_200), vec!["fl-4"]);
        apply(
            &mut state,
            9_300,
            Command::CancelFleet {
                fleet_id: "fl-4".into(),
            },
        );
        assert!(leader_tick(&mut state, 9_400).is_empty());
        let history = history(&state);
        assert_eq!(
            history[history.len() - 5..],
            [
                "2000 skipped already started as fl-1",
                "8000 skipped already started as fl-2",
                "4000 started fl-3",
                "6000 buffered",
                "6000 started fl-4",
            ]
        );
        assert_eq!(state.schedule(ID).unwrap().progress.actions_taken, 4);
        // The same range again starts nothing new.
        let again = backfill(&mut state, 9_500, 2_000, 8_000, OverlapPolicy::AllowAll);
        assert_eq!(
            again,
            Response::ScheduleBackfilled {
                started: vec![],
                buffered: 0,
                skipped: 4,
            }
        );
    }

    #[test]
    fn a_paused_schedule_takes_a_backfill_of_its_pause() {
        let mut state = created(SchedulePolicy::default(), 1_000);
        apply(
            &mut state,
            1_500,
            Command::PauseSchedule {
                schedule_id: ID.into(),
                note: "outage".into(),
            },
        );
        assert!(leader_tick(&mut state, 9_000).is_empty());
        let filled = backfill(&mut state, 9_000, 2_000, 6_000, OverlapPolicy::AllowAll);
        assert_eq!(
            filled,
            Response::ScheduleBackfilled {
                started: vec!["fl-1".into(), "fl-2".into(), "fl-3".into()],
                buffered: 0,
                skipped: 0,
            }
        );
        apply(
            &mut state,
            9_500,
            Command::ResumeSchedule {
                schedule_id: ID.into(),
                note: String::new(),
            },
        );
        // Resuming skips the pause (its times were backfilled or are not wanted).
        assert!(leader_tick(&mut state, 9_600).is_empty());
        assert_eq!(state.schedule(ID).unwrap().progress.actions_taken, 3);
    }
}
