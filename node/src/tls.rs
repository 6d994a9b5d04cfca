//! Transport security of the node's gRPC port and of its outgoing connections: TLS with rustls
//! (through tonic), identities in certificate URI SANs, and the checks built on them.
//!
//! Identities (SPIFFE IDs; the trust domain is the cluster id):
//! - a node: `spiffe://<cluster_id>/node/<node_id>`;
//! - a worker: `spiffe://<cluster_id>/worker/<worker_id>`;
//! - a person or CI client: any other certificate of the CA, or none (they authenticate with
//!   tokens).
//!
//! The node's one gRPC port asks clients for a certificate of the configured CA but does not
//! require one at the handshake (a certificate of another CA fails the handshake). Per request:
//! - `RaftService` (every method) requires a node certificate of this cluster
//!   ([`raft_authorizer`]);
//! - `WorkerService` requests from a worker certificate must carry that certificate's
//!   worker id ([`check_worker_id`]).
//!
//! `flotilla cert` (module [`crate::cli::cert`]) writes such certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flotilla_raft::PeerAuthorizer;
use tonic::Status;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::TlsSection;

/// Scheme of the identities in certificate URI SANs.
pub const SPIFFE_SCHEME: &str = "spiffe://";

/// Largest PEM file read (CA, certificate or key), in bytes.
pub const MAX_PEM_FILE_BYTES: u64 = 1024 * 1024;

/// Time allowed for a TLS handshake on the node's port, in milliseconds.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// Who a certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A cluster node: `spiffe://<cluster_id>/node/<node_id>`.
    Node {
        /// Trust domain.
        cluster_id: String,
        /// Raft node id (at least 1).
        node_id: u64,
    },
    /// A worker: `spiffe://<cluster_id>/worker/<worker_id>`.
    Worker {
        /// Trust domain.
        cluster_id: String,
        /// Worker id (see `flotilla_scheduler::spec::is_valid_name`-like rules of worker ids).
        worker_id: String,
    },
}

impl PeerIdentity {
    /// The identity's trust domain.
    pub fn cluster_id(&self) -> &str {
        match self {
            PeerIdentity::Node { cluster_id, .. } | PeerIdentity::Worker { cluster_id, .. } => {
                cluster_id
            }
        }
    }

    /// The SPIFFE ID (`spiffe://...`).
    pub fn spiffe_id(&self) -> String {
        match self {
            PeerIdentity::Node {
                cluster_id,
                node_id,
            } => format!("{SPIFFE_SCHEME}{cluster_id}/node/{node_id}"),
            PeerIdentity::Worker {
                cluster_id,
                worker_id,
            } => format!("{SPIFFE_SCHEME}{cluster_id}/worker/{worker_id}"),
        }
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.spiffe_id())
    }
}

/// Whether `worker_id` is a valid worker id: 1-64 characters of `[A-Za-z0-9._-]`.
pub fn is_valid_worker_id(worker_id: &str) -> bool {
    !worker_id.is_empty()
        && worker_id.len() <= 64
        && worker_id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

/// Parses a SPIFFE ID of a node or a worker; `None` for anything else.
pub fn parse_spiffe_id(uri: &str) -> Option<PeerIdentity> {
    let rest = uri.strip_prefix(SPIFFE_SCHEME)?;
    let (cluster_id, path) = rest.split_once('/')?;
    if !flotilla_raft::is_valid_cluster_id(cluster_id) {
        return None;
    }
    let (kind, id) = path.split_once('/')?;
    match kind {
        "node" => {
            let node_id: u64 = id.parse().ok().filter(|id| *id > 0)?;
            (node_id.to_string() == id).then(|| PeerIdentity::Node {
                cluster_id: cluster_id.to_string(),
                node_id,
            })
        }
        "worker" if is_valid_worker_id(id) => Some(PeerIdentity::Worker {
            cluster_id: cluster_id.to_string(),
            worker_id: id.to_string(),
        }),
        _ => None,
    }
}

/// The identity in a DER certificate's URI SANs: the first SPIFFE ID of a node or worker.
/// `None` when the certificate does not parse or names no such identity.
pub fn certificate_identity(der: &[u8]) -> Option<PeerIdentity> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let names = certificate.subject_alternative_name().ok()??;
    names
        .value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => parse_spiffe_id(uri),
            _ => None,
        })
}

