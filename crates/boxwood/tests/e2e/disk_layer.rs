//! Runs that write gigabytes: the writable layer is a scratch disk of the run's cap, not the
//! guest's RAM. A persisted run keeps a file eight times the guest's memory; a run past its
//! `max_layer_bytes` gets ENOSPC as a normal failing command; the disk costs the host what
//! was written while the run lives and nothing once it is gone.

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{TestServer, allocated, qemu_processes_with, run_vms, until_gone};

const MIB: u64 = 1 << 20;
/// 2 GiB: eight times the guest's 256 MiB of RAM.
const BIG_MIB: u64 = 2048;
/// The MiB in the middle of a 1 TiB sparse file.
const SPARSE_MID: u64 = 1 << 19;

fn stdout(op: &Value) -> String {
    op["metadata"]["result"]["stdout"]["value"].as_str().unwrap_or_default().to_owned()
}

fn stderr(op: &Value) -> String {
    op["metadata"]["result"]["stderr"]["value"].as_str().unwrap_or_default().to_owned()
}

/// The largest allocation among the unlinked files QEMUs of `state` hold (their scratch disks;
/// a clone's guest RAM, a memfd, is left out).
fn scratch_on_host(state: &str) -> u64 {
    let mut largest = 0;
    for (pid, _) in qemu_processes_with(state) {
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten() {
            let deleted = std::fs::read_link(fd.path()).is_ok_and(|l| {
                let l = l.to_string_lossy();
                l.ends_with(" (deleted)") && !l.starts_with("/memfd:")
            });
            if let (true, Ok(m)) = (deleted, std::fs::metadata(fd.path())) {
                largest = largest.max(m.blocks() * 512);
            }
        }
    }
    largest
}

#[tokio::test]
async fn runs_write_gigabytes_to_a_disk_bounded_by_their_cap() {
    let s = TestServer::start().await;
    let state = s.state.as_ref().unwrap().path().to_owned();
    let state_str = state.to_string_lossy().into_owned();

    // 2 GiB persisted: zeros, with one random MiB at the start, the middle and the end; and a
    // 1 TiB sparse file holding that MiB in its middle.
    let images = state.join("images");
    let before = allocated(&images);
    let write = format!(
        "dd if=/dev/urandom of=/blk bs=1M count=1 2>/dev/null && \
         dd if=/dev/zero of=/big bs=1M count={BIG_MIB} 2>/dev/null && \
         for n in 0 {mid} {last}; do dd if=/blk of=/big bs=1M seek=$n conv=notrunc 2>/dev/null; done && \
         truncate -s 1099511627776 /sparse && dd if=/blk of=/sparse bs=1M seek={SPARSE_MID} conv=notrunc 2>/dev/null && \
         sha256sum /blk | cut -d' ' -f1 && rm /blk",
        mid = BIG_MIB / 2,
        last = BIG_MIB - 1
    );
    let (op, _) = s.run(json!({"command": write, "shell": true, "image": "tag:busybox:latest"})).await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    assert_eq!(op["metadata"]["result"]["state"]["exit_code"], 0, "{op}");
    let elapsed = &op["metadata"]["result"]["resources"]["elapsed_time"];
    eprintln!("2 GiB persisted run: {} s in all, the command {elapsed} s", op["duration"]);
    let block = stdout(&op).trim().to_owned();
    assert_eq!(block.len(), 64, "{op}");
    let child = op["result_image_uuid"].as_str().unwrap().to_owned();
    // The host pays for the 2 GiB once (the layer's erofs image; its staging tree is gone),
    // the terabyte's holes cost nothing.
    let grown = allocated(&images).saturating_sub(before);
    eprintln!("the persisted 2 GiB + 1 TiB sparse grew the image store by {grown} bytes");
    assert!(
        (BIG_MIB * MIB..(BIG_MIB + 32) * MIB).contains(&grown),
        "the image store grew by {grown} bytes for {BIG_MIB} MiB of data"
    );

    // The child has all of it (sizes, the marked MiBs); the source image has none.
    let check = format!(
        "stat -c %s /big /sparse; for n in 0 {} {}; do dd if=/big bs=1M skip=$n count=1 2>/dev/null | sha256sum | cut -d' ' -f1; done; \
         dd if=/sparse bs=1M skip={SPARSE_MID} count=1 2>/dev/null | sha256sum | cut -d' ' -f1",
        BIG_MIB / 2,
        BIG_MIB - 1
    );
    let (op, _) = s.run(json!({"command": check, "shell": true, "image": child, "disposable": true})).await;
    assert_eq!(stdout(&op), format!("{}\n{}\n{block}\n{block}\n{block}\n{block}\n", BIG_MIB * MIB, 1u64 << 40), "{op}");
    let (op, _) = s
        .run(json!({"command": "test -e /big || test -e /sparse || echo absent", "shell": true,
                     "image": "tag:busybox:latest", "disposable": true}))
        .await;
    assert_eq!(stdout(&op), "absent\n", "the source image is unchanged: {op}");

    // Past the cap: ENOSPC, a failing command in a SUCCESS run; the server carries on.
    let (op, _) = s
        .run(json!({"command": "dd if=/dev/zero of=/f bs=1M count=200", "shell": true, "disposable": true,
                    "image": "tag:busybox:latest", "resources_limits": {"max_layer_bytes": 100 * MIB}}))
        .await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    assert_ne!(op["metadata"]["result"]["state"]["exit_code"], 0, "{op}");
    assert!(stderr(&op).contains("No space left on device"), "{op}");

    // Below 16 MiB the disk is larger than the cap (ext4 needs the room), so the host's own
    // check on what it unpacks stops a persist past the cap. The tar is unpacked as it
    // streams: the unpack's refusal ends the export, and the refusal is what the run says.
    // Within the cap the same run persists (the positive control).
    for (mib, kept) in [(2, true), (12, false)] {
        let (op, _) = s
            .run(json!({"command": format!("head -c {} /dev/urandom > /f", mib * MIB), "shell": true,
                        "image": "tag:busybox:latest", "resources_limits": {"max_layer_bytes": 4 * MIB}}))
            .await;
        if kept {
            assert_eq!(op["status"], "SUCCESS", "{op}");
            assert!(op["result_image_uuid"].is_string(), "{op}");
        } else {
            assert_eq!(op["status"], "FAILED", "{op}");
            let error = op["error"].as_str().unwrap_or_default();
            assert!(error.contains("4194304"), "the layer limit is named: {error}");
        }
    }

    // While a run lives its scratch disk holds what it wrote (the positive control); once
    // the run is over it is gone, and nothing of it stays in the state dir.
    let op = s
        .start_run(json!({"command": "dd if=/dev/zero of=/f bs=1M count=300 && sync && sleep 30", "shell": true,
                          "disposable": true, "image": "tag:busybox:latest", "timeout": 120}))
        .await;
    let mut held = 0;
    for _ in 0..600 {
        held = scratch_on_host(&state_str);
        if held >= 300 * MIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(held >= 300 * MIB, "the live run's scratch disk holds its 300 MiB: {held}");
    let r = s.req(reqwest::Method::DELETE, &format!("/operations/{op}")).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    s.wait(&op).await;
    assert_eq!(until_gone(|| run_vms(&state)).await, Vec::<u32>::new(), "the run's VM is gone");
    assert!(scratch_on_host(&state_str) < 300 * MIB, "and its scratch disk with it");

    let (op, _) = s.run(json!({"command": "echo fine", "shell": true, "disposable": true})).await;
    assert_eq!(stdout(&op), "fine\n", "{op}");
    s.stop().await;
}
