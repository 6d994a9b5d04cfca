//! Resource limits: one cgroup per sandboxed command, with a memory, a pids and a CPU limit, under
//! a parent cgroup whose totals the operator sets ([`ParentLimits`]), so the worker's commands
//! together can never take more than that from the host (and the voter it may share it with).
//!
//! Supports cgroup v2 (the unified hierarchy at `<mount>/`, when `cgroup.controllers` lists
//! `memory` and/or `pids`) and v1 (`<mount>/memory/`, `<mount>/pids/`). The worker creates
//! `<parent>/` (e.g. `/sys/fs/cgroup/flotilla`) once, then one child per command, which the
//! command's first process enters before it executes anything (race-free: the forked child writes
//! to `cgroup.procs` in a `pre_exec` hook). Afterwards every process left in the cgroup is killed
//! and the cgroup removed.
//!
//! Fail closed: when a limit the command needs cannot be applied (no usable cgroup, a controller
//! missing, a limit file that cannot be written), [`InvocationCgroup::create`] fails and the
//! sandbox refuses to run the command. The capability probe ([`crate::probe`]) refuses to start
//! the worker in that case unless the operator set `allow_without_cgroup_limits`.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What the worker can use for resource limits on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupSupport {
    /// cgroup v2: command cgroups are created under `parent_directory`, with the controllers that
    /// are available.
    V2 {
        /// E.g. `/sys/fs/cgroup/flotilla`.
        parent_directory: PathBuf,
        /// Whether the memory controller is enabled for the children.
        memory: bool,
        /// Whether the pids controller is enabled for the children.
        pids: bool,
        /// Whether the cpu controller is enabled for the children.
        cpu: bool,
    },
    /// cgroup v1: one parent per available controller hierarchy.
    V1 {
        /// E.g. `/sys/fs/cgroup/memory/flotilla`, `None` without a memory hierarchy.
        memory_parent_directory: Option<PathBuf>,
        /// E.g. `/sys/fs/cgroup/pids/flotilla`, `None` without a pids hierarchy.
        pids_parent_directory: Option<PathBuf>,
        /// E.g. `/sys/fs/cgroup/cpu/flotilla`, `None` without a cpu hierarchy.
        cpu_parent_directory: Option<PathBuf>,
    },
    /// No limits can be applied; `reason` says why.
    Unavailable {
        /// Human-readable reason.
        reason: String,
    },
}

impl CgroupSupport {
    /// Whether memory limits are applied.
    pub fn limits_memory(&self) -> bool {
        match self {
            CgroupSupport::V2 { memory, .. } => *memory,
            CgroupSupport::V1 {
                memory_parent_directory,
                ..
            } => memory_parent_directory.is_some(),
            CgroupSupport::Unavailable { .. } => false,
        }
    }

    /// Whether CPU limits are applied.
    pub fn limits_cpu(&self) -> bool {
        match self {
            CgroupSupport::V2 { cpu, .. } => *cpu,
            CgroupSupport::V1 {
                cpu_parent_directory,
                ..
            } => cpu_parent_directory.is_some(),
            CgroupSupport::Unavailable { .. } => false,
        }
    }

    /// `"v2"`, `"v1"` or `"unavailable"`.
    pub fn version_name(&self) -> &'static str {
        match self {
            CgroupSupport::V2 { .. } => "v2",
            CgroupSupport::V1 { .. } => "v1",
            CgroupSupport::Unavailable { .. } => "unavailable",
        }
    }

    /// Whether pids limits are applied.
    pub fn limits_pids(&self) -> bool {
        match self {
            CgroupSupport::V2 { pids, .. } => *pids,
            CgroupSupport::V1 {
                pids_parent_directory,
                ..
            } => pids_parent_directory.is_some(),
            CgroupSupport::Unavailable { .. } => false,
        }
    }
}

/// The CPU period of a CPU quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_period_us`), microseconds.
pub const CPU_PERIOD_MICROSECONDS: u64 = 100_000;

/// The totals of the parent cgroup, which every sandboxed command of this worker shares; 0
/// leaves that total unlimited (not recommended on a host shared with a voter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ParentLimits {
    /// Memory of all commands together, bytes.
    pub memory_limit_bytes: u64,
    /// Processes and threads of all commands together.
    pub pids_limit: u32,
    /// CPU of all commands together, thousandths of a CPU.
    pub cpu_limit_millicores: u64,
}

