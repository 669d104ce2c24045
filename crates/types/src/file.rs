//! Uploaded files (`POST /files`, `GET /files`).

use serde::{Deserialize, Serialize};

/// `FileResponse` (`POST /files`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileResponse {
    pub uuid: String,
    pub sha256: String,
    pub size: i64,
}

/// `File`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileView {
    pub uuid: String,
    pub sha256: String,
    pub size: i64,
    pub created_at: String,
    pub updated_at: String,
}

/// `GET /files`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileList {
    pub files: Vec<FileView>,
}
