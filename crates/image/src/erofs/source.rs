//! Builds a [`Tree`] from an inert layer tree on the host (see [`crate::inert`]): each
//! entry's type and metadata come from its record, a symlink's target from its file.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::{Content, Node, NodeId, NodeKind, NodeMeta, Tree};
use crate::inert::{self, Kind, Meta};
use crate::{ImageResult, io_err};

/// Reads the tree at `dir` (its entries' types, modes, owners, times and xattrs as recorded).
pub fn tree_from_dir(dir: &Path) -> ImageResult<Tree> {
    let mut tree = Tree::new(node_meta(&inert::stat(dir)?.meta));
    let mut inodes: HashMap<(u64, u64), NodeId> = HashMap::new();
    let mut stack: Vec<(PathBuf, NodeId)> = vec![(dir.to_owned(), 0)];
    while let Some((path, id)) = stack.pop() {
        let mut entries: Vec<_> =
            std::fs::read_dir(&path).map_err(io_err(&path))?.collect::<Result<_, _>>().map_err(io_err(&path))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let child = entry.path();
            let stat = inert::stat(&child)?;
            let name = entry.file_name();
            let name = name.as_bytes();
            let key = (stat.host.dev(), stat.host.ino());
            if !stat.is_dir()
                && stat.nlink() > 1
                && let Some(&existing) = inodes.get(&key)
            {
                tree.link(id, name, existing);
                continue;
            }
            let kind = match stat.kind() {
                Kind::Dir => NodeKind::Dir(Vec::new()),
                Kind::File => NodeKind::Regular(Content::File(child.clone())),
                Kind::Symlink => NodeKind::Symlink(inert::read_link(&child)?),
                Kind::Char(rdev) => NodeKind::Char(rdev),
                Kind::Block(rdev) => NodeKind::Block(rdev),
                Kind::Fifo => NodeKind::Fifo,
                Kind::Socket => NodeKind::Socket,
            };
            let node = tree.add(id, name, Node { kind, meta: node_meta(&stat.meta) });
            if stat.is_dir() {
                stack.push((child, node));
            } else if stat.nlink() > 1 {
                inodes.insert(key, node);
            }
        }
    }
    Ok(tree)
}

/// The inode metadata of a record (xattrs erofs cannot name are left out).
pub(crate) fn node_meta(meta: &Meta) -> NodeMeta {
    NodeMeta {
        perm: meta.perm,
        uid: meta.uid,
        gid: meta.gid,
        mtime: meta.mtime.0,
        mtime_nsec: meta.mtime.1,
        // only what erofs can name (user., trusted., security., POSIX ACLs)
        xattrs: meta
            .xattrs
            .iter()
            .map(|(n, v)| (n.clone().into_bytes(), v.clone()))
            .filter(|(n, _)| super::format::xattr_index(n).is_some())
            .collect(),
    }
}
