//! End-to-end attempts on real git repositories (a bare origin in a temporary directory), with
//! the real bubblewrap sandbox.

mod common;

use flotilla_proto::v1::AttemptOutcome;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{add_origin_commit, git, git_succeeds, make_origin, test_config};
use flotilla_proto::v1::{AgentSpec, FleetSpec, Lease, RunResult, SandboxSpec};
use flotilla_worker::config::WorkerConfig;
use flotilla_worker::execute::{
    attempt_directory, attempt_log_path, execute_attempt, execute_attempt_with_token,
};
use flotilla_worker::git::mirror_path;
use flotilla_worker::lease::LeaseDeadline;
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
                secrets: Default::default(),
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
                cpu_limit_millicores: 0,
                disk_limit_bytes: 0,
            }),
            branch_template: "flotilla/{fleet}".to_owned(),
            commit_message: "Say hello".to_owned(),
            max_parallelism: 1,
            max_attempts: 3,
            push: true,
            retry_backoff_initial_ms: 0,
            retry_backoff_max_ms: 0,
            flow: None,
            project: String::new(),
        }),
        lease_ttl_ms: 30_000,
        fleet_created_at_ms: 1_700_000_000_000,
        ..Lease::default()
    }
}

/// A lease deadline an hour away: the lease is certainly valid throughout a test.
fn valid_lease() -> LeaseDeadline {
    LeaseDeadline::fixed(tokio::time::Instant::now() + Duration::from_secs(3600))
}

async fn execute(config: &WorkerConfig, lease: &Lease) -> RunResult {
    execute_attempt_with_token(config, lease, CancellationToken::new(), valid_lease()).await
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
    assert_eq!(result.outcome(), AttemptOutcome::Changed, "{result:?}");
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
    assert_eq!(result.outcome(), AttemptOutcome::Unchanged, "{result:?}");
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
    assert_eq!(result.outcome(), AttemptOutcome::VerifyFailed, "{result:?}");
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
    assert_eq!(result.outcome(), AttemptOutcome::AgentFailed, "{result:?}");
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
    assert_eq!(result.outcome(), AttemptOutcome::TimedOut, "{result:?}");
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
    assert_eq!(first.outcome(), AttemptOutcome::Unchanged, "{first:?}");
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
    assert_eq!(second.outcome(), AttemptOutcome::Unchanged, "{second:?}");
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
    assert_eq!(first.outcome(), AttemptOutcome::Changed, "{first:?}");
    assert_eq!(second.outcome(), AttemptOutcome::Changed, "{second:?}");
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
    assert_eq!(result.outcome(), AttemptOutcome::Changed, "{result:?}");
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
    assert_eq!(
        result.outcome(),
        AttemptOutcome::Infrastructure,
        "{result:?}"
    );
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
    assert_eq!(
        result.outcome(),
        AttemptOutcome::Infrastructure,
        "{result:?}"
    );
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
    let result = execute_attempt_with_token(&config, &lease, cancel, valid_lease()).await;
    assert_eq!(result.outcome(), AttemptOutcome::Cancelled, "{result:?}");
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
        valid_lease(),
    )
    .await;
    assert_eq!(result.outcome(), AttemptOutcome::Cancelled, "{result:?}");
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
        valid_lease(),
    )
    .await;
    assert_eq!(result.outcome(), AttemptOutcome::Cancelled, "{result:?}");

    // A sender that stays `false` lets the attempt finish.
    let (_sender, receiver) = tokio::sync::watch::channel(false);
    let result = execute_attempt(
        &config,
        &lease(url, "run-watch", 3, "true", &[]),
        receiver,
        valid_lease(),
    )
    .await;
    assert_eq!(result.outcome(), AttemptOutcome::Unchanged, "{result:?}");
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
    assert_eq!(result.outcome(), AttemptOutcome::Infrastructure);
    assert!(!result.retryable, "{result:?}");

    let mut bad_branch = lease(url, "run-bad", 2, "true", &[]);
    bad_branch.branch = "flotilla/bad..branch name".to_owned();
    let result = execute(&config, &bad_branch).await;
    assert_eq!(result.outcome(), AttemptOutcome::Infrastructure);
    assert!(!result.retryable, "{result:?}");
    assert!(result.error.contains("invalid branch name"), "{result:?}");

    // Outside the worker's branch prefix: refused before anything runs, main is untouched.
    let main_before = git(&origin, &["--git-dir", url, "rev-parse", "refs/heads/main"]);
    let mut main_branch = lease(url, "run-bad", 5, "echo x >> README.md", &[]);
    main_branch.branch = "main".to_owned();
    let result = execute(&config, &main_branch).await;
    assert_eq!(result.outcome(), AttemptOutcome::Infrastructure);
    assert!(!result.retryable, "{result:?}");
    assert!(
        result
            .error
            .contains("outside the worker's branch prefix \"flotilla/\""),
        "{result:?}"
    );
    assert_eq!(
        git(&origin, &["--git-dir", url, "rev-parse", "refs/heads/main"]),
        main_before
    );

    let relative = lease("relative/repository", "run-bad", 4, "true", &[]);
    let result = execute(&config, &relative).await;
    assert_eq!(result.outcome(), AttemptOutcome::Infrastructure);
    assert!(!result.retryable, "{result:?}");

    let mut no_agent = lease(url, "run-bad", 3, "true", &[]);
    no_agent.spec.as_mut().unwrap().agent = None;
    let result = execute(&config, &no_agent).await;
    assert_eq!(result.outcome(), AttemptOutcome::Infrastructure);
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
    assert_eq!(result.outcome(), AttemptOutcome::Changed, "{result:?}");
    assert!(result.pushed);
}

