//! No-follow file-system primitives for building an (inert) tree: every call acts on the
//! named entry itself, never on what a symlink at that name points to.

use std::io;
use std::path::Path;

use crate::{OciError, io_err};

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
            let stat = boxwood_image::inert::stat(&path)?;
            if stat.is_dir() {
                stack.push(path);
            } else if stat.is_file() && (stat.nlink() == 1 || seen.insert((stat.dev(), stat.ino()))) {
                total += stat.len();
            }
        }
    }
    Ok(total)
}
