//! h2c (HTTP/2 with prior knowledge), proxied per stream with hyper; plaintext HTTP/1.x is
//! [`super::http1`].
//!
//! Every stream is judged on its own authority (`:authority`, else `Host`) against `http`,
//! `http2` and `grpc` matches alike (Kuma's listener accepts either codec for every L7 match;
//! a port in the authority must be the dialled one), so one connection cannot smuggle a second
//! host. Upstream connections are HTTP/2 too, one per target and client connection: the
//! request goes on in the codec the client chose (Envoy would re-encode it for the match's
//! protocol; docs/kuma.md).
//! - `CONNECT` and `Upgrade` are denied: the tunnelled bytes could not be judged per request.
//! - Repeats are cheap: a stream whose authority is identical to the connection's last allowed
//!   one, under the same policy and within `REUSE_JUDGEMENT_FOR`, reuses that judgement's
//!   target (`Allowed`: no policy lookup, destination check or decision event). Any other
//!   authority, a reload, or an older judgement is judged in full. Not under `--audit`.
//!
//! - A request whose `host` header names another entity than its `:authority`, or whose
//!   `:authority` carries userinfo (`user@host`), is malformed (RFC 9113 §8.3.1): `400`, never
//!   forwarded, also under `--audit`. An upstream that routes on `host` must never see a name
//!   other than the judged one.
//!
//! A denied stream gets `503` with a plain-text body naming the host and saying no
//! MeshPassthrough match allowed it. A denied gRPC call (`content-type: application/grpc…`)
//! gets a trailers-only response: HTTP 200, `grpc-status: 7` (PERMISSION_DENIED) and a
//! `grpc-message`. Other streams of the same connection go on. An unreachable upstream is `503`
//! (gRPC: `grpc-status: 14`, UNAVAILABLE).
//!
//! Each stream is one unit with one record: a refused stream's is emitted with its answer; a
//! forwarded stream's when its response body is done (or dropped on a reset), carrying the
//! DATA bytes of its request body (up) and response body (down).

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    client::conn::http2 as client2,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    server::conn::http2 as server2,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::Mutex,
};
use tracing::debug;

use super::{ConnInfo, Judged, Proxy, relay};
use passthrough_policy::{
    L7, Reason,
    outcome::{Outcome, UpstreamFailure},
};

/// Response body type of the proxy.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A stream that first yields bytes already read from it.
#[derive(Debug)]
pub struct Rewind {
    pre: Bytes,
    inner: TcpStream,
}

impl Rewind {
    /// `inner`, with `pre` put back in front.
    pub fn new(pre: Vec<u8>, inner: TcpStream) -> Self {
        Rewind {
            pre: Bytes::from(pre),
            inner,
        }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            let chunk = self.pre.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

struct Ctx {
    proxy: Arc<Proxy>,
    conn: ConnInfo,
    /// HTTP/2 connections to upstream targets.
    upstreams: Mutex<HashMap<SocketAddr, client2::SendRequest<Counted<Incoming>>>>,
    /// The last allowed judgement of this connection (see [`Allowed`]).
    allowed: std::sync::Mutex<Option<Allowed>>,
}

/// How long an allowed judgement of a connection is reused for later requests to the same
/// authority: bounds how stale its destination check (DNS) can get.
const REUSE_JUDGEMENT_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// An allowed judgement, reused for later requests of the same connection (HTTP/1 and h2c)
/// whose authority is byte-for-byte the same, under the same policy (pointer-equal), within
/// [`REUSE_JUDGEMENT_FOR`]. Every request's authority is still compared; only the policy
/// lookup, the destination check and the decision event are skipped for repeats (one event
/// per judgement, not per request).
pub(crate) struct Allowed {
    policy: Arc<super::ProxyPolicy>,
    authority: String,
    target: SocketAddr,
    /// Why it was allowed (the reused requests' records say so too).
    reason: Reason,
    at: std::time::Instant,
}

impl Allowed {
    /// `authority` was allowed to `target` for `reason` under `policy` (loaded before
    /// judging).
    pub(crate) fn new(
        policy: Arc<super::ProxyPolicy>,
        authority: &str,
        target: SocketAddr,
        reason: Reason,
    ) -> Self {
        Allowed {
            policy,
            authority: authority.to_string(),
            target,
            reason,
            at: std::time::Instant::now(),
        }
    }

    /// The record of a request of `conn` that reuses this judgement: allowed for the same
    /// reason, no new decision ([`Outcome::reused`]).
    pub(crate) fn reused(
        &self,
        conn: &ConnInfo,
        protocol: &'static str,
        authority: &str,
    ) -> Outcome {
        let mut o = conn.outcome(protocol);
        o.reused = true;
        o.reason = self.reason;
        o.host = Some(authority.to_string());
        o.upstream = Some(self.target);
        o
    }

    /// The target, when this judgement still applies to `authority` under `proxy`'s policy.
    pub(crate) fn target_for(&self, authority: &str, proxy: &Proxy) -> Option<SocketAddr> {
        (self.authority == authority
            && self.at.elapsed() < REUSE_JUDGEMENT_FOR
            && Arc::ptr_eq(&self.policy, &proxy.policy.load()))
        .then_some(self.target)
    }
}

impl Ctx {
    /// The target of an earlier allowed judgement that still applies to `authority`, and the
    /// record of this request reusing it.
    fn allowed_again(
        &self,
        protocol: &'static str,
        authority: &str,
    ) -> Option<(SocketAddr, Outcome)> {
        let memo = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
        let a = memo.as_ref()?;
        let t = a.target_for(authority, &self.proxy)?;
        Some((t, a.reused(&self.conn, protocol, authority)))
    }

    fn remember(
        &self,
        policy: Arc<super::ProxyPolicy>,
        authority: &str,
        target: SocketAddr,
        reason: Reason,
    ) {
        *self.allowed.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Allowed::new(policy, authority, target, reason));
    }
}

/// Serves one prior-knowledge HTTP/2 client connection, `first` being the bytes already read.
pub(crate) async fn serve(proxy: Arc<Proxy>, client: TcpStream, first: Vec<u8>, conn: ConnInfo) {
    let peer = conn.peer;
    let ctx = Arc::new(Ctx {
        proxy,
        conn,
        upstreams: Mutex::new(HashMap::new()),
        allowed: std::sync::Mutex::new(None),
    });
    let io = TokioIo::new(Rewind::new(first, client));
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(ctx, req).await) }
    });
    let r = server2::Builder::new(TokioExecutor::new())
        .serve_connection(io, svc)
        .await;
    if let Err(e) = r {
        debug!(target: "passthrough::proxy", %peer, error = %e, "client connection ended with an error");
    }
}

