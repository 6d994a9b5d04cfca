//! Cluster-wide limits an operator sets on runs: rate limits (token buckets, GCRA) and
//! concurrency limits, each keyed globally, per project, per fleet, or by a key drawn from the
//! run's repository (forge host, organisation, repository); and, with them, per-repository
//! exclusivity across fleets.
//!
//! - [`LimitSpec`]: one limit as an operator creates it (`flotilla limit create`);
//! - [`gcra`]: the Generic Cell Rate Algorithm (ITU-T I.371; as Inngest and Hatchet use it) on
//!   the replicated clock;
//! - [`admission`]: whether one pending run may be leased now, pure, over the limits, the
//!   buckets and the [`Occupancy`] (what running runs hold);
//! - `apply.rs`: the limit commands on the state;
//! - `queue.rs`: the runs waiting on a concurrency limit's keys, and the bound
//!   `max_queued` puts on them at submission.
//!
//! Limits apply to every run of the projects they name, whatever its fleet's spec says: a
//! submitter cannot opt out of or widen them. Rate units are taken when a run is leased (each
//! attempt takes one); concurrency slots are held by the lease ([`crate::state::Lease::slots`])
//! and given back exactly when it ends, so a slot cannot leak: [`LimitTable::check_invariants`]
//! recounts them from the leases.

pub mod admission;
mod apply;
pub mod gcra;
mod queue;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::{FieldError, is_valid_name};
use crate::token::Principal;
use flotilla_domain::repository::repository_parts;

/// Default most limits a cluster holds (`limits.max_limits`).
pub const DEFAULT_MAX_LIMITS: u32 = 64;
/// Most rate-limit keys remembered across all rate limits. A key whose bucket is full again
/// is forgotten first (it is the same as a new one); a new key beyond this waits.
pub const MAX_BUCKET_KEYS: usize = 100_000;
/// Largest `limit`, `burst` and `max_running` of a limit.
pub const MAX_LIMIT_UNITS: u32 = 1_000_000;
/// Longest rate-limit period: one day, in milliseconds.
pub const MAX_PERIOD_MS: u64 = 86_400_000;

/// What a limit counts by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// One count for every run the limit applies to (a cluster-wide cap).
    Global,
    /// One count per project.
    Project,
    /// One count per fleet.
    Fleet,
    /// One count per forge host (`github.com`; `local` for local repositories).
    ForgeHost,
    /// One count per organisation (`github.com/acme`).
    Organisation,
    /// One count per repository (`github.com/acme/widgets`).
    Repository,
}

impl LimitKey {
    /// The name the CLI and the spec use (`forge_host`).
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKey::Global => "global",
            LimitKey::Project => "project",
            LimitKey::Fleet => "fleet",
            LimitKey::ForgeHost => "forge_host",
            LimitKey::Organisation => "organisation",
            LimitKey::Repository => "repository",
        }
    }

    /// Parses [`LimitKey::as_str`].
    pub fn parse(text: &str) -> Option<LimitKey> {
        [
            LimitKey::Global,
            LimitKey::Project,
            LimitKey::Fleet,
            LimitKey::ForgeHost,
            LimitKey::Organisation,
            LimitKey::Repository,
        ]
        .into_iter()
        .find(|key| key.as_str() == text)
    }

    /// This key's value for a run of fleet `fleet_id` in `project` on `repository`.
    pub fn of(self, project: &str, fleet_id: &str, repository: &str) -> String {
        match self {
            LimitKey::Global => "*".to_string(),
            LimitKey::Project => project.to_string(),
            LimitKey::Fleet => fleet_id.to_string(),
            LimitKey::ForgeHost => repository_parts(repository).host,
            LimitKey::Organisation => repository_parts(repository).organisation,
            LimitKey::Repository => repository_parts(repository).repository,
        }
    }
}

/// What a concurrency limit does with a run whose key is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// The run waits, pending, until a slot is free.
    Queue,
    /// The run is cancelled ("skipped"), with the limit and key as the reason.
    Skip,
    /// The oldest running run of the key is cancelled to make room for it.
    CancelOlder,
}

impl WhenFull {
    /// The name the CLI uses (`cancel_older`).
    pub fn as_str(self) -> &'static str {
        match self {
            WhenFull::Queue => "queue",
            WhenFull::Skip => "skip",
            WhenFull::CancelOlder => "cancel_older",
        }
    }
}

