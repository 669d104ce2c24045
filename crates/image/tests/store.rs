//! `FsLayerStore::open` removes the unpacked trees older versions kept next to each layer,
//! live ones (real owners, setuid bits, device nodes) included, and keeps the layers.

mod common;

use std::os::unix::fs::MetadataExt;

use boxwood_image::{FsLayerStore, LayerStore};
use common::*;

#[tokio::test]
async fn an_older_versions_trees_are_removed_at_open_and_its_layers_kept() {
    let base = tempfile::tempdir().unwrap();
    let layers = scenario::build(base.path());
    let store_root = base.path().join("store");
    // A layer published the current way, and a legacy live tree beside it.
    let store = FsLayerStore::open(&store_root).unwrap();
    let staged = store.staging_dir().unwrap();
    std::fs::remove_dir(&staged).unwrap();
    inert_copy(&layers[0], &staged);
    let info = store.commit_tree(staged).await.unwrap();
    let trees = store_root.join("trees");
    std::fs::create_dir_all(&trees).unwrap();
    let legacy = trees.join(info.digest.trim_start_matches("sha256:"));
    let status = std::process::Command::new("cp").arg("-a").arg(&layers[0]).arg(&legacy).status().unwrap();
    assert!(status.success());
    let su = file(&legacy, "bin/su", "#!/bin/sh\n");
    set_mode(&su, 0o4755);
    whiteout(&legacy, "gone-too");
    // Positive control: the legacy tree has what a scan must flag.
    assert_eq!(su.symlink_metadata().unwrap().mode(), 0o104755);
    assert!(is_whiteout(&legacy.join("gone-too")));

    let store = FsLayerStore::open(&store_root).unwrap();
    assert!(!trees.exists(), "the legacy trees are gone");
    let disk = store.layer_path(&info.digest).unwrap();
    let mounted = KernelMount::new(&disk, &base.path().join("mnt"));
    assert_same_view(&snapshot(&layers[0]), &snapshot(&mounted.0), "the layer after the trees went");
    assert_eq!(store.stored_bytes(&info.digest).await.unwrap(), info.stored_bytes);
}
