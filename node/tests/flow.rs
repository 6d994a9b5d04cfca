//! Flow control on a real `flotilla server` with its worker, real git repositories and bwrap
//! sandboxes, driven through the real CLI:
//! - a 200-run fleet rolled out in 1% / 10% / 100% waves, whose agent fails in 30% of the
//!   repositories, pauses itself in the first wave that exceeds its failure budget and never
//!   leases a run of a later wave; `fleet rerun` of the failed subset runs exactly those
//!   repositories; `--dry-run` shows the runs, waves and limits and creates nothing;
//! - a cluster-wide rate limit of 2 leases per second holds within 5% over 60 s while two
//!   fleets compete for it, and both fleets get their share.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::Node;
use flotilla_proto::v1;

const CONFIG: &str = "[limits]\nlease_check_interval_ms = 200\n\n[worker]\nslots = 8\n";

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

/// `count` bare origins `<root>/repositories/r<i>.git`, each a clone of one of two templates:
/// those whose index is in `failing` hold a file `fail-here`, which makes the agent fail.
fn repositories(root: &Path, count: usize, failing: impl Fn(usize) -> bool) -> Vec<String> {
    let good = common::origin_repository(root, "template-good", &[("README", "good\n")]);
    let bad = common::origin_repository(
        root,
        "template-bad",
        &[("README", "bad\n"), ("fail-here", "x\n")],
    );
    let directory = root.join("repositories");
    std::fs::create_dir_all(&directory).unwrap();
    (0..count)
        .map(|index| {
            let template = if failing(index) { &bad } else { &good };
            let bare = directory.join(format!("r{index}.git"));
            let status = std::process::Command::new("git")
                .args([
                    "clone",
                    "-q",
                    "--bare",
                    template.trim_start_matches("file://"),
                ])
                .arg(&bare)
                .status()
                .expect("git clone --bare");
            assert!(status.success());
            format!("file://{}", bare.display())
        })
        .collect()
}

