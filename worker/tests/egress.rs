//! Egress with real sockets, real network namespaces and real bubblewrap: the per-attempt proxy
//! (allowlist, address rules, limits, records) and what a sandboxed agent can reach with and
//! without network. The "outside" is a namespace the test creates; nothing leaves the machine.

mod common;

use flotilla_proto::v1::AttemptOutcome;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use common::netns::{OUTSIDE_BODY, OutsideHost, Server, connect_in, wait_for};
use common::{run, sandbox_command, test_config};
use flotilla_worker::egress::{ConnectionRecord, EgressConfig, EgressProxy, EgressReport};
use flotilla_worker::sandbox::SandboxDriver;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A policy allowing `outside.test` (static, at the outside host) and `loopback.test` (static,
/// at 127.0.0.1) on any port, with the outside host's range as the one exception.
fn egress_config(outside: &OutsideHost) -> EgressConfig {
    EgressConfig {
        allowed_hosts: vec!["outside.test:*".into(), "loopback.test:*".into()],
        allowed_private_networks: vec!["10.215.0.0/16".into()],
        static_hosts: BTreeMap::from([
            ("outside.test".into(), outside.address.to_string()),
            ("loopback.test".into(), "127.0.0.1".into()),
            ("denied.test".into(), outside.address.to_string()),
        ]),
        ..EgressConfig::default()
    }
}

fn start(config: &EgressConfig) -> EgressProxy {
    EgressProxy::start(Arc::new(config.policy().unwrap()), "run-1", 2).unwrap()
}

fn proxy_address(config: &EgressConfig) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, config.proxy_port))
}

/// Sends `CONNECT target` and returns the stream and the response head.
async fn connect_request(
    proxy: &EgressProxy,
    config: &EgressConfig,
    target: &str,
) -> (tokio::net::TcpStream, String) {
    let mut stream = connect_in(proxy.namespace(), proxy_address(config)).await;
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0_u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let count = stream.read(&mut byte).await.unwrap();
        assert_eq!(count, 1, "the proxy closed before answering: {head:?}");
        head.push(byte[0]);
    }
    (stream, String::from_utf8(head).unwrap())
}

fn find<'a>(report: &'a EgressReport, host: &str) -> &'a ConnectionRecord {
    report
        .connections
        .iter()
        .find(|record| record.host == host)
        .unwrap_or_else(|| panic!("no record for {host}: {report:?}"))
}

#[tokio::test]
async fn allowed_host_is_tunnelled_to_the_outside_and_recorded() {
    let outside = OutsideHost::create();
    let server = outside.serve();
    let config = egress_config(&outside);
    let proxy = start(&config);

    let target = format!("outside.test:{}", server.port);
    let (mut stream, head) = connect_request(&proxy, &config, &target).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: outside.test\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.ends_with(OUTSIDE_BODY), "{response}");
    drop(stream);

    wait_for("the tunnel's record", || {
        !proxy.report_so_far().connections.is_empty()
    })
    .await;
    let report = proxy.finish().await;
    assert_eq!(report.dropped, 0);
    let record = find(&report, "outside.test");
    assert!(record.allowed, "{record:?}");
    assert_eq!(record.reason, "closed");
    assert_eq!(record.port, server.port);
    assert_eq!(record.address, Some(outside.address.into()));
    assert_eq!(record.bytes_up, 38, "{record:?}");
    assert_eq!(record.bytes_down, response.len() as u64);
    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn hosts_outside_the_allowlist_and_internal_addresses_are_denied_and_recorded() {
    let outside = OutsideHost::create();
    let server = outside.serve();
    let host_server = Server::on_host_loopback();
    let config = egress_config(&outside);
    let proxy = start(&config);
    let outside_text = outside.address.to_string();

    let cases = [
        // Not in the allowlist, although it resolves to the reachable outside host.
        (
            format!("denied.test:{}", server.port),
            "403",
            "denied.test",
            "not_allowed",
        ),
        // The outside host by address: not in the allowlist either.
        (
            format!("{}:{}", outside.address, server.port),
            "403",
            &outside_text,
            "not_allowed",
        ),
        // The worker's loopback by address.
        (
            format!("127.0.0.1:{}", host_server.port),
            "403",
            "127.0.0.1",
            "not_allowed",
        ),
        // An allowed name that resolves to loopback.
        (
            format!("loopback.test:{}", host_server.port),
            "403",
            "loopback.test",
            "forbidden_address:loopback",
        ),
        // No port.
        ("outside.test".to_owned(), "400", "", "bad_request"),
    ];
    for (target, status, _, _) in &cases {
        let (_stream, head) = connect_request(&proxy, &config, target).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{target}: {head}"
        );
    }
    // Plain HTTP (absolute form) is refused, not forwarded.
    let mut stream = connect_in(proxy.namespace(), proxy_address(&config)).await;
    let request = format!(
        "GET http://outside.test:{}/ HTTP/1.1\r\nHost: outside.test\r\n\r\n",
        server.port
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");

    let report = proxy.finish().await;
    for (_, _, host, reason) in &cases[..4] {
        let record = find(&report, host);
        assert!(!record.allowed, "{record:?}");
        assert_eq!(&record.reason, reason, "{record:?}");
        assert_eq!((record.bytes_up, record.bytes_down), (0, 0));
    }
    assert_eq!(
        find(&report, "loopback.test").address,
        Some(Ipv4Addr::LOCALHOST.into())
    );
    let reasons_of_outside: Vec<&str> = report
        .connections
        .iter()
        .filter(|record| record.host == "outside.test")
        .map(|record| record.reason.as_str())
        .collect();
    // The CONNECT without a port, and the plain-HTTP request.
    assert_eq!(reasons_of_outside, ["bad_request", "method_not_supported"]);
    assert_eq!(report.connections.len(), 6, "{report:?}");
    assert_eq!(server.accepted(), 0, "a denied request reached the outside");
    assert_eq!(
        host_server.accepted(),
        0,
        "a denied request reached the host"
    );
}

