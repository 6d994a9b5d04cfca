//! `flotilla quickstart`: the main job end to end with embedded defaults.
//!
//! The quick start starts a real single-node cluster in this process (Raft on RocksDB in a data
//! directory, gRPC on an ephemeral loopback port, a local worker with bubblewrap sandboxes),
//! then acts as an ordinary client: it submits an "enforce rustfmt" fleet over gRPC, watches it
//! with a progress bar, and prints the roll-up.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use flotilla_proto::v1;

use crate::cli::{self, Output};
use crate::config::ServerConfig;

/// Arguments of `flotilla quickstart`.
#[derive(clap::Args, Debug)]
pub struct QuickstartArguments {
    /// File of repository URLs, one per line (deploy/prepare-repositories.sh writes one).
    #[arg(long)]
    repositories_file: PathBuf,
    /// Data directory of the in-process node; a fresh one under the system temp directory if
    /// not given.
    #[arg(long)]
    data_directory: Option<PathBuf>,
    /// Worker slots (runs at once); defaults to the number of CPUs.
    #[arg(long)]
    slots: Option<u32>,
    /// The agent's command line.
    #[arg(long, default_value = DEFAULT_AGENT_COMMAND)]
    agent_command: String,
    /// The verification command line.
    #[arg(long, default_value = DEFAULT_VERIFY_COMMAND)]
    verify_command: String,
    /// Rust toolchain the sandboxed commands use (`RUSTUP_TOOLCHAIN`). The sandbox's toolchain is
    /// read-only and offline, so a repository's `rust-toolchain.toml` that asks for a toolchain
    /// or component that is not installed (several crates ask for `rust-src`) cannot be
    /// honoured; the fleet formats with the installed toolchain instead. Empty: the
    /// repository's own choice.
    #[arg(long, default_value = "stable")]
    rust_toolchain: String,
    /// Output format of the roll-up.
    #[arg(long, value_enum, default_value = "human")]
    output: Output,
}

/// The quick start's agent: rustfmt over the whole crate, offline.
pub const DEFAULT_AGENT_COMMAND: &str = "cargo fmt --all";
/// The quick start's verification.
pub const DEFAULT_VERIFY_COMMAND: &str = "cargo fmt --all -- --check";

/// Runs the quick start; returns the process exit code.
///
/// # Errors
/// The repositories file is unusable or the node cannot start.
pub async fn run(arguments: QuickstartArguments) -> anyhow::Result<i32> {
    let started = Instant::now();
    let repositories = cli::read_repositories_file(&arguments.repositories_file)?;
    let data_directory = match arguments.data_directory {
        Some(directory) => directory,
        None => std::env::temp_dir().join(format!("flotilla-quickstart-{}", std::process::id())),
    };
    let mut config = ServerConfig {
        data_directory: data_directory.clone(),
        listen_address: "127.0.0.1:0".into(),
        http_listen_address: "127.0.0.1:0".into(),
        ..ServerConfig::default()
    };
    if let Some(slots) = arguments.slots {
        config.worker.slots = slots;
    }
    // The operator running the quick start allows the local repositories it names: those
    // under the repositories file's directory, and no other local path.
    let repositories_root = arguments
        .repositories_file
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .canonicalize()
        .context("resolving the repositories file's directory")?;
    config.policy.file_roots = vec![repositories_root];
    // TLS on, with a development CA and node certificate under the data directory.
    config.tls = cli::cert::development_node_tls(
        &data_directory.join("tls"),
        &config.cluster_id,
        config.node_id,
        &["localhost".into(), "127.0.0.1".into()],
    )
    .context("creating development certificates")?;
    cli::configure_transport(cli::ClientTransport::Tls(
        crate::tls::client_config_from_files(
            ["tls.ca_file", "tls.certificate_file", "tls.key_file"],
            &config.tls.ca_file,
            None,
            None,
        )?,
    ));
    config.telemetry.log_filter = "warn".into();
    let _telemetry = crate::telemetry::init(&config.telemetry)?;
    let slots = config.worker.slots;
    let bootstrap_token_file = config.bootstrap_token_file();
    let server = crate::server::start(config)
        .await
        .context("starting the single-node cluster")?;
    // The quick start acts as the operator: it uses the bootstrap admin token that the node
    // wrote into its data directory, once the node has proposed it.
    let token = flotilla_worker::client_auth::read_token_file(&bootstrap_token_file)
        .with_context(|| format!("reading {}", bootstrap_token_file.display()))?;
    cli::set_token(Some(&token), None).map_err(|error| anyhow::anyhow!("{error}"))?;
    let bootstrap_deadline = Instant::now() + std::time::Duration::from_secs(60);
    while !server.node.state.read(|s| s.tokens_bootstrapped()) {
        anyhow::ensure!(
            Instant::now() < bootstrap_deadline,
            "the node did not bootstrap its admin token within 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    eprintln!(
        "flotilla: single-node cluster on {} (data {}, dashboard http://{}), local worker with {slots} slots",
        server.grpc_address,
        data_directory.display(),
        server
            .http_address
            .map_or_else(String::new, |a| a.to_string()),
    );
    let spec = v1::FleetSpec {
        name: "rustfmt".into(),
        repositories,
        agent: Some(v1::AgentSpec {
            secrets: Default::default(),
            command: arguments.agent_command,
            task: "Format every Rust file with rustfmt so that `cargo fmt --check` passes.".into(),
            env: if arguments.rust_toolchain.is_empty() {
                Default::default()
            } else {
                [("RUSTUP_TOOLCHAIN".to_string(), arguments.rust_toolchain)]
                    .into_iter()
                    .collect()
            },
        }),
        verify: vec![arguments.verify_command],
        sandbox: Some(v1::SandboxSpec {
            driver: "bwrap".into(),
            timeout_ms: 300_000,
            ..Default::default()
        }),
        branch_template: "flotilla/{fleet}".into(),
        commit_message: "Format with rustfmt\n\nApplied by the Flotilla quick start fleet.".into(),
        max_parallelism: slots,
        max_attempts: 2,
        push: true,
        ..Default::default()
    };
    let mut client = cli::connect(&server.grpc_address.to_string()).await?;
    let code = cli::submit_spec(
        &mut client,
        spec,
        "quickstart".into(),
        true,
        arguments.output,
    )
    .await;
    server.shutdown().await;
    let code = code.map_err(|e| anyhow::anyhow!(e.message))?;
    eprintln!(
        "flotilla: quick start done in {:.1} s (including cluster start and shutdown)",
        started.elapsed().as_secs_f64()
    );
    Ok(code)
}
