//! Schedule spec files (YAML or TOML) as the CLI reads them, turned into the wire
//! `ScheduleSpec`:
//!
//! ```yaml
//! name: nightly-rustfmt              # required, unique in the fleet's project
//! calendar:                          # exactly one of cron and every
//!   cron: "0 2 * * *"                # 5 fields, 6 (seconds first) or @daily-style macros
//!   time_zone: Europe/London         # IANA zone; default UTC
//!   dst_gap: run_after               # or skip (a 02:30 that does not exist that day)
//!   dst_repeat: first                # or both (a 01:30 that happens twice)
//!   # every: 15m                     # an interval from the Unix epoch ...
//!   # offset: 5m                     # ... plus this phase
//!   # start_at_ms: 0, end_at_ms: 0   # bounds; 0: none
//! policy:
//!   overlap: skip                    # buffer_one, buffer_all, cancel_other, allow_all
//!   buffer_limit: 1000               # buffer_all's bound
//!   catch_up_window_ms: 60000        # older due ticks are recorded as missed
//!   max_jitter_ms: 0                 # deterministic delay per tick
//!   remaining_actions: 10            # stop after 10 fleets; absent: no limit
//!   pause_on_failed_runs: 0          # pause when a fleet ends with this many failed runs
//! fleet:                             # a fleet spec file's contents (spec_file.rs)
//!   name: rustfmt
//!   targets: { repositories: [file:///srv/origin/serde.git] }
//!   agent: { command: cargo fmt --all }
//! ```
//!
//! Unknown keys are errors naming the key's path; relative target paths are relative to this
//! file. The server validates everything again.

use std::path::Path;

use flotilla_proto::v1;
use flotilla_scheduler::schedule::calendar::CalendarSpec;
use flotilla_scheduler::schedule::plan::SchedulePolicy;
use serde::Deserialize;

use crate::spec_file::{SpecFile, SpecFileError, parse_as, read_bounded};

/// A schedule spec file's contents.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleFile {
    name: String,
    calendar: CalendarSpec,
    #[serde(default)]
    policy: SchedulePolicy,
    fleet: SpecFile,
}

/// Reads, parses and expands a schedule file into the wire spec.
///
/// # Errors
/// Any [`SpecFileError`], with the key's path (`fleet.targets`, `calendar.cron`, ...).
pub fn load(path: &Path) -> Result<v1::ScheduleSpec, SpecFileError> {
    let text = read_bounded(path).map_err(|source| SpecFileError::Read {
        path: path.into(),
        source,
    })?;
    let file: ScheduleFile = parse_as(path, &text)?;
    let fleet = file.fleet.into_wire(path).map_err(|error| match error {
        SpecFileError::Targets {
            path,
            field,
            message,
        } => SpecFileError::Targets {
            path,
            field: format!("fleet.{field}"),
            message,
        },
        other => other,
    })?;
    Ok(v1::ScheduleSpec {
        name: file.name,
        calendar: Some(crate::api::schedule::calendar_to_wire(&file.calendar)),
        policy: Some(crate::api::schedule::policy_to_wire(&file.policy)),
        fleet: Some(fleet),
    })
}
