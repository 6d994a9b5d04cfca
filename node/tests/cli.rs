//! The `flotilla` command line against a real server process: spec files, exit codes, JSON
//! output, gRPC reflection (also from a Python client that has no .proto file).

mod common;

use std::process::Command;

use common::{Node, origin_repository, wait_finished};
use flotilla_proto::v1;

fn flotilla(address: &str, arguments: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["--address", address])
        .args(arguments)
        .output()
        .expect("run flotilla");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_watch_and_inspect_through_the_cli() {
    let root = tempfile::tempdir().unwrap();
    let repository = origin_repository(root.path(), "repo", &[("a.txt", "one\n")]);
    let node = Node::start(&root.path().join("node"), &[]).await;
    let spec = root.path().join("fleet.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: append\ntargets:\n  repositories: [{repository}]\nagent:\n  command: echo two >> a.txt\nverify: [\"grep -q two a.txt\"]\nsandbox: {{timeout_ms: 20000}}\n"
        ),
    )
    .unwrap();
    let spec = spec.to_str().unwrap();
    let (code, stdout, stderr) = flotilla(
        &node.address,
        &["--output", "json", "fleet", "submit", spec, "--watch"],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}\n{}", node.log_text());
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = events.last().unwrap();
    assert_eq!(last["fleet_state"], "finished");
    assert_eq!(last["counts"]["changed"], 1);

    let (code, stdout, _) = flotilla(
        &node.address,
        &["--output", "json", "fleet", "status", "fl-1"],
    );
    assert_eq!(code, 0);
    let fleet: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(fleet["runs"][0]["state"], "changed");
    assert_eq!(fleet["runs"][0]["branch"], "flotilla/append");
    assert_eq!(fleet["runs"][0]["insertions"], 1);

    let (code, stdout, _) = flotilla(&node.address, &["run", "show", "fl-1-0", "--patch"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("+two"), "{stdout}");

    let (code, stdout, _) = flotilla(&node.address, &["fleet", "list"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("fl-1") && stdout.contains("append"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_one_clear_line_and_its_exit_code() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let spec = root.path().join("fleet.yaml");
    std::fs::write(&spec, "name: x\ntargets: {repositories: [file:///a.git]}\nagent: {command: true}\nmax_paralelism: 3\n").unwrap();
    let (code, _, stderr) = flotilla(&node.address, &["fleet", "submit", spec.to_str().unwrap()]);
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("max_paralelism") && stderr.contains("unknown field"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    std::fs::write(
        &spec,
        "name: x\ntargets: {repositories: [relative/path]}\nagent: {command: true}\n",
    )
    .unwrap();
    let (code, _, stderr) = flotilla(&node.address, &["fleet", "submit", spec.to_str().unwrap()]);
    assert_eq!(code, 4, "{stderr}");
    assert!(stderr.contains("spec.repositories[0]"), "{stderr}");

    let (code, _, stderr) = flotilla(&node.address, &["fleet", "status", "fl-42"]);
    assert_eq!(code, 3, "{stderr}");
    let (code, _, stderr) = flotilla("http://127.0.0.1:1", &["fleet", "list"]);
    assert_eq!(code, 5, "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let channel = tonic::transport::Channel::from_shared(node.address.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("{response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"flotilla.v1.FleetService".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"flotilla.v1.WorkerService".to_string()),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_retries_with_one_idempotency_key_while_there_is_no_leader() {
    let root = tempfile::tempdir().unwrap();
    // A node started with --join and never added has no leader: writes are UNAVAILABLE.
    let node = Node::start_listening(&root.path().join("node"), &["--join", "--no-worker"]).await;
    let spec = root.path().join("fleet.yaml");
    std::fs::write(
        &spec,
        "name: x\ntargets: {repositories: [file:///a.git]}\nagent: {command: true}\n",
    )
    .unwrap();
    let (code, _, stderr) = flotilla(&node.address, &["fleet", "submit", spec.to_str().unwrap()]);
    assert_eq!(code, 5, "{stderr}");
    assert_eq!(
        stderr
            .matches("retrying with the same idempotency key")
            .count(),
        4,
        "{stderr}"
    );
    assert!(stderr.contains("no leader is known yet"), "{stderr}");
}

/// The virtual environment with the reflection test's Python packages, made by deploy/test.sh
/// (deploy/env.sh, `flotilla_install_python_test_packages`).
fn test_python() -> std::path::PathBuf {
    let venv = std::env::var_os("FLOTILLA_TEST_PYTHON_VENV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME"))
                .join(".cache/flotilla/python-venv")
        });
    let python = venv.join("bin/python3");
    assert!(
        python.exists(),
        "{} is missing: the Python reflection test needs grpcio, grpcio-reflection and protobuf \
         (node/tests/python/requirements.txt); run deploy/test.sh, or \
         `. deploy/env.sh && flotilla_install_python_test_packages`",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_submits_a_fleet_through_reflection_alone() {
    let python = test_python();
    let root = tempfile::tempdir().unwrap();
    let repository = origin_repository(root.path(), "repo", &[("a.txt", "one\n")]);
    let node = Node::start(&root.path().join("node"), &[]).await;
    // Protobuf's JSON mapping of a SubmitFleetRequest; the client turns it into the message
    // type it found through reflection.
    let request = serde_json::json!({
        "spec": {
            "name": "from-python",
            "repositories": [repository],
            "agent": {"command": "echo two >> a.txt", "task": "append"},
            "verify": ["grep -q two a.txt"],
            "sandbox": {"driver": "bwrap", "timeoutMs": "20000"},
            "branchTemplate": "flotilla/{fleet}",
            "commitMessage": "append",
            "maxParallelism": 1,
            "maxAttempts": 2,
            "push": true,
        },
        "idempotencyKey": "python-client",
    });
    let output = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/reflection_client.py"
        ))
        .arg(node.address.trim_start_matches("http://"))
        .arg(request.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let result: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let services: Vec<&str> = result["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for service in [
        "flotilla.v1.FleetService",
        "flotilla.v1.WorkerService",
        "flotilla.v1.ClusterService",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&service), "{service} not in {services:?}");
    }
    assert_eq!(result["request_type"], "flotilla.v1.SubmitFleetRequest");
    assert_eq!(result["response"]["created"], true, "{result}");
    let fleet_id = result["response"]["fleet"]["id"].as_str().unwrap();

    // The fleet exists for the Rust client, with the spec the Python client built, and runs.
    let mut client = node.client().await;
    let fleet = wait_finished(&mut client, fleet_id, &node).await;
    assert_eq!(fleet.name, "from-python");
    assert_eq!(fleet.idempotency_key, "python-client");
    assert_eq!(fleet.runs.len(), 1);
    assert_eq!(fleet.runs[0].repository, repository);
    assert_eq!(
        fleet.runs[0].state,
        v1::RunState::Changed as i32,
        "{fleet:?}"
    );
}
