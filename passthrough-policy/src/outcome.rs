//! What a decision leaves behind: one [`Outcome`] per unit of work, from either path, as plain
//! data. The kernel event reader turns each kernel denial into one; the proxy builds one per
//! unit it handles and hands it over once, when the unit is done. The agent's metrics and event
//! log (`passthrough-user`'s `events` and `metrics`) consume nothing else, and so can a live
//! stream or a decision log.
//!
//! A proxy unit is what the proxy judges: a TLS connection (judged on its ClientHello, its
//! record carries the relay's bytes), a plaintext HTTP/1 request (with the bytes of its
//! exchange), an h2c stream (with its request and response body bytes), or a connection
//! refused before any name could be judged (unknown protocol, timeout, …).

use std::{borrow::Cow, net::SocketAddr, time::Duration, time::SystemTime};

use passthrough_common::Reason;

/// Where a decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecisionPath {
    /// A kernel program, at `connect()` / `sendmsg()` (or the raw/ping backstop).
    Kernel,
    /// The proxy, on the SNI / Host of a redirected connection.
    Proxy,
    /// The TLS fast path: the kernel, on the ClientHello of a connection that went directly
    /// to a verified destination.
    KernelSni,
}

impl DecisionPath {
    /// The `path` label and event field: `kernel`, `proxy` or `kernel-sni`.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionPath::Kernel => "kernel",
            DecisionPath::Proxy => "proxy",
            DecisionPath::KernelSni => "kernel-sni",
        }
    }
}

/// What happened to the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeVerdict {
    /// Let through.
    Allow,
    /// Refused.
    Deny,
    /// Would have been refused; `--audit` let it through.
    WouldDeny,
}

impl OutcomeVerdict {
    /// The `verdict` label: `allow`, `deny`, `would_deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeVerdict::Allow => "allow",
            OutcomeVerdict::Deny => "deny",
            OutcomeVerdict::WouldDeny => "would_deny",
        }
    }

    /// A denial, enforced or not.
    pub fn is_denial(self) -> bool {
        self != OutcomeVerdict::Allow
    }
}

/// Bytes the proxy moved for the unit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteCounts {
    /// From the client towards the upstream.
    pub up: u64,
    /// From the upstream back to the client.
    pub down: u64,
}

/// The upstream could not be reached or failed mid-exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamFailure {
    /// The address the proxy tried.
    pub target: SocketAddr,
    /// Connecting failed (rather than a failure after the connection was made).
    pub connect: bool,
    /// What went wrong.
    pub error: String,
}

/// One unit of work's outcome (module doc).
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Kernel or proxy.
    pub path: DecisionPath,
    /// When it was decided.
    pub time: SystemTime,
    /// What happened.
    pub verdict: OutcomeVerdict,
    /// Why (its [`Reason::code`] is the `reason` field and label).
    pub reason: Reason,
    /// What else is known about it, as text.
    pub detail: String,
    /// The match that decided, described (`Domain *.example.com port 443 Tls`).
    pub matched: Option<String>,
    /// Proxy: an HTTP request that reused its connection's last allowed judgement, so no new
    /// decision was made (it still moved bytes).
    pub reused: bool,
    /// Workload cgroup id (0 = none).
    pub workload: u64,
    /// Kernel: the calling task's cgroup id.
    pub cgroup: Option<u64>,
    /// The caller's thread-group id (0 when unknown).
    pub pid: u32,
    /// Its command name.
    pub comm: String,
    /// Destination dialled (for a connection the kernel recorded nothing for: the proxy's own
    /// address it reached).
    pub dst: SocketAddr,
    /// Proxy: the client's address.
    pub peer: Option<SocketAddr>,
    /// `tcp`, `udp`, `ping`, `raw:<protocol>` (kernel) or `tls`, `http1`, `h2c`, `grpc`,
    /// `unknown` (proxy).
    pub protocol: Cow<'static, str>,
    /// TLS SNI, when known.
    pub sni: Option<String>,
    /// HTTP authority, when known.
    pub host: Option<String>,
    /// The ClientHello offered Encrypted Client Hello.
    pub ech: bool,
    /// Proxy: where it connected (allowed, or let through by `--audit`).
    pub upstream: Option<SocketAddr>,
    /// Proxy: the upstream failed.
    pub upstream_failure: Option<UpstreamFailure>,
    /// Proxy: time spent deciding (policy and destination check).
    pub decide_time: Option<Duration>,
    /// Proxy: bytes moved for this unit.
    pub bytes: Option<ByteCounts>,
}

impl Outcome {
    /// A record of `path` with only who and where filled in: allowed, reason
    /// [`Reason::NoMatch`], nothing measured yet. Callers set what they know.
    pub fn new(path: DecisionPath, time: SystemTime, dst: SocketAddr) -> Self {
        Outcome {
            path,
            time,
            verdict: OutcomeVerdict::Allow,
            reason: Reason::NoMatch,
            detail: String::new(),
            matched: None,
            reused: false,
            workload: 0,
            cgroup: None,
            pid: 0,
            comm: String::new(),
            dst,
            peer: None,
            protocol: Cow::Borrowed("unknown"),
            sni: None,
            host: None,
            ech: false,
            upstream: None,
            upstream_failure: None,
            decide_time: None,
            bytes: None,
        }
    }

    /// Adds `up`/`down` to the record's bytes.
    pub fn add_bytes(&mut self, up: u64, down: u64) {
        let b = self.bytes.get_or_insert_with(ByteCounts::default);
        b.up += up;
        b.down += down;
    }
}
