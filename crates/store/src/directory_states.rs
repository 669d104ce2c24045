//! Directory states: a tree of uploads by path in the VM (what `rsync` registers), kept so
//! any client of the namespace can run with it.

use async_trait::async_trait;
use uuid::Uuid;

use crate::StoreResult;

/// One file of a directory state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// Absolute path in the VM.
    pub path: String,
    pub file_uuid: Uuid,
    /// The file's mode bits (`& 0o7777`).
    pub mode: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryStateRecord {
    pub id: i64,
    pub namespace: String,
    pub created_at_us: i64,
    /// By path.
    pub entries: Vec<DirectoryEntry>,
}

#[async_trait]
pub trait DirectoryStates: Send + Sync {
    /// Stores a new state (its entries in one transaction) and returns its id.
    async fn insert_directory_state(
        &self,
        namespace: &str,
        created_at_us: i64,
        entries: &[DirectoryEntry],
    ) -> StoreResult<i64>;
    /// The state `id` of `namespace`, if there is one.
    async fn directory_state(&self, namespace: &str, id: i64) -> StoreResult<Option<DirectoryStateRecord>>;
    /// Marks the state used at `now_us`; false if `namespace` has no state `id`.
    async fn touch_directory_state(&self, namespace: &str, id: i64, now_us: i64) -> StoreResult<bool>;
    /// How many states were last used before `cutoff_us`.
    async fn expired_directory_states(&self, cutoff_us: i64) -> StoreResult<u64>;
    /// Removes up to `limit` states (with their entries) last used before `cutoff_us`;
    /// returns how many went.
    async fn remove_directory_states(&self, cutoff_us: i64, limit: i64) -> StoreResult<u64>;
}
