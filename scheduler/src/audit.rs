//! The audit log: one record per applied command, hash-chained, in the replicated state.
//!
//! Invariant: every `Normal` Raft entry applied by [`State::apply_with_effects`](crate::State)
//! appends exactly one [`AuditRecord`] in the same apply, so a state change and its record are
//! committed together (there is no change without its record, nor a record without its change).
//! Records name the principal, the action and its target, and whether the command was accepted
//! or rejected (with the reason); they never hold secrets (token secrets never reach the state;
//! a token's record names only its accessor id).
//!
//! Chain: `hash = SHA-256(previous_hash || canonical_encoding(record))`, where the canonical
//! encoding is each field in order as a length-prefixed byte string (8-byte big-endian length,
//! then the bytes; numbers as 8-byte big-endian). The first record's `previous_hash` is
//! [`GENESIS_HASH`]. Changing, removing or reordering any record changes every later hash, so
//! [`verify`] detects it. The state keeps the newest [`MAX_AUDIT_RECORDS_KEPT`] records plus the
//! hash of the newest record dropped ([`AuditLog::anchor_hash`]), so what is kept still verifies;
//! `flotilla audit export` saves records before they are dropped.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::token::Principal;

/// Most audit records the state keeps; older ones are dropped first (their chain continues
/// from [`AuditLog::anchor_hash`]).
pub const MAX_AUDIT_RECORDS_KEPT: usize = 10_000;
/// Longest reason kept in a record, in bytes (cut at a character boundary).
pub const MAX_AUDIT_REASON_BYTES: usize = 512;
/// `previous_hash` of the very first record: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Whether an audited command took effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditOutcome {
    /// Applied.
    Accepted,
    /// Refused by the state machine; nothing changed.
    Rejected,
}

impl AuditOutcome {
    /// `accepted` or `rejected`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Accepted => "accepted",
            AuditOutcome::Rejected => "rejected",
        }
    }
}

/// One audit record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// 1, 2, 3... without gaps, over the cluster's lifetime.
    pub sequence: u64,
    /// Raft log index of the entry that carried the command (0 where unknown, e.g. tests).
    pub log_index: u64,
    /// The state's time at apply (leader stamp), in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Who asked.
    pub principal: Principal,
    /// The command, e.g. `submit_fleet`, `report_result`, `create_token`.
    pub action: String,
    /// What it concerned: a fleet id, run id and attempt, accessor id, worker id...
    pub target: String,
    /// Accepted or rejected.
    pub outcome: AuditOutcome,
    /// Why it was rejected, or a short detail (empty when none).
    pub reason: String,
    /// Hash of the previous record (lower-case hex).
    pub previous_hash: String,
    /// This record's hash (lower-case hex).
    pub hash: String,
}

impl AuditRecord {
    /// The hash this record should carry (see [`chain_hash`]).
    pub fn compute_hash(&self) -> String {
        chain_hash(&HashedFields {
            sequence: self.sequence,
            log_index: self.log_index,
            time_ms: self.time_ms,
            principal: &self.principal.describe(),
            action: &self.action,
            target: &self.target,
            outcome: self.outcome.as_str(),
            reason: &self.reason,
            previous_hash: &self.previous_hash,
        })
    }
}

/// The fields of a record that its hash covers, as text (so a client holding the wire form,
/// where the principal is its description, recomputes the same hash).
#[derive(Clone, Copy, Debug)]
pub struct HashedFields<'a> {
    /// [`AuditRecord::sequence`].
    pub sequence: u64,
    /// [`AuditRecord::log_index`].
    pub log_index: u64,
    /// [`AuditRecord::time_ms`].
    pub time_ms: u64,
    /// [`Principal::describe`] of [`AuditRecord::principal`].
    pub principal: &'a str,
    /// [`AuditRecord::action`].
    pub action: &'a str,
    /// [`AuditRecord::target`].
    pub target: &'a str,
    /// [`AuditOutcome::as_str`] of [`AuditRecord::outcome`].
    pub outcome: &'a str,
    /// [`AuditRecord::reason`].
    pub reason: &'a str,
    /// [`AuditRecord::previous_hash`].
    pub previous_hash: &'a str,
}

/// `SHA-256(previous_hash || canonical encoding)`, lower-case hex. The canonical encoding is
/// every field in the order of [`HashedFields`], each as an 8-byte big-endian length and its
/// bytes (numbers as 8-byte big-endian).
pub fn chain_hash(fields: &HashedFields<'_>) -> String {
    let mut hasher = Sha256::new();
    hasher.update(fields.previous_hash.as_bytes());
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    field(&fields.sequence.to_be_bytes());
    field(&fields.log_index.to_be_bytes());
    field(&fields.time_ms.to_be_bytes());
    field(fields.principal.as_bytes());
    field(fields.action.as_bytes());
    field(fields.target.as_bytes());
    field(fields.outcome.as_bytes());
    field(fields.reason.as_bytes());
    field(fields.previous_hash.as_bytes());
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

/// The kept records and the anchor of their chain. The records are a persistent vector
/// (`imbl`), so a copy of the state for a snapshot does not copy 10,000 records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    records: imbl::Vector<AuditRecord>,
    /// Hash of the newest dropped record ([`GENESIS_HASH`] while none was dropped).
    anchor_hash: String,
    /// Records dropped so far.
    dropped: u64,
    /// Sequence number of the next record.
    next_sequence: u64,
}

