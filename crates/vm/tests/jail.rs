//! Every QEMU runs jailed (real QEMU, TCG): as a uid of the runtime's claimed block (not
//! root), with no capabilities, `NoNewPrivs` and QEMU's seccomp sandbox on, in a run dir only
//! its uid can enter; two VMs get different uids; each QEMU sees a minimal root of its own
//! (not the state, the layers, the guest assets or another VM's dir) and runs in its own
//! bounded cgroup, released with its uid when the VM ends. Each check is first shown to see
//! the bad state where it exists (this test process: root, full capabilities, no seccomp,
//! the host's mount namespace, no VM cgroup).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use boxwood_vm::{QemuRuntime, Vm, VmConfig, VmRuntime};
use common::*;

/// The fields of `/proc/<pid>/status` the jail sets.
#[derive(Debug, PartialEq)]
struct Privileges {
    uids: Vec<u32>,
    gids: Vec<u32>,
    groups: String,
    cap_eff: u64,
    cap_prm: u64,
    cap_inh: u64,
    cap_bnd: u64,
    cap_amb: u64,
    no_new_privs: u32,
    seccomp: u32,
}

fn privileges(pid: &str) -> Privileges {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field =
        |name: &str| status.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned())).unwrap_or_default();
    let ids = |name: &str| field(name).split_whitespace().map(|v| v.parse().unwrap()).collect::<Vec<u32>>();
    let cap = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
    Privileges {
        uids: ids("Uid:"),
        gids: ids("Gid:"),
        groups: field("Groups:"),
        cap_eff: cap("CapEff:"),
        cap_prm: cap("CapPrm:"),
        cap_inh: cap("CapInh:"),
        cap_bnd: cap("CapBnd:"),
        cap_amb: cap("CapAmb:"),
        no_new_privs: field("NoNewPrivs:").parse().unwrap(),
        seccomp: field("Seccomp:").parse().unwrap(),
    }
}

