//! How `AcquireLeases` chooses runs: the state's candidates (open fleets, the current wave,
//! out of backoff, within `max_parallelism`), the cluster's limits and repository exclusivity
//! ([`crate::limit::admission`]) and the placement order ([`crate::placement`]) put together.
//!
//! One function, [`State::plan_placement`], decides without changing the state; it serves
//! both a lease request (then [`State::carry_out_plan`] applies the plan) and the question
//! "could a lease request lease anything now" ([`State::has_eligible_pending`]), so a node
//! proposes `AcquireLeases` exactly when it would change something, and an idle or blocked
//! cluster writes nothing.

use std::collections::{BTreeMap, BTreeSet};

use crate::command::{AttemptResult, Outcome};
use crate::limit::admission::{self, Candidate, Holder, Overlay, SlotKey, Verdict};
use crate::limit::gcra::Gcra;
use crate::limit::{LimitKind, MAX_BUCKET_KEYS};
use crate::placement::{self, Admission, FleetSlots, Placement};
use crate::state::{
    FleetState, MAX_CANDIDATES_SCANNED_PER_FLEET, RunState, State, finish_attempt, fleet_id,
};

/// What one placement decided, not yet applied.
#[derive(Clone, Debug, Default)]
pub(crate) struct PlacementPlan {
    /// Runs to lease, each with the concurrency slots its lease holds.
    pub placements: Vec<(Placement, Vec<SlotKey>)>,
    /// Pending runs to cancel (`skip`), with the reason.
    pub skips: Vec<(u64, u32, String)>,
    /// Running runs to cancel first (`cancel_older`), with the reason.
    pub victims: Vec<(Holder, String)>,
    /// New theoretical arrival times of the rate keys taken from.
    pub tats: BTreeMap<SlotKey, u64>,
    /// The earliest leader time (ms) at which a run held only by rate limits would get its
    /// units; `None` when none is.
    pub retry_at_ms: Option<u64>,
}

impl PlacementPlan {
    /// Whether carrying it out changes nothing.
    pub fn is_empty(&self) -> bool {
        self.placements.is_empty() && self.skips.is_empty()
    }
}

impl State {
    /// Decides which runs a worker with `free_slots` free slots gets at `now_ms` (module
    /// documentation). Reads only.
    pub(crate) fn plan_placement(&self, now_ms: u64, free_slots: u32) -> PlacementPlan {
        let fleets: Vec<_> = self
            .active_fleets
            .iter()
            .filter_map(|number| self.fleets.get(number))
            .filter(|fleet| fleet.flow.is_open(now_ms))
            .map(|fleet| {
                let end = fleet.flow.wave_end(fleet.runs.len() as u32);
                let pending = fleet
                    .pending
                    .range(..end)
                    .map(|index| (*index, fleet.runs[*index as usize].not_before_ms));
                FleetSlots {
                    fleet_number: fleet.number,
                    priority: fleet.spec.flow.priority,
                    available: fleet
                        .spec
                        .max_parallelism
                        .saturating_sub(fleet.counts.running),
                    candidates: placement::eligible(
                        pending,
                        now_ms,
                        MAX_CANDIDATES_SCANNED_PER_FLEET,
                    ),
                }
            })
            .collect();
        let mut overlay = Overlay::default();
        let mut plan = PlacementPlan::default();
        let mut admitted: BTreeMap<Placement, Vec<SlotKey>> = BTreeMap::new();
        let mut admit = |placed: Placement| -> Admission {
            let Some(fleet) = self.fleets.get(&placed.fleet_number) else {
                return Admission::FleetBlocked;
            };
            let id = fleet_id(fleet.number);
            let candidate = Candidate {
                fleet_number: fleet.number,
                run_index: placed.run_index,
                fleet_id: &id,
                project: &fleet.spec.project,
                repository: &fleet.runs[placed.run_index as usize].repository,
                shared: fleet.spec.flow.shared_repositories,
            };
            let mut oldest = |name: &str, key: &str, excluded: &BTreeSet<(u64, u32)>| {
                self.oldest_holder(name, key, excluded)
            };
            match admission::admit(&self.limits, &mut overlay, now_ms, &candidate, &mut oldest) {
                Verdict::Admit { slots, victims } => {
                    plan.victims.extend(victims);
                    admitted.insert(placed, slots);
                    Admission::Placed
                }
                Verdict::Wait {
                    retry_at_ms,
                    whole_fleet,
                    ..
                } => {
                    if let Some(at) = retry_at_ms {
                        plan.retry_at_ms = Some(plan.retry_at_ms.map_or(at, |t| t.min(at)));
                    }
                    if whole_fleet {
                        Admission::FleetBlocked
                    } else {
                        Admission::Passed
                    }
                }
                Verdict::Skip(reason) => {
                    plan.skips
                        .push((placed.fleet_number, placed.run_index, reason));
                    Admission::Passed
                }
            }
        };
        let chosen = placement::place(free_slots, fleets, self.placement_cursor, &mut admit);
        plan.placements = chosen
            .into_iter()
            .map(|placed| {
                let slots = admitted.remove(&placed).unwrap_or_default();
                (placed, slots)
            })
            .collect();
        plan.tats = overlay.tats().clone();
        plan
    }

