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

/// One file of a directory state (Boxwood extension): an upload put at `path` in the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryStateFile {
    /// Absolute path in the VM.
    pub path: String,
    /// The upload's UUID (`POST /files`).
    pub uuid: String,
    /// Permission bits (default 0644).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// `POST /v1/directory-states` body (Boxwood extension): a synced tree, as uploads by path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryStateRequest {
    pub files: Vec<DirectoryStateFile>,
}

/// A directory state (Boxwood extension): what `rsync` registered; `run` with its id puts
/// the files in the VM. Namespaced like uploads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryState {
    pub id: i64,
    pub created_at: String,
    pub files: Vec<DirectoryStateFile>,
}
