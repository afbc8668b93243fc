//! `#[repr(C)]` types and constants shared by the eBPF programs (`passthrough-ebpf`) and user
//! space (the plan compiler in `passthrough-policy`, the proxy in `passthrough-proxy`, the
//! loader and agent in `passthrough-user`). Every type here is part of the pinned-map layout: change one and
//! bump [`LAYOUT_VERSION`], so a new agent never reuses pins of an old layout.
#![no_std]
// Inline assembly keeps a few comparisons branch-free in the BPF programs (`sni::cmp`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

pub mod sni;

pub mod decide;
pub mod reason;

pub use reason::Reason;

/// Version of the map layout; part of the pin directory name (`/sys/fs/bpf/passthrough/v<N>`).
pub const LAYOUT_VERSION: u32 = 5;

/// `SO_MARK` the agent's own sockets carry (proxy upstreams, its DNS queries): the programs let
/// them through, but only for callers that belong to no workload (docs/decisions.md rule 1; see
/// docs/security.md). Written into [`GlobalConfig::agent_mark`] by the loader; the proxy marks
/// its upstream sockets with it.
pub const AGENT_MARK: u32 = 0x7074_0001;

/// The workload (cgroup id) the test-only `passthrough_view_probe` program looks up in the
/// generation it read (`passthrough-ebpf/src/view_probe.rs`); no real cgroup has it.
pub const VIEW_PROBE_WORKLOAD: u64 = 0x7074_7669_6577;

/// How many cgroup levels the programs walk up from the caller's cgroup to find its workload.
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// Number of policy generations kept side by side (the active one and the one being built).
pub const GENERATIONS: u32 = 2;

/// `passthroughMode` as the kernel sees it. Zero is deliberately not a mode: a zeroed
/// (never written) entry is treated as `NONE`, so a half-initialised map fails closed.
pub mod mode {
    /// Allow every egress destination.
    pub const ALL: u32 = 1;
    /// Allow only matched destinations.
    pub const MATCHED: u32 = 2;
    /// Deny every egress destination.
    pub const NONE: u32 = 3;
}

/// Reserved rule-set numbers inside a generation (workload rule sets start at [`ruleset::FIRST_WORKLOAD`]).
pub mod ruleset {
    /// `--internal-cidr` ranges: always allowed (docs/decisions.md rule 1).
    pub const INTERNAL: u32 = 0;
    /// Configured DNS resolvers (`/32`, `/128` entries at port 53): allowed for UDP.
    pub const RESOLVERS: u32 = 1;
    /// The first rule set that belongs to a workload.
    pub const FIRST_WORKLOAD: u32 = 2;
    /// The high bit carries the generation, so two generations never share a trie prefix.
    pub const GENERATION_SHIFT: u32 = 31;

    /// The rule-set number as stored in trie keys and workload entries.
    #[inline(always)]
    pub const fn id(generation: u32, index: u32) -> u32 {
        (generation << GENERATION_SHIFT) | index
    }

    /// The generation (0 or 1) a rule-set id belongs to; the inverse of [`id`]'s first part.
    #[inline(always)]
    pub const fn generation(ruleset: u32) -> u32 {
        (ruleset >> GENERATION_SHIFT) & 1
    }
}

/// Bits of [`GlobalConfig::flags`].
pub mod flags {
    /// `--audit`: compute every verdict, count would-be denials, enforce none.
    pub const AUDIT: u32 = 1;
    /// The proxy is running: domain-candidate connections are redirected (else denied).
    pub const PROXY: u32 = 2;
    /// `pod_proxy_v4` is set: workloads in other network namespaces can be redirected (IPv4).
    pub const POD_PROXY_V4: u32 = 4;
    /// `pod_proxy_v6` is set (IPv6).
    pub const POD_PROXY_V6: u32 = 8;
    /// Someone watches (`passthrough monitor`, the decision log): the programs also report
    /// allowed egress decisions (`MONITOR_EVENTS`), 1 in 2^[`monitor_shift`] of them, while
    /// the agent's lease ([`GlobalConfig::monitor_lease`][lease], [`monitor_live`]) has not
    /// run out.
    ///
    /// [lease]: super::GlobalConfig::monitor_lease
    pub const MONITOR: u32 = 16;
    /// First bit of the monitor's sampling shift (4 bits: 1 in 1 … 1 in 32,768).
    pub const MONITOR_SHIFT_BIT: u32 = 8;
    /// The sampling shift's bits, once shifted down.
    pub const MONITOR_SHIFT_MASK: u32 = 0xf;

