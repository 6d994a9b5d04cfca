//! The operator's execution policy: what a fleet may ask of the workers.
//!
//! The policy is set by operators, in each node's configuration (`[policy]`), and applied
//! twice: by the node when a fleet is submitted ([`ExecutionPolicy::check`], naming the field a
//! spec violates) and by the worker when it is handed a lease (the worker never trusts the
//! cluster to have checked; it applies its own copy and, for local repositories, checks the
//! canonical path with [`ExecutionPolicy::check_local_path`]). A submitter cannot widen it:
//! nothing in a spec is read by the policy except as a request to be checked.
//!
//! Pure code: no I/O, no clock. The checks here are syntactic (schemes, host names, literal
//! addresses, path components); name resolution and symlinks are the worker's part.

use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::{FieldError, FleetSpec, SandboxSpec};

/// The sandbox drivers a worker knows. `none` runs the agent unconfined, as the worker's
/// user: an operator must allow it explicitly.
pub const KNOWN_DRIVERS: [&str; 2] = ["bwrap", "none"];
/// The network modes: `none` (an empty network namespace) and `proxy` (the run's own network
/// namespace whose only way out is the worker's egress proxy). `sandbox.network: true` asks
/// for `proxy`.
pub const KNOWN_NETWORK_MODES: [&str; 2] = ["none", "proxy"];
/// URL schemes a repository may use when the policy allows them.
pub const KNOWN_URL_SCHEMES: [&str; 5] = ["https", "http", "ssh", "git", "file"];

/// What fleets may ask of workers. Every list is an allowlist; an empty list allows nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutionPolicy {
    /// Sandbox drivers a spec may name (`bwrap`, `none`). Default `["bwrap"]`.
    pub allowed_drivers: Vec<String>,
    /// Network modes a spec may ask for (`none`, `proxy`). Default both: `proxy` only reaches
    /// the hosts the egress allowlist names.
    pub allowed_network_modes: Vec<String>,
    /// Repository URL schemes (`https`, `http`, `ssh`, `git`, `file`). Default `["https",
    /// "ssh", "file"]`; `file` (and absolute paths) only under `file_roots`.
    pub allowed_url_schemes: Vec<String>,
    /// Host patterns a remote repository URL may name: `*` (any host that is not a literal
    /// loopback, private, link-local or unspecified address, nor `localhost`), an exact host
    /// (`github.com`) or a suffix pattern (`*.example.com`, which does not match
    /// `example.com`). Default `["*"]`.
    pub allowed_hosts: Vec<String>,
    /// Absolute directories under which `file://` URLs and absolute paths may lie. Default
    /// empty: no local repositories.
    pub file_roots: Vec<PathBuf>,
    /// Ceiling of `sandbox.memory_limit_bytes`, in bytes. Default 8 GiB.
    pub max_memory_limit_bytes: u64,
    /// Ceiling of `sandbox.pids_limit`. Default 4096.
    pub max_pids_limit: u32,
    /// Ceiling of `sandbox.cpu_limit_millicores` (1000 = one CPU). Default 4000.
    pub max_cpu_limit_millicores: u32,
    /// Ceiling of `sandbox.disk_limit_bytes`, in bytes. Default 20 GiB.
    pub max_disk_limit_bytes: u64,
}

impl Default for ExecutionPolicy {
    fn default() -> Self {
        ExecutionPolicy {
            allowed_drivers: vec!["bwrap".into()],
            allowed_network_modes: vec!["none".into(), "proxy".into()],
            allowed_url_schemes: vec!["https".into(), "ssh".into(), "file".into()],
            allowed_hosts: vec!["*".into()],
            file_roots: Vec::new(),
            max_memory_limit_bytes: 8 << 30,
            max_pids_limit: 4096,
            max_cpu_limit_millicores: 4000,
            max_disk_limit_bytes: 20 << 30,
        }
    }
}

/// A policy that is itself invalid (an operator's configuration error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    /// The configuration key, for example `policy.allowed_drivers`.
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