/// Whether the request is a gRPC call.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Why a request has no authority to judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoAuthority {
    /// Nothing usable (no `:authority`/`Host`, several `Host`s, a non-ASCII `Host`): judged as
    /// a denial (`503`; `--audit` forwards it to the dialled address).
    Missing(&'static str),
    /// Malformed (RFC 9113 §8.3.1): `400`, never forwarded, `--audit` included.
    Malformed(&'static str),
}

/// The authority to judge, or why there is none.
///
/// With `:authority` present it is the one judged, and it must be the only name the request
/// carries: userinfo in it, or a `host` header naming another entity, makes the request
/// malformed. Otherwise an upstream routing on `host` (many do, and HTTP/1 origins behind an
/// h2c front always do) would serve a name that was never judged. `host` agrees when it is
/// the same `host[:port]` text, ASCII case aside.
fn authority<B>(req: &Request<B>) -> Result<String, NoAuthority> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(NoAuthority::Missing("several Host headers"));
    }
    if let Some(a) = req.uri().authority() {
        if a.as_str().contains('@') {
            return Err(NoAuthority::Malformed(
                ":authority carries userinfo (RFC 9113 §8.3.1)",
            ));
        }
        if let Some(h) = host
            && !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
        {
            return Err(NoAuthority::Malformed(
                "the host header differs from :authority (RFC 9113 §8.3.1)",
            ));
        }
        return Ok(a.as_str().to_string());
    }
    match host {
        Some(h) => h
            .to_str()
            .map(str::to_string)
            .map_err(|_| NoAuthority::Missing("the Host header is not ASCII")),
        None => Err(NoAuthority::Missing("no :authority and no Host header")),
    }
}

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    let grpc = is_grpc(req.headers());
    let proto = if grpc { "grpc" } else { "h2c" };
    let proxy = &ctx.proxy;
    let auth = match authority(&req) {
        Ok(a) => a,
        Err(NoAuthority::Malformed(why)) => {
            // Refused even under --audit: there is no single name to forward it under.
            proxy.emit(proxy.refusal(&ctx.conn, proto, Reason::MalformedAuthority, &why, false));
            return plain(
                StatusCode::BAD_REQUEST,
                format!("passthrough: malformed request: {why}\n"),
            );
        }
        Err(NoAuthority::Missing(why)) => {
            let audit = proxy.cfg.audit;
            let mut o = proxy.refusal(&ctx.conn, proto, Reason::NoAuthority, &why, audit);
            if audit {
                // --audit: forward to where the client dialled, Host naming that address.
                let dst = ctx.conn.rec.dst;
                o.upstream = Some(dst);
                return respond(&ctx, grpc, "(none)", req, dst, o).await;
            }
            proxy.emit(o);
            return deny(&ctx, grpc, "(none)", why);
        }
    };
    // CONNECT and upgrades cannot be passed through per request: refused even under --audit.
    let refused = if req.method() == Method::CONNECT {
        Some((
            Reason::Connect,
            "CONNECT tunnels are not proxied".to_string(),
        ))
    } else {
        req.headers().get(header::UPGRADE).map(|up| {
            let up = String::from_utf8_lossy(up.as_bytes());
            (
                Reason::Upgrade,
                format!("protocol upgrade ({up}) is not proxied"),
            )
        })
    };
    if let Some((reason, why)) = refused {
        let mut o = proxy.refusal(&ctx.conn, proto, reason, &why, false);
        o.host = Some(auth.clone());
        proxy.emit(o);
        return deny(&ctx, grpc, &auth, &why);
    }
    let (target, o) = match ctx.allowed_again(proto, &auth) {
        Some(again) => again,
        None => {
            let l7 = L7::H2c(auth.clone());
            // Loaded before judging: a reload during the judgement makes the memo stale at once.
            let policy = proxy.policy.load_full();
            match proxy.judge(&ctx.conn, l7, proto, false).await {
                Judged {
                    target: Some(t),
                    outcome,
                    ..
                } => {
                    // Under --audit a target may be a would-be denial's: judge each one.
                    if !proxy.cfg.audit {
                        ctx.remember(policy, &auth, t, outcome.reason);
                    }
                    (t, outcome)
                }
                Judged {
                    target: None,
                    outcome,
                    refusal,
                } => {
                    proxy.emit(outcome);
                    return deny(&ctx, grpc, &auth, &refusal);
                }
            }
        }
    };
    respond(&ctx, grpc, &auth, req, target, o).await
}

