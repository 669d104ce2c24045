//! Builds a [`Tree`] from a layer tree on the host, without following any symlink.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{Content, Node, NodeId, NodeKind, NodeMeta, Tree};
use crate::fsutil::xattrs;
use crate::{ImageResult, io_err};

/// Reads the tree at `dir` (its entries' own types, modes, owners, times and xattrs).
pub fn tree_from_dir(dir: &Path) -> ImageResult<Tree> {
    let root_meta = dir.symlink_metadata().map_err(io_err(dir))?;
    let mut tree = Tree::new(node_meta(dir, &root_meta)?);
    let mut inodes: HashMap<(u64, u64), NodeId> = HashMap::new();
    let mut stack: Vec<(PathBuf, NodeId)> = vec![(dir.to_owned(), 0)];
    while let Some((path, id)) = stack.pop() {
        let mut entries: Vec<_> =
            std::fs::read_dir(&path).map_err(io_err(&path))?.collect::<Result<_, _>>().map_err(io_err(&path))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let child = entry.path();
            let md = child.symlink_metadata().map_err(io_err(&child))?;
            let name = entry.file_name();
            let name = name.as_bytes();
            let ft = md.file_type();
            if !ft.is_dir()
                && md.nlink() > 1
                && let Some(&existing) = inodes.get(&(md.dev(), md.ino()))
            {
                tree.link(id, name, existing);
                continue;
            }
            let kind = if ft.is_dir() {
                NodeKind::Dir(Vec::new())
            } else if ft.is_file() {
                NodeKind::Regular(Content::File(child.clone()))
            } else if ft.is_symlink() {
                NodeKind::Symlink(std::fs::read_link(&child).map_err(io_err(&child))?.as_os_str().as_bytes().to_vec())
            } else if ft.is_char_device() {
                NodeKind::Char(md.rdev())
            } else if ft.is_block_device() {
                NodeKind::Block(md.rdev())
            } else if ft.is_fifo() {
                NodeKind::Fifo
            } else {
                NodeKind::Socket
            };
            let node = tree.add(id, name, Node { kind, meta: node_meta(&child, &md)? });
            if ft.is_dir() {
                stack.push((child, node));
            } else if md.nlink() > 1 {
                inodes.insert((md.dev(), md.ino()), node);
            }
        }
    }
    Ok(tree)
}

fn node_meta(path: &Path, md: &std::fs::Metadata) -> ImageResult<NodeMeta> {
    Ok(NodeMeta {
        perm: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        // only what erofs can name (user., trusted., security., POSIX ACLs)
        xattrs: xattrs(path)?
            .into_iter()
            .map(|(n, v)| (n.into_bytes(), v))
            .filter(|(n, _)| super::format::xattr_index(n).is_some())
            .collect(),
    })
}
