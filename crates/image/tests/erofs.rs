//! The erofs writer against the real `fsck.erofs --extract` (erofs-utils): every image it
//! writes passes the checker, and what comes back out equals the tree that went in.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use std::os::unix::ffi::OsStrExt;

use boxwood_image::erofs::{Content, ErofsImage, Node, NodeKind, NodeMeta, Tree, tree_from_dir, write_image};

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

/// An erofs image mounted read-only by the host kernel for as long as it lives.
/// What [`ErofsImage`] reads, in the form of `common::snapshot` (overlayfs-private xattrs
/// left out as there).
fn reader_snapshot(image: &std::sync::Arc<ErofsImage>) -> std::collections::BTreeMap<std::path::PathBuf, common::Node> {
    use boxwood_image::inert::Kind as K;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![(std::path::PathBuf::new(), image.root().unwrap())];
    while let Some((rel, inode)) = stack.pop() {
        let kind = match inode.kind() {
            K::Dir => {
                for e in image.read_dir(&inode).unwrap().iter() {
                    let name = std::ffi::OsStr::from_bytes(&e.name);
                    stack.push((rel.join(name), image.inode(e.nid).unwrap()));
                }
                common::Kind::Dir
            }
            K::File => {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut image.reader(inode.clone()), &mut data).unwrap();
                assert_eq!(data.len() as u64, inode.len());
                common::Kind::File(data)
            }
            K::Symlink => common::Kind::Symlink(std::ffi::OsStr::from_bytes(&image.read_link(&inode).unwrap()).into()),
            K::Fifo => common::Kind::Fifo,
            K::Char(r) => common::Kind::Char(r),
            K::Block(r) => common::Kind::Block(r),
            K::Socket => common::Kind::Other,
        };
        let mode = if inode.is_symlink() { 0 } else { inode.meta.perm };
        let xattrs = inode.meta.xattrs.iter().filter(|(n, _)| !n.starts_with("trusted.overlay.")).cloned().collect();
        let node = common::Node { kind, mode, uid: inode.uid(), gid: inode.gid(), mtime: inode.mtime(), xattrs };
        out.insert(rel, node);
    }
    out
}

/// A tree with every kind of entry and data layout the writer has.
fn varied_tree(dir: &Path) -> Tree {
    let sparse = dir.join("sparse-src");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"middle", 32 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[9u8; 70_000], 50 << 20).unwrap();
    drop(f);
    let mut tree = Tree::new(meta(0o755, 0, 0));
    let etc = tree.add(0, b"etc", Node { kind: NodeKind::Dir(Vec::new()), meta: meta(0o750, 3, 4) });
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
    let body: Vec<u8> = (0..300_001u32).map(|i| (i % 251) as u8).collect();
    tree.add(0, b"big", Node { kind: NodeKind::Regular(Content::Bytes(body)), meta: meta(0o2755, 0, 50) });
    tree.add(0, b"empty", Node { kind: NodeKind::Regular(Content::Bytes(Vec::new())), meta: meta(0o644, 0, 0) });
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
    tree.add(0, b"sparse", Node { kind: NodeKind::Regular(Content::File(sparse)), meta: meta(0o600, 5, 5) });
    tree
}

#[test]
fn the_reader_sees_what_the_kernel_mounts_of_the_writers_images() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.erofs");
    write_image(&varied_tree(dir.path()), &image).unwrap();
    let reader = std::sync::Arc::new(ErofsImage::open(&image).unwrap());
    let mounted = common::KernelMount::new(&image, &dir.path().join("mnt"));
    let expected = common::snapshot(&mounted.0);
    assert!(expected.len() > 400, "the oracle sees the tree: {}", expected.len());
    common::assert_same_view(&expected, &reader_snapshot(&reader), "reader vs kernel");
    // what a snapshot leaves out: links, opacity, holes
    let root = reader.root().unwrap();
    let su = reader.lookup(&root, b"su").unwrap().unwrap();
    let etc = reader.lookup(&root, b"etc").unwrap().unwrap();
    let link = reader.lookup(&etc, b"su-link").unwrap().unwrap();
    assert_eq!((su.nid, su.nlink()), (link.nid, 2));
    assert!(reader.lookup(&root, b"tmp").unwrap().unwrap().is_opaque());
    assert!(reader.lookup(&root, b"wh").unwrap().unwrap().is_whiteout());
    assert!(reader.lookup(&root, b"nope").unwrap().is_none());
    let sparse = reader.lookup(&root, b"sparse").unwrap().unwrap();
    let extents = reader.data_extents(&sparse).unwrap();
    let data: u64 = extents.iter().map(|(a, b)| b - a).sum();
    assert!(data < 1 << 20 && extents.len() == 2, "only the chunks holding data: {extents:?}");
}

#[test]
fn the_reader_sees_what_the_kernel_mounts_of_mkfs_erofs_images() {
    // mkfs.erofs writes compact inodes, tail-packed data and shared xattrs, which the
    // writer never does
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    common::file(&src, "a/small", "tail");
    std::fs::write(src.join("a/tailpacked"), vec![3u8; 3 * 4096 + 100]).unwrap();
    std::fs::write(src.join("a/aligned"), vec![4u8; 2 * 4096]).unwrap();
    common::link(&src, "a/rel", "small");
    common::fifo(&src, "fifo");
    for i in 0..30 {
        let f = common::file(&src, &format!("x/{i}"), &"y".repeat(i * 300));
        common::set_xattr(&f, "user.shared", b"same value everywhere");
        common::set_owner(&f, 1000 + i as u32, 2000);
    }
    let image = dir.path().join("mkfs.erofs");
    let out = Command::new("mkfs.erofs").args(["--quiet", "-x1"]).arg(&image).arg(&src).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reader = std::sync::Arc::new(ErofsImage::open(&image).unwrap());
    let mounted = common::KernelMount::new(&image, &dir.path().join("mnt"));
    let expected = common::snapshot(&mounted.0);
    assert!(expected.len() > 30, "the oracle sees the tree: {}", expected.len());
    common::assert_same_view(&expected, &reader_snapshot(&reader), "reader vs kernel (mkfs.erofs)");
}

