//! Abuse: a QEMU bug must not be host root. During a live run, every QEMU of the server
//! (the run's VM, pooled clones, a template build) runs as an unprivileged uid with no
//! capabilities, `NoNewPrivs` and QEMU's seccomp filter, in a mount namespace where the
//! server's state (DB, blobs, images, guest assets) does not exist, and in a memory-bounded
//! cgroup of its own.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::harness::{TestServer, qemu_processes_with, run_vms};

/// `(uid, CapEff, NoNewPrivs, Seccomp)` of a live process.
fn privileges(pid: u32) -> Option<(u32, u64, u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let uid = field("Uid:")?.split_whitespace().next()?.parse().ok()?;
    let cap = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
    Some((uid, cap, field("NoNewPrivs:")?.parse().ok()?, field("Seccomp:")?.parse().ok()?))
}

/// Whether `path` exists in the mount namespace of process `pid` ("self": this one's).
fn visible_to(pid: &str, path: &Path) -> bool {
    let rel = path.strip_prefix("/").unwrap_or(path);
    Path::new(&format!("/proc/{pid}/root")).join(rel).symlink_metadata().is_ok()
}

/// The memory limit of process `pid`'s cgroup named `vm-<uid>` (v2 `memory.max` or v1
/// `memory.limit_in_bytes`), if it is in one.
fn vm_memory_limit(pid: u32, uid: u32) -> Option<u64> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let leaf = format!("/vm-{uid}");
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        if !path.ends_with(&leaf) {
            continue;
        }
        let (dir, file) = match ctrls {
            "" => (format!("/sys/fs/cgroup{path}"), "memory.max"),
            c if c.split(',').any(|c| c == "memory") => {
                (format!("/sys/fs/cgroup/memory{path}"), "memory.limit_in_bytes")
            }
            _ => continue,
        };
        let dirs = [dir.clone(), dir.replacen("/sys/fs/cgroup", "/sys/fs/cgroup/unified", 1)];
        for d in dirs {
            if let Ok(v) = std::fs::read_to_string(Path::new(&d).join(file)) {
                return v.trim().parse().ok();
            }
        }
    }
    None
}

#[tokio::test]
async fn no_qemu_of_the_server_runs_as_root_or_sees_the_state() {
    // Positive controls: the observations see root with capabilities, the state and no VM
    // cgroup on this test process.
    let me = privileges(std::process::id()).unwrap();
    assert!(me.0 == 0 && me.1 != 0 && me.3 == 0, "{me:?}");
    assert_eq!(vm_memory_limit(std::process::id(), 0), None);

    let s = TestServer::start().await;
    let state = s.state.as_ref().unwrap().path().to_owned();
    let secrets = ["boxwood.db", "blobs", "images", "guest"].map(|f| state.join(f));
    for path in &secrets {
        assert!(visible_to("self", path), "{} exists on the host", path.display());
    }
    let id = s.start_run(json!({"command": "sleep 30", "shell": true, "disposable": true})).await;
    s.wait_status(&id, "EXECUTING", Duration::from_secs(120)).await;
    // The check sees the live run's QEMU: it would see one running as root.
    let mut live = Vec::new();
    for _ in 0..100 {
        live = run_vms(&state);
        if !live.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!live.is_empty(), "the run's QEMU is found");
    let all: Vec<u32> = qemu_processes_with(&state.to_string_lossy()).into_iter().map(|(pid, _)| pid).collect();
    assert!(live.iter().all(|pid| all.contains(pid)));
    for pid in &all {
        let Some((uid, cap, nnp, seccomp)) = privileges(*pid) else { continue };
        assert!(uid >= 2_000_000_000, "QEMU {pid} runs as uid {uid}");
        assert_eq!((cap, nnp, seccomp), (0, 1, 2), "QEMU {pid}: CapEff, NoNewPrivs, Seccomp");
        for path in &secrets {
            assert!(!visible_to(&pid.to_string(), path), "QEMU {pid} sees {}", path.display());
        }
        let Some(limit) = vm_memory_limit(*pid, uid) else {
            // It may have just exited (a pool refill racing the scan).
            assert!(privileges(*pid).is_none(), "QEMU {pid} is in no VM cgroup");
            continue;
        };
        assert!(limit < 4 << 30, "QEMU {pid}: memory limit {limit}");
    }
    let r = s.req(reqwest::Method::DELETE, &format!("/operations/{id}")).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    s.stop().await;
}
