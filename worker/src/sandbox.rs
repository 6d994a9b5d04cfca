//! Runs one shell command line (`/bin/sh -c <command>`) in a sandbox, with resource limits, a
//! wall-clock timeout, cancellation and log capture.
//!
//! # The `bwrap` driver (bubblewrap)
//!
//! - Namespaces: `--unshare-all` (mount, pid, net, ipc, uts, cgroup, user); `--die-with-parent`,
//!   `--new-session`, `--cap-drop ALL`. The host's network is never shared. Without network the
//!   sandbox's network namespace is bubblewrap's empty one (loopback only). With network
//!   ([`SandboxCommand::network`]) bubblewrap is started inside the attempt's own namespace
//!   ([`crate::egress`]: loopback only, with the attempt's proxy listening on it) by a `setns`
//!   before `exec`, and `--share-net` keeps it; the proxy variables
//!   ([`EgressAttachment::environment`]) are set last.
//! - File system: a fresh root (a tmpfs remounted read-only) with `/usr` (and the merged-usr symlinks `/bin`, `/lib`,
//!   `/lib64`, `/sbin`, or read-only binds where they are real directories), `--proc /proc`,
//!   `--dev /dev`, a private tmpfs at `/tmp`, and only these `/etc` entries, read-only:
//!   [`ETC_ENTRIES`] (plus `resolv.conf` with network). Never all of `/etc`, `/root` or `/home`.
//! - The repository is bound read-write at [`SANDBOX_WORKSPACE`] (the working directory) and its
//!   `.git` read-only on top, so the agent cannot plant hooks or configuration that host-side git
//!   would run. Git commands inside the sandbox can read the repository but not write it.
//! - Toolchains ([`WorkerConfig::toolchain_mounts`]) are bound read-only.
//! - Environment: bubblewrap is spawned with an empty environment (so `/proc/1/environ` inside
//!   is empty), then `--clearenv` and only `PATH=/opt/cargo/bin:/usr/local/bin:/usr/bin:/bin`,
//!   `HOME=/tmp`, `RUSTUP_HOME=/opt/rustup`, `CARGO_HOME=/tmp/cargo-home`, `LANG=C.UTF-8`,
//!   `GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0=/workspace`,
//!   `CARGO_NET_OFFLINE=true` when the network is off, then the command's own variables
//!   ([`SandboxCommand::environment`]: the fleet's `env`, the agent's secrets and the
//!   `FLOTILLA_*` variables). bwrap receives its options through `--args <fd>` from an
//!   unlinked private file, so no variable (secrets included) is in its command line; only the
//!   command (`-- /bin/sh -c <wrapper> flotilla-sandbox <command line>`) is.
//!
//! # The `none` driver
//!
//! A plain child process in its own process group, with the same environment (toolchain paths
//! mapped back to their host locations, `HOME`, `CARGO_HOME` and `TMPDIR` in
//! [`SandboxCommand::scratch_directory`]), limits, timeout and log handling, and no isolation.
//!
//! # Limits and killing
//!
//! Each command gets its own cgroup (see [`crate::cgroup`]) which its first process enters before
//! `bwrap` (or the shell) executes. When the timeout passes or the run is cancelled, the process
//! group and every process in the cgroup get SIGKILL; bubblewrap's pid namespace and
//! `--die-with-parent` take the rest. After the command exits, whatever is left in its cgroup is
//! killed too, and the cgroup removed. An OOM kill is recognised by the cgroup's `oom_kill`
//! counter.
//!
//! # Sandbox start detection
//!
//! The sandbox runs a tiny wrapper, `/bin/sh -c 'printf s >&3; exec 3>&-; exec /bin/sh -c "$1"'`,
//! that writes one byte to a pipe on fd 3 once the sandbox is set up, closes it and executes the
//! command. A command that ends without that byte means the sandbox failed to start
//! ([`SandboxError::Start`], a retryable infrastructure problem), not that the command failed.

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

use crate::attempt_log::{AttemptLog, TailBuffer};
use crate::cgroup::{CommandLimits, InvocationCgroup, cgroup_support};
use crate::config::{Mount, SANDBOX_RUSTUP_HOME, WorkerConfig};
use crate::denial::{Denial, Denials, LISTENER_SOCKET_FD, Supervisor, cgroup_denials};
use crate::egress::EgressAttachment;
use crate::egress::namespace::enter_namespace;
use crate::isolation::{SandboxUser, StagingMount, give_workspace_to};
use crate::sandbox_init::{InitInvocation, LandlockPolicy, SeccompMode, init_arguments};

/// Where the repository is mounted inside the sandbox (and the working directory).
pub const SANDBOX_WORKSPACE: &str = "/workspace";

/// `PATH` inside the sandbox.
pub const SANDBOX_PATH: &str = "/opt/cargo/bin:/usr/local/bin:/usr/bin:/bin";

/// `/etc` entries bound read-only into the sandbox when they exist on the host.
pub const ETC_ENTRIES: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "pki",
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "localtime",
];

/// `/etc` entries bound read-only into the sandbox only when it has network access.
pub const ETC_NETWORK_ENTRIES: &[&str] = &["resolv.conf", "gai.conf"];

/// Top-level directories that are merged-usr symlinks (`/bin -> usr/bin`) on most systems: they
/// are recreated as symlinks, or bound read-only if they are real directories.
const ROOT_LIBRARY_DIRECTORIES: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// The file descriptor on which the sandbox wrapper signals that the sandbox started.
const START_MARKER_FD: libc::c_int = 3;

/// The wrapper run by `/bin/sh -c` (see the module documentation); `$1` is the command line.
const START_WRAPPER: &str = "printf s >&3; exec 3>&-; exec /bin/sh -c \"$1\"";

/// How long to wait for the start marker after the sandbox process exited.
const MARKER_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Size of the buffer the output is read with.
const OUTPUT_READ_BUFFER_BYTES: usize = 64 * 1024;

