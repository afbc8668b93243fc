//! Real TLS / HTTP / gRPC / DNS peers for the proxy's kernel tests and `pt-bench-proxy`.
//!
//! * [`Pki`] — an rcgen CA and one server certificate for every test name (exact and wildcard);
//!   the CA is written to a PEM file that clients (pt-probe, curl) trust.
//! * [`Servers`] — listeners created inside a test host's network namespace (by a thread that
//!   `setns`-ed into it; the sockets stay there) served by a tokio runtime of their own: a rustls
//!   TLS server, a hyper HTTP/1.1 + h2c server (gRPC-shaped calls get a gRPC answer), a TCP echo
//!   server and the benchmark's request/response and bulk servers. Every accepted connection is
//!   counted per local (= dialled) address, so a test can tell which host a connection reached,
//!   and that a denied one reached none.
//! * [`Dns`] — a UDP DNS server on loopback answering A/AAAA for test names (for
//!   `passthrough run --resolver`).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

/// The crypto provider every peer uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA and a server certificate for `names` (exact names and `*.` wildcards).
pub struct Pki {
    /// The CA certificate, DER.
    pub ca_der: CertificateDer<'static>,
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The server configuration (one certificate for every name).
    pub server: Arc<ServerConfig>,
    /// The server certificate and its key, PEM (for servers configured from files).
    pub server_pem: (String, String),
}

impl Pki {
    /// Generates the CA and the server certificate.
    pub fn new(names: &[&str]) -> Result<Pki> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "passthrough test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;
        let key = rcgen::KeyPair::generate()?;
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let cert = params.signed_by(&key, &ca)?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        Ok(Pki {
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            server: Arc::new(server),
            server_pem: (cert.pem(), key.serialize_pem()),
        })
    }

    /// Writes the server certificate and key to `dir/server.crt` and `dir/server.key`; returns
    /// both paths.
    pub fn write_server(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        let (crt, key) = (dir.join("server.crt"), dir.join("server.key"));
        for (p, pem) in [(&crt, &self.server_pem.0), (&key, &self.server_pem.1)] {
            std::fs::write(p, pem).with_context(|| format!("writing {}", p.display()))?;
        }
        Ok((crt, key))
    }

    /// Writes the CA PEM to `dir/ca.pem` and returns the path.
    pub fn write_ca(&self, dir: &Path) -> Result<PathBuf> {
        let p = dir.join("ca.pem");
        std::fs::write(&p, &self.ca_pem).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }

    /// A root store holding the CA.
    pub fn roots(&self) -> RootCertStore {
        let mut r = RootCertStore::empty();
        r.add(self.ca_der.clone()).expect("CA certificate");
        r
    }
}

/// What a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// TLS; after the handshake the server writes `local=<dialled addr> sni=<sni>\n`, then
    /// echoes until EOF and closes (so a half-close is answered).
    TlsEcho,
    /// HTTP/1.1 and h2c (prior knowledge) on one port. The answer body is
    /// `local=<dialled addr> host=<Host or :authority> uri=<uri> version=<HTTP/x>`. A request
    /// with `content-type: application/grpc` gets a gRPC answer: one message `ok` and trailers
    /// `grpc-status: 0`.
    Http,
    /// Plain TCP echo.
    Echo,
    /// Benchmark: TLS; reads requests of [`RR_SIZE`] bytes and answers each with as many.
    TlsRr,
    /// Benchmark: TLS; reads an 8-byte big-endian count, writes that many bytes, closes.
    TlsBulk,
    /// Records every byte a connection sends (see [`Servers::received`]) and answers nothing:
    /// what a denied connection let leave the host shows up here.
    Record,
}

/// What [`Service::Record`] listeners received: per connection, the dialled address and the
/// bytes, in accept order.
pub type Received = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// Request and response size of [`Service::TlsRr`].
pub const RR_SIZE: usize = 128;

/// Accepted connections per (local address, port), IPv4-mapped addresses as IPv4.
pub type Accepts = Arc<Mutex<HashMap<SocketAddr, u64>>>;

/// Servers on listeners made inside a network namespace, run by their own tokio runtime.
pub struct Servers {
    rt: Option<tokio::runtime::Runtime>,
    accepts: Accepts,
    received: Received,
}

