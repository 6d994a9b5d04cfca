//! Host-side pieces of the bubblewrap sandbox: the unprivileged uid a sandbox runs as, the
//! workspace handed to that uid, the per-command `noexec` tmpfs for `/tmp` and `/dev/shm`, and
//! the `O_PATH` file descriptors through which bubblewrap (running as that uid) binds paths it
//! could not reach itself (e.g. under `/root`).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::config::WorkerConfig;

/// Lowest descriptor number for the descriptors passed to bubblewrap (above the start marker, 3).
const PASSED_FD_MINIMUM: RawFd = 10;

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
    /// `sandbox_uid_count` are in use.
    pub fn acquire(config: &WorkerConfig) -> Option<Self> {
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

/// An `O_PATH` descriptor of `path`, numbered at least 10, close-on-exec (the spawn hook clears
/// that flag in the child only).
///
/// Errors: the path cannot be opened.
pub fn open_path_fd(path: &Path) -> std::io::Result<OwnedFd> {
    let name = CString::new(path.as_os_str().as_bytes())
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
    // SAFETY: `name` is a valid C string; the result is checked.
    let fd = unsafe { libc::open(name.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a descriptor we just opened and own.
    let opened = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on our own descriptor; the result is checked.
    let moved = unsafe { libc::fcntl(opened.as_raw_fd(), libc::F_DUPFD_CLOEXEC, PASSED_FD_MINIMUM) };
    if moved < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `moved` is a new descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(moved) })
}

/// A per-command tmpfs (`nosuid,nodev,noexec`, `size=`[`WorkerConfig::tmp_size_bytes`]) mounted
/// on the host under `<work_directory>/sandbox-tmp/`, with `tmp/` and `shm/` owned by the
/// sandbox uid, bound at `/tmp` and `/dev/shm`. `noexec` makes `mmap(PROT_EXEC)` of its files
/// fail, which Landlock alone does not (it checks `execve`, not what `ld.so` maps). Unmounted and
/// removed on drop.
#[derive(Debug)]
pub struct ScratchMount {
    directory: PathBuf,
    mounted: bool,
}

fn unique_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl ScratchMount {
    /// Mounts the tmpfs and prepares `tmp/` and `shm/` for `uid`.
    ///
    /// Errors: the directory cannot be created or the mount fails (not root).
    pub fn create(config: &WorkerConfig, uid: u32) -> std::io::Result<Self> {
        let directory = config
            .work_directory
            .join("sandbox-tmp")
            .join(unique_name());
        std::fs::create_dir_all(&directory)?;
        let mut scratch = ScratchMount {
            directory,
            mounted: false,
        };
        let target = CString::new(scratch.directory.as_os_str().as_bytes())
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
        let options = CString::new(format!(
            "size={},mode=0711,uid=0,gid=0",
            config.tmp_size_bytes
        ))
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
        // SAFETY: every pointer is a valid C string alive for the call; the result is checked.
        let mounted = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                options.as_ptr().cast(),
            )
        };
        if mounted != 0 {
            return Err(std::io::Error::last_os_error());
        }
        scratch.mounted = true;
        for name in ["tmp", "shm"] {
            let path = scratch.directory.join(name);
            std::fs::create_dir(&path)?;
            std::os::unix::fs::chown(&path, Some(uid), Some(uid))?;
            std::fs::set_permissions(
                &path,
                std::os::unix::fs::PermissionsExt::from_mode(0o1777),
            )?;
        }
        Ok(scratch)
    }

    /// The directory bound at `/tmp`.
    pub fn tmp(&self) -> PathBuf {
        self.directory.join("tmp")
    }

    /// The directory bound at `/dev/shm`.
    pub fn shm(&self) -> PathBuf {
        self.directory.join("shm")
    }
}

impl Drop for ScratchMount {
    fn drop(&mut self) {
        if self.mounted
            && let Ok(target) = CString::new(self.directory.as_os_str().as_bytes())
        {
            // SAFETY: `target` is a valid C string; failure only leaves the mount behind.
            let result = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            if result != 0 {
                tracing::warn!(directory = %self.directory.display(), error = %std::io::Error::last_os_error(), "cannot unmount a sandbox tmpfs");
                return;
            }
        }
        if let Err(error) = std::fs::remove_dir(&self.directory) {
            tracing::warn!(directory = %self.directory.display(), %error, "cannot remove a sandbox tmpfs directory");
        }
    }
}
