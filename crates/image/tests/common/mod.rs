//! Helpers shared by the integration tests: raw tar building (hostile names included),
//! hand-built layer trees (built live, as overlayfs reads them, and turned into inert copies
//! for the code under test), and a snapshot of a tree to compare entry by entry.
#![allow(dead_code)]

pub mod random;
pub mod scenario;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Gid, Mode, Timespec, Timestamps, Uid, XattrFlags};

pub const OPAQUE: &str = "trusted.overlay.opaque";

// ---------- tars ----------

/// Builds a tar in memory with raw (unvalidated) member names.
pub struct TarBuilder {
    builder: tar::Builder<Vec<u8>>,
}

/// Fields of one member header.
#[derive(Clone, Copy)]
pub struct Hdr {
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
}

impl Default for Hdr {
    fn default() -> Self {
        Hdr { mode: 0o644, uid: 0, gid: 0, mtime: 1_600_000_000 }
    }
}

impl Default for TarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TarBuilder {
    pub fn new() -> Self {
        TarBuilder { builder: tar::Builder::new(Vec::new()) }
    }

    /// Appends one member: `kind`, raw `name`, optional raw `link`, data, PAX xattrs.
    pub fn raw(
        &mut self,
        kind: tar::EntryType,
        name: &str,
        link: Option<&str>,
        data: &[u8],
        hdr: Hdr,
        xattrs: &[(&str, &[u8])],
    ) -> &mut Self {
        if !xattrs.is_empty() {
            let keys: Vec<String> = xattrs.iter().map(|(k, _)| format!("SCHILY.xattr.{k}")).collect();
            let records = keys.iter().map(String::as_str).zip(xattrs.iter().map(|(_, v)| *v));
            self.builder.append_pax_extensions(records).unwrap();
        }
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(hdr.mode);
        header.set_uid(hdr.uid);
        header.set_gid(hdr.gid);
        header.set_mtime(hdr.mtime);
        header.set_size(data.len() as u64);
        header.set_device_major(0).unwrap();
        header.set_device_minor(0).unwrap();
        {
            let old = header.as_old_mut();
            assert!(name.len() < 100);
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(link) = link {
                old.linkname = [0; 100];
                old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
        }
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    /// Appends a PAX header with raw records; the next member must carry no xattrs.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        self.builder.append_pax_extensions(records.iter().copied()).unwrap();
        self
    }

    pub fn dir(&mut self, name: &str, hdr: Hdr, xattrs: &[(&str, &[u8])]) -> &mut Self {
        self.raw(tar::EntryType::Directory, name, None, &[], hdr, xattrs)
    }

    pub fn file(&mut self, name: &str, data: &[u8], hdr: Hdr, xattrs: &[(&str, &[u8])]) -> &mut Self {
        self.raw(tar::EntryType::Regular, name, None, data, hdr, xattrs)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(tar::EntryType::Symlink, name, Some(target), &[], Hdr { mode: 0o777, ..Hdr::default() }, &[])
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.raw(tar::EntryType::Link, name, Some(target), &[], Hdr::default(), &[])
    }

    pub fn device(&mut self, kind: tar::EntryType, name: &str, major: u32, minor: u32) -> &mut Self {
        // device numbers go in the ustar fields; write the header by hand
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(0o600);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_600_000_000);
        header.set_size(0);
        header.set_device_major(major).unwrap();
        header.set_device_minor(minor).unwrap();
        let old = header.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        header.set_cksum();
        self.builder.append(&header, &[][..]).unwrap();
        self
    }

    /// Writes the archive to `dir/name.tar` and returns its path.
    pub fn write(self, dir: &Path, name: &str) -> PathBuf {
        let bytes = self.builder.into_inner().unwrap();
        let path = dir.join(format!("{name}.tar"));
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

// ---------- layer trees ----------

fn errno(e: rustix::io::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.raw_os_error())
}

fn parent_dirs(path: &Path) {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
}

pub fn file(root: &Path, rel: &str, body: &str) -> PathBuf {
    let path = root.join(rel);
    parent_dirs(&path);
    std::fs::write(&path, body).unwrap();
    path
}

pub fn dir(root: &Path, rel: &str) -> PathBuf {
    let path = root.join(rel);
    std::fs::create_dir_all(&path).unwrap();
    path
}

pub fn opaque_dir(root: &Path, rel: &str) -> PathBuf {
    let path = dir(root, rel);
    set_xattr(&path, OPAQUE, b"y");
    path
}

pub fn whiteout(root: &Path, rel: &str) -> PathBuf {
    let path = root.join(rel);
    parent_dirs(&path);
    rustix::fs::mknodat(CWD, &path, FileType::CharacterDevice, Mode::from_raw_mode(0o600), 0).unwrap();
    path
}

pub fn fifo(root: &Path, rel: &str) -> PathBuf {
    let path = root.join(rel);
    parent_dirs(&path);
    rustix::fs::mknodat(CWD, &path, FileType::Fifo, Mode::from_raw_mode(0o644), 0).unwrap();
    path
}

pub fn link(root: &Path, rel: &str, target: &str) -> PathBuf {
    let path = root.join(rel);
    parent_dirs(&path);
    symlink(target, &path).unwrap();
    path
}

pub fn hardlink(root: &Path, rel: &str, existing: &str) -> PathBuf {
    let path = root.join(rel);
    parent_dirs(&path);
    std::fs::hard_link(root.join(existing), &path).unwrap();
    path
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, XattrFlags::empty()).map_err(errno).unwrap();
}

