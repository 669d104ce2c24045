//! Saving a run's filesystem changes as a new image: the guest streams its overlay upper
//! directory (the diff) as a tar, the host unpacks it as it arrives straight into a new layer
//! image on top of the source image's stack. Costs the changed bytes, written once; the
//! source image is never copied.

use std::collections::BTreeMap;
use std::sync::Arc;

use boxwood_image::{ScratchDisk, UnpackLimits};
use boxwood_store::ImageRecord;
use boxwood_vm::Vm;
use uuid::Uuid;

use super::{MAX_LAYER_DISKS, Run, RunEnv};
use crate::clock::now_us;
use crate::error::{error_chain, out_of_space, reported};
use crate::quota::{NewLayer, PublishError, StorageRefusal};

/// Export slack for tar headers and padding beyond `max_layer_bytes` (at least this much,
/// or a quarter of the cap).
const TAR_OVERHEAD_BYTES: u64 = 16 << 20;
/// The export pipe's size: the agent's largest chunk.
const EXPORT_PIPE_BYTES: usize = 1 << 20;

impl Run {
    /// Saves the run's changes; returns the result image (the source image when nothing
    /// changed) and the bytes written. `Err` is the operation's failure message.
    pub(super) async fn persist(&mut self, vm: &dyn Vm, env: &Arc<RunEnv>) -> Result<(Uuid, i64), String> {
        // The chain says what the tenant can act on (the layer limit, a refused member, named
        // inside the image); a host I/O error names host paths, so it goes to the log under
        // an error id instead.
        let fail = |what: &str, e: &(dyn std::error::Error + 'static)| {
            let shown = format!("saving the result image failed: {what}");
            if names_host_paths(e) { reported(&shown, e) } else { format!("{shown}: {}", error_chain(e)) }
        };
        self.persist_in(vm, env).await.map_err(|(what, e)| match e.downcast_ref::<StorageRefusal>() {
            // A storage rule is the client's to act on: said plainly, without the chain.
            Some(refusal) => format!("{refusal}; the run's changes were not kept"),
            None if out_of_space(e.as_ref()) => {
                tracing::warn!(op = %self.op.uuid, error = %error_chain(e.as_ref()), "persist: the disk is full");
                "saving the result image failed: the server's disk is full; the run's changes were not kept".into()
            }
            None => fail(what, e.as_ref()),
        })
    }

