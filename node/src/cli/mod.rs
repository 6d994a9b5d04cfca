//! Client commands: `fleet submit|status|list|watch|cancel`, `run show`. Human output by default,
//! `--output json` for machines (one JSON document per command; `watch` prints one event per line).
//!
//! Fleet and run commands go through [`Client`], which tries every `--address` in turn on
//! UNAVAILABLE and follows the leader hint of [`crate::leader_hint`]. Output goes through
//! [`write_stdout`]: a closed stdout (`flotilla ... | head`) ends the process quietly with
//! [`exit_code::BROKEN_PIPE`].

pub mod secret;

use std::collections::{HashMap, VecDeque};
use std::io::{IsTerminal as _, Write as _};
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use flotilla_proto::outcome::{outcome_name, outcome_to_wire};
use flotilla_proto::v1::cluster_service_client::ClusterServiceClient;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;
use flotilla_proto::v1::{self, FleetState, RunState};
use flotilla_worker::client_auth::{AuthChannel, BearerToken};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tonic::transport::Channel;

pub mod terminal;

use terminal::printable;

static TOKEN: std::sync::OnceLock<BearerToken> = std::sync::OnceLock::new();

/// The bearer token every client command sends (none until [`set_token`]).
pub fn bearer() -> BearerToken {
    TOKEN.get().cloned().unwrap_or_default()
}

/// Chooses the client commands' token: `token`, else the first line of `token_file`, else the
/// default data directory's `bootstrap-token` when it is readable (a local development node),
/// else none (the cluster then answers UNAUTHENTICATED).
///
/// # Errors
/// [`exit_code::USAGE`] for an unreadable `token_file` or a token that cannot be a header.
pub fn set_token(token: Option<&str>, token_file: Option<&Path>) -> Result<(), CliError> {
    let usage = |message: String| CliError {
        message,
        code: exit_code::USAGE,
    };
    let text = match (token, token_file) {
        (Some(token), _) => token.trim().to_string(),
        (None, Some(path)) => flotilla_worker::client_auth::read_token_file(path)
            .map_err(|error| usage(format!("--token-file {}: {error}", path.display())))?,
        (None, None) => {
            let default = crate::config::ServerConfig::default()
                .data_directory
                .join("bootstrap-token");
            flotilla_worker::client_auth::read_token_file(&default).unwrap_or_default()
        }
    };
    let bearer = BearerToken::new(&text).map_err(|error| usage(format!("--token: {error}")))?;
    let _ = TOKEN.set(bearer);
    Ok(())
}

pub mod cert;

/// How client commands reach the cluster, chosen once per process by [`configure_transport`].
#[derive(Clone, Debug)]
pub enum ClientTransport {
    /// Plaintext (`--insecure`), for local development only.
    Insecure,
    /// TLS with this CA (and client certificate, if given): addresses are dialled as
    /// `https://`.
    Tls(tonic::transport::ClientTlsConfig),
}

static CLIENT_TRANSPORT: std::sync::OnceLock<ClientTransport> = std::sync::OnceLock::new();

/// Sets the transport of every later client connection in this process; the first call wins.
pub fn configure_transport(transport: ClientTransport) {
    let _ = CLIENT_TRANSPORT.set(transport);
}

/// `address` (`host:port` or a URL) as a URL of the configured transport: `https://` with
/// TLS, `http://` otherwise.
pub fn transport_url(address: &str) -> String {
    let tls = matches!(CLIENT_TRANSPORT.get(), Some(ClientTransport::Tls(_)));
    crate::tls::url(address, tls)
}

/// A tonic endpoint for `address` (`host:port` or a URL) over the configured transport.
///
/// # Errors
/// When no transport was configured (naming `--ca-file` and `--insecure`) or the address is
/// not usable.
pub fn client_endpoint(address: &str) -> Result<tonic::transport::Endpoint, String> {
    match CLIENT_TRANSPORT.get() {
        None => Err(
            "no transport chosen: give --ca-file (FLOTILLA_CA_FILE) for TLS, or \
                     --insecure (FLOTILLA_INSECURE=true) for plaintext"
                .into(),
        ),
        Some(ClientTransport::Insecure) => crate::tls::endpoint(address, None),
        Some(ClientTransport::Tls(tls)) => crate::tls::endpoint(address, Some(tls)),
    }
}

/// `println!` that ends the process quietly on a closed stdout (see [`write_stdout`]).
macro_rules! outln {
    ($($argument:tt)*) => {
        $crate::cli::write_stdout(&format!($($argument)*))
    };
}

/// `eprintln!` that ignores a closed stderr (nobody is left to tell).
macro_rules! errln {
    ($($argument:tt)*) => {{
        let _ = writeln!(std::io::stderr().lock(), $($argument)*);
    }};
}

/// `cli-` and 24 random hex digits: an idempotency key the CLI picks (a trigger id, a delivery
/// id) so that its own retries of one command are safe; `what` names it in the error.
///
/// # Errors
/// When the kernel gives no randomness.
pub fn random_id(what: &str) -> Result<String, CliError> {
    let mut random = [0u8; 12];
    getrandom::fill(&mut random).map_err(|error| CliError {
        message: format!("no randomness for {what}: {error}"),
        code: exit_code::ERROR,
    })?;
    Ok(format!(
        "cli-{}",
        random
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()
    ))
}