    /// The sampling shift in `flags`.
    #[inline(always)]
    pub const fn monitor_shift(flags: u32) -> u32 {
        (flags >> MONITOR_SHIFT_BIT) & MONITOR_SHIFT_MASK
    }

    /// Units of [`GlobalConfig::monitor_lease`][lease]: the monotonic clock's nanoseconds
    /// shifted down by this (2^30 ns, about 1.07 s).
    ///
    /// [lease]: super::GlobalConfig::monitor_lease
    pub const MONITOR_LEASE_SHIFT: u32 = 30;
    /// How many lease units past now the agent sets the lease when it renews it (about once a
    /// second while someone watches): a report flag left by an agent that died (SIGKILL: it
    /// could not clear the flag) stops costing anything within about 11 s.
    pub const MONITOR_LEASE_UNITS: u32 = 10;

    /// Whether the monitor's lease `lease` still holds at `now_ns` (`bpf_ktime_get_ns`,
    /// `CLOCK_MONOTONIC`).
    #[inline(always)]
    pub const fn monitor_live(lease: u32, now_ns: u64) -> bool {
        ((now_ns >> MONITOR_LEASE_SHIFT) as u32) <= lease
    }

    /// The lease an agent renewing at `now_ns` writes.
    #[inline(always)]
    pub const fn monitor_lease(now_ns: u64) -> u32 {
        ((now_ns >> MONITOR_LEASE_SHIFT) as u32).saturating_add(MONITOR_LEASE_UNITS)
    }

    /// `flags` with the monitor bits set for (`on`, `shift`); the other bits kept.
    #[inline(always)]
    pub const fn with_monitor(flags: u32, on: bool, shift: u32) -> u32 {
        let cleared = flags & !(MONITOR | (MONITOR_SHIFT_MASK << MONITOR_SHIFT_BIT));
        if on {
            cleared | MONITOR | ((shift & MONITOR_SHIFT_MASK) << MONITOR_SHIFT_BIT)
        } else {
            cleared
        }
    }
    /// `--tls-fast-path=on`: a TLS-only Domain candidate to a verified destination connects
    /// directly and its ClientHello is judged in the kernel (`SNI_SOCKS`, `sni.rs`).
    pub const TLS_FAST_PATH: u32 = 32;
    /// `--no-raw-socket-backstop` while the egress program is attached for the TLS fast path:
    /// raw and ping packets pass unjudged, as without the backstop.
    pub const RAW_BACKSTOP_OFF: u32 = 64;
}

/// Bits of a `DOMAIN_PORTS` value.
pub mod domain_port {
    /// The rule set has a `Domain` match at this port (or a port-less one, at port 0).
    pub const ANY: u8 = 1;
    /// One of them is not `tls` (`http`, `http2`, `grpc`: judged per request): connections
    /// to this port always take the proxy.
    pub const NON_TLS: u8 = 2;
}

/// Key of the `VERIFIED` LRU hash: a destination verified for a name that the rule set allows
/// over TLS at this port (see docs/design.md, "The TLS fast path").
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerifiedKey {
    /// Rule set id (with generation bit).
    pub ruleset: u32,
    /// Destination port, host order.
    pub port: u16,
    /// Explicit padding.
    pub _pad: u16,
    /// Destination address; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
}

/// Value of `VERIFIED`: until when (`bpf_ktime_get_ns`, i.e. `CLOCK_MONOTONIC`) the
/// destination counts as verified.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerifiedValue {
    /// Expiry, monotonic nanoseconds.
    pub expires_ns: u64,
}

