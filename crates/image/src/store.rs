//! [`FsLayerStore`]: the layer store on a local filesystem (layout in the crate docs).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::pins::{LayerPin, PinTable, Sweep};
use crate::usage::{file_allocated_bytes, tree_allocated_bytes};
use crate::{
    CommitLimits, DiskSpace, ImageError, ImageResult, LayerStore, PinnedLayers, Reclaimed, ScratchDisk, UnpackLimits,
    UnpackStats, io_err, unpack_layer_from,
};

/// The marker older versions wrote once their trees were inert; removed with the trees.
const LEGACY_INERT_MARKER: &str = "trees-inert-v1";

/// A published layer, pinned: hold [`Self::pin`] until the image naming it is recorded.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    /// `sha256:<hex>` of the erofs image.
    pub digest: String,
    /// Size of the erofs image.
    pub disk_bytes: u64,
    /// Sum of the sizes of the regular files in the layer.
    pub content_bytes: u64,
    /// What the layer costs on disk: allocated bytes of its erofs image.
    pub stored_bytes: u64,
    pub pin: LayerPin,
}

/// A layer image written from a tar ([`LayerStore::stage_tar`]) and not published yet; its
/// file is removed if it is dropped unpublished.
#[derive(Debug)]
pub struct StagedLayer {
    path: PathBuf,
    pub stats: UnpackStats,
}

impl StagedLayer {
    /// The staged file, now the caller's to publish or remove.
    pub(crate) fn into_path(mut self) -> PathBuf {
        std::mem::take(&mut self.path)
    }
}

impl Drop for StagedLayer {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty()
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove a staged layer");
        }
    }
}

/// Layers on a local filesystem.
#[derive(Debug, Clone)]
pub struct FsLayerStore {
    root: PathBuf,
    /// [`LayerStore::stored_bytes`] of layers measured so far (layers are immutable).
    stored: Arc<Mutex<HashMap<String, u64>>>,
    pins: Arc<PinTable>,
}

impl FsLayerStore {
    /// Opens the store at `root`, creating its directories, discarding staging leftovers
    /// of an earlier crash, and removing the unpacked trees older versions kept next to
    /// each layer (the erofs image is the layer; see the crate docs).
    pub fn open(root: &Path) -> ImageResult<Self> {
        let layers = root.join("layers");
        std::fs::create_dir_all(&layers).map_err(io_err(&layers))?;
        for leftover in ["tmp", "trees"] {
            let dir = root.join(leftover);
            if dir.exists() {
                if leftover == "trees" {
                    tracing::info!(dir = %dir.display(), "removing the unpacked layer trees of an older version");
                }
                std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            }
        }
        let _ = std::fs::remove_file(root.join(LEGACY_INERT_MARKER));
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        Ok(Self { root: root.to_owned(), stored: Arc::default(), pins: Arc::default() })
    }

    /// Where the layer `digest` lives (unpinned: for tests and tools).
    pub fn layer_path(&self, digest: &str) -> ImageResult<PathBuf> {
        Ok(layer_file(&self.root, Self::hex_of(digest)?))
    }

    fn remember(&self, info: &LayerInfo) {
        self.stored.lock().unwrap_or_else(|e| e.into_inner()).insert(info.digest.clone(), info.stored_bytes);
    }

