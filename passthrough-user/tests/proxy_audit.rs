//! `--audit` in the proxy, and its metrics: a denied connection or request is reported as a
//! would-be denial and goes to its original destination; without audit it is refused. Upstreams
//! are local listeners on 127.0.0.1 (the proxy judges loopback like any destination; only the
//! kernel exempts it).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use passthrough_policy::{DecideOptions, MergedConf, Mode};
use passthrough_proxy::{
    DomainDestination, OrigDstSource, Proxy, ProxyConfig, ProxyPolicy, Redirected,
};
use passthrough_user::{
    events::{LimiterConfig, Reporter},
    metrics::{MapUsage, Metrics, parse_text},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_util::sync::CancellationToken;

const WORKLOAD: u64 = 11;
const T: Duration = Duration::from_secs(5);

#[derive(Default)]
struct FakeOrig(Mutex<HashMap<SocketAddr, Redirected>>);

impl OrigDstSource for FakeOrig {
    fn take(&self, peer: SocketAddr, _local: SocketAddr) -> Option<Redirected> {
        self.0.lock().unwrap().remove(&peer)
    }
}

struct Px {
    addr: SocketAddr,
    orig: Arc<FakeOrig>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl Drop for Px {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A proxy whose policy denies everything (mode None).
async fn proxy(audit: bool) -> Px {
    let none = MergedConf {
        mode: Mode::None,
        matches: vec![],
        policies: vec![],
    };
    let policy = ProxyPolicy {
        workloads: HashMap::new(),
        unmatched: none,
        decide: DecideOptions::default(),
    };
    let cfg = ProxyConfig {
        domain_destination: DomainDestination::Original,
        peek_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        upstream_mark: 0,
        audit,
        ..ProxyConfig::default()
    };
    let metrics = Arc::new(Metrics::new());
    metrics.policy_applied(
        1,
        [(WORKLOAD, "audited".to_string())],
        MapUsage::default(),
        Default::default(),
    );
    let reporter = Arc::new(Reporter::new(metrics.clone(), LimiterConfig::default()));
    let orig = Arc::new(FakeOrig::default());
    let p = Proxy::new(orig.clone(), Arc::new(ArcSwap::from_pointee(policy)), cfg)
        .unwrap()
        .with_report(reporter);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(Arc::new(p).serve(listener, stop.clone()));
    Px {
        addr,
        orig,
        metrics,
        stop,
    }
}

impl Px {
    /// A client connection whose recorded original destination is `dst`.
    async fn connect(&self, dst: SocketAddr) -> TcpStream {
        let s = TcpStream::connect(self.addr).await.unwrap();
        let rec = Redirected {
            dst,
            workload: WORKLOAD,
            pid: 4242,
            comm: "curl".into(),
        };
        self.orig
            .0
            .lock()
            .unwrap()
            .insert(s.local_addr().unwrap(), rec);
        s
    }

    fn sample(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        parse_text(&self.metrics.render())
            .into_iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.2)
            .sum()
    }
}

/// An upstream that answers every connection with a fixed HTTP response, or echoes raw bytes.
async fn upstream(http: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    if !http {
                        let _ = s.write_all(&buf[..n]).await;
                        continue;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nupstream")
                            .await;
                        got.clear();
                    }
                }
            });
        }
    });
    addr
}

