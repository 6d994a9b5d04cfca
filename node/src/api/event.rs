//! `flotilla.v1.EventService` and the webhook endpoint's decisions: event rules, deliveries
//! from webhooks (`POST /hooks/<source>`, verified by [`crate::http::hooks`]) and from the API
//! (`PublishEvent`, `POST /events`), and their records.
//!
//! A delivery is decided by the leader: after a linearizable read barrier (so every rule
//! acknowledged before is seen) it evaluates the project's rules
//! ([`flotilla_scheduler::event::rule`], in a blocking thread), checks each fleet as
//! `SubmitFleet` would (limits, execution policy), and proposes one `DeliverEvent` entry. The
//! webhook's 2xx is sent only after that entry is applied. A follower passes a webhook
//! request whole to the leader (`ForwardHook`, node identity), which verifies it again; an API
//! event is forwarded like any RPC.
//!
//! Refused webhook requests (bad signature, malformed, oversized) are never written to the
//! log, so an unauthenticated sender cannot fill it: this node remembers the newest
//! `webhooks.max_refused_remembered` of them in memory and counts them in
//! `flotilla_webhook_deliveries_total{source, status}`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use flotilla_proto::v1::event_service_client::EventServiceClient;
use flotilla_proto::v1::event_service_server::EventService;
use flotilla_proto::v1::{self};
use flotilla_scheduler::event::EventRule;
use flotilla_scheduler::event::delivery::{
    Delivery, DeliveryHeader, MatchOutcome, RuleMatch, RuleResult,
};
use flotilla_scheduler::event::rule::{EventRuleSpec, EventView};
use flotilla_scheduler::{Command, FieldError, Permission, Response};
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use tracing::info;

use super::auth::{Caller, authorization, caller, forwarded};
use super::{Api, Proposal, invalid};
use crate::config::WebhooksSection;
use crate::convert;
use crate::http::hooks::{HookSources, Refusal};

/// The source name of events published through the API.
pub const API_SOURCE: &str = "api";
/// Deliveries listed when the request says 0.
pub const DEFAULT_DELIVERIES_PAGE: usize = 100;
/// Most deliveries one list returns.
pub const MAX_DELIVERIES_PAGE: usize = 1000;

/// The event service over the shared [`Api`].
#[derive(Clone)]
pub struct EventApi {
    api: Api,
    sources: Arc<HookSources>,
    settings: Arc<WebhooksSection>,
    refused: Arc<Mutex<VecDeque<v1::Delivery>>>,
}

/// An HTTP answer: status and JSON body.
pub struct HookAnswer {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body.
    pub body: String,
}

fn answer(status: u16, body: serde_json::Value) -> HookAnswer {
    HookAnswer {
        status,
        body: body.to_string(),
    }
}

fn error_answer(status: u16, message: &str) -> HookAnswer {
    answer(status, serde_json::json!({ "error": message }))
}

/// The HTTP status of a gRPC status.
fn http_status(status: &Status) -> u16 {
    match status.code() {
        tonic::Code::InvalidArgument => 400,
        tonic::Code::Unauthenticated => 401,
        tonic::Code::PermissionDenied => 403,
        tonic::Code::NotFound => 404,
        tonic::Code::AlreadyExists => 409,
        tonic::Code::ResourceExhausted => 429,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => 503,
        _ => 500,
    }
}

fn result_json(result: &v1::DeliveryResult) -> serde_json::Value {
    serde_json::json!({
        "source": result.source, "delivery_id": result.delivery_id,
        "fleet_ids": result.fleet_ids, "duplicate": result.duplicate,
        "rules_evaluated": result.rules_evaluated,
        "rules": result.rules.iter().map(|rule| serde_json::json!({
            "rule_id": rule.rule_id, "fleet_id": rule.fleet_id, "reason": rule.reason,
        })).collect::<Vec<_>>(),
    })
}

