//! Maps shared by every program. Sizes are defaults; the loader may override `max_entries`.

use aya_ebpf::{
    btf_maps::SkStorage,
    helpers::bpf_get_prandom_u32,
    macros::{btf_map, map},
    maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf, SockHash,
        ring_buf::RingBufEntry,
    },
};
use passthrough_common::{
    DomainPortKey, GlobalConfig, OrigDst, PeerKey, RangeBlock, RangeTable, RangeTableKey,
    RuleKeyV6, RuleValue, SniSock, TcpOffsets, VerifiedKey, VerifiedValue, WorkloadEntry,
    WorkloadKey, counter,
    sni::{SniNameKey, SniNameValue, SniTable, SniTableKey},
};

/// Index 0: [`GlobalConfig`] (active generation, flags).
#[map]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// `{generation, cgroup id}` → the workload's rule set and mode.
#[map]
pub static WORKLOADS: HashMap<WorkloadKey, WorkloadEntry> = HashMap::with_max_entries(16_384, 0);

/// `BPF_F_MMAPABLE`: the loader writes whole tables with one `memcpy` into the mapping.
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_F_NO_PREALLOC`: entries are allocated as written (a table per rule set and port).
const BPF_F_NO_PREALLOC: u32 = 1;

/// IPv4 allow rules: the blocks of every table's search tree; generation `g` owns the half
/// `[g * len/2, (g + 1) * len/2)`. See `passthrough_common::range_covers`.
#[map]
pub static RANGES_V4: Array<RangeBlock> = Array::with_max_entries(139_264 * 2, BPF_F_MMAPABLE);

/// `{rule set, port}` → where its IPv4 table lives in [`RANGES_V4`].
#[map]
pub static RANGE_INDEX_V4: HashMap<RangeTableKey, RangeTable> =
    HashMap::with_max_entries(65_536, BPF_F_NO_PREALLOC);

/// IPv6 allow rules: `ruleset ‖ port ‖ addr/len` → match id.
#[map]
pub static RULES_V6: LpmTrie<RuleKeyV6, RuleValue> = LpmTrie::with_max_entries(1_048_576, 0);

/// Rule sets with a Domain match at a port (0 = every port): rule 4 candidates.
#[map]
pub static DOMAIN_PORTS: HashMap<DomainPortKey, u8> = HashMap::with_max_entries(65_536, 0);

/// Socket cookie → original destination of a redirected connection (for getpeername and
/// for sock_ops to re-key). LRU: entries of closed sockets age out instead of leaking.
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(65_536, 0);

/// Client address:port → original destination, written by sock_ops once the source port is
/// bound; the proxy looks accepted connections up here (and deletes the entry).
#[map]
pub static ORIG_BY_PEER: LruHashMap<PeerKey, OrigDst> = LruHashMap::with_max_entries(65_536, 0);

/// TLS fast path: destinations verified (by DNS) for a name that a rule set allows over TLS
/// at a port, until an expiry. LRU: a full map forgets the oldest, whose next connection
/// simply takes the proxy (and is learned again).
#[map]
pub static VERIFIED: LruHashMap<VerifiedKey, VerifiedValue> =
    LruHashMap::with_max_entries(65_536, 0);

/// TLS fast path: `{rule set, port}` → the id of its table of TLS Domain patterns.
#[map]
pub static SNI_TABLES: HashMap<SniTableKey, SniTable> = HashMap::with_max_entries(65_536, 0);

/// TLS fast path: `table ‖ reversed name` → how many labels a name under it needs. One
/// longest-prefix lookup finds an exact name and every `*.` wildcard above it (see
/// `passthrough_common::sni::SniNameKey`).
#[map]
pub static SNI_NAMES: LpmTrie<SniNameKey, SniNameValue> = LpmTrie::with_max_entries(262_144, 0);

/// TLS fast path: sockets whose ClientHello is still to be judged, keyed by socket cookie.
/// The `sk_msg` judge is attached to this map, so it runs for exactly these sockets, and only
/// until they leave it.
#[map]
pub static SNI_SOCKS: SockHash<u64> = SockHash::with_max_entries(65_536, 0);

/// TLS fast path: the judge's later phases (`sni.rs`), reached by tail calls: each phase is
/// verified on its own, which keeps every program far below the verifier's limits.
#[map]
pub static SNI_PROGS: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// TLS fast path: the state of each direct-connected candidate socket (socket storage: it
/// lives and dies with the socket, and costs nothing for any other socket).
#[btf_map]
pub static SNI_STATE: SkStorage<SniSock> = SkStorage::new();

/// `struct tcp_sock` offsets of the running kernel, written by the loader from its BTF
/// (a read-only global: the verifier sees constants).
#[unsafe(no_mangle)]
pub static PT_TCP_OFFSETS: TcpOffsets = TcpOffsets {
    write_seq: 0,
    fastopen_req: 0,
    fastopen_connect_byte: 0,
    fastopen_connect_mask: 0,
};

/// Reads [`PT_TCP_OFFSETS`] so that the compiler cannot fold the zeros in.
#[inline(always)]
pub fn tcp_offsets() -> TcpOffsets {
    // SAFETY: a static, read through a volatile load.
    unsafe { core::ptr::read_volatile(&PT_TCP_OFFSETS) }
}

/// Denials for the agent's structured log (256 KiB; full → dropped and counted).
#[map]
pub static DENY_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Allowed egress decisions for watchers (`passthrough monitor`, the decision log), written
/// only while `CONFIG` has `flags::MONITOR` (512 KiB; full → dropped and counted in
/// [`MONITOR_DROPS`]). Not pinned: each agent reads its own programs' buffer.
#[map]
pub static MONITOR_EVENTS: RingBuf = RingBuf::with_byte_size(512 * 1024, 0);

/// Allowed decisions a full [`MONITOR_EVENTS`] could not take (per CPU, one slot).
#[map]
pub static MONITOR_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A [`MONITOR_EVENTS`] slot for one reported decision, or `None`: not sampled this time (1 in
/// 2^`sample_shift` is), or the ring is full, counted in [`MONITOR_DROPS`] (a watcher never
/// makes enforcement wait).
#[inline(always)]
pub fn monitor_slot<T: 'static>(sample_shift: u32) -> Option<RingBufEntry<T>> {
    let mask = (1u32 << (sample_shift & 0xf)) - 1;
    // SAFETY: no preconditions.
    if mask != 0 && unsafe { bpf_get_prandom_u32() } & mask != 0 {
        return None;
    }
    let slot = MONITOR_EVENTS.reserve::<T>(0);
    if slot.is_none()
        && let Some(n) = MONITOR_DROPS.get_ptr_mut(0)
    {
        // Per-CPU slot; programs are not preempted mid-run on one CPU.
        unsafe { *n += 1 };
    }
    slot
}

/// Per-CPU verdict counters, indexed by [`counter`].
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot and programs are not preempted mid-run on the same CPU: a plain add is safe.
        unsafe { *slot += 1 };
    }
}

/// Test-only (`view_probe.rs`): the generation the probe read, plus one (0: not run yet).
#[map]
pub static VIEW_PROBE: Array<u32> = Array::with_max_entries(1, 0);
