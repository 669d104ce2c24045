//! Plain rows exchanged with the store. The core owns their meaning (statuses, JSON shapes);
//! the store only keeps them.

use std::collections::BTreeMap;

use serde_json::Value;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq)]
pub struct ImageRecord {
    pub uuid: Uuid,
    pub namespace: String,
    pub parent_uuid: Option<Uuid>,
    pub operation_uuid: Option<Uuid>,
    /// Layer digests, topmost first.
    pub layers: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub size_bytes: i64,
    pub created_at_us: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    pub namespace: String,
    pub tag: String,
    pub image_uuid: Uuid,
}

/// One row of an image listing: an image and one of its visible tags (or none).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageListing {
    pub image: ImageRecord,
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct ImageFilter {
    /// Namespaces whose images and tags are visible.
    pub namespaces: Vec<String>,
    pub tagged: bool,
    pub tag_prefix: Option<String>,
    pub uuid: Option<Uuid>,
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
    pub limit: i64,
    pub offset: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OperationRecord {
    pub uuid: Uuid,
    pub namespace: String,
    pub kind: String,
    pub status: String,
    pub error: Option<String>,
    pub created_at_us: i64,
    pub started_at_us: Option<i64>,
    pub finished_at_us: Option<i64>,
    pub image_uuid: Option<Uuid>,
    pub result_image_uuid: Option<Uuid>,
    pub result_tag: Option<String>,
    pub image_size: Option<i64>,
    pub consumed_cpu: Option<f64>,
    pub consumed_memory: Option<i64>,
    pub metadata: Value,
    pub result: Option<Value>,
}

#[derive(Debug, Clone, Default)]
pub struct OperationFilter {
    pub namespace: String,
    pub status: Option<String>,
    pub kind: Option<String>,
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
    pub limit: i64,
    pub offset: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub operation_uuid: Uuid,
    pub id: i64,
    pub ts_us: i64,
    pub spid: Option<i64>,
    pub kind: String,
    pub data: Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub uuid: Uuid,
    pub namespace: String,
    pub sha256: String,
    pub size: i64,
    pub created_at_us: i64,
    pub updated_at_us: i64,
}

#[derive(Debug, Clone, Default)]
pub struct FileFilter {
    pub namespace: String,
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
    pub limit: i64,
    pub offset: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Hex SHA-256 of the secret.
    pub sha256: String,
    pub uuid: Uuid,
    pub namespace: String,
    /// Permission names.
    pub permissions: Vec<String>,
    pub description: Option<String>,
    pub created_at_us: i64,
    pub revoked_at_us: Option<i64>,
}

/// Environment maps are stored as JSON objects.
pub(crate) type EnvMap = BTreeMap<String, String>;
