//! `merge_layers` on the hand-built stack of `common::scenario`, asserted file by file on
//! the kernel's mount of the merged erofs image.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use boxwood_image::{ImageError, merge_layers};

use common::*;

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn opaque(path: &Path) -> bool {
    get_xattr(path, OPAQUE).as_deref() == Some(b"y")
}

/// Checks what both modes agree on.
fn common_expectations(out: &Path) {
    // a: merged dir, top metadata, files from all merged layers
    let a = out.join("a");
    let meta = a.symlink_metadata().unwrap();
    assert!(meta.is_dir() && !opaque(&a));
    assert_eq!((meta.mode() & 0o7777, meta.uid(), meta.gid(), meta.mtime()), (0o750, 1000, 100, 1_111_111));
    assert_eq!(get_xattr(&a, "user.dir").as_deref(), Some(&b"top a"[..]));
    assert_eq!(read(&a.join("file1")), "a/file1 from L0");
    let f1 = a.join("file1").symlink_metadata().unwrap();
    assert_eq!((f1.mode() & 0o7777, f1.uid(), f1.gid(), f1.mtime()), (0o4755, 1000, 1000, 1_234_567));
    assert_eq!(get_xattr(&a.join("file1"), "user.mime").as_deref(), Some(&b"text/plain"[..]));
    assert_eq!(read(&a.join("file2")), "a/file2 from L1");
    assert_eq!(get_xattr(&a.join("file2"), "user.origin").as_deref(), Some(&b"L1"[..]));
    assert_eq!(read(&a.join("sub/x")), "a/sub/x from L2");
    // hardlinks within a layer stay hardlinks
    let (l1, l2) = (a.join("file2").symlink_metadata().unwrap(), a.join("file2-link").symlink_metadata().unwrap());
    assert_eq!(l1.ino(), l2.ino());
    let (h1, h2) = (out.join("hl/one").symlink_metadata().unwrap(), out.join("hl/two").symlink_metadata().unwrap());
    assert_eq!(h1.ino(), h2.ino());
    // c: opaque dir in L1 replaces L2's subtree
    assert_eq!(read(&out.join("c/new")), "c/new from L1");
    assert!(!exists(&out.join("c/y")));
    // d: dir over a file
    assert!(out.join("d").symlink_metadata().unwrap().is_dir());
    assert_eq!(read(&out.join("d/inner")), "d/inner from L1");
    // f: merged dir, f/old whited out, f/keep kept
    assert!(!opaque(&out.join("f")));
    assert_eq!(read(&out.join("f/keep")), "f/keep from L2");
    // g: file replaces a symlink; h: fifo replaces a dir
    assert_eq!(read(&out.join("g")), "g is a file in L0");
    assert!(out.join("h").symlink_metadata().unwrap().file_type().is_fifo());
    assert!(!exists(&out.join("h/k")));
    // i: new dir with its own mode
    let i = out.join("i").symlink_metadata().unwrap();
    assert_eq!((i.mode() & 0o7777, i.mtime()), (0o1777, 2_222_222));
    assert!(!opaque(&out.join("i")));
    // k: dir over a whiteout
    assert_eq!(read(&out.join("k/n")), "k/n from L0");
    // m: non-opaque dir in L0 over an opaque one in L1 over L2's
    assert_eq!(read(&out.join("m/top")), "m/top from L0");
    assert_eq!(read(&out.join("m/new")), "m/new from L1");
    assert!(!exists(&out.join("m/old")));
    // q: opaque in L0; the whiteout inside it is moot
    assert_eq!(read(&out.join("q/top")), "q/top from L0");
    assert!(!exists(&out.join("q/w")));
    // s: symlink target kept verbatim, never followed
    assert_eq!(std::fs::read_link(out.join("s")).unwrap(), Path::new("../escape/ok/only/a/target"));
    // nothing from below the merged layers
    for below in ["a/below", "z", "f/below", "i/below"] {
        assert!(!exists(&out.join(below)), "{below} is not in the merged layers");
    }
}

