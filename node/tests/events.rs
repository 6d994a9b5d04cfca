//! Event triggers on a real `flotilla server`, over real HTTP (`curl`) and the real CLI:
//! GitHub, GitLab and Standard Webhooks deliveries verified against the operator's secrets
//! (valid, invalid, missing, stale, rotated, oversized, non-UTF-8: each refused with its status
//! and recorded), rules that start a fleet for one repository or fan one event out to several,
//! redeliveries that answer the same fleets, a delivery that matched nothing driven again once
//! a rule exists, and API events from `flotilla event send` and `POST /events`.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use base64::Engine as _;
use common::Node;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Headers, body, the status expected and a part of the message expected.
type Refused<'a> = (Vec<(&'a str, String)>, Vec<u8>, u16, &'a str);

fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap();
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn secret_file(directory: &Path, name: &str, text: &str) -> String {
    let path = directory.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.display().to_string()
}

/// `curl -X POST` of `body` with `headers` to `url`: (HTTP status, JSON answer).
fn post(url: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, serde_json::Value) {
    let directory = tempfile::tempdir().unwrap();
    let body_file = directory.path().join("body");
    std::fs::write(&body_file, body).unwrap();
    let mut command = std::process::Command::new("curl");
    command.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", "POST"]);
    command
        .arg("--data-binary")
        .arg(format!("@{}", body_file.display()));
    command.args(["-H", "content-type: application/json"]);
    for (name, value) in headers {
        command.args(["-H", &format!("{name}: {value}")]);
    }
    let output = command
        .arg(url)
        .output()
        .expect("curl (Debian package curl)");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (answer, status) = text.rsplit_once('\n').unwrap_or(("", "0"));
    let status: u16 = status.trim().parse().unwrap_or(0);
    let json = serde_json::from_str(answer).unwrap_or(serde_json::Value::String(answer.into()));
    (status, json)
}

fn cli(address: &str, arguments: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(arguments);
    let (code, stdout, stderr) = common::flotilla_cli(address, &all);
    assert_eq!(code, 0, "{arguments:?}: {stdout}{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{error}: {stdout}"))
}

