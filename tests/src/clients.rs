//! Real clients for the proxy's kernel tests, run by `pt-probe` inside the workload cgroup (and
//! netns): one JSON request in, one JSON answer out (see [`run`]).
//!
//! Every operation first `connect()`s (3 s timeout) to `addr` and reports `peer` (what
//! `getpeername()` says: the dialled address when the kernel redirected the socket to the proxy)
//! and `local`. Failures are `{"ok": false, "stage": "connect"|"handshake"|"io"|..., "errno": N?,
//! "error": "..."}`.
//!
//! | `op`        | fields                                      | answer on success |
//! |-------------|---------------------------------------------|-------------------|
//! | `tls`       | `addr`, `sni` (null: no SNI), `ca`, `name`? | `greeting` (the server's first line), `echo` (what came back after a half-close) |
//! | `raw_hello` | `addr`, `sni` (verbatim bytes)              | `reply_hex` (≤ 16 bytes), `eof`, `read_errno` (null, or why the read failed: ECONNRESET…) |
//! | `http1`     | `addr`, `requests: [{host, path?, absolute?}]` (one keep-alive connection) | `responses: [{status, body} \| {error}]` |
//! | `h2c`       | `addr`, `requests: [{authority, path?, host?}]` (one connection, prior knowledge; `host`: a `host` header beside `:authority`) | `responses` |
//! | `grpc`      | `addr`, `authority`, `path`                 | `status`, `grpc_status`, `grpc_message`, `body` |
//! | `tcp`       | `addr`                                      | `first_read` (`eof` or `data` or `timeout`) within 2 s |
//! | `parallel`  | `requests: [...]` (no `addr`)               | `results`: each request's answer, all run at once |

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use passthrough_testhello::{Hello, TLS12, TLS13};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned, pki_types::ServerName};
use serde_json::{Value, json};

use crate::sys::{self, errno};

const TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(6);

fn fail(stage: &str, e: impl std::fmt::Display) -> Value {
    json!({"ok": false, "stage": stage, "error": e.to_string()})
}

/// Runs one request; never panics on bad input (answers `{"ok": false, "stage": "request"}`).
/// `{"op": "parallel", "requests": [...]}` runs its requests at the same time, one thread each,
/// and answers `{"ok": true, "results": [...]}` in request order.
pub fn run(req: &Value) -> Value {
    if req["op"] == "parallel" {
        let reqs = req["requests"].as_array().cloned().unwrap_or_default();
        let barrier = Arc::new(std::sync::Barrier::new(reqs.len()));
        let handles: Vec<_> = reqs
            .into_iter()
            .map(|r| {
                let b = barrier.clone();
                std::thread::spawn(move || {
                    b.wait();
                    run(&r)
                })
            })
            .collect();
        let results: Vec<Value> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| fail("request", "client thread panicked"))
            })
            .collect();
        return json!({"ok": true, "results": results});
    }
    let Some(addr) = req["addr"]
        .as_str()
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        return fail("request", "missing or bad addr");
    };
    let s = match TcpStream::connect_timeout(&addr, TIMEOUT) {
        Ok(s) => s,
        Err(e) => return sys::fail("connect", &e),
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(IO_TIMEOUT));
    let _ = s.set_write_timeout(Some(IO_TIMEOUT));
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut out = match req["op"].as_str().unwrap_or("") {
        "tls" => tls(s, req),
        "raw_hello" => raw_hello(s, req),
        "http1" | "h2c" | "grpc" => http(s, req),
        "tcp" => tcp(s),
        other => fail("request", format!("unknown op {other:?}")),
    };
    out["peer"] = json!(peer);
    out["local"] = json!(local);
    out
}

fn tcp(mut s: TcpStream) -> Value {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => json!({"ok": true, "first_read": "eof"}),
        Ok(n) => json!({"ok": true, "first_read": "data", "n": n}),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            json!({"ok": true, "first_read": "timeout"})
        }
        Err(e) => json!({"ok": true, "first_read": "error", "errno": errno(&e)}),
    }
}

