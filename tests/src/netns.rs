//! Test hosts in network namespaces, addressed from the documentation ranges only.
//!
//! ```text
//!  client netns ptc-<pid>-<n>                 server netns pts-<pid>-<n>
//!  lo: 127.0.0.1, ::1 (loopback echo          lo: AnyIP local routes
//!      listener on LOOPBACK_PORT)                 198.51.100.0/24, 203.0.113.0/24,
//!  eth0: 192.0.2.1/24, 2001:db8::1/64  <-veth->   2001:db8:100::/40, 2001:db8:200::/40
//!  routes: 198.51.100.0/24, 203.0.113.0/24    eth0: 192.0.2.2/24, 2001:db8::2/64
//!          via 192.0.2.2; 2001:db8::/32 via   TCP + UDP echo on every test port, bound to the
//!          2001:db8::2                        wildcard addresses (one v4, one v6-only socket)
//! ```
//!
//! Sockets are created by a thread that `setns`-ed into the namespace; they stay in it. Every TCP
//! accept and every UDP datagram is counted per destination address, so a test can assert that
//! a denied connect never reached the server.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

/// Port of the echo listeners on `127.0.0.1` and `[::1]` inside the client netns.
pub const LOOPBACK_PORT: u16 = 7777;
/// Ports the server listens on by default (TCP and UDP).
pub const DEFAULT_PORTS: &[u16] = &[53, 80, 443, 5432, 8080, 8443];

/// Client veth address (IPv4).
pub const CLIENT_V4: &str = "192.0.2.1";
/// Server veth address (IPv4).
pub const SERVER_V4: &str = "192.0.2.2";
/// Client veth address (IPv6).
pub const CLIENT_V6: &str = "2001:db8::1";
/// Server veth address (IPv6).
pub const SERVER_V6: &str = "2001:db8::2";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Proto {
    Tcp,
    Udp,
}

type Counts = Arc<Mutex<HashMap<(Proto, SocketAddr), u64>>>;

