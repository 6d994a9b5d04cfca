//! The sandbox escape suite: hostile agent scripts (`tests/escape/*.sh`) against the real
//! bubblewrap sandbox (unprivileged uid, Landlock, seccomp, cgroups) on the real kernel, plus
//! hostile agents in whole attempts against host-side git (symbolic links to host files, a
//! `.gitattributes` filter driver, a nested `.git` pointing at another host repository).
//!
//! Every case must be blocked; the test prints a table (case, blocked?, how recorded). Run with
//! `cargo test -p flotilla-worker --test escape -- --nocapture` to see it.

mod common;

use flotilla_proto::v1::AttemptOutcome;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::bait::kernel_denials;
use common::{make_origin, run, sandbox_command, test_config};
use flotilla_proto::v1::{AgentSpec, FleetSpec, Lease, RunResult, SandboxSpec};
use flotilla_worker::config::WorkerConfig;
use flotilla_worker::execute::execute_attempt_with_token;
use flotilla_worker::lease::LeaseDeadline;
use flotilla_worker::sandbox::{SandboxDriver, SandboxOutcome};
use tokio_util::sync::CancellationToken;

const CANARY_NAME: &str = "FLOTILLA_ESCAPE_CANARY";

/// How a case is expected to end.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// `RESULT blocked: ...`.
    Blocked,
    /// `RESULT allowed: ...` (shown for what it tells, not an escape).
    Allowed,
}

struct Row {
    case: String,
    passed: bool,
    verdict: String,
    recorded: String,
}

fn scripts_directory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/escape")
}

/// A workspace `ws/` with a `.git/` (hooks and config), as an attempt's clone has.
fn workspace(root: &Path, name: &str) -> PathBuf {
    let workspace = root.join(name);
    std::fs::create_dir_all(workspace.join(".git/hooks")).unwrap();
    std::fs::write(workspace.join(".git/config"), "[core]\n").unwrap();
    std::fs::write(workspace.join("file.txt"), "hello\n").unwrap();
    workspace
}

fn result_line(outcome: &SandboxOutcome) -> Option<String> {
    outcome
        .log_tail
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("RESULT ").map(str::to_owned))
}

/// The text of case `name` (`tests/escape/<name>.sh`).
fn script(name: &str) -> String {
    std::fs::read_to_string(scripts_directory().join(format!("{name}.sh"))).unwrap()
}

async fn run_script(
    config: &WorkerConfig,
    root: &Path,
    name: &str,
    adjust: impl FnOnce(&mut flotilla_worker::sandbox::SandboxCommand),
) -> SandboxOutcome {
    let script = script(name);
    let workspace = workspace(root, name);
    let mut command = sandbox_command(&workspace, &script);
    command.label = name.to_owned();
    command.environment.extend([
        ("ESCAPE_HOST_PID".to_owned(), std::process::id().to_string()),
        (
            "ESCAPE_HOST_PATH".to_owned(),
            config.work_directory.display().to_string(),
        ),
        ("ESCAPE_CANARY_NAME".to_owned(), CANARY_NAME.to_owned()),
    ]);
    adjust(&mut command);
    let (result, _log) = run(config, SandboxDriver::Bubblewrap, &command).await;
    result.unwrap_or_else(|error| panic!("case {name}: the sandbox failed: {error}"))
}

