//! `cgroup/sendmsg4` and `cgroup/sendmsg6`: unconnected UDP sends that carry an address
//! (`sendto`/`sendmsg`). Connected UDP sockets were already judged in connect4/6.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    connect::{port_be, socket_mark, user_ip4, user_ip6},
    decide::{PROCEED, REJECT, Transport, V4, Verdict, decide, v4_mapped, v6},
};

#[inline(always)]
fn code(v: Verdict) -> i32 {
    // UDP is never redirected (decide only redirects TCP); anything but Allow rejects.
    if v == Verdict::Allow { PROCEED } else { REJECT }
}

#[cgroup_sock_addr(sendmsg4)]
pub fn passthrough_sendmsg4(ctx: SockAddrContext) -> i32 {
    code(decide(
        V4(user_ip4(&ctx)),
        port_be(&ctx),
        Transport::Udp,
        socket_mark(&ctx),
    ))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn passthrough_sendmsg6(ctx: SockAddrContext) -> i32 {
    let words = user_ip6(&ctx);
    code(match v4_mapped(words) {
        Some(v4) => decide(v4, port_be(&ctx), Transport::Udp, socket_mark(&ctx)),
        None => decide(v6(words), port_be(&ctx), Transport::Udp, socket_mark(&ctx)),
    })
}
