//! The RocksDB database that holds a node's Raft data, shared by the [`LogStore`] and the
//! [`StateMachineStore`].
//!
//! Column families:
//! - [`LOGS_COLUMN_FAMILY`]: the log; key = the entry's index as a big-endian `u64` (so keys sort
//!   by index), value = the [`Entry`](crate::types::Entry) in [`crate::codec`]'s
//!   encoding (legacy JSON entries still decode);
//! - [`META_COLUMN_FAMILY`]: the vote, the last committed log id and the last purged log id, each
//!   encoded under its own key;
//! - [`SNAPSHOTS_COLUMN_FAMILY`]: the latest snapshot: its encoded
//!   [`SnapshotMeta`](crate::types::SnapshotMeta) and its data bytes;
//! - [`ARTIFACTS_COLUMN_FAMILY`]: result artifacts (patches, log tails) outside the state; key
//!   = [`ArtifactKey::to_bytes`](flotilla_scheduler::ArtifactKey::to_bytes), value = the bytes.
//!   Written and deleted by the [`Effect`](flotilla_scheduler::Effect)s of applied entries; not
//!   part of snapshots (a node that installed a snapshot fetches older artifacts from peers).

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::AnyError;
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};
use tokio::sync::watch;

use crate::log_store::LogStore;
use crate::state_machine::StateMachineStore;
use crate::types::StorageError;

/// Column family of the log entries.
pub const LOGS_COLUMN_FAMILY: &str = "logs";
/// Column family of the vote, committed and last purged log ids.
pub const META_COLUMN_FAMILY: &str = "meta";
/// Column family of the latest snapshot.
pub const SNAPSHOTS_COLUMN_FAMILY: &str = "snapshots";
/// Column family of result artifacts (patches, log tails).
pub const ARTIFACTS_COLUMN_FAMILY: &str = "artifacts";

/// Why [`open_storage`] failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenStorageError {
    /// The database directory could not be created.
    #[error("cannot create the Raft data directory {path}: {source}")]
    CreateDirectory {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// RocksDB refused to open the database (locked by another process, corrupt, ...).
    #[error("cannot open the Raft database at {path}: {source}")]
    OpenDatabase {
        /// The database directory.
        path: PathBuf,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// The write-ahead log's sync thread could not be started.
    #[error("cannot start the write-ahead log sync thread: {0}")]
    StartSyncThread(#[source] std::io::Error),
    /// The persisted snapshot could not be read or decoded.
    #[error("cannot restore the state machine from the persisted snapshot: {0}")]
    RestoreSnapshot(#[source] Box<StorageError>),
}

/// Opens (creating if missing) the RocksDB database in directory `path` and returns the log
/// store and the state machine store on it. The state machine starts from the persisted snapshot,
/// if any; openraft then re-applies the committed log after it.
///
/// Both stores share the database; it is closed when both (and every clone of the log store
/// that openraft made) are dropped.
///
/// # Errors
/// [`OpenStorageError`] if the directory cannot be created, RocksDB cannot open it (for example
/// because another process holds it), or the persisted snapshot cannot be decoded.
pub fn open_storage(path: &Path) -> Result<(LogStore, StateMachineStore), OpenStorageError> {
    std::fs::create_dir_all(path).map_err(|source| OpenStorageError::CreateDirectory {
        path: path.to_path_buf(),
        source,
    })?;
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    let column_families = [
        LOGS_COLUMN_FAMILY,
        META_COLUMN_FAMILY,
        SNAPSHOTS_COLUMN_FAMILY,
        ARTIFACTS_COLUMN_FAMILY,
    ]
    .into_iter()
    .map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    let database = DB::open_cf_descriptors(&options, path, column_families).map_err(|source| {
        OpenStorageError::OpenDatabase {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let (closed, _) = watch::channel(());
    let database = Arc::new(Database {
        rocksdb: database,
        closed,
    });
    let snapshot_directory = path.join(crate::state_machine::SNAPSHOT_DIRECTORY);
    let state_machine = StateMachineStore::open(Arc::clone(&database), snapshot_directory)
        .map_err(OpenStorageError::RestoreSnapshot)?;
    let syncer = crate::group_commit::WalSyncer::start(&database)
        .map_err(OpenStorageError::StartSyncThread)?;
    Ok((LogStore::new(database, syncer), state_machine))
}

/// The open RocksDB database. Dropping the last reference closes RocksDB (releasing its lock on
/// the directory) and then tells every [`Database::closed_receiver`].
pub(crate) struct Database {
    rocksdb: DB,
    /// Dropped after `rocksdb`, since fields drop in declaration order; its receivers then see
    /// the channel closed.
    closed: watch::Sender<()>,
}

impl Database {
    /// A receiver whose `changed()` fails once the database is closed.
    pub(crate) fn closed_receiver(&self) -> watch::Receiver<()> {
        self.closed.subscribe()
    }
}

impl Deref for Database {
    type Target = DB;

    fn deref(&self) -> &DB {
        &self.rocksdb
    }
}

/// Whether a write must reach the disk (fsync of RocksDB's write-ahead log) before it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durability {
    /// The write-ahead log is synced before the write returns.
    Synced,
    /// The write is in RocksDB's memtable and write-ahead log buffer; a later synced write, or
    /// RocksDB's own flushing, makes it durable. Lost on a machine crash, not on a process crash.
    Buffered,
}

/// The handle of column family `name`, which [`open_storage`] always creates.
pub(crate) fn column_family<'a>(
    database: &'a DB,
    name: &str,
) -> Result<&'a ColumnFamily, AnyError> {
    database
        .cf_handle(name)
        .ok_or_else(|| AnyError::error(format!("RocksDB column family {name:?} is missing")))
}

/// Writes `batch` atomically on a blocking thread (so an fsync does not stall the async runtime)
/// and waits for it.
pub(crate) async fn write_batch(
    database: &Arc<Database>,
    batch: WriteBatch,
    durability: Durability,
) -> Result<(), AnyError> {
    let database = Arc::clone(database);
    tokio::task::spawn_blocking(move || {
        let mut options = WriteOptions::default();
        options.set_sync(durability == Durability::Synced);
        database.write_opt(batch, &options)
    })
    .await
    .map_err(|error| AnyError::new(&error))?
    .map_err(|error| AnyError::new(&error))
}

/// Reads the value under `key` in column family `column_family_name` ([`crate::codec`]).
pub(crate) fn read_value<T: serde::de::DeserializeOwned>(
    database: &DB,
    column_family_name: &str,
    key: &[u8],
) -> Result<Option<T>, AnyError> {
    let column_family = column_family(database, column_family_name)?;
    let Some(bytes) = database
        .get_pinned_cf(column_family, key)
        .map_err(|error| AnyError::new(&error))?
    else {
        return Ok(None);
    };
    crate::codec::decode(&bytes).map(Some).map_err(|error| {
        AnyError::new(&error)
            .add_context(|| format!("decoding key {:?}", String::from_utf8_lossy(key)))
    })
}

/// Encodes `value` ([`crate::codec`]).
pub(crate) fn encode_value<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, AnyError> {
    crate::codec::encode(value).map_err(|error| AnyError::new(&error))
}