#[tokio::test]
async fn limits_close_tunnels_and_refuse_requests() {
    let outside = OutsideHost::create();
    let server = outside.serve();
    let config = EgressConfig {
        max_connections_per_run: 2,
        max_bytes_per_connection: 50,
        max_records_per_attempt: 2,
        ..egress_config(&outside)
    };
    let proxy = start(&config);
    let target = format!("outside.test:{}", server.port);

    // The answer (76 bytes) is more than the connection may carry with the request.
    let (mut stream, head) = connect_request(&proxy, &config, &target).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: outside.test\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    // The tunnel is cut: reading ends (end of file or reset) without the whole body.
    let _ = stream.read_to_end(&mut response).await;
    assert!(!String::from_utf8_lossy(&response).contains(OUTSIDE_BODY));
    wait_for("the cut tunnel's record", || {
        !proxy.report_so_far().connections.is_empty()
    })
    .await;
    let (_second, head) = connect_request(&proxy, &config, &target).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (_third, head) = connect_request(&proxy, &config, &target).await;
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    // A request head over max_header_bytes is refused by the HTTP parser.
    let mut big = connect_in(proxy.namespace(), proxy_address(&config)).await;
    let filler = "x".repeat(config.max_header_bytes + 1024);
    let _ = big
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nX-Filler: {filler}\r\n\r\n").as_bytes())
        .await;
    let mut answer = Vec::new();
    let _ = big.read_to_end(&mut answer).await;
    assert!(
        answer.is_empty() || String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let report = proxy.finish().await;
    assert_eq!(report.connections.len(), 2, "{report:?}");
    assert_eq!(report.connections[0].reason, "connection_byte_limit");
    assert!(report.connections[0].bytes_up + report.connections[0].bytes_down <= 50);
    assert_eq!(report.connections[1].reason, "connection_limit");
    // The second tunnel, cancelled by finish, is counted but not listed.
    assert_eq!(report.dropped, 1, "{report:?}");
}

/// The reachability script run inside the sandbox: each line `name=<curl exit code>`, and the
/// proxied body when it gets through.
fn reachability_script(host_port: u16, outside: &OutsideHost, outside_port: u16) -> String {
    let address = outside.address;
    format!(
        r#"
curl -sS --max-time 5 --noproxy '*' http://127.0.0.1:{host_port}/ ; echo "direct_host=$?"
curl -sS --max-time 5 --noproxy '*' http://{address}:{outside_port}/ ; echo "direct_outside=$?"
curl -sS --max-time 5 -x http://127.0.0.1:3128 --proxytunnel http://127.0.0.1:{host_port}/ ; echo "explicit_proxy_host=$?"
curl -sS --max-time 5 --proxytunnel http://outside.test:{outside_port}/ ; echo "; proxied_outside=$?"
curl -sS --max-time 5 --proxytunnel http://127.0.0.1:{host_port}/ ; echo "proxied_host=$?"
curl -sS --max-time 5 --proxytunnel http://loopback.test:{host_port}/ ; echo "proxied_loopback_name=$?"
curl -sS --max-time 5 --proxytunnel http://denied.test:{outside_port}/ ; echo "proxied_denied=$?"
echo "proxy_variable=$HTTPS_PROXY"
"#
    )
}

fn value<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find_map(|line| line.split_once(&format!("{key}=")).map(|(_, value)| value))
        .unwrap_or_else(|| panic!("no {key} in {output}"))
}

