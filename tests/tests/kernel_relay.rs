//! The kernel relay (`proxy::kernel_relay`, `passthrough-ebpf/src/relay.rs`) on real sockets:
//! the verdict program loaded and attached to its sockmap, a client and an origin on loopback,
//! and the relay between them. Every stream is checked byte for byte, so a reordered, lost or
//! duplicated segment fails the test, and so does a half-close that overtakes data.

use std::{os::fd::AsRawFd, sync::Arc, time::Duration};

use passthrough_proxy::kernel_relay::{self, KernelRelay};
use passthrough_tests::require_kernel;
use passthrough_user::kernel::{Kernel, LoadOptions};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A deterministic byte pattern, different per stream.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

struct Rig {
    relay: Arc<KernelRelay>,
    _kernel: Kernel,
}

fn rig(after_reads: u32) -> Rig {
    let mut kernel = Kernel::load(LoadOptions::default()).expect("load");
    let maps = kernel
        .take_relay_maps()
        .expect("attach the verdict program")
        .expect("maps");
    Rig {
        relay: Arc::new(KernelRelay::new(maps, after_reads)),
        _kernel: kernel,
    }
}

type RelayTask = tokio::task::JoinHandle<std::io::Result<passthrough_proxy::relay::Relayed>>;

/// A connected (client, relay) pair and the origin side, with the relay running; returns the
/// client, the origin and the relay's task (its result: bytes up and down).
async fn connect_through(
    relay: Arc<KernelRelay>,
    first: Vec<u8>,
    v6: bool,
) -> (TcpStream, TcpStream, RelayTask) {
    let (client, accepted, upstream, origin) = sockets(v6).await;
    (client, origin, start(relay, accepted, first, upstream))
}

/// The relay between `accepted` and `upstream`, in a task.
fn start(
    relay: Arc<KernelRelay>,
    accepted: TcpStream,
    first: Vec<u8>,
    upstream: TcpStream,
) -> RelayTask {
    tokio::spawn(async move { kernel_relay::relay(&relay, accepted, first, upstream).await })
}

/// Two loopback connections: client → accepted (the proxy's client side) and upstream →
/// origin; `TCP_NODELAY` on all four.
async fn sockets(v6: bool) -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    let lo = if v6 { "[::1]:0" } else { "127.0.0.1:0" };
    let front = TcpListener::bind(lo).await.unwrap();
    let back = TcpListener::bind(lo).await.unwrap();
    let client = TcpStream::connect(front.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = front.accept().await.unwrap();
    let upstream = TcpStream::connect(back.local_addr().unwrap())
        .await
        .unwrap();
    let (origin, _) = back.accept().await.unwrap();
    for s in [&client, &accepted, &upstream, &origin] {
        s.set_nodelay(true).unwrap();
    }
    (client, accepted, upstream, origin)
}

