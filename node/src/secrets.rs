//! Envelope encryption of secrets at the node edge, and the key-encryption keys.
//!
//! A secret's value is encrypted with a fresh random 256-bit data key (AES-256-GCM, random
//! 96-bit nonce); the data key is encrypted ("wrapped") with a key-encryption key (KEK) read from
//! a key file of this node's configuration. Only the envelope ([`SecretEnvelope`]: the KEK's id,
//! the wrapped data key, the ciphertext) enters the Raft log and the state; the KEK never does.
//! Both encryptions are bound by associated data to the project, the name and the version
//! (the wrap also to the KEK's id), so an envelope moved to another secret or version fails to
//! decrypt. Randomness and keys exist only here, never in the deterministic state machine.
//!
//! Key files: one line `flotilla-secret-key-v1 <base64 of 32 bytes>`, mode 0600 (no group or
//! other bits) — `flotilla secret keygen` writes one. Every node of a cluster must hold the
//! same current key (and the same older keys): the operator copies the file to each node over
//! a secure channel, as with any cluster key. A key's id is `k-` and the first 16 hex digits of
//! SHA-256 over a domain prefix and the key, so ids agree on every node without naming them.
//!
//! Rotation: configure a new `secrets.key_file` on every node and list the old one in
//! `secrets.previous_key_files`; `flotilla secret rotate` then re-wraps every data key under the
//! new key (the ciphertext is unchanged), after which the old file can be removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload, rand_core::RngCore};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use flotilla_scheduler::secret::SecretEnvelope;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// First word of a key file.
pub const KEY_FILE_HEADER: &str = "flotilla-secret-key-v1";
/// Shortest secret value accepted, in bytes: shorter values cannot be redacted from logs without
/// mangling them (every occurrence of a 3-byte string would be masked).
pub const MIN_SECRET_VALUE_BYTES: usize = 8;
const NONCE_BYTES: usize = 12;
const KEY_BYTES: usize = 32;

/// Why a key file, an encryption or a decryption failed. Messages never contain key material
/// or secret values.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The key file cannot be read or created.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file is not `flotilla-secret-key-v1 <base64 of 32 bytes>`, or is readable by
    /// others.
    #[error("key file {path}: {message}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// This node has no key file configured (`secrets.key_file`).
    #[error("this node has no secrets key (secrets.key_file is not set): secrets are disabled")]
    Disabled,
    /// The envelope names a key this node does not hold.
    #[error(
        "the secret is wrapped by key {key_id}, which this node does not hold (secrets.key_file, secrets.previous_key_files)"
    )]
    UnknownKey {
        /// The key's id.
        key_id: String,
    },
    /// The envelope is malformed or does not decrypt (wrong key, tampered, or moved to another
    /// name or version).
    #[error("the secret does not decrypt: {0}")]
    Corrupt(&'static str),
}

/// A key-encryption key.
struct Kek {
    id: String,
    cipher: Aes256Gcm,
}

/// The key-encryption keys of this node: the current one (for new secrets and re-wrapping) and
/// older ones (for decryption only).
pub struct Keyring {
    current: Option<Kek>,
    keys: BTreeMap<String, Aes256Gcm>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current.as_ref().map(|k| k.id.as_str()))
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The id of `key`: `k-` + 16 hex digits of SHA-256("flotilla-secret-key-id\0" || key).
fn key_id(key: &[u8]) -> String {
    let digest = Sha256::new()
        .chain_update(b"flotilla-secret-key-id\0")
        .chain_update(key)
        .finalize();
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("k-{hex}")
}

/// Associated data of a secret's value or of its wrapped data key.
fn associated_data(
    purpose: &str,
    project: &str,
    name: &str,
    version: u64,
    key_id: &str,
) -> Vec<u8> {
    format!("flotilla-secret-v1\0{purpose}\0{project}\0{name}\0{version}\0{key_id}").into_bytes()
}

fn seal(cipher: &Aes256Gcm, plaintext: &[u8], aad: &[u8]) -> Result<String, SecretsError> {
    let mut nonce = [0u8; NONCE_BYTES];
    OsRng.fill_bytes(&mut nonce);
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .map_err(|_| SecretsError::Corrupt("encryption failed"))?;
    let mut bytes = nonce.to_vec();
    bytes.extend_from_slice(&sealed);
    Ok(STANDARD.encode(bytes))
}

