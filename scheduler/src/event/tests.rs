//! Rules evaluated against events through one `check` helper, and deliveries applied to the
//! state.

use std::collections::BTreeMap;

use super::delivery::{DeliveryHeader, MatchOutcome, RuleMatch, RuleResult, fleet_key};
use super::rule::{EventRuleSpec, EventView};
use crate::command::{Command, Request, Response};
use crate::spec::tests::spec;
use crate::state::State;

fn rule(filter: &str, repositories: &str, params: &[(&str, &str)]) -> EventRuleSpec {
    let mut fleet = spec(if repositories.is_empty() {
        &["file:///srv/fixed"]
    } else {
        &[]
    });
    fleet.agent.task = "review PR {{number}}: {{title}}".into();
    fleet.branch_template = "flotilla/pr-{{number}}".into();
    EventRuleSpec {
        name: "review".into(),
        source: "github".into(),
        filter: filter.into(),
        repositories: repositories.into(),
        params: params
            .iter()
            .map(|(name, text)| (name.to_string(), text.to_string()))
            .chain(
                [("number", "event.payload.number"), ("title", "'t'")]
                    .iter()
                    .filter(|(name, _)| !params.iter().any(|(given, _)| given == name))
                    .map(|(name, text)| (name.to_string(), text.to_string())),
            )
            .collect::<BTreeMap<_, _>>(),
        fleet,
    }
}

const PULL_REQUEST: &str = r#"{
  "action": "opened", "number": 42,
  "pull_request": { "title": "Bump serde", "labels": [ { "name": "deps" }, { "name": "bot" } ],
                    "head": { "ref": "bump-serde" } },
  "repository": { "full_name": "acme/api", "clone_url": "https://forge.example/acme/api.git" },
  "dependents": { "b": "https://forge.example/acme/b.git", "a": "https://forge.example/acme/a.git" }
}"#;

/// What `rule` makes of a `pull_request` event with [`PULL_REQUEST`]'s payload:
/// `"none"`, `"error: <message>"`, or `"<repositories> | <task> | <branch template>"`.
fn check(rule: EventRuleSpec, expected: &str) {
    let payload: serde_json::Value = serde_json::from_str(PULL_REQUEST).unwrap();
    let event = EventView {
        source: "github",
        event_type: "pull_request",
        delivery_id: "d-1",
        repository: "acme/api",
        payload: &payload,
    };
    let compiled = rule.compile("rule").expect("rule compiles");
    let shown = match compiled.evaluate(&rule, &event) {
        Ok(None) => "none".to_owned(),
        Ok(Some(fleet)) => format!(
            "{} | {} | {}",
            fleet.repositories.join(" "),
            fleet.agent.task,
            fleet.branch_template
        ),
        Err(error) => format!("error: {error}"),
    };
    assert_eq!(shown, expected, "{rule:?}");
    // Deterministic: the same again.
    let again = compiled.evaluate(&rule, &event);
    assert_eq!(
        format!("{again:?}"),
        format!("{:?}", compiled.evaluate(&rule, &event))
    );
}

#[test]
fn filters_select_events() {
    check(
        rule(
            "event.type == 'pull_request' && event.payload.action == 'opened'",
            "",
            &[],
        ),
        "file:///srv/fixed | review PR 42: t | flotilla/pr-42",
    );
    check(rule("event.payload.action == 'closed'", "", &[]), "none");
    check(
        rule(
            "event.payload.pull_request.labels.exists(l, l.name == 'deps')",
            "",
            &[("title", "event.payload.pull_request.title")],
        ),
        "file:///srv/fixed | review PR 42: Bump serde | flotilla/pr-42",
    );
    check(
        rule("event.repository.matches('^acme/')", "", &[]),
        "file:///srv/fixed | review PR 42: t | flotilla/pr-42",
    );
    check(
        rule("", "", &[]),
        "file:///srv/fixed | review PR 42: t | flotilla/pr-42",
    );
}

#[test]
fn targets_fan_out_sorted_and_deduplicated() {
    // One event, the PR's own repository.
    check(
        rule("", "event.payload.repository.clone_url", &[]),
        "https://forge.example/acme/api.git | review PR 42: t | flotilla/pr-42",
    );
    // One event, every dependent: a map walked in whatever order, selected as a sorted set.
    check(
        rule(
            "",
            "event.payload.dependents.map(k, event.payload.dependents[k]) + [event.payload.dependents.a]",
            &[],
        ),
        "https://forge.example/acme/a.git https://forge.example/acme/b.git | review PR 42: t | flotilla/pr-42",
    );
}

