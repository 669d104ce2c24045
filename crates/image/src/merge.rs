//! [`merge_layers`]: squashes a stack of erofs layer images into one erofs image with
//! overlayfs semantics, reading the layers in place (no tree is unpacked).
//!
//! The walk is top-down: each path is resolved once, the way overlayfs looks it up, by
//! scanning the layers from the top and stopping at the first non-directory, whiteout or
//! opaque directory. So the cost is one lookup per layer per name and one copy of each
//! visible file's data, never a copy of something a higher layer hides.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use crate::erofs::source::node_meta;
use crate::erofs::{Content, ErofsImage, ErofsInode, Node, NodeId, NodeKind, Tree, write_image};
use crate::fsutil::{OPAQUE_XATTR, OVERLAY_XATTR_PREFIX};
use crate::inert::{Kind, Meta};
use crate::{ImageError, ImageResult};

/// Squashes `layers` (erofs images, topmost first, each in overlayfs "upper" format) into
/// the new erofs image `out`, so that `out` stacked on the layers that were below `layers`
/// shows exactly what the original stack showed. Returns the bytes of regular-file content
/// the result holds, counted per name.
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
///   one layer stay hardlinked; holes stay holes. Sockets are skipped with a warning. Like
///   overlayfs, opacity of a layer's root directory is ignored.
pub fn merge_layers(layers: &[&Path], out: &Path, keep_whiteouts: bool) -> ImageResult<u64> {
    if layers.is_empty() {
        return Err(ImageError::InvalidTree { path: out.to_owned(), reason: "no layers to merge".into() });
    }
    let images = layers.iter().map(|l| ErofsImage::open(l).map(Arc::new)).collect::<ImageResult<Vec<_>>>()?;
    let roots = images.iter().enumerate().map(|(i, im)| Ok((i, im.root()?))).collect::<ImageResult<Vec<_>>>()?;
    let mut tree = Tree::new(node_meta(&dir_record(&roots[0].1.meta, false)));
    let mut merger = Merger { images: &images, links: HashMap::new(), content_bytes: 0 };
    let mut tasks = vec![Task { node: 0, stack: roots, hides_below: keep_whiteouts }];
    while let Some(task) = tasks.pop() {
        merger.dir(&mut tree, task, &mut tasks)?;
    }
    write_image(&tree, out)?;
    Ok(merger.content_bytes)
}

/// Fill the output directory `node` from the layers' directories in `stack` (layer index
/// and inode, top first). `hides_below`: whiteouts and opaque marks written here still
/// matter, as layers below the merge may be visible through this directory.
struct Task {
    node: NodeId,
    stack: Vec<(usize, ErofsInode)>,
    hides_below: bool,
}

/// How the layers resolve one name.
enum Resolved {
    /// Hidden by a whiteout in layer `usize` (nothing above it).
    Whiteout(usize, ErofsInode),
    /// A non-directory from layer `usize`.
    Leaf(usize, ErofsInode),
    /// A directory merged from these layers (top first); `hides` when it hides whatever is
    /// at this path below the last of them.
    Dir { stack: Vec<(usize, ErofsInode)>, hides: bool },
}

struct Merger<'a> {
    images: &'a [Arc<ErofsImage>],
    /// (layer, nid) of multiply-linked non-directories already added → their node.
    links: HashMap<(usize, u64), NodeId>,
    content_bytes: u64,
}

impl Merger<'_> {
    fn dir(&mut self, tree: &mut Tree, task: Task, tasks: &mut Vec<Task>) -> ImageResult<()> {
        let mut names = BTreeSet::<Vec<u8>>::new();
        for (layer, dir) in &task.stack {
            names.extend(self.images[*layer].read_dir(dir)?.iter().map(|e| e.name.clone()));
        }
        for name in names {
            match self.resolve(&name, &task.stack)? {
                Resolved::Whiteout(layer, inode) => {
                    if task.hides_below {
                        self.leaf(tree, task.node, &name, layer, inode)?;
                    }
                }
                Resolved::Leaf(layer, inode) => self.leaf(tree, task.node, &name, layer, inode)?,
                Resolved::Dir { stack, hides } => {
                    let meta = node_meta(&dir_record(&stack[0].1.meta, task.hides_below && hides));
                    let node = tree.add(task.node, &name, Node { kind: NodeKind::Dir(Vec::new()), meta });
                    tasks.push(Task { node, stack, hides_below: task.hides_below && !hides });
                }
            }
        }
        Ok(())
    }

    /// Looks `name` up in the directories of its parent's `stack`, as overlayfs does.
    fn resolve(&self, name: &[u8], stack: &[(usize, ErofsInode)]) -> ImageResult<Resolved> {
        let mut dirs = Vec::new();
        for (layer, dir) in stack {
            let Some(inode) = self.images[*layer].lookup(dir, name)? else { continue };
            if inode.is_dir() {
                let opaque = inode.is_opaque();
                dirs.push((*layer, inode));
                if opaque {
                    return Ok(Resolved::Dir { stack: dirs, hides: true });
                }
            } else if !dirs.is_empty() {
                // a directory above a whiteout or non-directory: it hides that, and so
                // whatever the layers below the merge have at this path
                return Ok(Resolved::Dir { stack: dirs, hides: true });
            } else if inode.is_whiteout() {
                return Ok(Resolved::Whiteout(*layer, inode));
            } else {
                return Ok(Resolved::Leaf(*layer, inode));
            }
        }
        Ok(Resolved::Dir { stack: dirs, hides: false })
    }

    /// Adds one non-directory with its metadata, or another name for a node already added
    /// from the same inode of the same layer.
    fn leaf(&mut self, tree: &mut Tree, dir: NodeId, name: &[u8], layer: usize, inode: ErofsInode) -> ImageResult<()> {
        let key = (layer, inode.nid);
        if inode.is_file() {
            self.content_bytes = self.content_bytes.saturating_add(inode.len());
        }
        if inode.nlink() > 1
            && let Some(&node) = self.links.get(&key)
        {
            tree.link(dir, name, node);
            return Ok(());
        }
        let image = &self.images[layer];
        let kind = match inode.kind() {
            Kind::File => NodeKind::Regular(Content::Layer(image.clone(), inode.clone())),
            Kind::Symlink => NodeKind::Symlink(image.read_link(&inode)?),
            Kind::Char(rdev) => NodeKind::Char(rdev),
            Kind::Block(rdev) => NodeKind::Block(rdev),
            Kind::Fifo => NodeKind::Fifo,
            Kind::Socket => {
                tracing::warn!(image = %image.path().display(), "skipping a socket while merging layers");
                return Ok(());
            }
            Kind::Dir => unreachable!("`resolve` never makes a leaf of a directory"),
        };
        let mut meta = inode.meta.clone();
        meta.xattrs.retain(|(name, _)| !name.starts_with(OVERLAY_XATTR_PREFIX));
        let node = tree.add(dir, name, Node { kind, meta: node_meta(&meta) });
        if inode.nlink() > 1 {
            self.links.insert(key, node);
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