fn roots(ca: &str) -> Result<RootCertStore, String> {
    let pem = std::fs::read(ca).map_err(|e| format!("{ca}: {e}"))?;
    let mut roots = RootCertStore::empty();
    for c in rustls_pemfile_certs(&pem) {
        roots.add(c).map_err(|e| e.to_string())?;
    }
    Ok(roots)
}

/// The DER certificates in a PEM file (base64 between BEGIN/END CERTIFICATE lines).
fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect()
}

fn tls(s: TcpStream, req: &Value) -> Value {
    let sni = req["sni"].as_str();
    let roots = match roots(req["ca"].as_str().unwrap_or("")) {
        Ok(r) => r,
        Err(e) => return fail("request", e),
    };
    let mut cfg = ClientConfig::builder_with_provider(crate::l7::provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.enable_sni = sni.is_some();
    let name = sni
        .or(req["name"].as_str())
        .unwrap_or("api.test")
        .to_string();
    let name = match ServerName::try_from(name) {
        Ok(n) => n,
        Err(e) => return fail("request", e),
    };
    let conn = match ClientConnection::new(Arc::new(cfg), name) {
        Ok(c) => c,
        Err(e) => return fail("request", e),
    };
    let mut t = StreamOwned::new(conn, s);
    // The handshake runs on the first read: the server's greeting line.
    let mut greeting = Vec::new();
    loop {
        let mut b = [0u8; 1];
        match t.read(&mut b) {
            Ok(0) => return fail("handshake", "eof before the greeting"),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => greeting.push(b[0]),
            Err(e) => {
                let stage = if t.conn.is_handshaking() {
                    "handshake"
                } else {
                    "io"
                };
                return json!({"ok": false, "stage": stage, "error": e.to_string(), "errno": errno(&e)});
            }
        }
    }
    let send = req["send"].as_str().unwrap_or("ping");
    if let Err(e) = t.write_all(send.as_bytes()).and_then(|_| t.flush()) {
        return sys::fail("io", &e);
    }
    // Half-close: close_notify, then FIN; the server still answers.
    t.conn.send_close_notify();
    if let Err(e) = t.flush() {
        return sys::fail("io", &e);
    }
    let _ = t.sock.shutdown(Shutdown::Write);
    let mut rest = Vec::new();
    if let Err(e) = t.read_to_end(&mut rest) {
        // A peer that closes without close_notify after answering: keep what arrived.
        if e.kind() != io::ErrorKind::UnexpectedEof {
            return sys::fail("io", &e);
        }
    }
    json!({
        "ok": true,
        "greeting": String::from_utf8_lossy(&greeting),
        "echo": String::from_utf8_lossy(&rest),
    })
}

/// A minimal TLS 1.2/1.3 ClientHello record carrying `sni` verbatim (case, trailing dot).
pub fn client_hello(sni: &[u8]) -> Vec<u8> {
    Hello::minimal()
        .server_name(sni)
        .supported_versions(&[TLS13, TLS12])
        .record()
}

fn raw_hello(mut s: TcpStream, req: &Value) -> Value {
    let sni = req["sni"].as_str().unwrap_or("");
    if let Err(e) = s.write_all(&client_hello(sni.as_bytes())) {
        return sys::fail("io", &e);
    }
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let mut got = Vec::new();
    let mut eof = false;
    let mut read_errno = Value::Null;
    let mut b = [0u8; 16];
    while got.len() < 7 {
        match s.read(&mut b) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) => {
                read_errno = json!(errno(&e));
                break;
            }
        }
    }
    got.truncate(16);
    let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
    json!({"ok": true, "reply_hex": hex, "eof": eof, "read_errno": read_errno})
}

fn http(s: TcpStream, req: &Value) -> Value {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail("request", e),
    };
    rt.block_on(async move {
        let _ = s.set_nonblocking(true);
        let s = match tokio::net::TcpStream::from_std(s) {
            Ok(s) => s,
            Err(e) => return sys::fail("io", &e),
        };
        let io = hyper_util::rt::TokioIo::new(s);
        let fut = async {
            match req["op"].as_str().unwrap_or("") {
                "http1" => http1(io, req).await,
                "h2c" => h2c(io, req).await,
                _ => grpc(io, req).await,
            }
        };
        tokio::time::timeout(IO_TIMEOUT, fut)
            .await
            .unwrap_or_else(|_| fail("io", "timeout"))
    })
}

