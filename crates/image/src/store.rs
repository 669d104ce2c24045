//! [`FsLayerStore`]: the layer store on a local filesystem (layout in the crate docs).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{ImageError, ImageResult, LayerStore, io_err};

/// A published layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// `sha256:<hex>` of the erofs image.
    pub digest: String,
    /// Size of the erofs image.
    pub disk_bytes: u64,
    /// Sum of the sizes of the regular files in the layer.
    pub content_bytes: u64,
}

/// Layers on a local filesystem.
#[derive(Debug, Clone)]
pub struct FsLayerStore {
    root: PathBuf,
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
        let trees = root.join("trees");
        for entry in std::fs::read_dir(&trees).map_err(io_err(&trees))? {
            let tree = entry.map_err(io_err(&trees))?.path();
            if tree.symlink_metadata().is_ok_and(|m| m.is_dir()) && !crate::inert::is_inert(&tree)? {
                crate::inert::make_inert(&tree)?;
                tracing::info!(tree = %tree.display(), "converted a layer tree to the inert form");
            }
        }
        Ok(Self { root: root.to_owned() })
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

    async fn commit_tree(&self, tree: PathBuf) -> ImageResult<LayerInfo> {
        let staged = self.root.join("tmp").join(format!("{}.erofs", Uuid::new_v4()));
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::erofs::tree_from_dir(&tree).and_then(|t| crate::erofs::write_image(&t, &staged)) {
                let _ = std::fs::remove_file(&staged);
                return Err(e);
            }
            publish(&root, &staged, &tree)
        })
        .await
        .map_err(|e| ImageError::Io { path: PathBuf::new(), source: std::io::Error::other(e) })?
    }
}

/// Hashes the staged erofs file, then moves it and its tree into place (or drops them if an
/// identical layer is already published).
fn publish(root: &Path, staged: &Path, tree: &Path) -> ImageResult<LayerInfo> {
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
    Ok(LayerInfo { digest, disk_bytes, content_bytes })
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
}