pub fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(rustix::io::Errno::NODATA) => None,
        Err(e) => panic!("getxattr {}: {e}", path.display()),
    }
}

pub fn set_owner(path: &Path, uid: u32, gid: u32) {
    rustix::fs::chownat(CWD, path, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), AtFlags::SYMLINK_NOFOLLOW)
        .unwrap();
}

pub fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn set_mtime(path: &Path, secs: i64) {
    set_mtime_ns(path, (secs, 0));
}

pub fn set_mtime_ns(path: &Path, (secs, nsec): (i64, u32)) {
    let ts = Timespec { tv_sec: secs, tv_nsec: nsec.into() };
    let times = Timestamps { last_access: ts, last_modification: ts };
    rustix::fs::utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

pub fn is_whiteout(path: &Path) -> bool {
    path.symlink_metadata().is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

pub fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

// ---------- snapshots ----------

/// What a tree shows at one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
    Fifo,
    Char(u64),
    Block(u64),
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    /// xattrs other than overlayfs-private ones (which an overlay mount hides)
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

fn list_xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(path, &mut buf[..]).map_err(errno).unwrap();
    let mut out = BTreeMap::new();
    for name in buf[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8(name.to_vec()).unwrap();
        if name.starts_with("trusted.overlay.") {
            continue;
        }
        let value = get_xattr(path, &name).unwrap_or_default();
        out.insert(name, value);
    }
    out
}

/// Every entry under `root` (the root itself as ""), keyed by relative path; a listed name
/// that lookup does not find is not an entry.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = if rel.as_os_str().is_empty() { root.to_owned() } else { root.join(&rel) };
        let meta = match path.symlink_metadata() {
            Ok(meta) => meta,
            // overlayfs passes readdir of a non-merged directory straight to the layer, whose
            // whiteouts are then listed although lookup hides them: the view is what lookup sees
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("lstat {}: {e}", path.display()),
        };
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(rel.join(entry.unwrap().file_name()));
            }
            Kind::Dir
        } else if ft.is_file() {
            Kind::File(std::fs::read(&path).unwrap())
        } else if ft.is_symlink() {
            Kind::Symlink(std::fs::read_link(&path).unwrap())
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_char_device() {
            Kind::Char(meta.rdev())
        } else if ft.is_block_device() {
            Kind::Block(meta.rdev())
        } else {
            Kind::Other
        };
        let mode = if ft.is_symlink() { 0 } else { meta.mode() & 0o7777 };
        let node =
            Node { kind, mode, uid: meta.uid(), gid: meta.gid(), mtime: meta.mtime(), xattrs: list_xattrs(&path) };
        out.insert(rel, node);
    }
    out
}

/// Asserts two snapshots are equal, reporting the first differing paths clearly.
pub fn assert_same_view(expected: &BTreeMap<PathBuf, Node>, actual: &BTreeMap<PathBuf, Node>, what: &str) {
    let mut problems = Vec::new();
    for (path, node) in expected {
        match actual.get(path) {
            None => problems.push(format!("missing {}: expected {node:?}", path.display())),
            Some(got) if got != node => {
                problems.push(format!("differs {}:\n   expected {node:?}\n   got      {got:?}", path.display()))
            }
            Some(_) => {}
        }
    }
    for (path, node) in actual {
        if !expected.contains_key(path) {
            problems.push(format!("unexpected {}: {node:?}", path.display()));
        }
    }
    assert!(problems.is_empty(), "{what}: {} differences:\n{}", problems.len(), problems.join("\n"));
}

// ---------- overlay mounts ----------

/// A read-only overlayfs mount of `lowers` (topmost first), unmounted on drop.
pub struct OverlayMount {
    pub path: PathBuf,
}