fn open(cipher: &Aes256Gcm, sealed: &str, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, SecretsError> {
    let bytes = STANDARD
        .decode(sealed)
        .map_err(|_| SecretsError::Corrupt("not base64"))?;
    if bytes.len() < NONCE_BYTES + 16 {
        return Err(SecretsError::Corrupt("too short"));
    }
    let (nonce, sealed) = bytes.split_at(NONCE_BYTES);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
        .map(Zeroizing::new)
        .map_err(|_| SecretsError::Corrupt("authentication failed"))
}

/// Writes a new random key file at `path` (mode 0600, refusing to overwrite one), returning the
/// key's id.
///
/// # Errors
/// [`SecretsError::Io`] when the file exists or cannot be written.
pub fn generate_key_file(path: &Path) -> Result<String, SecretsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| SecretsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    OsRng.fill_bytes(key.as_mut());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    let mut line = Zeroizing::new(format!(
        "{KEY_FILE_HEADER} {}\n",
        STANDARD.encode(key.as_ref())
    ));
    file.write_all(line.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)?;
    line.zeroize();
    Ok(key_id(key.as_ref()))
}

/// Reads a key file: checks its mode (no group or other permission bits) and format.
fn read_key_file(path: &Path) -> Result<Kek, SecretsError> {
    use std::os::unix::fs::MetadataExt as _;
    let bad = |message: String| SecretsError::BadKeyFile {
        path: path.to_path_buf(),
        message,
    };
    let metadata = std::fs::metadata(path).map_err(|source| SecretsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if metadata.mode() & 0o077 != 0 {
        return Err(bad(format!(
            "mode {:o} lets others read it; chmod 600 it",
            metadata.mode() & 0o777
        )));
    }
    if metadata.len() > 1024 {
        return Err(bad("larger than 1 KiB; not a key file".into()));
    }
    let text =
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| SecretsError::Io {
                path: path.to_path_buf(),
                source,
            })?,
        );
    let mut words = text.split_whitespace();
    if words.next() != Some(KEY_FILE_HEADER) {
        return Err(bad(format!(
            "does not start with {KEY_FILE_HEADER:?} (create one with `flotilla secret keygen`)"
        )));
    }
    let key = words
        .next()
        .and_then(|word| STANDARD.decode(word).ok())
        .map(Zeroizing::new)
        .filter(|key| key.len() == KEY_BYTES)
        .ok_or_else(|| bad("the key is not base64 of 32 bytes".into()))?;
    if words.next().is_some() {
        return Err(bad("unexpected text after the key".into()));
    }
    Ok(Kek {
        id: key_id(&key),
        cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key)),
    })
}

/// A decrypted secret value; zeroed when dropped.
pub type SecretValue = Zeroizing<String>;

impl Keyring {
    /// A keyring without keys: every operation answers [`SecretsError::Disabled`] or
    /// [`SecretsError::UnknownKey`].
    pub fn disabled() -> Self {
        Keyring {
            current: None,
            keys: BTreeMap::new(),
        }
    }

    /// Loads the current key file (`None`: secrets disabled) and the older ones.
    ///
    /// # Errors
    /// A file that cannot be read, has a bad format, or is readable by group or others.
    pub fn load(current: Option<&Path>, previous: &[PathBuf]) -> Result<Self, SecretsError> {
        let mut keyring = Keyring::disabled();
        for path in previous {
            let kek = read_key_file(path)?;
            keyring.keys.insert(kek.id, kek.cipher);
        }
        if let Some(path) = current {
            let kek = read_key_file(path)?;
            keyring.keys.insert(kek.id.clone(), kek.cipher.clone());
            keyring.current = Some(kek);
        }
        Ok(keyring)
    }

    /// The current key's id, `None` when secrets are disabled.
    pub fn current_key_id(&self) -> Option<&str> {
        self.current.as_ref().map(|k| k.id.as_str())
    }

