//! Scratch disks: the writable layer of a run on the host's disk instead of the guest's RAM.
//!
//! Each VM gets a raw file holding an empty ext4 filesystem of the run's size, which the agent
//! mounts as the overlay's upper dir. The file is created unlinked (`O_TMPFILE`) in the VM's
//! dir, so it is gone with its last fd (the VM's and QEMU's) however the run ends, a server
//! crash included. It is sparse: the host pays only for what the guest writes, and `discard`
//! in the guest hands deleted blocks back. Its size bounds what the guest can write, even
//! through the raw device, so a VM never costs the host more disk than its run's cap.
//!
//! Formatting is done once per size: an empty filesystem is a few hundred KiB of metadata
//! (no journal — a scratch disk never outlives a crash — and lazily initialised inode
//! tables), kept in a small cache of base images; each VM's disk is a sparse copy of one.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::VmError;

/// Virtio serial of the scratch disk (what the agent looks for).
pub const SCRATCH_SERIAL: &str = "bwupper";

/// The smallest scratch filesystem: ext4's own metadata needs room, so a smaller cap is
/// rounded up to this (what a run may persist is still checked against its cap on the host).
pub const MIN_SCRATCH_BYTES: u64 = 16 << 20;

/// The largest scratch filesystem (ext4 with 4 KiB blocks is fine far beyond; a run's cap is
/// validated well below this by the core).
pub const MAX_SCRATCH_BYTES: u64 = 16 << 40;

/// Size of the placeholder a template carries, and a clone until its warm-up or its run
/// gives it a filesystem.
pub const PLACEHOLDER_BYTES: u64 = 1 << 20;

/// Base images kept; past this the least recently used goes (sizes come from tenants).
const CACHED_BASES: usize = 8;

/// `mkfs.ext4` from e2fsprogs: by absolute path where Debian puts it (`/usr/sbin` is not on
/// every user's `PATH`), else looked up on `PATH`.
pub fn default_mkfs() -> PathBuf {
    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("mkfs.ext4"))
}

/// The size a scratch disk for an upper of `upper_bytes` gets: whole MiBs, within
/// [`MIN_SCRATCH_BYTES`] and [`MAX_SCRATCH_BYTES`].
pub fn scratch_bytes(upper_bytes: u64) -> u64 {
    upper_bytes.clamp(MIN_SCRATCH_BYTES, MAX_SCRATCH_BYTES).next_multiple_of(1 << 20)
}

/// Formatted empty filesystems by size, in `dir`.
#[derive(Debug)]
pub struct Bases {
    dir: PathBuf,
    mkfs: PathBuf,
    /// Size → last use (a counter), for eviction. The lock also serialises formatting.
    used: Mutex<(u64, HashMap<u64, u64>)>,
}

impl Bases {
    pub fn new(dir: PathBuf, mkfs: PathBuf) -> Self {
        Self { dir, mkfs, used: Mutex::new((0, HashMap::new())) }
    }

    /// A new scratch disk of `bytes` (see [`scratch_bytes`]) in `vm_dir`: unlinked, private to
    /// the server, holding an empty ext4 filesystem.
    pub async fn create(self: &Arc<Self>, vm_dir: &Path, bytes: u64) -> Result<File, VmError> {
        let disk = unlinked_file(vm_dir, 0)?;
        let filled = disk.try_clone().map_err(|e| VmError::io("dup the scratch disk", e))?;
        self.fill(filled, bytes).await?;
        Ok(disk)
    }

    /// [`Self::fill_blocking`] off the async threads: a new size runs `mkfs.ext4` (~15 ms).
    pub async fn fill(self: &Arc<Self>, disk: File, bytes: u64) -> Result<(), VmError> {
        let bases = self.clone();
        tokio::task::spawn_blocking(move || bases.fill_blocking(&disk, bytes))
            .await
            .map_err(|e| VmError::Invalid(format!("the scratch disk task failed: {e}")))?
    }

    /// Writes an empty ext4 filesystem of `bytes` into `disk` (which must read as zeros) and
    /// sets its length to `bytes`.
    pub fn fill_blocking(&self, disk: &File, bytes: u64) -> Result<(), VmError> {
        let base = self.base(bytes)?;
        disk.set_len(bytes).map_err(|e| VmError::io("size the scratch disk", e))?;
        boxwood_image::sparse::copy_sparse(&base, disk).map_err(|e| VmError::io("write the scratch disk", e))?;
        Ok(())
    }

