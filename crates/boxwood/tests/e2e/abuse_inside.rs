//! Abuse from inside a guest that already held, kept as tests so it keeps holding: guest root
//! writing to its image's layer disks, a fork bomb, killing PID 1. Each attack first shows it
//! is really attempted (the disk is there and readable, processes multiply, the signal is
//! sent), then that the image, the server and the next run are unharmed.

use serde_json::{Value, json};

use crate::harness::{TestServer, run_vms, until_gone};

fn stdout(op: &Value) -> String {
    op["metadata"]["result"]["stdout"]["value"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn guest_root_cannot_change_its_image_or_outlive_its_run() {
    let s = TestServer::start().await;
    let (op, _) =
        s.run(json!({"command": "echo precious > /keep", "shell": true, "image": "tag:busybox:latest"})).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let image = op["result_image_uuid"].as_str().unwrap().to_owned();

    // Layer disks: visible and readable (erofs magic at 1024), but every write fails, by
    // `dd` and by remounting the layer read-write. (The run's own scratch disk, `bwupper`,
    // is writable by design: it holds only this run's writable layer.)
    let (op, _) = s
        .run(json!({"command": "for d in /dev/vd?; do \
                                  [ \"$(cat /sys/block/${d#/dev/}/serial)\" = bwupper ] && continue; \
                                  magic=$(dd if=$d bs=1 skip=1024 count=4 2>/dev/null | od -An -tx1 | tr -d ' '); \
                                  echo \"$d $magic\"; \
                                  dd if=/dev/zero of=$d bs=4096 count=16 conv=notrunc 2>/dev/null && echo WROTE $d; \
                                done; mount -o remount,rw / 2>/dev/null; echo changed > /keep 2>/dev/null; \
                                sync; echo done",
                    "shell": true, "image": image.clone(), "disposable": true}))
        .await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let out = stdout(&op);
    assert!(out.contains(" e2e1f5e0"), "the layer disks are there and readable: {out}");
    assert!(!out.contains("WROTE"), "a layer disk took a write: {out}");
    let (op, _) =
        s.run(json!({"command": "cat /keep", "shell": true, "image": image.clone(), "disposable": true})).await;
    assert_eq!(stdout(&op), "precious\n", "the image is unchanged for the next run: {op}");

    // The guest's process limit (the agent's jobs cgroup) stops process creation. Positive
    // control, with one writer: a shell starting sleepers until a fork fails says so and
    // exits. (A bomb's own "can't fork" messages come from hundreds of processes killed at
    // the timeout, and on QEMU 10 they were seen cut short or lost.)
    let (op, _) = s
        .run(json!({"command": "while :; do sleep 1000 >/dev/null 2>&1 & done", "shell": true,
                    "image": "tag:busybox:latest", "disposable": true, "timeout": 60}))
        .await;
    let result = &op["metadata"]["result"];
    let stderr = result["stderr"]["value"].as_str().unwrap_or_default();
    assert!(stderr.contains("can't fork"), "forks fail at the limit: {stderr:.300} {op}");
    assert_eq!(result["state"]["timed_out"], false, "it stopped at the limit, not the timeout: {op}");

    // A fork bomb multiplies until that limit stops it, is killed at the timeout, and the
    // server and next run are fine.
    let (op, _) = s
        .run(json!({"command": "b() { b | b & }; b & sleep 60", "shell": true,
                    "image": "tag:busybox:latest", "disposable": true, "timeout": 6, "truncate_output_at": 4096}))
        .await;
    let result = &op["metadata"]["result"];
    assert_eq!((op["status"].as_str(), result["state"]["timed_out"].as_bool()), (Some("SUCCESS"), Some(true)), "{op}");
    // The agent stays outside the bomb's cgroup, so the kill at the timeout is not starved
    // (without the cgroup it came 15 s late). A generous bound: it is not a speed target.
    let elapsed = result["resources"]["elapsed_time"].as_f64().unwrap_or(f64::MAX);
    eprintln!("fork bomb: killed and reaped after {elapsed} s (timeout 6 s)");
    assert!(elapsed < 12.0, "the timeout of 6 s was honoured: {elapsed} s");

    // Killing PID 1 (the agent) from inside: the signal is sent and ignored by init.
    let (op, _) = s
        .run(json!({"command": "kill -9 1 && echo sent; kill -TERM 1; echo alive", "shell": true,
                    "image": "tag:busybox:latest", "disposable": true}))
        .await;
    assert_eq!((op["status"].as_str(), stdout(&op).as_str()), (Some("SUCCESS"), "sent\nalive\n"), "{op}");

    let (op, _) = s.run(json!({"command": "echo fine", "shell": true, "disposable": true})).await;
    assert_eq!(stdout(&op), "fine\n", "{op}");
    let state = s.state.as_ref().unwrap().path().to_owned();
    let _dir = s.stop().await;
    assert_eq!(until_gone(|| run_vms(&state)).await, Vec::<u32>::new(), "no QEMU left");
}
