//! Flotilla worker: executes leased runs.
//!
//! This crate is the execution side of a Flotilla node. It speaks only the gRPC types of
//! [`flotilla_proto::v1`] (`Lease` in, `RunResult` out) and must not know Raft, the scheduler's
//! state machine or how leases are granted: whatever leases runs (the lease loop) calls
//! [`execute::execute_attempt`] once per leased attempt and reports the result.
//!
//! Modules:
//!
//! - [`actor`]: the worker runtime: lease poller, heartbeats, and a ractor actor per run under a
//!   supervising worker actor; results reported with their attempt number (fencing token).
//! - [`config`]: [`config::WorkerConfig`], the pipeline's settings and limits (work directory,
//!   log/patch caps, default memory/pids/time limits, toolchain mounts, git and bwrap paths).
//! - [`execute`]: one attempt end to end — clone → agent → commit → verify → push — mapped to an
//!   outcome (`changed`, `unchanged`, `agent_failed`, `verify_failed`, `timed_out`,
//!   `infrastructure`, `cancelled`).
//! - [`sandbox`]: runs one shell command line in a bubblewrap sandbox (or, with the `none`
//!   driver, as a plain process), with a timeout, cancellation, cgroup limits and log capture;
//!   also [`sandbox::measure_sandbox_start`] for benchmarks.
//! - [`egress`]: the sandbox's network: an empty namespace without network, or the attempt's
//!   own namespace whose only way out is a per-attempt `CONNECT` proxy enforcing the operator's
//!   host allowlist and address rules, recording each connection.
//! - [`cgroup`]: cgroup v2/v1 detection and one cgroup per sandboxed command (memory, pids and
//!   CPU limits, fail closed, OOM detection, kill-all) under a parent with operator-set totals.
//! - [`isolation`]: the unprivileged sandbox uids, the workspace handed to them, the per-command
//!   staging tmpfs (`noexec` `/tmp`, `/dev/shm`, binds).
//! - [`sandbox_init`]: the init bubblewrap runs first inside the sandbox (Landlock, seccomp,
//!   start marker, exec); [`seccomp`]: its filter; [`denial`]: what the kernel refused, recorded
//!   from the worker's side (the seccomp supervisor, cgroup limit events).
//! - [`quota`]: the disk quota (a loop-mounted ext4 volume per attempt).
//! - [`probe`]: the capability probe the worker runs at start.
//! - [`git`]: host-side git, hardened: per-URL mirror, per-attempt clone, commit, diffstat,
//!   patch.
//! - [`mirror_cache`]: the bounded cache of mirrors (least recently used evicted) and their
//!   locks.
//! - [`publish`]: fenced pushes: attempt trailers in commits, compare-and-swap pushes that only
//!   move a branch to the same or a higher attempt, withdrawal of stale attempts' commits.
//! - [`lease`]: [`lease::LeaseDeadline`], the worker's own view of how long it holds a lease.
//! - [`attempt_log`]: the size-capped attempt log and its in-memory tail (redacted).
//! - [`redact`]: removes injected secret values (and their base64/URL/JSON forms) from logs,
//!   errors and results before anything leaves the worker.
//! - [`credentials`]: per-attempt push credentials: the [`credentials::CredentialBroker`]
//!   interface, the static-token broker, and the transient git credential helper.
//!
//! # Files
//!
//! Under [`config::WorkerConfig::work_directory`]: `mirrors/<name>-<sha256>.git` (bare
//! mirrors, kept up to the mirror cache's limits), `attempts/<run_id>-<attempt>/repo` (the
//! attempt's clone, deleted afterwards by default), `logs/<run_id>-<attempt>.log` (kept).
//!
//! # Rust toolchains in the sandbox (`cargo fmt` and friends)
//!
//! The host's `rustup` home is mounted read-only at `/opt/rustup` and `$CARGO_HOME/bin` (the
//! rustup proxies) at `/opt/cargo/bin`; nothing else of `CARGO_HOME` (registry credentials) is
//! visible. Inside, `RUSTUP_HOME=/opt/rustup`, `CARGO_HOME=/tmp/cargo-home` (writable, empty),
//! `HOME=/tmp`, `PATH=/opt/cargo/bin:/usr/local/bin:/usr/bin:/bin`, and — when the fleet has no
//! network — `CARGO_NET_OFFLINE=true`, so cargo never tries to reach a registry. Commands that
//! need no dependencies then just work, e.g. an agent `cargo fmt` with the verification
//! `cargo fmt --check`. The toolchain used is rustup's default (or the repository's
//! `rust-toolchain.toml`, which must name an installed toolchain: rustup cannot install one
//! offline on a read-only home). Builds that need crates from a registry need `network: true`
//! (or vendored dependencies).
//!
//! # Requirements
//!
//! Linux; root; `bwrap` 0.8+ for the default driver; Landlock ABI 6+; cgroups with memory, pids
//! (and cpu) controllers; `mkfs.ext4` and loop devices for the disk quota; `git`. The capability
//! probe ([`probe`]) refuses to start without them unless the operator allowed the gap.

#![warn(missing_docs)]

pub mod actor;
pub mod attempt_log;
pub mod cgroup;
pub mod client_auth;
pub mod config;
pub mod credentials;
pub mod denial;
pub mod egress;
pub mod execute;
pub mod git;
pub mod isolation;
pub mod lease;
pub mod mirror_cache;
pub mod probe;
pub mod publish;
pub mod quota;
pub mod redact;
pub mod sandbox;
pub mod sandbox_init;
pub mod seccomp;
