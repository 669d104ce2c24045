//! [`merge_layers`]: squashes a stack of (inert) layer trees into one tree with overlayfs
//! semantics.
//!
//! The walk is top-down: each path is resolved once, the way overlayfs looks it up, by
//! scanning the layers from the top and stopping at the first non-directory, whiteout or
//! opaque directory. So the cost is one record read per layer per name and one copy of each
//! visible entry, never a copy of something a higher layer hides.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use crate::fsutil::{self, OPAQUE_XATTR, OVERLAY_XATTR_PREFIX};
use crate::inert::{self, Kind, Meta, Stat};
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
        if !inert::stat(layer)?.is_dir() {
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
    inert::init_root(out, &dir_record(&inert::stat(top)?.meta, false))?;
    let mut tasks = vec![Task { rel: PathBuf::new(), stack: (0..layers.len()).collect(), hides_below: keep_whiteouts }];
    while let Some(Task { rel, stack, hides_below }) = tasks.pop() {
        merger.dir(&rel, &stack, hides_below, &mut tasks)?;
    }
    Ok(())
}

/// Fill the (created) output directory `rel` from the layers in `stack` (indices, top
/// first) where `rel` is a directory. `hides_below`: whiteouts and opaque marks written
/// here still matter, as layers below the merge may be visible through this directory.
struct Task {
    rel: PathBuf,
    stack: Vec<usize>,
    hides_below: bool,
}

/// How the layers resolve one name.
enum Resolved {
    /// Hidden by a whiteout in layer `usize` (nothing above it).
    Whiteout(usize, Stat),
    /// A non-directory from layer `usize`.
    Leaf(usize, Stat),
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
                    let src = inert::stat(&self.layers[stack[0]].join(&rel))?;
                    inert::create_dir(&dst, &dir_record(&src.meta, hides_below && hides))?;
                    tasks.push(Task { rel, stack, hides_below: hides_below && !hides });
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
            let Some(meta) = inert::try_stat(&path)? else { continue };
            if meta.is_dir() {
                dirs.push(layer);
                if meta.is_opaque() {
                    return Ok(Resolved::Dir { stack: dirs, hides: true });
                }
            } else if !dirs.is_empty() {
                // a directory above a whiteout or non-directory: it hides that, and so
                // whatever the layers below the merge have at this path
                return Ok(Resolved::Dir { stack: dirs, hides: true });
            } else if meta.is_whiteout() {
                return Ok(Resolved::Whiteout(layer, meta));
            } else {
                return Ok(Resolved::Leaf(layer, meta));
            }
        }
        Ok(Resolved::Dir { stack: dirs, hides: false })
    }

    /// Copies one non-directory with its metadata, or hardlinks it to an earlier copy of the
    /// same inode of the same layer.
    fn copy_leaf(&mut self, layer: usize, src: &Path, dst: &Path, stat: &Stat) -> ImageResult<()> {
        let key = (layer, stat.dev(), stat.ino());
        if stat.nlink() > 1
            && let Some(first) = self.links.get(&key)
        {
            return fsutil::hard_link(first, dst);
        }
        if stat.kind() == Kind::Socket {
            tracing::warn!(path = %src.display(), "skipping a socket while merging layers");
            return Ok(());
        }
        let from = inert::open(src)?;
        let to = inert::create_file(dst)?;
        // Holes stay holes: a layer may hold a 1 TiB sparse file that costs its data.
        to.set_len(stat.host.len()).map_err(io_err(dst))?;
        crate::sparse::copy_sparse(&from, &to).map_err(io_err(dst))?;
        drop(to);
        let mut meta = stat.meta.clone();
        meta.xattrs.retain(|(name, _)| !name.starts_with(OVERLAY_XATTR_PREFIX));
        inert::set(dst, &meta)?;
        if stat.nlink() > 1 {
            self.links.insert(key, dst.to_owned());
        }
        Ok(())
    }
}

/// The record of an output directory: the winning directory's, without overlayfs-private
/// xattrs, opaque when it must hide what is below the merge.
fn dir_record(src: &Meta, opaque: bool) -> Meta {
    let mut meta = src.clone();
    meta.xattrs.retain(|(name, _)| !name.starts_with(OVERLAY_XATTR_PREFIX));
    if opaque {
        meta.xattrs.push((OPAQUE_XATTR.to_owned(), b"y".to_vec()));
    }
    meta
}
