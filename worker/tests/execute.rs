//! End-to-end attempts on real git repositories (a bare origin in a temporary directory), with
//! the real bubblewrap sandbox.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{add_origin_commit, git, git_succeeds, make_origin, test_config};
use flotilla_proto::v1::{AgentSpec, FleetSpec, Lease, RunResult, SandboxSpec};
use flotilla_worker::config::WorkerConfig;
use flotilla_worker::execute::{
    attempt_directory, attempt_log_path, execute_attempt, execute_attempt_with_token,
};
use flotilla_worker::git::mirror_path;
use tokio_util::sync::CancellationToken;

const BRANCH: &str = "flotilla/test-fleet";

fn lease(repository: &str, run_id: &str, attempt: u32, agent: &str, verify: &[&str]) -> Lease {
    Lease {
        run_id: run_id.to_owned(),
        fleet_id: "fleet-1".to_owned(),
        fleet_name: "test-fleet".to_owned(),
        repository: repository.to_owned(),
        attempt,
        branch: BRANCH.to_owned(),
        trace_parent: String::new(),
        spec: Some(FleetSpec {
            name: "test-fleet".to_owned(),
            repositories: vec![repository.to_owned()],
            agent: Some(AgentSpec {
                command: agent.to_owned(),
                task: "say hello".to_owned(),
                env: [("GREETING".to_owned(), "hello".to_owned())]
                    .into_iter()
                    .collect(),
            }),
            verify: verify.iter().map(|command| (*command).to_owned()).collect(),
            sandbox: Some(SandboxSpec {
                driver: String::new(),
                timeout_ms: 20_000,
                memory_limit_bytes: 0,
                pids_limit: 0,
                network: false,
            }),
            branch_template: "flotilla/{fleet}".to_owned(),
            commit_message: "Say hello".to_owned(),
            max_parallelism: 1,
            max_attempts: 3,
            push: true,
            retry_backoff_initial_ms: 0,
            retry_backoff_max_ms: 0,
        }),
        lease_ttl_ms: 30_000,
    }
}

async fn execute(config: &WorkerConfig, lease: &Lease) -> RunResult {
    execute_attempt_with_token(config, lease, CancellationToken::new()).await
}

fn origin_has_branch(origin: &Path) -> bool {
    git_succeeds(
        origin,
        &[
            "--git-dir",
            origin.to_str().unwrap(),
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("refs/heads/{BRANCH}"),
        ],
    )
}

#[tokio::test]
async fn changed_files_are_committed_and_pushed() {
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    let config = test_config(&root.path().join("work"));
    let agent = "printf 'hello\\n' >> README.md && printf 'a\\nb\\n' > new.txt \
                 && printf '%s %s\\n' \"$GREETING\" \"$FLOTILLA_TASK\" > task.txt \
                 && mkdir -p ignored target && echo x > ignored/file && echo y > target/out \
                 && printf '\\000\\001' > blob.bin";
    let lease = lease(
        origin.to_str().unwrap(),
        "run-changed",
        1,
        agent,
        &[
            "grep -q hello README.md",
            "test -f new.txt",
            // git works in the sandbox (self-contained clone), and sees the agent's commit.
            "git log -1 --format=%s | grep -qx 'Say hello'",
        ],
    );
    let result = execute(&config, &lease).await;
    assert_eq!(result.outcome, "changed", "{result:?}");
    assert_eq!(result.exit_code, 0);
    assert!(result.pushed);
    assert!(!result.retryable);

    let mut diffstat: Vec<(String, u32, u32)> = result
        .diffstat
        .iter()
        .map(|stat| (stat.path.clone(), stat.insertions, stat.deletions))
        .collect();
    diffstat.sort();
    assert_eq!(
        diffstat,
        vec![
            ("README.md".to_owned(), 1, 0),
            ("blob.bin".to_owned(), 0, 0),
            ("new.txt".to_owned(), 2, 0),
            ("task.txt".to_owned(), 1, 0),
        ]
    );
    assert!(result.patch.contains("+hello"), "{}", result.patch);
    assert!(!result.patch_truncated);

    // The branch exists in the origin at the reported commit, on top of main, by Flotilla.
    let origin_path = origin.to_str().unwrap();
    let branch_commit = git(
        &origin,
        &[
            "--git-dir",
            origin_path,
            "rev-parse",
            &format!("refs/heads/{BRANCH}"),
        ],
    );
    assert_eq!(branch_commit, result.commit);
    let main_commit = git(
        &origin,
        &["--git-dir", origin_path, "rev-parse", "refs/heads/main"],
    );
    let parent = git(
        &origin,
        &["--git-dir", origin_path, "rev-parse", &format!("{BRANCH}^")],
    );
    assert_eq!(parent, main_commit);
    let author = git(
        &origin,
        &[
            "--git-dir",
            origin_path,
            "log",
            "-1",
            "--format=%an <%ae>|%cn|%s",
            BRANCH,
        ],
    );
    assert_eq!(author, "Flotilla <flotilla@localhost>|Flotilla|Say hello");
    let task = git(
        &origin,
        &[
            "--git-dir",
            origin_path,
            "show",
            &format!("{BRANCH}:task.txt"),
        ],
    );
    assert_eq!(task, "hello say hello");

    assert!(
        result.log_tail.contains("outcome changed"),
        "{}",
        result.log_tail
    );
    assert!(attempt_log_path(&config, "run-changed", 1).is_file());
    assert!(
        !attempt_directory(&config, "run-changed", 1).exists(),
        "attempt directory kept"
    );
}

