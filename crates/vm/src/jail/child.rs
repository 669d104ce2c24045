//! What a QEMU's child process does between `fork` and `exec`, all prepared before fork: join
//! its cgroup, enter its own namespaces and minimal root, drop every privilege. The child
//! only makes raw syscalls on that data ([`ChildSetup::apply`]).
#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::Inherited;
use super::root::RootPlan;
use crate::VmError;

/// The jail part of a child's setup (`None` in [`ChildSetup`] with the jail off).
pub(crate) struct Confinement {
    pub uid: u32,
    /// `cgroup.procs` of the VM's cgroup leaves (kept open by the caller until spawned).
    pub cgroup_procs: Vec<RawFd>,
    pub root: RootPlan,
}

pub(crate) struct ChildSetup {
    dir: CString,
    jail: Option<Confinement>,
    last_cap: libc::c_int,
    keep: Vec<RawFd>,
    background: bool,
    nice: libc::c_int,
    parent: libc::pid_t,
}

impl ChildSetup {
    pub fn new(
        dir: &Path,
        jail: Option<Confinement>,
        inherited: &Inherited,
        background: bool,
        nice: i32,
    ) -> Result<Self, VmError> {
        let dir = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| VmError::Invalid(format!("VM dir {dir:?} contains a NUL byte")))?;
        Ok(Self {
            dir,
            jail,
            last_cap: last_cap(),
            keep: inherited.fds.iter().map(AsRawFd::as_raw_fd).collect(),
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
        // before fork (NUL-terminated paths, open fds, plain integers, a null pointer for an
        // empty group list); none allocates or touches locks. `RootPlan::enter` has the same
        // contract and is called here, between fork and exec, as root.
        unsafe {
            if self.background {
                // Every thread QEMU starts inherits it. Failure only costs priority.
                libc::setpriority(libc::PRIO_PROCESS, 0, self.nice);
            }
            for &fd in &self.keep {
                check(libc::fcntl(fd, libc::F_SETFD, 0))?;
            }
            match &self.jail {
                None => check(libc::chdir(self.dir.as_ptr()))?,
                Some(jail) => {
                    // First, so every limit holds from QEMU's first instruction.
                    for &fd in &jail.cgroup_procs {
                        if libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    // Its working dir is then its run dir, bound at the same path: QEMU's
                    // sockets and logs are named relative to it.
                    jail.root.enter()?;
                    check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                    // Needs CAP_SETPCAP, so before the uid changes.
                    for cap in 0..=self.last_cap {
                        check(libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0))?;
                    }
                    check(libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))?;
                    check(libc::setgroups(0, std::ptr::null()))?;
                    check(libc::setresgid(jail.uid, jail.uid, jail.uid))?;
                    // From root to a non-zero uid in all three: permitted and effective sets
                    // are cleared by the kernel.
                    check(libc::setresuid(jail.uid, jail.uid, jail.uid))?;
                    // The inheritable set survives setuid: empty it too.
                    let mut header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
                    let data = [CapData::default(); 2];
                    check(libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) as libc::c_int)?;
                }
            }
            // After the uid change, which clears it.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            if libc::getppid() != self.parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
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
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
}