/// Runs `f` on a new thread that joined the network namespace `ns` (`/run/netns/<ns>`).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = netns_path(ns);
    std::thread::spawn(move || -> Result<T> {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: setns on this thread only, with a valid netns fd.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("setns into {}", path.display()));
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Replaces an IPv4-mapped IPv6 address by its IPv4 address (the server sees IPv4 packets).
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Parses `a.b.c.d:p` / `[v6]:p`, panicking with the text on error (tests pass literals).
pub fn sa(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad socket address {s:?}: {e}"))
}

/// A client and a server network namespace joined by a veth pair, with echo servers.
pub struct TestNet {
    client: String,
    server: String,
    ports: Vec<u16>,
    counts: Counts,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestNet {
    /// Test hosts listening on [`DEFAULT_PORTS`].
    pub fn new() -> Result<Self> {
        Self::with_ports(DEFAULT_PORTS)
    }

    /// Test hosts listening (TCP and UDP echo) on `ports`.
    pub fn with_ports(ports: &[u16]) -> Result<Self> {
        let suffix = crate::unique_suffix();
        let mut net = TestNet {
            client: format!("{}{suffix}", crate::CLIENT_NS_PREFIX),
            server: format!("{}{suffix}", crate::SERVER_NS_PREFIX),
            ports: ports.to_vec(),
            counts: Arc::default(),
            stop: Arc::default(),
            thread: None,
        };
        // From here on, Drop removes whatever was created.
        net.setup_links()?;
        net.start_servers()?;
        Ok(net)
    }

    fn setup_links(&self) -> Result<()> {
        let (c, s) = (self.client.as_str(), self.server.as_str());
        crate::run("ip", &["netns", "add", c])?;
        crate::run("ip", &["netns", "add", s])?;
        crate::run(
            "ip",
            &[
                "link", "add", "eth0", "netns", c, "type", "veth", "peer", "name", "eth0", "netns",
                s,
            ],
        )?;
        let cmds: &[&[&str]] = &[
            &["-n", c, "link", "set", "lo", "up"],
            &["-n", c, "link", "set", "eth0", "up"],
            &["-n", c, "addr", "add", "192.0.2.1/24", "dev", "eth0"],
            &[
                "-n",
                c,
                "-6",
                "addr",
                "add",
                "2001:db8::1/64",
                "dev",
                "eth0",
                "nodad",
            ],
            &["-n", c, "route", "add", "198.51.100.0/24", "via", SERVER_V4],
            &["-n", c, "route", "add", "203.0.113.0/24", "via", SERVER_V4],
            &[
                "-n",
                c,
                "-6",
                "route",
                "add",
                "2001:db8::/32",
                "via",
                SERVER_V6,
            ],
            &["-n", s, "link", "set", "lo", "up"],
            &["-n", s, "link", "set", "eth0", "up"],
            &["-n", s, "addr", "add", "192.0.2.2/24", "dev", "eth0"],
            &[
                "-n",
                s,
                "-6",
                "addr",
                "add",
                "2001:db8::2/64",
                "dev",
                "eth0",
                "nodad",
            ],
            &[
                "-n",
                s,
                "route",
                "add",
                "local",
                "198.51.100.0/24",
                "dev",
                "lo",
            ],
            &[
                "-n",
                s,
                "route",
                "add",
                "local",
                "203.0.113.0/24",
                "dev",
                "lo",
            ],
            &[
                "-n",
                s,
                "-6",
                "route",
                "add",
                "local",
                "2001:db8:100::/40",
                "dev",
                "lo",
            ],
            &[
                "-n",
                s,
                "-6",
                "route",
                "add",
                "local",
                "2001:db8:200::/40",
                "dev",
                "lo",
            ],
        ];
        for args in cmds {
            crate::run("ip", args)?;
        }
        Ok(())
    }

    fn start_servers(&mut self) -> Result<()> {
        let ports = self.ports.clone();
        let mut sockets: Vec<Listener> = in_netns(&self.server, move || {
            let mut v = Vec::new();
            for &p in &ports {
                v.push(Listener::Tcp(tcp_listener(SocketAddr::new(
                    "0.0.0.0".parse()?,
                    p,
                ))?));
                v.push(Listener::Tcp(tcp_listener(SocketAddr::new(
                    "::".parse()?,
                    p,
                ))?));
                v.push(Listener::Udp(udp_socket(SocketAddr::new(
                    "0.0.0.0".parse()?,
                    p,
                ))?));
                v.push(Listener::Udp(udp_socket(SocketAddr::new(
                    "::".parse()?,
                    p,
                ))?));
            }
            Ok(v)
        })?;
        let loopback: Vec<Listener> = in_netns(&self.client, move || {
            Ok(vec![
                Listener::Tcp(tcp_listener(SocketAddr::new(
                    "127.0.0.1".parse()?,
                    LOOPBACK_PORT,
                ))?),
                Listener::Tcp(tcp_listener(SocketAddr::new(
                    "::1".parse()?,
                    LOOPBACK_PORT,
                ))?),
                Listener::Udp(udp_socket(SocketAddr::new(
                    "127.0.0.1".parse()?,
                    LOOPBACK_PORT,
                ))?),
                Listener::Udp(udp_socket(SocketAddr::new("::1".parse()?, LOOPBACK_PORT))?),
            ])
        })?;
        sockets.extend(loopback);
        let counts = self.counts.clone();
        let stop = self.stop.clone();
        self.thread = Some(std::thread::spawn(move || serve(sockets, counts, stop)));
        Ok(())
    }

    /// Name of the client netns (where probes run).
    pub fn client_ns(&self) -> &str {
        &self.client
    }

    /// Name of the server netns.
    pub fn server_ns(&self) -> &str {
        &self.server
    }

    /// `/run/netns/<client>`.
    pub fn client_ns_path(&self) -> PathBuf {
        netns_path(&self.client)
    }

    /// The ports the server listens on.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// TCP connections accepted whose destination (the address the client dialled) was `dst`.
    /// IPv4-mapped IPv6 destinations are counted under their IPv4 address.
    pub fn accepted(&self, dst: SocketAddr) -> u64 {
        self.count(Proto::Tcp, dst)
    }

    /// UDP datagrams received whose destination was `dst`.
    pub fn datagrams(&self, dst: SocketAddr) -> u64 {
        self.count(Proto::Udp, dst)
    }

    /// All TCP connections accepted on `port`, on any address (server and loopback).
    pub fn accepted_on_port(&self, port: u16) -> u64 {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.iter()
            .filter(|((p, a), _)| *p == Proto::Tcp && a.port() == port)
            .map(|(_, n)| n)
            .sum()
    }

    /// All TCP connections accepted, on any address and port.
    pub fn accepted_total(&self) -> u64 {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.iter()
            .filter(|((p, _), _)| *p == Proto::Tcp)
            .map(|(_, n)| n)
            .sum()
    }

    fn count(&self, proto: Proto, dst: SocketAddr) -> u64 {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.get(&(proto, normalize(dst))).copied().unwrap_or(0)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Deleting one end of the veth deletes both; then the namespaces.
        let _ = crate::run("ip", &["-n", &self.client, "link", "del", "eth0"]);
        for ns in [&self.client, &self.server] {
            if netns_path(ns).exists()
                && let Err(e) = crate::run("ip", &["netns", "del", ns])
            {
                eprintln!("warning: deleting netns {ns}: {e:#}");
            }
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

fn tcp_listener(addr: SocketAddr) -> Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())
        .with_context(|| format!("binding tcp {addr}"))?;
    s.listen(128)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

fn udp_socket(addr: SocketAddr) -> Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let fd = s.as_raw_fd();
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        // Replies leave from AnyIP addresses that are not configured on an interface.
        let _ = setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_TRANSPARENT, 1);
        let _ = setsockopt_int(fd, libc::IPPROTO_IPV6, 78 /* IPV6_FREEBIND */, 1);
    } else {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
        let _ = setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_FREEBIND, 1);
    }
    s.bind(&addr.into())
        .with_context(|| format!("binding udp {addr}"))?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// `setsockopt` with an `int` value.
pub fn setsockopt_int(fd: RawFd, level: i32, name: i32, val: i32) -> io::Result<()> {
    // SAFETY: valid fd, pointer to a live c_int with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &val as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as u32,
        )
    };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn bump(counts: &Counts, proto: Proto, dst: SocketAddr) {
    let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
    *c.entry((proto, normalize(dst))).or_insert(0) += 1;
}

