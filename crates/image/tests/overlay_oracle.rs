//! The kernel as oracle: a stack of layers mounted with overlayfs must show exactly what the
//! stack with some of its layers replaced by their `merge_layers` result (an erofs image,
//! mounted by the kernel as the guest stacks it) shows, entry by entry (type, content, mode, owner, mtime, xattrs, symlink target). Needs root and
//! overlayfs, both verified on the dev machine and in CI: a failed mount fails the test.

mod common;

use std::path::{Path, PathBuf};

use common::random::{Rng, random_layer};
use common::*;

/// Mounts `layers` (topmost first) and snapshots the view.
fn mounted_view(layers: &[&Path], mountpoint: &Path) -> std::collections::BTreeMap<PathBuf, Node> {
    let mount = OverlayMount::new(layers, mountpoint);
    snapshot(&mount.path)
}

/// Replaces `layers[from..to]` by their merge and checks the view is unchanged; when the
/// merge covers the whole stack, the merged tree itself is compared (no whiteouts kept).
fn check_split(base: &Path, layers: &[PathBuf], from: usize, to: usize, tag: &str) {
    let all: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();
    let expected = mounted_view(&all, &base.join(format!("mnt-all-{tag}")));
    let out = base.join(format!("merged-{tag}-{from}-{to}"));
    let whole = from == 0 && to == layers.len();
    let _mount = merge_live(&all[from..to], &out, !whole).unwrap();
    let actual = if whole {
        snapshot(&out)
    } else {
        let mut stack: Vec<&Path> = all[..from].to_vec();
        stack.push(&out);
        stack.extend_from_slice(&all[to..]);
        mounted_view(&stack, &base.join(format!("mnt-{tag}-{from}-{to}")))
    };
    assert_same_view(&expected, &actual, &format!("{tag}: layers {from}..{to} merged"));
}

#[test]
fn hand_built_stack_matches_overlayfs() {
    let base = tempfile::tempdir().unwrap();
    let layers = scenario::build(base.path());
    for (from, to) in [(0, 3), (1, 4), (0, 2), (2, 5), (0, 5), (3, 5)] {
        check_split(base.path(), &layers, from, to, "hand");
    }
}

#[test]
fn random_stacks_match_overlayfs() {
    const LAYERS: usize = 5;
    for seed in 1..=25u64 {
        let base = tempfile::tempdir().unwrap();
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let layers: Vec<PathBuf> = (0..LAYERS)
            .map(|i| {
                let root = dir(base.path(), &format!("L{i}"));
                random_layer(&mut rng, &root, i);
                root
            })
            .collect();
        let tag = format!("seed{seed}");
        for (from, to) in [(0, 3), (1, 4), (2, 5), (0, 2), (0, LAYERS)] {
            check_split(base.path(), &layers, from, to, &tag);
        }
    }
}
