//! [`Agent`]: the real `passthrough run`, as a child process.

use std::{
    ffi::OsStr,
    fs::{self, File},
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// How long the agent may take to become ready (load, attach, apply).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a reload or a shutdown may take.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent prints at INFO on every successful apply.
pub const APPLIED_MARKER: &str = "policy applied";

/// Path of the `passthrough` binary: `$PASSTHROUGH_BIN`, else `<target/profile>/passthrough`.
pub fn agent_binary() -> Result<PathBuf> {
    crate::find_binary("PASSTHROUGH_BIN", "passthrough")
}

/// Runs `passthrough ARGS` to its end (a one-shot command: check, explain, status, uninstall,
/// suggest…): whether it exited 0, and its stdout followed by its stderr.
pub fn cli<I, S>(args: I) -> (bool, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(agent_binary().expect("passthrough binary"))
        .args(args)
        .output()
        .expect("running passthrough");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A MeshPassthrough `name` of mesh `default`: `targetRef: target` (YAML flow, e.g. `{kind:
/// Mesh}`), `passthroughMode: mode` when given, and one `appendMatch` entry per item of `matches`
/// (each a YAML flow mapping, e.g. `{type: CIDR, value: 198.51.100.0/24, port: 8080}`).
pub fn policy_yaml(name: &str, target: &str, mode: Option<&str>, matches: &[&str]) -> String {
    let mut y = format!(
        "apiVersion: kuma.io/v1alpha1\nkind: MeshPassthrough\nmetadata: {{name: {name}, labels: {{kuma.io/mesh: default}}}}\nspec:\n  targetRef: {target}\n  default:\n"
    );
    if let Some(m) = mode {
        y += &format!("    passthroughMode: {m}\n");
    }
    if !matches.is_empty() {
        y += "    appendMatch:\n";
        for m in matches {
            y += &format!("      - {m}\n");
        }
    }
    y
}

/// [`policy_yaml`] for the whole mesh (`targetRef: {kind: Mesh}`) in `passthroughMode: mode`.
pub fn mesh_policy(name: &str, mode: &str, matches: &[&str]) -> String {
    policy_yaml(name, "{kind: Mesh}", Some(mode), matches)
}

/// Writes `yaml` to a new file `policy-<n>.yaml` in `dir` and returns its path.
pub fn write_policy(dir: &Path, yaml: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let path = dir.join(format!("policy-{}.yaml", N.fetch_add(1, Ordering::Relaxed)));
    write_file(&path, yaml);
    path
}

/// Replaces `path` atomically (write beside it, then rename), so a watcher never reads half a file.
pub fn write_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, content).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("renaming {} to {}: {e}", tmp.display(), path.display()));
}

/// Arguments of `passthrough run`. `--admin-addr` and `--state-dir` are chosen by the harness.
#[derive(Default, Debug, Clone)]
pub struct AgentBuilder {
    policies: Vec<PathBuf>,
    cgroups: Vec<PathBuf>,
    workloads: Option<PathBuf>,
    attach_cgroups: Vec<PathBuf>,
    internal_cidrs: Vec<String>,
    unselected_mode: Option<String>,
    extra: Vec<String>,
    /// An explicit `--state-dir` shared by several agents (restart tests); the test owns it.
    state_dir: Option<PathBuf>,
    /// Run this binary instead of [`agent_binary`] (a bench's before/after).
    binary: Option<PathBuf>,
    /// `RUST_LOG` for the agent (default: `$PASSTHROUGH_TEST_LOG`, else `info`).
    log_filter: Option<String>,
}

impl AgentBuilder {
    /// Use this `--state-dir` (e.g. shared by an agent and its restarted successor). The agent
    /// does not remove it on drop; the caller does (see [`StateDirGuard`]).
    pub fn state_dir(mut self, p: impl AsRef<Path>) -> Self {
        self.state_dir = Some(p.as_ref().into());
        self
    }

