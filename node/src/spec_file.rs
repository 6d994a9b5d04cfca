//! Fleet spec files (YAML or TOML) as the CLI reads them, turned into the wire `FleetSpec`.
//!
//! ```yaml
//! name: rustfmt                     # required
//! project: default                  # the owning project (namespace); default "default"
//! targets:
//!   repositories: [file:///srv/origin/serde.git]   # git URLs
//!   globs: ["/srv/origin/*.git"]                   # local repositories, expanded by the CLI
//!   repositories_file: repositories.txt            # one URL per line, relative to this file
//! agent:
//!   command: cargo fmt --all        # required, run with /bin/sh -c in the repository
//!   task: Format the code           # given as $FLOTILLA_TASK
//!   env: { RUST_LOG: info }       # not secret: stored and shown by `fleet show`
//!   secrets: { API_TOKEN: api-token }   # variable -> secret name (`flotilla secret set`)
//! verify: ["cargo fmt --all -- --check"]
//! sandbox: { driver: bwrap, timeout_ms: 600000, memory_limit_bytes: 0, pids_limit: 0, network: false,
//!           cpu_limit_millicores: 0, disk_limit_bytes: 0 }
//! branch: flotilla/{fleet}
//! commit_message: Format with rustfmt
//! max_parallelism: 16
//! max_attempts: 3
//! push: true
//! flow:                             # optional: flow control (`flotilla::scheduler::flow`)
//!   priority: 90                    # 0-100, higher first; default 50
//!   shared_repositories: false      # run beside other fleets on one repository (both must)
//!   require_approval: false         # wait for `fleet approve` before the first lease
//!   deadline_ms: 7200000            # cancel what has not started by then
//!   waves: ["1%", "10%", "100%"]    # canary waves: percentages or run counts
//!   success_threshold_percent: 90   # promote a wave at this success, else wait for approval
//!   soak_ms: 600000                 # wait between a good wave and the next
//!   approve_each_wave: false
//!   failure_limit: 3                # pause when more runs than this failed
//!   consecutive_failure_limit: 2    # pause when more than this many failed in a row
//! ```
//!
//! Unknown keys and wrongly typed values are errors naming the key's path; the server validates
//! values (ranges, URLs) again, since not every client is this CLI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flotilla_proto::v1;
use serde::Deserialize;

/// Most repositories a glob or a repositories file may produce (the server has its own limit).
pub const MAX_EXPANDED_REPOSITORIES: usize = 100_000;

/// A spec file's contents.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    name: String,
    #[serde(default)]
    project: String,
    /// Absent in an event rule whose `repositories` expression selects the targets.
    #[serde(default)]
    targets: Targets,
    agent: Agent,
    #[serde(default)]
    verify: Vec<String>,
    #[serde(default)]
    sandbox: Sandbox,
    #[serde(default)]
    branch: String,
    #[serde(default)]
    commit_message: String,
    #[serde(default)]
    max_parallelism: u32,
    #[serde(default)]
    max_attempts: u32,
    #[serde(default)]
    retry_backoff_initial_ms: u64,
    #[serde(default)]
    retry_backoff_max_ms: u64,
    #[serde(default = "default_push")]
    push: bool,
    #[serde(default)]
    flow: Option<Flow>,
}

fn default_push() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Flow {
    #[serde(default)]
    priority: Option<u32>,
    #[serde(default)]
    shared_repositories: bool,
    #[serde(default)]
    require_approval: bool,
    #[serde(default)]
    deadline_ms: u64,
    #[serde(default)]
    waves: Vec<WaveText>,
    #[serde(default)]
    success_threshold_percent: Option<u32>,
    #[serde(default)]
    soak_ms: u64,
    #[serde(default)]
    approve_each_wave: bool,
    #[serde(default)]
    failure_limit: Option<u32>,
    #[serde(default)]
    consecutive_failure_limit: Option<u32>,
}

/// A wave as written: a run count (`5`) or a percentage (`"10%"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WaveText {
    Runs(u32),
    Text(String),
}

