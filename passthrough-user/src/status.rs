//! `passthrough status` and `passthrough uninstall`: both work from the pinned state alone, so
//! they answer (and clean up) also while no agent is running.

use std::{
    collections::BTreeMap,
    io::Write,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray, lpm_trie::LpmTrie};
use passthrough_common::{
    DomainPortKey, GlobalConfig, LAYOUT_VERSION, RangeTable, RangeTableKey, RuleKeyV6, RuleValue,
    WorkloadEntry, WorkloadKey, counter::Counter, flags,
};
use serde_json::json;

use crate::{cgroup, pins};

/// Arguments of `passthrough status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The agent's `--state-dir`.
    #[arg(long, default_value = "/sys/fs/bpf/passthrough")]
    pub state_dir: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The status file a Kubernetes-mode agent writes (`run --status-file`): when it exists,
    /// the pods it maps are listed, each checked against the kernel's workload map.
    #[arg(
        long,
        default_value = "/run/passthrough/kubernetes.json",
        value_name = "FILE"
    )]
    pub kubernetes_status: PathBuf,
}

/// Arguments of `passthrough uninstall`.
#[derive(Debug, Clone, clap::Args)]
pub struct UninstallArgs {
    /// The agent's `--state-dir`.
    #[arg(long, default_value = "/sys/fs/bpf/passthrough")]
    pub state_dir: PathBuf,
    /// Detach and unpin even while an agent runs with this state (found through the processes
    /// holding its pinned links). That agent keeps running but enforces nothing: stop it too.
    /// Without it, uninstall refuses and names the agent's pid.
    #[arg(long)]
    pub force: bool,
}

fn open(state: &Path, name: &str) -> anyhow::Result<MapData> {
    let pin = pins::map_pin(state, name);
    MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))
}

/// Finds the path of a cgroup id under the cgroup2 mount (bounded walk).
fn cgroup_path(mount: &Path, id: u64) -> Option<PathBuf> {
    let mut stack = vec![(mount.to_path_buf(), 0)];
    let mut visited = 0;
    while let Some((dir, depth)) = stack.pop() {
        visited += 1;
        if visited > 200_000 {
            return None;
        }
        if std::fs::metadata(&dir).ok()?.ino() == id {
            return Some(dir);
        }
        if depth < 16
            && let Ok(rd) = std::fs::read_dir(&dir)
        {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| (e.path(), depth + 1)),
            );
        }
    }
    None
}

/// Builds the status object (docs/cli.md): what is attached where, the policy generation, counters.
pub fn status_json(state: &Path) -> anyhow::Result<serde_json::Value> {
    let layout = pins::layout_dir(state);
    if !layout.exists() {
        return Ok(json!({
            "state_dir": state, "layout": LAYOUT_VERSION, "installed": false,
            "other_layouts": pins::other_layouts(state),
        }));
    }
    let config: Array<MapData, GlobalConfig> = Array::try_from(Map::Array(open(state, "CONFIG")?))?;
    let cfg = config.get(&0, 0)?;
    let g = cfg.active_generation & 1;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(state, "COUNTERS")?))?;
    let counts: BTreeMap<String, u64> = Counter::all()
        .map(|(i, c)| {
            let total = counters
                .get(&i, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0);
            (c.to_string(), total)
        })
        .collect();
    let gen_of = passthrough_common::ruleset::generation;
    let workloads: HashMap<MapData, WorkloadKey, WorkloadEntry> =
        HashMap::try_from(Map::HashMap(open(state, "WORKLOADS")?))?;
    let tables_v4: HashMap<MapData, RangeTableKey, RangeTable> =
        HashMap::try_from(Map::HashMap(open(state, "RANGE_INDEX_V4")?))?;
    let rules_v6: LpmTrie<MapData, RuleKeyV6, RuleValue> =
        LpmTrie::try_from(Map::LpmTrie(open(state, "RULES_V6")?))?;
    let domain: HashMap<MapData, DomainPortKey, u8> =
        HashMap::try_from(Map::HashMap(open(state, "DOMAIN_PORTS")?))?;
    // Entries per generation: [active, inactive]. The agent removes the retired plan right
    // after each flip, so inactive entries are normally 0 (non-zero only during an apply, or
    // when the agent died between a flip and the removal).
    let split = |gens: Vec<u32>| {
        let active = gens.iter().filter(|x| **x == g).count();
        (active, gens.len() - active)
    };
    let (n_workloads, old_workloads) =
        split(workloads.keys().flatten().map(|k| k.generation).collect());
    let active_ids: Vec<u64> = workloads
        .keys()
        .flatten()
        .filter(|k| k.generation == g)
        .map(|k| k.cgroup_id)
        .collect();
    let (n_v4, old_v4) = split(
        tables_v4
            .keys()
            .flatten()
            .map(|k| gen_of(k.ruleset))
            .collect(),
    );
    let (n_v6, old_v6) = split(
        rules_v6
            .keys()
            .flatten()
            .map(|k| gen_of(u32::from_be(k.data().ruleset_be)))
            .collect(),
    );
    let (n_domain, old_domain) =
        split(domain.keys().flatten().map(|k| gen_of(k.ruleset)).collect());

    let mount = cgroup::cgroup2_mount().ok();
    let mut attachments = Vec::new();
    for (id, dir) in pins::pinned_attachments(state) {
        let mut programs: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        programs.sort();
        let path = mount.as_deref().and_then(|m| cgroup_path(m, id));
        attachments.push(json!({ "cgroup_id": id, "cgroup": path, "programs": programs }));
    }
    Ok(json!({
        "state_dir": state,
        "layout": LAYOUT_VERSION,
        "installed": true,
        "policy_generation": cfg.policy_generation,
        "active_map_generation": g,
        "audit": cfg.flags & flags::AUDIT != 0,
        "proxy": cfg.flags & flags::PROXY != 0,
        "proxy_port": u16::from_be(cfg.proxy_port_be),
        "attachments": attachments,
        "entries": { "workloads": n_workloads, "range_tables_v4": n_v4, "rules_v6": n_v6, "domain_ports": n_domain },
        "inactive_entries": { "workloads": old_workloads, "range_tables_v4": old_v4, "rules_v6": old_v6, "domain_ports": old_domain },
        "counters": counts,
        "other_layouts": pins::other_layouts(state),
        "active_workload_ids": active_ids,
    }))
}

