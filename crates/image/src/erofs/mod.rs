//! An erofs image writer: uncompressed erofs with 4 KiB blocks, built from an in-memory
//! [`Tree`] whose metadata comes from anywhere (the host never needs the image's owners,
//! modes or device nodes to exist as live files). Regular files are stored flat (small ones
//! inline after their inode), files with holes chunk-based with null chunks for the holes,
//! directories as sorted dirent blocks, xattrs inline with erofs name indexes. A [`Builder`]
//! writes file data as it arrives and the metadata after it.

mod build;
mod format;
mod layout;
mod read;
pub(crate) mod source;
mod write;

pub use build::Builder;
pub(crate) use format::BLOCK;
pub use read::{DirEntry, ErofsImage, ErofsInode, ErofsReader};
pub use source::tree_from_dir;
pub use write::write_image;

use std::path::PathBuf;
use std::sync::Arc;

/// Index of a node in [`Tree::nodes`]; the root is node 0.
pub type NodeId = usize;

/// What a node is, with what it holds.
#[derive(Debug, Clone)]
pub enum NodeKind {
    /// A regular file.
    Regular(Content),
    /// A directory: its children by name (any order; the writer sorts). Names are single
    /// path components, never `.` or `..`.
    Dir(Vec<(Vec<u8>, NodeId)>),
    /// A symlink with its target.
    Symlink(Vec<u8>),
    /// A character device with its `rdev` (0 = an overlayfs whiteout).
    Char(u64),
    /// A block device with its `rdev`.
    Block(u64),
    Fifo,
    Socket,
}

/// Where a regular file's bytes come from.
#[derive(Debug, Clone)]
pub enum Content {
    /// The bytes themselves.
    Bytes(Vec<u8>),
    /// A host file, opened without following symlinks; its holes (`SEEK_HOLE`) stay holes
    /// in the image.
    File(PathBuf),
    /// A regular file of another erofs image (a layer being merged), copied from it in
    /// place; its null chunks stay holes.
    Layer(Arc<ErofsImage>, ErofsInode),
    /// Data a [`Builder`] already wrote into the image being built.
    Placed(Placed),
}

/// Where a [`Builder`] put a file's data.
#[derive(Debug, Clone)]
pub enum Placed {
    /// `size` bytes in consecutive blocks from `blkaddr`.
    Flat { size: u64, blkaddr: u32 },
    /// Chunks of 4 KiB << `bits`, each at its first block or a hole.
    Chunked { size: u64, bits: u8, addrs: Vec<Option<u32>> },
}

/// The metadata an inode carries in the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMeta {
    /// Permission bits incl. setuid/setgid/sticky (`0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Xattrs by full name (`user.…`, `trusted.…`, `security.…`, POSIX ACLs).
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// One inode. A node reached from several directories is a hardlink (non-directories only).
#[derive(Debug, Clone)]
pub struct Node {
    pub kind: NodeKind,
    pub meta: NodeMeta,
}

/// A filesystem tree to write; `nodes[0]` is the root directory.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

impl Tree {
    /// A tree holding only a root directory with `meta`.
    pub fn new(meta: NodeMeta) -> Self {
        Self { nodes: vec![Node { kind: NodeKind::Dir(Vec::new()), meta }] }
    }

    /// Adds `node` as `name` in directory `dir` and returns its id.
    pub fn add(&mut self, dir: NodeId, name: &[u8], node: Node) -> NodeId {
        let id = self.nodes.len();
        self.nodes.push(node);
        self.link(dir, name, id);
        id
    }

    /// Adds another name for an existing node (a hardlink).
    pub fn link(&mut self, dir: NodeId, name: &[u8], id: NodeId) {
        if let NodeKind::Dir(children) = &mut self.nodes[dir].kind {
            children.push((name.to_vec(), id));
        }
    }
}
