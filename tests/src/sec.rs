//! Shared pieces of the security tests (`tests/tests/bypass.rs`, `tests/tests/udp_quic.rs`):
//! a host-route [`Slot`] of their own (so they can run beside the proxy kernel tests and the
//! proxy benchmark, which use other slots), and [`command_in`] (from [`crate::probe`]), which starts any
//! command inside a workload cgroup and network namespace (the bypass helpers are the test
//! executable itself).

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::hostnet::Slot;

/// The slot of the security tests: 198.51.100.232/30, 203.0.113.192/27, 2001:db8:f02::/48,
/// pod 198.51.100.236, proxy 169.254.77.3. Disjoint from `TEST_SLOT` and `BENCH_SLOT`.
pub const SEC_SLOT: Slot = Slot {
    host_v4: Ipv4Addr::new(198, 51, 100, 233),
    srv_v4: Ipv4Addr::new(198, 51, 100, 234),
    hosts_v4: Ipv4Addr::new(203, 0, 113, 192),
    host_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf02, 0, 0, 0, 0, 1),
    srv_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf02, 0, 0, 0, 0, 2),
    hosts_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf02, 0x100, 0, 0, 0, 0),
    pod_v4: Ipv4Addr::new(198, 51, 100, 236),
    pod_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf02, 0xee, 0, 0, 0, 2),
    proxy_v4: Ipv4Addr::new(169, 254, 77, 3),
    proxy_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf02, 0xff, 0, 0, 0, 1),
};

pub use crate::probe::command_in;
