//! Issue 16: attempts to make the kernel send a workload's packets somewhere other than the
//! address connect()/sendmsg() judged — source routes (IPv6 routing headers, IPv4 LSRR/SSRR,
//! sticky or per datagram, set before the agent attached), MPTCP subflows the kernel opens,
//! and the rest of the class (packet info, next hop, device binding, multicast and broadcast,
//! `MSG_CONFIRM`, tunnels and XFRM in the workload's own namespaces, other socket families,
//! ICMPv6 ping). Each outcome is the one documented in docs/security.md.
//!
//! The denied hosts log every packet that reaches them: a packet socket on the test hosts'
//! end of the link ([`Sniffer`]) records each packet's destination *as it is on the wire*. A
//! source-routed packet travels to its first hop, so an accept or datagram count at the judged
//! address would miss it; the log does not. Every attack here asserts that no packet at all
//! reached the denied addresses, and where the attack works when allowed (mode `All`) a
//! positive control shows the log would have seen it.
//!
//! Attacks that need no privilege run as uid 65534 with no capabilities (`as_nobody`); the
//! ones that need `CAP_NET_RAW` run as root inside the workload (container runtimes grant it by
//! default). They run in a *helper*: this test executable started again inside the workload
//! cgroup and client netns with a JSON request in `PT_REROUTE_HELPER`; it prints `PTRESULT
//! <json>` (and, for the interactive ones, `PTSTAGE <json>` lines, waiting for a line on stdin
//! between stages).

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Stdio},
    time::Duration,
};

use passthrough_tests::{
    Agent, EPERM, TestCgroup, TestNet, World,
    netns::in_netns,
    probe::{helper_command, serve_helper},
    require_kernel,
    sec::command_in,
    sniff::Sniffer,
    write_policy,
};
use serde_json::{Value, json};

// ------------------------------------------------------------------------------ the helper

const HELPER_ENV: &str = "PT_REROUTE_HELPER";

/// Not a test of its own: the entry point of the helper (does nothing unless
/// `PT_REROUTE_HELPER` is set).
#[test]
fn helper_entry() {
    serve_helper(HELPER_ENV, ops::run);
}

/// A helper process inside a workload cgroup and netns.
struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    req: Value,
}

impl Helper {
    fn spawn(cgroup: &Path, netns: &Path, req: Value) -> Helper {
        let mut cmd = helper_command(HELPER_ENV, &req);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let ns = command_in(&mut cmd, cgroup, Some(netns)).expect("helper command");
        let mut child = cmd.spawn().expect("spawning the helper");
        drop(ns);
        let stdin = child.stdin.take().expect("helper stdin");
        let stdout = BufReader::new(child.stdout.take().expect("helper stdout"));
        Helper {
            child,
            stdin,
            stdout,
            req,
        }
    }

