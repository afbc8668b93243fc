//! The userspace proxy for redirected connections (docs/decisions.md, "At the proxy").
//!
//! The kernel redirects connections that only a `Domain` match could allow to the proxy and
//! records each one's original destination; [`Proxy::serve`] accepts them, asks an
//! [`OrigDstSource`] for that record (none → the connection is closed at once), reads the
//! first bytes within [`ProxyConfig::peek_timeout`] and [`ProxyConfig::max_peek`], and:
//!
//! - **TLS** ([`tls`]): decides on the ClientHello's SNI; an allowed connection is relayed byte
//!   for byte ([`relay`]), a denied one gets a fatal `access_denied` alert and is closed.
//! - **HTTP/1.x** ([`http1`], framing in [`h1`]): every request is decided on its authority;
//!   the upstream gets a head the proxy wrote (origin-form, judged `Host`, one framing field)
//!   and the body as it came; responses are relayed as the origin sent them. Denials are `503`
//!   and the connection is closed; ambiguous framing is refused (`400`/`501`).
//! - **h2c** with prior knowledge ([`http`]): every stream is decided on its authority and
//!   proxied with hyper; denials are `503` or, for gRPC, `grpc-status: 7`.
//! - anything else, a timeout, or too many bytes without a decision → closed.
//!
//! Decisions use [`passthrough_policy::decision::decide_at_proxy`], then the destination check
//! ([`dns`]) when a `Domain` match allowed. Every decision is one `tracing` event (target
//! `passthrough::proxy`, message `decision`) with workload, pid, comm, peer, destination,
//! protocol, name, verdict, reason and match.
//!
//! Denials (and, with [`ProxyConfig::audit`], would-be denials) are reported through the
//! [`ProxyReport`] the agent gives it (`Proxy::with_report`): there, one rate-limited event at
//! target `passthrough::deny` with the same fields as the kernel's, plus metrics. Under `audit`
//! a denied connection or request goes to its original destination instead (CONNECT and
//! protocol upgrades excepted: they cannot be passed through per request and stay refused).
//!
//! # What the proxy needs from the agent
//! This crate depends on no kernel library. It reaches the rest of the agent only through three
//! traits, which the agent (`passthrough-user`) implements over the kernel maps, its metrics and
//! its event log, and the tests implement with fakes:
//! - [`OrigDstSource`]: the original destination (and workload, pid, comm) of an accepted
//!   socket, from the map the kernel's redirect wrote;
//! - [`ProxyReport`]: what happened (decisions, denials, bytes, upstream failures);
//! - [`report::FastPathLearner`]: the TLS fast path's learner, told of each destination an
//!   allowed TLS connection was verified for.
//!
//! Policy: the proxy reads an `Arc<ArcSwap<ProxyPolicy>>`; the agent swaps in a new
//! [`ProxyPolicy`] on reload. A TLS connection is judged once with the policy of its arrival;
//! HTTP requests are judged with the policy current when each request arrives.

pub mod dns;
pub mod h1;
pub mod http;
pub mod http1;
pub mod kernel_judge;
pub mod orig_dst;
pub mod peek;
pub mod relay;
pub mod report;
pub mod tls;

use std::{
    borrow::Cow, collections::HashMap, fmt::Display, net::SocketAddr, sync::Arc, time::Duration,
    time::SystemTime,
};

use arc_swap::ArcSwap;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

pub use dns::{DestError, Destinations, DomainDestination, ResolverSetupError};
pub use orig_dst::{OrigDstSource, Redirected};
pub use report::{LogDenials, ProxyReport};

use passthrough_policy::{
    Connection, DecideOptions, L7, MergedConf, Reason, Resolver, Verdict,
    decision::{decide_at_proxy, normalize_name},
    outcome::{DecisionPath, Outcome, OutcomeVerdict, UpstreamFailure},
};

/// Policy the proxy decides with; swapped atomically on reload.
#[derive(Debug, Clone)]
pub struct ProxyPolicy {
    /// Merged configuration per workload cgroup id ([`Redirected::workload`]). Shared: many
    /// workloads (a node's pods) have one configuration, built once per policy change.
    pub workloads: HashMap<u64, Arc<MergedConf>>,
    /// For connections of no known workload (id 0 or not in `workloads`).
    pub unmatched: MergedConf,
    /// Internal ranges and resolvers.
    pub decide: DecideOptions,
}

