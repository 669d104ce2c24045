//! Least privilege for QEMU (Firecracker's jailer is the model). Every QEMU runs
//! - as its own unprivileged uid/gid, taken from a host-wide unique block of 256 ids this
//!   runtime claims at start, with no supplementary groups, no capabilities (effective,
//!   permitted, inheritable, ambient and bounding sets empty) and `PR_SET_NO_NEW_PRIVS`;
//! - in its own mount, IPC and UTS namespaces, in a minimal root holding only what it needs
//!   to run and its own run dir (owned by its uid, 0700) ([`root`]);
//! - in its own cgroup, memory, tasks and CPU weight bounded ([`cgroup`]);
//! - and the host files it needs come as inherited fds, never as paths.
//!
//! Everything the child does between `fork` and `exec` is prepared beforehand: the child
//! only makes raw syscalls on that data ([`child::ChildSetup::apply`]).

mod cgroup;
mod child;
mod root;

use std::fs::{self, File};
use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use nix::fcntl::{Flock, FlockArg};
use serde::Deserialize;

pub(crate) use cgroup::{Cgroups, Limits, VmCgroup};
pub(crate) use child::{ChildSetup, Confinement};
pub(crate) use root::SystemRoot;

use crate::VmError;

/// Ids in one block: one per VM alive at a time (pooled clones, runs, the template build).
pub const UIDS_PER_BLOCK: u32 = 256;
/// Blocks tried when claiming one (servers on one host each hold one).
const MAX_BLOCKS: u32 = 4096;
/// Where the blocks' locks live: shared by every server on the host.
const BLOCK_LOCK_DIR: &str = "/run/boxwood/uid-blocks";

/// `vm.jail` in the server configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JailConfig {
    /// Run every QEMU unprivileged (needs the server to run as root). `false`: QEMU runs with
    /// the server's own credentials (development only).
    pub enabled: bool,
    /// First uid (and gid) of block 0; block `k` is `uid_base + 256·k ..= uid_base + 256·k + 255`.
    pub uid_base: u32,
    /// What a QEMU may use beyond its guest's RAM (its own code, libraries, TCG's translation
    /// cache, device and network buffers): its cgroup's memory limit is guest RAM + this.
    pub memory_overhead_mib: u32,
    /// Tasks (threads) a QEMU may have: its vCPUs, I/O workers and helpers.
    pub pids_max: u32,
    /// CPU weight of each QEMU (cgroup v2 scale: 1–10000, 100 is the default share; v1
    /// `cpu.shares` get 1024 × weight / 100).
    pub cpu_weight: u32,
    /// Extra host paths visible read-only in every QEMU's root (a QEMU whose libraries or
    /// firmware live outside `/usr`).
    pub ro_paths: Vec<PathBuf>,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            uid_base: 2_000_000_000,
            memory_overhead_mib: DEFAULT_OVERHEAD_MIB,
            pids_max: 128,
            cpu_weight: 100,
            ro_paths: Vec::new(),
        }
    }
}

/// Measured on QEMU 7.2 under TCG (see docs/ARCHITECTURE.md, "The QEMU jail"): peak use
/// beyond guest RAM with the translation cache at [`crate::qemu::TCG_TB_MIB`], plus headroom.
const DEFAULT_OVERHEAD_MIB: u32 = 384;

/// The jail of one runtime: its uid block, cgroups and the shared part of every QEMU's root.
#[derive(Debug)]
pub(crate) struct Jail {
    pub uids: Arc<UidBlock>,
    pub cgroups: Cgroups,
    pub root: SystemRoot,
    pub config: JailConfig,
}

impl Jail {
    /// Claims a uid block, sets up its cgroups (removing a crashed server's leftovers) and
    /// prepares the root. Fails unless the server runs as root.
    pub fn new(config: &JailConfig, qemu_binary: &Path) -> Result<Self, VmError> {
        check_can_jail()?;
        let uids = UidBlock::claim(config.uid_base)?;
        let cgroups = Cgroups::setup(uids.index, |j| UidBlock::hold_if_free(Path::new(BLOCK_LOCK_DIR), j))?;
        let root = SystemRoot::new(qemu_binary, &config.ro_paths)?;
        Ok(Self { uids, cgroups, root, config: config.clone() })
    }

