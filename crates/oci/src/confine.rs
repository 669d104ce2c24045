//! Local import sources, confined: a path is usable only beneath a directory the operator
//! configured, is resolved there without following any symlink, and must be a regular file
//! (or, for an OCI layout, a directory). Files are opened as `O_PATH` first and checked with
//! `fstat`, so a FIFO or device is refused without ever being opened for reading (no blocked
//! thread, no side effect of opening a device).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

use crate::OciError;

/// An opened local file or directory; reopened for reading through `path`
/// (`/proc/self/fd/N`), which stays valid while this lives.
#[derive(Debug, Clone)]
pub(crate) struct Opened {
    fd: Arc<OwnedFd>,
    pub path: PathBuf,
}

impl Opened {
    fn new(fd: OwnedFd) -> Self {
        let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        Self { fd: Arc::new(fd), path }
    }

    /// Keeps the descriptor behind [`Opened::path`] alive.
    pub fn keep(&self) -> Arc<OwnedFd> {
        self.fd.clone()
    }
}

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);
const O_PATH: OFlags = OFlags::PATH.union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// Opens `requested` (a path the client named) if it lies beneath one of `dirs`. Every
/// refusal is the same error, so a client learns nothing about paths it may not use.
pub(crate) fn open_source(dirs: &[PathBuf], requested: &Path, want_dir: bool) -> Result<Opened, OciError> {
    if dirs.is_empty() {
        return Err(OciError::LocalDisabled);
    }
    let refused = || OciError::LocalRefused;
    if !requested.is_absolute() || requested.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(refused());
    }
    for dir in dirs {
        let Ok(rel) = requested.strip_prefix(dir) else { continue };
        if rel.as_os_str().is_empty() {
            continue;
        }
        let Ok(base) = rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()) else {
            continue;
        };
        return open_beneath(&base, rel, want_dir).ok_or_else(refused);
    }
    Err(refused())
}

/// Opens a file the server itself chose (a client's upload in the blob store): still without
/// following a symlink, and only if it is a regular file.
pub(crate) fn open_trusted(path: &Path) -> Option<Opened> {
    let fd = rustix::fs::open(path, O_PATH, Mode::empty()).ok()?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd).ok()?.st_mode);
    (kind == FileType::RegularFile).then(|| Opened::new(fd))
}

/// Opens `rel` beneath the directory `base` (an OCI layout's member).
pub(crate) fn open_member(base: &Opened, rel: &str) -> Option<Opened> {
    open_beneath(&base.fd, Path::new(rel), false)
}

fn open_beneath(base: &OwnedFd, rel: &Path, want_dir: bool) -> Option<Opened> {
    let fd = rustix::fs::openat2(base, rel, O_PATH, Mode::empty(), RESOLVE).ok()?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd).ok()?.st_mode);
    let wanted = if want_dir { FileType::Directory } else { FileType::RegularFile };
    (kind == wanted).then(|| Opened::new(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_beneath_allowed_dirs() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("allowed");
        std::fs::create_dir(&allowed).unwrap();
        std::fs::write(allowed.join("img.tar"), b"x").unwrap();
        std::fs::write(root.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(root.path().join("secret"), allowed.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc", allowed.join("etc")).unwrap();
        nix::unistd::mkfifo(&allowed.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::create_dir(allowed.join("layout")).unwrap();
        let dirs = [allowed.clone()];

        let opened = open_source(&dirs, &allowed.join("img.tar"), false).unwrap();
        assert_eq!(std::fs::read(&opened.path).unwrap(), b"x", "positive control: an allowed file reads");
        assert!(open_source(&dirs, &allowed.join("layout"), true).is_ok());

        let refused = |p: PathBuf, dir: bool| {
            let r = open_source(&dirs, &p, dir);
            assert!(matches!(r, Err(OciError::LocalRefused)), "{p:?} → {r:?}");
        };
        refused(root.path().join("secret"), false);
        refused(allowed.join("../secret"), false);
        refused(allowed.join("link"), false);
        refused(allowed.join("etc/shadow"), false);
        refused(allowed.join("fifo"), false);
        refused(allowed.join("missing"), false);
        refused(allowed.join("layout"), false);
        refused(allowed.join("img.tar"), true);
        refused(PathBuf::from("/etc/shadow"), false);
        assert!(matches!(open_source(&[], &allowed.join("img.tar"), false), Err(OciError::LocalDisabled)));
    }
}
