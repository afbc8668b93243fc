//! [`Probe`]: a `pt-probe` process in a test cgroup and (usually) the client netns.

use std::{
    ffi::CString,
    fmt::Display,
    fs::File,
    io::{BufRead, BufReader, Write},
    os::{
        fd::{AsRawFd, RawFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use anyhow::{Context, Result};

use crate::{TestCgroup, TestNet};

/// A connection held open by a probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnId(String);

/// A workload process: `pt-probe` whose pid was written into a cgroup's `cgroup.procs` and which
/// joined a network namespace before `exec` (so every socket it makes belongs to both). Killed
/// on drop. Protocol failures (the probe died) panic; socket errors come back as errno values.
pub struct Probe {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_id: u32,
    label: String,
}

/// Path of the `pt-probe` binary: `$PT_PROBE_BIN`, else beside the test executable's profile dir.
pub fn probe_binary() -> Result<PathBuf> {
    crate::find_binary("PT_PROBE_BIN", "pt-probe")
}

impl Probe {
    /// A probe in `cgroup`, inside the client netns of `net`.
    pub fn spawn(cgroup: &TestCgroup, net: &TestNet) -> Result<Probe> {
        Self::spawn_in(cgroup.path(), Some(&net.client_ns_path()))
    }

    /// A probe in the cgroup directory `cgroup_dir`, in the netns at `netns` (or the caller's).
    pub fn spawn_in(cgroup_dir: &Path, netns: Option<&Path>) -> Result<Probe> {
        let bin = probe_binary()?;
        let mut cmd = Command::new(&bin);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let ns_file = command_in(&mut cmd, cgroup_dir, netns)?;
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "spawning {} in cgroup {}",
                bin.display(),
                cgroup_dir.display()
            )
        })?;
        drop(ns_file);
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let label = format!("probe pid {} in {}", child.id(), cgroup_dir.display());
        Ok(Probe {
            child,
            stdin,
            stdout,
            next_id: 0,
            label,
        })
    }

    /// The probe's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn request(&mut self, line: &str) -> String {
        if let Err(e) = writeln!(self.stdin, "{line}").and_then(|_| self.stdin.flush()) {
            panic!("{}: cannot send {line:?}: {e}", self.label);
        }
        let mut reply = String::new();
        match self.stdout.read_line(&mut reply) {
            Ok(0) | Err(_) => {
                let status = self.child.try_wait().ok().flatten();
                panic!(
                    "{}: no answer to {line:?} (probe exited: {status:?})",
                    self.label
                )
            }
            Ok(_) => reply.trim_end().to_string(),
        }
    }

    fn parse_id_reply(&self, req: &str, reply: &str) -> std::result::Result<Vec<String>, i32> {
        let f: Vec<&str> = reply.split(' ').collect();
        match f.first() {
            Some(&"ok") => Ok(f[1..].iter().map(|s| s.to_string()).collect()),
            Some(&"err") => Err(f
                .get(2)
                .and_then(|e| e.parse().ok())
                .unwrap_or_else(|| panic!("{}: bad reply {reply:?} to {req:?}", self.label))),
            _ => panic!("{}: bad reply {reply:?} to {req:?}", self.label),
        }
    }

    fn connect_proto(
        &mut self,
        addr: impl Display,
        proto: &str,
    ) -> std::result::Result<ConnId, i32> {
        self.next_id += 1;
        let id = format!("c{}", self.next_id);
        let req = format!("connect {id} {addr} {proto}");
        let reply = self.request(&req);
        self.parse_id_reply(&req, &reply).map(|_| ConnId(id))
    }

    /// TCP `connect()` (3 s timeout). `Err(errno)` when it fails: `EPERM` for a denial.
    pub fn connect(&mut self, addr: impl Display) -> std::result::Result<ConnId, i32> {
        self.connect_proto(addr, "tcp")
    }

    /// Connected UDP socket: `connect()` on a datagram socket (the connect hooks see it too).
    pub fn connect_udp(&mut self, addr: impl Display) -> std::result::Result<ConnId, i32> {
        self.connect_proto(addr, "udp")
    }

    /// Sends `text` on an open connection and reads it back.
    pub fn echo(&mut self, conn: &ConnId, text: &str) -> std::result::Result<String, i32> {
        assert!(!text.contains('\n'), "echo text must be one line");
        let req = format!("echo {} {text}", conn.0);
        let reply = self.request(&req);
        self.parse_id_reply(&req, &reply)
            .map(|f| f.get(1..).map(|r| r.join(" ")).unwrap_or_default())
    }

    /// Closes an open connection.
    pub fn close(&mut self, conn: ConnId) {
        let req = format!("close {}", conn.0);
        let _ = self.request(&req);
    }

    /// Runs one client request (`passthrough_tests::clients`) inside the probe's cgroup and netns
    /// and returns its JSON answer.
    pub fn json(&mut self, req: &serde_json::Value) -> serde_json::Value {
        let line = format!("json {req}");
        let reply = self.request(&line);
        serde_json::from_str(&reply)
            .unwrap_or_else(|e| panic!("{}: bad JSON reply {reply:?} to {line:?}: {e}", self.label))
    }

    /// One datagram from an unconnected UDP socket (`sendto`). `Err(errno)` when it fails.
    pub fn sendto(&mut self, addr: impl Display, text: &str) -> std::result::Result<(), i32> {
        let req = format!("sendto {addr} {text}");
        let reply = self.request(&req);
        match reply.split(' ').collect::<Vec<_>>().as_slice() {
            ["ok"] => Ok(()),
            ["err", e] => Err(e
                .parse()
                .unwrap_or_else(|_| panic!("{}: bad reply {reply:?}", self.label))),
            _ => panic!("{}: bad reply {reply:?} to {req:?}", self.label),
        }
    }
}

