//! Storage bounds on the host: per-namespace quotas for image bytes (what the layers a
//! namespace's runs and imports introduced cost on disk) and upload bytes, a server-wide
//! free-space reserve below which persist, import and upload are refused, and grants for the
//! disk live runs' writable layers may fill, so tenants cannot fill the disk. The numbers come
//! from the stores (`LayerStore::stored_bytes`, the store's per-namespace sums, `statvfs`);
//! the rules live here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use boxwood_blob::BlobStore;
use boxwood_image::{CommitLimits, ImageError, LayerInfo, LayerStore, StagedLayer};
use boxwood_store::Store;
use boxwood_vm::MIN_SCRATCH_BYTES;
use serde::Deserialize;
use tokio::sync::OwnedMutexGuard;

use crate::error::{CoreError, CoreResult, error_chain};

/// `[core.quota]`: per-namespace storage quotas (bytes). Absent values are derived from the
/// size of the state dir's filesystem at start (see [`StorageRules::resolve`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaConfig {
    /// Disk a namespace's images may take: the layers its runs and imports introduced (erofs
    /// image + unpacked tree, allocated bytes; a layer counts once per namespace; the server's
    /// base image for nobody). Default: a quarter of the filesystem.
    pub image_bytes: Option<u64>,
    /// Sum of a namespace's uploads. Default: an eighth of the filesystem.
    pub upload_bytes: Option<u64>,
}

/// Largest default free-space reserve.
const DEFAULT_RESERVE_CAP: u64 = 2 << 30;
/// How often (in bytes streamed) an upload or export looks at the free space again.
const SPACE_CHECK_EVERY: u64 = 8 << 20;

/// The resolved bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageRules {
    pub image_bytes: u64,
    pub upload_bytes: u64,
    pub min_free_bytes: u64,
}

impl StorageRules {
    /// Configured values, else defaults from the filesystem's size: images ¼, uploads ⅛ (no
    /// single namespace can take the disk alone; the reserve stops the rest), the reserve 5 %
    /// but at most 2 GiB (enough for the database, logs and in-flight staging to go on).
    pub fn resolve(quota: &QuotaConfig, min_free_bytes: Option<u64>, total_bytes: u64) -> Self {
        Self {
            image_bytes: quota.image_bytes.unwrap_or(total_bytes / 4),
            upload_bytes: quota.upload_bytes.unwrap_or(total_bytes / 8),
            min_free_bytes: min_free_bytes.unwrap_or((total_bytes / 20).min(DEFAULT_RESERVE_CAP)),
        }
    }
}

/// Why storage was refused; the messages are what the client reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageRefusal {
    #[error(
        "the namespace's image storage quota is exhausted: {used} of {quota} bytes in use{}",
        needed_text(*needed)
    )]
    ImageQuota { used: u64, quota: u64, needed: Option<u64> },
    #[error("the namespace's upload storage quota is exhausted: {used} of {quota} bytes in use")]
    UploadQuota { used: u64, quota: u64 },
    #[error("the server is low on disk space (below its free-space reserve); try again later")]
    LowSpace,
}

fn needed_text(needed: Option<u64>) -> String {
    needed.map(|n| format!(", the new layer needs {n}")).unwrap_or_default()
}

impl From<StorageRefusal> for CoreError {
    fn from(r: StorageRefusal) -> Self {
        match r {
            StorageRefusal::LowSpace => CoreError::InsufficientStorage(r.to_string()),
            _ => CoreError::TooLarge(r.to_string()),
        }
    }
}

/// Held from a layer's publication until the image naming it is recorded: the namespace's
/// storage lock (its next persist sees this layer) and the layer's pin (a sweep keeps it).
pub(crate) struct PublishGuard {
    _storage: OwnedMutexGuard<()>,
    _pin: boxwood_image::LayerPin,
}

/// A layer ready to publish: a staging tree (a registry layer) or an image written from a
/// run's exported changes.
pub(crate) enum NewLayer {
    Tree(std::path::PathBuf),
    Staged(StagedLayer),
}

