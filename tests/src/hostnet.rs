//! Test hosts reachable from the **host** network namespace, and pod-like workloads in a network
//! namespace of their own that reach the host only (the proxy), for the proxy's kernel tests
//! and `pt-bench-proxy`.
//!
//! ```text
//!  host netns (the agent, host-netns workloads)        server netns pts-<pid>-<n>
//!   ptv<id>: 198.51.100.249/30, 2001:db8:f00::1/64 <-veth-> eth0: .250/30, 2001:db8:f00::2/64
//!   routes: 203.0.113.160/27 via .250                    lo: AnyIP 203.0.113.160/27,
//!           2001:db8:f00:100::/56 via 2001:db8:f00::2          2001:db8:f00:100::/56
//!                                                        default via the host side
//!
//!  pod netns ptc-<pid>-<n> (PodNet)
//!   eth0: 198.51.100.244/32, 2001:db8:f00:ee::2/128 <-veth-> ptp<id> (host netns):
//!   routes: the proxy addresses only                     169.254.77.1/32, 2001:db8:f00:ff::1/128
//!                                                        routes to the pod's /32 and /128
//! ```
//!
//! Host routes are shared by every test of the machine, so each user picks a [`Slot`] (tests and
//! the benchmark use different ones) and the users of one slot run one at a time: within a
//! process by the test file's own lock, across processes (two checkouts testing side by side)
//! by [`SlotLock`], an `flock` that [`HostNet`] and [`PodNet`] hold while they exist. 192.0.2.0/24 is
//! not used in the host namespace: on some machines (this one) it is the real uplink. Nothing is
//! routed anywhere else and no sysctl is changed: the host never forwards, the pod only reaches
//! the proxy on the host, the proxy's upstream goes host → server netns.
//!
//! Cleanup: deleting a namespace deletes the veth pair, its addresses and the routes through it,
//! so [`crate::sweep()`] (which removes `ptc-`/`pts-` namespaces) also cleans up after a crash.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Result;

use crate::{run, unique_suffix};

/// One set of host-side addresses and routes.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// Host side of the server veth (/30).
    pub host_v4: Ipv4Addr,
    /// Server side of the server veth (/30).
    pub srv_v4: Ipv4Addr,
    /// AnyIP test hosts in the server netns: `hosts_v4/27`.
    pub hosts_v4: Ipv4Addr,
    /// Host side of the server veth (/64).
    pub host_v6: Ipv6Addr,
    /// Server side (/64).
    pub srv_v6: Ipv6Addr,
    /// AnyIP test hosts: `hosts_v6/56`.
    pub hosts_v6: Ipv6Addr,
    /// A pod's addresses (/32, /128).
    pub pod_v4: Ipv4Addr,
    /// A pod's IPv6 address.
    pub pod_v6: Ipv6Addr,
    /// The proxy's address for pods (link-local, on the host side of the pod veth).
    pub proxy_v4: Ipv4Addr,
    /// The proxy's IPv6 address for pods.
    pub proxy_v6: Ipv6Addr,
}

/// The slot of the kernel tests.
pub const TEST_SLOT: Slot = Slot {
    host_v4: Ipv4Addr::new(198, 51, 100, 249),
    srv_v4: Ipv4Addr::new(198, 51, 100, 250),
    hosts_v4: Ipv4Addr::new(203, 0, 113, 160),
    host_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf00, 0, 0, 0, 0, 1),
    srv_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf00, 0, 0, 0, 0, 2),
    hosts_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf00, 0x100, 0, 0, 0, 0),
    pod_v4: Ipv4Addr::new(198, 51, 100, 244),
    pod_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf00, 0xee, 0, 0, 0, 2),
    proxy_v4: Ipv4Addr::new(169, 254, 77, 1),
    proxy_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf00, 0xff, 0, 0, 0, 1),
};