/// States of a fast-path socket ([`SniSock::state`]).
pub mod sni_state {
    /// Connected directly; nothing may leave before the ClientHello is judged.
    pub const PENDING: u32 = 1;
    /// The ClientHello was allowed: the socket is leaving the fast-path machinery.
    pub const ALLOWED: u32 = 2;
    /// Refused: every later send fails and no payload packet leaves.
    pub const DENIED: u32 = 3;
}

/// The `SNI_STATE` socket storage of a fast-path socket: created by connect4/6 when it lets a
/// Domain candidate connect directly, read by sock_ops (enrolment), the `sk_msg` judge and
/// the egress backstop.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SniSock {
    /// [`sni_state`].
    pub state: u32,
    /// For [`sni_state::DENIED`]: the [`counter`] index of the reason.
    pub reason: u32,
    /// cgroup id of the workload whose policy applied at connect (0: none).
    pub workload: u64,
    /// Destination as dialled; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Destination port, host order.
    pub port: u16,
    /// 4 or 6, as dialled.
    pub family: u16,
    /// The socket's `write_seq` when it was enrolled: the ClientHello must be the first byte
    /// of the stream, so the judge refuses when anything was queued outside it.
    pub seq0: u32,
    /// Thread-group id of the task that connected.
    pub pid: u32,
    /// cgroup id of the task that connected.
    pub cgroup_lo: u32,
    /// High half of that cgroup id (kept in two halves so the struct has no hole).
    pub cgroup_hi: u32,
    /// The task's command name.
    pub comm: [u8; 16],
    /// What the judge's first phase found in the hello, for the next phases.
    pub scan: sni::Scan,
    /// Scratch for the judge's lookup: the socket is locked while the judge runs, so this is
    /// race-free where a per-CPU buffer would not be (a preempted program shares its CPU).
    pub lookup: SniLookup,
    /// The socket's own port (host order), recorded at enrolment: with the addresses it names
    /// the connection for the agent to reset a refused one.
    pub local_port: u16,
    /// 4 or 6: the socket's family (a v4-mapped dial is 6).
    pub sock_family: u16,
    /// The socket's own address (IPv4 as `::ffff:a.b.c.d`).
    pub local_addr: [u8; 16],
}

/// A denial of the TLS fast path's ClientHello judge (or of its backstop): a [`DenyEvent`]
/// followed by what the agent needs to log the name and reset the connection. It goes through
/// the same ring buffer (`DENY_EVENTS`); the reader tells the two apart by the record's size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SniDenyEvent {
    /// The denial as any kernel denial reports it (`reason`: a [`Reason`] number).
    pub base: DenyEvent,
    /// The connection's own address (IPv4 as `::ffff:a.b.c.d`).
    pub local_addr: [u8; 16],
    /// Its own port, host order.
    pub local_port: u16,
    /// 4 or 6: the socket's family.
    pub sock_family: u16,
    /// Bytes of `sni` in use (0: the hello was refused before its name was read).
    pub sni_len: u32,
    /// The server name as sent, lower case, *reversed* (as the judge keeps it).
    pub sni: [u8; sni::SNI_KEY_NAME],
    /// Explicit padding.
    pub _pad: [u8; 2],
}

/// An `SNI_NAMES` lookup key as the kernel passes it: prefix length in bits, then the data.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SniLookup {
    /// Prefix length in bits.
    pub prefix_len: u32,
    /// Data.
    pub key: sni::SniNameKey,
}

/// Offsets into `struct tcp_sock` of the running kernel, read from its BTF by the loader and
/// handed to the programs as the read-only global `PT_TCP_OFFSETS` (the verifier then sees
/// constants and checks each access against BTF). All zero: the fast path stays off.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOffsets {
    /// `write_seq` (u32).
    pub write_seq: u32,
    /// `fastopen_req` (pointer; set while a `sendto(MSG_FASTOPEN)` connects).
    pub fastopen_req: u32,
    /// Byte holding the `fastopen_connect` bit (`TCP_FASTOPEN_CONNECT`).
    pub fastopen_connect_byte: u32,
    /// The bit's mask within that byte.
    pub fastopen_connect_mask: u32,
}

