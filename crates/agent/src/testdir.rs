//! Scratch dirs for the agent's unit tests (it has no dev-dependencies).
#![cfg(test)]

use std::fs;
use std::path::{Path, PathBuf};

/// A scratch dir, on tmpfs when there is one (xattrs, whiteouts behave as in the guest);
/// removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A fresh dir named after `what`.
pub fn tempdir(what: &str) -> TempDir {
    let base = if Path::new("/dev/shm").is_dir() { Path::new("/dev/shm") } else { Path::new("/tmp") };
    let dir = base.join(format!("bw-agent-{what}-{}-{:x}", std::process::id(), rand_suffix()));
    fs::create_dir(&dir).unwrap();
    TempDir(dir)
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64) ^ (n << 48)
}
