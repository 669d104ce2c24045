//! Helpers shared by the end-to-end test binaries: guest assets, the busybox test rootfs,
//! runtimes, VM specs and process helpers.
#![allow(dead_code)]

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use boxwood_protocol::{Exit, OutputStream, RootfsSpec, Spawn};
use boxwood_vm::{
    Accel, DiskSpec, ExportBudget, GuestAssets, ProcessEvent, QemuRuntime, UpperStats, Vm, VmConfig, VmError,
    VmRuntime, VmSpec, prepare_guest_assets,
};

pub const WORKSPACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
pub const ROOTFS_SERIAL: &str = "rootfs0";

pub fn agent_binary() -> PathBuf {
    let path = std::env::var_os("BOXWOOD_AGENT_BIN").map_or_else(
        || Path::new(WORKSPACE).join("target/x86_64-unknown-linux-gnu/agent/boxwood-agent"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "agent binary {} is missing: run scripts/build-agent.sh first (or set BOXWOOD_AGENT_BIN)",
        path.display()
    );
    path
}

/// Kernel + initramfs, built once per test binary into target/ (reused across runs).
pub fn assets() -> &'static GuestAssets {
    static ASSETS: OnceLock<GuestAssets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        let started = Instant::now();
        let assets = prepare_guest_assets(&agent_binary(), &assets_dir(), None).expect("prepare guest assets");
        eprintln!("guest assets ready in {:?}: {assets:?}", started.elapsed());
        assets
    })
}

/// A busybox erofs image: `bin/busybox` + applet symlinks, and a script in `/opt/tools`. Built
/// once into target/ (atomically, so parallel test processes can race) and reused.
pub fn rootfs_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (busybox-static) is needed");
        // Bump the layout version when the tree below changes.
        let image = assets_dir().join(format!("test-rootfs-v6-{}.erofs", busybox.len()));
        if image.is_file() {
            return image;
        }
        std::fs::create_dir_all(assets_dir()).unwrap();
        let work = tempfile::tempdir_in(assets_dir()).unwrap();
        let tree = work.path().join("tree");
        for d in ["bin", "tmp", "opt/tools", "data/dir1", "data/rendir"] {
            std::fs::create_dir_all(tree.join(d)).unwrap();
        }
        std::fs::write(tree.join("bin/busybox"), &busybox).unwrap();
        std::fs::set_permissions(tree.join("bin/busybox"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let applets = [
            "sh",
            "echo",
            "cat",
            "sleep",
            "id",
            "pwd",
            "env",
            "od",
            "date",
            "head",
            "wc",
            "hostname",
            "true",
            "false",
            "ls",
            "ln",
            "mv",
            "rm",
            "mkdir",
            "chmod",
            "mkfifo",
            "stat",
            "sha256sum",
            "wget",
            "httpd",
            "pidof",
            "grep",
            "df",
            "readlink",
            "sync",
            "dd",
        ];
        for applet in applets {
            symlink("busybox", tree.join("bin").join(applet)).unwrap();
        }
        // Lower-layer content the export tests change.
        for (file, text) in [
            ("data/keep.txt", "keep\n"),
            ("data/del.txt", "delete me\n"),
            ("data/mod.txt", "original\n"),
            ("data/ren.txt", "rename me\n"),
            ("data/chm.txt", "chmod me\n"),
            ("data/dir1/a", "a\n"),
            ("data/dir1/b", "b\n"),
            ("data/rendir/x", "x\n"),
        ] {
            std::fs::write(tree.join(file), text).unwrap();
        }
        // Symlinks that try to lead out of the root.
        symlink("/..", tree.join("evil")).unwrap();
        symlink("../../../..", tree.join("evil-rel")).unwrap();
        symlink("/proc/self/root", tree.join("evil-magic")).unwrap();
        let greet = tree.join("opt/tools/greet");
        std::fs::write(&greet, "#!/bin/sh\necho greet \"$@\"\n").unwrap();
        std::fs::set_permissions(&greet, std::fs::Permissions::from_mode(0o755)).unwrap();
        let tmp_image = work.path().join("rootfs.erofs");
        // The erofs writer reads the store's inert form, so the live tree is converted first.
        boxwood_image::inert::make_inert(&tree).unwrap();
        let built = boxwood_image::erofs::tree_from_dir(&tree).unwrap();
        boxwood_image::erofs::write_image(&built, &tmp_image).unwrap();
        std::fs::rename(&tmp_image, &image).unwrap();
        image
    })
}