/// Asserts QEMU `vm` is jailed; returns its uid.
fn assert_jailed(rt: &QemuRuntime, vm: &dyn Vm) -> u32 {
    let p = privileges(&vm.qemu_pid().to_string());
    let uid = p.uids[0];
    let range = rt.jail_uid_range().unwrap();
    assert!(range.contains(&uid) && uid != 0, "{p:?} not in {range:?}");
    assert_eq!(p.uids, vec![uid; 4], "real, effective, saved and fs uid");
    assert_eq!(p.gids, vec![uid; 4], "its own gid");
    assert_eq!(p.groups, "", "no supplementary groups");
    assert_eq!((p.cap_eff, p.cap_prm, p.cap_inh, p.cap_bnd, p.cap_amb), (0, 0, 0, 0, 0), "{p:?}");
    assert_eq!((p.no_new_privs, p.seccomp), (1, 2), "NoNewPrivs and QEMU's seccomp filter");
    let meta = std::fs::metadata(vm.dir()).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (uid, uid, 0o700), "the run dir is its own");
    uid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qemu_runs_unprivileged_in_its_own_uid() {
    // Positive control: the same observation sees root with capabilities and no seccomp.
    let me = privileges("self");
    assert_eq!(me.uids[0], 0, "the test runs as root (the jail needs it)");
    assert!(me.cap_eff != 0 && me.cap_bnd != 0 && me.seccomp == 0, "{me:?}");

    let dir = run_dir();
    let rt = QemuRuntime::new(test_config(Vec::new()), assets().clone(), dir.path().to_path_buf()).await.unwrap();
    assert!(rt.wait_ready(Duration::from_secs(180)).await, "the template must build jailed");
    let range = rt.jail_uid_range().unwrap();
    assert_eq!(range.end() - range.start(), 255);
    assert!(range.start() >= &2_000_000_000);
    for pid in rt.pooled_pids() {
        let p = privileges(&pid.to_string());
        assert!(range.contains(&p.uids[0]) && p.seccomp == 2, "a pooled clone: {p:?}");
    }
    let clone = rt.start(vm_spec("jail-clone")).await.unwrap();
    let cold_dir = run_dir();
    let cold_rt = cold_runtime(cold_dir.path(), Vec::new()).await;
    let cold = cold_rt.start(vm_spec("jail-cold")).await.unwrap();
    let (a, b) = (assert_jailed(&rt, clone.as_ref()), assert_jailed(&cold_rt, cold.as_ref()));
    assert_ne!(a, b, "two VMs, two uids");
    assert!(!range.contains(&b), "two runtimes on one host claim different blocks");
    // The jailed VMs still work: they run a command on their (fd-passed) layers.
    for vm in [&clone, &cold] {
        let out = run(vm.as_ref(), spawn_req(1, &["/bin/sh", "-c", "echo ok-$(id -u)"])).await;
        assert!(out.out().contains("ok-0"), "{}", out.out());
    }
    // Neither uid can enter the other's run dir; each can enter its own (the control).
    let can_list = |uid: u32, dir: &Path| {
        let id = uid.to_string();
        Command::new("setpriv")
            .args(["--reuid", &id, "--regid", &id, "--clear-groups", "ls"])
            .arg(dir)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(can_list(a, clone.dir()) && can_list(b, cold.dir()), "a VM's uid reads its own dir");
    assert!(!can_list(a, cold.dir()) && !can_list(b, clone.dir()), "but not another VM's");
    let pid = clone.qemu_pid();
    clone.shutdown().await.unwrap();
    cold.shutdown().await.unwrap();
    assert!(wait_dead(pid).await);
}

/// Whether `path` exists in the mount namespace of process `pid` (through its root).
fn visible_to(pid: &str, path: &Path) -> bool {
    let rel = path.strip_prefix("/").unwrap();
    Path::new(&format!("/proc/{pid}/root")).join(rel).symlink_metadata().is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_qemu_sees_only_its_own_run_dir_and_what_it_needs() {
    let (dir, other_dir) = (run_dir(), run_dir());
    let rt = cold_runtime(dir.path(), Vec::new()).await;
    let other_rt = cold_runtime(other_dir.path(), Vec::new()).await;
    let vm = rt.start(vm_spec("ns-a")).await.unwrap();
    let other = other_rt.start(vm_spec("ns-b")).await.unwrap();
    let pid = vm.qemu_pid().to_string();
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(ns(&pid), ns("self"), "QEMU has a mount namespace of its own");
    for kind in ["ipc", "uts"] {
        let link = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/{kind}")).unwrap();
        assert_ne!(link(&pid), link("self"), "and its own {kind} namespace");
    }
    // Another VM in the same run dir: a file standing for the state around the VM's dir.
    std::fs::write(dir.path().join("state.db"), b"secret").unwrap();
    let secrets = [
        other.dir().to_path_buf(),
        dir.path().join("state.db"),
        rootfs_image().to_path_buf(),
        assets().kernel.clone(),
        assets_dir(),
        Path::new(WORKSPACE).join("Cargo.toml"),
        "/root".into(),
        "/etc/shadow".into(),
        "/home".into(),
    ];
    for path in &secrets {
        // Positive control: the probe sees it from the host's namespace (itself "process"
        // self), so not seeing it from QEMU's is the jail's doing.
        assert!(visible_to("self", path), "{} exists on the host", path.display());
        assert!(!visible_to(&pid, path), "QEMU must not see {}", path.display());
    }
    let own = vm.dir().canonicalize().unwrap();
    assert!(visible_to(&pid, &own.join("qmp.sock")), "its own run dir is there, at the host's path");
    // Seen from the host, its working dir is that path (how `reap_stale` and the e2e tier
    // find a VM's QEMU).
    assert_eq!(std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(), own);
    // Its ancestors are empty stand-ins holding only the way to it.
    let list = |p: &Path| {
        let mut names: Vec<String> =
            std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };
    let (mut child, mut at) = (own.clone(), own.parent().unwrap().to_path_buf());
    loop {
        let inside = Path::new(&format!("/proc/{pid}/root")).join(at.strip_prefix("/").unwrap());
        let want = vec![child.file_name().unwrap().to_string_lossy().into_owned()];
        if at == Path::new("/") {
            assert!(list(&inside).contains(&want[0]));
            break;
        }
        assert_eq!(list(&inside), want, "QEMU's view of {}", at.display());
        assert!(list(&at).len() > 1, "the host's {} holds more (the control)", at.display());
        child = at.clone();
        at = at.parent().unwrap().to_path_buf();
    }
    for needed in ["/usr/bin", "/dev/null", "/dev/urandom", "/proc/self/fd"] {
        assert!(visible_to(&pid, Path::new(needed)), "{needed}");
    }
    assert!(!visible_to(&pid, Path::new("/dev/kvm")), "no /dev/kvm under TCG");
    assert!(!visible_to(&pid, Path::new("/sys/kernel")) && !visible_to(&pid, Path::new("/proc/sys")));
    // Its /proc shows its own processes only: listed by its uid inside its namespace, it
    // holds neither the other VM's QEMU nor the host's init; root's listing of the same
    // mount has both (the control).
    let uid = privileges(&pid).uids[0].to_string();
    let ls_proc = |as_uid: Option<&str>| {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &pid, "-m"]);
        if let Some(u) = as_uid {
            cmd.args(["-S", u, "-G", u]);
        }
        let out = cmd.args(["ls", "/proc"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect::<Vec<_>>()
    };
    let other_pid = other.qemu_pid().to_string();
    let (as_root, as_qemu) = (ls_proc(None), ls_proc(Some(&uid)));
    assert!(as_root.contains(&other_pid) && as_root.contains(&"1".to_owned()), "{as_root:?}");
    assert!(!as_qemu.contains(&other_pid) && !as_qemu.contains(&"1".to_owned()), "{as_qemu:?}");
    assert!(as_qemu.contains(&pid), "its own process is there: {as_qemu:?}");
    // The root is read-only, and its system dirs too.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
    let opts = |mp: &str| {
        mounts.lines().find(|l| l.split(' ').nth(1) == Some(mp)).map(|l| l.split(' ').nth(3).unwrap().to_owned())
    };
    assert!(opts("/").unwrap().starts_with("ro,"), "{mounts}");
    assert!(opts("/usr").unwrap().starts_with("ro,"), "{mounts}");
    assert!(opts(own.to_str().unwrap()).unwrap().starts_with("rw,"), "{mounts}");
    // Still a working VM inside all that.
    let out = run(vm.as_ref(), spawn_req(1, &["/bin/echo", "inside"])).await;
    assert_eq!(out.out(), "inside\n");
    vm.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
}

/// Guest networking still works from inside the jail, names included: slirp resolves them
/// with the host's resolver configuration, which the jail's root carries read-only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_dns_works_through_the_jailed_slirp() {
    let dir = run_dir();
    let rt = cold_runtime(dir.path(), Vec::new()).await;
    let vm = rt.start(boxwood_vm::VmSpec { network: true, ..vm_spec("dns") }).await.unwrap();
    // busybox's own resolver, asking slirp's DNS address 10.0.2.3.
    let probe = |host: &str| format!("busybox nslookup {host} 10.0.2.3 2>&1; echo rc=$?");
    // Positive control: the probe tells an unknown name (answered by the host's resolver).
    let bad = run(vm.as_ref(), spawn_req(1, &["/bin/sh", "-c", &probe("no-such-name.invalid")])).await;
    assert!(bad.out().contains("NXDOMAIN"), "{}", bad.out());
    // A package registry (this machine's only reachable outside hosts) resolves.
    let good = run(vm.as_ref(), spawn_req(2, &["/bin/sh", "-c", &probe("pypi.org")])).await;
    assert!(good.out().contains("Name:\tpypi.org") && good.out().contains("rc=0"), "{}", good.out());
    vm.shutdown().await.unwrap();
}

/// `/proc/<pid>/cgroup` lines (v1 and v2).
fn cgroups_of(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap()
}

fn read_trim(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_qemu_runs_in_a_bounded_cgroup_released_with_its_uid() {
    let dir = run_dir();
    let rt = cold_runtime(dir.path(), Vec::new()).await;
    let mut spec = vm_spec("cg-a");
    spec.memory_mib = Some(192);
    let vm = rt.start(spec).await.unwrap();
    let pid = vm.qemu_pid();
    let uid = privileges(&pid.to_string()).uids[0];
    let dirs = rt.jail_cgroup_dirs(uid);
    assert!(!dirs.is_empty());
    // Positive control: this process is in none of them.
    for d in &dirs {
        let procs = read_trim(&d.join("cgroup.procs"));
        assert_eq!(procs, pid.to_string(), "{} holds exactly the QEMU", d.display());
        assert!(!procs.lines().any(|p| p == std::process::id().to_string()));
        let name = d.file_name().unwrap().to_str().unwrap();
        assert!(cgroups_of(&pid.to_string()).contains(name), "{}", cgroups_of(&pid.to_string()));
        assert!(!cgroups_of("self").contains(name));
    }
    let overhead = u64::from(VmConfig::default().jail.memory_overhead_mib);
    let want_mem = ((2 * 192 + overhead) << 20).to_string();
    let file = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| p.exists());
    let (mem, pids) = match file("memory.max") {
        Some(max) => (read_trim(&max), read_trim(&file("pids.max").unwrap())),
        None => (read_trim(&file("memory.limit_in_bytes").unwrap()), read_trim(&file("pids.max").unwrap())),
    };
    assert_eq!(mem, want_mem, "guest RAM twice + QEMU's overhead");
    assert_eq!(pids, (VmConfig::default().jail.pids_max + 1).to_string(), "tasks bounded");
    if let Some(shares) = file("cpu.shares") {
        assert_eq!(read_trim(&shares), "1024");
    } else if let Some(weight) = file("cpu.weight") {
        assert_eq!(read_trim(&weight), "100");
    }
    let threads = read_trim(&file("pids.current").unwrap());
    eprintln!("QEMU threads: {threads}");
    let out =
        run(vm.as_ref(), spawn_req(1, &["/bin/sh", "-c", "dd if=/dev/zero of=/tmp/f bs=1M count=32 2>&1; echo done"]))
            .await;
    assert!(out.out().contains("done"), "{}", out.out());
    if let Some(peak) = file("memory.max_usage_in_bytes").or_else(|| file("memory.peak")) {
        eprintln!("QEMU peak memory: {} MiB (guest 192 MiB)", read_trim(&peak).parse::<u64>().unwrap() >> 20);
    }
    vm.shutdown().await.unwrap();
    assert!(wait_dead(pid).await);
    for d in &dirs {
        assert!(!d.exists(), "{} is removed with the VM", d.display());
    }
    // The uid is free again: the next VM gets it (a fresh leaf of the same name).
    let again = rt.start(vm_spec("cg-b")).await.unwrap();
    assert_eq!(privileges(&again.qemu_pid().to_string()).uids[0], uid, "the uid was released");
    assert!(dirs.iter().all(|d| d.exists()), "its new cgroup");
    again.shutdown().await.unwrap();
    drop(rt);
    for d in &dirs {
        assert!(!d.parent().unwrap().exists(), "the runtime's block dir goes with it: {}", d.display());
    }
}

/// A crashed server's VM cgroups (a `boxwood-<j>` whose uid block nobody holds) are removed,
/// and what still runs in them killed, when a runtime starts; a live runtime's are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_servers_cgroups_are_swept_at_start() {
    let (dir, dir2) = (run_dir(), run_dir());
    let live = cold_runtime(dir.path(), Vec::new()).await;
    let live_uid = *live.jail_uid_range().unwrap().start();
    // The hierarchies' dirs of the server's own cgroup: two levels above a VM's leaf.
    let parents: Vec<_> =
        live.jail_cgroup_dirs(live_uid).iter().map(|d| d.parent().unwrap().parent().unwrap().to_owned()).collect();
    let live_blocks: Vec<_> = live.jail_cgroup_dirs(live_uid).iter().map(|d| d.parent().unwrap().to_owned()).collect();
    let mut leftover = Command::new("sleep").arg("600").spawn().unwrap();
    let leaves: Vec<_> = parents.iter().map(|p| p.join("boxwood-4000").join("vm-1")).collect();
    for leaf in &leaves {
        std::fs::create_dir_all(leaf).unwrap();
        std::fs::write(leaf.join("cgroup.procs"), leftover.id().to_string()).unwrap();
    }
    // Positive control: the leftover is there, with its process in it.
    for leaf in &leaves {
        assert_eq!(read_trim(&leaf.join("cgroup.procs")), leftover.id().to_string());
    }
    let fresh = cold_runtime(dir2.path(), Vec::new()).await;
    // Swept by this runtime's start — or, when another test process's runtime starts at the
    // same moment and holds the block's lock for its own sweep, by that one a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while leaves.iter().any(|l| l.parent().unwrap().exists()) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for leaf in &leaves {
        assert!(!leaf.parent().unwrap().exists(), "{} is swept", leaf.display());
    }
    let status = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(s) = leftover.try_wait().unwrap() {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the leftover process is killed");
    assert!(!status.success());
    for block in &live_blocks {
        assert!(block.exists(), "a live runtime's {} is kept", block.display());
    }
    drop((fresh, live));
}

