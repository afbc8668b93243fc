//! Plaintext HTTP/1.x through the proxy, on peeked bytes ([`super::h1`]).
//!
//! One task per client connection runs request after request:
//! 1. read a request head (within [`super::ProxyConfig::peek_timeout`] once its first byte is
//!    here, at most [`super::ProxyConfig::max_peek`] bytes; an idle keep-alive connection waits
//!    for its next request without limit, as it did with hyper);
//! 2. judge its authority (absolute-form URI, else the single `Host`) like every request before
//!    it: a denial is `503` and the connection is closed; `CONNECT` and `Upgrade` are refused;
//!    the last allowed judgement is reused for a repeat of the same authority under the same
//!    policy (`http::Allowed`);
//! 3. write the head the proxy composed ([`super::h1::write_request_head`]) and the body bytes
//!    as they came to the upstream (one connection per client connection, kept while both ends
//!    keep it), while relaying the response to the client: its head as the origin sent it,
//!    its body as framed.
//!
//! Nothing is re-serialised that does not need to be: a keep-alive request is one read, one
//! parse, one write up and one read, one parse, one write down. Request and response flow at
//! the same time (`Expect: 100-continue`, an early error response); a response that ends before
//! its request body ends the connection. A reused upstream connection that turns out to be
//! closed before answering (the origin's idle timeout) is replaced once, for a request whose
//! body was already complete in the first write.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
    time::Instant,
};
use tracing::debug;

use super::{
    ConnInfo, Judged, Proxy,
    h1::{self, BodyReader, Field, RequestHead},
    http::Allowed,
    relay,
};
use passthrough_policy::{
    L7, Reason,
    outcome::{Outcome, UpstreamFailure},
};

/// Read size for bodies.
const CHUNK: usize = 16 * 1024;
/// How long to wait for the origin to close after a `Connection: close` exchange.
const ORIGIN_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Serves one plaintext HTTP/1 client connection, `first` being the bytes already read.
pub(crate) async fn serve(proxy: Arc<Proxy>, client: TcpStream, first: Vec<u8>, conn: ConnInfo) {
    let mut s = Session {
        proxy,
        conn,
        client,
        cbuf: first,
        fields: Vec::new(),
        out: Vec::with_capacity(1024),
        upstream: None,
        allowed: None,
    };
    while let Some(req) = s.read_request().await {
        if !s.exchange(req).await {
            break;
        }
    }
}

/// The upstream connection of a client connection.
struct Upstream {
    target: SocketAddr,
    stream: TcpStream,
    /// Response bytes read and not yet forwarded.
    buf: Vec<u8>,
    /// It has carried an exchange (so it may have been closed by the origin since).
    used: bool,
}

struct Session {
    proxy: Arc<Proxy>,
    conn: ConnInfo,
    client: TcpStream,
    /// Client bytes read and not yet forwarded (a head being read, or a pipelined request).
    cbuf: Vec<u8>,
    /// The fields of the current request head that go upstream.
    fields: Vec<Field>,
    /// The head (and body bytes) being written upstream.
    out: Vec<u8>,
    upstream: Option<Upstream>,
    allowed: Option<Allowed>,
}

/// How a response relay ended badly.
enum RelayError {
    /// The upstream closed or reset before sending a byte: a reused connection gone stale.
    Stale,
    /// Nothing reached the client yet: it can still get a `502`.
    BeforeForward(String),
    /// Part of the response reached the client: only closing is left.
    Midway(String),
}

/// How a response relay ended well.
struct Relayed {
    /// The upstream connection can carry another exchange.
    persistent: bool,
}

impl Session {
    /// Reads the next request head; `None` when the connection is done (closed by the client,
    /// or answered with an error and closed).
    async fn read_request(&mut self) -> Option<RequestHead> {
        let cfg = self.proxy.cfg();
        let mut deadline = None;
        let mut parse = !self.cbuf.is_empty();
        loop {
            if parse {
                match h1::parse_request(&self.cbuf, &mut self.fields) {
                    Ok(Some(r)) => return Some(r),
                    Ok(None) => {}
                    Err(e) => {
                        let (code, reason) = e.status();
                        debug!(target: "passthrough::proxy", peer = %self.conn.peer, error = %e, "bad request");
                        self.refuse(code, reason, &format!("passthrough: {e}\n"))
                            .await;
                        return None;
                    }
                }
                if self.cbuf.len() >= cfg.max_peek {
                    let why = format!(
                        "passthrough: request head larger than {} bytes\n",
                        cfg.max_peek
                    );
                    self.refuse(431, "Request Header Fields Too Large", &why)
                        .await;
                    return None;
                }
            }
            if !self.cbuf.is_empty() {
                deadline.get_or_insert_with(|| Instant::now() + cfg.peek_timeout);
            }
            let have = self.cbuf.len();
            self.cbuf.reserve(4096);
            let read = self.client.read_buf(&mut self.cbuf);
            let n = match deadline {
                None => read.await,
                Some(d) => match tokio::time::timeout_at(d, read).await {
                    Ok(r) => r,
                    Err(_) => {
                        let why = format!(
                            "passthrough: no complete request head within {:?}\n",
                            cfg.peek_timeout
                        );
                        self.refuse(408, "Request Timeout", &why).await;
                        return None;
                    }
                },
            };
            match n {
                Ok(0) | Err(_) => return None,
                // Parse again only once a line has ended: a head trickling in byte by byte is
                // not re-parsed per byte.
                Ok(_) => parse = self.cbuf[have..].contains(&b'\n'),
            }
        }
    }