impl ExecutionPolicy {
    /// Checks the policy itself: known drivers, modes and schemes, well-formed host patterns,
    /// absolute normal file roots, non-zero ceilings.
    ///
    /// # Errors
    /// The first invalid key, as a [`PolicyError`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        let unknown = |field, value: &String, known: &[&str]| PolicyError {
            field,
            message: format!("unknown value {value:?}; expected one of {known:?}"),
        };
        for driver in &self.allowed_drivers {
            if !KNOWN_DRIVERS.contains(&driver.as_str()) {
                return Err(unknown("policy.allowed_drivers", driver, &KNOWN_DRIVERS));
            }
        }
        for mode in &self.allowed_network_modes {
            if !KNOWN_NETWORK_MODES.contains(&mode.as_str()) {
                return Err(unknown(
                    "policy.allowed_network_modes",
                    mode,
                    &KNOWN_NETWORK_MODES,
                ));
            }
        }
        for scheme in &self.allowed_url_schemes {
            if !KNOWN_URL_SCHEMES.contains(&scheme.as_str()) {
                return Err(unknown(
                    "policy.allowed_url_schemes",
                    scheme,
                    &KNOWN_URL_SCHEMES,
                ));
            }
        }
        for pattern in &self.allowed_hosts {
            let host = pattern.strip_prefix("*.").unwrap_or(pattern);
            let valid = pattern == "*"
                || (!host.is_empty()
                    && host.len() <= 253
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
            if !valid {
                return Err(PolicyError {
                    field: "policy.allowed_hosts",
                    message: format!(
                        "{pattern:?} is not `*`, a host name or `*.` followed by a host name"
                    ),
                });
            }
        }
        for root in &self.file_roots {
            if !is_normal_absolute(root) {
                return Err(PolicyError {
                    field: "policy.file_roots",
                    message: format!(
                        "{} must be an absolute path without `.` or `..` components",
                        root.display()
                    ),
                });
            }
        }
        let ceilings = [
            (
                "policy.max_memory_limit_bytes",
                self.max_memory_limit_bytes == 0,
            ),
            ("policy.max_pids_limit", self.max_pids_limit == 0),
            (
                "policy.max_cpu_limit_millicores",
                self.max_cpu_limit_millicores == 0,
            ),
            (
                "policy.max_disk_limit_bytes",
                self.max_disk_limit_bytes == 0,
            ),
        ];
        if let Some((field, _)) = ceilings.iter().find(|(_, zero)| *zero) {
            return Err(PolicyError {
                field,
                message: "must be greater than 0".into(),
            });
        }
        Ok(())
    }

    /// Checks a structurally valid spec (see [`FleetSpec::validate`]) against the policy.
    /// Errors name the field below `prefix` (`spec.sandbox.driver`, `spec.repositories[3]`).
    ///
    /// # Errors
    /// The first field outside the policy, as a [`FieldError`].
    pub fn check(&self, spec: &FleetSpec, prefix: &str) -> Result<(), FieldError> {
        self.check_sandbox(&spec.sandbox, &format!("{prefix}.sandbox"))?;
        for (index, url) in spec.repositories.iter().enumerate() {
            self.check_repository(url).map_err(|message| {
                FieldError::new(format!("{prefix}.repositories[{index}]"), message)
            })?;
        }
        Ok(())
    }

    /// Checks a run's sandbox request; errors name the field below `prefix`
    /// (`spec.sandbox`).
    ///
    /// # Errors
    /// The first field outside the policy.
    pub fn check_sandbox(&self, sandbox: &SandboxSpec, prefix: &str) -> Result<(), FieldError> {
        let field = |name: &str| format!("{prefix}.{name}");
        if !self.allowed_drivers.contains(&sandbox.driver) {
            return Err(FieldError::new(
                field("driver"),
                format!(
                    "driver {:?} is not allowed by the operator's policy (policy.allowed_drivers = {:?})",
                    sandbox.driver, self.allowed_drivers
                ),
            ));
        }
        let mode = if sandbox.network { "proxy" } else { "none" };
        if !self.allowed_network_modes.iter().any(|m| m == mode) {
            return Err(FieldError::new(
                field("network"),
                format!(
                    "network mode {mode:?} is not allowed by the operator's policy (policy.allowed_network_modes = {:?})",
                    self.allowed_network_modes
                ),
            ));
        }
        let ceilings = [
            (
                "memory_limit_bytes",
                sandbox.memory_limit_bytes,
                self.max_memory_limit_bytes,
                "max_memory_limit_bytes",
            ),
            (
                "pids_limit",
                u64::from(sandbox.pids_limit),
                u64::from(self.max_pids_limit),
                "max_pids_limit",
            ),
            (
                "cpu_limit_millicores",
                u64::from(sandbox.cpu_limit_millicores),
                u64::from(self.max_cpu_limit_millicores),
                "max_cpu_limit_millicores",
            ),
            (
                "disk_limit_bytes",
                sandbox.disk_limit_bytes,
                self.max_disk_limit_bytes,
                "max_disk_limit_bytes",
            ),
        ];
        for (name, asked, ceiling, key) in ceilings {
            if asked > ceiling {
                return Err(FieldError::new(
                    field(name),
                    format!("{asked} exceeds the operator's ceiling {ceiling} (policy.{key})"),
                ));
            }
        }
        Ok(())
    }

    /// Checks one repository URL or absolute path: its scheme is allowed, it carries no
    /// password, a remote host matches `allowed_hosts` and is not a literal loopback, private,
    /// link-local or unspecified address (nor `localhost`), and a local path lies under a
    /// `file_roots` entry without `.` or `..` components.
    ///
    /// # Errors
    /// Why the URL is refused, as a message for the field that holds it.
    pub fn check_repository(&self, url: &str) -> Result<(), String> {
        let parsed = parse_repository(url)?;
        if !self.allowed_url_schemes.contains(&parsed.scheme) {
            return Err(format!(
                "scheme {:?} is not allowed by the operator's policy (policy.allowed_url_schemes = {:?})",
                parsed.scheme, self.allowed_url_schemes
            ));
        }
        match parsed.location {
            Location::Local(path) => self.check_local_path(&path),
            Location::Remote(host) => self.check_host(&host),
        }
    }

    /// Checks that `path` (absolute; the worker passes the canonical path, with symlinks
    /// resolved) lies under one of `file_roots`, compared component by component.
    ///
    /// # Errors
    /// Why the path is refused.
    pub fn check_local_path(&self, path: &Path) -> Result<(), String> {
        if !is_normal_absolute(path) {
            return Err(format!(
                "local path {} must be absolute, without `.` or `..` components",
                path.display()
            ));
        }
        if self.file_roots.iter().any(|root| path.starts_with(root)) {
            return Ok(());
        }
        Err(format!(
            "local repository {} lies outside the operator's file roots (policy.file_roots = {:?})",
            path.display(),
            self.file_roots
        ))
    }

    fn check_host(&self, host: &str) -> Result<(), String> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let bracketless = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(address) = bracketless.parse::<IpAddr>()
            && is_internal_address(address)
        {
            return Err(format!(
                "host {host} is a loopback, private, link-local or unspecified address; \
                 repositories are fetched from the worker host, so such addresses are refused"
            ));
        }
        if host == "localhost" || host.ends_with(".localhost") {
            return Err(format!("host {host} names the worker host itself"));
        }
        let allowed = self.allowed_hosts.iter().any(|pattern| {
            pattern == "*"
                || match pattern.strip_prefix("*.") {
                    Some(suffix) => host
                        .strip_suffix(suffix)
                        .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
                    None => host == *pattern,
                }
        });
        if allowed {
            Ok(())
        } else {
            Err(format!(
                "host {host} is not allowed by the operator's policy (policy.allowed_hosts = {:?})",
                self.allowed_hosts
            ))
        }
    }
}

