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

/// A record a tenant planted on a legacy tree's root (old versions kept `user.*` xattrs of a
/// layer's root) does not stop the conversion; large live xattrs do not exhaust the inode's
/// xattr space; a layer cannot plant a record through unpack any more.
#[test]
fn planted_records_and_large_xattrs_do_not_keep_a_legacy_tree_live() {
    let base = tempfile::tempdir().unwrap();
    let store_root = base.path().join("store");
    let legacy = store_root.join("trees").join("cd".repeat(32));
    std::fs::create_dir_all(&legacy).unwrap();
    let su = file(&legacy, "bin/su", "#!/bin/sh\n");
    set_mode(&su, 0o4755);
    set_xattr(&su, "user.big", &[7u8; 2500]);
    link(&legacy, "shadow", "/etc/shadow");
    // A valid record for the root, taken from a converted scratch tree.
    let scratch = dir(base.path(), "scratch");
    boxwood_image::inert::make_inert(&scratch).unwrap();
    let record = get_xattr(&scratch, boxwood_image::inert::META_XATTR).unwrap();
    set_xattr(&legacy, boxwood_image::inert::META_XATTR, &record);
    // Positive control: the tree looks converted to a check of its root alone.
    assert!(boxwood_image::inert::is_inert(&legacy).unwrap());
    assert_eq!(su.symlink_metadata().unwrap().mode(), 0o104755);

    FsLayerStore::open(&store_root).unwrap();
    assert_inert(&legacy);
    let st = boxwood_image::inert::stat(&legacy.join("bin/su")).unwrap();
    assert_eq!((st.meta.perm, st.meta.xattr("user.big").map(<[u8]>::len)), (0o4755, Some(2500)));
}
