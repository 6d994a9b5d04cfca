//! The worker runtime against a real server process: supervision of run actors and
//! cancellation through lost leases. The worker runs in this test process with a substitute
//! executor (the attempt's work), so failures can be injected; everything else is real
//! (gRPC, Raft on RocksDB, lease long polls, heartbeats, fencing).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Node, spec, wait_finished};
use flotilla_proto::v1;
use flotilla_worker::actor::{Executor, WorkerSettings, start_with_executor};

fn settings(node: &Node) -> WorkerSettings {
    WorkerSettings {
        worker_id: "test-worker".into(),
        endpoints: vec![node.address.clone()],
        slots: 2,
        lease_wait_ms: 1_000,
        heartbeat_interval_ms: 200,
        ..WorkerSettings::default()
    }
}

fn unchanged() -> v1::RunResult {
    v1::RunResult {
        outcome: "unchanged".into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_attempt_becomes_a_failed_attempt_and_is_retried_never_hung() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let executor: Executor = Arc::new(|lease: v1::Lease, _cancelled| {
        Box::pin(async move {
            if lease.repository.ends_with("panics.git") {
                panic!("injected panic in run {}", lease.run_id);
            }
            unchanged()
        })
    });
    let worker = start_with_executor(settings(&node), executor)
        .await
        .unwrap();
    let mut client = node.client().await;
    let mut s = spec(
        "panics",
        vec![
            "file:///srv/panics.git".into(),
            "file:///srv/fine.git".into(),
        ],
        "true",
        &[],
    );
    s.max_attempts = 2;
    s.retry_backoff_initial_ms = 100;
    s.retry_backoff_max_ms = 100;
    let fleet = client
        .submit_fleet(v1::SubmitFleetRequest {
            spec: Some(s),
            ..Default::default()
        })
        .await
        .unwrap();
    let fleet = wait_finished(&mut client, &fleet.into_inner().fleet.unwrap().id, &node).await;
    let failed = client
        .get_run(v1::GetRunRequest {
            run_id: fleet.runs[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(failed.state, v1::RunState::Failed as i32);
    assert_eq!(
        failed.attempts.len(),
        2,
        "retried up to max_attempts: {failed:?}"
    );
    for attempt in &failed.attempts {
        assert_eq!(attempt.outcome, "infrastructure");
        assert!(attempt.error.contains("panicked"), "{attempt:?}");
    }
    assert_eq!(fleet.runs[1].state, v1::RunState::Unchanged as i32);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_fleet_stops_its_running_attempts() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let started = Arc::new(AtomicU32::new(0));
    let stopped = Arc::new(AtomicU32::new(0));
    let executor: Executor = {
        let (started, stopped) = (started.clone(), stopped.clone());
        Arc::new(
            move |_lease: v1::Lease, mut cancelled: tokio::sync::watch::Receiver<bool>| {
                let (started, stopped) = (started.clone(), stopped.clone());
                Box::pin(async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    let _ =
                        tokio::time::timeout(Duration::from_secs(60), cancelled.wait_for(|c| *c))
                            .await;
                    stopped.fetch_add(1, Ordering::SeqCst);
                    v1::RunResult {
                        outcome: "cancelled".into(),
                        ..Default::default()
                    }
                })
            },
        )
    };
    let worker = start_with_executor(settings(&node), executor)
        .await
        .unwrap();
    let mut client = node.client().await;
    let s = spec(
        "long",
        vec![
            "file:///srv/a.git".into(),
            "file:///srv/b.git".into(),
            "file:///srv/c.git".into(),
        ],
        "true",
        &[],
    );
    let fleet = client
        .submit_fleet(v1::SubmitFleetRequest {
            spec: Some(s),
            ..Default::default()
        })
        .await
        .unwrap();
    let fleet_id = fleet.into_inner().fleet.unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(30);
    while started.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "runs did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cancelled = client
        .cancel_fleet(v1::CancelFleetRequest {
            fleet_id: fleet_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, v1::FleetState::Cancelled as i32);
    assert_eq!(cancelled.counts.unwrap().cancelled, 3);
    // The next heartbeat reports the leases lost and the worker stops both attempts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stopped.load(Ordering::SeqCst) < 2 {
        assert!(
            Instant::now() < deadline,
            "attempts were not stopped: {} stopped",
            stopped.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Their late results were fenced off: the fleet stays cancelled, nothing else ran.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fleet = client
        .get_fleet(v1::GetFleetRequest { fleet_id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fleet.counts.unwrap().cancelled, 3);
    assert_eq!(started.load(Ordering::SeqCst), 2);
    worker.stop().await;
}