type Io = hyper_util::rt::TokioIo<tokio::net::TcpStream>;

async fn answer(r: hyper::Response<hyper::body::Incoming>) -> Value {
    let status = r.status().as_u16();
    match r.into_body().collect().await {
        Ok(b) => {
            json!({"status": status, "body": String::from_utf8_lossy(&b.to_bytes())})
        }
        Err(e) => json!({"status": status, "error": e.to_string()}),
    }
}

async fn http1(io: Io, req: &Value) -> Value {
    let (mut send, conn) = match hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io).await
    {
        Ok(x) => x,
        Err(e) => return fail("handshake", e),
    };
    tokio::spawn(conn);
    let mut out = Vec::new();
    for r in req["requests"].as_array().cloned().unwrap_or_default() {
        let host = r["host"].as_str().unwrap_or("");
        let path = r["path"].as_str().unwrap_or("/");
        let uri = if r["absolute"].as_bool().unwrap_or(false) {
            format!("http://{host}{path}")
        } else {
            path.to_string()
        };
        let rq = hyper::Request::get(uri)
            .header("host", host)
            .body(Empty::new())
            .expect("request");
        if send.ready().await.is_err() {
            out.push(json!({"error": "connection closed"}));
            break;
        }
        match send.send_request(rq).await {
            Ok(resp) => out.push(answer(resp).await),
            Err(e) => {
                out.push(json!({"error": e.to_string()}));
                break;
            }
        }
    }
    json!({"ok": true, "responses": out})
}

async fn h2_handshake(
    io: Io,
) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>, Value> {
    let (send, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        hyper_util::rt::TokioExecutor::new(),
        io,
    )
    .await
    .map_err(|e| fail("handshake", e))?;
    tokio::spawn(conn);
    Ok(send)
}

async fn h2c(io: Io, req: &Value) -> Value {
    let mut send = match h2_handshake(io).await {
        Ok(s) => s,
        Err(v) => return v,
    };
    let mut out = Vec::new();
    for r in req["requests"].as_array().cloned().unwrap_or_default() {
        let authority = r["authority"].as_str().unwrap_or("");
        let path = r["path"].as_str().unwrap_or("/");
        let mut rq = hyper::Request::get(format!("http://{authority}{path}"));
        if let Some(host) = r["host"].as_str() {
            rq = rq.header("host", host);
        }
        let Ok(rq) = rq.body(Full::new(Bytes::new())) else {
            out.push(json!({"error": format!("bad request authority {authority:?}")}));
            continue;
        };
        if send.ready().await.is_err() {
            out.push(json!({"error": "connection closed"}));
            break;
        }
        match send.send_request(rq).await {
            Ok(resp) => out.push(answer(resp).await),
            Err(e) => out.push(json!({"error": e.to_string()})),
        }
    }
    json!({"ok": true, "responses": out})
}

async fn grpc(io: Io, req: &Value) -> Value {
    let mut send = match h2_handshake(io).await {
        Ok(s) => s,
        Err(v) => return v,
    };
    let authority = req["authority"].as_str().unwrap_or("");
    let path = req["path"].as_str().unwrap_or("/test.Echo/Say");
    let msg = b"hi";
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(msg);
    let rq = hyper::Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))
        .expect("request");
    let resp = match send.send_request(rq).await {
        Ok(r) => r,
        Err(e) => return fail("io", e),
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let collected = match resp.into_body().collect().await {
        Ok(c) => c,
        Err(e) => return fail("io", e),
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |k: &str| {
        trailers
            .get(k)
            .or_else(|| headers.get(k))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let body = collected.to_bytes();
    let text = if body.len() >= 5 {
        String::from_utf8_lossy(&body[5..]).into_owned()
    } else {
        String::new()
    };
    json!({
        "ok": true,
        "status": status,
        "grpc_status": get("grpc-status"),
        "grpc_message": get("grpc-message"),
        "body": text,
    })
}
