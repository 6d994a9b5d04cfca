//! Names: fleets, projects, tokens, secrets, worker ids.

/// Longest name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// Whether `name` is 1-64 characters of `[A-Za-z0-9._-]`.
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_and_plain() {
        for good in ["a", "fleet-1", "my_project.v2", &"n".repeat(MAX_NAME_BYTES)] {
            assert!(is_valid_name(good), "{good:?}");
        }
        let too_long = "n".repeat(MAX_NAME_BYTES + 1);
        for bad in ["", "a b", "a/b", "é", "a:b", too_long.as_str()] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }
}