    /// Judges, forwards and answers one request; emits its record; false when the connection
    /// is done.
    async fn exchange(&mut self, req: RequestHead) -> bool {
        let Some((host, target, outcome)) = self.decide(&req).await else {
            return false;
        };
        self.forward(&req, &host, target, outcome).await
    }

    /// Forwards one allowed (or `--audit`ed) request to `target` and relays its response,
    /// adding the bytes and any upstream failure to `o`, which it emits as soon as the
    /// exchange is over (before a final error answer, so the answer never precedes the
    /// record); false when the connection is done.
    async fn forward(
        &mut self,
        req: &RequestHead,
        host: &str,
        target: SocketAddr,
        mut o: Outcome,
    ) -> bool {
        self.out.clear();
        h1::write_request_head(
            &self.cbuf,
            req,
            &self.fields,
            host,
            req.closes,
            &mut self.out,
        );
        self.cbuf.drain(..req.head_len);
        // Body bytes that came with the head go in the same write.
        let mut body = BodyReader::new(req.body);
        let k = match body.advance(&self.cbuf) {
            Ok(k) => k,
            Err(e) => {
                self.proxy.emit(o);
                self.refuse(400, "Bad Request", &format!("passthrough: {e}\n"))
                    .await;
                return false;
            }
        };
        self.out.extend_from_slice(&self.cbuf[..k]);
        self.cbuf.drain(..k);
        let complete_in_first_write = body.done();

        let mut retried = false;
        loop {
            if let Err(why) = self.ensure_upstream(target).await {
                let text =
                    format!("passthrough: the upstream for host {host} is unreachable: {why}\n");
                o.upstream_failure = Some(UpstreamFailure {
                    target,
                    connect: true,
                    error: why,
                });
                self.proxy.emit(o);
                self.refuse(503, "Service Unavailable", &text).await;
                return false;
            }
            let Some(up) = self.upstream.as_mut() else {
                self.proxy.emit(o);
                return false;
            };
            let reused = std::mem::replace(&mut up.used, true);
            let (mut cr, mut cw) = self.client.split();
            let (mut ur, mut uw) = up.stream.split();
            let mut up_count = self.out.len() as u64;
            let mut down_count = 0u64;
            let sent = uw.write_all(&self.out).await;
            let result = match sent {
                Err(_) => Err(RelayError::Stale),
                Ok(()) => {
                    let mut body_ok = body.done();
                    let forward =
                        forward_body(&mut cr, &mut uw, &mut self.cbuf, &mut body, &mut up_count);
                    let respond = relay_response(
                        &mut ur,
                        &mut cw,
                        &mut up.buf,
                        req.is_head,
                        self.proxy.cfg().max_peek,
                        &mut down_count,
                    );
                    tokio::pin!(forward, respond);
                    loop {
                        tokio::select! {
                            r = &mut forward, if !body_ok => match r {
                                Ok(()) => body_ok = true,
                                Err(e) => break Err(RelayError::Midway(format!("request body: {e}"))),
                            },
                            r = &mut respond => break r.map(|end| (end, body_ok)),
                        }
                    }
                }
            };
            o.add_bytes(up_count, down_count);
            match result {
                Ok((end, body_done)) => {
                    self.proxy.emit(o);
                    let keep = end.persistent && body_done && !req.closes;
                    if !end.persistent {
                        self.close_upstream(req.closes).await;
                    }
                    // A client that asked to close and sent nothing more is simply closed; one
                    // that may have sent more (the origin ended the connection, or bytes are
                    // buffered) is closed gently, so that a reset cannot destroy the answer.
                    let asked_and_done = req.closes && self.cbuf.is_empty();
                    if !(keep || asked_and_done) {
                        super::close_gently(&mut self.client).await;
                    }
                    return keep;
                }
                Err(RelayError::Stale) if reused && complete_in_first_write && !retried => {
                    // The origin closed this idle connection: one more try on a fresh one.
                    retried = true;
                    self.upstream = None;
                }
                Err(RelayError::Stale) => {
                    self.upstream = None;
                    let why = "the upstream closed the connection without answering";
                    self.bad_gateway(host, target, why, o).await;
                    return false;
                }
                Err(RelayError::BeforeForward(why)) => {
                    self.upstream = None;
                    self.bad_gateway(host, target, &why, o).await;
                    return false;
                }
                Err(RelayError::Midway(why)) => {
                    self.proxy.emit(o);
                    debug!(
                        target: "passthrough::proxy",
                        peer = %self.conn.peer, %target, host = %host, error = %why,
                        "exchange cut short; closing both connections"
                    );
                    self.upstream = None;
                    return false;
                }
            }
        }
    }

