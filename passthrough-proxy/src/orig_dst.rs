//! What the kernel recorded for a redirected connection, and the trait the proxy asks it with.

use std::net::SocketAddr;

/// What the kernel recorded for a redirected connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirected {
    /// The destination the client dialled.
    pub dst: SocketAddr,
    /// The workload's cgroup id (the key of [`super::ProxyPolicy::workloads`]); 0 = none.
    pub workload: u64,
    /// The process that called `connect()`.
    pub pid: u32,
    /// Its `comm`.
    pub comm: String,
}

/// Looks up (and consumes) the original destination of an accepted connection by its peer
/// (client) address and the address of the listener that accepted it.
pub trait OrigDstSource: Send + Sync + 'static {
    /// The record for the connection from `peer` accepted by the listener bound to `local`
    /// (as bound: `0.0.0.0:port` for a wildcard listener), removed from the source; `None` when
    /// there is none (the proxy then refuses the connection).
    fn take(&self, peer: SocketAddr, local: SocketAddr) -> Option<Redirected>;
}
