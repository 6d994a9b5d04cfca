//! `flotilla`: a cluster node (`flotilla server`) and its command-line client.
//!
//! Exit codes: see [`cli::exit_code`] (0 ok, 1 error, 2 usage, 3 not found, 4 invalid argument,
//! 5 unavailable, 6 a watched fleet had failed runs, 141 stdout closed early).

use std::io::Write as _;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use flotilla::cli::{self, CliError, Output, exit_code};
use flotilla::{config, quickstart, server, telemetry};

/// Flotilla: a control plane for background coding agents.
#[derive(Parser, Debug)]
#[command(name = "flotilla", version, about)]
struct Arguments {
    /// Cluster node addresses for client commands, comma-separated `http://host:port`. Fleet and
    /// run commands try each in turn while a node answers UNAVAILABLE (no leader, unreachable)
    /// and follow a node's hint to the leader; cluster commands use the first reachable.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_ADDRESS",
        default_value = "http://127.0.0.1:7600"
    )]
    address: String,
    /// Output format of client commands.
    #[arg(long, global = true, value_enum, default_value = "human")]
    output: Output,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand, Debug)]
enum Commands {
    /// Runs a cluster node (with a local worker unless disabled).
    Server(ServerArguments),
    /// Submits, inspects and cancels fleets.
    #[command(subcommand)]
    Fleet(FleetCommands),
    /// Inspects runs.
    #[command(subcommand)]
    Run(RunCommands),
    /// Runs a worker-only node (no vote): leases runs from the cluster and executes them.
    Worker(WorkerArguments),
    /// Cluster membership and status.
    #[command(subcommand)]
    Cluster(ClusterCommands),
    /// The main job end to end: starts a single-node cluster with a local worker in-process,
    /// submits an "enforce rustfmt" fleet over gRPC, watches it and prints the roll-up.
    Quickstart(quickstart::QuickstartArguments),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommands),
}

#[derive(clap::Args, Debug)]
struct ServerArguments {
    /// TOML configuration file (see README.md); flags and FLOTILLA_* variables override it.
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    /// Raft node id.
    #[arg(long, env = "FLOTILLA_NODE_ID")]
    node_id: Option<u64>,
    /// Data directory.
    #[arg(long, env = "FLOTILLA_DATA_DIRECTORY")]
    data_directory: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long, env = "FLOTILLA_LISTEN_ADDRESS")]
    listen_address: Option<String>,
    /// HTTP listen address (metrics, health, dashboard); empty disables.
    #[arg(long, env = "FLOTILLA_HTTP_LISTEN_ADDRESS")]
    http_listen_address: Option<String>,
    /// Address other nodes and workers use for this node.
    #[arg(long, env = "FLOTILLA_ADVERTISE_ADDRESS")]
    advertise_address: Option<String>,
    /// Initial voters for first formation, `<node_id>=<host:port>,...` (this node included).
    #[arg(long, env = "FLOTILLA_INITIAL_MEMBERS", value_delimiter = ',')]
    initial_members: Vec<String>,
    /// Start uninitialized and wait to be added with `flotilla cluster add`.
    #[arg(long)]
    join: bool,
    /// Do not run a local worker.
    #[arg(long)]
    no_worker: bool,
    /// Slots of the local worker.
    #[arg(long, env = "FLOTILLA_WORKER_SLOTS")]
    worker_slots: Option<u32>,
    /// OTLP gRPC endpoint for traces.
    #[arg(long, env = "FLOTILLA_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(clap::Args, Debug)]