async fn read_all(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = timeout(T, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn audit_forwards_a_denied_http_request_to_its_original_destination() {
    let up = upstream(true).await;
    for audit in [false, true] {
        let px = proxy(audit).await;
        let mut c = px.connect(up).await;
        c.write_all(b"GET / HTTP/1.1\r\nHost: denied.test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let resp = read_all(&mut c).await;
        let verdict = if audit { "would_deny" } else { "deny" };
        if audit {
            assert!(
                resp.starts_with("HTTP/1.1 200") && resp.ends_with("upstream"),
                "audit: {resp:?}"
            );
        } else {
            assert!(resp.starts_with("HTTP/1.1 503"), "enforcing: {resp:?}");
        }
        let labels = [
            ("protocol", "http1"),
            ("verdict", verdict),
            ("reason", "mode_none"),
            ("workload", "audited"),
        ];
        assert_eq!(px.sample("passthrough_proxy_decisions_total", &labels), 1.0);
        assert_eq!(
            px.sample(
                "passthrough_decisions_total",
                &[
                    ("path", "proxy"),
                    ("verdict", verdict),
                    ("workload", "audited")
                ]
            ),
            1.0
        );
        assert_eq!(
            px.sample(
                "passthrough_proxy_connections_total",
                &[("protocol", "http1")]
            ),
            1.0
        );
        assert_eq!(px.sample("passthrough_proxy_peek_seconds_count", &[]), 1.0);
        // Bytes relayed, as for TLS: a refused request relays nothing either way (the 503 is
        // the proxy's own answer); an audited one is relayed both ways.
        let relayed = |direction| {
            px.sample(
                "passthrough_proxy_bytes_total",
                &[("direction", direction), ("workload", "audited")],
            )
        };
        if audit {
            assert!(relayed("up") > 40.0 && relayed("down") > 20.0);
        } else {
            assert_eq!((relayed("up"), relayed("down")), (0.0, 0.0));
        }
    }
}

#[tokio::test]
async fn audit_relays_an_unknown_protocol_and_counts_bytes() {
    let up = upstream(false).await;
    for audit in [false, true] {
        let px = proxy(audit).await;
        let mut c = px.connect(up).await;
        c.write_all(b"hello, plain bytes\n").await.unwrap();
        let mut buf = vec![0u8; 64];
        let n = timeout(T, c.read(&mut buf))
            .await
            .expect("proxy neither answered nor closed")
            .unwrap_or(0);
        let verdict = if audit { "would_deny" } else { "deny" };
        if audit {
            assert_eq!(
                &buf[..n],
                b"hello, plain bytes\n",
                "audit: the bytes reach the original destination"
            );
            drop(c);
            // The relay ends when both sides are done; give it a moment to count.
            for _ in 0..50 {
                if px.sample("passthrough_proxy_bytes_total", &[("direction", "down")]) > 0.0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(
                px.sample(
                    "passthrough_proxy_bytes_total",
                    &[("direction", "up"), ("workload", "audited")]
                ),
                19.0
            );
            assert_eq!(
                px.sample(
                    "passthrough_proxy_bytes_total",
                    &[("direction", "down"), ("workload", "audited")]
                ),
                19.0
            );
        } else {
            assert_eq!(n, 0, "enforcing: closed without an answer");
        }
        let labels = [
            ("protocol", "unknown"),
            ("verdict", verdict),
            ("reason", "unknown_protocol"),
        ];
        assert_eq!(px.sample("passthrough_proxy_decisions_total", &labels), 1.0);
    }
}

#[tokio::test]
async fn upstream_connect_errors_are_counted() {
    // A port nobody listens on (bound, then released).
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let px = proxy(true).await;
    let mut c = px.connect(dead).await;
    c.write_all(b"GET / HTTP/1.1\r\nHost: denied.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let resp = read_all(&mut c).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp:?}");
    assert_eq!(
        px.sample(
            "passthrough_proxy_upstream_connect_errors_total",
            &[("workload", "audited")]
        ),
        1.0
    );
}

/// A malformed h2c request (a `host` header beside a different `:authority`) is refused with
/// `400` and never forwarded, `--audit` included: there is no single name it could be audited
/// and forwarded under. A well-formed request is forwarded under `--audit` as usual.
#[tokio::test]
async fn audit_never_forwards_a_malformed_h2c_request() {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::{Request, Response, body::Incoming, service::service_fn};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<Incoming>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"upstream"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let px = proxy(true).await;
    let (mut tx, conn) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(px.connect(up).await),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://allowed.test/")
        .header("host", "denied.test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = tx.send_request(req).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "a malformed request was forwarded"
    );
    assert_eq!(
        px.sample(
            "passthrough_proxy_decisions_total",
            &[("verdict", "deny"), ("reason", "malformed_authority")]
        ),
        1.0
    );
    // Audit forwards a well-formed (denied) request to where it was dialled.
    let req = Request::get("http://denied.test/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = tx.send_request(req).await.unwrap();
    assert_eq!(r.status(), 200);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"upstream");
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}
