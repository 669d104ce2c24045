//! [`merge_layers`]: squashes a stack of layer trees into one tree with overlayfs semantics.
//!
//! The walk is top-down: each path is resolved once, the way overlayfs looks it up, by
//! scanning the layers from the top and stopping at the first non-directory, whiteout or
//! opaque directory. So the cost is one `lstat` per layer per name and one copy of each
//! visible entry, never a copy of something a higher layer hides.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::Metadata;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, symlink};
use std::path::{Path, PathBuf};

use rustix::fs::FileType;

use crate::fsutil::{self, OPAQUE_XATTR, OVERLAY_XATTR_PREFIX};
use crate::{ImageError, ImageResult, io_err};

/// Squashes `layers` (topmost first, each a tree in overlayfs "upper" format) into `out`
/// (created if missing, else it must be an empty directory), so that `out` stacked on the
/// layers that were below `layers` shows exactly what the original stack showed.
///
/// * A path resolves to its topmost entry; a whiteout there hides it; directories merge
///   downwards until an opaque one, a non-directory or a whiteout (which they hide).
/// * With `keep_whiteouts` (the merge does not include the bottom layer), a visible
///   whiteout stays a whiteout, and a directory that hides something (it is opaque in some
///   merged layer, or stands over a non-directory or whiteout) is marked opaque, so the
///   result still hides what lies below the merged layers. Inside an opaque result
///   directory nothing below is visible, so no whiteouts or opaque marks are written there.
/// * Without it (the result is a complete rootfs) no whiteouts and no opaque marks remain.
/// * Owner, mode, times and xattrs are copied from the entry that wins (for a directory,
///   the topmost one, as overlayfs shows it), except the overlayfs-private
///   `trusted.overlay.*` xattrs, which only this function writes. Names hardlinked within
///   one layer stay hardlinked. Sockets are skipped with a warning. Like overlayfs, opacity
///   of a layer's root directory is ignored.
pub fn merge_layers(layers: &[&Path], out: &Path, keep_whiteouts: bool) -> ImageResult<()> {
    let Some(top) = layers.first() else {
        return Err(ImageError::InvalidTree { path: out.to_owned(), reason: "no layers to merge".into() });
    };
    for layer in layers {
        if !layer.symlink_metadata().map_err(io_err(layer))?.is_dir() {
            return Err(ImageError::InvalidTree {
                path: layer.to_path_buf(),
                reason: "layer is not a directory".into(),
            });
        }
    }
    match out.symlink_metadata() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::create_dir(out).map_err(io_err(out))?,
        Err(e) => return Err(io_err(out)(e)),
        Ok(m) if m.is_dir() && std::fs::read_dir(out).map_err(io_err(out))?.next().is_none() => {}
        Ok(_) => {
            return Err(ImageError::InvalidTree { path: out.to_owned(), reason: "not an empty directory".into() });
        }
    }
    let mut merger = Merger { layers, out, links: HashMap::new() };
    let top_meta = top.symlink_metadata().map_err(io_err(top))?;
    merger.start_dir(top, out, &top_meta, false)?;
    let mut tasks = vec![
        Task::Finish { dst: out.to_owned(), meta: top_meta },
        Task::Dir { rel: PathBuf::new(), stack: (0..layers.len()).collect(), hides_below: keep_whiteouts },
    ];
    while let Some(task) = tasks.pop() {
        match task {
            Task::Dir { rel, stack, hides_below } => merger.dir(&rel, &stack, hides_below, &mut tasks)?,
            Task::Finish { dst, meta } => {
                fsutil::chmod(&dst, meta.mode())?;
                fsutil::set_times(&dst, atime(&meta), mtime(&meta))?;
            }
        }
    }
    Ok(())
}

enum Task {
    /// Fill the (created) output directory `rel` from the layers in `stack` (indices, top
    /// first) where `rel` is a directory. `hides_below`: whiteouts and opaque marks written
    /// here still matter, as layers below the merge may be visible through this directory.
    Dir { rel: PathBuf, stack: Vec<usize>, hides_below: bool },
    /// Set mode and times of an output directory once its children are written.
    Finish { dst: PathBuf, meta: Metadata },
}

/// How the layers resolve one name.
enum Resolved {
    /// Hidden by a whiteout in layer `usize` (nothing above it).
    Whiteout(usize, Metadata),
    /// A non-directory from layer `usize`.
    Leaf(usize, Metadata),
    /// A directory merged from these layers (top first); `hides` when it hides whatever is
    /// at this path below the last of them.
    Dir { stack: Vec<usize>, hides: bool },
}

struct Merger<'a> {
    layers: &'a [&'a Path],
    out: &'a Path,
    /// (layer, dev, ino) of multiply-linked non-directories already copied → their copy.
    links: HashMap<(usize, u64, u64), PathBuf>,
}