/// The identity of the client of `request`, from the leaf certificate it presented in the TLS
/// handshake; `None` over plaintext, without a client certificate, or for a certificate naming
/// no node or worker.
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Option<PeerIdentity> {
    let certificates = request.peer_certs()?;
    certificates
        .first()
        .and_then(|leaf| certificate_identity(leaf.as_ref()))
}

/// The check of every `RaftService` request with TLS on: the peer presented a node certificate
/// whose trust domain is `cluster_id`.
///
/// # Errors (of the returned function)
/// `PERMISSION_DENIED` naming what is missing: no certificate, a certificate that names no
/// node, a worker's certificate, or a node of another cluster.
pub fn raft_authorizer(cluster_id: &str) -> PeerAuthorizer {
    let cluster_id = cluster_id.to_string();
    Arc::new(
        move |request: &tonic::Request<flotilla_proto::raft::RaftMessage>| {
            let denied = |what: String| -> Result<(), Status> {
                Err(Status::permission_denied(format!(
                    "RaftService requires a node certificate of cluster {cluster_id:?} (URI SAN \
                 {SPIFFE_SCHEME}{cluster_id}/node/<node_id>); {what}"
                )))
            };
            let Some(certificates) = request.peer_certs() else {
                return denied("the peer presented no client certificate".into());
            };
            match certificates
                .first()
                .and_then(|leaf| certificate_identity(leaf.as_ref()))
            {
                Some(PeerIdentity::Node {
                    cluster_id: peer_cluster,
                    ..
                }) if peer_cluster == cluster_id => Ok(()),
                Some(identity @ PeerIdentity::Node { .. }) => denied(format!(
                    "the peer's certificate is {identity}, of another cluster"
                )),
                Some(identity @ PeerIdentity::Worker { .. }) => denied(format!(
                    "the peer presented a worker certificate ({identity})"
                )),
                None => denied("the peer's certificate names no node".into()),
            }
        },
    )
}

/// The certificate side of a `WorkerService` request naming `worker_id`: a worker certificate
/// must name that worker in this cluster; a node certificate of this cluster (a node's own
/// worker) and requests without a certificate (authenticated by token elsewhere) pass.
///
/// # Errors
/// `PERMISSION_DENIED` naming the certificate's identity and the requested worker id.
pub fn check_worker_id<T>(
    request: &tonic::Request<T>,
    cluster_id: &str,
    worker_id: &str,
) -> Result<(), Status> {
    match peer_identity(request) {
        None => Ok(()),
        Some(PeerIdentity::Node {
            cluster_id: peer_cluster,
            ..
        }) if peer_cluster == cluster_id => Ok(()),
        Some(PeerIdentity::Worker {
            cluster_id: peer_cluster,
            worker_id: peer_worker,
        }) if peer_cluster == cluster_id && peer_worker == worker_id => Ok(()),
        Some(identity) => {
            let shown: String = worker_id.chars().take(64).collect();
            Err(Status::permission_denied(format!(
                "worker_id: the client's certificate is {identity}; it may not act as worker \
                 {shown:?} of cluster {cluster_id:?}"
            )))
        }
    }
}

