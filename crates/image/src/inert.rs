//! The inert on-disk form of a layer tree: what the guest sees (types, modes with setuid and
//! setgid, owners, device numbers, times, xattrs such as `security.capability`) is kept as
//! data, never as live host permissions.
//!
//! Every entry of a tree on the host is a directory (mode 0700) or a regular file (0600),
//! owned by the server's user, with one xattr, [`META_XATTR`], holding its [`Meta`]: a
//! symlink is a file holding its target, a device node, FIFO, socket or whiteout is an empty
//! file. So nothing under the state dir is setuid, setgid, executable by others, a device, a
//! symlink a host process could follow, or carries file capabilities or overlayfs markers,
//! whatever the images hold. Hardlinks stay host hardlinks (one inode, one record). The
//! erofs writer, merging and inspection read the records; the VM sees the erofs image, which
//! holds the real metadata.
//!
//! Trees written before this format existed are converted in place by [`make_inert`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::fsutil;
use crate::{ImageError, ImageResult, io_err};

/// The xattr holding an entry's [`Meta`].
pub const META_XATTR: &str = "user.boxwood.meta";
/// Host mode of every directory of a tree.
pub const DIR_MODE: u32 = 0o700;
/// Host mode of every non-directory of a tree.
pub const FILE_MODE: u32 = 0o600;
/// Longest symlink target (Linux's `PATH_MAX` less the NUL).
pub const MAX_SYMLINK_TARGET: usize = 4095;

/// Encoding version of the record.
const VERSION: u8 = 1;

/// What an entry is in the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// A character device with its `rdev` (0: an overlayfs whiteout).
    Char(u64),
    Block(u64),
    Fifo,
    Socket,
}

impl Kind {
    fn code(self) -> (u8, u64) {
        match self {
            Kind::Dir => (1, 0),
            Kind::File => (2, 0),
            Kind::Symlink => (3, 0),
            Kind::Char(rdev) => (4, rdev),
            Kind::Block(rdev) => (5, rdev),
            Kind::Fifo => (6, 0),
            Kind::Socket => (7, 0),
        }
    }

    fn from_code(code: u8, rdev: u64) -> Option<Self> {
        Some(match code {
            1 => Kind::Dir,
            2 => Kind::File,
            3 => Kind::Symlink,
            4 => Kind::Char(rdev),
            5 => Kind::Block(rdev),
            6 => Kind::Fifo,
            7 => Kind::Socket,
            _ => return None,
        })
    }

    /// The `S_IFMT` bits of this kind.
    pub fn type_bits(self) -> u32 {
        match self {
            Kind::Dir => 0o040000,
            Kind::File => 0o100000,
            Kind::Symlink => 0o120000,
            Kind::Char(_) => 0o020000,
            Kind::Block(_) => 0o060000,
            Kind::Fifo => 0o010000,
            Kind::Socket => 0o140000,
        }
    }
}

/// An entry's metadata as the image has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits incl. setuid/setgid/sticky (`0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub mtime: (i64, u32),
    /// Xattrs by full name, `trusted.overlay.opaque` included.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    pub fn new(kind: Kind, perm: u32, uid: u32, gid: u32, mtime: (i64, u32)) -> Self {
        Self { kind, perm: perm & 0o7777, uid, gid, mtime, xattrs: Vec::new() }
    }

    /// `st_mode`: the type bits and the permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.type_bits() | self.perm
    }

    /// An overlayfs whiteout (a char device 0/0).
    pub fn is_whiteout(&self) -> bool {
        self.kind == Kind::Char(0)
    }

    /// A directory marked opaque (`trusted.overlay.opaque=y`).
    pub fn is_opaque(&self) -> bool {
        self.kind == Kind::Dir && self.xattr(fsutil::OPAQUE_XATTR) == Some(b"y")
    }

    pub fn xattr(&self, name: &str) -> Option<&[u8]> {
        self.xattrs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }

    fn encode(&self) -> Vec<u8> {
        let (code, rdev) = self.kind.code();
        let mut out = Vec::with_capacity(40);
        out.push(VERSION);
        out.push(code);
        out.extend_from_slice(&rdev.to_le_bytes());
        for v in [self.perm, self.uid, self.gid] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.mtime.0.to_le_bytes());
        out.extend_from_slice(&self.mtime.1.to_le_bytes());
        out.extend_from_slice(&(self.xattrs.len() as u32).to_le_bytes());
        for (name, value) in &self.xattrs {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value);
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader(bytes);
        if r.take(1)?[0] != VERSION {
            return None;
        }
        let code = r.take(1)?[0];
        let rdev = u64::from_le_bytes(r.array()?);
        let kind = Kind::from_code(code, rdev)?;
        let [perm, uid, gid] = [r.u32()?, r.u32()?, r.u32()?];
        let mtime = (i64::from_le_bytes(r.array()?), r.u32()?);
        let count = r.u32()?;
        let mut xattrs = Vec::new();
        for _ in 0..count {
            let len = u16::from_le_bytes(r.array()?) as usize;
            let name = String::from_utf8(r.take(len)?.to_vec()).ok()?;
            let len = r.u32()? as usize;
            xattrs.push((name, r.take(len)?.to_vec()));
        }
        (r.0.is_empty() && perm <= 0o7777).then_some(Self { kind, perm, uid, gid, mtime, xattrs })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
}

