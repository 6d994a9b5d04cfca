//! Wire ⇄ state for flow control: a fleet's `flow` section, its status, limits.

use flotilla_proto::v1;
use flotilla_scheduler::FieldError;
use flotilla_scheduler::flow::{DEFAULT_PRIORITY, FlowSpec};
use flotilla_scheduler::limit::{Limit, LimitKey, LimitKind, LimitSpec, WhenFull};
use flotilla_scheduler::state::Fleet;
use flotilla_scheduler::wave::WaveSize;

/// The state's flow spec from the wire's (`None`: the defaults), checked by
/// `FlowSpec::validate` later with the rest of the spec.
///
/// # Errors
/// A wave without a size, naming `spec.flow.waves[i]`.
pub fn flow_spec_from_wire(flow: Option<v1::FlowSpec>) -> Result<FlowSpec, FieldError> {
    let Some(flow) = flow else {
        return Ok(FlowSpec::default());
    };
    let defaults = FlowSpec::default();
    let waves = flow
        .waves
        .iter()
        .enumerate()
        .map(|(index, wave)| match wave.size {
            Some(v1::wave_size::Size::Runs(runs)) => Ok(WaveSize::Runs(runs)),
            Some(v1::wave_size::Size::Percent(percent)) => Ok(WaveSize::Percent(percent)),
            None => Err(FieldError::new(
                format!("spec.flow.waves[{index}]"),
                "needs runs or percent",
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(FlowSpec {
        priority: flow.priority.unwrap_or(DEFAULT_PRIORITY),
        shared_repositories: flow.shared_repositories,
        require_approval: flow.require_approval,
        deadline_ms: flow.deadline_ms,
        waves,
        success_threshold_percent: flow
            .success_threshold_percent
            .unwrap_or(defaults.success_threshold_percent),
        soak_ms: flow.soak_ms,
        approve_each_wave: flow.approve_each_wave,
        failure_limit: flow.failure_limit,
        consecutive_failure_limit: flow.consecutive_failure_limit,
    })
}

/// The wire form of a stored flow spec.
pub fn flow_spec_to_wire(flow: &FlowSpec) -> v1::FlowSpec {
    v1::FlowSpec {
        priority: Some(flow.priority),
        shared_repositories: flow.shared_repositories,
        require_approval: flow.require_approval,
        deadline_ms: flow.deadline_ms,
        waves: flow
            .waves
            .iter()
            .map(|wave| v1::WaveSize {
                size: Some(match *wave {
                    WaveSize::Runs(runs) => v1::wave_size::Size::Runs(runs),
                    WaveSize::Percent(percent) => v1::wave_size::Size::Percent(percent),
                }),
            })
            .collect(),
        success_threshold_percent: Some(flow.success_threshold_percent),
        soak_ms: flow.soak_ms,
        approve_each_wave: flow.approve_each_wave,
        failure_limit: flow.failure_limit,
        consecutive_failure_limit: flow.consecutive_failure_limit,
    }
}

/// A fleet's flow as it stands, on the wire.
pub fn flow_status_to_wire(fleet: &Fleet) -> v1::FleetFlowStatus {
    let flow = &fleet.flow;
    let pause = flow.pause.as_ref();
    v1::FleetFlowStatus {
        wave: flow.wave + 1,
        wave_count: flow.wave_ends.len().max(1) as u32,
        wave_ends: flow.wave_ends.clone(),
        pause_reason: pause.map(|p| p.reason.clone()).unwrap_or_default(),
        paused_by: pause.map(|p| p.by.describe()).unwrap_or_default(),
        paused_automatically: pause.is_some_and(|p| p.automatic),
        gate_reason: flow
            .gate
            .as_ref()
            .map(|g| g.reason.clone())
            .unwrap_or_default(),
        promote_at_ms: flow.promote_at_ms,
        deadline_at_ms: flow.deadline_at_ms,
        failures: flow.failures,
        consecutive_failures: flow.consecutive_failures,
        origin_fleet_id: flow.origin_fleet_id.clone(),
        decisions: flow
            .decisions
            .iter()
            .map(|d| {
                let note = if d.note.is_empty() {
                    String::new()
                } else {
                    format!(": {}", d.note)
                };
                format!("{} {} by {}{note}", d.at_ms, d.action, d.by.describe())
            })
            .collect(),
        limits: Vec::new(),
    }
}

/// The limit key of the wire's enum.
///
/// # Errors
/// UNSPECIFIED or unknown, naming `spec.key`.
fn limit_key_from_wire(key: i32) -> Result<LimitKey, FieldError> {
    Ok(match v1::LimitKey::try_from(key) {
        Ok(v1::LimitKey::Global) => LimitKey::Global,
        Ok(v1::LimitKey::Project) => LimitKey::Project,
        Ok(v1::LimitKey::Fleet) => LimitKey::Fleet,
        Ok(v1::LimitKey::ForgeHost) => LimitKey::ForgeHost,
        Ok(v1::LimitKey::Organisation) => LimitKey::Organisation,
        Ok(v1::LimitKey::Repository) => LimitKey::Repository,
        _ => {
            return Err(FieldError::new(
                "spec.key",
                "must be global, project, fleet, forge_host, organisation or repository",
            ));
        }
    })
}

fn limit_key_to_wire(key: LimitKey) -> v1::LimitKey {
    match key {
        LimitKey::Global => v1::LimitKey::Global,
        LimitKey::Project => v1::LimitKey::Project,
        LimitKey::Fleet => v1::LimitKey::Fleet,
        LimitKey::ForgeHost => v1::LimitKey::ForgeHost,
        LimitKey::Organisation => v1::LimitKey::Organisation,
        LimitKey::Repository => v1::LimitKey::Repository,
    }
}

/// A limit spec from the wire, validated.
///
/// # Errors
/// The first invalid field, below `spec`.
pub fn limit_spec_from_wire(spec: Option<v1::LimitSpec>) -> Result<LimitSpec, FieldError> {
    let spec = spec.ok_or_else(|| FieldError::new("spec", "is required"))?;
    let kind = match spec.kind {
        Some(v1::limit_spec::Kind::Rate(rate)) => LimitKind::Rate {
            limit: rate.limit,
            period_ms: rate.period_ms,
            burst: if rate.burst == 0 {
                rate.limit
            } else {
                rate.burst
            },
        },
        Some(v1::limit_spec::Kind::Concurrency(concurrency)) => LimitKind::Concurrency {
            max_running: concurrency.max_running,
            max_queued: (concurrency.max_queued != 0).then_some(concurrency.max_queued),
            when_full: match v1::WhenFull::try_from(concurrency.when_full) {
                Ok(v1::WhenFull::Unspecified | v1::WhenFull::Queue) => WhenFull::Queue,
                Ok(v1::WhenFull::Skip) => WhenFull::Skip,
                Ok(v1::WhenFull::CancelOlder) => WhenFull::CancelOlder,
                Err(_) => {
                    return Err(FieldError::new(
                        "spec.concurrency.when_full",
                        "must be queue, skip or cancel_older",
                    ));
                }
            },
        },
        None => {
            return Err(FieldError::new("spec", "needs rate or concurrency"));
        }
    };
    let converted = LimitSpec {
        name: spec.name,
        project: spec.project,
        key: limit_key_from_wire(spec.key)?,
        kind,
    };
    converted.validate("spec")?;
    Ok(converted)
}

/// A limit on the wire, with the use of its keys: `usage` as
/// [`flotilla_scheduler::State::limit_keys`] gives it (running runs, or a rate key's TAT in
/// µs), `waiting` as [`flotilla_scheduler::State::waiting_runs`] does (runs waiting per key);
/// a key in either is listed once.
pub fn limit_to_wire(
    limit: &Limit,
    usage: &[(String, u64)],
    waiting: &[(String, u64)],
) -> v1::Limit {
    let spec = &limit.spec;
    let kind = match spec.kind {
        LimitKind::Rate {
            limit,
            period_ms,
            burst,
        } => v1::limit_spec::Kind::Rate(v1::RateLimit {
            limit,
            period_ms,
            burst,
        }),
        LimitKind::Concurrency {
            max_running,
            when_full,
            max_queued,
        } => v1::limit_spec::Kind::Concurrency(v1::ConcurrencyLimit {
            max_running,
            max_queued: max_queued.unwrap_or(0),
            when_full: match when_full {
                WhenFull::Queue => v1::WhenFull::Queue,
                WhenFull::Skip => v1::WhenFull::Skip,
                WhenFull::CancelOlder => v1::WhenFull::CancelOlder,
            } as i32,
        }),
    };
    let rate = matches!(spec.kind, LimitKind::Rate { .. });
    v1::Limit {
        spec: Some(v1::LimitSpec {
            name: spec.name.clone(),
            project: spec.project.clone(),
            key: limit_key_to_wire(spec.key) as i32,
            kind: Some(kind),
        }),
        created_at_ms: limit.created_at_ms,
        created_by: limit.created_by.describe(),
        description: spec.describe(),
        usage: {
            let mut keys: std::collections::BTreeMap<&str, v1::LimitUsage> = usage
                .iter()
                .map(|(key, value)| {
                    let usage = v1::LimitUsage {
                        key: key.clone(),
                        running: if rate { 0 } else { *value as u32 },
                        full_at_ms: if rate { value.div_ceil(1_000) } else { 0 },
                        queued: 0,
                    };
                    (key.as_str(), usage)
                })
                .collect();
            for (key, count) in waiting {
                keys.entry(key.as_str())
                    .or_insert_with(|| v1::LimitUsage {
                        key: key.clone(),
                        ..Default::default()
                    })
                    .queued = *count;
            }
            keys.into_values().collect()
        },
    }
}