impl ProxyPolicy {
    /// The configuration for workload `id`.
    pub fn conf(&self, id: u64) -> &MergedConf {
        self.workloads.get(&id).map_or(&self.unmatched, |c| c)
    }

    /// The match that allows a TLS connection to `dst` with `sni` for workload `id` under this
    /// policy, described ([`describe_match`]): what the proxy would report for it. Used for the
    /// hellos the TLS fast path's judge allowed in the kernel, whose tables know names, not
    /// matches. `None` when no match allows it (the policy changed since).
    pub fn tls_match(&self, id: u64, dst: std::net::SocketAddr, sni: &str) -> Option<String> {
        let conn = Connection {
            dst,
            udp: false,
            l7: Some(L7::Tls(Some(sni.to_string()))),
        };
        let d = decide_at_proxy(self.conf(id), &conn, &self.decide);
        match d.verdict {
            Verdict::AllowAtProxy => d.matched.map(describe_match),
            _ => None,
        }
    }
}

/// A deciding match as outcomes describe it (`Domain *.example.com port 443 Tls`).
pub fn describe_match(m: &passthrough_policy::Match) -> String {
    match m.port {
        Some(p) => format!("{:?} {} port {p} {:?}", m.kind, m.value, m.protocol),
        None => format!("{:?} {} {:?}", m.kind, m.value, m.protocol),
    }
}

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// `--domain-destination`.
    pub domain_destination: DomainDestination,
    /// `--resolver`: the name servers of the destination check; empty = `/etc/resolv.conf`.
    pub resolvers: Vec<Resolver>,
    /// How long to wait for the first bytes to be complete enough for a decision.
    pub peek_timeout: Duration,
    /// Most bytes read before a decision; at least [`MIN_PEEK`].
    pub max_peek: usize,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// `SO_MARK` of upstream sockets (normally [`passthrough_common::AGENT_MARK`]); 0 = not set.
    pub upstream_mark: u32,
    /// `--audit`: decide and report, but let denied connections and requests through to their
    /// original destination.
    pub audit: bool,
}

/// The smallest allowed [`ProxyConfig::max_peek`]: a 16 KiB ClientHello in two records.
pub const MIN_PEEK: usize = 16 * 1024 + 2 * 5 + 4;

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            domain_destination: DomainDestination::Verify,
            resolvers: Vec::new(),
            peek_timeout: Duration::from_secs(5),
            max_peek: 32 * 1024,
            connect_timeout: Duration::from_secs(5),
            upstream_mark: passthrough_common::AGENT_MARK,
            audit: false,
        }
    }
}

/// The proxy. Cheap to share: [`Proxy::serve`] takes `Arc<Self>` and may run on several
/// listeners (IPv4 and IPv6) at once.
pub struct Proxy {
    orig: Arc<dyn OrigDstSource>,
    policy: Arc<ArcSwap<ProxyPolicy>>,
    cfg: ProxyConfig,
    dest: Destinations,
    /// Where decisions, denials and bytes go (the agent's metrics and event log).
    report: Arc<dyn ProxyReport>,
    /// The TLS fast path's learner: told of every destination a TLS connection was allowed to
    /// and verified for ([`report::FastPathLearner`]); `None`: the fast path is off.
    fast_path: Option<Arc<dyn report::FastPathLearner>>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("cfg", &self.cfg).finish()
    }
}

/// What the first bytes turned out to be.
enum First {
    Tls(tls::Parse),
    Http1,
    H2c,
    Other,
    TooLarge,
    Timeout,
    Closed,
}

/// The result of judging a name (policy, then destination check).
#[derive(Debug)]
pub(crate) struct Judged {
    /// Where to connect: the allowed target, or under `--audit` the original destination of a
    /// would-be denial; `None`: refused.
    pub(crate) target: Option<SocketAddr>,
    /// The unit's record, to be completed and emitted by the caller.
    pub(crate) outcome: Outcome,
    /// For a denial: `name: why`, for the client's 503 body.
    pub(crate) refusal: String,
}

