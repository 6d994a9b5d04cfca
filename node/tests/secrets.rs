//! Secrets end to end on a real node (real Raft log on RocksDB, real worker, real bwrap, real
//! git): `flotilla secret keygen|set|list|delete|rotate`, injection by name, redaction of the
//! log tail, refusal of a change that holds the value, and the value never on disk in the
//! node's data directory.

mod common;
#[path = "../../worker/tests/common/files.rs"]
mod files;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine as _;
use common::{Node, origin_repository, spec, wait_finished};
use flotilla_proto::v1;
use flotilla_proto::v1::secret_service_client::SecretServiceClient;

const VALUE: &str = "sk-live-7d1e0c2b9a8f4e3d";

fn flotilla(address: &str, arguments: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["--address", address])
        .args(arguments)
        .env("FLOTILLA_CA_FILE", common::ca_file())
        .env("FLOTILLA_TOKEN", common::ADMIN_TOKEN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn write_config(root: &Path, key_file: &Path, previous: &[&Path]) -> PathBuf {
    let path = root.join("node.toml");
    let previous: Vec<String> = previous
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    common::write_config(
        &path,
        &format!(
            "[secrets]\nkey_file = {:?}\nprevious_key_files = [{}]\nmax_secrets_per_project = 3\n",
            key_file.display().to_string(),
            previous.join(", ")
        ),
    );
    path
}

async fn run_with_secret(
    node: &Node,
    repository: String,
    name: &str,
    agent: &str,
) -> (v1::Fleet, v1::Run) {
    let mut client = node.client().await;
    let mut fleet_spec = spec(name, vec![repository], agent, &[]);
    fleet_spec
        .agent
        .as_mut()
        .unwrap()
        .secrets
        .insert("API_TOKEN".into(), "api-token".into());
    let fleet = client
        .submit_fleet(v1::SubmitFleetRequest {
            dry_run: false,
            spec: Some(fleet_spec),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .fleet
        .unwrap();
    let fleet = wait_finished(&mut client, &fleet.id, node).await;
    let run = client
        .get_run(v1::GetRunRequest {
            run_id: fleet.runs[0].id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    (fleet, run)
}

#[tokio::test]
async fn secrets_are_injected_by_name_redacted_and_never_stored_in_plaintext() {
    let root = tempfile::tempdir().unwrap();
    let key = root.path().join("first.key");
    let (code, stdout, stderr) = flotilla(
        "http://127.0.0.1:1",
        &["secret", "keygen", "--output-file", key.to_str().unwrap()],
        None,
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let first_key_id = stdout.split_whitespace().nth(1).unwrap().to_owned();
    let config = write_config(root.path(), &key, &[]);
    let data = root.path().join("data");
    let mut node = Node::start(&data, &["--config", config.to_str().unwrap()]).await;
    let address = node.address.clone();

    // set (value on stdin), list (no value), limits, validation.
    let (code, stdout, stderr) = flotilla(
        &address,
        &["secret", "set", "api-token"],
        Some(&format!("{VALUE}\n")),
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let (code, stdout, _) = flotilla(&address, &["--output", "json", "secret", "list"], None);
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let secret = &listed["secrets"][0];
    assert_eq!(secret["name"], "api-token");
    assert_eq!(secret["version"], 1);
    assert_eq!(secret["value_size_bytes"], VALUE.len());
    assert_eq!(secret["key_id"], first_key_id.as_str());
    assert!(!stdout.contains(VALUE));
    let mut secrets = SecretServiceClient::new(common::with_token(
        common::channel(&address).await,
        common::ADMIN_TOKEN,
    ));
    let info = secrets
        .set_secret(v1::SetSecretRequest {
            project: String::new(),
            name: "api-token".into(),
            value: VALUE.as_bytes().to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.version, 2);
    let short = secrets
        .set_secret(v1::SetSecretRequest {
            project: String::new(),
            name: "short".into(),
            value: b"abc".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(short.code(), tonic::Code::InvalidArgument);
    assert!(
        short.message().starts_with("value: "),
        "{}",
        short.message()
    );
    for name in ["b", "c"] {
        secrets
            .set_secret(v1::SetSecretRequest {
                project: String::new(),
                name: name.into(),
                value: b"another-value".to_vec(),
            })
            .await
            .unwrap();
    }
    let full = secrets
        .set_secret(v1::SetSecretRequest {
            project: String::new(),
            name: "d".into(),
            value: b"another-value".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(full.code(), tonic::Code::ResourceExhausted, "{full:?}");
    let (code, _, _) = flotilla(&address, &["secret", "delete", "c"], None);
    assert_eq!(code, 0);

    // A fleet naming a missing secret is refused, naming the field.
    let mut client = node.client().await;
    let mut missing = spec(
        "missing",
        vec![origin_repository(root.path(), "m", &[("a", "a\n")])],
        "true",
        &[],
    );
    missing
        .agent
        .as_mut()
        .unwrap()
        .secrets
        .insert("API_TOKEN".into(), "nope".into());
    let refused = client
        .submit_fleet(v1::SubmitFleetRequest {
            dry_run: false,
            spec: Some(missing),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .starts_with("spec.agent.secrets.API_TOKEN: no secret \"nope\""),
        "{}",
        refused.message()
    );

    // The agent sees the value; everything reported has it redacted.
    let encoded = base64::engine::general_purpose::STANDARD.encode(VALUE);
    let agent = "echo \"plain $API_TOKEN\"; printf %s \"$API_TOKEN\" | base64; \
                 printf 'Authorization: Basic %s\\n' \"$(printf 'bot:%s' \"$API_TOKEN\" | base64)\"; \
                 echo changed > out.txt";
    let (fleet, run) = run_with_secret(
        &node,
        origin_repository(root.path(), "one", &[("a", "a\n")]),
        "inject",
        agent,
    )
    .await;
    assert_eq!(
        run.state,
        v1::RunState::Changed as i32,
        "{run:?}\n{}",
        node.log_text()
    );
    let tail = &run.attempts[0].log_tail;
    assert!(tail.contains("plain [redacted:api-token]"), "{tail}");
    assert!(tail.matches("[redacted:api-token]").count() >= 3, "{tail}");
    assert!(!tail.contains(VALUE) && !tail.contains(&encoded), "{tail}");
    let shown = format!("{fleet:?}");
    assert!(shown.contains("api-token") && !shown.contains(VALUE));

    // A change that holds the value is refused: nothing pushed, no patch.
    let leaking = origin_repository(root.path(), "two", &[("a", "a\n")]);
    let (_, run) = run_with_secret(
        &node,
        leaking.clone(),
        "leak",
        "printf 'key=%s\\n' \"$API_TOKEN\" > config.txt",
    )
    .await;
    assert_eq!(run.state, v1::RunState::Failed as i32, "{run:?}");
    let error = &run.attempts[0].error;
    assert!(
        error.contains("contains the value of secret api-token"),
        "{error}"
    );
    assert!(run.patch.is_empty() && !run.pushed);
    let bare = leaking.trim_start_matches("file://");
    let branches = common::git(Path::new(bare), &["--git-dir", bare, "branch", "--list"]);
    assert!(
        branches.trim().lines().all(|b| !b.contains("flotilla/")),
        "{branches}"
    );

    // Rotation: a new current key, the old one for decryption, then only the new one.
    let second = root.path().join("second.key");
    let (code, stdout, _) = flotilla(
        "http://127.0.0.1:1",
        &[
            "secret",
            "keygen",
            "--output-file",
            second.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0);
    let second_key_id = stdout.split_whitespace().nth(1).unwrap().to_owned();
    node.kill();
    let config = write_config(root.path(), &second, &[&key]);
    node = Node::start_on(&data, node.port(), &["--config", config.to_str().unwrap()]).await;
    let (code, stdout, stderr) = flotilla(
        &node.address,
        &["--output", "json", "secret", "rotate"],
        None,
    );
    assert_eq!(code, 0, "{stdout}{stderr}");
    let rotated: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rotated["rewrapped"], 2, "{rotated}");
    assert_eq!(rotated["current_key_id"], second_key_id.as_str());
    node.kill();
    let config = write_config(root.path(), &second, &[]);
    node = Node::start_on(&data, node.port(), &["--config", config.to_str().unwrap()]).await;
    let (code, stdout, _) = flotilla(&node.address, &["--output", "json", "secret", "list"], None);
    assert_eq!(code, 0);
    assert!(!stdout.contains(&first_key_id), "{stdout}");
    let (_, run) = run_with_secret(
        &node,
        origin_repository(root.path(), "three", &[("a", "a\n")]),
        "after-rotation",
        "echo \"plain $API_TOKEN\"; echo x > out.txt",
    )
    .await;
    assert_eq!(
        run.state,
        v1::RunState::Changed as i32,
        "{run:?}\n{}",
        node.log_text()
    );
    assert!(
        run.attempts[0]
            .log_tail
            .contains("plain [redacted:api-token]")
    );

    // The value is nowhere in the node's files: Raft log, snapshots, state, attempt logs.
    node.kill();
    let leaked = files::files_containing(&data, VALUE.as_bytes());
    assert!(leaked.is_empty(), "plaintext value in {leaked:?}");
}