pub mod audit;
pub mod event;
pub mod flow;
pub mod limit;
pub mod schedule;
pub mod token;

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables and progress bars for people.
    Human,
    /// JSON documents (NDJSON for streams).
    Json,
}

/// Exit codes of the CLI (documented in README.md).
pub mod exit_code {
    /// Success.
    pub const OK: i32 = 0;
    /// Any other error.
    pub const ERROR: i32 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: i32 = 2;
    /// The fleet or run does not exist.
    pub const NOT_FOUND: i32 = 3;
    /// The server rejected the request: invalid, an idempotency key reused with another spec,
    /// or a watch before the kept events (the message names the field).
    pub const INVALID_ARGUMENT: i32 = 4;
    /// No node could be reached, or the cluster has no leader.
    pub const UNAVAILABLE: i32 = 5;
    /// A watched fleet finished with failed or cancelled runs.
    pub const FLEET_FAILED: i32 = 6;
    /// The request was refused: no valid token (UNAUTHENTICATED), a role or project that does
    /// not allow it, or a spec outside the operator's policy (PERMISSION_DENIED; the message
    /// names the field).
    pub const DENIED: i32 = 7;
    /// Stdout was closed before all output was written (`flotilla ... | head`): 128 + SIGPIPE,
    /// the status a shell shows for a Unix tool that SIGPIPE ended. Nothing is printed.
    pub const BROKEN_PIPE: i32 = 141;
}

/// An error with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// What to print.
    pub message: String,
    /// The process exit code.
    pub code: i32,
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        let code = match status.code() {
            tonic::Code::NotFound => exit_code::NOT_FOUND,
            // Refusals that name the field: an invalid value, an idempotency key reused with
            // another spec, a watch resumed before the events the fleet keeps.
            tonic::Code::InvalidArgument | tonic::Code::AlreadyExists | tonic::Code::OutOfRange => {
                exit_code::INVALID_ARGUMENT
            }
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => exit_code::UNAVAILABLE,
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => exit_code::DENIED,
            _ => exit_code::ERROR,
        };
        CliError {
            message: format!("{:?}: {}", status.code(), status.message()),
            code,
        }
    }
}

/// Writes `line` and a newline to stdout. When stdout is closed (the reader of a pipe exited,
/// as `head` does), ends the process at once with [`exit_code::BROKEN_PIPE`] and no message;
/// on any other write error, with [`exit_code::ERROR`] and a message on stderr.
///
/// The CLI keeps SIGPIPE ignored (Rust's default) rather than restoring the default action,
/// because its gRPC connections write with `writev`, which raises SIGPIPE too: a node closing
/// a connection would kill the CLI instead of letting it try the next address.
pub fn write_stdout(line: &str) {
    let mut out = std::io::stdout().lock();
    let result = out
        .write_all(line.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    if let Err(error) = result {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(exit_code::BROKEN_PIPE);
        }
        errln!("error: writing to stdout: {error}");
        std::process::exit(exit_code::ERROR);
    }
}

/// Rounds over every address (leader hint first) before giving up while the cluster is
/// unavailable (no node reachable, no leader yet, leader changing). Between rounds the CLI
/// waits [`RETRY_BACKOFF_INITIAL_MS`], doubling up to [`RETRY_BACKOFF_MAX_MS`]. Every try of a
/// submission carries the same idempotency key.
pub const CALL_ROUNDS: u32 = 5;
/// Wait after the first round that found no node able to serve, in milliseconds.
pub const RETRY_BACKOFF_INITIAL_MS: u64 = 200;
/// Longest wait between rounds, in milliseconds.
pub const RETRY_BACKOFF_MAX_MS: u64 = 3_000;
/// Longest wait for a TCP connection to one address, in milliseconds.
pub const CONNECT_TIMEOUT_MS: u64 = 3_000;

/// Largest gRPC message the CLI sends or accepts.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// `FleetService` through any of several cluster nodes.
///
/// [`Client::call`] tries the node that answered last (or the leader a node pointed to) first,
/// then every address in the order given. A node that answers UNAVAILABLE or DEADLINE_EXCEEDED,
/// or cannot be reached, is passed over for the next; an UNAVAILABLE answer that names the
/// leader ([`crate::leader_hint`]) makes the leader the next one tried. Any other answer
/// (success, NOT_FOUND, INVALID_ARGUMENT...) ends the call.
pub struct Client {
    /// `http://host:port` URLs as given to `--address`, duplicates removed.
    addresses: Vec<String>,
    /// Connected channels by URL; dropped when their node fails a call.
    channels: HashMap<String, Channel>,
    /// Tried first: the node that answered last, or the leader a node pointed to.
    preferred: Option<String>,
}

/// A client over `addresses` (comma-separated `http://host:port`). Connects lazily, on the
/// first call.
///
/// # Errors
/// [`CliError`] with [`exit_code::USAGE`] when `addresses` names none or one is not a URL.
pub async fn connect(addresses: &str) -> Result<Client, CliError> {
    Client::new(addresses)
}

