//! The kernel maps the proxy uses, behind the proxy crate's traits: `ORIG_BY_PEER` as its
//! [`OrigDstSource`] and the relay maps as its [`KernelRelayMaps`]. The loader
//! ([`crate::kernel`]) hands out the map handles; this module only translates between the
//! maps' `#[repr(C)]` records and the proxy's types, so the proxy crate needs no aya.

use std::{
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::RawFd,
    sync::{Mutex, MutexGuard},
};

use aya::maps::MapError;
use passthrough_common::{RelayCounts, RelayPeer};
use passthrough_proxy::{KernelRelayMaps, OrigDstSource, Redirected};

use crate::kernel::{OrigDstMap, RelayMaps};

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

/// A poisoned lock only means another connection's task panicked mid-call; the map handle
/// itself is still valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The errno of a failed map syscall, else the error as text.
fn io_error(e: MapError) -> io::Error {
    match e {
        MapError::SyscallError(s) => s.io_error,
        other => io::Error::other(other.to_string()),
    }
}

impl KernelRelayMaps for RelayMaps {
    fn insert_counts(&self, cookie: u64, counts: RelayCounts) -> io::Result<()> {
        lock(&self.counts)
            .insert(cookie, counts, 0)
            .map_err(io_error)
    }

    fn insert_socket(&self, cookie: u64, fd: RawFd) -> io::Result<()> {
        lock(&self.socks).insert(cookie, fd, 0).map_err(io_error)
    }

    fn set_peer(&self, cookie: u64, peer: RelayPeer) -> io::Result<()> {
        lock(&self.peers).insert(cookie, peer, 0).map_err(io_error)
    }

    fn counts(&self, cookie: u64) -> io::Result<RelayCounts> {
        lock(&self.counts).get(&cookie, 0).map_err(io_error)
    }

    fn forget(&self, cookie: u64) {
        // Either may be missing (an enrolment that failed half way); nothing to undo then.
        let _ = lock(&self.peers).remove(&cookie);
        let _ = lock(&self.counts).remove(&cookie);
    }

    fn entries(&self) -> usize {
        lock(&self.peers).keys().count() + lock(&self.counts).keys().count()
    }
}
