//! End-to-end tests: real QEMU microVMs (TCG) booting the real agent from
//! `scripts/build-agent.sh`, with a busybox erofs root filesystem.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use boxwood_protocol::RootfsSpec;
use boxwood_vm::{Accel, ProcessEvent, QemuRuntime, Vm, VmConfig, VmError, VmRuntime, VmSpec, reap_stale};
use common::*;

/// Two VMs: distinct randomness and a correct clock; then one VM runs the process checks and
/// is shut down, the other is crashed with a guest kernel panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_vms_processes_panic_and_shutdown() {
    let dir = run_dir();
    let rt = runtime(dir.path(), Vec::new()).await;
    let (a, b) = tokio::join!(rt.start(vm_spec("vm-a")), rt.start(vm_spec("vm-b")));
    let (a, b) = (a.expect("boot vm-a"), b.expect("boot vm-b"));
    let boots = vec![a.boot_duration(), b.boot_duration()];
    eprintln!("BOOT vm-a {:?} vm-b {:?} median {:?}", boots[0], boots[1], median(boots.clone()));
    assert_eq!(a.hello().machine, "x86_64");
    assert_eq!(a.hello().kernel_release, assets().kernel_release);
    assert_ne!(a.hello().boot_id, b.hello().boot_id);
    assert!(a.hello().clock_events.starts_with("lapic"), "tick device {:?}", a.hello().clock_events);

    // Entropy and clock.
    let mut randoms = Vec::new();
    for vm in [&a, &b] {
        let r = run(vm.as_ref(), spawn_req(1, &["od", "-An", "-N16", "-tx1", "/dev/urandom"])).await;
        assert_eq!(r.exit.code, 0);
        randoms.push(r.out());
        let r = run(vm.as_ref(), spawn_req(2, &["date", "+%s"])).await;
        let guest: i64 = r.out().trim().parse().unwrap();
        let host = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!((guest - host).abs() <= 5, "guest clock {guest} vs host {host}");
    }
    assert_ne!(randoms[0], randoms[1], "two VMs must not share RNG state");

    process_checks(a.as_ref()).await;
    kernel_panic_is_reported(b).await;

    let (pid, vm_dir) = (a.qemu_pid(), a.dir().to_path_buf());
    assert!(alive(pid) && vm_dir.is_dir());
    let console = std::fs::read_to_string(vm_dir.join("console.log")).unwrap();
    eprintln!("vm-a console.log:\n{console}");
    assert!(!console.contains("boxwood-agent:"), "the agent logged problems:\n{console}");
    a.shutdown().await.expect("shutdown");
    assert!(!alive(pid), "QEMU must be gone after shutdown");
    assert!(!vm_dir.exists(), "the VM dir must be removed");
}

