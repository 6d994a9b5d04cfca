//! `flotilla`: a cluster node (`flotilla server`) and its command-line client.
//!
//! Exit codes: see [`cli::exit_code`] (0 ok, 1 error, 2 usage, 3 not found, 4 invalid argument,
//! 5 unavailable, 6 a watched fleet had failed runs, 141 stdout closed early).

use std::io::Write as _;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use flotilla::cli::{self, CliError, Output, exit_code};
use flotilla::{config, quickstart, server, telemetry};

/// Flotilla: a control plane for background coding agents.
#[derive(Parser, Debug)]
#[command(name = "flotilla", version, about)]
struct Arguments {
    /// Cluster node addresses for client commands, comma-separated `host:port` (or URLs; the
    /// scheme follows the transport: `https` with --ca-file, `http` with --insecure). Fleet and
    /// run commands try each in turn while a node answers UNAVAILABLE (no leader, unreachable)
    /// and follow a node's hint to the leader; cluster commands use the first reachable.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_ADDRESS",
        default_value = "127.0.0.1:7600"
    )]
    address: String,
    /// Output format of client commands.
    #[arg(long, global = true, value_enum, default_value = "human")]
    output: Output,
    /// Bearer token of client commands (`flotilla_<accessor>_<secret>`). Prefer FLOTILLA_TOKEN
    /// or --token-file: a command line is visible to other users of the host.
    #[arg(long, global = true, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token of client commands (its first line). Without --token and
    /// --token-file the CLI uses the default data directory's bootstrap-token when readable.
    #[arg(long, global = true, env = "FLOTILLA_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the nodes' certificates: TLS for client commands and
    /// `worker`; for `server`, overrides `tls.ca_file`.
    #[arg(long, global = true, env = "FLOTILLA_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) presented to the nodes (optional for client commands; a worker
    /// certificate for `worker`); for `server`, overrides `tls.certificate_file`.
    #[arg(long, global = true, env = "FLOTILLA_CERTIFICATE_FILE")]
    certificate_file: Option<PathBuf>,
    /// Key (PEM) of --certificate-file; for `server`, overrides `tls.key_file`.
    #[arg(long, global = true, env = "FLOTILLA_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Plaintext gRPC without certificates, for local development only (`tls.insecure = true`
    /// for `server`). Without it, TLS is required.
    #[arg(long, global = true, env = "FLOTILLA_INSECURE")]
    insecure: bool,
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
    /// API tokens: create, list, revoke (admin).
    #[command(subcommand)]
    Token(cli::token::TokenCommands),
    /// The replicated audit log: list, verify, export (admin).
    #[command(subcommand)]
    Audit(cli::audit::AuditCommands),
    /// Per-project secrets: values go in, never come out.
    #[command(subcommand)]
    Secret(SecretCommands),
    /// Schedules: a fleet at each nominal time of a cron or interval calendar, exactly once.
    #[command(subcommand)]
    Schedule(cli::schedule::ScheduleCommands),
    /// Event triggers: rules, API events (`event send`) and the record of deliveries.
    #[command(subcommand)]
    Event(cli::event::EventCommands),
    /// Cluster-wide rate and concurrency limits on runs (admin).
    #[command(subcommand)]
    Limit(cli::limit::LimitCommands),
    /// The main job end to end: starts a single-node cluster with a local worker in-process,
    /// submits an "enforce rustfmt" fleet over gRPC, watches it and prints the roll-up.
    Quickstart(quickstart::QuickstartArguments),
    /// Development CA and certificates (rcgen): `ca`, `node`, `worker`, `client`.
    #[command(subcommand)]
    Cert(cli::cert::CertCommands),
}

/// The `--ca-file`, `--certificate-file`, `--key-file` and `--insecure` flags.
#[derive(Clone, Debug)]
struct TransportFlags {
    ca_file: Option<PathBuf>,
    certificate_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    insecure: bool,
}

impl TransportFlags {
    /// The flags over a `[tls]` section (flags win).
    fn apply(&self, tls: &mut config::TlsSection) {
        if let Some(path) = &self.ca_file {
            tls.ca_file = path.clone();
        }
        if let Some(path) = &self.certificate_file {
            tls.certificate_file = path.clone();
        }
        if let Some(path) = &self.key_file {
            tls.key_file = path.clone();
        }
        if self.insecure {
            tls.insecure = true;
        }
    }