/// Errors of [`run_sandboxed`] (failures of the sandbox, not of the command: a command that
/// exits non-zero is a successful [`SandboxOutcome`]).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The fleet names a driver this worker does not have.
    #[error("unknown sandbox driver {name:?} (expected \"bwrap\" or \"none\")")]
    UnknownDriver {
        /// The requested name.
        name: String,
    },
    /// An environment variable name is empty or contains `=` or NUL, or a value contains NUL.
    #[error("invalid environment variable {name:?}")]
    InvalidEnvironment {
        /// The variable's name.
        name: String,
    },
    /// The command line is empty or contains a NUL byte.
    #[error("invalid command line: {reason}")]
    InvalidCommand {
        /// Why.
        reason: String,
    },
    /// A file or directory the sandbox needs cannot be prepared.
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A pipe for the output or the start marker cannot be created.
    #[error("cannot create a pipe: {source}")]
    Pipe {
        /// The I/O error.
        source: std::io::Error,
    },
    /// The sandbox program (`bwrap`, or `/bin/sh` for the `none` driver) cannot be started (not
    /// found, not executable, or entering the cgroup failed).
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// The program.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The command asks for network under the `bwrap` driver but has no egress namespace
    /// ([`SandboxCommand::egress`]): refused rather than sharing the host's network.
    #[error("network requested without an egress namespace; refusing to share the host network")]
    NoEgressNamespace,
    /// The program started but the sandbox did not come up (e.g. bubblewrap could not create a
    /// namespace or mount); the command never ran.
    #[error("the sandbox did not start ({status}): {output}")]
    Start {
        /// The program's exit status, as text.
        status: String,
        /// The end of what it printed.
        output: String,
    },
    /// Waiting for the sandbox process failed.
    #[error("cannot wait for the sandbox process: {source}")]
    Wait {
        /// The I/O error.
        source: std::io::Error,
    },
    /// A limit is above what this worker (or the kernel) accepts; the command never ran.
    #[error("{field}: {value} is above the maximum {maximum} ({reason})")]
    LimitOutOfRange {
        /// The spec field, e.g. `sandbox.pids_limit`.
        field: &'static str,
        /// The requested value.
        value: u64,
        /// The highest accepted value.
        maximum: u64,
        /// Where the maximum comes from (a worker configuration key or a kernel file).
        reason: String,
    },
    /// The command's resource limits (cgroup) cannot be applied, so it is refused (fail closed):
    /// a problem of this worker's host, which another worker may not have.
    #[error("the resource limits cannot be applied, refusing to run without them: {reason}")]
    Limits {
        /// Why.
        reason: String,
    },
    /// A required isolation mechanism is missing on this host (e.g. Landlock), and the operator
    /// did not allow running without it.
    #[error("refusing to run: {reason}")]
    Unenforceable {
        /// Why.
        reason: String,
    },
    /// Every sandbox uid of [`WorkerConfig::sandbox_uid_count`] is in use.
    #[error("no free sandbox uid (sandbox_uid_count {count} in use)")]
    NoSandboxUser {
        /// The size of the uid range.
        count: u32,
    },
}

impl SandboxError {
    /// Whether the error is a transient infrastructure problem that another attempt may not hit
    /// (spawn, start, pipe, wait and preparation failures). Invalid input is not.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            SandboxError::UnknownDriver { .. }
                | SandboxError::InvalidEnvironment { .. }
                | SandboxError::InvalidCommand { .. }
                | SandboxError::NoEgressNamespace
                | SandboxError::LimitOutOfRange { .. }
        )
    }
}

/// How a command is isolated. More drivers can be added as variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SandboxDriver {
    /// bubblewrap (`bwrap`): namespaces, minimal read-only file system (the default).
    Bubblewrap,
    /// No isolation: a plain process in its own process group (for trusted commands on hosts
    /// without bubblewrap). Limits, timeout and logging still apply.
    None,
}

impl SandboxDriver {
    /// The driver for a `SandboxSpec.driver` name: `""` or `"bwrap"` (also `"bubblewrap"`) →
    /// [`SandboxDriver::Bubblewrap`], `"none"` → [`SandboxDriver::None`].
    ///
    /// Errors: [`SandboxError::UnknownDriver`] for any other name.
    pub fn from_name(name: &str) -> Result<Self, SandboxError> {
        match name {
            "" | "bwrap" | "bubblewrap" => Ok(SandboxDriver::Bubblewrap),
            "none" => Ok(SandboxDriver::None),
            other => Err(SandboxError::UnknownDriver {
                name: other.to_owned(),
            }),
        }
    }

    /// The driver's name as in `SandboxSpec.driver`: `"bwrap"` or `"none"`.
    pub fn name(self) -> &'static str {
        match self {
            SandboxDriver::Bubblewrap => "bwrap",
            SandboxDriver::None => "none",
        }
    }
}

/// One command to run in a sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxCommand {
    /// Short name for log notes and the cgroup name, e.g. `agent`, `verify-1`.
    pub label: String,
    /// The shell command line, run with `/bin/sh -c`. Not empty, no NUL byte.
    pub command_line: String,
    /// Host directory of the repository: bound at [`SANDBOX_WORKSPACE`] (the `none` driver runs
    /// in it directly). Its `.git`, if present, is bound read-only.
    pub workspace_directory: PathBuf,
    /// Host directory for the `none` driver's `HOME` (`home/`), `CARGO_HOME` (`cargo-home/`) and
    /// `TMPDIR` (`tmp/`); created when needed. Unused by `bwrap` (which has a private `/tmp`).
    pub scratch_directory: PathBuf,
    /// Variables set after the base environment, in order (a later one wins).
    pub environment: Vec<(String, String)>,
    /// Whether the command may reach the network, through the attempt's egress proxy only (the
    /// `bwrap` driver then needs [`SandboxCommand::egress`]). The `none` driver isolates nothing.
    pub network: bool,
    /// The attempt's egress namespace and proxy, used when `network` is set.
    pub egress: Option<EgressAttachment>,
    /// Wall-clock limit in milliseconds; the whole process tree is killed when it passes.
    pub timeout_ms: u64,
    /// cgroup memory limit in bytes; 0: [`WorkerConfig::default_memory_limit_bytes`].
    pub memory_limit_bytes: u64,
    /// cgroup pids limit; 0: [`WorkerConfig::default_pids_limit`].
    pub pids_limit: u32,
    /// CPU quota, thousandths of a CPU; 0: [`WorkerConfig::default_cpu_limit_millicores`].
    pub cpu_limit_millicores: u64,
}

/// What happened to a sandboxed command that started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxOutcome {
    /// The exit code, `None` when the process was killed by a signal. (With bubblewrap a command
    /// killed by signal `n` exits with `128 + n`.)
    pub exit_code: Option<i32>,
    /// The signal that killed the sandbox process, if any.
    pub signal: Option<i32>,
    /// The wall-clock limit passed and the process tree was killed.
    pub timed_out: bool,
    /// The cancellation token fired and the process tree was killed.
    pub cancelled: bool,
    /// The kernel's OOM killer killed a process of the command (memory limit reached).
    pub oom_killed: bool,
    /// Whether a cgroup (memory, pids and, when set, CPU limit) was applied (always, unless the
    /// operator set [`WorkerConfig::allow_without_cgroup_limits`] and cgroups are unusable).
    pub limits_applied: bool,
    /// From just before the spawn to the end of output capture, in milliseconds.
    pub duration_ms: u64,
    /// The last bytes (at most the log's tail capacity) of the command's output.
    pub log_tail: String,
    /// What the sandbox refused, as the kernel reported it: denied system calls (bubblewrap
    /// driver, through the seccomp supervisor of [`crate::denial`]) and reached cgroup limits.
    pub denials: Vec<Denial>,
}

