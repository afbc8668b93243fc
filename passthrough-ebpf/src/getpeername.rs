//! `cgroup/getpeername4` and `cgroup/getpeername6`: a redirected client asking for its peer
//! gets the destination it dialled, not the proxy's address (apps log and verify peers).

use aya_ebpf::{
    EbpfContext as _, helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};

use crate::{
    addr::bytes_to_words,
    connect::{set_port_be, set_user_ip4, set_user_ip6},
    decide::PROCEED,
    maps::ORIG_BY_COOKIE,
};

#[cgroup_sock_addr(getpeername4)]
pub fn passthrough_getpeername4(ctx: SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(&cookie) } {
        let a = orig.addr;
        set_user_ip4(&ctx, [a[12], a[13], a[14], a[15]]);
        set_port_be(&ctx, orig.port_be);
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn passthrough_getpeername6(ctx: SockAddrContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Some(orig) = unsafe { ORIG_BY_COOKIE.get(&cookie) } {
        set_user_ip6(&ctx, bytes_to_words(&orig.addr));
        set_port_be(&ctx, orig.port_be);
    }
    PROCEED
}
