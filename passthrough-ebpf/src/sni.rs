//! The TLS fast path: a TLS-only Domain candidate to a verified destination connects directly,
//! and its ClientHello is judged here, in the kernel, before any byte of it leaves the host.
//!
//! The life of such a socket (docs/design.md, "The TLS fast path"):
//!
//! 1. `connect4/6`: the shared decision (`passthrough_common::decide`) says
//!    `Verdict::KernelSni` — rule 4 applies, the rule set has only `tls` Domain matches at this
//!    port, the destination is in `VERIFIED`, and the socket is not using TCP Fast Open
//!    ([`uses_fast_open`]). [`go_direct`] lets the connection proceed to the real destination
//!    and gives the socket an `SNI_STATE` storage in state `PENDING`. Anything else takes the
//!    proxy, as before.
//! 2. `sock_ops` at `ACTIVE_ESTABLISHED_CB` ([`enrol`]): the handshake is done (the SYN and the
//!    final ACK carry no payload); the socket goes into `SNI_SOCKS`, whose `sk_msg` program
//!    ([`passthrough_sni`]) now runs inside every `sendmsg` on it, before the bytes reach TCP.
//! 3. [`passthrough_sni`]: corks the sends until the ClientHello's records are complete, parses
//!    it with the shared judge (`passthrough_common::sni`), normalises the name and looks it up
//!    in the rule set's table. Allowed: the bytes go, and the verdict covers every later byte.
//!    Refused: the send fails (`EACCES`), the socket is `DENIED` (every later send fails too), a
//!    denial event goes to the agent, which resets the connection.
//! 4. `sock_ops` at the first `RTT_CB` after an allowed hello ([`on_ack`]): the socket leaves
//!    `SNI_SOCKS`, so the rest of the connection runs on the plain TCP send path (its storage,
//!    `ALLOWED`, goes with the socket).
//!
//! Why a backstop as well ([`backstop`], in the egress program): the `sk_msg` hook only sees
//! sends that enter through the socket's protocol `sendmsg` *after* enrolment. A send that was
//! already inside `tcp_sendmsg` (blocked in `sk_stream_wait_connect` while the handshake ran,
//! or preempted between reading `sk->sk_prot` and locking the socket) reaches TCP unjudged. So
//! no packet with payload may leave a `PENDING` or `DENIED` socket, and the judge refuses a
//! hello when anything entered the stream before it (`write_seq` moved since enrolment).

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_RTT_CB_FLAG, bpf_sock, sk_action,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_msg_apply_bytes, bpf_msg_cork_bytes,
        bpf_msg_pull_data, bpf_skc_to_tcp_sock,
        generated::{
            bpf_map_delete_elem, bpf_probe_read_kernel, bpf_sk_storage_delete, bpf_sk_storage_get,
        },
    },
    macros::sk_msg,
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
};
use passthrough_common::{
    DenyEvent, Reason, SniDenyEvent, SniSock, counter,
    decide::{Maps as _, judge_name, kernel_sni_decided, stop_reason},
    flags,
    sni::{self, KERNEL_LIMITS, SNI_KEY_NAME, Stop, Stream, scan_flag},
    sni_state,
};

use crate::{
    decide::{KernelMaps, PROCEED, REJECT},
    maps::{DENY_EVENTS, SNI_PROGS, SNI_SOCKS, SNI_STATE, count, monitor_slot, tcp_offsets},
};

/// The `SNI_STATE` storage of `sk`, created (zeroed) when `create`; null when there is none.
#[inline(always)]
fn state(sk: *mut c_void, create: bool) -> *mut SniSock {
    let flags = if create {
        u64::from(BPF_SK_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    // SAFETY: the map is a socket storage map; the helper checks `sk`.
    unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&SNI_STATE).cast_mut().cast(),
            sk,
            ptr::null_mut(),
            flags,
        )
        .cast()
    }
}

