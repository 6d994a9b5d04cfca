//! `flotilla fleet pause|resume|approve|rerun` and `fleet submit --dry-run`: flow control of
//! fleets, and how `fleet status` shows waves, gates, pauses and budgets.

use std::io::Write;

use flotilla_proto::v1;
use serde_json::json;

use super::{CliError, Client, Output, exit_code, fleet_json, print_fleet, run_summary_json};

/// Which flow change to ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowVerb {
    /// `fleet pause`.
    Pause,
    /// `fleet resume`.
    Resume,
    /// `fleet approve`.
    Approve,
}

/// `fleet pause|resume|approve` (idempotent, so retried like the reads).
///
/// # Errors
/// An RPC failure.
pub async fn change(
    client: &mut Client,
    verb: FlowVerb,
    fleet_id: &str,
    note: &str,
    output: Output,
) -> Result<i32, CliError> {
    let request = v1::FleetFlowRequest {
        fleet_id: fleet_id.to_string(),
        note: note.to_string(),
    };
    let response = client
        .call("", |mut fleets| {
            let request = request.clone();
            async move {
                match verb {
                    FlowVerb::Pause => fleets.pause_fleet(request).await,
                    FlowVerb::Resume => fleets.resume_fleet(request).await,
                    FlowVerb::Approve => fleets.approve_fleet(request).await,
                }
            }
        })
        .await?;
    if output == Output::Json {
        let fleet = response.fleet.as_ref().map(fleet_json);
        outln!(
            "{}",
            json!({"changed": response.changed, "message": response.message, "fleet": fleet})
        );
    } else {
        outln!("{}", response.message);
    }
    Ok(exit_code::OK)
}

/// `fleet rerun`.
///
/// # Errors
/// An RPC failure.
pub async fn rerun(
    client: &mut Client,
    request: v1::RerunFleetRequest,
    output: Output,
) -> Result<i32, CliError> {
    let response = client
        .call("with the same idempotency key", |mut fleets| {
            let request = request.clone();
            async move { fleets.rerun_fleet(request).await }
        })
        .await?;
    if let Some(preview) = &response.preview {
        print_preview(preview, output);
        return Ok(exit_code::OK);
    }
    let fleet = response.fleet.unwrap_or_default();
    if output == Output::Json {
        outln!(
            "{}",
            json!({"created": response.created, "fleet": fleet_json(&fleet)})
        );
    } else {
        errln!(
            "fleet {} re-runs {} runs of {}",
            fleet.id,
            fleet.counts.as_ref().map_or(0, |c| c.total),
            request.fleet_id
        );
        print_fleet(&fleet, output);
    }
    Ok(exit_code::OK)
}

/// Prints what a dry run would create.
pub fn print_preview(preview: &v1::FleetPreview, output: Output) {
    if output == Output::Json {
        outln!(
            "{}",
            json!({
                "dry_run": true,
                "run_count": preview.run_count,
                "runs": preview.runs.iter().map(run_summary_json).collect::<Vec<_>>(),
                "wave_ends": preview.wave_ends,
                "limits": preview.limits,
                "queue_full": preview.queue_full,
            })
        );
        return;
    }
    outln!("dry run: nothing was created");
    for run in &preview.runs {
        outln!("  {}  {}  branch {}", run.id, run.repository, run.branch);
    }
    if preview.runs.len() < preview.run_count as usize {
        outln!("  ... {} runs in all", preview.run_count);
    }
    outln!(
        "waves (cumulative runs): {}",
        waves_text(&preview.wave_ends)
    );
    if preview.limits.is_empty() {
        outln!("limits: none apply");
    } else {
        for limit in &preview.limits {
            outln!("limit {limit}");
        }
    }
    if !preview.queue_full.is_empty() {
        outln!("a submission now would be refused: {}", preview.queue_full);
    }
}

fn waves_text(ends: &[u32]) -> String {
    ends.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The flow lines of `fleet status` (nothing for a fleet without waves, gate or pause).
pub fn flow_lines(fleet: &v1::Fleet) -> Vec<String> {
    let Some(flow) = &fleet.flow else {
        return Vec::new();
    };
    let mut lines = Vec::new();
    if flow.wave_count > 1 {
        lines.push(format!(
            "wave {} of {} (cumulative runs {})",
            flow.wave,
            flow.wave_count,
            waves_text(&flow.wave_ends)
        ));
    }
    if !flow.gate_reason.is_empty() {
        lines.push(format!(
            "waiting for approval: {} (`flotilla fleet approve {}`)",
            flow.gate_reason, fleet.id
        ));
    }
    if !flow.pause_reason.is_empty() {
        lines.push(format!(
            "paused{}: {} (`flotilla fleet resume {}`)",
            if flow.paused_automatically {
                " automatically"
            } else {
                ""
            },
            flow.pause_reason,
            fleet.id
        ));
    }
    if flow.promote_at_ms != 0 {
        lines.push(format!("next wave at {} ms (soak)", flow.promote_at_ms));
    }
    if flow.deadline_at_ms != 0 {
        lines.push(format!("deadline at {} ms", flow.deadline_at_ms));
    }
    if flow.failures > 0 {
        lines.push(format!(
            "failure budget: {} failed since start or resume, {} in a row",
            flow.failures, flow.consecutive_failures
        ));
    }
    if !flow.origin_fleet_id.is_empty() {
        lines.push(format!("re-runs runs of {}", flow.origin_fleet_id));
    }
    for decision in &flow.decisions {
        lines.push(format!("decision: {decision}"));
    }
    for limit in &flow.limits {
        lines.push(format!("limit {limit}"));
    }
    lines
}

/// The flow section of a fleet's JSON.
pub fn flow_json(fleet: &v1::Fleet) -> serde_json::Value {
    let flow = fleet.flow.clone().unwrap_or_default();
    json!({
        "wave": flow.wave, "wave_count": flow.wave_count, "wave_ends": flow.wave_ends,
        "pause_reason": flow.pause_reason, "paused_by": flow.paused_by,
        "paused_automatically": flow.paused_automatically, "gate_reason": flow.gate_reason,
        "promote_at_ms": flow.promote_at_ms, "deadline_at_ms": flow.deadline_at_ms,
        "failures": flow.failures, "consecutive_failures": flow.consecutive_failures,
        "origin_fleet_id": flow.origin_fleet_id, "decisions": flow.decisions,
        "limits": flow.limits,
    })
}
