//! The kernel relay: allowed TLS connections whose bytes the kernel moves (sockmap).
//!
//! Once a ClientHello is judged and the upstream connected, the proxy has nothing left to
//! decide: every later byte is ciphertext. [`relay`] first relays the connection in userspace
//! for the reads set in [`KernelRelay::new`] (short connections — one handshake and one request —
//! end there and never pay for the switch), then puts both sockets into `RELAY_SOCKS`, where
//! the `sk_skb` verdict program (`passthrough-ebpf/src/relay.rs`) redirects each arriving
//! segment to the other socket's send path. From then on the agent wakes only for the
//! connection's end: the sockets leave tokio's epoll and sit in a private epoll set that asks
//! for hang-ups and errors, not for data.
//!
//! # Order (why the gate)
//! Bytes can be in flight while a connection switches. The verdict program *passes* a segment
//! to userspace unless the agent has forwarded every byte passed so far (`RelayPeer::drained ==
//! RelayCounts::passed`, per socket); the agent reads passed bytes, writes them to the peer,
//! then publishes the new `drained`. So a redirected segment never overtakes a byte the agent
//! still holds. Before any gate opens, `SO_RCVLOWAT` is set on both sockets: the kernel then
//! runs the verdict on bytes that were queued before the socket entered the map (it otherwise
//! waits for the next segment).
//!
//! # End of stream (why the wait)
//! Redirected segments reach the peer through a kernel work queue, so a FIN can be seen before
//! the last segments are in the peer's send queue. On EOF the agent waits until the peer's
//! send queue has taken every byte (its `tcpi_bytes_acked` plus `SIOCOUTQ` reaches what was
//! forwarded and redirected) and only then shuts the peer's write side. Removing a socket from
//! the map would drop what the work queue still holds, so sockets leave it only by closing.
//!
//! # What stays in userspace
//! Nothing is decided here; the decision was made on the ClientHello. HTTP/1 and h2c are
//! judged per request and never use this path. A connection whose first reads fill the copy
//! buffer (a bulk transfer) keeps the userspace relay, whose `splice` moves bulk faster than
//! the per-segment kernel work queue. Before the switch the userspace phase reads on until a
//! short read on both sockets: the verdict program takes queued segments whole, so a segment
//! left half read would have its read part sent twice.
//!
//! Off by default (`--kernel-relay-after`): it raises requests/s of busy keep-alive
//! connections but costs the node more CPU per request than the userspace relay
//! (BENCHMARKS.md, docs/design.md).

use std::{
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use passthrough_common::{RelayCounts, RelayPeer};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
};

use super::relay::Relayed;

/// The kernel relay's three maps, as the agent loaded them (`RELAY_SOCKS`, `RELAY_PEERS`,
/// `RELAY_COUNTS`; see `passthrough-ebpf/src/maps.rs`). Only the map reads and writes are the
/// agent's; when to write what (the gate, the order of the switch) is decided here, next to the
/// userspace relay. Every method is one map operation; implementations serialise them as their
/// map handles need.
pub trait KernelRelayMaps: Send + Sync + 'static {
    /// `RELAY_COUNTS[cookie] = counts` (created zeroed before the socket enters the sockmap).
    fn insert_counts(&self, cookie: u64, counts: RelayCounts) -> io::Result<()>;
    /// `RELAY_SOCKS[cookie] = fd`: the verdict program runs for the socket from now on.
    fn insert_socket(&self, cookie: u64, fd: RawFd) -> io::Result<()>;
    /// `RELAY_PEERS[cookie] = peer`: where its segments go and how much the agent forwarded.
    fn set_peer(&self, cookie: u64, peer: RelayPeer) -> io::Result<()>;
    /// `RELAY_COUNTS[cookie]`: what the verdict program passed and redirected so far.
    fn counts(&self, cookie: u64) -> io::Result<RelayCounts>;
    /// Removes the `RELAY_PEERS` and `RELAY_COUNTS` entries of `cookie` (a socket leaves
    /// `RELAY_SOCKS` only by closing: removing it would drop what the work queue still holds).
    fn forget(&self, cookie: u64);
    /// Entries in `RELAY_PEERS` and `RELAY_COUNTS` together (0 when no connection is relayed).
    fn entries(&self) -> usize;
}

