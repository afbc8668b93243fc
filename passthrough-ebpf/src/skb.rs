//! `cgroup_skb/egress`: the backstop for sockets that no sock_addr hook sees (docs/security.md
//! L1, L2).
//!
//! Why this exists: connect4/6 and sendmsg4/6 judge TCP and UDP at the syscall, but a raw
//! socket (`SOCK_RAW`, with `CAP_NET_RAW`, which container runtimes grant by default) can send a
//! hand-made packet to any address, and an unconnected ping socket's `sendto()` runs no
//! sock_addr hook (`ping_v4_sendmsg`). Both send synchronously through the IP output path, where
//! this program sees every packet of the cgroup.
//!
//! What it does: packets of stream sockets and of UDP sockets pass at once (their sockets were
//! judged at `connect()`/`sendmsg()`; a packet without a full socket — a SYN-ACK, a reset from a
//! time-wait socket — is the kernel's own). A raw or ping socket's packet is judged on its
//! destination like a connection without a port: loopback, internal CIDRs, mode `All` and
//! port-less IP/CIDR matches allow it; anything else is dropped, and the `sendto()` fails with
//! `EPERM`. The workload is the socket's cgroup (the creator's), not the current task's.
//!
//! Not covered: `AF_PACKET` sockets, which leave below IP and never reach a cgroup hook
//! (dropping `CAP_NET_RAW` closes that).

use aya_ebpf::{helpers::bpf_sk_fullsock, macros::cgroup_skb, programs::SkBuffContext};

use passthrough_common::flags;

use crate::{
    decide::{Socket, Transport, V4, V6, Verdict, decide_for},
    maps::CONFIG,
    sni,
};

const SOCK_DGRAM: u32 = 2;
const SOCK_STREAM: u32 = 1;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;

/// Return codes of cgroup_skb programs.
const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn passthrough_skb_egress(ctx: SkBuffContext) -> i32 {
    // SAFETY: `sk` is a context field the verifier lets cgroup_skb read (possibly null).
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return PASS;
    }
    // SAFETY: the helper checks the pointer; null when not a full socket.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return PASS;
    }
    // SAFETY: non-null result of bpf_sk_fullsock.
    let (ty, protocol, mark) = unsafe { ((*full).type_, (*full).protocol, (*full).mark) };
    if ty == SOCK_STREAM {
        // TLS fast path: no payload leaves a socket whose ClientHello was not allowed in the
        // kernel, whichever send path queued it (see `sni.rs`, "Why a backstop").
        if CONFIG
            .get(0)
            .is_some_and(|c| c.flags & flags::TLS_FAST_PATH != 0)
            && !sni::backstop(full, || tcp_payload(&ctx))
        {
            return DROP;
        }
        return PASS;
    }
    // The common case first and cheapest: UDP (not ICMP) datagram sockets.
    if ty == SOCK_DGRAM && protocol != IPPROTO_ICMP && protocol != IPPROTO_ICMPV6 {
        return PASS;
    }
    if CONFIG
        .get(0)
        .is_some_and(|c| c.flags & flags::RAW_BACKSTOP_OFF != 0)
    {
        return PASS;
    }
    judge(&ctx, Socket(full), ty as u8, mark)
}

/// A raw or ping socket's packet: judged on the IP header's destination, no port.
#[inline(always)]
fn judge(ctx: &SkBuffContext, sock: Socket, ty: u8, mark: u32) -> i32 {
    // cgroup_skb data starts at the network header.
    let Ok(first) = ctx.load::<u8>(0) else {
        return DROP;
    };
    let verdict = match first >> 4 {
        4 => {
            let (Ok(proto), Ok(dst)) = (ctx.load::<u8>(9), ctx.load::<[u8; 4]>(16)) else {
                return DROP;
            };
            decide_for(sock, V4(dst), 0, Transport::Raw(proto, ty), mark)
        }
        6 => {
            let (Ok(proto), Ok(dst)) = (ctx.load::<u8>(6), ctx.load::<[u8; 16]>(24)) else {
                return DROP;
            };
            decide_for(sock, V6(dst), 0, Transport::Raw(proto, ty), mark)
        }
        // Neither IPv4 nor IPv6 from an IP socket: nothing we can judge, so nothing leaves.
        _ => return DROP,
    };
    if verdict == Verdict::Allow {
        PASS
    } else {
        DROP
    }
}

/// Whether a TCP packet carries payload (or cannot be read as a plain TCP packet, which counts
/// as payload: only a bare SYN, ACK, FIN or RST of a fast-path socket may leave before its
/// ClientHello was allowed).
#[inline(always)]
fn tcp_payload(ctx: &SkBuffContext) -> bool {
    let Ok(first) = ctx.load::<u8>(0) else {
        return true;
    };
    match first >> 4 {
        4 => {
            let ihl = u32::from(first & 0x0f) * 4;
            let (Ok(total), Ok(proto)) = (ctx.load::<[u8; 2]>(2), ctx.load::<u8>(9)) else {
                return true;
            };
            if proto != 6 || ihl < 20 {
                return true;
            }
            let Ok(off) = ctx.load::<u8>((ihl + 12) as usize) else {
                return true;
            };
            u32::from(u16::from_be_bytes(total)) > ihl + u32::from(off >> 4) * 4
        }
        6 => {
            let (Ok(plen), Ok(next)) = (ctx.load::<[u8; 2]>(4), ctx.load::<u8>(6)) else {
                return true;
            };
            // Extension headers: not a plain TCP packet.
            if next != 6 {
                return true;
            }
            let Ok(off) = ctx.load::<u8>(40 + 12) else {
                return true;
            };
            u32::from(u16::from_be_bytes(plen)) > u32::from(off >> 4) * 4
        }
        _ => true,
    }
}
