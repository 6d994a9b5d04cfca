//! End-to-end tests: real `flotilla server` processes (Raft on RocksDB, gRPC, local worker),
//! real git repositories with bare origins, real bubblewrap sandboxes.

mod common;

use common::{Node, git, origin_repository, spec, wait_finished};
use flotilla_proto::v1;
use flotilla_proto::v1::AttemptOutcome;

fn state_name(state: i32) -> &'static str {
    match v1::RunState::try_from(state).unwrap_or(v1::RunState::Unspecified) {
        v1::RunState::Changed => "changed",
        v1::RunState::Unchanged => "unchanged",
        v1::RunState::Failed => "failed",
        v1::RunState::Cancelled => "cancelled",
        v1::RunState::Pending => "pending",
        v1::RunState::Running => "running",
        v1::RunState::Unspecified => "unspecified",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_runs_every_repository_to_a_correct_result_and_survives_restart() {
    let root = tempfile::tempdir().unwrap();
    // The agent upper-cases "hello" in greeting.txt where it exists; verification requires no
    // lowercase "hello" to remain. Repository "plain" has nothing to change.
    let greet = origin_repository(
        root.path(),
        "greet",
        &[("greeting.txt", "hello world\n"), ("README", "x\n")],
    );
    let plain = origin_repository(root.path(), "plain", &[("README", "nothing here\n")]);
    let both = origin_repository(
        root.path(),
        "both",
        &[("greeting.txt", "hello\nhello again\n")],
    );
    let agent = "if [ -f greeting.txt ]; then sed -i 's/hello/HELLO/g' greeting.txt; fi; echo \"task: $FLOTILLA_TASK\"";
    let verify = ["! grep -q hello greeting.txt 2>/dev/null"];
    let data = root.path().join("node");
    let mut node = Node::start(&data, &[]).await;
    let mut client = node.client().await;
    let request = v1::SubmitFleetRequest {
        dry_run: false,
        spec: Some(spec(
            "upcase",
            vec![greet.clone(), plain, both.clone()],
            agent,
            &verify,
        )),
        idempotency_key: "e2e-1".into(),
    };
    let submitted = client
        .submit_fleet(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(submitted.created);
    let fleet_id = submitted.fleet.unwrap().id;
    let fleet = wait_finished(&mut client, &fleet_id, &node).await;
    assert_eq!(fleet.state, v1::FleetState::Finished as i32);
    let states: Vec<&str> = fleet.runs.iter().map(|r| state_name(r.state)).collect();
    assert_eq!(
        states,
        vec!["changed", "unchanged", "changed"],
        "{fleet:?}\n{}",
        node.log_text()
    );
    let counts = fleet.counts.unwrap();
    assert_eq!(
        (
            counts.changed,
            counts.unchanged,
            counts.failed,
            counts.total
        ),
        (2, 1, 0, 3)
    );

    // The change is committed on the branch and pushed to the bare origin.
    let run = client
        .get_run(v1::GetRunRequest {
            run_id: fleet.runs[2].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(run.pushed);
    assert_eq!(run.branch, "flotilla/upcase");
    assert_eq!(run.diffstat.len(), 1);
    assert_eq!(
        (
            run.diffstat[0].path.as_str(),
            run.diffstat[0].insertions,
            run.diffstat[0].deletions
        ),
        ("greeting.txt", 2, 2)
    );
    assert!(run.patch.contains("+HELLO again"), "{}", run.patch);
    let bare = std::path::PathBuf::from(both.trim_start_matches("file://"));
    let pushed = git(&bare, &["show", "flotilla/upcase:greeting.txt"]);
    assert_eq!(pushed, "HELLO\nHELLO again\n");
    assert_eq!(
        git(&bare, &["rev-parse", "flotilla/upcase"]).trim(),
        run.commit
    );
    assert_eq!(run.attempts.len(), 1);
    assert!(
        run.attempts[0].log_tail.contains("task: test task"),
        "{:?}",
        run.attempts[0]
    );

    // Same idempotency key: same fleet, no second one.
    let again = client
        .submit_fleet(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.fleet.unwrap().id, fleet_id);

    // kill -9 and restart on the same data directory: every fleet and result is still there.
    node.kill();
    let node = Node::start(&data, &[]).await;
    let mut client = node.client().await;
    let after = client
        .get_fleet(v1::GetFleetRequest {
            fleet_id: fleet_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.runs, fleet.runs);
    assert_eq!(after.counts, fleet.counts);
    let again = client
        .submit_fleet(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!again.created, "idempotency survives restart");
    // Patches and log tails live outside the replicated state; GetRun still returns them after
    // a restart, and the state's digest describes the bytes.
    let restarted = client
        .get_run(v1::GetRunRequest {
            run_id: run.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restarted.patch, run.patch);
    assert_eq!(restarted.attempts[0].log_tail, run.attempts[0].log_tail);
    assert_eq!(restarted.patch_size_bytes, run.patch.len() as u64);
    assert_eq!(
        restarted.patch_sha256,
        flotilla_scheduler::artifact::sha256_hex(run.patch.as_bytes())
    );
    // Artifact transfer is node to node: only a node certificate of the cluster may ask.
    let without_node_certificate = common::cluster_client(&node.address)
        .await
        .get_artifact(v1::GetArtifactRequest {
            run_id: run.id.clone(),
            attempt: 1,
            kind: v1::ArtifactKind::Patch as i32,
        })
        .await
        .expect_err("a client without a node certificate");
    assert_eq!(
        without_node_certificate.code(),
        tonic::Code::PermissionDenied
    );
    let mut cluster = flotilla_proto::v1::cluster_service_client::ClusterServiceClient::new(
        common::tls_channel(&node.address, Some(common::node_certificate(1)))
            .await
            .expect("node certificate channel"),
    );
    let artifact = |attempt, kind: v1::ArtifactKind| v1::GetArtifactRequest {
        run_id: run.id.clone(),
        attempt,
        kind: kind as i32,
    };
    let stored = cluster
        .get_artifact(artifact(1, v1::ArtifactKind::Patch))
        .await
        .unwrap()
        .into_inner();
    assert!(stored.found);
    assert_eq!(stored.data, run.patch.as_bytes());
    let absent = cluster
        .get_artifact(artifact(2, v1::ArtifactKind::Patch))
        .await
        .unwrap()
        .into_inner();
    assert!(!absent.found && absent.data.is_empty());
    let invalid = cluster
        .get_artifact(artifact(1, v1::ArtifactKind::Unspecified))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);
    assert!(invalid.message().starts_with("kind:"), "{invalid}");
    // The same key with another spec is refused, naming the key and the first fleet.
    let mut other = request;
    if let Some(spec) = other.spec.as_mut() {
        spec.commit_message = "another change".into();
    }
    let conflict = client.submit_fleet(other).await.unwrap_err();
    assert_eq!(conflict.code(), tonic::Code::AlreadyExists);
    assert!(
        conflict.message().starts_with("idempotency_key:")
            && conflict.message().contains(&fleet_id),
        "{conflict}"
    );
    let listed = client
        .list_fleets(v1::ListFleetsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.fleets.len(), 1);
    // The event stream replays from the start and ends with the fleet's final event.
    let mut stream = client
        .watch_fleet(v1::WatchFleetRequest {
            fleet_id: fleet_id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut sequences = Vec::new();
    let mut last = None;
    while let Some(event) = stream.message().await.unwrap() {
        sequences.push(event.sequence);
        last = Some(event);
    }
    assert_eq!(sequences, (1..=sequences.len() as u64).collect::<Vec<_>>());
    assert!(
        last.unwrap()
            .message
            .starts_with("fleet finished: 2 changed, 1 unchanged, 0 failed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_timed_out_agents_give_failed_runs_with_their_logs() {
    let root = tempfile::tempdir().unwrap();
    let repository = origin_repository(root.path(), "repo", &[("file.txt", "content\n")]);
    let node = Node::start(&root.path().join("node"), &[]).await;
    let mut client = node.client().await;

    let failing = spec(
        "failing",
        vec![repository.clone()],
        "echo about to fail; echo oops >&2; exit 7",
        &[],
    );
    let fleet = client
        .submit_fleet(v1::SubmitFleetRequest {
            spec: Some(failing),
            ..Default::default()
        })
        .await
        .unwrap();
    let fleet = wait_finished(&mut client, &fleet.into_inner().fleet.unwrap().id, &node).await;
    let run = client
        .get_run(v1::GetRunRequest {
            run_id: fleet.runs[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_name(run.state), "failed");
    assert_eq!(
        run.attempts.len(),
        1,
        "agent failures are final, not retried"
    );
    assert_eq!(run.attempts[0].outcome(), AttemptOutcome::AgentFailed);
    assert_eq!(run.attempts[0].exit_code, 7);
    assert!(
        run.attempts[0].log_tail.contains("about to fail")
            && run.attempts[0].log_tail.contains("oops")
    );

    let mut slow = spec(
        "slow",
        vec![repository.clone()],
        "sleep 600 & sleep 601; wait",
        &[],
    );
    slow.sandbox.as_mut().unwrap().timeout_ms = 1_500;
    let fleet = client
        .submit_fleet(v1::SubmitFleetRequest {
            spec: Some(slow),
            ..Default::default()
        })
        .await
        .unwrap();
    let fleet = wait_finished(&mut client, &fleet.into_inner().fleet.unwrap().id, &node).await;
    let run = client
        .get_run(v1::GetRunRequest {
            run_id: fleet.runs[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        run.attempts[0].outcome(),
        AttemptOutcome::TimedOut,
        "{run:?}"
    );
    // The whole process tree was killed.
    let survivors = std::process::Command::new("pgrep")
        .args(["-f", "sleep 60[01]"])
        .output()
        .unwrap();
    assert!(
        survivors.stdout.is_empty(),
        "left running: {}",
        String::from_utf8_lossy(&survivors.stdout)
    );

    let verify_fails = spec(
        "verify",
        vec![repository],
        "true",
        &["echo checking; exit 3"],
    );
    let fleet = client
        .submit_fleet(v1::SubmitFleetRequest {
            spec: Some(verify_fails),
            ..Default::default()
        })
        .await
        .unwrap();
    let fleet = wait_finished(&mut client, &fleet.into_inner().fleet.unwrap().id, &node).await;
    let run = client
        .get_run(v1::GetRunRequest {
            run_id: fleet.runs[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.attempts[0].outcome(), AttemptOutcome::VerifyFailed);
    assert!(run.attempts[0].log_tail.contains("checking"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_repository_is_retried_then_fails_with_its_reason() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &[]).await;
    let mut client = node.client().await;
    let missing = format!("file://{}/does-not-exist.git", root.path().display());
    let mut s = spec("missing", vec![missing], "true", &[]);
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
    let run = client
        .get_run(v1::GetRunRequest {
            run_id: fleet.runs[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_name(run.state), "failed");
    assert_eq!(run.attempts.len(), 2, "retried up to max_attempts");
    assert!(
        run.attempts
            .iter()
            .all(|a| a.outcome() == AttemptOutcome::Infrastructure)
    );
    assert!(!run.attempts[1].error.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_rejected_with_the_field_named() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let mut client = node.client().await;
    let check = |result: Result<tonic::Response<v1::SubmitFleetResponse>, tonic::Status>| {
        let status = result.expect_err("must be rejected");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        status.message().to_string()
    };
    let valid = spec("ok", vec!["file:///srv/a.git".into()], "true", &[]);
    let mut bad = valid.clone();
    bad.repositories.push("not a url".into());
    let message = check(
        client
            .submit_fleet(v1::SubmitFleetRequest {
                spec: Some(bad),
                ..Default::default()
            })
            .await,
    );
    assert!(message.starts_with("spec.repositories[1]:"), "{message}");
    let mut bad = valid.clone();
    bad.sandbox.as_mut().unwrap().driver = "docker".into();
    let message = check(
        client
            .submit_fleet(v1::SubmitFleetRequest {
                spec: Some(bad),
                ..Default::default()
            })
            .await,
    );
    assert!(message.starts_with("spec.sandbox.driver:"), "{message}");
    let message = check(
        client
            .submit_fleet(v1::SubmitFleetRequest {
                dry_run: false,
                spec: Some(valid.clone()),
                idempotency_key: "k".repeat(129),
            })
            .await,
    );
    assert!(message.starts_with("idempotency_key:"), "{message}");
    let status = client
        .get_run(v1::GetRunRequest {
            run_id: "nonsense".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().starts_with("run_id:"));
    let status = client
        .get_fleet(v1::GetFleetRequest {
            fleet_id: "fl-99".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);

    let mut workers = common::worker_client(&node.address).await;
    let status = workers
        .lease_runs(v1::LeaseRunsRequest {
            worker_id: "w".into(),
            free_slots: 0,
            wait_ms: 0,
            held: Vec::new(),
        })
        .await
        .unwrap_err();
    assert!(status.message().starts_with("free_slots:"), "{status:?}");
    let status = workers
        .report_result(v1::ReportResultRequest {
            worker_id: "w".into(),
            run_id: "fl-1-0".into(),
            attempt: 1,
            result: Some(v1::RunResult {
                outcome: 42,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(status.message(), "result.outcome: unknown outcome 42");
    // Nothing was created by the rejected requests.
    let listed = client
        .list_fleets(v1::ListFleetsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.fleets.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_attempt_result_is_rejected_and_the_lease_is_fenced() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let mut client = node.client().await;
    let s = spec("fenced", vec!["file:///srv/a.git".into()], "true", &[]);
    client
        .submit_fleet(v1::SubmitFleetRequest {
            spec: Some(s),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut workers = common::worker_client(&node.address).await;
    let leased = workers
        .lease_runs(v1::LeaseRunsRequest {
            worker_id: "w1".into(),
            free_slots: 4,
            wait_ms: 5_000,
            held: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(leased.leases.len(), 1);
    let lease = &leased.leases[0];
    assert_eq!(lease.attempt, 1);
    let unchanged = v1::RunResult {
        outcome: AttemptOutcome::Unchanged as i32,
        ..Default::default()
    };
    let report = |worker: &str, attempt: u32| v1::ReportResultRequest {
        worker_id: worker.into(),
        run_id: lease.run_id.clone(),
        attempt,
        result: Some(unchanged.clone()),
    };
    // A result that is not applied is an error (FAILED_PRECONDITION naming why), never an
    // answer a caller could take for success.
    let stale = workers.report_result(report("w1", 2)).await.unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        stale.message(),
        "result not applied: stale attempt 2, current 1"
    );
    let wrong_worker = workers.report_result(report("w2", 1)).await.unwrap_err();
    assert_eq!(wrong_worker.code(), tonic::Code::FailedPrecondition);
    assert!(
        wrong_worker.message().contains("does not hold the lease"),
        "{}",
        wrong_worker.message()
    );
    let accepted = workers
        .report_result(report("w1", 1))
        .await
        .unwrap()
        .into_inner();
    assert!(accepted.accepted);
    let duplicate = workers.report_result(report("w1", 1)).await.unwrap_err();
    assert_eq!(
        duplicate.code(),
        tonic::Code::FailedPrecondition,
        "a result is applied once"
    );
    let heartbeat = workers
        .heartbeat(v1::HeartbeatRequest {
            worker_id: "w1".into(),
            leases: vec![v1::HeldLease {
                run_id: lease.run_id.clone(),
                attempt: 1,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        heartbeat.lost.len(),
        1,
        "a finished run's lease is no longer held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_reply_costs_neither_an_attempt_nor_a_lease_ttl() {
    let root = tempfile::tempdir().unwrap();
    let repository = origin_repository(root.path(), "lost", &[("greeting.txt", "hello\n")]);
    // Leases live 10 minutes: a run that waited for its lease to expire would not finish
    // within wait_finished's deadline.
    let config = root.path().join("node.toml");
    common::write_config(&config, "[limits]\nlease_ttl_ms = 600000\n");
    let node = Node::start(
        &root.path().join("node"),
        &["--no-worker", "--config", config.to_str().unwrap()],
    )
    .await;
    // A real worker (sandbox, git) whose first lease reply is discarded after it arrived: the
    // cluster committed the grant, the worker never saw it.
    let worker = flotilla_worker::actor::start(
        flotilla_worker::actor::WorkerSettings {
            token: flotilla_worker::client_auth::BearerToken::new(common::ADMIN_TOKEN).unwrap(),
            worker_id: "lossy".into(),
            endpoints: vec![node.address.clone()],
            slots: 2,
            lease_wait_ms: 1_000,
            heartbeat_interval_ms: 200,
            fault_drop_lease_replies: 1,
            tls: Some(common::client_tls(Some(common::worker_certificate(
                "lossy",
            )))),
            ..Default::default()
        },
        flotilla_worker::config::WorkerConfig {
            work_directory: root.path().join("worker"),
            // This test binary is not the node binary: use the node binary's sandbox init.
            sandbox_init_path: Some(env!("CARGO_BIN_EXE_flotilla").into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut client = node.client().await;
    let mut s = spec(
        "lost",
        vec![repository.clone()],
        "sed -i 's/hello/HELLO/' greeting.txt",
        &[],
    );
    s.max_attempts = 1;
    let fleet = client
        .submit_fleet(v1::SubmitFleetRequest {
            spec: Some(s),
            ..Default::default()
        })
        .await
        .unwrap();
    let fleet = wait_finished(&mut client, &fleet.into_inner().fleet.unwrap().id, &node).await;
    let run = client
        .get_run(v1::GetRunRequest {
            run_id: fleet.runs[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state_name(run.state), "changed", "{run:?}");
    assert_eq!(run.attempts.len(), 1, "{run:?}");
    assert_eq!(run.attempts[0].number, 1);
    assert!(run.pushed);
    let bare = std::path::PathBuf::from(repository.trim_start_matches("file://"));
    assert_eq!(
        git(&bare, &["rev-parse", "flotilla/lost"]).trim(),
        run.commit
    );
    // The reply really was lost, and the lease was sent again rather than left to expire.
    let mut events = client
        .watch_fleet(v1::WatchFleetRequest {
            fleet_id: fleet.id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut messages = Vec::new();
    while let Some(event) = events.message().await.unwrap() {
        messages.push(event.message);
    }
    assert!(
        messages
            .iter()
            .any(|m| m == "attempt 1 lease sent again to lossy, which had not received it"),
        "{messages:?}"
    );
    assert!(
        !messages.iter().any(|m| m.contains("lease_expired")),
        "{messages:?}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_outside_the_prefix_are_rejected_at_submission() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let mut client = node.client().await;
    let mut bad = spec("main", vec!["file:///srv/a.git".into()], "true", &[]);
    bad.branch_template = "main".into();
    let status = client
        .submit_fleet(v1::SubmitFleetRequest {
            spec: Some(bad),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        status.message(),
        "spec.branch_template: \"main\" for repositories[0]: \"main\" is not under the branch prefix \"flotilla/\" (limits.branch_prefix)"
    );
}