    /// The next `PTSTAGE` or `PTRESULT` line's JSON.
    fn next(&mut self) -> Value {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .stdout
                .read_line(&mut line)
                .expect("reading the helper");
            assert!(n > 0, "helper {} ended without a result", self.req);
            for tag in ["PTSTAGE ", "PTRESULT "] {
                if let Some(i) = line.find(tag) {
                    return serde_json::from_str(line[i + tag.len()..].trim())
                        .expect("helper JSON");
                }
            }
        }
    }

    /// Lets an interactive helper go on to its next stage.
    fn go(&mut self) {
        writeln!(self.stdin, "go").expect("writing to the helper");
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs one helper operation to its result.
fn helper(cgroup: &Path, netns: &Path, req: Value) -> Value {
    Helper::spawn(cgroup, netns, req).next()
}

/// The helper's operations. Every answer is JSON; errno 0 means the step succeeded. None
/// panics on what the kernel answers.
mod ops {
    use std::{
        io::{self, BufRead, Read, Write},
        mem,
        net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
        os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        time::{Duration, Instant},
    };

    use passthrough_tests::{
        netns::setsockopt_int,
        sys::{addr, become_nobody, code, errno, last},
    };
    use serde_json::{Value, json};
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};

    const TIMEOUT: Duration = Duration::from_secs(2);
    const IPV6_RTHDR: i32 = 57;
    const IPV6_2292RTHDR: i32 = 5;
    const IPV6_2292PKTOPTIONS: i32 = 6;
    const IPV6_HDRINCL: i32 = 36;
    const IPV6_NEXTHOP: i32 = 9;
    const IPV6_DSTOPTS: i32 = 59;
    const IP_XFRM_POLICY: i32 = 17;
    const IPPROTO_MPTCP: i32 = 262;
    const SOL_MPTCP: i32 = 284;
    const MPTCP_INFO: i32 = 1;

    fn ips(req: &Value, key: &str) -> Vec<IpAddr> {
        req[key]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()?.parse().ok()).collect())
            .unwrap_or_default()
    }

    pub fn run(req: &Value) -> Value {
        if req["as_nobody"] == true
            && let Err(e) = become_nobody()
        {
            return json!({"ok": false, "stage": "setuid", "errno": errno(&e)});
        }
        match req["op"].as_str().unwrap_or("") {
            "rthdr" => rthdr(req),
            "ipopts" => ipopts(req),
            "raw_hdrincl" => raw_hdrincl(req),
            "sticky" => sticky(req),
            "mptcp" => mptcp(req),
            "misc" => misc(req),
            "userns" => userns(req),
            "families" => families(),
            "ping6" => ping6(req),
            "compat" => compat(req),
            other => {
                json!({"ok": false, "stage": "request", "error": format!("unknown op {other}")})
            }
        }
    }

    /// Prints a stage result and waits for the driver's go-ahead.
    fn stage(v: Value) {
        println!("\nPTSTAGE {v}");
        let _ = io::stdout().flush();
        let mut line = String::new();
        let _ = io::stdin().lock().read_line(&mut line);
    }

    fn setsockopt_bytes(fd: RawFd, level: i32, name: i32, val: &[u8]) -> io::Result<()> {
        // SAFETY: a live buffer and its length.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                val.as_ptr() as *const libc::c_void,
                val.len() as u32,
            )
        };
        if rc != 0 { Err(last()) } else { Ok(()) }
    }

    /// `sendmsg` of `data` to `to` with one control message `(level, type, payload)`.
    fn sendmsg_cmsg(
        fd: RawFd,
        to: &SockAddr,
        data: &[u8],
        cmsg: Option<(i32, i32, &[u8])>,
        flags: i32,
    ) -> io::Result<usize> {
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut cbuf = [0u64; 64];
        // SAFETY: a zeroed msghdr filled with live pointers; the control message fits cbuf
        // (payloads here are at most a few hundred bytes).
        unsafe {
            let mut msg: libc::msghdr = mem::zeroed();
            msg.msg_name = to.as_ptr() as *mut libc::c_void;
            msg.msg_namelen = to.len();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if let Some((level, ty, payload)) = cmsg {
                msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = libc::CMSG_SPACE(payload.len() as u32) as usize;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = level;
                (*c).cmsg_type = ty;
                (*c).cmsg_len = libc::CMSG_LEN(payload.len() as u32) as usize;
                std::ptr::copy_nonoverlapping(payload.as_ptr(), libc::CMSG_DATA(c), payload.len());
            }
            let n = libc::sendmsg(fd, &msg, flags);
            if n < 0 { Err(last()) } else { Ok(n as usize) }
        }
    }

    fn v6(ip: &IpAddr) -> Ipv6Addr {
        match ip {
            IpAddr::V6(a) => *a,
            IpAddr::V4(a) => a.to_ipv6_mapped(),
        }
    }

    fn v4(ip: &IpAddr) -> Ipv4Addr {
        match ip {
            IpAddr::V4(a) => *a,
            IpAddr::V6(a) => a.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
        }
    }

    /// An IPv6 routing header through `route` (first hop first). Type 4 (segment routing):
    /// segments are listed last hop first, and segment 0, the final destination, is filled in
    /// by the kernel with the socket's destination. Types 0 and 2 list the route in order.
    pub fn routing_header(ty: u8, route: &[Ipv6Addr]) -> Vec<u8> {
        let mut h = Vec::new();
        match ty {
            4 => {
                let mut segs = vec![Ipv6Addr::UNSPECIFIED];
                segs.extend(route.iter().rev());
                let n = segs.len() as u8;
                // next header, length (8-octet units after the first 8), type, segments left,
                // last entry, flags, tag.
                h.extend_from_slice(&[0, 2 * n, 4, n - 1, n - 1, 0, 0, 0]);
                for s in segs {
                    h.extend_from_slice(&s.octets());
                }
            }
            _ => {
                let n = route.len() as u8;
                h.extend_from_slice(&[0, 2 * n, ty, n, 0, 0, 0, 0]);
                for s in route {
                    h.extend_from_slice(&s.octets());
                }
            }
        }
        h
    }

    /// IPv4 options: a loose (0x83) or strict (0x89) source route, or record route (0x07),
    /// through `route`, padded with end-of-list to a multiple of 4.
    pub fn ip_route_option(kind: u8, route: &[Ipv4Addr]) -> Vec<u8> {
        let mut o = vec![kind, (3 + 4 * route.len()) as u8, 4];
        for a in route {
            o.extend_from_slice(&a.octets());
        }
        while o.len() % 4 != 0 {
            o.push(0);
        }
        o
    }

    fn echo(s: &mut TcpStream, line: &str) -> io::Result<String> {
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(format!("{line}\n").as_bytes())?;
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

    /// An IPv6 routing header on a UDP or TCP socket to `addr`: set with setsockopt (before
    /// connecting, or on an established TCP connection with `when: after`), given per datagram
    /// as a control message (`cmsg`, `cmsg2292`), or through `IPV6_2292PKTOPTIONS`.
    fn rthdr(req: &Value) -> Value {
        let a = addr(req, "addr");
        let route: Vec<Ipv6Addr> = ips(req, "route").iter().map(v6).collect();
        let ty = req["rh_type"].as_u64().unwrap_or(4) as u8;
        let rh = routing_header(ty, &route);
        let via = req["via"].as_str().unwrap_or("setsockopt");
        let tcp = req["proto"] == "tcp";
        let s = match Socket::new(
            Domain::IPV6,
            if tcp { Type::STREAM } else { Type::DGRAM },
            None,
        ) {
            Ok(s) => s,
            Err(e) => return json!({"ok": false, "stage": "socket", "errno": errno(&e)}),
        };
        let fd = s.as_raw_fd();
        let set = || match via {
            // A destination options header (one PadN option): routes nowhere.
            "dstopts" => setsockopt_bytes(
                fd,
                libc::IPPROTO_IPV6,
                IPV6_DSTOPTS,
                &[0, 0, 1, 4, 0, 0, 0, 0],
            ),
            "pktoptions" => {
                // One cmsghdr holding the routing header (the RFC 2292 sticky interface).
                let mut b = Vec::new();
                let len = mem::size_of::<libc::cmsghdr>() + rh.len();
                b.extend_from_slice(&len.to_ne_bytes());
                b.extend_from_slice(&libc::IPPROTO_IPV6.to_ne_bytes());
                b.extend_from_slice(&IPV6_RTHDR.to_ne_bytes());
                b.extend_from_slice(&rh);
                setsockopt_bytes(fd, libc::IPPROTO_IPV6, IPV6_2292PKTOPTIONS, &b)
            }
            _ => setsockopt_bytes(fd, libc::IPPROTO_IPV6, IPV6_RTHDR, &rh),
        };
        let mut out = json!({"ok": true});
        let after = req["when"] == "after";
        if !after && matches!(via, "setsockopt" | "pktoptions" | "dstopts") {
            out["setsockopt_errno"] = json!(code(&set()));
        }
        let to = SockAddr::from(a);
        if tcp {
            let r = s.connect_timeout(&to, TIMEOUT);
            out["connect_errno"] = json!(code(&r));
            if r.is_err() {
                return out;
            }
            let mut t: TcpStream = s.into();
            out["echo_before"] = json!(echo(&mut t, "before").unwrap_or_default());
            if after {
                out["setsockopt_errno"] = json!(code(&set()));
                let r = echo(&mut t, "after");
                out["echo_after_errno"] = json!(code(&r));
                out["echo_after"] = json!(r.unwrap_or_default());
            }
            return out;
        }
        let cmsg = match via {
            "cmsg" => Some((libc::IPPROTO_IPV6, IPV6_RTHDR, rh.as_slice())),
            "cmsg2292" => Some((libc::IPPROTO_IPV6, IPV6_2292RTHDR, rh.as_slice())),
            _ => None,
        };
        out["send_errno"] = json!(code(&sendmsg_cmsg(fd, &to, b"rthdr", cmsg, 0)));
        out
    }

    /// IPv4 options (`kind`: lsrr, ssrr, rr) through `route` on a socket sending to `addr`:
    /// UDP (`udp`), UDP on an AF_INET6 socket to the v4-mapped address (`udp6`), TCP, or a
    /// ping socket; set with setsockopt (before connecting, or on an established TCP
    /// connection with `when: after`) or given per datagram (`IP_RETOPTS`).
    fn ipopts(req: &Value) -> Value {
        let a = addr(req, "addr");
        let route: Vec<Ipv4Addr> = ips(req, "route").iter().map(v4).collect();
        let kind = match req["kind"].as_str().unwrap_or("lsrr") {
            "ssrr" => 0x89,
            "rr" => 0x07,
            _ => 0x83,
        };
        let opt = ip_route_option(kind, &route);
        let cmsg = req["via"] == "cmsg";
        let proto = req["proto"].as_str().unwrap_or("udp");
        let (domain, ty, p, to) = match proto {
            "tcp" => (Domain::IPV4, Type::STREAM, None, SockAddr::from(a)),
            "udp6" => (
                Domain::IPV6,
                Type::DGRAM,
                None,
                SockAddr::from(SocketAddr::new(IpAddr::V6(v6(&a.ip())), a.port())),
            ),
            "ping" => (
                Domain::IPV4,
                Type::DGRAM,
                Some(Protocol::ICMPV4),
                SockAddr::from(a),
            ),
            _ => (Domain::IPV4, Type::DGRAM, None, SockAddr::from(a)),
        };
        let s = match Socket::new(domain, ty, p) {
            Ok(s) => s,
            Err(e) => return json!({"ok": false, "stage": "socket", "errno": errno(&e)}),
        };
        let fd = s.as_raw_fd();
        let mut out = json!({"ok": true});
        if !cmsg && req["when"] != "after" {
            out["setsockopt_errno"] = json!(code(&setsockopt_bytes(
                fd,
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                &opt
            )));
        }
        if proto == "tcp" {
            let r = s.connect_timeout(&to, TIMEOUT);
            out["connect_errno"] = json!(code(&r));
            if r.is_err() || req["when"] != "after" {
                return out;
            }
            // On an established connection: the option would route its next segments.
            let mut t: TcpStream = s.into();
            out["echo_before"] = json!(echo(&mut t, "before").unwrap_or_default());
            out["setsockopt_errno"] = json!(code(&setsockopt_bytes(
                t.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                &opt
            )));
            let r = echo(&mut t, "after");
            out["echo_after_errno"] = json!(code(&r));
            out["echo_after"] = json!(r.unwrap_or_default());
            return out;
        }
        let data: &[u8] = if proto == "ping" {
            &[8, 0, 0, 0, 0, 0, 0, 1, b'p', b't']
        } else {
            b"ipopts"
        };
        let c = cmsg.then_some((libc::IPPROTO_IP, libc::IP_RETOPTS, opt.as_slice()));
        out["send_errno"] = json!(code(&sendmsg_cmsg(fd, &to, data, c, 0)));
        out
    }

    /// The one's-complement sum for an IPv4 header checksum.
    fn checksum(b: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A packet whose headers the workload writes itself (`IP_HDRINCL` / `IPV6_HDRINCL`, with
    /// `CAP_NET_RAW`): sent to `to` with `dst` in the header, and IPv4 options (`ip_options`:
    /// an LSRR through `route`) or an IPv6 routing header (type 4 through `route`). The payload
    /// is a UDP datagram to port 8080.
    fn raw_hdrincl(req: &Value) -> Value {
        let to = addr(req, "to");
        let dst: IpAddr = req["dst"]
            .as_str()
            .and_then(|d| d.parse().ok())
            .unwrap_or(to.ip());
        let route = ips(req, "route");
        let mut udp = vec![0x9c, 0x40, 0x1f, 0x90, 0, 11, 0, 0];
        udp.extend_from_slice(b"raw");
        let (domain, pkt) = match dst {
            IpAddr::V4(d) => {
                let opts = if route.is_empty() {
                    Vec::new()
                } else {
                    let r: Vec<Ipv4Addr> = route.iter().map(v4).collect();
                    ip_route_option(0x83, &r)
                };
                let ihl = (20 + opts.len()) / 4;
                let total = 20 + opts.len() + udp.len();
                let mut h = vec![0x40 | ihl as u8, 0];
                h.extend_from_slice(&(total as u16).to_be_bytes());
                h.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
                h.extend_from_slice(&Ipv4Addr::new(192, 0, 2, 1).octets());
                h.extend_from_slice(&d.octets());
                h.extend_from_slice(&opts);
                let ck = checksum(&h);
                h[10..12].copy_from_slice(&ck.to_be_bytes());
                h.extend_from_slice(&udp);
                (Domain::IPV4, h)
            }
            IpAddr::V6(d) => {
                let r: Vec<Ipv6Addr> = route.iter().map(v6).collect();
                let mut ext = Vec::new();
                let mut next = 17u8;
                if !r.is_empty() {
                    let mut segs = vec![d];
                    segs.extend(r.iter().rev());
                    let n = segs.len() as u8;
                    ext.extend_from_slice(&[17, 2 * n, 4, n - 1, n - 1, 0, 0, 0]);
                    for s in segs {
                        ext.extend_from_slice(&s.octets());
                    }
                    next = 43;
                }
                // The wire destination is the first hop when there is a route.
                let wire = r.first().copied().unwrap_or(d);
                let mut h = vec![0x60, 0, 0, 0];
                h.extend_from_slice(&((ext.len() + udp.len()) as u16).to_be_bytes());
                h.extend_from_slice(&[next, 64]);
                h.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
                h.extend_from_slice(&wire.octets());
                h.extend_from_slice(&ext);
                h.extend_from_slice(&udp);
                (Domain::IPV6, h)
            }
        };
        let s = match Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW))) {
            Ok(s) => s,
            Err(e) => return json!({"ok": false, "stage": "socket", "errno": errno(&e)}),
        };
        if domain == Domain::IPV6
            && let Err(e) = setsockopt_int(s.as_raw_fd(), libc::IPPROTO_IPV6, IPV6_HDRINCL, 1)
        {
            return json!({"ok": false, "stage": "hdrincl", "errno": errno(&e)});
        }
        let to = match to {
            SocketAddr::V4(a) => SockAddr::from(SocketAddr::new(IpAddr::V4(*a.ip()), 0)),
            SocketAddr::V6(a) => SockAddr::from(SocketAddr::new(IpAddr::V6(*a.ip()), 0)),
        };
        json!({"ok": true, "send_errno": code(&sendmsg_cmsg(s.as_raw_fd(), &to, &pkt, None, 0))})
    }

    /// Source routes set *before* the agent attached: a UDP and a TCP socket with an IPv6
    /// routing header, a UDP socket with an IPv4 LSRR (root: CAP_NET_RAW). Stage 1 reports
    /// the setsockopt results; after the go-ahead they send and connect.
    fn sticky(req: &Value) -> Value {
        let route6: Vec<Ipv6Addr> = ips(req, "route6").iter().map(v6).collect();
        let route4: Vec<Ipv4Addr> = ips(req, "route4").iter().map(v4).collect();
        let (a6, a4) = (addr(req, "addr6"), addr(req, "addr4"));
        let rh = routing_header(4, &route6);
        let mk = |d, t| Socket::new(d, t, None);
        let (Ok(u6), Ok(t6), Ok(u4)) = (
            mk(Domain::IPV6, Type::DGRAM),
            mk(Domain::IPV6, Type::STREAM),
            mk(Domain::IPV4, Type::DGRAM),
        ) else {
            return json!({"ok": false, "stage": "socket"});
        };
        stage(json!({
            "udp6": code(&setsockopt_bytes(u6.as_raw_fd(), libc::IPPROTO_IPV6, IPV6_RTHDR, &rh)),
            "tcp6": code(&setsockopt_bytes(t6.as_raw_fd(), libc::IPPROTO_IPV6, IPV6_RTHDR, &rh)),
            "udp4": code(&setsockopt_bytes(
                u4.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                &ip_route_option(0x83, &route4)
            )),
        }));
        json!({
            "ok": true,
            "udp6_send_errno": code(&u6.send_to(b"sticky", &SockAddr::from(a6))),
            "udp4_send_errno": code(&u4.send_to(b"sticky", &SockAddr::from(a4))),
            "tcp6_connect_errno": code(&t6.connect_timeout(&SockAddr::from(a6), TIMEOUT)),
        })
    }

    /// `struct mptcp_info`'s first bytes: subflows, add_addr_signal, add_addr_accepted.
    fn mptcp_info(fd: RawFd) -> (u8, u8) {
        let mut b = [0u8; 64];
        let mut len = b.len() as u32;
        // SAFETY: a live buffer of `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                SOL_MPTCP,
                MPTCP_INFO,
                b.as_mut_ptr() as *mut libc::c_void,
                &mut len,
            )
        };
        if rc != 0 { (0, 0) } else { (b[0], b[2]) }
    }

    /// An MPTCP client (no privilege needed): connects to `addr`, reports (stage), then after
    /// the go-ahead sends data for a while so the kernel can open the subflows the server
    /// announces: until it has `want` extra subflows (and 1 s more), or `seconds` passed.
    /// (`add_addr_accepted` counts only announcements that led to a subflow: the kernel takes
    /// back the count when every subflow connect failed.)
    fn mptcp(req: &Value) -> Value {
        let a = addr(req, "addr");
        let want = req["want"].as_u64().unwrap_or(1) as u8;
        let seconds = req["seconds"].as_u64().unwrap_or(10);
        let s = match Socket::new(
            Domain::for_address(a),
            Type::STREAM,
            Some(Protocol::from(IPPROTO_MPTCP)),
        ) {
            Ok(s) => s,
            Err(e) => return json!({"ok": false, "stage": "socket", "errno": errno(&e)}),
        };
        if let Err(e) = s.connect_timeout(&SockAddr::from(a), TIMEOUT) {
            return json!({"ok": false, "stage": "connect", "errno": errno(&e)});
        }
        let fd = s.as_raw_fd();
        let mut t: TcpStream = s.into();
        let _ = t.set_write_timeout(Some(TIMEOUT));
        let chunk = vec![b'm'; 16 * 1024];
        let _ = t.write_all(&chunk);
        stage(json!({"stage": "connected", "info": mptcp_info(fd)}));
        let start = Instant::now();
        let mut accepted_at = None;
        let mut sent = chunk.len();
        while start.elapsed() < Duration::from_secs(seconds) {
            match t.write_all(&chunk) {
                Ok(()) => sent += chunk.len(),
                Err(e) => return json!({"ok": false, "stage": "write", "errno": errno(&e)}),
            }
            std::thread::sleep(Duration::from_millis(20));
            let (subflows, _) = mptcp_info(fd);
            if subflows >= want && accepted_at.is_none() {
                accepted_at = Some(Instant::now());
            }
            if accepted_at.is_some_and(|at| at.elapsed() > Duration::from_secs(1)) {
                break;
            }
        }
        let (subflows, accepted) = mptcp_info(fd);
        json!({"ok": true, "subflows": subflows, "add_addr_accepted": accepted, "sent": sent})
    }

    fn ifindex(name: &str) -> u32 {
        let c = std::ffi::CString::new(name).unwrap();
        // SAFETY: a valid C string.
        unsafe { libc::if_nametoindex(c.as_ptr()) }
    }

    /// Options and flags that do not change the destination (as nobody): packet info (sticky
    /// and per datagram), `IPV6_NEXTHOP`, `SO_BINDTODEVICE`, multicast, broadcast,
    /// `MSG_CONFIRM`. Each sends a UDP datagram (or connects TCP) to `denied` and, where it
    /// should work, to `allowed` (v4 or v6 by the addresses given).
    fn misc(req: &Value) -> Value {
        let (d4, a4) = (addr(req, "denied4"), addr(req, "allowed4"));
        let (d6, a6) = (addr(req, "denied6"), addr(req, "allowed6"));
        let eth0 = ifindex("eth0");
        let udp = |d| Socket::new(d, Type::DGRAM, None).expect("udp socket");
        let mut out = json!({"ok": true});
        // IP_PKTINFO per datagram: an interface and a source address.
        let pi4 = |dst: &SocketAddr| {
            let s = udp(Domain::IPV4);
            let mut p = [0u8; 12];
            p[0..4].copy_from_slice(&(eth0 as i32).to_ne_bytes());
            p[4..8].copy_from_slice(&[192, 0, 2, 1]);
            code(&sendmsg_cmsg(
                s.as_raw_fd(),
                &SockAddr::from(*dst),
                b"pktinfo",
                Some((libc::IPPROTO_IP, libc::IP_PKTINFO, &p)),
                0,
            ))
        };
        out["ip_pktinfo_denied"] = json!(pi4(&d4));
        out["ip_pktinfo_allowed"] = json!(pi4(&a4));
        // IPV6_PKTINFO per datagram and sticky.
        let pi6 = |dst: &SocketAddr, sticky: bool| {
            let s = udp(Domain::IPV6);
            let mut p = [0u8; 20];
            p[0..16].copy_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
            p[16..20].copy_from_slice(&eth0.to_ne_bytes());
            if sticky {
                if let Err(e) =
                    setsockopt_bytes(s.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &p)
                {
                    return -errno(&e);
                }
                return code(&s.send_to(b"pktinfo", &SockAddr::from(*dst)));
            }
            code(&sendmsg_cmsg(
                s.as_raw_fd(),
                &SockAddr::from(*dst),
                b"pktinfo",
                Some((libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &p)),
                0,
            ))
        };
        out["ipv6_pktinfo_denied"] = json!(pi6(&d6, false));
        out["ipv6_pktinfo_allowed"] = json!(pi6(&a6, false));
        out["ipv6_pktinfo_sticky_denied"] = json!(pi6(&d6, true));
        // IPV6_NEXTHOP: the denied host as next hop for an allowed destination.
        {
            let s = udp(Domain::IPV6);
            let nh = SockAddr::from(d6);
            // SAFETY: the sockaddr's bytes, of its length.
            let bytes =
                unsafe { std::slice::from_raw_parts(nh.as_ptr() as *const u8, nh.len() as usize) };
            out["ipv6_nexthop_cmsg"] = json!(code(&sendmsg_cmsg(
                s.as_raw_fd(),
                &SockAddr::from(a6),
                b"nexthop",
                Some((libc::IPPROTO_IPV6, IPV6_NEXTHOP, bytes)),
                0
            )));
            out["ipv6_nexthop_setsockopt"] = json!(code(&setsockopt_bytes(
                s.as_raw_fd(),
                libc::IPPROTO_IPV6,
                IPV6_NEXTHOP,
                bytes
            )));
        }
        // SO_BINDTODEVICE (unprivileged for the first binding since Linux 5.7).
        for dev in ["eth0", "lo"] {
            let s = udp(Domain::IPV4);
            let b = s.bind_device(Some(dev.as_bytes()));
            out[format!("bind_{dev}")] = json!(code(&b));
            out[format!("bind_{dev}_udp_denied")] =
                json!(code(&s.send_to(b"bound", &SockAddr::from(d4))));
            let t = Socket::new(Domain::IPV4, Type::STREAM, None).expect("tcp socket");
            let _ = t.bind_device(Some(dev.as_bytes()));
            out[format!("bind_{dev}_tcp_denied")] =
                json!(code(&t.connect_timeout(&SockAddr::from(d4), TIMEOUT)));
        }
        // Multicast and broadcast destinations.
        let to = |s: &Socket, a: &str| {
            code(&s.send_to(b"many", &SockAddr::from(a.parse::<SocketAddr>().unwrap())))
        };
        let s = udp(Domain::IPV4);
        let _ = s.set_broadcast(true);
        out["multicast4"] = json!(to(&s, "224.0.0.251:5353"));
        out["broadcast_limited"] = json!(to(&s, "255.255.255.255:8080"));
        out["broadcast_subnet"] = json!(to(&s, "192.0.2.255:8080"));
        let s = udp(Domain::IPV6);
        let _ = s.set_multicast_if_v6(eth0);
        out["multicast6"] = json!(to(&s, &format!("[ff02::1%{eth0}]:8080")));
        out["multicast6_site"] = json!(to(&s, "[ff05::1:3]:547"));
        // MSG_CONFIRM (neighbour confirmation) changes nothing about the destination.
        let s = udp(Domain::IPV4);
        out["confirm_denied"] = json!(code(&sendmsg_cmsg(
            s.as_raw_fd(),
            &SockAddr::from(d4),
            b"confirm",
            None,
            libc::MSG_CONFIRM
        )));
        out["confirm_allowed"] = json!(code(&sendmsg_cmsg(
            s.as_raw_fd(),
            &SockAddr::from(a4),
            b"confirm",
            None,
            libc::MSG_CONFIRM
        )));
        out
    }

    /// As nobody: an XFRM (IPsec) policy on a workload socket; then a new user and network
    /// namespace (`unshare -Urn`, allowed to unprivileged users here), where the workload
    /// is root: a VXLAN tunnel to `denied` with traffic sent into it, a veth whose peer it
    /// tries to move into the workload's network namespace, and a VXLAN created right in it.
    fn userns(req: &Value) -> Value {
        let denied = addr(req, "denied4").ip();
        let s = Socket::new(Domain::IPV4, Type::DGRAM, None).expect("udp socket");
        // struct xfrm_userpolicy_info: any bytes; the capability check comes first.
        let pol = [0u8; 168];
        let mut out = json!({"ok": true,
            "xfrm_policy_errno": code(&setsockopt_bytes(s.as_raw_fd(), libc::IPPROTO_IP, IP_XFRM_POLICY, &pol))});
        let me = std::process::id();
        let script = format!(
            "ip link add vx0 type vxlan id 42 remote {denied} dstport 4789 && \
             ip addr add 10.99.0.1/24 dev vx0 && ip link set vx0 up && ip link set lo up && \
             echo vxlan_up=ok; \
             for i in 1 2 3; do echo x > /dev/udp/10.99.0.2/9; done 2>/dev/null; \
             echo sent=$?; \
             ip link add v0 type veth peer name v1 && echo veth=ok; \
             ip link set v1 netns {me} 2>&1 | tr -d '\\n'; echo ' move_rc='${{PIPESTATUS[0]}}; \
             ip link add vx1 netns {me} type vxlan id 43 remote {denied} dstport 4789 2>&1 | tr -d '\\n'; \
             echo ' create_in_rc='${{PIPESTATUS[0]}}"
        );
        match std::process::Command::new("unshare")
            .args(["-Urn", "bash", "-c", &script])
            .output()
        {
            Ok(o) => {
                out["userns_status"] = json!(o.status.code());
                out["userns_out"] = json!(String::from_utf8_lossy(&o.stdout));
                out["userns_err"] = json!(String::from_utf8_lossy(&o.stderr));
            }
            Err(e) => out["userns_errno"] = json!(errno(&e)),
        }
        out
    }

    /// socket() for other families and protocols (as nobody).
    fn families() -> Value {
        let sock = |d: i32, t: i32, p: i32| {
            // SAFETY: plain syscall; the fd is closed right away.
            let fd = unsafe { libc::socket(d, t, p) };
            if fd < 0 {
                errno(&last())
            } else {
                // SAFETY: our fd.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
                0
            }
        };
        json!({
            "ok": true,
            "sctp_stream": sock(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP),
            "sctp_seqpacket": sock(libc::AF_INET6, libc::SOCK_SEQPACKET, libc::IPPROTO_SCTP),
            "vsock": sock(libc::AF_VSOCK, libc::SOCK_STREAM, 0),
            "rds": sock(libc::AF_RDS, libc::SOCK_SEQPACKET, 0),
            "tipc": sock(libc::AF_TIPC, libc::SOCK_RDM, 0),
            "xdp": sock(libc::AF_XDP, libc::SOCK_RAW, 0),
            "packet": sock(libc::AF_PACKET, libc::SOCK_RAW, 0),
            "udplite": sock(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE),
            "mptcp": sock(libc::AF_INET, libc::SOCK_STREAM, IPPROTO_MPTCP),
        })
    }

    /// `setsockopt` through the 32-bit system call entry (`int 0x80`, i386 number 366), which a
    /// 64-bit process can use where the kernel has IA32 emulation: the kernel runs no cgroup
    /// setsockopt program for compat calls (`do_sock_setsockopt`: `if (!compat)`). The value
    /// lives below 4 GiB (`MAP_32BIT`), as a 32-bit pointer requires.
    #[cfg(target_arch = "x86_64")]
    fn compat_setsockopt(fd: RawFd, level: i32, name: i32, val: &[u8]) -> io::Result<()> {
        // SAFETY: an anonymous private mapping, written before the call and unmapped after.
        unsafe {
            let len = 4096;
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
                -1,
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(last());
            }
            std::ptr::copy_nonoverlapping(val.as_ptr(), p as *mut u8, val.len().min(len));
            let ret: i32;
            // rbx cannot be an asm operand (LLVM reserves it): saved and loaded by hand. The
            // compat entry clobbers r8-r11.
            std::arch::asm!(
                "push rbx",
                "mov ebx, {fd:e}",
                "int 0x80",
                "pop rbx",
                fd = in(reg) fd,
                inlateout("eax") 366i32 => ret,
                in("ecx") level,
                in("edx") name,
                in("esi") p as u32,
                in("edi") val.len() as u32,
                lateout("r8") _,
                lateout("r9") _,
                lateout("r10") _,
                lateout("r11") _,
            );
            libc::munmap(p, len);
            if ret < 0 {
                Err(io::Error::from_raw_os_error(-ret))
            } else {
                Ok(())
            }
        }
    }

    /// A routing header (and, with `CAP_NET_RAW`, an LSRR) set through the 32-bit entry, which
    /// no setsockopt program sees; then a UDP send and a TCP connect to `addr6` / `addr4`.
    #[cfg(target_arch = "x86_64")]
    fn compat(req: &Value) -> Value {
        let route6: Vec<Ipv6Addr> = ips(req, "route6").iter().map(v6).collect();
        let route4: Vec<Ipv4Addr> = ips(req, "route4").iter().map(v4).collect();
        let (a6, a4) = (addr(req, "addr6"), addr(req, "addr4"));
        let rh = routing_header(4, &route6);
        let mk = |d, t| Socket::new(d, t, None);
        let (Ok(u6), Ok(t6), Ok(u4)) = (
            mk(Domain::IPV6, Type::DGRAM),
            mk(Domain::IPV6, Type::STREAM),
            mk(Domain::IPV4, Type::DGRAM),
        ) else {
            return json!({"ok": false, "stage": "socket"});
        };
        let opt4 = ip_route_option(0x83, &route4);
        json!({
            "ok": true,
            "udp6_setsockopt_errno": code(&compat_setsockopt(u6.as_raw_fd(), libc::IPPROTO_IPV6, IPV6_RTHDR, &rh)),
            "tcp6_setsockopt_errno": code(&compat_setsockopt(t6.as_raw_fd(), libc::IPPROTO_IPV6, IPV6_RTHDR, &rh)),
            "udp4_setsockopt_errno": code(&compat_setsockopt(u4.as_raw_fd(), libc::IPPROTO_IP, libc::IP_OPTIONS, &opt4)),
            "udp6_send_errno": code(&u6.send_to(b"compat", &SockAddr::from(a6))),
            "udp4_send_errno": code(&u4.send_to(b"compat", &SockAddr::from(a4))),
            "tcp6_connect_errno": code(&t6.connect_timeout(&SockAddr::from(a6), TIMEOUT)),
        })
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn compat(_req: &Value) -> Value {
        json!({"ok": false, "stage": "arch", "error": "the 32-bit entry is tested on x86_64 only"})
    }

    /// An ICMPv6 echo request from a ping socket (`SOCK_DGRAM`/`IPPROTO_ICMPV6`) to `addr`.
    fn ping6(req: &Value) -> Value {
        let a = addr(req, "addr");
        let s = match Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::ICMPV6)) {
            Ok(s) => s,
            Err(e) => return json!({"ok": false, "stage": "socket", "errno": errno(&e)}),
        };
        let echo = [128u8, 0, 0, 0, 0, 0, 0, 1, b'p', b't'];
        let to = SockAddr::from(SocketAddr::new(a.ip(), 0));
        let sent = s.send_to(&echo, &to);
        json!({"ok": true, "sendto_errno": code(&sent), "connect_errno": code(&s.connect(&to))})
    }
}

