//! The egress decisions as pure functions: which `host:port` the operator allows
//! ([`HostRule`], [`host_allowed`]), which addresses are never reached ([`classify_address`]),
//! and the exceptions the operator grants ([`Cidr`], [`check_addresses`]). No I/O: everything
//! here is tested with tables of inputs.

use std::net::{IpAddr, Ipv4Addr};

/// Longest host name accepted (RFC 1035: 253 characters without the trailing dot).
pub const HOST_MAX_CHARS: usize = 253;

/// The host part of a [`HostRule`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    /// Exactly this host (lower case, no trailing dot), e.g. `crates.io` or `10.0.0.5`.
    Exact(String),
    /// Any host strictly below this domain: `*.github.com` is stored as `.github.com` and
    /// matches `api.github.com` and `a.b.github.com`, not `github.com`.
    Suffix(String),
}

/// One entry of `worker.egress.allowed_hosts`: `host:port`, `*.domain:port`, with `*` as the
/// port for any port, and IPv6 literals in brackets (`[2001:db8::1]:443`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRule {
    /// Which hosts.
    pub host: HostPattern,
    /// Which port; `None` for any.
    pub port: Option<u16>,
}

/// Lower-cases `host`, removes IPv6 brackets and one trailing dot, and checks it is a plausible
/// host name (letters, digits, `-`, `_`, `.`, at most [`HOST_MAX_CHARS`], no empty label) or an
/// IP literal.
///
/// Errors: a message saying what is wrong (for a 400 answer or a configuration error).
pub fn normalize_host(host: &str) -> Result<String, String> {
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(address) = unbracketed.parse::<IpAddr>() {
        return Ok(address.to_string());
    }
    let lower = unbracketed.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    if name.is_empty() {
        return Err("empty host".to_owned());
    }
    if name.len() > HOST_MAX_CHARS {
        return Err(format!("host longer than {HOST_MAX_CHARS} characters"));
    }
    if !name
        .chars()
        .all(|character| character.is_ascii_alphanumeric() || matches!(character, '-' | '_' | '.'))
    {
        return Err("host has characters other than letters, digits, '-', '_' and '.'".to_owned());
    }
    if name.split('.').any(str::is_empty) {
        return Err("host has an empty label".to_owned());
    }
    Ok(name.to_owned())
}

/// Splits `host:port` (the host may be a bracketed IPv6 literal) at its last `:`.
fn split_host_port(text: &str) -> Option<(&str, &str)> {
    if text.starts_with('[') {
        let end = text.find(']')?;
        let rest = text.get(end + 1..)?;
        Some((text.get(..=end)?, rest.strip_prefix(':')?))
    } else {
        text.rsplit_once(':')
    }
}

impl HostRule {
    /// Parses one allowlist entry (see [`HostRule`]).
    ///
    /// Errors: a message naming what is wrong (no port, bad port, bad host, a `*` anywhere but
    /// a leading `*.`).
    pub fn parse(text: &str) -> Result<HostRule, String> {
        let Some((host, port)) = split_host_port(text.trim()) else {
            return Err(format!(
                "{text:?} has no port (expected host:port, *.domain:port or host:*)"
            ));
        };
        let port = if port == "*" {
            None
        } else {
            match port.parse::<u16>() {
                Ok(port) if port > 0 => Some(port),
                _ => return Err(format!("{text:?} has an invalid port {port:?}")),
            }
        };
        let host = if let Some(domain) = host.strip_prefix("*.") {
            let domain = normalize_host(domain).map_err(|error| format!("{text:?}: {error}"))?;
            if domain.parse::<IpAddr>().is_ok() {
                return Err(format!(
                    "{text:?}: a wildcard needs a domain, not an address"
                ));
            }
            HostPattern::Suffix(format!(".{domain}"))
        } else {
            HostPattern::Exact(normalize_host(host).map_err(|error| format!("{text:?}: {error}"))?)
        };
        if matches!(&host, HostPattern::Exact(name) | HostPattern::Suffix(name) if name.contains('*'))
        {
            return Err(format!("{text:?}: '*' is only allowed as a leading \"*.\""));
        }
        Ok(HostRule { host, port })
    }

