//! cgroup v2 discovery and checks. The mount is found from `/proc/self/mountinfo` (on hybrid
//! hosts it is `/sys/fs/cgroup/unified`, and inside containers it may be anywhere).

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// `CGROUP2_SUPER_MAGIC` from `linux/magic.h`.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Errors about cgroup paths.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No cgroup2 filesystem is mounted.
    #[error("no cgroup v2 filesystem is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2Mount,
    /// Reading mountinfo or the path failed.
    #[error("{path}: {source}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The path exists but is not a directory of the cgroup v2 hierarchy.
    #[error("{path}: not a cgroup v2 directory (cgroup2 is mounted at {mount})")]
    NotCgroup2 {
        /// The offending path.
        path: PathBuf,
        /// Where cgroup2 is mounted.
        mount: PathBuf,
    },
}

/// Finds the first cgroup2 mount point in `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let info = fs::read_to_string("/proc/self/mountinfo").map_err(|source| CgroupError::Io {
        path: "/proc/self/mountinfo".into(),
        source,
    })?;
    parse_cgroup2_mount(&info).ok_or(CgroupError::NoCgroup2Mount)
}

/// Parses mountinfo text (see proc(5)): field 5 is the mount point, the field after ` - ` is the
/// filesystem type. Octal escapes (`\040`) in the mount point are decoded.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A checked cgroup v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    /// Absolute path.
    pub path: PathBuf,
    /// The cgroup id (the directory's inode number on cgroup2).
    pub id: u64,
}

/// Resolves `path` (absolute, or relative to the cgroup2 mount) and checks that it is a
/// directory of the cgroup v2 hierarchy.
pub fn resolve(path: &Path, mount: &Path) -> Result<CgroupDir, CgroupError> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        mount.join(path)
    };
    let meta = fs::metadata(&abs).map_err(|source| CgroupError::Io {
        path: abs.clone(),
        source,
    })?;
    if !meta.is_dir() || !is_cgroup2(&abs)? {
        return Err(CgroupError::NotCgroup2 {
            path: abs,
            mount: mount.to_path_buf(),
        });
    }
    let path = fs::canonicalize(&abs).map_err(|source| CgroupError::Io {
        path: abs.clone(),
        source,
    })?;
    Ok(CgroupDir {
        id: meta.ino(),
        path,
    })
}

fn is_cgroup2(path: &Path) -> Result<bool, CgroupError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| {
        CgroupError::Io {
            path: path.into(),
            source: std::io::Error::other(e),
        }
    })?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a zeroed out-struct.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(CgroupError::Io {
            path: path.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(st.f_type as i64 == CGROUP2_SUPER_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_hybrid_host() {
        let info = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n\
                    27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_cgroup2_mount(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn decodes_escaped_mount_points_and_ignores_v1() {
        let info = "27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                    28 25 0:25 / /run/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(info), Some(PathBuf::from("/run/my cg")));
        assert_eq!(
            parse_cgroup2_mount("27 25 0:24 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn rejects_paths_off_cgroup2() {
        let Ok(mount) = cgroup2_mount() else { return };
        let err = resolve(Path::new("/tmp"), &mount).unwrap_err();
        assert!(matches!(err, CgroupError::NotCgroup2 { .. }), "{err}");
        assert!(err.to_string().contains("/tmp"));
    }
}