/// An entry of a tree: its record and the host inode's own `lstat` (for size, links and
/// identity).
#[derive(Debug, Clone)]
pub struct Stat {
    pub meta: Meta,
    pub host: std::fs::Metadata,
}

impl Stat {
    pub fn kind(&self) -> Kind {
        self.meta.kind
    }
    pub fn is_dir(&self) -> bool {
        self.meta.kind == Kind::Dir
    }
    pub fn is_file(&self) -> bool {
        self.meta.kind == Kind::File
    }
    pub fn is_symlink(&self) -> bool {
        self.meta.kind == Kind::Symlink
    }
    pub fn is_whiteout(&self) -> bool {
        self.meta.is_whiteout()
    }
    pub fn is_opaque(&self) -> bool {
        self.meta.is_opaque()
    }
    /// `st_mode` as the image has it.
    pub fn mode(&self) -> u32 {
        self.meta.mode()
    }
    pub fn uid(&self) -> u32 {
        self.meta.uid
    }
    pub fn gid(&self) -> u32 {
        self.meta.gid
    }
    pub fn mtime(&self) -> i64 {
        self.meta.mtime.0
    }
    pub fn rdev(&self) -> u64 {
        match self.meta.kind {
            Kind::Char(r) | Kind::Block(r) => r,
            _ => 0,
        }
    }
    /// Content bytes (a symlink's: its target's length, as `lstat` reports; devices: 0).
    pub fn len(&self) -> u64 {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn nlink(&self) -> u64 {
        self.host.nlink()
    }
    pub fn dev(&self) -> u64 {
        self.host.dev()
    }
    pub fn ino(&self) -> u64 {
        self.host.ino()
    }
}

fn invalid(path: &Path, reason: &str) -> ImageError {
    ImageError::InvalidTree { path: path.to_owned(), reason: reason.into() }
}

/// The entry at `path`; `None` when there is none (or a parent is not a directory).
pub fn try_stat(path: &Path) -> ImageResult<Option<Stat>> {
    let host = match path.symlink_metadata() {
        Ok(m) => m,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::NotADirectory) => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let record = fsutil::get_xattr(path, META_XATTR)?.ok_or_else(|| invalid(path, "entry has no metadata record"))?;
    let meta = Meta::decode(&record).ok_or_else(|| invalid(path, "malformed metadata record"))?;
    let consistent = if meta.kind == Kind::Dir { host.is_dir() } else { host.is_file() };
    if !consistent {
        return Err(invalid(path, "entry does not match its metadata record"));
    }
    Ok(Some(Stat { meta, host }))
}

/// The entry at `path`, which must exist.
pub fn stat(path: &Path) -> ImageResult<Stat> {
    try_stat(path)?.ok_or_else(|| io_err(path)(io::Error::from(io::ErrorKind::NotFound)))
}

/// Writes `meta` as the record of the (host directory or regular file) entry at `path`.
pub fn set(path: &Path, meta: &Meta) -> ImageResult<()> {
    fsutil::set_xattr(path, META_XATTR, &meta.encode())
}

/// Makes the existing (empty) directory at `path` the root of a tree with `meta`.
pub fn init_root(path: &Path, meta: &Meta) -> ImageResult<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(DIR_MODE)).map_err(io_err(path))?;
    set(path, meta)
}

/// The record of a directory a layer implies but does not describe (the root, a missing
/// parent): root's, 0755.
pub fn implied_dir() -> Meta {
    Meta::new(Kind::Dir, 0o755, 0, 0, (0, 0))
}

/// Links the new name `new` to the (non-directory) entry `old`: one inode, one record.
pub fn hard_link(old: &Path, new: &Path) -> ImageResult<()> {
    fsutil::hard_link(old, new)
}