// -------------------------------------------------------------------------- the test world

/// Allowed: 198.51.100.0/24 and 2001:db8:100::/40 at ports 8080 and 9090, the hosts
/// 198.51.100.10 and 2001:db8:100::10 at every port (port-less: what raw and ping packets
/// need), and the name allowed.test at 443 (so TCP to any other address at 443 goes to the
/// proxy: a Domain-only destination). Everything else is denied; the denied test hosts are
/// 203.0.113.9 and 2001:db8:200::9.
fn policy(mode: &str) -> String {
    let matches: &[&str] = if mode == "Matched" {
        &[
            "{type: CIDR, value: 198.51.100.0/24, port: 8080}",
            "{type: CIDR, value: \"2001:db8:100::/40\", port: 8080}",
            "{type: CIDR, value: 198.51.100.0/24, port: 9090}",
            "{type: CIDR, value: \"2001:db8:100::/40\", port: 9090}",
            "{type: IP, value: 198.51.100.10}",
            "{type: IP, value: \"2001:db8:100::10\"}",
            // Makes every other address at 443 a Domain-only destination: TCP there is
            // redirected to the proxy (not refused), UDP refused.
            "{type: Domain, value: allowed.test, port: 443, protocol: tls}",
        ]
    } else {
        &[]
    };
    passthrough_tests::mesh_policy("reroute", mode, matches)
}