/// Forwards an allowed (or `--audit`ed) stream to `target`. Its record `o` is emitted when the
/// response body is done, or at once when the upstream fails (`503`).
async fn respond(
    ctx: &Ctx,
    grpc: bool,
    auth: &str,
    req: Request<Incoming>,
    target: SocketAddr,
    mut o: Outcome,
) -> Response<Body> {
    let up = Arc::new(AtomicU64::new(0));
    match forward(ctx, req, target, up.clone()).await {
        Ok(resp) => {
            let (parts, body) = resp.into_parts();
            let body = Reported {
                inner: body,
                down: 0,
                pending: Some((ctx.proxy.clone(), o, up)),
            };
            Response::from_parts(parts, body.boxed())
        }
        Err(failure) => {
            let why = failure.error.clone();
            o.upstream_failure = Some(failure);
            ctx.proxy.emit(o);
            unavailable(ctx, grpc, auth, &why)
        }
    }
}

/// A request body whose DATA bytes are counted as they go upstream.
pub(crate) struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> hyper::body::Body for Counted<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            this.count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that counts its DATA bytes and, once hyper is done with it (after its last
/// frame, or on a reset), emits its stream's record with the bytes both ways.
struct Reported {
    inner: Incoming,
    /// Response body bytes so far.
    down: u64,
    /// The proxy to emit through, the record, and the request body's byte count.
    pending: Option<(Arc<Proxy>, Outcome, Arc<AtomicU64>)>,
}

impl hyper::body::Body for Reported {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            this.down += d.len() as u64;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Reported {
    fn drop(&mut self) {
        if let Some((proxy, mut o, up)) = self.pending.take() {
            o.add_bytes(up.load(Ordering::Relaxed), self.down);
            proxy.emit(o);
        }
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_te_trailers: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for h in super::h1::HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove(header::UPGRADE);
    if keep_te_trailers && te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Sends the request to `target` (its body counted into `up`) and returns the response, with
/// hop-by-hop fields removed both ways.
async fn forward(
    ctx: &Ctx,
    req: Request<Incoming>,
    target: SocketAddr,
    up: Arc<AtomicU64>,
) -> Result<Response<Incoming>, UpstreamFailure> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, true);
    let mut sender = h2_sender(ctx, target).await?;
    let body = Counted {
        inner: body,
        count: up,
    };
    let resp = sender
        .send_request(Request::from_parts(parts, body))
        .await
        .map_err(|e| UpstreamFailure {
            target,
            connect: false,
            error: format!("request to {target}: {e}"),
        })?;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Ok(Response::from_parts(parts, body))
}

async fn h2_sender(
    ctx: &Ctx,
    target: SocketAddr,
) -> Result<client2::SendRequest<Counted<Incoming>>, UpstreamFailure> {
    let mut ups = ctx.upstreams.lock().await;
    if let Some(s) = ups.get(&target)
        && !s.is_closed()
    {
        return Ok(s.clone());
    }
    let cfg = ctx.proxy.cfg();
    let io = relay::connect(target, cfg.upstream_mark, cfg.connect_timeout)
        .await
        .map_err(|e| UpstreamFailure {
            target,
            connect: true,
            error: e.to_string(),
        })?;
    let (sender, conn) = client2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .map_err(|e| UpstreamFailure {
            target,
            connect: false,
            error: format!("HTTP/2 handshake with {target}: {e}"),
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    ups.insert(target, sender.clone());
    Ok(sender)
}

fn full(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}

/// Percent-encodes a `grpc-message` (gRPC over HTTP/2 spec).
fn grpc_message(text: &str) -> HeaderValue {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static("denied"))
}

fn grpc_status(code: u8, message: &str) -> Response<Body> {
    let mut r = Response::new(full(String::new()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(u16::from(code)));
    h.insert("grpc-message", grpc_message(message));
    r
}

fn plain(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The answer to a denied request.
fn deny(_ctx: &Ctx, grpc: bool, host: &str, why: &str) -> Response<Body> {
    if grpc {
        return grpc_status(
            7,
            &format!("passthrough: no MeshPassthrough match allows {host} ({why})"),
        );
    }
    plain(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "passthrough: no MeshPassthrough match allowed the request to host {host}\nreason: {why}\n"
        ),
    )
}

/// The answer when the upstream cannot be reached.
fn unavailable(_ctx: &Ctx, grpc: bool, host: &str, why: &str) -> Response<Body> {
    if grpc {
        return grpc_status(
            14,
            &format!("passthrough: upstream for {host} unreachable: {why}"),
        );
    }
    plain(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("passthrough: the upstream for host {host} is unreachable: {why}\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_encoding() {
        assert_eq!(grpc_message("a b%c\n").to_str().unwrap(), "a b%25c%0A");
        assert_eq!(grpc_message("é").to_str().unwrap(), "%C3%A9");
    }

    #[test]
    fn hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-foo, keep-alive"),
        );
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, true);
        assert!(h.get("x-foo").is_none() && h.get(header::CONNECTION).is_none());
        assert!(h.get(header::UPGRADE).is_none());
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert!(h.get("x-keep").is_some());
    }

    fn req(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::get(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_authority_is_the_only_name_a_request_may_carry() {
        use NoAuthority::{Malformed, Missing};
        // :authority alone, or with a host header naming the same entity (ASCII case aside).
        assert_eq!(
            authority(&req("http://api.test/x", &[])),
            Ok("api.test".into())
        );
        assert_eq!(
            authority(&req("http://api.test:8080/", &["API.Test:8080"])),
            Ok("api.test:8080".into())
        );
        assert_eq!(
            authority(&req("http://[2001:db8::1]:80/", &["[2001:db8::1]:80"])),
            Ok("[2001:db8::1]:80".into())
        );
        // A host header naming anything else: another name, a port added or dropped, a
        // trailing dot (a different spelling an upstream may route differently).
        for h in [
            "evil.test",
            "api.test:8080",
            "api.test.",
            "api.test, evil.test",
        ] {
            assert!(
                matches!(authority(&req("http://api.test/", &[h])), Err(Malformed(_))),
                "host {h:?} beside :authority api.test must be refused"
            );
        }
        assert!(matches!(
            authority(&req("http://api.test:80/", &["api.test"])),
            Err(Malformed(_))
        ));
        // Userinfo in :authority, with or without a host header.
        for uri in [
            "http://x@api.test/",
            "http://u:p@api.test:80/",
            "http://evil.test@api.test/",
        ] {
            assert!(
                matches!(authority(&req(uri, &[])), Err(Malformed(_))),
                "{uri} must be refused"
            );
            assert!(matches!(
                authority(&req(uri, &["api.test"])),
                Err(Malformed(_))
            ));
        }
        // Without :authority, host is the authority; none, or several, is a denial as before.
        assert_eq!(
            authority(&req("/x", &["web.test:80"])),
            Ok("web.test:80".into())
        );
        assert!(matches!(authority(&req("/x", &[])), Err(Missing(_))));
        assert!(matches!(
            authority(&req("/x", &["a.test", "b.test"])),
            Err(Missing(_))
        ));
        assert!(matches!(
            authority(&req("http://api.test/", &["api.test", "api.test"])),
            Err(Missing(_))
        ));
    }
}
