//! Fenced publishing: every write an attempt makes to its branch on the origin is a
//! compare-and-swap that lets the branch move only to the same or a higher attempt of the run.
//!
//! The commit an attempt makes carries trailers naming the run and the attempt (its fencing
//! token), see [`AttemptIdentity::trailers`]:
//!
//! ```text
//! Flotilla-Run: fl-3-7
//! Flotilla-Fleet-Created-Ms: 1732374000123
//! Flotilla-Attempt: 2
//! ```
//!
//! ([`AttemptIdentity::fleet_created_at_ms`] tells apart runs of different clusters that share a
//! run id.) Before writing, the worker reads the branch's current commit on the origin
//! (`ls-remote`, then fetches it to read its trailers) and decides ([`decide_push`],
//! [`decide_withdrawal`]):
//!
//! - the branch holds a commit of this run from a **higher attempt**: this attempt is stale (the
//!   cluster has re-leased the run); it writes nothing ([`PublishError::Superseded`]);
//! - otherwise (absent, a lower or the same attempt of this run, or anything else) it writes with
//!   `git push --force-with-lease=refs/heads/<branch>:<the commit it read>` (empty: the branch
//!   must not exist). If the branch moved in between, the push is refused, and the worker reads
//!   again and decides again (at most [`MAX_PUBLISH_TRIES`] times).
//!
//! So the branch only ever moves from an attempt of a run to the same or a higher attempt of
//! it: once the accepted (last) attempt pushed, no lower attempt can overwrite it, and no higher
//! attempt exists. Every write also needs the attempt's lease to be valid for at least the push
//! margin ([`crate::config::WorkerConfig::push_lease_margin_ms`], checked with
//! [`LeaseDeadline`]), so a worker that cannot prove it still holds the lease writes nothing.
//!
//! An attempt that ends without pushing (`unchanged`, or a final failure) **withdraws** what an
//! earlier execution of this run pushed: if the branch holds a commit of this run from the same
//! or a lower attempt, it is deleted, again with `--force-with-lease`. Then the branch and the
//! recorded result agree: the branch is the accepted attempt's commit, or absent when the
//! accepted attempt pushed nothing. One case is left to the lease margin alone: a stale attempt
//! that passed its lease check and then stalled for longer than the margin (a paused process)
//! can still create the branch after the accepted attempt withdrew it, because an absent branch
//! carries no attempt number. And a run that ends `failed` without a worker's final word (its
//! last attempt's lease expired, or its last attempt failed retryably, e.g. at the push) keeps
//! whatever an earlier attempt pushed: nobody is left to withdraw it; such a branch is not a
//! result (the run says `failed`).

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::git::{Git, GitError};
use crate::lease::LeaseDeadline;

/// Trailer naming the run.
pub const RUN_TRAILER: &str = "Flotilla-Run";
/// Trailer with the fleet's submission time (leader milliseconds since the Unix epoch).
pub const FLEET_CREATED_TRAILER: &str = "Flotilla-Fleet-Created-Ms";
/// Trailer with the attempt number (fencing token).
pub const ATTEMPT_TRAILER: &str = "Flotilla-Attempt";
/// How often a write is tried again after the branch moved under it.
pub const MAX_PUBLISH_TRIES: u32 = 4;
/// Local ref into which the observed commit of the branch is fetched.
const OBSERVED_REF: &str = "refs/flotilla/observed";

/// Which attempt of which run made a commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptIdentity {
    /// The run id, e.g. `fl-3-7`.
    pub run_id: String,
    /// The fleet's submission time, leader milliseconds since the Unix epoch.
    pub fleet_created_at_ms: u64,
    /// The attempt number.
    pub attempt: u32,
}

impl AttemptIdentity {
    /// The trailer paragraph of a commit message (three `Key: value` lines, no trailing
    /// newline).
    pub fn trailers(&self) -> String {
        format!(
            "{RUN_TRAILER}: {}\n{FLEET_CREATED_TRAILER}: {}\n{ATTEMPT_TRAILER}: {}",
            self.run_id, self.fleet_created_at_ms, self.attempt
        )
    }

