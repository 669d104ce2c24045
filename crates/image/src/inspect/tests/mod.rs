//! Tests of the image read model on a hand-built three-layer stack (whiteouts, an opaque
//! directory, overrides, symlinks that try to escape, a loop, hardlinks, a FIFO) and on the
//! built-in busybox tree.

mod archive;
mod grep;

use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, FileType, Mode, Timespec, Timestamps};

use super::*;
use crate::fsutil;

/// The fixture is built as live trees (real types, modes, owners, as overlayfs would read
/// them), then made inert the way a legacy tree is converted; these set the live metadata.
mod live {
    use super::*;

    pub fn chmod(path: &Path, mode: u32) {
        rustix::fs::chmod(path, Mode::from_raw_mode(mode)).unwrap();
    }

    pub fn set_times(path: &Path, secs: i64) {
        let ts = Timespec { tv_sec: secs, tv_nsec: 0 };
        let times = Timestamps { last_access: ts, last_modification: ts };
        rustix::fs::utimensat(CWD, path, &times, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }

    pub fn mknod(path: &Path, kind: FileType) {
        rustix::fs::mknodat(CWD, path, kind, Mode::from_raw_mode(0o600), 0).unwrap();
    }
}

pub(super) const T0: i64 = 1_748_607_180; // 2025-05-30 12:13:00 UTC
pub(super) const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
pub(super) const BUSYBOX: &[u8] = b"#!busybox\nBUSYBOX MAIN\n";

/// Three layers (topmost first) in a temp dir.
pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub layers: Vec<PathBuf>,
}

impl Fixture {
    pub fn view(&self) -> ImageView {
        ImageView::of_trees(&self.layers, self._dir.path()).unwrap()
    }
}

fn write(path: &Path, body: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
    live::chmod(path, mode);
    live::set_times(path, T0);
}

fn mkdir(path: &Path, mode: u32) {
    std::fs::create_dir_all(path).unwrap();
    live::chmod(path, mode);
}

fn link(target: &str, at: &Path) {
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    symlink(target, at).unwrap();
}

fn whiteout(at: &Path) {
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    live::mknod(at, FileType::CharacterDevice);
}

/// * bottom: `/etc/{passwd,group,hosts,old.conf}`, `/opt/data/{a,b}.txt`, `/bin/busybox`,
///   `/bin/sh -> /bin/busybox`, `/usr/share/doc/readme.txt`, `/home/alice` (1000:1000),
///   `/removed_dir/file`, `/srv/gone.txt`
/// * middle: whiteouts for `/etc/old.conf` and `/removed_dir`, `/opt/data` opaque with
///   `c.txt`, `/etc/hosts` overridden, `/srv/link/hard{1,2}` hardlinked, `/srv/fifo`,
///   `/srv/orphan` (uid 4242), `/srv/gone.txt` overridden by a directory above
/// * top: symlinks `/etc/x -> /etc/passwd`, `/a/b -> ../../../../etc/passwd`,
///   `/a/up -> ../../../..`, `/loop1 <-> /loop2`, `/dangling`, `/etc/lib -> /usr/share`,
///   `/srv/linkdir -> /etc`; `/data/bin.dat` (binary), `/usr/share/doc/notes.md`,
///   `/srv/.hidden`, `/srv/gone.txt/` (a directory)
pub(super) fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let layers: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("l{i}"))).collect();
    for layer in &layers {
        mkdir(layer, 0o755);
    }
    let [top, mid, bottom] = [&layers[0], &layers[1], &layers[2]];

    write(&bottom.join("etc/passwd"), PASSWD.as_bytes(), 0o644);
    write(&bottom.join("etc/group"), b"root:x:0:\nstaff:x:1000:\n", 0o644);
    write(&bottom.join("etc/hosts"), b"127.0.0.1 localhost\n", 0o644);
    write(&bottom.join("etc/old.conf"), b"old root\n", 0o644);
    write(&bottom.join("opt/data/a.txt"), b"a root\n", 0o644);
    write(&bottom.join("opt/data/b.txt"), b"b\n", 0o644);
    write(&bottom.join("bin/busybox"), BUSYBOX, 0o755);
    link("/bin/busybox", &bottom.join("bin/sh"));
    write(&bottom.join("usr/share/doc/readme.txt"), b"Hello World\nhello world\nHELLO\n", 0o644);
    mkdir(&bottom.join("home/alice"), 0o750);
    fsutil::chown(&bottom.join("home/alice"), 1000, 1000).unwrap();
    write(&bottom.join("removed_dir/file"), b"root\n", 0o644);
    write(&bottom.join("srv/gone.txt"), b"root\n", 0o644);

    whiteout(&mid.join("etc/old.conf"));
    whiteout(&mid.join("removed_dir"));
    mkdir(&mid.join("opt/data"), 0o755);
    fsutil::set_xattr(&mid.join("opt/data"), fsutil::OPAQUE_XATTR, b"y").unwrap();
    write(&mid.join("opt/data/c.txt"), b"c root\n", 0o600);
    write(&mid.join("etc/hosts"), b"10.0.0.1 boxwood\n", 0o644);
    write(&mid.join("srv/link/hard1"), b"same inode root\n", 0o644);
    std::fs::hard_link(mid.join("srv/link/hard1"), mid.join("srv/link/hard2")).unwrap();
    live::mknod(&mid.join("srv/fifo"), FileType::Fifo);
    live::chmod(&mid.join("srv/fifo"), 0o640);
    write(&mid.join("srv/orphan"), b"nobody knows\n", 0o644);
    fsutil::chown(&mid.join("srv/orphan"), 4242, 4343).unwrap();

    link("/etc/passwd", &top.join("etc/x"));
    link("../../../../etc/passwd", &top.join("a/b"));
    link("../../../..", &top.join("a/up"));
    link("/loop2", &top.join("loop1"));
    link("loop1", &top.join("loop2"));
    link("/nonexistent", &top.join("dangling"));
    link("/usr/share", &top.join("etc/lib"));
    link("/etc", &top.join("srv/linkdir"));
    write(&top.join("data/bin.dat"), b"root here\n\0binary\n", 0o644);
    write(&top.join("usr/share/doc/notes.md"), b"line one\nTODO root\nline three\nline four\n", 0o644);
    write(&top.join("srv/.hidden"), b"secret root\n", 0o644);
    mkdir(&top.join("srv/gone.txt"), 0o755);
    // directory times last: creating children bumps them
    live::set_times(&top.join("etc"), T0);
    for layer in &layers {
        crate::inert::make_inert(layer).unwrap();
    }
    Fixture { _dir: dir, layers }
}

