//! The proxy path end to end on the real kernel (issue 4, points 1, 4, 5): the real
//! `passthrough run` attaches its programs to a test cgroup; a workload process in that cgroup
//! (pt-probe with rustls / hyper clients, or curl) dials test hosts; the kernel redirects the
//! connections that only a `Domain` match could allow to the agent's proxy, which decides on the
//! SNI / Host / `:authority` and relays to the real rustls / hyper servers on the test hosts.
//!
//! Topology (`passthrough_tests::hostnet`, slot [`TEST_SLOT`]): the workload runs in the **host**
//! network namespace (proxy on 127.0.0.1/[::1]) or in a pod-like netns of its own (proxy on a
//! link-local `--proxy-addr`); the test hosts are AnyIP addresses in a server netns behind a veth
//! from the host netns, `203.0.113.160/27` and `2001:db8:f00:100::/56`. Host A = `.161` / `::a`,
//! host B = `.162` / `::b`, host C = `.163` / `::c`. A DNS server on loopback in this process
//! answers the test names (`--resolver`). Host routes are shared, so these tests run one at a
//! time ([`SERIAL`]).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use passthrough_tests::{
    Agent, AgentBuilder, EPERM, Probe, TestCgroup,
    hostnet::{HostNet, PodNet, TEST_SLOT},
    l7::{Dns, Pki, Servers, Service},
    netns::normalize,
    probe::output_in,
    require_kernel, write_policy,
};
use serde_json::{Value, json};
use tempfile::TempDir;

/// One test at a time: they share host routes (the slot).
static SERIAL: Mutex<()> = Mutex::new(());

const A: u8 = 1;
const B: u8 = 2;
const C: u8 = 3;

/// Host `n` at `port` in family `fam`: `4`, `6`, or `m` (IPv4-mapped, dialled from AF_INET6).
fn host(n: u8, fam: char, port: u16) -> SocketAddr {
    let ip = match fam {
        '4' => TEST_SLOT.host4(n),
        '6' => TEST_SLOT.host6(0x9 + n as u16),
        'm' => match TEST_SLOT.host4(n) {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            v6 => v6,
        },
        _ => unreachable!(),
    };
    SocketAddr::new(ip, port)
}

const FAMILIES: [char; 3] = ['4', '6', 'm'];

fn a_ips() -> Vec<IpAddr> {
    vec![host(A, '4', 0).ip(), host(A, '6', 0).ip()]
}

fn dns_names() -> HashMap<String, Vec<IpAddr>> {
    let mut m = HashMap::new();
    for n in [
        "api.test",
        "x.wild.test",
        "a.b.wild.test",
        "evil.test",
        "web.test",
        "h2.test",
        "grpc.test",
    ] {
        m.insert(n.to_string(), a_ips());
    }
    m.insert(
        "other.test".into(),
        vec![host(B, '4', 0).ip(), host(B, '6', 0).ip()],
    );
    m
}

const CERT_NAMES: &[&str] = &[
    "api.test",
    "*.wild.test",
    "a.b.wild.test",
    "other.test",
    "evil.test",
];

/// Services on every test host.
const SERVICES: &[(u16, Service)] = &[
    (443, Service::TlsEcho),
    (8443, Service::TlsEcho),
    (80, Service::Http),
    (8080, Service::Http),
    (50051, Service::Http),
    (5432, Service::Echo),
];

/// The policy most tests use (Mesh, Matched).
fn policy(extra: &[&str]) -> String {
    let mut matches = vec![
        "{type: Domain, value: api.test, port: 443, protocol: tls}",
        "{type: Domain, value: \"*.wild.test\", port: 443, protocol: tls}",
        "{type: Domain, value: web.test, port: 80, protocol: http}",
        "{type: Domain, value: h2.test, port: 8080, protocol: http2}",
        "{type: Domain, value: grpc.test, port: 50051, protocol: grpc}",
    ];
    matches.extend_from_slice(extra);
    passthrough_tests::mesh_policy("proxy-test", "Matched", &matches)
}

/// Where the workload runs.
enum Workload {
    /// In the host network namespace (proxy on loopback).
    Host,
    /// In a pod-like netns; `proxy_addr`: whether the agent gets `--proxy-addr`.
    Pod { proxy_addr: bool },
}

/// A test's world. Field order = drop order: the workload first, then the agent, the servers,
/// the namespaces, the cgroups, the files, and last the serialization guard.
struct World {
    probe: Probe,
    /// With [`Opts::two_workloads`]: a probe in workload `b` (`probe` is in `a`).
    probe_b: Option<Probe>,
    agent: Agent,
    servers: Servers,
    dns: Dns,
    pod: Option<PodNet>,
    _net: HostNet,
    cg: TestCgroup,
    /// The workload cgroup (`cg` itself, or a child of it).
    workload: PathBuf,
    ca: PathBuf,
    _dir: TempDir,
    _serial: MutexGuard<'static, ()>,
}

