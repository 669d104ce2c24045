//! Boxwood's metadata store: images, tags, operations and operation event logs, behind the
//! [`Store`] trait so the core never names a database. [`SqliteStore`] is the embedded
//! implementation (sqlx; the schema keeps to types PostgreSQL shares so a second backend
//! can follow).

mod directory_states;
mod records;
mod retention;
mod sqlite;

pub use directory_states::{DirectoryEntry, DirectoryStateRecord, DirectoryStates};
pub use records::*;
pub use retention::{ExpiredOperation, NamespaceCounts, RemovedImage, Retention};
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use uuid::Uuid;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[source] sqlx::Error),
    #[error("database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt {what} in row {key}")]
    Corrupt { what: &'static str, key: String },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let e = StoreError::Database(e);
        let condition = match e.condition() {
            Condition::Full => "full",
            Condition::Unavailable => "unavailable",
            Condition::Broken => "broken",
        };
        metrics::counter!("boxwood_store_errors_total", "condition" => condition).increment(1);
        e
    }
}

impl StoreError {
    /// What the failure means for the caller, from SQLite's primary result code.
    pub fn condition(&self) -> Condition {
        let StoreError::Database(sqlx::Error::Database(e)) = self else {
            return match self {
                StoreError::Database(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => Condition::Unavailable,
                _ => Condition::Broken,
            };
        };
        // Extended result codes keep the primary code in the low byte.
        match e.code().and_then(|c| c.parse::<i32>().ok()).map(|c| c & 0xff) {
            Some(SQLITE_FULL) => Condition::Full,
            Some(SQLITE_BUSY | SQLITE_LOCKED | SQLITE_IOERR | SQLITE_CANTOPEN) => Condition::Unavailable,
            _ => Condition::Broken,
        }
    }
}

const SQLITE_BUSY: i32 = 5;
const SQLITE_LOCKED: i32 = 6;
const SQLITE_IOERR: i32 = 10;
const SQLITE_FULL: i32 = 13;
const SQLITE_CANTOPEN: i32 = 14;

/// The state of the store a failed call reveals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// The disk is full: nothing was written; the same call succeeds once space returns.
    Full,
    /// Contended or failing I/O: nothing was written; worth retrying later.
    Unavailable,
    /// Anything else (a bug, a corrupt row, a constraint).
    Broken,
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Persistence of everything the core needs to survive a restart.
#[async_trait]
pub trait Store: Retention + DirectoryStates + Send + Sync {
    async fn insert_image(&self, image: &ImageRecord) -> StoreResult<()>;
    async fn get_image(&self, uuid: Uuid) -> StoreResult<Option<ImageRecord>>;
    /// Points `tag` in `namespace` at `image`, taking it from any previous holder.
    async fn set_tag(&self, namespace: &str, tag: &str, image: Uuid, now_us: i64) -> StoreResult<()>;
    async fn resolve_tag(&self, namespace: &str, tag: &str) -> StoreResult<Option<Uuid>>;
    /// Tags in any of `namespaces` that name `image`.
    async fn tags_of(&self, image: Uuid, namespaces: &[String]) -> StoreResult<Vec<TagRecord>>;
    async fn list_images(&self, filter: &ImageFilter) -> StoreResult<Vec<ImageListing>>;
    /// Removes `tag` from `image` in `namespace`; false if that tag did not name that image.
    async fn delete_tag(&self, namespace: &str, tag: &str, image: Uuid) -> StoreResult<bool>;
    /// Removes every tag of `image` in `namespace`; returns how many.
    async fn delete_tags_of(&self, namespace: &str, image: Uuid) -> StoreResult<u64>;
    /// Images whose parent is `image`, oldest first.
    async fn children_of(&self, image: Uuid) -> StoreResult<Vec<ImageRecord>>;
    /// Replaces an image's layer list with an equivalent one (after compaction).
    async fn set_image_layers(&self, image: Uuid, layers: &[String]) -> StoreResult<()>;
    /// The layers `namespace`'s images introduced, each once, sorted: of every image an
    /// operation made there (runs, imports; not the server's own), the layers its parent does
    /// not have.
    async fn introduced_layers(&self, namespace: &str) -> StoreResult<Vec<String>>;
    /// Every layer any image names, in any namespace (what a layer sweep must keep).
    async fn referenced_layers(&self) -> StoreResult<std::collections::HashSet<String>>;

    /// Records an upload in `namespace`, or bumps `updated_at` of the same content's record.
    async fn upsert_file(&self, namespace: &str, sha256: &str, size: i64, now_us: i64) -> StoreResult<FileRecord>;
    async fn file_by_sha256(&self, namespace: &str, sha256: &str) -> StoreResult<Option<FileRecord>>;
    async fn file_by_uuid(&self, uuid: Uuid) -> StoreResult<Option<FileRecord>>;
    /// Of `uuids`, in their order, those that are not uploads of `namespace` (unknown, or
    /// another namespace's): one check for a whole directory state.
    async fn files_not_in(&self, namespace: &str, uuids: &[Uuid]) -> StoreResult<Vec<Uuid>>;
    async fn list_files(&self, filter: &FileFilter) -> StoreResult<Vec<FileRecord>>;
    /// Sum of the sizes of `namespace`'s uploads.
    async fn namespace_upload_bytes(&self, namespace: &str) -> StoreResult<u64>;

    async fn insert_token(&self, token: &TokenRecord) -> StoreResult<()>;
    /// An unrevoked token by the SHA-256 of its secret.
    async fn active_token(&self, sha256: &str) -> StoreResult<Option<TokenRecord>>;
    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>>;
    /// Marks a token revoked; false if there was no such active token.
    async fn revoke_token(&self, uuid: Uuid, now_us: i64) -> StoreResult<bool>;

    async fn insert_operation(&self, op: &OperationRecord) -> StoreResult<()>;
    /// Rewrites the mutable columns of an operation row.
    async fn update_operation(&self, op: &OperationRecord) -> StoreResult<()>;
    /// Writes the terminal row and its last event in one transaction, so a reader that sees
    /// the `completion` event always finds the operation terminal.
    async fn finish_operation(&self, op: &OperationRecord, last_event: &EventRecord) -> StoreResult<()>;
    async fn get_operation(&self, uuid: Uuid) -> StoreResult<Option<OperationRecord>>;
    async fn list_operations(&self, filter: &OperationFilter) -> StoreResult<Vec<OperationRecord>>;
    /// Operations in a non-terminal status, oldest first.
    async fn unfinished_operations(&self) -> StoreResult<Vec<OperationRecord>>;

    async fn append_event(&self, event: &EventRecord) -> StoreResult<()>;
    /// Events with `id > after` (all when `None`), optionally of one `spid`, in id order.
    async fn events(
        &self,
        operation: Uuid,
        after: Option<i64>,
        spid: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<EventRecord>>;
    async fn last_event_id(&self, operation: Uuid) -> StoreResult<Option<i64>>;

    /// A small committed write, to show the store accepts writes (readiness).
    async fn probe_write(&self, now_us: i64) -> StoreResult<()>;
    /// Bytes the database takes (its pages).
    async fn size_bytes(&self) -> StoreResult<u64>;
}
