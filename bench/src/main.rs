//! `flotilla-bench`: Flotilla's benchmarks, outside the product binary. Each starts what it
//! measures as real child processes on 127.0.0.1 (`flotilla server`, `flotilla worker`,
//! `etcd`), prints figures and asserts nothing; see README.md, "Performance".
//!
//! The `flotilla` binary it runs is `$FLOTILLA_BINARY`, else the `flotilla` next to this
//! executable (both are built by `cargo build --workspace`).

mod harness;
mod sandbox;

use clap::{Parser, Subcommand};

/// Flotilla's benchmarks against real local processes.
#[derive(Parser, Debug)]
#[command(name = "flotilla-bench", version, about)]
struct Arguments {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand, Debug)]
enum Commands {
    /// Sandbox start time: runs `true` in a bubblewrap sandbox COUNT times; prints p50/p99.
    Sandbox {
        /// Starts to measure.
        #[arg(long, default_value_t = 200)]
        count: u32,
    },
    /// Committed writes per second: a local 3-node cluster (CancelFleet of a missing fleet, one
    /// Raft entry each) against a local 3-member etcd cluster (KV.Put), same clients, same machine.
    Writes {
        /// Concurrent clients, one measurement per value, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        clients: Vec<u32>,
        /// Length of each measurement.
        #[arg(long, default_value_t = 10_000)]
        duration_ms: u64,
        /// Keep the temporary directory (data, process logs) instead of removing it.
        #[arg(long)]
        keep: bool,
    },
    /// Leader failover: kill -9 of the leader of a local 3-node cluster while a worker leases
    /// runs; time to a new leader and to the first new lease.
    Failover {
        /// Leader kills.
        #[arg(long, default_value_t = 20)]
        trials: u32,
        /// Keep the temporary directory (data, process logs) instead of removing it.
        #[arg(long)]
        keep: bool,
    },
    /// Scale: fleets of RUNS runs on a local 3-node cluster drained by simulated worker
    /// processes (lease + report at once, no execution); dispatch rate, submit time, GetFleet
    /// latency, leader RSS, snapshots.
    Scale {
        /// Runs per fleet (1-100000).
        #[arg(long, default_value_t = 100_000)]
        runs: u32,
        /// Fleets, submitted one after another as the previous one drains (1-100).
        #[arg(long, default_value_t = 1)]
        fleets: u32,
        /// The cluster's raft.snapshot_logs_since_last (small: snapshots during the run).
        #[arg(long, default_value_t = 1_000)]
        snapshot_logs_since_last: u64,
        /// Simulated worker processes.
        #[arg(long, default_value_t = 2)]
        workers: u32,
        /// Keep the temporary directory (data, process logs) instead of removing it.
        #[arg(long)]
        keep: bool,
    },
    /// A simulated worker of `bench scale` (leases runs and reports them unchanged at once).
    #[command(hide = true)]
    DispatchWorker {
        /// The node to lease from (http://host:port).
        #[arg(long)]
        endpoint: String,
        /// File holding an admin token.
        #[arg(long)]
        token_file: std::path::PathBuf,
        /// Prefix of the worker ids of its lease loops.
        #[arg(long)]
        worker_id: String,
    },
    /// Heartbeats out of the log: simulated workers, one lease each, heartbeat a local 3-node
    /// cluster; prints heartbeats answered and the Raft log entries written meanwhile.
    Heartbeats {
        /// Simulated workers (1-1024).
        #[arg(long, default_value_t = 1000)]
        workers: u32,
        /// Each worker's heartbeat interval.
        #[arg(long, default_value_t = 5_000)]
        interval_ms: u64,
        /// Length of the measurement.
        #[arg(long, default_value_t = 30_000)]
        duration_ms: u64,
        /// Keep the temporary directory (data, process logs) instead of removing it.
        #[arg(long)]
        keep: bool,
    },
}

fn main() {
    // `bench sandbox` starts bubblewrap sandboxes whose first program is this executable.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|argument| argument == flotilla_worker::sandbox_init::INIT_SUBCOMMAND)
    {
        flotilla_worker::sandbox_init::main();
    }
    let arguments = Arguments::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async move {
        match arguments.command {
            Commands::Sandbox { count } => sandbox::sandbox(count).await,
            Commands::Writes {
                clients,
                duration_ms,
                keep,
            } => harness::writes(&clients, duration_ms, keep).await,
            Commands::Failover { trials, keep } => harness::failover(trials, keep).await,
            Commands::Scale {
                runs,
                fleets,
                workers,
                snapshot_logs_since_last,
                keep,
            } => harness::scale(runs, fleets, workers, snapshot_logs_since_last, keep).await,
            Commands::DispatchWorker {
                endpoint,
                token_file,
                worker_id,
            } => harness::dispatch_worker(&endpoint, &token_file, &worker_id).await,
            Commands::Heartbeats {
                workers,
                interval_ms,
                duration_ms,
                keep,
            } => harness::heartbeats(workers, interval_ms, duration_ms, keep).await,
        }
    });
    match result {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(1);
        }
    }
}
