//! `#[repr(C)]` types and constants shared by the eBPF programs (`passthrough-ebpf`) and the
//! loader (`passthrough-user`). Every type here is part of the pinned-map layout: change one and
//! bump [`LAYOUT_VERSION`], so a new agent never reuses pins of an old layout.
#![no_std]

/// Version of the map layout; part of the pin directory name (`/sys/fs/bpf/passthrough/v<N>`).
pub const LAYOUT_VERSION: u32 = 1;

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
    /// `--internal-cidr` ranges: always allowed (SPEC §3 rule 1).
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
}

/// Bits of [`GlobalConfig::flags`].
pub mod flags {
    /// `--audit`: compute every verdict, count would-be denials, enforce none.
    pub const AUDIT: u32 = 1;
}

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
    /// Explicit padding (keeps the layout identical on both sides).
    pub _pad: u32,
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

/// LPM-trie key data for IPv4: rule set, port, address, all in network byte order so that the
/// trie's bit prefix is `ruleset ‖ port ‖ address`. Port 0 means "every port".
///
/// Putting the rule set and port *before* the address means one trie serves every workload and
/// both generations, and a lookup can only ever hit entries of its own rule set and port.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleKeyV4 {
    /// Rule set id, big-endian.
    pub ruleset_be: u32,
    /// Destination port, big-endian; 0 = any.
    pub port_be: u16,
    /// IPv4 address bytes (network order).
    pub addr: [u8; 4],
}

/// LPM-trie key data for IPv6 (see [`RuleKeyV4`]).
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

/// Value stored for each trie entry: which match it came from (for counters and explanations).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleValue {
    /// Index of the match in the agent's match table for this generation.
    pub match_id: u32,
}

/// Indices of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Loopback destination (rule 1).
    pub const ALLOW_LOOPBACK: u32 = 0;
    /// `--internal-cidr` destination (rule 1).
    pub const ALLOW_INTERNAL: u32 = 1;
    /// The agent's own socket (rule 1).
    pub const ALLOW_AGENT: u32 = 2;
    /// Mode `All` (rule 2).
    pub const ALLOW_MODE_ALL: u32 = 3;
    /// An IP/CIDR match (rule 3).
    pub const ALLOW_MATCH: u32 = 4;
    /// UDP to a configured resolver on port 53.
    pub const ALLOW_DNS: u32 = 5;
    /// Mode `None` (rule 2).
    pub const DENY_MODE_NONE: u32 = 6;
    /// Mode `Matched` and nothing matched (rule 5).
    pub const DENY_NO_MATCH: u32 = 7;
    /// A denial that `--audit` let through.
    pub const AUDIT_WOULD_DENY: u32 = 8;
    /// Redirected to the proxy (rule 4).
    pub const REDIRECT_PROXY: u32 = 9;
    /// Number of counters.
    pub const COUNT: u32 = 10;

    /// Names, in index order, as reported by the agent.
    pub const NAMES: [&str; COUNT as usize] = [
        "allow_loopback",
        "allow_internal",
        "allow_agent",
        "allow_mode_all",
        "allow_match",
        "allow_dns",
        "deny_mode_none",
        "deny_no_match",
        "audit_would_deny",
        "redirect_proxy",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`/packed plain data with explicit padding.
    unsafe impl aya::Pod for super::GlobalConfig {}
    unsafe impl aya::Pod for super::WorkloadKey {}
    unsafe impl aya::Pod for super::WorkloadEntry {}
    unsafe impl aya::Pod for super::RuleKeyV4 {}
    unsafe impl aya::Pod for super::RuleKeyV6 {}
    unsafe impl aya::Pod for super::RuleValue {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<GlobalConfig>(), 24);
        assert_eq!(size_of::<WorkloadKey>(), 16);
        assert_eq!(size_of::<WorkloadEntry>(), 8);
        assert_eq!(size_of::<RuleKeyV4>(), 10);
        assert_eq!(size_of::<RuleKeyV6>(), 22);
        assert_eq!(size_of::<RuleValue>(), 4);
    }

    #[test]
    fn generation_bit_separates_rulesets() {
        assert_ne!(ruleset::id(0, 5), ruleset::id(1, 5));
        assert_eq!(ruleset::id(1, 0) >> ruleset::GENERATION_SHIFT, 1);
    }
}
