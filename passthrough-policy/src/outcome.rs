//! What a decision leaves behind for the agent's metrics and event log: plain data, built by
//! the kernel event reader and by the proxy, consumed by the agent (`passthrough-user`'s
//! `events` and `metrics`).

use std::{net::SocketAddr, time::SystemTime};

use passthrough_common::Reason;

/// Where a decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionPath {
    /// A kernel program, at `connect()` / `sendmsg()` (or the raw/ping backstop).
    Kernel,
    /// The proxy, on the SNI / Host of a redirected connection.
    Proxy,
}

impl DecisionPath {
    /// The `path` label and event field: `kernel` or `proxy`.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionPath::Kernel => "kernel",
            DecisionPath::Proxy => "proxy",
        }
    }
}

/// One denial (or, under `--audit`, would-be denial), from either path.
#[derive(Debug, Clone)]
pub struct Denial {
    /// Kernel or proxy.
    pub path: DecisionPath,
    /// When it was decided.
    pub time: SystemTime,
    /// Workload cgroup id (0 = none).
    pub workload: u64,
    /// Kernel: the calling task's cgroup id.
    pub cgroup: Option<u64>,
    /// The caller.
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// Destination dialled.
    pub dst: SocketAddr,
    /// `tcp`/`udp` (kernel) or the proxy's protocol.
    pub protocol: String,
    /// TLS SNI, when known.
    pub sni: Option<String>,
    /// HTTP authority, when known.
    pub host: Option<String>,
    /// Proxy: the client's address.
    pub peer: Option<SocketAddr>,
    /// Why (its [`Reason::code`] is the `reason` field and label).
    pub reason: Reason,
    /// What else is known about it, as text.
    pub detail: String,
    /// `--audit` let it through.
    pub audit: bool,
}