/// A fleet as `GetFleet` answers it: its repositories (from its runs), task and branch
/// template.
async fn fleet(address: &str, fleet_id: &str) -> serde_json::Value {
    let fleet = common::fleet_client(address)
        .await
        .get_fleet(flotilla_proto::v1::GetFleetRequest {
            fleet_id: fleet_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let spec = fleet.spec.unwrap_or_default();
    let repositories: Vec<String> = fleet
        .runs
        .iter()
        .map(|run| run.repository.clone())
        .collect();
    serde_json::json!({
        "repositories": repositories,
        "task": spec.agent.map(|agent| agent.task).unwrap_or_default(),
        "branch_template": spec.branch_template,
    })
}

const REVIEW_RULE: &str = r#"name: review-opened
source: github
filter: event.type == "pull_request" && event.payload.action == "opened"
repositories: event.payload.repository.clone_url
params:
  number: string(event.payload.number)
  title: event.payload.pull_request.title
fleet:
  name: review
  agent: { command: "true", task: "Review PR {{number}}: {{title}}" }
  branch: flotilla/review-{{number}}
"#;

const FAN_OUT_RULE: &str = r#"name: bump-dependents
source: releases
filter: event.type == "release.published"
repositories: event.payload.data.dependents
params: { version: event.payload.data.version }
fleet:
  name: bump
  agent: { command: "true", task: "Bump lib to {{version}}" }
"#;

const API_RULE: &str = r#"name: deploy
source: api
repositories: '"file:///srv/" + event.repository + ".git"'
fleet:
  name: after-deploy
  agent: { command: "true" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_and_api_events_start_one_fleet_set_per_delivery() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let standard_key = b"0123456789abcdef0123456789abcdef";
    let standard_secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(standard_key)
    );
    let config = format!(
        r#"[worker]
enabled = false

[webhooks]
max_body_bytes = 4096

[[webhooks.sources]]
name = "github"
kind = "github"
secret_files = [{new:?}, {old:?}]

[[webhooks.sources]]
name = "gitlab"
kind = "gitlab"
secret_files = [{gitlab:?}]

[[webhooks.sources]]
name = "releases"
kind = "standard"
secret_files = [{standard:?}]
"#,
        new = secret_file(dir, "github-new", "new-secret\n"),
        old = secret_file(dir, "github-old", "old-secret\n"),
        gitlab = secret_file(dir, "gitlab", "gitlab-token"),
        standard = secret_file(dir, "standard", &standard_secret),
    );
    let config_path = dir.join("node.toml");
    common::write_config(&config_path, &config);
    let http_port = common::free_port();
    let http = format!("127.0.0.1:{http_port}");
    let node = Node::start(
        &dir.join("node"),
        &[
            "--config",
            config_path.to_str().unwrap(),
            "--http-listen-address",
            &http,
        ],
    )
    .await;
    let address = node.address.clone();
    for (name, text) in [
        ("review.yaml", REVIEW_RULE),
        ("fan-out.yaml", FAN_OUT_RULE),
        ("api.yaml", API_RULE),
    ] {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        let created = cli(
            &address,
            &["event", "rule", "create", file.to_str().unwrap()],
        );
        assert_eq!(created["created"], true, "{created}");
    }
    let hooks = |source: &str| format!("http://{http}/hooks/{source}");

    // GitHub: a signed "pull_request opened" starts the review fleet for that repository.
    let pull_request = br#"{"action":"opened","number":42,"pull_request":{"title":"Bump serde"},
        "repository":{"full_name":"acme/api","clone_url":"file:///srv/acme-api.git"}}"#;
    let github = |secret: &[u8], delivery: &str, body: &[u8]| {
        vec![
            ("x-github-delivery", delivery.to_owned()),
            ("x-github-event", "pull_request".to_owned()),
            (
                "x-hub-signature-256",
                format!("sha256={}", hex(&hmac(secret, &[body]))),
            ),
        ]
    };
    let (status, first) = post(
        &hooks("github"),
        &github(b"new-secret", "gh-1", pull_request),
        pull_request,
    );
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["duplicate"], false);
    let review_fleet = first["fleet_ids"][0].as_str().unwrap().to_owned();
    let shown = fleet(&address, &review_fleet).await;
    assert_eq!(
        shown["repositories"],
        serde_json::json!(["file:///srv/acme-api.git"]),
        "{shown}"
    );
    assert_eq!(shown["task"], "Review PR 42: Bump serde", "{shown}");
    assert_eq!(shown["branch_template"], "flotilla/review-42", "{shown}");
    // GitHub's "Redeliver": the same fleet, nothing new.
    let (status, again) = post(
        &hooks("github"),
        &github(b"new-secret", "gh-1", pull_request),
        pull_request,
    );
    assert_eq!(status, 200);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["fleet_ids"], first["fleet_ids"]);
    // The old secret still verifies while it is listed (rotation).
    let (status, rotated) = post(
        &hooks("github"),
        &github(b"old-secret", "gh-2", pull_request),
        pull_request,
    );
    assert_eq!(status, 200, "{rotated}");
    assert_ne!(rotated["fleet_ids"], first["fleet_ids"]);

    // Refusals, each with its status and a message naming what is wrong.
    let refusals: Vec<Refused> = vec![
        (
            github(b"wrong-secret", "gh-3", pull_request),
            pull_request.to_vec(),
            401,
            "x-hub-signature-256: does not match",
        ),
        (
            github(b"new-secret", "gh-3", b"{}"),
            pull_request.to_vec(),
            401,
            "does not match",
        ),
        (
            vec![
                ("x-github-delivery", "gh-3".into()),
                ("x-github-event", "push".into()),
            ],
            pull_request.to_vec(),
            401,
            "x-hub-signature-256: missing",
        ),
        (
            github(b"new-secret", "gh-3", b"caf\xe9"),
            b"caf\xe9".to_vec(),
            400,
            "body: not UTF-8",
        ),
        (
            github(b"new-secret", "gh-3", b"[1,"),
            b"[1,".to_vec(),
            400,
            "body: not JSON",
        ),
        (
            github(b"new-secret", "gh-3", &[b' '; 5000]),
            vec![b' '; 5000],
            413,
            "webhooks.max_body_bytes",
        ),
    ];
    for (headers, body, expected_status, expected) in &refusals {
        let (status, answer) = post(&hooks("github"), headers, body);
        assert_eq!(status, *expected_status, "{expected}: {answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap_or_default()
                .contains(expected),
            "{expected}: {answer}"
        );
    }
    let (status, _) = post(&hooks("nowhere"), &[], b"{}");
    assert_eq!(status, 404);

    // GitLab: the token itself, the Idempotency-Key as the delivery id. No rule for gitlab:
    // recorded with no fleet; once a rule exists, its redelivery is driven again.
    let merge_request =
        br#"{"object_kind":"merge_request","project":{"path_with_namespace":"acme/web"}}"#;
    let gitlab = vec![
        ("x-gitlab-token", "gitlab-token".to_owned()),
        ("x-gitlab-event", "Merge Request Hook".to_owned()),
        ("idempotency-key", "gl-1".to_owned()),
    ];
    let (status, unmatched) = post(&hooks("gitlab"), &gitlab, merge_request);
    assert_eq!(status, 200, "{unmatched}");
    assert_eq!(unmatched["fleet_ids"], serde_json::json!([]));
    let gitlab_rule = dir.join("gitlab.yaml");
    std::fs::write(
        &gitlab_rule,
        "name: gitlab-mr\nsource: gitlab\nrepositories: '\"file:///srv/\" + event.payload.object_kind + \".git\"'\nfleet: { name: mr, agent: { command: 'true' } }\n",
    )
    .unwrap();
    let created = cli(
        &address,
        &["event", "rule", "create", gitlab_rule.to_str().unwrap()],
    );
    assert_eq!(created["created"], true);
    let (status, driven) = post(&hooks("gitlab"), &gitlab, merge_request);
    assert_eq!(status, 200, "{driven}");
    assert_eq!(driven["duplicate"], false);
    assert_eq!(driven["fleet_ids"].as_array().unwrap().len(), 1, "{driven}");
    let mut wrong_token = gitlab.clone();
    wrong_token[0].1 = "gitlab-tokeN".into();
    assert_eq!(post(&hooks("gitlab"), &wrong_token, merge_request).0, 401);

    // Standard Webhooks: one release fans out to every dependent, as one fleet of three runs.
    let release = br#"{"type":"release.published","data":{"version":"2.1.0","dependents":
        ["file:///srv/b.git","file:///srv/a.git","file:///srv/c.git","file:///srv/a.git"]}}"#;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let standard = |id: &str, timestamp: u64, body: &[u8]| {
        let timestamp = timestamp.to_string();
        let signature = hmac(
            standard_key,
            &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
        );
        vec![
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", timestamp),
            (
                "webhook-signature",
                format!(
                    "v1,{}",
                    base64::engine::general_purpose::STANDARD.encode(signature)
                ),
            ),
        ]
    };
    let (status, fanned) = post(
        &hooks("releases"),
        &standard("msg_1", now_s, release),
        release,
    );
    assert_eq!(status, 200, "{fanned}");
    let bump = fleet(&address, fanned["fleet_ids"][0].as_str().unwrap()).await;
    assert_eq!(
        bump["repositories"],
        serde_json::json!([
            "file:///srv/a.git",
            "file:///srv/b.git",
            "file:///srv/c.git"
        ]),
        "{bump}"
    );
    assert_eq!(bump["task"], "Bump lib to 2.1.0");
    let (status, stale) = post(
        &hooks("releases"),
        &standard("msg_2", now_s - 3_600, release),
        release,
    );
    assert_eq!(status, 400, "{stale}");
    assert!(
        stale["error"]
            .as_str()
            .unwrap()
            .contains("webhook-timestamp"),
        "{stale}"
    );

    // API events: `flotilla event send` and `POST /events`, keyed by their delivery id.
    let sent = cli(
        &address,
        &[
            "event",
            "send",
            "--type",
            "deploy",
            "--id",
            "deploy-7",
            "--repository",
            "shop",
        ],
    );
    assert_eq!(sent["source"], "api");
    let api_fleet = sent["fleet_ids"][0].as_str().unwrap().to_owned();
    assert_eq!(
        fleet(&address, &api_fleet).await["repositories"],
        serde_json::json!(["file:///srv/shop.git"])
    );
    let resent = cli(
        &address,
        &[
            "event",
            "send",
            "--type",
            "deploy",
            "--id",
            "deploy-7",
            "--repository",
            "shop",
        ],
    );
    assert_eq!(
        (resent["duplicate"].clone(), resent["fleet_ids"][0].clone()),
        (serde_json::json!(true), serde_json::json!(api_fleet))
    );
    let bearer = vec![("authorization", format!("Bearer {}", common::ADMIN_TOKEN))];
    let event = br#"{"delivery_id":"deploy-8","event_type":"deploy","repository":"cart","payload":{"by":"ci"}}"#;
    let (status, posted) = post(&format!("http://{http}/events"), &bearer, event);
    assert_eq!(status, 200, "{posted}");
    assert_eq!(posted["fleet_ids"].as_array().unwrap().len(), 1);
    let (status, _) = post(&format!("http://{http}/events"), &[], event);
    assert_eq!(status, 401);
    let (status, bad) = post(
        &format!("http://{http}/events"),
        &bearer,
        br#"{"delivery_id":"","event_type":"x"}"#,
    );
    assert_eq!(status, 400, "{bad}");
    assert!(
        bad["error"].as_str().unwrap().contains("delivery_id"),
        "{bad}"
    );

    // Every delivery is recorded: accepted ones replicated, refused ones on this node.
    let listed = cli(&address, &["event", "deliveries", "--count", "1000"]);
    let deliveries = listed["deliveries"].as_array().unwrap();
    let accepted: Vec<&serde_json::Value> = deliveries
        .iter()
        .filter(|d| d["refused"] == false)
        .collect();
    let refused: Vec<&serde_json::Value> =
        deliveries.iter().filter(|d| d["refused"] == true).collect();
    assert_eq!(accepted.len(), 6, "{listed}");
    let redelivered = accepted
        .iter()
        .find(|d| d["delivery_id"] == "gh-1")
        .unwrap();
    assert_eq!(redelivered["receipts"], 2);
    let gitlab_record = accepted
        .iter()
        .find(|d| d["delivery_id"] == "gl-1")
        .unwrap();
    assert_eq!(gitlab_record["receipts"], 2);
    assert!(
        gitlab_record["verdict"]
            .as_str()
            .unwrap()
            .starts_with("gitlab: x-gitlab-token valid")
    );
    let mut statuses: Vec<u64> = refused
        .iter()
        .map(|d| d["http_status"].as_u64().unwrap())
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        vec![400, 400, 400, 401, 401, 401, 401, 413],
        "{listed}"
    );
    // The fleets: 2 reviews, 1 merge request, 1 fan-out, 2 API events; no duplicate.
    let fleets = cli(&address, &["fleet", "list"]);
    assert_eq!(fleets["fleets"].as_array().unwrap().len(), 6, "{fleets}");
}

