//! The one address classifier of Flotilla: which IP addresses are not public (loopback,
//! private, link-local, cloud metadata, shared address space, multicast, documentation,
//! reserved, and IPv6 forms embedding those IPv4 addresses). Used by the execution policy
//! (`flotilla-scheduler`: literal internal addresses in repository URLs) and by the worker's
//! egress proxy (targets it must never connect to). Pure functions, no I/O, no dependencies.
//!
//! Ranges follow the IANA special-purpose address registries (RFC 6890 and its updates):
//! RFC 1918, RFC 4193, RFC 6598, RFC 3927, RFC 4291, RFC 5737, RFC 2544, RFC 6052 (NAT64),
//! RFC 3056 (6to4), RFC 4380 (Teredo), RFC 6666 (discard).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

/// Whether `address` is anything but [`AddressClass::Public`]: an address a repository fetch or
/// an egress connection must never reach without an operator's explicit exception.
pub fn is_internal_address(address: IpAddr) -> bool {
    classify_address(address) != AddressClass::Public
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn only_public_addresses_are_external() {
        for text in [
            "127.0.0.1",
            "169.254.169.254",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
        ] {
            assert!(is_internal_address(text.parse().unwrap()), "{text}");
        }
        for text in ["93.184.216.34", "2606:4700::1111"] {
            assert!(!is_internal_address(text.parse().unwrap()), "{text}");
        }
    }
}