/// Name of the [`TcpOffsets`] global in the object.
pub const TCP_OFFSETS_GLOBAL: &str = "PT_TCP_OFFSETS";

/// Index 0 of the `CONFIG` array: what every program reads first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// The generation (0 or 1) every lookup uses. Flipped last when a new policy is applied.
    pub active_generation: u32,
    /// [`flags`] bits.
    pub flags: u32,
    /// Mode for sockets whose cgroup is below an attachment but in no workload, per generation.
    pub unmatched_mode: [u32; GENERATIONS as usize],
    /// `SO_MARK` value that marks the agent's own sockets (never filtered); 0 = none.
    pub agent_mark: u32,
    /// Port of the proxy listeners, big-endian (host netns: 127.0.0.1 and ::1; pods: the
    /// `pod_proxy_*` addresses).
    pub proxy_port_be: u16,
    /// Port of the pod proxy address, big-endian.
    pub pod_proxy_port_be: u16,
    /// Network-namespace cookie of the host (the agent's) netns: sockets there are redirected
    /// to loopback; sockets elsewhere (pods) to `pod_proxy_*`, whose loopback is their own.
    pub host_netns_cookie: u64,
    /// `--proxy-addr` for IPv4 pods (network order).
    pub pod_proxy_v4: [u8; 4],
    /// While [`flags::MONITOR`] is set, the programs report only until the monotonic clock
    /// passes this, in [`flags::MONITOR_LEASE_SHIFT`] units ([`flags::monitor_live`]). The
    /// watching agent renews it every second; one that was killed cannot, and its report stops
    /// by itself. (Was padding in earlier builds of this layout: 0, an expired lease.)
    pub monitor_lease: u32,
    /// `--proxy-addr` for IPv6 pods (network order).
    pub pod_proxy_v6: [u8; 16],
    /// How many policies have been applied over the life of the pinned state (for `status`
    /// and for a restarted agent to continue counting).
    pub policy_generation: u64,
}

/// Key of the `WORKLOADS` hash: a cgroup id within one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    /// The generation this entry belongs to.
    pub generation: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// The cgroup v2 id (the directory's inode number).
    pub cgroup_id: u64,
}

/// Value of the `WORKLOADS` hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadEntry {
    /// Rule set (already combined with the generation, see [`ruleset::id`]).
    pub ruleset: u32,
    /// [`mode`] value.
    pub mode: u32,
}

/// LPM-trie key data for IPv6: rule set, port, address, all in network byte order so that the
/// trie's bit prefix is `ruleset ‖ port ‖ address`. Port 0 means "every port".
///
/// Putting the rule set and port *before* the address means one trie serves every workload and
/// both generations, and a lookup can only ever hit entries of its own rule set and port.
/// (IPv4 uses the range index instead, see [`RangeTable`].)
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleKeyV6 {
    /// Rule set id, big-endian.
    pub ruleset_be: u32,
    /// Destination port, big-endian; 0 = any.
    pub port_be: u16,
    /// IPv6 address bytes (network order).
    pub addr: [u8; 16],
}

/// Bits of the trie prefix taken by rule set and port; add the CIDR prefix length.
pub const RULE_KEY_FIXED_BITS: u32 = 48;

/// Keys per block of the IPv4 range index: 16 × 4 bytes = one 64-byte cache line.
pub const RANGE_FANOUT: usize = 16;

/// Levels of a range index, leaves included: 16^6 ≈ 16.7 million intervals per table.
pub const RANGE_MAX_LEVELS: usize = 6;

/// One block of the `RANGES_V4` array: sorted keys (interval starts, or the first start of each
/// block one level down), or the interval ends that go with a leaf block. Unused slots of a
/// level's last block hold `u32::MAX` (starts) and are never selected (see [`range_covers`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeBlock {
    /// Keys or ends, in host byte order.
    pub keys: [u32; RANGE_FANOUT],
}

