//! The operator's execution policy at submission: a real node refuses specs outside it with
//! PERMISSION_DENIED naming the field, and stores nothing for them.

mod common;

use common::{Node, spec};
use flotilla_proto::v1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn specs_outside_the_operators_policy_are_refused_naming_the_field() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    // The test policy plus tighter ceilings: at most 1 GiB of memory, one CPU.
    common::write_config(&config, "[worker]\nenabled = false\n");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}max_memory_limit_bytes = 1073741824\nmax_cpu_limit_millicores = 1000\n"),
    )
    .unwrap();
    let node = Node::start(
        &root.path().join("node"),
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let mut client = node.client().await;
    let allowed = format!(
        "file://{}/a.git",
        root.path().canonicalize().unwrap().display()
    );

    // (what the spec asks, the field named, a fragment of the message)
    let mut cases: Vec<(v1::FleetSpec, &str, &str)> = Vec::new();
    let mut unconfined = spec("unconfined", vec![allowed.clone()], "id", &[]);
    unconfined.sandbox.as_mut().unwrap().driver = "none".into();
    cases.push((unconfined, "spec.sandbox.driver", "policy.allowed_drivers"));
    let host_root = spec(
        "host-root",
        vec!["file:///root/private.git".into()],
        "id",
        &[],
    );
    cases.push((host_root, "spec.repositories[0]", "policy.file_roots"));
    let climbing = spec(
        "climbing",
        vec![allowed.clone(), "/srv/../root/private.git".into()],
        "id",
        &[],
    );
    cases.push((climbing, "spec.repositories[1]", "`..`"));
    let password = spec(
        "password",
        vec!["https://bot:hunter2@github.com/org/repo.git".into()],
        "id",
        &[],
    );
    cases.push((
        password,
        "spec.repositories[0]",
        "must not carry a password",
    ));
    let own_port = spec(
        "own-port",
        vec![format!("http://127.0.0.1:{}/x.git", node.port())],
        "id",
        &[],
    );
    cases.push((own_port, "spec.repositories[0]", "scheme \"http\""));
    let metadata = spec(
        "metadata",
        vec!["https://169.254.169.254/latest.git".into()],
        "id",
        &[],
    );
    cases.push((metadata, "spec.repositories[0]", "link-local"));
    let mut memory = spec("memory", vec![allowed.clone()], "id", &[]);
    memory.sandbox.as_mut().unwrap().memory_limit_bytes = 2 << 30;
    cases.push((
        memory,
        "spec.sandbox.memory_limit_bytes",
        "policy.max_memory_limit_bytes",
    ));
    let mut cpu = spec("cpu", vec![allowed.clone()], "id", &[]);
    cpu.sandbox.as_mut().unwrap().cpu_limit_millicores = 2000;
    cases.push((
        cpu,
        "spec.sandbox.cpu_limit_millicores",
        "policy.max_cpu_limit_millicores",
    ));

    for (spec, field, fragment) in cases {
        let name = spec.name.clone();
        let status = client
            .submit_fleet(v1::SubmitFleetRequest {
                dry_run: false,
                spec: Some(spec),
                idempotency_key: String::new(),
            })
            .await
            .expect_err(&name);
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{name}: {status:?}"
        );
        assert!(
            status.message().starts_with(&format!("{field}: ")),
            "{name}: {}",
            status.message()
        );
        assert!(
            status.message().contains(fragment),
            "{name}: {}",
            status.message()
        );
    }
    let listed = client
        .list_fleets(v1::ListFleetsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.fleets.is_empty(), "a refused spec created a fleet");

    // Within the policy: accepted.
    let mut within = spec("within", vec![allowed], "id", &[]);
    within.sandbox.as_mut().unwrap().memory_limit_bytes = 1 << 30;
    within.sandbox.as_mut().unwrap().cpu_limit_millicores = 1000;
    client
        .submit_fleet(v1::SubmitFleetRequest {
            dry_run: false,
            spec: Some(within),
            idempotency_key: String::new(),
        })
        .await
        .expect("a spec within the policy is accepted");
}

#[test]
fn a_node_with_an_invalid_policy_refuses_to_start_naming_the_key() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    std::fs::write(&config, "[policy]\nallowed_drivers = [\"docker\"]\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "server",
            "--print-config",
            "--config",
            config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("policy.allowed_drivers"), "{stderr}");
    assert!(stderr.contains("docker"), "{stderr}");
}

/// Sends raw bytes as a request message, and decodes nothing.
#[derive(Clone, Default)]
struct RawBytesCodec;

struct RawEncoder;
struct NothingDecoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buffer: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        buffer.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for NothingDecoder {
    type Item = ();
    type Error = tonic::Status;
    fn decode(
        &mut self,
        _buffer: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        Ok(Some(()))
    }
}

impl tonic::codec::Codec for RawBytesCodec {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawEncoder;
    type Decoder = NothingDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> NothingDecoder {
        NothingDecoder
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_request_is_an_invalid_argument_naming_the_message() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let channel = common::channel(&node.address).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    // Field 1 (spec) as a length-delimited value claiming 100 bytes, followed by 2.
    let garbage = vec![0x0a, 100, 1, 2];
    let mut request = tonic::Request::new(garbage);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", common::ADMIN_TOKEN).parse().unwrap(),
    );
    let status = grpc
        .unary(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/flotilla.v1.FleetService/SubmitFleet",
            ),
            RawBytesCodec,
        )
        .await
        .expect_err("garbage is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("not a valid SubmitFleetRequest"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_about_oversized_inputs_do_not_echo_them() {
    let root = tempfile::tempdir().unwrap();
    let node = Node::start(&root.path().join("node"), &["--no-worker"]).await;
    let mut client = node.client().await;
    let huge = "x".repeat(1 << 20);
    let status = client
        .get_fleet(v1::GetFleetRequest {
            fleet_id: huge.clone(),
        })
        .await
        .expect_err("no such fleet");
    // The client sees the real answer (not "Stream removed" from a message over the 16 KiB
    // header limit), with the input cut.
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("fleet_id: "),
        "{}",
        &status.message()[..64]
    );
    assert!(status.message().len() < 2048, "{}", status.message().len());
    let mut oversized = spec("oversized", vec!["file:///srv/a.git".into()], "true", &[]);
    oversized.sandbox.as_mut().unwrap().driver = huge;
    let status = client
        .submit_fleet(v1::SubmitFleetRequest {
            dry_run: false,
            spec: Some(oversized),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("unknown driver");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("spec.sandbox.driver: "),
        "{}",
        &status.message()[..64]
    );
    assert!(status.message().len() < 2048, "{}", status.message().len());
}