fn spec_file(root: &Path, name: &str, repositories: &[String], flow: &str) -> String {
    let list: Vec<String> = repositories
        .iter()
        .map(|r| format!("    - {r}\n"))
        .collect();
    let text = format!(
        "name: {name}\ntargets:\n  repositories:\n{}agent:\n  command: 'test ! -e fail-here && echo changed >> f.txt'\n\
         branch: flotilla/{{fleet_id}}\nmax_parallelism: 8\nmax_attempts: 1\npush: true\n{flow}",
        list.concat()
    );
    let path = root.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn status(address: &str, fleet_id: &str) -> serde_json::Value {
    json(address, &["fleet", "status", fleet_id])
}

/// Approves every gate and resumes every pause of `fleet_id` until it finishes.
async fn drive_to_end(address: &str, fleet_id: &str, node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let fleet = status(address, fleet_id);
        if fleet["state"] != "running" {
            return;
        }
        if fleet["flow"]["gate_reason"] != "" {
            json(address, &["fleet", "approve", fleet_id]);
        }
        if fleet["flow"]["pause_reason"] != "" {
            json(address, &["fleet", "resume", fleet_id]);
        }
        assert!(Instant::now() < deadline, "{fleet}\n{}", node.log_text());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_pause_at_the_failure_budget_and_rerun_repeats_the_failed_subset() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    common::write_config(&config, CONFIG);
    let node = Node::start(
        &root.path().join("node"),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let address = node.address.clone();
    // 30% of the repositories make the agent fail: indexes ending in 3, 6 and 9.
    let failing = |index: usize| matches!(index % 10, 3 | 6 | 9);
    let urls = repositories(root.path(), 200, failing);
    let file = spec_file(
        root.path(),
        "canary",
        &urls,
        "flow:\n  waves: ['1%', '10%', '100%']\n  success_threshold_percent: 50\n  failure_limit: 2\n",
    );
    json(
        &address,
        &[
            "limit",
            "create",
            "per-organisation",
            "--key",
            "organisation",
            "--max-running",
            "50",
        ],
    );

    // A dry run: the runs, branches, waves and limits, and nothing created.
    let preview = json(&address, &["fleet", "submit", "--dry-run", &file]);
    assert_eq!(preview["dry_run"], true);
    assert_eq!(preview["run_count"], 200);
    assert_eq!(preview["wave_ends"], serde_json::json!([2, 20, 200]));
    assert_eq!(preview["runs"][5]["branch"], "flotilla/fl-1");
    assert!(
        preview["limits"][0]
            .as_str()
            .unwrap()
            .starts_with("per-organisation: at most 50 running per organisation"),
        "{preview}"
    );
    let listed = json(&address, &["fleet", "list"]);
    let fleets = listed["fleets"].as_array().or_else(|| listed.as_array());
    assert_eq!(
        fleets.map_or(0, Vec::len),
        0,
        "a dry run created a fleet: {listed}"
    );

    let submitted = json(&address, &["fleet", "submit", &file]);
    let fleet_id = submitted["fleet"]["id"].as_str().unwrap().to_owned();

    // Wave 1 (runs 0-1) succeeds; wave 2 (runs 2-19) holds failures at 3, 6, 9, ...: the
    // third exceeds failure_limit 2 and pauses the fleet.
    let deadline = Instant::now() + Duration::from_secs(120);
    let paused = loop {
        let fleet = status(&address, &fleet_id);
        let running = fleet["counts"]["running"].as_u64().unwrap();
        if fleet["flow"]["pause_reason"] != "" && running == 0 {
            break fleet;
        }
        assert!(
            Instant::now() < deadline,
            "not paused: {fleet}\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let flow = &paused["flow"];
    assert_eq!(flow["paused_automatically"], true, "{flow}");
    assert!(
        flow["pause_reason"]
            .as_str()
            .unwrap()
            .starts_with("failure budget: "),
        "{flow}"
    );
    assert_eq!(flow["wave"], 2, "{flow}");
    assert!(
        flow["limits"][0]
            .as_str()
            .unwrap()
            .starts_with("per-organisation: "),
        "{flow}"
    );
    let runs = paused["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 200);
    for run in &runs[20..] {
        assert_eq!(run["state"], "pending", "{run}");
        assert_eq!(run["attempt"], 0, "a run of a later wave was leased: {run}");
    }
    let failed: Vec<&serde_json::Value> =
        runs.iter().filter(|run| run["state"] == "failed").collect();
    assert!(failed.len() >= 3, "{paused}");
    for run in &runs[..20] {
        let index: usize = run["id"]
            .as_str()
            .unwrap()
            .rsplit('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        if run["state"] == "failed" {
            assert!(failing(index), "{run}");
            assert_eq!(run["outcome"], "agent_failed", "{run}");
        } else if run["state"] == "changed" {
            assert!(!failing(index), "{run}");
        }
    }
    // Paused means paused: a while later, no more leases.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = status(&address, &fleet_id);
    assert_eq!(later["counts"], paused["counts"], "{later}");

    // Re-run the failed subset: exactly those repositories, in a new fleet linked to the
    // first. The paused fleet is cancelled first (its repositories are free anyway).
    json(&address, &["fleet", "cancel", &fleet_id]);
    let expected: BTreeSet<String> = failed
        .iter()
        .map(|run| run["repository"].as_str().unwrap().to_owned())
        .collect();
    let preview = json(
        &address,
        &[
            "fleet",
            "rerun",
            &fleet_id,
            "--outcomes",
            "agent_failed",
            "--dry-run",
        ],
    );
    let previewed: BTreeSet<String> = preview["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|run| run["repository"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(previewed, expected);
    let rerun = json(
        &address,
        &["fleet", "rerun", &fleet_id, "--outcomes", "agent_failed"],
    );
    let rerun_id = rerun["fleet"]["id"].as_str().unwrap().to_owned();
    assert_ne!(rerun_id, fleet_id);
    // Repeating the command answers the same new fleet (its idempotency key).
    let again = json(
        &address,
        &["fleet", "rerun", &fleet_id, "--outcomes", "agent_failed"],
    );
    assert_eq!(again["fleet"]["id"], rerun_id.as_str());
    assert_eq!(again["created"], false);
    // The re-run keeps the first fleet's flow (waves, budget): approve and resume it along.
    drive_to_end(&address, &rerun_id, &node).await;
    let mut client = node.client().await;
    let finished = common::wait_finished(&mut client, &rerun_id, &node).await;
    let repeated: BTreeSet<String> = finished.runs.iter().map(|r| r.repository.clone()).collect();
    assert_eq!(repeated, expected);
    assert!(
        finished
            .runs
            .iter()
            .all(|run| run.state == v1::RunState::Failed as i32),
        "{finished:?}"
    );
    let rerun_status = status(&address, &rerun_id);
    assert_eq!(rerun_status["flow"]["origin_fleet_id"], fleet_id.as_str());

    // Bad requests name the field.
    let (code, _, stderr) = flotilla(
        &address,
        &["fleet", "rerun", &fleet_id, "--outcomes", "sometimes"],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("outcomes[0]"), "{stderr}");
    let (code, _, stderr) = flotilla(&address, &["fleet", "approve", "fl-999"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("no fleet fl-999"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gate_and_a_pause_hold_leases_until_approved_and_resumed() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    common::write_config(&config, CONFIG);
    let node = Node::start(
        &root.path().join("node"),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let address = node.address.clone();
    let urls = repositories(root.path(), 4, |_| false);
    let file = spec_file(
        root.path(),
        "gated",
        &urls,
        "flow:\n  require_approval: true\n  waves: [1]\n  approve_each_wave: true\n",
    );
    let fleet_id = json(&address, &["fleet", "submit", &file])["fleet"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = status(&address, &fleet_id);
    assert_eq!(waiting["counts"]["pending"], 4, "{waiting}");
    assert!(
        waiting["flow"]["gate_reason"]
            .as_str()
            .unwrap()
            .starts_with("require_approval"),
        "{waiting}"
    );
    // A bounded queue: the gated fleet's 4 pending runs wait on the global key, so a second
    // fleet of 4 would make 8, over max_queued 5; it is refused whole, and nothing is created.
    json(
        &address,
        &[
            "limit",
            "create",
            "bounded",
            "--key",
            "global",
            "--max-running",
            "100",
            "--max-queued",
            "5",
        ],
    );
    let second = spec_file(root.path(), "second", &urls, "");
    let preview = json(&address, &["fleet", "submit", "--dry-run", &second]);
    assert!(
        preview["queue_full"]
            .as_str()
            .unwrap()
            .starts_with("limit bounded: 4 runs wait on key *"),
        "{preview}"
    );
    let (code, _, stderr) = flotilla(&address, &["fleet", "submit", &second]);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("ResourceExhausted")
            && stderr.contains("limit bounded: 4 runs wait on key * and this fleet adds 4"),
        "{stderr}"
    );
    let bounded = json(&address, &["limit", "show", "bounded"]);
    assert_eq!(bounded["usage"][0]["queued"], 4, "{bounded}");
    assert_eq!(
        json(&address, &["fleet", "list"])["fleets"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    json(&address, &["limit", "delete", "bounded"]);
    let approved = json(&address, &["fleet", "approve", &fleet_id, "--note", "go"]);
    assert_eq!(approved["changed"], true, "{approved}");
    // Wave 1 (one run) ends, then the gate of approve_each_wave holds the rest.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let fleet = status(&address, &fleet_id);
        if fleet["counts"]["changed"] == 1 && fleet["flow"]["gate_reason"] != "" {
            assert_eq!(fleet["counts"]["pending"], 3, "{fleet}");
            break;
        }
        assert!(Instant::now() < deadline, "{fleet}\n{}", node.log_text());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Paused and approved: the pause still holds.
    json(&address, &["fleet", "pause", &fleet_id, "--note", "lunch"]);
    json(&address, &["fleet", "approve", &fleet_id]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let paused = status(&address, &fleet_id);
    assert_eq!(paused["counts"]["pending"], 3, "{paused}");
    assert!(
        paused["flow"]["paused_by"]
            .as_str()
            .unwrap()
            .starts_with("token:")
    );
    let resumed = json(&address, &["fleet", "resume", &fleet_id]);
    assert_eq!(resumed["changed"], true);
    assert_eq!(
        json(&address, &["fleet", "resume", &fleet_id])["changed"],
        false,
        "resume is idempotent"
    );
    let mut client = node.client().await;
    let finished = common::wait_finished(&mut client, &fleet_id, &node).await;
    assert_eq!(finished.counts.unwrap().changed, 4);
    let decisions = status(&address, &fleet_id)["flow"]["decisions"].clone();
    let actions: Vec<String> = decisions
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().split(' ').nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(
        actions,
        ["approve", "pause", "approve", "resume"],
        "{decisions}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_within_five_percent_over_a_minute_between_two_fleets() {
    const RATE_PER_SECOND: u64 = 2;
    const WINDOW_MS: u64 = 60_000;
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    common::write_config(&config, CONFIG);
    let node = Node::start(
        &root.path().join("node"),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let address = node.address.clone();
    json(
        &address,
        &[
            "limit",
            "create",
            "cluster-rate",
            "--key",
            "global",
            "--rate",
            "2",
            "--period-ms",
            "1000",
            "--burst",
            "2",
        ],
    );
    // More runs than a minute at the rate can start, so both fleets still wait at its end.
    let urls = repositories(root.path(), 140, |_| false);
    let first = spec_file(root.path(), "first", &urls[..70], "");
    let second = spec_file(root.path(), "second", &urls[70..], "");
    let first_id = json(&address, &["fleet", "submit", &first])["fleet"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let second_id = json(&address, &["fleet", "submit", &second])["fleet"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(WINDOW_MS + 3_000)).await;

    // Every attempt's lease time, from the replicated state.
    let mut client = node.client().await;
    let mut starts: Vec<(u64, String)> = Vec::new();
    for fleet_id in [&first_id, &second_id] {
        let fleet = client
            .get_fleet(v1::GetFleetRequest {
                fleet_id: fleet_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        for run in fleet.runs.iter().filter(|r| r.attempt > 0) {
            let detail = client
                .get_run(v1::GetRunRequest {
                    run_id: run.id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            for attempt in detail.attempts {
                starts.push((attempt.started_at_ms, fleet_id.clone()));
            }
        }
    }
    starts.sort();
    let first_start = starts.first().expect("some lease").0;
    let inside: Vec<&(u64, String)> = starts
        .iter()
        .filter(|(at, _)| *at < first_start + WINDOW_MS)
        .collect();
    let expected = (RATE_PER_SECOND * WINDOW_MS / 1_000) as f64;
    let measured = inside.len() as f64;
    eprintln!(
        "leases in the first {WINDOW_MS} ms: {measured} (expected {expected}, {:.2}%)",
        (measured - expected) / expected * 100.0
    );
    assert!(
        (measured - expected).abs() <= expected * 0.05,
        "{measured} leases in {WINDOW_MS} ms, expected {expected} within 5%"
    );
    for fleet_id in [&first_id, &second_id] {
        let share = inside.iter().filter(|(_, id)| id == fleet_id).count();
        assert!(share >= 40, "{fleet_id} got {share} of {measured} leases");
    }
    let limit = json(&address, &["limit", "show", "cluster-rate"]);
    assert_eq!(limit["usage"][0]["key"], "*", "{limit}");
}
