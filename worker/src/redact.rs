//! Redaction of secret values from everything an attempt reports.
//!
//! A [`Redactor`] is built from the secrets a lease injected. It replaces, with
//! `[redacted:<secret name>]`, every occurrence of each value in these forms:
//! - the exact value;
//! - its base64, standard and URL-safe alphabets, with and without padding;
//! - the base64 of the value inside a longer encoded text: for each of the three alignments of
//!   the value within 3-byte groups, the characters that depend on the value's bytes alone
//!   (so a token inside base64-encoded JSON or an HTTP Basic header is caught);
//! - its URL encoding (percent-encoding of everything but unreserved characters, upper- and
//!   lower-case hex, and the form encoding with `+` for spaces);
//! - its JSON string escaping.
//!
//! Matching is leftmost-longest over all forms at once (Aho-Corasick). [`StreamRedactor`] does
//! the same over a stream cut into arbitrary chunks (the attempt log), holding back the last
//! `longest form - 1` bytes until more arrive or the stream ends, so a value split across two
//! writes is still caught.
//!
//! Values shorter than [`MIN_REDACTED_BYTES`] cannot be redacted without mangling ordinary
//! output; the node refuses such values, and a substring form shorter than that is not used.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Shortest form that is redacted, in bytes (the node's `MIN_SECRET_VALUE_BYTES`).
pub const MIN_REDACTED_BYTES: usize = 8;

/// Characters percent-encoded in URLs: everything but RFC 3986's unreserved ones.
const URL_ENCODED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// [`URL_ENCODED`] keeping spaces, which form encoding turns into `+`.
const FORM_ENCODED: &AsciiSet = &URL_ENCODED.remove(b' ');

/// Every form of `value` that [`Redactor`] looks for (deduplicated, without forms shorter than
/// [`MIN_REDACTED_BYTES`], except the value itself).
pub fn forms(value: &str) -> Vec<String> {
    let bytes = value.as_bytes();
    let mut forms = vec![value.to_owned()];
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        forms.push(engine.encode(bytes));
    }
    // The value at offset 0, 1 or 2 within a 3-byte group of a longer text: encode it behind
    // that many filler bytes and keep only the characters made of the value's bits alone.
    for shift in 0..3usize {
        let mut shifted = vec![0u8; shift];
        shifted.extend_from_slice(bytes);
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let encoded = engine.encode(&shifted);
            let skip_front = [0, 2, 3][shift];
            let skip_back = usize::from(shifted.len() % 3 != 0);
            if encoded.len() > skip_front + skip_back {
                forms.push(encoded[skip_front..encoded.len() - skip_back].to_owned());
            }
        }
    }
    let percent = utf8_percent_encode(value, URL_ENCODED).to_string();
    forms.push(percent.to_lowercase_hex());
    forms.push(
        utf8_percent_encode(value, FORM_ENCODED)
            .to_string()
            .replace(' ', "+"),
    );
    forms.push(percent);
    if let Ok(json) = serde_json::to_string(value) {
        forms.push(json[1..json.len() - 1].to_owned());
    }
    let mut kept: Vec<String> = Vec::new();
    for (index, form) in forms.into_iter().enumerate() {
        if (index == 0 || form.len() >= MIN_REDACTED_BYTES) && !kept.contains(&form) {
            kept.push(form);
        }
    }
    kept
}

trait LowercaseHex {
    fn to_lowercase_hex(&self) -> String;
}

impl LowercaseHex for String {
    /// `%AB` escapes with lower-case hex digits; other characters unchanged.
    fn to_lowercase_hex(&self) -> String {
        let mut out = String::with_capacity(self.len());
        let mut chars = self.chars().peekable();
        while let Some(c) = chars.next() {
            out.push(c);
            if c == '%' {
                for _ in 0..2 {
                    if let Some(digit) = chars.next() {
                        out.push(digit.to_ascii_lowercase());
                    }
                }
            }
        }
        out
    }
}

/// Replaces every form of a set of secret values (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    matcher: Option<AhoCorasick>,
    /// The replacement of each pattern, by pattern index.
    replacements: Vec<String>,
    /// The secret name of each pattern, by pattern index.
    names: Vec<String>,
    longest_pattern_bytes: usize,
}

