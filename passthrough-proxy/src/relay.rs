//! Upstream connections (marked so the kernel lets them through) and the byte relay.
//!
//! Each direction starts by copying through a per-thread scratch buffer (`read` + `write` in one
//! step, so an idle connection holds no buffer): for the small records of request/response
//! traffic that is cheaper than splicing. A read that fills the scratch buffer, or the
//! `BULK_READS`th read of at least a quarter of it, shows a bulk transfer (a stream arriving in
//! MSS-sized segments rarely fills 16 KiB per wake-up), and the direction switches to `splice(2)`
//! through a pipe (socket → pipe → socket, no copy to userspace) for the rest of the
//! connection; the pipe is taken only then, and where none can be made the direction keeps
//! copying. Either way EOF in one direction becomes a write shutdown (half-close) toward the
//! other side, and the relay ends when both directions are done (the second EOF needs no
//! shutdown: closing the sockets sends it, see `HalfClose`).

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;
use tokio::{
    io::AsyncWriteExt,
    io::Interest,
    net::{TcpSocket, TcpStream},
};

/// Why an upstream connection failed.
#[derive(Debug, Error)]
pub enum ConnectError {
    /// Creating or configuring the socket failed (e.g. `SO_MARK` without `CAP_NET_ADMIN`).
    #[error("upstream socket setup: {0}")]
    Socket(#[source] io::Error),
    /// `connect()` failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: SocketAddr,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `connect()` took longer than the connect timeout.
    #[error("connect to {addr}: timed out after {timeout:?}")]
    Timeout {
        /// The address dialled.
        addr: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
}

/// Connects to `addr` from a socket carrying `SO_MARK = mark` (not set when `mark` is 0),
/// within `timeout`.
pub async fn connect(
    addr: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    // Non-blocking from the start (SOCK_NONBLOCK): two fcntl calls fewer per connection.
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
    .map_err(ConnectError::Socket)?;
    if mark != 0 {
        sock.set_mark(mark).map_err(ConnectError::Socket)?;
    }
    sock.set_tcp_nodelay(true).map_err(ConnectError::Socket)?;
    let sock = TcpSocket::from_std_stream(sock.into());
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(source)) => Err(ConnectError::Connect { addr, source }),
        Err(_) => Err(ConnectError::Timeout { addr, timeout }),
    }
}

/// Byte counts of a finished relay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Client → upstream, the first bytes included.
    pub up: u64,
    /// Upstream → client.
    pub down: u64,
}

/// Writes `first` (the bytes already read from the client) to `upstream` and frees it, then
/// relays both ways until both directions are done (see the module doc).
pub async fn relay(
    client: &mut TcpStream,
    first: Vec<u8>,
    upstream: &mut TcpStream,
) -> io::Result<Relayed> {
    upstream.write_all(&first).await?;
    let first_len = first.len() as u64;
    drop(first); // an idle relayed connection keeps no userspace buffer
    let mut moved = both_ways(client, upstream).await?;
    moved.up += first_len;
    Ok(moved)
}

/// Relays both ways until both directions are done.
async fn both_ways(client: &TcpStream, upstream: &TcpStream) -> io::Result<Relayed> {
    let ends = HalfClose::default();
    let (up, down) = tokio::try_join!(
        one_way(client, upstream, &ends),
        one_way(upstream, client, &ends)
    )?;
    Ok(Relayed { up, down })
}

