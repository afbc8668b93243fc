//! The TLS fast path on the real kernel (docs/design.md, "The TLS fast path"; docs/security.md,
//! "The TLS fast path"): a TLS-only Domain candidate to a verified destination connects
//! directly, and the `sk_msg` judge decides its ClientHello before any byte of it leaves.
//!
//! These tests drive the kernel side alone: the real loader and plan compiler write a policy
//! and verified destinations, the programs are attached to a test cgroup, and workload
//! processes in that cgroup (pt-probe with rustls, and this test executable as a helper for
//! the unusual send paths) dial test hosts in a server netns behind a veth (slot
//! [`FAST_SLOT`]). No proxy listens: a connection the kernel sends to the proxy fails with
//! `ECONNREFUSED`, which is how a test sees that the proxy path was taken. What left the host
//! is what the servers received: `Record` listeners keep every byte of every connection.
//!
//! The helper (`helper_entry`) is this executable started again inside the workload cgroup with
//! a JSON request in `PT_FASTPATH_HELPER`; it prints one `PTRESULT <json>` line.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use passthrough_common::{VerifiedKey, flags};
use passthrough_policy::{
    self as policy, Mode, Workload,
    plan::{self, PlanOptions},
};
use passthrough_testhello::{ECH, Hello, PADDING, TLS12, TLS13};
use passthrough_tests::{
    Agent, Probe, TestCgroup,
    hostnet::{FAST_SLOT, HostNet},
    l7::{Dns, Pki, Servers, Service},
    netns::normalize,
    probe::{run_helper, serve_helper},
    require_kernel, write_policy,
};
use passthrough_user::{
    events::monotonic_ns,
    kernel::{Kernel, LoadOptions, ProxySettings},
};
use serde_json::{Value, json};
use tempfile::TempDir;

// ------------------------------------------------------------------------------ the helper

const HELPER_ENV: &str = "PT_FASTPATH_HELPER";

/// Not a test of its own: the entry point of the helper (does nothing unless
/// `PT_FASTPATH_HELPER` is set).
#[test]
fn helper_entry() {
    serve_helper(HELPER_ENV, ops::run);
}

/// Runs one helper operation inside `cgroup` (host netns).
fn helper(cgroup: &Path, req: Value) -> Value {
    run_helper(HELPER_ENV, cgroup, None, req)
}

/// The helper's operation: `send` a payload to `addr` by one send path (`mode`), then read
/// what comes back. Answers `{"ok": true, "send_errno": 0|N, "sent": n, "reply_hex",
/// "eof", "read_errno"}` or `{"ok": false, "stage", "errno"}`; never panics.
mod ops {
    use std::{
        io::{self, Read, Write},
        net::{SocketAddr, TcpStream},
        os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        time::Duration,
    };