fn names(items: &[FileItem]) -> Vec<&str> {
    items.iter().map(|i| i.path.as_str()).collect()
}

fn read_all(view: &ImageView, path: &str) -> Vec<u8> {
    let (mut file, size) = view.open_file(path).unwrap();
    let mut body = Vec::new();
    file.read_to_end(&mut body).unwrap();
    assert_eq!(body.len() as u64, size);
    body
}

#[test]
fn resolve_follows_symlinks_inside_the_image() {
    let fx = fixture();
    let view = fx.view();
    let e = view.resolve("/etc/x", true).unwrap();
    assert_eq!((e.path().as_str(), e.layer()), ("/etc/passwd", 2));
    assert!(e.is_file());
    let e = view.resolve("/etc/x", false).unwrap();
    assert_eq!(e.path(), "/etc/x");
    assert!(e.is_symlink());
    // `..` clamps at the image root: the image's passwd, never the host's
    let e = view.resolve("/a/b", true).unwrap();
    assert_eq!(e.path(), "/etc/passwd");
    assert_eq!(read_all(&view, "/a/b"), PASSWD.as_bytes());
    assert_eq!(view.resolve("/a/up/etc/hosts", true).unwrap().path(), "/etc/hosts");
    assert_eq!(view.resolve("/../../etc/./hosts", true).unwrap().path(), "/etc/hosts");
    assert_eq!(view.resolve("etc/hosts", true).unwrap().path(), "/etc/hosts");
    assert_eq!(view.resolve("/a/up", true).unwrap().path(), "/");
    assert_eq!(view.resolve("/", true).unwrap().path(), "/");
    assert_eq!(view.resolve("/etc/lib/doc/../doc/readme.txt", true).unwrap().path(), "/usr/share/doc/readme.txt");
    // upper layers win, whiteouts hide, opaque directories stop the merge
    assert_eq!(view.resolve("/etc/hosts", true).unwrap().layer(), 1);
    assert!(matches!(view.resolve("/etc/old.conf", true), Err(ImageError::NotFound { .. })));
    assert!(matches!(view.resolve("/removed_dir/file", true), Err(ImageError::NotFound { .. })));
    assert!(matches!(view.resolve("/opt/data/a.txt", true), Err(ImageError::NotFound { .. })));
    assert_eq!(view.resolve("/opt/data/c.txt", true).unwrap().layer(), 1);
    assert!(view.resolve("/srv/gone.txt", true).unwrap().is_dir());
    // errors
    assert!(matches!(view.resolve("/loop1", true), Err(ImageError::SymlinkLoop { .. })));
    assert!(view.resolve("/loop1", false).unwrap().is_symlink());
    assert!(matches!(view.resolve("/loop1/x", false), Err(ImageError::SymlinkLoop { .. })));
    assert!(matches!(view.resolve("/dangling", true), Err(ImageError::NotFound { .. })));
    assert!(view.resolve("/dangling", false).is_ok());
    assert!(matches!(view.resolve("/etc/passwd/x", true), Err(ImageError::NotFound { .. })));
    assert!(matches!(view.resolve("/etc/passwd/..", true), Err(ImageError::NotFound { .. })));
    assert!(matches!(view.resolve("/etc/hosts/", true), Err(ImageError::NotDirectory { .. })));
    assert!(matches!(view.resolve("/etc\0", true), Err(ImageError::BadRequest(_))));
    assert!(matches!(ImageView::open(&[]).unwrap().resolve("/", true), Err(ImageError::NotFound { .. })));
}

