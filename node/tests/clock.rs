//! The time model against real server processes: a leader whose wall clock is an hour ahead
//! stamps leases and backoffs; it is replaced (kill -9, restart in a new term) by a leader whose
//! clock is right. No run may stay stuck waiting for the wall clock to catch up: the dead
//! worker's lease expires and the backed-off run is leased again after their real durations.
//! The skew is injected with the node's fault-injection variable
//! `FLOTILLA_FAULT_WALL_CLOCK_OFFSET_MS` (`flotilla::clock::WALL_CLOCK_OFFSET_VARIABLE`).

mod common;

use flotilla_proto::v1::AttemptOutcome;
use std::time::{Duration, Instant};

use common::{Node, lease, spec};
use flotilla_proto::v1;

const CONFIG: &str = r#"
[limits]
lease_ttl_ms = 3000
lease_grace_after_election_ms = 500
lease_check_interval_ms = 100

[worker]
enabled = false
heartbeat_interval_ms = 500
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_with_a_clock_ahead_replaced_by_a_right_one_leaves_no_run_stuck() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    common::write_config(&config, CONFIG);
    let config = config.to_str().unwrap().to_string();
    let data = root.path().join("node");
    let hour_ahead = [("FLOTILLA_FAULT_WALL_CLOCK_OFFSET_MS", "3600000")];
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let mut skewed =
        Node::start_with_environment(&data, port, &["--config", &config], &hour_ahead).await;
    let mut client = skewed.client().await;
    let mut s = spec(
        "skew",
        vec!["file:///srv/a.git".into(), "file:///srv/b.git".into()],
        "true",
        &[],
    );
    s.max_attempts = 2;
    s.retry_backoff_initial_ms = 500;
    s.retry_backoff_max_ms = 500;
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
    let deadline = Instant::now() + Duration::from_secs(60);
    let leases = lease(&skewed, "w1", 2, deadline).await;
    // Run b fails retryably: it backs off 500 ms, stamped by the skewed leader.
    let failing = leases
        .iter()
        .find(|l| l.repository.ends_with("b.git"))
        .unwrap();
    let mut workers = common::worker_client(&skewed.address).await;
    let report = workers
        .report_result(v1::ReportResultRequest {
            worker_id: "w1".into(),
            run_id: failing.run_id.clone(),
            attempt: 1,
            result: Some(v1::RunResult {
                outcome: AttemptOutcome::Infrastructure as i32,
                error: "injected".into(),
                retryable: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(report.accepted, "{report:?}");
    // Worker w1 dies holding run a's lease; the skewed leader is replaced by a right one.
    skewed.kill();
    let right = Node::start_on(&data, port, &["--config", &config]).await;
    // Both runs are leased again, as attempt 2, within seconds, not an hour: run a after its
    // lease expired (lease_ttl_ms after its last stamp, plus the grace), run b after its
    // backoff.
    let again = lease(&right, "w2", 2, Instant::now() + Duration::from_secs(60)).await;
    let mut attempts: Vec<(String, u32)> = again
        .iter()
        .map(|l| (l.repository.clone(), l.attempt))
        .collect();
    attempts.sort();
    assert_eq!(
        attempts,
        vec![
            ("file:///srv/a.git".to_string(), 2),
            ("file:///srv/b.git".to_string(), 2)
        ]
    );
    let mut client = right.client().await;
    let run_a = client
        .get_run(v1::GetRunRequest {
            run_id: format!("{}-0", fleet.id),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        run_a.attempts[0].outcome(),
        AttemptOutcome::LeaseExpired,
        "{run_a:?}"
    );
}