impl Flow {
    fn into_wire(self) -> Result<v1::FlowSpec, (String, String)> {
        let waves = self
            .waves
            .into_iter()
            .enumerate()
            .map(|(index, wave)| {
                let size = match wave {
                    WaveText::Runs(runs) => v1::wave_size::Size::Runs(runs),
                    WaveText::Text(text) => {
                        let parsed = match text.trim().strip_suffix('%') {
                            Some(percent) => {
                                percent.trim().parse().map(v1::wave_size::Size::Percent)
                            }
                            None => text.trim().parse().map(v1::wave_size::Size::Runs),
                        };
                        parsed.map_err(|_| {
                            (
                                format!("flow.waves[{index}]"),
                                format!(
                                    "{text:?} is neither a run count nor a percentage like \"10%\""
                                ),
                            )
                        })?
                    }
                };
                Ok(v1::WaveSize { size: Some(size) })
            })
            .collect::<Result<Vec<_>, (String, String)>>()?;
        Ok(v1::FlowSpec {
            priority: self.priority,
            shared_repositories: self.shared_repositories,
            require_approval: self.require_approval,
            deadline_ms: self.deadline_ms,
            waves,
            success_threshold_percent: self.success_threshold_percent,
            soak_ms: self.soak_ms,
            approve_each_wave: self.approve_each_wave,
            failure_limit: self.failure_limit,
            consecutive_failure_limit: self.consecutive_failure_limit,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Targets {
    #[serde(default)]
    repositories: Vec<String>,
    #[serde(default)]
    globs: Vec<String>,
    #[serde(default)]
    repositories_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Agent {
    command: String,
    #[serde(default)]
    task: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Environment variable name -> secret name (`flotilla secret set`).
    #[serde(default)]
    secrets: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sandbox {
    #[serde(default)]
    driver: String,
    #[serde(default)]
    timeout_ms: u64,
    #[serde(default)]
    memory_limit_bytes: u64,
    #[serde(default)]
    pids_limit: u32,
    #[serde(default)]
    network: bool,
    #[serde(default)]
    cpu_limit_millicores: u32,
    #[serde(default)]
    disk_limit_bytes: u64,
}

/// Why a spec file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SpecFileError {
    /// Reading a file failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file's syntax, or a key, is wrong.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What and where (the key's path).
        message: String,
    },
    /// A target could not be expanded.
    #[error("{path}: {field}: {message}")]
    Targets {
        /// The file.
        path: PathBuf,
        /// The key.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// Parses `text` as a fleet spec file: YAML, or TOML when `path` ends in `.toml`.
///
/// # Errors
/// [`SpecFileError::Parse`] with the key's path.
pub fn parse(path: &Path, text: &str) -> Result<SpecFile, SpecFileError> {
    parse_as(path, text)
}

/// Parses `text` as any file type of the CLI (fleet and schedule spec files): YAML, or TOML
/// when `path` ends in `.toml`.
///
/// # Errors
/// [`SpecFileError::Parse`] with the key's path.
pub fn parse_as<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, SpecFileError> {
    let parse_error = |message: String| SpecFileError::Parse {
        path: path.to_path_buf(),
        message,
    };
    if path.extension().is_some_and(|e| e == "toml") {
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|e| parse_error(crate::config::toml_message(text, &e)))?;
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            parse_error(format!(
                "{}: {}",
                e.path(),
                crate::config::toml_message(text, e.inner())
            ))
        })
    } else {
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            // The YAML message may start with (part of) the path already: keep it once.
            let path = e.path().to_string();
            let inner = e.inner().to_string();
            let message = match inner.split_once(": ") {
                Some((prefix, rest)) if path.starts_with(prefix) => rest.to_string(),
                _ => inner,
            };
            parse_error(format!("{path}: {message}"))
        })
    }
}

/// Largest spec file or repositories file read, in bytes (16 MiB, the default gRPC message
/// limit: a larger spec could not be submitted anyway).
pub const MAX_SPEC_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Reads a UTF-8 text file of at most [`MAX_SPEC_FILE_BYTES`].
///
/// # Errors
/// The file cannot be read, is larger than the limit, or is not UTF-8.
pub fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_SPEC_FILE_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_SPEC_FILE_BYTES {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {MAX_SPEC_FILE_BYTES} bytes"),
        ));
    }
    Ok(text)
}

/// Reads, parses and expands a spec file into the wire spec.
///
/// # Errors
/// Any [`SpecFileError`].
pub fn load(path: &Path) -> Result<v1::FleetSpec, SpecFileError> {
    let text = read_bounded(path).map_err(|source| SpecFileError::Read {
        path: path.into(),
        source,
    })?;
    let file = parse(path, &text)?;
    file.into_wire(path)
}

