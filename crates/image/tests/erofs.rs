//! The erofs writer against the real `fsck.erofs --extract` (erofs-utils): every image it
//! writes passes the checker, and what comes back out equals the tree that went in.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use boxwood_image::erofs::{Content, Node, NodeKind, NodeMeta, Tree, tree_from_dir, write_image};

fn fsck_extract(image: &Path, out: &Path) {
    let res = Command::new("fsck.erofs").arg(format!("--extract={}", out.display())).arg(image).output();
    let res = res.expect("fsck.erofs (erofs-utils) is needed");
    assert!(res.status.success(), "fsck.erofs failed: {}", String::from_utf8_lossy(&res.stderr));
}

/// `i_mode` of the inode at `path`, located through `dump.erofs` (its `NID`).
fn raw_mode(image: &Path, path: &str) -> u32 {
    let nid = nid_of(image, path);
    let bytes = std::fs::read(image).unwrap();
    let at = (nid * 32 + 4) as usize;
    u32::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

fn dump(image: &Path, path: &str) -> String {
    let out = Command::new("dump.erofs").arg(format!("--path={path}")).arg(image).output().unwrap();
    assert!(out.status.success(), "dump.erofs {path}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nid_of(image: &Path, path: &str) -> u64 {
    let text = dump(image, path);
    text.split("NID: ").nth(1).and_then(|t| t.split_whitespace().next()).unwrap().parse().unwrap()
}

fn meta(perm: u32, uid: u32, gid: u32) -> NodeMeta {
    NodeMeta { perm, uid, gid, mtime: 1_700_000_000, mtime_nsec: 5, xattrs: Vec::new() }
}

#[test]
fn busybox_tree_round_trips_through_fsck() {
    let dir = tempfile::tempdir().unwrap();
    let tree_dir = dir.path().join("tree");
    std::fs::create_dir(&tree_dir).unwrap();
    boxwood_image::build_busybox_tree(Path::new("/bin/busybox"), &tree_dir).unwrap();
    let image = dir.path().join("busybox.erofs");
    write_image(&tree_from_dir(&tree_dir).unwrap(), &image).unwrap();
    let out = dir.path().join("out");
    fsck_extract(&image, &out);
    // the inert tree's records, made live, against what the image holds
    let live = dir.path().join("live");
    common::materialize(&tree_dir, &live);
    let mut stack = vec![std::path::PathBuf::new()];
    let mut seen = 0;
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(live.join(&rel)).unwrap() {
            let rel = rel.join(e.unwrap().file_name());
            let (a, b) = (live.join(&rel), out.join(&rel));
            let (ma, mb) = (a.symlink_metadata().unwrap(), b.symlink_metadata().unwrap());
            assert_eq!(ma.mode(), mb.mode(), "{}", rel.display());
            assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "{}", rel.display());
            if ma.is_dir() {
                stack.push(rel);
            } else if ma.file_type().is_symlink() {
                assert_eq!(std::fs::read_link(&a).unwrap(), std::fs::read_link(&b).unwrap());
            } else {
                assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{}", rel.display());
                assert_eq!(ma.mtime(), mb.mtime(), "{}", rel.display());
            }
            seen += 1;
        }
    }
    assert!(seen > 250, "busybox applets checked: {seen}");
    // equal trees give equal images (content addressing deduplicates)
    let again = dir.path().join("again.erofs");
    write_image(&tree_from_dir(&tree_dir).unwrap(), &again).unwrap();
    assert_eq!(std::fs::read(&image).unwrap(), std::fs::read(&again).unwrap());
}

