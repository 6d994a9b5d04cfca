//! The replicated state machine: [`flotilla_scheduler::State`] in memory behind openraft's
//! [`RaftStateMachine`], with snapshots persisted as files beside RocksDB.
//!
//! Persistence model ("persistent snapshot", see [`RaftStateMachine::apply`]): applying an
//! entry changes only memory. Every snapshot, whether built here or installed from the leader
//! (Raft §7), is persisted before openraft is told about it, so openraft only purges log
//! entries that a persisted snapshot covers.
//!
//! Snapshot storage: the data goes to its own file in `<raft directory>/snapshots/` (written
//! to a temporary name, fsynced, renamed, directory fsynced), and only then does one small
//! synced RocksDB write name it as the latest (its [`SnapshotMeta`] and file name), as etcd
//! keeps `.snap` files beside its WAL. The data does not go through RocksDB: a 70 MB value in
//! the shared write-ahead log would stall every log append and every apply behind it for the
//! length of its write and fsync (measured: 0.6-1.5 s). Files that no RocksDB record names
//! (a crash between the two steps, or replaced snapshots) are removed at open and after each
//! persist. Snapshots persisted in RocksDB by earlier versions still load. On startup the state is restored from the
//! persisted snapshot, and openraft re-applies the committed entries after it (the log store
//! persists the committed log id).
//!
//! Snapshot format: a [`SnapshotPayload`] in [`crate::codec`]'s encoding (legacy JSON snapshots
//! still load).
//!
//! Applying is deterministic: it reads no clock and no randomness; time comes from
//! [`flotilla_scheduler::Request::now_ms`].

use std::fmt::Debug;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

use flotilla_scheduler::{ArtifactKey, Effect, Response, State};
use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use rocksdb::{DB, WriteBatch};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::storage::{
    ARTIFACTS_COLUMN_FAMILY, Database, SNAPSHOTS_COLUMN_FAMILY, column_family, encode_value,
    read_value,
};
use crate::types::{
    Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

/// Key of the latest snapshot's [`SnapshotMeta`] ([`crate::codec`]) in the snapshots column family.
const SNAPSHOT_META_KEY: &[u8] = b"meta";
/// Key of the latest snapshot's data (an encoded [`SnapshotPayload`]) in the snapshots column
/// family, as earlier versions stored it; read when [`SNAPSHOT_FILE_KEY`] is absent, deleted by
/// the next persist.
const SNAPSHOT_DATA_KEY: &[u8] = b"data";
/// Key of the latest snapshot's file name (UTF-8, in [`SNAPSHOT_DIRECTORY`]) in the snapshots
/// column family.
const SNAPSHOT_FILE_KEY: &[u8] = b"file";
/// The directory of snapshot files, inside the Raft data directory.
pub(crate) const SNAPSHOT_DIRECTORY: &str = "snapshots";
/// Suffix of snapshot files; `.tmp` is added while one is written.
const SNAPSHOT_FILE_SUFFIX: &str = ".snap";

/// What a snapshot holds: the whole state and where in the log it was taken.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotPayload {
    /// The scheduler state after applying every entry up to `last_applied_log_id`.
    pub state: State,
    /// The last log entry applied to `state`; `None` before the first.
    pub last_applied_log_id: Option<LogId>,
    /// The last membership configuration applied.
    pub last_membership: StoredMembership,
}

/// The in-memory state machine and its position in the log.
#[derive(Clone, Debug)]
struct AppliedState {
    state: State,
    last_applied_log_id: Option<LogId>,
    last_membership: StoredMembership,
}

/// What the state machine store shares with every [`StateHandle`].
struct SharedState {
    applied: RwLock<AppliedState>,
    /// The last applied log index (0 before the first entry).
    last_applied_index: watch::Sender<u64>,
}

impl SharedState {
    fn read_applied<T>(&self, reader: impl FnOnce(&AppliedState) -> T) -> T {
        // A panic while holding the lock can only come from `State::apply`; the state machine
        // worker has stopped then and readers see the state as it was left.
        let applied = self.applied.read().unwrap_or_else(PoisonError::into_inner);
        reader(&applied)
    }

