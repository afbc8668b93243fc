//! A packet log on a test host's interface: every IPv4/IPv6 packet that arrives there, counted
//! by its destination address as it is on the wire. The security tests use it as "the denied
//! host logs every packet it receives": a listener's accept or datagram count would miss a
//! source-routed packet, whose wire destination is a route hop, or a SYN nobody accepts.
//!
//! An `AF_PACKET` socket bound to one interface of a network namespace, read by a thread until
//! the [`Sniffer`] is dropped. Packets the namespace itself sends (`PACKET_OUTGOING`) are left
//! out: only what arrives from the other end of the link is counted.

use std::{
    ffi::CString,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::netns::in_netns;

/// One packet as logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Source address in the IP header.
    pub src: IpAddr,
    /// Destination address in the IP header (for a source-routed packet: the next hop).
    pub dst: IpAddr,
    /// IPv4 protocol, or the IPv6 header's next header (43 for a routing header).
    pub next: u8,
}

/// Every IP packet arriving on one interface of a network namespace.
pub struct Sniffer {
    log: Arc<Mutex<Vec<Packet>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sniffer {
    /// Starts logging packets that arrive on `ifname` in the network namespace `ns`.
    pub fn start(ns: &str, ifname: &str) -> Result<Sniffer> {
        let name = ifname.to_string();
        let sock = in_netns(ns, move || -> Result<OwnedFd> {
            let c = CString::new(name.clone())?;
            // SAFETY: plain syscalls; the fd is owned right away.
            unsafe {
                let ifindex = libc::if_nametoindex(c.as_ptr());
                if ifindex == 0 {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("no interface {name}"));
                }
                let proto = (libc::ETH_P_ALL as u16).to_be();
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto));
                if fd < 0 {
                    return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
                }
                let fd = OwnedFd::from_raw_fd(fd);
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto;
                sll.sll_ifindex = ifindex as i32;
                if libc::bind(
                    fd.as_raw_fd(),
                    &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error())
                        .with_context(|| format!("binding the packet socket to {name}"));
                }
                Ok(fd)
            }
        })?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (log.clone(), stop.clone());
        let thread = std::thread::spawn(move || read_packets(sock, l, s));
        Ok(Sniffer {
            log,
            stop,
            thread: Some(thread),
        })
    }

    /// Packets logged so far whose wire destination is `dst`.
    pub fn to(&self, dst: IpAddr) -> Vec<Packet> {
        self.packets()
            .into_iter()
            .filter(|p| p.dst == dst)
            .collect()
    }

    /// Every packet logged so far.
    pub fn packets(&self) -> Vec<Packet> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until at least `n` packets to `dst` were logged, or `within` passed; returns how
    /// many were.
    pub fn wait_to(&self, dst: IpAddr, n: usize, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let got = self.to(dst).len();
            if got >= n || Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sniffer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_packets(sock: OwnedFd, log: Arc<Mutex<Vec<Packet>>>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
            continue;
        }
        loop {
            // SAFETY: an all-zero sockaddr_ll is valid; the buffers outlive the call.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    sock.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                break;
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            if let Some(p) = parse(&buf[..n as usize]) {
                log.lock().unwrap_or_else(|e| e.into_inner()).push(p);
            }
        }
    }
}

/// An Ethernet frame's IP header, if it has one.
fn parse(frame: &[u8]) -> Option<Packet> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    match ethertype {
        0x0800 if ip.len() >= 20 => {
            let a = |o: usize| IpAddr::V4(Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]));
            Some(Packet {
                src: a(12),
                dst: a(16),
                next: ip[9],
            })
        }
        0x86dd if ip.len() >= 40 => {
            let a = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&ip[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            Some(Packet {
                src: a(8),
                dst: a(24),
                next: ip[6],
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_parsed_by_ethertype() {
        let mut f = vec![0u8; 14 + 40];
        f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        f[14 + 6] = 43;
        f[14 + 24..14 + 40]
            .copy_from_slice(&"2001:db8:200::9".parse::<Ipv6Addr>().unwrap().octets());
        let p = parse(&f).unwrap();
        assert_eq!((p.dst, p.next), ("2001:db8:200::9".parse().unwrap(), 43));
        let mut f = vec![0u8; 14 + 20];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14 + 9] = 17;
        f[14 + 16..14 + 20].copy_from_slice(&[203, 0, 113, 9]);
        assert_eq!(
            parse(&f).unwrap().dst,
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(parse(&f[..20]), None);
        f[12] = 0x08;
        f[13] = 0x06; // ARP
        assert_eq!(parse(&f), None);
    }
}
