//! The bounded cache of repository mirrors under `<work_directory>/mirrors`, and its locks.
//!
//! One [`MirrorCache`] per mirrors directory in the process ([`MirrorCache::shared`]), so every
//! attempt of the process shares one async lock per mirror. Each mirror has an entry with its
//! lock, how many attempts are using it, when it was last used and its size on disk. After a
//! mirror was updated, [`MirrorCache::evict`] deletes least recently used mirrors that no
//! attempt is using until at most `max_mirrors` mirrors and `max_bytes` bytes remain. A mirror
//! in use is never deleted, so one mirror larger than `max_bytes` stays while it is used.
//!
//! The entry map stays bounded too: an entry lives while its mirror exists on disk (at most
//! `max_mirrors` of them after eviction) or while an attempt uses it; the entry of a mirror
//! whose clone failed goes with its last user.
//!
//! When a mirror was last used survives restarts as the modification time of its
//! `flotilla-last-used` file; the first use of a cache lists the directory (mirrors left by
//! earlier processes and by older naming schemes count and age out like the others).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::SystemTime;

/// File whose modification time records a mirror's last use.
pub const LAST_USED_FILE: &str = "flotilla-last-used";
/// Name prefix of a mirror directory being deleted (renamed first, so a new clone of the same
/// repository never meets a half-deleted one).
const EVICTING_PREFIX: &str = ".evicting-";

#[derive(Debug)]
struct Entry {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Attempts holding a [`MirrorUse`] of it.
    users: usize,
    /// Logical time of the last use (larger is more recent).
    last_used: u64,
    /// Size on disk, as last measured.
    size_bytes: u64,
    /// Whether the mirror exists on disk.
    present: bool,
}

#[derive(Debug, Default)]
struct CacheState {
    entries: HashMap<PathBuf, Entry>,
    clock: u64,
    max_mirrors: usize,
    max_bytes: u64,
    evicted_total: u64,
}

/// The mirrors of one directory (see the module documentation).
#[derive(Debug)]
pub struct MirrorCache {
    directory: PathBuf,
    state: Mutex<CacheState>,
    scanned: tokio::sync::OnceCell<()>,
}

/// One attempt's use of a mirror: keeps it from being evicted; [`MirrorUse::lock`] serializes
/// the attempts that update or clone it.
#[derive(Debug)]
pub struct MirrorUse {
    cache: Arc<MirrorCache>,
    path: PathBuf,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl MirrorUse {
    /// Waits for the mirror's lock.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// The mirror's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MirrorUse {
    fn drop(&mut self) {
        let mut state = self.cache.lock_state();
        state.clock += 1;
        let clock = state.clock;
        let remove = match state.entries.get_mut(&self.path) {
            Some(entry) => {
                entry.users = entry.users.saturating_sub(1);
                entry.last_used = clock;
                entry.users == 0 && !entry.present
            }
            None => false,
        };
        if remove {
            state.entries.remove(&self.path);
        }
    }
}

/// What [`MirrorCache::stats`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorCacheStats {
    /// Mirrors on disk.
    pub mirrors: usize,
    /// Their total size in bytes, as last measured.
    pub size_bytes: u64,
    /// Entries in the lock map (mirrors on disk plus those being created).
    pub entries: usize,
    /// Mirrors deleted by eviction since the cache was created.
    pub evicted_total: u64,
}

/// Total size of the files under `path` in bytes, not following symbolic links; unreadable
/// parts count as 0.
pub fn directory_size_bytes(path: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![path.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&directory) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else {
                continue;
            };
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                total += metadata.len();
            }
        }
    }
    total
}

