//! Per-project secrets as the replicated state holds them: names, versions and ciphertext.
//!
//! The state never holds a secret's value, nor a key that decrypts it. Each secret is an
//! envelope made at the node edge (`node/src/secrets.rs`): the value encrypted with a fresh
//! random data key (AES-256-GCM), the data key encrypted ("wrapped") with a key-encryption key
//! that lives in each node's configuration, outside the log, and named here by its `key_id`.
//! Both ciphertexts are bound (associated data) to the project, the name and the version, so an
//! envelope copied to another name or version does not decrypt. This module only stores and
//! replaces envelopes, deterministically; it never looks inside one.
//!
//! Versions: a secret is created at version 1 and every `SetSecret` of it must carry the next
//! version (a compare-and-swap), so two concurrent writers cannot both win with envelopes
//! bound to the same version. Deleting a secret forgets it, version included.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::Response;

/// The encrypted form of one secret version. Opaque to the state machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretEnvelope {
    /// Id of the key-encryption key that wrapped `wrapped_data_key` (not secret: a digest of
    /// the key).
    pub key_id: String,
    /// Standard base64 of `nonce (12 bytes) || AES-256-GCM(key-encryption key, data key)`.
    pub wrapped_data_key: String,
    /// Standard base64 of `nonce (12 bytes) || AES-256-GCM(data key, value)`.
    pub ciphertext: String,
}

/// One secret in the state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSecret {
    /// 1, 2, 3...: bumped by every `SetSecret`.
    pub version: u64,
    /// Leader time the secret was created (version 1), ms since the Unix epoch.
    pub created_at_ms: u64,
    /// Leader time of the latest version, ms since the Unix epoch.
    pub updated_at_ms: u64,
    /// Size of the plaintext value in bytes.
    pub value_size_bytes: u64,
    /// The value, encrypted.
    pub envelope: SecretEnvelope,
}

/// Every project's secrets: project -> name -> secret.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secrets {
    projects: BTreeMap<String, BTreeMap<String, StoredSecret>>,
}

impl Secrets {
    /// The secret `name` of `project`, if it exists.
    pub fn get(&self, project: &str, name: &str) -> Option<&StoredSecret> {
        self.projects.get(project)?.get(name)
    }

