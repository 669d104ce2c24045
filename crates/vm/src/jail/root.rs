//! QEMU's own mount namespace and minimal root (Firecracker's jailer chroot, done with
//! `pivot_root`): a fresh tmpfs holding only read-only binds of what QEMU needs to run (its
//! binary and shared libraries: `/usr` and the host's `/lib*`, `/bin`, `/sbin` as they are,
//! real dirs bound, merged-usr symlinks copied), `/etc/ld.so.cache`, `/etc/resolv.conf`
//! (slirp forwards the guest's DNS to the host's resolvers), `/dev/null`, `/dev/urandom`,
//! `/dev/kvm` under KVM, a `/proc` showing only its own processes (for `/proc/self/fd/N`),
//! and its run dir read-write at the same path as on the host. Nothing else of the host's
//! filesystem (state dir, DB, blobs, layers, other runs) exists there.
//!
//! [`RootPlan`] is computed before fork; [`RootPlan::enter`] runs between fork and exec and
//! only makes raw syscalls on its prepared C strings.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::VmError;

/// Where each QEMU's new root is mounted in its own namespace before `pivot_root` (an empty,
/// root-owned dir: the mount on it is private to that namespace, so every QEMU uses the same).
pub(crate) const MOUNT_POINT: &str = "/run/boxwood/jail-root";

/// Top-level host dirs holding QEMU's binary, libraries, modules and firmware. Merged-usr
/// hosts have most as symlinks into `/usr`; those are recreated, not bound.
const SYSTEM_DIRS: &[&str] = &["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin"];
/// Host files QEMU reads if present: the dynamic linker's cache (speed only) and the resolver
/// configuration slirp forwards the guest's DNS queries by.
const SYSTEM_FILES: &[&str] = &["/etc/ld.so.cache", "/etc/resolv.conf"];

/// How a host path appears in the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    ReadOnly,
    /// The VM's run dir.
    ReadWrite,
    /// A device node (bound; the tmpfs itself is `nodev`).
    Device {
        writable: bool,
    },
}

/// What the root of every QEMU of a runtime shares: the system dirs and files, the QEMU
/// binary's dir (if outside them) and the operator's extra read-only paths. Built once.
#[derive(Debug, Clone)]
pub(crate) struct SystemRoot {
    links: Vec<(PathBuf, PathBuf)>,
    binds: Vec<(PathBuf, Access)>,
    /// The QEMU binary, absolute and canonical (visible at this path in the root).
    pub qemu: PathBuf,
}

impl SystemRoot {
    /// `qemu`: the configured binary (a bare name is looked up in `PATH`).
    pub fn new(qemu: &Path, extra_ro: &[PathBuf]) -> Result<Self, VmError> {
        fs::create_dir_all(MOUNT_POINT).map_err(|e| VmError::io(format!("create {MOUNT_POINT}"), e))?;
        let qemu = find_binary(qemu)?;
        let mut root = Self { links: Vec::new(), binds: Vec::new(), qemu: qemu.clone() };
        for dir in SYSTEM_DIRS {
            let path = Path::new(dir);
            match fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_symlink() => {
                    let target = fs::read_link(path).map_err(|e| VmError::io(format!("read link {dir}"), e))?;
                    root.links.push((path.to_owned(), target));
                }
                Ok(m) if m.is_dir() => root.binds.push((path.to_owned(), Access::ReadOnly)),
                _ => {}
            }
        }
        for file in SYSTEM_FILES {
            if fs::metadata(file).is_ok_and(|m| m.is_file()) {
                root.binds.push((PathBuf::from(file), Access::ReadOnly));
            }
        }
        if !root.covers(&qemu) {
            let dir = qemu.parent().unwrap_or(Path::new("/")).to_owned();
            root.binds.push((dir, Access::ReadOnly));
        }
        for path in extra_ro {
            let path = absolute(path)?;
            if !root.covers(&path) {
                root.binds.push((path, Access::ReadOnly));
            }
        }
        Ok(root)
    }

    /// Whether `path` (canonical) is inside a bound dir.
    fn covers(&self, path: &Path) -> bool {
        self.binds.iter().any(|(b, access)| *access == Access::ReadOnly && b.is_dir() && path.starts_with(b))
    }

    /// The plan for one QEMU: this root plus its run dir (read-write) and, under KVM,
    /// `/dev/kvm`.
    pub fn plan(&self, run_dir: &Path, kvm: bool) -> Result<RootPlan, VmError> {
        let mut binds = self.binds.clone();
        binds.push((PathBuf::from("/dev/null"), Access::Device { writable: true }));
        binds.push((PathBuf::from("/dev/urandom"), Access::Device { writable: false }));
        if kvm {
            binds.push((PathBuf::from("/dev/kvm"), Access::Device { writable: true }));
        }
        binds.push((absolute(run_dir)?, Access::ReadWrite));
        let mut b = PlanBuilder::default();
        for (link, target) in &self.links {
            b.op(Op::Link { target: cstr(target)?, path: b.inside(link)? });
        }
        for (path, access) in &binds {
            b.bind(path, *access)?;
        }
        let proc_dir = b.dirs_to(Path::new("/proc"))?;
        Ok(RootPlan {
            mount_point: cstr(Path::new(MOUNT_POINT))?,
            ops: b.ops,
            proc_dir,
            workdir: cstr(&absolute(run_dir)?)?,
        })
    }
}

