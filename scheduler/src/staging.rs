//! Fleets submitted in parts: the repositories of a large submission are staged in bounded
//! log entries ([`crate::Command::StageRepositories`]), then one
//! [`crate::Command::SubmitStagedFleet`] creates the fleet from them, so no log entry (and no
//! AppendEntries RPC, which openraft 0.9 must finish within one heartbeat interval) grows with
//! the fleet.
//!
//! Bounds: at most [`MAX_STAGED_UPLOADS`] uploads and [`MAX_STAGED_BYTES`] of repository URLs
//! staged at once; an upload not submitted within [`STAGED_UPLOAD_TTL_MS`] of leader time since
//! its last part is dropped (when the next part or submission is applied). Only the principal
//! that staged an upload can submit it. Deterministic: time is the state's leader time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::token::Principal;

/// Most uploads staged at once.
pub const MAX_STAGED_UPLOADS: usize = 16;
/// Most bytes of repository URLs staged at once, over all uploads (each URL counts its length
/// plus [`PER_REPOSITORY_OVERHEAD_BYTES`]).
pub const MAX_STAGED_BYTES: u64 = 256 * 1024 * 1024;
/// Leader time an upload is kept after its last part, in milliseconds.
pub const STAGED_UPLOAD_TTL_MS: u64 = 10 * 60 * 1000;
/// What one staged repository costs beyond its URL's bytes (the bookkeeping of a `String`).
pub const PER_REPOSITORY_OVERHEAD_BYTES: u64 = 24;
/// Longest upload id, in bytes.
pub const MAX_UPLOAD_ID_BYTES: usize = 64;

/// The repositories staged under one upload id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedUpload {
    /// Who staged it; only they can submit it.
    pub principal: Principal,
    /// The repositories, in the order staged.
    pub repositories: Vec<String>,
    /// Their cost against [`MAX_STAGED_BYTES`].
    pub bytes: u64,
    /// Leader time of the last part.
    pub staged_at_ms: u64,
}

/// The staged uploads by upload id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staging {
    uploads: BTreeMap<String, StagedUpload>,
    /// Sum of the uploads' `bytes`.
    bytes: u64,
}

/// The cost of staging `repositories`.
pub fn staged_bytes(repositories: &[String]) -> u64 {
    repositories
        .iter()
        .map(|repository| repository.len() as u64 + PER_REPOSITORY_OVERHEAD_BYTES)
        .sum()
}