impl Client {
    /// See [`connect`].
    ///
    /// # Errors
    /// [`CliError`] with [`exit_code::USAGE`] when `addresses` names none or one is not a URL.
    pub fn new(addresses: &str) -> Result<Self, CliError> {
        let mut urls: Vec<String> = Vec::new();
        for address in addresses
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
        {
            tonic::transport::Endpoint::from_shared(crate::tls::url(address, true)).map_err(
                |error| CliError {
                    message: format!(
                        "--address: {address:?} is not host:port or a URL (https://host:port): \
                         {error}"
                    ),
                    code: exit_code::USAGE,
                },
            )?;
            if !urls.iter().any(|u| u == address) {
                urls.push(address.to_string());
            }
        }
        if urls.is_empty() {
            return Err(CliError {
                message: "--address: no address given".into(),
                code: exit_code::USAGE,
            });
        }
        Ok(Client {
            addresses: urls,
            channels: HashMap::new(),
            preferred: None,
        })
    }

    async fn channel(&mut self, url: &str) -> Result<Channel, String> {
        if let Some(channel) = self.channels.get(url) {
            return Ok(channel.clone());
        }
        let endpoint =
            client_endpoint(url)?.connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS));
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| format!("cannot connect: {}", error_chain(&error)))?;
        self.channels.insert(url.to_string(), channel.clone());
        Ok(channel)
    }

    /// Runs `call` against the nodes until one serves it (see [`Client`]), for at most
    /// [`CALL_ROUNDS`] rounds over every address. Each failed try is reported on stderr,
    /// with `retry_note` (such as "with the same idempotency key") on the retry lines.
    ///
    /// # Errors
    /// The first answer that is neither success nor UNAVAILABLE/DEADLINE_EXCEEDED, as its
    /// [`CliError`]; [`exit_code::UNAVAILABLE`] when every round failed.
    pub async fn call<T, F, Fut>(&mut self, retry_note: &str, mut call: F) -> Result<T, CliError>
    where
        F: FnMut(FleetServiceClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut backoff = Duration::from_millis(RETRY_BACKOFF_INITIAL_MS);
        let mut last_failure = String::new();
        for round in 1..=CALL_ROUNDS {
            let mut queue: VecDeque<String> = VecDeque::new();
            for url in self.preferred.iter().chain(&self.addresses) {
                if !queue.contains(url) {
                    queue.push_back(url.clone());
                }
            }
            let mut tried: Vec<String> = Vec::new();
            while let Some(url) = queue.pop_front() {
                tried.push(url.clone());
                let failure = match self.channel(&url).await {
                    Err(message) => message,
                    Ok(channel) => {
                        let client = FleetServiceClient::new(bearer().channel(channel))
                            .max_decoding_message_size(MAX_MESSAGE_BYTES)
                            .max_encoding_message_size(MAX_MESSAGE_BYTES);
                        match call(client).await {
                            Ok(response) => {
                                self.preferred = Some(url);
                                return Ok(response.into_inner());
                            }
                            Err(status)
                                if matches!(
                                    status.code(),
                                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                                ) =>
                            {
                                self.channels.remove(&url);
                                if let Some(leader) = crate::leader_hint::leader_url(&status)
                                    .map(|leader| transport_url(&leader))
                                    && !tried.contains(&leader)
                                {
                                    queue.retain(|u| *u != leader);
                                    queue.push_front(leader.clone());
                                    self.preferred = Some(leader);
                                } else if self.preferred.as_ref() == Some(&url) {
                                    self.preferred = None;
                                }
                                status.message().to_string()
                            }
                            Err(status) => return Err(status.into()),
                        }
                    }
                };
                last_failure = format!("{url}: {failure}");
                match queue.front() {
                    Some(next) => errln!("{last_failure}; trying {next}"),
                    None if round < CALL_ROUNDS => {
                        let note = if retry_note.is_empty() {
                            String::new()
                        } else {
                            format!(" {retry_note}")
                        };
                        errln!(
                            "{last_failure}; retrying{note} in {} ms",
                            backoff.as_millis()
                        );
                    }
                    None => {}
                }
            }
            if round < CALL_ROUNDS {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(RETRY_BACKOFF_MAX_MS));
            }
        }
        Err(CliError {
            message: format!(
                "no node could serve the request ({CALL_ROUNDS} rounds over {}); last: {last_failure}",
                self.addresses.join(",")
            ),
            code: exit_code::UNAVAILABLE,
        })
    }
}

/// `error` and its sources, joined by ": " (tonic's transport errors say little on their own).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Like [`connect`], for `ClusterService`: connects to the first reachable of `addresses`,
/// since its commands are about the addressed node (status, digest, init).
///
/// # Errors
/// [`CliError`] with [`exit_code::UNAVAILABLE`] when none answers.
pub async fn connect_cluster(
    addresses: &str,
) -> Result<ClusterServiceClient<AuthChannel>, CliError> {
    Ok(ClusterServiceClient::new(
        bearer().channel(connect_channel(addresses).await?),
    ))
}

pub(crate) async fn connect_channel(addresses: &str) -> Result<Channel, CliError> {
    let mut last_error = String::from("no address given");
    for address in addresses
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        let endpoint = match client_endpoint(address) {
            Ok(endpoint) => endpoint.connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS)),
            Err(error) => {
                last_error = format!("{address}: {error}");
                continue;
            }
        };
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(error) => last_error = format!("{address}: {}", error_chain(&error)),
        }
    }
    Err(CliError {
        message: format!("cannot reach the cluster ({last_error})"),
        code: exit_code::UNAVAILABLE,
    })
}