fn health(http: &str) -> serde_json::Value {
    let output = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "2", &format!("http://{http}/healthz")])
        .output()
        .expect("curl");
    serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null)
}

/// The index of the node whose `/healthz` says Leader, waiting up to 30 s.
async fn leader_of(https: &[String], alive: &[bool]) -> usize {
    for _ in 0..300 {
        for (index, http) in https.iter().enumerate() {
            if alive[index] && health(http)["state"] == "Leader" {
                return index;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no leader");
}

/// Three nodes: a delivery to a follower is decided by the leader (the follower passes the
/// raw request on; the leader verifies it again), and after `kill -9` of the leader the
/// redelivery to a survivor answers the same fleet: nothing lost, nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_forwards_deliveries_and_dedup_survives_failover() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let config = format!(
        "[worker]\nenabled = false\n\n[[webhooks.sources]]\nname = \"github\"\nkind = \"github\"\nsecret_files = [{:?}]\n",
        secret_file(dir, "github", "cluster-secret")
    );
    let config_path = dir.join("node.toml");
    common::write_config(&config_path, &config);
    let ports: Vec<u16> = (0..3).map(|_| common::free_port()).collect();
    let https: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", common::free_port()))
        .collect();
    let members: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(index, port)| format!("{}=127.0.0.1:{port}", index + 1))
        .collect();
    let members = members.join(",");
    let mut nodes = Vec::new();
    for index in 0..3 {
        let node_id = (index + 1).to_string();
        nodes.push(
            Node::start_listening_on(
                &dir.join(format!("node-{node_id}")),
                ports[index],
                &[
                    "--node-id",
                    &node_id,
                    "--initial-members",
                    &members,
                    "--config",
                    config_path.to_str().unwrap(),
                    "--http-listen-address",
                    &https[index],
                ],
            )
            .await,
        );
    }
    for node in &nodes {
        node.wait_ready().await;
    }
    let mut alive = vec![true; 3];
    let leader = leader_of(&https, &alive).await;
    let follower = (leader + 1) % 3;
    let rule = dir.join("rule.yaml");
    std::fs::write(
        &rule,
        "name: on-push\nsource: github\nrepositories: '\"file:///srv/\" + event.payload.repo + \".git\"'\nfleet: { name: pushed, agent: { command: 'true' } }\n",
    )
    .unwrap();
    // The CLI may reach the cluster through a follower too.
    let created = cli(
        &nodes[follower].address,
        &["event", "rule", "create", rule.to_str().unwrap()],
    );
    assert_eq!(created["created"], true, "{created}");
    let body = br#"{"repo":"api"}"#;
    let headers = vec![
        ("x-github-delivery", "push-1".to_owned()),
        ("x-github-event", "push".to_owned()),
        (
            "x-hub-signature-256",
            format!("sha256={}", hex(&hmac(b"cluster-secret", &[body]))),
        ),
    ];
    let url = |index: usize| format!("http://{}/hooks/github", https[index]);
    let (status, first) = post(&url(follower), &headers, body);
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["duplicate"], false);
    let fleet_ids = first["fleet_ids"].clone();
    assert_eq!(fleet_ids.as_array().unwrap().len(), 1, "{first}");
    // A forged request through the follower is refused before anything is forwarded.
    let mut forged = headers.clone();
    forged[2].1 = format!("sha256={}", hex(&hmac(b"guess", &[body])));
    assert_eq!(post(&url(follower), &forged, body).0, 401);

    // kill -9 the leader; the redelivery to a survivor answers the same fleet.
    nodes[leader].kill();
    alive[leader] = false;
    let new_leader = leader_of(&https, &alive).await;
    assert_ne!(new_leader, leader);
    let survivor = (0..3)
        .find(|index| alive[*index] && *index != new_leader)
        .unwrap();
    let mut answered = None;
    for _ in 0..50 {
        let (status, again) = post(&url(survivor), &headers, body);
        if status == 200 {
            answered = Some(again);
            break;
        }
        // 503 while the new leader settles: the sender retries, as GitHub's redeliver would.
        assert_eq!(status, 503, "{again}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let again = answered.expect("a survivor answered 200");
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["fleet_ids"], fleet_ids);
    let fleets = cli(&nodes[new_leader].address, &["fleet", "list"]);
    assert_eq!(fleets["fleets"].as_array().unwrap().len(), 1, "{fleets}");
}