impl SpecFile {
    /// Expands the targets (globs and repositories file, relative to the spec file's directory)
    /// and builds the wire spec.
    ///
    /// # Errors
    /// [`SpecFileError::Targets`] when a glob is malformed, a file is unreadable, or nothing
    /// matched.
    pub fn into_wire(self, path: &Path) -> Result<v1::FleetSpec, SpecFileError> {
        self.expand(path, true)
    }

    /// [`SpecFile::into_wire`] for a template whose targets may be chosen later (an event
    /// rule's `repositories` expression): no targets is not an error.
    ///
    /// # Errors
    /// As [`SpecFile::into_wire`], but for an empty target list.
    pub fn into_wire_template(self, path: &Path) -> Result<v1::FleetSpec, SpecFileError> {
        self.expand(path, false)
    }

    fn expand(self, path: &Path, require_targets: bool) -> Result<v1::FleetSpec, SpecFileError> {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let error = |field: &str, message: String| SpecFileError::Targets {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        let mut repositories = self.targets.repositories;
        for (index, pattern) in self.targets.globs.iter().enumerate() {
            let field = format!("targets.globs[{index}]");
            let absolute = if Path::new(pattern).is_absolute() {
                pattern.clone()
            } else {
                base.join(pattern).display().to_string()
            };
            let matches = glob::glob(&absolute).map_err(|e| error(&field, e.to_string()))?;
            let before = repositories.len();
            for entry in matches {
                let entry = entry.map_err(|e| error(&field, e.to_string()))?;
                let canonical = entry
                    .canonicalize()
                    .map_err(|e| error(&field, e.to_string()))?;
                if canonical.join(".git").exists() || canonical.join("HEAD").exists() {
                    repositories.push(format!("file://{}", canonical.display()));
                }
                if repositories.len() > MAX_EXPANDED_REPOSITORIES {
                    return Err(error(
                        &field,
                        format!("matches more than {MAX_EXPANDED_REPOSITORIES} repositories"),
                    ));
                }
            }
            if repositories.len() == before {
                return Err(error(
                    &field,
                    format!("{pattern:?} matched no git repository"),
                ));
            }
        }
        if let Some(file) = &self.targets.repositories_file {
            let file = base.join(file);
            let text = read_bounded(&file).map_err(|e| {
                error(
                    "targets.repositories_file",
                    format!("{}: {e}", file.display()),
                )
            })?;
            repositories.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
            if repositories.len() > MAX_EXPANDED_REPOSITORIES {
                return Err(error(
                    "targets.repositories_file",
                    format!("more than {MAX_EXPANDED_REPOSITORIES} repositories"),
                ));
            }
        }
        if require_targets && repositories.is_empty() {
            return Err(error(
                "targets",
                "names no repository (repositories, globs or repositories_file)".into(),
            ));
        }
        let flow = match self.flow {
            Some(flow) => Some(
                flow.into_wire()
                    .map_err(|(field, message)| error(&field, message))?,
            ),
            None => None,
        };
        Ok(v1::FleetSpec {
            name: self.name,
            project: self.project,
            repositories,
            agent: Some(v1::AgentSpec {
                command: self.agent.command,
                task: self.agent.task,
                env: self.agent.env.into_iter().collect(),
                secrets: self.agent.secrets.into_iter().collect(),
            }),
            verify: self.verify,
            sandbox: Some(v1::SandboxSpec {
                driver: self.sandbox.driver,
                timeout_ms: self.sandbox.timeout_ms,
                memory_limit_bytes: self.sandbox.memory_limit_bytes,
                pids_limit: self.sandbox.pids_limit,
                network: self.sandbox.network,
                cpu_limit_millicores: self.sandbox.cpu_limit_millicores,
                disk_limit_bytes: self.sandbox.disk_limit_bytes,
            }),
            branch_template: self.branch,
            commit_message: self.commit_message,
            max_parallelism: self.max_parallelism,
            max_attempts: self.max_attempts,
            push: self.push,
            retry_backoff_initial_ms: self.retry_backoff_initial_ms,
            retry_backoff_max_ms: self.retry_backoff_max_ms,
            flow,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 100,000-repository spec file (about 6.5 MB) parses, converts within limits raised to
    /// 100,000 runs, fits a submission request under the default 16 MiB request limit, and
    /// round-trips through the state's form unchanged.
    #[test]
    fn a_spec_of_100000_repositories_round_trips_within_limits() {
        use prost::Message;
        let repositories: String = (0..100_000)
            .map(|index| {
                format!("    - https://git.example.org/organisation/repository-{index:06}.git\n")
            })
            .collect();
        let text = format!(
            "name: big\ntargets:\n  repositories:\n{repositories}agent: {{command: \"true\"}}\n"
        );
        let path = Path::new("big.yaml");
        let wire = parse(path, &text).unwrap().into_wire(path).unwrap();
        assert_eq!(wire.repositories.len(), 100_000);
        let limits = flotilla_scheduler::SpecLimits {
            max_runs_per_fleet: 100_000,
            ..Default::default()
        };
        let spec = crate::convert::fleet_spec_from_wire(Some(wire.clone()), &limits).unwrap();
        let request = v1::SubmitFleetRequest {
            spec: Some(wire),
            idempotency_key: String::new(),
            dry_run: false,
        };
        let size_bytes = request.encoded_len();
        assert!(
            size_bytes < crate::config::LimitsSection::default().max_request_bytes,
            "{size_bytes}"
        );
        let back = crate::convert::fleet_spec_from_wire(
            Some(crate::convert::fleet_spec_to_wire(&spec)),
            &limits,
        )
        .unwrap();
        assert_eq!(back, spec);
        // Beyond the default limit of 10,000 runs it is refused, naming the setting.
        let error = crate::convert::fleet_spec_from_wire(
            Some(crate::convert::fleet_spec_to_wire(&spec)),
            &flotilla_scheduler::SpecLimits::default(),
        )
        .unwrap_err();
        assert!(error.to_string().contains("max_runs_per_fleet"), "{error}");
    }

    fn check(file_name: &str, text: &str, expected: &str) {
        let directory = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(directory.path().join("repos/a/.git")).unwrap();
        std::fs::create_dir_all(directory.path().join("repos/b/.git")).unwrap();
        std::fs::write(
            directory.path().join("list.txt"),
            "file:///x.git\n# comment\n\nfile:///y.git\n",
        )
        .unwrap();
        let path = directory.path().join(file_name);
        let actual = match parse(&path, text).and_then(|f| f.into_wire(&path)) {
            Ok(spec) => {
                let root = directory
                    .path()
                    .canonicalize()
                    .unwrap()
                    .display()
                    .to_string();
                format!(
                    "ok {} {}",
                    spec.name,
                    spec.repositories.join(",").replace(&root, "ROOT")
                )
            }
            Err(error) => error
                .to_string()
                .replace(&path.display().to_string(), "FILE"),
        };
        assert_eq!(actual, expected);
    }

    #[test]
    fn yaml_and_toml_specs_expand_their_targets() {
        check(
            "fleet.yaml",
            "name: fmt\ntargets:\n  repositories: [file:///z.git]\n  globs: [repos/*]\n  repositories_file: list.txt\nagent:\n  command: cargo fmt\n",
            "ok fmt file:///z.git,file://ROOT/repos/a,file://ROOT/repos/b,file:///x.git,file:///y.git",
        );
        check(
            "fleet.toml",
            "name = \"fmt\"\nverify = [\"true\"]\n[targets]\nrepositories = [\"file:///z.git\"]\n[agent]\ncommand = \"cargo fmt\"\n",
            "ok fmt file:///z.git",
        );
    }

    #[test]
    fn errors_name_the_key() {
        check(
            "fleet.yaml",
            "name: fmt\ntargets: {repositories: [file:///z.git]}\nagent: {command: x, comand: y}\n",
            "FILE: agent.comand: unknown field `comand`, expected one of `command`, `task`, `env`, `secrets` at line 3 column 21",
        );
        check(
            "fleet.yaml",
            "name: fmt\ntargets: {repositories: [file:///z.git]}\nagent: {command: x}\nmax_parallelism: many\n",
            "FILE: max_parallelism: invalid type: string \"many\", expected u32 at line 4 column 18",
        );
        check(
            "fleet.yaml",
            "name: fmt\ntargets: {globs: [nothing/*]}\nagent: {command: x}\n",
            "FILE: targets.globs[0]: \"nothing/*\" matched no git repository",
        );
        check(
            "fleet.yaml",
            "name: fmt\ntargets: {}\nagent: {command: x}\n",
            "FILE: targets: names no repository (repositories, globs or repositories_file)",
        );
        check(
            "fleet.toml",
            "name = \"fmt\"\n[targets]\nrepositories = [\"file:///z.git\"]\n[agent]\ncommand = 5\n",
            "FILE: agent.command: invalid type: integer `5`, expected a string (line 5)",
        );
    }
}
