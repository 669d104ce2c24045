//! [`FsLayerStore`]: the layer store on a local filesystem (layout in the crate docs).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::usage::{file_allocated_bytes, tree_allocated_bytes};
use crate::{CommitLimits, DiskSpace, ImageError, ImageResult, LayerStore, io_err};

/// Present once every tree of the store is in the inert form.
const INERT_MARKER: &str = "trees-inert-v1";

/// A published layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// `sha256:<hex>` of the erofs image.
    pub digest: String,
    /// Size of the erofs image.
    pub disk_bytes: u64,
    /// Sum of the sizes of the regular files in the layer.
    pub content_bytes: u64,
    /// What the layer costs on disk: allocated bytes of the erofs image plus its tree.
    pub stored_bytes: u64,
}

/// Layers on a local filesystem.
#[derive(Debug, Clone)]
pub struct FsLayerStore {
    root: PathBuf,
    /// [`LayerStore::stored_bytes`] of layers measured so far (layers are immutable).
    stored: Arc<Mutex<HashMap<String, u64>>>,
}

impl FsLayerStore {
    /// Opens the store at `root`, creating its directories, discarding staging leftovers
    /// of an earlier crash, and converting trees an older version left in the live form
    /// (real owners, modes, device nodes) to the inert one.
    pub fn open(root: &Path) -> ImageResult<Self> {
        for sub in ["layers", "trees"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let tmp = root.join("tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        // Trees of versions before the inert form are converted once; the marker is the
        // store's own (a tree's root record could have been planted by a tenant's layer).
        let marker = root.join(INERT_MARKER);
        if !marker.exists() {
            let trees = root.join("trees");
            let mut all = true;
            for entry in std::fs::read_dir(&trees).map_err(io_err(&trees))? {
                let tree = entry.map_err(io_err(&trees))?.path();
                if !tree.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                    continue;
                }
                match crate::inert::make_inert(&tree) {
                    Ok(()) => tracing::info!(tree = %tree.display(), "layer tree in the inert form"),
                    Err(e) => {
                        // One broken tree must not keep the server down: runs needing it fail.
                        all = false;
                        tracing::error!(tree = %tree.display(), error = %e, "cannot convert a layer tree");
                    }
                }
            }
            if all {
                std::fs::write(&marker, b"1\n").map_err(io_err(&marker))?;
            }
        }
        Ok(Self { root: root.to_owned(), stored: Arc::default() })
    }

    fn hex_of(digest: &str) -> ImageResult<&str> {
        let hex = digest.strip_prefix("sha256:").ok_or_else(|| ImageError::BadDigest(digest.into()))?;
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(ImageError::BadDigest(digest.into()));
        }
        Ok(hex)
    }
}

#[async_trait]
impl LayerStore for FsLayerStore {
    fn layer_disk(&self, digest: &str) -> ImageResult<PathBuf> {
        let path = self.root.join("layers").join(format!("{}.erofs", Self::hex_of(digest)?));
        if !path.is_file() {
            return Err(ImageError::MissingLayer { digest: digest.into() });
        }
        Ok(path)
    }

    fn layer_tree(&self, digest: &str) -> ImageResult<PathBuf> {
        let path = self.root.join("trees").join(Self::hex_of(digest)?);
        if !path.is_dir() {
            return Err(ImageError::MissingLayer { digest: digest.into() });
        }
        Ok(path)
    }

    fn staging_dir(&self) -> ImageResult<PathBuf> {
        let dir = self.root.join("tmp").join(Uuid::new_v4().to_string());
        std::fs::create_dir(&dir).map_err(io_err(&dir))?;
        Ok(dir)
    }