impl Staging {
    /// Drops the uploads whose last part is older than [`STAGED_UPLOAD_TTL_MS`] at `now_ms`.
    pub fn drop_expired(&mut self, now_ms: u64) {
        let expired: Vec<String> = self
            .uploads
            .iter()
            .filter(|(_, upload)| upload.staged_at_ms.saturating_add(STAGED_UPLOAD_TTL_MS) < now_ms)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.remove(&id);
        }
    }

    /// Appends `repositories` to upload `upload_id` (creating it) for `principal`; returns how
    /// many the upload holds now.
    ///
    /// # Errors
    /// A sentence naming the bound: a bad id, an upload of another principal, too many
    /// uploads, or too many bytes staged.
    pub fn stage(
        &mut self,
        now_ms: u64,
        upload_id: &str,
        repositories: &[String],
        principal: &Principal,
    ) -> Result<usize, String> {
        if upload_id.is_empty() || upload_id.len() > MAX_UPLOAD_ID_BYTES {
            return Err(format!("upload_id: must be 1-{MAX_UPLOAD_ID_BYTES} bytes"));
        }
        let bytes = staged_bytes(repositories);
        if self.bytes.saturating_add(bytes) > MAX_STAGED_BYTES {
            return Err(format!(
                "more than {MAX_STAGED_BYTES} bytes of repositories staged at once; submit again later"
            ));
        }
        if !self.uploads.contains_key(upload_id) && self.uploads.len() >= MAX_STAGED_UPLOADS {
            return Err(format!(
                "{MAX_STAGED_UPLOADS} large submissions are in progress; submit again later"
            ));
        }
        let upload = self
            .uploads
            .entry(upload_id.to_string())
            .or_insert_with(|| StagedUpload {
                principal: principal.clone(),
                repositories: Vec::new(),
                bytes: 0,
                staged_at_ms: now_ms,
            });
        if upload.principal != *principal {
            return Err(format!(
                "upload {upload_id:?} was staged by another principal"
            ));
        }
        upload.repositories.extend_from_slice(repositories);
        upload.bytes += bytes;
        upload.staged_at_ms = now_ms;
        self.bytes += bytes;
        Ok(upload.repositories.len())
    }

    /// Removes and returns upload `upload_id`'s repositories, if `principal` staged it.
    ///
    /// # Errors
    /// No such upload (never staged, expired, or submitted already), or another principal's.
    pub fn take(&mut self, upload_id: &str, principal: &Principal) -> Result<Vec<String>, String> {
        match self.uploads.get(upload_id) {
            None => Err(format!(
                "no staged upload {upload_id:?} (expired after {STAGED_UPLOAD_TTL_MS} ms, or \
                 submitted already); submit the fleet again"
            )),
            Some(upload) if upload.principal != *principal => Err(format!(
                "upload {upload_id:?} was staged by another principal"
            )),
            Some(_) => Ok(self
                .remove(upload_id)
                .map(|upload| upload.repositories)
                .unwrap_or_default()),
        }
    }

    fn remove(&mut self, upload_id: &str) -> Option<StagedUpload> {
        let upload = self.uploads.remove(upload_id)?;
        self.bytes -= upload.bytes;
        Some(upload)
    }

    /// Number of uploads staged.
    pub fn len(&self) -> usize {
        self.uploads.len()
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.uploads.is_empty()
    }

    /// The bounds and the byte tally hold.
    ///
    /// # Errors
    /// The violated invariant.
    pub fn check_invariants(&self) -> Result<(), String> {
        let sum: u64 = self.uploads.values().map(|upload| upload.bytes).sum();
        if sum != self.bytes {
            return Err(format!(
                "staged bytes {} but uploads hold {sum}",
                self.bytes
            ));
        }
        for (id, upload) in &self.uploads {
            if upload.bytes != staged_bytes(&upload.repositories) {
                return Err(format!(
                    "upload {id} bytes out of step with its repositories"
                ));
            }
        }
        if self.uploads.len() > MAX_STAGED_UPLOADS || self.bytes > MAX_STAGED_BYTES {
            return Err("staging over its bounds".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repositories(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("file:///r/{i}")).collect()
    }

    fn alice() -> Principal {
        Principal::Token {
            accessor_id: "aaaaaaaaaaaaaaaa".into(),
            name: "alice".into(),
            role: crate::token::Role::Submitter,
        }
    }

    #[test]
    fn parts_accumulate_and_are_taken_once() {
        let mut staging = Staging::default();
        assert_eq!(staging.stage(1, "u", &repositories(3), &alice()), Ok(3));
        assert_eq!(staging.stage(2, "u", &repositories(2), &alice()), Ok(5));
        staging.check_invariants().unwrap();
        let taken = staging.take("u", &alice()).unwrap();
        assert_eq!(taken.len(), 5);
        assert!(staging.is_empty());
        assert!(
            staging
                .take("u", &alice())
                .unwrap_err()
                .contains("no staged upload")
        );
        staging.check_invariants().unwrap();
    }

    #[test]
    fn another_principal_can_neither_add_nor_take() {
        let mut staging = Staging::default();
        staging.stage(1, "u", &repositories(1), &alice()).unwrap();
        let other = Principal::default();
        assert!(staging.stage(1, "u", &repositories(1), &other).is_err());
        assert!(staging.take("u", &other).is_err());
        assert_eq!(staging.take("u", &alice()).unwrap().len(), 1);
    }

    #[test]
    fn uploads_and_bytes_are_bounded_and_expire() {
        let mut staging = Staging::default();
        for upload in 0..MAX_STAGED_UPLOADS {
            staging
                .stage(1, &format!("u{upload}"), &repositories(1), &alice())
                .unwrap();
        }
        let full = staging
            .stage(1, "one-more", &repositories(1), &alice())
            .unwrap_err();
        assert!(full.contains("in progress"), "{full}");
        // Adding to an existing upload is still allowed.
        staging.stage(1, "u0", &repositories(1), &alice()).unwrap();
        staging.drop_expired(1 + STAGED_UPLOAD_TTL_MS);
        assert_eq!(
            staging.len(),
            MAX_STAGED_UPLOADS,
            "not older than the TTL yet"
        );
        staging.drop_expired(2 + STAGED_UPLOAD_TTL_MS);
        assert!(staging.is_empty());
        staging.check_invariants().unwrap();

        let huge = vec!["x".repeat(1024 * 1024); (MAX_STAGED_BYTES / (1024 * 1024)) as usize];
        let too_much = staging.stage(1, "big", &huge, &alice()).unwrap_err();
        assert!(too_much.contains("bytes of repositories"), "{too_much}");
        assert!(staging.is_empty(), "a refused part stages nothing");
        assert!(staging.stage(1, "", &repositories(1), &alice()).is_err());
    }
}