/// Key of the `RANGE_INDEX_V4` hash: one IPv4 table per rule set and port (0 = every port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangeTableKey {
    /// Rule set id (with generation bit).
    pub ruleset: u32,
    /// Destination port in host order; 0 = every port.
    pub port: u32,
}

/// Where one IPv4 table lives in `RANGES_V4`: a static search tree (B+-tree with fan-out
/// [`RANGE_FANOUT`]) over the sorted, disjoint intervals `[start, end]` that the table's CIDRs
/// cover. Level 0 is a single block; each key of level `l` is the first key of one block of
/// level `l + 1`; the last level holds every interval start, and `ends` the matching ends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeTable {
    /// Number of levels in use (1 ..= [`RANGE_MAX_LEVELS`]); the last one is the leaves.
    pub levels: u32,
    /// First block of the interval ends (same order as the leaves).
    pub ends: u32,
    /// First block of each level, top first.
    pub base: [u32; RANGE_MAX_LEVELS],
    /// Number of keys in each level (the leaves: number of intervals).
    pub len: [u32; RANGE_MAX_LEVELS],
}

/// True when `addr` (host order) lies in one of the table's intervals. `block(i)` returns block
/// `i` of the range array. Shared by the eBPF programs and the loader's plan emulation, so the
/// kernel and the tests run the very same search.
///
/// Why a search tree and not the kernel's LPM trie: a trie lookup walks about 20 nodes for a
/// million prefixes, each a cache miss for a destination not seen recently, and a trie takes one
/// allocation per inserted prefix. Here a lookup reads at most [`RANGE_MAX_LEVELS`] + 1 cache
/// lines (the top levels stay cached), and a whole table is one `memcpy` into a mmapped array.
/// CIDR coverage needs no longest-prefix match: the programs only ask "is it covered".
#[inline(always)]
pub fn range_covers<'a>(
    table: &RangeTable,
    addr: u32,
    block: impl Fn(u32) -> Option<&'a RangeBlock>,
) -> bool {
    // Index of the chosen key within the current level; level 0 has one block.
    let mut chosen = 0u32;
    let mut level = 0usize;
    while level < RANGE_MAX_LEVELS {
        if level as u32 >= table.levels {
            break;
        }
        let len = table.len[level];
        let block_no = if level == 0 { 0 } else { chosen };
        let Some(b) = block(table.base[level].wrapping_add(block_no)) else {
            return false;
        };
        // Keys are sorted: the number of keys <= addr is the position after the last one.
        // Counted without branches. A compare-and-branch per key gives the verifier 2^16 paths
        // per block, each with a different precise index, and it gives up ("too many insns");
        // LLVM turns any plain comparison (even `(a - b) >> 63` on widened values) back into
        // one, and BPF has no set-on-condition instruction. So: the borrow of `addr - key`,
        // bit by bit (Hacker's Delight 2-12), which is 1 exactly when addr < key.
        // (Summing the borrows and subtracting once also keeps LLVM from turning `1 - borrow`
        // into a select, which it lowers to a branch.)
        let mut above = 0u32;
        let mut k = 0;
        while k < RANGE_FANOUT {
            let key = b.keys[k];
            above += ((!addr & key) | ((!addr | key) & addr.wrapping_sub(key))) >> 31;
            k += 1;
        }
        let n = RANGE_FANOUT as u32 - above;
        if n == 0 || len == 0 {
            // Below the first start of the table (or an empty level): nothing covers it.
            return false;
        }
        // Padding keys are u32::MAX, so for addr == u32::MAX they count too: clamp to the
        // level's last real key, which is then the right one.
        let index = block_no * RANGE_FANOUT as u32 + n - 1;
        chosen = if index < len { index } else { len - 1 };
        level += 1;
    }
    if level == 0 {
        return false;
    }
    let Some(ends) = block(table.ends.wrapping_add(chosen / RANGE_FANOUT as u32)) else {
        return false;
    };
    let slot = (chosen % RANGE_FANOUT as u32) as usize;
    slot < RANGE_FANOUT && addr <= ends.keys[slot]
}

