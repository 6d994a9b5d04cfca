//! Group commit of proposals: concurrent writes share one log entry.
//!
//! openraft 0.9 spends its per-entry work (an append, a replication item, an apply call, a
//! commit notification) on every `client_write`. [`Proposer`] puts the requests that arrive
//! while earlier batches are in flight into one entry, a [`LogPayload::Batch`], applied in order
//! with one response per request. Bounds ([`ProposerSettings`]): requests per entry, encoded
//! bytes per entry, requests waiting, and entries in flight. There is no timer: a request that
//! finds a free in-flight slot is proposed at once (alone if nothing else waits), so batching
//! adds no latency when the cluster is idle and grows with the load.
//!
//! Ordering: requests of one batch apply in arrival order; batches in flight at the same time
//! are ordered by openraft as they reach it. A client that waits for each reply before its next
//! write (as every API caller does) sees its writes applied in its order.

use std::sync::Arc;

use flotilla_scheduler::{Request, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::node::WriteError;
use crate::types::Raft;

/// Default most requests in one log entry.
pub const DEFAULT_MAX_BATCH_REQUESTS: usize = 256;
/// Default most encoded bytes of the requests in one log entry (a larger request goes alone):
/// 256 KiB, so [`crate::node::DEFAULT_MAX_PAYLOAD_ENTRIES`] entries make a small AppendEntries.
pub const DEFAULT_MAX_BATCH_SIZE_BYTES: usize = 256 * 1024;
/// Default most requests waiting to be proposed; one more is refused as overloaded.
pub const DEFAULT_MAX_QUEUED_REQUESTS: usize = 4096;
/// Default most log entries proposed and not yet applied at once.
pub const DEFAULT_MAX_IN_FLIGHT_BATCHES: usize = 4;

/// The payload of one log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LogPayload {
    /// Requests proposed together (what this version writes), applied in order.
    Batch {
        /// At least one request.
        requests: Vec<Request>,
    },
    /// One request: an entry written by an earlier version (a bare `Request`).
    Single(Box<Request>),
}

impl LogPayload {
    /// The requests, in apply order.
    pub fn requests(&self) -> &[Request] {
        match self {
            LogPayload::Batch { requests } => requests,
            LogPayload::Single(request) => std::slice::from_ref(request.as_ref()),
        }
    }
}

/// Bounds of the group commit (see the module documentation). All must be at least 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProposerSettings {
    /// Most requests in one log entry.
    pub max_batch_requests: usize,
    /// Most encoded bytes of the requests in one log entry; a request larger than this is
    /// proposed alone.
    pub max_batch_size_bytes: usize,
    /// Most requests waiting for a batch; more are refused with [`WriteError::Overloaded`].
    pub max_queued_requests: usize,
    /// Most log entries proposed and not yet applied at once.
    pub max_in_flight_batches: usize,
}

impl Default for ProposerSettings {
    fn default() -> Self {
        ProposerSettings {
            max_batch_requests: DEFAULT_MAX_BATCH_REQUESTS,
            max_batch_size_bytes: DEFAULT_MAX_BATCH_SIZE_BYTES,
            max_queued_requests: DEFAULT_MAX_QUEUED_REQUESTS,
            max_in_flight_batches: DEFAULT_MAX_IN_FLIGHT_BATCHES,
        }
    }
}

impl ProposerSettings {
    /// The name of the first setting that is 0, if any.
    pub fn first_zero(&self) -> Option<&'static str> {
        [
            ("max_batch_requests", self.max_batch_requests),
            ("max_batch_size_bytes", self.max_batch_size_bytes),
            ("max_queued_requests", self.max_queued_requests),
            ("max_in_flight_batches", self.max_in_flight_batches),
        ]
        .into_iter()
        .find(|(_, value)| *value == 0)
        .map(|(name, _)| name)
    }
}

type Reply = oneshot::Sender<Result<(u64, Response), WriteError>>;

struct Queued {
    request: Request,
    size_bytes: usize,
    reply: Reply,
}

/// The queue in front of `client_write` (see the module documentation). Cheap to clone; the
/// batching task ends when the last clone is dropped.
#[derive(Clone)]
pub(crate) struct Proposer {
    sender: mpsc::Sender<Queued>,
    max_queued_requests: usize,
}