/// The origin's commit of [`BRANCH`], `None` when the branch does not exist.
fn origin_branch(origin: &Path) -> Option<String> {
    origin_has_branch(origin).then(|| {
        git(
            origin,
            &[
                "--git-dir",
                origin.to_str().unwrap(),
                "rev-parse",
                &format!("refs/heads/{BRANCH}"),
            ],
        )
    })
}

/// Files through which a test holds an attempt right before it publishes: the attempt's
/// verification command creates `ready-<name>` and waits for `go-<name>` (the `none` driver
/// sees host paths).
struct Gates(std::path::PathBuf);

impl Gates {
    fn new(root: &Path) -> Gates {
        let directory = root.join("gates");
        std::fs::create_dir_all(&directory).unwrap();
        Gates(directory)
    }

    fn verify(&self, name: &str) -> String {
        let ready = self.0.join(format!("ready-{name}"));
        let go = self.0.join(format!("go-{name}"));
        format!(
            "touch '{}' && while [ ! -e '{}' ]; do sleep 0.01; done",
            ready.display(),
            go.display()
        )
    }

    async fn wait_ready(&self, name: &str) {
        let ready = self.0.join(format!("ready-{name}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            assert!(Instant::now() < deadline, "attempt {name} never got ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn open(&self, name: &str) {
        std::fs::write(self.0.join(format!("go-{name}")), "").unwrap();
    }
}

/// A lease of attempt `attempt` of `run_id` on the `none` driver whose agent writes the attempt
/// number into `attempt.txt` (or changes nothing when `changes` is false) and whose
/// verification waits at gate `gate`.
fn gated_lease(
    origin: &Path,
    run_id: &str,
    attempt: u32,
    changes: bool,
    gates: &Gates,
    gate: &str,
) -> Lease {
    let agent = if changes {
        "echo \"attempt $FLOTILLA_ATTEMPT\" > attempt.txt"
    } else {
        "true"
    };
    let verify = gates.verify(gate);
    let mut lease = lease(origin.to_str().unwrap(), run_id, attempt, agent, &[&verify]);
    lease
        .spec
        .as_mut()
        .unwrap()
        .sandbox
        .as_mut()
        .unwrap()
        .driver = "none".to_owned();
    lease
}

/// The branch agrees with the accepted (highest) attempt's result: its commit when it pushed,
/// absent otherwise.
fn assert_branch_matches(origin: &Path, accepted: &RunResult, context: &str) {
    let expected = (accepted.outcome() == AttemptOutcome::Changed).then(|| accepted.commit.clone());
    assert_eq!(
        origin_branch(origin),
        expected,
        "{context}: the branch disagrees with the accepted result {accepted:?}"
    );
}

/// Runs attempts 1 (stale) and 2 (accepted) of one run concurrently, both held before they
/// publish; `order` says which gate opens first (`"1"`, `"2"`, or both at once with `"both"`).
async fn two_attempts(
    root: &Path,
    config: &WorkerConfig,
    run_id: &str,
    changes: (bool, bool),
    order: &str,
    stale_lease: LeaseDeadline,
) -> (RunResult, RunResult, std::path::PathBuf) {
    let origin_root = root.join(run_id);
    std::fs::create_dir_all(&origin_root).unwrap();
    let origin = make_origin(&origin_root);
    let gates = Gates::new(&origin_root);
    let stale = gated_lease(&origin, run_id, 1, changes.0, &gates, "1");
    let accepted = gated_lease(&origin, run_id, 2, changes.1, &gates, "2");
    let (first_config, second_config) = (config.clone(), config.clone());
    let stale_task = tokio::spawn(async move {
        execute_attempt_with_token(&first_config, &stale, CancellationToken::new(), stale_lease)
            .await
    });
    let accepted_task = tokio::spawn(async move {
        execute_attempt_with_token(
            &second_config,
            &accepted,
            CancellationToken::new(),
            valid_lease(),
        )
        .await
    });
    gates.wait_ready("1").await;
    gates.wait_ready("2").await;
    let (stale, accepted) = match order {
        "1" => {
            gates.open("1");
            let stale = stale_task.await.unwrap();
            gates.open("2");
            (stale, accepted_task.await.unwrap())
        }
        "2" => {
            gates.open("2");
            let accepted = accepted_task.await.unwrap();
            gates.open("1");
            (stale_task.await.unwrap(), accepted)
        }
        _ => {
            gates.open("1");
            gates.open("2");
            (stale_task.await.unwrap(), accepted_task.await.unwrap())
        }
    };
    (stale, accepted, origin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_attempts_leave_the_branch_at_the_accepted_attempt() {
    let root = tempfile::tempdir().unwrap();
    let config = test_config(&root.path().join("work"));

    // The stale attempt pushes first; the accepted one pushes over it.
    let (stale, accepted, origin) = two_attempts(
        root.path(),
        &config,
        "fl-1-0",
        (true, true),
        "1",
        valid_lease(),
    )
    .await;
    assert!(stale.pushed && accepted.pushed, "{stale:?}\n{accepted:?}");
    assert_branch_matches(&origin, &accepted, "stale first");
    let pushed = git(
        &origin,
        &[
            "--git-dir",
            origin.to_str().unwrap(),
            "log",
            "-1",
            "--format=%B",
            BRANCH,
        ],
    );
    assert!(
        pushed.ends_with(
            "Flotilla-Run: fl-1-0\nFlotilla-Fleet-Created-Ms: 1700000000000\nFlotilla-Attempt: 2"
        ),
        "{pushed}"
    );

    // The accepted attempt pushes first; the stale one finds a higher attempt and writes
    // nothing.
    let (stale, accepted, origin) = two_attempts(
        root.path(),
        &config,
        "fl-2-0",
        (true, true),
        "2",
        valid_lease(),
    )
    .await;
    assert!(accepted.pushed, "{accepted:?}");
    assert_eq!(stale.outcome(), AttemptOutcome::Infrastructure, "{stale:?}");
    assert!(!stale.pushed);
    assert!(
        stale
            .error
            .contains("stale attempt: branch flotilla/test-fleet already holds attempt 2"),
        "{stale:?}"
    );
    assert_branch_matches(&origin, &accepted, "accepted first");

    // Both push at once, several times: the compare-and-swap decides, never the stale one.
    for round in 0..4 {
        let run_id = format!("fl-3-{round}");
        let (stale, accepted, origin) = two_attempts(
            root.path(),
            &config,
            &run_id,
            (true, true),
            "both",
            valid_lease(),
        )
        .await;
        assert!(accepted.pushed, "round {round}: {accepted:?}");
        assert!(
            stale.pushed || stale.error.contains("stale attempt"),
            "round {round}: {stale:?}"
        );
        assert_branch_matches(&origin, &accepted, &format!("both at once, round {round}"));
    }

    // The stale attempt pushed, the accepted one changed nothing: it withdraws the stale
    // commit, so the branch does not claim a change the result does not have.
    let (stale, accepted, origin) = two_attempts(
        root.path(),
        &config,
        "fl-4-0",
        (true, false),
        "1",
        valid_lease(),
    )
    .await;
    assert!(stale.pushed, "{stale:?}");
    assert_eq!(
        accepted.outcome(),
        AttemptOutcome::Unchanged,
        "{accepted:?}"
    );
    assert!(
        accepted
            .log_tail
            .contains("deleted branch flotilla/test-fleet"),
        "{}",
        accepted.log_tail
    );
    assert_branch_matches(&origin, &accepted, "stale pushed, accepted unchanged");

    // The accepted attempt changed nothing first; the stale one comes later with a lease it
    // can no longer prove (its deadline passed, as it had before the cluster re-leased the
    // run): it pushes nothing.
    let expired = LeaseDeadline::fixed(tokio::time::Instant::now());
    let (stale, accepted, origin) =
        two_attempts(root.path(), &config, "fl-5-0", (true, false), "2", expired).await;
    assert_eq!(
        accepted.outcome(),
        AttemptOutcome::Unchanged,
        "{accepted:?}"
    );
    assert_eq!(stale.outcome(), AttemptOutcome::Infrastructure, "{stale:?}");
    assert!(stale.retryable && !stale.pushed, "{stale:?}");
    assert!(stale.error.contains("push_lease_margin_ms"), "{stale:?}");
    assert_branch_matches(
        &origin,
        &accepted,
        "accepted unchanged, stale lease expired",
    );

    // The accepted attempt pushed; the stale one changed nothing and ends later: it must not
    // withdraw a higher attempt's commit.
    let (stale, accepted, origin) = two_attempts(
        root.path(),
        &config,
        "fl-6-0",
        (false, true),
        "2",
        valid_lease(),
    )
    .await;
    assert_eq!(stale.outcome(), AttemptOutcome::Unchanged, "{stale:?}");
    assert!(
        stale
            .log_tail
            .contains("holds attempt 2 of this run; this attempt is stale"),
        "{}",
        stale.log_tail
    );
    assert_branch_matches(&origin, &accepted, "accepted pushed, stale unchanged later");
}

#[tokio::test]
async fn a_second_execution_of_the_same_attempt_replaces_the_first() {
    // A worker restarted under the same id runs its lease again under the same attempt.
    let root = tempfile::tempdir().unwrap();
    let origin = make_origin(root.path());
    let config = test_config(&root.path().join("work"));
    let url = origin.to_str().unwrap();
    let first = execute(
        &config,
        &lease(url, "fl-7-0", 1, "echo one > attempt.txt", &[]),
    )
    .await;
    assert!(first.pushed, "{first:?}");
    let second = execute(
        &config,
        &lease(url, "fl-7-0", 1, "echo two > attempt.txt", &[]),
    )
    .await;
    assert!(second.pushed, "{second:?}");
    assert_eq!(origin_branch(&origin), Some(second.commit.clone()));
    // A third execution that changes nothing withdraws the branch.
    let third = execute(&config, &lease(url, "fl-7-0", 1, "true", &[])).await;
    assert_eq!(third.outcome(), AttemptOutcome::Unchanged, "{third:?}");
    assert_eq!(origin_branch(&origin), None);
    // Another fleet's commit on the branch (another run) is never withdrawn by this run.
    let other = execute(
        &config,
        &lease(url, "fl-8-0", 1, "echo other > attempt.txt", &[]),
    )
    .await;
    assert!(other.pushed);
    let unchanged = execute(&config, &lease(url, "fl-7-0", 2, "true", &[])).await;
    assert_eq!(
        unchanged.outcome(),
        AttemptOutcome::Unchanged,
        "{unchanged:?}"
    );
    assert_eq!(origin_branch(&origin), Some(other.commit));
}

#[tokio::test]
async fn the_mirror_cache_keeps_at_most_its_limits() {
    let root = tempfile::tempdir().unwrap();
    let mut config = test_config(&root.path().join("work"));
    config.mirror_cache_max_mirrors = 2;
    let origins: Vec<String> = (0..3)
        .map(|index| {
            let directory = root.path().join(format!("origin-{index}"));
            std::fs::create_dir_all(&directory).unwrap();
            make_origin(&directory).to_str().unwrap().to_owned()
        })
        .collect();
    let cache = flotilla_worker::git::mirror_cache(&config);
    let mirrors = config.mirrors_directory();
    let mirror_exists = |index: usize| mirror_path(&mirrors, &origins[index]).is_dir();
    for (index, url) in origins.iter().enumerate() {
        let result = execute(&config, &lease(url, "fl-1-0", 1, "true", &[])).await;
        assert_eq!(result.outcome(), AttemptOutcome::Unchanged, "{result:?}");
        assert!(mirror_exists(index));
    }
    // Three repositories, room for two: the least recently used one went.
    assert!(!mirror_exists(0) && mirror_exists(1) && mirror_exists(2));
    let stats = cache.stats();
    assert_eq!(
        (stats.mirrors, stats.entries, stats.evicted_total),
        (2, 2, 1)
    );
    // Using mirror 1 again makes mirror 2 the oldest.
    execute(&config, &lease(&origins[1], "fl-1-1", 1, "true", &[])).await;
    execute(&config, &lease(&origins[0], "fl-1-2", 1, "true", &[])).await;
    assert!(mirror_exists(0) && mirror_exists(1) && !mirror_exists(2));
    // A repository that cannot be cloned leaves no mirror and no lock entry behind.
    let missing = root.path().join("missing.git");
    let failed = execute(
        &config,
        &lease(missing.to_str().unwrap(), "fl-1-3", 1, "true", &[]),
    )
    .await;
    assert_eq!(failed.outcome(), AttemptOutcome::Infrastructure);
    assert_eq!(cache.stats().entries, 2);
    drop(cache);

    // A byte limit: a fresh cache (as after a restart) finds the two mirrors on disk; with
    // room for almost nothing, each new mirror evicts every other mirror not in use.
    config.mirror_cache_max_bytes = 1;
    let cache = flotilla_worker::git::mirror_cache(&config);
    execute(&config, &lease(&origins[2], "fl-1-4", 1, "true", &[])).await;
    assert!(!mirror_exists(0) && !mirror_exists(1) && mirror_exists(2));
    assert_eq!(cache.stats().mirrors, 1);
    let leftovers: Vec<_> = std::fs::read_dir(&mirrors)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}