    /// Makes [`Session::upstream`] a connection to `target`: the current one when it goes
    /// there, else a new one.
    async fn ensure_upstream(&mut self, target: SocketAddr) -> Result<(), String> {
        if self
            .upstream
            .as_ref()
            .is_some_and(|u| u.target != target || !u.buf.is_empty())
        {
            self.upstream = None;
        }
        if self.upstream.is_none() {
            let cfg = self.proxy.cfg();
            let stream = relay::connect(target, cfg.upstream_mark, cfg.connect_timeout)
                .await
                .map_err(|e| e.to_string())?;
            self.upstream = Some(Upstream {
                target,
                stream,
                buf: Vec::with_capacity(CHUNK),
                used: false,
            });
        }
        Ok(())
    }

    /// Drops the upstream connection. After a `Connection: close` request the origin closes
    /// first (`origin_closes`): wait a moment for its FIN so that the TIME_WAIT state stays on
    /// its side. Closing first here would leave one TIME_WAIT per request on the proxy's
    /// upstream address, whose ephemeral ports to one destination then run short
    /// (`tcp_tw_reuse` does not cover non-loopback peers).
    async fn close_upstream(&mut self, origin_closes: bool) {
        let Some(mut up) = self.upstream.take() else {
            return;
        };
        let mut sink = [0u8; 512];
        // Usually the FIN is already here: no timer for that.
        if origin_closes && !matches!(up.stream.try_read(&mut sink), Ok(0)) {
            let _ = tokio::time::timeout(ORIGIN_CLOSE_WAIT, async {
                while let Ok(n) = up.stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        }
    }

    /// Decides the request: `Some((Host for the upstream, target, its record))`, or `None`
    /// when it was refused (its record emitted, answered and closed).
    async fn decide(&mut self, req: &RequestHead) -> Option<(String, SocketAddr, Outcome)> {
        let proto = "http1";
        // CONNECT and upgrades cannot be passed through per request: refused even under --audit.
        if req.is_connect || req.upgrade.is_some() {
            let host = req.authority.as_deref().ok();
            let (code, why) = match &req.upgrade {
                Some(up) if !req.is_connect => (
                    Reason::Upgrade,
                    format!("protocol upgrade ({up}) is not proxied"),
                ),
                _ => (
                    Reason::Connect,
                    "CONNECT tunnels are not proxied".to_string(),
                ),
            };
            let mut o = self.proxy.refusal(&self.conn, proto, code, &why, false);
            o.host = host.map(str::to_string);
            self.proxy.emit(o);
            self.deny(host.unwrap_or("(none)"), &why).await;
            return None;
        }
        let auth = match &req.authority {
            Ok(a) => a.clone(),
            Err(why) => {
                let audit = self.proxy.cfg().audit;
                let mut o = self
                    .proxy
                    .refusal(&self.conn, proto, Reason::NoAuthority, why, audit);
                if audit {
                    // --audit: forward to where the client dialled, Host naming that address.
                    let dst = self.conn.rec.dst;
                    o.upstream = Some(dst);
                    return Some((dst.to_string(), dst, o));
                }
                self.proxy.emit(o);
                self.deny("(none)", why).await;
                return None;
            }
        };
        if let Some(a) = &self.allowed
            && let Some(t) = a.target_for(&auth, &self.proxy)
        {
            let o = a.reused(&self.conn, proto, &auth);
            return Some((auth, t, o));
        }
        // Loaded before judging: a reload during the judgement makes the memo stale at once.
        let policy = self.proxy.policy.load_full();
        match self
            .proxy
            .judge(&self.conn, L7::Http1(auth.clone()), proto, false)
            .await
        {
            Judged {
                target: Some(t),
                outcome,
                ..
            } => {
                // Under --audit a target may be a would-be denial's: judge each one.
                if !self.proxy.cfg().audit {
                    self.allowed = Some(Allowed::new(policy, &auth, t, outcome.reason));
                }
                Some((auth, t, outcome))
            }
            Judged {
                target: None,
                outcome,
                refusal,
            } => {
                self.proxy.emit(outcome);
                self.deny(&auth, &refusal).await;
                None
            }
        }
    }

    async fn deny(&mut self, host: &str, why: &str) {
        let text = format!(
            "passthrough: no MeshPassthrough match allowed the request to host {host}\nreason: {why}\n"
        );
        self.refuse(503, "Service Unavailable", &text).await;
    }

    /// Answers `502` for an upstream that failed after the request was sent; emits `o` with
    /// the failure first.
    async fn bad_gateway(&mut self, host: &str, target: SocketAddr, why: &str, mut o: Outcome) {
        o.upstream_failure = Some(UpstreamFailure {
            target,
            connect: false,
            error: why.to_string(),
        });
        self.proxy.emit(o);
        let text = format!("passthrough: the upstream for host {host} failed: {why}\n");
        self.refuse(502, "Bad Gateway", &text).await;
    }

    /// Answers with `status` and a plain-text `body`, then closes the connection.
    async fn refuse(&mut self, status: u16, reason: &str, body: &str) {
        let resp = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = self.client.write_all(resp.as_bytes()).await;
        super::close_gently(&mut self.client).await;
    }
}

/// Forwards the rest of a request body (everything buffered was already sent with the head).
/// Bytes read past its end (a pipelined request) stay in `cbuf`.
async fn forward_body(
    cr: &mut ReadHalf<'_>,
    uw: &mut WriteHalf<'_>,
    cbuf: &mut Vec<u8>,
    body: &mut BodyReader,
    sent: &mut u64,
) -> io::Result<()> {
    while !body.done() {
        cbuf.clear();
        cbuf.reserve(CHUNK);
        if cr.read_buf(cbuf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let k = body
            .advance(cbuf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        uw.write_all(&cbuf[..k]).await?;
        *sent += k as u64;
        cbuf.drain(..k);
    }
    Ok(())
}

/// Relays one response (after any 1xx) from the upstream to the client.
async fn relay_response(
    ur: &mut ReadHalf<'_>,
    cw: &mut WriteHalf<'_>,
    ubuf: &mut Vec<u8>,
    head_request: bool,
    max_head: usize,
    sent: &mut u64,
) -> Result<Relayed, RelayError> {
    let mut forwarded = false;
    let early = |forwarded: bool, why: String| {
        if forwarded {
            RelayError::Midway(why)
        } else {
            RelayError::BeforeForward(why)
        }
    };
    loop {
        let head = loop {
            match h1::parse_response(ubuf, head_request) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(e) => return Err(early(forwarded, e.to_string())),
            }
            if ubuf.len() >= max_head {
                return Err(early(
                    forwarded,
                    format!("response head larger than {max_head} bytes"),
                ));
            }
            ubuf.reserve(CHUNK);
            match ur.read_buf(ubuf).await {
                Ok(n) if n > 0 => {}
                // Closed or reset before a byte of an answer: a stale reused connection.
                Ok(_) | Err(_) if ubuf.is_empty() && !forwarded => return Err(RelayError::Stale),
                Ok(_) => return Err(early(forwarded, "the upstream closed mid-head".into())),
                Err(e) => return Err(early(forwarded, e.to_string())),
            }
        };
        if head.is_interim() {
            let n = head.head_len;
            cw.write_all(&ubuf[..n])
                .await
                .map_err(|e| RelayError::Midway(format!("client: {e}")))?;
            *sent += n as u64;
            forwarded = true;
            ubuf.drain(..n);
            continue;
        }
        let mut body = BodyReader::new(head.body);
        let k = body
            .advance(&ubuf[head.head_len..])
            .map_err(|e| early(forwarded, e.to_string()))?;
        let n = head.head_len + k;
        cw.write_all(&ubuf[..n])
            .await
            .map_err(|e| RelayError::Midway(format!("client: {e}")))?;
        *sent += n as u64;
        ubuf.drain(..n);
        while !body.done() {
            ubuf.clear();
            ubuf.reserve(CHUNK);
            match ur.read_buf(ubuf).await {
                Ok(0) if matches!(body, BodyReader::UntilClose) => {
                    return Ok(Relayed { persistent: false });
                }
                Ok(0) => return Err(RelayError::Midway("the upstream closed mid-body".into())),
                Ok(_) => {}
                Err(e) => return Err(RelayError::Midway(e.to_string())),
            }
            let k = body
                .advance(ubuf)
                .map_err(|e| RelayError::Midway(e.to_string()))?;
            cw.write_all(&ubuf[..k])
                .await
                .map_err(|e| RelayError::Midway(format!("client: {e}")))?;
            *sent += k as u64;
            ubuf.drain(..k);
        }
        // Bytes past the response's end were never asked for: do not reuse the connection.
        return Ok(Relayed {
            persistent: head.persistent && ubuf.is_empty(),
        });
    }
}
