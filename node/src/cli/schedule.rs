//! `flotilla schedule create|list|show|pause|resume|trigger|backfill|delete|preview`: schedules
//! that start a fleet at each nominal time of their calendar (`flotilla.v1.ScheduleService`).

use std::path::PathBuf;

use flotilla_proto::v1;
use flotilla_proto::v1::schedule_service_client::ScheduleServiceClient;
use serde_json::json;

use super::{CliError, Output, bearer, connect_channel, exit_code};

/// Schedule subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum ScheduleCommands {
    /// Creates a schedule from a YAML or TOML file (`name`, `calendar`, `policy`, `fleet`).
    Create {
        /// The schedule file.
        file: PathBuf,
    },
    /// Lists schedules (every project the token may read, or one).
    List {
        /// Only this project.
        #[arg(long, default_value = "")]
        project: String,
    },
    /// Shows a schedule: its state and history (`<project>/<name>`).
    Show {
        /// `<project>/<name>`.
        schedule_id: String,
    },
    /// Pauses a schedule; ticks while paused never start.
    Pause {
        /// `<project>/<name>`.
        schedule_id: String,
        /// Why (recorded).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Resumes a paused schedule from now.
    Resume {
        /// `<project>/<name>`.
        schedule_id: String,
        /// Why (recorded).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Starts a fleet of the schedule now (also while paused); the same `--trigger-id` again
    /// answers the same fleet.
    Trigger {
        /// `<project>/<name>`.
        schedule_id: String,
        /// The trigger's idempotency key, 1-128 bytes of `[A-Za-z0-9._:-]`; default: a random
        /// one chosen here, so a retry of this command is safe.
        #[arg(long)]
        trigger_id: Option<String>,
        /// While a fleet of the schedule runs: `skip` (refuse), `cancel_other` or `allow_all`.
        #[arg(long, default_value = "allow_all")]
        overlap: OverlapArgument,
    },
    /// Starts the schedule's nominal times in a past range (both ends included; at most
    /// 1000 times); times that have their fleet already are not started again.
    Backfill {
        /// `<project>/<name>`.
        schedule_id: String,
        /// First nominal time: RFC 3339 in UTC (`2026-12-01T00:00:00Z`) or ms since the epoch.
        #[arg(long, value_parser = parse_instant_ms)]
        from: u64,
        /// Last nominal time, as `--from`.
        #[arg(long, value_parser = parse_instant_ms)]
        to: u64,
        /// The backfill's overlap policy; default: the schedule's own.
        #[arg(long)]
        overlap: Option<OverlapArgument>,
    },
    /// Deletes a schedule (its fleets go on).
    Delete {
        /// `<project>/<name>`.
        schedule_id: String,
    },
    /// The next nominal times of a schedule, or of a schedule file, in its time zone.
    Preview {
        /// `<project>/<name>` of an existing schedule.
        #[arg(conflicts_with = "file", required_unless_present = "file")]
        schedule_id: Option<String>,
        /// A schedule file not yet created.
        #[arg(long)]
        file: Option<PathBuf>,
        /// How many (1-1000).
        #[arg(long, default_value_t = 10)]
        count: u32,
    },
}

/// An overlap policy on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
#[value(rename_all = "snake_case")]
pub enum OverlapArgument {
    /// Skip while a fleet of the schedule runs.
    Skip,
    /// Keep one for later.
    BufferOne,
    /// Keep all (up to the schedule's buffer_limit), started one at a time.
    BufferAll,
    /// Cancel the running fleets, then start.
    CancelOther,
    /// Start anyway.
    AllowAll,
}

impl OverlapArgument {
    fn to_wire(self) -> v1::OverlapPolicy {
        match self {
            OverlapArgument::Skip => v1::OverlapPolicy::Skip,
            OverlapArgument::BufferOne => v1::OverlapPolicy::BufferOne,
            OverlapArgument::BufferAll => v1::OverlapPolicy::BufferAll,
            OverlapArgument::CancelOther => v1::OverlapPolicy::CancelOther,
            OverlapArgument::AllowAll => v1::OverlapPolicy::AllowAll,
        }
    }
}

/// An instant on the command line: milliseconds since the epoch, or RFC 3339 in UTC.
fn parse_instant_ms(text: &str) -> Result<u64, String> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let instant = humantime::parse_rfc3339(text).map_err(|error| {
        format!("{text:?}: not ms since the epoch nor RFC 3339 in UTC ({error})")
    })?;
    instant
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_millis() as u64)
        .map_err(|_| format!("{text:?}: before the epoch"))
}

