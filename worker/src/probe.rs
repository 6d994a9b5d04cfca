//! The capability probe: at worker start, what this host can enforce, and whether that is enough.
//!
//! [`probe`] measures (never assumes): bubblewrap's version and the flags the sandbox needs, a
//! real sandbox start as the sandbox uid (user namespaces, `--disable-userns`, the init, Landlock
//! and seccomp all in place: the smoke command checks its own uid, `no_new_privs`, seccomp mode
//! and Landlock), the kernel's Landlock ABI, whether x32 system calls exist (the seccomp filter
//! does not cover them by number), the cgroup controllers (memory, pids, cpu) and the disk quota
//! method. [`CapabilityReport::refusal`] says why the worker must not start: a required
//! mechanism is missing and the operator did not allow that gap (`allow_without_landlock`,
//! `allow_without_cgroup_limits`, `allow_without_disk_quota`).

use std::path::Path;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::attempt_log::AttemptLog;
use crate::cgroup::{CgroupSupport, cgroup_support};
use crate::config::WorkerConfig;
use crate::sandbox::{SandboxCommand, SandboxDriver, run_sandboxed};

/// The lowest Landlock ABI the sandbox requires (file-system rights of ABI 5, scopes of ABI 6).
pub const LANDLOCK_REQUIRED_ABI: i32 = 6;

/// The bubblewrap flags the sandbox uses.
pub const REQUIRED_BUBBLEWRAP_FLAGS: &[&str] = &[
    "--disable-userns",
    "--assert-userns-disabled",
    "--unshare-user",
    "--cap-drop",
];

/// The kernel's Landlock ABI version (`landlock_create_ruleset(NULL, 0, VERSION)`), 0 or less
/// when Landlock is not available.
pub fn landlock_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the version query takes no pointer (NULL, size 0).
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0_usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(version).unwrap_or(0)
}

/// Whether the kernel accepts x32 system calls (x86_64 only; a harmless `getpid`). When it does,
/// the seccomp filter (by system call number) could be bypassed through them.
pub fn x32_system_calls_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        const X32_SYSCALL_BIT: libc::c_long = 0x4000_0000;
        // SAFETY: getpid takes no arguments; an unknown number only returns ENOSYS.
        let result = unsafe { libc::syscall(X32_SYSCALL_BIT | libc::SYS_getpid) };
        result >= 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// What the probe found (see the module documentation). Serializable for the node's status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CapabilityReport {
    /// `bwrap --version`, e.g. `bubblewrap 0.8.0`; `None` when it cannot run.
    pub bubblewrap_version: Option<String>,
    /// Required flags `bwrap --help` does not list.
    pub bubblewrap_missing_flags: Vec<String>,
    /// The kernel's Landlock ABI (≤ 0: none).
    pub landlock_abi: i32,
    /// Whether the kernel accepts x32 system calls (see [`x32_system_calls_available`]).
    pub x32_system_calls: bool,
    /// `v2`, `v1` or `unavailable`.
    pub cgroup_version: String,
    /// Why cgroups are unusable, if they are.
    pub cgroup_problem: Option<String>,
    /// Memory limits enforced.
    pub cgroup_memory: bool,
    /// Pids limits enforced.
    pub cgroup_pids: bool,
    /// CPU quotas enforced.
    pub cgroup_cpu: bool,
    /// How the workspace's disk quota is enforced (`loop-ext4`), `None` if it is not.
    pub disk_quota_method: Option<String>,
    /// Why no disk quota method is available.
    pub disk_quota_problem: Option<String>,
    /// What the smoke sandbox reported about itself (`uid=200000 no_new_privs=1 seccomp=2
    /// landlock=enforced`), or why it did not start.
    pub smoke_test: Result<String, String>,
}

