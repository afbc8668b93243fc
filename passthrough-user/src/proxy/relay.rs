//! Upstream connections (marked so the kernel lets them through) and the byte relay.
//!
//! The relay moves bytes with `splice(2)` through a pipe per direction (socket → pipe → socket,
//! no copy to userspace); where a pipe cannot be made it falls back to
//! `tokio::io::copy_bidirectional`. Either way EOF in one direction becomes a write shutdown
//! (half-close) toward the other side, and the relay ends when both directions are done.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::Mutex,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;
use tokio::{
    io::Interest,
    io::{AsyncWriteExt, copy_bidirectional},
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
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(ConnectError::Socket)?;
    if mark != 0 {
        sock.set_mark(mark).map_err(ConnectError::Socket)?;
    }
    sock.set_nonblocking(true).map_err(ConnectError::Socket)?;
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
    if let (Ok(p1), Ok(p2)) = (Pipe::take(), Pipe::take()) {
        let (up, down) = tokio::try_join!(
            splice_one_way(client, &p1, upstream),
            splice_one_way(upstream, &p2, client),
        )?;
        // Both directions reached EOF with their pipe drained: the pipes can serve another
        // connection. (On an error or a cancelled relay they are dropped: they may hold bytes.)
        p1.give_back();
        p2.give_back();
        return Ok(Relayed {
            up: up + first_len,
            down,
        });
    }
    let (up, down) = copy_bidirectional(client, upstream).await?;
    Ok(Relayed {
        up: up + first_len,
        down,
    })
}

/// A non-blocking pipe.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

/// Bytes moved per `splice` call (the default pipe capacity).
const SPLICE_CHUNK: usize = 64 * 1024;

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

/// Moves `src` → `pipe` → `dst` until EOF on `src`, then shuts down `dst`'s write side.
async fn splice_one_way(src: &TcpStream, pipe: &Pipe, dst: &TcpStream) -> io::Result<u64> {
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
            let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
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
