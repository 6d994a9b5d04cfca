//! The worker's execution settings: where it keeps mirrors, clones and logs, and the limits it
//! puts on logs, patches, sandboxes and git.
//!
//! Every field has a default ([`WorkerConfig::default`]); the struct deserializes from a partial
//! TOML/JSON/YAML table (missing fields take their defaults, unknown fields are rejected).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::egress::EgressConfig;

/// Where the sandbox finds the Rust toolchain's `rustup` home (`RUSTUP_HOME`).
pub const SANDBOX_RUSTUP_HOME: &str = "/opt/rustup";
/// Where the sandbox finds the toolchain's binaries (`cargo`, `rustc`, `rustfmt` proxies).
pub const SANDBOX_CARGO_BIN: &str = "/opt/cargo/bin";

const MEBIBYTE: u64 = 1024 * 1024;

/// A read-only bind mount of a host directory (or file) into the sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Absolute host path. A mount whose source does not exist is skipped (with a warning).
    pub source: PathBuf,
    /// Absolute path inside the sandbox, e.g. `/opt/rustup`.
    pub target: PathBuf,
}

impl Mount {
    /// The default toolchain mounts, derived from the worker's environment:
    ///
    /// - `$RUSTUP_HOME` (or `$HOME/.rustup`) → [`SANDBOX_RUSTUP_HOME`] (`/opt/rustup`), if it
    ///   exists;
    /// - `$CARGO_HOME/bin` (or `$HOME/.cargo/bin`) → [`SANDBOX_CARGO_BIN`] (`/opt/cargo/bin`), if
    ///   it exists.
    ///
    /// `$HOME` defaults to `/root`. Only the toolchain and the `bin` directory are mounted, never
    /// the rest of `CARGO_HOME` (registry credentials live there).
    pub fn default_toolchain_mounts() -> Vec<Mount> {
        let home = std::env::var_os("HOME")
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"));
        let rustup_home = std::env::var_os("RUSTUP_HOME")
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".rustup"));
        let cargo_home = std::env::var_os("CARGO_HOME")
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".cargo"));
        let mut mounts = Vec::new();
        if rustup_home.is_dir() {
            mounts.push(Mount {
                source: rustup_home,
                target: PathBuf::from(SANDBOX_RUSTUP_HOME),
            });
        }
        let cargo_bin = cargo_home.join("bin");
        if cargo_bin.is_dir() {
            mounts.push(Mount {
                source: cargo_bin,
                target: PathBuf::from(SANDBOX_CARGO_BIN),
            });
        }
        mounts
    }

    /// The host path that corresponds to `sandbox_path` through one of `mounts` (for the `none`
    /// driver, which has no mounts), or `None` if no mount covers it.
    pub fn host_path(mounts: &[Mount], sandbox_path: &Path) -> Option<PathBuf> {
        mounts.iter().find_map(|mount| {
            sandbox_path.strip_prefix(&mount.target).ok().map(|rest| {
                if rest.as_os_str().is_empty() {
                    mount.source.clone()
                } else {
                    mount.source.join(rest)
                }
            })
        })
    }
}

