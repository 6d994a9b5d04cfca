//! The event commands applied to [`State`]: rules, and deliveries that start fleets.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::delivery::{Delivery, DeliveryHeader, MatchOutcome, RuleMatch, RuleResult, fleet_key};
use super::rule::EventRuleSpec;
use crate::command::Response;
use crate::state::State;
use crate::token::Principal;

/// Most records one delivery drops for retention (the rest go with later deliveries).
const MAX_PRUNED_PER_DELIVERY: usize = 1_000;

/// A rule in the replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRule {
    /// `<project>/<name>`.
    pub id: String,
    /// As submitted.
    pub spec: Arc<EventRuleSpec>,
    /// Replicated time of creation, ms.
    pub created_at_ms: u64,
    /// Who created it.
    pub created_by: String,
}

/// The delivery records, by key and in order of first receipt; persistent (`imbl`), so a copy
/// of the state for a snapshot does not copy 100,000 records.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deliveries {
    by_key: imbl::OrdMap<String, Delivery>,
    /// `(first_received_ms, key)`, oldest first.
    order: imbl::Vector<(u64, String)>,
    /// Records dropped by retention so far.
    dropped: u64,
}

impl Deliveries {
    /// The record of `key` (`<source>/<delivery id>`).
    pub fn get(&self, key: &str) -> Option<&Delivery> {
        self.by_key.get(key)
    }

    /// Records, newest first.
    pub fn newest_first(&self) -> impl Iterator<Item = &Delivery> {
        self.order
            .iter()
            .rev()
            .filter_map(|(_, key)| self.by_key.get(key))
    }

    /// Records kept.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Records dropped by retention so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Drops records first received before `now_ms - retention_ms`, and the oldest beyond
    /// `max_records` (room for one more), at most [`MAX_PRUNED_PER_DELIVERY`].
    fn prune(&mut self, now_ms: u64, retention_ms: u64, max_records: u32) {
        let cutoff_ms = now_ms.saturating_sub(retention_ms);
        for _ in 0..MAX_PRUNED_PER_DELIVERY {
            let Some((first_ms, _)) = self.order.front() else {
                return;
            };
            if *first_ms >= cutoff_ms && self.order.len() < max_records as usize {
                return;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.by_key.remove(&key);
                self.dropped += 1;
            }
        }
    }

    /// The invariants: one order entry per record, each at the record's first receipt.
    ///
    /// # Errors
    /// The first that does not hold.
    pub fn check_invariants(&self) -> Result<(), String> {
        if self.order.len() != self.by_key.len() {
            return Err(format!(
                "{} delivery records but {} in order",
                self.by_key.len(),
                self.order.len()
            ));
        }
        for (first_ms, key) in &self.order {
            match self.by_key.get(key) {
                Some(delivery) if delivery.first_received_ms == *first_ms => {}
                _ => return Err(format!("delivery {key} out of order or missing")),
            }
        }
        Ok(())
    }
}

fn rejected(reason: impl Into<String>) -> Response {
    Response::Rejected {
        reason: reason.into(),
    }
}

impl State {
    /// The rule `id`, if there is one.
    pub fn event_rule(&self, id: &str) -> Option<&EventRule> {
        self.event_rules.get(id)
    }

    /// Every rule, by id.
    pub fn event_rules(&self) -> impl Iterator<Item = &EventRule> {
        self.event_rules.values()
    }

    /// The delivery records.
    pub fn deliveries(&self) -> &Deliveries {
        &self.deliveries
    }

    pub(crate) fn create_event_rule(
        &mut self,
        now_ms: u64,
        spec: &EventRuleSpec,
        max_rules: u32,
        principal: &Principal,
    ) -> Response {
        if let Err(error) = spec.compile("rule") {
            return rejected(error.to_string());
        }
        let id = spec.id();
        if let Some(existing) = self.event_rules.get(&id) {
            return if *existing.spec == *spec {
                Response::EventRuleCreated {
                    rule_id: id,
                    created: false,
                }
            } else {
                rejected(format!("rule {id} exists with another spec"))
            };
        }
        if self.event_rules.len() >= max_rules as usize {
            return rejected(format!(
                "the cluster holds {max_rules} event rules already (limits.max_event_rules)"
            ));
        }
        self.event_rules.insert(
            id.clone(),
            EventRule {
                id: id.clone(),
                spec: Arc::new(spec.clone()),
                created_at_ms: now_ms,
                created_by: principal.describe(),
            },
        );
        Response::EventRuleCreated {
            rule_id: id,
            created: true,
        }
    }

    pub(crate) fn delete_event_rule(&mut self, id: &str) -> Response {
        Response::EventRuleDeleted {
            existed: self.event_rules.remove(id).is_some(),
        }
    }