    /// The identity in the trailers of a commit message's last paragraph, if all three are
    /// there and well-formed.
    pub fn parse(message: &str) -> Option<AttemptIdentity> {
        let trimmed = message.trim_end();
        let last = trimmed.rsplit("\n\n").next().unwrap_or(trimmed);
        let value = |key: &str| {
            last.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                (name.trim() == key).then(|| value.trim().to_owned())
            })
        };
        let run_id = value(RUN_TRAILER).filter(|run_id| !run_id.is_empty())?;
        Some(AttemptIdentity {
            run_id,
            fleet_created_at_ms: value(FLEET_CREATED_TRAILER)?.parse().ok()?,
            attempt: value(ATTEMPT_TRAILER)?.parse().ok()?,
        })
    }

    /// Whether `other` is an attempt of the same run.
    pub fn same_run(&self, other: &AttemptIdentity) -> bool {
        self.run_id == other.run_id && self.fleet_created_at_ms == other.fleet_created_at_ms
    }
}

/// The branch on the origin, as read before a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteBranch {
    /// It does not exist.
    Absent,
    /// It points at `commit`, made by `identity` (`None`: not a Flotilla attempt's commit).
    Commit {
        /// The commit id (hex).
        commit: String,
        /// Its trailers.
        identity: Option<AttemptIdentity>,
    },
}

impl RemoteBranch {
    /// The value for `--force-with-lease=<ref>:<expect>`: the commit, or empty for absent.
    fn expected(&self) -> &str {
        match self {
            RemoteBranch::Absent => "",
            RemoteBranch::Commit { commit, .. } => commit,
        }
    }
}

/// What to do about a push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushDecision {
    /// Push, expecting the branch to be as observed.
    Push,
    /// The branch already holds this commit.
    AlreadyPushed,
    /// A higher attempt of this run holds the branch: write nothing.
    Superseded {
        /// That attempt.
        attempt: u32,
    },
}

/// Whether attempt `own` may push `head` over `observed` (see the module documentation).
pub fn decide_push(observed: &RemoteBranch, own: &AttemptIdentity, head: &str) -> PushDecision {
    match observed {
        RemoteBranch::Commit { commit, .. } if commit == head => PushDecision::AlreadyPushed,
        RemoteBranch::Commit {
            identity: Some(identity),
            ..
        } if identity.same_run(own) && identity.attempt > own.attempt => PushDecision::Superseded {
            attempt: identity.attempt,
        },
        _ => PushDecision::Push,
    }
}

/// What to do at the end of an attempt that pushed nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WithdrawalDecision {
    /// Nothing of this run is on the branch (absent, or someone else's commit): leave it.
    Nothing,
    /// The branch holds a commit of this run from the same or a lower attempt: delete it.
    Delete,
    /// A higher attempt of this run holds the branch: leave it.
    Superseded {
        /// That attempt.
        attempt: u32,
    },
}

/// Whether attempt `own`, which pushed nothing, must delete `observed`.
pub fn decide_withdrawal(observed: &RemoteBranch, own: &AttemptIdentity) -> WithdrawalDecision {
    match observed {
        RemoteBranch::Commit {
            identity: Some(identity),
            ..
        } if identity.same_run(own) => {
            if identity.attempt > own.attempt {
                WithdrawalDecision::Superseded {
                    attempt: identity.attempt,
                }
            } else {
                WithdrawalDecision::Delete
            }
        }
        _ => WithdrawalDecision::Nothing,
    }
}

/// Why a fenced write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// git failed.
    #[error(transparent)]
    Git(#[from] GitError),
    /// The lease is not valid for long enough to start a write.
    #[error(
        "the lease is valid for only {remaining_ms} ms, less than push_lease_margin_ms ({margin_ms} ms): not written to the origin"
    )]
    LeaseTooShort {
        /// How long the lease is still certainly valid.
        remaining_ms: u64,
        /// The configured margin.
        margin_ms: u64,
    },
    /// A higher attempt of this run holds the branch.
    #[error("stale attempt: branch {branch} already holds attempt {attempt} of this run")]
    Superseded {
        /// The branch.
        branch: String,
        /// The attempt on it.
        attempt: u32,
    },
    /// The branch is outside the worker's branch prefix.
    #[error("branch {branch:?} is outside the worker's branch prefix {prefix:?}; not written")]
    OutsidePrefix {
        /// The branch.
        branch: String,
        /// The prefix.
        prefix: String,
    },
    /// The branch kept moving between reading and writing it.
    #[error("branch {branch} kept changing on the origin; gave up after {tries} tries")]
    Contended {
        /// The branch.
        branch: String,
        /// Tries made.
        tries: u32,
    },
}