#[tokio::test]
async fn sandbox_without_network_reaches_nothing() {
    let outside = OutsideHost::create();
    let server = outside.serve();
    let host_server = Server::on_host_loopback();
    let directory = tempfile::tempdir().unwrap();
    let workspace = directory.path().join("ws");
    std::fs::create_dir_all(&workspace).unwrap();
    let config = test_config(directory.path());
    let command = sandbox_command(
        &workspace,
        &reachability_script(host_server.port, &outside, server.port),
    );
    let (result, _log) = run(&config, SandboxDriver::Bubblewrap, &command).await;
    let outcome = result.unwrap();
    let output = outcome.log_tail.as_str();
    for key in [
        "direct_host",
        "direct_outside",
        "explicit_proxy_host",
        "proxied_outside",
        "proxied_host",
    ] {
        assert_ne!(value(output, key), "0", "{key} should fail: {output}");
    }
    assert_eq!(value(output, "proxy_variable"), "", "{output}");
    assert!(!output.contains(OUTSIDE_BODY), "{output}");
    assert_eq!(host_server.accepted(), 0);
    assert_eq!(server.accepted(), 0);
}

#[tokio::test]
async fn sandbox_with_network_reaches_only_allowed_hosts_through_the_proxy() {
    let outside = OutsideHost::create();
    let server = outside.serve();
    let host_server = Server::on_host_loopback();
    assert_ne!(host_server.port, 3128);
    let directory = tempfile::tempdir().unwrap();
    let workspace = directory.path().join("ws");
    std::fs::create_dir_all(&workspace).unwrap();
    let config = test_config(directory.path());
    let egress = egress_config(&outside);
    let proxy = start(&egress);
    let mut command = sandbox_command(
        &workspace,
        &reachability_script(host_server.port, &outside, server.port),
    );
    command.network = true;
    command.egress = Some(proxy.attachment());
    let (result, _log) = run(&config, SandboxDriver::Bubblewrap, &command).await;
    let outcome = result.unwrap();
    let output = outcome.log_tail.as_str();
    assert_eq!(value(output, "proxied_outside"), "0", "{output}");
    assert!(
        output.contains(&format!("{OUTSIDE_BODY}; proxied_outside=0")),
        "{output}"
    );
    for key in [
        "direct_host",
        "direct_outside",
        "explicit_proxy_host",
        "proxied_host",
        "proxied_loopback_name",
        "proxied_denied",
    ] {
        assert_ne!(value(output, key), "0", "{key} should fail: {output}");
    }
    assert_eq!(value(output, "proxy_variable"), "http://127.0.0.1:3128");
    assert_eq!(
        host_server.accepted(),
        0,
        "the sandbox reached the host's loopback"
    );
    assert_eq!(
        server.accepted(),
        1,
        "only the proxied request reaches the outside"
    );

    let report = proxy.finish().await;
    let allowed: Vec<&ConnectionRecord> = report
        .connections
        .iter()
        .filter(|record| record.allowed)
        .collect();
    assert_eq!(allowed.len(), 1, "{report:?}");
    assert_eq!(allowed[0].host, "outside.test");
    assert!(allowed[0].bytes_down > OUTSIDE_BODY.len() as u64);
    assert_eq!(
        find(&report, "loopback.test").reason,
        "forbidden_address:loopback"
    );
    assert_eq!(find(&report, "denied.test").reason, "not_allowed");
    let loopback_by_address: Vec<&ConnectionRecord> = report
        .connections
        .iter()
        .filter(|record| record.host == "127.0.0.1")
        .collect();
    assert_eq!(loopback_by_address.len(), 2, "{report:?}");
    assert!(
        loopback_by_address
            .iter()
            .all(|record| record.reason == "not_allowed")
    );
}

