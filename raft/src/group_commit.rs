//! Syncing log appends on one thread, so that appends waiting at the same time share one fsync
//! (group commit at the storage level, as etcd's WAL).
//!
//! The storage API lets [`append`](openraft::storage::RaftLogStorage::append) return once the
//! entries are *readable* and report durability later through the callback. So
//! [`LogStore`](crate::LogStore) writes each append's `WriteBatch` without sync (RocksDB's
//! memtable and write-ahead log file: readable at once) and passes the callback to the
//! [`WalSyncer`]: one thread that takes every callback queued while its previous sync ran (at
//! most [`MAX_APPENDS_AWAITING_SYNC`]), syncs the write-ahead log once (`FlushWAL(sync =
//! true)`, which covers every write before it), and completes those callbacks in order. No
//! timer: a lone append waits for exactly one fsync.
//!
//! What it buys with openraft 0.9: little. Its core loop waits for each append's callback
//! before it appends again (`RaftCore::append_to_log`, "a temp wrapper to make non-blocking
//! append_to_log a blocking"), so one node has at most one append waiting and every sync
//! covers one append (`RaftNode::log_sync_counts` shows appends = syncs;
//! `tests::group_commit` prints it). The writes of concurrent clients share fsyncs through the
//! proposer instead ([`crate::proposer`]: one log entry, hence one append, for many requests).
//! This layer is ready for a core that pipelines appends; it costs one thread hand-off per
//! append.
//!
//! Safety: openraft counts an entry as persisted (for its own vote towards commit on the
//! leader, for the AppendEntries reply on a follower) only when its callback ran, and the
//! callback runs only after a sync that started after the entry was written. An unsynced entry
//! lost in a machine crash was never reported persisted. Truncation, purging and votes stay
//! synced writes of their own, and a sync of the write-ahead log also covers the appends before
//! them, so the log on disk is always a prefix of what was appended.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use openraft::storage::LogFlushed;
use tokio::sync::mpsc;

use crate::storage::Database;
use crate::types::TypeConfig;

/// Most appends waiting for a sync; one more makes `append` wait (back-pressure on openraft).
/// Also the most callbacks one sync completes.
pub const MAX_APPENDS_AWAITING_SYNC: usize = 4096;

/// Counts of the syncer's work since the database was opened.
#[derive(Debug, Default)]
pub struct GroupCommitCounters {
    syncs: AtomicU64,
    appends: AtomicU64,
}

impl GroupCommitCounters {
    /// Write-ahead log syncs done.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Appends those syncs made durable (`appends / syncs` is the mean group size).
    pub fn appends(&self) -> u64 {
        self.appends.load(Ordering::Relaxed)
    }
}

/// The handle of the sync thread (see the module documentation). Cloned with the log store;
/// the thread ends when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct WalSyncer {
    sender: mpsc::Sender<LogFlushed<TypeConfig>>,
    counters: Arc<GroupCommitCounters>,
}

impl WalSyncer {
    /// Starts the sync thread of `database`. The thread holds only a weak reference, so it
    /// does not keep the database open.
    ///
    /// # Errors
    /// The operating system refused to start a thread.
    pub(crate) fn start(database: &Arc<Database>) -> std::io::Result<WalSyncer> {
        let (sender, receiver) = mpsc::channel(MAX_APPENDS_AWAITING_SYNC);
        let counters = Arc::new(GroupCommitCounters::default());
        let weak = Arc::downgrade(database);
        let thread_counters = Arc::clone(&counters);
        std::thread::Builder::new()
            .name("raft-wal-sync".into())
            .spawn(move || sync_loop(&weak, receiver, &thread_counters))?;
        Ok(WalSyncer { sender, counters })
    }

    /// Completes `callback` after the next sync of the write-ahead log (the caller has written
    /// its entries, unsynced, before calling). If the thread is gone, completes it with an
    /// error at once.
    pub(crate) async fn complete_after_sync(&self, callback: LogFlushed<TypeConfig>) {
        if let Err(mpsc::error::SendError(callback)) = self.sender.send(callback).await {
            callback.log_io_completed(Err(std::io::Error::other(
                "the write-ahead log sync thread stopped",
            )));
        }
    }

    /// The syncer's counters.
    pub(crate) fn counters(&self) -> Arc<GroupCommitCounters> {
        Arc::clone(&self.counters)
    }
}

fn sync_loop(
    database: &Weak<Database>,
    mut receiver: mpsc::Receiver<LogFlushed<TypeConfig>>,
    counters: &GroupCommitCounters,
) {
    let mut pending = Vec::with_capacity(64);
    while let Some(first) = receiver.blocking_recv() {
        pending.push(first);
        while pending.len() < MAX_APPENDS_AWAITING_SYNC {
            match receiver.try_recv() {
                Ok(callback) => pending.push(callback),
                Err(_) => break,
            }
        }
        let result = match database.upgrade() {
            Some(database) => database.flush_wal(true).map_err(|error| error.to_string()),
            None => Err("the database is closed".to_owned()),
        };
        counters.syncs.fetch_add(1, Ordering::Relaxed);
        counters
            .appends
            .fetch_add(pending.len() as u64, Ordering::Relaxed);
        for callback in pending.drain(..) {
            callback.log_io_completed(result.clone().map_err(std::io::Error::other));
        }
    }
}