impl Default for AuditLog {
    fn default() -> Self {
        AuditLog {
            records: imbl::Vector::new(),
            anchor_hash: GENESIS_HASH.into(),
            dropped: 0,
            next_sequence: 1,
        }
    }
}

/// What a record says, before it is chained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// See [`AuditRecord::action`].
    pub action: String,
    /// See [`AuditRecord::target`].
    pub target: String,
    /// See [`AuditRecord::outcome`].
    pub outcome: AuditOutcome,
    /// See [`AuditRecord::reason`].
    pub reason: String,
}

impl AuditLog {
    /// Appends a record chained to the last one, dropping the oldest past
    /// [`MAX_AUDIT_RECORDS_KEPT`].
    pub fn append(
        &mut self,
        log_index: u64,
        time_ms: u64,
        principal: Principal,
        entry: AuditEntry,
    ) {
        let previous_hash = self
            .records
            .back()
            .map_or_else(|| self.anchor_hash.clone(), |r| r.hash.clone());
        let mut reason = entry.reason;
        if reason.len() > MAX_AUDIT_REASON_BYTES {
            let mut cut = MAX_AUDIT_REASON_BYTES;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        let mut record = AuditRecord {
            sequence: self.next_sequence,
            log_index,
            time_ms,
            principal,
            action: entry.action,
            target: entry.target,
            outcome: entry.outcome,
            reason,
            previous_hash,
            hash: String::new(),
        };
        record.hash = record.compute_hash();
        self.next_sequence += 1;
        self.records.push_back(record);
        while self.records.len() > MAX_AUDIT_RECORDS_KEPT {
            if let Some(dropped) = self.records.pop_front() {
                self.anchor_hash = dropped.hash;
                self.dropped += 1;
            }
        }
    }

    /// The kept records, oldest first.
    pub fn records(&self) -> &imbl::Vector<AuditRecord> {
        &self.records
    }

    /// Up to `limit` records with a sequence number above `after_sequence`, oldest first.
    pub fn records_after(&self, after_sequence: u64, limit: usize) -> Vec<AuditRecord> {
        let first = self.records.front().map_or(0, |r| r.sequence);
        let skip = after_sequence.saturating_add(1).saturating_sub(first) as usize;
        // A split is O(log n); `skip` on the iterator would walk.
        self.records
            .skip(skip.min(self.records.len()))
            .iter()
            .take(limit)
            .cloned()
            .collect()
    }

    /// The hash the oldest kept record chains from ([`GENESIS_HASH`] while nothing was dropped).
    pub fn anchor_hash(&self) -> &str {
        &self.anchor_hash
    }

    /// How many records were dropped (the oldest kept has sequence `dropped + 1`).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Hash of the newest record (the anchor when there is none).
    pub fn head_hash(&self) -> &str {
        self.records
            .back()
            .map_or(self.anchor_hash.as_str(), |r| r.hash.as_str())
    }
}

/// Why a chain does not verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The record's `previous_hash` is not the hash before it.
    #[error("record {sequence}: previous_hash does not match the hash of the record before it")]
    BrokenLink {
        /// The record.
        sequence: u64,
    },
    /// The record's `hash` is not the hash of its contents.
    #[error("record {sequence}: hash does not match its contents (the record was altered)")]
    BadHash {
        /// The record.
        sequence: u64,
    },
    /// Sequence numbers skip or repeat.
    #[error("record {sequence}: expected sequence {expected} (a record is missing or repeated)")]
    Gap {
        /// The record.
        sequence: u64,
        /// What it should have been.
        expected: u64,
    },
}

