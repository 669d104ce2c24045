//! Fast start with real QEMU microVMs (TCG): template clones get distinct entropy, boot ids
//! and the host's clock; pooled clones run commands on their mounted image layers; a clone
//! without networking has no NIC; VMs cold-boot when snapshots are off or the template cannot
//! be built; dropping the runtime kills the pool.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boxwood_protocol::RootfsSpec;
use boxwood_vm::{DiskSpec, QemuRuntime, Vm, VmConfig, VmRuntime, VmSpec};
use common::*;

async fn fast_runtime(dir: &Path, pool_size: usize) -> QemuRuntime {
    let config = VmConfig { pool_size: Some(pool_size), ..test_config(Vec::new()) };
    let rt = QemuRuntime::new(config, assets().clone(), dir.to_path_buf()).await.unwrap();
    assert!(rt.wait_ready(Duration::from_secs(180)).await, "the template must build");
    rt
}

async fn sh(vm: &dyn Vm, id: u32, script: &str) -> Outcome {
    run(vm, spawn_req(id, &["sh", "-c", script])).await
}

fn host_secs() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()).unwrap()
}

async fn guest_secs(vm: &dyn Vm) -> i64 {
    sh(vm, 90, "date +%s").await.out().trim().parse().unwrap()
}

/// Two clones restored from one snapshot (no pool) must not share RNG state or the boot id,
/// and both get the host's clock; so does a pooled clone that waited idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_get_their_own_entropy_boot_id_and_the_host_clock() {
    let dir = run_dir();
    let rt = fast_runtime(dir.path(), 0).await;
    let (a, b) = tokio::join!(rt.start(vm_spec("clone-a")), rt.start(vm_spec("clone-b")));
    let (a, b) = (a.expect("clone a"), b.expect("clone b"));
    eprintln!("CLONE a {:?} b {:?}", a.boot_duration(), b.boot_duration());
    let mut randoms = Vec::new();
    for vm in [&a, &b] {
        assert_eq!(vm.hello().kernel_release, assets().kernel_release);
        assert_eq!(vm.hello().boot_id.len(), 36, "{:?}", vm.hello());
        // Both the /dev/urandom read path and getrandom(2) (busybox `mktemp` names).
        let r = sh(vm.as_ref(), 1, "od -An -N32 -tx1 /dev/urandom; busybox mktemp -u XXXXXXXXXXXX").await;
        assert_eq!(r.exit.code, 0, "{}", String::from_utf8_lossy(&r.stderr));
        randoms.push(r.out());
        let (guest, host) = (guest_secs(vm.as_ref()).await, host_secs());
        assert!((guest - host).abs() <= 2, "guest clock {guest} vs host {host}");
    }
    assert_ne!(randoms[0], randoms[1], "two clones must not share RNG state");
    assert_ne!(a.hello().boot_id, b.hello().boot_id, "each clone has its own boot id");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    drop(rt);

    let rt = fast_runtime(dir.path(), 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let vm = rt.start(vm_spec("waited")).await.expect("pooled clone");
    let (guest, host) = (guest_secs(vm.as_ref()).await, host_secs());
    assert!((guest - host).abs() <= 2, "a pooled clone's clock is set when it is assigned: {guest} vs {host}");
    vm.shutdown().await.unwrap();
}