    use passthrough_tests::{
        netns::setsockopt_int,
        sys::{errno, fail, last},
    };
    use serde_json::{Value, json};
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};

    const TIMEOUT: Duration = Duration::from_secs(3);
    /// `TCP_FASTOPEN_NO_COOKIE`: data in the SYN without a cookie (the client side of TFO
    /// then always sends it, which is what an attacker would choose).
    const TCP_FASTOPEN_NO_COOKIE: i32 = 34;

    fn socket(a: &SocketAddr) -> io::Result<Socket> {
        Socket::new(Domain::for_address(*a), Type::STREAM, Some(Protocol::TCP))
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap_or(0))
            .collect()
    }

    /// The result of one send syscall (or a loop of them): bytes or errno.
    fn sent(r: io::Result<usize>) -> (usize, i32) {
        match r {
            Ok(n) => (n, 0),
            Err(e) => (0, errno(&e)),
        }
    }

    fn write_all(fd: RawFd, mut b: &[u8]) -> io::Result<usize> {
        let mut total = 0;
        while !b.is_empty() {
            // SAFETY: a live fd and buffer.
            let n = unsafe { libc::write(fd, b.as_ptr() as *const libc::c_void, b.len()) };
            if n < 0 {
                return Err(last());
            }
            total += n as usize;
            b = &b[n as usize..];
        }
        Ok(total)
    }

    pub fn run(req: &Value) -> Value {
        let Some(a) = req["addr"]
            .as_str()
            .and_then(|s| s.parse::<SocketAddr>().ok())
        else {
            return json!({"ok": false, "stage": "request"});
        };
        let payload = hex(req["hex"].as_str().unwrap_or(""));
        let mode = req["mode"].as_str().unwrap_or("write");
        let chunk = req["chunk"].as_u64().unwrap_or(1).max(1) as usize;
        // `mptcp`: an MPTCP socket (`IPPROTO_MPTCP`), connected and written to like `write`.
        let s = match if mode == "mptcp" {
            Socket::new(
                Domain::for_address(a),
                Type::STREAM,
                Some(Protocol::from(262)),
            )
        } else {
            socket(&a)
        } {
            Ok(s) => s,
            Err(e) => return fail("socket", &e),
        };
        let fd = s.as_raw_fd();
        let sa = SockAddr::from(a);
        let (n, e) = match mode {
            // Data in the SYN: `sendto(MSG_FASTOPEN)` connects and sends in one call.
            "tfo_sendto" => {
                let _ = setsockopt_int(fd, libc::IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1);
                // SAFETY: live buffers of the given sizes.
                let r = unsafe {
                    libc::sendto(
                        fd,
                        payload.as_ptr() as *const libc::c_void,
                        payload.len(),
                        libc::MSG_FASTOPEN,
                        sa.as_ptr() as *const libc::sockaddr,
                        sa.len(),
                    )
                };
                sent(if r < 0 { Err(last()) } else { Ok(r as usize) })
            }
            // `TCP_FASTOPEN_CONNECT`: connect() returns at once, the first write sends the SYN
            // with the data.
            "tfo_connect" => {
                if let Err(e) = setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_FASTOPEN_CONNECT, 1)
                {
                    return fail("setsockopt", &e);
                }
                let _ = setsockopt_int(fd, libc::IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1);
                if let Err(e) = s.connect(&sa) {
                    return fail("connect", &e);
                }
                sent(write_all(fd, &payload))
            }
            // A blocking send while the handshake is still running: it waits inside
            // tcp_sendmsg (sk_stream_wait_connect), entered before the socket was enrolled.
            "early" | "early_more" => {
                let _ = s.set_nonblocking(true);
                match s.connect(&sa) {
                    Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                    Err(e) => return fail("connect", &e),
                    Ok(()) => {
                        return json!({"ok": false, "stage": "connect", "error": "connected at once"});
                    }
                }
                let _ = s.set_nonblocking(false);
                if mode == "early_more" {
                    // Bytes queued (not sent: MSG_MORE) before the hello, which then goes
                    // through the judge: the judge must see that the stream is not fresh.
                    let junk = b"junk before the hello";
                    // SAFETY: a live fd and buffer.
                    let r = unsafe {
                        libc::send(
                            fd,
                            junk.as_ptr() as *const libc::c_void,
                            junk.len(),
                            libc::MSG_MORE,
                        )
                    };
                    if r < 0 {
                        return fail("send_more", &last());
                    }
                }
                sent(write_all(fd, &payload))
            }
            _ => {
                if let Err(e) = s.connect_timeout(&sa, TIMEOUT) {
                    return fail("connect", &e);
                }
                match mode {
                    "connect_only" => (0, 0),
                    "write" | "mptcp" => sent(write_all(fd, &payload)),
                    "chunks" => {
                        let mut total = 0;
                        let mut r = Ok(0);
                        for c in payload.chunks(chunk) {
                            match write_all(fd, c) {
                                Ok(n) => total += n,
                                Err(e) => {
                                    r = Err(e);
                                    break;
                                }
                            }
                        }
                        sent(r.map(|_| total))
                    }
                    "thread_cork" => {
                        // Half a hello, then another thread sends other bytes while the first
                        // half is held: the judge sees both, in stream order.
                        let half = payload.len() / 2;
                        let first = write_all(fd, &payload[..half]);
                        let junk = vec![0x41u8; payload.len()];
                        let t = std::thread::spawn(move || write_all(fd, &junk));
                        let second = t.join().unwrap_or_else(|_| Err(io::Error::other("panic")));
                        match (first, second) {
                            (Ok(a), Ok(b)) => (a + b, 0),
                            (Err(e), _) | (_, Err(e)) => (0, errno(&e)),
                        }
                    }
                    "sendfile" => {
                        // SAFETY: memfd_create/write/lseek/sendfile on fds we own.
                        let mfd = unsafe { libc::memfd_create(c"hello".as_ptr(), 0) };
                        if mfd < 0 {
                            return fail("memfd", &last());
                        }
                        // SAFETY: just created.
                        let mfd = unsafe { OwnedFd::from_raw_fd(mfd) };
                        if let Err(e) = write_all(mfd.as_raw_fd(), &payload) {
                            return fail("memfd", &e);
                        }
                        let mut off: libc::off_t = 0;
                        // SAFETY: live fds, an offset variable.
                        let r =
                            unsafe { libc::sendfile(fd, mfd.as_raw_fd(), &mut off, payload.len()) };
                        sent(if r < 0 { Err(last()) } else { Ok(r as usize) })
                    }
                    "splice" => {
                        let mut p = [0i32; 2];
                        // SAFETY: pipe into a 2-element array.
                        if unsafe { libc::pipe(p.as_mut_ptr()) } != 0 {
                            return fail("pipe", &last());
                        }
                        // SAFETY: just created.
                        let (r, w) =
                            unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
                        if let Err(e) = write_all(w.as_raw_fd(), &payload) {
                            return fail("pipe", &e);
                        }
                        // SAFETY: live fds.
                        let n = unsafe {
                            libc::splice(
                                r.as_raw_fd(),
                                std::ptr::null_mut(),
                                fd,
                                std::ptr::null_mut(),
                                payload.len(),
                                0,
                            )
                        };
                        sent(if n < 0 { Err(last()) } else { Ok(n as usize) })
                    }
                    "zerocopy" => {
                        if let Err(e) = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ZEROCOPY, 1) {
                            return fail("setsockopt", &e);
                        }
                        // SAFETY: a live fd and buffer (kept alive until the end of `run`).
                        let r = unsafe {
                            libc::send(
                                fd,
                                payload.as_ptr() as *const libc::c_void,
                                payload.len(),
                                libc::MSG_ZEROCOPY,
                            )
                        };
                        sent(if r < 0 { Err(last()) } else { Ok(r as usize) })
                    }
                    "uring_send" | "uring_send_zc" | "uring_write" => uring(fd, &payload, mode),
                    other => {
                        return json!({"ok": false, "stage": "request", "error": format!("mode {other}")});
                    }
                }
            }
        };
        // What comes back: nothing from a Record listener; the point is whether the socket is
        // usable, reset or stalled.
        let mut t: TcpStream = s.into();
        let _ = t.set_read_timeout(Some(Duration::from_millis(
            req["read_ms"].as_u64().unwrap_or(300),
        )));
        let mut got = Vec::new();
        let mut eof = false;
        let mut read_errno = Value::Null;
        let mut b = [0u8; 64];
        match t.read(&mut b) {
            Ok(0) => eof = true,
            Ok(k) => got.extend_from_slice(&b[..k]),
            Err(e) => read_errno = json!(errno(&e)),
        }
        // A last send after the first: does the socket take more bytes?
        let after = if req["then"].is_string() {
            let more = hex(req["then"].as_str().unwrap_or(""));
            if req["then_mode"] == "uring_send_zc" {
                match uring(t.as_raw_fd(), &more, "uring_send_zc") {
                    (k, 0) => json!(k),
                    (_, e) => json!(-e),
                }
            } else {
                match t.write(&more) {
                    Ok(k) => json!(k),
                    Err(e) => json!(-errno(&e)),
                }
            }
        } else {
            Value::Null
        };
        let hexs: String = got.iter().map(|b| format!("{b:02x}")).collect();
        json!({"ok": true, "send_errno": e, "sent": n, "reply_hex": hexs, "eof": eof,
               "read_errno": read_errno, "then": after})
    }

    /// One send through io_uring: `IORING_OP_SEND`, `IORING_OP_SEND_ZC` or `IORING_OP_WRITE`.
    fn uring(fd: RawFd, payload: &[u8], mode: &str) -> (usize, i32) {
        use io_uring::{IoUring, opcode, types};
        let mut ring = match IoUring::new(4) {
            Ok(r) => r,
            Err(e) => return (0, errno(&e)),
        };
        let f = types::Fd(fd);
        let (p, l) = (payload.as_ptr(), payload.len() as u32);
        let op = match mode {
            "uring_send" => opcode::Send::new(f, p, l).build(),
            "uring_send_zc" => opcode::SendZc::new(f, p, l).build(),
            _ => opcode::Write::new(f, p, l).build(),
        };
        // SAFETY: the buffer outlives the submission (we wait for its completion below).
        if unsafe { ring.submission().push(&op.user_data(1)) }.is_err() {
            return (0, libc::EBUSY);
        }
        if let Err(e) = ring.submit_and_wait(1) {
            return (0, errno(&e));
        }
        let Some(cqe) = ring.completion().next() else {
            return (0, libc::EIO);
        };
        let res = cqe.result();
        if mode == "uring_send_zc" && io_uring::cqueue::more(cqe.flags()) {
            // The buffer is released by a second completion (the notification).
            let _ = ring.submit_and_wait(1);
            let _ = ring.completion().next();
        }
        if res < 0 {
            (0, -res)
        } else {
            (res as usize, 0)
        }
    }
}

// ------------------------------------------------------------------------------ hellos

