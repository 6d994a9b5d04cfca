//! When a schedule fires: its nominal times, pure functions of the spec and a time in
//! milliseconds since the Unix epoch (UTC). No clock is read here; the state machine asks with
//! the replicated time.
//!
//! - A **cron** calendar is a pattern of 5 fields (`minute hour day-of-month month
//!   day-of-week`) or 6 (seconds first), or a macro (`@yearly`, `@monthly`, `@weekly`,
//!   `@daily`, `@hourly`), parsed by `croner` (POSIX/Vixie cron, plus `L`, `W`, `#`), matched
//!   against the wall clock of an IANA time zone from `chrono-tz`, whose zone data is compiled
//!   into the binary, so every replica computes the same instants whatever its host's zoneinfo.
//! - An **interval** calendar fires every `every` from the Unix epoch plus `offset`
//!   (`every: 15m, offset: 5m` fires at :05, :20, :35, :50 of every hour), in absolute time: no
//!   time zone, no daylight saving time.
//!
//! Daylight saving time (cron calendars only) follows croner's rules (those of Vixie cron),
//! adjusted by two explicit per-schedule choices ([`DstGap`], [`DstRepeat`]):
//!
//! | local time of a fixed-time pattern (e.g. `30 2 * * *`) | `DstGap::RunAfter` / `DstRepeat::First` (default) | `DstGap::Skip` / `DstRepeat::Both` |
//! |---|---|---|
//! | in the spring-forward gap (02:30 does not exist) | fires at the first instant after the gap (03:00) | does not fire that day |
//! | in the fall-back hour (01:30 happens twice) | fires once, at the first 01:30 | fires at both 01:30s, an hour apart |
//!
//! Patterns with wildcards or steps in their second, minute or hour fields (`*/15 * * * *`)
//! fire at each matching wall-clock time that exists: none inside a gap, both passes of a
//! repeated hour, whatever the policy.

use chrono::{DateTime, LocalResult, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde::{Deserialize, Serialize};

use crate::spec::FieldError;

/// Shortest interval: 1 second.
pub const MIN_INTERVAL_MS: u64 = 1_000;
/// Longest interval and offset: 366 days.
pub const MAX_INTERVAL_MS: u64 = 366 * 24 * 3_600_000;
/// Longest cron pattern or interval text, bytes.
pub const MAX_CALENDAR_TEXT_BYTES: usize = 256;
/// Most nominal times one [`Calendar::preview`] returns.
pub const MAX_PREVIEW_COUNT: usize = 1000;
/// Latest instant a calendar computes: 9999-12-31T23:59:59Z, in milliseconds.
pub const MAX_CALENDAR_TIME_MS: u64 = 253_402_300_799_000;
/// Most occurrences skipped in one search for the next nominal time ([`DstGap::Skip`] drops
/// shifted ones): a bound on the work of one call.
const MAX_SKIPPED_OCCURRENCES: usize = 64;

/// What a fixed-time cron pattern does when its local time falls in a spring-forward gap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DstGap {
    /// Fire at the first instant after the gap, the same day (Vixie cron; the default).
    #[default]
    RunAfter,
    /// Do not fire that day (Temporal's literal matching).
    Skip,
}

/// What a fixed-time cron pattern does when its local time happens twice (fall back).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DstRepeat {
    /// Fire once, at the first of the two (Vixie cron; the default).
    #[default]
    First,
    /// Fire at both, an hour (the offset change) apart (Temporal's literal matching).
    Both,
}

/// A calendar as submitted and stored: exactly one of `cron` and `every`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CalendarSpec {
    /// A cron pattern (5 or 6 fields, or a macro); empty when `every` is set.
    pub cron: String,
    /// An interval as text (`15m`, `1h 30m`, `2s`; humantime's units), 1 s to 366 days; empty
    /// when `cron` is set.
    pub every: String,
    /// With `every`: the phase from the Unix epoch (`5m`), less than `every`. Empty: 0.
    pub offset: String,
    /// The IANA time zone cron patterns are matched in (`Europe/London`); empty: `UTC`.
    /// Ignored by intervals.
    pub time_zone: String,
    /// No nominal time before this instant (ms since the epoch); 0: no bound.
    pub start_at_ms: u64,
    /// No nominal time after this instant (ms since the epoch); 0: no bound.
    pub end_at_ms: u64,
    /// Spring-forward gap policy of fixed-time cron patterns.
    pub dst_gap: DstGap,
    /// Fall-back repeat policy of fixed-time cron patterns.
    pub dst_repeat: DstRepeat,
}

/// Why a nominal time is where it is: what a preview shows next to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OccurrenceNote {
    /// The pattern's wall-clock time, as written.
    Exact,
    /// The pattern's local time did not exist (spring forward): moved to just after the gap.
    AfterGap,
    /// The second of two instants with the same local time (fall back).
    RepeatedHour,
}

/// One nominal time of a calendar.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occurrence {
    /// Milliseconds since the Unix epoch.
    pub nominal_ms: u64,
    /// The wall-clock time in the calendar's zone, RFC 3339 with its offset
    /// (`2026-03-29T03:00:00+01:00`); UTC for intervals.
    pub local_time: String,
    /// Why it is there.
    pub note: OccurrenceNote,
}