/// Settings of the execution pipeline (see the crate documentation).
///
/// Sizes are bytes, times milliseconds. A memory or pids limit of 0 in a fleet's `SandboxSpec`
/// means the `default_*` value here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Root of the worker's files: `mirrors/` (one bare mirror per repository URL), `attempts/`
    /// (one clone per attempt, `<run_id>-<attempt>/repo`), `logs/` (one log per attempt,
    /// `<run_id>-<attempt>.log`). Created when needed. Default `/var/lib/flotilla/worker`.
    pub work_directory: PathBuf,
    /// Size cap of an attempt's full log file. Writing stops past it, after a `[log truncated]`
    /// marker. Default 8 MiB.
    pub log_max_bytes: u64,
    /// Size of the log tail kept in memory and sent in results (`RunResult.log_tail`). Default
    /// 16 KiB.
    pub log_tail_bytes: usize,
    /// Size cap of the patch sent in results; a longer one is cut and marked `patch_truncated`.
    /// Default 256 KiB.
    pub patch_max_bytes: usize,
    /// At most this many files are listed in a result's diffstat. Default 10 000.
    pub diffstat_max_files: usize,
    /// cgroup memory limit of a sandboxed command when the fleet gives 0. Default 2 GiB.
    pub default_memory_limit_bytes: u64,
    /// cgroup pids limit (processes and threads) of a sandboxed command when the fleet gives 0.
    /// Default 1024.
    pub default_pids_limit: u32,
    /// Wall-clock limit of a sandboxed command when the fleet gives 0. Default 1 hour.
    pub default_timeout_ms: u64,
    /// Upper bound on any sandboxed command's wall-clock limit, whatever the fleet asks.
    /// Default 24 hours.
    pub timeout_max_ms: u64,
    /// Read-only mounts of toolchains into the sandbox. Default:
    /// [`Mount::default_toolchain_mounts`].
    pub toolchain_mounts: Vec<Mount>,
    /// Author and committer name of the commits the worker makes. Default `Flotilla`.
    pub git_author_name: String,
    /// Author and committer e-mail of the commits the worker makes. Default `flotilla@localhost`.
    pub git_author_email: String,
    /// The `git` executable (a name looked up in `PATH`, or a path). Default `git`.
    pub git_path: PathBuf,
    /// Wall-clock limit of every host git command (clone, fetch, push...); the command's process
    /// group is killed when it passes. Default 10 minutes.
    pub git_timeout_ms: u64,
    /// Cap on the output the worker reads from one git command (status, numstat); the rest is
    /// discarded. Default 16 MiB.
    pub git_output_max_bytes: usize,
    /// The `bwrap` (bubblewrap) executable. Default `bwrap`.
    pub bwrap_path: PathBuf,
    /// Where the cgroup file systems are mounted. Default `/sys/fs/cgroup`.
    pub cgroup_mount_directory: PathBuf,
    /// cgroup (relative to each hierarchy's root) under which the worker creates one cgroup per
    /// sandboxed command. `[A-Za-z0-9._-]` components separated by `/`. Default `flotilla`.
    pub cgroup_parent_name: String,
    /// How long to wait for killed processes to exit (cgroup empty) before giving up on them.
    /// Default 5 seconds.
    pub process_exit_wait_ms: u64,
    /// After a sandboxed command exits, how long to keep reading output that its leftover
    /// processes still write. Default 2 seconds.
    pub output_drain_timeout_ms: u64,
    /// Keep each attempt's clone after the attempt (for debugging). Default false: deleted.
    pub keep_attempt_directories: bool,
    /// A push or branch deletion starts only while the attempt's lease, as the worker sees it
    /// (see [`crate::lease::LeaseDeadline`]), is valid for at least this long; otherwise the
    /// attempt ends as a retryable `infrastructure` failure without pushing. Should be below the
    /// cluster's lease TTL minus the heartbeat interval. Default 0: a third of the lease's TTL
    /// (`Lease.lease_ttl_ms`, so 10 seconds for the default 30 s).
    pub push_lease_margin_ms: u64,
    /// The worker pushes only branches that start with this prefix (the cluster checks it at
    /// submission too; this is defence in depth). Default `flotilla/`.
    pub branch_prefix: String,
    /// Most mirrors kept under `mirrors/`; beyond it the least recently used mirror that no
    /// attempt is using is deleted. Default 1000.
    pub mirror_cache_max_mirrors: usize,
    /// Most bytes kept under `mirrors/` (same eviction; a mirror in use is never deleted, so the
    /// cache can exceed this while one larger mirror is being used). Default 20 GiB.
    pub mirror_cache_max_bytes: u64,
    /// Egress of runs with `network: true`: the host allowlist, address exceptions, static
    /// hosts and the proxy's limits (see [`crate::egress`]). Default: nothing allowed.
    pub egress: EgressConfig,
    /// Push credentials: a static token per repository URL prefix, minted (read) per attempt
    /// and handed to host git through a transient credential helper. Default none.
    pub static_push_tokens: Vec<crate::credentials::StaticToken>,
    /// First host uid (and gid) a sandbox runs as: the sandbox of a command runs as
    /// `sandbox_uid_base + slot` (slot 0 .. `sandbox_uid_count - 1`, one per concurrently running
    /// command), never as root. Must be > 0 and the range must not contain a real user. Default
    /// 200 000 (outside the usual ranges and subuid allocations start at 100 000 with 65 536 each:
    /// choose a range no `/etc/subuid` entry uses).
    pub sandbox_uid_base: u32,
    /// Number of sandbox uids (the most commands that can run at once). Default 1024.
    pub sandbox_uid_count: u32,
    /// The sandbox init executable ([`crate::sandbox_init`]), bound read-only into every sandbox
    /// and run as its first program with `sandbox-init` as its first argument. Default (`None`):
    /// this process's own executable (the `flotilla` node binary has the hidden `sandbox-init`
    /// subcommand).
    pub sandbox_init_path: Option<PathBuf>,
    /// Run sandboxes without Landlock when the kernel lacks it (ABI < 6). Default false: the worker
    /// refuses to start.
    pub allow_without_landlock: bool,
    /// Run commands without cgroup limits when cgroups are unusable. Default false: the worker
    /// refuses to start, and a command whose limits cannot be applied is refused.
    pub allow_without_cgroup_limits: bool,
    /// Run attempts without a disk quota when loop-mounted workspaces are unavailable. Default
    /// false: the worker refuses to start.
    pub allow_without_disk_quota: bool,
    /// Highest memory limit a fleet may ask for, bytes. Default 64 GiB.
    pub memory_limit_max_bytes: u64,
    /// Highest pids limit a fleet may ask for (also capped by the kernel's `pid_max`). Default
    /// 32 768.
    pub pids_limit_max: u32,
    /// CPU quota of a sandboxed command when the fleet gives none, thousandths of a CPU (1000 =
    /// one CPU); 0: no per-command quota (the parent total still applies). Default 2000.
    pub default_cpu_limit_millicores: u64,
    /// Highest CPU quota a fleet may ask for, thousandths of a CPU. Default 64 000.
    pub cpu_limit_max_millicores: u64,
    /// Memory of all sandboxed commands together (the parent cgroup's limit), bytes; 0: no total.
    /// Default 0 (set it on hosts shared with a voter: e.g. host memory minus what the node
    /// needs).
    pub total_memory_limit_bytes: u64,
    /// Processes and threads of all sandboxed commands together; 0: no total. Default 16 384.
    pub total_pids_limit: u32,
    /// CPU of all sandboxed commands together, thousandths of a CPU; 0: no total. Default 0 (set
    /// it to the host's CPUs minus what the node needs).
    pub total_cpu_limit_millicores: u64,
    /// Size of each attempt's workspace file system (the disk quota), bytes: the clone lives in
    /// an ext4 file system on a sparse loop-mounted image under `attempts/`, so an agent can
    /// fill at most this. Default 10 GiB.
    pub default_disk_limit_bytes: u64,
    /// Highest disk quota a fleet may ask for, bytes. Default 200 GiB.
    pub disk_limit_max_bytes: u64,
    /// Free space kept on the work directory's file system: an attempt whose disk quota does not
    /// fit in the free space above this reserve is refused (retryable). Default 2 GiB.
    pub disk_reserve_bytes: u64,
    /// Size of each sandbox's `/tmp` and `/dev/shm` (one tmpfs, `noexec`; its pages count
    /// against the command's memory limit), bytes. Default 1 GiB.
    pub tmp_size_bytes: u64,
    /// Where the worker mounts each sandbox's staging tmpfs (`/tmp`, `/dev/shm` and the bind
    /// mounts bubblewrap takes from there); made mode 0711. Must be reachable by the sandbox uids
    /// (every parent searchable by others). Default `/run/flotilla-sandbox`.
    pub sandbox_staging_directory: PathBuf,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            work_directory: PathBuf::from("/var/lib/flotilla/worker"),
            log_max_bytes: 8 * MEBIBYTE,
            log_tail_bytes: 16 * 1024,
            patch_max_bytes: 256 * 1024,
            diffstat_max_files: 10_000,
            default_memory_limit_bytes: 2 * 1024 * MEBIBYTE,
            default_pids_limit: 1024,
            default_timeout_ms: 60 * 60 * 1000,
            timeout_max_ms: 24 * 60 * 60 * 1000,
            toolchain_mounts: Mount::default_toolchain_mounts(),
            git_author_name: "Flotilla".to_owned(),
            git_author_email: "flotilla@localhost".to_owned(),
            git_path: PathBuf::from("git"),
            git_timeout_ms: 10 * 60 * 1000,
            git_output_max_bytes: 16 * MEBIBYTE as usize,
            bwrap_path: PathBuf::from("bwrap"),
            cgroup_mount_directory: PathBuf::from("/sys/fs/cgroup"),
            cgroup_parent_name: "flotilla".to_owned(),
            process_exit_wait_ms: 5_000,
            output_drain_timeout_ms: 2_000,
            keep_attempt_directories: false,
            push_lease_margin_ms: 0,
            branch_prefix: flotilla_domain::branch::DEFAULT_BRANCH_PREFIX.to_owned(),
            mirror_cache_max_mirrors: 1_000,
            mirror_cache_max_bytes: 20 * 1024 * MEBIBYTE,
            egress: EgressConfig::default(),
            static_push_tokens: Vec::new(),
            sandbox_uid_base: 200_000,
            sandbox_uid_count: 1024,
            sandbox_init_path: None,
            allow_without_landlock: false,
            allow_without_cgroup_limits: false,
            allow_without_disk_quota: false,
            memory_limit_max_bytes: 64 * 1024 * MEBIBYTE,
            pids_limit_max: 32_768,
            default_cpu_limit_millicores: 2_000,
            cpu_limit_max_millicores: 64_000,
            total_memory_limit_bytes: 0,
            total_pids_limit: 16_384,
            total_cpu_limit_millicores: 0,
            default_disk_limit_bytes: 10 * 1024 * MEBIBYTE,
            disk_limit_max_bytes: 200 * 1024 * MEBIBYTE,
            disk_reserve_bytes: 2 * 1024 * MEBIBYTE,
            tmp_size_bytes: 1024 * MEBIBYTE,
            sandbox_staging_directory: PathBuf::from("/run/flotilla-sandbox"),
        }
    }
}