/// Why TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("{field}: cannot read {}: {message}", path.display())]
    Read {
        /// The setting naming the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A setting is missing or wrong.
    #[error("{field}: {message}")]
    Invalid {
        /// The setting.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Reads a PEM file of at most [`MAX_PEM_FILE_BYTES`].
fn read_pem(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_error = |message: String| TlsError::Read {
        field,
        path: path.to_path_buf(),
        message,
    };
    let metadata = std::fs::metadata(path).map_err(|error| read_error(error.to_string()))?;
    if metadata.len() > MAX_PEM_FILE_BYTES {
        return Err(read_error(format!(
            "{} bytes, more than {MAX_PEM_FILE_BYTES}",
            metadata.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|error| read_error(error.to_string()))?;
    if !bytes.windows(11).any(|window| window == b"-----BEGIN ") {
        return Err(read_error("not a PEM file".into()));
    }
    Ok(bytes)
}

/// The identity in the first certificate of a PEM file's bytes.
fn pem_identity(pem: &[u8]) -> Option<PeerIdentity> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    certificate_identity(&parsed.contents)
}

/// A node's loaded TLS material: the CA, its certificate and key (PEM).
#[derive(Clone)]
pub struct NodeTls {
    ca_pem: Vec<u8>,
    certificate_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("NodeTls").finish_non_exhaustive()
    }
}

/// The message of a node configured with neither TLS nor `tls.insecure`.
pub const TLS_REQUIRED_MESSAGE: &str = "TLS is not configured: set tls.ca_file, \
    tls.certificate_file and tls.key_file (see `flotilla cert`), or tls.insecure = true \
    (--insecure: plaintext, for local development only)";

impl NodeTls {
    /// Loads the node's TLS settings: `None` with `tls.insecure = true` (plaintext).
    /// The certificate must name `spiffe://<cluster_id>/node/<node_id>`.
    ///
    /// # Errors
    /// [`TlsError::Invalid`] naming the keys when TLS is neither configured nor explicitly
    /// off, when `insecure` is combined with files, or when the certificate names another
    /// identity; [`TlsError::Read`] for an unreadable file.
    pub fn load(
        section: &TlsSection,
        cluster_id: &str,
        node_id: u64,
    ) -> Result<Option<NodeTls>, TlsError> {
        let configured = [
            &section.ca_file,
            &section.certificate_file,
            &section.key_file,
        ]
        .iter()
        .any(|path| !path.as_os_str().is_empty());
        if section.insecure {
            if configured {
                return Err(TlsError::Invalid {
                    field: "tls.insecure",
                    message: "is true while tls.ca_file, tls.certificate_file or tls.key_file \
                              is set: choose one"
                        .into(),
                });
            }
            return Ok(None);
        }
        for (field, path) in [
            ("tls.ca_file", &section.ca_file),
            ("tls.certificate_file", &section.certificate_file),
            ("tls.key_file", &section.key_file),
        ] {
            if path.as_os_str().is_empty() {
                return Err(TlsError::Invalid {
                    field,
                    message: if configured {
                        "is required with the other tls.* files".into()
                    } else {
                        TLS_REQUIRED_MESSAGE.into()
                    },
                });
            }
        }
        let tls = NodeTls {
            ca_pem: read_pem("tls.ca_file", &section.ca_file)?,
            certificate_pem: read_pem("tls.certificate_file", &section.certificate_file)?,
            key_pem: read_pem("tls.key_file", &section.key_file)?,
        };
        let expected = PeerIdentity::Node {
            cluster_id: cluster_id.to_string(),
            node_id,
        };
        match pem_identity(&tls.certificate_pem) {
            Some(identity) if identity == expected => Ok(Some(tls)),
            Some(identity) => Err(TlsError::Invalid {
                field: "tls.certificate_file",
                message: format!("the certificate is {identity}; this node is {expected}"),
            }),
            None => Err(TlsError::Invalid {
                field: "tls.certificate_file",
                message: format!(
                    "the certificate names no node identity (a URI SAN {expected}); create one \
                     with `flotilla cert node`"
                ),
            }),
        }
    }

    /// The server side: this node's certificate; client certificates of the CA are asked for
    /// but optional at the handshake (a certificate of another CA fails it).
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.certificate_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(true)
            .timeout(std::time::Duration::from_millis(HANDSHAKE_TIMEOUT_MS))
    }

    /// The client side of node-to-node calls: the CA, and this node's certificate (mutual TLS).
    pub fn client_config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.certificate_pem, &self.key_pem))
    }
}