struct Opts<'a> {
    yaml: String,
    workload: Workload,
    /// The workload is `cg/w` and the programs attach at `cg` (one attachment, several cgroups).
    nested: bool,
    /// Two workloads `cg/a` (labels app=a) and `cg/b` (app=b) from a workloads file, attached
    /// at `cg`; `probe` runs in a, `probe_b` in b.
    two_workloads: bool,
    agent: &'a dyn Fn(AgentBuilder) -> AgentBuilder,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            yaml: policy(&[]),
            workload: Workload::Host,
            nested: false,
            two_workloads: false,
            agent: &|b| b,
        }
    }
}

impl World {
    fn new(o: Opts) -> World {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        passthrough_tests::sweep(false);
        let dir = passthrough_tests::test_dir();
        let cg = TestCgroup::new().unwrap();
        let workload = if o.two_workloads {
            cg.child("a").unwrap().path().to_path_buf()
        } else if o.nested {
            cg.child("w").unwrap().path().to_path_buf()
        } else {
            cg.path().to_path_buf()
        };
        let workload_b = cg.path().join("b");
        let net = HostNet::new(TEST_SLOT).unwrap();
        let pki = Pki::new(CERT_NAMES).unwrap();
        let ca = pki.write_ca(dir.path()).unwrap();
        let servers =
            Servers::start(Some(net.server_ns()), SERVICES, Some(pki.server.clone()), 2).unwrap();
        let dns = Dns::start(dns_names(), 300).unwrap();
        let pod = match o.workload {
            Workload::Host => None,
            Workload::Pod { .. } => Some(PodNet::new(TEST_SLOT).unwrap()),
        };
        let policy = write_policy(dir.path(), &o.yaml);
        // The proxy path: every connection a Domain match could allow takes the proxy, also a
        // TLS one to a verified destination, which the TLS fast path (on by default) would
        // send direct (tests/tests/tls_fast_path.rs).
        let mut b = Agent::builder()
            .policy(&policy)
            .arg("--resolver")
            .arg(&dns.addr.to_string())
            .arg("--tls-fast-path=off");
        if o.two_workloads {
            cg.child("b").unwrap();
            let file = dir.path().join("workloads.yaml");
            passthrough_tests::write_file(
                &file,
                &format!(
                    "- {{name: a, cgroup: {}, labels: {{app: a}}}}\n- {{name: b, cgroup: {}, labels: {{app: b}}}}\n",
                    workload.display(),
                    workload_b.display()
                ),
            );
            b = b.workloads(&file);
        } else {
            b = b.cgroup(&workload);
        }
        if o.nested || o.two_workloads {
            b = b.attach_cgroup(cg.path());
        }
        if let (Some(pod), Workload::Pod { proxy_addr: true }) = (&pod, &o.workload) {
            let port = pod.free_proxy_port().unwrap();
            for a in pod.proxy_addrs(port) {
                b = b.arg("--proxy-addr").arg(&a.to_string());
            }
        }
        let agent = (o.agent)(b).start().unwrap();
        let probe =
            Probe::spawn_in(&workload, pod.as_ref().map(|p| p.ns_path()).as_deref()).unwrap();
        let probe_b = o
            .two_workloads
            .then(|| Probe::spawn_in(&workload_b, None).unwrap());
        World {
            probe,
            probe_b,
            agent,
            servers,
            dns,
            pod,
            _net: net,
            cg,
            workload,
            ca,
            _dir: dir,
            _serial: serial,
        }
    }

    fn host() -> World {
        World::new(Opts::default())
    }

    fn tls(&mut self, addr: SocketAddr, sni: Option<&str>) -> Value {
        let ca = self.ca.display().to_string();
        self.probe
            .json(&json!({"op": "tls", "addr": addr.to_string(), "sni": sni, "ca": ca}))
    }

    /// TLS with `sni` to `addr` works end to end (greeting, echo after half-close), reaches the
    /// host `reaches` (default: `addr`), and the client's `getpeername()` is `addr`.
    fn tls_ok(&mut self, addr: SocketAddr, sni: &str, reaches: Option<SocketAddr>) {
        let reaches = normalize(reaches.unwrap_or(addr));
        let before = self.servers.accepted(reaches);
        let r = self.tls(addr, Some(sni));
        assert_eq!(
            r["ok"], true,
            "TLS to {addr} with SNI {sni:?} should work: {r}"
        );
        let want_sni = sni.trim_end_matches('.').to_ascii_lowercase();
        assert_eq!(
            r["greeting"],
            format!("local={reaches} sni={want_sni}"),
            "TLS to {addr} with SNI {sni:?}: wrong host or name: {r}"
        );
        assert_eq!(r["echo"], "ping", "echo after half-close: {r}");
        assert_eq!(
            r["peer"],
            addr.to_string(),
            "getpeername() must return the dialled address: {r}"
        );
        assert_eq!(self.servers.accepted(reaches), before + 1, "{r}");
    }

