//! Repository locations: which URLs are accepted, and the `{repository}` name drawn from one.

/// Longest repository URL accepted, in bytes.
pub const MAX_REPOSITORY_URL_BYTES: usize = 2048;

/// Checks a repository location: `file://`, `https://`, `http://`, `ssh://` or `git://` URL
/// with something after the scheme, or an absolute path; at most `max_bytes` long (at most
/// [`MAX_REPOSITORY_URL_BYTES`] in every caller); no whitespace or control characters; never
/// starting with `-` (git would read it as an option). The server checks fleet specs with it,
/// and the worker checks every lease with it again before git sees the URL.
///
/// # Errors
/// What is wrong, as a sentence.
pub fn validate_repository_url(url: &str, max_bytes: usize) -> Result<(), String> {
    if url.is_empty() {
        return Err("must not be empty".into());
    }
    if url.len() > max_bytes {
        return Err(format!("longer than {max_bytes} bytes"));
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("must not contain whitespace or control characters".into());
    }
    if url.starts_with('-') {
        return Err("must not start with '-'".into());
    }
    let known_scheme = ["file://", "https://", "http://", "ssh://", "git://"]
        .iter()
        .any(|scheme| url.starts_with(scheme) && url.len() > scheme.len());
    if !known_scheme && !url.starts_with('/') {
        return Err(format!(
            "{url:?} is not a git URL: expected file://, https://, http://, ssh://, git:// or an absolute path"
        ));
    }
    Ok(())
}

/// The last path segment of a repository URL without a trailing `.git`: the `{repository}`
/// placeholder. Characters a branch cannot hold become `-`.
pub fn repository_name(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    let last = trimmed.rsplit(['/', ':']).next().unwrap_or(trimmed);
    let last = last.strip_suffix(".git").unwrap_or(last);
    let cleaned: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches(['.', '-']).to_string();
    if cleaned.is_empty() {
        "repository".to_string()
    } else {
        cleaned
    }
}

/// Where a repository lives, as the keys of concurrency and rate limits see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepositoryParts {
    /// The forge host, lower-cased, without user or port (`github.com`); `local` for
    /// `file://` URLs and absolute paths.
    pub host: String,
    /// The organisation: `<host>/<first path segment>` (`github.com/acme`); for a local
    /// repository, its parent directory (`local/srv/git/acme`).
    pub organisation: String,
    /// The repository itself: `<host>/<path>` without a trailing `/` or `.git`
    /// (`github.com/acme/widgets`), so `https://` and `ssh://` forms of one repository agree.
    pub repository: String,
}

/// The [`RepositoryParts`] of a URL that [`validate_repository_url`] accepts. Total: any
/// string gives some parts (an unexpected form is its own host).
pub fn repository_parts(url: &str) -> RepositoryParts {
    let (host, path) = match url.split_once("://") {
        Some(("file", rest)) => ("local".to_string(), rest),
        Some((_, rest)) => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = authority.rsplit('@').next().unwrap_or(authority);
            let host = if host.starts_with('[') {
                host.split_once(']')
                    .map_or(host, |(h, _)| h)
                    .trim_start_matches('[')
            } else {
                host.split(':').next().unwrap_or(host)
            };
            (host.to_ascii_lowercase(), path)
        }
        None => ("local".to_string(), url),
    };
    let path = path.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    let organisation = if host == "local" {
        match path.rsplit_once('/') {
            Some((parent, _)) => format!("local/{parent}"),
            None => "local".to_string(),
        }
    } else {
        match path.split_once('/') {
            Some((owner, _)) => format!("{host}/{owner}"),
            None => host.clone(),
        }
    };
    RepositoryParts {
        repository: format!("{host}/{path}"),
        organisation,
        host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_urls_are_git_urls_or_absolute_paths() {
        for good in [
            "https://example.com/a/b.git",
            "http://example.com/a",
            "file:///srv/git/x.git",
            "ssh://git@example.com/x.git",
            "git://example.com/x",
            "/srv/git/x.git",
        ] {
            assert_eq!(
                validate_repository_url(good, MAX_REPOSITORY_URL_BYTES),
                Ok(()),
                "{good}"
            );
        }
        for bad in [
            "",
            "relative/path",
            "-uploadpack=evil",
            "https://",
            "https://a b",
            "x\ny",
            "git@example.com:acme/x.git",
            "ext::sh -c evil",
        ] {
            assert!(
                validate_repository_url(bad, MAX_REPOSITORY_URL_BYTES).is_err(),
                "{bad:?}"
            );
        }
        let long = format!(
            "https://example.com/{}",
            "a".repeat(MAX_REPOSITORY_URL_BYTES)
        );
        assert_eq!(
            validate_repository_url(&long, MAX_REPOSITORY_URL_BYTES),
            Err(format!("longer than {MAX_REPOSITORY_URL_BYTES} bytes"))
        );
    }

    #[test]
    fn the_repository_placeholder_is_the_last_segment_made_branch_safe() {
        for (url, name) in [
            ("https://example.com/acme/widgets.git", "widgets"),
            ("/srv/git/widgets/", "widgets"),
            ("file:///tmp/x/origin.git", "origin"),
            ("https://example.com/a/we ird~name", "we-ird-name"),
            ("https://example.com/a/.hidden", "hidden"),
            ("https://example.com/a/...", "repository"),
        ] {
            assert_eq!(repository_name(url), name, "{url}");
        }
    }

    #[test]
    fn repository_parts_name_host_organisation_and_repository() {
        for (url, host, organisation, repository) in [
            (
                "https://github.com/acme/widgets.git",
                "github.com",
                "github.com/acme",
                "github.com/acme/widgets",
            ),
            (
                "ssh://git@GitHub.com:22/acme/widgets",
                "github.com",
                "github.com/acme",
                "github.com/acme/widgets",
            ),
            (
                "https://gitlab.example.com/group/sub/x/",
                "gitlab.example.com",
                "gitlab.example.com/group",
                "gitlab.example.com/group/sub/x",
            ),
            ("http://[::1]:8080/a/b", "::1", "::1/a", "::1/a/b"),
            (
                "file:///srv/git/acme/widgets.git",
                "local",
                "local/srv/git/acme",
                "local/srv/git/acme/widgets",
            ),
            (
                "/srv/git/acme/widgets",
                "local",
                "local/srv/git/acme",
                "local/srv/git/acme/widgets",
            ),
            (
                "https://example.com",
                "example.com",
                "example.com",
                "example.com/",
            ),
        ] {
            let parts = repository_parts(url);
            assert_eq!(
                (
                    parts.host.as_str(),
                    parts.organisation.as_str(),
                    parts.repository.as_str()
                ),
                (host, organisation, repository),
                "{url}"
            );
        }
    }
}
