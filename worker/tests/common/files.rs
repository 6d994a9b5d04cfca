//! File scans shared by the leak tests of the worker and the node (`worker/tests/push_credentials.rs`,
//! `node/tests/secrets.rs`): where on disk a secret value ended up.

use std::path::{Path, PathBuf};

/// Every file under `directory` (recursively, symbolic links not followed) whose bytes contain
/// `needle`.
pub fn files_containing(directory: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![directory.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(metadata) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap().flatten() {
                stack.push(entry.path());
            }
        } else if metadata.is_file()
            && let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            found.push(path);
        }
    }
    found
}
