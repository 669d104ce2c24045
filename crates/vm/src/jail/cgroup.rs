//! A cgroup per QEMU: memory (guest RAM + QEMU's own), tasks and CPU weight bounded.
//!
//! cgroup v2 when a unified hierarchy offers the `memory` and `pids` controllers to the
//! server's cgroup (`/sys/fs/cgroup` or `/sys/fs/cgroup/unified`), the v1 `memory`, `pids`
//! and `cpu` hierarchies otherwise. Each runtime's VMs live under the server's own cgroup in
//! `boxwood-<k>/` (`k`: its uid block, see [`super::UidBlock`]), one leaf `vm-<uid>` per VM.
//! v2 allows no processes in a cgroup that hands controllers down, so a server whose own
//! cgroup is not the root first moves itself into a `boxwood-server` leaf beside them (what
//! systemd's `Delegate=yes` expects of a service).
//!
//! The child joins its leaf before exec by writing `0` to `cgroup.procs` fds opened here
//! (limits apply from QEMU's first instruction); the leaf is removed once QEMU is reaped.
//! A crashed server's leftovers (`boxwood-<j>` whose uid block is not held) are removed when
//! a runtime starts.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::VmError;

/// What bounds one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub memory_bytes: u64,
    pub pids: u32,
    /// cgroup v2 scale (1–10000, 100 = the default share).
    pub cpu_weight: u32,
}

/// The hierarchies in use, each as the dir of this runtime's block (`…/boxwood-<k>`).
#[derive(Debug)]
pub(crate) enum Cgroups {
    V2 { block: PathBuf, cpu: bool },
    V1 { memory: PathBuf, pids: PathBuf, cpu: Option<PathBuf> },
}

/// One VM's cgroup: its leaf dirs (one per hierarchy) and the `cgroup.procs` fds its QEMU
/// joins through. Removed on drop (after QEMU has been reaped).
#[derive(Debug)]
pub(crate) struct VmCgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<OwnedFd>,
}

impl VmCgroup {
    /// `cgroup.procs` of every leaf, opened for writing.
    pub fn procs(&self) -> &[OwnedFd] {
        &self.procs
    }

    /// Closes the fds (the child has joined).
    pub fn joined(&mut self) {
        self.procs.clear();
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        self.procs.clear();
        for dir in &self.dirs {
            if let Err(e) = remove_leaf(dir) {
                tracing::warn!(dir = %dir.display(), "cannot remove a VM cgroup: {e}");
            }
        }
    }
}

/// A line of `/proc/self/mountinfo` that is a cgroup mount.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    /// The mount's root inside the hierarchy (`/` unless a sub-tree is mounted).
    root: String,
    mount_point: PathBuf,
    v2: bool,
    /// v1: the controllers of the hierarchy (from the super options).
    controllers: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else { continue };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        let (Some(root), Some(mount_point), Some(fstype)) = (pre.get(3), pre.get(4), post.first()) else { continue };
        let v2 = *fstype == "cgroup2";
        if !v2 && *fstype != "cgroup" {
            continue;
        }
        let controllers = post.get(2).map(|o| o.split(',').map(str::to_owned).collect::<Vec<_>>()).unwrap_or_default();
        mounts.push(CgroupMount {
            root: unescape(root),
            mount_point: PathBuf::from(unescape(mount_point)),
            v2,
            controllers,
        });
    }
    mounts
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4]).ok().and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `/proc/self/cgroup`: (controllers, path) per hierarchy; v2's line has no controllers.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
            let ctrls = ctrls.split(',').filter(|c| !c.is_empty()).map(str::to_owned).collect();
            Some((ctrls, path.to_owned()))
        })
        .collect()
}

/// The dir of the server's own cgroup in `mount`, given its path in that hierarchy.
fn own_dir(mount: &CgroupMount, path: &str) -> PathBuf {
    let rel = path.strip_prefix(mount.root.trim_end_matches('/')).unwrap_or(path);
    mount.mount_point.join(rel.trim_start_matches('/'))
}

/// Where this process's cgroups are, read from `/proc/self`.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// The server's own v2 cgroup dir, and whether `cpu` is offered too.
    V2 {
        own: PathBuf,
        cpu: bool,
    },
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: Option<PathBuf>,
    },
}

