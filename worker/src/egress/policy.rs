//! The egress decisions as pure functions: which `host:port` the operator allows
//! ([`HostRule`], [`host_allowed`]), which addresses are never reached ([`classify_address`]),
//! and the exceptions the operator grants ([`Cidr`], [`check_addresses`]). No I/O: everything
//! here is tested with tables of inputs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

/// What kind of address a target is. Everything but [`AddressClass::Public`] is refused unless
/// an operator exception ([`Cidr`]) covers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressClass {
    /// A globally routable address.
    Public,
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918 (`10/8`, `172.16/12`, `192.168/16`) and IPv6 unique local `fc00::/7`.
    Private,
    /// Cloud metadata services: `169.254.169.254`, `fd00:ec2::254`.
    Metadata,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// Carrier-grade NAT, `100.64.0.0/10` (RFC 6598).
    SharedAddressSpace,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// Documentation and benchmarking ranges (`192.0.2/24`, `198.51.100/24`, `203.0.113/24`,
    /// `198.18/15`, `2001:db8::/32`).
    Documentation,
    /// Other special-purpose ranges: `192.0.0/24`, `240/4`, IPv6 site-local `fec0::/10`,
    /// IPv4-compatible `::/96`, Teredo `2001::/32`, discard `100::/64`.
    Reserved,
}

impl AddressClass {
    /// The class's name as recorded in a denial, e.g. `loopback`, `link_local`.
    pub fn as_str(self) -> &'static str {
        match self {
            AddressClass::Public => "public",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Loopback => "loopback",
            AddressClass::Private => "private",
            AddressClass::Metadata => "metadata",
            AddressClass::LinkLocal => "link_local",
            AddressClass::SharedAddressSpace => "shared_address_space",
            AddressClass::Multicast => "multicast",
            AddressClass::Broadcast => "broadcast",
            AddressClass::Documentation => "documentation",
            AddressClass::Reserved => "reserved",
        }
    }
}

fn classify_ipv4(address: Ipv4Addr) -> AddressClass {
    let [a, b, c, _] = address.octets();
    if address == Ipv4Addr::new(169, 254, 169, 254) {
        AddressClass::Metadata
    } else if a == 0 {
        AddressClass::Unspecified
    } else if a == 127 {
        AddressClass::Loopback
    } else if a == 10 || (a == 172 && (16..=31).contains(&b)) || (a == 192 && b == 168) {
        AddressClass::Private
    } else if a == 169 && b == 254 {
        AddressClass::LinkLocal
    } else if a == 100 && (64..=127).contains(&b) {
        AddressClass::SharedAddressSpace
    } else if address.is_broadcast() {
        AddressClass::Broadcast
    } else if (224..=239).contains(&a) {
        AddressClass::Multicast
    } else if (a == 192 && b == 0 && c == 2)
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || (a == 198 && (18..=19).contains(&b))
    {
        AddressClass::Documentation
    } else if (a == 192 && b == 0 && c == 0) || a >= 240 {
        AddressClass::Reserved
    } else {
        AddressClass::Public
    }
}

/// The class of `address`. IPv6 forms that embed an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`,
/// NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are classified by that IPv4 address.
pub fn classify_address(address: IpAddr) -> AddressClass {
    match address {
        IpAddr::V4(v4) => classify_ipv4(v4),
        IpAddr::V6(v6) => classify_ipv6(v6),
    }
}

