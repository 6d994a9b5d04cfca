//! `worker.egress`: the operator's egress policy and the proxy's limits.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::policy::{Cidr, HostRule, normalize_host};

const MEBIBYTE: u64 = 1024 * 1024;

/// Smallest `max_header_bytes` (hyper's smallest read buffer).
pub const MIN_HEADER_BYTES: usize = 8 * 1024;

/// The egress settings of a worker (TOML `[worker.egress]`). Sizes are bytes, times
/// milliseconds. Every field has a default; unknown fields are rejected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// The hosts a run with `network: true` may reach through its proxy: `host:port`,
    /// `*.domain:port` (any host strictly below `domain`), `host:*` (any port); IPv6 literals in
    /// brackets. Default empty: nothing is allowed.
    pub allowed_hosts: Vec<String>,
    /// Address ranges (`10.0.0.0/8`, `fd00::/8`, or one address) that may be reached although
    /// they are not public (loopback, private, link-local, shared, metadata...): for internal
    /// mirrors and tests. The host must still be allowed. Default empty.
    pub allowed_private_networks: Vec<String>,
    /// Names the proxy resolves itself, without DNS: name → IP address (e.g.
    /// `"outside.test" = "10.213.0.2"`). The result is checked like any resolved address.
    /// Default empty.
    pub static_hosts: BTreeMap<String, String>,
    /// TCP port of the proxy on the run's loopback (`HTTP_PROXY=http://127.0.0.1:<port>`).
    /// Default 3128.
    pub proxy_port: u16,
    /// Most proxy requests (CONNECTs, allowed or not) one attempt may make; later ones are
    /// refused with 429. Default 1024.
    pub max_connections_per_run: u32,
    /// Most client connections to the proxy open at once per attempt; more are closed at once.
    /// Default 64.
    pub max_concurrent_connections: u32,
    /// Most bytes (both directions) through one tunnel; it is closed when they are reached.
    /// Default 1 GiB.
    pub max_bytes_per_connection: u64,
    /// Most bytes (both directions, all tunnels) per attempt. Default 4 GiB.
    pub max_bytes_per_run: u64,
    /// A tunnel with no byte in either direction for this long is closed. Default 60 s.
    pub idle_timeout_ms: u64,
    /// A tunnel is closed this long after it opened, busy or not. Default 30 minutes.
    pub connection_timeout_ms: u64,
    /// Time to open the TCP connection to the target. Default 10 s.
    pub connect_timeout_ms: u64,
    /// Time to resolve the target's name. Default 5 s.
    pub resolve_timeout_ms: u64,
    /// Time a client has to send its request head. Default 10 s.
    pub header_read_timeout_ms: u64,
    /// Largest request head (request line and headers); at least 8 KiB. Default 16 KiB.
    pub max_header_bytes: usize,
    /// Most connection records kept in an attempt's result; later ones are counted as dropped
    /// (still logged). Default 256.
    pub max_records_per_attempt: usize,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            allowed_hosts: Vec::new(),
            allowed_private_networks: Vec::new(),
            static_hosts: BTreeMap::new(),
            proxy_port: 3128,
            max_connections_per_run: 1024,
            max_concurrent_connections: 64,
            max_bytes_per_connection: 1024 * MEBIBYTE,
            max_bytes_per_run: 4 * 1024 * MEBIBYTE,
            idle_timeout_ms: 60_000,
            connection_timeout_ms: 30 * 60 * 1000,
            connect_timeout_ms: 10_000,
            resolve_timeout_ms: 5_000,
            header_read_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
            max_records_per_attempt: 256,
        }
    }
}

/// A value of [`EgressConfig`] that is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker.egress.{field}: {message}")]
pub struct EgressConfigError {
    /// The field, e.g. `allowed_hosts[2]`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> EgressConfigError {
    EgressConfigError {
        field: field.into(),
        message: message.into(),
    }
}

/// [`EgressConfig`] parsed and checked: what the proxy works with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressPolicy {
    /// The allowlist.
    pub rules: Vec<HostRule>,
    /// Ranges exempt from the address classification.
    pub exceptions: Vec<Cidr>,
    /// Normalized name → address.
    pub static_hosts: BTreeMap<String, IpAddr>,
    /// The limits and timeouts, as configured.
    pub config: EgressConfig,
}

