//! Image layers on the host. An image is a stack of immutable layers (topmost first); each
//! layer is one file under the store root:
//!
//! ```text
//! <root>/layers/<sha256>.erofs   the layer as a read-only erofs image, attached to VMs as a
//!                                virtio-blk disk and stacked with overlayfs in the guest,
//!                                read in place by host-side inspection and merging
//!                                ([`erofs::ErofsImage`]); named by the sha256 of the file
//! <root>/tmp/                    staging; on the same filesystem, so publishing is a rename
//! ```
//! A layer becomes visible only by `rename` of a fully written, fsynced file, so a crash
//! leaves either the whole layer or stray staging files that start-up removes.
//!
//! A run's changes (the layer tar the guest agent exports) are unpacked straight into an erofs
//! image in staging as they arrive ([`unpack_layer_from`], [`LayerStore::stage_tar`]): the
//! guest's files never become host files. A registry layer is written from an inert staging
//! tree (see [`inert`]: only 0700 dirs and 0600 files, the image's metadata kept as data)
//! that is removed once its erofs image is published; [`merge_layers`] writes one straight
//! from other layers' images (squashing a stack with overlayfs semantics).

mod base;
pub mod erofs;
mod fsutil;
pub mod inert;
mod inspect;
mod merge;
mod pins;
pub mod sparse;
mod store;
pub mod tarname;
mod unpack;
mod usage;

pub use base::build_busybox_tree;
pub use inspect::{
    DirectoryList, Entry, FileItem, GrepCase, GrepLineKind, GrepMatch, GrepRequest, GrepResult, GrepSubmatch,
    ImageView, format_listing,
};
pub use merge::merge_layers;
pub use pins::{LayerPin, Sweep};
pub use store::{FsLayerStore, LayerInfo, StagedLayer};
pub use unpack::{ScratchDisk, UnpackLimits, UnpackStats, unpack_layer_from};
pub use usage::{CommitLimits, DiskSpace, disk_space};

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// Why a layer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("i/o error on {path}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("layer {digest} is missing from the store")]
    MissingLayer { digest: String },
    #[error("invalid layer digest {0:?}")]
    BadDigest(String),
    /// A layer tar member that cannot be unpacked safely (escapes the tree, bad link, …).
    #[error("refusing layer member {member:?}: {reason}")]
    BadLayer { member: String, reason: String },
    /// The layer's regular files hold more data than allowed (holes do not count).
    #[error("the changes exceed the {limit}-byte layer limit")]
    LayerTooLarge { limit: u64 },
    /// The caller's budget stopped an unpack (see [`ScratchDisk::admit`]).
    #[error("{reason}")]
    Refused { reason: String },
    /// Publishing would cost more disk than [`CommitLimits::max_stored_bytes`]; nothing was
    /// published.
    #[error("the layer needs {needed} bytes on disk, {allowed} allowed")]
    OverBudget { needed: u64, allowed: u64 },
    /// Publishing would leave less free space than [`CommitLimits::min_free_bytes`]; nothing
    /// was published.
    #[error("the layer would leave less than {reserve} bytes free on the host")]
    LowSpace { reserve: u64 },
    /// A published layer file that does not read as the erofs image it should be.
    #[error("corrupt layer image {path}: {reason}")]
    CorruptLayer { path: PathBuf, reason: String },
    /// A tree argument that is not what the operation needs (e.g. a non-empty target).
    #[error("invalid tree {path}: {reason}")]
    InvalidTree { path: PathBuf, reason: String },
    /// Inspection: no such entry in the image (a missing name, a dangling symlink, a parent
    /// that is not a directory). HTTP 404.
    #[error("{path}: no such file or directory in the image")]
    NotFound { path: String },
    /// Inspection: the entry exists but is not a directory (listing a file). HTTP 422.
    #[error("{path}: not a directory")]
    NotDirectory { path: String },
    /// Inspection: the entry exists but is not a regular file (downloading a directory), or
    /// not a regular file nor a directory (archiving a FIFO). HTTP 422.
    #[error("{path}: not a regular file")]
    NotRegular { path: String },
    /// Inspection: more than 40 symlinks followed while resolving (a loop). HTTP 422.
    #[error("{path}: too many levels of symbolic links")]
    SymlinkLoop { path: String },
    /// Inspection: a malformed request (bad path, pattern, glob or limit). HTTP 400.
    #[error("invalid request: {0}")]
    BadRequest(String),
}