/// One copy step on a readable `src`: `None` when it had nothing after all, `Some(0)` at EOF,
/// `Some(n)` when `n` bytes were read and written (waiting for room for a tail if needed).
async fn step(src: &TcpStream, dst: &TcpStream) -> io::Result<Option<usize>> {
    // A short read means the receive queue was empty at that instant: report WouldBlock to
    // tokio so it clears the readiness now, instead of paying one more read() that fails with
    // EAGAIN per message. Safe with edge-triggered epoll: tokio clears only the readiness event
    // it saw, and bytes arriving later raise a new one.
    let mut done = None;
    let r = src.try_io(Interest::READABLE, || {
        let c = copy_step(src.as_raw_fd(), dst.as_raw_fd())?;
        let drained = matches!(c, Copied::Done(n) | Copied::Partial(n, _) if n < COPY_CHUNK);
        done = Some(c);
        if drained {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match (r, done) {
        (_, Some(Copied::Eof)) => Ok(Some(0)),
        (_, Some(Copied::Done(n))) => Ok(Some(n)),
        (_, Some(Copied::Partial(n, rest))) => {
            write_rest(dst, &rest).await?;
            Ok(Some(n))
        }
        (Err(e), None) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
        _ => Ok(None),
    }
}

/// A non-blocking pipe.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// Bytes moved per `splice` call, and the capacity asked for each pipe (`F_SETPIPE_SZ`).
///
/// Why 512 KiB and not the default 64 KiB: a bulk stream's receive queue usually holds more
/// than 64 KiB when the relay wakes, and each wake-up then moved only 64 KiB (two `splice`
/// calls and another pass through epoll per 64 KiB). Same-run A/B on the TLS bulk table (two
/// runs of 5 rounds): MB/s ×1.13 and ×1.11, node CPU per MB ×0.86 and ×0.90 (BENCHMARKS.md).
/// The capacity only bounds what one pipe may hold; pages are taken as bytes flow and an idle
/// pooled pipe holds none. It stays under `/proc/sys/fs/pipe-max-size` (1 MiB by default;
/// more needs `CAP_SYS_RESOURCE`), and the per-user pipe quotas (`pipe-user-pages-*`) do not
/// apply to the agent, which runs with `CAP_SYS_ADMIN`. Where the kernel refuses anyway, the
/// pipe keeps its default size and each `splice` moves what fits.
const SPLICE_CHUNK: usize = 512 * 1024;

/// Empty pipes of finished relays, reused by the next connections: saves a `pipe2` and two
/// `close` per direction of every relayed connection. An idle pipe holds no data pages.
static PIPE_POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// Most pipes kept in [`PIPE_POOL`] (two file descriptors each).
const PIPE_POOL_MAX: usize = 256;

impl Pipe {
    /// A pipe from the pool, or a new one.
    fn take() -> io::Result<Pipe> {
        let pooled = PIPE_POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match pooled {
            Some(p) => Ok(p),
            None => Pipe::new(),
        }
    }

    /// Returns a drained pipe to the pool (closes it when the pool is full).
    fn give_back(self) {
        let mut pool = PIPE_POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < PIPE_POOL_MAX {
            pool.push(self);
        }
    }

    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // Best effort (see SPLICE_CHUNK): a refusal leaves a working, smaller pipe.
        // SAFETY: plain fcntl on the descriptor pipe2 just returned.
        let _ = unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, SPLICE_CHUNK as libc::c_int) };
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        Ok(unsafe {
            Pipe {
                r: OwnedFd::from_raw_fd(fds[0]),
                w: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on descriptors we keep open for the call's duration; null offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Bytes one copy step moves; a read that fills it switches the direction to splicing.
const COPY_CHUNK: usize = 16 * 1024;

/// Reads of at least `COPY_CHUNK / 4` after which a direction switches to splicing.
const BULK_READS: u32 = 32;

thread_local! {
    /// The copy steps' scratch buffer: one per worker thread, never held across an await.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; COPY_CHUNK].into_boxed_slice());
}

/// What one copy step did.
enum Copied {
    /// EOF on the source.
    Eof,
    /// `n` bytes read and all written.
    Done(usize),
    /// `n` bytes read, of which the tail in `rest` could not be written yet.
    Partial(usize, Vec<u8>),
}

/// One synchronous `read` from `src` into the scratch buffer and `write` of it to `dst`.
fn copy_step(src: RawFd, dst: RawFd) -> io::Result<Copied> {
    SCRATCH.with_borrow_mut(|buf| {
        // SAFETY: reads into our own buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(src, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n == 0 {
            return Ok(Copied::Eof);
        }
        let mut off = 0;
        while off < n {
            // SAFETY: writes bytes of our own buffer.
            let m = unsafe { libc::write(dst, buf[off..n].as_ptr().cast(), n - off) };
            if m < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    return Ok(Copied::Partial(n, buf[off..n].to_vec()));
                }
                return Err(e);
            }
            off += m as usize;
        }
        Ok(Copied::Done(n))
    })
}

/// Writes `rest` to `dst`, waiting for it to become writable.
async fn write_rest(dst: &TcpStream, mut rest: &[u8]) -> io::Result<()> {
    while !rest.is_empty() {
        dst.writable().await?;
        match dst.try_write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => rest = &rest[m..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The two directions of one relay, as far as ending goes. The first direction to reach EOF
/// passes it on as a write shutdown of its destination (a half-close: the other direction may
/// go on). The second skips the `shutdown`: both sockets are closed right after, and `close`
/// sends that FIN itself — without a reset, because a socket whose EOF was read has nothing
/// unread. One syscall fewer per relayed connection whose ends both close with a FIN.
#[derive(Debug, Default)]
struct HalfClose(AtomicBool);

impl HalfClose {
    /// `src` reached EOF: shut `dst`'s write side down if the other direction is still open.
    fn eof(&self, dst: &TcpStream) {
        if !self.0.swap(true, Ordering::Relaxed) {
            let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
        }
    }
}

/// Moves `src` → `dst` until EOF on `src`, then ends the direction (see [`HalfClose`]): copy
/// steps while the reads are small, then `src` → pipe → `dst` (see the module doc).
async fn one_way(src: &TcpStream, dst: &TcpStream, ends: &HalfClose) -> io::Result<u64> {
    let mut total = 0u64;
    let mut large_reads = 0u32;
    let mut bulk = |n: usize| {
        large_reads += u32::from(n >= COPY_CHUNK / 4);
        n == COPY_CHUNK || large_reads >= BULK_READS
    };
    loop {
        src.readable().await?;
        let n = match step(src, dst).await? {
            None => continue,
            Some(0) => {
                ends.eof(dst);
                return Ok(total);
            }
            Some(n) => n,
        };
        total += n as u64;
        if bulk(n)
            && let Ok(pipe) = Pipe::take()
        {
            let spliced = splice_until_eof(src, &pipe, dst).await?;
            ends.eof(dst);
            // EOF with the pipe drained: it can serve another connection. (On an error or a
            // cancelled relay it is dropped instead: it may hold bytes.)
            pipe.give_back();
            return Ok(total + spliced);
        }
    }
}

/// Moves `src` → `pipe` → `dst` until EOF on `src`.
async fn splice_until_eof(src: &TcpStream, pipe: &Pipe, dst: &TcpStream) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        // Socket → pipe (the pipe is empty here, so only the socket can block).
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                splice(src.as_raw_fd(), pipe.w.as_raw_fd(), SPLICE_CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Ok(total);
        }
        // Pipe → socket, until the pipe is drained.
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.r.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// Deterministic bytes that differ at every offset of a few MiB (catches reordering).
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed)
            .collect()
    }

    /// `(client app, relay's client side)` and `(relay's upstream side, server app)`.
    async fn sockets() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        let l1 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(l1.local_addr().unwrap()).await.unwrap();
        let (client, _) = l1.accept().await.unwrap();
        let upstream = TcpStream::connect(l2.local_addr().unwrap()).await.unwrap();
        let (server, _) = l2.accept().await.unwrap();
        ((app, client), (upstream, server))
    }

    /// A new pipe asks for `SPLICE_CHUNK` bytes of capacity; the kernel grants it to root,
    /// as the agent runs (an unprivileged run only checks that the pipe works).
    #[test]
    fn pipes_are_made_with_the_splice_chunk_capacity() {
        let p = Pipe::new().unwrap();
        // SAFETY: plain fcntl on our own pipe.
        let cap = unsafe { libc::fcntl(p.w.as_raw_fd(), libc::F_GETPIPE_SZ) };
        assert!(cap >= 64 * 1024, "{cap}");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(cap as usize, SPLICE_CHUNK);
        }
    }

    /// The client half-closes first, the server answers after seeing EOF: the half-close is
    /// passed on, and the server's end (the relay's second EOF, which it does not shut down)
    /// still reaches the client as a FIN after every byte.
    #[tokio::test]
    async fn a_half_close_is_passed_on_and_the_second_end_arrives_as_a_fin() {
        let ((mut app, mut client), (mut upstream, mut server)) = sockets().await;
        let relay =
            tokio::spawn(async move { relay(&mut client, Vec::new(), &mut upstream).await });
        // The client sends its request and half-closes; the server sees EOF and answers after.
        app.write_all(b"request").await.unwrap();
        app.shutdown().await.unwrap();
        let within = |what: &'static str| {
            move |r: Result<io::Result<usize>, tokio::time::error::Elapsed>| {
                r.unwrap_or_else(|_| panic!("{what}: no EOF within 10 s"))
                    .unwrap()
            }
        };
        let ten_s = Duration::from_secs(10);
        let mut got = Vec::new();
        within("server")(tokio::time::timeout(ten_s, server.read_to_end(&mut got)).await);
        assert_eq!(got, b"request");
        let answer = pattern(200_000, 7);
        server.write_all(&answer).await.unwrap();
        server.shutdown().await.unwrap();
        // The second EOF is not shut down by the relay: closing its sockets must still end the
        // client's stream with a FIN (read returns 0), not a reset, after every byte.
        let mut got = Vec::new();
        within("client")(tokio::time::timeout(ten_s, app.read_to_end(&mut got)).await);
        assert!(got == answer, "upstream → client bytes differ");
        let relayed = relay.await.unwrap().unwrap();
        assert_eq!((relayed.up, relayed.down), (7, 200_000));
        // And the server's side was closed cleanly too.
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
    }

    /// Small request/response exchanges (copy steps), then bulk both ways at once (the switch
    /// to splicing mid-stream), then half-closes: every byte arrives once, in order.
    #[tokio::test]
    async fn small_exchanges_then_bulk_both_ways_arrive_intact() {
        let ((mut app, mut client), (mut upstream, mut server)) = sockets().await;
        let relay =
            tokio::spawn(async move { relay(&mut client, b"hello".to_vec(), &mut upstream).await });
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        for i in 0..200u32 {
            app.write_all(&i.to_le_bytes()).await.unwrap();
            let mut got = [0u8; 4];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(u32::from_le_bytes(got), i);
            server.write_all(&(i ^ 0xffff).to_le_bytes()).await.unwrap();
            app.read_exact(&mut got).await.unwrap();
            assert_eq!(u32::from_le_bytes(got), i ^ 0xffff);
        }
        let (up_bytes, down_bytes) = (pattern(3 << 20, 1), pattern(5 << 20, 2));
        let (mut app_r, mut app_w) = app.into_split();
        let (mut server_r, mut server_w) = server.into_split();
        let (up_sent, down_sent) = (up_bytes.clone(), down_bytes.clone());
        let w1 = tokio::spawn(async move {
            app_w.write_all(&up_sent).await.unwrap();
            app_w.shutdown().await.unwrap();
        });
        let w2 = tokio::spawn(async move {
            server_w.write_all(&down_sent).await.unwrap();
            server_w.shutdown().await.unwrap();
        });
        let r1 = tokio::spawn(async move {
            let mut v = Vec::new();
            server_r.read_to_end(&mut v).await.unwrap();
            v
        });
        let r2 = tokio::spawn(async move {
            let mut v = Vec::new();
            app_r.read_to_end(&mut v).await.unwrap();
            v
        });
        w1.await.unwrap();
        w2.await.unwrap();
        assert!(
            r1.await.unwrap() == up_bytes,
            "client → upstream bytes differ"
        );
        assert!(
            r2.await.unwrap() == down_bytes,
            "upstream → client bytes differ"
        );
        let relayed = relay.await.unwrap().unwrap();
        assert_eq!(
            relayed,
            Relayed {
                up: 5 + 800 + (3 << 20),
                down: 800 + (5 << 20),
            }
        );
    }
}