    fn write_applied<T>(&self, writer: impl FnOnce(&mut AppliedState) -> T) -> T {
        let (result, index) = {
            let mut applied = self.applied.write().unwrap_or_else(PoisonError::into_inner);
            let result = writer(&mut applied);
            (
                result,
                applied.last_applied_log_id.map_or(0, |log_id| log_id.index),
            )
        };
        self.last_applied_index.send_if_modified(|current| {
            let changed = *current != index;
            *current = index;
            changed
        });
        result
    }
}

/// Read access to the replicated [`State`] for the rest of the node, and a notification when it
/// changes. Cloning is cheap; clones share the state.
#[derive(Clone)]
pub struct StateHandle {
    shared: Arc<SharedState>,
    /// Weak, so a handle kept by the node does not keep RocksDB open after shutdown.
    database: Weak<Database>,
}

impl Debug for StateHandle {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StateHandle")
            .field("last_applied_index", &self.last_applied_index())
            .finish()
    }
}

impl StateHandle {
    /// Runs `reader` on the current state under a read lock and returns its result.
    ///
    /// Applying waits while `reader` runs, so keep it short; it cannot await (the lock is a
    /// `std` lock, never held across an `.await`). The state is this node's applied state: on a
    /// follower it may lag the leader; call
    /// [`RaftNode::ensure_linearizable`](crate::RaftNode::ensure_linearizable) first for a
    /// linearizable read.
    pub fn read<T>(&self, reader: impl FnOnce(&State) -> T) -> T {
        self.shared.read_applied(|applied| reader(&applied.state))
    }

    /// Runs `reader` on the current state and the log index of the last entry applied to it (0
    /// before the first entry), both read under the same read lock, so the index is exactly the
    /// one the state reflects (for state digests compared across nodes). Same rules as
    /// [`read`](Self::read): keep it short, no await.
    pub fn read_with_index<T>(&self, reader: impl FnOnce(&State, u64) -> T) -> T {
        self.shared.read_applied(|applied| {
            let index = applied.last_applied_log_id.map_or(0, |log_id| log_id.index);
            reader(&applied.state, index)
        })
    }

    /// A receiver of the last applied log index (0 before the first entry). It changes after
    /// every batch of applied entries and after a snapshot is installed, so long polls and event
    /// streams can wait for [`watch::Receiver::changed`] and then [`read`](Self::read).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.last_applied_index.subscribe()
    }

    /// The last applied log index (0 before the first entry).
    pub fn last_applied_index(&self) -> u64 {
        *self.shared.last_applied_index.borrow()
    }

    /// The artifact stored under `key` on this node, if any. An artifact is written in the
    /// same apply step that records its digest in the state, so once the state shows a
    /// result, this node has its artifacts, unless it installed a snapshot taken after that
    /// result (snapshots carry digests, not artifacts) or the fleet was compacted.
    ///
    /// # Errors
    /// The database is closed or RocksDB failed to read.
    pub fn artifact(&self, key: &ArtifactKey) -> Result<Option<Vec<u8>>, AnyError> {
        let database = self
            .database
            .upgrade()
            .ok_or_else(|| AnyError::error("the Raft database is closed"))?;
        let artifacts = column_family(&database, ARTIFACTS_COLUMN_FAMILY)?;
        database
            .get_cf(artifacts, key.to_bytes())
            .map_err(|error| AnyError::new(&error))
    }

    /// Stores an artifact fetched from a peer (after the caller checked its digest against the
    /// state), so the next read is local. Buffered write: losing it only means fetching again.
    ///
    /// # Errors
    /// The database is closed or RocksDB failed to write.
    pub fn store_artifact(&self, key: &ArtifactKey, bytes: &[u8]) -> Result<(), AnyError> {
        let database = self
            .database
            .upgrade()
            .ok_or_else(|| AnyError::error("the Raft database is closed"))?;
        let artifacts = column_family(&database, ARTIFACTS_COLUMN_FAMILY)?;
        database
            .put_cf(artifacts, key.to_bytes(), bytes)
            .map_err(|error| AnyError::new(&error))
    }
}