async fn exchanges(client: &mut TcpStream, origin: &mut TcpStream, rounds: u32, seed: u32) {
    for i in 0..rounds {
        let req = pattern(1 + (i as usize * 37) % 3000, seed + i);
        client.write_all(&req).await.unwrap();
        let mut got = vec![0; req.len()];
        origin.read_exact(&mut got).await.unwrap();
        assert!(got == req, "request {i} arrived altered");
        let resp = pattern(1 + (i as usize * 101) % 9000, seed + 10_000 + i);
        origin.write_all(&resp).await.unwrap();
        let mut got = vec![0; resp.len()];
        client.read_exact(&mut got).await.unwrap();
        assert!(got == resp, "response {i} arrived altered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_then_half_closes_arrive_intact() {
    if !require_kernel() {
        return;
    }
    // 0: the switch happens before any reply; 4: mid-conversation (the default); 1000: never
    // (a connection shorter than the threshold stays in userspace).
    for after in [0, 4, 1000] {
        for v6 in [false, true] {
            let r = rig(after);
            let hello = pattern(517, 7);
            let (mut client, mut origin, task) =
                connect_through(r.relay.clone(), hello.clone(), v6).await;
            let mut got = vec![0; hello.len()];
            origin.read_exact(&mut got).await.unwrap();
            assert_eq!(got, hello, "first bytes");
            exchanges(&mut client, &mut origin, 60, after).await;
            // Client half-closes; the origin still answers, then closes; the answer must
            // arrive in full before the client sees EOF.
            let last = pattern(200_000, 99);
            client.write_all(b"bye").await.unwrap();
            client.shutdown().await.unwrap();
            let mut tail = Vec::new();
            origin.read_to_end(&mut tail).await.unwrap();
            assert_eq!(tail, b"bye");
            origin.write_all(&last).await.unwrap();
            drop(origin);
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("relay ends")
                .unwrap();
            assert!(
                rest == last,
                "after={after} v6={v6}: {} of {} bytes after the half-close; relay: {n:?}",
                rest.len(),
                last.len()
            );
            let n = n.expect("relay ok");
            let up: u64 = hello.len() as u64
                + (0..60u32).map(|i| 1 + (i as u64 * 37) % 3000).sum::<u64>()
                + 3;
            let down: u64 =
                (0..60u32).map(|i| 1 + (i as u64 * 101) % 9000).sum::<u64>() + last.len() as u64;
            assert_eq!((n.up, n.down), (up, down), "after={after} v6={v6}");
            // 120 small reads: past 0 and 4 the connection moved into the kernel; 1000 never
            // came.
            assert_eq!(n.in_kernel, after < 1000, "after={after} v6={v6}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_both_ways_at_once_arrives_intact() {
    if !require_kernel() {
        return;
    }
    let r = rig(0);
    let (mut client, mut origin, task) = connect_through(r.relay.clone(), Vec::new(), false).await;
    // One small exchange first: the switch (at once, `after_reads` 0) happens before the bulk
    // starts, so the bulk runs in the kernel.
    exchanges(&mut client, &mut origin, 1, 5).await;
    let up = pattern(24 << 20, 1);
    let down = pattern(24 << 20, 2);
    let (mut cr, mut cw) = client.into_split();
    let (mut or, mut ow) = origin.into_split();
    let (u, d) = (up.clone(), down.clone());
    let writers = tokio::spawn(async move {
        let a = async {
            cw.write_all(&u).await.unwrap();
            cw.shutdown().await.unwrap();
        };
        let b = async {
            ow.write_all(&d).await.unwrap();
            ow.shutdown().await.unwrap();
        };
        tokio::join!(a, b);
    });
    let mut got_up = Vec::new();
    let mut got_down = Vec::new();
    let (a, b) = tokio::join!(or.read_to_end(&mut got_up), cr.read_to_end(&mut got_down));
    a.unwrap();
    b.unwrap();
    writers.await.unwrap();
    assert!(
        got_up == up,
        "upstream got {} of {} bytes or altered",
        got_up.len(),
        up.len()
    );
    assert!(
        got_down == down,
        "client got {} of {} bytes or altered",
        got_down.len(),
        down.len()
    );
    let n = task.await.unwrap().expect("relay ok");
    assert_eq!((n.up - 1, n.down - 1), (up.len() as u64, down.len() as u64));
    assert!(n.in_kernel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_transfer_among_the_first_reads_stays_in_userspace() {
    if !require_kernel() {
        return;
    }
    // A download that starts within the first reads fills the copy buffer: the connection
    // keeps the userspace relay (splice), which moves bulk faster than the kernel relay.
    let r = rig(16);
    let (mut client, mut origin, task) = connect_through(r.relay.clone(), Vec::new(), false).await;
    exchanges(&mut client, &mut origin, 1, 9).await;
    let body = pattern(8 << 20, 3);
    let sent = body.clone();
    let writer = tokio::spawn(async move {
        origin.write_all(&sent).await.unwrap();
        origin.shutdown().await.unwrap();
        origin
    });
    let mut got = vec![0; body.len()];
    client.read_exact(&mut got).await.unwrap();
    assert!(got == body, "the download arrived altered");
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    drop(writer.await.unwrap());
    let n = task.await.unwrap().expect("relay ok");
    assert!(
        !n.in_kernel,
        "the bulk transfer was moved into the kernel relay"
    );
    assert_eq!(n.down, 1 + body.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_already_queued_at_the_switch_keep_their_order() {
    if !require_kernel() {
        return;
    }
    // The client sends several messages back to back before the relay ever runs, so bytes
    // sit in the receive queue at the switch (and arrive during it): the gate must forward
    // them before anything the kernel redirects.
    for after in [0, 1, 2] {
        let r = rig(after);
        let (mut client, accepted, upstream, mut origin) = sockets(false).await;
        let stream = pattern(3 << 20, 40 + after);
        let sent = stream.clone();
        let writer = tokio::spawn(async move {
            for chunk in sent.chunks(1000) {
                client.write_all(chunk).await.unwrap();
            }
            client.shutdown().await.unwrap();
            client
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let task = start(r.relay.clone(), accepted, Vec::new(), upstream);
        let mut got = Vec::new();
        origin.read_to_end(&mut got).await.unwrap();
        assert!(
            got == stream,
            "after={after}: {} of {} bytes or reordered",
            got.len(),
            stream.len()
        );
        drop(origin);
        let _client = writer.await.unwrap();
        task.await.unwrap().expect("relay ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_origin_ends_the_relay_and_frees_its_entries() {
    if !require_kernel() {
        return;
    }
    let r = rig(0);
    let (mut client, origin, task) = connect_through(r.relay.clone(), Vec::new(), false).await;
    client.write_all(b"x").await.unwrap();
    // SO_LINGER 0: close sends a reset.
    let std = origin.into_std().unwrap();
    socket2::SockRef::from(&std)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(std);
    let res = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("relay ends after the reset")
        .unwrap();
    assert!(res.is_err(), "a reset is an error: {res:?}");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
        .await
        .expect("client sees the end");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert_eq!(r.relay.entries(), 0, "map entries left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_connections_leave_no_map_entries() {
    if !require_kernel() {
        return;
    }
    let r = rig(0);
    for i in 0..20 {
        let (mut client, mut origin, task) =
            connect_through(r.relay.clone(), Vec::new(), i % 2 == 1).await;
        exchanges(&mut client, &mut origin, 3, i).await;
        client.shutdown().await.unwrap();
        origin.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        origin.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert!(task.await.unwrap().expect("relay ok").in_kernel);
    }
    assert_eq!(r.relay.entries(), 0, "map entries left behind");
}

/// The verdict program's contract, with this test acting as the agent on the raw maps: a
/// segment is passed to userspace until the agent has forwarded every passed byte, redirected
/// after that, passed again when the peer has left the map, and a bare FIN is not forwarded.
#[test]
fn the_verdict_program_redirects_only_behind_the_gate() {
    use passthrough_common::{RelayCounts, RelayPeer};
    use passthrough_proxy::KernelRelayMaps as _;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    if !require_kernel() {
        return;
    }
    let mut kernel = Kernel::load(LoadOptions::default()).expect("load");
    let maps = kernel.take_relay_maps().unwrap().unwrap();
    assert!(kernel.take_relay_maps().unwrap().is_none(), "taken once");
    let pair = || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        (c, a)
    };
    let (mut client, mut accepted) = pair();
    let (mut upstream, mut origin) = pair();
    origin.set_nonblocking(true).unwrap();
    accepted.set_nonblocking(true).unwrap();
    let cookie = |s: &TcpStream| socket2::SockRef::from(s).cookie().unwrap();
    let (ca, cu) = (cookie(&accepted), cookie(&upstream));
    let settle = || std::thread::sleep(Duration::from_millis(50));
    let origin_got = |o: &mut TcpStream| {
        let mut buf = [0u8; 64];
        match o.read(&mut buf) {
            Ok(n) => buf[..n].to_vec(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Vec::new(),
            Err(e) => panic!("origin read: {e}"),
        }
    };
    for c in [ca, cu] {
        maps.insert_counts(c, RelayCounts::default()).unwrap();
    }
    maps.insert_socket(cu, upstream.as_raw_fd()).unwrap();
    maps.insert_socket(ca, accepted.as_raw_fd()).unwrap();

    // No peer entry: passed, readable here.
    client.write_all(b"first").unwrap();
    settle();
    assert_eq!(maps.counts(ca).unwrap().passed, 5);
    // Peer set but the 5 passed bytes not forwarded yet: the gate stays shut.
    maps.set_peer(
        ca,
        RelayPeer {
            peer: cu,
            drained: 0,
        },
    )
    .unwrap();
    client.write_all(b"second").unwrap();
    settle();
    let c = maps.counts(ca).unwrap();
    assert_eq!(
        (c.passed, c.redirected),
        (11, 0),
        "redirected past unforwarded bytes"
    );
    assert!(origin_got(&mut origin).is_empty());
    // The agent forwards what was passed, then publishes it: the gate opens.
    let mut held = [0u8; 64];
    let n = accepted.read(&mut held).unwrap();
    assert_eq!(&held[..n], b"firstsecond");
    upstream.write_all(&held[..n]).unwrap();
    maps.set_peer(
        ca,
        RelayPeer {
            peer: cu,
            drained: 11,
        },
    )
    .unwrap();
    client.write_all(b"third").unwrap();
    settle();
    let c = maps.counts(ca).unwrap();
    assert_eq!((c.passed, c.redirected), (11, 5));
    assert_eq!(origin_got(&mut origin), b"firstsecondthird");
    // A bare FIN is dropped, not redirected (a zero-byte send would break the peer's pipe).
    client.shutdown(std::net::Shutdown::Write).unwrap();
    settle();
    assert!(
        socket2::SockRef::from(&upstream)
            .take_error()
            .unwrap()
            .is_none()
    );
    assert_eq!(maps.counts(ca).unwrap().redirected, 5);
    // The other way, with the peer gone from the map: passed to userspace, not lost.
    maps.insert_counts(cu, RelayCounts::default()).unwrap();
    maps.set_peer(
        cu,
        RelayPeer {
            peer: ca,
            drained: 0,
        },
    )
    .unwrap();
    maps.socks.lock().unwrap().remove(&ca).unwrap();
    origin.write_all(b"back").unwrap();
    settle();
    let c = maps.counts(cu).unwrap();
    assert_eq!((c.passed, c.redirected), (4, 0));
    upstream.set_nonblocking(true).unwrap();
    let n = upstream.read(&mut held).unwrap();
    assert_eq!(&held[..n], b"back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_after_its_half_close_ends_the_relay() {
    if !require_kernel() {
        return;
    }
    // The client half-closes, then resets; the origin keeps its side open. The relay must end
    // (as a userspace relay would, on its next write to the client) instead of waiting for an
    // origin FIN that never comes.
    let r = rig(0);
    let (mut client, mut origin, task) = connect_through(r.relay.clone(), Vec::new(), false).await;
    exchanges(&mut client, &mut origin, 2, 11).await;
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    origin.read_to_end(&mut rest).await.unwrap();
    let std = client.into_std().unwrap();
    socket2::SockRef::from(&std)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(std);
    let res = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the relay ends after the client's reset")
        .unwrap();
    assert!(res.is_err(), "{res:?}");
    drop(origin);
    assert_eq!(r.relay.entries(), 0, "map entries left behind");
}
