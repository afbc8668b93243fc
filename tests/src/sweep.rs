//! Cleanup of what crashed test runs left behind: network namespaces `ptc-*`/`pts-*`, cgroups
//! and bpffs state directories `passthrough-test-*`, temp dirs `passthrough-test-{agent,files}-*`.
//! Only names with our prefixes are touched, and by default only those whose creating process
//! (the pid in the name) is gone, so a sweep never disturbs a test run in progress.

use std::{fmt, fs, path::Path};

use crate::{CGROUP_PREFIX, CLIENT_NS_PREFIX, SERVER_NS_PREFIX};

/// What a sweep removed and what it could not.
#[derive(Debug, Default)]
pub struct SweepReport {
    /// Things removed.
    pub removed: Vec<String>,
    /// Things that could not be removed, with the reason.
    pub errors: Vec<String>,
}

impl fmt::Display for SweepReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "sweep: removed {} leftover(s), {} error(s)",
            self.removed.len(),
            self.errors.len()
        )?;
        for r in &self.removed {
            writeln!(f, "  removed {r}")?;
        }
        for e in &self.errors {
            writeln!(f, "  ERROR {e}")?;
        }
        Ok(())
    }
}

/// The pid in `<prefix><pid>-<n>`.
fn owner_pid(name: &str, prefix: &str) -> Option<i32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn stale(name: &str, prefix: &str, all: bool) -> bool {
    match owner_pid(name, prefix) {
        Some(pid) => all || !pid_alive(pid),
        None => all,
    }
}

fn entries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes leftovers of dead test processes (`all`: of every test process, even live ones).
pub fn sweep(all: bool) -> SweepReport {
    let mut rep = SweepReport::default();

    // Cgroups first: that kills probes still sitting in the netns.
    if let Ok(root) = crate::cgroup2_mount() {
        for name in entries(&root) {
            if name.starts_with(CGROUP_PREFIX) && stale(&name, CGROUP_PREFIX, all) {
                let p = root.join(&name);
                match crate::cgroup::remove_cgroup_tree(&p) {
                    Ok(()) => rep.removed.push(format!("cgroup {}", p.display())),
                    Err(e) => rep.errors.push(format!("cgroup {}: {e:#}", p.display())),
                }
            }
        }
    }

    for name in entries(Path::new("/run/netns")) {
        let prefix = if name.starts_with(CLIENT_NS_PREFIX) {
            CLIENT_NS_PREFIX
        } else if name.starts_with(SERVER_NS_PREFIX) {
            SERVER_NS_PREFIX
        } else {
            continue;
        };
        if !stale(&name, prefix, all) {
            continue;
        }
        let _ = crate::run("ip", &["-n", &name, "link", "del", "eth0"]);
        match crate::run("ip", &["netns", "del", &name]) {
            Ok(_) => rep.removed.push(format!("netns {name}")),
            Err(e) => rep.errors.push(format!("netns {name}: {e:#}")),
        }
    }

    let bpffs = Path::new(crate::agent::BPFFS_ROOT);
    for name in entries(bpffs) {
        if name.starts_with(CGROUP_PREFIX) && stale(&name, CGROUP_PREFIX, all) {
            let p = bpffs.join(&name);
            match crate::agent::remove_state_dir(&p) {
                Ok(()) => rep.removed.push(format!("state dir {}", p.display())),
                Err(e) => rep.errors.push(format!("state dir {}: {e}", p.display())),
            }
        }
    }

    let tmp = std::env::temp_dir();
    let prefixes = [
        format!("{CGROUP_PREFIX}agent-"),
        format!("{CGROUP_PREFIX}files-"),
    ];
    for name in entries(&tmp) {
        if prefixes
            .iter()
            .any(|pre| name.starts_with(pre.as_str()) && stale(&name, pre, all))
        {
            let p = tmp.join(&name);
            match fs::remove_dir_all(&p) {
                Ok(()) => rep.removed.push(format!("temp dir {}", p.display())),
                Err(e) => rep.errors.push(format!("temp dir {}: {e}", p.display())),
            }
        }
    }
    rep
}