#[tokio::test]
async fn config_parses_and_defaults_to_jailed() {
    let c = VmConfig::default();
    assert!(c.jail.enabled);
    assert_eq!(c.jail.uid_base, 2_000_000_000);
    assert_eq!((c.jail.memory_overhead_mib, c.jail.pids_max, c.jail.cpu_weight), (384, 128, 100));
    assert!(c.jail.ro_paths.is_empty());
    let c: VmConfig = serde_json::from_str(r#"{"jail": {"enabled": false, "uid_base": 3000000}}"#).unwrap();
    assert!(!c.jail.enabled && c.jail.uid_base == 3_000_000);
    let c: VmConfig = serde_json::from_str(
        r#"{"jail": {"memory_overhead_mib": 200, "pids_max": 64, "cpu_weight": 50, "ro_paths": ["/opt/qemu"]}}"#,
    )
    .unwrap();
    assert_eq!((c.jail.memory_overhead_mib, c.jail.pids_max, c.jail.cpu_weight), (200, 64, 50));
    assert_eq!(c.jail.ro_paths, vec![std::path::PathBuf::from("/opt/qemu")]);
    assert!(serde_json::from_str::<VmConfig>(r#"{"jail": {"enable": true}}"#).is_err(), "typos are rejected");
}

/// What a jailed QEMU uses (how `vm.jail.memory_overhead_mib` was chosen): a networked
/// clone runs a little of everything, then its cgroup's peak and QEMU's RSS are read. Run on demand: `cargo test -p boxwood-vm --test jail -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn measure_qemu_memory_overhead() {
    let dir = run_dir();
    let rt = runtime(dir.path(), Vec::new()).await;
    {
        let (name, network) = ("mem-clone", true);
        let vm = rt.start(boxwood_vm::VmSpec { network, ..vm_spec(name) }).await.unwrap();
        let uid = privileges(&vm.qemu_pid().to_string()).uids[0];
        let dirs = rt.jail_cgroup_dirs(uid);
        let peak = || {
            dirs.iter()
                .flat_map(|d| [d.join("memory.max_usage_in_bytes"), d.join("memory.peak")])
                .find_map(|p| std::fs::read_to_string(p).ok())
                .map(|v| v.trim().parse::<u64>().unwrap() >> 20)
                .unwrap()
        };
        let script = "i=0; while [ $i -lt 8 ]; do dd if=/dev/urandom of=/tmp/f$i bs=1M count=7 2>/dev/null; \
                      sha256sum /tmp/f$i >/dev/null; i=$((i+1)); done; \
                      cat /bin/busybox /bin/busybox /bin/busybox | od -x | tail -1; \
                      ls -lR / >/dev/null 2>&1; free -m 2>/dev/null; echo done";
        let out = run(vm.as_ref(), spawn_req(1, &["/bin/sh", "-c", script])).await;
        assert!(out.out().contains("done"), "{}", out.out());
        let rss = std::fs::read_to_string(format!("/proc/{}/status", vm.qemu_pid())).unwrap();
        let rss: Vec<&str> = rss.lines().filter(|l| l.starts_with("Rss") || l.starts_with("VmHWM")).collect();
        eprintln!(
            "MEASURE {name}: cgroup peak {} MiB for guest {} MiB; {rss:?}",
            peak(),
            VmConfig::default().memory_mib
        );
        vm.shutdown().await.unwrap();
    }
}