impl Redactor {
    /// A redactor for `(secret name, value)` pairs. Empty values are ignored.
    pub fn new<'a>(secrets: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut patterns = Vec::new();
        let mut replacements = Vec::new();
        let mut names = Vec::new();
        for (name, value) in secrets {
            if value.is_empty() {
                continue;
            }
            for form in forms(value) {
                patterns.push(form);
                replacements.push(format!("[redacted:{name}]"));
                names.push(name.to_owned());
            }
        }
        let longest_pattern_bytes = patterns.iter().map(String::len).max().unwrap_or(0);
        let matcher = if patterns.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&patterns)
                .ok()
        };
        Redactor {
            matcher,
            replacements,
            names,
            longest_pattern_bytes,
        }
    }

    /// Whether there is nothing to redact.
    pub fn is_empty(&self) -> bool {
        self.matcher.is_none()
    }

    /// `text` with every form replaced.
    pub fn redact(&self, text: &str) -> String {
        match &self.matcher {
            None => text.to_owned(),
            Some(matcher) => matcher.replace_all(text, &self.replacements),
        }
    }

    /// `bytes` with every form replaced.
    pub fn redact_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        match &self.matcher {
            None => bytes.to_vec(),
            Some(matcher) => matcher.replace_all_bytes(bytes, &self.replacements),
        }
    }

    /// The name of the first secret any form of which occurs in `bytes`.
    pub fn find(&self, bytes: &[u8]) -> Option<&str> {
        let matcher = self.matcher.as_ref()?;
        matcher
            .find(bytes)
            .map(|found| self.names[found.pattern().as_usize()].as_str())
    }

    /// A redactor over a stream of chunks.
    pub fn stream(&self) -> StreamRedactor {
        StreamRedactor {
            redactor: self.clone(),
            pending: Vec::new(),
        }
    }
}

/// [`Redactor`] over a stream: [`StreamRedactor::push`] returns what can be emitted safely,
/// [`StreamRedactor::finish`] the rest.
#[derive(Clone, Debug)]
pub struct StreamRedactor {
    redactor: Redactor,
    pending: Vec<u8>,
}

