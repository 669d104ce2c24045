//! What layers cost the host's disk: allocated bytes (not apparent sizes: a sparse file's holes
//! cost nothing, a 1-byte file costs a block) and the free space of the store's filesystem.
//! The core's storage quotas and free-space reserve are built on these numbers.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::{ImageResult, io_err};

/// Space on the filesystem holding a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes an unprivileged writer could still allocate (`f_bavail`).
    pub free_bytes: u64,
    /// Size of the filesystem (`f_blocks`).
    pub total_bytes: u64,
}

/// Bounds on publishing one layer, checked after the layer is measured and before it becomes
/// visible (see [`crate::LayerStore::commit_tree_limited`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitLimits {
    /// Most the layer may cost on disk (erofs image + unpacked tree, allocated bytes).
    pub max_stored_bytes: u64,
    /// Free space that must remain on the store's filesystem after the erofs image is written.
    pub min_free_bytes: u64,
}

impl CommitLimits {
    /// No bounds (server-made layers: the base image, compaction).
    pub const NONE: Self = Self { max_stored_bytes: u64::MAX, min_free_bytes: 0 };
}

/// `statvfs` of the filesystem holding `path`.
pub fn disk_space(path: &Path) -> ImageResult<DiskSpace> {
    let st = rustix::fs::statvfs(path)
        .map_err(|e| std::io::Error::from_raw_os_error(e.raw_os_error()))
        .map_err(io_err(path))?;
    Ok(DiskSpace {
        free_bytes: st.f_bavail.saturating_mul(st.f_frsize),
        total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
    })
}

/// Allocated bytes of one file (not followed if it is a symlink).
pub(crate) fn file_allocated_bytes(path: &Path) -> ImageResult<u64> {
    Ok(path.symlink_metadata().map_err(io_err(path))?.blocks().saturating_mul(512))
}

/// Allocated bytes of everything under `dir` (itself included): files, directories, symlinks,
/// each inode once however many hard links name it. Symlinks are never followed.
pub(crate) fn tree_allocated_bytes(dir: &Path) -> ImageResult<u64> {
    let mut seen = HashSet::new();
    let mut total = file_allocated_bytes(dir)?;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let entry = entry.map_err(io_err(&d))?;
            let path = entry.path();
            let meta = path.symlink_metadata().map_err(io_err(&path))?;
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total = total.saturating_add(meta.blocks().saturating_mul(512));
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_allocation_not_apparent_size_and_hard_links_once() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let empty = tree_allocated_bytes(&root).unwrap();
        // 1 MiB of data.
        std::fs::write(root.join("sub/data"), vec![7u8; 1 << 20]).unwrap();
        let with_data = tree_allocated_bytes(&root).unwrap();
        assert!(with_data >= empty + (1 << 20), "{empty} -> {with_data}");
        // A 1 GiB sparse file costs (almost) nothing…
        let sparse = std::fs::File::create(root.join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        let with_sparse = tree_allocated_bytes(&root).unwrap();
        assert!(with_sparse < with_data + (64 << 10), "{with_data} -> {with_sparse}");
        // …and a second name for the data costs nothing either.
        std::fs::hard_link(root.join("sub/data"), root.join("again")).unwrap();
        assert_eq!(tree_allocated_bytes(&root).unwrap(), with_sparse);
        std::os::unix::fs::symlink("/etc", root.join("link")).unwrap();
        assert!(tree_allocated_bytes(&root).unwrap() < with_sparse + (64 << 10), "symlinks are not followed");

        let space = disk_space(dir.path()).unwrap();
        assert!(space.total_bytes > 0 && space.free_bytes <= space.total_bytes, "{space:?}");
    }
}
