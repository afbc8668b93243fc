//! Plaintext HTTP/1.x and h2c (prior knowledge), proxied per request with hyper.
//!
//! Every request (HTTP/1, keep-alive included) and every stream (h2c) is judged on its own
//! authority, so a keep-alive connection cannot smuggle a second host:
//! - HTTP/1: the absolute-form URI's authority when there is one (RFC 9112 §3.2.2: it wins over
//!   `Host`), else the `Host` header; none (e.g. HTTP/1.0 without `Host`) or several `Host`
//!   headers → denied. Upstream gets an origin-form request whose `Host` is the judged authority.
//! - h2c: `:authority`, else `Host`; judged against `http2` and `grpc` matches.
//! - `CONNECT` and `Upgrade` (`h2c`, WebSocket, …) are denied: the tunnelled bytes could not be
//!   judged per request.
//! - Repeats are cheap: a request whose authority is identical to the connection's last allowed
//!   one, under the same policy and within [`REUSE_JUDGEMENT_FOR`], reuses that judgement's
//!   target (no policy lookup, destination check or decision event). Any other authority, a
//!   reload, or an older judgement is judged in full. Not under `--audit`.
//!
//! A denied request gets `503` with a plain-text body naming the host and saying no
//! MeshPassthrough match allowed it; on HTTP/1 the connection is then closed. A denied gRPC call
//! (h2c, `content-type: application/grpc…`) gets a trailers-only response: HTTP 200,
//! `grpc-status: 7` (PERMISSION_DENIED) and a `grpc-message`. Other streams of the same h2c
//! connection go on. An unreachable upstream is `503` (gRPC: `grpc-status: 14`, UNAVAILABLE).

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode, Uri,
    body::Incoming,
    client::conn::{http1 as client1, http2 as client2},
    header::{self, HeaderMap, HeaderName, HeaderValue},
    server::conn::{http1 as server1, http2 as server2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::metrics::counter::Counter;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::Mutex,
};
use tracing::{debug, warn};

use super::{ConnInfo, Judgement, Proxy, relay};
use crate::policy::L7;

/// Response body type of the proxy.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A stream that first yields bytes already read from it.
#[derive(Debug)]
pub struct Rewind {
    pre: Bytes,
    inner: TcpStream,
    // obs: bytes read from / written to the client (passthrough_proxy_bytes_total).
    counted: Option<(Counter, Counter)>,
}

impl Rewind {
    /// `inner`, with `pre` put back in front.
    pub fn new(pre: Vec<u8>, inner: TcpStream) -> Self {
        Rewind {
            pre: Bytes::from(pre),
            inner,
            counted: None,
        }
    }

    /// Counts bytes read from the client into `up` and bytes written to it into `down`.
    pub fn counted(mut self, up: Counter, down: Counter) -> Self {
        self.counted = Some((up, down));
        self
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            let chunk = self.pre.split_to(n);
            buf.put_slice(&chunk);
            Poll::Ready(Ok(()))
        } else {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        };
        if let Some((up, _)) = &self.counted {
            up.inc_by((buf.filled().len() - before) as u64);
        }
        r
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let (Some((_, down)), Poll::Ready(Ok(n))) = (&self.counted, &r) {
            down.inc_by(*n as u64);
        }
        r
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
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let (Some((_, down)), Poll::Ready(Ok(n))) = (&self.counted, &r) {
            down.inc_by(*n as u64);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Upstream connections of one client connection.
#[derive(Default)]
struct Upstreams {
    h1: Option<(SocketAddr, client1::SendRequest<Incoming>)>,
    h2: HashMap<SocketAddr, client2::SendRequest<Incoming>>,
}

struct Ctx {
    proxy: Arc<Proxy>,
    conn: ConnInfo,
    h2: bool,
    upstreams: Mutex<Upstreams>,
    /// The last allowed judgement of this connection (see [`Allowed`]).
    allowed: std::sync::Mutex<Option<Allowed>>,
}

/// How long an allowed judgement of a connection is reused for later requests to the same
/// authority: bounds how stale its destination check (DNS) can get.
const REUSE_JUDGEMENT_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// An allowed judgement, reused for later requests of the same connection whose authority is
/// byte-for-byte the same, under the same policy (pointer-equal), within
/// [`REUSE_JUDGEMENT_FOR`]. Every request's authority is still compared; only the policy
/// lookup, the destination check and the decision event are skipped for repeats (one event
/// per judgement, not per request).
struct Allowed {
    policy: Arc<super::ProxyPolicy>,
    authority: String,
    target: SocketAddr,
    at: std::time::Instant,
}

impl Ctx {
    /// The target of an earlier allowed judgement that still applies to `authority`.
    fn allowed_again(&self, authority: &str) -> Option<SocketAddr> {
        let memo = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
        let a = memo.as_ref()?;
        (a.authority == authority
            && a.at.elapsed() < REUSE_JUDGEMENT_FOR
            && Arc::ptr_eq(&a.policy, &self.proxy.policy.load()))
        .then_some(a.target)
    }

    fn remember(&self, policy: Arc<super::ProxyPolicy>, authority: &str, target: SocketAddr) {
        *self.allowed.lock().unwrap_or_else(|e| e.into_inner()) = Some(Allowed {
            policy,
            authority: authority.to_string(),
            target,
            at: std::time::Instant::now(),
        });
    }
}

/// Serves one plaintext client connection (`h2` = prior-knowledge HTTP/2), `first` being the
/// bytes already read.
pub(crate) async fn serve(
    proxy: Arc<Proxy>,
    client: TcpStream,
    first: Vec<u8>,
    conn: ConnInfo,
    h2: bool,
) {
    let peer = conn.peer;
    let (up, down) = proxy
        .metrics()
        .bytes_counters(&proxy.metrics().workload_name(conn.rec.workload));
    let ctx = Arc::new(Ctx {
        proxy,
        conn,
        h2,
        upstreams: Mutex::new(Upstreams::default()),
        allowed: std::sync::Mutex::new(None),
    });
    let io = TokioIo::new(Rewind::new(first, client).counted(up, down));
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(ctx, req).await) }
    });
    let r = if h2 {
        server2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await
    } else {
        server1::Builder::new().serve_connection(io, svc).await
    };
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

