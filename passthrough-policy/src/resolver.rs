//! DNS resolvers: the one type that `run --resolver`, `explain --resolver`, the kernel plan and
//! the proxy's DNS client all use, parsed once.
//!
//! A resolver is an address and a port (`IP`, `IP:PORT`, `[IPv6]:PORT`; 53 when no port is
//! given). UDP to exactly that address and port is DNS, allowed in every mode (docs/decisions.md):
//! the decision core, the kernel plan (one entry per resolver at its port) and the proxy's
//! name lookups all see the same pairs.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

/// A DNS resolver: address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resolver(SocketAddr);

/// The port of a resolver given without one.
pub const DNS_PORT: u16 = 53;

/// Why a `--resolver` value is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolverError {
    /// Neither `IP` nor `IP:PORT` (`[IPv6]:PORT`).
    #[error("resolver {0:?} is not an IP or IP:PORT ([IPv6]:PORT)")]
    Syntax(String),
    /// Port 0 is no port a resolver listens on.
    #[error("resolver {0:?}: port 0 is not a port")]
    PortZero(String),
}

impl Resolver {
    /// The resolver at `ip`, port `port`.
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Resolver(SocketAddr::new(ip, port))
    }

    /// Its address.
    pub fn ip(&self) -> IpAddr {
        self.0.ip()
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.0.port()
    }

    /// Address and port as a socket address (for a DNS client).
    pub fn socket_addr(&self) -> SocketAddr {
        self.0
    }

    /// The `nameserver` lines of a `resolv.conf` (port 53; a `%zone` suffix is dropped; lines
    /// that do not parse are skipped, as the C library skips them).
    pub fn from_resolv_conf(text: &str) -> Vec<Resolver> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|rest| rest.trim().split('%').next()?.parse().ok())
            .map(|ip| Resolver::new(ip, DNS_PORT))
            .collect()
    }
}

impl FromStr for Resolver {
    type Err = ResolverError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let r = match text.parse::<SocketAddr>() {
            Ok(a) => Resolver(a),
            Err(_) => {
                // A bare address, IPv6 with or without brackets.
                let bare = text
                    .strip_prefix('[')
                    .and_then(|t| t.strip_suffix(']'))
                    .unwrap_or(text);
                let ip = bare
                    .parse::<IpAddr>()
                    .map_err(|_| ResolverError::Syntax(s.to_string()))?;
                Resolver::new(ip, DNS_PORT)
            }
        };
        if r.port() == 0 {
            return Err(ResolverError::PortZero(s.to_string()));
        }
        Ok(r)
    }
}

impl fmt::Display for Resolver {
    /// `ip:port` (`[v6]:port`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<SocketAddr> for Resolver {
    fn from(a: SocketAddr) -> Self {
        Resolver(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        let r = |s: &str| s.parse::<Resolver>().map(|r| r.to_string());
        assert_eq!(r("10.96.0.10").unwrap(), "10.96.0.10:53");
        assert_eq!(r("198.51.100.53:5353").unwrap(), "198.51.100.53:5353");
        assert_eq!(r("2001:db8::53").unwrap(), "[2001:db8::53]:53");
        assert_eq!(r("[2001:db8::53]").unwrap(), "[2001:db8::53]:53");
        assert_eq!(r("[2001:db8::53]:5353").unwrap(), "[2001:db8::53]:5353");
        assert_eq!(r(" ::ffff:10.0.0.1 ").unwrap(), "[::ffff:10.0.0.1]:53");
        assert!(matches!(r("dns.example"), Err(ResolverError::Syntax(_))));
        assert!(matches!(r("10.0.0.1:"), Err(ResolverError::Syntax(_))));
        assert!(matches!(r("10.0.0.1:99999"), Err(ResolverError::Syntax(_))));
        assert!(matches!(r("10.0.0.1:0"), Err(ResolverError::PortZero(_))));
    }

    #[test]
    fn resolv_conf() {
        let text = "# comment\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\nsearch x\nnameserver bogus\n";
        assert_eq!(
            Resolver::from_resolv_conf(text)
                .iter()
                .map(Resolver::to_string)
                .collect::<Vec<_>>(),
            ["10.96.0.10:53", "[fe80::1]:53"]
        );
    }
}