    /// Whether this rule allows `host` (already [`normalize_host`]d) on `port`.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|allowed| allowed != port) {
            return false;
        }
        match &self.host {
            HostPattern::Exact(name) => name == host,
            HostPattern::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }
}

/// Whether any of `rules` allows `host` (already [`normalize_host`]d) on `port`. An empty list
/// allows nothing.
pub fn host_allowed(rules: &[HostRule], host: &str, port: u16) -> bool {
    rules.iter().any(|rule| rule.matches(host, port))
}

pub use flotilla_address::{AddressClass, classify_address};

/// An address range `address/prefix_length` (an operator exception in
/// `worker.egress.allowed_private_networks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix_length: u8,
}

impl Cidr {
    /// Parses `10.0.0.0/8`, `fd00::/8`, or a single address (a /32 or /128).
    ///
    /// Errors: a message when the address or prefix length is invalid, or the address has bits
    /// set beyond the prefix.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text.trim(), None),
        };
        let network: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an address or address/prefix"))?;
        let network = network.to_canonical();
        let maximum: u8 = if network.is_ipv4() { 32 } else { 128 };
        let prefix_length = match prefix {
            None => maximum,
            Some(prefix) => match prefix.parse::<u8>() {
                Ok(length) if length <= maximum => length,
                _ => return Err(format!("{text:?} has an invalid prefix length")),
            },
        };
        let cidr = Cidr {
            network,
            prefix_length,
        };
        if cidr.masked(network) != bits(network) {
            return Err(format!("{text:?} has address bits set beyond the prefix"));
        }
        Ok(cidr)
    }

    fn masked(&self, address: IpAddr) -> u128 {
        let width: u32 = if address.is_ipv4() { 32 } else { 128 };
        let length = u32::from(self.prefix_length);
        if length == 0 {
            return 0;
        }
        let mask = (u128::MAX << (width - length)) & (u128::MAX >> (128 - width));
        bits(address) & mask
    }

    /// Whether `address` (IPv4-mapped IPv6 addresses count as their IPv4 form) is in the range.
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        if address.is_ipv4() != self.network.is_ipv4() {
            return false;
        }
        self.masked(address) == self.masked(self.network)
    }
}