impl OverlayMount {
    pub fn new(lowers: &[&Path], mountpoint: &Path) -> Self {
        std::fs::create_dir_all(mountpoint).unwrap();
        let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        for l in &lowerdir {
            assert!(!l.contains([':', ',']), "layer path {l} unusable in lowerdir=");
        }
        let out = std::process::Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("ro,lowerdir={}", lowerdir.join(":")))
            .arg(mountpoint)
            .output()
            .expect("running mount(8)");
        assert!(
            out.status.success(),
            "mounting overlayfs failed (this test needs root and overlayfs, both verified on the dev \
             machine and CI): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        OverlayMount { path: mountpoint.to_owned() }
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount").arg(&self.path).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// A read-only kernel mount of an erofs image (through a loop device), unmounted on drop.
pub struct KernelMount(pub PathBuf);

impl KernelMount {
    pub fn new(image: &Path, at: &Path) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "erofs", "-o", "ro,loop"])
            .arg(image)
            .arg(at)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount erofs: {}", String::from_utf8_lossy(&out.stderr));
        Self(at.to_owned())
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

// ---------- inert trees ----------

/// An inert copy (see `boxwood_image::inert`) of the live tree `live` at `out`, made the way
/// a legacy tree is converted: `cp -a` (owners, modes, devices, xattrs) then `make_inert`.
pub fn inert_copy(live: &Path, out: &Path) -> PathBuf {
    let status = std::process::Command::new("cp").arg("-a").arg(live).arg(out).status().unwrap();
    assert!(status.success(), "cp -a {}", live.display());
    boxwood_image::inert::make_inert(out).unwrap();
    assert_inert(out);
    out.to_owned()
}

/// Inert copies of `layers` under `base/<tag>-inert-<i>`.
pub fn inert_copies(base: &Path, layers: &[&Path], tag: &str) -> Vec<PathBuf> {
    layers.iter().enumerate().map(|(i, l)| inert_copy(l, &base.join(format!("{tag}-inert-{i}")))).collect()
}

/// Every host entry under `root` is a 0700 directory or a 0600 file of ours holding only the
/// record xattr.
pub fn assert_inert(root: &Path) {
    let (uid, gid) = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
    let mut stack = vec![root.to_owned()];
    while let Some(path) = stack.pop() {
        let m = path.symlink_metadata().unwrap();
        let mode = m.mode();
        assert!(mode == 0o040700 || mode == 0o100600, "{} has live mode {mode:o}", path.display());
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{} has a live owner", path.display());
        let names: Vec<String> = list_xattrs(&path).into_keys().collect();
        assert_eq!(names, [boxwood_image::inert::META_XATTR], "{} has live xattrs", path.display());
        if m.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
}

/// Recreates the inert tree `inert` as a live tree at `live` (real types, owners, modes,
/// xattrs, times, hardlinks), for comparing with overlayfs and with expectations on files.
pub fn materialize(inert: &Path, live: &Path) {
    use boxwood_image::inert::{self, Kind as K};
    let mut links: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let mut dirs = Vec::new();
    let mut stack = vec![(inert.to_owned(), live.to_owned())];
    while let Some((src, dst)) = stack.pop() {
        let st = inert::stat(&src).unwrap();
        let key = (st.dev(), st.ino());
        if !st.is_dir()
            && st.nlink() > 1
            && let Some(first) = links.get(&key)
        {
            std::fs::hard_link(first, &dst).unwrap();
            continue;
        }
        let node = |kind| rustix::fs::mknodat(CWD, &dst, kind, Mode::from_raw_mode(0o600), st.rdev()).unwrap();
        match st.kind() {
            K::Dir => {
                std::fs::create_dir(&dst).unwrap();
                for e in std::fs::read_dir(&src).unwrap() {
                    let name = e.unwrap().file_name();
                    stack.push((src.join(&name), dst.join(&name)));
                }
            }
            K::File => {
                std::fs::copy(&src, &dst).unwrap();
            }
            K::Symlink => symlink(std::ffi::OsStr::from_bytes(&inert::read_link(&src).unwrap()), &dst).unwrap(),
            K::Char(_) => node(FileType::CharacterDevice),
            K::Block(_) => node(FileType::BlockDevice),
            K::Fifo => node(FileType::Fifo),
            K::Socket => continue,
        }
        set_owner(&dst, st.uid(), st.gid());
        for (name, value) in &st.meta.xattrs {
            set_xattr(&dst, name, value);
        }
        if st.is_dir() {
            dirs.push((dst, st.meta.perm, st.meta.mtime));
            continue;
        }
        if !st.is_symlink() {
            set_mode(&dst, st.meta.perm);
        }
        set_mtime_ns(&dst, st.meta.mtime);
        if st.nlink() > 1 {
            links.insert(key, dst);
        }
    }
    // children first: creating them bumped their directories' mtimes
    for (dir, perm, mtime) in dirs.into_iter().rev() {
        set_mode(&dir, perm);
        set_mtime_ns(&dir, mtime);
    }
}

/// The erofs image of an inert tree, written next to it as `<tree>.erofs`.
pub fn erofs_of(tree: &Path) -> PathBuf {
    let image = tree.with_extension("erofs");
    boxwood_image::erofs::write_image(&boxwood_image::erofs::tree_from_dir(tree).unwrap(), &image).unwrap();
    image
}

/// `merge_layers` on the erofs images of inert copies of the live `layers`; the result is
/// mounted by the kernel at `out` (as the guest would stack it) until the guard drops.
pub fn merge_live(layers: &[&Path], out: &Path, keep_whiteouts: bool) -> boxwood_image::ImageResult<KernelMount> {
    let base = out.parent().unwrap();
    let tag = out.file_name().unwrap().to_string_lossy().into_owned();
    let images: Vec<PathBuf> = inert_copies(base, layers, &tag).iter().map(|t| erofs_of(t)).collect();
    let images: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    let merged = base.join(format!("{tag}-merged.erofs"));
    boxwood_image::merge_layers(&images, &merged, keep_whiteouts)?;
    Ok(KernelMount::new(&merged, out))
}
