//! Least privilege for QEMU (Firecracker's jailer is the model): every QEMU runs as its own
//! unprivileged uid/gid taken from a host-wide unique block of 256 ids this runtime claims at
//! start, with no supplementary groups, no capabilities (effective, permitted, inheritable,
//! ambient and bounding sets empty) and `PR_SET_NO_NEW_PRIVS`; its working dir is its own
//! run dir (owned by that uid, 0700), and the host files it needs come as inherited fds, so
//! it never needs a path through the server's private state dir.
//!
//! Everything the child does between `fork` and `exec` is prepared here beforehand: the child
//! only makes raw syscalls on that data ([`ChildSetup::apply`]).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::{self, File};
use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use nix::fcntl::{Flock, FlockArg};
use serde::Deserialize;

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
}

impl Default for JailConfig {
    fn default() -> Self {
        Self { enabled: true, uid_base: 2_000_000_000 }
    }
}

/// A block of [`UIDS_PER_BLOCK`] uids this process holds (an exclusive `flock` on
/// `/run/boxwood/uid-blocks/<k>.lock` for the runtime's life), and which of them are in use.
#[derive(Debug)]
pub(crate) struct UidBlock {
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
                    first,
                    used: Mutex::new(vec![false; UIDS_PER_BLOCK as usize]),
                    _lock: lock,
                }));
            }
        }
        Err(VmError::Jail(format!("no free block of VM uids at or above {uid_base}")))
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
pub(crate) fn check_can_jail() -> Result<(), VmError> {
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
    fds: Vec<OwnedFd>,
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

    fn raw(&self) -> Vec<RawFd> {
        self.fds.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

/// What the child does before exec, all prepared before fork.
pub(crate) struct ChildSetup {
    dir: CString,
    /// `None`: jail off, keep the server's credentials.
    uid: Option<u32>,
    last_cap: libc::c_int,
    keep: Vec<RawFd>,
    background: bool,
    nice: libc::c_int,
    parent: libc::pid_t,
}

impl ChildSetup {
    pub fn new(
        dir: &Path,
        uid: Option<u32>,
        inherited: &Inherited,
        background: bool,
        nice: i32,
    ) -> Result<Self, VmError> {
        let dir = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| VmError::Invalid(format!("VM dir {dir:?} contains a NUL byte")))?;
        Ok(Self {
            dir,
            uid,
            last_cap: last_cap(),
            keep: inherited.raw(),
            background,
            nice,
            parent: nix::unistd::getpid().as_raw(),
        })
    }

    /// Runs in the forked child: only raw syscalls on prepared data, nothing allocates.
    ///
    /// # Safety
    /// Call only between fork and exec (a `pre_exec` closure).
    pub unsafe fn apply(&self) -> std::io::Result<()> {
        let check = |r: libc::c_int| if r == -1 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
        // SAFETY (whole block): each call is an async-signal-safe syscall on values prepared
        // before fork (a NUL-terminated path, plain integers, a null pointer for an empty
        // group list); none allocates or touches locks.
        unsafe {
            if self.background {
                // Every thread QEMU starts inherits it. Failure only costs priority.
                libc::setpriority(libc::PRIO_PROCESS, 0, self.nice);
            }
            // QEMU's sockets and logs are named relative to its own dir, so no path through
            // the (private) state dir has to be searchable by its uid.
            check(libc::chdir(self.dir.as_ptr()))?;
            for &fd in &self.keep {
                check(libc::fcntl(fd, libc::F_SETFD, 0))?;
            }
            if let Some(uid) = self.uid {
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                // Needs CAP_SETPCAP, so before the uid changes.
                for cap in 0..=self.last_cap {
                    check(libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0))?;
                }
                check(libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))?;
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setresgid(uid, uid, uid))?;
                // From root to a non-zero uid in all three: permitted and effective sets are
                // cleared by the kernel.
                check(libc::setresuid(uid, uid, uid))?;
                // The inheritable set survives setuid: empty it too.
                let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
                let data = [CapData::default(); 2];
                check(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int)?;
            }
            // After the uid change, which clears it.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            if libc::getppid() != self.parent {
                return Err(std::io::Error::other("parent exited"));
            }
        }
        Ok(())
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Highest capability number this kernel knows.
fn last_cap() -> libc::c_int {
    fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
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
