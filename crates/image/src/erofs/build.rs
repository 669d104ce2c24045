//! [`Builder`]: an erofs image written as its content arrives, so a layer tar can be unpacked
//! straight into it. Each regular file's data goes to the next free blocks the moment it is
//! read (block 0 holds the superblock); the tree stays in memory and its metadata is written
//! after the data once it is complete (`meta_blkaddr` points there). File data is therefore
//! written once, never staged in a tree and copied again.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{BLOCK, INODE_SIZE};
use super::layout::{block_addr, chunks_for};
use super::{Content, Placed, Tree};
use crate::{ImageError, ImageResult, io_err};

/// Files this small are kept in memory (while [`INLINE_BUDGET`] lasts), so the writer can put
/// them inline after their inode instead of in a block of their own.
const INLINE_MAX: u64 = BLOCK - INODE_SIZE;
/// Bytes of small files held in memory at most; past it they are placed like large ones.
const INLINE_BUDGET: u64 = 64 << 20;
/// Chunk-index entries one image's files may have together (8 bytes each in memory while it
/// is built): a sparse file picks chunks large enough to stay within what is left.
const MAX_IMAGE_CHUNKS: u64 = 1 << 22;
const COPY_BYTES: usize = 256 << 10;

/// An image being written: file data placed so far, metadata to come.
pub struct Builder {
    path: PathBuf,
    file: File,
    /// The first block no file uses yet.
    next_block: u64,
    inline_left: u64,
    chunks_left: u64,
    buf: Vec<u8>,
}

impl Builder {
    /// Starts the new (0600) image file `path`.
    pub fn create(path: &Path) -> ImageResult<Self> {
        let file = crate::fsutil::create_file(path)?;
        Ok(Self {
            path: path.to_owned(),
            file,
            next_block: 1,
            inline_left: INLINE_BUDGET,
            chunks_left: MAX_IMAGE_CHUNKS,
            buf: Vec::new(),
        })
    }

    /// Reads a regular file's `len` bytes from `src` (named `src_name` in errors) into the
    /// image; the returned content goes into the tree.
    pub fn place(&mut self, src: &mut impl Read, len: u64, src_name: &Path) -> ImageResult<Content> {
        if len <= INLINE_MAX && len <= self.inline_left {
            self.inline_left -= len;
            let mut bytes = vec![0; len as usize];
            src.read_exact(&mut bytes).map_err(io_err(src_name))?;
            return Ok(Content::Bytes(bytes));
        }
        let blkaddr = block_addr(self.next_block, &self.path)?;
        let blocks = len.div_ceil(BLOCK);
        block_addr(self.next_block + blocks, &self.path)?;
        self.copy(src, self.next_block * BLOCK, len, src_name)?;
        self.next_block += blocks;
        Ok(Content::Placed(Placed::Flat { size: len, blkaddr }))
    }

    /// Reads a file with holes from `src`: `segments` (offset, length; in order, apart, within
    /// `size`, as a checked sparse map gives them) are its data, one after another in `src`.
    /// The data goes into chunks; holes cost nothing.
    pub fn place_sparse(
        &mut self,
        src: &mut impl Read,
        size: u64,
        segments: &[(u64, u64)],
        src_name: &Path,
    ) -> ImageResult<Content> {
        let ranges: Vec<(u64, u64)> = segments.iter().filter(|s| s.1 > 0).map(|&(o, l)| (o, o + l)).collect();
        if size == 0 || ranges == [(0, size)] {
            return self.place(src, size, src_name);
        }
        self.place_ranges(size, &ranges, |b, at, _, _, len| b.copy(src, at, len, src_name))
    }

    /// Copies a file's data from `disk` (named `disk_name` in errors): `extents` (offset in
    /// the file, offset on the disk, length; in order, apart, within `size` and the disk, as a
    /// checked extent map gives them) are its data, the rest holes.
    pub fn place_from_disk(
        &mut self,
        disk: &File,
        size: u64,
        extents: &[(u64, u64, u64)],
        disk_name: &Path,
    ) -> ImageResult<Content> {
        let ranges: Vec<(u64, u64)> = extents.iter().map(|&(o, _, l)| (o, o + l)).collect();
        self.place_ranges(size, &ranges, |b, at, i, offset, len| {
            let from = extents[i].1 + offset;
            copy_range(disk, from, &b.file, at, len, &mut b.buf).map_err(|(side, e)| match side {
                Side::Read => io_err(disk_name)(e),
                Side::Write => io_err(&b.path)(e),
            })
        })
    }

