//! What the proxy tells the rest of the agent: decisions, denials, bytes and upstream failures.
//!
//! The proxy never counts or rate-limits anything itself; the agent implements [`ProxyReport`]
//! over its Prometheus metrics and its rate-limited deny-event log (`passthrough-user`'s
//! `events::Reporter`), so a denial from the proxy and one from the kernel end up in the same
//! place, in the same shape ([`Denial`]).

use std::time::Duration;

use passthrough_policy::{Reason, outcome::Denial};
use tracing::warn;

/// The receiver of what the proxy observed. Every method is called on the connection's task:
/// keep them cheap (a counter update, a log line).
pub trait ProxyReport: Send + Sync + 'static {
    /// The name of workload `id` (a cgroup id; 0 = none) for the proxy's own log lines.
    fn workload_name(&self, id: u64) -> String;

    /// A connection was accepted; [`ProxyReport::connection_closed`] follows when its task ends.
    fn connection_opened(&self);

    /// A connection counted by [`ProxyReport::connection_opened`] ended.
    fn connection_closed(&self);

    /// What an accepted connection's first bytes were (`tls`, `tls_invalid`, `http1`, `h2c`,
    /// `unknown`, `too_large`, `timeout`, `closed`; `no_original_destination` when the kernel
    /// recorded nothing for it) and how long reading them took (`None`: nothing was read).
    fn connection_classified(&self, kind: &'static str, peek: Option<Duration>);

    /// A decision that is not a [`Denial`]: `verdict` is `allow`, or `deny` for a connection
    /// no workload can be named for. `workload` is a cgroup id (0 = none).
    fn decision(&self, protocol: &str, verdict: &'static str, reason: Reason, workload: u64);

    /// A denial, or under `--audit` a would-be denial (`denial.audit`).
    fn denial(&self, denial: &Denial);

    /// Bytes relayed for `workload`: `up` from the client to the upstream, `down` back.
    fn bytes(&self, workload: u64, up: u64, down: u64);

    /// A relayed connection ended; `in_kernel`: its bytes last moved through the kernel relay.
    fn relay_ended(&self, in_kernel: bool);

    /// An upstream connection for `workload` could not be established.
    fn upstream_connect_failed(&self, workload: u64);
}

/// The report of a proxy that was given none: denials are logged (target `passthrough::deny`,
/// no rate limit), everything else is dropped. For tests and tools; the agent always gives its
/// own.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogDenials;

impl ProxyReport for LogDenials {
    fn workload_name(&self, id: u64) -> String {
        if id == 0 {
            String::new()
        } else {
            format!("cgroup-{id}")
        }
    }

    fn connection_opened(&self) {}

    fn connection_closed(&self) {}

    fn connection_classified(&self, _kind: &'static str, _peek: Option<Duration>) {}

    fn decision(&self, _protocol: &str, _verdict: &'static str, _reason: Reason, _workload: u64) {}

    fn denial(&self, d: &Denial) {
        warn!(
            target: "passthrough::deny",
            path = d.path.as_str(),
            workload_id = d.workload,
            pid = d.pid,
            comm = %d.comm,
            dst = %d.dst,
            protocol = %d.protocol,
            sni = d.sni.as_deref(),
            host = d.host.as_deref(),
            peer = d.peer.map(|p| p.to_string()).as_deref(),
            reason = %d.reason,
            detail = %d.detail,
            audit = d.audit,
            "{}",
            if d.audit { "would be denied (audit mode: let through)" } else { "denied" }
        );
    }

    fn bytes(&self, _workload: u64, _up: u64, _down: u64) {}

    fn relay_ended(&self, _in_kernel: bool) {}

    fn upstream_connect_failed(&self, _workload: u64) {}
}