    /// A new name for an erofs image being written in staging.
    fn staged_image_path(&self) -> PathBuf {
        self.root.join("tmp").join(format!("{}.erofs", Uuid::new_v4()))
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
    fn open_layers(&self, digests: &[String]) -> ImageResult<PinnedLayers> {
        let paths = digests.iter().map(|d| self.layer_path(d)).collect::<ImageResult<Vec<_>>>()?;
        // Checked under the pin: a sweep that removed a file before it is seen here.
        let (pin, missing) = self.pins.pin(digests, || paths.iter().position(|p| !p.is_file()));
        if let Some(i) = missing {
            return Err(ImageError::MissingLayer { digest: digests[i].clone() });
        }
        Ok(PinnedLayers { paths, pin })
    }

    fn staging_dir(&self) -> ImageResult<PathBuf> {
        let dir = self.root.join("tmp").join(Uuid::new_v4().to_string());
        std::fs::create_dir(&dir).map_err(io_err(&dir))?;
        Ok(dir)
    }

    fn stage_tar(
        &self,
        tar: &mut dyn Read,
        limits: UnpackLimits,
        disk: Option<ScratchDisk>,
    ) -> ImageResult<StagedLayer> {
        // Owned from the start: a failed unpack's partial image goes with it.
        let mut staged = StagedLayer { path: self.staged_image_path(), stats: UnpackStats::default() };
        staged.stats = unpack_layer_from(tar, &staged.path, limits, disk)?;
        Ok(staged)
    }

    async fn commit_tree_limited(&self, tree: PathBuf, limits: CommitLimits) -> ImageResult<LayerInfo> {
        let staged = self.staged_image_path();
        let (root, pins) = (self.root.clone(), self.pins.clone());
        let info = blocking(move || {
            // The erofs image holds about what the tree's files allocate: refuse before
            // writing it when even that estimate does not fit.
            let estimate = tree_allocated_bytes(&tree)?;
            check_limits(&root, estimate, estimate, limits)?;
            let content_bytes = tree_bytes(&tree)?;
            let written = crate::erofs::tree_from_dir(&tree).and_then(|t| crate::erofs::write_image(&t, &staged));
            let info = written.and_then(|()| publish(&root, &pins, &staged, content_bytes, limits));
            if info.is_err() {
                let _ = std::fs::remove_file(&staged);
            } else {
                // The tree was only the staging form of the layer: the erofs image is it now.
                std::fs::remove_dir_all(&tree).map_err(io_err(&tree))?;
            }
            info
        })
        .await?;
        self.remember(&info);
        Ok(info)
    }

    async fn commit_image(&self, image: PathBuf, content_bytes: u64, limits: CommitLimits) -> ImageResult<LayerInfo> {
        let (root, pins) = (self.root.clone(), self.pins.clone());
        let info = blocking(move || {
            let info = publish(&root, &pins, &image, content_bytes, limits);
            if info.is_err() {
                let _ = std::fs::remove_file(&image);
            }
            info
        })
        .await?;
        self.remember(&info);
        Ok(info)
    }

    async fn stored_bytes(&self, digest: &str) -> ImageResult<u64> {
        if let Some(&n) = self.stored.lock().unwrap_or_else(|e| e.into_inner()).get(digest) {
            return Ok(n);
        }
        let disk = self.layer_path(digest)?;
        if !disk.is_file() {
            return Err(ImageError::MissingLayer { digest: digest.into() });
        }
        let n = blocking(move || file_allocated_bytes(&disk)).await?;
        self.stored.lock().unwrap_or_else(|e| e.into_inner()).insert(digest.to_owned(), n);
        Ok(n)
    }

    fn space(&self) -> ImageResult<DiskSpace> {
        crate::disk_space(&self.root)
    }

    fn stored_bytes_total(&self) -> ImageResult<u64> {
        tree_allocated_bytes(&self.root.join("layers"))
    }

    fn sweep_begin(&self) -> ImageResult<Sweep> {
        let dir = self.root.join("layers");
        let mut present = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let name = entry.map_err(io_err(&dir))?.file_name();
            if let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".erofs")) {
                present.push(format!("sha256:{hex}"));
            }
        }
        Ok(self.pins.begin(present))
    }

    async fn sweep_finish(&self, sweep: Sweep, referenced: &HashSet<String>) -> ImageResult<Reclaimed> {
        let (root, pins, referenced) = (self.root.clone(), self.pins.clone(), referenced.clone());
        let (layers, bytes) = blocking(move || {
            // Under the pin table's lock (which every run's `open_layers` takes) a doomed file
            // is only renamed into `tmp/`; freeing its blocks, which takes long for a big
            // file, happens after. A crash in between leaves it where start-up clears `tmp/`.
            let mut doomed = Vec::new();
            let removed = pins.remove(sweep, &referenced, |digest| {
                let path = layer_file(&root, digest.strip_prefix("sha256:").unwrap_or(digest));
                let to = root.join("tmp").join(format!("{}.removed", Uuid::new_v4()));
                std::fs::rename(&path, &to).map_err(io_err(&path))?;
                doomed.push(to);
                Ok::<_, ImageError>(())
            })?;
            let mut bytes = 0;
            for path in doomed {
                bytes += file_allocated_bytes(&path).unwrap_or(0);
                std::fs::remove_file(&path).map_err(io_err(&path))?;
            }
            Ok((removed, bytes))
        })
        .await?;
        let mut stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        for d in &layers {
            stored.remove(d);
        }
        Ok(Reclaimed { layers, bytes })
    }
}