/// The kernel relay's maps and settings; shared by every connection of the proxy.
pub struct KernelRelay {
    maps: Box<dyn KernelRelayMaps>,
    after_reads: u32,
}

impl std::fmt::Debug for KernelRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelRelay")
            .field("after_reads", &self.after_reads)
            .finish()
    }
}

impl KernelRelay {
    /// A relay over `maps` that switches a connection into the kernel after `after_reads`
    /// userspace reads that moved bytes (0: at once).
    pub fn new(maps: impl KernelRelayMaps, after_reads: u32) -> Self {
        KernelRelay {
            maps: Box::new(maps),
            after_reads,
        }
    }

    /// Connections' entries in the relay's maps (peers and counters; 0 when idle).
    pub fn entries(&self) -> usize {
        self.maps.entries()
    }

    /// Creates both sockets' counters and puts them into `RELAY_SOCKS`. On an error the
    /// entries made so far stay (a socket in the map without a peer entry only passes bytes,
    /// which a userspace relay reads as usual); [`Enrolled`] removes the counters.
    fn enroll(&self, pair: &[(u64, RawFd); 2]) -> io::Result<()> {
        for (cookie, _) in pair {
            self.maps.insert_counts(*cookie, RelayCounts::default())?;
        }
        for (cookie, fd) in pair {
            self.maps.insert_socket(*cookie, *fd)?;
        }
        Ok(())
    }

    fn set_peer(&self, cookie: u64, peer: RelayPeer) -> io::Result<()> {
        self.maps.set_peer(cookie, peer)
    }

    fn counts(&self, cookie: u64) -> io::Result<RelayCounts> {
        self.maps.counts(cookie)
    }

    fn forget(&self, cookies: &[u64]) {
        for c in cookies {
            self.maps.forget(*c);
        }
    }
}

/// Removes a pair's map entries however the relay ends (the sockets leave `RELAY_SOCKS` as
/// they close).
struct Enrolled<'a> {
    relay: &'a KernelRelay,
    cookies: [u64; 2],
}

impl Drop for Enrolled<'_> {
    fn drop(&mut self) {
        self.relay.forget(&self.cookies);
    }
}

/// One direction of a switched connection.
struct Way {
    src: std::net::TcpStream,
    src_cookie: u64,
    dst_cookie: u64,
    /// Bytes in the destination's send queue history when the switch began
    /// (`tcpi_bytes_acked + SIOCOUTQ`).
    dst_base: u64,
    /// Passed bytes this agent read and forwarded.
    drained: u64,
    /// Set once EOF was forwarded.
    done: bool,
}

