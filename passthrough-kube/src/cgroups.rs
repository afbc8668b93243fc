//! The kubelet's pod cgroups, for both cgroup drivers, below wherever cgroup2 is mounted.
//!
//! | driver | QoS parent | pod cgroup |
//! |---|---|---|
//! | systemd | `kubepods.slice` (Guaranteed), `kubepods.slice/kubepods-burstable.slice`, `…/kubepods-besteffort.slice` | `kubepods-pod<uid_>.slice`, `kubepods-burstable-pod<uid_>.slice`, `kubepods-besteffort-pod<uid_>.slice` |
//! | cgroupfs | `kubepods`, `kubepods/burstable`, `kubepods/besteffort` | `pod<uid>` |
//!
//! `<uid_>` is the pod UID with `-` written `_` (systemd unit names). Containers are children of
//! the pod cgroup and are covered by it (the programs look up a task's cgroup ancestors).
//!
//! [`KubepodsWatcher`] sets inotify watches on the kubepods root and the QoS parents *before*
//! scanning them, so a pod cgroup created at any moment is reported, by the scan or by an event;
//! the kubelet creates a pod's cgroup before the runtime starts any container in it.

use std::{
    collections::HashMap,
    ffi::OsStr,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

/// The kubelet's cgroup driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Driver {
    Systemd,
    Cgroupfs,
}

/// A pod's QoS class (`status.qosClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// From `status.qosClass`.
    pub fn from_class(s: &str) -> Option<Qos> {
        match s {
            "Guaranteed" => Some(Qos::Guaranteed),
            "Burstable" => Some(Qos::Burstable),
            "BestEffort" => Some(Qos::BestEffort),
            _ => None,
        }
    }
    fn word(self) -> &'static str {
        match self {
            Qos::Guaranteed => "",
            Qos::Burstable => "burstable",
            Qos::BestEffort => "besteffort",
        }
    }
}

/// The kubepods root: the cgroup under which the kubelet puts every pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubepodsRoot {
    /// Absolute path (below the cgroup2 mount).
    pub path: PathBuf,
    /// Which layout it uses.
    pub driver: Driver,
}

impl KubepodsRoot {
    /// `path` as a kubepods root; the driver is told by its name (`*.slice` = systemd).
    pub fn at(path: &Path) -> KubepodsRoot {
        let driver = if path.extension() == Some(OsStr::new("slice")) {
            Driver::Systemd
        } else {
            Driver::Cgroupfs
        };
        KubepodsRoot {
            path: path.to_path_buf(),
            driver,
        }
    }

    /// Finds the kubepods root below `mount`: `kubepods.slice` (systemd) or `kubepods`
    /// (cgroupfs) directly below it, else one level down, where a kubelet with `--cgroup-root`
    /// puts it (`kubelet.slice/kubelet-kubepods.slice` on kind nodes, `<root>/kubepods`).
    pub fn find(mount: &Path) -> Option<KubepodsRoot> {
        let at = |dir: &Path| {
            ["kubepods.slice", "kubepods"]
                .iter()
                .map(|n| dir.join(n))
                .find(|p| p.is_dir())
        };
        if let Some(p) = at(mount) {
            return Some(KubepodsRoot::at(&p));
        }
        let mut subdirs: Vec<PathBuf> = std::fs::read_dir(mount)
            .ok()?
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        subdirs.sort();
        subdirs.iter().find_map(|d| {
            let name = d.file_name()?.to_str()?;
            match name.strip_suffix(".slice") {
                Some(stem) => Some(d.join(format!("{stem}-kubepods.slice"))).filter(|p| p.is_dir()),
                None => Some(d.join("kubepods")).filter(|p| p.is_dir()),
            }
            .map(|p| KubepodsRoot::at(&p))
        })
    }

