//! Per-import scratch directories under the work dir: removed when the import ends or its
//! future is dropped, and swept on the next import if the process died first.
//!
//! Each import owns `import-<uuid>.lock` (held with `flock` for its whole life, created
//! *before* the directory) and `import-<uuid>/`. A sweep removes a directory whose lock file
//! is missing or not locked, so it never touches a live import's files, even another
//! process's sharing the work dir.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::FlockOperation;

use crate::fsutil::remove_any;
use crate::{OciError, io_err};

const PREFIX: &str = "import-";

pub(crate) struct Scratch {
    pub dir: PathBuf,
    lock_path: PathBuf,
    _lock: File,
    /// Set on drop, so a blocking task still applying layers stops.
    pub cancel: Arc<AtomicBool>,
}

impl Scratch {
    /// Sweeps stale scratch dirs, then creates a fresh locked one.
    pub fn create(work_dir: &Path) -> Result<Self, OciError> {
        std::fs::create_dir_all(work_dir).map_err(io_err(work_dir))?;
        sweep(work_dir);
        loop {
            let id = format!("{PREFIX}{}", uuid::Uuid::new_v4().simple());
            let lock_path = work_dir.join(format!("{id}.lock"));
            let lock = OpenOptions::new().write(true).create_new(true).open(&lock_path).map_err(io_err(&lock_path))?;
            rustix::fs::flock(&lock, FlockOperation::LockExclusive)
                .map_err(|e| io_err(&lock_path)(std::io::Error::from_raw_os_error(e.raw_os_error())))?;
            // A sweep may have removed the file between create and flock; then start over.
            let (Ok(held), Ok(named)) = (lock.metadata(), lock_path.metadata()) else { continue };
            if held.ino() != named.ino() {
                continue;
            }
            let dir = work_dir.join(&id);
            std::fs::create_dir(&dir).map_err(io_err(&dir))?;
            return Ok(Scratch { dir, lock_path, _lock: lock, cancel: Arc::new(AtomicBool::new(false)) });
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Err(e) = remove_any(&self.dir) {
            tracing::warn!(error = %e, "could not remove scratch dir");
        }
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// Removes scratch dirs (and lock files) left by imports that no longer run.
fn sweep(work_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(work_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix(PREFIX) else { continue };
        let id = id.strip_suffix(".lock").unwrap_or(id);
        let lock_path = work_dir.join(format!("{PREFIX}{id}.lock"));
        let dir = work_dir.join(format!("{PREFIX}{id}"));
        let stale = match File::open(&lock_path) {
            Ok(lock) => rustix::fs::flock(&lock, FlockOperation::NonBlockingLockExclusive).is_ok(),
            Err(_) => true,
        };
        if stale {
            tracing::info!(dir = %dir.display(), "removing stale import scratch dir");
            let _ = remove_any(&dir);
            let _ = std::fs::remove_file(&lock_path);
        }
    }
}