/// What a limit bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// At most `limit` leases per `period_ms` per key, with bursts of up to `burst` at once.
    Rate {
        /// Units per period, 1-[`MAX_LIMIT_UNITS`].
        limit: u32,
        /// The period, in milliseconds, 1-[`MAX_PERIOD_MS`]; `limit / period` is at most one
        /// per microsecond.
        period_ms: u64,
        /// Most units taken at once after a quiet time, 1-[`MAX_LIMIT_UNITS`].
        burst: u32,
    },
    /// At most `max_running` running runs per key.
    Concurrency {
        /// 1-[`MAX_LIMIT_UNITS`].
        max_running: u32,
        /// What happens to a run whose key is full.
        when_full: WhenFull,
        /// With [`WhenFull::Queue`]: most runs waiting on one key, 1-[`MAX_LIMIT_UNITS`];
        /// `None`: no bound but the fleets' own. A fleet whose runs would take a key's waiting
        /// runs over it is refused at submission ([`crate::Response::QueueFull`]); see
        /// [`crate::state::State::waiting_runs`] for what waits.
        #[serde(default)]
        max_queued: Option<u32>,
    },
}

/// One limit as an operator creates it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitSpec {
    /// 1-64 characters of `[A-Za-z0-9._-]`, unique in the cluster.
    pub name: String,
    /// The project whose runs it applies to; empty: every project.
    pub project: String,
    /// What it counts by.
    pub key: LimitKey,
    /// What it bounds.
    pub kind: LimitKind,
}