/// Carries out the storage effects of applied entries in one buffered write batch. Buffered is
/// enough: after a crash, the entries after the persisted snapshot are applied again and write
/// the same artifacts, and the snapshot's synced write made every earlier write durable.
fn write_effects(database: &DB, effects: &[Effect]) -> Result<(), AnyError> {
    if effects.is_empty() {
        return Ok(());
    }
    let artifacts = column_family(database, ARTIFACTS_COLUMN_FAMILY)?;
    let mut batch = WriteBatch::default();
    for effect in effects {
        match effect {
            Effect::PutArtifact { key, bytes } => batch.put_cf(artifacts, key.to_bytes(), bytes),
            Effect::DeleteFleetArtifacts { fleet_number } => {
                let (start, end) = ArtifactKey::fleet_range(*fleet_number);
                batch.delete_range_cf(artifacts, start, end);
            }
        }
    }
    database.write(batch).map_err(|error| AnyError::new(&error))
}

/// The state machine store: openraft's [`RaftStateMachine`] over [`State`], with the latest
/// snapshot in RocksDB.
pub struct StateMachineStore {
    database: Arc<Database>,
    shared: Arc<SharedState>,
    snapshots: Arc<SnapshotWriter>,
}

impl Debug for StateMachineStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StateMachineStore")
            .field("path", &self.database.path())
            .finish()
    }
}

/// Serializes snapshot writes and numbers snapshot ids.
struct SnapshotWriter {
    /// Held while comparing with and replacing the persisted snapshot, so that a slow snapshot
    /// build never overwrites a newer snapshot installed meanwhile.
    write_lock: Mutex<()>,
    /// Where snapshot files live ([`SNAPSHOT_DIRECTORY`]).
    directory: PathBuf,
    /// Distinguishes snapshots built at the same log id within this process.
    next_sequence: AtomicU64,
}

/// The file name of the persisted snapshot, if RocksDB names one.
fn persisted_file_name(database: &DB) -> Result<Option<String>, AnyError> {
    let snapshots = column_family(database, SNAPSHOTS_COLUMN_FAMILY)?;
    let Some(name) = database
        .get_cf(snapshots, SNAPSHOT_FILE_KEY)
        .map_err(|error| AnyError::new(&error))?
    else {
        return Ok(None);
    };
    String::from_utf8(name)
        .map(Some)
        .map_err(|error| AnyError::error(format!("snapshot file name is not UTF-8: {error}")))
}

/// Reads the persisted snapshot, if any: its meta from RocksDB and its data from the file
/// RocksDB names (or, for a snapshot persisted by an earlier version, from RocksDB).
fn read_snapshot(
    database: &DB,
    directory: &Path,
) -> Result<Option<(SnapshotMeta, Vec<u8>)>, AnyError> {
    let Some(meta) =
        read_value::<SnapshotMeta>(database, SNAPSHOTS_COLUMN_FAMILY, SNAPSHOT_META_KEY)?
    else {
        return Ok(None);
    };
    if let Some(name) = persisted_file_name(database)? {
        let path = directory.join(&name);
        let data = std::fs::read(&path).map_err(|error| {
            AnyError::error(format!(
                "cannot read snapshot file {}: {error}",
                path.display()
            ))
        })?;
        return Ok(Some((meta, data)));
    }
    let snapshots = column_family(database, SNAPSHOTS_COLUMN_FAMILY)?;
    let data = database
        .get_cf(snapshots, SNAPSHOT_DATA_KEY)
        .map_err(|error| AnyError::new(&error))?
        .ok_or_else(|| AnyError::error("snapshot meta without snapshot data"))?;
    Ok(Some((meta, data)))
}

/// Writes `data` to `directory/name` durably: a temporary file, fsync, rename, fsync of the
/// directory.
fn write_file_durably(directory: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let temporary = directory.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(data)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&temporary, directory.join(name))?;
    std::fs::File::open(directory)?.sync_all()
}

