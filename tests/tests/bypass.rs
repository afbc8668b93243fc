//! Issue 6 point 2: the bypass suite. Each test is a real attempt to get around the filter,
//! through the real kernel programs attached by the real `passthrough run` (and its proxy where
//! the attempt is about L7), and asserts the outcome documented in `docs/security.md` — including
//! the known holes (raw sockets, a workload with CAP_NET_ADMIN, a socket passed in from an
//! unfiltered process), so a change in any of them is noticed.
//!
//! Kernel-level attempts run in a client netns joined to a server netns (`TestNet`: test hosts
//! on 198.51.100.0/24, 203.0.113.0/24, 2001:db8:100::/40, 2001:db8:200::/40). Proxy-level
//! attempts run in the host netns against test hosts in a server netns behind a veth, on the
//! security tests' own address slot (`passthrough_tests::sec::SEC_SLOT`), so they can run beside
//! the proxy kernel tests.
//!
//! The unusual syscalls (TCP Fast Open, `SCM_RIGHTS`, raw and ping sockets, `sendmmsg`,
//! `io_uring`, `SO_MARK`, user namespaces) are made by a *helper*: this test executable started
//! again inside the workload cgroup and netns with a JSON request in `PT_BYPASS_HELPER`
//! (`helper_entry` below); it prints one `PTRESULT <json>` line.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    os::unix::net::UnixListener,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use passthrough_testhello::{Hello, TLS12, TLS13};
use passthrough_tests::{
    Agent, AgentBuilder, EPERM, LOOPBACK_PORT, TestCgroup, TestNet, World, assert_allowed,
    assert_denied, assert_udp_allowed, assert_udp_denied,
    hostnet::HostNet,
    l7::{Dns, Pki, Servers, Service},
    netns::in_netns,
    probe::{run_helper, serve_helper},
    require_kernel,
    sec::SEC_SLOT,
    write_policy,
};
use serde_json::{Value, json};
use tempfile::TempDir;

// ------------------------------------------------------------------------------ the helper

const HELPER_ENV: &str = "PT_BYPASS_HELPER";

/// Not a test of its own: the entry point of the helper (does nothing unless `PT_BYPASS_HELPER`
/// is set).
#[test]
fn helper_entry() {
    serve_helper(HELPER_ENV, ops::run);
}

/// Runs one helper operation inside `cgroup` and `netns` (None: the host netns).
fn helper(cgroup: &Path, netns: Option<&Path>, req: Value) -> Value {
    run_helper(HELPER_ENV, cgroup, netns, req)
}

/// The helper's operations. Every answer is `{"ok": true, ...}` or
/// `{"ok": false, "stage": "...", "errno": N}`; none panics.
mod ops {
    use std::{
        io::{self, Read, Write},
        mem,
        net::{SocketAddr, TcpStream},
        os::{
            fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
            unix::net::UnixStream,
        },
        time::Duration,
    };