#[derive(Clone, Debug)]
enum Rule {
    Cron(Box<Cron>),
    Interval { every_ms: u64, offset_ms: u64 },
}

/// A compiled [`CalendarSpec`]: computes nominal times. Compile once per schedule (parsing a
/// pattern allocates); every method is pure.
#[derive(Clone, Debug)]
pub struct Calendar {
    rule: Rule,
    zone: Tz,
    start_at_ms: u64,
    end_at_ms: u64,
    dst_gap: DstGap,
    dst_repeat: DstRepeat,
}

fn parse_duration_ms(field: &str, text: &str) -> Result<u64, FieldError> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|error| FieldError::new(field, format!("{text:?} is not a duration: {error}")))?;
    u64::try_from(duration.as_millis())
        .map_err(|_| FieldError::new(field, format!("{text:?} is too long")))
}

impl Calendar {
    /// Compiles and checks a spec; `field` is its path in the request (`spec.calendar`).
    ///
    /// # Errors
    /// The first invalid field below `field`: both or neither of `cron` and `every`, a pattern
    /// croner refuses (or a 7-field one with years), an interval outside 1 s to 366 days, an
    /// offset not below the interval, an unknown time zone, `end_at_ms` before `start_at_ms`,
    /// text over [`MAX_CALENDAR_TEXT_BYTES`].
    pub fn compile(spec: &CalendarSpec, field: &str) -> Result<Calendar, FieldError> {
        for (name, text) in [
            ("cron", &spec.cron),
            ("every", &spec.every),
            ("offset", &spec.offset),
            ("time_zone", &spec.time_zone),
        ] {
            if text.len() > MAX_CALENDAR_TEXT_BYTES {
                return Err(FieldError::new(
                    format!("{field}.{name}"),
                    format!("longer than {MAX_CALENDAR_TEXT_BYTES} bytes"),
                ));
            }
        }
        let rule = match (spec.cron.trim().is_empty(), spec.every.trim().is_empty()) {
            (false, false) | (true, true) => {
                return Err(FieldError::new(
                    field,
                    "exactly one of cron and every is required",
                ));
            }
            (false, true) => Rule::Cron(Box::new(compile_cron(&spec.cron, field)?)),
            (true, false) => compile_interval(spec, field)?,
        };
        if !spec.offset.trim().is_empty() && matches!(rule, Rule::Cron(_)) {
            return Err(FieldError::new(
                format!("{field}.offset"),
                "only with every (a cron pattern has its own phase)",
            ));
        }
        let zone = match spec.time_zone.trim() {
            "" => Tz::UTC,
            name => name.parse::<Tz>().map_err(|_| {
                FieldError::new(
                    format!("{field}.time_zone"),
                    format!("{name:?} is not an IANA time zone (e.g. Europe/London)"),
                )
            })?,
        };
        if spec.end_at_ms != 0 && spec.end_at_ms < spec.start_at_ms {
            return Err(FieldError::new(
                format!("{field}.end_at_ms"),
                "is before start_at_ms",
            ));
        }
        for (name, value) in [
            ("start_at_ms", spec.start_at_ms),
            ("end_at_ms", spec.end_at_ms),
        ] {
            if value > MAX_CALENDAR_TIME_MS {
                return Err(FieldError::new(
                    format!("{field}.{name}"),
                    format!("after {MAX_CALENDAR_TIME_MS} (year 9999)"),
                ));
            }
        }
        Ok(Calendar {
            rule,
            zone,
            start_at_ms: spec.start_at_ms,
            end_at_ms: spec.end_at_ms,
            dst_gap: spec.dst_gap,
            dst_repeat: spec.dst_repeat,
        })
    }

    /// The first nominal time strictly after `after_ms`, within the start and end bounds;
    /// `None` when there is none (past `end_at_ms`, or beyond year 9999).
    pub fn next_after(&self, after_ms: u64) -> Option<u64> {
        self.next_occurrence(after_ms)
            .map(|(nominal_ms, _)| nominal_ms)
    }

    /// Up to `count` (at most [`MAX_PREVIEW_COUNT`]) nominal times after `after_ms`, with their
    /// wall-clock times and notes: what `schedule preview` prints and what later fires.
    pub fn preview(&self, after_ms: u64, count: usize) -> Vec<Occurrence> {
        let mut occurrences = Vec::new();
        let mut cursor = after_ms;
        while occurrences.len() < count.min(MAX_PREVIEW_COUNT) {
            let Some((nominal_ms, note)) = self.next_occurrence(cursor) else {
                break;
            };
            occurrences.push(Occurrence {
                nominal_ms,
                local_time: self.local_time(nominal_ms),
                note,
            });
            cursor = nominal_ms;
        }
        occurrences
    }

    /// `nominal_ms` as RFC 3339 in the calendar's zone (UTC for intervals).
    pub fn local_time(&self, nominal_ms: u64) -> String {
        let Some(instant) = instant(nominal_ms) else {
            return String::new();
        };
        match self.rule {
            Rule::Cron(_) => instant.with_timezone(&self.zone).to_rfc3339(),
            Rule::Interval { .. } => instant.to_rfc3339(),
        }
    }

