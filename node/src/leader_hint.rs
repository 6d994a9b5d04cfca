//! The leader hint: an UNAVAILABLE answer from a node that knows the leader carries the leader's
//! `host:port` in the gRPC metadata entry `flotilla-leader-address`, so that a client (the CLI)
//! can try the leader directly on its next attempt. Any other gRPC client may ignore it.

use tonic::Status;

/// The metadata key of the hint. Its value is the leader's gRPC `host:port` (its advertise
/// address), without a scheme.
pub const LEADER_ADDRESS_METADATA: &str = "flotilla-leader-address";

/// Longest hint a client accepts, in bytes (a `host:port` is far shorter).
pub const MAX_LEADER_ADDRESS_BYTES: usize = 256;

/// Returns `status` carrying `leader_address` (`host:port`) as the hint. A value that is not a
/// valid metadata value (non-ASCII, control characters) is left out: the status is unchanged.
pub fn with_leader_address(mut status: Status, leader_address: &str) -> Status {
    if let Ok(value) = leader_address.parse() {
        status.metadata_mut().insert(LEADER_ADDRESS_METADATA, value);
    }
    status
}

/// The hint of `status` as an `http://host:port` URL, or `None` when it carries none, or one
/// that is empty, longer than [`MAX_LEADER_ADDRESS_BYTES`], not printable ASCII, or not a
/// `host:port` a channel can be made to.
pub fn leader_url(status: &Status) -> Option<String> {
    let value = status.metadata().get(LEADER_ADDRESS_METADATA)?;
    let address = value.to_str().ok()?.trim();
    if address.is_empty()
        || address.len() > MAX_LEADER_ADDRESS_BYTES
        || address.contains('/')
        || !address.bytes().all(|b| b.is_ascii_graphic())
    {
        return None;
    }
    let url = format!("http://{address}");
    tonic::transport::Endpoint::from_shared(url.clone()).ok()?;
    Some(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hint_survives_the_round_trip_as_a_url() {
        let status = with_leader_address(Status::unavailable("forward failed"), "10.1.2.3:7600");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "forward failed");
        assert_eq!(leader_url(&status).as_deref(), Some("http://10.1.2.3:7600"));
    }

    #[test]
    fn no_or_malformed_hints_give_none() {
        assert_eq!(leader_url(&Status::unavailable("no leader")), None);
        for bad in ["", "   ", "http://a:1", "a:1/path", "a b:1"] {
            let mut status = Status::unavailable("x");
            status
                .metadata_mut()
                .insert(LEADER_ADDRESS_METADATA, bad.parse().unwrap());
            assert_eq!(leader_url(&status), None, "{bad:?}");
        }
        let long = format!("{}:1", "a".repeat(MAX_LEADER_ADDRESS_BYTES));
        assert_eq!(
            leader_url(&with_leader_address(Status::unavailable("x"), &long)),
            None
        );
        // Not a metadata value at all: left out.
        let status = with_leader_address(Status::unavailable("x"), "bad\naddress");
        assert!(status.metadata().get(LEADER_ADDRESS_METADATA).is_none());
    }
}