/// A hello with this server name, supported_versions and ALPN, in one record.
fn hello(sni: &[u8]) -> Vec<u8> {
    Hello::new()
        .server_name(sni)
        .supported_versions(&[TLS13, TLS12])
        .alpn(&[b"h2"])
        .record()
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// One connection from `cgroup` to `dst` that writes the ClientHello for `sni` (the helper's
/// `write` mode: its `send_errno` says whether the send was refused).
fn write_hello(cgroup: &Path, dst: SocketAddr, sni: &[u8]) -> Value {
    helper(
        cgroup,
        json!({"addr": dst.to_string(), "hex": hexs(&hello(sni)), "mode": "write"}),
    )
}

// ------------------------------------------------------------------------------ the rig

/// One test at a time: the slot's host routes are shared.
static SERIAL: Mutex<()> = Mutex::new(());

const A: u8 = 1;
/// Never verified: an allowed name sent here must take the proxy.
const B: u8 = 2;

/// Host `n` at `port`: `4`, `6`, or `m` (IPv4-mapped, dialled from AF_INET6).
fn host(n: u8, fam: char, port: u16) -> SocketAddr {
    let ip = match fam {
        '4' => FAST_SLOT.host4(n),
        '6' => FAST_SLOT.host6(0x9 + u16::from(n)),
        'm' => match FAST_SLOT.host4(n) {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            v6 => v6,
        },
        _ => unreachable!(),
    };
    SocketAddr::new(ip, port)
}

/// TLS (rustls server) on 443; byte recorders on 8443 (TLS-only port) and 9443 (a port that
/// also has an `http` Domain match: always the proxy).
const SERVICES: &[(u16, Service)] = &[
    (443, Service::TlsEcho),
    (8443, Service::Record),
    (9443, Service::Record),
];

/// A TLS-only port served by a hand-driven listener (see
/// `sends_that_slip_past_the_judge_never_leave`).
const SLOW_PORT: u16 = 7443;

const NAMES: &[&str] = &["api.test", "*.wild.test", "*.*.deep.test"];

fn policy_yaml() -> String {
    let mut y = String::from(
        "apiVersion: kuma.io/v1alpha1\nkind: MeshPassthrough\nmetadata: {name: fast, labels: {kuma.io/mesh: default}}\nspec:\n  targetRef: {kind: Mesh}\n  default:\n    passthroughMode: Matched\n    appendMatch:\n",
    );
    for port in [443, 8443, 9443, SLOW_PORT] {
        for n in NAMES {
            y +=
                &format!("      - {{type: Domain, value: \"{n}\", port: {port}, protocol: tls}}\n");
        }
    }
    y += "      - {type: Domain, value: web.test, port: 9443, protocol: http}\n";
    y
}

/// Field order = drop order: the kernel (links detach) before the servers and the network.
struct Rig {
    _reaper: Reaper,
    kernel: Kernel,
    servers: Servers,
    _net: HostNet,
    cg: TestCgroup,
    ca: std::path::PathBuf,
    _dir: TempDir,
    _serial: MutexGuard<'static, ()>,
}

impl Rig {
    fn new() -> Rig {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        passthrough_tests::sweep(false);
        let dir = passthrough_tests::test_dir();
        let cg = TestCgroup::new().unwrap();
        let net = HostNet::new(FAST_SLOT).unwrap();
        let pki = Pki::new(&["api.test", "*.wild.test", "x.y.deep.test"]).unwrap();
        let ca = pki.write_ca(dir.path()).unwrap();
        let servers =
            Servers::start(Some(net.server_ns()), SERVICES, Some(pki.server.clone()), 2).unwrap();
        // A proxy port nobody listens on: a connection sent to the proxy is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut kernel = Kernel::load(LoadOptions {
            flags: flags::TLS_FAST_PATH,
            agent_mark: passthrough_common::AGENT_MARK,
            proxy: ProxySettings {
                host_port: port,
                ..Default::default()
            },
            ..LoadOptions::default()
        })
        .expect("load");
        assert!(
            kernel.tls_fast_path_available(),
            "this kernel's BTF has the offsets"
        );
        kernel.enable_tls_fast_path().expect("the judge loads");
        let set =
            policy::load_policy_bytes(Path::new("fast.yaml"), policy_yaml().as_bytes(), "default")
                .unwrap();
        let w = Workload {
            name: "w".into(),
            cgroup: cg.path().to_path_buf(),
            labels: BTreeMap::new(),
        };
        let conf = set.merge_for(&w, Mode::All);
        let p = plan::compile(
            kernel.next_generation(),
            &[(cg.id(), &conf)],
            &PlanOptions::default(),
        );
        kernel.apply(p).unwrap();
        let mut rig = Rig {
            _reaper: Reaper,
            kernel,
            servers,
            _net: net,
            cg,
            ca,
            _dir: dir,
            _serial: serial,
        };
        for port in [443, 8443, 9443, SLOW_PORT] {
            rig.verify(A, port, Duration::from_secs(120));
        }
        let cg_path = rig.cg.path().to_path_buf();
        rig.kernel.attach(&cg_path).unwrap();
        rig
    }

    /// Marks host `n` (IPv4 and IPv6) verified at `port` for the workload's rule set.
    fn verify(&mut self, n: u8, port: u16, ttl: Duration) {
        let plan = self.kernel.active_plan().unwrap();
        let rs = plan.workloads[&self.cg.id()].0;
        let now = monotonic_ns();
        let entries: Vec<(VerifiedKey, u64)> = ['4', '6']
            .iter()
            .map(|f| {
                let addr = match host(n, *f, 0).ip() {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                    IpAddr::V6(v6) => v6.octets(),
                };
                (
                    VerifiedKey {
                        ruleset: rs,
                        port,
                        _pad: 0,
                        addr,
                    },
                    now + ttl.as_nanos() as u64,
                )
            })
            .collect();
        self.kernel.write_verified(&entries).unwrap();
    }

    fn helper(&self, req: Value) -> Value {
        helper(self.cg.path(), req)
    }

    fn probe(&self) -> Probe {
        Probe::spawn_in(self.cg.path(), None).unwrap()
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        self.kernel.counters()
    }

    /// What the `Record` listener at `dst` received, per connection; waits (bounded) for
    /// `conns` connections to show up.
    fn received(&self, dst: SocketAddr, conns: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let r = self.servers.received(dst);
            if r.len() >= conns || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Resets, at the end of a test, every connection still open to the slot's test hosts (a
/// refused fast-path connection can sit retransmitting bytes its backstop drops; the agent
/// resets those on the denial event, these tests have no agent). `ss -K` uses the kernel's
/// socket-destroy call (`CONFIG_INET_DIAG_DESTROY`).
struct Reaper;

impl Drop for Reaper {
    fn drop(&mut self) {
        for net in ["203.0.113.64/27", "[2001:db8:f14:100::]/56"] {
            let _ = Command::new("ss")
                .args(["-K", "dst", net])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Counter names (`passthrough status`, `Kernel::counters`): a Domain candidate connected
/// directly (path kernel-sni) or redirected to the proxy, and the kernel judge's verdicts.
const DIRECT: &str = "kernel_sni_direct_domain_candidates";
const PROXIED: &str = "redirect_domain_candidates";
const ALLOWED: &str = "kernel_sni_allow_domain_match";
const NO_MATCH: &str = "kernel_sni_deny_no_domain_match";
const UNJUDGED: &str = "kernel_sni_deny_unjudged";

fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>, k: &str) -> u64 {
    after.get(k).copied().unwrap_or(0) - before.get(k).copied().unwrap_or(0)
}

// ------------------------------------------------------------------------------ tests

/// Real TLS clients (rustls) on IPv4, IPv6 and v4-mapped destinations: allowed names go
/// straight to the server and complete TLS; a name the policy does not allow fails at its
/// first write and nothing of it reaches the server; the same allowed name to an address that
/// was never verified takes the proxy (here: refused, nobody listens there).
#[test]
fn real_tls_clients_are_judged_in_the_kernel() {
    if !require_kernel() {
        return;
    }
    let rig = Rig::new();
    let mut p = rig.probe();
    let ca = rig.ca.to_str().unwrap().to_string();
    for fam in ['4', '6', 'm'] {
        for sni in ["api.test", "x.wild.test", "x.y.deep.test"] {
            let before = rig.counters();
            let dst = host(A, fam, 443);
            let r = p.json(&json!({"op": "tls", "addr": dst.to_string(), "sni": sni, "ca": ca}));
            assert_eq!(r["ok"], true, "{fam} {sni}: {r}");
            let greeting = r["greeting"].as_str().unwrap_or_default();
            assert!(
                greeting.contains(&format!("sni={sni}"))
                    && greeting.contains(&normalize(dst).to_string()),
                "{r}"
            );
            let after = rig.counters();
            assert_eq!(delta(&before, &after, DIRECT), 1, "{fam} {sni}");
            assert_eq!(delta(&before, &after, ALLOWED), 1, "{fam} {sni}");
        }
        // Not allowed: the ClientHello never leaves; the client's write fails.
        let before = rig.counters();
        let r = p.json(&json!({"op": "tls", "addr": host(A, fam, 443).to_string(), "sni": "evil.test", "ca": ca, "name": "api.test"}));
        assert_eq!(r["ok"], false, "{r}");
        let after = rig.counters();
        assert_eq!(delta(&before, &after, NO_MATCH), 1, "{fam}: {r}");
        // Host B was never verified: the allowed name goes to the proxy (refused here).
        let r = p.json(&json!({"op": "tls", "addr": host(B, fam, 443).to_string(), "sni": "api.test", "ca": ca}));
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["stage"], "connect", "{r}");
        assert_eq!(r["errno"], libc::ECONNREFUSED, "{r}");
    }
}

/// The shared vectors: every SNI form through the real kernel, the verdict compared with the
/// proxy's own reader and name rules on the same bytes. What the kernel allows arrives at the
/// server byte for byte; what it refuses does not arrive at all.
#[test]
fn same_verdicts_as_the_proxy_for_every_sni() {
    if !require_kernel() {
        return;
    }
    let rig = Rig::new();
    let long = "a".repeat(64) + ".wild.test";
    let vectors: Vec<Vec<u8>> = vec![
        hello(b"api.test"),
        hello(b"API.Test"),
        hello(b"api.test."),
        hello(b"x.wild.test"),
        hello(b"a.b.c.wild.test"),
        hello(b"wild.test"),
        hello(b"badwild.test"),
        hello(b"x.y.deep.test"),
        hello(b"x.deep.test"),
        hello(b"evil.test"),
        hello(b"api.test\0.evil"),
        hello(b" api.test"),
        hello(b"api.test "),
        hello(b"1.2.3.4"),
        hello(b"1.2.3.4."),
        hello(b"01.2.3.4"),
        hello(b"api..test"),
        hello(long.as_bytes()),
        hello(b"."),
        Hello::new().supported_versions(&[TLS13, TLS12]).record(),
        Hello::new()
            .server_names(&[b"api.test", b"evil.test"])
            .record(),
        Hello::new()
            .server_name(b"api.test")
            .server_name(b"evil.test")
            .record(),
        Hello::new().server_name(b"").record(),
        // The name in a later record than the rest of the hello, records of 20 bytes.
        Hello::new()
            .ext(PADDING, &[0; 40])
            .server_name(b"api.test")
            .records(20),
        b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n".to_vec(),
        // ECH: judged on the outer name.
        Hello::new()
            .ext(ECH, b"inner")
            .server_name(b"x.wild.test")
            .record(),
    ];
    let dst = host(A, '4', 8443);
    for (i, v) in vectors.iter().enumerate() {
        let want = proxy_allows(v);
        let r = rig.helper(json!({"addr": dst.to_string(), "hex": hexs(v), "mode": "write"}));
        assert_eq!(r["ok"], true, "{i}: {r}");
        let got = rig.received(dst, i + 1);
        assert_eq!(got.len(), i + 1, "{i}: every connection reaches the server");
        if want {
            assert_eq!(r["send_errno"], 0, "{i}: {r}");
            assert_eq!(got[i], *v, "vector {i}: allowed, every byte arrives");
        } else {
            assert_eq!(r["send_errno"], libc::EACCES, "vector {i}: {r}");
            assert!(
                got[i].is_empty(),
                "vector {i}: refused, yet {} bytes arrived",
                got[i].len()
            );
        }
    }
}

/// The proxy's verdict on these first bytes: its reader, its name rules and the policy's
/// patterns (the decision core's `domain_matches`).
fn proxy_allows(first: &[u8]) -> bool {
    use passthrough_policy::decision::{domain_matches, normalize_name};
    use passthrough_proxy::tls::{Parse, parse_client_hello};
    match parse_client_hello(first) {
        Parse::Hello(h) => match h.sni.as_deref().map(|s| normalize_name(s, false)) {
            Some(Ok(name)) => NAMES.iter().any(|p| domain_matches(p, &name)),
            _ => false,
        },
        _ => false,
    }
}

/// Every way a process can hand bytes to a TCP socket goes through the judge: plain writes,
/// a hello split into 1-, 7- and 100-byte writes or into records, `sendfile`, `splice`,
/// `MSG_ZEROCOPY`, io_uring `SEND`, `SEND_ZC` and `WRITE`. An allowed hello arrives whole, and
/// a later send on that socket too; a refused one never arrives, its send fails with `EACCES`,
/// and so does every later send.
#[test]
fn every_send_path_is_judged_before_a_byte_leaves() {
    if !require_kernel() {
        return;
    }
    let rig = Rig::new();
    let dst = host(A, '6', 8443);
    let good = hello(b"x.wild.test");
    let bad = hello(b"evil.test");
    let split = Hello::new()
        .ext(PADDING, &[0; 200])
        .server_name(b"api.test")
        .records(64);
    let modes: &[(&str, u64)] = &[
        ("write", 0),
        ("chunks", 1),
        ("chunks", 7),
        ("chunks", 100),
        ("sendfile", 0),
        ("splice", 0),
        ("zerocopy", 0),
        ("uring_send", 0),
        ("uring_send_zc", 0),
        ("uring_write", 0),
        ("thread_cork", 0),
    ];
    let mut conns = 0;
    for &(mode, chunk) in modes {
        let cases: &[(&Vec<u8>, bool)] = if mode == "thread_cork" {
            // The second half replaced by another thread's bytes: never a valid hello.
            &[(&good, false)]
        } else if mode == "uring_send_zc" {
            // Refused by the kernel itself on a socket in a sockmap (see below).
            &[]
        } else {
            &[(&good, true), (&bad, false), (&split, true)]
        };
        for &(payload, allowed) in cases {
            let before = rig.counters();
            let r = rig.helper(json!({"addr": dst.to_string(), "hex": hexs(payload),
                "mode": mode, "chunk": chunk, "then": hexs(b"more")}));
            assert_eq!(r["ok"], true, "{mode}/{chunk}: {r}");
            conns += 1;
            let got = rig.received(dst, conns);
            assert_eq!(got.len(), conns, "{mode}: the connection went direct");
            let after = rig.counters();
            if allowed {
                assert_eq!(r["send_errno"], 0, "{mode}/{chunk}: {r}");
                let mut want = payload.clone();
                want.extend_from_slice(b"more");
                // The later send follows the hello (wait for it to arrive).
                let deadline = Instant::now() + Duration::from_secs(2);
                let mut got = got;
                while got[conns - 1] != want && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                    got = rig.received(dst, conns);
                }
                assert_eq!(
                    got[conns - 1],
                    want,
                    "{mode}/{chunk}: allowed bytes arrive whole"
                );
                assert_eq!(delta(&before, &after, ALLOWED), 1, "{mode}");
            } else {
                assert_eq!(r["send_errno"], libc::EACCES, "{mode}/{chunk}: {r}");
                assert_eq!(
                    r["then"],
                    -libc::EACCES,
                    "{mode}: a later send fails too: {r}"
                );
                assert!(
                    got[conns - 1].is_empty(),
                    "{mode}/{chunk}: refused, yet {} bytes arrived",
                    got[conns - 1].len()
                );
                assert_eq!(delta(&before, &after, ALLOWED), 0, "{mode}");
            }
        }
    }
    // io_uring SEND_ZC needs SOCK_SUPPORT_ZC, which the kernel clears on every socket that
    // enters a sockmap (`sock_replace_proto`) and does not set again when it leaves: refused
    // with EOPNOTSUPP, nothing sent, while the hello is pending and after it was allowed.
    let r =
        rig.helper(json!({"addr": dst.to_string(), "hex": hexs(&good), "mode": "uring_send_zc"}));
    assert_eq!(r["send_errno"], libc::EOPNOTSUPP, "{r}");
    conns += 1;
    assert!(rig.received(dst, conns)[conns - 1].is_empty(), "{r}");
    let r = rig.helper(
        json!({"addr": dst.to_string(), "hex": hexs(&good), "mode": "write",
        "then": hexs(b"more"), "then_mode": "uring_send_zc"}),
    );
    assert_eq!(r["send_errno"], 0, "{r}");
    assert_eq!(r["then"], -libc::EOPNOTSUPP, "{r}");
    conns += 1;
    assert_eq!(rig.received(dst, conns)[conns - 1], good, "{r}");
}

/// Data in the SYN (`sendto(MSG_FASTOPEN)`, `TCP_FASTOPEN_CONNECT`, without a cookie so the
/// kernel does send it) would leave before any judge could see it: such connections take the
/// proxy (refused here: nobody listens), and the server never sees a connection.
#[test]
fn fast_open_connections_take_the_proxy() {
    if !require_kernel() {
        return;
    }
    let rig = Rig::new();
    for fam in ['4', '6'] {
        let dst = host(A, fam, 8443);
        for mode in ["tfo_sendto", "tfo_connect"] {
            let before = rig.counters();
            let r = rig.helper(
                json!({"addr": dst.to_string(), "hex": hexs(&hello(b"api.test")), "mode": mode}),
            );
            let after = rig.counters();
            assert_eq!(delta(&before, &after, DIRECT), 0, "{mode}: {r}");
            assert_eq!(delta(&before, &after, PROXIED), 1, "{mode}: {r}");
            let refused = r["send_errno"] == libc::ECONNREFUSED
                || (r["ok"] == false && r["errno"] == libc::ECONNREFUSED);
            assert!(refused, "{mode}: went to the (absent) proxy: {r}");
        }
        assert!(
            rig.received(dst, 1).is_empty(),
            "no connection reached the server"
        );
    }
}

/// An MPTCP connection builds its segments on the subflow itself, past the judge's `sk_msg`
/// program, so it never takes the fast path: connect4/6 see the MPTCP subflow and redirect it
/// to the proxy (absent here: the connect is refused), even to a verified destination with an
/// allowed name. Nothing reaches the server.
#[test]
fn mptcp_connections_take_the_proxy() {
    if !require_kernel() {
        return;
    }
    let rig = Rig::new();
    for fam in ['4', '6'] {
        let dst = host(A, fam, 8443);
        let before = rig.counters();
        let r = rig.helper(
            json!({"addr": dst.to_string(), "hex": hexs(&hello(b"api.test")), "mode": "mptcp"}),
        );
        let after = rig.counters();
        assert_eq!(r["stage"], "connect", "{fam}: {r}");
        assert_eq!(
            r["errno"],
            libc::ECONNREFUSED,
            "{fam}: went to the (absent) proxy: {r}"
        );
        assert_eq!(delta(&before, &after, DIRECT), 0, "{fam}: {r}");
        assert_eq!(delta(&before, &after, PROXIED), 1, "{fam}: {r}");
        // The same destination and name over plain TCP go directly (the control).
        let before = rig.counters();
        let r = rig.helper(
            json!({"addr": dst.to_string(), "hex": hexs(&hello(b"api.test")), "mode": "write"}),
        );
        let after = rig.counters();
        assert_eq!(delta(&before, &after, DIRECT), 1, "{fam} tcp: {r}");
        assert_eq!(r["ok"], true, "{fam} tcp: {r}");
        assert_eq!(
            rig.received(dst, 1).len(),
            1,
            "{fam}: the TCP control arrived"
        );
    }
}

/// Sends that reach TCP without passing the judge never leave the host. A blocking send on a
/// socket that is still connecting waits inside `tcp_sendmsg`, which it entered before the
/// socket was enrolled, so the judge never runs for it (the same holds for a send from another
/// thread during `connect()`): the egress backstop drops its payload and refuses the
/// connection, even though the bytes are an allowed hello. Bytes queued that way before a hello
/// that does pass the judge make the judge refuse that hello (the stream is not fresh).
///
/// To hold the handshake open long enough, the server's accept queue is full: its SYN is
/// dropped and retransmitted a second later, after the queue has room again.
#[test]
fn sends_that_slip_past_the_judge_never_leave() {
    if !require_kernel() {
        return;
    }
    let rig = Rig::new();
    let dst = host(A, '4', SLOW_PORT);
    for mode in ["early", "early_more"] {
        let listener = passthrough_tests::netns::in_netns(rig._net.server_ns(), move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&dst.into())?;
            s.listen(0)?;
            Ok(std::net::TcpListener::from(s))
        })
        .unwrap();
        // Fill the accept queue from outside the workload (not filtered).
        let filler = std::net::TcpStream::connect(dst).unwrap();
        let server = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let (_first, _) = listener.accept().unwrap();
            listener.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(4);
            let mut c = loop {
                match listener.accept() {
                    Ok((c, _)) => break c,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!("the client never connected: {e}"),
                }
            };
            c.set_nonblocking(false).unwrap();
            c.set_read_timeout(Some(Duration::from_millis(2500)))
                .unwrap();
            let mut got = Vec::new();
            let mut b = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut c, &mut b) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&b[..n]);
            }
            got
        });
        let before = rig.counters();
        let r = rig.helper(
            json!({"addr": dst.to_string(), "hex": hexs(&hello(b"api.test")),
            "mode": mode, "read_ms": 1500}),
        );
        let got = server.join().unwrap();
        drop(filler);
        let after = rig.counters();
        assert_eq!(r["ok"], true, "{mode}: {r}");
        assert!(
            got.is_empty(),
            "{mode}: {} bytes left the host: {r}",
            got.len()
        );
        assert_eq!(delta(&before, &after, DIRECT), 1, "{mode}: {r}");
        assert_eq!(delta(&before, &after, ALLOWED), 0, "{mode}: {r}");
        assert!(delta(&before, &after, UNJUDGED) >= 1, "{mode}: {r}");
        if mode == "early_more" {
            // The hello itself went through the judge, which saw the queued bytes.
            assert_eq!(r["send_errno"], libc::EACCES, "{r}");
        }
    }
}