/// Writes `first` to `upstream`, relays in userspace for the reads set in [`KernelRelay::new`],
/// then moves the connection into the kernel until both directions are done (module doc).
pub async fn relay(
    kr: &KernelRelay,
    client: TcpStream,
    first: Vec<u8>,
    mut upstream: TcpStream,
) -> io::Result<Relayed> {
    use tokio::io::AsyncWriteExt as _;
    upstream.write_all(&first).await?;
    let mut moved = Relayed {
        up: first.len() as u64,
        ..Relayed::default()
    };
    drop(first);
    match super::relay::relay_for_reads(&client, &upstream, kr.after_reads, &mut moved).await? {
        super::relay::Phase::HalfClosed { client_done } => {
            // One direction already ended: what is left is one stream in one direction,
            // which the userspace relay finishes.
            let ends = super::relay::HalfClose::other_ended();
            let rest = if client_done {
                super::relay::one_way(&upstream, &client, true, &ends).await?
            } else {
                super::relay::one_way(&client, &upstream, true, &ends).await?
            };
            if client_done {
                moved.down += rest;
            } else {
                moved.up += rest;
            }
            return Ok(moved);
        }
        super::relay::Phase::Bulk => {
            let rest = super::relay::both_ways(&client, &upstream, true).await?;
            moved.up += rest.up;
            moved.down += rest.down;
            return Ok(moved);
        }
        super::relay::Phase::Continue => {}
    }
    let cookies = [cookie(&client)?, cookie(&upstream)?];
    let guard = Enrolled { relay: kr, cookies };
    if let Err(e) = kr.enroll(&[
        (cookies[1], upstream.as_raw_fd()),
        (cookies[0], client.as_raw_fd()),
    ]) {
        tracing::debug!(target: "passthrough::proxy", error = %e, "kernel relay unavailable; relaying in userspace");
        // A socket may already be in the map: its bytes reach userspace only through
        // read(), so the fallback must not splice.
        let rest = super::relay::both_ways(&client, &upstream, false).await?;
        drop(guard);
        moved.up += rest.up;
        moved.down += rest.down;
        return Ok(moved);
    }
    for s in [&client, &upstream] {
        set_rcvlowat(s.as_raw_fd())?;
    }
    let client = client.into_std()?;
    let upstream = upstream.into_std()?;
    let watch = Watch::new(&client, &upstream)?;
    let mut ways = [
        Way {
            src: client,
            src_cookie: cookies[0],
            dst_cookie: cookies[1],
            dst_base: 0,
            drained: 0,
            done: false,
        },
        Way {
            src: upstream,
            src_cookie: cookies[1],
            dst_cookie: cookies[0],
            dst_base: 0,
            drained: 0,
            done: false,
        },
    ];
    // Baselines before any gate opens: nothing is redirected into either socket yet.
    ways[0].dst_base = sent_total(ways[1].src.as_raw_fd())?;
    ways[1].dst_base = sent_total(ways[0].src.as_raw_fd())?;
    for i in 0..2 {
        let (way, dst) = way_and_dst(&mut ways, i);
        kr.set_peer(
            way.src_cookie,
            RelayPeer {
                peer: way.dst_cookie,
                drained: 0,
            },
        )?;
        drain(kr, way, dst).await?;
    }
    while !(ways[0].done && ways[1].done) {
        let events = watch.wait().await?;
        for (i, ev) in events.into_iter().enumerate() {
            // An error ends the relay even when this socket's own direction is done: the other
            // direction writes to it, and in userspace that write would fail too.
            if ev & (libc::EPOLLERR as u32) != 0 {
                let err = socket2::SockRef::from(&ways[i].src).take_error()?;
                return Err(err.unwrap_or_else(|| io::ErrorKind::ConnectionReset.into()));
            }
            if ev == 0 || ways[i].done {
                continue;
            }
            let (way, dst) = way_and_dst(&mut ways, i);
            drain(kr, way, dst).await?;
        }
    }
    let c = [kr.counts(cookies[0])?, kr.counts(cookies[1])?];
    moved.up += ways[0].drained + c[0].redirected;
    moved.down += ways[1].drained + c[1].redirected;
    moved.in_kernel = true;
    drop(ways);
    drop(watch);
    drop(guard);
    Ok(moved)
}

/// Direction `i` and the socket it writes to (the other direction's source).
fn way_and_dst(ways: &mut [Way; 2], i: usize) -> (&mut Way, &std::net::TcpStream) {
    let [a, b] = ways;
    if i == 0 { (a, &b.src) } else { (b, &a.src) }
}