impl WorkerConfig {
    /// `<work_directory>/credentials`: private (0700) directories of transient credential
    /// helpers, each removed after its attempt's push.
    pub fn credentials_directory(&self) -> PathBuf {
        self.work_directory.join("credentials")
    }

    /// The broker that mints push credentials: static tokens per URL prefix
    /// ([`WorkerConfig::static_push_tokens`]).
    pub fn credential_broker(&self) -> std::sync::Arc<dyn crate::credentials::CredentialBroker> {
        std::sync::Arc::new(crate::credentials::StaticTokenBroker::new(
            self.static_push_tokens.clone(),
        ))
    }

    /// `<work_directory>/mirrors`: one bare mirror per repository URL.
    pub fn mirrors_directory(&self) -> PathBuf {
        self.work_directory.join("mirrors")
    }

    /// `<work_directory>/attempts`: one directory per attempt.
    pub fn attempts_directory(&self) -> PathBuf {
        self.work_directory.join("attempts")
    }

    /// The sandbox init executable: [`WorkerConfig::sandbox_init_path`] or this process's
    /// executable.
    ///
    /// Errors: the current executable cannot be determined.
    pub fn sandbox_init_executable(&self) -> std::io::Result<PathBuf> {
        match &self.sandbox_init_path {
            Some(path) => Ok(path.clone()),
            None => std::env::current_exe(),
        }
    }

