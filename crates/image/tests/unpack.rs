//! `unpack_layer_from`: every member type round-trips into the erofs image, the guest's files
//! never become host files (the host holds one private image file), and hostile tars never
//! write outside it (each hostile case checks a sentinel directory and the image's parent
//! afterwards). Round trips are asserted on the image as the kernel mounts it.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use boxwood_image::{ImageError, UnpackLimits, UnpackStats, unpack_layer_from};
use common::*;
use tar::EntryType;

fn unpack_layer(tar: &Path, image: &Path) -> Result<UnpackStats, ImageError> {
    unpack_layer_limited(tar, image, UnpackLimits::default())
}

fn unpack_layer_limited(tar: &Path, image: &Path, limits: UnpackLimits) -> Result<UnpackStats, ImageError> {
    unpack_layer_from(std::fs::File::open(tar).unwrap(), image, limits, None)
}

/// A valid `security.capability` (v2, effective, cap_net_bind_service permitted).
const CAP: [u8; 20] = [1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn meta(path: &Path) -> std::fs::Metadata {
    path.symlink_metadata().unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// An unpacked image as the kernel mounts it (read-only, through a loop device).
struct Live {
    _mount: KernelMount,
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Live {
    fn of(image: &Path) -> Self {
        assert_private_file(image);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("live");
        let mount = KernelMount::new(image, &root);
        Live { _mount: mount, _dir: dir, root }
    }
}

/// The image on the host is a plain private file: no live mode, owner or xattr of the guest's.
fn assert_private_file(image: &Path) {
    let m = meta(image);
    assert_eq!(m.mode(), 0o100600, "{}", image.display());
    assert_eq!((m.uid(), m.gid()), (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw()));
    let mut names = [0u8; 256];
    assert_eq!(rustix::fs::llistxattr(image, &mut names[..]).unwrap(), 0, "the image file has no xattrs");
}

/// Unpacks `tar` into the image `image` and returns it mounted.
fn unpack_live(tar: &Path, image: &Path) -> (UnpackStats, Live) {
    let stats = unpack_layer(tar, image).unwrap();
    (stats, Live::of(image))
}

#[test]
fn every_member_type_round_trips() {
    let base = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let user = Hdr { mode: 0o4755, uid: 1000, gid: 1000, mtime: 1_234_567_890 };
    let mut tb = TarBuilder::new();
    tb.dir("./", Hdr { mode: 0o755, mtime: 1_000_000, ..Hdr::default() }, &[])
        .dir("./etc/", Hdr { mode: 0o755, mtime: 1_500_000_000, ..Hdr::default() }, &[])
        .file("./etc/passwd", b"root:x:0:0::/root:/bin/sh\n", Hdr::default(), &[])
        .dir("./bin/", Hdr { mode: 0o755, ..Hdr::default() }, &[])
        .file("./bin/su", b"#!/bin/sh\n", user, &[("security.capability", &CAP), ("user.note", b"v\0bin")])
        .hardlink("./bin/su-again", "./bin/su")
        .symlink("./bin/sh", "/bin/busybox")
        .file("bin/big", &big, Hdr { mode: 0o600, ..Hdr::default() }, &[])
        .dir("./opq/", Hdr { mode: 0o2775, uid: 1000, gid: 1000, mtime: 1_400_000_000 }, &[(OPAQUE, b"y")])
        .file("./opq/inner", b"inner", Hdr::default(), &[])
        .dir("./tmp/", Hdr { mode: 0o1777, ..Hdr::default() }, &[])
        .raw(EntryType::Char, "./gone", None, &[], Hdr { mode: 0o600, ..Hdr::default() }, &[])
        .raw(EntryType::Fifo, "./fifo", None, &[], Hdr { mode: 0o640, uid: 5, gid: 6, mtime: 42 }, &[]);
    let tar = tb.write(base.path(), "layer");
    let image = base.path().join("layer.erofs");

    let (stats, live) = unpack_live(&tar, &image);
    let tree = &live.root;
    assert_eq!(
        stats,
        UnpackStats {
            entries: 13,
            content_bytes: 26 + 10 + big.len() as u64 + 5,
            apparent_bytes: 26 + 10 + big.len() as u64 + 5
        }
    );

    let su = meta(&tree.join("bin/su"));
    assert_eq!((su.mode() & 0o7777, su.uid(), su.gid(), su.mtime()), (0o4755, 1000, 1000, 1_234_567_890));
    assert_eq!(get_xattr(&tree.join("bin/su"), "security.capability").as_deref(), Some(&CAP[..]));
    assert_eq!(get_xattr(&tree.join("bin/su"), "user.note").as_deref(), Some(&b"v\0bin"[..]));
    assert_eq!(meta(&tree.join("bin/su-again")).ino(), su.ino(), "hardlink shares the inode");
    assert_eq!(std::fs::read_link(tree.join("bin/sh")).unwrap(), Path::new("/bin/busybox"));
    assert_eq!(std::fs::read(tree.join("bin/big")).unwrap(), big);
    assert_eq!(std::fs::read_to_string(tree.join("etc/passwd")).unwrap(), "root:x:0:0::/root:/bin/sh\n");

    let opq = meta(&tree.join("opq"));
    assert_eq!((opq.mode() & 0o7777, opq.uid(), opq.gid()), (0o2775, 1000, 1000));
    assert_eq!(opq.mtime(), 1_400_000_000, "directory mtime set after its children");
    assert_eq!(get_xattr(&tree.join("opq"), OPAQUE).as_deref(), Some(&b"y"[..]));
    assert_eq!(meta(&tree.join("etc")).mtime(), 1_500_000_000);
    assert_eq!(meta(&tree.join("tmp")).mode() & 0o7777, 0o1777);
    assert_eq!(meta(tree).mtime(), 1_000_000, "`./` sets the root's metadata");

    assert!(is_whiteout(&tree.join("gone")), "whiteout is a char 0/0 device");
    let fifo = meta(&tree.join("fifo"));
    assert!(fifo.file_type().is_fifo());
    assert_eq!((fifo.mode() & 0o7777, fifo.uid(), fifo.gid(), fifo.mtime()), (0o640, 5, 6, 42));
}

#[test]
fn pax_records_override_header_fields() {
    let base = tempfile::tempdir().unwrap();
    let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
    let mut tb = TarBuilder::new();
    tb.pax(&[("uid", b"3000000"), ("gid", b"3000001"), ("mtime", b"1700000000.25"), ("path", long.as_bytes())])
        .file("short-name", b"x", Hdr::default(), &[])
        .pax(&[("mtime", b"-10"), ("SCHILY.xattr.user.k", b"v")])
        .file("old", b"y", Hdr::default(), &[]);
    let tar = tb.write(base.path(), "layer");
    let (_, live) = unpack_live(&tar, &base.path().join("layer.erofs"));
    let tree = &live.root;
    let f = meta(&tree.join(&long));
    assert_eq!((f.uid(), f.gid(), f.mtime(), f.mtime_nsec()), (3_000_000, 3_000_001, 1_700_000_000, 250_000_000));
    assert!(!exists(&tree.join("short-name")));
    assert_eq!(meta(&tree.join("old")).mtime(), -10);
    assert_eq!(get_xattr(&tree.join("old"), "user.k").as_deref(), Some(&b"v"[..]));
}

#[test]
fn unpacking_never_overwrites_a_file() {
    let base = tempfile::tempdir().unwrap();
    let mut tb = TarBuilder::new();
    tb.file("a", b"a", Hdr::default(), &[]);
    let tar = tb.write(base.path(), "layer");
    let image = file(base.path(), "image", "already here");
    assert!(matches!(unpack_layer(&tar, &image), Err(ImageError::Io { .. })));
    assert_eq!(std::fs::read_to_string(&image).unwrap(), "already here");
}

/// A base dir holding `image` (the unpack target) and `sentinel/` (a stand-in for the host),
/// with a snapshot of everything outside the image taken before unpacking.
struct Hostile {
    base: tempfile::TempDir,
    image: PathBuf,
    sentinel: PathBuf,
    live: std::cell::RefCell<Option<Live>>,
}

impl Hostile {
    fn new() -> Self {
        let base = tempfile::tempdir().unwrap();
        let image = base.path().join("image");
        let sentinel = dir(base.path(), "sentinel");
        file(&sentinel, "secret", "do not touch");
        Hostile { base, image, sentinel, live: Default::default() }
    }

    /// The mounted image after a successful [`Hostile::unpack`].
    fn live(&self) -> PathBuf {
        self.live.borrow().as_ref().expect("unpacked").root.clone()
    }

    fn sentinel_str(&self) -> String {
        self.sentinel.display().to_string()
    }

    /// Unpacks `tb`, then asserts nothing outside the image changed: the base holds only
    /// the image, `sentinel` and the tar, and the sentinel is as it was (content, mode, links).
    fn unpack(&self, tb: TarBuilder) -> Result<UnpackStats, ImageError> {
        let tar = tb.write(self.base.path(), "hostile");
        let before = snapshot(&self.sentinel);
        let secret = meta(&self.sentinel.join("secret"));
        let result = unpack_layer(&tar, &self.image);
        assert_same_view(&before, &snapshot(&self.sentinel), "sentinel after a hostile unpack");
        assert_eq!(meta(&self.sentinel.join("secret")).nlink(), secret.nlink(), "no hardlink to the sentinel");
        let mut names: Vec<String> = std::fs::read_dir(self.base.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.retain(|n| n != "image");
        assert_eq!(names, ["hostile.tar", "sentinel"], "nothing created beside the image");
        if result.is_ok() {
            *self.live.borrow_mut() = Some(Live::of(&self.image));
        }
        result
    }
}

fn refused(result: Result<UnpackStats, ImageError>, member: &str) {
    match result {
        Err(ImageError::BadLayer { member: m, reason }) => {
            assert_eq!(m, member, "error names the member ({reason})");
        }
        other => panic!("{member}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn parent_dir_escapes_are_refused() {
    for name in ["../escape", "a/../../x", "./../escape", "..", "a/.."] {
        let h = Hostile::new();
        let mut tb = TarBuilder::new();
        tb.dir("a/", Hdr::default(), &[]).file(name, b"x", Hdr::default(), &[]);
        refused(h.unpack(tb), name);
    }
    let h = Hostile::new();
    let mut tb = TarBuilder::new();
    tb.raw(EntryType::Char, "../x", None, &[], Hdr::default(), &[]);
    refused(h.unpack(tb), "../x");
}

#[test]
fn absolute_names_are_refused() {
    let h = Hostile::new();
    let name = format!("{}/abs", h.sentinel_str());
    let mut tb = TarBuilder::new();
    tb.file(&name, b"x", Hdr::default(), &[]);
    refused(h.unpack(tb), &name);
    assert!(!exists(&h.sentinel.join("abs")));
}

#[test]
fn nothing_is_created_through_a_symlink() {
    let h = Hostile::new();
    let mut tb = TarBuilder::new();
    tb.symlink("link", &h.sentinel_str()).file("link/file", b"pwned", Hdr::default(), &[]);
    refused(h.unpack(tb), "link/file");

    // directories too, and a symlink reached through `./`
    let h = Hostile::new();
    let mut tb = TarBuilder::new();
    tb.symlink("./link", &h.sentinel_str()).dir("./link/sub/", Hdr::default(), &[]);
    refused(h.unpack(tb), "./link/sub/");

    // a member *named* like an earlier symlink replaces the symlink, never writes through it
    let h = Hostile::new();
    let secret = format!("{}/secret", h.sentinel_str());
    let mut tb = TarBuilder::new();
    tb.symlink("s", &secret)
        .file("s", b"replaced", Hdr { mode: 0o777, ..Hdr::default() }, &[("user.x", b"1")])
        .symlink("d", &h.sentinel_str())
        .dir("d/", Hdr { mode: 0o777, ..Hdr::default() }, &[]);
    h.unpack(tb).unwrap();
    assert_eq!(std::fs::read_to_string(h.live().join("s")).unwrap(), "replaced");
    assert!(meta(&h.live().join("d")).is_dir());
}

#[test]
fn hardlinks_outside_the_tree_are_refused() {
    for target in ["/etc/passwd", "../sentinel/secret", "../../etc/passwd"] {
        let h = Hostile::new();
        let mut tb = TarBuilder::new();
        tb.hardlink("h", target);
        refused(h.unpack(tb), "h");
    }
    // a target through a symlink
    let h = Hostile::new();
    let mut tb = TarBuilder::new();
    tb.symlink("link", &h.sentinel_str()).hardlink("h", "link/secret");
    refused(h.unpack(tb), "h");
    // a target that was never a member
    let h = Hostile::new();
    let mut tb = TarBuilder::new();
    tb.hardlink("h", "nothing");
    refused(h.unpack(tb), "h");
    // a directory
    let h = Hostile::new();
    let mut tb = TarBuilder::new();
    tb.dir("d/", Hdr::default(), &[]).hardlink("h", "d");
    refused(h.unpack(tb), "h");
    // a hardlink to an escaping symlink links the symlink itself, never its target
    let h = Hostile::new();
    let secret = format!("{}/secret", h.sentinel_str());
    let mut tb = TarBuilder::new();
    tb.symlink("link", &secret).hardlink("h", "link");
    h.unpack(tb).unwrap();
    let link = meta(&h.live().join("h"));
    assert!(link.file_type().is_symlink());
    assert_eq!(link.ino(), meta(&h.live().join("link")).ino());
}

#[test]
fn devices_and_unknown_types_are_skipped() {
    let h = Hostile::new();
    let mut tb = TarBuilder::new();
    tb.device(EntryType::Block, "sda", 8, 0)
        .device(EntryType::Char, "null", 1, 3)
        .device(EntryType::Char, "whiteout", 0, 0)
        .raw(EntryType::new(b'V'), "volume-label", None, &[], Hdr::default(), &[])
        .file("after", b"still unpacked", Hdr::default(), &[]);
    let stats = h.unpack(tb).unwrap();
    assert_eq!(stats.entries, 2);
    assert!(
        !exists(&h.live().join("sda")) && !exists(&h.live().join("null")) && !exists(&h.live().join("volume-label"))
    );
    assert!(is_whiteout(&h.live().join("whiteout")));
    assert_eq!(std::fs::read_to_string(h.live().join("after")).unwrap(), "still unpacked");
}

#[test]
fn overlay_private_and_foreign_xattrs_are_dropped() {
    let h = Hostile::new();
    let mut tb = TarBuilder::new();
    tb.dir(
        "d/",
        Hdr::default(),
        &[("trusted.overlay.redirect", b"/etc"), ("system.foo", b"x"), ("user.ok", b"1"), (OPAQUE, b"x")],
    );
    h.unpack(tb).unwrap();
    let d = h.live().join("d");
    assert_eq!(get_xattr(&d, "user.ok").as_deref(), Some(&b"1"[..]));
    assert_eq!(get_xattr(&d, "trusted.overlay.redirect"), None);
    assert_eq!(get_xattr(&d, OPAQUE), None);
}

#[test]
fn structural_conflicts_are_refused() {
    // a parent that is a file
    let h = Hostile::new();
    let mut tb = TarBuilder::new();
    tb.file("f", b"x", Hdr::default(), &[]).file("f/x", b"x", Hdr::default(), &[]);
    refused(h.unpack(tb), "f/x");
    // a non-directory over a directory
    let h = Hostile::new();
    let mut tb = TarBuilder::new();
    tb.dir("d/", Hdr::default(), &[]).file("d/in", b"x", Hdr::default(), &[]).file("d", b"x", Hdr::default(), &[]);
    refused(h.unpack(tb), "d");
    // the root as a non-directory
    let h = Hostile::new();
    let mut tb = TarBuilder::new();
    tb.file("./", b"x", Hdr::default(), &[]);
    refused(h.unpack(tb), "./");
}

/// A GNU tar (`--sparse --sparse-version=1.0`, the format the agent writes) archive of a
/// 1 GiB file holding 6 bytes of data.
fn gnu_sparse_tar(base: &Path) -> PathBuf {
    let src = dir(base, "src");
    let f = std::fs::File::create(src.join("big")).unwrap();
    f.set_len(1 << 30).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"middle", 1 << 20).unwrap();
    drop(f);
    let tar = base.join("sparse.tar");
    let st = std::process::Command::new("tar")
        .args(["--format=posix", "--sparse", "--sparse-version=1.0", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg("big")
        .status()
        .unwrap();
    assert!(st.success());
    assert!(meta(&tar).len() < 1 << 20, "the archive itself holds only the data");
    tar
}

#[test]
fn sparse_files_are_unpacked_with_holes() {
    let base = tempfile::tempdir().unwrap();
    let tar = gnu_sparse_tar(base.path());
    let image = base.path().join("layer.erofs");
    let (stats, live) = unpack_live(&tar, &image);
    let tree = &live.root;
    let big = meta(&tree.join("big"));
    assert_eq!(big.len(), 1 << 30, "apparent size restored");
    let on_host = meta(&image);
    assert!(on_host.blocks() * 512 < 1 << 20, "holes cost nothing on the host: {} blocks", on_host.blocks());
    assert!(stats.content_bytes < 1 << 20, "only data is counted as written: {}", stats.content_bytes);
    assert_eq!(stats.apparent_bytes, 1 << 30);
    let data = std::fs::File::open(tree.join("big")).unwrap();
    let mut buf = [0u8; 6];
    std::os::unix::fs::FileExt::read_exact_at(&data, &mut buf, 1 << 20).unwrap();
    assert_eq!(&buf, b"middle");
    std::os::unix::fs::FileExt::read_exact_at(&data, &mut buf, 12345).unwrap();
    assert_eq!(buf, [0; 6]);
    assert!(!tree.join("GNUSparseFile.0").exists(), "the stand-in name is not used");
}

#[test]
fn data_is_bounded_and_holes_are_free() {
    let base = tempfile::tempdir().unwrap();
    // 1 GiB apparent, a few KiB of data: far under a 1 MiB limit, since holes cost nothing.
    let tar = gnu_sparse_tar(base.path());
    let ok = base.path().join("ok.erofs");
    let stats = unpack_layer_limited(&tar, &ok, UnpackLimits { max_data_bytes: 1 << 20 }).unwrap();
    assert_eq!(stats.apparent_bytes, 1 << 30);
    // Its data does count: a limit under it refuses the same archive.
    let limits = UnpackLimits { max_data_bytes: 1000 };
    match unpack_layer_limited(&tar, &base.path().join("refused.erofs"), limits) {
        Err(ImageError::LayerTooLarge { limit }) => assert_eq!(limit, 1000),
        other => panic!("expected LayerTooLarge, got {other:?}"),
    }
    // Dense files count whole, and the refusal comes before the file that crosses the limit.
    let mut tb = TarBuilder::new();
    tb.file("a", &[1u8; 6000], Hdr::default(), &[]).file("b", &[2u8; 6000], Hdr::default(), &[]);
    let dense = tb.write(base.path(), "dense");
    let small = base.path().join("small.erofs");
    let r = unpack_layer_limited(&dense, &small, UnpackLimits { max_data_bytes: 10000 });
    assert!(matches!(r, Err(ImageError::LayerTooLarge { .. })), "{r:?}");
    let partial = std::fs::read(&small).unwrap();
    assert!(partial.windows(6000).any(|w| w == [1u8; 6000]), "positive control: a was written");
    assert!(!partial.contains(&2), "b was not written");
    let fits = base.path().join("fits.erofs");
    let (_, live) = unpack_live(&dense, &fits);
    assert_eq!(std::fs::read(live.root.join("b")).unwrap(), [2u8; 6000]);
}

fn sparse_member(map_and_data: &[u8], real_size: &str) -> TarBuilder {
    let mut tb = TarBuilder::new();
    tb.pax(&[
        ("GNU.sparse.major", b"1"),
        ("GNU.sparse.minor", b"0"),
        ("GNU.sparse.name", b"f"),
        ("GNU.sparse.realsize", real_size.as_bytes()),
    ]);
    tb.file("GNUSparseFile.0/f", map_and_data, Hdr::default(), &[]);
    tb
}

fn map(text: &str, data: &[u8]) -> Vec<u8> {
    let mut v = text.as_bytes().to_vec();
    v.resize(512, 0);
    v.extend_from_slice(data);
    v
}

#[test]
fn malformed_sparse_maps_are_refused() {
    // Positive control: a well-formed hand-made map unpacks.
    let h = Hostile::new();
    h.unpack(sparse_member(&map("1\n4096\n3\n", b"abc"), "10000")).unwrap();
    assert_eq!(meta(&h.live().join("f")).len(), 10000);
    assert_eq!(&std::fs::read(h.live().join("f")).unwrap()[4096..4099], b"abc");
    for (name, body, size) in [
        ("past the size", map("1\n9999\n3\n", b"abc"), "10000"),
        ("overlapping", map("2\n0\n3\n1\n3\n", b"abcabc"), "10000"),
        ("short data", map("1\n0\n30\n", b"abc"), "10000"),
        ("long data", map("1\n0\n3\n", b"abcdef"), "10000"),
        ("not a number", map("x\n", b""), "10000"),
        ("huge count", map("99999999999\n", b""), "10000"),
        ("past 16 TiB", map("1\n0\n3\n", b"abc"), "17592186044417"),
        ("2^64 - 1", map("1\n0\n3\n", b"abc"), "18446744073709551615"),
    ] {
        let h = Hostile::new();
        let r = h.unpack(sparse_member(&body, size));
        assert!(matches!(r, Err(ImageError::BadLayer { .. })), "{name}: {r:?}");
    }
}

#[test]
fn unpacked_layers_hold_nothing_live_on_the_host() {
    let base = tempfile::tempdir().unwrap();
    let root = Hdr { mode: 0o4755, uid: 0, gid: 0, mtime: 1 };
    let mut tb = TarBuilder::new();
    tb.file("su", b"#!/bin/sh\n", root, &[("security.capability", &CAP)])
        .dir("sgid/", Hdr { mode: 0o2777, ..Hdr::default() }, &[(OPAQUE, b"y")])
        .symlink("shadow", "/etc/shadow")
        .raw(EntryType::Char, "gone", None, &[], Hdr::default(), &[])
        .raw(EntryType::Fifo, "fifo", None, &[], Hdr { mode: 0o666, ..Hdr::default() }, &[]);
    let tar = tb.write(base.path(), "layer");
    let image = base.path().join("layer.erofs");
    let (_, live) = unpack_live(&tar, &image);
    // Positive control: what the image holds is what a scan of a live tree would flag.
    let su = meta(&live.root.join("su"));
    assert_eq!((su.mode(), su.uid()), (0o104755, 0));
    assert_eq!(get_xattr(&live.root.join("su"), "security.capability").as_deref(), Some(&CAP[..]));
    assert_eq!(meta(&live.root.join("sgid")).mode() & 0o7777, 0o2777);
    assert_eq!(get_xattr(&live.root.join("sgid"), OPAQUE).as_deref(), Some(&b"y"[..]));
    assert!(meta(&live.root.join("shadow")).file_type().is_symlink() && is_whiteout(&live.root.join("gone")));
    // On the host: the tar and one private image file, nothing else.
    assert_private_file(&image);
    let mut names: Vec<String> = std::fs::read_dir(base.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["layer.erofs", "layer.tar"]);
}