fn run_state_name(state: i32) -> &'static str {
    match RunState::try_from(state).unwrap_or(RunState::Unspecified) {
        RunState::Unspecified => "unknown",
        RunState::Pending => "pending",
        RunState::Running => "running",
        RunState::Changed => "changed",
        RunState::Unchanged => "unchanged",
        RunState::Failed => "failed",
        RunState::Cancelled => "cancelled",
    }
}

fn fleet_state_name(state: i32) -> &'static str {
    match FleetState::try_from(state).unwrap_or(FleetState::Unspecified) {
        FleetState::Unspecified => "unknown",
        FleetState::Running => "running",
        FleetState::Finished => "finished",
        FleetState::Cancelled => "cancelled",
    }
}

fn counts_json(counts: Option<&v1::RunCounts>) -> serde_json::Value {
    let c = counts.cloned().unwrap_or_default();
    json!({"total": c.total, "pending": c.pending, "running": c.running, "changed": c.changed,
           "unchanged": c.unchanged, "failed": c.failed, "cancelled": c.cancelled})
}

fn fleet_json(fleet: &v1::Fleet) -> serde_json::Value {
    json!({
        "id": fleet.id, "name": fleet.name, "state": fleet_state_name(fleet.state),
        "counts": counts_json(fleet.counts.as_ref()),
        "created_at_ms": fleet.created_at_ms, "finished_at_ms": fleet.finished_at_ms,
        "wall_time_ms": fleet.finished_at_ms.saturating_sub(fleet.created_at_ms),
        "idempotency_key": fleet.idempotency_key,
        "runs": fleet.runs.iter().map(run_summary_json).collect::<Vec<_>>(),
        "runs_next_page_token": fleet.runs_next_page_token,
        "flow": flow::flow_json(fleet),
    })
}

fn run_summary_json(r: &v1::RunSummary) -> serde_json::Value {
    json!({
        "id": r.id, "repository": r.repository, "state": run_state_name(r.state), "attempt": r.attempt,
        "branch": r.branch, "files_changed": r.files_changed, "insertions": r.insertions,
        "deletions": r.deletions, "error": r.error, "outcome": outcome_name(r.outcome),
    })
}

/// The human table of run summaries (state, repository, files, +, -, branch or error).
fn print_run_table(runs: &[v1::RunSummary]) {
    outln!(
        "{:<10} {:<32} {:>6} {:>8} {:>8}  BRANCH / ERROR",
        "STATE",
        "REPOSITORY",
        "FILES",
        "+",
        "-"
    );
    for run in runs {
        let detail = if run.branch.is_empty() {
            run.error.clone()
        } else {
            run.branch.clone()
        };
        let detail: String = detail.chars().take(100).collect();
        outln!(
            "{:<10} {:<32} {:>6} {:>8} {:>8}  {}",
            run_state_name(run.state),
            printable(&short_repository(&run.repository)),
            run.files_changed,
            run.insertions,
            run.deletions,
            printable(&detail)
        );
    }
}

fn event_json(event: &v1::FleetEvent) -> serde_json::Value {
    json!({
        "fleet_id": event.fleet_id, "sequence": event.sequence, "time_ms": event.time_ms,
        "run_id": event.run_id, "repository": event.repository, "run_state": run_state_name(event.run_state),
        "attempt": event.attempt, "fleet_state": fleet_state_name(event.fleet_state),
        "counts": counts_json(event.counts.as_ref()), "message": event.message,
    })
}

fn short_repository(url: &str) -> String {
    flotilla_scheduler::spec::repository_name(url)
}

