//! The userspace proxy with real clients and servers on loopback, no kernel: a fake
//! `OrigDstSource` plays the kernel's original-destination map, keyed by the client socket's
//! local address. `127.0.0.2`, `127.0.0.3`, … and `::1` play other hosts.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use passthrough_policy::outcome::{Outcome, OutcomeVerdict};
use passthrough_policy::{DecideOptions, MergedConf, Mode, Resolver, Workload, load_policy_bytes};
use passthrough_proxy::{
    DomainDestination, OrigDstSource, Proxy, ProxyConfig, ProxyPolicy, ProxyReport, Redirected, h1,
};
use passthrough_testhello::{
    ECH, Hello, KEY_SHARE, PADDING, TLS_AES_128_GCM_SHA256, TLS_AES_256_GCM_SHA384, grease,
};
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
    time::timeout,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

const WORKLOAD: u64 = 7;
const T: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- harness

#[derive(Default)]
struct FakeOrig(Mutex<HashMap<SocketAddr, Redirected>>);

impl OrigDstSource for FakeOrig {
    fn take(&self, peer: SocketAddr, _local: SocketAddr) -> Option<Redirected> {
        self.0.lock().unwrap().remove(&peer)
    }
}

/// A `Matched` configuration from `appendMatch` YAML lines.
fn conf(matches: &[String]) -> MergedConf {
    let mut yaml = String::from(
        "type: MeshPassthrough\nname: p\nmesh: default\nspec:\n  default:\n    passthroughMode: Matched\n    appendMatch:\n",
    );
    for m in matches {
        yaml.push_str(&format!("      - {m}\n"));
    }
    let set = load_policy_bytes(Path::new("p.yaml"), yaml.as_bytes(), "default").unwrap();
    let w = Workload {
        name: "w".into(),
        cgroup: "/w".into(),
        labels: Default::default(),
    };
    let c = set.merge_for(&w, Mode::None);
    assert_eq!(c.mode, Mode::Matched);
    c
}

fn dom(value: &str, port: u16, protocol: &str) -> String {
    format!("{{type: Domain, value: '{value}', port: {port}, protocol: {protocol}}}")
}

struct Px {
    addr: SocketAddr,
    orig: Arc<FakeOrig>,
    policy: Arc<ArcSwap<ProxyPolicy>>,
    stop: CancellationToken,
}