    /// Formats the smallest base now, so a missing or failing `mkfs.ext4` stops the runtime
    /// at start instead of failing every run.
    pub fn check(&self) -> Result<(), VmError> {
        self.base(MIN_SCRATCH_BYTES).map(drop)
    }

    /// The base image of `bytes`, formatted now if it is not cached.
    fn base(&self, bytes: u64) -> Result<File, VmError> {
        let mut used = self.used.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (clock, map) = &mut *used;
        *clock += 1;
        map.insert(bytes, *clock);
        let path = self.dir.join(format!("ext4-{bytes}.img"));
        if let Ok(f) = File::open(&path) {
            return Ok(f);
        }
        fs::create_dir_all(&self.dir).map_err(|e| VmError::io("create the scratch base dir", e))?;
        let tmp = self.dir.join(format!(".ext4-{bytes}.tmp"));
        let made = File::create(&tmp).and_then(|f| f.set_len(bytes));
        made.map_err(|e| VmError::io("create a scratch base", e))?;
        let out = Command::new(&self.mkfs)
            .args(["-q", "-F", "-b", "4096", "-m", "0", "-L", "bwupper", "-O", "^has_journal,^resize_inode", "-E"])
            .arg("lazy_itable_init=1,nodiscard,root_owner=0:0")
            .arg(&tmp)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                tracing::error!(mkfs = %self.mkfs.display(), error = %e, "cannot run mkfs.ext4 (install e2fsprogs)");
                VmError::io("run mkfs.ext4", e)
            })?;
        if !out.status.success() {
            let _ = fs::remove_file(&tmp);
            // The details name host paths: they go to the log, the run is told less.
            let why = String::from_utf8_lossy(&out.stderr);
            tracing::error!(mkfs = %self.mkfs.display(), bytes, stderr = %why.trim(), "formatting a scratch disk failed");
            return Err(VmError::Invalid("formatting the scratch disk failed (see the server log)".into()));
        }
        fs::rename(&tmp, &path).map_err(|e| VmError::io("store a scratch base", e))?;
        if map.len() > CACHED_BASES
            && let Some((&old, _)) = map.iter().filter(|(b, _)| **b != bytes).min_by_key(|(_, t)| **t)
        {
            map.remove(&old);
            let _ = fs::remove_file(self.dir.join(format!("ext4-{old}.img")));
        }
        File::open(&path).map_err(|e| VmError::io("open a scratch base", e))
    }
}

/// A new unlinked file of `bytes` in `dir` (`O_TMPFILE`: it has no name to leak or leave).
pub fn unlinked_file(dir: &Path, bytes: u64) -> Result<File, VmError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .map_err(|e| VmError::io("create a scratch disk", e))?;
    file.set_len(bytes).map_err(|e| VmError::io("size the scratch disk", e))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};

    use super::*;

    #[test]
    fn sizes_are_whole_mib_and_at_least_the_minimum() {
        assert_eq!(scratch_bytes(0), MIN_SCRATCH_BYTES);
        assert_eq!(scratch_bytes(100 << 20), 100 << 20);
        assert_eq!(scratch_bytes((100 << 20) + 1), 101 << 20);
        assert_eq!(scratch_bytes(u64::MAX), MAX_SCRATCH_BYTES);
    }

    #[tokio::test]
    async fn disks_are_sparse_unlinked_ext4_and_bases_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let bases = Arc::new(Bases::new(dir.path().join("bases"), default_mkfs()));
        let vm_dir = dir.path().join("vm");
        fs::create_dir(&vm_dir).unwrap();
        let disk = bases.create(&vm_dir, 12 << 30).await.unwrap();
        let meta = disk.metadata().unwrap();
        assert_eq!(meta.len(), 12 << 30);
        assert!(meta.blocks() * 512 < 4 << 20, "an empty 12 GiB disk costs {} bytes", meta.blocks() * 512);
        assert_eq!(meta.mode() & 0o7777, 0o600);
        assert_eq!(fs::read_dir(&vm_dir).unwrap().count(), 0, "the disk has no name");
        let mut magic = [0u8; 2];
        disk.read_exact_at(&mut magic, 1024 + 0x38).unwrap();
        assert_eq!(magic, [0x53, 0xef], "an ext4 superblock");

        for n in 0..CACHED_BASES as u64 + 3 {
            bases.create(&vm_dir, (32 + n) << 20).await.unwrap();
        }
        let kept = fs::read_dir(dir.path().join("bases")).unwrap().count();
        assert!(kept <= CACHED_BASES + 1, "{kept} bases kept");
    }
}