/// Forwards the bytes the verdict program passed to userspace on `way.src` until the gate is
/// open (every passed byte forwarded); on EOF waits for the redirected bytes to reach `dst`'s
/// send queue and shuts `dst`'s write side.
async fn drain(kr: &KernelRelay, way: &mut Way, dst: &std::net::TcpStream) -> io::Result<()> {
    // On the heap: this runs only at the switch and at EOF, and a buffer held across the
    // awaits below would otherwise sit in every connection's future.
    let mut buf = vec![0u8; 16 * 1024];
    let mut idle_checks = 0u32;
    loop {
        // SAFETY: reads into our own buffer.
        let n = unsafe {
            libc::recv(
                way.src.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            write_all(dst, &buf[..n as usize]).await?;
            way.drained += n as u64;
            kr.set_peer(
                way.src_cookie,
                RelayPeer {
                    peer: way.dst_cookie,
                    drained: way.drained,
                },
            )?;
            continue;
        }
        let e = (n < 0).then(io::Error::last_os_error);
        if let Some(e) = &e
            && e.kind() != io::ErrorKind::WouldBlock
        {
            return Err(io::Error::new(e.kind(), e.to_string()));
        }
        let passed = kr.counts(way.src_cookie)?.passed;
        if passed < way.drained {
            // Bytes reached userspace without passing the verdict program: the accounting
            // that keeps the stream in order no longer holds, so end the connection.
            return Err(io::Error::other(
                "kernel relay: byte accounting out of step",
            ));
        }
        if passed == way.drained {
            if n == 0 {
                return finish(kr, way, dst).await;
            }
            return Ok(());
        }
        // Counted but not yet queued for reading: the segment is being processed on another
        // CPU right now.
        idle_checks += 1;
        if idle_checks < 64 {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// EOF on `way.src`: waits until `dst` has taken every forwarded and redirected byte, then
/// shuts its write side.
async fn finish(kr: &KernelRelay, way: &mut Way, dst: &std::net::TcpStream) -> io::Result<()> {
    let mut pause = Duration::from_micros(50);
    loop {
        let counts = kr.counts(way.src_cookie)?;
        let expected = way.dst_base + way.drained + counts.redirected;
        let sent = sent_total(dst.as_raw_fd())?;
        tracing::trace!(target: "passthrough::proxy", cookie = way.src_cookie, base = way.dst_base, drained = way.drained, ?counts, sent, "kernel relay: waiting for the last bytes before the half-close");
        if sent >= expected {
            break;
        }
        if let Some(e) = socket2::SockRef::from(dst).take_error()? {
            return Err(e);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    let _ = dst.shutdown(std::net::Shutdown::Write);
    way.done = true;
    Ok(())
}

/// Writes all of `bytes` to the non-blocking `dst`, waiting for room when its send queue is
/// full (rare here: only bytes that arrived during the switch go this way).
async fn write_all(dst: &std::net::TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: writes bytes of our own buffer.
        let m = unsafe {
            libc::send(
                dst.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if m >= 0 {
            bytes = &bytes[m as usize..];
            continue;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(e);
        }
        // SAFETY: `dst` outlives this registration, which ends at the end of the iteration.
        let fd = unsafe { AsyncFd::register_with_interest(dst.as_fd(), Interest::WRITABLE) }?;
        let _ = fd.writable().await?;
    }
    Ok(())
}

/// Every byte ever put into `fd`'s send queue: acknowledged bytes plus what is still queued.
/// Read in that order, an ACK between the two reads can only make the sum smaller, so a
/// caller waiting for a total never stops early.
fn sent_total(fd: RawFd) -> io::Result<u64> {
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid pointers to our own storage.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + queued.max(0) as u64)
}

fn cookie(s: &TcpStream) -> io::Result<u64> {
    socket2::SockRef::from(s).cookie()
}

/// `SO_RCVLOWAT = 1`: a no-op for the threshold, but the kernel re-checks the receive queue
/// and so runs the verdict on bytes queued before the socket entered the map.
fn set_rcvlowat(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: valid pointer to an int of the stated size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A private epoll set over a switched pair, asking for hang-ups and errors only: segments
/// the kernel redirects still wake the socket's waiters with `EPOLLIN`, which this set
/// filters out, so the agent sleeps through the traffic.
struct Watch {
    epoll: AsyncFd<OwnedFd>,
}

impl Watch {
    fn new(a: &std::net::TcpStream, b: &std::net::TcpStream) -> io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: epoll_create1 returned a new descriptor nobody else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        for (token, s) in [(0u64, a), (1u64, b)] {
            // EPOLLRDHUP: the peer's FIN; EPOLLERR/EPOLLHUP are always reported. Edge-triggered:
            // each is handled once.
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: token,
            };
            // SAFETY: valid descriptors and event.
            if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the AsyncFd owns the descriptor, which stays open until it is dropped.
        let epoll = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }?;
        Ok(Watch { epoll })
    }

    /// Waits for events; returns the event bits of socket 0 and 1.
    async fn wait(&self) -> io::Result<[u32; 2]> {
        loop {
            let mut guard = self.epoll.readable().await?;
            let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
            // SAFETY: valid buffer of 4 events; timeout 0 (never blocks).
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.get_ref().as_raw_fd(),
                    evs.as_mut_ptr(),
                    evs.len() as i32,
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                guard.clear_ready();
                continue;
            }
            let mut out = [0u32; 2];
            for ev in &evs[..n as usize] {
                let token = ev.u64;
                if let Some(slot) = out.get_mut(token as usize) {
                    *slot |= ev.events;
                }
            }
            return Ok(out);
        }
    }
}