/// The slot of `pt-bench-proxy`.
pub const BENCH_SLOT: Slot = Slot {
    host_v4: Ipv4Addr::new(198, 51, 100, 253),
    srv_v4: Ipv4Addr::new(198, 51, 100, 254),
    hosts_v4: Ipv4Addr::new(203, 0, 113, 224),
    host_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf01, 0, 0, 0, 0, 1),
    srv_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf01, 0, 0, 0, 0, 2),
    hosts_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf01, 0x100, 0, 0, 0, 0),
    pod_v4: Ipv4Addr::new(198, 51, 100, 240),
    pod_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf01, 0xee, 0, 0, 0, 2),
    proxy_v4: Ipv4Addr::new(169, 254, 77, 2),
    proxy_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf01, 0xff, 0, 0, 0, 1),
};

/// The slot of the load and fault tests (`tests/tests/load_faults.rs`): 198.51.100.228/30,
/// 203.0.113.128/27, 2001:db8:f03::/48, pod 198.51.100.226, proxy 169.254.77.4. Disjoint from
/// `TEST_SLOT`, `BENCH_SLOT` and `SEC_SLOT`.
pub const LOAD_SLOT: Slot = Slot {
    host_v4: Ipv4Addr::new(198, 51, 100, 229),
    srv_v4: Ipv4Addr::new(198, 51, 100, 230),
    hosts_v4: Ipv4Addr::new(203, 0, 113, 128),
    host_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf03, 0, 0, 0, 0, 1),
    srv_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf03, 0, 0, 0, 0, 2),
    hosts_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf03, 0x100, 0, 0, 0, 0),
    pod_v4: Ipv4Addr::new(198, 51, 100, 226),
    pod_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf03, 0xee, 0, 0, 0, 2),
    proxy_v4: Ipv4Addr::new(169, 254, 77, 4),
    proxy_v6: Ipv6Addr::new(0x2001, 0xdb8, 0xf03, 0xff, 0, 0, 0, 1),
};

impl Slot {
    /// Test host number `n` (1..=30) of the slot, IPv4.
    pub fn host4(&self, n: u8) -> IpAddr {
        assert!((1..=30).contains(&n));
        let o = self.hosts_v4.octets();
        IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3] + n))
    }

    /// Test host number `n` (1..=255) of the slot, IPv6.
    pub fn host6(&self, n: u16) -> IpAddr {
        let mut s = self.hosts_v6.segments();
        s[7] = n;
        IpAddr::V6(Ipv6Addr::from(s))
    }
}

/// A short interface name `<prefix><hex>` (≤ 15 bytes) unique per process and call.
fn ifname(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xff;
    format!("{prefix}{:x}{n:02x}", std::process::id())
}

/// Exclusive use of a [`Slot`]'s host-side addresses and routes by this process: an `flock` on
/// `/run/passthrough-test-slot-<host_v4>.lock`, shared by every holder in the process (a test
/// that holds a [`HostNet`] and a [`PodNet`] of one slot takes it once) and released with the
/// last one. A second process waits for it instead of adding the same addresses and routes.
/// The kernel drops an `flock` with its process, so a crashed run never leaves the slot taken.
pub struct SlotLock {
    key: Ipv4Addr,
}

/// Slots this process holds: the lock file and how many holders share it.
static HELD: std::sync::Mutex<Vec<(Ipv4Addr, std::fs::File, usize)>> =
    std::sync::Mutex::new(Vec::new());

impl SlotLock {
    /// Takes `slot` for this process, waiting while another process holds it.
    pub fn take(slot: &Slot) -> Result<SlotLock> {
        use std::os::fd::AsRawFd as _;
        let key = slot.host_v4;
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = held.iter_mut().find(|(k, ..)| *k == key) {
            entry.2 += 1;
            return Ok(SlotLock { key });
        }
        let path = format!("/run/passthrough-test-slot-{key}.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("opening {path}: {e}"))?;
        // SAFETY: flock on a descriptor we own; blocks until the other process lets go.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            anyhow::bail!("flock {path}: {}", std::io::Error::last_os_error());
        }
        held.push((key, file, 1));
        Ok(SlotLock { key })
    }
}