    /// The systemd unit-name prefix of everything below the root: its own name without
    /// `.slice` (`kubepods`, or `kubelet-kubepods` under a kubelet `--cgroup-root` of
    /// `kubelet`, whose slices are `kubelet-kubepods-besteffort.slice` and so on).
    fn unit_prefix(&self) -> String {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".slice"))
            .unwrap_or("kubepods")
            .to_string()
    }

    /// The directory of the QoS parent (the root itself for Guaranteed).
    pub fn qos_dir(&self, qos: Qos) -> PathBuf {
        match (self.driver, qos) {
            (_, Qos::Guaranteed) => self.path.clone(),
            (Driver::Systemd, q) => {
                self.path
                    .join(format!("{}-{}.slice", self.unit_prefix(), q.word()))
            }
            (Driver::Cgroupfs, q) => self.path.join(q.word()),
        }
    }

    /// Where the kubelet puts the cgroup of the pod `uid` of class `qos`.
    pub fn pod_dir(&self, uid: &str, qos: Qos) -> PathBuf {
        let name = match (self.driver, qos) {
            (Driver::Systemd, Qos::Guaranteed) => {
                format!("{}-pod{}.slice", self.unit_prefix(), uid.replace('-', "_"))
            }
            (Driver::Systemd, q) => format!(
                "{}-{}-pod{}.slice",
                self.unit_prefix(),
                q.word(),
                uid.replace('-', "_")
            ),
            (Driver::Cgroupfs, _) => format!("pod{uid}"),
        };
        self.qos_dir(qos).join(name)
    }

    /// The pod UID and QoS class of a directory `name` found in the QoS parent of `qos`.
    pub fn parse_pod_dir(&self, qos: Qos, name: &str) -> Option<String> {
        let uid = match self.driver {
            Driver::Systemd => {
                let prefix = match qos {
                    Qos::Guaranteed => format!("{}-pod", self.unit_prefix()),
                    q => format!("{}-{}-pod", self.unit_prefix(), q.word()),
                };
                name.strip_prefix(&prefix)?
                    .strip_suffix(".slice")?
                    .replace('_', "-")
            }
            Driver::Cgroupfs => name.strip_prefix("pod")?.to_string(),
        };
        let ok = uid.len() >= 8
            && uid.len() <= 64
            && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
        ok.then_some(uid)
    }

    /// Which QoS parent `dir` is, if any.
    fn qos_of_dir(&self, dir: &Path) -> Option<Qos> {
        [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort]
            .into_iter()
            .find(|q| self.qos_dir(*q) == dir)
    }
}

/// A pod cgroup found on the node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PodCgroup {
    /// The pod's `metadata.uid` (for a static pod: its `kubernetes.io/config.hash`).
    pub uid: String,
    /// Its QoS class.
    pub qos: Qos,
    /// The cgroup directory.
    pub path: PathBuf,
    /// The cgroup id (the directory's inode on cgroup2).
    pub id: u64,
}

/// What changed below the kubepods root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupEvent {
    /// A pod cgroup exists (new, or found by a scan).
    Appeared(PodCgroup),
    /// A pod cgroup was removed.
    Gone { uid: String, path: PathBuf },
    /// A QoS parent exists (its id is where not-yet-named pods are judged).
    QosDir { qos: Qos, path: PathBuf, id: u64 },
    /// Events were lost (inotify queue overflow): the caller should treat the next
    /// [`KubepodsWatcher::scan`] as the whole truth.
    Overflow,
}

fn cgroup_id(p: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(p)?.ino())
}

/// Watches the kubepods tree for pod cgroups. Blocking ([`KubepodsWatcher::wait`]): the agent
/// reads it on a thread of its own, so a pod cgroup is handled the moment the kernel wakes that
/// thread, whatever the agent's event loop is doing.
pub struct KubepodsWatcher {
    root: KubepodsRoot,
    inotify: Inotify,
    buf: Vec<u8>,
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::ONLYDIR)
    .union(WatchMask::DONT_FOLLOW);

impl KubepodsWatcher {
    /// Starts watching `root`; returns the watcher and what exists now (QoS parents first).
    pub fn start(root: KubepodsRoot) -> io::Result<(KubepodsWatcher, Vec<CgroupEvent>)> {
        let inotify = Inotify::init()?;
        let mut w = KubepodsWatcher {
            root,
            inotify,
            buf: vec![0u8; 64 * 1024],
            dirs: HashMap::new(),
        };
        let now = w.scan()?;
        Ok((w, now))
    }

    /// The root watched.
    pub fn root(&self) -> &KubepodsRoot {
        &self.root
    }

    fn watch(&mut self, dir: &Path) -> io::Result<()> {
        let wd = self.inotify.watches().add(dir, MASK)?;
        self.dirs.insert(wd, dir.to_path_buf());
        Ok(())
    }