/// `binary` as an absolute canonical path (a bare name searched in `PATH`).
fn find_binary(binary: &Path) -> Result<PathBuf, VmError> {
    let found = if binary.components().count() > 1 || binary.is_absolute() {
        Some(binary.to_owned())
    } else {
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(binary)).find(|c| c.is_file()))
    };
    let found = found.ok_or_else(|| VmError::Jail(format!("QEMU binary {} not found in PATH", binary.display())))?;
    fs::canonicalize(&found).map_err(|e| VmError::io(format!("resolve {}", found.display()), e))
}

fn absolute(path: &Path) -> Result<PathBuf, VmError> {
    fs::canonicalize(path).map_err(|e| VmError::io(format!("resolve {}", path.display()), e))
}

fn cstr(path: &Path) -> Result<CString, VmError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| VmError::Invalid(format!("path {path:?} contains a NUL")))
}

/// One step of building the root, on paths under [`MOUNT_POINT`].
#[derive(Debug)]
enum Op {
    Dir(CString),
    /// An empty file to bind a file onto.
    File(CString),
    Link {
        target: CString,
        path: CString,
    },
    /// Bind `src` on `dst`, then remount the bind with `flags` (`MS_RDONLY`, `MS_NOSUID`, …).
    Bind {
        src: CString,
        dst: CString,
        flags: libc::c_ulong,
    },
}

#[derive(Default)]
struct PlanBuilder {
    ops: Vec<Op>,
    dirs: Vec<PathBuf>,
}