impl Drop for SlotLock {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.iter().position(|(k, ..)| *k == self.key) {
            held[i].2 -= 1;
            if held[i].2 == 0 {
                // Closing the file releases the flock.
                held.swap_remove(i);
            }
        }
    }
}

/// A server netns whose AnyIP test hosts the host network namespace reaches through a veth.
pub struct HostNet {
    veth: VethNs,
    slot: Slot,
    // Dropped after the veth (fields drop in order): the routes are gone before the slot is free.
    _lock: SlotLock,
}

impl HostNet {
    /// Creates the server netns `pts-<pid>-<n>`, the veth and the host routes of `slot`.
    pub fn new(slot: Slot) -> Result<HostNet> {
        let lock = SlotLock::take(&slot)?;
        let net = HostNet {
            veth: VethNs::new(crate::SERVER_NS_PREFIX, "ptv")?,
            slot,
            _lock: lock,
        };
        let veth = &net.veth;
        let (ns, link) = (veth.ns.as_str(), veth.link.as_str());
        let s = slot;
        let v4 = |a: Ipv4Addr, len: u8| format!("{a}/{len}");
        let v6 = |a: Ipv6Addr, len: u8| format!("{a}/{len}");
        let cmds: Vec<Vec<String>> = vec![
            args(&["-n", ns, "addr", "add", &v4(s.srv_v4, 30), "dev", "eth0"]),
            args(&[
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &v6(s.srv_v6, 64),
                "dev",
                "eth0",
                "nodad",
            ]),
            args(&[
                "-n",
                ns,
                "route",
                "add",
                "local",
                &v4(s.hosts_v4, 27),
                "dev",
                "lo",
            ]),
            args(&[
                "-n",
                ns,
                "-6",
                "route",
                "add",
                "local",
                &v6(s.hosts_v6, 56),
                "dev",
                "lo",
            ]),
            args(&[
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &s.host_v4.to_string(),
            ]),
            args(&[
                "-n",
                ns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &s.host_v6.to_string(),
            ]),
            args(&["addr", "add", &v4(s.host_v4, 30), "dev", link]),
            args(&[
                "-6",
                "addr",
                "add",
                &v6(s.host_v6, 64),
                "dev",
                link,
                "nodad",
            ]),
            args(&["link", "set", link, "up"]),
            args(&[
                "route",
                "add",
                &v4(s.hosts_v4, 27),
                "via",
                &s.srv_v4.to_string(),
                "dev",
                link,
            ]),
            args(&[
                "-6",
                "route",
                "add",
                &v6(s.hosts_v6, 56),
                "via",
                &s.srv_v6.to_string(),
                "dev",
                link,
            ]),
        ];
        veth.configure(&cmds)?;
        Ok(net)
    }

    /// The server netns name (where [`crate::l7::Servers`] bind).
    pub fn server_ns(&self) -> &str {
        &self.veth.ns
    }

    /// The slot.
    pub fn slot(&self) -> &Slot {
        &self.slot
    }

    /// The host side of the server veth (in the host netns). Routes and neighbour entries a
    /// test adds on it go away with the link when this `HostNet` is dropped.
    pub fn host_link(&self) -> &str {
        &self.veth.link
    }
}

/// A network namespace joined to the host netns by a veth (`eth0` inside, `link` outside),
/// both ends and `lo` up. Dropping it deletes the link (and with it every route and address a
/// test put on it) and the namespace.
struct VethNs {
    ns: String,
    link: String,
}