fn classify_ipv6(address: Ipv6Addr) -> AddressClass {
    if let Some(v4) = address.to_ipv4_mapped() {
        return classify_ipv4(v4);
    }
    let segments = address.segments();
    let embedded_low = || {
        let octets = address.octets();
        Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15])
    };
    if address.is_unspecified() {
        AddressClass::Unspecified
    } else if address.is_loopback() {
        AddressClass::Loopback
    } else if segments[..6] == [0, 0, 0, 0, 0, 0] {
        // IPv4-compatible (deprecated): never a real destination.
        AddressClass::Reserved
    } else if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        classify_ipv4(embedded_low())
    } else if segments[0] == 0x2002 {
        let octets = address.octets();
        classify_ipv4(Ipv4Addr::new(octets[2], octets[3], octets[4], octets[5]))
    } else if address == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x254) {
        AddressClass::Metadata
    } else if segments[0] & 0xfe00 == 0xfc00 {
        AddressClass::Private
    } else if segments[0] & 0xffc0 == 0xfe80 {
        AddressClass::LinkLocal
    } else if segments[0] & 0xffc0 == 0xfec0 {
        AddressClass::Reserved
    } else if segments[0] & 0xff00 == 0xff00 {
        AddressClass::Multicast
    } else if segments[0] == 0x2001 && segments[1] == 0x0db8 {
        AddressClass::Documentation
    } else if (segments[0] == 0x2001 && segments[1] == 0) || segments[..4] == [0x100, 0, 0, 0] {
        AddressClass::Reserved
    } else {
        AddressClass::Public
    }
}

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
    fn addresses_are_classified() {
        let cases: &[(&str, AddressClass)] = &[
            ("93.184.216.34", AddressClass::Public),
            ("1.1.1.1", AddressClass::Public),
            ("0.0.0.0", AddressClass::Unspecified),
            ("0.1.2.3", AddressClass::Unspecified),
            ("127.0.0.1", AddressClass::Loopback),
            ("127.255.0.9", AddressClass::Loopback),
            ("10.1.2.3", AddressClass::Private),
            ("172.16.0.1", AddressClass::Private),
            ("172.31.255.255", AddressClass::Private),
            ("172.32.0.1", AddressClass::Public),
            ("192.168.1.1", AddressClass::Private),
            ("169.254.169.254", AddressClass::Metadata),
            ("169.254.1.1", AddressClass::LinkLocal),
            ("100.64.0.1", AddressClass::SharedAddressSpace),
            ("100.127.255.255", AddressClass::SharedAddressSpace),
            ("100.128.0.1", AddressClass::Public),
            ("224.0.0.1", AddressClass::Multicast),
            ("239.255.255.250", AddressClass::Multicast),
            ("255.255.255.255", AddressClass::Broadcast),
            ("240.0.0.1", AddressClass::Reserved),
            ("192.0.0.8", AddressClass::Reserved),
            ("192.0.2.1", AddressClass::Documentation),
            ("198.18.0.1", AddressClass::Documentation),
            ("2606:4700::1111", AddressClass::Public),
            ("::", AddressClass::Unspecified),
            ("::1", AddressClass::Loopback),
            ("::ffff:127.0.0.1", AddressClass::Loopback),
            ("::ffff:10.0.0.1", AddressClass::Private),
            ("::ffff:169.254.169.254", AddressClass::Metadata),
            ("::ffff:8.8.8.8", AddressClass::Public),
            ("::127.0.0.1", AddressClass::Reserved),
            ("64:ff9b::7f00:1", AddressClass::Loopback),
            ("64:ff9b::a9fe:a9fe", AddressClass::Metadata),
            ("2002:7f00:1::", AddressClass::Loopback),
            ("2002:0808:0808::", AddressClass::Public),
            ("fd00:ec2::254", AddressClass::Metadata),
            ("fc00::1", AddressClass::Private),
            ("fd12:3456::1", AddressClass::Private),
            ("fe80::1", AddressClass::LinkLocal),
            ("fec0::1", AddressClass::Reserved),
            ("ff02::1", AddressClass::Multicast),
            ("2001:db8::1", AddressClass::Documentation),
            ("2001:0:4136:e378::1", AddressClass::Reserved),
            ("100::1", AddressClass::Reserved),
        ];
        for &(text, expected) in cases {
            let address: IpAddr = text.parse().unwrap();
            assert_eq!(classify_address(address), expected, "{text}");
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