    use passthrough_tests::{
        netns::setsockopt_int,
        sys::{addr, become_nobody, errno, fail, last},
    };
    use serde_json::{Value, json};
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};

    const TIMEOUT: Duration = Duration::from_secs(3);

    fn udp(a: &SocketAddr) -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(*a), Type::DGRAM, Some(Protocol::UDP))?;
        if a.is_ipv6() {
            s.set_only_v6(false)?;
        }
        Ok(s)
    }

    fn tcp(a: &SocketAddr) -> io::Result<Socket> {
        Socket::new(Domain::for_address(*a), Type::STREAM, Some(Protocol::TCP))
    }

    /// Writes `line\n` and reads one line back (the test hosts echo).
    fn echo(s: &mut TcpStream, line: &str) -> io::Result<String> {
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(format!("{line}\n").as_bytes())?;
        read_line(s)
    }

    fn read_line(s: &mut TcpStream) -> io::Result<String> {
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while got.last() != Some(&b'\n') {
            if s.read(&mut b)? == 0 {
                return Err(io::Error::from_raw_os_error(libc::ECONNRESET));
            }
            got.push(b[0]);
        }
        got.pop();
        Ok(String::from_utf8_lossy(&got).into_owned())
    }

    fn connect_echo(s: Socket, a: &SocketAddr) -> Value {
        if let Err(e) = s.connect_timeout(&(*a).into(), TIMEOUT) {
            return fail("connect", &e);
        }
        let mut t: TcpStream = s.into();
        match echo(&mut t, "ping") {
            Ok(got) => json!({"ok": true, "echo": got}),
            Err(e) => fail("io", &e),
        }
    }

    pub fn run(req: &Value) -> Value {
        if req["as_nobody"] == true
            && let Err(e) = become_nobody()
        {
            return fail("setuid", &e);
        }
        match req["op"].as_str().unwrap_or("") {
            "tcp" => {
                let a = addr(req, "addr");
                match tcp(&a) {
                    Ok(s) => connect_echo(s, &a),
                    Err(e) => fail("socket", &e),
                }
            }
            "fastopen" => fastopen(req),
            "mark" => mark(req),
            "userns_mark" => userns_mark(req),
            "sendmmsg" => sendmmsg(req),
            "udp_switch" => udp_switch(req),
            "unspec" => unspec(req),
            "v4_on_v6" => v4_on_v6(req),
            "raw_udp" => raw_udp(req),
            "ping" => ping(req),
            "recvfd_connect" => recvfd_connect(req),
            "sendfd" => sendfd(req),
            "uring_connect" => uring_connect(req),
            "bind_connect" => bind_connect(req),
            "raw_bytes" => raw_bytes(req),
            other => {
                json!({"ok": false, "stage": "request", "error": format!("unknown op {other}")})
            }
        }
    }

    /// `sendto(MSG_FASTOPEN)` on a fresh TCP socket: the connect happens inside sendto.
    fn fastopen(req: &Value) -> Value {
        let a = addr(req, "addr");
        let s = match tcp(&a) {
            Ok(s) => s,
            Err(e) => return fail("socket", &e),
        };
        let sa = SockAddr::from(a);
        let data = b"tfo\n";
        // SAFETY: live buffers of the given sizes.
        let n = unsafe {
            libc::sendto(
                s.as_raw_fd(),
                data.as_ptr() as *const libc::c_void,
                data.len(),
                libc::MSG_FASTOPEN,
                sa.as_ptr() as *const libc::sockaddr,
                sa.len(),
            )
        };
        if n < 0 {
            return fail("sendto", &last());
        }
        let mut t: TcpStream = s.into();
        let _ = t.set_read_timeout(Some(TIMEOUT));
        match read_line(&mut t) {
            Ok(got) => json!({"ok": true, "echo": got, "sent": n}),
            Err(e) => fail("io", &e),
        }
    }

    /// `setsockopt(SO_MARK, mark)` then connect (TCP: and echo; UDP: one datagram).
    fn mark(req: &Value) -> Value {
        let a = addr(req, "addr");
        let m = req["mark"].as_u64().unwrap_or(0x7074_0001) as i32;
        let udp_proto = req["proto"] == "udp";
        let s = match if udp_proto { udp(&a) } else { tcp(&a) } {
            Ok(s) => s,
            Err(e) => return fail("socket", &e),
        };
        if let Err(e) = setsockopt_int(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_MARK, m) {
            return fail("setsockopt", &e);
        }
        if udp_proto {
            return match s.send_to(b"marked", &a.into()) {
                Ok(_) => json!({"ok": true}),
                Err(e) => fail("sendto", &e),
            };
        }
        connect_echo(s, &a)
    }

    /// In a forked child: keep a socket of the workload's netns, `unshare(CLONE_NEWUSER |
    /// CLONE_NEWNET)` (full capabilities inside the new namespaces, none outside), then try to
    /// set the agent's mark on the old socket and on a new one, and connect the new one.
    fn userns_mark(req: &Value) -> Value {
        let a = addr(req, "addr");
        let sa = SockAddr::from(a);
        let mut p = [0i32; 2];
        // SAFETY: pipe/fork/unshare/socket/setsockopt/connect/write/_exit only in the child (no
        // allocation after fork).
        unsafe {
            if libc::pipe(p.as_mut_ptr()) != 0 {
                return fail("pipe", &last());
            }
            let old = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            let pid = libc::fork();
            if pid == 0 {
                let mut r = [0i32; 4];
                let err = || *libc::__errno_location();
                if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                    r[0] = err();
                }
                let m: i32 = 0x7074_0001;
                let set = |fd: i32| {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_MARK,
                        &m as *const i32 as *const libc::c_void,
                        4,
                    )
                };
                if set(old) != 0 {
                    r[1] = err();
                }
                let new = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                if set(new) != 0 {
                    r[2] = err();
                }
                if libc::connect(new, sa.as_ptr() as *const libc::sockaddr, sa.len()) != 0 {
                    r[3] = err();
                }
                libc::write(p[1], r.as_ptr() as *const libc::c_void, 16);
                libc::_exit(0);
            }
            libc::close(p[1]);
            let mut r = [0i32; 4];
            let n = libc::read(p[0], r.as_mut_ptr() as *mut libc::c_void, 16);
            let mut st = 0;
            libc::waitpid(pid, &mut st, 0);
            libc::close(p[0]);
            libc::close(old);
            if n != 16 {
                return json!({"ok": false, "stage": "child"});
            }
            json!({"ok": true, "unshare_errno": r[0], "old_socket_mark_errno": r[1],
                   "new_socket_mark_errno": r[2], "new_socket_connect_errno": r[3]})
        }
    }

    /// One `sendmmsg` with one datagram per address in `addrs`.
    fn sendmmsg(req: &Value) -> Value {
        let addrs: Vec<SockAddr> = req["addrs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| SockAddr::from(a.as_str().unwrap().parse::<SocketAddr>().unwrap()))
            .collect();
        let first: SocketAddr = req["addrs"][0].as_str().unwrap().parse().unwrap();
        let s = match udp(&first) {
            Ok(s) => s,
            Err(e) => return fail("socket", &e),
        };
        let data = b"mmsg";
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: zeroed mmsghdrs filled with live pointers.
        let mut msgs: Vec<libc::mmsghdr> = addrs
            .iter()
            .map(|sa| {
                let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
                m.msg_hdr.msg_name = sa.as_ptr() as *mut libc::c_void;
                m.msg_hdr.msg_namelen = sa.len();
                m.msg_hdr.msg_iov = &mut iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: msgs is a live array of msgs.len() entries.
        let n = unsafe { libc::sendmmsg(s.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as u32, 0) };
        if n < 0 {
            return fail("sendmmsg", &last());
        }
        json!({"ok": true, "sent": n})
    }

    /// Connected UDP to `first` (allowed), then `sendto(second)` on the same socket.
    fn udp_switch(req: &Value) -> Value {
        let (a, b) = (addr(req, "first"), addr(req, "second"));
        let s = match udp(&a) {
            Ok(s) => s,
            Err(e) => return fail("socket", &e),
        };
        if let Err(e) = s.connect(&a.into()) {
            return fail("connect", &e);
        }
        if let Err(e) = s.send(b"first") {
            return fail("send", &e);
        }
        match s.send_to(b"second", &b.into()) {
            Ok(_) => json!({"ok": true}),
            Err(e) => fail("sendto", &e),
        }
    }

    fn sockaddr_in(a: &SocketAddr, family: i32) -> libc::sockaddr_in {
        let SocketAddr::V4(v4) = a else {
            panic!("IPv4 address expected: {a}")
        };
        // SAFETY: all-zero sockaddr_in is valid.
        let mut sin: libc::sockaddr_in = unsafe { mem::zeroed() };
        sin.sin_family = family as libc::sa_family_t;
        sin.sin_port = v4.port().to_be();
        sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
        sin
    }

    fn sendto_raw(fd: RawFd, data: &[u8], sin: &libc::sockaddr_in) -> Value {
        // SAFETY: live buffers of the given sizes.
        let n = unsafe {
            libc::sendto(
                fd,
                data.as_ptr() as *const libc::c_void,
                data.len(),
                0,
                sin as *const libc::sockaddr_in as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        if n < 0 {
            fail("sendto", &last())
        } else {
            json!({"ok": true})
        }
    }

    /// `sendto` on an AF_INET UDP socket with `sin_family = AF_UNSPEC` (udp_sendmsg accepts it).
    fn unspec(req: &Value) -> Value {
        let a = addr(req, "addr");
        let s = match udp(&a) {
            Ok(s) => s,
            Err(e) => return fail("socket", &e),
        };
        sendto_raw(s.as_raw_fd(), b"unspec", &sockaddr_in(&a, libc::AF_UNSPEC))
    }

    /// `sendto` with a `sockaddr_in` on an AF_INET6 (dual-stack) UDP socket.
    fn v4_on_v6(req: &Value) -> Value {
        let a = addr(req, "addr");
        let s = match udp(&"[::]:0".parse().unwrap()) {
            Ok(s) => s,
            Err(e) => return fail("socket", &e),
        };
        sendto_raw(s.as_raw_fd(), b"v4onv6", &sockaddr_in(&a, libc::AF_INET))
    }

    /// A UDP datagram built by hand on a raw `IPPROTO_UDP` socket (needs CAP_NET_RAW).
    /// A UDP header and the payload `raw`, checksum 0 (none for IPv4; the kernel fills it for
    /// IPv6 raw sockets with `IPV6_CHECKSUM`).
    fn udp_datagram(port: u16) -> Vec<u8> {
        let payload = b"raw";
        let mut pkt = Vec::new();
        pkt.extend_from_slice(&40000u16.to_be_bytes());
        pkt.extend_from_slice(&port.to_be_bytes());
        pkt.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        pkt.extend_from_slice(&0u16.to_be_bytes());
        pkt.extend_from_slice(payload);
        pkt
    }

    /// A hand-made UDP datagram on an `AF_INET6` raw socket (the kernel fills the checksum,
    /// `IPV6_CHECKSUM`).
    fn raw_udp6(a: &SocketAddr) -> Value {
        let SocketAddr::V6(v6) = a else {
            unreachable!()
        };
        // SAFETY: plain syscalls on an fd we own; live buffers of the given sizes.
        unsafe {
            let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_UDP);
            if fd < 0 {
                return fail("socket", &last());
            }
            let _own = OwnedFd::from_raw_fd(fd);
            let offset: libc::c_int = 6;
            libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_CHECKSUM,
                &offset as *const libc::c_int as *const libc::c_void,
                mem::size_of::<libc::c_int>() as u32,
            );
            let pkt = udp_datagram(a.port());
            let mut sin6: libc::sockaddr_in6 = mem::zeroed();
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            let n = libc::sendto(
                fd,
                pkt.as_ptr() as *const libc::c_void,
                pkt.len(),
                0,
                &sin6 as *const libc::sockaddr_in6 as *const libc::sockaddr,
                mem::size_of::<libc::sockaddr_in6>() as u32,
            );
            if n < 0 {
                fail("sendto", &last())
            } else {
                json!({"ok": true})
            }
        }
    }

    fn raw_udp(req: &Value) -> Value {
        let a = addr(req, "addr");
        if a.is_ipv6() {
            return raw_udp6(&a);
        }
        // SAFETY: plain syscall.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP) };
        if fd < 0 {
            return fail("socket", &last());
        }
        // SAFETY: fd is ours.
        let _own = unsafe { OwnedFd::from_raw_fd(fd) };
        let pkt = udp_datagram(a.port());
        let mut sin = sockaddr_in(&a, libc::AF_INET);
        sin.sin_port = 0;
        sendto_raw(fd, &pkt, &sin)
    }

    fn icmp_echo() -> Vec<u8> {
        // type 8, code 0, checksum, id, seq; the kernel fills id and checksum for ping sockets.
        let mut p = vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 1, b'p', b't'];
        let mut sum: u32 = 0;
        for c in p.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let ck = !(sum as u16);
        p[2..4].copy_from_slice(&ck.to_be_bytes());
        p
    }

    /// ICMP: a ping socket (SOCK_DGRAM/IPPROTO_ICMP) `connect` and `sendto`, and a raw ICMP
    /// socket `sendto` with a wait for the echo reply.
    fn ping(req: &Value) -> Value {
        let a = addr(req, "addr");
        let mut out = json!({"ok": true});
        let sin = sockaddr_in(&a, libc::AF_INET);
        // SAFETY: plain syscalls on fds we own.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP);
            if fd < 0 {
                out["ping_socket_errno"] = json!(errno(&last()));
            } else {
                let _own = OwnedFd::from_raw_fd(fd);
                out["ping_socket_errno"] = json!(0);
                let r = sendto_raw(fd, &icmp_echo(), &sin);
                out["ping_sendto_errno"] = r["errno"].clone();
                let rc = libc::connect(
                    fd,
                    &sin as *const libc::sockaddr_in as *const libc::sockaddr,
                    mem::size_of::<libc::sockaddr_in>() as u32,
                );
                out["ping_connect_errno"] = json!(if rc == 0 { 0 } else { errno(&last()) });
            }
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            if fd < 0 {
                out["raw_socket_errno"] = json!(errno(&last()));
                return out;
            }
            let _own = OwnedFd::from_raw_fd(fd);
            out["raw_socket_errno"] = json!(0);
            let r = sendto_raw(fd, &icmp_echo(), &sin);
            out["raw_sendto_errno"] = r["errno"].clone();
            // Wait up to 2 s for an echo reply from the destination.
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                mem::size_of::<libc::timeval>() as u32,
            );
            let mut got_reply = false;
            let mut buf = [0u8; 1500];
            for _ in 0..10 {
                let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
                if n >= 28 {
                    let ihl = usize::from(buf[0] & 0x0f) * 4;
                    let src = u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
                    if buf.get(ihl) == Some(&0) && src == u32::from_be(sin.sin_addr.s_addr) {
                        got_reply = true;
                        break;
                    }
                }
            }
            out["raw_echo_reply"] = json!(got_reply);
        }
        out
    }

    /// Receives a socket over `SCM_RIGHTS` from the unix socket `path`, connects it to `addr`
    /// and echoes.
    fn recvfd_connect(req: &Value) -> Value {
        let a = addr(req, "addr");
        let u = match UnixStream::connect(req["path"].as_str().unwrap()) {
            Ok(u) => u,
            Err(e) => return fail("unix", &e),
        };
        let fd = match recv_fd(&u) {
            Ok(fd) => fd,
            Err(e) => return fail("recvmsg", &e),
        };
        connect_echo(Socket::from(fd), &a)
    }

    /// Creates a TCP socket (family of `addr`) and sends it over `SCM_RIGHTS` to `path`.
    fn sendfd(req: &Value) -> Value {
        let a = addr(req, "addr");
        let s = match tcp(&a) {
            Ok(s) => s,
            Err(e) => return fail("socket", &e),
        };
        let u = match UnixStream::connect(req["path"].as_str().unwrap()) {
            Ok(u) => u,
            Err(e) => return fail("unix", &e),
        };
        match super::send_fd(&u, s.as_raw_fd()) {
            Ok(()) => {
                // Wait until the receiver is done (it closes the unix socket).
                let mut b = [0u8; 1];
                let _ = (&u).read(&mut b);
                json!({"ok": true})
            }
            Err(e) => fail("sendmsg", &e),
        }
    }

    pub(super) fn recv_fd(u: &UnixStream) -> io::Result<OwnedFd> {
        let mut data = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr() as *mut libc::c_void,
            iov_len: 1,
        };
        let mut cbuf = [0u64; 8];
        // SAFETY: zeroed msghdr filled with live buffers.
        unsafe {
            let mut msg: libc::msghdr = mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = mem::size_of_val(&cbuf);
            if libc::recvmsg(u.as_raw_fd(), &mut msg, 0) < 0 {
                return Err(last());
            }
            let c = libc::CMSG_FIRSTHDR(&msg);
            if c.is_null() || (*c).cmsg_type != libc::SCM_RIGHTS {
                return Err(io::Error::other("no SCM_RIGHTS"));
            }
            let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const i32);
            Ok(OwnedFd::from_raw_fd(fd))
        }
    }

    /// `IORING_OP_CONNECT` through io_uring, then an echo on the socket.
    fn uring_connect(req: &Value) -> Value {
        let a = addr(req, "addr");
        let s = match tcp(&a) {
            Ok(s) => s,
            Err(e) => return fail("socket", &e),
        };
        let mut ring = match io_uring::IoUring::new(4) {
            Ok(r) => r,
            Err(e) => return fail("io_uring_setup", &e),
        };
        let sa = SockAddr::from(a);
        let op = io_uring::opcode::Connect::new(
            io_uring::types::Fd(s.as_raw_fd()),
            sa.as_ptr() as *const libc::sockaddr,
            sa.len(),
        )
        .build()
        .user_data(7);
        // SAFETY: `sa` outlives the operation (we wait for its completion below).
        if unsafe { ring.submission().push(&op) }.is_err() {
            return json!({"ok": false, "stage": "push"});
        }
        if let Err(e) = ring.submit_and_wait(1) {
            return fail("io_uring_enter", &e);
        }
        let Some(cqe) = ring.completion().next() else {
            return json!({"ok": false, "stage": "cqe"});
        };
        if cqe.result() < 0 {
            return json!({"ok": false, "stage": "connect", "errno": -cqe.result()});
        }
        let mut t: TcpStream = s.into();
        match echo(&mut t, "uring") {
            Ok(got) => json!({"ok": true, "echo": got}),
            Err(e) => fail("io", &e),
        }
    }

    /// Optional IP_TRANSPARENT / IP_FREEBIND, bind to `bind`, then connect to `addr` and echo.
    fn bind_connect(req: &Value) -> Value {
        let a = addr(req, "addr");
        let b = addr(req, "bind");
        let s = match tcp(&a) {
            Ok(s) => s,
            Err(e) => return fail("socket", &e),
        };
        if req["transparent"] == true
            && let Err(e) = setsockopt_int(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_TRANSPARENT, 1)
        {
            return fail("ip_transparent", &e);
        }
        if req["freebind"] == true
            && let Err(e) = setsockopt_int(s.as_raw_fd(), libc::IPPROTO_IP, libc::IP_FREEBIND, 1)
        {
            return fail("ip_freebind", &e);
        }
        let _ = s.set_reuse_address(true);
        if let Err(e) = s.bind(&b.into()) {
            return fail("bind", &e);
        }
        connect_echo(s, &a)
    }

    /// TCP connect, write `hex` (or `text`), read until EOF (or 3 s of silence); `reply` is the
    /// text, `reply_hex` its first 16 bytes.
    fn raw_bytes(req: &Value) -> Value {
        let a = addr(req, "addr");
        let s = match TcpStream::connect_timeout(&a, TIMEOUT) {
            Ok(s) => s,
            Err(e) => return fail("connect", &e),
        };
        let bytes = match req["hex"].as_str() {
            Some(h) => (0..h.len() / 2)
                .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
                .collect(),
            None => req["text"].as_str().unwrap_or("").as_bytes().to_vec(),
        };
        let peer = s.peer_addr().map(|p| p.to_string()).unwrap_or_default();
        let mut s = s;
        if let Err(e) = s.write_all(&bytes) {
            return fail("write", &e);
        }
        let _ = s.set_read_timeout(Some(TIMEOUT));
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let mut end = "eof";
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => {
                    end = if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) {
                        "timeout"
                    } else {
                        "error"
                    };
                    break;
                }
            }
        }
        let hex: String = got.iter().take(16).map(|b| format!("{b:02x}")).collect();
        json!({"ok": true, "peer": peer, "reply": String::from_utf8_lossy(&got), "reply_hex": hex, "end": end})
    }
}

