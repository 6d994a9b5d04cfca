//! How an attempt ends.

use serde::{Deserialize, Serialize};

/// How an attempt ended, as the worker reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The agent changed files; verification passed; the change is committed.
    Changed,
    /// The agent changed nothing; verification passed.
    Unchanged,
    /// The agent exited non-zero. Final.
    AgentFailed,
    /// A verification command failed. Final.
    VerifyFailed,
    /// The agent or a verification command passed its timeout and was killed. Final.
    TimedOut,
    /// The platform failed (clone, sandbox start, push). Retried when `retryable`.
    Infrastructure,
    /// The lease ran out before a result arrived. Retried.
    LeaseExpired,
    /// The run was cancelled.
    Cancelled,
}

impl Outcome {
    /// Every outcome, in the order of the wire's `AttemptOutcome` numbers (1-8).
    pub const ALL: [Outcome; 8] = [
        Outcome::Changed,
        Outcome::Unchanged,
        Outcome::AgentFailed,
        Outcome::VerifyFailed,
        Outcome::TimedOut,
        Outcome::Infrastructure,
        Outcome::LeaseExpired,
        Outcome::Cancelled,
    ];

    /// The name (`changed`, `agent_failed`, ...): what the CLI prints and parses, and what
    /// the state machine stores (serde). (`changed`, `agent_failed`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            Outcome::Changed => "changed",
            Outcome::Unchanged => "unchanged",
            Outcome::AgentFailed => "agent_failed",
            Outcome::VerifyFailed => "verify_failed",
            Outcome::TimedOut => "timed_out",
            Outcome::Infrastructure => "infrastructure",
            Outcome::LeaseExpired => "lease_expired",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// Parses a name; `None` for an unknown one.
    pub fn parse(name: &str) -> Option<Outcome> {
        Some(match name {
            "changed" => Outcome::Changed,
            "unchanged" => Outcome::Unchanged,
            "agent_failed" => Outcome::AgentFailed,
            "verify_failed" => Outcome::VerifyFailed,
            "timed_out" => Outcome::TimedOut,
            "infrastructure" => Outcome::Infrastructure,
            "lease_expired" => Outcome::LeaseExpired,
            "cancelled" => Outcome::Cancelled,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_and_match_serde() {
        for outcome in Outcome::ALL {
            assert_eq!(Outcome::parse(outcome.as_str()), Some(outcome));
            // The state machine stores outcomes with serde: the same names.
            let json = format!("\"{}\"", outcome.as_str());
            assert_eq!(serde_json::to_string(&outcome).unwrap(), json);
            assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), outcome);
        }
        assert_eq!(Outcome::parse("Changed"), None);
        assert_eq!(Outcome::parse(""), None);
    }
}