/// The socket as a `tcp_sock` BTF pointer (null when it is not a TCP socket).
#[inline(always)]
fn tcp_sock(sk: *mut c_void) -> *const u8 {
    // SAFETY: the helper checks its argument and returns null for anything else.
    unsafe { bpf_skc_to_tcp_sock(sk) as *const u8 }
}

/// Whether the socket will carry data in its SYN: `sendto(MSG_FASTOPEN)` is connecting it
/// (`fastopen_req` is set before the connect hook runs) or `TCP_FASTOPEN_CONNECT` is on (set
/// only before connect; the first `sendmsg` then sends the SYN with data). Such bytes leave in
/// the SYN, before any `sk_msg` program could see them, so the connection takes the proxy.
/// Unknown offsets count as Fast Open (the agent never turns the fast path on without them).
#[inline(always)]
pub fn uses_fast_open(sk: *mut c_void) -> bool {
    let off = tcp_offsets();
    if off.fastopen_req == 0 || off.fastopen_connect_byte == 0 {
        return true;
    }
    let tp = tcp_sock(sk);
    if tp.is_null() {
        return true;
    }
    // SAFETY: constant offsets into the verifier-checked `tcp_sock` (see PT_TCP_OFFSETS).
    let (req, connect) = unsafe {
        (
            ptr::read_volatile(tp.add(off.fastopen_req as usize) as *const u64),
            ptr::read_volatile(tp.add(off.fastopen_connect_byte as usize)),
        )
    };
    req != 0 || u32::from(connect) & off.fastopen_connect_mask != 0
}

/// The socket's `write_seq`, `None` when it cannot be read.
#[inline(always)]
fn write_seq(sk: *mut c_void) -> Option<u32> {
    let off = tcp_offsets().write_seq;
    if off == 0 {
        return None;
    }
    let tp = tcp_sock(sk);
    if tp.is_null() {
        return None;
    }
    // SAFETY: as in `uses_fast_open`.
    Some(unsafe { ptr::read_volatile(tp.add(off as usize) as *const u32) })
}

/// connect4/6 on `Verdict::KernelSni`: the connection goes directly to `addr` (the destination
/// as `::ffff:a.b.c.d` for IPv4), its socket `PENDING` until the judge has seen its hello.
/// Without a storage for the socket (out of memory) nothing could hold its sends back, so the
/// connect is refused, as when the proxy's original destination cannot be recorded.
#[inline(always)]
pub fn go_direct(
    ctx: &SockAddrContext,
    addr: [u8; 16],
    port_be: u16,
    family: u16,
    workload: u64,
) -> i32 {
    // SAFETY: sock_addr programs always have a socket.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk } as *mut c_void;
    let st = state(sk, true);
    if st.is_null() {
        return REJECT;
    }
    // SAFETY: a storage pointer is valid for this run; the socket is locked (connect).
    let st = unsafe { &mut *st };
    st.state = sni_state::PENDING;
    st.reason = 0;
    st.workload = workload;
    st.addr = addr;
    st.port = u16::from_be(port_be);
    st.family = family;
    st.seq0 = 0;
    st.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: no preconditions.
    let cg = unsafe { bpf_get_current_cgroup_id() };
    st.cgroup_lo = cg as u32;
    st.cgroup_hi = (cg >> 32) as u32;
    st.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    PROCEED
}

/// connect4/6 for every other TCP connect: a socket reconnecting (after a failed connect) must
/// not keep the fast-path state of an earlier attempt.
#[inline(always)]
pub fn forget(ctx: &SockAddrContext) {
    // SAFETY: as in `go_direct`; deleting a storage that does not exist is a no-op.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        let _ = bpf_sk_storage_delete(ptr::from_ref(&SNI_STATE).cast_mut().cast(), sk.cast());
    }
}