    fn next_occurrence(&self, after_ms: u64) -> Option<(u64, OccurrenceNote)> {
        // Never before the start: search from just before it.
        let from_ms = after_ms.max(self.start_at_ms.saturating_sub(1));
        let found = match &self.rule {
            Rule::Interval {
                every_ms,
                offset_ms,
            } => next_interval(from_ms, *every_ms, *offset_ms)
                .map(|nominal_ms| (nominal_ms, OccurrenceNote::Exact)),
            Rule::Cron(cron) => self.next_cron(cron, from_ms),
        }?;
        if found.0 > MAX_CALENDAR_TIME_MS || (self.end_at_ms != 0 && found.0 > self.end_at_ms) {
            return None;
        }
        Some(found)
    }

    fn next_cron(&self, cron: &Cron, after_ms: u64) -> Option<(u64, OccurrenceNote)> {
        let mut cursor = instant(after_ms)?.with_timezone(&self.zone);
        let repeated = self.second_pass_after(cron, &cursor);
        for _ in 0..MAX_SKIPPED_OCCURRENCES {
            let next = cron.find_next_occurrence(&cursor, false).ok()?;
            if let Some(second) = &repeated
                && second <= &next
            {
                return Some((milliseconds(second)?, OccurrenceNote::RepeatedHour));
            }
            // croner moves a fixed time out of a gap: it then no longer matches as written.
            let exact = cron.is_time_matching(&next).unwrap_or(false);
            if exact {
                let note = if self.is_second_pass(&next) {
                    OccurrenceNote::RepeatedHour
                } else {
                    OccurrenceNote::Exact
                };
                return Some((milliseconds(&next)?, note));
            }
            if self.dst_gap == DstGap::RunAfter {
                return Some((milliseconds(&next)?, OccurrenceNote::AfterGap));
            }
            cursor = next;
        }
        None
    }

    /// With [`DstRepeat::Both`]: when the last occurrence at or before `cursor` is the first of
    /// two instants with the same local time, the second one, if it is after `cursor` (croner
    /// fires fixed-time patterns only at the first).
    fn second_pass_after(&self, cron: &Cron, cursor: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        if self.dst_repeat != DstRepeat::Both {
            return None;
        }
        let previous = cron.find_previous_occurrence(cursor, true).ok()?;
        match self.zone.from_local_datetime(&previous.naive_local()) {
            LocalResult::Ambiguous(first, second) if first == previous && &second > cursor => {
                Some(second)
            }
            _ => None,
        }
    }

    fn is_second_pass(&self, time: &DateTime<Tz>) -> bool {
        matches!(
            self.zone.from_local_datetime(&time.naive_local()),
            LocalResult::Ambiguous(first, _) if &first != time
        )
    }
}

fn compile_cron(pattern: &str, field: &str) -> Result<Cron, FieldError> {
    let fields = pattern.split_whitespace().count();
    let is_macro = pattern.trim_start().starts_with('@');
    if !is_macro && !(5..=6).contains(&fields) {
        return Err(FieldError::new(
            format!("{field}.cron"),
            format!("{pattern:?} has {fields} fields; 5 (minute first) or 6 (second first)"),
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
        .parse(pattern)
        .map_err(|error| {
            FieldError::new(
                format!("{field}.cron"),
                format!("{pattern:?} is not a cron pattern: {error}"),
            )
        })
}

fn compile_interval(spec: &CalendarSpec, field: &str) -> Result<Rule, FieldError> {
    let every_ms = parse_duration_ms(&format!("{field}.every"), &spec.every)?;
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&every_ms) {
        return Err(FieldError::new(
            format!("{field}.every"),
            format!("must be between {MIN_INTERVAL_MS} ms and {MAX_INTERVAL_MS} ms"),
        ));
    }
    let offset_ms = if spec.offset.trim().is_empty() {
        0
    } else {
        parse_duration_ms(&format!("{field}.offset"), &spec.offset)?
    };
    if offset_ms >= every_ms {
        return Err(FieldError::new(
            format!("{field}.offset"),
            "must be less than every",
        ));
    }
    Ok(Rule::Interval {
        every_ms,
        offset_ms,
    })
}

/// The first `offset + k * every` strictly after `after_ms`.
fn next_interval(after_ms: u64, every_ms: u64, offset_ms: u64) -> Option<u64> {
    debug_assert!(every_ms > 0 && offset_ms < every_ms);
    if after_ms < offset_ms {
        return Some(offset_ms);
    }
    let periods = (after_ms - offset_ms) / every_ms + 1;
    periods.checked_mul(every_ms)?.checked_add(offset_ms)
}

fn instant(milliseconds: u64) -> Option<DateTime<Utc>> {
    let milliseconds = i64::try_from(milliseconds).ok()?;
    Utc.timestamp_millis_opt(milliseconds).single()
}

fn milliseconds<Z: TimeZone>(time: &DateTime<Z>) -> Option<u64> {
    u64::try_from(time.timestamp_millis()).ok()
}