    /// Encrypts `value` as `version` of `project/name` under a fresh data key wrapped by the
    /// current key.
    ///
    /// # Errors
    /// [`SecretsError::Disabled`] without a current key.
    pub fn seal(
        &self,
        project: &str,
        name: &str,
        version: u64,
        value: &[u8],
    ) -> Result<SecretEnvelope, SecretsError> {
        let kek = self.current.as_ref().ok_or(SecretsError::Disabled)?;
        let mut data_key = Zeroizing::new([0u8; KEY_BYTES]);
        OsRng.fill_bytes(data_key.as_mut());
        let data_cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(data_key.as_ref()));
        let ciphertext = seal(
            &data_cipher,
            value,
            &associated_data("value", project, name, version, ""),
        )?;
        let wrapped_data_key = seal(
            &kek.cipher,
            data_key.as_ref(),
            &associated_data("data-key", project, name, version, &kek.id),
        )?;
        Ok(SecretEnvelope {
            key_id: kek.id.clone(),
            wrapped_data_key,
            ciphertext,
        })
    }

    fn unwrap_data_key(
        &self,
        project: &str,
        name: &str,
        version: u64,
        envelope: &SecretEnvelope,
    ) -> Result<Zeroizing<Vec<u8>>, SecretsError> {
        let kek = self
            .keys
            .get(&envelope.key_id)
            .ok_or_else(|| SecretsError::UnknownKey {
                key_id: envelope.key_id.clone(),
            })?;
        let data_key = open(
            kek,
            &envelope.wrapped_data_key,
            &associated_data("data-key", project, name, version, &envelope.key_id),
        )?;
        if data_key.len() != KEY_BYTES {
            return Err(SecretsError::Corrupt("the data key has the wrong size"));
        }
        Ok(data_key)
    }

    /// Decrypts `version` of `project/name`. The value is UTF-8 (checked when it was set).
    ///
    /// # Errors
    /// [`SecretsError::UnknownKey`], or [`SecretsError::Corrupt`] for an envelope that does not
    /// authenticate.
    pub fn open(
        &self,
        project: &str,
        name: &str,
        version: u64,
        envelope: &SecretEnvelope,
    ) -> Result<SecretValue, SecretsError> {
        let data_key = self.unwrap_data_key(project, name, version, envelope)?;
        let data_cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&data_key));
        let mut value = open(
            &data_cipher,
            &envelope.ciphertext,
            &associated_data("value", project, name, version, ""),
        )?;
        let text = std::str::from_utf8(&value)
            .map(|text| Zeroizing::new(text.to_owned()))
            .map_err(|_| SecretsError::Corrupt("the value is not UTF-8"));
        value.zeroize();
        text
    }

    /// Re-wraps the data key of `version` of `project/name` under the current key: returns the
    /// new key id and wrapped data key (the ciphertext stays as it is).
    ///
    /// # Errors
    /// [`SecretsError::Disabled`], [`SecretsError::UnknownKey`], [`SecretsError::Corrupt`].
    pub fn rewrap(
        &self,
        project: &str,
        name: &str,
        version: u64,
        envelope: &SecretEnvelope,
    ) -> Result<(String, String), SecretsError> {
        let kek = self.current.as_ref().ok_or(SecretsError::Disabled)?;
        let data_key = self.unwrap_data_key(project, name, version, envelope)?;
        let wrapped = seal(
            &kek.cipher,
            &data_key,
            &associated_data("data-key", project, name, version, &kek.id),
        )?;
        Ok((kek.id.clone(), wrapped))
    }
}

