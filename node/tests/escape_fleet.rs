//! The sandbox escape suite as fleets of hostile agents through a real node: every script of
//! `worker/tests/escape/` is the `escape.sh` of its own repository, and the fleets' agent runs
//! it (`exec sh ./escape.sh`) in the node's own worker, under the default policy (bubblewrap,
//! unprivileged uid, Landlock, seccomp with the supervisor, cgroups, the egress proxy), with
//! TLS and tokens. For each case the test asserts that it was blocked (the script's `RESULT`
//! line, or what reached the origin for the host-side git cases) and, where the kernel reports
//! the refusal, that the worker recorded it in the run's result (`sandbox_denials`,
//! `egress_connections`) and that the audit record of the result names it.
//!
//! Run `cargo test -p flotilla --test escape_fleet -- --nocapture` to see the table. The
//! stand-in "outside" host is a network namespace the test creates; nothing leaves the machine.

#[path = "../../worker/tests/common/bait.rs"]
mod bait;
mod common;
#[allow(dead_code)]
#[path = "../../worker/tests/common/netns.rs"]
mod netns;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{ADMIN_TOKEN, Node, git, origin_repository, spec, wait_finished, with_token};
use flotilla_proto::v1;
use flotilla_proto::v1::audit_service_client::AuditServiceClient;
use netns::OutsideHost;

const CANARY_NAME: &str = "FLOTILLA_ESCAPE_CANARY";

/// How a case's verdict is read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// The script's `RESULT blocked: ...` line.
    Blocked,
    /// `RESULT allowed: ...` (shown for what it tells, not an escape).
    Allowed,
    /// Checked by the test on what reached the origin (host-side git cases).
    Origin,
}

struct Case {
    name: &'static str,
    verdict: Verdict,
    /// Whether the run has network (through the proxy).
    network: bool,
}

const fn case(name: &'static str, verdict: Verdict) -> Case {
    Case {
        name,
        verdict,
        network: false,
    }
}

/// Every case; the denials the worker must record for each are [`bait::kernel_denials`].
const CASES: &[Case] = &[
    case("read-root", Verdict::Blocked),
    case("read-shadow", Verdict::Blocked),
    case("read-data-directory", Verdict::Blocked),
    case("environment", Verdict::Blocked),
    case("write-outside", Verdict::Blocked),
    case("git-hooks", Verdict::Blocked),
    case("git-config", Verdict::Blocked),
    case("kill-host-process", Verdict::Blocked),
    case("ptrace", Verdict::Blocked),
    case("mount", Verdict::Blocked),
    case("unshare", Verdict::Blocked),
    case("nested-bwrap", Verdict::Blocked),
    case("sysrq", Verdict::Blocked),
    case("tmp-exec", Verdict::Blocked),
    case("ld-so-tmp", Verdict::Blocked),
    case("ld-so-usr", Verdict::Allowed),
    case("seccomp-kernel-surface", Verdict::Blocked),
    case("memory-bomb", Verdict::Blocked),
    case("fork-bomb", Verdict::Blocked),
    case("network-off", Verdict::Blocked),
    case("symlink-to-host-files", Verdict::Origin),
    case("gitattributes-filter-driver", Verdict::Origin),
    case("nested-git", Verdict::Origin),
    Case {
        name: "network-proxy",
        verdict: Verdict::Blocked,
        network: true,
    },
];

/// The branch every run pushes to (`flotilla/{fleet}` with both fleets named `escape...`).
fn branch(network: bool) -> &'static str {
    if network {
        "flotilla/escape-network"
    } else {
        "flotilla/escape"
    }
}

fn script(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../worker/tests/escape")
        .join(format!("{name}.sh"));
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn result_line(log_tail: &str) -> Option<&str> {
    log_tail
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("RESULT "))
}

fn bare_path(url: &str) -> PathBuf {
    PathBuf::from(url.trim_start_matches("file://"))
}

/// The node's configuration: the egress proxy allows `outside.test` only, both names map to
/// the outside host.
fn egress_config(outside: &OutsideHost) -> String {
    format!(
        "[worker.egress]\nallowed_hosts = [\"outside.test:*\"]\n\
         allowed_private_networks = [\"10.215.0.0/16\"]\n\
         [worker.egress.static_hosts]\n\"outside.test\" = \"{0}\"\n\"denied.test\" = \"{0}\"\n",
        outside.address
    )
}

struct Row {
    case: String,
    passed: bool,
    verdict: String,
    recorded: String,
}