fn find(mountinfo: &str, proc_cgroup: &str, read: impl Fn(&Path) -> Option<String>) -> Option<Found> {
    let mounts = parse_mountinfo(mountinfo);
    let own = parse_proc_cgroup(proc_cgroup);
    let v2_path = own.iter().find(|(c, _)| c.is_empty()).map(|(_, p)| p.clone());
    if let Some(path) = &v2_path {
        for m in mounts.iter().filter(|m| m.v2) {
            let dir = own_dir(m, path);
            // A server moved into its `boxwood-server` leaf hands controllers down from the
            // cgroup above it.
            let dir = if dir.file_name().is_some_and(|n| n == SERVER_LEAF) {
                dir.parent().map(Path::to_path_buf).unwrap_or(dir)
            } else {
                dir
            };
            let Some(ctrls) = read(&dir.join("cgroup.controllers")) else { continue };
            let ctrls: Vec<&str> = ctrls.split_whitespace().collect();
            if ctrls.contains(&"memory") && ctrls.contains(&"pids") {
                return Some(Found::V2 { own: dir, cpu: ctrls.contains(&"cpu") });
            }
        }
    }
    let v1 = |ctrl: &str| {
        let m = mounts.iter().find(|m| !m.v2 && m.controllers.iter().any(|c| c == ctrl))?;
        let (_, path) = own.iter().find(|(c, _)| c.iter().any(|c| c == ctrl))?;
        Some(own_dir(m, path))
    };
    Some(Found::V1 { memory: v1("memory")?, pids: v1("pids")?, cpu: v1("cpu") })
}

const SERVER_LEAF: &str = "boxwood-server";