fn outcomes_to_wire(matches: &[(String, MatchOutcome)]) -> Vec<v1::RuleOutcome> {
    matches
        .iter()
        .map(|(rule_id, outcome)| match outcome {
            MatchOutcome::Started { fleet_id } => v1::RuleOutcome {
                rule_id: rule_id.clone(),
                fleet_id: fleet_id.clone(),
                reason: String::new(),
            },
            MatchOutcome::Refused { reason } => v1::RuleOutcome {
                rule_id: rule_id.clone(),
                fleet_id: String::new(),
                reason: reason.clone(),
            },
        })
        .collect()
}

fn delivery_to_wire(delivery: &Delivery) -> v1::Delivery {
    let header = &delivery.header;
    v1::Delivery {
        project: header.project.clone(),
        source: header.source.clone(),
        delivery_id: header.delivery_id.clone(),
        event_type: header.event_type.clone(),
        repository: header.repository.clone(),
        payload_sha256: header.payload_sha256.clone(),
        payload_bytes: header.payload_bytes,
        verdict: header.verdict.clone(),
        first_received_ms: delivery.first_received_ms,
        last_received_ms: delivery.last_received_ms,
        receipts: delivery.receipts,
        rules: outcomes_to_wire(&delivery.matches),
        rules_evaluated: delivery.rules_evaluated,
        refused: false,
        http_status: 200,
    }
}

fn rule_spec_from_wire(
    spec: Option<v1::EventRuleSpec>,
    api: &Api,
) -> Result<EventRuleSpec, Status> {
    let spec = spec.ok_or_else(|| invalid(FieldError::new("spec", "is required")))?;
    let fleet =
        convert::fleet_template_from_wire(spec.fleet, &api.spec_limits).map_err(|error| {
            invalid(FieldError::new(
                error.field.replacen("spec", "spec.fleet", 1),
                error.message,
            ))
        })?;
    let converted = EventRuleSpec {
        name: spec.name,
        source: spec.source,
        filter: spec.filter,
        repositories: spec.repositories,
        params: spec.params.into_iter().collect(),
        fleet,
    };
    converted.compile("spec").map_err(invalid)?;
    // The template as a fleet: its targets stand in when an expression selects them.
    let mut template = converted.fleet.clone();
    if template.repositories.is_empty() {
        template.repositories = vec!["file:///flotilla-rule-template".into()];
    }
    template
        .validate("spec.fleet", &api.spec_limits)
        .map_err(invalid)?;
    api.policy
        .check_sandbox(&template.sandbox, "spec.fleet.sandbox")
        .map_err(|error| Status::permission_denied(error.to_string()))?;
    for (index, url) in converted.fleet.repositories.iter().enumerate() {
        api.policy.check_repository(url).map_err(|message| {
            Status::permission_denied(format!("spec.fleet.repositories[{index}]: {message}"))
        })?;
    }
    let staged = flotilla_scheduler::staging::staged_bytes(&converted.fleet.repositories);
    if staged > api.limits.max_submission_part_bytes as u64 {
        return Err(invalid(FieldError::new(
            "spec.fleet.repositories",
            format!(
                "{staged} bytes; a rule's fleet holds at most limits.max_submission_part_bytes ({})",
                api.limits.max_submission_part_bytes
            ),
        )));
    }
    Ok(converted)
}

fn rule_spec_to_wire(spec: &EventRuleSpec) -> v1::EventRuleSpec {
    v1::EventRuleSpec {
        name: spec.name.clone(),
        source: spec.source.clone(),
        filter: spec.filter.clone(),
        repositories: spec.repositories.clone(),
        params: spec.params.clone().into_iter().collect(),
        fleet: Some(convert::fleet_spec_to_wire(&spec.fleet)),
    }
}

fn rule_to_wire(rule: &EventRule) -> v1::EventRule {
    v1::EventRule {
        id: rule.id.clone(),
        spec: Some(rule_spec_to_wire(&rule.spec)),
        created_at_ms: rule.created_at_ms,
        created_by: rule.created_by.clone(),
    }
}

fn unexpected(response: Response) -> Status {
    Status::internal(format!("unexpected response {response:?}"))
}

/// What a delivery came to on this node.
enum Delivered {
    /// Applied here (the leader).
    Applied(v1::DeliveryResult),
    /// This node is not the leader: the leader's channel.
    Forward(Channel),
}

