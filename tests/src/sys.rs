//! Small syscall helpers for the workload helpers that a test binary runs as itself inside a
//! cgroup and netns (`probe::serve_helper`: bypass.rs, reroute.rs, tls_fast_path.rs) and for
//! [`crate::clients`]: their answers are JSON, and none of these panics on what the kernel says.

use std::{io, net::SocketAddr};

use serde_json::{Value, json};

/// The errno of `e`; a timeout without one reads `ETIMEDOUT`, anything else without one `EIO`.
pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => libc::ETIMEDOUT,
        _ => libc::EIO,
    })
}

/// 0 for `Ok`, else the error's [`errno`].
pub fn code<T>(r: &io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => errno(e),
    }
}

/// The failed-step answer: `{"ok": false, "stage", "errno", "error"}`.
pub fn fail(stage: &str, e: &io::Error) -> Value {
    json!({"ok": false, "stage": stage, "errno": errno(e), "error": e.to_string()})
}

/// The calling thread's last OS error.
pub fn last() -> io::Error {
    io::Error::last_os_error()
}

/// `req[key]` as a socket address; panics naming the request when it is not one (a test's own
/// request is wrong: nothing the kernel answered).
pub fn addr(req: &Value, key: &str) -> SocketAddr {
    req[key]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("bad {key} in {req}"))
}

/// setgroups([]) + setgid/setuid 65534: no capabilities left.
pub fn become_nobody() -> io::Result<()> {
    // SAFETY: plain syscalls.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(65534) != 0
            || libc::setuid(65534) != 0
        {
            return Err(last());
        }
    }
    Ok(())
}