impl Merger<'_> {
    fn dir(&mut self, rel: &Path, stack: &[usize], hides_below: bool, tasks: &mut Vec<Task>) -> ImageResult<()> {
        let mut names = BTreeSet::<OsString>::new();
        for &layer in stack {
            let dir = self.layers[layer].join(rel);
            for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
                names.insert(entry.map_err(io_err(&dir))?.file_name());
            }
        }
        for name in names {
            let rel = rel.join(&name);
            let dst = self.out.join(&rel);
            match self.resolve(&rel, stack)? {
                Resolved::Whiteout(layer, meta) => {
                    if hides_below {
                        self.copy_leaf(layer, &self.layers[layer].join(&rel), &dst, &meta)?;
                    }
                }
                Resolved::Leaf(layer, meta) => self.copy_leaf(layer, &self.layers[layer].join(&rel), &dst, &meta)?,
                Resolved::Dir { stack, hides } => {
                    let src = self.layers[stack[0]].join(&rel);
                    let meta = src.symlink_metadata().map_err(io_err(&src))?;
                    std::fs::create_dir(&dst).map_err(io_err(&dst))?;
                    self.start_dir(&src, &dst, &meta, hides_below && hides)?;
                    tasks.push(Task::Finish { dst, meta });
                    tasks.push(Task::Dir { rel, stack, hides_below: hides_below && !hides });
                }
            }
        }
        Ok(())
    }

    /// Looks `rel` up in the layers of its parent's `stack`, as overlayfs does.
    fn resolve(&self, rel: &Path, stack: &[usize]) -> ImageResult<Resolved> {
        let mut dirs = Vec::new();
        for &layer in stack {
            let path = self.layers[layer].join(rel);
            let meta = match path.symlink_metadata() {
                Ok(meta) => meta,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            if meta.is_dir() {
                dirs.push(layer);
                if is_opaque(&path)? {
                    return Ok(Resolved::Dir { stack: dirs, hides: true });
                }
            } else if !dirs.is_empty() {
                // a directory above a whiteout or non-directory: it hides that, and so
                // whatever the layers below the merge have at this path
                return Ok(Resolved::Dir { stack: dirs, hides: true });
            } else if is_whiteout(&meta) {
                return Ok(Resolved::Whiteout(layer, meta));
            } else {
                return Ok(Resolved::Leaf(layer, meta));
            }
        }
        Ok(Resolved::Dir { stack: dirs, hides: false })
    }

    /// Owner and xattrs of a new output directory (mode and times wait for [`Task::Finish`]).
    fn start_dir(&self, src: &Path, dst: &Path, meta: &Metadata, opaque: bool) -> ImageResult<()> {
        fsutil::chown(dst, meta.uid(), meta.gid())?;
        copy_xattrs(src, dst)?;
        if opaque {
            fsutil::set_xattr(dst, OPAQUE_XATTR, b"y")?;
        }
        Ok(())
    }

    /// Copies one non-directory with its metadata, or hardlinks it to an earlier copy of the
    /// same inode of the same layer.
    fn copy_leaf(&mut self, layer: usize, src: &Path, dst: &Path, meta: &Metadata) -> ImageResult<()> {
        let key = (layer, meta.dev(), meta.ino());
        if meta.nlink() > 1
            && let Some(first) = self.links.get(&key)
        {
            return fsutil::hard_link(first, dst);
        }
        let kind = meta.file_type();
        if kind.is_file() {
            let mut from = fsutil::open_nofollow(src)?;
            let mut to = fsutil::create_file(dst)?;
            io::copy(&mut from, &mut to).map_err(io_err(dst))?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(src).map_err(io_err(src))?;
            symlink(&target, dst).map_err(io_err(dst))?;
        } else if kind.is_fifo() {
            fsutil::mknod(dst, FileType::Fifo, 0)?;
        } else if kind.is_char_device() {
            fsutil::mknod(dst, FileType::CharacterDevice, meta.rdev())?;
        } else if kind.is_block_device() {
            fsutil::mknod(dst, FileType::BlockDevice, meta.rdev())?;
        } else {
            tracing::warn!(path = %src.display(), "skipping socket or unknown file type while merging layers");
            return Ok(());
        }
        fsutil::chown(dst, meta.uid(), meta.gid())?;
        if !kind.is_symlink() {
            fsutil::chmod(dst, meta.mode())?;
        }
        copy_xattrs(src, dst)?;
        fsutil::set_times(dst, atime(meta), mtime(meta))?;
        if meta.nlink() > 1 {
            self.links.insert(key, dst.to_owned());
        }
        Ok(())
    }
}

fn copy_xattrs(src: &Path, dst: &Path) -> ImageResult<()> {
    for (name, value) in fsutil::xattrs(src)? {
        if !name.starts_with(OVERLAY_XATTR_PREFIX) {
            fsutil::set_xattr(dst, &name, &value)?;
        }
    }
    Ok(())
}

/// A whiteout, as overlayfs reads it: a character device numbered 0/0.
pub(crate) fn is_whiteout(meta: &Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: &Path) -> ImageResult<bool> {
    Ok(fsutil::get_xattr(dir, OPAQUE_XATTR)?.is_some_and(|v| v == b"y"))
}

fn atime(meta: &Metadata) -> (i64, u32) {
    (meta.atime(), meta.atime_nsec().clamp(0, 999_999_999) as u32)
}

fn mtime(meta: &Metadata) -> (i64, u32) {
    (meta.mtime(), meta.mtime_nsec().clamp(0, 999_999_999) as u32)
}