    /// Records the delivery `header` and starts the fleets of `matches` (module documentation
    /// of [`super`]: one fleet set per delivery).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn deliver_event(
        &mut self,
        now_ms: u64,
        header: &DeliveryHeader,
        matches: &[RuleMatch],
        rules_evaluated: u32,
        retention: (u64, u32),
        max_events: u32,
        principal: &Principal,
    ) -> Response {
        if let Err(reason) = header.validate() {
            return rejected(reason);
        }
        let key = header.key();
        let (retention_ms, max_records) = retention;
        self.deliveries.prune(now_ms, retention_ms, max_records);
        if let Some(existing) = self.deliveries.by_key.get_mut(&key) {
            let fleet_ids = existing.fleet_ids();
            if !fleet_ids.is_empty() {
                existing.receipts = existing.receipts.saturating_add(1);
                existing.last_received_ms = now_ms;
                return Response::EventDelivered {
                    fleet_ids,
                    duplicate: true,
                };
            }
        }
        let outcomes: Vec<(String, MatchOutcome)> = matches
            .iter()
            .map(|matched| {
                let outcome =
                    self.start_rule_fleet(now_ms, header, &key, matched, max_events, principal);
                (matched.rule_id.clone(), outcome)
            })
            .collect();
        let delivery = match self.deliveries.by_key.get(&key) {
            Some(existing) => Delivery {
                header: header.clone(),
                first_received_ms: existing.first_received_ms,
                last_received_ms: now_ms,
                receipts: existing.receipts.saturating_add(1),
                matches: outcomes,
                rules_evaluated,
            },
            None => {
                self.deliveries.order.push_back((now_ms, key.clone()));
                Delivery {
                    header: header.clone(),
                    first_received_ms: now_ms,
                    last_received_ms: now_ms,
                    receipts: 1,
                    matches: outcomes,
                    rules_evaluated,
                }
            }
        };
        let fleet_ids = delivery.fleet_ids();
        self.deliveries.by_key.insert(key, delivery);
        Response::EventDelivered {
            fleet_ids,
            duplicate: false,
        }
    }

    /// Rules stored under their spec's id; delivery records in order; every fleet a delivery
    /// started carries that delivery's and rule's key (unless compacted), and no fleet belongs
    /// to two deliveries.
    pub(crate) fn check_event_invariants(&self) -> Result<(), String> {
        for (id, rule) in &self.event_rules {
            if *id != rule.spec.id() || rule.id != *id {
                return Err(format!("rule {id} stored under another id than its spec's"));
            }
        }
        self.deliveries.check_invariants()?;
        let mut seen = std::collections::BTreeSet::new();
        for (key, delivery) in &self.deliveries.by_key {
            for (rule_id, outcome) in &delivery.matches {
                let MatchOutcome::Started { fleet_id } = outcome else {
                    continue;
                };
                if !seen.insert(fleet_id.clone()) {
                    return Err(format!("{fleet_id} started by two deliveries or rules"));
                }
                if let Some(fleet) = self.fleet(fleet_id)
                    && fleet.idempotency_key != fleet_key(key, rule_id)
                {
                    return Err(format!(
                        "delivery {key} names {fleet_id}, which carries key {:?}",
                        fleet.idempotency_key
                    ));
                }
            }
        }
        Ok(())
    }

    fn start_rule_fleet(
        &mut self,
        now_ms: u64,
        header: &DeliveryHeader,
        key: &str,
        matched: &RuleMatch,
        max_events: u32,
        principal: &Principal,
    ) -> MatchOutcome {
        let spec = match &matched.result {
            RuleResult::Error(reason) => {
                return MatchOutcome::Refused {
                    reason: reason.clone(),
                };
            }
            RuleResult::Fleet(spec) => spec,
        };
        if spec.project != header.project {
            return MatchOutcome::Refused {
                reason: format!(
                    "the fleet's project {} is not the delivery's ({})",
                    spec.project, header.project
                ),
            };
        }
        let idempotency_key = fleet_key(key, &matched.rule_id);
        match self.submit_fleet(now_ms, spec, &idempotency_key, "", max_events, principal) {
            Response::FleetSubmitted { fleet_id, .. } => MatchOutcome::Started { fleet_id },
            Response::Rejected { reason } | Response::QueueFull { reason } => {
                MatchOutcome::Refused { reason }
            }
            Response::IdempotencyKeyConflict { fleet_id } => MatchOutcome::Refused {
                reason: format!("{fleet_id} holds the key {idempotency_key} with another spec"),
            },
            other => MatchOutcome::Refused {
                reason: format!("unexpected {other:?}"),
            },
        }
    }
}
