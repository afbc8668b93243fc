//! `sockops`: re-keys a redirected connection's original destination from the socket cookie
//! (all connect4/6 can know) to the client's address and port, which is all the proxy knows
//! about an accepted connection.
//!
//! Why `TCP_CONNECT_CB`: it runs in `tcp_connect()` after the source address and port are
//! bound and before the SYN leaves, so the entry exists before the proxy can accept.

use aya_ebpf::{
    EbpfContext as _, bindings::BPF_SOCK_OPS_TCP_CONNECT_CB, helpers::bpf_get_socket_cookie,
    macros::sock_ops, programs::SockOpsContext,
};
use passthrough_common::PeerKey;

use crate::{
    log::{self, L},
    maps::{ORIG_BY_COOKIE, ORIG_BY_PEER},
};

const AF_INET: u32 = 2;

#[sock_ops]
pub fn passthrough_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else {
        return 1;
    };
    let orig = *orig;
    // Keys are IPv6-shaped; an IPv4 client is `::ffff:a.b.c.d`, as the proxy normalises too.
    // Every context field is read up front, unconditionally, one 32-bit volatile load each:
    // reading them inside the family branches let LLVM merge the two loads into one through
    // an offset ctx pointer, which the verifier refuses ("dereference of modified ctx ptr").
    let ops = ctx.ops;
    let (ip4, w, port) = unsafe {
        (
            core::ptr::read_volatile(&(*ops).local_ip4),
            [
                core::ptr::read_volatile(&(*ops).local_ip6[0]),
                core::ptr::read_volatile(&(*ops).local_ip6[1]),
                core::ptr::read_volatile(&(*ops).local_ip6[2]),
                core::ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
            core::ptr::read_volatile(&(*ops).local_port),
        )
    };
    let addr = if ctx.family() == AF_INET {
        let b = ip4.to_ne_bytes();
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
        ]
    } else {
        crate::addr::words_to_bytes(w)
    };
    let key = PeerKey { addr, port };
    if let Err(errno) = ORIG_BY_PEER.insert(&key, &orig, 0) {
        // The proxy will not find this connection's destination and will close it.
        if log::on(L::Error) {
            log::orig_peer_insert_failed(errno, port);
        }
    }
    1
}