impl Servers {
    /// Binds every `(port, service)` on `0.0.0.0` and `[::]` (v6-only) inside the netns `ns`
    /// (`None`: the caller's) and serves them. `pki` is needed by the TLS services.
    pub fn start(
        ns: Option<&str>,
        listen: &[(u16, Service)],
        pki: Option<Arc<ServerConfig>>,
        worker_threads: usize,
    ) -> Result<Servers> {
        let listen = listen.to_vec();
        let bind = move || -> Result<Vec<(std::net::TcpListener, Service)>> {
            let mut v = Vec::new();
            for (port, svc) in &listen {
                for ip in ["0.0.0.0", "::"] {
                    let addr = SocketAddr::new(ip.parse()?, *port);
                    let s = socket2::Socket::new(
                        socket2::Domain::for_address(addr),
                        socket2::Type::STREAM,
                        Some(socket2::Protocol::TCP),
                    )?;
                    if addr.is_ipv6() {
                        s.set_only_v6(true)?;
                    }
                    s.set_reuse_address(true)?;
                    s.bind(&addr.into())
                        .with_context(|| format!("binding {addr}"))?;
                    s.listen(1024)?;
                    s.set_nonblocking(true)?;
                    v.push((s.into(), *svc));
                }
            }
            Ok(v)
        };
        let listeners = match ns {
            Some(ns) => crate::netns::in_netns(ns, bind)?,
            None => bind()?,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads.max(1))
            .enable_all()
            .thread_name("pt-test-servers")
            .build()?;
        let accepts: Accepts = Arc::default();
        let received: Received = Arc::default();
        for (l, svc) in listeners {
            let accepts = accepts.clone();
            let received = received.clone();
            let tls = pki.clone().map(TlsAcceptor::from);
            let _guard = rt.enter();
            let l = tokio::net::TcpListener::from_std(l)?;
            rt.spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    let Ok(local) = s.local_addr() else { continue };
                    let local = crate::netns::normalize(local);
                    *accepts
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(local)
                        .or_insert(0) += 1;
                    let _ = s.set_nodelay(true);
                    let tls = tls.clone();
                    let received = received.clone();
                    tokio::spawn(async move {
                        let _ = serve_one(s, local, svc, tls, received).await;
                    });
                }
            });
        }
        Ok(Servers {
            rt: Some(rt),
            accepts,
            received,
        })
    }

    /// What each connection to `dst` sent a [`Service::Record`] listener so far, in accept
    /// order (IPv4-mapped counted as IPv4).
    pub fn received(&self, dst: SocketAddr) -> Vec<Vec<u8>> {
        let dst = crate::netns::normalize(dst);
        let r = self.received.lock().unwrap_or_else(|e| e.into_inner());
        r.iter()
            .filter(|(a, _)| *a == dst)
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// Connections accepted for the dialled address `dst` (IPv4-mapped counted as IPv4).
    pub fn accepted(&self, dst: SocketAddr) -> u64 {
        let a = self.accepts.lock().unwrap_or_else(|e| e.into_inner());
        a.get(&crate::netns::normalize(dst)).copied().unwrap_or(0)
    }

    /// Connections accepted on any address.
    pub fn accepted_total(&self) -> u64 {
        let a = self.accepts.lock().unwrap_or_else(|e| e.into_inner());
        a.values().sum()
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve_one(
    s: tokio::net::TcpStream,
    local: SocketAddr,
    svc: Service,
    tls: Option<TlsAcceptor>,
    received: Received,
) -> Result<()> {
    match svc {
        Service::Record => {
            let slot = {
                let mut r = received.lock().unwrap_or_else(|e| e.into_inner());
                r.push((local, Vec::new()));
                r.len() - 1
            };
            let mut s = s;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                received.lock().unwrap_or_else(|e| e.into_inner())[slot]
                    .1
                    .extend_from_slice(&buf[..n]);
            }
        }
        Service::Echo => {
            let (mut r, mut w) = s.into_split();
            tokio::io::copy(&mut r, &mut w).await?;
            w.shutdown().await?;
        }
        Service::TlsEcho => {
            let mut t = tls.context("no TLS config")?.accept(s).await?;
            let sni = t.get_ref().1.server_name().unwrap_or("-").to_string();
            t.write_all(format!("local={local} sni={sni}\n").as_bytes())
                .await?;
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = t.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                t.write_all(&buf[..n]).await?;
            }
            t.shutdown().await?;
        }
        Service::TlsRr => {
            let mut t = tls.context("no TLS config")?.accept(s).await?;
            let mut buf = [0u8; RR_SIZE];
            loop {
                if t.read_exact(&mut buf).await.is_err() {
                    break;
                }
                t.write_all(&buf).await?;
            }
        }
        Service::TlsBulk => {
            let mut t = tls.context("no TLS config")?.accept(s).await?;
            let mut n = [0u8; 8];
            t.read_exact(&mut n).await?;
            let mut left = u64::from_be_bytes(n);
            let chunk = vec![0x5au8; 64 * 1024];
            while left > 0 {
                let k = left.min(chunk.len() as u64) as usize;
                t.write_all(&chunk[..k]).await?;
                left -= k as u64;
            }
            t.shutdown().await?;
        }
        Service::Http => {
            let svc = service_fn(move |req: Request<Incoming>| async move {
                Ok::<_, Infallible>(http_answer(req, local).await)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        }
    }
    Ok(())
}

async fn http_answer(
    req: Request<Incoming>,
    local: SocketAddr,
) -> Response<BoxBody<Bytes, Infallible>> {
    let host = req
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let text = format!(
        "local={local} host={host} uri={} version={:?}",
        req.uri(),
        req.version()
    );
    // Drain the request body (gRPC sends one).
    let _ = req.into_body().collect().await;
    if grpc {
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(text.len() as u32).to_be_bytes());
        frame.extend_from_slice(text.as_bytes());
        let body = Full::new(Bytes::from(frame))
            .with_trailers(async {
                let mut t = hyper::HeaderMap::new();
                t.insert("grpc-status", "0".parse().unwrap());
                Some(Ok(t))
            })
            .boxed();
        let mut r = Response::new(body);
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        r
    } else {
        Response::new(Full::new(Bytes::from(text)).boxed())
    }
}

/// A UDP DNS server on `127.0.0.1` answering A/AAAA for known names (case-insensitive, trailing
/// dot ignored) with `ttl`, NXDOMAIN otherwise. Runs on its own thread until dropped.
pub struct Dns {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Queries answered so far.
    pub queries: Arc<AtomicUsize>,
    names: Arc<Mutex<HashMap<String, Vec<IpAddr>>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Dns {
    /// Starts the server (in the caller's network namespace).
    pub fn start(names: HashMap<String, Vec<IpAddr>>, ttl: u32) -> Result<Dns> {
        use hickory_resolver::proto::{
            op::{Message, MessageType, OpCode, ResponseCode},
            rr::{Name, RData, Record, RecordType, rdata},
        };
        let std_sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
        std_sock.set_nonblocking(true)?;
        let addr = std_sock.local_addr()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("pt-test-dns")
            .enable_all()
            .build()?;
        let queries = Arc::new(AtomicUsize::new(0));
        let q2 = queries.clone();
        let sock = {
            let _g = rt.enter();
            tokio::net::UdpSocket::from_std(std_sock)?
        };
        let names: HashMap<String, Vec<IpAddr>> = names
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase().trim_end_matches('.').to_string(), v))
            .collect();
        let names = Arc::new(Mutex::new(names));
        let shared = names.clone();
        rt.spawn(async move {
            {
                {
                    {
                        let mut buf = vec![0u8; 4096];
                        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                            let Ok(req) = Message::from_vec(&buf[..n]) else {
                                continue;
                            };
                            q2.fetch_add(1, Ordering::SeqCst);
                            let mut resp =
                                Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
                            resp.metadata.recursion_desired = req.metadata.recursion_desired;
                            resp.metadata.recursion_available = true;
                            resp.metadata.authoritative = true;
                            let mut known = false;
                            for q in &req.queries {
                                let name = q.name.to_ascii().to_ascii_lowercase();
                                let name = name.trim_end_matches('.');
                                let ips = names
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .get(name)
                                    .cloned();
                                if let Some(ips) = ips {
                                    known = true;
                                    for ip in &ips {
                                        let rd = match (ip, q.query_type) {
                                            (IpAddr::V4(a), RecordType::A) => {
                                                Some(RData::A(rdata::A(*a)))
                                            }
                                            (IpAddr::V6(a), RecordType::AAAA) => {
                                                Some(RData::AAAA(rdata::AAAA(*a)))
                                            }
                                            _ => None,
                                        };
                                        if let Some(rd) = rd {
                                            resp.add_answer(Record::from_rdata(
                                                q.name.clone(),
                                                ttl,
                                                rd,
                                            ));
                                        }
                                    }
                                }
                                resp.add_query(q.clone());
                            }
                            if !known {
                                resp.metadata.response_code = ResponseCode::NXDomain;
                            }
                            if resp.answers.is_empty() {
                                let zone = Name::from_ascii("test.").unwrap();
                                let soa =
                                    rdata::SOA::new(zone.clone(), zone.clone(), 1, 60, 60, 60, ttl);
                                resp.add_authority(Record::from_rdata(zone, ttl, RData::SOA(soa)));
                            }
                            if let Ok(bytes) = resp.to_vec() {
                                let _ = sock.send_to(&bytes, from).await;
                            }
                        }
                    }
                }
            }
        });
        Ok(Dns {
            addr,
            queries,
            names: shared,
            rt: Some(rt),
        })
    }

    /// Answers `name` with `ips` from now on (a name that moves).
    pub fn set(&self, name: &str, ips: Vec<IpAddr>) {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_ascii_lowercase(), ips);
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