/// The origin-side verdict of a host-side git case.
fn origin_verdict(name: &str, origin: &Path, bait: &bait::Bait) -> (bool, String) {
    let (marker, other_commit) = (&bait.marker, &bait.other_commit);
    let tree = git(origin, &["ls-tree", "-r", branch(false)]);
    match name {
        "symlink-to-host-files" => {
            let target = git(origin, &["cat-file", "-p", "flotilla/escape:shadow-link"]);
            let link = tree
                .lines()
                .any(|line| line.starts_with("120000 ") && line.ends_with("\tshadow-link"));
            (
                link && target == "/etc/shadow",
                format!("the origin holds a link (mode 120000) whose blob is {target:?}"),
            )
        }
        "gitattributes-filter-driver" => (
            !marker.exists() && tree.contains("\t.gitattributes"),
            format!(
                "pushed; the filter/textconv program ran on the host: {}",
                marker.exists()
            ),
        ),
        "nested-git" => {
            let gitlink = tree.lines().any(|line| line.starts_with("160000 "));
            let log = git(origin, &["log", "-p", branch(false)]);
            let disclosed = log.contains(other_commit.as_str());
            (
                !gitlink && !disclosed && tree.contains("\ttop.txt"),
                format!(
                    "pushed; gitlink in the tree: {gitlink}; other commit disclosed: {disclosed}"
                ),
            )
        }
        _ => (false, "no origin check for this case".to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_fleets_are_blocked_and_recorded() {
    let outside = OutsideHost::create();
    let server = outside.serve();
    let root = tempfile::tempdir().unwrap();

    let bait = bait::create(root.path(), common::git);

    let mut origins: BTreeMap<String, &Case> = BTreeMap::new();
    for case in CASES {
        let url = origin_repository(root.path(), case.name, &[("escape.sh", &script(case.name))]);
        origins.insert(url, case);
    }

    let data = root.path().join("node");
    std::fs::create_dir_all(&data).unwrap();
    let config = data.join("escape.toml");
    common::write_config(&config, &egress_config(&outside));
    let global_text = bait.global.display().to_string();
    let node = Node::start_with_environment(
        &data,
        common::free_port(),
        &["--config", config.to_str().unwrap()],
        &[
            (CANARY_NAME, "worker-secret-value"),
            ("XDG_CONFIG_HOME", &global_text),
        ],
    )
    .await;
    let mut client = node.client().await;

    let environment = BTreeMap::from([
        ("ESCAPE_HOST_PID".to_owned(), node.child.id().to_string()),
        ("ESCAPE_HOST_PATH".to_owned(), data.display().to_string()),
        ("ESCAPE_CANARY_NAME".to_owned(), CANARY_NAME.to_owned()),
        ("ESCAPE_NODE_ADDRESS".to_owned(), node.host_port()),
        (
            "ESCAPE_OUTSIDE_ADDRESS".to_owned(),
            format!("{}:{}", outside.address, server.port),
        ),
        ("ESCAPE_OUTSIDE_PORT".to_owned(), server.port.to_string()),
        (
            "ESCAPE_OTHER_GIT".to_owned(),
            bait.other_git.display().to_string(),
        ),
    ]);
    let mut fleets = Vec::new();
    for network in [false, true] {
        let repositories: Vec<String> = origins
            .iter()
            .filter(|(_, case)| case.network == network)
            .map(|(url, _)| url.clone())
            .collect();
        let name = if network { "escape-network" } else { "escape" };
        let mut fleet = spec(name, repositories, "exec sh ./escape.sh", &[]);
        fleet.max_attempts = 1;
        fleet.max_parallelism = 2;
        fleet.agent.as_mut().unwrap().env = environment.clone().into_iter().collect();
        let sandbox = fleet.sandbox.as_mut().unwrap();
        sandbox.network = network;
        sandbox.memory_limit_bytes = 256 << 20;
        sandbox.pids_limit = 128;
        sandbox.timeout_ms = 30_000;
        let submitted = client
            .submit_fleet(v1::SubmitFleetRequest {
                dry_run: false,
                spec: Some(fleet),
                idempotency_key: name.to_owned(),
            })
            .await
            .unwrap_or_else(|status| panic!("submit {name}: {status:?}"))
            .into_inner();
        fleets.push(submitted.fleet.unwrap().id);
    }
    let mut runs = Vec::new();
    for fleet_id in &fleets {
        for summary in wait_finished(&mut client, fleet_id, &node).await.runs {
            let run = client
                .get_run(v1::GetRunRequest { run_id: summary.id })
                .await
                .unwrap()
                .into_inner();
            runs.push(run);
        }
    }
    assert_eq!(runs.len(), CASES.len());

    let channel = common::tls_channel(&node.address, None).await.unwrap();
    let audit = AuditServiceClient::new(with_token(channel, ADMIN_TOKEN))
        .list_audit_records(v1::ListAuditRecordsRequest {
            after_sequence: 0,
            page_size: 10_000,
        })
        .await
        .unwrap()
        .into_inner()
        .records;

    let mut rows = Vec::new();
    for run in &runs {
        let case = origins[&run.repository];
        let attempt = run.attempts.last().expect("an attempt");
        let record = audit
            .iter()
            .find(|record| {
                record.action == "report_result"
                    && record.target.starts_with(&format!("run {} ", run.id))
            })
            .unwrap_or_else(|| panic!("no audit record of {}'s result", case.name));
        let line = result_line(&attempt.log_tail);
        let (mut passed, verdict, mut recorded) = match (case.verdict, line) {
            (Verdict::Origin, _) => {
                let (passed, text) = origin_verdict(case.name, &bare_path(&run.repository), &bait);
                let verdict = if passed { "blocked" } else { "NOT BLOCKED" };
                (passed, verdict.to_owned(), text)
            }
            (Verdict::Blocked, Some(line)) if line.starts_with("blocked:") => (
                true,
                "blocked".to_owned(),
                line["blocked:".len()..].trim().to_owned(),
            ),
            (Verdict::Allowed, Some(line)) if line.starts_with("allowed:") => (
                true,
                "allowed (by design)".to_owned(),
                line["allowed:".len()..].trim().to_owned(),
            ),
            (_, line) => (
                false,
                "NOT BLOCKED".to_owned(),
                format!(
                    "{line:?}; outcome {} {}; log: {}",
                    flotilla_proto::outcome::outcome_name(attempt.outcome),
                    attempt.error,
                    attempt.log_tail
                ),
            ),
        };
        // What the worker recorded from the kernel, and that the audit record names it.
        for action in bait::kernel_denials(case.name) {
            let found = attempt
                .sandbox_denials
                .iter()
                .any(|denial| denial.action == *action && denial.count > 0);
            passed &= found && record.target.contains(&format!(" {action} x"));
        }
        if case.network {
            let denied = |host: &str| {
                attempt
                    .egress_connections
                    .iter()
                    .any(|connection| connection.host == host && !connection.allowed)
            };
            let allowed = attempt
                .egress_connections
                .iter()
                .any(|connection| connection.host == "outside.test" && connection.allowed);
            passed &= allowed
                && denied("denied.test")
                && denied("127.0.0.1")
                && record.target.contains("egress 1 allowed, 2 denied");
        }
        let denials: Vec<String> = attempt
            .sandbox_denials
            .iter()
            .map(|denial| format!("{} {} x{}", denial.mechanism, denial.action, denial.count))
            .chain(attempt.egress_connections.iter().map(|connection| {
                format!(
                    "egress {}:{} {}",
                    connection.host,
                    connection.port,
                    if connection.allowed {
                        "allowed".to_owned()
                    } else {
                        format!("denied ({})", connection.reason)
                    }
                )
            }))
            .collect();
        if !denials.is_empty() {
            recorded = format!(
                "{recorded} [result and audit #{}: {}]",
                record.sequence,
                denials.join(", ")
            );
        }
        rows.push(Row {
            case: case.name.to_owned(),
            passed,
            verdict,
            recorded,
        });
    }
    // `flotilla run show` lists what the worker recorded.
    for (name, expected) in [
        ("ptrace", "  sandbox refused (seccomp, agent): ptrace x"),
        ("fork-bomb", "  sandbox refused (cgroup, agent): pids.max x"),
        ("network-proxy", "  egress denied.test:"),
    ] {
        let run = runs
            .iter()
            .find(|run| origins[&run.repository].name == name)
            .unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .env("FLOTILLA_TOKEN", ADMIN_TOKEN)
            .env("FLOTILLA_CA_FILE", common::ca_file())
            .args(["--address", &node.address, "run", "show", &run.id])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let lines: Vec<&str> = stdout
            .lines()
            .filter(|line| line.starts_with("attempt ") || line.starts_with("  "))
            .collect();
        println!(
            "flotilla run show {} ({name}):\n{}",
            run.id,
            lines.join("\n")
        );
        assert!(
            output.status.success() && stdout.contains(expected),
            "{name}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    rows.sort_by_key(|row| {
        CASES
            .iter()
            .position(|case| case.name == row.case)
            .unwrap_or(usize::MAX)
    });
    println!("\n| case | blocked? | how recorded |\n|---|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {} |",
            row.case,
            row.verdict,
            row.recorded.replace('\n', " ").replace('|', "/")
        );
    }
    let failed: Vec<&str> = rows
        .iter()
        .filter(|row| !row.passed)
        .map(|row| row.case.as_str())
        .collect();
    assert!(
        failed.is_empty(),
        "escape cases not blocked or not recorded: {failed:?}\nnode log:\n{}",
        node.log_text()
    );
    assert_eq!(server.accepted(), 1, "only the control reached the outside");
}
