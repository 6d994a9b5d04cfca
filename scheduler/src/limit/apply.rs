//! The limit commands on the state.

use super::{Limit, LimitKind, LimitSpec};
use crate::command::Response;
use crate::state::{State, fleet_id};
use crate::token::Principal;

impl State {
    /// `CreateLimit`. A concurrency limit counts the runs already running from the start:
    /// their leases take its slots now, so a cap set below them admits nothing until enough
    /// of them end.
    pub(crate) fn create_limit(
        &mut self,
        now_ms: u64,
        spec: &LimitSpec,
        max_limits: u32,
        principal: &Principal,
    ) -> Response {
        if let Err(error) = spec.validate("spec") {
            return Response::Rejected {
                reason: error.to_string(),
            };
        }
        if self.limits.limits.contains_key(&spec.name) {
            return Response::Rejected {
                reason: format!("spec.name: a limit {:?} exists; delete it first", spec.name),
            };
        }
        if self.limits.limits.len() >= max_limits as usize {
            return Response::Rejected {
                reason: format!(
                    "the cluster holds {} limits, the most it may (limits.max_limits)",
                    self.limits.limits.len()
                ),
            };
        }
        self.limits.limits.insert(
            spec.name.clone(),
            Limit {
                spec: spec.clone(),
                created_at_ms: now_ms,
                created_by: principal.clone(),
            },
        );
        if matches!(spec.kind, LimitKind::Concurrency { .. }) {
            self.seed_slots(spec);
        }
        Response::LimitCreated {
            name: spec.name.clone(),
        }
    }

    /// Gives every running run that `spec` applies to a slot of it.
    fn seed_slots(&mut self, spec: &LimitSpec) {
        let active: Vec<u64> = self.active_fleets.iter().copied().collect();
        for number in active {
            let Some(fleet) = self.fleets.get_mut(&number) else {
                continue;
            };
            if !spec.applies_to(&fleet.spec.project) {
                continue;
            }
            let id = fleet_id(number);
            let running: Vec<u32> = fleet.lease_indices();
            for index in running {
                let run = &mut fleet.runs[index as usize];
                let key = spec.key.of(&fleet.spec.project, &id, &run.repository);
                if let Some(lease) = run.lease.as_mut() {
                    let slot = (spec.name.clone(), key.clone());
                    lease.slots.push(slot);
                    *self
                        .limits
                        .occupancy
                        .slots
                        .entry(spec.name.clone())
                        .or_default()
                        .entry(key)
                        .or_default() += 1;
                }
            }
        }
    }

    /// `DeleteLimit`: the slots running runs hold of it are given back at once.
    pub(crate) fn delete_limit(&mut self, name: &str) -> Response {
        if self.limits.limits.remove(name).is_none() {
            return Response::Rejected {
                reason: format!("no limit {name}"),
            };
        }
        self.limits.buckets.remove(name);
        if self.limits.occupancy.slots.remove(name).is_some() {
            let active: Vec<u64> = self.active_fleets.iter().copied().collect();
            for number in active {
                let Some(fleet) = self.fleets.get_mut(&number) else {
                    continue;
                };
                for index in fleet.lease_indices() {
                    if let Some(lease) = fleet.runs[index as usize].lease.as_mut() {
                        lease.slots.retain(|(limit, _)| limit != name);
                    }
                }
            }
        }
        Response::LimitDeleted {
            name: name.to_string(),
        }
    }

    /// The limits, by name.
    pub fn limits(&self) -> impl Iterator<Item = &Limit> {
        self.limits.limits.values()
    }

    /// Running runs holding `key` of concurrency limit `name`.
    pub fn limit_usage(&self, name: &str, key: &str) -> u32 {
        self.limits.occupancy.held(name, key)
    }

    /// Each key of limit `name` with its use: running runs for a concurrency limit, the
    /// theoretical arrival time (microseconds) for a rate limit. At most `max_keys`.
    pub fn limit_keys(&self, name: &str, max_keys: usize) -> Vec<(String, u64)> {
        let concurrency = self.limits.occupancy.slots.get(name).into_iter().flatten();
        let rate = self.limits.buckets.get(name).into_iter().flatten();
        concurrency
            .map(|(key, count)| (key.clone(), u64::from(*count)))
            .chain(rate.map(|(key, tat)| (key.clone(), *tat)))
            .take(max_keys)
            .collect()
    }
}