    /// TLS with `sni` to `addr`: connect works (redirected), the proxy refuses the ClientHello
    /// with an `access_denied` alert, and no test host sees a connection.
    fn tls_denied(&mut self, addr: SocketAddr, sni: Option<&str>) {
        let before = self.servers.accepted_total();
        let r = self.tls(addr, sni);
        assert_eq!(
            r["ok"], false,
            "TLS to {addr} with SNI {sni:?} should be denied: {r}"
        );
        assert_eq!(r["stage"], "handshake", "{r}");
        assert!(
            r["error"].as_str().unwrap_or("").contains("AccessDenied"),
            "the proxy denies with an access_denied alert: {r}"
        );
        assert_eq!(r["peer"], addr.to_string(), "{r}");
        assert_eq!(
            self.servers.accepted_total(),
            before,
            "a denied connection reached a test host: {r}"
        );
    }

    /// `connect()` to `addr` fails with EPERM at once (the kernel denies; no proxy involved).
    fn eperm(&mut self, addr: SocketAddr) {
        let before = self.servers.accepted_total();
        let r = self.tls(addr, Some("api.test"));
        assert_eq!(r["stage"], "connect", "connect to {addr} should fail: {r}");
        assert_eq!(
            r["errno"], EPERM,
            "connect to {addr} should fail with EPERM: {r}"
        );
        assert_eq!(self.servers.accepted_total(), before);
    }

    /// A hand-made ClientHello with `sni` verbatim: true when it reached host `addr`, false when
    /// the proxy answered access_denied (15 03 03 00 02 02 31) and nothing reached a host.
    fn raw_hello_reaches(&mut self, addr: SocketAddr, sni: &str) -> bool {
        let before = self.servers.accepted_total();
        let before_a = self.servers.accepted(addr);
        let r = self
            .probe
            .json(&json!({"op": "raw_hello", "addr": addr.to_string(), "sni": sni}));
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["peer"], addr.to_string(), "{r}");
        let denied = r["reply_hex"] == "15030300020231";
        if denied {
            assert_eq!(self.servers.accepted_total(), before, "{r}");
        } else {
            // The real server got our (unanswerable) hello and failed the handshake itself.
            wait_until(|| self.servers.accepted(addr) == before_a + 1);
            assert_eq!(self.servers.accepted(addr), before_a + 1, "{r}");
        }
        !denied
    }

    fn http1(&mut self, addr: SocketAddr, hosts: &[&str]) -> Vec<Value> {
        let reqs: Vec<Value> = hosts.iter().map(|h| json!({"host": h})).collect();
        let r = self
            .probe
            .json(&json!({"op": "http1", "addr": addr.to_string(), "requests": reqs}));
        assert_eq!(r["ok"], true, "HTTP/1.1 to {addr}: {r}");
        assert_eq!(r["peer"], addr.to_string(), "{r}");
        r["responses"].as_array().cloned().unwrap_or_default()
    }

    fn h2c(&mut self, addr: SocketAddr, authorities: &[&str]) -> Vec<Value> {
        let reqs: Vec<Value> = authorities
            .iter()
            .map(|a| json!({"authority": a}))
            .collect();
        let r = self
            .probe
            .json(&json!({"op": "h2c", "addr": addr.to_string(), "requests": reqs}));
        assert_eq!(r["ok"], true, "h2c to {addr}: {r}");
        assert_eq!(r["peer"], addr.to_string(), "{r}");
        r["responses"].as_array().cloned().unwrap_or_default()
    }

    fn grpc(&mut self, addr: SocketAddr, authority: &str) -> Value {
        let r = self.probe.json(
            &json!({"op": "grpc", "addr": addr.to_string(), "authority": authority, "path": "/test.Echo/Say"}),
        );
        assert_eq!(r["ok"], true, "gRPC to {addr}: {r}");
        assert_eq!(r["peer"], addr.to_string(), "{r}");
        r
    }
}