/// Removes every file in `directory` but `keep` (snapshot files RocksDB no longer names, and
/// temporary files of interrupted writes). Failures are logged: a leftover file costs only
/// disk space.
fn remove_unnamed_snapshot_files(directory: &Path, keep: Option<&str>) {
    let entries = match std::fs::read_dir(directory) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(directory = %directory.display(), %error, "cannot list snapshot files");
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if keep.is_some_and(|keep| name.to_str() == Some(keep)) {
            continue;
        }
        if let Err(error) = std::fs::remove_file(entry.path()) {
            tracing::warn!(file = %entry.path().display(), %error, "cannot remove a snapshot file");
        }
    }
}

impl SnapshotWriter {
    /// Persists `(meta, data)` as the latest snapshot unless the persisted one is newer. Blocks;
    /// call it on a blocking thread.
    fn persist(&self, database: &DB, meta: &SnapshotMeta, data: &[u8]) -> Result<(), AnyError> {
        let _guard = self
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let persisted: Option<SnapshotMeta> =
            read_value(database, SNAPSHOTS_COLUMN_FAMILY, SNAPSHOT_META_KEY)?;
        if let Some(persisted) = persisted
            && persisted.last_log_id > meta.last_log_id
        {
            tracing::info!(
                persisted = %persisted,
                built = %meta,
                "not persisting a snapshot older than the persisted one"
            );
            return Ok(());
        }
        // A name never used before in this directory: the sequence is per process, the
        // wall-clock nanoseconds tell processes apart (storage, not the state machine, so
        // reading the clock here is fine).
        let nanoseconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos());
        let index = meta.last_log_id.map_or(0, |log_id| log_id.index);
        let sequence = self.next_sequence.fetch_add(1, Ordering::Relaxed);
        let name = format!("{index:020}-{nanoseconds}-{sequence}{SNAPSHOT_FILE_SUFFIX}");
        write_file_durably(&self.directory, &name, data).map_err(|error| {
            AnyError::error(format!(
                "cannot write snapshot file {}: {error}",
                self.directory.join(&name).display()
            ))
        })?;
        let snapshots = column_family(database, SNAPSHOTS_COLUMN_FAMILY)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(snapshots, SNAPSHOT_META_KEY, encode_value(meta)?);
        batch.put_cf(snapshots, SNAPSHOT_FILE_KEY, name.as_bytes());
        batch.delete_cf(snapshots, SNAPSHOT_DATA_KEY);
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        database
            .write_opt(batch, &options)
            .map_err(|error| AnyError::new(&error))?;
        remove_unnamed_snapshot_files(&self.directory, Some(&name));
        Ok(())
    }
}

impl StateMachineStore {
    /// A state machine store on `database`, restored from the persisted snapshot if there is
    /// one.
    pub(crate) fn open(
        database: Arc<Database>,
        snapshot_directory: PathBuf,
    ) -> Result<Self, Box<StorageError>> {
        std::fs::create_dir_all(&snapshot_directory).map_err(|error| {
            Box::new(StorageIOError::read_snapshot(None, AnyError::new(&error)).into())
        })?;
        let persisted_file = persisted_file_name(&database)
            .map_err(|error| Box::new(StorageIOError::read_snapshot(None, error).into()))?;
        remove_unnamed_snapshot_files(&snapshot_directory, persisted_file.as_deref());
        let applied = match read_snapshot(&database, &snapshot_directory)
            .map_err(|error| Box::new(StorageIOError::read_snapshot(None, error).into()))?
        {
            Some((meta, data)) => {
                let payload: SnapshotPayload = crate::codec::decode(&data).map_err(|error| {
                    let error = StorageIOError::read_snapshot(
                        Some(meta.signature()),
                        AnyError::new(&error),
                    );
                    Box::new(error.into())
                })?;
                tracing::info!(snapshot = %meta, "restored the state machine from the persisted snapshot");
                AppliedState {
                    state: payload.state,
                    last_applied_log_id: meta.last_log_id,
                    last_membership: meta.last_membership,
                }
            }
            None => AppliedState {
                state: State::new(),
                last_applied_log_id: None,
                last_membership: StoredMembership::default(),
            },
        };
        let index = applied.last_applied_log_id.map_or(0, |log_id| log_id.index);
        let (last_applied_index, _) = watch::channel(index);
        Ok(StateMachineStore {
            database,
            shared: Arc::new(SharedState {
                applied: RwLock::new(applied),
                last_applied_index,
            }),
            snapshots: Arc::new(SnapshotWriter {
                write_lock: Mutex::new(()),
                directory: snapshot_directory,
                next_sequence: AtomicU64::new(1),
            }),
        })
    }

