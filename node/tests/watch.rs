//! `WatchFleet` against a real server whose fleets keep at most 16 events
//! (`limits.max_events_per_fleet`): a watcher that resumes within the kept events gets them all,
//! in order; one that asks for dropped events gets OUT_OF_RANGE naming the bound, where to
//! resume, and the fleet's summary.

mod common;

use flotilla_proto::v1::AttemptOutcome;
use std::time::{Duration, Instant};

use common::{Node, lease, spec};
use flotilla_proto::v1;

const CONFIG: &str = "[limits]\nmax_events_per_fleet = 16\n\n[worker]\nenabled = false\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_behind_the_event_bound_is_told_where_to_resume() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    common::write_config(&config, CONFIG);
    let node = Node::start(
        &root.path().join("node"),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let mut client = node.client().await;
    let repositories: Vec<String> = (0..10).map(|i| format!("file:///srv/r{i}.git")).collect();
    let mut s = spec("bounded", repositories, "true", &[]);
    s.max_parallelism = 10;
    let fleet = client
        .submit_fleet(v1::SubmitFleetRequest {
            spec: Some(s),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .fleet
        .unwrap();
    let leases = lease(&node, "w1", 10, Instant::now() + Duration::from_secs(60)).await;
    let mut workers = common::worker_client(&node.address).await;
    for lease in &leases {
        let report = workers
            .report_result(v1::ReportResultRequest {
                worker_id: "w1".into(),
                run_id: lease.run_id.clone(),
                attempt: lease.attempt,
                result: Some(v1::RunResult {
                    outcome: AttemptOutcome::Unchanged as i32,
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(report.accepted);
    }
    // 1 submitted + 10 leased + 10 results + 1 finished = 22 events; the newest 16 are kept.
    let finished = client
        .get_fleet(v1::GetFleetRequest {
            fleet_id: fleet.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(finished.last_sequence, 22);
    let watch = |after_sequence| v1::WatchFleetRequest {
        fleet_id: fleet.id.clone(),
        after_sequence,
    };
    let mut stream = client.watch_fleet(watch(6)).await.unwrap().into_inner();
    let mut sequences = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        sequences.push(event.sequence);
    }
    assert_eq!(sequences, (7..=22).collect::<Vec<u64>>());
    let mut stream = client.watch_fleet(watch(0)).await.unwrap().into_inner();
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status}");
    let message = status.message();
    assert!(message.starts_with("after_sequence:"), "{message}");
    assert!(message.contains("resume after sequence 6"), "{message}");
    assert!(message.contains("max_events_per_fleet"), "{message}");
    assert!(message.contains("10 unchanged"), "{message}");
    // The CLI's human watch notes the gap and finishes with the roll-up; NDJSON, which
    // promises every event, ends with the error.
    let cli = |arguments: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .env("FLOTILLA_TOKEN", common::ADMIN_TOKEN)
            .args(["--address", &node.address])
            .env("FLOTILLA_CA_FILE", common::ca_file())
            .args(arguments)
            .output()
            .unwrap()
    };
    let human = cli(&["fleet", "watch", &fleet.id]);
    let stderr = String::from_utf8_lossy(&human.stderr);
    assert_eq!(human.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("note: after_sequence:") && stderr.contains("continuing from sequence 22"),
        "{stderr}"
    );
    let json = cli(&["--output", "json", "fleet", "watch", &fleet.id]);
    let stderr = String::from_utf8_lossy(&json.stderr);
    assert_eq!(json.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("resume after sequence 6"), "{stderr}");
}