pub type ImageResult<T> = Result<T, ImageError>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_owned(), source }
}

/// Where layers live; the core sees only this.
#[async_trait]
pub trait LayerStore: Send + Sync {
    /// The erofs disk images of `digests`, pinned (not removed by a sweep) while the pin is
    /// held: keep it until the files are open (a VM has its disks, a view its files).
    /// [`ImageError::MissingLayer`] if one is gone.
    fn open_layers(&self, digests: &[String]) -> ImageResult<PinnedLayers>;
    /// A fresh staging directory on the store's filesystem, for building a layer tree.
    fn staging_dir(&self) -> ImageResult<PathBuf>;
    /// Turns a staged tree into a published layer (its erofs image), consuming the tree.
    async fn commit_tree(&self, tree: PathBuf) -> ImageResult<LayerInfo> {
        self.commit_tree_limited(tree, CommitLimits::NONE).await
    }
    /// [`Self::commit_tree`] within `limits`: the layer is measured (the tree, then the
    /// written erofs image) before it is published; past a limit it is discarded with
    /// [`ImageError::OverBudget`] or [`ImageError::LowSpace`] and the tree is left to the caller.
    async fn commit_tree_limited(&self, tree: PathBuf, limits: CommitLimits) -> ImageResult<LayerInfo>;
    /// Unpacks a layer tar (a run's exported changes, read as they arrive) straight into a
    /// new erofs image in staging, within `limits` (see [`unpack_layer_from`]). Blocking: call
    /// it off the async runtime.
    fn stage_tar(
        &self,
        tar: &mut dyn std::io::Read,
        limits: UnpackLimits,
        disk: Option<unpack::ScratchDisk>,
    ) -> ImageResult<StagedLayer>;
    /// Publishes a staged layer within `limits`, measured like [`Self::commit_image`]; past
    /// them (or on any error) it is discarded.
    async fn commit_staged(&self, staged: StagedLayer, limits: CommitLimits) -> ImageResult<LayerInfo> {
        let content_bytes = staged.stats.content_bytes;
        self.commit_image(staged.into_path(), content_bytes, limits).await
    }
    /// Publishes an erofs image written in a staging directory (a [`merge_layers`] result
    /// holding `content_bytes` of file data) within `limits`, consuming the file.
    async fn commit_image(&self, image: PathBuf, content_bytes: u64, limits: CommitLimits) -> ImageResult<LayerInfo>;
    /// What a published layer costs on disk (allocated bytes of its erofs image).
    async fn stored_bytes(&self, digest: &str) -> ImageResult<u64>;
    /// Free and total space of the filesystem the layers live on.
    fn space(&self) -> ImageResult<DiskSpace>;
    /// Disk every published layer takes together (allocated bytes).
    fn stored_bytes_total(&self) -> ImageResult<u64>;
    /// Starts a sweep of unreferenced layers: notes the layers no one has pinned now. The
    /// caller then reads which layers images reference and calls [`Self::sweep_finish`].
    fn sweep_begin(&self) -> ImageResult<Sweep>;
    /// Removes the layers of `sweep` that `referenced` lacks and that were not pinned since
    /// it began; returns what was reclaimed.
    async fn sweep_finish(&self, sweep: Sweep, referenced: &HashSet<String>) -> ImageResult<Reclaimed>;
}

/// Layer files and the pin that keeps them in place.
#[derive(Debug)]
pub struct PinnedLayers {
    pub paths: Vec<PathBuf>,
    pub pin: LayerPin,
}

/// What a sweep removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reclaimed {
    pub layers: Vec<String>,
    /// Allocated bytes the removed layer files took.
    pub bytes: u64,
}