/// sock_ops at `ACTIVE_ESTABLISHED_CB`: enrols a `PENDING` socket for the judge.
///
/// Why here: a socket can only enter a SOCKHASH established (or listening), and from sock_ops
/// only at the established callbacks. This one runs in `tcp_finish_connect`, under the socket
/// lock, before the connecting task is woken, so a task that connected and then sends finds
/// the judge in place. The handshake itself carries no payload (Fast Open takes the proxy).
#[inline(always)]
pub fn enrol(ctx: &SockOpsContext) {
    // SAFETY: established callbacks run with a full socket.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk } as *mut c_void;
    if sk.is_null() {
        return;
    }
    let st = state(sk, false);
    if st.is_null() {
        return;
    }
    // SAFETY: as in `go_direct`.
    let st = unsafe { &mut *st };
    if st.state != sni_state::PENDING {
        return;
    }
    // SAFETY: context fields, each read whole (see `sock_ops.rs` on why up front).
    let ops = ctx.ops;
    let (snd_nxt, family, ip4, ip6, lport) = unsafe {
        (
            ptr::read_volatile(&(*ops).snd_nxt),
            ptr::read_volatile(&(*ops).family),
            ptr::read_volatile(&(*ops).local_ip4),
            [
                ptr::read_volatile(&(*ops).local_ip6[0]),
                ptr::read_volatile(&(*ops).local_ip6[1]),
                ptr::read_volatile(&(*ops).local_ip6[2]),
                ptr::read_volatile(&(*ops).local_ip6[3]),
            ],
            ptr::read_volatile(&(*ops).local_port),
        )
    };
    st.seq0 = snd_nxt;
    st.local_port = lport as u16;
    if family == AF_INET {
        let b = ip4.to_ne_bytes();
        st.sock_family = 4;
        st.local_addr = [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
        ];
    } else {
        st.sock_family = 6;
        st.local_addr = crate::addr::words_to_bytes(ip6);
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the context is the sock_ops context of an established callback.
    if SNI_SOCKS
        .update(cookie, unsafe { &mut *ctx.ops }, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // Not judged in the kernel, and too late for the proxy: refused.
        deny(st, Reason::Unjudged);
        return;
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
}

/// sock_ops at `RTT_CB` (asked for by [`enrol`]): the first ACK after an allowed hello takes
/// the socket out of the fast-path machinery.
///
/// Why at an ACK: an `sk_msg` program cannot remove its own socket from a SOCKHASH (it runs
/// with the socket locked), sock_ops may. Leaving the map restores the socket's original
/// protocol operations, so every later `sendmsg` is the plain TCP one.
///
/// Why the storage stays (`ALLOWED`) until the socket is freed: a storage a program deletes
/// is freed after an RCU Tasks Trace grace period (a callback through the `rcu_tasks_trace`
/// kthread per connection), one freed with its socket after a plain RCU grace period. The
/// egress backstop finds it `ALLOWED` in one cached lookup.
#[inline(always)]
pub fn on_ack(ctx: &SockOpsContext) {
    // SAFETY: as in `enrol`.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk } as *mut c_void;
    if sk.is_null() {
        return;
    }
    let st = state(sk, false);
    if st.is_null() {
        let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
        return;
    }
    // SAFETY: as in `go_direct`.
    let s = unsafe { (*st).state };
    if s == sni_state::PENDING {
        return;
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
    if s == sni_state::ALLOWED {
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: sock_ops may delete from a SOCKHASH; the key is on the stack.
        unsafe {
            let _ = bpf_map_delete_elem(
                ptr::from_ref(&SNI_SOCKS).cast_mut().cast(),
                ptr::from_ref(&cookie).cast(),
            );
        }
    }
}

/// The egress backstop's part: `false` when this TCP packet of `sk` must not leave (it carries
/// payload and the socket's hello has not been allowed). `payload` is computed by the caller.
#[inline(always)]
pub fn backstop(sk: *mut bpf_sock, has_payload: impl FnOnce() -> bool) -> bool {
    let st = state(sk.cast(), false);
    if st.is_null() {
        return true;
    }
    // SAFETY: as in `go_direct` (the egress path holds the socket).
    let st = unsafe { &mut *st };
    if st.state == sni_state::ALLOWED || !has_payload() {
        return true;
    }
    if st.state == sni_state::PENDING {
        deny(st, Reason::Unjudged);
    }
    false
}

const AF_INET: u32 = 2;

/// Counts a denial, marks the socket refused and reports it.
#[inline(always)]
fn deny(st: &mut SniSock, reason: Reason) {
    let _ = kernel_sni_decided(&KernelMaps, reason);
    refuse(st, reason);
}

/// Marks the socket refused and reports it (counted by the caller). Never a would-be denial:
/// `--audit` keeps the fast path off, its would-be denials are the proxy's to report.
#[inline(always)]
fn refuse(st: &mut SniSock, reason: Reason) {
    st.state = sni_state::DENIED;
    st.reason = reason as u32;
    let Some(mut slot) = DENY_EVENTS.reserve::<SniDenyEvent>(0) else {
        count(counter::EVENTS_DROPPED);
        return;
    };
    // The name, when the judge got as far as reading it (reversed, as it keeps it).
    let named = matches!(
        reason,
        Reason::NoDomainMatch | Reason::BadName | Reason::IpLiteral
    ) && st.scan.flags & scan_flag::HOST != 0;
    let sni_len = if named {
        st.scan.host[1].min(SNI_KEY_NAME as u32)
    } else {
        0
    };
    // SAFETY: a reserved, writable record of this type.
    unsafe { fill(slot.as_mut_ptr(), st, reason, sni_len) };
    slot.submit(0);
}

/// An allowed hello, for whoever watches (`passthrough monitor`, the decision log): reported
/// into `MONITOR_EVENTS` only while `CONFIG` has `flags::MONITOR` and its lease holds, sampled
/// as the connect programs' allowed decisions are (1 in 2^shift), with the name the judge
/// allowed (`len` bytes of `lookup.key.name`, normalised; 0 when it had none). Nobody
/// watching: one lookup of the `CONFIG` array and one flag test. A full ring drops the record
/// and counts it in `MONITOR_DROPS`; the bytes have already gone either way.
#[inline(always)]
fn watched(st: &SniSock, reason: Reason, len: u32) {
    if cfg!(feature = "no-monitor") {
        return;
    }
    let Some(cfg) = KernelMaps.config() else {
        return;
    };
    // SAFETY: a map value, read once (the agent rewrites it in place).
    let (bits, lease) = unsafe {
        (
            ptr::read_volatile(&cfg.flags),
            ptr::read_volatile(&cfg.monitor_lease),
        )
    };
    if bits & flags::MONITOR == 0 {
        return;
    }
    // SAFETY: no preconditions.
    if !flags::monitor_live(lease, unsafe { bpf_ktime_get_ns() }) {
        return;
    }
    let Some(mut slot) = monitor_slot::<SniDenyEvent>(flags::monitor_shift(bits)) else {
        return;
    };
    // SAFETY: a reserved, writable record of this type.
    unsafe { fill(slot.as_mut_ptr(), st, reason, len.min(SNI_KEY_NAME as u32)) };
    slot.submit(0);
}

/// Writes the record of a verdict on `st` (`reason`, `sni_len` bytes of the name the judge
/// keeps) field by field into `ev`: the record is larger than a program's stack should carry.
///
/// # Safety
/// `ev` points at a reserved, writable ring buffer record of this type.
#[inline(always)]
unsafe fn fill(ev: *mut SniDenyEvent, st: &SniSock, reason: Reason, sni_len: u32) {
    // SAFETY: the caller's.
    unsafe {
        (*ev).base = DenyEvent {
            ktime_ns: bpf_ktime_get_ns(),
            workload: st.workload,
            cgroup: u64::from(st.cgroup_lo) | (u64::from(st.cgroup_hi) << 32),
            addr: st.addr,
            port: st.port,
            protocol: 6,
            audit: 0,
            reason: reason as u32,
            pid: st.pid,
            socket_type: 0,
            comm: st.comm,
        };
        (*ev).local_addr = st.local_addr;
        (*ev).local_port = st.local_port;
        (*ev).sock_family = st.sock_family;
        (*ev).sni_len = sni_len;
        (*ev)._pad = [0; 2];
        // A copy between two kernel buffers the size of the name field (a plain copy of 254
        // bytes would be unrolled into hundreds of instructions).
        let _ = bpf_probe_read_kernel(
            ptr::addr_of_mut!((*ev).sni).cast(),
            SNI_KEY_NAME as u32,
            ptr::addr_of!(st.lookup.key.name).cast(),
        );
    }
}

/// The message bytes after `bpf_msg_pull_data`, as a [`Stream`].
struct MsgBytes {
    data: usize,
    end: usize,
}

/// Offsets past this are never asked for (the judge's limit is below it); masking with it
/// gives the verifier a bounded offset.
const WINDOW: u32 = sni::WINDOW;

impl Stream for MsgBytes {
    #[inline(always)]
    fn byte(&self, at: u32) -> Option<u8> {
        // Read through a volatile load so that LLVM keeps the mask: it can often prove the
        // offset small from earlier checks and drop it, but the verifier cannot always follow
        // those, and a packet offset it cannot bound below 64 KiB is refused.
        // The judge never asks past its limit, which is below WINDOW: the mask changes no
        // offset it uses.
        // SAFETY: a local.
        let at = unsafe { ptr::read_volatile(&at) };
        let p = self.data + (at & (WINDOW - 1)) as usize;
        if p + 1 > self.end {
            return None;
        }
        // SAFETY: `p` is inside [data, data_end), checked above.
        Some(unsafe { *(p as *const u8) })
    }
}

const SK_PASS: u32 = sk_action::SK_PASS;
const SK_DROP: u32 = sk_action::SK_DROP;

/// Every later byte goes with the verdict: the program is not run again for this socket.
const ALL_BYTES: u32 = u32::MAX;

/// The judge, phase 1: runs inside each `sendmsg` of an enrolled socket, before its bytes
/// reach TCP. Corks until the hello's records are complete, then walks them and the hello's
/// extension list ([`sni::scan`]) and hands over to phase 2.
///
/// Why three programs: the verifier walks every path of a program, and the hello parser has
/// loops over records, extensions, list entries and name bytes, whose paths multiply when
/// they sit in one program (past its million-instruction limit). Tail calls start each phase
/// with a fresh verification; what one phase found travels in the socket's storage.
#[sk_msg]
pub fn passthrough_sni(ctx: SkMsgContext) -> u32 {
    let Some(st) = sock_state(&ctx) else {
        return SK_DROP;
    };
    if st.state == sni_state::ALLOWED {
        unsafe { bpf_msg_apply_bytes(ctx.msg, ALL_BYTES) };
        return SK_PASS;
    }
    if st.state != sni_state::PENDING {
        return SK_DROP;
    }
    // SAFETY: a context field.
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk } as *mut c_void;
    // The hello must be the first byte of the stream: nothing may have entered TCP since
    // enrolment (a send that bypassed this program, see the module doc).
    if write_seq(sk) != Some(st.seq0) {
        deny(st, Reason::Unjudged);
        return SK_DROP;
    }
    let size = ctx.size();
    let want = if size < KERNEL_LIMITS.max_bytes {
        size
    } else {
        KERNEL_LIMITS.max_bytes
    };
    // SAFETY: the context is ours; pulling makes [0, want) linear in data..data_end (a
    // no-op when it already is, the common case of a hello sent in one write).
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, want, 0) } != 0 {
        return verdict(&ctx, st, Reason::TooLarge);
    }
    match sni::scan(&bytes(&ctx), &KERNEL_LIMITS, &mut st.scan) {
        Err(Stop::NeedMore(total)) => {
            // Hold the bytes until the stream has `total`; the program runs again then, on all
            // of them. Why SK_DROP: the kernel applies the verdict at once when it cannot cork
            // (the message is full), and an incomplete hello must then be refused, not sent.
            // SAFETY: the context is ours.
            unsafe { bpf_msg_cork_bytes(ctx.msg, total) };
            SK_DROP
        }
        Err(stop) => verdict(&ctx, st, stop_reason(stop)),
        Ok(()) => next_phase(&ctx, st, 0),
    }
}