fn wait_until(mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ok_from(resp: &Value, local: SocketAddr, host: &str) {
    assert_eq!(resp["status"], 200, "{resp}");
    let body = resp["body"].as_str().unwrap_or("");
    assert!(
        body.starts_with(&format!("local={} host={host} ", normalize(local))),
        "answer from the wrong host or for the wrong name: {resp}"
    );
}

fn denied_503(resp: &Value, host: &str) {
    assert_eq!(resp["status"], 503, "{resp}");
    let body = resp["body"].as_str().unwrap_or("");
    assert!(
        body.contains(host),
        "the 503 body names the host {host}: {resp}"
    );
    assert!(
        body.to_ascii_lowercase().contains("meshpassthrough"),
        "the 503 body says no MeshPassthrough match allowed it: {resp}"
    );
}

// ------------------------------------------------------------------------------------- TLS

#[test]
fn tls_exact_wildcard_case_allowed_trailing_dot_other_and_no_sni_denied() {
    if !require_kernel() {
        return;
    }
    let mut w = World::host();
    for fam in FAMILIES {
        let a = host(A, fam, 443);
        w.tls_ok(a, "api.test", None);
        w.tls_ok(a, "x.wild.test", None);
        // Depth: `*.wild.test` covers any number of labels.
        w.tls_ok(a, "a.b.wild.test", None);
        // Case: rustls sends the name as given.
        w.tls_ok(a, "API.Test", None);
        w.tls_ok(a, "X.Wild.TEST", None);
        // A trailing dot makes another name, as in Kuma (Envoy finds no filter chain for it).
        // rustls strips it, so a hand-made hello carries it.
        assert!(!w.raw_hello_reaches(a, "api.test."), "{a} api.test.");
        assert!(
            !w.raw_hello_reaches(a, "A.B.WILD.test."),
            "{a} A.B.WILD.test."
        );
        // Denied: another name, the wildcard's bare domain, no SNI.
        w.tls_denied(a, Some("other.test"));
        w.tls_denied(a, Some("evil.test"));
        assert!(!w.raw_hello_reaches(a, "wild.test"), "{a} wild.test");
        assert!(
            !w.raw_hello_reaches(a, "api.test.evil"),
            "{a} api.test.evil"
        );
        w.tls_denied(a, None);
        // The Domain matches are for port 443 only: 8443 is denied in the kernel.
        w.eperm(host(A, fam, 8443));
    }
}

/// Kuma parity for plaintext HTTP (issue 18): Kuma's listener serves every `http`, `http2` and
/// `grpc` Domain match with one HTTP codec `AUTO`, so either codec meets every L7 match; its
/// virtual hosts are `d` and `d:port`, so a Host or `:authority` naming another port gets the
/// 503; and a trailing dot makes another name. Our clients (hyper) and curl, through the real
/// kernel redirect; the test hosts' servers speak both codecs, so what reaches them is what
/// the client sent.
#[test]
fn l7_codecs_host_ports_and_trailing_dots_as_kumas_listener() {
    if !require_kernel() {
        return;
    }
    let mut w = World::host();
    let version = |r: &Value| {
        r["body"]
            .as_str()
            .unwrap_or("")
            .rsplit("version=")
            .next()
            .unwrap_or("")
            .to_string()
    };
    for fam in FAMILIES {
        // h2c prior knowledge meets the `http` match of port 80.
        let a80 = host(A, fam, 80);
        let r = w.h2c(a80, &["web.test", "web.test:80", "evil.test"]);
        ok_from(&r[0], a80, "web.test");
        assert_eq!(version(&r[0]), "HTTP/2.0", "{}", r[0]);
        ok_from(&r[1], a80, "web.test:80");
        denied_503(&r[2], "evil.test");
        // HTTP/1.1 meets the `http2` match of 8080 and the `grpc` match of 50051.
        let a8080 = host(A, fam, 8080);
        let r = w.http1(a8080, &["h2.test"]);
        ok_from(&r[0], a8080, "h2.test");
        assert_eq!(version(&r[0]), "HTTP/1.1", "{}", r[0]);
        let a50051 = host(A, fam, 50051);
        let r = w.http1(a50051, &["grpc.test:50051"]);
        ok_from(&r[0], a50051, "grpc.test:50051");
        // The Host's port must be the dialled one; an allowed name with another port, or
        // with a trailing dot, is a 503 and reaches no host.
        for h in ["web.test:8080", "web.test:", "web.test.", "web.test.:80"] {
            let before = w.servers.accepted_total();
            let r = w.http1(a80, &[h]);
            denied_503(&r[0], h);
            assert_eq!(w.servers.accepted_total(), before, "{h}: {}", r[0]);
        }
        for h in ["h2.test:80", "h2.test."] {
            let r = w.h2c(a8080, &[h]);
            denied_503(&r[0], h);
        }
    }
    // curl, an independent client: h2c prior knowledge on the `http` match, a Host naming
    // another port, and a trailing dot.
    for fam in ['4', '6'] {
        let a = host(A, fam, 80);
        let ip = match a.ip() {
            IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        let curl = |extra: &[&str]| {
            let mut args = vec![
                "-sS",
                "--max-time",
                "5",
                "-w",
                "\n%{http_code} %{http_version}",
            ];
            args.extend_from_slice(extra);
            let out = output_in(&w.workload, None, "curl", &args).unwrap();
            (
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        };
        let resolve = format!("web.test:80:{ip}");
        let (out, err) = curl(&[
            "--http2-prior-knowledge",
            "--resolve",
            &resolve,
            "http://web.test/curl",
        ]);
        assert!(out.ends_with("\n200 2"), "curl h2c via {ip}: {out:?} {err}");
        assert!(
            out.starts_with(&format!("local={} host=web.test ", normalize(a))),
            "{out}"
        );
        let url = format!("http://{ip}/curl");
        for h in ["Host: web.test:8080", "Host: web.test."] {
            let (out, err) = curl(&["-H", h, &url]);
            assert!(
                out.ends_with("\n503 1.1"),
                "curl {h} via {ip}: {out:?} {err}"
            );
            assert!(out.contains("MeshPassthrough"), "{out}");
        }
        let (out, err) = curl(&["-H", "Host: web.test:80", &url]);
        assert!(out.ends_with("\n200 1.1"), "curl via {ip}: {out:?} {err}");
    }
}

#[test]
fn curl_http_through_the_proxy() {
    // curl as a second, independent client: plain HTTP via the proxy, and a denied Host.
    if !require_kernel() {
        return;
    }
    let w = World::host();
    for fam in ['4', '6'] {
        let a = host(A, fam, 80);
        let ip = match a.ip() {
            IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        for (name, code) in [("web.test", "200"), ("evil.test", "503")] {
            let out = output_in(
                &w.workload,
                None,
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "5",
                    "-w",
                    "\n%{http_code}",
                    "--resolve",
                    &format!("{name}:80:{ip}"),
                    &format!("http://{name}/curl"),
                ],
            )
            .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                text.ends_with(&format!("\n{code}")),
                "curl http://{name}/ via {ip}: {text:?} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            if code == "200" {
                assert!(
                    text.starts_with(&format!("local={} host={name} ", normalize(a))),
                    "{text}"
                );
            } else {
                assert!(text.contains(name), "{text}");
            }
        }
    }
    let _ = &w.cg;
}

// ------------------------------------------------------------------------------------ HTTP

#[test]
fn http1_every_request_checked_h2c_authority_and_grpc_status() {
    if !require_kernel() {
        return;
    }
    let mut w = World::host();
    for fam in FAMILIES {
        let a = host(A, fam, 80);
        let r = w.http1(a, &["web.test"]);
        ok_from(&r[0], a, "web.test");
        // Host with a port, and case.
        let r = w.http1(a, &["Web.Test:80"]);
        ok_from(&r[0], a, "Web.Test:80");
        let r = w.http1(a, &["evil.test"]);
        denied_503(&r[0], "evil.test");
        // Keep-alive: the second request's Host is checked too.
        let r = w.http1(a, &["web.test", "web.test", "evil.test"]);
        ok_from(&r[0], a, "web.test");
        ok_from(&r[1], a, "web.test");
        denied_503(&r[2], "evil.test");
        // Absolute-form.
        let r = w.probe.json(&json!({"op": "http1", "addr": a.to_string(),
            "requests": [{"host": "web.test", "absolute": true}]}));
        ok_from(&r["responses"][0], a, "web.test");

        // h2c: every stream's :authority.
        let h = host(A, fam, 8080);
        let r = w.h2c(h, &["h2.test", "evil.test", "h2.test"]);
        ok_from(&r[0], h, "h2.test");
        assert!(
            r[0]["body"].as_str().unwrap().ends_with("version=HTTP/2.0"),
            "{}",
            r[0]
        );
        denied_503(&r[1], "evil.test");
        ok_from(&r[2], h, "h2.test");
        // h2c: a host header naming another entity than :authority, or userinfo in
        // :authority, is malformed: 400 and never forwarded (issue 16). Each attempt opens its
        // own connection, refused before any upstream connection exists.
        for (authority, host) in [("h2.test", Some("evil.test")), ("evil.test@h2.test", None)] {
            let before = w.servers.accepted_total();
            let mut req = json!({"authority": authority});
            if let Some(host) = host {
                req["host"] = json!(host);
            }
            let r = w
                .probe
                .json(&json!({"op": "h2c", "addr": h.to_string(), "requests": [req]}));
            assert_eq!(r["ok"], true, "{r}");
            let resp = &r["responses"][0];
            assert_eq!(
                resp["status"], 400,
                ":authority {authority} host {host:?}: {r}"
            );
            assert_eq!(
                w.servers.accepted_total(),
                before,
                "a malformed h2c request reached a test host: {r}"
            );
        }

        // gRPC: allowed call → the server's status 0; denied → a gRPC error status.
        let g = host(A, fam, 50051);
        let r = w.grpc(g, "grpc.test");
        assert_eq!(r["status"], 200, "{r}");
        assert_eq!(r["grpc_status"], "0", "{r}");
        assert!(
            r["body"]
                .as_str()
                .unwrap()
                .starts_with(&format!("local={} host=grpc.test", normalize(g))),
            "{r}"
        );
        let r = w.grpc(g, "evil.test");
        assert_ne!(
            r["grpc_status"],
            Value::Null,
            "a denied gRPC call gets a grpc-status: {r}"
        );
        assert_ne!(r["grpc_status"], "0", "{r}");
        assert!(
            r["grpc_message"]
                .as_str()
                .unwrap_or("")
                .contains("evil.test"),
            "the grpc-message names the host: {r}"
        );
        // A port without any Domain match: the kernel denies.
        w.eperm(host(A, fam, 5432));
    }
}

// ------------------------------------------------------------------- refused without record

/// The proxy closed the connection without a byte: FIN, or RST because our unread ClientHello
/// was still in its receive buffer when it closed (both are "refused").
fn closed_without_data(r: &Value) {
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["reply_hex"], "", "no data from the proxy: {r}");
    assert!(
        r["eof"] == true || r["read_errno"] == libc::ECONNRESET,
        "closed (FIN or RST): {r}"
    );
}

#[test]
fn straight_to_the_proxy_port_without_a_recorded_destination_is_closed() {
    if !require_kernel() {
        return;
    }
    let mut w = World::host();
    let port = w.agent.proxy_port();
    assert_ne!(port, 0);
    for proxy in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        // From the workload (loopback is not filtered, so nothing is recorded) and from outside
        // every workload: with a ClientHello for an allowed name, and silent.
        let r = w
            .probe
            .json(&json!({"op": "raw_hello", "addr": proxy, "sni": "api.test"}));
        closed_without_data(&r);
        let r = w.probe.json(&json!({"op": "tcp", "addr": proxy}));
        assert_eq!(r["first_read"], "eof", "closed at once, no data: {r}");

        let r = passthrough_tests::clients::run(
            &json!({"op": "raw_hello", "addr": proxy, "sni": "api.test"}),
        );
        closed_without_data(&r);
    }
    assert_eq!(w.servers.accepted_total(), 0);
    assert!(
        w.agent.log().contains("no_original_destination"),
        "the refusal is logged\n{}",
        w.agent.describe()
    );
    // The proxy still works afterwards.
    w.tls_ok(host(A, '4', 443), "api.test", None);
}