const ALLOWED4: &str = "198.51.100.9:8080";
const ALLOWED6: &str = "[2001:db8:100::9]:8080";
const DENIED4: &str = "203.0.113.9";
const DENIED6: &str = "2001:db8:200::9";
/// The denied hosts at the Domain match's port: TCP there is redirected to the proxy.
const DOMAIN_ONLY4: &str = "203.0.113.9:443";
const DOMAIN_ONLY6: &str = "[2001:db8:200::9]:443";
const LOOPBACK4: &str = "127.0.0.1:7777";
const LOOPBACK6: &str = "[::1]:7777";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A test world (agent, test hosts, workload cgroup) with the denied hosts' packet log.
struct Reroute {
    /// Dropped first: its packet socket must not outlive the test hosts' namespace.
    log: Sniffer,
    w: World,
}

impl Reroute {
    /// In mode `Matched` the agent also gets a pod proxy address (`--proxy-addr`), so that TCP
    /// to a Domain-only destination from the workload's own netns is redirected rather than
    /// refused. It is a host loopback address: from the workload's netns the redirected
    /// connect finds nothing there (`ECONNREFUSED`), which is enough to tell a redirect from a
    /// refusal; the proxy itself is tested elsewhere.
    fn new(mode: &str) -> Reroute {
        if mode != "Matched" {
            return Self::with(mode, |b| b);
        }
        let port = free_loopback_port();
        Self::with(mode, |b| {
            b.arg("--proxy-addr")
                .arg(&format!("127.0.0.2:{port}"))
                .arg("--proxy-addr")
                .arg(&format!("[::1]:{port}"))
        })
    }