impl Proposer {
    /// Starts the batching task of `raft`.
    pub(crate) fn start(raft: Raft, settings: ProposerSettings) -> Proposer {
        let (sender, receiver) = mpsc::channel(settings.max_queued_requests);
        tokio::spawn(batch_loop(raft, receiver, settings));
        Proposer {
            sender,
            max_queued_requests: settings.max_queued_requests,
        }
    }

    /// Proposes `request` in the next batch and waits until it is applied: its entry's log
    /// index and its response.
    ///
    /// # Errors
    /// [`WriteError::Overloaded`] when `max_queued_requests` wait already; the errors of
    /// [`crate::RaftNode::write`] otherwise.
    pub(crate) async fn write(&self, request: Request) -> Result<(u64, Response), WriteError> {
        let size_bytes = crate::codec::encode(&request)
            .map_err(|error| WriteError::Encode(error.to_string()))?
            .len();
        let (reply, answer) = oneshot::channel();
        let queued = Queued {
            request,
            size_bytes,
            reply,
        };
        self.sender.try_send(queued).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => WriteError::Overloaded {
                max_queued_requests: self.max_queued_requests,
            },
            mpsc::error::TrySendError::Closed(_) => WriteError::ProposerStopped,
        })?;
        answer.await.map_err(|_| WriteError::ProposerStopped)?
    }
}

async fn batch_loop(raft: Raft, mut receiver: mpsc::Receiver<Queued>, settings: ProposerSettings) {
    let in_flight = Arc::new(Semaphore::new(settings.max_in_flight_batches));
    let mut carried: Option<Queued> = None;
    loop {
        // A free slot first: while every slot is busy, requests gather in the queue.
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(queued) => queued,
            None => match receiver.recv().await {
                Some(queued) => queued,
                None => return,
            },
        };
        let mut size_bytes = first.size_bytes;
        let mut batch = vec![first];
        while batch.len() < settings.max_batch_requests {
            let Ok(next) = receiver.try_recv() else {
                break;
            };
            if size_bytes.saturating_add(next.size_bytes) > settings.max_batch_size_bytes {
                carried = Some(next);
                break;
            }
            size_bytes += next.size_bytes;
            batch.push(next);
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            commit(&raft, batch).await;
            drop(permit);
        });
    }
}

/// Proposes `batch` as one entry and answers each request.
async fn commit(raft: &Raft, batch: Vec<Queued>) {
    let (requests, replies): (Vec<Request>, Vec<Reply>) = batch
        .into_iter()
        .map(|queued| (queued.request, queued.reply))
        .unzip();
    let count = requests.len();
    match raft.client_write(LogPayload::Batch { requests }).await {
        Ok(written) if written.data.len() == count => {
            let index = written.log_id.index;
            for (reply, response) in replies.into_iter().zip(written.data) {
                let _ = reply.send(Ok((index, response)));
            }
        }
        Ok(written) => {
            let message = format!(
                "the state machine answered {} responses for {count} requests",
                written.data.len()
            );
            for reply in replies {
                let _ = reply.send(Err(WriteError::Encode(message.clone())));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(crate::node::write_error(&error)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use flotilla_scheduler::{Command, Principal};

    use super::*;

    fn request(now_ms: u64) -> Request {
        Request::new(now_ms, Command::ExpireLeases, Principal::default())
    }

    #[test]
    fn batches_encode_compactly_and_legacy_entries_still_decode() {
        let batch = LogPayload::Batch {
            requests: vec![request(1), request(2)],
        };
        let bytes = crate::codec::encode(&batch).unwrap();
        let decoded: LogPayload = crate::codec::decode(&bytes).unwrap();
        assert_eq!(decoded.requests(), &[request(1), request(2)]);
        // An entry of an earlier version holds a bare request, as JSON or in the new codec.
        for legacy in [
            serde_json::to_vec(&request(3)).unwrap(),
            crate::codec::encode(&request(3)).unwrap(),
        ] {
            let decoded: LogPayload = crate::codec::decode(&legacy).unwrap();
            assert_eq!(decoded, LogPayload::Single(Box::new(request(3))));
            assert_eq!(decoded.requests(), &[request(3)]);
        }
    }

    #[test]
    fn zero_settings_are_named() {
        assert_eq!(ProposerSettings::default().first_zero(), None);
        let settings = ProposerSettings {
            max_in_flight_batches: 0,
            ..ProposerSettings::default()
        };
        assert_eq!(settings.first_zero(), Some("max_in_flight_batches"));
    }
}
