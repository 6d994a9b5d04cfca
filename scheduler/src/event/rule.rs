//! Event rules: which events start a fleet, on which repositories, with which text.
//!
//! A rule is a filter, a target selector and parameters, each an expression of the Common
//! Expression Language (CEL, <https://github.com/google/cel-spec>, evaluated by the `cel`
//! crate), over one variable `event`:
//!
//! | field                | type   | meaning                                                |
//! |----------------------|--------|--------------------------------------------------------|
//! | `event.source`       | string | the webhook source (`github`, ...) or `api`            |
//! | `event.type`         | string | `pull_request`, `Push Hook`, the caller's type, ...    |
//! | `event.delivery_id`  | string | the sender's delivery id                               |
//! | `event.repository`   | string | the repository the sender names (may be empty)         |
//! | `event.payload`      | map    | the JSON body                                          |
//!
//! The crate is built without its clock and time-zone features and CEL has no randomness, so
//! an evaluation depends on the rule and the event only. (Maps are unordered in CEL: a target
//! list is sorted and deduplicated, so an expression that walks a map still selects the same
//! set.) Evaluation happens on the leader before it proposes the delivery; the log entry carries
//! the fleets, and the state machine never evaluates an expression.

use std::collections::BTreeMap;

use cel::{Context, Program, Value};
use serde::{Deserialize, Serialize};

use crate::spec::{FieldError, FleetSpec, is_valid_name};

/// Most rules in the cluster unless the operator sets another bound (node
/// `limits.max_event_rules`, carried by each `CreateEventRule`).
pub const DEFAULT_MAX_EVENT_RULES: u32 = 256;
/// Longest expression (filter, repositories, a parameter), bytes.
pub const MAX_EXPRESSION_BYTES: usize = 4096;
/// Most parameters of one rule.
pub const MAX_PARAMS: usize = 16;
/// Longest value a parameter may evaluate to, bytes.
pub const MAX_PARAM_VALUE_BYTES: usize = 4096;
/// The source name that matches every source of the rule's project.
pub const ANY_SOURCE: &str = "*";

/// A rule as submitted. Its project is its fleet's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventRuleSpec {
    /// 1-64 characters of `[A-Za-z0-9._-]`, unique in the project.
    pub name: String,
    /// The source whose events it sees: a webhook source's name, `api` (`PublishEvent`), or
    /// [`ANY_SOURCE`].
    pub source: String,
    /// A CEL expression that must be `true` for the rule to start a fleet; empty: always.
    #[serde(default)]
    pub filter: String,
    /// A CEL expression giving the repositories (a string or a list of strings: the fan-out);
    /// empty: the fleet template's own `repositories`.
    #[serde(default)]
    pub repositories: String,
    /// Named CEL expressions, each a string (or a number or bool, printed), substituted for
    /// `{{name}}` in the template's task, environment values, branch template and commit
    /// message.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// The fleet each matching event starts.
    pub fleet: FleetSpec,
}

/// The event as rules see it (module documentation).
#[derive(Clone, Copy, Debug)]
pub struct EventView<'a> {
    /// Source name.
    pub source: &'a str,
    /// Event type.
    pub event_type: &'a str,
    /// Delivery id.
    pub delivery_id: &'a str,
    /// Repository named by the sender, or empty.
    pub repository: &'a str,
    /// The JSON body.
    pub payload: &'a serde_json::Value,
}

#[derive(Serialize)]
struct EventVariable<'a> {
    source: &'a str,
    #[serde(rename = "type")]
    event_type: &'a str,
    delivery_id: &'a str,
    repository: &'a str,
    payload: &'a serde_json::Value,
}

/// A rule's expressions, compiled.
pub struct CompiledRule {
    filter: Option<Program>,
    repositories: Option<Program>,
    params: Vec<(String, Program)>,
}

