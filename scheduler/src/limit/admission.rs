//! Whether one pending run may be leased now: pure, over the [`LimitTable`] and an
//! [`Overlay`] of what the same placement already decided (leases not yet applied, units
//! taken, runs cancelled to make room).
//!
//! Order of rules, for a run of fleet `f` on repository `r`:
//! 1. **exclusivity**: another fleet's run on `r` is running and either fleet does not share
//!    repositories → wait;
//! 2. every **concurrency** limit of the run's project whose key is full decides by its
//!    `when_full`: `skip` cancels the run (skip wins over the waits of rules 2 and 3; a run
//!    waiting for its repository under rule 1 is not skipped), `queue` waits, `cancel_older`
//!    names the key's oldest running run to cancel;
//! 3. every **rate** limit must have a unit at `now_ms` ([`super::gcra`]), else wait;
//! 4. otherwise the run is admitted: it holds one slot of each concurrency key and takes one
//!    unit of each rate key.

use std::collections::{BTreeMap, BTreeSet};

use super::gcra::Gcra;
use super::{LimitKey, LimitKind, LimitTable, MAX_BUCKET_KEYS, WhenFull};
use flotilla_domain::repository::repository_parts;

/// `(limit name, key value)`.
pub type SlotKey = (String, String);

/// Names the running run of slot `(limit, key)` whose current attempt started first,
/// leaving out the given `(fleet number, run index)` pairs.
pub type OldestHolder<'a> = dyn FnMut(&str, &str, &BTreeSet<(u64, u32)>) -> Option<Holder> + 'a;

/// The run asking to be leased.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// Its fleet's number.
    pub fleet_number: u64,
    /// Its index in the fleet.
    pub run_index: u32,
    /// Its fleet's id (`fl-<n>`).
    pub fleet_id: &'a str,
    /// Its fleet's project.
    pub project: &'a str,
    /// Its repository URL.
    pub repository: &'a str,
    /// Its fleet's `flow.shared_repositories`.
    pub shared: bool,
}

/// A running run that holds a slot: what cancelling it gives back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Its fleet's number.
    pub fleet_number: u64,
    /// Its index in the fleet.
    pub run_index: u32,
    /// The slots its lease holds.
    pub slots: Vec<SlotKey>,
    /// Its repository ([`super::LimitKey::Repository`] form).
    pub repository: String,
}

/// Decisions of one placement not yet applied to the table.
#[derive(Clone, Debug, Default)]
pub struct Overlay {
    taken: BTreeMap<SlotKey, u32>,
    freed: BTreeMap<SlotKey, u32>,
    tats: BTreeMap<SlotKey, u64>,
    repositories: BTreeMap<String, Vec<(u64, bool)>>,
    released_repositories: BTreeSet<(String, u64)>,
    victims: BTreeSet<(u64, u32)>,
}

impl Overlay {
    /// The runs chosen for cancellation so far, as `(fleet number, run index)`.
    pub fn victims(&self) -> &BTreeSet<(u64, u32)> {
        &self.victims
    }

    /// The new theoretical arrival times of the rate keys taken from.
    pub fn tats(&self) -> &BTreeMap<SlotKey, u64> {
        &self.tats
    }
}

/// What [`admit`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Lease it, holding these slots, after cancelling these runs (each with the reason).
    Admit {
        /// Concurrency slots the lease holds.
        slots: Vec<SlotKey>,
        /// Runs to cancel first (`cancel_older`), as `(holder, reason)`.
        victims: Vec<(Holder, String)>,
    },
    /// It stays pending.
    Wait {
        /// Why.
        reason: String,
        /// When only rate limits hold it: the leader time (ms) at which they all have a unit.
        retry_at_ms: Option<u64>,
        /// Whether every limit holding it counts by a key its whole fleet shares (global,
        /// project, fleet): then every other run of the fleet waits too, and placement need
        /// not ask about them.
        whole_fleet: bool,
    },
    /// It is cancelled, for this reason (`skip`).
    Skip(String),
}

