//! Flotilla's domain rules, one implementation each, shared by the CLI, the server
//! (`flotilla-scheduler`'s spec validation, the API) and the worker: names, branch names,
//! repository URLs, and how an attempt ends ([`Outcome`]). Pure functions, no I/O.
//!
//! What this crate must not know: Raft, gRPC, the state machine, git processes.

pub mod branch;
pub mod name;
pub mod outcome;
pub mod repository;

pub use outcome::Outcome;
