//! Layout of the pinned state and the few raw bpf(2) calls aya 0.14 has no API for.
//!
//! ```text
//! <state-dir>/v<LAYOUT_VERSION>/maps/<MAP>                  pinned maps (shared by every program)
//! <state-dir>/v<LAYOUT_VERSION>/links/<cgroup id>/<prog>    pinned cgroup links
//! ```
//! Pins keep the programs attached and the maps filled after the agent dies (SIGKILL, OOM,
//! crash): enforcement continues and redirected connections fail (nobody listens on the proxy
//! port) instead of going out unfiltered. A restarted agent adopts the pins: it reuses the maps,
//! atomically swaps each link to its freshly loaded program (`BPF_LINK_UPDATE`) and then applies
//! its policy through the usual generation flip, so there is no moment without a program.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use passthrough_common::LAYOUT_VERSION;

/// Directory of the current layout under `state_dir`.
pub fn layout_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(format!("v{LAYOUT_VERSION}"))
}

/// Where map `name` is pinned.
pub fn map_pin(state_dir: &Path, name: &str) -> PathBuf {
    layout_dir(state_dir).join("maps").join(name)
}

/// Directory of the link pins of one attachment point.
pub fn link_dir(state_dir: &Path, cgroup_id: u64) -> PathBuf {
    layout_dir(state_dir)
        .join("links")
        .join(cgroup_id.to_string())
}

/// Layout directories under `state_dir` other than the current one (`v<N>` with N ≠ ours).
pub fn other_layouts(state_dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let ours = format!("v{LAYOUT_VERSION}");
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('v') && n != ours)
        })
        .collect()
}

/// Pinned attachment points of the current layout: `(cgroup id, link dir)`.
pub fn pinned_attachments(state_dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(layout_dir(state_dir).join("links")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
        .collect()
}

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: [u32; 13],
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
    _pad: [u32; 12],
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
    _pad: [u32; 15],
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded bpf_attr prefix of the right shape for `cmd`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Opens a pinned object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    _pad: [u32; 12],
}

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;