#[tokio::test]
async fn no_change_is_unchanged_and_pushes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    let config = test_config(&root.path().join("work"));
    // Only an ignored file: still no change.
    let lease = lease(
        origin.to_str().unwrap(),
        "run-unchanged",
        1,
        "mkdir -p ignored && echo x > ignored/a",
        &["true"],
    );
    let result = execute(&config, &lease).await;
    assert_eq!(result.outcome, "unchanged", "{result:?}");
    assert_eq!(result.exit_code, 0);
    assert!(!result.pushed);
    assert!(result.commit.is_empty() && result.diffstat.is_empty() && result.patch.is_empty());
    assert!(!origin_has_branch(&origin));
}

#[tokio::test]
async fn failing_verification_is_verify_failed() {
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    let config = test_config(&root.path().join("work"));
    let lease = lease(
        origin.to_str().unwrap(),
        "run-verify",
        1,
        "echo change >> README.md",
        &["true", "echo verify-broke; exit 3", "echo never-run"],
    );
    let result = execute(&config, &lease).await;
    assert_eq!(result.outcome, "verify_failed", "{result:?}");
    assert_eq!(result.exit_code, 3);
    assert!(result.log_tail.contains("verify-broke"));
    assert!(!result.log_tail.contains("never-run"));
    assert!(!result.pushed);
    assert_eq!(result.diffstat.len(), 1);
    assert!(!origin_has_branch(&origin));
}

#[tokio::test]
async fn failing_agent_is_agent_failed_with_exit_code_and_tail() {
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    let config = test_config(&root.path().join("work"));
    let lease = lease(
        origin.to_str().unwrap(),
        "run-agent-fails",
        1,
        "echo boom-output; exit 7",
        &["echo never-run"],
    );
    let result = execute(&config, &lease).await;
    assert_eq!(result.outcome, "agent_failed", "{result:?}");
    assert_eq!(result.exit_code, 7);
    assert!(!result.retryable);
    assert!(
        result.log_tail.contains("boom-output"),
        "{}",
        result.log_tail
    );
    assert!(!result.log_tail.contains("never-run"));
    assert!(result.error.contains("code 7"), "{}", result.error);
}

