//! `flotilla limit create|list|show|delete`: the cluster's rate and concurrency limits
//! (`flotilla.v1.LimitService`; creating and deleting need an admin token).

use flotilla_proto::v1;
use flotilla_proto::v1::limit_service_client::LimitServiceClient;
use serde_json::json;

use super::{CliError, Output, bearer, connect_channel, exit_code};

/// What a limit counts by.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum KeyArgument {
    /// One count for the cluster.
    Global,
    /// Per project.
    Project,
    /// Per fleet.
    Fleet,
    /// Per forge host (github.com).
    ForgeHost,
    /// Per organisation (github.com/acme).
    Organisation,
    /// Per repository.
    Repository,
}

/// What a full concurrency key does with a run.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum WhenFullArgument {
    /// Wait.
    Queue,
    /// Cancel the run.
    Skip,
    /// Cancel the key's oldest running run.
    CancelOlder,
}

/// Limit subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum LimitCommands {
    /// Creates a limit: `--rate N --period-ms P [--burst B]` or `--max-running N`.
    Create {
        /// 1-64 characters of [A-Za-z0-9._-].
        name: String,
        /// What it counts by.
        #[arg(long, value_enum)]
        key: KeyArgument,
        /// Only runs of this project; default: every project.
        #[arg(long, default_value = "")]
        project: String,
        /// A rate limit: this many leases per `--period-ms`.
        #[arg(long, conflicts_with = "max_running")]
        rate: Option<u32>,
        /// The rate limit's period.
        #[arg(long, default_value_t = 1_000)]
        period_ms: u64,
        /// Most leases at once after a quiet time; default: the rate.
        #[arg(long, default_value_t = 0)]
        burst: u32,
        /// A concurrency limit: at most this many running runs per key.
        #[arg(long, required_unless_present = "rate")]
        max_running: Option<u32>,
        /// What a full key does with a run.
        #[arg(long, value_enum, default_value = "queue")]
        when_full: WhenFullArgument,
        /// With `--when-full queue`: most runs waiting on one key; a fleet that would take a
        /// key over it is refused (RESOURCE_EXHAUSTED). Default: no bound but the fleets' own.
        #[arg(long, requires = "max_running", value_parser = clap::value_parser!(u32).range(1..))]
        max_queued: Option<u32>,
    },
    /// Lists the limits.
    List,
    /// Shows a limit and its keys in use.
    Show {
        /// The limit's name.
        name: String,
    },
    /// Deletes a limit.
    Delete {
        /// The limit's name.
        name: String,
    },
}

fn limit_json(limit: &v1::Limit) -> serde_json::Value {
    let spec = limit.spec.clone().unwrap_or_default();
    json!({
        "name": spec.name, "project": spec.project, "description": limit.description,
        "created_at_ms": limit.created_at_ms, "created_by": limit.created_by,
        "usage": limit.usage.iter().map(|u| json!({"key": u.key, "running": u.running,
            "queued": u.queued, "full_at_ms": u.full_at_ms})).collect::<Vec<_>>(),
    })
}

fn print_limit(limit: &v1::Limit, output: Output) {
    if output == Output::Json {
        outln!("{}", limit_json(limit));
        return;
    }
    let name = limit.spec.as_ref().map_or("", |s| s.name.as_str());
    outln!("{name}: {}", limit.description);
    for usage in &limit.usage {
        if usage.full_at_ms > 0 {
            outln!(
                "  {}: bucket full again at {} ms",
                usage.key,
                usage.full_at_ms
            );
        } else {
            outln!(
                "  {}: {} running, {} waiting",
                usage.key,
                usage.running,
                usage.queued
            );
        }
    }
}

/// Runs one limit subcommand against `address`.
///
/// # Errors
/// The server's answer as a [`CliError`].
pub async fn run(address: &str, command: LimitCommands, output: Output) -> Result<i32, CliError> {
    let mut client = LimitServiceClient::new(bearer().channel(connect_channel(address).await?));
    match command {
        LimitCommands::Create {
            name,
            key,
            project,
            rate,
            period_ms,
            burst,
            max_running,
            when_full,
            max_queued,
        } => {
            let kind = match (rate, max_running) {
                (Some(limit), _) => v1::limit_spec::Kind::Rate(v1::RateLimit {
                    limit,
                    period_ms,
                    burst,
                }),
                (None, Some(max_running)) => {
                    v1::limit_spec::Kind::Concurrency(v1::ConcurrencyLimit {
                        max_running,
                        max_queued: max_queued.unwrap_or(0),
                        when_full: match when_full {
                            WhenFullArgument::Queue => v1::WhenFull::Queue,
                            WhenFullArgument::Skip => v1::WhenFull::Skip,
                            WhenFullArgument::CancelOlder => v1::WhenFull::CancelOlder,
                        } as i32,
                    })
                }
                (None, None) => {
                    return Err(CliError {
                        message: "give --rate or --max-running".into(),
                        code: exit_code::USAGE,
                    });
                }
            };
            let key = match key {
                KeyArgument::Global => v1::LimitKey::Global,
                KeyArgument::Project => v1::LimitKey::Project,
                KeyArgument::Fleet => v1::LimitKey::Fleet,
                KeyArgument::ForgeHost => v1::LimitKey::ForgeHost,
                KeyArgument::Organisation => v1::LimitKey::Organisation,
                KeyArgument::Repository => v1::LimitKey::Repository,
            } as i32;
            let spec = v1::LimitSpec {
                name,
                project,
                key,
                kind: Some(kind),
            };
            let limit = client
                .create_limit(v1::CreateLimitRequest { spec: Some(spec) })
                .await?
                .into_inner();
            print_limit(&limit, output);
        }
        LimitCommands::List => {
            let limits = client
                .list_limits(v1::ListLimitsRequest {})
                .await?
                .into_inner()
                .limits;
            if output == Output::Json {
                outln!(
                    "{}",
                    json!(limits.iter().map(limit_json).collect::<Vec<_>>())
                );
            } else if limits.is_empty() {
                outln!("no limits");
            } else {
                for limit in &limits {
                    print_limit(limit, output);
                }
            }
        }
        LimitCommands::Show { name } => {
            let limit = client
                .get_limit(v1::GetLimitRequest { name })
                .await?
                .into_inner();
            print_limit(&limit, output);
        }
        LimitCommands::Delete { name } => {
            client
                .delete_limit(v1::DeleteLimitRequest { name: name.clone() })
                .await?;
            if output == Output::Json {
                outln!("{}", json!({"deleted": name}));
            } else {
                outln!("limit {name} deleted");
            }
        }
    }
    Ok(exit_code::OK)
}
