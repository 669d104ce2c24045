//! The guest cgroup every command runs in. Its process and memory caps make a fork bomb or a
//! memory hog inside the run fail its own forks and allocations, while PID 1 (outside it) keeps
//! the memory and CPU it needs to honour timeouts, export and answer the host.
//!
//! This protects the guest from itself, not the host: the host's own limits (QEMU's cgroup,
//! timeouts, output caps) hold whatever the guest does.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};

const MOUNT: &str = "/sys/fs/cgroup";
const JOBS: &str = "/sys/fs/cgroup/jobs";
/// Memory left outside the jobs' limit for the kernel, the agent and an export.
const RESERVE_KIB: u64 = 24 << 10;

/// The jobs cgroup, as an open `cgroup.procs` a forked child joins by writing `0` to it.
pub struct Jobs {
    procs: Option<OwnedFd>,
}

impl Jobs {
    /// Creates the cgroup. Without cgroup v2 in the kernel, commands run unconfined (logged):
    /// the guest is less robust, the host no less safe.
    pub fn init() -> Self {
        match create() {
            Ok(procs) => Self { procs: Some(procs) },
            Err(err) => {
                crate::log(&format!("commands run without a guest cgroup: {err}"));
                Self { procs: None }
            }
        }
    }

    /// The fd a child writes `0` to (between fork and exec) to join, if the cgroup exists.
    pub fn procs_fd(&self) -> Option<RawFd> {
        self.procs.as_ref().map(AsRawFd::as_raw_fd)
    }
}

fn create() -> io::Result<OwnedFd> {
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    match mount(Some("cgroup2"), MOUNT, Some("cgroup2"), flags, None::<&str>) {
        Ok(()) | Err(Errno::EBUSY) => {}
        Err(err) => return Err(io::Error::other(format!("mount cgroup2: {err}"))),
    }
    // `cpu` sets no limit: it makes the jobs one scheduling entity, so however many of them are
    // runnable, the agent still gets its share of a vCPU.
    write(&format!("{MOUNT}/cgroup.subtree_control"), "+pids +memory +cpu")?;
    match fs::create_dir(JOBS) {
        Err(err) if err.kind() != io::ErrorKind::AlreadyExists => return Err(err),
        _ => {}
    }
    let total_kib = mem_total_kib()?;
    write(&format!("{JOBS}/pids.max"), &pids_max(total_kib).to_string())?;
    write(&format!("{JOBS}/memory.max"), &memory_max(total_kib).to_string())?;
    let procs = OpenOptions::new().write(true).custom_flags(libc::O_CLOEXEC).open(format!("{JOBS}/cgroup.procs"))?;
    Ok(procs.into())
}

fn write(path: &str, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

fn mem_total_kib() -> io::Result<u64> {
    let text = fs::read_to_string("/proc/meminfo")?;
    parse_mem_total(&text).ok_or_else(|| io::Error::other("no MemTotal in /proc/meminfo"))
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// One process per 256 KiB of guest memory, within [256, 32768]: far more than builds and
/// package managers use (1 024 at 256 MiB), and reached long before a fork bomb's kernel
/// stacks and page tables exhaust the memory.
fn pids_max(total_kib: u64) -> u64 {
    (total_kib / 256).clamp(256, 32_768)
}

/// Everything but the reserve, and at least half of the memory.
fn memory_max(total_kib: u64) -> u64 {
    total_kib.saturating_sub(RESERVE_KIB).max(total_kib / 2) * 1024
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_scale_with_memory_and_stay_bounded() {
        assert_eq!(pids_max(256 << 10), 1024);
        assert_eq!(pids_max(16 << 10), 256);
        assert_eq!(pids_max(64 << 20), 32_768);
        assert_eq!(memory_max(256 << 10), (232 << 10) * 1024);
        assert_eq!(memory_max(32 << 10), (16 << 10) * 1024);
    }

    #[test]
    fn mem_total_is_read_from_meminfo() {
        let text = "MemTotal:         233568 kB\nMemFree:          200000 kB\n";
        assert_eq!(parse_mem_total(text), Some(233_568));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
    }
}
