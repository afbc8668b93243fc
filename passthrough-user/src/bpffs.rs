//! bpffs: mounted when missing, so pins have somewhere to live.

use std::{ffi::CString, io, path::Path};

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// True when `path` is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a zeroed out-struct.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes sure `root` (normally `/sys/fs/bpf`) is a bpffs mount, mounting one if it is not.
/// Returns true when this call mounted it.
pub fn ensure_mounted(root: &Path) -> io::Result<bool> {
    std::fs::create_dir_all(root)?;
    if is_bpffs(root)? {
        return Ok(false);
    }
    let target = CString::new(root.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: static NUL-terminated strings and a valid target path.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}
