//! Sparse-aware file copies: which ranges of a file hold data, and copying ranges in the
//! kernel. Used by the erofs writer and by the VM runtime's scratch disks.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use rustix::fs::SeekFrom;

/// The `(start, end)` ranges of `file` that hold data (`SEEK_DATA`/`SEEK_HOLE`).
pub fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut pos = 0;
    while pos < size {
        let start = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(io::Error::from_raw_os_error(e.raw_os_error())),
        };
        let end = rustix::fs::seek(file, SeekFrom::Hole(start))
            .map_err(|e| io::Error::from_raw_os_error(e.raw_os_error()))?
            .min(size);
        if start >= end {
            break;
        }
        extents.push((start, end));
        pos = end;
    }
    Ok(extents)
}

/// Copies `len` bytes in the kernel (`copy_file_range`), falling back to reads and writes
/// where the filesystems cannot.
pub fn copy_range(src: &File, mut from: u64, dst: &File, mut to: u64, mut len: u64) -> io::Result<()> {
    while len > 0 {
        let chunk = len.min(1 << 30) as usize;
        match rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), chunk) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being written")),
            Ok(n) => len -= n as u64,
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::INVAL
                | rustix::io::Errno::NOSYS
                | rustix::io::Errno::OPNOTSUPP,
            ) => return copy_by_hand(src, from, dst, to, len),
            Err(e) => return Err(io::Error::from_raw_os_error(e.raw_os_error())),
        }
    }
    Ok(())
}

fn copy_by_hand(src: &File, mut from: u64, dst: &File, mut to: u64, mut len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], from)?;
        dst.write_all_at(&buf[..n], to)?;
        (from, to, len) = (from + n as u64, to + n as u64, len - n as u64);
    }
    Ok(())
}

/// Copies `src`'s data ranges into `dst` at the same offsets; holes stay holes (`dst` must
/// read as zeros there, e.g. be new). Returns the bytes copied.
pub fn copy_sparse(src: &File, dst: &File) -> io::Result<u64> {
    let size = src.metadata()?.len();
    let mut copied = 0;
    for (start, end) in data_extents(src, size)? {
        copy_range(src, start, dst, start, end - start)?;
        copied += end - start;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("a")).unwrap();
        src.set_len(64 << 20).unwrap();
        src.write_all_at(b"head", 0).unwrap();
        src.write_all_at(b"tail", (64 << 20) - 4).unwrap();
        let dst =
            File::options().read(true).write(true).create(true).truncate(true).open(dir.path().join("b")).unwrap();
        dst.set_len(64 << 20).unwrap();
        let copied = copy_sparse(&src, &dst).unwrap();
        assert!(copied < 1 << 20, "only the data blocks: {copied}");
        let mut buf = [0u8; 4];
        dst.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"head");
        dst.read_exact_at(&mut buf, (64 << 20) - 4).unwrap();
        assert_eq!(&buf, b"tail");
        use std::os::unix::fs::MetadataExt;
        assert!(dst.metadata().unwrap().blocks() * 512 < 1 << 20, "the copy stays sparse");
    }
}