// ------------------------------------------------------------ agent inside the filtered cgroup

#[test]
fn agent_below_the_attachment_is_not_redirected_thanks_to_so_mark() {
    if !require_kernel() {
        return;
    }
    // Unselected mode None: below the attachment, outside every workload, only the agent's
    // mark lets its upstream connections out.
    let mut w = World::new(Opts {
        nested: true,
        agent: &|b| b.unselected_mode("None"),
        ..Opts::default()
    });
    // Attached at the parent; the agent joins the attached parent cgroup itself (below the
    // attachment, in no workload), where the programs run for its upstream connections and
    // would deny or redirect them under the unselected mode if they were not marked. (The agent
    // must not be *in* a workload: there the mark is ignored, so a workload with CAP_NET_ADMIN
    // cannot spoof it — see bypass.rs `agent_mark_spoofing_needs_cap_net_admin`.)
    let pid = w.agent.pid();
    let parent = w.workload.parent().unwrap().to_path_buf();
    std::fs::write(parent.join("cgroup.procs"), pid.to_string()).unwrap();
    let procs = std::fs::read_to_string(parent.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|l| l.trim() == pid.to_string()),
        "{procs}"
    );
    for fam in FAMILIES {
        w.tls_ok(host(A, fam, 443), "api.test", None);
        w.tls_denied(host(A, fam, 443), Some("evil.test"));
        let r = w.http1(host(A, fam, 80), &["web.test", "evil.test"]);
        ok_from(&r[0], host(A, fam, 80), "web.test");
        denied_503(&r[1], "evil.test");
    }
    // A fresh workload process beside the agent is still filtered.
    let mut p = Probe::spawn_in(&w.workload, None).unwrap();
    let r = p.json(&json!({"op": "tcp", "addr": host(A, '4', 5432).to_string()}));
    assert_eq!(r["errno"], EPERM, "{r}");
    assert!(w.agent.is_running());
}