struct WorkerArguments {
    /// TOML configuration file; its `[worker]`, `[limits]` and `[telemetry]` sections apply.
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    /// Cluster nodes to lease from, comma-separated `http://host:port`; any node works (writes
    /// are forwarded to the leader), the others are tried on failure.
    #[arg(
        long,
        env = "FLOTILLA_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    endpoints: Vec<String>,
    /// Worker id (1-64 of [A-Za-z0-9._-]); must be unique in the cluster.
    #[arg(long, env = "FLOTILLA_WORKER_ID")]
    worker_id: Option<String>,
    /// Runs at once.
    #[arg(long, env = "FLOTILLA_WORKER_SLOTS")]
    slots: Option<u32>,
    /// Where mirrors, attempt clones and logs live.
    #[arg(long, env = "FLOTILLA_DATA_DIRECTORY")]
    data_directory: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum ClusterCommands {
    /// Leader, term, indexes, members and replication lag.
    Status {
        /// Ask the leader (for replication lag) rather than the addressed node.
        #[arg(long)]
        from_leader: bool,
    },
    /// The applied index and SHA-256 digest of the addressed node's replicated state.
    Digest,
    /// Initializes a new cluster on the addressed node with these voters.
    Init {
        /// Voters as `<node_id>=<host:port>`, comma-separated, the addressed node included.
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<String>,
    },
    /// Adds a node (as learner, then voter unless --learner).
    Add {
        /// The new node's id.
        #[arg(long)]
        node_id: u64,
        /// The new node's gRPC address, host:port.
        #[arg(long)]
        node_address: String,
        /// Keep it a non-voting learner.
        #[arg(long)]
        learner: bool,
    },
    /// Removes a voter or learner.
    Remove {
        /// The node's id.
        #[arg(long)]
        node_id: u64,
    },
}

#[derive(Subcommand, Debug)]
enum FleetCommands {
    /// Submits a fleet from a YAML or TOML spec file.
    Submit {
        /// The spec file.
        spec: PathBuf,
        /// Follow the fleet with a progress bar and print the roll-up.
        #[arg(long)]
        watch: bool,
        /// Idempotency key: a repeated submission returns the first fleet.
        #[arg(long, default_value = "")]
        idempotency_key: String,
    },
    /// Shows a fleet and its runs.
    Status {
        /// Fleet id (fl-N).
        fleet_id: String,
    },
    /// Lists recent fleets.
    List {
        /// Most fleets to show.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Follows a fleet's progress until it ends.
    Watch {
        /// Fleet id.
        fleet_id: String,
        /// Resume after this event sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Cancels a fleet's unfinished runs.
    Cancel {
        /// Fleet id.
        fleet_id: String,
    },
}

#[derive(Subcommand, Debug)]
enum RunCommands {
    /// Shows a run: result, diffstat, attempts with log tails.
    Show {
        /// Run id (fl-N-I).
        run_id: String,
        /// Also print the patch.
        #[arg(long)]
        patch: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommands {
    /// Sandbox start time: runs `true` in a bubblewrap sandbox COUNT times; prints p50/p99.
    Sandbox {
        /// Starts to measure.
        #[arg(long, default_value_t = 200)]
        count: u32,
    },
    /// Committed writes per second: a local 3-node cluster (WorkerService.Heartbeat, one Raft
    /// entry each) against a local 3-member etcd cluster (KV.Put), same clients, same machine.
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
}

fn server_config(arguments: &ServerArguments) -> anyhow::Result<config::ServerConfig> {
    let mut config = match &arguments.config {
        Some(path) => config::ServerConfig::from_file(path)?,
        None => config::ServerConfig::default(),
    };
    if let Some(node_id) = arguments.node_id {
        config.node_id = node_id;
    }
    if let Some(directory) = &arguments.data_directory {
        config.data_directory = directory.clone();
    }
    if let Some(address) = &arguments.listen_address {
        config.listen_address = address.clone();
    }
    if let Some(address) = &arguments.http_listen_address {
        config.http_listen_address = address.clone();
    }
    if let Some(address) = &arguments.advertise_address {
        config.advertise_address = address.clone();
    }
    if !arguments.initial_members.is_empty() {
        config.cluster.initial_members = arguments.initial_members.clone();
    }
    if arguments.join {
        config.cluster.join = true;
    }
    if arguments.no_worker {
        config.worker.enabled = false;
    }
    if let Some(slots) = arguments.worker_slots {
        config.worker.slots = slots;
    }
    if let Some(endpoint) = &arguments.otlp_endpoint {
        config.telemetry.otlp_endpoint = endpoint.clone();
    }
    config.validate()?;
    Ok(config)
}

async fn run_server(arguments: ServerArguments) -> anyhow::Result<i32> {
    let config = server_config(&arguments)?;
    if arguments.print_config {
        let text = toml::to_string_pretty(&config)?;
        cli::write_stdout(text.trim_end_matches('\n'));
        return Ok(exit_code::OK);
    }
    let _telemetry = telemetry::init(&config.telemetry)?;
    let server = server::start(config).await?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate_signal() => {}
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(exit_code::OK)
}

async fn run_worker(arguments: WorkerArguments) -> anyhow::Result<i32> {
    let mut config = match &arguments.config {
        Some(path) => config::ServerConfig::from_file(path)?,
        None => config::ServerConfig::default(),
    };
    if let Some(worker_id) = arguments.worker_id {
        config.worker.worker_id = worker_id;
    }
    if let Some(slots) = arguments.slots {
        config.worker.slots = slots;
    }
    if let Some(directory) = arguments.data_directory {
        config.data_directory = directory;
    }
    config.validate()?;
    anyhow::ensure!(
        flotilla_scheduler::spec::is_valid_name(&config.worker_id()),
        "worker id {:?} must be 1-64 characters of [A-Za-z0-9._-]",
        config.worker_id()
    );
    let _telemetry = telemetry::init(&config.telemetry)?;
    let worker = server::start_worker(&config, arguments.endpoints).await?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate_signal() => {}
    }
    tracing::info!("worker shutting down");
    worker.stop().await;
    Ok(exit_code::OK)
}

async fn terminate_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

async fn run_client(address: &str, output: Output, command: Commands) -> Result<i32, CliError> {
    if let Commands::Cluster(command) = command {
        let mut client = cli::connect_cluster(address).await?;
        return match command {
            ClusterCommands::Status { from_leader } => {
                cli::cluster_status(&mut client, from_leader, output).await
            }
            ClusterCommands::Digest => cli::cluster_digest(&mut client, output).await,
            ClusterCommands::Init { members } => {
                cli::cluster_init(&mut client, &members, output).await
            }
            ClusterCommands::Add {
                node_id,
                node_address,
                learner,
            } => cli::cluster_add(&mut client, node_id, node_address, learner, output).await,
            ClusterCommands::Remove { node_id } => {
                cli::cluster_remove(&mut client, node_id, output).await
            }
        };
    }
    let mut client = cli::connect(address).await?;
    match command {
        Commands::Fleet(FleetCommands::Submit {
            spec,
            watch,
            idempotency_key,
        }) => cli::submit(&mut client, &spec, idempotency_key, watch, output).await,
        Commands::Fleet(FleetCommands::Status { fleet_id }) => {
            cli::status(&mut client, &fleet_id, output).await
        }
        Commands::Fleet(FleetCommands::List { limit }) => {
            cli::list(&mut client, limit, output).await
        }
        Commands::Fleet(FleetCommands::Watch { fleet_id, after }) => {
            cli::watch_fleet(&mut client, &fleet_id, after, output).await
        }
        Commands::Fleet(FleetCommands::Cancel { fleet_id }) => {
            cli::cancel(&mut client, &fleet_id, output).await
        }
        Commands::Run(RunCommands::Show { run_id, patch }) => {
            cli::show_run(&mut client, &run_id, patch, output).await
        }
        Commands::Server(_)
        | Commands::Quickstart(_)
        | Commands::Bench(_)
        | Commands::Worker(_)
        | Commands::Cluster(_) => Err(CliError {
            message: "not a client command".into(),
            code: exit_code::USAGE,
        }),
    }
}

fn main() {
    // The sandbox init (hidden: bubblewrap runs this binary as the sandbox's first program, see
    // flotilla_worker::sandbox_init); before clap, threads or a runtime exist.
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
            std::process::exit(exit_code::ERROR);
        }
    };
    let code = runtime.block_on(async move {
        let result: anyhow::Result<i32> = match arguments.command {
            Commands::Server(server_arguments) => run_server(server_arguments).await,
            Commands::Worker(worker_arguments) => run_worker(worker_arguments).await,
            Commands::Quickstart(quickstart_arguments) => {
                quickstart::run(quickstart_arguments).await
            }
            Commands::Bench(BenchCommands::Sandbox { count }) => {
                quickstart::bench_sandbox(count).await
            }
            Commands::Bench(BenchCommands::Writes {
                clients,
                duration_ms,
                keep,
            }) => flotilla::bench::writes(&clients, duration_ms, keep).await,
            Commands::Bench(BenchCommands::Failover { trials, keep }) => {
                flotilla::bench::failover(trials, keep).await
            }
            command => match run_client(&arguments.address, arguments.output, command).await {
                Ok(code) => Ok(code),
                Err(error) => {
                    let _ = writeln!(std::io::stderr().lock(), "error: {error}");
                    return error.code;
                }
            },
        };
        match result {
            Ok(code) => code,
            Err(error) => {
                let _ = writeln!(std::io::stderr().lock(), "error: {error:#}");
                exit_code::ERROR
            }
        }
    });
    std::process::exit(code);
}
