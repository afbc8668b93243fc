//! Named test hosts for Domain decisions outside the proxy's kernel tests: a [`HostNet`] slot
//! (test hosts behind a veth from the host network namespace), TLS and HTTP servers on them
//! with one certificate for every name, and a DNS server answering the names (for
//! `passthrough run --resolver`). Used by the demo (`pt-demo`, [`DEMO_SLOT`]) and by the
//! monitor and suggest tests ([`OPS_SLOT`]), so they can run beside the other kernel tests.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::Result;
use tempfile::TempDir;

use crate::{
    hostnet::{HostNet, Slot},
    l7::{Dns, Pki, Servers, Service},
};

/// The demo's slot: 198.51.100.216/30, 203.0.113.96/27, 2001:db8:f15::/48, proxy
/// 169.254.77.15. Disjoint from every other slot.
pub const DEMO_SLOT: Slot = Slot {
    host_v4: Ipv4Addr::new(198, 51, 100, 217),
    srv_v4: Ipv4Addr::new(198, 51, 100, 218),
    hosts_v4: Ipv4Addr::new(203, 0, 113, 96),
    host_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf15, 0, 0, 0, 0, 1),
    srv_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf15, 0, 0, 0, 0, 2),
    hosts_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf15, 0x100, 0, 0, 0, 0),
    pod_v4: Ipv4Addr::new(198, 51, 100, 200),
    pod_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf15, 0xee, 0, 0, 0, 2),
    proxy_v4: Ipv4Addr::new(169, 254, 77, 15),
    proxy_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf15, 0xff, 0, 0, 0, 1),
};

/// The slot of the monitor and suggest tests (`tests/tests/monitor.rs`): 198.51.100.220/30,
/// 203.0.113.32/27, 2001:db8:f16::/48, proxy 169.254.77.16. Disjoint from every other slot.
pub const OPS_SLOT: Slot = Slot {
    host_v4: Ipv4Addr::new(198, 51, 100, 221),
    srv_v4: Ipv4Addr::new(198, 51, 100, 222),
    hosts_v4: Ipv4Addr::new(203, 0, 113, 32),
    host_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf16, 0, 0, 0, 0, 1),
    srv_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf16, 0, 0, 0, 0, 2),
    hosts_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf16, 0x100, 0, 0, 0, 0),
    pod_v4: Ipv4Addr::new(198, 51, 100, 201),
    pod_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf16, 0xee, 0, 0, 0, 2),
    proxy_v4: Ipv4Addr::new(169, 254, 77, 16),
    proxy_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf16, 0xff, 0, 0, 0, 1),
};

/// Test hosts with names. Field order = drop order: servers and DNS before the network.
pub struct DomainHosts {
    /// TLS (`TlsEcho`) and HTTP servers on every host.
    pub servers: Servers,
    /// Answers every name given to [`DomainHosts::start`].
    pub dns: Dns,
    /// The CA clients must trust (PEM file).
    pub ca: PathBuf,
    net: HostNet,
    _dir: TempDir,
}

impl DomainHosts {
    /// Hosts of `slot` serving `services`; `names` maps each name to the host numbers (1..=30)
    /// whose IPv4 and IPv6 addresses it resolves to (the certificate covers every name, so a
    /// name at the wrong address still completes a handshake there).
    pub fn start(slot: Slot, names: &[(&str, &[u8])], services: &[(u16, Service)]) -> Result<Self> {
        let dir = crate::test_dir();
        let net = HostNet::new(slot)?;
        let cert_names: Vec<&str> = names.iter().map(|(n, _)| *n).collect();
        let pki = Pki::new(&cert_names)?;
        let ca = pki.write_ca(dir.path())?;
        let servers = Servers::start(Some(net.server_ns()), services, Some(pki.server.clone()), 2)?;
        let mut answers: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (name, hosts) in names {
            let ips = answers.entry(name.to_string()).or_default();
            for h in *hosts {
                ips.push(slot.host4(*h));
                ips.push(slot.host6(*h as u16));
            }
        }
        let dns = Dns::start(answers, 300)?;
        Ok(DomainHosts {
            servers,
            dns,
            ca,
            net,
            _dir: dir,
        })
    }

    /// Host `n` (IPv4) at `port`.
    pub fn host4(&self, n: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.net.slot().host4(n), port)
    }

    /// Host `n` (IPv6) at `port`.
    pub fn host6(&self, n: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.net.slot().host6(n as u16), port)
    }

    /// `--resolver` for the agent.
    pub fn resolver(&self) -> String {
        self.dns.addr.to_string()
    }
}