impl Drop for Px {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(c: MergedConf, mode: DomainDestination, resolver: Option<SocketAddr>) -> Px {
    start_reporting(c, mode, resolver, None).await
}

/// [`start`], reporting to `report` (default: the proxy's own log-only report).
async fn start_reporting(
    c: MergedConf,
    mode: DomainDestination,
    resolver: Option<SocketAddr>,
    report: Option<Arc<dyn ProxyReport>>,
) -> Px {
    let policy = ProxyPolicy {
        workloads: HashMap::from([(WORKLOAD, Arc::new(c))]),
        unmatched: MergedConf {
            mode: Mode::None,
            matches: vec![],
            policies: vec![],
        },
        decide: DecideOptions::default(),
    };
    let cfg = ProxyConfig {
        domain_destination: mode,
        resolvers: resolver.map(Resolver::from).into_iter().collect(),
        peek_timeout: Duration::from_secs(2),
        max_peek: 40 * 1024,
        connect_timeout: Duration::from_secs(2),
        upstream_mark: 0,
        audit: false,
    };
    let orig = Arc::new(FakeOrig::default());
    let policy = Arc::new(ArcSwap::from_pointee(policy));
    let mut proxy = Proxy::new(orig.clone(), policy.clone(), cfg).unwrap();
    if let Some(r) = report {
        proxy = proxy.with_report(r);
    }
    let proxy = Arc::new(proxy);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(proxy.serve(listener, stop.clone()));
    Px {
        addr,
        orig,
        policy,
        stop,
    }
}

impl Px {
    /// A connection to the proxy that the "kernel" recorded as going to `dst`.
    async fn dial(&self, dst: SocketAddr) -> TcpStream {
        let s = TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let local = s.local_addr().unwrap();
        self.orig.0.lock().unwrap().insert(
            local,
            Redirected {
                dst,
                workload: WORKLOAD,
                pid: 4242,
                comm: "test-client".into(),
            },
        );
        s.connect(self.addr).await.unwrap()
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "passthrough=debug".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Binds `ip:port` (0 = any port).
async fn bind(ip: IpAddr, port: u16) -> TcpListener {
    TcpListener::bind(SocketAddr::new(ip, port)).await.unwrap()
}

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

// ---------------------------------------------------------------- TLS peers

struct Pki {
    roots: RootCertStore,
    server: Arc<ServerConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec![
        "api.example.test".to_string(),
        "*.wild.test".to_string(),
        "a.b.wild.test".to_string(),
        "other.test".to_string(),
    ])
    .unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    Pki {
        roots,
        server: Arc::new(server),
    }
}

/// A TLS server that greets with `ident` and then echoes until EOF.
async fn tls_server(l: TcpListener, pki: &Pki, ident: &'static str) -> SocketAddr {
    let addr = l.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(pki.server.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let _ = tls.write_all(format!("{ident}\n").as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

/// Connects through the proxy as if to `dst`, with `sni` (None = no SNI, certificate checked for
/// api.example.test); returns the server's greeting, after checking echo and half-close.
async fn tls_get(px: &Px, pki: &Pki, dst: SocketAddr, sni: Option<&str>) -> Result<String, String> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(pki.roots.clone())
        .with_no_client_auth();
    cfg.enable_sni = sni.is_some();
    let name = ServerName::try_from(sni.unwrap_or("api.example.test").to_string()).unwrap();
    let tcp = px.dial(dst).await;
    let fut = async {
        let mut tls = TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut greeting = Vec::new();
        loop {
            let mut b = [0u8; 1];
            let n = tls.read(&mut b).await.map_err(|e| e.to_string())?;
            if n == 0 || b[0] == b'\n' {
                break;
            }
            greeting.push(b[0]);
        }
        // Echo, then half-close: the server must still answer after our FIN.
        tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        tls.read_to_end(&mut rest)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(rest, b"ping", "echo after half-close");
        Ok(String::from_utf8_lossy(&greeting).into_owned())
    };
    timeout(T, fut).await.map_err(|_| "timeout".to_string())?
}

// ---------------------------------------------------------------- hand-built ClientHellos

/// The shape of these tests' hellos: no session id, a GREASE cipher suite first.
fn px_hello() -> Hello {
    Hello::new().session_id(&[]).cipher_suites(&[
        grease(3),
        TLS_AES_128_GCM_SHA256,
        TLS_AES_256_GCM_SHA384,
    ])
}

/// A hello with GREASE extensions around the SNI.
fn hello(names: &[&[u8]]) -> Vec<u8> {
    px_hello()
        .ext(grease(0), b"")
        .server_names(names)
        .ext(grease(13), &[0])
        .record()
}

/// A TCP server that reports, for each connection, how many bytes arrived and whether they
/// equal `expect`, once `expect.len()` bytes are there.
async fn sink_server(l: TcpListener, expect: Vec<u8>) -> SocketAddr {
    let addr = l.local_addr().unwrap();
    let expect = Arc::new(expect);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let expect = expect.clone();
            tokio::spawn(async move {
                let mut got = vec![0u8; expect.len()];
                if s.read_exact(&mut got).await.is_ok() {
                    let same = got == *expect;
                    let _ = s
                        .write_all(format!("got {} same={same}", got.len()).as_bytes())
                        .await;
                }
            });
        }
    });
    addr
}

/// Sends `bytes` in writes of `chunk` bytes through the proxy as if to `dst`; returns all the
/// client reads until EOF.
async fn raw_exchange(px: &Px, dst: SocketAddr, bytes: &[u8], chunk: usize) -> Vec<u8> {
    let mut s = px.dial(dst).await;
    let fut = async {
        for c in bytes.chunks(chunk) {
            s.write_all(c).await.unwrap();
            if chunk < 64 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out
    };
    timeout(T, fut).await.expect("raw exchange timed out")
}

const ACCESS_DENIED_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 49];

// ---------------------------------------------------------------- TLS tests

#[tokio::test]
async fn tls_exact_wildcard_depth_and_denials() {
    init_tracing();
    let pki = pki();
    let l = bind(v4(1), 0).await;
    let port = l.local_addr().unwrap().port();
    let up = tls_server(l, &pki, "A").await;
    let px = start(
        conf(&[
            dom("api.example.test", port, "tls"),
            dom("*.wild.test", port, "tls"),
        ]),
        DomainDestination::Original,
        None,
    )
    .await;
    assert_eq!(
        tls_get(&px, &pki, up, Some("api.example.test"))
            .await
            .unwrap(),
        "A"
    );
    assert_eq!(
        tls_get(&px, &pki, up, Some("x.wild.test")).await.unwrap(),
        "A"
    );
    assert_eq!(
        tls_get(&px, &pki, up, Some("a.b.wild.test")).await.unwrap(),
        "A"
    );
    for denied in [Some("other.test"), Some("wild.test"), None] {
        let e = tls_get(&px, &pki, up, denied).await.unwrap_err();
        if denied != Some("wild.test") {
            assert!(e.contains("AccessDenied"), "{denied:?}: {e}");
        }
    }
    // wild.test is not in the certificate, so check it with a raw hello: the alert comes back.
    let out = raw_exchange(&px, up, &hello(&[b"wild.test"]), 1 << 20).await;
    assert_eq!(out, ACCESS_DENIED_ALERT);
    // Another port: no match.
    let l2 = bind(v4(1), 0).await;
    let up2 = tls_server(l2, &pki, "B").await;
    assert!(
        tls_get(&px, &pki, up2, Some("api.example.test"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn tls_ipv6_upstream() {
    init_tracing();
    let pki = pki();
    let Ok(l) = TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).await else {
        eprintln!("no IPv6 loopback; skipped");
        return;
    };
    let port = l.local_addr().unwrap().port();
    let up = tls_server(l, &pki, "six").await;
    let px = start(
        conf(&[dom("api.example.test", port, "tls")]),
        DomainDestination::Original,
        None,
    )
    .await;
    assert_eq!(
        tls_get(&px, &pki, up, Some("api.example.test"))
            .await
            .unwrap(),
        "six"
    );
}

#[tokio::test]
async fn raw_client_hellos_split_large_odd() {
    init_tracing();
    let l = bind(v4(1), 0).await;
    let port = l.local_addr().unwrap().port();
    let px = start(
        conf(&[
            dom("api.example.test", port, "tls"),
            dom("dot.example.test.", port, "tls"),
        ]),
        DomainDestination::Original,
        None,
    )
    .await;
    let mut cases: Vec<(&str, Vec<u8>, usize, bool)> = vec![
        ("plain", hello(&[b"api.example.test"]), 1 << 20, true),
        ("upper case", hello(&[b"API.Example.TEST"]), 1 << 20, true),
        // A trailing dot makes another name (Kuma: Envoy finds no filter chain for it); a
        // match written with the dot allows exactly the dotted name.
        (
            "trailing dot",
            hello(&[b"api.example.test."]),
            1 << 20,
            false,
        ),
        (
            "dotted match",
            hello(&[b"Dot.Example.Test."]),
            1 << 20,
            true,
        ),
        (
            "dotted match, name without the dot",
            hello(&[b"dot.example.test"]),
            1 << 20,
            false,
        ),
        ("1-byte writes", hello(&[b"api.example.test"]), 1, true),
        (
            "two records",
            px_hello().server_name(b"api.example.test").records(40),
            1 << 20,
            true,
        ),
        (
            "16 KiB hello, PQ key share",
            px_hello()
                .ext(KEY_SHARE, &[0x11; 1216])
                .server_name(b"api.example.test")
                .ext(PADDING, &[0; 16 * 1024])
                .record(),
            1000,
            true,
        ),
        (
            "ECH, allowed outer name",
            px_hello()
                .server_name(b"api.example.test")
                .ext(ECH, &[0; 200])
                .record(),
            1 << 20,
            true,
        ),
        ("other name", hello(&[b"evil.test"]), 1 << 20, false),
        (
            "two names",
            hello(&[b"api.example.test", b"evil.test"]),
            1 << 20,
            false,
        ),
        ("IP literal", hello(&[b"127.0.0.1"]), 1 << 20, false),
        (
            "NUL byte",
            hello(&[b"api.example.test\0.evil"]),
            1 << 20,
            false,
        ),
        ("no SNI", px_hello().record(), 1 << 20, false),
    ];
    // The upstream expects exactly the client's bytes (byte for byte relay).
    for (i, (name, bytes, chunk, allowed)) in cases.drain(..).enumerate() {
        let l = bind(v4(10 + i as u8), port).await;
        let up = sink_server(l, bytes.clone()).await;
        let out = raw_exchange(&px, up, &bytes, chunk).await;
        if allowed {
            assert_eq!(
                String::from_utf8_lossy(&out),
                format!("got {} same=true", bytes.len()),
                "{name}"
            );
        } else {
            assert_eq!(out, ACCESS_DENIED_ALERT, "{name}");
        }
    }
}

#[tokio::test]
async fn relay_bulk_both_ways_with_half_close() {
    init_tracing();
    let l = bind(v4(1), 0).await;
    let port = l.local_addr().unwrap().port();
    let up = l.local_addr().unwrap();
    // Plain TCP echo: everything back, then FIN after the client's FIN.
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let px = start(
        conf(&[dom("api.example.test", port, "tls")]),
        DomainDestination::Original,
        None,
    )
    .await;
    let mut sent = hello(&[b"api.example.test"]);
    sent.extend((0..4 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let (mut r, mut w) = px.dial(up).await.into_split();
    let data = sent.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        w
    });
    let mut got = Vec::new();
    timeout(Duration::from_secs(20), r.read_to_end(&mut got))
        .await
        .expect("relay timed out")
        .unwrap();
    let _w = writer.await.unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "bytes differ");
}

#[tokio::test]
async fn tls_not_tls_and_garbage_closed() {
    init_tracing();
    let l = bind(v4(1), 0).await;
    let port = l.local_addr().unwrap().port();
    let up = sink_server(l, vec![0; 4]).await;
    let px = start(
        conf(&[dom("api.example.test", port, "tls")]),
        DomainDestination::Original,
        None,
    )
    .await;
    // SSH-like banner: closed without a word.
    assert!(
        raw_exchange(&px, up, b"SSH-2.0-x\r\n", 100)
            .await
            .is_empty()
    );
    // A broken TLS record (ServerHello type): alert, closed.
    let mut bad = hello(&[b"api.example.test"]);
    bad[5] = 2;
    assert_eq!(raw_exchange(&px, up, &bad, 100).await, ACCESS_DENIED_ALERT);
}

#[tokio::test]
async fn no_original_destination_is_refused() {
    init_tracing();
    let px = start(
        conf(&[dom("*", 443, "tls")]),
        DomainDestination::Original,
        None,
    )
    .await;
    let mut s = TcpStream::connect(px.addr).await.unwrap();
    let _ = s.write_all(&hello(&[b"api.example.test"])).await;
    let mut out = Vec::new();
    let r = timeout(T, s.read_to_end(&mut out))
        .await
        .expect("closed promptly");
    assert!(r.is_err() || out.is_empty());
}

#[tokio::test]
async fn any_match_allows_ip_and_domain_on_one_port() {
    init_tracing();
    let pki = pki();
    let l = bind(v4(9), 0).await;
    let port = l.local_addr().unwrap().port();
    let up_ip = tls_server(l, &pki, "by-ip").await;
    let up_dom = tls_server(bind(v4(1), port).await, &pki, "by-domain").await;
    let px = start(
        conf(&[
            format!("{{type: IP, value: 127.0.0.9, port: {port}}}"),
            dom("api.example.test", port, "tls"),
        ]),
        DomainDestination::Original,
        None,
    )
    .await;
    // The IP match allows any SNI to 127.0.0.9; the Domain match allows its name elsewhere.
    assert_eq!(
        tls_get(&px, &pki, up_ip, Some("other.test")).await.unwrap(),
        "by-ip"
    );
    assert_eq!(
        tls_get(&px, &pki, up_ip, Some("api.example.test"))
            .await
            .unwrap(),
        "by-ip"
    );
    assert_eq!(
        tls_get(&px, &pki, up_dom, Some("api.example.test"))
            .await
            .unwrap(),
        "by-domain"
    );
    assert!(
        tls_get(&px, &pki, up_dom, Some("other.test"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn tls_unreachable_upstream_closes_promptly() {
    init_tracing();
    let l = bind(v4(1), 0).await;
    let dead = l.local_addr().unwrap();
    drop(l);
    let px = start(
        conf(&[dom("api.example.test", dead.port(), "tls")]),
        DomainDestination::Original,
        None,
    )
    .await;
    let t0 = std::time::Instant::now();
    let out = raw_exchange(&px, dead, &hello(&[b"api.example.test"]), 1 << 20).await;
    assert!(out.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(2));
}

// ---------------------------------------------------------------- HTTP peers

/// An HTTP/1.1 (or h2c) server answering `"{ident} host=… uri=…"`; gRPC calls get grpc-status 0.
async fn http_server(l: TcpListener, ident: &'static str, h2: bool) -> SocketAddr {
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    let host = req
                        .headers()
                        .get("host")
                        .map(|h| h.to_str().unwrap_or("?").to_string())
                        .unwrap_or_default();
                    let body = format!("{ident} host={host} uri={}", req.uri());
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    if req
                        .headers()
                        .get("content-type")
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
                    {
                        r.headers_mut().insert("grpc-status", "0".parse().unwrap());
                    }
                    Ok::<_, std::convert::Infallible>(r)
                });
                let io = TokioIo::new(s);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    addr
}

async fn body_text(r: Response<Incoming>) -> (StatusCode, String) {
    let status = r.status();
    let b = r.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&b).into_owned())
}

fn get(uri: &str, host: Option<&str>) -> Request<Empty<Bytes>> {
    let mut b = Request::get(uri);
    if let Some(h) = host {
        b = b.header("host", h);
    }
    b.body(Empty::new()).unwrap()
}

async fn raw_http(px: &Px, dst: SocketAddr, req: &str) -> String {
    let mut s = px.dial(dst).await;
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    timeout(T, s.read_to_end(&mut out)).await.unwrap().unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn http1_every_request_is_checked() {
    init_tracing();
    let l = bind(v4(1), 0).await;
    let port = l.local_addr().unwrap().port();
    let up = http_server(l, "A", false).await;
    let px = start(
        conf(&[dom("api.example.test", port, "http")]),
        DomainDestination::Original,
        None,
    )
    .await;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(px.dial(up).await))
        .await
        .unwrap();
    tokio::spawn(conn);
    // Keep-alive: allowed, allowed with a port, then a second host is denied and the
    // connection closed.
    let (st, body) = body_text(
        tx.send_request(get("/a", Some("api.example.test")))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::OK, "A host=api.example.test uri=/a")
    );
    let (st, body) = body_text(
        tx.send_request(get("/b", Some(&format!("API.example.test:{port}"))))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    let (st, body) = body_text(tx.send_request(get("/c", Some("evil.test"))).await.unwrap()).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body.contains("evil.test") && body.contains("no MeshPassthrough match"),
        "{body}"
    );
    assert!(
        tx.ready().await.is_err()
            || tx
                .send_request(get("/d", Some("api.example.test")))
                .await
                .is_err(),
        "connection closed after a denial"
    );

    // Absolute-form: its authority is judged and becomes the upstream Host.
    let out = raw_http(
        &px,
        up,
        &format!("GET http://api.example.test:{port}/x?y=1 HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains(&format!("A host=api.example.test:{port} uri=/x?y=1")),
        "{out}"
    );
    let out = raw_http(
        &px,
        up,
        "GET http://evil.test/ HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    // HTTP/1.0 without Host.
    let out = raw_http(&px, up, "GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        out.starts_with("HTTP/1.0 503") || out.starts_with("HTTP/1.1 503"),
        "{out}"
    );
    // Two Host headers.
    let out = raw_http(
        &px,
        up,
        "GET / HTTP/1.1\r\nHost: api.example.test\r\nHost: evil.test\r\n\r\n",
    )
    .await;
    assert!(out.contains(" 503 "), "{out}");
    // Upgrade: h2c and CONNECT are denied.
    let out = raw_http(
        &px,
        up,
        "GET / HTTP/1.1\r\nHost: api.example.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .await;
    assert!(out.contains(" 503 ") && out.contains("upgrade"), "{out}");
    let out = raw_http(
        &px,
        up,
        &format!(
            "CONNECT api.example.test:{port} HTTP/1.1\r\nHost: api.example.test:{port}\r\n\r\n"
        ),
    )
    .await;
    assert!(out.contains(" 503 ") && out.contains("CONNECT"), "{out}");
}

#[tokio::test]
async fn http1_unreachable_upstream_is_503() {
    init_tracing();
    let l = bind(v4(1), 0).await;
    let dead = l.local_addr().unwrap();
    drop(l);
    let px = start(
        conf(&[dom("api.example.test", dead.port(), "http")]),
        DomainDestination::Original,
        None,
    )
    .await;
    let out = raw_http(
        &px,
        dead,
        "GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n",
    )
    .await;
    assert!(
        out.contains(" 503 ") && out.contains("unreachable"),
        "{out}"
    );
}

#[tokio::test]
async fn h2c_streams_and_grpc() {
    init_tracing();
    let l = bind(v4(1), 0).await;
    let port = l.local_addr().unwrap().port();
    let up = http_server(l, "A", true).await;
    let px = start(
        conf(&[
            dom("api.example.test", port, "http2"),
            dom("grpc.example.test", port, "http2"),
        ]),
        DomainDestination::Original,
        None,
    )
    .await;
    let (tx, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(px.dial(up).await),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = |auth: &str, grpc: bool| {
        let mut b = Request::post(format!("http://{auth}/pkg.Svc/Call"));
        if grpc {
            b = b
                .header("content-type", "application/grpc")
                .header("te", "trailers");
        }
        b.body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap()
    };
    let (st, body) = body_text(
        tx.clone()
            .send_request(req("api.example.test", false))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.starts_with("A host="), "{body}");
    assert!(body.contains("api.example.test"), "{body}");
    // A second authority on the same connection is denied, stream by stream.
    let (st, body) = body_text(
        tx.clone()
            .send_request(req("evil.test", false))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body.contains("evil.test") && body.contains("no MeshPassthrough match"),
        "{body}"
    );
    // gRPC: allowed by the grpc match; denied call → trailers-only, grpc-status 7.
    let r = tx
        .clone()
        .send_request(req("grpc.example.test", true))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers().get("grpc-status").unwrap(), "0");
    let r = tx
        .clone()
        .send_request(req("evil.test", true))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers().get("grpc-status").unwrap(), "7");
    assert!(r.headers().get("grpc-message").is_some());
    assert!(r.into_body().collect().await.unwrap().to_bytes().is_empty());
    // The connection still serves allowed streams.
    let (st, _) = body_text(
        tx.clone()
            .send_request(req("api.example.test", false))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::OK);

    // A `grpc` match allows h2c too (one protocol per port, so another port).
    let l = bind(v4(1), 0).await;
    let port = l.local_addr().unwrap().port();
    let up = http_server(l, "G", true).await;
    let px = start(
        conf(&[dom("grpc.example.test", port, "grpc")]),
        DomainDestination::Original,
        None,
    )
    .await;
    let (tx, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(px.dial(up).await),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let r = tx
        .clone()
        .send_request(req("grpc.example.test", true))
        .await
        .unwrap();
    assert_eq!(r.headers().get("grpc-status").unwrap(), "0");
    let r = tx
        .clone()
        .send_request(req("api.example.test", true))
        .await
        .unwrap();
    assert_eq!(r.headers().get("grpc-status").unwrap(), "7");
}

/// One h2c request to `dst` through the proxy with `:authority` `auth`: status and body.
async fn h2c_once(px: &Px, dst: SocketAddr, auth: &str) -> (StatusCode, String) {
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(px.dial(dst).await),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://{auth}/h2"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    body_text(tx.send_request(req).await.unwrap()).await
}

/// Kuma serves `http`, `http2` and `grpc` Domain matches with one listener whose HTTP codec is
/// `AUTO` (HTTP/1.1 or h2c, whatever the match says), and lists `d` and `d:port` as the
/// virtual-host domains: either codec meets every L7 match, and a Host / `:authority` naming
/// another port than the dialled one, or the name with a trailing dot, gets the 503.
#[tokio::test]
async fn either_codec_meets_every_l7_match_and_the_host_port_is_the_dialled_one() {
    init_tracing();
    let l = bind(v4(1), 0).await;
    let port = l.local_addr().unwrap().port();
    // The same port on three hosts: an HTTP/1 origin, an h2c origin, and another HTTP/1 one.
    let h1_up = http_server(l, "H1", false).await;
    let h2_up = http_server(bind(v4(2), port).await, "H2", true).await;
    for protocol in ["http", "http2", "grpc"] {
        let px = start(
            conf(&[dom("web.example.test", port, protocol)]),
            DomainDestination::Original,
            None,
        )
        .await;
        // HTTP/1.1, with and without the dialled port in Host.
        for host in [
            "web.example.test".to_string(),
            format!("Web.example.test:{port}"),
        ] {
            let out = raw_http(
                &px,
                h1_up,
                &format!("GET /h1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
            )
            .await;
            assert!(out.starts_with("HTTP/1.1 200"), "{protocol} {host}: {out}");
            assert!(out.contains("H1 host="), "{protocol} {host}: {out}");
        }
        // h2c prior knowledge.
        for auth in [
            "web.example.test".to_string(),
            format!("web.example.test:{port}"),
        ] {
            let (st, body) = h2c_once(&px, h2_up, &auth).await;
            assert_eq!(st, StatusCode::OK, "{protocol} {auth}: {body}");
            assert!(body.starts_with("H2 "), "{protocol} {auth}: {body}");
        }
        // Another port in Host / :authority, an empty or zero-padded port, a trailing dot:
        // 503 naming what was asked for, and nothing forwarded.
        for host in [
            format!("web.example.test:{}", port.wrapping_add(1)),
            "web.example.test:".to_string(),
            format!("web.example.test:0{port}"),
            "web.example.test.".to_string(),
            format!("web.example.test.:{port}"),
        ] {
            let out = raw_http(
                &px,
                h1_up,
                &format!("GET /no HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
            )
            .await;
            assert!(out.starts_with("HTTP/1.1 503"), "{protocol} {host}: {out}");
            assert!(
                out.contains(&host.to_ascii_lowercase()),
                "{protocol} {host}: {out}"
            );
            assert!(!out.contains("H1 host="), "{protocol} {host}: {out}");
        }
        for auth in [
            format!("web.example.test:{}", port.wrapping_add(1)),
            "web.example.test.".to_string(),
        ] {
            let (st, body) = h2c_once(&px, h2_up, &auth).await;
            assert_eq!(
                st,
                StatusCode::SERVICE_UNAVAILABLE,
                "{protocol} {auth}: {body}"
            );
            assert!(
                body.contains("no MeshPassthrough match"),
                "{protocol} {auth}: {body}"
            );
        }
    }
    // `*` is Envoy's catch-all virtual host: any Host, whatever its port.
    let px = start(
        conf(&[dom("*", port, "http")]),
        DomainDestination::Original,
        None,
    )
    .await;
    let out = raw_http(
        &px,
        h1_up,
        "GET / HTTP/1.1\r\nHost: any.test:1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// An h2c origin that answers every request `"host=<host header> authority=<:authority>"`
/// and counts the requests it received.
async fn counting_h2_origin(l: TcpListener) -> (SocketAddr, Arc<AtomicUsize>) {
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    let host = req
                        .headers()
                        .get("host")
                        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
                        .unwrap_or_default();
                    let auth = req
                        .uri()
                        .authority()
                        .map(|a| a.as_str().to_string())
                        .unwrap_or_default();
                    async move {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            format!("host={host} authority={auth}"),
                        ))))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Issue 16: an h2c request carries one name, its `:authority`. A `host` header naming
/// another entity, or userinfo in `:authority`, is malformed (RFC 9113 §8.3.1): `400`, and
/// the upstream never sees the request; the connection goes on serving well-formed streams.
#[tokio::test]
async fn h2c_host_disagreeing_with_authority_or_userinfo_is_refused_and_never_forwarded() {
    init_tracing();
    let l = bind(v4(1), 0).await;
    let port = l.local_addr().unwrap().port();
    let (up, seen) = counting_h2_origin(l).await;
    let px = start(
        conf(&[dom("api.example.test", port, "http2")]),
        DomainDestination::Original,
        None,
    )
    .await;
    let (tx, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(px.dial(up).await),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let send = |authority: &str, host: Option<&str>| {
        let mut tx = tx.clone();
        let req = get(&format!("http://{authority}/"), host);
        async move { body_text(tx.send_request(req).await.unwrap()).await }
    };
    let refused = [
        // The attack: judged by :authority, routed by the upstream on host.
        ("api.example.test", Some("evil.test")),
        ("api.example.test", Some("api.example.test.evil.test")),
        (
            "api.example.test",
            Some(&*format!("api.example.test:{}", port + 1)),
        ),
        // Userinfo: `evil.test@` must not be mistaken for part of the host by anyone.
        ("evil.test@api.example.test", None),
        ("x@api.example.test", Some("api.example.test")),
        ("u:p@api.example.test", None),
    ];
    for (authority, host) in refused {
        let (st, body) = send(authority, host).await;
        assert_eq!(
            st,
            StatusCode::BAD_REQUEST,
            ":authority {authority} host {host:?}: {body}"
        );
        assert!(body.contains("RFC 9113"), "{body}");
        assert_eq!(
            seen.load(Ordering::SeqCst),
            0,
            ":authority {authority} host {host:?} reached the upstream"
        );
    }
    // Well-formed streams on the same connection still go through, a host header that
    // agrees (ASCII case aside) included, and the upstream sees exactly the judged name.
    let (st, body) = send("api.example.test", None).await;
    assert_eq!(
        (st, body.as_str()),
        (StatusCode::OK, "host= authority=api.example.test")
    );
    let (st, body) = send("api.example.test", Some("API.example.TEST")).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert_eq!(body, "host=API.example.TEST authority=api.example.test");
    assert_eq!(seen.load(Ordering::SeqCst), 2);
    // A denied name is still a 503 (policy), not a 400.
    let (st, body) = send("evil.test", Some("evil.test")).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(seen.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------- destination check

/// A UDP DNS server on loopback answering A/AAAA for `names` with `ttl`; counts queries.
struct Dns {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    names: Arc<std::sync::Mutex<HashMap<&'static str, IpAddr>>>,
}

impl Dns {
    /// From now on `name` resolves to `ip`.
    fn set(&self, name: &'static str, ip: IpAddr) {
        self.names.lock().unwrap().insert(name, ip);
    }
}

async fn dns_server(names: HashMap<&'static str, IpAddr>, ttl: u32) -> Dns {
    use hickory_resolver::proto::{
        op::{Message, MessageType, OpCode, ResponseCode},
        rr::{Name, RData, Record, RecordType, rdata},
    };
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let q2 = queries.clone();
    let names = Arc::new(std::sync::Mutex::new(names));
    let names2 = names.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            q2.fetch_add(1, Ordering::SeqCst);
            let mut resp = Message::new(req.metadata.id, MessageType::Response, OpCode::Query);
            resp.metadata.recursion_desired = req.metadata.recursion_desired;
            resp.metadata.recursion_available = true;
            resp.metadata.authoritative = true;
            let mut known = false;
            for q in &req.queries {
                let name = q.name.to_ascii().to_ascii_lowercase();
                let name = name.trim_end_matches('.');
                let ip = names2.lock().unwrap().get(name).copied();
                if let Some(ip) = ip {
                    known = true;
                    let rd = match (ip, q.query_type) {
                        (IpAddr::V4(a), RecordType::A) => Some(RData::A(rdata::A(a))),
                        (IpAddr::V6(a), RecordType::AAAA) => Some(RData::AAAA(rdata::AAAA(a))),
                        _ => None,
                    };
                    if let Some(rd) = rd {
                        resp.add_answer(Record::from_rdata(q.name.clone(), ttl, rd));
                    }
                }
                resp.add_query(q.clone());
            }
            if !known {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            if resp.answers.is_empty() {
                // SOA in the authority section: negative answers are cacheable for `ttl`.
                let zone = Name::from_ascii("test.").unwrap();
                let soa = rdata::SOA::new(zone.clone(), zone.clone(), 1, 60, 60, 60, ttl);
                resp.add_authority(Record::from_rdata(zone, ttl, RData::SOA(soa)));
            }
            if let Ok(bytes) = resp.to_vec() {
                let _ = sock.send_to(&bytes, from).await;
            }
        }
    });
    Dns {
        addr,
        queries,
        names,
    }
}

#[tokio::test]
async fn destination_check_verify_resolve_original() {
    init_tracing();
    let pki = pki();
    // Host A (127.0.0.2) is api.example.test and x.wild.test; host B (127.0.0.3) shares the port.
    let la = bind(v4(2), 0).await;
    let port = la.local_addr().unwrap().port();
    let host_a = tls_server(la, &pki, "A").await;
    let host_b = tls_server(bind(v4(3), port).await, &pki, "B").await;
    let dns = dns_server(
        HashMap::from([("api.example.test", v4(2)), ("x.wild.test", v4(2))]),
        300,
    )
    .await;
    let c = conf(&[
        dom("api.example.test", port, "tls"),
        dom("*.wild.test", port, "tls"),
    ]);

    let verify = start(c.clone(), DomainDestination::Verify, Some(dns.addr)).await;
    assert_eq!(
        tls_get(&verify, &pki, host_a, Some("api.example.test"))
            .await
            .unwrap(),
        "A"
    );
    let e = tls_get(&verify, &pki, host_b, Some("api.example.test"))
        .await
        .unwrap_err();
    assert!(e.contains("AccessDenied"), "{e}");
    let e = tls_get(&verify, &pki, host_b, Some("x.wild.test"))
        .await
        .unwrap_err();
    assert!(e.contains("AccessDenied"), "{e}");
    assert_eq!(
        tls_get(&verify, &pki, host_a, Some("x.wild.test"))
            .await
            .unwrap(),
        "A"
    );
    // A name DNS does not know is denied too.
    let e = tls_get(&verify, &pki, host_a, Some("a.b.wild.test"))
        .await
        .unwrap_err();
    assert!(e.contains("AccessDenied"), "{e}");
    // Answers are cached within their TTL: repeating costs no query.
    let before = dns.queries.load(Ordering::SeqCst);
    assert_eq!(
        tls_get(&verify, &pki, host_a, Some("api.example.test"))
            .await
            .unwrap(),
        "A"
    );
    assert_eq!(dns.queries.load(Ordering::SeqCst), before);

    let resolve = start(c.clone(), DomainDestination::Resolve, Some(dns.addr)).await;
    assert_eq!(
        tls_get(&resolve, &pki, host_b, Some("api.example.test"))
            .await
            .unwrap(),
        "A"
    );

    let original = start(c.clone(), DomainDestination::Original, Some(dns.addr)).await;
    assert_eq!(
        tls_get(&original, &pki, host_b, Some("api.example.test"))
            .await
            .unwrap(),
        "B"
    );
}

#[tokio::test]
async fn destination_check_http_and_ttl_expiry() {
    init_tracing();
    let la = bind(v4(2), 0).await;
    let port = la.local_addr().unwrap().port();
    let host_a = http_server(la, "A", false).await;
    let host_b = http_server(bind(v4(3), port).await, "B", false).await;
    let dns = dns_server(HashMap::from([("api.example.test", v4(2))]), 1).await;
    let c = conf(&[dom("api.example.test", port, "http")]);
    let req = "GET / HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n";

    let verify = start(c.clone(), DomainDestination::Verify, Some(dns.addr)).await;
    let out = raw_http(&verify, host_b, req).await;
    assert!(
        out.contains(" 503 ") && out.contains("not an address of"),
        "{out}"
    );
    let out = raw_http(&verify, host_a, req).await;
    assert!(out.contains("200 OK") && out.contains("A host="), "{out}");
    // The name moves to host B. Within the TTL (1 s) the cached answer holds and costs no
    // query; after it the new answer is fetched and the old address is no longer the name's.
    dns.set("api.example.test", v4(3));
    let before = dns.queries.load(Ordering::SeqCst);
    let out = raw_http(&verify, host_a, req).await;
    assert!(out.contains("200 OK") && out.contains("A host="), "{out}");
    assert_eq!(dns.queries.load(Ordering::SeqCst), before);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = raw_http(&verify, host_b, req).await;
    assert!(out.contains("200 OK") && out.contains("B host="), "{out}");
    assert!(dns.queries.load(Ordering::SeqCst) > before);
    let out = raw_http(&verify, host_a, req).await;
    assert!(
        out.contains(" 503 ") && out.contains("not an address of"),
        "{out}"
    );
    dns.set("api.example.test", v4(2));

    let resolve = start(c.clone(), DomainDestination::Resolve, Some(dns.addr)).await;
    let out = raw_http(&resolve, host_b, req).await;
    assert!(out.contains("A host="), "{out}");
    let original = start(c, DomainDestination::Original, None).await;
    let out = raw_http(&original, host_b, req).await;
    assert!(out.contains("B host="), "{out}");
}

#[tokio::test]
async fn reload_applies_to_the_next_request_of_a_live_connection() {
    init_tracing();
    let l = bind(v4(1), 0).await;
    let port = l.local_addr().unwrap().port();
    let up = http_server(l, "A", false).await;
    let px = start(
        conf(&[dom("api.example.test", port, "http")]),
        DomainDestination::Original,
        None,
    )
    .await;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(px.dial(up).await))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = tx
        .send_request(get("/", Some("api.example.test")))
        .await
        .unwrap();
    assert_eq!(body_text(r).await.0, StatusCode::OK);
    // Reload: the workload now allows only another name.
    let mut next = (**px.policy.load()).clone();
    next.workloads
        .insert(WORKLOAD, Arc::new(conf(&[dom("other.test", port, "http")])));
    px.policy.store(Arc::new(next));
    let r = tx
        .send_request(get("/", Some("api.example.test")))
        .await
        .unwrap();
    assert_eq!(body_text(r).await.0, StatusCode::SERVICE_UNAVAILABLE);
}

// ---------------------------------------------------------------- HTTP/1 framing

/// A proxy allowing HTTP to `web.test` at `origin`'s port, connecting where the client dialled.
async fn web_proxy(origin: SocketAddr) -> Px {
    init_tracing();
    start(
        conf(&[dom("web.test", origin.port(), "http")]),
        DomainDestination::Original,
        None,
    )
    .await
}

/// A hyper origin answering each request's body back, with the `Host` and `Connection` it
/// saw in `x-host` / `x-connection`; `/empty` is a 204. Counts its connections.
async fn hyper_origin() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let h = |n| {
                        req.headers()
                            .get(n)
                            .map(|v| v.to_str().unwrap_or("?").to_string())
                            .unwrap_or_default()
                    };
                    let (host, conn) = (h("host"), h("connection"));
                    if req.uri().path() == "/empty" {
                        return Ok::<_, std::io::Error>(
                            Response::builder()
                                .status(204)
                                .body(Full::new(Bytes::new()))
                                .unwrap(),
                        );
                    }
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    Ok(Response::builder()
                        .header("x-host", host)
                        .header("x-connection", conn)
                        .body(Full::new(body))
                        .unwrap())
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

/// A scripted origin: reads a request (head and body), records it, and writes the next
/// scripted reply (a leading `100 Continue` before reading the body); a `None` reply closes
/// the connection instead of answering, and so does the end of a close-delimited reply.
async fn raw_origin(
    replies: Vec<Option<&'static [u8]>>,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        let mut replies = replies.into_iter();
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = Vec::new();
            loop {
                let mut fields = Vec::new();
                let head = loop {
                    if let Ok(Some(h)) = h1::parse_request(&buf, &mut fields) {
                        break Some(h);
                    }
                    let mut b = [0u8; 4096];
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                };
                let Some(head) = head else { break };
                let mut reply = replies.next().flatten();
                // An interim answer goes out before the body is read (Expect: 100-continue).
                const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
                if let Some(r) = reply.filter(|r| r.starts_with(CONTINUE)) {
                    s.write_all(CONTINUE).await.unwrap();
                    reply = Some(&r[CONTINUE.len()..]);
                }
                let mut body = h1::BodyReader::new(head.body);
                let mut end = head.head_len;
                while !body.done() {
                    end += body.advance(&buf[end..]).unwrap();
                    if !body.done() {
                        let mut b = [0u8; 4096];
                        let n = s.read(&mut b).await.unwrap();
                        buf.extend_from_slice(&b[..n]);
                    }
                }
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..end]).into_owned());
                buf.drain(..end);
                let Some(r) = reply else { break };
                s.write_all(r).await.unwrap();
                // A close-delimited answer ends with the connection.
                if h1::parse_response(r, false)
                    .is_ok_and(|h| h.is_some_and(|h| h.body == h1::BodyFraming::UntilClose))
                {
                    break;
                }
            }
        }
    });
    (addr, seen)
}

/// Reads from `s` into `got` until `end` appears, or (`None`) until the peer closes or resets;
/// each read within `T`.
async fn read_until(s: &mut TcpStream, got: &mut Vec<u8>, end: Option<&str>) {
    let mut b = [0u8; 4096];
    while !end.is_some_and(|e| String::from_utf8_lossy(got).contains(e)) {
        match timeout(T, s.read(&mut b)).await.expect("a read within 5 s") {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
        }
    }
}

/// Sends `req` raw through the proxy to `dst` and reads until the proxy closes (a reset
/// included: refusals may close with unread request bytes).
async fn raw(px: &Px, dst: SocketAddr, req: &[u8]) -> String {
    let mut s = px.dial(dst).await;
    s.write_all(req).await.unwrap();
    let mut out = Vec::new();
    read_until(&mut s, &mut out, None).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn http1_hyper_client_keep_alive_bodies_and_a_denied_second_host() {
    let (origin, conns) = hyper_origin().await;
    let px = web_proxy(origin).await;
    let io = TokioIo::new(px.dial(origin).await);
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    // Content-Length bodies of several sizes, then a streamed (chunked) one.
    for size in [0usize, 1, 70_000, 3] {
        let body = vec![b'a' + (size % 26) as u8; size];
        let req = Request::post("/echo")
            .header("host", "web.test")
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-host"], "web.test");
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), body.len());
        assert!(got == body);
    }
    let req = Request::get("/empty")
        .header("host", "web.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(tx.send_request(req).await.unwrap().status(), 204);
    let req = Request::head("/echo")
        .header("host", "web.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(tx.send_request(req).await.unwrap().status(), 200);
    // One upstream connection carried all of it.
    assert_eq!(conns.load(Ordering::SeqCst), 1);
    // A second host on the same connection is judged on its own.
    let req = Request::get("/echo")
        .header("host", "evil.test")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 503);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("evil.test"));
}