fn compile_expression(text: &str, field: &str) -> Result<Option<Program>, FieldError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    if text.len() > MAX_EXPRESSION_BYTES {
        return Err(FieldError::new(
            field,
            format!("longer than {MAX_EXPRESSION_BYTES} bytes"),
        ));
    }
    Program::compile(text)
        .map(Some)
        .map_err(|error| FieldError::new(field, format!("not a CEL expression: {error}")))
}

/// The `{{name}}` placeholders of `text`, in order.
fn placeholders(text: &str) -> impl Iterator<Item = &str> {
    text.match_indices("{{").filter_map(move |(start, _)| {
        let rest = &text[start + 2..];
        rest.find("}}").map(|end| rest[..end].trim())
    })
}

/// `text` with every `{{name}}` replaced by `params[name]`.
///
/// # Errors
/// A placeholder naming no parameter.
pub fn substitute(text: &str, params: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(length) = rest[start + 2..].find("}}") else {
            break;
        };
        let name = rest[start + 2..start + 2 + length].trim();
        let value = params
            .get(name)
            .ok_or_else(|| format!("{{{{{name}}}}} names no parameter"))?;
        out.push_str(&rest[..start]);
        out.push_str(value);
        rest = &rest[start + 2 + length + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The template fields that take `{{name}}` placeholders, with their paths.
fn template_fields(fleet: &FleetSpec) -> Vec<(String, &str)> {
    let mut fields = vec![
        ("fleet.agent.task".to_owned(), fleet.agent.task.as_str()),
        (
            "fleet.branch_template".to_owned(),
            fleet.branch_template.as_str(),
        ),
        (
            "fleet.commit_message".to_owned(),
            fleet.commit_message.as_str(),
        ),
    ];
    for (name, value) in &fleet.agent.env {
        fields.push((format!("fleet.agent.env.{name}"), value.as_str()));
    }
    fields
}

impl EventRuleSpec {
    /// The rule's id: `<project>/<name>`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.fleet.project, self.name)
    }

    /// Checks the name, source and parameters and compiles every expression; `prefix` is the
    /// rule's path (`rule`). The fleet template is the node's to check (its limits and policy).
    ///
    /// # Errors
    /// The first invalid field, with its path.
    pub fn compile(&self, prefix: &str) -> Result<CompiledRule, FieldError> {
        let field = |name: &str| format!("{prefix}.{name}");
        if !is_valid_name(&self.name) {
            return Err(FieldError::new(
                field("name"),
                "must be 1-64 characters of [A-Za-z0-9._-]",
            ));
        }
        if self.source != ANY_SOURCE && !is_valid_name(&self.source) {
            return Err(FieldError::new(
                field("source"),
                "must be a source name (1-64 characters of [A-Za-z0-9._-]) or \"*\"",
            ));
        }
        if self.params.len() > MAX_PARAMS {
            return Err(FieldError::new(
                field("params"),
                format!("more than {MAX_PARAMS} parameters"),
            ));
        }
        let mut params = Vec::new();
        for (name, text) in &self.params {
            let path = field(&format!("params.{name}"));
            if !is_valid_name(name) {
                return Err(FieldError::new(
                    path,
                    "the name must be 1-64 characters of [A-Za-z0-9._-]",
                ));
            }
            let program = compile_expression(text, &path)?
                .ok_or_else(|| FieldError::new(&path, "must not be empty"))?;
            params.push((name.clone(), program));
        }
        for (path, text) in template_fields(&self.fleet) {
            if let Some(name) = placeholders(text).find(|name| !self.params.contains_key(*name)) {
                return Err(FieldError::new(
                    field(&path),
                    format!(
                        "{{{{{name}}}}} names no parameter (params: {:?})",
                        self.params.keys().collect::<Vec<_>>()
                    ),
                ));
            }
        }
        if self.repositories.trim().is_empty() == self.fleet.repositories.is_empty() {
            return Err(FieldError::new(
                field("repositories"),
                "give exactly one of repositories (an expression) and fleet.targets",
            ));
        }
        Ok(CompiledRule {
            filter: compile_expression(&self.filter, &field("filter"))?,
            repositories: compile_expression(&self.repositories, &field("repositories"))?,
            params,
        })
    }
}

fn evaluate(program: &Program, context: &Context, field: &str) -> Result<Value, String> {
    program
        .execute(context)
        .map_err(|error| format!("{field}: {error}"))
}

/// The CEL type name of `value` with its article, for messages.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::List(_) => "a list",
        Value::Map(_) => "a map",
        Value::Int(_) => "an int",
        Value::UInt(_) => "a uint",
        Value::Float(_) => "a double",
        Value::String(_) => "a string",
        Value::Bytes(_) => "bytes",
        Value::Bool(_) => "a bool",
        Value::Null => "null",
        _ => "another type",
    }
}

