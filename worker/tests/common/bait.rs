//! What the two escape suites (`worker/tests/escape.rs`, `node/tests/escape_fleet.rs`) share:
//! the bait for the host-side git cases — a global git configuration that defines a filter and a
//! diff driver (host git must never run them), and another host repository for a nested `.git`
//! to point at (its commit must never leave as a gitlink) — and the denials the worker must
//! record for each case ([`kernel_denials`]).

use std::path::{Path, PathBuf};

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

/// Creates the bait under `root` (`xdg/`, `filter-ran`, `other/`), running git with the
/// calling test crate's own `git(directory, arguments) -> stdout` helper.
pub fn create(root: &Path, git: fn(&Path, &[&str]) -> String) -> Bait {
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
    let other_commit = git(&other, &["rev-parse", "HEAD"]).trim().to_owned();
    Bait {
        global,
        marker,
        other_git: other.join(".git"),
        other_commit,
    }
}

/// The sandbox denials (actions) the worker must record, from the kernel, when the case
/// `tests/escape/<case>.sh` runs; empty for cases refused by mechanisms that report no event
/// (mount namespace, read-only binds, file permissions, Landlock).
pub fn kernel_denials(case: &str) -> &'static [&'static str] {
    match case {
        "ptrace" => &["ptrace"],
        "mount" => &["mount"],
        "unshare" => &["unshare"],
        "nested-bwrap" => &["clone(CLONE_NEWUSER|CLONE_NEWNS)"],
        "seccomp-kernel-surface" => &[
            "bpf",
            "io_uring_setup",
            "keyctl",
            "perf_event_open",
            "userfaultfd",
            "setns",
            "socket(AF_NETLINK)",
            "socket(AF_PACKET)",
            "socket(SOCK_RAW)",
        ],
        "memory-bomb" => &["memory.oom_kill"],
        "fork-bomb" => &["pids.max"],
        _ => &[],
    }
}