fn tick_json(tick: &v1::ScheduleTick) -> serde_json::Value {
    json!({
        "nominal_ms": tick.nominal_ms, "decided_at_ms": tick.decided_at_ms,
        "outcome": tick.outcome, "fleet_id": tick.fleet_id, "reason": tick.reason,
        "trigger_id": tick.trigger_id,
        "missed_count": tick.missed_count, "missed_last_ms": tick.missed_last_ms,
        "missed_count_is_lower_bound": tick.missed_count_is_lower_bound,
    })
}

fn schedule_json(schedule: &v1::Schedule) -> serde_json::Value {
    let spec = schedule.spec.clone().unwrap_or_default();
    let calendar = spec.calendar.unwrap_or_default();
    let policy = spec.policy.unwrap_or_default();
    json!({
        "id": schedule.id,
        "calendar": {
            "cron": calendar.cron, "every": calendar.every, "offset": calendar.offset,
            "time_zone": calendar.time_zone, "start_at_ms": calendar.start_at_ms,
            "end_at_ms": calendar.end_at_ms,
            "dst_gap": calendar.dst_gap().as_str_name(),
            "dst_repeat": calendar.dst_repeat().as_str_name(),
        },
        "policy": {
            "overlap": policy.overlap().as_str_name(), "buffer_limit": policy.buffer_limit,
            "catch_up_window_ms": policy.catch_up_window_ms, "max_jitter_ms": policy.max_jitter_ms,
            "remaining_actions": policy.remaining_actions,
            "pause_on_failed_runs": policy.pause_on_failed_runs,
        },
        "fleet_name": spec.fleet.map(|fleet| fleet.name).unwrap_or_default(),
        "created_at_ms": schedule.created_at_ms,
        "paused": schedule.paused, "paused_by": schedule.paused_by,
        "pause_note": schedule.pause_note,
        "processed_until_ms": schedule.processed_until_ms,
        "buffered_ms": schedule.buffered_ms, "actions_taken": schedule.actions_taken,
        "running_fleet_ids": schedule.running_fleet_ids, "next_due_ms": schedule.next_due_ms,
        "history": schedule.history.iter().map(tick_json).collect::<Vec<_>>(),
        "history_dropped": schedule.history_dropped,
    })
}

fn calendar_text(schedule: &v1::Schedule) -> String {
    let calendar = schedule
        .spec
        .as_ref()
        .and_then(|spec| spec.calendar.clone())
        .unwrap_or_default();
    if calendar.cron.is_empty() {
        format!("every {} offset {}", calendar.every, calendar.offset)
    } else {
        let zone = if calendar.time_zone.is_empty() {
            "UTC"
        } else {
            calendar.time_zone.as_str()
        };
        format!("cron {:?} {zone}", calendar.cron)
    }
}

fn print_schedule(schedule: &v1::Schedule, output: Output) {
    if output == Output::Json {
        outln!("{}", schedule_json(schedule));
        return;
    }
    outln!("schedule {}: {}", schedule.id, calendar_text(schedule));
    let spec = schedule.spec.clone().unwrap_or_default();
    let calendar = spec.calendar.unwrap_or_default();
    let policy = spec.policy.unwrap_or_default();
    if !calendar.cron.is_empty() {
        outln!(
            "dst: {} in a spring-forward gap, {} in a fall-back repeat",
            dst_gap_name(calendar.dst_gap()),
            dst_repeat_name(calendar.dst_repeat())
        );
    }
    outln!(
        "policy: overlap {}, catch-up window {} ms, jitter up to {} ms",
        overlap_name(policy.overlap()),
        policy.catch_up_window_ms,
        policy.max_jitter_ms
    );
    if schedule.paused {
        outln!(
            "paused by {}: {}",
            schedule.paused_by,
            if schedule.pause_note.is_empty() {
                "(no note)"
            } else {
                schedule.pause_note.as_str()
            }
        );
    }
    outln!(
        "next due at {} ms; {} fleets started; running: {}; buffered: {}",
        schedule.next_due_ms,
        schedule.actions_taken,
        if schedule.running_fleet_ids.is_empty() {
            "none".to_owned()
        } else {
            schedule.running_fleet_ids.join(" ")
        },
        schedule.buffered_ms.len()
    );
    for tick in &schedule.history {
        let detail = match tick.outcome.as_str() {
            "started" => tick.fleet_id.clone(),
            "triggered" => format!("{} (trigger {})", tick.fleet_id, tick.trigger_id),
            "missed" => format!(
                "{}{} up to {} ms",
                tick.missed_count,
                if tick.missed_count_is_lower_bound {
                    " or more"
                } else {
                    ""
                },
                tick.missed_last_ms
            ),
            _ => tick.reason.clone(),
        };
        outln!(
            "  {:>15} {:<8} {}",
            tick.nominal_ms,
            tick.outcome,
            super::terminal::printable(&detail)
        );
    }
}