impl EgressConfig {
    /// Parses and checks every field.
    ///
    /// Errors: [`EgressConfigError`] naming the first invalid field (an allowlist entry, a
    /// range, a static host, a zero limit or timeout, `max_header_bytes` below 8 KiB).
    pub fn policy(&self) -> Result<EgressPolicy, EgressConfigError> {
        let rules = self
            .allowed_hosts
            .iter()
            .enumerate()
            .map(|(index, text)| {
                HostRule::parse(text)
                    .map_err(|message| invalid(format!("allowed_hosts[{index}]"), message))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let exceptions = self
            .allowed_private_networks
            .iter()
            .enumerate()
            .map(|(index, text)| {
                Cidr::parse(text).map_err(|message| {
                    invalid(format!("allowed_private_networks[{index}]"), message)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut static_hosts = BTreeMap::new();
        for (name, address) in &self.static_hosts {
            let field = format!("static_hosts.{name:?}");
            let normalized = normalize_host(name).map_err(|message| invalid(&field, message))?;
            let address: IpAddr = address
                .parse()
                .map_err(|_| invalid(&field, format!("{address:?} is not an IP address")))?;
            static_hosts.insert(normalized, address.to_canonical());
        }
        let positive: [(&str, u64); 9] = [
            ("proxy_port", u64::from(self.proxy_port)),
            (
                "max_connections_per_run",
                u64::from(self.max_connections_per_run),
            ),
            (
                "max_concurrent_connections",
                u64::from(self.max_concurrent_connections),
            ),
            ("max_bytes_per_connection", self.max_bytes_per_connection),
            ("max_bytes_per_run", self.max_bytes_per_run),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("connection_timeout_ms", self.connection_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("resolve_timeout_ms", self.resolve_timeout_ms),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if self.header_read_timeout_ms == 0 {
            return Err(invalid("header_read_timeout_ms", "must be greater than 0"));
        }
        if self.max_header_bytes < MIN_HEADER_BYTES {
            return Err(invalid(
                "max_header_bytes",
                format!("must be at least {MIN_HEADER_BYTES}"),
            ));
        }
        Ok(EgressPolicy {
            rules,
            exceptions,
            static_hosts,
            config: self.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_allow_nothing() {
        let policy = EgressConfig::default().policy().unwrap();
        assert!(policy.rules.is_empty());
        assert!(policy.exceptions.is_empty());
    }

    #[test]
    fn invalid_values_name_their_field() {
        let cases: Vec<(EgressConfig, &str)> = vec![
            (
                EgressConfig {
                    allowed_hosts: vec!["crates.io:443".into(), "github.com".into()],
                    ..EgressConfig::default()
                },
                "allowed_hosts[1]",
            ),
            (
                EgressConfig {
                    allowed_private_networks: vec!["10.0.0.0/99".into()],
                    ..EgressConfig::default()
                },
                "allowed_private_networks[0]",
            ),
            (
                EgressConfig {
                    static_hosts: BTreeMap::from([("outside.test".into(), "nowhere".into())]),
                    ..EgressConfig::default()
                },
                "static_hosts.\"outside.test\"",
            ),
            (
                EgressConfig {
                    idle_timeout_ms: 0,
                    ..EgressConfig::default()
                },
                "idle_timeout_ms",
            ),
            (
                EgressConfig {
                    max_header_bytes: 100,
                    ..EgressConfig::default()
                },
                "max_header_bytes",
            ),
        ];
        for (config, field) in cases {
            let error = config.policy().unwrap_err();
            assert_eq!(error.field, field, "{error}");
            assert!(
                error
                    .to_string()
                    .starts_with(&format!("worker.egress.{field}:"))
            );
        }
    }

    #[test]
    fn deserializes_from_toml_shaped_json() {
        let config: EgressConfig = serde_json::from_str(
            r#"{"allowed_hosts": ["crates.io:443"], "static_hosts": {"Outside.Test": "10.1.2.3"}}"#,
        )
        .unwrap();
        let policy = config.policy().unwrap();
        assert_eq!(policy.rules.len(), 1);
        assert_eq!(
            policy.static_hosts.get("outside.test"),
            Some(&"10.1.2.3".parse::<IpAddr>().unwrap())
        );
        assert!(serde_json::from_str::<EgressConfig>(r#"{"allowed": []}"#).is_err());
    }
}
