//! No-follow file-system primitives for building a tree: every call acts on the named entry
//! itself, never on what a symlink at that name points to.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, CWD, FileType, Gid, Mode, Timespec, Timestamps, Uid, XattrFlags};

use crate::{OciError, io_err};

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// Creates a new regular file (never through a symlink: `O_EXCL`), private until chmod.
pub(crate) fn create_file(path: &Path) -> Result<File, OciError> {
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io_err(path))
}

pub(crate) fn mkfifo(path: &Path) -> Result<(), OciError> {
    rustix::fs::mknodat(CWD, path, FileType::Fifo, Mode::from_raw_mode(0o600), 0).map_err(errno).map_err(io_err(path))
}

/// Hard-links `new` to `old` without following `old` if it is a symlink.
pub(crate) fn hard_link(old: &Path, new: &Path) -> Result<(), OciError> {
    rustix::fs::linkat(CWD, old, CWD, new, AtFlags::empty()).map_err(errno).map_err(io_err(new))
}

static CHOWN_WARNED: AtomicBool = AtomicBool::new(false);

/// `lchown`; without the privilege to give files away (not root) the owner is left as is.
pub(crate) fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), OciError> {
    match rustix::fs::chownat(CWD, path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), AtFlags::SYMLINK_NOFOLLOW)
    {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::PERM) => {
            if !CHOWN_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!("not permitted to set file owners; imported files keep the importer's owner");
            }
            Ok(())
        }
        Err(e) => Err(io_err(path)(errno(e))),
    }
}

/// Sets all 07777 permission bits. Callers never pass a symlink (Linux has no `lchmod`).
pub(crate) fn chmod(path: &Path, mode: u32) -> Result<(), OciError> {
    rustix::fs::chmod(path, Mode::from_raw_mode(mode & 0o7777)).map_err(errno).map_err(io_err(path))
}

/// Sets atime and mtime of the entry itself (symlinks included).
pub(crate) fn set_times(path: &Path, mtime: (i64, u32)) -> Result<(), OciError> {
    let ts = Timespec { tv_sec: mtime.0, tv_nsec: i64::from(mtime.1.min(999_999_999)) as _ };
    let times = Timestamps { last_access: ts, last_modification: ts };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).map_err(errno).map_err(io_err(path))
}

/// `lsetxattr`; a file system or namespace that refuses the xattr only loses it (with a warning).
pub(crate) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<(), OciError> {
    match rustix::fs::lsetxattr(path, name, value, XattrFlags::empty()) {
        Ok(()) => Ok(()),
        Err(e @ (rustix::io::Errno::NOTSUP | rustix::io::Errno::PERM | rustix::io::Errno::INVAL)) => {
            tracing::warn!(path = %path.display(), xattr = name, error = %e, "xattr not kept");
            Ok(())
        }
        Err(e) => Err(io_err(path)(errno(e))),
    }
}

/// Removes whatever is at `path` (a directory recursively, without following symlinks);
/// a missing entry is fine.
pub(crate) fn remove_any(path: &Path) -> Result<(), OciError> {
    let result = match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(io_err(path))
}

/// Empties `dir` (which stays).
pub(crate) fn clear_dir(dir: &Path) -> Result<(), OciError> {
    for child in std::fs::read_dir(dir).map_err(io_err(dir))? {
        remove_any(&child.map_err(io_err(dir))?.path())?;
    }
    Ok(())
}

/// Bytes of regular-file content under `root`, each hard-linked inode counted once.
pub(crate) fn content_bytes(root: &Path) -> Result<u64, OciError> {
    let mut total = 0;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for child in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let child = child.map_err(io_err(&dir))?;
            let path = child.path();
            let meta = path.symlink_metadata().map_err(io_err(&path))?;
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() && (meta.nlink() == 1 || seen.insert((meta.dev(), meta.ino()))) {
                total += meta.len();
            }
        }
    }
    Ok(total)
}
