//! Abuse: sparse and huge files that cost nothing in the guest must not cost the host their
//! apparent size; past the layer limit a persist fails clearly and leaves nothing behind.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::{Value, json};

use crate::harness::TestServer;

/// Bytes allocated on disk under `dir` (each inode once).
fn allocated(dir: &Path) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let Ok(m) = path.symlink_metadata() else { continue };
        if seen.insert((m.dev(), m.ino())) {
            total += m.blocks() * 512;
        }
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&path).into_iter().flatten().flatten().map(|e| e.path()));
        }
    }
    total
}

fn stdout(op: &Value) -> String {
    op["metadata"]["result"]["stdout"]["value"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn sparse_files_cost_their_data_and_huge_ones_are_refused() {
    let s = TestServer::start().await;
    let images = s.state.as_ref().unwrap().path().join("images");
    let before = allocated(&images);

    // A 1 GiB hole with a few bytes of data persists; the guest sees its apparent size …
    let (op, _) = s
        .run(json!({"command": "truncate -s 1G /sparse && echo data >> /sparse", "shell": true,
                    "image": "tag:busybox:latest"}))
        .await;
    assert_eq!(op["status"], "SUCCESS", "{op}");
    let child = op["result_image_uuid"].as_str().unwrap().to_owned();
    let (op, _) = s
        .run(json!({"command": "stat -c %s /sparse; tail -c 5 /sparse", "shell": true, "image": child,
                    "disposable": true}))
        .await;
    assert_eq!(stdout(&op), format!("{}\ndata\n", (1u64 << 30) + 5), "{op}");
    // … while the host paid for the data, not the gigabyte (tree and erofs layer included).
    let grown = allocated(&images).saturating_sub(before);
    assert!(grown < 16 << 20, "the sparse layer cost the host {grown} bytes");

    // 100 GiB of holes is past the default layer limit: the persist fails, saying why.
    let before = allocated(&images);
    let (op, _) =
        s.run(json!({"command": "truncate -s 100G /huge", "shell": true, "image": "tag:busybox:latest"})).await;
    assert_eq!(op["status"], "FAILED", "{op}");
    let error = op["error"].as_str().unwrap_or_default();
    assert!(error.contains("layer limit"), "{op}");
    assert!(!error.contains("/var/") && !error.contains("images/"), "no host paths: {error}");
    assert!(allocated(&images).saturating_sub(before) < 1 << 20, "nothing of the refused layer stays");
    let staging: Vec<_> = std::fs::read_dir(images.join("tmp")).unwrap().collect();
    assert!(staging.is_empty(), "no staging leftovers: {staging:?}");
    s.stop().await;
}
