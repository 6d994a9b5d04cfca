//! `flotilla cert ca|node|worker|client`: a development CA and the certificates signed by it,
//! made with `rcgen` (ECDSA P-256). Identities are URI SANs (see [`crate::tls`]); node
//! certificates also carry DNS and IP SANs for host name verification. Keys are written with
//! mode 0600; an existing file is never overwritten.
//!
//! Files: `ca.pem` + `ca-key.pem`; `<name>.pem` + `<name>-key.pem` for the others, where
//! `<name>` is `node-<id>`, `worker-<id>` or `client-<name>`.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::tls::{PeerIdentity, is_valid_worker_id};

/// Default validity of a CA certificate, in days.
pub const DEFAULT_CA_VALIDITY_DAYS: u32 = 3650;
/// Default validity of a node, worker or client certificate, in days.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;
/// Longest validity accepted, in days.
pub const MAX_VALIDITY_DAYS: u32 = 36_500;

/// `flotilla cert` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum CertCommands {
    /// A development CA: `ca.pem` and `ca-key.pem` in --directory.
    Ca {
        /// Where the files are written (created if missing).
        #[arg(long, default_value = ".")]
        directory: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_CA_VALIDITY_DAYS)]
        days: u32,
    },
    /// A node certificate (`spiffe://<cluster>/node/<id>`; server and client use).
    Node {
        /// Raft node id.
        #[arg(long)]
        node_id: u64,
        /// Cluster id (the trust domain; the node's `cluster_id`).
        #[arg(long, default_value = flotilla_raft::node::DEFAULT_CLUSTER_ID)]
        cluster_id: String,
        /// Host names or IP addresses clients and peers dial, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        host: Vec<String>,
        #[command(flatten)]
        signing: Signing,
    },
    /// A worker certificate (`spiffe://<cluster>/worker/<id>`; client use).
    Worker {
        /// Worker id (1-64 of [A-Za-z0-9._-]).
        #[arg(long)]
        worker_id: String,
        /// Cluster id.
        #[arg(long, default_value = flotilla_raft::node::DEFAULT_CLUSTER_ID)]
        cluster_id: String,
        #[command(flatten)]
        signing: Signing,
    },
    /// A client certificate for the CLI (no node or worker identity; client use).
    Client {
        /// Name in the certificate's subject and file name (1-64 of [A-Za-z0-9._-]).
        #[arg(long, default_value = "cli")]
        name: String,
        #[command(flatten)]
        signing: Signing,
    },
}

/// Where the CA's key is and where the new files go. The CA certificate is the global
/// `--ca-file` (default `ca.pem`).
#[derive(clap::Args, Debug)]
pub struct Signing {
    /// The CA's key.
    #[arg(long, default_value = "ca-key.pem")]
    ca_key_file: PathBuf,
    /// Where the files are written (created if missing).
    #[arg(long, default_value = ".")]
    directory: PathBuf,
    /// Validity in days.
    #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS)]
    days: u32,
}

/// What to create.
enum Leaf {
    Node {
        identity: PeerIdentity,
        hosts: Vec<String>,
    },
    Worker {
        identity: PeerIdentity,
    },
    Client {
        name: String,
    },
}

fn validity(params: &mut CertificateParams, days: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_VALIDITY_DAYS).contains(&days),
        "--days: must be between 1 and {MAX_VALIDITY_DAYS}"
    );
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    Ok(())
}

/// Writes `contents` to a new file `path` with `mode`; refuses to overwrite.
fn write_new(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| {
            format!(
                "creating {} (an existing file is never replaced)",
                path.display()
            )
        })?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes a certificate (0644) and its key (0600) as `<stem>.pem` and `<stem>-key.pem`; returns
/// the certificate's path.
fn write_pair(
    directory: &Path,
    stem: &str,
    certificate_pem: &str,
    key_pem: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(directory)
        .with_context(|| format!("--directory {}", directory.display()))?;
    let certificate = directory.join(format!("{stem}.pem"));
    let key = directory.join(format!("{stem}-key.pem"));
    // The key first: a certificate without its key is of no use, a key alone harms nothing.
    write_new(&key, key_pem, 0o600)?;
    write_new(&certificate, certificate_pem, 0o644)?;
    Ok((certificate, key))
}

/// Creates a development CA in `directory`; returns the paths of its certificate and key.
///
/// # Errors
/// Invalid `days`, an existing file, or an unwritable directory.
pub fn create_ca(directory: &Path, days: u32) -> anyhow::Result<(PathBuf, PathBuf)> {
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = CertificateParams::default();
    validity(&mut params, days)?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, "Flotilla development CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let certificate = params.self_signed(&key).context("signing the CA")?;
    write_pair(directory, "ca", &certificate.pem(), &key.serialize_pem())
}

