//! Group commit on a real node: concurrent writes share log entries (so one fsync serves many),
//! each gets its own response, and a full proposal queue is refused as overloaded.

use flotilla_scheduler::Response;

use super::{TestNode, submit_fleet, wait_for_leader};
use crate::WriteError;
use crate::proposer::ProposerSettings;

const WRITERS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_entries_and_syncs_and_each_gets_its_response() {
    let directory = tempfile::tempdir().unwrap();
    let test_node = TestNode::start(1, directory.path(), |config| {
        // One entry in flight: every write that arrives meanwhile joins the next batch.
        config.proposals.max_in_flight_batches = 1;
    })
    .await;
    let node = &test_node.node;
    assert!(node.initialize_single_node().await.unwrap());
    wait_for_leader(node).await;
    let before_index = node.raft.metrics().borrow().last_log_index.unwrap_or(0);
    let (syncs_before, appends_before) = node.log_sync_counts();

    let writes = (0..WRITERS).map(|writer| {
        let node = node.clone();
        tokio::spawn(async move {
            let key = format!("writer-{writer}");
            let mut request = submit_fleet(&key, 1_000 + writer as u64);
            if let flotilla_scheduler::Command::SubmitFleet {
                idempotency_key, ..
            } = &mut request.command
            {
                *idempotency_key = key;
            }
            node.write(request).await
        })
    });
    let mut fleet_ids = Vec::new();
    let mut indexes = std::collections::BTreeSet::new();
    for write in writes.collect::<Vec<_>>() {
        let (index, response) = write.await.unwrap().unwrap();
        indexes.insert(index);
        match response {
            Response::FleetSubmitted {
                fleet_id,
                created: true,
            } => fleet_ids.push(fleet_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Every write was applied once, with its own fleet...
    fleet_ids.sort();
    fleet_ids.dedup();
    assert_eq!(fleet_ids.len(), WRITERS);
    // ... in fewer log entries and fewer syncs than writes.
    let after_index = node.raft.metrics().borrow().last_log_index.unwrap_or(0);
    let entries = after_index - before_index;
    let (syncs_after, appends_after) = node.log_sync_counts();
    eprintln!(
        "{WRITERS} writes: {entries} entries ({} distinct indexes), {} syncs for {} appends",
        indexes.len(),
        syncs_after - syncs_before,
        appends_after - appends_before
    );
    assert!(
        entries < WRITERS as u64,
        "{entries} entries for {WRITERS} writes"
    );
    assert_eq!(indexes.len() as u64, entries);
    assert!(syncs_after - syncs_before <= entries);
    test_node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_proposal_queue_is_refused_as_overloaded() {
    let directory = tempfile::tempdir().unwrap();
    let test_node = TestNode::start(1, directory.path(), |config| {
        config.proposals = ProposerSettings {
            max_batch_requests: 1,
            max_queued_requests: 2,
            max_in_flight_batches: 1,
            ..ProposerSettings::default()
        };
    })
    .await;
    let node = &test_node.node;
    assert!(node.initialize_single_node().await.unwrap());
    wait_for_leader(node).await;
    let writes: Vec<_> = (0..64)
        .map(|writer| {
            let node = node.clone();
            tokio::spawn(async move {
                node.write(submit_fleet(&format!("w-{writer}"), 1_000))
                    .await
            })
        })
        .collect();
    let mut overloaded = 0;
    let mut applied = 0;
    for write in writes {
        match write.await.unwrap() {
            Ok(_) => applied += 1,
            Err(WriteError::Overloaded {
                max_queued_requests: 2,
            }) => overloaded += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(overloaded > 0, "no write was refused");
    assert!(applied > 0, "no write was applied");
    // What was refused was not applied.
    let fleets = node
        .state
        .read(|state| state.fleets_before(u64::MAX, usize::MAX).count());
    assert_eq!(fleets, applied);
    test_node.stop().await;
}