// ------------------------------------------------------------------- destination check

fn destination_world(mode: &str) -> World {
    let mode = mode.to_string();
    World::new(Opts {
        agent: &move |b: AgentBuilder| b.arg("--domain-destination").arg(&mode),
        ..Opts::default()
    })
}

#[test]
fn destination_verify_denies_a_name_sent_to_another_host() {
    if !require_kernel() {
        return;
    }
    let mut w = destination_world("verify");
    for fam in FAMILIES {
        // api.test / web.test resolve to A; the client dials B with those names.
        w.tls_denied(host(B, fam, 443), Some("api.test"));
        let r = w.http1(host(B, fam, 80), &["web.test"]);
        assert_eq!(r[0]["status"], 503, "{}", r[0]);
        assert!(
            r[0]["body"].as_str().unwrap().contains("web.test"),
            "{}",
            r[0]
        );
        // The right host still works, and other.test resolves to B.
        w.tls_ok(host(A, fam, 443), "api.test", None);
        w.tls_ok(host(A, fam, 443), "x.wild.test", None);
    }
    assert!(w.dns.queries.load(std::sync::atomic::Ordering::SeqCst) > 0);
}

#[test]
fn destination_resolve_sends_to_the_resolved_host() {
    if !require_kernel() {
        return;
    }
    let mut w = destination_world("resolve");
    for fam in FAMILIES {
        // Dialled B, sent to A (the resolved address of the family the client used).
        let want = if fam == '6' {
            host(A, '6', 443)
        } else {
            host(A, '4', 443)
        };
        w.tls_ok(host(B, fam, 443), "api.test", Some(want));
        let b80 = host(B, fam, 80);
        let r = w.http1(b80, &["web.test"]);
        ok_from(&r[0], SocketAddr::new(want.ip(), 80), "web.test");
    }
}

