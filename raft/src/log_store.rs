//! The Raft log and vote on RocksDB: openraft's [`RaftLogStorage`] (storage API v2).
//!
//! Durability (Raft §5, "persistent state on all servers"): the vote is synced to disk before
//! [`save_vote`](RaftLogStorage::save_vote) returns; every [`append`](RaftLogStorage::append)
//! call writes its entries in one RocksDB `WriteBatch` (readable at once) and openraft's
//! callback runs only after a later sync of the write-ahead log, which one thread does for all
//! appends waiting at the time ([`crate::group_commit`]; with openraft 0.9 that is one). Truncation and purging are single
//! synced batches built from `delete_range`, so the log never has a hole.
//!
//! The committed log id is saved too (unsynced: losing it only means fewer entries re-applied),
//! so that after a restart openraft re-applies the committed entries that follow the persisted
//! snapshot, and the state machine is back where it was before the restart.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{AnyError, LogState, OptionalSend, RaftLogReader, StorageIOError};
use rocksdb::{DB, Direction, IteratorMode, WriteBatch};
use tokio::sync::watch;

use crate::group_commit::{GroupCommitCounters, WalSyncer};
use crate::storage::{
    Database, Durability, LOGS_COLUMN_FAMILY, META_COLUMN_FAMILY, column_family, encode_value,
    read_value, write_batch,
};
use crate::types::{Entry, LogId, StorageError, TypeConfig, Vote};

/// Key of the vote in the meta column family.
const VOTE_KEY: &[u8] = b"vote";
/// Key of the last committed log id in the meta column family.
const COMMITTED_KEY: &[u8] = b"committed";
/// Key of the last purged log id in the meta column family.
const LAST_PURGED_KEY: &[u8] = b"last_purged_log_id";

/// The log store: log entries, vote, committed and last purged log ids, in RocksDB.
///
/// Cloning is cheap and shares the database; openraft uses clones as log readers for its
/// replication tasks.
#[derive(Clone)]
pub struct LogStore {
    database: Arc<Database>,
    /// The index of the last committed log id saved or read (0 before any); shared with the
    /// [`RaftNode`](crate::RaftNode), which reports it in its cluster view.
    committed_index: Arc<AtomicU64>,
    /// Syncs the write-ahead log for appends, many at a time.
    syncer: WalSyncer,
}

impl Debug for LogStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LogStore")
            .field("path", &self.database.path())
            .finish()
    }
}

