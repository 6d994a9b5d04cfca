//! Transport security over real rustls handshakes on loopback against real `flotilla server`
//! processes: who may call RaftService, worker certificates bound to their worker id, and the
//! refusal to start without TLS or an explicit `--insecure`.

mod common;

use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Node, ca_file, flotilla_cert, tls_channel, worker_certificate};
use flotilla_proto::raft::RaftMessage;
use flotilla_proto::raft::raft_service_client::RaftServiceClient;
use flotilla_proto::v1;
use flotilla_proto::v1::worker_service_client::WorkerServiceClient;

/// A pre-vote (changes nothing on the receiver) naming cluster `cluster_id`.
fn pre_vote(cluster_id: &str) -> tonic::Request<RaftMessage> {
    let request = flotilla_raft::PreVoteRequest {
        candidate_id: 7,
        term: 1,
        last_log_id: None,
    };
    let mut request = tonic::Request::new(RaftMessage {
        data: flotilla_raft::codec::encode(&request).unwrap(),
    });
    request.metadata_mut().insert(
        flotilla_raft::CLUSTER_ID_METADATA,
        cluster_id.parse().unwrap(),
    );
    request
}

/// Pre-votes at `node` over TLS presenting `identity`.
async fn raft_pre_vote(
    node: &Node,
    identity: Option<(PathBuf, PathBuf)>,
    cluster_id: &str,
) -> Result<RaftMessage, tonic::Status> {
    let channel = tls_channel(&node.address, identity)
        .await
        .map_err(|error| tonic::Status::unavailable(format!("connect: {error}")))?;
    RaftServiceClient::new(channel)
        .pre_vote(pre_vote(cluster_id))
        .await
        .map(tonic::Response::into_inner)
}

