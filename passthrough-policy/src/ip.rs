//! Address parsing with Go's `net.ParseIP` / `net.ParseCIDR` semantics (what Kuma's validator
//! uses through govalidator), plus the canonical forms the rest of the policy layer works with.
//!
//! Go's rules (`net/ip.go`, `net/netip`), which Kuma's validator applies:
//! - IPv4: exactly four decimal octets, each 0–255, no leading zeros (`010.0.0.1` is rejected);
//! - IPv6: RFC 4291 text forms including an embedded dotted IPv4 tail (`::ffff:1.2.3.4`);
//! - no zones (`fe80::1%eth0`), no brackets, no surrounding whitespace;
//! - a CIDR is `ADDR/LEN` with a decimal length (leading zeros allowed, Go's `dtoi`) no larger than
//!   the address family's width; host bits may be set.
//!
//! Rust's `std::net` parsers already implement the same grammar for IPv4 (leading zeros
//! rejected) and IPv6 (embedded IPv4 tail, no zones), so they are used here with the CIDR
//! prefix parsed by hand.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Go `net.ParseIP(s) != nil`.
pub fn parse_go_ip(s: &str) -> Option<IpAddr> {
    if s.contains(':') {
        s.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    } else {
        s.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
    }
}

/// Go `net.ParseCIDR(s)`: the address as written and the prefix length.
pub fn parse_go_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.split_once('/')?;
    let ip = parse_go_ip(addr)?;
    // Go's dtoi: one or more ASCII digits, nothing else; leading zeros are fine.
    if len.is_empty() || len.len() > 8 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = len.parse().ok()?;
    // Go's netip keeps `::ffff:a.b.c.d` as an IPv6 address, so its width is 128.
    let width = if ip.is_ipv4() { 32 } else { 128 };
    if n > width {
        return None;
    }
    Some((ip, n as u8))
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), if it is one.
pub fn v4_mapped(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    ip.to_ipv4_mapped()
}

/// Canonical form of a destination: IPv4-mapped IPv6 becomes IPv4, everything else unchanged.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v4_mapped(v6).map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The network of an address and prefix, host bits cleared, IPv4-mapped IPv6 networks with a
/// prefix of at least 96 turned into the equivalent IPv4 network.
pub fn canonical_net(ip: IpAddr, prefix: u8) -> Option<IpNet> {
    match ip {
        IpAddr::V4(v4) => Ipv4Net::new(v4, prefix).ok().map(|n| IpNet::V4(n.trunc())),
        IpAddr::V6(v6) => {
            let net = Ipv6Net::new(v6, prefix).ok()?.trunc();
            if prefix >= 96
                && let Some(v4) = v4_mapped(net.network())
            {
                return Ipv4Net::new(v4, prefix - 96)
                    .ok()
                    .map(|n| IpNet::V4(n.trunc()));
            }
            Some(IpNet::V6(net))
        }
    }
}

/// The canonical `/32` or `/128` network of one address (IPv4-mapped → IPv4).
pub fn host_net(ip: IpAddr) -> IpNet {
    match canonical_ip(ip) {
        IpAddr::V4(v4) => IpNet::V4(Ipv4Net::from(v4)),
        IpAddr::V6(v6) => IpNet::V6(Ipv6Net::from(v6)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_parse_ip() {
        for ok in [
            "1.2.3.4",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "0:0:0:0:0:0:0:1",
            "::ffff:1.2.3.4",
            "::FFFF:0102:0304",
            "2001:db8::1",
            "::",
            "1:2:3:4:5:6:7::",
            "::1.2.3.4",
        ] {
            assert!(parse_go_ip(ok).is_some(), "{ok}");
        }
        for bad in [
            "",
            "010.0.0.1",
            "1.2.3",
            "1.2.3.4.5",
            "256.0.0.1",
            "fe80::1%eth0",
            "1.2.3.4/32",
            " 1.2.3.4",
            "[::1]",
            "example.com",
            "1:2:3:4:5:6:7:8::",
            "12345::1",
            "::ffff:01.2.3.4",
        ] {
            assert!(parse_go_ip(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn go_parse_cidr() {
        assert_eq!(
            parse_go_cidr("1.2.3.4/24"),
            Some(("1.2.3.4".parse().unwrap(), 24))
        );
        assert_eq!(
            parse_go_cidr("1.2.3.4/024"),
            Some(("1.2.3.4".parse().unwrap(), 24))
        );
        assert!(parse_go_cidr("::ffff:1.2.3.0/120").is_some());
        assert!(parse_go_cidr("::/0").is_some());
        for bad in [
            "1.2.3.4",
            "1.2.3.4/33",
            "1.2.3.4/",
            "1.2.3.4/+1",
            "1.2.3.4/-1",
            "::/129",
            "fe80::%1/64",
            "a/8",
            "1.2.3.4/8/8",
        ] {
            assert!(parse_go_cidr(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn canonical() {
        let (ip, p) = parse_go_cidr("1.2.3.4/24").unwrap();
        assert_eq!(canonical_net(ip, p).unwrap().to_string(), "1.2.3.0/24");
        let (ip, p) = parse_go_cidr("::ffff:1.2.3.4/120").unwrap();
        assert_eq!(canonical_net(ip, p).unwrap().to_string(), "1.2.3.0/24");
        let (ip, p) = parse_go_cidr("::ffff:0:0/96").unwrap();
        assert_eq!(canonical_net(ip, p).unwrap().to_string(), "0.0.0.0/0");
        let (ip, p) = parse_go_cidr("::ffff:0:0/80").unwrap();
        assert_eq!(canonical_net(ip, p).unwrap().to_string(), "::/80");
        let (ip, p) = parse_go_cidr("2001:db8::1/32").unwrap();
        assert_eq!(canonical_net(ip, p).unwrap().to_string(), "2001:db8::/32");
        assert_eq!(
            host_net("::ffff:192.0.2.1".parse().unwrap()).to_string(),
            "192.0.2.1/32"
        );
        assert_eq!(host_net("::1".parse().unwrap()).to_string(), "::1/128");
    }
}