fn create_leaf(
    leaf: Leaf,
    ca_file: &Path,
    signing: &Signing,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ca_pem = std::fs::read_to_string(ca_file)
        .with_context(|| format!("--ca-file {}", ca_file.display()))?;
    let ca_key_pem = std::fs::read_to_string(&signing.ca_key_file)
        .with_context(|| format!("--ca-key-file {}", signing.ca_key_file.display()))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|error| anyhow::anyhow!("--ca-key-file: not a private key: {error}"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|error| anyhow::anyhow!("--ca-file: not a CA certificate: {error}"))?;
    let key = KeyPair::generate().context("generating the key")?;
    let mut params = CertificateParams::default();
    validity(&mut params, signing.days)?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let mut name = DistinguishedName::new();
    let stem = match &leaf {
        Leaf::Node { identity, hosts } => {
            anyhow::ensure!(!hosts.is_empty(), "--host: name at least one host");
            for host in hosts {
                let host = host.trim();
                params.subject_alt_names.push(match host.parse() {
                    Ok(address) => SanType::IpAddress(address),
                    Err(_) => SanType::DnsName(host.try_into().map_err(|error| {
                        anyhow::anyhow!("--host: {host:?} is not a DNS name: {error}")
                    })?),
                });
            }
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            name.push(DnType::CommonName, identity.spiffe_id());
            let PeerIdentity::Node { node_id, .. } = identity else {
                unreachable!("a node leaf holds a node identity");
            };
            format!("node-{node_id}")
        }
        Leaf::Worker { identity } => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            name.push(DnType::CommonName, identity.spiffe_id());
            let PeerIdentity::Worker { worker_id, .. } = identity else {
                unreachable!("a worker leaf holds a worker identity");
            };
            format!("worker-{worker_id}")
        }
        Leaf::Client { name: client } => {
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            name.push(DnType::CommonName, client.clone());
            format!("client-{client}")
        }
    };
    if let Leaf::Node { identity, .. } | Leaf::Worker { identity } = &leaf {
        params.subject_alt_names.push(SanType::URI(
            identity
                .spiffe_id()
                .try_into()
                .map_err(|error| anyhow::anyhow!("the SPIFFE ID: {error}"))?,
        ));
    }
    params.distinguished_name = name;
    let certificate = params
        .signed_by(&key, &issuer)
        .context("signing the certificate")?;
    write_pair(
        &signing.directory,
        &stem,
        &certificate.pem(),
        &key.serialize_pem(),
    )
}

fn checked_cluster_id(cluster_id: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        flotilla_raft::is_valid_cluster_id(cluster_id),
        "--cluster-id: must be 1-63 characters of [a-z0-9.-], starting and ending with a letter \
         or digit"
    );
    Ok(cluster_id.to_string())
}

/// Creates a node certificate for `node_id` of `cluster_id`, valid for `hosts`, signed by the
/// CA in `signing`. Returns the certificate's and key's paths.
///
/// # Errors
/// Invalid arguments (named), an unreadable CA, an existing file.
fn node_certificate(
    node_id: u64,
    cluster_id: &str,
    hosts: Vec<String>,
    ca_file: &Path,
    signing: &Signing,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    anyhow::ensure!(node_id > 0, "--node-id: must be at least 1");
    let identity = PeerIdentity::Node {
        cluster_id: checked_cluster_id(cluster_id)?,
        node_id,
    };
    create_leaf(Leaf::Node { identity, hosts }, ca_file, signing)
}

/// Files of a development PKI made by [`development_pki`].
#[derive(Clone, Debug)]
pub struct DevelopmentPki {
    /// The CA certificate.
    pub ca_file: PathBuf,
    /// The CA key.
    pub ca_key_file: PathBuf,
    /// Where every file is.
    pub directory: PathBuf,
}

/// Makes (or reuses, when `directory/ca.pem` exists) a development CA in `directory`, for
/// scripts and tests that start nodes with TLS on.
///
/// # Errors
/// An unwritable directory.
pub fn development_pki(directory: &Path) -> anyhow::Result<DevelopmentPki> {
    let ca_file = directory.join("ca.pem");
    let ca_key_file = directory.join("ca-key.pem");
    if !ca_file.exists() {
        create_ca(directory, DEFAULT_CA_VALIDITY_DAYS)?;
    }
    Ok(DevelopmentPki {
        ca_file,
        ca_key_file,
        directory: directory.to_path_buf(),
    })
}