/// Checks a secret value: UTF-8 (it becomes an environment variable), no NUL, between
/// [`MIN_SECRET_VALUE_BYTES`] and `max_bytes` bytes. The message never contains the value.
pub fn validate_value(value: &[u8], max_bytes: usize) -> Result<(), String> {
    if value.len() < MIN_SECRET_VALUE_BYTES {
        return Err(format!(
            "must be at least {MIN_SECRET_VALUE_BYTES} bytes (shorter values cannot be redacted reliably)"
        ));
    }
    if value.len() > max_bytes {
        return Err(format!(
            "{} bytes exceed secrets.max_value_bytes ({max_bytes})",
            value.len()
        ));
    }
    match std::str::from_utf8(value) {
        Ok(text) if !text.contains('\0') => Ok(()),
        Ok(_) => Err("must not contain NUL (it becomes an environment variable)".into()),
        Err(_) => Err("must be UTF-8 text (base64-encode binary values)".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn keyring(directory: &Path, current: &str, previous: &[&str]) -> Keyring {
        for name in std::iter::once(&current).chain(previous) {
            let path = directory.join(name);
            if !path.exists() {
                generate_key_file(&path).unwrap();
            }
        }
        Keyring::load(
            Some(&directory.join(current)),
            &previous
                .iter()
                .map(|p| directory.join(p))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn envelopes_round_trip_and_are_bound_to_project_name_and_version() {
        let directory = tempfile::tempdir().unwrap();
        let keys = keyring(directory.path(), "a.key", &[]);
        let envelope = keys.seal("p", "token", 3, b"hunter2-hunter2").unwrap();
        assert!(!envelope.ciphertext.contains("hunter2"));
        assert_eq!(envelope.key_id, keys.current_key_id().unwrap());
        assert_eq!(
            keys.open("p", "token", 3, &envelope).unwrap().as_str(),
            "hunter2-hunter2"
        );
        for (project, name, version) in [("q", "token", 3), ("p", "other", 3), ("p", "token", 4)] {
            assert!(
                matches!(
                    keys.open(project, name, version, &envelope),
                    Err(SecretsError::Corrupt(_))
                ),
                "{project}/{name}@{version} decrypted"
            );
        }
        // Two seals of one value differ (fresh data key and nonces).
        let again = keys.seal("p", "token", 3, b"hunter2-hunter2").unwrap();
        assert_ne!(again.ciphertext, envelope.ciphertext);
        // A tampered ciphertext fails.
        let mut tampered = envelope.clone();
        let mut bytes = STANDARD.decode(&tampered.ciphertext).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        tampered.ciphertext = STANDARD.encode(bytes);
        assert!(keys.open("p", "token", 3, &tampered).is_err());
    }

    #[test]
    fn rotation_rewraps_under_the_new_key_and_old_keys_still_decrypt() {
        let directory = tempfile::tempdir().unwrap();
        let old = keyring(directory.path(), "old.key", &[]);
        let envelope = old.seal("p", "token", 1, b"value-value").unwrap();
        let rotated = keyring(directory.path(), "new.key", &["old.key"]);
        assert_ne!(rotated.current_key_id(), old.current_key_id());
        assert_eq!(
            rotated.open("p", "token", 1, &envelope).unwrap().as_str(),
            "value-value"
        );
        let (key_id, wrapped) = rotated.rewrap("p", "token", 1, &envelope).unwrap();
        let rewrapped = SecretEnvelope {
            key_id,
            wrapped_data_key: wrapped,
            ciphertext: envelope.ciphertext.clone(),
        };
        let new_only = keyring(directory.path(), "new.key", &[]);
        assert_eq!(
            new_only.open("p", "token", 1, &rewrapped).unwrap().as_str(),
            "value-value"
        );
        assert!(matches!(
            new_only.open("p", "token", 1, &envelope),
            Err(SecretsError::UnknownKey { .. })
        ));
        // The same key file gives the same id on every node.
        assert_eq!(new_only.current_key_id(), rotated.current_key_id());
    }

    #[test]
    fn key_files_must_be_private_and_well_formed() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("k");
        generate_key_file(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(generate_key_file(&path).is_err(), "overwrote a key file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = Keyring::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
        let bad = directory.path().join("bad");
        std::fs::write(&bad, "flotilla-secret-key-v1 c2hvcnQ=\n").unwrap();
        std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
        let error = Keyring::load(Some(&bad), &[]).unwrap_err().to_string();
        assert!(error.contains("32 bytes"), "{error}");
        assert!(matches!(
            Keyring::disabled().seal("p", "n", 1, b"12345678"),
            Err(SecretsError::Disabled)
        ));
    }

    #[test]
    fn values_are_checked_without_echoing_them() {
        assert!(
            validate_value(b"short", 100)
                .unwrap_err()
                .contains("at least 8")
        );
        assert!(
            validate_value(&[b'a'; 101], 100)
                .unwrap_err()
                .contains("max_value_bytes")
        );
        assert!(
            validate_value(b"abc\0defgh", 100)
                .unwrap_err()
                .contains("NUL")
        );
        assert!(
            validate_value(&[0xff; 10], 100)
                .unwrap_err()
                .contains("UTF-8")
        );
        assert!(validate_value(b"long enough", 100).is_ok());
    }
}
