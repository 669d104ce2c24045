//! The on-disk structures of an uncompressed erofs image with 4 KiB blocks, as the Linux
//! kernel reads them (`fs/erofs/erofs_fs.h`): the superblock, extended inodes, directory
//! entries and inline xattr entries. Everything is little-endian.

/// Block size (`blkszbits` = 12).
pub(crate) const BLOCK: u64 = 4096;
pub(crate) const BLOCK_BITS: u8 = 12;
/// The superblock lives at this byte offset of block 0.
pub(crate) const SUPER_OFFSET: usize = 1024;
pub(crate) const SUPER_SIZE: usize = 128;
const MAGIC: u32 = 0xE0F5_E1E2;
/// Inodes are addressed by `nid`: byte offset / 32 from `meta_blkaddr`.
pub(crate) const NID_ALIGN: u64 = 32;
/// Size of an extended inode (64-bit size, 32-bit ids, per-inode mtime).
pub(crate) const INODE_SIZE: u64 = 64;
/// Size of a directory entry (the name follows separately in the same block).
pub(crate) const DIRENT_SIZE: u64 = 12;
/// `EROFS_FEATURE_INCOMPAT_CHUNKED_FILE`.
pub(crate) const INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// A chunk block-map entry for a hole.
pub(crate) const NULL_ADDR: u32 = u32::MAX;

/// `i_format` data layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Data in consecutive blocks from `raw_blkaddr`.
    FlatPlain = 0,
    /// Whole data right after the inode (and its xattrs), within one block.
    FlatInline = 2,
    /// A block map of fixed-size chunks after the inode; holes are `NULL_ADDR`.
    ChunkBased = 4,
}

/// `EROFS_FT_*`, the type byte of a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileType {
    Regular = 1,
    Dir = 2,
    Char = 3,
    Block = 4,
    Fifo = 5,
    Socket = 6,
    Symlink = 7,
}

impl FileType {
    /// The `S_IFMT` bits of this type.
    pub(crate) fn ifmt(self) -> u32 {
        match self {
            FileType::Regular => 0o100000,
            FileType::Dir => 0o040000,
            FileType::Char => 0o020000,
            FileType::Block => 0o060000,
            FileType::Fifo => 0o010000,
            FileType::Socket => 0o140000,
            FileType::Symlink => 0o120000,
        }
    }
}

/// The superblock fields this writer sets.
pub(crate) struct Super {
    pub(crate) root_nid: u16,
    pub(crate) inos: u64,
    pub(crate) blocks: u32,
    /// The metadata area's first block; nids count from it.
    pub(crate) meta_blkaddr: u32,
    pub(crate) feature_incompat: u32,
    pub(crate) uuid: [u8; 16],
}

impl Super {
    pub(crate) fn encode(&self) -> [u8; SUPER_SIZE] {
        let mut b = [0u8; SUPER_SIZE];
        put32(&mut b, 0, MAGIC);
        // checksum (4) and feature_compat (8) stay 0: no superblock checksum feature
        b[12] = BLOCK_BITS;
        put16(&mut b, 14, self.root_nid);
        put64(&mut b, 16, self.inos);
        // build_time (24) and build_time_nsec (32): every inode carries its own mtime
        put32(&mut b, 36, self.blocks);
        put32(&mut b, 40, self.meta_blkaddr);
        // xattr_blkaddr (44) = 0: no shared xattrs
        b[48..64].copy_from_slice(&self.uuid);
        put32(&mut b, 80, self.feature_incompat);
        b
    }
}

/// One extended inode (`struct erofs_inode_extended`).
pub(crate) struct Inode {
    pub(crate) layout: Layout,
    pub(crate) xattr_icount: u16,
    /// Full `st_mode` (type and permission bits).
    pub(crate) mode: u16,
    pub(crate) size: u64,
    /// `raw_blkaddr`, `rdev` (new_encode_dev) or the chunk format, by type/layout.
    pub(crate) u: u32,
    pub(crate) ino: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: i64,
    pub(crate) mtime_nsec: u32,
    pub(crate) nlink: u32,
}

impl Inode {
    pub(crate) fn encode(&self, b: &mut [u8]) {
        put16(b, 0, 1 | ((self.layout as u16) << 1));
        put16(b, 2, self.xattr_icount);
        put16(b, 4, self.mode);
        put64(b, 8, self.size);
        put32(b, 16, self.u);
        put32(b, 20, self.ino);
        put32(b, 24, self.uid);
        put32(b, 28, self.gid);
        put64(b, 32, self.mtime as u64);
        put32(b, 40, self.mtime_nsec);
        put32(b, 44, self.nlink);
    }
}

/// The `rdev` encoding the kernel decodes with `new_decode_dev`.
pub(crate) fn encode_rdev(rdev: u64) -> u32 {
    let (major, minor) = (rustix::fs::major(rdev), rustix::fs::minor(rdev));
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// Splits an xattr name into the erofs name index and the suffix stored on disk.
pub(crate) fn xattr_index(name: &[u8]) -> Option<(u8, &[u8])> {
    match name {
        b"system.posix_acl_access" => Some((2, b"")),
        b"system.posix_acl_default" => Some((3, b"")),
        _ => [(&b"user."[..], 1u8), (b"trusted.", 4), (b"security.", 6)]
            .into_iter()
            .find_map(|(prefix, index)| name.strip_prefix(prefix).filter(|s| !s.is_empty()).map(|s| (index, s))),
    }
}

/// Bytes of the inline xattr area (`erofs_xattr_ibody_header` + 4-aligned entries), 0 when
/// there are no xattrs.
pub(crate) fn xattr_area_size(xattrs: &[(Vec<u8>, Vec<u8>)]) -> u64 {
    if xattrs.is_empty() {
        return 0;
    }
    12 + xattrs.iter().map(|(n, v)| xattr_entry_size(n, v)).sum::<u64>()
}

fn xattr_entry_size(name: &[u8], value: &[u8]) -> u64 {
    let suffix = xattr_index(name).map_or(0, |(_, s)| s.len());
    (4 + suffix as u64 + value.len() as u64).next_multiple_of(4)
}

/// Writes the inline xattr area into `b` (exactly [`xattr_area_size`] bytes).
pub(crate) fn encode_xattrs(b: &mut [u8], xattrs: &[(Vec<u8>, Vec<u8>)]) {
    // h_name_filter (0..4) stays 0, which no kernel reads without the filter feature;
    // h_shared_count (4) = 0: every xattr is inline
    let mut at = 12;
    for (name, value) in xattrs {
        let Some((index, suffix)) = xattr_index(name) else { continue };
        b[at] = suffix.len() as u8;
        b[at + 1] = index;
        put16(b, at + 2, value.len() as u16);
        b[at + 4..at + 4 + suffix.len()].copy_from_slice(suffix);
        let v = at + 4 + suffix.len();
        b[v..v + value.len()].copy_from_slice(value);
        at += xattr_entry_size(name, value) as usize;
    }
}

/// `i_xattr_icount` for an xattr area of `size` bytes.
pub(crate) fn xattr_icount(size: u64) -> u16 {
    if size == 0 { 0 } else { ((size - 12) / 4 + 1) as u16 }
}

/// Writes one directory entry (`struct erofs_dirent`).
pub(crate) fn encode_dirent(b: &mut [u8], nid: u64, nameoff: u16, ft: FileType) {
    put64(b, 0, nid);
    put16(b, 8, nameoff);
    b[10] = ft as u8;
}

pub(crate) fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