impl PublishError {
    /// Whether another attempt may succeed: everything but a branch outside the prefix or
    /// invalid input.
    pub fn is_retryable(&self) -> bool {
        match self {
            PublishError::Git(error) => error.is_retryable(),
            PublishError::OutsidePrefix { .. } => false,
            _ => true,
        }
    }

    /// Whether the error came from cancellation.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, PublishError::Git(error) if error.is_cancelled())
    }
}

/// Where and under which fence an attempt writes.
#[derive(Clone, Debug)]
pub struct PublishTarget<'a> {
    /// The attempt's clone (a git repository; `refs/flotilla/observed` is written in it).
    pub directory: &'a Path,
    /// The origin's URL, credentials included.
    pub url: &'a str,
    /// The branch name (without `refs/heads/`).
    pub branch: &'a str,
    /// Branches must start with this.
    pub prefix: &'a str,
    /// The attempt.
    pub identity: &'a AttemptIdentity,
    /// The attempt's lease as the worker sees it.
    pub lease: &'a LeaseDeadline,
    /// How long the lease must still be valid when a write starts.
    pub margin: Duration,
}

impl PublishTarget<'_> {
    fn reference(&self) -> String {
        format!("refs/heads/{}", self.branch)
    }

    fn check_prefix(&self) -> Result<(), PublishError> {
        if self.branch.starts_with(self.prefix) && !self.prefix.is_empty() {
            Ok(())
        } else {
            Err(PublishError::OutsidePrefix {
                branch: self.branch.to_owned(),
                prefix: self.prefix.to_owned(),
            })
        }
    }

    fn check_lease(&self) -> Result<(), PublishError> {
        if self.lease.is_valid_for(self.margin) {
            Ok(())
        } else {
            Err(PublishError::LeaseTooShort {
                remaining_ms: self.lease.remaining().as_millis() as u64,
                margin_ms: self.margin.as_millis() as u64,
            })
        }
    }

    fn lease_option(&self, observed: &RemoteBranch) -> String {
        format!(
            "--force-with-lease={}:{}",
            self.reference(),
            observed.expected()
        )
    }

    /// The one write to the origin: checks the lease margin, then pushes `refspec` only if the
    /// branch still is `observed` (compare-and-swap with `--force-with-lease`).
    ///
    /// Errors: [`PublishError::LeaseTooShort`]; the outer `Ok` carries git's own result, so the
    /// caller can tell a lost race (the branch moved) from other failures.
    async fn compare_and_swap(
        &self,
        git: &Git,
        observed: &RemoteBranch,
        refspec: &str,
        cancel: &CancellationToken,
    ) -> Result<Result<crate::git::GitOutput, GitError>, PublishError> {
        self.check_lease()?;
        let lease = self.lease_option(observed);
        Ok(git
            .run(
                self.directory,
                [
                    "push",
                    "--quiet",
                    "--no-verify",
                    lease.as_str(),
                    "--",
                    self.url,
                    refspec,
                ],
                cancel,
            )
            .await)
    }
}