async fn process_checks(vm: &dyn Vm) {
    // stdout, stderr and the exit code.
    let r = run(vm, spawn_req(10, &["sh", "-c", "echo out; echo err >&2; exit 3"])).await;
    assert_eq!((r.out().as_str(), r.stderr.as_slice(), r.exit.code, r.exit.signal), ("out\n", &b"err\n"[..], 3, -1));
    assert_eq!((r.exit.stdout.emitted, r.exit.stderr.emitted, r.exit.timed_out), (4, 4, false));
    assert!(r.exit.rusage.max_rss_kb > 0 && r.exit.duration_us > 0, "{:?}", r.exit);
    assert_eq!(r.exit.id, 10);

    let r = run(vm, spawn_req(11, &["false"])).await;
    assert_eq!(r.exit.code, 1);

    // stdin given with the spawn, then closed.
    let mut s = spawn_req(12, &["cat"]);
    s.stdin = b"hello stdin\n".to_vec();
    assert_eq!(run(vm, s).await.out(), "hello stdin\n");

    // stdin written later, and more than one frame of it.
    let mut s = spawn_req(13, &["wc", "-c"]);
    s.close_stdin = false;
    s.stdin = vec![b'x'; 1000];
    let p = vm.spawn(s).await.unwrap();
    vm.write_stdin(13, vec![b'y'; 3 << 20], false).await.unwrap();
    vm.write_stdin(13, b"z".to_vec(), true).await.unwrap();
    assert!(matches!(vm.write_stdin(13, b"late".to_vec(), false).await, Err(VmError::Rejected(_))));
    assert_eq!(collect(p.events).await.out().trim(), (1000 + (3 << 20) + 1).to_string());

    // Large stdin in the spawn itself, echoed back: no deadlock between stdin and stdout.
    let mut s = spawn_req(14, &["cat"]);
    s.stdin = (0..(2u32 << 20)).map(|i| (i % 251) as u8).collect();
    s.output_limit_bytes = 4 << 20;
    let expected = s.stdin.clone();
    assert!(run(vm, s).await.stdout == expected, "large stdin round trip");

    // PATH lookup without a shell, with the PATH from env.
    assert_eq!(run(vm, spawn_req(15, &["echo", "x"])).await.out(), "x\n");
    let mut s = spawn_req(16, &["greet", "y"]);
    s.env = vec![("PATH".into(), "/opt/tools:/bin".into())];
    assert_eq!(run(vm, s).await.out(), "greet y\n");

    // cwd is created.
    let mut s = spawn_req(17, &["pwd"]);
    s.cwd = "/work/deep/dir".into();
    assert_eq!(run(vm, s).await.out(), "/work/deep/dir\n");

    // uid/gid, supplementary groups dropped.
    let mut s = spawn_req(18, &["sh", "-c", "id -u; id -g; id -G"]);
    (s.uid, s.gid) = (1000, 1000);
    assert_eq!(run(vm, s).await.out(), "1000\n1000\n1000\n");

    // The environment is exactly the given one.
    let mut s = spawn_req(19, &["env"]);
    s.env.push(("FOO".into(), "bar baz".into()));
    let out = run(vm, s).await.out();
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines, ["FOO=bar baz", "PATH=/bin"]);

    // Timeout kills the process group.
    let mut s = spawn_req(20, &["sh", "-c", "sleep 30; echo never"]);
    s.timeout_ms = Some(500);
    let started = Instant::now();
    let r = run(vm, s).await;
    assert!(r.exit.timed_out && r.exit.signal == 9 && r.exit.code == -1, "{:?}", r.exit);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(r.stdout.is_empty());

    // Output limit: 100 bytes forwarded, the rest counted.
    let mut s = spawn_req(21, &["head", "-c", "10000", "/dev/zero"]);
    s.output_limit_bytes = 100;
    let r = run(vm, s).await;
    assert_eq!(r.stdout.len(), 100);
    assert_eq!((r.exit.stdout.emitted, r.exit.stdout.dropped, r.exit.code), (100, 9900, 0));

    // Exec failure.
    match vm.spawn(spawn_req(22, &["nosuchcmd"])).await {
        Err(VmError::SpawnFailed { error }) => {
            assert!(error.contains("nosuchcmd") && error.contains("No such file"), "{error}")
        }
        other => panic!("expected SpawnFailed, got {other:?}"),
    }
    // A cwd that cannot be created (a file is in the way).
    let mut s = spawn_req(23, &["pwd"]);
    s.cwd = "/bin/busybox/sub".into();
    match vm.spawn(s).await {
        Err(VmError::SpawnFailed { error }) => assert!(error.contains("cwd"), "{error}"),
        other => panic!("expected SpawnFailed, got {other:?}"),
    }

    // A signal to the process group.
    let p = vm.spawn(spawn_req(24, &["sleep", "30"])).await.unwrap();
    vm.signal(24, 15).await.unwrap();
    let r = collect(p.events).await;
    assert_eq!((r.exit.code, r.exit.signal, r.exit.timed_out), (-1, 15, false));
    assert!(matches!(vm.signal(24, 9).await, Err(VmError::Rejected(_))));

    // A background child holding the pipes open does not delay Exited for long.
    let started = Instant::now();
    let r = run(vm, spawn_req(25, &["sh", "-c", "sleep 100 & echo done"])).await;
    assert_eq!((r.out().as_str(), r.exit.code), ("done\n", 0));
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());

    // Hostname, a writable overlay root and the inner mounts.
    assert_eq!(run(vm, spawn_req(26, &["hostname"])).await.out(), "host-vm-a\n");
    let script = "echo hi > /tmp/f && cat /tmp/f && cat /proc/mounts";
    let out = run(vm, spawn_req(27, &["sh", "-c", script])).await.out();
    assert!(out.starts_with("hi\n"), "{out}");
    for fs in ["overlay", "devpts", "proc", "sysfs"] {
        assert!(out.contains(fs), "{fs} missing in {out}");
    }
}