    /// The running run holding slot `(name, key)` whose current attempt started first (then
    /// by fleet and run), leaving out `excluded`. O(running runs).
    fn oldest_holder(
        &self,
        name: &str,
        key: &str,
        excluded: &BTreeSet<(u64, u32)>,
    ) -> Option<Holder> {
        let mut best: Option<(u64, Holder)> = None;
        for fleet in self
            .active_fleets
            .iter()
            .filter_map(|number| self.fleets.get(number))
        {
            for index in self.lease_index(fleet).indices() {
                let run = &fleet.runs[index as usize];
                let Some(lease) = &run.lease else { continue };
                if excluded.contains(&(fleet.number, index))
                    || !lease.slots.iter().any(|(n, k)| n == name && k == key)
                {
                    continue;
                }
                let started = run.attempts.last().map_or(0, |a| a.started_at_ms);
                if best.as_ref().is_none_or(|(at, _)| started < *at) {
                    best = Some((
                        started,
                        Holder {
                            fleet_number: fleet.number,
                            run_index: index,
                            slots: lease.slots.clone(),
                            repository: flotilla_domain::repository::repository_parts(
                                &run.repository,
                            )
                            .repository,
                        },
                    ));
                }
            }
        }
        best.map(|(_, holder)| holder)
    }

    /// Applies `plan`'s cancellations and rate units, and returns the runs to lease with
    /// their slots (the caller grants them, taking the slots).
    pub(crate) fn carry_out_plan(
        &mut self,
        now_ms: u64,
        plan: PlacementPlan,
    ) -> Vec<(Placement, Vec<SlotKey>)> {
        for (holder, reason) in plan.victims {
            let Some(fleet) = self.fleets.get_mut(&holder.fleet_number) else {
                continue;
            };
            if fleet.runs[holder.run_index as usize].state != RunState::Running {
                continue;
            }
            let result = AttemptResult::failure(Outcome::Cancelled, reason, false);
            finish_attempt(
                fleet,
                &mut self.limits.occupancy,
                holder.run_index,
                now_ms,
                result,
            );
            if fleet.state != FleetState::Running {
                self.active_fleets.remove(&holder.fleet_number);
            }
        }
        for (number, index, reason) in plan.skips {
            let Some(fleet) = self.fleets.get_mut(&number) else {
                continue;
            };
            if fleet.runs[index as usize].state == RunState::Pending {
                crate::control::cancel_pending_run(fleet, index, now_ms, &reason);
            }
            if fleet.state != FleetState::Running {
                self.active_fleets.remove(&number);
            }
        }
        self.store_tats(now_ms, plan.tats);
        if let Some((last, _)) = plan.placements.last() {
            self.placement_cursor = last.fleet_number;
        }
        plan.placements
    }

    /// Writes new theoretical arrival times, first forgetting full buckets when the keys
    /// would exceed [`MAX_BUCKET_KEYS`].
    fn store_tats(&mut self, now_ms: u64, tats: BTreeMap<SlotKey, u64>) {
        let buckets = &mut self.limits.buckets;
        let new_keys = tats
            .keys()
            .filter(|(name, key)| buckets.get(name).is_none_or(|keys| !keys.contains_key(key)))
            .count();
        let known: usize = buckets.values().map(BTreeMap::len).sum();
        if known + new_keys > MAX_BUCKET_KEYS {
            for keys in buckets.values_mut() {
                keys.retain(|_, tat| !Gcra::is_full(*tat, now_ms));
            }
            buckets.retain(|_, keys| !keys.is_empty());
        }
        for ((name, key), tat) in tats {
            let is_rate = self
                .limits
                .limits
                .get(&name)
                .is_some_and(|l| matches!(l.spec.kind, LimitKind::Rate { .. }));
            if is_rate {
                self.limits
                    .buckets
                    .entry(name)
                    .or_default()
                    .insert(key, tat);
            }
        }
    }

    /// Whether a lease request at `now_ms` would lease (or cancel) anything: the same
    /// decision as `AcquireLeases` makes, for one free slot, without changing the state.
    pub fn has_eligible_pending(&self, now_ms: u64) -> bool {
        !self.plan_placement(now_ms, 1).is_empty()
    }

    /// [`State::has_eligible_pending`], and when nothing is eligible, the earliest leader
    /// time (ms) at which a run waiting only on rate limits gets its units: a lease request
    /// waits until then rather than a fixed poll interval, so a rate limit is used to the full.
    pub fn lease_outlook(&self, now_ms: u64) -> (bool, Option<u64>) {
        let plan = self.plan_placement(now_ms, 1);
        (!plan.is_empty(), plan.retry_at_ms)
    }
}