#[tokio::test]
async fn sandbox_with_network_but_no_namespace_is_refused() {
    let directory = tempfile::tempdir().unwrap();
    let workspace = directory.path().join("ws");
    std::fs::create_dir_all(&workspace).unwrap();
    let config = test_config(directory.path());
    let mut command = sandbox_command(&workspace, "true");
    command.network = true;
    let (result, _log) = run(&config, SandboxDriver::Bubblewrap, &command).await;
    assert!(
        matches!(
            result,
            Err(flotilla_worker::sandbox::SandboxError::NoEgressNamespace)
        ),
        "{result:?}"
    );
}

/// A lease of one run of `agent` against `repository` with network on and no push.
fn network_lease(repository: &str, agent: &str) -> flotilla_proto::v1::Lease {
    use flotilla_proto::v1::{AgentSpec, FleetSpec, Lease, SandboxSpec};
    Lease {
        run_id: "run-egress".to_owned(),
        fleet_id: "fleet-1".to_owned(),
        fleet_name: "egress".to_owned(),
        repository: repository.to_owned(),
        attempt: 3,
        branch: "flotilla/egress".to_owned(),
        trace_parent: String::new(),
        secrets: Default::default(),
        secrets_error: String::new(),
        secrets_error_retryable: false,
        spec: Some(FleetSpec {
            name: "egress".to_owned(),
            project: String::new(),
            repositories: vec![repository.to_owned()],
            agent: Some(AgentSpec {
                command: agent.to_owned(),
                task: "fetch".to_owned(),
                env: Default::default(),
                secrets: Default::default(),
            }),
            verify: Vec::new(),
            sandbox: Some(SandboxSpec {
                driver: String::new(),
                timeout_ms: 20_000,
                memory_limit_bytes: 0,
                pids_limit: 0,
                network: true,
                cpu_limit_millicores: 0,
                disk_limit_bytes: 0,
            }),
            branch_template: "flotilla/{fleet}".to_owned(),
            commit_message: "Fetch".to_owned(),
            max_parallelism: 1,
            max_attempts: 1,
            push: false,
            retry_backoff_initial_ms: 0,
            retry_backoff_max_ms: 0,
            flow: None,
        }),
        lease_ttl_ms: 30_000,
        fleet_created_at_ms: 1_700_000_000_000,
    }
}

#[tokio::test]
async fn an_attempt_with_network_reports_its_egress_connections() {
    let outside = OutsideHost::create();
    let server = outside.serve();
    let root = tempfile::tempdir().unwrap();
    let origin = common::make_origin(root.path());
    let config = flotilla_worker::config::WorkerConfig {
        egress: egress_config(&outside),
        ..test_config(&root.path().join("work"))
    };
    let agent = format!(
        "curl -sS --max-time 5 --proxytunnel http://outside.test:{port}/ > fetched.txt; \
         curl -sS --max-time 5 --proxytunnel http://denied.test:{port}/ || true",
        port = server.port
    );
    let lease = network_lease(origin.to_str().unwrap(), &agent);
    let deadline = flotilla_worker::lease::LeaseDeadline::fixed(
        tokio::time::Instant::now() + std::time::Duration::from_secs(3600),
    );
    let result = flotilla_worker::execute::execute_attempt_with_token(
        &config,
        &lease,
        tokio_util::sync::CancellationToken::new(),
        deadline,
    )
    .await;
    assert_eq!(result.outcome(), AttemptOutcome::Changed, "{result:?}");
    assert!(result.patch.contains(OUTSIDE_BODY), "{}", result.patch);
    let connections = &result.egress_connections;
    assert_eq!(connections.len(), 2, "{connections:?}");
    assert_eq!(result.egress_connections_dropped, 0);
    let record = |host: &str| {
        connections
            .iter()
            .find(|connection| connection.host == host)
            .unwrap_or_else(|| panic!("no record of {host}: {connections:?}"))
    };
    let allowed = record("outside.test");
    assert!(allowed.allowed);
    assert_eq!(allowed.reason, "closed");
    assert_eq!(allowed.address, outside.address.to_string());
    assert_eq!(allowed.port, u32::from(server.port));
    assert!(allowed.bytes_down > 0 && allowed.bytes_up > 0);
    let denied = record("denied.test");
    assert!(!denied.allowed);
    assert_eq!(denied.reason, "not_allowed");
    assert!(
        result
            .log_tail
            .contains("egress: 1 connections allowed, 1 denied"),
        "{}",
        result.log_tail
    );
}