impl DevelopmentPki {
    fn signing(&self) -> Signing {
        Signing {
            ca_key_file: self.ca_key_file.clone(),
            directory: self.directory.clone(),
            days: DEFAULT_VALIDITY_DAYS,
        }
    }

    /// The node certificate and key of `node_id` (made if `node-<id>.pem` does not exist).
    ///
    /// # Errors
    /// As [`run`].
    pub fn node(
        &self,
        node_id: u64,
        cluster_id: &str,
        hosts: &[String],
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        let certificate = self.directory.join(format!("node-{node_id}.pem"));
        if certificate.exists() {
            return Ok((
                certificate,
                self.directory.join(format!("node-{node_id}-key.pem")),
            ));
        }
        node_certificate(
            node_id,
            cluster_id,
            hosts.to_vec(),
            &self.ca_file,
            &self.signing(),
        )
    }
}

/// A `[tls]` section for node `node_id` of `cluster_id` with a development CA and a node
/// certificate for `hosts`, made (or reused) in `directory` (for the quick start, benchmarks
/// and tests that start nodes in-process with TLS on).
///
/// # Errors
/// As [`run`].
pub fn development_node_tls(
    directory: &Path,
    cluster_id: &str,
    node_id: u64,
    hosts: &[String],
) -> anyhow::Result<crate::config::TlsSection> {
    let pki = development_pki(directory)?;
    let (certificate_file, key_file) = pki.node(node_id, cluster_id, hosts)?;
    Ok(crate::config::TlsSection {
        ca_file: pki.ca_file,
        certificate_file,
        key_file,
        insecure: false,
    })
}

/// Runs a `flotilla cert` command, printing the files written. `ca_file` is the global
/// `--ca-file` (the CA certificate that signs; default `ca.pem`).
///
/// # Errors
/// Invalid arguments (named), an unreadable CA, an existing file, an unwritable directory.
pub fn run(command: CertCommands, ca_file: Option<PathBuf>) -> anyhow::Result<()> {
    let ca_file = ca_file.unwrap_or_else(|| PathBuf::from("ca.pem"));
    let (certificate, key) = match command {
        CertCommands::Ca { directory, days } => create_ca(&directory, days)?,
        CertCommands::Node {
            node_id,
            cluster_id,
            host,
            signing,
        } => node_certificate(node_id, &cluster_id, host, &ca_file, &signing)?,
        CertCommands::Worker {
            worker_id,
            cluster_id,
            signing,
        } => {
            anyhow::ensure!(
                is_valid_worker_id(&worker_id),
                "--worker-id: must be 1-64 characters of [A-Za-z0-9._-]"
            );
            let identity = PeerIdentity::Worker {
                cluster_id: checked_cluster_id(&cluster_id)?,
                worker_id,
            };
            create_leaf(Leaf::Worker { identity }, &ca_file, &signing)?
        }
        CertCommands::Client { name, signing } => {
            anyhow::ensure!(
                is_valid_worker_id(&name),
                "--name: must be 1-64 characters of [A-Za-z0-9._-]"
            );
            create_leaf(Leaf::Client { name }, &ca_file, &signing)?
        }
    };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "certificate {}", certificate.display());
    let _ = writeln!(stdout, "key {} (mode 0600)", key.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn certificates_name_their_identity_and_keys_are_private() {
        let directory = tempfile::tempdir().unwrap();
        let pki = development_pki(directory.path()).unwrap();
        let (certificate, key) = pki
            .node(3, "prod", &["localhost".into(), "10.0.0.3".into()])
            .unwrap();
        let pem = std::fs::read(&certificate).unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        assert_eq!(
            crate::tls::certificate_identity(&parsed.contents),
            Some(PeerIdentity::Node {
                cluster_id: "prod".into(),
                node_id: 3
            })
        );
        for private in [&key, &pki.ca_key_file] {
            let mode = std::fs::metadata(private).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", private.display());
        }
        // Never overwritten.
        assert!(create_ca(directory.path(), 10).is_err());
        let worker = create_leaf(
            Leaf::Worker {
                identity: PeerIdentity::Worker {
                    cluster_id: "prod".into(),
                    worker_id: "w1".into(),
                },
            },
            &pki.ca_file,
            &pki.signing(),
        )
        .unwrap();
        let pem = std::fs::read(&worker.0).unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        assert_eq!(
            crate::tls::certificate_identity(&parsed.contents),
            Some(PeerIdentity::Worker {
                cluster_id: "prod".into(),
                worker_id: "w1".into()
            })
        );
    }
}