#[test]
fn merge_keeping_whiteouts_keeps_what_hides_lower_layers() {
    let base = tempfile::tempdir().unwrap();
    let layers = scenario::build(base.path());
    let out = base.path().join("out");
    let merged: Vec<&Path> = layers[..3].iter().map(|p| p.as_path()).collect();
    let _mount = merge_live(&merged, &out, true).unwrap();
    common_expectations(&out);

    for w in ["b", "e", "f/old", "j", "r"] {
        assert!(is_whiteout(&out.join(w)), "{w} stays a whiteout");
    }
    for dir in ["c", "d", "k", "m", "q"] {
        assert!(opaque(&out.join(dir)), "{dir} must be opaque");
    }
    for dir in ["", "a", "a/sub", "f", "i", "hl"] {
        assert!(!opaque(&out.join(dir)), "{dir:?} must merge with lower layers");
    }
}

#[test]
fn full_merge_leaves_no_whiteouts_or_opaque_marks() {
    let base = tempfile::tempdir().unwrap();
    let layers = scenario::build(base.path());
    let out = base.path().join("out");
    let merged: Vec<&Path> = layers[..3].iter().map(|p| p.as_path()).collect();
    let _mount = merge_live(&merged, &out, false).unwrap();
    common_expectations(&out);
    for gone in ["b", "e", "f/old", "j", "r", "k/below"] {
        assert!(!exists(&out.join(gone)), "{gone} must be gone");
    }
    for (path, node) in snapshot(&out) {
        assert!(!matches!(node.kind, Kind::Char(0)), "whiteout left at {}", path.display());
        assert!(get_xattr(&out.join(&path), OPAQUE).is_none(), "opaque mark left at {}", path.display());
    }
}

#[test]
fn single_layer_merge_is_a_copy_and_bad_inputs_are_refused() {
    let base = tempfile::tempdir().unwrap();
    let layer = dir(base.path(), "layer");
    let f = file(&layer, "etc/passwd", "root:x:0:0\n");
    set_owner(&f, 7, 8);
    whiteout(&layer, "gone");
    opaque_dir(&layer, "opq");
    let out = base.path().join("out");
    let mount = merge_live(&[&layer], &out, true).unwrap();
    assert_eq!(read(&out.join("etc/passwd")), "root:x:0:0\n");
    assert_eq!(out.join("etc/passwd").symlink_metadata().unwrap().uid(), 7);
    assert!(is_whiteout(&out.join("gone")));
    assert!(opaque(&out.join("opq")));
    // whiteouts keep their device type
    assert!(out.join("gone").symlink_metadata().unwrap().file_type().is_char_device());
    drop(mount);
    // the output must be new; a layer must be an erofs image
    let image = erofs_of(&inert_copy(&layer, &base.path().join("layer-inert")));
    let existing = base.path().join("existing");
    std::fs::write(&existing, b"x").unwrap();
    let err = merge_layers(&[&image], &existing, true).unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"x");
    assert!(matches!(merge_layers(&[], &base.path().join("x"), true), Err(ImageError::InvalidTree { .. })));
    let missing = base.path().join("missing");
    assert!(merge_layers(&[&missing], &base.path().join("y"), true).is_err());
    assert!(matches!(merge_layers(&[&existing], &base.path().join("z"), true), Err(ImageError::CorruptLayer { .. })));
}

#[test]
fn sparse_files_stay_sparse_through_a_merge() {
    let base = tempfile::tempdir().unwrap();
    let lower = dir(base.path(), "lower");
    let upper = dir(base.path(), "upper");
    file(&lower, "below", "from the lower layer");
    // 1 TiB apparent with data at 1 MiB and in the last block: a dense copy would need 1 TiB.
    let path = upper.join("huge");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(1 << 40).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"middle", 1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"end", (1 << 40) - 3).unwrap();
    drop(f);
    let out = base.path().join("out");
    let _mount = merge_live(&[&upper, &lower], &out, false).unwrap();
    let image = base.path().join("out-merged.erofs");
    let allocated = image.metadata().unwrap().blocks() * 512;
    assert!(allocated < 8 << 20, "holes stay holes: {allocated} bytes allocated");

    let merged = out.join("huge");
    assert_eq!(merged.symlink_metadata().unwrap().len(), 1 << 40, "apparent size kept");
    let f = std::fs::File::open(&merged).unwrap();
    let mut buf = [0u8; 6];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 1 << 20).unwrap();
    assert_eq!(&buf, b"middle");
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf[..3], (1 << 40) - 3).unwrap();
    assert_eq!(&buf[..3], b"end");
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 1 << 30).unwrap();
    assert_eq!(buf, [0; 6]);
    assert_eq!(read(&out.join("below")), "from the lower layer");
}
