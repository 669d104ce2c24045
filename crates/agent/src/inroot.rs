//! Path resolution confined to the sandbox root: every lookup goes through `openat2` with
//! `RESOLVE_IN_ROOT`, so symlinks (absolute or `..`-laden) resolve as if the agent were
//! chrooted, and magic links (`/proc/self/root`, …) are refused. Creations use `*at` calls on
//! a single component relative to a directory opened that way, never a path string.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::setup::ROOT;

/// How lookups below the root resolve.
const RESOLVE: u64 = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;

/// An absolute path inside the root, split into plain components (no `.`/`..`/empty ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootPath {
    parts: Vec<String>,
}

impl RootPath {
    /// Parses an absolute path; `..` components and NUL bytes are refused, `.` and repeated
    /// slashes are dropped. The root itself (no components) is refused as well.
    pub fn parse(path: &str) -> Result<Self, String> {
        if !path.starts_with('/') {
            return Err("path is not absolute".into());
        }
        if path.contains('\0') {
            return Err("path contains a NUL byte".into());
        }
        let mut parts = Vec::new();
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => return Err("path contains a `..` component".into()),
                p => parts.push(p.to_owned()),
            }
        }
        if parts.is_empty() {
            return Err("path names the root directory".into());
        }
        Ok(Self { parts })
    }

    /// The last component.
    pub fn name(&self) -> &str {
        self.parts.last().map_or("", String::as_str)
    }

    /// Path relative to the root, `/`-joined (how the upper dir names it).
    pub fn relative(&self) -> String {
        self.parts.join("/")
    }

    /// Each ancestor (relative), shortest first, excluding the path itself.
    fn ancestors(&self) -> impl Iterator<Item = String> + '_ {
        (1..self.parts.len()).map(|n| self.parts[..n].join("/"))
    }
}

/// An open `O_PATH` handle on the sandbox root.
pub fn open_root() -> io::Result<OwnedFd> {
    let root = CString::new(ROOT).map_err(io::Error::other)?;
    // SAFETY: `root` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::open(root.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    owned(fd)
}

fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `openat2(root, rel, flags | O_CLOEXEC, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`.
pub fn open_in_root(root: BorrowedFd<'_>, rel: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let path = cstr(rel)?;
    // SAFETY: an all-zero `open_how` is a valid value of this plain C struct.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = u64::from((flags | libc::O_CLOEXEC).cast_unsigned());
    how.resolve = RESOLVE;
    loop {
        // SAFETY: `path` and `how` are live for the call and `size_of::<open_how>()` is the
        // size of the struct passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                path.as_ptr(),
                &raw const how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            // RESOLVE_IN_ROOT reports a concurrent rename during `..` resolution as EAGAIN.
            if matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
                continue;
            }
            return Err(err);
        }
        let fd = libc::c_int::try_from(rc).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        return owned(fd);
    }
}

/// Opens `rel`'s directory as `O_PATH`, creating missing directories (root:root, 0755) on
/// the way. Each directory created is pushed onto `created` (relative path).
pub fn make_parents(root: BorrowedFd<'_>, path: &RootPath, created: &mut Vec<String>) -> io::Result<OwnedFd> {
    let dir_flags = libc::O_PATH | libc::O_DIRECTORY;
    let mut parent = open_in_root(root, ".", dir_flags)?;
    for (prefix, name) in path.ancestors().zip(&path.parts) {
        parent = match open_in_root(root, &prefix, dir_flags) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if mkdir_at(parent.as_fd(), name, 0o755)? {
                    created.push(prefix.clone());
                }
                // Opened by name in its parent without following anything: a symlink raced
                // in its place makes this fail instead of leading elsewhere.
                open_at(parent.as_fd(), name, dir_flags | libc::O_NOFOLLOW, 0)?
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("/{prefix}: {e}"))),
        };
    }
    Ok(parent)
}

/// `mkdirat(dir, name, mode)` then `fchownat(…, 0, 0)`; `Ok(false)` if it already existed.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &str, mode: libc::mode_t) -> io::Result<bool> {
    let c = cstr(name)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) } != 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::EEXIST) { Ok(false) } else { Err(err) };
    }
    // SAFETY: as above; AT_SYMLINK_NOFOLLOW so only the directory just made is touched.
    if unsafe { libc::fchownat(dir.as_raw_fd(), c.as_ptr(), 0, 0, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above. The umask may have cleared bits of `mode`; set them exactly.
    if unsafe { libc::fchmodat(dir.as_raw_fd(), c.as_ptr(), mode, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// `openat(dir, name, flags | O_CLOEXEC, mode)` on a single component.
pub fn open_at(dir: BorrowedFd<'_>, name: &str, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let c = cstr(name)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC, libc::c_uint::from(mode)) };
    owned(fd)
}

/// `unlinkat(dir, name, 0)`; a missing entry is not an error.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOENT) {
            return Err(err);
        }
    }
    Ok(())
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `None` if there is no such entry.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<Option<libc::stat>> {
    let c = cstr(name)?;
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `c` and `st` are live and writable for the call.
    if unsafe { libc::fstatat(dir.as_raw_fd(), c.as_ptr(), &raw mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENOENT) { Ok(None) } else { Err(err) };
    }
    Ok(Some(st))
}

/// `/proc/self/fd/N`, the path through which a mount can target an already-resolved file.
pub fn proc_fd_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths() {
        let p = RootPath::parse("//a/./b//c.txt").unwrap();
        assert_eq!(p.relative(), "a/b/c.txt");
        assert_eq!(p.name(), "c.txt");
        assert_eq!(p.ancestors().collect::<Vec<_>>(), ["a", "a/b"]);
        for bad in ["", "rel/x", "/", "/a/../b", "/..", "/a\0b"] {
            assert!(RootPath::parse(bad).is_err(), "{bad:?}");
        }
    }
}
