//! Host-side pieces of the bubblewrap sandbox: the unprivileged uid a sandbox runs as, the
//! workspace handed to that uid, and the per-command staging tmpfs ([`StagingMount`]): `noexec`
//! `/tmp` and `/dev/shm`, and bind mounts of the paths bubblewrap (running as that uid) binds
//! but could not reach itself (e.g. under `/root` or a private work directory).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::config::WorkerConfig;

/// One sandbox uid/gid taken from [`WorkerConfig::sandbox_uid_base`]'s range; released on drop.
#[derive(Debug)]
pub struct SandboxUser {
    /// The host uid (also the gid).
    pub uid: u32,
    slot: u32,
}

fn used_slots() -> &'static Mutex<BTreeSet<u32>> {
    static USED: OnceLock<Mutex<BTreeSet<u32>>> = OnceLock::new();
    USED.get_or_init(|| Mutex::new(BTreeSet::new()))
}

impl SandboxUser {
    /// Takes the lowest free slot: uid `sandbox_uid_base + slot`. `None` when all
    /// `sandbox_uid_count` are in use (or the base is 0: never root).
    pub fn acquire(config: &WorkerConfig) -> Option<Self> {
        // Never root, whatever the configuration says (validated at start too).
        if config.sandbox_uid_base == 0 {
            return None;
        }
        let mut used = match used_slots().lock() {
            Ok(used) => used,
            Err(poisoned) => poisoned.into_inner(),
        };
        let slot = (0..config.sandbox_uid_count).find(|slot| !used.contains(slot))?;
        let uid = config.sandbox_uid_base.checked_add(slot)?;
        used.insert(slot);
        Some(SandboxUser { uid, slot })
    }
}

impl Drop for SandboxUser {
    fn drop(&mut self) {
        let mut used = match used_slots().lock() {
            Ok(used) => used,
            Err(poisoned) => poisoned.into_inner(),
        };
        used.remove(&self.slot);
    }
}

/// Gives `directory` and everything beneath it to `uid:uid` (without following symbolic links),
/// except a top-level `.git`, which stays the worker's (it is bound read-only into the sandbox,
/// and host git only trusts a repository directory it owns or names in `safe.directory`).
///
/// Errors: the first file that cannot be changed.
pub fn give_workspace_to(directory: &Path, uid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(directory, Some(uid), Some(uid))?;
    let git_directory = directory.join(".git");
    let mut pending: Vec<PathBuf> = vec![directory.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let path = entry?.path();
            if path == git_directory {
                continue;
            }
            let metadata = std::fs::symlink_metadata(&path)?;
            std::os::unix::fs::lchown(&path, Some(uid), Some(uid))?;
            if metadata.is_dir() {
                pending.push(path);
            }
        }
    }
    Ok(())
}

fn c_path(path: &Path) -> std::io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))
}

fn mount(
    source: &Path,
    target: &Path,
    file_system: Option<&std::ffi::CStr>,
    flags: libc::c_ulong,
    options: Option<&str>,
) -> std::io::Result<()> {
    let source = c_path(source)?;
    let target = c_path(target)?;
    let options = options
        .map(CString::new)
        .transpose()
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    // SAFETY: every pointer is a valid C string alive for the call (or null); checked result.
    let result = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            file_system.map_or(std::ptr::null(), std::ffi::CStr::as_ptr),
            flags,
            options
                .as_ref()
                .map_or(std::ptr::null(), |options| options.as_ptr().cast()),
        )
    };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A per-command staging tree: a tmpfs (`nosuid,nodev,noexec`,
/// `size=`[`WorkerConfig::tmp_size_bytes`], mode 0711) mounted on the host at
/// `<sandbox_staging_directory>/<unique>/`, holding
///
/// - `tmp/` and `shm/`, owned by the sandbox uid, bound at `/tmp` and `/dev/shm`: `noexec` makes
///   `mmap(PROT_EXEC)` of their files fail, which Landlock alone does not (it checks `execve`,
///   not what `ld.so` maps);
/// - bind mounts (made by the worker, as root) of the paths bubblewrap must bind but its
///   unprivileged uid could not reach (the workspace under a private work directory, toolchains
///   under `/root`, the init): bubblewrap binds them from here.
///
/// Everything is detached (recursively, lazily) and removed on drop.
#[derive(Debug)]
pub struct StagingMount {
    directory: PathBuf,
    mounted: bool,
    binds: usize,
}

fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl StagingMount {
    /// Mounts the tmpfs and prepares `tmp/` and `shm/` for `uid`.
    ///
    /// Errors: the directory cannot be created or the mount fails (not root).
    pub fn create(config: &WorkerConfig, uid: u32) -> std::io::Result<Self> {
        let root = &config.sandbox_staging_directory;
        std::fs::create_dir_all(root)?;
        std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
        let directory = root.join(unique_name());
        std::fs::create_dir(&directory)?;
        let mut staging = StagingMount {
            directory,
            mounted: false,
            binds: 0,
        };
        mount(
            Path::new("tmpfs"),
            &staging.directory,
            Some(c"tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some(&format!(
                "size={},mode=0711,uid=0,gid=0",
                config.tmp_size_bytes
            )),
        )?;
        staging.mounted = true;
        for name in ["tmp", "shm"] {
            let path = staging.directory.join(name);
            std::fs::create_dir(&path)?;
            std::os::unix::fs::chown(&path, Some(uid), Some(uid))?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;
        }
        Ok(staging)
    }

    /// The directory bound at `/tmp`.
    pub fn tmp(&self) -> PathBuf {
        self.directory.join("tmp")
    }

    /// The directory bound at `/dev/shm`.
    pub fn shm(&self) -> PathBuf {
        self.directory.join("shm")
    }

    /// Binds `source` (a directory or a file) at a new path in the staging tree and returns
    /// that path (recursive bind; bubblewrap's own bind then makes it read-only where asked).
    ///
    /// Errors: the mount point cannot be made or the bind fails.
    pub fn stage(&mut self, source: &Path) -> std::io::Result<PathBuf> {
        self.binds += 1;
        let target = self.directory.join(format!("bind-{}", self.binds));
        if std::fs::metadata(source)?.is_dir() {
            std::fs::create_dir(&target)?;
        } else {
            std::fs::write(&target, b"")?;
        }
        mount(source, &target, None, libc::MS_BIND | libc::MS_REC, None)?;
        Ok(target)
    }
}

impl Drop for StagingMount {
    fn drop(&mut self) {
        if self.mounted
            && let Ok(target) = c_path(&self.directory)
        {
            // SAFETY: `target` is a valid C string; failure only leaves the mount behind.
            // MNT_DETACH detaches the tmpfs and every bind mount beneath it.
            let result = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            if result != 0 {
                tracing::warn!(directory = %self.directory.display(), error = %std::io::Error::last_os_error(), "cannot unmount a sandbox staging tmpfs");
                return;
            }
        }
        if let Err(error) = std::fs::remove_dir(&self.directory) {
            tracing::warn!(directory = %self.directory.display(), %error, "cannot remove a sandbox staging directory");
        }
    }
}