fn block_name(k: u32) -> String {
    format!("boxwood-{k}")
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> VmError {
    move |e| VmError::io(context, e)
}

fn write(path: &Path, value: &str) -> Result<(), VmError> {
    fs::write(path, value).map_err(io(format!("write {value:?} to {}", path.display())))
}

impl Cgroups {
    /// Finds the hierarchies, removes leftovers of crashed servers (blocks `is_free` says
    /// nobody holds) and creates this runtime's block dir `boxwood-<k>`.
    pub fn setup(k: u32, is_free: impl Fn(u32) -> Option<Box<dyn Send>>) -> Result<Self, VmError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(io("read /proc/self/mountinfo".into()))?;
        let own = fs::read_to_string("/proc/self/cgroup").map_err(io("read /proc/self/cgroup".into()))?;
        let found = find(&mountinfo, &own, |p| fs::read_to_string(p).ok()).ok_or_else(|| {
            VmError::Jail(
                "no usable cgroup hierarchy: need cgroup v2 with the memory and pids controllers, \
                 or the v1 memory and pids hierarchies"
                    .into(),
            )
        })?;
        let parents: Vec<PathBuf> = match &found {
            Found::V2 { own, .. } => vec![own.clone()],
            Found::V1 { memory, pids, cpu } => {
                [Some(memory), Some(pids), cpu.as_ref()].into_iter().flatten().cloned().collect()
            }
        };
        for parent in &parents {
            sweep(parent, k, &is_free);
        }
        let cgroups = match found {
            Found::V2 { own, cpu } => {
                let ctrls = if cpu { "+memory +pids +cpu" } else { "+memory +pids" };
                enable_v2(&own, ctrls)?;
                let block = own.join(block_name(k));
                create_dir(&block)?;
                write(&block.join("cgroup.subtree_control"), ctrls)?;
                Self::V2 { block, cpu }
            }
            Found::V1 { memory, pids, cpu } => {
                let (memory, pids, cpu) =
                    (memory.join(block_name(k)), pids.join(block_name(k)), cpu.map(|c| c.join(block_name(k))));
                for dir in [Some(&memory), Some(&pids), cpu.as_ref()].into_iter().flatten() {
                    create_dir(dir)?;
                }
                Self::V1 { memory, pids, cpu }
            }
        };
        tracing::info!(?cgroups, "VM cgroups ready");
        Ok(cgroups)
    }

    /// Creates the leaf of the VM with `uid`, with `limits` set, and opens its
    /// `cgroup.procs` for the child to join.
    pub fn create(&self, uid: u32, limits: Limits) -> Result<VmCgroup, VmError> {
        let name = format!("vm-{uid}");
        let mut cg = VmCgroup { dirs: Vec::new(), procs: Vec::new() };
        let mut leaf = |parent: &Path| -> Result<PathBuf, VmError> {
            let dir = parent.join(&name);
            // A leaf of a VM whose removal failed earlier (it had not quite exited).
            if dir.exists() {
                remove_leaf(&dir).map_err(io(format!("remove {}", dir.display())))?;
            }
            fs::create_dir(&dir).map_err(io(format!("create {}", dir.display())))?;
            cg.dirs.push(dir.clone());
            Ok(dir)
        };
        match self {
            Self::V2 { block, cpu } => {
                let dir = leaf(block)?;
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                // Bounded means bounded: no swapping past the limit either.
                if dir.join("memory.swap.max").exists() {
                    write(&dir.join("memory.swap.max"), "0")?;
                }
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
                if *cpu {
                    write(&dir.join("cpu.weight"), &limits.cpu_weight.clamp(1, 10_000).to_string())?;
                }
            }
            Self::V1 { memory, pids, cpu } => {
                let m = leaf(memory)?;
                write(&m.join("memory.limit_in_bytes"), &limits.memory_bytes.to_string())?;
                if m.join("memory.memsw.limit_in_bytes").exists() {
                    write(&m.join("memory.memsw.limit_in_bytes"), &limits.memory_bytes.to_string())?;
                }
                let p = leaf(pids)?;
                write(&p.join("pids.max"), &limits.pids.to_string())?;
                if let Some(cpu) = cpu {
                    let c = leaf(cpu)?;
                    // v1 shares: 1024 is the default as 100 is v2's.
                    let shares = (u64::from(limits.cpu_weight.clamp(1, 10_000)) * 1024 / 100).max(2);
                    write(&c.join("cpu.shares"), &shares.to_string())?;
                }
            }
        }
        for dir in cg.dirs.clone() {
            let procs = dir.join("cgroup.procs");
            let f = File::options().write(true).open(&procs).map_err(io(format!("open {}", procs.display())))?;
            cg.procs.push(f.into());
        }
        Ok(cg)
    }

    /// The leaf dirs a VM with `uid` has (for tests and diagnostics).
    pub fn leaves(&self, uid: u32) -> Vec<PathBuf> {
        let name = format!("vm-{uid}");
        match self {
            Self::V2 { block, .. } => vec![block.join(name)],
            Self::V1 { memory, pids, cpu } => {
                [Some(memory), Some(pids), cpu.as_ref()].into_iter().flatten().map(|d| d.join(&name)).collect()
            }
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let dirs: Vec<&PathBuf> = match &*self {
            Self::V2 { block, .. } => vec![block],
            Self::V1 { memory, pids, cpu } => [Some(memory), Some(pids), cpu.as_ref()].into_iter().flatten().collect(),
        };
        for dir in dirs {
            // Fails (harmlessly) while a VM leaf is still there; the next start sweeps it.
            let _ = fs::remove_dir(dir);
        }
    }
}

fn create_dir(dir: &Path) -> Result<(), VmError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(VmError::io(format!("create {}", dir.display()), e)),
    }
}

/// Enables `ctrls` for `own`'s children; if `own` has processes (v2 allows none in a cgroup
/// that hands controllers down), this process first moves into the `boxwood-server` leaf.
fn enable_v2(own: &Path, ctrls: &str) -> Result<(), VmError> {
    let control = own.join("cgroup.subtree_control");
    match fs::OpenOptions::new().write(true).open(&control).and_then(|mut f| f.write_all(ctrls.as_bytes())) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
        Err(e) => return Err(VmError::io(format!("write {ctrls:?} to {}", control.display()), e)),
    }
    let leaf = own.join(SERVER_LEAF);
    create_dir(&leaf)?;
    write(&leaf.join("cgroup.procs"), "0")?;
    tracing::info!(cgroup = %leaf.display(), "moved the server into a leaf cgroup (cgroup v2 delegation)");
    write(&control, ctrls)
}

