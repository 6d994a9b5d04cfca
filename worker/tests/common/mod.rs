//! Helpers shared by the integration tests: temporary work directories, real git repositories,
//! process scans.
#![allow(dead_code)]

pub mod bait;
pub mod files;
pub mod netns;

use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_worker::attempt_log::AttemptLog;
use flotilla_worker::config::WorkerConfig;
use flotilla_worker::sandbox::{
    SandboxCommand, SandboxDriver, SandboxError, SandboxOutcome, run_sandboxed,
};
use tokio_util::sync::CancellationToken;

/// A worker configuration whose work directory is `work_directory`.
pub fn test_config(work_directory: &Path) -> WorkerConfig {
    WorkerConfig {
        work_directory: work_directory.to_path_buf(),
        sandbox_init_path: Some(PathBuf::from(env!("CARGO_BIN_EXE_flotilla-sandbox-init"))),
        ..WorkerConfig::default()
    }
}

/// A sandbox command in `workspace` with a 20 s timeout and default limits.
pub fn sandbox_command(workspace: &Path, command_line: &str) -> SandboxCommand {
    SandboxCommand {
        label: "test".to_owned(),
        command_line: command_line.to_owned(),
        workspace_directory: workspace.to_path_buf(),
        scratch_directory: workspace.with_extension("scratch"),
        environment: vec![("FLOTILLA_TASK".to_owned(), "test task".to_owned())],
        network: false,
        egress: None,
        timeout_ms: 20_000,
        memory_limit_bytes: 0,
        pids_limit: 0,
        cpu_limit_millicores: 0,
    }
}

/// Runs `command` and returns the outcome and the log.
pub async fn run(
    config: &WorkerConfig,
    driver: SandboxDriver,
    command: &SandboxCommand,
) -> (Result<SandboxOutcome, SandboxError>, AttemptLog) {
    let mut log = AttemptLog::create(
        &config.logs_directory().join("test.log"),
        config.log_max_bytes,
        64 * 1024,
    )
    .expect("create log");
    let result = run_sandboxed(config, driver, command, &mut log, &CancellationToken::new()).await;
    (result, log)
}

/// Runs host git with a fixed identity; panics unless it succeeds. Returns trimmed stdout.
pub fn git(directory: &Path, arguments: &[&str]) -> String {
    let output = Command::new("git")
        .args([
            "-c",
            "user.name=Test",
            "-c",
            "user.email=test@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(arguments)
        .current_dir(directory)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("run git");
    assert!(
        output.status.success(),
        "git {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Whether host git succeeds.
pub fn git_succeeds(directory: &Path, arguments: &[&str]) -> bool {
    Command::new("git")
        .args(arguments)
        .current_dir(directory)
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false)
}

/// Creates a bare origin `<root>/origin.git` whose `main` has `README.md`, `.gitignore`
/// (`ignored/`, `target/`) and `src/lib.rs`. Returns its path.
pub fn make_origin(root: &Path) -> PathBuf {
    let origin = root.join("origin.git");
    let seed = root.join("seed");
    std::fs::create_dir_all(&seed).unwrap();
    git(
        root,
        &[
            "init",
            "--quiet",
            "--bare",
            "-b",
            "main",
            origin.to_str().unwrap(),
        ],
    );
    git(&seed, &["init", "--quiet", "-b", "main"]);
    std::fs::write(seed.join("README.md"), "# Test\n").unwrap();
    std::fs::write(seed.join(".gitignore"), "ignored/\ntarget/\n").unwrap();
    std::fs::create_dir_all(seed.join("src")).unwrap();
    std::fs::write(seed.join("src/lib.rs"), "pub fn one() -> u32 {\n    1\n}\n").unwrap();
    git(&seed, &["add", "-A"]);
    git(&seed, &["commit", "--quiet", "-m", "initial"]);
    git(
        &seed,
        &["remote", "add", "origin", origin.to_str().unwrap()],
    );
    git(&seed, &["push", "--quiet", "origin", "main"]);
    origin
}

/// Adds a commit creating `file_name` to `main` of the origin, through the seed clone that
/// [`make_origin`] left in `<root>/seed`.
pub fn add_origin_commit(root: &Path, file_name: &str) {
    let seed = root.join("seed");
    std::fs::write(seed.join(file_name), "more\n").unwrap();
    git(&seed, &["add", "-A"]);
    git(&seed, &["commit", "--quiet", "-m", "more"]);
    git(&seed, &["push", "--quiet", "origin", "main"]);
}

/// Process ids whose command line is exactly `arguments` (NUL-separated in /proc).
pub fn processes_with_command_line(arguments: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = arguments
        .iter()
        .flat_map(|argument| argument.bytes().chain([0]))
        .collect();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(process_id) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(command_line) = std::fs::read(entry.path().join("cmdline"))
            && command_line == wanted
        {
            found.push(process_id);
        }
    }
    found
}

/// Removes a file when dropped.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