    /// The parent cgroup's totals ([`WorkerConfig::total_memory_limit_bytes`] and friends).
    pub fn parent_limits(&self) -> crate::cgroup::ParentLimits {
        crate::cgroup::ParentLimits {
            memory_limit_bytes: self.total_memory_limit_bytes,
            pids_limit: self.total_pids_limit,
            cpu_limit_millicores: self.total_cpu_limit_millicores,
        }
    }

    /// Checks the sandbox settings: `sandbox_uid_base` > 0, `sandbox_uid_count` > 0, the range
    /// fits in a u32 below 2^32 - 1 (the "no uid" value), the limits' maxima are > 0.
    ///
    /// Errors: a message naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.sandbox_uid_base == 0 {
            return Err("sandbox_uid_base: must not be 0 (root)".to_owned());
        }
        if self.sandbox_uid_count == 0 {
            return Err("sandbox_uid_count: must be at least 1".to_owned());
        }
        if self
            .sandbox_uid_base
            .checked_add(self.sandbox_uid_count)
            .is_none_or(|end| end == u32::MAX)
        {
            return Err(
                "sandbox_uid_count: sandbox_uid_base + sandbox_uid_count must stay below 4294967295"
                    .to_owned(),
            );
        }
        for (field, value) in [
            ("memory_limit_max_bytes", self.memory_limit_max_bytes),
            ("pids_limit_max", u64::from(self.pids_limit_max)),
            (
                "default_memory_limit_bytes",
                self.default_memory_limit_bytes,
            ),
            ("default_pids_limit", u64::from(self.default_pids_limit)),
            ("tmp_size_bytes", self.tmp_size_bytes),
        ] {
            if value == 0 {
                return Err(format!("{field}: must be greater than 0"));
            }
        }
        Ok(())
    }

    /// `<work_directory>/logs`: one log file per attempt.
    pub fn logs_directory(&self) -> PathBuf {
        self.work_directory.join("logs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_path_maps_through_mounts() {
        let mounts = vec![Mount {
            source: PathBuf::from("/root/.cargo/bin"),
            target: PathBuf::from("/opt/cargo/bin"),
        }];
        assert_eq!(
            Mount::host_path(&mounts, Path::new("/opt/cargo/bin")),
            Some(PathBuf::from("/root/.cargo/bin"))
        );
        assert_eq!(
            Mount::host_path(&mounts, Path::new("/opt/cargo/bin/cargo")),
            Some(PathBuf::from("/root/.cargo/bin/cargo"))
        );
        assert_eq!(Mount::host_path(&mounts, Path::new("/usr/bin")), None);
    }

    #[test]
    fn config_deserializes_partially() {
        let config: WorkerConfig =
            serde_json::from_str(r#"{"work_directory": "/tmp/w", "log_tail_bytes": 10}"#).unwrap();
        assert_eq!(config.work_directory, PathBuf::from("/tmp/w"));
        assert_eq!(config.log_tail_bytes, 10);
        assert_eq!(config.patch_max_bytes, 256 * 1024);
        assert!(serde_json::from_str::<WorkerConfig>(r#"{"no_such_field": 1}"#).is_err());
    }
}
