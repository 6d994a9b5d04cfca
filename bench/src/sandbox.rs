//! `flotilla-bench sandbox`: sandbox start time against a plain process start.

use anyhow::Context as _;

/// `flotilla-bench sandbox`: starts `count` bubblewrap sandboxes running `true`, interleaved
/// with `count` plain process starts (the `none` driver: same log capture and cgroup setup, no
/// namespaces) as the baseline measured in the same run, and prints percentiles and the ratio.
///
/// # Errors
/// The sandbox cannot be started.
pub async fn sandbox(count: u32) -> anyhow::Result<i32> {
    use flotilla_worker::sandbox::{SandboxDriver, measure_sandbox_start};
    anyhow::ensure!(
        count > 0 && count <= 100_000,
        "--count must be between 1 and 100000"
    );
    let directory = tempfile::tempdir().context("temporary directory")?;
    let config = flotilla_worker::config::WorkerConfig {
        work_directory: directory.path().to_path_buf(),
        ..flotilla_worker::config::WorkerConfig::default()
    };
    let mut sandbox_ms = Vec::with_capacity(count as usize);
    let mut baseline_ms = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let elapsed = measure_sandbox_start(&config, SandboxDriver::Bubblewrap).await?;
        sandbox_ms.push(elapsed.as_secs_f64() * 1000.0);
        let elapsed = measure_sandbox_start(&config, SandboxDriver::None).await?;
        baseline_ms.push(elapsed.as_secs_f64() * 1000.0);
    }
    let report = |name: &str, samples: &mut Vec<f64>| {
        samples.sort_by(f64::total_cmp);
        let percentile = |p: f64| samples[((samples.len() as f64 - 1.0) * p).round() as usize];
        println!(
            "{name}: {count} starts, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(0.5),
            percentile(0.9),
            percentile(0.99),
            percentile(1.0)
        );
        (percentile(0.5), percentile(0.99))
    };
    let (sandbox_p50, sandbox_p99) = report("bwrap sandbox", &mut sandbox_ms);
    let (baseline_p50, baseline_p99) = report("plain process (baseline)", &mut baseline_ms);
    println!(
        "ratio sandbox / plain process: p50 {:.2}x, p99 {:.2}x",
        sandbox_p50 / baseline_p50,
        sandbox_p99 / baseline_p99
    );
    Ok(0)
}