    fn with(
        mode: &str,
        f: impl FnOnce(passthrough_tests::AgentBuilder) -> passthrough_tests::AgentBuilder,
    ) -> Reroute {
        let w = World::with(&policy(mode), f);
        let log = Sniffer::start(w.net.server_ns(), "eth0").unwrap();
        Reroute { w, log }
    }

    fn helper(&self, req: Value) -> Value {
        helper(self.w.cg.path(), &self.w.net.client_ns_path(), req)
    }

    /// No packet reached the denied hosts (waiting a little for stragglers).
    fn nothing_denied(&self, what: &str) {
        std::thread::sleep(Duration::from_millis(200));
        for d in [DENIED4, DENIED6] {
            let got = self.log.to(ip(d));
            assert!(
                got.is_empty(),
                "{what}: packets reached the denied host {d}: {got:?}"
            );
        }
    }

    /// Waits for a denial event whose log line contains every one of `parts`.
    fn logged(&self, parts: &[&str]) -> bool {
        (0..150).any(|_| {
            let hit = self
                .w
                .agent
                .log()
                .lines()
                .any(|l| parts.iter().all(|p| l.contains(p)));
            if !hit {
                std::thread::sleep(Duration::from_millis(20));
            }
            hit
        })
    }
}

/// A port free on both 127.0.0.2 and [::1] of the host netns (for the pod proxy address).
fn free_loopback_port() -> u16 {
    for _ in 0..50 {
        let l4 = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let port = l4.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.2 and [::1]");
}

/// What a socket whose source route was refused does next, judged as if it had none: in
/// mode `None` only loopback works; in `Matched`, TCP to a Domain-only destination is
/// redirected to the proxy (not refused: here it finds no proxy in the workload's netns).
fn expect_unrouted(mode: &str, proto: &str, to: &str, r: &Value) {
    let tcp = proto == "tcp";
    let got = errno_of(r, if tcp { "connect_errno" } else { "send_errno" });
    let what = format!("{mode} {proto} {to}: {r}");
    let eperm = i64::from(EPERM);
    if to == LOOPBACK4 || to == LOOPBACK6 {
        assert_eq!(got, 0, "{what}");
    } else if mode == "None" {
        assert_eq!(got, eperm, "{what}");
    } else if to == DOMAIN_ONLY4 || to == DOMAIN_ONLY6 {
        if tcp {
            assert_ne!(got, eperm, "redirected, not refused: {what}");
        } else {
            assert_eq!(got, eperm, "a Domain match never covers UDP: {what}");
        }
    } else {
        assert_eq!(got, 0, "{what}");
    }
}

fn errno_of(r: &Value, key: &str) -> i64 {
    r[key]
        .as_i64()
        .unwrap_or_else(|| panic!("no {key} in helper result {r}"))
}

// ---------------------------------------------------------------- IPv6 routing headers

/// The attack of issue 16 point 1, with no privilege: a routing header naming the denied host
/// on sockets that send to, or connect to, an allowed address, loopback or a Domain-only
/// destination, set before connecting or on an established connection. In mode `All` it
/// works (the packets' wire destination is the denied host: positive control); in `Matched`
/// and `None` the setsockopt fails with EPERM, the socket keeps working without it, and no
/// packet reaches the denied host.
#[test]
fn ipv6_routing_headers_are_refused_outside_mode_all() {
    if !require_kernel() {
        return;
    }
    // Positive control: mode All lets the option through and the kernel does reroute.
    let all = Reroute::new("All");
    let r = all.helper(json!({"op": "rthdr", "proto": "udp", "addr": ALLOWED6,
        "route": [DENIED6], "as_nobody": true}));
    assert_eq!(
        (errno_of(&r, "setsockopt_errno"), errno_of(&r, "send_errno")),
        (0, 0),
        "{r}"
    );
    assert!(
        all.log.wait_to(ip(DENIED6), 1, Duration::from_secs(2)) >= 1,
        "the routing header did not reroute in mode All, so this test proves nothing: {:?}",
        all.log.packets()
    );
    assert!(
        all.log.to(ip(DENIED6)).iter().all(|p| p.next == 43),
        "{:?}",
        all.log.packets()
    );
    drop(all);

    for mode in ["Matched", "None"] {
        let w = Reroute::new(mode);
        for (proto, to) in [
            ("udp", ALLOWED6),
            ("tcp", ALLOWED6),
            ("udp", LOOPBACK6),
            ("tcp", LOOPBACK6),
            ("tcp", DOMAIN_ONLY6),
        ] {
            for (ty, via) in [(4, "setsockopt"), (0, "setsockopt"), (4, "pktoptions")] {
                let r = w.helper(
                    json!({"op": "rthdr", "proto": proto, "addr": to, "rh_type": ty,
                    "via": via, "route": [DENIED6], "as_nobody": true}),
                );
                assert_eq!(
                    errno_of(&r, "setsockopt_errno"),
                    i64::from(EPERM),
                    "{mode} {proto} {to} type {ty} {via}: {r}"
                );
                // Without the option the socket is judged as usual.
                expect_unrouted(mode, proto, to, &r);
            }
        }
        // On an established connection (allowed, or to loopback in mode None): refused, the
        // connection goes on unrouted.
        let to = if mode == "None" { LOOPBACK6 } else { ALLOWED6 };
        let r = w.helper(
            json!({"op": "rthdr", "proto": "tcp", "addr": to, "when": "after",
            "route": [DENIED6], "as_nobody": true}),
        );
        assert_eq!(r["echo_before"], "before", "{mode} {to}: {r}");
        assert_eq!(
            errno_of(&r, "setsockopt_errno"),
            i64::from(EPERM),
            "{mode} {to}: {r}"
        );
        assert_eq!(r["echo_after"], "after", "{mode} {to}: {r}");
        // Options that do not route are left alone (destination options need CAP_NET_RAW):
        // accepted, and the datagram arrives with the header.
        if mode == "Matched" {
            let allowed = ip("2001:db8:100::9");
            let before = w.log.to(allowed).len();
            let r = w
                .helper(json!({"op": "rthdr", "proto": "udp", "addr": ALLOWED6, "via": "dstopts"}));
            assert_eq!(
                (errno_of(&r, "setsockopt_errno"), errno_of(&r, "send_errno")),
                (0, 0),
                "{r}"
            );
            assert!(w.log.wait_to(allowed, before + 1, Duration::from_secs(2)) > before);
            assert!(
                w.log.to(allowed).iter().any(|p| p.next == 60),
                "{:?}",
                w.log.packets()
            );
        }
        w.nothing_denied(mode);
        assert!(
            w.logged(&["reason=\"source_route\"", DENIED6]),
            "a source_route denial naming the first hop:\n{}",
            w.w.agent.log()
        );
    }
}

/// Per datagram (a control message, no privilege) this kernel itself refuses every routing
/// header: type 4 is not accepted in control messages, type 2 needs `CONFIG_IPV6_MIP6`
/// (EINVAL, nothing sent). On kernels with MIP6 (most distributions), a type 2 header passes
/// the kernel and the egress backstop drops the packet (EPERM): the routing-header walk of
/// `raw_packets_with_source_routes_are_dropped` and `source_routes_set_before_the_agent_…`.
#[test]
fn routing_headers_per_datagram_are_refused() {
    if !require_kernel() {
        return;
    }
    for (mode, to) in [("Matched", ALLOWED6), ("None", LOOPBACK6)] {
        let w = Reroute::new(mode);
        for (ty, via) in [(4, "cmsg"), (2, "cmsg"), (4, "cmsg2292"), (0, "cmsg")] {
            let r = w.helper(
                json!({"op": "rthdr", "proto": "udp", "addr": to, "rh_type": ty,
                "via": via, "route": [DENIED6], "as_nobody": true}),
            );
            let e = errno_of(&r, "send_errno");
            assert!(
                e == i64::from(libc::EINVAL) || e == i64::from(EPERM),
                "{mode} type {ty} {via}: {r}"
            );
        }
        w.nothing_denied(&format!("routing header control messages, {mode}"));
    }
}

// ---------------------------------------------------------------- IPv4 source routes

/// Issue 16 point 2: IPv4 loose and strict source routes. Without CAP_NET_RAW the kernel
/// refuses them; with it (root in the workload) they work in mode `All` (positive control: the
/// wire destination is the denied host). In `Matched` and `None` the setsockopt program refuses
/// them on IPv4 and dual-stack sockets (UDP and TCP, to an allowed address, loopback or a
/// Domain-only destination, before connecting or on an established connection), and the
/// backstop drops per-datagram ones (`IP_RETOPTS`) on UDP and ping sockets. Record route,
/// which does not route, still works.
#[test]
fn ipv4_source_routes_are_refused_and_dropped() {
    if !require_kernel() {
        return;
    }
    let eperm = i64::from(EPERM);
    let ping_group = |w: &Reroute| {
        passthrough_tests::run(
            "ip",
            &[
                "netns",
                "exec",
                w.w.net.client_ns(),
                "sysctl",
                "-qw",
                "net.ipv4.ping_group_range=0 2147483647",
            ],
        )
        .unwrap();
    };
    // Positive control: mode All lets the LSRR through and the kernel does route by it.
    let all = Reroute::new("All");
    let r = all.helper(
        json!({"op": "ipopts", "proto": "udp", "addr": ALLOWED4, "kind": "lsrr",
        "route": [DENIED4]}),
    );
    assert_eq!(
        (errno_of(&r, "setsockopt_errno"), errno_of(&r, "send_errno")),
        (0, 0),
        "{r}"
    );
    assert!(
        all.log.wait_to(ip(DENIED4), 1, Duration::from_secs(2)) >= 1,
        "the LSRR did not reroute in mode All, so this test proves nothing: {:?}",
        all.log.packets()
    );
    drop(all);

    for mode in ["Matched", "None"] {
        let w = Reroute::new(mode);
        ping_group(&w);
        // As nobody: the kernel's own capability check.
        let r = w.helper(
            json!({"op": "ipopts", "proto": "udp", "addr": LOOPBACK4, "kind": "lsrr",
            "route": [DENIED4], "as_nobody": true}),
        );
        assert_eq!(errno_of(&r, "setsockopt_errno"), eperm, "{mode}: {r}");
        // With CAP_NET_RAW: sticky options on UDP, UDP on an AF_INET6 socket, TCP.
        for to in [ALLOWED4, LOOPBACK4, DOMAIN_ONLY4] {
            for proto in ["udp", "udp6", "tcp"] {
                for kind in ["lsrr", "ssrr"] {
                    let r = w.helper(json!({"op": "ipopts", "proto": proto, "addr": to,
                        "kind": kind, "route": [DENIED4]}));
                    assert_eq!(
                        errno_of(&r, "setsockopt_errno"),
                        eperm,
                        "{mode} {proto} {to} {kind}: {r}"
                    );
                    // The socket works unrouted, judged as usual.
                    expect_unrouted(mode, if proto == "tcp" { "tcp" } else { "udp" }, to, &r);
                }
            }
        }
        // On an established connection (allowed, or to loopback in mode None).
        let to = if mode == "None" { LOOPBACK4 } else { ALLOWED4 };
        let r = w.helper(
            json!({"op": "ipopts", "proto": "tcp", "addr": to, "kind": "lsrr",
            "when": "after", "route": [DENIED4]}),
        );
        assert_eq!(r["echo_before"], "before", "{mode} {to}: {r}");
        assert_eq!(errno_of(&r, "setsockopt_errno"), eperm, "{mode} {to}: {r}");
        assert_eq!(r["echo_after"], "after", "{mode} {to}: {r}");
        // Per datagram: UDP (allowed, loopback) and a ping socket (to a host allowed at every
        // port, or loopback), all of which would be sent without the option.
        let ping_to = if mode == "None" {
            "127.0.0.1:0"
        } else {
            "198.51.100.10:0"
        };
        let mut per_datagram = vec![("udp", LOOPBACK4), ("ping", ping_to)];
        if mode == "Matched" {
            per_datagram.push(("udp", ALLOWED4));
        }
        for (proto, to) in per_datagram {
            let r = w.helper(
                json!({"op": "ipopts", "proto": proto, "addr": to, "via": "cmsg",
                "kind": "lsrr", "route": [DENIED4]}),
            );
            assert_eq!(
                errno_of(&r, "send_errno"),
                eperm,
                "{mode} {proto} {to} IP_RETOPTS: {r}"
            );
        }
        // Record route does not route: allowed, and it arrives with its option.
        if mode == "Matched" {
            let before = w.log.to(ip("198.51.100.9")).len();
            let r = w.helper(
                json!({"op": "ipopts", "proto": "udp", "addr": ALLOWED4, "kind": "rr",
                "route": ["0.0.0.0", "0.0.0.0"]}),
            );
            assert_eq!(
                (errno_of(&r, "setsockopt_errno"), errno_of(&r, "send_errno")),
                (0, 0),
                "{r}"
            );
            assert!(
                w.log
                    .wait_to(ip("198.51.100.9"), before + 1, Duration::from_secs(2))
                    > before
            );
        }
        w.nothing_denied(&format!("IPv4 source routes, {mode}"));
        assert!(
            w.logged(&["reason=\"source_route\"", DENIED4]),
            "{mode}: {}",
            w.w.agent.log()
        );
    }
}

/// Raw packets that carry their own source route (`IP_HDRINCL`, `IPV6_HDRINCL`): the
/// backstop finds the LSRR option or the routing header and drops them; the same packets
/// without the route go out (to a host allowed at every port).
#[test]
fn raw_packets_with_source_routes_are_dropped() {
    if !require_kernel() {
        return;
    }
    let w = Reroute::new("Matched");
    let eperm = i64::from(EPERM);
    let r = w.helper(json!({"op": "raw_hdrincl", "to": "198.51.100.10:0", "route": [DENIED4]}));
    assert_eq!(errno_of(&r, "send_errno"), eperm, "{r}");
    let r =
        w.helper(json!({"op": "raw_hdrincl", "to": "[2001:db8:100::10]:0", "route": [DENIED6]}));
    assert_eq!(errno_of(&r, "send_errno"), eperm, "{r}");
    // A header destination that differs from the sendto() address: judged on the header.
    let r = w.helper(json!({"op": "raw_hdrincl", "to": "198.51.100.10:0", "dst": DENIED4}));
    assert_eq!(errno_of(&r, "send_errno"), eperm, "{r}");
    // Controls: no route, allowed host.
    for to in ["198.51.100.10:0", "[2001:db8:100::10]:0"] {
        let before = w.log.to(to.parse::<SocketAddr>().unwrap().ip()).len();
        let r = w.helper(json!({"op": "raw_hdrincl", "to": to}));
        assert_eq!(errno_of(&r, "send_errno"), 0, "{r}");
        assert!(
            w.log.wait_to(
                to.parse::<SocketAddr>().unwrap().ip(),
                before + 1,
                Duration::from_secs(2)
            ) > before,
            "{to}: {:?}",
            w.log.packets()
        );
    }
    w.nothing_denied("raw packets with source routes");
}

/// Source routes set before the agent attached (no setsockopt hook ran): the backstop drops
/// their packets, so UDP sends fail with EPERM and a TCP connect never reaches anyone.
#[test]
fn source_routes_set_before_the_agent_attached_are_dropped() {
    if !require_kernel() {
        return;
    }
    let dir = passthrough_tests::test_dir();
    let cg = TestCgroup::new().unwrap();
    let net = TestNet::new().unwrap();
    let log = Sniffer::start(net.server_ns(), "eth0").unwrap();
    let mut h = Helper::spawn(
        cg.path(),
        &net.client_ns_path(),
        json!({"op": "sticky", "addr6": ALLOWED6, "addr4": ALLOWED4,
            "route6": [DENIED6], "route4": [DENIED4]}),
    );
    let set = h.next();
    assert_eq!(
        set,
        json!({"udp6": 0, "tcp6": 0, "udp4": 0}),
        "no filter yet: {set}"
    );
    let policy = write_policy(dir.path(), &policy("Matched"));
    let mut agent = Agent::builder()
        .policy(&policy)
        .cgroup(cg.path())
        .start()
        .unwrap();
    h.go();
    let r = h.next();
    let eperm = i64::from(EPERM);
    assert_eq!(errno_of(&r, "udp6_send_errno"), eperm, "{r}");
    assert_eq!(errno_of(&r, "udp4_send_errno"), eperm, "{r}");
    assert_ne!(errno_of(&r, "tcp6_connect_errno"), 0, "{r}");
    std::thread::sleep(Duration::from_millis(200));
    for d in [DENIED4, DENIED6] {
        assert!(log.to(ip(d)).is_empty(), "{d}: {:?}", log.packets());
    }
    drop(h);
    agent.stop().unwrap();
}

/// The kernel runs no cgroup setsockopt program for a 32-bit (compat) `setsockopt`
/// (net/socket.c `do_sock_setsockopt`), so a workload that makes the call through the 32-bit
/// entry (a 32-bit binary, or `int 0x80` from a 64-bit one, where the kernel has IA32
/// emulation) does set a routing header — unprivileged — or, with `CAP_NET_RAW`, an LSRR. The
/// egress backstop drops every packet that carries one: UDP sends fail with EPERM, a TCP
/// connect never completes, and nothing reaches the denied host — in mode `None` too, to
/// loopback (which the route would have left for the denied host).
#[cfg(target_arch = "x86_64")]
#[test]
fn compat_setsockopt_skips_the_hook_and_the_backstop_drops_the_packets() {
    if !require_kernel() {
        return;
    }
    let eperm = i64::from(EPERM);
    // In mode None, to loopback: sends that would work without the route.
    for (mode, a6, a4) in [
        ("Matched", ALLOWED6, ALLOWED4),
        ("None", LOOPBACK6, LOOPBACK4),
    ] {
        let w = Reroute::new(mode);
        let req = json!({"op": "compat", "addr6": a6, "addr4": a4,
            "route6": [DENIED6], "route4": [DENIED4]});
        // Unprivileged: the IPv6 routing header is set (no hook ran); the kernel refuses the
        // LSRR.
        let mut nobody = req.clone();
        nobody["as_nobody"] = json!(true);
        let r = w.helper(nobody);
        assert_eq!(
            errno_of(&r, "udp6_setsockopt_errno"),
            0,
            "{mode}: the compat call set the option: {r}"
        );
        assert_eq!(errno_of(&r, "tcp6_setsockopt_errno"), 0, "{mode}: {r}");
        assert_eq!(errno_of(&r, "udp4_setsockopt_errno"), eperm, "{mode}: {r}");
        assert_eq!(
            errno_of(&r, "udp6_send_errno"),
            eperm,
            "{mode}: the backstop dropped it: {r}"
        );
        assert_ne!(errno_of(&r, "tcp6_connect_errno"), 0, "{mode}: {r}");
        // With CAP_NET_RAW the LSRR is set too, and dropped the same way.
        let r = w.helper(req);
        assert_eq!(errno_of(&r, "udp4_setsockopt_errno"), 0, "{mode}: {r}");
        assert_eq!(errno_of(&r, "udp4_send_errno"), eperm, "{mode}: {r}");
        assert_eq!(errno_of(&r, "udp6_send_errno"), eperm, "{mode}: {r}");
        w.nothing_denied(&format!("compat setsockopt, {mode}"));
        assert!(
            w.logged(&["reason=\"source_route\"", DENIED6]),
            "{mode}: {}",
            w.w.agent.log()
        );
    }
}

// --------------------------------------------------------------------------------- MPTCP

/// An MPTCP server in the test hosts' namespace on port 9090, draining every connection until
/// dropped.
struct MptcpServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MptcpServer {
    fn start(ns: &str) -> MptcpServer {
        use std::sync::{Arc, atomic::AtomicBool};
        let listeners = in_netns(ns, || {
            let mut v = Vec::new();
            for a in ["0.0.0.0:9090", "[::]:9090"] {
                let a: SocketAddr = a.parse()?;
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(a),
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::from(262)),
                )?;
                if a.is_ipv6() {
                    s.set_only_v6(true)?;
                }
                s.set_reuse_address(true)?;
                s.bind(&a.into())?;
                s.listen(16)?;
                s.set_nonblocking(true)?;
                v.push(std::net::TcpListener::from(s));
            }
            Ok(v)
        })
        .expect("MPTCP listeners");
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            use std::io::Read;
            let mut conns: Vec<std::net::TcpStream> = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !halt.load(std::sync::atomic::Ordering::SeqCst) {
                for l in &listeners {
                    while let Ok((c, _)) = l.accept() {
                        let _ = c.set_nonblocking(true);
                        conns.push(c);
                    }
                }
                conns.retain_mut(|c| {
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) => break false,
                            Ok(_) => continue,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
                            Err(_) => break false,
                        }
                    }
                });
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        MptcpServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for MptcpServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ip_cmd(ns: &str, args: &[&str]) {
    let mut a = vec!["-n", ns];
    a.extend_from_slice(args);
    passthrough_tests::run("ip", &a).unwrap();
}