    async fn persist_in(
        &mut self,
        vm: &dyn Vm,
        env: &Arc<RunEnv>,
    ) -> Result<(Uuid, i64), (&'static str, Box<dyn std::error::Error + Send + Sync>)> {
        let t0 = std::time::Instant::now();
        // The host counts the tar itself (the guest is not trusted): the data cannot exceed
        // the writable layer's cap, plus room for tar headers of many small files.
        let max_layer = self.spec.max_layer_bytes;
        let budget = max_layer.saturating_add((max_layer / 4).max(TAR_OVERHEAD_BYTES));
        let budget = env.storage.export_budget(budget);
        // The tar is unpacked as it arrives, through a pipe: never stored, and the unpack
        // keeps pace with the export instead of following it.
        let (reader, writer) = std::io::pipe().map_err(|e| ("exporting changes", e.into()))?;
        // As large as an export chunk, so each chunk is one write and one read rather than
        // sixteen of each through the default 64 KiB (which cost the host a third more CPU
        // per byte, on two cores shared with the guest). Best effort: the default works.
        if let Err(e) = rustix::pipe::fcntl_setpipe_size(&writer, EXPORT_PIPE_BYTES) {
            tracing::debug!(error = %e, "export pipe keeps its default size");
        }
        let mut pipe = tokio::net::unix::pipe::Sender::from_owned_fd(writer.into())
            .map_err(|e| ("exporting changes", e.into()))?;
        let layers = env.layers.clone();
        // Large files on the scratch disk come as extents of it, copied by the host from its
        // own handle: the bytes never cross the guest channel.
        let disk = vm.scratch_disk().map_err(|e| ("exporting changes", e.into()))?.map(|file| {
            let budget = budget.clone();
            ScratchDisk { file, admit: Box::new(move |total| budget.admit_disk(total)) }
        });
        // Errors stay typed (an `ImageError` names host paths: `names_host_paths`).
        let unpacking = tokio::task::spawn_blocking(move || -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let mut reader = reader;
            // The guest's disk already stopped it at the cap; the host checks again, on data
            // (holes stay holes in the image and merges).
            let staged = layers.stage_tar(&mut reader, UnpackLimits { max_data_bytes: max_layer }, disk)?;
            // What follows the archive's end (its padding) is read too, so the export's last
            // writes find a reader.
            std::io::copy(&mut reader, &mut std::io::sink())?;
            Ok(staged)
        });
        let exported = vm.export_upper(&mut pipe, budget.as_ref()).await;
        let exported_at = t0.elapsed();
        drop(pipe);
        let unpacked = unpacking.await.map_err(|e| ("unpacking changes", e.into()))?;
        // A refused member or the layer limit ends the unpack, and with it the export (its
        // writes find no reader): then the unpack's error is the cause. An export that fails
        // by itself leaves the unpack a cut-off archive: then the export's is.
        // What the host unpacked counts, not what the agent says it sent.
        let unpacked = match (exported, unpacked) {
            (Ok(stream), Ok(unpacked)) => {
                tracing::debug!(
                    export_ms = exported_at.as_secs_f64() * 1e3,
                    stream_bytes = stream.tar_bytes,
                    disk_bytes = budget.disk_bytes(),
                    "persist export"
                );
                unpacked
            }
            // The reserve stops either side (the stream or the copy from the disk).
            (_, Err(_)) if budget.hit_reserve() => {
                return Err(("unpacking changes", Box::new(StorageRefusal::LowSpace)));
            }
            (Ok(_), Err(e)) => return Err(("unpacking changes", e)),
            (Err(boxwood_vm::VmError::Io { source, .. }), Err(e))
                if source.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                return Err(("unpacking changes", e));
            }
            (Err(e), _) => {
                let e: Box<dyn std::error::Error + Send + Sync> =
                    if budget.hit_reserve() { Box::new(StorageRefusal::LowSpace) } else { e.into() };
                return Err(("exporting changes", e));
            }
        };
        let unpacked_at = t0.elapsed();
        let source = &self.image;
        let env_vars = if self.spec.preserve_env { self.merged_env() } else { source.env.clone() };
        let workdir =
            if self.spec.preserve_cwd { Some(self.spec.process.plan(source).cwd) } else { source.workdir.clone() };
        if unpacked.stats.entries == 0 && env_vars == source.env && workdir == source.workdir {
            return Ok((source.uuid, 0));
        }
        let mut layers = source.layers.clone();
        let mut written = 0i64;
        // Held until the image is recorded, so the namespace's next persist sees this layer.
        let mut quota_guard = None;
        let stats = unpacked.stats;
        if stats.entries > 0 {
            let (layer, guard) =
                env.storage.publish_layer(&self.op.namespace, NewLayer::Staged(unpacked)).await.map_err(
                    |e| match e {
                        PublishError::Refused(r) => ("publishing the layer", r.into()),
                        PublishError::Failed(e) => ("publishing the layer", e.into()),
                    },
                )?;
            quota_guard = Some(guard);
            tracing::debug!(
                export_and_unpack_ms = unpacked_at.as_secs_f64() * 1e3,
                publish_ms = (t0.elapsed() - unpacked_at).as_secs_f64() * 1e3,
                entries = stats.entries,
                bytes = stats.content_bytes,
                "persist phases"
            );
            layers.insert(0, layer.digest);
            written = i64::try_from(stats.content_bytes).unwrap_or(i64::MAX);
        }
        let image = ImageRecord {
            uuid: Uuid::now_v7(),
            namespace: self.op.namespace.clone(),
            parent_uuid: Some(source.uuid),
            operation_uuid: Some(self.op.uuid),
            layers,
            env: env_vars,
            workdir,
            size_bytes: source.size_bytes.saturating_add(written),
            created_at_us: now_us(),
        };
        env.store.insert_image(&image).await.map_err(|e| ("recording the image", e.into()))?;
        drop(quota_guard);
        if image.layers.len() > MAX_LAYER_DISKS {
            env.compact_in_background(image.uuid);
        }
        Ok((image.uuid, written))
    }

    /// `preserve_env`: the image env with the request env on top; an empty or null value
    /// removes the variable.
    fn merged_env(&self) -> BTreeMap<String, String> {
        let mut env = self.image.env.clone();
        for (k, v) in &self.spec.process.env {
            match v.as_deref() {
                Some(v) if !v.is_empty() => env.insert(k.clone(), v.to_owned()),
                _ => env.remove(k),
            };
        }
        env
    }
}

/// Whether `e` or one of its sources is a layer store error that names host paths (an I/O
/// error, or an image the store wrote that it could not lay out).
fn names_host_paths(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        use boxwood_image::ImageError;
        if matches!(err.downcast_ref(), Some(ImageError::Io { .. } | ImageError::InvalidTree { .. })) {
            return true;
        }
        next = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxwood_image::ImageError;

    #[test]
    fn host_io_errors_are_told_by_id_and_layer_limits_in_words() {
        let io = ImageError::Io { path: "/var/lib/boxwood/images/tmp/x".into(), source: std::io::Error::other("full") };
        assert!(names_host_paths(&io));
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(io);
        assert!(names_host_paths(boxed.as_ref()));
        assert!(!names_host_paths(&ImageError::LayerTooLarge { limit: 5 }));
    }
}