/// The judge, phase 2: the ALPN and `server_name` lists ([`sni::names`]).
#[sk_msg]
pub fn passthrough_sni_names(ctx: SkMsgContext) -> u32 {
    let Some(st) = sock_state(&ctx) else {
        return SK_DROP;
    };
    if st.state != sni_state::PENDING {
        return SK_DROP;
    }
    match sni::names(&bytes(&ctx), &KERNEL_LIMITS, &mut st.scan) {
        Err(stop) => verdict(&ctx, st, stop_reason(stop)),
        Ok(()) => next_phase(&ctx, st, 1),
    }
}

/// The judge, phase 3: the name, normalised ([`sni::name`]), looked up, and the verdict.
#[sk_msg]
pub fn passthrough_sni_name(ctx: SkMsgContext) -> u32 {
    let Some(st) = sock_state(&ctx) else {
        return SK_DROP;
    };
    if st.state != sni_state::PENDING {
        return SK_DROP;
    }
    match sni::name(&bytes(&ctx), &mut st.scan, &mut st.lookup.key.name) {
        Err(stop) => verdict(&ctx, st, stop_reason(stop)),
        Ok(name) => {
            let reason = judge_name(&KernelMaps, st.workload, st.port, name, &mut st.lookup);
            let action = verdict(&ctx, st, reason);
            // Only an allowed hello reaches a watcher here (a refused one is always reported,
            // by `refuse`), and only from this phase: the others never allow.
            if action == SK_PASS {
                let len = match name {
                    sni::Name::Valid { len, .. } => len,
                    _ => 0,
                };
                watched(st, reason, len);
            }
            action
        }
    }
}