    /// The secrets of `project`, ordered by name.
    pub fn of_project<'a>(
        &'a self,
        project: &str,
    ) -> impl Iterator<Item = (&'a String, &'a StoredSecret)> + 'a {
        self.projects.get(project).into_iter().flatten()
    }

    /// Every secret as `(project, name, secret)`, ordered by project then name.
    pub fn all(&self) -> impl Iterator<Item = (&String, &String, &StoredSecret)> {
        self.projects
            .iter()
            .flat_map(|(project, secrets)| secrets.iter().map(move |(n, s)| (project, n, s)))
    }

    /// Number of secrets over all projects.
    pub fn total(&self) -> usize {
        self.projects.values().map(BTreeMap::len).sum()
    }

    /// Applies `SetSecret`: stores `envelope` as `version` of `project/name` when `version` is
    /// the next one (1 for a new secret) and the limits allow a new secret.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn set(
        &mut self,
        now_ms: u64,
        project: &str,
        name: &str,
        version: u64,
        value_size_bytes: u64,
        envelope: &SecretEnvelope,
        max_secrets_per_project: u32,
        max_secrets_total: u32,
    ) -> Response {
        let current = self.get(project, name).map(|s| s.version);
        let expected = current.map_or(1, |v| v.saturating_add(1));
        if version != expected {
            return Response::Rejected {
                reason: format!(
                    "secret {name:?} of project {project:?} is at version {}, so the next is {expected}, not {version} (a concurrent update); retry",
                    current.unwrap_or(0)
                ),
            };
        }
        if current.is_none() {
            let in_project = self.projects.get(project).map_or(0, BTreeMap::len);
            if in_project >= max_secrets_per_project as usize {
                return Response::Rejected {
                    reason: format!(
                        "project {project:?} already has {in_project} secrets (limits.max_secrets_per_project is {max_secrets_per_project})"
                    ),
                };
            }
            if self.total() >= max_secrets_total as usize {
                return Response::Rejected {
                    reason: format!(
                        "the cluster already holds {} secrets (limits.max_secrets_total is {max_secrets_total})",
                        self.total()
                    ),
                };
            }
        }
        let created_at_ms = self.get(project, name).map_or(now_ms, |s| s.created_at_ms);
        self.projects.entry(project.to_owned()).or_default().insert(
            name.to_owned(),
            StoredSecret {
                version,
                created_at_ms,
                updated_at_ms: now_ms,
                value_size_bytes,
                envelope: envelope.clone(),
            },
        );
        Response::SecretSet { version }
    }

    /// Applies `DeleteSecret`.
    pub(crate) fn delete(&mut self, project: &str, name: &str) -> Response {
        let existed = self
            .projects
            .get_mut(project)
            .and_then(|secrets| secrets.remove(name))
            .is_some();
        if self.projects.get(project).is_some_and(BTreeMap::is_empty) {
            self.projects.remove(project);
        }
        Response::SecretDeleted { existed }
    }

    /// Applies `RewrapSecret`: replaces the key id and wrapped data key of `version` of
    /// `project/name`, keeping its ciphertext (the data key is the same, only wrapped under
    /// another key-encryption key). Rejected when the secret is gone or at another version.
    pub(crate) fn rewrap(
        &mut self,
        project: &str,
        name: &str,
        version: u64,
        key_id: &str,
        wrapped_data_key: &str,
    ) -> Response {
        let Some(secret) = self
            .projects
            .get_mut(project)
            .and_then(|secrets| secrets.get_mut(name))
        else {
            return Response::Rejected {
                reason: format!("no secret {name:?} in project {project:?}"),
            };
        };
        if secret.version != version {
            return Response::Rejected {
                reason: format!(
                    "secret {name:?} of project {project:?} is at version {}, not {version} (updated meanwhile); retry",
                    secret.version
                ),
            };
        }
        secret.envelope.key_id = key_id.to_owned();
        secret.envelope.wrapped_data_key = wrapped_data_key.to_owned();
        Response::SecretRewrapped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(key_id: &str) -> SecretEnvelope {
        SecretEnvelope {
            key_id: key_id.into(),
            wrapped_data_key: "d3JhcHBlZA==".into(),
            ciphertext: "Y2lwaGVy".into(),
        }
    }

    #[test]
    fn versions_are_compare_and_swap_and_limits_hold() {
        let mut secrets = Secrets::default();
        let e = envelope("k1");
        assert_eq!(
            secrets.set(10, "p", "a", 1, 5, &e, 2, 3),
            Response::SecretSet { version: 1 }
        );
        // Same version again: a concurrent writer lost.
        assert!(matches!(
            secrets.set(11, "p", "a", 1, 5, &e, 2, 3),
            Response::Rejected { .. }
        ));
        assert_eq!(
            secrets.set(12, "p", "a", 2, 6, &e, 2, 3),
            Response::SecretSet { version: 2 }
        );
        let a = secrets.get("p", "a").unwrap();
        assert_eq!(
            (a.created_at_ms, a.updated_at_ms, a.value_size_bytes),
            (10, 12, 6)
        );
        assert_eq!(
            secrets.set(13, "p", "b", 1, 5, &e, 2, 3),
            Response::SecretSet { version: 1 }
        );
        let Response::Rejected { reason } = secrets.set(14, "p", "c", 1, 5, &e, 2, 3) else {
            panic!("per-project limit not applied");
        };
        assert!(reason.contains("max_secrets_per_project"), "{reason}");
        assert_eq!(
            secrets.set(15, "q", "c", 1, 5, &e, 2, 3),
            Response::SecretSet { version: 1 }
        );
        let Response::Rejected { reason } = secrets.set(16, "r", "d", 1, 5, &e, 2, 3) else {
            panic!("total limit not applied");
        };
        assert!(reason.contains("max_secrets_total"), "{reason}");
        // Updating an existing secret is not a new one.
        assert_eq!(
            secrets.set(17, "p", "b", 2, 5, &e, 2, 3),
            Response::SecretSet { version: 2 }
        );
        assert_eq!(
            secrets.delete("q", "c"),
            Response::SecretDeleted { existed: true }
        );
        assert_eq!(
            secrets.delete("q", "c"),
            Response::SecretDeleted { existed: false }
        );
        assert_eq!(secrets.total(), 2);
    }

    #[test]
    fn rewrap_keeps_the_ciphertext_and_checks_the_version() {
        let mut secrets = Secrets::default();
        secrets.set(1, "p", "a", 1, 5, &envelope("old"), 10, 10);
        assert!(matches!(
            secrets.rewrap("p", "a", 2, "new", "bmV3"),
            Response::Rejected { .. }
        ));
        assert_eq!(
            secrets.rewrap("p", "a", 1, "new", "bmV3"),
            Response::SecretRewrapped
        );
        let a = secrets.get("p", "a").unwrap();
        assert_eq!(a.envelope.key_id, "new");
        assert_eq!(a.envelope.wrapped_data_key, "bmV3");
        assert_eq!(a.envelope.ciphertext, "Y2lwaGVy");
        assert!(matches!(
            secrets.rewrap("p", "missing", 1, "new", "bmV3"),
            Response::Rejected { .. }
        ));
    }
}