fn format_duration_ms(ms: u64) -> String {
    if ms >= 60_000 {
        format!(
            "{}m{:02}.{:01}s",
            ms / 60_000,
            (ms % 60_000) / 1000,
            (ms % 1000) / 100
        )
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// Prints a fleet: summary line, then (human) the roll-up table.
pub fn print_fleet(fleet: &v1::Fleet, output: Output) {
    if output == Output::Json {
        outln!("{}", fleet_json(fleet));
        return;
    }
    let c = fleet.counts.unwrap_or_default();
    outln!(
        "fleet {} ({}) {}",
        fleet.id,
        fleet.name,
        fleet_state_name(fleet.state)
    );
    if !fleet.runs.is_empty() {
        print_run_table(&fleet.runs);
        if !fleet.runs_next_page_token.is_empty() {
            outln!(
                "(the first {} of {} runs; `flotilla run list {}` lists them all)",
                fleet.runs.len(),
                c.total,
                fleet.id
            );
        }
    }
    let wall = if fleet.finished_at_ms > 0 {
        format!(
            ", wall time {}",
            format_duration_ms(fleet.finished_at_ms.saturating_sub(fleet.created_at_ms))
        )
    } else {
        String::new()
    };
    outln!(
        "{} runs: {} changed, {} unchanged, {} failed, {} cancelled, {} pending, {} running{wall}",
        c.total,
        c.changed,
        c.unchanged,
        c.failed,
        c.cancelled,
        c.pending,
        c.running
    );
    for line in flow::flow_lines(fleet) {
        outln!("{line}");
    }
}

/// `fleet submit`.
///
/// # Errors
/// A bad spec file (exit 4) or an RPC failure.
pub async fn submit(
    client: &mut Client,
    spec_path: &Path,
    idempotency_key: String,
    watch: bool,
    dry_run: bool,
    output: Output,
) -> Result<i32, CliError> {
    let spec = crate::spec_file::load(spec_path).map_err(|e| CliError {
        message: e.to_string(),
        code: exit_code::INVALID_ARGUMENT,
    })?;
    if dry_run {
        let request = v1::SubmitFleetRequest {
            spec: Some(spec),
            idempotency_key,
            dry_run: true,
        };
        let response = client
            .call("", |mut fleets| {
                let request = request.clone();
                async move { fleets.submit_fleet(request).await }
            })
            .await?;
        flow::print_preview(&response.preview.unwrap_or_default(), output);
        return Ok(exit_code::OK);
    }
    submit_spec(client, spec, idempotency_key, watch, output).await
}

/// Submits a wire spec; with `watch`, follows it to the end and prints the roll-up.
///
/// # Errors
/// An RPC failure.
pub async fn submit_spec(
    client: &mut Client,
    spec: v1::FleetSpec,
    idempotency_key: String,
    watch: bool,
    output: Output,
) -> Result<i32, CliError> {
    // Without a key from the user, one is made up, so that retrying after an ambiguous failure
    // (the cluster may have committed the fleet before the answer was lost) never creates a
    // second fleet.
    let idempotency_key = if idempotency_key.is_empty() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        format!("cli-{nanos:x}-{:x}", std::process::id())
    } else {
        idempotency_key
    };
    let request = v1::SubmitFleetRequest {
        spec: Some(spec),
        idempotency_key,
        dry_run: false,
    };
    let response = client
        .call("with the same idempotency key", |mut fleets| {
            let request = request.clone();
            async move { fleets.submit_fleet(request).await }
        })
        .await?;
    let fleet = response.fleet.ok_or_else(|| CliError {
        message: "empty response".into(),
        code: exit_code::ERROR,
    })?;
    if output == Output::Human {
        let verb = if response.created {
            "submitted"
        } else {
            "already submitted (idempotency key matched)"
        };
        errln!(
            "fleet {} {verb}: {} runs",
            fleet.id,
            fleet.counts.as_ref().map_or(0, |c| c.total)
        );
    }
    if !watch {
        if output == Output::Json {
            outln!(
                "{}",
                json!({"created": response.created, "fleet": fleet_json(&fleet)})
            );
        } else {
            outln!("{}", fleet.id);
        }
        return Ok(exit_code::OK);
    }
    watch_fleet(client, &fleet.id, 0, output).await
}

async fn open_watch(
    client: &mut Client,
    fleet_id: &str,
    after_sequence: u64,
) -> Result<tonic::Streaming<v1::FleetEvent>, CliError> {
    let request = v1::WatchFleetRequest {
        fleet_id: fleet_id.to_string(),
        after_sequence,
    };
    client
        .call("", |mut fleets| {
            let request = request.clone();
            async move { fleets.watch_fleet(request).await }
        })
        .await
}

/// `fleet watch`: follows a fleet's events with a progress bar (human) or NDJSON, then prints
/// the roll-up. Returns [`exit_code::FLEET_FAILED`] when runs failed or were cancelled.
///
/// Events older than the fleet's bound (`limits.max_events_per_fleet`) are dropped by the
/// cluster: in human output, a watch that falls behind them says so on stderr and continues
/// from the newest event (each event carries the fleet's counts, so the progress bar loses
/// nothing); NDJSON output, which promises every event, ends with the error instead.
///
/// # Errors
/// An RPC failure; when the stream breaks, the message says how to resume it
/// (`fleet watch --after`).
pub async fn watch_fleet(
    client: &mut Client,
    fleet_id: &str,
    after_sequence: u64,
    output: Output,
) -> Result<i32, CliError> {
    let mut stream = open_watch(client, fleet_id, after_sequence).await?;
    let interactive = output == Output::Human && std::io::stderr().is_terminal();
    let bar = if interactive {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40.cyan/blue} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut last_sequence = after_sequence;
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => break,
            Err(status) if status.code() == tonic::Code::OutOfRange && output == Output::Human => {
                let fleet = get_fleet(client, fleet_id).await?;
                let note = format!(
                    "note: {}; continuing from sequence {}",
                    status.message(),
                    fleet.last_sequence
                );
                if interactive {
                    bar.println(note);
                } else {
                    errln!("{note}");
                }
                last_sequence = fleet.last_sequence;
                stream = open_watch(client, fleet_id, last_sequence).await?;
                continue;
            }
            Err(status) => {
                bar.finish_and_clear();
                let mut error = CliError::from(status);
                error.message = format!(
                    "{}; resume with: flotilla fleet watch {fleet_id} --after {last_sequence}",
                    error.message
                );
                return Err(error);
            }
        };
        last_sequence = event.sequence;
        let c = event.counts.unwrap_or_default();
        match output {
            Output::Json => outln!("{}", event_json(&event)),
            Output::Human => {
                let done = c.changed + c.unchanged + c.failed + c.cancelled;
                bar.set_length(u64::from(c.total));
                bar.set_position(u64::from(done));
                bar.set_message(format!(
                    "{} changed, {} unchanged, {} failed, {} running",
                    c.changed, c.unchanged, c.failed, c.running
                ));
                let terminal = matches!(
                    RunState::try_from(event.run_state),
                    Ok(RunState::Changed | RunState::Unchanged | RunState::Failed)
                );
                if !interactive && (terminal || event.run_id.is_empty()) {
                    errln!(
                        "[{done}/{}] {} {}",
                        c.total,
                        printable(&short_repository(&event.repository)),
                        printable(&event.message)
                    );
                } else if interactive && RunState::try_from(event.run_state) == Ok(RunState::Failed)
                {
                    bar.println(format!(
                        "failed: {} {}",
                        printable(&short_repository(&event.repository)),
                        printable(&event.message)
                    ));
                }
            }
        }
    }
    bar.finish_and_clear();
    let fleet = get_fleet(client, fleet_id).await?;
    if output == Output::Human {
        print_fleet(&fleet, output);
    }
    let c = fleet.counts.unwrap_or_default();
    Ok(if c.failed + c.cancelled > 0 {
        exit_code::FLEET_FAILED
    } else {
        exit_code::OK
    })
}

