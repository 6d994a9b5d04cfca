//! Schedules on a real `flotilla server` process, driven through the real CLI: a schedule every
//! 2 s starts exactly one fleet per nominal time (the times its preview showed), a pause starts
//! nothing, and after a `kill -9` and restart within the catch-up window the ticks missed while
//! the node was down are started once each, never twice. Bad schedule files and specs are
//! refused naming the field.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::Node;

/// No local worker: fleets stay pending, which does not matter to a schedule that allows
/// overlap; the engine ticks every 200 ms.
const CONFIG: &str = "[limits]\nlease_check_interval_ms = 200\n\n[worker]\nenabled = false\n";

fn flotilla(address: &str, arguments: &[&str]) -> (i32, String, String) {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(arguments);
    common::flotilla_cli(address, &all)
}

fn json(address: &str, arguments: &[&str]) -> serde_json::Value {
    let (code, stdout, stderr) = flotilla(address, arguments);
    assert_eq!(code, 0, "{arguments:?}: {stdout}{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"))
}

const SCHEDULE: &str = "name: every-2s
calendar: { every: 2s }
policy: { overlap: allow_all, catch_up_window_ms: 30000 }
fleet:
  name: tick
  targets: { repositories: [file:///srv/never-cloned.git] }
  agent: { command: 'true' }
";

/// The nominal times of the schedule's `started` history records, and their fleet ids.
fn started(schedule: &serde_json::Value) -> (Vec<u64>, Vec<String>) {
    let history = schedule["history"].as_array().expect("history");
    let started: Vec<&serde_json::Value> = history
        .iter()
        .filter(|tick| tick["outcome"] == "started")
        .collect();
    (
        started
            .iter()
            .map(|tick| tick["nominal_ms"].as_u64().unwrap())
            .collect(),
        started
            .iter()
            .map(|tick| tick["fleet_id"].as_str().unwrap().to_owned())
            .collect(),
    )
}

/// Every nominal time is a multiple of 2 s, they follow each other without gap or repeat, and
/// every fleet is distinct.
fn assert_exactly_once(nominal_ms: &[u64], fleet_ids: &[String]) {
    assert!(nominal_ms.iter().all(|t| t % 2_000 == 0), "{nominal_ms:?}");
    for pair in nominal_ms.windows(2) {
        assert_eq!(pair[1], pair[0] + 2_000, "gap or repeat: {nominal_ms:?}");
    }
    let distinct: BTreeSet<&String> = fleet_ids.iter().collect();
    assert_eq!(distinct.len(), fleet_ids.len(), "{fleet_ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_second_schedule_starts_one_fleet_per_tick_across_pause_and_kill() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    common::write_config(&config, CONFIG);
    let data = root.path().join("node");
    let port = common::free_port();
    let arguments = ["--config", config.to_str().unwrap()];
    let mut node = Node::start_on(&data, port, &arguments).await;
    let address = node.address.clone();
    let file = root.path().join("schedule.yaml");
    std::fs::write(&file, SCHEDULE).unwrap();
    let file = file.to_str().unwrap();

    let preview = json(
        &address,
        &["schedule", "preview", "--file", file, "--count", "3"],
    );
    let previewed: Vec<u64> = preview["occurrences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["nominal_ms"].as_u64().unwrap())
        .collect();
    assert_eq!(previewed.len(), 3);
    let created = json(&address, &["schedule", "create", file]);
    assert_eq!(created["created"], true);
    assert_eq!(created["schedule"]["id"], "default/every-2s");
    // The same file again: the same schedule, not a second one.
    assert_eq!(
        json(&address, &["schedule", "create", file])["created"],
        false
    );

    tokio::time::sleep(Duration::from_millis(7_000)).await;
    let schedule = json(&address, &["schedule", "show", "default/every-2s"]);
    let (nominal_ms, fleet_ids) = started(&schedule);
    assert!(nominal_ms.len() >= 3, "{schedule}");
    assert_exactly_once(&nominal_ms, &fleet_ids);
    // What the preview showed is what fired (the preview was asked just before creation, so
    // its first time may precede it).
    assert!(
        previewed.iter().any(|t| *t == nominal_ms[0]),
        "{previewed:?} vs {nominal_ms:?}"
    );

    // Paused: nothing starts.
    json(
        &address,
        &["schedule", "pause", "default/every-2s", "--note", "freeze"],
    );
    let before = started(&json(&address, &["schedule", "show", "default/every-2s"])).0;
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    let paused = json(&address, &["schedule", "show", "default/every-2s"]);
    assert_eq!(paused["paused"], true);
    assert_eq!(paused["pause_note"], "freeze");
    assert_eq!(started(&paused).0, before);
    json(
        &address,
        &["schedule", "resume", "default/every-2s", "--note", "thaw"],
    );

    // kill -9, 5 s down (inside the 30 s catch-up window), restart: the ticks of the downtime
    // start once each after the restart.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    node.kill();
    tokio::time::sleep(Duration::from_millis(5_000)).await;
    let node = Node::start_on(&data, port, &arguments).await;
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let after = json(&node.address, &["schedule", "show", "default/every-2s"]);
    let (resumed_nominal_ms, resumed_fleet_ids) = started(&after);
    let new: Vec<u64> = resumed_nominal_ms
        .iter()
        .copied()
        .filter(|t| !before.contains(t))
        .collect();
    let new_ids: Vec<String> = resumed_fleet_ids[before.len()..].to_vec();
    assert!(new.len() >= 4, "{after}");
    assert_exactly_once(&new, &new_ids);
    let distinct: BTreeSet<u64> = resumed_nominal_ms.iter().copied().collect();
    assert_eq!(distinct.len(), resumed_nominal_ms.len(), "{after}");
    // One fleet per started tick, no more.
    let fleets: Vec<String> = fleet_ids_of(&node.address);
    assert_eq!(
        fleets.len(),
        resumed_fleet_ids.len(),
        "{fleets:?} vs {after}"
    );
}

fn fleet_ids_of(address: &str) -> Vec<String> {
    let listed = json(address, &["fleet", "list"]);
    listed["fleets"]
        .as_array()
        .or_else(|| listed.as_array())
        .expect("fleets")
        .iter()
        .map(|fleet| fleet["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schedules_are_refused_naming_the_field() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    common::write_config(&config, CONFIG);
    let node = Node::start(
        &root.path().join("node"),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let cases = [
        (
            SCHEDULE.replace("every: 2s", "every: 1ms"),
            "spec.calendar.every: must be between 1000 ms and 31622400000 ms",
        ),
        (
            SCHEDULE.replace("every: 2s", "cron: '0 0 * * *', time_zone: Mars/Olympus"),
            "spec.calendar.time_zone: \"Mars/Olympus\" is not an IANA time zone",
        ),
        (
            SCHEDULE.replace("overlap: allow_all", "overlap: sometimes"),
            "policy.overlap: unknown variant `sometimes`",
        ),
        (
            SCHEDULE.replace("agent: { command: 'true' }", "agent: { command: '' }"),
            "spec.fleet.agent.command",
        ),
    ];
    for (index, (text, expected)) in cases.iter().enumerate() {
        let file = root.path().join(format!("bad-{index}.yaml"));
        std::fs::write(&file, text).unwrap();
        let (code, stdout, stderr) = flotilla(
            &node.address,
            &["schedule", "create", file.to_str().unwrap()],
        );
        assert_ne!(code, 0, "{text}");
        assert!(
            stderr.contains(expected),
            "{expected:?} not in {stdout}{stderr}"
        );
    }
    let listed = json(&node.address, &["schedule", "list"]);
    assert_eq!(listed["schedules"].as_array().unwrap().len(), 0, "{listed}");
}

const HOURLY: &str = "name: hourly
calendar: { every: 1h }
policy: { overlap: skip }
fleet:
  name: hourly
  targets: { repositories: [file:///srv/never-cloned.git] }
  agent: { command: 'true' }
";

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_triggers_and_backfills_through_the_cli() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    common::write_config(&config, CONFIG);
    let node = Node::start(
        &root.path().join("node"),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let address = node.address.clone();
    let file = root.path().join("hourly.yaml");
    std::fs::write(&file, HOURLY).unwrap();
    json(&address, &["schedule", "create", file.to_str().unwrap()]);
    let id = "default/hourly";

    // A trigger id starts one fleet, whoever sends it how often; another id, another fleet.
    let first = json(
        &address,
        &["schedule", "trigger", id, "--trigger-id", "release-42"],
    );
    assert_eq!(first["created"], true, "{first}");
    let again = json(
        &address,
        &["schedule", "trigger", id, "--trigger-id", "release-42"],
    );
    assert_eq!(again["created"], false, "{again}");
    assert_eq!(again["fleet_id"], first["fleet_id"]);
    let other = json(&address, &["schedule", "trigger", id]);
    assert_eq!(other["created"], true);
    assert_ne!(other["fleet_id"], first["fleet_id"]);
    // skip refuses while the schedule's fleets run (no worker: they stay pending).
    let (code, stdout, stderr) = flotilla(
        &address,
        &[
            "schedule",
            "trigger",
            id,
            "--trigger-id",
            "r-43",
            "--overlap",
            "skip",
        ],
    );
    assert_ne!(code, 0, "{stdout}");
    assert!(stderr.contains("is running"), "{stderr}");
    let (code, _, stderr) = flotilla(
        &address,
        &["schedule", "trigger", id, "--trigger-id", "a b"],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("trigger_id"), "{stderr}");

    // A running schedule refuses a backfill of times it has not decided yet (those after its
    // creation: now is one; the node stamps the backfill later on the same clock).
    let to = now_ms().to_string();
    let from = (now_ms() - 3 * 3_600_000 - 1_000).to_string();
    let (code, _, stderr) = flotilla(
        &address,
        &[
            "schedule",
            "backfill",
            id,
            "--from",
            &from,
            "--to",
            &to,
            "--overlap",
            "allow_all",
        ],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("to: after"), "{stderr}");
    // Paused, it takes the past three hours: three fleets, once.
    json(&address, &["schedule", "pause", id, "--note", "backfill"]);
    let filled = json(
        &address,
        &[
            "schedule",
            "backfill",
            id,
            "--from",
            &from,
            "--to",
            &to,
            "--overlap",
            "allow_all",
        ],
    );
    let started: Vec<String> = filled["started_fleet_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|fleet| fleet.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(started.len(), 3, "{filled}");
    let refilled = json(
        &address,
        &[
            "schedule",
            "backfill",
            id,
            "--from",
            &from,
            "--to",
            &to,
            "--overlap",
            "allow_all",
        ],
    );
    assert_eq!(refilled["started_fleet_ids"].as_array().unwrap().len(), 0);
    assert_eq!(refilled["skipped"], 3, "{refilled}");
    let future = (now_ms() + 3_600_000).to_string();
    let (code, _, stderr) = flotilla(
        &address,
        &["schedule", "backfill", id, "--from", &from, "--to", &future],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("in the future"), "{stderr}");
    // Two triggered fleets and three backfilled ones; the history says which is which.
    assert_eq!(fleet_ids_of(&address).len(), 5);
    let shown = json(&address, &["schedule", "show", id]);
    let outcomes: Vec<&str> = shown["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tick| tick["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == "triggered").count(),
        2,
        "{shown}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| **o == "started").count(),
        3,
        "{shown}"
    );
    // The text view names the overlap policy; a cron schedule's, its DST policy.
    let (code, text, _) = common::flotilla_cli(&address, &["schedule", "show", id]);
    assert_eq!(code, 0);
    assert!(text.contains("policy: overlap skip"), "{text}");
    assert!(text.contains("(trigger release-42)"), "{text}");
    let cron = root.path().join("cron.yaml");
    std::fs::write(
        &cron,
        HOURLY.replace("name: hourly\n", "name: london\n").replace(
            "every: 1h",
            "cron: '30 1 * * *', time_zone: Europe/London, dst_gap: skip",
        ),
    )
    .unwrap();
    json(&address, &["schedule", "create", cron.to_str().unwrap()]);
    let (_, text, _) = common::flotilla_cli(&address, &["schedule", "show", "default/london"]);
    assert!(
        text.contains("dst: skip in a spring-forward gap, first in a fall-back repeat"),
        "{text}"
    );
}

/// A schedule every 2 s whose agent takes about 5 s, with a real local worker: under `skip`
/// the ticks while its fleet runs are skipped and its fleets never overlap; under
/// `buffer_one` one tick waits and starts when the running fleet ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlap_policies_with_a_slow_agent() {
    let root = tempfile::tempdir().unwrap();
    let origin = common::origin_repository(root.path(), "slow", &[("README.md", "slow\n")]);
    let config = root.path().join("node.toml");
    common::write_config(&config, "[limits]\nlease_check_interval_ms = 200\n");
    let node = Node::start(
        &root.path().join("node"),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let address = node.address.clone();
    for (name, overlap) in [("slow-skip", "skip"), ("slow-buffer", "buffer_one")] {
        let file = root.path().join(format!("{name}.yaml"));
        std::fs::write(
            &file,
            format!(
                "name: {name}\ncalendar: {{ every: 2s }}\npolicy: {{ overlap: {overlap} }}\n\
                 fleet:\n  name: {name}\n  targets: {{ repositories: [{origin}] }}\n  \
                 agent: {{ command: 'sleep 5' }}\n  push: false\n"
            ),
        )
        .unwrap();
        json(&address, &["schedule", "create", file.to_str().unwrap()]);
    }
    tokio::time::sleep(Duration::from_millis(16_000)).await;
    for (id, overlap) in [
        ("default/slow-skip", "skip"),
        ("default/slow-buffer", "buffer_one"),
    ] {
        json(&address, &["schedule", "pause", id]);
        let schedule = json(&address, &["schedule", "show", id]);
        let history = schedule["history"].as_array().unwrap();
        let count = |outcome: &str| history.iter().filter(|t| t["outcome"] == outcome).count();
        let (_, fleet_ids) = started(&schedule);
        assert!(fleet_ids.len() >= 2, "{id}: {schedule}");
        // Fleets of one schedule never ran at once: each started after the one before ended.
        let mut previous_finished_ms = 0;
        for fleet_id in &fleet_ids {
            let fleet = json(&address, &["fleet", "status", fleet_id]);
            let created_ms = fleet["created_at_ms"].as_u64().unwrap();
            assert!(
                created_ms >= previous_finished_ms,
                "{id}: {fleet_id} created at {created_ms}, before the previous fleet ended at {previous_finished_ms}"
            );
            previous_finished_ms = fleet["finished_at_ms"].as_u64().unwrap_or(u64::MAX);
            if previous_finished_ms == 0 {
                previous_finished_ms = u64::MAX;
            }
        }
        if overlap == "skip" {
            assert!(count("skipped") >= 2, "{id}: {schedule}");
            assert_eq!(count("buffered"), 0, "{id}: {schedule}");
        } else {
            assert!(count("buffered") >= 1, "{id}: {schedule}");
            // A buffered tick started late: decided well after its nominal time.
            let late = history.iter().any(|tick| {
                tick["outcome"] == "started"
                    && tick["decided_at_ms"].as_u64().unwrap()
                        >= tick["nominal_ms"].as_u64().unwrap() + 1_000
            });
            assert!(late, "{id}: {schedule}");
        }
    }
}

/// The whole (single-node) cluster down for longer than the catch-up window: the ticks older
/// than the window are recorded as missed, with their count, and get no fleet; those inside
/// it start once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticks_older_than_the_catch_up_window_are_missed_not_started() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    common::write_config(&config, CONFIG);
    let data = root.path().join("node");
    let port = common::free_port();
    let arguments = ["--config", config.to_str().unwrap()];
    let mut node = Node::start_on(&data, port, &arguments).await;
    let file = root.path().join("schedule.yaml");
    std::fs::write(
        &file,
        SCHEDULE.replace("catch_up_window_ms: 30000", "catch_up_window_ms: 10000"),
    )
    .unwrap();
    json(
        &node.address,
        &["schedule", "create", file.to_str().unwrap()],
    );
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    node.kill();
    let down_ms = now_ms();
    tokio::time::sleep(Duration::from_millis(18_000)).await;
    let node = Node::start_on(&data, port, &arguments).await;
    let up_ms = now_ms();
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    json(&node.address, &["schedule", "pause", "default/every-2s"]);
    let schedule = json(&node.address, &["schedule", "show", "default/every-2s"]);
    let history = schedule["history"].as_array().unwrap();
    let missed: Vec<&serde_json::Value> = history
        .iter()
        .filter(|tick| tick["outcome"] == "missed")
        .collect();
    assert_eq!(missed.len(), 1, "{schedule}");
    let (first_ms, last_ms) = (
        missed[0]["nominal_ms"].as_u64().unwrap(),
        missed[0]["missed_last_ms"].as_u64().unwrap(),
    );
    let count = missed[0]["missed_count"].as_u64().unwrap();
    assert!(count >= 3, "18 s down, 10 s window: {schedule}");
    assert_eq!(count, (last_ms - first_ms) / 2_000 + 1, "{schedule}");
    assert!(first_ms >= down_ms.saturating_sub(2_000), "{schedule}");
    // Missed: older than the window when the node came back.
    assert!(last_ms < up_ms.saturating_sub(10_000) + 2_000, "{schedule}");
    let (nominal_ms, fleet_ids) = started(&schedule);
    assert!(
        nominal_ms.iter().all(|t| *t < first_ms || *t > last_ms),
        "a missed time was started: {schedule}"
    );
    let distinct: BTreeSet<u64> = nominal_ms.iter().copied().collect();
    assert_eq!(distinct.len(), nominal_ms.len(), "{schedule}");
    // Inside the window after the restart: started, once each.
    assert!(nominal_ms.iter().any(|t| *t > last_ms), "{schedule}");
    assert_eq!(fleet_ids_of(&node.address).len(), fleet_ids.len());
}