#[test]
fn destination_original_trusts_the_client() {
    if !require_kernel() {
        return;
    }
    let mut w = destination_world("original");
    for fam in FAMILIES {
        w.tls_ok(host(B, fam, 443), "api.test", None);
        let r = w.http1(host(B, fam, 80), &["web.test"]);
        ok_from(&r[0], host(B, fam, 80), "web.test");
        w.tls_denied(host(B, fam, 443), Some("evil.test"));
    }
}

// ------------------------------------------------------------------------- any match allows

#[test]
fn any_match_allows_ip_and_domain_matches_on_one_port() {
    if !require_kernel() {
        return;
    }
    let c6 = host(C, '6', 0).ip().to_string();
    let ip4 = format!("{{type: IP, value: {}, port: 443}}", host(C, '4', 0).ip());
    let ip6 = format!("{{type: IP, value: \"{c6}\", port: 443}}");
    let mut w = World::new(Opts {
        yaml: policy(&[&ip4, &ip6]),
        ..Opts::default()
    });
    for fam in FAMILIES {
        // C is allowed by its IP match, in the kernel: any SNI works (the proxy would refuse
        // other.test), and it is the real host answering.
        w.tls_ok(host(C, fam, 443), "other.test", None);
        w.tls_ok(host(C, fam, 443), "api.test", None);
        // The IP match on 443 does not hide the Domain matches of 443.
        w.tls_ok(host(A, fam, 443), "api.test", None);
        w.tls_denied(host(A, fam, 443), Some("other.test"));
        // Neither covers 8443.
        w.eperm(host(C, fam, 8443));
    }
}

// --------------------------------------------------------------------------------- pods

#[test]
fn pod_reaches_the_proxy_at_proxy_addr() {
    if !require_kernel() {
        return;
    }
    let mut w = World::new(Opts {
        workload: Workload::Pod { proxy_addr: true },
        ..Opts::default()
    });
    assert!(w.pod.is_some());
    // The decisions were made on connections that came from the pod's addresses, to the proxy
    // at --proxy-addr (the proxy's denial lines name the peer; allowed ones log at debug only).
    let pod_peers = |log: &str| {
        (
            log.contains(&format!("peer=\"{}:", TEST_SLOT.pod_v4)),
            log.contains(&format!("peer=\"[{}]:", TEST_SLOT.pod_v6)),
        )
    };
    for fam in FAMILIES {
        w.tls_ok(host(A, fam, 443), "api.test", None);
        w.tls_ok(host(A, fam, 443), "a.b.wild.test", None);
        w.tls_denied(host(A, fam, 443), Some("other.test"));
        w.tls_denied(host(A, fam, 443), None);
        let r = w.http1(host(A, fam, 80), &["web.test", "evil.test"]);
        ok_from(&r[0], host(A, fam, 80), "web.test");
        denied_503(&r[1], "evil.test");
        let r = w.grpc(host(A, fam, 50051), "grpc.test");
        assert_eq!(r["grpc_status"], "0", "{r}");
        w.eperm(host(A, fam, 8443));
    }
    assert_eq!(
        pod_peers(&w.agent.log()),
        (true, true),
        "{}",
        w.agent.describe()
    );
    let procs = std::fs::read_to_string(w.workload.join("cgroup.procs")).unwrap();
    assert!(procs.contains(&w.probe.pid().to_string()));
}

