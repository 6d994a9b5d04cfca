//! The wire's [`AttemptOutcome`] and the domain's [`Outcome`], one to one.
//!
//! `ATTEMPT_OUTCOME_UNSPECIFIED` has no domain value: in a reply it means "no attempt ended",
//! so replies convert an `Option<Outcome>`; a request that carries it (or a number this build
//! does not know, which prost keeps as a raw `i32`) is refused by [`outcome_from_wire`].

use crate::v1::AttemptOutcome;
use flotilla_domain::Outcome;

impl From<Outcome> for AttemptOutcome {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Changed => AttemptOutcome::Changed,
            Outcome::Unchanged => AttemptOutcome::Unchanged,
            Outcome::AgentFailed => AttemptOutcome::AgentFailed,
            Outcome::VerifyFailed => AttemptOutcome::VerifyFailed,
            Outcome::TimedOut => AttemptOutcome::TimedOut,
            Outcome::Infrastructure => AttemptOutcome::Infrastructure,
            Outcome::LeaseExpired => AttemptOutcome::LeaseExpired,
            Outcome::Cancelled => AttemptOutcome::Cancelled,
        }
    }
}

/// The wire number of an optional outcome: `None` (no attempt ended) is
/// `ATTEMPT_OUTCOME_UNSPECIFIED` (0).
pub fn outcome_to_wire(outcome: Option<Outcome>) -> i32 {
    outcome.map_or(AttemptOutcome::Unspecified, AttemptOutcome::from) as i32
}

/// The domain outcome of a wire number, `None` for `ATTEMPT_OUTCOME_UNSPECIFIED` and for a
/// number this build does not know. Callers that require an outcome turn `None` into an
/// `INVALID_ARGUMENT` naming their field.
pub fn outcome_from_wire(number: i32) -> Option<Outcome> {
    Some(match AttemptOutcome::try_from(number).ok()? {
        AttemptOutcome::Unspecified => return None,
        AttemptOutcome::Changed => Outcome::Changed,
        AttemptOutcome::Unchanged => Outcome::Unchanged,
        AttemptOutcome::AgentFailed => Outcome::AgentFailed,
        AttemptOutcome::VerifyFailed => Outcome::VerifyFailed,
        AttemptOutcome::TimedOut => Outcome::TimedOut,
        AttemptOutcome::Infrastructure => Outcome::Infrastructure,
        AttemptOutcome::LeaseExpired => Outcome::LeaseExpired,
        AttemptOutcome::Cancelled => Outcome::Cancelled,
    })
}

/// The outcome's domain name (`agent_failed`, ...) for a wire number, or `""` for
/// `ATTEMPT_OUTCOME_UNSPECIFIED` and unknown numbers: what the CLI prints.
pub fn outcome_name(number: i32) -> &'static str {
    outcome_from_wire(number).map_or("", Outcome::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_round_trips_and_the_wire_name_ends_with_the_domain_name() {
        for outcome in Outcome::ALL {
            let number = outcome_to_wire(Some(outcome));
            assert_eq!(outcome_from_wire(number), Some(outcome));
            let wire_name = AttemptOutcome::from(outcome).as_str_name();
            assert_eq!(
                wire_name,
                format!("ATTEMPT_OUTCOME_{}", outcome.as_str().to_uppercase())
            );
        }
        assert_eq!(outcome_to_wire(None), 0);
        assert_eq!(outcome_from_wire(0), None);
        assert_eq!(outcome_from_wire(99), None);
        assert_eq!(outcome_name(99), "");
    }
}
