//! The one encoding of everything this crate writes to RocksDB or sends to a peer: log entries,
//! metadata (vote, committed, purged), snapshots and Raft RPCs.
//!
//! Format: one version byte, then the value. Version [`FORMAT_VERSION_MESSAGEPACK`] (1) is
//! MessagePack with named fields (`rmp-serde`'s `to_vec_named`), a compact binary encoding that
//! is still self-describing, so `#[serde(default)]` fields added to the state's types keep
//! working as they do with JSON (postcard and bincode are not self-describing and would break
//! on every added field). Values written by earlier versions are JSON without a version byte;
//! they still decode: a JSON document starts with `{`, `[`, `"`, `n`, `t`, `f`, a digit or `-`,
//! none of which is a version byte. A version byte this build does not know is an error naming
//! it, never a guess.
//!
//! Compatibility: a node of this version reads the logs, snapshots and RPCs of earlier
//! versions; earlier versions cannot read what it writes, so a cluster is upgraded by
//! replacing all nodes, not by a rolling mix.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The version byte of MessagePack with named fields.
pub const FORMAT_VERSION_MESSAGEPACK: u8 = 1;

/// Why a value could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Encoding failed (a type serde cannot express in MessagePack).
    #[error("encoding: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The bytes are MessagePack of another shape.
    #[error("decoding MessagePack: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// The bytes are legacy JSON of another shape.
    #[error("decoding legacy JSON: {0}")]
    DecodeJson(#[from] serde_json::Error),
    /// Empty input.
    #[error("no bytes to decode")]
    Empty,
    /// The first byte is neither a known version nor the start of legacy JSON.
    #[error("unknown format version byte {0:#04x}")]
    UnknownVersion(u8),
}

/// `value` as the version byte followed by its MessagePack.
///
/// # Errors
/// [`CodecError::Encode`].
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut bytes = Vec::with_capacity(64);
    bytes.push(FORMAT_VERSION_MESSAGEPACK);
    rmp_serde::encode::write_named(&mut bytes, value)?;
    Ok(bytes)
}

/// Whether `byte` can start a JSON document (RFC 8259, without leading whitespace, which
/// `serde_json::to_vec` never writes).
fn starts_json(byte: u8) -> bool {
    matches!(
        byte,
        b'{' | b'[' | b'"' | b'n' | b't' | b'f' | b'-' | b'0'..=b'9'
    )
}

/// Decodes what [`encode`] wrote, or legacy JSON.
///
/// # Errors
/// [`CodecError::Empty`], [`CodecError::UnknownVersion`], or a decoding error of the format.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&first, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    match first {
        FORMAT_VERSION_MESSAGEPACK => Ok(rmp_serde::from_slice(rest)?),
        byte if starts_json(byte) => Ok(serde_json::from_slice(bytes)?),
        byte => Err(CodecError::UnknownVersion(byte)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Shape {
        Unit,
        Tuple(u32, String),
        Named { a: u64 },
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Old {
        number: u64,
        shapes: Vec<Shape>,
        by_number: BTreeMap<u64, String>,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct New {
        number: u64,
        shapes: Vec<Shape>,
        by_number: BTreeMap<u64, String>,
        #[serde(default)]
        added: Option<String>,
    }

    fn old() -> Old {
        Old {
            number: 7,
            shapes: vec![
                Shape::Unit,
                Shape::Tuple(1, "x".into()),
                Shape::Named { a: 2 },
            ],
            by_number: BTreeMap::from([(3, "three".into())]),
        }
    }

    #[test]
    fn values_round_trip_with_a_version_byte_and_added_fields_default() {
        let bytes = encode(&old()).unwrap();
        assert_eq!(bytes[0], FORMAT_VERSION_MESSAGEPACK);
        assert_eq!(decode::<Old>(&bytes).unwrap(), old());
        // A field added later reads as its default from what the older type wrote.
        let new: New = decode(&bytes).unwrap();
        assert_eq!(new.added, None);
        assert_eq!(new.by_number, old().by_number);
        // Smaller than the JSON it replaces.
        assert!(bytes.len() < serde_json::to_vec(&old()).unwrap().len());
    }

    #[test]
    fn legacy_json_still_decodes_and_unknown_versions_are_named() {
        let json = serde_json::to_vec(&old()).unwrap();
        assert_eq!(decode::<Old>(&json).unwrap(), old());
        assert_eq!(decode::<Option<u64>>(b"null").unwrap(), None);
        assert_eq!(decode::<u64>(b"42").unwrap(), 42);
        assert!(matches!(decode::<u64>(&[]), Err(CodecError::Empty)));
        let error = decode::<u64>(&[0x02, 0x00]).unwrap_err();
        assert_eq!(error.to_string(), "unknown format version byte 0x02");
    }
}