/// A small erofs layer that shadows one file of the test rootfs.
fn overlay_layer() -> std::path::PathBuf {
    let path = assets_dir().join("test-layer-top-v3.erofs");
    if path.is_file() {
        return path;
    }
    let work = tempfile::tempdir_in(assets_dir()).unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("data")).unwrap();
    std::fs::write(tree.join("data/keep.txt"), "from the top layer\n").unwrap();
    let tmp = work.path().join("top.erofs");
    boxwood_image::inert::make_inert(&tree).unwrap();
    boxwood_image::erofs::write_image(&boxwood_image::erofs::tree_from_dir(&tree).unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// A pooled (restored, warmed) clone gets the run's two layers behind its slots, in order,
/// runs its first command quickly, and shows nothing of the warm-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_clone_runs_on_its_mounted_layers() {
    let dir = run_dir();
    let rt = fast_runtime(dir.path(), 1).await;
    assert_eq!(rt.pooled_pids().len(), 1);
    let spec = VmSpec {
        disks: vec![
            DiskSpec { path: rootfs_image().to_path_buf(), serial: "base".into() },
            DiskSpec { path: overlay_layer(), serial: "top".into() },
        ],
        rootfs: RootfsSpec {
            lower_serials: vec!["top".into(), "base".into()],
            upper_size_bytes: 16 << 20,
            upper_disk: None,
        },
        ..vm_spec("pooled")
    };
    let started = Instant::now();
    let vm = rt.start(spec).await.expect("pooled clone");
    let r = run(vm.as_ref(), spawn_req(1, &["true"])).await;
    let first = started.elapsed();
    eprintln!("POOLED start {:?}, start + first `true` {first:?}", vm.boot_duration());
    assert_eq!(r.exit.code, 0);
    assert_eq!(vm.dir(), dir.path().join("pooled"), "the clone's dir is named after the VM");
    assert!(vm.dir().join("qemu.pid").is_file());

    let r = sh(vm.as_ref(), 2, "cat /data/keep.txt /data/mod.txt; /opt/tools/greet hi; ls /; hostname").await;
    assert_eq!(r.exit.code, 0, "{}", String::from_utf8_lossy(&r.stderr));
    let out = r.out();
    assert!(out.starts_with("from the top layer\noriginal\n"), "layers stacked top first: {out}");
    assert!(out.contains("greet hi\n") && out.ends_with("host-pooled\n"), "{out}");
    assert!(!out.contains("warm"), "nothing of the warm-up is visible: {out}");
    // Reads well past the start of the lower disk work (the slot is larger than the layer).
    let r = sh(vm.as_ref(), 3, "sha256sum /bin/busybox").await;
    let want = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(std::fs::read("/bin/busybox").unwrap()));
    assert!(r.out().starts_with(&want), "{}", r.out());
    let console = std::fs::read_to_string(vm.dir().join("console.log")).unwrap();
    assert!(!console.contains("boxwood-agent:"), "the agent logged problems:\n{console}");

    let (pid, vm_dir) = (vm.qemu_pid(), vm.dir().to_path_buf());
    let t = Instant::now();
    vm.shutdown().await.unwrap();
    eprintln!("SHUTDOWN {:?}", t.elapsed());
    assert!(!alive(pid) && !vm_dir.exists());
}

/// A clone of the template (which has a NIC) without networking sees only `lo` and reaches
/// nothing; with networking it reaches a host listener through user-mode networking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_network_on_and_off() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut req = [0u8; 1024];
            let _ = conn.read(&mut req);
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello");
        }
    });
    let dir = run_dir();
    let rt = fast_runtime(dir.path(), 1).await;
    let url = format!("http://10.0.2.2:{port}/");

    let off = rt.start(vm_spec("net-off")).await.expect("clone");
    eprintln!("START without network {:?}", off.boot_duration());
    assert_eq!(off.setup_report().network, None);
    let r = sh(off.as_ref(), 1, &format!("ls /sys/class/net; cat /proc/net/dev | wc -l; wget -q -T 2 -O- {url}")).await;
    assert_eq!(r.out(), "lo\n3\n", "only loopback, and no route out: {}", String::from_utf8_lossy(&r.stderr));
    assert_ne!(r.exit.code, 0);
    off.shutdown().await.unwrap();

    assert!(rt.wait_ready(Duration::from_secs(60)).await);
    let on = rt.start(VmSpec { network: true, ..vm_spec("net-on") }).await.expect("clone");
    eprintln!("START with network {:?}", on.boot_duration());
    let report = on.setup_report().network.clone().expect("network report");
    assert_eq!(report.configured.address, "10.0.2.15/24");
    let started = Instant::now();
    let r = sh(on.as_ref(), 2, &format!("ls /sys/class/net; wget -q -O- {url}")).await;
    eprintln!("first fetch after assignment: {:?}", started.elapsed());
    assert_eq!((r.out().as_str(), r.exit.code), ("eth0\nlo\nhello", 0), "{}", String::from_utf8_lossy(&r.stderr));
    on.shutdown().await.unwrap();
}