/// Client TLS from files: a CA, and optionally a certificate and key (for the CLI, workers).
///
/// # Errors
/// [`TlsError`] naming `fields` (CA, certificate, key) for an unreadable file or a certificate
/// given without its key.
pub fn client_config_from_files(
    fields: [&'static str; 3],
    ca_file: &Path,
    certificate_file: Option<&Path>,
    key_file: Option<&Path>,
) -> Result<ClientTlsConfig, TlsError> {
    let ca = read_pem(fields[0], ca_file)?;
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    match (certificate_file, key_file) {
        (Some(certificate), Some(key)) => {
            let certificate = read_pem(fields[1], certificate)?;
            let key = read_pem(fields[2], key)?;
            config = config.identity(Identity::from_pem(certificate, key));
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err(TlsError::Invalid {
                field: fields[2],
                message: format!("is required with {}", fields[1]),
            });
        }
        (None, Some(_)) => {
            return Err(TlsError::Invalid {
                field: fields[1],
                message: format!("is required with {}", fields[2]),
            });
        }
    }
    Ok(config)
}

/// Checks that a worker's certificate (`tls.certificate_file`, if set) names
/// `spiffe://<cluster_id>/worker/<worker_id>`.
///
/// # Errors
/// [`TlsError`] naming `tls.certificate_file` when it is unreadable or names another identity.
pub fn check_worker_certificate(
    section: &TlsSection,
    cluster_id: &str,
    worker_id: &str,
) -> Result<(), TlsError> {
    if section.certificate_file.as_os_str().is_empty() {
        return Ok(());
    }
    let pem = read_pem("tls.certificate_file", &section.certificate_file)?;
    let expected = PeerIdentity::Worker {
        cluster_id: cluster_id.to_string(),
        worker_id: worker_id.to_string(),
    };
    match pem_identity(&pem) {
        Some(identity) if identity == expected => Ok(()),
        Some(identity) => Err(TlsError::Invalid {
            field: "tls.certificate_file",
            message: format!("the certificate is {identity}; this worker is {expected}"),
        }),
        None => Err(TlsError::Invalid {
            field: "tls.certificate_file",
            message: format!("the certificate names no worker identity ({expected})"),
        }),
    }
}

/// `http(s)://host:port` for `address` (`host:port` or a URL): `https` with TLS, else `http`.
pub fn url(address: &str, tls: bool) -> String {
    let authority = address
        .split_once("://")
        .map_or(address, |(_, authority)| authority);
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{authority}")
}

/// A tonic endpoint for `address` (`host:port` or URL), over `tls` when given.
///
/// # Errors
/// A message naming the address when it is not a valid URI or the TLS settings are unusable.
pub fn endpoint(
    address: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<tonic::transport::Endpoint, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(url(address, tls.is_some()))
        .map_err(|error| format!("address {address:?}: {error}"))?;
    match tls {
        Some(tls) => endpoint
            .tls_config(tls.clone())
            .map_err(|error| format!("TLS settings for {address:?}: {error}")),
        None => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_of_nodes_and_workers_parse_and_others_do_not() {
        assert_eq!(
            parse_spiffe_id("spiffe://prod/node/3"),
            Some(PeerIdentity::Node {
                cluster_id: "prod".into(),
                node_id: 3
            })
        );
        assert_eq!(
            parse_spiffe_id("spiffe://prod.example/worker/w-1"),
            Some(PeerIdentity::Worker {
                cluster_id: "prod.example".into(),
                worker_id: "w-1".into()
            })
        );
        for bad in [
            "spiffe://prod/node/0",
            "spiffe://prod/node/03",
            "spiffe://prod/node/x",
            "spiffe://Prod/node/1",
            "spiffe://prod/worker/",
            "spiffe://prod/worker/a/b",
            "spiffe://prod/client/a",
            "https://prod/node/1",
            "spiffe:///node/1",
        ] {
            assert_eq!(parse_spiffe_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn urls_take_the_scheme_of_the_transport() {
        assert_eq!(url("127.0.0.1:7600", true), "https://127.0.0.1:7600");
        assert_eq!(url("http://127.0.0.1:7600", true), "https://127.0.0.1:7600");
        assert_eq!(url("https://a:1", false), "http://a:1");
    }
}
