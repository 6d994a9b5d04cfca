//! `flotilla event rule create|list|delete`, `flotilla event send` and `flotilla event
//! deliveries`: event rules, API events and the record of deliveries
//! (`flotilla.v1.EventService`).

use std::path::PathBuf;

use flotilla_proto::v1;
use flotilla_proto::v1::event_service_client::EventServiceClient;
use serde_json::json;

use super::{CliError, Output, bearer, connect_channel, exit_code};

/// Event subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum EventCommands {
    /// Event rules: which events start which fleet.
    #[command(subcommand)]
    Rule(RuleCommands),
    /// Publishes an event into a project (source `api`), as a CI system or a chat bot would;
    /// prints the fleets its rules started.
    Send {
        /// The event type (`release.published`, `deploy`, ...).
        #[arg(long = "type")]
        event_type: String,
        /// The project whose rules see it.
        #[arg(long, default_value = flotilla_scheduler::spec::DEFAULT_PROJECT)]
        project: String,
        /// The delivery id (its idempotency key); default: a random one chosen here, so a
        /// retry of this command is safe.
        #[arg(long)]
        id: Option<String>,
        /// The repository concerned (`event.repository`).
        #[arg(long, default_value = "")]
        repository: String,
        /// The payload: a JSON document, or `@FILE` to read one (`@-`: standard input).
        #[arg(long, default_value = "{}")]
        payload: String,
    },
    /// Accepted deliveries (replicated) and those the answering node refused, newest first.
    Deliveries {
        /// Only this project.
        #[arg(long, default_value = "")]
        project: String,
        /// How many (1-1000).
        #[arg(long, default_value_t = 100)]
        count: u32,
    },
}

/// Rule subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum RuleCommands {
    /// Creates a rule from a YAML or TOML file (`name`, `source`, `filter`, `repositories`,
    /// `params`, `fleet`).
    Create {
        /// The rule file.
        file: PathBuf,
    },
    /// Lists rules.
    List {
        /// Only this project.
        #[arg(long, default_value = "")]
        project: String,
    },
    /// Deletes a rule (`<project>/<name>`); its fleets go on.
    Delete {
        /// `<project>/<name>`.
        rule_id: String,
    },
}

fn rule_json(rule: &v1::EventRule) -> serde_json::Value {
    let spec = rule.spec.clone().unwrap_or_default();
    json!({
        "id": rule.id, "source": spec.source, "filter": spec.filter,
        "repositories": spec.repositories, "params": spec.params,
        "fleet_name": spec.fleet.map(|fleet| fleet.name).unwrap_or_default(),
        "created_at_ms": rule.created_at_ms, "created_by": rule.created_by,
    })
}

fn outcomes_json(rules: &[v1::RuleOutcome]) -> Vec<serde_json::Value> {
    rules
        .iter()
        .map(|rule| json!({"rule_id": rule.rule_id, "fleet_id": rule.fleet_id, "reason": rule.reason}))
        .collect()
}

fn delivery_json(delivery: &v1::Delivery) -> serde_json::Value {
    json!({
        "project": delivery.project, "source": delivery.source,
        "delivery_id": delivery.delivery_id, "event_type": delivery.event_type,
        "repository": delivery.repository, "payload_sha256": delivery.payload_sha256,
        "payload_bytes": delivery.payload_bytes, "verdict": delivery.verdict,
        "first_received_ms": delivery.first_received_ms,
        "last_received_ms": delivery.last_received_ms, "receipts": delivery.receipts,
        "rules": outcomes_json(&delivery.rules), "rules_evaluated": delivery.rules_evaluated,
        "refused": delivery.refused, "http_status": delivery.http_status,
    })
}

fn read_payload(payload: &str) -> Result<Vec<u8>, CliError> {
    let invalid = |message: String| CliError {
        message,
        code: exit_code::INVALID_ARGUMENT,
    };
    let bytes = match payload.strip_prefix('@') {
        Some("-") => {
            let mut buffer = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buffer)
                .map_err(|error| invalid(format!("--payload @-: {error}")))?;
            buffer
        }
        Some(file) => {
            std::fs::read(file).map_err(|error| invalid(format!("--payload @{file}: {error}")))?
        }
        None => payload.as_bytes().to_vec(),
    };
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .map_err(|error| invalid(format!("--payload: not JSON: {error}")))?;
    Ok(bytes)
}