#[tokio::test]
async fn slow_agent_is_timed_out() {
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    let config = test_config(&root.path().join("work"));
    let mut lease = lease(
        origin.to_str().unwrap(),
        "run-timeout",
        1,
        "sleep 987660",
        &[],
    );
    if let Some(sandbox) = lease.spec.as_mut().and_then(|spec| spec.sandbox.as_mut()) {
        sandbox.timeout_ms = 1_000;
    }
    let started = Instant::now();
    let result = execute(&config, &lease).await;
    assert_eq!(result.outcome, "timed_out", "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(common::processes_with_command_line(&["sleep", "987660"]).is_empty());
}

#[tokio::test]
async fn second_attempt_reuses_and_fetches_the_mirror() {
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    let url = format!("file://{}", origin.display());
    let config = test_config(&root.path().join("work"));

    let first = execute(&config, &lease(&url, "run-mirror", 1, "true", &[])).await;
    assert_eq!(first.outcome, "unchanged", "{first:?}");
    assert!(
        first.log_tail.contains("mirror Cloned"),
        "{}",
        first.log_tail
    );
    let mirror = mirror_path(&config.mirrors_directory(), &url);
    assert!(mirror.join("HEAD").is_file());
    let marker = mirror.join("flotilla-test-marker");
    std::fs::write(&marker, "kept").unwrap();

    // A new commit on the origin: the second attempt must see it, through the same mirror.
    add_origin_commit(root.path(), "second.txt");
    let second = execute(
        &config,
        &lease(&url, "run-mirror", 2, "test -f second.txt", &[]),
    )
    .await;
    assert_eq!(second.outcome, "unchanged", "{second:?}");
    assert!(
        second.log_tail.contains("mirror Fetched"),
        "{}",
        second.log_tail
    );
    assert!(marker.exists(), "the mirror was cloned again");
    let mirrors: Vec<_> = std::fs::read_dir(config.mirrors_directory())
        .unwrap()
        .collect();
    assert_eq!(mirrors.len(), 1);
}

#[tokio::test]
async fn concurrent_attempts_on_one_repository_share_the_mirror() {
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    let config = test_config(&root.path().join("work"));
    let url = origin.to_str().unwrap();
    let first = lease(url, "run-concurrent-a", 1, "echo a > a.txt", &[]);
    let mut second = lease(url, "run-concurrent-b", 1, "echo b > b.txt", &[]);
    second.spec.as_mut().unwrap().push = false;
    let (first, second) = tokio::join!(execute(&config, &first), execute(&config, &second));
    assert_eq!(first.outcome, "changed", "{first:?}");
    assert_eq!(second.outcome, "changed", "{second:?}");
    assert!(first.pushed && !second.pushed);
}

#[tokio::test]
async fn empty_origin_gets_a_first_commit() {
    let root = tempfile::tempdir().unwrap();
    let origin = root.path().join("empty.git");
    git(
        root.path(),
        &[
            "init",
            "--quiet",
            "--bare",
            "-b",
            "main",
            origin.to_str().unwrap(),
        ],
    );
    let config = test_config(&root.path().join("work"));
    let result = execute(
        &config,
        &lease(
            origin.to_str().unwrap(),
            "run-empty",
            1,
            "echo first > first.txt",
            &[],
        ),
    )
    .await;
    assert_eq!(result.outcome, "changed", "{result:?}");
    assert!(result.pushed);
    assert!(origin_has_branch(&origin));
}

#[tokio::test]
async fn unreachable_repository_is_a_retryable_infrastructure_failure() {
    let root = tempfile::tempdir().unwrap();
    let config = test_config(&root.path().join("work"));
    let missing = root.path().join("no-such-repository.git");
    let result = execute(
        &config,
        &lease(missing.to_str().unwrap(), "run-missing", 1, "true", &[]),
    )
    .await;
    assert_eq!(result.outcome, "infrastructure", "{result:?}");
    assert!(result.retryable);
    assert!(result.error.contains("clone"), "{}", result.error);
    // No half-made mirror is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(config.mirrors_directory())
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn rejected_push_is_a_retryable_infrastructure_failure() {
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    // A ref `<branch>/x` makes `<branch>` impossible to create (directory/file conflict).
    let origin_path = origin.to_str().unwrap();
    let main_commit = git(
        &origin,
        &["--git-dir", origin_path, "rev-parse", "refs/heads/main"],
    );
    git(
        &origin,
        &[
            "--git-dir",
            origin_path,
            "update-ref",
            &format!("refs/heads/{BRANCH}/x"),
            &main_commit,
        ],
    );
    let config = test_config(&root.path().join("work"));
    let result = execute(
        &config,
        &lease(origin_path, "run-push", 1, "echo c >> README.md", &[]),
    )
    .await;
    assert_eq!(result.outcome, "infrastructure", "{result:?}");
    assert!(result.retryable);
    assert!(!result.pushed);
    assert!(!result.commit.is_empty());
    assert!(result.error.contains("push"), "{}", result.error);
}

#[tokio::test]
async fn cancellation_stops_the_attempt() {
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    let config = test_config(&root.path().join("work"));
    let lease = lease(
        origin.to_str().unwrap(),
        "run-cancel",
        1,
        "sleep 987661",
        &[],
    );
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let result = execute_attempt_with_token(&config, &lease, cancel).await;
    assert_eq!(result.outcome, "cancelled", "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(common::processes_with_command_line(&["sleep", "987661"]).is_empty());
}

#[tokio::test]
async fn watch_channel_cancels_when_true_or_dropped() {
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    let config = test_config(&root.path().join("work"));
    let url = origin.to_str().unwrap();

    // `true` cancels.
    let (sender, receiver) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let _ = sender.send(true);
    });
    let started = Instant::now();
    let result = execute_attempt(
        &config,
        &lease(url, "run-watch", 1, "sleep 987664", &[]),
        receiver,
    )
    .await;
    assert_eq!(result.outcome, "cancelled", "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // A dropped sender cancels too.
    let (sender, receiver) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        drop(sender);
    });
    let result = execute_attempt(
        &config,
        &lease(url, "run-watch", 2, "sleep 987665", &[]),
        receiver,
    )
    .await;
    assert_eq!(result.outcome, "cancelled", "{result:?}");

    // A sender that stays `false` lets the attempt finish.
    let (_sender, receiver) = tokio::sync::watch::channel(false);
    let result = execute_attempt(&config, &lease(url, "run-watch", 3, "true", &[]), receiver).await;
    assert_eq!(result.outcome, "unchanged", "{result:?}");
}