/// Key of the `DOMAIN_PORTS` hash: a rule set has a Domain match at this port (0 = every port),
/// so a TCP connection that no IP/CIDR match allows goes to the proxy (docs/decisions.md rule 4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainPortKey {
    /// Rule set id (with generation bit).
    pub ruleset: u32,
    /// Destination port in host order; 0 = every port.
    pub port: u32,
}

/// What connect4/6 records for a redirected connection, keyed by socket cookie
/// (`ORIG_BY_COOKIE`, used by getpeername) and, once sock_ops knows the source address,
/// by [`PeerKey`] (`ORIG_BY_PEER`, used by the proxy).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// The destination the client dialled; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Its port, big-endian.
    pub port_be: u16,
    /// 4 or 6: the family of the address the client wrote (a v4-mapped dial on an AF_INET6
    /// socket is 6, so getpeername gives back exactly what was dialled).
    pub family: u16,
    /// Thread-group id of the task that called connect().
    pub pid: u32,
    /// cgroup id of the workload whose policy applied (0: no workload).
    pub workload: u64,
    /// The task's command name.
    pub comm: [u8; 16],
}

/// Key of `ORIG_BY_PEER`: the client side of a redirected connection as the proxy sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    /// Client (source) address; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Client port in host order.
    pub port: u32,
}

/// One denial (or, under `--audit`, would-be denial) reported through the `DENY_EVENTS` ring
/// buffer. When the buffer is full the event is dropped and `EVENTS_DROPPED` is counted: a
/// flood of denials costs the kernel a failed reserve, never unbounded memory.
///
/// The same record carries allowed egress decisions through `MONITOR_EVENTS` while someone
/// watches ([`flags::MONITOR`]); a full buffer there is counted in `MONITOR_DROPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DenyEvent {
    /// `bpf_ktime_get_ns()` at the decision.
    pub ktime_ns: u64,
    /// cgroup id of the workload whose policy applied (0: none).
    pub workload: u64,
    /// cgroup id of the calling task.
    pub cgroup: u64,
    /// Destination; IPv4 as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Destination port in host order.
    pub port: u16,
    /// IP protocol: 6 = TCP, 17 = UDP; the backstop's packets carry theirs (1 = ICMP, …).
    pub protocol: u8,
    /// 1 when `--audit` let it through.
    pub audit: u8,
    /// The [`Reason`] number (`Reason as u32`); `audit` says whether it was let through.
    pub reason: u32,
    /// Thread-group id of the caller.
    pub pid: u32,
    /// Which hook denied: 0 = a syscall hook (connect/sendmsg, setsockopt); otherwise the
    /// egress backstop, holding the sending socket's type (1 = stream, 2 = datagram or ping,
    /// 3 = raw; 0 also when the packet had no full socket).
    pub socket_type: u32,
    /// The caller's command name.
    pub comm: [u8; 16],
}

/// The owner of an MPTCP connection (`MPTCP_OWNERS`, socket-local storage of the MPTCP
/// socket), recorded by connect4/6 at the connection's first connect, which runs in the
/// connecting task. The kernel opens further subflows from a worker thread, whose cgroup says
/// nothing about the workload: those connects are judged as if this task made them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MptcpOwner {
    /// The task's cgroup ids: `[0]` its own, `[l]` its ancestor at level `l` (1 = the root's
    /// child), 0 past its own level.
    pub cgroups: [u64; MAX_CGROUP_DEPTH as usize],
    /// Thread-group id of the task.
    pub pid: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// The task's command name.
    pub comm: [u8; 16],
}

/// Value stored for each trie entry: which match it came from (for counters and explanations).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    /// Index of the match in the agent's match table for this generation.
    pub match_id: u32,
}

/// Indices of the per-CPU `COUNTERS` array, all derived from [`Reason`]: one counter per kernel
/// reason for what the programs did, one per reason for what `--audit` let through instead of
/// denying, and one for lost deny events.
pub mod counter {
    use crate::reason::{KERNEL_REASONS, Reason};

    /// The counter of decisions the programs carried out for `reason` (allowed, redirected or
    /// denied as [`Reason::effect`] says).
    #[inline(always)]
    pub const fn decided(reason: Reason) -> u32 {
        reason as u32
    }

