//! The kubepods watcher on the real cgroup2 hierarchy: a test kubepods tree of each driver
//! layout is made under the cgroup2 mount, pods "start" (mkdir) and "stop" (rmdir), and the
//! watcher, blocking on a thread of its own as in the agent, must report each one. Needs root
//! (skipped otherwise, failed under CI=true).

use std::{
    os::fd::{AsFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use passthrough_kube::cgroups::{CgroupEvent, KubepodsRoot, KubepodsWatcher, Qos};

fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap()))
    })
}

/// A test cgroup tree, removed (deepest first) when dropped, also when the test panics.
struct Tree(PathBuf);

impl Drop for Tree {
    fn drop(&mut self) {
        fn rm(p: &Path) {
            if let Ok(rd) = std::fs::read_dir(p) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        rm(&e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(p);
        }
        rm(&self.0);
    }
}

fn usable() -> Option<PathBuf> {
    let ok = unsafe { libc::geteuid() } == 0;
    match (ok, cgroup2_mount()) {
        (true, Some(m)) => Some(m),
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "needs root and cgroup2 under CI"
            );
            eprintln!("skipped: needs root and a cgroup2 mount");
            None
        }
    }
}

/// The watcher on a thread of its own, as the agent runs it (blocking in `wait`).
struct Reader {
    rx: mpsc::Receiver<Vec<CgroupEvent>>,
    stop: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    fn spawn(mut w: KubepodsWatcher) -> Reader {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let (stop_rx, stop_tx) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            while let Some(evs) = w.wait(stop_rx.as_fd()).expect("inotify") {
                if tx.send(evs).is_err() {
                    return;
                }
            }
        });
        Reader {
            rx,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn expect(&self, pred: impl Fn(&CgroupEvent) -> bool, what: &str) -> CgroupEvent {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let evs = self
                .rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no event: {what}"));
            if let Some(e) = evs.into_iter().find(|e| pred(e)) {
                return e;
            }
        }
    }

    /// Closes the stop pipe: the thread's `wait` returns `None` and the thread ends.
    fn stop(mut self) {
        drop(self.stop.take());
        self.thread.take().unwrap().join().expect("reader thread");
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_layout(top: &Path, root_name: &str) {
    let root = top.join(root_name);
    std::fs::create_dir(&root).unwrap();
    let kp = KubepodsRoot::at(&root);
    // One pod exists before the watcher starts; the QoS parents do not exist yet.
    let early = "11111111-2222-3333-4444-555555555555";
    std::fs::create_dir(kp.pod_dir(early, Qos::Guaranteed)).unwrap();
    let (w, now) = KubepodsWatcher::start(kp.clone()).unwrap();
    assert!(
        now.iter().any(
            |e| matches!(e, CgroupEvent::Appeared(p) if p.uid == early && p.qos == Qos::Guaranteed)
        ),
        "{now:?}"
    );
    assert!(now.iter().any(|e| matches!(
        e,
        CgroupEvent::QosDir {
            qos: Qos::Guaranteed,
            ..
        }
    )));

    let r = Reader::spawn(w);
    // The kubelet creates the burstable parent, then a pod in it.
    std::fs::create_dir(kp.qos_dir(Qos::Burstable)).unwrap();
    r.expect(
        |e| {
            matches!(
                e,
                CgroupEvent::QosDir {
                    qos: Qos::Burstable,
                    ..
                }
            )
        },
        "burstable parent",
    );
    let uid = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    let dir = kp.pod_dir(uid, Qos::Burstable);
    std::fs::create_dir(&dir).unwrap();
    let ev = r.expect(
        |e| matches!(e, CgroupEvent::Appeared(p) if p.uid == uid),
        "new pod",
    );
    let CgroupEvent::Appeared(p) = ev else {
        unreachable!()
    };
    assert_eq!(p.path, dir);
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!(p.id, std::fs::metadata(&dir).unwrap().ino());
    // A container below the pod is not a pod.
    std::fs::create_dir(dir.join("cri-containerd-0123.scope")).unwrap();
    std::fs::remove_dir(dir.join("cri-containerd-0123.scope")).unwrap();
    std::fs::remove_dir(&dir).unwrap();
    let ev = r.expect(|e| matches!(e, CgroupEvent::Gone { .. }), "pod gone");
    assert_eq!(
        ev,
        CgroupEvent::Gone {
            uid: uid.into(),
            path: dir
        }
    );
    r.stop();
}

#[test]
fn every_driver_layout_on_real_cgroup2() {
    let Some(mount) = usable() else { return };
    let top = mount.join(format!("passthrough-test-kubepods-{}", std::process::id()));
    std::fs::create_dir(&top).unwrap();
    let _tree = Tree(top.clone());
    run_layout(&top, "kubepods.slice");
    run_layout(&top, "kubepods");
    // A kubelet with `--cgroup-root=/kubelet` and the systemd driver (kind nodes): every unit
    // name carries the root's prefix (`kubelet-kubepods-burstable-pod<uid>.slice`).
    std::fs::create_dir(top.join("kubelet.slice")).unwrap();
    run_layout(&top, "kubelet.slice/kubelet-kubepods.slice");
}
