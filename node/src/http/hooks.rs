//! Webhook verification: GitHub, GitLab and Standard Webhooks deliveries checked against the
//! operator's secrets (`[[webhooks.sources]]`), over the raw body, in constant time.
//!
//! - GitHub (<https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries>):
//!   `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`; delivery id
//!   `X-GitHub-Delivery`; event `X-GitHub-Event`; repository `repository.full_name`.
//! - GitLab (<https://docs.gitlab.com/user/project/integrations/webhooks/>): `X-Gitlab-Token`
//!   is the secret itself; delivery id `Idempotency-Key`, else `X-Gitlab-Event-UUID`; event
//!   `X-Gitlab-Event`; repository `project.path_with_namespace`.
//! - Standard Webhooks (<https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md>):
//!   `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>` (several,
//!   space separated, for rotation), `webhook-id`, `webhook-timestamp` (Unix seconds, within
//!   `webhooks.timestamp_tolerance_ms`); the key is the secret's base64 after `whsec_`; event
//!   `type` of the body; repository `data.repository` when it is a string.
//!
//! Every refusal carries the HTTP status and a message naming the header or the body.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;
use zeroize::Zeroizing;

use crate::config::{WebhookKind, WebhooksSection};

/// Largest secret file, bytes.
const MAX_SECRET_FILE_BYTES: u64 = 4096;

/// The request headers a verifier reads (lower case); only these are forwarded to the leader.
pub const HOOK_HEADERS: &[&str] = &[
    "x-hub-signature-256",
    "x-github-delivery",
    "x-github-event",
    "x-gitlab-token",
    "x-gitlab-event",
    "x-gitlab-event-uuid",
    "idempotency-key",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
];

/// The delivery id a request's headers claim, whatever its source's kind (unverified: for the
/// record of a refused request), or empty.
pub fn claimed_delivery_id(headers: &BTreeMap<String, String>) -> &str {
    [
        "x-github-delivery",
        "idempotency-key",
        "x-gitlab-event-uuid",
        "webhook-id",
    ]
    .iter()
    .find_map(|name| headers.get(*name))
    .map_or("", String::as_str)
}

/// One configured source with its secrets loaded.
pub struct HookSource {
    /// The URL's last segment.
    pub name: String,
    /// How deliveries are signed.
    pub kind: WebhookKind,
    /// The project whose rules see its events.
    pub project: String,
    /// The secrets (Standard Webhooks: the decoded keys), any of which verifies.
    secrets: Vec<Zeroizing<Vec<u8>>>,
}

/// The sources of this node.
pub struct HookSources {
    sources: BTreeMap<String, HookSource>,
}

/// A source's secret file could not be used.
#[derive(Debug, thiserror::Error)]
#[error("webhooks.sources ({source_name}): secret file {path}: {message}")]
pub struct HookConfigError {
    source_name: String,
    path: PathBuf,
    message: String,
}

fn read_secret(path: &Path, kind: WebhookKind) -> Result<Zeroizing<Vec<u8>>, String> {
    use std::os::unix::fs::MetadataExt as _;
    let metadata = std::fs::metadata(path).map_err(|error| error.to_string())?;
    if metadata.mode() & 0o077 != 0 {
        return Err(format!(
            "mode {:o} lets others read it; chmod 600 it",
            metadata.mode() & 0o777
        ));
    }
    if metadata.len() > MAX_SECRET_FILE_BYTES {
        return Err(format!("larger than {MAX_SECRET_FILE_BYTES} bytes"));
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|error| error.to_string())?);
    let secret = text.trim();
    if secret.is_empty() {
        return Err("is empty".into());
    }
    match kind {
        WebhookKind::Standard => {
            let encoded = secret
                .strip_prefix("whsec_")
                .ok_or("a Standard Webhooks secret starts with whsec_")?;
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map(Zeroizing::new)
                .map_err(|error| format!("not base64 after whsec_: {error}"))
        }
        WebhookKind::Github | WebhookKind::Gitlab => Ok(Zeroizing::new(secret.as_bytes().to_vec())),
    }
}

impl HookSources {
    /// Loads every source's secret files.
    ///
    /// # Errors
    /// A file that cannot be read, is readable by others, empty, or (Standard Webhooks) not a
    /// `whsec_` secret.
    pub fn load(settings: &WebhooksSection) -> Result<HookSources, HookConfigError> {
        let mut sources = BTreeMap::new();
        for source in &settings.sources {
            let mut secrets = Vec::new();
            for path in &source.secret_files {
                let secret = read_secret(path, source.kind).map_err(|message| HookConfigError {
                    source_name: source.name.clone(),
                    path: path.clone(),
                    message,
                })?;
                secrets.push(secret);
            }
            sources.insert(
                source.name.clone(),
                HookSource {
                    name: source.name.clone(),
                    kind: source.kind,
                    project: source.project.clone(),
                    secrets,
                },
            );
        }
        Ok(HookSources { sources })
    }