/// A socket is in the judge's map only while its hello is pending: connected and silent it is
/// there; once its hello was allowed (and the server's ACK came back) it has left, so the rest
/// of the connection runs on the plain TCP send path. A refused socket stays (every later send
/// fails). All of them are gone once closed.
#[test]
fn sockets_leave_the_judge_after_an_allowed_hello() {
    if !require_kernel() {
        return;
    }
    let rig = Rig::new();
    let dst = host(A, '4', 8443);
    let cg = rig.cg.path().to_path_buf();
    for (payload, mode, stays) in [
        (Vec::new(), "connect_only", true),
        (hello(b"api.test"), "write", false),
        (hello(b"evil.test"), "write", true),
    ] {
        assert_eq!(rig.kernel.sni_pending_sockets(), 0);
        let cg = cg.clone();
        let req =
            json!({"addr": dst.to_string(), "hex": hexs(&payload), "mode": mode, "read_ms": 1500});
        let t = std::thread::spawn(move || helper(&cg, req));
        // While the helper holds the connection open.
        let deadline = Instant::now() + Duration::from_millis(1200);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            seen.push(rig.kernel.sni_pending_sockets());
            std::thread::sleep(Duration::from_millis(25));
        }
        let r = t.join().unwrap();
        assert_eq!(r["ok"], true, "{mode}: {r}");
        let last = *seen.last().unwrap();
        assert_eq!(last, usize::from(stays), "{mode}: samples {seen:?}");
        // Closed: gone.
        let deadline = Instant::now() + Duration::from_secs(2);
        while rig.kernel.sni_pending_sockets() != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            rig.kernel.sni_pending_sockets(),
            0,
            "{mode}: closed sockets leave"
        );
    }
}