/// The socket's fast-path state (none: nothing can judge it, refuse).
#[inline(always)]
fn sock_state(ctx: &SkMsgContext) -> Option<&'static mut SniSock> {
    // SAFETY: a context field (a full socket).
    let sk = unsafe { (*ctx.msg).__bindgen_anon_3.sk } as *mut c_void;
    if sk.is_null() {
        return None;
    }
    let st = state(sk, false);
    // SAFETY: a storage pointer is valid for this run; the socket is locked while sk_msg runs.
    if st.is_null() {
        None
    } else {
        Some(unsafe { &mut *st })
    }
}

/// The pulled message as a [`Stream`] (a tail call keeps the context, so every phase sees
/// the same bytes).
#[inline(always)]
fn bytes(ctx: &SkMsgContext) -> MsgBytes {
    MsgBytes {
        data: ctx.data(),
        end: ctx.data_end(),
    }
}

/// Tail-calls phase `index` of [`SNI_PROGS`]; when that fails (never once loaded) the hello
/// cannot be judged and is refused.
#[inline(always)]
fn next_phase(ctx: &SkMsgContext, st: &mut SniSock, index: u32) -> u32 {
    // SAFETY: a tail call with our own context; it does not return on success.
    unsafe { SNI_PROGS.tail_call(ctx, index) };
    verdict(ctx, st, Reason::Unjudged)
}

/// Applies a verdict ([`judge_name`]'s, or a stop's): the bytes go and the socket is
/// `ALLOWED` (every later byte goes with them), or nothing goes and it is `DENIED`.
#[inline(always)]
fn verdict(ctx: &SkMsgContext, st: &mut SniSock, reason: Reason) -> u32 {
    if !kernel_sni_decided(&KernelMaps, reason) {
        refuse(st, reason);
        return SK_DROP;
    }
    st.state = sni_state::ALLOWED;
    // SAFETY: the context is ours.
    unsafe { bpf_msg_apply_bytes(ctx.msg, ALL_BYTES) };
    SK_PASS
}
