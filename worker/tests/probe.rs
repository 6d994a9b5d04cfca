//! The capability probe on the real host: what it reports, and that it refuses a host without a
//! required mechanism.

mod common;

use common::test_config;
use flotilla_proto::v1::AttemptOutcome;
use flotilla_worker::probe::{LANDLOCK_REQUIRED_ABI, check_worker_start, probe};

#[tokio::test]
async fn probe_reports_what_this_host_enforces() {
    let directory = tempfile::tempdir().unwrap();
    let config = test_config(directory.path());
    let report = check_worker_start(&config)
        .await
        .unwrap_or_else(|reason| panic!("this host (deploy/env.sh) must pass the probe: {reason}"));
    println!("{report:#?}");
    assert!(
        report
            .bubblewrap_version
            .as_deref()
            .unwrap()
            .starts_with("bubblewrap")
    );
    assert!(report.bubblewrap_missing_flags.is_empty());
    assert!(report.landlock_abi >= LANDLOCK_REQUIRED_ABI);
    assert!(!report.x32_system_calls);
    assert!(report.cgroup_memory && report.cgroup_pids && report.cgroup_cpu);
    assert_eq!(report.disk_quota_method.as_deref(), Some("loop-ext4"));
    let smoke = report.smoke_test.as_ref().unwrap();
    // The smoke test runs as one of the sandbox uids: the first free one, which another test
    // of this binary running its probe at the same time may hold.
    let uid: u32 = smoke
        .split_whitespace()
        .find_map(|field| field.strip_prefix("uid="))
        .and_then(|uid| uid.parse().ok())
        .unwrap_or_else(|| panic!("no uid in {smoke}"));
    assert!(
        (config.sandbox_uid_base..config.sandbox_uid_base + config.sandbox_uid_count)
            .contains(&uid),
        "{smoke}"
    );
    assert!(smoke.contains("no_new_privs=1"), "{smoke}");
    assert!(smoke.contains("seccomp=2"), "{smoke}");
    assert!(smoke.contains("landlock=enforced"), "{smoke}");
}

#[tokio::test]
async fn probe_refuses_missing_mechanisms_unless_allowed() {
    let directory = tempfile::tempdir().unwrap();
    let mut config = test_config(directory.path());
    config.bwrap_path = "/nonexistent/bwrap".into();
    let reason = check_worker_start(&config).await.unwrap_err();
    assert!(reason.contains("bubblewrap"), "{reason}");

    let mut config = test_config(directory.path());
    config.cgroup_mount_directory = directory.path().join("no-cgroups");
    let report = probe(&config).await;
    let reason = report.refusal(&config).unwrap();
    assert!(reason.contains("allow_without_cgroup_limits"), "{reason}");
    // Allowed: the worker starts, and its test sandbox ran without limits.
    config.allow_without_cgroup_limits = true;
    let report = probe(&config).await;
    assert_eq!(report.refusal(&config), None, "{report:?}");
    assert!(!report.cgroup_memory);

    let mut config = test_config(directory.path());
    config.sandbox_uid_base = 0;
    let reason = check_worker_start(&config).await.unwrap_err();
    assert!(reason.contains("sandbox_uid_base"), "{reason}");
}

#[tokio::test]
async fn a_lease_refused_by_the_policy_check_never_runs() {
    use flotilla_proto::v1::{AgentSpec, FleetSpec, Lease};
    use flotilla_worker::actor::{LeaseCheck, sandbox_executor_with_check};
    let directory = tempfile::tempdir().unwrap();
    let config = test_config(directory.path());
    let check: LeaseCheck = std::sync::Arc::new(|lease: &Lease| {
        match lease.spec.as_ref().and_then(|spec| spec.sandbox.as_ref()) {
            Some(sandbox) if sandbox.driver == "none" => Err(
                "spec.sandbox.driver: driver \"none\" is not allowed by the operator's policy"
                    .to_owned(),
            ),
            _ => Ok(()),
        }
    });
    let executor = sandbox_executor_with_check(config.clone(), Some(check));
    let marker = directory.path().join("ran");
    let lease = Lease {
        run_id: "refused".into(),
        repository: "/nonexistent/repository".into(),
        branch: "flotilla/x".into(),
        attempt: 1,
        spec: Some(FleetSpec {
            agent: Some(AgentSpec {
                command: format!("touch {}", marker.display()),
                ..AgentSpec::default()
            }),
            sandbox: Some(flotilla_proto::v1::SandboxSpec {
                driver: "none".into(),
                ..Default::default()
            }),
            ..FleetSpec::default()
        }),
        ..Lease::default()
    };
    let (_keep, cancel) = tokio::sync::watch::channel(false);
    let deadline = flotilla_worker::lease::LeaseDeadline::fixed(
        tokio::time::Instant::now() + std::time::Duration::from_secs(60),
    );
    let result = executor(lease, cancel, deadline).await;
    assert_eq!(result.outcome(), AttemptOutcome::Infrastructure);
    assert!(!result.retryable);
    assert!(
        result
            .error
            .contains("refused by this worker's policy: spec.sandbox.driver:"),
        "{}",
        result.error
    );
    assert!(result.log_tail.contains("spec.sandbox.driver"));
    assert!(!marker.exists());
}