    /// The limits of a VM with `memory_mib` of guest RAM and `vcpus`. Guest RAM counts
    /// twice: a clone maps the template's RAM memfd privately, and a page it touches where the
    /// memfd has a hole is charged once as the memfd's page and again as the clone's own copy
    /// (with one share, `apt-get install` in a 256 MiB clone hit the limit and was OOM-killed).
    pub fn limits(&self, memory_mib: u32, vcpus: u32) -> Limits {
        Limits {
            memory_bytes: (2 * u64::from(memory_mib) + u64::from(self.config.memory_overhead_mib)) << 20,
            pids: self.config.pids_max.saturating_add(vcpus),
            cpu_weight: self.config.cpu_weight,
        }
    }
}

/// What a jailed QEMU holds until it has been reaped: its cgroup is removed first, then its
/// uid is free again (a new VM with that uid gets a fresh leaf).
#[derive(Debug)]
pub(crate) struct VmJail {
    pub cgroup: VmCgroup,
    /// Freed on drop.
    pub _lease: UidLease,
}

/// A block of [`UIDS_PER_BLOCK`] uids this process holds (an exclusive `flock` on
/// `/run/boxwood/uid-blocks/<k>.lock` for the runtime's life), and which of them are in use.
#[derive(Debug)]
pub(crate) struct UidBlock {
    /// `k`: the block's number (its lock file's name).
    pub index: u32,
    first: u32,
    used: Mutex<Vec<bool>>,
    _lock: Flock<File>,
}

impl UidBlock {
    /// Claims the first free block at or above `uid_base`.
    pub fn claim(uid_base: u32) -> Result<Arc<Self>, VmError> {
        Self::claim_in(Path::new(BLOCK_LOCK_DIR), uid_base)
    }

    fn claim_in(lock_dir: &Path, uid_base: u32) -> Result<Arc<Self>, VmError> {
        fs::create_dir_all(lock_dir).map_err(|e| VmError::io(format!("create {}", lock_dir.display()), e))?;
        for k in 0..MAX_BLOCKS {
            let Some(first) = k.checked_mul(UIDS_PER_BLOCK).and_then(|o| uid_base.checked_add(o)) else { break };
            if first.checked_add(UIDS_PER_BLOCK - 1).is_none() {
                break;
            }
            let path = lock_dir.join(format!("{k}.lock"));
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(|e| VmError::io(format!("open {}", path.display()), e))?;
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                tracing::info!(first, last = first + UIDS_PER_BLOCK - 1, "claimed a block of VM uids");
                return Ok(Arc::new(Self {
                    index: k,
                    first,
                    used: Mutex::new(vec![false; UIDS_PER_BLOCK as usize]),
                    _lock: lock,
                }));
            }
        }
        Err(VmError::Jail(format!("no free block of VM uids at or above {uid_base}")))
    }

    /// Block `k`'s lock while nobody else holds it (for cleaning up after a crashed server).
    fn hold_if_free(lock_dir: &Path, k: u32) -> Option<Box<dyn Send>> {
        let file = File::options().create(true).truncate(false).write(true).open(lock_dir.join(format!("{k}.lock")));
        let lock = Flock::lock(file.ok()?, FlockArg::LockExclusiveNonblock).ok()?;
        Some(Box::new(lock))
    }

    /// Holds the lock of the sibling block (same `uid_base`) whose first uid is `first` while no
    /// server holds it; `None` if it is held, is this block, or is not a block of this base.
    pub fn hold_sibling_if_free(&self, first: u32) -> Option<Box<dyn Send>> {
        let base = self.first - self.index * UIDS_PER_BLOCK;
        let offset = first.checked_sub(base)?;
        let k = offset / UIDS_PER_BLOCK;
        if offset % UIDS_PER_BLOCK != 0 || k >= MAX_BLOCKS || k == self.index {
            return None;
        }
        Self::hold_if_free(Path::new(BLOCK_LOCK_DIR), k)
    }

    pub fn range(&self) -> RangeInclusive<u32> {
        self.first..=self.first + (UIDS_PER_BLOCK - 1)
    }

    /// Takes a free uid of the block for one VM; it is free again when the lease is dropped.
    pub fn lease(self: &Arc<Self>) -> Result<UidLease, VmError> {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = used
            .iter()
            .position(|u| !u)
            .ok_or_else(|| VmError::Jail(format!("all {UIDS_PER_BLOCK} VM uids are in use (too many VMs at once)")))?;
        used[slot] = true;
        Ok(UidLease { block: self.clone(), slot })
    }
}

