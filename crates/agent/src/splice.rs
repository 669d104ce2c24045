//! Moving file data to the host port without copying it through the agent: `splice(2)` from
//! the file into a pipe, then from the pipe into the virtio-serial port, whose driver hands
//! the pipe's pages to the host as they are. Under emulation every byte the guest copies
//! costs CPU, so an export that reads each file into a buffer and writes it out again spends
//! most of its time in those two copies.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};

use crate::tar::copy_padded;

/// The pipe's size: what one port write hands the host (the default, 64 KiB, works too).
const PIPE_BYTES: usize = 1 << 20;
/// The copy buffer for what cannot be spliced.
const COPY_BYTES: usize = 256 << 10;

/// A pipe kept for an export's file data, with the plain copy as the fallback.
pub struct Splicer {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
    /// Set once a splice was refused (a filesystem or port without splice support): the rest
    /// of the export is copied.
    refused: bool,
    buf: Vec<u8>,
}

impl Splicer {
    pub fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_BYTES as i32)).map_or(64 << 10, |n| n as usize);
        Ok(Self { read, write, capacity, refused: false, buf: Vec::new() })
    }

    /// Writes exactly `len` bytes to `port`: `file`'s from its offset, then zeros if it
    /// ends first.
    pub fn send(&mut self, file: &mut File, len: usize, port: &mut File) -> io::Result<()> {
        let mut left = len;
        while left > 0 && !self.refused {
            let moved =
                match splice(&*file, None, &self.write, None, left.min(self.capacity), SpliceFFlags::SPLICE_F_MOVE) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(Errno::EINTR) => continue,
                    Err(Errno::EINVAL) => {
                        crate::log("export: the file cannot be spliced; copying instead");
                        self.refused = true;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
            self.drain(moved, port)?;
            left -= moved;
        }
        if left > 0 {
            if self.buf.is_empty() {
                self.buf = vec![0; COPY_BYTES];
            }
            copy_padded(file, left as u64, port, &mut self.buf)?;
        }
        Ok(())
    }

    /// Moves the `n` bytes in the pipe to `port`.
    fn drain(&mut self, mut n: usize, port: &mut File) -> io::Result<()> {
        while n > 0 && !self.refused {
            match splice(&self.read, None, &*port, None, n, SpliceFFlags::SPLICE_F_MOVE) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the port took no data")),
                Ok(k) => n -= k,
                Err(Errno::EINTR) => {}
                Err(Errno::EINVAL) => {
                    crate::log("export: the port cannot be spliced to; copying instead");
                    self.refused = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if n == 0 {
            return Ok(());
        }
        // What a refusing port left in the pipe goes out as a plain copy.
        let pipe = File::from(self.read.try_clone()?);
        if io::copy(&mut pipe.take(n as u64), port)? != n as u64 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the pipe ran dry"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdir::tempdir;

    /// A file of `len` patterned bytes, and what `send` of `want` bytes of it must produce.
    fn source(dir: &std::path::Path, len: usize, want: usize) -> (File, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.join("src"), &data).unwrap();
        let mut expected = data;
        expected.resize(want, 0);
        (File::open(dir.join("src")).unwrap(), expected)
    }

    #[test]
    fn file_data_is_spliced_and_a_short_file_is_padded_with_zeros() {
        let dir = tempdir("splice");
        let want = 3 << 20;
        let (mut src, expected) = source(dir.as_path(), want - 1000, want);
        let mut out = File::create(dir.as_path().join("out")).unwrap();
        let mut splicer = Splicer::new().unwrap();
        splicer.send(&mut src, want, &mut out).unwrap();
        assert!(!splicer.refused, "a regular file splices into a regular file");
        assert_eq!(std::fs::read(dir.as_path().join("out")).unwrap(), expected);
    }

    #[test]
    fn a_target_that_refuses_splice_gets_the_same_bytes_copied() {
        let dir = tempdir("splice-refused");
        let want = (3 << 20) + 17;
        let (mut src, expected) = source(dir.as_path(), want, want);
        // splice(2) refuses an O_APPEND target with EINVAL, as a port without splice would.
        let mut out = std::fs::OpenOptions::new().create(true).append(true).open(dir.as_path().join("out")).unwrap();
        let mut splicer = Splicer::new().unwrap();
        splicer.send(&mut src, want, &mut out).unwrap();
        assert!(splicer.refused, "positive control: the target did refuse");
        assert_eq!(std::fs::read(dir.as_path().join("out")).unwrap(), expected);
    }
}