#[test]
fn a_damaged_image_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.erofs");
    write_image(&varied_tree(dir.path()), &image).unwrap();
    let good = std::fs::read(&image).unwrap();
    assert!(reader_walks(&image).is_ok(), "the intact image reads");
    // flip bytes all over the metadata area (and cut the file short): every read either
    // succeeds or fails with a typed error
    let meta_end = 64 << 10;
    for (i, at) in (1024..meta_end.min(good.len())).step_by(97).enumerate() {
        let mut bad = good.clone();
        bad[at] ^= 0x5a ^ (i as u8);
        if i % 7 == 0 {
            bad.truncate(at + 200);
        }
        std::fs::write(&image, &bad).unwrap();
        let _ = reader_walks(&image);
    }
    std::fs::write(&image, b"not erofs at all").unwrap();
    assert!(matches!(ErofsImage::open(&image), Err(boxwood_image::ImageError::CorruptLayer { .. })));
}

/// Walks the whole image, reading every entry (bounded: a corrupt size is not read past
/// a few MiB).
fn reader_walks(image: &Path) -> boxwood_image::ImageResult<usize> {
    let reader = ErofsImage::open(image)?;
    let mut stack = vec![reader.root()?];
    let mut seen = 0;
    while let Some(inode) = stack.pop() {
        seen += 1;
        if seen > 10_000 {
            break; // a corrupt directory can point back at its parent
        }
        match inode.kind() {
            boxwood_image::inert::Kind::Dir => {
                for e in reader.read_dir(&inode)?.iter() {
                    stack.push(reader.inode(e.nid)?);
                }
            }
            boxwood_image::inert::Kind::Symlink => drop(reader.read_link(&inode)?),
            boxwood_image::inert::Kind::File => {
                let mut buf = vec![0u8; 1 << 16];
                let mut at = 0;
                while at < inode.len().min(4 << 20) {
                    let n = reader.read_at(&inode, at, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    at += n as u64;
                }
                reader.data_extents(&inode)?;
            }
            _ => {}
        }
    }
    Ok(seen)
}

/// A layer tar unpacked straight into an image (file data first, metadata after it): the
/// kernel mounts what went into the tar, the checker passes it, and the reader agrees.
#[test]
fn a_tar_unpacked_into_an_image_is_what_the_kernel_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    common::file(&src, "etc/small", "tail");
    std::fs::write(src.join("etc/aligned"), vec![4u8; 2 * 4096]).unwrap();
    let body: Vec<u8> = (0..3_000_001u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("big"), &body).unwrap();
    let sparse = std::fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(1 << 30).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"middle", 1 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, &[9u8; 70_000], 700 << 20).unwrap();
    drop(sparse);
    common::hardlink(&src, "etc/again", "big");
    common::link(&src, "etc/rel", "small");
    common::fifo(&src, "fifo");
    common::whiteout(&src, "gone");
    common::opaque_dir(&src, "opq");
    for i in 0..300 {
        let f = common::file(&src, &format!("many/{i:04}"), &"y".repeat(i * 20));
        common::set_owner(&f, 1000 + i as u32, 2000);
        common::set_xattr(&f, "user.n", i.to_string().as_bytes());
    }
    common::set_mode(&src.join("big"), 0o4755);
    let tar = dir.path().join("layer.tar");
    let st = Command::new("tar")
        .args([
            "--format=posix",
            "--sparse",
            "--sparse-version=1.0",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
        ])
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let image = dir.path().join("layer.erofs");
    let stats =
        boxwood_image::unpack_layer_from(std::fs::File::open(&tar).unwrap(), &image, Default::default(), None).unwrap();
    assert!(stats.content_bytes < 4 << 20 && stats.apparent_bytes > 1 << 30, "{stats:?}");
    let blocks = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(blocks < 8 << 20, "the image costs the data, not the holes: {blocks} bytes");
    fsck_extract(&image, &dir.path().join("extracted"));
    let mounted = common::KernelMount::new(&image, &dir.path().join("mnt"));
    let seen = common::snapshot(&mounted.0);
    let mut expected = common::snapshot(&src);
    // a host's SELinux labels are not the layer's (snapshots leave out overlayfs-private
    // xattrs; opacity is checked below)
    expected.values_mut().for_each(|n| n.xattrs.retain(|k, _| !k.starts_with("security.selinux")));
    common::assert_same_view(&expected, &seen, "kernel mount vs the tar's source");
    let reader = std::sync::Arc::new(ErofsImage::open(&image).unwrap());
    common::assert_same_view(&seen, &reader_snapshot(&reader), "reader vs kernel");
    let root = reader.root().unwrap();
    assert!(reader.lookup(&root, b"opq").unwrap().unwrap().is_opaque());
    let big = reader.lookup(&root, b"big").unwrap().unwrap();
    let etc = reader.lookup(&root, b"etc").unwrap().unwrap();
    assert_eq!(reader.lookup(&etc, b"again").unwrap().unwrap().nid, big.nid, "one inode for the hardlink");
}
