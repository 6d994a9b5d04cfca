//! Heartbeats out of the Raft log, against a real server process: heartbeats renew leases in
//! the leader's memory, so many of them over several lease TTLs leave the log index where it
//! was and the leases alive; a lease that is no longer heartbeated is expired by the leader
//! (one `ExpireSilentLeases` entry) about a TTL later, and a heartbeat then reports it lost.

mod common;

use flotilla_proto::v1::AttemptOutcome;
use std::time::{Duration, Instant};

use common::{Node, lease, spec};
use flotilla_proto::v1;

const LEASE_TTL_MS: u64 = 1_500;

const CONFIG: &str = r#"
[limits]
lease_ttl_ms = 1500
lease_grace_after_election_ms = 500
lease_check_interval_ms = 100

[worker]
enabled = false
heartbeat_interval_ms = 500
"#;

async fn last_log_index(node: &Node) -> u64 {
    let mut cluster = common::cluster_client(&node.address).await;
    cluster
        .status(v1::StatusRequest { from_leader: false })
        .await
        .unwrap()
        .into_inner()
        .last_log_index
}

async fn run(node: &Node, run_id: &str) -> v1::Run {
    node.client()
        .await
        .get_run(v1::GetRunRequest {
            run_id: run_id.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Heartbeats `held` as w1 every 250 ms for `duration`; returns every lease reported lost.
async fn heartbeat_for(
    node: &Node,
    held: &[v1::HeldLease],
    duration: Duration,
) -> Vec<v1::HeldLease> {
    let mut workers = common::worker_client(&node.address).await;
    let mut lost = Vec::new();
    let end = Instant::now() + duration;
    while Instant::now() < end {
        let response = workers
            .heartbeat(v1::HeartbeatRequest {
                worker_id: "w1".into(),
                leases: held.to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.lease_ttl_ms, LEASE_TTL_MS);
        lost.extend(response.lost);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_renew_leases_without_log_writes_and_silence_expires_them() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    common::write_config(&config, CONFIG);
    let config = config.to_str().unwrap().to_string();
    let node = Node::start(&root.path().join("node"), &["--config", &config]).await;
    let mut client = node.client().await;
    let fleet = client
        .submit_fleet(v1::SubmitFleetRequest {
            spec: Some(spec(
                "heartbeat",
                vec!["file:///srv/a.git".into(), "file:///srv/b.git".into()],
                "true",
                &[],
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .fleet
        .unwrap();
    let leases = lease(&node, "w1", 2, Instant::now() + Duration::from_secs(30)).await;
    let held: Vec<v1::HeldLease> = leases
        .iter()
        .map(|l| v1::HeldLease {
            run_id: l.run_id.clone(),
            attempt: l.attempt,
        })
        .collect();
    let (a, b) = (&held[0], &held[1]);

    // Both heartbeated for three TTLs: alive, and not one log entry written.
    let before = last_log_index(&node).await;
    let lost = heartbeat_for(&node, &held, Duration::from_millis(3 * LEASE_TTL_MS)).await;
    assert!(lost.is_empty(), "{lost:?}");
    assert_eq!(
        last_log_index(&node).await,
        before,
        "heartbeats wrote to the log"
    );
    for lease in &held {
        let run = run(&node, &lease.run_id).await;
        assert_eq!(run.state, v1::RunState::Running as i32, "{run:?}");
        assert_eq!(run.attempts.len(), 1, "{run:?}");
    }

    // Only a is heartbeated for two more TTLs: b falls silent and its lease expires.
    let lost = heartbeat_for(
        &node,
        std::slice::from_ref(a),
        Duration::from_millis(2 * LEASE_TTL_MS),
    )
    .await;
    assert!(lost.is_empty(), "{lost:?}");
    let run_a = run(&node, &a.run_id).await;
    assert_eq!(run_a.state, v1::RunState::Running as i32, "{run_a:?}");
    let run_b = run(&node, &b.run_id).await;
    assert_eq!(
        run_b.attempts[0].outcome(),
        AttemptOutcome::LeaseExpired,
        "{run_b:?}"
    );
    assert!(last_log_index(&node).await > before);

    // A heartbeat naming b (expired) or a wrong attempt of a hears they are lost.
    let stale = v1::HeldLease {
        run_id: a.run_id.clone(),
        attempt: a.attempt + 1,
    };
    let lost = heartbeat_for(
        &node,
        &[a.clone(), b.clone(), stale.clone()],
        Duration::from_millis(1),
    )
    .await;
    assert_eq!(lost, vec![b.clone(), stale]);
    assert_eq!(fleet.id, a.run_id.rsplit_once('-').unwrap().0);
}