impl VethNs {
    /// Creates `<ns_prefix><pid>-<n>` and the veth `<link_prefix>…`.
    fn new(ns_prefix: &str, link_prefix: &str) -> Result<VethNs> {
        let v = VethNs {
            ns: format!("{ns_prefix}{}", unique_suffix()),
            link: ifname(link_prefix),
        };
        run("ip", &["netns", "add", &v.ns])?;
        // From here on, Drop removes whatever was created.
        let (ns, link) = (v.ns.as_str(), v.link.as_str());
        run(
            "ip",
            &[
                "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        Ok(v)
    }

    /// Runs each `ip` command (addresses and routes on both sides).
    fn configure(&self, cmds: &[Vec<String>]) -> Result<()> {
        for c in cmds {
            let c: Vec<&str> = c.iter().map(String::as_str).collect();
            run("ip", &c)?;
        }
        Ok(())
    }
}

impl Drop for VethNs {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.link]);
        if crate::netns::netns_path(&self.ns).exists()
            && let Err(e) = run("ip", &["netns", "del", &self.ns])
        {
            eprintln!("warning: deleting netns {}: {e:#}", self.ns);
        }
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// A pod-like workload network namespace `ptc-<pid>-<n>`: a veth to the host netns whose host
/// side carries the proxy's link-local address (and an IPv6 one from 2001:db8::/32). The pod
/// reaches nothing but those two addresses.
pub struct PodNet {
    veth: VethNs,
    slot: Slot,
    _lock: SlotLock,
}

impl PodNet {
    /// Creates the pod netns, the veth, the proxy addresses on the host side and the routes.
    pub fn new(slot: Slot) -> Result<PodNet> {
        let lock = SlotLock::take(&slot)?;
        let pod = PodNet {
            veth: VethNs::new(crate::CLIENT_NS_PREFIX, "ptp")?,
            slot,
            _lock: lock,
        };
        let veth = &pod.veth;
        let (ns, link) = (veth.ns.as_str(), veth.link.as_str());
        let s = slot;
        let cmds: Vec<Vec<String>> = vec![
            args(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/32", s.pod_v4),
                "dev",
                "eth0",
            ]),
            args(&[
                "-n",
                ns,
                "-6",
                "addr",
                "add",
                &format!("{}/128", s.pod_v6),
                "dev",
                "eth0",
                "nodad",
            ]),
            args(&["addr", "add", &format!("{}/32", s.proxy_v4), "dev", link]),
            args(&[
                "-6",
                "addr",
                "add",
                &format!("{}/128", s.proxy_v6),
                "dev",
                link,
                "nodad",
            ]),
            args(&["link", "set", link, "up"]),
            args(&[
                "-n",
                ns,
                "route",
                "add",
                &format!("{}/32", s.proxy_v4),
                "dev",
                "eth0",
            ]),
            args(&[
                "-n",
                ns,
                "-6",
                "route",
                "add",
                &format!("{}/128", s.proxy_v6),
                "dev",
                "eth0",
            ]),
            args(&["route", "add", &format!("{}/32", s.pod_v4), "dev", link]),
            args(&[
                "-6",
                "route",
                "add",
                &format!("{}/128", s.pod_v6),
                "dev",
                link,
            ]),
        ];
        veth.configure(&cmds)?;
        Ok(pod)
    }

    /// The pod netns name.
    pub fn ns(&self) -> &str {
        &self.veth.ns
    }

    /// `/run/netns/<pod>`.
    pub fn ns_path(&self) -> std::path::PathBuf {
        crate::netns::netns_path(&self.veth.ns)
    }

    /// A port free on both proxy addresses right now (for `--proxy-addr`).
    pub fn free_proxy_port(&self) -> Result<u16> {
        for _ in 0..20 {
            let l4 =
                std::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(self.slot.proxy_v4), 0))?;
            let port = l4.local_addr()?.port();
            if std::net::TcpListener::bind(SocketAddr::new(IpAddr::V6(self.slot.proxy_v6), port))
                .is_ok()
            {
                return Ok(port);
            }
        }
        anyhow::bail!("no port free on both proxy addresses")
    }

    /// `--proxy-addr` values for `port`: the link-local IPv4 address and the IPv6 one.
    pub fn proxy_addrs(&self, port: u16) -> [SocketAddr; 2] {
        [
            SocketAddr::new(IpAddr::V4(self.slot.proxy_v4), port),
            SocketAddr::new(IpAddr::V6(self.slot.proxy_v6), port),
        ]
    }
}
