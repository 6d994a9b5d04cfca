//! The `flotilla` command line against a real server process: spec files, exit codes, JSON
//! output, address failover and the leader hint, a closed stdout, gRPC reflection (also from a
//! Python client that has no .proto file).

mod common;

use std::process::Command;

use common::{Node, origin_repository, wait_finished};
use flotilla_proto::v1;

fn flotilla(address: &str, arguments: &[&str]) -> (i32, String, String) {
    common::flotilla_cli(address, arguments)
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
async fn a_large_fleet_is_shown_by_its_first_page_and_listed_page_by_page() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let repositories: Vec<String> = (0..1_200)
        .map(|index| format!("file:///srv/big/r-{index:05}.git"))
        .collect();
    let spec = root.path().join("big.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: big\ntargets:\n  repositories: [{}]\nagent: {{command: \"true\"}}\n",
            repositories.join(", ")
        ),
    )
    .unwrap();
    let (code, stdout, stderr) =
        flotilla(&node.address, &["fleet", "submit", spec.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let fleet_id = stdout.trim().to_owned();

    let (code, stdout, _) = flotilla(
        &node.address,
        &["--output", "json", "fleet", "status", &fleet_id],
    );
    assert_eq!(code, 0);
    let fleet: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(fleet["counts"]["total"], 1_200);
    assert_eq!(fleet["runs"].as_array().unwrap().len(), 1_000);
    assert_eq!(fleet["runs_next_page_token"], format!("{fleet_id}-999"));
    let (code, stdout, _) = flotilla(&node.address, &["fleet", "status", &fleet_id]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains(&format!(
            "(the first 1000 of 1200 runs; `flotilla run list {fleet_id}` lists them all)"
        )),
        "{stdout}"
    );

    let (code, stdout, _) = flotilla(
        &node.address,
        &["--output", "json", "run", "list", &fleet_id],
    );
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let runs = listed["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1_200);
    assert_eq!(runs[1_199]["repository"], repositories[1_199]);
    assert!(runs.iter().all(|run| run["state"] == "pending"));

    let (code, stdout, _) = flotilla(
        &node.address,
        &["run", "list", &fleet_id, "--repository", "r-00119.git"],
    );
    assert_eq!(code, 0);
    assert!(
        stdout.contains("r-00119") && stdout.ends_with("1 runs\n"),
        "{stdout}"
    );
    let (code, stdout, _) = flotilla(
        &node.address,
        &[
            "run", "list", &fleet_id, "--state", "failed", "--state", "changed",
        ],
    );
    assert_eq!(code, 0);
    assert!(stdout.ends_with("0 runs\n"), "{stdout}");
    let (code, stdout, _) = flotilla(
        &node.address,
        &[
            "run", "list", &fleet_id, "--state", "pending", "--limit", "5",
        ],
    );
    assert_eq!(code, 0);
    assert!(stdout.ends_with("5 runs\n"), "{stdout}");
    let (code, _, stderr) = flotilla(
        &node.address,
        &["run", "list", &fleet_id, "--state", "done"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--state \"done\""), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_one_clear_line_and_its_exit_code() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let spec = root.path().join("fleet.yaml");
    std::fs::write(&spec, "name: x\ntargets: {repositories: [file:///srv/a.git]}\nagent: {command: true}\nmax_paralelism: 3\n").unwrap();
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
    let channel = common::channel(&node.address).await;
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
        "name: x\ntargets: {repositories: [file:///srv/a.git]}\nagent: {command: true}\n",
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

/// A spec file with a dummy repository (the fleet is created; no worker needs to run it).
fn dummy_spec(root: &std::path::Path) -> String {
    let spec = root.join("fleet.yaml");
    std::fs::write(
        &spec,
        "name: x\ntargets: {repositories: [file:///srv/a.git]}\nagent: {command: true}\n",
    )
    .unwrap();
    spec.to_str().unwrap().to_string()
}

async fn fleet_names(node: &Node) -> Vec<String> {
    node.client()
        .await
        .list_fleets(v1::ListFleetsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .fleets
        .into_iter()
        .map(|f| f.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_address_is_tried_when_a_node_has_no_leader_or_is_unreachable() {
    let root = tempfile::tempdir().unwrap();
    // A node started with --join and never added has no leader: it answers UNAVAILABLE.
    let leaderless =
        Node::start_listening(&root.path().join("leaderless"), &["--join", "--no-worker"]).await;
    let healthy = Node::start(&root.path().join("healthy"), &["--no-worker"]).await;
    let spec = dummy_spec(root.path());
    let addresses = format!("{},{}", leaderless.address, healthy.address);

    let (code, stdout, stderr) = flotilla(&addresses, &["fleet", "submit", &spec]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "fl-1", "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: no leader is known yet; retry shortly; trying {}",
            leaderless.address, healthy.address
        )),
        "{stderr}"
    );
    assert_eq!(fleet_names(&healthy).await, ["x"]);

    // Reads too: the leaderless node fails its linearizable read, the healthy one answers.
    let (code, stdout, stderr) =
        flotilla(&addresses, &["--output", "json", "fleet", "status", "fl-1"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let fleet: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(fleet["name"], "x");

    // A node that cannot be reached at all is passed over the same way.
    let (code, stdout, stderr) = flotilla(
        &format!("http://127.0.0.1:1,{}", healthy.address),
        &["fleet", "submit", &spec, "--idempotency-key", "second"],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(stdout.trim(), "fl-2", "{stderr}");
    assert!(
        stderr.contains("http://127.0.0.1:1: cannot connect")
            && stderr.contains(&format!("trying {}", healthy.address)),
        "{stderr}"
    );
    assert_eq!(fleet_names(&healthy).await.len(), 2);

    // Every node unavailable: exit 5 after the rounds, the last failure named.
    let (code, _, stderr) = flotilla(
        &format!("{},http://127.0.0.1:1", leaderless.address),
        &["fleet", "list"],
    );
    assert_eq!(code, 5, "{stderr}");
    assert!(
        stderr.contains("no node could serve the request (5 rounds"),
        "{stderr}"
    );
}

/// A `FleetService` that answers every call UNAVAILABLE, with the leader hint pointing at
/// `leader` (`host:port`), and counts the calls.
struct PointsToTheLeader {
    leader: String,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl PointsToTheLeader {
    fn answer<T>(&self) -> Result<tonic::Response<T>, tonic::Status> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(flotilla::leader_hint::with_leader_address(
            tonic::Status::unavailable("not the leader (test stub)"),
            &self.leader,
        ))
    }
}

#[tonic::async_trait]
impl v1::fleet_service_server::FleetService for PointsToTheLeader {
    async fn submit_fleet(
        &self,
        _: tonic::Request<v1::SubmitFleetRequest>,
    ) -> Result<tonic::Response<v1::SubmitFleetResponse>, tonic::Status> {
        self.answer()
    }
    async fn get_fleet(
        &self,
        _: tonic::Request<v1::GetFleetRequest>,
    ) -> Result<tonic::Response<v1::Fleet>, tonic::Status> {
        self.answer()
    }
    async fn list_fleets(
        &self,
        _: tonic::Request<v1::ListFleetsRequest>,
    ) -> Result<tonic::Response<v1::ListFleetsResponse>, tonic::Status> {
        self.answer()
    }
    type WatchFleetStream = tokio_stream::Empty<Result<v1::FleetEvent, tonic::Status>>;
    async fn watch_fleet(
        &self,
        _: tonic::Request<v1::WatchFleetRequest>,
    ) -> Result<tonic::Response<Self::WatchFleetStream>, tonic::Status> {
        self.answer()
    }
    async fn get_run(
        &self,
        _: tonic::Request<v1::GetRunRequest>,
    ) -> Result<tonic::Response<v1::Run>, tonic::Status> {
        self.answer()
    }
    async fn list_runs(
        &self,
        _: tonic::Request<v1::ListRunsRequest>,
    ) -> Result<tonic::Response<v1::ListRunsResponse>, tonic::Status> {
        self.answer()
    }
    async fn cancel_fleet(
        &self,
        _: tonic::Request<v1::CancelFleetRequest>,
    ) -> Result<tonic::Response<v1::Fleet>, tonic::Status> {
        self.answer()
    }

    async fn pause_fleet(
        &self,
        _: tonic::Request<v1::FleetFlowRequest>,
    ) -> Result<tonic::Response<v1::FleetFlowResponse>, tonic::Status> {
        self.answer()
    }

    async fn resume_fleet(
        &self,
        _: tonic::Request<v1::FleetFlowRequest>,
    ) -> Result<tonic::Response<v1::FleetFlowResponse>, tonic::Status> {
        self.answer()
    }

    async fn approve_fleet(
        &self,
        _: tonic::Request<v1::FleetFlowRequest>,
    ) -> Result<tonic::Response<v1::FleetFlowResponse>, tonic::Status> {
        self.answer()
    }

    async fn rerun_fleet(
        &self,
        _: tonic::Request<v1::RerunFleetRequest>,
    ) -> Result<tonic::Response<v1::SubmitFleetResponse>, tonic::Status> {
        self.answer()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_follows_the_leader_hint_of_an_unavailable_answer() {
    let root = tempfile::tempdir().unwrap();
    let leader = Node::start(&root.path().join("leader"), &["--no-worker"]).await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stub = PointsToTheLeader {
        leader: leader.host_port(),
        calls: calls.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stub_address = format!("https://{}", listener.local_addr().unwrap());
    // The stub serves TLS with a node certificate of the test CA, as a node would.
    let (certificate, key) = common::node_certificate(9);
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(
                    std::fs::read(certificate).unwrap(),
                    std::fs::read(key).unwrap(),
                ),
            ))
            .unwrap()
            .add_service(v1::fleet_service_server::FleetServiceServer::new(stub))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let spec = dummy_spec(root.path());
    // Only the stub is given: the leader is reached through the hint alone.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .env("FLOTILLA_TOKEN", common::ADMIN_TOKEN)
        .args(["--address", &stub_address, "fleet", "submit", &spec])
        .env("FLOTILLA_CA_FILE", common::ca_file())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "fl-1");
    assert!(
        stderr.contains(&format!(
            "{stub_address}: not the leader (test stub); trying {}",
            leader.address
        )),
        "{stderr}"
    );
    // Straight to the leader after the first answer, no second try of the stub.
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(fleet_names(&leader).await, ["x"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_the_cli_quietly_with_status_141() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let spec = dummy_spec(root.path());
    for arguments in [
        vec!["fleet", "list"],
        vec!["fleet", "submit", spec.as_str()],
        vec!["--output", "json", "fleet", "status", "fl-1"],
    ] {
        // The reading end is closed before the CLI starts, as when `head` has already exited:
        // the CLI's first write to stdout fails with EPIPE.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let output = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .env("FLOTILLA_TOKEN", common::ADMIN_TOKEN)
            .args(["--address", &node.address])
            .env("FLOTILLA_CA_FILE", common::ca_file())
            .args(&arguments)
            .stdout(writer)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(141), "{arguments:?}: {stderr}");
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{arguments:?}: {stderr}"
        );
    }
    // The submission itself went through before its output was lost.
    assert_eq!(fleet_names(&node).await, ["x"]);

    // The same through a shell pipeline: `head -c1` exits after one byte while the CLI
    // still writes: the status of a 3000-run fleet is about 200 KiB, more than a pipe holds.
    let repositories: Vec<String> = (0..3000)
        .map(|i| format!("file:///srv/repository-number-{i}.git"))
        .collect();
    let big = root.path().join("big.yaml");
    std::fs::write(
        &big,
        format!(
            "name: big\ntargets: {{repositories: [{}]}}\nagent: {{command: true}}\n",
            repositories.join(", ")
        ),
    )
    .unwrap();
    let (code, stdout, stderr) =
        flotilla(&node.address, &["fleet", "submit", big.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let fleet_id = stdout.trim().to_string();
    let output = Command::new("bash")
        .env("FLOTILLA_TOKEN", common::ADMIN_TOKEN)
        .args([
            "-c",
            "set -o pipefail; \"$0\" --address \"$1\" fleet status \"$2\" | head -c1 >/dev/null",
            env!("CARGO_BIN_EXE_flotilla"),
            &node.address,
            &fleet_id,
        ])
        .env("FLOTILLA_CA_FILE", common::ca_file())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(141), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
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
        .env("FLOTILLA_TOKEN", common::ADMIN_TOKEN)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/reflection_client.py"
        ))
        .arg(node.host_port())
        .arg(request.to_string())
        .arg(common::ca_file())
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