    /// The client transport of `tls` (for client commands and workers).
    fn client_transport(tls: &config::TlsSection) -> anyhow::Result<cli::ClientTransport> {
        fn given(path: &Path) -> Option<&Path> {
            (!path.as_os_str().is_empty()).then_some(path)
        }
        match (tls.insecure, given(&tls.ca_file)) {
            (true, None) => Ok(cli::ClientTransport::Insecure),
            (true, Some(_)) => {
                anyhow::bail!("--insecure and --ca-file (tls.ca_file) exclude each other")
            }
            (false, None) => anyhow::bail!(
                "TLS is not configured: give --ca-file (FLOTILLA_CA_FILE, tls.ca_file), or \
                 --insecure (FLOTILLA_INSECURE=true, tls.insecure) for plaintext"
            ),
            (false, Some(ca_file)) => Ok(cli::ClientTransport::Tls(
                flotilla::tls::client_config_from_files(
                    ["--ca-file", "--certificate-file", "--key-file"],
                    ca_file,
                    given(&tls.certificate_file),
                    given(&tls.key_file),
                )?,
            )),
        }
    }
}

#[derive(clap::Args, Debug)]
struct ServerArguments {
    /// TOML configuration file (see README.md); flags and FLOTILLA_* variables override it.
    #[arg(long, env = "FLOTILLA_CONFIG")]
    config: Option<PathBuf>,
    /// Raft node id.
    #[arg(long, env = "FLOTILLA_NODE_ID")]
    node_id: Option<u64>,
    /// Cluster id (`cluster_id`): trust domain of the certificates, checked on every Raft
    /// message.
    #[arg(long, env = "FLOTILLA_CLUSTER_ID")]
    cluster_id: Option<String>,
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
    /// File of the bootstrap admin token (auth.bootstrap_token_file); created when missing.
    #[arg(long, env = "FLOTILLA_BOOTSTRAP_TOKEN_FILE")]
    bootstrap_token_file: Option<PathBuf>,
    /// File of the node's own worker token (worker.token_file).
    #[arg(long, env = "FLOTILLA_WORKER_TOKEN_FILE")]
    worker_token_file: Option<PathBuf>,
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
    /// File holding the worker's token (a `worker` token for this worker id, from
    /// `flotilla token create --role worker`); default `<data_directory>/worker-token`.
    #[arg(long, env = "FLOTILLA_WORKER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
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
        /// Validate and print the runs, branches, waves and limits it would create; create
        /// nothing.
        #[arg(long, conflicts_with = "watch")]
        dry_run: bool,
    },
    /// Pauses a fleet: no run of it starts until `fleet resume`; running ones finish.
    Pause {
        /// Fleet id.
        fleet_id: String,
        /// Why (recorded with who paused it).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Resumes a paused fleet (paused by a person or by its failure budget).
    Resume {
        /// Fleet id.
        fleet_id: String,
        /// Why (recorded).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Approves a fleet waiting at a gate (before its first lease, or between waves).
    Approve {
        /// Fleet id.
        fleet_id: String,
        /// Why (recorded).
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Submits a new fleet that runs again the runs of FLEET_ID with these outcomes.
    Rerun {
        /// Fleet id.
        fleet_id: String,
        /// Outcomes to repeat, comma-separated: agent_failed, verify_failed, timed_out,
        /// infrastructure, lease_expired, cancelled, changed, unchanged, or failed (every
        /// failed run).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "failed,timed_out,cancelled,lease_expired"
        )]
        outcomes: Vec<String>,
        /// Only repositories whose URL matches this glob.
        #[arg(long, default_value = "")]
        repository: String,
        /// Idempotency key of the new fleet; default: one made from the fleet id and the
        /// selection, so repeating the command returns the same new fleet.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Print what would be re-run; create nothing.
        #[arg(long)]
        dry_run: bool,
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
    /// Lists a fleet's runs (all of them, page by page through ListRuns), optionally only some
    /// states or repositories.
    List {
        /// Fleet id (fl-N).
        fleet_id: String,
        /// Only runs in this state (pending, running, changed, unchanged, failed, cancelled);
        /// repeatable.
        #[arg(long = "state")]
        states: Vec<String>,
        /// Only runs whose repository URL contains this text.
        #[arg(long, default_value = "")]
        repository: String,
        /// Only runs whose last attempt ended with this outcome (changed, unchanged,
        /// agent_failed, verify_failed, timed_out, infrastructure, lease_expired, cancelled);
        /// repeatable.
        #[arg(long = "outcome")]
        outcomes: Vec<String>,
        /// Most runs to show; 0: every matching run.
        #[arg(long, default_value_t = 0)]
        limit: u64,
    },
}

#[derive(Subcommand, Debug)]
enum SecretCommands {
    /// Creates a secret or stores its next version. The value is read from standard input
    /// (one trailing newline dropped) or --value-file, never from the command line.
    Set {
        /// Secret name (1-64 of [A-Za-z0-9._-]).
        name: String,
        /// Project; empty: default.
        #[arg(long, default_value = "")]
        project: String,
        /// Read the value from this file instead of standard input.
        #[arg(long)]
        value_file: Option<std::path::PathBuf>,
    },
    /// Lists a project's secrets: names, versions, sizes, key ids (never values).
    List {
        /// Project; empty: default.
        #[arg(long, default_value = "")]
        project: String,
    },
    /// Deletes a secret (fleets naming it then fail at lease time).
    Delete {
        /// Secret name.
        name: String,
        /// Project; empty: default.
        #[arg(long, default_value = "")]
        project: String,
    },
    /// Re-wraps every secret's data key under the nodes' current key (after a key rotation).
    Rotate {
        /// Secrets re-wrapped per request (1-1000).
        #[arg(long, default_value_t = 100)]
        batch: u32,
    },
    /// Writes a new key-encryption key file (mode 0600) to copy to every node.
    Keygen {
        /// The file to create (never overwritten).
        #[arg(long)]
        output_file: std::path::PathBuf,
    },
}

fn server_config(
    arguments: &ServerArguments,
    transport: &TransportFlags,
) -> anyhow::Result<config::ServerConfig> {
    let mut config = match &arguments.config {
        Some(path) => config::ServerConfig::from_file(path)?,
        None => config::ServerConfig::default(),
    };
    transport.apply(&mut config.tls);
    if let Some(node_id) = arguments.node_id {
        config.node_id = node_id;
    }
    if let Some(cluster_id) = &arguments.cluster_id {
        config.cluster_id = cluster_id.clone();
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
    if let Some(path) = &arguments.bootstrap_token_file {
        config.auth.bootstrap_token_file = path.clone();
    }
    if let Some(path) = &arguments.worker_token_file {
        config.worker.token_file = path.clone();
    }
    config.validate()?;
    Ok(config)
}

async fn run_server(arguments: ServerArguments, transport: TransportFlags) -> anyhow::Result<i32> {
    let config = server_config(&arguments, &transport)?;
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

async fn run_worker(arguments: WorkerArguments, transport: TransportFlags) -> anyhow::Result<i32> {
    let mut config = match &arguments.config {
        Some(path) => config::ServerConfig::from_file(path)?,
        None => config::ServerConfig::default(),
    };
    transport.apply(&mut config.tls);
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
    // The transport first: without TLS or an explicit --insecure nothing else matters.
    let tls = match TransportFlags::client_transport(&config.tls)? {
        cli::ClientTransport::Insecure => None,
        cli::ClientTransport::Tls(tls) => {
            flotilla::tls::check_worker_certificate(
                &config.tls,
                &config.cluster_id,
                &config.worker_id(),
            )?;
            Some(tls)
        }
    };
    if let Some(path) = arguments.token_file {
        config.worker.token_file = path;
    }
    let token_file = config.worker_token_file();
    let token = flotilla_worker::client_auth::read_token_file(&token_file).map_err(|error| {
        anyhow::anyhow!(
            "worker.token_file {}: {error} (create one with `flotilla token create --role worker --worker-id {}`)",
            token_file.display(),
            config.worker_id()
        )
    })?;
    let token = flotilla_worker::client_auth::BearerToken::new(&token)
        .map_err(|error| anyhow::anyhow!("worker.token_file {}: {error}", token_file.display()))?;
    let _telemetry = telemetry::init(&config.telemetry)?;
    let worker = server::start_worker(&config, arguments.endpoints, token, tls).await?;
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
    if let Commands::Token(command) = command {
        return cli::token::run(address, command, output).await;
    }
    if let Commands::Audit(command) = command {
        return cli::audit::run(address, command, output).await;
    }
    if let Commands::Schedule(command) = command {
        return cli::schedule::run(address, command, output).await;
    }
    if let Commands::Event(command) = command {
        return cli::event::run(address, command, output).await;
    }
    if let Commands::Limit(command) = command {
        return cli::limit::run(address, command, output).await;
    }
    if let Commands::Secret(command) = command {
        if let SecretCommands::Keygen { output_file } = &command {
            return cli::secret::keygen(output_file, output);
        }
        let mut client = cli::secret::connect(address).await?;
        return match command {
            SecretCommands::Set {
                name,
                project,
                value_file,
            } => {
                cli::secret::set(&mut client, &project, &name, value_file.as_deref(), output).await
            }
            SecretCommands::List { project } => {
                cli::secret::list(&mut client, &project, output).await
            }
            SecretCommands::Delete { name, project } => {
                cli::secret::delete(&mut client, &project, &name, output).await
            }
            SecretCommands::Rotate { batch } => {
                cli::secret::rotate(&mut client, batch, output).await
            }
            SecretCommands::Keygen { output_file } => cli::secret::keygen(&output_file, output),
        };
    }
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
            dry_run,
        }) => cli::submit(&mut client, &spec, idempotency_key, watch, dry_run, output).await,
        Commands::Fleet(FleetCommands::Pause { fleet_id, note }) => {
            cli::flow::change(
                &mut client,
                cli::flow::FlowVerb::Pause,
                &fleet_id,
                &note,
                output,
            )
            .await
        }
        Commands::Fleet(FleetCommands::Resume { fleet_id, note }) => {
            cli::flow::change(
                &mut client,
                cli::flow::FlowVerb::Resume,
                &fleet_id,
                &note,
                output,
            )
            .await
        }
        Commands::Fleet(FleetCommands::Approve { fleet_id, note }) => {
            cli::flow::change(
                &mut client,
                cli::flow::FlowVerb::Approve,
                &fleet_id,
                &note,
                output,
            )
            .await
        }
        Commands::Fleet(FleetCommands::Rerun {
            fleet_id,
            outcomes,
            repository,
            idempotency_key,
            dry_run,
        }) => {
            let idempotency_key = idempotency_key
                .unwrap_or_else(|| format!("rerun:{fleet_id}:{}:{repository}", outcomes.join(",")));
            let request = flotilla_proto::v1::RerunFleetRequest {
                fleet_id,
                outcomes,
                repository_pattern: repository,
                idempotency_key,
                dry_run,
            };
            cli::flow::rerun(&mut client, request, output).await
        }
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
        Commands::Run(RunCommands::List {
            fleet_id,
            states,
            repository,
            outcomes,
            limit,
        }) => {
            let filter = cli::RunListFilter {
                states: &states,
                repository: &repository,
                outcomes: &outcomes,
            };
            cli::list_runs(&mut client, &fleet_id, &filter, limit, output).await
        }
        Commands::Server(_)
        | Commands::Secret(_)
        | Commands::Quickstart(_)
        | Commands::Worker(_)
        | Commands::Token(_)
        | Commands::Schedule(_)
        | Commands::Limit(_)
        | Commands::Event(_)
        | Commands::Audit(_)
        | Commands::Cert(_)
        | Commands::Cluster(_) => Err(CliError {
            message: "not a client command".into(),
            code: exit_code::USAGE,
        }),
    }
}

