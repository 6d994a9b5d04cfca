//! Property-based fuzzing (proptest, stable toolchain) of everything that parses input from
//! outside: protobuf request decoding, the conversion and validation of specs and results,
//! the execution policy, and spec files (YAML and TOML). The property is always the same: no
//! panic, and a refusal names a field and stays short.
//!
//! Bounded for CI: `FUZZ_CASES` cases per property (default 512). Longer runs, documented in
//! README.md: `FUZZ_CASES=200000 cargo test --release -p flotilla --test fuzz`.

use std::path::Path;

use flotilla::convert::{self, ResultLimits};
use flotilla::spec_file;
use flotilla_proto::v1;
use flotilla_scheduler::spec::MAX_ERROR_MESSAGE_BYTES;
use flotilla_scheduler::{ExecutionPolicy, SpecLimits};
use proptest::prelude::*;
use prost::Message as _;

fn config() -> ProptestConfig {
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text that tends to break parsers: empty, control characters, NUL, quotes, path tricks,
/// URL pieces, very long runs, non-ASCII.
fn nasty_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[ -~]{0,40}",
        "\\PC{0,40}",
        "[\\x00-\\x1f\\x7f/\\\\.:@%\\[\\]{}~^*?-]{0,24}",
        prop::sample::select(vec![
            "file:///srv/a.git",
            "file:///srv/../etc",
            "/srv/a",
            "https://u:p@h/x",
            "https://[::1]/x",
            "ssh://git@github.com/o/r.git",
            "https://169.254.169.254/",
            "http://127.0.0.1:1/x",
            "refs/heads/x",
            "flotilla/{fleet}",
            "{repository}",
            "bwrap",
            "none",
            "..",
            "@{",
            "HEAD",
            "https://github.com./o/r",
            "file://host/x",
            "https://",
            "\u{202e}",
            "a\0b",
        ])
        .prop_map(str::to_string),
        (1usize..5000).prop_map(|n| "y".repeat(n)),
    ]
}

