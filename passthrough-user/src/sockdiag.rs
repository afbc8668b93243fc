//! Resets a TCP connection of this host by its addresses: `SOCK_DESTROY` over `NETLINK_SOCK_DIAG`
//! (what `ss -K` uses; `CONFIG_INET_DIAG_DESTROY`, `CAP_NET_ADMIN`). The kernel aborts the socket
//! (`tcp_abort`): the peer gets a reset, the owner's next call fails with `ECONNABORTED`.
//!
//! The TLS fast path uses it for a connection whose ClientHello the kernel refused: nothing of
//! it left the host and no send on it can succeed, so the agent ends it for the application
//! rather than leave it to find out on its own (docs/design.md, "The TLS fast path").

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const INET_DIAG_NOCOOKIE: u32 = !0;

#[repr(C)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

#[repr(C)]
struct InetDiagSockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
struct InetDiagReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

#[repr(C)]
struct Request {
    hdr: NlMsgHdr,
    req: InetDiagReqV2,
}

/// The address as the socket's family holds it: IPv4 in the first word for `AF_INET`, the
/// 16 bytes (v4-mapped for IPv4) for `AF_INET6`.
fn words(ip: IpAddr, v6_socket: bool) -> [u32; 4] {
    let b: [u8; 16] = match ip {
        IpAddr::V4(v4) if !v6_socket => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            b
        }
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Aborts the TCP socket of this host connected from `local` to `remote` (`v6_socket`: an
/// `AF_INET6` socket, also when it dialled a v4-mapped address).
pub fn destroy_tcp(local: SocketAddr, remote: SocketAddr, v6_socket: bool) -> io::Result<()> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just created, ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = Request {
        hdr: NlMsgHdr {
            len: size_of::<Request>() as u32,
            ty: SOCK_DESTROY,
            flags: NLM_F_REQUEST | NLM_F_ACK,
            seq: 1,
            pid: 0,
        },
        req: InetDiagReqV2 {
            family: if v6_socket {
                libc::AF_INET6 as u8
            } else {
                libc::AF_INET as u8
            },
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: !0,
            id: InetDiagSockId {
                sport: local.port().to_be(),
                dport: remote.port().to_be(),
                src: words(local.ip(), v6_socket),
                dst: words(remote.ip(), v6_socket),
                ifindex: 0,
                cookie: [INET_DIAG_NOCOOKIE; 2],
            },
        },
    };
    // SAFETY: a live fd and a buffer of the given size.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            (&req as *const Request).cast(),
            size_of::<Request>(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 512];
    // SAFETY: a live fd and buffer.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // The acknowledgement: an NLMSG_ERROR whose error code is 0 on success.
    if (n as usize) >= size_of::<NlMsgHdr>() + 4 {
        let ty = u16::from_ne_bytes([buf[4], buf[5]]);
        if ty == NLMSG_ERROR {
            let h = size_of::<NlMsgHdr>();
            let err = i32::from_ne_bytes([buf[h], buf[h + 1], buf[h + 2], buf[h + 3]]);
            if err != 0 {
                return Err(io::Error::from_raw_os_error(-err));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A real connection on loopback is reset by its addresses (needs root and the kernel's
    /// socket-destroy support; skipped otherwise).
    #[test]
    fn a_connection_is_reset() {
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        for lo in ["127.0.0.1:0", "[::1]:0"] {
            let l = TcpListener::bind(lo).unwrap();
            let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (mut s, _) = l.accept().unwrap();
            let v6 = c.local_addr().unwrap().is_ipv6();
            match destroy_tcp(c.local_addr().unwrap(), c.peer_addr().unwrap(), v6) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return,
                r => r.unwrap(),
            }
            let mut b = [0u8; 1];
            // The server side sees a reset; the client's socket is closed under it.
            assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
            assert!(c.write_all(b"x").and_then(|()| c.flush()).is_err() || c.read(&mut b).is_err());
        }
    }
}
