//! Image layers on the host. An image is a stack of immutable layers (topmost first); each
//! layer is kept twice under the store root:
//!
//! ```text
//! <root>/layers/<sha256>.erofs   the layer as a read-only erofs image, attached to VMs as a
//!                                virtio-blk disk and stacked with overlayfs in the guest;
//!                                named by the sha256 of the file itself
//! <root>/trees/<sha256>/         the same layer unpacked in overlayfs "upper" format as an
//!                                inert tree (see [`inert`]: only 0700 dirs and 0600 files,
//!                                the image's metadata kept as data), read by host-side
//!                                inspection and by squashing, never by a VM
//! <root>/tmp/                    staging; on the same filesystem, so publishing is a rename
//! ```
//! A layer becomes visible only by `rename` of a fully written, fsynced file and tree, so a
//! crash leaves either the whole layer or stray staging files that start-up removes.
//!
//! Trees come from [`unpack_layer_from`] (a layer tar exported by the guest agent, unpacked
//! without ever writing outside the staging tree) or [`merge_layers`] (squashing a stack of
//! trees with overlayfs semantics).

mod base;
pub mod erofs;
mod fsutil;
pub mod inert;
mod inspect;
mod merge;
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
pub use store::{FsLayerStore, LayerInfo};
pub use unpack::{UnpackLimits, UnpackStats, unpack_layer_from};
pub use usage::{CommitLimits, DiskSpace, disk_space};

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
    /// The erofs disk image of a layer, to attach to a VM.
    fn layer_disk(&self, digest: &str) -> ImageResult<PathBuf>;
    /// The unpacked tree of a layer (overlayfs "upper" format), read-only for callers.
    fn layer_tree(&self, digest: &str) -> ImageResult<PathBuf>;
    /// A fresh staging directory on the store's filesystem, for building a layer tree.
    fn staging_dir(&self) -> ImageResult<PathBuf>;
    /// Turns a staged tree into a published layer (erofs image + tree), consuming the tree.
    async fn commit_tree(&self, tree: PathBuf) -> ImageResult<LayerInfo> {
        self.commit_tree_limited(tree, CommitLimits::NONE).await
    }
    /// [`Self::commit_tree`] within `limits`: the layer is measured (tree, then the written
    /// erofs image) before it is published; past a limit it is discarded with
    /// [`ImageError::OverBudget`] or [`ImageError::LowSpace`] and the tree is left to the caller.
    async fn commit_tree_limited(&self, tree: PathBuf, limits: CommitLimits) -> ImageResult<LayerInfo>;
    /// What a published layer costs on disk (allocated bytes of its erofs image and its tree).
    async fn stored_bytes(&self, digest: &str) -> ImageResult<u64>;
    /// Free and total space of the filesystem the layers live on.
    fn space(&self) -> ImageResult<DiskSpace>;
}