/// The worker's own record of what the kernel refused (`seccomp ptrace x1, ...`), or `-`.
fn kernel_record(outcome: &SandboxOutcome) -> String {
    if outcome.denials.is_empty() {
        return "-".to_owned();
    }
    outcome
        .denials
        .iter()
        .map(|denial| format!("{} {} x{}", denial.mechanism, denial.action, denial.count))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether the worker recorded every action of `required` (by exact action name).
fn recorded_all(outcome: &SandboxOutcome, required: &[&str]) -> bool {
    required.iter().all(|action| {
        outcome
            .denials
            .iter()
            .any(|denial| denial.action == *action && denial.count > 0)
    })
}

fn row_for(name: &str, expect: Expect, outcome: &SandboxOutcome, extra: &str) -> Row {
    let line = result_line(outcome);
    let (passed, verdict, recorded) = match (&line, expect) {
        (Some(line), Expect::Blocked) if line.starts_with("blocked:") => (
            true,
            "blocked".to_owned(),
            line["blocked:".len()..].trim().to_owned(),
        ),
        (Some(line), Expect::Allowed) if line.starts_with("allowed:") => (
            true,
            "allowed (by design)".to_owned(),
            line["allowed:".len()..].trim().to_owned(),
        ),
        (Some(line), _) => (false, "NOT BLOCKED".to_owned(), line.clone()),
        (None, _) => (
            false,
            "no result".to_owned(),
            format!("{}: {}", outcome.describe(), outcome.log_tail),
        ),
    };
    Row {
        case: name.to_owned(),
        passed,
        verdict,
        recorded: format!(
            "{recorded}{extra} [worker record: {}]",
            kernel_record(outcome)
        ),
    }
}

fn attempt_lease(repository: &str, run_id: &str, agent: &str, env: &[(&str, &str)]) -> Lease {
    Lease {
        run_id: run_id.to_owned(),
        fleet_id: "fleet-escape".to_owned(),
        fleet_name: "escape".to_owned(),
        repository: repository.to_owned(),
        attempt: 1,
        branch: "flotilla/escape".to_owned(),
        trace_parent: String::new(),
        secrets: Default::default(),
        secrets_error: String::new(),
        secrets_error_retryable: false,
        spec: Some(FleetSpec {
            name: "escape".to_owned(),
            project: String::new(),
            repositories: vec![repository.to_owned()],
            agent: Some(AgentSpec {
                command: agent.to_owned(),
                task: "escape".to_owned(),
                env: env
                    .iter()
                    .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
                    .collect(),
                secrets: Default::default(),
            }),
            verify: Vec::new(),
            sandbox: Some(SandboxSpec {
                driver: String::new(),
                timeout_ms: 20_000,
                memory_limit_bytes: 0,
                pids_limit: 0,
                network: false,
                ..SandboxSpec::default()
            }),
            branch_template: "flotilla/{fleet}".to_owned(),
            commit_message: "escape".to_owned(),
            max_parallelism: 1,
            max_attempts: 1,
            push: false,
            retry_backoff_initial_ms: 0,
            retry_backoff_max_ms: 0,
            flow: None,
        }),
        lease_ttl_ms: 30_000,
        fleet_created_at_ms: 1_700_000_000_000,
    }
}

async fn attempt(config: &WorkerConfig, lease: &Lease) -> RunResult {
    execute_attempt_with_token(
        config,
        lease,
        CancellationToken::new(),
        LeaseDeadline::fixed(tokio::time::Instant::now() + Duration::from_secs(3600)),
    )
    .await
}

fn print_table(rows: &[Row]) {
    let width = rows
        .iter()
        .map(|row| row.case.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!();
    println!("| {:width$} | {:20} | how recorded", "case", "blocked?");
    println!(
        "|-{}-|-{}-|-------------",
        "-".repeat(width),
        "-".repeat(20)
    );
    for row in rows {
        println!(
            "| {:width$} | {:20} | {}",
            row.case,
            row.verdict,
            row.recorded.replace('\n', " ")
        );
    }
    println!();
}

#[tokio::test]
async fn hostile_agents_are_blocked() {
    // SAFETY: set before any sandbox or git child is spawned by this test; no other thread of
    // this test binary reads the environment concurrently (one test in this binary).
    unsafe {
        std::env::set_var(CANARY_NAME, "worker-secret-value");
    }
    let root = tempfile::tempdir().unwrap();
    let config = test_config(&root.path().join("work"));
    std::fs::create_dir_all(&config.work_directory).unwrap();
    std::fs::write(config.work_directory.join("secret"), "worker data\n").unwrap();
    let scripts = root.path().join("cases");
    std::fs::create_dir_all(&scripts).unwrap();
    let mut rows = Vec::new();

    // The third column: the denials the worker itself must have recorded (from the kernel,
    // through the seccomp supervisor). Cases refused by the mount namespace, read-only mounts or
    // Landlock leave no worker record (see ARCHITECTURE.md, known gaps).
    for (name, expect) in [
        ("read-root", Expect::Blocked),
        ("read-shadow", Expect::Blocked),
        ("read-data-directory", Expect::Blocked),
        ("environment", Expect::Blocked),
        ("write-outside", Expect::Blocked),
        ("git-hooks", Expect::Blocked),
        ("git-config", Expect::Blocked),
        ("kill-host-process", Expect::Blocked),
        ("ptrace", Expect::Blocked),
        ("mount", Expect::Blocked),
        ("unshare", Expect::Blocked),
        ("nested-bwrap", Expect::Blocked),
        ("sysrq", Expect::Blocked),
        ("tmp-exec", Expect::Blocked),
        ("ld-so-tmp", Expect::Blocked),
        ("ld-so-usr", Expect::Allowed),
        ("seccomp-kernel-surface", Expect::Blocked),
    ] {
        let outcome = run_script(&config, &scripts, name, |_| {}).await;
        let mut row = row_for(name, expect, &outcome, "");
        row.passed &= recorded_all(&outcome, kernel_denials(name));
        rows.push(row);
    }

    // Memory bomb: 128 MiB limit; the OOM killer must end it and the outcome say so.
    let outcome = run_script(&config, &scripts, "memory-bomb", |command| {
        command.memory_limit_bytes = 128 << 20;
    })
    .await;
    let mut row = row_for(
        "memory-bomb",
        Expect::Blocked,
        &outcome,
        &format!("; outcome oom_killed={}", outcome.oom_killed),
    );
    row.passed &= outcome.oom_killed && recorded_all(&outcome, kernel_denials("memory-bomb"));
    rows.push(row);

    // Fork bomb: 128 pids; while it runs the host must still start processes.
    let fork_config = config.clone();
    let fork_scripts = scripts.clone();
    let bomb = tokio::spawn(async move {
        run_script(&fork_config, &fork_scripts, "fork-bomb", |command| {
            command.pids_limit = 128;
            command.timeout_ms = 15_000;
        })
        .await
    });
    let mut host_spawns = 0;
    while !bomb.is_finished() {
        let status = std::process::Command::new("/bin/true").status().unwrap();
        assert!(status.success());
        host_spawns += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outcome = bomb.await.unwrap();
    let mut row = row_for(
        "fork-bomb",
        Expect::Blocked,
        &outcome,
        &format!("; the host started {host_spawns} processes meanwhile"),
    );
    row.passed &= host_spawns > 0 && recorded_all(&outcome, kernel_denials("fork-bomb"));
    rows.push(row);

    // Whole attempts: host-side git on what the agent left.
    let origin = make_origin(root.path());
    let origin_url = origin.to_str().unwrap().to_owned();

    // Symbolic links to host files: only the link target string may leave.
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let shadow_line = shadow.lines().next().unwrap_or("root:").to_owned();
    let result = attempt(
        &config,
        &attempt_lease(
            &origin_url,
            "escape-symlink",
            &script("symlink-to-host-files"),
            &[],
        ),
    )
    .await;
    let leaked = !shadow_line.is_empty() && result.patch.contains(&shadow_line);
    let passed = result.outcome() == AttemptOutcome::Changed
        && result.patch.contains("+/etc/shadow")
        && result.patch.contains("new file mode 120000")
        && !leaked;
    rows.push(Row {
        case: "symlink-to-host-files".to_owned(),
        passed,
        verdict: if passed { "blocked" } else { "NOT BLOCKED" }.to_owned(),
        recorded: format!(
            "outcome {}; the patch holds the link targets (mode 120000) only, not the files' contents: {}",
            flotilla_proto::outcome::outcome_name(result.outcome), !leaked
        ),
    });

    // A .gitattributes filter driver whose definition sits in a global git configuration the
    // worker's user would read: host git must not run it.
    let bait = common::bait::create(root.path(), common::git);
    let (global, marker) = (&bait.global, &bait.marker);
    // SAFETY: as above (single test, set before the git children are spawned).
    unsafe {
        std::env::set_var("XDG_CONFIG_HOME", global);
    }
    let result = attempt(
        &config,
        &attempt_lease(
            &origin_url,
            "escape-filter",
            &script("gitattributes-filter-driver"),
            &[],
        ),
    )
    .await;
    let passed = result.outcome() == AttemptOutcome::Changed && !marker.exists();
    rows.push(Row {
        case: "gitattributes-filter-driver".to_owned(),
        passed,
        verdict: if passed { "blocked" } else { "NOT BLOCKED" }.to_owned(),
        recorded: format!(
            "outcome {}; filter/textconv program ran on the host: {}",
            flotilla_proto::outcome::outcome_name(result.outcome),
            marker.exists()
        ),
    });

    // A nested .git file pointing at another host repository: its commit must not appear as a
    // gitlink in the result.
    let other_commit = bait.other_commit.clone();
    let other_git = bait.other_git.clone();
    let result = attempt(
        &config,
        &attempt_lease(
            &origin_url,
            "escape-nested-git",
            &script("nested-git"),
            &[("ESCAPE_OTHER_GIT", other_git.to_str().unwrap())],
        ),
    )
    .await;
    let disclosed = result.patch.contains(&other_commit)
        || result.diffstat.iter().any(|stat| stat.path == "sub");
    let passed = !disclosed && result.outcome() == AttemptOutcome::Changed;
    rows.push(Row {
        case: "nested-git-gitlink".to_owned(),
        passed,
        verdict: if passed { "blocked" } else { "NOT BLOCKED" }.to_owned(),
        recorded: format!(
            "outcome {} ({}); the other repository's commit in the result: {disclosed}",
            flotilla_proto::outcome::outcome_name(result.outcome),
            result.error
        ),
    });

    print_table(&rows);
    let failed: Vec<&str> = rows
        .iter()
        .filter(|row| !row.passed)
        .map(|row| row.case.as_str())
        .collect();
    assert!(failed.is_empty(), "escape cases not blocked: {failed:?}");
}