impl PlanBuilder {
    fn op(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// `path` (absolute, on the host) as the path of its place in the new root before
    /// `pivot_root`.
    fn inside(&self, path: &Path) -> Result<CString, VmError> {
        cstr(&mount_path(path))
    }

    /// Creates `path`'s dir and its ancestors in the root (once each); returns its C path.
    fn dirs_to(&mut self, path: &Path) -> Result<CString, VmError> {
        let mut at = PathBuf::from("/");
        for c in path.components() {
            if let Component::Normal(name) = c {
                at.push(name);
                if !self.dirs.contains(&at) {
                    self.dirs.push(at.clone());
                    self.ops.push(Op::Dir(cstr(&mount_path(&at))?));
                }
            }
        }
        cstr(&mount_path(path))
    }

    fn bind(&mut self, path: &Path, access: Access) -> Result<(), VmError> {
        let is_dir = fs::metadata(path).map_err(|e| VmError::io(format!("stat {}", path.display()), e))?.is_dir();
        let dst = if is_dir {
            self.dirs_to(path)?
        } else {
            if let Some(parent) = path.parent() {
                self.dirs_to(parent)?;
            }
            let dst = self.inside(path)?;
            self.ops.push(Op::File(dst.clone()));
            dst
        };
        let flags = match access {
            Access::ReadOnly => libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            Access::ReadWrite => libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Access::Device { writable: true } => libc::MS_NOSUID | libc::MS_NOEXEC,
            Access::Device { writable: false } => libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
        };
        // The source resolves symlinks (e.g. /etc/resolv.conf into /run); the place in the
        // root keeps the path QEMU asks for.
        let src = fs::canonicalize(path).map_err(|e| VmError::io(format!("resolve {}", path.display()), e))?;
        self.ops.push(Op::Bind { src: cstr(&src)?, dst, flags });
        Ok(())
    }
}

fn mount_path(path: &Path) -> PathBuf {
    let rel = path.strip_prefix("/").unwrap_or(path);
    if rel.as_os_str().is_empty() { PathBuf::from(MOUNT_POINT) } else { Path::new(MOUNT_POINT).join(rel) }
}

/// Everything [`RootPlan::enter`] needs, prepared before fork.
#[derive(Debug)]
pub(crate) struct RootPlan {
    mount_point: CString,
    ops: Vec<Op>,
    proc_dir: CString,
    /// The run dir: the working dir after the switch (same path as on the host).
    workdir: CString,
}

const TMPFS: &std::ffi::CStr = c"tmpfs";
/// Small: the root holds only dirs, empty files and symlinks; root-owned 0755, so the QEMU
/// uid cannot write there (and it is remounted read-only anyway).
const TMPFS_OPTS: &std::ffi::CStr = c"mode=0755,size=64k,nr_inodes=256";
const PROC: &std::ffi::CStr = c"proc";
/// Only the processes of QEMU's own uid (itself), and none of procfs' global files.
const PROC_OPTS: &std::ffi::CStr = c"hidepid=invisible,subset=pid";
/// Kernels before 5.8 know neither `invisible` nor `subset`.
const PROC_OPTS_OLD: &std::ffi::CStr = c"hidepid=2";

impl RootPlan {
    /// Unshares the mount, IPC and UTS namespaces, builds the root and switches to it; the
    /// working dir is then the run dir.
    ///
    /// # Safety
    /// Call only between fork and exec (a `pre_exec` closure), as root.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        let check = |r: libc::c_int| if r == -1 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
        let null = std::ptr::null::<libc::c_char>();
        let no_data = std::ptr::null::<libc::c_void>();
        // SAFETY (whole block): each call is a raw, async-signal-safe syscall on NUL-terminated
        // strings and constants prepared before fork; nothing allocates or takes a lock.
        // The mounts happen in the child's fresh mount namespace and never propagate back
        // (everything is made private first).
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS))?;
            check(libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, no_data))?;
            let tmpfs_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            check(libc::mount(
                TMPFS.as_ptr(),
                self.mount_point.as_ptr(),
                TMPFS.as_ptr(),
                tmpfs_flags,
                TMPFS_OPTS.as_ptr().cast(),
            ))?;
            // The server's umask (0o077) would make the stand-ins 0700: QEMU's uid could not
            // walk to its run dir. Exact modes here; QEMU itself gets the umask back.
            let umask = libc::umask(0);
            for op in &self.ops {
                match op {
                    Op::Dir(p) => check(libc::mkdir(p.as_ptr(), 0o755))?,
                    Op::File(p) => {
                        let fd = libc::open(
                            p.as_ptr(),
                            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        check(fd)?;
                        libc::close(fd);
                    }
                    Op::Link { target, path } => check(libc::symlink(target.as_ptr(), path.as_ptr()))?,
                    Op::Bind { src, dst, flags } => {
                        check(libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND, no_data))?;
                        let remount = libc::MS_REMOUNT | libc::MS_BIND | flags;
                        check(libc::mount(null, dst.as_ptr(), null, remount, no_data))?;
                    }
                }
            }
            libc::umask(umask);
            let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            if libc::mount(PROC.as_ptr(), self.proc_dir.as_ptr(), PROC.as_ptr(), proc_flags, PROC_OPTS.as_ptr().cast())
                == -1
            {
                check(libc::mount(
                    PROC.as_ptr(),
                    self.proc_dir.as_ptr(),
                    PROC.as_ptr(),
                    proc_flags,
                    PROC_OPTS_OLD.as_ptr().cast(),
                ))?;
            }
            // pivot_root(".", ".") stacks the old root on the new one; detaching it leaves
            // only the new root in this namespace.
            check(libc::chdir(self.mount_point.as_ptr()))?;
            let dot = c".".as_ptr();
            check(libc::syscall(libc::SYS_pivot_root, dot, dot) as libc::c_int)?;
            check(libc::umount2(dot, libc::MNT_DETACH))?;
            check(libc::chdir(c"/".as_ptr()))?;
            check(libc::mount(null, c"/".as_ptr(), null, libc::MS_REMOUNT | libc::MS_RDONLY | tmpfs_flags, no_data))?;
            check(libc::chdir(self.workdir.as_ptr()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_binds_only_what_qemu_needs() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("vm1");
        fs::create_dir(&run).unwrap();
        let root = SystemRoot::new(Path::new("qemu-system-x86_64"), &[]).unwrap();
        assert!(root.qemu.is_absolute() && root.covers(&root.qemu), "{root:?}");
        let plan = root.plan(&run, false).unwrap();
        let text = format!("{plan:?}");
        let run = fs::canonicalize(&run).unwrap();
        let inside = |p: &str| format!("{MOUNT_POINT}{p}");
        let binds: Vec<(String, String, libc::c_ulong)> = plan
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::Bind { src, dst, flags } => {
                    Some((src.to_string_lossy().into_owned(), dst.to_string_lossy().into_owned(), *flags))
                }
                _ => None,
            })
            .collect();
        let find = |src: &str| binds.iter().find(|(s, _, _)| s == src).cloned();
        let (_, dst, flags) = find("/usr").expect("/usr is bound");
        assert_eq!(dst, inside("/usr"));
        assert_ne!(flags & libc::MS_RDONLY, 0, "read-only");
        let (_, dst, flags) = find(run.to_str().unwrap()).expect("the run dir is bound");
        assert_eq!(dst, inside(run.to_str().unwrap()), "at the same path");
        assert_eq!(flags & libc::MS_RDONLY, 0, "read-write");
        assert_ne!(flags & libc::MS_NOEXEC, 0);
        assert!(find("/dev/null").is_some() && find("/dev/urandom").is_some());
        assert!(find("/dev/kvm").is_none(), "no /dev/kvm under TCG");
        assert!(binds.iter().all(|(s, _, _)| !s.starts_with("/work") && !s.starts_with("/var")), "{binds:?}");
        assert!(text.contains(&format!("{:?}", cstr(Path::new(&inside("/proc"))).unwrap())));
        if fs::symlink_metadata("/lib").is_ok_and(|m| m.file_type().is_symlink()) {
            assert!(
                plan.ops
                    .iter()
                    .any(|op| matches!(op, Op::Link { path, .. } if path.to_bytes() == inside("/lib").as_bytes()))
            );
        }
        let kvm = root.plan(&run, true).unwrap();
        assert!(format!("{kvm:?}").contains("/dev/kvm"));
        // Every dir is created once, parents first.
        let dirs: Vec<_> =
            plan.ops.iter().filter_map(|op| if let Op::Dir(d) = op { Some(d.clone()) } else { None }).collect();
        let mut unique = dirs.clone();
        unique.dedup();
        assert_eq!(dirs.len(), unique.len());
    }

    #[test]
    fn a_missing_binary_is_a_clear_error() {
        let err = SystemRoot::new(Path::new("no-such-qemu-binary"), &[]).unwrap_err();
        assert!(err.to_string().contains("not found in PATH"), "{err}");
    }
}