#[test]
fn stat_and_list_show_the_merged_view() {
    let fx = fixture();
    let view = fx.view();
    let root = view.list("/").unwrap();
    assert_eq!(
        names(&root),
        ["a", "bin", "dangling", "data", "etc", "home", "loop1", "loop2", "opt", "srv", "usr"],
        "whited-out /removed_dir is hidden"
    );
    let etc = view.list("/etc").unwrap();
    assert_eq!(names(&etc), ["group", "hosts", "lib", "passwd", "x"]);
    let hosts = &etc[1];
    assert_eq!(hosts.size, 17);
    assert_eq!(hosts.mode, 0o100644);
    assert_eq!(hosts.mtime, T0);
    assert_eq!((hosts.owner.as_str(), hosts.group.as_str()), ("root", "root"));
    assert!(hosts.is_regular && !hosts.is_dir && !hosts.is_symlink);
    let lib = &etc[2];
    assert!(lib.is_symlink && !lib.is_dir);
    assert_eq!((lib.mode & 0o170000, lib.symlink_to.as_str()), (0o120000, "/usr/share"));
    assert_eq!(lib.size, "/usr/share".len() as u64);
    // a symlink to a directory is followed for the listed directory itself
    assert_eq!(names(&view.list("/etc/lib").unwrap()), ["doc"]);
    assert_eq!(names(&view.list("/etc/lib/doc").unwrap()), ["notes.md", "readme.txt"]);
    assert_eq!(names(&view.list("/a/up/opt/data").unwrap()), ["c.txt"]);
    assert_eq!(names(&view.list("/srv").unwrap()), [".hidden", "fifo", "gone.txt", "link", "linkdir", "orphan"]);
    assert!(matches!(view.list("/etc/passwd"), Err(ImageError::NotDirectory { .. })));
    assert!(matches!(view.list("/etc/x"), Err(ImageError::NotDirectory { .. })));
    assert!(matches!(view.list("/nope"), Err(ImageError::NotFound { .. })));
    assert!(matches!(view.list("/dangling"), Err(ImageError::NotFound { .. })));

    let alice = view.stat("/home/alice").unwrap();
    assert_eq!((alice.owner.as_str(), alice.group.as_str(), alice.uid, alice.gid), ("alice", "staff", 1000, 1000));
    assert_eq!((alice.mode, alice.is_dir, alice.path.as_str()), (0o040750, true, "alice"));
    let orphan = view.stat("/srv/orphan").unwrap();
    assert_eq!((orphan.owner.as_str(), orphan.group.as_str()), ("4242", "4343"));
    let fifo = view.stat("/srv/fifo").unwrap();
    assert!(fifo.is_fifo && !fifo.is_regular);
    assert_eq!(fifo.mode, 0o010640);
    let hard = view.stat("/srv/link/hard2").unwrap();
    assert_eq!(hard.nlink, 2);
    let sh = view.stat("/bin/sh").unwrap();
    assert!(sh.is_regular && sh.symlink_to.is_empty());
    assert_eq!((sh.size, sh.mode, sh.path.as_str()), (BUSYBOX.len() as u64, 0o100755, "sh"));
    let sh = view.lstat("/bin/sh").unwrap();
    assert!(sh.is_symlink);
    assert_eq!(sh.symlink_to, "/bin/busybox");
    assert_eq!(view.stat("/").unwrap().path, "/");
    assert!(matches!(view.stat("/dangling"), Err(ImageError::NotFound { .. })));

    let json = serde_json::to_value(hosts).unwrap();
    let mut keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "gid",
            "group",
            "is_dir",
            "is_fifo",
            "is_regular",
            "is_socket",
            "is_symlink",
            "mode",
            "mtime",
            "nlink",
            "owner",
            "path",
            "size",
            "symlink_to",
            "uid"
        ]
    );
    assert_eq!(json["mode"], 33188);
    assert_eq!(json["symlink_to"], "");
    let listing = serde_json::to_value(DirectoryList { path: "/etc".into(), files: etc.clone() }).unwrap();
    assert_eq!(listing["path"], "/etc");
    assert_eq!(listing["files"][2]["symlink_to"], "/usr/share");
}