/// One VM's uid (= its gid). Held until its QEMU has been reaped.
#[derive(Debug)]
pub(crate) struct UidLease {
    block: Arc<UidBlock>,
    slot: usize,
}

impl UidLease {
    pub fn uid(&self) -> u32 {
        self.block.first + self.slot as u32
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.block.used.lock().unwrap_or_else(PoisonError::into_inner)[self.slot] = false;
    }
}

/// Fails unless this process can drop to other uids (root, as Firecracker's jailer needs).
fn check_can_jail() -> Result<(), VmError> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(VmError::Jail(
            "vm.jail.enabled needs the server to run as root (it starts each QEMU as its own unprivileged uid); \
             run as root or set vm.jail.enabled = false (QEMU then runs with the server's privileges)"
                .into(),
        ))
    }
}

/// Hands a VM's run dir to its uid: owner uid:gid, mode 0700.
pub(crate) fn give_dir(dir: &Path, uid: u32) -> Result<(), VmError> {
    chown(dir, Some(uid), Some(uid)).map_err(|e| VmError::io(format!("chown {}", dir.display()), e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| VmError::io(format!("chmod {}", dir.display()), e))
}

/// Files a QEMU inherits, by fd: it reaches them through `/proc/self/fd/N` or
/// `/dev/fdset/N` only, never through a host path.
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    pub(super) fds: Vec<OwnedFd>,
}

impl Inherited {
    /// Keeps `fd` open across exec; returns the number QEMU will know it by.
    pub fn add(&mut self, fd: impl Into<OwnedFd>) -> RawFd {
        let fd = fd.into();
        let raw = fd.as_raw_fd();
        self.fds.push(fd);
        raw
    }

    /// Opens `path` read-only and keeps it.
    pub fn open(&mut self, path: &Path) -> Result<RawFd, VmError> {
        let f = File::open(path).map_err(|e| VmError::io(format!("open {}", path.display()), e))?;
        Ok(self.add(f))
    }
}

/// The lock dir, for tests that claim blocks elsewhere.
#[cfg(test)]
fn test_lock_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("bw-uid-blocks-{}-{:08x}", std::process::id(), rand::random::<u32>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_exclusive_and_leases_reused() {
        let dir = test_lock_dir();
        let a = UidBlock::claim_in(&dir, 1000).unwrap();
        let b = UidBlock::claim_in(&dir, 1000).unwrap();
        assert_eq!(a.range(), 1000..=1255);
        assert_eq!(b.range(), 1256..=1511, "a held block is not claimed twice");
        let leases: Vec<_> = (0..UIDS_PER_BLOCK).map(|_| a.lease().unwrap()).collect();
        assert!(leases.iter().all(|l| a.range().contains(&l.uid())));
        assert_eq!(leases[0].uid(), 1000);
        assert_ne!(leases[0].uid(), leases[1].uid());
        assert!(matches!(a.lease(), Err(VmError::Jail(_))), "the block is exhausted");
        drop(leases);
        assert_eq!(a.lease().unwrap().uid(), 1000, "freed when the VM is gone");
        drop(a);
        let c = UidBlock::claim_in(&dir, 1000).unwrap();
        assert_eq!(c.range(), 1000..=1255, "a released block can be claimed again");
        assert!(UidBlock::claim_in(&dir, u32::MAX - 100).is_err(), "no block past u32::MAX");
        drop((b, c));
        let _ = fs::remove_dir_all(&dir);
    }
}