/// Adds the pods of a Kubernetes-mode status file to `s` (`node`, `pods`, policies), each pod
/// marked `in_kernel` when its cgroup has an entry in the active generation.
fn add_kubernetes(s: &mut serde_json::Value, file: &Path) {
    let Ok(bytes) = std::fs::read(file) else {
        return;
    };
    let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
        return;
    };
    let ids: Vec<u64> = s["active_workload_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_u64())
        .collect();
    if let Some(pods) = doc["pods"].as_array_mut() {
        for p in pods {
            let id = p["cgroup_id"].as_u64().unwrap_or(0);
            p["in_kernel"] = json!(ids.contains(&id));
        }
    }
    for k in [
        "node",
        "generation",
        "pods",
        "policies",
        "shadow_policies",
        "invalid_policies",
    ] {
        let key = if k == "generation" {
            "kubernetes_generation"
        } else {
            k
        };
        s[key] = doc[k].take();
    }
}

/// `passthrough status`.
pub fn run_status(args: &StatusArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut s = status_json(&args.state_dir)?;
    if s["installed"] == true {
        add_kubernetes(&mut s, &args.kubernetes_status);
    }
    if let Some(o) = s.as_object_mut() {
        o.remove("active_workload_ids");
    }
    if args.json {
        writeln!(out, "{s}")?;
        return Ok(());
    }
    if s["installed"] != true {
        writeln!(
            out,
            "not installed: nothing pinned under {}",
            args.state_dir.display()
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "state:             {} (layout v{})",
        args.state_dir.display(),
        LAYOUT_VERSION
    )?;
    writeln!(out, "policy generation: {}", s["policy_generation"])?;
    writeln!(
        out,
        "audit: {}   proxy: {} (port {})",
        s["audit"], s["proxy"], s["proxy_port"]
    )?;
    writeln!(
        out,
        "entries:           {} workloads, {} IPv4 range tables, {} IPv6 rules, {} domain ports",
        s["entries"]["workloads"],
        s["entries"]["range_tables_v4"],
        s["entries"]["rules_v6"],
        s["entries"]["domain_ports"]
    )?;
    let old = &s["inactive_entries"];
    if [
        &old["workloads"],
        &old["range_tables_v4"],
        &old["rules_v6"],
        &old["domain_ports"],
    ]
    .iter()
    .any(|v| v.as_u64() != Some(0))
    {
        writeln!(
            out,
            "retired plan:      {} workloads, {} IPv4 range tables, {} IPv6 rules, {} domain ports still in the maps",
            old["workloads"], old["range_tables_v4"], old["rules_v6"], old["domain_ports"]
        )?;
    }
    for a in s["attachments"].as_array().into_iter().flatten() {
        let path = a["cgroup"]
            .as_str()
            .map_or_else(|| format!("cgroup id {}", a["cgroup_id"]), str::to_string);
        let progs: Vec<&str> = a["programs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str())
            .collect();
        writeln!(out, "attached:          {path}: {}", progs.join(", "))?;
    }
    writeln!(out, "counters:")?;
    for (k, v) in s["counters"].as_object().into_iter().flatten() {
        writeln!(out, "  {k:<18} {v}")?;
    }
    if let Some(pods) = s["pods"].as_array() {
        writeln!(
            out,
            "pods on node {} ({}):",
            s["node"].as_str().unwrap_or("?"),
            args.kubernetes_status.display()
        )?;
        for p in pods {
            let state = &p["state"];
            let what = if let Some(g) = state.get("Governed") {
                let pols: Vec<&str> = g["policies"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_str())
                    .collect();
                format!(
                    "governed (mesh {}) by {}",
                    g["mesh"].as_str().unwrap_or(""),
                    if pols.is_empty() {
                        "no policy".to_string()
                    } else {
                        pols.join(", ")
                    }
                )
            } else if let Some(why) = state.get("NotGoverned") {
                format!("not governed: {}", why.as_str().unwrap_or(""))
            } else {
                state.as_str().unwrap_or("").to_lowercase()
            };
            writeln!(
                out,
                "  {:<40} mode {:<7} rule set {:<4} {}{}",
                p["name"].as_str().unwrap_or(""),
                p["mode"].as_str().unwrap_or(""),
                p["rule_set"],
                what,
                if p["in_kernel"] == true {
                    ""
                } else {
                    "  [not in the kernel's map]"
                }
            )?;
        }
        for bad in s["invalid_policies"].as_array().into_iter().flatten() {
            writeln!(out, "invalid (ignored): {}", bad.as_str().unwrap_or(""))?;
        }
    }
    Ok(())
}

/// `passthrough uninstall`: detaches every pinned link's program (`BPF_LINK_DETACH`), unpins
/// the links and every map, of every layout version, removes the state directory, and checks
/// that none of the programs is attached any more. Refuses while an agent holds the links
/// (it would keep running without enforcing), unless `--force`.
pub fn run_uninstall(args: &UninstallArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let state = &args.state_dir;
    if !state.exists() {
        writeln!(out, "nothing to remove: {} does not exist", state.display())?;
        return Ok(());
    }
    let links: Vec<pins::LinkInfo> = pins::link_pins(state)
        .iter()
        .filter_map(|p| pins::pinned_link_info(p).ok().flatten())
        .collect();
    let ids = links.iter().map(|l| l.id).collect();
    let holders = pins::link_holders(&ids);
    let who = holders
        .iter()
        .map(|h| format!("pid {} ({})", h.pid, h.cmdline))
        .collect::<Vec<_>>()
        .join(", ");
    if !holders.is_empty() {
        if !args.force {
            anyhow::bail!(
                "an agent is running with {}: {who}. Stop it first (it detaches and unpins \
                 everything when it exits, unless it runs with --keep-on-exit), or pass --force \
                 to detach its programs now (it keeps running without enforcing anything)",
                state.display()
            );
        }
        writeln!(
            out,
            "--force: detaching the programs of the running agent {who}; it enforces nothing \
             any more: stop it"
        )?;
    }
    // Where each program is attached now, to check afterwards.
    let mount = crate::cgroup::cgroup2_mount().ok();
    let attached: Vec<(PathBuf, u32)> = links
        .iter()
        .filter(|l| l.cgroup_id != 0)
        .filter_map(|l| Some((cgroup_path(mount.as_deref()?, l.cgroup_id)?, l.prog_id)))
        .collect();
    let removed =
        pins::retire_tree(state).with_context(|| format!("removing {}", state.display()))?;
    let n_links = removed
        .iter()
        .filter(|p| {
            p.components().any(|c| c.as_os_str() == "links")
                && p.parent()
                    .is_some_and(|d| d.parent().is_some_and(|l| l.ends_with("links")))
        })
        .count();
    let n_maps = removed
        .iter()
        .filter(|p| p.parent().is_some_and(|d| d.ends_with("maps")))
        .count();
    writeln!(
        out,
        "removed {n_links} link(s) and {n_maps} map(s) under {}",
        state.display()
    )?;
    // BPF_LINK_DETACH is synchronous; a kernel without it (before 5.9) detaches an unpinned
    // link when it frees it, from deferred work: wait for that, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let left: Vec<String> = attached
            .iter()
            .filter(|(cg, prog)| {
                pins::OUR_ATTACH_TYPES
                    .iter()
                    .any(|t| pins::attached_prog_ids(cg, *t).is_ok_and(|ids| ids.contains(prog)))
            })
            .map(|(cg, prog)| format!("program {prog} at {}", cg.display()))
            .collect();
        if left.is_empty() {
            break;
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!(
                "unpinned, but still attached: {} (a process holds the links and this kernel \
                 cannot detach them; stop it)",
                left.join(", ")
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    writeln!(
        out,
        "detached {} program(s) from {} cgroup(s)",
        attached.len(),
        attached
            .iter()
            .map(|(cg, _)| cg)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    )?;
    Ok(())
}