/// `snapshot = false`, or a QEMU that cannot do what templates need: every VM cold-boots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_boot_when_snapshots_are_off_or_unavailable() {
    let dir = run_dir();
    let rt = cold_runtime(dir.path(), Vec::new()).await;
    let vm = rt.start(vm_spec("cold")).await.expect("cold boot");
    assert!(vm.boot_duration() > Duration::from_millis(500), "a real boot: {:?}", vm.boot_duration());
    assert_eq!(sh(vm.as_ref(), 1, "cat /data/keep.txt").await.out(), "keep\n");
    vm.shutdown().await.unwrap();
    drop(rt);

    // A QEMU wrapper that refuses file-backed guest RAM: the template build fails, VMs boot.
    let bin = tempfile::tempdir().unwrap();
    let qemu = bin.path().join("qemu");
    std::fs::write(
        &qemu,
        "#!/bin/sh\ncase \"$*\" in *memory-backend-file*) echo 'no snapshots here' >&2; exit 1;; esac\n\
         exec qemu-system-x86_64 \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = VmConfig { qemu_binary: qemu, ..test_config(Vec::new()) };
    let rt = QemuRuntime::new(config, assets().clone(), dir.path().to_path_buf()).await.unwrap();
    assert!(!rt.wait_ready(Duration::from_secs(180)).await, "no template with this QEMU");
    let vm = rt.start(vm_spec("fallback")).await.expect("cold boot after a failed template");
    assert_eq!(sh(vm.as_ref(), 1, "cat /data/keep.txt").await.out(), "keep\n");
    vm.shutdown().await.unwrap();
}

/// Dropping the runtime kills the pooled QEMUs and removes their dirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_runtime_drains_the_pool() {
    let dir = run_dir();
    let rt = fast_runtime(dir.path(), 2).await;
    let pids = rt.pooled_pids();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|p| alive(*p)));
    drop(rt);
    for pid in pids {
        assert!(wait_dead(pid).await, "pooled QEMU {pid} must die with the runtime");
    }
    let left = vm_dirs_left(dir.path());
    assert!(left.is_empty(), "pool dirs left behind: {left:?}");
}

/// A pooled clone comes with its scratch disk made and mounted for a run of the usual size
/// (`usual_upper_bytes`); a run of another size, or with its layer in RAM, gets the disk
/// remade (or back to the placeholder) first. Each sees an empty upper (nothing of the
/// warm-up) and the cap of its own size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_scratch_disks_are_ready_for_the_usual_size_and_remade_for_others() {
    const USUAL: u64 = 64 << 20;
    let dir = run_dir();
    let host = tempfile::tempdir().unwrap();
    let config = VmConfig { pool_size: Some(1), usual_upper_bytes: Some(USUAL), ..test_config(Vec::new()) };
    let rt = QemuRuntime::new(config, assets().clone(), dir.path().to_path_buf()).await.unwrap();
    let scratch_sectors = "for d in /sys/block/vd*; do [ \"$(cat $d/serial)\" = bwupper ] && cat $d/size; done";
    for (n, (upper_bytes, on_disk)) in [(USUAL, true), (32 << 20, true), (USUAL, false)].into_iter().enumerate() {
        assert!(rt.wait_ready(Duration::from_secs(180)).await, "the template must build");
        let pooled = rt.pooled_pids();
        assert_eq!(pooled.len(), 1);
        assert!(
            open_files(pooled[0]).iter().any(|m| m.len() == USUAL),
            "case {n}: the idle clone's disk is made already"
        );
        let mut spec = vm_spec(&format!("scratch{n}"));
        spec.rootfs.upper_size_bytes = upper_bytes;
        spec.upper_on_disk = on_disk;
        let vm = rt.start(spec).await.expect("pooled clone");
        assert_eq!(vm.qemu_pid(), pooled[0], "case {n}: the pooled clone was used");
        let stats = export_to(&*vm, &host.path().join(format!("{n}-empty.tar")), &u64::MAX).await.expect("export");
        assert_eq!(stats.entries, 0, "case {n}: the upper starts empty");
        let r = sh(vm.as_ref(), 1, scratch_sectors).await;
        let want = if on_disk { upper_bytes } else { 1 << 20 };
        assert_eq!(r.out().trim(), (want / 512).to_string(), "case {n}: the scratch disk's size");
        if on_disk {
            let mib = upper_bytes >> 20;
            let r = sh(vm.as_ref(), 2, &format!("dd if=/dev/zero of=/big bs=1M count={}", mib + 8)).await;
            assert_ne!(r.exit.code, 0, "case {n}: the layer is capped at {mib} MiB");
            let err = String::from_utf8_lossy(&r.stderr);
            assert!(err.contains("No space left"), "case {n}: {err}");
        } else {
            sh(vm.as_ref(), 2, "echo x > /small").await;
        }
        // The positive control of the empty-upper check: a change shows.
        let stats = export_to(&*vm, &host.path().join(format!("{n}.tar")), &u64::MAX).await.expect("export");
        assert!(stats.entries > 0, "case {n}: the write is in the upper");
        vm.shutdown().await.unwrap();
    }
}