/// The server loop: polls every listener, accepts (one echo thread per connection) and echoes
/// datagrams, until `stop`.
fn serve(sockets: Vec<Listener>, counts: Counts, stop: Arc<AtomicBool>) {
    let mut fds: Vec<libc::pollfd> = sockets
        .iter()
        .map(|l| libc::pollfd {
            fd: match l {
                Listener::Tcp(t) => t.as_raw_fd(),
                Listener::Udp(u) => u.as_raw_fd(),
            },
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut echo_threads: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: fds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 50) };
        if n <= 0 {
            continue;
        }
        for (i, pfd) in fds.iter_mut().enumerate() {
            if pfd.revents == 0 {
                continue;
            }
            pfd.revents = 0;
            match &sockets[i] {
                Listener::Tcp(l) => {
                    while let Ok((stream, _peer)) = l.accept() {
                        if let Ok(local) = stream.local_addr() {
                            bump(&counts, Proto::Tcp, local);
                        }
                        let stop = stop.clone();
                        echo_threads.push(std::thread::spawn(move || echo_tcp(stream, stop)));
                    }
                }
                Listener::Udp(u) => {
                    while let Ok((buf, src, dst)) = recv_with_dst(u) {
                        if let Some(dst) = dst {
                            bump(&counts, Proto::Udp, dst);
                        }
                        let _ = send_from(u, &buf, src, dst);
                    }
                }
            }
        }
        echo_threads.retain(|t| !t.is_finished());
    }
    for t in echo_threads {
        let _ = t.join();
    }
}

fn echo_tcp(mut s: TcpStream, stop: Arc<AtomicBool>) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// `recvmsg` with `IP_PKTINFO`/`IPV6_PKTINFO`: the payload, the source and the destination.
fn recv_with_dst(u: &UdpSocket) -> io::Result<(Vec<u8>, SocketAddr, Option<SocketAddr>)> {
    let local_port = u.local_addr()?.port();
    let mut buf = vec![0u8; 65536];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: all-zero sockaddr_storage/msghdr are valid.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut cbuf = [0u64; 64];
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut from as *mut _ as *mut libc::c_void;
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points at live buffers of the sizes given.
    let n = unsafe { libc::recvmsg(u.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    let src = sockaddr_to_std(&from).ok_or_else(|| io::Error::other("bad source address"))?;
    let mut dst = None;
    // SAFETY: walking the control messages the kernel filled in, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
            if level == libc::IPPROTO_IP && ty == libc::IP_PKTINFO {
                let pi = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in_pktinfo);
                let ip = std::net::Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr));
                dst = Some(SocketAddr::new(IpAddr::V4(ip), local_port));
            } else if level == libc::IPPROTO_IPV6 && ty == libc::IPV6_PKTINFO {
                let pi = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in6_pktinfo);
                let ip = std::net::Ipv6Addr::from(pi.ipi6_addr.s6_addr);
                dst = Some(SocketAddr::new(IpAddr::V6(ip), local_port));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((buf, src, dst))
}

/// `sendmsg` to `to` with the source address set to `from` (the address the datagram was sent to).
fn send_from(
    u: &UdpSocket,
    data: &[u8],
    to: SocketAddr,
    from: Option<SocketAddr>,
) -> io::Result<()> {
    let Some(from) = from else {
        u.send_to(data, to)?;
        return Ok(());
    };
    let to_sa: socket2::SockAddr = to.into();
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = [0u64; 16];
    // SAFETY: zeroed msghdr is valid; we fill it with live pointers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = to_sa.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = to_sa.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: building one control message inside cbuf (large enough for either pktinfo).
    unsafe {
        match from.ip() {
            IpAddr::V4(ip) => {
                msg.msg_controllen =
                    libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len =
                    libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
                let pi = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in_pktinfo, pi);
            }
            IpAddr::V6(ip) => {
                msg.msg_controllen =
                    libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len =
                    libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
                let pi = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::in6_pktinfo, pi);
            }
        }
        if libc::sendmsg(u.as_raw_fd(), &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: reinterpreting the storage according to its family.
    unsafe {
        match ss.ss_family as i32 {
            libc::AF_INET => {
                let a = &*(ss as *const _ as *const libc::sockaddr_in);
                Some(SocketAddr::new(
                    IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))),
                    u16::from_be(a.sin_port),
                ))
            }
            libc::AF_INET6 => {
                let a = &*(ss as *const _ as *const libc::sockaddr_in6);
                Some(SocketAddr::new(
                    IpAddr::V6(std::net::Ipv6Addr::from(a.sin6_addr.s6_addr)),
                    u16::from_be(a.sin6_port),
                ))
            }
            _ => None,
        }
    }
}
