//! Abuse: a QEMU bug must not be host root. During a live run, every QEMU of the server
//! (the run's VM, pooled clones, a template build) runs as an unprivileged uid with no
//! capabilities, `NoNewPrivs` and QEMU's seccomp filter.

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

#[tokio::test]
async fn no_qemu_of_the_server_runs_as_root() {
    // Positive control: the observation sees root with capabilities (this test process).
    let me = privileges(std::process::id()).unwrap();
    assert!(me.0 == 0 && me.1 != 0 && me.3 == 0, "{me:?}");

    let s = TestServer::start().await;
    let state = s.state.as_ref().unwrap().path().to_owned();
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
    for pid in &all {
        let Some((uid, cap, nnp, seccomp)) = privileges(*pid) else { continue };
        assert!(uid >= 2_000_000_000, "QEMU {pid} runs as uid {uid}");
        assert_eq!((cap, nnp, seccomp), (0, 1, 2), "QEMU {pid}: CapEff, NoNewPrivs, Seccomp");
    }
    let r = s.req(reqwest::Method::DELETE, &format!("/operations/{id}")).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    s.stop().await;
}
