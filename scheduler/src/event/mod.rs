//! Event triggers (issue 9): rules that start fleets when a webhook delivery or an API event
//! arrives, and the replicated record of every accepted delivery.
//!
//! - [`rule`]: the rule spec and its CEL expressions (filter, target selector, parameters);
//!   pure, evaluated by the leader before it proposes a delivery.
//! - [`delivery`]: what a delivery command carries and what the state keeps of it.
//! - `apply.rs`: the commands carried out on [`crate::state::State`].
//!
//! Exactly one fleet set per delivery: a delivery's record and the fleets of its matched rules
//! are written by one log entry, keyed by `(source, delivery id)`. A redelivery of a delivery
//! that started fleets answers those fleets and starts nothing; one that started none (no rule
//! matched, or every fleet was refused) is evaluated again, so a failed delivery can be driven
//! again by redelivering it.

mod apply;
pub mod delivery;
pub mod rule;

pub use apply::{Deliveries, EventRule};

#[cfg(test)]
mod tests;