impl LimitSpec {
    /// Checks the fields; errors name them below `prefix`.
    ///
    /// # Errors
    /// The first invalid field.
    pub fn validate(&self, prefix: &str) -> Result<(), FieldError> {
        let field = |name: &str| format!("{prefix}.{name}");
        if !is_valid_name(&self.name) {
            return Err(FieldError::new(
                field("name"),
                "must be 1-64 characters of [A-Za-z0-9._-]",
            ));
        }
        if !self.project.is_empty() && !is_valid_name(&self.project) {
            return Err(FieldError::new(
                field("project"),
                "must be empty (every project) or 1-64 characters of [A-Za-z0-9._-]",
            ));
        }
        let units = |name: &str, value: u32| {
            if value == 0 || value > MAX_LIMIT_UNITS {
                Err(FieldError::new(
                    field(name),
                    format!("must be 1-{MAX_LIMIT_UNITS}"),
                ))
            } else {
                Ok(())
            }
        };
        match self.kind {
            LimitKind::Rate {
                limit,
                period_ms,
                burst,
            } => {
                units("rate.limit", limit)?;
                units("rate.burst", burst)?;
                if period_ms == 0 || period_ms > MAX_PERIOD_MS {
                    return Err(FieldError::new(
                        field("rate.period_ms"),
                        format!("must be 1-{MAX_PERIOD_MS} (one day)"),
                    ));
                }
                if u64::from(limit) > period_ms.saturating_mul(1_000) {
                    return Err(FieldError::new(
                        field("rate.limit"),
                        "more than one per microsecond of the period",
                    ));
                }
            }
            LimitKind::Concurrency {
                max_running,
                when_full,
                max_queued,
            } => {
                units("concurrency.max_running", max_running)?;
                if let Some(max_queued) = max_queued {
                    units("concurrency.max_queued", max_queued)?;
                    if when_full != WhenFull::Queue {
                        return Err(FieldError::new(
                            field("concurrency.max_queued"),
                            format!(
                                "bounds a queue, so it needs when_full queue, not {}",
                                when_full.as_str()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the limit applies to runs of `project`.
    pub fn applies_to(&self, project: &str) -> bool {
        self.project.is_empty() || self.project == project
    }

    /// One line: `rate 10 per 1000 ms (burst 10) per organisation in every project`.
    pub fn describe(&self) -> String {
        let scope = if self.project.is_empty() {
            "in every project".to_string()
        } else {
            format!("in project {}", self.project)
        };
        let per = match self.key {
            LimitKey::Global => "across the cluster".to_string(),
            key => format!("per {}", key.as_str()),
        };
        match self.kind {
            LimitKind::Rate {
                limit,
                period_ms,
                burst,
            } => format!("rate {limit} per {period_ms} ms (burst {burst}) {per} {scope}"),
            LimitKind::Concurrency {
                max_running,
                when_full,
                max_queued,
            } => format!(
                "at most {max_running} running {per} {scope}; when full: {}{}",
                when_full.as_str(),
                max_queued.map_or(String::new(), |max| format!(" (at most {max} waiting)"))
            ),
        }
    }
}

/// A limit in the state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    /// As created.
    pub spec: LimitSpec,
    /// Leader time of creation, in milliseconds.
    pub created_at_ms: u64,
    /// Who created it.
    pub created_by: Principal,
}

/// What running runs hold: derived from the leases, kept so that admission is a lookup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Occupancy {
    /// Running runs per concurrency limit name, then per key value.
    pub slots: BTreeMap<String, BTreeMap<String, u32>>,
    /// Running runs per repository ([`LimitKey::Repository`] form), as `fleet number ->
    /// shared_repositories` of each fleet running there.
    pub repositories: BTreeMap<String, BTreeMap<u64, bool>>,
}

impl Occupancy {
    /// Running runs holding `key` of limit `name`.
    pub fn held(&self, name: &str, key: &str) -> u32 {
        self.slots
            .get(name)
            .and_then(|keys| keys.get(key))
            .copied()
            .unwrap_or(0)
    }

    /// Takes one slot of each `(limit, key)` and the repository for `fleet_number`.
    pub(crate) fn take(
        &mut self,
        slots: &[(String, String)],
        repository: &str,
        fleet_number: u64,
        shared: bool,
    ) {
        for (name, key) in slots {
            *self
                .slots
                .entry(name.clone())
                .or_default()
                .entry(key.clone())
                .or_default() += 1;
        }
        self.repositories
            .entry(repository.to_string())
            .or_default()
            .insert(fleet_number, shared);
    }

    /// Gives back what [`Occupancy::take`] took.
    pub(crate) fn release(
        &mut self,
        slots: &[(String, String)],
        repository: &str,
        fleet_number: u64,
    ) {
        for (name, key) in slots {
            if let Some(keys) = self.slots.get_mut(name)
                && let Some(count) = keys.get_mut(key)
            {
                *count -= 1;
                if *count == 0 {
                    keys.remove(key);
                }
                if keys.is_empty() {
                    self.slots.remove(name);
                }
            }
        }
        if let Some(fleets) = self.repositories.get_mut(repository) {
            fleets.remove(&fleet_number);
            if fleets.is_empty() {
                self.repositories.remove(repository);
            }
        }
    }
}

/// The limits, their buckets and what running runs hold (part of [`crate::state::State`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LimitTable {
    /// Limits by name.
    pub limits: BTreeMap<String, Limit>,
    /// Each rate limit's theoretical arrival time per key, in microseconds of leader time
    /// ([`gcra`]); at most [`MAX_BUCKET_KEYS`] in all.
    pub buckets: BTreeMap<String, BTreeMap<String, u64>>,
    /// What running runs hold.
    pub occupancy: Occupancy,
}

impl LimitTable {
    /// Remembered bucket keys across all rate limits.
    pub fn bucket_keys(&self) -> usize {
        self.buckets.values().map(BTreeMap::len).sum()
    }

    /// Checks that the occupancy equals the tally of `leases` (`(slots, repository, fleet
    /// number, shared)` of every running run), that every slot names an existing concurrency
    /// limit, and that the buckets are bounded.
    ///
    /// # Errors
    /// The first difference.
    pub fn check_invariants<'a>(
        &self,
        leases: impl Iterator<Item = (&'a [(String, String)], String, u64, bool)>,
    ) -> Result<(), String> {
        let mut recount = Occupancy::default();
        for (slots, repository, fleet_number, shared) in leases {
            for (name, _) in slots {
                let concurrency = self
                    .limits
                    .get(name)
                    .is_some_and(|l| matches!(l.spec.kind, LimitKind::Concurrency { .. }));
                if !concurrency {
                    return Err(format!(
                        "a lease holds a slot of {name:?}, no concurrency limit"
                    ));
                }
            }
            recount.take(slots, &repository, fleet_number, shared);
        }
        if recount != self.occupancy {
            return Err(format!(
                "occupancy {:?} differs from the leases' {:?}",
                self.occupancy, recount
            ));
        }
        if self.bucket_keys() > MAX_BUCKET_KEYS {
            return Err("more bucket keys than MAX_BUCKET_KEYS".into());
        }
        for name in self.buckets.keys() {
            if !self.limits.contains_key(name) {
                return Err(format!("buckets of {name:?}, no limit"));
            }
        }
        Ok(())
    }
}