pub use flotilla_address::is_internal_address;

fn is_normal_absolute(path: &Path) -> bool {
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

struct ParsedRepository {
    scheme: String,
    location: Location,
}

enum Location {
    Local(PathBuf),
    Remote(String),
}

fn parse_repository(url: &str) -> Result<ParsedRepository, String> {
    if url.starts_with('/') {
        return Ok(ParsedRepository {
            scheme: "file".into(),
            location: Location::Local(PathBuf::from(url)),
        });
    }
    let parsed = url::Url::parse(url).map_err(|error| format!("{url:?} is not a URL: {error}"))?;
    let scheme = parsed.scheme().to_string();
    if parsed.password().is_some() {
        return Err(
            "must not carry a password: credentials come from the worker's credential broker, \
             never from the spec (the spec is stored and shown to readers)"
                .into(),
        );
    }
    if scheme == "file" {
        if parsed.host_str().is_some_and(|h| !h.is_empty()) {
            return Err("a file:// URL must not name a host".into());
        }
        // Percent-decoding happens in `to_file_path`; `..` segments were already resolved by
        // the URL parser, so check the raw path too.
        if url.contains("/../") || url.ends_with("/..") || url.contains("/./") {
            return Err("must not contain `.` or `..` path segments".into());
        }
        let path = parsed
            .to_file_path()
            .map_err(|()| format!("{url:?} is not a local file path"))?;
        return Ok(ParsedRepository {
            scheme,
            location: Location::Local(path),
        });
    }
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("{url:?} names no host"))?
        .to_string();
    Ok(ParsedRepository {
        scheme,
        location: Location::Remote(host),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ExecutionPolicy {
        ExecutionPolicy {
            allowed_hosts: vec!["github.com".into(), "*.example.com".into()],
            file_roots: vec![PathBuf::from("/srv/repositories")],
            ..ExecutionPolicy::default()
        }
    }

    /// One check per line: URL, then `ok` or a fragment of the error.
    fn check(cases: &str) {
        let policy = policy();
        for line in cases.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (url, expected) = line.split_once(" => ").expect("case is `url => expected`");
            let got = match policy.check_repository(url) {
                Ok(()) => "ok".to_string(),
                Err(message) => message,
            };
            assert!(
                (expected == "ok" && got == "ok") || (expected != "ok" && got.contains(expected)),
                "{url}: expected {expected:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn repository_urls_are_checked_against_the_policy() {
        check(
            "
            https://github.com/org/repo.git => ok
            https://GitHub.com./org/repo => ok
            ssh://git@github.com/org/repo.git => ok
            https://git.example.com/repo => ok
            https://example.com/repo => not allowed
            https://evil.com/repo => not allowed
            https://github.com.evil.com/repo => not allowed
            https://user:secret@github.com/org/repo => must not carry a password
            http://github.com/org/repo => scheme \"http\"
            git://github.com/org/repo => scheme \"git\"
            https://127.0.0.1:50051/x => loopback
            https://[::1]/x => loopback
            https://[::ffff:10.0.0.1]/x => loopback, private
            https://169.254.169.254/latest => link-local
            https://10.1.2.3/x => private
            https://100.64.0.1/x => private
            https://0.0.0.0/x => unspecified
            https://localhost/x => worker host itself
            https://a.localhost/x => worker host itself
            file:///srv/repositories/a.git => ok
            /srv/repositories/team/b => ok
            /srv/repositories => ok
            file:///srv/repositories/../../etc => `..`
            /srv/repositories/../../root/secret => `..`
            /srv/repositories-other/x => outside the operator's file roots
            /root/private => outside the operator's file roots
            file://host/srv/repositories/a => must not name a host
            ",
        );
    }

    #[test]
    fn the_default_policy_refuses_local_repositories_and_the_none_driver() {
        let policy = ExecutionPolicy::default();
        assert!(policy.validate().is_ok());
        let local = policy.check_repository("file:///tmp/x").unwrap_err();
        assert!(local.contains("file roots"), "{local}");
        let sandbox = SandboxSpec {
            driver: "none".into(),
            ..SandboxSpec::default()
        };
        let error = policy.check_sandbox(&sandbox, "spec.sandbox").unwrap_err();
        assert_eq!(error.field, "spec.sandbox.driver");
        assert!(error.message.contains("policy.allowed_drivers"), "{error}");
    }

    #[test]
    fn sandbox_ceilings_name_the_field_and_the_policy_key() {
        let policy = ExecutionPolicy::default();
        let cases = [
            (
                SandboxSpec {
                    memory_limit_bytes: (8 << 30) + 1,
                    ..SandboxSpec::default()
                },
                "memory_limit_bytes",
                "max_memory_limit_bytes",
            ),
            (
                SandboxSpec {
                    pids_limit: 4097,
                    ..SandboxSpec::default()
                },
                "pids_limit",
                "max_pids_limit",
            ),
            (
                SandboxSpec {
                    cpu_limit_millicores: 4001,
                    ..SandboxSpec::default()
                },
                "cpu_limit_millicores",
                "max_cpu_limit_millicores",
            ),
            (
                SandboxSpec {
                    disk_limit_bytes: (20 << 30) + 1,
                    ..SandboxSpec::default()
                },
                "disk_limit_bytes",
                "max_disk_limit_bytes",
            ),
        ];
        for (sandbox, field, key) in cases {
            let error = policy.check_sandbox(&sandbox, "spec.sandbox").unwrap_err();
            assert_eq!(error.field, format!("spec.sandbox.{field}"));
            assert!(error.message.contains(key), "{error}");
        }
        let at_ceiling = SandboxSpec {
            memory_limit_bytes: 8 << 30,
            pids_limit: 4096,
            cpu_limit_millicores: 4000,
            disk_limit_bytes: 20 << 30,
            ..SandboxSpec::default()
        };
        assert!(policy.check_sandbox(&at_ceiling, "spec.sandbox").is_ok());
        let no_network = ExecutionPolicy {
            allowed_network_modes: vec!["none".into()],
            ..ExecutionPolicy::default()
        };
        let proxied = SandboxSpec {
            network: true,
            ..SandboxSpec::default()
        };
        let error = no_network
            .check_sandbox(&proxied, "spec.sandbox")
            .unwrap_err();
        assert_eq!(error.field, "spec.sandbox.network");
    }

    #[test]
    fn invalid_policies_name_the_key() {
        let cases = [
            (
                ExecutionPolicy {
                    allowed_drivers: vec!["docker".into()],
                    ..ExecutionPolicy::default()
                },
                "policy.allowed_drivers",
            ),
            (
                ExecutionPolicy {
                    allowed_network_modes: vec!["host".into()],
                    ..ExecutionPolicy::default()
                },
                "policy.allowed_network_modes",
            ),
            (
                ExecutionPolicy {
                    allowed_url_schemes: vec!["ftp".into()],
                    ..ExecutionPolicy::default()
                },
                "policy.allowed_url_schemes",
            ),
            (
                ExecutionPolicy {
                    allowed_hosts: vec!["*.".into()],
                    ..ExecutionPolicy::default()
                },
                "policy.allowed_hosts",
            ),
            (
                ExecutionPolicy {
                    allowed_hosts: vec!["a b".into()],
                    ..ExecutionPolicy::default()
                },
                "policy.allowed_hosts",
            ),
            (
                ExecutionPolicy {
                    file_roots: vec!["relative".into()],
                    ..ExecutionPolicy::default()
                },
                "policy.file_roots",
            ),
            (
                ExecutionPolicy {
                    file_roots: vec!["/srv/../etc".into()],
                    ..ExecutionPolicy::default()
                },
                "policy.file_roots",
            ),
            (
                ExecutionPolicy {
                    max_pids_limit: 0,
                    ..ExecutionPolicy::default()
                },
                "policy.max_pids_limit",
            ),
        ];
        for (policy, field) in cases {
            assert_eq!(policy.validate().unwrap_err().field, field, "{policy:?}");
        }
    }

    #[test]
    fn internal_addresses_are_classified() {
        for internal in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(is_internal_address(internal.parse().unwrap()), "{internal}");
        }
        for external in ["1.1.1.1", "140.82.112.3", "2606:4700::1111", "100.128.0.1"] {
            assert!(
                !is_internal_address(external.parse().unwrap()),
                "{external}"
            );
        }
    }
}