#[tokio::test]
async fn http1_chunked_both_ways_pipelining_and_connection_close() {
    let (origin, _) = hyper_origin().await;
    let px = web_proxy(origin).await;
    // A chunked request (with an extension and a trailer) pipelined with a second request
    // that asks to close: both answered in order, the origin saw `Connection: close`.
    let reply = raw(
        &px,
        origin,
        b"POST /echo HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nPOST /echo HTTP/1.1\r\nHost: web.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .await;
    let first = reply.find("hello world").expect(&reply);
    let second = reply.rfind("\r\n\r\nhi").expect(&reply);
    assert!(first < second, "{reply}");
    assert!(reply.contains("x-connection: close"), "{reply}");
    assert_eq!(reply.matches("HTTP/1.1 200 OK").count(), 2, "{reply}");
}

#[tokio::test]
async fn http1_framing_edges_from_the_origin() {
    let (origin, seen) = raw_origin(vec![
        // 100 Continue, then a chunked answer with a trailer.
        Some(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 1\r\n\r\n"),
        // Keep-alive, then the origin goes away without saying so (idle timeout).
        Some(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        None,
        // The retry on a fresh connection, close-delimited.
        Some(b"HTTP/1.1 200 OK\r\n\r\nuntil close"),
    ])
    .await;
    let px = web_proxy(origin).await;
    let mut s = px.dial(origin).await;
    let mut got = Vec::new();
    s.write_all(
        b"POST /a HTTP/1.1\r\nHost: web.test\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    read_until(&mut s, &mut got, Some("100 Continue\r\n\r\n")).await;
    s.write_all(b"xyz").await.unwrap();
    read_until(&mut s, &mut got, Some("X-Sum: 1\r\n\r\n")).await;
    s.write_all(b"GET /b HTTP/1.1\r\nHost: web.test\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, &mut got, Some("\r\n\r\nok")).await;
    // Give the origin's close time to land: the next request must still be answered.
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"GET /c HTTP/1.1\r\nHost: web.test\r\n\r\n")
        .await
        .unwrap();
    // The close-delimited answer ends with the connection.
    read_until(&mut s, &mut got, None).await;
    let got = String::from_utf8_lossy(&got).into_owned();
    assert!(got.ends_with("HTTP/1.1 200 OK\r\n\r\nuntil close"), "{got}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert!(
        seen[0].starts_with("POST /a HTTP/1.1\r\nHost: web.test\r\n")
            && seen[0].ends_with("\r\n\r\nxyz"),
        "{seen:?}"
    );
    assert_eq!(seen[2], seen[3], "the retried request is the same bytes");
}

#[tokio::test]
async fn http1_refusals() {
    let (origin, seen) = raw_origin(vec![Some(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )])
    .await;
    let px = web_proxy(origin).await;
    for (req, status) in [
        (&b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..], "400"),
        (b"POST / HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: xchunked\r\n\r\n", "501"),
        (b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n", "503"),
        (b"GET / HTTP/1.1\r\n\r\n", "503"),
        (b"CONNECT web.test:80 HTTP/1.1\r\nHost: web.test:80\r\n\r\n", "503"),
        (b"GET / HTTP/1.1\r\nHost: web.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", "503"),
        (b"GET / HTTP/1.1\r\nHost: web.test\r\n", "408"),
    ] {
        let reply = raw(&px, origin, req).await;
        assert!(reply.starts_with(&format!("HTTP/1.1 {status} ")), "{:?} → {reply}", String::from_utf8_lossy(req));
    }
    // A bad chunk after an allowed head: the connection ends, nothing past the bad line
    // reaches the origin as a request.
    let reply = raw(&px, origin, b"POST / HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n").await;
    assert!(!reply.contains("200 OK"), "{reply}");
    assert!(seen.lock().unwrap().iter().all(|r| !r.contains("smuggled")));
}

// ---------------------------------------------------------------- one outcome per unit

/// Collects the proxy's outcomes.
#[derive(Default)]
struct Recorder(Mutex<Vec<Outcome>>);

impl ProxyReport for Recorder {
    fn connection_opened(&self) {}
    fn connection_closed(&self) {}
    fn connection_classified(&self, _: &'static str, _: Option<Duration>) {}
    fn outcome(&self, o: Outcome) {
        self.0.lock().unwrap().push(o);
    }
}

impl Recorder {
    /// Waits until `n` outcomes arrived (units emit theirs when they end), then takes them.
    async fn take(&self, n: usize) -> Vec<Outcome> {
        let deadline = tokio::time::Instant::now() + T;
        while self.0.lock().unwrap().len() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A moment more: a unit that emitted twice would show up here.
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Every unit the proxy handles — a TLS connection, an HTTP/1 request, an h2c stream, a
/// connection refused before a name was judged — ends in exactly one record, with its
/// decision, reason, names, upstream and bytes.
#[tokio::test]
async fn every_unit_ends_in_exactly_one_outcome() {
    init_tracing();
    let pki = pki();
    let tls_l = bind(v4(1), 0).await;
    let tls_port = tls_l.local_addr().unwrap().port();
    let tls_up = tls_server(tls_l, &pki, "A").await;
    let h1_l = bind(v4(1), 0).await;
    let h1_port = h1_l.local_addr().unwrap().port();
    let h1_up = http_server(h1_l, "B", false).await;
    let h2_l = bind(v4(1), 0).await;
    let h2_port = h2_l.local_addr().unwrap().port();
    let h2_up = http_server(h2_l, "C", true).await;
    let rec = Arc::new(Recorder::default());
    let px = start_reporting(
        conf(&[
            dom("api.example.test", tls_port, "tls"),
            dom("web.example.test", h1_port, "http"),
            dom("grpc.example.test", h2_port, "http2"),
        ]),
        DomainDestination::Original,
        None,
        Some(rec.clone()),
    )
    .await;

    // TLS: allowed (bytes both ways, relayed in userspace), then denied.
    assert_eq!(
        tls_get(&px, &pki, tls_up, Some("api.example.test"))
            .await
            .unwrap(),
        "A"
    );
    let o = rec.take(1).await;
    assert_eq!(o.len(), 1, "{o:?}");
    let a = &o[0];
    assert_eq!(
        (a.verdict, a.reason.code(), a.protocol.as_ref()),
        (OutcomeVerdict::Allow, "domain_match", "tls")
    );
    assert_eq!(a.sni.as_deref(), Some("api.example.test"));
    assert_eq!(
        (a.workload, a.pid, a.upstream),
        (WORKLOAD, 4242, Some(tls_up))
    );
    let b = a.bytes.expect("bytes of the relay");
    assert!(b.up > 0 && b.down > 0, "{b:?}");
    assert!(
        a.matched
            .as_deref()
            .is_some_and(|m| m.contains("api.example.test"))
    );
    assert!(a.decide_time.is_some() && !a.reused);
    assert!(
        tls_get(&px, &pki, tls_up, Some("other.test"))
            .await
            .is_err()
    );
    let o = rec.take(1).await;
    assert_eq!(o.len(), 1, "{o:?}");
    assert_eq!(
        (o[0].verdict, o[0].reason.code(), o[0].sni.as_deref()),
        (OutcomeVerdict::Deny, "no_domain_match", Some("other.test"))
    );
    assert_eq!((o[0].bytes, o[0].upstream), (None, None));

    // HTTP/1: two requests on one connection (the second reuses the judgement) and a third to
    // another host, denied: three records.
    let out = raw_http(
        &px,
        h1_up,
        &format!(
            "GET /1 HTTP/1.1\r\nHost: web.example.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: web.example.test\r\n\r\nGET /3 HTTP/1.1\r\nHost: nope.test:{h1_port}\r\n\r\n"
        ),
    )
    .await;
    assert!(out.contains("B host=web.example.test uri=/1"), "{out}");
    assert!(out.contains("503"), "{out}");
    let o = rec.take(3).await;
    assert_eq!(o.len(), 3, "{o:?}");
    assert_eq!(
        o.iter()
            .map(|o| (o.verdict, o.reused, o.host.as_deref()))
            .collect::<Vec<_>>(),
        [
            (OutcomeVerdict::Allow, false, Some("web.example.test")),
            (OutcomeVerdict::Allow, true, Some("web.example.test")),
            (
                OutcomeVerdict::Deny,
                false,
                Some(format!("nope.test:{h1_port}").as_str())
            ),
        ]
    );
    for allowed in &o[..2] {
        let b = allowed.bytes.expect("bytes of the exchange");
        assert!(b.up > 0 && b.down > 0, "{b:?}");
        assert_eq!(allowed.reason.code(), "domain_match");
    }

    // h2c: one stream, one record with its body bytes.
    let (st, body) = h2c_once(&px, h2_up, "grpc.example.test").await;
    assert_eq!(
        (st, body.starts_with("C ")),
        (StatusCode::OK, true),
        "{body}"
    );
    let o = rec.take(1).await;
    assert_eq!(o.len(), 1, "{o:?}");
    assert_eq!(
        (o[0].verdict, o[0].protocol.as_ref(), o[0].host.as_deref()),
        (OutcomeVerdict::Allow, "h2c", Some("grpc.example.test"))
    );
    assert_eq!(
        o[0].bytes.map(|b| b.down),
        Some(body.len() as u64),
        "the response body's bytes"
    );

    // Neither TLS nor HTTP: refused before any name was judged.
    let mut s = px.dial(tls_up).await;
    s.write_all(b"\x00\x01garbage that is no protocol\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = timeout(T, s.read_to_end(&mut sink)).await;
    let o = rec.take(1).await;
    assert_eq!(o.len(), 1, "{o:?}");
    assert_eq!(
        (o[0].verdict, o[0].reason.code(), o[0].protocol.as_ref()),
        (OutcomeVerdict::Deny, "unknown_protocol", "unknown")
    );
}