impl StreamRedactor {
    /// Adds `bytes` and returns the redacted output that no later byte can change.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        let Some(matcher) = self.redactor.matcher.as_ref() else {
            return bytes.to_vec();
        };
        self.pending.extend_from_slice(bytes);
        // A match starting before `cut` ends within `pending` (no form is longer than
        // `longest_pattern_bytes`), so everything before `cut` is final.
        let cut = self
            .pending
            .len()
            .saturating_sub(self.redactor.longest_pattern_bytes.saturating_sub(1));
        let mut output = Vec::with_capacity(cut);
        let mut position = 0;
        for found in matcher.find_iter(&self.pending) {
            if found.start() >= cut {
                break;
            }
            output.extend_from_slice(&self.pending[position..found.start()]);
            output.extend_from_slice(
                self.redactor.replacements[found.pattern().as_usize()].as_bytes(),
            );
            position = found.end();
        }
        let keep_from = position.max(cut);
        output.extend_from_slice(&self.pending[position.min(keep_from)..keep_from]);
        self.pending.drain(..keep_from);
        output
    }

    /// The redacted rest, without consuming it (for a tail read while the stream goes on).
    pub fn peek_rest(&self) -> Vec<u8> {
        self.redactor.redact_bytes(&self.pending)
    }

    /// Ends the stream: the redacted rest.
    pub fn finish(&mut self) -> Vec<u8> {
        let rest = self.peek_rest();
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t-T0ken/with+chars=?&";

    /// Each case: a text built around the secret, and whether it must be caught.
    fn cases(secret: &str) -> Vec<(String, String)> {
        let b = secret.as_bytes();
        let mut cases = vec![
            ("exact".to_owned(), format!("token is {secret}!")),
            ("base64 standard".to_owned(), STANDARD.encode(b)),
            (
                "base64 standard, no padding".to_owned(),
                STANDARD_NO_PAD.encode(b),
            ),
            ("base64 url-safe".to_owned(), URL_SAFE.encode(b)),
            (
                "base64 url-safe, no padding".to_owned(),
                URL_SAFE_NO_PAD.encode(b),
            ),
            (
                "url-encoded".to_owned(),
                format!("https://x/?t={}", utf8_percent_encode(secret, URL_ENCODED)),
            ),
            (
                "url-encoded, lower-case hex".to_owned(),
                utf8_percent_encode(secret, URL_ENCODED)
                    .to_string()
                    .to_lowercase_hex(),
            ),
            (
                "json".to_owned(),
                serde_json::json!({ "token": secret }).to_string(),
            ),
        ];
        // Inside longer base64 texts, at each alignment, both alphabets.
        for prefix in ["", "a", "ab", "abc", "abcd"] {
            for suffix in ["", "z", "yz"] {
                let inner = format!("{prefix}{{\"t\":\"{secret}\"}}{suffix}");
                cases.push((
                    format!("base64 of a substring, prefix {prefix:?}, suffix {suffix:?}"),
                    STANDARD.encode(inner.as_bytes()),
                ));
                cases.push((
                    format!("url-safe base64 of a substring, prefix {prefix:?}, suffix {suffix:?}"),
                    URL_SAFE_NO_PAD.encode(inner.as_bytes()),
                ));
                cases.push((
                    format!("basic auth, prefix {prefix:?}"),
                    format!(
                        "Authorization: Basic {}",
                        STANDARD.encode(format!("{prefix}user:{secret}"))
                    ),
                ));
            }
        }
        cases
    }

    #[test]
    fn every_form_is_redacted() {
        for secret in [
            SECRET,
            "plain-alphanumeric-123",
            "ünïcödé-välue",
            "with space and \"quotes\"",
        ] {
            let redactor = Redactor::new([("token", secret)]);
            for (label, text) in cases(secret) {
                let redacted = redactor.redact(&text);
                assert!(
                    redacted.contains("[redacted:token]"),
                    "{secret:?}: {label}: nothing redacted in {text:?}"
                );
                assert_eq!(
                    redactor.find(redacted.as_bytes()),
                    None,
                    "{secret:?}: {label}: a form survives in {redacted:?}"
                );
                assert!(!redacted.contains(secret), "{label}");
                assert_eq!(redactor.find(text.as_bytes()), Some("token"), "{label}");
            }
        }
    }

    #[test]
    fn other_text_is_left_alone() {
        let redactor = Redactor::new([("token", SECRET)]);
        for text in [
            "nothing here",
            "s3cr3t-T0ken/with+chars=",
            &STANDARD.encode("something else entirely"),
        ] {
            assert_eq!(redactor.redact(text), text);
        }
        assert!(Redactor::new([("empty", "")]).is_empty());
        assert_eq!(Redactor::default().redact("x"), "x");
    }

    #[test]
    fn several_secrets_are_named_by_their_own_name() {
        let redactor = Redactor::new([("one", "first-value-1"), ("two", "second-value-2")]);
        assert_eq!(
            redactor.redact("a first-value-1 b second-value-2 c"),
            "a [redacted:one] b [redacted:two] c"
        );
    }

    #[test]
    fn a_stream_cut_anywhere_is_redacted_like_the_whole() {
        let redactor = Redactor::new([("token", SECRET)]);
        let text = format!(
            "start {SECRET} middle {} end {SECRET}{SECRET} done {}",
            STANDARD.encode(SECRET),
            utf8_percent_encode(SECRET, URL_ENCODED)
        );
        let whole = redactor.redact(&text);
        for chunk in [1, 2, 3, 5, 7, 13, 64] {
            let mut stream = redactor.stream();
            let mut output = Vec::new();
            for piece in text.as_bytes().chunks(chunk) {
                output.extend(stream.push(piece));
            }
            output.extend(stream.finish());
            assert_eq!(
                String::from_utf8(output).unwrap(),
                whole,
                "chunks of {chunk}"
            );
        }
    }
}
