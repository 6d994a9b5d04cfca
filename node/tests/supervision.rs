//! The worker runtime against a real server process: supervision of run actors and
//! cancellation through lost leases. The worker runs in this test process with a substitute
//! executor (the attempt's work), so failures can be injected; everything else is real
//! (gRPC, Raft on RocksDB, lease long polls, heartbeats, fencing).

mod common;

use flotilla_proto::v1::AttemptOutcome;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::{Node, spec, wait_finished};
use flotilla_proto::v1;
use flotilla_worker::actor::{Executor, WorkerSettings, start_with_executor};
use flotilla_worker::lease::LeaseDeadline;

fn settings(node: &Node) -> WorkerSettings {
    WorkerSettings {
        token: flotilla_worker::client_auth::BearerToken::new(common::ADMIN_TOKEN).unwrap(),
        worker_id: "test-worker".into(),
        endpoints: vec![node.address.clone()],
        slots: 2,
        lease_wait_ms: 1_000,
        heartbeat_interval_ms: 200,
        tls: Some(common::client_tls(Some(common::worker_certificate(
            "test-worker",
        )))),
        ..WorkerSettings::default()
    }
}

fn unchanged() -> v1::RunResult {
    v1::RunResult {
        outcome: AttemptOutcome::Unchanged as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_attempt_becomes_a_failed_attempt_and_is_retried_never_hung() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let executor: Executor = Arc::new(|lease: v1::Lease, _cancelled, _deadline| {
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
        assert_eq!(attempt.outcome(), AttemptOutcome::Infrastructure);
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
            move |_lease: v1::Lease,
                  mut cancelled: tokio::sync::watch::Receiver<bool>,
                  _deadline: LeaseDeadline| {
                let (started, stopped) = (started.clone(), stopped.clone());
                Box::pin(async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    let _ =
                        tokio::time::timeout(Duration::from_secs(60), cancelled.wait_for(|c| *c))
                            .await;
                    stopped.fetch_add(1, Ordering::SeqCst);
                    v1::RunResult {
                        outcome: AttemptOutcome::Cancelled as i32,
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

/// `kill -<signal> <pid>`.
fn signal(node: &Node, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), node.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_whose_lease_cannot_be_renewed_is_stopped_by_the_worker() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    common::write_config(
        &config,
        "[limits]\nlease_ttl_ms = 3000\nlease_grace_after_election_ms = 0\n\
         [worker]\nheartbeat_interval_ms = 500\n",
    );
    let node = Node::start(
        &root.path().join("node"),
        &["--no-worker", "--config", config.to_str().unwrap()],
    )
    .await;
    // Attempt 1 works until it is stopped and records how much of its lease was left then.
    let stopped_with: Arc<std::sync::Mutex<Option<std::time::Duration>>> = Arc::default();
    let executor: Executor = {
        let stopped_with = stopped_with.clone();
        Arc::new(
            move |lease: v1::Lease,
                  mut cancelled: tokio::sync::watch::Receiver<bool>,
                  deadline: LeaseDeadline| {
                let stopped_with = stopped_with.clone();
                Box::pin(async move {
                    if lease.attempt == 1 {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(60),
                            cancelled.wait_for(|c| *c),
                        )
                        .await;
                        *stopped_with.lock().unwrap() = Some(deadline.remaining());
                    }
                    unchanged()
                })
            },
        )
    };
    let worker = start_with_executor(
        WorkerSettings {
            token: flotilla_worker::client_auth::BearerToken::new(common::ADMIN_TOKEN).unwrap(),
            heartbeat_interval_ms: 200,
            rpc_timeout_ms: 300,
            ..settings(&node)
        },
        executor,
    )
    .await
    .unwrap();
    let mut client = node.client().await;
    let mut s = spec("renew", vec!["file:///srv/a.git".into()], "true", &[]);
    s.retry_backoff_initial_ms = 100;
    s.retry_backoff_max_ms = 100;
    let fleet = client
        .submit_fleet(v1::SubmitFleetRequest {
            spec: Some(s),
            ..Default::default()
        })
        .await
        .unwrap();
    let fleet_id = fleet.into_inner().fleet.unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fleet = client
            .get_fleet(v1::GetFleetRequest {
                fleet_id: fleet_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        if fleet.runs[0].state == v1::RunState::Running as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "the run was never leased");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cluster stops answering: heartbeats fail, nobody can tell the worker the lease is
    // lost. The worker stops the attempt on its own once its view of the lease runs out.
    signal(&node, "STOP");
    let deadline = Instant::now() + Duration::from_secs(30);
    let remaining = loop {
        if let Some(remaining) = *stopped_with.lock().unwrap() {
            break remaining;
        }
        if Instant::now() >= deadline {
            signal(&node, "CONT");
            panic!("the attempt was not stopped while its lease could not be renewed");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    signal(&node, "CONT");
    assert_eq!(
        remaining,
        Duration::ZERO,
        "stopped before its lease deadline passed"
    );
    // The run goes on: attempt 1 ended as lost (however the cluster learned it first), attempt 2
    // finished it.
    let fleet = wait_finished(&mut client, &fleet_id, &node).await;
    let run = client
        .get_run(v1::GetRunRequest {
            run_id: fleet.runs[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.state, v1::RunState::Unchanged as i32, "{run:?}");
    assert_eq!(run.attempts.len(), 2, "{run:?}");
    let first = &run.attempts[0];
    assert!(
        first.outcome() == AttemptOutcome::LeaseExpired
            || (first.outcome() == AttemptOutcome::Infrastructure
                && first.error.starts_with("lease could not be renewed")),
        "{first:?}"
    );
    worker.stop().await;
}