impl EventApi {
    /// The service over `api`, with this node's webhook sources.
    pub fn new(api: Api, sources: HookSources, settings: WebhooksSection) -> Self {
        EventApi {
            api,
            sources: Arc::new(sources),
            settings: Arc::new(settings),
            refused: Arc::new(Mutex::new(VecDeque::new())),
        }
    }

    fn client(&self, channel: Channel) -> EventServiceClient<Channel> {
        EventServiceClient::new(channel)
            .max_decoding_message_size(self.api.limits.max_request_bytes)
            .max_encoding_message_size(self.api.limits.max_request_bytes)
    }

    /// Largest webhook body, bytes (`webhooks.max_body_bytes`).
    pub fn max_body_bytes(&self) -> usize {
        self.settings.max_body_bytes
    }

    /// Remembers a refused webhook request (in memory, bounded) and counts it; `claimed_id`
    /// is the delivery id its headers claim (unverified), or empty.
    pub fn record_refused(&self, source: &str, claimed_id: &str, refusal: &Refusal, body: &[u8]) {
        // Only configured sources: a path the sender made up must not grow the metric's labels.
        let Some(configured) = self.sources.get(source) else {
            return;
        };
        metrics::counter!("flotilla_webhook_deliveries_total", "source" => source.to_owned(),
            "status" => refusal.status.to_string())
        .increment(1);
        // Debug, not warn: an unauthenticated sender must not be able to flood the log.
        tracing::debug!(webhook.source = %source, status = refusal.status,
                        reason = %refusal.reason, "webhook delivery refused");
        let limit = self.settings.max_refused_remembered;
        if limit == 0 {
            return;
        }
        let now_ms = self.api.replicated_now_ms();
        let project = configured.project.clone();
        let record = v1::Delivery {
            project,
            source: source.chars().take(64).collect(),
            delivery_id: claimed_id
                .chars()
                .filter(|c| !c.is_control())
                .take(flotilla_scheduler::event::delivery::MAX_DELIVERY_ID_BYTES / 4)
                .collect(),
            verdict: refusal.reason.chars().take(512).collect(),
            payload_sha256: hex_sha256(body),
            payload_bytes: body.len() as u64,
            first_received_ms: now_ms,
            last_received_ms: now_ms,
            receipts: 1,
            refused: true,
            http_status: u32::from(refusal.status),
            ..Default::default()
        };
        let mut refused = self
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while refused.len() >= limit {
            refused.pop_front();
        }
        refused.push_back(record);
    }