impl SandboxOutcome {
    /// Exit code 0, not timed out, cancelled or OOM-killed.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && !self.cancelled && !self.oom_killed
    }

    /// A short description, e.g. `exited with code 3`, `timed out`, `killed by the OOM killer`.
    pub fn describe(&self) -> String {
        if self.cancelled {
            "cancelled".to_owned()
        } else if self.timed_out {
            "timed out".to_owned()
        } else if self.oom_killed {
            "killed by the OOM killer (memory limit reached)".to_owned()
        } else if let Some(code) = self.exit_code {
            format!("exited with code {code}")
        } else if let Some(signal) = self.signal {
            format!("killed by signal {signal}")
        } else {
            "ended with an unknown status".to_owned()
        }
    }
}

fn validate(command: &SandboxCommand) -> Result<(), SandboxError> {
    if command.command_line.trim().is_empty() {
        return Err(SandboxError::InvalidCommand {
            reason: "empty".to_owned(),
        });
    }
    if command.command_line.contains('\0') {
        return Err(SandboxError::InvalidCommand {
            reason: "contains a NUL byte".to_owned(),
        });
    }
    for (name, value) in &command.environment {
        if name.is_empty() || name.contains('=') || name.contains('\0') || value.contains('\0') {
            return Err(SandboxError::InvalidEnvironment { name: name.clone() });
        }
    }
    Ok(())
}

/// The environment of a command under `driver`: the base variables (see the module
/// documentation), then `command.environment`. For the `none` driver, toolchain paths are mapped
/// to their host sources and `HOME`, `CARGO_HOME`, `TMPDIR` point into the scratch directory.
pub fn sandbox_environment(
    config: &WorkerConfig,
    driver: SandboxDriver,
    command: &SandboxCommand,
) -> Vec<(String, String)> {
    let mut environment: Vec<(String, String)> = Vec::new();
    match driver {
        SandboxDriver::Bubblewrap => {
            environment.push(("PATH".to_owned(), SANDBOX_PATH.to_owned()));
            environment.push(("HOME".to_owned(), "/tmp".to_owned()));
            environment.push(("RUSTUP_HOME".to_owned(), SANDBOX_RUSTUP_HOME.to_owned()));
            environment.push(("CARGO_HOME".to_owned(), "/tmp/cargo-home".to_owned()));
            // The workspace is the sandbox uid's, its `.git` the worker's (read-only, shown as
            // the overflow uid): git inside needs `safe.directory` for it (as command-line
            // configuration, which git honours for that key).
            environment.push(("GIT_CONFIG_COUNT".to_owned(), "1".to_owned()));
            environment.push(("GIT_CONFIG_KEY_0".to_owned(), "safe.directory".to_owned()));
            environment.push((
                "GIT_CONFIG_VALUE_0".to_owned(),
                SANDBOX_WORKSPACE.to_owned(),
            ));
        }
        SandboxDriver::None => {
            let path: Vec<String> = SANDBOX_PATH
                .split(':')
                .filter_map(|entry| {
                    if let Some(host) = Mount::host_path(&config.toolchain_mounts, Path::new(entry))
                    {
                        Some(host.to_string_lossy().into_owned())
                    } else if entry.starts_with("/opt/") {
                        None
                    } else {
                        Some(entry.to_owned())
                    }
                })
                .collect();
            environment.push(("PATH".to_owned(), path.join(":")));
            let scratch = &command.scratch_directory;
            environment.push((
                "HOME".to_owned(),
                scratch.join("home").to_string_lossy().into_owned(),
            ));
            if let Some(rustup_home) =
                Mount::host_path(&config.toolchain_mounts, Path::new(SANDBOX_RUSTUP_HOME))
            {
                environment.push((
                    "RUSTUP_HOME".to_owned(),
                    rustup_home.to_string_lossy().into_owned(),
                ));
            }
            environment.push((
                "CARGO_HOME".to_owned(),
                scratch.join("cargo-home").to_string_lossy().into_owned(),
            ));
            environment.push((
                "TMPDIR".to_owned(),
                scratch.join("tmp").to_string_lossy().into_owned(),
            ));
        }
    }
    environment.push(("LANG".to_owned(), "C.UTF-8".to_owned()));
    if !command.network {
        environment.push(("CARGO_NET_OFFLINE".to_owned(), "true".to_owned()));
    }
    environment.extend(command.environment.iter().cloned());
    if driver == SandboxDriver::Bubblewrap
        && command.network
        && let Some(egress) = &command.egress
    {
        environment.extend(egress.environment());
    }
    environment
}

fn push_arguments(arguments: &mut Vec<OsString>, items: &[&str]) {
    arguments.extend(items.iter().map(OsString::from));
}

fn push_bind(arguments: &mut Vec<OsString>, source: &Path, target: &Path) {
    arguments.push(OsString::from("--bind"));
    arguments.push(source.as_os_str().to_owned());
    arguments.push(target.as_os_str().to_owned());
}

fn push_read_only_bind(arguments: &mut Vec<OsString>, source: &Path, target: &Path) {
    arguments.push(OsString::from("--ro-bind"));
    arguments.push(source.as_os_str().to_owned());
    arguments.push(target.as_os_str().to_owned());
}

/// Where the sandbox init is bound inside the sandbox.
pub const SANDBOX_INIT_PATH: &str = "/.flotilla/sandbox-init";

/// The host paths bubblewrap binds from the staging tree ([`StagingMount`], made by the worker as
/// root, reachable by the sandbox uid): the workspace, its `.git`, the per-command `/tmp` and
/// `/dev/shm`, the init, the toolchains. Plus whether the init applies Landlock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BubblewrapMounts {
    /// The workspace (bound read-write at [`SANDBOX_WORKSPACE`]).
    pub workspace: PathBuf,
    /// Its `.git` (bound read-only on top), if present.
    pub git: Option<PathBuf>,
    /// The tmpfs directory bound at `/tmp`.
    pub tmp: PathBuf,
    /// The tmpfs directory bound at `/dev/shm`.
    pub shm: PathBuf,
    /// The init executable (bound read-only at [`SANDBOX_INIT_PATH`]).
    pub init: PathBuf,
    /// Toolchain mounts: staged source and target.
    pub toolchains: Vec<(PathBuf, PathBuf)>,
    /// Whether the init applies Landlock (`false` only with `allow_without_landlock` on a kernel
    /// without it).
    pub landlock: bool,
}

