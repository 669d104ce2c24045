//! `Warmup`: runs a freshly restored clone through the code a run takes (building the root,
//! fork, chroot, exec from an erofs layer through overlayfs, output, exit, reaping), then takes
//! the root down again. Under TCG every restored VM starts with an empty translation cache:
//! paying that here, before the clone is handed out, is what makes its run's first command
//! cost milliseconds. The host sends it once to the template too (before the snapshot), which
//! is when the empty network namespace for runs without networking is made. A pooled clone
//! also mounts its scratch disk here, ready for a run of the usual size.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use boxwood_protocol::{Spawn, UpperDisk, WARMUP_ID, Warmup};

use crate::channel::Outbox;
use crate::reaper::Reaper;
use crate::spawn::{self, Table};
use crate::{net, setup};

/// How long the warm-up process may run.
const PROCESS_LIMIT: Duration = Duration::from_secs(20);

/// Does the warm-up; returns what did not work (the VM stays usable either way).
/// `prepared` is set to the scratch disk it leaves mounted (`warm.upper`).
pub async fn run(
    warm: &Warmup,
    no_net_ns: &mut Option<OwnedFd>,
    prepared: &mut Option<UpperDisk>,
    table: &Table,
    reaper: &Reaper,
    out: &Outbox,
) -> Option<String> {
    let mut problems = Vec::new();
    if no_net_ns.is_none() {
        match empty_net_ns() {
            Ok(ns) => *no_net_ns = Some(ns),
            Err(e) => problems.push(e),
        }
    }
    // With a scratch disk to prepare, the warm-up's root is built on it, so that a run's
    // first writes find ext4 and overlayfs on ext4 translated already; the warm-up's own
    // upper is removed afterwards and the disk stays mounted.
    let mut rootfs = warm.rootfs.clone();
    let mut on_disk = None;
    if let Some(upper) = &warm.upper {
        match setup::mount_upper_disk(&upper.serial, upper.bytes) {
            Ok(()) => {
                rootfs.upper_disk = Some(upper.serial.clone());
                rootfs.upper_size_bytes = upper.bytes;
                on_disk = Some(upper.clone());
            }
            Err(e) => problems.push(format!("scratch disk: {e}")),
        }
    }
    match setup::build_root(&rootfs, None, on_disk.clone()) {
        Ok(setup::Root { mut created, .. }) => {
            if let Some(cfg) = &warm.network
                && has_nic()
                && let Err(e) = net::configure(cfg, &mut created, false)
            {
                problems.push(format!("network: {e}"));
            }
            let spawn = Spawn {
                id: WARMUP_ID,
                argv: warm.argv.clone(),
                env: Vec::new(),
                cwd: "/".into(),
                uid: 0,
                gid: 0,
                stdin: Vec::new(),
                close_stdin: true,
                timeout_ms: Some(u64::try_from(PROCESS_LIMIT.as_millis()).unwrap_or(u64::MAX)),
                output_limit_bytes: 4096,
            };
            spawn::spawn(spawn, table, reaper, out).await;
            // `Exited` is queued before the table forgets the process.
            let deadline = Instant::now() + PROCESS_LIMIT + Duration::from_secs(1);
            while table.contains(WARMUP_ID) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Err(e) => problems.push(format!("root: {e}")),
    }
    let kept = on_disk.is_some();
    match setup::teardown_root(warm.rootfs.lower_serials.len(), kept)
        .and_then(|()| if kept { setup::clear_upper() } else { Ok(()) })
    {
        Ok(()) => *prepared = on_disk,
        Err(e) => problems.push(e),
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// Whether the VM has a NIC (a template has; a cold-booted VM without networking has not).
fn has_nic() -> bool {
    std::fs::read_dir("/sys/class/net").is_ok_and(|d| d.flatten().any(|e| e.file_name() != "lo"))
}

/// A new network namespace holding only `lo` (up), kept open by the returned fd. Made on a
/// short-lived thread: `unshare(CLONE_NEWNET)` moves only the calling thread, and the agent's
/// own threads stay where they are.
fn empty_net_ns() -> Result<OwnedFd, String> {
    let worker = std::thread::spawn(|| -> Result<OwnedFd, String> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare: {e}"))?;
        let ns = File::open("/proc/thread-self/ns/net").map_err(|e| format!("open netns: {e}"))?;
        net::loopback_up()?;
        Ok(OwnedFd::from(ns))
    });
    worker.join().map_err(|_| "netns thread panicked".to_owned())?
}
