//! Bait for the host-side git escape cases, shared by `worker/tests/escape.rs` and
//! `node/tests/escape_fleet.rs`: a global git configuration that defines a filter and a diff
//! driver (host git must never run them), and another host repository for a nested `.git` to
//! point at (its commit must never leave as a gitlink).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The bait under one root.
pub struct Bait {
    /// A directory to use as `XDG_CONFIG_HOME`: its `git/config` defines the `flotillaevil`
    /// filter and diff drivers, which `touch` [`Bait::marker`].
    pub global: PathBuf,
    /// Exists once a bait driver ran.
    pub marker: PathBuf,
    /// Another repository's `.git` directory, with one commit.
    pub other_git: PathBuf,
    /// That commit's id.
    pub other_commit: String,
}

fn git(directory: &Path, arguments: &[&str]) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(directory)
        .args(arguments)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .output()
        .expect("git");
    assert!(output.status.success(), "git {arguments:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Creates the bait under `root` (`xdg/`, `filter-ran`, `other/`).
pub fn create(root: &Path) -> Bait {
    let global = root.join("xdg");
    let marker = root.join("filter-ran");
    std::fs::create_dir_all(global.join("git")).expect("bait directory");
    std::fs::write(
        global.join("git/config"),
        format!(
            "[filter \"flotillaevil\"]\n\tclean = touch {0}; cat\n\tsmudge = touch {0}; cat\n[diff \"flotillaevil\"]\n\ttextconv = touch {0}; cat\n",
            marker.display()
        ),
    )
    .expect("bait git config");
    let other = root.join("other");
    std::fs::create_dir_all(&other).expect("other repository");
    git(&other, &["init", "-q", "-b", "main"]);
    std::fs::write(other.join("private.txt"), "private\n").expect("private file");
    git(&other, &["add", "private.txt"]);
    git(&other, &["commit", "-q", "-m", "private"]);
    let other_commit = git(&other, &["rev-parse", "HEAD"]);
    Bait {
        global,
        marker,
        other_git: other.join(".git"),
        other_commit,
    }
}
