//! Maps shared by every program. Sizes are defaults; the loader may override `max_entries`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray},
};
use passthrough_common::{
    GlobalConfig, RuleKeyV4, RuleKeyV6, RuleValue, WorkloadEntry, WorkloadKey, counter,
};

/// Index 0: [`GlobalConfig`] (active generation, flags).
#[map]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

/// `{generation, cgroup id}` → the workload's rule set and mode.
#[map]
pub static WORKLOADS: HashMap<WorkloadKey, WorkloadEntry> = HashMap::with_max_entries(16_384, 0);

/// IPv4 allow rules: `ruleset ‖ port ‖ addr/len` → match id.
#[map]
pub static RULES_V4: LpmTrie<RuleKeyV4, RuleValue> = LpmTrie::with_max_entries(1_048_576, 0);

/// IPv6 allow rules: `ruleset ‖ port ‖ addr/len` → match id.
#[map]
pub static RULES_V6: LpmTrie<RuleKeyV6, RuleValue> = LpmTrie::with_max_entries(1_048_576, 0);

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
