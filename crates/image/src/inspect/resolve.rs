//! Path lookup in the merged view of a layer stack, the way overlayfs and the kernel's
//! `namei` see it, without mounting anything.
//!
//! A name in a directory resolves to its topmost entry, scanning only the layers where the
//! parent is a directory: a whiteout (char device 0/0) hides it, a non-directory ends the
//! scan, directories merge downwards until an opaque one (`trusted.overlay.opaque=y`).
//! Symlinks are read from the winning layer and followed *inside the image*: an absolute
//! target restarts at the image root and `..` stops at the root, like `chroot`. Layers are
//! read in place (inode numbers within each image), so no lookup ever touches a host path.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::erofs::ErofsInode;
use crate::{ImageError, ImageResult};

use super::ImageView;

/// Symlinks followed in one resolution before it fails, as Linux's `MAXSYMLINKS`.
const MAX_SYMLINKS: usize = 40;

/// An entry of the merged view.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path in the image relative to the root (every symlink on the way resolved); empty for
    /// the root.
    pub(super) rel: PathBuf,
    /// Index (topmost first) of the layer the entry comes from.
    pub(super) layer: usize,
    /// The entry's inode in that layer.
    pub(super) meta: ErofsInode,
    /// For a directory, the layers (top first) whose directories merge into it, each with
    /// its directory's inode.
    pub(super) stack: Vec<(usize, ErofsInode)>,
}

impl Entry {
    /// Absolute path in the image (symlinks resolved), `/` for the root.
    pub fn path(&self) -> String {
        format!("/{}", self.rel.to_string_lossy())
    }

    /// Index of the layer (topmost first) the entry comes from; for a directory, the topmost
    /// layer that has it.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// The entry's metadata as the image has it.
    pub fn metadata(&self) -> &ErofsInode {
        &self.meta
    }

    pub fn is_dir(&self) -> bool {
        self.meta.is_dir()
    }

    pub fn is_file(&self) -> bool {
        self.meta.is_file()
    }

    pub fn is_symlink(&self) -> bool {
        self.meta.is_symlink()
    }

    /// The name the entry has in its directory (`/` for the root).
    pub(super) fn name(&self) -> String {
        self.rel.file_name().map_or_else(|| "/".to_owned(), |n| n.to_string_lossy().into_owned())
    }
}

impl ImageView {
    /// The image root: the merge of every layer's root directory (whose opacity overlayfs
    /// ignores, and so does this).
    pub(super) fn root(&self) -> ImageResult<Entry> {
        if self.layers.is_empty() {
            return Err(ImageError::NotFound { path: "/".into() });
        }
        let stack = self.layers.iter().enumerate().map(|(i, l)| Ok((i, l.root()?))).collect::<ImageResult<Vec<_>>>()?;
        Ok(Entry { rel: PathBuf::new(), layer: 0, meta: stack[0].1.clone(), stack })
    }

    /// Looks `name` up in the directory `dir`; `None` when absent or whited out.
    pub(super) fn lookup(&self, dir: &Entry, name: &OsStr) -> ImageResult<Option<Entry>> {
        let rel = dir.rel.join(name);
        let mut found: Option<(usize, ErofsInode)> = None;
        let mut stack = Vec::new();
        for (layer, parent) in &dir.stack {
            let layer = *layer;
            let Some(meta) = self.layers[layer].lookup(parent, name.as_bytes())? else { continue };
            if meta.is_dir() {
                let opaque = meta.is_opaque();
                if found.is_none() {
                    found = Some((layer, meta.clone()));
                }
                stack.push((layer, meta));
                if opaque {
                    break;
                }
            } else if found.is_some() {
                break; // a directory above a non-directory or whiteout hides it
            } else if meta.is_whiteout() {
                return Ok(None);
            } else {
                found = Some((layer, meta));
                break;
            }
        }
        Ok(found.map(|(layer, meta)| {
            let stack = if meta.is_dir() { stack } else { Vec::new() };
            Entry { rel, layer, meta, stack }
        }))
    }

    /// The visible children of a directory, sorted by name (bytewise).
    pub(super) fn children(&self, dir: &Entry) -> ImageResult<Vec<Entry>> {
        let mut names = std::collections::BTreeSet::<OsString>::new();
        for (layer, inode) in &dir.stack {
            for entry in self.layers[*layer].read_dir(inode)?.iter() {
                names.insert(OsStr::from_bytes(&entry.name).to_owned());
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(entry) = self.lookup(dir, &name)? {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Resolves an image path (see [`ImageView::resolve`]).
    pub(super) fn resolve_path(&self, path: &str, follow_last: bool) -> ImageResult<Entry> {
        if path.as_bytes().contains(&0) {
            return Err(ImageError::BadRequest("path contains a NUL byte".into()));
        }
        let not_found = || ImageError::NotFound { path: path.to_owned() };
        let trailing_slash = path.len() > 1 && path.ends_with('/');
        let follow_last = follow_last || trailing_slash;
        // components still to walk, the next one last
        let mut pending: Vec<OsString> = Vec::new();
        push_components(&mut pending, path.as_bytes());
        let root = self.root()?;
        let mut walked: Vec<Entry> = Vec::new();
        let mut links = 0;
        while let Some(name) = pending.pop() {
            let current = walked.last().unwrap_or(&root);
            if !current.is_dir() {
                return Err(not_found());
            }
            if name == ".." {
                walked.pop();
                continue;
            }
            let entry = self.lookup(current, &name)?.ok_or_else(not_found)?;
            if entry.is_symlink() && (follow_last || !pending.is_empty()) {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(ImageError::SymlinkLoop { path: path.to_owned() });
                }
                let target = self.layers[entry.layer].read_link(&entry.meta)?;
                let target = target.as_slice();
                if target.starts_with(b"/") {
                    walked.clear();
                }
                push_components(&mut pending, target);
                continue;
            }
            walked.push(entry);
        }
        let entry = walked.pop().unwrap_or(root);
        if trailing_slash && !entry.is_dir() {
            return Err(ImageError::NotDirectory { path: path.to_owned() });
        }
        Ok(entry)
    }
}

/// Pushes the components of `path` onto `pending` so that the first one is popped first;
/// empty and `.` components are dropped.
fn push_components(pending: &mut Vec<OsString>, path: &[u8]) {
    let start = pending.len();
    pending.extend(
        path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".").map(|c| OsStr::from_bytes(c).to_owned()),
    );
    pending[start..].reverse();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_are_pushed_in_walk_order() {
        let mut pending = vec![OsString::from("rest")];
        push_components(&mut pending, b"/a//./b/../c/");
        let order: Vec<_> = pending.iter().rev().map(|c| c.to_string_lossy().into_owned()).collect();
        assert_eq!(order, ["a", "b", "..", "c", "rest"]);
    }
}