fn dst_gap_name(gap: v1::DstGap) -> &'static str {
    match gap {
        v1::DstGap::Skip => "skip",
        v1::DstGap::Unspecified | v1::DstGap::RunAfter => "run_after",
    }
}

fn dst_repeat_name(repeat: v1::DstRepeat) -> &'static str {
    match repeat {
        v1::DstRepeat::Both => "both",
        v1::DstRepeat::Unspecified | v1::DstRepeat::First => "first",
    }
}

fn overlap_name(overlap: v1::OverlapPolicy) -> &'static str {
    match overlap {
        v1::OverlapPolicy::Unspecified | v1::OverlapPolicy::Skip => "skip",
        v1::OverlapPolicy::BufferOne => "buffer_one",
        v1::OverlapPolicy::BufferAll => "buffer_all",
        v1::OverlapPolicy::CancelOther => "cancel_other",
        v1::OverlapPolicy::AllowAll => "allow_all",
    }
}

fn load_file(file: &std::path::Path) -> Result<v1::ScheduleSpec, CliError> {
    crate::schedule_file::load(file).map_err(|error| CliError {
        message: error.to_string(),
        code: exit_code::INVALID_ARGUMENT,
    })
}

/// Runs one schedule subcommand against `address`.
///
/// # Errors
/// The server's answer, or an unreadable schedule file, as a [`CliError`].
pub async fn run(
    address: &str,
    command: ScheduleCommands,
    output: Output,
) -> Result<i32, CliError> {
    let mut client = ScheduleServiceClient::new(bearer().channel(connect_channel(address).await?));
    match command {
        ScheduleCommands::Create { file } => {
            let spec = load_file(&file)?;
            let response = client
                .create_schedule(v1::CreateScheduleRequest { spec: Some(spec) })
                .await?
                .into_inner();
            let schedule = response.schedule.unwrap_or_default();
            if output == Output::Json {
                outln!(
                    "{}",
                    json!({"schedule": schedule_json(&schedule), "created": response.created})
                );
            } else {
                outln!(
                    "schedule {} {}: {}, next due at {} ms",
                    schedule.id,
                    if response.created {
                        "created"
                    } else {
                        "exists (same spec)"
                    },
                    calendar_text(&schedule),
                    schedule.next_due_ms
                );
            }
        }
        ScheduleCommands::List { project } => {
            let schedules = client
                .list_schedules(v1::ListSchedulesRequest { project })
                .await?
                .into_inner()
                .schedules;
            if output == Output::Json {
                let listed: Vec<_> = schedules.iter().map(schedule_json).collect();
                outln!("{}", json!({ "schedules": listed }));
            } else {
                outln!(
                    "{:<40} {:<7} {:>15} {:>8}  CALENDAR",
                    "ID",
                    "PAUSED",
                    "NEXT_DUE_MS",
                    "STARTED"
                );
                for schedule in &schedules {
                    outln!(
                        "{:<40} {:<7} {:>15} {:>8}  {}",
                        schedule.id,
                        schedule.paused,
                        schedule.next_due_ms,
                        schedule.actions_taken,
                        calendar_text(schedule)
                    );
                }
            }
        }
        ScheduleCommands::Show { schedule_id } => {
            let schedule = client
                .get_schedule(v1::GetScheduleRequest { schedule_id })
                .await?
                .into_inner();
            print_schedule(&schedule, output);
        }
        ScheduleCommands::Pause { schedule_id, note } => {
            let schedule = client
                .pause_schedule(v1::PauseScheduleRequest { schedule_id, note })
                .await?
                .into_inner();
            print_schedule(&schedule, output);
        }
        ScheduleCommands::Resume { schedule_id, note } => {
            let schedule = client
                .resume_schedule(v1::ResumeScheduleRequest { schedule_id, note })
                .await?
                .into_inner();
            print_schedule(&schedule, output);
        }
        ScheduleCommands::Trigger {
            schedule_id,
            trigger_id,
            overlap,
        } => {
            // Chosen here, not by the server, so that a retry of this request is safe.
            let trigger_id = match trigger_id {
                Some(trigger_id) => trigger_id,
                None => super::random_id("a trigger id")?,
            };
            let response = client
                .trigger_schedule(v1::TriggerScheduleRequest {
                    schedule_id: schedule_id.clone(),
                    trigger_id,
                    overlap: overlap.to_wire() as i32,
                })
                .await?
                .into_inner();
            if output == Output::Json {
                outln!(
                    "{}",
                    json!({"schedule_id": schedule_id, "trigger_id": response.trigger_id,
                           "fleet_id": response.fleet_id, "created": response.created})
                );
            } else {
                outln!(
                    "schedule {schedule_id} trigger {}: {} {}",
                    response.trigger_id,
                    response.fleet_id,
                    if response.created {
                        "started"
                    } else {
                        "(started earlier by this trigger id)"
                    }
                );
            }
        }
        ScheduleCommands::Backfill {
            schedule_id,
            from,
            to,
            overlap,
        } => {
            let response = client
                .backfill_schedule(v1::BackfillScheduleRequest {
                    schedule_id: schedule_id.clone(),
                    from_ms: from,
                    to_ms: to,
                    overlap: overlap
                        .map_or(v1::OverlapPolicy::Unspecified, OverlapArgument::to_wire)
                        as i32,
                })
                .await?
                .into_inner();
            if output == Output::Json {
                outln!(
                    "{}",
                    json!({"schedule_id": schedule_id, "started_fleet_ids": response.started_fleet_ids,
                           "buffered": response.buffered, "skipped": response.skipped,
                           "schedule": response.schedule.as_ref().map(schedule_json)})
                );
            } else {
                outln!(
                    "schedule {schedule_id} backfilled {from}..{to} ms: started {}; {} buffered; {} skipped (see `schedule show`)",
                    if response.started_fleet_ids.is_empty() {
                        "none".to_owned()
                    } else {
                        response.started_fleet_ids.join(" ")
                    },
                    response.buffered,
                    response.skipped
                );
            }
        }
        ScheduleCommands::Delete { schedule_id } => {
            let existed = client
                .delete_schedule(v1::DeleteScheduleRequest {
                    schedule_id: schedule_id.clone(),
                })
                .await?
                .into_inner()
                .existed;
            if output == Output::Json {
                outln!(
                    "{}",
                    json!({"schedule_id": schedule_id, "existed": existed})
                );
            } else if existed {
                outln!("schedule {schedule_id} deleted");
            } else {
                outln!("schedule {schedule_id} did not exist");
            }
        }
        ScheduleCommands::Preview {
            schedule_id,
            file,
            count,
        } => {
            let spec = file.as_deref().map(load_file).transpose()?;
            let occurrences = client
                .preview_schedule(v1::PreviewScheduleRequest {
                    schedule_id: schedule_id.unwrap_or_default(),
                    spec,
                    count,
                    after_ms: 0,
                })
                .await?
                .into_inner()
                .occurrences;
            if output == Output::Json {
                let listed: Vec<_> = occurrences
                    .iter()
                    .map(|o| {
                        json!({"nominal_ms": o.nominal_ms, "start_ms": o.start_ms,
                               "local_time": o.local_time, "note": o.note})
                    })
                    .collect();
                outln!("{}", json!({ "occurrences": listed }));
            } else {
                for occurrence in &occurrences {
                    let note = if occurrence.note == "exact" {
                        String::new()
                    } else {
                        format!("  ({})", occurrence.note)
                    };
                    outln!(
                        "{}  starts at {} ms{note}",
                        occurrence.local_time,
                        occurrence.start_ms
                    );
                }
            }
        }
    }
    Ok(exit_code::OK)
}