/// The limits of one sandboxed command; 0 for `cpu_limit_millicores` means no CPU quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommandLimits {
    /// Memory (and memory + swap) limit, bytes; must be > 0.
    pub memory_limit_bytes: u64,
    /// Processes and threads; must be > 0.
    pub pids_limit: u32,
    /// CPU quota in thousandths of a CPU (1000 = one CPU), 0 for none.
    pub cpu_limit_millicores: u64,
}

/// The CPU quota in microseconds per [`CPU_PERIOD_MICROSECONDS`] for `millicores`.
pub fn cpu_quota_microseconds(millicores: u64) -> u64 {
    (millicores.saturating_mul(CPU_PERIOD_MICROSECONDS) / 1000).max(1000)
}

fn valid_parent_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('/').all(|component| {
            !component.is_empty()
                && component != "."
                && component != ".."
                && component
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
        })
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|text| text.trim().to_owned())
}

fn write_file(path: &Path, value: &str) -> std::io::Result<()> {
    std::fs::write(path, value.as_bytes())
}

/// Detects cgroup support under `mount_directory` and prepares `<parent_name>` (creating it and,
/// for v2, enabling the memory, pids and cpu controllers for its children), then writes the
/// parent's totals (`parent_limits`). Never fails: problems give [`CgroupSupport::Unavailable`]
/// (a total that cannot be written makes the whole support unavailable: fail closed).
pub fn detect_cgroup_support(
    mount_directory: &Path,
    parent_name: &str,
    parent_limits: &ParentLimits,
) -> CgroupSupport {
    if !valid_parent_name(parent_name) {
        return CgroupSupport::Unavailable {
            reason: format!("invalid cgroup parent name {parent_name:?}"),
        };
    }
    let support = match read_trimmed(&mount_directory.join("cgroup.controllers")) {
        // A v2 hierarchy with no controllers (a hybrid host's `unified`) is not used.
        Some(controllers) if !controllers.is_empty() => {
            detect_v2(mount_directory, parent_name, &controllers)
        }
        _ => detect_v1(mount_directory, parent_name),
    };
    match write_parent_limits(&support, parent_limits) {
        Ok(()) => support,
        Err(reason) => CgroupSupport::Unavailable { reason },
    }
}

fn write_parent_limits(support: &CgroupSupport, limits: &ParentLimits) -> Result<(), String> {
    let write = |path: PathBuf, value: String| {
        write_file(&path, &value)
            .map_err(|error| format!("cannot write {value} to {}: {error}", path.display()))
    };
    match support {
        CgroupSupport::Unavailable { .. } => Ok(()),
        CgroupSupport::V2 {
            parent_directory,
            memory,
            pids,
            cpu,
        } => {
            if *memory && limits.memory_limit_bytes > 0 {
                write(
                    parent_directory.join("memory.max"),
                    limits.memory_limit_bytes.to_string(),
                )?;
            }
            if *pids && limits.pids_limit > 0 {
                write(
                    parent_directory.join("pids.max"),
                    limits.pids_limit.to_string(),
                )?;
            }
            if *cpu && limits.cpu_limit_millicores > 0 {
                write(
                    parent_directory.join("cpu.max"),
                    format!(
                        "{} {CPU_PERIOD_MICROSECONDS}",
                        cpu_quota_microseconds(limits.cpu_limit_millicores)
                    ),
                )?;
            }
            Ok(())
        }
        CgroupSupport::V1 {
            memory_parent_directory,
            pids_parent_directory,
            cpu_parent_directory,
        } => {
            if let Some(directory) = memory_parent_directory
                && limits.memory_limit_bytes > 0
            {
                write(
                    directory.join("memory.limit_in_bytes"),
                    limits.memory_limit_bytes.to_string(),
                )?;
            }
            if let Some(directory) = pids_parent_directory
                && limits.pids_limit > 0
            {
                write(directory.join("pids.max"), limits.pids_limit.to_string())?;
            }
            if let Some(directory) = cpu_parent_directory
                && limits.cpu_limit_millicores > 0
            {
                write(
                    directory.join("cpu.cfs_period_us"),
                    CPU_PERIOD_MICROSECONDS.to_string(),
                )?;
                write(
                    directory.join("cpu.cfs_quota_us"),
                    cpu_quota_microseconds(limits.cpu_limit_millicores).to_string(),
                )?;
            }
            Ok(())
        }
    }
}

