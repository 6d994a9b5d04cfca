//! Egress of sandboxed runs: a sandbox never shares the host's network.
//!
//! - `network: false`: bubblewrap gives the sandbox an empty network namespace (loopback only).
//! - `network: true`: the worker creates a network namespace for the attempt
//!   ([`namespace`]) with only loopback, and serves an HTTP `CONNECT` proxy ([`proxy`]) on
//!   `127.0.0.1:<proxy_port>` inside it from its own runtime; bubblewrap is started inside that
//!   namespace (`setns` before `exec`, see [`crate::sandbox`]), and the agent gets
//!   `HTTP_PROXY`/`HTTPS_PROXY`/`http_proxy`/`https_proxy` pointing at the proxy and an empty
//!   `NO_PROXY`. The only way out is the proxy, which allows the operator's host allowlist,
//!   resolves names itself, refuses non-public addresses ([`policy`]), connects to exactly the
//!   address it checked, bounds connections, bytes and time ([`config`]), and records every
//!   request ([`proxy::ConnectionRecord`], in the attempt's result and the log).

pub mod config;
pub mod namespace;
pub mod policy;
pub mod proxy;

use std::os::fd::OwnedFd;
use std::sync::Arc;

pub use config::{EgressConfig, EgressConfigError, EgressPolicy};
pub use proxy::{ConnectionRecord, EgressError, EgressProxy, EgressReport};

/// What a sandbox needs to use an attempt's proxy: the namespace to join and the proxy's URL
/// inside it (`http://127.0.0.1:<port>`).
#[derive(Clone, Debug)]
pub struct EgressAttachment {
    /// The attempt's network namespace (a descriptor for `setns(2)`).
    pub namespace: Arc<OwnedFd>,
    /// The proxy URL for `HTTP_PROXY` and friends.
    pub proxy_url: String,
}

impl PartialEq for EgressAttachment {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.namespace, &other.namespace) && self.proxy_url == other.proxy_url
    }
}

impl Eq for EgressAttachment {}

impl EgressAttachment {
    /// The proxy variables the sandbox gets: `HTTP_PROXY`, `HTTPS_PROXY`, `http_proxy`,
    /// `https_proxy` set to the proxy URL, and `NO_PROXY`/`no_proxy` empty (nothing bypasses
    /// it; there is nothing else to reach).
    pub fn environment(&self) -> Vec<(String, String)> {
        let mut variables: Vec<(String, String)> =
            ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]
                .iter()
                .map(|name| ((*name).to_owned(), self.proxy_url.clone()))
                .collect();
        variables.push(("NO_PROXY".to_owned(), String::new()));
        variables.push(("no_proxy".to_owned(), String::new()));
        variables
    }
}