/// `flotilla cert node` for `node_id` of `cluster_id`, signed by the CA in `ca_directory`,
/// written to `directory`.
fn node_certificate_in(
    ca_directory: &Path,
    directory: &Path,
    node_id: u64,
    cluster_id: &str,
) -> (PathBuf, PathBuf) {
    let id = node_id.to_string();
    flotilla_cert(&[
        "node",
        "--node-id",
        &id,
        "--cluster-id",
        cluster_id,
        "--host",
        "127.0.0.1",
        "--ca-file",
        ca_directory.join("ca.pem").to_str().unwrap(),
        "--ca-key-file",
        ca_directory.join("ca-key.pem").to_str().unwrap(),
        "--directory",
        directory.to_str().unwrap(),
    ]);
    (
        directory.join(format!("node-{node_id}.pem")),
        directory.join(format!("node-{node_id}-key.pem")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_service_takes_only_node_certificates_of_its_cluster() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;

    // No client certificate: the handshake succeeds (people use tokens), Raft does not.
    let status = raft_pre_vote(&node, None, "flotilla").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(
        status.message().contains("node certificate")
            && status.message().contains("no client certificate"),
        "{status}"
    );

    // A worker certificate of the same CA: refused, naming what it is.
    let status = raft_pre_vote(&node, Some(worker_certificate("w1")), "flotilla")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(
        status.message().contains("worker certificate")
            && status.message().contains("spiffe://flotilla/worker/w1"),
        "{status}"
    );

    // A node certificate of the same CA but another trust domain, claiming this cluster's id.
    let other_cluster = root.path().join("other-cluster");
    std::fs::create_dir_all(&other_cluster).unwrap();
    let foreign_node = node_certificate_in(common::pki_directory(), &other_cluster, 5, "other");
    let status = raft_pre_vote(&node, Some(foreign_node.clone()), "flotilla")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(
        status.message().contains("spiffe://other/node/5")
            && status.message().contains("another cluster"),
        "{status}"
    );
    // The same node naming its own cluster: refused on the cluster id, naming both.
    let status = raft_pre_vote(&node, Some(foreign_node), "other")
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
    assert!(
        status.message().contains("\"other\"") && status.message().contains("\"flotilla\""),
        "{status}"
    );

    // A node certificate from another CA fails the handshake: no gRPC answer at all.
    let other_ca = root.path().join("other-ca");
    flotilla_cert(&["ca", "--directory", other_ca.to_str().unwrap()]);
    let stranger = node_certificate_in(&other_ca, &other_ca, 2, "flotilla");
    let status = raft_pre_vote(&node, Some(stranger), "flotilla")
        .await
        .unwrap_err();
    // (With TLS 1.3 the client finishes its side first; the server then rejects the unknown
    // certificate with an alert or closes the connection.)
    // Which alert arrives first varies: the status is a transport error either way.
    assert!(
        status
            .source()
            .is_some_and(|source| source.is::<tonic::transport::Error>()),
        "a transport failure, not an answer: {status:?}"
    );

    // Plaintext to the TLS port gets no answer either.
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{}", node.host_port()))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let status = RaftServiceClient::new(channel)
            .pre_vote(pre_vote("flotilla"))
            .await
            .unwrap_err();
        assert_ne!(status.code(), tonic::Code::Ok);
        assert_ne!(status.code(), tonic::Code::PermissionDenied, "{status}");
    }

    // A node certificate of this cluster and CA: the pre-vote is answered.
    let answer = raft_pre_vote(&node, Some(common::node_certificate(2)), "flotilla")
        .await
        .unwrap();
    let decoded: serde_json::Value = flotilla_raft::codec::decode(&answer.data).unwrap();
    assert!(decoded.get("Ok").is_some(), "{decoded}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_certificate_acts_only_as_its_own_worker() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let channel = tls_channel(&node.address, Some(worker_certificate("w1")))
        .await
        .unwrap();
    // An admin token (which may act as any worker id): the certificate alone says w1.
    let mut workers = WorkerServiceClient::new(common::with_token(channel, common::ADMIN_TOKEN));
    let lease_as = |worker_id: &str| v1::LeaseRunsRequest {
        worker_id: worker_id.into(),
        free_slots: 1,
        wait_ms: 0,
        held: Vec::new(),
    };
    let status = workers.lease_runs(lease_as("w2")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(
        status.message().starts_with("worker_id:")
            && status.message().contains("spiffe://flotilla/worker/w1")
            && status.message().contains("\"w2\""),
        "{status}"
    );
    let status = workers
        .heartbeat(v1::HeartbeatRequest {
            worker_id: "w2".into(),
            leases: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    let status = workers
        .report_result(v1::ReportResultRequest {
            worker_id: "w2".into(),
            run_id: "fl-1-0".into(),
            attempt: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    // As itself it leases (nothing is pending: an empty answer).
    let leased = workers
        .lease_runs(lease_as("w1"))
        .await
        .unwrap()
        .into_inner();
    assert!(leased.leases.is_empty());
}

/// `flotilla <arguments>` with no transport settings from the environment.
fn flotilla(arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(arguments)
        .env_remove("FLOTILLA_CA_FILE")
        .env_remove("FLOTILLA_CERTIFICATE_FILE")
        .env_remove("FLOTILLA_KEY_FILE")
        .env_remove("FLOTILLA_INSECURE")
        .env_remove("FLOTILLA_CONFIG")
        .output()
        .unwrap()
}

#[test]
fn without_tls_or_insecure_nothing_starts_or_connects() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let server = [
        "server",
        "--data-directory",
        data.to_str().unwrap(),
        "--listen-address",
        "127.0.0.1:0",
        "--http-listen-address",
        "",
        "--no-worker",
    ];
    let output = flotilla(&server);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for key in [
        "tls.ca_file",
        "tls.certificate_file",
        "tls.key_file",
        "tls.insecure",
    ] {
        assert!(stderr.contains(key), "{key}: {stderr}");
    }

    // A node certificate of another node id: refused, naming both identities.
    let (certificate, key) = common::node_certificate(1);
    let mut wrong_node: Vec<&str> = server.to_vec();
    let ca = ca_file();
    wrong_node.extend([
        "--node-id",
        "2",
        "--ca-file",
        ca.to_str().unwrap(),
        "--certificate-file",
        certificate.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ]);
    let output = flotilla(&wrong_node);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("tls.certificate_file")
            && stderr.contains("spiffe://flotilla/node/1")
            && stderr.contains("spiffe://flotilla/node/2"),
        "{stderr}"
    );

    // --insecure together with certificate files is a contradiction.
    let mut both = wrong_node.clone();
    both.push("--insecure");
    let output = flotilla(&both);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tls.insecure"), "{stderr}");

    // Client commands need --ca-file or --insecure too.
    let output = flotilla(&["--address", "127.0.0.1:1", "fleet", "list"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--ca-file") && stderr.contains("--insecure"),
        "{stderr}"
    );
    let output = flotilla(&[
        "worker",
        "--endpoints",
        "127.0.0.1:1",
        "--data-directory",
        data.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--ca-file") && stderr.contains("--insecure"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicitly_insecure_node_serves_plaintext() {
    let root = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "server",
            "--insecure",
            "--no-worker",
            "--http-listen-address",
            "",
        ])
        .args(["--listen-address", &address, "--data-directory"])
        .arg(root.path().join("data"))
        .env_remove("FLOTILLA_CA_FILE")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let listed = loop {
        let token_file = root.path().join("data").join("bootstrap-token");
        let output = flotilla(&[
            "--insecure",
            "--token-file",
            token_file.to_str().unwrap(),
            "--address",
            &address,
            "fleet",
            "list",
        ]);
        if output.status.success() {
            break output;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(listed.status.success());
    let _ = child.kill();
    let _ = child.wait();
}
