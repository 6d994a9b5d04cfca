//! The harness itself: a `flotilla server` in one namespace is reachable from the root
//! namespace and from another namespace; isolating its host cuts it off, healing restores it;
//! dropping the network removes every namespace, link and rule.

use std::time::Duration;

use flotilla_chaos_tests::cluster::{ADMIN_TOKEN, channel};
use flotilla_chaos_tests::net::{Network, run};
use flotilla_chaos_tests::process::{Process, flotilla_binary};
use flotilla_proto::v1;
use flotilla_proto::v1::fleet_service_client::FleetServiceClient;

async fn reachable(url: &str) -> bool {
    let attempt = async {
        let channel = channel(url, Duration::from_millis(500)).await?;
        FleetServiceClient::new(channel)
            .list_fleets(v1::ListFleetsRequest::default())
            .await?;
        anyhow::Ok(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Ok(()))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_partitions_and_cleanup() {
    let binary = flotilla_binary().expect("flotilla binary");
    let directory = tempfile::tempdir().expect("temporary directory");
    let network = Network::create(&["server", "client"]).expect("network");
    let server = network.host("server").clone();
    let client = network.host("client").clone();
    let address = format!("{}:7600", server.address);
    let url = format!("https://{address}");
    let data = directory.path().join("data");
    // The harness's admin token, bootstrapped by the server and sent by every client.
    let token_file = directory.path().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).expect("token file");
    let ca_file = flotilla_chaos_tests::pki::ca_directory(&binary)
        .expect("CA")
        .join("ca.pem");
    let mut arguments: Vec<String> = [
        "server",
        "--node-id",
        "1",
        "--data-directory",
        data.to_str().unwrap(),
        "--listen-address",
        &address,
        "--http-listen-address",
        "",
        "--no-worker",
        "--bootstrap-token-file",
        token_file.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    arguments.extend(
        flotilla_chaos_tests::pki::node_arguments(
            &binary,
            &directory.path().join("pki"),
            1,
            &server.address.to_string(),
        )
        .expect("node certificate"),
    );
    let mut process = Process::spawn(
        "server",
        &server.namespace,
        &binary,
        &arguments,
        &directory.path().join("server.log"),
    )
    .expect("start server");

    // Reachable from the root namespace once started.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !reachable(&url).await {
        assert!(
            process.is_running(),
            "server exited:\n{}",
            process.log_tail(30)
        );
        assert!(
            std::time::Instant::now() < deadline,
            "server not reachable at {url}:\n{}",
            process.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // From another namespace, with the CLI.
    let from_client = |namespace: &str| {
        std::process::Command::new("ip")
            .args(["netns", "exec", namespace])
            .arg(&binary)
            .arg("--token-file")
            .arg(&token_file)
            .arg("--ca-file")
            .arg(&ca_file)
            .args(["--address", &url, "fleet", "list"])
            .output()
            .expect("run client")
    };
    let output = from_client(&client.namespace);
    assert!(
        output.status.success(),
        "client namespace cannot reach the server: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // Isolated: unreachable from both; healed: reachable again.
    server.isolate().expect("isolate");
    assert!(!reachable(&url).await, "isolated server still reachable");
    assert!(!from_client(&client.namespace).status.success());
    server.heal().expect("heal");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !reachable(&url).await {
        assert!(
            std::time::Instant::now() < deadline,
            "healed server not reachable"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Signals reach flotilla itself (ip netns exec execs in place).
    let executable = std::fs::read_link(format!("/proc/{}/exe", process.pid())).unwrap();
    assert_eq!(executable.file_name(), binary.file_name());
    process.pause();
    assert!(!reachable(&url).await, "paused server still answers");
    process.resume();
    process.kill();
    assert!(!process.is_running());

    let namespaces = [server.namespace.clone(), client.namespace.clone()];
    drop(network);
    let left = run("ip", &["netns", "list"]).unwrap();
    for namespace in namespaces {
        assert!(!left.contains(&namespace), "{namespace} left behind");
    }
}
