//! [`ErofsImage`]: reads a published layer in place, the way the kernel does, so the host
//! never needs a second, unpacked copy of it. It reads what the writer writes (extended
//! inodes, flat, inline and block-map chunked data, inline xattrs) and what `mkfs.erofs`
//! writes without compression (compact inodes, tail-packed data, shared xattrs).
//!
//! A layer file is the store's own, but it is read as untrusted bytes all the same: every
//! offset is checked against the file, every count bounded, and damage is an
//! [`ImageError::CorruptLayer`], never a panic or an unbounded allocation.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::format::{BLOCK, BLOCK_BITS, DIRENT_SIZE, INCOMPAT_CHUNKED_FILE, NID_ALIGN, NULL_ADDR, SUPER_OFFSET};
use crate::inert::{Kind, Meta};
use crate::{ImageError, ImageResult, io_err};

const MAGIC: u32 = 0xE0F5_E1E2;
/// Incompat features this reader understands (chunked files; nothing compressed).
const KNOWN_INCOMPAT: u32 = INCOMPAT_CHUNKED_FILE;
/// `EROFS_CHUNK_FORMAT_INDEXES`: 8-byte chunk indexes instead of a 4-byte block map.
const CHUNK_INDEXES: u32 = 0x20;
const CHUNK_BITS_MASK: u32 = 0x1f;
/// Directories whose parsed entries are kept for lookups (a view walks a few at a time).
const DIR_CACHE: usize = 256;

/// An erofs image opened for reading.
#[derive(Debug)]
pub struct ErofsImage {
    file: File,
    path: PathBuf,
    len: u64,
    root_nid: u64,
    meta_base: u64,
    xattr_base: u64,
    /// `build_time` of the superblock: the mtime of every compact inode.
    build_time: (i64, u32),
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
}

/// One entry of a directory (`.` and `..` left out).
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub nid: u64,
}

/// One inode of an image: what it is, its metadata as the image has it, and where its data
/// lives.
#[derive(Debug, Clone)]
pub struct ErofsInode {
    pub nid: u64,
    pub meta: Meta,
    size: u64,
    nlink: u32,
    data: Data,
}

#[derive(Debug, Clone)]
enum Data {
    /// `size` bytes from this image offset.
    Flat(u64),
    /// Whole blocks from the first offset, the last block's bytes inline at the second.
    Inline { blocks_at: u64, tail_at: u64 },
    /// Chunks of 4 KiB << `bits`; the map's entries (block addresses) start at `map_at`.
    Chunked { bits: u8, map_at: u64 },
}