#[test]
fn text_listing_is_ls_style() {
    let fx = fixture();
    let view = fx.view();
    let etc = view.list("/etc").unwrap();
    let text = format_listing("/etc", &etc);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6);
    let total: u64 = etc.iter().map(|i| i.size).sum();
    assert_eq!(lines[0], format!("total {}", list::human_size(total)));
    assert_eq!(lines[2], "-rw-r--r-- 1 0 0    17.00 May 30 12:13 hosts");
    assert!(lines[3].starts_with("lrwxrwxrwx 1 0 0    10.00 "), "{}", lines[3]);
    assert!(lines[3].ends_with(" lib -> /usr/share"), "{}", lines[3]);

    let item = |path: &str, size: u64, mode: u32| FileItem {
        size,
        path: path.into(),
        owner: "root".into(),
        group: "root".into(),
        uid: 0,
        gid: 0,
        mode,
        mtime: T0,
        nlink: 1,
        is_dir: mode & 0o170000 == 0o040000,
        is_regular: mode & 0o170000 == 0o100000,
        is_symlink: false,
        is_socket: false,
        is_fifo: false,
        symlink_to: String::new(),
    };
    let text = format_listing("/", &[item("bin", 858, 0o040755), item("big", 19_028, 0o100644)]);
    assert_eq!(
        text,
        "total 19.42 KB\n\
         drwxr-xr-x 1 0 0   858.00 May 30 12:13 bin\n\
         -rw-r--r-- 1 0 0 18.58 KB May 30 12:13 big\n"
    );
    assert_eq!(format_listing("/empty", &[]), "total 0.00\n");
}

#[test]
fn open_follows_links_to_regular_files_only() {
    let fx = fixture();
    let view = fx.view();
    assert_eq!(read_all(&view, "/bin/sh"), BUSYBOX);
    assert_eq!(read_all(&view, "/etc/x"), PASSWD.as_bytes());
    assert_eq!(read_all(&view, "/etc/hosts"), b"10.0.0.1 boxwood\n");
    assert!(matches!(view.open_file("/dangling"), Err(ImageError::NotFound { .. })));
    assert!(matches!(view.open_file("/etc/old.conf"), Err(ImageError::NotFound { .. })));
    assert!(matches!(view.open_file("/etc"), Err(ImageError::NotRegular { .. })));
    assert!(matches!(view.open_file("/etc/lib"), Err(ImageError::NotRegular { .. })));
    assert!(matches!(view.open_file("/srv/fifo"), Err(ImageError::NotRegular { .. })));
    assert!(matches!(view.open_file("/loop2"), Err(ImageError::SymlinkLoop { .. })));
    assert!(view.check_archive("/etc/lib").is_ok());
    assert!(matches!(view.check_archive("/srv/fifo"), Err(ImageError::NotRegular { .. })));
    assert!(matches!(view.check_archive("/nope"), Err(ImageError::NotFound { .. })));
}

#[test]
fn busybox_tree_sh_opens_busybox() {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        eprintln!("skipping: no /bin/busybox on this host");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    crate::build_busybox_tree(busybox, &tree).unwrap();
    let view = ImageView::of_trees(&[tree], dir.path()).unwrap();
    let (_, size) = view.open_file("/bin/sh").unwrap();
    assert_eq!(size, std::fs::metadata(busybox).unwrap().len());
    assert_eq!(view.resolve("/bin/sh", true).unwrap().path(), "/bin/busybox");
    assert!(view.lstat("/bin/sh").unwrap().is_symlink);
    let bin = view.list("/bin").unwrap();
    assert!(bin.iter().any(|i| i.path == "busybox" && i.is_regular && i.mode == 0o100755));
    assert!(bin.iter().any(|i| i.path == "sh" && i.is_symlink && i.symlink_to == "/bin/busybox"));
    assert_eq!(view.stat("/tmp").unwrap().mode, 0o041777);
    assert_eq!(view.stat("/root").unwrap().owner, "root");
}
