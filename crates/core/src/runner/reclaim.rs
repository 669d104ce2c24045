//! Layers in use and layers no image names any more. Runs and views pin the layers they
//! open ([`RunEnv::open_image_layers`]); a sweep ([`RunEnv::reclaim_layers`]) removes the
//! layer files no image references and nothing pins: the diff layers a compaction replaced,
//! and leftovers of a crash between publishing a layer and recording its image.

use boxwood_image::{ImageError, PinnedLayers, Reclaimed};
use boxwood_store::ImageRecord;

use super::RunEnv;
use crate::error::{CoreError, CoreResult};

impl RunEnv {
    /// Pins and opens `image`'s layers. If one is gone, a compaction replaced the image's
    /// layers (and a sweep took the old ones) since the record was read: the record is read
    /// again, and `image` updated, once.
    pub(crate) async fn open_image_layers(&self, image: &mut ImageRecord) -> CoreResult<PinnedLayers> {
        match self.layers.open_layers(&image.layers) {
            Err(ImageError::MissingLayer { .. }) => {
                let fresh = self
                    .store
                    .get_image(image.uuid)
                    .await?
                    .ok_or_else(|| CoreError::NotFound(format!("image {}", image.uuid)))?;
                image.layers = fresh.layers;
                Ok(self.layers.open_layers(&image.layers)?)
            }
            other => Ok(other?),
        }
    }

    /// Removes the layers no image references and no one pins; one sweep at a time.
    pub(crate) async fn reclaim_layers(&self) -> CoreResult<Reclaimed> {
        let _one = self.sweeping.lock().await;
        let sweep = self.layers.sweep_begin()?;
        let referenced = self.store.referenced_layers().await?;
        let reclaimed = self.layers.sweep_finish(sweep, &referenced).await?;
        if !reclaimed.layers.is_empty() {
            crate::metrics::layers_reclaimed(reclaimed.layers.len(), reclaimed.bytes);
            tracing::info!(layers = reclaimed.layers.len(), bytes = reclaimed.bytes, "removed unreferenced layers");
        }
        Ok(reclaimed)
    }
}