/// Sets up MPTCP in the test: the client (workload) netns accepts up to two announced
/// addresses and opens subflows to them; the server netns owns `extra` addresses (on lo) that
/// it will announce.
fn mptcp_net(net: &TestNet, extra: &[&str]) {
    ip_cmd(
        net.client_ns(),
        &[
            "mptcp",
            "limits",
            "set",
            "subflows",
            "2",
            "add_addr_accepted",
            "2",
        ],
    );
    ip_cmd(
        net.server_ns(),
        &[
            "mptcp",
            "limits",
            "set",
            "subflows",
            "4",
            "add_addr_accepted",
            "4",
        ],
    );
    for a in extra {
        let plen = if a.contains(':') { "/128" } else { "/32" };
        ip_cmd(
            net.server_ns(),
            &["addr", "add", &format!("{a}{plen}"), "dev", "lo"],
        );
    }
}

/// The server announces `addr` to its established connections (`ADD_ADDR`).
fn announce(net: &TestNet, addr: &str) {
    ip_cmd(
        net.server_ns(),
        &["mptcp", "endpoint", "add", addr, "signal"],
    );
}

/// Issue 16 point 3: the server of an allowed MPTCP connection announces a denied address and
/// an allowed one; the kernel opens subflows from a worker thread. The subflow to the allowed
/// address works (positive control: kernel subflows happen here); the one to the denied host
/// is judged for the connection's owner, the workload, and denied — no packet reaches it — and
/// reported with the owner's pid.
#[test]
fn mptcp_subflows_are_judged_for_the_connection_owner() {
    if !require_kernel() {
        return;
    }
    for (server, allowed_extra, denied) in [
        ("198.51.100.9:9090", "198.51.100.10", DENIED4),
        ("[2001:db8:100::9]:9090", "2001:db8:100::10", DENIED6),
    ] {
        let w = Reroute::new("Matched");
        mptcp_net(&w.w.net, &[allowed_extra, denied]);
        let _server = MptcpServer::start(w.w.net.server_ns());
        let mut h = Helper::spawn(
            w.w.cg.path(),
            &w.w.net.client_ns_path(),
            json!({"op": "mptcp", "addr": server, "want": 1, "as_nobody": true}),
        );
        let first = h.next();
        assert_eq!(first["stage"], "connected", "{first}");
        let owner = format!("pid={}", h.child.id());
        announce(&w.w.net, denied);
        announce(&w.w.net, allowed_extra);
        h.go();
        let r = h.next();
        assert_eq!(r["ok"], true, "{r}");
        assert!(
            w.log.wait_to(ip(allowed_extra), 1, Duration::from_secs(2)) >= 1,
            "no subflow to the allowed announced address {allowed_extra}, so this test proves nothing: {r} {:?}",
            w.log.packets()
        );
        assert_eq!(
            (r["subflows"].clone(), r["add_addr_accepted"].clone()),
            (json!(1), json!(1)),
            "one extra subflow, the allowed one: {r}"
        );
        w.nothing_denied(&format!("MPTCP subflow via {server}"));
        assert!(
            w.logged(&["reason=\"no_match\"", denied, "protocol=tcp", &owner]),
            "the denied subflow is reported for the workload's process ({owner}):\n{}",
            w.w.agent.log()
        );
    }
}