    /// (Re)sets the watches and lists every QoS parent and pod cgroup that exists.
    pub fn scan(&mut self) -> io::Result<Vec<CgroupEvent>> {
        let mut out = Vec::new();
        for qos in [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort] {
            let dir = self.root.qos_dir(qos);
            // Watch first, then list: nothing created in between is missed.
            match self.watch(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            }
            out.extend(self.list(qos, &dir)?);
        }
        Ok(out)
    }

    fn list(&self, qos: Qos, dir: &Path) -> io::Result<Vec<CgroupEvent>> {
        let mut out = Vec::new();
        let id = match cgroup_id(dir) {
            Ok(id) => id,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        out.push(CgroupEvent::QosDir {
            qos,
            path: dir.to_path_buf(),
            id,
        });
        let mut entries: Vec<_> = match std::fs::read_dir(dir) {
            Ok(rd) => rd.filter_map(Result::ok).collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let Some(uid) = self.root.parse_pod_dir(qos, &name.to_string_lossy()) else {
                continue;
            };
            let path = e.path();
            if let Ok(id) = cgroup_id(&path) {
                out.push(CgroupEvent::Appeared(PodCgroup { uid, qos, path, id }));
            }
        }
        Ok(out)
    }

    /// Waits (blocking) for the next changes, or until `stop` is readable or hung up (then
    /// `None`). A new QoS parent is watched and listed at once.
    pub fn wait(&mut self, stop: BorrowedFd<'_>) -> io::Result<Option<Vec<CgroupEvent>>> {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.inotify.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds on descriptors that outlive the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if fds[1].revents != 0 {
                return Ok(None);
            }
            if fds[0].revents == 0 {
                continue;
            }
            let raw: Vec<(WatchDescriptor, EventMask, Option<std::ffi::OsString>)> =
                match self.inotify.read_events(&mut self.buf) {
                    Ok(evs) => evs
                        .map(|e| (e.wd, e.mask, e.name.map(|n| n.to_os_string())))
                        .collect(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                };
            return self.events(raw).map(Some);
        }
    }

