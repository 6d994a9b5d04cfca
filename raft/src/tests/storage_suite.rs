//! openraft's storage conformance suite against the RocksDB stores.

use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

use crate::types::{StorageError, TypeConfig};
use crate::{LogStore, StateMachineStore, open_storage};

/// Opens both stores on a fresh database in a temporary directory, removed when the guard drops.
struct RocksStoreBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RocksStoreBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let directory = tempfile::tempdir().unwrap();
        let (log_store, state_machine) = open_storage(directory.path()).unwrap();
        Ok((directory, log_store, state_machine))
    }
}

#[test]
fn stores_pass_the_openraft_storage_suite() {
    Suite::test_all(RocksStoreBuilder).unwrap();
}
