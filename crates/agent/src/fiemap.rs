//! Where a file's data sits on its block device (`FS_IOC_FIEMAP`), so the export can tell the
//! host which bytes of the scratch disk to copy instead of sending them (see the protocol
//! crate's "disk-referenced files").
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `_IOWR('f', 11, struct fiemap)`: 32-byte header, read-write.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Write the file's dirty pages (and allocate delayed blocks) before mapping.
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Allocated but never written: reads as zeros, so it is a hole to the export.
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
/// Flags under which the physical bytes are not the file's bytes as written: unknown or
/// delayed location (0x2, 0x4), encoded or encrypted (0x8, 0x80), not block-aligned, inline
/// or tail-packed (0x100, 0x200, 0x400).
const NOT_PLAIN: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400;
/// Extents fetched per ioctl.
const BATCH: usize = 256;

/// Dirty data written back per call of [`write_back`] before it reports progress.
const WRITEBACK_PIECE: u64 = 32 << 20;

/// Writes the dirty pages of `ranges` (offset, length) of `file` back to its device, a piece
/// at a time, calling `progress` after each: on a host whose disk is busy this can take
/// long, and the host's patience is per message, so the export must go on saying it lives.
/// `Ok(false)`: the write-back failed (the page cache still has the bytes); `Err` is
/// `progress`'s own failure.
pub fn write_back(
    file: &File,
    ranges: &[(u64, u64)],
    progress: &mut dyn FnMut() -> io::Result<()>,
) -> io::Result<bool> {
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    for &(start, len) in ranges {
        let mut at = start;
        while at < start + len {
            let n = (start + len - at).min(WRITEBACK_PIECE);
            let (Ok(off), Ok(count)) = (libc::off64_t::try_from(at), libc::off64_t::try_from(n)) else {
                return Ok(false);
            };
            // SAFETY: sync_file_range on a descriptor we own; no memory is passed.
            if unsafe { libc::sync_file_range(file.as_raw_fd(), off, count, flags) } < 0 {
                return Ok(false);
            }
            progress()?;
            at += n;
        }
    }
    Ok(true)
}

/// One data extent: (offset in the file, offset on the device, length).
pub type Extent = (u64, u64, u64);

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; BATCH],
}

/// The data extents of `file` (of `size` bytes), written back first, in file order, each
/// ending at or before `size`; `None` if the filesystem cannot map it, some extent's bytes are
/// not plainly on the device, or it has more than `max` extents — then its data must be read.
pub fn data_extents(file: &File, size: u64, max: usize) -> io::Result<Option<Vec<Extent>>> {
    let mut out: Vec<Extent> = Vec::new();
    let mut start = 0u64;
    let mut flags = FIEMAP_FLAG_SYNC;
    while start < size {
        let mut map = Box::new(Fiemap {
            start,
            length: size - start,
            flags,
            mapped_extents: 0,
            extent_count: BATCH as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); BATCH],
        });
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most `extent_count` extents
        // into `map`, which is a live, exclusively borrowed `struct fiemap` of that capacity
        // laid out as the kernel's (repr(C), same field sizes and order).
        let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, std::ptr::from_mut(&mut *map)) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Unsupported, or flags it refuses (EBADR), or the write-back failed (EIO: the
                // host could not store the disk's blocks): the page cache still has the bytes.
                Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL | libc::EBADR | libc::EIO) => Ok(None),
                _ => Err(e),
            };
        }
        flags = 0;
        let before = start;
        let mapped = (map.mapped_extents as usize).min(BATCH);
        if mapped == 0 {
            break; // the rest is a hole
        }
        let mut last = false;
        for e in &map.extents[..mapped] {
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
            if e.flags & NOT_PLAIN != 0 {
                return Ok(None);
            }
            let end = e.logical.saturating_add(e.length).min(size);
            if e.logical < start || end <= e.logical {
                // Out of order or past the end: nothing the export can state plainly.
                if e.logical >= size {
                    continue;
                }
                return Ok(None);
            }
            start = end;
            if e.flags & FIEMAP_EXTENT_UNWRITTEN != 0 {
                continue;
            }
            let len = end - e.logical;
            match out.last_mut() {
                Some((l, p, n)) if *l + *n == e.logical && *p + *n == e.physical => *n += len,
                _ => out.push((e.logical, e.physical, len)),
            }
            if out.len() > max {
                return Ok(None);
            }
        }
        if last || start == before {
            break;
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};

    use super::*;

    /// On the filesystem of the temp dir, whatever it is: a mapped file's extents must cover
    /// its data and skip its hole (the VM tests check the bytes on a real scratch disk).
    #[test]
    fn extents_cover_the_data_and_skip_holes() {
        let path = std::env::temp_dir().join(format!("bw-fiemap-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.seek(SeekFrom::Start(64 << 20)).unwrap();
        f.write_all(&vec![9u8; 100_000]).unwrap();
        let size = (64 << 20) + 100_000;
        let got = data_extents(&File::open(&path).unwrap(), size, 4096).unwrap();
        let none = data_extents(&File::open(&path).unwrap(), size, 0).unwrap();
        std::fs::remove_file(&path).unwrap();
        let Some(extents) = got else {
            eprintln!("this filesystem does not map files; nothing to check");
            return;
        };
        let data: u64 = extents.iter().map(|e| e.2).sum();
        assert!(((1 << 20) + 100_000..8 << 20).contains(&data), "{extents:?}");
        assert!(extents.windows(2).all(|w| w[0].0 + w[0].2 <= w[1].0), "in order, apart: {extents:?}");
        assert_eq!(extents.first().map(|e| e.0), Some(0));
        assert_eq!(extents.last().map(|e| e.0 + e.2), Some(size), "the last extent ends at the size");
        assert_eq!(none, None, "more extents than allowed");
    }

    #[test]
    fn tmpfs_cannot_map_so_the_data_is_read() {
        let dir = crate::testdir::tempdir("fiemap");
        let path = dir.as_path().join("f");
        std::fs::write(&path, vec![1u8; 200_000]).unwrap();
        if !dir.as_path().starts_with("/dev/shm") {
            return; // not tmpfs here
        }
        assert_eq!(data_extents(&File::open(&path).unwrap(), 200_000, 4096).unwrap(), None);
    }
}
