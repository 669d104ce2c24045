//! Small no-follow filesystem primitives shared by unpacking and merging: every call here acts
//! on the named entry itself, never on what a symlink at that name points to.

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::{AtFlags, CWD, Gid, Uid, XattrFlags};

use crate::{ImageResult, io_err};

/// The xattr overlayfs reads to mark a directory opaque.
pub(crate) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Prefix of every overlayfs-private xattr in the `trusted` namespace.
pub(crate) const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// Creates a new regular file (never through a symlink: `O_EXCL`), private until chmod.
pub(crate) fn create_file(path: &Path) -> ImageResult<File> {
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io_err(path))
}

/// Hard-links `new` to `old` without following `old` if it is a symlink.
pub(crate) fn hard_link(old: &Path, new: &Path) -> ImageResult<()> {
    rustix::fs::linkat(CWD, old, CWD, new, AtFlags::empty()).map_err(errno).map_err(io_err(new))
}

/// `lchown`.
pub(crate) fn chown(path: &Path, uid: u32, gid: u32) -> ImageResult<()> {
    rustix::fs::chownat(CWD, path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(errno)
        .map_err(io_err(path))
}

/// `lsetxattr`.
pub(crate) fn set_xattr(path: &Path, name: &str, value: &[u8]) -> ImageResult<()> {
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty()).map_err(errno).map_err(io_err(path))
}

/// `lremovexattr`.
pub(crate) fn remove_xattr(path: &Path, name: &str) -> ImageResult<()> {
    rustix::fs::lremovexattr(path, name).map_err(errno).map_err(io_err(path))
}

/// The entry's own xattrs (`llistxattr` + `lgetxattr`), names in listing order.
pub(crate) fn xattrs(path: &Path) -> ImageResult<Vec<(String, Vec<u8>)>> {
    let names = read_sized(|| rustix::fs::llistxattr_query(path), |buf| rustix::fs::llistxattr(path, buf))
        .map_err(io_err(path))?;
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        match read_sized(
            || rustix::fs::lgetxattr_query(path, name.as_str()),
            |buf| rustix::fs::lgetxattr(path, name.as_str(), buf),
        ) {
            Ok(value) => out.push((name, value)),
            // removed between list and get: nothing to copy
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NODATA.raw_os_error()) => {}
            Err(e) => return Err(io_err(path)(e)),
        }
    }
    Ok(out)
}

/// One xattr of the entry itself, `None` when it has no such xattr.
pub(crate) fn get_xattr(path: &Path, name: &str) -> ImageResult<Option<Vec<u8>>> {
    match read_sized(|| rustix::fs::lgetxattr_query(path, name), |buf| rustix::fs::lgetxattr(path, name, buf)) {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NODATA.raw_os_error()) => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Opens an existing regular file for reading without following a symlink at its name.
pub(crate) fn open_nofollow(path: &Path) -> ImageResult<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(io_err(path))
}

/// Reads a variable-size value (`list`/`get` xattr): asks its size, then reads, until the
/// buffer is big enough.
fn read_sized(
    mut query: impl FnMut() -> rustix::io::Result<usize>,
    mut call: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>,
) -> io::Result<Vec<u8>> {
    loop {
        let size = query().map_err(errno)?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match call(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => continue, // grew in between
            Err(e) => return Err(errno(e)),
        }
    }
}
