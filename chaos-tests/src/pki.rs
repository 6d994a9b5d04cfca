//! TLS for the chaos suite: one development CA per test process (made with `flotilla cert ca`),
//! node and worker certificates per cluster (made with `flotilla cert node|worker` for the
//! hosts' namespace addresses), and the client TLS the harness's own channels use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use tonic::transport::{Certificate, ClientTlsConfig};

/// Runs `binary cert <arguments>`.
///
/// # Errors
/// When it cannot run or fails (with its stderr).
pub fn flotilla_cert(binary: &Path, arguments: &[String]) -> Result<()> {
    let output = Command::new(binary)
        .arg("cert")
        .args(arguments)
        .output()
        .with_context(|| format!("running {} cert", binary.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "flotilla cert {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The directory of this process's CA (`ca.pem`, `ca-key.pem`), made on first use. It is kept
/// for the life of the process (clusters of parallel scenarios share it).
///
/// # Errors
/// When the CA cannot be made.
pub fn ca_directory(binary: &Path) -> Result<&'static Path> {
    static DIRECTORY: OnceLock<PathBuf> = OnceLock::new();
    if let Some(directory) = DIRECTORY.get() {
        return Ok(directory);
    }
    let directory = tempfile::Builder::new()
        .prefix("flotilla-chaos-ca-")
        .tempdir()?
        .keep();
    flotilla_cert(
        binary,
        &[
            "ca".into(),
            "--directory".into(),
            directory.display().to_string(),
        ],
    )?;
    // Another thread may have won the race: use its CA and drop ours.
    if DIRECTORY.set(directory.clone()).is_err() {
        let _ = std::fs::remove_dir_all(&directory);
    }
    DIRECTORY
        .get()
        .map(PathBuf::as_path)
        .context("CA directory")
}

/// The client TLS of the harness: the CA made by [`ca_directory`], no client certificate (the
/// harness calls FleetService and ClusterService, as a person would).
///
/// # Errors
/// When no CA was made yet or it cannot be read.
pub fn client_tls() -> Result<ClientTlsConfig> {
    static TLS: OnceLock<ClientTlsConfig> = OnceLock::new();
    if let Some(tls) = TLS.get() {
        return Ok(tls.clone());
    }
    let binary = crate::process::flotilla_binary()?;
    let ca = std::fs::read(ca_directory(&binary)?.join("ca.pem"))?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    Ok(TLS.get_or_init(|| tls).clone())
}

/// The CA's signing flags and `--directory directory` for `flotilla cert`.
fn signing(ca: &Path, directory: &Path) -> Vec<String> {
    vec![
        "--ca-file".into(),
        ca.join("ca.pem").display().to_string(),
        "--ca-key-file".into(),
        ca.join("ca-key.pem").display().to_string(),
        "--directory".into(),
        directory.display().to_string(),
    ]
}

/// The `flotilla server` TLS flags for node `node_id` reachable at `host` (an IP address), its
/// certificate made in `directory`.
///
/// # Errors
/// When the certificate cannot be made.
pub fn node_arguments(
    binary: &Path,
    directory: &Path,
    node_id: u64,
    host: &str,
) -> Result<Vec<String>> {
    let ca = ca_directory(binary)?;
    std::fs::create_dir_all(directory)?;
    let certificate = directory.join(format!("node-{node_id}.pem"));
    if !certificate.exists() {
        let mut arguments = vec![
            "node".into(),
            "--node-id".into(),
            node_id.to_string(),
            "--host".into(),
            format!("{host},localhost"),
        ];
        arguments.extend(signing(ca, directory));
        flotilla_cert(binary, &arguments)?;
    }
    Ok(tls_flags(
        ca,
        &certificate,
        &directory.join(format!("node-{node_id}-key.pem")),
    ))
}

/// `--ca-file`, `--certificate-file` and `--key-file` for a certificate of the CA in `ca`.
fn tls_flags(ca: &Path, certificate: &Path, key: &Path) -> Vec<String> {
    vec![
        "--ca-file".into(),
        ca.join("ca.pem").display().to_string(),
        "--certificate-file".into(),
        certificate.display().to_string(),
        "--key-file".into(),
        key.display().to_string(),
    ]
}

/// The `flotilla worker` TLS flags for `worker_id`, its certificate made in `directory`.
///
/// # Errors
/// When the certificate cannot be made.
pub fn worker_arguments(binary: &Path, directory: &Path, worker_id: &str) -> Result<Vec<String>> {
    let ca = ca_directory(binary)?;
    std::fs::create_dir_all(directory)?;
    let certificate = directory.join(format!("worker-{worker_id}.pem"));
    if !certificate.exists() {
        let mut arguments = vec!["worker".into(), "--worker-id".into(), worker_id.to_string()];
        arguments.extend(signing(ca, directory));
        flotilla_cert(binary, &arguments)?;
    }
    Ok(tls_flags(
        ca,
        &certificate,
        &directory.join(format!("worker-{worker_id}-key.pem")),
    ))
}