/// Runs one event subcommand against `address`.
///
/// # Errors
/// The server's answer, or an unreadable file or payload, as a [`CliError`].
pub async fn run(address: &str, command: EventCommands, output: Output) -> Result<i32, CliError> {
    let mut client = EventServiceClient::new(bearer().channel(connect_channel(address).await?));
    match command {
        EventCommands::Rule(RuleCommands::Create { file }) => {
            let spec = crate::rule_file::load(&file).map_err(|error| CliError {
                message: error.to_string(),
                code: exit_code::INVALID_ARGUMENT,
            })?;
            let response = client
                .create_event_rule(v1::CreateEventRuleRequest { spec: Some(spec) })
                .await?
                .into_inner();
            let rule = response.rule.unwrap_or_default();
            if output == Output::Json {
                outln!(
                    "{}",
                    json!({"rule": rule_json(&rule), "created": response.created})
                );
            } else {
                outln!(
                    "rule {} {}",
                    rule.id,
                    if response.created {
                        "created"
                    } else {
                        "exists (same spec)"
                    }
                );
            }
        }
        EventCommands::Rule(RuleCommands::List { project }) => {
            let rules = client
                .list_event_rules(v1::ListEventRulesRequest { project })
                .await?
                .into_inner()
                .rules;
            if output == Output::Json {
                let listed: Vec<_> = rules.iter().map(rule_json).collect();
                outln!("{}", json!({ "rules": listed }));
            } else {
                outln!("{:<40} {:<16} FILTER", "ID", "SOURCE");
                for rule in &rules {
                    let spec = rule.spec.clone().unwrap_or_default();
                    outln!(
                        "{:<40} {:<16} {}",
                        rule.id,
                        spec.source,
                        super::terminal::printable(&spec.filter)
                    );
                }
            }
        }
        EventCommands::Rule(RuleCommands::Delete { rule_id }) => {
            let existed = client
                .delete_event_rule(v1::DeleteEventRuleRequest {
                    rule_id: rule_id.clone(),
                })
                .await?
                .into_inner()
                .existed;
            if output == Output::Json {
                outln!("{}", json!({"rule_id": rule_id, "existed": existed}));
            } else if existed {
                outln!("rule {rule_id} deleted");
            } else {
                outln!("rule {rule_id} did not exist");
            }
        }
        EventCommands::Send {
            event_type,
            project,
            id,
            repository,
            payload,
        } => {
            let payload_json = read_payload(&payload)?;
            let delivery_id = match id {
                Some(id) => id,
                None => super::random_id("a delivery id")?,
            };
            let result = client
                .publish_event(v1::PublishEventRequest {
                    project,
                    delivery_id,
                    event_type,
                    repository,
                    payload_json,
                })
                .await?
                .into_inner();
            if output == Output::Json {
                outln!(
                    "{}",
                    json!({"source": result.source, "delivery_id": result.delivery_id,
                           "fleet_ids": result.fleet_ids, "duplicate": result.duplicate,
                           "rules_evaluated": result.rules_evaluated,
                           "rules": outcomes_json(&result.rules)})
                );
            } else {
                outln!(
                    "event {} ({} rules evaluated): {}{}",
                    result.delivery_id,
                    result.rules_evaluated,
                    if result.fleet_ids.is_empty() {
                        "no fleet started".to_owned()
                    } else {
                        format!("started {}", result.fleet_ids.join(" "))
                    },
                    if result.duplicate {
                        " (earlier, same delivery id)"
                    } else {
                        ""
                    }
                );
                for rule in result.rules.iter().filter(|rule| rule.fleet_id.is_empty()) {
                    outln!(
                        "  rule {}: {}",
                        rule.rule_id,
                        super::terminal::printable(&rule.reason)
                    );
                }
            }
        }
        EventCommands::Deliveries { project, count } => {
            let response = client
                .list_deliveries(v1::ListDeliveriesRequest {
                    project,
                    page_size: count,
                })
                .await?
                .into_inner();
            if output == Output::Json {
                let listed: Vec<_> = response.deliveries.iter().map(delivery_json).collect();
                outln!(
                    "{}",
                    json!({"deliveries": listed, "dropped": response.dropped})
                );
            } else {
                outln!(
                    "{:>15} {:<12} {:<36} {:<6} {:<24} FLEETS / VERDICT",
                    "RECEIVED_MS",
                    "SOURCE",
                    "DELIVERY_ID",
                    "STATUS",
                    "TYPE"
                );
                for delivery in &response.deliveries {
                    let fleets: Vec<&str> = delivery
                        .rules
                        .iter()
                        .filter(|rule| !rule.fleet_id.is_empty())
                        .map(|rule| rule.fleet_id.as_str())
                        .collect();
                    let detail = if delivery.refused {
                        delivery.verdict.clone()
                    } else if fleets.is_empty() {
                        format!("none ({} rules evaluated)", delivery.rules_evaluated)
                    } else {
                        fleets.join(" ")
                    };
                    outln!(
                        "{:>15} {:<12} {:<36} {:<6} {:<24} {}",
                        delivery.last_received_ms,
                        super::terminal::printable(&delivery.source),
                        super::terminal::printable(&delivery.delivery_id),
                        delivery.http_status,
                        super::terminal::printable(&delivery.event_type),
                        super::terminal::printable(&detail)
                    );
                }
            }
        }
    }
    Ok(exit_code::OK)
}
