//! Authentication and authorisation against a real node process: every RPC of the permission
//! table without a token, with a token of each role and with a revoked token; projects; worker
//! identity binding; results from a worker that does not hold the lease; the audit log.

mod common;

use flotilla_proto::v1::AttemptOutcome;
use std::time::{Duration, Instant};

use common::{ADMIN_TOKEN, Node, origin_repository, spec, with_token};
use flotilla::api::auth::{METHOD_REQUIREMENTS, Requirement};
use flotilla_proto::v1;
use flotilla_proto::v1::audit_service_client::AuditServiceClient;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_proto::v1::token_service_client::TokenServiceClient;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;
use flotilla_scheduler::Role;
use tonic::Code;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

async fn channel(node: &Node) -> Channel {
    common::channel(&node.address).await
}

/// Calls `path` with an empty request (every field at its default), with `token` or none;
/// returns the status code.
async fn call(channel: &Channel, path: &str, token: Option<&str>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(());
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let codec: tonic_prost::ProstCodec<(), ()> = tonic_prost::ProstCodec::default();
    match grpc
        .unary(request, PathAndQuery::try_from(path).unwrap(), codec)
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn create_token(
    channel: &Channel,
    name: &str,
    role: &str,
    project: &str,
    worker_id: &str,
) -> String {
    TokenServiceClient::new(with_token(channel.clone(), ADMIN_TOKEN))
        .create_token(v1::CreateTokenRequest {
            name: name.into(),
            role: role.into(),
            project: project.into(),
            worker_id: worker_id.into(),
            ttl_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .secret_token
}

fn accessor(token: &str) -> String {
    flotilla_scheduler::token::parse_token(token)
        .unwrap()
        .accessor_id
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_is_denied_without_a_token_and_allowed_exactly_by_the_roles_permission() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let channel = channel(&node).await;
    let tokens = [
        (
            Role::Viewer,
            create_token(&channel, "v", "viewer", "a", "").await,
        ),
        (
            Role::Submitter,
            create_token(&channel, "s", "submitter", "a", "").await,
        ),
        (
            Role::Operator,
            create_token(&channel, "o", "operator", "a", "").await,
        ),
        (
            Role::Admin,
            create_token(&channel, "ad", "admin", "", "").await,
        ),
        (
            Role::Worker,
            create_token(&channel, "w", "worker", "", "w1").await,
        ),
    ];
    let revoked = create_token(&channel, "gone", "admin", "", "").await;
    TokenServiceClient::new(with_token(channel.clone(), ADMIN_TOKEN))
        .revoke_token(v1::RevokeTokenRequest {
            accessor_id: accessor(&revoked),
        })
        .await
        .unwrap();
    let malformed = "flotilla_not-a-token";
    let mut checked = 0;
    for (path, requirement) in METHOD_REQUIREMENTS {
        let permission = match requirement {
            // Node methods are for nodes (insecure mode here: no identities); open ones for all.
            Requirement::Node | Requirement::RaftTransport | Requirement::Open => continue,
            Requirement::Authenticated => None,
            Requirement::Permission(permission) => Some(*permission),
        };
        for token in [None, Some(revoked.as_str()), Some(malformed)] {
            assert_eq!(
                call(&channel, path, token).await,
                Code::Unauthenticated,
                "{path} with {token:?}"
            );
        }
        for (role, token) in &tokens {
            let code = call(&channel, path, Some(token)).await;
            let allowed = permission.is_none_or(|p| role.grants(p));
            if allowed {
                assert!(
                    !matches!(code, Code::PermissionDenied | Code::Unauthenticated),
                    "{path} as {role:?}: {code:?}"
                );
            } else {
                assert_eq!(code, Code::PermissionDenied, "{path} as {role:?}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 5 * 19, "{checked}");
    // A method outside the table is denied, not served.
    assert_eq!(
        call(
            &channel,
            "/flotilla.v1.FleetService/NoSuchMethod",
            Some(ADMIN_TOKEN)
        )
        .await,
        Code::PermissionDenied
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_bound_tokens_and_workers_report_only_on_leases_they_hold() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let channel = channel(&node).await;
    let submitter_a = create_token(&channel, "sa", "submitter", "a", "").await;
    let other_submitter_a = create_token(&channel, "sa2", "submitter", "a", "").await;
    let operator_a = create_token(&channel, "oa", "operator", "a", "").await;
    let viewer_a = create_token(&channel, "va", "viewer", "a", "").await;
    let submitter_b = create_token(&channel, "sb", "submitter", "b", "").await;
    let worker_1 = create_token(&channel, "w1", "worker", "", "w1").await;
    let worker_2 = create_token(&channel, "w2", "worker", "", "w2").await;
    let fleets = |token: &str| FleetServiceClient::new(with_token(channel.clone(), token));
    let workers = |token: &str| WorkerServiceClient::new(with_token(channel.clone(), token));
    let origin = origin_repository(root.path(), "a", &[("README", "a\n")]);
    let submit = |project: &str| v1::SubmitFleetRequest {
        spec: Some(v1::FleetSpec {
            project: project.into(),
            ..spec("f", vec![origin.clone()], "true", &[])
        }),
        idempotency_key: String::new(),
        dry_run: false,
    };

    // A submitter of project a submits in a, not in b.
    let fleet_a = fleets(&submitter_a)
        .submit_fleet(submit("a"))
        .await
        .unwrap()
        .into_inner()
        .fleet
        .unwrap();
    let denied = fleets(&submitter_a)
        .submit_fleet(submit("b"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        denied.message().contains("fleet.submit"),
        "{}",
        denied.message()
    );
    let fleet_b = fleets(&submitter_b)
        .submit_fleet(submit("b"))
        .await
        .unwrap()
        .into_inner()
        .fleet
        .unwrap();

    // Project b's submitter cannot read or cancel project a's fleet, and does not list it.
    let get = |id: &str| v1::GetFleetRequest {
        fleet_id: id.into(),
    };
    assert_eq!(
        fleets(&submitter_b)
            .get_fleet(get(&fleet_a.id))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        fleets(&submitter_b)
            .get_run(v1::GetRunRequest {
                run_id: format!("{}-0", fleet_a.id),
            })
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        fleets(&submitter_b)
            .list_runs(v1::ListRunsRequest {
                fleet_id: fleet_a.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let cancel = |id: &str| v1::CancelFleetRequest {
        fleet_id: id.into(),
    };
    assert_eq!(
        fleets(&submitter_b)
            .cancel_fleet(cancel(&fleet_a.id))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let listed = |token: String| {
        let mut client = fleets(&token);
        async move {
            client
                .list_fleets(v1::ListFleetsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .fleets
                .into_iter()
                .map(|f| f.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed(submitter_b.clone()).await, vec![fleet_b.id.clone()]);
    assert_eq!(listed(viewer_a.clone()).await, vec![fleet_a.id.clone()]);
    assert_eq!(
        listed(ADMIN_TOKEN.to_string()).await,
        vec![fleet_b.id.clone(), fleet_a.id.clone()]
    );
    // The viewer reads but cannot cancel.
    fleets(&viewer_a).get_fleet(get(&fleet_a.id)).await.unwrap();
    assert_eq!(
        fleets(&viewer_a)
            .cancel_fleet(cancel(&fleet_a.id))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Workers: bound to their worker id; a result only from the lease holder.
    let lease_request = |worker_id: &str| v1::LeaseRunsRequest {
        worker_id: worker_id.into(),
        free_slots: 1,
        wait_ms: 1_000,
        held: Vec::new(),
    };
    let as_other = workers(&worker_1)
        .lease_runs(lease_request("w2"))
        .await
        .unwrap_err();
    assert_eq!(as_other.code(), Code::PermissionDenied);
    assert!(as_other.message().contains("w1"), "{}", as_other.message());
    let deadline = Instant::now() + Duration::from_secs(30);
    let lease = loop {
        let leases = workers(&worker_1)
            .lease_runs(lease_request("w1"))
            .await
            .unwrap()
            .into_inner()
            .leases;
        if let Some(lease) = leases.into_iter().next() {
            break lease;
        }
        assert!(Instant::now() < deadline, "no lease for w1");
    };
    let report = |worker_id: &str| v1::ReportResultRequest {
        worker_id: worker_id.into(),
        run_id: lease.run_id.clone(),
        attempt: lease.attempt,
        result: Some(v1::RunResult {
            outcome: AttemptOutcome::Unchanged as i32,
            ..Default::default()
        }),
    };
    // Worker 2 reports on worker 1's lease as itself: not applied, an error.
    let not_holder = workers(&worker_2)
        .report_result(report("w2"))
        .await
        .unwrap_err();
    assert_eq!(not_holder.code(), Code::FailedPrecondition);
    assert!(
        not_holder.message().contains("does not hold the lease"),
        "{}",
        not_holder.message()
    );
    // ... or claiming to be worker 1.
    assert_eq!(
        workers(&worker_2)
            .report_result(report("w1"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let accepted = workers(&worker_1)
        .report_result(report("w1"))
        .await
        .unwrap()
        .into_inner();
    assert!(accepted.accepted);

    // Cancelling: not another submitter's fleet, but an operator cancels any of its project.
    let fleet_a2 = fleets(&submitter_a)
        .submit_fleet(submit("a"))
        .await
        .unwrap()
        .into_inner()
        .fleet
        .unwrap();
    let not_own = fleets(&other_submitter_a)
        .cancel_fleet(cancel(&fleet_a2.id))
        .await
        .unwrap_err();
    assert_eq!(not_own.code(), Code::PermissionDenied);
    assert!(
        not_own.message().contains("fleet.cancel_any"),
        "{}",
        not_own.message()
    );
    fleets(&operator_a)
        .cancel_fleet(cancel(&fleet_a2.id))
        .await
        .unwrap();
    fleets(&submitter_b)
        .cancel_fleet(cancel(&fleet_b.id))
        .await
        .unwrap();

    // A revoked token stops working at once on this node.
    TokenServiceClient::new(with_token(channel.clone(), ADMIN_TOKEN))
        .revoke_token(v1::RevokeTokenRequest {
            accessor_id: accessor(&submitter_b),
        })
        .await
        .unwrap();
    let revoked = fleets(&submitter_b)
        .get_fleet(get(&fleet_b.id))
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), Code::Unauthenticated);
    assert!(
        revoked.message().contains("revoked"),
        "{}",
        revoked.message()
    );

    // The audit log: every change with its principal, rejections included, no secret; the
    // chain verifies, here and after a restart.
    let audit = |channel: Channel| async move {
        AuditServiceClient::new(with_token(channel, ADMIN_TOKEN))
            .list_audit_records(v1::ListAuditRecordsRequest {
                after_sequence: 0,
                page_size: 10_000,
            })
            .await
            .unwrap()
            .into_inner()
    };
    let before = audit(channel.clone()).await;
    assert_eq!(
        flotilla::cli::audit::verify_chain(&before.anchor_hash, &before.records),
        Ok(before.records.len() as u64)
    );
    let principal_a = format!("token:{}(sa,submitter)", accessor(&submitter_a));
    assert!(before.records.iter().any(|r| r.action == "submit_fleet"
        && r.principal == principal_a
        && r.target.contains(&fleet_a.id)
        && r.outcome == "accepted"));
    assert!(before.records.iter().any(|r| r.action == "report_result"
        && r.outcome == "rejected"
        && r.principal.contains("(w2,worker)")));
    assert!(before.records.iter().any(|r| r.action == "bootstrap_token"
        && r.principal.starts_with("node:")
        && r.outcome == "accepted"));
    let text = format!("{:?}", before.records);
    for secret in [&submitter_a, &worker_1, &worker_2, &operator_a, ADMIN_TOKEN] {
        let secret_part = secret.rsplit('_').next().unwrap();
        assert!(!text.contains(secret_part), "a secret is in the audit log");
    }
    // Tampering with one record is detected.
    let mut tampered = before.records.clone();
    tampered[1].target.push('x');
    assert!(flotilla::cli::audit::verify_chain(&before.anchor_hash, &tampered).is_err());
    // The CLI verifies and exports.
    let cli = |arguments: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .env("FLOTILLA_TOKEN", ADMIN_TOKEN)
            .env("FLOTILLA_CA_FILE", common::ca_file())
            .args(["--address", &node.address])
            .args(arguments)
            .output()
            .unwrap()
    };
    let verified = cli(&["audit", "verify"]);
    assert_eq!(
        verified.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    let exported = cli(&["audit", "export", "--output", "json"]);
    let lines = String::from_utf8_lossy(&exported.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .count();
    assert!(lines >= before.records.len(), "{lines}");
    let denied = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .env("FLOTILLA_TOKEN", &viewer_a)
        .env("FLOTILLA_CA_FILE", common::ca_file())
        .args(["--address", &node.address, "audit", "verify"])
        .output()
        .unwrap();
    assert_eq!(denied.status.code(), Some(7));

    let data_directory = node.data_directory.clone();
    drop(node);
    let restarted = Node::start(&data_directory, &["--no-worker"]).await;
    let after = audit(channel_of(&restarted).await).await;
    assert!(after.records.len() >= before.records.len());
    assert_eq!(after.records[..before.records.len()], before.records[..]);
    assert_eq!(
        flotilla::cli::audit::verify_chain(&after.anchor_hash, &after.records),
        Ok(after.records.len() as u64)
    );
}

async fn channel_of(node: &Node) -> Channel {
    channel(node).await
}