fn detect_v2(mount_directory: &Path, parent_name: &str, controllers: &str) -> CgroupSupport {
    let available: Vec<&str> = controllers.split_whitespace().collect();
    let wanted: Vec<&str> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|controller| available.contains(controller))
        .collect();
    if wanted.is_empty() {
        return CgroupSupport::Unavailable {
            reason: format!(
                "cgroup v2 at {} has neither the memory nor the pids controller",
                mount_directory.display()
            ),
        };
    }
    // Enable the controllers level by level: the root's subtree_control, then each component of
    // the parent (which hold no processes, so the no-internal-process rule is respected).
    let mut directory = mount_directory.to_path_buf();
    let mut levels = vec![directory.clone()];
    for component in parent_name.split('/') {
        directory = directory.join(component);
        levels.push(directory.clone());
    }
    for (index, level) in levels.iter().enumerate() {
        if index > 0
            && let Err(error) = std::fs::create_dir_all(level)
        {
            return CgroupSupport::Unavailable {
                reason: format!("cannot create cgroup {}: {error}", level.display()),
            };
        }
        let subtree_control = level.join("cgroup.subtree_control");
        let enabled = read_trimmed(&subtree_control).unwrap_or_default();
        for controller in &wanted {
            if enabled.split_whitespace().any(|name| name == *controller) {
                continue;
            }
            if let Err(error) = write_file(&subtree_control, &format!("+{controller}")) {
                return CgroupSupport::Unavailable {
                    reason: format!(
                        "cannot enable the {controller} controller in {}: {error}",
                        subtree_control.display()
                    ),
                };
            }
        }
    }
    CgroupSupport::V2 {
        parent_directory: directory,
        memory: wanted.contains(&"memory"),
        pids: wanted.contains(&"pids"),
        cpu: wanted.contains(&"cpu"),
    }
}

fn detect_v1(mount_directory: &Path, parent_name: &str) -> CgroupSupport {
    let mut problems = Vec::new();
    let mut prepare = |controller: &str| -> Option<PathBuf> {
        let root = mount_directory.join(controller);
        if !root.join("cgroup.procs").exists() {
            problems.push(format!(
                "no cgroup v1 {controller} hierarchy at {}",
                root.display()
            ));
            return None;
        }
        let parent = root.join(parent_name);
        match std::fs::create_dir_all(&parent) {
            Ok(()) => Some(parent),
            Err(error) => {
                problems.push(format!(
                    "cannot create cgroup {}: {error}",
                    parent.display()
                ));
                None
            }
        }
    };
    let memory_parent_directory = prepare("memory");
    let pids_parent_directory = prepare("pids");
    let cpu_parent_directory = prepare("cpu");
    if memory_parent_directory.is_none() && pids_parent_directory.is_none() {
        return CgroupSupport::Unavailable {
            reason: problems.join("; "),
        };
    }
    for problem in &problems {
        tracing::warn!(problem = %problem, "cgroup v1: a resource limit is not available");
    }
    CgroupSupport::V1 {
        memory_parent_directory,
        pids_parent_directory,
        cpu_parent_directory,
    }
}