/// Creates a directory entry.
pub fn create_dir(path: &Path, meta: &Meta) -> ImageResult<()> {
    debug_assert_eq!(meta.kind, Kind::Dir);
    std::fs::DirBuilder::new().mode(DIR_MODE).create(path).map_err(io_err(path))?;
    set(path, meta)
}

/// Creates the host file of a new non-directory entry (never through a symlink: `O_EXCL`);
/// the caller writes its content, then [`set`]s its record.
pub fn create_file(path: &Path) -> ImageResult<File> {
    fsutil::create_file(path)
}

/// Why `target` cannot be a symlink's target, if it cannot.
pub fn symlink_target_refusal(target: &[u8]) -> Option<&'static str> {
    if target.is_empty() {
        Some("empty symlink target")
    } else if target.len() > MAX_SYMLINK_TARGET {
        Some("symlink target longer than 4095 bytes")
    } else if target.contains(&0) {
        Some("symlink target contains a NUL byte")
    } else {
        None
    }
}

/// Creates a symlink entry: a file holding `target`.
pub fn create_symlink(path: &Path, target: &[u8], meta: &Meta) -> ImageResult<()> {
    if let Some(why) = symlink_target_refusal(target) {
        return Err(invalid(path, why));
    }
    let mut file = create_file(path)?;
    file.write_all(target).map_err(io_err(path))?;
    drop(file);
    set(path, &Meta { kind: Kind::Symlink, ..meta.clone() })
}

/// Creates a device, FIFO, socket or whiteout entry: an empty file.
pub fn create_node(path: &Path, meta: &Meta) -> ImageResult<()> {
    debug_assert!(!matches!(meta.kind, Kind::Dir | Kind::File | Kind::Symlink));
    create_file(path)?;
    set(path, meta)
}

/// Opens a file entry's content (never following a host symlink, though trees hold none).
pub fn open(path: &Path) -> ImageResult<File> {
    fsutil::open_nofollow(path)
}

/// The target of the symlink entry at `path`.
pub fn read_link(path: &Path) -> ImageResult<Vec<u8>> {
    let mut target = Vec::new();
    open(path)?.take(MAX_SYMLINK_TARGET as u64 + 1).read_to_end(&mut target).map_err(io_err(path))?;
    if let Some(why) = symlink_target_refusal(&target) {
        return Err(invalid(path, why));
    }
    Ok(target)
}

/// Whether the tree at `root` is in the inert form (its root carries a record, which
/// [`make_inert`] writes last).
pub fn is_inert(root: &Path) -> ImageResult<bool> {
    Ok(fsutil::get_xattr(root, META_XATTR)?.is_some())
}

/// Converts a tree in the live form (entries with their real types, owners, modes and
/// xattrs, as overlayfs reads them) into the inert form, in place. Idempotent: an entry that
/// already has a record is only made inert (its host mode, owner and xattrs reset). A crash
/// between making a file or directory inert and writing its record loses that entry's
/// metadata (it is converted again from what is left); non-files are replaced by an atomic
/// rename. The store decides with its own marker, not the trees', whether to convert.
pub fn make_inert(root: &Path) -> ImageResult<()> {
    // A directory's record is taken before its children are converted (replacing a child
    // bumps the directory's live mtime) and written after them.
    let mut stack = vec![Visit::Enter(root.to_owned())];
    while let Some(visit) = stack.pop() {
        let dir = match visit {
            Visit::Leave(dir, meta) => {
                // Live xattrs go first: with them and the record (which holds them) on one
                // inode, a large set would not fit the filesystem's xattr space.
                neutralize(&dir, true)?;
                if let Some(meta) = meta {
                    set(&dir, &meta)?;
                }
                continue;
            }
            Visit::Enter(dir) => dir,
        };
        stack.push(Visit::Leave(dir.clone(), live_meta(&dir)?));
        for child in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let child = child.map_err(io_err(&dir))?.path();
            if child.symlink_metadata().map_err(io_err(&child))?.is_dir() {
                stack.push(Visit::Enter(child));
            } else {
                convert(&child)?;
            }
        }
    }
    Ok(())
}

enum Visit {
    Enter(PathBuf),
    /// The directory's live metadata, `None` when it already has its record.
    Leave(PathBuf, Option<Meta>),
}