/// The authority to judge, or why there is none.
fn authority(req: &Request<Incoming>) -> Result<String, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("several Host headers");
    }
    if let Some(a) = req.uri().authority() {
        // Absolute-form (HTTP/1) or :authority (h2); userinfo is dropped.
        return Ok(match a.port() {
            Some(p) => format!("{}:{}", a.host(), p),
            None => a.host().to_string(),
        });
    }
    match host {
        Some(h) => h
            .to_str()
            .map(str::to_string)
            .map_err(|_| "the Host header is not ASCII"),
        None => Err("no Host header and no absolute-form authority"),
    }
}

async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    let grpc = ctx.h2 && is_grpc(req.headers());
    let proto = match (ctx.h2, grpc) {
        (true, true) => "grpc",
        (true, false) => "h2c",
        _ => "http1",
    };
    let auth = match authority(&req) {
        Ok(a) => a,
        Err(why) => {
            if ctx
                .proxy
                .report_deny(&ctx.conn, proto, None, None, "no_authority", &why)
            {
                // --audit: forward to where the client dialled, Host naming that address.
                let dst = ctx.conn.rec.dst;
                return match forward(&ctx, req, &dst.to_string(), dst).await {
                    Ok(resp) => resp,
                    Err(why) => unavailable(&ctx, grpc, "(none)", &why),
                };
            }
            return deny(&ctx, grpc, "(none)", why);
        }
    };
    // CONNECT and upgrades cannot be passed through per request: refused even under --audit.
    if req.method() == Method::CONNECT {
        ctx.proxy.report_deny_with(
            &ctx.conn,
            proto,
            None,
            Some(&auth),
            "connect",
            &"CONNECT is not proxied",
            false,
        );
        return deny(&ctx, grpc, &auth, "CONNECT tunnels are not proxied");
    }
    if let Some(up) = req.headers().get(header::UPGRADE) {
        let up = String::from_utf8_lossy(up.as_bytes()).into_owned();
        let why = format!("protocol upgrade ({up}) is not proxied");
        ctx.proxy
            .report_deny_with(&ctx.conn, proto, None, Some(&auth), "upgrade", &why, false);
        return deny(&ctx, grpc, &auth, &why);
    }
    let target = match ctx.allowed_again(&auth) {
        Some(t) => t,
        None => {
            let l7 = if ctx.h2 {
                L7::H2c(auth.clone())
            } else {
                L7::Http1(auth.clone())
            };
            // Loaded before judging: a reload during the judgement makes the memo stale at once.
            let policy = ctx.proxy.policy.load_full();
            match ctx.proxy.judge(&ctx.conn, l7, proto, false).await {
                Judgement::Allow(t) => {
                    // Under --audit an Allow may be a reported would-be denial: judge each one.
                    if !ctx.proxy.cfg.audit {
                        ctx.remember(policy, &auth, t);
                    }
                    t
                }
                Judgement::Deny(why) => return deny(&ctx, grpc, &auth, &why),
            }
        }
    };
    match forward(&ctx, req, &auth, target).await {
        Ok(resp) => resp,
        Err(why) => {
            warn!(
                target: "passthrough::proxy",
                workload = %ctx.proxy.metrics().workload_name(ctx.conn.rec.workload),
                workload_id = ctx.conn.rec.workload, pid = ctx.conn.rec.pid,
                comm = %ctx.conn.rec.comm, peer = %ctx.conn.peer, dst = %ctx.conn.rec.dst,
                %target, host = %auth, error = %why, "upstream failed"
            );
            unavailable(&ctx, grpc, &auth, &why)
        }
    }
}