// ------------------------------------------------------------------------------ with the agent

/// The real agent, `passthrough run --tls-fast-path=on`, with a DNS server for the test names
/// (`api.test`, `evil.test` → host A; `other.test` → host C; `x.wild.test` → host D) answering
/// with `ttl`. Field order = drop order.
struct AgentWorld {
    probe: Probe,
    agent: Agent,
    servers: Servers,
    dns: Dns,
    _net: HostNet,
    cg: TestCgroup,
    ca: std::path::PathBuf,
    policy: std::path::PathBuf,
    _dir: TempDir,
    _serial: MutexGuard<'static, ()>,
}

const C: u8 = 3;
/// Only `x.wild.test` resolves here: verified only by learning it.
const D: u8 = 4;

fn names_of(n: u8) -> Vec<IpAddr> {
    vec![host(n, '4', 0).ip(), host(n, '6', 0).ip()]
}

impl AgentWorld {
    fn new(ttl: u32) -> AgentWorld {
        AgentWorld::with_args(ttl, &["--tls-fast-path=on"])
    }

    /// As [`AgentWorld::new`] with `flag` for the fast path (`None`: the agent's default).
    fn with_fast_path(ttl: u32, flag: Option<&str>) -> AgentWorld {
        AgentWorld::with_args(ttl, flag.as_slice())
    }