/// The metadata of a live entry, `None` when it is a directory or file that already has
/// its record (converted before a crash).
fn live_meta(path: &Path) -> ImageResult<Option<Meta>> {
    let md = path.symlink_metadata().map_err(io_err(path))?;
    let ft = md.file_type();
    if (ft.is_dir() || ft.is_file()) && fsutil::get_xattr(path, META_XATTR)?.is_some() {
        return Ok(None);
    }
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_char_device() {
        Kind::Char(md.rdev())
    } else if ft.is_block_device() {
        Kind::Block(md.rdev())
    } else if ft.is_fifo() {
        Kind::Fifo
    } else {
        Kind::Socket
    };
    let mtime = (md.mtime(), md.mtime_nsec().clamp(0, 999_999_999) as u32);
    let mut meta = Meta::new(kind, md.mode(), md.uid(), md.gid(), mtime);
    meta.xattrs = fsutil::xattrs(path)?.into_iter().filter(|(n, _)| n != META_XATTR).collect();
    Ok(Some(meta))
}

/// Converts one live non-directory.
fn convert(path: &Path) -> ImageResult<()> {
    let Some(meta) = live_meta(path)? else { return neutralize(path, false) };
    if meta.kind == Kind::File {
        neutralize(path, false)?;
        return set(path, &meta);
    }
    let content = if meta.kind == Kind::Symlink {
        std::fs::read_link(path).map_err(io_err(path))?.into_os_string().into_encoded_bytes()
    } else {
        Vec::new()
    };
    let tmp = temp_sibling(path);
    let mut file = create_file(&tmp)?;
    file.write_all(&content).map_err(io_err(&tmp))?;
    drop(file);
    set(&tmp, &meta)?;
    // A live setgid parent (converted after its children) gave the new file its group.
    neutralize(&tmp, false)?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Gives a host directory or file the inert owner, mode and xattrs (the record only).
fn neutralize(path: &Path, is_dir: bool) -> ImageResult<()> {
    let (uid, gid) = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
    let md = path.symlink_metadata().map_err(io_err(path))?;
    if (md.uid(), md.gid()) != (uid, gid) {
        fsutil::chown(path, uid, gid)?;
    }
    let mode = if is_dir { DIR_MODE } else { FILE_MODE };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(path))?;
    for (name, _) in fsutil::xattrs(path)? {
        if name != META_XATTR {
            fsutil::remove_xattr(path, &name)?;
        }
    }
    Ok(())
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = format!(".boxwood-inert-{}", uuid::Uuid::new_v4().simple());
    path.parent().map_or_else(|| PathBuf::from(&name), |p| p.join(&name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_malformed_ones_are_refused() {
        let mut meta = Meta::new(Kind::Char(0x0103), 0o4755, 1000, 50, (-5, 999_999_999));
        meta.xattrs.push(("security.capability".into(), vec![1, 2, 3]));
        meta.xattrs.push((fsutil::OPAQUE_XATTR.into(), b"y".to_vec()));
        let bytes = meta.encode();
        assert_eq!(Meta::decode(&bytes), Some(meta.clone()));
        assert_eq!(meta.mode(), 0o024755);
        for cut in 0..bytes.len() {
            assert_eq!(Meta::decode(&bytes[..cut]), None, "truncated at {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert_eq!(Meta::decode(&extra), None);
        let mut version = bytes;
        version[0] = 9;
        assert_eq!(Meta::decode(&version), None);
        assert!(Meta::new(Kind::Char(0), 0, 0, 0, (0, 0)).is_whiteout());
    }

    #[test]
    fn entries_are_private_files_and_dirs_with_their_record() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        create_dir(&root, &Meta::new(Kind::Dir, 0o1777, 0, 0, (1, 2))).unwrap();
        let link = root.join("l");
        create_symlink(&link, b"/etc/shadow", &Meta::new(Kind::Symlink, 0o777, 0, 0, (3, 0))).unwrap();
        let dev = root.join("null");
        create_node(&dev, &Meta::new(Kind::Char(0x0103), 0o666, 0, 0, (0, 0))).unwrap();
        for (path, mode) in [(&root, 0o040700), (&link, 0o100600), (&dev, 0o100600)] {
            assert_eq!(path.symlink_metadata().unwrap().mode(), mode, "{}", path.display());
        }
        assert_eq!(read_link(&link).unwrap(), b"/etc/shadow");
        let st = stat(&link).unwrap();
        assert!(st.is_symlink() && st.len() == 11 && st.mode() == 0o120777);
        assert_eq!(stat(&dev).unwrap().rdev(), 0x0103);
        assert!(stat(&root).unwrap().meta.perm == 0o1777);
        assert!(try_stat(&root.join("missing")).unwrap().is_none());
        assert!(symlink_target_refusal(b"").is_some() && symlink_target_refusal(&[b'a'; 4096]).is_some());
    }
}
