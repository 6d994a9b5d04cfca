//! `flotilla` child processes inside network namespaces, and the faults applied to them.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The `flotilla` binary under test.
///
/// `FLOTILLA_BIN` names it explicitly; otherwise it is `<target>/debug/flotilla` next to this
/// test executable (`<target>/debug/deps/<test>-<hash>`). That binary must be at least as new
/// as the sources it is built from, so that a `cargo test -p flotilla-chaos-tests` never tests
/// an old build: `cargo build -p flotilla` first (a workspace `cargo test` builds it anyway).
///
/// # Errors
/// When the binary is missing or older than a source file of the crates it is built from.
pub fn flotilla_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("FLOTILLA_BIN") {
        let path = PathBuf::from(path);
        anyhow::ensure!(
            path.is_file(),
            "FLOTILLA_BIN={} is not a file",
            path.display()
        );
        return Ok(path);
    }
    let executable = std::env::current_exe().context("current_exe")?;
    let directory = executable
        .parent()
        .and_then(Path::parent)
        .context("test executable has no <target>/<profile> directory")?;
    let binary = directory.join("flotilla");
    if !binary.is_file() {
        bail!(
            "{} is missing: build it with `cargo build -p flotilla` (or run the workspace \
             tests, which build it), or name a binary with FLOTILLA_BIN",
            binary.display()
        );
    }
    let built = binary.metadata()?.modified()?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for krate in ["proto", "scheduler", "raft", "worker", "node"] {
        newest_source(&workspace.join(krate), &mut newest);
    }
    if let Some((modified, path)) = newest
        && modified > built
    {
        bail!(
            "{} is older than {}: rebuild it with `cargo build -p flotilla` (or name a binary \
             with FLOTILLA_BIN)",
            binary.display(),
            path.display()
        );
    }
    Ok(binary)
}

fn newest_source(directory: &Path, newest: &mut Option<(std::time::SystemTime, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            // Integration tests, benchmarks and examples are not part of the binary.
            let not_built = ["tests", "benches", "examples", "target"];
            if !not_built.contains(&name.as_ref()) && !name.starts_with('.') {
                newest_source(&path, newest);
            }
        } else if (name.ends_with(".rs") || name.ends_with(".proto") || name == "Cargo.toml")
            && let Ok(modified) = entry.metadata().and_then(|m| m.modified())
            && newest.as_ref().is_none_or(|(time, _)| modified > *time)
        {
            *newest = Some((modified, path));
        }
    }
}

/// A `flotilla` process started with `ip netns exec NAMESPACE flotilla ...`.
///
/// `ip netns exec` execs in place, so the child's pid is flotilla's: signals reach it directly.
/// Its stderr and stdout are appended to `log`. The child gets `SIGKILL` when the test thread
/// that started it dies, and on drop.
#[derive(Debug)]
pub struct Process {
    /// Name in messages, e.g. `voter2`.
    pub name: String,
    /// Where its output goes.
    pub log: PathBuf,
    child: Child,
}

impl Process {
    /// Starts `binary arguments...` in `namespace`.
    ///
    /// # Errors
    /// When the log cannot be opened or the process cannot be started.
    pub fn spawn(
        name: &str,
        namespace: &str,
        binary: &Path,
        arguments: &[String],
        log: &Path,
    ) -> Result<Process> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        writeln!(
            file,
            "===== chaos: starting {name}: {} {}",
            binary.display(),
            arguments.join(" ")
        )?;
        let stdout = file.try_clone()?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", namespace])
            .arg(binary)
            .args(arguments)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(file);
        // SAFETY: the closure only calls prctl, which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("start {name} in namespace {namespace}"))?;
        Ok(Process {
            name: name.to_string(),
            log: log.to_path_buf(),
            child,
        })
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Whether it still runs (a stopped process counts as running).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// `kill -9`, then reaps it.
    pub fn kill(&mut self) {
        if self.is_running() {
            self.signal(libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// `kill -STOP`: the process freezes, its sockets stay open.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// `kill -CONT`.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// `SIGTERM`, then `SIGKILL` if it has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        if !self.is_running() {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "chaos: {} ignored SIGTERM for {grace:?}; killing it",
            self.name
        );
        self.kill();
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.is_running() {
            self.signal(libc::SIGCONT);
        }
        self.kill();
    }
}

/// The last `lines` lines of the file at `path` (empty if unreadable).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