impl Proxy {
    /// A proxy deciding with `policy` (an `ArcSwap` the agent stores new policies into). It
    /// reports to [`LogDenials`] until [`Proxy::with_report`] names the agent's receiver.
    /// Fails when `cfg.max_peek` is below [`MIN_PEEK`] or the resolver cannot be set up.
    pub fn new(
        orig: Arc<dyn OrigDstSource>,
        policy: Arc<ArcSwap<ProxyPolicy>>,
        cfg: ProxyConfig,
    ) -> Result<Self, ProxyError> {
        if cfg.max_peek < MIN_PEEK {
            return Err(ProxyError::PeekTooSmall(cfg.max_peek));
        }
        let dest = Destinations::new(cfg.domain_destination, &cfg.resolvers)?;
        Ok(Proxy {
            orig,
            policy,
            cfg,
            dest,
            report: Arc::new(LogDenials),
            fast_path: None,
        })
    }

    /// Tells `learner` of each verified destination an allowed TLS connection went to.
    pub fn with_fast_path(mut self, learner: Arc<dyn report::FastPathLearner>) -> Self {
        self.fast_path = Some(learner);
        self
    }

    /// The destination check (its resolver and answer cache), e.g. for the agent to pre-warm
    /// the fast path's verified destinations with the same answers.
    pub fn destinations(&self) -> &Destinations {
        &self.dest
    }

    /// Reports decisions, denials and bytes to `report` (the agent's metrics and event log).
    pub fn with_report(mut self, report: Arc<dyn ProxyReport>) -> Self {
        self.report = report;
        self
    }

    /// The record of a refusal of the connection in `ctx`: `reason`, `detail`; a would-be
    /// denial when `audit` (the caller's `--audit`, or false for what cannot be let through).
    pub(crate) fn refusal(
        &self,
        ctx: &ConnInfo,
        protocol: &'static str,
        reason: Reason,
        detail: &dyn Display,
        audit: bool,
    ) -> Outcome {
        let mut o = ctx.outcome(protocol);
        o.verdict = if audit {
            OutcomeVerdict::WouldDeny
        } else {
            OutcomeVerdict::Deny
        };
        o.reason = reason;
        o.detail = detail.to_string();
        o
    }

    /// Hands a finished unit's record to the report (once per unit).
    pub(crate) fn emit(&self, outcome: Outcome) {
        self.report.outcome(outcome);
    }

    /// Connects to `target` and relays `client` (its `first` bytes included) to it; records the
    /// bytes or the upstream failure in `o`, then emits it. For allowed TLS
    /// connections and `--audit` pass-throughs.
    async fn connect_and_relay(
        &self,
        mut client: TcpStream,
        first: Vec<u8>,
        target: SocketAddr,
        mut o: Outcome,
    ) {
        o.upstream = Some(target);
        let mut upstream =
            match relay::connect(target, self.cfg.upstream_mark, self.cfg.connect_timeout).await {
                Ok(u) => u,
                Err(e) => {
                    o.upstream_failure = Some(UpstreamFailure {
                        target,
                        connect: true,
                        error: e.to_string(),
                    });
                    return self.emit(o);
                }
            };
        match relay::relay(&mut client, first, &mut upstream).await {
            Ok(n) => o.add_bytes(n.up, n.down),
            // A relay cut short (a reset, a broken pipe) is the connection's ordinary end, not
            // an upstream failure; what moved before it is not counted (as before).
            Err(e) => debug!(
                target: "passthrough::proxy",
                peer = %o.peer.map(|p| p.to_string()).unwrap_or_default(), %target, error = %e,
                "relay ended with an error"
            ),
        }
        self.emit(o);
    }

    /// The settings.
    pub fn config(&self) -> &ProxyConfig {
        &self.cfg
    }

