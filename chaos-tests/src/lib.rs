//! Flotilla's chaos suite: real `flotilla` processes as separate hosts in Linux network
//! namespaces, faults injected mid-fleet (kill -9, SIGSTOP, partitions, full restarts, a wiped
//! voter), and a checker that audits the cluster's own history afterwards.
//!
//! - [`net`]: namespaces, veth pairs, bridge, iptables partitions, cleanup of leftovers;
//! - [`process`]: the binary under test, child processes and signals;
//! - [`pki`]: the CA and certificates: every process runs with TLS on;
//! - [`cluster`]: three voters and two worker-only nodes, status polling, leader discovery;
//! - [`workload`]: git repositories, fleet specs, idempotent submissions and their ledger;
//! - [`checker`]: the invariants checked after each scenario;
//! - [`limits`]: the concurrency and rate limits each scenario runs under, and their checks;
//! - [`scenario`]: the faults and the driver that runs one scenario end to end.
//!
//! The scenarios themselves are the tests in `tests/chaos.rs`; see README.md.

#![warn(missing_docs)]

pub mod checker;
pub mod cluster;
pub mod limits;
pub mod net;
pub mod pki;
pub mod process;
pub mod scenario;
pub mod triggers;
pub mod workload;
