//! Event rule files (YAML or TOML) as the CLI reads them, turned into the wire
//! `EventRuleSpec`:
//!
//! ```yaml
//! name: review-opened-prs            # unique in the fleet's project
//! source: github                     # a [[webhooks.sources]] name, "api", or "*"
//! filter: >-                         # CEL over `event`; absent: every event of the source
//!   event.type == "pull_request" && event.payload.action == "opened"
//! repositories: event.payload.repository.clone_url   # CEL: a URL or a list (fan-out)
//! params:                            # CEL strings, substituted for {{name}} below
//!   number: string(event.payload.number)
//!   title: event.payload.pull_request.title
//! fleet:                             # a fleet spec file's contents, targets optional
//!   name: review
//!   agent: { command: ./review.sh, task: "Review PR {{number}}: {{title}}" }
//!   branch: flotilla/review-{{number}}
//! ```
//!
//! Unknown keys are errors naming the key's path. The server compiles the expressions and
//! checks the fleet again.

use std::collections::BTreeMap;
use std::path::Path;

use flotilla_proto::v1;
use serde::Deserialize;

use crate::spec_file::{SpecFile, SpecFileError, parse_as, read_bounded};

/// An event rule file's contents.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    name: String,
    source: String,
    #[serde(default)]
    filter: String,
    #[serde(default)]
    repositories: String,
    #[serde(default)]
    params: BTreeMap<String, String>,
    fleet: SpecFile,
}

/// Reads and parses a rule file into the wire spec.
///
/// # Errors
/// Any [`SpecFileError`], with the key's path.
pub fn load(path: &Path) -> Result<v1::EventRuleSpec, SpecFileError> {
    let text = read_bounded(path).map_err(|source| SpecFileError::Read {
        path: path.into(),
        source,
    })?;
    let file: RuleFile = parse_as(path, &text)?;
    let fleet = file
        .fleet
        .into_wire_template(path)
        .map_err(|error| match error {
            SpecFileError::Targets {
                path,
                field,
                message,
            } => SpecFileError::Targets {
                path,
                field: format!("fleet.{field}"),
                message,
            },
            other => other,
        })?;
    Ok(v1::EventRuleSpec {
        name: file.name,
        source: file.source,
        filter: file.filter,
        repositories: file.repositories,
        params: file.params.into_iter().collect(),
        fleet: Some(fleet),
    })
}