    fn events(
        &mut self,
        raw: Vec<(WatchDescriptor, EventMask, Option<std::ffi::OsString>)>,
    ) -> io::Result<Vec<CgroupEvent>> {
        let mut out = Vec::new();
        for (wd, mask, name) in raw {
            if mask.contains(EventMask::Q_OVERFLOW) {
                out.push(CgroupEvent::Overflow);
                out.extend(self.scan()?);
                continue;
            }
            if mask.contains(EventMask::IGNORED) {
                self.dirs.remove(&wd);
                continue;
            }
            let (Some(dir), Some(name)) = (self.dirs.get(&wd).cloned(), name) else {
                continue;
            };
            if !mask.contains(EventMask::ISDIR) {
                continue;
            }
            let name = name.to_string_lossy().into_owned();
            let path = dir.join(&name);
            let Some(parent_qos) = self.root.qos_of_dir(&dir) else {
                continue;
            };
            if mask.contains(EventMask::CREATE) {
                if let Some(qos) = self.root.qos_of_dir(&path) {
                    // A QoS parent appeared below the root (kubelet start): watch, then list.
                    if self.watch(&path).is_ok() {
                        out.extend(self.list(qos, &path)?);
                    }
                } else if let Some(uid) = self.root.parse_pod_dir(parent_qos, &name)
                    && let Ok(id) = cgroup_id(&path)
                {
                    out.push(CgroupEvent::Appeared(PodCgroup {
                        uid,
                        qos: parent_qos,
                        path,
                        id,
                    }));
                }
            } else if mask.contains(EventMask::DELETE)
                && let Some(uid) = self.root.parse_pod_dir(parent_qos, &name)
            {
                out.push(CgroupEvent::Gone { uid, path });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_both_ways() {
        let uid = "0f3e6a1c-4b2d-4c1e-9a57-3e0b9d1c2f44";
        let sd = KubepodsRoot::at(Path::new("/sys/fs/cgroup/kubepods.slice"));
        assert_eq!(sd.driver, Driver::Systemd);
        assert_eq!(
            sd.pod_dir(uid, Qos::Burstable),
            Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f3e6a1c_4b2d_4c1e_9a57_3e0b9d1c2f44.slice"
            )
        );
        assert_eq!(
            sd.pod_dir(uid, Qos::Guaranteed),
            Path::new(
                "/sys/fs/cgroup/kubepods.slice/kubepods-pod0f3e6a1c_4b2d_4c1e_9a57_3e0b9d1c2f44.slice"
            )
        );
        let fs = KubepodsRoot::at(Path::new("/x/kubepods"));
        assert_eq!(fs.driver, Driver::Cgroupfs);
        assert_eq!(
            fs.pod_dir(uid, Qos::BestEffort),
            Path::new("/x/kubepods/besteffort/pod0f3e6a1c-4b2d-4c1e-9a57-3e0b9d1c2f44")
        );
        for (root, q) in [
            (&sd, Qos::Guaranteed),
            (&sd, Qos::BestEffort),
            (&fs, Qos::Guaranteed),
            (&fs, Qos::Burstable),
        ] {
            let p = root.pod_dir(uid, q);
            let name = p.file_name().unwrap().to_str().unwrap();
            assert_eq!(root.parse_pod_dir(q, name).as_deref(), Some(uid), "{name}");
            assert_eq!(root.qos_of_dir(p.parent().unwrap()), Some(q));
        }
        // Container cgroups and QoS parents are not pods; a pod of one class is not parsed as another.
        assert_eq!(
            sd.parse_pod_dir(Qos::Guaranteed, "kubepods-burstable.slice"),
            None
        );
        assert_eq!(
            sd.parse_pod_dir(Qos::Guaranteed, "kubepods-burstable-pod0f3e6a1c_4b2d.slice"),
            None
        );
        assert_eq!(
            fs.parse_pod_dir(Qos::Burstable, "cri-containerd-abc.scope"),
            None
        );
        assert_eq!(fs.parse_pod_dir(Qos::Guaranteed, "burstable"), None);
        assert_eq!(fs.parse_pod_dir(Qos::Guaranteed, "pod../../x"), None);
    }

    /// A kubelet with `--cgroup-root=/kubelet` and the systemd driver (kind nodes): every
    /// unit name carries the root's prefix; `find` looks one level down for it.
    #[test]
    fn kubelet_cgroup_root_prefix() {
        let uid = "0f3e6a1c-4b2d-4c1e-9a57-3e0b9d1c2f44";
        let tmp = tempfile::tempdir().unwrap();
        let root_path = tmp
            .path()
            .join("kubelet.slice")
            .join("kubelet-kubepods.slice");
        std::fs::create_dir_all(&root_path).unwrap();
        std::fs::create_dir(tmp.path().join("system.slice")).unwrap();
        let root = KubepodsRoot::find(tmp.path()).expect("found one level down");
        assert_eq!(root.path, root_path);
        assert_eq!(root.driver, Driver::Systemd);
        assert_eq!(
            root.pod_dir(uid, Qos::BestEffort),
            root_path.join(
                "kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0f3e6a1c_4b2d_4c1e_9a57_3e0b9d1c2f44.slice"
            )
        );
        assert_eq!(
            root.pod_dir(uid, Qos::Guaranteed),
            root_path.join("kubelet-kubepods-pod0f3e6a1c_4b2d_4c1e_9a57_3e0b9d1c2f44.slice")
        );
        assert_eq!(
            root.parse_pod_dir(
                Qos::Burstable,
                "kubelet-kubepods-burstable-pod0f3e6a1c_4b2d_4c1e_9a57_3e0b9d1c2f44.slice"
            )
            .as_deref(),
            Some(uid)
        );
        // The unprefixed names are another kubelet's, not this root's pods.
        assert_eq!(
            root.parse_pod_dir(
                Qos::Burstable,
                "kubepods-burstable-pod0f3e6a1c_4b2d_4c1e_9a57_3e0b9d1c2f44.slice"
            ),
            None
        );
        // cgroupfs driver under a cgroup root: `<root>/kubepods`.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("kubelet").join("kubepods")).unwrap();
        let root = KubepodsRoot::find(tmp.path()).expect("found one level down");
        assert_eq!(root.driver, Driver::Cgroupfs);
        assert_eq!(
            root.pod_dir(uid, Qos::Burstable),
            tmp.path()
                .join("kubelet/kubepods/burstable/pod0f3e6a1c-4b2d-4c1e-9a57-3e0b9d1c2f44")
        );
        // Nothing of the kind: none.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("system.slice")).unwrap();
        assert_eq!(KubepodsRoot::find(tmp.path()), None);
    }
}
