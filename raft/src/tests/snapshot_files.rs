//! Snapshot data lives in files beside RocksDB, named by one RocksDB record; snapshots that
//! earlier versions stored inside RocksDB still load.

use std::io::Cursor;
use std::path::Path;

use flotilla_scheduler::State;
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, StoredMembership};

use super::submit_fleet;
use crate::codec::{decode, encode};
use crate::state_machine::SNAPSHOT_DIRECTORY;
use crate::types::{LogId, SnapshotMeta};
use crate::{SnapshotPayload, StateMachineStore, open_storage};

fn payload(fleets: u64, index: u64) -> SnapshotPayload {
    let mut state = State::new();
    for number in 1..=fleets {
        state.apply(&submit_fleet(&format!("fleet-{number}"), number * 1_000));
    }
    SnapshotPayload {
        state,
        last_applied_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
        last_membership: StoredMembership::default(),
    }
}

fn meta(payload: &SnapshotPayload, id: &str) -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: payload.last_applied_log_id,
        last_membership: payload.last_membership.clone(),
        snapshot_id: id.into(),
    }
}

/// The names of the files in the snapshot directory, sorted.
fn snapshot_files(directory: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(directory.join(SNAPSHOT_DIRECTORY))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

async fn current(store: &mut StateMachineStore) -> (SnapshotMeta, SnapshotPayload) {
    let snapshot = store
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("a persisted snapshot");
    let payload = decode(snapshot.snapshot.get_ref()).unwrap();
    (snapshot.meta, payload)
}

#[tokio::test]
async fn a_snapshot_stored_inside_rocksdb_loads_and_the_next_one_moves_to_a_file() {
    let directory = tempfile::tempdir().unwrap();
    let legacy = payload(2, 5);
    {
        let (_log, store) = open_storage(directory.path()).unwrap();
        store.write_legacy_snapshot(&meta(&legacy, "legacy"), &legacy);
    }
    let (_log, mut store) = open_storage(directory.path()).unwrap();
    assert_eq!(store.state_handle().read(Clone::clone), legacy.state);
    let (loaded_meta, loaded) = current(&mut store).await;
    assert_eq!(loaded_meta.snapshot_id, "legacy");
    assert_eq!(loaded, legacy);
    assert!(snapshot_files(directory.path()).is_empty());

    let newer = payload(3, 9);
    store
        .install_snapshot(
            &meta(&newer, "newer"),
            Box::new(Cursor::new(encode(&newer).unwrap())),
        )
        .await
        .unwrap();
    assert!(
        !store.has_legacy_snapshot_data(),
        "the legacy data key is deleted"
    );
    let files = snapshot_files(directory.path());
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with(".snap"), "{files:?}");
    drop((_log, store));

    let (_log, mut store) = open_storage(directory.path()).unwrap();
    assert_eq!(store.state_handle().read(Clone::clone), newer.state);
    let (loaded_meta, loaded) = current(&mut store).await;
    assert_eq!(loaded_meta.snapshot_id, "newer");
    assert_eq!(loaded, newer);
}

#[tokio::test]
async fn files_no_record_names_are_removed_and_the_named_one_kept() {
    let directory = tempfile::tempdir().unwrap();
    let first = payload(1, 3);
    let second = payload(2, 7);
    {
        let (_log, mut store) = open_storage(directory.path()).unwrap();
        for (payload, id) in [(&first, "first"), (&second, "second")] {
            store
                .install_snapshot(
                    &meta(payload, id),
                    Box::new(Cursor::new(encode(payload).unwrap())),
                )
                .await
                .unwrap();
        }
        // Only the newest file is left after a persist.
        assert_eq!(snapshot_files(directory.path()).len(), 1);
    }
    let kept = snapshot_files(directory.path()).remove(0);
    // What a crash can leave: a half-written temporary file and a file written but never
    // named in RocksDB.
    let snapshots = directory.path().join(SNAPSHOT_DIRECTORY);
    std::fs::write(
        snapshots.join("00000000000000000009-1-1.snap.tmp"),
        b"partial",
    )
    .unwrap();
    std::fs::write(snapshots.join("00000000000000000009-1-2.snap"), b"unnamed").unwrap();

    let (_log, mut store) = open_storage(directory.path()).unwrap();
    assert_eq!(snapshot_files(directory.path()), vec![kept]);
    let (loaded_meta, loaded) = current(&mut store).await;
    assert_eq!(loaded_meta.snapshot_id, "second");
    assert_eq!(loaded, second);
}

#[tokio::test]
async fn an_older_snapshot_does_not_replace_a_newer_one() {
    let directory = tempfile::tempdir().unwrap();
    let (_log, mut store) = open_storage(directory.path()).unwrap();
    let newer = payload(2, 8);
    let older = payload(1, 4);
    for (payload, id) in [(&newer, "newer"), (&older, "older")] {
        store
            .install_snapshot(
                &meta(payload, id),
                Box::new(Cursor::new(encode(payload).unwrap())),
            )
            .await
            .unwrap();
    }
    let (loaded_meta, _) = current(&mut store).await;
    assert_eq!(loaded_meta.snapshot_id, "newer");
    assert_eq!(snapshot_files(directory.path()).len(), 1);
}
