//! The kernel as oracle for [`ImageView`]: walking a layer stack with `list`/`stat`/`open`
//! must show exactly what an overlayfs mount of the same stack shows (type, content, mode,
//! owner, mtime, symlink target), on the hand-built stack and on random ones. Needs root
//! and overlayfs, like `overlay_oracle.rs`.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use boxwood_image::{FileItem, ImageView};
use common::random::{Rng, random_layer};
use common::*;

/// The view as [`snapshot`] records a tree (xattrs left out: the view does not show them).
fn view_snapshot(view: &ImageView) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    out.insert(PathBuf::new(), node(view, "/", &view.stat("/").unwrap()));
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        let dir = format!("/{}", rel.display());
        for item in view.list(&dir).unwrap() {
            let child = rel.join(&item.path);
            let path = format!("/{}", child.display());
            if item.is_dir {
                dirs.push(child.clone());
            }
            out.insert(child, node(view, &path, &item));
        }
    }
    out
}

fn node(view: &ImageView, path: &str, item: &FileItem) -> Node {
    let kind = if item.is_dir {
        Kind::Dir
    } else if item.is_regular {
        let (mut file, _) = view.open_file(path).unwrap();
        let mut body = Vec::new();
        file.read_to_end(&mut body).unwrap();
        Kind::File(body)
    } else if item.is_symlink {
        Kind::Symlink(PathBuf::from(&item.symlink_to))
    } else if item.is_fifo {
        Kind::Fifo
    } else {
        Kind::Other
    };
    let mode = if item.is_symlink { 0 } else { item.mode & 0o7777 };
    Node { kind, mode, uid: item.uid, gid: item.gid, mtime: item.mtime, xattrs: BTreeMap::new() }
}

fn check(base: &Path, layers: &[PathBuf], tag: &str) {
    let all: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();
    let mount = OverlayMount::new(&all, &base.join(format!("mnt-{tag}")));
    let mut expected = snapshot(&mount.path);
    for node in expected.values_mut() {
        node.xattrs.clear();
    }
    let images = base.join(format!("images-{tag}"));
    std::fs::create_dir_all(&images).unwrap();
    let actual = view_snapshot(&ImageView::of_trees(&inert_copies(base, &all, tag), &images).unwrap());
    assert_same_view(&expected, &actual, &format!("{tag}: ImageView vs overlayfs"));
}

#[test]
fn view_of_hand_built_stack_matches_overlayfs() {
    let base = tempfile::tempdir().unwrap();
    let layers = scenario::build(base.path());
    check(base.path(), &layers, "hand");
    check(base.path(), &layers[1..4], "hand-middle");
}

#[test]
fn view_of_random_stacks_matches_overlayfs() {
    for seed in 1..=25u64 {
        let base = tempfile::tempdir().unwrap();
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let layers: Vec<PathBuf> = (0..5)
            .map(|i| {
                let root = dir(base.path(), &format!("L{i}"));
                random_layer(&mut rng, &root, i);
                root
            })
            .collect();
        check(base.path(), &layers, &format!("seed{seed}"));
    }
}