    async fn commit_tree_limited(&self, tree: PathBuf, limits: CommitLimits) -> ImageResult<LayerInfo> {
        let staged = self.root.join("tmp").join(format!("{}.erofs", Uuid::new_v4()));
        let root = self.root.clone();
        let info = tokio::task::spawn_blocking(move || {
            let tree_bytes = tree_allocated_bytes(&tree)?;
            // The erofs image holds the same data again: refuse before writing it when even
            // that estimate does not fit.
            check_limits(&root, tree_bytes, tree_bytes, limits)?;
            let written = crate::erofs::tree_from_dir(&tree)
                .and_then(|t| crate::erofs::write_image(&t, &staged))
                .and_then(|()| {
                    let stored = tree_bytes.saturating_add(file_allocated_bytes(&staged)?);
                    check_limits(&root, stored, 0, limits)?;
                    Ok(stored)
                });
            match written {
                Ok(stored) => publish(&root, &staged, &tree, stored),
                Err(e) => {
                    let _ = std::fs::remove_file(&staged);
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| ImageError::Io { path: PathBuf::new(), source: std::io::Error::other(e) })??;
        self.stored.lock().unwrap_or_else(|e| e.into_inner()).insert(info.digest.clone(), info.stored_bytes);
        Ok(info)
    }

    async fn stored_bytes(&self, digest: &str) -> ImageResult<u64> {
        if let Some(&n) = self.stored.lock().unwrap_or_else(|e| e.into_inner()).get(digest) {
            return Ok(n);
        }
        let (disk, tree) = (self.layer_disk(digest)?, self.layer_tree(digest)?);
        let n = tokio::task::spawn_blocking(move || {
            Ok::<_, ImageError>(file_allocated_bytes(&disk)?.saturating_add(tree_allocated_bytes(&tree)?))
        })
        .await
        .map_err(|e| ImageError::Io { path: PathBuf::new(), source: std::io::Error::other(e) })??;
        self.stored.lock().unwrap_or_else(|e| e.into_inner()).insert(digest.to_owned(), n);
        Ok(n)
    }

    fn space(&self) -> ImageResult<DiskSpace> {
        crate::disk_space(&self.root)
    }
}

/// `stored` bytes measured so far must fit the budget, and `to_write` more must leave the
/// reserve free.
fn check_limits(root: &Path, stored: u64, to_write: u64, limits: CommitLimits) -> ImageResult<()> {
    if stored > limits.max_stored_bytes {
        return Err(ImageError::OverBudget { needed: stored, allowed: limits.max_stored_bytes });
    }
    if limits.min_free_bytes > 0 && crate::disk_space(root)?.free_bytes.saturating_sub(to_write) < limits.min_free_bytes
    {
        return Err(ImageError::LowSpace { reserve: limits.min_free_bytes });
    }
    Ok(())
}

/// Hashes the staged erofs file, then moves it and its tree into place (or drops them if an
/// identical layer is already published).
fn publish(root: &Path, staged: &Path, tree: &Path, stored_bytes: u64) -> ImageResult<LayerInfo> {
    let file = File::open(staged).map_err(io_err(staged))?;
    let disk_bytes = file.metadata().map_err(io_err(staged))?.len();
    // Flushing the image to disk, hashing it (from the page cache) and sizing the tree are
    // independent; all three finish before anything is renamed into place.
    let (synced, hashed, content_bytes) = std::thread::scope(|s| {
        let synced = s.spawn(|| file.sync_all());
        let hashed = s.spawn(|| File::open(staged).and_then(sha256_file));
        let content_bytes = tree_bytes(tree);
        (synced.join(), hashed.join(), content_bytes)
    });
    joined(synced).map_err(io_err(staged))?;
    let hex = joined(hashed).map_err(io_err(staged))?;
    let content_bytes = content_bytes?;
    let digest = format!("sha256:{hex}");
    let disk = root.join("layers").join(format!("{hex}.erofs"));
    let tree_dst = root.join("trees").join(&hex);
    if disk.exists() && tree_dst.exists() {
        std::fs::remove_file(staged).map_err(io_err(staged))?;
        std::fs::remove_dir_all(tree).map_err(io_err(tree))?;
    } else {
        if tree_dst.exists() {
            std::fs::remove_dir_all(&tree_dst).map_err(io_err(&tree_dst))?;
        }
        // The tree first: a disk without its tree would be a layer inspection cannot read.
        std::fs::rename(tree, &tree_dst).map_err(io_err(&tree_dst))?;
        std::fs::rename(staged, &disk).map_err(io_err(&disk))?;
        for dir in [root.join("trees"), root.join("layers")] {
            File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err(&dir))?;
        }
    }
    Ok(LayerInfo { digest, disk_bytes, content_bytes, stored_bytes })
}

fn joined<T>(r: std::thread::Result<std::io::Result<T>>) -> std::io::Result<T> {
    r.unwrap_or_else(|_| Err(std::io::Error::other("publishing thread panicked")))
}

fn sha256_file(mut file: File) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Sum of the sizes of the tree's regular files (per name, as before).
fn tree_bytes(dir: &Path) -> ImageResult<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(io_err(&d))? {
            let path = entry.map_err(io_err(&d))?.path();
            let stat = crate::inert::stat(&path)?;
            if stat.is_dir() {
                stack.push(path);
            } else if stat.is_file() {
                total += stat.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn busybox_layer_is_published_atomically_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsLayerStore::open(dir.path()).unwrap();
        let tree = store.staging_dir().unwrap();
        crate::build_busybox_tree(Path::new("/bin/busybox"), &tree).unwrap();
        assert!(crate::inert::stat(&tree.join("bin/sh")).unwrap().is_symlink());
        let info = store.commit_tree(tree.clone()).await.unwrap();
        assert!(!tree.exists(), "the staged tree was moved into the store");
        let disk = store.layer_disk(&info.digest).unwrap();
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), info.disk_bytes);
        assert!(store.layer_tree(&info.digest).unwrap().join("etc/passwd").is_file());
        assert!(info.content_bytes > 1_000_000, "busybox binary counted");
        assert!(matches!(store.layer_disk("sha256:00"), Err(ImageError::BadDigest(_))));
        let missing = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(store.layer_disk(&missing), Err(ImageError::MissingLayer { .. })));
        // reopening clears staging leftovers but keeps layers
        let leftover = store.staging_dir().unwrap();
        let store = FsLayerStore::open(dir.path()).unwrap();
        assert!(!leftover.exists());
        assert!(store.layer_disk(&info.digest).is_ok());
    }

    #[tokio::test]
    async fn a_limited_commit_is_measured_before_it_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsLayerStore::open(dir.path()).unwrap();
        let staged_tree = || {
            let tree = store.staging_dir().unwrap();
            std::fs::write(tree.join("data"), vec![1u8; 4 << 20]).unwrap();
            crate::inert::make_inert(&tree).unwrap();
            tree
        };
        let published = |store: &FsLayerStore| std::fs::read_dir(store.root.join("layers")).unwrap().count();
        // 4 MiB of data is stored twice (tree + erofs): a 6 MiB budget is refused after the
        // erofs image is measured, and nothing is published.
        let tree = staged_tree();
        let limits = CommitLimits { max_stored_bytes: 6 << 20, min_free_bytes: 0 };
        match store.commit_tree_limited(tree.clone(), limits).await {
            Err(ImageError::OverBudget { needed, allowed }) => {
                assert!(needed >= 8 << 20 && allowed == 6 << 20, "{needed} {allowed}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(published(&store), 0);
        assert!(tree.join("data").is_file(), "the tree stays with the caller");
        // A 3 MiB budget is refused from the tree alone, before any erofs is written.
        let limits = CommitLimits { max_stored_bytes: 3 << 20, min_free_bytes: 0 };
        assert!(matches!(store.commit_tree_limited(tree.clone(), limits).await, Err(ImageError::OverBudget { .. })));
        // A reserve above the filesystem's free space: refused too.
        let free = store.space().unwrap().free_bytes;
        let limits = CommitLimits { max_stored_bytes: u64::MAX, min_free_bytes: free + (1 << 30) };
        assert!(matches!(store.commit_tree_limited(tree.clone(), limits).await, Err(ImageError::LowSpace { .. })));
        assert_eq!(published(&store), 0);
        assert_eq!(std::fs::read_dir(store.root.join("tmp")).unwrap().count(), 1, "only the caller's staging dir");
        // The positive control: the same tree within limits is published and its cost reported,
        // measured again the same from disk by a fresh store.
        let limits = CommitLimits { max_stored_bytes: 9 << 20, min_free_bytes: 0 };
        let info = store.commit_tree_limited(tree, limits).await.unwrap();
        assert!(info.stored_bytes >= 8 << 20 && info.stored_bytes <= 9 << 20, "{info:?}");
        assert_eq!(store.stored_bytes(&info.digest).await.unwrap(), info.stored_bytes);
        let reopened = FsLayerStore::open(dir.path()).unwrap();
        assert_eq!(reopened.stored_bytes(&info.digest).await.unwrap(), info.stored_bytes);
    }
}
