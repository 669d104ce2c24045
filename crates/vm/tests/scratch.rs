//! The writable layer on a scratch disk: a run writes more than the guest's RAM, hits ENOSPC
//! at its cap (a normal failing command, not a dead VM), keeps sparse files sparse, and costs
//! the host's disk what it wrote and no more, in a cold-booted VM and in a template clone.

mod common;

use std::os::unix::fs::MetadataExt;

use boxwood_vm::{QemuRuntime, Vm, VmConfig, VmRuntime};
use common::*;

const MIB: u64 = 1 << 20;
/// The guest has 256 MiB of RAM; the run writes more than that.
const WRITE_MIB: u64 = 320;
const CAP: u64 = 448 * MIB;

fn sh(id: u32, script: &str) -> boxwood_protocol::Spawn {
    spawn_req(id, &["sh", "-c", script])
}

/// Bytes the host holds for the VM's scratch disk: the file among QEMU's fds whose size is
/// the run's cap (it has no name: it was created unlinked).
fn scratch_on_host(qemu_pid: u32) -> u64 {
    // QEMU holds it twice (the inherited fd and its fdset's own dup): one inode.
    let disks: std::collections::BTreeMap<(u64, u64), u64> = open_files(qemu_pid)
        .into_iter()
        .filter(|m| m.len() == CAP)
        .map(|m| ((m.dev(), m.ino()), m.blocks() * 512))
        .collect();
    assert_eq!(disks.len(), 1, "one scratch disk of {CAP} bytes among QEMU's fds");
    disks.into_values().next().unwrap_or_default()
}

async fn writes_beyond_ram_until_its_cap(vm: &dyn Vm, label: &str) {
    let before = scratch_on_host(vm.qemu_pid());
    assert!(before < 8 * MIB, "{label}: an empty scratch disk costs {before} bytes on the host");

    let r =
        run(vm, sh(1, &format!("dd if=/dev/zero of=/big bs=1M count={WRITE_MIB} 2>&1 && sync && wc -c < /big"))).await;
    assert_eq!(r.exit.code, 0, "{label}: writing {WRITE_MIB} MiB: {} {}", r.out(), String::from_utf8_lossy(&r.stderr));
    assert!(r.out().ends_with(&format!("{}\n", WRITE_MIB * MIB)), "{label}: {}", r.out());
    let written = scratch_on_host(vm.qemu_pid());
    assert!(
        (WRITE_MIB * MIB..(WRITE_MIB + 16) * MIB).contains(&written),
        "{label}: the host holds {written} bytes for {WRITE_MIB} MiB written"
    );

    // A 1 TiB sparse file costs its one MiB of data.
    let r = run(vm, sh(2, "dd if=/dev/zero of=/sparse bs=1M count=1 seek=1048575 && sync && stat -c '%s %b' /sparse"))
        .await;
    assert_eq!(r.exit.code, 0, "{label}: {} {}", r.out(), String::from_utf8_lossy(&r.stderr));
    assert!(r.out().starts_with(&format!("{} ", 1u64 << 40)), "{label}: {}", r.out());
    let grew = scratch_on_host(vm.qemu_pid()) - written;
    assert!(grew < 4 * MIB, "{label}: a 1 TiB sparse file cost the host {grew} bytes");

    // Past the cap: ENOSPC, a normal non-zero exit, and the VM carries on.
    let r = run(vm, sh(3, "dd if=/dev/zero of=/more bs=1M count=256")).await;
    let err = String::from_utf8_lossy(&r.stderr);
    assert_ne!(r.exit.code, 0, "{label}: writing past the cap must fail");
    assert!(err.contains("No space left on device"), "{label}: {err}");
    assert!(scratch_on_host(vm.qemu_pid()) <= CAP, "{label}: never more than the cap on the host");

    // Deleting gives the blocks back to the host (discard).
    let r = run(vm, sh(4, "rm /big /more /sparse && sync && echo ok")).await;
    assert_eq!(r.out(), "ok\n", "{label}");
    let mut left = u64::MAX;
    for _ in 0..50 {
        left = scratch_on_host(vm.qemu_pid());
        if left < 32 * MIB {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(left < 32 * MIB, "{label}: after rm the host still holds {left} bytes");
}

fn capped(name: &str) -> boxwood_vm::VmSpec {
    let mut spec = vm_spec(name);
    spec.rootfs.upper_size_bytes = CAP;
    spec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writable_layer_is_a_disk_bounded_by_its_cap_not_by_ram() {
    // Positive control: with the layer in guest RAM (a tmpfs), the same write fails.
    let dir = run_dir();
    let config = VmConfig { snapshot: false, upper_disk: false, ..test_config(Vec::new()) };
    let rt = QemuRuntime::new(config, assets().clone(), dir.path().to_path_buf()).await.unwrap();
    let vm = rt.start(capped("in-ram")).await.expect("boot");
    let r =
        run(vm.as_ref(), sh(1, &format!("dd if=/dev/zero of=/big bs=1M count={WRITE_MIB} 2>&1 && echo wrote"))).await;
    assert!(!r.out().contains("wrote"), "a tmpfs layer in 256 MiB of RAM took {WRITE_MIB} MiB: {}", r.out());
    drop(vm);
    drop(rt);

    let dir = run_dir();
    let rt = cold_runtime(dir.path(), Vec::new()).await;
    let vm = rt.start(capped("cold")).await.expect("cold boot");
    writes_beyond_ram_until_its_cap(vm.as_ref(), "cold").await;
    let pid = vm.qemu_pid();
    vm.shutdown().await.unwrap();
    assert!(wait_dead(pid).await);
    drop(rt);

    let dir = run_dir();
    let rt = runtime(dir.path(), Vec::new()).await;
    let vm = rt.start(capped("clone")).await.expect("clone");
    writes_beyond_ram_until_its_cap(vm.as_ref(), "clone").await;
    vm.shutdown().await.unwrap();
}
