//! `FsLayerStore::open` converts trees an older version left in the live form (real owners,
//! setuid bits, device nodes, symlinks, xattrs) to the inert form, keeping what they hold.

mod common;

use std::os::unix::fs::MetadataExt;

use boxwood_image::FsLayerStore;
use common::*;

#[test]
fn legacy_live_trees_are_made_inert_at_open_without_losing_anything() {
    let base = tempfile::tempdir().unwrap();
    let layers = scenario::build(base.path());
    let store_root = base.path().join("store");
    let trees = store_root.join("trees");
    std::fs::create_dir_all(&trees).unwrap();
    let legacy = trees.join("ab".repeat(32));
    let status = std::process::Command::new("cp").arg("-a").arg(&layers[0]).arg(&legacy).status().unwrap();
    assert!(status.success());
    let su = file(&legacy, "bin/su", "#!/bin/sh\n");
    set_mode(&su, 0o4755);
    whiteout(&legacy, "gone-too");
    let expected = snapshot(&legacy);
    // Positive control: the legacy tree has what a scan must flag.
    assert_eq!(su.symlink_metadata().unwrap().mode(), 0o104755);
    assert!(is_whiteout(&legacy.join("gone-too")));

    FsLayerStore::open(&store_root).unwrap();
    assert_inert(&legacy);
    let live = base.path().join("live");
    materialize(&legacy, &live);
    assert_same_view(&expected, &snapshot(&live), "legacy tree after conversion");
    // Opening again leaves a converted tree as it is.
    FsLayerStore::open(&store_root).unwrap();
    assert_inert(&legacy);
}
