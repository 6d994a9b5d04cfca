//! Trigger scenarios: a schedule ticking every second and a stream of signed GitHub webhook
//! deliveries (with redeliveries) run while the leader is killed, paused or partitioned. The
//! checker then asserts, from the leader's linearizable reads:
//!
//! - exactly one fleet per (schedule, nominal time): every started nominal time has one fleet
//!   under its key, no key has two fleets, and every nominal time from the first to the last
//!   decided one was started (the catch-up window, 60 s, covers every fault here, so none may be
//!   missing);
//! - exactly one fleet set per delivery id: every delivery that got a 2xx has one fleet under
//!   its key, every 2xx answer for that id (first receipt and redeliveries) named that fleet,
//!   and no fleet exists for an id that was never sent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use flotilla_proto::v1;
use flotilla_proto::v1::event_service_client::EventServiceClient;
use flotilla_proto::v1::schedule_service_client::ScheduleServiceClient;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::checker;
use crate::cluster::{Cluster, VOTERS, WEBHOOK_SECRET, channel};
use crate::scenario::{Fault, inject};
use crate::workload::{self, Ledger};

/// The schedule's id.
const SCHEDULE_ID: &str = "default/chaos-tick";
/// The rule's id.
const RULE_ID: &str = "default/chaos-push";
/// Deliveries sent, one every [`DELIVERY_INTERVAL`].
const DELIVERIES: usize = 60;
/// Time between new deliveries.
const DELIVERY_INTERVAL: Duration = Duration::from_millis(200);
/// How long one delivery is retried (as a sender redelivering) before it is given up.
const DELIVERY_RETRY: Duration = Duration::from_secs(40);

/// What one trigger scenario saw.
pub struct TriggerReport {
    fault: Fault,
    nominal_times: usize,
    deliveries_acknowledged: usize,
    redeliveries_acknowledged: usize,
    deliveries_given_up: usize,
    non_2xx_answers: usize,
    notes: Vec<String>,
    duration: Duration,
}

impl fmt::Display for TriggerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chaos-summary: scenario=triggers-{} result=pass nominal_times={} deliveries_2xx={} \
             redeliveries_2xx={} given_up={} non_2xx_answers={} duration_s={:.1} notes={:?}",
            self.fault.name(),
            self.nominal_times,
            self.deliveries_acknowledged,
            self.redeliveries_acknowledged,
            self.deliveries_given_up,
            self.non_2xx_answers,
            self.duration.as_secs_f64(),
            self.notes
        )
    }
}

fn signature(body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(WEBHOOK_SECRET.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!(
        "sha256={}",
        digest
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    )
}

/// One webhook POST with curl: the HTTP status (0 when none) and the JSON answer.
async fn post_delivery(http: &str, delivery_id: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let output = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "8",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            "POST",
        ])
        .args(["-H", "content-type: application/json"])
        .args(["-H", &format!("x-github-delivery: {delivery_id}")])
        .args(["-H", "x-github-event: push"])
        .args(["-H", &format!("x-hub-signature-256: {}", signature(body))])
        .args(["--data-binary", &String::from_utf8_lossy(body)])
        .arg(format!("http://{http}/hooks/github"))
        .output()
        .await;
    let Ok(output) = output else {
        return (0, serde_json::Value::Null);
    };
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (answer, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (
        status.trim().parse().unwrap_or(0),
        serde_json::from_str(answer).unwrap_or(serde_json::Value::Null),
    )
}

/// The fleet ids of each 2xx answer, by delivery id; plus counts.
#[derive(Default)]
struct Deliveries {
    answers: BTreeMap<String, Vec<Vec<String>>>,
    given_up: usize,
    non_2xx: usize,
}