#[test]
fn failures_name_the_field() {
    check(
        rule("event.payload.number", "", &[]),
        "error: filter: must give a bool, gave a uint",
    );
    check(
        rule("", "event.payload.number", &[]),
        "error: repositories: must give a string or a list of strings, gave a uint",
    );
    check(
        rule("", "[event.repository, 1]", &[]),
        "error: repositories: must be a list of strings, holds an int",
    );
    check(
        rule("", "[]", &[]),
        "error: repositories: the expression selected no repository",
    );
    let missing = format!("{:?}", {
        let rule = rule("event.payload.no_such_field == 1", "", &[]);
        let payload: serde_json::Value = serde_json::from_str(PULL_REQUEST).unwrap();
        let event = EventView {
            source: "github",
            event_type: "pull_request",
            delivery_id: "d-1",
            repository: "",
            payload: &payload,
        };
        rule.compile("rule").unwrap().evaluate(&rule, &event)
    });
    assert!(missing.starts_with("Err(\"filter: "), "{missing}");
    check(
        rule("", "", &[("title", "event.payload.pull_request")]),
        "error: params.title: must give a string, number or bool, gave a map",
    );
}

#[test]
fn rules_are_validated_naming_the_field() {
    let error = |rule: EventRuleSpec| rule.compile("rule").err().map(|e| e.to_string());
    assert_eq!(
        error(rule("event.type ==", "", &[]))
            .map(|e| e.starts_with("rule.filter: not a CEL expression")),
        Some(true)
    );
    let mut unknown = rule("", "", &[]);
    unknown.fleet.agent.task = "{{nope}}".into();
    assert_eq!(
        error(unknown),
        Some(
            "rule.fleet.agent.task: {{nope}} names no parameter (params: [\"number\", \"title\"])"
                .into()
        )
    );
    let mut both = rule("", "event.repository", &[]);
    both.fleet.repositories = vec!["file:///srv/x".into()];
    assert_eq!(
        error(both),
        Some(
            "rule.repositories: give exactly one of repositories (an expression) and fleet.targets"
                .into()
        )
    );
    let mut bad_source = rule("", "", &[]);
    bad_source.source = "git hub".into();
    assert!(error(bad_source).is_some_and(|e| e.starts_with("rule.source")));
    let long = rule(&"true && ".repeat(600), "", &[]);
    assert!(error(long).is_some_and(|e| e.contains("longer than 4096")));
}

fn apply(state: &mut State, now_ms: u64, command: Command) -> Response {
    let response = state.apply(&Request {
        now_ms,
        command,
        principal: Default::default(),
    });
    state.check_invariants().expect("invariants");
    response
}

fn header(delivery_id: &str) -> DeliveryHeader {
    DeliveryHeader {
        project: "default".into(),
        source: "github".into(),
        delivery_id: delivery_id.into(),
        event_type: "pull_request".into(),
        repository: "acme/api".into(),
        payload_sha256: "00".repeat(32),
        payload_bytes: 10,
        verdict: "github: X-Hub-Signature-256 valid".into(),
    }
}

fn deliver(state: &mut State, now_ms: u64, delivery_id: &str, matches: Vec<RuleMatch>) -> Response {
    apply(
        state,
        now_ms,
        Command::DeliverEvent {
            header: header(delivery_id),
            matches,
            rules_evaluated: 1,
            retention_ms: 60_000,
            max_deliveries: 3,
            max_events: 1_000,
        },
    )
}

fn fleet_match(rule_id: &str, repositories: &[&str]) -> RuleMatch {
    RuleMatch {
        rule_id: rule_id.into(),
        result: RuleResult::Fleet(Box::new(spec(repositories))),
    }
}

