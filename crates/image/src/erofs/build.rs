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
const COPY_BYTES: usize = 256 << 10;

/// An image being written: file data placed so far, metadata to come.
pub struct Builder {
    path: PathBuf,
    file: File,
    /// The first block no file uses yet.
    next_block: u64,
    inline_left: u64,
    buf: Vec<u8>,
}

impl Builder {
    /// Starts the new (0600) image file `path`.
    pub fn create(path: &Path) -> ImageResult<Self> {
        let file = crate::fsutil::create_file(path)?;
        Ok(Self { path: path.to_owned(), file, next_block: 1, inline_left: INLINE_BUDGET, buf: Vec::new() })
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
        let extents: Vec<(u64, u64)> = segments.iter().filter(|s| s.1 > 0).map(|&(o, l)| (o, o + l)).collect();
        if size == 0 || extents == [(0, size)] {
            return self.place(src, size, src_name);
        }
        let mut chunks = chunks_for(size, &extents);
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
        for &(start, end) in &extents {
            let mut at = start;
            while at < end {
                let index = (at / chunk) as usize;
                let len = (end - at).min(chunk - at % chunk);
                // chunks_for gives every chunk an extent touches a block
                let Some(Some(first)) = chunks.addrs.get(index) else {
                    return Err(ImageError::InvalidTree { path: self.path.clone(), reason: "unplaced chunk".into() });
                };
                self.copy(src, u64::from(*first) * BLOCK + at % chunk, len, src_name)?;
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