    /// As [`AgentWorld::new`] with these agent arguments instead.
    fn with_args(ttl: u32, args: &[&str]) -> AgentWorld {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        passthrough_tests::sweep(false);
        let dir = passthrough_tests::test_dir();
        let cg = TestCgroup::new().unwrap();
        let net = HostNet::new(FAST_SLOT).unwrap();
        let pki = Pki::new(&["api.test", "*.wild.test", "evil.test", "other.test"]).unwrap();
        let ca = pki.write_ca(dir.path()).unwrap();
        let servers =
            Servers::start(Some(net.server_ns()), SERVICES, Some(pki.server.clone()), 2).unwrap();
        let mut names = std::collections::HashMap::new();
        for n in ["api.test", "evil.test"] {
            names.insert(n.to_string(), names_of(A));
        }
        names.insert("other.test".to_string(), names_of(C));
        names.insert("x.wild.test".to_string(), names_of(D));
        let dns = Dns::start(names, ttl).unwrap();
        let policy = write_policy(dir.path(), &policy_yaml());
        let mut agent = Agent::builder()
            .policy(&policy)
            .cgroup(cg.path())
            .arg("--resolver")
            .arg(&dns.addr.to_string());
        for a in args {
            agent = agent.arg(a);
        }
        let agent = agent.start().unwrap();
        let probe = Probe::spawn_in(cg.path(), None).unwrap();
        AgentWorld {
            probe,
            agent,
            servers,
            dns,
            _net: net,
            cg,
            ca,
            policy,
            _dir: dir,
            _serial: serial,
        }
    }

    /// A kernel counter, by its status name, from the agent's
    /// `passthrough_kernel_decisions_total{path,verdict,reason}`.
    fn kc(&self, counter: &str) -> f64 {
        let (path, verdict, reason) = match counter {
            DIRECT => ("kernel-sni", "direct", "domain_candidates"),
            PROXIED => ("kernel", "redirect", "domain_candidates"),
            NO_MATCH => ("kernel-sni", "deny", "no_domain_match"),
            other => panic!("no metric labels for {other}"),
        };
        self.agent.metric(
            "passthrough_kernel_decisions_total",
            &format!("path=\"{path}\",verdict=\"{verdict}\",reason=\"{reason}\""),
        )
    }

    fn tls(&mut self, n: u8, fam: char, sni: &str) -> Value {
        let ca = self.ca.display().to_string();
        let addr = host(n, fam, 443);
        self.probe
            .json(&json!({"op": "tls", "addr": addr.to_string(), "sni": sni, "ca": ca}))
    }

    /// TLS to host `n` with `sni` works end to end; returns whether it went direct (the kernel
    /// judged its hello) rather than through the proxy.
    fn tls_ok(&mut self, n: u8, fam: char, sni: &str) -> bool {
        let (direct, proxied) = (self.kc(DIRECT), self.kc(PROXIED));
        let r = self.tls(n, fam, sni);
        assert_eq!(
            r["ok"],
            true,
            "{sni} to host {n}: {r}\n{}",
            self.agent.describe()
        );
        assert!(
            r["greeting"]
                .as_str()
                .unwrap_or("")
                .ends_with(&format!("sni={sni}")),
            "{r}"
        );
        let went_direct = self.kc(DIRECT) - direct == 1.0;
        let went_proxy = self.kc(PROXIED) - proxied == 1.0;
        assert!(went_direct ^ went_proxy, "one path: {r}");
        went_direct
    }