async fn get_fleet(client: &mut Client, fleet_id: &str) -> Result<v1::Fleet, CliError> {
    let request = v1::GetFleetRequest {
        fleet_id: fleet_id.to_string(),
    };
    client
        .call("", |mut fleets| {
            let request = request.clone();
            async move { fleets.get_fleet(request).await }
        })
        .await
}

/// `fleet list`.
///
/// # Errors
/// An RPC failure.
pub async fn list(client: &mut Client, limit: u32, output: Output) -> Result<i32, CliError> {
    let request = v1::ListFleetsRequest {
        page_size: limit,
        page_token: String::new(),
    };
    let response = client
        .call("", |mut fleets| {
            let request = request.clone();
            async move { fleets.list_fleets(request).await }
        })
        .await?;
    if output == Output::Json {
        let fleets: Vec<_> = response.fleets.iter().map(fleet_json).collect();
        outln!(
            "{}",
            json!({"fleets": fleets, "next_page_token": response.next_page_token})
        );
        return Ok(exit_code::OK);
    }
    outln!(
        "{:<10} {:<24} {:<10} {:>6} {:>8} {:>10} {:>7}",
        "FLEET",
        "NAME",
        "STATE",
        "RUNS",
        "CHANGED",
        "UNCHANGED",
        "FAILED"
    );
    for fleet in &response.fleets {
        let c = fleet.counts.unwrap_or_default();
        outln!(
            "{:<10} {:<24} {:<10} {:>6} {:>8} {:>10} {:>7}",
            fleet.id,
            fleet.name,
            fleet_state_name(fleet.state),
            c.total,
            c.changed,
            c.unchanged,
            c.failed
        );
    }
    Ok(exit_code::OK)
}

/// `run show`.
///
/// # Errors
/// An RPC failure.
pub async fn show_run(
    client: &mut Client,
    run_id: &str,
    with_patch: bool,
    output: Output,
) -> Result<i32, CliError> {
    let request = v1::GetRunRequest {
        run_id: run_id.to_string(),
    };
    let run = client
        .call("", |mut fleets| {
            let request = request.clone();
            async move { fleets.get_run(request).await }
        })
        .await?;
    if output == Output::Json {
        let attempts: Vec<_> = run
            .attempts
            .iter()
            .map(|a| {
                let denials: Vec<_> = a
                    .sandbox_denials
                    .iter()
                    .map(|d| json!({"mechanism": d.mechanism, "action": d.action, "command": d.command, "count": d.count}))
                    .collect();
                let egress: Vec<_> = a
                    .egress_connections
                    .iter()
                    .map(|c| json!({"host": c.host, "port": c.port, "address": c.address, "allowed": c.allowed,
                                    "reason": c.reason, "bytes_up": c.bytes_up, "bytes_down": c.bytes_down,
                                    "duration_ms": c.duration_ms}))
                    .collect();
                json!({"number": a.number, "worker_id": a.worker_id, "started_at_ms": a.started_at_ms,
                       "finished_at_ms": a.finished_at_ms, "outcome": outcome_name(a.outcome), "exit_code": a.exit_code,
                       "error": a.error, "log_tail": a.log_tail, "sandbox_denials": denials,
                       "egress_connections": egress})
            })
            .collect();
        let diffstat: Vec<_> = run
            .diffstat
            .iter()
            .map(|f| json!({"path": f.path, "insertions": f.insertions, "deletions": f.deletions}))
            .collect();
        outln!(
            "{}",
            json!({"id": run.id, "fleet_id": run.fleet_id, "repository": run.repository,
                   "state": run_state_name(run.state), "branch": run.branch, "commit": run.commit,
                   "pushed": run.pushed, "diffstat": diffstat, "patch": run.patch,
                   "patch_truncated": run.patch_truncated, "attempts": attempts})
        );
        return Ok(exit_code::OK);
    }
    outln!(
        "run {} of fleet {}: {}",
        run.id,
        run.fleet_id,
        run_state_name(run.state)
    );
    // Everything below may hold bytes the agent chose: print control characters as escapes.
    outln!("repository: {}", printable(&run.repository));
    if !run.commit.is_empty() {
        outln!(
            "branch: {} (commit {}, pushed: {})",
            printable(&run.branch),
            printable(&run.commit),
            run.pushed
        );
    }
    for file in &run.diffstat {
        outln!(
            "  {:>6} {:>6}  {}",
            format!("+{}", file.insertions),
            format!("-{}", file.deletions),
            printable(&file.path)
        );
    }
    for attempt in &run.attempts {
        let outcome = match outcome_name(attempt.outcome) {
            "" => "running",
            name => name,
        };
        outln!(
            "attempt {} on {}: {} (exit code {}) {}",
            attempt.number,
            printable(&attempt.worker_id),
            outcome,
            attempt.exit_code,
            printable(&attempt.error)
        );
        for denial in &attempt.sandbox_denials {
            outln!(
                "  sandbox refused ({}, {}): {} x{}",
                printable(&denial.mechanism),
                printable(&denial.command),
                printable(&denial.action),
                denial.count
            );
        }
        for connection in &attempt.egress_connections {
            outln!(
                "  egress {}:{} {} ({}, {} bytes up, {} down)",
                printable(&connection.host),
                connection.port,
                if connection.allowed {
                    "allowed"
                } else {
                    "denied"
                },
                printable(&connection.reason),
                connection.bytes_up,
                connection.bytes_down
            );
        }
        if !attempt.log_tail.is_empty() {
            outln!(
                "--- log tail ---\n{}\n----------------",
                printable(attempt.log_tail.trim_end())
            );
        }
    }
    if with_patch && !run.patch.is_empty() {
        outln!("{}", printable(&run.patch));
        if run.patch_truncated {
            outln!(
                "[patch truncated; the full change is on branch {}]",
                run.branch
            );
        }
    }
    Ok(exit_code::OK)
}

