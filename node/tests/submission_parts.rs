//! A submission larger than `limits.max_submission_part_bytes` is written to the Raft log in
//! parts (`StageRepositories` entries, then `SubmitStagedFleet`), against a real server: the
//! fleet is the one submitted, in order, and a retry with the same idempotency key answers
//! the same fleet.

mod common;

use common::{Node, spec};
use flotilla_proto::v1;

const CONFIG: &str = r#"
[limits]
max_submission_part_bytes = 4096

[worker]
enabled = false
"#;

async fn last_log_index(node: &Node) -> u64 {
    let mut cluster = common::cluster_client(&node.address).await;
    cluster
        .status(v1::StatusRequest { from_leader: false })
        .await
        .unwrap()
        .into_inner()
        .last_log_index
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_submission_is_written_in_parts_and_makes_the_same_fleet() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("node.toml");
    common::write_config(&config, CONFIG);
    let config = config.to_str().unwrap().to_string();
    let node = Node::start(&root.path().join("node"), &["--config", &config]).await;
    let mut client = node.client().await;
    // 600 URLs of ~30 bytes (+24 each staged): about 32 KiB, so at least 8 parts of 4 KiB.
    let repositories: Vec<String> = (0..600)
        .map(|i| format!("file:///srv/repo-{i}.git"))
        .collect();
    let request = v1::SubmitFleetRequest {
        dry_run: false,
        spec: Some(spec("parts", repositories.clone(), "true", &[])),
        idempotency_key: "parts-1".into(),
    };
    let before = last_log_index(&node).await;
    let submitted = client
        .submit_fleet(request.clone())
        .await
        .unwrap()
        .into_inner();
    let after = last_log_index(&node).await;
    assert!(submitted.created);
    let fleet = submitted.fleet.unwrap();
    assert!(
        after - before >= 9,
        "expected at least 8 staged parts and the submission, {before} -> {after}"
    );
    let runs: Vec<String> = fleet
        .runs
        .iter()
        .map(|run| run.repository.clone())
        .collect();
    assert_eq!(runs, repositories, "every repository, in order");

    let again = client.submit_fleet(request).await.unwrap().into_inner();
    assert!(!again.created);
    assert_eq!(again.fleet.unwrap().id, fleet.id);
}