async fn kernel_panic_is_reported(vm: Box<dyn Vm>) {
    let pid = vm.qemu_pid();
    let p = vm.spawn(spawn_req(30, &["sh", "-c", "echo c > /proc/sysrq-trigger"])).await.unwrap();
    let mut events = p.events;
    let detail = loop {
        match events.recv().await {
            Some(ProcessEvent::Lost(VmError::Crashed { detail })) => break detail,
            Some(ProcessEvent::Output { .. }) => continue,
            other => panic!("expected Lost(Crashed), got {other:?}"),
        }
    };
    eprintln!("crash detail:\n{detail}");
    assert!(detail.contains("Kernel panic") && detail.contains("sysrq"), "{detail}");
    assert!(wait_dead(pid).await, "QEMU must exit after a guest panic");
    assert!(matches!(vm.spawn(spawn_req(31, &["true"])).await, Err(VmError::Crashed { .. })));
    let dir = vm.dir().to_path_buf();
    vm.shutdown().await.expect("shutdown of a dead VM");
    assert!(!dir.exists());
}

/// A guest that cannot start its init dies before its agent's `Hello`: it is booted once
/// more (unit-tested in `runtime`), then fails with the kernel's panic in the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_failure_carries_console_tail() {
    // The runtime's warnings, to count the boots (each test has its own process).
    let log = Arc::new(Mutex::new(Vec::new()));
    let sink = log.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || LogSink(sink.clone()))
        .init();
    let dir = run_dir();
    let rt = runtime(dir.path(), vec!["rdinit=/does-not-exist".into()]).await;
    let started = Instant::now();
    match rt.start(vm_spec("bad-init")).await {
        Err(VmError::DiedBeforeHello { detail }) => {
            eprintln!("boot failure after {:?}:\n{detail}", started.elapsed());
            assert!(detail.contains("Kernel panic"), "{detail}");
            let text = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
            // The retry's warning ends with its fields (the template's own retry has its own).
            assert_eq!(text.matches("vm=\"bad-init\" attempt=1").count(), 1, "booted twice:\n{text}");
            assert!(!text.contains("vm=\"bad-init\" attempt=2"), "and no more:\n{text}");
        }
        Err(other) => panic!("expected DiedBeforeHello, got {other}"),
        Ok(_) => panic!("boot must fail"),
    }
    assert!(!dir.path().join("bad-init").exists(), "the VM dir is removed after a failed boot");
    let long = VmSpec { name: "x".repeat(64), ..vm_spec("x") };
    let deep = tempfile::Builder::new().prefix(&"d".repeat(40)).tempdir_in("/tmp").unwrap();
    let rt2 = runtime(deep.path(), Vec::new()).await;
    assert!(matches!(rt2.start(long).await, Err(VmError::SocketPathTooLong { .. })));
}

/// A guest kernel without its APIC timer (what a failed calibration leaves; `noapictimer`
/// makes it certain) is booted again, then refused with `NoTimer`, leaving nothing behind.
/// Accepted, its agent would take the first `Spawn` and never answer: every sleep hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_without_its_apic_timer_is_booted_again_then_refused() {
    let dir = run_dir();
    let rt = cold_runtime(dir.path(), vec!["noapictimer".into()]).await;
    let started = Instant::now();
    match rt.start(vm_spec("no-timer")).await {
        Err(VmError::NoTimer { clock_events }) => {
            eprintln!("refused after {:?}: tick device {clock_events:?}", started.elapsed());
            assert!(!clock_events.starts_with("lapic"), "{clock_events}");
        }
        Err(other) => panic!("expected NoTimer, got {other}"),
        Ok(vm) => panic!("a guest without a timer must be refused: tick device {:?}", vm.hello().clock_events),
    }
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().starts_with("no-timer")), "left behind: {left:?}");
}