impl ErofsInode {
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
    /// Content bytes (a symlink's: its target's length; devices: 0).
    pub fn len(&self) -> u64 {
        self.size
    }
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }
    pub fn nlink(&self) -> u64 {
        u64::from(self.nlink)
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

impl ErofsImage {
    /// Opens the image at `path` and checks its superblock.
    pub fn open(path: &Path) -> ImageResult<Self> {
        let file = crate::fsutil::open_nofollow(path)?;
        let len = file.metadata().map_err(io_err(path))?.len();
        let mut image = Self {
            file,
            path: path.to_owned(),
            len,
            root_nid: 0,
            meta_base: 0,
            xattr_base: 0,
            build_time: (0, 0),
            dirs: Mutex::default(),
        };
        let mut sb = [0u8; 128];
        image.read_exact_at(&mut sb, SUPER_OFFSET as u64)?;
        if le32(&sb, 0) != MAGIC {
            return Err(image.corrupt("not an erofs image"));
        }
        if sb[12] != BLOCK_BITS {
            return Err(image.corrupt("block size is not 4 KiB"));
        }
        if le32(&sb, 80) & !KNOWN_INCOMPAT != 0 {
            return Err(image.corrupt("uses features this reader does not know (compression?)"));
        }
        image.root_nid = u64::from(le16(&sb, 14));
        image.build_time = (le64(&sb, 24) as i64, le32(&sb, 32));
        image.meta_base = u64::from(le32(&sb, 40)) * BLOCK;
        image.xattr_base = u64::from(le32(&sb, 44)) * BLOCK;
        Ok(image)
    }

    /// The file the image is read from (for logs, never for clients).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn corrupt(&self, reason: &str) -> ImageError {
        ImageError::CorruptLayer { path: self.path.clone(), reason: reason.into() }
    }

    /// Reads exactly `buf.len()` bytes at `at`; reading past the end is corruption.
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> ImageResult<()> {
        if at.checked_add(buf.len() as u64).is_none_or(|end| end > self.len) {
            return Err(self.corrupt("reference past the end of the image"));
        }
        self.file.read_exact_at(buf, at).map_err(io_err(&self.path))
    }

    /// The root directory.
    pub fn root(&self) -> ImageResult<ErofsInode> {
        let root = self.inode(self.root_nid)?;
        if !root.is_dir() {
            return Err(self.corrupt("the root is not a directory"));
        }
        Ok(root)
    }

    /// The inode numbered `nid`.
    pub fn inode(&self, nid: u64) -> ImageResult<ErofsInode> {
        let at = nid.checked_mul(NID_ALIGN).and_then(|o| o.checked_add(self.meta_base));
        let at = at.ok_or_else(|| self.corrupt("inode number out of range"))?;
        let mut head = [0u8; 64];
        let avail = self.len.saturating_sub(at).min(64) as usize;
        if avail < 32 {
            return Err(self.corrupt("inode past the end of the image"));
        }
        self.read_exact_at(&mut head[..avail], at)?;
        let format = le16(&head, 0);
        let extended = format & 1 == 1;
        let layout = (format >> 1) & 0x7;
        let xattr_icount = le16(&head, 2);
        let mode = u32::from(le16(&head, 4));
        let (isize, size, u, uid, gid, mtime, nlink) = if extended {
            if avail < 64 {
                return Err(self.corrupt("inode past the end of the image"));
            }
            let mtime = (le64(&head, 32) as i64, le32(&head, 40));
            (64, le64(&head, 8), le32(&head, 16), le32(&head, 24), le32(&head, 28), mtime, le32(&head, 44))
        } else {
            let (uid, gid) = (u32::from(le16(&head, 20)), u32::from(le16(&head, 22)));
            (32, u64::from(le32(&head, 8)), le32(&head, 16), uid, gid, self.build_time, u32::from(le16(&head, 6)))
        };
        let xattr_size = if xattr_icount == 0 { 0 } else { 12 + 4 * (u64::from(xattr_icount) - 1) };
        let body = at + isize + xattr_size;
        let kind = match mode & 0o170000 {
            0o040000 => Kind::Dir,
            0o100000 => Kind::File,
            0o120000 => Kind::Symlink,
            0o020000 => Kind::Char(decode_rdev(u)),
            0o060000 => Kind::Block(decode_rdev(u)),
            0o010000 => Kind::Fifo,
            0o140000 => Kind::Socket,
            _ => return Err(self.corrupt("inode of unknown type")),
        };
        let has_data = matches!(kind, Kind::Dir | Kind::File | Kind::Symlink);
        let data = match layout {
            _ if !has_data => Data::Flat(0),
            0 => Data::Flat(u64::from(u) * BLOCK),
            2 => Data::Inline { blocks_at: u64::from(u) * BLOCK, tail_at: body },
            4 if u & CHUNK_INDEXES == 0 => {
                let bits = (u & CHUNK_BITS_MASK) as u8;
                if bits > 31 - BLOCK_BITS {
                    return Err(self.corrupt("chunk size out of range"));
                }
                Data::Chunked { bits, map_at: body.next_multiple_of(4) }
            }
            _ => return Err(self.corrupt("unsupported data layout (compressed or chunk indexes)")),
        };
        let xattrs = if xattr_size == 0 { Vec::new() } else { self.xattrs(at + isize, xattr_size)? };
        let meta = Meta { kind, perm: mode & 0o7777, uid, gid, mtime, xattrs };
        Ok(ErofsInode { nid, meta, size: if has_data { size } else { 0 }, nlink, data })
    }

    /// The inline xattr area at `at` (`size` bytes): its shared references and entries.
    fn xattrs(&self, at: u64, size: u64) -> ImageResult<Vec<(String, Vec<u8>)>> {
        let mut area = vec![0u8; size as usize];
        self.read_exact_at(&mut area, at)?;
        let shared = usize::from(area[4]);
        let mut out = Vec::new();
        let mut pos = 12;
        for i in 0..shared {
            let id = area.get(12 + 4 * i..16 + 4 * i).ok_or_else(|| self.corrupt("shared xattr list too long"))?;
            let mut entry = [0u8; 4];
            let entry_at = self.xattr_base + 4 * u64::from(le32(id, 0));
            self.read_exact_at(&mut entry, entry_at)?;
            let (name_len, value_len) = (usize::from(entry[0]), usize::from(le16(&entry, 2)));
            let mut rest = vec![0u8; name_len + value_len];
            self.read_exact_at(&mut rest, entry_at + 4)?;
            out.push(self.xattr_entry(entry[1], &rest[..name_len], rest[name_len..].to_vec())?);
            pos = 16 + 4 * i;
        }
        while pos + 4 <= area.len() {
            let (name_len, index, value_len) =
                (usize::from(area[pos]), area[pos + 1], usize::from(le16(&area, pos + 2)));
            let end = pos + 4 + name_len + value_len;
            let body = area.get(pos + 4..end).ok_or_else(|| self.corrupt("xattr entry past its area"))?;
            out.push(self.xattr_entry(index, &body[..name_len], body[name_len..].to_vec())?);
            pos = end.next_multiple_of(4);
        }
        Ok(out)
    }

    fn xattr_entry(&self, index: u8, suffix: &[u8], value: Vec<u8>) -> ImageResult<(String, Vec<u8>)> {
        let prefix = match index {
            1 => "user.",
            2 => "system.posix_acl_access",
            3 => "system.posix_acl_default",
            4 => "trusted.",
            6 => "security.",
            _ => return Err(self.corrupt("xattr with an unknown name index")),
        };
        let suffix = std::str::from_utf8(suffix).map_err(|_| self.corrupt("xattr name is not UTF-8"))?;
        Ok((format!("{prefix}{suffix}"), value))
    }

    /// Reads up to `buf.len()` bytes of the inode's data at `off`; 0 at the end. A hole
    /// reads as zeros.
    pub fn read_at(&self, inode: &ErofsInode, off: u64, buf: &mut [u8]) -> ImageResult<usize> {
        if off >= inode.size || buf.is_empty() {
            return Ok(0);
        }
        let (at, run) = self.locate(inode, off)?;
        let n = (buf.len() as u64).min(run).min(inode.size - off) as usize;
        match at {
            Some(at) => self.read_exact_at(&mut buf[..n], at)?,
            None => buf[..n].fill(0),
        }
        Ok(n)
    }

    /// Where byte `off` of the inode's data is in the image (`None`: a hole) and how many
    /// bytes from there are contiguous.
    fn locate(&self, inode: &ErofsInode, off: u64) -> ImageResult<(Option<u64>, u64)> {
        Ok(match inode.data {
            Data::Flat(at) => (Some(at + off), inode.size - off),
            Data::Inline { blocks_at, tail_at } => {
                let full = (inode.size - 1) / BLOCK * BLOCK;
                if off < full {
                    (Some(blocks_at + off), full - off)
                } else {
                    (Some(tail_at + off - full), inode.size - off)
                }
            }
            Data::Chunked { bits, map_at } => {
                let chunk = BLOCK << bits;
                let mut entry = [0u8; 4];
                self.read_exact_at(&mut entry, map_at + 4 * (off / chunk))?;
                let within = off % chunk;
                let run = chunk - within;
                match le32(&entry, 0) {
                    NULL_ADDR => (None, run),
                    block => (Some(u64::from(block) * BLOCK + within), run),
                }
            }
        })
    }

    /// The byte ranges of the inode's data that hold data (holes left out), in order.
    pub fn data_extents(&self, inode: &ErofsInode) -> ImageResult<Vec<(u64, u64)>> {
        let Data::Chunked { bits, map_at } = inode.data else {
            return Ok(if inode.size == 0 { Vec::new() } else { vec![(0, inode.size)] });
        };
        let chunk = BLOCK << bits;
        let count = inode.size.div_ceil(chunk);
        if map_at.checked_add(4 * count).is_none_or(|end| end > self.len) {
            return Err(self.corrupt("chunk map past the end of the image"));
        }
        let mut map = vec![0u8; 4 * count as usize];
        self.read_exact_at(&mut map, map_at)?;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (i, entry) in map.chunks_exact(4).enumerate() {
            if le32(entry, 0) == NULL_ADDR {
                continue;
            }
            let (start, end) = (i as u64 * chunk, ((i as u64 + 1) * chunk).min(inode.size));
            match out.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => out.push((start, end)),
            }
        }
        Ok(out)
    }

    /// Copies `len` bytes of the inode's data from `from` into `dst` at `to`, in the kernel
    /// where the data lies in whole runs of the image.
    pub fn copy_to(&self, inode: &ErofsInode, mut from: u64, dst: &File, mut to: u64, mut len: u64) -> ImageResult<()> {
        if from.checked_add(len).is_none_or(|end| end > inode.size) {
            return Err(self.corrupt("copy past the end of a file"));
        }
        while len > 0 {
            let (at, run) = self.locate(inode, from)?;
            let n = run.min(len);
            match at {
                Some(at) if at.checked_add(n).is_some_and(|end| end <= self.len) => {
                    crate::sparse::copy_range(&self.file, at, dst, to, n).map_err(io_err(&self.path))?;
                }
                Some(_) => return Err(self.corrupt("data past the end of the image")),
                None => {} // a hole: the destination keeps its hole
            }
            (from, to, len) = (from + n, to + n, len - n);
        }
        Ok(())
    }

    /// All of the inode's data (symlink targets, small files); at most `limit` bytes.
    pub fn read_all(&self, inode: &ErofsInode, limit: u64) -> ImageResult<Vec<u8>> {
        if inode.size > limit {
            return Err(self.corrupt("entry larger than allowed"));
        }
        let mut out = vec![0u8; inode.size as usize];
        let mut at = 0;
        while at < out.len() {
            let n = self.read_at(inode, at as u64, &mut out[at..])?;
            if n == 0 {
                return Err(self.corrupt("file data ends before its size"));
            }
            at += n;
        }
        Ok(out)
    }

    /// A symlink's target.
    pub fn read_link(&self, inode: &ErofsInode) -> ImageResult<Vec<u8>> {
        if !inode.is_symlink() {
            return Err(self.corrupt("reading the target of a non-symlink"));
        }
        self.read_all(inode, crate::inert::MAX_SYMLINK_TARGET as u64)
    }

    /// A directory's entries sorted by name (bytewise), without `.` and `..`.
    pub fn read_dir(&self, dir: &ErofsInode) -> ImageResult<Arc<Vec<DirEntry>>> {
        if !dir.is_dir() {
            return Err(self.corrupt("listing a non-directory"));
        }
        if let Some(hit) = self.dirs.lock().unwrap_or_else(|e| e.into_inner()).get(&dir.nid) {
            return Ok(hit.clone());
        }
        let mut entries = Vec::new();
        let mut block = vec![0u8; BLOCK as usize];
        let mut off = 0;
        while off < dir.size {
            let len = (dir.size - off).min(BLOCK) as usize;
            let mut got = 0;
            while got < len {
                let n = self.read_at(dir, off + got as u64, &mut block[got..len])?;
                if n == 0 {
                    return Err(self.corrupt("directory shorter than its size"));
                }
                got += n;
            }
            self.parse_dir_block(&block[..len], &mut entries)?;
            off += BLOCK;
        }
        if entries.windows(2).any(|w| w[0].name >= w[1].name) {
            return Err(self.corrupt("directory entries out of order"));
        }
        let entries = Arc::new(entries);
        let mut cache = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= DIR_CACHE {
            cache.clear();
        }
        cache.insert(dir.nid, entries.clone());
        Ok(entries)
    }

    fn parse_dir_block(&self, block: &[u8], out: &mut Vec<DirEntry>) -> ImageResult<()> {
        let dirent = DIRENT_SIZE as usize;
        if block.len() < dirent {
            return Err(self.corrupt("directory block too short"));
        }
        let first = usize::from(le16(block, 8));
        if first < dirent || first % dirent != 0 || first > block.len() {
            return Err(self.corrupt("bad directory block"));
        }
        let count = first / dirent;
        for i in 0..count {
            let start = usize::from(le16(block, i * dirent + 8));
            let end = if i + 1 < count { usize::from(le16(block, (i + 1) * dirent + 8)) } else { block.len() };
            let name = block.get(start..end).ok_or_else(|| self.corrupt("bad directory entry name"))?;
            // the last name of a block runs to the block's end, NUL-padded
            let name =
                if i + 1 == count { &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())] } else { name };
            if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
                return Err(self.corrupt("bad directory entry name"));
            }
            if name == b"." || name == b".." {
                continue;
            }
            out.push(DirEntry { name: name.to_vec(), nid: le64(block, i * dirent) });
        }
        Ok(())
    }

    /// The entry `name` of directory `dir`, if any.
    pub fn lookup(&self, dir: &ErofsInode, name: &[u8]) -> ImageResult<Option<ErofsInode>> {
        let entries = self.read_dir(dir)?;
        match entries.binary_search_by(|e| e.name.as_slice().cmp(name)) {
            Ok(i) => self.inode(entries[i].nid).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// A reader of the inode's data from the start; it holds the image open, so it can
    /// outlive the caller's handle.
    pub fn reader(self: &Arc<Self>, inode: ErofsInode) -> ErofsReader {
        ErofsReader { image: self.clone(), inode, pos: 0 }
    }
}

/// `std::io::Read` over one inode's data, read in place.
#[derive(Debug)]
pub struct ErofsReader {
    image: Arc<ErofsImage>,
    inode: ErofsInode,
    pos: u64,
}

impl io::Read for ErofsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.image.read_at(&self.inode, self.pos, buf).map_err(io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The kernel's `new_decode_dev`.
fn decode_rdev(u: u32) -> u64 {
    let (major, minor) = ((u & 0xfff00) >> 8, (u & 0xff) | ((u >> 12) & 0xfff00));
    rustix::fs::makedev(major, minor)
}