#[test]
fn one_fleet_set_per_delivery_and_failed_deliveries_drive_again() {
    let mut state = State::new();
    let first = deliver(
        &mut state,
        1_000,
        "d-1",
        vec![
            fleet_match("default/review", &["file:///srv/a", "file:///srv/b"]),
            fleet_match("default/lint", &["file:///srv/a"]),
        ],
    );
    assert_eq!(
        first,
        Response::EventDelivered {
            fleet_ids: vec!["fl-1".into(), "fl-2".into()],
            duplicate: false
        }
    );
    assert_eq!(
        state.fleet("fl-1").unwrap().idempotency_key,
        fleet_key("github/d-1", "default/review")
    );
    assert_eq!(
        state.fleet("fl-1").unwrap().runs.len(),
        2,
        "one event, two repositories"
    );
    // A redelivery (GitHub's "Redeliver", or our own retry after a lost reply): same fleets.
    let again = deliver(
        &mut state,
        2_000,
        "d-1",
        vec![fleet_match("default/review", &["file:///srv/c"])],
    );
    assert_eq!(
        again,
        Response::EventDelivered {
            fleet_ids: vec!["fl-1".into(), "fl-2".into()],
            duplicate: true
        }
    );
    assert_eq!(state.deliveries().get("github/d-1").unwrap().receipts, 2);
    // A delivery whose every fleet was refused started nothing: its redelivery is evaluated
    // again (the rule was fixed meanwhile), not swallowed by the dedup.
    let refused = deliver(
        &mut state,
        3_000,
        "d-2",
        vec![RuleMatch {
            rule_id: "default/review".into(),
            result: RuleResult::Error("params.number: no such key".into()),
        }],
    );
    assert_eq!(
        refused,
        Response::EventDelivered {
            fleet_ids: vec![],
            duplicate: false
        }
    );
    let driven = deliver(
        &mut state,
        4_000,
        "d-2",
        vec![fleet_match("default/review", &["file:///srv/a"])],
    );
    assert_eq!(
        driven,
        Response::EventDelivered {
            fleet_ids: vec!["fl-3".into()],
            duplicate: false
        }
    );
    let record = state.deliveries().get("github/d-2").unwrap();
    assert_eq!((record.receipts, record.first_received_ms), (2, 3_000));
    // A fleet of another project than the delivery's is refused and recorded.
    let mut foreign = spec(&["file:///srv/a"]);
    foreign.project = "other".into();
    let response = deliver(
        &mut state,
        5_000,
        "d-3",
        vec![RuleMatch {
            rule_id: "other/x".into(),
            result: RuleResult::Fleet(Box::new(foreign)),
        }],
    );
    assert_eq!(
        response,
        Response::EventDelivered {
            fleet_ids: vec![],
            duplicate: false
        }
    );
    assert!(matches!(
        &state.deliveries().get("github/d-3").unwrap().matches[0].1,
        MatchOutcome::Refused { reason } if reason.contains("not the delivery's")
    ));
}

#[test]
fn deliveries_are_kept_within_retention_and_count() {
    let mut state = State::new();
    for (index, now_ms) in [1_000u64, 2_000, 3_000, 4_000].iter().enumerate() {
        deliver(
            &mut state,
            *now_ms,
            &format!("d-{index}"),
            vec![fleet_match("default/review", &["file:///srv/a"])],
        );
    }
    // At most 3 kept: the oldest went.
    assert_eq!(state.deliveries().len(), 3);
    assert!(state.deliveries().get("github/d-0").is_none());
    // 60 s later everything older than the retention goes.
    deliver(&mut state, 63_500, "d-9", vec![]);
    let kept: Vec<String> = state
        .deliveries()
        .newest_first()
        .map(|delivery| delivery.header.delivery_id.clone())
        .collect();
    assert_eq!(kept, vec!["d-9", "d-3"]);
    assert_eq!(state.deliveries().dropped(), 3);
    // Bad headers are refused, naming the field; nothing is recorded.
    let mut bad = header("");
    bad.event_type = "x".into();
    let response = apply(
        &mut state,
        64_000,
        Command::DeliverEvent {
            header: bad,
            matches: vec![],
            rules_evaluated: 0,
            retention_ms: 60_000,
            max_deliveries: 3,
            max_events: 1_000,
        },
    );
    assert!(
        matches!(&response, Response::Rejected { reason } if reason.starts_with("delivery_id")),
        "{response:?}"
    );
}

#[test]
fn rules_are_unique_bounded_and_deleted() {
    let mut state = State::new();
    let create = |state: &mut State, spec: EventRuleSpec| {
        apply(
            state,
            1_000,
            Command::CreateEventRule { spec, max_rules: 1 },
        )
    };
    let review = rule("", "", &[]);
    assert_eq!(
        create(&mut state, review.clone()),
        Response::EventRuleCreated {
            rule_id: "default/review".into(),
            created: true
        }
    );
    assert_eq!(
        create(&mut state, review.clone()),
        Response::EventRuleCreated {
            rule_id: "default/review".into(),
            created: false
        }
    );
    let mut changed = review.clone();
    changed.filter = "false".into();
    assert!(
        matches!(create(&mut state, changed), Response::Rejected { reason } if reason.contains("exists"))
    );
    let mut other = review;
    other.name = "other".into();
    assert!(
        matches!(create(&mut state, other), Response::Rejected { reason } if reason.contains("limits.max_event_rules"))
    );
    assert_eq!(
        apply(
            &mut state,
            2_000,
            Command::DeleteEventRule {
                rule_id: "default/review".into()
            }
        ),
        Response::EventRuleDeleted { existed: true }
    );
    assert_eq!(state.event_rules().count(), 0);
}