/// Sends [`DELIVERIES`] deliveries, round-robin over the voters' HTTP endpoints; every third
/// also redelivers an earlier one. Each is retried on any non-2xx until [`DELIVERY_RETRY`].
async fn deliver_all(https: Vec<String>, repository: String) -> Deliveries {
    let mut tasks = Vec::new();
    for index in 0..DELIVERIES {
        let mut ids = vec![format!("chaos-{index}")];
        if index % 3 == 2 {
            ids.push(format!("chaos-{}", index / 2));
        }
        for (attempt, delivery_id) in ids.into_iter().enumerate() {
            let https = https.clone();
            let body = serde_json::json!({ "repository": repository, "n": index }).to_string();
            tasks.push(tokio::spawn(async move {
                let deadline = Instant::now() + DELIVERY_RETRY;
                let mut target = index + attempt;
                let mut non_2xx = 0;
                // A redelivery sends the original body again, as a forge does.
                let body = if attempt == 0 {
                    body
                } else {
                    let original: usize = delivery_id
                        .trim_start_matches("chaos-")
                        .parse()
                        .unwrap_or_default();
                    let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    serde_json::json!({ "repository": value["repository"], "n": original })
                        .to_string()
                };
                loop {
                    let http = &https[target % https.len()];
                    let (status, answer) = post_delivery(http, &delivery_id, body.as_bytes()).await;
                    if status == 200 {
                        let fleets: Vec<String> = answer["fleet_ids"]
                            .as_array()
                            .map(|ids| {
                                ids.iter()
                                    .filter_map(|id| id.as_str().map(str::to_owned))
                                    .collect()
                            })
                            .unwrap_or_default();
                        return (delivery_id, Some(fleets), non_2xx);
                    }
                    non_2xx += 1;
                    if Instant::now() >= deadline {
                        return (delivery_id, None, non_2xx);
                    }
                    target += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }));
        }
        tokio::time::sleep(DELIVERY_INTERVAL).await;
    }
    let mut deliveries = Deliveries::default();
    for task in tasks {
        let Ok((delivery_id, fleets, non_2xx)) = task.await else {
            continue;
        };
        deliveries.non_2xx += non_2xx;
        match fleets {
            Some(fleets) => deliveries
                .answers
                .entry(delivery_id)
                .or_default()
                .push(fleets),
            None => deliveries.given_up += 1,
        }
    }
    deliveries
}

async fn retry<T, F, Fut>(what: &str, call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    checker::read(what, call).await
}

/// Creates the schedule (every second, overlap allow_all, 60 s catch-up window) and the rule
/// (each push delivery starts a fleet on the payload's repository).
async fn create_triggers(cluster: &Cluster, repository: &str) -> Result<()> {
    let url = cluster.voter_url(0);
    let schedules = ScheduleServiceClient::new(channel(&url, Duration::from_secs(10)).await?);
    let events = EventServiceClient::new(channel(&url, Duration::from_secs(10)).await?);
    let mut fleet = workload::fleet_spec("tick", vec![repository.to_owned()]);
    if let Some(agent) = fleet.agent.as_mut() {
        agent.command = "true".into();
    }
    fleet.verify.clear();
    fleet.push = false;
    let spec = v1::ScheduleSpec {
        name: "chaos-tick".into(),
        calendar: Some(v1::ScheduleCalendar {
            every: "1s".into(),
            ..Default::default()
        }),
        policy: Some(v1::SchedulePolicy {
            overlap: v1::OverlapPolicy::AllowAll as i32,
            catch_up_window_ms: 60_000,
            ..Default::default()
        }),
        fleet: Some(fleet.clone()),
    };
    retry("CreateSchedule", || {
        let mut client = schedules.clone();
        let spec = spec.clone();
        async move {
            client
                .create_schedule(v1::CreateScheduleRequest { spec: Some(spec) })
                .await
        }
    })
    .await?;
    let mut template = fleet;
    template.name = "push".into();
    template.repositories.clear();
    let rule = v1::EventRuleSpec {
        name: "chaos-push".into(),
        source: "github".into(),
        filter: "event.type == 'push'".into(),
        repositories: "event.payload.repository".into(),
        params: Default::default(),
        fleet: Some(template),
    };
    retry("CreateEventRule", || {
        let mut client = events.clone();
        let rule = rule.clone();
        async move {
            client
                .create_event_rule(v1::CreateEventRuleRequest { spec: Some(rule) })
                .await
        }
    })
    .await?;
    Ok(())
}

/// Runs one trigger scenario under `fault` (kill, pause or partition of the leader).
///
/// # Errors
/// When the cluster cannot be set up, or the checker finds a violation.
pub async fn run(fault: Fault) -> Result<TriggerReport> {
    let started = Instant::now();
    let mut cluster = Cluster::start(&format!("triggers-{}", fault.name())).await?;
    let outcome = drive(&mut cluster, fault, started).await;
    match outcome {
        Ok(report) => Ok(report),
        Err(error) => {
            eprintln!(
                "chaos[triggers-{}] failed: {error:#}\nlast lines of every log:\n{}",
                fault.name(),
                cluster.log_tails(30)
            );
            let directory = cluster.keep_directory();
            Err(error.context(format!(
                "scenario triggers-{} failed (data and logs kept in {})",
                fault.name(),
                directory.display()
            )))
        }
    }
}

async fn drive(cluster: &mut Cluster, fault: Fault, started: Instant) -> Result<TriggerReport> {
    let phase = |what: &str| {
        eprintln!(
            "chaos[triggers-{}] +{:.1}s {what}",
            fault.name(),
            started.elapsed().as_secs_f64()
        );
    };
    let repositories = workload::create_repositories(&cluster.directory.join("repositories"), 2)?;
    create_triggers(cluster, &repositories[0]).await?;
    phase("schedule and rule created");
    let https: Vec<String> = (0..VOTERS).map(|i| cluster.voter_http_address(i)).collect();
    let sender = tokio::spawn(deliver_all(https, repositories[1].clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    phase("injecting the fault");
    let injected = inject(cluster, fault, &Ledger::default(), &repositories).await?;
    phase("fault healed");
    let deliveries = tokio::time::timeout(Duration::from_secs(120), sender)
        .await
        .context("the deliveries did not finish in 120 s")?
        .context("delivery task")?;
    phase("deliveries done");
    let schedules =
        ScheduleServiceClient::new(channel(&cluster.voter_url(0), Duration::from_secs(10)).await?);
    retry("PauseSchedule", || {
        let mut client = schedules.clone();
        async move {
            client
                .pause_schedule(v1::PauseScheduleRequest {
                    schedule_id: SCHEDULE_ID.into(),
                    note: "checking".into(),
                })
                .await
        }
    })
    .await?;
    let schedule = retry("GetSchedule", || {
        let mut client = schedules.clone();
        async move {
            client
                .get_schedule(v1::GetScheduleRequest {
                    schedule_id: SCHEDULE_ID.into(),
                })
                .await
        }
    })
    .await?;
    let mut client = cluster.leader_fleet_client(Duration::from_secs(20)).await?;
    let fleets = checker::list_fleets(&mut client).await?;
    phase("history read");
    let mut violations = Vec::new();
    let nominal_times = check_schedule(&schedule, &fleets, &mut violations);
    let redeliveries = check_deliveries(&deliveries, &fleets, &mut violations);
    if !violations.is_empty() {
        bail!("{} violations: {}", violations.len(), violations.join("; "));
    }
    if nominal_times < 5 {
        bail!("only {nominal_times} nominal times started: the schedule did not run");
    }
    Ok(TriggerReport {
        fault,
        nominal_times,
        deliveries_acknowledged: deliveries.answers.len(),
        redeliveries_acknowledged: redeliveries,
        deliveries_given_up: deliveries.given_up,
        non_2xx_answers: deliveries.non_2xx,
        notes: injected.notes,
        duration: started.elapsed(),
    })
}

/// Exactly one fleet per started nominal time, none missing from the first to the last;
/// returns how many were started.
fn check_schedule(
    schedule: &v1::Schedule,
    fleets: &BTreeMap<String, String>,
    violations: &mut Vec<String>,
) -> usize {
    if schedule.history_dropped > 0 {
        violations.push(format!(
            "{} history records dropped: the scenario ran too long to check",
            schedule.history_dropped
        ));
    }
    let prefix = format!("schedule:{SCHEDULE_ID}@");
    let mut by_time: BTreeMap<u64, Vec<&String>> = BTreeMap::new();
    for (fleet_id, key) in fleets {
        if let Some(time) = key.strip_prefix(&prefix).and_then(|t| t.parse().ok()) {
            by_time.entry(time).or_default().push(fleet_id);
        }
    }
    let mut started = BTreeMap::new();
    for tick in &schedule.history {
        match tick.outcome.as_str() {
            "started"
                if started
                    .insert(tick.nominal_ms, tick.fleet_id.clone())
                    .is_some() =>
            {
                violations.push(format!("nominal time {} started twice", tick.nominal_ms));
            }
            "missed" | "skipped" => violations.push(format!(
                "nominal time {} {} inside the catch-up window: {}",
                tick.nominal_ms, tick.outcome, tick.reason
            )),
            _ => {}
        }
    }
    for (time, ids) in &by_time {
        if ids.len() != 1 {
            violations.push(format!("nominal time {time} has fleets {ids:?}"));
        }
        match started.get(time) {
            Some(fleet_id) if ids.contains(&fleet_id) => {}
            other => violations.push(format!(
                "nominal time {time}: fleets {ids:?}, history says {other:?}"
            )),
        }
    }
    let times: Vec<u64> = started.keys().copied().collect();
    for pair in times.windows(2) {
        if pair[1] != pair[0] + 1_000 {
            violations.push(format!(
                "no fleet for the nominal times between {} and {}",
                pair[0], pair[1]
            ));
        }
    }
    for time in started.keys() {
        if !by_time.contains_key(time) {
            violations.push(format!("nominal time {time} started but has no fleet"));
        }
    }
    started.len()
}

/// Exactly one fleet per acknowledged delivery id, named by all its 2xx answers; no fleet for
/// an id never sent. Returns the redeliveries acknowledged.
fn check_deliveries(
    deliveries: &Deliveries,
    fleets: &BTreeMap<String, String>,
    violations: &mut Vec<String>,
) -> usize {
    let prefix = "event:github/";
    let suffix = format!("#{RULE_ID}");
    let mut by_delivery: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for (fleet_id, key) in fleets {
        if let Some(id) = key
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(&suffix))
        {
            by_delivery.entry(id.to_owned()).or_default().push(fleet_id);
        }
    }
    let sent: BTreeSet<String> = (0..DELIVERIES).map(|i| format!("chaos-{i}")).collect();
    for id in by_delivery.keys() {
        if !sent.contains(id) {
            violations.push(format!("a fleet for delivery {id}, never sent"));
        }
    }
    let mut redeliveries = 0;
    for (id, answers) in &deliveries.answers {
        redeliveries += answers.len() - 1;
        let stored = by_delivery.get(id).cloned().unwrap_or_default();
        if stored.len() != 1 {
            violations.push(format!("delivery {id} got a 2xx and has fleets {stored:?}"));
            continue;
        }
        for answer in answers {
            if answer.len() != 1 || &answer[0] != stored[0] {
                violations.push(format!(
                    "delivery {id} was answered {answer:?}, its fleet is {}",
                    stored[0]
                ));
            }
        }
    }
    redeliveries
}