pub fn assets_dir() -> PathBuf {
    Path::new(WORKSPACE).join("target/boxwood-test-assets")
}

/// A short run dir (unix socket paths must stay under 108 bytes).
pub fn run_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("bw").tempdir_in("/tmp").unwrap()
}

/// TCG, generous timeouts, fast start on with a pool of one (the machine has two cores).
pub fn test_config(extra_kernel_args: Vec<String>) -> VmConfig {
    VmConfig { accel: Accel::Tcg, boot_timeout_secs: 120, extra_kernel_args, pool_size: Some(1), ..VmConfig::default() }
}

/// A runtime whose VMs are template clones (the default), once its template is ready. With
/// kernel arguments that keep the template from booting, its VMs cold-boot.
pub async fn runtime(run_dir: &Path, extra_kernel_args: Vec<String>) -> QemuRuntime {
    let rt = QemuRuntime::new(test_config(extra_kernel_args), assets().clone(), run_dir.to_path_buf()).await.unwrap();
    assert_eq!(rt.accel(), "tcg");
    rt.wait_ready(Duration::from_secs(180)).await;
    rt
}

/// A runtime whose VMs always cold-boot (`snapshot = false`).
pub async fn cold_runtime(run_dir: &Path, extra_kernel_args: Vec<String>) -> QemuRuntime {
    let config = VmConfig { snapshot: false, ..test_config(extra_kernel_args) };
    let rt = QemuRuntime::new(config, assets().clone(), run_dir.to_path_buf()).await.unwrap();
    assert!(!rt.wait_ready(Duration::from_secs(1)).await);
    rt
}

pub fn vm_spec(name: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        disks: vec![DiskSpec { path: rootfs_image().to_path_buf(), serial: ROOTFS_SERIAL.into() }],
        rootfs: RootfsSpec { lower_serials: vec![ROOTFS_SERIAL.into()], upper_size_bytes: 64 << 20, upper_disk: None },
        hostname: format!("host-{name}"),
        memory_mib: None,
        vcpus: None,
        network: false,
        upper_on_disk: true,
    }
}

pub fn spawn_req(id: u32, argv: &[&str]) -> Spawn {
    Spawn {
        id,
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![("PATH".into(), "/bin".into())],
        cwd: "/".into(),
        uid: 0,
        gid: 0,
        stdin: Vec::new(),
        close_stdin: true,
        timeout_ms: None,
        output_limit_bytes: 1 << 20,
    }
}

pub struct Outcome {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: Exit,
}

impl Outcome {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

pub async fn collect(mut events: tokio::sync::mpsc::UnboundedReceiver<ProcessEvent>) -> Outcome {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while let Some(ev) = events.recv().await {
        match ev {
            ProcessEvent::Output { stream: OutputStream::Stdout, data } => stdout.extend(data),
            ProcessEvent::Output { stream: OutputStream::Stderr, data } => stderr.extend(data),
            ProcessEvent::Exited(exit) => {
                assert!(events.recv().await.is_none(), "nothing may follow Exited");
                return Outcome { stdout, stderr, exit };
            }
            ProcessEvent::Lost(e) => panic!("process lost: {e}"),
        }
    }
    panic!("event stream ended without Exited");
}

pub async fn run(vm: &dyn Vm, spawn: Spawn) -> Outcome {
    let argv = spawn.argv.clone();
    let process = vm.spawn(spawn).await.unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
    assert!(process.pid > 1);
    collect(process.events).await
}

pub fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
}

pub async fn wait_dead(pid: u32) -> bool {
    for _ in 0..100 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Entries of a run dir other than the runtime's own cache of formatted scratch filesystems
/// (`.scratch-bases`, which outlives VMs by design): what VMs left behind.
pub fn vm_dirs_left(run_dir: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(run_dir).unwrap().flatten().map(|e| e.file_name()).filter(|n| n != ".scratch-bases").collect()
}

/// Exports the VM's upper directory into a new file at `path`.
pub async fn export_to(vm: &dyn Vm, path: &Path, budget: &dyn ExportBudget) -> Result<UpperStats, VmError> {
    let mut file = tokio::fs::File::create(path).await.unwrap();
    let stats = vm.export_upper(&mut file, budget).await;
    tokio::io::AsyncWriteExt::flush(&mut file).await.unwrap();
    stats
}

/// The regular files a process holds open (unlinked ones included), by fd.
pub fn open_files(pid: u32) -> Vec<std::fs::Metadata> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the process's fds");
    fds.flatten().filter_map(|fd| std::fs::metadata(fd.path()).ok()).filter(|m| m.is_file()).collect()
}
