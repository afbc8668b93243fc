//! MPTCP subflows are judged for the connection's owner, not for the kernel worker that opens
//! them (used by connect4/6; not a program of its own).
//!
//! Why: an MPTCP connection (`socket(…, IPPROTO_MPTCP)`) is judged at its first connect like
//! any TCP connection, in the connecting task. The kernel then opens further subflows itself,
//! for example to an address the server announces (`ADD_ADDR`, accepted when the node's MPTCP
//! limits allow it). It connects them from a kernel worker (`mptcp_worker` →
//! `__mptcp_subflow_connect` → `kernel_connect`). The subflow socket carries the connection's
//! cgroup (`mptcp_attach_cgroup`), so connect4/6 run, but the *current task* is the worker, in
//! the root cgroup: judged by the task, every subflow got `--unselected-mode` (default `All`)
//! and a server could lead a workload's connection to any host.
//!
//! How: connect4/6 ask `bpf_skc_to_mptcp_sock` whether the socket is an MPTCP subflow (one
//! helper call per connect; `NULL` for every other socket). At the connection's first connect
//! the connecting task's cgroup ids (its own and every ancestor's), pid and command are stored
//! in socket-local storage of the MPTCP socket (`MPTCP_OWNERS`; it lives and dies with the
//! socket). A later connect of one of its subflows from any other cgroup is judged for that
//! stored owner, exactly as if the owner had called connect(), except that a subflow is never
//! redirected to the proxy (it cannot join an MPTCP connection; a Domain-only address is
//! denied). A connect from the owner's own cgroup is the owner's and judged as usual.
//!
//! A subflow connect from the root cgroup (a kernel worker) of a connection with no stored
//! owner is denied (`subflow_owner_unknown`): the connection was opened before the
//! programs were attached, or accepted by a workload's MPTCP server (no connect ran). Nobody's
//! policy can be applied to it, and the unselected mode must not be.

use aya_ebpf::{
    btf_maps::SkStorage,
    cty::c_void,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_sk_storage_delete, bpf_sk_storage_get, bpf_skc_to_mptcp_sock,
    },
    macros::btf_map,
    programs::SockAddrContext,
};
use passthrough_common::{MAX_CGROUP_DEPTH, MptcpOwner};

use passthrough_common::decide::Caller;

/// MPTCP socket → its owner (see [`MptcpOwner`]).
#[btf_map]
pub static MPTCP_OWNERS: SkStorage<MptcpOwner> = SkStorage::new();

/// `BPF_SK_STORAGE_GET_F_CREATE`.
const F_CREATE: u64 = 1;

/// The cgroup v2 root's id: kernel threads (the MPTCP worker included) live there.
const ROOT_CGROUP_ID: u64 = 1;

/// Who a connect is judged for.
pub enum Subject {
    /// The calling task: every socket but an MPTCP subflow, the owner's own connects, and the
    /// first connect of an MPTCP connection (its task is recorded as the owner right away;
    /// [`forget_owner`] takes the record back if the connect is refused).
    Task,
    /// A subflow opened by someone else than the owner: judged for the stored owner.
    Owner(Owner),
    /// A kernel worker's subflow of a connection with no stored owner: denied.
    Unknown,
}

/// Who the connect on `ctx`'s socket is judged for.
#[inline(always)]
pub fn subject(ctx: &SockAddrContext) -> Subject {
    // SAFETY: `sk` is always set for sock_addr programs (checked anyway).
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return Subject::Task;
    }
    // SAFETY: the helper takes any socket pointer and returns NULL unless it is a subflow.
    let msk = unsafe { bpf_skc_to_mptcp_sock(sk.cast()) };
    if msk.is_null() {
        return Subject::Task;
    }
    let msk: *mut c_void = msk.cast();
    let map: *mut c_void = core::ptr::from_ref(&MPTCP_OWNERS).cast_mut().cast();
    // SAFETY: `msk` is the helper's socket pointer; a lookup without creating.
    let owner: *mut MptcpOwner =
        unsafe { bpf_sk_storage_get(map, msk, core::ptr::null_mut(), 0) }.cast();
    let current = unsafe { bpf_get_current_cgroup_id() };
    if owner.is_null() {
        if current == ROOT_CGROUP_ID {
            return Subject::Unknown;
        }
        // Recorded before the decision, so that nothing of this lookup stays live across it
        // (the verifier would otherwise walk the whole decision once more for this path).
        record_owner(msk);
        return Subject::Task;
    }
    // SAFETY: non-null storage value of this map's value type.
    if unsafe { (*owner).cgroups[0] } == current {
        return Subject::Task;
    }
    Subject::Owner(Owner(owner))
}

/// Records the calling task as the owner of the MPTCP socket `msk` (at its first connect).
/// Fails closed: without a record, a worker's later subflow is denied.
#[inline(always)]
fn record_owner(msk: *mut c_void) {
    let map: *mut c_void = core::ptr::from_ref(&MPTCP_OWNERS).cast_mut().cast();
    // SAFETY: `msk` came from bpf_skc_to_mptcp_sock in this program run.
    let owner: *mut MptcpOwner =
        unsafe { bpf_sk_storage_get(map, msk, core::ptr::null_mut(), F_CREATE) }.cast();
    if owner.is_null() {
        return;
    }
    // SAFETY: non-null storage value of this map's value type, written by this run only.
    let o = unsafe { &mut *owner };
    o.cgroups[0] = unsafe { bpf_get_current_cgroup_id() };
    let mut level = 1usize;
    while level < MAX_CGROUP_DEPTH as usize {
        o.cgroups[level] = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        level += 1;
    }
    o.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    o.comm = bpf_get_current_comm().unwrap_or([0; 16]);
}

/// After a connect judged for the task was refused: removes the owner record of its MPTCP
/// socket, if it is one (the next connect records its caller again). A refused connect
/// establishes nothing, and a connect from the owner's cgroup or with no record is only ever
/// a connection's first (the kernel's own subflows come from the root cgroup).
#[inline(always)]
pub fn forget_owner(ctx: &SockAddrContext) {
    // SAFETY: as in `subject`.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let msk = unsafe { bpf_skc_to_mptcp_sock(sk.cast()) };
    if msk.is_null() {
        return;
    }
    let map: *mut c_void = core::ptr::from_ref(&MPTCP_OWNERS).cast_mut().cast();
    // SAFETY: the helper's socket pointer; deleting an absent record is harmless.
    unsafe { bpf_sk_storage_delete(map, msk.cast()) };
}

/// The stored owner of an MPTCP connection, as the caller whose policy applies.
#[derive(Clone, Copy)]
pub struct Owner(*mut MptcpOwner);

impl Caller for Owner {
    #[inline(always)]
    fn cgroup_id(&self) -> u64 {
        // SAFETY: a non-null storage value (see `subject`).
        unsafe { (*self.0).cgroups[0] }
    }
    #[inline(always)]
    fn ancestor_cgroup_id(&self, level: i32) -> u64 {
        let level = level as usize;
        if level == 0 || level >= MAX_CGROUP_DEPTH as usize {
            return 0;
        }
        // SAFETY: as above; index checked.
        unsafe { (*self.0).cgroups[level] }
    }
    #[inline(always)]
    fn process(&self) -> (u32, [u8; 16]) {
        // SAFETY: as above.
        unsafe { ((*self.0).pid, (*self.0).comm) }
    }
}
