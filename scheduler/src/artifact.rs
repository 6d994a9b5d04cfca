//! Artifacts: the bytes of results that do not belong in the replicated state (patches and log
//! tails), and the effects through which applying a command stores and deletes them.
//!
//! A result's patch and log tail travel in the `ReportResult` log entry, as every command does,
//! so every replica receives them. Applying the entry keeps only their size and SHA-256 in the
//! [`State`](crate::State) (and so in snapshots and state digests) and returns
//! [`Effect::PutArtifact`] with the bytes; the replica's storage writes them to its artifact
//! store under an [`ArtifactKey`]. Compacting a fleet returns
//! [`Effect::DeleteFleetArtifacts`], so artifacts share the fleet's retention.
//!
//! Keys sort by fleet, run, attempt and kind (big-endian numbers), so one fleet's artifacts are
//! one contiguous key range ([`ArtifactKey::fleet_range`]).

use sha2::{Digest as _, Sha256};

/// What an artifact holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ArtifactKind {
    /// The attempt's log tail (UTF-8 text).
    LogTail,
    /// The attempt's patch (UTF-8 text, `git diff` output).
    Patch,
}

impl ArtifactKind {
    fn code(self) -> u8 {
        match self {
            ArtifactKind::LogTail => 1,
            ArtifactKind::Patch => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(ArtifactKind::LogTail),
            2 => Some(ArtifactKind::Patch),
            _ => None,
        }
    }
}

/// Where an artifact is stored: one per (run, attempt, kind).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArtifactKey {
    /// The fleet's number (`fl-<number>`).
    pub fleet_number: u64,
    /// The run's index in its fleet.
    pub run_index: u32,
    /// The attempt number (from 1).
    pub attempt: u32,
    /// Patch or log tail.
    pub kind: ArtifactKind,
}

/// Length of [`ArtifactKey::to_bytes`].
pub const ARTIFACT_KEY_BYTES: usize = 17;

impl ArtifactKey {
    /// The storage key: fleet number (8 bytes), run index (4), attempt (4), kind (1), all
    /// big-endian, so keys sort by fleet, run, attempt, kind.
    pub fn to_bytes(&self) -> [u8; ARTIFACT_KEY_BYTES] {
        let mut bytes = [0u8; ARTIFACT_KEY_BYTES];
        bytes[..8].copy_from_slice(&self.fleet_number.to_be_bytes());
        bytes[8..12].copy_from_slice(&self.run_index.to_be_bytes());
        bytes[12..16].copy_from_slice(&self.attempt.to_be_bytes());
        bytes[16] = self.kind.code();
        bytes
    }

    /// Parses [`ArtifactKey::to_bytes`]; `None` for anything else.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != ARTIFACT_KEY_BYTES {
            return None;
        }
        let number = |range: std::ops::Range<usize>| bytes.get(range);
        Some(ArtifactKey {
            fleet_number: u64::from_be_bytes(number(0..8)?.try_into().ok()?),
            run_index: u32::from_be_bytes(number(8..12)?.try_into().ok()?),
            attempt: u32::from_be_bytes(number(12..16)?.try_into().ok()?),
            kind: ArtifactKind::from_code(bytes[16])?,
        })
    }

    /// The half-open key range `[start, end)` that holds every artifact of fleet
    /// `fleet_number`.
    pub fn fleet_range(fleet_number: u64) -> (Vec<u8>, Vec<u8>) {
        (
            fleet_number.to_be_bytes().to_vec(),
            fleet_number.saturating_add(1).to_be_bytes().to_vec(),
        )
    }
}

/// A side effect of applying a command, carried out by the replica's storage after the state
/// changed (in the same apply step, before readers see the new state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Store `bytes` under `key` (replacing what is there: re-applying the entry after a restart
    /// writes the same bytes again).
    PutArtifact {
        /// Where.
        key: ArtifactKey,
        /// The artifact's bytes; their SHA-256 is in the state.
        bytes: Vec<u8>,
    },
    /// Delete every artifact of the fleet (it was compacted away).
    DeleteFleetArtifacts {
        /// The fleet's number.
        fleet_number: u64,
    },
}

/// Lower-case hexadecimal SHA-256 of `bytes` (64 characters).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from_digit(u32::from(byte >> 4), 16).unwrap_or('0'));
        hex.push(char::from_digit(u32::from(byte & 0xf), 16).unwrap_or('0'));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_fleet_run_attempt_kind() {
        let key = |fleet_number, run_index, attempt, kind| ArtifactKey {
            fleet_number,
            run_index,
            attempt,
            kind,
        };
        let keys = [
            key(1, 0, 1, ArtifactKind::LogTail),
            key(1, 0, 1, ArtifactKind::Patch),
            key(1, 0, 2, ArtifactKind::LogTail),
            key(1, 7, 1, ArtifactKind::LogTail),
            key(2, 0, 1, ArtifactKind::LogTail),
            key(u64::MAX, u32::MAX, u32::MAX, ArtifactKind::Patch),
        ];
        for pair in keys.windows(2) {
            assert!(pair[0].to_bytes() < pair[1].to_bytes(), "{pair:?}");
        }
        for key in keys {
            assert_eq!(ArtifactKey::from_bytes(&key.to_bytes()), Some(key));
        }
        assert_eq!(ArtifactKey::from_bytes(b"short"), None);
        let mut bad_kind = keys[0].to_bytes();
        bad_kind[16] = 9;
        assert_eq!(ArtifactKey::from_bytes(&bad_kind), None);
        let (start, end) = ArtifactKey::fleet_range(1);
        for key in &keys[..4] {
            let bytes = key.to_bytes().to_vec();
            assert!(start <= bytes && bytes < end);
        }
        assert!(keys[4].to_bytes().to_vec() >= end);
    }

    #[test]
    fn sha256_matches_the_standard_test_vector() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