/// The bubblewrap arguments for `command` with `environment` (from [`sandbox_environment`]) and
/// `mounts`, up to and including `--`, followed by the init's invocation and the command line.
/// Probes the host for which system directories and `/etc` entries exist.
pub fn bubblewrap_arguments(
    command: &SandboxCommand,
    environment: &[(String, String)],
    mounts: &BubblewrapMounts,
) -> Vec<OsString> {
    let (mut options, command_part) = bubblewrap_parts(command, environment, mounts);
    options.extend(command_part);
    options
}

/// [`bubblewrap_arguments`] in two parts: bubblewrap's options (the environment among them,
/// given to bubblewrap through an unlinked file with `--args`, so no value is on a command
/// line), and `--` with the init's invocation and the command (which bubblewrap wants on its
/// real command line).
fn bubblewrap_parts(
    command: &SandboxCommand,
    environment: &[(String, String)],
    mounts: &BubblewrapMounts,
) -> (Vec<OsString>, Vec<OsString>) {
    let mut arguments = Vec::new();
    push_arguments(
        &mut arguments,
        &[
            "--die-with-parent",
            "--new-session",
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--assert-userns-disabled",
            "--cap-drop",
            "ALL",
        ],
    );
    if command.network {
        // Shares the namespace bwrap was started in: the attempt's own (see `run_sandboxed`),
        // never the host's.
        push_arguments(&mut arguments, &["--share-net"]);
    }
    push_arguments(&mut arguments, &["--hostname", "flotilla-sandbox"]);
    push_read_only_bind(&mut arguments, Path::new("/usr"), Path::new("/usr"));
    let mut execute_roots = vec![PathBuf::from("/usr")];
    for name in ROOT_LIBRARY_DIRECTORIES {
        let host = Path::new("/").join(name);
        let Ok(metadata) = std::fs::symlink_metadata(&host) else {
            continue;
        };
        if metadata.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(&host) {
                arguments.push(OsString::from("--symlink"));
                arguments.push(target.into_os_string());
                arguments.push(host.into_os_string());
            }
        } else if metadata.is_dir() {
            push_read_only_bind(&mut arguments, &host, &host);
            execute_roots.push(host);
        }
    }
    push_arguments(&mut arguments, &["--proc", "/proc", "--dev", "/dev"]);
    push_bind(&mut arguments, &mounts.tmp, Path::new("/tmp"));
    push_bind(&mut arguments, &mounts.shm, Path::new("/dev/shm"));
    let network_entries: &[&str] = if command.network {
        ETC_NETWORK_ENTRIES
    } else {
        &[]
    };
    for name in ETC_ENTRIES.iter().chain(network_entries) {
        let host = Path::new("/etc").join(name);
        if host.exists() {
            push_read_only_bind(&mut arguments, &host, &host);
        }
    }
    for (source, target) in &mounts.toolchains {
        push_read_only_bind(&mut arguments, source, target);
        execute_roots.push(target.clone());
    }
    push_read_only_bind(&mut arguments, &mounts.init, Path::new(SANDBOX_INIT_PATH));
    push_bind(
        &mut arguments,
        &mounts.workspace,
        Path::new(SANDBOX_WORKSPACE),
    );
    if let Some(git) = &mounts.git {
        push_read_only_bind(
            &mut arguments,
            git,
            &Path::new(SANDBOX_WORKSPACE).join(".git"),
        );
    }
    execute_roots.push(PathBuf::from(SANDBOX_WORKSPACE));
    // The root tmpfs (where bubblewrap created the mount points) becomes read-only too.
    push_arguments(
        &mut arguments,
        &[
            "--remount-ro",
            "/",
            "--chdir",
            SANDBOX_WORKSPACE,
            "--clearenv",
        ],
    );
    for (name, value) in environment {
        push_arguments(&mut arguments, &["--setenv", name, value]);
    }
    let split = arguments.len();
    arguments.push(OsString::from("--"));
    arguments.push(OsString::from(SANDBOX_INIT_PATH));
    let invocation = InitInvocation {
        landlock: LandlockPolicy {
            enabled: mounts.landlock,
            execute_roots,
            write_roots: vec![PathBuf::from(SANDBOX_WORKSPACE)],
            write_noexec_roots: vec![PathBuf::from("/tmp"), PathBuf::from("/dev/shm")],
            device_roots: vec![PathBuf::from("/dev")],
        },
        seccomp: SeccompMode::Notify,
        command: vec![
            OsString::from("/bin/sh"),
            OsString::from("-c"),
            OsString::from(&command.command_line),
        ],
    };
    arguments.extend(init_arguments(&invocation));
    let command_part = arguments.split_off(split);
    (arguments, command_part)
}

/// The limits of `command` with the worker's defaults filled in, checked against the worker's
/// maxima and the kernel's (`/proc/sys/kernel/pid_max`).
///
/// Errors: [`SandboxError::LimitOutOfRange`] naming the spec field.
pub fn resolve_limits(
    config: &WorkerConfig,
    command: &SandboxCommand,
) -> Result<CommandLimits, SandboxError> {
    resolve_limit_values(
        config,
        command.memory_limit_bytes,
        command.pids_limit,
        command.cpu_limit_millicores,
    )
}