/// [`detect_cgroup_support`], computed once per (mount directory, parent name, totals) in this
/// process; logs a warning the first time limits are unavailable.
pub fn cgroup_support(
    mount_directory: &Path,
    parent_name: &str,
    parent_limits: &ParentLimits,
) -> Arc<CgroupSupport> {
    type Cache = Mutex<HashMap<(PathBuf, String, ParentLimits), Arc<CgroupSupport>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (
        mount_directory.to_path_buf(),
        parent_name.to_owned(),
        *parent_limits,
    );
    let mut entries = match cache.lock() {
        Ok(entries) => entries,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(support) = entries.get(&key) {
        return Arc::clone(support);
    }
    let support = Arc::new(detect_cgroup_support(
        mount_directory,
        parent_name,
        parent_limits,
    ));
    match support.as_ref() {
        CgroupSupport::Unavailable { reason } => {
            tracing::warn!(%reason, "cgroups are not usable: sandboxed commands are refused");
        }
        other => tracing::info!(support = ?other, "cgroup resource limits available"),
    }
    entries.insert(key, Arc::clone(&support));
    support
}

/// Whether the cgroup version is v2 (affects file names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// The cgroup(s) of one sandboxed command. Dropping it kills what is left in it and removes it
/// (best effort); [`InvocationCgroup::finish`] does the same and waits for the processes to exit.
#[derive(Debug)]
pub(crate) struct InvocationCgroup {
    version: Version,
    /// One directory per hierarchy (v2: one).
    directories: Vec<PathBuf>,
    /// The directory with the memory controller, if any.
    memory_directory: Option<PathBuf>,
    removed: bool,
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl InvocationCgroup {
    /// Creates the cgroup(s) `<parent>/<label>-<pid>-<counter>` and sets `limits` (memory and
    /// pids always, CPU when `limits.cpu_limit_millicores > 0`).
    ///
    /// Errors (fail closed; what was created is removed): `support` is unavailable, a needed
    /// controller is missing, or a directory or limit file cannot be written. The message says
    /// which.
    pub(crate) fn create(
        support: &CgroupSupport,
        label: &str,
        limits: &CommandLimits,
    ) -> std::io::Result<Self> {
        let missing = |what: &str| {
            std::io::Error::other(format!(
                "the {what} limit cannot be applied: no {what} cgroup controller ({support:?})"
            ))
        };
        if let CgroupSupport::Unavailable { reason } = support {
            return Err(std::io::Error::other(format!(
                "cgroups are not usable: {reason}"
            )));
        }
        if !support.limits_memory() {
            return Err(missing("memory"));
        }
        if !support.limits_pids() {
            return Err(missing("pids"));
        }
        let cpu = limits.cpu_limit_millicores > 0;
        if cpu && !support.limits_cpu() {
            return Err(missing("cpu"));
        }
        let label: String = label
            .chars()
            .map(|character| {
                if character.is_ascii_alphanumeric() || character == '-' {
                    character
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        let name = format!("{label}-{}", unique_suffix());
        let (cgroup, pids_directory, cpu_directory) = match support {
            CgroupSupport::Unavailable { .. } => unreachable!("checked above"),
            CgroupSupport::V2 {
                parent_directory, ..
            } => {
                let directory = parent_directory.join(&name);
                (
                    InvocationCgroup {
                        version: Version::V2,
                        directories: vec![directory.clone()],
                        memory_directory: Some(directory.clone()),
                        removed: false,
                    },
                    directory.clone(),
                    directory,
                )
            }
            CgroupSupport::V1 {
                memory_parent_directory,
                pids_parent_directory,
                cpu_parent_directory,
            } => {
                let (Some(memory_parent), Some(pids_parent)) =
                    (memory_parent_directory, pids_parent_directory)
                else {
                    return Err(missing("memory or pids"));
                };
                let memory_directory = memory_parent.join(&name);
                let pids_directory = pids_parent.join(&name);
                let mut directories = vec![memory_directory.clone(), pids_directory.clone()];
                let cpu_directory = match cpu_parent_directory {
                    Some(parent) if cpu => {
                        directories.push(parent.join(&name));
                        parent.join(&name)
                    }
                    _ => PathBuf::new(),
                };
                (
                    InvocationCgroup {
                        version: Version::V1,
                        directories,
                        memory_directory: Some(memory_directory),
                        removed: false,
                    },
                    pids_directory,
                    cpu_directory,
                )
            }
        };
        let write_limit = |path: PathBuf, value: String| {
            write_file(&path, &value).map_err(|error| {
                std::io::Error::new(
                    error.kind(),
                    format!("cannot write {value} to {}: {error}", path.display()),
                )
            })
        };
        // On error, `cgroup` is dropped, which removes the directories that exist.
        for directory in &cgroup.directories {
            std::fs::create_dir(directory).map_err(|error| {
                std::io::Error::new(
                    error.kind(),
                    format!("cannot create cgroup {}: {error}", directory.display()),
                )
            })?;
        }
        let memory_directory = cgroup
            .memory_directory
            .clone()
            .unwrap_or_else(|| unreachable!("set above"));
        let memory = limits.memory_limit_bytes.to_string();
        match cgroup.version {
            Version::V2 => {
                write_limit(memory_directory.join("memory.max"), memory)?;
                // No swap, so the memory limit is the limit; absent without swap accounting.
                let _ = write_file(&memory_directory.join("memory.swap.max"), "0");
                // On OOM, kill the whole sandbox rather than one process of it.
                let _ = write_file(&memory_directory.join("memory.oom.group"), "1");
                if cpu {
                    write_limit(
                        cpu_directory.join("cpu.max"),
                        format!(
                            "{} {CPU_PERIOD_MICROSECONDS}",
                            cpu_quota_microseconds(limits.cpu_limit_millicores)
                        ),
                    )?;
                }
            }
            Version::V1 => {
                write_limit(
                    memory_directory.join("memory.limit_in_bytes"),
                    memory.clone(),
                )?;
                // Memory + swap limit, where swap accounting exists.
                let memsw = memory_directory.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write_limit(memsw, memory)?;
                }
                if cpu {
                    write_limit(
                        cpu_directory.join("cpu.cfs_period_us"),
                        CPU_PERIOD_MICROSECONDS.to_string(),
                    )?;
                    write_limit(
                        cpu_directory.join("cpu.cfs_quota_us"),
                        cpu_quota_microseconds(limits.cpu_limit_millicores).to_string(),
                    )?;
                }
            }
        }
        write_limit(
            pids_directory.join("pids.max"),
            limits.pids_limit.to_string(),
        )?;
        Ok(cgroup)
    }

    /// The `cgroup.procs` files a new process must write `0` into to enter the cgroup(s), as C
    /// strings for the `pre_exec` hook (which must not allocate).
    pub(crate) fn procs_files(&self) -> std::io::Result<Vec<CString>> {
        self.directories
            .iter()
            .map(|directory| {
                CString::new(directory.join("cgroup.procs").as_os_str().as_bytes())
                    .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))
            })
            .collect()
    }

    fn process_ids(&self) -> Vec<libc::pid_t> {
        let mut process_ids = Vec::new();
        for directory in &self.directories {
            if let Ok(text) = std::fs::read_to_string(directory.join("cgroup.procs")) {
                process_ids.extend(
                    text.split_whitespace()
                        .filter_map(|line| line.parse::<libc::pid_t>().ok()),
                );
            }
        }
        process_ids.sort_unstable();
        process_ids.dedup();
        process_ids
    }

    /// Sends SIGKILL to every process in the cgroup(s) (v2: through `cgroup.kill` when the kernel
    /// has it). Returns whether any process was left.
    pub(crate) fn kill_all(&self) -> bool {
        let process_ids = self.process_ids();
        if process_ids.is_empty() {
            return false;
        }
        if self.version == Version::V2 {
            let kill_file = self.directories[0].join("cgroup.kill");
            if kill_file.exists() && write_file(&kill_file, "1").is_ok() {
                return true;
            }
        }
        for process_id in process_ids {
            if process_id > 0 {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe {
                    libc::kill(process_id, libc::SIGKILL);
                }
            }
        }
        true
    }

    /// Kills every process left and waits up to `wait` for the cgroup(s) to be empty. Returns
    /// whether they are empty.
    pub(crate) async fn kill_and_wait(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            if !self.kill_all() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The number of processes the kernel's OOM killer killed in this cgroup (v2 `memory.events`,
    /// v1 `memory.oom_control` `oom_kill`), `None` if unknown.
    pub(crate) fn oom_kill_count(&self) -> Option<u64> {
        let directory = self.memory_directory.as_ref()?;
        let file = match self.version {
            Version::V2 => "memory.events",
            Version::V1 => "memory.oom_control",
        };
        let text = std::fs::read_to_string(directory.join(file)).ok()?;
        text.lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next() == Some("oom_kill"))
                .then(|| fields.next().and_then(|value| value.parse().ok()))
                .flatten()
        })
    }

    /// How often the command hit its limits, from the event counters: `pids.max` (v1 and v2
    /// `pids.events` `max`: forks refused), `memory.max` (v2 `memory.events` `max`, v1
    /// `memory.failcnt`: usage reached the limit) and `memory.oom_kill` (processes the OOM killer
    /// killed). Counters that cannot be read are left out.
    pub(crate) fn limit_events(&self) -> Vec<(&'static str, u64)> {
        let counter = |path: PathBuf, key: &str| -> Option<u64> {
            let text = std::fs::read_to_string(path).ok()?;
            text.lines().find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some(key))
                    .then(|| fields.next().and_then(|value| value.parse().ok()))
                    .flatten()
            })
        };
        let mut events = Vec::new();
        let pids = self
            .directories
            .iter()
            .find_map(|directory| counter(directory.join("pids.events"), "max"));
        if let Some(count) = pids {
            events.push(("pids.max", count));
        }
        if let Some(directory) = &self.memory_directory {
            let reached = match self.version {
                Version::V2 => counter(directory.join("memory.events"), "max"),
                Version::V1 => read_trimmed(&directory.join("memory.failcnt"))
                    .and_then(|value| value.parse().ok()),
            };
            if let Some(count) = reached {
                events.push(("memory.max", count));
            }
        }
        if let Some(count) = self.oom_kill_count() {
            events.push(("memory.oom_kill", count));
        }
        events
    }

    /// Whether the memory limit was ever hit (v1 `memory.failcnt`, v2 `memory.events` `max`).
    pub(crate) fn memory_limit_hit(&self) -> bool {
        let Some(directory) = self.memory_directory.as_ref() else {
            return false;
        };
        match self.version {
            Version::V1 => read_trimmed(&directory.join("memory.failcnt"))
                .and_then(|value| value.parse::<u64>().ok())
                .is_some_and(|count| count > 0),
            Version::V2 => {
                std::fs::read_to_string(directory.join("memory.events")).is_ok_and(|text| {
                    text.lines().any(|line| {
                        let mut fields = line.split_whitespace();
                        fields.next() == Some("max")
                            && fields.next().is_some_and(|value| value != "0")
                    })
                })
            }
        }
    }

    /// Kills what is left, waits up to `wait` for it to exit, and removes the cgroup(s).
    ///
    /// Errors: a cgroup could not be removed (processes still in it); it is left behind.
    pub(crate) async fn finish(mut self, wait: Duration) -> std::io::Result<()> {
        self.kill_and_wait(wait).await;
        let result = self.remove_directories();
        self.removed = true;
        result
    }

    fn remove_directories(&self) -> std::io::Result<()> {
        let mut result = Ok(());
        for directory in &self.directories {
            let mut attempt = 0;
            loop {
                match std::fs::remove_dir(directory) {
                    Ok(()) => break,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => break,
                    Err(error) => {
                        attempt += 1;
                        if attempt >= 20 {
                            result = Err(error);
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
        result
    }

    /// The cgroup directories (one per hierarchy).
    #[cfg(test)]
    pub(crate) fn directories(&self) -> &[PathBuf] {
        &self.directories
    }
}

impl Drop for InvocationCgroup {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        self.kill_all();
        if let Err(error) = self.remove_directories() {
            tracing::warn!(directories = ?self.directories, %error, "cannot remove a sandbox cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_names_are_validated() {
        assert!(valid_parent_name("flotilla"));
        assert!(valid_parent_name("a/b-c.d"));
        assert!(!valid_parent_name(""));
        assert!(!valid_parent_name("../x"));
        assert!(!valid_parent_name("/abs"));
        assert!(!valid_parent_name("a//b"));
        assert!(!valid_parent_name("a b"));
    }

    #[tokio::test]
    async fn invocation_cgroup_is_created_and_removed() {
        let support = cgroup_support(
            Path::new("/sys/fs/cgroup"),
            "flotilla",
            &ParentLimits::default(),
        );
        let limits = CommandLimits {
            memory_limit_bytes: 64 << 20,
            pids_limit: 32,
            cpu_limit_millicores: 500,
        };
        let cgroup = match InvocationCgroup::create(&support, "unit", &limits) {
            Ok(cgroup) => cgroup,
            other => panic!(
                "this test needs usable cgroups (root, cgroup v2 or v1), as deploy/env.sh sets \
                 up; found {support:?}, creating one gave {other:?}"
            ),
        };
        let directories = cgroup.directories().to_vec();
        assert!(!directories.is_empty());
        for directory in &directories {
            assert!(directory.is_dir());
        }
        cgroup.finish(Duration::from_secs(1)).await.unwrap();
        for directory in &directories {
            assert!(!directory.exists());
        }
    }
}
