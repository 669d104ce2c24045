//! Directory states (Boxwood extension): a synced local tree registered as uploads by path,
//! so `run(directory_state_id)` works from any client holding a token of the namespace. A
//! state whose uploads the server no longer has is refused whole, never used partly.

use std::collections::HashSet;

use boxwood_store::DirectoryEntry;
use uuid::Uuid;

use super::Service;
use crate::auth::{Caller, Permission};
use crate::clock::{format_ts, now_us};
use crate::error::{CoreError, CoreResult};
use crate::model::{DirectoryState, DirectoryStateFile, DirectoryStateRequest};

/// Files one state may hold.
pub const MAX_STATE_FILES: usize = 100_000;
/// The kernel's PATH_MAX.
const MAX_PATH: usize = 4096;

/// `path` as a state may hold it: absolute, normal (no `.`, `..`, empty components or a
/// trailing slash), without NUL.
fn check_path(path: &str) -> Result<(), String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("path {path:?} must be absolute"));
    };
    if path.len() > MAX_PATH || path.contains('\0') {
        return Err(format!("path {path:?} is longer than {MAX_PATH} bytes or holds NUL"));
    }
    if rest.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(format!("path {path:?} must be normal: no empty, `.` or `..` components"));
    }
    Ok(())
}

impl Service {
    /// `POST /v1/directory-states`: registers a tree of the caller's uploads; returns its id.
    /// Preparing a run, so it takes a spawn permission, like uploading.
    pub async fn create_directory_state(
        &self,
        caller: &Caller,
        req: DirectoryStateRequest,
    ) -> CoreResult<DirectoryState> {
        if !caller.permissions.contains(&Permission::SpawnDisposable) {
            caller.require(Permission::Spawn)?;
        }
        if req.files.len() > MAX_STATE_FILES {
            return Err(CoreError::bad(format!("a directory state holds at most {MAX_STATE_FILES} files")));
        }
        let mut seen = HashSet::new();
        let mut entries = Vec::with_capacity(req.files.len());
        for f in &req.files {
            check_path(&f.path).map_err(CoreError::bad)?;
            if !seen.insert(f.path.as_str()) {
                return Err(CoreError::bad(format!("path {:?} appears twice", f.path)));
            }
            let mode = f.mode.unwrap_or(0o644);
            if mode > 0o7777 {
                return Err(CoreError::bad(format!("mode {mode:o} of {:?} is past 07777", f.path)));
            }
            let uuid =
                Uuid::parse_str(&f.uuid).map_err(|_| CoreError::bad(format!("invalid upload uuid {:?}", f.uuid)))?;
            entries.push(DirectoryEntry { path: f.path.clone(), file_uuid: uuid, mode });
        }
        // Every upload must be the caller's namespace's, now.
        let uuids: Vec<Uuid> = entries.iter().map(|e| e.file_uuid).collect();
        if let Some(gone) = self.inner.store.files_not_in(&caller.namespace, &uuids).await?.first() {
            let path = entries.iter().find(|e| e.file_uuid == *gone).map_or("", |e| e.path.as_str());
            return Err(CoreError::NotFound(format!("upload {gone} (for {path})")));
        }
        let created_at_us = now_us();
        let id = self.inner.store.insert_directory_state(&caller.namespace, created_at_us, &entries).await?;
        Ok(DirectoryState { id, created_at: format_ts(created_at_us), files: req.files })
    }

    /// `GET /v1/directory-states/{id}`: the state, once every upload it names is still there
    /// (409 naming the missing ones otherwise: sync again).
    pub async fn get_directory_state(&self, caller: &Caller, id: i64) -> CoreResult<DirectoryState> {
        caller.require(Permission::List)?;
        let Some(state) = self.inner.store.directory_state(&caller.namespace, id).await? else {
            return Err(CoreError::NotFound(format!("directory state {id}")));
        };
        // Fetching is how a run uses a state: retention keeps what is fetched.
        self.inner.store.touch_directory_state(&caller.namespace, id, now_us()).await?;
        let uuids: Vec<Uuid> = state.entries.iter().map(|e| e.file_uuid).collect();
        let gone: HashSet<Uuid> = self.inner.store.files_not_in(&caller.namespace, &uuids).await?.into_iter().collect();
        let missing: Vec<&str> =
            state.entries.iter().filter(|e| gone.contains(&e.file_uuid)).map(|e| e.path.as_str()).collect();
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(5).copied().collect();
            return Err(CoreError::Conflict(format!(
                "directory state {id} names {} upload(s) the server no longer has ({}{}); sync the directory again",
                missing.len(),
                shown.join(", "),
                if missing.len() > shown.len() { ", …" } else { "" }
            )));
        }
        let files = state
            .entries
            .into_iter()
            .map(|e| DirectoryStateFile { path: e.path, uuid: e.file_uuid.to_string(), mode: Some(e.mode) })
            .collect();
        Ok(DirectoryState { id, created_at: format_ts(state.created_at_us), files })
    }
}

#[cfg(test)]
mod tests {
    use super::check_path;

    #[test]
    fn only_normal_absolute_paths() {
        assert!(check_path("/app/main.py").is_ok());
        for bad in ["app/x", "/app/../etc/passwd", "/app//x", "/app/./x", "/app/", "/", "/a\0b"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert!(check_path(&format!("/{}", "a".repeat(5000))).is_err());
    }
}