    /// A handle on the state that outlives this store (openraft owns the store).
    pub fn state_handle(&self) -> StateHandle {
        StateHandle {
            shared: Arc::clone(&self.shared),
            database: Arc::downgrade(&self.database),
        }
    }

    /// Persists a snapshot on a blocking thread.
    async fn persist_snapshot(
        &self,
        meta: &SnapshotMeta,
        data: Vec<u8>,
    ) -> Result<(), StorageError> {
        persist_snapshot(&self.database, &self.snapshots, meta, data).await
    }
}

async fn persist_snapshot(
    database: &Arc<Database>,
    snapshots: &Arc<SnapshotWriter>,
    meta: &SnapshotMeta,
    data: Vec<u8>,
) -> Result<(), StorageError> {
    let database = Arc::clone(database);
    let snapshots = Arc::clone(snapshots);
    let task_meta = meta.clone();
    tokio::task::spawn_blocking(move || snapshots.persist(&database, &task_meta, &data))
        .await
        .map_err(|error| AnyError::new(&error))
        .and_then(|result| result)
        .map_err(|error| StorageIOError::write_snapshot(Some(meta.signature()), error))?;
    Ok(())
}

/// Builds a snapshot from a copy of the state taken when openraft asked for the builder.
pub struct SnapshotBuilder {
    database: Arc<Database>,
    snapshots: Arc<SnapshotWriter>,
    applied: AppliedState,
    /// How long the copy of the state took, holding the state's read lock, in microseconds
    /// (O(1) in the runs: [`flotilla_scheduler::Fleet::runs`] is a persistent vector).
    copy_us: u128,
    /// How long taking the state's read lock waited before the copy (an apply in progress),
    /// in microseconds.
    lock_wait_us: u128,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        // The builder's copy is used once: moved, not copied again.
        let payload = SnapshotPayload {
            state: std::mem::take(&mut self.applied.state),
            last_applied_log_id: self.applied.last_applied_log_id,
            last_membership: self.applied.last_membership.clone(),
        };
        let started = std::time::Instant::now();
        let sequence = self.snapshots.next_sequence.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match payload.last_applied_log_id {
            Some(log_id) => format!("{}-{}-{sequence}", log_id.leader_id, log_id.index),
            None => format!("none-{sequence}"),
        };
        let meta = SnapshotMeta {
            last_log_id: payload.last_applied_log_id,
            last_membership: payload.last_membership.clone(),
            snapshot_id,
        };
        let data = tokio::task::spawn_blocking(move || encode_value(&payload))
            .await
            .map_err(|error| AnyError::new(&error))
            .and_then(|result| result)
            .map_err(|error| StorageIOError::write_snapshot(Some(meta.signature()), error))?;
        let encode_ms = started.elapsed().as_millis();
        persist_snapshot(&self.database, &self.snapshots, &meta, data.clone()).await?;
        tracing::info!(
            snapshot = %meta,
            bytes = data.len(),
            copy_us = self.copy_us,
            lock_wait_us = self.lock_wait_us,
            encode_ms,
            persist_ms = started.elapsed().as_millis() - encode_ms,
            "built and persisted a snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Applies one entry to `applied`, appends its storage effects to `effects`, and returns one
/// response per request (none for blank and membership entries). The requests of one entry
/// share its log index (in their audit records too).
fn apply_entry(
    applied: &mut AppliedState,
    entry: Entry,
    effects: &mut Vec<Effect>,
) -> Vec<Response> {
    applied.last_applied_log_id = Some(entry.log_id);
    match entry.payload {
        EntryPayload::Blank => Vec::new(),
        EntryPayload::Normal(payload) => payload
            .requests()
            .iter()
            .map(|request| {
                applied
                    .state
                    .apply_with_effects(entry.log_id.index, request, effects)
            })
            .collect(),
        EntryPayload::Membership(membership) => {
            applied.last_membership = StoredMembership::new(Some(entry.log_id), membership);
            Vec::new()
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok(self
            .shared
            .read_applied(|applied| (applied.last_applied_log_id, applied.last_membership.clone())))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Response>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let database = &self.database;
        self.shared
            .write_applied(|applied| {
                let mut effects = Vec::new();
                let responses = entries
                    .into_iter()
                    .map(|entry| apply_entry(applied, entry, &mut effects))
                    .collect();
                // Under the state's write lock: readers never see a result whose artifacts are
                // not stored yet.
                write_effects(database, &effects).map(|()| responses)
            })
            .map_err(|error| StorageIOError::write(error).into())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let started = std::time::Instant::now();
        let (applied, copy_us) = self.shared.read_applied(|applied| {
            let copy_started = std::time::Instant::now();
            (applied.clone(), copy_started.elapsed().as_micros())
        });
        SnapshotBuilder {
            database: Arc::clone(&self.database),
            snapshots: Arc::clone(&self.snapshots),
            applied,
            copy_us,
            lock_wait_us: started.elapsed().as_micros().saturating_sub(copy_us),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        let data = snapshot.into_inner();
        let bytes = data.len();
        let payload: SnapshotPayload = crate::codec::decode(&data).map_err(|error| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&error))
        })?;
        let decode_ms = started.elapsed().as_millis();
        self.persist_snapshot(meta, data).await?;
        self.shared.write_applied(|applied| {
            *applied = AppliedState {
                state: payload.state,
                last_applied_log_id: meta.last_log_id,
                last_membership: meta.last_membership.clone(),
            };
        });
        tracing::info!(
            snapshot = %meta,
            bytes,
            decode_ms,
            total_ms = started.elapsed().as_millis(),
            "installed a snapshot from the leader"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let database = Arc::clone(&self.database);
        let snapshots = Arc::clone(&self.snapshots);
        // Under the writer's lock, so a persist in between cannot remove the file whose name
        // was just read; on a blocking thread, since it reads the whole file.
        let snapshot = tokio::task::spawn_blocking(move || {
            let _guard = snapshots
                .write_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            read_snapshot(&database, &snapshots.directory)
        })
        .await
        .map_err(|error| AnyError::new(&error))
        .and_then(|result| result)
        .map_err(|error| StorageIOError::read_snapshot(None, error))?;
        Ok(snapshot.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
impl StateMachineStore {
    /// Writes `(meta, payload)` the way versions before snapshot files did: both in RocksDB.
    pub(crate) fn write_legacy_snapshot(&self, meta: &SnapshotMeta, payload: &SnapshotPayload) {
        let snapshots = column_family(&self.database, SNAPSHOTS_COLUMN_FAMILY).unwrap();
        let mut batch = WriteBatch::default();
        batch.put_cf(snapshots, SNAPSHOT_META_KEY, encode_value(meta).unwrap());
        batch.put_cf(snapshots, SNAPSHOT_DATA_KEY, encode_value(payload).unwrap());
        self.database.write(batch).unwrap();
    }

    /// Whether RocksDB still holds snapshot data under the legacy key.
    pub(crate) fn has_legacy_snapshot_data(&self) -> bool {
        let snapshots = column_family(&self.database, SNAPSHOTS_COLUMN_FAMILY).unwrap();
        self.database
            .get_cf(snapshots, SNAPSHOT_DATA_KEY)
            .unwrap()
            .is_some()
    }
}
