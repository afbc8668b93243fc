//! What the proxy tells the rest of the agent.
//!
//! Each unit of work the proxy handles — a TLS connection, an HTTP/1 request, an h2c stream, a
//! connection refused before a name could be judged — ends in exactly one
//! [`Outcome`], handed over once through [`ProxyReport::outcome`] when the unit is done: the
//! decision, its reason and match, the timings, the bytes, the upstream and any upstream
//! failure. The proxy itself neither counts nor logs decisions; the agent's receiver
//! (`passthrough-user`'s `events::Reporter`) turns outcomes into metrics and its rate-limited
//! event log, the same way as the kernel's denials.
//!
//! Besides outcomes, three calls follow a connection's life as it happens (the open-connection
//! gauge and what its first bytes were), because they describe the connection while it is
//! open, not its result.

use std::time::Duration;

use passthrough_policy::outcome::Outcome;
use tracing::warn;

/// The receiver of what the proxy observed. Every method is called on the connection's task:
/// keep them cheap (a counter update, a log line).
pub trait ProxyReport: Send + Sync + 'static {
    /// A connection was accepted; [`ProxyReport::connection_closed`] follows when its task ends.
    fn connection_opened(&self);

    /// A connection counted by [`ProxyReport::connection_opened`] ended.
    fn connection_closed(&self);

    /// What an accepted connection's first bytes were (`tls`, `tls_invalid`, `http1`, `h2c`,
    /// `unknown`, `too_large`, `timeout`, `closed`; `no_original_destination` when the kernel
    /// recorded nothing for it) and how long reading them took (`None`: nothing was read).
    fn connection_classified(&self, kind: &'static str, peek: Option<Duration>);

    /// One unit of work is done (module doc).
    fn outcome(&self, outcome: Outcome);
}

/// The report of a proxy that was given none: denials and upstream failures are logged
/// (target `passthrough::deny` / `passthrough::proxy`, no rate limit), everything else is
/// dropped. For tests and tools; the agent always gives its own.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogDenials;

impl ProxyReport for LogDenials {
    fn connection_opened(&self) {}

    fn connection_closed(&self) {}

    fn connection_classified(&self, _kind: &'static str, _peek: Option<Duration>) {}

    fn outcome(&self, o: Outcome) {
        if let Some(f) = &o.upstream_failure {
            warn!(
                target: "passthrough::proxy",
                workload_id = o.workload, dst = %o.dst, target = %f.target, error = %f.error,
                "upstream failed"
            );
        }
        if !o.verdict.is_denial() {
            return;
        }
        warn!(
            target: "passthrough::deny",
            path = o.path.as_str(),
            workload_id = o.workload,
            pid = o.pid,
            comm = %o.comm,
            dst = %o.dst,
            protocol = %o.protocol,
            sni = o.sni.as_deref(),
            host = o.host.as_deref(),
            peer = o.peer.map(|p| p.to_string()).as_deref(),
            reason = o.reason.code(),
            detail = %o.detail,
            audit = o.verdict == passthrough_policy::outcome::OutcomeVerdict::WouldDeny,
            "{}",
            if o.verdict == passthrough_policy::outcome::OutcomeVerdict::WouldDeny {
                "would be denied (audit mode: let through)"
            } else {
                "denied"
            }
        );
    }
}
