//! Abuse: sparse files that cost nothing in the guest must not cost the host their apparent
//! size: a persisted 1 TiB file with a few bytes of data costs those bytes, in the layer's tree,
//! its erofs image and every run of the child image (a refused persist leaves nothing: abuse_sizes).

use serde_json::{Value, json};

use crate::harness::{TestServer, allocated};

fn stdout(op: &Value) -> String {
    op["metadata"]["result"]["stdout"]["value"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_terabyte_sparse_file_costs_its_data() {
    let s = TestServer::start().await;
    let images = s.state.as_ref().unwrap().path().join("images");
    let before = allocated(&images);

    // 1 TiB apparent, far past the 12 GiB layer limit, which counts data: a few bytes at the
    // start, the middle and the end.
    let (op, _) = s
        .run(json!({"command": "truncate -s 1099511627776 /sparse && printf head | dd of=/sparse conv=notrunc 2>/dev/null && \
                                printf mid | dd of=/sparse bs=1 seek=549755813888 conv=notrunc 2>/dev/null && \
                                echo tail >> /sparse",
                    "shell": true, "image": "tag:busybox:latest"}))
        .await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    assert_eq!(op["metadata"]["result"]["state"]["exit_code"], 0, "{op}");
    let child = op["result_image_uuid"].as_str().unwrap().to_owned();
    let (op, _) = s
        .run(json!({"command": "stat -c %s /sparse; head -c 4 /sparse; echo; \
                                dd if=/sparse bs=1 skip=549755813888 count=3 2>/dev/null; echo; tail -c 5 /sparse",
                    "shell": true, "image": child, "disposable": true}))
        .await;
    assert_eq!(stdout(&op), format!("{}\nhead\nmid\ntail\n", (1u64 << 40) + 5), "{op}");
    // The host paid for the data, not the terabyte (tree and erofs layer included).
    let grown = allocated(&images).saturating_sub(before);
    assert!(grown < 16 << 20, "the sparse layer cost the host {grown} bytes");
    s.stop().await;
}