/// The transport of client commands from the flags.
fn client_transport(flags: &TransportFlags) -> anyhow::Result<cli::ClientTransport> {
    let mut tls = config::TlsSection::default();
    flags.apply(&mut tls);
    TransportFlags::client_transport(&tls)
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
    let transport = TransportFlags {
        ca_file: arguments.ca_file.clone(),
        certificate_file: arguments.certificate_file.clone(),
        key_file: arguments.key_file.clone(),
        insecure: arguments.insecure,
    };
    let code = runtime.block_on(async move {
        let result: anyhow::Result<i32> = match arguments.command {
            Commands::Server(server_arguments) => run_server(server_arguments, transport).await,
            Commands::Worker(worker_arguments) => run_worker(worker_arguments, transport).await,
            Commands::Cert(command) => {
                cli::cert::run(command, transport.ca_file.clone()).map(|()| exit_code::OK)
            }
            Commands::Quickstart(quickstart_arguments) => {
                quickstart::run(quickstart_arguments).await
            }
            command => match client_transport(&transport).map_err(|error| CliError {
                message: format!("{error:#}"),
                code: exit_code::USAGE,
            }) {
                Err(error) => {
                    let _ = writeln!(std::io::stderr().lock(), "error: {error}");
                    return error.code;
                }
                Ok(client_transport) => {
                    cli::configure_transport(client_transport);
                    let run = async {
                        cli::set_token(
                            arguments.token.as_deref(),
                            arguments.token_file.as_deref(),
                        )?;
                        run_client(&arguments.address, arguments.output, command).await
                    };
                    match run.await {
                        Ok(code) => Ok(code),
                        Err(error) => {
                            let _ = writeln!(std::io::stderr().lock(), "error: {error}");
                            return error.code;
                        }
                    }
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
