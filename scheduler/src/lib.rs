//! Flotilla's replicated state machine and scheduling policy, as deterministic code.
//!
//! - [`artifact`]: patches and log tails kept outside the state, and the [`Effect`]s that store
//!   and delete them;
//! - [`spec`]: the fleet specification, its limits and validation;
//! - [`command`]: the commands in the Raft log ([`Request`] = leader time + [`Command`]) and
//!   what applying one returns ([`Response`]);
//! - [`state`]: fleets, runs, attempts, leases, events, and [`State::apply`];
//! - [`liveness`]: lease deadlines in the leader's memory (heartbeats are not log entries);
//! - [`placement`]: which pending runs go to a worker with free slots (priorities, round-robin);
//! - [`flow`], [`wave`], [`control`]: a fleet's priority, approval gate, pause, deadline,
//!   canary waves and failure budget: the spec, the pure decisions, and their application;
//! - [`limit`]: cluster-wide rate limits (GCRA) and concurrency limits, and per-repository
//!   exclusivity; [`dispatch`] puts them together with placement for `AcquireLeases`;
//! - [`rerun`]: which runs a re-run of a fleet repeats;
//! - [`token`]: API tokens, roles, permissions and principals;
//! - [`audit`]: the hash-chained audit log, one record per applied command.
//! - [`secret`]: per-project secrets as ciphertext envelopes (never values, never keys).
//!
//! What this crate must not know: clocks, randomness, the environment, files, the network, Raft,
//! gRPC. Time arrives as [`Request::now_ms`], stamped by the leader. Everything here can be
//! tested without I/O, and every replica applying the same log reaches the same [`State`].

pub mod artifact;
pub mod audit;
pub mod command;
pub mod control;
pub mod dispatch;
pub mod engine;
pub mod event;
pub mod flow;
pub mod lease;
pub mod limit;
pub mod liveness;
pub mod placement;
pub mod policy;
pub mod rerun;
pub mod schedule;
pub mod secret;
pub mod spec;
pub mod staging;
pub mod state;
pub mod token;
pub mod wave;

pub use artifact::{ArtifactKey, ArtifactKind, Effect};
pub use command::{AttemptResult, Command, FileStat, LeaseGrant, Outcome, Request, Response};
pub use policy::{ExecutionPolicy, PolicyError};
pub use spec::{AgentSpec, FieldError, FleetSpec, RetryPolicy, SandboxSpec, SpecLimits};
pub use state::{Attempt, Fleet, FleetEvent, FleetState, Run, RunCounts, RunState, State};
pub use token::{Permission, Principal, Role, Token};

#[cfg(test)]
mod flow_tests;
#[cfg(test)]
mod tests;