    /// How far a reason's audit slot is from its decided slot.
    pub const AUDIT_OFFSET: u32 = KERNEL_REASONS;

    /// The counter of denials for `reason` that `--audit` let through.
    #[inline(always)]
    pub const fn audit_let_through(reason: Reason) -> u32 {
        AUDIT_OFFSET + reason as u32
    }

    /// Deny events lost because the ring buffer was full.
    pub const EVENTS_DROPPED: u32 = 2 * KERNEL_REASONS;

    /// Where the TLS fast path's counters start: one slot per [`Reason`] (used for those with
    /// [`Reason::is_kernel_sni`]).
    pub const KERNEL_SNI_OFFSET: u32 = EVENTS_DROPPED + 1;

    /// The counter of the TLS fast path's outcomes for `reason`: a Domain candidate that
    /// connected directly ([`Reason::DomainCandidates`]), and each verdict of the kernel's
    /// ClientHello judge.
    #[inline(always)]
    pub const fn kernel_sni(reason: Reason) -> u32 {
        KERNEL_SNI_OFFSET + reason as u32
    }

    /// Number of counters.
    pub const COUNT: u32 = KERNEL_SNI_OFFSET + Reason::ALL.len() as u32;

    /// What one counter counts.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Counter {
        /// [`decided`]: decisions carried out for the reason.
        Decided(Reason),
        /// [`audit_let_through`]: would-be denials `--audit` let through.
        AuditLetThrough(Reason),
        /// [`EVENTS_DROPPED`].
        EventsDropped,
        /// [`kernel_sni`]: the TLS fast path (path `kernel-sni`).
        KernelSni(Reason),
    }

    impl Counter {
        /// The counter at `index`; `None` past [`COUNT`] and for audit slots of reasons that
        /// never deny (the programs never count there).
        pub const fn at(index: u32) -> Option<Counter> {
            if index < KERNEL_REASONS {
                match Reason::from_u32(index) {
                    Some(r) => Some(Counter::Decided(r)),
                    None => None,
                }
            } else if index < EVENTS_DROPPED {
                match Reason::from_u32(index - KERNEL_REASONS) {
                    Some(r) if matches!(r.effect(), crate::reason::Effect::Deny) => {
                        Some(Counter::AuditLetThrough(r))
                    }
                    _ => None,
                }
            } else if index == EVENTS_DROPPED {
                Some(Counter::EventsDropped)
            } else if index < COUNT {
                match Reason::from_u32(index - KERNEL_SNI_OFFSET) {
                    Some(r) if r.is_kernel_sni() => Some(Counter::KernelSni(r)),
                    _ => None,
                }
            } else {
                None
            }
        }

        /// Every counter, in index order.
        pub fn all() -> impl Iterator<Item = (u32, Counter)> {
            (0..COUNT).filter_map(|i| Counter::at(i).map(|c| (i, c)))
        }

        /// The verdict it counts: `allow`, `redirect`, `deny`, `would_deny` (`--audit`), and
        /// on the TLS fast path `direct` (a Domain candidate that connected directly, its
        /// ClientHello to be judged in the kernel); `None` for [`Counter::EventsDropped`].
        pub const fn verdict(self) -> Option<&'static str> {
            match self {
                Counter::Decided(r) => Some(r.effect().word()),
                Counter::AuditLetThrough(_) => Some("would_deny"),
                Counter::EventsDropped => None,
                Counter::KernelSni(Reason::DomainCandidates) => Some("direct"),
                Counter::KernelSni(r) => Some(r.effect().word()),
            }
        }

        /// The path label of the decision: `kernel` (connect/sendmsg/egress programs) or
        /// `kernel-sni` (the TLS fast path); `None` for [`Counter::EventsDropped`].
        pub const fn path(self) -> Option<&'static str> {
            match self {
                Counter::Decided(_) | Counter::AuditLetThrough(_) => Some("kernel"),
                Counter::KernelSni(_) => Some("kernel-sni"),
                Counter::EventsDropped => None,
            }
        }

        /// The reason it counts under; `None` for [`Counter::EventsDropped`].
        pub const fn reason(self) -> Option<Reason> {
            match self {
                Counter::Decided(r) | Counter::AuditLetThrough(r) | Counter::KernelSni(r) => {
                    Some(r)
                }
                Counter::EventsDropped => None,
            }
        }
    }

    /// `{verdict}_{reason}` (`deny_no_match`, `allow_loopback`, `would_deny_mode_none`),
    /// `kernel_sni_{verdict}_{reason}` (`kernel_sni_direct_domain_candidates`,
    /// `kernel_sni_deny_no_sni`) or `events_dropped`: the counter's name in `passthrough status`.
    impl core::fmt::Display for Counter {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match (self.verdict(), self) {
                (Some(v), Counter::Decided(r) | Counter::AuditLetThrough(r)) => {
                    write!(f, "{v}_{}", r.code())
                }
                (Some(v), Counter::KernelSni(r)) => write!(f, "kernel_sni_{v}_{}", r.code()),
                _ => f.write_str("events_dropped"),
            }
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`/packed plain data with explicit padding.
    unsafe impl aya::Pod for super::GlobalConfig {}
    unsafe impl aya::Pod for super::WorkloadKey {}
    unsafe impl aya::Pod for super::WorkloadEntry {}
    unsafe impl aya::Pod for super::RangeBlock {}
    unsafe impl aya::Pod for super::RangeTableKey {}
    unsafe impl aya::Pod for super::RangeTable {}
    unsafe impl aya::Pod for super::RuleKeyV6 {}
    unsafe impl aya::Pod for super::RuleValue {}
    unsafe impl aya::Pod for super::DomainPortKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::DenyEvent {}
    unsafe impl aya::Pod for super::VerifiedKey {}
    unsafe impl aya::Pod for super::VerifiedValue {}
    unsafe impl aya::Pod for super::SniSock {}
    unsafe impl aya::Pod for super::SniDenyEvent {}
    unsafe impl aya::Pod for super::TcpOffsets {}
    unsafe impl aya::Pod for super::sni::SniNameKey {}
    unsafe impl aya::Pod for super::sni::SniNameValue {}
    unsafe impl aya::Pod for super::sni::SniTableKey {}
    unsafe impl aya::Pod for super::sni::SniTable {}
    unsafe impl aya::Pod for super::MptcpOwner {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<GlobalConfig>(), 64);
        assert_eq!(size_of::<DomainPortKey>(), 8);
        assert_eq!(size_of::<OrigDst>(), 48);
        assert_eq!(size_of::<PeerKey>(), 20);
        assert_eq!(size_of::<DenyEvent>(), 72);
        assert_eq!(size_of::<WorkloadKey>(), 16);
        assert_eq!(size_of::<WorkloadEntry>(), 8);
        assert_eq!(size_of::<RangeBlock>(), 64);
        assert_eq!(size_of::<RangeTableKey>(), 8);
        assert_eq!(size_of::<RangeTable>(), 56);
        assert_eq!(size_of::<RuleKeyV6>(), 22);
        assert_eq!(size_of::<RuleValue>(), 4);
        assert_eq!(size_of::<VerifiedKey>(), 24);
        assert_eq!(size_of::<SniLookup>(), 260);
        assert_eq!(size_of::<SniSock>(), 416);
        assert_eq!(size_of::<SniDenyEvent>(), 72 + 24 + 256);
        assert_eq!(size_of::<sni::SniNameKey>(), 256);
        assert_eq!(size_of::<MptcpOwner>(), 280);
    }

    #[test]
    fn generation_bit_separates_rulesets() {
        assert_ne!(ruleset::id(0, 5), ruleset::id(1, 5));
        assert_eq!(ruleset::id(1, 0) >> ruleset::GENERATION_SHIFT, 1);
        assert_eq!(
            (
                ruleset::generation(ruleset::id(1, 7)),
                ruleset::generation(ruleset::id(0, 7))
            ),
            (1, 0)
        );
    }
}
