//! Test cgroups on the cgroup v2 hierarchy.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The cgroup v2 mount point, from `/proc/self/mountinfo` (fstype `cgroup2`). On hybrid hosts it
/// is often `/sys/fs/cgroup/unified`; never hard-coded.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in info.lines() {
        // <id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <src> <sopts>
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        if fields.len() >= 5 && fields[3] == "/" {
            return Ok(PathBuf::from(unescape_mountinfo(fields[4])));
        }
    }
    bail!("no cgroup2 filesystem mounted (checked /proc/self/mountinfo)")
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A uniquely named cgroup v2 directory (`passthrough-test-<pid>-<n>` under the mount), or a
/// child of one. On drop the root of the tree kills what is left in it and removes the tree
/// bottom-up; drop never panics.
#[derive(Debug)]
pub struct TestCgroup {
    path: PathBuf,
    /// Only the top-level cgroup owns the tree and cleans it up.
    owner: bool,
}

impl TestCgroup {
    /// Creates `passthrough-test-<pid>-<n>` directly under the cgroup v2 mount.
    pub fn new() -> Result<Self> {
        let root = cgroup2_mount()?;
        let path = root.join(format!(
            "{}{}",
            crate::CGROUP_PREFIX,
            crate::unique_suffix()
        ));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path, owner: true })
    }

    /// Creates (or reuses) the sub-cgroup `name`. The child is removed with its parent's tree.
    pub fn child(&self, name: &str) -> Result<TestCgroup> {
        let path = self.path.join(name);
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating cgroup {}", path.display())),
        }
        Ok(TestCgroup { path, owner: false })
    }

    /// The directory of this cgroup.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's name: what `--cgroup PATH` names the workload in events and metrics.
    pub fn name(&self) -> String {
        self.path()
            .file_name()
            .expect("a cgroup directory has a name")
            .to_string_lossy()
            .into_owned()
    }

    /// The cgroup id: the inode number of the directory (what `bpf_get_current_cgroup_id` returns).
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path).map(|m| m.ino()).unwrap_or(0)
    }

    /// Pids currently in this cgroup (not its children).
    pub fn procs(&self) -> Vec<i32> {
        read_procs(&self.path)
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<()> {
        let procs = self.path.join("cgroup.procs");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .with_context(|| format!("opening {}", procs.display()))?;
        f.write_all(pid.to_string().as_bytes())
            .with_context(|| format!("writing {pid} to {}", procs.display()))?;
        Ok(())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if self.owner
            && let Err(e) = remove_cgroup_tree(&self.path)
        {
            eprintln!("warning: cleaning up cgroup {}: {e:#}", self.path.display());
        }
    }
}

fn read_procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kills every process in the tree at `dir` (`cgroup.kill`, else SIGKILL per pid, and as a last
/// resort moves them to the root cgroup), then removes the directories bottom-up.
pub fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // cgroup.kill (5.14+) kills the whole subtree.
    let killed = fs::write(dir.join("cgroup.kill"), "1").is_ok();
    let mut dirs = Vec::new();
    collect_dirs(dir, &mut dirs);
    if !killed {
        for d in &dirs {
            for pid in read_procs(d) {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while dirs.iter().any(|d| !read_procs(d).is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Whatever survived (should be nothing) goes to the root cgroup so rmdir can succeed.
    if let Ok(root) = cgroup2_mount() {
        for d in &dirs {
            for pid in read_procs(d) {
                let _ = fs::write(root.join("cgroup.procs"), pid.to_string());
            }
        }
    }
    // Children before parents: collect_dirs is pre-order, so reverse it.
    let mut last_err = None;
    for d in dirs.iter().rev() {
        let mut tries = 0;
        loop {
            match fs::remove_dir(d) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                // EBUSY while a killed process is still being reaped.
                Err(e) if tries < 100 => {
                    let _ = e;
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    last_err = Some(anyhow::anyhow!("rmdir {}: {e}", d.display()));
                    break;
                }
            }
        }
    }
    match last_err {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Programs attached directly to `dir`, as `bpftool cgroup show` lists them (one line each), or
/// `None` when bpftool is not installed or failed.
pub fn attached_programs(dir: &Path) -> Option<Vec<String>> {
    let out = std::process::Command::new("bpftool")
        .arg("cgroup")
        .arg("show")
        .arg(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("ID"))
            .map(String::from)
            .collect(),
    )
}
