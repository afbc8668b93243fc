//! Upstream connections (marked so the kernel lets them through) and the byte relay.

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use thiserror::Error;
use tokio::{
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

/// Writes `first` (the bytes already read from the client) to `upstream`, then copies both
/// ways until both directions are done. EOF on one side is passed on as a write shutdown
/// (half-close) on the other.
pub async fn relay(
    client: &mut TcpStream,
    first: &[u8],
    upstream: &mut TcpStream,
) -> io::Result<Relayed> {
    upstream.write_all(first).await?;
    let (up, down) = copy_bidirectional(client, upstream).await?;
    Ok(Relayed {
        up: up + first.len() as u64,
        down,
    })
}