/// Headers that belong to one hop (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

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
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove(header::UPGRADE);
    if keep_te_trailers && te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

async fn forward(
    ctx: &Ctx,
    req: Request<Incoming>,
    auth: &str,
    target: SocketAddr,
) -> Result<Response<Body>, String> {
    let (mut parts, body) = req.into_parts();
    let close = !ctx.h2 && client_closes(&parts);
    strip_hop_by_hop(&mut parts.headers, ctx.h2);
    if close {
        // The client connection ends after this answer, and with it the upstream one: let the
        // origin close first, so the TIME_WAIT state stays there. Closing first here would leave
        // one TIME_WAIT per request on the proxy's upstream address, whose ephemeral ports to
        // one destination then run short (tcp_tw_reuse does not cover non-loopback peers).
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let resp = if ctx.h2 {
        let mut sender = h2_sender(ctx, target).await?;
        sender
            .send_request(Request::from_parts(parts, body))
            .await
            .map_err(|e| format!("request to {target}: {e}"))?
    } else {
        // Origin-form toward upstream, with the judged authority as Host.
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = pq.parse::<Uri>().map_err(|e| e.to_string())?;
        let host = HeaderValue::from_str(auth).map_err(|e| e.to_string())?;
        parts.headers.insert(header::HOST, host);
        let mut ups = ctx.upstreams.lock().await;
        let reuse = matches!(&ups.h1, Some((t, s)) if *t == target && !s.is_closed());
        if !reuse {
            let io = connect(ctx, target).await?;
            let (sender, conn) = client1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| format!("HTTP/1 handshake with {target}: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            ups.h1 = Some((target, sender));
        }
        let Some((_, sender)) = ups.h1.as_mut() else {
            return Err("no upstream connection".into());
        };
        sender
            .ready()
            .await
            .map_err(|e| format!("upstream {target}: {e}"))?;
        sender
            .send_request(Request::from_parts(parts, body))
            .await
            .map_err(|e| format!("request to {target}: {e}"))?
    };
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Ok(Response::from_parts(parts, body.boxed()))
}

/// Whether an HTTP/1 client ends its connection after this request: `Connection: close`, or
/// HTTP/1.0 without `Connection: keep-alive` (RFC 9112 §9.3).
fn client_closes(parts: &hyper::http::request::Parts) -> bool {
    let has = |token: &str| {
        parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has("close") || (parts.version == hyper::Version::HTTP_10 && !has("keep-alive"))
}

async fn h2_sender(
    ctx: &Ctx,
    target: SocketAddr,
) -> Result<client2::SendRequest<Incoming>, String> {
    let mut ups = ctx.upstreams.lock().await;
    if let Some(s) = ups.h2.get(&target)
        && !s.is_closed()
    {
        return Ok(s.clone());
    }
    let io = connect(ctx, target).await?;
    let (sender, conn) = client2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP/2 handshake with {target}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    ups.h2.insert(target, sender.clone());
    Ok(sender)
}

async fn connect(ctx: &Ctx, target: SocketAddr) -> Result<TcpStream, String> {
    let cfg = ctx.proxy.cfg();
    relay::connect(target, cfg.upstream_mark, cfg.connect_timeout)
        .await
        .map_err(|e| {
            let m = ctx.proxy.metrics();
            m.upstream_connect_error(&m.workload_name(ctx.conn.rec.workload));
            e.to_string()
        })
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

fn plain(ctx: &Ctx, status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if !ctx.h2 {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The answer to a denied request.
fn deny(ctx: &Ctx, grpc: bool, host: &str, why: &str) -> Response<Body> {
    if grpc {
        return grpc_status(
            7,
            &format!("passthrough: no MeshPassthrough match allows {host} ({why})"),
        );
    }
    plain(
        ctx,
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "passthrough: no MeshPassthrough match allowed the request to host {host}\nreason: {why}\n"
        ),
    )
}

/// The answer when the upstream cannot be reached.
fn unavailable(ctx: &Ctx, grpc: bool, host: &str, why: &str) -> Response<Body> {
    if grpc {
        return grpc_status(
            14,
            &format!("passthrough: upstream for {host} unreachable: {why}"),
        );
    }
    plain(
        ctx,
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
    fn client_closes_on_close_token_or_plain_http10() {
        use hyper::Version;
        let closes = |version, conn: Option<&'static str>| {
            let mut b = Request::get("/").version(version);
            if let Some(c) = conn {
                b = b.header(header::CONNECTION, c);
            }
            client_closes(&b.body(()).unwrap().into_parts().0)
        };
        assert!(closes(Version::HTTP_11, Some("Close")));
        assert!(closes(Version::HTTP_11, Some("x-foo, close")));
        assert!(!closes(Version::HTTP_11, None));
        assert!(!closes(Version::HTTP_11, Some("keep-alive")));
        assert!(closes(Version::HTTP_10, None));
        assert!(!closes(Version::HTTP_10, Some("keep-alive")));
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
}
