//! Keeping layer stacks shallow. A VM can mount at most [`MAX_LAYER_DISKS`] layers, and deep
//! overlay stacks slow every lookup, so once a persisted image's stack reaches [`COMPACT_AT`]
//! layers, its diff layers (all but the bottom one, the imported or base rootfs) are merged
//! into one in the background. The image keeps its UUID and content; only its layer list
//! changes. Merging costs the size of the diffs, never of the base.

use std::sync::Arc;

use boxwood_image::{CommitLimits, merge_layers};
use uuid::Uuid;

use super::{MAX_LAYER_DISKS, RunEnv};
use crate::error::{CoreError, CoreResult};

/// Stack depth at which a new image is compacted in the background (left below
/// [`MAX_LAYER_DISKS`] so chained runs rarely wait for it).
pub(crate) const COMPACT_AT: usize = 4;

const _: () = assert!(COMPACT_AT <= MAX_LAYER_DISKS);

impl RunEnv {
    /// Merges the image's diff layers into one now (waiting for a compaction of the same
    /// image already under way) and returns the new layer list.
    pub(crate) async fn compact_now(&self, image: Uuid) -> CoreResult<Vec<String>> {
        let lock = {
            let mut map = self.compacting.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(image).or_default().clone()
        };
        let _guard = lock.lock().await;
        let result = self.compact_locked(image).await;
        self.compacting.lock().unwrap_or_else(|e| e.into_inner()).remove(&image);
        result
    }

    async fn compact_locked(&self, image: Uuid) -> CoreResult<Vec<String>> {
        let record = self.store.get_image(image).await?.ok_or_else(|| CoreError::NotFound(format!("image {image}")))?;
        if record.layers.len() <= 2 {
            return Ok(record.layers);
        }
        let (diffs, bottom) = record.layers.split_at(record.layers.len() - 1);
        let pinned = self.layers.open_layers(diffs)?;
        let disks = pinned.paths.clone();
        let out = self.layers.staging_dir()?;
        let merged = out.join("merged.erofs");
        let target = merged.clone();
        let merging = tokio::task::spawn_blocking(move || {
            let refs: Vec<&std::path::Path> = disks.iter().map(|d| d.as_path()).collect();
            merge_layers(&refs, &target, true)
        });
        let layer = match merging.await {
            Ok(Ok(content_bytes)) => self.layers.commit_image(merged, content_bytes, CommitLimits::NONE).await,
            Ok(Err(e)) => Err(e),
            Err(e) => Err(boxwood_image::ImageError::Io { path: out.clone(), source: std::io::Error::other(e) }),
        };
        let _ = tokio::fs::remove_dir_all(&out).await;
        drop(pinned);
        let layer = layer?;
        let layers = vec![layer.digest.clone(), bottom[0].clone()];
        self.store.set_image_layers(image, &layers).await?;
        drop(layer);
        tracing::info!(%image, from = record.layers.len(), "compacted the image's diff layers");
        // The diffs it replaced are no one's now, unless another image shares them.
        if let Err(e) = self.reclaim_layers().await {
            tracing::warn!(error = %crate::error::error_chain(&e), "sweeping layers after a compaction failed");
        }
        Ok(layers)
    }

    /// Compacts `image` soon, without holding up the run that made it.
    pub(crate) fn compact_in_background(self: &Arc<Self>, image: Uuid) {
        let env = self.clone();
        self.background.spawn(async move {
            if let Err(e) = env.compact_now(image).await {
                tracing::warn!(%image, error = %crate::error::error_chain(&e), "background compaction failed");
            }
        });
    }
}