/// The key of the log entry at `index`: big-endian, so keys sort by index.
fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// The index encoded in a log key.
fn decode_index_key(key: &[u8]) -> Result<u64, AnyError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| AnyError::error(format!("log key of {} bytes, expected 8", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Deletes the log entries with indexes `first_index..=last_index` from `batch`'s target.
fn delete_indexes(
    batch: &mut WriteBatch,
    database: &DB,
    first_index: u64,
    last_index: u64,
) -> Result<(), AnyError> {
    let logs = column_family(database, LOGS_COLUMN_FAMILY)?;
    // `delete_range` excludes its end; the last index is deleted on its own so that
    // `last_index = u64::MAX` needs no overflowing end key.
    batch.delete_range_cf(logs, index_key(first_index), index_key(last_index));
    batch.delete_cf(logs, index_key(last_index));
    Ok(())
}

impl LogStore {
    /// A log store on `database`, which must have the column families of
    /// [`open_storage`](crate::open_storage).
    pub(crate) fn new(database: Arc<Database>, syncer: WalSyncer) -> Self {
        LogStore {
            database,
            committed_index: Arc::new(AtomicU64::new(0)),
            syncer,
        }
    }

    /// The group commit's counters (syncs, appends), shared with every clone.
    pub fn group_commit_counters(&self) -> Arc<GroupCommitCounters> {
        self.syncer.counters()
    }

    /// The index of the last committed entry openraft saved through this store or its clones,
    /// shared: openraft saves it before applying every newly committed batch, on the leader and
    /// on followers (0 before any).
    pub(crate) fn committed_index(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.committed_index)
    }

    /// Publishes `committed` as the committed index, never moving it backwards.
    fn publish_committed(&self, committed: Option<LogId>) {
        if let Some(log_id) = committed {
            self.committed_index
                .fetch_max(log_id.index, Ordering::Relaxed);
        }
    }

    /// A receiver whose `changed()` fails once every user dropped the database and RocksDB
    /// closed it.
    pub(crate) fn database_closed_receiver(&self) -> watch::Receiver<()> {
        self.database.closed_receiver()
    }

    /// The newest log entry's id, if the log holds any entry.
    fn last_entry_log_id(&self) -> Result<Option<LogId>, AnyError> {
        let logs = column_family(&self.database, LOGS_COLUMN_FAMILY)?;
        let Some(item) = self.database.iterator_cf(logs, IteratorMode::End).next() else {
            return Ok(None);
        };
        let (_, value) = item.map_err(|error| AnyError::new(&error))?;
        let entry: Entry = crate::codec::decode(&value).map_err(|error| AnyError::new(&error))?;
        Ok(Some(entry.log_id))
    }

    /// Writes `value` ([`crate::codec`]) under `key` in the meta column family.
    async fn write_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
        durability: Durability,
    ) -> Result<(), AnyError> {
        let meta = column_family(&self.database, META_COLUMN_FAMILY)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(meta, key, encode_value(value)?);
        write_batch(&self.database, batch, durability).await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let first_index = match range.start_bound() {
            Bound::Included(index) => *index,
            Bound::Excluded(index) => match index.checked_add(1) {
                Some(index) => index,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        let logs =
            column_family(&self.database, LOGS_COLUMN_FAMILY).map_err(StorageIOError::read_logs)?;
        let start_key = index_key(first_index);
        let mut entries = Vec::new();
        for item in self
            .database
            .iterator_cf(logs, IteratorMode::From(&start_key, Direction::Forward))
        {
            let (key, value) =
                item.map_err(|error| StorageIOError::read_logs(AnyError::new(&error)))?;
            let index = decode_index_key(&key).map_err(StorageIOError::read_logs)?;
            if !range.contains(&index) {
                break;
            }
            let entry: Entry = crate::codec::decode(&value)
                .map_err(|error| StorageIOError::read_log_at_index(index, AnyError::new(&error)))?;
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> =
            read_value(&self.database, META_COLUMN_FAMILY, LAST_PURGED_KEY)
                .map_err(StorageIOError::read_logs)?;
        let last_log_id = self
            .last_entry_log_id()
            .map_err(StorageIOError::read_logs)?
            .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.write_meta(VOTE_KEY, vote, Durability::Synced)
            .await
            .map_err(StorageIOError::write_vote)?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(read_value(&self.database, META_COLUMN_FAMILY, VOTE_KEY)
            .map_err(StorageIOError::read_vote)?)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.write_meta(COMMITTED_KEY, &committed, Durability::Buffered)
            .await
            .map_err(StorageIOError::write)?;
        self.publish_committed(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed: Option<Option<LogId>> =
            read_value(&self.database, META_COLUMN_FAMILY, COMMITTED_KEY)
                .map_err(StorageIOError::read)?;
        let committed = committed.flatten();
        self.publish_committed(committed);
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let logs = column_family(&self.database, LOGS_COLUMN_FAMILY)
            .map_err(StorageIOError::write_logs)?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            let value = encode_value(&entry)
                .map_err(|error| StorageIOError::write_log_entry(entry.log_id, error))?;
            batch.put_cf(logs, index_key(entry.log_id.index), value);
        }
        match write_batch(&self.database, batch, Durability::Buffered).await {
            Ok(()) => {
                self.syncer.complete_after_sync(callback).await;
                Ok(())
            }
            Err(error) => {
                callback.log_io_completed(Err(std::io::Error::other(error.to_string())));
                Err(StorageIOError::write_logs(error).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        delete_indexes(&mut batch, &self.database, log_id.index, u64::MAX)
            .map_err(StorageIOError::write_logs)?;
        write_batch(&self.database, batch, Durability::Synced)
            .await
            .map_err(StorageIOError::write_logs)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let meta = column_family(&self.database, META_COLUMN_FAMILY)
            .map_err(StorageIOError::write_logs)?;
        let mut batch = WriteBatch::default();
        // The last purged id and the deletion are one atomic batch, so `get_log_state` never sees
        // logs purged without the id that says so.
        batch.put_cf(
            meta,
            LAST_PURGED_KEY,
            encode_value(&log_id).map_err(StorageIOError::write_logs)?,
        );
        delete_indexes(&mut batch, &self.database, 0, log_id.index)
            .map_err(StorageIOError::write_logs)?;
        write_batch(&self.database, batch, Durability::Synced)
            .await
            .map_err(StorageIOError::write_logs)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    /// A log and vote written by an earlier version (JSON without a version byte) still read;
    /// what this version writes starts with the version byte.
    #[tokio::test]
    async fn entries_and_votes_written_as_json_by_earlier_versions_still_read() {
        let directory = tempfile::tempdir().unwrap();
        let (mut log_store, _state_machine) = crate::open_storage(directory.path()).unwrap();
        let legacy_entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(crate::proposer::LogPayload::Single(Box::new(
                flotilla_scheduler::Request::new(
                    5,
                    flotilla_scheduler::Command::ExpireLeases,
                    flotilla_scheduler::Principal::default(),
                ),
            ))),
        };
        let database = Arc::clone(&log_store.database);
        let logs = column_family(&database, LOGS_COLUMN_FAMILY).unwrap();
        let meta = column_family(&database, META_COLUMN_FAMILY).unwrap();
        database
            .put_cf(
                logs,
                index_key(1),
                serde_json::to_vec(&legacy_entry).unwrap(),
            )
            .unwrap();
        database
            .put_cf(
                meta,
                VOTE_KEY,
                serde_json::to_vec(&Vote::new(1, 1)).unwrap(),
            )
            .unwrap();

        assert_eq!(log_store.read_vote().await.unwrap(), Some(Vote::new(1, 1)));
        let entries = log_store.try_get_log_entries(1..2).await.unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].log_id, legacy_entry.log_id);
        assert_eq!(
            log_store.get_log_state().await.unwrap().last_log_id,
            Some(legacy_entry.log_id)
        );

        log_store.save_vote(&Vote::new(2, 1)).await.unwrap();
        let raw = database.get_cf(meta, VOTE_KEY).unwrap().unwrap();
        assert_eq!(raw[0], crate::codec::FORMAT_VERSION_MESSAGEPACK);
        assert_eq!(log_store.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
    }
}
