//! The capability probe on the real host: what it reports, and that it refuses a host without a
//! required mechanism.

mod common;

use common::test_config;
use flotilla_worker::probe::{LANDLOCK_REQUIRED_ABI, check_worker_start, probe};

#[tokio::test]
async fn probe_reports_what_this_host_enforces() {
    let directory = tempfile::tempdir().unwrap();
    let config = test_config(directory.path());
    let report = check_worker_start(&config)
        .await
        .unwrap_or_else(|reason| panic!("this host (deploy/env.sh) must pass the probe: {reason}"));
    println!("{report:#?}");
    assert!(report.bubblewrap_version.as_deref().unwrap().starts_with("bubblewrap"));
    assert!(report.bubblewrap_missing_flags.is_empty());
    assert!(report.landlock_abi >= LANDLOCK_REQUIRED_ABI);
    assert!(!report.x32_system_calls);
    assert!(report.cgroup_memory && report.cgroup_pids && report.cgroup_cpu);
    assert_eq!(report.disk_quota_method.as_deref(), Some("loop-ext4"));
    let smoke = report.smoke_test.as_ref().unwrap();
    assert!(smoke.contains(&format!("uid={}", config.sandbox_uid_base)), "{smoke}");
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
