//! The kernel map the proxy uses, behind the proxy crate's trait: `ORIG_BY_PEER` as its
//! [`OrigDstSource`]. The loader ([`crate::kernel`]) hands out the map handle; this module only
//! translates between the map's `#[repr(C)]` records and the proxy's types, so the proxy crate
//! needs no aya.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use passthrough_proxy::{OrigDstSource, Redirected};

use crate::kernel::OrigDstMap;

impl OrigDstSource for OrigDstMap {
    fn take(&self, peer: SocketAddr, _local: SocketAddr) -> Option<Redirected> {
        let o = OrigDstMap::take(self, peer)?;
        let v6 = Ipv6Addr::from(o.addr);
        let ip = match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        };
        let comm_len = o.comm.iter().position(|b| *b == 0).unwrap_or(o.comm.len());
        Some(Redirected {
            dst: SocketAddr::new(ip, u16::from_be(o.port_be)),
            workload: o.workload,
            pid: o.pid,
            comm: String::from_utf8_lossy(&o.comm[..comm_len]).into_owned(),
        })
    }
}
