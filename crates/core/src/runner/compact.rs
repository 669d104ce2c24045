//! Keeping layer stacks within a VM's disks without copying a chain over and over. A VM can
//! mount at most [`MAX_LAYER_DISKS`] layers, so an image whose stack is deeper (a persisted
//! run's diff on a parent that already had that many) gets some of its top layers merged into
//! one in the background; runs from it wait for that. Which ones is a size-tiered choice, as
//! in an LSM tree ([`merge_plan`]): the new diff and the layers above the first one at least
//! [`TIER_RATIO`] times bigger than all of them. The big layers at the bottom of a long chain
//! are then merged rarely, and a child's stack shares all of its parent's layers but the few
//! merged. The image keeps its UUID and content; only its layer list changes. The bottom
//! layer (the imported or base rootfs) is never merged.

use std::sync::Arc;

use boxwood_image::{CommitLimits, merge_layers};
use uuid::Uuid;

use super::{MAX_LAYER_DISKS, RunEnv};
use crate::error::{CoreError, CoreResult};

/// How much bigger than the layers merged into it the layer below a merge must be. 2: layer
/// sizes grow at least geometrically down the stack, so a byte is merged again only when the
/// layers above it have grown to its layer's size. Modelled on a chain of equal diffs (see
/// the tests), with 16 disks this costs 1.0x the diffs at 10 steps, 2.6x at 100 and 4.7x at
/// 1000, where merging all diffs every other step (what this did before) costs 3x, 25x and
/// 250x.
const TIER_RATIO: u64 = 2;

/// Which top layers of a stack of diff layers (`sizes`, top first, the bottom layer not
/// included) to merge so that at most `max_diffs` remain: `Some(n)` merges the top `n`,
/// `None` leaves the stack alone.
pub(crate) fn merge_plan(sizes: &[u64], max_diffs: usize) -> Option<usize> {
    if sizes.len() <= max_diffs {
        return None;
    }
    let least = sizes.len() + 1 - max_diffs.max(1);
    let mut n = least.max(2);
    while n < sizes.len() && sizes[..n].iter().sum::<u64>().saturating_mul(TIER_RATIO) > sizes[n] {
        n += 1;
    }
    Some(n.min(sizes.len()))
}

impl RunEnv {
    /// Merges the image's top layers as [`merge_plan`] says now (waiting for a compaction of
    /// the same image already under way) and returns the new layer list.
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
        let diffs = &record.layers[..record.layers.len().saturating_sub(1)];
        let mut sizes = Vec::with_capacity(diffs.len());
        for digest in diffs {
            sizes.push(self.layers.stored_bytes(digest).await?);
        }
        let Some(count) = merge_plan(&sizes, MAX_LAYER_DISKS - 1) else { return Ok(record.layers) };
        let (top, below) = record.layers.split_at(count);
        let pinned = self.layers.open_layers(top)?;
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
        let layers: Vec<String> = std::iter::once(layer.digest.clone()).chain(below.iter().cloned()).collect();
        self.store.set_image_layers(image, &layers).await?;
        drop(layer);
        tracing::info!(%image, from = record.layers.len(), to = layers.len(), merged = count, "compacted the image's top layers");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stack_within_the_disks_is_left_alone_and_a_deeper_one_merged_by_tiers() {
        assert_eq!(merge_plan(&[], 5), None);
        assert_eq!(merge_plan(&[1, 1, 1, 1, 1], 5), None);
        // the new diff and the equal layers below it, up to one at least twice their sum
        assert_eq!(merge_plan(&[1, 1, 1, 8, 16, 32], 5), Some(3));
        assert_eq!(merge_plan(&[1, 1, 4, 16, 64, 256], 5), Some(2), "never fewer than two");
        assert_eq!(merge_plan(&[1, 2, 4, 8, 16, 32], 5), Some(6), "each layer under twice the ones above");
        assert_eq!(merge_plan(&[5, 1, 1, 1, 1, 1], 5), Some(6), "nothing below is big enough");
        assert_eq!(merge_plan(&[1; 8], 5), Some(8));
        assert_eq!(merge_plan(&[1, 1, 1, 1, 100, 100, 100, 100], 5), Some(4), "as many as it takes to fit");
    }

    /// Disk a chain of `steps` persisted runs takes, each writing a new file of one unit on
    /// the previous one's result, in units per step: each image keeps the layer its own
    /// compaction made (or its diff), and shares the rest with its parent.
    fn chain_cost(steps: u64) -> f64 {
        let mut stack: Vec<u64> = Vec::new();
        let mut total = 0;
        for _ in 0..steps {
            stack.insert(0, 1);
            if let Some(n) = merge_plan(&stack, MAX_LAYER_DISKS - 1) {
                let merged = stack.drain(..n).sum();
                stack.insert(0, merged);
            }
            assert!(stack.len() < MAX_LAYER_DISKS, "{stack:?}");
            total += stack[0];
        }
        total as f64 / steps as f64
    }

    #[test]
    fn a_long_chain_costs_a_small_multiple_of_its_diffs() {
        let costs: Vec<f64> = [10, 100, 1000].into_iter().map(chain_cost).collect();
        assert!(costs[0] <= 1.05, "{costs:?}");
        assert!(costs[1] <= 3.0, "{costs:?}");
        assert!(costs[2] <= 5.0, "{costs:?}");
    }
}