#[test]
fn metadata_as_data_devices_setuid_hardlinks_and_sparse_files() {
    let dir = tempfile::tempdir().unwrap();
    // a 1 TiB sparse file with 8 KiB of data in the middle
    let sparse = dir.path().join("sparse");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(1 << 40).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 8192], 1 << 39).unwrap();
    drop(f);
    let big = dir.path().join("big");
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&big, &body).unwrap();

    let mut tree = Tree::new(meta(0o755, 0, 0));
    let etc = tree.add(0, b"etc", Node { kind: NodeKind::Dir(Vec::new()), meta: meta(0o755, 0, 0) });
    let su = tree.add(
        0,
        b"su",
        Node { kind: NodeKind::Regular(Content::Bytes(b"#!/bin/sh\n".to_vec())), meta: meta(0o4755, 0, 0) },
    );
    tree.link(etc, b"su-link", su);
    let mut cap = meta(0o755, 0, 0);
    cap.xattrs
        .push((b"security.capability".to_vec(), vec![1, 0, 0, 2, 0, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    cap.xattrs.push((b"user.note".to_vec(), b"hi".to_vec()));
    tree.add(0, b"capped", Node { kind: NodeKind::Regular(Content::Bytes(vec![1; 5000])), meta: cap });
    tree.add(0, b"null", Node { kind: NodeKind::Char(rustix::fs::makedev(1, 3)), meta: meta(0o666, 0, 0) });
    tree.add(0, b"loop9", Node { kind: NodeKind::Block(rustix::fs::makedev(7, 300)), meta: meta(0o660, 0, 6) });
    tree.add(0, b"fifo", Node { kind: NodeKind::Fifo, meta: meta(0o644, 1000, 1000) });
    tree.add(0, b"wh", Node { kind: NodeKind::Char(0), meta: meta(0, 0, 0) });
    let mut opaque = meta(0o1777, 0, 0);
    opaque.xattrs.push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
    let tmp = tree.add(0, b"tmp", Node { kind: NodeKind::Dir(Vec::new()), meta: opaque });
    for i in 0..400 {
        tree.add(
            tmp,
            format!("entry-with-a-long-name-{i:04}").as_bytes(),
            Node { kind: NodeKind::Symlink(format!("/target/{i}").into_bytes()), meta: meta(0o777, 0, 0) },
        );
    }
    tree.add(0, b"sparse", Node { kind: NodeKind::Regular(Content::File(sparse.clone())), meta: meta(0o600, 5, 5) });
    tree.add(0, b"big", Node { kind: NodeKind::Regular(Content::File(big)), meta: meta(0o2755, 0, 50) });

    let image = dir.path().join("img.erofs");
    write_image(&tree, &image).unwrap();
    let allocated = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(allocated < 8 << 20, "a 1 TiB sparse file costs ~nothing: {allocated} bytes");

    // fsck --extract reads every file in full: check the 1 TiB one separately below
    let text = dump(&image, "/sparse");
    assert!(text.contains("1099511627776"), "{text}");

    let mut small = tree.clone();
    let NodeKind::Dir(children) = &mut small.nodes[0].kind else { unreachable!() };
    children.retain(|(n, _)| n != b"sparse");
    let sparse_small = dir.path().join("sparse-small");
    let f = std::fs::File::create(&sparse_small).unwrap();
    f.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"middle", 32 << 20).unwrap();
    small.add(0, b"sparse", Node { kind: NodeKind::Regular(Content::File(sparse_small)), meta: meta(0o600, 5, 5) });
    let image = dir.path().join("small.erofs");
    write_image(&small, &image).unwrap();
    let out = dir.path().join("out");
    fsck_extract(&image, &out);

    let md = |p: &str| out.join(p).symlink_metadata().unwrap();
    // erofs-utils 1.5 masks setuid/setgid/sticky when extracting and dumping; the full i_mode
    // is read at the inode dump.erofs locates
    assert_eq!(raw_mode(&image, "/su"), 0o104755);
    assert_eq!(raw_mode(&image, "/big"), 0o102755);
    assert_eq!(raw_mode(&image, "/tmp"), 0o41777);
    assert_eq!(md("su").mode() & 0o170777, 0o100755);
    assert_eq!(nid_of(&image, "/su"), nid_of(&image, "/etc/su-link"), "a hardlink is the same inode");
    assert!(dump(&image, "/su").contains("Links: 2"));
    assert_eq!(md("big").gid(), 50);
    assert_eq!(std::fs::read(out.join("big")).unwrap(), body);
    assert_eq!(std::fs::read(out.join("capped")).unwrap(), vec![1; 5000]);
    assert!(md("null").file_type().is_char_device());
    assert_eq!(md("null").rdev(), rustix::fs::makedev(1, 3));
    assert!(md("loop9").file_type().is_block_device());
    assert_eq!(md("loop9").rdev(), rustix::fs::makedev(7, 300));
    assert!(md("fifo").file_type().is_fifo());
    assert_eq!(md("fifo").uid(), 1000);
    assert!(md("wh").file_type().is_char_device() && md("wh").rdev() == 0);
    assert_eq!(md("tmp").permissions().mode() & 0o777, 0o777);
    assert_eq!(std::fs::read_dir(out.join("tmp")).unwrap().count(), 400);
    assert_eq!(std::fs::read_link(out.join("tmp/entry-with-a-long-name-0123")).unwrap(), Path::new("/target/123"));
    // fsck.erofs 1.5 (Debian 12) checks a chunk-based file's chunks but extracts only the
    // mapped ones, back to back (no holes): the 16 KiB chunk holding the data comes out alone
    // (1.8, Debian 13, then sets the full size). The data is checked at its place in the guest
    // tests, where the kernel reads the image.
    assert!(dump(&image, "/sparse").contains("Size: 67108864"));
    let s = std::fs::read(out.join("sparse")).unwrap();
    let at = s.windows(6).position(|w| w == b"middle");
    assert!(at == Some(0) || at == Some(32 << 20), "extracted data at {at:?} of {} bytes", s.len());
    assert_eq!(md("sparse").mtime(), 1_700_000_000);
}