    /// Decides one webhook request to `source_name` (module documentation). `forwarded`: it
    /// came from a follower, so it is not passed on again.
    pub async fn accept_hook(
        &self,
        source_name: &str,
        headers: BTreeMap<String, String>,
        body: &[u8],
        forwarded: bool,
    ) -> HookAnswer {
        let claimed_id = crate::http::hooks::claimed_delivery_id(&headers);
        let Some(source) = self.sources.get(source_name) else {
            return error_answer(
                404,
                &format!("no webhook source {source_name:?} (webhooks.sources)"),
            );
        };
        if body.len() > self.settings.max_body_bytes {
            let refusal = Refusal {
                status: 413,
                reason: format!(
                    "body: {} bytes, more than webhooks.max_body_bytes ({})",
                    body.len(),
                    self.settings.max_body_bytes
                ),
            };
            self.record_refused(source_name, claimed_id, &refusal, &[]);
            return error_answer(413, &refusal.reason);
        }
        let now_ms = self.api.clock.wall_now_ms();
        let verified = match crate::http::hooks::verify(
            source,
            &headers,
            body,
            now_ms,
            self.settings.timestamp_tolerance_ms,
        ) {
            Ok(verified) => verified,
            Err(refusal) => {
                self.record_refused(source_name, claimed_id, &refusal, body);
                return error_answer(refusal.status, &refusal.reason);
            }
        };
        let header = DeliveryHeader {
            project: source.project.clone(),
            source: source.name.clone(),
            delivery_id: verified.delivery_id,
            event_type: verified.event_type,
            repository: verified.repository,
            payload_sha256: hex_sha256(body),
            payload_bytes: body.len() as u64,
            verdict: verified.verdict,
        };
        if let Err(reason) = header.validate() {
            let refusal = Refusal {
                status: 400,
                reason,
            };
            self.record_refused(source_name, claimed_id, &refusal, body);
            return error_answer(400, &refusal.reason);
        }
        match self.deliver(header, verified.payload).await {
            Ok(Delivered::Applied(result)) => {
                metrics::counter!("flotilla_webhook_deliveries_total",
                    "source" => source_name.to_owned(), "status" => "200")
                .increment(1);
                answer(200, result_json(&result))
            }
            Ok(Delivered::Forward(_)) if forwarded => error_answer(
                503,
                "leadership moved while the delivery was forwarded; redeliver",
            ),
            Ok(Delivered::Forward(channel)) => {
                let request = v1::ForwardHookRequest {
                    source: source_name.to_owned(),
                    headers: headers.into_iter().collect(),
                    body: body.to_vec(),
                };
                match self
                    .api
                    .forward(self.client(channel).forward_hook(request), 0)
                    .await
                {
                    Ok(response) => {
                        let response = response.into_inner();
                        HookAnswer {
                            status: u16::try_from(response.http_status).unwrap_or(500),
                            body: response.body,
                        }
                    }
                    Err(status) => error_answer(
                        503,
                        &format!("the leader did not answer: {}", status.message()),
                    ),
                }
            }
            Err(status) => error_answer(http_status(&status), status.message()),
        }
    }

