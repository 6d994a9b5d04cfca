//! Deliveries: what a `DeliverEvent` command carries, and the bounded record the state keeps.

use serde::{Deserialize, Serialize};

use crate::spec::FleetSpec;

/// Deliveries kept by default: 7 days (GitHub lets a delivery be redelivered for 3 days).
pub const DEFAULT_DELIVERY_RETENTION_MS: u64 = 7 * 24 * 3_600_000;
/// Most delivery records kept by default; the oldest go first.
pub const DEFAULT_MAX_DELIVERIES: u32 = 100_000;
/// Longest delivery id, bytes.
pub const MAX_DELIVERY_ID_BYTES: usize = 256;
/// Longest event type, bytes.
pub const MAX_EVENT_TYPE_BYTES: usize = 256;
/// Longest repository the sender names, bytes.
pub const MAX_EVENT_REPOSITORY_BYTES: usize = 2048;
/// Longest verdict text, bytes.
pub const MAX_VERDICT_BYTES: usize = 512;

/// What identifies and describes one delivery (the payload itself is not kept: its digest and
/// size are).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryHeader {
    /// The project whose rules saw it (the webhook source's, or the API caller's).
    pub project: String,
    /// The webhook source's name, or `api`.
    pub source: String,
    /// The sender's delivery id (`X-GitHub-Delivery`, `webhook-id`, ...).
    pub delivery_id: String,
    /// The event type.
    pub event_type: String,
    /// The repository the sender names, or empty.
    pub repository: String,
    /// SHA-256 of the body, lower-case hex.
    pub payload_sha256: String,
    /// Size of the body, bytes.
    pub payload_bytes: u64,
    /// How the sender was verified (`github: X-Hub-Signature-256 valid`, `token:...`).
    pub verdict: String,
}

impl DeliveryHeader {
    /// The dedup key: `<source>/<delivery id>` (a source belongs to one project).
    pub fn key(&self) -> String {
        format!("{}/{}", self.source, self.delivery_id)
    }

    /// Checks the bounds of every field.
    ///
    /// # Errors
    /// The first field out of bounds, named.
    pub fn validate(&self) -> Result<(), String> {
        if !crate::spec::is_valid_name(&self.project) {
            return Err("project: must be 1-64 characters of [A-Za-z0-9._-]".into());
        }
        if !crate::spec::is_valid_name(&self.source) {
            return Err("source: must be 1-64 characters of [A-Za-z0-9._-]".into());
        }
        let printable = |text: &str| text.chars().all(|c| !c.is_control());
        if self.delivery_id.is_empty()
            || self.delivery_id.len() > MAX_DELIVERY_ID_BYTES
            || !printable(&self.delivery_id)
        {
            return Err(format!(
                "delivery_id: must be 1-{MAX_DELIVERY_ID_BYTES} bytes without control characters"
            ));
        }
        if self.event_type.is_empty()
            || self.event_type.len() > MAX_EVENT_TYPE_BYTES
            || !printable(&self.event_type)
        {
            return Err(format!(
                "event_type: must be 1-{MAX_EVENT_TYPE_BYTES} bytes without control characters"
            ));
        }
        if self.repository.len() > MAX_EVENT_REPOSITORY_BYTES {
            return Err(format!(
                "repository: longer than {MAX_EVENT_REPOSITORY_BYTES} bytes"
            ));
        }
        if self.verdict.len() > MAX_VERDICT_BYTES {
            return Err(format!("verdict: longer than {MAX_VERDICT_BYTES} bytes"));
        }
        Ok(())
    }
}

/// What one rule made of the event, as the leader evaluated it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuleResult {
    /// Start this fleet (validated and checked against the policy by the leader).
    Fleet(Box<FleetSpec>),
    /// The rule matched but its fleet could not be made (an expression failed, the fleet
    /// was invalid or outside the policy).
    Error(String),
}

/// One rule's result in a delivery command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleMatch {
    /// `<project>/<name>`.
    pub rule_id: String,
    /// What it made of the event.
    pub result: RuleResult,
}

/// What became of one matched rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchOutcome {
    /// Its fleet.
    Started {
        /// `fl-<n>`.
        fleet_id: String,
    },
    /// Why none.
    Refused {
        /// The reason.
        reason: String,
    },
}

/// The record of one delivery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// As first accepted (a redelivery's header replaces it while no fleet was started).
    pub header: DeliveryHeader,
    /// Replicated time of the first receipt, ms.
    pub first_received_ms: u64,
    /// Replicated time of the latest receipt, ms.
    pub last_received_ms: u64,
    /// How many times it was received and accepted (1 + redeliveries).
    pub receipts: u32,
    /// Each matched rule's outcome, from the receipt that decided them.
    pub matches: Vec<(String, MatchOutcome)>,
    /// Rules of the project that saw the event (for "none matched").
    pub rules_evaluated: u32,
}

impl Delivery {
    /// The fleets the delivery started.
    pub fn fleet_ids(&self) -> Vec<String> {
        self.matches
            .iter()
            .filter_map(|(_, outcome)| match outcome {
                MatchOutcome::Started { fleet_id } => Some(fleet_id.clone()),
                MatchOutcome::Refused { .. } => None,
            })
            .collect()
    }
}

/// The fleet idempotency key of rule `rule_id` for delivery `key`: `event:<key>#<rule id>`.
pub fn fleet_key(delivery_key: &str, rule_id: &str) -> String {
    format!("event:{delivery_key}#{rule_id}")
}