impl CapabilityReport {
    /// Why the worker must not start with `config` on this host, or `None` when every required
    /// mechanism is there (or its absence is explicitly allowed).
    pub fn refusal(&self, config: &WorkerConfig) -> Option<String> {
        let mut problems = Vec::new();
        if let Err(message) = config.validate() {
            problems.push(message);
        }
        match &self.bubblewrap_version {
            None => problems.push(format!(
                "bubblewrap ({}) cannot be run",
                config.bwrap_path.display()
            )),
            Some(_) if !self.bubblewrap_missing_flags.is_empty() => problems.push(format!(
                "bubblewrap lacks {} (0.8.0 or newer is required)",
                self.bubblewrap_missing_flags.join(", ")
            )),
            Some(_) => {}
        }
        if self.landlock_abi < LANDLOCK_REQUIRED_ABI && !config.allow_without_landlock {
            problems.push(format!(
                "Landlock ABI {} (at least {LANDLOCK_REQUIRED_ABI} required; set allow_without_landlock to run without it)",
                self.landlock_abi
            ));
        }
        if self.x32_system_calls {
            problems.push(
                "the kernel accepts x32 system calls, which the seccomp filter does not cover (boot with syscall.x32=n)"
                    .to_owned(),
            );
        }
        if !config.allow_without_cgroup_limits {
            if !(self.cgroup_memory && self.cgroup_pids) {
                problems.push(format!(
                    "cgroup memory and pids limits cannot be applied ({}); set allow_without_cgroup_limits to run without them",
                    self.cgroup_problem.as_deref().unwrap_or("controller missing")
                ));
            }
            if !self.cgroup_cpu
                && (config.default_cpu_limit_millicores > 0
                    || config.total_cpu_limit_millicores > 0)
            {
                problems.push(
                    "no cgroup cpu controller for the CPU quota; set allow_without_cgroup_limits or default_cpu_limit_millicores = 0"
                        .to_owned(),
                );
            }
        }
        if self.disk_quota_method.is_none() && !config.allow_without_disk_quota {
            problems.push(format!(
                "no disk quota method ({}); set allow_without_disk_quota to run without one",
                self.disk_quota_problem.as_deref().unwrap_or("unknown")
            ));
        }
        match &self.smoke_test {
            Err(reason) => problems.push(format!("a test sandbox did not start: {reason}")),
            Ok(report) => {
                let words: Vec<&str> = report.split_whitespace().collect();
                let landlock_required =
                    self.landlock_abi >= LANDLOCK_REQUIRED_ABI || !config.allow_without_landlock;
                let mut expected = vec!["no_new_privs=1", "seccomp=2"];
                if landlock_required {
                    expected.push("landlock=enforced");
                }
                for word in expected {
                    if !words.contains(&word) {
                        problems.push(format!("the test sandbox does not report {word}: {report}"));
                    }
                }
                if words.contains(&"uid=0") {
                    problems.push(format!("the test sandbox ran as uid 0: {report}"));
                }
            }
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

async fn bubblewrap_facts(config: &WorkerConfig) -> (Option<String>, Vec<String>) {
    let version = tokio::process::Command::new(&config.bwrap_path)
        .arg("--version")
        .env_clear()
        .output()
        .await
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned());
    let help = tokio::process::Command::new(&config.bwrap_path)
        .arg("--help")
        .env_clear()
        .output()
        .await
        .map(|output| {
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            text
        })
        .unwrap_or_default();
    let missing = REQUIRED_BUBBLEWRAP_FLAGS
        .iter()
        .filter(|flag| !help.split_whitespace().any(|word| word == **flag))
        .map(|flag| (*flag).to_owned())
        .collect();
    (version, missing)
}

/// Whether loop-mounted ext4 workspaces can be made: `mkfs.ext4` runs, `/dev/loop-control`
/// exists, and the worker is root.
pub fn disk_quota_support() -> Result<&'static str, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (loop mounts need root)".to_owned());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err("no /dev/loop-control".to_owned());
    }
    match std::process::Command::new(crate::quota::MKFS_EXT4)
        .arg("-V")
        .output()
    {
        Ok(output) if output.status.success() => Ok("loop-ext4"),
        Ok(output) => Err(format!(
            "{} -V failed: {}",
            crate::quota::MKFS_EXT4,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(error) => Err(format!("cannot run {}: {error}", crate::quota::MKFS_EXT4)),
    }
}

/// The smoke command: prints what the sandbox enforces about itself.
const SMOKE_COMMAND: &str = "printf 'uid=%s no_new_privs=%s seccomp=%s ' \"$(id -u)\" \
     \"$(grep '^NoNewPrivs:' /proc/self/status | tr -dc 0-9)\" \
     \"$(grep '^Seccomp:' /proc/self/status | tr -dc 0-9)\"; \
     if touch /etc/flotilla-probe 2>/dev/null; then echo landlock=absent; else echo landlock=enforced; fi";

async fn smoke_test(config: &WorkerConfig) -> Result<String, String> {
    let directory = config
        .work_directory
        .join("probe")
        .join(std::process::id().to_string());
    let workspace = directory.join("workspace");
    std::fs::create_dir_all(&workspace)
        .map_err(|error| format!("cannot create {}: {error}", workspace.display()))?;
    let command = SandboxCommand {
        label: "probe".to_owned(),
        command_line: SMOKE_COMMAND.to_owned(),
        workspace_directory: workspace,
        scratch_directory: directory.join("scratch"),
        environment: Vec::new(),
        network: false,
        timeout_ms: 30_000,
        memory_limit_bytes: 0,
        pids_limit: 0,
        cpu_limit_millicores: 0,
        egress: None,
    };
    let mut log = AttemptLog::discard(4096);
    let result = run_sandboxed(
        config,
        SandboxDriver::Bubblewrap,
        &command,
        &mut log,
        &CancellationToken::new(),
    )
    .await;
    let _ = std::fs::remove_dir_all(&directory);
    match result {
        Ok(outcome) if outcome.succeeded() => Ok(outcome.log_tail.trim().to_owned()),
        Ok(outcome) => Err(format!(
            "{}: {}",
            outcome.describe(),
            outcome.log_tail.trim()
        )),
        Err(error) => Err(error.to_string()),
    }
}

/// Probes this host for `config` (see the module documentation). Runs one real sandbox.
pub async fn probe(config: &WorkerConfig) -> CapabilityReport {
    let (bubblewrap_version, bubblewrap_missing_flags) = bubblewrap_facts(config).await;
    let support = cgroup_support(
        &config.cgroup_mount_directory,
        &config.cgroup_parent_name,
        &config.parent_limits(),
    );
    let (disk_quota_method, disk_quota_problem) = match disk_quota_support() {
        Ok(method) => (Some(method.to_owned()), None),
        Err(problem) => (None, Some(problem)),
    };
    let smoke_test = if let Err(message) = config.validate() {
        Err(format!("not tried: {message}"))
    } else if bubblewrap_version.is_some() {
        smoke_test(config).await
    } else {
        Err("bubblewrap cannot be run".to_owned())
    };
    CapabilityReport {
        bubblewrap_version,
        bubblewrap_missing_flags,
        landlock_abi: landlock_abi(),
        x32_system_calls: x32_system_calls_available(),
        cgroup_version: support.version_name().to_owned(),
        cgroup_problem: match support.as_ref() {
            CgroupSupport::Unavailable { reason } => Some(reason.clone()),
            _ => None,
        },
        cgroup_memory: support.limits_memory(),
        cgroup_pids: support.limits_pids(),
        cgroup_cpu: support.limits_cpu(),
        disk_quota_method,
        disk_quota_problem,
        smoke_test,
    }
}

/// [`probe`], logged, then [`CapabilityReport::refusal`].
///
/// Errors: the refusal's reason.
pub async fn check_worker_start(config: &WorkerConfig) -> Result<CapabilityReport, String> {
    let report = probe(config).await;
    tracing::info!(
        bubblewrap = ?report.bubblewrap_version,
        landlock_abi = report.landlock_abi,
        x32_system_calls = report.x32_system_calls,
        cgroup = %report.cgroup_version,
        cgroup_memory = report.cgroup_memory,
        cgroup_pids = report.cgroup_pids,
        cgroup_cpu = report.cgroup_cpu,
        disk_quota = ?report.disk_quota_method,
        smoke_test = ?report.smoke_test,
        "sandbox capability probe"
    );
    match report.refusal(config) {
        Some(reason) => Err(reason),
        None => Ok(report),
    }
}
