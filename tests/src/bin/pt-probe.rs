//! `pt-probe`: the workload process of the kernel tests. The harness starts it inside a test
//! cgroup and the client netns and drives it over stdin/stdout, one command per line:
//!
//! | command                          | answer                                   |
//! |----------------------------------|------------------------------------------|
//! | `connect <id> <addr:port> [tcp\|udp]` | `ok <id>` \| `err <id> <errno>`     |
//! | `echo <id> <text>`               | `ok <id> <text>` \| `err <id> <errno>`   |
//! | `close <id>`                     | `ok <id>`                                |
//! | `sendto <addr:port> <text>`      | `ok` \| `err <errno>` (unconnected UDP)  |
//! | `pid`                            | `ok <pid>`                               |
//! | `json <request>`                 | one JSON line (see `passthrough_tests::clients`: TLS, HTTP/1.1, h2c, gRPC clients) |
//! | `exit`                           | (exits 0)                                |
//!
//! `[v6]:port` addresses use an `AF_INET6` socket, including `[::ffff:a.b.c.d]:port` (the
//! IPv4-mapped case). TCP connects and reads time out after 3 s (`ETIMEDOUT`).
//!
//! `pt-probe sweep [--all]` removes leftovers of crashed test runs (see `pt-sweep`).

use std::{
    collections::HashMap,
    io::{self, BufRead, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

const TIMEOUT: Duration = Duration::from_secs(3);

enum Conn {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

fn errno(e: &io::Error) -> i32 {
    match e.raw_os_error() {
        Some(n) => n,
        None if matches!(
            e.kind(),
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ) =>
        {
            libc::ETIMEDOUT
        }
        None => libc::EIO,
    }
}

fn udp_socket_for(addr: &SocketAddr) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(*addr), Type::DGRAM, Some(Protocol::UDP))?;
    let bind: SocketAddr = if addr.is_ipv6() {
        s.set_only_v6(false)?;
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    s.bind(&bind.into())?;
    let u: UdpSocket = s.into();
    u.set_read_timeout(Some(TIMEOUT))?;
    Ok(u)
}

fn connect(addr: SocketAddr, udp: bool) -> io::Result<Conn> {
    if udp {
        let u = udp_socket_for(&addr)?;
        u.connect(addr)?;
        Ok(Conn::Udp(u))
    } else {
        let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_nodelay(true)?;
        Ok(Conn::Tcp(s))
    }
}

fn echo(conn: &mut Conn, text: &str) -> io::Result<String> {
    match conn {
        Conn::Tcp(s) => {
            s.write_all(format!("{text}\n").as_bytes())?;
            let mut got = Vec::new();
            let mut b = [0u8; 1];
            while got.last() != Some(&b'\n') {
                let n = s.read(&mut b)?;
                if n == 0 {
                    return Err(io::Error::from_raw_os_error(libc::ECONNRESET));
                }
                got.push(b[0]);
            }
            got.pop();
            Ok(String::from_utf8_lossy(&got).into_owned())
        }
        Conn::Udp(u) => {
            u.send(text.as_bytes())?;
            let mut buf = [0u8; 65536];
            let n = u.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("sweep") {
        let all = args.iter().any(|a| a == "--all");
        let report = passthrough_tests::sweep(all);
        println!("{report}");
        std::process::exit(if report.errors.is_empty() { 0 } else { 1 });
    }

    let mut conns: HashMap<String, Conn> = HashMap::new();
    let stdin = io::stdin();
    let mut out = io::stdout().lock();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let mut parts = line.splitn(2, ' ');
        let cmd = parts.next().unwrap_or("");
        let rest = parts.next().unwrap_or("");
        let reply = match cmd {
            "connect" => {
                let f: Vec<&str> = rest.split_whitespace().collect();
                match (
                    f.first(),
                    f.get(1).and_then(|a| a.parse::<SocketAddr>().ok()),
                ) {
                    (Some(id), Some(addr)) => {
                        let udp = f.get(2) == Some(&"udp");
                        match connect(addr, udp) {
                            Ok(c) => {
                                conns.insert(id.to_string(), c);
                                format!("ok {id}")
                            }
                            Err(e) => format!("err {id} {}", errno(&e)),
                        }
                    }
                    _ => format!("err {} {}", f.first().unwrap_or(&"?"), libc::EINVAL),
                }
            }
            "echo" => {
                let (id, text) = rest.split_once(' ').unwrap_or((rest, ""));
                match conns.get_mut(id) {
                    Some(c) => match echo(c, text) {
                        Ok(t) => format!("ok {id} {t}"),
                        Err(e) => format!("err {id} {}", errno(&e)),
                    },
                    None => format!("err {id} {}", libc::EBADF),
                }
            }
            "close" => {
                conns.remove(rest.trim());
                format!("ok {}", rest.trim())
            }
            "sendto" => {
                let (addr, text) = rest.split_once(' ').unwrap_or((rest, ""));
                match addr.parse::<SocketAddr>() {
                    Ok(a) => match udp_socket_for(&a).and_then(|u| u.send_to(text.as_bytes(), a)) {
                        Ok(_) => "ok".to_string(),
                        Err(e) => format!("err {}", errno(&e)),
                    },
                    Err(_) => format!("err {}", libc::EINVAL),
                }
            }
            "pid" => format!("ok {}", std::process::id()),
            "json" => match serde_json::from_str::<serde_json::Value>(rest) {
                Ok(req) => passthrough_tests::clients::run(&req).to_string(),
                Err(e) => {
                    serde_json::json!({"ok": false, "stage": "request", "error": e.to_string()})
                        .to_string()
                }
            },
            "exit" => break,
            "" => continue,
            other => format!("err ? {} unknown command {other}", libc::EINVAL),
        };
        if writeln!(out, "{reply}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
}
