//! Bounded queues: the runs waiting on a concurrency limit's keys, and the bound a limit's
//! `max_queued` puts on them.
//!
//! The queue of a key is not a separate structure: it is every pending run of a running fleet
//! in the limit's scope whose key it is, whatever holds it (the limit itself, a wave, a gate,
//! a pause, a retry's backoff), so it cannot drift from the runs. The bound is checked when a
//! fleet is submitted (directly, by a rerun, a schedule or an event): a fleet that would take
//! any key over `max_queued` is refused whole with the counts, and nothing is created. A retry
//! returns to the queue whatever its length (its run was admitted already), so a key may
//! exceed the bound by the retries in flight.
//!
//! Cost: for a `global`, `project` or `fleet` key, one look at each running fleet; for a key
//! drawn from the repository, one pass over the pending runs of the running fleets in the
//! limit's scope, once per submission and per such limit, and once per `GetLimit` of a
//! concurrency limit (under the state's read lock: about a string split per pending run).

use std::collections::BTreeMap;

use super::{Limit, LimitKey, LimitKind};
use crate::command::Response;
use crate::state::{State, fleet_id};

impl State {
    /// The runs waiting on each key of concurrency limit `limit` (module documentation), for
    /// the keys `wanted` (all keys when `None`).
    fn count_waiting(
        &self,
        limit: &Limit,
        wanted: Option<&BTreeMap<String, u64>>,
    ) -> BTreeMap<String, u64> {
        let spec = &limit.spec;
        let mut waiting: BTreeMap<String, u64> = BTreeMap::new();
        let mut add = |key: String, count: u64| {
            if count > 0 && wanted.is_none_or(|wanted| wanted.contains_key(&key)) {
                *waiting.entry(key).or_default() += count;
            }
        };
        for number in &self.active_fleets {
            let Some(fleet) = self.fleets.get(number) else {
                continue;
            };
            let project = &fleet.spec.project;
            if !spec.applies_to(project) || fleet.pending.is_empty() {
                continue;
            }
            let id = fleet_id(*number);
            match spec.key {
                LimitKey::Global | LimitKey::Project | LimitKey::Fleet => {
                    add(spec.key.of(project, &id, ""), fleet.pending.len() as u64);
                }
                LimitKey::ForgeHost | LimitKey::Organisation | LimitKey::Repository => {
                    for index in &fleet.pending {
                        let repository = &fleet.runs[*index as usize].repository;
                        add(spec.key.of(project, &id, repository), 1);
                    }
                }
            }
        }
        waiting
    }

    /// The runs waiting on each key of concurrency limit `name` (module documentation), at
    /// most `max_keys` keys in key order; empty for a rate limit or an unknown name.
    pub fn waiting_runs(&self, name: &str, max_keys: usize) -> Vec<(String, u64)> {
        match self.limits.limits.get(name) {
            Some(limit) if matches!(limit.spec.kind, LimitKind::Concurrency { .. }) => self
                .count_waiting(limit, None)
                .into_iter()
                .take(max_keys)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Whether fleet `fleet_id` of `project` over `repositories` fits every bounded queue:
    /// `Err` holds a [`Response::QueueFull`] naming the first limit and key it would overfill.
    pub(crate) fn check_queues(
        &self,
        project: &str,
        fleet_id: &str,
        repositories: &[String],
    ) -> Result<(), Response> {
        for limit in self.limits.limits.values() {
            let LimitKind::Concurrency {
                max_queued: Some(max_queued),
                ..
            } = limit.spec.kind
            else {
                continue;
            };
            if !limit.spec.applies_to(project) {
                continue;
            }
            let mut added: BTreeMap<String, u64> = BTreeMap::new();
            for repository in repositories {
                *added
                    .entry(limit.spec.key.of(project, fleet_id, repository))
                    .or_default() += 1;
            }
            let waiting = self.count_waiting(limit, Some(&added));
            for (key, adds) in &added {
                let now = waiting.get(key).copied().unwrap_or(0);
                if now + adds > u64::from(max_queued) {
                    let name = &limit.spec.name;
                    return Err(Response::QueueFull {
                        reason: format!(
                            "limit {name}: {now} runs wait on key {key} and this fleet adds \
                             {adds}, more than its max_queued {max_queued}; submit again when \
                             fewer wait (flotilla limit show {name})"
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}