/// The wire value of a run state name (`failed`, ...), as `run list --state` takes it.
fn run_state_from_name(name: &str) -> Option<v1::RunState> {
    [
        v1::RunState::Pending,
        v1::RunState::Running,
        v1::RunState::Changed,
        v1::RunState::Unchanged,
        v1::RunState::Failed,
        v1::RunState::Cancelled,
    ]
    .into_iter()
    .find(|state| run_state_name(*state as i32) == name)
}

/// What `run list` shows: runs in any of `states` (empty: all), whose repository contains
/// `repository`, whose last attempt ended with any of `outcomes` (empty: all).
#[derive(Clone, Copy, Debug)]
pub struct RunListFilter<'a> {
    /// State names (pending, running, ...).
    pub states: &'a [String],
    /// Repository URL substring.
    pub repository: &'a str,
    /// Outcome names (as `RunResult.outcome`).
    pub outcomes: &'a [String],
}

/// `run list`: every run of a fleet matching `filter`, page by page (at most `limit`, 0: all).
///
/// # Errors
/// An unknown state or outcome name (usage error) or an RPC failure.
pub async fn list_runs(
    client: &mut Client,
    fleet_id: &str,
    filter: &RunListFilter<'_>,
    limit: u64,
    output: Output,
) -> Result<i32, CliError> {
    let mut wire_outcomes = Vec::with_capacity(filter.outcomes.len());
    for name in filter.outcomes {
        match flotilla_scheduler::Outcome::parse(name) {
            Some(outcome) => wire_outcomes.push(outcome_to_wire(Some(outcome))),
            None => {
                let names: Vec<&str> = flotilla_scheduler::Outcome::ALL
                    .iter()
                    .map(|outcome| outcome.as_str())
                    .collect();
                errln!("--outcome {name:?}: must be one of {}", names.join(", "));
                return Ok(exit_code::USAGE);
            }
        }
    }
    let mut wire_states = Vec::with_capacity(filter.states.len());
    for name in filter.states {
        match run_state_from_name(name) {
            Some(state) => wire_states.push(state as i32),
            None => {
                errln!(
                    "--state {name:?}: must be pending, running, changed, unchanged, failed or cancelled"
                );
                return Ok(exit_code::USAGE);
            }
        }
    }
    let mut runs: Vec<v1::RunSummary> = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = v1::ListRunsRequest {
            fleet_id: fleet_id.to_string(),
            page_size: 1000,
            page_token: page_token.clone(),
            states: wire_states.clone(),
            repository_contains: filter.repository.to_string(),
            outcomes: wire_outcomes.clone(),
        };
        let page = client
            .call("", |mut fleets| {
                let request = request.clone();
                async move { fleets.list_runs(request).await }
            })
            .await?;
        runs.extend(page.runs);
        if limit > 0 && runs.len() as u64 >= limit {
            runs.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            break;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    if output == Output::Json {
        outln!(
            "{}",
            json!({"fleet_id": fleet_id, "runs": runs.iter().map(run_summary_json).collect::<Vec<_>>()})
        );
    } else {
        print_run_table(&runs);
        outln!("{} runs", runs.len());
    }
    Ok(exit_code::OK)
}

/// `fleet status`.
///
/// # Errors
/// An RPC failure.
pub async fn status(client: &mut Client, fleet_id: &str, output: Output) -> Result<i32, CliError> {
    let fleet = get_fleet(client, fleet_id).await?;
    print_fleet(&fleet, output);
    Ok(exit_code::OK)
}

/// `fleet cancel` (repeating it is harmless, so it is retried like the reads).
///
/// # Errors
/// An RPC failure.
pub async fn cancel(client: &mut Client, fleet_id: &str, output: Output) -> Result<i32, CliError> {
    let request = v1::CancelFleetRequest {
        fleet_id: fleet_id.to_string(),
    };
    let fleet = client
        .call("", |mut fleets| {
            let request = request.clone();
            async move { fleets.cancel_fleet(request).await }
        })
        .await?;
    print_fleet(&fleet, output);
    Ok(exit_code::OK)
}

/// Reads a file of repository URLs (one per line, `#` comments).
///
/// # Errors
/// The file cannot be read or names no repository.
pub fn read_repositories_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = crate::spec_file::read_bounded(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let repositories: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    anyhow::ensure!(
        !repositories.is_empty(),
        "{} names no repository",
        path.display()
    );
    Ok(repositories)
}

fn print_cluster_status(status: &v1::ClusterStatus, output: Output) {
    if output == Output::Json {
        let members: Vec<_> = status
            .members
            .iter()
            .map(|m| {
                json!({"node_id": m.node_id, "address": m.address, "voter": m.voter,
                       "matched_index": m.matched_index, "lag": m.lag})
            })
            .collect();
        outln!(
            "{}",
            json!({"node_id": status.node_id, "role": status.role, "term": status.term,
                   "leader_id": status.leader_id, "leader_address": status.leader_address,
                   "last_log_index": status.last_log_index, "committed_index": status.committed_index,
                   "applied_index": status.applied_index, "snapshot_index": status.snapshot_index,
                   "members": members})
        );
        return;
    }
    let leader = if status.leader_id == 0 {
        "none".to_string()
    } else {
        format!("{} ({})", status.leader_id, status.leader_address)
    };
    outln!(
        "node {}: {}, term {}, leader {leader}",
        status.node_id,
        status.role,
        status.term
    );
    outln!(
        "last log index {}, committed {}, applied {}, snapshot {}",
        status.last_log_index,
        status.committed_index,
        status.applied_index,
        status.snapshot_index
    );
    outln!(
        "{:<8} {:<24} {:<8} {:>10} {:>8}",
        "NODE",
        "ADDRESS",
        "ROLE",
        "MATCHED",
        "LAG"
    );
    for member in &status.members {
        let role = if member.voter { "voter" } else { "learner" };
        outln!(
            "{:<8} {:<24} {:<8} {:>10} {:>8}",
            member.node_id,
            member.address,
            role,
            member.matched_index,
            member.lag
        );
    }
}

/// `cluster status`.
///
/// # Errors
/// An RPC failure.
pub async fn cluster_status(
    client: &mut ClusterServiceClient<AuthChannel>,
    from_leader: bool,
    output: Output,
) -> Result<i32, CliError> {
    let status = client
        .status(v1::StatusRequest { from_leader })
        .await?
        .into_inner();
    print_cluster_status(&status, output);
    Ok(exit_code::OK)
}

/// `cluster digest`.
///
/// # Errors
/// An RPC failure.
pub async fn cluster_digest(
    client: &mut ClusterServiceClient<AuthChannel>,
    output: Output,
) -> Result<i32, CliError> {
    let digest = client
        .state_digest(v1::StateDigestRequest {})
        .await?
        .into_inner();
    if output == Output::Json {
        outln!(
            "{}",
            json!({"node_id": digest.node_id, "applied_index": digest.applied_index, "digest": digest.digest})
        );
    } else {
        outln!(
            "node {} applied index {} digest {}",
            digest.node_id,
            digest.applied_index,
            digest.digest
        );
    }
    Ok(exit_code::OK)
}

fn parse_member(entry: &str) -> Result<v1::Member, CliError> {
    let invalid = || CliError {
        message: format!("--members: {entry:?} is not <node_id>=<host:port>"),
        code: exit_code::USAGE,
    };
    let (node_id, address) = entry.split_once('=').ok_or_else(invalid)?;
    Ok(v1::Member {
        node_id: node_id.trim().parse().map_err(|_| invalid())?,
        address: address.trim().to_string(),
    })
}

/// `cluster init`.
///
/// # Errors
/// A malformed member or an RPC failure.
pub async fn cluster_init(
    client: &mut ClusterServiceClient<AuthChannel>,
    members: &[String],
    output: Output,
) -> Result<i32, CliError> {
    let members = members
        .iter()
        .map(|m| parse_member(m))
        .collect::<Result<Vec<_>, _>>()?;
    let status = client
        .initialize(v1::InitializeRequest { members })
        .await?
        .into_inner();
    print_cluster_status(&status, output);
    Ok(exit_code::OK)
}

/// `cluster add`.
///
/// # Errors
/// An RPC failure.
pub async fn cluster_add(
    client: &mut ClusterServiceClient<AuthChannel>,
    node_id: u64,
    address: String,
    learner: bool,
    output: Output,
) -> Result<i32, CliError> {
    let request = v1::AddMemberRequest {
        member: Some(v1::Member { node_id, address }),
        learner,
    };
    let status = client.add_member(request).await?.into_inner();
    print_cluster_status(&status, output);
    Ok(exit_code::OK)
}

/// `cluster remove`.
///
/// # Errors
/// An RPC failure.
pub async fn cluster_remove(
    client: &mut ClusterServiceClient<AuthChannel>,
    node_id: u64,
    output: Output,
) -> Result<i32, CliError> {
    let status = client
        .remove_member(v1::RemoveMemberRequest { node_id })
        .await?
        .into_inner();
    print_cluster_status(&status, output);
    Ok(exit_code::OK)
}
