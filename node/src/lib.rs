//! The `flotilla` node: server (API, Raft, worker, HTTP) and command-line client, as a library so
//! that the binary (`main.rs`) and the integration tests share it.
//!
//! - [`server`]: starts a node; [`api`]: the fleet and worker gRPC services; [`artifacts`]:
//!   patches and log tails, local or from a peer; [`cluster`]:
//!   membership, status and state digests; [`http`]: metrics, health, dashboard;
//! - [`clock`]: replicated time, the one clock of stamps and leader decisions; [`leases`]: lease
//!   deadlines in the leader's memory, moved by heartbeats (no log writes);
//! - [`config`]: server configuration; [`spec_file`]: fleet spec files; [`convert`]: wire <-> state;
//! - [`cli`]: client commands; [`leader_hint`]: the leader's address in UNAVAILABLE answers;
//!   [`quickstart`]: the main job end to end (benchmarks live in the `flotilla-bench` crate);
//! - [`telemetry`]: logs and OpenTelemetry traces.
//!
//! What this crate must not know: how the state machine decides (that is `flotilla-scheduler`),
//! how Raft stores and replicates (that is `flotilla-raft`), how a run executes (that is
//! `flotilla-worker`). It wires them together and owns every edge: validation, limits, I/O.

use std::sync::OnceLock;

use metrics_exporter_prometheus::PrometheusHandle;

pub mod api;
pub mod artifacts;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod convert;
pub mod http;
pub mod leader_hint;
pub mod leases;
pub mod quickstart;
pub mod rule_file;
pub mod schedule_file;
pub mod secrets;
pub mod server;
pub mod spec_file;
pub mod telemetry;
pub mod tls;

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