/// A connection opened before the agent attached has no recorded owner: the subflows the
/// kernel opens for it afterwards are denied (also to an address the policy allows), instead
/// of being judged by `--unselected-mode` (here the default, `All`).
#[test]
fn mptcp_subflows_of_a_connection_without_an_owner_are_denied() {
    if !require_kernel() {
        return;
    }
    let dir = passthrough_tests::test_dir();
    let cg = TestCgroup::new().unwrap();
    let net = TestNet::new().unwrap();
    let log = Sniffer::start(net.server_ns(), "eth0").unwrap();
    mptcp_net(&net, &["198.51.100.10", DENIED4]);
    let server = MptcpServer::start(net.server_ns());
    let mut h = Helper::spawn(
        cg.path(),
        &net.client_ns_path(),
        json!({"op": "mptcp", "addr": "198.51.100.9:9090", "want": 1, "seconds": 4,
            "as_nobody": true}),
    );
    assert_eq!(h.next()["stage"], "connected");
    let policy = write_policy(dir.path(), &policy("Matched"));
    let mut agent = Agent::builder()
        .policy(&policy)
        .cgroup(cg.path())
        .start()
        .unwrap();
    announce(&net, DENIED4);
    announce(&net, "198.51.100.10");
    h.go();
    let r = h.next();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        (r["subflows"].clone(), r["add_addr_accepted"].clone()),
        (json!(0), json!(0)),
        "{r}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(log.to(ip(DENIED4)).is_empty(), "{:?}", log.packets());
    assert!(
        log.to(ip("198.51.100.10")).is_empty(),
        "{:?}",
        log.packets()
    );
    // Both subflow connects were made, by a kernel worker, and denied.
    for dst in [DENIED4, "198.51.100.10"] {
        let seen = (0..150).any(|_| {
            let hit = agent.log().lines().any(|l| {
                l.contains("reason=\"subflow_owner_unknown\"")
                    && l.contains(&format!("dst={dst}:9090"))
            });
            if !hit {
                std::thread::sleep(Duration::from_millis(20));
            }
            hit
        });
        assert!(
            seen,
            "no subflow_owner_unknown event for {dst}:\n{}",
            agent.log()
        );
    }
    drop(h);
    drop(server);
    agent.stop().unwrap();
}

