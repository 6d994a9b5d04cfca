//! Text from agents (log tails, errors, patches, file paths) printed for people.
//!
//! An agent controls every byte of its output, including terminal escape sequences that move
//! the cursor, rewrite earlier lines, set the window title or (in some terminals) write files.
//! Human output therefore shows control characters as visible escapes; JSON output needs
//! nothing, since `serde_json` escapes them already.

use std::borrow::Cow;

/// `text` with every control character except newline and tab shown as a Rust escape
/// (`ESC` becomes `\u{1b}`, `CR` becomes `\r`), so that printing it cannot drive the terminal.
/// Unicode bidirectional overrides and isolates (U+202A-U+202E, U+2066-U+2069), which reorder
/// how a line reads, are escaped too.
pub fn printable(text: &str) -> Cow<'_, str> {
    let needs_escape = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c)
    };
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if needs_escape(c) {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_become_visible_escapes() {
        let cases = [
            ("plain text\n\tindented", "plain text\n\tindented"),
            ("\u{1b}[2J\u{1b}[Hcleared", "\\u{1b}[2J\\u{1b}[Hcleared"),
            ("progress\roverwritten", "progress\\roverwritten"),
            ("\u{1b}]0;title\u{7}", "\\u{1b}]0;title\\u{7}"),
            ("bell\u{7}", "bell\\u{7}"),
            ("\u{9b}31m", "\\u{9b}31m"),
            ("abc\u{202e}fed", "abc\\u{202e}fed"),
            ("é ✓", "é ✓"),
        ];
        for (input, expected) in cases {
            assert_eq!(printable(input), expected, "{input:?}");
        }
    }
}
