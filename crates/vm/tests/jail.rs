//! Every QEMU runs jailed (real QEMU, TCG): as a uid of the runtime's claimed block (not
//! root), with no capabilities, `NoNewPrivs` and QEMU's seccomp sandbox on, in a run dir only
//! its uid can enter; two VMs get different uids. Each check is first shown to see the bad
//! state on a process that has it (this test process: root, full capabilities, no seccomp).

mod common;

use std::os::unix::fs::MetadataExt;
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
    assert!(rt.jail_uids().contains(&uid) && uid != 0, "{p:?} not in {:?}", rt.jail_uids());
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
    let range = rt.jail_uids();
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
    let pid = clone.qemu_pid();
    clone.shutdown().await.unwrap();
    cold.shutdown().await.unwrap();
    assert!(wait_dead(pid).await);
}

#[tokio::test]
async fn config_parses_and_defaults_to_jailed() {
    let c = VmConfig::default();
    assert!(c.jail.enabled);
    assert_eq!(c.jail.uid_base, 2_000_000_000);
    let c: VmConfig = serde_json::from_str(r#"{"jail": {"enabled": false, "uid_base": 3000000}}"#).unwrap();
    assert!(!c.jail.enabled && c.jail.uid_base == 3_000_000);
}