fn layer_file(root: &Path, hex: &str) -> PathBuf {
    root.join("layers").join(format!("{hex}.erofs"))
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

/// Runs blocking filesystem work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> ImageResult<T> + Send + 'static) -> ImageResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Io { path: PathBuf::new(), source: std::io::Error::other(e) })?
}

/// Measures the staged erofs image against `limits`, then flushes and hashes it and moves
/// it into place (or drops it if an identical layer is already published). On an error the
/// staged file is the caller's.
fn publish(
    root: &Path,
    pins: &Arc<PinTable>,
    staged: &Path,
    content_bytes: u64,
    limits: CommitLimits,
) -> ImageResult<LayerInfo> {
    let stored_bytes = file_allocated_bytes(staged)?;
    check_limits(root, stored_bytes, 0, limits)?;
    let file = File::open(staged).map_err(io_err(staged))?;
    let disk_bytes = file.metadata().map_err(io_err(staged))?.len();
    // Flushing the image to disk and hashing it (from the page cache) are independent; both
    // finish before anything is renamed into place.
    let (synced, hashed) = std::thread::scope(|s| {
        let synced = s.spawn(|| file.sync_all());
        let hashed = sha256_file(File::open(staged).map_err(io_err(staged))?);
        Ok::<_, ImageError>((synced.join(), hashed))
    })?;
    joined(synced).map_err(io_err(staged))?;
    let hex = hashed.map_err(io_err(staged))?;
    let digest = format!("sha256:{hex}");
    let disk = layer_file(root, &hex);
    // Pinned before the file is looked at, so a sweep cannot take an identical layer that
    // is already published between the check and the image being recorded.
    let (pin, placed) = pins.pin(std::slice::from_ref(&digest), || {
        if disk.exists() {
            std::fs::remove_file(staged).map_err(io_err(staged))
        } else {
            std::fs::rename(staged, &disk).map_err(io_err(&disk))
        }
    });
    placed?;
    let dir = root.join("layers");
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err(&dir))?;
    Ok(LayerInfo { digest, disk_bytes, content_bytes, stored_bytes, pin })
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

    /// A tar holding one file `name` of `len` bytes.
    fn tar_of(name: &str, len: usize) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        // Set raw: the tar crate refuses to write a hostile name itself.
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(len as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append(&h, &vec![7u8; len][..]).unwrap();
        b.into_inner().unwrap()
    }

    fn staging_entries(root: &Path) -> usize {
        std::fs::read_dir(root.join("tmp")).unwrap().count()
    }

    #[tokio::test]
    async fn a_staged_layer_is_published_or_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsLayerStore::open(dir.path()).unwrap();
        // Positive control: a good tar stages a file, and publishing consumes it.
        let staged = store.stage_tar(&mut &tar_of("f", 100_000)[..], UnpackLimits::default(), None).unwrap();
        assert_eq!((staging_entries(dir.path()), staged.stats.content_bytes), (1, 100_000));
        let info = store.commit_staged(staged, CommitLimits::NONE).await.unwrap();
        assert!(store.layer_path(&info.digest).unwrap().is_file());
        assert_eq!(staging_entries(dir.path()), 0);
        // A refused unpack (its data was already written) and a dropped staged layer leave
        // nothing in staging.
        let limits = UnpackLimits { max_data_bytes: 10 };
        assert!(matches!(
            store.stage_tar(&mut &tar_of("f", 100)[..], limits, None),
            Err(ImageError::LayerTooLarge { .. })
        ));
        let hostile = tar_of("../escape", 100_000);
        assert!(matches!(
            store.stage_tar(&mut &hostile[..], UnpackLimits::default(), None),
            Err(ImageError::BadLayer { .. })
        ));
        drop(store.stage_tar(&mut &tar_of("g", 100_000)[..], UnpackLimits::default(), None).unwrap());
        assert_eq!(staging_entries(dir.path()), 0);
    }

    #[tokio::test]
    async fn busybox_layer_is_published_atomically_and_deduplicated() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsLayerStore::open(dir.path()).unwrap();
        let tree = store.staging_dir().unwrap();
        crate::build_busybox_tree(Path::new("/bin/busybox"), &tree).unwrap();
        assert!(crate::inert::stat(&tree.join("bin/sh")).unwrap().is_symlink());
        let info = store.commit_tree(tree.clone()).await.unwrap();
        assert!(!tree.exists(), "the staged tree is gone once its image is published");
        let disk = store.layer_path(&info.digest).unwrap();
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), info.disk_bytes);
        let image = crate::erofs::ErofsImage::open(&disk).unwrap();
        let etc = image.lookup(&image.root().unwrap(), b"etc").unwrap().unwrap();
        assert!(image.lookup(&etc, b"passwd").unwrap().unwrap().is_file());
        assert_eq!(info.stored_bytes, file_allocated_bytes(&disk).unwrap(), "one copy of the layer is kept");
        assert!(info.content_bytes > 1_000_000, "busybox binary counted");
        assert!(matches!(store.open_layers(&["sha256:00".into()]), Err(ImageError::BadDigest(_))));
        let missing = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(store.open_layers(&[missing]), Err(ImageError::MissingLayer { .. })));
        // the same tree again: the published layer is kept, the new copy dropped
        let again = store.staging_dir().unwrap();
        crate::build_busybox_tree(Path::new("/bin/busybox"), &again).unwrap();
        assert_eq!(store.commit_tree(again.clone()).await.unwrap().digest, info.digest);
        assert!(!again.exists());
        assert_eq!(std::fs::read_dir(dir.path().join("layers")).unwrap().count(), 1);
        // reopening clears staging leftovers and an older version's trees but keeps layers
        let leftover = store.staging_dir().unwrap();
        let old_tree = dir.path().join("trees").join(info.digest.trim_start_matches("sha256:"));
        std::fs::create_dir_all(old_tree.join("etc")).unwrap();
        std::fs::write(dir.path().join(LEGACY_INERT_MARKER), b"1\n").unwrap();
        let store = FsLayerStore::open(dir.path()).unwrap();
        assert!(!leftover.exists());
        assert!(!dir.path().join("trees").exists() && !dir.path().join(LEGACY_INERT_MARKER).exists());
        assert!(store.open_layers(std::slice::from_ref(&info.digest)).is_ok());
    }

    #[tokio::test]
    async fn a_limited_commit_is_measured_before_it_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsLayerStore::open(dir.path()).unwrap();
        let published = |store: &FsLayerStore| std::fs::read_dir(store.root.join("layers")).unwrap().count();
        let tree = store.staging_dir().unwrap();
        std::fs::write(tree.join("data"), vec![1u8; 4 << 20]).unwrap();
        crate::inert::make_inert(&tree).unwrap();
        // A 3 MiB budget is refused from the tree alone, before any erofs is written.
        let limits = CommitLimits { max_stored_bytes: 3 << 20, min_free_bytes: 0 };
        assert!(matches!(store.commit_tree_limited(tree.clone(), limits).await, Err(ImageError::OverBudget { .. })));
        assert!(tree.join("data").is_file(), "the tree stays with the caller");
        // A reserve above the filesystem's free space: refused too.
        let free = store.space().unwrap().free_bytes;
        let limits = CommitLimits { max_stored_bytes: u64::MAX, min_free_bytes: free + (1 << 30) };
        assert!(matches!(store.commit_tree_limited(tree.clone(), limits).await, Err(ImageError::LowSpace { .. })));
        assert_eq!(published(&store), 0);
        assert_eq!(std::fs::read_dir(store.root.join("tmp")).unwrap().count(), 1, "only the caller's staging dir");
        // The positive control: the same tree within limits is published and its cost reported
        // (its data once), measured again the same from disk by a fresh store.
        let limits = CommitLimits { max_stored_bytes: 5 << 20, min_free_bytes: 0 };
        let info = store.commit_tree_limited(tree, limits).await.unwrap();
        assert!(info.stored_bytes >= 4 << 20 && info.stored_bytes <= (4 << 20) + (64 << 10), "{info:?}");
        assert_eq!(store.stored_bytes(&info.digest).await.unwrap(), info.stored_bytes);
        let reopened = FsLayerStore::open(dir.path()).unwrap();
        assert_eq!(reopened.stored_bytes(&info.digest).await.unwrap(), info.stored_bytes);
    }

    #[tokio::test]
    async fn the_written_image_is_measured_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsLayerStore::open(dir.path()).unwrap();
        // 1 GiB with 4 KiB of data every 32 MiB: the tree allocates ~132 KiB, the image needs
        // a block map or large chunks (≥ 768 KiB), so only the written image is over budget.
        let tree = store.staging_dir().unwrap();
        let f = File::create(tree.join("sparse")).unwrap();
        f.set_len(1 << 30).unwrap();
        for i in 0..32u64 {
            std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 4096], i * (32 << 20)).unwrap();
        }
        drop(f);
        crate::inert::make_inert(&tree).unwrap();
        let estimate = tree_allocated_bytes(&tree).unwrap();
        let limits = CommitLimits { max_stored_bytes: 512 << 10, min_free_bytes: 0 };
        assert!(estimate < limits.max_stored_bytes, "{estimate}");
        match store.commit_tree_limited(tree.clone(), limits).await {
            Err(ImageError::OverBudget { needed, allowed }) => assert!(needed > allowed, "{needed} {allowed}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read_dir(dir.path().join("layers")).unwrap().count(), 0);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1, "the staged image is gone");
        let info = store.commit_tree(tree).await.unwrap();
        assert!(info.stored_bytes > limits.max_stored_bytes && info.content_bytes == 1 << 30, "{info:?}");
    }

    /// A layer with one file holding `body`, committed.
    async fn layer_of(store: &FsLayerStore, body: &str) -> LayerInfo {
        let tree = store.staging_dir().unwrap();
        std::fs::write(tree.join("f"), body).unwrap();
        // Fixed times: the same body makes the same layer.
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
        for p in [tree.join("f"), tree.clone()] {
            File::open(&p).unwrap().set_modified(t).unwrap();
        }
        crate::inert::make_inert(&tree).unwrap();
        store.commit_tree(tree).await.unwrap()
    }

    #[tokio::test]
    async fn a_sweep_removes_what_no_image_names_and_no_one_holds() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsLayerStore::open(dir.path()).unwrap();
        let kept = layer_of(&store, "referenced").await;
        let held = layer_of(&store, "held by a run").await;
        let gone = layer_of(&store, "replaced").await;
        let (kept_d, held_d, gone_d) = (kept.digest.clone(), held.digest.clone(), gone.digest.clone());
        drop((kept, gone));
        let run = store.open_layers(std::slice::from_ref(&held_d)).unwrap();
        drop(held);
        let referenced = HashSet::from([kept_d.clone()]);
        let r = store.sweep_finish(store.sweep_begin().unwrap(), &referenced).await.unwrap();
        assert_eq!(r.layers, std::slice::from_ref(&gone_d));
        assert!(r.bytes > 0);
        assert!(matches!(store.open_layers(&[gone_d]), Err(ImageError::MissingLayer { .. })));
        // Still open by the run's VM: kept until it lets go.
        assert!(run.paths[0].is_file());
        drop(run);
        let r = store.sweep_finish(store.sweep_begin().unwrap(), &referenced).await.unwrap();
        assert_eq!(r.layers, [held_d]);
        assert!(store.open_layers(&[kept_d]).is_ok());
    }

    #[tokio::test]
    async fn a_layer_republished_during_a_sweep_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsLayerStore::open(dir.path()).unwrap();
        let orphan = layer_of(&store, "same bytes").await;
        let digest = orphan.digest.clone();
        drop(orphan);
        // The sweep begins with the orphan unpinned and reads the store before a persist
        // publishes the identical layer again and records its image.
        let sweep = store.sweep_begin().unwrap();
        let referenced_then = HashSet::new();
        let again = layer_of(&store, "same bytes").await;
        assert_eq!(again.digest, digest);
        drop(again);
        let r = store.sweep_finish(sweep, &referenced_then).await.unwrap();
        assert!(r.layers.is_empty(), "the new image's layer survives: {r:?}");
        assert!(store.open_layers(&[digest]).is_ok());
    }
}