/// Reads the branch on the origin: its commit (fetched into the clone to read the trailers)
/// or [`RemoteBranch::Absent`].
///
/// Errors: [`GitError`] (e.g. the origin is unreachable).
pub async fn observe(
    git: &Git,
    target: &PublishTarget<'_>,
    cancel: &CancellationToken,
) -> Result<RemoteBranch, GitError> {
    let reference = target.reference();
    let listed = git
        .run_unchecked(
            target.directory,
            [
                OsStr::new("ls-remote"),
                OsStr::new("--exit-code"),
                OsStr::new("--"),
                OsStr::new(target.url),
                OsStr::new(&reference),
            ],
            64 * 1024,
            cancel,
        )
        .await?;
    match listed.exit_code {
        Some(2) => return Ok(RemoteBranch::Absent),
        Some(0) => {}
        other => {
            return Err(GitError::Failed {
                command: format!("ls-remote {reference}"),
                status: format!("{other:?}"),
                stderr: listed.stderr,
            });
        }
    }
    // ls-remote matches patterns against ref tails: keep the exact ref only.
    let exact = String::from_utf8_lossy(&listed.stdout).lines().any(|line| {
        line.split_once('\t')
            .is_some_and(|(_, name)| name == reference)
    });
    if !exact {
        return Ok(RemoteBranch::Absent);
    }
    let refspec = format!("+{reference}:{OBSERVED_REF}");
    git.run(
        target.directory,
        [
            "fetch",
            "--quiet",
            "--no-tags",
            "--no-write-fetch-head",
            "--",
            target.url,
            refspec.as_str(),
        ],
        cancel,
    )
    .await?;
    let commit = git
        .run_text(
            target.directory,
            ["rev-parse", "--verify", OBSERVED_REF],
            cancel,
        )
        .await?;
    let message = git
        .run(
            target.directory,
            ["log", "-1", "--format=%B", commit.as_str(), "--"],
            cancel,
        )
        .await?;
    Ok(RemoteBranch::Commit {
        identity: AttemptIdentity::parse(&String::from_utf8_lossy(&message.stdout)),
        commit,
    })
}

/// Pushes the clone's HEAD to the branch under the fence (see the module documentation).
/// Returns the commit pushed.
///
/// Errors: [`PublishError`]; [`PublishError::Superseded`] when a higher attempt holds the
/// branch, [`PublishError::LeaseTooShort`] when the lease ran too low before a write.
pub async fn push_fenced(
    git: &Git,
    target: &PublishTarget<'_>,
    cancel: &CancellationToken,
) -> Result<String, PublishError> {
    target.check_prefix()?;
    let head = git
        .run_text(target.directory, ["rev-parse", "--verify", "HEAD"], cancel)
        .await?;
    let refspec = format!("HEAD:{}", target.reference());
    for _ in 0..MAX_PUBLISH_TRIES {
        let observed = observe(git, target, cancel).await?;
        match decide_push(&observed, target.identity, &head) {
            PushDecision::AlreadyPushed => return Ok(head),
            PushDecision::Superseded { attempt } => {
                return Err(PublishError::Superseded {
                    branch: target.branch.to_owned(),
                    attempt,
                });
            }
            PushDecision::Push => {}
        }
        let pushed = target
            .compare_and_swap(git, &observed, &refspec, cancel)
            .await?;
        match pushed {
            Ok(_) => return Ok(head),
            Err(error) if error.is_cancelled() => return Err(error.into()),
            Err(error) => {
                // Refused because the branch moved? Then decide again; otherwise it failed.
                if observe(git, target, cancel).await? == observed {
                    return Err(error.into());
                }
            }
        }
    }
    Err(PublishError::Contended {
        branch: target.branch.to_owned(),
        tries: MAX_PUBLISH_TRIES,
    })
}

/// What [`withdraw_fenced`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Withdrawal {
    /// Nothing of this run was on the branch.
    Nothing,
    /// The commit of an earlier execution of this run was deleted.
    Deleted {
        /// The deleted branch's commit.
        commit: String,
        /// The attempt that made it.
        attempt: u32,
    },
    /// A higher attempt holds the branch (this attempt is stale); left alone.
    Superseded {
        /// That attempt.
        attempt: u32,
    },
}