fn last_used_time(mirror: &Path) -> SystemTime {
    std::fs::metadata(mirror.join(LAST_USED_FILE))
        .or_else(|_| std::fs::metadata(mirror))
        .and_then(|metadata| metadata.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

impl MirrorCache {
    /// The process-wide cache of `directory`, with its limits set to `max_mirrors` mirrors
    /// and `max_bytes` bytes (the latest call's limits apply). One instance per directory
    /// while anyone holds it; the registry keeps only weak references, so it does not grow
    /// with directories no longer used.
    pub fn shared(directory: &Path, max_mirrors: usize, max_bytes: u64) -> Arc<MirrorCache> {
        static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Weak<MirrorCache>>>> = OnceLock::new();
        let registry = REGISTRY.get_or_init(|| Mutex::new(HashMap::new()));
        let mut registry = match registry.lock() {
            Ok(registry) => registry,
            Err(poisoned) => poisoned.into_inner(),
        };
        registry.retain(|_, cache| cache.strong_count() > 0);
        let cache = match registry.get(directory).and_then(Weak::upgrade) {
            Some(cache) => cache,
            None => {
                let cache = Arc::new(MirrorCache {
                    directory: directory.to_path_buf(),
                    state: Mutex::new(CacheState::default()),
                    scanned: tokio::sync::OnceCell::new(),
                });
                registry.insert(directory.to_path_buf(), Arc::downgrade(&cache));
                cache
            }
        };
        {
            let mut state = cache.lock_state();
            state.max_mirrors = max_mirrors.max(1);
            state.max_bytes = max_bytes;
        }
        cache
    }

    fn lock_state(&self) -> MutexGuard<'_, CacheState> {
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The directory holding the mirrors.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// Lists the directory once: existing mirrors (`*.git` directories) with their sizes and
    /// last-use times; removes what an interrupted eviction left.
    async fn scan(&self) {
        let directory = self.directory.clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            let Ok(entries) = std::fs::read_dir(&directory) else {
                return found;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if !path.is_dir() {
                    continue;
                }
                if name.starts_with(EVICTING_PREFIX) {
                    let _ = std::fs::remove_dir_all(&path);
                } else if name.ends_with(".git") {
                    found.push((last_used_time(&path), directory_size_bytes(&path), path));
                }
            }
            found.sort();
            found
        })
        .await
        .unwrap_or_default();
        let mut state = self.lock_state();
        for (_, size_bytes, path) in found {
            state.clock += 1;
            let clock = state.clock;
            let entry = state.entries.entry(path).or_insert_with(|| Entry {
                lock: Arc::default(),
                users: 0,
                last_used: clock,
                size_bytes: 0,
                present: false,
            });
            entry.size_bytes = size_bytes;
            entry.present = true;
        }
    }

    /// Registers a use of the mirror at `path` (in this cache's directory): it is not evicted
    /// until the returned [`MirrorUse`] is dropped.
    pub async fn acquire(self: &Arc<Self>, path: &Path) -> MirrorUse {
        self.scanned.get_or_init(|| self.scan()).await;
        let mut state = self.lock_state();
        state.clock += 1;
        let clock = state.clock;
        let entry = state
            .entries
            .entry(path.to_path_buf())
            .or_insert_with(|| Entry {
                lock: Arc::default(),
                users: 0,
                last_used: clock,
                size_bytes: 0,
                present: false,
            });
        entry.users += 1;
        entry.last_used = clock;
        MirrorUse {
            cache: self.clone(),
            path: path.to_path_buf(),
            lock: entry.lock.clone(),
        }
    }

    /// Records that the mirror of `mirror` exists after an update, with its size measured now,
    /// and touches its [`LAST_USED_FILE`]. Call with the mirror's lock held.
    pub async fn record_present(&self, mirror: &MirrorUse) {
        let path = mirror.path.clone();
        let size_bytes = tokio::task::spawn_blocking(move || {
            let _ = std::fs::write(path.join(LAST_USED_FILE), b"");
            directory_size_bytes(&path)
        })
        .await
        .unwrap_or(0);
        let mut state = self.lock_state();
        if let Some(entry) = state.entries.get_mut(&mirror.path) {
            entry.present = true;
            entry.size_bytes = size_bytes;
        }
    }

    /// Records that the mirror at `mirror` is gone (deleted as broken).
    pub fn record_absent(&self, mirror: &MirrorUse) {
        if let Some(entry) = self.lock_state().entries.get_mut(&mirror.path) {
            entry.present = false;
            entry.size_bytes = 0;
        }
    }

    /// Deletes least recently used mirrors that nobody uses until the limits hold (or only
    /// mirrors in use are left). Returns how many were deleted.
    pub async fn evict(&self) -> usize {
        let mut doomed = Vec::new();
        {
            let mut state = self.lock_state();
            loop {
                let present = state.entries.values().filter(|e| e.present);
                let (count, bytes) = present.fold((0usize, 0u64), |(count, bytes), e| {
                    (count + 1, bytes + e.size_bytes)
                });
                if count <= state.max_mirrors && bytes <= state.max_bytes {
                    break;
                }
                let victim = state
                    .entries
                    .iter()
                    .filter(|(_, e)| e.present && e.users == 0)
                    .min_by_key(|(_, e)| e.last_used)
                    .map(|(path, _)| path.clone());
                let Some(victim) = victim else {
                    break;
                };
                state.entries.remove(&victim);
                state.evicted_total += 1;
                state.clock += 1;
                // Renamed while no one can start using it (the state lock is held), deleted
                // afterwards.
                let name = victim
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let renamed = self
                    .directory
                    .join(format!("{EVICTING_PREFIX}{}-{name}", state.clock));
                match std::fs::rename(&victim, &renamed) {
                    Ok(()) => doomed.push(renamed),
                    Err(error) => {
                        tracing::warn!(mirror = %victim.display(), %error, "cannot evict the mirror");
                    }
                }
            }
        }
        let count = doomed.len();
        for path in doomed {
            tracing::info!(mirror = %path.display(), "mirror evicted (mirror cache limits)");
            if let Err(error) = tokio::fs::remove_dir_all(&path).await {
                tracing::warn!(path = %path.display(), %error, "cannot delete an evicted mirror");
            }
        }
        count
    }

    /// Counts for tests and metrics.
    pub fn stats(&self) -> MirrorCacheStats {
        let state = self.lock_state();
        let present = state.entries.values().filter(|e| e.present);
        let (mirrors, size_bytes) = present.fold((0, 0), |(count, bytes), e| {
            (count + 1, bytes + e.size_bytes)
        });
        MirrorCacheStats {
            mirrors,
            size_bytes,
            entries: state.entries.len(),
            evicted_total: state.evicted_total,
        }
    }
}