// ------------------------------------------------------------------- the rest of the class

/// Options and flags that choose an interface, a source address or a next hop, multicast and
/// broadcast destinations, `MSG_CONFIRM`: none changes the destination the hooks judge (or the
/// kernel refuses it), so denied destinations stay denied and allowed ones work. As nobody.
#[test]
fn packet_info_next_hop_device_binding_multicast_broadcast_and_confirm() {
    if !require_kernel() {
        return;
    }
    let w = Reroute::new("Matched");
    let r = w.helper(json!({"op": "misc", "as_nobody": true,
        "denied4": format!("{DENIED4}:8080"), "allowed4": ALLOWED4,
        "denied6": format!("[{DENIED6}]:8080"), "allowed6": ALLOWED6}));
    let eperm = i64::from(EPERM);
    for k in [
        "ip_pktinfo_denied",
        "ipv6_pktinfo_denied",
        "ipv6_pktinfo_sticky_denied",
        "bind_eth0_udp_denied",
        "bind_eth0_tcp_denied",
        "bind_lo_udp_denied",
        "bind_lo_tcp_denied",
        "multicast4",
        "broadcast_limited",
        "broadcast_subnet",
        "multicast6",
        "multicast6_site",
        "confirm_denied",
    ] {
        assert_eq!(errno_of(&r, k), eperm, "{k}: {r}");
    }
    for k in [
        "ip_pktinfo_allowed",
        "ipv6_pktinfo_allowed",
        "bind_eth0",
        "bind_lo",
        "confirm_allowed",
    ] {
        assert_eq!(errno_of(&r, k), 0, "{k}: {r}");
    }
    // IPV6_NEXTHOP: not a control message or option this kernel accepts.
    assert_eq!(
        errno_of(&r, "ipv6_nexthop_cmsg"),
        i64::from(libc::EINVAL),
        "{r}"
    );
    assert_eq!(
        errno_of(&r, "ipv6_nexthop_setsockopt"),
        i64::from(libc::ENOPROTOOPT),
        "{r}"
    );
    w.nothing_denied("packet info, next hop, device binding, multicast, broadcast");
    for g in [
        "224.0.0.251",
        "255.255.255.255",
        "192.0.2.255",
        "ff02::1",
        "ff05::1:3",
    ] {
        assert!(w.log.to(ip(g)).is_empty(), "{g}: {:?}", w.log.packets());
    }
}

/// As nobody: an IPsec policy on a workload socket needs CAP_NET_ADMIN over its netns
/// (EPERM). In its own user and network namespace the workload is root, but that namespace
/// has no way out: a VXLAN tunnel to the denied host sends nothing that leaves, and moving a
/// device into, or creating one in, the workload's network namespace fails (EPERM).
#[test]
fn tunnels_and_ipsec_in_the_workloads_own_namespaces_do_not_leave() {
    if !require_kernel() {
        return;
    }
    let w = Reroute::new("Matched");
    let r =
        w.helper(json!({"op": "userns", "as_nobody": true, "denied4": format!("{DENIED4}:8080")}));
    assert_eq!(errno_of(&r, "xfrm_policy_errno"), i64::from(EPERM), "{r}");
    let out = r["userns_out"].as_str().unwrap_or("");
    assert!(
        out.contains("vxlan_up=ok") && out.contains("veth=ok"),
        "the tunnel was set up: {r}"
    );
    assert!(
        out.contains("move_rc=2") || out.contains("move_rc=1"),
        "{r}"
    );
    assert!(out.contains("Operation not permitted"), "{r}");
    assert!(!out.contains("create_in_rc=0"), "{r}");
    w.nothing_denied("own-namespace tunnels");
}

/// Other socket families and protocols, as nobody: SCTP is not built into this kernel (where
/// it is, its packets are judged like raw ones by the backstop); RDS and TIPC are absent;
/// AF_XDP and AF_PACKET need CAP_NET_RAW; AF_VSOCK is open (it talks to the hypervisor, not to
/// IP hosts: docs/security.md L5); UDP-Lite and MPTCP are IP sockets the hooks see.
#[test]
fn other_socket_families() {
    if !require_kernel() {
        return;
    }
    let w = Reroute::new("Matched");
    let r = w.helper(json!({"op": "families", "as_nobody": true}));
    let want = json!({
        "ok": true,
        "sctp_stream": libc::EPROTONOSUPPORT,
        "sctp_seqpacket": libc::ESOCKTNOSUPPORT,
        "rds": libc::EAFNOSUPPORT,
        "tipc": libc::EAFNOSUPPORT,
        "xdp": EPERM,
        "packet": EPERM,
        "vsock": 0,
        "udplite": 0,
        "mptcp": 0,
    });
    assert_eq!(
        r, want,
        "a socket family's availability changed: review docs/security.md"
    );
}

/// Issue 16 point 5: an ICMPv6 ping socket's `sendto()` to a denied host reports success —
/// `ping_v6_sendmsg` (net/ipv6/ping.c) ignores the error of `icmpv6_push_pending_frames` —
/// but the backstop dropped the echo request: nothing reaches the host, and the denial is
/// reported. `connect()` is judged (EPERM). To a host allowed at every port it goes out.
#[test]
fn icmpv6_ping_to_a_denied_host_is_dropped_though_sendto_succeeds() {
    if !require_kernel() {
        return;
    }
    let w = Reroute::new("Matched");
    passthrough_tests::run(
        "ip",
        &[
            "netns",
            "exec",
            w.w.net.client_ns(),
            "sysctl",
            "-qw",
            "net.ipv4.ping_group_range=0 2147483647",
        ],
    )
    .unwrap();
    let r = w.helper(json!({"op": "ping6", "addr": format!("[{DENIED6}]:0"), "as_nobody": true}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        errno_of(&r, "sendto_errno"),
        0,
        "the kernel still reports success: {r}"
    );
    assert_eq!(errno_of(&r, "connect_errno"), i64::from(EPERM), "{r}");
    w.nothing_denied("ICMPv6 ping");
    assert!(w.logged(&["protocol=ping", DENIED6]), "{}", w.w.agent.log());
    let r = w.helper(json!({"op": "ping6", "addr": "[2001:db8:100::10]:0", "as_nobody": true}));
    assert_eq!(
        (errno_of(&r, "sendto_errno"), errno_of(&r, "connect_errno")),
        (0, 0),
        "{r}"
    );
    assert!(
        w.log
            .wait_to(ip("2001:db8:100::10"), 1, Duration::from_secs(2))
            >= 1
    );
}