/// A layer that failed to publish: refused by a storage rule, or broken otherwise.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    #[error(transparent)]
    Refused(#[from] StorageRefusal),
    #[error("publishing the layer failed")]
    Failed(#[source] CoreError),
}

/// Uploads of one namespace being streamed, and bytes completed since the counters began.
#[derive(Debug, Default)]
struct UploadLedger {
    in_flight: u64,
    completed: u64,
}

/// The storage rules with what they need to measure.
pub(crate) struct Storage {
    rules: StorageRules,
    store: Arc<dyn Store>,
    layers: Arc<dyn LayerStore>,
    blobs: Arc<dyn BlobStore>,
    /// Held from measuring a namespace's usage until its new image is recorded, so two
    /// persists or imports of one namespace cannot both fit the same room.
    image_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    uploads: Mutex<HashMap<String, UploadLedger>>,
    /// Bytes granted to live runs' writable layers (scratch disks on the state's filesystem).
    scratch_granted: Mutex<u64>,
}

impl Storage {
    pub(crate) fn new(
        rules: StorageRules,
        store: Arc<dyn Store>,
        layers: Arc<dyn LayerStore>,
        blobs: Arc<dyn BlobStore>,
    ) -> Self {
        Self {
            rules,
            store,
            layers,
            blobs,
            image_locks: Mutex::default(),
            uploads: Mutex::default(),
            scratch_granted: Mutex::default(),
        }
    }

    pub(crate) fn layers(&self) -> &Arc<dyn LayerStore> {
        &self.layers
    }

    /// Disk the layers `namespace`'s images introduced take, each layer once.
    pub(crate) async fn image_usage(&self, namespace: &str) -> CoreResult<u64> {
        let mut total = 0u64;
        for digest in self.store.introduced_layers(namespace).await? {
            match self.layers.stored_bytes(&digest).await {
                Ok(n) => total = total.saturating_add(n),
                // A layer the store lost costs nothing; the run that needs it reports it.
                Err(e @ ImageError::MissingLayer { .. }) => {
                    tracing::warn!(layer = %digest, error = %e, "a recorded layer is missing");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(total)
    }

    /// Free space is above the reserve and above 1 MiB (for readiness: with the reserve off,
    /// a full disk still fails).
    pub(crate) fn above_reserve(&self) -> CoreResult<bool> {
        let space = self.layers.space()?;
        Ok(space.free_bytes >= self.rules.min_free_bytes.max(1 << 20))
    }

    /// Free space on the layers' filesystem is above the reserve.
    fn layers_have_room(&self) -> CoreResult<bool> {
        self.layers_have_room_for(0)
    }

    /// Whether `upcoming` more bytes can be written and leave the reserve free.
    fn layers_have_room_for(&self, upcoming: u64) -> CoreResult<bool> {
        if self.rules.min_free_bytes == 0 {
            return Ok(true);
        }
        let space = self.layers.space()?;
        Ok(space.free_bytes >= self.rules.min_free_bytes.saturating_add(upcoming))
    }

    /// Up front, before a persisting run or an import starts work: the reserve holds and the
    /// namespace has image quota left.
    pub(crate) async fn check_image_room(&self, namespace: &str) -> CoreResult<Result<(), StorageRefusal>> {
        if !self.layers_have_room()? {
            return Ok(Err(StorageRefusal::LowSpace));
        }
        let used = self.image_usage(namespace).await?;
        let quota = self.rules.image_bytes;
        Ok(if used >= quota { Err(StorageRefusal::ImageQuota { used, quota, needed: None }) } else { Ok(()) })
    }

    /// Publishes a staged layer for `namespace` if it fits the namespace's remaining image
    /// quota and leaves the reserve free. The guard must be held until the image that uses
    /// the layer is recorded (it holds the namespace's storage lock and the layer's pin).
    pub(crate) async fn publish_layer(
        &self,
        namespace: &str,
        layer: NewLayer,
    ) -> Result<(LayerInfo, PublishGuard), PublishError> {
        let lock = {
            let mut locks = self.image_locks.lock().unwrap_or_else(|e| e.into_inner());
            locks.entry(namespace.to_owned()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        let used = self.image_usage(namespace).await.map_err(PublishError::Failed)?;
        let quota = self.rules.image_bytes;
        let limits =
            CommitLimits { max_stored_bytes: quota.saturating_sub(used), min_free_bytes: self.rules.min_free_bytes };
        let committed = match layer {
            NewLayer::Tree(tree) => self.layers.commit_tree_limited(tree, limits).await,
            NewLayer::Staged(staged) => self.layers.commit_staged(staged, limits).await,
        };
        match committed {
            Ok(info) => {
                let pin = info.pin.clone();
                Ok((info, PublishGuard { _storage: guard, _pin: pin }))
            }
            Err(ImageError::OverBudget { needed, .. }) => {
                Err(StorageRefusal::ImageQuota { used, quota, needed: Some(needed) }.into())
            }
            Err(ImageError::LowSpace { .. }) => Err(StorageRefusal::LowSpace.into()),
            Err(e) => Err(PublishError::Failed(e.into())),
        }
    }

    /// A budget for a run's export: the tar and the data copied from the run's scratch disk
    /// may not take the reserve (checked every [`SPACE_CHECK_EVERY`] bytes) nor together
    /// pass `cap`.
    pub(crate) fn export_budget(self: &Arc<Self>, cap: u64) -> Arc<ExportBudget> {
        Arc::new(ExportBudget {
            storage: self.clone(),
            cap,
            checked_at: Mutex::new(0),
            stream: AtomicU64::new(0),
            disk: AtomicU64::new(0),
            low_space: AtomicBool::new(false),
        })
    }

    /// Starts charging an upload of `namespace` against its quota and the reserve; refuses
    /// at once when either is already exhausted.
    pub(crate) async fn begin_upload(self: &Arc<Self>, namespace: &str) -> CoreResult<UploadCharge> {
        if !self.blobs_have_room()? {
            return Err(StorageRefusal::LowSpace.into());
        }
        // The epoch is read before the stored sum: an upload finishing in between is counted
        // twice (never zero times) until this one ends.
        let epoch = self.upload_ledger(namespace, |l| l.completed);
        let stored = self.store.namespace_upload_bytes(namespace).await?;
        let charge = UploadCharge {
            storage: self.clone(),
            namespace: namespace.to_owned(),
            stored,
            epoch,
            state: Mutex::new(ChargeState::default()),
        };
        let used = charge.used_by_others();
        if used >= self.rules.upload_bytes {
            return Err(StorageRefusal::UploadQuota { used, quota: self.rules.upload_bytes }.into());
        }
        Ok(charge)
    }

    fn blobs_have_room(&self) -> CoreResult<bool> {
        if self.rules.min_free_bytes == 0 {
            return Ok(true);
        }
        let space = self.blobs.space().map_err(|e| CoreError::Internal(error_chain(&e)))?;
        Ok(space.free_bytes >= self.rules.min_free_bytes)
    }

    fn upload_ledger<T>(&self, namespace: &str, f: impl FnOnce(&mut UploadLedger) -> T) -> T {
        let mut map = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        f(map.entry(namespace.to_owned()).or_default())
    }
}

/// [`boxwood_vm::ExportBudget`] of a persisting run, also charged for what the unpack copies
/// from the scratch disk ([`Self::admit_disk`]): the stream and the disk fill the same host
/// disk.
pub(crate) struct ExportBudget {
    storage: Arc<Storage>,
    cap: u64,
    checked_at: Mutex<u64>,
    /// Bytes of tar stream so far, and bytes to be copied from the disk.
    stream: AtomicU64,
    disk: AtomicU64,
    low_space: AtomicBool,
}

impl ExportBudget {
    /// Whether the export was stopped by the free-space reserve.
    pub(crate) fn hit_reserve(&self) -> bool {
        self.low_space.load(Ordering::SeqCst)
    }

    /// Bytes copied from the scratch disk so far.
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.disk.load(Ordering::SeqCst)
    }

    /// `total` bytes are to be copied from the scratch disk so far. A file's copy comes in
    /// one piece, so the space it takes is looked for before it starts.
    pub(crate) fn admit_disk(&self, total: u64) -> Result<(), String> {
        let before = self.disk.swap(total, Ordering::SeqCst);
        self.check(total.saturating_sub(before))
    }

    /// Checks the totals against the cap and, every [`SPACE_CHECK_EVERY`] bytes or before
    /// `upcoming` bytes are written at once, the free space against the reserve.
    fn check(&self, upcoming: u64) -> Result<(), String> {
        let total = self.stream.load(Ordering::SeqCst).saturating_add(self.disk.load(Ordering::SeqCst));
        if total > self.cap {
            return Err(format!("the changes exceed {} bytes", self.cap));
        }
        let mut checked_at = self.checked_at.lock().unwrap_or_else(|e| e.into_inner());
        if total >= *checked_at || upcoming > SPACE_CHECK_EVERY {
            *checked_at = total.saturating_add(SPACE_CHECK_EVERY);
            match self.storage.layers_have_room_for(upcoming) {
                Ok(true) => {}
                Ok(false) => {
                    self.low_space.store(true, Ordering::SeqCst);
                    return Err(StorageRefusal::LowSpace.to_string());
                }
                Err(e) => {
                    // The chain names the store's paths: the log has it, the client a summary.
                    tracing::error!(error = %error_chain(&e), "cannot check the host's free space");
                    return Err("cannot check the host's free space (see the server log)".into());
                }
            }
        }
        Ok(())
    }
}

impl boxwood_vm::ExportBudget for ExportBudget {
    fn admit(&self, total: u64) -> Result<(), String> {
        self.stream.store(total, Ordering::SeqCst);
        self.check(0)
    }
}

/// How much of the host's disk a run's writable layer may be given: what it asked for, within
/// the free space that neither the reserve nor other live runs' layers already hold. `0`: too
/// little is left for a disk (the VM runtime's smallest, [`MIN_SCRATCH_BYTES`]).
fn scratch_share(wanted: u64, free: u64, reserve: u64, granted: u64) -> u64 {
    let room = free.saturating_sub(reserve).saturating_sub(granted);
    let share = wanted.min(room);
    if share >= MIN_SCRATCH_BYTES.min(wanted) { share } else { 0 }
}

/// A live run's claim on the disk its writable layer may fill, released when dropped.
pub(crate) struct ScratchGrant {
    storage: Arc<Storage>,
    /// `0`: no room on the host's disk; the layer lives in the guest's RAM.
    pub bytes: u64,
}

impl Drop for ScratchGrant {
    fn drop(&mut self) {
        let mut granted = self.storage.scratch_granted.lock().unwrap_or_else(|e| e.into_inner());
        *granted = granted.saturating_sub(self.bytes);
    }
}

impl Storage {
    /// Grants a run's writable layer up to `wanted` bytes of the host's disk. Each VM's
    /// scratch disk is as large as its grant, and grants never add up past the free space
    /// above the reserve, so runs writing all they may cannot fill the host's disk. A run
    /// gets less than it asked for when the disk is short (it sees ENOSPC sooner), and none
    /// below the reserve (its layer is then bounded by the guest's RAM, as a tmpfs).
    pub(crate) fn grant_scratch(self: &Arc<Self>, wanted: u64) -> CoreResult<ScratchGrant> {
        let free = self.layers.space()?.free_bytes;
        let mut granted = self.scratch_granted.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = scratch_share(wanted, free, self.rules.min_free_bytes, *granted);
        *granted += bytes;
        Ok(ScratchGrant { storage: self.clone(), bytes })
    }
}

#[derive(Debug, Default)]
struct ChargeState {
    charged: u64,
    next_space_check: u64,
    refused: Option<StorageRefusal>,
}

/// One upload's claim on its namespace's quota, released when dropped (kept as completed
/// after [`UploadCharge::complete`]).
pub(crate) struct UploadCharge {
    storage: Arc<Storage>,
    namespace: String,
    /// The namespace's stored uploads when this one began.
    stored: u64,
    epoch: u64,
    state: Mutex<ChargeState>,
}

impl UploadCharge {
    /// What the namespace's other uploads take: stored, finished since, and in flight.
    fn used_by_others(&self) -> u64 {
        let mine = self.state.lock().unwrap_or_else(|e| e.into_inner()).charged;
        self.storage.upload_ledger(&self.namespace, |l| {
            self.stored.saturating_add(l.completed - self.epoch).saturating_add(l.in_flight - mine)
        })
    }

    /// Claims `n` more bytes; `Err` when they would pass the quota or the reserve is reached.
    pub(crate) fn admit(&self, n: u64) -> Result<(), StorageRefusal> {
        let quota = self.storage.rules.upload_bytes;
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = &st.refused {
            return Err(r.clone());
        }
        let refusal = self.storage.upload_ledger(&self.namespace, |l| {
            let others = self.stored.saturating_add(l.completed - self.epoch).saturating_add(l.in_flight - st.charged);
            if others.saturating_add(st.charged).saturating_add(n) > quota {
                return Some(StorageRefusal::UploadQuota { used: others, quota });
            }
            l.in_flight += n;
            None
        });
        if let Some(r) = refusal {
            st.refused = Some(r.clone());
            return Err(r);
        }
        st.charged += n;
        if st.charged >= st.next_space_check {
            st.next_space_check = st.charged.saturating_add(SPACE_CHECK_EVERY);
            if !self.storage.blobs_have_room().unwrap_or(false) {
                st.refused = Some(StorageRefusal::LowSpace);
                return Err(StorageRefusal::LowSpace);
            }
        }
        Ok(())
    }

    /// Why the upload was refused, if it was.
    pub(crate) fn refusal(&self) -> Option<StorageRefusal> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).refused.clone()
    }

    /// The upload is recorded: its bytes stay counted until the next uploads read the store.
    pub(crate) fn complete(self) {
        let charged = std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).charged);
        self.storage.upload_ledger(&self.namespace, |l| {
            l.in_flight -= charged;
            l.completed += charged;
        });
    }
}

impl Drop for UploadCharge {
    fn drop(&mut self) {
        let charged = std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).charged);
        if charged > 0 {
            self.storage.upload_ledger(&self.namespace, |l| l.in_flight -= charged);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_filesystem_and_configured_values_win() {
        let fs = 400 << 30;
        let rules = StorageRules::resolve(&QuotaConfig::default(), None, fs);
        assert_eq!(rules, StorageRules { image_bytes: 100 << 30, upload_bytes: 50 << 30, min_free_bytes: 2 << 30 });
        // a small disk keeps 5 % free
        assert_eq!(StorageRules::resolve(&QuotaConfig::default(), None, 10 << 30).min_free_bytes, 512 << 20);
        let set = QuotaConfig { image_bytes: Some(7), upload_bytes: Some(8) };
        assert_eq!(
            StorageRules::resolve(&set, Some(0), fs),
            StorageRules { image_bytes: 7, upload_bytes: 8, min_free_bytes: 0 }
        );
    }

    #[test]
    fn writable_layers_share_the_free_space_above_the_reserve() {
        const G: u64 = 1 << 30;
        // Plenty of room: what was asked for.
        assert_eq!(scratch_share(12 * G, 100 * G, 2 * G, 0), 12 * G);
        // Other live layers and the reserve come first.
        assert_eq!(scratch_share(12 * G, 30 * G, 2 * G, 24 * G), 4 * G);
        // Too little left: no disk, unless the run asked for less than the minimum anyway.
        assert_eq!(scratch_share(12 * G, 3 * G, 2 * G, G - (8 << 20)), 0);
        assert_eq!(scratch_share(4 << 20, 2 * G + (5 << 20), 2 * G, 0), 4 << 20);
        assert_eq!(scratch_share(12 * G, G, 2 * G, 0), 0, "below the reserve already");
    }

    #[test]
    fn refusals_map_to_the_clients_statuses_and_say_what_is_full() {
        let quota = CoreError::from(StorageRefusal::ImageQuota { used: 5, quota: 4, needed: Some(3) });
        assert!(
            matches!(quota, CoreError::TooLarge(ref m) if m.contains("image storage quota") && m.contains("needs 3"))
        );
        let upload = CoreError::from(StorageRefusal::UploadQuota { used: 1, quota: 1 });
        assert!(matches!(upload, CoreError::TooLarge(ref m) if m.contains("upload storage quota")));
        assert!(matches!(CoreError::from(StorageRefusal::LowSpace), CoreError::InsufficientStorage(_)));
    }
}