/// Recomputes the chain of `records` (oldest first) starting from `anchor_hash`.
///
/// # Errors
/// The first record that does not verify.
pub fn verify<'a>(
    anchor_hash: &str,
    records: impl IntoIterator<Item = &'a AuditRecord>,
) -> Result<u64, ChainError> {
    let mut previous = anchor_hash.to_string();
    let mut expected: Option<u64> = None;
    let mut count = 0;
    for record in records {
        if let Some(expected) = expected
            && record.sequence != expected
        {
            return Err(ChainError::Gap {
                sequence: record.sequence,
                expected,
            });
        }
        if record.previous_hash != previous {
            return Err(ChainError::BrokenLink {
                sequence: record.sequence,
            });
        }
        if record.compute_hash() != record.hash {
            return Err(ChainError::BadHash {
                sequence: record.sequence,
            });
        }
        previous = record.hash.clone();
        expected = Some(record.sequence + 1);
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Request, Response};
    use crate::token::{Principal, Role};
    use crate::{State, artifact::sha256_hex};

    fn principal() -> Principal {
        Principal::Token {
            accessor_id: "0123456789abcdef".into(),
            name: "ci".into(),
            role: Role::Admin,
        }
    }

    fn state_with_records(count: usize) -> State {
        let mut state = State::new();
        for i in 0..count {
            state.apply_with_effects(
                i as u64 + 1,
                &Request::new(1_000 + i as u64, Command::ExpireLeases, principal()),
                &mut Vec::new(),
            );
        }
        state
    }

    #[test]
    fn every_applied_command_appends_one_chained_record_that_verifies() {
        let mut state = State::new();
        let secret = "f".repeat(64);
        let created = state.apply_with_effects(
            7,
            &Request::new(
                5_000,
                Command::CreateToken {
                    accessor_id: "00000000000000aa".into(),
                    secret_sha256: sha256_hex(secret.as_bytes()),
                    name: "ci".into(),
                    project: Some("a".into()),
                    role: Role::Submitter,
                    worker_id: None,
                    expires_ms: None,
                },
                principal(),
            ),
            &mut Vec::new(),
        );
        assert!(matches!(created, Response::TokenCreated { .. }));
        let rejected = state.apply_with_effects(
            8,
            &Request::new(
                5_001,
                Command::RevokeToken {
                    accessor_id: "00000000000000bb".into(),
                },
                Principal::Unknown,
            ),
            &mut Vec::new(),
        );
        assert!(matches!(rejected, Response::Rejected { .. }));
        let records = state.audit().records();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].sequence, 1);
        assert_eq!(records[0].log_index, 7);
        assert_eq!(records[0].time_ms, 5_000);
        assert_eq!(records[0].action, "create_token");
        assert_eq!(records[0].principal, principal());
        assert_eq!(records[0].outcome, AuditOutcome::Accepted);
        assert_eq!(records[0].previous_hash, GENESIS_HASH);
        assert_eq!(records[1].outcome, AuditOutcome::Rejected);
        assert_eq!(records[1].reason, "no token 00000000000000bb");
        assert_eq!(records[1].previous_hash, records[0].hash);
        // Neither the secret nor its hash is in any record.
        let text = serde_json::to_string(records).unwrap();
        assert!(!text.contains(&secret));
        assert!(!text.contains(&sha256_hex(secret.as_bytes())));
        assert_eq!(verify(GENESIS_HASH, records), Ok(2));
    }

    #[test]
    fn tampering_with_any_record_is_detected() {
        let state = state_with_records(5);
        let kept: Vec<AuditRecord> = state.audit().records().iter().cloned().collect();
        assert_eq!(verify(GENESIS_HASH, &kept), Ok(5));
        // A changed field (hash left as it was).
        let mut altered = kept.clone();
        altered[2].target = "fleet fl-9".into();
        assert_eq!(
            verify(GENESIS_HASH, &altered),
            Err(ChainError::BadHash { sequence: 3 })
        );
        // A changed field with its hash recomputed breaks the next link.
        altered[2].hash = altered[2].compute_hash();
        assert_eq!(
            verify(GENESIS_HASH, &altered),
            Err(ChainError::BrokenLink { sequence: 4 })
        );
        // A removed record.
        let mut removed = kept.clone();
        removed.remove(1);
        assert_eq!(
            verify(GENESIS_HASH, &removed),
            Err(ChainError::Gap {
                sequence: 3,
                expected: 2
            })
        );
        // A changed principal.
        let mut other = kept.clone();
        other[0].principal = Principal::Unknown;
        assert_eq!(
            verify(GENESIS_HASH, &other),
            Err(ChainError::BadHash { sequence: 1 })
        );
    }

    #[test]
    fn dropping_old_records_keeps_what_remains_verifiable_from_the_anchor() {
        let state = state_with_records(MAX_AUDIT_RECORDS_KEPT + 3);
        let audit = state.audit();
        assert_eq!(audit.records().len(), MAX_AUDIT_RECORDS_KEPT);
        assert_eq!(audit.dropped(), 3);
        assert_eq!(audit.records()[0].sequence, 4);
        assert_ne!(audit.anchor_hash(), GENESIS_HASH);
        assert_eq!(
            verify(audit.anchor_hash(), audit.records()),
            Ok(MAX_AUDIT_RECORDS_KEPT as u64)
        );
        assert_eq!(audit.records_after(5, 2)[0].sequence, 6);
        assert!(audit.records_after(u64::MAX - 1, 10).is_empty());
    }

    #[test]
    fn old_entries_without_a_principal_read_as_unknown() {
        let json = r#"{"now_ms":5,"command":"ExpireLeases"}"#;
        let request: Request = serde_json::from_str(json).unwrap();
        assert_eq!(request.principal, Principal::Unknown);
    }
}