/// Without lower layers the root is a bare tmpfs; dropping a `Vm` without `shutdown` kills
/// QEMU and removes its dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmpfs_root_and_drop_kills_qemu() {
    let dir = run_dir();
    let rt = runtime(dir.path(), Vec::new()).await;
    let spec = VmSpec {
        disks: Vec::new(),
        rootfs: RootfsSpec { lower_serials: Vec::new(), upper_size_bytes: 8 << 20, upper_disk: None },
        ..vm_spec("bare")
    };
    let vm = rt.start(spec).await.expect("boot");
    eprintln!("BOOT bare {:?}", vm.boot_duration());
    match vm.spawn(spawn_req(1, &["sh", "-c", "true"])).await {
        Err(VmError::SpawnFailed { error }) => assert!(error.starts_with("exec: sh: "), "{error}"),
        other => panic!("expected SpawnFailed on an empty root, got {other:?}"),
    }
    let mut s = spawn_req(2, &["/nothing"]);
    s.cwd = "relative".into();
    assert!(matches!(vm.spawn(s).await, Err(VmError::SpawnFailed { .. })));
    // The mount points the agent made in the bare root are not the run's changes.
    let host = tempfile::tempdir().unwrap();
    let stats = export_to(&*vm, &host.path().join("bare.tar"), &u64::MAX).await.expect("export");
    assert_eq!(stats.entries, 0, "{stats:?}");
    let (pid, vm_dir) = (vm.qemu_pid(), vm.dir().to_path_buf());
    drop(vm);
    assert!(wait_dead(pid).await, "dropping the Vm must kill QEMU");
    assert!(!vm_dir.exists());
}

/// `Accel::Auto` probes KVM with a throwaway VM (which fails on this kind of machine) and
/// leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_accel_probe_cleans_up() {
    let dir = run_dir();
    // Without fast start: a template build would add its own scratch dir to the run dir.
    let config = VmConfig { accel: Accel::Auto, snapshot: false, ..VmConfig::default() };
    let started = Instant::now();
    let rt = QemuRuntime::new(config, assets().clone(), dir.path().to_path_buf()).await.unwrap();
    eprintln!("accel probe chose {} in {:?}", rt.accel(), started.elapsed());
    assert!(["kvm", "tcg"].contains(&rt.accel()));
    assert_eq!(vm_dirs_left(dir.path()), Vec::<std::ffi::OsString>::new(), "probe VM dir left behind");
}

/// `reap_stale` kills a leftover QEMU that mentions its dir (or the dir's `origin`) and
/// removes every dir.
#[test]
fn reap_stale_kills_leftover_qemu() {
    let dir = run_dir();
    let stale = dir.path().join("stale1");
    std::fs::create_dir(&stale).unwrap();
    let qmp = format!("unix:{}/qmp.sock,server=on,wait=off", stale.display());
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm", "-S", "-nodefaults", "-display", "none", "-qmp", &qmp])
        .spawn()
        .expect("qemu-system-x86_64");
    std::fs::write(stale.join("qemu.pid"), qemu.id().to_string()).unwrap();
    // A pid file naming a live process that is not this dir's QEMU (this test) is not killed.
    let other = dir.path().join("stale2");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("qemu.pid"), std::process::id().to_string()).unwrap();
    std::fs::create_dir(dir.path().join("stale3")).unwrap();
    // A pooled clone renamed after QEMU started: its command line names the old dir (`origin`).
    let pooled = dir.path().join("pool-1-0");
    std::fs::create_dir(&pooled).unwrap();
    let qmp = format!("unix:{}/qmp.sock,server=on,wait=off", pooled.display());
    let mut clone = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm", "-S", "-nodefaults", "-display", "none", "-qmp", &qmp])
        .spawn()
        .expect("qemu-system-x86_64");
    std::fs::write(pooled.join("qemu.pid"), clone.id().to_string()).unwrap();
    std::fs::write(pooled.join("origin"), pooled.to_str().unwrap()).unwrap();
    // Renamed once QEMU listens, as a pooled clone's dir is.
    for _ in 0..200 {
        if pooled.join("qmp.sock").exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::fs::rename(&pooled, dir.path().join("stale4")).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(qemu.try_wait().unwrap().is_none(), "QEMU should be running");

    let cleaned = reap_stale(dir.path()).unwrap();
    assert_eq!(cleaned, ["stale1", "stale2", "stale3", "stale4"]);
    let status = qemu.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9));
    let status = clone.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "found through its origin");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    assert_eq!(reap_stale(&dir.path().join("missing")).unwrap(), Vec::<String>::new());
}

/// A `tracing` writer appending to a shared buffer.
struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