/// [`resolve_limits`] for the three values (0: the worker's default).
///
/// Errors: [`SandboxError::LimitOutOfRange`] naming the spec field.
pub fn resolve_limit_values(
    config: &WorkerConfig,
    memory_limit_bytes: u64,
    pids_limit: u32,
    cpu_limit_millicores: u64,
) -> Result<CommandLimits, SandboxError> {
    let memory_limit_bytes = if memory_limit_bytes == 0 {
        config.default_memory_limit_bytes
    } else {
        memory_limit_bytes
    };
    let pids_limit = if pids_limit == 0 {
        config.default_pids_limit
    } else {
        pids_limit
    };
    let cpu_limit_millicores = if cpu_limit_millicores == 0 {
        config.default_cpu_limit_millicores
    } else {
        cpu_limit_millicores
    };
    if memory_limit_bytes > config.memory_limit_max_bytes {
        return Err(SandboxError::LimitOutOfRange {
            field: "sandbox.memory_limit_bytes",
            value: memory_limit_bytes,
            maximum: config.memory_limit_max_bytes,
            reason: "worker setting memory_limit_max_bytes".to_owned(),
        });
    }
    let (pids_maximum, pids_reason) = match kernel_pid_max() {
        Some(kernel) if kernel < u64::from(config.pids_limit_max) => {
            (kernel, "kernel /proc/sys/kernel/pid_max".to_owned())
        }
        _ => (
            u64::from(config.pids_limit_max),
            "worker setting pids_limit_max".to_owned(),
        ),
    };
    if u64::from(pids_limit) > pids_maximum {
        return Err(SandboxError::LimitOutOfRange {
            field: "sandbox.pids_limit",
            value: u64::from(pids_limit),
            maximum: pids_maximum,
            reason: pids_reason,
        });
    }
    if cpu_limit_millicores > config.cpu_limit_max_millicores {
        return Err(SandboxError::LimitOutOfRange {
            field: "sandbox.cpu_limit_millicores",
            value: cpu_limit_millicores,
            maximum: config.cpu_limit_max_millicores,
            reason: "worker setting cpu_limit_max_millicores".to_owned(),
        });
    }
    Ok(CommandLimits {
        memory_limit_bytes,
        pids_limit,
        cpu_limit_millicores,
    })
}

/// The kernel's `pid_max`, if readable.
pub fn kernel_pid_max() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// Sends SIGKILL to the process group `process_group_id` (ignored when `None`).
fn kill_process_group(process_group_id: Option<u32>) {
    if let Some(id) = process_group_id.and_then(|id| libc::pid_t::try_from(id).ok())
        && id > 0
    {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-id, libc::SIGKILL);
        }
    }
}

/// Writes `arguments` NUL-separated into an unlinked private file (`O_TMPFILE`, mode 0600) and
/// returns it at offset 0, as a descriptor numbered 10 or above (clear of the start marker's
/// fixed number), close-on-exec until the child's `pre_exec` hook clears that. bubblewrap reads
/// it with `--args <fd>`, so the arguments — the environment with the run's secrets among them —
/// never appear in bwrap's command line (`/proc/<pid>/cmdline` is readable by every host user).
fn arguments_file(arguments: &[OsString]) -> Result<OwnedFd, SandboxError> {
    use std::io::{Seek as _, Write as _};
    use std::os::unix::ffi::OsStrExt as _;
    let error = |source| SandboxError::Pipe { source };
    let mut file = tempfile::tempfile().map_err(error)?;
    let mut bytes = Vec::new();
    for argument in arguments {
        bytes.extend_from_slice(argument.as_bytes());
        bytes.push(0);
    }
    file.write_all(&bytes).map_err(error)?;
    file.rewind().map_err(error)?;
    // SAFETY: fcntl(2) on a descriptor we own; the result is a new descriptor we then own.
    let duplicate = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if duplicate < 0 {
        return Err(error(std::io::Error::last_os_error()));
    }
    // SAFETY: `duplicate` is a fresh descriptor owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(duplicate) })
}