#[tokio::test]
async fn invalid_leases_are_not_retryable() {
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    let config = test_config(&root.path().join("work"));
    let url = origin.to_str().unwrap();

    let mut bad_driver = lease(url, "run-bad", 1, "true", &[]);
    bad_driver
        .spec
        .as_mut()
        .unwrap()
        .sandbox
        .as_mut()
        .unwrap()
        .driver = "docker".to_owned();
    let result = execute(&config, &bad_driver).await;
    assert_eq!(result.outcome, "infrastructure");
    assert!(!result.retryable, "{result:?}");

    let mut bad_branch = lease(url, "run-bad", 2, "true", &[]);
    bad_branch.branch = "bad..branch name".to_owned();
    let result = execute(&config, &bad_branch).await;
    assert_eq!(result.outcome, "infrastructure");
    assert!(!result.retryable, "{result:?}");

    let relative = lease("relative/repository", "run-bad", 4, "true", &[]);
    let result = execute(&config, &relative).await;
    assert_eq!(result.outcome, "infrastructure");
    assert!(!result.retryable, "{result:?}");

    let mut no_agent = lease(url, "run-bad", 3, "true", &[]);
    no_agent.spec.as_mut().unwrap().agent = None;
    let result = execute(&config, &no_agent).await;
    assert_eq!(result.outcome, "infrastructure");
    assert!(!result.retryable);
}

#[tokio::test]
async fn none_driver_runs_the_pipeline_too() {
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    let config = test_config(&root.path().join("work"));
    let mut lease = lease(
        origin.to_str().unwrap(),
        "run-none",
        1,
        "echo none >> README.md",
        &["grep -q none README.md"],
    );
    lease
        .spec
        .as_mut()
        .unwrap()
        .sandbox
        .as_mut()
        .unwrap()
        .driver = "none".to_owned();
    let result = execute(&config, &lease).await;
    assert_eq!(result.outcome, "changed", "{result:?}");
    assert!(result.pushed);
}
