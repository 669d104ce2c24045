//! Start-up cleanup of VM scratch dirs (and their QEMUs) left behind by a crashed server.
//! Its VM cgroups are removed when the next runtime starts (see `jail::cgroup`).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::VmError;

/// In a VM dir that was renamed after QEMU started (a pooled clone given to a run): the path
/// QEMU was started with.
pub(crate) const ORIGIN_FILE: &str = "origin";

/// For every dir in `run_dir`: if its `qemu.pid` names a live process whose
/// working dir is that dir (QEMU runs in its VM dir, and a renamed dir stays its cwd) or whose
/// command line mentions it (or the dir's `origin`: QEMUs of older versions), SIGKILL it; then remove the
/// dir. Returns the names cleaned. A missing `run_dir` is not an error.
pub fn reap_stale(run_dir: &Path) -> Result<Vec<String>, VmError> {
    let entries = match fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(VmError::io(format!("read {}", run_dir.display()), e)),
    };
    let mut cleaned = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if let Some(pid) = owning_qemu(&dir) {
            tracing::info!(pid, dir = %dir.display(), "killing a stale QEMU");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            wait_gone(pid, Duration::from_secs(2));
        }
        fs::remove_dir_all(&dir).map_err(|e| VmError::io(format!("remove {}", dir.display()), e))?;
        cleaned.push(entry.file_name().to_string_lossy().into_owned());
    }
    cleaned.sort();
    Ok(cleaned)
}

/// The pid in `dir/qemu.pid`, if that process is alive and runs in `dir` (or its command
/// line mentions `dir`).
fn owning_qemu(dir: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(dir.join("qemu.pid")).ok()?.trim().parse().ok()?;
    if pid <= 1 {
        return None;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let origin = fs::read_to_string(dir.join(ORIGIN_FILE)).ok().filter(|o| !o.is_empty());
    // The same directory, whatever path it has now: QEMU sees its dir at the path it was
    // started with (in its own mount namespace), and a pooled clone's dir is renamed later.
    let runs_in = match (fs::metadata(format!("/proc/{pid}/cwd")), fs::metadata(dir)) {
        (Ok(cwd), Ok(d)) => (cwd.dev(), cwd.ino()) == (d.dev(), d.ino()),
        _ => false,
    };
    let dir = dir.to_str()?;
    let mentioned = runs_in || cmdline.contains(dir) || origin.is_some_and(|o| cmdline.contains(&format!("{o}/")));
    (mentioned && !is_zombie(pid)).then_some(pid)
}

fn is_zombie(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name.
    stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

/// Waits until `pid` is gone or a zombie (our own child is not reaped here).
fn wait_gone(pid: i32, limit: Duration) {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