/// The seccomp listener's socket pair: the worker's end, running a [`Supervisor`], and the
/// sandbox's end as a descriptor numbered 10 or above, close-on-exec until the child's
/// `pre_exec` hook moves it to [`LISTENER_SOCKET_FD`].
fn listener_socket() -> Result<(Supervisor, OwnedFd), SandboxError> {
    let error = |source| SandboxError::Pipe { source };
    let (worker_end, sandbox_end) = std::os::unix::net::UnixStream::pair().map_err(error)?;
    // SAFETY: fcntl(2) on a descriptor we own; the result is a new descriptor we then own.
    let duplicate = unsafe { libc::fcntl(sandbox_end.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    if duplicate < 0 {
        return Err(error(std::io::Error::last_os_error()));
    }
    // SAFETY: `duplicate` is a fresh descriptor owned by nobody else.
    let sandbox_end = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(duplicate) };
    let supervisor = Supervisor::start(worker_end).map_err(error)?;
    Ok((supervisor, sandbox_end))
}

fn create_pipe() -> Result<(OwnedFd, tokio::net::unix::pipe::Receiver), SandboxError> {
    let (sender, receiver) =
        tokio::net::unix::pipe::pipe().map_err(|source| SandboxError::Pipe { source })?;
    let write_end = sender
        .into_blocking_fd()
        .map_err(|source| SandboxError::Pipe { source })?;
    Ok((write_end, receiver))
}

fn prepare_directory(path: &Path) -> Result<(), SandboxError> {
    std::fs::create_dir_all(path).map_err(|source| SandboxError::Prepare {
        path: path.to_path_buf(),
        source,
    })
}

/// Runs `command` under `driver`, appending its output to `log` (with `[flotilla]` notes before
/// and after), until it exits, its timeout passes or `cancel` fires.
///
/// Never waits longer than the timeout plus [`WorkerConfig::process_exit_wait_ms`] and
/// [`WorkerConfig::output_drain_timeout_ms`]. When cgroups are not usable the command runs
/// without limits (a warning is logged once).
///
/// Errors: invalid input ([`SandboxError::InvalidCommand`], [`SandboxError::InvalidEnvironment`]),
/// the sandbox could not be set up or started ([`SandboxError::Prepare`], [`SandboxError::Pipe`],
/// [`SandboxError::Spawn`], [`SandboxError::Start`]), or waiting failed. A command that fails,
/// times out, is cancelled or OOM-killed is an `Ok` outcome.
pub async fn run_sandboxed(
    config: &WorkerConfig,
    driver: SandboxDriver,
    command: &SandboxCommand,
    log: &mut AttemptLog,
    cancel: &CancellationToken,
) -> Result<SandboxOutcome, SandboxError> {
    validate(command)?;
    if !command.workspace_directory.is_dir() {
        return Err(SandboxError::Prepare {
            path: command.workspace_directory.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "workspace directory does not exist",
            ),
        });
    }
    // The network namespace bwrap starts in: the attempt's own when the command has network.
    let network_namespace_fd: Option<libc::c_int> = match (driver, command.network, &command.egress)
    {
        (SandboxDriver::Bubblewrap, true, Some(egress)) => Some(egress.namespace.as_raw_fd()),
        (SandboxDriver::Bubblewrap, true, None) => return Err(SandboxError::NoEgressNamespace),
        _ => None,
    };
    let environment = sandbox_environment(config, driver, command);
    if driver == SandboxDriver::None {
        for name in ["home", "cargo-home", "tmp"] {
            prepare_directory(&command.scratch_directory.join(name))?;
        }
    }
    let timeout_ms = command.timeout_ms.clamp(1, config.timeout_max_ms.max(1));
    let limits = resolve_limits(config, command)?;
    let memory_limit_bytes = limits.memory_limit_bytes;

    let support = cgroup_support(
        &config.cgroup_mount_directory,
        &config.cgroup_parent_name,
        &config.parent_limits(),
    );
    let mut cgroup = match InvocationCgroup::create(&support, &command.label, &limits) {
        Ok(cgroup) => Some(cgroup),
        Err(error) if config.allow_without_cgroup_limits => {
            tracing::warn!(%error, "cannot apply the command's limits; running without them (allow_without_cgroup_limits)");
            None
        }
        Err(error) => {
            let reason = error.to_string();
            log.note(&format!(
                "{}: refused: the resource limits cannot be applied: {reason}",
                command.label
            ));
            return Err(SandboxError::Limits { reason });
        }
    };
    let procs_files: Vec<CString> = match cgroup.as_ref().map(InvocationCgroup::procs_files) {
        Some(Ok(files)) => files,
        Some(Err(error)) => {
            if !config.allow_without_cgroup_limits {
                return Err(SandboxError::Limits {
                    reason: format!("unusable cgroup path: {error}"),
                });
            }
            tracing::warn!(%error, "unusable cgroup path; running without limits");
            cgroup = None;
            Vec::new()
        }
        None => Vec::new(),
    };

    // The bubblewrap sandbox's host side: an unprivileged uid owning the workspace, a noexec
    // tmpfs for /tmp and /dev/shm, descriptors for the binds.
    let mut sandbox_user: Option<SandboxUser> = None;
    let mut staging_guard: Option<StagingMount> = None;
    let mut mounts: Option<BubblewrapMounts> = None;
    if driver == SandboxDriver::Bubblewrap {
        let user = SandboxUser::acquire(config).ok_or(SandboxError::NoSandboxUser {
            count: config.sandbox_uid_count,
        })?;
        give_workspace_to(&command.workspace_directory, user.uid).map_err(|source| {
            SandboxError::Prepare {
                path: command.workspace_directory.clone(),
                source,
            }
        })?;
        let mut staging =
            StagingMount::create(config, user.uid).map_err(|source| SandboxError::Prepare {
                path: config.sandbox_staging_directory.clone(),
                source,
            })?;
        let mut stage = |path: &Path| -> Result<PathBuf, SandboxError> {
            staging.stage(path).map_err(|source| SandboxError::Prepare {
                path: path.to_path_buf(),
                source,
            })
        };
        let init_path =
            config
                .sandbox_init_executable()
                .map_err(|source| SandboxError::Prepare {
                    path: PathBuf::from("sandbox_init_path"),
                    source,
                })?;
        let workspace = stage(&command.workspace_directory)?;
        let git_directory = command.workspace_directory.join(".git");
        let git = if std::fs::symlink_metadata(&git_directory).is_ok() {
            Some(stage(&git_directory)?)
        } else {
            None
        };
        let mut toolchains = Vec::new();
        for mount in &config.toolchain_mounts {
            if mount.source.exists() {
                toolchains.push((stage(&mount.source)?, mount.target.clone()));
            } else {
                tracing::warn!(source = %mount.source.display(), "toolchain mount source does not exist; skipped");
            }
        }
        let init = stage(&init_path)?;
        let landlock = match crate::probe::landlock_abi() {
            abi if abi >= crate::probe::LANDLOCK_REQUIRED_ABI => true,
            _ if config.allow_without_landlock => false,
            abi => {
                return Err(SandboxError::Unenforceable {
                    reason: format!(
                        "the kernel's Landlock ABI is {abi}, at least {} is required (allow_without_landlock is off)",
                        crate::probe::LANDLOCK_REQUIRED_ABI
                    ),
                });
            }
        };
        mounts = Some(BubblewrapMounts {
            workspace,
            git,
            tmp: staging.tmp(),
            shm: staging.shm(),
            init,
            toolchains,
            landlock,
        });
        sandbox_user = Some(user);
        staging_guard = Some(staging);
    }
    let sandbox_uid: Option<libc::uid_t> = sandbox_user.as_ref().map(|user| user.uid);

    let (output_write, mut output_read) = create_pipe()?;
    let (marker_write, marker_read) = create_pipe()?;
    let stderr_write = output_write
        .try_clone()
        .map_err(|source| SandboxError::Pipe { source })?;

    let program = match driver {
        SandboxDriver::Bubblewrap => config.bwrap_path.clone(),
        SandboxDriver::None => PathBuf::from("/bin/sh"),
    };
    let mut process = tokio::process::Command::new(&program);
    let mut arguments_fd: Option<OwnedFd> = None;
    let mut supervisor: Option<Supervisor> = None;
    let mut listener_fd: Option<OwnedFd> = None;
    match (driver, &mounts) {
        (SandboxDriver::Bubblewrap, Some(mounts)) => {
            // bubblewrap itself (pid 1 inside) gets an empty environment: the command's comes
            // from --setenv, so /proc/1/environ holds nothing of the worker's. Its options (the
            // environment among them) come through an unlinked file (`--args`), so no value is
            // on a command line; the command itself stays on bwrap's real command line.
            let (options, command_arguments) = bubblewrap_parts(command, &environment, mounts);
            let file = arguments_file(&options)?;
            let (started_supervisor, sandbox_end) = listener_socket()?;
            supervisor = Some(started_supervisor);
            listener_fd = Some(sandbox_end);
            process
                .env_clear()
                .arg("--args")
                .arg(file.as_raw_fd().to_string())
                .args(command_arguments);
            arguments_fd = Some(file);
        }
        _ => {
            process
                .args([
                    "-c",
                    START_WRAPPER,
                    "flotilla-sandbox",
                    &command.command_line,
                ])
                .current_dir(&command.workspace_directory)
                .env_clear()
                .envs(environment.iter().map(|(name, value)| (name, value)));
        }
    }
    process
        .stdin(Stdio::null())
        .stdout(Stdio::from(output_write))
        .stderr(Stdio::from(stderr_write))
        .process_group(0)
        .kill_on_drop(true);
    let marker_fd = marker_write.as_raw_fd();
    let inherited_arguments_fd = arguments_fd.as_ref().map_or(-1, AsRawFd::as_raw_fd);
    let inherited_listener_fd = listener_fd.as_ref().map_or(-1, AsRawFd::as_raw_fd);
    // SAFETY: the hook runs in the forked child before exec and only makes async-signal-safe
    // system calls (setns, open, write, close, dup2, fcntl, setgroups, setgid, setuid) on data
    // prepared before the fork; it does not allocate (`last_os_error` only reads errno).
    unsafe {
        process.pre_exec(move || {
            if let Some(fd) = network_namespace_fd {
                enter_namespace(fd)?;
            }
            for path in &procs_files {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
            }
            if marker_fd == START_MARKER_FD {
                let flags = libc::fcntl(marker_fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(marker_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(marker_fd, START_MARKER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // After the marker: the marker's original number may be LISTENER_SOCKET_FD.
            if inherited_listener_fd >= 0
                && libc::dup2(inherited_listener_fd, LISTENER_SOCKET_FD) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if inherited_arguments_fd >= 0 {
                let flags = libc::fcntl(inherited_arguments_fd, libc::F_GETFD);
                if flags < 0
                    || libc::fcntl(
                        inherited_arguments_fd,
                        libc::F_SETFD,
                        flags & !libc::FD_CLOEXEC,
                    ) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Drop root: bubblewrap (and so everything in the sandbox) runs as the sandbox uid.
            if let Some(uid) = sandbox_uid
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    log.note(&format!("{}: {}", command.label, command.command_line));
    let started = Instant::now();
    let spawned = process.spawn();
    // Close our copies of the pipes' write ends, so reading ends when the sandbox's processes are
    // gone.
    drop(process);
    drop(marker_write);
    drop(arguments_fd);
    drop(listener_fd);
    let mut child = match spawned {
        Ok(child) => child,
        Err(source) => {
            log.note(&format!(
                "{}: cannot start {}: {source}",
                command.label,
                program.display()
            ));
            return Err(SandboxError::Spawn {
                path: program,
                source,
            });
        }
    };
    let process_group_id = child.id();

    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
    let mut command_tail = TailBuffer::new(log.tail_capacity_bytes());
    let mut buffer = vec![0_u8; OUTPUT_READ_BUFFER_BYTES];
    let mut output_open = true;
    let mut timed_out = false;
    let mut cancelled = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            read = output_read.read(&mut buffer), if output_open => match read {
                Ok(0) => output_open = false,
                Ok(count) => {
                    log.write(&buffer[..count]);
                    command_tail.push(&buffer[..count]);
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the command's output");
                    output_open = false;
                }
            },
            () = tokio::time::sleep_until(deadline), if !timed_out && !cancelled => {
                timed_out = true;
                kill_process_group(process_group_id);
                if let Some(cgroup) = &cgroup {
                    cgroup.kill_all();
                }
            }
            () = cancel.cancelled(), if !timed_out && !cancelled => {
                cancelled = true;
                kill_process_group(process_group_id);
                if let Some(cgroup) = &cgroup {
                    cgroup.kill_all();
                }
            }
        }
    };
    let status = match status {
        Ok(status) => status,
        Err(source) => return Err(SandboxError::Wait { source }),
    };

    // Kill what is left: background processes of the `none` driver (its process group; the group
    // still has members, so its id cannot have been reused), and anything in the cgroup.
    if driver == SandboxDriver::None {
        kill_process_group(process_group_id);
    }
    let process_exit_wait = Duration::from_millis(config.process_exit_wait_ms);
    if let Some(cgroup) = &cgroup
        && !cgroup.kill_and_wait(process_exit_wait).await
    {
        tracing::warn!(label = %command.label, "processes of a sandboxed command did not exit after SIGKILL");
    }

    // Read what is still buffered, until every writer is gone or the drain timeout passes.
    let drain_deadline =
        tokio::time::Instant::now() + Duration::from_millis(config.output_drain_timeout_ms);
    while output_open {
        match tokio::time::timeout_at(drain_deadline, output_read.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => output_open = false,
            Ok(Ok(count)) => {
                log.write(&buffer[..count]);
                command_tail.push(&buffer[..count]);
            }
            Err(_elapsed) => {
                tracing::warn!(label = %command.label, "leftover processes still hold the output open; stopped reading");
                break;
            }
        }
    }
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);

    let mut marker = [0_u8; 1];
    // Every writer of the marker pipe is gone by now, so this returns at once (the byte, or end
    // of file); the timeout only guards against the unexpected.
    let mut marker_read = marker_read;
    let sandbox_started = matches!(
        tokio::time::timeout(MARKER_READ_TIMEOUT, marker_read.read(&mut marker)).await,
        Ok(Ok(1))
    );

    let exit_code = status.code();
    let signal = status.signal();
    let mut oom_killed = false;
    let limits_applied = cgroup.is_some();
    let mut denials = Denials::default();
    if let Some(cgroup) = cgroup {
        denials = cgroup_denials(&cgroup.limit_events());
        let killed = signal == Some(libc::SIGKILL) || exit_code == Some(128 + libc::SIGKILL);
        oom_killed = match cgroup.oom_kill_count() {
            Some(count) => count > 0,
            None => killed && cgroup.memory_limit_hit(),
        };
        if let Err(error) = cgroup.finish(process_exit_wait).await {
            tracing::warn!(%error, "cannot remove a sandbox cgroup");
        }
    }

    // Every process of the sandbox is gone: collect the supervisor's count, detach the staging
    // tree, free the uid.
    if let Some(supervisor) = supervisor {
        for denial in supervisor.finish().await.to_vec() {
            denials.record(denial.mechanism, &denial.action, denial.count);
        }
    }
    drop(staging_guard);
    drop(sandbox_user);

    let outcome = SandboxOutcome {
        exit_code,
        signal,
        timed_out,
        cancelled,
        oom_killed,
        limits_applied,
        duration_ms,
        log_tail: command_tail.to_text(),
        denials: denials.to_vec(),
    };
    if !sandbox_started && !timed_out && !cancelled {
        let status_text = outcome.describe();
        log.note(&format!(
            "{}: the sandbox did not start ({status_text})",
            command.label
        ));
        return Err(SandboxError::Start {
            status: status_text,
            output: outcome.log_tail,
        });
    }
    let limit_note = if oom_killed {
        format!(" (memory limit {memory_limit_bytes} bytes)")
    } else {
        String::new()
    };
    log.note(&format!(
        "{}: {}{limit_note} after {duration_ms} ms",
        command.label,
        outcome.describe()
    ));
    if !outcome.denials.is_empty() {
        let listed: Vec<String> = outcome
            .denials
            .iter()
            .map(|denial| format!("{} {} x{}", denial.mechanism, denial.action, denial.count))
            .collect();
        log.note(&format!(
            "{}: the sandbox refused: {}",
            command.label,
            listed.join(", ")
        ));
    }
    Ok(outcome)
}

/// Measures one sandbox start: runs `true` under `driver` in a fresh empty workspace (under
/// `<work_directory>/bench/`, removed afterwards), with the default limits, and returns the
/// wall-clock time of the whole invocation (cgroup setup, sandbox setup, exit, teardown).
///
/// Errors: as [`run_sandboxed`]; [`SandboxError::Start`] when `true` does not succeed.
pub async fn measure_sandbox_start(
    config: &WorkerConfig,
    driver: SandboxDriver,
) -> Result<Duration, SandboxError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let directory = config.work_directory.join("bench").join(format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let workspace_directory = directory.join("workspace");
    prepare_directory(&workspace_directory)?;
    let command = SandboxCommand {
        label: "bench".to_owned(),
        command_line: "true".to_owned(),
        workspace_directory,
        scratch_directory: directory.join("scratch"),
        environment: Vec::new(),
        network: false,
        egress: None,
        timeout_ms: 60_000,
        memory_limit_bytes: 0,
        pids_limit: 0,
        cpu_limit_millicores: 0,
    };
    let mut log = AttemptLog::discard(4096);
    let started = Instant::now();
    let result = run_sandboxed(
        config,
        driver,
        &command,
        &mut log,
        &CancellationToken::new(),
    )
    .await;
    let elapsed = started.elapsed();
    if let Err(error) = std::fs::remove_dir_all(&directory) {
        tracing::warn!(directory = %directory.display(), %error, "cannot remove a benchmark directory");
    }
    let outcome = result?;
    if !outcome.succeeded() {
        return Err(SandboxError::Start {
            status: outcome.describe(),
            output: outcome.log_tail,
        });
    }
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SANDBOX_CARGO_BIN;

    fn command(network: bool) -> SandboxCommand {
        SandboxCommand {
            label: "agent".to_owned(),
            command_line: "echo hi".to_owned(),
            workspace_directory: PathBuf::from("/nonexistent/ws"),
            scratch_directory: PathBuf::from("/nonexistent/scratch"),
            environment: vec![("FLOTILLA_TASK".to_owned(), "do it".to_owned())],
            network,
            egress: None,
            timeout_ms: 1000,
            memory_limit_bytes: 0,
            pids_limit: 0,
            cpu_limit_millicores: 0,
        }
    }

    #[test]
    fn driver_names() {
        assert_eq!(
            SandboxDriver::from_name("").unwrap(),
            SandboxDriver::Bubblewrap
        );
        assert_eq!(
            SandboxDriver::from_name("bwrap").unwrap(),
            SandboxDriver::Bubblewrap
        );
        assert_eq!(
            SandboxDriver::from_name("none").unwrap(),
            SandboxDriver::None
        );
        assert!(matches!(
            SandboxDriver::from_name("docker"),
            Err(SandboxError::UnknownDriver { .. })
        ));
    }

    fn mounts() -> BubblewrapMounts {
        BubblewrapMounts {
            workspace: PathBuf::from("/staging/ws"),
            git: Some(PathBuf::from("/staging/git")),
            tmp: PathBuf::from("/staging/tmp"),
            shm: PathBuf::from("/staging/shm"),
            init: PathBuf::from("/staging/init"),
            toolchains: vec![(
                PathBuf::from("/staging/cargo"),
                PathBuf::from(SANDBOX_CARGO_BIN),
            )],
            landlock: true,
        }
    }

    #[test]
    fn bubblewrap_arguments_isolate() {
        let config = WorkerConfig::default();
        let offline = command(false);
        let environment = sandbox_environment(&config, SandboxDriver::Bubblewrap, &offline);
        let arguments: Vec<String> = bubblewrap_arguments(&offline, &environment, &mounts())
            .into_iter()
            .map(|argument| argument.to_string_lossy().into_owned())
            .collect();
        let joined = arguments.join(" ");
        assert!(joined.contains("--unshare-all"));
        assert!(!joined.contains("--share-net"));
        assert!(joined.contains("--clearenv"));
        assert!(joined.contains("--cap-drop ALL"));
        assert!(joined.contains("--remount-ro /"));
        assert!(joined.contains("--disable-userns --assert-userns-disabled"));
        assert!(joined.contains("--bind /staging/ws /workspace"));
        assert!(joined.contains("--ro-bind /staging/git /workspace/.git"));
        assert!(joined.contains("--bind /staging/tmp /tmp"));
        assert!(joined.contains("--bind /staging/shm /dev/shm"));
        assert!(joined.contains("--ro-bind /staging/cargo /opt/cargo/bin"));
        assert!(joined.contains(&format!(
            "-- {SANDBOX_INIT_PATH} sandbox-init --landlock required"
        )));
        assert!(joined.contains("--exec /opt/cargo/bin"));
        assert!(joined.contains("--write /workspace"));
        assert!(joined.contains("--write-noexec /tmp --write-noexec /dev/shm"));
        assert!(joined.contains("--setenv FLOTILLA_TASK do it"));
        assert!(joined.contains("--setenv CARGO_NET_OFFLINE true"));
        assert!(!joined.contains("resolv.conf"));
        assert!(
            !arguments
                .iter()
                .any(|argument| argument == "/etc" || argument == "/root" || argument == "/home")
        );
        assert_eq!(arguments.last().map(String::as_str), Some("echo hi"));

        let online = command(true);
        let environment = sandbox_environment(&config, SandboxDriver::Bubblewrap, &online);
        let joined = bubblewrap_arguments(&online, &environment, &mounts())
            .into_iter()
            .map(|argument| argument.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(joined.contains("--share-net"));
        assert!(!joined.contains("CARGO_NET_OFFLINE"));
    }

    #[test]
    fn none_driver_environment_maps_toolchains() {
        let config = WorkerConfig {
            toolchain_mounts: vec![Mount {
                source: PathBuf::from("/host/cargo/bin"),
                target: PathBuf::from(SANDBOX_CARGO_BIN),
            }],
            ..WorkerConfig::default()
        };
        let environment = sandbox_environment(&config, SandboxDriver::None, &command(false));
        let path = environment
            .iter()
            .find(|(name, _)| name == "PATH")
            .map(|(_, value)| value.as_str());
        assert_eq!(path, Some("/host/cargo/bin:/usr/local/bin:/usr/bin:/bin"));
        assert!(!environment.iter().any(|(name, _)| name == "RUSTUP_HOME"));
    }

    #[test]
    fn invalid_input_is_rejected() {
        let mut bad = command(false);
        bad.environment.push(("A=B".to_owned(), "x".to_owned()));
        assert!(matches!(
            validate(&bad),
            Err(SandboxError::InvalidEnvironment { .. })
        ));
        let mut empty = command(false);
        empty.command_line = "  ".to_owned();
        assert!(matches!(
            validate(&empty),
            Err(SandboxError::InvalidCommand { .. })
        ));
    }
}