/// Decides for `candidate` at `now_ms` (module documentation) and, when it is admitted,
/// records the decision in `overlay`. `oldest_holder(limit, key, excluded)` names the running
/// run of that key whose current attempt started first, leaving out `excluded`.
pub fn admit(
    table: &LimitTable,
    overlay: &mut Overlay,
    now_ms: u64,
    candidate: &Candidate<'_>,
    oldest_holder: &mut OldestHolder<'_>,
) -> Verdict {
    let repository = repository_parts(candidate.repository).repository;
    if let Some(other) = repository_conflict(table, overlay, &repository, candidate) {
        return Verdict::Wait {
            reason: format!(
                "repository {repository} is running in fl-{other}, and fleets run on a repository one at a time unless both set shared_repositories"
            ),
            retry_at_ms: None,
            whole_fleet: false,
        };
    }
    let mut slots = Vec::new();
    let mut tats = Vec::new();
    let mut victims: Vec<(Holder, String)> = Vec::new();
    let mut wait = None;
    // The latest time a rate limit gives its next unit; `None` once anything else waits.
    let mut retry_at_ms = Some(0u64);
    let mut whole_fleet = true;
    for (name, limit) in &table.limits {
        if !limit.spec.applies_to(candidate.project) {
            continue;
        }
        let fleet_wide_key = matches!(
            limit.spec.key,
            LimitKey::Global | LimitKey::Project | LimitKey::Fleet
        );
        let key = limit
            .spec
            .key
            .of(candidate.project, candidate.fleet_id, candidate.repository);
        let slot = (name.clone(), key);
        match limit.spec.kind {
            LimitKind::Concurrency {
                max_running,
                when_full,
                ..
            } => {
                let freed_here = victims
                    .iter()
                    .filter(|(h, _)| h.slots.contains(&slot))
                    .count();
                let held = (table.occupancy.held(&slot.0, &slot.1)
                    + overlay.taken.get(&slot).copied().unwrap_or(0))
                .saturating_sub(overlay.freed.get(&slot).copied().unwrap_or(0))
                .saturating_sub(freed_here as u32);
                if held >= max_running {
                    let reason = format!(
                        "concurrency limit {name} is full for {} ({held} of {max_running} running)",
                        slot.1
                    );
                    match when_full {
                        WhenFull::Skip => return Verdict::Skip(format!("skipped: {reason}")),
                        WhenFull::Queue => {
                            wait.get_or_insert(reason);
                            retry_at_ms = None;
                            whole_fleet &= fleet_wide_key;
                        }
                        WhenFull::CancelOlder => {
                            let mut excluded = overlay.victims.clone();
                            excluded
                                .extend(victims.iter().map(|(h, _)| (h.fleet_number, h.run_index)));
                            match oldest_holder(&slot.0, &slot.1, &excluded) {
                                Some(holder) => victims.push((
                                    holder,
                                    format!(
                                        "cancelled to make room for fl-{}-{}: {reason}, and it cancels the older run",
                                        candidate.fleet_number, candidate.run_index
                                    ),
                                )),
                                None => {
                                    wait.get_or_insert(reason);
                                    retry_at_ms = None;
                                    whole_fleet &= fleet_wide_key;
                                }
                            }
                        }
                    }
                }
                slots.push(slot);
            }
            LimitKind::Rate {
                limit: units,
                period_ms,
                burst,
            } => {
                let known = overlay.tats.get(&slot).copied().or_else(|| {
                    table
                        .buckets
                        .get(&slot.0)
                        .and_then(|keys| keys.get(&slot.1))
                        .copied()
                });
                if known.is_none() && !has_room_for_a_key(table, overlay, now_ms) {
                    wait.get_or_insert(format!(
                        "rate limit {name}: {MAX_BUCKET_KEYS} keys are remembered, none full"
                    ));
                    retry_at_ms = None;
                    whole_fleet = false;
                    continue;
                }
                match Gcra::new(units, period_ms, burst).take(known, now_ms) {
                    Ok(tat) => tats.push((slot, tat)),
                    Err(at_ms) => {
                        wait.get_or_insert(format!(
                            "rate limit {name} for {}: the next unit is at {at_ms} ms",
                            slot.1
                        ));
                        retry_at_ms = retry_at_ms.map(|at| at.max(at_ms));
                        whole_fleet &= fleet_wide_key;
                    }
                }
            }
        }
    }
    if let Some(reason) = wait {
        return Verdict::Wait {
            reason,
            retry_at_ms,
            whole_fleet,
        };
    }
    for (holder, _) in &victims {
        overlay
            .victims
            .insert((holder.fleet_number, holder.run_index));
        for slot in &holder.slots {
            *overlay.freed.entry(slot.clone()).or_default() += 1;
        }
        overlay
            .released_repositories
            .insert((holder.repository.clone(), holder.fleet_number));
    }
    for slot in &slots {
        *overlay.taken.entry(slot.clone()).or_default() += 1;
    }
    for (slot, tat) in tats {
        overlay.tats.insert(slot, tat);
    }
    overlay
        .repositories
        .entry(repository)
        .or_default()
        .push((candidate.fleet_number, candidate.shared));
    Verdict::Admit { slots, victims }
}

/// Another fleet running on `repository` that excludes `candidate`, if any.
fn repository_conflict(
    table: &LimitTable,
    overlay: &Overlay,
    repository: &str,
    candidate: &Candidate<'_>,
) -> Option<u64> {
    let excludes =
        |fleet: u64, shared: bool| fleet != candidate.fleet_number && !(shared && candidate.shared);
    let running = table
        .occupancy
        .repositories
        .get(repository)
        .into_iter()
        .flatten()
        .filter(|(fleet, _)| {
            !overlay
                .released_repositories
                .contains(&(repository.to_string(), **fleet))
        })
        .map(|(fleet, shared)| (*fleet, *shared));
    let placed = overlay
        .repositories
        .get(repository)
        .into_iter()
        .flatten()
        .copied();
    running
        .chain(placed)
        .find(|(fleet, shared)| excludes(*fleet, *shared))
        .map(|(fleet, _)| fleet)
}

/// Whether a new rate key can be remembered: below [`MAX_BUCKET_KEYS`], or some remembered
/// key is full (it is forgotten to make room when the placement is applied).
fn has_room_for_a_key(table: &LimitTable, overlay: &Overlay, now_ms: u64) -> bool {
    let new_keys = overlay
        .tats
        .keys()
        .filter(|(name, key)| {
            table
                .buckets
                .get(name)
                .is_none_or(|keys| !keys.contains_key(key))
        })
        .count();
    if table.bucket_keys() + new_keys < MAX_BUCKET_KEYS {
        return true;
    }
    table
        .buckets
        .values()
        .flat_map(BTreeMap::values)
        .filter(|tat| Gcra::is_full(**tat, now_ms))
        .nth(new_keys)
        .is_some()
}