fn bits(address: IpAddr) -> u128 {
    match address {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The egress decision for the addresses a name resolved to: `Ok` when every one is
/// [`AddressClass::Public`] or covered by one of `exceptions`; otherwise the first refused
/// address with its class. (All addresses are checked, not just the one connected to, so a
/// name cannot mix a public address with an internal one.) An empty list is refused as
/// [`AddressClass::Unspecified`].
pub fn check_addresses(
    addresses: &[IpAddr],
    exceptions: &[Cidr],
) -> Result<(), (IpAddr, AddressClass)> {
    if addresses.is_empty() {
        return Err((IpAddr::V4(Ipv4Addr::UNSPECIFIED), AddressClass::Unspecified));
    }
    for &address in addresses {
        let class = classify_address(address);
        if class != AddressClass::Public
            && !exceptions
                .iter()
                .any(|exception| exception.contains(address))
        {
            return Err((address, class));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_refuse_malformed_entries() {
        let good: &[(&str, HostPattern, Option<u16>)] = &[
            (
                "crates.io:443",
                HostPattern::Exact("crates.io".into()),
                Some(443),
            ),
            (
                "Crates.IO.:443",
                HostPattern::Exact("crates.io".into()),
                Some(443),
            ),
            (
                "*.github.com:443",
                HostPattern::Suffix(".github.com".into()),
                Some(443),
            ),
            (
                "mirror.internal:*",
                HostPattern::Exact("mirror.internal".into()),
                None,
            ),
            (
                "10.0.0.5:8080",
                HostPattern::Exact("10.0.0.5".into()),
                Some(8080),
            ),
            (
                "[2001:DB8::1]:443",
                HostPattern::Exact("2001:db8::1".into()),
                Some(443),
            ),
        ];
        for (text, host, port) in good {
            let rule = HostRule::parse(text).unwrap_or_else(|error| panic!("{text}: {error}"));
            assert_eq!(&rule.host, host, "{text}");
            assert_eq!(&rule.port, port, "{text}");
        }
        for bad in [
            "crates.io",
            "crates.io:",
            "crates.io:0",
            "crates.io:65536",
            "crates.io:https",
            ":443",
            "*:443",
            "a.*.com:443",
            "*.10.0.0.1:443",
            "exa mple.com:443",
            "a..b:443",
            "[::1:443",
        ] {
            assert!(HostRule::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn allowlist_matches_exact_hosts_suffixes_and_ports() {
        let rules: Vec<HostRule> = ["crates.io:443", "*.github.com:443", "mirror.internal:*"]
            .iter()
            .map(|text| HostRule::parse(text).unwrap())
            .collect();
        let cases: &[(&str, u16, bool)] = &[
            ("crates.io", 443, true),
            ("crates.io", 80, false),
            ("static.crates.io", 443, false),
            ("evilcrates.io", 443, false),
            ("api.github.com", 443, true),
            ("a.b.github.com", 443, true),
            ("github.com", 443, false),
            ("evilgithub.com", 443, false),
            ("github.com.evil.test", 443, false),
            ("api.github.com", 22, false),
            ("mirror.internal", 1, true),
            ("mirror.internal", 65535, true),
            ("x.mirror.internal", 443, false),
        ];
        for &(host, port, expected) in cases {
            assert_eq!(host_allowed(&rules, host, port), expected, "{host}:{port}");
        }
        assert!(!host_allowed(&[], "crates.io", 443));
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("API.GitHub.com.").unwrap(), "api.github.com");
        assert_eq!(
            normalize_host("[::FFFF:127.0.0.1]").unwrap(),
            "::ffff:127.0.0.1"
        );
        for bad in ["", ".", "a..b", "a b", "a/b", "a@b", &"a".repeat(254)] {
            assert!(normalize_host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cidrs_parse_and_contain() {
        let cases: &[(&str, &str, bool)] = &[
            ("10.213.0.0/16", "10.213.4.2", true),
            ("10.213.0.0/16", "10.214.0.1", false),
            ("10.213.0.0/16", "::ffff:10.213.4.2", true),
            ("10.0.0.5", "10.0.0.5", true),
            ("10.0.0.5", "10.0.0.6", false),
            ("0.0.0.0/0", "127.0.0.1", true),
            ("0.0.0.0/0", "::1", false),
            ("fd00::/8", "fd12::1", true),
            ("fd00::/8", "fe80::1", false),
            ("::/0", "2001:db8::1", true),
            ("192.168.1.0/24", "192.168.1.255", true),
            ("192.168.1.0/24", "192.168.2.0", false),
        ];
        for &(cidr, address, expected) in cases {
            let parsed = Cidr::parse(cidr).unwrap_or_else(|error| panic!("{cidr}: {error}"));
            assert_eq!(
                parsed.contains(address.parse().unwrap()),
                expected,
                "{cidr} contains {address}"
            );
        }
        for bad in [
            "10.0.0.0/33",
            "10.0.0.1/8",
            "x/8",
            "fd00::/129",
            "10.0.0.0/-1",
            "",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn resolved_addresses_are_checked_all_together() {
        let exceptions = [Cidr::parse("10.213.0.0/16").unwrap()];
        let public: IpAddr = "1.1.1.1".parse().unwrap();
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let excepted: IpAddr = "10.213.1.2".parse().unwrap();
        let private: IpAddr = "10.1.1.1".parse().unwrap();
        assert_eq!(check_addresses(&[public], &exceptions), Ok(()));
        assert_eq!(check_addresses(&[excepted, public], &exceptions), Ok(()));
        assert_eq!(
            check_addresses(&[public, loopback], &exceptions),
            Err((loopback, AddressClass::Loopback))
        );
        assert_eq!(
            check_addresses(&[private], &exceptions),
            Err((private, AddressClass::Private))
        );
        assert!(check_addresses(&[], &exceptions).is_err());
    }
}
