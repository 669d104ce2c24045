//! What the retention policy asks of the store: when things were last used, which of them
//! may go, and removals that re-check their conditions in the transaction that removes.

use async_trait::async_trait;
use uuid::Uuid;

use crate::{FileRecord, ImageRecord, StoreResult};

/// An image the retention policy removed, as lineage goes on naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedImage {
    pub uuid: Uuid,
    pub namespace: String,
    pub parent_uuid: Option<Uuid>,
    pub operation_uuid: Option<Uuid>,
    pub size_bytes: i64,
    pub created_at_us: i64,
    pub removed_at_us: i64,
    pub reason: String,
}

/// What one namespace keeps in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceCounts {
    pub namespace: String,
    pub images: u64,
    pub tags: u64,
    pub uploads: u64,
    pub upload_bytes: u64,
    pub operations: u64,
    /// Bytes of event data (the `data` column) of the namespace's operations.
    pub event_bytes: u64,
}

/// A finished operation old enough to go, with the size of its event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredOperation {
    pub uuid: Uuid,
    pub namespace: String,
    pub events: u64,
}

#[async_trait]
pub trait Retention: Send + Sync {
    /// Marks an image used now; false when it no longer exists (a removal came first).
    async fn touch_image(&self, uuid: Uuid, now_us: i64) -> StoreResult<bool>;
    /// Marks an upload used now; false when it no longer exists.
    async fn touch_file(&self, uuid: Uuid, now_us: i64) -> StoreResult<bool>;

    /// Images retention may remove, oldest first: untagged, with no children, used by no
    /// unfinished operation, and neither made nor used since `cutoff_us`.
    async fn expired_images(&self, cutoff_us: i64, limit: i64) -> StoreResult<Vec<ImageRecord>>;
    /// Removes `image` and records it in `removed_images`, if it still qualifies (checked in
    /// the same transaction); false when it did not.
    async fn remove_image(&self, image: Uuid, cutoff_us: i64, now_us: i64, reason: &str) -> StoreResult<bool>;
    async fn removed_image(&self, uuid: Uuid) -> StoreResult<Option<RemovedImage>>;
    /// Removed images whose parent is `image`, oldest first.
    async fn removed_children(&self, image: Uuid) -> StoreResult<Vec<RemovedImage>>;

    /// Uploads neither made, uploaded again nor used since `cutoff_us`, and named by no
    /// unfinished operation, oldest first.
    async fn expired_files(&self, cutoff_us: i64, limit: i64) -> StoreResult<Vec<FileRecord>>;
    /// Removes an upload's record if it still qualifies; false when it did not.
    async fn remove_file(&self, uuid: Uuid, cutoff_us: i64) -> StoreResult<bool>;
    /// Whether any namespace still has an upload of this content.
    async fn content_referenced(&self, sha256: &str) -> StoreResult<bool>;

    /// Operations that finished before `cutoff_us`, oldest first.
    async fn expired_operations(&self, cutoff_us: i64, limit: i64) -> StoreResult<Vec<ExpiredOperation>>;
    /// Removes a finished operation and its event log; false when it is not finished before
    /// `cutoff_us` (or is gone).
    async fn remove_operation(&self, uuid: Uuid, cutoff_us: i64) -> StoreResult<bool>;

    /// Per-namespace counts, by namespace.
    async fn namespace_counts(&self) -> StoreResult<Vec<NamespaceCounts>>;
}