/// Runs `program args...` to completion inside the cgroup directory `cgroup_dir` and the netns
/// at `netns` (or the caller's), like a probe (joined before `exec`); returns its output.
/// For real clients such as `curl` in the workload.
pub fn output_in(
    cgroup_dir: &Path,
    netns: Option<&Path>,
    program: &str,
    args: &[&str],
) -> Result<std::process::Output> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let ns_file = command_in(&mut cmd, cgroup_dir, netns)?;
    let out = cmd
        .output()
        .with_context(|| format!("running {program} in {}", cgroup_dir.display()))?;
    drop(ns_file);
    Ok(out)
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "exit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Makes `cmd` join the cgroup directory `cgroup_dir` and the netns at `netns` (or stay in the
/// caller's) between fork and exec, like a [`Probe`]; it dies with the calling thread. The
/// returned guard keeps the netns file open: keep it until the command has been spawned.
pub fn command_in(
    cmd: &mut Command,
    cgroup_dir: &Path,
    netns: Option<&Path>,
) -> Result<Option<File>> {
    let procs = CString::new(
        cgroup_dir
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )?;
    let ns_file = match netns {
        Some(p) => Some(File::open(p).with_context(|| format!("opening netns {}", p.display()))?),
        None => None,
    };
    join_in_child(cmd, procs, ns_file.as_ref().map(|f| f.as_raw_fd()));
    Ok(ns_file)
}

/// Makes the child `cmd` will spawn join a cgroup (`procs` = its `cgroup.procs` path) and,
/// with `ns_fd`, a network namespace before exec; it also dies with its parent. `ns_fd` must stay
/// open until the spawn. Used by every helper that starts a workload process.
pub fn join_in_child(cmd: &mut Command, procs: CString, ns_fd: Option<RawFd>) {
    // SAFETY: only async-signal-safe syscalls (prctl/open/write/close/setns) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0" = the writing process.
            let rc = libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if rc != 1 {
                return Err(err);
            }
            if let Some(ns) = ns_fd
                && libc::setns(ns, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A test binary that re-runs itself as a workload helper: `serve_helper` is the body of the
/// binary's `helper_entry` test (a no-op unless `env` carries a request), `helper_command`
/// builds the command that runs that entry with a request, and `run_helper` runs it once
/// inside a cgroup (and netns) and returns the `PTRESULT` JSON it printed.
pub fn serve_helper(env: &str, run: impl FnOnce(&serde_json::Value) -> serde_json::Value) {
    let Ok(req) = std::env::var(env) else {
        return;
    };
    let req: serde_json::Value = serde_json::from_str(&req).expect("helper request");
    let out = run(&req);
    println!("\nPTRESULT {out}");
}

/// The command that runs this test binary's `helper_entry` with `req` in `env` (see
/// [`serve_helper`]); stdin is null unless the caller changes it.
pub fn helper_command(env: &str, req: &serde_json::Value) -> Command {
    let exe = std::env::current_exe().expect("test executable");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        "helper_entry",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env(env, req.to_string())
    .env_remove("RUST_TEST_THREADS")
    .stdin(Stdio::null());
    cmd
}

/// Runs one helper request inside `cgroup` and `netns` (None: the caller's) and returns its
/// `PTRESULT` JSON; panics with the helper's output if it printed none.
pub fn run_helper(
    env: &str,
    cgroup: &Path,
    netns: Option<&Path>,
    req: serde_json::Value,
) -> serde_json::Value {
    let mut cmd = helper_command(env, &req);
    let ns = command_in(&mut cmd, cgroup, netns).expect("helper command");
    let out = cmd.output().expect("running the helper");
    drop(ns);
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines() {
        if let Some(i) = l.find("PTRESULT ") {
            return serde_json::from_str(&l[i + 9..]).expect("helper JSON");
        }
    }
    panic!(
        "helper {req} gave no result:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