/// Removes a VM leaf: kills what is left in it (a crashed server's QEMU), then `rmdir`,
/// retried briefly while the kernel finishes the exit.
fn remove_leaf(dir: &Path) -> std::io::Result<()> {
    let mut last = Ok(());
    for attempt in 0..50 {
        if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Err(e),
        }
        std::thread::sleep(Duration::from_millis(if attempt < 10 { 2 } else { 20 }));
    }
    last
}

/// Removes `parent/boxwood-<j>` trees of blocks nobody holds (a crashed server's), and ours.
/// `is_free(j)` returns the block's lock while it is held for the cleanup.
fn sweep(parent: &Path, k: u32, is_free: &impl Fn(u32) -> Option<Box<dyn Send>>) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(j) = name.to_str().and_then(|n| n.strip_prefix("boxwood-")).and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let _held = if j == k {
            None
        } else {
            match is_free(j) {
                Some(lock) => Some(lock),
                None => continue,
            }
        };
        let block = entry.path();
        if let Ok(leaves) = fs::read_dir(&block) {
            for leaf in leaves.flatten().filter(|l| l.file_type().is_ok_and(|t| t.is_dir())) {
                tracing::info!(cgroup = %leaf.path().display(), "removing a stale VM cgroup");
                if let Err(e) = remove_leaf(&leaf.path()) {
                    tracing::warn!(cgroup = %leaf.path().display(), "cannot remove a stale VM cgroup: {e}");
                }
            }
        }
        let _ = fs::remove_dir(&block);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const CGROUP_V1: &str = "8:pids:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n";

    #[test]
    fn v1_when_the_unified_hierarchy_lacks_controllers() {
        let read = |p: &Path| (p == Path::new("/sys/fs/cgroup/unified/cgroup.controllers")).then(|| "hugetlb\n".into());
        assert_eq!(
            find(MOUNTINFO_V1, CGROUP_V1, read),
            Some(Found::V1 {
                memory: "/sys/fs/cgroup/memory/process_api/abc".into(),
                pids: "/sys/fs/cgroup/pids".into(),
                cpu: Some("/sys/fs/cgroup/cpu".into()),
            })
        );
        let no_pids = MOUNTINFO_V1.replace("rw,pids", "rw,devices");
        assert_eq!(find(&no_pids, CGROUP_V1, read), None, "memory and pids are required");
    }

    #[test]
    fn v2_when_it_offers_memory_and_pids() {
        let mountinfo = "25 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let read = |p: &Path| match p.to_str() {
            Some("/sys/fs/cgroup/system.slice/boxwood.service/cgroup.controllers") => {
                Some("cpu io memory pids\n".into())
            }
            Some("/sys/fs/cgroup/cgroup.controllers") => Some("memory pids\n".into()),
            _ => None,
        };
        assert_eq!(
            find(mountinfo, "0::/system.slice/boxwood.service\n", read),
            Some(Found::V2 { own: "/sys/fs/cgroup/system.slice/boxwood.service".into(), cpu: true })
        );
        // After moving into its leaf, the server hands controllers down from the unit.
        assert_eq!(
            find(mountinfo, "0::/system.slice/boxwood.service/boxwood-server\n", read),
            Some(Found::V2 { own: "/sys/fs/cgroup/system.slice/boxwood.service".into(), cpu: true })
        );
        assert_eq!(find(mountinfo, "0::/\n", read), Some(Found::V2 { own: "/sys/fs/cgroup".into(), cpu: false }));
        let unified = "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        let read =
            |p: &Path| (p == Path::new("/sys/fs/cgroup/unified/x/cgroup.controllers")).then(|| "memory pids".into());
        assert_eq!(
            find(unified, "0::/x\n", read),
            Some(Found::V2 { own: "/sys/fs/cgroup/unified/x".into(), cpu: false })
        );
    }

    #[test]
    fn mountinfo_escapes_and_subtree_mounts() {
        let line = "41 31 0:38 /sub /mnt/c\\040g rw - cgroup cgroup rw,memory,pids\n";
        let m = &parse_mountinfo(line)[0];
        assert_eq!((m.root.as_str(), m.mount_point.as_path()), ("/sub", Path::new("/mnt/c g")));
        assert_eq!(own_dir(m, "/sub/a/b"), PathBuf::from("/mnt/c g/a/b"));
    }
}