    /// Publishes an API event for `who` (`PublishEvent`, `POST /events`); `Ok(None)` when
    /// this node must forward the original request to the leader (`Err` carries that channel
    /// via [`Delivered::Forward`] to the caller).
    async fn publish(
        &self,
        who: &Caller,
        request: &v1::PublishEventRequest,
    ) -> Result<Delivered, Status> {
        let project = convert::or_default(
            request.project.clone(),
            flotilla_scheduler::spec::DEFAULT_PROJECT.to_owned(),
        );
        if request.payload_json.len() > self.settings.max_body_bytes {
            return Err(invalid(FieldError::new(
                "payload_json",
                format!(
                    "{} bytes, more than webhooks.max_body_bytes ({})",
                    request.payload_json.len(),
                    self.settings.max_body_bytes
                ),
            )));
        }
        let payload: serde_json::Value = if request.payload_json.is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_slice(&request.payload_json).map_err(|error| {
                invalid(FieldError::new(
                    "payload_json",
                    format!("not JSON: {error}"),
                ))
            })?
        };
        let header = DeliveryHeader {
            project,
            source: API_SOURCE.to_owned(),
            delivery_id: request.delivery_id.clone(),
            event_type: request.event_type.clone(),
            repository: request.repository.clone(),
            payload_sha256: hex_sha256(&request.payload_json),
            payload_bytes: request.payload_json.len() as u64,
            verdict: format!("api: {}", who.principal().describe()),
        };
        header.validate().map_err(|reason| {
            let (field, message) = reason.split_once(": ").unwrap_or(("event", &reason));
            invalid(FieldError::new(field, message))
        })?;
        // After the request's own checks, which disclose nothing about projects.
        who.require(Permission::FleetSubmit, &header.project)?;
        self.deliver(header, payload).await
    }

    /// Evaluates the rules and proposes the delivery (module documentation).
    async fn deliver(
        &self,
        header: DeliveryHeader,
        payload: serde_json::Value,
    ) -> Result<Delivered, Status> {
        if let Some(channel) = self.api.read_barrier().await? {
            return Ok(Delivered::Forward(channel));
        }
        let key = header.key();
        // A delivery that started fleets is answered from the record: no evaluation.
        let rules: Vec<EventRule> = self.api.node.state.read(|state| {
            let started = state
                .deliveries()
                .get(&key)
                .is_some_and(|delivery| !delivery.fleet_ids().is_empty());
            if started {
                return Vec::new();
            }
            state
                .event_rules()
                .filter(|rule| {
                    rule.spec.fleet.project == header.project
                        && (rule.spec.source == header.source
                            || rule.spec.source == flotilla_scheduler::event::rule::ANY_SOURCE)
                })
                .cloned()
                .collect()
        });
        let rules_evaluated = rules.len() as u32;
        let evaluator = self.clone();
        let evaluated_header = header.clone();
        let matches = tokio::task::spawn_blocking(move || {
            evaluator.evaluate(&rules, &evaluated_header, &payload)
        })
        .await
        .map_err(|error| Status::internal(format!("rule evaluation failed: {error}")))?;
        let command = Command::DeliverEvent {
            header: header.clone(),
            matches,
            rules_evaluated,
            retention_ms: self.settings.delivery_retention_ms,
            max_deliveries: self.settings.max_deliveries,
            max_events: self.api.limits.max_events_per_fleet,
        };
        let principal = flotilla_scheduler::Principal::Node {
            node_id: self.api.node.node_id,
        };
        match self.api.propose(command, principal).await? {
            Proposal::Forward(channel) => Ok(Delivered::Forward(channel)),
            Proposal::Applied(Response::EventDelivered {
                fleet_ids,
                duplicate,
            }) => {
                info!(delivery.key = %key, fleets = ?fleet_ids, duplicate, "delivery accepted");
                let (rules, rules_evaluated) = self.api.node.state.read(|state| {
                    state
                        .deliveries()
                        .get(&key)
                        .map_or((Vec::new(), 0), |delivery| {
                            (
                                outcomes_to_wire(&delivery.matches),
                                delivery.rules_evaluated,
                            )
                        })
                });
                Ok(Delivered::Applied(v1::DeliveryResult {
                    source: header.source,
                    delivery_id: header.delivery_id,
                    fleet_ids,
                    duplicate,
                    rules,
                    rules_evaluated,
                }))
            }
            Proposal::Applied(Response::Rejected { reason }) => {
                Err(Status::invalid_argument(reason))
            }
            Proposal::Applied(other) => Err(unexpected(other)),
        }
    }

    /// Each rule's fleet for the event, checked as `SubmitFleet` checks a fleet; rules whose
    /// filter is false are left out. All fleets together stay within one log entry's part
    /// (`limits.max_submission_part_bytes`).
    fn evaluate(
        &self,
        rules: &[EventRule],
        header: &DeliveryHeader,
        payload: &serde_json::Value,
    ) -> Vec<RuleMatch> {
        let event = EventView {
            source: &header.source,
            event_type: &header.event_type,
            delivery_id: &header.delivery_id,
            repository: &header.repository,
            payload,
        };
        let mut budget = self.api.limits.max_submission_part_bytes as u64;
        let mut matches = Vec::new();
        for rule in rules {
            let result = rule
                .spec
                .compile("rule")
                .map_err(|error| error.to_string())
                .and_then(|compiled| compiled.evaluate(&rule.spec, &event));
            let result = match result {
                Ok(None) => continue,
                Err(reason) => RuleResult::Error(reason),
                Ok(Some(fleet)) => match self.check_fleet(&fleet, &mut budget) {
                    Ok(()) => RuleResult::Fleet(Box::new(fleet)),
                    Err(reason) => RuleResult::Error(reason),
                },
            };
            matches.push(RuleMatch {
                rule_id: rule.id.clone(),
                result,
            });
        }
        matches
    }

    fn check_fleet(
        &self,
        fleet: &flotilla_scheduler::FleetSpec,
        budget: &mut u64,
    ) -> Result<(), String> {
        fleet
            .validate("fleet", &self.api.spec_limits)
            .map_err(|error| error.to_string())?;
        self.api
            .policy
            .check(fleet, "fleet")
            .map_err(|error| error.to_string())?;
        let bytes = flotilla_scheduler::staging::staged_bytes(&fleet.repositories);
        if bytes > *budget {
            return Err(format!(
                "fleet.repositories: {bytes} bytes; one delivery's fleets hold at most limits.max_submission_part_bytes ({}) in all",
                self.api.limits.max_submission_part_bytes
            ));
        }
        *budget -= bytes;
        Ok(())
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Answers `POST /events` (bearer token in `authorization`; body: `PublishEventRequest` as
/// JSON, its `payload` any JSON value).
pub async fn publish_http(
    events: &EventApi,
    auth: &super::auth::AuthLayer,
    headers: &http::HeaderMap,
    body: &[u8],
) -> HookAnswer {
    let who = match auth.check("/flotilla.v1.EventService/PublishEvent", headers, None) {
        Ok(Some(who)) => who,
        Ok(None) => return error_answer(401, "a bearer token is required"),
        Err(status) => return error_answer(http_status(&status), status.message()),
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        project: Option<String>,
        delivery_id: String,
        event_type: String,
        #[serde(default)]
        repository: String,
        #[serde(default)]
        payload: serde_json::Value,
    }
    let parsed: Body = match serde_json::from_slice(body) {
        Ok(parsed) => parsed,
        Err(error) => return error_answer(400, &format!("body: {error}")),
    };
    let request = v1::PublishEventRequest {
        project: parsed
            .project
            .unwrap_or_else(|| flotilla_scheduler::spec::DEFAULT_PROJECT.to_owned()),
        delivery_id: parsed.delivery_id,
        event_type: parsed.event_type,
        repository: parsed.repository,
        payload_json: if parsed.payload.is_null() {
            Vec::new()
        } else {
            parsed.payload.to_string().into_bytes()
        },
    };
    match events.publish(&who, &request).await {
        Ok(Delivered::Applied(result)) => answer(200, result_json(&result)),
        Ok(Delivered::Forward(channel)) => {
            let authorization = headers
                .get(http::header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok());
            let mut client = events.client(channel);
            let call = client.publish_event(forwarded(request, &authorization));
            match events.api.forward(call, 0).await {
                Ok(response) => answer(200, result_json(&response.into_inner())),
                Err(status) => error_answer(http_status(&status), status.message()),
            }
        }
        Err(status) => error_answer(http_status(&status), status.message()),
    }
}

#[tonic::async_trait]
impl EventService for EventApi {
    async fn create_event_rule(
        &self,
        request: GrpcRequest<v1::CreateEventRuleRequest>,
    ) -> Result<GrpcResponse<v1::CreateEventRuleResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        let spec = rule_spec_from_wire(original.spec.clone(), &self.api)?;
        let project = spec.fleet.project.clone();
        who.require(Permission::ProjectSettings, &project)?;
        who.require(Permission::FleetSubmit, &project)?;
        let command = Command::CreateEventRule {
            spec,
            max_rules: self.api.limits.max_event_rules,
        };
        match self.api.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.api
                    .forward(
                        self.client(channel)
                            .create_event_rule(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
            Proposal::Applied(Response::EventRuleCreated { rule_id, created }) => {
                info!(rule.id = %rule_id, created, "event rule created");
                let rule = self
                    .api
                    .node
                    .state
                    .read(|state| state.event_rule(&rule_id).map(rule_to_wire));
                Ok(GrpcResponse::new(v1::CreateEventRuleResponse {
                    rule,
                    created,
                }))
            }
            Proposal::Applied(Response::Rejected { reason }) if reason.contains("exists") => {
                Err(Status::already_exists(reason))
            }
            Proposal::Applied(Response::Rejected { reason })
                if reason.contains("rules already") =>
            {
                Err(Status::resource_exhausted(reason))
            }
            Proposal::Applied(Response::Rejected { reason }) => {
                Err(Status::invalid_argument(reason))
            }
            Proposal::Applied(other) => Err(unexpected(other)),
        }
    }

    async fn list_event_rules(
        &self,
        request: GrpcRequest<v1::ListEventRulesRequest>,
    ) -> Result<GrpcResponse<v1::ListEventRulesResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        if let Some(channel) = self.api.read_barrier().await? {
            return self
                .api
                .forward(
                    self.client(channel)
                        .list_event_rules(forwarded(original, &auth)),
                    0,
                )
                .await;
        }
        let rules = self.api.node.state.read(|state| {
            state
                .event_rules()
                .filter(|rule| {
                    let project = &rule.spec.fleet.project;
                    (original.project.is_empty() || *project == original.project)
                        && who.may(Permission::FleetRead, project)
                })
                .map(rule_to_wire)
                .collect()
        });
        Ok(GrpcResponse::new(v1::ListEventRulesResponse { rules }))
    }

    async fn delete_event_rule(
        &self,
        request: GrpcRequest<v1::DeleteEventRuleRequest>,
    ) -> Result<GrpcResponse<v1::DeleteEventRuleResponse>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        let project = self.api.node.state.read(|state| {
            state
                .event_rule(&original.rule_id)
                .map(|rule| rule.spec.fleet.project.clone())
        });
        match project {
            Some(project) if who.may(Permission::ProjectSettings, &project) => {}
            _ => return Err(Status::not_found(format!("no rule {}", original.rule_id))),
        }
        let command = Command::DeleteEventRule {
            rule_id: original.rule_id.clone(),
        };
        match self.api.propose(command, who.principal()).await? {
            Proposal::Forward(channel) => {
                self.api
                    .forward(
                        self.client(channel)
                            .delete_event_rule(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
            Proposal::Applied(Response::EventRuleDeleted { existed }) => {
                Ok(GrpcResponse::new(v1::DeleteEventRuleResponse { existed }))
            }
            Proposal::Applied(other) => Err(unexpected(other)),
        }
    }

    async fn publish_event(
        &self,
        request: GrpcRequest<v1::PublishEventRequest>,
    ) -> Result<GrpcResponse<v1::DeliveryResult>, Status> {
        let who = caller(&request)?;
        let auth = authorization(&request);
        let original = request.into_inner();
        match self.publish(&who, &original).await? {
            Delivered::Applied(result) => Ok(GrpcResponse::new(result)),
            Delivered::Forward(channel) => {
                self.api
                    .forward(
                        self.client(channel)
                            .publish_event(forwarded(original, &auth)),
                        0,
                    )
                    .await
            }
        }
    }

    async fn list_deliveries(
        &self,
        request: GrpcRequest<v1::ListDeliveriesRequest>,
    ) -> Result<GrpcResponse<v1::ListDeliveriesResponse>, Status> {
        let who = caller(&request)?;
        let original = request.into_inner();
        let page = convert::page_size(
            original.page_size,
            DEFAULT_DELIVERIES_PAGE,
            MAX_DELIVERIES_PAGE,
        )
        .map_err(|error| invalid(FieldError::new("page_size", error.message)))?;
        let visible = |project: &str| {
            (original.project.is_empty() || project == original.project)
                && who.may(Permission::FleetRead, project)
        };
        // This node's replica: deliveries lag the leader's by the replication delay.
        let (mut deliveries, dropped) = self.api.node.state.read(|state| {
            (
                state
                    .deliveries()
                    .newest_first()
                    .filter(|delivery| visible(&delivery.header.project))
                    .take(page)
                    .map(delivery_to_wire)
                    .collect::<Vec<_>>(),
                state.deliveries().dropped(),
            )
        });
        let refused = self
            .refused
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        deliveries.extend(
            refused
                .iter()
                .rev()
                .filter(|delivery| visible(&delivery.project))
                .take(page)
                .cloned(),
        );
        deliveries.sort_by_key(|delivery| std::cmp::Reverse(delivery.last_received_ms));
        deliveries.truncate(page);
        Ok(GrpcResponse::new(v1::ListDeliveriesResponse {
            deliveries,
            dropped,
        }))
    }

    async fn forward_hook(
        &self,
        request: GrpcRequest<v1::ForwardHookRequest>,
    ) -> Result<GrpcResponse<v1::ForwardHookResponse>, Status> {
        let request = request.into_inner();
        let headers = request.headers.into_iter().collect();
        let answer = self
            .accept_hook(&request.source, headers, &request.body, true)
            .await;
        Ok(GrpcResponse::new(v1::ForwardHookResponse {
            http_status: u32::from(answer.status),
            body: answer.body,
        }))
    }
}