fn printed(value: &Value, field: &str) -> Result<String, String> {
    match value {
        Value::String(text) => Ok(text.to_string()),
        Value::Int(number) => Ok(number.to_string()),
        Value::UInt(number) => Ok(number.to_string()),
        Value::Float(number) => Ok(number.to_string()),
        Value::Bool(flag) => Ok(flag.to_string()),
        other => Err(format!(
            "{field}: must give a string, number or bool, gave {}",
            type_name(other)
        )),
    }
}

impl CompiledRule {
    /// The fleet `spec`'s rule starts for `event`, or `None` when its filter is false.
    ///
    /// # Errors
    /// An expression that fails or gives the wrong type, a parameter longer than
    /// [`MAX_PARAM_VALUE_BYTES`], a target list that is empty; each names the field.
    pub fn evaluate(
        &self,
        spec: &EventRuleSpec,
        event: &EventView<'_>,
    ) -> Result<Option<FleetSpec>, String> {
        let mut context = Context::default();
        context
            .add_variable(
                "event",
                EventVariable {
                    source: event.source,
                    event_type: event.event_type,
                    delivery_id: event.delivery_id,
                    repository: event.repository,
                    payload: event.payload,
                },
            )
            .map_err(|error| format!("event: {error}"))?;
        if let Some(filter) = &self.filter {
            match evaluate(filter, &context, "filter")? {
                Value::Bool(true) => {}
                Value::Bool(false) => return Ok(None),
                other => {
                    return Err(format!(
                        "filter: must give a bool, gave {}",
                        type_name(&other)
                    ));
                }
            }
        }
        let mut params = BTreeMap::new();
        for (name, program) in &self.params {
            let field = format!("params.{name}");
            let value = printed(&evaluate(program, &context, &field)?, &field)?;
            if value.len() > MAX_PARAM_VALUE_BYTES {
                return Err(format!(
                    "{field}: longer than {MAX_PARAM_VALUE_BYTES} bytes"
                ));
            }
            params.insert(name.clone(), value);
        }
        let mut fleet = spec.fleet.clone();
        if let Some(program) = &self.repositories {
            fleet.repositories = match evaluate(program, &context, "repositories")? {
                Value::String(url) => vec![url.to_string()],
                Value::List(items) => items
                    .iter()
                    .map(|item| match item {
                        Value::String(url) => Ok(url.to_string()),
                        other => Err(format!(
                            "repositories: must be a list of strings, holds {}",
                            type_name(other)
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                other => {
                    return Err(format!(
                        "repositories: must give a string or a list of strings, gave {}",
                        type_name(&other)
                    ));
                }
            };
            fleet.repositories.sort();
            fleet.repositories.dedup();
            if fleet.repositories.is_empty() {
                return Err("repositories: the expression selected no repository".into());
            }
        }
        fleet.agent.task = substitute(&fleet.agent.task, &params)?;
        fleet.branch_template = substitute(&fleet.branch_template, &params)?;
        fleet.commit_message = substitute(&fleet.commit_message, &params)?;
        for value in fleet.agent.env.values_mut() {
            *value = substitute(value, &params)?;
        }
        Ok(Some(fleet))
    }
}