/// For an attempt that pushed nothing: deletes the branch if it holds a commit of this run
/// from the same or a lower attempt, with the same fence as [`push_fenced`].
///
/// Errors: [`PublishError`]; [`PublishError::LeaseTooShort`] only when there is something to
/// delete.
pub async fn withdraw_fenced(
    git: &Git,
    target: &PublishTarget<'_>,
    cancel: &CancellationToken,
) -> Result<Withdrawal, PublishError> {
    target.check_prefix()?;
    let refspec = format!(":{}", target.reference());
    for _ in 0..MAX_PUBLISH_TRIES {
        let observed = observe(git, target, cancel).await?;
        let attempt = match (&observed, decide_withdrawal(&observed, target.identity)) {
            (_, WithdrawalDecision::Nothing) => return Ok(Withdrawal::Nothing),
            (_, WithdrawalDecision::Superseded { attempt }) => {
                return Ok(Withdrawal::Superseded { attempt });
            }
            (
                RemoteBranch::Commit {
                    identity: Some(identity),
                    ..
                },
                WithdrawalDecision::Delete,
            ) => identity.attempt,
            (_, WithdrawalDecision::Delete) => 0,
        };
        let deleted = target
            .compare_and_swap(git, &observed, &refspec, cancel)
            .await?;
        match deleted {
            Ok(_) => {
                return Ok(Withdrawal::Deleted {
                    commit: observed.expected().to_owned(),
                    attempt,
                });
            }
            Err(error) if error.is_cancelled() => return Err(error.into()),
            Err(error) => {
                if observe(git, target, cancel).await? == observed {
                    return Err(error.into());
                }
            }
        }
    }
    Err(PublishError::Contended {
        branch: target.branch.to_owned(),
        tries: MAX_PUBLISH_TRIES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(run_id: &str, created: u64, attempt: u32) -> AttemptIdentity {
        AttemptIdentity {
            run_id: run_id.to_owned(),
            fleet_created_at_ms: created,
            attempt,
        }
    }

    fn commit(id: &str, identity: Option<AttemptIdentity>) -> RemoteBranch {
        RemoteBranch::Commit {
            commit: id.to_owned(),
            identity,
        }
    }

    #[test]
    fn trailers_round_trip_and_only_the_last_paragraph_counts() {
        let own = identity("fl-3-7", 1_732_374_000_123, 2);
        let message = format!("Format with rustfmt\n\nBody text.\n\n{}\n", own.trailers());
        assert_eq!(AttemptIdentity::parse(&message), Some(own.clone()));
        // Trailers quoted in the body, followed by another paragraph, do not count.
        let quoted = format!("Subject\n\n{}\n\nSigned-off-by: someone", own.trailers());
        assert_eq!(AttemptIdentity::parse(&quoted), None);
        assert_eq!(AttemptIdentity::parse("Subject only"), None);
        assert_eq!(
            AttemptIdentity::parse(
                "S\n\nFlotilla-Run: fl-1-0\nFlotilla-Fleet-Created-Ms: x\nFlotilla-Attempt: 1"
            ),
            None
        );
    }

    #[test]
    fn pushes_move_the_branch_only_to_the_same_or_higher_attempts() {
        let own = identity("fl-1-0", 5, 2);
        assert_eq!(
            decide_push(&RemoteBranch::Absent, &own, "h"),
            PushDecision::Push
        );
        for attempt in [1, 2] {
            assert_eq!(
                decide_push(
                    &commit("c", Some(identity("fl-1-0", 5, attempt))),
                    &own,
                    "h"
                ),
                PushDecision::Push,
                "attempt {attempt}"
            );
        }
        assert_eq!(
            decide_push(&commit("c", Some(identity("fl-1-0", 5, 3))), &own, "h"),
            PushDecision::Superseded { attempt: 3 }
        );
        // Another run, another cluster's run with the same id, a human's commit: overwritten.
        for other in [
            Some(identity("fl-1-1", 5, 9)),
            Some(identity("fl-1-0", 6, 9)),
            None,
        ] {
            assert_eq!(
                decide_push(&commit("c", other), &own, "h"),
                PushDecision::Push
            );
        }
        assert_eq!(
            decide_push(&commit("h", None), &own, "h"),
            PushDecision::AlreadyPushed
        );
    }

    #[test]
    fn withdrawals_delete_only_this_runs_earlier_commits() {
        let own = identity("fl-1-0", 5, 2);
        assert_eq!(
            decide_withdrawal(&RemoteBranch::Absent, &own),
            WithdrawalDecision::Nothing
        );
        for attempt in [1, 2] {
            assert_eq!(
                decide_withdrawal(&commit("c", Some(identity("fl-1-0", 5, attempt))), &own),
                WithdrawalDecision::Delete
            );
        }
        assert_eq!(
            decide_withdrawal(&commit("c", Some(identity("fl-1-0", 5, 4))), &own),
            WithdrawalDecision::Superseded { attempt: 4 }
        );
        assert_eq!(
            decide_withdrawal(&commit("c", Some(identity("fl-1-0", 6, 1))), &own),
            WithdrawalDecision::Nothing
        );
        assert_eq!(
            decide_withdrawal(&commit("c", None), &own),
            WithdrawalDecision::Nothing
        );
    }
}