#[test]
fn pod_without_proxy_addr_gets_eperm_for_domain_only_destinations() {
    if !require_kernel() {
        return;
    }
    let mut w = World::new(Opts {
        workload: Workload::Pod { proxy_addr: false },
        ..Opts::default()
    });
    for fam in FAMILIES {
        w.eperm(host(A, fam, 443));
        w.eperm(host(A, fam, 80));
    }
}

// ------------------------------------------------------------------------------ more cases

#[test]
fn the_proxy_decides_with_the_policy_of_the_connecting_workload() {
    // Two workloads under one attachment: the Mesh policy for both, and for `b` only one more
    // Domain match. The proxy must judge each connection with its own workload's merged policy
    // (the workload recorded by the kernel with the original destination).
    if !require_kernel() {
        return;
    }
    let for_b = "---\napiVersion: kuma.io/v1alpha1\nkind: MeshPassthrough\nmetadata: {name: for-b, labels: {kuma.io/mesh: default}}\nspec:\n  targetRef: {kind: MeshSubset, tags: {app: b}}\n  default:\n    appendMatch:\n      - {type: Domain, value: evil.test, port: 443, protocol: tls}\n      - {type: Domain, value: evil.test, port: 80, protocol: http}\n";
    let mut w = World::new(Opts {
        yaml: policy(&[]) + for_b,
        two_workloads: true,
        ..Opts::default()
    });
    for fam in FAMILIES {
        let a443 = host(A, fam, 443);
        w.tls_ok(a443, "api.test", None);
        w.tls_denied(a443, Some("evil.test"));
        let r = w.http1(host(A, fam, 80), &["evil.test"]);
        denied_503(&r[0], "evil.test");

        let ca = w.ca.display().to_string();
        let pb = w.probe_b.as_mut().unwrap();
        for sni in ["api.test", "evil.test"] {
            let before = w.servers.accepted(a443);
            let r = pb.json(&json!({"op": "tls", "addr": a443.to_string(), "sni": sni, "ca": ca}));
            assert_eq!(r["ok"], true, "workload b, {sni}: {r}");
            assert_eq!(
                r["greeting"],
                format!("local={} sni={sni}", normalize(a443)),
                "{r}"
            );
            assert_eq!(w.servers.accepted(a443), before + 1);
        }
        let r = pb.json(&json!({"op": "http1", "addr": host(A, fam, 80).to_string(),
            "requests": [{"host": "evil.test"}, {"host": "web.test"}]}));
        ok_from(&r["responses"][0], host(A, fam, 80), "evil.test");
        ok_from(&r["responses"][1], host(A, fam, 80), "web.test");
    }
}

#[test]
fn concurrent_connections_each_reach_their_own_destination() {
    // Many redirected connections at once, from one process, to different hosts: the proxy must
    // recover each one's own original destination (`original`: it connects where the client
    // dialled, so a mix-up shows as a greeting from the wrong host).
    if !require_kernel() {
        return;
    }
    let mut w = destination_world("original");
    let ca = w.ca.display().to_string();
    let mut reqs = Vec::new();
    let mut dials = Vec::new();
    for round in 0..2 {
        for n in 1..=24u8 {
            let fam = FAMILIES[(n as usize + round) % 3];
            let d = host(n, fam, 443);
            dials.push(d);
            reqs.push(json!({"op": "tls", "addr": d.to_string(), "sni": "api.test", "ca": ca}));
        }
    }
    let r = w.probe.json(&json!({"op": "parallel", "requests": reqs}));
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), dials.len());
    for (d, r) in dials.iter().zip(results) {
        assert_eq!(r["ok"], true, "{d}: {r}");
        assert_eq!(
            r["greeting"],
            format!("local={} sni=api.test", normalize(*d)),
            "{d}: {r}"
        );
        assert_eq!(r["peer"], d.to_string(), "{r}");
        assert_eq!(r["echo"], "ping", "{r}");
    }
}

#[test]
fn without_the_proxy_domain_only_destinations_get_eperm() {
    // `--proxy-port 0`: no proxy, so a connection only a Domain match could allow is denied in
    // the kernel instead of being redirected to nothing.
    if !require_kernel() {
        return;
    }
    let mut w = World::new(Opts {
        agent: &|b: AgentBuilder| b.arg("--proxy-port").arg("0"),
        ..Opts::default()
    });
    assert_eq!(w.agent.proxy_port(), 0);
    for fam in FAMILIES {
        w.eperm(host(A, fam, 443));
        w.eperm(host(A, fam, 80));
    }
}
