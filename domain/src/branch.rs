//! Branch names, as `git check-ref-format --branch` accepts them, under an operator's prefix.

/// Longest branch name accepted, in bytes.
pub const MAX_BRANCH_BYTES: usize = 255;

/// The prefix every branch must start with unless the operator configures another
/// (`limits.branch_prefix` on the server, `branch_prefix` on a worker).
pub const DEFAULT_BRANCH_PREFIX: &str = "flotilla/";

/// Whether `branch` is a branch name `git check-ref-format --branch` accepts, at most
/// [`MAX_BRANCH_BYTES`] long. Slightly stricter than git: `@` alone (git's shorthand for the
/// current branch) is refused too. The rules: not empty, not `HEAD`, not starting with `-`; no
/// component (between `/`) empty, starting with `.` or ending with `.lock`; not ending with
/// `.`; no `..`, no `@{`; no control characters, space, `~ ^ : ? * [ \`.
pub fn is_valid_branch(branch: &str) -> bool {
    !branch.is_empty()
        && branch.len() <= MAX_BRANCH_BYTES
        && branch != "HEAD"
        && branch != "@"
        && !branch.starts_with('-')
        && !branch.ends_with('.')
        && !branch.contains("..")
        && !branch.contains("@{")
        && branch
            .bytes()
            .all(|b| b > 0x20 && b != 0x7f && !b"~^:?*[\\".contains(&b))
        && branch.split('/').all(|component| {
            !component.is_empty() && !component.starts_with('.') && !component.ends_with(".lock")
        })
}

/// Checks a rendered branch name: a valid git branch ([`is_valid_branch`]), given as a name
/// rather than a ref (`refs/...` is refused), and under `prefix`
/// (the server's `limits.branch_prefix`).
///
/// # Errors
/// What is wrong, as a sentence for a [`FieldError`].
pub fn validate_branch(branch: &str, prefix: &str) -> Result<(), String> {
    if !is_valid_branch(branch) {
        return Err(format!(
            "{branch:?} is not a valid git branch name (git check-ref-format --branch)"
        ));
    }
    if branch.starts_with("refs/") {
        return Err(format!(
            "{branch:?} is a ref; give the branch name without refs/heads/"
        ));
    }
    if !branch.starts_with(prefix) {
        return Err(format!(
            "{branch:?} is not under the branch prefix {prefix:?} (limits.branch_prefix)"
        ));
    }
    Ok(())
}

/// Checks a branch prefix (the server's `limits.branch_prefix`): non-empty, ending with `/`, not
/// `refs/...`, and such that `<prefix>x` is a valid branch.
///
/// # Errors
/// What is wrong, as a sentence.
pub fn validate_branch_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() || !prefix.ends_with('/') || prefix.starts_with("refs/") {
        return Err(format!(
            "{prefix:?} must be non-empty, end with '/' and not start with refs/ (e.g. \"flotilla/\")"
        ));
    }
    if !is_valid_branch(&format!("{prefix}x")) {
        return Err(format!("{prefix:?} cannot start a valid git branch name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One table: each branch and whether it is valid.
    fn check(cases: &[(&str, bool)]) {
        for (branch, valid) in cases {
            assert_eq!(is_valid_branch(branch), *valid, "{branch:?}");
        }
    }

    #[test]
    fn branch_names_follow_git_check_ref_format() {
        check(&[
            ("flotilla/rustfmt", true),
            ("flotilla/fl-1/serde", true),
            ("", false),
            ("HEAD", false),
            ("@", false),
            ("-x", false),
            ("a..b", false),
            ("a/.hidden", false),
            ("a/b.lock", false),
            ("a/", false),
            ("a//b", false),
            ("a.", false),
            ("a@{1}", false),
            ("a b", false),
            ("a~1", false),
            ("a^", false),
            ("a:b", false),
            ("a?", false),
            ("a*", false),
            ("a[", false),
            ("a\\b", false),
            ("a\u{7f}", false),
        ]);
        assert!(is_valid_branch(&"b".repeat(MAX_BRANCH_BYTES)));
        assert!(!is_valid_branch(&"b".repeat(MAX_BRANCH_BYTES + 1)));
    }

    #[test]
    fn rendered_branches_are_under_the_prefix_and_not_refs() {
        assert_eq!(validate_branch("flotilla/x", "flotilla/"), Ok(()));
        assert!(validate_branch("main", "flotilla/").is_err());
        assert!(validate_branch("refs/heads/flotilla/x", "refs/").is_err());
        assert!(validate_branch_prefix("flotilla/").is_ok());
        for bad in ["", "flotilla", "refs/x/", ".x/"] {
            assert!(validate_branch_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
