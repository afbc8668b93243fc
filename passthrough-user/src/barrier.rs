//! A barrier the kernel guarantees: wait until every BPF program that might still be running
//! has finished.
//!
//! A policy swap flips `CONFIG.active_generation`; a program that read the old index just before
//! the flip goes on using the old generation's entries until it returns. Those entries (and the
//! old half of `RANGES_V4`) may be deleted or overwritten only after every such program is done.
//! A timer cannot promise that (a program can be preempted or interrupted for longer); an RCU
//! grace period can: our programs are non-sleepable, and the kernel runs cgroup programs
//! (sock_addr, skb, sock_ops) inside `rcu_read_lock()` (`bpf_prog_run_array_cg`), so once a
//! grace period has elapsed after the flip, no program that saw the old index is running.
//!
//! The kernel offers that wait to user space through map-in-map updates: after updating an
//! element of an `ARRAY_OF_MAPS` or `HASH_OF_MAPS`, the `bpf()` syscall calls
//! `synchronize_rcu()` before it returns (`maybe_wait_bpf_programs()` in
//! `kernel/bpf/syscall.c`: "wait for any running non-sleepable BPF programs to complete so
//! that userspace, when we return to it, knows that all non-sleepable programs that could be
//! running use the new map value"). [`ProgramBarrier::wait`] is one such update, of a private
//! one-slot `ARRAY_OF_MAPS` that no program references: its only job is the wait.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

/// `union bpf_attr` for `BPF_MAP_CREATE`, up to `map_name` (the kernel zero-fills the rest).
#[repr(C)]
#[derive(Default)]
struct CreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr` for element commands.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// A private map-in-map whose updates wait for a grace period (module doc).
#[derive(Debug)]
pub struct ProgramBarrier {
    /// The one-slot `ARRAY_OF_MAPS` that is updated.
    outer: OwnedFd,
    /// The map stored into it, again and again.
    inner: OwnedFd,
}

/// One `BPF_MAP_CREATE`.
fn create(attr: &CreateAttr) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr prefix of the advertised size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            attr as *const CreateAttr,
            std::mem::size_of::<CreateAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn name(s: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    let n = s.len().min(15);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

impl ProgramBarrier {
    /// Creates the two maps (a few hundred bytes of kernel memory).
    pub fn new() -> io::Result<Self> {
        let inner = create(&CreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            map_name: name("pt_barrier_in"),
            ..Default::default()
        })?;
        let outer = create(&CreateAttr {
            map_type: BPF_MAP_TYPE_ARRAY_OF_MAPS,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            inner_map_fd: inner.as_raw_fd() as u32,
            map_name: name("pt_barrier"),
            ..Default::default()
        })?;
        Ok(ProgramBarrier { outer, inner })
    }

    /// Returns once every BPF program running when it was called has finished (one RCU grace
    /// period, typically a few milliseconds; it blocks the calling thread).
    pub fn wait(&self) -> io::Result<()> {
        let key: u32 = 0;
        let value: u32 = self.inner.as_raw_fd() as u32;
        let mut attr = ElemAttr {
            map_fd: self.outer.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            flags: 0, // BPF_ANY
        };
        // SAFETY: `attr` is a valid bpf_attr prefix; key and value point at u32s that outlive
        // the call (an ARRAY_OF_MAPS takes a u32 key and a map fd as value).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_ELEM,
                &mut attr as *mut ElemAttr,
                std::mem::size_of::<ElemAttr>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
