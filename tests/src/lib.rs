//! Harness for the kernel tests: real cgroups, real network namespaces, real sockets and the real
//! `passthrough` agent.
//!
//! * [`TestCgroup`] — a uniquely named cgroup v2 directory, removed (processes killed) on drop.
//! * [`TestNet`] — a *client* netns (where workload probes run) and a *server* netns joined by a
//!   veth pair, with echo listeners that count what they accept per destination; every
//!   address is in a documentation range.
//! * [`Probe`] — the `pt-probe` helper process, placed in a cgroup and the client netns, driven
//!   over a line protocol (`connect`, `echo`, `close`, `sendto`).
//! * [`Agent`] — the real `passthrough run`, with readiness, reload (SIGHUP) and stop (SIGTERM).
//! * [`require_kernel`] — the root/BPF gate: skips outside CI, panics under `CI=true`.
//! * [`apiserver::ApiServer`] — a local Kubernetes API server (list/watch over HTTPS, faults).
//! * [`sweep()`] — removes what crashed runs left behind (our prefixes only); also `pt-sweep`.
//!
//! Addresses (see [`netns`]): client veth `192.0.2.1`/`2001:db8::1`, server veth
//! `192.0.2.2`/`2001:db8::2`; the server accepts on any address of `198.51.100.0/24`,
//! `203.0.113.0/24`, `2001:db8:100::/40` and `2001:db8:200::/40` (AnyIP local routes).

pub mod agent;
pub mod apiserver;
pub mod bench;
pub mod cgroup;
pub mod check;
pub mod clients;
pub mod domains;
pub mod hostnet;
pub mod l7;
pub mod netns;
pub mod probe;
pub mod sec;
pub mod sniff;
pub mod sweep;
pub mod sys;
pub mod world;

pub use agent::{
    Agent, AgentBuilder, AgentFailure, StateDirGuard, cli, mesh_policy, policy_yaml, write_file,
    write_policy,
};
pub use cgroup::{TestCgroup, cgroup2_mount};
pub use check::{assert_allowed, assert_denied, assert_udp_allowed, assert_udp_denied};
pub use netns::{LOOPBACK_PORT, TestNet};
pub use probe::{ConnId, Probe};
pub use sweep::{SweepReport, sweep};
pub use world::World;

use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// `EPERM`: what a denied `connect()`/`sendmsg()` fails with.
pub const EPERM: i32 = libc::EPERM;
/// `ETIMEDOUT`: what the probe reports when a connect or read times out.
pub const ETIMEDOUT: i32 = libc::ETIMEDOUT;

/// Name prefix of client network namespaces (`ptc-<pid>-<n>`).
pub const CLIENT_NS_PREFIX: &str = "ptc-";
/// Name prefix of server network namespaces (`pts-<pid>-<n>`).
pub const SERVER_NS_PREFIX: &str = "pts-";
/// Name prefix of test cgroups and agent state directories (`passthrough-test-<pid>-<n>`).
pub const CGROUP_PREFIX: &str = "passthrough-test-";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A process-unique suffix `<pid>-<n>` for names of things the tests create.
pub fn unique_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `f` every 50 ms until it returns `Some`; panics naming `what` after `within`.
pub fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a command, returning its stdout; an error carries the command line and stderr.
pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run {cmd}: {e}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{cmd} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Why the kernel tests cannot run here, or `None` when they can.
pub fn kernel_unavailable_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (kernel tests need root for BPF, cgroups and netns)".into());
    }
    if let Err(e) = cgroup2_mount() {
        return Some(format!("no cgroup v2: {e}"));
    }
    if let Err(e) = bpf_map_create_works() {
        return Some(format!("BPF unavailable: bpf(BPF_MAP_CREATE) failed: {e}"));
    }
    if Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        return Some("iproute2 `ip` is not installed".into());
    }
    None
}

/// The gate every kernel test calls first. Returns true when the test can run. When it cannot
/// (not root, no BPF, no cgroup v2, no `ip`): under `CI=true` it panics (kernel tests must run in
/// CI, never skip); otherwise it prints a skip note and returns false.
pub fn require_kernel() -> bool {
    match kernel_unavailable_reason() {
        None => true,
        Some(reason) => {
            if std::env::var("CI")
                .map(|v| v == "true" || v == "1")
                .unwrap_or(false)
            {
                panic!("kernel tests cannot run under CI=true: {reason}");
            }
            eprintln!("SKIP (kernel test): {reason}");
            false
        }
    }
}

/// Creates (and closes) a tiny BPF array map: proves the bpf() syscall works for us.
fn bpf_map_create_works() -> std::io::Result<()> {
    // union bpf_attr, BPF_MAP_CREATE prefix: map_type, key_size, value_size, max_entries.
    let mut attr = [0u32; 32];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: attr is a valid, large enough, zero-padded bpf_attr for BPF_MAP_CREATE (cmd 0).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0 as libc::c_long,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by the kernel and is ours.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

/// A temp dir for a test's files (policies, workload lists), named
/// `passthrough-test-files-<pid>-*` so [`sweep()`] can remove it after a crash.
pub fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{CGROUP_PREFIX}files-{}-", std::process::id()))
        .tempdir()
        .expect("creating a temp dir")
}

/// Directory of the running executable's target profile (`target/<profile>`): test executables
/// live in `target/<profile>/deps/`, binaries in `target/<profile>/`.
pub fn target_profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(PathBuf::from)
    } else {
        Some(dir.to_path_buf())
    }
}

/// Finds a binary: `$ENV_VAR`, else `<target/profile>/<name>`.
pub fn find_binary(env_var: &str, name: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(p));
    }
    let dir = target_profile_dir()
        .ok_or_else(|| anyhow::anyhow!("cannot locate the target directory"))?;
    let p = dir.join(name);
    if p.exists() {
        Ok(p)
    } else {
        anyhow::bail!(
            "{} not found (set {env_var}, or build it: it is looked up beside the test executable's profile dir)",
            p.display()
        )
    }
}