/// Sends `fd` over the unix stream `u` (`SCM_RIGHTS`).
fn send_fd(u: &std::os::unix::net::UnixStream, fd: i32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let data = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: one SCM_RIGHTS control message inside cbuf; live buffers.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, fd);
        if libc::sendmsg(u.as_raw_fd(), &msg, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

// -------------------------------------------------------------------- kernel-level world

fn mesh_policy(mode: &str, matches: &[&str]) -> String {
    passthrough_tests::mesh_policy("bypass", mode, matches)
}

/// The kernel-level policy: 198.51.100.0/24 port 8080 and 2001:db8:100::/40 port 8080 allowed
/// (TCP and UDP), UDP to the resolver 203.0.113.53:53; everything else denied.
fn kernel_policy() -> String {
    mesh_policy(
        "Matched",
        &[
            "{type: CIDR, value: 198.51.100.0/24, port: 8080}",
            "{type: CIDR, value: \"2001:db8:100::/40\", port: 8080}",
            "{type: CIDR, value: 198.51.100.0/24, port: 53}",
        ],
    )
}

const ALLOWED4: &str = "198.51.100.9:8080";
const DENIED4: &str = "203.0.113.9:8080";
const DENIED6: &str = "[2001:db8:200::9]:8080";

/// The kernel bypass tests' world: [`kernel_policy`] on a workload cgroup, DNS allowed to one
/// resolver.
fn kernel_world(f: impl FnOnce(AgentBuilder) -> AgentBuilder) -> World {
    World::with(&kernel_policy(), |b| {
        f(b.arg("--resolver").arg("203.0.113.53"))
    })
}

/// What the kernel bypass tests do in their world.
trait KernelWorld {
    /// Runs a bypass helper in the workload (cgroup and client netns).
    fn helper(&self, req: Value) -> Value;
    /// Connections the test host at `a` accepted.
    fn accepted(&self, a: &str) -> u64;
    /// Datagrams the test host at `a` received.
    fn datagrams(&self, a: &str) -> u64;
    /// Datagrams at `a` once `want` arrived or 2 s passed (and 50 ms more for stragglers).
    fn wait_datagrams(&self, a: &str, want: u64) -> u64;
}

impl KernelWorld for World {
    fn helper(&self, req: Value) -> Value {
        helper(self.cg.path(), Some(&self.net.client_ns_path()), req)
    }

    fn accepted(&self, a: &str) -> u64 {
        self.net.accepted(a.parse().unwrap())
    }

    fn datagrams(&self, a: &str) -> u64 {
        self.net.datagrams(a.parse().unwrap())
    }

    fn wait_datagrams(&self, a: &str, want: u64) -> u64 {
        for _ in 0..100 {
            if self.datagrams(a) >= want {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        self.datagrams(a)
    }
}

fn eperm(r: &Value, stage: &str) {
    assert_eq!(r["ok"], false, "should fail with EPERM at {stage}: {r}");
    assert_eq!(r["stage"], stage, "{r}");
    assert_eq!(r["errno"], EPERM, "{r}");
}

fn ok_echo(r: &Value) {
    assert_eq!(r["ok"], true, "{r}");
}

// ------------------------------------------------------------------ address forms (IPv6)

#[test]
fn ipv4_mapped_compatible_and_nat64_forms() {
    if !require_kernel() {
        return;
    }
    let w = kernel_world(|b| b);
    let mut p = w.probe();
    // IPv4-mapped: judged by the IPv4 rules (allowed exactly where the IPv4 address is).
    assert_allowed(&mut p, &w.net, "[::ffff:198.51.100.9]:8080");
    assert_denied(&mut p, &w.net, "[::ffff:198.51.100.9]:80");
    assert_denied(&mut p, &w.net, "[::ffff:203.0.113.9]:8080");
    assert_udp_allowed(&mut p, &w.net, "[::ffff:198.51.100.9]:8080");
    assert_udp_denied(&mut p, &w.net, "[::ffff:203.0.113.9]:8080");
    // IPv4-compatible (::a.b.c.d, deprecated) and NAT64 (64:ff9b::/96) are IPv6 addresses to the
    // kernel: they never reach the IPv4 host, and the filter judges them as the IPv6 addresses
    // they are — not covered by the IPv4 CIDR, so denied.
    for a in [
        "[::198.51.100.9]:8080",
        "[::c633:6409]:8080",
        "[64:ff9b::198.51.100.9]:8080",
    ] {
        assert_denied(&mut p, &w.net, a);
        assert_eq!(p.connect_udp(a).unwrap_err(), EPERM, "{a}");
        assert_eq!(p.sendto(a, "x").unwrap_err(), EPERM, "{a}");
    }
    // Loopback in every spelling is allowed (rule 1); ::ffff:127.x too.
    assert_allowed(
        &mut p,
        &w.net,
        &format!("[::ffff:127.0.0.1]:{LOOPBACK_PORT}"),
    );
    assert_allowed(&mut p, &w.net, &format!("127.0.0.1:{LOOPBACK_PORT}"));
    assert_eq!(w.accepted("198.51.100.9:80"), 0);
}

// --------------------------------------------------------------------- TCP Fast Open

#[test]
fn tcp_fast_open_sendto_runs_the_connect_hook() {
    if !require_kernel() {
        return;
    }
    let w = kernel_world(|b| b);
    // Denied: sendto(MSG_FASTOPEN) fails with EPERM, nothing reaches the host.
    for a in [DENIED4, DENIED6, "[::ffff:203.0.113.9]:8080"] {
        let before = w.accepted(a);
        let r = w.helper(json!({"op": "fastopen", "addr": a}));
        eperm(&r, "sendto");
        assert_eq!(w.accepted(a), before, "{a}");
    }
    // Allowed: the data goes through and is echoed.
    for a in [ALLOWED4, "[2001:db8:100::9]:8080"] {
        let before = w.accepted(a);
        let r = w.helper(json!({"op": "fastopen", "addr": a}));
        ok_echo(&r);
        assert_eq!(r["echo"], "tfo", "{r}");
        assert_eq!(w.accepted(a), before + 1, "{a}");
    }
}

// --------------------------------------------------------------------------- UDP tricks

#[test]
fn udp_sendmmsg_connected_switch_af_unspec_and_v4_sockaddr_on_v6_socket() {
    if !require_kernel() {
        return;
    }
    let w = kernel_world(|b| b);
    let ok = "198.51.100.9:53";
    let bad = "203.0.113.9:53";
    let bad2 = "203.0.113.10:53";
    // sendmmsg: each message is judged; the call stops at the first denied one.
    let (ok0, bad0) = (w.datagrams(ok), w.datagrams(bad));
    let r = w.helper(json!({"op": "sendmmsg", "addrs": [ok, bad, ok]}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["sent"], 1, "stops at the denied message: {r}");
    let r = w.helper(json!({"op": "sendmmsg", "addrs": [bad, ok]}));
    eperm(&r, "sendmmsg");
    assert_eq!(w.wait_datagrams(ok, ok0 + 1), ok0 + 1);
    assert_eq!(w.datagrams(bad), bad0);

    // A UDP socket connected to an allowed destination, then sendto() another address:
    // sendmsg4 runs for the explicit address.
    let r = w.helper(json!({"op": "udp_switch", "first": ok, "second": bad2}));
    eperm(&r, "sendto");
    let r = w.helper(json!({"op": "udp_switch", "first": "[2001:db8:100::9]:8080", "second": "[2001:db8:200::9]:8080"}));
    eperm(&r, "sendto");
    let r = w.helper(json!({"op": "udp_switch", "first": "[2001:db8:100::9]:8080", "second": "[::ffff:203.0.113.9]:53"}));
    eperm(&r, "sendto");

    // sin_family = AF_UNSPEC: udp_sendmsg still sends to sin_addr, and sendmsg4 judges it.
    let r = w.helper(json!({"op": "unspec", "addr": bad}));
    eperm(&r, "sendto");
    let before = w.datagrams(ok);
    let r = w.helper(json!({"op": "unspec", "addr": ok}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(w.wait_datagrams(ok, before + 1), before + 1);

    // A sockaddr_in on an AF_INET6 socket goes to udp_sendmsg: sendmsg4 judges it.
    let r = w.helper(json!({"op": "v4_on_v6", "addr": bad}));
    eperm(&r, "sendto");
    let before = w.datagrams(ok);
    let r = w.helper(json!({"op": "v4_on_v6", "addr": ok}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(w.wait_datagrams(ok, before + 1), before + 1);
    assert_eq!(w.datagrams(bad), bad0);
    assert_eq!(w.datagrams(bad2), 0);
}

// ------------------------------------------------------------------------ SCM_RIGHTS

#[test]
fn scm_rights_socket_passed_in_from_an_unfiltered_process_is_not_filtered() {
    if !require_kernel() {
        return;
    }
    // The hooks run only for sockets whose cgroup (fixed when the socket is created) is below an
    // attachment. A socket made by this test process (not in any attached cgroup), in the
    // client netns, and passed into the workload is therefore not filtered at all.
    let w = kernel_world(|b| b);
    let dir = passthrough_tests::test_dir();
    let path = dir.path().join("fd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let ns = w.net.client_ns().to_string();
    let outside = in_netns(&ns, || {
        Ok(socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?)
    })
    .unwrap();
    let sender = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let (u, _) = listener.accept().unwrap();
        send_fd(&u, outside.as_raw_fd()).unwrap();
        // Keep our copy until the workload is done with its own.
        let mut b = [0u8; 1];
        let _ = (&u).read(&mut b);
        drop(outside);
    });
    let before = w.accepted(DENIED4);
    let r =
        w.helper(json!({"op": "recvfd_connect", "path": path.to_str().unwrap(), "addr": DENIED4}));
    sender.join().unwrap();
    assert_eq!(
        r["ok"], true,
        "documented hole: a socket created outside every attached cgroup is not filtered, even when a workload connects it: {r}"
    );
    assert_eq!(w.accepted(DENIED4), before + 1);
    // The workload's own sockets are still denied.
    let r = w.helper(json!({"op": "tcp", "addr": DENIED4}));
    eperm(&r, "connect");
}

#[test]
fn scm_rights_socket_passed_out_of_the_workload_is_judged_by_the_caller() {
    if !require_kernel() {
        return;
    }
    // The reverse: a socket made inside the workload (so below the attachment: the hooks run)
    // and connected by a process that is no workload gets --unselected-mode (None here).
    let w = kernel_world(|b| b.unselected_mode("None"));
    let dir = passthrough_tests::test_dir();
    let path = dir.path().join("fd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let receiver = std::thread::spawn(move || {
        let (u, _) = listener.accept().unwrap();
        let fd = ops::recv_fd(&u).unwrap();
        let s = socket2::Socket::from(fd);
        let denied = s
            .connect_timeout(
                &DENIED4.parse::<SocketAddr>().unwrap().into(),
                Duration::from_secs(3),
            )
            .map_err(|e| e.raw_os_error());
        let allowed = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        drop(allowed);
        drop(u);
        denied
    });
    let r = w.helper(json!({"op": "sendfd", "path": path.to_str().unwrap(), "addr": DENIED4}));
    assert_eq!(r["ok"], true, "{r}");
    let res = receiver.join().unwrap();
    assert_eq!(
        res,
        Err(Some(EPERM)),
        "a workload's socket connected by a non-workload process is judged by --unselected-mode"
    );
    assert_eq!(w.accepted(DENIED4), 0);
}

#[test]
fn scm_rights_with_an_ancestor_attachment_the_calling_workload_decides() {
    if !require_kernel() {
        return;
    }
    // The mitigation of the hole above: attach at a common ancestor. A socket created in a
    // sibling cgroup that is no workload (so below the attachment: the hooks run) and passed
    // into the workload is judged by the workload's policy when the workload connects it.
    let dir = passthrough_tests::test_dir();
    let parent = TestCgroup::new().unwrap();
    let workload = parent.child("w").unwrap();
    let other = parent.child("o").unwrap();
    let net = TestNet::new().unwrap();
    let policy = write_policy(dir.path(), &kernel_policy());
    let _agent = Agent::builder()
        .policy(&policy)
        .cgroup(workload.path())
        .attach_cgroup(parent.path())
        .start()
        .unwrap();
    let (p1, p2) = (dir.path().join("in.sock"), dir.path().join("out.sock"));
    let (l1, l2) = (
        UnixListener::bind(&p1).unwrap(),
        UnixListener::bind(&p2).unwrap(),
    );
    let relay = std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let (u1, _) = l1.accept().unwrap();
        let fd = ops::recv_fd(&u1).unwrap();
        drop(u1);
        let (u2, _) = l2.accept().unwrap();
        send_fd(&u2, fd.as_raw_fd()).unwrap();
        let mut b = [0u8; 1];
        let _ = (&u2).read(&mut b);
    });
    let ns = net.client_ns_path();
    let (o, ns2, p1s) = (
        other.path().to_path_buf(),
        ns.clone(),
        p1.to_str().unwrap().to_string(),
    );
    let maker = std::thread::spawn(move || {
        helper(
            &o,
            Some(&ns2),
            json!({"op": "sendfd", "path": p1s, "addr": DENIED4}),
        )
    });
    let r = helper(
        workload.path(),
        Some(&ns),
        json!({"op": "recvfd_connect", "path": p2.to_str().unwrap(), "addr": DENIED4}),
    );
    assert_eq!(maker.join().unwrap()["ok"], true);
    relay.join().unwrap();
    eperm(&r, "connect");
    assert_eq!(net.accepted(DENIED4.parse().unwrap()), 0);
}

// ---------------------------------------------------------------------- raw and ICMP

#[test]
fn raw_and_ping_sockets_are_judged_by_the_egress_backstop() {
    if !require_kernel() {
        return;
    }
    // The kernel policy plus one port-less IP match: the only kind of match that can allow a
    // packet without ports.
    let mut matches: Vec<&str> = vec![
        "{type: CIDR, value: 198.51.100.0/24, port: 8080}",
        "{type: CIDR, value: 198.51.100.0/24, port: 53}",
        "{type: IP, value: 198.51.100.10}",
        "{type: IP, value: \"2001:db8:100::10\"}",
    ];
    matches.push("{type: CIDR, value: \"2001:db8:100::/40\", port: 8080}");
    let w = World::with(&mesh_policy("Matched", &matches), |b| {
        b.arg("--resolver").arg("203.0.113.53")
    });
    // Ping sockets are off by default (net.ipv4.ping_group_range = "1 0"); open them for every
    // group in the test's own client netns to see what the hooks do with them.
    passthrough_tests::run(
        "ip",
        &[
            "netns",
            "exec",
            w.net.client_ns(),
            "sysctl",
            "-qw",
            "net.ipv4.ping_group_range=0 2147483647",
        ],
    )
    .unwrap();
    let bad = "203.0.113.9:53";
    // CIDR 198.51.100.0/24 allows port 53, but a raw packet has no port the filter could
    // trust: only the port-less match allows it.
    let port_only = "198.51.100.9:53";
    let good = "198.51.100.10:53";
    // With CAP_NET_RAW (the helper runs as root): hand-made UDP datagrams on a raw socket. No
    // sock_addr hook sees them; the cgroup_skb backstop drops them unless allowed.
    let (before_bad, before_port_only, before_good) =
        (w.datagrams(bad), w.datagrams(port_only), w.datagrams(good));
    let r = w.helper(json!({"op": "raw_udp", "addr": bad}));
    eperm(&r, "sendto");
    let r = w.helper(json!({"op": "raw_udp", "addr": port_only}));
    eperm(&r, "sendto");
    let r = w.helper(json!({"op": "raw_udp", "addr": good}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        w.wait_datagrams(good, before_good + 1),
        before_good + 1,
        "allowed raw datagram delivered"
    );
    assert_eq!(w.datagrams(bad), before_bad, "denied raw datagram dropped");
    assert_eq!(
        w.datagrams(port_only),
        before_port_only,
        "a port-specific match does not allow raw packets"
    );
    // The same over IPv6.
    let (bad6, good6) = ("[2001:db8:200::9]:53", "[2001:db8:100::10]:53");
    let (before_bad6, before_good6) = (w.datagrams(bad6), w.datagrams(good6));
    let r = w.helper(json!({"op": "raw_udp", "addr": bad6}));
    eperm(&r, "sendto");
    let r = w.helper(json!({"op": "raw_udp", "addr": good6}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        w.wait_datagrams(good6, before_good6 + 1),
        before_good6 + 1,
        "allowed raw IPv6 datagram delivered"
    );
    assert_eq!(
        w.datagrams(bad6),
        before_bad6,
        "denied raw IPv6 datagram dropped"
    );

    // ICMP: raw sockets and ping sockets (SOCK_DGRAM/IPPROTO_ICMP) to a denied host: connect is
    // judged by connect4, and the unconnected sendto() (ping_v4_sendmsg runs no sock_addr hook)
    // and the raw socket's sendto() by the backstop.
    let r = w.helper(json!({"op": "ping", "addr": "203.0.113.9:0"}));
    assert_eq!(
        (
            r["raw_socket_errno"].clone(),
            r["ping_socket_errno"].clone()
        ),
        (json!(0), json!(0)),
        "{r}"
    );
    assert_eq!(
        r["raw_sendto_errno"], EPERM,
        "raw ICMP to a denied host: {r}"
    );
    assert_eq!(r["raw_echo_reply"], false, "{r}");
    assert_eq!(
        r["ping_sendto_errno"], EPERM,
        "ping socket sendto to a denied host: {r}"
    );
    assert_eq!(
        r["ping_connect_errno"], EPERM,
        "ping socket connect is judged: {r}"
    );
    // Each drop is a denial event naming the packet's protocol.
    let logged = |what: &str| {
        (0..100).any(|_| {
            let hit = w
                .agent
                .log()
                .lines()
                .any(|l| l.contains("203.0.113.9") && l.contains(what));
            if !hit {
                std::thread::sleep(Duration::from_millis(20));
            }
            hit
        })
    };
    assert!(
        logged("protocol=raw:udp") && logged("protocol=raw:icmp") && logged("protocol=ping"),
        "denial events for raw UDP, raw ICMP and ping:\n{}",
        w.agent.log()
    );
    // The same to the allowed host goes through, and the echo reply comes back.
    let r = w.helper(json!({"op": "ping", "addr": "198.51.100.10:0"}));
    assert_eq!(r["raw_sendto_errno"], Value::Null, "{r}");
    assert_eq!(r["raw_echo_reply"], true, "{r}");
    assert_eq!(r["ping_sendto_errno"], Value::Null, "{r}");
    assert_eq!(r["ping_connect_errno"], 0, "{r}");

    // Without CAP_NET_RAW (uid 65534, no capabilities): no raw socket at all.
    let r = w.helper(json!({"op": "raw_udp", "addr": good, "as_nobody": true}));
    eperm(&r, "socket");
    let r = w.helper(json!({"op": "ping", "addr": "203.0.113.9:0", "as_nobody": true}));
    assert_eq!(r["raw_socket_errno"], EPERM, "{r}");
    assert_eq!(r["ping_connect_errno"], EPERM, "{r}");
    assert_eq!(w.datagrams(bad), before_bad);
}

// ---------------------------------------------------------------------------- io_uring

#[test]
fn io_uring_connect_runs_the_connect_hook() {
    if !require_kernel() {
        return;
    }
    let w = kernel_world(|b| b);
    for a in [DENIED4, DENIED6] {
        let r = w.helper(json!({"op": "uring_connect", "addr": a}));
        eperm(&r, "connect");
        assert_eq!(w.accepted(a), 0);
    }
    let r = w.helper(json!({"op": "uring_connect", "addr": ALLOWED4}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["echo"], "uring", "{r}");
}

// ------------------------------------------------------------------------------ SO_MARK

#[test]
fn agent_mark_spoofing_needs_cap_net_admin() {
    if !require_kernel() {
        return;
    }
    let w = kernel_world(|b| b);
    // Without CAP_NET_ADMIN the mark cannot be set: setsockopt fails with EPERM.
    let r = w.helper(json!({"op": "mark", "addr": DENIED4, "as_nobody": true}));
    eperm(&r, "setsockopt");
    // An unprivileged user namespace gives CAP_NET_ADMIN only over sockets of its own (new, empty)
    // network namespace: not over the workload's sockets, and the new netns reaches nothing.
    let r = w.helper(json!({"op": "userns_mark", "addr": DENIED4, "as_nobody": true}));
    eprintln!("user namespace attempt: {r}");
    assert_eq!(r["ok"], true, "{r}");
    if r["unshare_errno"] == 0 {
        assert_eq!(r["old_socket_mark_errno"], EPERM, "{r}");
        assert_ne!(r["new_socket_connect_errno"], 0, "{r}");
    }
    // A workload that has CAP_NET_ADMIN (root here) can set the agent's mark, but the mark is
    // only honoured for callers outside every workload: still EPERM, nothing reaches the host.
    let before = w.accepted(DENIED4);
    let r = w.helper(json!({"op": "mark", "addr": DENIED4}));
    eperm(&r, "connect");
    assert_eq!(
        w.accepted(DENIED4),
        before,
        "a spoofed agent mark must not let a workload out: {r}"
    );
    // Any other mark does nothing.
    let r = w.helper(json!({"op": "mark", "addr": DENIED4, "mark": 0x7074_0002}));
    eperm(&r, "connect");
    // Unprivileged, the allowed destination still works.
    let r = w.helper(json!({"op": "tcp", "addr": ALLOWED4, "as_nobody": true}));
    ok_echo(&r);
}

// ---------------------------------------------------------------------------- bind tricks

#[test]
fn bind_tricks_do_not_change_the_decision() {
    if !require_kernel() {
        return;
    }
    let w = kernel_world(|b| b);
    // The decision is on the destination; what the socket is bound to does not matter:
    // the client's own address, a loopback address, a non-local address (IP_FREEBIND and,
    // with CAP_NET_ADMIN, IP_TRANSPARENT), or an allowed destination's address.
    for (bind, extra) in [
        ("192.0.2.1:0", json!({})),
        ("127.0.0.1:0", json!({})),
        ("198.51.100.9:8080", json!({"freebind": true})),
        ("198.51.100.77:0", json!({"transparent": true})),
    ] {
        let mut req = json!({"op": "bind_connect", "addr": DENIED4, "bind": bind});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        let r = w.helper(req);
        eprintln!("bind {bind}: {r}");
        assert_eq!(r["ok"], false, "{bind}: {r}");
        if r["stage"] == "connect" {
            assert_eq!(r["errno"], EPERM, "{bind}: {r}");
        }
    }
    assert_eq!(w.accepted(DENIED4), 0);
    let r = w.helper(json!({"op": "bind_connect", "addr": ALLOWED4, "bind": "192.0.2.1:0"}));
    ok_echo(&r);
}

// ------------------------------------------------------------- proxy-level (L7) attempts

/// One test at a time on the slot's host routes.
static SERIAL: Mutex<()> = Mutex::new(());

fn host(n: u8, v6: bool, port: u16) -> SocketAddr {
    let ip = if v6 {
        SEC_SLOT.host6(0x9 + u16::from(n))
    } else {
        SEC_SLOT.host4(n)
    };
    SocketAddr::new(ip, port)
}

/// A raw HTTP/1 server for `8081`: records every byte it receives, answers each request head
/// (body framed by Content-Length or chunked) with `200 ok`.
struct Recorder {
    seen: Arc<Mutex<Vec<u8>>>,
    /// The request heads it parsed (a Transfer-Encoding-first parser, like hyper's).
    heads: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    fn start(ns: &str, port: u16) -> Recorder {
        let ls: Vec<TcpListener> = in_netns(ns, move || {
            Ok(vec![TcpListener::bind(("0.0.0.0", port))?, {
                let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None)?;
                s.set_only_v6(true)?;
                s.bind(&SocketAddr::from(([0u16; 8], port)).into())?;
                s.listen(16)?;
                s.into()
            }])
        })
        .unwrap();
        let seen: Arc<Mutex<Vec<u8>>> = Arc::default();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        for l in ls {
            let seen = seen.clone();
            let heads = heads.clone();
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let Ok(mut s) = s else { return };
                    let seen = seen.clone();
                    let heads = heads.clone();
                    std::thread::spawn(move || {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut buf = Vec::new();
                        let mut b = [0u8; 4096];
                        loop {
                            // Answer every complete request in buf.
                            while let Some(used) = complete_request(&buf) {
                                let head_end =
                                    buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
                                heads
                                    .lock()
                                    .unwrap()
                                    .push(String::from_utf8_lossy(&buf[..head_end]).into_owned());
                                buf.drain(..used);
                                if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                                    .is_err()
                                {
                                    return;
                                }
                            }
                            match s.read(&mut b) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    seen.lock().unwrap().extend_from_slice(&b[..n]);
                                    buf.extend_from_slice(&b[..n]);
                                }
                            }
                        }
                    });
                }
            });
        }
        Recorder { seen, heads }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// Length of the first complete request in `buf` (head + body), if there is one.
fn complete_request(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        let rest = &buf[head_end..];
        let end = rest.windows(5).position(|w| w == b"0\r\n\r\n")? + 5;
        return Some(head_end + end);
    }
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + len).then_some(head_end + len)
}

struct PWorld {
    agent: Agent,
    servers: Servers,
    recorder: Recorder,
    _dns: Dns,
    _net: HostNet,
    cg: TestCgroup,
    _dir: TempDir,
    _serial: MutexGuard<'static, ()>,
}

const A: u8 = 1;
const B: u8 = 2;

impl PWorld {
    fn new() -> PWorld {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = passthrough_tests::test_dir();
        let cg = TestCgroup::new().unwrap();
        let net = HostNet::new(SEC_SLOT).unwrap();
        let pki = Pki::new(&["api.test", "web.test", "other.test"]).unwrap();
        let servers = Servers::start(
            Some(net.server_ns()),
            &[(443, Service::TlsEcho), (80, Service::Http)],
            Some(pki.server.clone()),
            1,
        )
        .unwrap();
        let recorder = Recorder::start(net.server_ns(), 8081);
        let mut names: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for n in ["api.test", "web.test"] {
            names.insert(
                n.into(),
                vec![host(A, false, 0).ip(), host(A, true, 0).ip()],
            );
        }
        names.insert(
            "other.test".into(),
            vec![host(B, false, 0).ip(), host(B, true, 0).ip()],
        );
        let dns = Dns::start(names, 300).unwrap();
        let yaml = mesh_policy(
            "Matched",
            &[
                "{type: Domain, value: api.test, port: 443, protocol: tls}",
                "{type: Domain, value: web.test, port: 80, protocol: http}",
                "{type: Domain, value: web.test, port: 8081, protocol: http}",
            ],
        );
        let policy = write_policy(dir.path(), &yaml);
        // The proxy's world: every TLS hello here must reach the proxy, also to a verified
        // destination (the fast path judges the same hellos in the kernel: tls_fast_path.rs
        // `same_verdicts_as_the_proxy_for_every_sni`).
        let agent = Agent::builder()
            .policy(&policy)
            .cgroup(cg.path())
            .arg("--resolver")
            .arg(&dns.addr.to_string())
            .arg("--tls-fast-path=off")
            .start()
            .unwrap();
        PWorld {
            agent,
            servers,
            recorder,
            _dns: dns,
            _net: net,
            cg,
            _dir: dir,
            _serial: serial,
        }
    }

    fn raw(&self, addr: SocketAddr, text: &str) -> Value {
        let r = helper(
            self.cg.path(),
            None,
            json!({"op": "raw_bytes", "addr": addr.to_string(), "text": text}),
        );
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(
            r["peer"],
            addr.to_string(),
            "getpeername is the dialled address: {r}"
        );
        r
    }

    fn hello(&self, addr: SocketAddr, names: &[&[u8]]) -> Value {
        let hex: String = client_hello(names)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let r = helper(
            self.cg.path(),
            None,
            json!({"op": "raw_bytes", "addr": addr.to_string(), "hex": hex}),
        );
        assert_eq!(r["ok"], true, "{r}");
        r
    }
}

/// The proxy's TLS alert `access_denied`.
const ACCESS_DENIED: &str = "15030300020231";

/// A minimal ClientHello whose server_name extension lists `names` verbatim (none: no
/// server_name extension).
fn client_hello(names: &[&[u8]]) -> Vec<u8> {
    let h = if names.is_empty() {
        Hello::minimal()
    } else {
        Hello::minimal().server_names(names)
    };
    h.supported_versions(&[TLS13, TLS12]).record()
}

fn status(r: &Value) -> String {
    r["reply"]
        .as_str()
        .unwrap_or("")
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn hostile_http_through_the_kernel_redirect() {
    if !require_kernel() {
        return;
    }
    let w = PWorld::new();
    for v6 in [false, true] {
        let a = host(A, v6, 80);
        // Baseline.
        let r = w.raw(
            a,
            "GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
        );
        assert!(status(&r).contains(" 200 "), "{r}");
        // Two Host headers → 503.
        let r = w.raw(
            a,
            "GET / HTTP/1.1\r\nHost: web.test\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
        );
        assert!(status(&r).contains(" 503 "), "{r}");
        // Absolute-form wins over Host (RFC 9112 §3.2.2), both ways.
        let r = w.raw(
            a,
            "GET http://evil.test/ HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
        );
        assert!(status(&r).contains(" 503 "), "{r}");
        let r = w.raw(
            a,
            "GET http://web.test/x HTTP/1.1\r\nHost: evil.test\r\nConnection: close\r\n\r\n",
        );
        assert!(status(&r).contains(" 200 "), "{r}");
        assert!(
            r["reply"]
                .as_str()
                .unwrap()
                .contains("host=web.test uri=/x"),
            "upstream saw the judged Host: {r}"
        );
        // A second Host on a keep-alive (pipelined) connection.
        let r = w.raw(
            a,
            "GET /1 HTTP/1.1\r\nHost: web.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: evil.test\r\n\r\n",
        );
        let reply = r["reply"].as_str().unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 "), "{r}");
        assert!(
            reply.contains("HTTP/1.1 503 ") && reply.contains("evil.test"),
            "{r}"
        );
        // Upgrade: h2c and CONNECT.
        let r = w.raw(a, "GET / HTTP/1.1\r\nHost: web.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n");
        assert!(status(&r).contains(" 503 "), "{r}");
        let r = w.raw(
            a,
            "CONNECT web.test:80 HTTP/1.1\r\nHost: web.test:80\r\n\r\n",
        );
        assert!(status(&r).contains(" 503 "), "{r}");
        // Upgrade: websocket.
        let r = w.raw(a, "GET / HTTP/1.1\r\nHost: web.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
        assert!(status(&r).contains(" 503 "), "{r}");
    }
}

#[test]
fn content_length_plus_transfer_encoding_cannot_smuggle_a_request() {
    if !require_kernel() {
        return;
    }
    let w = PWorld::new();
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: evil.test\r\n\r\n";
    let attempts = [
        // CL.TE: Content-Length covers the smuggled request, Transfer-Encoding ends the body.
        format!(
            "POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
            5 + smuggled.len()
        ),
        // TE.CL.
        format!(
            "POST / HTTP/1.1\r\nHost: web.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
            smuggled.len()
        ),
        // Obfuscated Transfer-Encoding.
        format!(
            "POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: {}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}",
            5 + smuggled.len()
        ),
        // Two Content-Lengths.
        format!(
            "POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        ),
    ];
    for v6 in [false, true] {
        for req in &attempts {
            let r = w.raw(host(A, v6, 8081), req);
            let reply = r["reply"].as_str().unwrap();
            let seen = w.recorder.text();
            eprintln!("sent {req:?}\n  reply {:?}", status(&r));
            // The smuggled request may travel as body bytes (that is what they are), but no
            // request head for evil.test reached the upstream, and every head carries one
            // framing only (the proxy re-frames: an upstream that prefers Content-Length
            // cannot be desynchronised).
            for head in w.recorder.heads() {
                let h = head.to_ascii_lowercase();
                assert!(
                    !h.contains("evil.test") && !h.contains("/smuggled"),
                    "a smuggled request reached the upstream:\nsent {req:?}\nupstream saw {seen:?}\nreply {reply:?}"
                );
                assert!(
                    !(h.contains("content-length:") && h.contains("transfer-encoding:")),
                    "upstream got both framings: {seen:?}"
                );
                assert!(
                    !h.contains("xchunked"),
                    "unknown transfer coding forwarded: {seen:?}"
                );
            }
            // The client got a 400/503 or only answers for web.test; never an upstream answer
            // to the smuggled request (the recorder answers `ok` to every request it parses).
            let oks = reply.matches("\r\n\r\nok").count();
            assert!(
                oks <= 1,
                "more upstream answers than allowed requests: {reply:?}"
            );
        }
    }
}

#[test]
fn hostile_client_hellos_through_the_kernel_redirect() {
    if !require_kernel() {
        return;
    }
    let w = PWorld::new();
    for v6 in [false, true] {
        let a = host(A, v6, 443);
        let ip = a.ip().to_string();
        for (names, allowed) in [
            (vec![&b"api.test"[..]], true),
            (vec![&b"API.TEST"[..]], true),
            (vec![&b"api.test"[..], &b"evil.test"[..]], false),
            (vec![&b"evil.test"[..], &b"api.test"[..]], false),
            (vec![ip.as_bytes()], false),
            (vec![&b"api.test\0.evil.test"[..]], false),
            (vec![&b"api.test\0"[..]], false),
            (vec![], false),
        ] {
            let before = w.servers.accepted_total();
            let r = w.hello(a, &names);
            let shown: Vec<String> = names
                .iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect();
            if allowed {
                assert_ne!(r["reply_hex"], ACCESS_DENIED, "{shown:?}: {r}");
                for _ in 0..50 {
                    if w.servers.accepted_total() > before {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                assert_eq!(
                    w.servers.accepted_total(),
                    before + 1,
                    "{shown:?} reaches the host"
                );
            } else {
                assert_eq!(r["reply_hex"], ACCESS_DENIED, "{shown:?}: {r}");
                assert_eq!(w.servers.accepted_total(), before, "{shown:?}");
            }
        }
        // An allowed SNI sent to another host's address (destination check, default verify).
        let before = w.servers.accepted_total();
        let r = w.hello(host(B, v6, 443), &[b"api.test"]);
        assert_eq!(r["reply_hex"], ACCESS_DENIED, "{r}");
        let r = w.raw(
            host(B, v6, 80),
            "GET / HTTP/1.1\r\nHost: web.test\r\nConnection: close\r\n\r\n",
        );
        assert!(status(&r).contains(" 503 "), "{r}");
        assert_eq!(w.servers.accepted_total(), before);
    }
    // Straight to the proxy's port: no recorded destination → closed without a byte.
    let port = w.agent.proxy_port();
    for p in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        let r = helper(
            w.cg.path(),
            None,
            json!({"op": "raw_bytes", "addr": p, "text": "GET / HTTP/1.1\r\nHost: web.test\r\n\r\n"}),
        );
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["reply"], "", "{r}");
        assert_ne!(r["end"], "timeout", "closed at once: {r}");
    }
}