    /// The source named `name`.
    pub fn get(&self, name: &str) -> Option<&HookSource> {
        self.sources.get(name)
    }
}

/// A delivery whose sender was verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// The sender's delivery id.
    pub delivery_id: String,
    /// The event type.
    pub event_type: String,
    /// The repository the payload names, or empty.
    pub repository: String,
    /// How it was verified (`github: X-Hub-Signature-256 valid (secret 1 of 2)`).
    pub verdict: String,
    /// The body as JSON.
    pub payload: serde_json::Value,
}

/// A refused delivery: the HTTP status to answer and why.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 401 or 413.
    pub status: u16,
    /// Names the header or the body.
    pub reason: String,
}

fn refuse(status: u16, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        reason: reason.into(),
    }
}

fn header<'a>(headers: &'a BTreeMap<String, String>, name: &str) -> Result<&'a str, Refusal> {
    headers
        .get(name)
        .map(String::as_str)
        .filter(|value| !value.is_empty())
        .ok_or_else(|| refuse(400, format!("{name}: missing")))
}

fn hmac_sha256(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length: new_from_slice cannot fail.
    <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

/// The 1-based index of the first secret under which `check` holds.
fn first_secret(secrets: &[Zeroizing<Vec<u8>>], check: impl Fn(&[u8]) -> bool) -> Option<usize> {
    secrets
        .iter()
        .position(|secret| check(secret))
        .map(|index| index + 1)
}

/// Verifies one delivery to `source` (module documentation) at `now_ms` (this node's clock;
/// Standard Webhooks timestamps only), then parses the body.
///
/// # Errors
/// 401 for a missing or wrong signature or token, 400 for a missing id or event header, a
/// stale timestamp, or a body that is not UTF-8 JSON.
pub fn verify(
    source: &HookSource,
    headers: &BTreeMap<String, String>,
    body: &[u8],
    now_ms: u64,
    timestamp_tolerance_ms: u64,
) -> Result<Verified, Refusal> {
    let secrets = &source.secrets;
    let count = secrets.len();
    let (delivery_id, event_type, verdict) = match source.kind {
        WebhookKind::Github => {
            let signature = headers
                .get("x-hub-signature-256")
                .ok_or_else(|| refuse(401, "x-hub-signature-256: missing"))?;
            let digest = signature
                .strip_prefix("sha256=")
                .and_then(decode_hex)
                .ok_or_else(|| refuse(401, "x-hub-signature-256: not sha256=<64 hex digits>"))?;
            let index = first_secret(secrets, |secret| {
                let mut mac = hmac_sha256(secret);
                mac.update(body);
                mac.verify_slice(&digest).is_ok()
            })
            .ok_or_else(|| {
                refuse(
                    401,
                    "x-hub-signature-256: does not match the body under any secret",
                )
            })?;
            (
                header(headers, "x-github-delivery")?.to_owned(),
                header(headers, "x-github-event")?.to_owned(),
                format!("github: x-hub-signature-256 valid (secret {index} of {count})"),
            )
        }
        WebhookKind::Gitlab => {
            let token = headers
                .get("x-gitlab-token")
                .ok_or_else(|| refuse(401, "x-gitlab-token: missing"))?;
            let index = first_secret(secrets, |secret| bool::from(token.as_bytes().ct_eq(secret)))
                .ok_or_else(|| refuse(401, "x-gitlab-token: matches no secret"))?;
            let delivery_id = header(headers, "idempotency-key")
                .or_else(|_| header(headers, "x-gitlab-event-uuid"))
                .map_err(|_| refuse(400, "idempotency-key and x-gitlab-event-uuid: missing"))?;
            (
                delivery_id.to_owned(),
                header(headers, "x-gitlab-event")?.to_owned(),
                format!("gitlab: x-gitlab-token valid (secret {index} of {count})"),
            )
        }
        WebhookKind::Standard => {
            let id = header(headers, "webhook-id")?;
            let timestamp = header(headers, "webhook-timestamp")?;
            let seconds: u64 = timestamp
                .parse()
                .map_err(|_| refuse(400, "webhook-timestamp: not Unix seconds"))?;
            let skew_ms = seconds.saturating_mul(1000).abs_diff(now_ms);
            if skew_ms > timestamp_tolerance_ms {
                return Err(refuse(
                    400,
                    format!(
                        "webhook-timestamp: {skew_ms} ms from this node's clock, beyond webhooks.timestamp_tolerance_ms ({timestamp_tolerance_ms})"
                    ),
                ));
            }
            let signatures = headers
                .get("webhook-signature")
                .ok_or_else(|| refuse(401, "webhook-signature: missing"))?;
            let candidates: Vec<Vec<u8>> = signatures
                .split_whitespace()
                .filter_map(|entry| entry.strip_prefix("v1,"))
                .filter_map(|encoded| {
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .ok()
                })
                .collect();
            if candidates.is_empty() {
                return Err(refuse(401, "webhook-signature: no v1,<base64> signature"));
            }
            let index = first_secret(secrets, |secret| {
                candidates.iter().any(|candidate| {
                    let mut mac = hmac_sha256(secret);
                    mac.update(id.as_bytes());
                    mac.update(b".");
                    mac.update(timestamp.as_bytes());
                    mac.update(b".");
                    mac.update(body);
                    mac.verify_slice(candidate).is_ok()
                })
            })
            .ok_or_else(|| {
                refuse(
                    401,
                    "webhook-signature: no signature matches under any secret",
                )
            })?;
            (
                id.to_owned(),
                String::new(),
                format!("standard: webhook-signature valid (secret {index} of {count})"),
            )
        }
    };
    let text = std::str::from_utf8(body)
        .map_err(|error| refuse(400, format!("body: not UTF-8 ({error})")))?;
    let payload: serde_json::Value = serde_json::from_str(text)
        .map_err(|error| refuse(400, format!("body: not JSON ({error})")))?;
    let event_type = if event_type.is_empty() {
        payload
            .get("type")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| {
                refuse(
                    400,
                    "body: a Standard Webhooks payload needs a string \"type\"",
                )
            })?
            .to_owned()
    } else {
        event_type
    };
    let repository = match source.kind {
        WebhookKind::Github => payload.pointer("/repository/full_name"),
        WebhookKind::Gitlab => payload.pointer("/project/path_with_namespace"),
        WebhookKind::Standard => payload.pointer("/data/repository"),
    }
    .and_then(serde_json::Value::as_str)
    .unwrap_or_default()
    .to_owned();
    Ok(Verified {
        delivery_id,
        event_type,
        repository,
        verdict,
        payload,
    })
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    (0..32)
        .map(|index| u8::from_str_radix(&text[index * 2..index * 2 + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(kind: WebhookKind, secrets: &[&[u8]]) -> HookSource {
        HookSource {
            name: "hook".into(),
            kind,
            project: "default".into(),
            secrets: secrets
                .iter()
                .map(|secret| Zeroizing::new(secret.to_vec()))
                .collect(),
        }
    }

    fn github_signature(secret: &[u8], body: &[u8]) -> String {
        let mut mac = hmac_sha256(secret);
        mac.update(body);
        let digest = mac.finalize().into_bytes();
        format!(
            "sha256={}",
            digest
                .iter()
                .map(|byte| format!("{byte:02x}"))
                .collect::<String>()
        )
    }

    fn standard_signature(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
        let mut mac = hmac_sha256(key);
        mac.update(format!("{id}.{timestamp}.").as_bytes());
        mac.update(body);
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    const BODY: &[u8] = br#"{"action":"opened","repository":{"full_name":"acme/api"}}"#;

    /// `verify`'s answer as `"<status> <reason>"` or `"ok <event> <repository> <verdict>"`.
    fn check(source: &HookSource, headers: &BTreeMap<String, String>, body: &[u8], expected: &str) {
        let shown = match verify(source, headers, body, 1_700_000_000_000, 300_000) {
            Ok(verified) => format!(
                "ok {} {} {}",
                verified.event_type, verified.repository, verified.verdict
            ),
            Err(refusal) => format!("{} {}", refusal.status, refusal.reason),
        };
        assert!(
            shown.starts_with(expected),
            "{shown:?} does not start with {expected:?}"
        );
    }

    // The test vector of GitHub's documentation ("Hello, World!" under "It's a Secret to
    // Everybody").
    #[test]
    fn github_documentation_vector() {
        assert_eq!(
            github_signature(b"It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn github_signatures() {
        let github = source(WebhookKind::Github, &[b"new", b"old"]);
        let base = [
            ("x-github-delivery", "d-1"),
            ("x-github-event", "pull_request"),
        ];
        let with = |signature: &str| {
            let mut all = headers(&base);
            all.insert("x-hub-signature-256".into(), signature.into());
            all
        };
        check(
            &github,
            &with(&github_signature(b"new", BODY)),
            BODY,
            "ok pull_request acme/api github: x-hub-signature-256 valid (secret 1 of 2)",
        );
        // Rotation: the old secret still verifies while it is listed.
        check(
            &github,
            &with(&github_signature(b"old", BODY)),
            BODY,
            "ok pull_request acme/api github: x-hub-signature-256 valid (secret 2 of 2)",
        );
        check(
            &github,
            &with(&github_signature(b"wrong", BODY)),
            BODY,
            "401 x-hub-signature-256: does not match",
        );
        check(
            &github,
            &with(&github_signature(b"new", b"{}")),
            BODY,
            "401 x-hub-signature-256: does not match",
        );
        check(
            &github,
            &with("sha1=abc"),
            BODY,
            "401 x-hub-signature-256: not sha256=",
        );
        check(
            &github,
            &headers(&base),
            BODY,
            "401 x-hub-signature-256: missing",
        );
        let mut no_id = with(&github_signature(b"new", BODY));
        no_id.remove("x-github-delivery");
        check(&github, &no_id, BODY, "400 x-github-delivery: missing");
        let latin1 = b"{\"name\":\"caf\xe9\"}";
        check(
            &github,
            &with(&github_signature(b"new", latin1)),
            latin1,
            "400 body: not UTF-8",
        );
        check(
            &github,
            &with(&github_signature(b"new", b"not json")),
            b"not json",
            "400 body: not JSON",
        );
    }

    #[test]
    fn gitlab_tokens() {
        let gitlab = source(WebhookKind::Gitlab, &[b"s3cret"]);
        let body =
            br#"{"object_kind":"merge_request","project":{"path_with_namespace":"acme/web"}}"#;
        let good = headers(&[
            ("x-gitlab-token", "s3cret"),
            ("x-gitlab-event", "Merge Request Hook"),
            ("idempotency-key", "k-1"),
        ]);
        check(
            &gitlab,
            &good,
            body,
            "ok Merge Request Hook acme/web gitlab: x-gitlab-token valid",
        );
        let mut wrong = good.clone();
        wrong.insert("x-gitlab-token".into(), "s3cre".into());
        check(
            &gitlab,
            &wrong,
            body,
            "401 x-gitlab-token: matches no secret",
        );
        let mut uuid_only = good.clone();
        uuid_only.remove("idempotency-key");
        uuid_only.insert("x-gitlab-event-uuid".into(), "u-1".into());
        assert_eq!(
            verify(&gitlab, &uuid_only, body, 0, 1).unwrap().delivery_id,
            "u-1"
        );
        uuid_only.remove("x-gitlab-event-uuid");
        check(
            &gitlab,
            &uuid_only,
            body,
            "400 idempotency-key and x-gitlab-event-uuid: missing",
        );
    }

    #[test]
    fn standard_webhooks_signatures_and_timestamps() {
        let key = b"standard webhooks key 32 bytes!!";
        let standard = source(WebhookKind::Standard, &[key]);
        let body = br#"{"type":"release.published","data":{"repository":"https://forge.example/acme/lib.git"}}"#;
        let now = "1700000000";
        let signed = |timestamp: &str, signature: String| {
            headers(&[
                ("webhook-id", "msg_1"),
                ("webhook-timestamp", timestamp),
                ("webhook-signature", &signature),
            ])
        };
        check(
            &standard,
            &signed(now, standard_signature(key, "msg_1", now, body)),
            body,
            "ok release.published https://forge.example/acme/lib.git standard: webhook-signature valid",
        );
        // Several signatures (the sender rotating): any one that matches.
        let both = format!("v1,AAAA {}", standard_signature(key, "msg_1", now, body));
        check(&standard, &signed(now, both), body, "ok release.published");
        check(
            &standard,
            &signed(now, standard_signature(b"other", "msg_1", now, body)),
            body,
            "401 webhook-signature: no signature matches",
        );
        // A signature over another id (a replayed body under a new id) fails.
        check(
            &standard,
            &signed(now, standard_signature(key, "msg_2", now, body)),
            body,
            "401",
        );
        let stale = "1699999000";
        check(
            &standard,
            &signed(stale, standard_signature(key, "msg_1", stale, body)),
            body,
            "400 webhook-timestamp: 1000000 ms from this node's clock",
        );
        check(
            &standard,
            &signed("soon", standard_signature(key, "msg_1", "soon", body)),
            body,
            "400 webhook-timestamp: not Unix seconds",
        );
        check(
            &standard,
            &signed(now, "v2,xyz".into()),
            body,
            "401 webhook-signature: no v1,<base64> signature",
        );
        let untyped = br#"{"data":{}}"#;
        check(
            &standard,
            &signed(now, standard_signature(key, "msg_1", now, untyped)),
            untyped,
            "400 body: a Standard Webhooks payload needs a string \"type\"",
        );
    }
}