    /// Places a file of `size` whose data is `ranges` (start, end; in order, apart, within
    /// `size`): contiguous blocks when the data has no hole, else chunks holding only the data.
    /// `fill(self, image offset, range index, offset in the range, len)` writes each piece.
    fn place_ranges(
        &mut self,
        size: u64,
        ranges: &[(u64, u64)],
        mut fill: impl FnMut(&mut Self, u64, usize, u64, u64) -> ImageResult<()>,
    ) -> ImageResult<Content> {
        let ranges_len: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
        if size == 0 {
            return Ok(Content::Bytes(Vec::new()));
        }
        if ranges_len == size {
            // In order and apart, adding up to the size: the whole file, without a hole.
            let blkaddr = block_addr(self.next_block, &self.path)?;
            let blocks = size.div_ceil(BLOCK);
            block_addr(self.next_block + blocks, &self.path)?;
            let base = self.next_block * BLOCK;
            self.next_block += blocks;
            for (i, &(start, end)) in ranges.iter().enumerate() {
                fill(self, base + start, i, 0, end - start)?;
            }
            return Ok(Content::Placed(Placed::Flat { size, blkaddr }));
        }
        // Refused as the tar member's fault: the caller names it.
        let mut chunks = chunks_for(size, ranges, self.chunks_left).ok_or_else(|| ImageError::BadLayer {
            member: String::new(),
            reason: format!("the layer's sparse files need more than {MAX_IMAGE_CHUNKS} chunks"),
        })?;
        self.chunks_left -= chunks.addrs.len() as u64;
        let chunk = chunks.size();
        let mut block = self.next_block;
        for (i, addr) in chunks.addrs.iter_mut().enumerate() {
            if addr.is_some() {
                *addr = Some(block_addr(block, &self.path)?);
                block += (size - i as u64 * chunk).min(chunk).div_ceil(BLOCK);
            }
        }
        block_addr(block, &self.path)?;
        self.next_block = block;
        for (i, &(start, end)) in ranges.iter().enumerate() {
            let mut at = start;
            while at < end {
                let index = (at / chunk) as usize;
                let len = (end - at).min(chunk - at % chunk);
                // chunks_for gives every chunk a range touches a block
                let Some(Some(first)) = chunks.addrs.get(index) else {
                    return Err(ImageError::InvalidTree { path: self.path.clone(), reason: "unplaced chunk".into() });
                };
                fill(self, u64::from(*first) * BLOCK + at % chunk, i, at - start, len)?;
                at += len;
            }
        }
        Ok(Content::Placed(Placed::Chunked { size, bits: chunks.bits, addrs: chunks.addrs }))
    }

    /// Writes the metadata of `tree` (whose placed files are this builder's) after the data;
    /// the image is complete but not yet flushed to disk.
    pub fn finish(self, tree: &Tree) -> ImageResult<PathBuf> {
        super::write::write_after(tree, &self.file, &self.path, self.next_block)?;
        Ok(self.path)
    }

    fn copy(&mut self, src: &mut impl Read, mut at: u64, len: u64, src_name: &Path) -> ImageResult<()> {
        if self.buf.is_empty() {
            self.buf = vec![0; COPY_BYTES];
        }
        let mut left = len;
        while left > 0 {
            let want = usize::try_from(left).unwrap_or(usize::MAX).min(self.buf.len());
            let n = match src.read(&mut self.buf[..want]) {
                Ok(0) => return Err(io_err(src_name)(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(src_name)(e)),
            };
            self.file.write_all_at(&self.buf[..n], at).map_err(io_err(&self.path))?;
            at += n as u64;
            left -= n as u64;
        }
        Ok(())
    }
}

/// Which file a copy failed on.
enum Side {
    Read,
    Write,
}

/// Copies `len` bytes at `from` in `src` to `at` in `dst`, in the kernel where it can
/// (`copy_file_range`: no copy through user space, a reflink where the filesystem shares
/// blocks), else through `buf`. Bytes past `src`'s end are an error, not zeros: the caller
/// checked the range against the disk.
fn copy_range(
    src: &File,
    mut from: u64,
    dst: &File,
    mut at: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<(), (Side, io::Error)> {
    use rustix::io::Errno;
    let end = from + len;
    while from < end {
        let want = usize::try_from(end - from).unwrap_or(usize::MAX).min(1 << 30);
        match rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut at), want) {
            Ok(0) => return Err((Side::Read, io::ErrorKind::UnexpectedEof.into())),
            Ok(_) | Err(Errno::INTR) => {}
            Err(Errno::XDEV | Errno::INVAL | Errno::OPNOTSUPP | Errno::NOSYS) => break,
            // A full or over-quota disk is the image's; anything else is put down to reading.
            Err(e @ (Errno::NOSPC | Errno::DQUOT | Errno::FBIG)) => return Err((Side::Write, e.into())),
            Err(e) => return Err((Side::Read, e.into())),
        }
    }
    if from < end && buf.is_empty() {
        buf.resize(COPY_BYTES, 0);
    }
    while from < end {
        let n = usize::try_from(end - from).unwrap_or(usize::MAX).min(buf.len());
        let got = src.read_at(&mut buf[..n], from).map_err(|e| (Side::Read, e))?;
        if got == 0 {
            return Err((Side::Read, io::ErrorKind::UnexpectedEof.into()));
        }
        dst.write_all_at(&buf[..got], at).map_err(|e| (Side::Write, e))?;
        from += got as u64;
        at += got as u64;
    }
    Ok(())
}