/// `BPF_LINK_CREATE` of a cgroup link (`attach_type`: `enum bpf_attach_type`), for program
/// types whose aya links cannot become an `FdLink` (cgroup sockopt in aya 0.14).
pub fn cgroup_link_create(
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a bpf object (here: a link) at `path` (`BPF_OBJ_PIN`).
pub fn obj_pin(fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Swaps the program of a pinned link in one step (`BPF_LINK_UPDATE`, Linux 5.7 for cgroup
/// links): the hook is never without a program.
pub fn link_update(link_pin: &Path, new_prog: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let link = obj_get(link_pin)?;
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Detaches the link pinned at `pin` from its hook now (`BPF_LINK_DETACH`, Linux 5.9 for
/// cgroup links): when it returns, the program no longer runs for new events of the cgroup,
/// even if something (an agent, the pin) still holds the link. Unpinning alone is not enough
/// for that: the kernel frees an unpinned link, and only then detaches its program, from an
/// RCU callback and a work queue, which under load can run seconds later.
///
/// `Ok(false)` when `pin` is not a link, or the kernel has no `BPF_LINK_DETACH` (`EINVAL`) or
/// none for this link type (`EOPNOTSUPP`): the program then goes when the link is freed.
pub fn link_detach(pin: &Path) -> io::Result<bool> {
    let link = obj_get(pin)?;
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
        ..Default::default()
    };
    match sys_bpf(BPF_LINK_DETACH, &mut attr) {
        Ok(_) => Ok(true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
            ) =>
        {
            // 524: the kernel's internal ENOTSUPP, which some link types return.
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// Detaches (see [`link_detach`]) and unpins the link pinned at `pin`; nothing when there is no
/// such pin.
pub fn detach_and_unpin(pin: &Path) -> io::Result<()> {
    match link_detach(pin) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
        Ok(_) => {}
    }
    match std::fs::remove_file(pin) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes a state tree, first detaching each pinned link ([`link_detach`]), so that when it
/// returns none of the tree's programs runs any more, whoever still holds the links; then
/// unpinning a map frees it once no program uses it. Returns what was removed. For state that
/// no running agent enforces with: stale layouts, attachment points no longer wanted, this
/// agent's own state at shutdown, `passthrough uninstall`.
pub fn retire_tree(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    remove_tree_into(dir, &mut removed)?;
    Ok(removed)
}

fn remove_tree_into(dir: &Path, removed: &mut Vec<PathBuf>) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if meta.is_dir() {
        // Links before maps: detach programs before freeing what they read.
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort_by_key(|p| p.file_name().is_some_and(|n| n == "maps"));
        for e in entries {
            remove_tree_into(&e, removed)?;
        }
        std::fs::remove_dir(dir)?;
    } else {
        // Maps are not links (`EINVAL`); only the link pins are detached.
        let is_map = dir
            .parent()
            .is_some_and(|p| p.file_name().is_some_and(|n| n == "maps"));
        if !is_map && let Err(e) = link_detach(dir) {
            // Unpinning still detaches it, later: keep removing.
            tracing::warn!(pin = %dir.display(), error = %e, "could not detach pinned link");
        }
        std::fs::remove_file(dir)?;
    }
    removed.push(dir.to_path_buf());
    Ok(())
}

#[repr(C)]
#[derive(Default)]
struct ProgQueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: [u32; 11],
}

const BPF_PROG_QUERY: libc::c_long = 16;

/// Attach types of our programs (`enum bpf_attach_type`): inet egress (skb), sock_ops, inet4/6
/// connect, udp4/6 sendmsg, setsockopt, inet4/6 getpeername.
pub const OUR_ATTACH_TYPES: [u32; 9] = [1, 3, 10, 11, 14, 15, 22, 29, 30];

/// Program ids attached to `cgroup` for `attach_type` (`BPF_PROG_QUERY`).
pub fn attached_prog_ids(cgroup: &Path, attach_type: u32) -> io::Result<Vec<u32>> {
    let dir = std::fs::File::open(cgroup)?;
    attached_prog_ids_at(dir.as_fd(), attach_type)
}

/// The ids of the programs attached to `target` (a cgroup directory, or a sockhash for its
/// `sk_msg` program) for one attach type (`BPF_PROG_QUERY`).
pub fn attached_prog_ids_at(
    target: std::os::fd::BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 64];
    let mut attr = ProgQueryAttr {
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    ids.truncate(attr.prog_cnt as usize);
    Ok(ids)
}

/// What the kernel says of one open link (`/proc/<pid>/fdinfo/<fd>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    /// The link's id.
    pub id: u32,
    /// The id of the program it attaches.
    pub prog_id: u32,
    /// For a cgroup link: the cgroup's id while attached, 0 once detached (or another type).
    pub cgroup_id: u64,
}

/// Reads a link's `fdinfo` text; `None` when it is not a link's.
pub fn parse_link_fdinfo(text: &str) -> Option<LinkInfo> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    Some(LinkInfo {
        id: field("link_id")?.parse().ok()?,
        prog_id: field("prog_id")?.parse().ok()?,
        cgroup_id: field("cgroup_id").and_then(|v| v.parse().ok()).unwrap_or(0),
    })
}

/// The link pinned at `pin`, described by the kernel; `None` when `pin` is not a link.
pub fn pinned_link_info(pin: &Path) -> io::Result<Option<LinkInfo>> {
    let fd = obj_get(pin)?;
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(parse_link_fdinfo(&text))
}

/// Every pin under `dir` outside a `maps` directory: the links of every layout.
pub fn link_pins(dir: &Path) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(p) else {
            return;
        };
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => {
                    if e.file_name() != "maps" {
                        walk(&e.path(), out);
                    }
                }
                Ok(_) => out.push(e.path()),
                Err(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

/// A process holding one of our links open (an agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkHolder {
    /// Its pid.
    pub pid: u32,
    /// Its command line, arguments joined by spaces.
    pub cmdline: String,
    /// How many of the links it holds.
    pub links: usize,
}

/// The processes other than this one that hold one of the links `ids` open (through
/// `/proc/<pid>/fd`; processes of other pid namespaces are not seen).
pub fn link_holders(ids: &std::collections::BTreeSet<u32>) -> Vec<LinkHolder> {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let mut links = 0;
        for fd in fds.flatten() {
            let is_link =
                std::fs::read_link(fd.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:bpf_link");
            if !is_link {
                continue;
            }
            let info = std::fs::read_to_string(p.path().join("fdinfo").join(fd.file_name()))
                .ok()
                .and_then(|t| parse_link_fdinfo(&t));
            if info.is_some_and(|i| ids.contains(&i.id)) {
                links += 1;
            }
        }
        if links > 0 {
            let cmdline = std::fs::read(p.path().join("cmdline"))
                .map(|b| {
                    b.split(|&c| c == 0)
                        .filter(|a| !a.is_empty())
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            out.push(LinkHolder {
                pid,
                cmdline,
                links,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_fdinfo() {
        let cgroup = "pos:\t0\nflags:\t02000000\nmnt_id:\t15\nino:\t1057\nlink_type:\tcgroup\n\
                      link_id:\t17\nprog_tag:\t0123456789abcdef\nprog_id:\t42\ncgroup_id:\t5213\n\
                      attach_type:\t10\n";
        assert_eq!(
            parse_link_fdinfo(cgroup),
            Some(LinkInfo {
                id: 17,
                prog_id: 42,
                cgroup_id: 5213
            })
        );
        let detached = cgroup.replace("cgroup_id:\t5213", "cgroup_id:\t0");
        assert_eq!(parse_link_fdinfo(&detached).map(|i| i.cgroup_id), Some(0));
        // A map's fdinfo has no link_id.
        let map = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\nmap_type:\t1\n\
                   key_size:\t4\nvalue_size:\t8\nmax_entries:\t1\nmap_flags:\t0x0\nmap_id:\t9\n";
        assert_eq!(parse_link_fdinfo(map), None);
        // prog_id is not link_id's prefix match.
        assert_eq!(parse_link_fdinfo("prog_id:\t3\n"), None);
    }
}