fn wire_spec() -> impl Strategy<Value = v1::FleetSpec> {
    (
        (nasty_text(), nasty_text()),
        prop::collection::vec(nasty_text(), 0..4),
        (
            nasty_text(),
            nasty_text(),
            prop::collection::btree_map(nasty_text(), nasty_text(), 0..3),
            prop::collection::btree_map(nasty_text(), nasty_text(), 0..3),
        ),
        prop::collection::vec(nasty_text(), 0..3),
        (
            nasty_text(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            any::<u32>(),
            any::<u64>(),
        ),
        (
            nasty_text(),
            nasty_text(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
            any::<u64>(),
            any::<u64>(),
        ),
    )
        .prop_map(
            |((name, project), repositories, agent, verify, sandbox, rest)| v1::FleetSpec {
                name,
                project,
                repositories,
                agent: Some(v1::AgentSpec {
                    command: agent.0,
                    task: agent.1,
                    env: agent.2.into_iter().collect(),
                    secrets: agent.3.into_iter().collect(),
                }),
                verify,
                sandbox: Some(v1::SandboxSpec {
                    driver: sandbox.0,
                    timeout_ms: sandbox.1,
                    memory_limit_bytes: sandbox.2,
                    pids_limit: sandbox.3,
                    network: sandbox.4,
                    cpu_limit_millicores: sandbox.5,
                    disk_limit_bytes: sandbox.6,
                }),
                branch_template: rest.0,
                commit_message: rest.1,
                max_parallelism: rest.2,
                max_attempts: rest.3,
                push: rest.4,
                retry_backoff_initial_ms: rest.5,
                retry_backoff_max_ms: rest.6,
                // Nasty flow values drawn from the same numbers: out-of-range priorities,
                // percentages and durations must be refused naming the field.
                flow: Some(v1::FlowSpec {
                    priority: Some(rest.2),
                    deadline_ms: rest.5,
                    waves: vec![
                        v1::WaveSize {
                            size: Some(v1::wave_size::Size::Percent(rest.3)),
                        },
                        v1::WaveSize { size: None },
                    ]
                    .into_iter()
                    .take(1 + (rest.2 % 2) as usize)
                    .collect(),
                    success_threshold_percent: Some(rest.3),
                    soak_ms: rest.6,
                    failure_limit: Some(rest.2),
                    ..Default::default()
                }),
            },
        )
}

fn policy() -> ExecutionPolicy {
    ExecutionPolicy {
        file_roots: vec!["/srv".into()],
        ..ExecutionPolicy::default()
    }
}

/// Validates like the SubmitFleet handler; a refusal must name a field and stay short.
fn submit_checks(spec: v1::FleetSpec) {
    let limits = SpecLimits::default();
    let checked = convert::fleet_spec_from_wire(Some(spec), &limits)
        .and_then(|spec| policy().check(&spec, "spec").map(|()| spec));
    match checked {
        Ok(spec) => {
            // An accepted spec survives the round trip to the wire and back unchanged.
            let again =
                convert::fleet_spec_from_wire(Some(convert::fleet_spec_to_wire(&spec)), &limits)
                    .expect("an accepted spec is accepted again");
            assert_eq!(again, spec);
        }
        Err(error) => {
            assert!(error.field.starts_with("spec"), "{error}");
            assert!(
                error.message.len() <= MAX_ERROR_MESSAGE_BYTES + 32,
                "{}",
                error.message.len()
            );
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn submitted_specs_are_validated_without_panics(spec in wire_spec()) {
        submit_checks(spec);
    }

    #[test]
    fn arbitrary_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(request) = v1::SubmitFleetRequest::decode(bytes.as_slice())
            && let Some(spec) = request.spec
        {
            submit_checks(spec);
        }
        if let Ok(report) = v1::ReportResultRequest::decode(bytes.as_slice()) {
            let _ = convert::attempt_result_from_wire(report.result, &result_limits());
        }
        let _ = v1::LeaseRunsRequest::decode(bytes.as_slice());
        let _ = v1::HeartbeatRequest::decode(bytes.as_slice());
        let _ = v1::WatchFleetRequest::decode(bytes.as_slice());
        let _ = v1::AddMemberRequest::decode(bytes.as_slice());
        let _ = flotilla_proto::raft::RaftMessage::decode(bytes.as_slice());
    }

    #[test]
    fn mutated_valid_requests_decode_or_fail_cleanly(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = valid_request().encode_to_vec();
        for (index, value) in flips {
            let at = index.index(bytes.len());
            bytes[at] = value;
        }
        if let Ok(request) = v1::SubmitFleetRequest::decode(bytes.as_slice())
            && let Some(spec) = request.spec
        {
            submit_checks(spec);
        }
    }

    #[test]
    fn reported_results_are_validated_without_panics(
        outcome in any::<i32>(), error in nasty_text(), log_tail in nasty_text(),
        patch in nasty_text(), commit in nasty_text(), exit_code in any::<i32>(),
        paths in prop::collection::vec(nasty_text(), 0..4),
    ) {
        let result = v1::RunResult {
            outcome,
            error,
            log_tail,
            patch,
            commit,
            exit_code,
            diffstat: paths
                .into_iter()
                .map(|path| v1::FileStat { path, insertions: 1, deletions: 2 })
                .collect(),
            ..Default::default()
        };
        if let Err(error) = convert::attempt_result_from_wire(Some(result), &result_limits()) {
            prop_assert!(error.field.starts_with("result"), "{}", error);
        }
    }

    #[test]
    fn repository_urls_are_checked_without_panics(url in nasty_text()) {
        let _ = policy().check_repository(&url);
        let _ = flotilla_scheduler::spec::repository_name(&url);
    }

    #[test]
    fn spec_files_parse_or_fail_cleanly(text in spec_file_text(), toml in any::<bool>()) {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join(if toml { "fleet.toml" } else { "fleet.yaml" });
        if let Ok(file) = spec_file::parse(&path, &text)
            && let Ok(spec) = file.into_wire(&path)
        {
            submit_checks(spec);
        }
    }
}

fn result_limits() -> ResultLimits {
    ResultLimits {
        max_log_tail_bytes: 65_536,
        max_patch_bytes: 1 << 20,
        max_diffstat_entries: 100,
        max_error_bytes: 65_536,
    }
}

fn valid_request() -> v1::SubmitFleetRequest {
    let text = "name: x\ntargets: {repositories: [file:///srv/a.git, https://github.com/o/r.git]}\n\
                agent: {command: cargo fmt, task: t, env: {A: b}}\nverify: [true]\n";
    let path = Path::new("/nonexistent/fleet.yaml");
    let spec = spec_file::parse(path, text)
        .and_then(|file| file.into_wire(path))
        .expect("a valid spec file");
    v1::SubmitFleetRequest {
        spec: Some(spec),
        idempotency_key: "k".into(),
        dry_run: false,
    }
}

/// Spec-file-like text: real keys with nasty values, and arbitrary text.
fn spec_file_text() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "name",
        "targets",
        "agent",
        "verify",
        "sandbox",
        "branch",
        "commit_message",
        "max_parallelism",
        "max_attempts",
        "push",
        "repositories",
        "globs",
        "command",
        "unknown",
    ]);
    prop_oneof![
        "\\PC{0,200}",
        prop::collection::vec((key, nasty_text()), 0..8).prop_map(|pairs| {
            pairs
                .into_iter()
                .map(|(key, value)| format!("{key}: {value:?}\n"))
                .collect()
        }),
        (nasty_text(), nasty_text()).prop_map(|(command, url)| {
            format!("name: fuzz\ntargets: {{repositories: [{url:?}]}}\nagent: {{command: {command:?}}}\n")
        }),
    ]
}