    /// Serves one listener until `shutdown` fires; connections still open then are closed.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        // The listening address, once: a `getsockname` per connection would cost a syscall for
        // what no source needs beyond the listener.
        let local = match listener.local_addr() {
            Ok(l) => l,
            Err(e) => {
                warn!(target: "passthrough::proxy", error = %e, "listener has no local address");
                return;
            }
        };
        // TCP_NODELAY on the listener: accepted sockets inherit it, which saves a
        // `setsockopt` per connection (test `accepted_sockets_inherit_tcp_nodelay`).
        let inherits_nodelay = socket2::SockRef::from(&listener)
            .set_tcp_nodelay(true)
            .is_ok();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let me = self.clone();
                    let stop = shutdown.child_token();
                    let active = OpenConnection::new(self.report.clone());
                    tokio::spawn(async move {
                        let _active = active;
                        tokio::select! {
                            _ = stop.cancelled() => {}
                            _ = me.handle(stream, peer, local, inherits_nodelay) => {}
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(target: "passthrough::proxy", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(
        self: Arc<Self>,
        mut client: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        inherits_nodelay: bool,
    ) {
        let Some(rec) = self.orig.take(peer, local) else {
            self.report
                .connection_classified("no_original_destination", None);
            let mut o = Outcome::new(DecisionPath::Proxy, SystemTime::now(), local);
            o.verdict = OutcomeVerdict::Deny;
            o.reason = Reason::NoOriginalDestination;
            o.detail = "refused: no recorded original destination for this connection".into();
            o.peer = Some(peer);
            return self.emit(o);
        };
        if !inherits_nodelay {
            let _ = client.set_nodelay(true);
        }
        let mut buf = Vec::with_capacity(2048);
        let peek_start = Instant::now();
        let first = self.read_first(&mut client, &mut buf).await;
        let kind = match &first {
            First::Tls(tls::Parse::Hello(_)) => "tls",
            First::Tls(tls::Parse::Invalid(_)) => "tls_invalid",
            First::Http1 => "http1",
            First::H2c => "h2c",
            First::Tls(_) | First::Other => "unknown",
            First::TooLarge => "too_large",
            First::Timeout => "timeout",
            First::Closed => "closed",
        };
        self.report
            .connection_classified(kind, Some(peek_start.elapsed()));
        let ctx = ConnInfo { peer, rec };
        let audit = self.cfg.audit;
        let refused = match first {
            First::Tls(tls::Parse::Hello(hello)) => return self.tls(client, buf, ctx, hello).await,
            First::Http1 => return http1::serve(self, client, buf, ctx).await,
            First::H2c => return http::serve(self, client, buf, ctx).await,
            First::Closed => {
                return debug!(
                    target: "passthrough::proxy",
                    peer = %ctx.peer, dst = %ctx.rec.dst,
                    "client closed or failed before sending enough to decide"
                );
            }
            First::Tls(tls::Parse::Invalid(e)) => {
                self.refusal(&ctx, "tls", Reason::BadClientHello, &e, audit)
            }
            First::Tls(tls::Parse::NotTls | tls::Parse::NeedMore) | First::Other => self.refusal(
                &ctx,
                "unknown",
                Reason::UnknownProtocol,
                &"neither TLS nor HTTP",
                audit,
            ),
            First::TooLarge => {
                let why = format!("no decision within the first {} bytes", self.cfg.max_peek);
                self.refusal(&ctx, "unknown", Reason::TooLarge, &why, audit)
            }
            First::Timeout => {
                let why = format!(
                    "no decision within {:?} ({} bytes read)",
                    self.cfg.peek_timeout,
                    buf.len()
                );
                self.refusal(&ctx, "unknown", Reason::PeekTimeout, &why, audit)
            }
        };
        if audit {
            // A would-be denial: relay it, bytes as read, to its original destination.
            return self
                .connect_and_relay(client, buf, ctx.rec.dst, refused)
                .await;
        }
        let tls_client = refused.protocol == "tls";
        self.emit(refused);
        if tls_client {
            tls_refuse(client).await;
        }
    }

    /// Reads until the first bytes can be classified, within the peek limits.
    async fn read_first(&self, client: &mut TcpStream, buf: &mut Vec<u8>) -> First {
        let deadline = Instant::now() + self.cfg.peek_timeout;
        loop {
            match peek::classify(buf) {
                peek::Peeked::NeedMore => {}
                peek::Peeked::Tls => match tls::parse_client_hello(buf) {
                    tls::Parse::NeedMore => {}
                    other => return First::Tls(other),
                },
                peek::Peeked::Http1 => return First::Http1,
                peek::Peeked::H2c => return First::H2c,
                peek::Peeked::Other => return First::Other,
            }
            let have = buf.len();
            if have >= self.cfg.max_peek {
                return First::TooLarge;
            }
            let want = (have + 8192).min(self.cfg.max_peek);
            buf.resize(want, 0);
            let r = tokio::time::timeout_at(deadline, client.read(&mut buf[have..])).await;
            match r {
                Ok(Ok(n)) if n > 0 => buf.truncate(have + n),
                Ok(_) => {
                    buf.truncate(have);
                    return First::Closed;
                }
                Err(_) => {
                    buf.truncate(have);
                    return First::Timeout;
                }
            }
        }
    }

    async fn tls(
        self: Arc<Self>,
        client: TcpStream,
        first: Vec<u8>,
        ctx: ConnInfo,
        hello: tls::ClientHello,
    ) {
        let l7 = L7::Tls(hello.sni.clone());
        let judged = self.judge(&ctx, l7, "tls", hello.ech).await;
        match judged.target {
            Some(target) => {
                self.connect_and_relay(client, first, target, judged.outcome)
                    .await
            }
            None => {
                self.emit(judged.outcome);
                tls_refuse(client).await
            }
        }
    }

    /// Decides `l7` for the connection in `ctx` with the current policy and runs the
    /// destination check when a `Domain` match allowed. The record it returns is the unit's:
    /// the caller completes it (bytes, upstream) and emits it once.
    pub(crate) async fn judge(
        &self,
        ctx: &ConnInfo,
        l7: L7,
        proto: &'static str,
        ech: bool,
    ) -> Judged {
        let started = Instant::now();
        let policy = self.policy.load_full();
        let conf = policy.conf(ctx.rec.workload);
        let conn = Connection {
            dst: ctx.rec.dst,
            udp: false,
            l7: Some(l7.clone()),
        };
        let d = decide_at_proxy(conf, &conn, &policy.decide);
        let (raw, strip_port) = match &l7 {
            L7::Tls(s) => (s.clone(), false),
            L7::Http1(h) | L7::H2c(h) => (Some(h.clone()), true),
        };
        let matched = d.matched.map(describe_match);
        let (reason, detail, target) = match d.verdict {
            Verdict::AllowAtProxy => {
                // A Domain match allowed `name`: check where the client is going.
                let name = raw
                    .as_deref()
                    .and_then(|r| normalize_name(r, strip_port).ok())
                    .unwrap_or_default();
                match self.dest.target_until(&name, ctx.rec.dst).await {
                    Ok((t, until)) => {
                        // A verified destination of an allowed TLS name: the fast path may
                        // take the next connection there directly.
                        if let (Some(learner), Some(until), L7::Tls(_)) =
                            (&self.fast_path, until, &l7)
                        {
                            learner.verified(&name, ctx.rec.dst, until);
                        }
                        (d.reason.reason(), d.reason.to_string(), Some(t))
                    }
                    Err(e) => (Reason::DestinationCheck, e.to_string(), None),
                }
            }
            Verdict::AllowKernel => (d.reason.reason(), d.reason.to_string(), Some(ctx.rec.dst)),
            Verdict::Deny | Verdict::DenyAtProxy | Verdict::RedirectToProxy => {
                (d.reason.reason(), d.reason.to_string(), None)
            }
        };
        let mut o = ctx.outcome(proto);
        match &l7 {
            L7::Tls(_) => o.sni = raw.clone(),
            _ => o.host = raw.clone(),
        }
        o.ech = ech;
        o.reason = reason;
        o.decide_time = Some(started.elapsed());
        match target {
            Some(t) => {
                o.detail = detail;
                o.matched = matched;
                o.upstream = Some(t);
                Judged {
                    target: Some(t),
                    outcome: o,
                    refusal: String::new(),
                }
            }
            None => {
                o.detail = match (&matched, reason) {
                    (Some(m), r) if r != Reason::DestinationCheck => {
                        format!("{detail} (match: {m})")
                    }
                    _ => detail,
                };
                o.matched = matched;
                let refusal = format!("{}: {}", raw.as_deref().unwrap_or(""), o.detail);
                if self.cfg.audit {
                    // --audit: a would-be denial; go where the client dialled.
                    o.verdict = OutcomeVerdict::WouldDeny;
                    o.upstream = Some(ctx.rec.dst);
                    return Judged {
                        target: Some(ctx.rec.dst),
                        outcome: o,
                        refusal,
                    };
                }
                o.verdict = OutcomeVerdict::Deny;
                Judged {
                    target: None,
                    outcome: o,
                    refusal,
                }
            }
        }
    }

    pub(crate) fn cfg(&self) -> &ProxyConfig {
        &self.cfg
    }
}

/// Why the proxy could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// [`ProxyConfig::max_peek`] is too small for a ClientHello.
    #[error("max_peek {0} is below {MIN_PEEK} bytes")]
    PeekTooSmall(usize),
    /// The DNS resolver of the destination check could not be built.
    #[error(transparent)]
    Resolver(#[from] ResolverSetupError),
}

/// Counts one open connection with the report until dropped (the connection's task holds it).
struct OpenConnection(Arc<dyn ProxyReport>);

impl OpenConnection {
    fn new(report: Arc<dyn ProxyReport>) -> Self {
        report.connection_opened();
        OpenConnection(report)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// One accepted, redirected connection.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) rec: Redirected,
}

impl ConnInfo {
    /// A new record for a unit of this connection: who, where, which protocol (allowed until
    /// the caller says otherwise).
    pub(crate) fn outcome(&self, protocol: &'static str) -> Outcome {
        let mut o = Outcome::new(DecisionPath::Proxy, SystemTime::now(), self.rec.dst);
        o.workload = self.rec.workload;
        o.pid = self.rec.pid;
        o.comm = self.rec.comm.clone();
        o.peer = Some(self.peer);
        o.protocol = Cow::Borrowed(protocol);
        o
    }
}

/// Refuses a TLS client: a fatal `access_denied` alert, then close.
async fn tls_refuse(mut client: TcpStream) {
    let _ = client
        .write_all(&tls::alert(tls::ALERT_ACCESS_DENIED))
        .await;
    close_gently(&mut client).await;
}

/// Shuts down the write side, then drains what the client still sends for a moment so that
/// closing does not turn into a reset that could destroy the last bytes we wrote.
pub(crate) async fn close_gently(client: &mut TcpStream) {
    let _ = client.shutdown().await;
    // On the heap: as an array it made every connection task's future 4 KiB larger.
    let mut sink = vec![0u8; 4096];
    let drain = async {
        let mut total = 0usize;
        while let Ok(n) = client.read(&mut sink).await {
            total += n;
            if n == 0 || total > 256 * 1024 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}
#[cfg(test)]
mod tests {
    use super::*;

    struct NoOrig;
    impl OrigDstSource for NoOrig {
        fn take(&self, _: SocketAddr, _: SocketAddr) -> Option<Redirected> {
            None
        }
    }

    #[tokio::test]
    async fn accepted_sockets_inherit_tcp_nodelay() {
        // `serve` relies on it instead of a `setsockopt` per connection.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        socket2::SockRef::from(&l).set_tcp_nodelay(true).unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (a, _) = l.accept().await.unwrap();
        assert!(a.nodelay().unwrap());
    }

    /// Every accepted connection's task holds this future from accept on, relayed or idle:
    /// it was 6.3 KiB while the refusal's 4 KiB drain buffer lived in it, 3.3 KiB since that
    /// buffer is on the heap (only refusals allocate it). Boxing the protocol paths brought it
    /// to 0.7 KiB but made no measurable difference to CPU per connection, so they are not.
    #[tokio::test]
    async fn the_connection_future_stays_small() {
        fn size<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        let c = TcpStream::connect(a).await.unwrap();
        let policy = ProxyPolicy {
            workloads: HashMap::new(),
            unmatched: MergedConf {
                mode: passthrough_policy::Mode::All,
                matches: vec![],
                policies: vec![],
            },
            decide: DecideOptions::default(),
        };
        let cfg = ProxyConfig {
            domain_destination: DomainDestination::Original,
            ..Default::default()
        };
        let p = Arc::new(
            Proxy::new(
                Arc::new(NoOrig),
                Arc::new(ArcSwap::from_pointee(policy)),
                cfg,
            )
            .unwrap(),
        );
        let f = p.clone().handle(c, a, a, true);
        assert!(size(&f) <= 4096, "{} bytes", size(&f));
    }
}