    /// `--policy PATH` (file or directory).
    pub fn policy(mut self, p: impl AsRef<Path>) -> Self {
        self.policies.push(p.as_ref().into());
        self
    }
    /// `--cgroup PATH`: a workload without labels (and an attachment point).
    pub fn cgroup(mut self, p: impl AsRef<Path>) -> Self {
        self.cgroups.push(p.as_ref().into());
        self
    }
    /// `--workloads FILE`.
    pub fn workloads(mut self, p: impl AsRef<Path>) -> Self {
        self.workloads = Some(p.as_ref().into());
        self
    }
    /// `--attach-cgroup PATH`: where to attach (one attachment serves the workloads below it).
    pub fn attach_cgroup(mut self, p: impl AsRef<Path>) -> Self {
        self.attach_cgroups.push(p.as_ref().into());
        self
    }
    /// `--internal-cidr CIDR`.
    pub fn internal_cidr(mut self, c: &str) -> Self {
        self.internal_cidrs.push(c.into());
        self
    }
    /// `--unselected-mode All|Matched|None`.
    pub fn unselected_mode(mut self, m: &str) -> Self {
        self.unselected_mode = Some(m.into());
        self
    }
    /// Any other argument, verbatim.
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.into());
        self
    }

    /// The agent's `RUST_LOG` filter (e.g. `info,passthrough::proxy=debug` for the proxy's
    /// access log).
    pub fn log_filter(mut self, filter: &str) -> Self {
        self.log_filter = Some(filter.into());
        self
    }

    /// Run `path` instead of [`agent_binary`].
    pub fn binary(mut self, path: impl AsRef<Path>) -> Self {
        self.binary = Some(path.as_ref().into());
        self
    }

    fn args(&self, admin: SocketAddr, state_dir: &Path, proxy_port: u16) -> Vec<String> {
        let mut a = vec!["run".to_string()];
        for p in &self.policies {
            a.extend(["--policy".into(), p.display().to_string()]);
        }
        for c in &self.cgroups {
            a.extend(["--cgroup".into(), c.display().to_string()]);
        }
        if let Some(w) = &self.workloads {
            a.extend(["--workloads".into(), w.display().to_string()]);
        }
        for c in &self.attach_cgroups {
            a.extend(["--attach-cgroup".into(), c.display().to_string()]);
        }
        for c in &self.internal_cidrs {
            a.extend(["--internal-cidr".into(), c.clone()]);
        }
        if let Some(m) = &self.unselected_mode {
            a.extend(["--unselected-mode".into(), m.clone()]);
        }
        a.extend([
            "--admin-addr".into(),
            admin.to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
        ]);
        // Agents run side by side in tests: each gets its own proxy port unless the test
        // chose one (`--proxy-port 0` disables the proxy).
        if !self.extra.iter().any(|e| e == "--proxy-port") {
            a.extend(["--proxy-port".into(), proxy_port.to_string()]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    fn spawn(self) -> Result<Agent> {
        let bin = match &self.binary {
            Some(b) => b.clone(),
            None => agent_binary()?,
        };
        let tmp = tempfile::Builder::new()
            .prefix(&format!(
                "{}agent-{}-",
                crate::CGROUP_PREFIX,
                std::process::id()
            ))
            .tempdir()?;
        let log_path = tmp.path().join("agent.log");
        let log = File::create(&log_path)?;
        let admin = free_local_port()?;
        let owns_state = self.state_dir.is_none();
        let state_dir = match &self.state_dir {
            Some(d) => d.clone(),
            None => state_dir_for_test()?,
        };
        let proxy_port = free_local_port()?.port();
        let args = self.args(admin, &state_dir, proxy_port);
        let mut cmd = Command::new(&bin);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                self.log_filter.clone().unwrap_or_else(|| {
                    std::env::var("PASSTHROUGH_TEST_LOG").unwrap_or_else(|_| "info".into())
                }),
            );
        // SAFETY: prctl is async-signal-safe. The agent dies with the test thread that started it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let cmdline = format!("{} {}", bin.display(), args.join(" "));
        let proxy_port = match self.extra.iter().position(|e| e == "--proxy-port") {
            Some(i) => self
                .extra
                .get(i + 1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0),
            None => proxy_port,
        };
        Ok(Agent {
            child: Some(child),
            proxy_port,
            admin,
            log_path,
            state_dir,
            owns_state,
            cmdline,
            _tmp: tmp,
        })
    }

    /// Starts the agent without waiting for readiness.
    pub fn start_no_wait(self) -> Result<Agent> {
        self.spawn()
    }

    /// Starts the agent and waits (≤ [`READY_TIMEOUT`]) until `GET /readyz` answers 200.
    pub fn start(self) -> Result<Agent> {
        let mut agent = self.spawn()?;
        agent.wait_ready()?;
        Ok(agent)
    }

    /// Runs an agent that must refuse to start: waits (≤ [`READY_TIMEOUT`]) for it to exit and
    /// returns its status and output. An error if it became ready or did not exit.
    pub fn run_expect_failure(self) -> Result<AgentFailure> {
        let mut agent = self.spawn()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = agent.child.as_mut().unwrap().try_wait()? {
                agent.child = None;
                return Ok(AgentFailure {
                    status,
                    output: agent.log(),
                    cmdline: agent.cmdline.clone(),
                });
            }
            if let Ok((200, _)) = agent.get("/readyz") {
                bail!(
                    "agent became ready although it should have refused to start\n{}",
                    agent.describe()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "agent neither exited nor became ready within {READY_TIMEOUT:?}\n{}",
                    agent.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// An agent that exited on its own.
#[derive(Debug)]
pub struct AgentFailure {
    /// How it exited.
    pub status: ExitStatus,
    /// Everything it printed (stdout and stderr).
    pub output: String,
    /// The command line, for messages.
    pub cmdline: String,
}

/// A running `passthrough run`. Drop kills it (SIGKILL) if still running and removes its state
/// directory; when the test is failing, drop prints the agent's log.
pub struct Agent {
    child: Option<Child>,
    proxy_port: u16,
    admin: SocketAddr,
    log_path: PathBuf,
    state_dir: PathBuf,
    owns_state: bool,
    cmdline: String,
    _tmp: tempfile::TempDir,
}

impl Agent {
    /// `passthrough run` arguments, to be completed and started.
    pub fn builder() -> AgentBuilder {
        AgentBuilder::default()
    }

    /// The proxy port on 127.0.0.1 / `[::1]` (`--proxy-port`; 0 = no proxy).
    pub fn proxy_port(&self) -> u16 {
        self.proxy_port
    }

    /// The agent's pid (0 once it exited).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The admin server address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The `--state-dir` given to the agent.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Everything the agent printed so far, ANSI escapes removed.
    pub fn log(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.log_path).unwrap_or_default())
    }

    /// The command line and the log, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "agent: {}\n--- agent log ---\n{}--- end of agent log ---",
            self.cmdline,
            self.log()
        )
    }

    /// Generations from every `policy applied generation=<N>` line so far, in order.
    pub fn applied_generations(&self) -> Vec<u64> {
        self.log()
            .lines()
            .filter(|l| l.contains(APPLIED_MARKER))
            .filter_map(|l| {
                let rest = &l[l.find("generation=")? + "generation=".len()..];
                let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                digits.parse().ok()
            })
            .collect()
    }

    /// `GET path` on the admin server: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.admin, path)
    }

    /// Sum of the `/metrics` samples of `name` whose line contains `label` (e.g.
    /// `protocol="timeout"`; empty: all of them).
    pub fn metric(&self, name: &str, label: &str) -> f64 {
        let (code, body) = self.get("/metrics").expect("GET /metrics");
        assert_eq!(code, 200, "GET /metrics");
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                l.split(['{', ' ']).next() == Some(name) && (label.is_empty() || l.contains(label))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// SIGKILL, as an OOM kill or crash would; waits for the process. Pins stay.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (≤ 20 s) until `GET /readyz` answers 200.
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                self.child = None;
                bail!(
                    "agent exited ({status}) before it was ready\n{}",
                    self.describe()
                );
            }
            if let Ok((200, _)) = self.get("/readyz") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent not ready within {READY_TIMEOUT:?}\n{}",
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: i32) -> Result<()> {
        let Some(child) = &self.child else {
            bail!("agent is not running\n{}", self.describe())
        };
        // SAFETY: kill(2) on our own child's pid.
        if unsafe { libc::kill(child.id() as i32, sig) } != 0 {
            bail!(
                "kill({}, {sig}): {}",
                child.id(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGHUP, then waits (≤ [`RELOAD_TIMEOUT`]) for a `policy applied generation=<N>` line
    /// printed after the signal. Returns N.
    pub fn reload(&mut self) -> Result<u64> {
        let seen = self.applied_generations().len();
        self.signal(libc::SIGHUP)?;
        self.wait_applied_after(seen)
    }

    /// Rewrites the policy file `path` with `yaml` (atomically) and reloads (SIGHUP). Waits for an
    /// apply that happened after the write, whether the file watcher or the signal caused it, so
    /// the returned generation carries the new content. Returns N of that apply.
    pub fn update_policy(&mut self, path: &Path, yaml: &str) -> Result<u64> {
        let seen = self.applied_generations().len();
        write_file(path, yaml);
        self.signal(libc::SIGHUP)?;
        self.wait_applied_after(seen)
    }

    /// SIGHUP with an input the agent must refuse: waits (≤ [`RELOAD_TIMEOUT`]) for an `ERROR`
    /// line printed after the signal and returns the log printed since. An error if a new policy
    /// was applied instead, or if the agent exited.
    pub fn reload_rejected(&mut self) -> Result<String> {
        let log_len = self.log().len();
        let seen = self.applied_generations().len();
        self.signal(libc::SIGHUP)?;
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        loop {
            let log = self.log();
            let new = log.get(log_len..).unwrap_or("").to_string();
            if self.applied_generations().len() > seen {
                bail!(
                    "the agent applied a policy it should have rejected\n{}",
                    self.describe()
                );
            }
            if new.contains("ERROR") {
                return Ok(new);
            }
            if !self.is_running() {
                bail!("agent exited on a rejected reload\n{}", self.describe());
            }
            if Instant::now() > deadline {
                bail!(
                    "no ERROR line within {RELOAD_TIMEOUT:?} of SIGHUP\n{}",
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until more than `seen` apply lines were printed. Returns the newest generation.
    pub fn wait_applied_after(&mut self, seen: usize) -> Result<u64> {
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        loop {
            let gens = self.applied_generations();
            if gens.len() > seen {
                return Ok(*gens.last().unwrap());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "agent exited ({status}) while waiting for a policy apply\n{}",
                    self.describe()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "no `{APPLIED_MARKER} generation=N` line within {RELOAD_TIMEOUT:?}\n{}",
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits (≤ [`RELOAD_TIMEOUT`]) for exit; an error unless it exited 0.
    pub fn stop(&mut self) -> Result<()> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait()? {
                self.child = None;
                if !status.success() {
                    bail!(
                        "agent exited with {status} after SIGTERM, expected 0\n{}",
                        self.describe()
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not exit within {RELOAD_TIMEOUT:?} of SIGTERM\n{}",
                    self.describe()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True while the agent process runs.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.describe());
        }
        if self.owns_state {
            let _ = remove_state_dir(&self.state_dir);
        }
    }
}

/// A unique `--state-dir` shared by several agents of one test; removed (pins and all) on drop.
pub struct StateDirGuard(PathBuf);

impl StateDirGuard {
    /// A fresh unique state dir path on bpffs (not created: the agent creates it).
    pub fn new() -> Result<Self> {
        Ok(Self(state_dir_for_test()?))
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StateDirGuard {
    fn drop(&mut self) {
        let _ = remove_state_dir(&self.0);
    }
}

/// Removes a state directory (pins unlink like files on bpffs).
pub fn remove_state_dir(dir: &Path) -> std::io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The bpffs root the tests pin under.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// A unique `--state-dir` for one agent: `/sys/fs/bpf/passthrough-test-<pid>-<n>` (bpffs is
/// mounted at `/sys/fs/bpf` first if it is not, as the agent itself would do).
fn state_dir_for_test() -> Result<PathBuf> {
    let root = Path::new(BPFFS_ROOT);
    ensure_bpffs(root)?;
    Ok(root.join(format!(
        "{}{}",
        crate::CGROUP_PREFIX,
        crate::unique_suffix()
    )))
}

fn ensure_bpffs(root: &Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let c = std::ffi::CString::new(root.as_os_str().as_encoded_bytes())?;
    // SAFETY: zeroed statfs is valid; c is a valid path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    fs::create_dir_all(root)?;
    // SAFETY: static strings, valid target path.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        // Another test may have mounted it meanwhile.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
            return Ok(());
        }
        bail!(
            "mounting bpffs at {}: {}",
            root.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (bound and released; the agent binds it right after).
fn free_local_port() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// A minimal blocking HTTP/1.1 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad HTTP response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