    /// Waits (≤ 5 s) until host `n` is verified at `port` (a `Record` port): an allowed hello
    /// sent there goes direct.
    fn wait_verified(&mut self, n: u8, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let dst = host(n, '4', port);
        loop {
            let before = self.kc(DIRECT);
            let r = helper(
                self.cg.path(),
                json!({"addr": dst.to_string(), "hex": hexs(&hello(b"api.test")), "mode": "write"}),
            );
            assert_eq!(r["send_errno"], 0, "{r}");
            if self.kc(DIRECT) - before == 1.0 {
                return;
            }
            assert!(Instant::now() < deadline, "{dst} never verified");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits (≤ 5 s) until a fresh connection with `sni` to host `n` goes direct.
    fn wait_direct(&mut self, n: u8, sni: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.tls_ok(n, '4', sni) {
            assert!(
                Instant::now() < deadline,
                "{sni} to host {n} never went direct\n{}",
                self.agent.describe()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The agent's fast path end to end: exact names are pre-warmed (the first connection already
/// goes direct, no proxy involved), a wildcard-allowed name is learned from its first
/// (proxied) connection and goes direct the next time, a name the policy does not allow sent to
/// a verified address is refused in the kernel (event path `kernel-sni`, the connection reset),
/// and an allowed name sent to an address never verified for an allowed name takes the proxy,
/// which refuses it (SNI spoofing).
#[test]
fn the_agent_prewarms_learns_and_judges_in_the_kernel() {
    if !require_kernel() {
        return;
    }
    let mut w = AgentWorld::new(300);
    // Pre-warmed: nothing dialled api.test yet.
    std::thread::sleep(Duration::from_secs(2));
    assert!(w.tls_ok(A, '4', "api.test"), "{}", w.agent.describe());
    assert!(w.tls_ok(A, '6', "api.test"));
    assert!(w.tls_ok(A, 'm', "api.test"));
    // Learned: a wildcard match is not pre-warmed; its first connection teaches the agent.
    assert!(
        !w.tls_ok(D, '4', "x.wild.test"),
        "the first one takes the proxy"
    );
    assert!(w.tls_ok(D, '4', "x.wild.test"), "the next one goes direct");
    // An address counts as verified for the rule set: another allowed name goes direct too.
    assert!(w.tls_ok(D, '6', "x.wild.test") || w.tls_ok(D, '6', "x.wild.test"));
    assert!(w.tls_ok(A, '4', "x.wild.test"));
    // Refused in the kernel.
    let before = w.kc(NO_MATCH);
    let r = w.tls(A, '4', "evil.test");
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(w.kc(NO_MATCH) - before, 1.0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !w.agent.log().contains("kernel-sni") {
        assert!(Instant::now() < deadline, "{}", w.agent.describe());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = w.agent.log();
    let line = log.lines().find(|l| l.contains("kernel-sni")).unwrap();
    assert!(
        line.contains("evil.test") && line.contains("no_domain_match"),
        "{line}"
    );
    assert!(
        w.agent
            .metric("passthrough_decisions_total", "path=\"kernel-sni\"")
            >= 1.0,
        "{}",
        w.agent.describe()
    );
    // The agent resets a refused connection: once reset, a send fails as on any aborted
    // connection (before, it fails with EACCES: the judge refuses it). A read that was already
    // waiting may return EAGAIN first (`tcp_bpf_recvmsg` wakes on the error without reporting
    // it), or report the abort itself, after which a send that still finds the judge in place
    // (the socket leaves the map as it is unhashed) fails with EACCES: the reset is seen by the
    // read or by the next send, and that send fails either way.
    w.wait_verified(A, 8443);
    let r = helper(
        w.cg.path(),
        json!({"addr": host(A, '4', 8443).to_string(), "hex": hexs(&hello(b"evil.test")),
            "mode": "write", "read_ms": 1000, "then": hexs(b"x")}),
    );
    assert_eq!(r["send_errno"], libc::EACCES, "{r}");
    let aborted = |v: &Value| v == -libc::ECONNABORTED || v == -libc::EPIPE;
    assert!(
        aborted(&r["then"])
            || (r["read_errno"] == libc::ECONNABORTED && r["then"] == -libc::EACCES),
        "reset by the agent: {r}"
    );
    // SNI spoofing: api.test to host C, which answers for other.test only.
    let (direct, proxied) = (w.kc(DIRECT), w.kc(PROXIED));
    let r = w.tls(C, '4', "api.test");
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap_or("").contains("AccessDenied"),
        "the proxy refuses: {r}"
    );
    assert_eq!(w.kc(DIRECT), direct);
    assert_eq!(w.kc(PROXIED) - proxied, 1.0);
    assert_eq!(w.servers.accepted(host(C, '4', 443)), 0);
}

/// The fast path is on by default: an agent started without `--tls-fast-path` sends an allowed
/// TLS connection to a verified destination directly (pre-warmed `api.test`, learned
/// `x.wild.test`), its hello judged in the kernel, and refuses a name the policy does not allow
/// there with a `kernel-sni` denial.
#[test]
fn the_fast_path_is_on_by_default() {
    if !require_kernel() {
        return;
    }
    let mut w = AgentWorld::with_fast_path(300, None);
    w.wait_direct(A, "api.test");
    assert!(w.tls_ok(A, '6', "api.test"), "{}", w.agent.describe());
    assert!(
        !w.tls_ok(D, '4', "x.wild.test"),
        "the first one takes the proxy"
    );
    assert!(w.tls_ok(D, '4', "x.wild.test"), "the next one goes direct");
    let before = w.kc(NO_MATCH);
    let r = w.tls(A, '4', "evil.test");
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(w.kc(NO_MATCH) - before, 1.0, "{}", w.agent.describe());
}

/// `--tls-fast-path=off` restores the proxy-only behaviour: every TLS connection a `tls` Domain
/// match could allow takes the proxy, also to destinations the agent has verified (pre-warm
/// time given, then taught by the proxy's own allowed connections), and the proxy refuses what
/// the policy does not allow; nothing is judged in the kernel.
#[test]
fn off_sends_every_tls_connection_through_the_proxy() {
    if !require_kernel() {
        return;
    }
    let mut w = AgentWorld::with_fast_path(300, Some("--tls-fast-path=off"));
    std::thread::sleep(Duration::from_secs(2));
    for _ in 0..3 {
        assert!(!w.tls_ok(A, '4', "api.test"), "{}", w.agent.describe());
        assert!(!w.tls_ok(A, '6', "api.test"));
        assert!(!w.tls_ok(D, '4', "x.wild.test"));
    }
    let proxied = w.kc(PROXIED);
    let r = w.tls(A, '4', "evil.test");
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap_or("").contains("AccessDenied"),
        "the proxy refuses: {r}"
    );
    assert_eq!(w.kc(PROXIED) - proxied, 1.0);
    assert_eq!(w.kc(DIRECT), 0.0);
    assert_eq!(w.kc(NO_MATCH), 0.0);
    assert_eq!(
        w.agent
            .metric("passthrough_decisions_total", "path=\"kernel-sni\""),
        0.0
    );
}

/// A name that moves is followed within the TTL bounds (here the floor: answers live 1 s, the
/// fast path keeps an address at least 5 s): the old address stays direct until then, and
/// after it takes the proxy, which refuses it; the new address goes direct. A policy change
/// that no longer allows the name drops its verified destinations in the same flip, while a
/// connection established before it keeps working.
#[test]
fn a_moving_name_and_a_policy_change() {
    if !require_kernel() {
        return;
    }
    let mut w = AgentWorld::new(1);
    w.wait_direct(A, "api.test");
    w.dns.set("api.test", names_of(C));
    // Within the floor: still verified.
    assert!(w.tls_ok(A, '4', "api.test"));
    std::thread::sleep(Duration::from_millis(5_500));
    // Past it: A takes the proxy, which now refuses api.test there.
    let (direct, proxied) = (w.kc(DIRECT), w.kc(PROXIED));
    let r = w.tls(A, '4', "api.test");
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(w.kc(DIRECT), direct, "{r}");
    assert_eq!(w.kc(PROXIED) - proxied, 1.0, "{r}");
    // C was pre-warmed meanwhile.
    w.wait_direct(C, "api.test");

    // An established connection across a policy change that still allows it.
    let cg = w.cg.path().to_path_buf();
    let dst = host(C, '4', 8443);
    let req = json!({"addr": dst.to_string(), "hex": hexs(&hello(b"api.test")), "mode": "write",
        "read_ms": 4000, "then": hexs(b"after the change")});
    let held = std::thread::spawn(move || helper(&cg, req));
    std::thread::sleep(Duration::from_millis(1000));
    // The new policy allows *.wild.test only.
    let yaml = policy_yaml().replace("value: \"api.test\"", "value: \"gone.test\"");
    w.agent.update_policy(&w.policy.clone(), &yaml).unwrap();
    let r = held.join().unwrap();
    assert_eq!(r["send_errno"], 0, "{r}");
    assert_eq!(r["then"], 16, "{r}");
    let got = w.servers.received(dst);
    let mut want = hello(b"api.test");
    want.extend_from_slice(b"after the change");
    assert_eq!(
        got.last(),
        Some(&want),
        "the established connection kept working"
    );
    // No longer allowed: no longer verified, the proxy refuses it.
    let (direct, proxied) = (w.kc(DIRECT), w.kc(PROXIED));
    let r = w.tls(C, '4', "api.test");
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(w.kc(DIRECT), direct, "{r}");
    assert_eq!(w.kc(PROXIED) - proxied, 1.0, "{r}");
}

/// An agent killed with SIGKILL leaves the fast path failing closed: the judge runs in the
/// kernel, so a socket that connected directly before the kill, and one that connects after it
/// (its destination is still verified), get their hellos judged: an allowed one arrives,
/// anything else never leaves.
#[test]
fn a_killed_agent_leaves_the_fast_path_closed() {
    if !require_kernel() {
        return;
    }
    let mut w = AgentWorld::new(300);
    w.wait_direct(A, "api.test");
    let cg = w.cg.path().to_path_buf();
    let dst = host(A, '4', 8443);
    w.wait_verified(A, 8443);
    let earlier = w.servers.received(dst).len();
    let (c1, c2) = (cg.clone(), cg.clone());
    // Connected (directly, nothing sent) before the kill; they send after it.
    let good = std::thread::spawn(move || {
        helper(
            &c1,
            json!({"addr": dst.to_string(), "mode": "connect_only", "read_ms": 2500,
            "then": hexs(&hello(b"api.test"))}),
        )
    });
    let bad = std::thread::spawn(move || {
        helper(
            &c2,
            json!({"addr": dst.to_string(), "mode": "connect_only", "read_ms": 2500,
            "then": hexs(&hello(b"evil.test"))}),
        )
    });
    std::thread::sleep(Duration::from_millis(1000));
    w.agent.kill9();
    let (good, bad) = (good.join().unwrap(), bad.join().unwrap());
    assert_eq!(good["then"], hello(b"api.test").len(), "{good}");
    assert_eq!(bad["then"], -libc::EACCES, "{bad}");
    // After the kill: new connections to the verified destination, judged in the kernel.
    let r = write_hello(&cg, dst, b"x.wild.test");
    assert_eq!(r["send_errno"], 0, "{r}");
    let r = write_hello(&cg, dst, b"evil.test");
    assert_eq!(r["send_errno"], libc::EACCES, "{r}");
    std::thread::sleep(Duration::from_millis(300));
    let got = w.servers.received(dst).split_off(earlier);
    let allowed: Vec<Vec<u8>> = vec![hello(b"api.test"), hello(b"x.wild.test")];
    assert_eq!(got.len(), 4, "four connections went direct");
    for g in &got {
        assert!(
            g.is_empty() || allowed.contains(g),
            "only allowed hellos left the host: {} bytes",
            g.len()
        );
    }
    assert_eq!(got.iter().filter(|g| !g.is_empty()).count(), 2);
}

/// An agent stopped cleanly with `--keep-on-exit` leaves the fast path working, not only closed:
/// its pinned sock_ops program goes on enrolling new connections to verified destinations, so
/// the judge must stay attached to their sockmap (its attachment is not a pinned link; dropped
/// with the agent, it left every such connection held by the egress check, allowed TLS hanging
/// until the next agent). After the exit an allowed hello arrives, a refused one never leaves.
#[test]
fn keep_on_exit_leaves_the_judge_attached() {
    if !require_kernel() {
        return;
    }
    let mut w = AgentWorld::with_args(300, &["--tls-fast-path=on", "--keep-on-exit"]);
    w.wait_direct(A, "api.test");
    w.wait_verified(A, 8443);
    let cg = w.cg.path().to_path_buf();
    let dst = host(A, '4', 8443);
    let earlier = w.servers.received(dst).len();
    w.agent.stop().unwrap();
    let r = helper(
        &cg,
        json!({"addr": dst.to_string(), "hex": hexs(&hello(b"api.test")), "mode": "write",
            "read_ms": 1000}),
    );
    assert_eq!(r["send_errno"], 0, "{r}");
    let r = write_hello(&cg, dst, b"evil.test");
    assert_eq!(r["send_errno"], libc::EACCES, "{r}");
    std::thread::sleep(Duration::from_millis(300));
    let got = w.servers.received(dst).split_off(earlier);
    assert_eq!(got.len(), 2, "both connections went direct");
    assert_eq!(
        got.iter().filter(|g| !g.is_empty()).collect::<Vec<_>>(),
        vec![&hello(b"api.test")],
        "the allowed hello arrived, and only it"
    );
    let (ok, out) = passthrough_tests::cli([
        "uninstall",
        "--state-dir",
        &w.agent.state_dir().display().to_string(),
    ]);
    assert!(ok, "{out}");
}
